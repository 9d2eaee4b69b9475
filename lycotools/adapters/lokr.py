"""LoKr (docs/adapters.md#lokr): Kronecker product of a small block W1 (a, c) and a large block W2 (b, d[, k]).

    W1 = lokr_w1 | lokr_w1_a @ lokr_w1_b
    W2 = lokr_w2 | lokr_w2_a @ lokr_w2_b (flattened (b, d·K) for convs)
       | Tucker: W2[p,q,k] = Σ_ij t2[i,j,k] · w2_a[i,p] · w2_b[j,q]   (w2_a is (r, b) here)
    ΔW = scale · kron(W1, W2)   (W1 unsqueezed to (a, c, 1, 1) when W2 is 4-D)

The rank comes from ``lokr_w1_b``/``lokr_w2_b``; with both blocks full there is none and scale is 1.
"""

from __future__ import annotations

import torch

from .base import alpha_tensor, f32, need, reshape_to
from .loha import tucker

ALGO = "lokr"
SUFFIXES = (
    "lokr_w1", "lokr_w1_a", "lokr_w1_b",
    "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
    "alpha", "dora_scale",
)


def detect(suffixes: set) -> bool:
    return "lokr_w1" in suffixes or "lokr_w1_a" in suffixes


def factorization(n: int, factor: int = -1) -> tuple[int, int]:
    """(p, q) with p <= q and p·q = n, as LyCORIS splits a dimension for LoKr and Diag-OFT.

    A factor that divides n is used as is; otherwise the most balanced divisor pair whose smaller
    member does not exceed ``factor`` (``-1``: no bound) is taken.
    """
    if factor > 0 and n % factor == 0:
        return min(factor, n // factor), max(factor, n // factor)
    best = (1, n)
    p = 1
    while True:
        p += 1
        if p > n:
            break
        if n % p:
            continue
        q = n // p
        if p > q or (factor > 0 and p > factor):
            break
        best = (p, q)
    return best


def rank(t) -> int | None:
    if "lokr_w2_b" in t:
        return int(t["lokr_w2_b"].shape[0])
    if "lokr_w1_b" in t:
        return int(t["lokr_w1_b"].shape[0])
    return None


def validate(t, extra=None) -> None:
    if "lokr_w1" not in t:
        need(t, "lokr_w1_a", "lokr_w1_b")
        a, b = t["lokr_w1_a"], t["lokr_w1_b"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
            raise ValueError(f"lokr_w1_a {tuple(a.shape)} does not match lokr_w1_b {tuple(b.shape)}")
    elif "lokr_w1_a" in t or "lokr_w1_b" in t:
        raise ValueError("both lokr_w1 and its factors lokr_w1_a/lokr_w1_b are present")
    if "lokr_w2" not in t:
        need(t, "lokr_w2_a", "lokr_w2_b")
        a, b = t["lokr_w2_a"], t["lokr_w2_b"]
        if "lokr_t2" in t:
            c = t["lokr_t2"]
            if c.dim() < 3 or c.shape[0] != a.shape[0] or c.shape[1] != b.shape[0] or b.dim() != 2:
                raise ValueError(
                    f"Tucker lokr_t2 {tuple(c.shape)}, lokr_w2_a {tuple(a.shape)}, lokr_w2_b {tuple(b.shape)} disagree"
                )
        elif a.dim() != 2 or a.shape[1] != b.shape[0]:
            raise ValueError(f"lokr_w2_a {tuple(a.shape)} does not match lokr_w2_b {tuple(b.shape)}")
    elif any(k in t for k in ("lokr_w2_a", "lokr_w2_b", "lokr_t2")):
        raise ValueError("both lokr_w2 and its factors are present")
    if "lokr_w1_b" in t and "lokr_w2_b" in t and t["lokr_w1_b"].shape[0] != t["lokr_w2_b"].shape[0]:
        raise ValueError(
            f"w1 rank {t['lokr_w1_b'].shape[0]} differs from w2 rank {t['lokr_w2_b'].shape[0]}"
        )


def _w1_shape(t):
    if "lokr_w1" in t:
        return tuple(t["lokr_w1"].shape)
    return (t["lokr_w1_a"].shape[0], t["lokr_w1_b"].shape[1])


def _w2_shape(t):
    if "lokr_w2" in t:
        return tuple(t["lokr_w2"].shape)
    if "lokr_t2" in t:
        return (t["lokr_w2_a"].shape[1], t["lokr_w2_b"].shape[1], *t["lokr_t2"].shape[2:])
    return (t["lokr_w2_a"].shape[0], *t["lokr_w2_b"].shape[1:])


def weight_shape_hint(t) -> tuple:
    (a, c), w2 = _w1_shape(t), _w2_shape(t)
    return (a * w2[0], c * w2[1], *w2[2:])


def w1(t) -> torch.Tensor:
    if "lokr_w1" in t:
        return f32(t["lokr_w1"])
    return f32(t["lokr_w1_a"]) @ f32(t["lokr_w1_b"])


def w2(t) -> torch.Tensor:
    if "lokr_w2" in t:
        return f32(t["lokr_w2"])
    if "lokr_t2" in t:
        return tucker(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
    b = t["lokr_w2_b"]
    return (f32(t["lokr_w2_a"]) @ f32(b).reshape(b.shape[0], -1)).reshape(t["lokr_w2_a"].shape[0], *b.shape[1:])


def delta(t, scale: float, weight_shape=None, base_weight=None) -> torch.Tensor:
    a, b = w1(t), w2(t)
    if b.dim() > 2:
        a = a.reshape(*a.shape, *([1] * (b.dim() - 2)))
    return reshape_to(torch.kron(a, b.contiguous()) * scale, weight_shape)


def to_tensors(w1, w2, alpha, t2=None) -> dict[str, torch.Tensor]:
    """``w1``/``w2``: a full block tensor or an ``(a, b)`` factor pair; ``t2``: Tucker core for w2."""
    out = {}
    if isinstance(w1, (tuple, list)):
        out["lokr_w1_a"], out["lokr_w1_b"] = w1
    else:
        out["lokr_w1"] = w1
    if isinstance(w2, (tuple, list)):
        out["lokr_w2_a"], out["lokr_w2_b"] = w2
    else:
        if t2 is not None:
            raise ValueError("a Tucker core needs w2 as an (a, b) factor pair")
        out["lokr_w2"] = w2
    if t2 is not None:
        out["lokr_t2"] = t2
    out["alpha"] = alpha_tensor(alpha)
    return out
