"""Extract speed, memory and error: lycotools vs lycoris-lora's extract_linear/extract_conv at rank 32.

Both run in this one process on the same power-law deltas of the real SD1.5 layer shapes (UNet and
text encoder; 1280×1280 attention, 10240×1280 GEGLU, 1280×11520 flattened 3×3 conv, ...). Each
distinct shape is measured once (median of --repeat runs) and weighted by how many SD1.5 layers
have it, so the totals are those of a whole SD1.5 extraction without running the ~700 layers.

    python bench/extract.py            # whole SD1.5 layer set (slow: LyCORIS's full SVDs)
    python bench/extract.py --quick    # four shapes, for a smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, power_law_delta, sd15_layer_shapes, timed  # noqa: E402

from lycotools.linalg import layer_seed, spectrum_for_mode  # noqa: E402
from lycotools.ops import factorize  # noqa: E402


def lycotools_extract(delta, rank):
    M = delta.reshape(delta.shape[0], -1)
    svd, r = spectrum_for_mode(M, "fixed", rank, None, seed=layer_seed(0, str(tuple(delta.shape))))
    f = factorize.lora_from_svd(delta, svd, r)
    up, down = f.tensors["lora_up.weight"], f.tensors["lora_down.weight"]
    return up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)


def lycoris_extract(delta, rank):
    from lycoris.utils import extract_conv, extract_linear

    if delta.dim() == 4:
        res, kind = extract_conv(delta, "fixed", rank, "cpu", is_cp=True)  # is_cp: no full-diff fallback
    else:
        res, kind = extract_linear(delta, "fixed", rank, "cpu")
    if kind == "full":
        return delta.reshape(delta.shape[0], -1)
    down, up, _ = res  # LyCORIS returns (down, up, residual)
    return up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)


def rel_err(delta, approx):
    M = delta.reshape(delta.shape[0], -1)
    return float((M - approx).norm() / M.norm())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3, help="runs per shape for lycotools (median); LyCORIS runs once")
    ap.add_argument("--quick", action="store_true", help="four shapes only")
    args = ap.parse_args()
    shapes = sd15_layer_shapes()
    if args.quick:
        keep = [(320, 320), (1280, 1280), (10240, 1280), (1280, 1280, 3, 3)]
        shapes = {s: shapes[s] for s in keep if s in shapes}
    print(f"machine: {machine()}")
    print(f"{len(shapes)} distinct shapes, {sum(shapes.values())} layers, rank {args.rank}")
    print(f"{'shape':>22} {'n':>4} {'lyco s':>8} {'ours s':>8} {'speedup':>8} {'lyco MB':>8} {'ours MB':>8} {'err ratio':>9}")
    tot_l = tot_o = 0.0
    peak_l = peak_o = 0
    worst_ratio = 0.0
    for i, (shape, n) in enumerate(sorted(shapes.items(), key=lambda kv: -kv[0][0] * (kv[0][1]))):
        delta = power_law_delta(shape, seed=i)
        approx_l, t_l, m_l = timed(lycoris_extract, delta, args.rank)
        runs = [timed(lycotools_extract, delta, args.rank) for _ in range(args.repeat)]
        approx_o = runs[0][0]
        t_o = statistics.median(r[1] for r in runs)
        m_o = max(r[2] for r in runs)
        e_l, e_o = rel_err(delta, approx_l), rel_err(delta, approx_o)
        ratio = e_o / e_l
        worst_ratio = max(worst_ratio, ratio)
        tot_l += n * t_l
        tot_o += n * t_o
        peak_l, peak_o = max(peak_l, m_l), max(peak_o, m_o)
        print(f"{str(shape):>22} {n:>4} {t_l:8.3f} {t_o:8.3f} {t_l / t_o:8.1f} {m_l / 2**20:8.0f} {m_o / 2**20:8.0f} {ratio:9.5f}",
              flush=True)
        del delta, approx_l, approx_o, runs
    print(f"total (weighted by layer count): LyCORIS {tot_l:.1f} s, lycotools {tot_o:.1f} s, speedup {tot_l / tot_o:.1f}x")
    print(f"peak extra RSS per layer: LyCORIS {peak_l / 2**20:.0f} MB, lycotools {peak_o / 2**20:.0f} MB")
    print(f"worst error ratio lycotools/LyCORIS: {worst_ratio:.5f} (target <= 1.01)")


if __name__ == "__main__":
    main()
