"""The one place a ``--device`` option becomes a torch device."""

from __future__ import annotations

import torch

from .errors import BadInput


def device_of(name: str) -> torch.device:
    """``--device cpu|cuda[:N]``; asking for CUDA without one is bad input (exit 2), not a crash."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BadInput(None, "--device cuda was asked for but no CUDA device is available", hint="use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise BadInput(None, f"unknown --device {name!r}: {e}") from None
