"""TensorBoard on a run's logging folder: a free port, the browser opened once it answers,
stopped (its whole process group) when the GUI closes."""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
import webbrowser
from pathlib import Path

from gui.runner import IS_POSIX, group_alive, signal_group


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class TensorBoard:
    def __init__(self, opener=webbrowser.open):
        self.opener = opener
        self.proc: subprocess.Popen | None = None
        self.logdir: Path | None = None
        self.port: int | None = None

    @property
    def url(self) -> str | None:
        return f"http://127.0.0.1:{self.port}/" if self.port else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def command(self, logdir: Path, port: int) -> list[str]:
        return [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--port", str(port),
                "--host", "127.0.0.1"]

    def open(self, logdir) -> str:
        """Start TensorBoard on `logdir` (restarting it if it shows another folder); open the browser."""
        logdir = Path(logdir)
        if self.running and self.logdir == logdir:
            self.opener(self.url)
            return self.url
        self.stop()
        logdir.mkdir(parents=True, exist_ok=True)
        self.logdir, self.port = logdir, free_port()
        kwargs = {"start_new_session": True} if IS_POSIX else \
            {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
        self.proc = subprocess.Popen(self.command(logdir, self.port), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kwargs)
        url, proc = self.url, self.proc
        threading.Thread(target=self._open_when_ready, args=(proc, self.port, url), daemon=True).start()
        return url

    def _open_when_ready(self, proc, port, url, timeout: float = 60.0):
        end = time.monotonic() + timeout
        while time.monotonic() < end and proc.poll() is None:
            if port_open(port):
                self.opener(url)
                return
            time.sleep(0.25)

    def stop(self):
        if self.proc is None:
            return
        pgid = self.proc.pid
        if IS_POSIX:
            signal_group(pgid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                signal_group(pgid, signal.SIGKILL)
                self.proc.wait(timeout=5)
            end = time.monotonic() + 2
            while group_alive(pgid) and time.monotonic() < end:
                time.sleep(0.05)
            if group_alive(pgid):
                signal_group(pgid, signal.SIGKILL)
        else:
            self.proc.terminate()
            self.proc.wait(timeout=5)
        self.proc = None
        self.port = None

    @property
    def pgid(self) -> int | None:
        return self.proc.pid if self.proc else None

