"""The ``lycotools`` command group; every command lives in ``lycotools.commands``, thin over ``lycotools.ops``.

Conventions (docs/cli.md#command-line-conventions): inputs positional, output ``-o``; errors are one line on
stderr, ``lycotools: error: <file>: <what is wrong>``, exit 2 for bad input, 1 for internal
failures; ``--debug`` shows the traceback; progress and messages on stderr, ``--json`` on stdout.
"""

from __future__ import annotations

import os

import click

from . import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="lycotools")
def main():
    """Stable Diffusion adapter and checkpoint tools: inspect, extract, rank-prune, merge, convert."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # lycotools never downloads anything
    from .alloc import tune_allocator

    tune_allocator()  # streamed tensors reuse freed memory instead of faulting fresh pages in


def _register():
    from .commands import convert, extract, inspect, merge, rank_prune, train

    for mod in (inspect, extract, merge, rank_prune, convert, train):
        main.add_command(mod.command)


_register()

if __name__ == "__main__":  # pragma: no cover
    main()
