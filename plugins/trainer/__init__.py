"""The built-in trainer plugin: trains linear and standard CNNs and stores their runs.

It adds ``zooscan train``, ``zooscan runs`` and ``zooscan reproduce`` through the
``register_commands`` hook and a trained zoo to ``zooscan demo`` through
``register_demo_parts``, like any third-party plugin.
"""

from __future__ import annotations

import click

import zooscan


@zooscan.hookimpl
def register_commands(cli: click.Group) -> None:
    """Add ``train``, ``runs`` and ``reproduce``."""
    from zooscan_builtins.trainer.cli import reproduce_cmd, runs_cmd, train_cmd

    for command in (train_cmd, runs_cmd, reproduce_cmd):
        cli.add_command(command)


@zooscan.hookimpl
def register_demo_parts(register) -> None:
    """Train a small zoo in ``zooscan demo``."""
    from zooscan_builtins.trainer.demo import DEMO_PART

    register(DEMO_PART)
