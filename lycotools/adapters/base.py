"""The adapter module record every algorithm shares, and the parser that builds it.

An ``AdapterModule`` holds the tensors of one module key (``<key>.<suffix>`` split on the first dot)
under their canonical LyCORIS suffixes. The math lives in one small module per algorithm
(``lora.py``, ``loha.py`` ...); this file holds the shared helpers, DoRA, and the dispatch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

F32 = torch.float32
EPS = torch.finfo(torch.float32).eps


# ----------------------------------------------------------------------------- helpers
def f32(t: torch.Tensor) -> torch.Tensor:
    """The tensor as float32 (the dtype all adapter math is done in)."""
    return t.to(F32)


def scalar(t: torch.Tensor | None) -> float | None:
    """A one-element tensor (shape () or (1,), any dtype) as a Python float; None stays None."""
    if t is None:
        return None
    if t.numel() != 1:
        raise ValueError(f"expected a scalar tensor, got shape {tuple(t.shape)}")
    return float(t.reshape(-1)[0].to(torch.float64))


def alpha_tensor(alpha) -> torch.Tensor:
    """Alpha as written by lycotools: a 0-dim float32 tensor."""
    return torch.tensor(float(alpha), dtype=F32)


def flat(t: torch.Tensor) -> torch.Tensor:
    """A factor as a matrix: keep the first axis, flatten the rest (float32)."""
    return f32(t).reshape(t.shape[0], -1)


def reshape_to(delta: torch.Tensor, weight_shape) -> torch.Tensor:
    """Reshape ΔW to the layer's weight shape, refusing a size mismatch."""
    if weight_shape is None:
        return delta
    weight_shape = tuple(int(s) for s in weight_shape)
    if delta.numel() != torch.Size(weight_shape).numel():
        raise ValueError(
            f"delta of shape {tuple(delta.shape)} ({delta.numel()} values) does not fit "
            f"the weight shape {weight_shape}"
        )
    return delta.reshape(weight_shape)


def need(t: dict, *suffixes: str) -> None:
    """Raise ValueError naming the missing tensors, if any."""
    missing = [s for s in suffixes if s not in t]
    if missing:
        raise ValueError(f"missing tensor(s) {missing}; present: {sorted(t)}")


def apply_dora(weight: torch.Tensor, delta: torch.Tensor, dora_scale: torch.Tensor, multiplier: float):
    """DoRA merge (docs/adapters.md#dora): V = W + ΔW, s = dora_scale / (‖V‖ + eps), m interpolates s to 1.

    The norm axis follows the stored shape: ``(out, 1, ...)`` is the output axis (LyCORIS default,
    norm over every non-output dim); ``(1, in, ...)`` is the input axis (``wd_on_out=False``).
    """
    v = f32(weight) + delta
    ds = f32(dora_scale)
    out = v.shape[0]
    if ds.shape[0] == out and (ds.dim() < 2 or ds.shape[1] == 1 or out == 1):
        norm = v.reshape(out, -1).norm(dim=1).reshape(out, *([1] * (v.dim() - 1)))
    elif ds.dim() >= 2 and ds.shape[0] == 1 and ds.shape[1] == v.shape[1]:
        # input axis: norm over the output axis (and nothing else), one value per (in, k...) entry
        norm = v.transpose(0, 1).reshape(v.shape[1], -1).norm(dim=1)
        norm = norm.reshape(1, v.shape[1], *([1] * (v.dim() - 2)))
    else:
        raise ValueError(f"dora_scale shape {tuple(ds.shape)} does not fit weight shape {tuple(v.shape)}")
    s = ds.reshape(norm.shape) / (norm + EPS)
    if multiplier != 1:
        s = multiplier * (s - 1) + 1
    return v * s


# ----------------------------------------------------------------------------- the record
def _modules():
    from . import ALGORITHMS  # late import: the algorithm modules import helpers from here

    return ALGORITHMS


