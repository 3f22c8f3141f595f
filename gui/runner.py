"""Running a script as a subprocess in its own process group, without Tk.

Reader threads turn stdout/stderr bytes into events on a queue; the GUI drains the queue with
`after()` (Tk must only be touched from its own thread). tqdm redraws its bar with '\\r', so
lines are split by hand: '\\r' replaces the live line, '\\n' commits it.

Stop sends SIGINT to the whole group (the trainer finishes its step, saves
`<name>-interrupted-state` and exits 130), then SIGTERM, then SIGKILL if it does not end. Once the
main process has exited, whatever is left in its group (data-loader workers, accelerate's child)
is terminated too, so a run never leaves processes behind.
"""
from __future__ import annotations

import codecs
import collections
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

IS_POSIX = os.name == "posix"

_TIME = r"(?:\d+:)?\d+:\d+"
TQDM_RE = re.compile(
    r"(?:(?P<desc>[^\r\n|]*?):\s*)?(?P<pct>\d+)%\|[^|]*\|\s*(?P<n>\d+)/(?P<total>\d+)\s*"
    rf"\[(?P<elapsed>{_TIME})<(?P<eta>{_TIME}|\?),\s*(?P<rate>[\d.]+|\?)\s*(?P<unit>it/s|s/it)"
    r"(?:,\s*(?P<post>[^\]]*))?\]")
RESUME_RE = re.compile(r'--resume "([^"]+)"')


@dataclass
class Progress:
    desc: str
    n: int
    total: int
    elapsed: str
    eta: str
    rate: float | None      # iterations per second
    postfix: dict = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        return self.n / self.total if self.total else 0.0


def parse_progress(text: str) -> Progress | None:
    """The last tqdm bar state in `text`, or None."""
    match = None
    for match in TQDM_RE.finditer(text):
        pass
    if match is None:
        return None
    rate = None
    if match["rate"] != "?":
        rate = float(match["rate"])
        if match["unit"] == "s/it":
            rate = 1.0 / rate if rate else None
    post = {}
    for part in (match["post"] or "").split(","):
        if "=" in part:
            key, value = part.split("=", 1)
            post[key.strip()] = value.strip()
    return Progress((match["desc"] or "").strip(), int(match["n"]), int(match["total"]), match["elapsed"],
                    match["eta"], rate, post)


class LineAssembler:
    """Bytes of one stream -> committed lines and the current (live) line."""

    def __init__(self):
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.cur = ""
        self.cr = False

    def feed(self, data: bytes) -> tuple[list[str], str | None]:
        """Return (finished lines, new live text or None when unchanged)."""
        text = self.decoder.decode(data, final=not data)
        lines, changed = [], False
        for piece in re.split(r"(\r\n|\r|\n)", text):
            if piece in ("\n", "\r\n"):
                lines.append(self.cur)
                self.cur, self.cr, changed = "", False, True
            elif piece == "\r":
                self.cr = True
            elif piece:
                self.cur = piece if self.cr else self.cur + piece
                # text written right after a progress bar (another print on the same stream)
                # starts its own line; the bar itself is shown live, not kept in the log
                bar = TQDM_RE.match(self.cur)
                if bar and bar.end() < len(self.cur):
                    self.cur = self.cur[bar.end():]
                self.cr, changed = False, True
        if not data and self.cur:   # end of stream: the last unterminated line counts
            lines.append(self.cur)
            self.cur, changed = "", True
        return lines, (self.cur if changed else None)


def group_alive(pgid: int) -> bool:
    if not IS_POSIX:
        return False
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def signal_group(pgid: int, sig) -> bool:
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


