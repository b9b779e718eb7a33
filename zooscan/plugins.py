"""Plugin manager: the built-ins and third-party plugins, all through entry points.

Every plugin, built-in or not, is a module named by an entry point in the
``zooscan`` group. ``ZOOSCAN_LOAD_PLUGINS`` (comma-separated entry-point names)
restricts which are loaded; set it to an empty string to load none.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any

import pluggy

from zooscan import hookspecs
from zooscan.errors import DatasetError, PluginError, UserError

ENTRY_POINT_GROUP = "zooscan"
LOAD_ENV = "ZOOSCAN_LOAD_PLUGINS"


@dataclass(frozen=True)
class PluginInfo:
    """One loaded plugin, as ``zooscan plugins`` shows it."""

    name: str
    module: str
    hooks: tuple[str, ...]
    version: str | None
    package: str | None


def _wanted_names() -> set[str] | None:
    raw = os.environ.get(LOAD_ENV)
    if raw is None:
        return None
    return {part.strip() for part in raw.split(",") if part.strip()}


def new_plugin_manager(extra: dict[str, ModuleType | object] | None = None) -> pluggy.PluginManager:
    """Build a plugin manager with every entry-point plugin (filtered by
    ``ZOOSCAN_LOAD_PLUGINS``) plus ``extra`` plugins registered by name.

    Raises :class:`PluginError` when a plugin cannot be imported or implements a
    hook that is not in the contract.
    """
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    wanted = _wanted_names()
    seen: set[str] = set()
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in seen or (wanted is not None and ep.name not in wanted):
            continue
        seen.add(ep.name)
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken plugin must not take the CLI down with a traceback
            raise PluginError(f"plugin {ep.name!r} ({ep.value}) failed to import: {exc}") from exc
        _register(pm, plugin, ep.name, dist=ep.dist)
    if wanted is not None:
        missing = wanted - seen - set(extra or {})
        if missing:
            raise PluginError(
                f"{LOAD_ENV} names plugins that are not installed: {', '.join(sorted(missing))}"
            )
    for name, plugin in (extra or {}).items():
        _register(pm, plugin, name, dist=None)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        name = pm.get_name(exc.plugin) or repr(exc.plugin)
        raise PluginError(
            f"plugin {name!r} implements a hook zooscan does not define: {exc}"
        ) from exc
    return pm


def _register(pm: pluggy.PluginManager, plugin: Any, name: str, dist: Any) -> None:
    try:
        pm.register(plugin, name=name)
    except ValueError as exc:
        raise PluginError(f"plugin {name!r} is registered twice: {exc}") from exc
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin {name!r} breaks the hook contract: {exc}") from exc
    if dist is not None:
        _DISTS[name] = (dist.metadata["Name"], dist.version)


_DISTS: dict[str, tuple[str, str]] = {}


@lru_cache(maxsize=1)
def plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager (built once)."""
    return new_plugin_manager()


def reset() -> None:
    """Forget the process-wide plugin manager (tests change ``ZOOSCAN_LOAD_PLUGINS``)."""
    plugin_manager.cache_clear()
    _DISTS.clear()


def list_plugins(pm: pluggy.PluginManager | None = None) -> list[PluginInfo]:
    """Every registered plugin with the hooks it implements and its package version."""
    pm = pm or plugin_manager()
    infos = []
    for name, plugin in sorted(pm.list_name_plugin(), key=lambda item: item[0]):
        hooks = tuple(sorted(caller.name for caller in pm.get_hookcallers(plugin) or []))
        package, version = _DISTS.get(name, (None, None))
        module = getattr(plugin, "__name__", type(plugin).__name__)
        infos.append(PluginInfo(name, module, hooks, version, package))
    return infos


def _collect(hook_name: str, pm: pluggy.PluginManager | None) -> dict[str, Any]:
    pm = pm or plugin_manager()
    found: dict[str, Any] = {}

    def register(factory: Any) -> None:
        name = getattr(factory, "name", None)
        if not isinstance(name, str) or not name:
            raise PluginError(f"{hook_name}: {factory!r} has no 'name'")
        if name in found:
            raise PluginError(f"{hook_name}: two plugins register the name {name!r}")
        found[name] = factory

    getattr(pm.hook, hook_name)(register=register)
    return dict(sorted(found.items()))


def sources(pm: pluggy.PluginManager | None = None) -> dict[str, Any]:
    """Source factories by name."""
    return _collect("register_sources", pm)


def datasets(pm: pluggy.PluginManager | None = None) -> dict[str, Any]:
    """Patch-dataset factories by name (or prefix, for ``prefix:ARG`` names)."""
    return _collect("register_datasets", pm)


def demo_parts(pm: pluggy.PluginManager | None = None) -> dict[str, Any]:
    """Parts plugins add to ``zooscan demo``, by name."""
    return _collect("register_demo_parts", pm)


def get_source(name: str, options: dict[str, str] | None = None, pm=None):
    """Instantiate source ``name`` with ``options``; unknown names are a :class:`UserError`."""
    factories = sources(pm)
    if name not in factories:
        known = ", ".join(factories) or "none installed"
        raise UserError(f"unknown source {name!r} (known: {known})")
    return factories[name](dict(options or {}))


def open_dataset(spec: str, pm=None):
    """Open a patch dataset from its user-facing spec: ``synthetic``, ``folder:PATH``..."""
    name, _, argument = spec.partition(":")
    factories = datasets(pm)
    if name not in factories:
        known = ", ".join(factories) or "none installed"
        raise UserError(f"unknown dataset {spec!r} (known: {known})")
    return factories[name](argument or None)


def open_labelled(
    spec: str, split: str, *, size: int | None = None, count: int | None = None, pm=None
):
    """One split (``"train"`` or ``"test"``) of a dataset's labelled images
    (:class:`zooscan.records.LabelledImages`); a :class:`DatasetError` when the dataset
    has no labels."""
    if split not in ("train", "test"):
        raise UserError(f"split must be 'train' or 'test', got {split!r}")
    dataset = open_dataset(spec, pm)
    labelled = getattr(dataset, "labelled", None)
    if labelled is None:
        raise DatasetError(f"dataset {spec!r} has no labels to train on")
    return labelled(split, size=size, count=count)
