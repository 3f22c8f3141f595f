"""Noise, timesteps and losses of a training step (library/training/diffusion.py, noise.py, losses.py)."""
from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from library import logs
from library.errors import UserError
from library.models.loading import make_noise_scheduler
from library.training import losses
from library.training.diffusion import DiffusionObjective
from tests.helpers import run_train_network, write_image_folder

B, C, H, W = 4, 4, 8, 8


def make_args(*argv):
    import train_network
    from library import args as A

    return A.parse_args(train_network.setup_parser(), ["--pretrained_model_name_or_path=x", *argv])


@pytest.fixture(scope="module")
def scheduler():
    return make_noise_scheduler()


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(logs, "_warned", set())


def objective(scheduler, *argv, rng=None):
    return DiffusionObjective(make_args(*argv), scheduler, "cpu", rng=rng)


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, C, H, W, generator=g), torch.randn(B, C, H, W, generator=g)


def gen(seed=1):
    return torch.Generator().manual_seed(seed)


def abar(scheduler, t):
    return scheduler.alphas_cumprod[t].double()


def snr_of(scheduler, t):
    a = abar(scheduler, t)
    return a / (1 - a)


T = torch.tensor([0, 10, 500, 999])


# --- all options off = plain noise-prediction MSE -----------------------------------------------------

@pytest.mark.parametrize("argv", [(), ("--min_snr_gamma=0", "--noise_offset=0", "--multires_noise_iterations=0",
                                          "--ip_noise_gamma=0", "--huber_c=0.5")], ids=["defaults", "zeros_mean_off"])
def test_defaults_are_plain_mse_exactly(scheduler, argv):
    obj = objective(scheduler, *argv)
    latents, pred = data()
    noise, noisy, t = obj.noisy_latents(latents, gen())
    g = gen()
    plain_noise = torch.randn(latents.shape, generator=g)
    plain_t = torch.randint(0, 1000, (B,), generator=g)
    assert torch.equal(noise, plain_noise) and torch.equal(t, plain_t)
    assert torch.equal(noisy, scheduler.add_noise(latents, plain_noise, plain_t))
    target = obj.target(latents, noise, t)
    assert target is noise
    weights = torch.tensor([1.0, 1.0, 0.5, 1.0])  # a regularization image at prior_loss_weight 0.5
    got = obj.loss(pred, target, t, {"loss_weights": weights})
    want = (F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3)) * weights).mean()
    assert torch.equal(got, want)
    assert torch.equal(obj.loss(pred, target, t, {}), F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3)).mean())
    # bf16 models: the loss is computed in fp32
    assert obj.loss(pred.bfloat16(), target.bfloat16(), t, {}).dtype == torch.float32


def test_v_parameterization_target_matches_diffusers(scheduler):
    obj = objective(scheduler, "--v_parameterization")
    latents, noise = data()
    assert torch.equal(obj.target(latents, noise, T), scheduler.get_velocity(latents, noise, T))


# --- timestep weights -----------------------------------------------------------------------------

def per_sample(pred, target):
    return F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))


def test_min_snr_gamma_weights_equal_the_formula(scheduler):
    latents, pred = data()
    snr = snr_of(scheduler, T)
    for v_pred, denom in ((False, snr), (True, snr + 1)):
        argv = ["--min_snr_gamma=5"] + (["--v_parameterization"] if v_pred else [])
        obj = objective(scheduler, *argv)
        want = torch.minimum(snr, torch.full_like(snr, 5.0)) / denom
        torch.testing.assert_close(obj.timestep_weights(T).double(), want, rtol=1e-5, atol=0)
        loss = obj.loss(pred, latents, T, {})
        torch.testing.assert_close(loss, (per_sample(pred, latents) * want.float()).mean())
    # noise prediction: weight 1 where SNR <= gamma (noisy steps), gamma / SNR where above
    w = objective(scheduler, "--min_snr_gamma=5").timestep_weights(T)
    assert w[2:].tolist() == [1.0, 1.0] and w[0] < 0.01


