"""LoRA / LoCon (docs/adapters.md#lora), Tucker ``lora_mid``, DyLoRA's 2-D conv up, and the extractor's
sparse residual (``bias_indices``/``bias_values``/``bias_size``, docs/adapters.md#sparse-residual).

    ΔW = scale · (up @ down + sparse)            plain (factors flattened to matrices)
    ΔW[o,c,h,w] = scale · Σ_ab up[o,a] mid[a,b,h,w] down[b,c]   Tucker
"""

from __future__ import annotations

import torch

from .base import alpha_tensor, f32, flat, need, reshape_to

ALGO = "lora"
SUFFIXES = (
    "lora_up.weight",
    "lora_down.weight",
    "lora_mid.weight",
    "alpha",
    "dora_scale",
    "bias_indices",
    "bias_values",
    "bias_size",
)
SPARSE = ("bias_indices", "bias_values", "bias_size")


def detect(suffixes: set) -> bool:
    return "lora_up.weight" in suffixes


def rank(t) -> int:
    return int(t["lora_down.weight"].shape[0])


def validate(t, extra=None) -> None:
    need(t, "lora_up.weight", "lora_down.weight")
    up, down = t["lora_up.weight"], t["lora_down.weight"]
    r = down.shape[0]
    if up.dim() < 2 or up.shape[1] != r or any(s != 1 for s in up.shape[2:]):
        raise ValueError(f"lora_up {tuple(up.shape)} does not match lora_down rank {r} {tuple(down.shape)}")
    if "lora_mid.weight" in t:
        mid = t["lora_mid.weight"]
        if mid.dim() < 3 or mid.shape[:2] != (r, r) or any(s != 1 for s in down.shape[2:]):
            raise ValueError(
                f"Tucker lora_mid {tuple(mid.shape)} does not fit rank {r} (down {tuple(down.shape)})"
            )
    present = [s for s in SPARSE if s in t]
    if present and len(present) != len(SPARSE):
        raise ValueError(f"sparse residual needs all of {list(SPARSE)}, found {present}")
    if present:
        _validate_sparse(t)


def _validate_sparse(t) -> None:
    """The sparse residual's size must be ΔW's own (out, K) and every index inside it: checked before the
    dense (out, K) matrix is allocated, so a hostile size or index cannot allocate or write out of range."""
    idx, vals, size = t["bias_indices"], t["bias_values"], t["bias_size"]
    if size.numel() != 2:
        raise ValueError(f"bias_size has {size.numel()} values; (out, K) expected")
    rows, cols = (int(v) for v in _unsigned(size).reshape(-1))
    hint = weight_shape_hint(t)
    out, k = int(hint[0]), 1
    for s in hint[1:]:
        k *= int(s)
    if (rows, cols) != (out, k):
        raise ValueError(f"sparse residual of size {[rows, cols]} does not match ΔW ({out}, {k})")
    if idx.dim() != 2 or idx.shape[0] != 2 or vals.numel() != idx.shape[1]:
        raise ValueError(f"bias_indices {list(idx.shape)} and bias_values {list(vals.shape)} disagree "
                         "((2, n) indices for n values expected)")
    if idx.numel():
        u = _unsigned(idx)
        if int(u[0].max()) >= rows or int(u[1].max()) >= cols or int(idx.min()) < -32768:
            raise ValueError(f"sparse residual indices fall outside its ({rows}, {cols}) size")


def weight_shape_hint(t) -> tuple:
    up, down = t["lora_up.weight"], t["lora_down.weight"]
    if "lora_mid.weight" in t:
        return (up.shape[0], down.shape[1], *t["lora_mid.weight"].shape[2:])
    return (up.shape[0], *down.shape[1:])


def _unsigned(idx: torch.Tensor) -> torch.Tensor:
    """int16 indices past 32767 wrap negative on disk: read them as unsigned 16-bit."""
    idx = idx.long()
    return torch.where(idx < 0, idx + 65536, idx)


def sparse_dense(t) -> torch.Tensor | None:
    """The sparse residual as a dense (out, K) float32 matrix (duplicates summed); None if absent."""
    if "bias_values" not in t:
        return None
    _validate_sparse(t)
    idx = _unsigned(t["bias_indices"])
    rows, cols = (int(s) for s in _unsigned(t["bias_size"]).reshape(-1))
    dense = torch.zeros(rows, cols, dtype=torch.float32)
    dense.index_put_((idx[0], idx[1]), f32(t["bias_values"]).reshape(-1), accumulate=True)
    return dense


def delta(t, scale: float, weight_shape=None, base_weight=None) -> torch.Tensor:
    up = flat(t["lora_up.weight"])
    down = t["lora_down.weight"]
    if "lora_mid.weight" in t:
        d = _tucker_nd(up, f32(t["lora_mid.weight"]), flat(down))
    else:
        d = (up @ flat(down)).reshape(up.shape[0], *down.shape[1:])
    sp = sparse_dense(t)
    if sp is not None:
        d = (d.reshape(sp.shape) + sp).reshape(d.shape)
    return reshape_to(d * scale, weight_shape)


def fused_apply(t, scale: float, weight, multiplier: float = 1.0, inplace: bool = False):
    """W + m·scale·(up @ down) in one ``addmm`` (no ΔW temporary) for plain LoRA; None for the
    layouts that need the general path (Tucker, sparse residual, DoRA). With ``inplace`` and a
    contiguous float32 ``weight`` the sum is written into ``weight`` (same values, one buffer less)."""
    if "lora_mid.weight" in t or "bias_values" in t or "dora_scale" in t:
        return None
    w = f32(weight)
    up = flat(t["lora_up.weight"]).to(w.device)
    down = flat(t["lora_down.weight"]).to(w.device)
    w2 = w.reshape(w.shape[0], -1)
    if inplace and w is weight and w.is_contiguous():
        torch.addmm(w2, up, down, alpha=multiplier * scale, out=w2)
        return w
    return torch.addmm(w2, up, down, alpha=multiplier * scale).reshape(w.shape)


def _tucker_nd(up, mid, down):
    """Tucker rebuild for any kernel rank (Conv1d/Conv3d): contract mid's two rank axes."""
    k = mid.shape[2:]
    m = mid.reshape(mid.shape[0], mid.shape[1], -1)  # (a, b, K)
    d = torch.einsum("oa,abk,bc->ock", up, m, down)
    return d.reshape(up.shape[0], down.shape[1], *k)


def to_tensors(up, down, alpha, mid=None) -> dict[str, torch.Tensor]:
    out = {"lora_up.weight": up, "lora_down.weight": down}
    if mid is not None:
        out["lora_mid.weight"] = mid
    out["alpha"] = alpha_tensor(alpha)
    return out
