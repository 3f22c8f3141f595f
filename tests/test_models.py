"""Model loading, LDM <-> diffusers conversion and saving, on the tiny SD1.5-structured model."""
import os
import shutil

import pytest
import torch

from library.errors import UserError
from library.models import arch, convert
from library.models.checkpoint_io import load_state_dict
from library.models.loading import load_sd_model, load_vae
from library.models.saving import save_diffusers, save_sd_checkpoint
from library.models.tiny import build_tiny_components, main as tiny_main

COMPONENTS = ("unet", "vae", "text_encoder")


@pytest.fixture(scope="session")
def loaded(tiny_model):
    """The tiny model loaded from both layouts."""
    return load_sd_model(tiny_model.diffusers_dir), load_sd_model(tiny_model.single_file)


@pytest.fixture(scope="session")
def other_vae():
    """A VAE with other weights (seed 1), to tell an override apart from the model's own."""
    return build_tiny_components(seed=1)[1]


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


def assert_same_dicts(a: dict, b: dict):
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())[:5]
    for key in a:
        assert a[key].shape == b[key].shape and a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


def test_both_layouts_load_with_equal_weights_and_outputs(loaded):
    folder, single = loaded
    for name in COMPONENTS:
        assert_same_state(getattr(folder, name), getattr(single, name))
        assert not getattr(single, name).training
    assert single.model_name == folder.model_name == "tiny-sd15"
    ids = folder.tokenizer(["a photo of a cat"], padding="max_length", max_length=77,
                           truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ids, single.tokenizer(["a photo of a cat"], padding="max_length", max_length=77,
                                             truncation=True, return_tensors="pt").input_ids)
    gen = torch.Generator().manual_seed(0)
    latents, image = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 3, 32, 32, generator=gen)
    with torch.no_grad():
        cond = [m.text_encoder(ids)[0] for m in loaded]
        torch.testing.assert_close(cond[0], cond[1], rtol=0, atol=1e-6)
        outs = [m.unet(latents, 500, c).sample for m, c in zip(loaded, cond)]
        torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-6)
        decoded = [m.vae.decode(m.vae.encode(image).latent_dist.mean).sample for m in loaded]
        torch.testing.assert_close(decoded[0], decoded[1], rtol=0, atol=1e-6)


def test_ldm_round_trips_are_exact(tiny_model, loaded):
    ldm = load_state_dict(tiny_model.single_file)
    unet_cfg = arch.infer_unet_config(ldm, arch.UNET_PREFIX)
    vae_cfg = arch.infer_vae_config(ldm, arch.VAE_PREFIX)
    unet_sd, vae_sd, te_sd = convert.ldm_to_diffusers(ldm, unet_cfg, vae_cfg)
    assert_same_dicts(convert.diffusers_to_ldm(unet_sd, vae_sd, te_sd), ldm)
    folder = loaded[0]
    diffusers_sds = [getattr(folder, name).state_dict() for name in COMPONENTS]
    back = convert.ldm_to_diffusers(convert.diffusers_to_ldm(*diffusers_sds), unet_cfg, vae_cfg)
    for original, converted in zip(diffusers_sds, back):
        assert_same_dicts(converted, original)


