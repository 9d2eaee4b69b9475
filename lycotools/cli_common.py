"""What every command shares: option decorators, error handling, batch output naming and the batch driver."""

from __future__ import annotations

import errno
import functools
import os
import signal
import sys
import traceback
from pathlib import Path

import click

from .batch import ItemResult, exit_status, run_items, summary_table
from .errors import BadInput, LycoError, unexpected_line


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
    """Options every command has, and the one place errors turn into lines and exit statuses.

    SIGINT, SIGTERM and SIGHUP stop the command like Ctrl-C (``writer.catch_signals``): the writers
    remove their temp files and the status is 128 + the signal's number (130 for Ctrl-C). The message
    says "no output was written" only when no output was published before the signal came."""

    @click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
    @click.option("-q", "--quiet", is_flag=True, help="No progress bars or messages.")
    @functools.wraps(f)
    def wrapper(*args, debug=False, quiet=False, **kwargs):
        from .io.writer import catch_signals

        with catch_signals() as run:
            try:
                code = f(*args, debug=debug, quiet=quiet, **kwargs)
            except BaseException as e:
                code = _failure(e, run, debug)
        sys.exit(code or 0)

    return wrapper


def _failure(e: BaseException, run, debug: bool) -> int:
    """Print the one error line for ``e`` and return the exit status."""
    if isinstance(e, SystemExit):
        raise e
    if run.signum is not None or isinstance(e, KeyboardInterrupt):  # a signal wins over what it caused
        signum = run.signum or signal.SIGINT
        if run.written:
            kept = f"{run.written[-1]}" if len(run.written) == 1 else f"{len(run.written)} outputs, the last {run.written[-1]}"
            err(f"interrupted; finished before the signal and kept: {kept}; no partial output left")
        else:
            err("interrupted; no output was written")
        return 128 + signum
    if debug:
        traceback.print_exc()
    if isinstance(e, LycoError):
        err(e.line())
        return e.exit_code
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        err(f"{e.filename or 'output'}: cannot write: {os.strerror(e.errno).lower()}")
        return 1
    if isinstance(e, Exception):  # a missing package or a bug: say so, status 1
        err(unexpected_line(e))
        return 1
    raise e


def batch_outputs(inputs, output, suffix=".safetensors"):
    """(input, output path) pairs for a batch: each output named after its input in the -o folder,
    one output per input whatever their names:

    * ``<stem><suffix>`` (a model folder: ``<name><suffix>``);
    * inputs of one folder sharing a stem keep their extension after an underscore: diffusers
      training leaves ``w.bin`` and ``w.safetensors`` side by side, written as ``w_bin.safetensors``
      and ``w_safetensors.safetensors`` (not ``w.bin.safetensors``: a folder output, --to peft, would
      then be ``w.bin``, a name that looks like a file and loses its "extension" to ``with_suffix``);
    * a name still shared by inputs of different folders gets their folder, relative to the folder
      they share, in front: ``a/x.safetensors`` and ``b/x.safetensors`` -> ``a__x.safetensors`` and
      ``b__x.safetensors``.

    The names depend only on the set of inputs, not their order. Names compare case-insensitively
    (one output folder may be on a case-insensitive filesystem); outputs that still clash refuse the
    batch before any work."""
    out_dir = Path(output)
    if out_dir.exists() and not out_dir.is_dir():
        raise BadInput(out_dir, "with several inputs, -o must be a folder")
    inputs = list(dict.fromkeys(Path(p) for p in inputs))
    folder = {p: Path(os.path.abspath(p)).parent for p in inputs}

    def stem(p):
        return p.name if p.is_dir() else p.stem

    def groups(key):
        g = {}
        for p in inputs:
            g.setdefault(key(p), []).append(p)
        return g

    by_stem = groups(lambda p: (folder[p], stem(p).casefold()))
    leaf = {p: f"{p.stem}_{p.suffix[1:]}" if len(by_stem[(folder[p], stem(p).casefold())]) > 1 and p.suffix
            and not p.is_dir() else stem(p) for p in inputs}
    names = {}
    for same in groups(lambda p: leaf[p].casefold()).values():
        top = Path(os.path.commonpath([folder[p] for p in same]))
        for p in same:
            rel = folder[p].relative_to(top).parts if len(same) > 1 else ()
            names[p] = "__".join((*rel, leaf[p])) + suffix
    seen = {}
    for p in inputs:
        other = seen.setdefault(names[p].casefold(), p)
        if other != p:
            raise BadInput(out_dir / names[p], f"two inputs, {other} and {p}, would be written to the same output; "
                                               "run them in separate batches")
    out_dir.mkdir(parents=True, exist_ok=True)
    return [(p, out_dir / names[p]) for p in inputs]


def run_batch(pairs, work, *, overwrite, jobs, debug, quiet, desc):
    """Shared batch driver: skip finished outputs, run the rest, print the summary table, return the status.

    "Finished" means there before the run began: an output this run wrote is never reported as
    already existing. An output that is, holds or lies inside any input of the batch (``-o`` may be
    the inputs' own folder) fails its item before any work (``writer.input_clash``)."""
    from .io.writer import clash_checker

    input_clash = clash_checker([src for src, _ in pairs])
    existed = {dst for _, dst in pairs if dst.exists() or dst.is_symlink()}

    def one(pair):
        src, dst = pair
        why = input_clash(dst)
        if why:
            raise BadInput(dst, why)
        if dst in existed and not overwrite:
            return ItemResult(str(src), "skipped", 0, f"{dst}: already exists (use --overwrite)")
        work(src, dst)
        return ItemResult(str(src), "done", 0, str(dst))

    results = run_items(pairs, one, desc=desc, jobs=jobs, debug=debug, quiet=quiet, label=lambda p: str(p[0]))
    for r in results:
        if r.status == "failed":
            err(r.message)
    click.echo(summary_table(results), err=True)
    return exit_status(results)
