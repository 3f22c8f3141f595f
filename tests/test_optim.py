"""Optimizers and lr schedules by kohya's names (library/training/optim.py, schedulers.py)."""
from __future__ import annotations

import argparse
import io
import math
import sys

import pytest
import torch

from library import logs
from library.errors import UserError
from library.training.optim import adaptive_lr_logs, build_optimizer, parse_kwargs
from library.training.schedulers import build_scheduler, steps_from


def make_args(argv=()):
    """The train_network parser's defaults plus argv, as the trainer sees them."""
    import train_network
    from library import args as A

    return A.parse_args(train_network.setup_parser(), ["--pretrained_model_name_or_path=x", *argv])


def params(n_groups=1, lr=None):
    torch.manual_seed(0)
    groups = [{"params": [torch.nn.Parameter(torch.randn(4, 3))]} for _ in range(n_groups)]
    for g in groups:
        if lr is not None:
            g["lr"] = lr
    return groups


def train_steps(optimizer, steps=3):
    """A few steps on a quadratic; returns the losses."""
    out = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = sum((p ** 2).sum() for g in optimizer.param_groups for p in g["params"])
        loss.backward()
        optimizer.step()
        out.append(loss.item())
    return out


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(logs, "_warned", set())


# --- --optimizer_args --------------------------------------------------------------------------------

def test_optimizer_args_parsing():
    assert parse_kwargs(["weight_decay=0.01 betas=0.9,0.999"], "--optimizer_args") == \
        {"weight_decay": 0.01, "betas": (0.9, 0.999)}
    assert parse_kwargs(["weight_decay=0.01", "betas=0.9,0.999"], "--optimizer_args") == \
        {"weight_decay": 0.01, "betas": (0.9, 0.999)}
    assert parse_kwargs(["betas=(0.9, 0.999)", "eps=1e-8"], "x") == {"betas": (0.9, 0.999), "eps": 1e-8}
    got = parse_kwargs(["relative_step=False", "scale_parameter=true", "warmup_init=FALSE", "d0=None",
                        "name=abc", "step_rules=1:10,0.1"], "x")
    assert got == {"relative_step": False, "scale_parameter": True, "warmup_init": False, "d0": None,
                   "name": "abc", "step_rules": "1:10,0.1"}
    assert parse_kwargs(None, "x") == {}
    with pytest.raises(UserError, match="key=value"):
        parse_kwargs(["weight_decay"], "--optimizer_args")


# --- optimizers -------------------------------------------------------------------------------------

def test_fast_adamw_is_fused_where_torch_has_it_and_foreach_elsewhere():
    from library.training.optim import fast_adamw_kwargs

    assert fast_adamw_kwargs("cpu") == fast_adamw_kwargs("cuda") == {"fused": True}
    assert fast_adamw_kwargs("mps") == {"foreach": True}


def test_adamw_default_with_args_and_kohya_description():
    args = make_args(["--learning_rate=0.01", "--optimizer_args", "weight_decay=0.05", "betas=0.8,0.99"])
    opt, desc = build_optimizer(args, params(), "cpu")
    assert type(opt) is torch.optim.AdamW
    g = opt.param_groups[0]
    assert g["lr"] == 0.01 and g["weight_decay"] == 0.05 and g["betas"] == (0.8, 0.99) and g["fused"]
    # kohya's ss_optimizer: module.Class(user args), without our speed-only foreach/fused
    assert desc == "torch.optim.adamw.AdamW(weight_decay=0.05,betas=(0.8, 0.99))"
    _, plain = build_optimizer(make_args(), params(), "cpu")
    assert plain == "torch.optim.adamw.AdamW"


def test_sgd_nesterov_defaults_momentum():
    opt, desc = build_optimizer(make_args(["--optimizer_type=SGDNesterov"]), params(), "cpu")
    g = opt.param_groups[0]
    assert type(opt) is torch.optim.SGD and g["nesterov"] and g["momentum"] == 0.9
    assert desc == "torch.optim.sgd.SGD(momentum=0.9)"
    opt, _ = build_optimizer(make_args(["--optimizer_type=sgdnesterov", "--optimizer_args", "momentum=0.5"]),
                             params(), "cpu")
    assert opt.param_groups[0]["momentum"] == 0.5


