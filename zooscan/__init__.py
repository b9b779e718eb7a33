"""zooscan: first-layer energy profiles of model zoos (Chowers & Weiss, ICML 2023)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("zooscan")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

import pluggy

hookimpl = pluggy.HookimplMarker("zooscan")
"""Decorator that plugins use to implement a zooscan hook."""

__all__ = ["__version__", "hookimpl"]
