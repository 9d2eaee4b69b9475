"""Checks for option values, shared by the options dataclasses (so the CLI and library callers get the
same ``BadInput``): ranks are positive integers, numbers are finite and in range, budgets parse."""

from __future__ import annotations

import math
import numbers

from .errors import BadInput


def _bad(name: str, value, want: str):
    raise BadInput(None, f"{name} must be {want}, got {value!r}")


def positive_int(name: str, value, *, minimum: int = 1, optional: bool = True):
    """An integer ≥ ``minimum`` (None passes when ``optional``)."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        _bad(name, value, f"an integer ≥ {minimum}")
    if value < minimum:
        _bad(name, value, f"an integer ≥ {minimum}")


def finite(name: str, value, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
           hi_open: bool = False, optional: bool = True):
    """A finite real number within [lo, hi] (an open end when ``lo_open``/``hi_open``)."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        _bad(name, value, "a finite number")
    if (lo is not None and (value < lo or (lo_open and value == lo))) or \
            (hi is not None and (value > hi or (hi_open and value == hi))):
        span = [f"{'>' if lo_open else '≥'} {lo:g}"] if lo is not None else []
        span += [f"{'<' if hi_open else '≤'} {hi:g}"] if hi is not None else []
        _bad(name, value, " and ".join(span))


_SIZE_UNITS = ("kib", "mib", "gib", "kb", "mb", "gb", "k", "m", "g")


def budget(name: str, text, *, optional: bool = True):
    """A budget as ``parse_budget`` reads it: a positive count (``2M``, ``300k``), size (``20MB``) or ratio
    (``0.05``). Zero, negatives, NaN, infinities and anything else are refused here, before any work."""
    if text is None and optional:
        return
    t = str(text).strip().lower().replace("_", "")
    number = t
    for suf in _SIZE_UNITS:
        if t.endswith(suf):
            number = t[: -len(suf)]
            break
    try:
        v = float(number)
    except ValueError:
        v = None
    if v is None or not math.isfinite(v) or v <= 0:
        raise BadInput(None, f"{name} {text!r} is not a positive parameter count (2.5M, 300k), size (20MB) "
                             "or ratio (0.5)")
    if number == t and not (v <= 1 and "." in t) and v != int(v):
        raise BadInput(None, f"{name} {text!r}: a ratio is at most 1 and a parameter count is a whole number")


# rank rules: the parameter each one takes
_EXTRACT_MODES = {"threshold": (0.0, None, False), "ratio": (0.0, 1.0, True), "quantile": (0.0, 1.0, True),
                  "energy": (0.0, 1.0, True)}
_PRUNE_MODES = {"ratio": (1.0, None, False), "cumulative": (0.0, 1.0, True), "fro": (0.0, 1.0, True),
                "energy": (0.0, 1.0, True)}


def mode_param(mode: str, value, *, prune: bool = False, name: str = "--mode-param"):
    """The parameter of a rank rule: needed by every mode but ``fixed``, finite and in the mode's range
    (threshold ≥ 0; ratio and quantile in (0, 1] for extract/convert, ratio ≥ 1 = S_max/S_min for rank-prune;
    cumulative, fro and energy fractions in (0, 1])."""
    if mode is None or mode == "fixed":
        finite(name, value)
        return
    if value is None:
        raise BadInput(None, f"--mode {mode} needs {name}")
    lo, hi, lo_open = (_PRUNE_MODES if prune else _EXTRACT_MODES).get(mode, (None, None, False))
    try:
        finite(name, value, lo, hi, lo_open=lo_open, optional=False)
    except BadInput as e:
        raise BadInput(None, f"--mode {mode}: {e.message}") from None


def adapter_dtype(dtype, allowed, *, name: str = "--dtype"):
    """An adapter output dtype: fp8 is a checkpoint format, never an adapter's."""
    if dtype is None:
        return
    if str(dtype).startswith("fp8"):
        raise BadInput(None, f"{name} {dtype}: fp8 is a checkpoint dtype; adapters take fp32, fp16 or bf16")
    if dtype not in allowed:
        raise BadInput(None, f"unknown {name} {dtype!r}; expected fp32, fp16 or bf16")


def lora_rule(algo, mode, modes, rank, max_rank, param):
    """convert's ``--algo lora`` and its rank rule (``--mode``, ``--rank``, ``--max-rank``, ``--mode-param``),
    for checkpoints' and adapters' options alike."""
    if algo not in (None, "lora"):
        raise BadInput(None, f"unknown --algo {algo!r}; only 'lora' (SVD to plain LoRA) is an algorithm change")
    if mode not in modes:
        raise BadInput(None, f"unknown --mode {mode!r}; expected one of {', '.join(modes)}")
    positive_int("--rank", rank)
    positive_int("--max-rank", max_rank)
    mode_param(mode, param)
