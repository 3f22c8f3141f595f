"""kohya's SDXL LoRA names: our map from diffusers modules to kohya's original-layout names, checked
exhaustively against kohya's rules (written out from kohya's SDXL UNet) on the tiny model and on
SDXL's real shapes (meta device), and against diffusers' own reading of kohya SDXL files."""
from __future__ import annotations

import logging
import warnings

import pytest
import torch

from library.models.arch import model_kwargs
from library.models.sdxl import arch
from library.models.sdxl import lora_names
from library.models.sdxl.lora_names import lora_module_name, part_of
from library.models.sdxl.tiny import build_tiny_sdxl
from networks import lora_format as fmt

# kohya's SdxlUNet2DConditionModel (library/sdxl_original_unet.py): the attention blocks and their
# transformer depth, the ResNet blocks, which of them change width (a 1x1 skip_connection), and the
# down/upsamplers.
ATTENTIONS = {"input_blocks.4.1": 2, "input_blocks.5.1": 2, "input_blocks.7.1": 10, "input_blocks.8.1": 10,
              "middle_block.1": 10, **{f"output_blocks.{i}.1": 10 for i in (0, 1, 2)},
              **{f"output_blocks.{i}.1": 2 for i in (3, 4, 5)}}
RESNETS = [f"input_blocks.{i}.0" for i in (1, 2, 4, 5, 7, 8)] + ["middle_block.0", "middle_block.2"] + \
    [f"output_blocks.{i}.0" for i in range(9)]
WIDTH_CHANGES = ["input_blocks.4.0", "input_blocks.7.0"] + [f"output_blocks.{i}.0" for i in range(9)]
SAMPLERS = ["input_blocks.3.0.op", "input_blocks.6.0.op", "output_blocks.2.2.conv", "output_blocks.5.2.conv"]
CLIP_LAYER = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2"]


def kohya_unet_modules(conv: bool = False) -> list[str]:
    """kohya's rule: Linear / 1x1 conv inside Transformer2DModel (+ every conv/Linear of the ResNet
    and sampler blocks with conv_dim), named by their path in the original UNet."""
    paths = []
    for block, depth in ATTENTIONS.items():
        paths += [f"{block}.proj_in", f"{block}.proj_out"]
        for t in range(depth):
            for attn in ("attn1", "attn2"):
                paths += [f"{block}.transformer_blocks.{t}.{attn}.{p}" for p in ("to_q", "to_k", "to_v", "to_out.0")]
            paths += [f"{block}.transformer_blocks.{t}.ff.net.0.proj", f"{block}.transformer_blocks.{t}.ff.net.2"]
    if conv:
        for block in RESNETS:
            paths += [f"{block}.in_layers.2", f"{block}.emb_layers.1", f"{block}.out_layers.3"]
        paths += [f"{block}.skip_connection" for block in WIDTH_CHANGES] + SAMPLERS
    return paths


def kohya_names(conv: bool = False, te1_layers: int = 12, te2_layers: int = 32) -> dict[str, set]:
    def flat(prefix, path):
        return f"{prefix}_{path}".replace(".", "_")

    def te(prefix, layers):
        return {flat(prefix, f"text_model.encoder.layers.{i}.{m}") for i in range(layers) for m in CLIP_LAYER}

    return {"unet": {flat("lora_unet", p) for p in kohya_unet_modules(conv)},
            "te1": te("lora_te1", te1_layers), "te2": te("lora_te2", te2_layers)}


def sdxl_lora_names(unet, te1, te2, conv: bool = False) -> dict[str, dict[str, str]]:
    """Per part: {module path: name} for every layer networks.lora targets, named by lora_module_name."""
    unet_classes = fmt.UNET_TARGETS + (fmt.UNET_CONV_TARGETS if conv else ())
    parts = (("unet", "lora_unet", unet, unet_classes), ("te1", "lora_te1", te1, fmt.TE_TARGETS),
             ("te2", "lora_te2", te2, fmt.TE_TARGETS))
    return {part: {path: lora_module_name(prefix, path) for path, _ in fmt.iter_targets(root, classes)}
            for part, prefix, root, classes in parts}