def test_debiased_estimation_and_v_pred_scaling(scheduler):
    snr = snr_of(scheduler, T)
    capped = torch.clamp(snr, max=1000)  # t=0 has SNR ~ 1e3+: kohya caps it at 1000
    assert snr[0] > 1000
    w = objective(scheduler, "--debiased_estimation_loss").timestep_weights(T)
    torch.testing.assert_close(w.double(), 1 / capped.sqrt(), rtol=1e-5, atol=0)
    w = objective(scheduler, "--debiased_estimation_loss", "--v_parameterization").timestep_weights(T)
    torch.testing.assert_close(w.double(), 1 / (capped + 1), rtol=1e-5, atol=0)
    w = objective(scheduler, "--scale_v_pred_loss_like_noise_pred", "--v_parameterization").timestep_weights(T)
    torch.testing.assert_close(w.double(), capped / (capped + 1), rtol=1e-5, atol=0)
    # v_pred_like_loss adds loss / scale * k
    w = objective(scheduler, "--v_pred_like_loss=0.3").timestep_weights(T)
    torch.testing.assert_close(w.double(), 1 + 0.3 * (capped + 1) / capped, rtol=1e-5, atol=0)
    # options multiply: min-SNR and debiased together
    w = objective(scheduler, "--min_snr_gamma=5", "--debiased_estimation_loss").timestep_weights(T)
    want = torch.minimum(snr, torch.full_like(snr, 5.0)) / snr / capped.sqrt()
    torch.testing.assert_close(w.double(), want, rtol=1e-5, atol=0)


# --- loss types -----------------------------------------------------------------------------------

def test_loss_types_and_huber_formulas(scheduler):
    latents, pred = data()
    assert torch.equal(objective(scheduler, "--loss_type=l1").loss(pred, latents, T, {}), F.l1_loss(pred, latents))
    d = pred - latents
    for schedule in ("constant", "exponential", "snr"):
        obj = objective(scheduler, "--loss_type=huber", f"--huber_schedule={schedule}", "--huber_c=0.2",
                        "--huber_scale=1.5")
        c = losses.huber_threshold(schedule, 0.2, 1.5, T, obj.alphas_cumprod, 1000).view(-1, 1, 1, 1)
        want = (2 * c * (torch.sqrt(d**2 + c**2) - c)).mean()
        torch.testing.assert_close(obj.loss(pred, latents, T, {}), want)
        obj = objective(scheduler, "--loss_type=smooth_l1", f"--huber_schedule={schedule}", "--huber_c=0.2")
        c = losses.huber_threshold(schedule, 0.2, 1.0, T, obj.alphas_cumprod, 1000).view(-1, 1, 1, 1)
        torch.testing.assert_close(obj.loss(pred, latents, T, {}), (2 * (torch.sqrt(d**2 + c**2) - c)).mean())


def test_huber_schedules(scheduler):
    ac = scheduler.alphas_cumprod
    t = torch.tensor([0, 500, 1000 - 1])
    assert losses.huber_threshold("constant", 0.1, 2.0, t, ac, 1000).tolist() == pytest.approx([0.2] * 3)
    # exponential: scale at t=0, falling as c ** (t / T)
    got = losses.huber_threshold("exponential", 0.1, 2.0, t, ac, 1000)
    assert got.tolist() == pytest.approx([2.0 * 0.1 ** (v / 1000) for v in t.tolist()], rel=1e-5)
    # snr: (1 - c) / (1 + sigma)^2 + c, sigma = sqrt((1 - abar) / abar); scale not used (as kohya)
    sigma = ((1 - ac[t].double()) / ac[t].double()).sqrt()
    want = (0.9 / (1 + sigma) ** 2 + 0.1).tolist()
    assert losses.huber_threshold("snr", 0.1, 2.0, t, ac, 1000).tolist() == pytest.approx(want, rel=1e-5)
    # pseudo-Huber: about d^2 for small errors, about 2c|d| for large ones
    small, large, c = torch.tensor([1e-3]), torch.tensor([100.0]), torch.tensor([0.1])
    assert losses.elementwise_loss(small, torch.zeros(1), "huber", c).item() == pytest.approx(1e-6, rel=1e-3)
    assert losses.elementwise_loss(large, torch.zeros(1), "huber", c).item() == pytest.approx(20.0, rel=1e-2)


# --- noise options --------------------------------------------------------------------------------