@pytest.mark.parametrize("name", ["AdamW8bit", "PagedAdamW8bit", "Lion8bit", "PagedLion8bit", "SGDNesterov8bit"])
def test_8bit_optimizers_without_cuda_say_what_to_do(name):
    with pytest.raises(UserError) as err:
        build_optimizer(make_args([f"--optimizer_type={name}"]), params(), "cpu")
    text = str(err.value)
    assert "CUDA" in text and "bitsandbytes" in text and "--optimizer_type AdamW" in text


def test_8bit_without_bitsandbytes_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    with pytest.raises(UserError, match="pip install bitsandbytes"):
        build_optimizer(make_args(["--use_8bit_adam"]), params(), "cuda")


def test_old_flags_and_their_conflicts():
    with pytest.raises(UserError, match="exclude"):
        build_optimizer(make_args(["--use_8bit_adam", "--optimizer_type=AdamW"]), params(), "cpu")
    with pytest.raises(UserError, match="exclude"):
        build_optimizer(make_args(["--use_8bit_adam", "--use_lion_optimizer"]), params(), "cpu")
    try:
        import lion_pytorch
    except ImportError:
        with pytest.raises(UserError, match="pip install lion-pytorch"):
            build_optimizer(make_args(["--use_lion_optimizer"]), params(), "cpu")
    else:
        opt, _ = build_optimizer(make_args(["--use_lion_optimizer"]), params(), "cpu")
        assert type(opt) is lion_pytorch.Lion


@pytest.mark.parametrize("name,package,module", [("Lion", "lion-pytorch", "lion_pytorch"),
                                                 ("Prodigy", "prodigyopt", "prodigyopt"),
                                                 ("DAdaptAdam", "dadaptation", "dadaptation")])
def test_optional_optimizer_missing_names_pip_package(monkeypatch, name, package, module):
    monkeypatch.setitem(sys.modules, module, None)
    monkeypatch.setitem(sys.modules, module + ".experimental", None)
    with pytest.raises(UserError, match=f"pip install {package}"):
        build_optimizer(make_args([f"--optimizer_type={name}", "--learning_rate=1"]), params(), "cpu")


OPTIMIZERS = [  # (--optimizer_type, needed module, expected class name, lr)
    ("AdamW", None, "AdamW", 0.1), ("SGDNesterov", None, "SGD", 0.1), ("Adam", None, "Adam", 0.1),
    ("torch.optim.RMSprop", None, "RMSprop", 0.01), ("Adafactor", None, "Adafactor", 0.1),
    ("Lion", "lion_pytorch", "Lion", 0.01), ("Prodigy", "prodigyopt", "Prodigy", 1.0),
    ("DAdaptAdam", "dadaptation", "DAdaptAdam", 1.0), ("DAdaptation", "dadaptation", "DAdaptAdamPreprint", 1.0),
    ("DAdaptAdaGrad", "dadaptation", "DAdaptAdaGrad", 1.0), ("DAdaptAdan", "dadaptation", "DAdaptAdan", 1.0),
    ("DAdaptAdanIP", "dadaptation", "DAdaptAdanIP", 1.0), ("DAdaptLion", "dadaptation", "DAdaptLion", 1.0),
    ("DAdaptSGD", "dadaptation", "DAdaptSGD", 1.0),
]


@pytest.mark.parametrize("name,module,cls,lr", OPTIMIZERS, ids=[o[0] for o in OPTIMIZERS])
def test_each_installable_optimizer_trains_and_its_state_reloads(name, module, cls, lr):
    if module:
        pytest.importorskip(module)
    args = make_args([f"--optimizer_type={name}", f"--learning_rate={lr}"])
    opt, desc = build_optimizer(args, params(), "cpu")
    assert type(opt).__name__ == cls and cls in desc
    sched = build_scheduler(args, opt, 10)
    before = opt.param_groups[0]["params"][0].detach().clone()
    train_steps(opt, 3)
    sched.step()
    assert not torch.equal(before, opt.param_groups[0]["params"][0])
    # --resume loads states with weights_only=True: they must hold plain data only
    for state in (opt.state_dict(), sched.state_dict()):
        buf = io.BytesIO()
        torch.save(state, buf)
        buf.seek(0)
        torch.load(buf, weights_only=True)


