"""End-to-end extract on an SD1.5-sized (or SDXL-sized) pair on disk: wall time and peak RSS.

Writes a synthetic fp16 single-file checkpoint with every real SD1.5/SDXL key and shape (random
weights) and a tuned copy whose UNet/TE linear and conv layers carry a random rank-16 delta, then
runs `lycotools extract --rank 32` in a child process and reads its peak resident memory.
Target (issue 3): SD1.5 pair under 1.5 GB peak RSS, SDXL under 3 GB.

    python bench/extract_e2e.py --arch sd1 --dir /tmp/lycobench
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

from lycotools.io.writer import SafetensorsWriter  # noqa: E402
from lycotools.layouts import checkpoint as ckpt  # noqa: E402


def write_pair(arch: str, folder: Path, delta_rank: int = 16):
    shapes = ckpt.template_single_shapes(arch)
    keymap = ckpt.CheckpointKeyMap.from_single_file(shapes, arch)
    changed = set()
    for m in keymap.mappings:
        shp = shapes[m.single_key]
        if m.component in ("unet", "text_encoder", "text_encoder_2") and m.single_key.endswith(".weight") \
                and len(shp) in (2, 4) and "embedding" not in m.single_key and m.transform is None:
            changed.add(m.single_key)
    base, tuned = folder / f"{arch}_base.safetensors", folder / f"{arch}_tuned.safetensors"
    g = torch.Generator().manual_seed(0)
    plan = [(k, torch.float16, tuple(s)) for k, s in shapes.items()]
    with SafetensorsWriter(base, {}, plan=plan, overwrite=True, hashes=False) as wb, \
            SafetensorsWriter(tuned, {}, plan=plan, overwrite=True, hashes=False) as wt:
        for k in wb.expected_order:
            shp = shapes[k]
            w = (torch.randn(shp, generator=g) * 0.02).half()
            wb.add(k, w)
            if k in changed:
                out = shp[0]
                n = 1
                for s in shp[1:]:
                    n *= s
                d = (torch.randn(out, delta_rank, generator=g) @ torch.randn(delta_rank, n, generator=g)) * 1e-3
                w = (w.float() + d.reshape(shp)).half()
            wt.add(k, w)
    return base, tuned


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="sd1", choices=["sd1", "sdxl"])
    ap.add_argument("--dir", default="/tmp/lycobench")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--keep", action="store_true", help="reuse the pair if it exists")
    args = ap.parse_args()
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    base, tuned = folder / f"{args.arch}_base.safetensors", folder / f"{args.arch}_tuned.safetensors"
    if not (args.keep and base.exists() and tuned.exists()):
        t = time.perf_counter()
        write_pair(args.arch, folder)
        print(f"wrote the pair in {time.perf_counter() - t:.0f} s ({base.stat().st_size / 2**30:.2f} GiB each)")
    out = folder / f"{args.arch}_extracted.safetensors"
    cmd = [sys.executable, "-m", "lycotools.cli", "extract", str(base), str(tuned), "-o", str(out),
           "--rank", str(args.rank), "--overwrite", "-q", "--no-date"]
    t = time.perf_counter()
    r = subprocess.run(cmd)
    wall = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB -> MiB
    print(f"machine: {machine()}")
    print(f"{args.arch}: extract --rank {args.rank}: exit {r.returncode}, {wall:.0f} s, peak RSS {peak:.0f} MiB, "
          f"output {out.stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