def test_noise_offset_and_adaptive_scale(scheduler):
    latents, _ = data()
    base = torch.randn(latents.shape, generator=gen())
    noise, _, _ = objective(scheduler, "--noise_offset=0.1").noisy_latents(latents, gen())
    g = gen()
    torch.randn(latents.shape, generator=g)
    shift = torch.randn(B, C, 1, 1, generator=g)
    torch.testing.assert_close(noise, base + 0.1 * shift)  # a constant per sample and channel
    noise, _, _ = objective(scheduler, "--noise_offset=0.1", "--adaptive_noise_scale=0.5").noisy_latents(latents, gen())
    offset = 0.1 + 0.5 * latents.mean(dim=(2, 3), keepdim=True).abs()
    torch.testing.assert_close(noise, base + offset * shift)
    # negative adaptive scales never make the offset negative
    noise, _, _ = objective(scheduler, "--noise_offset=0.1", "--adaptive_noise_scale=-100").noisy_latents(latents, gen())
    torch.testing.assert_close(noise, base)
    # random strength: offset * U(0,1), drawn once per batch before the shift
    noise, _, _ = objective(scheduler, "--noise_offset=0.1", "--noise_offset_random_strength").noisy_latents(latents, gen())
    g = gen()
    torch.randn(latents.shape, generator=g)
    strength = torch.rand(1, generator=g) * 0.1
    torch.testing.assert_close(noise, base + strength * torch.randn(B, C, 1, 1, generator=g))


def test_multires_noise(scheduler):
    latents, _ = data()
    obj = objective(scheduler, "--multires_noise_iterations=3", "--multires_noise_discount=0.5", rng=random.Random(3))
    noise, _, _ = obj.noisy_latents(latents, gen())
    # the same by hand: level i is noise at size / r_i**i, upsampled, weighted 0.5**i
    rng, g = random.Random(3), gen()
    want = torch.randn(latents.shape, generator=g)
    for i in range(3):
        r = rng.random() * 2 + 2
        h, w = max(1, int(H / r**i)), max(1, int(W / r**i))
        want = want + F.interpolate(torch.randn(B, C, h, w, generator=g), size=(H, W), mode="bilinear") * 0.5**i
        if h == 1 or w == 1:
            break
    torch.testing.assert_close(noise, want / want.std())
    assert noise.std().item() == pytest.approx(1.0, abs=1e-5)


def test_ip_noise_gamma_perturbs_the_input_not_the_target(scheduler):
    latents, _ = data()
    noise, noisy, t = objective(scheduler, "--ip_noise_gamma=0.1").noisy_latents(latents, gen())
    g = gen()
    base = torch.randn(latents.shape, generator=g)
    t_plain = torch.randint(0, 1000, (B,), generator=g)
    extra = torch.randn(latents.shape, generator=g)
    assert torch.equal(noise, base) and torch.equal(t, t_plain)
    torch.testing.assert_close(noisy, scheduler.add_noise(latents, base + 0.1 * extra, t))
    noise, noisy, t = objective(scheduler, "--ip_noise_gamma=0.1", "--ip_noise_gamma_random_strength") \
        .noisy_latents(latents, gen())
    g = gen()
    torch.randn(latents.shape, generator=g)
    torch.randint(0, 1000, (B,), generator=g)
    strength = torch.rand(1, generator=g) * 0.1
    torch.testing.assert_close(noisy, scheduler.add_noise(latents, base + strength * torch.randn(latents.shape, generator=g), t))


def test_timestep_range(scheduler):
    obj = objective(scheduler, "--min_timestep=100", "--max_timestep=110")
    ts = torch.cat([obj.noisy_latents(torch.zeros(64, 1, 1, 1), gen(s))[2] for s in range(4)])
    assert ts.min() >= 100 and ts.max() <= 109 and len(set(ts.tolist())) == 10
    with pytest.raises(UserError, match="smaller than --max_timestep"):
        objective(scheduler, "--min_timestep=500", "--max_timestep=400")
    with pytest.raises(UserError, match="at most 1000"):
        objective(scheduler, "--max_timestep=1001")


