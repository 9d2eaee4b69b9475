"""``rank-prune``: shrink an adapter to a rank, a per-layer rule or a global budget.

Every module's ΔW (scale folded in) is put in exact SVD form U·diag(S)·Vh:

* LoRA / LoCon (and PEFT AdaLoRA, whose ``B·diag(E)·A`` is a product too) by ``svd_of_product``:
  QR of both factors and the SVD of the r×r core, so the cost grows with the rank, not with the
  layer size; no out×in matrix is ever formed.
* LoHa (A1·B1)⊙(A2·B2) is the product (A1⊙ᵣA2)·(B1⊙꜀B2) of row-/column-wise Kronecker factors of
  rank r1·r2, so it goes through ``svd_of_product`` too (while r1·r2 is below the layer's width).
* LoKr scale·kron(W1, W2): the SVDs of the two small blocks give the whole SVD (σ_i·σ_j, Kronecker
  products of the vectors), never forming ΔW.
* Tucker LoCon, Tucker LoHa, full diffs and LoRA with a sparse residual: ΔW is materialised in its
  weight shape (flattened conv layouts reshaped by the resolved target) and SVD'd (exact up to a
  1024-wide side, randomized ``truncated_svd`` beyond).

The output is a kohya LoRA/LoCon: ``lora_down = Vh_k``, ``lora_up = U_k·S_k·k/A`` (carrying the old
scale) and one ``alpha = A`` for every layer, A = the largest new rank (so a uniform ``--rank k`` writes
alpha = k, scale 1): every layer's effective scale alpha/k·up·down is kept whatever its new rank. One
alpha for all layers rather than alpha = k per layer works around diffusers 0.42's kohya loader, which
names SD1 attention modules' ``alpha_pattern`` entries in the old attn-procs form
(``…attn1.processor.to_k_lora.down.weight``), so they match nothing and every attention layer gets the
file's most common alpha; with per-layer alphas = ranks that fused ΔW off by alpha/alpha_default
(measured 2× and 0.67×). Conv layers are 4-D
(``up (out, k, 1, 1)``, ``down (k, in, kh, kw)``). Kohya names are kept when the input is kohya /
LyCORIS-named, otherwise ``kohya_module_name`` of the resolved target is used. Pruning to a rank ≥
the input's rank reproduces ΔW to fp32 rounding; a lower rank k gives the best rank-k approximation
(Eckart–Young) of the input's ΔW.

Rank rules (``--mode``), with S sorted descending and ``n = len(S)``:

* ``ratio t``: keep every S_i > S_0 / t (the largest kept value is at most t times the smallest).
* ``cumulative t``: the smallest k with Σ_{i<k} S_i ≥ t·Σ S (fraction of the nuclear norm).
* ``fro t``: the smallest k with sqrt(Σ_{i<k} S_i² / Σ S²) ≥ t (fraction of the Frobenius norm).
* ``energy t``: the smallest k with Σ_{i<k} S_i² ≥ t·‖ΔW‖_F² (fraction of the energy, = fro √t).

kohya's ``resize_lora`` (sv_ratio / sv_cumulative / sv_fro) uses the same quantities but returns one
rank more than the smallest count that meets the criterion, and never fewer than 2; lycotools
returns the smallest count itself (clamped to ``--min-rank``/``--max-rank``). So at equal parameter
kohya keeps one more rank per layer than it needs.

Global budget (``--budget``) with ``--score spectral`` (default): every singular triplet i of every
layer gets the score σ_i² (its Frobenius energy, in the layer's own effective scale), and
``allocate_budget`` takes triplets in order of score per parameter (σ_i² / (out + in·kh·kw)) until the
budget is spent. This is the normalisation that keeps the most Frobenius energy of the whole model
per parameter: the energy lost by dropping a triplet is exactly σ_i² and its price is its parameter
count, so greedy by σ²/cost solves the relaxed knapsack. Measured against the alternatives on the
fixtures' known deltas (``measure_normalisations``; numbers in the project report): σ²/‖ΔW_layer‖²
per parameter (each layer's *relative* energy), σ² without the cost division, and σ/ΣS per parameter
(nuclear, cumulative-style) all lose more energy at every budget tried (10–70 % of the parameters); e.g.
the SD1 fixture's known deltas at 30 %: energy lost 0.417 (σ²/param) vs 0.456 (relative), 0.474
(unpriced), 0.489 (nuclear); the SDXL ones: 0.417 vs 0.685, 0.466, 0.711. Relative scores starve
large-norm layers; unpriced scores overpay for wide layers.

``--score sensitivity`` is AdaLoRA's (Zhang et al. 2023): see ``sensitivity_scores`` below.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..adapter_file import AdapterFile
from ..alloc import streaming_threads
from ..adapters.base import f32, flat
from ..devices import ADAPTER_DTYPES as DTYPES, device_of
from .. import validate
from ..errors import BadInput
from ..finite import NonFinite
from ..io.metadata import lycotools_record, modelspec, network_metadata
from ..io.readers import open_source
from ..io.writer import SafetensorsWriter, atomic_file, check_output, write_text_atomic
from ..layouts.adapter_keys import kohya_module_name
from ..layouts.model_index import ModelIndex, unflatten_conv_shape
from ..linalg import SVD, LayerSpectrum, allocate_budget, exact_svd, layer_seed, lora_cost, parse_budget, \
    svd_of_product, truncated_svd

MODES = ("ratio", "cumulative", "fro", "energy")
SCORES = ("spectral", "sensitivity")
NORMALISATIONS = ("energy", "relative", "unpriced", "nuclear")
PRUNABLE = ("lora", "adalora", "loha", "lokr", "full")
EXACT_SIDE = 1024  # materialised ΔW with a smaller side than this get the exact SVD
RANDOM_CAP = 256  # top triplets computed by randomized SVD for bigger materialised ΔW
ZERO_RTOL = 1e-6  # singular values below this fraction of the largest are numerical zeros


@dataclass
class PruneOptions:
    rank: int | None = None
    mode: str | None = None
    mode_param: float | None = None
    budget: str | None = None
    min_rank: int | None = None
    max_rank: int | None = None
    score: str = "spectral"
    normalisation: str = "energy"  # how spectral scores compete (see the module docstring)
    dtype: str | None = None  # None: the input's
    base: str | None = None  # checkpoint for target shapes and the sensitivity score
    calib: str | None = None
    prompts: tuple = ()
    config: str | None = None
    steps: int = 8
    batch_size: int = 2
    device: str = "cpu"
    seed: int = 0
    no_date: bool = False
    allow_larger: bool = False  # write an output with more parameters than the input (refused otherwise)
    allow_nonfinite: bool = False  # modules holding NaN/Inf are copied unpruned (a warning) instead of refused

    def __post_init__(self):
        self.check()

    def check(self):
        chosen = [n for n, v in (("--rank", self.rank), ("--mode", self.mode), ("--budget", self.budget)) if v is not None]
        if len(chosen) != 1:
            raise BadInput(None, "give exactly one of --rank, --mode or --budget"
                           + (f" (got {', '.join(chosen)})" if chosen else ""))
        if self.mode and self.mode not in MODES:
            raise BadInput(None, f"unknown --mode {self.mode!r}; expected one of {', '.join(MODES)}")
        validate.mode_param(self.mode, self.mode_param, prune=True)
        validate.positive_int("--rank", self.rank)
        validate.positive_int("--min-rank", self.min_rank, minimum=0)
        validate.positive_int("--max-rank", self.max_rank)
        validate.budget("--budget", self.budget)
        validate.positive_int("--steps", self.steps, optional=False)
        validate.positive_int("batch_size", self.batch_size, optional=False)
        if self.score not in SCORES:
            raise BadInput(None, f"unknown --score {self.score!r}; expected one of {', '.join(SCORES)}")
        if self.score == "sensitivity" and not self.budget:
            raise BadInput(None, "--score sensitivity allocates a global budget: give --budget")
        if self.score == "sensitivity" and not self.base:
            raise BadInput(None, "--score sensitivity needs --base CHECKPOINT (and --calib FOLDER or --prompts)")
        if self.normalisation not in NORMALISATIONS:
            raise BadInput(None, f"unknown normalisation {self.normalisation!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise BadInput(None, f"unknown --dtype {self.dtype!r}; expected fp16, bf16 or fp32")
        if self.min_rank is not None and self.max_rank is not None and self.min_rank > self.max_rank:
            raise BadInput(None, f"--min-rank {self.min_rank} is above --max-rank {self.max_rank}")


@dataclass
class Layer:
    """One prunable module in SVD form (ΔW flattened to (out, in·k·k), scale folded into S)."""

    name: str  # output module name
    src_name: str
    component: str | None
    module: str | None  # diffusers module path of the target, when resolved
    shape: tuple  # ΔW shape as written (conv 4-D)
    algo: str
    in_rank: int | None
    in_params: int
    svd: SVD
    new_rank: int = 0

    @property
    def spectrum(self) -> torch.Tensor:
        return self.svd.S

    @property
    def cost_per_rank(self) -> int:
        return lora_cost(self.shape, 1)

    @property
    def useful(self) -> int:
        """Number of non-negligible singular values."""
        S = self.svd.S
        if S.numel() == 0 or float(S[0]) <= 0:
            return 0
        return int((S > float(S[0]) * ZERO_RTOL).sum())

    def kept_energy(self, r: int | None = None) -> float:
        r = self.new_rank if r is None else r
        tot = self.svd.total_energy
        return 1.0 if tot <= 0 else float(self.svd.S[:r].double().square().sum()) / tot

    def factors(self, r: int | None = None, alpha: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(up, down) of the rank-r truncation for a file alpha (consumers scale by alpha/r): up carries S·r/alpha."""
        r = self.new_rank if r is None else r
        up = self.svd.U[:, :r] * (self.svd.S[:r] * (r / alpha if alpha else 1.0))
        down = self.svd.Vh[:r]
        if len(self.shape) > 2:
            up = up.reshape(self.shape[0], r, *([1] * (len(self.shape) - 2)))
            down = down.reshape(r, *self.shape[1:])
        return up.contiguous(), down.contiguous()

    def delta(self, r: int | None = None) -> torch.Tensor:
        r = self.new_rank if r is None else r
        return ((self.svd.U[:, :r] * self.svd.S[:r]) @ self.svd.Vh[:r]).reshape(self.shape)

    @property
    def block(self) -> str:
        return block_of(self.component, self.module or self.name)


