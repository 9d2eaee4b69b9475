"""Benchmark of `lycotools merge` (not a timed test).

1. Bake a rank-32 LoCon into an SD1.5-shaped synthetic fp16 checkpoint (real layer shapes, random
   weights, ~2 GB at --scale 1): lycotools' streamed bake vs a whole-model merge (load every tensor
   into a dict, add each ΔW, save_file) vs copying the file. Time and peak RSS, each in its own
   child process (ru_maxrss).
2. LoRA + LoRA at rank 64 on the SD1.5 layer set: lycotools `--method svd` (QR of the stacked
   factors + SVD of the small core, no dense ΔW) vs densify-then-full-SVD, with the largest relative
   difference of the kept singular values.

    python bench/merge.py --quick          # small (--scale 0.125), one run each
    python bench/merge.py                  # full size, 3 runs each, medians
    python bench/merge.py --arch sdxl --skip-svd --skip-whole   # SDXL-sized bake: time and peak RSS

The whole-model baseline is written here from the description in docs/adapters.md#kohya-checkpoint-merge (load all, add,
save); it is not kohya's code.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


# ------------------------------------------------------------------------------------------------
# synthetic inputs
# ------------------------------------------------------------------------------------------------


def scaled_shapes(scale: float, arch: str = "sd1") -> dict[str, tuple]:
    from lycotools.layouts.checkpoint import template_single_shapes

    shapes = template_single_shapes(arch)
    f = max(1, round(1 / scale))

    def sc(d):
        return d // f if f > 1 and d % f == 0 and d >= 64 * f // 8 and d >= 16 else d

    return {k: tuple(sc(int(d)) for d in s) for k, s in shapes.items()}


def make_checkpoint(path: Path, scale: float, seed: int = 0, arch: str = "sd1"):
    from lycotools.io.writer import SafetensorsWriter

    shapes = scaled_shapes(scale, arch)
    g = torch.Generator().manual_seed(seed)
    plan = [(k, torch.float16, s) for k, s in shapes.items()]
    with SafetensorsWriter(path, {"format": "pt"}, plan=plan, hashes=False, overwrite=True) as w:
        for k in w.expected_order:
            w.add(k, (torch.randn(shapes[k], generator=g) * 0.02).to(torch.float16))


def lora_modules(ckpt_path: Path):
    """(kohya name, weight shape) of every layer a LoCon trains: UNet attention/resnet layers, TE attention/MLP."""
    from lycotools.io.readers import open_source
    from lycotools.layouts.adapter_keys import kohya_module_name
    from lycotools.layouts.model_index import ModelIndex

    idx = ModelIndex.from_source(open_source(ckpt_path))
    arch = idx.arch
    out = []
    for comp, mods in idx.modules.items():
        for module, shape in sorted(mods.items()):
            if len(shape) not in (2, 4):
                continue
            if comp == "unet" and not (".attentions." in module or ".resnets." in module):
                continue
            if comp == "unet" and "norm" in module.split(".")[-1]:
                continue
            if comp.startswith("text_encoder") and not (".self_attn." in module or ".mlp." in module):
                continue
            if comp not in ("unet", "text_encoder", "text_encoder_2"):
                continue
            out.append((kohya_module_name(arch, comp, module), tuple(shape)))
    return out


def make_lora(path: Path, modules, rank: int, seed: int, alpha: float | None = None):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in modules:
        out, K = shape[0], 1
        for d in shape[1:]:
            K *= d
        r = min(rank, out, K)
        conv = len(shape) == 4
        down = torch.randn((r, *shape[1:]) if conv else (r, shape[1]), generator=g) / K ** 0.5
        up = torch.randn((out, r, 1, 1) if conv else (out, r), generator=g) * 0.01
        sd[f"{name}.lora_down.weight"] = down.to(torch.float16)
        sd[f"{name}.lora_up.weight"] = up.to(torch.float16)
        sd[f"{name}.alpha"] = torch.tensor(float(alpha if alpha is not None else r / 2))
    save_file(sd, str(path), {"ss_network_module": "networks.lora"})


# ------------------------------------------------------------------------------------------------
# the measured tasks (each runs in a child process)
# ------------------------------------------------------------------------------------------------


def task_copy(a):
    """Copy the file and fsync it: lycotools' writer fsyncs before its atomic rename, so the baseline does too."""
    shutil.copyfile(a.ckpt, a.out)
    fd = os.open(a.out, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def task_index(a):
    """The fixed start-up cost inside a bake: reading the header and building the key map (diffusers' converters)."""
    from lycotools.io.readers import open_source
    from lycotools.layouts.model_index import ModelIndex

    ModelIndex.from_source(open_source(a.ckpt))


def task_lycotools_bake(a):
    from lycotools.ops.merge import BakeOptions, bake

    bake(a.ckpt, [(a.lora, 1.0)], Path(a.out), BakeOptions(no_date=True), overwrite=True, quiet=True)


def task_whole_model(a):
    """Load every tensor, add each ΔW in fp32, cast back, save the dict."""
    from safetensors.torch import load_file, save_file

    from lycotools.io.readers import open_source
    from lycotools.layouts.model_index import ModelIndex
    from lycotools.adapter_file import AdapterFile

    sd = load_file(a.ckpt)  # the whole model in RAM
    lora = load_file(a.lora)
    idx = ModelIndex.from_source(open_source(a.ckpt))
    af = AdapterFile.open(a.lora).resolve(idx)
    for lm in af.parsed:
        km = idx.single_key(lm.target)
        W = sd[km.single_key]
        up = lora[f"{lm.name}.lora_up.weight"].float()
        down = lora[f"{lm.name}.lora_down.weight"].float()
        r = down.shape[0]
        scale = float(lora[f"{lm.name}.alpha"]) / r
        d = (up.reshape(up.shape[0], r) @ down.reshape(r, -1)).reshape(W.shape) * scale
        sd[km.single_key] = (W.float() + d).to(W.dtype)
    save_file(sd, a.out)


def task_lycotools_svd(a):
    from lycotools.ops.merge import AdapterMergeOptions, merge_adapters

    merge_adapters([(a.lora, 1.0), (a.lora2, 1.0)], Path(a.out),
                   AdapterMergeOptions(method="svd", rank=64, dtype="fp32", no_date=True), overwrite=True, quiet=True)


def dense_sum(name: str, loras, dtype) -> torch.Tensor:
    """Σ (alpha/r)·up@down of one module over several LoRA state dicts, as a dense matrix."""
    M = None
    for l in loras:
        up, down = l[f"{name}.lora_up.weight"].to(dtype), l[f"{name}.lora_down.weight"].to(dtype)
        r = down.shape[0]
        d = (up.reshape(up.shape[0], r) @ down.reshape(r, -1)) * (float(l[f"{name}.alpha"]) / r)
        M = d if M is None else M + d
    return M


def task_dense_svd(a):
    """Densify each module's Σ ΔW, full SVD, keep rank 64, save."""
    from safetensors.torch import load_file, save_file

    l1, l2 = load_file(a.lora), load_file(a.lora2)
    out = {}
    for k in l1:
        if not k.endswith(".lora_down.weight"):
            continue
        name = k[: -len(".lora_down.weight")]
        M = dense_sum(name, (l1, l2), torch.float32)
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        k64 = min(64, S.numel())
        out[f"{name}.lora_up.weight"] = (U[:, :k64] * S[:k64]).contiguous()
        out[f"{name}.lora_down.weight"] = Vh[:k64].contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(k64))
    save_file(out, a.out)


