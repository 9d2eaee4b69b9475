"""Shared bench helpers: SD1.5 layer shapes, power-law deltas, timing and peak-RSS measurement."""

from __future__ import annotations

import os
import platform
import threading
import time
from collections import Counter

import torch


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {cpu}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def sd15_layer_shapes(parts=("unet", "text_encoder")) -> Counter:
    """Shapes (as the flattened matrix (out, in·k·k) plus the kernel) of every Linear/Conv weight of
    SD1.5 that extract touches, with how many layers have each shape."""
    from lycotools.layouts.checkpoint import template_shapes

    shapes = template_shapes("sd1")
    c: Counter = Counter()
    for comp in parts:
        for key, shp in shapes[comp].items():
            if not key.endswith(".weight") or "embeddings." in key:
                continue
            if len(shp) in (2, 4):
                c[tuple(shp)] += 1
    return c


def power_law_delta(shape, seed: int = 0, exponent: float = 1.0, scale: float = 1e-2) -> torch.Tensor:
    """A ΔW with singular values ∝ i^-exponent and random singular vectors (what fine-tunes look like)."""
    g = torch.Generator().manual_seed(seed)
    m = shape[0]
    n = 1
    for s in shape[1:]:
        n *= s
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g))
    S = torch.arange(1, k + 1, dtype=torch.float32).pow(-exponent) * scale
    return ((U * S) @ V.T).reshape(shape).contiguous()


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every 5 ms in a thread."""

    def __init__(self):
        import psutil

        self.proc = psutil.Process()
        self.peak = 0
        self._stop = False

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, self.proc.memory_info().rss - self.base)
            time.sleep(0.005)

    def __enter__(self):
        self.base = self.proc.memory_info().rss
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()
        return self

    def __exit__(self, *exc):
        self._stop = True
        self.t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss - self.base)


def timed(fn, *args, **kw):
    with PeakRSS() as mem:
        t = time.perf_counter()
        out = fn(*args, **kw)
        dt = time.perf_counter() - t
    return out, dt, mem.peak
