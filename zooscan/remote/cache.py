"""The local Hugging Face hub cache (``models--org--name/snapshots/<sha>/<file>``).

zooscan only *reads* this cache (files that ``huggingface_hub``, timm or transformers
downloaded before); it never writes to it. The cache directory is taken from the
environment when asked, not when a library was imported, so ``HF_HOME`` /
``HF_HUB_CACHE`` set by a caller or a test are honoured.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cached_file", "hub_cache_dir"]


def hub_cache_dir() -> str:
    """The hub cache directory: ``$HF_HUB_CACHE``, else ``$HUGGINGFACE_HUB_CACHE``,
    else ``$HF_HOME/hub`` (``$HF_HOME`` defaulting to ``$XDG_CACHE_HOME/huggingface``
    or ``~/.cache/huggingface``), as ``huggingface_hub`` computes it."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return os.path.expandvars(os.path.expanduser(explicit))
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    home = os.environ.get("HF_HOME") or os.path.join(xdg, "huggingface")
    return os.path.join(os.path.expandvars(os.path.expanduser(home)), "hub")


def cached_file(
    cache_dir: str, repo_id: str, filename: str, revision: str = "main", repo_type: str = "model"
) -> str | None:
    """Path of a complete cached copy of ``filename`` at ``revision`` (branch, tag or
    commit sha), or ``None``. Uses ``huggingface_hub.try_to_load_from_cache`` (a file
    the cache records as absent counts as not cached); makes no request."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub is an optional dependency
        return None
    try:
        found = try_to_load_from_cache(
            repo_id, filename, cache_dir=cache_dir, revision=revision, repo_type=repo_type
        )
    except (ValueError, OSError):  # malformed repo id or unreadable cache
        return None
    if isinstance(found, str) and os.path.isfile(found):
        return found
    return None