@dataclass
class PruneResult:
    output: Path | None
    arch: str | None
    layers: list[Layer] = field(default_factory=list)
    passthrough: list[str] = field(default_factory=list)  # modules copied unchanged
    dropped: list[str] = field(default_factory=list)  # modules that could not be carried over
    bias_dropped: list[str] = field(default_factory=list)  # full-diff modules whose diff_b a LoRA cannot carry
    unscored: list[str] = field(default_factory=list)  # --score sensitivity: layers not found in the model (dropped)
    params_before: int = 0
    params_after: int = 0
    fixed_params: int = 0
    budget: int | None = None
    scores: dict | None = None
    warnings: list = field(default_factory=list)  # one line each: a larger output, little of ΔW's energy kept

    def energy_kept(self) -> float:
        tot = sum(l.svd.total_energy for l in self.layers)
        kept = sum(l.svd.total_energy * l.kept_energy() for l in self.layers)
        return 1.0 if tot <= 0 else kept / tot


# ------------------------------------------------------------------------------------------------
# reading: every module in SVD form
# ------------------------------------------------------------------------------------------------


def block_of(component: str | None, module: str) -> str:
    """A coarse block label for grouping (``te L3``, ``down 1``, ``mid``, ``up 2``, ``input 4`` ...)."""
    comp = {"text_encoder": "te", "text_encoder_2": "te2", "te": "te"}.get(component or "", component or "")
    m = module.replace("_", ".")
    for pat, label in ((r"layers\.(\d+)", "L"), (r"down\.blocks\.(\d+)", "down "), (r"up\.blocks\.(\d+)", "up "),
                       (r"input\.blocks\.(\d+)", "in "), (r"output\.blocks\.(\d+)", "out ")):
        g = re.search(pat, m)
        if g:
            return f"{comp} {label}{g.group(1)}".strip() if label == "L" else f"{label}{g.group(1)}"
    if "mid.block" in m or "middle.block" in m:
        return "mid"
    return comp or "other"


def _weight_shape(lm) -> tuple | None:
    hint = lm.module.weight_shape_hint()
    t = lm.target
    if hint is None:
        return tuple(t.shape) if t else None
    hint = tuple(int(s) for s in hint)
    if t is not None:
        ts = tuple(int(s) for s in t.shape)
        if math.prod(ts) == math.prod(hint) and ts[0] == hint[0]:
            return ts
        conv = unflatten_conv_shape(hint, ts)  # flattened conv layout, maybe on a model of another width
        if conv is not None:
            return conv
    return hint