@dataclass
class AdapterModule:
    """One adapter module: its key, algorithm and canonical tensors (any dtype; math in float32)."""

    name: str
    algo: str
    tensors: dict[str, torch.Tensor]
    extra: dict = field(default_factory=dict)

    @property
    def impl(self):
        """The algorithm's module (``lycotools.adapters.lora`` etc.)."""
        return _modules()[self.algo]

    @property
    def rank(self) -> int | None:
        return self.impl.rank(self.tensors)

    @property
    def alpha(self) -> float | None:
        return scalar(self.tensors.get("alpha"))

    @property
    def scale(self) -> float:
        impl = self.impl
        if hasattr(impl, "scale"):
            return float(impl.scale(self.tensors, self.extra))
        r, a = self.rank, self.alpha
        if r is None or a is None or a == 0:
            return 1.0
        return a / r

    @property
    def num_params(self) -> int:
        skip = {"alpha", "on_input"}
        return sum(int(t.numel()) for k, t in self.tensors.items() if k not in skip)

    @property
    def has_dora(self) -> bool:
        return "dora_scale" in self.tensors

    def weight_shape_hint(self) -> tuple | None:
        """Shape of ΔW as ``delta()`` returns it without ``weight_shape`` (None when W is needed).

        Layouts stored flattened (LoHa, LoKr with a decomposed conv w2, LoRA conv with a 2-D up and
        a 2-D down) give the matrix shape ``(out, K)``: pass ``weight_shape`` to get the conv shape.
        """
        return self.impl.weight_shape_hint(self.tensors)

    def fit_error(self, shape, has_bias: bool = False) -> str | None:
        """Why this module cannot change a weight of ``shape`` (None when it fits): ΔW's size and output
        axis, a bias change's size, and the per-channel tensors (IA3, OFT, DoRA, GLoRA) are checked against
        the layer before anything is built from them."""
        shape = tuple(int(s) for s in shape)
        numel = math.prod(shape)
        t = self.tensors
        hint = self.weight_shape_hint()
        if hint is not None and (math.prod(hint) != numel or int(hint[0]) != shape[0]):
            return f"ΔW of shape {list(hint)} does not fit the weight {list(shape)}"
        if self.impl.ALGO == "ia3":
            axis = 1 if self.impl.on_input(t) else 0
            if len(shape) <= axis or t["weight"].numel() != shape[axis]:
                return f"IA3 weight of {t['weight'].numel()} values does not fit the weight {list(shape)}"
        if self.impl.ALGO == "oft" and self.impl.out_dim(t) != shape[0]:
            return f"OFT blocks cover {self.impl.out_dim(t)} output rows, the weight {list(shape)} has {shape[0]}"
        if self.impl.ALGO == "glora" and (len(shape) < 2 or t["a1.weight"].shape[0] != shape[1]
                                          or flat(t["a2.weight"]).shape[1] != shape[1]):
            return f"GLoRA a1/a2 {list(t['a1.weight'].shape)}/{list(t['a2.weight'].shape)} do not fit the weight {list(shape)}"
        if "dora_scale" in t and t["dora_scale"].numel() not in (shape[0], shape[1] if len(shape) > 1 else -1):
            return f"dora_scale of {t['dora_scale'].numel()} values fits neither axis of the weight {list(shape)}"
        bias = t.get("diff_b")
        if bias is not None and has_bias and bias.numel() != shape[0]:
            return f"diff_b of {bias.numel()} values does not fit the layer's {shape[0]} outputs"
        return None

    def delta(self, weight_shape=None, base_weight=None) -> torch.Tensor:
        """ΔW in float32, scale applied once, DoRA not applied; reshaped to ``weight_shape`` if given."""
        if weight_shape is None and base_weight is not None:
            weight_shape = tuple(base_weight.shape)
        return self.impl.delta(self.tensors, self.scale, weight_shape=weight_shape, base_weight=base_weight)

    def apply(self, weight, multiplier: float = 1.0, bias=None, *, inplace: bool = False):
        """Merged ``(W', b')`` in float32, as the LyCORIS forward path means the file.

        ``inplace=True`` lets the algorithms that can (plain LoRA/LoCon) write the result into
        ``weight`` itself when it is a contiguous float32 tensor the caller owns: one pass and no
        second weight-sized buffer. The returned tensor is the one to use either way."""
        impl = self.impl
        bias32 = None if bias is None else f32(bias)
        if hasattr(impl, "apply"):
            return impl.apply(self.tensors, self.scale, weight, multiplier, bias32)
        if hasattr(impl, "fused_apply"):
            fused = impl.fused_apply(self.tensors, self.scale, weight, multiplier, inplace=inplace)
            if fused is not None:
                return fused, bias32
        w = f32(weight)
        d = self.delta(tuple(w.shape), base_weight=w)
        if self.has_dora:
            w = apply_dora(w, d, self.tensors["dora_scale"], multiplier)
        else:
            w = w + multiplier * d
        if hasattr(impl, "bias_delta") and bias32 is not None:
            db = impl.bias_delta(self.tensors)
            if db is not None:
                bias32 = bias32 + multiplier * db.reshape(bias32.shape)
        return w, bias32