def test_lion_takes_sign_steps():
    pytest.importorskip("lion_pytorch")
    opt, _ = build_optimizer(make_args(["--optimizer_type=Lion", "--learning_rate=0.01"]), params(), "cpu")
    p = opt.param_groups[0]["params"][0]
    before = p.detach().clone()
    train_steps(opt, 1)
    # first Lion step: update = lr * sign(grad) (weight decay 0); grad of p^2 is 2p
    torch.testing.assert_close(p.detach(), before - 0.01 * torch.sign(before))


@pytest.mark.parametrize("name,module", [("Prodigy", "prodigyopt"), ("DAdaptAdam", "dadaptation")])
def test_adaptive_optimizers_check_their_lr(name, module, capsys):
    pytest.importorskip(module)
    build_optimizer(make_args([f"--optimizer_type={name}", "--learning_rate=1e-4"]), params(2, lr=1e-4), "cpu")
    assert "--learning_rate 1.0" in capsys.readouterr().err  # kohya warns at <= 0.1
    logs._warned.clear()
    opt, _ = build_optimizer(make_args([f"--optimizer_type={name}", "--learning_rate=1"]),
                             [*params(1, lr=1.0), *params(1, lr=0.0)], "cpu")  # 0 freezes a part: allowed
    assert capsys.readouterr().err == ""
    train_steps(opt, 2)
    got = adaptive_lr_logs(opt, ["unet", "textencoder"])
    assert set(got) == {"lr/d*lr/unet", "lr/d*lr/textencoder"}
    assert got["lr/d*lr/unet"] == pytest.approx(opt.param_groups[0]["d"] * 1.0)
    assert adaptive_lr_logs(build_optimizer(make_args(), params(), "cpu")[0], ["unet"]) == {}
    # different non-zero lrs stop these optimizers at their first step: an error before training
    with pytest.raises(UserError, match="one learning rate"):
        build_optimizer(make_args([f"--optimizer_type={name}", "--learning_rate=1"]),
                        [*params(1, lr=1.0), *params(1, lr=0.5)], "cpu")


def test_adafactor_relative_step_uses_its_own_schedule(capsys):
    from transformers.optimization import Adafactor

    args = make_args(["--optimizer_type=Adafactor", "--learning_rate=0.001", "--lr_scheduler=cosine"])
    opt, desc = build_optimizer(args, params(2, lr=0.001), "cpu")
    assert type(opt) is Adafactor and desc.endswith("Adafactor(relative_step=True)")
    assert opt.defaults["relative_step"] and opt.defaults["scale_parameter"] and not opt.defaults["warmup_init"]
    assert all(g["lr"] is None for g in opt.param_groups)  # Adafactor finds its own step size
    sched = build_scheduler(args, opt, 10)
    assert "replaced by the adafactor schedule" in capsys.readouterr().err
    assert [g["lr"] for g in opt.param_groups] == [0.001, 0.001]  # reported before the first step
    train_steps(opt, 1)
    sched.step()
    lrs = [g["lr"] for g in opt.param_groups]
    expected = [opt._get_lr(g, opt.state[g["params"][0]]) for g in opt.param_groups]
    assert all(type(v) is float for v in lrs)  # loggers get floats, not 0-d tensors
    assert lrs == pytest.approx([float(e) for e in expected])
    # relative step 1: min(1e-2, 1/sqrt(1)) = 1e-2, scaled by max(eps2=1e-3, RMS(param))
    rms = [max(1e-3, float(opt.state[g["params"][0]]["RMS"])) for g in opt.param_groups]
    assert lrs == pytest.approx([1e-2 * r for r in rms])