def test_target_classes_are_networks_lora_s():
    assert (lora_names.UNET_TARGETS, lora_names.UNET_CONV_TARGETS, lora_names.TE_TARGETS) == \
        (fmt.UNET_TARGETS, fmt.UNET_CONV_TARGETS, fmt.TE_TARGETS)
    with pytest.raises(ValueError):
        lora_module_name("lora_te", "encoder.layers.0.mlp.fc1")  # SD1's prefix is not SDXL's


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_sdxl(0)


@pytest.fixture(scope="module")
def full_size():
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with init_empty_weights():
        return (UNet2DConditionModel(**model_kwargs(arch.shipped_config("unet"))),
                CLIPTextModel(CLIPTextConfig(**arch.shipped_config("text_encoder"))),
                CLIPTextModelWithProjection(CLIPTextConfig(**arch.shipped_config("text_encoder_2"))))


@pytest.mark.parametrize("conv", [False, True], ids=["lora", "locon"])
def test_names_are_kohyas_on_the_tiny_and_the_full_size_model(tiny, full_size, conv):
    expected = kohya_names(conv)
    for unet, te1, te2 in ((tiny.unet, tiny.text_encoder, tiny.text_encoder_2), full_size):
        names = sdxl_lora_names(unet, te1, te2, conv=conv)
        for part in ("unet", "te1", "te2"):
            assert set(names[part].values()) == expected[part], part
            assert len(set(names[part].values())) == len(names[part])  # one name per module, no clash
            assert all(part_of(n) == part for n in names[part].values())


def test_key_counts_at_sdxl_shape_rank_32(full_size):
    """The tensors of a rank-32 LoRA file at SDXL's shapes, per part, against kohya's rules.

    kohya: 722 UNet modules (70 transformer blocks x 10 Linear + 11 x proj_in/proj_out), 12 x 6
    in ViT-L, 32 x 6 in bigG; LoCon adds 17 ResNets x 3 + 11 skip convs + 4 samplers = 66.
    """
    unet, te1, te2 = full_size
    kohya = {conv: {part: 3 * len(names) for part, names in kohya_names(conv).items()} for conv in (False, True)}
    for conv in (False, True):
        ours = sdxl_lora_names(unet, te1, te2, conv=conv)
        keys = {part: 3 * len(names) for part, names in ours.items()}  # lora_down, lora_up, alpha
        assert keys == kohya[conv]
    assert kohya[False] == {"unet": 3 * 722, "te1": 3 * 72, "te2": 3 * 192}
    assert kohya[True]["unet"] == 3 * 788


CHANNELS = {"input_blocks.4": 640, "input_blocks.5": 640, "input_blocks.7": 1280, "input_blocks.8": 1280,
            "middle_block": 1280, **{f"output_blocks.{i}": 1280 for i in (0, 1, 2)},
            **{f"output_blocks.{i}": 640 for i in (3, 4, 5)}}


def kohya_shape(name: str) -> tuple[int, int]:
    """(in, out) of a kohya SDXL LoRA module's layer, from SDXL's widths (LoRA, no LoCon)."""
    if name.startswith(("lora_te1_", "lora_te2_")):
        width, mlp = (768, 3072) if name.startswith("lora_te1_") else (1280, 5120)
        return (width, mlp) if name.endswith("fc1") else (mlp, width) if name.endswith("fc2") else (width, width)
    block = next(b for b in CHANNELS if name.startswith("lora_unet_" + b.replace(".", "_") + "_"))
    c = CHANNELS[block]
    if "attn2_to_k" in name or "attn2_to_v" in name:
        return 2048, c  # cross-attention reads the 768 + 1280 text states
    if name.endswith("ff_net_0_proj"):
        return c, 8 * c  # GEGLU: two halves of 4c
    if name.endswith("ff_net_2"):
        return 4 * c, c
    return c, c