def test_zero_terminal_snr(scheduler, capsys):
    from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr

    before = scheduler.alphas_cumprod.clone()
    obj = objective(scheduler, "--zero_terminal_snr", "--v_parameterization", "--min_snr_gamma=5")
    assert obj.alphas_cumprod[-1] == 0 and obj.alphas_cumprod[0] == pytest.approx(before[0].item(), rel=1e-6)
    want = torch.cumprod(1 - rescale_zero_terminal_snr(scheduler.betas), dim=0)
    torch.testing.assert_close(obj.alphas_cumprod, want, rtol=1e-4, atol=1e-6)
    assert torch.equal(scheduler.alphas_cumprod, before)  # the model's scheduler (used for samples) is untouched
    latents, noise = data()
    t = torch.full((B,), 999)
    assert torch.equal(obj.add_noise(latents, noise, t), noise)  # the last step is pure noise
    assert torch.equal(obj.target(latents, noise, t), -latents)  # and v = -x0 there
    # as in kohya, the loss weights use the model's SNR from before the fix: finite at the last step
    torch.testing.assert_close(obj.timestep_weights(T).double(), 5 / (snr_of(scheduler, T) + 1) *
                               (snr_of(scheduler, T) > 5) + snr_of(scheduler, T) / (snr_of(scheduler, T) + 1) *
                               (snr_of(scheduler, T) <= 5), rtol=1e-5, atol=0)
    assert capsys.readouterr().err == ""
    objective(scheduler, "--zero_terminal_snr")
    assert "--zero_terminal_snr without --v_parameterization" in capsys.readouterr().err


# --- masked loss ----------------------------------------------------------------------------------

