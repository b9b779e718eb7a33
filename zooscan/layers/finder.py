""":func:`find_first_layer`: trace, build the branches, probe the input map, assemble."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from zooscan.errors import FirstLayerNotFound
from zooscan.layers.branches import branch_flags, branch_from_hit, choose_combination
from zooscan.layers.kernels import reference_branch
from zooscan.layers.parts import Branch, InputMap
from zooscan.layers.probe import probe_input_map
from zooscan.layers.spec import LayerSpec
from zooscan.layers.tracing import Abort, Stop, Tracer


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _default_forward(model: nn.Module, x: torch.Tensor) -> Any:
    return model(x)


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("meta")


def find_first_layer(
    model: nn.Module,
    input_shape: tuple[int, ...] = (1, 3, 224, 224),
    *,
    example_input: torch.Tensor | None = None,
    forward: Callable[[nn.Module, torch.Tensor], Any] | None = None,
) -> LayerSpec:
    """Find the first layer of ``model`` (normally built on the ``meta`` device).

    Runs a dummy forward on an ``input_shape`` input (or ``example_input``) with hooks
    and stops it as soon as the first layer and its branches are known. ``forward``
    (``forward(model, x)``) adapts models whose forward takes something else than the
    image tensor (``pixel_values=x``, dict inputs). The channel count ``C`` is
    ``input_shape[1]``. The model is put in eval mode during the search and restored.

    Raises :class:`~zooscan.errors.FirstLayerNotFound` when no 2-D convolution or
    linear layer consumes the image (directly or after parameter-free transforms) and
    :class:`~zooscan.errors.UnsupportedModel` when the first layer is not a 2-D one
    (``Conv3d``, ``Conv1d``, transposed) or its branches have no single equivalent kernel.
    """
    forward = forward or _default_forward
    if example_input is None:
        x = torch.zeros(input_shape, device=_model_device(model))
    else:
        x = example_input
    shape = tuple(int(s) for s in x.shape)
    tracer = Tracer(model, x)
    with _eval_mode(model), torch.no_grad():
        _trace(tracer, model, forward, x, shape)
        params = {n for n, _ in model.named_parameters()}
        branches = [branch_from_hit(h, params) for h in tracer.hits]
        combination, branches, flags = choose_combination(tracer, branches)
        primary = branches[0]
        target = tracer.hits[tracer.hit_index[primary.module]].module
        imap, map_flags, scale, offset = probe_input_map(
            tracer, model, forward, shape, primary, target
        )
    extra = branch_flags(branches, tracer)
    others = flags.pop("other_image_consumers", []) + extra.pop("other_image_consumers", [])
    flags.update(map_flags)
    flags.update(extra)
    if others:
        flags["other_image_consumers"] = others
    return _assemble(branches, combination, shape, imap, flags, scale, offset)


def _trace(
    tracer: Tracer, model: nn.Module, forward: Callable, x: torch.Tensor, shape: tuple
) -> None:
    try:
        with tracer.hooked(), tracer:
            forward(model, x)
    except Abort:
        pass
    except Stop as stop:
        raise stop.error from None
    except Exception as err:
        if not tracer.hits:
            first = str(err).splitlines()[0][:300] if str(err) else ""
            raise FirstLayerNotFound(
                f"the forward of {type(model).__name__} on a {shape} input failed before any "
                f"layer consumed the image: {type(err).__name__}: {first}"
            ) from err
    if not tracer.hits:
        detail = f" (it only reaches {tracer.first_break})" if tracer.first_break else ""
        raise FirstLayerNotFound(
            f"no Conv2d or Linear layer of {type(model).__name__} consumes the image input "
            f"{shape}{detail}"
        )


def _assemble(
    branches: list[Branch],
    combination: str,
    shape: tuple[int, ...],
    imap: InputMap | None,
    flags: dict[str, Any],
    scale: tuple | None,
    offset: tuple | None,
) -> LayerSpec:
    primary = reference_branch(branches)
    kind = "fused" if combination != "single" else primary.kind
    if combination == "concat":
        out_channels = sum(b.out_channels for b in branches)
    else:
        out_channels = primary.out_channels
    bias = any(b.bias for b in branches) or (combination == "sum" and any(b.bn for b in branches))
    spec = LayerSpec(
        module="+".join(b.module for b in branches),
        kind=kind,
        branches=branches,
        in_channels=shape[1],
        stride=(1, 1),
        padding=(0, 0),
        dilation=(1, 1),
        groups=1,
        bias=bias,
        flags=flags,
        input_scale=scale,
        input_offset=offset,
        out_channels=out_channels,
        combination=combination,
        input_map=imap,
        input_shape=shape,
    )
    geometry = spec.geometry(True)
    spec.kernel_size = geometry["kernel_size"]
    spec.stride, spec.padding = geometry["stride"], geometry["padding"]
    spec.dilation, spec.groups = geometry["dilation"], geometry["groups"]
    return spec
