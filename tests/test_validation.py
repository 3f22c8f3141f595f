"""Validation loss (--validation_split): a seeded, disjoint held-out set scored with fixed noise."""
from __future__ import annotations

import torch

from library.data import build_dataset_group, dataset_configs_from_args
from library.training.validation import split_validation, validation_loss
from tests.helpers import run_train_network, write_image_folder
from tests.test_train_network import base_args


def _group(tmp_path):
    import train_network
    from library import args as A

    data = tmp_path / "data"
    write_image_folder(data, "2_sks disk", count=6)
    write_image_folder(tmp_path / "reg", "1_disk", count=2, seed=5)
    args = A.parse_args(train_network.setup_parser(), [f"--train_data_dir={data}", f"--reg_data_dir={tmp_path / 'reg'}",
                                                        "--resolution=64", "--caption_extension=.txt"])
    return build_dataset_group(dataset_configs_from_args(args), seed=0)


def test_split_is_seeded_disjoint_and_keeps_reg_images(tmp_path):
    group = _group(tmp_path)
    train, val = split_validation(group, 0.34, seed=3)
    again_train, again_val = split_validation(group, 0.34, seed=3)
    held = {r.path for r in val.images}
    assert held == {r.path for r in again_val.images} and len(held) == 2
    assert held.isdisjoint({r.path for r in train.images})
    assert all(not r.is_reg and r.repeats == 1 for r in val.images)
    assert sum(r.is_reg for r in train.images) == sum(r.is_reg for r in group.images)
    assert split_validation(group, 0.0, seed=3) == (group, None)


def test_validation_loss_is_the_same_number_for_the_same_weights(tmp_path):
    _, val = split_validation(_group(tmp_path), 0.5, seed=1)
    weights = torch.nn.Linear(3, 1)

    def compute(batch, generator):
        noise = torch.randn(len(batch["captions"]), 3, generator=generator)
        return weights(noise).pow(2).mean()

    first = validation_loss(val, 7, compute, torch.device("cpu"))
    assert first == validation_loss(val, 7, compute, torch.device("cpu"))
    assert first != validation_loss(val, 8, compute, torch.device("cpu"))


def test_validation_loss_reaches_tensorboard(tiny_model, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = tmp_path / "data"
    write_image_folder(data, "1_sks disk", count=4)
    logs = tmp_path / "logs"
    run_train_network(base_args(tiny_model.single_file, data, tmp_path / "out", "--max_train_epochs=2",
                                "--validation_split=0.5", f"--logging_dir={logs}", "--log_with=tensorboard",
                                "--cache_latents"))
    events = sorted(logs.rglob("events.out.tfevents.*"))
    tags = set()
    for path in events:
        acc = EventAccumulator(str(path))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
        if "loss/validation" in acc.Tags()["scalars"]:
            values = acc.Scalars("loss/validation")
            assert len(values) == 2 and all(v.value > 0 for v in values)  # one per epoch
    assert "loss/validation" in tags
