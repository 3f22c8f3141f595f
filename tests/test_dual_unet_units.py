"""train_dual_unet's pieces on their own: losses, metrics, the pair data, the twin UNets."""
import csv
import json

import numpy as np
import pytest
import torch

from library.dual_unet import data, losses, metrics, toy
from library.errors import UserError


# --- the structure and high-frequency losses ---------------------------------------------------

@pytest.mark.parametrize("kind", ["l1", "ncc"])
def test_structure_loss_is_zero_for_identical_inputs_and_symmetric(kind):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    assert torch.allclose(losses.structure_loss(a, a, kind), torch.zeros(3), atol=1e-6)
    assert torch.allclose(losses.structure_loss(a, b, kind), losses.structure_loss(b, a, kind))
    assert (losses.structure_loss(a, b, kind) > 0.05).all()


@pytest.mark.parametrize("kind", ["l1", "ncc"])
def test_structure_loss_gradient_matches_finite_differences(kind):
    g = torch.Generator().manual_seed(1)
    a = torch.randn(2, 2, 6, 6, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 2, 6, 6, generator=g, dtype=torch.float64, requires_grad=True)
    # gradcheck compares the analytic gradient with finite differences, for both inputs
    assert torch.autograd.gradcheck(lambda x, y: losses.structure_loss(x, y, kind), (a, b), eps=1e-6, atol=1e-5)


def test_structure_loss_gradient_pulls_edges_together():
    """A gradient step on one input moves its edges towards the other's, and the loss falls."""
    a = torch.zeros(1, 1, 12, 12)
    a[..., 4:8, 4:8] = 1.0  # a square
    # (a flat image is a saddle: magnitudes have zero gradient there, so start from a little noise)
    b = (0.05 * torch.randn(1, 1, 12, 12, generator=torch.Generator().manual_seed(0))).requires_grad_()
    before = float(losses.structure_loss(a, b).detach())
    for _ in range(100):  # plain gradient descent on b alone
        grad, = torch.autograd.grad(losses.structure_loss(a, b).sum(), b)
        with torch.no_grad():
            b -= 0.5 * grad
    assert float(losses.structure_loss(a, b).detach()) < 0.4 * before
    corr = np.corrcoef(losses.edge_map(a).flatten().numpy(), losses.edge_map(b.detach()).flatten().numpy())[0, 1]
    assert corr > 0.8  # b now has its edges where a has them


def test_sobel_values_and_contrast_sign_blindness():
    ramp = torch.arange(8.0).view(1, 1, 1, 8).expand(1, 1, 8, 8)
    gx, gy = losses.sobel(ramp)
    assert torch.allclose(gx[..., 1:-1, 1:-1], torch.full((6, 6), 8.0))  # (1+2+1) x (x+1 - (x-1))
    assert torch.allclose(gy, torch.zeros_like(gy))
    x = torch.randn(2, 4, 8, 8)
    # inverted contrast (dark vessels vs bright vessels) has the same edges: l1 on magnitudes is 0
    assert torch.allclose(losses.structure_loss(x, -x), torch.zeros(2), atol=1e-6)
    # ncc ignores edge strength, l1 does not
    assert torch.allclose(losses.structure_loss(x, 3 * x, "ncc"), torch.zeros(2), atol=1e-5)
    assert (losses.structure_loss(x, 3 * x, "l1") > 0.5).all()


def test_high_frequency_loss():
    flat = torch.full((1, 4, 8, 8), 0.7)
    assert torch.allclose(losses.high_frequency(flat), torch.zeros_like(flat), atol=1e-6)
    x = torch.randn(2, 4, 8, 8)
    assert torch.allclose(losses.high_frequency_loss(x, x), torch.zeros(2))
    # a constant offset is low frequency: the loss does not see it
    assert torch.allclose(losses.high_frequency_loss(x + 5.0, x), torch.zeros(2), atol=1e-5)


@pytest.mark.parametrize("v_prediction", [False, True])
def test_predicted_x0_inverts_the_forward_process(v_prediction):
    from library.models.loading import make_noise_scheduler

    sched = make_noise_scheduler()
    x0, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    t = torch.tensor([0, 300, 700, 999])
    noisy = sched.add_noise(x0, noise, t)
    pred = sched.get_velocity(x0, noise, t) if v_prediction else noise
    abar = sched.alphas_cumprod[t]
    assert torch.allclose(losses.predicted_x0(noisy, pred, abar, v_prediction), x0, atol=2e-3)


def test_timestep_weight_silences_pure_noise_steps():
    abar = torch.tensor([1.0, 0.25, 0.0])
    assert torch.allclose(losses.timestep_weight(abar), torch.tensor([1.0, 0.5, 0.0]))
    assert torch.allclose(losses.timestep_weight(abar, torch.tensor([0.25, 1.0, 1.0])), torch.tensor([0.5, 0.5, 0.0]))


