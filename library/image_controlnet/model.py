"""The pose-conditioned generator: backbone -> generator with zero-initialised pose control -> pose head.

  encoder    the backbone (backbones.py) and a 1x1 projection to --feature_dim channels; its finer
             feature maps reach the generator stages of the same resolution through 1x1 convs
             (`skips`, U-Net style). Without them identity detail had to pass the 4x4 map at 32 px,
             and a toy model after 900 steps still drew grey blobs (+1.7 dB over copying the source);
             with them, +4.3 dB after 600 steps, pose followed (measured; docs/train_image_controlnet.md).
  pose_embed an MLP on (sin, cos) of the target angles (smooth, bounded, no wrap-around jump)
  control    one block per controlled generator stage, --num_control_layers of them: it sees the
             stage's features plus coordinate channels, modulated by the pose embedding, and adds
             its output through a zero-initialised 1x1 conv. As in ControlNet, the untrained branch
             adds exactly nothing, so it cannot disturb a trained generator at the start of stage 1
             of the two-stage recipe; the zero conv still gets gradients and opens up.
  generator  upsampling stages from the feature map to the image (--freeze_generator freezes this)
  pose_head  reads (yaw, pitch, roll) back from the generated image; it keeps spatial layout
             (coordinate channels, pooled to 4x4 and flattened): a global average pool stayed at
             chance in our earlier toy experiments.
Only GroupNorm in the trained parts, so accumulation of k x b equals one step of k*b.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from library.image_controlnet.backbones import build_backbone

POSE_SCALE = 45.0  # degrees; the pose head predicts angle / POSE_SCALE, so targets are O(1)
EMBED_DIM = 128
MIN_CHANNELS = 16  # the last, full-resolution stages of small models stay cheap


@dataclass
class ModelConfig:
    backbone: str = "iresnet50"
    image_size: int = 112
    feature_dim: int = 512
    pose_dim: int = 3
    num_control_layers: int = 3

    def to_dict(self) -> dict:
        return asdict(self)


def num_generator_stages(backbone_stride: int) -> int:
    return int(round(math.log2(backbone_stride)))


def _groups(channels: int) -> int:
    return math.gcd(8, channels)


def coords_like(x: torch.Tensor) -> torch.Tensor:
    """Two channels of x and y positions in [-1, 1], shaped like x's spatial dims."""
    b, _, h, w = x.shape
    ys = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype).view(1, 1, h, 1).expand(b, 1, h, w)
    xs = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype).view(1, 1, 1, w).expand(b, 1, h, w)
    return torch.cat([xs, ys], dim=1)


def rotation_matrices(pose_deg: torch.Tensor) -> torch.Tensor:
    """[B, 3, 3] rotations R = Rz(roll) Rx(pitch) Ry(yaw) (pose.py's convention) of [B, pose_dim] angles;
    missing angles (pose_dim < 3) are 0. Given to the pose MLP because where a surface point of the
    head lands in the image is linear in these entries: the generator need not learn trigonometry."""
    rad = torch.deg2rad(F.pad(pose_deg.float(), (0, 3 - pose_deg.shape[1])))
    (cy, cp, cr), (sy, sp, sr) = torch.cos(rad).unbind(1), torch.sin(rad).unbind(1)
    zero, one = torch.zeros_like(cy), torch.ones_like(cy)
    ry = torch.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy], 1).view(-1, 3, 3)
    rx = torch.stack([one, zero, zero, zero, cp, sp, zero, -sp, cp], 1).view(-1, 3, 3)
    rz = torch.stack([cr, -sr, zero, sr, cr, zero, zero, zero, one], 1).view(-1, 3, 3)
    return (rz @ rx @ ry).to(pose_deg.dtype)


def conv_block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(_groups(cout), cout), nn.SiLU())


