"""ImageControlNet model pieces: backbones and weight files, zero-initialised control, accumulation."""
from __future__ import annotations

import argparse
import pickle

import pytest
import torch

from library.errors import UserError
from library.image_controlnet import steps as S
from library.image_controlnet.backbones import IResNet, ResNet50, build_backbone, load_backbone_weights
from library.image_controlnet.dataset import PairDataset
from library.image_controlnet.data import Pair
from library.image_controlnet.model import ImageControlNet, ModelConfig


def small_model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(backbone="small", image_size=16, feature_dim=32, pose_dim=3, num_control_layers=3)
    cfg.update(kw)
    return ImageControlNet(ModelConfig(**cfg))


def test_resnet50_has_torchvision_layout():
    sd = ResNet50().state_dict()
    # torchvision's resnet50 state dict has 320 entries; fc.weight and fc.bias are the 2 we leave out
    assert len(sd) == 318
    shapes = {"conv1.weight": (64, 3, 7, 7), "layer1.0.conv2.weight": (64, 64, 3, 3),
              "layer1.0.downsample.0.weight": (256, 64, 1, 1), "layer2.0.conv2.weight": (128, 128, 3, 3),
              "layer4.2.conv3.weight": (2048, 512, 1, 1), "layer3.5.bn3.running_var": (1024,)}
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key


def test_iresnet_has_arcface_layout():
    sd = IResNet([3, 4, 14, 3]).state_dict()
    shapes = {"conv1.weight": (64, 3, 3, 3), "prelu.weight": (64,), "layer1.0.bn1.weight": (64,),
              "layer1.0.prelu.weight": (64,), "layer1.0.downsample.0.weight": (64, 64, 1, 1),
              "layer3.13.conv2.weight": (256, 256, 3, 3), "layer4.2.bn3.weight": (512,), "bn2.running_mean": (512,)}
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key
    assert "layer3.14.conv1.weight" not in sd


def test_backbone_weights_load_with_heads_and_prefixes_and_freeze(tmp_path):
    source = IResNet([1, 1, 2, 1])   # the iresnet key layout, kept small for speed
    for p in source.parameters():
        torch.nn.init.normal_(p)
    sd = {f"module.{k}": v for k, v in source.state_dict().items()}
    sd["module.fc.weight"] = torch.zeros(512, 512 * 49)   # arcface embedding head: not used
    sd["module.features.weight"] = torch.ones(512)
    torch.save(sd, tmp_path / "r50.pth")
    target = IResNet([1, 1, 2, 1])
    notes = load_backbone_weights(target, tmp_path / "r50.pth", "iresnet50")
    assert "ignored 2 head tensors" in notes[0]
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_wrong_or_unsafe_weight_files_are_refused(tmp_path):
    torch.save(ResNet50().state_dict(), tmp_path / "resnet.pth")
    with pytest.raises(UserError, match="looks like resnet50"):
        load_backbone_weights(build_backbone("iresnet50"), tmp_path / "resnet.pth", "iresnet50")
    with open(tmp_path / "evil.pth", "wb") as fh:
        pickle.dump({"weights": argparse.Namespace(a=1)}, fh, protocol=2)   # any non-tensor object
    with pytest.raises(UserError, match="refused"):
        load_backbone_weights(build_backbone("small"), tmp_path / "evil.pth", "small")
    (tmp_path / "model.onnx").write_bytes(b"x")
    with pytest.raises(UserError, match="onnx2torch"):
        load_backbone_weights(build_backbone("small"), tmp_path / "model.onnx", "small")
    with pytest.raises(UserError, match="does not exist"):
        load_backbone_weights(build_backbone("small"), tmp_path / "none.pth", "small")


def test_batchnorm_keeps_running_stats_in_train_mode():
    net = build_backbone("resnet50").train()
    before = {k: v.clone() for k, v in net.state_dict().items() if "running" in k}
    net(torch.randn(2, 3, 64, 64))
    assert all(torch.equal(net.state_dict()[k], v) for k, v in before.items())
    assert not any(m.training for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))


@pytest.mark.parametrize("backbone", ["iresnet50", "resnet50"])
def test_full_size_model_shapes(backbone):
    torch.manual_seed(0)
    model = ImageControlNet(ModelConfig(backbone=backbone)).eval()   # the real defaults: 112 px, 512 features
    with torch.no_grad():
        image, pose = model(torch.rand(1, 3, 112, 112) * 2 - 1, torch.tensor([[30.0, 0.0, -10.0]]))
    assert image.shape == (1, 3, 112, 112) and pose.shape == (1, 3)
    assert torch.isfinite(image).all()


