"""LoHa, LoKr and DoRA with LyCORIS's `network_args` and file keys, on networks.lora's injection and naming.

    --network_module networks.lycoris --network_dim 8 --network_alpha 4 \
        --network_args "algo=loha" "conv_dim=8" "conv_alpha=4"
    --network_module lycoris.kohya ...          # kohya_ss's spelling: resolves to this module

Algorithms (`algo=`): lora / locon (networks.lora's modules), loha (Hadamard product of two rank-r
products), lokr (Kronecker product w1 (x) w2 with `factor`, `decompose_both`), dora (LoRA with weight
decomposition); `dora_wd=True` adds the decomposition to loha/lokr too. The layers patched are
networks.lora's (transformer blocks and the text encoder; with `preset=full`, the default, also the
ResNet blocks and down/upsamplers, whose 3x3 convs take `conv_dim`/`conv_alpha`). The file keys and
the delta each module makes are in `lycoris_format.py`.

We differ from LyCORIS where it would write a file that loads differently elsewhere: DoRA's
magnitude is per input channel (`wd_on_out=False`, the orientation WebUI and ComfyUI both apply as
trained), and a `factor` that does not divide a layer's size is an error, not silently changed.
"""
from __future__ import annotations

import logging
import math
import sys

import torch
import torch.nn.functional as F

from library.errors import UserError
from networks import lora as lora_net
from networks import lora_blocks as blocks
from networks import lora_format as fmt
from networks import lycoris_format as lyc
from networks.lora import LoRAModule, LoRANetwork

logger = logging.getLogger(__name__)

ALGOS = ("lora", "locon", "loha", "lokr", "dora")
# LyCORIS algorithms and arguments we do not implement, with the reason shown to the user.
REFUSED_ALGOS = {
    "ia3": "(IA)^3 scales activations, a different file layout", "dylora": "DyLoRA trains nested ranks",
    "glora": "GLoRA adds extra tensors", "glokr": "GLoKr adds extra tensors", "full": "a full fine-tune "
    "delta is as large as the model", "diag-oft": "OFT rotates weights", "boft": "BOFT rotates weights",
}
REFUSED_ARGS = {
    "use_tucker": "the Tucker decomposition of 3x3 convs (hada_t1/lokr_t2 tensors) is not implemented; "
                  "without it 3x3 convs use a flat low-rank factor, LyCORIS's default",
    "use_conv_cp": "the Tucker decomposition of 3x3 convs is not implemented",
    "train_norm": "training the norm layers (w_norm/b_norm tensors) is not implemented",
    "wd_on_out": "the magnitude on the output axis loads differently in ComfyUI (it normalises that axis by "
                 "the original weight) and not at all in WebUI; the input axis is used",
    "bypass_mode": "bypass mode is only for quantised base weights, which this program does not train",
}
PRESETS = {"full": True, "attn-mlp": False}  # preset -> whether the ResNet 3x3 convs are patched
_HANDLED = {"algo", "conv_dim", "conv_alpha", "dropout", "rank_dropout", "module_dropout", "factor",
            "decompose_both", "dora_wd", "preset", "full_matrix", "no_dim_warn",
            "loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio",
            *blocks.BLOCK_DIM_KEYS, *blocks.LR_WEIGHT_KEYS}

_notified = set()


def resolve_module_name(name: str) -> str:
    """`lycoris.kohya` (kohya_ss's --network_module for LyCORIS) -> this module, with one notice."""
    if name in ("lycoris.kohya", "lycoris"):
        if name not in _notified:
            _notified.add(name)
            print(f"note: --network_module {name}: using this program's own LoHa/LoKr/DoRA (networks.lycoris), "
                  "which writes LyCORIS-format files; the lycoris-lora package is not used", file=sys.stderr)
        return __name__
    return name


# --- modules ---------------------------------------------------------------------------------