def test_single_file_uses_original_sd_key_names(tiny_model):
    sd = load_state_dict(tiny_model.single_file)
    # Names and shapes as in the real v1-5-pruned-emaonly.safetensors (tiny widths aside).
    for key in ("model.diffusion_model.input_blocks.3.0.op.weight",
                "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
                "model.diffusion_model.middle_block.2.emb_layers.1.weight",
                "model.diffusion_model.output_blocks.2.1.conv.weight",
                "model.diffusion_model.output_blocks.5.2.conv.weight",
                "model.diffusion_model.out.2.weight",
                "first_stage_model.decoder.up.3.upsample.conv.weight",
                "first_stage_model.encoder.down.2.block.0.nin_shortcut.weight",
                "cond_stage_model.transformer.text_model.final_layer_norm.weight"):
        assert key in sd, key
    assert sd["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    assert sd["cond_stage_model.transformer.text_model.embeddings.position_ids"].dtype == torch.int64
    assert sum(k.startswith("model.diffusion_model.") and k.endswith("to_k.weight") for k in sd) == 32


def test_diffusers_from_single_file_reads_our_checkpoint(tiny_model, loaded):
    from diffusers import StableDiffusionPipeline

    # Offline: `config` names our local diffusers folder, so diffusers needs no hub lookup for the
    # configs, the CLIP config or the tokenizer.
    pipe = StableDiffusionPipeline.from_single_file(
        str(tiny_model.single_file), config=str(tiny_model.diffusers_dir), local_files_only=True,
        safety_checker=None)
    for name in COMPONENTS:
        assert_same_state(getattr(pipe, name), getattr(loaded[0], name))
    # Our diffusers folder is a complete pipeline for diffusers too.
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model.diffusers_dir), local_files_only=True)
    for name in COMPONENTS:
        assert_same_state(getattr(pipe, name), getattr(loaded[0], name))
    image = pipe("a cat", num_inference_steps=1, height=64, width=64, output_type="pt").images
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()