def _layer_svd(mod, shape: tuple, name: str, seed: int, dense=contextlib.nullcontext()) -> SVD:
    """The module's ΔW in SVD form; ``dense`` is entered around the materialised-ΔW fallback (``_Spectra``
    bounds how many of those run at once)."""
    t = mod.tensors
    if mod.algo == "lora" and "lora_mid.weight" not in t and "bias_values" not in t:
        up = flat(t["lora_up.weight"]) * mod.scale
        return svd_of_product(up, flat(t["lora_down.weight"]))
    if mod.algo == "adalora":
        up = flat(t["lora_B"]) * mod.scale
        down = flat(t["lora_A"]) * f32(t["lora_E"]).reshape(-1, 1)
        return svd_of_product(up, down)
    if mod.algo == "loha" and "hada_t1" not in t:
        # (A1·B1) ⊙ (A2·B2) = (A1 ⊙ᵣ A2)·(B1 ⊙꜀ B2): a product of rank r1·r2, no out×in matrix needed
        a1, b1, a2, b2 = flat(t["hada_w1_a"]), flat(t["hada_w1_b"]), flat(t["hada_w2_a"]), flat(t["hada_w2_b"])
        k = a1.shape[1] * a2.shape[1]
        if k < min(a1.shape[0], b1.shape[1]):
            up = (a1[:, :, None] * a2[:, None, :]).reshape(a1.shape[0], k) * mod.scale
            down = (b1[:, None, :] * b2[None, :, :]).reshape(k, b1.shape[1])
            return svd_of_product(up, down)
    if mod.algo == "lokr":
        return _kron_svd(mod)
    with dense:
        d = mod.delta(shape).reshape(shape[0], -1)
        if min(d.shape) <= EXACT_SIDE:
            return exact_svd(d)
        return truncated_svd(d, min(RANDOM_CAP, min(d.shape)), seed=layer_seed(seed, name))


def _kron_svd(mod) -> SVD:
    """Exact SVD of scale·kron(W1, W2) from the SVDs of the two blocks: singular values σ_i(W1)·σ_j(W2),
    vectors the Kronecker products of the blocks' vectors (conv W2 flattened to (b, d·kh·kw), which is
    how the flattened ΔW's columns are laid out)."""
    from ..adapters import lokr

    w1 = lokr.w1(mod.tensors)
    w2 = lokr.w2(mod.tensors)
    w2 = w2.reshape(w2.shape[0], -1)
    s1, s2 = exact_svd(w1), exact_svd(w2)
    prod = (s1.S[:, None] * s2.S[None, :]).reshape(-1) * abs(mod.scale)
    order = torch.argsort(prod, descending=True, stable=True)
    top = float(prod[order[0]]) if prod.numel() else 0.0
    keep = order[prod[order] > top * ZERO_RTOL] if top > 0 else order[:1]
    i, j = keep // s2.S.numel(), keep % s2.S.numel()
    U = (s1.U[:, i][:, None, :] * s2.U[:, j][None, :, :]).reshape(-1, keep.numel())
    Vh = (s1.Vh[i][:, :, None] * s2.Vh[j][:, None, :]).reshape(keep.numel(), -1)
    if mod.scale < 0:
        U = -U
    S = prod[keep]
    return SVD(U.contiguous(), S.contiguous(), Vh.contiguous(), float(S.double().square().sum()), True)


def _index_for(af: AdapterFile, base: str | None):
    if base:
        with open_source(base) as src:
            idx = ModelIndex.from_source(src)
        return idx.arch, idx
    from .inspect import guess_adapter_arch

    arch, idx, _ = guess_adapter_arch(af)
    return arch, idx


def read_layers(path, opts: PruneOptions, quiet: bool = True):
    """(AdapterFile, arch, layers, passthrough {name: {file key: tensor}}, dropped names, input params)."""
    try:
        af = AdapterFile.open(path)
    except (BadInput, ImportError):  # a missing package is not the file's fault
        raise
    except Exception as e:  # readers raise BadInput for unreadable files; anything else is still bad input
        raise BadInput(path, f"cannot read the adapter: {e}") from e
    if not af.modules:
        raise BadInput(path, "no adapter modules found (is this an adapter file?)")
    arch, idx = _index_for(af, opts.base)
    if idx is not None:
        af.resolve(idx)
    keep_names = af.convention in ("kohya", "lycoris")
    layers: list[Layer] = []
    passthrough: dict[str, dict[str, torch.Tensor]] = {}
    dropped: list[str] = []
    tally = NonFinite(opts.allow_nonfinite)
    with _Spectra(path, quiet) as spectra:
        in_params = _scan_modules(path, af, arch, idx, opts, keep_names, tally, spectra, layers, passthrough, dropped)
    for k in af.groups.embeddings:
        passthrough.setdefault("bundle_emb", {})[k] = af.source.get(k)
    tally.warn()
    return af, arch, layers, passthrough, dropped, in_params


def _scan_modules(path, af, arch, idx, opts, keep_names, tally, spectra, layers, passthrough, dropped) -> int:
    """read_layers' walk over the modules, in file order: names, shapes, NaN checks and copies here; each
    prunable module's SVD is handed to ``spectra`` (which computes them in parallel) and its Layer appended
    in order when ``spectra`` is closed. Returns the input's parameter count."""
    in_params = 0
    for lm in af.modules:
        if lm.broken:  # a known algorithm with wrong tensors: not something to copy through
            raise BadInput(path, f"module {lm.error}")
        sufs = af.groups.modules[lm.name]
        mod = lm.module
        in_params += sum(af.source.numel(k) if hasattr(af.source, "numel") else af.source.get(k).numel()
                         for s, k in sufs.items() if s != "alpha")
        if keep_names:
            out_name = lm.name
        elif lm.target is not None:
            comp = lm.target.component
            ldm = idx.ldm_module(lm.target) if comp == "unet" and arch and arch.startswith("sdxl") else None
            out_name = kohya_module_name(arch or "sd1", comp, lm.target.module, ldm)
        else:
            out_name = None
        prunable = mod is not None and mod.algo in PRUNABLE and not mod.has_dora
        if prunable and mod.rank == 0:  # AdaLoRA modules pruned to nothing: ΔW = 0
            continue
        if prunable:
            shape = _weight_shape(lm)
            if out_name is None or shape is None:
                dropped.append(lm.name)
                continue
            if not tally.check_all(path, lm.name, mod.tensors):
                # --allow-nonfinite: copied unpruned
                if not keep_names:
                    raise BadInput(path, f"{lm.name} holds NaN or infinite values and cannot be copied unpruned "
                                         "under its own name (not a kohya/LyCORIS-named file)")
                passthrough[lm.name] = {k: af.source.get(k) for k in sufs.values()}
                continue
            tgt = lm.target
            spectra.add(lambda svd, lm=lm, mod=mod, shape=shape, out_name=out_name, tgt=tgt: layers.append(
                Layer(out_name, lm.name, tgt.component if tgt else None, tgt.module if tgt else None,
                      tuple(shape), mod.algo, mod.rank, mod.num_params, svd)),
                _module_svd, path, lm.name, mod, shape, out_name, opts.seed, spectra.dense)
        elif keep_names:  # DoRA, IA3, norms, OFT, unparsable: copied as they are
            passthrough[lm.name] = {k: af.source.get(k) for k in sufs.values()}
            tally.check_all(path, lm.name, {s: passthrough[lm.name][k] for s, k in sufs.items()})
        else:
            dropped.append(lm.name)
    return in_params