class AdapterModule(torch.nn.Module):
    """One layer's update from the factors of a subclass (`product`), optionally weight-decomposed.

    Patching is networks.lora's (the layer stays in place; its forward is routed here).
    Without DoRA: out = layer(x) + op(x, multiplier * scale * product). With DoRA (`dora_scale`):
    the layer runs with W + multiplier * (dora_scale * (W + dW) / ||W + dW|| - W), as the clients merge it.
    """
    org_module = LoRAModule.org_module
    apply_to = LoRAModule.apply_to
    restore = LoRAModule.restore
    algo = ""

    def __init__(self, lora_name, org_module, multiplier, rank, alpha, dropout=None, rank_dropout=None,
                 module_dropout=None, weight_decompose=False):
        super().__init__()
        self.lora_name = lora_name
        self.lora_dim = rank  # None: no low-rank factor (LoKr with two full matrices): scale 1
        self.weight_shape = tuple(org_module.weight.shape)
        self.is_conv = isinstance(org_module, torch.nn.Conv2d)
        alpha = float(alpha) if alpha is not None else 0.0
        alpha = alpha or float(rank or 1)  # 0 means "= rank", as networks.lora
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.float32))
        self.multiplier = multiplier
        self.dropout, self.rank_dropout, self.module_dropout = dropout, rank_dropout, module_dropout
        self._org = [org_module]
        self.org_forward = None
        if weight_decompose:
            with torch.no_grad():
                w = org_module.weight.detach().float()
                norm = torch.linalg.vector_norm(w, dim=[0] + list(range(2, w.dim())), keepdim=True)
            self.dora_scale = torch.nn.Parameter(norm.reshape(lyc.dora_scale_shape(self.weight_shape)))
        else:
            self.dora_scale = None

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.lora_dim if self.lora_dim else 1.0

    def product(self) -> torch.Tensor:
        raise NotImplementedError

    def up_parameters(self):
        """The tensors LoRA+ trains faster (None: LoRA+ does not apply to this algorithm)."""
        return None

    def _op(self, x, weight, bias=None):
        if self.is_conv:
            return self.org_module._conv_forward(x, weight, bias)
        return F.linear(x, weight, bias)

    def forward(self, x):
        if self.multiplier == 0 or (self.training and self.module_dropout
                                    and torch.rand(1) < self.module_dropout):
            return self.org_forward(x)
        delta = self.product() * self.scale
        if self.dora_scale is not None:
            weight = self.org_module.weight.detach()
            dt = torch.promote_types(weight.dtype, torch.float32)  # the norm in fp32 at least
            w = weight.to(dt)
            merged = lyc.dora_weight(w, delta.to(dt), self.dora_scale.to(dt))
            new = w + self.multiplier * (merged - w)
            bias = self.org_module.bias
            return self._op(x, new.to(weight.dtype), None if bias is None else bias.detach())
        if self.training and self.rank_dropout:  # LyCORIS: drop output rows of the update
            keep = torch.rand(delta.shape[0], device=delta.device) > self.rank_dropout
            delta = delta * keep.to(delta.dtype).reshape(-1, *[1] * (delta.dim() - 1)) / (1 - self.rank_dropout)
        if self.training and self.dropout:
            x_in = F.dropout(x, p=self.dropout)
        else:
            x_in = x
        return self.org_forward(x) + self._op(x_in, (delta * self.multiplier).to(x.dtype))

    def delta_weight(self, device=None) -> torch.Tensor:
        """The change of the layer's weight at multiplier 1, fp32 (DoRA included)."""
        delta = self.product().to(device, torch.float32) * self.scale
        if self.dora_scale is None:
            return delta
        weight = self.org_module.weight.detach().to(device, torch.float32)
        return lyc.dora_weight(weight, delta, self.dora_scale.to(device, torch.float32)) - weight

    def update_norm(self, device=None) -> torch.Tensor:
        """||scale * product||, what --scale_weight_norms caps."""
        return (self.product().to(device, torch.float32) * self.scale).norm()

    @torch.no_grad()
    def scale_update_(self, ratio: float) -> None:
        """Multiply scale * product by `ratio`, split evenly over the factors."""
        factors = [p for n, p in self.named_parameters() if n != "dora_scale"]
        per = ratio ** (1.0 / self.product_degree)
        for p in factors[: self.product_degree]:
            p.mul_(per)

    product_degree = 2

    @torch.no_grad()
    def merge_to(self, sd: dict, dtype=None, device=None):
        """Add multiplier * the delta of `sd` (this module's tensors, keys without its name) to the layer."""
        weight = self.org_module.weight
        device = device or weight.device
        delta = lyc.module_delta(self.lora_name, sd, weight, device)
        weight.copy_(weight.to(device, torch.float32) + self.multiplier * delta)


