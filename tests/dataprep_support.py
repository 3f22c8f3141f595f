"""Tiny stand-ins for the user's tagger and captioning models, built offline in the real formats.

The tagger is an ONNX graph with a WD14 tagger's interface (NHWC float input 0..255 in BGR,
one sigmoid per row of selected_tags.csv). Its output depends only on the image's mean colour:
probs = sigmoid(mean_bgr / 255 @ W), so a test picks exact probabilities per solid colour.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

# (name, category) in model-output order, as a real selected_tags.csv: ratings, general, characters.
TAGS = [("general", "9"), ("sensitive", "9"), ("questionable", "9"), ("explicit", "9"),
        ("1girl", "0"), ("solo", "0"), ("long_hair", "0"), ("red_theme", "0"), ("^_^", "0"),
        ("hatsune_miku", "4"), ("saber_(fate)", "4")]

# Probability of each tag for a pure red / pure blue picture.
RED_PROBS = [0.1, 0.8, 0.05, 0.05, 0.9, 0.5, 0.3, 0.36, 0.4, 0.7, 0.34]
BLUE_PROBS = [0.6, 0.2, 0.1, 0.1, 0.2, 0.9, 0.8, 0.1, 0.1, 0.1, 0.9]


def _logit(p):
    p = np.asarray(p, dtype=np.float64)
    return np.log(p / (1 - p))


def write_tags_csv(path: Path, tags=TAGS) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["tag_id", "name", "category", "count"])
        for i, (name, cat) in enumerate(tags):
            w.writerow([1000 + i, name, cat, 100 - i])


def write_tiny_tagger(folder: Path, size: int = 32, batch: int | str = "N", tags=TAGS) -> Path:
    """model.onnx + selected_tags.csv in `folder`. Pure red -> RED_PROBS, pure blue -> BLUE_PROBS."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder.mkdir(parents=True, exist_ok=True)
    n = len(tags)
    weight = np.zeros((3, n), dtype=np.float32)  # rows: B, G, R (the model sees BGR)
    weight[2] = _logit(RED_PROBS)[:n]
    weight[0] = _logit(BLUE_PROBS)[:n]
    nodes = [
        helper.make_node("ReduceMean", ["input_1"], ["mean"], axes=[1, 2], keepdims=0),
        helper.make_node("Div", ["mean", "scale"], ["unit"]),
        helper.make_node("MatMul", ["unit", "weight"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["predictions_sigmoid"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny_wd14",
        [helper.make_tensor_value_info("input_1", TensorProto.FLOAT, [batch, size, size, 3])],
        [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, [batch, n])],
        initializer=[numpy_helper.from_array(np.array(255.0, dtype=np.float32), "scale"),
                     numpy_helper.from_array(weight, "weight")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, folder / "model.onnx")
    write_tags_csv(folder / "selected_tags.csv", tags)
    return folder


def write_tiny_blip(folder: Path, seed: int = 0) -> Path:
    """A randomly initialised BLIP captioning model with BLIP's architecture, as a transformers folder."""
    import torch
    from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor)

    folder.mkdir(parents=True, exist_ok=True)
    words = ["a", "picture", "of", "red", "blue", "circle", "square", "cat", "dog", "on", "the", "table"]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"] + words
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"), bos_token="[DEC]")
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=64, encoder_hidden_size=32,
                bos_token_id=5, pad_token_id=0, sep_token_id=3, eos_token_id=3)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=32, patch_size=16)
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision))
    model.save_pretrained(folder)
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    processor.save_pretrained(folder)
    return folder


def solid_image(path: Path, rgb, size=(40, 40)) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, rgb).save(path)
    return path
