"""One training epoch and one validation pass.

Accumulation: the batches of an epoch are cut into groups of --gradient_accumulation_steps; each
sample's loss is divided by the number of samples in its group, so a group's summed gradient is
exactly the gradient of the mean over the group: k x b equals one batch of k*b, and a short last
group is not over- or under-weighted. Data order per epoch is a permutation seeded by (seed, epoch),
so a resumed run sees the same order an uninterrupted one would.

Several processes (`procs`: accelerate's PartialState, see library.training.accel): a batch is global
(--batch_size x processes, cut from the same permutation on every process) and each process trains
on its contiguous share of it (library.data.loader.shard_bounds; a process left without an item gets
a copy with weight 0). Each process's loss is scaled by the number of processes, and averaging the
gradients then gives exactly the sum over the global group: a run equals one process with the
batch size multiplied by the number of processes. Metrics are summed over the processes.

Debugging aids (Lightning's names): `overfit_batches` N trains every epoch on the first N batches of
epoch 0; `max_steps` stops an epoch after that many optimizer steps and `max_batches` a validation
after that many batches (--fast_dev_run).
"""
from __future__ import annotations

import os
from contextlib import nullcontext

import torch
from torch.utils.data import DataLoader

from library.errors import UserError
from library.image_controlnet.losses import image_loss, pose_loss, psnr
from library.image_controlnet.model import POSE_SCALE


def autocast_for(device: torch.device, amp):
    """`amp`: an autocast dtype (from amp_dtype), None/False for none, or True for --use_amp's choice:
    fp16 on CUDA, bf16 on the CPU (fp16 matmuls are slow or missing there)."""
    if amp is True:
        amp = torch.float16 if device.type == "cuda" else torch.bfloat16
    if amp is None or amp is False:
        return nullcontext()
    return torch.autocast(device.type, dtype=amp)


def amp_dtype(args, device: torch.device, warn=None) -> torch.dtype | None:
    """The run's autocast dtype: --mixed_precision (or Lightning's --precision) by name, else what
    --use_amp picks. fp16 needs CUDA: elsewhere fp32 with a warning, as in the other trainers."""
    from library.training.accel import apply_precision_alias, resolve_mixed_precision

    if args.use_amp and getattr(args, "precision", None) in ("32", "32-true"):
        raise UserError(f"--use_amp asks for mixed precision, --precision {args.precision} for none.",
                        fix="pass only one of the two flags.")
    apply_precision_alias(args)
    mixed = getattr(args, "mixed_precision", "no")
    if mixed == "no":
        if args.use_amp and device.type == "cpu" and warn is not None:
            warn("--use_amp without a CUDA GPU: training uses bf16 autocast on the CPU.")
        return (torch.float16 if device.type == "cuda" else torch.bfloat16) if args.use_amp else None
    mixed = resolve_mixed_precision(mixed, device.type)  # warns for fp16 without CUDA
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen).tolist()


def rank_batches(n: int, batch_size: int, world: int, rank: int, seed: int, epoch: int) -> list:
    """(sample indices, Shard) of this process's share of each global batch (batch_size x world) of
    the epoch; with one process, the epoch's batches."""
    from library.data.loader import shard_bounds

    order, size = epoch_order(n, seed, epoch), batch_size * world
    out = []
    for k in range(0, n, size):
        batch = order[k:k + size]
        shard = shard_bounds(len(batch), rank, world)
        out.append((batch[shard.offset:shard.offset + shard.count], shard))
    return out


