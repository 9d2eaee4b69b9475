"""Linear algebra every command shares: truncated and randomized SVD, SVD of factored products,
rank rules and the global budget allocator.

All math is float32 on the given device. Randomness is seeded per layer (``layer_seed``), so
results do not depend on the order layers are processed in, and the same seed gives the same bits.
"""

from __future__ import annotations

import hashlib
import heapq
import math
from dataclasses import dataclass

import torch

MODES = ("fixed", "threshold", "ratio", "quantile", "energy")


def layer_seed(seed: int, name: str) -> int:
    """A per-layer seed from the global one and the layer name (stable across runs and orders)."""
    h = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


@dataclass
class SVD:
    U: torch.Tensor  # (m, k)
    S: torch.Tensor  # (k,)
    Vh: torch.Tensor  # (k, n)
    total_energy: float  # ||M||_F^2 of the whole matrix (so kept energy can be told from a partial spectrum)
    exact: bool  # whether S is the whole spectrum


SUM_CHUNK = 1 << 20  # elements per float64 partial sum: 8 MB of float64 at a time, whatever the layer size


def _chunks(t: torch.Tensor):
    flat = t.reshape(-1)
    for i in range(0, flat.numel(), SUM_CHUNK):
        c = flat[i:i + SUM_CHUNK]
        yield c.cpu() if c.device.type == "mps" else c  # MPS has no float64


def sum_squares(t: torch.Tensor) -> float:
    """Σ t², accumulated in float64 chunk by chunk (never a float64 copy of the whole tensor).

    float32 reductions lose 0.2–0.5 % on layers of ~30M elements; every reported error and energy
    goes through here."""
    return sum(float(torch.linalg.vector_norm(c, dtype=torch.float64)) ** 2 for c in _chunks(t))


def frobenius2(M: torch.Tensor) -> float:
    """‖M‖_F², accumulated in float64 without a float64 copy of M."""
    return sum_squares(M)


def truncation_error(svd: SVD, r: int) -> float | None:
    """Relative Frobenius error of the rank-r truncation, from the spectrum alone.

    Exact for the randomized SVD too: with orthonormal Q, A − Q·B_r splits into the orthogonal parts
    (A − QQᵀA) and Q(B − B_r), so ‖A − Q·B_r‖² = ‖A‖² − Σ_{i<r} S_i². Returns None when the error is
    so small that float cancellation would make this inaccurate (then compute it directly).
    """
    if svd.total_energy <= 0:
        return 0.0
    kept = float(svd.S[:r].double().square().sum()) / svd.total_energy
    lost = 1.0 - kept
    if lost < 1e-5:
        return None
    return math.sqrt(lost)


def exact_svd(M: torch.Tensor) -> SVD:
    M = M.float()
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return SVD(U, S, Vh, frobenius2(M), True)


def randomized_svd(M: torch.Tensor, k: int, *, oversample: int = 16, n_iter: int = 2, seed: int = 0) -> SVD:
    """Top-k SVD by a randomized range finder with power iterations (Halko, Martinsson & Tropp 2011).

    QR re-orthonormalisation between power steps keeps small singular values accurate; with
    n_iter=2 and 16 extra columns the error at rank k was within 0.25% of the exact truncated SVD's
    on power-law spectra (exponents 0.5-1) of the SD1.5 layer shapes (bench/extract.py).
    """
    M = M.float()
    m, n = M.shape
    ell = min(k + oversample, m, n)
    g = torch.Generator(device="cpu").manual_seed(seed)
    transpose = m < n  # work on the tall orientation: fewer flops in the QRs
    A = M.T if transpose else M
    omega = torch.randn(A.shape[1], ell, generator=g).to(A.device)
    Q, _ = torch.linalg.qr(A @ omega)
    for _ in range(n_iter):
        Z, _ = torch.linalg.qr(A.T @ Q)
        Q, _ = torch.linalg.qr(A @ Z)
    B = Q.T @ A  # (ell, n_small)
    Ub, S, Vh = torch.linalg.svd(B, full_matrices=False)
    U = Q @ Ub
    U, S, Vh = U[:, :k], S[:k], Vh[:k]
    if transpose:
        U, Vh = Vh.T, U.T
    return SVD(U.contiguous(), S.contiguous(), Vh.contiguous(), frobenius2(M), False)


