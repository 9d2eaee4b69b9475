"""`lycotools inspect`: say what each model file is (checkpoint, adapter, embedding or unknown)."""

from __future__ import annotations

import json

import click

from ..batch import exit_status, expand_inputs, run_items
from ..cli_common import common, err


@click.command("inspect")
@click.argument("paths", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
@click.option("-j", "--jobs", default=1, show_default=True, help="Files inspected at once.")
@common
def inspect_cmd(paths, as_json, jobs, debug, quiet):
    """Say what each model file is: checkpoint, adapter, embedding or unknown.

    \b
    Example:
      lycotools inspect fixtures/sd1/base.safetensors fixtures/adapters/
      lycotools inspect --json my_lora.safetensors
    """
    import gc

    from ..ops.inspect import format_report, inspect_path

    # The hundreds of thousands of objects torch's import leaves would otherwise be traversed by every
    # full garbage collection, which the many small objects of each inspected file set off again and again.
    gc.freeze()
    items, _ = expand_inputs(paths)
    if not items:
        err(f"{' '.join(paths)}: no model files found")
        return 2
    pool = _inspect_pool(jobs, len(items), debug)
    try:
        fn = inspect_path if pool is None else _pooled_inspect(pool)
        results = run_items(items, fn, desc="inspect", jobs=jobs, debug=debug, quiet=quiet)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    if as_json:
        doc = [r.value if r.status == "done" else {"path": r.input, "kind": "error", "error": r.message} for r in results]
        click.echo(json.dumps(doc if len(doc) > 1 else doc[0], indent=2, default=str))
    for r in results:
        if r.status == "done" and not as_json:
            click.echo(format_report(r.value))
        elif r.status != "done":
            err(r.message)
    return exit_status(results)


_POOL_MIN_FILES = 64  # below this, starting worker processes costs more than they save


def _inspect_pool(jobs: int, n_items: int, debug: bool):
    """Worker processes for ``inspect -j N`` over many files, or None (threads, as every command).

    Inspecting a file is Python work (parsing, matching names), which threads of one process cannot
    run at once; processes can. Forked before any thread of this command starts (the fork start method
    starts every worker on the first submit), from a process that has only imported modules. Not with
    --debug, whose tracebacks are those of this process."""
    if jobs < 2 or n_items < _POOL_MIN_FILES or debug:
        return None
    import multiprocessing
    import sys
    from concurrent.futures import ProcessPoolExecutor

    if sys.platform != "linux":
        return None
    pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork"), initializer=_inspect_worker_init)
    pool.submit(int).result()  # every worker forked now, from this thread alone
    return pool


def _inspect_worker_init():
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent stops the run


def _pooled_inspect(pool):
    from ..ops.inspect import inspect_in_worker, raise_from_worker

    def fn(item):
        return raise_from_worker(pool.submit(inspect_in_worker, item).result())

    return fn


command = inspect_cmd
