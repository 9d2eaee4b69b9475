"""GLoRA (docs/adapters.md#glora): a weight-dependent term plus a low-rank term.

    ΔW = scale · (W @ a1 @ a2 + b1 @ b2),  scale = alpha / a2.shape[0]
    a1 (in, r[,1,1]), a2 (r, in[,1,1]), b1 (out, r[,1,1]), b2 (r, in[,kh,kw]); for convs W·a1·a2
    contracts the input-channel axis at every kernel tap.
"""

from __future__ import annotations

import torch

from .base import alpha_tensor, f32, flat, need, reshape_to

ALGO = "glora"
SUFFIXES = ("a1.weight", "a2.weight", "b1.weight", "b2.weight", "alpha")


def detect(suffixes: set) -> bool:
    return "a1.weight" in suffixes


def rank(t) -> int:
    return int(t["a2.weight"].shape[0])


def validate(t, extra=None) -> None:
    need(t, "a1.weight", "a2.weight", "b1.weight", "b2.weight")
    a1, a2, b1, b2 = (t[k] for k in ("a1.weight", "a2.weight", "b1.weight", "b2.weight"))
    r = a2.shape[0]
    if a1.shape[1] != r or b1.shape[1] != r or b2.shape[0] != r or a1.shape[0] != a2.shape[1]:
        raise ValueError(
            f"a1 {tuple(a1.shape)}, a2 {tuple(a2.shape)}, b1 {tuple(b1.shape)}, b2 {tuple(b2.shape)} disagree"
        )


def weight_shape_hint(t) -> tuple:
    return (t["b1.weight"].shape[0], *t["b2.weight"].shape[1:])


def delta(t, scale: float, weight_shape=None, base_weight=None) -> torch.Tensor:
    if base_weight is None:
        raise ValueError("GLoRA: the delta depends on the base weight; pass base_weight")
    w = f32(base_weight)
    if weight_shape is not None:
        w = w.reshape(weight_shape)
    a = flat(t["a1.weight"]) @ flat(t["a2.weight"])  # (in, in)
    wa = torch.einsum("oc...,cd->od...", w, a)
    b2 = t["b2.weight"]
    bb = (flat(t["b1.weight"]) @ flat(b2)).reshape(w.shape)
    return reshape_to((wa + bb) * scale, weight_shape)


def to_tensors(a1, a2, b1, b2, alpha) -> dict[str, torch.Tensor]:
    return {"a1.weight": a1, "a2.weight": a2, "b1.weight": b1, "b2.weight": b2, "alpha": alpha_tensor(alpha)}
