"""Per-block ranks (block_dims ...) and learning rates (down/mid/up_lr_weight) of networks.lora."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from library.errors import UserError
from library.models import convert
from networks import lora
from networks import lora_blocks as blocks
from tests.helpers import run_train_network, write_image_folder
from tests.test_lora import components, diffusers_load, expected_names, inputs, outputs, randomize, rel_err

# 25 distinct-ish values: IN00..IN11, MID, OUT00..OUT11
DIMS = [1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5, 6, 7, 8, 2]
ALPHAS = [0.5 * (1 + i % 3) for i in range(25)]
CONV_DIMS = [(i % 4) for i in range(25)]  # some 0: those blocks' 3x3 convs get no module


def csv(values):
    return ",".join(str(v) for v in values)


def ldm_blocks(unet):
    """diffusers layer path -> block by the original (LDM) numbering, via our own key converter."""
    sd = unet.state_dict()
    out = {}
    for key, ldm in zip(sd, convert.unet_to_ldm(sd)):
        part, number = ldm.removeprefix("model.diffusion_model.").split(".")[:2]
        index = {"input_blocks": int(number) if number.isdigit() else None, "middle_block": 12,
                 "output_blocks": 13 + int(number) if number.isdigit() else None}.get(part)
        out[key.rsplit(".", 1)[0]] = index
    return out


def test_block_index_follows_the_original_unet_numbering():
    unet, vae, te = components()
    net = lora.create_network(1.0, 4, 1, vae, te, unet, conv_dim="4")
    by_ldm = ldm_blocks(unet)
    seen = set()
    for path, _ in net_paths(net, unet):
        name = "lora_unet_" + path.replace(".", "_")
        assert blocks.block_index(name) == by_ldm[path], name
        seen.add(blocks.block_index(name))
    assert seen == set(range(1, 25))  # every block but IN00 (conv_in) holds LoRA modules
    assert blocks.block_index("lora_te_text_model_encoder_layers_0_mlp_fc1") is None
    assert [blocks.block_label(i) for i in (0, 11, 12, 13, 24)] == ["IN00", "IN11", "MID", "OUT00", "OUT11"]


def net_paths(net, unet):
    names = {m.lora_name for m in net.unet_loras}
    return [(p, m) for p, m in unet.named_modules() if "lora_unet_" + p.replace(".", "_") in names]


def test_lr_weight_presets_lists_and_threshold(caplog):
    ramp = [i / 11 for i in range(12)]
    w = blocks.parse_lr_weights({"down_lr_weight": "sine", "up_lr_weight": "cosine+0.5"})
    assert w[:12] == pytest.approx([math.sin(math.pi / 2 * r) for r in ramp])
    assert w[13:] == pytest.approx([math.sin(math.pi / 2 * r) + 0.5 for r in ramp[::-1]])
    assert w[12] == 1.0 and len(w) == 25  # MID not given: 1
    w = blocks.parse_lr_weights({"down_lr_weight": "linear", "up_lr_weight": "reverse_linear", "mid_lr_weight": "2"})
    assert w[:12] == pytest.approx(ramp) and w[13:] == pytest.approx(ramp[::-1]) and w[12] == 2.0
    assert blocks.parse_lr_weights({"up_lr_weight": "zeros+0.25"})[13:] == [0.25] * 12
    # short lists are filled with 1, empty items are 0, weights <= the threshold become 0
    w = blocks.parse_lr_weights({"down_lr_weight": "0.1,,0.3", "block_lr_zero_threshold": "0.2"})
    assert w[:12] == [0.0, 0.0, 0.3] + [1.0] * 9 and "missing 9" in caplog.text
    w = blocks.parse_lr_weights({"down_lr_weight": csv([0.5] * 14)})
    assert w[:12] == [0.5] * 12 and "only the first 12" in caplog.text
    assert blocks.parse_lr_weights({"conv_dim": "4"}) is None
    for bad in ({"down_lr_weight": "wavy"}, {"up_lr_weight": "sine+x"}, {"mid_lr_weight": "-1"},
                {"down_lr_weight": "1", "block_lr_zero_threshold": "abc"}):
        with pytest.raises(UserError, match="network argument"):
            blocks.parse_lr_weights(bad)


def test_block_dims_and_alphas_set_each_modules_rank():
    unet, vae, te = components()
    net = lora.create_network(1.0, 8, 4, vae, te, unet, block_dims=csv(DIMS), block_alphas=csv(ALPHAS),
                              conv_block_dims=csv(CONV_DIMS), conv_block_alphas=csv([3] * 25))
    assert len(net.text_encoder_loras) == 72 and {m.lora_dim for m in net.text_encoder_loras} == {8}
    linear_or_1x1 = conv3x3 = 0
    for path, layer in net_paths(net, unet):
        module = getattr(net, "lora_unet_" + path.replace(".", "_"))
        i = blocks.block_index(module.lora_name)
        if isinstance(layer, torch.nn.Linear) or layer.kernel_size == (1, 1):
            assert (module.lora_dim, float(module.alpha)) == (DIMS[i], ALPHAS[i]), module.lora_name
            linear_or_1x1 += 1
        else:
            assert (module.lora_dim, float(module.alpha)) == (CONV_DIMS[i], 3.0), module.lora_name
            conv3x3 += 1
    # every Linear/1x1 target exists (also time_emb_proj and the 1x1 conv_shortcut of ResNets);
    # 3x3 convs only where conv_block_dims is not 0
    layers = {"lora_unet_" + p.replace(".", "_"): m for p, m in unet.named_modules()}
    all_unet = expected_names(unet, te, conv=True)[0]
    one_by_one = {n for n in all_unet if getattr(layers[n], "kernel_size", (1, 1)) == (1, 1)}
    assert linear_or_1x1 == len(one_by_one) > 192
    assert 0 < conv3x3 < len(all_unet) - len(one_by_one)

    # without conv_block_dims, conv_dim applies to every block; without either, no 3x3 modules
    net2 = lora.create_network(1.0, 8, 4, vae, te, unet, block_dims=csv(DIMS), conv_dim="2", conv_alpha="1")
    convs = [m for m in net2.unet_loras if getattr(m.lora_down, "kernel_size", None) == (3, 3)]
    assert convs and {(m.lora_dim, float(m.alpha)) for m in convs} == {(2, 1.0)}
    net3 = lora.create_network(1.0, 8, 4, vae, te, unet, block_dims=csv(DIMS))
    assert not [m for m in net3.unet_loras if isinstance(m.lora_down, torch.nn.Conv2d)
                and m.lora_down.kernel_size == (3, 3)]
    assert {float(m.alpha) for m in net3.unet_loras} == {4.0}  # block_alphas default: network_alpha


def test_per_block_file_follows_the_contract_and_loads_in_diffusers(tmp_path):
    """Per-block ranks and alphas: names and shapes as the contract says, one alpha for all Linear
    modules (per-block alphas are folded into lora_up), and diffusers applies the same change."""
    from peft.tuners.lora import LoraLayer

    unet, vae, te = components()
    net = lora.create_network(1.0, 8, 4, vae, te, unet, block_dims=csv(DIMS), block_alphas=csv(ALPHAS),
                              conv_block_dims=csv(CONV_DIMS), conv_block_alphas=csv([0.5 + i % 2 for i in range(25)]))
    randomize(net)
    net.apply_to(te, unet)
    x = inputs()
    want = outputs(unet, te, x)
    path = tmp_path / "blocks.safetensors"
    net.save_weights(path, torch.float32, {"ss_network_args": json.dumps({"block_dims": csv(DIMS)})})

    sd = load_file(path)
    modules = {k.split(".")[0] for k in sd}
    names_unet, names_te = expected_names(unet, te, conv=True)
    assert modules <= names_unet | names_te and len(sd) == 3 * len(modules)
    linear_alphas = {float(sd[m + ".alpha"]) for m in modules if sd[m + ".lora_down.weight"].dim() == 2
                     or sd[m + ".lora_down.weight"].shape[2:] == (1, 1)}
    conv_alphas = {float(sd[m + ".alpha"]) for m in modules if sd[m + ".lora_down.weight"].shape[2:] == (3, 3)}
    assert len(linear_alphas) == 1 and conv_alphas == {0.5, 1.5}
    ranks = {sd[m + ".lora_down.weight"].shape[0] for m in modules if m.startswith("lora_unet_")}
    assert ranks == set(DIMS) | (set(CONV_DIMS) - {0})
    for m in modules:
        down, up = sd[m + ".lora_down.weight"], sd[m + ".lora_up.weight"]
        assert up.shape[1] == down.shape[0] and (down.dim() == 2 or up.shape[2:] == (1, 1))

    # our network from the file gives the trained network's outputs ...
    unet2, vae2, te2 = components()
    net2, weights = lora.create_network_from_weights(1.0, path, vae2, te2, unet2)
    net2.apply_to(te2, unet2)
    net2.load_state_dict(weights)
    for got, w in zip(outputs(unet2, te2, x), want):
        assert rel_err(got, w) < 1e-5
    # ... and so does diffusers, consuming every module
    pipe, messages = diffusers_load(path, tmp_path)
    assert not [m for m in messages if "key" in m.lower() or "not" in m.lower()], messages
    assert sum(isinstance(m, LoraLayer) for c in (pipe.unet, pipe.text_encoder) for m in c.modules()) == len(modules)
    for got, w in zip(outputs(pipe.unet, pipe.text_encoder, x), want):
        assert rel_err(got, w) < 1e-5


def test_zero_lr_blocks_get_no_modules_and_groups_carry_block_lrs():
    unet, vae, te = components()
    down = [1.0] * 4 + [0.0] * 4 + [0.5] * 4  # IN04-IN07 off
    net = lora.create_network(1.0, 4, 1, vae, te, unet, conv_dim="2", down_lr_weight=csv(down),
                              mid_lr_weight="0.05", up_lr_weight="zeros+2", block_lr_zero_threshold="0.1",
                              loraplus_unet_lr_ratio="4")
    present = {blocks.block_index(m.lora_name) for m in net.unet_loras}
    assert present == set(range(1, 25)) - {4, 5, 6, 7, 12}  # MID 0.05 <= threshold 0.1: off too
    groups = net.prepare_optimizer_params(1e-4, 1e-3, 1e-2)
    got = {g["name"]: g["lr"] for g in groups}
    assert got["textencoder"] == 1e-4 and "textencoder plus" not in got
    assert got["unet_block1"] == pytest.approx(1e-3) and got["unet_block1 plus"] == pytest.approx(4e-3)
    assert got["unet_block9"] == pytest.approx(5e-4) and got["unet_block20"] == pytest.approx(2e-3)
    assert not [n for n in got if n.startswith(("unet_block4", "unet_block12"))]
    grouped = sum(p.numel() for g in groups for p in g["params"])
    assert grouped == sum(p.numel() for p in net.parameters())
    # names are unique: they become TensorBoard's lr/<name> curves
    assert len(got) == len(groups)


def test_from_weights_takes_block_lr_weights(tmp_path):
    unet, vae, te = components()
    net = lora.create_network(1.0, 4, 1, vae, te, unet)
    net.save_weights(tmp_path / "w.safetensors", None, {})
    net2, _ = lora.create_network_from_weights(1.0, tmp_path / "w.safetensors", vae, te, unet,
                                               up_lr_weight="0,0,0,0,0,0,0,0,0,0,0,1")
    net2.apply_to(te, unet)
    groups = {g["name"]: g["lr"] for g in net2.prepare_optimizer_params(None, None, 1.0)}
    # the file decides which modules exist; blocks with weight 0 are left out of the optimizer
    assert groups["unet_block24"] == 1.0 and groups["unet_block1"] == 1.0 and "unet_block20" not in groups


@pytest.mark.parametrize("kwargs, said", [
    ({"block_dims": csv(DIMS[:24])}, "expected 25 values"),
    ({"block_dims": csv(DIMS[:24] + [1.5])}, "whole numbers"),
    ({"block_alphas": csv([-1] * 25)}, ">= 0"),
    ({"conv_block_dims": "a,b"}, "integers"),
])
def test_bad_block_args_are_user_errors(kwargs, said):
    unet, vae, te = components()
    with pytest.raises(UserError, match=said):
        lora.create_network(1.0, 4, 1, vae, te, unet, **kwargs)


def test_train_network_logs_block_lrs_and_max_norm(tiny_model, tmp_path):
    """A run with per-block options: lr/unet_block* and max_norm/* curves in TensorBoard, the
    options in ss_network_args, ranks per block in the file."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = tmp_path / "data"
    write_image_folder(data, "2_sks disk", count=2, size=64)
    out, logs = tmp_path / "out", tmp_path / "logs"
    args = ["block_dims=" + csv(DIMS), "conv_dim=2", "down_lr_weight=sine", "mid_lr_weight=0", "up_lr_weight=1"]
    run_train_network([f"--pretrained_model_name_or_path={tiny_model.single_file}", f"--train_data_dir={data}",
                       f"--output_dir={out}", f"--logging_dir={logs}", "--log_with=tensorboard", "--resolution=64",
                       "--network_module=networks.lora", "--network_dim=4", "--max_train_steps=2",
                       "--learning_rate=1e-3", "--seed=1", "--caption_extension=.txt", "--scale_weight_norms=0.01",
                       "--network_args", *args])
    events = EventAccumulator(str(next(logs.rglob("events.out.tfevents.*")).parent))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"lr/textencoder", "lr/unet_block1", "lr/unet_block24", "max_norm/keys_scaled",
            "max_norm/max_key_norm", "norm/avg_key_norm"} <= tags
    assert "lr/unet_block12" not in tags and "lr/unet" not in tags  # MID has weight 0: not trained
    assert events.Scalars("max_norm/keys_scaled")[-1].value > 0  # the small cap did scale modules
    assert events.Scalars("max_norm/max_key_norm")[-1].value <= 0.01 * (1 + 1e-4)
    sine_1 = math.sin(math.pi / 2 / 11)
    assert events.Scalars("lr/unet_block1")[0].value == pytest.approx(1e-3 * sine_1, rel=1e-5)

    path = out / "last.safetensors"
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
    assert meta["ss_scale_weight_norms"] == "0.01"
    network_args = json.loads(meta["ss_network_args"])
    assert network_args["down_lr_weight"] == "sine" and network_args["block_dims"] == csv(DIMS)  # as typed
    sd = load_file(path)
    proj_in = "lora_unet_down_blocks_1_attentions_0_proj_in"  # IN04
    assert sd[proj_in + ".lora_down.weight"].shape[0] == DIMS[4]
    assert not [k for k in sd if k.startswith("lora_unet_mid_block_")]