def _module_svd(path, name: str, mod, shape: tuple, out_name: str, seed: int, dense) -> SVD:
    try:
        svd = _layer_svd(mod, shape, out_name, seed, dense)
    except ValueError as e:
        raise BadInput(path, f"module {name}: {e}") from e
    if not bool(torch.isfinite(svd.S).all()):
        raise BadInput(path, f"module {name} contains NaN or infinite values")
    return svd


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


MAX_WORKERS = 8
MAX_DENSE = 2  # materialised ΔW (Tucker, full diffs) in memory at once


def _worker_init():
    """A pool worker: single-threaded torch, and signals left to the main thread."""
    from ..io.threads import signals_to_main_thread

    signals_to_main_thread()
    torch.set_num_threads(1)


class _Spectra:
    """Runs the per-module SVDs on a pool of threads, one torch thread each, and hands the results back in
    submission order (on exit: each ``done(svd)`` in order; the first error in that order is raised, so
    errors are those of a sequential run).

    Every module's math is a few small QRs, matmuls and SVDs (e.g. a (11520, 32) QR for a 3x3 conv of
    rank 32): on a 2-core machine torch's OpenMP threads spent more time waiting at the end of each op
    for a core than computing (under load, ``isfinite`` on one factor took 60 ms with 2 threads against
    0.7 ms with 1). Single-threaded ops run one module per core instead, and give the same bits: the
    math of each module is the same sequence of ops whatever thread runs it. (Before, the thread count was
    torch's default, the machine's cores; the materialised-ΔW path (Tucker, full diffs) gave bits that
    depended on it, up to ~1e-7 relative; now they are those of one thread on every machine.) At most
    ``MAX_DENSE`` materialised ΔW are held at once, so peak memory stays near a sequential run's."""

    def __init__(self, path, quiet: bool):
        self.path = path
        self.quiet = quiet
        self.pending: list = []  # (done, future or (fn, args))
        self.pool = None
        self.dense = threading.BoundedSemaphore(MAX_DENSE)

    def __enter__(self):
        workers = min(_cores(), MAX_WORKERS)
        self._threads = streaming_threads(io_threads=_cores())  # torch math single-threaded meanwhile
        self._threads.__enter__()
        if workers > 1:
            # each worker sets its own OpenMP/MKL thread count: LAPACK calls from a new thread would
            # otherwise use the default (every core), whatever the process-wide setting says
            self.pool = ThreadPoolExecutor(workers, thread_name_prefix="lycotools-svd", initializer=_worker_init)
        return self

    def add(self, done, fn, *args):
        self.pending.append((done, self.pool.submit(fn, *args) if self.pool else (fn, args)))

    def __exit__(self, et, ev, tb):
        if et is not None and not issubclass(et, Exception):  # Ctrl-C and the like: nothing more to compute
            self.pending = []
        try:
            bar = tqdm(total=len(self.pending), desc=f"spectra {Path(self.path).name}", unit="module",
                       file=sys.stderr, disable=self.quiet or et is not None)
            with bar:
                for done, job in self.pending:
                    svd = job.result() if isinstance(job, Future) else job[0](*job[1])
                    if et is None:
                        done(svd)
                    bar.update()
        finally:
            if self.pool:
                self.pool.shutdown(wait=True, cancel_futures=True)
            self._threads.__exit__(None, None, None)
        return False


# ------------------------------------------------------------------------------------------------
# choosing ranks
# ------------------------------------------------------------------------------------------------


def rank_for_mode(S: torch.Tensor, mode: str, t: float, total_energy: float | None = None) -> int:
    """The smallest rank meeting the rule (kohya's definitions without its +1; see the module docstring)."""
    S = S.double()
    n = S.numel()
    if n == 0 or float(S[0]) <= 0:
        return 0
    if mode == "ratio":
        return int((S > S[0] / t).sum()) or 1
    if mode == "cumulative":
        c = torch.cumsum(S, 0) / S.sum()
        target = t
    elif mode in ("fro", "energy"):
        tot = total_energy if total_energy is not None else float(S.square().sum())
        c = torch.cumsum(S.square(), 0) / tot
        target = t * t if mode == "fro" else t
    else:
        raise ValueError(mode)
    hit = (c >= target - 1e-12).nonzero()
    return int(hit[0]) + 1 if hit.numel() else n


def kohya_rank_for_mode(S: torch.Tensor, mode: str, t: float) -> int:
    """kohya resize_lora's rank (main @ 48d368fa) for comparison: one more than needed, never below 2."""
    S = S.double()
    n = S.numel()
    if mode == "ratio":
        k = int((S > S[0] / t).sum())
    else:
        c = torch.cumsum(S if mode == "cumulative" else S.square(), 0)
        c = c / c[-1]
        k = int(torch.searchsorted(c, torch.tensor(t if mode == "cumulative" else t * t, dtype=c.dtype))) + 1
    k = max(1, min(k, n - 1))
    return k + 1


def spectral_scores(layer: Layer, normalisation: str = "energy") -> list[float]:
    """Per-triplet scores as ``allocate_budget`` reads them (it divides by the cost per rank itself)."""
    S = layer.spectrum[: layer.useful].double()
    if normalisation == "energy":  # σ² per parameter: Frobenius energy of the whole model per parameter
        s = S.square()
    elif normalisation == "relative":  # σ²/‖ΔW‖² per parameter: each layer's relative energy
        s = S.square() / max(layer.svd.total_energy, 1e-30)
    elif normalisation == "unpriced":  # σ², not divided by the cost (cancel allocate_budget's division)
        s = S.square() * layer.cost_per_rank
    elif normalisation == "nuclear":  # σ/ΣS per parameter (cumulative-style)
        s = S / max(float(S.sum()), 1e-30)
    else:
        raise ValueError(normalisation)
    return [float(x) for x in s]


