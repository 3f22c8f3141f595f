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


def test_data_loader_workers_are_capped_at_the_cpu_count():
    """More workers than CPUs only compete, and torch then warns in every run (the paired trainer's
    default of 8 did on a 2-core machine): the shared feeder and the ImageControlNet loader cap them."""
    from library.data.loader import BatchFeeder
    from library.image_controlnet.steps import workers

    class Group:  # the feeder asks the first epoch's dataset whether it wants workers at all
        def epoch_dataset(self, epoch, seed):
            return type("Dataset", (), {"needs_workers": True})()

    cpus = os.cpu_count() or 1
    assert BatchFeeder(Group(), seed=0, num_workers=cpus + 6).num_workers == cpus
    assert BatchFeeder(Group(), seed=0, num_workers=1).num_workers == 1
    assert workers(cpus + 6) == cpus and workers(0) == 0


def test_a_paired_run_with_default_workers_prints_no_library_noise(tiny_model, tmp_path):
    from PIL import Image

    for modality, colour in (("cf", (200, 80, 40)), ("fa", (30, 30, 30))):
        (tmp_path / "pairs" / modality).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (64, 64), colour).save(tmp_path / "pairs" / modality / f"{i:04d}.png")
    proc = _run([sys.executable, str(REPO / "train_dual_unet.py"),
                 f"--pretrained_model_name_or_path={tiny_model.single_file}", f"--data_dir={tmp_path / 'pairs'}",
                 f"--output_dir={tmp_path / 'out'}", "--resolution=64", "--max_steps=1", "--validation_split=0.25",
                 "--sample_every=0", "--unet_lora_rank=2"], tmp_path)
    assert (tmp_path / "out" / "best_checkpoint").is_dir()
    for noise in (*NOISE, "UserWarning", "worker processes in total"):
        assert noise not in proc.stderr, proc.stderr
