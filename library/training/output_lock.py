"""One training run per output folder, and output names that stay inside it.

    lock = OutputDirLock(output_dir, output_name)
    lock.acquire()      # UserError naming the holder when another live run has the folder
    ...                 # train and save
    lock.release()

The lock is `<output_dir>/.training.lock`, held with flock for the run and holding the holder's pid,
host, start time and command line; it is deleted when the run ends. A second run in the same folder is refused with that
information. When the holder died (kill -9, a crash, a reboot) the kernel has dropped its flock, so
the next run takes the folder over and says whose lock it was. On systems without flock the pid in
the file decides (a pid that no longer runs is stale).

Taking the lock also removes what killed runs of the same output name left half-written: the
`.<name>....tmp` files and folders of library.fileio's atomic writes and `.<name>....old` folders.
No other run can be writing them, because no other run holds the folder.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from library.errors import UserError
from library.fileio import check_output_name

LOCK_NAME = ".training.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(info: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
    return f"process {info.get('pid')} on {info.get('host')} (started {since}: {info.get('command', '?')})"


class OutputDirLock:
    def __init__(self, output_dir, output_name: str = "last"):
        self.output_dir = Path(output_dir)
        self.output_name = check_output_name(output_name)
        self.path = self.output_dir / LOCK_NAME
        self._fh = None

    def acquire(self) -> "OutputDirLock":
        self.output_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(5):  # the holder deletes the file on release: lock the file that is there now
            self._take()
            try:
                if os.stat(self.path).st_ino == os.fstat(self._fh.fileno()).st_ino:
                    break
            except FileNotFoundError:
                pass
            self._fh.close()
            self._fh = None
        else:
            raise UserError(f"cannot lock the output folder {self.output_dir}: its lock file keeps changing.",
                            path=self.path, fix="run again; if it persists, another program is deleting files there.")
        self.remove_orphans()
        return self

    def _take(self) -> None:
        fh = open(self.path, "a+", encoding="utf-8")
        fh.seek(0)
        try:
            previous = json.loads(fh.read() or "{}")
        except ValueError:
            previous = {}
        try:
            import fcntl

            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                fh.close()
                self._refuse(previous)
        except ImportError:  # no flock (Windows): the pid in the file decides
            if previous.get("pid") and previous.get("host") == socket.gethostname() \
                    and previous["pid"] != os.getpid() and _pid_alive(int(previous["pid"])):
                fh.close()
                self._refuse(previous)
        if previous.get("pid") and previous.get("pid") != os.getpid():
            print(f"note: taking over the lock of {self.output_dir} left by {_describe(previous)}, which no "
                  "longer runs.", flush=True)
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                             "command": " ".join(sys.argv)[:500]}))
        fh.flush()
        self._fh = fh

    def _refuse(self, holder: dict):
        who = _describe(holder) if holder else "another process"
        raise UserError(f"the output folder {self.output_dir} is in use by another training run: {who}. Two runs "
                        "in one folder would overwrite each other's files.", path=self.path,
                        fix="wait for that run to finish (or stop it), or pass another --output_dir.")

    def remove_orphans(self) -> list[Path]:
        """Delete the temporary files and folders of atomic writes of this output name (see above)."""
        removed = []
        prefix = f".{self.output_name}"
        for entry in self.output_dir.iterdir():
            if entry.name.startswith(prefix) and entry.name.endswith((".tmp", ".old")):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                removed.append(entry)
        if removed:
            print(f"removed {len(removed)} unfinished temporary file(s) left by an interrupted save in "
                  f"{self.output_dir}: {', '.join(p.name for p in removed[:3])}", flush=True)
        return removed

    def release(self) -> None:
        if self._fh is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # still locked while deleted: a waiting run re-checks (acquire)
            self._fh.close()
        finally:
            self._fh = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
