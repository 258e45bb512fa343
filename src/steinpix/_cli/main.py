"""The ``steinpix`` command group: ``classify ilastik ...`` and ``apps ilastik``."""

from __future__ import annotations

import importlib

import click

from steinpix import interrupts
from steinpix._cli.utils import exit_quickly, in_executable


def _show_version(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    """``--version``, like click's version option, with the version looked up only then."""
    if not value or ctx.resilient_parsing:
        return
    from steinpix import __version__

    click.echo(f"steinpix, version {__version__}")
    ctx.exit()


class OrderedGroup(click.Group):
    """Lists its commands in the order they were added (steinbock's order), not sorted.

    Commands given as ``lazy={name: "module:attribute"}`` are imported only when they run or
    are listed (``--help``): a command does not pay for the imports of the others. They are
    listed after the others, in the order given.
    """

    def __init__(self, *args, lazy: dict[str, str] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        # the commands added directly, then the lazy ones, each in the order given
        return [*(name for name in self.commands if name not in self.lazy), *self.lazy]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in self.lazy:
            module, attribute = self.lazy[cmd_name].split(":")
            self.add_command(getattr(importlib.import_module(module), attribute), cmd_name)
        return super().get_command(ctx, cmd_name)


@click.group(name="steinpix", cls=OrderedGroup)
@click.option("--version", is_flag=True, expose_value=False, is_eager=True,
              callback=_show_version, help="Show the version and exit.")
def main() -> None:
    """steinbock's ilastik pixel classification, with a built-in ilastik engine."""


@main.group(name="classify", cls=OrderedGroup)
def classify_group() -> None:
    """Classify pixels."""


@classify_group.group(
    name="ilastik",
    cls=OrderedGroup,
    lazy={
        "prepare": "steinpix._cli.prepare:prepare_cmd",
        "run": "steinpix._cli.run:run_cmd",
        "preview": "steinpix._cli.preview:preview_cmd",
        "fix": "steinpix._cli.fix:fix_cmd",
    },
)
def ilastik_group() -> None:
    """Perform supervised pixel classification using Ilastik"""


main.lazy["apps"] = "steinpix._cli.apps:apps_group"


def cli() -> None:
    """The ``steinpix`` executable: :func:`main`, ending quickly where the command allows it
    (:func:`steinpix._cli.utils.exit_quickly`)."""
    in_executable()
    interrupts.install()
    try:
        main()
    except SystemExit as exc:
        exit_quickly(exc.code)
        raise
