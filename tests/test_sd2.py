"""SD2.x: loading (single file with OpenCLIP <-> diffusers), v-prediction, training, and the LoRA file."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from library.models import arch, convert
from library.models.checkpoint_io import load_state_dict
from library.models.loading import load_sd_model, make_noise_scheduler
from library.models.tiny import TinyModelPaths, main as tiny_main
from tests.helpers import run_train_network, write_image_folder


@pytest.fixture(scope="module")
def tiny_sd2(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_sd2")
    tiny_main(["--output_dir", str(out), "--v2"])  # the command users run
    return TinyModelPaths(out / "tiny-sd2", out / "tiny-sd2.safetensors")


@pytest.fixture(scope="module")
def loaded(tiny_sd2):
    return load_sd_model(tiny_sd2.diffusers_dir, v2=True), load_sd_model(tiny_sd2.single_file, v2=True)


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_single_file_is_laid_out_like_sd2(tiny_sd2):
    with safe_open(str(tiny_sd2.single_file), "pt") as fh:
        keys = list(fh.keys())
        fused = fh.get_slice("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight").get_shape()
    assert not [k for k in keys if k.startswith("cond_stage_model.transformer.")]
    assert convert.open_clip_layer_count({k: None for k in keys}) == 24  # SD2 uses 23 of them
    assert fused == [3 * 32, 32]  # q, k, v fused, as OpenCLIP stores them
    for name in ("text_projection", "logit_scale", "positional_embedding", "token_embedding.weight", "ln_final.weight"):
        assert "cond_stage_model.model." + name in keys
    assert "model.diffusion_model.middle_block.1.proj_in.weight" in keys


def test_both_layouts_load_as_sd2_with_equal_weights_and_outputs(loaded):
    folder, single = loaded
    for model in loaded:
        assert model.v2 is True
        assert model.tokenizer.pad_token == "!"  # SD2's tokenizer pads with "!" (id 0)
        assert model.unet.config.use_linear_projection and model.unet.config.cross_attention_dim == 32
        assert model.text_encoder.config.hidden_act == "gelu" and model.text_encoder.config.num_hidden_layers == 23
    for name in ("unet", "vae", "text_encoder"):
        assert_same_state(getattr(folder, name), getattr(single, name))
    ids = single.tokenizer(["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert ids[0, -1] == 0
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=gen)
    with torch.no_grad():
        cond = [m.text_encoder(ids)[0] for m in loaded]
        outs = [m.unet(latents, 500, c).sample for m, c in zip(loaded, cond)]
    assert torch.equal(cond[0], cond[1])
    # the weights are bit-equal (above); the UNet's CPU kernels may still sum in another order depending on
    # where each tensor sits in memory (measured: 1.3e-6 on one machine, 0 on another)
    assert torch.allclose(outs[0], outs[1], rtol=0, atol=1e-5)


def test_open_clip_conversion_round_trips_and_keeps_the_penultimate_layer(tiny_sd2, loaded):
    ldm = load_state_dict(tiny_sd2.single_file)
    te_sd = convert.open_clip_to_diffusers(ldm)
    model_sd = loaded[0].text_encoder.state_dict()
    assert te_sd.keys() == model_sd.keys()
    assert all(torch.equal(te_sd[k], model_sd[k]) for k in te_sd)
    back = convert.text_encoder_to_open_clip(te_sd)
    for key, value in back.items():  # every real tensor comes back bit for bit
        if ".resblocks.23." not in key and not key.endswith(("text_projection", "logit_scale")):
            assert torch.equal(value, ldm[key]), key
    # q/k/v are the thirds of the fused projection (rows q, k, v)
    fused = ldm["cond_stage_model.model.transformer.resblocks.5.attn.in_proj_weight"]
    assert torch.equal(te_sd["encoder.layers.5.self_attn.k_proj.weight"], fused[32:64])
    # the last OpenCLIP layer is not part of SD2's text encoder
    ldm2 = dict(ldm)
    ldm2["cond_stage_model.model.transformer.resblocks.23.mlp.c_fc.weight"] = torch.zeros(128, 32)
    assert torch.equal(convert.open_clip_to_diffusers(ldm2)["encoder.layers.22.mlp.fc1.weight"],
                       te_sd["encoder.layers.22.mlp.fc1.weight"])


def test_diffusers_from_single_file_reads_our_sd2_checkpoint(tiny_sd2, loaded):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_single_file(str(tiny_sd2.single_file), config=str(tiny_sd2.diffusers_dir),
                                                    local_files_only=True, safety_checker=None)
    for name in ("unet", "vae", "text_encoder"):
        assert_same_state(getattr(pipe, name), getattr(loaded[1], name))


def test_shipped_sd2_configs_match_full_size_shapes():
    """Shapes of a full-size SD2 (meta device) give back configs/sd2; head counts follow 64-wide heads."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet_cfg, te_cfg = arch.shipped_config("unet", "sd2"), arch.shipped_config("text_encoder", "sd2")
    with init_empty_weights():
        unet = UNet2DConditionModel(**arch.model_kwargs(unet_cfg))
        te = CLIPTextModel(CLIPTextConfig(**te_cfg))
    ldm = {**convert.unet_to_ldm(unet.state_dict()), **convert.text_encoder_to_open_clip(te.state_dict())}
    assert convert.open_clip_layer_count(ldm) == 24
    assert arch.infer_unet_config(ldm, arch.UNET_PREFIX) == unet_cfg
    assert arch.infer_text_encoder_config(convert.open_clip_to_diffusers(ldm), kind="sd2") == te_cfg
    assert unet_cfg["attention_head_dim"] == [5, 10, 20, 20] and unet_cfg["cross_attention_dim"] == 1024
    assert (te_cfg["hidden_size"], te_cfg["num_hidden_layers"], te_cfg["num_attention_heads"],
            te_cfg["intermediate_size"], te_cfg["hidden_act"]) == (1024, 23, 16, 4096, "gelu")
    assert sum(p.numel() for p in unet.parameters()) == 865_910_724  # SD2.x UNet
    assert sum(p.numel() for p in te.parameters()) == 340_387_840  # OpenCLIP-H text, 23 layers