TASKS = {
    "copy": task_copy, "index": task_index, "lycotools-bake": task_lycotools_bake, "whole-model": task_whole_model,
    "lycotools-svd": task_lycotools_svd, "dense-svd": task_dense_svd,
}


def child(a):
    torch.set_num_threads(a.threads)
    if a.task.startswith("lycotools"):  # what the CLI does at start
        from lycotools.alloc import tune_allocator

        tune_allocator()
    t0 = time.perf_counter()
    TASKS[a.task](a)
    dt = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux reports KiB)
    print(json.dumps({"time": dt, "rss": rss}))


def run_child(task, args, **paths):
    cmd = [sys.executable, __file__, "--child", task, "--threads", str(args.threads)]
    for k, v in paths.items():
        cmd += [f"--{k}", str(v)]
    if "out" in paths and Path(paths["out"]).exists():
        # a run that replaces the last one's output would pay for freeing its page cache (2 GB after
        # a copy, nothing after an O_DIRECT bake): every run starts without an output instead
        Path(paths["out"]).unlink()
    os.sync()  # the previous run's dirty pages are written back now, not during this one
    res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if res.returncode != 0:
        raise SystemExit(f"{task} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def measure(task, args, repeats, **paths):
    runs = [run_child(task, args, **paths) for _ in range(repeats)]
    return statistics.median(r["time"] for r in runs), statistics.median(r["rss"] for r in runs)


def singular_value_check(lora_out, lora1, lora2) -> float:
    """Largest relative difference between the kept singular values of lycotools' output and of the dense sum."""
    from safetensors.torch import load_file

    o, l1, l2 = load_file(lora_out), load_file(lora1), load_file(lora2)
    worst = 0.0
    for k in o:
        if not k.endswith(".lora_down.weight"):
            continue
        name = k[: -len(".lora_down.weight")]
        M = dense_sum(name, (l1, l2), torch.float64)
        S_ref = torch.linalg.svdvals(M)
        up, down = o[f"{name}.lora_up.weight"].double(), o[k].double()
        r = down.shape[0]
        S_got = torch.linalg.svdvals(up.reshape(up.shape[0], r) @ down.reshape(r, -1) * (float(o[f"{name}.alpha"]) / r))
        n = min(r, 64)
        rel = ((S_got[:n] - S_ref[:n]).abs() / S_ref[:n].clamp(min=1e-30)).max()
        worst = max(worst, float(rel))
    return worst


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small model (--scale 0.125), one run each")
    ap.add_argument("--scale", type=float, default=None, help="channel-width scale (1 = SD1.5, ~2 GB fp16)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1))
    ap.add_argument("--workdir", default=None, help="where the synthetic files go (default: a temp folder)")
    ap.add_argument("--skip-svd", action="store_true", help="only the bake rows")
    ap.add_argument("--arch", default="sd1", choices=["sd1", "sdxl"], help="layer shapes (sdxl: ~6.5 GB fp16)")
    ap.add_argument("--skip-whole", action="store_true", help="no whole-model baseline (it needs the model in RAM)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    for k in ("ckpt", "lora", "lora2", "out"):
        ap.add_argument(f"--{k}", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        a.task = a.child
        return child(a)
    scale = a.scale if a.scale is not None else (0.125 if a.quick else 1.0)
    repeats = a.repeats or (1 if a.quick else 3)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="lycotools-bench-merge-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        ck = work / ("sd15.safetensors" if a.arch == "sd1" else f"{a.arch}.safetensors")
        lora, lora2 = work / f"locon32_{a.arch}.safetensors", work / f"lora32b_{a.arch}.safetensors"
        t0 = time.perf_counter()
        make_checkpoint(ck, scale, arch=a.arch)
        mods = lora_modules(ck)
        make_lora(lora, mods, 32, seed=1)
        make_lora(lora2, mods, 32, seed=2, alpha=32)
        size = ck.stat().st_size
        print(f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {a.threads}; "
              f"{a.arch} scale {scale}: checkpoint {size / 2**20:.0f} MiB, {len(mods)} LoCon modules (made in "
              f"{time.perf_counter() - t0:.1f}s); medians of {repeats} run(s)")
        rows = []
        out = work / "out.safetensors"
        # copy and bake alternate, so both see the same state of the disk and page cache (on a VM the
        # write-back speed drifts by 2-4x over minutes); the ratio is the median of the pairs' ratios
        pairs = [(run_child("copy", a, ckpt=ck, out=out), run_child("lycotools-bake", a, ckpt=ck, lora=lora, out=out))
                 for _ in range(repeats)]
        c_t, c_r = (statistics.median(p[0][k] for p in pairs) for k in ("time", "rss"))
        l_t, l_r = (statistics.median(p[1][k] for p in pairs) for k in ("time", "rss"))
        ratio = statistics.median(p[1]["time"] / p[0]["time"] for p in pairs)
        i_t, _ = measure("index", a, repeats, ckpt=ck)
        rows.append(("bake: copy file", c_t, c_r, ""))
        if a.skip_whole:
            rows.append(("bake: lycotools (streamed)", l_t, l_r, f"time {ratio:.2f}x copy"))
        else:
            w_t, w_r = measure("whole-model", a, repeats, ckpt=ck, lora=lora, out=work / "whole.safetensors")
            # the two bakes agree
            from safetensors import safe_open

            diff = 0.0
            with safe_open(str(out), "pt") as f1, safe_open(str(work / "whole.safetensors"), "pt") as f2:
                for k in f1.keys():
                    diff = max(diff, float((f1.get_tensor(k).float() - f2.get_tensor(k).float()).abs().max()))
            rows.append(("bake: lycotools (streamed)", l_t, l_r, f"time {ratio:.2f}x copy; RSS {l_r / w_r:.2f}x whole-model"))
        rows.append(("  of which key-map build (fixed)", i_t, float("nan"),
                     f"without it: {(l_t - i_t) / c_t:.2f}x copy" if l_t > i_t else "(noisy run: longer than the bake)"))
        if not a.skip_whole:
            rows.append(("bake: whole-model load/add/save", w_t, w_r, f"time {w_t / c_t:.2f}x copy; max |diff| vs lycotools {diff:.2g}"))
        if not a.skip_svd:
            s_t, s_r = measure("lycotools-svd", a, repeats, lora=lora, lora2=lora2, out=work / "svd.safetensors")
            d_t, d_r = measure("dense-svd", a, repeats, lora=lora, lora2=lora2, out=work / "dense.safetensors")
            sv = singular_value_check(work / "svd.safetensors", lora, lora2)
            rows.append(("lora+lora svd r64: lycotools (QR core)", s_t, s_r, f"{d_t / s_t:.1f}x faster; max rel S diff {sv:.2g}"))
            rows.append(("lora+lora svd r64: densify + full SVD", d_t, d_r, ""))
        w = max(len(r[0]) for r in rows)
        print(f"{'task':<{w}}  {'time s':>8}  {'peak RSS MiB':>12}  note")
        for name, t, r, note in rows:
            print(f"{name:<{w}}  {t:>8.2f}  {r:>12.0f}  {note}")
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
