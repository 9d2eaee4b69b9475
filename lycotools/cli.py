"""The ``lycotools`` command line: thin click commands over ``lycotools.ops``.

Conventions (../shared/conventions.md): inputs positional, output ``-o``; errors are one line on
stderr, ``lycotools: error: <file>: <what is wrong>``, exit 2 for bad input, 1 for internal
failures; ``--debug`` shows the traceback; progress and messages on stderr, ``--json`` on stdout.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import traceback

import click

from . import __version__
from .batch import exit_status, expand_inputs, run_items
from .errors import LycoError


def _err(line: str):
    click.echo(f"lycotools: error: {line}", err=True)


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
            _err(e.line())
            code = e.exit_code
        except KeyboardInterrupt:
            _err("interrupted; no output was written")
            code = 130
        except Exception as e:  # a bug: say so, status 1
            if debug:
                traceback.print_exc()
            _err(f"internal error: {e.__class__.__name__}: {e} (run with --debug for the traceback)")
            code = 1
        sys.exit(code or 0)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="lycotools")
def main():
    """Stable Diffusion adapter and checkpoint tools: inspect, extract, rank-prune, merge, convert."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # lycotools never downloads anything


@main.command("inspect")
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
    from .ops.inspect import format_report, inspect_path

    items, _ = expand_inputs(paths)
    if not items:
        _err(f"{' '.join(paths)}: no model files found")
        return 2
    results = run_items(items, inspect_path, desc="inspect", jobs=jobs, debug=debug, quiet=quiet)
    if as_json:
        doc = [r.value if r.status == "done" else {"path": r.input, "kind": "error", "error": r.message} for r in results]
        click.echo(json.dumps(doc if len(doc) > 1 else doc[0], indent=2, default=str))
    for r in results:
        if r.status == "done" and not as_json:
            click.echo(format_report(r.value))
        elif r.status != "done":
            _err(r.message)
    return exit_status(results)


if __name__ == "__main__":  # pragma: no cover
    main()
