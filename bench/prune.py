"""rank-prune speed and agreement: kohya resize_lora's method vs lycotools' QR-core SVD.

An SD1.5-layer-shaped rank-64 LoRA (every layer kohya's LoRA targets: UNet transformer blocks'
attention / feed-forward / proj_in / proj_out and the text encoder's attention and MLP, with their
real shapes; random factors) is resized to rank 32 both ways, in this one process:

* kohya's method, reimplemented from docs/adapters.md#kohya-lora-resize (not copied): M = up @ down, the full
  ``torch.linalg.svd(M)`` (full_matrices=True, its default), new up = U_k·S_k, down = Vh_k;
* lycotools: ``svd_of_product(up·scale, down)``: QR of both factors and the SVD of the 64×64 core.

Prints per-method time, the ratio, and the largest relative difference of the kept singular values.

    python bench/prune.py --threads 1            # all 264 layers (kohya's side takes a while)
    python bench/prune.py --quick --threads 1    # 8 layers, for a smoke run
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

from lycotools.linalg import svd_of_product  # noqa: E402

TARGET = (
    r"attentions\.\d+\.(proj_in|proj_out|transformer_blocks\.\d+\.(attn\d\.to_(q|k|v|out\.0)|ff\.net\.(0\.proj|2)))$",
    r"(self_attn\.(q|k|v|out)_proj|mlp\.fc\d)$",
)


def sd15_lora_shapes() -> list[tuple]:
    from lycotools.layouts.checkpoint import template_shapes

    out = []
    for comp, shapes in template_shapes("sd1").items():
        if comp not in ("unet", "text_encoder"):
            continue
        pat = TARGET[0] if comp == "unet" else TARGET[1]
        for key, shp in shapes.items():
            if key.endswith(".weight") and re.search(pat, key[: -len(".weight")]) and len(shp) in (2, 4):
                out.append(tuple(shp))
    return out


def make_lora(shapes, rank: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    layers = []
    for shp in shapes:
        out_f, in_f = shp[0], shp[1] * (shp[2] * shp[3] if len(shp) == 4 else 1)
        up = torch.randn(out_f, rank, generator=g) * 0.02
        down = torch.randn(rank, in_f, generator=g) / in_f ** 0.5
        layers.append((up, down, float(rank // 2)))  # alpha = rank/2
    return layers


def kohya_resize(up, down, alpha, new_rank):
    scale = alpha / down.shape[0]
    M = up @ down
    U, S, Vh = torch.linalg.svd(M)  # full_matrices=True, as resize_lora calls it
    new_up = U[:, :new_rank] * S[:new_rank]
    new_down = Vh[:new_rank]
    return new_up, new_down, scale * new_rank, S[:new_rank]


def lycotools_resize(up, down, alpha, new_rank):
    scale = alpha / down.shape[0]
    s = svd_of_product(up * scale, down)
    new_up = s.U[:, :new_rank] * s.S[:new_rank]
    return new_up, s.Vh[:new_rank], float(new_rank), s.S[:new_rank]


def run_interleaved(layers, new_rank, repeat):
    """Both methods layer by layer (kohya once, lycotools ``repeat`` times, median), so that load from
    other processes on a shared machine hits both sides alike."""
    t_k = t_l = 0.0
    s_k, s_l = [], []
    for up, down, a in layers:
        t = time.perf_counter()
        s_k.append(kohya_resize(up, down, a, new_rank)[3])
        t_k += time.perf_counter() - t
        ts = []
        for _ in range(repeat):
            t = time.perf_counter()
            s = lycotools_resize(up, down, a, new_rank)[3]
            ts.append(time.perf_counter() - t)
        s_l.append(s)
        t_l += statistics.median(ts)
    return t_k, t_l, s_k, s_l


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="8 layers")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--new-rank", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3, help="runs of the lycotools side (median reported)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads for both sides (default: torch's); on a busy shared machine 1 gives "
                         "stable numbers, as OpenMP spin-waits make tiny multi-threaded QRs erratic")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = sd15_lora_shapes()
    if args.quick:
        step = max(1, len(shapes) // 8)
        shapes = shapes[::step][:8]
    layers = make_lora(shapes, args.rank)
    print(f"machine: {machine()}")
    print(f"{len(layers)} SD1.5 LoRA layers, rank {args.rank} -> {args.new_rank}")
    lycotools_resize(*layers[0], args.new_rank)  # warm-up (first LAPACK calls)
    t_k, t_l, s_k, s_l = run_interleaved(layers, args.new_rank, args.repeat)
    # kohya keeps S of up@down (scale not applied); lycotools' S include the scale alpha/r: compare like for like
    rel_scaled = max(float(((a * (layers[i][2] / args.rank) - b).abs() / b.abs().clamp_min(1e-30)).max())
                     for i, (a, b) in enumerate(zip(s_k, s_l)))
    print(f"kohya (dense up@down + full SVD): {t_k:8.3f} s")
    print(f"lycotools (QR core SVD):          {t_l:8.3f} s  (per layer median of {args.repeat})")
    print(f"speed-up: {t_k / t_l:.1f}x")
    print(f"max relative difference of the kept singular values (same scale): {rel_scaled:.2e}")
    return 0 if rel_scaled < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
