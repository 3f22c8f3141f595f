"""The training loop and what it needs: precision, optimizers, noise and loss, state, sampling."""