def test_adafactor_options():
    args = make_args(["--optimizer_type=Adafactor", "--learning_rate=0.01", "--max_grad_norm=0",
                      "--lr_scheduler=constant_with_warmup", "--lr_warmup_steps=2", "--optimizer_args",
                      "relative_step=False", "scale_parameter=False", "warmup_init=False"])
    opt, _ = build_optimizer(args, params(), "cpu")
    assert opt.param_groups[0]["lr"] == 0.01 and not opt.defaults["scale_parameter"]
    sched = build_scheduler(args, opt, 10)
    assert type(sched).__name__ == "LambdaLR" and opt.param_groups[0]["lr"] == 0  # warmup starts at 0
    # warmup_init needs relative_step: kohya turns it back on
    opt, _ = build_optimizer(make_args(["--optimizer_type=Adafactor", "--optimizer_args", "relative_step=False",
                                        "warmup_init=True"]), params(), "cpu")
    assert opt.defaults["relative_step"] and opt.defaults["warmup_init"]
    with pytest.raises(UserError, match="no warmup"):
        build_scheduler(make_args(["--optimizer_type=Adafactor", "--lr_warmup_steps=5"]), opt, 10)
    adamw, _ = build_optimizer(make_args(), params(), "cpu")
    with pytest.raises(UserError, match="only works with --optimizer_type Adafactor"):
        build_scheduler(make_args(["--lr_scheduler=adafactor"]), adamw, 10)


def test_unknown_and_unsupported_optimizers():
    for name in ("NoSuchOpt", "no_such_module.Opt", "torch.optim.NoSuch"):
        with pytest.raises(UserError, match="unknown --optimizer_type"):
            build_optimizer(make_args([f"--optimizer_type={name}"]), params(), "cpu")
    # schedule-free optimizers are supported now (tests/test_kohya_compat.py)
    with pytest.raises(UserError, match="do not fit AdamW"):
        build_optimizer(make_args(["--optimizer_args", "no_such_arg=1"]), params(), "cpu")


# --- schedules --------------------------------------------------------------------------------------

def lr_curve(argv, total=10, num_processes=1):
    """The lr multiplier at steps 0..total-1 (SGD with lr 1, one scheduler step per optimizer step)."""
    args = make_args(["--optimizer_type=torch.optim.SGD", "--learning_rate=1", *argv])
    opt, _ = build_optimizer(args, params(), "cpu")
    sched = build_scheduler(args, opt, total, num_processes)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def expect(fn, total=10):
    return pytest.approx([fn(s) for s in range(total)], abs=1e-9)


def test_constant_and_warmup():
    assert lr_curve([]) == expect(lambda s: 1.0)
    # constant with a warmup becomes constant_with_warmup (kohya would refuse the pair)
    assert lr_curve(["--lr_warmup_steps=4"]) == expect(lambda s: min(1.0, s / 4))
    assert lr_curve(["--lr_scheduler=constant_with_warmup", "--lr_warmup_steps=4"]) == expect(lambda s: min(1.0, s / 4))
    # a ratio below 1 is a share of the training steps, floored as kohya does: 0.25 * 10 -> 2
    assert lr_curve(["--lr_scheduler=constant_with_warmup", "--lr_warmup_steps=0.25"]) == expect(lambda s: min(1.0, s / 2))
    assert lr_curve(["--lr_scheduler=constant_with_warmup", "--lr_warmup_steps=30%"]) == expect(lambda s: min(1.0, s / 3))


def test_linear_cosine_restarts_polynomial():
    assert lr_curve(["--lr_scheduler=linear", "--lr_warmup_steps=2"]) == \
        expect(lambda s: s / 2 if s < 2 else (10 - s) / 8)
    assert lr_curve(["--lr_scheduler=cosine", "--lr_warmup_steps=2"]) == \
        expect(lambda s: s / 2 if s < 2 else 0.5 * (1 + math.cos(math.pi * (s - 2) / 8)))
    assert lr_curve(["--lr_scheduler=cosine_with_restarts", "--lr_scheduler_num_cycles=2"]) == \
        expect(lambda s: 0.5 * (1 + math.cos(math.pi * ((2 * s / 10) % 1.0))))
    lr_end = 1e-7  # transformers' default end lr
    assert lr_curve(["--lr_scheduler=polynomial", "--lr_scheduler_power=2"]) == \
        expect(lambda s: (1 - lr_end) * (1 - s / 10) ** 2 + lr_end)


