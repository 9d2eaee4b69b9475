"""End-to-end `extract --algo loha --rank 8` on an SD1.5-shaped fp16 pair (issue 17): wall time, peak RSS,
and each layer's LoHa error against the rank-8 LoRA it starts from.

The pair is bench/extract_e2e.py's: every real SD1.5 key and shape, random fp16 weights, and a random
rank-16 ΔW (`--delta-rank`) on every UNet/TE Linear and conv. The extract runs in a child process
(`lycotools extract ... --report`), and the per-layer errors come from its report. Target: ≤ 5 min.

    python bench/loha_e2e.py --dir /tmp/lycobench            # whole SD1.5 pair
    python bench/loha_e2e.py --dir /tmp/lycobench --keep     # reuse the pair written before
    python bench/loha_e2e.py --layers 40                      # only 40 layers changed; the time is extrapolated

With ``--layers N`` only every k-th changed layer differs in the tuned file (the others are skipped
as unchanged after being read); the printed whole-model estimate scales the LoHa part of the time
by the element count of all layers over that of the N measured ones, and says so.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402
from extract_e2e import write_pair  # noqa: E402

from lycotools.io.readers import open_source  # noqa: E402
from lycotools.io.writer import SafetensorsWriter  # noqa: E402

NOTE = re.compile(r"error ([0-9.e+-]+) \(rank-\d+ LoRA start\) -> ([0-9.e+-]+) \((?:kept the LoRA after )?(\d+) ALS")


def subset_tuned(base: Path, tuned: Path, out: Path, n: int) -> int:
    """A tuned file equal to ``base`` except on n changed layers spread evenly over the changed ones."""
    sb, st = open_source(base), open_source(tuned)
    keys = list(sb.keys())
    changed = [k for k in keys if k.endswith(".weight") and len(sb.shape(k)) in (2, 4)
               and not torch.equal(sb.get(k), st.get(k))]
    step = max(1, len(changed) // n)
    keep = set(changed[::step][:n])
    plan = [(k, sb.dtype(k), tuple(sb.shape(k))) for k in keys]
    with SafetensorsWriter(out, {}, plan=plan, overwrite=True, hashes=False) as w:
        for k in w.expected_order:
            w.add(k, (st if k in keep else sb).get(k))
    return len(keep)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/lycobench")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--delta-rank", type=int, default=16)
    ap.add_argument("--layers", type=int, default=0, help="only this many changed layers (time extrapolated)")
    ap.add_argument("--keep", action="store_true", help="reuse the pair if it exists")
    args = ap.parse_args()
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    base, tuned = folder / "sd1_base.safetensors", folder / "sd1_tuned.safetensors"
    if not (args.keep and base.exists() and tuned.exists()):
        t = time.perf_counter()
        write_pair("sd1", folder, delta_rank=args.delta_rank)
        print(f"wrote the pair in {time.perf_counter() - t:.0f} s ({base.stat().st_size / 2**30:.2f} GiB each)")
    if args.layers:
        sub = folder / f"sd1_tuned_{args.layers}.safetensors"
        if not (args.keep and sub.exists()):
            subset_tuned(base, tuned, sub, args.layers)
        tuned = sub
    out, report = folder / "sd1_loha.safetensors", folder / "sd1_loha_report.json"
    cmd = [sys.executable, "-m", "lycotools.cli", "extract", str(base), str(tuned), "-o", str(out), "--algo", "loha",
           "--rank", str(args.rank), "--overwrite", "-q", "--no-date", "--report", str(report)]
    t = time.perf_counter()
    r = subprocess.run(cmd)
    wall = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB -> MiB
    layers = json.loads(report.read_text())["layers"]
    rows = []
    for l in layers:
        m = NOTE.search(l.get("note") or "")
        if m:
            rows.append((l["name"], tuple(l["shape"]), float(m[1]), float(m[2]), int(m[3])))
    print(f"machine: {machine()}")
    print(f"sd1 pair, rank-{args.delta_rank} ΔW per layer: extract --algo loha --rank {args.rank}: exit {r.returncode}, "
          f"{wall:.0f} s wall, peak RSS {peak:.0f} MiB, output {out.stat().st_size / 2**20:.1f} MiB, {len(rows)} LoHa layers")
    ratios = [b / a for _, _, a, b, _ in rows if a > 0]
    print(f"LoHa error / rank-{args.rank} LoRA error per layer: median {statistics.median(ratios):.4f}, "
          f"best {min(ratios):.4f}, worst {max(ratios):.4f} (never above 1 by construction); "
          f"ALS sweeps median {statistics.median(s for *_, s in rows):.0f}, max {max(s for *_, s in rows)}")
    by_shape: dict = {}
    for _, shp, a, b, s in rows:
        by_shape.setdefault(shp, []).append((a, b, s))
    print(f"{'shape':>22} {'n':>4} {'LoRA err':>9} {'LoHa err':>9} {'sweeps':>6}")
    for shp, v in sorted(by_shape.items(), key=lambda kv: -math.prod(kv[0])):
        print(f"{str(shp):>22} {len(v):4d} {statistics.median(a for a, _, _ in v):9.4f} "
              f"{statistics.median(b for _, b, _ in v):9.4f} {statistics.median(s for *_, s in v):6.0f}")
    if args.layers:
        from common import sd15_layer_shapes

        every = sum(math.prod(s) * k for s, k in sd15_layer_shapes().items())
        measured = sum(math.prod(shp) for _, shp, *_ in rows)
        print(f"subset of {len(rows)} layers: {measured / 1e6:.0f}M of {every / 1e6:.0f}M elements; whole-model "
              f"estimate (EXTRAPOLATED, all of the wall time scaled by elements): {wall * every / measured:.0f} s")


if __name__ == "__main__":
    main()
