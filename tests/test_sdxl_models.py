"""SDXL base: the tiny SDXL-structured model in both layouts, loading, conversion, detection, --vae."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from library.errors import UserError
from library.models import convert as base_convert
from library.models.arch import model_kwargs
from library.models.checkpoint_io import load_state_dict
from library.models.sdxl import arch, convert
from library.models.sdxl.loading import load_sdxl_model
from library.models.sdxl.saving import checkpoint_state_dict
from library.models.sdxl.tiny import TinySDXLPaths, build_tiny_sdxl, main as tiny_main


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_sdxl")
    tiny_main(["--output_dir", str(out)])  # the command users run
    return TinySDXLPaths(out / "tiny-sdxl", out / "tiny-sdxl.safetensors")


@pytest.fixture(scope="module")
def loaded(tiny_sdxl):
    return load_sdxl_model(tiny_sdxl.diffusers_dir), load_sdxl_model(tiny_sdxl.single_file)


@pytest.fixture(scope="module")
def original(tiny_sdxl):
    return load_state_dict(tiny_sdxl.single_file)


PARTS = ("unet", "vae", "te1", "te2")


def parts(model):
    return dict(zip(PARTS, (model.unet, model.vae, *model.text_encoders)))


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_single_file_is_laid_out_like_sdxl(original):
    keys = set(original)
    prefixes = {k.split(".")[0] + "." + k.split(".")[1] for k in keys}
    assert prefixes == {"model.diffusion_model", "conditioner.embedders", "first_stage_model.encoder",
                        "first_stage_model.decoder", "first_stage_model.quant_conv",
                        "first_stage_model.post_quant_conv"}
    assert {k.split(".")[3] for k in keys if k.startswith("conditioner.")} == {"transformer", "model"}
    assert "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight" in keys
    assert "conditioner.embedders.0.transformer.text_model.encoder.layers.12.mlp.fc2.weight" not in keys
    # bigG in OpenCLIP's layout: 32 layers, fused q/k/v, its projection as a bare matrix
    assert base_convert.open_clip_layer_count(original, arch.TE2_PREFIX) == 32
    assert original["conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight"].shape == (3 * 64, 64)
    for name in ("text_projection", "logit_scale", "positional_embedding", "token_embedding.weight", "ln_final.weight"):
        assert arch.TE2_PREFIX + name in keys
    # the UNet in SDXL's original layout: 10 transformer blocks in the lowest level, the size embedding
    assert "model.diffusion_model.input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight" in keys
    assert "model.diffusion_model.middle_block.1.transformer_blocks.9.ff.net.2.weight" in keys
    assert "model.diffusion_model.output_blocks.2.2.conv.weight" in keys  # upsampler after the attention
    assert "model.diffusion_model.input_blocks.3.0.op.weight" in keys
    assert original["model.diffusion_model.label_emb.0.0.weight"].shape == (128, 64 + 6 * 8)
    assert arch.detect(keys) == arch.SDXL_BASE


def test_both_layouts_load_the_same_weights_as_built(tiny_sdxl, loaded):
    reference = build_tiny_sdxl(0)
    ref = dict(zip(PARTS, (reference.unet, reference.vae, reference.text_encoder, reference.text_encoder_2)))
    for model in loaded:
        for name, part in parts(model).items():
            assert_same_state(part, ref[name])
        assert model.unet.config.transformer_layers_per_block == [1, 2, 10]
        assert model.unet.config.addition_embed_type == "text_time"
        assert model.vae.config.scaling_factor == arch.VAE_SCALE_FACTOR
        assert type(model.text_encoders[1]).__name__ == "CLIPTextModelWithProjection"
        assert model.noise_scheduler.config.prediction_type == "epsilon"
    assert loaded[0].model_name == "tiny-sdxl" and loaded[1].model_name == "tiny-sdxl"


def test_bigg_projection_is_transposed_from_open_clip(original, loaded):
    """OpenCLIP pools with `x @ text_projection`; transformers' Linear computes x @ W.T."""
    te2 = loaded[1].text_encoders[1]
    x = torch.randn(3, 64)
    expected = x @ original[arch.TE2_PREFIX + "text_projection"]
    assert torch.allclose(te2.text_projection(x), expected, atol=1e-6)
    fused = original[arch.TE2_PREFIX + "transformer.resblocks.7.attn.in_proj_weight"]
    assert torch.equal(te2.state_dict()["text_model.encoder.layers.7.self_attn.v_proj.weight"], fused[128:])


def test_conversion_round_trips_bit_for_bit(original, loaded):
    model = loaded[0]
    back = checkpoint_state_dict(model.unet, model.vae, *model.text_encoders)
    assert set(back) - set(original) == set()
    assert set(original) - set(back) == set()
    for key, value in back.items():
        if key.endswith("logit_scale"):  # a stand-in: not part of a transformers text encoder
            assert float(value) == pytest.approx(math.log(1 / 0.07))
        else:
            assert torch.equal(value, original[key]), key


