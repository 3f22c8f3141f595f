"""Shared pieces of the training scripts: models, data, training loop, saving, logging."""
import os

# Never touch a model hub: everything we need ships with the project or is a local file.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("DISABLE_TELEMETRY", "1")
