"""Dataset preparation: the step before training (tagging, captioning, metadata, caption editing).

Usage sketch (what the `finetune/` scripts and the GUI's caption editor do):

    from library.dataprep import images, tagger, captions, metadata

    paths = images.find_images("data/img", recursive=False)
    wd14 = tagger.load_tagger("models/wd-v1-4-convnext-tagger-v2")   # model.onnx + selected_tags.csv
    for path, probs in wd14.predict(paths, batch_size=4):
        tags = tagger.select_tags(probs, wd14.catalog, tagger.TagOptions(general_threshold=0.35))
        captions.write_caption(captions.caption_path(path, ".txt"), ", ".join(tags))
    meta = metadata.merge_files(paths, field="tags", extension=".txt", full_path=False)

Module map:
- images.py     which files are images (the training data code's rule), recursive listing, loading
- captions.py   caption files: read (encoding reported, never overwritten), atomic write, tag lists,
                folder-wide tag counts and add / remove / replace, the keep-tokens split
- tagger.py     WD14-style ONNX tagger: the tag CSV, the preprocessing the model expects, thresholds
                and tag ordering as kohya's tag_images_by_wd14_tagger.py
- captioner.py  captions from a local vision-language model folder (BLIP, GIT) through transformers
- metadata.py   kohya's fine-tuning metadata JSON (`--in_json`): merge captions / tags into it, clean it

Everything writes through library.fileio (atomic), so an interrupted run never leaves half a caption.
"""
