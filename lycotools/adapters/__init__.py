"""Adapter algorithms as pure tensor math: parse a module's tensors, rebuild ΔW, merge into W.

``ALGORITHMS`` maps each algorithm name to its module, in LyCORIS's detection order
(docs/adapters.md#detection-order), with PEFT AdaLoRA last. ``boft`` shares the ``oft`` module.
"""

from . import adalora, full, glora, ia3, loha, lokr, lora, norm, oft
from .base import AdapterModule, parse_module

ALGORITHMS = {
    "lora": lora,
    "loha": loha,
    "ia3": ia3,
    "lokr": lokr,
    "full": full,
    "norm": norm,
    "oft": oft,
    "boft": oft,
    "glora": glora,
    "adalora": adalora,
}

__all__ = ["AdapterModule", "parse_module", "ALGORITHMS"]