# --- metrics on the toy world -------------------------------------------------------------------

def test_toy_world_pairs_share_edges_and_differ_in_colour():
    cf, fa = toy.pair_images(64, seed=3)
    same = metrics.edge_correlation(cf, fa).mean()
    shuffled = metrics.edge_correlation(cf, np.roll(fa, 1, axis=0)).mean()
    assert same > 0.8 and abs(shuffled) < 0.15
    assert metrics.separation_accuracy(metrics.redness(cf), metrics.redness(fa)) == 1.0
    assert np.allclose(fa[..., 0], fa[..., 2])  # angiography is grey


# --- pair data ------------------------------------------------------------------------------------

def _write(tmp_path, count=6, size=32, names=("cf", "fa")):
    root = toy.write_pair_dataset(tmp_path / "pairs", count=count, size=size)
    for old, new in zip(("cf", "fa"), names):
        if old != new:
            (root / old).rename(root / new)
    return root


def test_pairs_from_folders_match_by_stem_any_case(tmp_path):
    root = _write(tmp_path, names=("CF", "FA"))
    pairs = data.pairs_from_folders(root, ("cf", "fa"))
    assert [p.name for p in pairs] == [f"{i:04d}" for i in range(6)]
    assert all(p.paths[0].endswith(f"CF/{p.name}.png") and p.paths[1].endswith(f"FA/{p.name}.png") for p in pairs)


def test_unpaired_images_and_missing_folders_are_errors(tmp_path):
    root = _write(tmp_path)
    (root / "fa" / "0002.png").unlink()
    (root / "cf" / "0004.png").rename(root / "cf" / "extra.png")
    with pytest.raises(UserError, match="do not pair up") as err:
        data.pairs_from_folders(root, ("cf", "fa"))
    assert "0002" in str(err.value) and "extra" in str(err.value) and "0004" in str(err.value)
    with pytest.raises(UserError, match="no 'oct' folder"):
        data.pairs_from_folders(root, ("cf", "oct"))


def test_pairs_file_csv_and_jsonl_with_splits(tmp_path):
    root = _write(tmp_path)
    with open(root / "pairs.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "CF", "FA", "split"])
        for i in range(6):
            w.writerow([f"p{i}", f"cf/{i:04d}.png", f"fa/{i:04d}.png", ["train", "val", "test"][i % 3]])
    pairs = data.pairs_from_file(root / "pairs.csv", ("cf", "fa"))
    train, val = data.split_pairs(pairs, 0.5)
    assert [p.name for p in train] == ["p0", "p3"] and [p.name for p in val] == ["p1", "p4"]
    lines = [json.dumps({"cf": f"cf/{i:04d}.png", "fa": f"fa/{i:04d}.png"}) for i in range(6)]
    (root / "pairs.jsonl").write_text("\n".join(lines))
    pairs = data.pairs_from_file(root / "pairs.jsonl", ("cf", "fa"))
    assert len(pairs) == 6 and pairs[0].paths[1].endswith("fa/0000.png")
    (root / "bad.jsonl").write_text(json.dumps({"cf": "cf/0000.png"}))
    with pytest.raises(UserError, match="no fa path"):
        data.pairs_from_file(root / "bad.jsonl", ("cf", "fa"))


def test_validation_split_is_fixed_and_capped():
    pairs = [data.Pair(f"{i}", ("a", "b")) for i in range(50)]
    t1, v1 = data.split_pairs(pairs, 0.2)
    t2, v2 = data.split_pairs(pairs, 0.2)
    assert v1 == v2 and len(v1) == 10 and len(t1) == 40 and not set(t1) & set(v1)
    assert len(data.split_pairs(pairs, 0.2, max_val=3)[1]) == 3
    assert data.split_pairs(pairs, 0.0)[1] == []


def test_batches_grey_to_rgb_deterministic_order_and_caching(tmp_path):
    root = _write(tmp_path, count=5, size=40)
    group = data.PairedGroup(data.pairs_from_folders(root, ("cf", "fa")), 32, 2, seed=7)
    assert group.num_batches_per_epoch == 3
    assert group.batch_order(0) == group.batch_order(0) != group.batch_order(1)
    epoch = group.epoch_dataset(1)
    batch = epoch[0]
    assert batch["images_0"].shape == batch["images_1"].shape == (2, 3, 32, 32)
    fa = batch["images_1"]
    assert torch.equal(fa[:, 0], fa[:, 1]) and torch.equal(fa[:, 1], fa[:, 2])  # grey PNG -> 3 equal channels
    resumed = group.epoch_dataset(1, start=1)
    assert resumed[0]["names"] == epoch[1]["names"] and len(resumed) == 2

    class FakeVAE(torch.nn.Module):  # encode = 2x2 average pool of the first 3 channels, plus one
        config = type("C", (), {"scaling_factor": 1.0, "shift_factor": None})()

        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def encode(self, x):
            z = torch.cat([torch.nn.functional.avg_pool2d(x, 2), x[:, :1, ::2, ::2]], 1)
            return type("O", (), {"latent_dist": type("D", (), {"mode": lambda self: z})()})()

    group.cache_latents(FakeVAE())
    cached = group.epoch_dataset(1)[0]
    assert cached["latents_0"].shape == (2, 4, 16, 16) and "images_0" not in cached
    assert torch.allclose(cached["latents_1"][:, :3], torch.nn.functional.avg_pool2d(fa, 2), atol=1e-5)


def test_pairs_with_different_aspect_ratios_are_refused(tmp_path):
    from PIL import Image

    root = _write(tmp_path, count=2)
    Image.new("L", (32, 48)).save(root / "fa" / "0001.png")
    with pytest.raises(UserError, match="different aspect ratios"):
        data.PairedGroup(data.pairs_from_folders(root, ("cf", "fa")), 32, 1, seed=0)


# --- two UNets over one base ------------------------------------------------------------------------

def _small_dual(rank=4):
    """The toy base's UNet shape with random weights, twinned, one LoRA per twin (no files)."""
    from types import SimpleNamespace

    from diffusers import UNet2DConditionModel

    from library.dual_unet import model as model_mod
    from library.dual_unet.toy_base import UNET_CONFIG

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET_CONFIG, sample_size=8).eval().requires_grad_(False)
    base = SimpleNamespace(unet=unet, text_encoder=None)
    dual = model_mod.DualUNet(("cf", "fa"), [unet, model_mod.twin_unet(unet)], [])
    for u in dual.unets:
        network = model_mod.new_networks(rank, rank)(u)
        network.apply_to(None, u, apply_text_encoder=False, apply_unet=True)
        dual.networks.append(network)
    dual.hidden = [torch.randn(1, 4, 32), torch.randn(1, 4, 32)]
    return base, dual