def test_inverse_sqrt_min_lr_and_wsd():
    assert lr_curve(["--lr_scheduler=inverse_sqrt", "--lr_warmup_steps=2"]) == \
        expect(lambda s: s / 2 if s < 2 else 1 / math.sqrt(s / 2))
    assert lr_curve(["--lr_scheduler=inverse_sqrt", "--lr_warmup_steps=2", "--lr_scheduler_timescale=4"]) == \
        expect(lambda s: s / 2 if s < 2 else 1 / math.sqrt((s + 2) / 4))
    assert lr_curve(["--lr_scheduler=cosine_with_min_lr", "--lr_scheduler_min_lr_ratio=0.1"]) == \
        expect(lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / 10)))
    with pytest.raises(UserError, match="--lr_scheduler_min_lr_ratio"):
        lr_curve(["--lr_scheduler=cosine_with_min_lr"])

    def wsd(s):  # 2 warmup (from the minimum), 5 stable, 3 cosine decay down to 0.2
        if s < 2:
            return 0.2 + 0.8 * s / 2
        if s < 7:
            return 1.0
        return 0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * (s - 7) / 3))
    assert lr_curve(["--lr_scheduler=warmup_stable_decay", "--lr_warmup_steps=2", "--lr_decay_steps=0.3",
                     "--lr_scheduler_min_lr_ratio=0.2"]) == expect(wsd)


def test_piecewise_constant_and_custom_class():
    assert lr_curve(["--lr_scheduler=piecewise_constant", "--lr_scheduler_args", "step_rules=1:3,0.1:6,0.01"]) == \
        expect(lambda s: 1.0 if s < 3 else (0.1 if s < 6 else 0.01))
    with pytest.raises(UserError, match="step_rules"):
        lr_curve(["--lr_scheduler=piecewise_constant"])
    # --lr_scheduler_type wins over --lr_scheduler and the warmup, as in kohya
    assert lr_curve(["--lr_scheduler=linear", "--lr_warmup_steps=3", "--lr_scheduler_type=CosineAnnealingLR",
                     "--lr_scheduler_args", "T_max=10"]) == \
        expect(lambda s: 0.5 * (1 + math.cos(math.pi * s / 10)))
    assert lr_curve(["--lr_scheduler_type=torch.optim.lr_scheduler.StepLR", "--lr_scheduler_args", "step_size=4",
                     "gamma=0.5"]) == expect(lambda s: 0.5 ** (s // 4))
    with pytest.raises(UserError, match="cannot find"):
        lr_curve(["--lr_scheduler_type=NoSuchLR"])
    with pytest.raises(UserError, match="T_max"):
        lr_curve(["--lr_scheduler_type=CosineAnnealingLR"])


def test_schedules_count_optimizer_steps_with_any_number_of_processes():
    # The Accelerator steps a prepared scheduler once per optimizer step (split_batches), so the
    # schedule does not stretch with the processes (tests/test_distributed.py checks it end to end).
    from accelerate.state import AcceleratorState, GradientState, PartialState

    from library.training.accel import make_accelerator

    argv = ["--lr_scheduler=linear", "--lr_warmup_steps=2"]
    assert lr_curve(argv, total=10, num_processes=2) == lr_curve(argv, total=10, num_processes=1) == \
        expect(lambda s: s / 2 if s < 2 else (10 - s) / 8)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
    accelerator, _ = make_accelerator(make_args([]))
    assert accelerator.split_batches


def test_warmup_value_parsing():
    from library import args as A

    assert [A.steps_or_ratio(v) for v in ("10", "0.1", "10%", "0", 5, 0.25, 12.0)] == [10, 0.1, 0.1, 0, 5, 0.25, 12]
    for bad in ("1.5", "-1", "abc"):
        with pytest.raises(argparse.ArgumentTypeError):
            A.steps_or_ratio(bad)
    assert steps_from(0.1, 25) == 2 and steps_from(10, 25) == 10 and steps_from(0, 25) == 0
