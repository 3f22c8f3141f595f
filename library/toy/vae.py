"""The toy VAE: SD's VAE structure, set up as an exact 8x8 box-filter autoencoder.

Measured: SD's VAE structure at small widths, trained from random init on broad random content,
barely learned even plain colours in 400 CPU steps (recon MSE stuck near 0.22 on [-1, 1]). Two
reasons: every GroupNorm on the main path normalises each image's channels, which erases absolute
colour; and the deep random network passes almost no input signal at first. This init removes both:

- Residual branches (resnet conv2, attention to_out) start at zero, so each block is the identity.
- Downsamplers average 2x2 pixels, upsamplers copy (nearest): the encoder computes an 8x8 average,
  the decoder repeats it.
- Every GroupNorm group of 4 channels holds (c, -c, K, -K): a content value, its negation and two
  large constant anchors. The group mean is then exactly 0 and its std ~K/sqrt(2) whatever the
  image, so GroupNorm is a fixed scaling that the norm's weight undoes: colours pass unchanged.
- Before each SiLU the content is shifted by +SHIFT, where SiLU is the identity to 1e-7; the next
  conv reads (SiLU(c + s) - SiLU(-c + s)) / 2 = c.

The result reconstructs ANY colour exactly (as 8x8 blocks), which is what the LoRA test needs: a
VAE that can represent the new colour. Fine-tuning it on broad content was measured to make it
worse within a CPU budget (world-image recon MSE 0.011 -> 0.019 after 100 decoder steps, 0.012 ->
0.024 after 200 full steps, ~1 s each), so the toy base uses it as built. The groups of 4 need 128
channels (32 groups), hence TOY_VAE's widths. Latent channel 3 stays empty (always 0).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from library.models.tiny import TINY_VAE

TOY_VAE = {**TINY_VAE, "block_out_channels": (128, 128, 128, 128)}  # 4 channels per norm group

ANCHOR = 100.0
SHIFT = 20.0
LOGVAR = 2 * math.log(0.02)  # posterior std 0.02 on latents in [-1, 1]: a little noise for the decoder


def _zero(*modules) -> None:
    for m in modules:
        torch.nn.init.zeros_(m.weight)
        if m.bias is not None:
            torch.nn.init.zeros_(m.bias)


def _stream_norm(norm: torch.nn.GroupNorm, shift: float = 0.0) -> None:
    """GroupNorm over (c, -c, K, -K) groups -> (c + shift, -c + shift, 0, 0)."""
    ch = norm.num_channels
    if ch != 4 * norm.num_groups:
        raise ValueError(f"the box-filter init needs 4 channels per norm group, not {ch / norm.num_groups}")
    weight = torch.zeros(ch)
    bias = torch.zeros(ch)
    content = torch.cat([torch.arange(0, ch, 4), torch.arange(1, ch, 4)])
    weight[content] = ANCHOR / math.sqrt(2)
    bias[content] = shift
    with torch.no_grad():
        norm.weight.copy_(weight)
        norm.bias.copy_(bias)


def _write_slots(conv: torch.nn.Conv2d, n_inputs: int) -> None:
    """A 3x3 conv from n plain channels to the grouped layout: slot k = (x_k, -x_k, K, -K)."""
    _zero(conv)
    with torch.no_grad():
        for k in range(n_inputs):
            conv.weight[4 * k, k, 1, 1] = 1.0
            conv.weight[4 * k + 1, k, 1, 1] = -1.0
        conv.bias[2::4] = ANCHOR
        conv.bias[3::4] = -ANCHOR


def _read_slots(conv: torch.nn.Conv2d, n_outputs: int) -> None:
    """A 3x3 conv from the shifted, SiLU'd layout to n plain channels: out_k = (a - b) / 2 = x_k."""
    _zero(conv)
    with torch.no_grad():
        for k in range(n_outputs):
            conv.weight[k, 4 * k, 1, 1] = 0.5
            conv.weight[k, 4 * k + 1, 1, 1] = -0.5


def _identity_blocks(part) -> None:
    """Zero the residual branches; make the stream's norms fixed scalings (the branch then sees c)."""
    for name, module in part.named_modules():
        if name.endswith("conv2") or name.endswith("to_out.0"):
            _zero(module)
        elif name.endswith("norm1") or name.endswith("group_norm"):
            _stream_norm(module)
        elif name.endswith("conv_shortcut"):
            raise ValueError("the box-filter init needs equal widths at every level (no conv_shortcut)")


@torch.no_grad()
def box_filter_init(vae) -> None:
    """Make `vae` (an AutoencoderKL with 4 latent channels) an exact 8x8 average / nearest-repeat AE."""
    latent = vae.config.latent_channels
    enc, dec = vae.encoder, vae.decoder
    _write_slots(enc.conv_in, 3)
    _identity_blocks(enc)
    for block in enc.down_blocks:
        for down in block.downsamplers or []:
            _zero(down.conv)
            for c in range(down.conv.out_channels):
                down.conv.weight[c, c, 0:2, 0:2] = 0.25  # pad (0,1,0,1) + stride 2: a 2x2 mean
    _stream_norm(enc.conv_norm_out, SHIFT)
    _read_slots(enc.conv_out, 3)  # means: RGB in latent channels 0-2; channel 3 starts empty
    enc.conv_out.bias[latent:] = LOGVAR
    for conv in (vae.quant_conv, vae.post_quant_conv):
        _zero(conv)
        conv.weight[:, :, 0, 0] = torch.eye(conv.out_channels)

    _write_slots(dec.conv_in, latent)
    _identity_blocks(dec)
    for block in dec.up_blocks:
        for up in block.upsamplers or []:
            _zero(up.conv)
            for c in range(up.conv.out_channels):
                up.conv.weight[c, c, 1, 1] = 1.0  # after nearest x2: a plain copy
    _stream_norm(dec.conv_norm_out, SHIFT)
    _read_slots(dec.conv_out, 3)


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 or [0, 1] float NHWC -> float NCHW in [-1, 1], the VAE's range."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    if images.dtype == np.uint8:
        x = x / 255.0
    return x * 2 - 1


@torch.no_grad()
def normalise_latent_scale(vae, images: np.ndarray) -> float:
    """Rescale the latent space so that latents * 0.18215 have unit std on `images`.

    The single-file layout has no VAE config, so loaders assume SD's scaling factor 0.18215. Rather
    than write another factor into the diffusers config only, the encoder's mean is multiplied by k
    and the decoder's first conv divided by k: the same autoencoder, latents in SD's range.
    """
    std = float(vae.encode(images_to_tensor(images)).latent_dist.mean.std())
    k = 1.0 / (vae.config.scaling_factor * std)
    c = vae.config.latent_channels
    vae.quant_conv.weight[:c] *= k
    vae.quant_conv.bias[:c] *= k
    vae.quant_conv.bias[c:] += 2 * math.log(k)  # log-variance: the posterior std scales with the mean
    vae.post_quant_conv.weight /= k
    return k


def build_toy_vae(probe_images: np.ndarray, channels=TOY_VAE["block_out_channels"], seed: int = 0):
    """The box-filter VAE with SD's latent scale measured on `probe_images`; returns (vae, k).

    The weights the init leaves alone (inside the zeroed branches) are random from `seed`, so the
    saved files repeat byte for byte.
    """
    from diffusers import AutoencoderKL

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        vae = AutoencoderKL(**{**TOY_VAE, "block_out_channels": tuple(channels)}).eval()
    box_filter_init(vae)
    return vae, normalise_latent_scale(vae, probe_images)