def _clamp(r: int, layer: Layer, opts: PruneOptions, default_min: int) -> int:
    lo = default_min if opts.min_rank is None else opts.min_rank
    cap = layer.svd.S.numel()
    if opts.max_rank:
        cap = min(cap, opts.max_rank)
    return max(0, min(max(r, lo), cap))


def choose_ranks(layers: list[Layer], opts: PruneOptions, budget: int | None = None,
                 scores: dict[str, list[float]] | None = None) -> None:
    """Set ``new_rank`` on every layer."""
    if opts.rank:
        for l in layers:
            l.new_rank = _clamp(opts.rank, l, opts, 1)
        return
    if opts.mode:
        for l in layers:
            # ‖ΔW‖² is known exactly even when only the top of the spectrum was computed; the nuclear
            # norm (cumulative) is then that of the computed top values
            r = rank_for_mode(l.spectrum, opts.mode, opts.mode_param, l.svd.total_energy)
            l.new_rank = _clamp(r, l, opts, 1) if r > 0 else 0
        return
    spectra = []
    lo = opts.min_rank or 0
    for l in layers:
        sc = scores[l.name] if scores is not None else spectral_scores(l, opts.normalisation)
        cap = len(sc)
        if opts.max_rank:
            cap = min(cap, opts.max_rank)
        spectra.append(LayerSpectrum(l.name, sc, l.cost_per_rank, None, min(lo, l.svd.S.numel()), cap))
    try:
        ranks = allocate_budget(spectra, budget)
    except ValueError as e:
        raise BadInput(None, f"--budget: {e}") from e
    for l in layers:
        l.new_rank = ranks[l.name]


def measure_normalisations(layers: list[Layer], ratios=(0.1, 0.2, 0.3, 0.5, 0.7)) -> dict:
    """Total Frobenius energy lost by each spectral normalisation at several budgets (fractions of the
    parameters a full allocation would use), plus the best uniform rank at the same budget."""
    full = sum(l.useful * l.cost_per_rank for l in layers)
    total = sum(l.svd.total_energy for l in layers)
    out = {}
    for ratio in ratios:
        budget = int(ratio * full)
        row = {"budget": budget}
        for norm in NORMALISATIONS:
            choose_ranks(layers, PruneOptions(budget="1", normalisation=norm), budget)
            kept = sum(l.svd.total_energy * l.kept_energy() for l in layers)
            row[norm] = {"lost": 1 - kept / total, "params": sum(l.new_rank * l.cost_per_rank for l in layers)}
        best = None
        for r in range(1, max(l.useful for l in layers) + 1):
            params = sum(min(r, l.useful) * l.cost_per_rank for l in layers)
            if params > budget:
                break
            kept = sum(l.svd.total_energy * l.kept_energy(min(r, l.useful)) for l in layers)
            best = {"rank": r, "lost": 1 - kept / total, "params": params}
        row["uniform"] = best
        out[ratio] = row
    return out


# ------------------------------------------------------------------------------------------------
# the command op
# ------------------------------------------------------------------------------------------------


def _main_dtype(af: AdapterFile) -> torch.dtype:
    counts: dict = {}
    for k in af.source.keys():
        dt = af.source.dtype(k)
        if dt in (torch.float16, torch.bfloat16, torch.float32):
            counts[dt] = counts.get(dt, 0) + 1
    return max(counts.items(), key=lambda kv: kv[1])[0] if counts else torch.float16


def prune(path, output, opts: PruneOptions, *, overwrite: bool = False, report_path=None, plot_path=None,
          quiet: bool = False) -> PruneResult:
    opts.check()
    if plot_path:
        require_matplotlib()
    output = check_output(output, [path, opts.base, opts.config], overwrite)
    af, arch, layers, passthrough, dropped, in_params = read_layers(path, opts, quiet=quiet)
    if not layers:
        raise BadInput(path, "no module can be pruned (LoRA, LoCon, LoHa, LoKr, full or AdaLoRA expected)")
    fixed = sum(int(t.numel()) for d in passthrough.values() for k, t in d.items() if not k.endswith(".alpha"))
    res = PruneResult(output, arch, layers, sorted(passthrough), dropped, params_before=in_params, fixed_params=fixed)
    res.bias_dropped = [l.src_name for l in layers if l.algo == "full" and "diff_b" in af.groups.modules.get(l.src_name, {})]
    scores = None
    if opts.budget:
        bpp = torch.empty((), dtype=DTYPES[opts.dtype] if opts.dtype else _main_dtype(af)).element_size()
        try:
            budget = parse_budget(opts.budget, in_params, bpp)
        except ValueError as e:
            raise BadInput(None, f"--budget: {e}") from e
        res.budget = budget
        if budget - fixed < 0:
            raise BadInput(path, f"--budget {opts.budget} ({budget} parameters) is below the {fixed} parameters "
                           "of the modules that are copied unchanged")
        if opts.score == "sensitivity":
            scores = sensitivity_scores(layers, opts, quiet=quiet)
            res.scores = scores
            res.unscored = [name for name, sc in scores.items() if not sc]
        choose_ranks(layers, opts, budget - fixed, scores)
    else:
        choose_ranks(layers, opts)
    res.params_after = fixed + sum(l.new_rank * l.cost_per_rank for l in layers)
    _check_size_and_energy(path, output, res, opts)
    _write(af, path, output, res, passthrough, opts, overwrite)
    if report_path:
        write_report(report_path, res, opts)
    if plot_path:
        plot_ranks(plot_path, res)
    return res


LOW_ENERGY = 0.5  # below this fraction of ΔW's energy (Frobenius², whole file) kept, rank-prune warns


def _check_size_and_energy(path, output, res: PruneResult, opts: PruneOptions):
    """Refuse an output larger than the input (in parameters) unless ``allow_larger``; warn when it keeps
    less than ``LOW_ENERGY`` of ΔW's energy. A LoKr, LoHa or full module becomes a LoRA of rank r costing
    r·(out + in) parameters, which can be many times the Kronecker or Hadamard factors it replaces."""
    before, after = res.params_before, res.params_after
    kept = res.energy_kept()
    if after > before:
        names = {"lokr": "LoKr", "loha": "LoHa", "full": "full-diff", "adalora": "AdaLoRA"}
        algos = sorted({names[l.algo] for l in res.layers if l.algo in names})
        why = f" (its {'/'.join(algos)} modules become LoRA factors of r·(out + in) parameters)" if algos else ""
        size = (f"{before} → {after} parameters, {after / max(before, 1):.1f}× the input{why}, "
                f"keeping {100 * kept:.1f}% of ΔW's energy")
        if not opts.allow_larger:
            raise BadInput(path, f"the pruned adapter would be larger than the input: {size}",
                           hint="choose a lower --rank or a --budget below the input's size, or pass --allow-larger")
        res.warnings.append(f"{output}: larger than the input {Path(path).name}: {size}")
    if kept < LOW_ENERGY:
        res.warnings.append(f"{output}: keeps only {100 * kept:.1f}% of ΔW's energy (under {100 * LOW_ENERGY:.0f}%; "
                            f"relative error {math.sqrt(max(0.0, 1 - kept)):.2f}), {before} → {after} parameters")


