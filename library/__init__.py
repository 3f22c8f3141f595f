"""Shared pieces of the training scripts: models, data, training loop, saving, logging."""
import os

# Never touch a model hub: everything we need ships with the project or is a local file.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("DISABLE_TELEMETRY", "1")


class _TorchvisionFallbackFilter:
    """Drop transformers' "`CLIPImageProcessor` requires torchvision (not installed); falling back to
    `CLIPImageProcessorPil`" warnings. diffusers' pipeline modules import these processors (for the
    safety checker and image encoders, which we never use), and without torchvision (not a dependency:
    torch is CPU-pinned) transformers warns once per class in every run. The fallback is exactly what
    we want, so the warning is noise; every other transformers message still shows."""

    @staticmethod
    def filter(record) -> bool:
        return "requires torchvision (not installed); falling back to" not in record.getMessage()


def _quiet_torchvision_fallback() -> None:
    import logging

    logging.getLogger("transformers.utils.import_utils").addFilter(_TorchvisionFallbackFilter)


_quiet_torchvision_fallback()
