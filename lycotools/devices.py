"""The one place a ``--device`` option becomes a torch device, and a ``--dtype`` name a torch dtype."""

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


# --dtype names: adapters and embeddings are stored in these ...
ADAPTER_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# ... checkpoints may also be cast to fp8
CHECKPOINT_DTYPES = {**ADAPTER_DTYPES, "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def cast_to(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` as a contiguous CPU tensor of ``dtype``, ready to write. fp8 saturates to its largest
    finite value: a plain cast turns anything past ±448 (e4m3fn) into NaN, which poisons a model."""
    if dtype in (torch.float8_e4m3fn, torch.float8_e5m2) and t.dtype != dtype:
        fi = torch.finfo(dtype)
        t = t.float().clamp(fi.min, fi.max)
    return t.to("cpu").to(dtype).contiguous()
