"""Trainable networks (`--network_module networks.lora`)."""
