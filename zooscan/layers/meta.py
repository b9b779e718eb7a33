"""Build an architecture without weights, on the ``meta`` device."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

_ORIGINAL_REGISTER = (nn.Module.register_parameter, nn.Module.register_buffer)
_META_BUILD = threading.local()
_PATCH_LOCK = threading.Lock()
_patch_users = 0


def _register_parameter_on_meta(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
    _ORIGINAL_REGISTER[0](self, name, param)
    if getattr(_META_BUILD, "active", False) and param is not None and param.device.type != "meta":
        moved = type(param)(param.to("meta"), requires_grad=param.requires_grad)
        self._parameters[name] = moved


def _register_buffer_on_meta(
    self: nn.Module, name: str, tensor: torch.Tensor | None, persistent: bool = True
) -> None:
    if getattr(_META_BUILD, "active", False) and tensor is not None:
        tensor = tensor.to("meta")
    _ORIGINAL_REGISTER[1](self, name, tensor, persistent=persistent)


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Move every parameter and buffer to ``meta`` as modules register them.

    The patch of ``nn.Module.register_parameter``/``register_buffer`` is installed while
    any thread is inside this context, but acts only in the threads that entered it, so
    models built concurrently elsewhere (scan workers) are unaffected.
    """
    global _patch_users
    with _PATCH_LOCK:
        if _patch_users == 0:
            nn.Module.register_parameter = _register_parameter_on_meta  # type: ignore[method-assign]
            nn.Module.register_buffer = _register_buffer_on_meta  # type: ignore[method-assign]
        _patch_users += 1
    _META_BUILD.active = True
    try:
        yield
    finally:
        _META_BUILD.active = False
        with _PATCH_LOCK:
            _patch_users -= 1
            if _patch_users == 0:
                nn.Module.register_parameter = _ORIGINAL_REGISTER[0]  # type: ignore[method-assign]
                nn.Module.register_buffer = _ORIGINAL_REGISTER[1]  # type: ignore[method-assign]


def build_on_meta(builder: Callable[..., nn.Module], *args: Any, **kwargs: Any) -> nn.Module:
    """Build an architecture without weights: ``builder(*args, **kwargs)`` on ``meta``.

    Tries ``with torch.device("meta")`` first (fastest: no allocation at all). Builders
    that compute their configuration with tensors (torchvision RegNets call
    ``.tolist()``) fail there; they are retried with ordinary tensors and every
    parameter and buffer moved to ``meta`` as it is registered (thread-safe: other
    threads building models meanwhile are unaffected).
    """
    try:
        with torch.device("meta"):
            return builder(*args, **kwargs)
    except NotImplementedError:
        pass  # "Cannot copy out of meta tensor": data-dependent construction
    with _parameters_on_meta():
        return builder(*args, **kwargs)
