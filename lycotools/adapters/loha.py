"""LoHa (docs/adapters.md#loha): Hadamard product of two low-rank products, optional Tucker cores.

    ΔW = scale · (w1_a @ w1_b) ⊙ (w2_a @ w2_b)                      plain, w?_b flattened (r, K)
    Wi[o,c,k] = Σ_ab t_i[a,b,k] · wi_a[a,o] · wi_b[b,c]; ΔW = scale · W1 ⊙ W2   Tucker: w?_a is (r, out)
"""

from __future__ import annotations

import torch

from .base import alpha_tensor, f32, flat, need, reshape_to

ALGO = "loha"
SUFFIXES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha", "dora_scale")
FACTORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


def detect(suffixes: set) -> bool:
    return "hada_w1_a" in suffixes


def is_tucker(t) -> bool:
    return "hada_t1" in t


def rank(t) -> int:
    return int(t["hada_w1_b"].shape[0])


def validate(t, extra=None) -> None:
    need(t, *FACTORS)
    if is_tucker(t):
        need(t, "hada_t1", "hada_t2")
        for i in ("1", "2"):
            a, b, c = t[f"hada_w{i}_a"], t[f"hada_w{i}_b"], t[f"hada_t{i}"]
            if a.dim() != 2 or b.dim() != 2 or c.dim() < 3 or c.shape[0] != a.shape[0] or c.shape[1] != b.shape[0]:
                raise ValueError(f"Tucker w{i}_a {tuple(a.shape)}, w{i}_b {tuple(b.shape)}, t{i} {tuple(c.shape)} disagree")
        if t["hada_w1_a"].shape[1] != t["hada_w2_a"].shape[1] or t["hada_w1_b"].shape[1] != t["hada_w2_b"].shape[1]:
            raise ValueError("the two Tucker halves build different shapes")
        return
    if "hada_t2" in t:
        raise ValueError("hada_t2 without hada_t1")
    for i in ("1", "2"):
        a, b = t[f"hada_w{i}_a"], t[f"hada_w{i}_b"]
        if a.dim() != 2 or a.shape[1] != b.shape[0]:
            raise ValueError(f"w{i}_a {tuple(a.shape)} does not match w{i}_b {tuple(b.shape)}")
    w1 = (t["hada_w1_a"].shape[0], t["hada_w1_b"][0].numel())
    w2 = (t["hada_w2_a"].shape[0], t["hada_w2_b"][0].numel())
    if w1 != w2:
        raise ValueError(f"the two halves build different shapes {w1} and {w2}")


def weight_shape_hint(t) -> tuple:
    if is_tucker(t):
        return (t["hada_w1_a"].shape[1], t["hada_w1_b"].shape[1], *t["hada_t1"].shape[2:])
    return (t["hada_w1_a"].shape[0], *t["hada_w1_b"].shape[1:])


def tucker(core: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """W[o,c,k...] = Σ_ab core[a,b,k...] · wa[a,o] · wb[b,c]  (wa is (r, out), wb is (r, in))."""
    core = f32(core)
    k = core.shape[2:]
    w = torch.einsum("abk,ao,bc->ock", core.reshape(core.shape[0], core.shape[1], -1), f32(wa), f32(wb))
    return w.reshape(wa.shape[1], wb.shape[1], *k)


def delta(t, scale: float, weight_shape=None, base_weight=None) -> torch.Tensor:
    if is_tucker(t):
        w1 = tucker(t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"])
        w2 = tucker(t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"])
        d = w1 * w2
    else:
        b = t["hada_w1_b"]
        d = (f32(t["hada_w1_a"]) @ flat(b)) * (f32(t["hada_w2_a"]) @ flat(t["hada_w2_b"]))
        d = d.reshape(d.shape[0], *b.shape[1:])
    return reshape_to(d * scale, weight_shape)


def to_tensors(w1a, w1b, w2a, w2b, alpha, t1=None, t2=None) -> dict[str, torch.Tensor]:
    out = {"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b}
    if (t1 is None) != (t2 is None):
        raise ValueError("Tucker LoHa needs both t1 and t2")
    if t1 is not None:
        out["hada_t1"], out["hada_t2"] = t1, t2
    out["alpha"] = alpha_tensor(alpha)
    return out
