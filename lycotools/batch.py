"""Batch handling, written once for every command: expand inputs, run each, report, exit status.

A folder or glob becomes its model files; each item runs on its own, so one bad file never stops
the others; the run ends with a summary table, and the exit status is the worst of the items
(0 done, 1 internal failure, 2 bad input).
"""

from __future__ import annotations

import glob
import sys
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from .errors import BadInput, LycoError
from .io.readers import is_model_path


@dataclass
class ItemResult:
    input: str
    status: str  # done | skipped | failed
    exit_code: int = 0
    message: str = ""
    value: object = None


def expand_inputs(inputs) -> tuple[list[Path], bool]:
    """Files/folders/globs -> model paths. Returns (paths, batch) where batch means a folder or glob was given.

    A path that does not exist is kept, so that its error is reported in its place.
    """
    out: list[Path] = []
    batch = len(inputs) > 1
    for raw in inputs:
        p = Path(raw)
        if any(ch in str(raw) for ch in "*?[") and not p.exists():
            batch = True
            out.extend(Path(m) for m in sorted(glob.glob(str(raw), recursive=True)) if is_model_path(Path(m)))
        elif p.is_dir() and not is_model_path(p):
            batch = True
            out.extend(walk_models(p))
        else:
            out.append(p)
    return out, batch


def walk_models(folder: Path) -> list[Path]:
    """Model files and model folders (diffusers, PEFT) under a folder, sorted; model folders are not entered."""
    found: list[Path] = []

    def visit(d: Path):
        for child in sorted(d.iterdir()):
            if child.name.startswith("."):
                continue
            if child.is_dir():
                if is_model_path(child):
                    found.append(child)
                else:
                    visit(child)
            elif is_model_path(child):
                found.append(child)

    visit(folder)
    return found


def run_items(items: list, fn: Callable, *, desc: str, jobs: int = 1, debug: bool = False,
              label: Callable = str, quiet: bool = False) -> list[ItemResult]:
    """Run ``fn(item)`` for each item, catching each failure into its result."""

    def one(item) -> ItemResult:
        name = label(item)
        try:
            value = fn(item)
        except LycoError as e:
            if debug:
                traceback.print_exc()
            return ItemResult(name, "failed", e.exit_code, e.line(), None)
        except KeyboardInterrupt:
            raise
        except MemoryError as e:
            return ItemResult(name, "failed", 1, f"{name}: out of memory ({e})")
        except Exception as e:  # a bug in lycotools: status 1, traceback with --debug
            if debug:
                traceback.print_exc()
            return ItemResult(name, "failed", 1, f"{name}: internal error: {e.__class__.__name__}: {e}")
        if isinstance(value, ItemResult):
            return value
        return ItemResult(name, "done", 0, "", value)

    bar = tqdm(total=len(items), desc=desc, unit="file", file=sys.stderr, disable=quiet or len(items) < 2, leave=False)
    results: list[ItemResult] = []
    if jobs > 1 and len(items) > 1:
        with ThreadPoolExecutor(jobs) as ex:
            for r in ex.map(one, items):
                results.append(r)
                bar.update()
    else:
        for it in items:
            results.append(one(it))
            bar.update()
    bar.close()
    return results


def exit_status(results: list[ItemResult]) -> int:
    codes = [r.exit_code for r in results]
    if 2 in codes:
        return 2
    return max(codes, default=0)


def summary_table(results: list[ItemResult]) -> str:
    """A small table: one row per input with its status, then the counts."""
    width = min(max((len(r.input) for r in results), default=10), 70)
    lines = [f"{'input':<{width}}  status   note", f"{'-' * width}  -------  ----"]
    for r in results:
        name = r.input if len(r.input) <= width else "…" + r.input[-(width - 1):]
        note = r.message.split(": ", 1)[-1] if r.message else ""
        lines.append(f"{name:<{width}}  {r.status:<7}  {note}")
    counts = {s: sum(r.status == s for r in results) for s in ("done", "skipped", "failed")}
    lines.append(f"{counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed")
    return "\n".join(lines)


def require_exists(path) -> Path:
    p = Path(path)
    if not p.exists():
        raise BadInput(p, "no such file or folder")
    return p
