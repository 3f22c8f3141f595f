"""Atomic, checked file writing: every output is written to a temporary file beside it, checked,
then renamed.

Killing the process at any moment leaves either the old file or the new one, never half of one.
Before the rename a .safetensors file is checked complete (its header and data add up) and a torch
zip file readable, and tensors are checked finite before they are written (`check_finite`), so a
broken or NaN file never replaces a good one. A full disk is reported as such (`DiskFullError`:
how much was needed, how much is free), not as a library's cryptic write error.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

from library.errors import UserError


class DiskFullError(UserError):
    """A write failed because the disk is full; the file it would have replaced is untouched."""


def free_bytes(folder) -> int:
    return shutil.disk_usage(folder).free


def format_bytes(n: int | float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def tensor_bytes(obj) -> int:
    """Bytes of all tensors in a (nested) dict / list / tensor: what saving them needs at least."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def _is_disk_full(err: BaseException, folder: Path, needed: int | None) -> bool:
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if "No space left" in str(err) or "os error 28" in str(err):  # safetensors: "I/O error: No space left"
        return True
    if not isinstance(err, (OSError, RuntimeError)):
        return False
    # torch.save reports a full disk as "PytorchStreamWriter failed writing file ...: file write failed"
    try:
        return bool(needed) and free_bytes(folder) < needed
    except OSError:
        return False


def _disk_full(path: Path, needed: int | None) -> DiskFullError:
    folder = path.parent
    try:
        free = format_bytes(free_bytes(folder))
    except OSError:
        free = "unknown"
    need = f"about {format_bytes(needed)}" if needed else "more than is free"
    return DiskFullError(
        f"the disk is full: writing {path.name} in {folder} needs {need}, and {free} are free. Nothing was "
        f"replaced: an existing {path.name} is still the previous, complete version.", path=folder,
        fix="free some space on that disk (or pass an --output_dir on another disk), then run again; with a "
            "state folder, --resume it.")


def nonfinite_tensors(tensors: dict) -> list[str]:
    """Names of the floating-point tensors holding NaN or Inf."""
    import torch

    return [k for k, v in tensors.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v).all()]


def check_finite(tensors: dict, path, what: str = "weights") -> None:
    """Refuse to write NaN/Inf weights to `path` (raise before anything is written)."""
    bad = nonfinite_tensors(tensors)
    if bad:
        raise UserError(f"not saving {Path(path).name}: {len(bad)} of the {len(tensors)} {what} tensors hold NaN "
                        f"or Inf (e.g. {', '.join(bad[:3])}); the training diverged. The file was not written, so "
                        "an existing one keeps its previous, good content.", path=path,
                        fix="lower --learning_rate, keep --max_grad_norm on, or use --mixed_precision bf16 "
                            "instead of fp16; resume from a state folder saved before the divergence.")


def check_complete(path) -> None:
    """Raise OSError unless `path` is a complete file of its kind (.safetensors: header and data
    sizes add up; torch zip (.pt/.pth/.ckpt): the central directory is there). Reads no tensor data."""
    path = Path(path)
    size = path.stat().st_size
    suffix = path.suffix.lower() if not path.name.endswith(".tmp") else Path(path.name[:-4]).suffix.lower()
    if suffix == ".safetensors":
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise OSError(f"{path.name}: truncated safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if 8 + n > size:
                raise OSError(f"{path.name}: truncated safetensors header")
            header = json.loads(fh.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end != size:
            raise OSError(f"{path.name}: safetensors data is {size - 8 - n} bytes, the header says {end}")
    elif suffix in (".pt", ".pth", ".ckpt"):
        import zipfile

        if not zipfile.is_zipfile(path):  # torch.save writes zip files; a cut one has no central directory
            raise OSError(f"{path.name}: not a complete torch file ({size} bytes)")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _sync_file(path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "", needed_bytes: int | None = None):
    """Yield a temporary path in the target's folder; check it (check_complete) and rename it onto
    `path` on success. A full disk raises DiskFullError (`needed_bytes`: the size to report)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=(suffix or path.suffix) + ".tmp",
                               dir=path.parent)
    os.close(fd)
    try:
        try:
            yield Path(tmp)
            _sync_file(tmp)
        except Exception as err:  # safetensors, torch and the OS each word a full disk their own way
            if _is_disk_full(err, path.parent, needed_bytes):
                os.unlink(tmp)  # first, so that the message counts the space it held as free
                raise _disk_full(path, needed_bytes) from None
            raise
        check_complete(tmp)  # a short write never replaces the old file
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs get the usual mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text_atomic(path, text: str, encoding: str = "utf-8") -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding=encoding)


def write_json_atomic(path, obj, **kwargs) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False, **kwargs))


def save_safetensors_atomic(tensors: dict, path, metadata: dict | None = None) -> None:
    """Write finite tensors (check_finite) to a checked .safetensors file."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    check_finite(tensors, path)
    with atomic_path(path, needed_bytes=tensor_bytes(tensors)) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def torch_save_atomic(obj, path) -> None:
    import torch

    with atomic_path(path, needed_bytes=tensor_bytes(obj)) as tmp:
        torch.save(obj, tmp)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, needed_bytes: int | None = None):
    """Yield a temporary folder beside `path`; on success replace `path` with it.

    The old folder is moved aside first and deleted only after the new one is in place. Every
    file in the new folder is checked complete first; a full disk raises DiskFullError.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        try:
            yield tmp
            for file in tmp.rglob("*"):
                if file.is_file():
                    _sync_file(file)
        except Exception as err:
            if _is_disk_full(err, path.parent, needed_bytes):
                shutil.rmtree(tmp, ignore_errors=True)
                raise _disk_full(path, needed_bytes) from None
            raise
        for file in tmp.rglob("*"):
            if file.is_file():
                check_complete(file)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def file_lock(path):
    """Hold an exclusive lock on `path` (created if missing) while the block runs, so that parallel
    processes (test workers, two demos) wait for one build of a cached model instead of each
    building it. POSIX only; elsewhere there is no lock, and two processes just both build."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def check_output_name(name: str, flag: str = "--output_name") -> str:
    """A file name without folders: '../x', 'a/b' or an absolute path would write outside --output_dir."""
    text = str(name)
    if not text or text in (".", "..") or "/" in text or "\\" in text or os.path.isabs(text) or "\0" in text:
        raise UserError(f"{flag} {text!r} is not a plain file name: the trained files must stay inside --output_dir "
                        "(a name with '/', '\\' or '..' would write elsewhere).",
                        fix=f"pass a name without folders to {flag} (e.g. my_lora) and choose the folder with "
                            "--output_dir.")
    return text



def check_writable_dir(path, flag: str) -> Path:
    """Create `path` if needed and prove we can write there; raise a UserError if not."""
    from library.errors import UserError

    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write_test.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise UserError(
            f"cannot write to the folder given by {flag} ({err.strerror or err}).",
            path=path,
            fix=f"pass a folder you can write to with {flag}, or fix its permissions.",
        ) from None
    return path