class LoHaModule(AdapterModule):
    """dW = (w1_a @ w1_b) * (w2_a @ w2_b): rank up to r^2 from 4 rank-r factors."""
    algo = "loha"
    product_degree = 4

    def __init__(self, lora_name, org_module, multiplier, rank, alpha, shapes=None, **kw):
        super().__init__(lora_name, org_module, multiplier, int(rank), alpha, **kw)
        out, flat_in = self.weight_shape[0], math.prod(self.weight_shape[1:])
        r = self.lora_dim
        for i in (1, 2):
            setattr(self, f"hada_w{i}_a", torch.nn.Parameter(torch.empty(out, r)))
            setattr(self, f"hada_w{i}_b", torch.nn.Parameter(torch.empty(r, flat_in)))
        # LyCORIS's init: w2_a = 0, so the update starts at exactly 0 and all four factors get gradients
        torch.nn.init.normal_(self.hada_w1_a, std=0.1)
        torch.nn.init.normal_(self.hada_w1_b, std=1.0)
        torch.nn.init.zeros_(self.hada_w2_a)
        torch.nn.init.normal_(self.hada_w2_b, std=1.0)

    def product(self):
        return ((self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b)).reshape(self.weight_shape)


def lokr_shapes(name, weight_shape, rank, factor=-1, decompose_both=False, full_matrix=False) -> dict:
    """LyCORIS's LoKr layout for one layer: {tensor suffix: shape}.

    out = l*k and in = m*n split by `factor`; w1 [l, m] is the small factor, w2 [k, n (, kh, kw)] the
    large one. w2 is low-rank (w2_a [k, r] @ w2_b [r, n*kh*kw]) when r < max(k, n)/2, w1 likewise
    with decompose_both; `full_matrix` keeps both full.
    """
    out_dim, in_dim = int(weight_shape[0]), int(weight_shape[1])
    kernel = tuple(int(s) for s in weight_shape[2:])
    try:
        l, k = lyc.factorization(out_dim, factor)
        m, n = lyc.factorization(in_dim, factor)
    except ValueError:
        bad = out_dim if out_dim % factor else in_dim
        raise UserError(f"LoKr factor={factor} does not divide the size {bad} of the layer {name} "
                        f"({in_dim} -> {out_dim}).",
                        fix="pass a factor that divides every layer's sizes (8 or 4 for SD; powers of 2), "
                            "or factor=-1 for the most balanced split of each layer.") from None
    shapes = {}
    if decompose_both and not full_matrix and rank < max(l, m) / 2:
        shapes["lokr_w1_a"], shapes["lokr_w1_b"] = (l, rank), (rank, m)
    else:
        shapes["lokr_w1"] = (l, m)
    if not full_matrix and rank < max(k, n) / 2:
        shapes["lokr_w2_a"], shapes["lokr_w2_b"] = (k, rank), (rank, n * math.prod(kernel))
    else:
        shapes["lokr_w2"] = (k, n) + kernel
    return shapes


