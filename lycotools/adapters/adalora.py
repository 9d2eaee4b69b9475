"""PEFT AdaLoRA (docs/adapters.md#adalora): ``lora_A`` (k, in), ``lora_B`` (out, k), ``lora_E`` (k, 1).

    ΔW = lora_alpha / init_r · B @ (A ⊙ E)

``lora_alpha`` and ``init_r`` live in adapter_config.json and come in ``extra``. PEFT keeps
``ranknum = init_r`` after pruning (and divides by ``ranknum + 1e-5``, a relative 1e-5/init_r that is
ignored here). A missing ``init_r`` falls back to the stored rank k.
"""

from __future__ import annotations

import torch

from .base import f32, need, reshape_to

ALGO = "adalora"
SUFFIXES = ("lora_A", "lora_B", "lora_E")


def detect(suffixes: set) -> bool:
    return "lora_E" in suffixes


def rank(t) -> int:
    return int(t["lora_A"].shape[0])


def validate(t, extra=None) -> None:
    need(t, *SUFFIXES)
    a, b, e = t["lora_A"], t["lora_B"], t["lora_E"]
    k = a.shape[0]
    if b.dim() < 2 or b.shape[1] != k or e.numel() != k:
        raise ValueError(f"lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)}, lora_E {tuple(e.shape)} disagree")
    if extra is None or "lora_alpha" not in extra:
        raise ValueError("AdaLoRA needs extra['lora_alpha'] (and 'init_r') from adapter_config.json")
    if (extra.get("init_r") or 0) < 0:
        raise ValueError(f"init_r {extra['init_r']} in adapter_config.json is negative")


def scale(t, extra) -> float:
    init_r = extra.get("init_r") or rank(t) or 1  # rank 0 (pruned to nothing): ΔW is zero whatever the scale
    return float(extra["lora_alpha"]) / float(init_r)


def weight_shape_hint(t) -> tuple:
    return (t["lora_B"].shape[0], *t["lora_A"].shape[1:])


def delta(t, scale: float, weight_shape=None, base_weight=None) -> torch.Tensor:
    A, B = t["lora_A"], t["lora_B"]
    # every triplet may have been pruned (rank 0): then ΔW is zero
    a = f32(A).reshape(A.shape[0], *A.shape[1:]).flatten(1) * f32(t["lora_E"]).reshape(-1, 1)
    d = (f32(B).reshape(B.shape[0], -1) @ a).reshape(t["lora_B"].shape[0], *t["lora_A"].shape[1:])
    return reshape_to(d * scale, weight_shape)


def to_tensors(A, B, E) -> dict[str, torch.Tensor]:
    return {"lora_A": A, "lora_B": B, "lora_E": E}