def test_shipped_configs_match_shapes_of_full_size_sd15():
    """Inference from shapes gives back SD1.5's configs (models on the meta device: no memory)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet_cfg, vae_cfg, te_cfg = (arch.shipped_config(c) for c in COMPONENTS)
    with init_empty_weights():
        unet = UNet2DConditionModel(**arch.model_kwargs(unet_cfg))
        vae = AutoencoderKL(**arch.model_kwargs(vae_cfg))
        te = CLIPTextModel(CLIPTextConfig(**te_cfg))
    ldm = convert.diffusers_to_ldm(unet.state_dict(), vae.state_dict(), te.state_dict())
    assert arch.infer_unet_config(ldm, arch.UNET_PREFIX) == unet_cfg
    assert arch.infer_vae_config(ldm, arch.VAE_PREFIX) == vae_cfg
    assert arch.infer_text_encoder_config(convert.text_encoder_to_diffusers(ldm)) == te_cfg
    unet_sd, vae_sd, te_sd = convert.ldm_to_diffusers(ldm, unet_cfg, vae_cfg)
    for converted, model in ((unet_sd, unet), (vae_sd, vae), (te_sd, te)):
        expected = {k: v.shape for k, v in model.state_dict().items()}
        assert {k: v.shape for k, v in converted.items()} == expected
    assert (te_cfg["hidden_size"], te_cfg["num_hidden_layers"], te_cfg["num_attention_heads"],
            te_cfg["intermediate_size"], te_cfg["vocab_size"]) == (768, 12, 12, 3072, 49408)
    assert vae_cfg["scaling_factor"] == 0.18215
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964  # SD1.5 UNet


def test_noise_scheduler_is_sd15_training_schedule(loaded):
    for model in loaded:
        cfg = model.noise_scheduler.config
        assert cfg.clip_sample is False and cfg.prediction_type == "epsilon"
        assert cfg.num_train_timesteps == 1000 and cfg.steps_offset == 1
        expected = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float32) ** 2
        torch.testing.assert_close(model.noise_scheduler.betas, expected, rtol=0, atol=0)


def test_vae_override_from_single_file_and_folder(tiny_model, other_vae, tmp_path):
    bare = tmp_path / "vae-ft.safetensors"  # bare encoder./decoder. keys, like sd-vae-ft-mse
    save_sd = convert.vae_to_ldm(other_vae.state_dict(), prefix="")
    assert "encoder.mid.attn_1.q.weight" in save_sd
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in save_sd.items()}, str(bare))
    folder = tmp_path / "vae-folder"
    other_vae.save_pretrained(folder)
    for vae_path in (bare, folder):
        model = load_sd_model(tiny_model.single_file, vae_path=vae_path)
        assert_same_state(model.vae, other_vae)
    # A full checkpoint's first_stage_model.* part also works as a VAE source.
    model = load_sd_model(tiny_model.diffusers_dir, vae_path=tiny_model.single_file)
    assert_same_state(model.vae, load_vae(tiny_model.diffusers_dir))


def test_ckpt_loads_through_weights_only(tiny_model, loaded, tmp_path):
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": load_state_dict(tiny_model.single_file), "global_step": 10, "epoch": 1}, ckpt)
    model = load_sd_model(ckpt)
    for name in COMPONENTS:
        assert_same_state(getattr(model, name), getattr(loaded[1], name))


class _RunsCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _RunsCommand(marker)}, evil)
    with pytest.raises(UserError, match="refusing to load") as err:
        load_sd_model(evil)
    assert str(evil) in str(err.value) and "safetensors" in str(err.value)
    assert not marker.exists()


def _write(path, tensors):
    from safetensors.torch import save_file

    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize("case", ["zero_byte", "truncated", "truncated_ckpt", "missing", "sdxl",
                                  "no_unet", "shape_mismatch", "lora"])
def test_bad_inputs_raise_user_error_naming_the_file(case, tiny_model, tmp_path):
    sd = load_state_dict(tiny_model.single_file)
    if case == "zero_byte":
        path = tmp_path / "empty.safetensors"
        path.write_bytes(b"")
    elif case == "truncated":
        data = tiny_model.single_file.read_bytes()
        path = tmp_path / "half.safetensors"
        path.write_bytes(data[: len(data) // 2])
    elif case == "truncated_ckpt":
        full = tmp_path / "full.ckpt"
        torch.save({"state_dict": sd}, full)
        path = tmp_path / "half.ckpt"
        path.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    elif case == "missing":
        path = tmp_path / "nowhere" / "model.safetensors"
    elif case == "sdxl":
        path = _write(tmp_path / "sdxl.safetensors", {
            "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.ones(4),
            "model.diffusion_model.input_blocks.0.0.weight": torch.ones(4, 4, 3, 3)})
    elif case == "no_unet":
        path = _write(tmp_path / "vae-only.safetensors",
                      {k: v for k, v in sd.items() if not k.startswith("model.")})
    elif case == "shape_mismatch":
        key = "model.diffusion_model.input_blocks.1.1.proj_out.weight"
        sd[key] = torch.zeros(sd[key].shape[0], sd[key].shape[1] + 1, 1, 1)
        path = _write(tmp_path / "bad-shape.safetensors", sd)
    else:
        path = _write(tmp_path / "lora.safetensors", {"lora_unet_conv_in.lora_down.weight": torch.ones(2, 2)})
    with pytest.raises(UserError) as err:
        load_sd_model(path)
    message = str(err.value)
    assert str(path) in message
    if case == "missing":
        assert "does not exist" in message and "hub" in message.lower()
    if case in ("sdxl", "shape_mismatch", "lora"):
        assert {"sdxl": "SDXL", "shape_mismatch": "wrong shape", "lora": "LoRA"}[case] in message


def test_incomplete_diffusers_folder_is_a_user_error_and_a_wrong_v2_is_warned(tiny_model, tmp_path, capsys):
    folder = tmp_path / "partial"
    shutil.copytree(tiny_model.diffusers_dir, folder)
    shutil.rmtree(folder / "unet")
    with pytest.raises(UserError, match="unet/config.json"):
        load_sd_model(folder)
    # the weights decide: an SD1 file given with --v2 loads as SD1, with a warning naming the file
    model = load_sd_model(tiny_model.single_file, v2=True)
    err = capsys.readouterr().err
    assert model.v2 is False and "--v2 was given" in err and str(tiny_model.single_file) in err
    assert model.tokenizer.pad_token == "<|endoftext|>"


def test_saving_single_file_half_and_diffusers_folder(loaded, tmp_path):
    model = loaded[1]
    half = save_sd_checkpoint(tmp_path / "half.safetensors", model.unet, model.text_encoder, model.vae,
                              dtype=torch.float16, metadata={"ss_note": "test"})
    sd = load_state_dict(half)
    assert sd["model.diffusion_model.out.2.weight"].dtype == torch.float16
    assert sd["cond_stage_model.transformer.text_model.embeddings.position_ids"].dtype == torch.int64
    reloaded = load_sd_model(half, dtype=torch.float32)
    expected = model.unet.state_dict()
    for key, value in reloaded.unet.state_dict().items():
        assert torch.equal(value, expected[key].half().float()), key

    out = save_diffusers(model, tmp_path / "saved")
    te_keys = load_state_dict(out / "text_encoder" / "model.safetensors")
    assert all(k.startswith("text_model.") for k in te_keys)  # as in real SD1.5 folders
    assert {p.name for p in out.iterdir()} >= {"model_index.json", "unet", "vae", "text_encoder",
                                                "tokenizer", "scheduler"}
    again = load_sd_model(out)
    for name in COMPONENTS:
        assert_same_state(getattr(again, name), getattr(model, name))


def test_tiny_cli_is_deterministic(tiny_model, tmp_path, capsys):
    tiny_main(["--output_dir", str(tmp_path), "--seed", "0"])
    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / "tiny-sd15"), str(tmp_path / "tiny-sd15.safetensors")]
    assert (tmp_path / "tiny-sd15.safetensors").read_bytes() == tiny_model.single_file.read_bytes()
    unet_file = "unet/diffusion_pytorch_model.safetensors"
    ours = (tmp_path / "tiny-sd15" / unet_file).read_bytes()
    assert ours == (tiny_model.diffusers_dir / unet_file).read_bytes()


def test_ema_copy_in_checkpoint_is_ignored(tiny_model, loaded, tmp_path):
    sd = load_state_dict(tiny_model.single_file)
    # Full training checkpoints add an EMA copy under flattened names; training uses the raw weights.
    sd["model_ema.decay"] = torch.tensor(0.9999)
    sd["model_ema.input_blocks00weight"] = torch.zeros_like(sd["model.diffusion_model.input_blocks.0.0.weight"])
    model = load_sd_model(_write(tmp_path / "with-ema.safetensors", sd))
    assert_same_state(model.unet, loaded[1].unet)


@pytest.mark.parametrize("layout", ["single_file", "diffusers_dir"])
def test_training_dtypes_are_cast_once_from_the_file(tiny_model, loaded, other_vae, tmp_path, layout):
    """UNet and text encoder straight in the training dtype, the VAE in its own (fp32 on the CPU):
    the same values as loading in fp32 and casting afterwards, for both layouts and a --vae file."""
    reference = loaded[0] if layout == "diffusers_dir" else loaded[1]
    model = load_sd_model(getattr(tiny_model, layout), dtype=torch.bfloat16, vae_dtype=torch.float32)
    for name in ("unet", "text_encoder"):
        got, want = getattr(model, name).state_dict(), getattr(reference, name).state_dict()
        for key, value in want.items():
            expected = value.to(torch.bfloat16) if value.is_floating_point() else value
            assert got[key].dtype == expected.dtype and torch.equal(got[key], expected), (name, key)
    assert_same_state(model.vae, reference.vae)  # fp32, untouched
    folder = tmp_path / "vae-folder"
    other_vae.save_pretrained(folder)
    overridden = load_sd_model(getattr(tiny_model, layout), vae_path=folder, dtype=torch.bfloat16,
                               vae_dtype=torch.float32)
    assert_same_state(overridden.vae, other_vae)
    assert next(overridden.unet.parameters()).dtype == torch.bfloat16