class LoKrModule(AdapterModule):
    """dW = w1 (x) w2 (Kronecker product), each factor full or low-rank (see `lokr_shapes`)."""
    algo = "lokr"

    def __init__(self, lora_name, org_module, multiplier, rank, alpha, shapes=None, factor=-1,
                 decompose_both=False, full_matrix=False, **kw):
        weight_shape = tuple(org_module.weight.shape)
        if shapes is None:
            shapes = lokr_shapes(lora_name, weight_shape, int(rank), factor, decompose_both, full_matrix)
        r = lyc.lokr_rank(shapes)
        if r is None:  # two full matrices: the clients apply scale 1 whatever alpha says
            alpha = None
        super().__init__(lora_name, org_module, multiplier, r, alpha, **kw)
        for key, shape in shapes.items():
            setattr(self, key, torch.nn.Parameter(torch.empty(shape)))
        # LyCORIS's init: w1 (or its factors) random, w2's last factor 0: the update starts at 0
        for key in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a"):
            if key in shapes:
                torch.nn.init.kaiming_uniform_(getattr(self, key), a=math.sqrt(5))
        torch.nn.init.zeros_(self.lokr_w2 if "lokr_w2" in shapes else self.lokr_w2_b)
        self.product_degree = len(shapes)

    def _factor(self, i):
        full = getattr(self, f"lokr_w{i}", None)
        return full if full is not None else getattr(self, f"lokr_w{i}_a") @ getattr(self, f"lokr_w{i}_b")

    def product(self):
        return lyc.kron(self._factor(1), self._factor(2), self.weight_shape)


class DoRAModule(AdapterModule):
    """LoRA factors (lora_down / lora_up, as networks.lora) under weight decomposition."""
    algo = "dora"

    def __init__(self, lora_name, org_module, multiplier, rank, alpha, shapes=None, **kw):
        kw["weight_decompose"] = True
        super().__init__(lora_name, org_module, multiplier, int(rank), alpha, **kw)
        template = LoRAModule(lora_name, org_module, multiplier, self.lora_dim, float(self.alpha))
        self.lora_down, self.lora_up = template.lora_down, template.lora_up  # same layout and init

    def product(self):
        return LoRAModule.compose(self.lora_up.weight, self.lora_down.weight).reshape(self.weight_shape)

    def up_parameters(self):
        return [self.lora_up.weight]


# --- the network -----------------------------------------------------------------------------

class LycorisNetwork(LoRANetwork):
    """networks.lora's network (layers, names, per-block options, saving) with LyCORIS modules."""

    FILE_TENSOR_SUFFIXES = lyc.TENSOR_SUFFIXES

    def prepare_optimizer_params(self, text_encoder_lr, unet_lr, default_lr):
        ratios = (self.loraplus_unet_lr_ratio, self.loraplus_text_encoder_lr_ratio)
        if any(ratios) and any(isinstance(m, AdapterModule) and m.up_parameters() is None
                               for m in self.all_loras()):
            raise UserError("LoRA+ (loraplus_*lr_ratio) needs an up/down pair; LoHa and LoKr have none.",
                            fix="drop the loraplus_* network args, or use algo=lora or algo=dora.")
        return super().prepare_optimizer_params(text_encoder_lr, unet_lr, default_lr)

    @torch.no_grad()
    def apply_max_norm_regularization(self, max_norm_value, device):
        loras = self.all_loras()
        if not loras:
            return 0, 0.0, 0.0
        norms = torch.stack([m.update_norm(device) if isinstance(m, AdapterModule) else m.delta_weight(device).norm()
                             for m in loras])
        ratios = (max_norm_value / norms).clamp(max=1.0)
        for m, ratio in zip(loras, ratios.tolist()):
            if ratio == 1.0:
                continue
            if isinstance(m, AdapterModule):
                m.scale_update_(ratio)
            else:
                m.lora_down.weight.mul_(math.sqrt(ratio))
                m.lora_up.weight.mul_(math.sqrt(ratio))
        scaled = norms * ratios
        return int((ratios < 1.0).sum()), float(scaled.mean()), float(scaled.max())


def _module_factory(algo, weight_decompose, **algo_kwargs):
    cls = {"loha": LoHaModule, "lokr": LoKrModule, "dora": DoRAModule}.get(algo)

    def make(name, layer, multiplier, dim, alpha, dropout=None, rank_dropout=None, module_dropout=None):
        if cls is None and not weight_decompose:  # lora / locon: networks.lora's module as is
            return LoRAModule(name, layer, multiplier, dim, alpha, dropout=dropout, rank_dropout=rank_dropout,
                              module_dropout=module_dropout)
        kind = cls or DoRAModule
        extra = algo_kwargs if kind is LoKrModule else {}
        if kind is not DoRAModule:
            extra = {**extra, "weight_decompose": weight_decompose}
        return kind(name, layer, multiplier, dim, alpha, dropout=dropout, rank_dropout=rank_dropout,
                    module_dropout=module_dropout, **extra)
    return make