def _write(af, path, output, res: PruneResult, passthrough, opts: PruneOptions, overwrite: bool):
    dtype = DTYPES[opts.dtype] if opts.dtype else _main_dtype(af)
    arch = res.arch
    has_conv3 = any(len(l.shape) == 4 and math.prod(l.shape[2:]) > 1 and l.new_rank for l in res.layers)
    ranks = {l.name: l.new_rank for l in res.layers}
    kept = [r for r in ranks.values() if r]
    alpha = float(max(kept)) if kept else 1.0  # one alpha for every layer (see the module docstring)
    # single-threaded torch: small per-layer ops (see _Spectra)
    with SafetensorsWriter(output, {}, inputs=[path], overwrite=overwrite) as w, streaming_threads(_cores()):
        for l in res.layers:
            if l.new_rank <= 0:
                continue
            up, down = (t.to(dtype).contiguous() for t in l.factors(alpha=alpha))
            factors = {"lora_up.weight": up, "lora_down.weight": down}
            NonFinite(hint="a wider --dtype (fp32, bf16) holds it").check_all(path, l.name, factors)
            w.add(f"{l.name}.lora_up.weight", up)
            w.add(f"{l.name}.lora_down.weight", down)
            w.add(f"{l.name}.alpha", torch.tensor(alpha, dtype=torch.float32))
        for d in passthrough.values():
            for k, t in d.items():
                w.add(k, t.contiguous())
        meta = {k: v for k, v in af.source.metadata.items()
                if k.startswith("ss_") and k not in ("ss_network_dim", "ss_network_alpha", "ss_network_args",
                                                     "ss_network_module", "ss_training_comment")}
        uniform = bool(opts.rank) and len(set(kept)) <= 1
        dim = (kept[0] if kept else 0) if uniform else "Dynamic"
        args = {"algo": "locon" if has_conv3 else "lora"}
        if has_conv3:
            conv = [l.new_rank for l in res.layers if len(l.shape) == 4 and math.prod(l.shape[2:]) > 1 and l.new_rank]
            args["conv_dim"] = max(conv)
            args["conv_alpha"] = max(conv)
        meta.update(network_metadata(arch, "networks.lora", dim, int(alpha), args))
        how = (f"rank {opts.rank}" if opts.rank else f"{opts.mode} {opts.mode_param}" if opts.mode
               else f"budget {opts.budget} ({res.budget} params, score {opts.score})")
        old = sorted({l.in_rank for l in res.layers if l.in_rank})
        meta["ss_training_comment"] = (f"rank-pruned by lycotools ({how}) from rank "
                                       f"{old[0] if len(old) == 1 else old}; "
                                       + af.source.metadata.get("ss_training_comment", ""))[:2000]
        meta.update(modelspec(arch, "lora", output.stem, no_date=opts.no_date))
        meta["ss_output_name"] = output.stem
        record = {k: v for k, v in opts.__dict__.items() if k not in ("no_date",)}
        meta.update(lycotools_record("rank-prune", [{"role": "adapter", "name": Path(path).name}], record))
        meta["lycotools.rank_prune.score"] = opts.score if opts.budget else "none"
        meta["lycotools.rank_prune.budget"] = json.dumps({"asked": opts.budget, "params": res.budget,
                                                          "used": res.params_after})
        meta["lycotools.rank_prune.ranks"] = json.dumps(ranks, sort_keys=True)
        meta["lycotools.rank_prune.ranks_before"] = json.dumps({l.name: l.in_rank for l in res.layers}, sort_keys=True)
        meta["lycotools.rank_prune.energy_kept"] = f"{res.energy_kept():.6f}"
        w.metadata.update(meta)


def report_doc(res: PruneResult, opts: PruneOptions) -> dict:
    return {
        "output": str(res.output),
        "arch": res.arch,
        "how": {"rank": opts.rank, "mode": opts.mode, "mode_param": opts.mode_param, "budget": opts.budget,
                "budget_params": res.budget, "score": opts.score if opts.budget else None,
                "min_rank": opts.min_rank, "max_rank": opts.max_rank},
        "params_before": res.params_before,
        "params_after": res.params_after,
        "params_copied_unchanged": res.fixed_params,
        "energy_kept": res.energy_kept(),
        "passthrough": res.passthrough,
        "dropped": res.dropped,
        "bias_changes_not_stored": res.bias_dropped,
        "not_scored": res.unscored,
        "warnings": res.warnings,
        "layers": [
            {"name": l.name, "component": l.component, "module": l.module, "block": l.block, "shape": list(l.shape),
             "algo_before": l.algo, "rank_before": l.in_rank, "spectrum_rank": l.useful, "rank_after": l.new_rank,
             "params_before": l.in_params, "params_after": l.new_rank * l.cost_per_rank,
             "energy_kept": l.kept_energy(),
             **({"score": res.scores[l.name][: l.new_rank + 1]} if res.scores else {})}
            for l in res.layers
        ],
    }


def write_report(path, res: PruneResult, opts: PruneOptions):
    write_text_atomic(path, json.dumps(report_doc(res, opts), indent=1))


def require_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise BadInput(None, "--plot needs matplotlib, which is not installed",
                       hint="pip install 'lycotools[plot]' (or pip install matplotlib)") from None


