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
from ..linalg import SVD, exact_svd, relative_error, sum_squares, truncated_svd, truncation_error


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


LOHA_TOL = 1e-3  # stop refining once a sweep lowers the error by less than this fraction of it
LOHA_RIDGE = 1e-6  # Tikhonov term of each small solve, relative to its Gram matrix's mean diagonal
LOHA_LOWRANK_MAX_R = 16  # up to this rank the Gram matrices come from the factors, never forming W²


def _loha_solve(Gf: torch.Tensor, rhs: torch.Tensor, full_idx: torch.Tensor, r: int) -> torch.Tensor:
    """Solve the batch of small SPD systems G_i x_i = rhs_i, G_i given by its upper triangle ``Gf[i]``."""
    G = Gf[:, full_idx].reshape(-1, r, r)
    d = G.diagonal(dim1=1, dim2=2)
    d += d.mean(1, keepdim=True) * LOHA_RIDGE + torch.finfo(G.dtype).tiny
    L, info = torch.linalg.cholesky_ex(G)
    if bool((info != 0).any()):  # not positive definite in float32: pivoted LU instead
        return torch.linalg.solve(G, rhs.unsqueeze(-1)).squeeze(-1)
    return torch.cholesky_solve(rhs.unsqueeze(-1), L).squeeze(-1)


def _loha_pair_update(M, Ao, Bo, B, idx):
    """One alternating-least-squares step for one Hadamard half (A B), the other half W = Ao Bo fixed.

    ‖M − (A B) ⊙ W‖² is linear in each row of A (given B) and each column of B (given A): row i of A
    solves G_i a_i = Σ_j W_ij M_ij b_j with G_i = Σ_j W_ij² b_j b_jᵀ, an r×r system, and likewise
    column j of B. For small r neither W nor W² is formed: W² = (Ao ⊙ Ao)(Bo ⊙ Bo) has rank
    r(r+1)/2, so every G_i comes from two (r(r+1)/2)² products, and the right-hand sides from one
    product of M with an (n, r²) matrix. Returns the new A, B and ⟨M, ΔŴ⟩, ‖ΔŴ‖² (the error
    without forming ΔŴ).
    """
    m, n = M.shape
    r = B.shape[0]
    iu, ju, full_idx = idx
    PB = B[iu] * B[ju]  # (T, n): upper triangles of b_j b_jᵀ, T = r(r+1)/2
    if r <= LOHA_LOWRANK_MAX_R:
        w = torch.where(iu == ju, 1.0, 2.0).to(M)
        PaS = Ao[:, iu] * Ao[:, ju] * w  # W² = PaS @ PbS
        PbS = Bo[iu] * Bo[ju]
        GfA = PaS @ (PbS @ PB.T)
        T = (M @ (Bo[:, None, :] * B[None, :, :]).reshape(r * r, n).T).reshape(m, r, r)
        A = _loha_solve(GfA, torch.einsum("il,ilp->ip", Ao, T), full_idx, r)
        GfB = PbS.T @ (PaS.T @ (A[:, iu] * A[:, ju]))
        U = (M.T @ (Ao[:, :, None] * A[:, None, :]).reshape(m, r * r)).reshape(n, r, r)
        rhsB = torch.einsum("lj,jlp->jp", Bo, U)
    else:  # r² columns would cost more than forming W once
        W = Ao @ Bo
        MW = M * W
        W.square_()
        A = _loha_solve(W @ PB.T, MW @ B.T, full_idx, r)
        GfB = W.T @ (A[:, iu] * A[:, ju])
        rhsB = MW.T @ A
        del W, MW
    Bt = _loha_solve(GfB.clone(), rhsB, full_idx, r)  # (n, r)
    GB = GfB[:, full_idx].reshape(n, r, r).double()
    Btd = Bt.double()
    quad = float(torch.einsum("nk,nkl,nl->", Btd, GB, Btd))
    cross = float((Btd * rhsB.double()).sum())
    return A, Bt.T.contiguous(), cross, quad


