"""Drift test of the one tracker path (library.training.run.Run.start_trackers -> accel.init_trackers):
--log_config, --wandb_run_name and --log_tracker_config take effect in every diffusion trainer, seen
through a stand-in wandb package that records its calls."""
from __future__ import annotations

from library.dual_unet import toy
from tests.controlnet_support import radar_listing
from tests.helpers import run_train_network, write_image_folder
from tests.test_logging import fake_wandb  # noqa: F401  (the fixture)

FLAGS = ["--log_with=wandb", "--wandb_run_name=my run", "--log_config"]


def tracker_config(tmp_path):
    path = tmp_path / "trackers.toml"
    path.write_text('[wandb]\ntags = ["drift"]\n')
    return f"--log_tracker_config={path}"


def wandb_init_and_config():
    import wandb

    (init,) = [c for c in wandb.calls if c[0] == "init"]
    configs = [c[1] for c in wandb.calls if c[0] == "config"]
    assert ("finish",) in wandb.calls
    return init[1], configs


def test_train_network_tracker_flags(fake_wandb, tiny_model, tmp_path):  # noqa: F811
    write_image_folder(tmp_path / "data", "1_sks disk", count=1)
    run_train_network([f"--pretrained_model_name_or_path={tiny_model.single_file}",
                       f"--train_data_dir={tmp_path / 'data'}", f"--output_dir={tmp_path / 'out'}",
                       "--resolution=64", "--network_dim=2", "--max_train_steps=1", "--seed=1",
                       "--caption_extension=.txt", "--max_data_loader_n_workers=0", *FLAGS, tracker_config(tmp_path)])
    kwargs, configs = wandb_init_and_config()
    assert kwargs == {"project": "network_train", "name": "my run", "tags": ["drift"]}
    assert configs and configs[0]["network_dim"] == 2


def test_train_controlnet_tracker_flags(fake_wandb, tiny_model, tmp_path):  # noqa: F811
    import train_controlnet
    from library.training.accel import reset_accelerate

    data = radar_listing(tmp_path / "radar", [((64, 64), (20, 40)), ((64, 64), (30, 30))], val=())
    reset_accelerate()
    train_controlnet.main(["--pretrained_model_name_or_path", str(tiny_model.diffusers_dir), "--train_data_dir",
                           str(data), "--output_dir", str(tmp_path / "out"), "--resolution", "64",
                           "--train_batch_size", "2", "--seed", "1", "--max_train_steps", "1", "--log_prefix", "p_",
                           *FLAGS, tracker_config(tmp_path)])
    kwargs, configs = wandb_init_and_config()
    assert kwargs["project"].startswith("p_controlnet_controlnet") and kwargs["project"][-14:].isdigit()
    assert {k: v for k, v in kwargs.items() if k != "project"} == {"name": "my run", "tags": ["drift"]}
    assert configs and configs[0]["max_train_steps"] == 1


def test_train_dual_unet_tracker_flags(fake_wandb, tiny_model, tmp_path):  # noqa: F811
    import train_dual_unet
    from library.training.accel import reset_accelerate

    data = toy.write_pair_dataset(tmp_path / "pairs", count=4, size=64)
    reset_accelerate()
    train_dual_unet.main(["--pretrained_model_name_or_path", str(tiny_model.diffusers_dir), "--data_dir", str(data),
                          "--output_dir", str(tmp_path / "out"), "--resolution", "64", "--train_batch_size", "2",
                          "--unet_lora_rank", "2", "--seed", "1", "--max_steps", "1", "--log_tracker_name", "duo",
                          *FLAGS, tracker_config(tmp_path)])
    kwargs, configs = wandb_init_and_config()
    assert kwargs["project"].startswith("duo") and kwargs["project"][-14:].isdigit()
    assert {k: v for k, v in kwargs.items() if k != "project"} == {"name": "my run", "tags": ["drift"]}
    assert configs and configs[0]["unet_lora_rank"] == 2
