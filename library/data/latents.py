"""Latent caching: encode every used image once with the VAE, keep the latents in memory, and
optionally store them beside the images for later runs.

Latents are the VAE distribution's mean (its mode), not a sample: a cache must give the same
latents every time it is built, and the mean is what a sample is centred on. They are multiplied
by `vae.config.scaling_factor` here, so batches carry latents ready for the UNet; use
`encode_latents` for uncached images so both paths match.

A disk cache file is reused only if the image (size + mtime), its bucket/resize/crop, the VAE
weights and config, and the encode dtype all match what produced it; otherwise it is rebuilt.
Loss masks (library.data.masks) are cached with the latents, plain and flipped, in memory and in
the same file (uint8), so a cached run still gets its masks without reading images.
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


# Batch mask key -> tensor name in the cache file (see library.data.masks).
MASK_TENSORS = {"alpha_masks": "alpha_mask", "conditioning_images": "conditioning"}


def _mask_keys(group, i: int) -> tuple[str, ...]:
    """The masks image i carries in its batches, which its cache holds too."""
    rec = group.images[i]
    sub = group.subset_of(rec)
    keys = ("alpha_masks",) if sub.alpha_mask else ()
    if sub.conditioning_data_dir and rec.conditioning:
        keys += ("conditioning_images",)
    return keys


def _image_meta(rec, dtype, fingerprint: str, mask_keys=(), interpolation: str | None = None) -> dict[str, str]:
    st = os.stat(rec.path)
    p = rec.placement
    meta = {
        "format": CACHE_FORMAT,
        "image_bytes": str(st.st_size),
        "image_mtime_ns": str(st.st_mtime_ns),
        "bucket": f"{p.bucket[0]}x{p.bucket[1]}",
        "resized": f"{p.resized[0]}x{p.resized[1]}",
        "crop": "center",
        "vae": fingerprint,
        "dtype": str(dtype),
    }
    if interpolation:  # --resize_interpolation changes the pixels, so a cache made with another is stale
        meta["resize_interpolation"] = interpolation
    if "alpha_masks" in mask_keys:  # the alpha plane comes from the image file itself
        meta["alpha_mask"] = "1"
    if "conditioning_images" in mask_keys:  # a changed or replaced mask image rebuilds the file
        cst = os.stat(rec.conditioning)
        meta["conditioning"] = f"{os.path.abspath(rec.conditioning)}|{cst.st_size}|{cst.st_mtime_ns}"
    return meta


def _tensor_names(need_flip: bool, mask_keys=()) -> list[str]:
    names = ["latents"] + [MASK_TENSORS[k] for k in mask_keys]
    return names + [n + "_flipped" for n in names] if need_flip else names


def _load_valid(path: str, expected: dict, need_flip: bool, mask_keys=()):
    """{"latents": [plain, flipped], mask key: [plain, flipped], ...} if the file matches `expected`
    and holds every tensor needed (flipped ones only with flip_aug), else None."""
    if not os.path.isfile(path):
        return None
    try:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            if any(meta.get(k) != v for k, v in expected.items()):
                return None
            names = _tensor_names(need_flip, mask_keys)
            if not set(names) <= set(f.keys()):
                return None
            tensors = {n: f.get_tensor(n) for n in names}
    except Exception:  # a damaged cache file is simply rebuilt
        return None
    out = {"latents": [tensors["latents"].float(), None]}
    out.update({k: [tensors[MASK_TENSORS[k]], None] for k in mask_keys})
    if need_flip:
        out["latents"][1] = tensors["latents_flipped"].float()
        for k in mask_keys:
            out[k][1] = tensors[MASK_TENSORS[k] + "_flipped"]
    return out


def _load_pixels(job, group):
    """(image tensor for the VAE, {mask key: uint8 mask}) of one (image, flip) job."""
    from library.data.masks import to_cache
    from library.data.transforms import load_sample, to_tensor

    idx, flip = job
    rec = group.images[idx]
    keys = _mask_keys(group, idx)
    arr, alpha, cond = load_sample(rec.path, rec.placement, None, flip=flip, alpha="alpha_masks" in keys,
                                   conditioning=rec.conditioning if "conditioning_images" in keys else None,
                                   interpolation=group.subset_of(rec).resize_interpolation)
    return to_tensor(arr), to_cache(alpha, cond)


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
    mask_keys = {i: _mask_keys(group, i) for i in used}

    # image index -> {"latents": [plain, flipped], mask key: [plain, flipped]}
    results: dict[int, dict[str, list]] = {}
    todo = []
    for i in used:
        if to_disk:
            expected = _image_meta(group.images[i], dtype, fingerprint, mask_keys[i],
                                   group.subset_of(group.images[i]).resize_interpolation)
            hit = _load_valid(cache_path_for(group.images[i].path), expected, needs_flip[i], mask_keys[i])
            if hit is not None:
                results[i] = hit
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
        def submit(chunk):
            return [pool.submit(_load_pixels, job, group) for job in chunk]

        # The next chunk's images are decoded while the VAE encodes this one (on a GPU, decoding
        # and resizing take about as long as the encoding).
        pending = submit(chunks[0]) if chunks else []
        for n, chunk in enumerate(chunks):
            loaded = [f.result() for f in pending]
            pending = submit(chunks[n + 1]) if n + 1 < len(chunks) else []
            pixels = torch.stack([px for px, _ in loaded])
            latents = encode_latents(vae, pixels.to(device=device, dtype=dtype)).float().cpu()
            for (i, flip), z, (_, found_masks) in zip(chunk, latents, loaded):
                side = 1 if flip else 0
                entry = results.setdefault(i, {})
                entry.setdefault("latents", [None, None])[side] = z.clone()
                for key, mask in found_masks.items():
                    entry.setdefault(key, [None, None])[side] = mask
            if to_disk:
                # Written as soon as an image is complete, so an interrupted run keeps its work.
                done = {i for i, _ in chunk if results[i]["latents"][0] is not None
                        and (results[i]["latents"][1] is not None or not needs_flip[i])}
                _write_cache_files(group, sorted(done), results, dtype, fingerprint, mask_keys)
            bar.update(len(chunk))
    bar.close()
    group.latents = {i: tuple(results[i]["latents"]) for i in used}
    group.masks = {i: {k: tuple(v) for k, v in results[i].items() if k != "latents"} for i in used if mask_keys[i]}
    group.latents_cached = True


def _write_cache_files(group, indices, results, dtype, fingerprint, mask_keys) -> None:
    from library.fileio import save_safetensors_atomic

    for i in indices:
        rec = group.images[i]
        tensors = {}
        for key, (plain, flipped) in results[i].items():
            name = MASK_TENSORS.get(key, key)
            tensors[name] = plain
            if flipped is not None:
                tensors[name + "_flipped"] = flipped
        path = cache_path_for(rec.path)
        try:
            meta = _image_meta(rec, dtype, fingerprint, mask_keys[i], group.subset_of(rec).resize_interpolation)
            save_safetensors_atomic(tensors, path, metadata=meta)
        except OSError as err:
            raise UserError(f"cannot write the latent cache file {path} ({err.strerror or err}).",
                            path=path, fix="make the image folder writable, or drop "
                                           "--cache_latents_to_disk to cache in memory only.") from None