def test_diffusers_own_single_file_loader_reads_our_file_as_we_do(tiny_sdxl, loaded):
    """An independent reading of our original-layout file: diffusers' from_single_file (offline)."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_single_file(str(tiny_sdxl.single_file), config=str(tiny_sdxl.diffusers_dir),
                                                      local_files_only=True)
    ours = parts(loaded[1])
    for name, theirs in (("unet", pipe.unet), ("vae", pipe.vae), ("te1", pipe.text_encoder),
                         ("te2", pipe.text_encoder_2)):
        sa, sb = ours[name].state_dict(), theirs.state_dict()
        sb = {k if k in sa else k.removeprefix("text_model."): v for k, v in sb.items()}
        common = sa.keys() & sb.keys()
        assert len(common) >= len(sa) - 1, (name, sorted(sa.keys() - sb.keys())[:5])
        for key in common:
            assert torch.equal(sa[key], sb[key]), (name, key)


def test_ckpt_weights_only_loads_the_same(tmp_path, original, loaded):
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": original}, ckpt)
    model = load_sdxl_model(ckpt)
    for name, part in parts(model).items():
        assert_same_state(part, parts(loaded[1])[name])


def test_shipped_configs_match_full_size_sdxl_shapes():
    """Shapes of a full-size SDXL base (meta device) give back configs/sdxl and SDXL's sizes."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = {name: arch.shipped_config(name) for name in ("unet", "vae", "text_encoder", "text_encoder_2")}
    with init_empty_weights():
        unet = UNet2DConditionModel(**model_kwargs(cfg["unet"]))
        vae = AutoencoderKL(**model_kwargs(cfg["vae"]))
        te1 = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"]))
    ldm = convert.to_original(unet.state_dict(), vae.state_dict(), te1.state_dict(), te2.state_dict())
    assert arch.detect(ldm) == arch.SDXL_BASE
    te1_sd, te2_sd = convert.text_encoder_1_to_diffusers(ldm), convert.text_encoder_2_to_diffusers(ldm)
    te2_cfg = arch.infer_text_encoder_2_config({k.removeprefix("text_model."): v for k, v in te2_sd.items()})
    assert arch.infer_unet_config(ldm, pooled_dim=te2_cfg["projection_dim"]) == cfg["unet"]
    assert arch.infer_vae_config(base_convert.strip_vae_prefix(ldm)) == cfg["vae"]
    assert arch.infer_text_encoder_config(te1_sd) == cfg["text_encoder"]
    assert te2_cfg == cfg["text_encoder_2"]
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in
              (("unet", unet), ("vae", vae), ("te1", te1), ("te2", te2))}
    # SDXL 1.0 base: UNet 2.567 B, CLIP ViT-L text 123 M, bigG text 695 M, VAE 83.7 M parameters
    assert counts == {"unet": 2_567_463_684, "vae": 83_653_863, "te1": 123_060_480, "te2": 694_659_840}


# --- bad input --------------------------------------------------------------------------------------

def _error(path, **kwargs) -> UserError:
    with pytest.raises(UserError) as info:
        load_sdxl_model(path, **kwargs)
    return info.value


def test_refiner_is_refused_with_what_to_pass(tmp_path, original):
    # A refiner holds only bigG, as conditioner.embedders.0.model.*
    refiner = {k.replace("conditioner.embedders.1.", "conditioner.embedders.0."): v for k, v in original.items()
               if not k.startswith("conditioner.embedders.0.")}
    path = tmp_path / "sd_xl_refiner_1.0.safetensors"
    save_file(refiner, str(path))
    text = str(_error(path))
    assert "SDXL refiner" in text and "not supported" in text and "SDXL base" in text and str(path) in text


