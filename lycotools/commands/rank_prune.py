"""`lycotools rank-prune` (being built)."""

import click

from ..cli_common import common
from ..errors import BadInput


@click.command("rank-prune")
@click.argument("inputs", nargs=-1)
@common
def command(inputs, debug, quiet):
    """Not implemented yet."""
    raise BadInput(None, "lycotools rank-prune is not implemented yet")
