"""Full / native fine-tune difference (docs/adapters.md#full): ``diff`` (W's shape), ``diff_b`` (out,).

    W' = W + m·diff,  b' = b + m·diff_b   (a layer without a bias ignores diff_b, as LyCORIS does)
"""

from __future__ import annotations

import torch

from .base import f32, need, reshape_to

ALGO = "full"
SUFFIXES = ("diff", "diff_b")


def detect(suffixes: set) -> bool:
    return "diff" in suffixes


def rank(t) -> None:
    return None


def validate(t, extra=None) -> None:
    need(t, "diff")
    if "diff_b" in t and t["diff_b"].numel() != t["diff"].shape[0]:
        raise ValueError(f"diff_b {tuple(t['diff_b'].shape)} does not match diff {tuple(t['diff'].shape)}")


def weight_shape_hint(t) -> tuple:
    return tuple(t["diff"].shape)


def delta(t, scale: float, weight_shape=None, base_weight=None) -> torch.Tensor:
    return reshape_to(f32(t["diff"]) * scale, weight_shape)


def bias_delta(t) -> torch.Tensor | None:
    return f32(t["diff_b"]) if "diff_b" in t else None


def to_tensors(diff, diff_b=None) -> dict[str, torch.Tensor]:
    out = {"diff": diff}
    if diff_b is not None:
        out["diff_b"] = diff_b
    return out
