"""Norm-layer difference (docs/adapters.md#norm): ``w_norm``/``b_norm`` (C,) for LayerNorm/GroupNorm.

    γ' = γ + m·w_norm,  β' = β + m·b_norm
"""

from __future__ import annotations

import torch

from .base import f32, need, reshape_to

ALGO = "norm"
SUFFIXES = ("w_norm", "b_norm")


def detect(suffixes: set) -> bool:
    return "w_norm" in suffixes


def rank(t) -> None:
    return None


def validate(t, extra=None) -> None:
    need(t, "w_norm")
    if "b_norm" in t and t["b_norm"].shape != t["w_norm"].shape:
        raise ValueError(f"b_norm {tuple(t['b_norm'].shape)} differs from w_norm {tuple(t['w_norm'].shape)}")


def weight_shape_hint(t) -> tuple:
    return tuple(t["w_norm"].shape)


def delta(t, scale: float, weight_shape=None, base_weight=None) -> torch.Tensor:
    return reshape_to(f32(t["w_norm"]) * scale, weight_shape)


def bias_delta(t) -> torch.Tensor | None:
    return f32(t["b_norm"]) if "b_norm" in t else None


def to_tensors(w_norm, b_norm=None) -> dict[str, torch.Tensor]:
    out = {"w_norm": w_norm}
    if b_norm is not None:
        out["b_norm"] = b_norm
    return out