class ControlBlock(nn.Module):
    def __init__(self, channels: int, embed_dim: int = EMBED_DIM):
        super().__init__()
        self.conv1 = nn.Conv2d(channels + 2, channels, 3, 1, 1)
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.film = nn.Linear(embed_dim, 2 * channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1)
        self.zero = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.zero.weight)
        nn.init.zeros_(self.zero.bias)

    def forward(self, h: torch.Tensor, embed: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.film(embed)[:, :, None, None].chunk(2, dim=1)
        c = self.norm(self.conv1(torch.cat([h, coords_like(h)], dim=1)))
        c = F.silu(self.conv2(F.silu(c * (1 + gamma) + beta)))
        return self.zero(c)


class GeneratorStage(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.pre = conv_block(cin, cin)     # control is added after this, at the stage's input size
        self.post = conv_block(cin, cout)   # after the x2 upsampling



class Generator(nn.Module):
    def __init__(self, feature_dim: int, stages: int):
        super().__init__()
        chans = [feature_dim] + [max(MIN_CHANNELS, feature_dim >> (i + 1)) for i in range(stages)]
        self.stages = nn.ModuleList(GeneratorStage(a, b) for a, b in zip(chans[:-1], chans[1:]))
        self.out = nn.Conv2d(chans[-1], 3, 3, 1, 1)
        self.stage_channels = chans[:-1]


class PoseHead(nn.Module):
    def __init__(self, pose_dim: int, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(conv_block(5, width, 2), conv_block(width, 2 * width, 2),
                                 nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                                 nn.Linear(2 * width * 16, EMBED_DIM), nn.SiLU(), nn.Linear(EMBED_DIM, pose_dim))

    def forward(self, image):
        return self.net(torch.cat([image, coords_like(image)], dim=1))


class ImageControlNet(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.encoder = build_backbone(config.backbone)
        self.proj = nn.Conv2d(self.encoder.out_channels, config.feature_dim, 1)
        stages = num_generator_stages(self.encoder.stride)
        if not 1 <= config.num_control_layers <= stages:
            raise ValueError(f"num_control_layers must be 1..{stages} for backbone {config.backbone}")
        self.pose_embed = nn.Sequential(nn.Linear(2 * config.pose_dim + 9, EMBED_DIM), nn.SiLU(),
                                        nn.Linear(EMBED_DIM, EMBED_DIM), nn.SiLU())
        self.generator = Generator(config.feature_dim, stages)
        self.control = nn.ModuleList(ControlBlock(c) for c in self.generator.stage_channels[:config.num_control_layers])
        # skip connections (U-Net style): stage i >= 1 runs at the backbone's stride / 2**i and gets
        # the backbone's feature map of that stride, so identity detail need not squeeze through the
        # coarsest map
        skip_ch = list(self.encoder.skip_channels)[::-1]     # coarse to fine: strides stride/2, stride/4, ...
        self.skips = nn.ModuleList(nn.Conv2d(skip_ch[i - 1], c, 1)
                                   for i, c in enumerate(self.generator.stage_channels) if 0 < i <= len(skip_ch))
        self.pose_head = PoseHead(config.pose_dim)

    def embed_pose(self, pose_deg: torch.Tensor) -> torch.Tensor:
        rad = torch.deg2rad(pose_deg)
        feats = [torch.sin(rad), torch.cos(rad), rotation_matrices(pose_deg).flatten(1)]
        return self.pose_embed(torch.cat(feats, dim=1))

    def forward(self, source: torch.Tensor, target_pose: torch.Tensor):
        """source [B, 3, H, W] in [-1, 1], target_pose [B, pose_dim] degrees ->
        (image [B, 3, H, W], predicted pose [B, pose_dim] in units of POSE_SCALE degrees)."""
        feats = self.encoder(source)
        h = self.proj(feats[-1])
        skips = feats[:-1][::-1]
        embed = self.embed_pose(target_pose.to(h.dtype))
        for i, stage in enumerate(self.generator.stages):
            h = stage.pre(h)
            if 0 < i <= len(self.skips):
                skip = self.skips[i - 1](skips[i - 1])
                if skip.shape[-2:] != h.shape[-2:]:  # resnet50 at 112 px: 4 -> 8 vs 7
                    skip = F.interpolate(skip, size=h.shape[-2:], mode="bilinear", align_corners=False)
                h = h + skip
            if i < len(self.control):
                h = h + self.control[i](h, embed)
            h = stage.post(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        image = self.generator.out(h)
        if image.shape[-2:] != source.shape[-2:]:  # e.g. resnet50 (stride 32) at 112 px
            image = F.interpolate(image, size=source.shape[-2:], mode="bilinear", align_corners=False)
        return image, self.pose_head(image)