def test_missing_v2_is_detected_with_a_message(tiny_sd2, capsys):
    model = load_sd_model(tiny_sd2.single_file)  # no v2=True
    err = capsys.readouterr().err
    assert model.v2 is True and "Stable Diffusion 2.x" in err and "--v2" in err and str(tiny_sd2.single_file) in err


def test_v_parameterization_sets_the_prediction_type(tiny_sd2, tmp_path, capsys):
    assert make_noise_scheduler(None, True).config.prediction_type == "v_prediction"
    assert make_noise_scheduler(None, None).config.prediction_type == "epsilon"
    model = load_sd_model(tiny_sd2.single_file, v2=True, v_parameterization=True)
    assert model.noise_scheduler.config.prediction_type == "v_prediction"
    # a 768-v diffusers folder says so in its scheduler config: kept by default, warned about when
    # the flag disagrees
    folder = tmp_path / "v-model"
    (folder / "scheduler").mkdir(parents=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": "v_prediction"}))
    assert make_noise_scheduler(folder).config.prediction_type == "v_prediction"
    assert make_noise_scheduler(folder, False).config.prediction_type == "epsilon"
    assert "--v_parameterization" in capsys.readouterr().err


# --- training and the LoRA file ------------------------------------------------------------------

def _train(tmp_path, model, *extra):
    data = tmp_path / "data"
    write_image_folder(data, "2_sks disk", count=2, size=64)
    out = tmp_path / "out"
    run_train_network([f"--pretrained_model_name_or_path={model}", f"--train_data_dir={data}", f"--output_dir={out}",
                       "--resolution=64", "--network_module=networks.lora", "--network_dim=4", "--network_alpha=2",
                       "--max_train_steps=2", "--learning_rate=1e-3", "--seed=3", "--caption_extension=.txt",
                       "--max_data_loader_n_workers=0", *extra])
    return out / "last.safetensors"


def _pipeline():
    """A diffusers SD pipeline of the tiny SD2 components (seed 0, as in the tiny files)."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from library.models.tiny import build_tiny_components
    from library.models.tokenizer import load_clip_tokenizer

    unet, vae, te = build_tiny_components(seed=0, v2=True)
    return StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=load_clip_tokenizer("sd2"), unet=unet,
                                   scheduler=DDPMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def test_train_network_v2_v_parameterization_writes_an_sd2_lora(tiny_sd2, tmp_path):
    from networks import lora

    path = _train(tmp_path, tiny_sd2.single_file, "--v2", "--v_parameterization")
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
    # kohya's values; WebUI files the LoRA under SD2 because ss_v2 is "True"
    assert meta["ss_v2"] == "True" and meta["ss_base_model_version"] == "sd_v2_v"
    assert meta["ss_v_parameterization"] == "True"
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"

    sd = load_file(path)
    modules = {k.split(".")[0] for k in sd}
    te = sorted(m for m in modules if m.startswith("lora_te_"))
    assert len(te) == 23 * 6 and all(m.startswith("lora_te_text_model_encoder_layers_") for m in te)
    assert "lora_te_text_model_encoder_layers_22_mlp_fc2" in modules
    assert len([m for m in modules if m.startswith("lora_unet_")]) == 192
    # SD2's proj_in/proj_out are Linear: 2-D LoRA tensors
    assert sd["lora_unet_mid_block_attentions_0_proj_in.lora_down.weight"].shape == (4, 96)
    assert {float(v) for k, v in sd.items() if k.endswith(".alpha")} == {2.0}

    # diffusers applies the file to an SD2 pipeline exactly as our network does
    pipe = _pipeline()
    pipe.load_lora_weights(str(path))
    from peft.tuners.lora import LoraLayer

    peft_layers = sum(isinstance(m, LoraLayer) for c in (pipe.unet, pipe.text_encoder) for m in c.modules())
    assert peft_layers == len(modules)
    ours = _pipeline()
    net, weights = lora.create_network_from_weights(1.0, path, ours.vae, ours.text_encoder, ours.unet)
    net.apply_to(ours.text_encoder, ours.unet)
    net.load_state_dict(weights)
    ids = torch.randint(0, 49406, (1, 8), generator=torch.Generator().manual_seed(1))
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = [p.unet(x, 10, p.text_encoder(ids)[0]).sample for p in (pipe, ours, _pipeline())]
    torch.testing.assert_close(got[0], got[1], rtol=1e-5, atol=1e-6)
    assert (got[1] - got[2]).abs().max() > 1e-4  # the trained LoRA does change the output


def test_train_network_detects_sd2_without_v2(tiny_sd2, tmp_path, capsys):
    path = _train(tmp_path, tiny_sd2.diffusers_dir, "--max_train_steps=1")
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
    assert "Stable Diffusion 2.x" in capsys.readouterr().err
    assert meta["ss_v2"] == "True" and meta["ss_base_model_version"] == "sd_v2"
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-512/lora"
