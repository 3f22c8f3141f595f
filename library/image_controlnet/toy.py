"""The toy world: textured synthetic heads rendered at known angles, written as a real data folder.

A head is a sphere seen orthographically, with 5 landmark dots (eyes, nose, mouth corners) at the
points of TOY_MODEL, an identity's skin colour, latitude stripes, longitude stripes and an accent
patch. The longitude stripes matter: without them yaw only moves the small dots, and an earlier
experiment measured a generator that then ignored yaw while still beating the copy baseline on PSNR. Every
controlled angle must change large-scale appearance, or the test measures the renderer.

`write_dataset` writes the four files of data.py (keypoints are the exact projections of the
landmarks, the header carries TOY_MODEL), so the real loader is what the tests exercise.
`best_match_angles` is the pose check that does not trust PSNR: render the known identity over a
grid of one angle (the other two at the target) and take the angle whose render matches best.

    python -m library.image_controlnet.toy OUT_DIR [--identities 40] [--views 8] [--size 64]
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from library.image_controlnet.pose import project

HEAD_RADIUS = 0.8                     # of the half image side
POSE_RANGE = (45.0, 20.0, 20.0)       # yaw, pitch, roll drawn from U(-r, r)
_XY = np.array([[-0.38, 0.30], [0.38, 0.30], [0.0, -0.05], [-0.30, -0.42], [0.30, -0.42]])
TOY_MODEL = np.column_stack([_XY, np.sqrt(1 - (_XY ** 2).sum(1))])  # on the unit sphere
_DOT_RADIUS = np.array([0.14, 0.14, 0.12, 0.10, 0.10])
_LIGHT = np.array([-0.3, 0.4, 1.0]) / np.linalg.norm([-0.3, 0.4, 1.0])
BACKGROUND = np.array([0.15, 0.15, 0.18])


@dataclass(frozen=True)
class Identity:
    name: str
    skin: tuple
    features: tuple     # 5 RGB colours, one per landmark
    lat: tuple          # (frequency, phase, amplitude) of latitude stripes
    lon: tuple          # the same for longitude stripes (amplitude 0: none)
    accent: tuple       # (RGB, unit direction on the sphere, angular radius as a dot-product threshold)


def random_identity(rng: np.random.Generator, name: str, lon: bool = True) -> Identity:
    skin = tuple(rng.uniform(0.35, 0.9, 3))
    feats = tuple(tuple(rng.uniform(0.0, 1.0, 3)) for _ in range(5))
    lat = (float(rng.uniform(4, 9)), float(rng.uniform(0, 2 * np.pi)), float(rng.uniform(0.15, 0.3)))
    lon_p = (float(rng.integers(3, 7)), float(rng.uniform(0, 2 * np.pi)), float(rng.uniform(0.2, 0.35) if lon else 0.0))
    direction = rng.normal(size=3)
    direction[2] = abs(direction[2]) + 0.5  # on the visible half, so it moves with every angle
    accent = (tuple(rng.uniform(0, 1, 3)), tuple(direction / np.linalg.norm(direction)), float(rng.uniform(0.85, 0.93)))
    return Identity(name, skin, feats, lat, lon_p, accent)


def render(ident: Identity, pose, size: int, supersample: int = 2) -> np.ndarray:
    """[size, size, 3] float RGB in [0, 1] of the head at pose (yaw, pitch, roll) in degrees."""
    from library.image_controlnet.pose import rotation_matrix

    n = size * supersample
    coords = (np.arange(n) + 0.5) / n * 2 - 1
    x, y = np.meshgrid(coords, -coords)
    r2 = (x * x + y * y) / HEAD_RADIUS ** 2
    inside = r2 < 1
    p = np.stack([x / HEAD_RADIUS, y / HEAD_RADIUS, np.sqrt(np.clip(1 - r2, 0, None))], axis=-1)
    q = p @ rotation_matrix(*pose)  # camera -> head frame (R^T applied to row vectors)
    lat, lon = np.arcsin(np.clip(q[..., 1], -1, 1)), np.arctan2(q[..., 0], q[..., 2])
    f, ph, a = ident.lat
    fl, phl, al = ident.lon
    tone = (1 + a * np.sin(f * lat + ph)) * (1 + al * np.sin(fl * lon + phl))
    colour = np.asarray(ident.skin)[None, None] * tone[..., None]
    acc_rgb, acc_dir, acc_thr = ident.accent
    colour = np.where((q @ np.asarray(acc_dir) > acc_thr)[..., None], np.asarray(acc_rgb), colour)
    for k in range(5):  # landmark dots: angular distance to the landmark's point
        dot = q @ TOY_MODEL[k] > np.cos(_DOT_RADIUS[k])
        colour = np.where(dot[..., None], np.asarray(ident.features[k]), colour)
    shade = 0.55 + 0.45 * np.clip(p @ _LIGHT, 0, 1)  # light fixed to the camera
    img = np.where(inside[..., None], np.clip(colour * shade[..., None], 0, 1), BACKGROUND)
    return img.reshape(size, supersample, size, supersample, 3).mean(axis=(1, 3))


def keypoints(pose, size: int) -> np.ndarray:
    """[5, 2] pixel coordinates of the landmarks (x right, y down), as the renderer draws them."""
    return project(TOY_MODEL, pose, (size / 2, size / 2), HEAD_RADIUS * size / 2)


def random_pose(rng: np.random.Generator) -> tuple:
    return tuple(float(v) for v in rng.uniform(-1, 1, 3) * np.array(POSE_RANGE))


def _save_png(arr: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((arr * 255).round().astype(np.uint8)).save(path)


def write_dataset(out_dir, *, train_identities: int = 40, val_identities: int = 8, views: int = 8,
                  size: int = 64, seed: int = 0, lon: bool = True, drop_pose_every: int = 0) -> Path:
    """Write a data folder; every `drop_pose_every`-th video item has no "pose" (estimated from keypoints)."""
    from library.fileio import atomic_path, write_json_atomic
    from library.image_controlnet.data import header

    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    front, video, front_kp, video_kp = [], [], [], []
    for i in range(train_identities + val_identities):
        ident = random_identity(rng, f"p{i:04d}", lon=lon)
        split = "train" if i < train_identities else "val"
        image = f"images/front/{ident.name}.png"
        _save_png(render(ident, (0.0, 0.0, 0.0), size), out / image)
        front.append({"index": i, "identity": ident.name, "image": image, "pose": [0.0, 0.0, 0.0]})
        front_kp.append(keypoints((0.0, 0.0, 0.0), size))
        for v in range(views):
            pose = random_pose(rng)
            image = f"images/video/{ident.name}_v0/{v:05d}.png"
            _save_png(render(ident, pose, size), out / image)
            item = {"index": len(video), "identity": ident.name, "video": f"{ident.name}_v0", "frame": v,
                    "image": image, "pose": [round(a, 4) for a in pose], "split": split}
            if drop_pose_every and len(video) % drop_pose_every == 0:
                del item["pose"]
            video.append(item)
            video_kp.append(keypoints(pose, size))
    for kind, items, kp in (("front", front, front_kp), ("video", video, video_kp)):
        write_json_atomic(out / f"{kind}_metadata.json", {**header(size, TOY_MODEL), "items": items})
        with atomic_path(out / f"{kind}_keypoints.npy") as tmp, open(tmp, "wb") as fh:
            np.save(fh, np.asarray(kp, dtype=np.float32))
    return out


def best_match_angles(ident: Identity, image: np.ndarray, target_pose, step: float = 2.5) -> np.ndarray:
    """Per axis, the angle whose render (other two axes at the target) best matches `image` ([H, W, 3]
    in [0, 1]). Exact for this world: on ground-truth renders the error is below the grid step."""
    size = image.shape[0]
    found = []
    for axis, limit in enumerate(POSE_RANGE):
        grid = np.arange(-limit, limit + 1e-6, step)
        errors = []
        for angle in grid:
            pose = list(target_pose)
            pose[axis] = angle
            errors.append(float(((render(ident, pose, size) - image) ** 2).mean()))
        found.append(grid[int(np.argmin(errors))])
    return np.array(found)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Write a synthetic ImageControlNet data folder.")
    parser.add_argument("out_dir")
    parser.add_argument("--identities", type=int, default=40, help="training identities")
    parser.add_argument("--val_identities", type=int, default=8)
    parser.add_argument("--views", type=int, default=8, help="video frames per identity")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = write_dataset(args.out_dir, train_identities=args.identities, val_identities=args.val_identities,
                        views=args.views, size=args.size, seed=args.seed)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
