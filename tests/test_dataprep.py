"""Dataset preparation: the WD14 tagger, the captioner, the metadata scripts and the caption tools.

The expected tag lists follow kohya's finetune/tag_images_by_wd14_tagger.py (`run_batch`):
general/character tags by their thresholds in model order, undesired tags dropped, character tags
inserted at the front one by one with --character_tags_first, the rating by argmax first or last,
--always_first_tags moved to the front, `remove_underscore` only for tags longer than 3 characters.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.dataprep_support import RED_PROBS, TAGS, solid_image, write_tags_csv, write_tiny_blip, write_tiny_tagger

REPO = Path(__file__).resolve().parents[1]
RED, BLUE = (255, 0, 0), (0, 0, 255)


def run_script(script, *args, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(REPO / script), *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    proc.raw_stderr = proc.stderr
    proc.stderr = " ".join(proc.stderr.split())  # error messages are wrapped at 100 columns
    return proc


@pytest.fixture(scope="module")
def tagger_dir(tmp_path_factory):
    return write_tiny_tagger(tmp_path_factory.mktemp("wd14"))


@pytest.fixture()
def images(tmp_path):
    folder = tmp_path / "img"
    solid_image(folder / "red.png", RED)
    solid_image(folder / "blue.jpg", BLUE, size=(32, 32))
    return folder


def tags_of(path: Path) -> str:
    return path.read_text(encoding="utf-8")


# --- tag selection (in process: every option against kohya's rule) ---------------------------------

@pytest.mark.parametrize("opts, expected", [
    ({}, "1girl, solo, red_theme, ^_^, hatsune_miku"),
    ({"character_threshold": 0.3}, "1girl, solo, red_theme, ^_^, hatsune_miku, saber_(fate)"),
    ({"general_threshold": 0.5}, "1girl, solo, hatsune_miku"),
    ({"remove_underscore": True}, "1girl, solo, red theme, ^_^, hatsune miku"),
    ({"undesired_tags": {"solo", "hatsune_miku"}}, "1girl, red_theme, ^_^"),
    ({"character_tags_first": True, "character_threshold": 0.3},
     "saber_(fate), hatsune_miku, 1girl, solo, red_theme, ^_^"),
    ({"use_rating_tags": True}, "sensitive, 1girl, solo, red_theme, ^_^, hatsune_miku"),
    ({"use_rating_tags_as_last_tag": True}, "1girl, solo, red_theme, ^_^, hatsune_miku, sensitive"),
    ({"always_first_tags": ["red_theme", "absent"]}, "red_theme, 1girl, solo, ^_^, hatsune_miku"),
    ({"character_tag_expand": True, "character_threshold": 0.3},
     "1girl, solo, red_theme, ^_^, hatsune_miku, saber, fate"),
    ({"tag_replacement": "1girl,one girl;red_theme,red\\,theme"}, "one girl, solo, red,theme, ^_^, hatsune_miku"),
    ({"caption_separator": "|"}, "1girl|solo|red_theme|^_^|hatsune_miku"),
])
def test_select_tags_follows_kohya(opts, expected, tmp_path):
    from library.dataprep.tagger import TagCatalog, TagOptions, select_tags

    write_tags_csv(tmp_path / "t.csv")
    catalog = TagCatalog.read(tmp_path / "t.csv")
    options = TagOptions(**opts)
    assert options.caption_separator.join(select_tags(np.array(RED_PROBS), catalog, options)) == expected


def test_preprocess_pads_white_and_reverses_channels():
    from PIL import Image

    from library.dataprep.tagger import preprocess

    img = Image.new("RGB", (40, 20), (255, 0, 0))  # wide: white bands above and below
    arr = preprocess(img, 40)
    assert arr.shape == (40, 40, 3) and arr.dtype == np.float32
    assert arr[0, 0].tolist() == [255, 255, 255]           # padding is white
    assert arr[20, 20].tolist() == [0, 0, 255]             # red in BGR order
    assert arr[:10].min() == 255 and arr[30:].min() == 255  # 10 rows of padding each side


# --- the tagger script end to end ------------------------------------------------------------------

def test_tagger_script_writes_captions(tagger_dir, images):
    proc = run_script("finetune/tag_images_by_wd14_tagger.py", images, "--model_dir", tagger_dir,
                      "--batch_size", 2, "--remove_underscore", "--frequency_tags", "--undesired_tags", "^_^")
    assert tags_of(images / "red.txt") == "1girl, solo, red theme, hatsune miku\n"
    assert tags_of(images / "blue.txt") == "solo, long hair, saber (fate)\n"
    assert "solo: 2" in proc.stdout and "wrote 2 caption files" in proc.stdout
    from gui.runner import parse_progress

    progress = parse_progress(proc.raw_stderr)  # what the GUI's progress bar shows for this run
    assert progress is not None and (progress.desc, progress.n, progress.total) == ("tagging", 2, 2)
    assert "requires torchvision" not in proc.stdout + proc.stderr


def test_tagger_kohya_layout_recursive_and_append(tagger_dir, images, tmp_path):
    # kohya keeps models in <model_dir>/<repo_id with _>
    models = tmp_path / "models"
    (models / "Me_tagger").mkdir(parents=True)
    for f in ("model.onnx", "selected_tags.csv"):
        (models / "Me_tagger" / f).write_bytes((tagger_dir / f).read_bytes())
    solid_image(images / "sub" / "deep.png", BLUE)
    (images / "red.caption").write_text("mytag, solo\n", encoding="utf-8")
    run_script("finetune/tag_images_by_wd14_tagger.py", images, "--model_dir", models, "--repo_id", "Me/tagger",
               "--recursive", "--append_tags", "--caption_extension", ".caption")
    assert tags_of(images / "red.caption") == "mytag, solo, 1girl, red_theme, ^_^, hatsune_miku\n"
    assert tags_of(images / "sub" / "deep.caption") == "solo, long_hair, saber_(fate)\n"


def test_tagger_fixed_batch_model(tmp_path, images):
    folder = write_tiny_tagger(tmp_path / "fixed", batch=1)
    from library.dataprep.tagger import load_tagger

    tagger = load_tagger(folder)
    assert tagger.fixed_batch == 1
    out = list(tagger.predict(sorted(images.glob("*.*")), batch_size=8))
    assert len(out) == 2 and np.allclose(out[1][1], RED_PROBS, atol=1e-5)


def test_tagger_bad_inputs(tmp_path, images, tagger_dir):
    empty = tmp_path / "empty_model"
    empty.mkdir()
    proc = run_script("finetune/tag_images_by_wd14_tagger.py", images, "--model_dir", empty, check=False)
    assert proc.returncode == 2 and "model.onnx" in proc.stderr and "--model_dir" in proc.stderr
    assert "Traceback" not in proc.stderr

    short = tmp_path / "short"
    short.mkdir()
    (short / "model.onnx").write_bytes((tagger_dir / "model.onnx").read_bytes())
    write_tags_csv(short / "selected_tags.csv", TAGS[:-1])
    proc = run_script("finetune/tag_images_by_wd14_tagger.py", images, "--model_dir", short, check=False)
    assert proc.returncode == 2 and "11 outputs" in proc.stderr and "10 tags" in proc.stderr

    proc = run_script("finetune/tag_images_by_wd14_tagger.py", images, "--model_dir", tagger_dir,
                      "--force_download", check=False)
    assert proc.returncode == 2 and "never downloads" in proc.stderr

    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    proc = run_script("finetune/tag_images_by_wd14_tagger.py", images, "--model_dir", tagger_dir, check=False)
    assert proc.returncode == 2 and "broken.png" in proc.stderr
    assert not (images / "broken.txt").exists()
    assert (images / "red.txt").exists() and (images / "blue.txt").exists()  # the good ones are tagged
    assert not [p for p in images.iterdir() if p.name.endswith(".tmp")]


def test_tagger_leaves_a_caption_in_a_bad_encoding(tagger_dir, images):
    from library.dataprep.tagger import TagOptions, load_tagger, tag_images

    raw = "赤い, solo".encode("shift_jis")
    (images / "red.txt").write_bytes(raw)
    run = tag_images(load_tagger(tagger_dir), sorted(images.glob("*.*g")), TagOptions(), append_tags=True)
    assert (images / "red.txt").read_bytes() == raw
    assert [p.name for p, _ in run.failed] == ["red.png"] and "UTF-8" in run.failed[0][1]


# --- captioning --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory):
    return write_tiny_blip(tmp_path_factory.mktemp("blip"))


def test_captioner_script_matches_transformers(blip_dir, images):
    proc = run_script("finetune/make_captions.py", images, "--caption_weights", blip_dir, "--beam_search",
                      "--num_beams", 2, "--max_length", 12, "--min_length", 3, "--batch_size", 2)
    assert "requires torchvision" not in proc.stderr  # transformers' PIL fallback notice is filtered
    import torch
    from PIL import Image
    from transformers import BlipForConditionalGeneration, BlipProcessor

    processor = BlipProcessor.from_pretrained(blip_dir)
    model = BlipForConditionalGeneration.from_pretrained(blip_dir).eval()
    for name, file in (("red", "red.png"), ("blue", "blue.jpg")):
        image = Image.open(images / file).convert("RGB")
        with torch.no_grad():
            ids = model.generate(**processor(images=image, return_tensors="pt"), num_beams=2, do_sample=False,
                                 max_length=12, min_length=3)
        expected = " ".join(processor.decode(ids[0], skip_special_tokens=True).split())
        written = (images / f"{name}.caption").read_text(encoding="utf-8")
        assert written == expected + "\n" and len(expected.split()) >= 1


def test_captioner_sampling_is_seeded(blip_dir, images, tmp_path):
    outs = []
    for _ in range(2):
        run_script("finetune/make_captions.py", images, "--caption_weights", blip_dir, "--max_length", 10,
                   "--seed", 7)
        outs.append((images / "red.caption").read_text(encoding="utf-8"))
    assert outs[0] == outs[1] and outs[0].strip()


def test_captioner_bad_inputs(tmp_path, images):
    pth = tmp_path / "model_large_caption.pth"
    pth.write_bytes(b"x")
    proc = run_script("finetune/make_captions.py", images, "--caption_weights", pth, check=False)
    assert proc.returncode == 2 and "transformers model folder" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_script("finetune/make_captions.py", images, "--caption_weights", tmp_path, check=False)
    assert proc.returncode == 2 and "config.json is missing" in proc.stderr


# --- metadata -----------------------------------------------------------------------------------------

def test_merge_scripts_build_the_metadata(tmp_path, images):
    (images / "red.caption").write_text("a red picture\n", encoding="utf-8")
    (images / "blue.caption").write_text("a blue picture\n", encoding="utf-8")
    (images / "red.txt").write_text("1girl, solo\n", encoding="utf-8")
    meta = tmp_path / "meta.json"
    run_script("finetune/merge_captions_to_metadata.py", images, meta)
    proc = run_script("finetune/merge_dd_tags_to_metadata.py", images, meta)  # adds to meta.json (kohya)
    assert "1 image(s) have no .txt file" in proc.stdout and "blue.jpg" in proc.stdout
    assert json.loads(meta.read_text()) == {"red": {"caption": "a red picture", "tags": "1girl, solo"},
                                           "blue": {"caption": "a blue picture"}}
    proc = run_script("finetune/merge_dd_tags_to_metadata.py", images, meta, "--recursive", check=False)
    assert proc.returncode == 2 and "--full_path" in proc.stderr


def test_merge_refuses_bad_encoding_without_writing(tmp_path, images):
    (images / "red.caption").write_bytes("赤".encode("shift_jis"))
    meta = tmp_path / "meta.json"
    proc = run_script("finetune/merge_captions_to_metadata.py", images, meta, check=False)
    assert proc.returncode == 2 and "red.caption" in proc.stderr and "UTF-8" in proc.stderr
    assert not meta.exists()


def test_clean_follows_kohya_rules():
    # the rules of kohya's finetune/clean_captions_and_tags.py (clean_tags, clean_caption)
    from library.dataprep.metadata import clean_caption, clean_tags

    assert clean_tags("1girl, long_hair, ^_^, white_shirt, shirt, rating:safe") == "1girl, long hair, ^_^, white shirt"
    assert clean_tags("2girls, blue eyes, red eyes, long hair, blonde hair, black hair, smile") == \
        "2girls, long hair, smile"
    assert clean_tags("1girl, blue eyes, red eyes") == "1girl, blue eyes, red eyes"  # one person: kept
    assert clean_caption("a cartoon image of a young anime woman") == "an image of a girl"


def test_clean_script_round_trip(tmp_path):
    meta = tmp_path / "m.json"
    meta.write_text(json.dumps({"a": {"caption": "a lady", "tags": "long_hair"}, "b": {"caption": "x"}}))
    proc = run_script("finetune/clean_captions_and_tags.py", meta, tmp_path / "out.json")
    assert json.loads((tmp_path / "out.json").read_text()) == {
        "a": {"caption": "a girl", "tags": "long hair"}, "b": {"caption": "x"}}
    assert "b: no tags" in proc.stdout


# --- caption editing (what the GUI's caption editor calls) --------------------------------------------

def test_folder_captions_edit_and_counts(tmp_path, images):
    from library.dataprep.captions import FolderCaptions, keep_tokens_preview

    (images / "red.txt").write_text("1girl, solo, red\n", encoding="utf-8")
    (images / "blue.txt").write_text("solo, blue\n", encoding="utf-8")
    bad = images / "odd.txt"
    solid_image(images / "odd.png", RED)
    bad.write_bytes("赤".encode("shift_jis"))
    folder = FolderCaptions(sorted(images.glob("*.*g")))
    assert folder.tag_counts() == {"solo": 2, "1girl": 1, "blue": 1, "red": 1}
    assert [p.name for p in folder.unreadable] == ["odd.txt"]
    assert folder.add_tag("mychar", first=True) == 2
    assert folder.replace_tag("solo", "alone") == 2
    assert folder.remove_tag("red") == 1
    assert tags_of(images / "red.txt") == "mychar, 1girl, alone\n"
    assert tags_of(images / "blue.txt") == "mychar, alone, blue\n"
    assert bad.read_bytes() == "赤".encode("shift_jis")  # never rewritten
    assert [p.name for p in folder.search("BLUE")] == ["blue.jpg"]
    assert keep_tokens_preview("a, b, c, d", keep_tokens=2) == (["a", "b"], ["c", "d"], [])
    assert keep_tokens_preview("a, b ||| c, d ||| e", keep_tokens_separator="|||") == (["a", "b"], ["c", "d"], ["e"])


def test_in_json_from_the_tools_trains(tmp_path, tiny_model, tagger_dir):
    """The metadata the tagger and the merge script make is what train_network.py --in_json reads."""
    data = tmp_path / "img"
    for i in range(2):
        solid_image(data / f"r{i}.png", RED, size=(64, 64))
    run_script("finetune/tag_images_by_wd14_tagger.py", data, "--model_dir", tagger_dir)
    for i in range(2):
        (data / f"r{i}.caption").write_text("a red picture\n", encoding="utf-8")
    meta = tmp_path / "meta.json"
    run_script("finetune/merge_captions_to_metadata.py", data, meta)
    run_script("finetune/merge_dd_tags_to_metadata.py", data, meta)
    assert json.loads(meta.read_text())["r0"] == {"caption": "a red picture",
                                                 "tags": "1girl, solo, red_theme, ^_^, hatsune_miku"}
    out = tmp_path / "out"
    proc = run_script("train_network.py", "--pretrained_model_name_or_path", tiny_model.single_file,
                      "--train_data_dir", data, "--in_json", meta, "--output_dir", out, "--output_name", "m",
                      "--resolution", "64", "--max_train_steps", "2", "--train_batch_size", "1",
                      "--network_dim", "2", "--learning_rate", "1e-4")
    from safetensors import safe_open

    with safe_open(out / "m.safetensors", "pt") as f:
        frequency = json.loads(f.metadata()["ss_tag_frequency"])
    assert list(frequency.values())[0]["hatsune_miku"] == 2, proc.stdout  # kohya counts the metadata's tags