def test_masked_loss_with_alpha_masks_and_conditioning_images(scheduler):
    latents, pred = data()
    elementwise = F.mse_loss(pred, latents, reduction="none")
    alpha = torch.zeros(B, 8 * H, 8 * W)  # pixel-size masks: left half trained
    alpha[:, :, : 4 * W] = 1.0
    obj = objective(scheduler, "--masked_loss")
    got = obj.loss(pred, latents, T, {"alpha_masks": alpha})
    torch.testing.assert_close(got, (elementwise[..., : W // 2].sum(dim=(1, 2, 3)) / (C * H * W)).mean())
    # soft masks are area-averaged to latent size
    soft = torch.rand(B, 8 * H, 8 * W, generator=gen())
    small = F.avg_pool2d(soft.unsqueeze(1), 8)
    torch.testing.assert_close(obj.loss(pred, latents, T, {"alpha_masks": soft}), (elementwise * small).mean())
    # alpha masks apply without --masked_loss too (kohya)
    torch.testing.assert_close(objective(scheduler).loss(pred, latents, T, {"alpha_masks": alpha}), got)
    # a conditioning image's red channel in [-1, 1] is the mask, only with --masked_loss
    cond = torch.full((B, 3, 8 * H, 8 * W), -1.0)
    cond[:, 0, :, : 4 * W] = 1.0
    torch.testing.assert_close(obj.loss(pred, latents, T, {"conditioning_images": cond}), got)
    assert torch.equal(objective(scheduler).loss(pred, latents, T, {"conditioning_images": cond}),
                       per_sample(pred, latents).mean())
    with pytest.raises(UserError, match="--masked_loss"):
        obj.loss(pred, latents, T, {"alpha_masks": None})


# --- flag checks, no host syncs --------------------------------------------------------------------

def test_flag_combinations_kohya_refuses(scheduler):
    with pytest.raises(UserError, match="--noise_offset"):
        objective(scheduler, "--adaptive_noise_scale=0.1")
    with pytest.raises(UserError, match="--v_parameterization"):
        objective(scheduler, "--scale_v_pred_loss_like_noise_pred")
    with pytest.raises(UserError, match="cannot be combined"):
        objective(scheduler, "--v_pred_like_loss=0.1", "--v_parameterization")


def test_step_has_no_host_sync(scheduler, monkeypatch):
    """Every option on: the noise/loss path never reads a device value on the host."""
    def forbidden(*a, **k):
        raise AssertionError("host sync in the loss path")

    obj = objective(scheduler, "--min_snr_gamma=5", "--noise_offset=0.1", "--noise_offset_random_strength",
                    "--adaptive_noise_scale=0.1", "--multires_noise_iterations=4", "--ip_noise_gamma=0.1",
                    "--ip_noise_gamma_random_strength", "--debiased_estimation_loss", "--loss_type=huber",
                    "--masked_loss", "--v_pred_like_loss=0.1")
    latents, pred = data()
    batch = {"alpha_masks": torch.rand(B, 8 * H, 8 * W), "loss_weights": torch.ones(B)}
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    noise, noisy, t = obj.noisy_latents(latents, gen())
    loss = obj.loss(pred, obj.target(latents, noise, t), t, batch)
    monkeypatch.undo()
    assert math.isfinite(loss.item())


# --- end to end -----------------------------------------------------------------------------------

def test_train_network_with_loss_noise_and_optimizer_options(tiny_model, tmp_path):
    from library.training.metadata import read_metadata

    data_dir = tmp_path / "data"
    write_image_folder(data_dir, "2_sks disk", count=2)
    out = tmp_path / "out"
    result = run_train_network([
        f"--pretrained_model_name_or_path={tiny_model.single_file}", f"--train_data_dir={data_dir}",
        f"--output_dir={out}", "--resolution=64", "--network_dim=4", "--learning_rate=1e-3", "--seed=7",
        "--caption_extension=.txt", "--max_train_steps=4", "--cache_latents", "--network_train_unet_only",
        "--min_snr_gamma=5", "--debiased_estimation_loss", "--noise_offset=0.05", "--adaptive_noise_scale=0.01",
        "--noise_offset_random_strength", "--multires_noise_iterations=3", "--ip_noise_gamma=0.05",
        "--ip_noise_gamma_random_strength", "--loss_type=huber", "--huber_schedule=exponential",
        "--min_timestep=50", "--max_timestep=900", "--lr_scheduler=cosine_with_restarts",
        "--lr_scheduler_num_cycles=2", "--lr_warmup_steps=0.25", "--optimizer_type=SGDNesterov",
        "--optimizer_args", "weight_decay=0.01"])
    meta = read_metadata(result["files"][-1])
    assert meta["ss_optimizer"] == "torch.optim.sgd.SGD(weight_decay=0.01,momentum=0.9)"
    assert meta["ss_min_snr_gamma"] == "5.0" and meta["ss_debiased_estimation"] == "True"
    assert meta["ss_loss_type"] == "huber" and meta["ss_huber_schedule"] == "exponential"
    assert meta["ss_multires_noise_iterations"] == "3" and meta["ss_ip_noise_gamma"] == "0.05"
    assert meta["ss_noise_offset_random_strength"] == "True" and meta["ss_lr_warmup_steps"] == "0.25"
    assert meta["ss_lr_scheduler"] == "cosine_with_restarts" and meta["ss_zero_terminal_snr"] == "False"
    assert result["state"].global_step == 4


def test_train_network_v_prediction_options(tiny_model, tmp_path):
    from safetensors.torch import load_file

    data_dir = tmp_path / "data"
    write_image_folder(data_dir, "2_sks disk", count=2)
    out = tmp_path / "out"
    run_train_network([
        f"--pretrained_model_name_or_path={tiny_model.single_file}", f"--train_data_dir={data_dir}",
        f"--output_dir={out}", "--resolution=64", "--network_dim=4", "--learning_rate=1e-2", "--seed=7",
        "--caption_extension=.txt", "--max_train_steps=3", "--cache_latents", "--network_train_unet_only",
        "--v_parameterization", "--zero_terminal_snr", "--scale_v_pred_loss_like_noise_pred",
        "--loss_type=smooth_l1", "--lr_scheduler=polynomial", "--lr_scheduler_power=2",
        "--optimizer_type=Adafactor", "--optimizer_args", "relative_step=False", "scale_parameter=False"])
    weights = load_file(str(out / "last.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert any(v.abs().sum() > 0 for k, v in weights.items() if k.endswith("lora_up.weight"))


def test_resume_is_exact_with_random_noise_options(tiny_model, tmp_path):
    """Multires noise draws from Python's RNG, the others from the noise generator: both are in the state."""
    from safetensors.torch import load_file

    data_dir = tmp_path / "data"
    write_image_folder(data_dir, "3_sks disk", count=2)

    def run(out, *extra):
        run_train_network([
            f"--pretrained_model_name_or_path={tiny_model.single_file}", f"--train_data_dir={data_dir}",
            f"--output_dir={out}", "--resolution=64", "--network_dim=4", "--learning_rate=1e-2", "--seed=7",
            "--caption_extension=.txt", "--max_train_steps=5", "--cache_latents", "--network_train_unet_only",
            "--multires_noise_iterations=4", "--noise_offset=0.1", "--noise_offset_random_strength",
            "--ip_noise_gamma=0.1", "--ip_noise_gamma_random_strength", "--min_snr_gamma=5", *extra])

    run(tmp_path / "full", "--save_every_n_steps=2", "--save_state")
    run(tmp_path / "resumed", f"--resume={tmp_path / 'full' / 'last-step00000002-state'}")
    a, b = load_file(str(tmp_path / "full" / "last.safetensors")), load_file(str(tmp_path / "resumed" / "last.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