def test_modules_have_kohyas_shapes_at_sdxl_size(full_size):
    unet, te1, te2 = full_size
    names = sdxl_lora_names(unet, te1, te2)
    checked = 0
    for root, part in ((unet, "unet"), (te1, "te1"), (te2, "te2")):
        for path, name in names[part].items():
            layer = root.get_submodule(path)
            assert (layer.in_features, layer.out_features) == kohya_shape(name), name
            checked += 1
    assert checked == 722 + 72 + 192


def test_unet_names_point_at_the_same_weights_in_the_original_layout(tiny):
    """Each kohya name is the layer's path in SDXL's original layout, as mapped from the model's own
    keys: the checkpoint tensor at that path (in the file diffusers' from_single_file reads as we do,
    test_sdxl_models) is the layer's weight."""
    from library.models import convert as base_convert
    from library.models.sdxl.saving import checkpoint_state_dict

    original = checkpoint_state_dict(tiny.unet, tiny.vae, tiny.text_encoder, tiny.text_encoder_2)
    names = sdxl_lora_names(tiny.unet, tiny.text_encoder, tiny.text_encoder_2, conv=True)["unet"]
    paths = base_convert.unet_module_paths_to_ldm(names, tiny.unet.state_dict().keys())
    for path, name in names.items():
        assert name == "lora_unet_" + paths[path].replace(".", "_")
        weight = original["model.diffusion_model." + paths[path] + ".weight"]
        assert torch.equal(weight, tiny.unet.get_submodule(path).weight), path


def test_text_encoder_names_keep_the_text_model_level(tiny):
    names = sdxl_lora_names(tiny.unet, tiny.text_encoder, tiny.text_encoder_2)
    assert names["te1"]["encoder.layers.0.self_attn.q_proj"] == "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    assert names["te2"]["text_model.encoder.layers.31.mlp.fc2"] == "lora_te2_text_model_encoder_layers_31_mlp_fc2"
    assert not any("text_projection" in n for n in names["te2"].values())  # not inside CLIPAttention / CLIPMLP


def kohya_file(tiny, conv: bool, rank: int = 4, alpha: float = 2.0) -> dict:
    """A LoRA state dict named as kohya's sdxl_train_network.py writes it, random nonzero tensors."""
    gen = torch.Generator().manual_seed(1)
    sd = {}
    roots = {"unet": tiny.unet, "te1": tiny.text_encoder, "te2": tiny.text_encoder_2}
    for part, names in sdxl_lora_names(tiny.unet, tiny.text_encoder, tiny.text_encoder_2, conv=conv).items():
        for path, name in names.items():
            layer = roots[part].get_submodule(path)
            if isinstance(layer, torch.nn.Linear):
                down, up = (rank, layer.in_features), (layer.out_features, rank)
            else:
                down, up = (rank, layer.in_channels, *layer.kernel_size), (layer.out_channels, rank, 1, 1)
            sd[f"{name}.lora_down.weight"] = torch.randn(down, generator=gen) * 0.1
            sd[f"{name}.lora_up.weight"] = torch.randn(up, generator=gen) * 0.1
            sd[f"{name}.alpha"] = torch.tensor(alpha)
    return sd