def truncated_svd(M: torch.Tensor, k: int, *, seed: int = 0, exact: bool | None = None) -> SVD:
    """Top-k SVD: exact for small matrices (or when asked), randomized otherwise."""
    m, n = M.shape
    k = max(1, min(k, m, n))
    if exact is None:
        exact = min(m, n) <= 2 * (k + 16) or min(m, n) <= 128
    if exact:
        s = exact_svd(M)
        return SVD(s.U[:, :k], s.S[:k], s.Vh[:k], s.total_energy, k == min(m, n))
    return randomized_svd(M, k, seed=seed)


def rank_from_spectrum(S: torch.Tensor, mode: str, param: float, total_energy: float | None = None) -> int:
    """Rank chosen by a rule on the singular values (LyCORIS's definitions for the first four).

    fixed: param; threshold: #{S > param}; ratio: #{S > param·max S}; quantile: #{cumsum S < param·ΣS};
    energy: the smallest r whose Σ_{i<r} S_i² ≥ param·‖M‖_F². Not clamped here.
    """
    S = S.float()
    if mode == "fixed":
        return int(param)
    if mode == "threshold":
        return int((S > param).sum())
    if mode == "ratio":
        return int((S > param * S.max()).sum()) if S.numel() else 0
    if mode == "quantile":
        c = torch.cumsum(S, 0)
        return int((c < param * S.sum()).sum())
    if mode == "energy":
        total = total_energy if total_energy is not None else float(S.double().square().sum())
        if total <= 0:
            return 0
        c = torch.cumsum(S.double().square(), 0)
        hit = (c >= param * total - 1e-12 * total).nonzero()
        return int(hit[0]) + 1 if hit.numel() else S.numel() + 1  # +1: more than we have
    raise ValueError(f"unknown rank mode {mode!r}; expected one of {', '.join(MODES)}")


def spectrum_for_mode(M: torch.Tensor, mode: str, param: float, max_rank: int | None, *, seed: int = 0) -> tuple[SVD, int]:
    """SVD with enough singular triplets to apply ``mode``, and the chosen rank (clamped to [1, min dim]).

    Modes that look at the top of the spectrum (fixed, threshold, ratio, energy) grow a randomized
    SVD until the rule is decided; quantile needs the whole spectrum and uses the exact SVD.
    """
    m, n = M.shape
    full = min(m, n)
    cap = min(full, max_rank) if max_rank else full
    if mode == "quantile":
        s = exact_svd(M)
        r = rank_from_spectrum(s.S, mode, param)
        return s, max(1, min(r, cap))
    k = cap if mode != "fixed" else max(1, min(int(param), cap))
    if mode != "fixed":
        k = min(cap, 64)
    while True:
        s = truncated_svd(M, k, seed=seed)
        r = rank_from_spectrum(s.S, mode, param, s.total_energy)
        decided = s.exact or r < k or k >= cap
        if mode == "fixed" or decided:
            return s, max(1, min(r, cap, s.S.numel()))
        k = min(cap, 2 * k)


def relative_error(M: torch.Tensor, approx: torch.Tensor) -> float:
    """‖M − approx‖_F / ‖M‖_F, both sums of squares accumulated in float64 (see ``sum_squares``);
    the difference is formed a chunk at a time."""
    den = sum_squares(M)
    if den <= 0:
        return 0.0
    a = approx.reshape(-1)
    num = 0.0
    for i, c in enumerate(_chunks(M)):
        d = c.float() - a[i * SUM_CHUNK:i * SUM_CHUNK + c.numel()].to(c.device).float()
        num += float(torch.linalg.vector_norm(d, dtype=torch.float64)) ** 2
    return math.sqrt(num / den)


def kept_energy(s: SVD, r: int) -> float:
    """Fraction of ‖M‖_F² kept by the rank-r truncation."""
    if s.total_energy <= 0:
        return 1.0
    return min(1.0, float(s.S[:r].double().square().sum()) / s.total_energy)


