"""Feature backbones, built here (no torchvision), and loading of users' local weight files.

  resnet50    torchvision's layout (the ImageNet ResNet-50 state dict loads as is), 2048 ch, stride 32
  iresnet50   InsightFace arcface_torch's IResNet [3, 4, 14, 3], 512 ch, stride 16
  iresnet100  the same with [3, 13, 30, 3]
  small       a GroupNorm conv encoder, 64 ch, stride 8 (tests and the synthetic world)

Every backbone takes RGB in [-1, 1] and returns its feature maps from fine to coarse, strides 2, 4,
... up to `stride` (the last is the main one, `out_channels` wide; the finer ones feed the
generator's skip connections). The classifier / embedding heads of the pretrained files are not
used: the generator needs where things are, not only who.
BatchNorm layers always use their running statistics, also while training: batch statistics would
make a step of k x b accumulated micro-batches differ from one step of k*b, and would wreck
pretrained statistics with the small batches image generation affords.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from library.errors import UserError

BACKBONES = ("resnet50", "iresnet50", "iresnet100", "small")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class _FrozenStatsMixin:
    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self


class Bottleneck(nn.Module):
    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)  # stride here: torchvision's v1.5
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = downsample

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet50(_FrozenStatsMixin, nn.Module):
    out_channels, stride = 2048, 32
    skip_channels = (64, 256, 512, 1024)   # strides 2, 4, 8, 16

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = 64
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3))):
            stride = 1 if i == 0 else 2
            down = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4))
            layers = [Bottleneck(inplanes, planes, stride, down)]
            layers += [Bottleneck(planes * 4, planes) for _ in range(blocks - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
            inplanes = planes * 4
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x):
        x = ((x + 1) / 2 - self.mean) / self.std  # ImageNet weights expect ImageNet normalisation
        feats = [F.relu(self.bn1(self.conv1(x)))]
        x = self.layer1(self.maxpool(feats[0]))
        for layer in (self.layer2, self.layer3, self.layer4):
            feats.append(x)
            x = layer(x)
        return feats + [x]


class IBasicBlock(nn.Module):
    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.prelu = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class IResNet(_FrozenStatsMixin, nn.Module):
    out_channels, stride = 512, 16
    skip_channels = (64, 128, 256)   # strides 2, 4, 8

    def __init__(self, layers):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.prelu = nn.PReLU(64)
        inplanes = 64
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers)):
            down = nn.Sequential(nn.Conv2d(inplanes, planes, 1, 2, bias=False), nn.BatchNorm2d(planes))
            mods = [IBasicBlock(inplanes, planes, 2, down)] + [IBasicBlock(planes, planes) for _ in range(blocks - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*mods))
            inplanes = planes
        self.bn2 = nn.BatchNorm2d(512)

    def forward(self, x):  # ArcFace's input range is already [-1, 1]
        x = self.prelu(self.bn1(self.conv1(x)))
        feats = []
        for layer in (self.layer1, self.layer2, self.layer3):
            x = layer(x)
            feats.append(x)
        return feats + [self.bn2(self.layer4(x))]


class SmallEncoder(nn.Module):
    out_channels, stride = 64, 8

    def __init__(self, width: int = 32):
        super().__init__()

        def block(cin, cout, stride):
            return [nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU()]

        # downsample from the first conv: full-resolution convs cost most and add little here
        chans = (3, width, width * 2, self.out_channels)
        self.blocks = nn.ModuleList(nn.Sequential(*block(cin, cout, 2), *block(cout, cout, 1))
                                    for cin, cout in zip(chans[:-1], chans[1:]))
        self.skip_channels = chans[1:-1]   # strides 2, 4

    def forward(self, x):
        feats = []
        for blk in self.blocks:
            x = blk(x)
            feats.append(x)
        return feats


def build_backbone(name: str) -> nn.Module:
    if name == "resnet50":
        model = ResNet50()
    elif name in ("iresnet50", "iresnet100"):
        model = IResNet([3, 4, 14, 3] if name == "iresnet50" else [3, 13, 30, 3])
    elif name == "small":
        return SmallEncoder()
    else:
        raise UserError(f"unknown --backbone {name!r}.", fix=f"use one of: {', '.join(BACKBONES)}.")
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if isinstance(m, (Bottleneck, IBasicBlock)):
            # each residual branch starts at zero: a random deep net is then the identity path,
            # whose activations stay in range (running statistics are fixed at 0 / 1)
            nn.init.zeros_(m.bn3.weight)
    return model


# --- loading users' weight files ------------------------------------------------------------------

_HEAD_PREFIXES = ("fc.", "features.", "dropout.")  # classifier / embedding heads we do not use
_WRAPPER_PREFIXES = ("module.", "backbone.", "model.", "encoder.")


def read_state_dict(path) -> dict:
    """Tensors from a .safetensors / .pth / .pt / .bin file, weights-only: a pickle is never run."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"the --backbone_weights file {path} does not exist.", path=path,
                        fix="pass a local weights file (weights are never downloaded).")
    if path.suffix.lower() == ".onnx":
        raise UserError("an .onnx file cannot be loaded directly.", path=path,
                        fix="convert it to a PyTorch state dict first (for example with onnx2torch, then "
                            "torch.save(model.state_dict(), 'backbone.pth')) and pass the .pth file.")
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"{path} holds pickled Python objects besides tensors; it is refused because "
                        "unpickling can run arbitrary code.", path=path,
                        fix="save only the state dict (torch.save(model.state_dict(), path)) or a .safetensors "
                            "file.") from None
    except (OSError, RuntimeError, ValueError, EOFError) as err:
        raise UserError(f"cannot read the weights file {path} ({err}).", path=path,
                        fix="check that the file is complete and is a PyTorch or safetensors state dict.") from None
    for key in ("state_dict", "model", "backbone"):  # training checkpoints nest the weights
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not any(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{path} holds no state dict of tensors.", path=path,
                        fix="pass the backbone's state dict (a dict of parameter name -> tensor).")
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _guess(keys) -> str:
    if any(k.endswith("layer1.0.conv3.weight") for k in keys):
        return "resnet50"
    if any(k.endswith("layer1.0.prelu.weight") for k in keys):
        return "iresnet100" if any(".layer3.29." in f".{k}" for k in keys) else "iresnet50"
    return "an unknown architecture"


def load_backbone_weights(model: nn.Module, path, name: str) -> list[str]:
    """Load a user's file into the backbone; returns notes (ignored head keys). Mismatch -> UserError."""
    sd = read_state_dict(path)
    for prefix in _WRAPPER_PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    ignored = sorted(k for k in sd if k.startswith(_HEAD_PREFIXES))
    sd = {k: v for k, v in sd.items() if not k.startswith(_HEAD_PREFIXES)}
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    wrong = [k for k in sd if k in own and sd[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        example = (missing or unexpected or wrong)[0]
        raise UserError(f"the weights in {path} do not fit --backbone {name}: {len(missing)} missing, "
                        f"{len(unexpected)} unexpected and {len(wrong)} mis-shaped tensors (e.g. {example!r}); "
                        f"the file looks like {_guess(sd)}.", path=path,
                        fix=f"pass the --backbone that matches the file ({', '.join(BACKBONES[:3])}), or its "
                            "state dict in torchvision / InsightFace arcface_torch naming.")
    model.load_state_dict(sd, strict=False)
    return [f"ignored {len(ignored)} head tensors of the weights file ({ignored[0]} ...)"] if ignored else []
