"""`best_model.pth` / `checkpoint_epoch_N.pth`: tensors and plain values only, read weights-only.

One file holds everything a resume needs: model weights, optimizer, scheduler, AMP scaler, epochs
done, optimizer steps, best validation loss, the per-epoch history (so curves continue), the RNG
states, the --save_top_k list (so a resumed run goes on with it) and the model configuration (so
inference rebuilds the model without the training flags).
`torch.load(weights_only=True)` refuses anything but tensors and plain containers, so a file that
holds arbitrary pickled objects is rejected instead of executed.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch

from library.errors import UserError
from library.fileio import check_finite, torch_save_atomic

FORMAT = "image_controlnet"
FORMAT_VERSION = 1


def plain(value):
    """Arguments as JSON-like values (paths -> str), safe for weights-only loading."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def save_checkpoint(path, *, model, optimizer, scheduler, scaler, epoch: int, global_step: int,
                    best_val_loss: float, history: dict, trainable: dict, args: dict, rng: dict,
                    top_k: list | None = None) -> Path:
    payload = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": int(epoch), "global_step": int(global_step), "best_val_loss": float(best_val_loss),
        "history": {k: [float(v) for v in vals] for k, vals in history.items()},
        "trainable": plain(trainable), "args": plain(args), "rng": rng, "top_k": plain(top_k or []),
    }
    check_finite(payload["model"], path, "model")
    torch_save_atomic(payload, path)
    return Path(path)


def read_checkpoint(path, flag: str = "--resume") -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"the checkpoint {path} given by {flag} does not exist.", path=path,
                        fix="pass a best_model.pth or checkpoint_epoch_N.pth written by train_image_controlnet.py.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"{path} contains pickled Python objects, not only tensors and plain values; it is "
                        "refused because unpickling can run arbitrary code.", path=path,
                        fix=f"pass {flag} a checkpoint written by train_image_controlnet.py.") from None
    except (OSError, RuntimeError, EOFError, ValueError) as err:
        raise UserError(f"cannot read the checkpoint {path} ({err}).", path=path,
                        fix="the file is damaged or incomplete; use an older checkpoint.") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path} is not an ImageControlNet checkpoint.", path=path,
                        fix=f"pass {flag} a best_model.pth or checkpoint_epoch_N.pth from train_image_controlnet.py.")
    if ckpt.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path} has checkpoint format version {ckpt.get('format_version')}, this version "
                        f"reads {FORMAT_VERSION}.", path=path, fix="use the version of the scripts that wrote it.")
    return ckpt


def load_model(path, device="cpu"):
    """Rebuild the model of a checkpoint (for inference); returns (model in eval mode, checkpoint)."""
    from library.image_controlnet.model import ImageControlNet, ModelConfig

    ckpt = read_checkpoint(path, flag="--checkpoint")
    model = ImageControlNet(ModelConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt
