"""Shared logic of the networks/ tools (merge, svd merge, resize, extract, check) and gen_img.py.

weights.py   read a LoRA file into per-module factors; write one (contract names, hashes)
svd.py       exact SVD of a factored delta, rank selection, back to (down, up)
verify.py    the file-contract checker (check_lora_weights.py --verify, train_network's self-check)
model_fit.py does a LoRA fit a model; merge LoRAs into a model's weights
cli.py       flags and output-path checks the scripts share
"""
