"""What the trainers share: the run skeleton (run), the training loop (loop) and what it needs:
accelerator and trackers (accel), precision, optimizers and schedules (optim, schedulers), noise and
loss (diffusion, noise, losses), state (checkpoint), metadata, sampling, text encoding, validation.
The trainers themselves live with their models: library/lora, library/controlnet, library/dual_unet."""
