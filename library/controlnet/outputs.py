"""What a ControlNet training stage writes, and where.

    <output_dir>/controlnet/                    diffusers ControlNetModel folder (+ training_config.json)
    <output_dir>/<name>.safetensors             single-file ControlNet (controlnet stage) or kohya LoRA (unet_lora)
    <output_dir>/lora/                          diffusers/PEFT copy of the LoRA (+ training_config.json)
    joint mode: <name>_controlnet.safetensors and <name>_lora.safetensors (both are trained)
    <output_dir>/<name>-step00000100/, <name>-000005/   numbered checkpoints, same layout (keep-last-N)
    <output_dir>/best/                          the checkpoint with the best monitored metric
    <output_dir>/training_complete.json         written last: the stage finished (the pipeline checks it)
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from library.controlnet import lora_io
from library.controlnet.model import RECORD_NAME, save_controlnet, save_controlnet_single_file
from library.errors import UserError
from library.fileio import write_json_atomic
from library.training.checkpoint import model_file_name, prune_old

COMPLETE_MARKER = "training_complete.json"


def save_dtype(args):
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16, "float": torch.float32}.get(args.save_precision)


class StageWriter:
    def __init__(self, args, stage, output_dir, controlnet, network, unet, text_encoder, ctype, group,
                 optimizer_desc, max_train_steps, num_epochs, mixed_precision, say=print):
        self.args, self.stage, self.output_dir = args, stage, Path(output_dir)
        self.controlnet, self.network, self.unet, self.text_encoder = controlnet, network, unet, text_encoder
        self.say, self.files, self.name = say, [], args.output_name
        self.written: set[str] = set()  # numbered folders this process wrote: the only ones pruning deletes
        both = controlnet is not None and network is not None
        self.cn_file = f"{self.name}_controlnet.safetensors" if both else f"{self.name}.safetensors"
        self.lora_file = f"{self.name}_lora.safetensors" if both else f"{self.name}.safetensors"
        self.record = {**ctype.describe(), "stage": stage, "resolution": list(args.resolution or (512, 512)),
                       "pretrained_model_name_or_path": str(Path(args.pretrained_model_name_or_path).resolve()),
                       "loss_weight_factor": args.loss_weight_factor, "use_focal_loss": bool(args.use_focal_loss),
                       "controlnet_path": args.controlnet_path or args.controlnet_model_name_or_path}
        if network is not None:
            self.record.update(lora_rank=args.lora_rank, lora_alpha=args.lora_alpha or args.lora_rank)
            self.lora_meta = self._lora_metadata(group, optimizer_desc, max_train_steps, num_epochs, mixed_precision)

    def _lora_metadata(self, group, optimizer_desc, max_train_steps, num_epochs, mixed_precision) -> dict:
        from library.training import metadata as meta_mod

        a = self.args
        ns = argparse.Namespace(**{**vars(a), "network_module": "networks.lora", "network_dim": a.lora_rank,
                                   "network_alpha": a.lora_alpha or a.lora_rank, "network_dropout": None,
                                   "text_encoder_lr": None, "unet_lr": a.lora_learning_rate or a.learning_rate})
        meta = meta_mod.training_metadata(ns, group_meta=group.metadata(), optimizer_desc=optimizer_desc,
                                          max_train_steps=max_train_steps, num_epochs=num_epochs,
                                          num_batches_per_epoch=group.num_batches_per_epoch, network_args={},
                                          mixed_precision=mixed_precision)
        meta["ss_training_comment"] = json.dumps({"controlnet": self.record["controlnet_path"],
                                                  "conditioning": self.record.get("conditioning_type")})
        return meta

    def folder_for(self, kind: str, epoch: int, step: int) -> Path:
        if kind == "final":
            return self.output_dir
        if kind == "best":
            return self.output_dir / "best"
        numbered = {"epoch": epoch} if kind == "epoch" else {"step": step}
        return self.output_dir / Path(model_file_name(self.name, "x", **numbered)).stem

    def save(self, kind: str, epoch: int, step: int) -> Path:
        from library.training import metadata as meta_mod

        if kind == "top":
            return self._save_top(step)
        folder = self.folder_for(kind, epoch, step)
        record = {**self.record, "epoch": epoch, "step": step}
        dtype = save_dtype(self.args)
        if self.controlnet is not None:
            self.files.append(save_controlnet(self.controlnet, folder / "controlnet", record, dtype))
            single = save_controlnet_single_file(self.controlnet, folder / self.cn_file, record, dtype)
            if single:
                self.files.append(single)
        if self.network is not None:
            from library.lora_tools.verify import check_saved_lora

            path = folder / self.lora_file
            self.network.save_weights(str(path), dtype, meta_mod.for_save(self.lora_meta, epoch, step))
            check_saved_lora(path, self.unet, self.text_encoder)  # the kohya file contract, on every file
            self.files.append(path)
            self.files.append(lora_io.save_peft_copy(self.network, self.unet, folder / "lora", dtype))
            write_json_atomic(folder / "lora" / RECORD_NAME, record)
        if kind in ("step", "epoch"):
            self.written.add(folder.name)
            self._prune(kind)
        self.say(f"saved {kind} checkpoint in {folder}")
        return folder

    def _save_top(self, step: int) -> Path:
        """--save_top_k: one file (the loop deletes it when it drops out of the k best): the ControlNet
        as a single file, or in the LoRA stage the kohya LoRA file."""
        from library.fileio import save_safetensors_atomic
        from library.training import metadata as meta_mod
        from library.training.checkpoint import top_k_file_name

        path = self.output_dir / top_k_file_name(self.name, "safetensors", step)
        record, dtype = {**self.record, "step": step}, save_dtype(self.args)
        if self.controlnet is None:
            self.network.save_weights(str(path), dtype, meta_mod.for_save(self.lora_meta, 0, step))
        elif save_controlnet_single_file(self.controlnet, path, record, dtype) is None:
            # shapes without the original layout (toy models only): diffusers' keys in one file
            save_safetensors_atomic({k: v.detach().to("cpu", dtype or v.dtype).contiguous()
                                     for k, v in self.controlnet.state_dict().items()}, path)
        self.say(f"saved top-k file {path}")
        return path

    def _prune(self, kind: str) -> None:
        a = self.args
        if kind == "epoch":
            keep = a.checkpoints_total_limit or a.save_last_n_epochs
        else:
            keep = a.checkpoints_total_limit or (max(1, a.save_last_n_steps // a.save_every_n_steps)
                                                 if a.save_last_n_steps and a.save_every_n_steps else None)
        if keep:
            for gone in prune_old(self.output_dir, self.name, kind, keep, "", only=self.written):
                self.written.discard(gone.name)

    def finish(self, steps: int, epochs: int, history: list, controlnet_unchanged) -> None:
        write_json_atomic(self.output_dir / COMPLETE_MARKER, {
            "stage": self.stage, "steps": steps, "epochs": epochs, "record": self.record,
            "files": [str(f) for f in self.files], "history": history,
            "controlnet_unchanged": controlnet_unchanged})

    def summary_rows(self) -> list:
        rows = []
        if self.controlnet is not None:
            rows.append(("ControlNet", f"{self.output_dir / 'controlnet'}  and  {self.output_dir / self.cn_file}"))
        if self.network is not None:
            rows.append(("UNet LoRA", f"{self.output_dir / self.lora_file} (kohya)  and  {self.output_dir / 'lora'} "
                                      "(diffusers)"))
        return rows


def state_folders(output_dir) -> list[tuple[int, Path]]:
    """(global step, folder) of every usable state folder in output_dir, oldest first (damaged ones
    are skipped with a note)."""
    from library.training.checkpoint import usable_states

    return usable_states(Path(output_dir).glob("*-state"))


def resolve_resume(resume, output_dir, output_name) -> str | None:
    """--resume PATH, or --resume latest: the newest state folder in --output_dir (none: a fresh start)."""
    if not resume:
        return None
    if resume != "latest":
        if not Path(resume).is_dir():
            raise UserError("the --resume folder does not exist.", path=resume,
                            fix="pass a '-state' folder written by --save_state, or --resume latest.")
        return str(resume)
    states = state_folders(output_dir)
    if not states:
        print(f"note: --resume latest: no state folder in {output_dir} yet, starting from the beginning.", flush=True)
        return None
    print(f"resuming from the newest state: {states[-1][1]} (step {states[-1][0]})", flush=True)
    return str(states[-1][1])


def is_complete(output_dir) -> bool:
    return (Path(output_dir) / COMPLETE_MARKER).is_file()
