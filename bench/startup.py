"""Start-up, end to end as a user runs it: ``lycotools --help`` / ``--version`` / ``inspect --help``
against ``python -c "import torch"`` (what every command paid before), medians of N runs.

    python bench/startup.py [--runs 7]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time


def wall(cmd: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=7)
    a = ap.parse_args()
    exe = shutil.which("lycotools") or sys.exit("lycotools is not on PATH (activate the venv)")
    torch_import = wall([sys.executable, "-c", "import torch"], a.runs)
    print(f"python -c 'import torch' (what start-up cost before): {torch_import:.3f} s")
    for args in (["--help"], ["--version"], ["inspect", "--help"], ["train", "--help"]):
        t = wall([exe, *args], a.runs)
        print(f"lycotools {' '.join(args):<16} {t:.3f} s   ({t / torch_import:.2f}x the torch import; target <= 0.3 s)")


if __name__ == "__main__":
    main()