@pytest.mark.parametrize("conv", [False, True], ids=["lora", "locon"])
def test_diffusers_reads_kohya_sdxl_names_as_our_modules(conv):
    """diffusers' StableDiffusionXLPipeline.load_lora_weights (its own kohya-SDXL key conversion)
    puts every module of a kohya-named file on the layer our map names, with the file's tensors."""
    from diffusers import StableDiffusionXLPipeline
    from peft.tuners.lora import LoraLayer

    from library.models.loading import make_noise_scheduler
    from library.models.sdxl.loading import load_sdxl_tokenizers

    tiny = build_tiny_sdxl(0)
    sd = kohya_file(tiny, conv)
    names = sdxl_lora_names(tiny.unet, tiny.text_encoder, tiny.text_encoder_2, conv=conv)
    tok1, tok2 = load_sdxl_tokenizers()
    pipe = StableDiffusionXLPipeline(vae=tiny.vae, text_encoder=tiny.text_encoder, text_encoder_2=tiny.text_encoder_2,
                                     tokenizer=tok1, tokenizer_2=tok2, unet=tiny.unet, scheduler=make_noise_scheduler())
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    loggers = [logging.getLogger(n) for n in ("diffusers", "peft", "transformers")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_lora_weights(dict(sd))
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
    said = records + [str(w.message) for w in caught if not issubclass(w.category, FutureWarning)]
    assert not [m for m in said if "key" in m.lower() or "not " in m.lower()], said
    found = 0
    for part, root in (("unet", pipe.unet), ("te1", pipe.text_encoder), ("te2", pipe.text_encoder_2)):
        for path, module in root.named_modules():
            if not isinstance(module, LoraLayer):
                continue
            name = names[part][path]  # a KeyError: diffusers patched a layer our map does not name
            adapter = module.active_adapters[0]
            assert torch.equal(module.lora_A[adapter].weight, sd[name + ".lora_down.weight"]), name
            assert torch.equal(module.lora_B[adapter].weight, sd[name + ".lora_up.weight"]), name
            assert module.scaling[adapter] == pytest.approx(2.0 / 4), name
            found += 1
    assert found == sum(len(n) for n in names.values())  # every module of the file was used


def test_block_indices_are_kohyas_sdxl_blocks(full_size):
    from library.models.sdxl.lora_names import NUM_BLOCKS, block_index

    unet, te1, te2 = full_size
    names = sdxl_lora_names(unet, te1, te2, conv=True)
    per_block = {}
    for name in names["unet"].values():
        per_block[block_index(name)] = per_block.get(block_index(name), 0) + 1
    # input_blocks 1-2 / 4-5 / 7-8 -> 2-3 / 5-6 / 8-9, downsamplers 3 and 6 -> 4 and 7, middle 10-12,
    # output_blocks 0-8 -> 13-21; nothing is targeted in 0 (embeddings), 1 (conv_in) or 22 (out)
    assert sorted(per_block) == [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12] + list(range(13, 22))
    assert per_block[4] == per_block[7] == 1  # input_blocks.3.0.op, input_blocks.6.0.op
    assert per_block[10] == per_block[12] == 3  # middle ResNets: in_layers, emb_layers, out_layers
    assert per_block[8] == 4 + 2 + 10 * 10  # ResNet with skip_connection + proj_in/out + 10 blocks
    assert block_index("lora_unet_output_blocks_8_0_skip_connection") == 21
    assert block_index("lora_unet_label_emb_0_0") == 0 and block_index("lora_unet_out_2") == NUM_BLOCKS - 1
    assert block_index("lora_te2_text_model_encoder_layers_0_mlp_fc1") is None


def test_sdxl_metadata_values_are_kohyas():
    from library.models.sdxl.metadata import lora_metadata_values

    values = lora_metadata_values()
    assert values["ss_base_model_version"] == "sdxl_base_v1-0" and values["ss_v2"] == "False"
    assert values["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert values["modelspec.resolution"] == "1024x1024" and values["modelspec.prediction_type"] == "epsilon"
    assert lora_metadata_values(True, (896, 1152))["modelspec.resolution"] == "896x1152"
    assert lora_metadata_values(True)["modelspec.prediction_type"] == "v"


# --- networks.lora on SDXL: the file it writes ------------------------------------------------------

def file_parts(keys) -> dict[str, set]:
    out = {"unet": set(), "te1": set(), "te2": set()}
    for key in keys:
        out[part_of(key)].add(key.split(".", 1)[0])
    return out


@pytest.mark.parametrize("conv", [False, True], ids=["lora", "locon"])
def test_networks_lora_rank_32_at_sdxl_shape_has_kohyas_keys(full_size, conv):
    """`networks.lora` built on full-size SDXL (meta device, no memory): every key kohya's
    sdxl_train_network.py writes for --network_dim 32 (--network_args conv_dim=32), and no other."""
    from accelerate import init_empty_weights

    from networks import lora

    unet, te1, te2 = full_size
    kwargs = {"conv_dim": "32", "conv_alpha": "16"} if conv else {}
    with init_empty_weights():
        network = lora.create_network(1.0, 32, 16, None, [te1, te2], unet, **kwargs)
    keys = [k for k in network.state_dict() if k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))]
    parts = file_parts(keys)
    assert parts == kohya_names(conv)
    counts = {part: 3 * len(names) for part, names in parts.items()}
    assert counts == {"unet": 3 * (788 if conv else 722), "te1": 216, "te2": 576}
    shapes = network.state_dict()
    assert shapes["lora_unet_input_blocks_7_1_transformer_blocks_9_attn2_to_k.lora_down.weight"].shape == (32, 2048)
    assert shapes["lora_te2_text_model_encoder_layers_31_mlp_fc1.lora_up.weight"].shape == (5120, 32)


