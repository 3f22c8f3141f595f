"""One training epoch and one validation pass.

Accumulation: the batches of an epoch are cut into groups of --gradient_accumulation_steps; each
sample's loss is divided by the number of samples in its group, so a group's summed gradient is
exactly the gradient of the mean over the group: k x b equals one batch of k*b, and a short last
group is not over- or under-weighted. Data order per epoch is a permutation seeded by (seed, epoch),
so a resumed run sees the same order an uninterrupted one would.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
from torch.utils.data import DataLoader

from library.errors import UserError
from library.image_controlnet.losses import image_loss, pose_loss, psnr
from library.image_controlnet.model import POSE_SCALE


def autocast_for(device: torch.device, use_amp: bool):
    """fp16 autocast on CUDA; bf16 on the CPU (fp16 matmuls are slow or missing there)."""
    if not use_amp:
        return nullcontext()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen).tolist()


def group_sizes(n: int, batch_size: int, accum: int) -> list[int]:
    """Samples in each accumulation group of an epoch of n samples."""
    batches = [batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size else [])
    return [sum(batches[i:i + accum]) for i in range(0, len(batches), accum)]


def make_loader(dataset, batch_size: int, num_workers: int, order=None, device=None) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, sampler=order, shuffle=False, num_workers=num_workers,
                      pin_memory=device is not None and device.type == "cuda")


def batches(loader):
    """Iterate a DataLoader; a UserError raised in a worker process comes back as the same clean
    paragraph (the DataLoader wraps it in the worker's traceback text)."""
    it = iter(loader)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except UserError as err:
            text = str(err)
            marker = "UserError: "
            raise UserError(text[text.rindex(marker) + len(marker):] if marker in text else text) from None
        yield batch


def compute_losses(model, batch, loss_type: str, pose_weight: float):
    """Per-sample (total, image, pose) losses and the generated images."""
    generated, pred_pose = model(batch["source"], batch["target_pose"])
    img = image_loss(generated, batch["target"], loss_type)
    pose = pose_loss(pred_pose, batch["target_pose"])
    return img + pose_weight * pose, img, pose, generated, pred_pose


def train_epoch(model, dataset, optimizer, scheduler, scaler, *, epoch: int, args, device, params,
                progress=None) -> tuple[dict, int]:
    """Train one epoch; returns (mean train metrics, optimizer steps taken)."""
    model.train()
    sizes = group_sizes(len(dataset), args.batch_size, args.gradient_accumulation_steps)
    order = epoch_order(len(dataset), args.seed, epoch)
    loader = make_loader(dataset, args.batch_size, args.num_workers, order, device)
    sums = torch.zeros(3, dtype=torch.float64)
    steps = 0
    in_group = 0
    optimizer.zero_grad(set_to_none=True)
    for i, batch in enumerate(batches(loader)):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        group = i // args.gradient_accumulation_steps
        with autocast_for(device, args.use_amp):
            total, img, pose, _, _ = compute_losses(model, batch, args.loss_type, args.pose_loss_weight)
        scaler.scale(total.sum() / sizes[group]).backward()
        sums += torch.stack([total.detach().sum(), img.detach().sum(), pose.detach().sum()]).double().cpu()
        in_group += 1
        if in_group == args.gradient_accumulation_steps or i == len(loader) - 1:
            if args.max_grad_norm > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            in_group = 0
            steps += 1
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{float(total.detach().mean()):.4f}", refresh=False)
    n = max(1, len(dataset))
    means = (sums / n).tolist()
    return {"train_loss": means[0], "train_image_loss": means[1], "train_pose_loss": means[2]}, steps


@torch.no_grad()
def evaluate(model, dataset, *, args, device) -> dict:
    """Mean validation metrics, including the copy-the-source baseline PSNR and the pose head's error."""
    model.eval()
    loader = make_loader(dataset, args.batch_size, args.num_workers, None, device)
    keys = ("val_loss", "val_image_loss", "val_pose_loss", "val_psnr", "val_copy_psnr", "val_pose_error_deg")
    sums = dict.fromkeys(keys, 0.0)
    for batch in batches(loader):
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast_for(device, args.use_amp):
            total, img, pose, generated, pred_pose = compute_losses(model, batch, args.loss_type, args.pose_loss_weight)
        err = (pred_pose.float() * POSE_SCALE - batch["target_pose"]).abs().mean(1)
        for key, value in zip(keys, (total, img, pose, psnr(generated, batch["target"]),
                                     psnr(batch["source"], batch["target"]), err)):
            sums[key] += float(value.float().sum())
    return {k: v / max(1, len(dataset)) for k, v in sums.items()}


@torch.no_grad()
def generate(model, dataset, indices, *, device, use_amp: bool):
    """(sources, targets, generated) for the listed validation samples, for TensorBoard images."""
    model.eval()
    items = [dataset[i] for i in indices]
    source = torch.stack([it["source"] for it in items]).to(device)
    target = torch.stack([it["target"] for it in items]).to(device)
    pose = torch.stack([it["target_pose"] for it in items]).to(device)
    with autocast_for(device, use_amp):
        generated, _ = model(source, pose)
    return source, target, generated.float()
