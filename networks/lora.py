"""LoRA / LoCon for SD 1.x / 2.x with kohya sd-scripts' `networks.lora` API and file format.

`--network_module networks.lora` imports this module and calls `create_network`; generation and
merge scripts call `create_network_from_weights`. Each patched layer keeps its own weights and
gets `forward(x) = layer(x) + up(down(x)) * multiplier * alpha / rank`. Names, shapes and the
metadata hashes follow docs/lora_format.md (helpers in `lora_format.py`);
per-block ranks and learning rates are parsed in `lora_blocks.py`.
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from library.errors import UserError
from networks import lora_blocks as blocks
from networks import lora_format as fmt

logger = logging.getLogger(__name__)


class LoRAModule(torch.nn.Module):
    """A low-rank update for one Linear or Conv2d layer (kohya style: the layer stays in place)."""

    def __init__(self, lora_name, org_module, multiplier=1.0, lora_dim=4, alpha=1, dropout=None,
                 rank_dropout=None, module_dropout=None):
        super().__init__()
        self.lora_name = lora_name
        self.lora_dim = int(lora_dim)
        if isinstance(org_module, torch.nn.Conv2d):
            # down carries the layer's kernel/stride/padding so up @ down merges exactly.
            self.lora_down = torch.nn.Conv2d(org_module.in_channels, self.lora_dim, org_module.kernel_size,
                                             org_module.stride, org_module.padding,
                                             dilation=org_module.dilation, bias=False)
            self.lora_up = torch.nn.Conv2d(self.lora_dim, org_module.out_channels, 1, 1, bias=False)
        else:
            self.lora_down = torch.nn.Linear(org_module.in_features, self.lora_dim, bias=False)
            self.lora_up = torch.nn.Linear(self.lora_dim, org_module.out_features, bias=False)
        torch.nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        torch.nn.init.zeros_(self.lora_up.weight)  # starts as an exact no-op

        if isinstance(alpha, torch.Tensor):
            alpha = float(alpha)
        alpha = float(self.lora_dim if alpha is None or alpha == 0 else alpha)  # 0 means "= rank"
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.float32))
        self.scale = alpha / self.lora_dim
        self.multiplier = multiplier
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self._org = [org_module]  # in a list so it is not a submodule (not saved, not trained)
        self.org_forward = None

    @property
    def org_module(self):
        return self._org[0]

    def apply_to(self):
        """Route the layer's forward through this module."""
        if self.org_forward is None:
            self._own_forward = "forward" in vars(self.org_module)  # someone else's patch to keep
            self.org_forward = self.org_module.forward
            self.org_module.forward = self.forward

    def restore(self):
        """Undo `apply_to`: the layer computes its plain output again."""
        if self.org_forward is not None:
            if self._own_forward:
                self.org_module.forward = self.org_forward
            else:
                del self.org_module.forward  # back to the class's forward
            self.org_forward = None

    def forward(self, x):
        out = self.org_forward(x)
        if self.multiplier == 0:
            return out
        scale = self.scale
        # Scaled in rank space (r channels, not the layer's width): one pass less over the layer's
        # output forward and backward, 7% of a CPU step on SD1.5 at rank 32.
        if not self.training:
            return out + self.lora_up(self.lora_down(x) * (self.multiplier * scale))
        if self.module_dropout and torch.rand(1) < self.module_dropout:
            return out
        lx = self.lora_down(x)
        if self.dropout:
            lx = F.dropout(lx, p=self.dropout)
        if self.rank_dropout:
            mask = torch.rand((lx.size(0), self.lora_dim), device=lx.device) > self.rank_dropout
            if lx.dim() == 3:  # Linear on (batch, tokens, rank)
                mask = mask.unsqueeze(1)
            elif lx.dim() == 4:  # Conv2d on (batch, rank, h, w)
                mask = mask[:, :, None, None]
            lx = lx * mask.to(lx.dtype)
            scale = scale / (1.0 - self.rank_dropout)  # keep the expected update unchanged
        return out + self.lora_up(lx * (self.multiplier * scale))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "alpha" in state_dict:  # a loaded alpha must also change the applied scale
            self.scale = float(self.alpha) / self.lora_dim

    @staticmethod
    def compose(up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        """up @ down shaped like the layer's weight (Linear 2-D; Conv2d [out, in, kh, kw])."""
        if down.dim() == 2:
            return up.flatten(1) @ down
        return torch.einsum("or,rihw->oihw", up.flatten(1), down)

    def delta_weight(self, device=None) -> torch.Tensor:
        """The weight change this module applies at multiplier 1, in fp32."""
        up = self.lora_up.weight.to(device, torch.float32)
        down = self.lora_down.weight.to(device, torch.float32)
        return self.compose(up, down) * self.scale

    @torch.no_grad()
    def merge_to(self, sd: dict, dtype=None, device=None):
        """Add multiplier * alpha/rank * up @ down from `sd` (keys without the module name) to the layer.

        Computed in fp32 on `device` (default: the layer's); the layer keeps its own dtype and device.
        `dtype` is accepted for kohya compatibility.
        """
        weight = self.org_module.weight
        device = device or weight.device
        down = sd["lora_down.weight"].to(device, torch.float32)
        up = sd["lora_up.weight"].to(device, torch.float32)
        rank = down.shape[0]
        alpha = float(sd["alpha"]) if "alpha" in sd else rank
        alpha = alpha or rank  # 0 means "= rank", as when loading
        delta = self.compose(up, down).reshape(weight.shape) * (self.multiplier * alpha / rank)
        weight.copy_(weight.to(device, torch.float32) + delta)


class LoRANetwork(torch.nn.Module):
    """All LoRA modules for one SD 1.x/2.x UNet + CLIP text encoder, registered under their file names."""

    UNET_TARGET_REPLACE_MODULE = list(fmt.UNET_TARGETS)
    UNET_TARGET_REPLACE_MODULE_CONV2D_3X3 = list(fmt.UNET_CONV_TARGETS)
    TEXT_ENCODER_TARGET_REPLACE_MODULE = list(fmt.TE_TARGETS)
    LORA_PREFIX_UNET = fmt.UNET_PREFIX
    LORA_PREFIX_TEXT_ENCODER = fmt.TE_PREFIX
    FILE_TENSOR_SUFFIXES = fmt.TENSOR_SUFFIXES  # what save_weights writes (networks.lycoris adds its keys)

    NUM_OF_BLOCKS = blocks.NUM_BLOCKS
    NUM_OF_MID_BLOCKS = blocks.NUM_MID

    def __init__(self, text_encoder, unet, multiplier=1.0, lora_dim=4, alpha=1, dropout=None,
                 rank_dropout=None, module_dropout=None, conv_lora_dim=None, conv_alpha=None,
                 block_dims=None, block_alphas=None, conv_block_dims=None, conv_block_alphas=None,
                 modules_dim=None, modules_alpha=None, module_class=LoRAModule, varbose=False,
                 loraplus_lr_ratio=None, loraplus_unet_lr_ratio=None, loraplus_text_encoder_lr_ratio=None):
        """kohya's signature. Ranks come from, in this order: `modules_dim` (a file), `block_dims`
        (25 per-block values for the U-Net; `conv_block_dims` for 3x3 convs), `lora_dim`/`conv_lora_dim`."""
        super().__init__()
        self.multiplier = multiplier
        self.lora_dim, self.alpha = lora_dim, alpha
        self.conv_lora_dim, self.conv_alpha = conv_lora_dim, conv_alpha
        self.dropout, self.rank_dropout, self.module_dropout = dropout, rank_dropout, module_dropout
        self.loraplus_unet_lr_ratio = loraplus_unet_lr_ratio or loraplus_lr_ratio
        self.loraplus_text_encoder_lr_ratio = loraplus_text_encoder_lr_ratio or loraplus_lr_ratio
        self._modules_dim, self._modules_alpha = modules_dim, modules_alpha
        self._module_class = module_class
        self.block_dims = None
        if block_dims is not None:
            self.block_dims = blocks.BlockDims(
                list(block_dims), list(block_alphas or [alpha] * len(block_dims)),
                None if conv_block_dims is None else list(conv_block_dims),
                None if conv_block_dims is None else list(conv_block_alphas or [conv_alpha or 1.0] * len(conv_block_dims)))
        self.block_lr_weight = None

        unet_targets = fmt.UNET_TARGETS
        with_conv = conv_lora_dim if self.block_dims is None else self.block_dims.conv_dims
        if with_conv or modules_dim is not None:  # from weights: the file decides
            unet_targets = unet_targets + fmt.UNET_CONV_TARGETS
        self.is_sdxl = _is_sdxl(unet)
        namer = fmt.lora_name
        if self.is_sdxl:  # kohya's SDXL names: the UNet's original layout, lora_te1_ / lora_te2_
            from library.models.sdxl import lora_names as sdxl_names

            namer = sdxl_names.lora_module_name
            encoders = list(text_encoder) if isinstance(text_encoder, (list, tuple)) else [text_encoder]
            self.text_encoder_loras = [lora for prefix, encoder in zip(sdxl_names.TEXT_ENCODER_PREFIXES, encoders)
                                       for lora in self._create(prefix, encoder, fmt.TE_TARGETS, namer)]
        else:
            text_encoder = _single_text_encoder(text_encoder)
            self.text_encoder_loras = self._create(fmt.TE_PREFIX, text_encoder, fmt.TE_TARGETS)
        self.unet_loras = self._create(fmt.UNET_PREFIX, unet, unet_targets, namer)
        for lora in self.text_encoder_loras + self.unet_loras:
            self.add_module(lora.lora_name, lora)
        if varbose:
            for lora in self.text_encoder_loras + self.unet_loras:
                logger.info("%s: dim %d, alpha %s", lora.lora_name, lora.lora_dim, float(lora.alpha))
        logger.info("LoRA: %d text encoder modules, %d U-Net modules",
                    len(self.text_encoder_loras), len(self.unet_loras))

        # Modules named in the weights that match no layer here: reported, never silently dropped.
        self.unmatched_modules = []
        if modules_dim is not None:
            self.unmatched_modules = sorted(set(modules_dim) - {m.lora_name for m in self.all_loras()})
            if self.unmatched_modules:
                logger.warning("%d LoRA modules in the weights match no layer of this model and are "
                               "ignored, e.g. %s", len(self.unmatched_modules), self.unmatched_modules[:3])

    def _create(self, prefix, root, class_names, namer=fmt.lora_name):
        """`namer(prefix, module path)`: the name in the file (SDXL's differs from the path)."""
        if root is None:
            return []
        loras = []
        for path, layer in fmt.iter_targets(root, class_names):
            name = namer(prefix, path)
            conv3x3 = not (isinstance(layer, torch.nn.Linear) or fmt.is_1x1(layer))
            index = blocks.block_index(name)
            if self._modules_dim is not None:
                if name not in self._modules_dim:
                    continue
                dim, alpha = self._modules_dim[name], self._modules_alpha[name]
            elif self.block_dims is not None and index is not None:
                dim, alpha = self.block_dims.for_module(index, conv3x3)  # rank 0: no module
            elif not conv3x3:
                dim, alpha = self.lora_dim, self.alpha
            else:  # 3x3 convs only with LoCon
                dim, alpha = self.conv_lora_dim, self.conv_alpha
            if not dim:
                continue
            loras.append(self._module_class(name, layer, self.multiplier, dim, alpha, dropout=self.dropout,
                                            rank_dropout=self.rank_dropout,
                                            module_dropout=self.module_dropout))
        return loras

    def all_loras(self):
        return self.text_encoder_loras + self.unet_loras

    # --- the calls train_network.py and the generation scripts make -----------------------------

    def apply_to(self, text_encoder=None, unet=None, apply_text_encoder=True, apply_unet=True):
        """Patch the layers; a part not applied is dropped from the network (not trained, not saved)."""
        if not apply_text_encoder:
            self._drop(self.text_encoder_loras)
            self.text_encoder_loras = []
        if not apply_unet:
            self._drop(self.unet_loras)
            self.unet_loras = []
        for lora in self.all_loras():
            lora.apply_to()

    def _drop(self, loras):
        for lora in loras:
            lora.restore()
            delattr(self, lora.lora_name)

    def restore(self):
        """Unpatch every layer (the model computes its base output again)."""
        for lora in self.all_loras():
            lora.restore()

    def set_multiplier(self, multiplier):
        self.multiplier = multiplier
        for lora in self.all_loras():
            lora.multiplier = multiplier

    def is_mergeable(self):
        return True

    def enable_gradient_checkpointing(self):
        pass  # the modules hold no activations of their own; the base model does the checkpointing

    def prepare_grad_etc(self, text_encoder, unet):
        self.requires_grad_(True)

    def on_epoch_start(self, text_encoder, unet):
        self.train()

    def get_trainable_params(self):
        return self.parameters()

    def set_block_lr_weight(self, block_lr_weight):
        """25 lr multipliers for the U-Net blocks (IN00-IN11, MID, OUT00-OUT11), or None."""
        self.block_lr_weight = None if block_lr_weight is None else list(block_lr_weight)

    def get_lr_weight(self, block_idx) -> float:
        if self.block_lr_weight is None or block_idx is None:
            return 1.0
        return self.block_lr_weight[block_idx]

    def prepare_optimizer_params(self, text_encoder_lr, unet_lr, default_lr):
        """One param group per part (two with LoRA+; one per U-Net block with block lr weights).

        lr None -> default_lr; lr 0 -> that part gets no group (it is not trained), as in kohya.
        Each group has a "name", kohya's lr description (textencoder, unet, unet_block<i>, with
        " plus" for LoRA+ up matrices), which names the lr/* curves in TensorBoard.
        """
        if isinstance(text_encoder_lr, (list, tuple)):  # SDXL-style list: SD1 has one encoder
            text_encoder_lr = text_encoder_lr[0] if text_encoder_lr else None
        te_lr = default_lr if text_encoder_lr is None else text_encoder_lr
        unet_lr = default_lr if unet_lr is None else unet_lr
        parts = [("textencoder", self.text_encoder_loras, te_lr, self.loraplus_text_encoder_lr_ratio)]
        if self.block_lr_weight is None:
            parts.append(("unet", self.unet_loras, unet_lr, self.loraplus_unet_lr_ratio))
        else:  # one group per block, so each block's lr is its own curve in the logs
            by_block = {}
            for lora in self.unet_loras:
                by_block.setdefault(blocks.block_index(lora.lora_name), []).append(lora)
            for index in sorted(by_block, key=lambda i: -1 if i is None else i):
                name = "unet" if index is None else f"unet_block{index}"
                parts.append((name, by_block[index], unet_lr * self.get_lr_weight(index),
                              self.loraplus_unet_lr_ratio))
        groups = []
        for name, loras, lr, ratio in parts:
            if not loras or not lr:
                continue
            ups = [p for m in loras for p in _up_parameters(m)]
            up_ids = {id(p) for p in ups}
            downs = [p for m in loras for p in m.parameters() if id(p) not in up_ids]
            if ratio:  # LoRA+: the up matrices learn `ratio` times faster
                groups += [{"params": downs, "lr": lr, "name": name},
                           {"params": ups, "lr": lr * ratio, "name": name + " plus"}]
            else:
                groups.append({"params": downs + ups, "lr": lr, "name": name})
        return groups

    def load_state_dict(self, state_dict, strict=True, assign=False):
        # Accept the transformers-5 TE spelling too (`lora_te_encoder_...`), and 2-D tensors for
        # 1x1 convs (some tools write those; WebUI/ComfyUI accept them).
        own = {k: v.dim() for k, v in self.state_dict().items()}
        state_dict = {fmt.canonical_key(k): v for k, v in state_dict.items()}
        state_dict = {k: v[:, :, None, None] if v.dim() == 2 and own.get(k) == 4 else v
                      for k, v in state_dict.items()}
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        except RuntimeError as err:
            if "size mismatch" not in str(err):
                raise
            raise UserError(f"the LoRA weights do not fit this network: {err}".replace("\n", " "),
                            fix="use the same --network_dim / conv_dim as the file, or pass "
                                "--dim_from_weights to take the ranks from the file.") from None

    def load_weights(self, file):
        """Load a LoRA file; return (missing_keys, unexpected_keys). Unexpected ones are also logged."""
        try:
            info = self.load_state_dict(fmt.read_weights(file), strict=False)
        except UserError as err:
            raise UserError(str(err), path=file) from None
        if info.unexpected_keys:
            logger.warning("%d tensors in %s match no layer this network patches and were not loaded, "
                           "e.g. %s", len(info.unexpected_keys), file, info.unexpected_keys[:3])
        return info

    def save_weights(self, file, dtype=None, metadata=None):
        """Write the LoRA file atomically; .safetensors gets sshs_model_hash / sshs_legacy_hash."""
        from library.fileio import atomic_path, check_finite, torch_save_atomic

        sd = {k: v.detach().to("cpu") for k, v in self.state_dict().items() if k.endswith(self.FILE_TENSOR_SUFFIXES)}
        # Per-block alphas (block_alphas) or edited modules: diffusers would apply one alpha to
        # every Linear module, so the differences are folded into lora_up (same update everywhere).
        sd, changed = fmt.unify_linear_alphas(sd)
        if changed:
            logger.info("%s: %d Linear modules had another alpha; it is folded into their lora_up so that "
                        "all Linear modules share one alpha (the update is unchanged)", file, changed)
        sd = {k: v.to(dtype or v.dtype).contiguous() for k, v in sd.items()}
        check_finite(sd, file, "LoRA")  # a NaN file never replaces a good one
        if str(file).endswith(".safetensors"):
            data = fmt.serialize_with_hashes(sd, metadata)  # hashed bytes == written bytes
            with atomic_path(file, needed_bytes=len(data)) as tmp:
                tmp.write_bytes(data)
        else:
            torch_save_atomic(sd, file)

    def merge_to(self, text_encoder, unet, weights_sd=None, dtype=None, device=None):
        """Add the weights' updates into the model's own weights (no forward patching)."""
        if weights_sd is None:
            weights_sd = self.state_dict()
        per_module = {}
        for key, value in weights_sd.items():
            name, _, rest = fmt.canonical_key(key).partition(".")
            per_module.setdefault(name, {})[rest] = value
        for lora in self.all_loras():
            sd = per_module.pop(lora.lora_name, None)
            if sd is not None:
                lora.merge_to(sd, dtype, device)
        if per_module:
            logger.warning("%d LoRA modules in the weights match no layer and were not merged, e.g. %s",
                           len(per_module), sorted(per_module)[:3])
        logger.info("merged LoRA weights into the model")

    @torch.no_grad()
    def apply_max_norm_regularization(self, max_norm_value, device):
        """Scale down (up, down) pairs whose update norm exceeds max_norm_value (--scale_weight_norms).

        Returns (number of modules scaled, mean norm after scaling, max norm after scaling).
        """
        loras = self.all_loras()
        if not loras:
            return 0, 0.0, 0.0
        norms = torch.stack([lora.delta_weight(device).norm() for lora in loras])
        ratios = (max_norm_value / norms).clamp(max=1.0)  # 1 where already under the cap
        for lora, ratio in zip(loras, ratios.sqrt().tolist()):
            if ratio != 1.0:  # split the shrink evenly between the two factors
                lora.lora_down.weight.mul_(ratio)
                lora.lora_up.weight.mul_(ratio)
        scaled = norms * ratios
        keys_scaled = int((ratios < 1.0).sum())
        return keys_scaled, float(scaled.mean()), float(scaled.max())


def _is_sdxl(unet) -> bool:
    """An SDXL UNet (its pooled-text + size embedding), as kohya tells SDXL by its UNet's class."""
    return getattr(getattr(unet, "config", None), "addition_embed_type", None) == "text_time"


def _up_parameters(module) -> list:
    """The tensors LoRA+ trains faster: lora_up, or what a networks.lycoris module names (none for LoHa/LoKr)."""
    if hasattr(module, "up_parameters"):
        return module.up_parameters() or []
    return list(module.lora_up.parameters())


def _single_text_encoder(text_encoder):
    if isinstance(text_encoder, (list, tuple)):
        if len(text_encoder) > 1:
            raise UserError("networks.lora here supports SD 1.x/2.x with one text encoder, got "
                            f"{len(text_encoder)}.", fix="train an SD 1.x or 2.x model with this script.")
        return text_encoder[0] if text_encoder else None
    return text_encoder


# --- construction from command-line options --------------------------------------------------

_SUPPORTED_ARGS = {"conv_dim", "conv_alpha", "rank_dropout", "module_dropout", "loraplus_lr_ratio",
                   "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio",
                   *blocks.BLOCK_DIM_KEYS, *blocks.LR_WEIGHT_KEYS}


def _number(kwargs, key, kind, low=None, high=None, high_open=False):
    value = kwargs.get(key)
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    try:
        number = kind(float(value)) if kind is int else kind(value)
    except (TypeError, ValueError):
        number = None
    bad = (number is None or not math.isfinite(number) or (kind is int and float(value) != number)
           or (low is not None and number < low) or (high is not None and number > high)
           or (high_open and high is not None and number >= high))
    if bad:
        rng = f" between {low} and {high}" if high is not None else (f" >= {low}" if low is not None else "")
        raise UserError(f"network argument {key}={value!r} is not a valid {kind.__name__}{rng}.",
                        fix=f"pass e.g. --network_args \"{key}=...\" with a {kind.__name__}{rng}.")
    return number


def rank_and_alpha(network_dim, network_alpha) -> tuple[int, float]:
    """--network_dim / --network_alpha with kohya's defaults (4, 1), the rank checked to be a whole number."""
    network_dim = 4 if network_dim is None else network_dim
    network_alpha = 1.0 if network_alpha is None else network_alpha
    if isinstance(network_dim, float) and network_dim.is_integer():
        network_dim = int(network_dim)
    if not isinstance(network_dim, int) or network_dim <= 0:
        raise UserError(f"--network_dim must be a positive integer, got {network_dim!r}.",
                        fix="pass e.g. --network_dim 16.")
    return network_dim, network_alpha


def create_network(multiplier, network_dim, network_alpha, vae, text_encoder, unet, neuron_dropout=None,
                   **kwargs):
    """Build a fresh network from --network_dim/--network_alpha/--network_dropout/--network_args."""
    network_dim, network_alpha = rank_and_alpha(network_dim, network_alpha)
    if not math.isfinite(float(network_alpha)) or float(network_alpha) < 0:
        raise UserError(f"--network_alpha must be a positive number, got {network_alpha!r}.",
                        fix="pass e.g. --network_alpha 8 (0 means alpha = network_dim).")
    for key in sorted(set(kwargs) - _SUPPORTED_ARGS):
        logger.warning("network argument %r is not supported by networks.lora yet and is ignored", key)

    conv_dim = _number(kwargs, "conv_dim", int, low=1)
    conv_alpha = _number(kwargs, "conv_alpha", float, low=0)
    if conv_dim and conv_alpha is None:
        conv_alpha = 1.0  # kohya's default
    dropout = None if neuron_dropout is None else _number({"dropout": neuron_dropout}, "dropout", float,
                                                           low=0, high=1, high_open=True)
    lr_weights = blocks.parse_lr_weights(kwargs)
    per_block = blocks.parse_block_dims(kwargs, network_dim, network_alpha, conv_dim, conv_alpha, lr_weights)
    network = LoRANetwork(
        text_encoder, unet, multiplier=multiplier, lora_dim=network_dim, alpha=network_alpha,
        dropout=dropout,
        rank_dropout=_number(kwargs, "rank_dropout", float, low=0, high=1, high_open=True),
        module_dropout=_number(kwargs, "module_dropout", float, low=0, high=1, high_open=True),
        conv_lora_dim=conv_dim, conv_alpha=conv_alpha,
        block_dims=per_block and per_block.dims, block_alphas=per_block and per_block.alphas,
        conv_block_dims=per_block and per_block.conv_dims, conv_block_alphas=per_block and per_block.conv_alphas,
        loraplus_lr_ratio=_number(kwargs, "loraplus_lr_ratio", float, low=0),
        loraplus_unet_lr_ratio=_number(kwargs, "loraplus_unet_lr_ratio", float, low=0),
        loraplus_text_encoder_lr_ratio=_number(kwargs, "loraplus_text_encoder_lr_ratio", float, low=0),
    )
    network.set_block_lr_weight(lr_weights)
    return network


def create_network_from_weights(multiplier, file, vae, text_encoder, unet, weights_sd=None,
                                for_inference=False, **kwargs):
    """Build a network whose modules, ranks and alphas are those in the file; returns (network, weights).

    The returned weights use the contract's key names, ready for `network.load_state_dict` or
    `network.merge_to`. `for_inference` is accepted for kohya compatibility (same module class).
    """
    if weights_sd is None:
        weights_sd = fmt.read_weights(file)
    else:
        weights_sd = {fmt.canonical_key(k): v for k, v in weights_sd.items()}
    from networks import lycoris, lycoris_format

    if lycoris_format.has_lycoris_modules(weights_sd):  # LoHa / LoKr / DoRA: networks.lycoris builds it
        return lycoris.create_network_from_weights(multiplier, file, vae, text_encoder, unet, weights_sd,
                                                   for_inference, **kwargs)
    modules_dim, modules_alpha = fmt.ranks_and_alphas(weights_sd)
    if not modules_dim:
        raise UserError("the file holds no LoRA modules (no `*.lora_down.weight` tensors).", path=file,
                        fix="pass a kohya-format LoRA file (lora_unet_* / lora_te_* keys).")
    network = LoRANetwork(text_encoder, unet, multiplier=multiplier, modules_dim=modules_dim,
                          modules_alpha=modules_alpha,
                          loraplus_lr_ratio=_number(kwargs, "loraplus_lr_ratio", float, low=0),
                          loraplus_unet_lr_ratio=_number(kwargs, "loraplus_unet_lr_ratio", float, low=0),
                          loraplus_text_encoder_lr_ratio=_number(kwargs, "loraplus_text_encoder_lr_ratio",
                                                                 float, low=0))
    network.set_block_lr_weight(blocks.parse_lr_weights(kwargs))  # ranks come from the file
    return network, weights_sd