def test_sd1_and_sd2_checkpoints_are_sent_to_train_network(tmp_path, tiny_model):
    text = str(_error(tiny_model.single_file))
    assert "Stable Diffusion 1.x" in text and "train_network.py" in text
    text = str(_error(tiny_model.diffusers_dir))
    assert "Stable Diffusion 1.x diffusers folder" in text and "train_network.py" in text
    sd2 = tmp_path / "sd2.safetensors"
    save_file({"cond_stage_model.model.token_embedding.weight": torch.zeros(4, 2),
               "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 4, 3, 3)}, str(sd2))
    text = str(_error(sd2))
    assert "Stable Diffusion 2.x" in text and "train_network.py" in text


def test_lora_and_unknown_files_are_named(tmp_path):
    lora = tmp_path / "style.safetensors"
    save_file({"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(4, 8)}, str(lora))
    assert "LoRA file" in str(_error(lora)) and "--network_weights" in str(_error(lora))
    other = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(2)}, str(other))
    assert "not an SDXL checkpoint" in str(_error(other))


def test_truncated_and_incomplete_files_are_clear_errors(tmp_path, tiny_sdxl, original):
    data = tiny_sdxl.single_file.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    text = str(_error(cut))
    assert "truncated" in text and str(cut) in text
    # A readable file with tensors of bigG's missing (a bad merge or a partial save)
    partial = tmp_path / "partial.safetensors"
    save_file({k: v for k, v in original.items() if ".resblocks.5.mlp." not in k}, str(partial))
    text = str(_error(partial))
    assert "OpenCLIP bigG" in text and "missing" in text and "download or copy it again" in text
    no_vae = tmp_path / "no_vae.safetensors"
    save_file({k: v for k, v in original.items() if not k.startswith("first_stage_model.")}, str(no_vae))
    assert "--vae" in str(_error(no_vae))


def test_vae_override_uses_sdxl_scaling(tmp_path, tiny_sdxl, original, loaded, capsys):
    from diffusers import AutoencoderKL

    # A single-file VAE without prefix (as sdxl_vae.safetensors ships): its weights are used
    vae_file = tmp_path / "sdxl_vae.safetensors"
    vae_sd = {k.removeprefix("first_stage_model."): v * 0.5 if v.is_floating_point() else v
              for k, v in original.items() if k.startswith("first_stage_model.")}
    save_file(vae_sd, str(vae_file))
    model = load_sdxl_model(tiny_sdxl.single_file, vae_path=vae_file)
    enc = model.vae.state_dict()["encoder.conv_in.weight"]
    assert torch.equal(enc, loaded[1].vae.state_dict()["encoder.conv_in.weight"] * 0.5)
    assert model.vae.config.scaling_factor == arch.VAE_SCALE_FACTOR  # SD1's 0.18215 would be wrong
    # A diffusers VAE folder saying another factor: SDXL's is used, with a warning
    folder = tmp_path / "vae_folder"
    vae = AutoencoderKL(**model_kwargs({**loaded[0].vae.config, "scaling_factor": 0.18215}))
    vae.save_pretrained(folder)
    model = load_sdxl_model(tiny_sdxl.diffusers_dir, vae_path=folder)
    assert model.vae.config.scaling_factor == arch.VAE_SCALE_FACTOR
    assert "scaling_factor=0.18215" in capsys.readouterr().err
    missing = tmp_path / "nope.safetensors"
    assert "--vae" in str(_error(tiny_sdxl.single_file, vae_path=missing))


def test_diffusers_folder_checks(tmp_path, tiny_sdxl):
    import json
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_sdxl.diffusers_dir, folder)
    (folder / "model_index.json").rename(tmp_path / "model_index.json")
    assert load_sdxl_model(folder).unet.config.addition_embed_type == "text_time"  # told by unet/config.json
    (tmp_path / "model_index.json").rename(folder / "model_index.json")
    shutil.rmtree(folder / "text_encoder_2")
    text = str(_error(folder))
    assert "text_encoder_2/config.json missing" in text
    index = json.loads((folder / "model_index.json").read_text())
    index.update(_class_name="StableDiffusionXLImg2ImgPipeline", text_encoder=[None, None])
    (folder / "model_index.json").write_text(json.dumps(index))
    assert "SDXL refiner" in str(_error(folder))
    (folder / "model_index.json").unlink()  # a refiner folder without its index: no text_encoder/
    shutil.rmtree(folder / "text_encoder")
    assert "SDXL refiner" in str(_error(folder))


def test_diffusers_sdxl_pipeline_runs_from_the_tiny_folder_offline(tiny_sdxl):
    """The folder is a real diffusers SDXL model: StableDiffusionXLPipeline loads it offline and denoises."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl.diffusers_dir), local_files_only=True)
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert pipe.tokenizer_2.pad_token_id == 0 and pipe.tokenizer.pad_token_id == 49407
    out = pipe("a photo of a cat", num_inference_steps=1, height=64, width=64, guidance_scale=5.0,
               generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (1, 64, 64, 3) and (out >= 0).all() and (out <= 1).all()


def test_dtypes_and_fp32_vae(tiny_sdxl):
    """bf16 training with --no_half_vae: UNet and both encoders in bf16, the VAE kept in fp32."""
    model = load_sdxl_model(tiny_sdxl.single_file, dtype=torch.bfloat16, vae_dtype=torch.float32)
    for part in (model.unet, *model.text_encoders):
        assert {p.dtype for p in part.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.vae.parameters()} == {torch.float32}
    assert model.noise_scheduler.config.prediction_type == "epsilon"
    assert load_sdxl_model(tiny_sdxl.single_file, v_parameterization=True).noise_scheduler.config.prediction_type \
        == "v_prediction"
