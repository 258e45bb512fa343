"""The ``steinpix`` command group: ``classify ilastik ...`` and ``apps ilastik``."""

from __future__ import annotations

import click

from steinpix._cli.apps import apps_group
from steinpix._cli.fix import fix_cmd
from steinpix._cli.prepare import prepare_cmd
from steinpix._cli.preview import preview_cmd
from steinpix._cli.run import run_cmd
from steinpix._cli.utils import exit_quickly


def _show_version(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    """``--version``, like click's version option, with the version looked up only then."""
    if not value or ctx.resilient_parsing:
        return
    from steinpix import __version__

    click.echo(f"steinpix, version {__version__}")
    ctx.exit()


class OrderedGroup(click.Group):
    """Lists its commands in the order they were added (steinbock's order), not sorted."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)


@click.group(name="steinpix", cls=OrderedGroup)
@click.option("--version", is_flag=True, expose_value=False, is_eager=True,
              callback=_show_version, help="Show the version and exit.")
def main() -> None:
    """steinbock's ilastik pixel classification, with a built-in ilastik engine."""


@main.group(name="classify", cls=OrderedGroup)
def classify_group() -> None:
    """Classify pixels."""


@classify_group.group(name="ilastik", cls=OrderedGroup)
def ilastik_group() -> None:
    """Perform supervised pixel classification using Ilastik"""


ilastik_group.add_command(prepare_cmd)
ilastik_group.add_command(run_cmd)
ilastik_group.add_command(preview_cmd)
ilastik_group.add_command(fix_cmd)

main.add_command(apps_group)


def cli() -> None:
    """The ``steinpix`` executable: :func:`main`, ending quickly where the command allows it
    (:func:`steinpix._cli.utils.exit_quickly`)."""
    try:
        main()
    except SystemExit as exc:
        exit_quickly(exc.code)
        raise
