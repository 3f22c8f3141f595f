"""The run queue (no Tk): presets run one after another, kept on disk so an overnight queue
survives a restart of the GUI. Each item holds its own copy of the preset, so editing the form
after queueing does not change what runs."""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from library.fileio import write_text_atomic

PENDING, RUNNING, FINISHED, FAILED, STOPPED = "pending", "running", "finished", "failed", "stopped"


@dataclass
class QueueItem:
    id: int
    script: str          # registry module, e.g. "train_network"
    name: str            # what the user sees
    path: str            # the item's own preset copy
    status: str = PENDING
    returncode: int | None = None
    detail: str = ""


class RunQueue:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.items: list[QueueItem] = []
        self.continue_on_error = False
        self.load()

    @property
    def index_path(self) -> Path:
        return self.folder / "queue.json"

    def load(self):
        try:
            data = json.loads(self.index_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        self.continue_on_error = bool(data.get("continue_on_error", False))
        self.items = []
        for raw in data.get("items", []):
            try:
                item = QueueItem(**raw)
            except TypeError:
                continue
            if item.status == RUNNING:   # the GUI closed during this run
                item.status, item.detail = PENDING, "interrupted when the GUI closed"
            self.items.append(item)

    def save(self):
        data = {"continue_on_error": self.continue_on_error, "items": [asdict(i) for i in self.items]}
        write_text_atomic(self.index_path, json.dumps(data, indent=2, ensure_ascii=False))

    def add(self, script: str, name: str, text: str | None = None, source: Path | None = None) -> QueueItem:
        """Queue a preset given as text (the current form) or as a file (copied)."""
        new_id = max((i.id for i in self.items), default=0) + 1
        path = self.folder / "items" / f"{new_id:04d}-{script}-{int(time.time())}.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        if text is not None:
            write_text_atomic(path, text)
        else:
            shutil.copyfile(source, path)
        item = QueueItem(new_id, script, name, str(path))
        self.items.append(item)
        self.save()
        return item

    def remove(self, index: int):
        item = self.items[index]
        if item.status == RUNNING:
            raise ValueError("the running item cannot be removed; stop it first")
        del self.items[index]
        Path(item.path).unlink(missing_ok=True)
        self.save()

    def move(self, index: int, delta: int) -> int:
        """Move an item up (-1) or down (+1); returns its new index."""
        new = max(0, min(len(self.items) - 1, index + delta))
        if new != index:
            self.items.insert(new, self.items.pop(index))
            self.save()
        return new

    def next_pending(self) -> QueueItem | None:
        return next((i for i in self.items if i.status == PENDING), None)

    def mark(self, item: QueueItem, status: str, returncode: int | None = None, detail: str = ""):
        item.status, item.returncode, item.detail = status, returncode, detail
        self.save()

    def requeue(self, index: int):
        self.mark(self.items[index], PENDING)

    def clear_done(self):
        for item in [i for i in self.items if i.status in (FINISHED,)]:
            self.items.remove(item)
            Path(item.path).unlink(missing_ok=True)
        self.save()
