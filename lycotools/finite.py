"""NaN and Inf never reach an output silently.

Ops hand every tensor they are about to write (or every adapter tensor they are about to use) to a
``NonFinite`` tally. By default a NaN or infinite value is bad input: ``BadInput`` naming the file and the
tensor, before anything is published. With ``allow`` (``--allow-nonfinite``) the tensors are written as they
are and ``warn()`` prints one line saying how many and which was first. The check is one ``aminmax`` pass
over a tensor the op has already computed or read, little beside the math.
"""

from __future__ import annotations

import sys

import torch

from .errors import BadInput

HINT = "--allow-nonfinite writes it anyway"


# fp8 has no isfinite kernel: its NaN/Inf are read from the bit patterns (mask, value)
_FP8_NONFINITE = {torch.float8_e4m3fn: (0x7F, 0x7F), torch.float8_e5m2: (0x7C, 0x7C)}


def is_finite(t: torch.Tensor) -> bool:
    """True for a tensor with no NaN or infinite value (and for every non-floating tensor)."""
    if not t.is_floating_point():
        return True
    if t.element_size() == 1:
        mask, value = _FP8_NONFINITE.get(t.dtype, (None, None))
        if mask is None:
            return bool(torch.isfinite(t.float()).all())
        return not bool(((t.view(torch.uint8) & mask) == value).any())
    if t.numel() == 0:
        return True
    # min and max in one pass without a mask tensor (~10x faster than isfinite().all() on big weights):
    # a NaN makes both NaN, an infinity shows as the max or the min, so both are finite iff every value is
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


class NonFinite:
    """Refuses tensors holding NaN/Inf, or (``allow``) counts them for one warning."""

    def __init__(self, allow: bool = False, hint: str = HINT):
        self.allow = allow
        self.hint = hint
        self.found: list[tuple[str | None, str]] = []  # (file, tensor) written with NaN/Inf
        self.inherited: list[str] = []  # tensors that already held NaN/Inf in the input, written as they were

    def check(self, path, where: str, t: torch.Tensor) -> bool:
        """True when ``t`` is finite; else BadInput, or (``allow``) False and the tensor counted."""
        if is_finite(t):
            return True
        if not self.allow:
            raise BadInput(path, f"{where} holds NaN or infinite values", hint=self.hint)
        self.found.append((None if path is None else str(path), where))
        return False

    def check_made(self, path, where, key: str, before: torch.Tensor, after: torch.Tensor) -> None:
        """``after`` is what lycotools made of the input tensor ``before`` (an adapter added, a cast).
        NaN/Inf ``before`` already held are the input's: counted under ``key`` for one warning. New ones
        are lycotools' doing: ``check`` (refused unless ``allow``). ``where`` may be a callable, built
        only when it is needed."""
        if is_finite(after):
            return
        if not is_finite(before):
            self.inherited.append(key)
        else:
            self.check(path, where() if callable(where) else where, after)

    def check_all(self, path, module: str, tensors: dict) -> bool:
        """``check`` for each tensor of a module (``module.suffix`` named in the message); True if all finite."""
        ok = True
        for suffix, t in tensors.items():
            ok &= self.check(path, f"{module}.{suffix}", t)
        return ok

    def warn(self, out=None):
        """One warning line per kind of finding (nothing when there is none)."""
        out = out or sys.stderr
        if self.found:
            path, where = self.found[0]
            print(f"lycotools: warning: {len(self.found)} tensor(s) with NaN or infinite values written as they are "
                  f"(--allow-nonfinite); first: {f'{path}: ' if path else ''}{where}", file=out)
        if self.inherited:
            print(f"lycotools: warning: {len(self.inherited)} tensor(s) already held NaN or infinite values "
                  f"in the input and were written as they were; first: {self.inherited[0]}", file=out)


def check_adapter(af, tally: NonFinite, path=None) -> list[str]:
    """Every parsed module of an ``AdapterFile`` through ``tally``; the names of the modules with NaN/Inf."""
    bad = []
    for lm in af.parsed:
        if not tally.check_all(path or af.path, lm.name, lm.module.tensors):
            bad.append(lm.name)
    return bad
