"""What the tool says is true: inspect's notes and labels, rank-prune's sizes, reported errors, summaries.

Issues #16 (points 2, 4, 5, 6) and #11 (part 6). Every test here failed before its fix.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

FIX = Path(__file__).resolve().parent.parent / "fixtures"
AD = FIX / "adapters"


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "lycotools.cli", *map(str, args)], capture_output=True, text=True)


def _error_lines(stderr: str) -> list[str]:
    return [l for l in stderr.splitlines() if l.startswith("lycotools: error:")]


# ------------------------------------------------------------------------------------------------
# #16.5: reported errors and energies are float64 sums
# ------------------------------------------------------------------------------------------------


def test_relative_error_of_a_30m_element_layer_is_the_float64_value():
    from lycotools.linalg import frobenius2, relative_error

    g = torch.Generator().manual_seed(0)
    M = torch.randn(5120, 5900, generator=g)  # 30.2M elements, an SDXL-sized ff layer
    A = M + 0.3 * torch.randn(M.shape, generator=g)
    num = den = 0.0
    for i in range(0, M.shape[0], 512):  # the float64 reference, a slice at a time
        m = M[i:i + 512].double()
        num += float((m - A[i:i + 512].double()).square().sum())
        den += float(m.square().sum())
    ref = math.sqrt(num / den)
    assert abs(relative_error(M, A) - ref) / ref < 1e-6
    assert abs(frobenius2(M) - den) / den < 1e-9