def _sum_over(procs, values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over the processes (on their device: NCCL reduces only CUDA tensors); returns it on the CPU."""
    if procs is None or procs.num_processes <= 1:
        return values.cpu()
    from library.training.accel import reduce_sum

    return reduce_sum(procs, values.to(procs.device)).cpu()


def group_sizes(n: int, batch_size: int, accum: int, max_batches: int | None = None) -> list[int]:
    """Samples in each accumulation group of an epoch of n samples (of its first `max_batches` batches)."""
    batches = [batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size else [])
    batches = batches[:max_batches]
    return [sum(batches[i:i + accum]) for i in range(0, len(batches), accum)]


def workers(num_workers: int) -> int:
    """--num_workers capped at the CPU count: more only compete (and torch warns about it every epoch)."""
    return max(0, min(int(num_workers), os.cpu_count() or 1))


def make_loader(dataset, batch_size: int, num_workers: int, order=None, device=None) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, sampler=order, shuffle=False, num_workers=workers(num_workers),
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
                progress=None, procs=None, amp=None, overfit_batches: int = 0, max_steps: int | None = None,
                on_step=None, guard=None, first_step: int = 1) -> tuple[dict, int]:
    """Train one epoch; returns (mean train metrics, optimizer steps taken). `amp`: the autocast dtype
    (None: --use_amp's choice); `on_step(steps taken, loss)` after every optimizer step, where `loss()`
    reads the mean loss of that step's samples here (a host sync, so only when it is logged).
    `guard`: a library.training.loop.DivergenceGuard (NaN/Inf steps skipped, the run stopped after
    its patience); `first_step`: the number of this epoch's first optimizer step, for its messages."""
    world, rank = (procs.num_processes, procs.process_index) if procs is not None else (1, 0)
    amp = args.use_amp if amp is None else amp
    model.train()
    overfit = overfit_batches or None
    sizes = group_sizes(len(dataset), args.batch_size * world, args.gradient_accumulation_steps, overfit)
    # overfit_batches: epoch 0's order every epoch, cut to its first N batches
    shares = rank_batches(len(dataset), args.batch_size, world, rank, args.seed, 0 if overfit else epoch)[:overfit]
    loader = DataLoader(dataset, batch_sampler=[indices for indices, _ in shares],
                        num_workers=workers(args.num_workers), pin_memory=device.type == "cuda")
    # total, image, pose loss; samples (a short run trains fewer). On the device: no host sync per batch.
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    group_sums = torch.zeros(2, dtype=torch.float64, device=device)
    steps = 0
    in_group = 0
    optimizer.zero_grad(set_to_none=True)
    for i, batch in enumerate(batches(loader)):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        group = i // args.gradient_accumulation_steps
        padded = shares[i][1].padded
        with autocast_for(device, amp):
            total, img, pose, _, _ = compute_losses(model, batch, args.loss_type, args.pose_loss_weight)
        # x world: the average of the gradients over the processes is then the sum over the global group
        scaler.scale(total.sum() / sizes[group] * (0.0 if padded else float(world))).backward()
        if not padded:
            part = torch.stack([total.detach().sum(), img.detach().sum(), pose.detach().sum(),
                                torch.tensor(float(len(total)), device=device)]).double()
            sums += part
            group_sums += part[[0, 3]]
        in_group += 1
        if in_group == args.gradient_accumulation_steps or i == len(shares) - 1:
            if procs is not None:
                from library.training.accel import average_gradients

                average_gradients(procs, params)
            scaler.unscale_(optimizer)
            if args.max_grad_norm > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            else:
                grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            ok = guard is None or guard.step_ok(group_sums[0], grad_norm, first_step + steps)
            if ok or scaler.is_enabled():  # an enabled scaler skips non-finite steps itself
                scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            in_group = 0
            steps += 1
            done = group_sums.clone()

            def loss(done=done) -> float:
                return float(done[0] / done[1].clamp(min=1.0))

            if progress is not None:
                progress.update(1)
                if steps % args.log_every_n_steps == 0:  # a host sync: only when logged
                    progress.set_postfix(loss=f"{loss():.4f}", refresh=False)
            if on_step is not None:
                on_step(steps, loss)
            group_sums.zero_()
            if max_steps is not None and steps >= max_steps:
                break
    totals = _sum_over(procs, sums)
    means = (totals[:3] / max(1.0, float(totals[3]))).tolist()
    return {"train_loss": means[0], "train_image_loss": means[1], "train_pose_loss": means[2]}, steps


@torch.no_grad()
def evaluate(model, dataset, *, args, device, procs=None, amp=None, max_batches: int | None = None) -> dict:
    """Mean validation metrics, including the copy-the-source baseline PSNR and the pose head's error;
    with several processes each scores every N-th sample and the sums are added up. `max_batches`
    (--fast_dev_run): only the first samples, as many as that many batches hold."""
    model.eval()
    amp = args.use_amp if amp is None else amp
    if max_batches is not None:
        dataset = torch.utils.data.Subset(dataset, range(min(len(dataset), max_batches * args.batch_size)))
    part = dataset
    if procs is not None and procs.num_processes > 1:
        part = torch.utils.data.Subset(dataset, range(procs.process_index, len(dataset), procs.num_processes))
    loader = make_loader(part, args.batch_size, args.num_workers, None, device)
    keys = ("val_loss", "val_image_loss", "val_pose_loss", "val_psnr", "val_copy_psnr", "val_pose_error_deg")
    sums = dict.fromkeys(keys, 0.0)
    for batch in batches(loader):
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast_for(device, amp):
            total, img, pose, generated, pred_pose = compute_losses(model, batch, args.loss_type, args.pose_loss_weight)
        err = (pred_pose.float() * POSE_SCALE - batch["target_pose"]).abs().mean(1)
        for key, value in zip(keys, (total, img, pose, psnr(generated, batch["target"]),
                                     psnr(batch["source"], batch["target"]), err)):
            sums[key] += float(value.float().sum())
    totals = _sum_over(procs, torch.tensor([sums[k] for k in keys], dtype=torch.float64)).tolist()
    return {k: v / max(1, len(dataset)) for k, v in zip(keys, totals)}


@torch.no_grad()
def generate(model, dataset, indices, *, device, amp):
    """(sources, targets, generated) for the listed validation samples, for TensorBoard images;
    `amp` as for autocast_for."""
    model.eval()
    items = [dataset[i] for i in indices]
    source = torch.stack([it["source"] for it in items]).to(device)
    target = torch.stack([it["target"] for it in items]).to(device)
    pose = torch.stack([it["target_pose"] for it in items]).to(device)
    with autocast_for(device, amp):
        generated, _ = model(source, pose)
    return source, target, generated.float()
