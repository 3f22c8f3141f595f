"""The model-family registry (library.models.families): SD1 vs SD2 told apart from the weights in
both layouts, one family per checkpoint, a clear error for weights of no family, and each family's
values where the trainers and files use them."""
from __future__ import annotations

import pytest
import torch

from library.errors import UserError
from library.models import families
from library.models.checkpoint_io import load_state_dict
from library.models.tiny import write_tiny_model


@pytest.fixture(scope="module")
def tiny_sd2(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("families"), v2=True)


def test_sd1_and_sd2_are_detected_from_keys_and_folders(tiny_model, tiny_sd2):
    assert [f.name for f in families.families()][:2] == ["sd1", "sd2"]
    assert families.detect_state_dict(load_state_dict(tiny_model.single_file)).name == "sd1"
    assert families.detect_state_dict(load_state_dict(tiny_sd2.single_file)).name == "sd2"
    assert families.detect_folder(tiny_model.diffusers_dir).name == "sd1"
    assert families.detect_folder(tiny_sd2.diffusers_dir).name == "sd2"


def test_loading_records_the_family_of_the_weights(tiny_model, tiny_sd2):
    from library.models.loading import load_sd_model

    assert load_sd_model(tiny_model.single_file).family == "sd1"
    assert families.get("sd1").load(tiny_model.diffusers_dir).family == "sd1"
    sd2 = load_sd_model(tiny_sd2.diffusers_dir, v2=True)
    assert sd2.family == "sd2" and sd2.v2


def test_an_unknown_checkpoint_is_a_clear_error_naming_the_file(tmp_path):
    path = tmp_path / "mystery.safetensors"
    with pytest.raises(UserError, match=r"mystery\.safetensors.*no model\.diffusion_model\.\* \(UNet\) keys") as err:
        families.detect_state_dict({"foo.weight": torch.zeros(1)}, path)
    assert str(err.value.path) == str(path)
    with pytest.raises(UserError, match="SDXL checkpoint"):
        families.detect_state_dict({"model.diffusion_model.x": torch.zeros(1),
                                    "conditioner.embedders.0.transformer.y": torch.zeros(1)}, path)
    with pytest.raises(UserError, match="LoRA file, not a base model"):
        families.detect_state_dict({"lora_unet_a.lora_down.weight": torch.zeros(1)}, path)
    with pytest.raises(UserError, match="unknown model family 'sdxl'"):
        families.get("sdxl")


def test_a_family_is_registered_once_and_two_claiming_one_checkpoint_is_a_bug():
    with pytest.raises(ValueError, match="already registered"):
        families.register(families.sd1.SD1())

    class Greedy(families.sd1.SD1):
        name = "greedy"

    families.register(Greedy())
    try:
        with pytest.raises(RuntimeError, match="several model families: sd1, greedy"):
            families.detect_state_dict({"model.diffusion_model.x": torch.zeros(1)}, "x.safetensors")
    finally:
        families._REGISTRY.pop("greedy")


def test_family_values_match_the_metadata_and_lora_naming():
    from library.training import metadata
    from networks import lora_format as fmt

    sd1, sd2 = families.get("sd1"), families.get("sd2")
    assert sd1.metadata(False) == {"ss_v2": "False", "ss_base_model_version": "sd_v1",
                                   "modelspec.architecture": "stable-diffusion-v1"}
    assert sd2.metadata(True) == {"ss_v2": "True", "ss_base_model_version": "sd_v2_v",
                                  "modelspec.architecture": "stable-diffusion-v2-768-v"}
    assert metadata.base_model_version(True, False) == "sd_v2"
    assert metadata.modelspec_architecture(True, False) == "stable-diffusion-v2-512"
    assert (sd1.default_resolution(), sd2.default_resolution(False), sd2.default_resolution(True)) == (512, 512, 768)
    for family in (sd1, sd2):  # kohya's names, equal to what networks/ writes
        assert family.lora_unet_prefix == fmt.UNET_PREFIX and family.lora_text_encoder_prefixes == (fmt.TE_PREFIX,)
        assert family.unet_target_modules == fmt.UNET_TARGETS and family.text_encoder_target_modules == fmt.TE_TARGETS
        assert family.unet_conv_target_modules == fmt.UNET_CONV_TARGETS
        for prefix, path in (("lora_te", "encoder.layers.0.mlp.fc1"), ("lora_unet", "down_blocks.0.attentions.0")):
            assert family.lora_module_name(prefix, path) == fmt.lora_name(prefix, path)


def test_text_conditioning_is_what_the_unet_takes(tiny_model):
    from library.models.loading import load_sd_model
    from library.models.text import encode_tokens, tokenize

    model = load_sd_model(tiny_model.single_file)
    family = families.get(model.family)
    cond = family.encode_prompts(model, ["a sks disk", ""], clip_skip=None)
    expected = encode_tokens(model.text_encoder, tokenize(model.tokenizer, ["a sks disk", ""]))
    assert torch.equal(cond.hidden_states, expected) and cond.pooled is None
    kwargs = cond.unet_kwargs(torch.float32)
    assert set(kwargs) == {"encoder_hidden_states"}  # SD1/2: no added conditions
    noisy = torch.zeros(2, 4, 8, 8)
    out = model.unet(noisy, torch.tensor([10, 10]), **kwargs).sample
    assert out.shape == noisy.shape
    extra = families.TextConditioning(expected, pooled=expected[:, 0], added_cond={"time_ids": torch.zeros(2, 6)})
    assert extra.unet_kwargs(torch.float16)["added_cond_kwargs"]["time_ids"].dtype == torch.float16
