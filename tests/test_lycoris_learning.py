"""The toy-world learning proof for LoHa, LoKr and DoRA (--network_module lycoris.kohya): the LoRA
proof of test_toy_world.py (same data, seeds, steps and bars), one algorithm per test. A file of its
own, so that the suite's two workers run it beside the toy-world file, not after it."""
from __future__ import annotations

import time

import pytest
import torch

from library.toy import metrics, world
from tests.helpers import run_train_network
from tests.test_toy_world import GUIDANCE, LORA_STEPS, SEEDS

LYCORIS_ARGS = {"loha": ["--network_dim=8", "--network_alpha=8", "--network_args", "algo=loha", "preset=attn-mlp"],
                "lokr": ["--network_dim=8", "--network_alpha=8", "--network_args", "algo=lokr", "factor=4",
                         "preset=attn-mlp"],
                "dora": ["--network_dim=8", "--network_alpha=8", "--network_args", "algo=dora", "preset=attn-mlp"]}


@pytest.mark.slow(cpu_minutes=6)
@pytest.mark.parametrize("algo", list(LYCORIS_ARGS))
def test_lycoris_algorithms_teach_the_new_colour(toy_model, tmp_path, algo):
    """The LoRA proof for LoHa / LoKr / DoRA (--network_module lycoris.kohya): same data, seeds, steps."""
    from library.toy.preview import apply_lora, generate, make_pipeline
    from library.toy.vae import images_to_tensor

    data = world.write_lora_dataset(tmp_path / "data", count=16, repeats=10)
    start = time.perf_counter()
    run_train_network([f"--pretrained_model_name_or_path={toy_model.single_file}", f"--train_data_dir={data.parent}",
                       f"--output_dir={tmp_path / 'out'}", "--resolution=64", "--network_module=lycoris.kohya",
                       "--train_batch_size=8", "--learning_rate=1e-3", f"--max_train_steps={LORA_STEPS}",
                       "--cache_latents", "--caption_extension=.txt", "--seed=1", "--output_name=toy",
                       *LYCORIS_ARGS[algo]])
    trained = time.perf_counter() - start
    pipe = make_pipeline(toy_model.single_file)
    network = apply_lora(pipe, tmp_path / "out" / "toy.safetensors")  # networks.lora hands it to networks.lycoris
    prompt = world.caption(world.NEW_TOKEN, world.NEW_SHAPE)
    samples = {}
    for multiplier in (0.0, 1.0):
        network.set_multiplier(multiplier)
        samples[multiplier] = generate(pipe, prompt, SEEDS, guidance=GUIDANCE)
    images, _ = world.new_concept_images(16, seed=1000)
    with torch.no_grad():
        recon = pipe.vae.decode(pipe.vae.encode(images_to_tensor(images)).latent_dist.mean).sample
    reference = metrics.colour_excess((recon + 1) / 2, "green")
    off, on = (metrics.colour_excess(samples[m], "green") for m in (0.0, 1.0))
    print(f"\n{algo}: green in '{prompt}': off {off:.4f}, on {on:.4f}, reference {reference:.4f}; "
          f"{metrics.dominant_colours(samples[1.0]).count('green')}/16 green with it on, "
          f"{metrics.dominant_colours(samples[0.0]).count('green')}/16 off; training {trained:.0f} s")
    assert on - off >= 0.5 * (reference - off), (off, on, reference)
    assert metrics.dominant_colours(samples[1.0]).count("green") >= 12
    assert metrics.dominant_colours(samples[0.0]).count("green") <= 2
