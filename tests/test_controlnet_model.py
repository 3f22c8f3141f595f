"""The ControlNet's files: the single-file layout WebUI's ControlNet extension, ComfyUI and diffusers
read, the diffusers folder, the training record, and the LoRA's PEFT copy (same change as the kohya file)."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def tiny(tiny_model):
    from library.models.loading import load_sd_model

    return load_sd_model(tiny_model.diffusers_dir)


def _random_controlnet(tiny, seed=0):
    from library.controlnet.model import create_controlnet

    controlnet = create_controlnet(tiny.unet, tiny.vae)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # zero convs start at 0: random weights make the round trip meaningful
        for p in controlnet.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return controlnet


def test_single_file_layout_has_the_keys_loaders_look_for(tiny):
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    from library.controlnet.model import controlnet_to_ldm
    from library.models.arch import UNET_PREFIX
    from library.models.convert import unet_to_ldm

    controlnet = _random_controlnet(tiny)
    state = controlnet.state_dict()
    ldm = controlnet_to_ldm(state)
    # WebUI's extension: hint channels from input_hint_block.0, context dim from input_blocks.5.1...attn2.to_k;
    # ComfyUI: zero_convs.0.0.weight decides the (unprefixed) layout.
    for key in ("input_hint_block.0.weight", "input_hint_block.14.weight", "zero_convs.0.0.weight",
                "zero_convs.11.0.weight", "middle_block_out.0.weight", "time_embed.0.weight",
                "input_blocks.5.1.transformer_blocks.0.attn2.to_k.weight", "middle_block.1.proj_in.weight"):
        assert key in ldm, key
    assert ldm["input_hint_block.0.weight"].shape[1] == 3
    # the encoder part is named exactly like the base UNet's single-file keys
    unet_keys = {k[len(UNET_PREFIX):] for k in unet_to_ldm(tiny.unet.state_dict())}
    encoder = {k for k in unet_keys if k.startswith(("input_blocks.", "middle_block.", "time_embed."))}
    assert encoder <= set(ldm)
    assert not any(k.startswith(("output_blocks.", "out.", "control_model.")) for k in ldm)
    # diffusers' own single-file reader gives back every tensor exactly
    back = convert_controlnet_checkpoint(ldm, dict(controlnet.config))
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_both_formats_load_back_identically_with_the_record(tiny, tmp_path):
    from library.controlnet.model import (load_controlnet, read_record, save_controlnet,
                                          save_controlnet_single_file)

    controlnet = _random_controlnet(tiny, seed=1)
    record = {"conditioning_type": "radar_heatmap", "heatmap_sigma": 8.0}
    folder = save_controlnet(controlnet, tmp_path / "controlnet", record)
    single = save_controlnet_single_file(controlnet, tmp_path / "cn.safetensors", record)
    assert read_record(folder) == record and read_record(single) == record
    from_folder = load_controlnet(tmp_path, tiny.unet, tiny.vae)  # an output folder holding controlnet/
    from_file = load_controlnet(single, tiny.unet, tiny.vae)
    for loaded in (from_folder, from_file):
        mine = loaded.state_dict()
        assert all(torch.equal(mine[k], v) for k, v in controlnet.state_dict().items())
    half = save_controlnet_single_file(controlnet, tmp_path / "half.safetensors", record, torch.float16)
    from safetensors import safe_open

    with safe_open(str(half), "pt") as f:
        assert f.get_tensor("zero_convs.0.0.weight").dtype == torch.float16
        assert f.metadata()["modelspec.architecture"] == "stable-diffusion-v1/controlnet"


def test_a_wrong_base_model_is_a_user_error(tiny, tmp_path):
    from diffusers import UNet2DConditionModel

    from library.controlnet.model import load_controlnet, save_controlnet_single_file
    from library.errors import UserError

    single = save_controlnet_single_file(_random_controlnet(tiny), tmp_path / "cn.safetensors", {})
    other = UNet2DConditionModel(**{**dict(tiny.unet.config), "cross_attention_dim": 64})
    with pytest.raises(UserError, match="does not fit the base model"):
        load_controlnet(single, other, tiny.vae)


def test_peft_copy_applies_the_same_change_as_the_kohya_network(tiny, tmp_path):
    import copy

    from diffusers import UNet2DConditionModel

    from library.controlnet.lora_io import PEFT_WEIGHT_NAME, save_peft_copy
    from networks.lora import create_network

    unet = copy.deepcopy(tiny.unet)
    network = create_network(1.0, 4, 2.0, tiny.vae, tiny.text_encoder, unet)  # alpha != rank: scale 0.5
    network.apply_to(tiny.text_encoder, unet, apply_text_encoder=False, apply_unet=True)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for lora in network.unet_loras:
            lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=g) * 0.1)
    network.eval()
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500])
    hidden = torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        base = tiny.unet(x, t, hidden).sample
        ours = {m: (network.set_multiplier(m), unet(x, t, hidden).sample)[1] for m in (1.0, 0.5)}
    path = save_peft_copy(network, unet, tmp_path / "lora")
    assert path.name == PEFT_WEIGHT_NAME
    from safetensors.torch import load_file

    sd = load_file(str(path))
    assert len(sd) == 2 * len(network.unet_loras) and all(k.startswith("unet.") for k in sd)
    fresh = UNet2DConditionModel.from_config(tiny.unet.config)
    fresh.load_state_dict(tiny.unet.state_dict())
    fresh.load_lora_adapter(sd, prefix="unet", adapter_name="x")
    with torch.no_grad():
        theirs = fresh(x, t, hidden).sample
        fresh.set_adapters(["x"], [0.5])
        theirs_half = fresh(x, t, hidden).sample
    assert not torch.allclose(ours[1.0], base, atol=1e-4)
    assert torch.allclose(theirs, ours[1.0], atol=1e-5) and torch.allclose(theirs_half, ours[0.5], atol=1e-5)
