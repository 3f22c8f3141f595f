"""A run prints our messages and real problems, not the libraries' noise (transformers' "requires
torchvision; falling back" warnings, which diffusers' pipeline imports set off in every run)."""
import logging
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import write_image_folder

REPO = Path(__file__).resolve().parents[1]
NOISE = ("requires torchvision", "[transformers]")


def _run(cmd, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_importing_the_diffusers_pipelines_after_library_is_silent(tmp_path):
    code = ("import library\n"
            "from diffusers import StableDiffusionPipeline, StableDiffusionControlNetPipeline\n"
            "import transformers\n"
            "transformers.CLIPImageProcessor, transformers.SiglipImageProcessor\n")
    proc = _run([sys.executable, "-c", code], tmp_path)
    assert proc.stderr.strip() == "", proc.stderr
    # without our filter the same imports warn (so the test above means something)
    loud = _run([sys.executable, "-c", code.replace("import library\n", "")], tmp_path)
    assert "requires torchvision" in loud.stderr


def test_a_training_run_with_samples_prints_no_library_noise(tiny_model, tmp_path):
    data = tmp_path / "data"
    write_image_folder(data, "10_test", count=2, size=64)
    (tmp_path / "prompts.txt").write_text("a test --s 2\n")
    proc = _run([sys.executable, str(REPO / "train_network.py"),
                 f"--pretrained_model_name_or_path={tiny_model.single_file}", f"--train_data_dir={data}",
                 f"--output_dir={tmp_path / 'out'}", "--resolution=64", "--network_module=networks.lora",
                 "--network_dim=4", "--max_train_steps=1", "--caption_extension=.txt",
                 "--sample_prompts=prompts.txt", "--sample_at_first"], tmp_path)
    assert (tmp_path / "out" / "last.safetensors").is_file() and any((tmp_path / "out" / "sample").iterdir())
    for noise in NOISE:
        assert noise not in proc.stderr and noise not in proc.stdout, proc.stderr


def test_only_the_fallback_warning_is_dropped():
    import library

    def record(message):
        return logging.LogRecord("transformers.utils.import_utils", logging.WARNING, __file__, 1, message, None, None)

    keep = library._TorchvisionFallbackFilter.filter
    assert not keep(record("`CLIPImageProcessor` requires torchvision (not installed); falling back to "
                           "`CLIPImageProcessorPil` for backward compatibility."))
    assert keep(record("Could not import module 'CLIPTextModel'."))
    assert library._TorchvisionFallbackFilter in logging.getLogger("transformers.utils.import_utils").filters