def _loha_balance(a1, b1, a2, b2):
    """Same ΔW, factors of like magnitude (what fp16/bf16 storage wants): each rank-1 term split evenly
    between its a column and b row, and the two Hadamard halves given equal norms."""
    out = []
    for a, b in ((a1, b1), (a2, b2)):
        na, nb = a.norm(dim=0), b.norm(dim=1)
        c = torch.where((na > 0) & (nb > 0), (nb / na.clamp_min(1e-30)).sqrt(), torch.ones_like(na))
        out += [a * c, b / c[:, None]]
    a1, b1, a2, b2 = out
    n1, n2 = float(a1.norm() * b1.norm()), float(a2.norm() * b2.norm())
    if n1 > 0 and n2 > 0:
        t = (n2 / n1) ** 0.25
        a1, b1, a2, b2 = a1 * t, b1 * t, a2 / t, b2 / t
    return a1, b1, a2, b2


def loha_refine(delta: torch.Tensor, svd: SVD, r: int, *, steps: int = 200, seed: int = 0) -> Factored:
    """LoHa of rank r, refined from the rank-r LoRA by alternating least squares; never worse than that LoRA.

    The rank-r LoRA is itself a LoHa (w1 = U_r S_r V_rᵀ, w2 = all-ones). Refinement starts from w1 =
    the SVD and w2 = all-ones plus seeded rank-(r−1) noise, then alternates exact least-squares
    updates of w2_a (row by row), w2_b (column by column), w1_a, w1_b — each a batch of r×r solves —
    for at most ``steps`` sweeps, stopping once a sweep gains under ``LOHA_TOL`` of the error. The
    result is compared (float64 sums) with the LoRA and the better one is kept.
    """
    shape = tuple(delta.shape)
    out = shape[0]
    M = delta.reshape(out, -1).float()
    m, n = M.shape
    s = svd.S[:r].clamp_min(0)
    rs = s.sqrt()
    w1a = svd.U[:, :r] * rs
    w1b = rs[:, None] * svd.Vh[:r]
    inv = 1.0 / math.sqrt(r)
    lora = (w1a, w1b, torch.full((m, r), inv, device=M.device), torch.full((r, n), inv, device=M.device))
    lora_err = relative_error(M, (svd.U[:, :r] * s) @ svd.Vh[:r])
    best, best_err, sweeps = lora, lora_err, 0
    norm2 = sum_squares(M)
    if steps > 0 and lora_err > 1e-6 and norm2 > 0:
        g = torch.Generator().manual_seed(seed)
        a2 = 0.1 * torch.randn(m, r, generator=g)
        b2 = 0.1 * torch.randn(r, n, generator=g)
        a2[:, 0], b2[0] = 1.0, 1.0
        a1, b1, a2, b2 = w1a.clone(), w1b.clone(), a2.to(M.device), b2.to(M.device)
        iu, ju = torch.triu_indices(r, r, device=M.device)
        full_idx = torch.empty(r, r, dtype=torch.long, device=M.device)
        full_idx[iu, ju] = torch.arange(iu.numel(), device=M.device)
        full_idx[ju, iu] = full_idx[iu, ju]
        idx = (iu, ju, full_idx.reshape(-1))
        prev = math.inf
        for sweeps in range(1, steps + 1):
            a2, b2, _, _ = _loha_pair_update(M, a1, b1, b2, idx)
            a1, b1, cross, quad = _loha_pair_update(M, a2, b2, b1, idx)
            e = math.sqrt(max(norm2 - 2 * cross + quad, 0.0) / norm2)
            if not all(bool(torch.isfinite(x).all()) for x in (a1, b1, a2, b2)):
                break
            if e < prev:
                cand = (a1, b1, a2, b2)
            if e > prev * (1 - LOHA_TOL):
                break
            prev = e
        if prev < math.inf:
            err = relative_error(M, (cand[0] @ cand[1]) * (cand[2] @ cand[3]))
            if err < best_err:
                best, best_err = cand, err
    a1, b1, a2, b2 = _loha_balance(*best)
    t = loha.to_tensors(a1.contiguous(), b1.contiguous(), a2.contiguous(), b2.contiguous(), alpha=r)
    how = f"{sweeps} ALS sweeps" if best is not lora else f"kept the LoRA after {sweeps} ALS sweeps"
    note = f"LoHa refinement: error {lora_err:.4g} (rank-{r} LoRA start) -> {best_err:.4g} ({how})"
    return Factored(t, r, best_err, _params(t), note)


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