def _flag(kwargs, key) -> bool:
    value = kwargs.get(key)
    if isinstance(value, bool) or value is None:
        return bool(value)
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off", "", "none"):
        return False
    raise UserError(f"network argument {key}={value!r} is not true or false.",
                    fix=f"pass --network_args \"{key}=True\" or \"{key}=False\".")


def parse_algo(kwargs) -> tuple[str, bool]:
    algo = str(kwargs.get("algo") or "lora").strip().lower()
    if algo in REFUSED_ALGOS:
        raise UserError(f"network argument algo={algo} is not supported here: {REFUSED_ALGOS[algo]}.",
                        fix=f"use algo={', algo='.join(ALGOS)}.")
    if algo not in ALGOS:
        raise UserError(f"network argument algo={algo!r} is not an algorithm this program knows.",
                        fix=f"use algo={', algo='.join(ALGOS)} (dora_wd=True adds DoRA to loha/lokr).")
    dora = algo == "dora" or _flag(kwargs, "dora_wd")
    return ("lora" if algo in ("locon", "dora") else algo), dora


def create_network(multiplier, network_dim, network_alpha, vae, text_encoder, unet, neuron_dropout=None,
                   **kwargs):
    """Build a fresh network from --network_dim/--network_alpha/--network_dropout/--network_args (LyCORIS names)."""
    for key, why in REFUSED_ARGS.items():
        if key in kwargs and _flag(kwargs, key):
            raise UserError(f"network argument {key}=True is not supported here: {why}.",
                            fix=f"drop \"{key}=True\" from --network_args.")
    algo, dora = parse_algo(kwargs)
    preset = str(kwargs.get("preset") or "full").strip().lower()
    if preset not in PRESETS:
        raise UserError(f"network argument preset={preset!r} is not supported here.",
                        fix="use preset=full (transformer blocks, ResNet blocks, down/upsamplers, text encoder) "
                            "or preset=attn-mlp (transformer blocks and text encoder only).")
    for key in sorted(set(kwargs) - _HANDLED - set(REFUSED_ARGS)):
        logger.warning("network argument %r is not supported by networks.lycoris and is ignored", key)
    network_dim, network_alpha = lora_net.rank_and_alpha(network_dim, network_alpha)
    number = lora_net._number
    conv_dim = conv_alpha = None
    if PRESETS[preset]:  # LyCORIS: the 3x3 convs take network_dim/alpha unless conv_dim/conv_alpha say
        conv_dim = number(kwargs, "conv_dim", int, low=0)
        conv_dim = network_dim if conv_dim is None else conv_dim
        conv_alpha = number(kwargs, "conv_alpha", float, low=0)
        conv_alpha = float(network_alpha) if conv_alpha is None else conv_alpha
    elif kwargs.get("conv_dim") not in (None, "", "0", 0):
        logger.warning("conv_dim is ignored with preset=%s (no 3x3 convs are patched)", preset)
    dropout = neuron_dropout if kwargs.get("dropout") is None else kwargs["dropout"]
    dropout = number({"dropout": dropout}, "dropout", float, low=0, high=1, high_open=True)
    rank_dropout = number(kwargs, "rank_dropout", float, low=0, high=1, high_open=True)
    if dora and (dropout or rank_dropout):
        raise UserError("dropout / rank_dropout do not apply to DoRA here: it normalises the whole merged "
                        "weight, so the update cannot be dropped per input or per rank.",
                        fix="drop --network_dropout, dropout and rank_dropout (module_dropout works).")
    factor = number(kwargs, "factor", int)
    factor = -1 if factor is None or factor <= 0 else factor
    lr_weights = blocks.parse_lr_weights(kwargs)
    per_block = blocks.parse_block_dims(kwargs, network_dim, network_alpha, conv_dim, conv_alpha, lr_weights)
    make = _module_factory(algo, dora, factor=factor, decompose_both=_flag(kwargs, "decompose_both"),
                           full_matrix=_flag(kwargs, "full_matrix"))
    logger.info("LyCORIS algorithm %s%s (dim %d, alpha %g%s)", algo, " + DoRA" if dora else "", network_dim,
                float(network_alpha), f", conv_dim {conv_dim}, conv_alpha {conv_alpha:g}" if conv_dim else "")
    network = LycorisNetwork(
        text_encoder, unet, multiplier=multiplier, lora_dim=network_dim, alpha=network_alpha, dropout=dropout,
        rank_dropout=rank_dropout,
        module_dropout=number(kwargs, "module_dropout", float, low=0, high=1, high_open=True),
        conv_lora_dim=conv_dim or None, conv_alpha=conv_alpha,
        block_dims=per_block and per_block.dims, block_alphas=per_block and per_block.alphas,
        conv_block_dims=per_block and per_block.conv_dims, conv_block_alphas=per_block and per_block.conv_alphas,
        module_class=make,
        loraplus_lr_ratio=number(kwargs, "loraplus_lr_ratio", float, low=0),
        loraplus_unet_lr_ratio=number(kwargs, "loraplus_unet_lr_ratio", float, low=0),
        loraplus_text_encoder_lr_ratio=number(kwargs, "loraplus_text_encoder_lr_ratio", float, low=0))
    network.set_block_lr_weight(lr_weights)
    network.algo, network.weight_decompose = algo, dora
    if dora and "dora" not in _notified:  # LyCORIS's newer default is the output axis; see the module docstring
        _notified.add("dora")
        print("note: DoRA's magnitude (dora_scale) is learned per input channel, the orientation WebUI and "
              "ComfyUI both apply as trained (LyCORIS wd_on_out=False)", file=sys.stderr)
    return network


