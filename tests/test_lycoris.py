"""networks.lycoris: LoHa, LoKr and DoRA, trained here and applied by WebUI's and ComfyUI's rules.

`webui_delta` and `comfy_weight` re-implement, from their code, how AUTOMATIC1111 WebUI
(extensions-builtin/Lora: network_lora/hada/lokr.py, network.py finalize_updown and
apply_weight_decompose) and ComfyUI (comfy/weight_adapter lora/loha/lokr.py, base.py
weight_decompose) turn a file's tensors into a weight change; our saved file must give, under
each rule, the layer output our network gives in training.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from library.errors import UserError
from library.models.tiny import build_tiny_components
from networks import lycoris as lyco
from networks import lycoris_format as lyc

# --- the clients' rules, written from their code ---------------------------------------------


def webui_delta(t: dict, orig_weight: torch.Tensor, multiplier: float) -> torch.Tensor:
    """WebUI: calc_updown of the module type, then finalize_updown (scale, DoRA, multiplier)."""
    shape = orig_weight.shape
    dim = None
    if "lora_down.weight" in t:  # network_lora.py
        up, down = t["lora_up.weight"], t["lora_down.weight"]
        dim = down.shape[0]
        if up.dim() == 4:
            updown = (up.squeeze(3).squeeze(2) @ down.flatten(1)).reshape(shape) if up.shape[2:] == (1, 1) \
                else None
        else:
            updown = up @ down
        output_shape = shape
    elif "hada_w1_a" in t:  # network_hada.py
        dim = t["hada_w1_b"].shape[0]
        updown = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
        output_shape = [t["hada_w1_a"].size(0), t["hada_w1_b"].size(1)]
    else:  # network_lokr.py
        if "lokr_w1" in t:
            w1 = t["lokr_w1"]
        else:
            w1 = t["lokr_w1_a"] @ t["lokr_w1_b"]
            dim = t["lokr_w1_b"].shape[0]
        if "lokr_w2" in t:
            w2 = t["lokr_w2"]
        else:
            w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
            dim = t["lokr_w2_b"].shape[0]
        output_shape = [w1.size(0) * w2.size(0), w1.size(1) * w2.size(1)]
        if len(shape) == 4:
            output_shape = shape
        if len(w2.shape) == 4:
            w1 = w1.unsqueeze(2).unsqueeze(2)
        updown = torch.kron(w1, w2.contiguous()).reshape(output_shape)
    # finalize_updown
    if len(output_shape) == 4:
        updown = updown.reshape(output_shape)
    if orig_weight.numel() == updown.numel():
        updown = updown.reshape(orig_weight.shape)
    alpha = t["alpha"].item() if "alpha" in t else None
    scale = alpha / dim if dim is not None and alpha is not None else 1.0
    updown = updown * scale
    if "dora_scale" in t:  # apply_weight_decompose
        merged = updown + orig_weight
        norm = (merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True)
                .reshape(merged.shape[1], *[1] * (len(shape) - 1)).transpose(0, 1))
        updown = merged * (t["dora_scale"] / norm) - orig_weight
    return updown * multiplier


def comfy_weight(t: dict, weight: torch.Tensor, strength: float) -> torch.Tensor:
    """ComfyUI: calculate_weight of the adapter type; weight_decompose when dora_scale is present."""
    weight = weight.clone()
    alpha_t = t.get("alpha")
    if "lora_down.weight" in t:  # lora.py
        mat1, mat2 = t["lora_up.weight"], t["lora_down.weight"]
        alpha = alpha_t.item() / mat2.shape[0] if alpha_t is not None else 1.0
        diff = torch.mm(mat1.flatten(start_dim=1), mat2.flatten(start_dim=1)).reshape(weight.shape)
    elif "hada_w1_a" in t:  # loha.py
        alpha = alpha_t.item() / t["hada_w1_b"].shape[0] if alpha_t is not None else 1.0
        m1 = torch.mm(t["hada_w1_a"], t["hada_w1_b"])
        m2 = torch.mm(t["hada_w2_a"], t["hada_w2_b"])
        diff = (m1 * m2).reshape(weight.shape)
    else:  # lokr.py
        dim = None
        w1, w2 = t.get("lokr_w1"), t.get("lokr_w2")
        if w1 is None:
            dim = t["lokr_w1_b"].shape[0]
            w1 = torch.mm(t["lokr_w1_a"], t["lokr_w1_b"])
        if w2 is None:
            dim = t["lokr_w2_b"].shape[0]
            w2 = torch.mm(t["lokr_w2_a"], t["lokr_w2_b"])
        if len(w2.shape) == 4:
            w1 = w1.unsqueeze(2).unsqueeze(2)
        alpha = alpha_t.item() / dim if alpha_t is not None and dim is not None else 1.0
        diff = torch.kron(w1, w2).reshape(weight.shape)
    if "dora_scale" not in t:
        return weight + strength * alpha * diff
    dora_scale = t["dora_scale"]  # base.py weight_decompose
    diff = diff * alpha
    calc = weight + diff
    if dora_scale.shape[0] == calc.shape[0]:
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True).reshape(
            weight.shape[0], *[1] * (weight.dim() - 1))
    else:
        norm = (calc.transpose(0, 1).reshape(calc.shape[1], -1).norm(dim=1, keepdim=True)
                .reshape(calc.shape[1], *[1] * (calc.dim() - 1)).transpose(0, 1))
    norm = norm + torch.finfo(weight.dtype).eps
    calc = calc * (dora_scale / norm)
    if strength != 1.0:
        return weight + strength * (calc - weight)
    return calc


# --- helpers ---------------------------------------------------------------------------------

ALGOS = {
    "loha": {"algo": "loha"},
    "lokr": {"algo": "lokr", "factor": "4"},  # dim 4 < half of w2: w2 low-rank
    "lokr_full": {"algo": "lokr", "factor": "4", "full_matrix": "True"},
    "lokr_both": {"algo": "lokr", "factor": "8", "decompose_both": "True"},
    "dora": {"algo": "dora"},
    "loha_dora": {"algo": "loha", "dora_wd": "True"},
    "lokr_dora": {"algo": "lokr", "factor": "4", "dora_wd": "True"},
}


def components():
    return build_tiny_components(seed=0)


def build(algo_args, dim=4, alpha=2, conv=True, multiplier=1.0):
    unet, vae, te = components()
    kwargs = dict(algo_args, **({"conv_dim": "4", "conv_alpha": "3"} if conv else {"preset": "attn-mlp"}))
    net = lyco.create_network(multiplier, dim, alpha, vae, te, unet, **kwargs)
    net.apply_to(te, unet, True, True)
    net.models = (unet, te)
    return net


@torch.no_grad()
def randomize(net, seed=1):
    g = torch.Generator().manual_seed(seed)
    for name, p in net.named_parameters():
        if name.endswith("dora_scale"):
            p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def layer_input(layer, g):
    if isinstance(layer, torch.nn.Conv2d):
        return torch.randn(2, layer.in_channels, 6, 6, generator=g, dtype=layer.weight.dtype)
    return torch.randn(2, 3, layer.in_features, generator=g, dtype=layer.weight.dtype)


def base_out(layer, x, weight):
    if isinstance(layer, torch.nn.Conv2d):
        return layer._conv_forward(x, weight, layer.bias)
    return F.linear(x, weight, layer.bias)


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp(min=1e-12)) if not a.requires_grad else rel(a.detach(), b.detach())


# --- the client rules give our training delta ------------------------------------------------

@pytest.mark.parametrize("name", list(ALGOS))
def test_saved_file_applied_by_webui_and_comfyui_rules_equals_training(tmp_path, name):
    mult = 0.7
    net = build(ALGOS[name], multiplier=mult)
    randomize(net)
    net.train()
    path = tmp_path / f"{name}.safetensors"
    net.save_weights(str(path), torch.float32, {"ss_network_module": "lycoris.kohya"})
    # float64 so that what is compared is the rule, not float32 cancellation in (out + change) - out
    for part in net.models:
        part.double()
    net.double()
    sd = {k: v.double() for k, v in load_file(path).items()}
    modules = lyc.group_modules(sd)
    assert len(modules) == len(net.all_loras())
    g = torch.Generator().manual_seed(3)
    worst = {"webui": 0.0, "comfy": 0.0}
    kinds = set()
    for m in net.all_loras():
        layer = m.org_module
        kinds.add((type(m).__name__, type(layer).__name__, tuple(layer.weight.shape[2:])))
        x = layer_input(layer, g)
        with torch.no_grad():
            ours = layer(x) - base_out(layer, x, layer.weight)  # the patched layer, training mode
            w = layer.weight
            webui = base_out(layer, x, w + webui_delta(modules[m.lora_name], w, mult)) - base_out(layer, x, w)
            comfy = base_out(layer, x, comfy_weight(modules[m.lora_name], w, mult)) - base_out(layer, x, w)
        assert ours.abs().max() > 0, m.lora_name
        worst["webui"] = max(worst["webui"], rel(ours, webui))
        worst["comfy"] = max(worst["comfy"], rel(ours, comfy))
    print(f"{name}: worst rel. diff of the layer outputs' change: WebUI {worst['webui']:.2e}, "
          f"ComfyUI {worst['comfy']:.2e} over {len(modules)} modules")
    assert worst["webui"] < 1e-5 and worst["comfy"] < 1e-5, worst
    linear_and_conv3 = {k[1] for k in kinds} == {"Linear", "Conv2d"} and any(k[2] == (3, 3) for k in kinds)
    assert linear_and_conv3, kinds


@pytest.mark.parametrize("name", ["loha", "lokr", "dora"])
def test_file_reloads_into_the_same_network_and_merges_to_the_same_weights(tmp_path, name):
    net = build(ALGOS[name])
    randomize(net)
    path = tmp_path / "a.safetensors"
    net.save_weights(str(path), torch.float32, None)
    unet, vae, te = components()
    net2, weights = lyco.create_network_from_weights(1.0, str(path), vae, te, unet)
    net2.apply_to(te, unet)
    info = net2.load_state_dict(weights)
    assert not info.missing_keys and not info.unexpected_keys
    assert [type(m) for m in net2.all_loras()] == [type(m) for m in net.all_loras()]
    for a, b in zip(net.all_loras(), net2.all_loras()):
        torch.testing.assert_close(a.delta_weight(), b.delta_weight(), rtol=0, atol=0)
    # merge_to: the layers' weights change by exactly what the patched forward computes
    unet3, vae3, te3 = components()
    net3, w3 = lyco.create_network_from_weights(1.0, str(path), vae3, te3, unet3)
    net3.merge_to(te3, unet3, w3)
    by_name = {m.lora_name: m for m in net2.all_loras()}
    for m in net3.all_loras():
        merged = m.org_module.weight
        want = by_name[m.lora_name].org_module.weight + by_name[m.lora_name].delta_weight()
        assert rel(merged, want) < 1e-6, m.lora_name


def test_fresh_network_is_a_no_op_and_trains():
    for name in ("loha", "lokr", "dora", "lokr_both"):
        net = build(ALGOS[name])
        for m in net.all_loras():
            assert float(m.delta_weight().abs().max()) < 1e-5, (name, m.lora_name)
        params = net.prepare_optimizer_params(None, None, 1e-3)
        trainable = [p for g in params for p in g["params"]]
        assert len(trainable) == len(list(net.parameters()))
        unet, te = net.models
        x = torch.randn(1, 4, 16, 16)
        h = torch.randn(1, 8, 32)
        loss = unet(x, 10, encoder_hidden_states=h).sample.square().mean()
        loss.backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable), name


# --- names, keys, metadata -------------------------------------------------------------------

def test_keys_shapes_and_text_encoder_names(tmp_path):
    expected = {"loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
                "lokr": {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"},
                "dora": {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"}}
    for name, keys in expected.items():
        net = build(ALGOS[name])
        path = tmp_path / f"{name}.safetensors"
        net.save_weights(str(path), torch.float16, None)
        modules = lyc.group_modules(load_file(path))
        te = [n for n in modules if n.startswith("lora_te")]
        assert te and all(n.startswith("lora_te_text_model_encoder_layers_") for n in te)
        if name == "lokr":  # each factor full or low-rank, by the layer's size
            assert all(len(set(t) & {"lokr_w1", "lokr_w1_a"}) == 1 and len(set(t) & {"lokr_w2", "lokr_w2_a"}) == 1
                       and "alpha" in t for t in modules.values())
        else:
            assert all(set(t) == keys for t in modules.values()), name
        q = modules["lora_te_text_model_encoder_layers_0_self_attn_q_proj"]
        conv = modules["lora_unet_down_blocks_0_resnets_0_conv1"]  # 32 -> 32, 3x3
        if name == "loha":
            assert q["hada_w1_a"].shape == (32, 4) and q["hada_w1_b"].shape == (4, 32)
            assert conv["hada_w1_b"].shape == (4, 32 * 9)
        elif name == "lokr":  # factor 4: 32 = 4 * 8; w2 [8, 8] is low-rank only when 4 < 8/2: full
            assert set(q) == {"lokr_w1", "lokr_w2", "alpha"} and q["lokr_w1"].shape == (4, 4)
            assert q["lokr_w2"].shape == (8, 8) and conv["lokr_w2"].shape == (8, 8, 3, 3)
        else:
            assert q["dora_scale"].shape == (1, 32) and conv["dora_scale"].shape == (1, 32, 1, 1)
        assert all(t["alpha"].dtype == torch.float16 for t in modules.values())


def test_lokr_layouts():
    shapes = lyco.lokr_shapes("x", (320, 320), 8, factor=8)
    assert shapes == {"lokr_w1": (8, 8), "lokr_w2_a": (40, 8), "lokr_w2_b": (8, 40)}
    shapes = lyco.lokr_shapes("x", (320, 320, 3, 3), 100000, factor=8)
    assert shapes == {"lokr_w1": (8, 8), "lokr_w2": (40, 40, 3, 3)}
    shapes = lyco.lokr_shapes("x", (1280, 320), 4, factor=-1, decompose_both=True)
    assert shapes == {"lokr_w1_a": (32, 4), "lokr_w1_b": (4, 16), "lokr_w2_a": (40, 4), "lokr_w2_b": (4, 20)}
    with pytest.raises(UserError, match="factor=7 does not divide the size 320 of the layer x"):
        lyco.lokr_shapes("x", (320, 320), 4, factor=7)


def test_bad_arguments_are_refused_by_name():
    unet, vae, te = components()
    cases = [({"algo": "ia3"}, "algo=ia3 is not supported"), ({"algo": "lohaa"}, "not an algorithm"),
             ({"algo": "loha", "use_tucker": "True"}, "use_tucker=True is not supported"),
             ({"algo": "loha", "train_norm": "True"}, "train_norm=True"),
             ({"algo": "dora", "wd_on_out": "True"}, "wd_on_out=True"),
             ({"algo": "lokr", "factor": "7"}, "factor=7 does not divide"),
             ({"algo": "dora", "rank_dropout": "0.1"}, "do not apply to DoRA"),
             ({"preset": "full-lin"}, "preset='full-lin'")]
    for kwargs, message in cases:
        with pytest.raises(UserError, match=message):
            lyco.create_network(1.0, 4, 1, vae, te, unet, **kwargs)
    net = lyco.create_network(1.0, 4, 1, vae, te, unet, algo="loha", loraplus_lr_ratio="4")
    with pytest.raises(UserError, match="LoRA\\+"):
        net.prepare_optimizer_params(None, None, 1e-4)


def test_unknown_lycoris_keys_name_the_module_and_the_fix(tmp_path):
    from safetensors.torch import save_file

    unet, vae, te = components()
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    sd = {f"{name}.hada_w1_a": torch.zeros(32, 4), f"{name}.hada_w1_b": torch.zeros(4, 32),
          f"{name}.hada_w2_a": torch.zeros(32, 4), f"{name}.hada_w2_b": torch.zeros(4, 32),
          f"{name}.hada_t1": torch.zeros(4, 4, 3, 3)}
    save_file(sd, tmp_path / "t.safetensors")
    with pytest.raises(UserError, match=f"{name} holds tensors .*hada_t1 .*use_tucker") as err:
        lyco.create_network_from_weights(1.0, str(tmp_path / "t.safetensors"), vae, te, unet)
    assert "without use_tucker" in err.value.fix


def test_lycoris_kohya_resolves_to_ours_with_one_notice(capsys, monkeypatch):
    from library.lora.network_module import import_network_module

    monkeypatch.setattr(lyco, "_notified", set())
    first = import_network_module("lycoris.kohya")
    second = import_network_module("lycoris.kohya")
    assert first is lyco and second is lyco
    assert capsys.readouterr().err.count("lycoris-lora package is not used") == 1
    assert import_network_module("networks.lycoris") is lyco


# --- training through train_network.py -------------------------------------------------------

def test_kohya_ss_lycoris_command_trains_continues_and_verifies(tiny_model, tmp_path):
    """kohya_ss's LoHa command (lycoris.kohya, LyCORIS network_args) unchanged; the file is checked,
    its metadata names the module and args as kohya writes them, and --network_weights continues it."""
    import subprocess
    import sys
    from pathlib import Path

    from library.lora_tools.verify import verify_lora_file
    from tests.helpers import write_image_folder

    repo = Path(__file__).resolve().parents[1]
    write_image_folder(tmp_path / "data", "4_sks disk", count=2)

    def train(out, *extra):
        cmd = [sys.executable, str(repo / "train_network.py"),
               f"--pretrained_model_name_or_path={tiny_model.single_file}", f"--train_data_dir={tmp_path / 'data'}",
               f"--output_dir={out}", "--resolution=64", "--network_module=lycoris.kohya", "--network_dim=4",
               "--network_alpha=2", "--network_args", "algo=loha", "conv_dim=4", "conv_alpha=2",
               "--train_batch_size=1", "--max_train_steps=2", "--learning_rate=1e-3", "--seed=7",
               "--caption_extension=.txt", "--save_model_as=safetensors", *extra]
        env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout + proc.stderr

    log = train(tmp_path / "a")
    assert log.count("lycoris-lora package is not used") == 1
    path = tmp_path / "a" / "last.safetensors"
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert json.loads(meta["ss_network_args"]) == {"algo": "loha", "conv_dim": "4", "conv_alpha": "2"}
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    modules = lyc.group_modules(load_file(path))
    assert all(set(t) == {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"} for t in modules.values())
    assert any(n.startswith("lora_unet_down_blocks_0_resnets_0_conv1") for n in modules)
    assert any(n.startswith("lora_te_text_model_encoder_layers_") for n in modules)
    report = verify_lora_file(path)
    assert report.ok, report.format()

    # same seed, so without loading, run b would start where run a started (2 Adam steps of 1e-3 away)
    log = train(tmp_path / "b", f"--network_weights={path}", "--learning_rate=1e-7", "--max_train_steps=1")
    assert "loaded network weights" in log, log[-2000:]
    before, after = load_file(path), load_file(tmp_path / "b" / "last.safetensors")
    assert before.keys() == after.keys()
    assert max(float((before[k] - after[k]).abs().max()) for k in before) < 1e-5


# --- tools -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def adapter_files(tmp_path_factory):
    """One file per algorithm for the tiny model (seed 0), with non-zero updates."""
    root = tmp_path_factory.mktemp("adapters")
    files = {}
    for i, name in enumerate(("loha", "lokr", "dora")):
        net = build(ALGOS[name])
        randomize(net, seed=10 + i)
        with torch.no_grad():  # smaller updates: merged models stay close to the base
            for key, p in net.named_parameters():
                if not key.endswith("dora_scale"):
                    p.mul_(0.5)
        files[name] = root / f"{name}.safetensors"
        net.save_weights(str(files[name]), torch.float32, {"ss_network_module": "networks.lycoris"})
    return files


def module_deltas(path, ratio=1.0):
    """name -> ratio * delta from the file's tensors on the tiny model's base weights (lycoris_format)."""
    unet, _, te = components()
    layers = {"lora_unet_" + p.replace(".", "_"): m for p, m in unet.named_modules()}
    layers.update({"lora_te_text_model_" + p.replace(".", "_"): m for p, m in te.named_modules()})
    return {n: ratio * lyc.module_delta(n, t, layers[n].weight.detach()) for n, t in
            lyc.group_modules(load_file(path)).items()}


def test_merge_any_mix_into_a_checkpoint(tiny_model, adapter_files, tmp_path):
    from library.models.loading import load_sd_model
    from networks import merge_lora

    out = tmp_path / "merged.safetensors"
    merge_lora.main(["--sd_model", str(tiny_model.single_file), "--models", str(adapter_files["loha"]),
                     str(adapter_files["lokr"]), "--ratios", "0.7", "-0.5", "--save_to", str(out)])
    merged = load_sd_model(out)
    base_unet, _, base_te = components()
    want = module_deltas(adapter_files["loha"], 0.7)
    for name, d in module_deltas(adapter_files["lokr"], -0.5).items():
        want[name] = want[name] + d
    got = {}
    for prefix, root, base in (("lora_unet_", merged.unet, base_unet), ("lora_te_text_model_", merged.text_encoder,
                                                                         base_te)):
        base_layers = dict(base.named_modules())
        for p, m in root.named_modules():
            if prefix + p.replace(".", "_") in want:
                got[prefix + p.replace(".", "_")] = m.weight.detach() - base_layers[p].weight.detach()
    assert got.keys() == want.keys()
    assert max(rel(got[n], want[n]) for n in want) < 1e-4  # (W + delta) - W in fp32: rounding of W

    out2 = tmp_path / "dora.safetensors"  # DoRA: the change depends on the base weights, which the merge has
    merge_lora.main(["--sd_model", str(tiny_model.single_file), "--models", str(adapter_files["dora"]),
                     "--save_to", str(out2)])
    merged = load_sd_model(out2)
    want = module_deltas(adapter_files["dora"])
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    w = merged.unet.down_blocks[0].resnets[0].conv1.weight.detach() - base_unet.down_blocks[0].resnets[0].conv1.weight
    assert rel(w, want[name]) < 1e-4


def test_one_lora_from_any_mix_by_svd_with_the_error_reported(adapter_files, tmp_path, capsys):
    from networks import merge_lora, svd_merge_lora

    with pytest.raises(UserError, match="svd_merge_lora.py --new_rank"):
        merge_lora.main(["--models", str(adapter_files["loha"]), "--save_to", str(tmp_path / "x.safetensors")])
    with pytest.raises(UserError, match="DoRA"):
        svd_merge_lora.main(["--models", str(adapter_files["dora"]), "--save_to", str(tmp_path / "x.safetensors")])
    out = tmp_path / "one.safetensors"
    svd_merge_lora.main(["--models", str(adapter_files["loha"]), str(adapter_files["lokr"]), "--ratios", "1", "0.5",
                         "--new_rank", "3", "--new_conv_rank", "2", "--save_to", str(out)])
    printed = capsys.readouterr().out
    sd = load_file(out)
    assert all(k.endswith(("lora_down.weight", "lora_up.weight", "alpha")) for k in sd)
    want = module_deltas(adapter_files["loha"])
    for n, d in module_deltas(adapter_files["lokr"], 0.5).items():
        want[n] = want[n] + d
    got = {n: lyc.module_delta(n, t, want[n]) for n, t in lyc.group_modules(sd).items()}
    error = sum(float((got[n] - want[n]).square().sum()) for n in want) ** 0.5
    reported = float(printed.split("total error ")[1].split()[0])
    assert abs(reported - error) / error < 1e-3, (reported, error)


def test_resize_converts_loha_lokr_to_lora_and_keeps_dora(adapter_files, tmp_path, capsys):
    from networks import check_lora_weights, resize_lora

    for name in ("loha", "lokr"):
        out = tmp_path / f"{name}_r.safetensors"
        resize_lora.main(["--model", str(adapter_files[name]), "--new_rank", "4", "--save_to", str(out)])
        printed = capsys.readouterr().out
        assert f"{name} -> LoRA rank 4, retained Frobenius norm" in printed
        sd = load_file(out)
        assert all(k.endswith(("lora_down.weight", "lora_up.weight", "alpha")) for k in sd)
        want = module_deltas(adapter_files[name])
        got = module_deltas(out)
        error = sum(float((got[n] - want[n]).square().sum()) for n in want) ** 0.5
        assert abs(float(printed.split("total error ")[1].split()[0]) - error) / error < 1e-3
        assert check_lora_weights.main(["--verify", str(out)]) == 0
    out = tmp_path / "dora_r.safetensors"
    resize_lora.main(["--model", str(adapter_files["dora"]), "--new_rank", "2", "--save_to", str(out)])
    modules = lyc.group_modules(load_file(out))
    source = lyc.group_modules(load_file(adapter_files["dora"]))
    assert all(t["lora_down.weight"].shape[0] == 2 and torch.equal(t["dora_scale"], source[n]["dora_scale"])
               for n, t in modules.items())
    with safe_open(str(out), "pt") as fh:
        assert json.loads(fh.metadata()["ss_network_args"])["dora_wd"] == "True"


def test_check_shows_and_verifies_every_algorithm(adapter_files, capsys):
    from networks import check_lora_weights

    assert check_lora_weights.main(["--verify", *map(str, adapter_files.values())]) == 0
    from library.lora_tools.verify import check_saved_lora  # the trainer's check, with the model's sizes

    unet, _, te = components()
    assert all(check_saved_lora(path, unet, te).ok for path in adapter_files.values())
    assert check_lora_weights.main([str(adapter_files["loha"]), str(adapter_files["lokr"])]) == 0
    printed = capsys.readouterr().out
    assert "loha 4" in printed and "lokr " in printed
    assert "?" not in "".join(line.split()[-1] for line in printed.splitlines() if line.startswith("lora_"))


def test_verify_flags_bad_lycoris_modules(adapter_files, tmp_path):
    from safetensors.torch import save_file

    from library.lora_tools.model_fit import target_layers
    from library.lora_tools.verify import verify_lora_file

    sd = load_file(adapter_files["dora"])
    name = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    sd[f"{name}.dora_scale"] = sd[f"{name}.dora_scale"].reshape(32, 1).contiguous()  # output axis
    save_file(sd, tmp_path / "d.safetensors")
    unet, _, te = components()
    report = verify_lora_file(tmp_path / "d.safetensors", target_layers(unet, te), check_sizes=True)
    assert not report.ok and "dora_scale not per input channel" in report.format()
    sd = load_file(adapter_files["loha"])
    sd[f"{name}.hada_w2_b"] = sd[f"{name}.hada_w2_b"][:, :16].contiguous()
    save_file(sd, tmp_path / "h.safetensors")
    report = verify_lora_file(tmp_path / "h.safetensors", target_layers(unet, te), check_sizes=True)
    assert not report.ok and "do not multiply" in report.format()


def test_gen_img_style_loading_applies_any_algorithm(adapter_files):
    """networks.lora's create_network_from_weights (gen_img's default module, --base_weights) takes any file."""
    from networks import lora

    for name, path in adapter_files.items():
        unet, vae, te = components()
        net, weights = lora.create_network_from_weights(0.8, str(path), vae, te, unet)
        assert isinstance(net, lyco.LycorisNetwork)
        net.apply_to(te, unet)
        assert not net.load_state_dict(weights).missing_keys
        for part in (unet, te, net):  # float64: compare the rule, not fp32 rounding of out + change
            part.double()
        want = {n: d.double() for n, d in module_deltas(path, 0.8).items()}
        for m in net.all_loras():
            layer = m.org_module
            x = layer_input(layer, torch.Generator().manual_seed(0))
            with torch.no_grad():
                change = layer(x) - base_out(layer, x, layer.weight)
                expect = base_out(layer, x, layer.weight + want[m.lora_name]) - base_out(layer, x, layer.weight)
            assert rel(change, expect) < 1e-5, (name, m.lora_name)


def test_gen_img_network_module_lycoris_kohya_matches_the_merged_checkpoint(tiny_model, adapter_files, tmp_path):
    import numpy as np
    from PIL import Image

    import gen_img
    from networks import merge_lora

    def run(ckpt, out, *extra):
        gen_img.main(["--ckpt", str(ckpt), "--outdir", str(out), "--W", "64", "--H", "64", "--prompt", "a cat",
                      "--steps", "2", "--seed", "3", *extra])
        return [np.asarray(Image.open(p).convert("RGB")).astype(np.int16) for p in sorted(out.glob("*.png"))]

    merged = tmp_path / "merged.safetensors"
    # (not DoRA with another adapter on the same layer: WebUI normalises each file's W + delta on its own,
    # ComfyUI and merges in sequence; apart, both agree with us, see the client tests)
    merge_lora.main(["--sd_model", str(tiny_model.single_file), "--models", str(adapter_files["lokr"]),
                     str(adapter_files["loha"]), "--save_to", str(merged)])
    patched = run(tiny_model.single_file, tmp_path / "patched", "--network_module", "lycoris.kohya", "networks.lora",
                  "--network_weights", str(adapter_files["lokr"]), str(adapter_files["loha"]))
    plain = run(tiny_model.single_file, tmp_path / "plain")
    want = run(merged, tmp_path / "merged")
    assert np.abs(patched[0] - plain[0]).max() > 10  # the adapters change the image
    diff = np.abs(patched[0] - want[0])
    print("patched vs merged: max", diff.max(), "mean", diff.mean(), "; vs plain: mean", np.abs(patched[0] - plain[0]).mean())
    assert diff.max() <= 2  # patched at run time == merged into the weights


def test_module_and_rank_dropout_in_training_only():
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 64)
    m = lyco.LoHaModule("lora_unet_x", layer, 1.0, 4, 2, rank_dropout=0.5, module_dropout=None)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    m.apply_to()
    x = torch.randn(3, 16)
    base = F.linear(x, layer.weight, layer.bias)
    full = (x @ m.delta_weight().T)
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x) - base, full, rtol=1e-5, atol=1e-6)  # no dropout at inference
        m.train()
        change = layer(x) - base
    kept = change.abs().sum(0) > 0
    assert 0 < int(kept.sum()) < 64  # whole output rows of the update dropped, ...
    torch.testing.assert_close(change[:, kept], 2 * full[:, kept], rtol=1e-5, atol=1e-6)  # ... the rest x 1/(1-p)
    m.rank_dropout, m.module_dropout = None, 0.999999
    with torch.no_grad():
        torch.testing.assert_close(layer(x), base)
