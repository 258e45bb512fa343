"""The ``steinpix`` command group: ``classify ilastik ...`` and ``apps ilastik``."""

from __future__ import annotations

import click

from steinpix import __version__
from steinpix._cli.apps import apps_group
from steinpix._cli.fix import fix_cmd
from steinpix._cli.prepare import prepare_cmd
from steinpix._cli.preview import preview_cmd
from steinpix._cli.run import run_cmd


class OrderedGroup(click.Group):
    """Lists its commands in the order they were added (steinbock's order), not sorted."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)


@click.group(name="steinpix", cls=OrderedGroup)
@click.version_option(__version__, prog_name="steinpix")
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
