"""Step 3 of the search: probe how the first layer reads the image.

The parameter-free part of the forward before the first layer is replayed on small
CPU probe images; the resulting :class:`~zooscan.layers.InputMap` is described by
flags and a per-channel input affine.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from zooscan.errors import UnsupportedModel
from zooscan.layers.parts import Branch, InputMap, Pair
from zooscan.layers.pixelmap import MapError, derive_input_map
from zooscan.layers.tracing import Abort, Tracer, first_tensor


def _probe_images(shape: tuple[int, ...], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Probe images: zeros, ones, channel index + 1, pixel index + 1, uniform random."""
    c, h, w = shape[1:]
    n = c * h * w
    index = torch.arange(1, n + 1, dtype=torch.float64).reshape(1, c, h, w)
    chan = torch.arange(1, c + 1, dtype=torch.float64).reshape(1, c, 1, 1).expand(1, c, h, w)
    rng = np.random.default_rng(0)
    images = {
        "zeros": torch.zeros(1, c, h, w, dtype=torch.float64),
        "ones": torch.ones(1, c, h, w, dtype=torch.float64),
        "channel": chan.contiguous(),
        "index": index,
        "random": torch.from_numpy(rng.random((1, c, h, w))),
    }
    return {k: v.to(dtype) for k, v in images.items()}


def _run_prefix(
    model: nn.Module, forward: Callable, target: nn.Module, image: torch.Tensor
) -> np.ndarray:
    """Run the forward on ``image`` up to ``target`` and return what ``target`` receives."""
    box: list[torch.Tensor | None] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        box.append(first_tensor(args, kwargs))
        raise Abort

    handle = target.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        forward(model, image)
    except Abort:
        pass
    except Exception as err:  # the model cannot run its prefix on CPU values
        raise MapError(f"{type(err).__name__}: {str(err).splitlines()[0][:200]}") from err
    finally:
        handle.remove()
    if not box or box[0] is None:
        raise MapError("the probe forward did not reach the first layer")
    if box[0].device.type == "meta":
        raise MapError("the values reaching the first layer come from meta tensors (buffers)")
    return box[0].detach().to("cpu", torch.float64).numpy()


def _probe_outputs(
    run: Callable[[torch.Tensor], np.ndarray], shape: tuple[int, ...]
) -> tuple[dict[str, np.ndarray], dict[str, torch.Tensor]]:
    error: MapError | None = None
    for dtype in (torch.float64, torch.float32):
        images = _probe_images(shape, dtype)
        try:
            return {k: run(v) for k, v in images.items()}, images
        except MapError as err:
            error = err
    assert error is not None
    raise error


def _order_name(features: Sequence[tuple[int, int, int]], footprint: Pair, channels: int) -> str:
    fh, fw = footprint
    cdd = [(c, y, x) for c in range(channels) for y in range(fh) for x in range(fw)]
    ddc = [(c, y, x) for y in range(fh) for x in range(fw) for c in range(channels)]
    if list(features) == cdd:
        return "(c, dy, dx)"
    if list(features) == ddc:
        return "(dy, dx, c)"
    return "custom"


def _map_flags(
    kind: str, imap: InputMap, scale: np.ndarray, offset: np.ndarray, channels: int
) -> tuple[dict[str, Any], tuple | None, tuple | None]:
    flags: dict[str, Any] = {}
    affine = not (np.allclose(scale, 1.0, atol=1e-7) and np.allclose(offset, 0.0, atol=1e-7))
    transforms = []
    if not imap.exact:
        transforms.append("resampled")
    if affine:
        transforms.append("affine per channel")
    if imap.is_channel_map and not imap.in_order:
        transforms.append("channel permutation")
    if imap.origin != (0, 0):
        transforms.append("padding")
    if kind == "linear":
        flags["patch_order"] = _order_name(imap.features, imap.footprint, channels)
    elif not imap.is_channel_map:
        fh, fw = imap.footprint
        flags["space_to_depth"] = fh if (fh, fw) == imap.grid and fh == fw else [fh, fw]
        flags["space_to_depth_order"] = _order_name(imap.features, imap.footprint, channels)
    if transforms:
        flags["input_transform"] = "; ".join(transforms)
    if not affine:
        return flags, None, None
    return flags, tuple(float(v) for v in scale), tuple(float(v) for v in offset)


def probe_input_map(
    tracer: Tracer,
    model: nn.Module,
    forward: Callable,
    shape: tuple[int, ...],
    primary: Branch,
    target: nn.Module,
) -> tuple[InputMap | None, dict[str, Any], tuple | None, tuple | None]:
    """The input map of the first layer, its flags and the input affine ``(scale, offset)``
    (``None`` for the identity); the map is ``None`` when the probe fails."""
    channels = shape[1]
    if id(tracer.source) in tracer.valueless:
        reason = "it is computed from buffers, which have no values on the meta device"
        return _unknown_map(primary, channels, reason)
    if tracer.source is tracer.image and primary.kind == "conv":
        size = (shape[-2], shape[-1]) if len(shape) == 4 else None
        return dataclasses.replace(InputMap.identity(channels), size=size), {}, None, None
    try:
        if len(shape) != 4:
            raise MapError(f"the probe needs an (N, C, H, W) input, not {shape}")
        if tracer.source is tracer.image:
            images = _probe_images(shape, torch.float64)
            outs = {k: v.numpy() for k, v in images.items()}
        else:
            outs, images = _probe_outputs(
                functools.partial(_run_prefix, model, forward, target), shape
            )
        imap, scale, offset = derive_input_map(outs, images, primary.kind)
    except MapError as err:
        return _unknown_map(primary, channels, str(err))
    flags, a, b = _map_flags(primary.kind, imap, scale, offset, channels)
    return imap, flags, a, b


def _unknown_map(
    primary: Branch, channels: int, reason: str
) -> tuple[None, dict[str, Any], None, None]:
    """No input map: fine for a conv reading ``C`` channels, fatal for a linear layer."""
    if primary.kind == "linear":
        raise UnsupportedModel(
            f"the linear layer '{primary.module}' does not read image patches: {reason}"
        )
    detail = f"unknown ({reason})"
    if primary.in_channels == channels:
        detail += "; its channels are taken to be the image channels"
    return None, {"input_map": detail}, None, None