class BrokenModule(ValueError):
    """A module whose algorithm is known but whose tensors are wrong (shapes, dtypes, sizes, indices)."""


_INTEGER_SUFFIXES = ("on_input", "bias_indices", "bias_size")


def check_tensors(algo: str, tensors: dict[str, torch.Tensor]) -> None:
    """What every algorithm needs of its tensors: floating-point factors (integer index tensors, a
    numeric alpha), a one-element alpha, and no zero-size factor (AdaLoRA, pruned to rank 0, aside)."""
    for k, v in tensors.items():
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"{k} is not a tensor")
        if k in _INTEGER_SUFFIXES:
            if v.is_floating_point() or v.is_complex() or (v.dtype == torch.bool and k != "on_input"):
                raise ValueError(f"{k} is {str(v.dtype).replace('torch.', '')}; an integer tensor is expected")
            continue
        if k == "alpha":
            if v.numel() != 1:
                raise ValueError(f"alpha has shape {list(v.shape)}; it must be one number")
            if v.dtype == torch.bool or v.is_complex():
                raise ValueError(f"alpha is {str(v.dtype).replace('torch.', '')}, not a number")
            continue
        if not v.is_floating_point():
            raise ValueError(f"{k} is {str(v.dtype).replace('torch.', '')}; a floating-point tensor is expected")
        if v.numel() == 0 and algo != "adalora":
            raise ValueError(f"{k} has the empty shape {list(v.shape)}")


def parse_module(name: str, tensors: dict[str, torch.Tensor], extra: dict | None = None) -> AdapterModule:
    """Detect the algorithm from the suffix set (LyCORIS order) and check the shapes.

    Raises ValueError naming the suffixes when no algorithm matches, a required tensor is missing,
    or shapes disagree.
    """
    suffixes = set(tensors)
    extra = dict(extra or {})
    for algo, impl in _modules().items():
        if not impl.detect(suffixes):
            continue
        if hasattr(impl, "algo_of"):
            algo = impl.algo_of(tensors)
        unknown = suffixes - set(impl.SUFFIXES)
        if unknown:
            raise ValueError(
                f"{name}: suffixes {sorted(unknown)} are not part of algorithm {algo!r} "
                f"(module has {sorted(suffixes)})"
            )
        try:
            check_tensors(algo, tensors)
            impl.validate(tensors, extra)
        except (ValueError, IndexError) as e:
            raise BrokenModule(f"{name}: {algo}: {e}") from None
        return AdapterModule(name=name, algo=algo, tensors=dict(tensors), extra=extra)
    raise ValueError(f"{name}: no adapter algorithm matches the suffixes {sorted(suffixes)}")
