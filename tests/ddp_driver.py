"""A training script under a multi-process launcher, with what tests/test_distributed.py checks recorded.

    accelerate launch --config_file configs/accelerate/cpu_2proc.yaml tests/ddp_driver.py RECORD_DIR WATCH_DIRS ARGS...

The script is train_network.py, or with DDP_SCRIPT in the environment train_controlnet.py (its
trained modules are recorded: the ControlNet, and the LoRA when one trains), train_dual_unet.py
(its two LoRAs) or train_image_controlnet.py (its model; batches as sample indices, not paths).

Each process writes into RECORD_DIR (outside the training folders):
  rank<R>.safetensors   its trained network's weights at the end
  rank<R>.json          the batches it trained on (epoch, position, share, image paths) and every
                        write it made under WATCH_DIRS (os.pathsep-separated), seen by a Python audit
                        hook: file opens for writing (atomic writes start with one), renames,
                        folder creations and removals.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _path(value) -> str | None:
    if isinstance(value, (str, bytes, os.PathLike)):
        return os.path.abspath(os.fsdecode(value))
    return None


def watch_writes(roots: list[str], writes: list) -> None:
    roots = [os.path.abspath(r) for r in roots]

    def inside(path):
        return path is not None and any(path == r or path.startswith(r + os.sep) for r in roots)

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & _WRITE_FLAGS)
            targets = [_path(path)] if writing else []
        elif event in ("os.rename", "os.mkdir", "os.remove", "os.rmdir", "os.truncate", "shutil.rmtree"):
            targets = [_path(a) for a in args[:2 if event == "os.rename" else 1]]
        else:
            return
        for target in targets:
            if inside(target):
                writes.append([event, target])

    sys.addaudithook(hook)


def main() -> int:
    record_dir, watched, argv = Path(sys.argv[1]), sys.argv[2].split(os.pathsep), sys.argv[3:]
    rank = int(os.environ.get("RANK", "0"))
    writes: list = []
    batches: list = []

    from library.data import loader

    plain_getitem = loader.RunDataset.__getitem__

    def recording_getitem(self, key):
        batch = plain_getitem(self, key)
        shard = batch.get("shard")
        names = batch["image_paths"] if "image_paths" in batch else batch["names"]  # dual_unet: pair names
        batches.append({"epoch": key[0], "position": key[1], "paths": list(names),
                        "shard": list(shard) if shard is not None else None})
        return batch

    loader.RunDataset.__getitem__ = recording_getitem
    watch_writes(watched, writes)

    modules = {}
    if os.environ.get("DDP_SCRIPT") == "train_controlnet":
        from library.controlnet import trainer

        plain_run_stage = trainer.run_stage

        def recording_run_stage(args, stage):
            result = plain_run_stage(args, stage)
            modules.update({k: result[k] for k in ("controlnet", "network") if result.get(k) is not None})
            return result

        trainer.run_stage = recording_run_stage
        import train_controlnet

        train_controlnet.main(argv)
    elif os.environ.get("DDP_SCRIPT") == "train_image_controlnet":
        from library.image_controlnet import steps, train

        plain_rank_batches, plain_prepare = steps.rank_batches, train._prepare_model

        def recording_rank_batches(n, batch_size, world, rank, seed, epoch):
            shares = plain_rank_batches(n, batch_size, world, rank, seed, epoch)
            batches.extend({"epoch": epoch, "position": i, "indices": list(indices), "shard": list(shard)}
                           for i, (indices, shard) in enumerate(shares))
            return shares

        def recording_prepare(*args, **kwargs):
            result = plain_prepare(*args, **kwargs)
            modules["model"] = result[0]
            return result

        steps.rank_batches, train._prepare_model = recording_rank_batches, recording_prepare
        import train_image_controlnet

        train_image_controlnet.main(argv)
    elif os.environ.get("DDP_SCRIPT") == "train_dual_unet":
        import train_dual_unet

        dual = train_dual_unet.main(argv)["dual"]
        modules.update({f"lora_{m}": n for m, n in zip(dual.modalities, dual.networks)})
    else:
        import train_network

        modules["network"] = train_network.main(argv)["network"]
    from safetensors.torch import save_file

    record_dir.mkdir(parents=True, exist_ok=True)
    weights = {f"{name}.{k}": v.detach().contiguous().cpu() for name, module in modules.items()
               for k, v in module.state_dict().items()}
    save_file(weights, str(record_dir / f"rank{rank}.safetensors"))
    (record_dir / f"rank{rank}.json").write_text(json.dumps({"batches": batches, "writes": writes}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