def test_control_branch_starts_at_zero_and_opens_with_training():
    model = small_model()
    src = torch.rand(4, 3, 16, 16) * 2 - 1
    a, _ = model(src, torch.tensor([[30.0, 10, 0]] * 4))
    b, _ = model(src, torch.tensor([[-30.0, -10, 5]] * 4))
    assert torch.equal(a, b)    # zero-initialised injection: the pose changes nothing yet
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    out, _ = model(src, torch.tensor([[30.0, 10, 0]] * 4))
    out.pow(2).mean().backward()
    assert all(blk.zero.weight.grad.abs().sum() > 0 for blk in model.control)
    opt.step()
    a, _ = model(src, torch.tensor([[30.0, 10, 0]] * 4))
    b, _ = model(src, torch.tensor([[-30.0, -10, 5]] * 4))
    assert not torch.allclose(a, b)


def _fake_pairs(tmp_path, n):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    pairs = []
    for i in range(n):
        for kind in ("s", "t"):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / f"{kind}{i}.png")
        pairs.append(Pair(tmp_path / f"s{i}.png", tmp_path / f"t{i}.png", (0.0, 0.0, 0.0),
                          tuple(rng.uniform(-30, 30, 3).tolist()), f"id{i}", "train"))
    return pairs


def test_accumulation_k_times_b_equals_one_batch_of_k_b(tmp_path):
    """4 + 4 accumulated equals one batch of 8, and the short last group (2) is weighed right."""
    data = PairDataset(_fake_pairs(tmp_path, 10), 16)
    results = []
    for batch, accum in ((4, 2), (8, 1), (2, 4)):
        model = small_model(seed=1)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)   # SGD: the update is the gradient itself
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        args = argparse.Namespace(batch_size=batch, gradient_accumulation_steps=accum, num_workers=0, seed=3,
                                  use_amp=False, loss_type="combined", pose_loss_weight=0.1, max_grad_norm=0.0)
        _, steps = S.train_epoch(model, data, opt, sched, torch.amp.GradScaler("cpu", enabled=False), epoch=0,
                                 args=args, device=torch.device("cpu"), params=list(model.parameters()))
        assert steps == 2
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert not torch.equal(results[0], torch.cat([p.detach().flatten() for p in small_model(seed=1).parameters()]))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=2e-6)
    torch.testing.assert_close(results[2], results[1], rtol=0, atol=2e-6)


def test_pose_rotation_input_matches_the_documented_convention():
    import numpy as np

    from library.image_controlnet.model import rotation_matrices
    from library.image_controlnet.pose import rotation_matrix

    poses = torch.tensor([[10.0, 20.0, -30.0], [40.0, -5.0, 7.0]])
    expected = np.stack([rotation_matrix(*p) for p in poses.tolist()])
    np.testing.assert_allclose(rotation_matrices(poses).numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(rotation_matrices(poses[:, :1]).numpy()[0], rotation_matrix(10.0, 0, 0), atol=1e-6)


def test_yaw_only_model_and_dataset(tmp_path):
    model = small_model(pose_dim=1)
    data = PairDataset(_fake_pairs(tmp_path, 2), 16, pose_dim=1)
    item = data[0]
    assert item["target_pose"].shape == (1,)
    image, pose = model(item["source"][None], item["target_pose"][None])
    assert image.shape == (1, 3, 16, 16) and pose.shape == (1, 1)


def test_losses_psnr_and_cpu_autocast():
    from library.image_controlnet.losses import image_loss, psnr

    pred, target = torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)
    pred[0] += 0.5
    torch.testing.assert_close(image_loss(pred, target, "mse"), torch.tensor([0.25, 0.0]))
    torch.testing.assert_close(image_loss(pred, target, "l1"), torch.tensor([0.5, 0.0]))
    torch.testing.assert_close(image_loss(pred, target, "combined"), torch.tensor([0.375, 0.0]))
    assert abs(float(psnr(pred, target)[0]) - 10 * torch.log10(torch.tensor(4 / 0.25))) < 1e-4
    with S.autocast_for(torch.device("cpu"), True):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with S.autocast_for(torch.device("cpu"), False):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
