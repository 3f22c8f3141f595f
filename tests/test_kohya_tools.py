"""kohya's tool flags and tools/ scripts: check_lora_weights --show_all_keys, merge_lora --shuffle
--no_metadata, svd_merge_lora --lbws, extract_lora_from_models --v_parameterization/--load_*_model_to,
tools/show_metadata.py, tools/convert_diffusers20_original_sd.py, tools/resize_images_to_resolution.py."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from library.errors import UserError
from library.lora_tools.weights import read_lora
from networks import check_lora_weights, extract_lora_from_models, merge_lora, svd_merge_lora
from tests.test_lora_tools import make_lora


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    root = tmp_path_factory.mktemp("kohya_tool_loras")
    return make_lora(root / "a.safetensors", 1), make_lora(root / "b.safetensors", 2, dim=4, alpha=1.0)


def test_check_lora_weights_takes_kohyas_show_all_keys(loras, capsys):
    """kohya's check_lora_weights.py: -s/--show_all_keys."""
    check_lora_weights.main([str(loras[0])])
    short = capsys.readouterr().out
    check_lora_weights.main(["--show_all_keys", str(loras[0])])
    full = capsys.readouterr().out
    assert len(full) > len(short)
    check_lora_weights.main(["-s", str(loras[0])])
    assert capsys.readouterr().out == full


def test_merge_lora_shuffle_keeps_the_effect_and_no_metadata_drops_modelspec(loras, tmp_path):
    """kohya's merge_lora_models(shuffle=True): torch.randperm over each module's rank, applied to down's
    rows and up's columns; --no_metadata: no sai modelspec metadata (the minimum ss_* stays)."""
    from library.training.metadata import read_metadata

    plain, shuffled, bare = tmp_path / "plain.safetensors", tmp_path / "shuf.safetensors", tmp_path / "bare.safetensors"
    files = [str(p) for p in loras]
    merge_lora.main(["--models", *files, "--save_to", str(plain)])
    torch.manual_seed(0)
    merge_lora.main(["--models", *files, "--save_to", str(shuffled), "--shuffle"])
    merge_lora.main(["--models", *files, "--save_to", str(bare), "--no_metadata"])
    a, b = read_lora(plain).modules, read_lora(shuffled).modules
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[k].down, b[k].down) for k in a)
    for k in a:
        torch.testing.assert_close(b[k].delta(), a[k].delta(), rtol=1e-5, atol=1e-7)
    meta, bare_meta = read_metadata(plain), read_metadata(bare)
    assert meta["modelspec.title"] == "plain" and meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.merged_from"] == "a, b"
    assert not any(k.startswith("modelspec.") for k in bare_meta)
    assert bare_meta["ss_network_module"] == "networks.lora" and "sshs_model_hash" in bare_meta


def test_svd_merge_lbws_weights_blocks_as_kohya(loras, tmp_path):
    """kohya's svd_merge_lora format_lbws / get_lbw_block_index: a 17-value list (BASE, IN01 IN02 IN04
    IN05 IN07 IN08, MID, OUT03-OUT11) scales each module's update by its block's value."""
    from library.lora_tools.combine import lbw_slot

    weights = [0, 1, 1, 1, 1, 1, 1, 0.5, 1, 1, 1, 1, 1, 1, 1, 1, 0]  # BASE 0, MID 0.5, OUT11 0
    out, ref = tmp_path / "lbw.safetensors", tmp_path / "ref.safetensors"
    common = ["--models", str(loras[0]), "--new_rank", "8"]  # rank 8 = the file's: the SVD is exact
    svd_merge_lora.main([*common, "--save_to", str(ref)])
    svd_merge_lora.main([*common, "--save_to", str(out), "--lbws", json.dumps(weights)])
    got, want = read_lora(out).modules, read_lora(ref).modules
    seen = set()
    for name, m in want.items():
        slot = lbw_slot(name)
        factor = {0: 0.0, 13: 0.5, 25: 0.0}.get(slot, 1.0)
        seen.add(factor)
        if name in got:
            torch.testing.assert_close(got[name].delta(), m.delta() * factor, rtol=1e-3, atol=1e-6)
        else:
            assert factor == 0.0  # a module weighted 0 is left out of the file
    assert seen == {0.0, 0.5, 1.0}
    with pytest.raises(UserError, match="SDXL"):
        svd_merge_lora.main([*common, "--save_to", str(tmp_path / "x.safetensors"), "--lbws", json.dumps([1] * 12)])


