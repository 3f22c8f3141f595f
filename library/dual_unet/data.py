"""Registered image pairs of two modalities, split into training and validation, batched for the loop.

Where pairs come from (modality names from --modalities, default cf fa):

1. `--data_dir DIR` holding one folder per modality (DIR/cf/, DIR/fa/; any letter case); files are
   paired by stem (cf/0001.png <-> fa/0001.jpg). A stem on one side only is an error that lists it.
2. `--pairs_file FILE.csv|FILE.jsonl`: one pair per row/line with a column per modality holding the
   image path (relative paths from the file's folder), optional `id` and `split`
   (train / val / test). CSV: `id,cf,fa,split`; JSONL: {"id": "0001", "cf": "...", "fa": "..."}.

Images are resized to cover --resolution and centre-cropped, with the data library's code (the
same crop for both images of a pair, so registration is kept); grayscale images become 3 equal
channels, which is what the VAE takes. Pairs whose images differ in aspect ratio are refused: the
crops would not line up. Each modality is a `DatasetGroup` of its own, so latent caching (memory
or disk) is the library's; this module pairs them up and decides the batch order, which depends
only on (seed, epoch), so a resumed run sees the same batches.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from library.data.buckets import BucketPlanner
from library.data.config import DatasetConfig, SubsetConfig
from library.data.group import DatasetGroup, ImageRecord
from library.errors import UserError

VAL_SPLITS = ("val", "validation", "valid")
SPLITS = ("train", "test") + VAL_SPLITS
SPLIT_SEED = 20240607  # the validation split does not move with --seed, so runs share a validation set


@dataclass(frozen=True)
class Pair:
    name: str
    paths: tuple[str, str]
    split: str = "train"


def _folder_of(data_dir: Path, modality: str) -> Path:
    matches = [p for p in data_dir.iterdir() if p.is_dir() and p.name.lower() == modality.lower()]
    if not matches:
        found = ", ".join(sorted(p.name for p in data_dir.iterdir() if p.is_dir())) or "none"
        raise UserError(f"--data_dir has no '{modality}' folder (folders found: {found}).", path=data_dir,
                        fix=f"put the {modality} images in {data_dir / modality}, or name the modalities with "
                            "--modalities to match the folders.")
    return matches[0]


def pairs_from_folders(data_dir, modalities: tuple[str, str]) -> list[Pair]:
    from library.data.scan import list_images

    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError("the --data_dir folder does not exist.", path=data_dir,
                        fix="pass the folder that holds one subfolder per modality (e.g. cf/ and fa/).")
    sides = []
    for modality in modalities:
        folder = _folder_of(data_dir, modality)
        by_stem: dict[str, str] = {}
        for path in list_images(str(folder)):
            stem = Path(path).stem
            if stem in by_stem:
                raise UserError(f"two {modality} images share the name '{stem}': {by_stem[stem]} and {path}.",
                                path=folder, fix="keep one image per name; pairs are matched by file name.")
            by_stem[stem] = path
        sides.append(by_stem)
    only = [(m, sorted(set(a) - set(b))) for m, a, b in ((modalities[0], *sides), (modalities[1], *sides[::-1]))]
    problems = [f"{len(stems)} {m} image(s) without a partner (e.g. {', '.join(stems[:5])})" for m, stems in only if stems]
    if problems:
        raise UserError("the two modality folders do not pair up: " + "; ".join(problems) + ".", path=data_dir,
                        fix="give every image a registered partner with the same file name in the other folder, "
                            "or list the pairs in a --pairs_file.")
    if not sides[0]:
        raise UserError("--data_dir holds no image pairs.", path=data_dir, fix="add images to both folders.")
    return [Pair(stem, (sides[0][stem], sides[1][stem])) for stem in sorted(sides[0])]


def _rows(path: Path) -> list[tuple[str, dict]]:
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        return [(f"row {i + 2}", {(k or "").strip().lower(): (v or "").strip() for k, v in row.items()})
                for i, row in enumerate(reader)]
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"line {n} of {path} is not valid JSON ({err}).", path=path,
                                fix="write one JSON object per line.") from None
            if not isinstance(obj, dict):
                raise UserError(f"line {n} of {path} is not an object.", path=path,
                                fix='write one {"cf": "...", "fa": "..."} object per line.')
            rows.append((f"line {n}", {str(k).lower(): str(v) for k, v in obj.items() if v is not None}))
    return rows


def pairs_from_file(path, modalities: tuple[str, str]) -> list[Pair]:
    path = Path(path)
    if not path.is_file():
        raise UserError("the --pairs_file does not exist.", path=path, fix="pass a .csv or .jsonl listing of pairs.")
    if path.suffix.lower() not in (".csv", ".jsonl"):
        raise UserError("the --pairs_file must be a .csv or a .jsonl file.", path=path,
                        fix="write the listing as pairs.csv (header id,cf,fa,split) or pairs.jsonl.")
    pairs, problems = [], []
    for where, row in _rows(path):
        missing = [m for m in modalities if not row.get(m.lower())]
        split = (row.get("split") or "train").lower()
        if missing:
            problems.append(f"{where} has no {' / '.join(missing)} path")
        elif split not in SPLITS:
            problems.append(f"{where} has split '{split}' (use train, val or test)")
        else:
            paths = tuple(str(path.parent / row[m.lower()]) for m in modalities)
            pairs.append(Pair(row.get("id") or Path(paths[0]).stem, paths, split))
    if problems:
        raise UserError(f"{len(problems)} problem(s) in the pairs file: " + "; ".join(problems[:10]) + ".", path=path,
                        fix=f"give every row a path for each modality ({', '.join(modalities)}).")
    if not pairs:
        raise UserError("the --pairs_file lists no pairs.", path=path, fix="add one row per pair.")
    return pairs


def split_pairs(pairs: list[Pair], fraction: float, max_val: int | None = None) -> tuple[list[Pair], list[Pair]]:
    """Listed splits win; otherwise a fixed-seed share `fraction` of the pairs (at most max_val)."""
    pairs = [p for p in pairs if p.split != "test"]
    val = [p for p in pairs if p.split in VAL_SPLITS]
    train = [p for p in pairs if p.split not in VAL_SPLITS]
    if not val and fraction and len(train) > 1:
        n_val = min(len(train) - 1, max(1, round(len(train) * fraction)), max_val or len(train))
        chosen = set(np.random.default_rng(SPLIT_SEED).permutation(len(train))[:n_val].tolist())
        val = [p for i, p in enumerate(train) if i in chosen]
        train = [p for i, p in enumerate(train) if i not in chosen]
    if not train:
        raise UserError("no training pairs are left after taking the validation pairs out.",
                        fix="mark fewer pairs as val, or lower --validation_split.")
    return train, val


class PairedGroup:
    """Batches of pairs for the training loop (`num_batches_per_epoch`, `epoch_dataset`)."""

    def __init__(self, pairs: list[Pair], resolution: int, batch_size: int, seed: int, modalities=("a", "b")):
        from library.data.probe import probe_images

        self.pairs, self.batch_size, self.seed, self.modalities = pairs, batch_size, int(seed), tuple(modalities)
        self.batch_scale = 1  # processes that share each batch (library.data.loader.use_global_batches)
        planner = BucketPlanner((resolution, resolution))
        probed = probe_images([p for pair in pairs for p in pair.paths])
        bad = [f"{p}: {why}" for p, (size, why) in probed.items() if size is None]
        if bad:
            raise UserError(f"{len(bad)} image(s) cannot be read: " + "; ".join(bad[:20]) + ".",
                            fix="replace or remove these pairs.")
        sizes = [[probed[p][0] for p in pair.paths] for pair in pairs]
        skewed = [pair.name for pair, (sa, sb) in zip(pairs, sizes) if abs(sa[0] / sa[1] - sb[0] / sb[1]) > 0.01]
        if skewed:
            raise UserError(f"{len(skewed)} pair(s) have images of different aspect ratios (e.g. "
                            f"{', '.join(skewed[:5])}), so their crops would not line up.",
                            fix="register the pairs (same field of view and aspect ratio) before training.")
        self.groups = []
        for side in range(2):
            config = DatasetConfig(subsets=[SubsetConfig(image_dir=None)], resolution=(resolution, resolution),
                                   batch_size=batch_size, source=self.modalities[side])
            records = [ImageRecord(pair.paths[side], "", size[side], planner.place(size[side]), 0, 0, False, 1,
                                   "none") for pair, size in zip(pairs, sizes)]
            self.groups.append(DatasetGroup([config], records, seed=seed))

    def set_batch_scale(self, processes: int) -> None:
        """With several processes a batch holds batch_size x processes pairs; each trains on its share."""
        self.batch_scale = max(1, int(processes))

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.batch_scale

    @property
    def num_batches_per_epoch(self) -> int:
        return -(-len(self.pairs) // self.global_batch_size)

    @property
    def latents_cached(self) -> bool:
        return all(g.latents_cached for g in self.groups)

    def batch_order(self, epoch: int, seed: int | None = None) -> list[list[int]]:
        seed = self.seed if seed is None else int(seed)
        order = np.random.default_rng([seed % (1 << 63), epoch, 0]).permutation(len(self.pairs)).tolist()
        size = self.global_batch_size
        return [order[k:k + size] for k in range(0, len(order), size)]

    def epoch_dataset(self, epoch: int, seed: int | None = None, start: int = 0) -> "PairedEpoch":
        return PairedEpoch(self, self.batch_order(epoch, seed), start)

    def make_batch(self, indices) -> dict:
        from library.data.transforms import load_image, to_tensor

        batch = {"names": [self.pairs[i].name for i in indices]}
        for side, group in enumerate(self.groups):
            if group.latents_cached:
                batch[f"latents_{side}"] = torch.stack([group.latents[i][0] for i in indices])
            else:
                recs = [group.images[i] for i in indices]
                batch[f"images_{side}"] = torch.stack([to_tensor(load_image(r.path, r.placement)) for r in recs])
        return batch

    def cache_latents(self, vae, to_disk=False, vae_batch_size=1, device=None, dtype=None, progress=True) -> None:
        for group in self.groups:
            group.cache_latents(vae, to_disk=to_disk, vae_batch_size=vae_batch_size, device=device, dtype=dtype,
                                progress=progress)

    def summary(self, val: "PairedGroup | None" = None) -> str:
        res = self.groups[0].datasets[0].resolution
        lines = [f"pairs ({' + '.join(self.modalities)}): {len(self.pairs)} training, "
                 f"{len(val.pairs) if val else 0} validation",
                 f"resolution {res[0]}x{res[1]}, batch size {self.batch_size}, "
                 f"{self.num_batches_per_epoch} batches per epoch"]
        return "\n".join(lines)


class PairedEpoch(torch.utils.data.Dataset):
    """Batch (start + i) of one epoch; picklable for DataLoader workers."""

    def __init__(self, group: PairedGroup, batches: list[list[int]], start: int = 0):
        if not 0 <= start <= len(batches):
            raise ValueError(f"start {start} is outside the epoch's {len(batches)} batches")
        self.group, self.batches, self.start = group, batches, start
        self.needs_workers = not group.latents_cached  # cached latents are in memory already

    def __len__(self) -> int:
        return len(self.batches) - self.start

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.group.make_batch(self.batches[self.start + i])


def build_datasets(args) -> tuple[PairedGroup, PairedGroup | None]:
    """(training pairs, validation pairs or None), every file checked before a model is loaded."""
    modalities = tuple(args.modalities)
    if args.pairs_file:
        pairs = pairs_from_file(args.pairs_file, modalities)
    elif args.data_dir:
        pairs = pairs_from_folders(args.data_dir, modalities)
    else:
        raise UserError("no training pairs given.", fix=f"pass --data_dir (with {modalities[0]}/ and {modalities[1]}/ "
                                                        "subfolders) or --pairs_file.")
    train, val = split_pairs(pairs, args.validation_split, args.max_validation_pairs)
    make = lambda items: PairedGroup(items, args.resolution, args.train_batch_size, args.seed, modalities)  # noqa: E731
    return make(train), (make(val) if val else None)
