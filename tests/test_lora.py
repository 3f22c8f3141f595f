"""networks.lora: the kohya file contract, diffusers interop, and the kohya network API.

Contract: docs/lora_format.md. Models are the tiny SD1.5-structured ones.
"""
from __future__ import annotations

import hashlib
import json
import logging
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from library.errors import UserError
from library.models.tiny import build_tiny_components
from networks import lora

TE_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
              "mlp.fc1", "mlp.fc2")


# --- helpers ---------------------------------------------------------------------------------

def components():
    return build_tiny_components(seed=0)


def inputs():
    g = torch.Generator().manual_seed(123)
    return {
        "ids": torch.randint(0, 49406, (2, 8), generator=g),
        "sample": torch.randn(2, 4, 16, 16, generator=g),
        "hidden": torch.randn(2, 8, 32, generator=g),
    }


@torch.no_grad()
def outputs(unet, te, x=None):
    x = x or inputs()
    te_out = te(input_ids=x["ids"]).last_hidden_state
    unet_out = unet(x["sample"], 10, encoder_hidden_states=x["hidden"]).sample
    return unet_out, te_out


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


def randomize(network, std=0.05, seed=1):
    """Non-zero up weights (a fresh LoRA is an exact no-op)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in network.all_loras():
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=g) * std)


def trained_file(tmp_path, conv=False, dim=8, alpha=4, name="lora.safetensors", dtype=torch.float32,
                 metadata=None):
    unet, vae, te = components()
    kwargs = {"conv_dim": "4", "conv_alpha": "2"} if conv else {}
    net = lora.create_network(1.0, dim, alpha, vae, te, unet, **kwargs)
    randomize(net)
    path = tmp_path / name
    net.save_weights(path, dtype, metadata or {"ss_network_dim": str(dim)})
    net.models = (unet, te)  # a plain tuple: not registered as submodules
    return path, net


def merge_by_hand(unet, te, sd):
    """W += alpha/r * up @ down straight from the file's tensors (independent of networks.lora)."""
    layers = {}
    for prefix, root in (("lora_unet_", unet), ("lora_te_text_model_", te)):
        for path, mod in root.named_modules():
            layers[prefix + path.replace(".", "_")] = mod
    names = {k.split(".")[0] for k in sd}
    with torch.no_grad():
        for name in names:
            down, up = sd[name + ".lora_down.weight"].float(), sd[name + ".lora_up.weight"].float()
            scale = float(sd[name + ".alpha"]) / down.shape[0]
            w = layers[name].weight
            if down.dim() == 2:
                delta = up @ down
            else:  # conv: up is [out, r, 1, 1]; down carries the kernel
                delta = torch.einsum("or,rihw->oihw", up[:, :, 0, 0], down)
            w += scale * delta


def expected_names(unet, te, conv=False):
    """The contract's name set, derived from the live diffusers/transformers module paths."""
    unet_names, te_names = set(), set()
    blocks = ("Transformer2DModel",) + (("ResnetBlock2D", "Downsample2D", "Upsample2D") if conv else ())
    for path, mod in unet.named_modules():
        if type(mod).__name__ in blocks:
            for sub, child in mod.named_modules():
                if isinstance(child, (torch.nn.Linear, torch.nn.Conv2d)):
                    unet_names.add("lora_unet_" + f"{path}.{sub}".replace(".", "_"))
    for i in range(len(te.encoder.layers)):
        for lin in TE_LINEARS:
            te_names.add(f"lora_te_text_model_encoder_layers_{i}_" + lin.replace(".", "_"))
    return unet_names, te_names


