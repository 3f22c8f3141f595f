"""The `--network_module` contract (docs/network_module.md): what train_network.py asks of a network
module, and the only place it asks. Every module goes through these functions, networks.lora included.

A module provides kohya's two factories:

    create_network(multiplier, network_dim, network_alpha, vae, text_encoder, unet, neuron_dropout=None, **kwargs)
    create_network_from_weights(multiplier, file, vae, text_encoder, unet, weights_sd=None, for_inference=False,
                                **kwargs) -> (network, weights_sd)

and the network they return (a torch.nn.Module) provides apply_to, prepare_optimizer_params,
save_weights, load_weights, set_multiplier, enable_gradient_checkpointing, and for --base_weights
merge_to, for --scale_weight_norms apply_max_norm_regularization. Every file a network saves is
checked with the kohya file contract (library.lora_tools.verify.check_saved_lora), whatever module wrote it.
"""
from __future__ import annotations

import importlib

from library.errors import UserError

REQUIRED_FUNCTIONS = ("create_network", "create_network_from_weights")
REQUIRED_METHODS = ("apply_to", "prepare_optimizer_params", "save_weights", "load_weights")


def import_network_module(name: str):
    """The module named by --network_module, checked to provide kohya's two factories. kohya_ss's
    `lycoris.kohya` resolves to our networks.lycoris (with one notice), installed package or not."""
    from networks.lycoris import resolve_module_name

    name = resolve_module_name(name)
    try:
        module = importlib.import_module(name)
    except ImportError as err:
        raise UserError(f"cannot import --network_module {name} ({err}).",
                        fix="use --network_module networks.lora.") from None
    missing = [f for f in REQUIRED_FUNCTIONS if not callable(getattr(module, f, None))]
    if missing:
        raise UserError(f"--network_module {name} does not provide {', '.join(missing)}, which every network "
                        "module must (see docs/network_module.md).",
                        fix="use --network_module networks.lora, or add the functions to the module.")
    return module


def check_network(name: str, network) -> None:
    """The network a module's factory returned has the methods the trainer calls."""
    missing = [m for m in REQUIRED_METHODS if not callable(getattr(network, m, None))]
    if missing:
        raise UserError(f"the network from --network_module {name} has no {', '.join(missing)} method, which "
                        "train_network.py calls (see docs/network_module.md).",
                        fix="use --network_module networks.lora, or add the methods to the network class.")


def build_network(args, network_module, net_kwargs, vae, text_encoder, unet, train_te=True, train_unet=True,
                  print_fn=print):
    """kohya's order: merge --base_weights into the model, create the network (ranks from
    --network_weights with --dim_from_weights), patch the model, load --network_weights, set
    --network_multiplier."""
    multipliers = getattr(args, "base_weights_multiplier", None) or []
    for i, path in enumerate(getattr(args, "base_weights", None) or []):
        multiplier = multipliers[i] if i < len(multipliers) else 1.0
        merged, weights = network_module.create_network_from_weights(multiplier, path, vae, text_encoder, unet,
                                                                     for_inference=True)
        # on the CPU in the model's dtype: the model is not on the GPU yet
        merged.merge_to(text_encoder, unet, weights, None, "cpu")
        print_fn(f"merged {path} into the base model (multiplier {multiplier})")
    if args.dim_from_weights:
        network, _ = network_module.create_network_from_weights(1.0, args.network_weights, vae, text_encoder, unet,
                                                                **net_kwargs)
    else:
        network = network_module.create_network(1.0, args.network_dim, args.network_alpha, vae, text_encoder, unet,
                                                neuron_dropout=args.network_dropout, **net_kwargs)
    check_network(getattr(args, "network_module", None) or network_module.__name__, network)
    network.apply_to(text_encoder, unet, train_te, train_unet)
    if args.network_weights:  # also with --dim_from_weights, which only takes the ranks (as kohya)
        info = network.load_weights(args.network_weights)
        print_fn(f"loaded network weights from {args.network_weights}: {info}")
    if args.network_multiplier != 1.0:
        network.set_multiplier(args.network_multiplier)
    return network


def optimizer_params(network, text_encoder_lr, unet_lr, default_lr) -> list[dict]:
    """prepare_optimizer_params' groups; kohya networks may also return lr descriptions, dropped here."""
    params = network.prepare_optimizer_params(text_encoder_lr, unet_lr, default_lr)
    return params[0] if isinstance(params, tuple) else params


def check_saved_file(path, unet, text_encoder):
    """The file contract, checked on every file any network module writes (names, shapes of
    lora_down/lora_up pairs, finite values, metadata); raises a UserError naming the file."""
    from library.lora_tools import verify

    return verify.check_saved_lora(path, unet, text_encoder)
