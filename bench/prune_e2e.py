"""End-to-end ``rank-prune`` of an SD1.5-shaped kohya LoCon, as a user runs it: wall time and peak RSS.

Writes (seeded) a rank-32 fp16 kohya LoCon with the real SD1.5 module set and shapes: every module
kohya's LoCon (``networks.lora`` with ``conv_dim``) targets: the UNet transformer blocks' attention,
feed-forward, proj_in/proj_out, the resnets' 3x3 conv1/conv2, 1x1 conv_shortcut and time_emb_proj,
the down/upsamplers' 3x3 convs, and the text encoder's attention and MLP; alpha 16, random factors.
Then runs ``lycotools rank-prune IN -o OUT --rank 16`` and ``--budget 0.5`` as child processes
(median wall time of ``--repeat`` runs, each child's own peak RSS from ``wait4``), and the peer:
kohya's resize method (dense up@down + full SVD per layer, ``bench/prune.py``'s ``kohya_resize``)
on the same file, also as a child process that reads the file and writes the result. Last, an
in-process breakdown of one ``--rank 16`` run: start-up (import), reading + per-module math,
choosing ranks, writing.

    python bench/prune_e2e.py                   # all of it
    python bench/prune_e2e.py --no-peer         # skip kohya's method (minutes on 2 cores)
    python bench/prune_e2e.py --profile /tmp/p.prof   # also cProfile one in-process --rank 16 run
    python bench/prune_e2e.py --compare-with /tmp/old  # also an older tree (/tmp/old/lycotools), alternated
    python bench/prune_e2e.py --busy 1          # the lycotools runs again with 1 CPU-bound process beside them

``--compare-with`` runs the children with PYTHONPATH=DIR (and a working folder outside the repository),
so ``git archive OLD_COMMIT lycotools | tar -x -C /tmp/old`` measures that commit in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import machine  # noqa: E402

UNET_LOCON = (r"attentions\.\d+\.(proj_in|proj_out|transformer_blocks\.\d+\.(attn\d\.to_(q|k|v|out\.0)|ff\.net\.(0\.proj|2)))$"
              r"|resnets\.\d+\.(conv1|conv2|conv_shortcut|time_emb_proj)$|(down|up)samplers\.0\.conv$")
TE = r"(self_attn\.(q|k|v|out)_proj|mlp\.fc\d)$"


def sd15_locon_modules() -> list[tuple[str, tuple]]:
    """(kohya module name, weight shape) of every module an SD1.5 kohya LoCon holds."""
    from lycotools.layouts.adapter_keys import kohya_module_name
    from lycotools.layouts.checkpoint import template_shapes

    out = []
    for comp, shapes in template_shapes("sd1").items():
        if comp not in ("unet", "text_encoder"):
            continue
        pat = UNET_LOCON if comp == "unet" else TE
        for key, shp in shapes.items():
            mod = key[: -len(".weight")]
            if key.endswith(".weight") and len(shp) in (2, 4) and re.search(pat, mod):
                out.append((kohya_module_name("sd1", comp, mod), tuple(shp)))
    return out


def write_locon(path: Path, rank: int = 32, seed: int = 0):
    from lycotools.io.writer import SafetensorsWriter

    g = torch.Generator().manual_seed(seed)
    mods = sd15_locon_modules()
    with SafetensorsWriter(path, {}, overwrite=True, hashes=False) as w:
        for name, shp in mods:
            n_in = shp[1] * (shp[2] * shp[3] if len(shp) == 4 else 1)
            down = torch.randn(rank, n_in, generator=g) / n_in ** 0.5
            up = torch.randn(shp[0], rank, generator=g) * 0.02
            if len(shp) == 4:
                down = down.reshape(rank, *shp[1:])
                up = up.reshape(shp[0], rank, 1, 1)
            w.add(f"{name}.lora_down.weight", down.half())
            w.add(f"{name}.lora_up.weight", up.half())
            w.add(f"{name}.alpha", torch.tensor(float(rank // 2), dtype=torch.float16))
        w.metadata.update({"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                           "ss_network_alpha": str(rank // 2), "ss_base_model_version": "sd_v1",
                           "ss_network_args": json.dumps({"conv_dim": str(rank), "conv_alpha": str(rank // 2)})})
    return mods


def peer_resize(src: str, dst: str, new_rank: int):
    """kohya's resize method on a kohya LoRA/LoCon file: dense up@down, full SVD, keep new_rank."""
    from safetensors.torch import load_file, save_file
    from prune import kohya_resize  # bench/prune.py

    sd = load_file(src)
    out = {}
    for k in sd:
        if not k.endswith(".lora_down.weight"):
            continue
        name = k[: -len(".lora_down.weight")]
        down, up = sd[k].float(), sd[f"{name}.lora_up.weight"].float()
        shp_d, r = down.shape, down.shape[0]
        alpha = float(sd[f"{name}.alpha"]) if f"{name}.alpha" in sd else float(r)
        nu, nd, new_alpha, _ = kohya_resize(up.reshape(up.shape[0], -1), down.reshape(r, -1), alpha, new_rank)
        if len(shp_d) == 4:
            nd = nd.reshape(new_rank, *shp_d[1:])
            nu = nu.reshape(nu.shape[0], new_rank, 1, 1)
        out[f"{name}.lora_down.weight"] = nd.half().contiguous()
        out[f"{name}.lora_up.weight"] = nu.half().contiguous()
        out[f"{name}.alpha"] = torch.tensor(new_alpha, dtype=torch.float16)
    save_file(out, dst)


