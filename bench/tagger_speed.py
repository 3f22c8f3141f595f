#!/usr/bin/env python
"""Tagging speed of finetune/tag_images_by_wd14_tagger.py with a tagger of the real WD14 size.

No real tagger can be downloaded here, so the bench builds one with random weights and the
architecture of wd-v1-4-convnext-tagger-v2 (ConvNeXt-Base: widths 128/256/512/1024, depths
3/3/27/3, 448x448 NHWC input, 9083 sigmoid outputs; about 88 M parameters), exports it to ONNX
(torch's TorchScript exporter) and times our tagger on it: images per second at a few batch sizes,
ONNX Runtime on the CPU with the threads given.

    python bench/tagger_speed.py [--images 16] [--threads 1] [--batch_sizes 1 4]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TAGS = 9083
SIZE = 448


def convnext_tagger():
    import torch
    from torch import nn

    class ChannelsLastNorm(nn.LayerNorm):
        def forward(self, x):  # NCHW in, normalised over C
            return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    class Block(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
            self.norm = nn.LayerNorm(dim)
            self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
            self.gamma = nn.Parameter(torch.full((dim,), 1e-6))

        def forward(self, x):
            y = self.dw(x).permute(0, 2, 3, 1)
            y = self.fc2(nn.functional.gelu(self.fc1(self.norm(y)))) * self.gamma
            return x + y.permute(0, 3, 1, 2)

    class Tagger(nn.Module):
        def __init__(self, dims=(128, 256, 512, 1024), depths=(3, 3, 27, 3)):
            super().__init__()
            layers = [nn.Conv2d(3, dims[0], 4, stride=4), ChannelsLastNorm(dims[0])]
            for i, (dim, depth) in enumerate(zip(dims, depths)):
                if i:
                    layers += [ChannelsLastNorm(dims[i - 1]), nn.Conv2d(dims[i - 1], dim, 2, stride=2)]
                layers += [Block(dim) for _ in range(depth)]
            self.body = nn.Sequential(*layers)
            self.norm = nn.LayerNorm(dims[-1])
            self.head = nn.Linear(dims[-1], TAGS)

        def forward(self, x):  # NHWC 0..255 BGR, as WD14 taggers take it
            x = self.body(x.permute(0, 3, 1, 2) / 255.0)
            return torch.sigmoid(self.head(self.norm(x.mean((2, 3)))))

    torch.manual_seed(0)
    return Tagger().eval()


def build(folder: Path) -> int:
    import torch

    from library.dataprep.tagger import CHARACTER, GENERAL, RATING

    model = convnext_tagger()
    params = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        torch.onnx.export(model, torch.zeros(1, SIZE, SIZE, 3), str(folder / "model.onnx"), input_names=["input_1"],
                          output_names=["predictions_sigmoid"], dynamic_axes={"input_1": {0: "N"}},
                          opset_version=17, dynamo=False)
    rows = ["tag_id,name,category,count"]
    rows += [f"{i},{cat}_{i},{cat},{TAGS - i}" for i, cat in
             enumerate([RATING] * 4 + [GENERAL] * (TAGS - 4 - 2000) + [CHARACTER] * 2000)]
    (folder / "selected_tags.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return params


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 4])
    args = p.parse_args()

    import numpy as np
    import onnxruntime as ort
    from PIL import Image

    from library.dataprep.tagger import TagCatalog, TagOptions, Tagger, tag_images

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        params = build(tmp)
        export_s = time.perf_counter() - start
        rng = np.random.default_rng(0)
        images = tmp / "img"
        images.mkdir()
        paths = []
        for i in range(args.images):
            path = images / f"{i:03d}.png"
            Image.fromarray(rng.integers(0, 255, (768, 512, 3), dtype=np.uint8)).save(path)
            paths.append(path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        tagger = Tagger(tmp / "model.onnx", TagCatalog.read(tmp / "selected_tags.csv"))
        tagger.session = ort.InferenceSession(str(tmp / "model.onnx"), options, providers=["CPUExecutionProvider"])
        results = {"params_m": round(params / 1e6, 1), "export_s": round(export_s, 1), "threads": args.threads,
                   "image_size": "512x768 PNG", "runs": []}
        print(f"ConvNeXt-Base tagger: {params / 1e6:.1f} M parameters, {TAGS} tags, exported in {export_s:.0f} s; "
              f"ONNX Runtime {ort.__version__}, {args.threads} thread(s)")
        list(tagger.predict(paths[:1]))  # warm-up
        for batch in args.batch_sizes:
            start = time.perf_counter()
            run = tag_images(tagger, paths, TagOptions(), batch_size=batch)
            seconds = time.perf_counter() - start
            assert len(run.written) == len(paths)
            rate = len(paths) / seconds
            results["runs"].append({"batch_size": batch, "images": len(paths), "seconds": round(seconds, 2),
                                    "images_per_s": round(rate, 2)})
            print(f"  batch {batch}: {len(paths)} images in {seconds:.1f} s = {rate:.2f} images/s "
                  "(load, preprocess, model, write)")
    out = Path(__file__).resolve().parent / "results" / f"tagger-{platform.node()}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
