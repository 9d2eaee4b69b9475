"""Diag-OFT (docs/adapters.md#diag-oft) and BOFT (docs/adapters.md#boft): orthogonal rotations of W's output rows.

``oft_blocks`` is (n, s, s) for Diag-OFT, (M, n, s, s) for BOFT; ``alpha`` is a norm *constraint*
(‖Q‖ over all blocks is capped at alpha·out), not a scale; ``rescale`` (out, 1, ...) is optional.

    Q = B − Bᵀ;  R = (I + Q)(I − Q)⁻¹;  with multiplier m each block is I + m·(R − I)
    Diag-OFT: row group k of W (s rows each) becomes R_kᵀ · W_k
    BOFT: M butterfly stages; stage i permutes rows in pairs of 2^i·s/2, applies R_i[j] · (block j), undoes it
    W' = rescale ⊙ rotated,  ΔW = W' − W (at m = 1); the bias is left as is (the merged form)
"""

from __future__ import annotations

import torch

from .base import f32, need, reshape_to, scalar

ALGO = "oft"
SUFFIXES = ("oft_blocks", "rescale", "alpha")


def detect(suffixes: set) -> bool:
    return "oft_blocks" in suffixes


def algo_of(t) -> str:
    return "boft" if t["oft_blocks"].dim() == 4 else "oft"


def rank(t) -> None:
    return None


def validate(t, extra=None) -> None:
    need(t, "oft_blocks")
    b = t["oft_blocks"]
    if b.dim() not in (3, 4) or b.shape[-1] != b.shape[-2]:
        raise ValueError(f"oft_blocks must be (n, s, s) or (M, n, s, s), got {tuple(b.shape)}")
    if b.dim() == 4 and b.shape[-1] % 2:
        raise ValueError(f"BOFT block size must be even, got {tuple(b.shape)}")
    if "rescale" in t and t["rescale"].numel() != out_dim(t):
        raise ValueError(f"rescale {tuple(t['rescale'].shape)} does not match {out_dim(t)} output rows")


def out_dim(t) -> int:
    b = t["oft_blocks"]
    return int(b.shape[-3] * b.shape[-1])


def weight_shape_hint(t) -> None:
    return None


def rotations(t, multiplier: float = 1.0) -> torch.Tensor:
    """The Cayley rotations (…, s, s), constraint applied, each moved toward I by the multiplier."""
    b = f32(t["oft_blocks"])
    q = b - b.transpose(-1, -2)
    c = (scalar(t.get("alpha")) or 0.0) * out_dim(t)
    if c > 0:
        qn = q.norm() + 1e-8
        if qn > c:
            q = q * (c / qn)
    eye = torch.eye(b.shape[-1], dtype=torch.float32)
    r = (eye + q) @ torch.linalg.inv(eye - q)
    if multiplier != 1:
        r = eye + multiplier * (r - eye)
    return r


def _rotate(t, w: torch.Tensor, multiplier: float) -> torch.Tensor:
    r = rotations(t, multiplier)
    out, rest = w.shape[0], w.shape[1:]
    if out != out_dim(t):
        raise ValueError(f"OFT blocks cover {out_dim(t)} output rows, the weight has {out}")
    s = r.shape[-1]
    if r.dim() == 3:  # diag-OFT: W_k ← R_kᵀ W_k
        wb = w.reshape(r.shape[0], s, -1)
        return torch.einsum("kji,kjx->kix", r, wb).reshape(w.shape)
    x = w.reshape(out, -1)
    for i in range(r.shape[0]):
        half = (2 ** i) * (s // 2)
        # butterfly permutation: rows viewed as (groups, 2, half) -> (groups, half, 2)
        x = x.reshape(-1, 2, half, x.shape[-1]).transpose(1, 2).reshape(-1, s, x.shape[-1])
        x = torch.einsum("kij,kjx->kix", r[i], x)
        x = x.reshape(-1, half, 2, x.shape[-1]).transpose(1, 2).reshape(out, -1)
    return x.reshape(out, *rest)


def merged(t, weight: torch.Tensor, multiplier: float = 1.0) -> torch.Tensor:
    w = f32(weight)
    rot = _rotate(t, w, multiplier)
    if "rescale" in t:
        rot = rot * f32(t["rescale"]).reshape(w.shape[0], *([1] * (w.dim() - 1)))
    return rot


def delta(t, scale: float, weight_shape=None, base_weight=None) -> torch.Tensor:
    if base_weight is None:
        raise ValueError("OFT: the delta depends on the base weight; pass base_weight")
    w = f32(base_weight)
    if weight_shape is not None:
        w = w.reshape(weight_shape)
    return reshape_to(merged(t, w) - w, weight_shape)


def apply(t, scale: float, weight, multiplier: float = 1.0, bias=None):
    return merged(t, weight, multiplier), bias


def to_tensors(oft_blocks, constraint: float = 0.0, rescale=None) -> dict[str, torch.Tensor]:
    out = {"oft_blocks": oft_blocks}
    if rescale is not None:
        out["rescale"] = rescale
    out["alpha"] = torch.tensor(float(constraint), dtype=torch.float32)
    return out
