"""The plugin contract: every hook a zooscan plugin may implement.

Hooks are small and declarative, in the style of ``simonw/llm``: each receives a
``register`` callable (or the click group) and adds what the plugin offers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    import click

    from zooscan.records import DatasetFactory, DemoPart, SourceFactory

hookspec = pluggy.HookspecMarker("zooscan")


@hookspec
def register_sources(register: Callable[[SourceFactory], None]) -> None:
    """Register model sources.

    Call ``register(factory)`` once per source. ``factory`` is a class (or any
    callable) with a ``name`` attribute and a ``description``; calling
    ``factory(options)`` with a ``dict[str, str]`` of source options returns an
    object that follows :class:`zooscan.records.Source`.
    """


@hookspec
def register_datasets(register: Callable[[DatasetFactory], None]) -> None:
    """Register patch datasets (the images patch bases are computed from).

    Call ``register(factory)`` once per dataset. ``factory.name`` is the name a user
    types (``synthetic``) or its prefix (``folder`` for ``folder:PATH``); calling
    ``factory(argument)`` (the text after ``:``, or ``None``) returns a
    :class:`zooscan.records.PatchDataset`.
    """


@hookspec
def register_commands(cli: click.Group) -> None:
    """Add click commands (or groups) to the ``zooscan`` command line."""


@hookspec
def register_demo_parts(register: Callable[[DemoPart], None]) -> None:
    """Add parts to ``zooscan demo`` (run after its scans, in order of name).

    Call ``register(part)`` once per part: ``part.name`` names it, and calling
    ``part(store, out_dir, dataset=..., quick=...)`` with the demo's open, writable
    :class:`zooscan.store.Store`, its output folder, the key of its patch dataset and
    the ``--quick`` flag prints the part's own section, writes its plots into
    ``out_dir`` and returns a JSON-ready dict of its results. A part must run offline.
    """
