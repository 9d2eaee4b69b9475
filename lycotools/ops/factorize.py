"""Turn one layer's ΔW into adapter factors: LoRA/LoCon (flattened or Tucker), LoHa, LoKr.

Pure tensor math shared by extract, convert (algorithm changes) and rank-prune. Each function
returns the canonical tensor dict (``lycotools.adapters.<algo>.to_tensors``) with alpha = rank, so
the scale is 1 and every consumer agrees on what the file means, plus the relative error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..adapters import full, lokr, loha, lora
from ..linalg import SVD, exact_svd, relative_error, truncated_svd, truncation_error


@dataclass
class Factored:
    tensors: dict[str, torch.Tensor]
    rank: int | None
    error: float  # ‖ΔW − ΔŴ‖_F / ‖ΔW‖_F
    params: int
    note: str = ""


def _params(t: dict) -> int:
    return sum(int(v.numel()) for k, v in t.items() if k != "alpha")


def lora_from_svd(delta: torch.Tensor, svd: SVD, r: int) -> Factored:
    """Rank-r LoRA (LyCORIS/kohya layout: S on the up side) of a Linear or conv ΔW."""
    shape = tuple(delta.shape)
    out = shape[0]
    up = svd.U[:, :r] * svd.S[:r]
    down = svd.Vh[:r]
    err = truncation_error(svd, r)
    if err is None:  # near-exact: measure it rather than trust cancellation
        err = relative_error(delta.reshape(out, -1), up @ down)
    if len(shape) > 2:
        up = up.reshape(out, r, *([1] * (len(shape) - 2)))
        down = down.reshape(r, *shape[1:])
    t = lora.to_tensors(up.contiguous(), down.contiguous(), alpha=r)
    return Factored(t, r, err, _params(t))


def lora_tucker(delta: torch.Tensor, r: int) -> Factored:
    """Tucker LoCon for a k×k conv: ΔW ≈ up ×₀ (mid) ×₁ down, by truncated HOSVD on the out and in modes.

    ``lora_up (out,r,1,1)``, ``lora_mid (r,r,kh,kw)``, ``lora_down (r,in,1,1)``. Unlike LyCORIS's
    extractor (which truncates an already-truncated down factor, docs/adapters.md#lycoris-extractor-tucker-split) the core
    is the projection of ΔW itself, so the error is the HOSVD error and is reported.
    """
    out, cin, kh, kw = delta.shape
    r_out, r_in = min(r, out), min(r, cin)
    r = min(r_out, r_in)
    D = delta.float()
    Uo = exact_svd(D.reshape(out, -1)).U[:, :r]  # (out, r)
    Ui = exact_svd(D.transpose(0, 1).reshape(cin, -1)).U[:, :r]  # (in, r)
    core = torch.einsum("oihw,or,is->rshw", D, Uo, Ui)  # (r, r, kh, kw)
    approx = torch.einsum("rshw,or,is->oihw", core, Uo, Ui)
    err = relative_error(D, approx)
    t = lora.to_tensors(Uo.reshape(out, r, 1, 1).contiguous(), Ui.T.reshape(r, cin, 1, 1).contiguous(), alpha=r,
                        mid=core.contiguous())
    return Factored(t, r, err, _params(t))


def loha_refine(delta: torch.Tensor, svd: SVD, r: int, *, steps: int = 200, seed: int = 0, lr: float = 1e-2) -> Factored:
    """LoHa of rank r: start from the rank-r SVD (w1 = U_r S_r V_r, w2 = all-ones, exactly the rank-r
    LoRA) and refine both Hadamard factors by Adam on ‖ΔW − (w1a w1b) ⊙ (w2a w2b)‖²; keep the best
    iterate, so the result is never worse than the LoRA it started from."""
    shape = tuple(delta.shape)
    out = shape[0]
    M = delta.reshape(out, -1).float()
    K = M.shape[1]
    s = svd.S[:r].clamp_min(0)
    rs = s.sqrt()
    w1a = (svd.U[:, :r] * rs).clone()
    w1b = (rs[:, None] * svd.Vh[:r]).clone()
    g = torch.Generator().manual_seed(seed)
    inv = 1.0 / math.sqrt(r)
    # all-ones w2 plus a tiny seeded perturbation so the two factors can move apart
    w2a = (torch.full((out, r), inv) + 1e-3 * inv * torch.randn(out, r, generator=g)).to(M.device)
    w2b = (torch.full((r, K), inv) + 1e-3 * inv * torch.randn(r, K, generator=g)).to(M.device)
    start = relative_error(M, (w1a @ w1b) * (w2a @ w2b))
    best = (start, [w1a.clone(), w1b.clone(), w2a.clone(), w2b.clone()])
    norm = float(M.norm()) or 1.0
    params = [p.requires_grad_() for p in (w1a, w1b, w2a, w2b)]
    opt = torch.optim.Adam(params, lr=lr * math.sqrt(norm / max(1, M.numel()) * max(out, K)))
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            resid = M - (params[0] @ params[1]) * (params[2] @ params[3])
            loss = resid.square().sum() / (norm * norm)
            e = math.sqrt(max(float(loss.detach()), 0.0))
            if e < best[0]:  # the error of the current iterate, before this step moves it
                best = (e, [p.detach().clone() for p in params])
            loss.backward()
            opt.step()
    a1, b1, a2, b2 = best[1]
    err = relative_error(M, (a1 @ b1) * (a2 @ b2))
    t = loha.to_tensors(a1.contiguous(), b1.contiguous(), a2.contiguous(), b2.contiguous(), alpha=r)
    lora_err = relative_error(M, (svd.U[:, :r] * s) @ svd.Vh[:r])
    note = f"LoHa refinement: error {lora_err:.4g} (rank-{r} LoRA start) -> {err:.4g}"
    return Factored(t, r, err, _params(t), note)


def lokr_nearest(delta: torch.Tensor, r: int, *, factor: int = -1) -> Factored:
    """LoKr: nearest Kronecker product (Van Loan–Pitsianis), then the large block factored to rank r.

    Block shapes follow LyCORIS's factorization rule, so loaders rebuild the same layout:
    ``w1 (a, c)`` and ``w2 (b, d[, kh, kw])`` with out = a·b, in = c·d. ``kron(W1, W2)`` rearranged to
    ``(a·c) × (b·d·k)`` is the rank-1 matrix vec(W1) vec(W2)ᵀ, so its top singular pair is the best fit.
    """
    shape = tuple(delta.shape)
    out, cin = shape[0], shape[1]
    ksz = shape[2:]
    a, b = lokr.factorization(out, factor)
    c, d = lokr.factorization(cin, factor)
    D = delta.float().reshape(a, b, c, d, *ksz)
    perm = (0, 2, 1, 3) + tuple(range(4, 4 + len(ksz)))
    R = D.permute(*perm).reshape(a * c, -1)  # rows (i, j), cols (k, l, h, w)
    s = exact_svd(R) if min(R.shape) <= 512 else truncated_svd(R, 1)
    sig = float(s.S[0])
    W1 = (s.U[:, 0] * math.sqrt(sig)).reshape(a, c)
    W2 = (s.Vh[0] * math.sqrt(sig)).reshape(b, d, *ksz)
    W2m = W2.reshape(b, -1)
    if r >= max(b, d) / 2:  # LyCORIS keeps w2 whole at this rank; so do we (scale is then 1)
        t = lokr.to_tensors(W1.contiguous(), W2.contiguous(), alpha=r)
        rank = None
    else:
        s2 = exact_svd(W2m) if min(W2m.shape) <= 512 else truncated_svd(W2m, r)
        w2a = (s2.U[:, :r] * s2.S[:r]).contiguous()
        w2b = s2.Vh[:r].reshape(r, d * (math.prod(ksz) if ksz else 1)).contiguous()
        t = lokr.to_tensors(W1.contiguous(), (w2a, w2b), alpha=r)
        rank = r
    approx = lokr.delta(t, 1.0 if rank is None else t["alpha"].item() / rank, weight_shape=shape)
    err = relative_error(delta, approx)
    return Factored(t, rank, err, _params(t))


def full_diff(delta: torch.Tensor, diff_b: torch.Tensor | None = None) -> Factored:
    t = full.to_tensors(delta.contiguous(), diff_b)
    return Factored(t, None, 0.0, _params(t))
