"""What every command shares: option decorators, error handling, batch output naming and the batch driver."""

from __future__ import annotations

import functools
import sys
import traceback
from pathlib import Path

import click

from .batch import ItemResult, exit_status, run_items, summary_table
from .errors import BadInput, LycoError


def err(line: str):
    click.echo(f"lycotools: error: {line}", err=True)


def batch_options(jobs_help: str = "Files processed at once in batch mode."):
    """--overwrite, --no-date and -j/--jobs: the options of every command that writes files, batch or not."""

    def deco(f):
        f = click.option("-j", "--jobs", type=int, default=1, show_default=True, help=jobs_help)(f)
        f = click.option("--no-date", is_flag=True, help="Leave the date out of the metadata (byte-identical reruns).")(f)
        return click.option("--overwrite", is_flag=True, help="Replace existing outputs.")(f)

    return deco


def common(f):
    """Options every command has, and the one place errors turn into lines and exit statuses."""

    @click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
    @click.option("-q", "--quiet", is_flag=True, help="No progress bars or messages.")
    @functools.wraps(f)
    def wrapper(*args, debug=False, quiet=False, **kwargs):
        try:
            code = f(*args, debug=debug, quiet=quiet, **kwargs)
        except LycoError as e:
            if debug:
                traceback.print_exc()
            err(e.line())
            code = e.exit_code
        except KeyboardInterrupt:
            err("interrupted; no output was written")
            code = 130
        except Exception as e:  # a bug: say so, status 1
            if debug:
                traceback.print_exc()
            err(f"internal error: {e.__class__.__name__}: {e} (run with --debug for the traceback)")
            code = 1
        sys.exit(code or 0)

    return wrapper


def batch_outputs(inputs, output, suffix=".safetensors"):
    """(input, output path) pairs for a batch: each output named after its input in the -o folder."""
    out_dir = Path(output)
    if out_dir.exists() and not out_dir.is_dir():
        raise BadInput(out_dir, "with several inputs, -o must be a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    pairs = []
    for p in inputs:
        stem = p.name if p.is_dir() else p.stem
        pairs.append((p, out_dir / f"{stem}{suffix}"))
    return pairs


def run_batch(pairs, work, *, overwrite, jobs, debug, quiet, desc):
    """Shared batch driver: skip finished outputs, run the rest, print the summary table, return the status."""
    def one(pair):
        src, dst = pair
        if dst.exists() and not overwrite:
            return ItemResult(str(src), "skipped", 0, f"{dst}: already exists (use --overwrite)")
        work(src, dst)
        return ItemResult(str(src), "done", 0, str(dst))

    results = run_items(pairs, one, desc=desc, jobs=jobs, debug=debug, quiet=quiet, label=lambda p: str(p[0]))
    for r in results:
        if r.status == "failed":
            err(r.message)
    click.echo(summary_table(results), err=True)
    return exit_status(results)


