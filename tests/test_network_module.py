"""The --network_module contract (library/lora/network_module.py, docs/network_module.md): any module
goes through it, the saved-file check runs for every module, and modules of other kinds than
lora_down/lora_up (LoHa, LoKr, ...) pass the check when their files are sound."""
from __future__ import annotations

import sys

import pytest
import torch
from safetensors.torch import save_file

from library.errors import UserError
from library.lora.network_module import check_saved_file, import_network_module
from library.models.tiny import build_tiny_components
from tests.helpers import run_train_network, write_image_folder


def test_a_module_without_the_factories_is_refused_by_name(tmp_path, monkeypatch):
    (tmp_path / "half_network.py").write_text("def create_network(*a, **k):\n    return None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserError, match="half_network does not provide create_network_from_weights"):
        import_network_module("half_network")
    with pytest.raises(UserError, match="cannot import --network_module no_such_network"):
        import_network_module("no_such_network")
    sys.modules.pop("half_network", None)


def test_saved_file_check_takes_modules_of_any_kind(tmp_path):
    unet, _, te = build_tiny_components(0)
    layer = "lora_unet_down_blocks_0_attentions_0_proj_in"
    # a complete LoHa module for the 32 -> 32 1x1 conv: (w1a w1b) * (w2a w2b), rank 2
    hada = {f"{layer}.hada_w1_a": torch.randn(32, 2), f"{layer}.hada_w1_b": torch.randn(2, 32),
            f"{layer}.hada_w2_a": torch.randn(32, 2), f"{layer}.hada_w2_b": torch.randn(2, 32),
            f"{layer}.alpha": torch.tensor(2.0)}
    good = tmp_path / "loha.safetensors"
    save_file(hada, str(good))
    assert check_saved_file(good, unet, te).modules == 1
    bad = tmp_path / "diverged.safetensors"
    save_file({**hada, f"{layer}.hada_w1_a": torch.full((4, 2), float("nan"))}, str(bad))
    with pytest.raises(UserError, match="diverged.safetensors, breaks the LoRA file contract: NaN or Inf"):
        check_saved_file(bad, unet, te)
    stray = tmp_path / "stray.safetensors"
    save_file({k.replace(layer, "lora_unet_no_such_layer"): v for k, v in hada.items()}, str(stray))
    with pytest.raises(UserError, match="names of no SD1.x layer"):
        check_saved_file(stray, unet, te)


def test_any_network_module_trains_and_every_file_it_writes_is_checked(tiny_model, tmp_path, monkeypatch):
    """A module other than networks.lora (here one that re-exports it under another name) gets
    the same treatment: built through the contract, each saved file checked."""
    from library.lora_tools import verify

    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "my_network.py").write_text(
        "from networks.lora import create_network, create_network_from_weights  # noqa: F401\n")
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    checked = []
    real = verify.check_saved_lora
    monkeypatch.setattr(verify, "check_saved_lora", lambda path, unet, te: checked.append(path) or real(path, unet, te))
    write_image_folder(tmp_path / "data", "1_sks disk", count=1)
    result = run_train_network([
        f"--pretrained_model_name_or_path={tiny_model.single_file}", f"--train_data_dir={tmp_path / 'data'}",
        f"--output_dir={tmp_path / 'out'}", "--resolution=64", "--network_module=my_network", "--network_dim=2",
        "--max_train_steps=2", "--save_every_n_steps=1", "--seed=1", "--caption_extension=.txt",
        "--max_data_loader_n_workers=0"])
    sys.modules.pop("my_network", None)
    assert checked == result["files"] and len(checked) == 2
    from library.training.metadata import read_metadata

    assert read_metadata(result["files"][-1])["ss_network_module"] == "my_network"