def test_extract_v_parameterization_metadata_and_load_devices(tiny_model, loras, tmp_path):
    """kohya's extract_lora_from_models: --v_parameterization (default: as --v2) goes into the metadata;
    --load_original_model_to / --load_tuned_model_to name the devices the models are loaded to."""
    from library.training.metadata import read_metadata

    tuned = tmp_path / "tuned.safetensors"
    merge_lora.main(["--sd_model", str(tiny_model.single_file), "--models", str(loras[0]), "--save_to", str(tuned)])
    out = tmp_path / "x.safetensors"
    extract_lora_from_models.main(["--model_org", str(tiny_model.single_file), "--model_tuned", str(tuned),
                                   "--dim", "4", "--v_parameterization", "--load_original_model_to", "cpu",
                                   "--load_tuned_model_to", "cpu", "--save_to", str(out)])
    meta = read_metadata(out)
    assert meta["modelspec.prediction_type"] == "v" and meta["ss_base_model_version"] == "sd_v1_v"


def test_show_metadata_prints_sorted_json(loras, capsys):
    """kohya's tools/show_metadata.py: json.dumps(metadata, indent=4, sort_keys=True)."""
    from tools import show_metadata

    assert show_metadata.main(["--model", str(loras[0])]) == 0
    printed = capsys.readouterr().out
    data = json.loads(printed)
    assert data["ss_network_dim"] == "8" and printed == json.dumps(data, indent=4, sort_keys=True) + "\n"


def test_convert_diffusers_and_single_file_both_ways(tiny_model, tmp_path):
    """kohya's convert_diffusers20_original_sd.py: a target with an extension is a checkpoint, one without
    a diffusers folder; converting there and back keeps every weight."""
    from library.models.loading import load_sd_model
    from tools import convert_diffusers20_original_sd as convert

    folder, back = tmp_path / "as_folder", tmp_path / "back.safetensors"
    convert.main([str(tiny_model.single_file), str(folder)])
    convert.main(["--v1", str(folder), str(back), "--metadata", "{'name': 'tiny'}", "--epoch", "3"])
    a, b = load_sd_model(tiny_model.single_file), load_sd_model(back)
    for part in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), part
    from library.training.metadata import read_metadata

    meta = read_metadata(back)
    assert meta["name"] == "tiny" and meta["ss_epoch"] == "3"
    half = tmp_path / "half.safetensors"
    convert.main(["--fp16", str(folder), str(half)])
    from safetensors import safe_open

    with safe_open(str(half), "pt") as fh:
        assert fh.get_tensor(next(k for k in fh.keys() if k.endswith("weight"))).dtype == torch.float16


def test_resize_images_to_resolution(tmp_path):
    """kohya's resize_images_to_resolution.py: <name>+<WxH>.jpg per area, sqrt scaling, never enlarged,
    sides cut to --divisible_by; other files copied, captions per size with --copy_associated_files."""
    from tools import resize_images_to_resolution as resize

    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 200, 3), dtype=np.uint8)).save(src / "a.png")
    (src / "a.txt").write_text("a caption", encoding="utf-8")
    resize.main([str(src), str(dst), "--max_resolution", "128x128,512x512", "--divisible_by", "8", "--save_as_png",
                 "--copy_associated_files"])
    small = Image.open(dst / "a+128x128.png")
    # 300x200 (HxW) to at most 128*128 pixels: sqrt(16384 / 60000) -> 156x104, cut to 152x104
    assert small.size == (104, 152)
    assert Image.open(dst / "a+512x512.png").size == (200, 296)  # smaller already: only cut to multiples of 8
    assert (dst / "a.txt").read_text(encoding="utf-8") == "a caption"
    assert (dst / "a+128x128.txt").is_file() and (dst / "a+512x512.txt").is_file()
