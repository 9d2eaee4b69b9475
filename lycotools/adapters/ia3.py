"""(IA)^3 (docs/adapters.md#ia3): a learned per-channel gain ``weight`` on the output axis, or on the
input axis when ``on_input`` is 1.

    W' = W ⊙ (1 + m·w),  ΔW = W ⊙ w   (needs the base weight; the bias is left untouched)
"""

from __future__ import annotations

import torch

from .base import f32, need, reshape_to, scalar

ALGO = "ia3"
SUFFIXES = ("weight", "on_input")


def detect(suffixes: set) -> bool:
    return "on_input" in suffixes


def rank(t) -> None:
    return None


def on_input(t) -> bool:
    v = scalar(t.get("on_input"))
    return bool(v) if v is not None else False


def validate(t, extra=None) -> None:
    need(t, "weight")


def weight_shape_hint(t) -> None:
    return None


def delta(t, scale: float, weight_shape=None, base_weight=None) -> torch.Tensor:
    if base_weight is None:
        raise ValueError("IA3: the delta depends on the base weight; pass base_weight")
    w = f32(base_weight)
    if weight_shape is not None:
        w = w.reshape(weight_shape)
    axis = 1 if on_input(t) else 0
    g = f32(t["weight"]).reshape(-1)
    if g.numel() != w.shape[axis]:
        raise ValueError(
            f"IA3 weight has {g.numel()} values, the {'input' if axis else 'output'} axis of "
            f"{tuple(w.shape)} has {w.shape[axis]}"
        )
    shape = [1] * w.dim()
    shape[axis] = -1
    return reshape_to(w * g.reshape(shape) * scale, weight_shape)


def to_tensors(weight, on_input: bool = False) -> dict[str, torch.Tensor]:
    return {"weight": weight, "on_input": torch.tensor(int(bool(on_input)), dtype=torch.int64)}
