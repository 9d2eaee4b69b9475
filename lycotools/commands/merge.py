"""`lycotools merge` (being built)."""

import click

from ..cli_common import common
from ..errors import BadInput


@click.command("merge")
@click.argument("inputs", nargs=-1)
@common
def command(inputs, debug, quiet):
    """Not implemented yet."""
    raise BadInput(None, "lycotools merge is not implemented yet")