def svd_of_product(up: torch.Tensor, down: torch.Tensor) -> SVD:
    """Exact SVD of up @ down (m×r times r×n) without forming it: QR both factors, SVD the r×r core.

    Cost grows with the rank, not the layer size. Works for any r (e.g. stacked factors of several
    adapters).
    """
    # float64 throughout: the QRs cost O((m+n)·r²), and the small singular values of a sum of
    # adapters lose ~1e-4 relative accuracy in float32
    wide = torch.float32 if up.device.type == "mps" else torch.float64  # MPS has no float64
    up, down = up.to(wide), down.to(wide)
    Qu, Ru = torch.linalg.qr(up)  # (m, r), (r, r)
    Qd, Rd = torch.linalg.qr(down.T)  # (n, r), (r, r)
    core = Ru @ Rd.T
    Uc, S, Vhc = torch.linalg.svd(core, full_matrices=False)
    # LAPACK's Q factors are column-major: multiplying them from the left (Qd @ Vhc.T) took 21 ms for a
    # (23040, 32) Qd against 1.7 ms for the same products with the row-major Qᵀ on the right. The float64
    # sums may round differently (≤ 5e-16 relative); after the float32 cast no element differed (48M
    # elements of ranks 1-200 tried; the bench LoCon and every fixture give the same output bytes)
    U = (Uc.T @ Qu.T).T.float().contiguous()
    Vh = (Vhc @ Qd.T).float()
    return SVD(U, S.float(), Vh, float(S.square().sum()), True)


# ------------------------------------------------------------------------------------------------
# global budget allocation (shared by extract --budget and rank-prune)
# ------------------------------------------------------------------------------------------------


@dataclass
class LayerSpectrum:
    name: str
    scores: list[float]  # per-triplet importance, non-increasing (e.g. S_i² for the spectral score)
    cost_per_rank: int  # parameters one more rank costs (out + in for LoRA)
    full_cost: int | None = None  # cost of storing the layer whole (then rank beyond this is pointless)
    min_rank: int = 0
    max_rank: int | None = None


def allocate_budget(layers: list[LayerSpectrum], budget: int) -> dict[str, int]:
    """Ranks maximising the total score within ``budget`` parameters.

    Greedy on score per parameter over every layer's next triplet, with one global order: since each
    layer's scores do not increase, this is the optimal allocation of the relaxed problem and never
    exceeds the budget. Minimum ranks are paid first (an error if they alone exceed the budget).
    """
    ranks = {l.name: l.min_rank for l in layers}
    spent = sum(l.min_rank * l.cost_per_rank for l in layers)
    if spent > budget:
        raise ValueError(f"the minimum ranks alone need {spent} parameters, over the budget of {budget}")
    heap = []
    by_name = {l.name: l for l in layers}
    for l in layers:
        if l.min_rank < len(l.scores) and (l.max_rank is None or l.min_rank < l.max_rank):
            heap.append((-l.scores[l.min_rank] / l.cost_per_rank, l.name))
    heapq.heapify(heap)
    while heap:
        neg, name = heapq.heappop(heap)
        l = by_name[name]
        if spent + l.cost_per_rank > budget:
            continue  # this layer's next rank does not fit; cheaper ones may still
        r = ranks[name] + 1
        ranks[name] = r
        spent += l.cost_per_rank
        if r < len(l.scores) and (l.max_rank is None or r < l.max_rank):
            heapq.heappush(heap, (-l.scores[r] / l.cost_per_rank, name))
    return ranks


def parse_budget(text: str, total_params: int | None = None, bytes_per_param: int = 2) -> int:
    """``--budget``: a parameter count (``2.5M``, ``300k``, ``1200000``), a size (``20MB``, ``1.5GB``,
    at ``bytes_per_param``), or a ratio of ``total_params`` (``0.25``)."""
    t = str(text).strip().lower().replace("_", "")
    units = {"k": 1e3, "m": 1e6, "g": 1e9}
    sizes = {"kb": 1024, "mb": 1024 ** 2, "gb": 1024 ** 3, "kib": 1024, "mib": 1024 ** 2, "gib": 1024 ** 3}
    for suf, mult in sorted(sizes.items(), key=lambda kv: -len(kv[0])):
        if t.endswith(suf):
            return int(float(t[: -len(suf)]) * mult / bytes_per_param)
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    v = float(t)
    if 0 < v <= 1 and "." in t:
        if total_params is None:
            raise ValueError("a ratio budget needs the input's size")
        return int(v * total_params)
    if v != int(v) or v < 1:
        raise ValueError(f"budget {text!r} is not a parameter count, size or ratio")
    return int(v)


def lora_cost(shape: tuple, rank: int = 1) -> int:
    """Parameters of a rank-``rank`` LoRA for a weight of ``shape`` (conv: in·k·k on the down side)."""
    out = shape[0]
    k_in = math.prod(shape[1:])
    return rank * (out + k_in)
