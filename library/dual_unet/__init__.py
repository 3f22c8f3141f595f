"""Paired two-modality generation (train_dual_unet.py, gen_pairs.py): two UNets over one frozen base,
one LoRA each, trained on registered pairs; pairs are generated from one shared initial noise.

    cli.py       train_dual_unet.py's parser and main
    data.py      pairs from two folders (matched by file stem) or a CSV/JSONL listing; split; batches
    model.py     the weight-sharing twin UNet, one LoRA per UNet, loading a checkpoint for generation
    losses.py    Sobel structure loss, high-frequency loss, predicted x0, the sqrt(abar) weighting
    step.py      the paired objective (training and validation)
    outputs.py   run folder, text logs, checkpoints (best, rolling latest), --resume resolution
    sampling.py  pairs from shared noise through diffusers' pipeline; side-by-side PNGs and grids
    trainer.py   the training run, on the shared loop (library/training/loop.py)
    metrics.py   edge correlation of pairs, colour statistics
    toy.py, toy_base.py, proof.py   the synthetic world, its cached tiny base, the learning experiment
"""
