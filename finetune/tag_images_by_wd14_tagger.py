#!/usr/bin/env python
"""Tag a folder of images with a WD14-style ONNX tagger and write one caption file per image
(kohya's finetune/tag_images_by_wd14_tagger.py, same flags).

    python finetune/tag_images_by_wd14_tagger.py data/img --model_dir models/wd-v1-4-convnext-tagger-v2 \
        --thresh 0.35 --batch_size 4 --caption_extension .txt --remove_underscore

--model_dir is a local folder with model.onnx and selected_tags.csv (kohya's layout,
<model_dir>/<repo_id with "/" as "_">, is found too). Nothing is downloaded: --force_download is
refused. The model always runs on ONNX Runtime (kohya's TensorFlow path is not offered; --onnx is
accepted and changes nothing).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python finetune/...`: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library import args as A  # noqa: E402
from library.errors import UserError, run_cli  # noqa: E402

DEFAULT_REPO_ID = "SmilingWolf/wd-v1-4-convnext-tagger-v2"


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Tag images with a WD14-style ONNX tagger (kohya-compatible).")
    A.add_config_arguments(p)
    p.add_argument("train_data_dir", type=str, help="folder of images to tag")
    p.add_argument("--model_dir", type=str, default="wd14_tagger_model",
                   help="folder with the tagger's model.onnx and selected_tags.csv")
    p.add_argument("--repo_id", type=str, default=DEFAULT_REPO_ID,
                   help="only names the sub-folder <model_dir>/<repo_id with _> kohya keeps models in")
    p.add_argument("--force_download", action="store_true", help="refused: this toolkit never downloads")
    p.add_argument("--onnx", action="store_true", help="accepted for kohya compatibility (always ONNX)")
    p.add_argument("--batch_size", type=A.positive_int, default=1, help="images per model call")
    p.add_argument("--max_data_loader_n_workers", type=int, default=None, help="accepted; images load in the main process")
    p.add_argument("--caption_extension", type=str, default=".txt", help="extension of the caption files written")
    p.add_argument("--caption_extention", type=str, default=None, help=argparse.SUPPRESS)  # kohya's old spelling
    p.add_argument("--thresh", type=A.unit_float, default=0.35, help="confidence needed to write a tag")
    p.add_argument("--general_threshold", type=A.unit_float, default=None, help="threshold for general tags (default --thresh)")
    p.add_argument("--character_threshold", type=A.unit_float, default=None, help="threshold for character tags (default --thresh)")
    p.add_argument("--recursive", action="store_true", help="also tag images in sub-folders")
    p.add_argument("--remove_underscore", action="store_true", help="write tags with spaces instead of underscores")
    p.add_argument("--undesired_tags", type=str, default="", help="tags never to write, separated like the captions")
    p.add_argument("--frequency_tags", action="store_true", help="print how often each tag was written")
    p.add_argument("--append_tags", action="store_true", help="add new tags after an existing caption's tags")
    p.add_argument("--use_rating_tags", action="store_true", help="write the rating tag first")
    p.add_argument("--use_rating_tags_as_last_tag", action="store_true", help="write the rating tag last")
    p.add_argument("--character_tags_first", action="store_true", help="write character tags before general tags")
    p.add_argument("--always_first_tags", type=str, default=None, help="tags that go first when present, e.g. 1girl,1boy")
    p.add_argument("--caption_separator", type=str, default=", ", help="separator between tags in the caption")
    p.add_argument("--tag_replacement", type=str, default=None,
                   help="rename tags: source1,target1;source2,target2 (escape , and ; with \\)")
    p.add_argument("--character_tag_expand", action="store_true",
                   help="write character tags name_(series) as two tags: name, series")
    return p


def main(argv=None):
    args = A.parse_args(setup_parser(), argv)
    from tqdm import tqdm

    if args.force_download:
        raise UserError("--force_download: this toolkit never downloads models.",
                        fix="copy the tagger's model.onnx and selected_tags.csv into a folder and pass it as --model_dir.")
    from library.dataprep.images import find_images
    from library.dataprep.tagger import TagOptions, load_tagger, tag_images

    tagger = load_tagger(args.model_dir, args.repo_id)
    sep = args.caption_separator
    split = lambda text: [t.strip() for t in (text or "").split(sep.strip() or sep) if t.strip()]  # noqa: E731
    opts = TagOptions(
        general_threshold=args.thresh if args.general_threshold is None else args.general_threshold,
        character_threshold=args.thresh if args.character_threshold is None else args.character_threshold,
        undesired_tags=set(split(args.undesired_tags)), remove_underscore=args.remove_underscore,
        character_tag_expand=args.character_tag_expand, tag_replacement=args.tag_replacement,
        use_rating_tags=args.use_rating_tags, use_rating_tags_as_last_tag=args.use_rating_tags_as_last_tag,
        character_tags_first=args.character_tags_first, always_first_tags=split(args.always_first_tags),
        caption_separator=sep)
    paths = find_images(args.train_data_dir, args.recursive)
    print(f"tagging {len(paths)} images with {tagger.model_path} (input {tagger.size}x{tagger.size})", flush=True)

    bar = tqdm(total=len(paths), desc="tagging", smoothing=0)  # the GUI's progress bar reads it

    def progress(done, total, path, tags):
        bar.update(done - bar.n)
        if args.debug:
            bar.write(f"{path}: {sep.join(tags)}")

    run = tag_images(tagger, paths, opts, args.caption_extention or args.caption_extension,
                     args.append_tags, args.batch_size, progress)
    if args.frequency_tags:
        print("Tag frequencies:")
        for tag, n in sorted(run.frequencies.items(), key=lambda kv: -kv[1]):
            print(f"{tag}: {n}")
    bar.close()
    print(f"wrote {len(run.written)} caption files", flush=True)
    if run.failed:
        lines = "; ".join(f"{p} ({why})" for p, why in run.failed)
        raise UserError(f"{len(run.failed)} image(s) were not tagged and got no caption file: {lines}.",
                        fix="replace or remove these files and run the tagger again (add --append_tags to keep other edits).")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
