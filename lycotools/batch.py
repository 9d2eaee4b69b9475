"""Batch handling, written once for every command: expand inputs, run each, report, exit status.

A folder or glob becomes its model files; each item runs on its own, so one bad file never stops
the others; the run ends with a summary table, and the exit status is the worst of the items
(0 done, 1 internal failure, 2 bad input).
"""

from __future__ import annotations

import fnmatch
import glob
import os
import sys
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from .errors import BadInput, LycoError, unexpected_line
from .io.paths import is_model_path


@dataclass
class ItemResult:
    input: str
    status: str  # done | skipped | failed
    exit_code: int = 0
    message: str = ""
    value: object = None


def expand_inputs(inputs) -> tuple[list[Path], bool]:
    """Files/folders/globs -> model paths. Returns (paths, batch) where batch means a folder or glob was given.

    Each real file is listed once: a file given twice, a hard link or a symlink to a file already
    listed is the same work, and running it twice would only write the same output twice (or two
    outputs of one file). It keeps its first name that is not a symlink (inputs in order, folders
    and globs sorted), else its first name. A path that does not exist is kept,
    so that its error is reported in its place.
    """
    found: list[Path] = []
    batch = len(inputs) > 1
    for raw in inputs:
        p = Path(raw)
        if any(ch in str(raw) for ch in "*?[") and not p.exists():
            batch = True
            found.extend(m for m in _glob(str(raw)) if is_model_path(m))
        elif p.is_dir() and not is_model_path(p):
            batch = True
            found.extend(walk_models(p))
        else:
            found.append(p)
    keys = [_identity(p) or p for p in found]
    names: dict = {}
    for key, p in zip(keys, found):
        names.setdefault(key, []).append(p)
    chosen = {key: next((p for p in g if not p.is_symlink()), g[0]) for key, g in names.items()}
    return [p for key, p in zip(keys, found) if chosen[key] is p], batch


def _identity(p: Path):
    """(device, inode) of what ``p`` names, following links; None if it does not exist."""
    try:
        st = os.stat(p)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _subdirs(d: Path, root: Path, seen: set) -> list[Path]:
    """The folders under ``d`` worth entering, sorted; hidden ones are not. A symlinked folder is
    followed unless it leads somewhere already walked (a loop: a/b -> a) or to a folder holding
    ``root`` (a link to a parent would walk everything beside the root)."""
    above = set(root.resolve().parents) | {root.resolve()}
    out = []
    for child in sorted(d.iterdir()):
        if child.name.startswith(".") or not child.is_dir():
            continue
        key = _identity(child)
        if key in seen or (child.is_symlink() and child.resolve() in above):
            continue
        seen.add(key)
        out.append(child)
    return out


def walk_models(folder: Path) -> list[Path]:
    """Model files and model folders (diffusers, PEFT) under a folder, sorted; model folders are not
    entered. Each real folder is entered once, so symlink loops end (see ``_subdirs``)."""
    found: list[Path] = []
    seen = {_identity(folder)}

    def visit(d: Path):
        for child in sorted(d.iterdir()):
            if not child.name.startswith(".") and not child.is_dir() and is_model_path(child):
                found.append(child)
        for sub in _subdirs(d, folder, seen):
            if is_model_path(sub):
                found.append(sub)
            else:
                visit(sub)

    visit(folder)
    return sorted(found)


def _glob(pattern: str) -> list[Path]:
    """``glob.glob(pattern, recursive=True)``, sorted, without its hang on symlink loops: for ``**``
    each real folder is entered once (see ``_subdirs``). Like glob, wildcards skip hidden names."""
    parts = Path(pattern).parts
    fixed = 0
    while fixed < len(parts) and not glob.has_magic(parts[fixed]):
        fixed += 1
    root = Path(*parts[:fixed]) if fixed else Path()
    hits: list[Path] = []
    seen_at: set = set()  # (pattern position, real folder) pairs already expanded

    def match(d: Path, i: int):
        if i == len(parts):
            hits.append(d)
            return
        part = parts[i]
        if part == "**":
            if (i, _identity(d)) in seen_at:
                return
            seen_at.add((i, _identity(d)))
            match(d, i + 1)
            if i + 1 == len(parts):  # a trailing ** also matches the files
                hits.extend(c for c in sorted(d.iterdir()) if not c.name.startswith(".") and not c.is_dir())
            for sub in _subdirs(d, root, set()):
                match(sub, i)
        elif not glob.has_magic(part):
            if (d / part).exists():
                match(d / part, i + 1)
        elif d.is_dir():
            for child in sorted(d.iterdir()):
                if fnmatch.fnmatch(child.name, part) and (part.startswith(".") or not child.name.startswith(".")):
                    if i + 1 == len(parts) or child.is_dir():
                        match(child, i + 1)

    if root.exists():
        match(root, fixed)
    return sorted(hits, key=str)


def run_items(items: list, fn: Callable, *, desc: str, jobs: int = 1, debug: bool = False,
              label: Callable = str, quiet: bool = False) -> list[ItemResult]:
    """Run ``fn(item)`` for each item, catching each failure into its result."""

    def one(item) -> ItemResult:
        name = label(item)
        from .io.writer import check_interrupt

        check_interrupt()  # -j: after a signal, items still queued do not start
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
            return ItemResult(name, "failed", 1, unexpected_line(e, name))
        if isinstance(value, ItemResult):
            return value
        return ItemResult(name, "done", 0, "", value)

    bar = tqdm(total=len(items), desc=desc, unit="file", file=sys.stderr, disable=quiet or len(items) < 2, leave=False)
    results: list[ItemResult] = []
    if jobs > 1 and len(items) > 1:
        from .io.threads import signals_to_main_thread

        ex = ThreadPoolExecutor(jobs, initializer=signals_to_main_thread)
        try:
            for r in ex.map(one, items):
                results.append(r)
                bar.update()
        finally:  # on a signal: wait for the running items (they stop at their next write), start no other
            ex.shutdown(wait=True, cancel_futures=True)
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
