"""What check_lora_weights.py prints about a file: metadata, and per module rank, alpha, dtype, norm.

Works from the raw tensors, so a damaged file is still described (with '?' where it cannot be).
"""
from __future__ import annotations

import collections

from library.errors import UserError
from networks import lora_format as fmt

SHOWN_METADATA_CHARS = 120


def module_rows(sd: dict) -> list[tuple[str, str, str, str, str]]:
    """(name, rank, alpha, dtype, ||delta||_F at multiplier 1) per module."""
    modules = collections.defaultdict(dict)
    for key, value in sd.items():
        name, _, suffix = key.partition(".")
        modules[name][suffix] = value
    rows = []
    for name, t in sorted(modules.items()):
        down, up, alpha = t.get("lora_down.weight"), t.get("lora_up.weight"), t.get("alpha")
        rank = str(down.shape[0]) if down is not None and down.dim() >= 2 else "?"
        alpha_text = f"{float(alpha):g}" if alpha is not None and alpha.numel() == 1 else "-"
        dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in t.values()})
        rows.append((name, rank, alpha_text, "/".join(dtypes), _norm(down, up, alpha)))
    return rows


def _norm(down, up, alpha) -> str:
    """||(alpha/r) up @ down||_F from the factors: sqrt(sum((A^T A) * (B B^T)))."""
    if down is None or up is None or down.dim() < 2 or up.dim() < 2 or up.shape[1] != down.shape[0]:
        return "?"
    a, b = up.float().flatten(1), down.float().flatten(1)
    scale = float(alpha) / b.shape[0] if alpha is not None and alpha.numel() == 1 and float(alpha) else 1.0
    value = float(((a.T @ a) * (b @ b.T)).sum().clamp(min=0).sqrt()) * abs(scale)
    return f"{value:.4g}"


def describe(path, show_all: bool = False) -> str:
    from library.models.checkpoint_io import check_exists, load_state_dict, read_safetensors_metadata

    path = check_exists(path, "LoRA file", flag="the LoRA file")
    sd = load_state_dict(path)
    reason = fmt.not_a_lora_reason(sd)
    if reason:
        raise UserError(f"{path} is not a LoRA file: {reason}.", path=path,
                        fix="pass a LoRA file; to look into a model checkpoint use another tool.")
    lines = [f"{path}"]
    metadata = read_safetensors_metadata(path) if str(path).lower().endswith(".safetensors") else {}
    if metadata:
        lines.append("metadata:")
        for key in sorted(metadata):
            value = metadata[key]
            if len(value) > SHOWN_METADATA_CHARS and not show_all:
                value = value[:SHOWN_METADATA_CHARS] + f"... ({len(metadata[key])} characters)"
            lines.append(f"  {key}: {value}")
    rows = module_rows(sd)
    width = max((len(r[0]) for r in rows), default=6)
    lines.append(f"{'module'.ljust(width)}  rank  alpha  dtype     |delta|")
    lines += [f"{n.ljust(width)}  {r:>4}  {a:>5}  {d:<8}  {norm}" for n, r, a, d, norm in rows]
    if show_all:
        lines.append("tensors:")
        lines += [f"  {k}  {list(v.shape)}  {str(v.dtype).removeprefix('torch.')}  mean|x| "
                  f"{float(v.float().abs().mean()) if v.numel() else 0:.4g}" for k, v in sorted(sd.items())]
    te = sum(r[0].startswith("lora_te") for r in rows)
    ranks = sorted({r[1] for r in rows}, key=lambda x: (len(x), x))
    alphas = sorted({r[2] for r in rows})
    lines.append(f"{len(rows)} modules ({te} text encoder, {len(rows) - te} U-Net); ranks {', '.join(ranks)}; "
                 f"alphas {', '.join(alphas)}; dtypes "
                 f"{', '.join(sorted({str(v.dtype).removeprefix('torch.') for v in sd.values()}))}")
    return "\n".join(lines)