def test_networks_lora_file_on_tiny_sdxl_loads_in_diffusers_with_equal_outputs(tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    from library.models.loading import make_noise_scheduler
    from library.models.sdxl.conditioning import encode_prompts, size_ids
    from library.models.sdxl.loading import load_sdxl_tokenizers
    from networks import lora

    ours = build_tiny_sdxl(0)
    encoders = (ours.text_encoder, ours.text_encoder_2)
    network = lora.create_network(1.0, 4, 2, ours.vae, list(encoders), ours.unet, conv_dim="4", conv_alpha="2")
    torch.manual_seed(3)
    with torch.no_grad():
        for module in network.all_loras():
            module.lora_up.weight.normal_(0, 0.2)  # trained-looking: lora_up starts at zero
    network.apply_to(list(encoders), ours.unet)
    path = tmp_path / "sdxl_lora.safetensors"
    network.save_weights(str(path), torch.float32, {"ss_base_model_version": "sdxl_base_v1-0"})
    sd = load_file(str(path))
    assert file_parts(sd) == kohya_names(conv=True, te1_layers=12, te2_layers=32)

    tokenizers = load_sdxl_tokenizers()
    latents, time_ids = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), size_ids(
        [(64, 64)], [(0, 0)], [(64, 64)])

    def outputs(unet, te1, te2):
        with torch.no_grad():
            cond = encode_prompts(tokenizers, (te1, te2), ["a photo of a cat"])
            noise = unet(latents, 500, cond.hidden_states,
                         added_cond_kwargs={"text_embeds": cond.pooled, "time_ids": time_ids}).sample
        return cond.hidden_states, cond.pooled, noise

    network.eval()
    with_network = outputs(ours.unet, *encoders)
    theirs = build_tiny_sdxl(0)
    base = outputs(theirs.unet, theirs.text_encoder, theirs.text_encoder_2)
    pipe = StableDiffusionXLPipeline(vae=theirs.vae, text_encoder=theirs.text_encoder,
                                     text_encoder_2=theirs.text_encoder_2, tokenizer=tokenizers[0],
                                     tokenizer_2=tokenizers[1], unet=theirs.unet, scheduler=make_noise_scheduler())
    pipe.load_lora_weights(str(path))
    with_diffusers = outputs(pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
    for a, b, c in zip(with_network, with_diffusers, base):
        assert not torch.allclose(a, c, atol=1e-3)  # the LoRA changes every output
        assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()

    # and our own loader reads the file back onto the same modules
    fresh = build_tiny_sdxl(0)
    again, weights = lora.create_network_from_weights(1.0, str(path), fresh.vae,
                                                      [fresh.text_encoder, fresh.text_encoder_2], fresh.unet)
    assert again.unmatched_modules == [] and len(again.all_loras()) == len(network.all_loras())
    info = again.load_state_dict(weights, strict=False)
    assert not info.missing_keys and not info.unexpected_keys
