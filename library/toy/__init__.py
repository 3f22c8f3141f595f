"""The toy world: proof, offline and on a CPU, that LoRA training teaches a model something new.

- world.py     coloured shapes on grey backgrounds with captions; the new concept "a sks circle"
- vae.py       the toy VAE: SD's VAE structure set up as an exact 8x8 box-filter autoencoder
- pretrain.py  pretrain the UNet and CLIP text encoder (SD1.5 structure, small widths) on the world
- build.py     build once, cache in .cache/toy/<version>/, write diffusers folder + single file
- metrics.py   colour statistics of samples (how green, which colour dominates)
- preview.py   samples through diffusers' StableDiffusionPipeline with a LoRA off and on

`python -m library.toy build --output_dir DIR` writes DIR/toy-sd15/, DIR/toy-sd15.safetensors and
DIR/toy_world.json; `make demo` and the tests use the cached build.
"""
