"""``inspect`` of a large folder of adapters, end to end as a user runs it.

Writes N rank-R kohya LoRA files with the real SD1.5 module set and shapes (UNet attention, feed-forward,
projections and ResNet convs, text-encoder layers: ~260-350 modules each), then times
``lycotools inspect DIR -j J --json`` as a subprocess (median of runs), with peak RSS, and the same
folder read by ``safetensors.safe_open`` metadata-only in one process as the floor (header parsing).

    python bench/inspect_e2e.py --files 1000 --rank 1 --jobs 2
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402


def module_set(conv: bool = True) -> dict[str, tuple]:
    """kohya module name -> weight shape for SD1.5's UNet and text encoder."""
    from lycotools.layouts.adapter_keys import kohya_module_name
    from lycotools.layouts.checkpoint import template_shapes

    shapes = template_shapes("sd1")
    out = {}
    for comp in ("unet", "text_encoder"):
        for key, shp in shapes[comp].items():
            if not key.endswith(".weight") or "embeddings." in key or "norm" in key or len(shp) not in (2, 4):
                continue
            if len(shp) == 4 and (not conv or "time_emb" in key):
                continue
            if comp == "unet" and not any(w in key for w in ("attentions", "resnets", "proj_")):
                continue
            if comp == "text_encoder" and not any(w in key for w in ("self_attn", "mlp")):
                continue
            out[kohya_module_name("sd1", comp, key[: -len(".weight")])] = tuple(shp)
    return out


def write_files(folder: Path, n: int, rank: int) -> int:
    mods = module_set()
    g = torch.Generator().manual_seed(0)
    base = {}
    for name, shp in mods.items():
        k = shp[2:] if len(shp) == 4 else ()
        base[f"{name}.lora_down.weight"] = torch.randn(rank, shp[1], *k, generator=g).half()
        base[f"{name}.lora_up.weight"] = torch.randn(shp[0], rank, *([1, 1] if k else []), generator=g).half()
        base[f"{name}.alpha"] = torch.tensor(float(rank)).half()
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(rank)}
    for i in range(n):
        save_file(base, str(folder / f"lora_{i:04d}.safetensors"), meta)
    return len(mods)


def run(cmd: list[str]) -> tuple[float, float, float]:
    """(wall s, peak RSS MiB, CPU s of the command and its workers: on a shared machine the CPU time
    says what the command costs when other processes take cores from it)."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    wall = time.perf_counter() - t
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
    return wall, max(r1.ru_maxrss, r0.ru_maxrss) / 1024, cpu


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--rank", type=int, default=1)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    print(machine())
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        t = time.perf_counter()
        mods = write_files(folder, a.files, a.rank)
        size = sum(p.stat().st_size for p in folder.iterdir())
        print(f"{a.files} files x {mods} modules, rank {a.rank}: {size / 2**20:.0f} MiB, written in {time.perf_counter() - t:.1f} s")
        floor_code = ("import sys, pathlib\nfrom safetensors import safe_open\n"
                      "for p in sorted(pathlib.Path(sys.argv[1]).iterdir()):\n"
                      "    with safe_open(str(p), 'pt') as f: f.metadata(); list(f.keys())\n")
        floor = statistics.median(run([sys.executable, "-c", floor_code, str(folder)])[0] for _ in range(a.runs))
        print(f"floor: safetensors.safe_open of every header in one process: {floor:.2f} s")
        exe = [sys.executable, "-m", "lycotools", "inspect", str(folder), "--json", "-j", str(a.jobs)]
        walls, cpus, peak = [], [], 0.0
        for _ in range(a.runs):
            w, p, c = run(exe)
            walls.append(w)
            cpus.append(c)
            peak = max(peak, p)
        w = statistics.median(walls)
        print(f"lycotools inspect DIR --json -j {a.jobs}: {w:.2f} s (median of {a.runs}: {', '.join(f'{x:.1f}' for x in walls)}; "
              f"{1000 * w / a.files:.1f} ms/file), CPU {statistics.median(cpus):.1f} s, peak RSS {peak:.0f} MiB; "
              f"{w / floor:.1f}x the header floor; target <= 20 s for 1000 files")
        print(f"load average after: {os.getloadavg()[0]:.1f} (other processes share the cores)")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