def plot_ranks(path, res: PruneResult):
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = res.layers
    blocks: list[str] = []
    for l in layers:
        if l.block not in blocks:
            blocks.append(l.block)
    order = sorted(range(len(layers)), key=lambda i: (blocks.index(layers[i].block), i))
    before = [layers[i].in_rank or layers[i].useful for i in order]
    after = [layers[i].new_rank for i in order]
    fig, ax = plt.subplots(figsize=(max(6, 0.12 * len(layers) + 2), 4))
    x = list(range(len(order)))
    ax.bar(x, before, color="#c8c8c8", label="before", width=0.9)
    ax.bar(x, after, color="#2a6fb0", label="after", width=0.6)
    start = 0
    for b in blocks:
        n = sum(1 for i in order if layers[i].block == b)
        if start:
            ax.axvline(start - 0.5, color="k", lw=0.5, alpha=0.4)
        ax.text(start + n / 2 - 0.5, max(before + [1]) * 1.02, b, ha="center", va="bottom", fontsize=7, rotation=90)
        start += n
    ax.set_xlabel("layer (grouped by block)")
    ax.set_ylabel("rank")
    ax.set_title(f"{Path(str(res.output)).name}: {res.params_before} → {res.params_after} params, "
                 f"{100 * res.energy_kept():.1f}% energy kept", fontsize=9)
    ax.legend(fontsize=8)
    ax.set_ylim(0, max(before + after + [1]) * 1.35)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:  # the temp name has no image suffix: say the format
        fig.savefig(tmp, dpi=120, format=Path(path).suffix.lstrip(".").lower() or "png")
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# --score sensitivity (AdaLoRA, Zhang et al. 2023, docs/formats.md#sensitivity-score)
# ------------------------------------------------------------------------------------------------

BETA1 = BETA2 = 0.85
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _config_folder(opts: PruneOptions, base_kind: str) -> Path:
    if opts.config:
        p = Path(opts.config)
    elif base_kind == "diffusers":
        p = Path(opts.base)
    else:
        raise BadInput(opts.base, "--score sensitivity with a single-file base needs --config FOLDER "
                       "(a diffusers folder of the same architecture: unet/, text_encoder/, tokenizer/ configs)")
    if not p.is_dir():
        raise BadInput(p, "--config must be a diffusers folder (with unet/config.json, text_encoder/config.json, tokenizer/)")
    return p


def _sub(folder: Path, name: str) -> Path:
    q = folder / name
    if not q.exists():
        raise BadInput(folder, f"--config folder has no {name}/ (needed to build the model for --score sensitivity)")
    return q


