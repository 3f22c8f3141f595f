"""Two UNets over one frozen base, each with its own LoRA, and loading them back from a checkpoint.

Why two UNet objects: networks.lora patches each layer's `forward` in place (kohya's design).
Applying two networks to one UNet would stack both updates in every forward, and switching one
off (as peft's set_adapter does) silently leaves only one adapter with gradients when a loss needs
both (huggingface/peft#2436). So the second UNet is a *twin*: a new module tree whose parameters
and buffers are the very tensors of the first (no copy, no extra memory). Each twin gets its own
network, so a forward through UNet b runs only LoRA b, and one backward reaches both.

The twin must be made after the base UNet is on its device and dtype: `.to()` replaces tensors,
which would silently end the sharing (`shares_weights` checks it).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from library.errors import UserError

INFO_FILE = "dual_unet.json"
STATE_DIR = "state"


def twin_unet(unet):
    """A second UNet whose every parameter and buffer is the same tensor as `unet`'s."""
    from accelerate import init_empty_weights

    with init_empty_weights():  # parameters on the meta device: nothing allocated
        twin = type(unet).from_config(unet.config)
    twin.load_state_dict(unet.state_dict(), strict=True, assign=True)  # assign: take the tensors, no copy
    twin.requires_grad_(False)
    twin.train(unet.training)
    return twin


def shares_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].data_ptr() == sb[k].data_ptr() for k in sa)


@dataclass
class DualUNet:
    modalities: tuple[str, str]
    unets: list  # [unet a, unet b]; b is a twin of a
    networks: list  # [LoRANetwork a, LoRANetwork b]
    prompts: tuple[str, str] = ("", "")
    hidden: list = field(default_factory=list)  # text-encoder states of each modality's prompt [1, T, D]

    def trainable(self) -> torch.nn.ModuleDict:
        """Both networks as one module: its state_dict holds both LoRAs (keys a.*, b.*)."""
        return torch.nn.ModuleDict({"a": self.networks[0], "b": self.networks[1]})


@torch.no_grad()
def encode_prompts(model, prompts, device, clip_skip=None) -> list[torch.Tensor]:
    from library.models.text import encode_captions

    model.text_encoder.to(device)
    return [encode_captions(model.tokenizer, model.text_encoder, [p], clip_skip, device) for p in prompts]


def attach(model, modalities, make_network, prompts=("", ""), device="cpu", clip_skip=None) -> DualUNet:
    """Twin the (already placed) base UNet and give each UNet its network: make_network(unet) -> net."""
    unets = [model.unet, twin_unet(model.unet)]
    networks = []
    for unet in unets:
        network = make_network(unet)
        network.apply_to(model.text_encoder, unet, apply_text_encoder=False, apply_unet=True)
        networks.append(network)
    dual = DualUNet(tuple(modalities), unets, networks, tuple(prompts))
    dual.hidden = encode_prompts(model, prompts, device, clip_skip)
    return dual


def new_networks(rank: int, alpha: float, dropout=None, net_kwargs=None):
    """The make_network for training: a fresh kohya LoRA of --unet_lora_rank / --unet_lora_alpha."""
    from networks.lora import create_network

    def make(unet):
        return create_network(1.0, rank, alpha, None, None, unet, neuron_dropout=dropout, **(net_kwargs or {}))
    return make


def read_info(folder) -> dict:
    folder = Path(folder)
    path = folder / INFO_FILE
    if not path.is_file():
        raise UserError(f"{folder} is not a dual-UNet checkpoint (no {INFO_FILE} in it).", path=folder,
                        fix="pass a folder written by train_dual_unet.py, e.g. <run>/best_checkpoint or "
                            "<run>/latest_checkpoints/step_001000.")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        for key in ("modalities", "files", "base_model"):
            info[key]
    except (ValueError, KeyError) as err:
        raise UserError(f"{path} is damaged ({err}).", path=path, fix="use another checkpoint folder.") from None
    return info


def load_for_generation(checkpoint_dir, base_model=None, device="cpu", dtype=torch.float32):
    """(SDModel, DualUNet, info) from a checkpoint folder: its base model (or `base_model`), both LoRAs."""
    from library.models.loading import load_sd_model
    from networks.lora import create_network_from_weights

    folder = Path(checkpoint_dir)
    info = read_info(folder)
    base = base_model or info["base_model"]
    if not Path(base).exists():
        raise UserError(f"the base model the checkpoint was trained on is not at {base}.", path=base,
                        fix="pass its new location with --pretrained_model_name_or_path.")
    model = load_sd_model(base, vae_path=info.get("vae"), v_parameterization=info.get("v_parameterization", False),
                          dtype=dtype, device=device)
    files = [folder / name for name in info["files"]]
    for path in files:
        if not path.is_file():
            raise UserError(f"the checkpoint lacks its LoRA file {path.name}.", path=folder,
                            fix="use a complete checkpoint folder (both LoRA files and dual_unet.json).")

    def make_for(path):
        def make(unet):
            network, _ = create_network_from_weights(1.0, str(path), None, None, unet)
            return network
        return make

    makers = iter([make_for(p) for p in files])
    dual = attach(model, info["modalities"], lambda unet: next(makers)(unet), tuple(info.get("prompts", ("", ""))),
                  device, info.get("clip_skip"))
    for network, path in zip(dual.networks, files):
        network.load_weights(str(path))
        network.to(device, dtype)
        network.eval()
    return model, dual, info
