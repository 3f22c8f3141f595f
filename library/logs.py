"""Progress bar, TensorBoard scalars and the end-of-run summary.

Losses stay on the device between log points, so the training loop has no per-step host sync
unless it logs every step (--log_every_n_steps, default 1 as in kohya). With several processes
the logged losses are the means over all of them (every process calls log_step and end_epoch at
the same points); the bar and the trackers exist on the main process only.
"""
from __future__ import annotations

import sys
import time

import torch

_warned: set[str] = set()


def warn_once(message: str) -> None:
    """Print a warning for the user once per process (no source-line noise as with `warnings`)."""
    if message not in _warned:
        _warned.add(message)
        print(f"warning: {message}", file=sys.stderr, flush=True)


class ProgressLogger:
    def __init__(self, accelerator, desc: str = "steps", average_window: int = 100):
        self.accelerator = accelerator
        self.desc = desc
        self.window = average_window
        self.recent: list[float] = []
        self.pending: list[torch.Tensor] = []
        self.bar = None
        self.started = None
        self.first_step_at = None
        self.last_loss = float("nan")
        self.epoch_values: list[float] = []     # the current epoch's losses (loss/epoch is their mean)
        self.step_end_times: list[float] = []   # perf_counter at the end of each optimizer step

    def start(self, total: int, initial: int = 0):
        from tqdm.auto import tqdm

        self.started = time.perf_counter()
        self.bar = tqdm(total=total, initial=initial, desc=self.desc, smoothing=0.1, dynamic_ncols=True,
                        disable=not self.accelerator.is_local_main_process)

    def add_loss(self, loss: torch.Tensor):
        self.pending.append(loss)

    def tick(self):
        now = time.perf_counter()
        if self.first_step_at is None:
            self.first_step_at = now
        self.step_end_times.append(now)
        self.bar.update(1)

    def _flush(self) -> None:
        """One sync for all micro-batches since the last flush (and one collective with several
        processes: each loss becomes the mean over the processes)."""
        if not self.pending:
            return
        values = torch.stack([p.float() for p in self.pending])
        self.pending.clear()
        processes = getattr(self.accelerator, "num_processes", 1)
        if processes > 1:  # the sum over processes, written here because logs sits below library/training
            import torch.distributed as dist

            dist.all_reduce(values)
            values = values / processes
        values = values.cpu().tolist()
        self.last_loss = sum(values) / len(values)
        self.recent.extend(values)
        self.recent = self.recent[-self.window:]
        self.epoch_values.extend(values)

    def log(self, metrics: dict, step: int) -> None:
        """Scalars to the trackers (main process only, as accelerate logs)."""
        if metrics and self.accelerator.trackers:
            self.accelerator.log({k: float(v) for k, v in metrics.items()}, step=step)

    def log_step(self, step: int, epoch: int, lrs: dict, extra: dict | None = None) -> dict:
        """Log a step's losses, lrs and `extra`; returns what was logged."""
        self._flush()
        avg = sum(self.recent) / max(1, len(self.recent))
        logs = {"loss/current": self.last_loss, "loss/average": avg, **lrs}
        for key, value in (extra or {}).items():
            logs[key] = float(value)
        self.log(logs, step)
        first_lr = next(iter(lrs.values()), None)
        post = {"loss": f"{self.last_loss:.4f}", "avr_loss": f"{avg:.4f}"}
        if first_lr is not None:
            post["lr"] = f"{first_lr:.3g}"
        self.bar.set_postfix(post, refresh=False)
        self.tick()
        return logs

    def end_epoch(self, epoch: int) -> float | None:
        """Log and return loss/epoch, the mean loss of the epoch's steps (None without any)."""
        self._flush()
        if not self.epoch_values:
            return None
        value = sum(self.epoch_values) / len(self.epoch_values)
        self.epoch_values = []
        self.log({"loss/epoch": value}, step=self.bar.n)
        return value

    def close(self):
        if self.bar is not None:
            self.bar.close()

    @property
    def average_loss(self) -> float:
        return sum(self.recent) / max(1, len(self.recent)) if self.recent else float("nan")


def format_summary(title: str, rows: list[tuple[str, object]]) -> str:
    width = max(len(k) for k, _ in rows) if rows else 0
    lines = [title, "-" * len(title)]
    lines += [f"  {k.ljust(width)}  {v}" for k, v in rows]
    return "\n".join(lines)


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")
