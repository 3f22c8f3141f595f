"""Build the toy base once, keep it in a cache, copy it where asked.

Layout written for a build (in the cache, and in any --output_dir):

    toy-sd15/                a diffusers folder (unet/ vae/ text_encoder/ tokenizer/ scheduler/)
    toy-sd15.safetensors     the same weights as one file in the original SD layout
    toy_world.json           recipe, version, world description, training stats, build time

The cache is `.cache/toy/<version>/` in the repository (gitignored); the version is the recipe
number plus a hash of every setting that decides the weights, so a changed recipe never reuses old
weights. A version folder appears only complete (built in a temporary folder, then renamed), and
a lock file makes a second process (a parallel test run) wait for the first build and reuse it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from library.fileio import atomic_dir, atomic_path, file_lock, write_json_atomic
from library.toy import world
from library.toy.pretrain import Recipe, pretrain

RECIPE_VERSION = 2  # bump when the code of the recipe changes in a way its settings do not show
REPO = Path(__file__).resolve().parents[2]
CACHE_ROOT = REPO / ".cache" / "toy"
NAME = "toy-sd15"
INFO_FILE = "toy_world.json"


@dataclass
class ToyModelPaths:
    root: Path
    diffusers_dir: Path  # root/toy-sd15/
    single_file: Path  # root/toy-sd15.safetensors
    info_file: Path  # root/toy_world.json

    @classmethod
    def at(cls, root) -> "ToyModelPaths":
        root = Path(root)
        return cls(root, root / NAME, root / f"{NAME}.safetensors", root / INFO_FILE)

    def complete(self) -> bool:
        # toy_world.json is written last, so its presence means the rest is there too.
        return self.info_file.is_file() and self.single_file.is_file() and \
            (self.diffusers_dir / "model_index.json").is_file()

    def info(self) -> dict:
        return json.loads(self.info_file.read_text(encoding="utf-8"))


def version(recipe: Recipe = Recipe()) -> str:
    settings = {"recipe": recipe.as_dict(), "world": world_description()}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    return f"v{RECIPE_VERSION}-{digest[:10]}"


def world_description() -> dict:
    return {"colours": world.COLOURS, "base_colours": list(world.BASE_COLOURS), "shapes": list(world.SHAPES),
            "image_size": world.IMAGE_SIZE,
            "captions": [world.caption(c, s) for c in world.BASE_COLOURS for s in world.SHAPES],
            "new_concept": {"caption": world.caption(world.NEW_TOKEN, world.NEW_SHAPE),
                            "colour": world.NEW_COLOUR}}


def write_toy_model(root, recipe: Recipe = Recipe(), log=print) -> ToyModelPaths:
    """Pretrain and write the three outputs into `root` (replaced as a whole, atomically)."""
    from library.models.loading import SDModel, make_noise_scheduler
    from library.models.saving import save_diffusers, save_sd_checkpoint

    start_wall, start_cpu = time.perf_counter(), time.process_time()
    unet, vae, text_encoder, stats = pretrain(recipe, log)
    with atomic_dir(root) as tmp:
        paths = ToyModelPaths.at(tmp)
        model = SDModel(tokenizer=None, text_encoder=text_encoder, vae=vae, unet=unet,
                        noise_scheduler=make_noise_scheduler(), v2=False, model_path=str(paths.diffusers_dir),
                        model_name=NAME)
        save_diffusers(model, paths.diffusers_dir)
        # No metadata: safetensors writes several keys in random order, and these bytes should repeat.
        save_sd_checkpoint(paths.single_file, unet, text_encoder, vae)
        write_json_atomic(paths.info_file, {
            "name": NAME, "version": version(recipe), "recipe_version": RECIPE_VERSION,
            "recipe": recipe.as_dict(), "world": world_description(), "stats": stats,
            "build_seconds": {"wall": round(time.perf_counter() - start_wall, 1),
                              "cpu": round(time.process_time() - start_cpu, 1)},
            "torch_threads": _threads()})
    return ToyModelPaths.at(root)


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def ensure_toy_model(cache_root=None, recipe: Recipe = Recipe(), log=None) -> ToyModelPaths:
    """The cached build for `recipe`, built first if it is missing (minutes on one CPU thread)."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    cache = Path(cache_root or CACHE_ROOT) / version(recipe)
    paths = ToyModelPaths.at(cache)
    if paths.complete():
        return paths
    with file_lock(cache.with_name(f".{cache.name}.lock")):
        if paths.complete():  # another process built it while we waited
            return paths
        log(f"building the toy-world base model into {cache} (once; a few minutes on one CPU thread)")
        return write_toy_model(cache, recipe, log)


def copy_toy_model(source: ToyModelPaths, output_dir) -> ToyModelPaths:
    """Copy a build into `output_dir`, each part atomically, toy_world.json last."""
    dest = ToyModelPaths.at(output_dir)
    dest.root.mkdir(parents=True, exist_ok=True)
    with atomic_dir(dest.diffusers_dir) as tmp:
        shutil.copytree(source.diffusers_dir, tmp, dirs_exist_ok=True)
    for src, dst in ((source.single_file, dest.single_file), (source.info_file, dest.info_file)):
        with atomic_path(dst) as tmp:
            shutil.copyfile(src, tmp)
    return dest


def build(output_dir=None, use_cache: bool = True, recipe: Recipe = Recipe(), log=None) -> ToyModelPaths:
    """`python -m library.toy build`: the cached build, copied into `output_dir` if given."""
    if not use_cache:
        if output_dir is None:
            raise ValueError("output_dir is needed without the cache")
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        # Built beside the outputs, then copied in part by part: other files in output_dir stay.
        with tempfile.TemporaryDirectory(prefix=".toy-build.", dir=output_dir) as tmp:
            return copy_toy_model(write_toy_model(Path(tmp) / "build", recipe, log or print), output_dir)
    paths = ensure_toy_model(recipe=recipe, log=log)
    if output_dir is not None and Path(output_dir).resolve() != paths.root.resolve():
        paths = copy_toy_model(paths, output_dir)
    return paths


def default_threads() -> None:
    """One torch thread unless OMP_NUM_THREADS says otherwise (2 threads measured up to 8x slower)."""
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1") or 1))