def create_network_from_weights(multiplier, file, vae, text_encoder, unet, weights_sd=None,
                                for_inference=False, **kwargs):
    """A network whose modules (any mix of LoRA, LoHa, LoKr, DoRA) are those of the file; returns (network, weights)."""
    if weights_sd is None:
        weights_sd = fmt.read_weights(file)
    else:
        weights_sd = {fmt.canonical_key(k): v for k, v in weights_sd.items()}
    specs = {}
    for name, tensors in lyc.group_modules(weights_sd).items():
        if not name.startswith(("lora_unet_", "lora_te")):
            raise UserError(f"the tensor {name} is not named like a kohya/LyCORIS module (lora_unet_*, lora_te_*).",
                            path=file, fix="pass a kohya or LyCORIS format adapter file.")
        specs[name] = (lyc.module_algo(name, tensors, file), tensors)
    if not specs:
        raise UserError("the file holds no adapter modules.", path=file,
                        fix="pass a LoRA/LoHa/LoKr/DoRA file (lora_unet_* / lora_te_* keys).")

    def make(name, layer, mult, dim, alpha, dropout=None, rank_dropout=None, module_dropout=None):
        algo, t = specs[name]
        dora = "dora_scale" in t
        kw = {"dropout": dropout, "rank_dropout": rank_dropout, "module_dropout": module_dropout}
        if algo == "lora":
            if not dora:
                return LoRAModule(name, layer, mult, dim, alpha, **kw)
            return DoRAModule(name, layer, mult, dim, alpha, **kw)
        if algo == "loha":
            return LoHaModule(name, layer, mult, dim, alpha, weight_decompose=dora, **kw)
        shapes = {k: tuple(v.shape) for k, v in t.items() if k.startswith("lokr_")}
        return LoKrModule(name, layer, mult, dim, alpha, shapes=shapes, weight_decompose=dora, **kw)

    dims = {n: lyc.module_rank(a, t) or 1 for n, (a, t) in specs.items()}
    alphas = {n: float(t["alpha"]) if "alpha" in t else float(dims[n]) for n, (a, t) in specs.items()}
    network = LycorisNetwork(text_encoder, unet, multiplier=multiplier, modules_dim=dims, modules_alpha=alphas,
                             module_class=make)
    network.set_block_lr_weight(blocks.parse_lr_weights(kwargs))
    return network, weights_sd