def test_twin_unet_shares_every_tensor_without_copying():
    from library.dual_unet.model import shares_weights

    _, dual = _small_dual()
    a, b = dual.unets
    assert a is not b and shares_weights(a, b)
    with torch.no_grad():
        a.conv_in.weight.add_(1.0)  # one tensor: a change through a is seen through b
    assert torch.equal(a.conv_in.weight, b.conv_in.weight)
    assert not any(p.requires_grad for p in b.parameters())


def test_each_unet_runs_only_its_own_lora():
    _, dual = _small_dual()
    x, t, h = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 4, 32)
    with torch.no_grad():
        before = [u(x, t, h).sample for u in dual.unets]
        for lora in dual.networks[0].unet_loras:
            lora.lora_up.weight.normal_(0, 0.5)  # LoRA a becomes non-zero, LoRA b stays zero
        after = [u(x, t, h).sample for u in dual.unets]
    assert not torch.allclose(before[0], after[0], atol=1e-4)
    assert torch.equal(before[1], after[1])


def test_one_step_trains_both_loras_and_structure_loss_reaches_both():
    from library.dual_unet.step import paired_losses
    from library.models.loading import make_noise_scheduler
    from library.training.diffusion import DiffusionObjective
    from types import SimpleNamespace

    _, dual = _small_dual()
    objective = DiffusionObjective(SimpleNamespace(), make_noise_scheduler(), "cpu")
    latents = [torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)]
    gen = torch.Generator().manual_seed(0)
    trainable = [p for n in dual.networks for p in n.parameters()]
    start = [{k: v.clone() for k, v in n.state_dict().items()} for n in dual.networks]
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    terms = paired_losses(dual, objective, latents, gen, hf_lambda=0.5, struct_lambda=0.3)
    terms["loss"].backward()
    opt.step()
    for network, old in zip(dual.networks, start):  # both adapters moved in one joint step
        assert any(not torch.equal(v, old[k]) for k, v in network.state_dict().items() if k.endswith("lora_up.weight"))

    # the structure term alone (the only coupling) sends gradients into both LoRAs
    for p in trainable:
        p.grad = None
    objective.loss = lambda pred, target, t, batch: pred.sum() * 0.0
    paired_losses(dual, objective, latents, gen, hf_lambda=0.0, struct_lambda=1.0)["loss"].backward()
    for network in dual.networks:
        ups = [lora.lora_up.weight.grad for lora in network.unet_loras]
        assert all(g is not None for g in ups) and sum(float(g.abs().sum()) for g in ups) > 0