class Run:
    """One subprocess. Events on `.events`: ("line", stream, text), ("live", stream, text),
    ("exit", returncode, None)."""

    def __init__(self, argv: list[str], cwd=None, env: dict | None = None, stop_grace: float = 60.0,
                 term_grace: float = 5.0):
        self.argv, self.cwd = list(argv), cwd
        self.env = dict(os.environ if env is None else env)
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        self.env.setdefault("PYTHONIOENCODING", "utf-8")
        self.stop_grace, self.term_grace = stop_grace, term_grace
        self.events: queue.Queue = queue.Queue()
        self.tail: collections.deque[str] = collections.deque(maxlen=40)
        self.proc: subprocess.Popen | None = None
        self.pgid: int | None = None
        self.stop_requested = False
        self.returncode: int | None = None
        self.resume_path: str | None = None
        self.started_at = None
        self._lock = threading.Lock()

    def start(self) -> "Run":
        kwargs = {"start_new_session": True} if IS_POSIX else \
            {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
        self.proc = subprocess.Popen(self.argv, cwd=self.cwd, env=self.env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)
        self.pgid = self.proc.pid   # a new session: the child leads its own process group
        self.started_at = time.time()
        self._readers = [threading.Thread(target=self._read, args=(s, name), daemon=True)
                         for s, name in ((self.proc.stdout, "out"), (self.proc.stderr, "err"))]
        for t in self._readers:
            t.start()
        threading.Thread(target=self._wait, daemon=True).start()
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.returncode is None

    def _read(self, stream, name: str):
        assembler = LineAssembler()
        while True:
            data = os.read(stream.fileno(), 65536)
            lines, live = assembler.feed(data)
            for line in lines:
                with self._lock:
                    self.tail.append(line)
                match = RESUME_RE.search(line)
                if match:
                    self.resume_path = match.group(1)
                self.events.put(("line", name, line))
            if live is not None:
                self.events.put(("live", name, live))
            if not data:
                break

    def _wait(self):
        rc = self.proc.wait()
        # the main process is gone; end what is left of its group (it may hold the pipes open)
        if IS_POSIX and group_alive(self.pgid):
            signal_group(self.pgid, signal.SIGTERM)
            end = time.monotonic() + self.term_grace
            while group_alive(self.pgid) and time.monotonic() < end:
                time.sleep(0.05)
            if group_alive(self.pgid):
                signal_group(self.pgid, signal.SIGKILL)
            # killed orphans count as members until init reaps them: report the end after that
            end = time.monotonic() + 10
            while group_alive(self.pgid) and time.monotonic() < end:
                time.sleep(0.05)
        for t in self._readers:
            t.join(timeout=5)
        self.returncode = rc
        self.events.put(("exit", rc, None))

    def stop(self):
        """Interrupt politely (the script saves its state), escalate if it does not end."""
        if not self.running:
            return
        first = not self.stop_requested
        self.stop_requested = True
        self._signal(signal.SIGINT if IS_POSIX else signal.CTRL_BREAK_EVENT)
        if first:
            threading.Thread(target=self._escalate, daemon=True).start()

    def _escalate(self):
        for sig, wait in ((signal.SIGTERM, self.stop_grace), (getattr(signal, "SIGKILL", None), self.term_grace)):
            end = time.monotonic() + wait
            while self.running and time.monotonic() < end:
                time.sleep(0.1)
            if not self.running:
                return
            if sig is not None:
                self._signal(sig)

    def kill(self):
        """End the whole group now (a second click on Stop)."""
        self.stop_requested = True
        self._signal(getattr(signal, "SIGKILL", signal.SIGTERM))

    def _signal(self, sig):
        if IS_POSIX:
            signal_group(self.pgid, sig)
        elif self.proc is not None:
            try:
                self.proc.send_signal(sig)
            except OSError:
                pass

    def outcome(self) -> str:
        """'running' | 'finished' | 'stopped' | 'failed'."""
        if self.returncode is None:
            return "running"
        if self.returncode == 0:
            return "finished"
        if self.stop_requested and (self.returncode == 130 or self.returncode < 0):
            return "stopped"
        return "failed"

    def error_text(self, lines: int = 12) -> str:
        """The script's 'error: ...' paragraph if it printed one, else the last lines."""
        with self._lock:
            tail = list(self.tail)
        starts = [i for i, line in enumerate(tail) if line.startswith(("error:", "Traceback"))]
        if starts and tail[starts[-1]].startswith("error:"):
            # the scripts wrap their one-paragraph errors at 100 columns: unwrap for the window
            para = []
            for line in tail[starts[-1]:]:
                if not line.strip():
                    break
                para.append(line.strip())
            return " ".join(para)
        if starts:
            return "\n".join(tail[starts[-1]:][:lines * 2])
        return "\n".join(tail[-lines:])


# --- the command line ---------------------------------------------------------------------------

def python_executable() -> str:
    return sys.executable


def launch_argv(script_path, args: list[str], launcher: str = "python") -> list[str]:
    """argv that runs the script with the GUI's own Python (the venv), optionally via accelerate."""
    if launcher == "accelerate":
        exe = os.path.join(os.path.dirname(sys.executable), "accelerate")
        head = [exe, "launch"] if os.path.exists(exe) else [sys.executable, "-m", "accelerate.commands.launch"]
        return head + [str(script_path), *args]
    return [sys.executable, "-u", str(script_path), *args]


def display_command(argv: list[str], cwd: str | None = None) -> str:
    """The command as a shell line, paths under the working folder made relative."""
    import shlex

    cwd = os.path.abspath(cwd or os.getcwd())
    words = []
    for word in argv:
        if os.path.isabs(word) and (word + os.sep).startswith(cwd + os.sep):
            word = os.path.relpath(word, cwd)
        words.append(word)
    if not IS_POSIX:
        return subprocess.list2cmdline(words)
    return shlex.join(words)