def _load_into(model, sd: dict, path, what: str, strip_text_model: bool = False):
    if strip_text_model and not any(k.startswith("text_model.") for k in model.state_dict()):
        sd = {k[len("text_model."):] if k.startswith("text_model.") else k: v for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing:
        raise BadInput(path, f"the base's {what} does not fit the config: {len(missing)} weights missing "
                       f"(first: {missing[0]})", hint="pass --config with the base's own diffusers configs")


@dataclass
class CalibModels:
    unet: object
    text_encoder: object
    tokenizer: object
    vae: object | None
    scheduler: object


def build_models(opts: PruneOptions, need_vae: bool, dev: torch.device) -> CalibModels:
    """The diffusers UNet, CLIP text encoder (and VAE for images) of ``opts.base``, from the configs of
    ``opts.config`` (or the base itself when it is a diffusers folder)."""
    from ..layouts.checkpoint import single_to_diffusers_state_dicts, split_diffusers_flat

    with open_source(opts.base) as src:
        from ..layouts.checkpoint import detect_checkpoint

        info = detect_checkpoint(src.shapes())
        if info.arch not in ("sd1", "sd2"):
            raise BadInput(opts.base, f"--score sensitivity supports SD1/SD2 bases for now, this is {info.arch}")
        flat_sd = {k: src.get(k) for k in src.keys()}
        kind = src.kind
    comps = split_diffusers_flat(flat_sd) if info.layout == "diffusers" else single_to_diffusers_state_dicts(flat_sd, info.arch)
    del flat_sd
    folder = _config_folder(opts, kind)
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(_sub(folder, "unet"))))
    _load_into(unet, comps.get("unet", {}), opts.base, "UNet")
    te = CLIPTextModel(CLIPTextConfig.from_pretrained(str(_sub(folder, "text_encoder"))))
    _load_into(te, comps.get("text_encoder", {}), opts.base, "text encoder", strip_text_model=True)
    if (folder / "tokenizer").is_dir():
        tok = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
    else:  # the CLIP tokenizer shipped with lycotools, when the encoder embeds its 49408 tokens
        from ..layouts import tokenizers

        if not tokenizers.fits(te.config.vocab_size):
            _sub(folder, "tokenizer")  # the "--config folder has no tokenizer/" error
        tok = tokenizers.clip_tokenizer(tokenizers.kind_for(info.arch, "text_encoder"))
    vae = None
    if need_vae:
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(_sub(folder, "vae"))))
        _load_into(vae, comps.get("vae", {}), opts.base, "VAE")
        vae.to(dev).eval().requires_grad_(False)
    sched_dir = folder / "scheduler"
    sched_cfg = {}
    if sched_dir.exists():
        sched_cfg = {k: v for k, v in DDPMScheduler.load_config(str(sched_dir)).items()
                     if k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type")}
    sched = DDPMScheduler(**{"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, **sched_cfg})
    for m in (unet, te):
        m.to(dev).eval().requires_grad_(False)
    return CalibModels(unet, te, tok, vae, sched)


def read_calib(folder) -> list[tuple[Path, str]]:
    """(image, caption) pairs: every image in the folder with the text of its same-stem .txt (or "")."""
    p = Path(folder)
    if not p.is_dir():
        raise BadInput(p, "--calib must be a folder of images with .txt captions")
    items = []
    for img in sorted(p.iterdir()):
        if img.suffix.lower() in IMAGE_EXTS:
            cap = img.with_suffix(".txt")
            items.append((img, cap.read_text().strip() if cap.exists() else ""))
    if not items:
        raise BadInput(p, "no images in the calibration folder (png, jpg, webp, bmp)")
    return items


def _encode_images(paths, models: CalibModels, dev) -> torch.Tensor:
    from PIL import Image

    f = 2 ** (len(models.vae.config.block_out_channels) - 1)
    size = int(models.unet.config.sample_size) * f
    xs = []
    for p in paths:
        try:
            im = Image.open(p).convert("RGB").resize((size, size), Image.BICUBIC)
        except Exception as e:
            raise BadInput(p, f"cannot read the calibration image: {e}") from e
        t = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).reshape(size, size, 3)
        xs.append(t.permute(2, 0, 1).float() / 127.5 - 1)
    x = torch.stack(xs).to(dev)
    with torch.no_grad():
        lat = models.vae.encode(x).latent_dist.mean
    return lat * float(getattr(models.vae.config, "scaling_factor", 0.18215))


def _find_module(root, path: str):
    mods = dict(root.named_modules())
    for cand in (path, path[len("text_model."):] if path.startswith("text_model.") else "text_model." + path):
        if cand in mods:
            return mods[cand]
    return None


class _Triplets:
    """One adapted layer in SVD form P·diag(λ)·Q, added to the layer's output by a forward hook."""

    def __init__(self, layer: Layer, module, dev):
        k = layer.useful
        self.layer = layer
        self.P = layer.svd.U[:, :k].clone().to(dev).requires_grad_(True)
        self.lam = layer.svd.S[:k].clone().to(dev).requires_grad_(True)
        self.Q = layer.svd.Vh[:k].clone().to(dev).requires_grad_(True)
        self.module = module
        self.conv = isinstance(module, torch.nn.Conv2d)
        self.handle = module.register_forward_hook(self._hook)
        self.ipt = {n: None for n in ("P", "lam", "Q")}
        self.unc = {n: None for n in ("P", "lam", "Q")}

    def params(self):
        return {"P": self.P, "lam": self.lam, "Q": self.Q}

    def _hook(self, mod, inputs, out):
        x = inputs[0]
        k = self.lam.numel()
        if self.conv:
            q = self.Q.reshape(k, *mod.weight.shape[1:])
            h = F.conv2d(x, q, None, mod.stride, mod.padding, mod.dilation, mod.groups)
            h = h * self.lam.reshape(1, k, 1, 1)
            return out + F.conv2d(h, self.P.reshape(self.P.shape[0], k, 1, 1))
        return out + F.linear(F.linear(x, self.Q) * self.lam, self.P)

    def update(self):
        """AdaLoRA's smoothed sensitivity and uncertainty (β1 = β2 = 0.85) from this step's gradients."""
        for n, w in self.params().items():
            if w.grad is None:
                g = torch.zeros_like(w)
            else:
                g = w.grad
            ipt = (w.detach() * g).abs()
            if self.ipt[n] is None:
                self.ipt[n] = torch.zeros_like(ipt)
                self.unc[n] = torch.zeros_like(ipt)
            self.ipt[n] = BETA1 * self.ipt[n] + (1 - BETA1) * ipt
            self.unc[n] = BETA2 * self.unc[n] + (1 - BETA2) * (ipt - self.ipt[n]).abs()
            w.grad = None

    def triplet_scores(self) -> torch.Tensor:
        """Eq. 9: s(λ_i) + mean_j s(P_ji) + mean_j s(Q_ij), s = Ī·Ū."""
        if self.ipt["lam"] is None:
            return torch.zeros(self.lam.numel())
        s = {n: self.ipt[n] * self.unc[n] for n in self.ipt}
        return (s["lam"] + s["P"].mean(dim=0) + s["Q"].mean(dim=1)).detach().double().cpu()

    def remove(self):
        self.handle.remove()


def sensitivity_scores(layers: list[Layer], opts: PruneOptions, quiet: bool = True) -> dict[str, list[float]]:
    """AdaLoRA triplet scores from a few diffusion-loss forward/backward passes on calibration data.

    Each layer is put in SVD form (its exact P·Λ·Q), added to the base model's layer output by a
    forward hook; ε-prediction MSE at random timesteps with DDPM noise is back-propagated to P, λ and
    Q only. |w·∂L/∂w| is smoothed by AdaLoRA's EMA (sensitivity Ī and uncertainty Ū, β1 = β2 = 0.85)
    and combined into Eq. 9's triplet score (the same arithmetic as PEFT's ``RankAllocator``; a test
    checks it). Each layer's triplets are then re-ordered by score (its SVD permuted accordingly), so
    that keeping rank k keeps its k best-scored triplets, and ``allocate_budget`` keeps the triplets
    with the highest score per parameter within the budget. This is one-shot pruning of a finished
    adapter: nothing is trained, so AdaLoRA's cubic budget schedule (which anneals the budget during
    training) does not apply; the EMA runs over the ``--steps`` calibration passes.
    Returns {layer name: scores, non-increasing}.
    """
    if not opts.calib and not opts.prompts:
        raise BadInput(None, "--score sensitivity needs --calib FOLDER (images + .txt captions) or --prompts")
    dev = device_of(opts.device)
    g = torch.Generator().manual_seed(opts.seed)
    items = read_calib(opts.calib) if opts.calib else None
    models = build_models(opts, need_vae=items is not None, dev=dev)
    roots = {"unet": models.unet, "text_encoder": models.text_encoder}
    trips: list[_Triplets] = []
    for l in layers:
        if l.useful == 0 or l.component not in roots or l.module is None:
            continue
        mod = _find_module(roots[l.component], l.module)
        if mod is None or not isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        if tuple(mod.weight.shape) != tuple(l.shape):
            raise BadInput(opts.base, f"adapter module {l.src_name} has shape {list(l.shape)} but the base's "
                           f"{l.module} is {list(mod.weight.shape)}: is this the adapter's base model?")
        trips.append(_Triplets(l, mod, dev))
    if not trips:
        raise BadInput(opts.base, "no adapter layer was found in the base model (wrong --base or --config?)")
    unet, te, tok, sched = models.unet, models.text_encoder, models.tokenizer, models.scheduler
    if items is not None:
        latents_all = _encode_images([p for p, _ in items], models, dev)
        captions = [c for _, c in items]
    else:
        captions = list(opts.prompts)
        shape = (len(captions), unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
        latents_all = torch.randn(shape, generator=g).to(dev)  # noise latents (no images)
    n = len(captions)
    bs = max(1, min(opts.batch_size, n))
    ids_all = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(dev)
    T = sched.config.num_train_timesteps
    bar = tqdm(range(opts.steps), desc="sensitivity", unit="step", file=sys.stderr, disable=quiet)
    try:
        for step in bar:
            idx = [(step * bs + i) % n for i in range(bs)]
            lat = latents_all[idx]
            noise = torch.randn(lat.shape, generator=g).to(dev)
            t = torch.randint(0, T, (bs,), generator=g).to(dev)
            noisy = sched.add_noise(lat, noise, t)
            with torch.enable_grad():
                hidden = te(ids_all[idx])[0]
                pred = unet(noisy, t, encoder_hidden_states=hidden).sample
                target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(lat, noise, t)
                loss = F.mse_loss(pred.float(), target.float())
                loss.backward()
            for tr in trips:
                tr.update()
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
    finally:
        for tr in trips:
            tr.remove()
    out: dict[str, list[float]] = {l.name: [] for l in layers}  # layers the model never reached: no score
    for tr in trips:
        sc = tr.triplet_scores()
        order = torch.argsort(sc, descending=True, stable=True)
        l = tr.layer
        k = l.useful
        svd = l.svd
        l.svd = SVD(svd.U[:, :k][:, order], svd.S[:k][order], svd.Vh[:k][order], svd.total_energy, svd.exact)
        out[l.name] = [float(x) for x in sc[order]]
    return out
