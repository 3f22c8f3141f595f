"""The face data files: schema, loading into (source, target) pairs, and the validator.

A data folder holds four files (docs/train_image_controlnet.md, Data):
  front_metadata.json  front_keypoints.npy  video_metadata.json  video_keypoints.npy
Both JSON files have a header and "items". Front items: {"index", "identity", "image", "pose"?};
video items add "video", "frame", optionally "split" ("train" / "val"; others are ignored) and
"front" (the index of the front item to pair with; default: the first front item of the identity).
"pose" is [yaw, pitch, roll] in the header's "angle_units" (degrees by default, convention in
pose.py); without it the pose is estimated from the item's keypoints. Keypoint files are float
[N, K, 2] (or [N, K, 3] with visibility), row = the item's "index", in pixels of the stored image.
Image paths are relative to --image_dir (default: the data folder), or absolute.

Every problem is collected, not just the first, so one validator run lists all that needs fixing.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from library.errors import UserError
from library.image_controlnet.pose import ANGLE_NAMES, FACE_MODEL_5PT, pose_from_keypoints

FILES = ("front_metadata.json", "front_keypoints.npy", "video_metadata.json", "video_keypoints.npy")
SCHEMA_VERSION = 1
ANGLE_CONVENTION = ("yaw > 0: the nose moves to the image's right (subject turns to their own left); "
                    "pitch > 0: looks up; roll > 0: counter-clockwise in the image")


@dataclass
class Pair:
    source: Path          # frontal image
    target: Path          # video frame
    source_pose: tuple    # degrees (yaw, pitch, roll)
    target_pose: tuple
    identity: str
    split: str            # "train" or "val"


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    pairs: list[Pair] = field(default_factory=list)

    def add(self, text: str):
        self.problems.append(text)


def header(size: int = 112, keypoint_model=None) -> dict:
    """The header every metadata file starts with (the toy renderer and users' converters use it)."""
    head = {"version": SCHEMA_VERSION, "image_size": size, "angle_units": "degrees",
            "angle_order": list(ANGLE_NAMES), "angle_convention": ANGLE_CONVENTION, "keypoints": "5pt_arcface"}
    if keypoint_model is not None:
        head["keypoint_model"] = np.asarray(keypoint_model, dtype=float).round(6).tolist()
    return head


def _read_json(path: Path, report: Report):
    if not path.is_file():
        report.add(f"{path} is missing; the data folder needs {', '.join(FILES)}.")
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        report.add(f"{path} is not valid JSON ({err}).")
        return None
    if not isinstance(meta, dict) or not isinstance(meta.get("items"), list):
        report.add(f"{path} must be an object with an \"items\" list (schema version {SCHEMA_VERSION}).")
        return None
    if meta.get("angle_units", "degrees") not in ("degrees", "radians"):
        report.add(f"{path}: angle_units must be \"degrees\" or \"radians\", got {meta['angle_units']!r}.")
    if list(meta.get("angle_order", ANGLE_NAMES)) != list(ANGLE_NAMES):
        report.add(f"{path}: angle_order must be {list(ANGLE_NAMES)}; reorder the pose values and the header.")
    return meta


def _read_keypoints(path: Path, report: Report, needed: bool):
    if not path.is_file():
        if needed:
            report.add(f"{path} is missing and some items have no \"pose\" (the pose is then estimated "
                       "from keypoints).")
        return None
    try:
        kp = np.load(path, allow_pickle=False)  # never unpickle a data file
    except (ValueError, OSError) as err:
        report.add(f"{path} is not a plain numpy array file ({err}).")
        return None
    if kp.ndim != 3 or kp.shape[2] not in (2, 3) or not np.issubdtype(kp.dtype, np.number):
        report.add(f"{path} must hold numbers shaped [N, K, 2] or [N, K, 3], got {kp.dtype} {list(kp.shape)}.")
        return None
    return kp.astype(np.float64)


def _item_pose(item, where, meta, kp, report: Report):
    """The item's pose in degrees, from "pose" or estimated from its keypoints row; None on a problem."""
    pose = item.get("pose")
    if pose is not None:
        try:
            values = [float(v) for v in pose]
        except (TypeError, ValueError):
            values = []
        if len(values) != 3 or not np.all(np.isfinite(values)):
            report.add(f"{where}: \"pose\" must be 3 finite numbers [yaw, pitch, roll], got {pose!r}.")
            return None
        if meta.get("angle_units") == "radians":
            values = np.degrees(values).tolist()
        return tuple(values)
    index = item.get("index")
    if kp is None or not isinstance(index, int) or not 0 <= index < len(kp):
        report.add(f"{where} has no \"pose\" and no keypoints row {index!r} to estimate it from.")
        return None
    model = np.asarray(meta.get("keypoint_model", FACE_MODEL_5PT), dtype=np.float64)
    points = kp[index]
    if points.shape[1] == 3:  # visibility column: fit only the visible points
        points = points[points[:, 2] > 0]
        model = model[kp[index][:, 2] > 0] if len(model) == kp.shape[1] else model
    try:
        return tuple(pose_from_keypoints(points, model).tolist())
    except ValueError as err:
        report.add(f"{where}: cannot estimate the pose from keypoints row {index} ({err}); add a \"pose\".")
        return None


def _check_items(meta, path: Path, kp, report: Report, image_root: Path, check_images: bool, video: bool):
    """Validated items as dicts with "pose" (degrees) and "path" filled in."""
    out = []
    seen = set()
    for pos, item in enumerate(meta["items"]):
        where = f"{path.name} item {pos}"
        if not isinstance(item, dict):
            report.add(f"{where} is not an object.")
            continue
        missing = [k for k in ("index", "identity", "image") if k not in item]
        if missing:
            report.add(f"{where} lacks {', '.join(missing)}.")
            continue
        if not isinstance(item["index"], int) or item["index"] < 0 or item["index"] in seen:
            report.add(f"{where}: \"index\" must be a unique integer >= 0, got {item['index']!r}.")
            continue
        seen.add(item["index"])
        if kp is not None and item["index"] >= len(kp):
            report.add(f"{where}: index {item['index']} has no row in the keypoints file ({len(kp)} rows).")
        image = Path(str(item["image"]))
        image = image if image.is_absolute() else image_root / image
        if not image.is_file():
            report.add(f"{where}: image {image} does not exist.")
            continue
        if check_images and not _image_ok(image, report, where):
            continue
        pose = _item_pose(item, where, meta, kp, report)
        if pose is None:
            continue
        out.append({**item, "identity": str(item["identity"]), "pose": pose, "path": image,
                    "split": str(item.get("split", "")) if video else ""})
    return out


def _image_ok(path: Path, report: Report, where: str) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            if min(img.size) < 8:
                report.add(f"{where}: image {path} is only {img.size[0]}x{img.size[1]} pixels.")
                return False
    except Exception as err:  # PIL raises many types for broken files; each is the user's data problem
        report.add(f"{where}: image {path} cannot be read ({type(err).__name__}: {err}).")
        return False
    return True


def assign_splits(identities: list[str], val_fraction: float, seed: int) -> set[str]:
    """Identities held out for validation: a seeded shuffle, at least one when there are two or more."""
    ids = sorted(set(identities))
    if val_fraction <= 0 or len(ids) < 2:
        return set()
    random.Random(seed).shuffle(ids)
    count = min(len(ids) - 1, max(1, round(val_fraction * len(ids))))
    return set(ids[:count])


def scan(data_dir, image_dir=None, *, val_fraction: float = 0.1, seed: int = 0,
         check_images: bool = False) -> Report:
    """Read and check the four files; pairs go to report.pairs, problems to report.problems."""
    data_dir = Path(data_dir)
    image_root = Path(image_dir) if image_dir else data_dir
    report = Report()
    if not data_dir.is_dir():
        report.add(f"the data folder {data_dir} does not exist.")
        return report
    if image_dir and not image_root.is_dir():
        report.add(f"the image folder {image_root} (--image_dir) does not exist.")
        return report
    items = {}
    for kind in ("front", "video"):
        meta_path = data_dir / f"{kind}_metadata.json"
        meta = _read_json(meta_path, report)
        if meta is None:
            items[kind] = []
            continue
        needs_kp = any(isinstance(i, dict) and i.get("pose") is None for i in meta["items"])
        kp = _read_keypoints(data_dir / f"{kind}_keypoints.npy", report, needs_kp)
        items[kind] = _check_items(meta, meta_path, kp, report, image_root, check_images, kind == "video")
    fronts: dict[str, dict] = {}
    by_index = {i["index"]: i for i in items["front"]}
    for item in sorted(items["front"], key=lambda i: i["index"]):
        fronts.setdefault(item["identity"], item)
    has_split = any(v["split"] for v in items["video"])
    held_out = set() if has_split else assign_splits([v["identity"] for v in items["video"]], val_fraction, seed)
    orphans = set()
    for v in items["video"]:
        front = by_index.get(v["front"]) if "front" in v else fronts.get(v["identity"])
        if front is None:
            orphans.add(v["identity"])
            continue
        split = v["split"] if has_split else ("val" if v["identity"] in held_out else "train")
        if split in ("train", "val"):
            report.pairs.append(Pair(front["path"], v["path"], front["pose"], v["pose"], v["identity"], split))
    if orphans:
        names = ", ".join(sorted(orphans)[:5]) + (" ..." if len(orphans) > 5 else "")
        report.add(f"{len(orphans)} identities have video frames but no front image to pair with ({names}).")
    n_train = sum(p.split == "train" for p in report.pairs)
    report.notes.append(f"{len(items['front'])} front images, {len(items['video'])} video frames, "
                        f"{n_train} training pairs, {len(report.pairs) - n_train} validation pairs "
                        f"({len({p.identity for p in report.pairs})} identities; split "
                        f"{'from the metadata' if has_split else 'by identity, --val_fraction'})")
    if not report.problems and n_train == 0:
        report.add("there are no training pairs (no video frame with split \"train\" and a front image).")
    return report


def load_pairs(data_dir, image_dir=None, *, val_fraction: float = 0.1, seed: int = 0) -> Report:
    """`scan` for training: any problem stops the run with the list and the validator command."""
    report = scan(data_dir, image_dir, val_fraction=val_fraction, seed=seed)
    if report.problems:
        shown = " ".join(f"({i + 1}) {p}" for i, p in enumerate(report.problems[:5]))
        more = f" ... and {len(report.problems) - 5} more." if len(report.problems) > 5 else ""
        raise UserError(f"the data in {data_dir} has {len(report.problems)} problem(s): {shown}{more}",
                        path=data_dir, fix=f"correct them (the schema is in docs/train_image_controlnet.md, Data); "
                                           f"list every problem with: python train_image_controlnet.py "
                                           f"--data_dir {data_dir} --check_data")
    return report
