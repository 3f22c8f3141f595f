"""Latent caching: encode every used image once with the VAE, keep the latents in memory, and
optionally store them beside the images for later runs.

Latents are the VAE distribution's mean (its mode), not a sample: a cache must give the same
latents every time it is built, and the mean is what a sample is centred on. They are multiplied
by `vae.config.scaling_factor` here, so batches carry latents ready for the UNet; use
`encode_latents` for uncached images so both paths match.

A disk cache file is reused only if the image (size + mtime), its bucket/resize/crop, the VAE
weights and config, and the encode dtype all match what produced it; otherwise it is rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor

import torch

from library.errors import UserError

CACHE_SUFFIX = ".latents.safetensors"
CACHE_FORMAT = "sdt-latents-1"


def cache_path_for(image_path: str) -> str:
    # The full image name is kept (a.png -> a.png.latents.safetensors) so a.png and a.jpg in one
    # folder never share a cache file, and kohya's a.npz caches are left alone.
    return image_path + CACHE_SUFFIX


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (on the VAE's device and dtype) -> scaled latents [B, 4, H/8, W/8]."""
    latents = vae.encode(images).latent_dist.mode()
    shift = getattr(vae.config, "shift_factor", None)
    if shift:
        latents = latents - shift
    return latents * vae.config.scaling_factor


def vae_fingerprint(vae) -> str:
    """A hash of the VAE's config and every weight; changes whenever its output could."""
    h = hashlib.blake2b(digest_size=16)
    config = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(tensor.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_caching_allowed(group) -> None:
    """kohya refuses latent caching with augmentations that change pixels every epoch."""
    bad = sorted({f"{sub.image_dir} ({', '.join(n for n in ('color_aug', 'random_crop') if getattr(sub, n))})"
                  for d in group.datasets for sub in d.subsets if sub.color_aug or sub.random_crop})
    if bad:
        raise UserError(
            "latent caching (--cache_latents / --cache_latents_to_disk) cannot be combined with "
            "color_aug or random_crop, which change the image every epoch; they are set for: "
            + "; ".join(bad) + ".",
            fix="drop --cache_latents and --cache_latents_to_disk, or turn off --color_aug and "
                "--random_crop (and those keys in the dataset config). flip_aug works with caching.")


def _image_meta(rec, dtype, fingerprint: str) -> dict[str, str]:
    st = os.stat(rec.path)
    p = rec.placement
    return {
        "format": CACHE_FORMAT,
        "image_bytes": str(st.st_size),
        "image_mtime_ns": str(st.st_mtime_ns),
        "bucket": f"{p.bucket[0]}x{p.bucket[1]}",
        "resized": f"{p.resized[0]}x{p.resized[1]}",
        "crop": "center",
        "vae": fingerprint,
        "dtype": str(dtype),
    }


def _load_valid(path: str, expected: dict, need_flip: bool):
    """The cached (latents, flipped latents) if the file matches `expected`, else None."""
    if not os.path.isfile(path):
        return None
    try:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            if any(meta.get(k) != v for k, v in expected.items()):
                return None
            keys = set(f.keys())
            if need_flip and "latents_flipped" not in keys:
                return None
            plain = f.get_tensor("latents")
            flipped = f.get_tensor("latents_flipped") if need_flip else None
        return plain, flipped
    except Exception:  # a damaged cache file is simply rebuilt
        return None


def _load_pixels(job, group):
    from library.data.transforms import load_image, to_tensor

    idx, flip = job
    rec = group.images[idx]
    return to_tensor(load_image(rec.path, rec.placement, None, flip=flip))


def cache_latents(group, vae, to_disk=False, vae_batch_size=1, device=None, dtype=None, progress=True):
    """Fill group.latents for every image used this run; batches then carry latents, not images.

    `vae` must already be on `device` (default: where its weights are) and is used as it is;
    `dtype` is the dtype images are fed in (default: the VAE's).
    """
    check_caching_allowed(group)
    vae_batch_size = max(1, int(vae_batch_size or 1))
    param = next(vae.parameters())
    device = param.device if device is None else torch.device(device)
    dtype = param.dtype if dtype is None else dtype
    fingerprint = vae_fingerprint(vae) if to_disk else ""
    used = [i for i, r in enumerate(group.images) if r.repeats > 0]
    needs_flip = {i: bool(group.subset_of(group.images[i]).flip_aug) for i in used}

    results: dict[int, list] = {}
    todo = []
    for i in used:
        if to_disk:
            expected = _image_meta(group.images[i], dtype, fingerprint)
            hit = _load_valid(cache_path_for(group.images[i].path), expected, needs_flip[i])
            if hit is not None:
                results[i] = [hit[0].float(), None if hit[1] is None else hit[1].float()]
                continue
        todo.append(i)

    # One VAE call per chunk of same-size images: group jobs by bucket, in a stable order.
    jobs = [(i, flip) for i in todo for flip in ((False, True) if needs_flip[i] else (False,))]
    jobs.sort(key=lambda j: (group.images[j[0]].placement.bucket, j[0], j[1]))
    chunks, current = [], []
    for job in jobs:
        if current and (len(current) >= vae_batch_size or
                        group.images[current[0][0]].placement.bucket != group.images[job[0]].placement.bucket):
            chunks.append(current)
            current = []
        current.append(job)
    if current:
        chunks.append(current)

    from tqdm import tqdm

    bar = tqdm(total=len(jobs), desc="caching latents", unit="img", disable=not progress or not jobs)
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        for chunk in chunks:
            pixels = torch.stack(list(pool.map(lambda j: _load_pixels(j, group), chunk)))
            latents = encode_latents(vae, pixels.to(device=device, dtype=dtype)).float().cpu()
            for (i, flip), z in zip(chunk, latents):
                results.setdefault(i, [None, None])[1 if flip else 0] = z.clone()
            if to_disk:
                # Written as soon as an image is complete, so an interrupted run keeps its work.
                done = {i for i, _ in chunk if results[i][0] is not None
                        and (results[i][1] is not None or not needs_flip[i])}
                _write_cache_files(group, sorted(done), results, dtype, fingerprint)
            bar.update(len(chunk))
    bar.close()
    group.latents = {i: (results[i][0], results[i][1]) for i in used}
    group.latents_cached = True


def _write_cache_files(group, indices, results, dtype, fingerprint) -> None:
    from library.fileio import save_safetensors_atomic

    for i in indices:
        rec = group.images[i]
        tensors = {"latents": results[i][0]}
        if results[i][1] is not None:
            tensors["latents_flipped"] = results[i][1]
        path = cache_path_for(rec.path)
        try:
            save_safetensors_atomic(tensors, path, metadata=_image_meta(rec, dtype, fingerprint))
        except OSError as err:
            raise UserError(f"cannot write the latent cache file {path} ({err.strerror or err}).",
                            path=path, fix="make the image folder writable, or drop "
                                           "--cache_latents_to_disk to cache in memory only.") from None
