"""Bad input to train_network.py: one clear paragraph naming the file or flag and the fix, exit 2,
no traceback, and before any model is loaded or latents are cached."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from library.errors import UserError
from tests.helpers import run_train_network, write_image_folder

REPO = Path(__file__).resolve().parents[1]


def cli(*argv, cwd=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / "train_network.py"), *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_out_of_range_flags_are_rejected_by_the_parser():
    for flag, value in (("--network_dim", "0"), ("--learning_rate", "-1e-4"), ("--train_batch_size", "0")):
        proc = cli(flag, value)
        assert proc.returncode == 2
        assert flag in proc.stderr and "Traceback" not in proc.stderr


def test_unknown_config_key_names_the_key(tmp_path):
    """Ignored as kohya does, and named with a suggestion; the run then stops for the missing model."""
    cfg = tmp_path / "c.toml"
    cfg.write_text('[training]\nnetwork_dimm = 8\n')
    proc = cli(f"--config_file={cfg}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "network_dimm" in proc.stderr and "network_dim" in proc.stderr.replace("network_dimm", "")
    assert str(cfg) in proc.stderr


def test_bad_value_in_config_file(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('network_dim = 0\n')
    proc = cli(f"--config_file={cfg}")
    assert proc.returncode == 2 and "network_dim" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    data = tmp_path / "data"
    write_image_folder(data, "2_x", count=1)
    proc = cli(f"--pretrained_model_name_or_path={tmp_path / 'nope.safetensors'}", f"--train_data_dir={data}",
               f"--output_dir={tmp_path / 'out'}", "--resolution=64")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "nope.safetensors" in proc.stderr


def test_unwritable_output_dir_fails_before_loading(tmp_path, tiny_model):
    if os.geteuid() == 0:
        target = Path("/proc/unwritable_output")  # even root cannot create folders in /proc
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        target = locked / "out"
    data = tmp_path / "data"
    write_image_folder(data, "2_x", count=1)
    with pytest.raises(UserError) as err:
        run_train_network([f"--pretrained_model_name_or_path={tiny_model.single_file}", f"--train_data_dir={data}",
                           f"--output_dir={target}", "--resolution=64", "--cache_latents"])
    assert str(target) in str(err.value) and "--output_dir" in str(err.value)


def test_missing_data_source_and_model_flags():
    proc = cli("--output_dir=/tmp/x")
    assert proc.returncode == 2 and "--pretrained_model_name_or_path" in proc.stderr


def test_config_file_flags_are_booleans(tmp_path):
    import train_network
    from library import args as A

    cfg = tmp_path / "c.toml"
    cfg.write_text("cache_latents = false\nflip_aug = true\nnetwork_args = [\"conv_dim=4\"]\n")
    args = A.parse_args(train_network.setup_parser(), [f"--config_file={cfg}"])
    assert args.cache_latents is False and args.flip_aug is True and args.network_args == ["conv_dim=4"]
    cfg.write_text('cache_latents = "maybe"\n')  # "yes"/"no", 1/0 are read (tests/test_kohya_compat.py)
    with pytest.raises(UserError, match="cache_latents"):
        A.parse_args(train_network.setup_parser(), [f"--config_file={cfg}"])