def tokenizer(tmp_path):
    try:
        from library.models.tokenizer import load_clip_tokenizer

        return load_clip_tokenizer()
    except ImportError:  # built by another part of the project; any CLIPTokenizer will do here
        from transformers import CLIPTokenizer

        (tmp_path / "vocab.json").write_text(json.dumps({"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2}))
        (tmp_path / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))


# --- names, shapes, dtypes -------------------------------------------------------------------

@pytest.mark.parametrize("conv", [False, True], ids=["lora", "locon"])
def test_names_and_shapes_follow_the_contract(tmp_path, conv):
    path, net = trained_file(tmp_path, conv=conv, dim=8, alpha=4)
    unet, _, te = components()
    want_unet, want_te = expected_names(unet, te, conv)
    sd = load_file(path)
    modules = {k.split(".")[0] for k in sd}
    assert len(want_te) == 72 and len(want_unet) == (278 if conv else 192)  # SD1.5's counts
    assert {m for m in modules if m.startswith("lora_unet_")} == want_unet
    assert {m for m in modules if m.startswith("lora_te_")} == want_te
    assert all(m.startswith("lora_te_text_model_encoder_layers_") for m in modules if m.startswith("lora_te"))
    assert len(sd) == 3 * len(modules)

    layers = {"lora_unet_" + p.replace(".", "_"): m for p, m in unet.named_modules()}
    layers.update({"lora_te_text_model_" + p.replace(".", "_"): m for p, m in te.named_modules()})
    for name in modules:
        down, up, alpha = (sd[f"{name}.{s}"] for s in ("lora_down.weight", "lora_up.weight", "alpha"))
        layer = layers[name]
        assert alpha.shape == () and alpha.dtype == torch.float32
        if isinstance(layer, torch.nn.Linear):
            assert (down.shape, up.shape, float(alpha)) == ((8, layer.in_features), (layer.out_features, 8), 4.0)
        else:
            kh, kw = layer.kernel_size
            r, a = (8, 4.0) if (kh, kw) == (1, 1) else (4, 2.0)  # 1x1 convs use network_dim
            assert down.shape == (r, layer.in_channels, kh, kw)
            assert up.shape == (layer.out_channels, r, 1, 1)
            assert float(alpha) == a


def test_module_counts_on_real_sd15_shapes():
    """SD1.5's real widths (built on the meta device, no memory): 192 / 278 U-Net, 72 TE modules."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768)
        te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12))
        plain = lora.create_network(1.0, 4, 1, None, te, unet)
        locon = lora.create_network(1.0, 4, 1, None, te, unet, conv_dim="4")
    assert (len(plain.unet_loras), len(plain.text_encoder_loras)) == (192, 72)
    assert (len(locon.unet_loras), len(locon.text_encoder_loras)) == (278, 72)
    assert {m.lora_name for m in locon.unet_loras} == expected_names(unet, te, conv=True)[0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_save_keeps_alpha_in_that_dtype(tmp_path, dtype):
    path, net = trained_file(tmp_path, dtype=dtype, alpha=3)
    sd = load_file(path)
    assert {v.dtype for v in sd.values()} == {dtype}
    alphas = [v for k, v in sd.items() if k.endswith(".alpha")]
    assert all(a.shape == () and float(a) == 3.0 for a in alphas)
    assert net.unet_loras[0].alpha.dtype == torch.float32  # saving does not change the live network


# --- diffusers loads our files and applies the same change ----------------------------------

class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record.getMessage())


def diffusers_load(path, tmp_path):
    """StableDiffusionPipeline(tiny components).load_lora_weights(path) -> (pipe, warnings said)."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    unet, vae, te = components()
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          num_train_timesteps=1000, steps_offset=1, clip_sample=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tokenizer(tmp_path), unet=unet,
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    # diffusers and transformers log to their own (non-propagating) library loggers; peft warns.
    handler = _Records()
    loggers = [logging.getLogger(n) for n in ("diffusers", "peft", "transformers")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_lora_weights(str(path))
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
    return pipe, handler.records + [str(w.message) for w in caught if not issubclass(w.category, FutureWarning)]


def test_diffusers_reports_keys_it_cannot_use(tmp_path):
    """The no-unused-key check below can see failures: a module for a missing layer is reported."""
    path, _ = trained_file(tmp_path)
    sd = load_file(path)
    for name, down, up in (("lora_unet_down_blocks_9_attentions_0_proj_in", (8, 4, 1, 1), (4, 8, 1, 1)),
                           ("lora_te_text_model_encoder_layers_20_mlp_fc1", (8, 32), (128, 8))):
        sd.update({f"{name}.lora_down.weight": torch.ones(down), f"{name}.lora_up.weight": torch.ones(up),
                   f"{name}.alpha": torch.tensor(4.0)})
    save_file(sd, str(tmp_path / "stray.safetensors"))
    _, messages = diffusers_load(tmp_path / "stray.safetensors", tmp_path)
    said = " ".join(messages)
    assert "down_blocks.9.attentions.0.proj_in" in said and "encoder.layers.20.mlp.fc1" in said


@pytest.mark.parametrize("conv", [False, True], ids=["lora", "locon"])
def test_diffusers_load_lora_weights_consumes_every_key_and_matches(tmp_path, conv):
    from peft.tuners.lora import LoraLayer

    path, _ = trained_file(tmp_path, conv=conv)
    sd = load_file(path)
    x = inputs()

    # (a) our network applied at multiplier 1, loaded from the file
    unet, vae, te = components()
    base = outputs(unet, te, x)
    net, weights = lora.create_network_from_weights(1.0, path, vae, te, unet)
    net.apply_to(te, unet)
    info = net.load_state_dict(weights, strict=False)
    assert not info.missing_keys and not info.unexpected_keys
    ours = outputs(unet, te, x)

    # (b) the plain weight merge computed from the file
    unet_m, _, te_m = components()
    merge_by_hand(unet_m, te_m, sd)
    merged = outputs(unet_m, te_m, x)

    pipe, messages = diffusers_load(path, tmp_path)
    assert not [m for m in messages if "key" in m.lower() or "not" in m.lower()], messages

    # every module in the file became a PEFT LoRA layer holding exactly the file's tensors
    seen = set()
    for prefix, root in (("lora_unet_", pipe.unet), ("lora_te_text_model_", pipe.text_encoder)):
        for mpath, mod in root.named_modules():
            if isinstance(mod, LoraLayer):
                name = prefix + mpath.replace(".", "_")
                adapter = mod.active_adapters[0]
                assert torch.equal(mod.lora_A[adapter].weight, sd[name + ".lora_down.weight"]), name
                assert torch.equal(mod.lora_B[adapter].weight, sd[name + ".lora_up.weight"]), name
                rank = sd[name + ".lora_down.weight"].shape[0]
                assert mod.scaling[adapter] == pytest.approx(float(sd[name + ".alpha"]) / rank), name
                seen.add(name)
    assert seen == {k.split(".")[0] for k in sd}

    theirs = outputs(pipe.unet, pipe.text_encoder, x)
    for got_ours, got_merged, got_theirs, b in zip(ours, merged, theirs, base):
        assert rel_err(got_theirs, b) > 1e-3  # the LoRA does change the output
        assert rel_err(got_ours, got_theirs) < 1e-5
        assert rel_err(got_merged, got_theirs) < 1e-5


# --- the network API -------------------------------------------------------------------------

def test_multiplier_zero_is_exact_base_and_set_multiplier_works(tmp_path):
    path, _ = trained_file(tmp_path, conv=True)
    x = inputs()
    unet, vae, te = components()
    base = outputs(unet, te, x)
    net, weights = lora.create_network_from_weights(0.0, path, vae, te, unet)
    net.apply_to(te, unet)
    net.load_weights(path)
    for got, want in zip(outputs(unet, te, x), base):
        assert torch.equal(got, want)

    net.set_multiplier(0.5)
    half = outputs(unet, te, x)
    unet_m, vae_m, te_m = components()
    net_m, _ = lora.create_network_from_weights(0.5, path, vae_m, te_m, unet_m)
    net_m.merge_to(te_m, unet_m, weights)
    for got, want, b in zip(half, outputs(unet_m, te_m, x), base):
        assert rel_err(got, want) < 1e-5 and rel_err(got, b) > 1e-4

    net.set_multiplier(0.0)
    assert all(torch.equal(g, w) for g, w in zip(outputs(unet, te, x), base))
    net.restore()
    assert all(torch.equal(g, w) for g, w in zip(outputs(unet, te, x), base))


def test_save_load_round_trip_is_identical(tmp_path):
    path, net = trained_file(tmp_path, conv=True)
    x = inputs()
    net.apply_to(*net.models[::-1])
    want = outputs(*net.models, x)

    unet2, vae2, te2 = components()
    net2 = lora.create_network(1.0, 8, 4, vae2, te2, unet2, conv_dim="4", conv_alpha="2")
    net2.apply_to(te2, unet2)
    info = net2.load_weights(path)
    assert not info.missing_keys and not info.unexpected_keys
    sd2 = net2.state_dict()
    for k, v in net.state_dict().items():
        assert torch.equal(v, sd2[k]), k
    for got, w in zip(outputs(unet2, te2, x), want):
        assert torch.equal(got, w)

    net2.save_weights(tmp_path / "again.safetensors", torch.float32, {"ss_network_dim": "8"})
    # same tensor bytes and metadata (the header's key order is safetensors' business)
    first, again = path.read_bytes(), (tmp_path / "again.safetensors").read_bytes()
    n1, n2 = int.from_bytes(first[:8], "little"), int.from_bytes(again[:8], "little")
    assert first[8 + n1:] == again[8 + n2:] and json.loads(first[8:8 + n1]) == json.loads(again[8:8 + n2])


def test_create_network_from_weights_reproduces_ranks_and_alphas(tmp_path, caplog):
    unet, vae, te = components()
    net = lora.create_network(1.0, 8, 4, vae, te, unet, conv_dim="3", conv_alpha="1.5")
    randomize(net)
    with torch.no_grad():  # per-module alphas, as resize/merge tools write them
        net.unet_loras[5].alpha.fill_(7.0)
        net.text_encoder_loras[2].alpha.fill_(0.25)
    path = tmp_path / "mixed.safetensors"
    # written as other tools write them (our save_weights would unify the Linear alphas)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))

    unet2, vae2, te2 = components()
    net2, weights = lora.create_network_from_weights(1.0, path, vae2, te2, unet2)
    got = {m.lora_name: (m.lora_dim, float(m.alpha), m.scale) for m in net2.all_loras()}
    want = {m.lora_name: (m.lora_dim, float(m.alpha), float(m.alpha) / m.lora_dim) for m in net.all_loras()}
    assert got == want
    assert {d for d, _, _ in got.values()} == {8, 3} and net2.unmatched_modules == []

    # a file with only some modules gives a network with only those
    sd = load_file(path)
    te_only = {k: v for k, v in sd.items() if k.startswith("lora_te_")}
    net3, _ = lora.create_network_from_weights(1.0, None, vae2, te2, unet2, weights_sd=te_only)
    assert len(net3.text_encoder_loras) == 72 and net3.unet_loras == []


def test_load_weights_reports_missing_layers_and_accepts_short_te_names_and_2d_convs(tmp_path, caplog):
    path, net = trained_file(tmp_path)
    sd = load_file(path)
    stray = "lora_unet_down_blocks_9_attentions_0_proj_in"
    sd.update({f"{stray}.lora_down.weight": torch.zeros(8, 4, 1, 1),
               f"{stray}.lora_up.weight": torch.zeros(4, 8, 1, 1), f"{stray}.alpha": torch.tensor(4.0)})
    # 2-D tensors on a 1x1 conv, as some tools write them
    proj_in = "lora_unet_down_blocks_0_attentions_0_proj_in"
    for part in ("lora_down.weight", "lora_up.weight"):
        sd[f"{proj_in}.{part}"] = sd[f"{proj_in}.{part}"][:, :, 0, 0]
    # the transformers-5 spelling that a naive writer would produce
    short = {k.replace("lora_te_text_model_encoder_", "lora_te_encoder_"): v for k, v in sd.items()}
    bad = tmp_path / "extra.safetensors"
    save_file(short, str(bad))

    unet, vae, te = components()
    net2 = lora.create_network(1.0, 8, 4, vae, te, unet)
    net2.apply_to(te, unet)
    with caplog.at_level(logging.WARNING, logger="networks.lora"):
        info = net2.load_weights(bad)
    parts = ("alpha", "lora_down.weight", "lora_up.weight")
    assert sorted(info.unexpected_keys) == sorted(f"{stray}.{part}" for part in parts)
    assert not info.missing_keys
    assert stray in caplog.text
    sd2 = net2.state_dict()
    for k, v in net.state_dict().items():
        assert torch.equal(sd2[k], v), k

    net3, _ = lora.create_network_from_weights(1.0, bad, vae, te, unet)
    assert net3.unmatched_modules == [stray] and len(net3.text_encoder_loras) == 72

    unet4, vae4, te4 = components()  # merging the same file gives what net2 applies
    net4, weights4 = lora.create_network_from_weights(1.0, bad, vae4, te4, unet4)
    net4.merge_to(te4, unet4, weights4)
    for got, want in zip(outputs(unet4, te4), outputs(unet, te)):
        assert rel_err(got, want) < 1e-5


def test_load_weights_errors_are_user_errors(tmp_path):
    path, _ = trained_file(tmp_path, dim=8)
    unet, vae, te = components()
    net = lora.create_network(1.0, 4, 1, vae, te, unet)
    net.apply_to(te, unet)
    with pytest.raises(UserError, match="dim_from_weights"):
        net.load_weights(path)
    with pytest.raises(UserError, match="does not exist"):
        net.load_weights(tmp_path / "nope.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00")
    with pytest.raises(UserError, match="cannot read"):
        net.load_weights(tmp_path / "broken.safetensors")


def test_hashes_match_the_written_bytes(tmp_path):
    meta = {"ss_network_dim": "32", "ss_output_name": "x", "user_note": "not part of the legacy hash"}
    path, _ = trained_file(tmp_path, dim=32, alpha=16, metadata=meta)
    raw = path.read_bytes()
    assert len(raw) > 0x110000  # so the legacy hash covers real tensor bytes
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + header_len])["__metadata__"]
    assert header["sshs_model_hash"] == hashlib.sha256(raw[8 + header_len:]).hexdigest()
    assert {k: header[k] for k in meta} == meta
    assert "lora_adapter_metadata" not in header

    # legacy rule (sd-webui-additional-networks): re-serialize with only ss_* metadata, sha256 of
    # the bytes at [1 MiB, 1 MiB + 64 KiB), first 8 hex digits.
    stripped = tmp_path / "stripped.safetensors"
    with safe_open(str(path), "pt") as f:
        save_file({k: f.get_tensor(k) for k in f.keys()}, str(stripped),
                  {k: v for k, v in header.items() if k.startswith("ss_")})
    legacy = hashlib.sha256(stripped.read_bytes()[0x100000:0x110000]).hexdigest()[:8]
    assert header["sshs_legacy_hash"] == legacy
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left nothing behind


@pytest.mark.parametrize("conv", [False, True], ids=["lora", "locon"])
def test_merge_to_equals_applied_network(tmp_path, conv):
    path, _ = trained_file(tmp_path, conv=conv)
    x = inputs()
    unet, vae, te = components()
    net, weights = lora.create_network_from_weights(1.0, path, vae, te, unet)
    net.apply_to(te, unet)
    net.load_weights(path)
    applied = outputs(unet, te, x)

    unet2, vae2, te2 = components()
    net2, weights2 = lora.create_network_from_weights(1.0, path, vae2, te2, unet2)
    assert net2.is_mergeable()
    net2.merge_to(te2, unet2, weights2, torch.float32, "cpu")
    for got, want in zip(outputs(unet2, te2, x), applied):
        assert rel_err(got, want) < 1e-5


def test_max_norm_regularization_caps_norms():
    unet, vae, te = components()
    net = lora.create_network(1.0, 4, 4, vae, te, unet, conv_dim="4", conv_alpha="4")
    randomize(net, std=0.5)
    with torch.no_grad():
        small = net.unet_loras[0]
        small.lora_up.weight.mul_(1e-4)
    with torch.no_grad():
        before = {m.lora_name: float(m.delta_weight().norm()) for m in net.all_loras()}
    small_down = small.lora_down.weight.clone()
    cap = sorted(before.values())[len(before) // 2]  # about half the modules are over the cap

    keys_scaled, mean_norm, max_norm = net.apply_max_norm_regularization(cap, "cpu")
    with torch.no_grad():
        after = {m.lora_name: float(m.delta_weight().norm()) for m in net.all_loras()}
    assert keys_scaled == sum(v > cap for v in before.values()) > 0
    assert max(after.values()) <= cap * (1 + 1e-5) and max_norm == pytest.approx(max(after.values()), rel=1e-5)
    assert mean_norm == pytest.approx(sum(after.values()) / len(after), rel=1e-5)
    for name, v in before.items():
        assert after[name] == pytest.approx(min(v, cap), rel=1e-5)
    assert torch.equal(small.lora_down.weight, small_down)


@pytest.mark.parametrize("layer", [torch.nn.Linear(6, 5), torch.nn.Conv2d(6, 5, 3, padding=1)],
                         ids=["linear", "conv"])
def test_dropouts_only_act_in_training(layer):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 6) if isinstance(layer, torch.nn.Linear) else torch.randn(4, 6, 5, 5)
    plain = lora.LoRAModule("plain", layer, lora_dim=4, alpha=2)
    with torch.no_grad():
        plain.lora_up.weight.normal_()
    configs = {"dropout": dict(dropout=0.5), "rank": dict(rank_dropout=0.5), "module": dict(module_dropout=0.999)}
    for what, kwargs in configs.items():
        mod = lora.LoRAModule("m", layer, lora_dim=4, alpha=2, **kwargs)
        mod.load_state_dict(plain.state_dict())
        mod.apply_to()
        try:
            mod.eval()
            assert torch.equal(mod.org_module(x), _plain_out(plain, layer, x)), what
            mod.train()
            torch.manual_seed(1)
            trained = mod.org_module(x)
            assert not torch.allclose(trained, _plain_out(plain, layer, x)), what
            if what == "module":  # the whole module is skipped: plain layer output
                assert torch.equal(trained, type(layer).forward(layer, x))
        finally:
            mod.restore()
    assert "forward" not in vars(layer)  # restore() left the layer as it was


def _plain_out(plain, layer, x):
    with torch.no_grad():
        return type(layer).forward(layer, x) + plain.lora_up(plain.lora_down(x)) * plain.scale


def test_network_dropout_args_and_train_mode(tmp_path):
    unet, vae, te = components()
    net = lora.create_network(1.0, 4, 2, vae, te, unet, neuron_dropout=0.3, rank_dropout="0.2",
                              module_dropout="0.1")
    mods = net.all_loras()
    assert {(m.dropout, m.rank_dropout, m.module_dropout) for m in mods} == {(0.3, 0.2, 0.1)}
    net.apply_to(te, unet)
    randomize(net)
    x = inputs()
    net.eval()
    a, b = outputs(unet, te, x), outputs(unet, te, x)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    net.on_epoch_start(te, unet)
    assert net.training
    torch.manual_seed(0)
    c = outputs(unet, te, x)
    assert not torch.allclose(c[0], a[0])


def test_apply_flags_optimizer_groups_and_args(tmp_path, caplog):
    unet, vae, te = components()
    base_te = outputs(unet, te)[1]
    net = lora.create_network(1.0, 4, 1, vae, te, unet, loraplus_lr_ratio="16", no_such_option="1")
    assert "no_such_option" in caplog.text  # an unknown key is said, not silently dropped
    net.apply_to(te, unet, apply_text_encoder=False, apply_unet=True)
    randomize(net)
    assert net.text_encoder_loras == [] and not any(k.startswith("lora_te") for k in net.state_dict())
    assert torch.equal(outputs(unet, te)[1], base_te)
    groups = net.prepare_optimizer_params(5e-5, 1e-4, 1e-3)
    summary = [(g["name"], g["lr"], len(g["params"])) for g in groups]
    assert summary == [("unet", 1e-4, 192), ("unet plus", 1.6e-3, 192)]
    net.save_weights(tmp_path / "u.safetensors", None, {})
    assert all(k.startswith("lora_unet_") for k in load_file(tmp_path / "u.safetensors"))

    unet2, vae2, te2 = components()
    net2 = lora.create_network(1.0, 4, 1, vae2, te2, unet2)
    net2.apply_to(te2, unet2)
    groups = net2.prepare_optimizer_params(None, 1e-4, 1e-3)
    summary = [(g["name"], g["lr"], len(g["params"])) for g in groups]
    assert summary == [("textencoder", 1e-3, 144), ("unet", 1e-4, 384)]
    assert [g["name"] for g in net2.prepare_optimizer_params(0, None, 1e-3)] == ["unet"]
    in_groups = sum(p.numel() for g in groups for p in g["params"])
    assert sum(p.numel() for p in net2.get_trainable_params()) == in_groups
    net2.prepare_grad_etc(te2, unet2)
    net2.enable_gradient_checkpointing()
    assert all(p.requires_grad for p in net2.parameters())

    for bad in ({"conv_dim": "abc"}, {"rank_dropout": "1.5"}, {"conv_dim": "2.5"}):
        with pytest.raises(UserError, match="network_args"):
            lora.create_network(1.0, 4, 1, vae2, te2, unet2, **bad)
    with pytest.raises(UserError, match="network_alpha"):
        lora.create_network(1.0, 4, -1, vae2, te2, unet2)
    assert float(lora.create_network(1.0, 4, 0, vae2, te2, unet2).unet_loras[0].alpha) == 4.0  # 0 -> rank


def test_training_step_updates_and_kohya_style_te_loading(tmp_path):
    """A few steps of training change the output; the saved file reloads to the same output."""
    unet, vae, te = components()
    net = lora.create_network(1.0, 4, 4, vae, te, unet, conv_dim="2")
    net.apply_to(te, unet)
    net.prepare_grad_etc(te, unet)
    opt = torch.optim.AdamW(net.prepare_optimizer_params(1e-3, 1e-3, 1e-3), foreach=True)
    x = inputs()
    base = outputs(unet, te, x)
    for _ in range(2):
        hidden = te(input_ids=x["ids"]).last_hidden_state
        loss = unet(x["sample"], 10, encoder_hidden_states=hidden).sample.pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    net.eval()
    after = outputs(unet, te, x)
    assert rel_err(after[0], base[0]) > 1e-4 and rel_err(after[1], base[1]) > 1e-4
    path = tmp_path / "t.safetensors"
    net.save_weights(path, torch.float32, {})
    unet2, vae2, te2 = components()
    net2, w = lora.create_network_from_weights(1.0, path, vae2, te2, unet2)
    net2.apply_to(te2, unet2)
    net2.load_state_dict(w)
    assert all(torch.equal(p, q) for p, q in zip(outputs(unet2, te2, x), after))


# --- train_network's network options: --base_weights, --dim_from_weights, --network_multiplier -----

def _network_args(**overrides):
    from types import SimpleNamespace

    args = dict(base_weights=None, base_weights_multiplier=None, dim_from_weights=False, network_weights=None,
                network_dim=4, network_alpha=1.0, network_dropout=None, network_multiplier=1.0)
    return SimpleNamespace(**{**args, **overrides})


def test_base_weights_are_merged_before_the_new_network_and_multiplier_is_set(tmp_path):
    from library.lora.network_module import build_network

    a, _ = trained_file(tmp_path, name="a.safetensors", dim=8, alpha=4)
    b, _ = trained_file(tmp_path, conv=True, name="b.safetensors", dim=4, alpha=2)
    unet, vae, te = components()
    args = _network_args(base_weights=[str(a), str(b)], base_weights_multiplier=[0.5], network_multiplier=0.75)
    said = []
    net = build_network(args, lora, {"conv_dim": 2}, vae, te, unet, print_fn=said.append)
    assert {m.multiplier for m in net.all_loras()} == {0.75} and len(net.unet_loras) == 278
    assert "multiplier 0.5" in said[0] and "multiplier 1.0" in said[1]

    # the same merge by hand: a at 0.5 (its up weights halved), then b at 1
    unet_m, _, te_m = components()
    sd_a = load_file(a)
    sd_a = {k: v * 0.5 if k.endswith("lora_up.weight") else v for k, v in sd_a.items()}
    merge_by_hand(unet_m, te_m, sd_a)
    merge_by_hand(unet_m, te_m, load_file(b))
    for got, want in ((unet, unet_m), (te, te_m)):
        for (name, p), q in zip(got.named_parameters(), want.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)
    # the new network starts as a no-op on top of the merged model
    for got, want in zip(outputs(unet, te), outputs(unet_m, te_m)):
        assert rel_err(got, want) < 1e-6


def test_dim_from_weights_takes_ranks_and_weights_from_the_file(tiny_model, tmp_path):
    from tests.helpers import run_train_network, write_image_folder

    src, _ = trained_file(tmp_path, conv=True, dim=8, alpha=4)  # the tiny model's structure
    data = tmp_path / "data"
    write_image_folder(data, "1_sks disk", count=1, size=64)
    out = tmp_path / "out"
    run_train_network([f"--pretrained_model_name_or_path={tiny_model.single_file}", f"--train_data_dir={data}",
                       f"--output_dir={out}", "--resolution=64", "--caption_extension=.txt", "--seed=1",
                       "--network_module=networks.lora", "--network_dim=2", f"--network_weights={src}",
                       "--dim_from_weights", "--max_train_steps=1", "--learning_rate=1e-12"])
    before, after = load_file(src), load_file(out / "last.safetensors")
    assert before.keys() == after.keys()
    for key in before:  # same ranks, and the file's weights were loaded (one step at lr 1e-12)
        assert before[key].shape == after[key].shape, key
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=1e-8, msg=key)


def test_network_file_arguments_are_checked_before_loading_the_model(tmp_path):
    import train_network
    from tests.helpers import run_train_network

    parsed = train_network.setup_parser().parse_args(["--base_weights", "a.safetensors", "b.safetensors",
                                                      "--base_weights_multiplier", "0.5", "1"])
    assert parsed.base_weights == ["a.safetensors", "b.safetensors"] and parsed.base_weights_multiplier == [0.5, 1.0]
    lora_file, _ = trained_file(tmp_path)
    (tmp_path / "data").mkdir()
    common = [f"--pretrained_model_name_or_path={tmp_path / 'no-model.safetensors'}",
              f"--train_data_dir={tmp_path / 'data'}", f"--output_dir={tmp_path / 'out'}"]
    cases = [(["--base_weights", str(tmp_path / "missing.safetensors")], "--base_weights file does not exist"),
             (["--base_weights", str(lora_file), "--base_weights_multiplier", "1", "2"], "2 values for 1"),
             (["--dim_from_weights"], "needs --network_weights")]
    for extra, said in cases:
        with pytest.raises(UserError, match=said):
            run_train_network(common + extra)