def run_child(cmd, env=None, cwd=None) -> tuple[float, float, int]:
    """(wall s, peak RSS MiB, exit status) of one child process."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, env=env, cwd=cwd)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t
    p.returncode = os.waitstatus_to_exitcode(status)
    return wall, ru.ru_maxrss / 1024, p.returncode


def in_process_breakdown(src: Path, out: Path, profile: str | None):
    """Timers around the phases of one in-process ``--rank 16`` run (imports timed in a fresh child)."""
    code = ("import time; t=time.perf_counter(); import lycotools.cli, lycotools.ops.prune; "
            "print(time.perf_counter()-t)")
    imp = [float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=out.parent).stdout)
           for _ in range(3)]
    from lycotools.ops import prune as P

    opts = P.PruneOptions(rank=16, no_date=True)
    t0 = time.perf_counter()
    af, arch, layers, passthrough, dropped, in_params = P.read_layers(src, opts)
    t1 = time.perf_counter()
    P.choose_ranks(layers, opts)
    t2 = time.perf_counter()
    res = P.PruneResult(out, arch, layers, sorted(passthrough), dropped, params_before=in_params)
    res.params_after = sum(l.new_rank * l.cost_per_rank for l in layers)
    P._write(af, src, out, res, passthrough, opts, overwrite=True)
    t3 = time.perf_counter()
    print(f"in-process --rank 16 ({len(layers)} modules, {Path(P.__file__).parents[1]}): start-up (imports) {statistics.median(imp):.2f} s, "
          f"read + per-module SVD {t1 - t0:.2f} s, choose ranks {t2 - t1:.3f} s, write {t3 - t2:.2f} s")
    if profile:
        import cProfile

        cProfile.runctx("P.prune(src, out, opts, overwrite=True, quiet=True)", globals(),
                        {"P": P, "src": src, "out": out, "opts": opts}, profile)
        print(f"cProfile of one in-process prune: {profile}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=None, help="work folder (default: a temp folder, removed after)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--profile", default=None)
    ap.add_argument("--compare-with", default=None, metavar="DIR", help="folder holding an older lycotools/")
    ap.add_argument("--busy", type=int, default=0, metavar="N",
                    help="also time the lycotools runs with N busy-looping processes beside them (a shared machine)")
    ap.add_argument("--peer-run", nargs=3, metavar=("IN", "OUT", "RANK"), help=argparse.SUPPRESS)
    ap.add_argument("--breakdown-only", nargs=2, metavar=("IN", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peer_run:
        peer_resize(args.peer_run[0], args.peer_run[1], int(args.peer_run[2]))
        return 0
    if args.breakdown_only:
        in_process_breakdown(Path(args.breakdown_only[0]), Path(args.breakdown_only[1]), args.profile)
        return 0
    tmp = None if args.dir else tempfile.TemporaryDirectory()
    folder = Path(args.dir or tmp.name)
    folder.mkdir(parents=True, exist_ok=True)
    src = folder / "sd15_locon_r32.safetensors"
    mods = write_locon(src)
    n_conv3 = sum(1 for _, s in mods if len(s) == 4 and s[2:] != (1, 1))
    print(f"machine: {machine()}")
    print(f"input: {len(mods)} modules ({n_conv3} 3x3 convs), rank 32 fp16 kohya LoCon, "
          f"{src.stat().st_size / 2**20:.1f} MiB")
    trees = {"this tree": None}
    if args.compare_with:
        trees[args.compare_with] = dict(os.environ, PYTHONPATH=str(Path(args.compare_with).resolve()))
    lyco = [sys.executable, "-m", "lycotools", "rank-prune", str(src), "--overwrite", "-q", "--no-date"]
    for i in range(len(trees)):  # one folder per tree: same output names, so the bytes can be compared
        (folder / f"tree{i}").mkdir(exist_ok=True)
    runs = {(tree, k): (env, lyco + ["-o", str(folder / f"tree{i}" / f"{k.split()[0][2:]}.safetensors"), *k.split()])
            for i, (tree, env) in enumerate(trees.items()) for k in ("--rank 16", "--budget 0.5")}
    for busy in sorted({0, args.busy}):
        hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
        try:
            res = {k: [] for k in runs}
            for _ in range(args.repeat):  # alternate the variants so load from other processes hits all alike
                for k, (env, cmd) in runs.items():
                    res[k].append(run_child(cmd, env, cwd=folder))
        finally:
            for h in hogs:
                h.kill()
                h.wait()
        if busy:
            print(f"with {busy} busy-looping process(es) beside each run:")
        else:
            res0 = res
        for (tree, k), rs in res.items():
            walls = [w for w, _, _ in rs]
            print(f"lycotools rank-prune {k:13s} ({tree}): {statistics.median(walls):6.2f} s wall (median of "
                  f"{len(rs)}: {', '.join(f'{w:.2f}' for w in walls)}), peak RSS {max(m for _, m, _ in rs):.0f} MiB, "
                  f"exit {set(c for _, _, c in rs)}")
    res = res0
    if len(trees) > 1:
        for k in ("--rank 16", "--budget 0.5"):
            a, b = (folder / f"tree{i}" / f"{k.split()[0][2:]}.safetensors" for i in range(2))
            print(f"output bytes of {k}, this tree vs {args.compare_with}: "
                  f"{'identical' if a.read_bytes() == b.read_bytes() else 'DIFFERENT'}")
    if not args.no_peer:
        w, m, c = run_child([sys.executable, str(Path(__file__).resolve()), "--peer-run", str(src),
                             str(folder / "peer_r16.safetensors"), "16"])
        ours = statistics.median(w_ for w_, _, _ in res[("this tree", "--rank 16")])
        print(f"peer (kohya's resize: dense up@down + full SVD) rank 16: {w:6.2f} s wall, peak RSS {m:.0f} MiB, "
              f"exit {c}; " + (f"lycotools --rank 16 is {w / ours:.1f}x faster" if c == 0 else "did not finish"))
    for tree, env in trees.items():
        prof = args.profile if env is None else None
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--breakdown-only", str(src),
                        str(folder / "inproc.safetensors"), *(["--profile", prof] if prof else [])],
                       env=env, cwd=folder, check=True)
    if tmp:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
