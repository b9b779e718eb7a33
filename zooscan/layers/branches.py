"""Turn the traced consumers into :class:`~zooscan.layers.Branch` records.

Each branch gets the geometry its forward really applies (padding added before
``F.conv2d`` included) and its weight standardisation; several branches are checked
to combine into one layer (``single``, ``sum`` or ``concat``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import nn

from zooscan.errors import UnsupportedModel
from zooscan.layers.kernels import (
    centre,
    conv_branches,
    fused_kernel_size,
    reference_branch,
    same_total,
)
from zooscan.layers.parts import Branch, Pair, WeightStandardization
from zooscan.layers.tracing import Hit, Tracer


def _pair(value: Any) -> Pair:
    if isinstance(value, (tuple, list)):
        return (int(value[0]), int(value[-1]))
    return (int(value), int(value))


def branch_from_hit(hit: Hit, params: set[str]) -> Branch:
    """The :class:`Branch` of one traced consumer (``params``: the model's parameter names)."""
    module = hit.module
    if hit.kind == "identity":
        n = int(getattr(module, "num_features", hit.input_shape[1]))
        return Branch(
            module=hit.name, kind="identity", weight_key="", bn=hit.name, out_channels=n,
            in_channels=n, module_class=type(module).__name__, **_bn_fields(module),
        )  # fmt: skip
    key = f"{hit.name}.weight" if hit.name else "weight"
    if key not in params:
        raise UnsupportedModel(
            f"the weight of the first layer '{hit.name}' is not a stored parameter "
            "(weight normalisation or another parametrisation computes it)"
        )
    bn = _bn_fields(hit.bn_module) if hit.bn_module is not None else {}
    common = {
        "module": hit.name,
        "kind": hit.kind,
        "weight_key": key,
        "bn": hit.bn,
        "bias": getattr(module, "bias", None) is not None,
        "module_class": type(module).__name__,
        "standardization": _standardization(hit),
        **bn,
    }
    if hit.kind == "linear":
        return Branch(out_channels=module.out_features, in_channels=module.in_features, **common)
    call = hit.call or {}
    return Branch(
        kernel_size=_pair(module.kernel_size),
        stride=_pair(call.get("stride", module.stride)),
        padding=_conv_padding(hit),
        dilation=_pair(call.get("dilation", module.dilation)),
        groups=int(call.get("groups", module.groups)),
        out_channels=module.out_channels,
        in_channels=module.in_channels,
        **common,
    )


def _bn_fields(module: nn.Module) -> dict[str, Any]:
    return {"bn_eps": float(module.eps), "bn_affine": bool(module.affine)}


def _standardization(hit: Hit) -> WeightStandardization | None:
    module = hit.module
    eps = hit.std_eps
    if eps is None and "stdconv" in type(module).__name__.lower() and hasattr(module, "eps"):
        eps, hit.std_scaled = float(module.eps), hasattr(module, "gain")
    if eps is None:
        return None
    if not hit.std_scaled:
        return WeightStandardization(eps=eps)
    gain, scale = getattr(module, "gain", None), getattr(module, "scale", None)
    if not isinstance(gain, nn.Parameter) or not isinstance(scale, (int, float)):
        raise UnsupportedModel(
            f"'{hit.name}' rescales its standardised weight in a way zooscan does not "
            "recognise (expected a `gain` parameter and a constant `scale`)"
        )
    return WeightStandardization(eps=eps, gain_key=f"{hit.name}.gain", scale=float(scale))


def _conv_padding(hit: Hit) -> Pair | str:
    """The padding the conv applies, including padding its forward adds before F.conv2d."""
    module, call = hit.module, hit.call
    if call is None:
        padding = module.padding
        return padding if isinstance(padding, str) else _pair(padding)
    padding = call["padding"]
    if isinstance(padding, str):
        return "same" if padding.lower() == "same" else (0, 0)
    padding = _pair(padding)
    extra = [call["input_shape"][i] - hit.input_shape[i] for i in (-2, -1)]
    if extra == [0, 0]:
        return padding
    if getattr(module, "padding_mode", "zeros") != "zeros":
        return _pair(module.padding)
    k, s, d = _pair(module.kernel_size), _pair(call["stride"]), _pair(call["dilation"])
    same = [same_total(hit.input_shape[i - 2], k[i], s[i], d[i]) for i in (0, 1)]
    if padding == (0, 0) and extra == same:
        return "same"
    if all(e % 2 == 0 for e in extra):
        return (padding[0] + extra[0] // 2, padding[1] + extra[1] // 2)
    return "same"


def choose_combination(tracer: Tracer, branches: list[Branch]) -> tuple[str, list[Branch], dict]:
    """How the branches make one layer: ``single``, ``sum`` or ``concat``."""
    if len(branches) == 1:
        return "single", branches, {}
    everything = set(range(len(branches)))
    combo = next((t for t in tracer.combos if set(t.branches) == everything), None)
    names = "+".join(b.module for b in branches)
    if combo is None:
        first = next(b for b in branches if b.kind != "identity")
        others = [b.module for b in branches if b is not first]
        return "single", [first], {"other_image_consumers": others}
    if any(b.kind == "linear" for b in branches):
        raise UnsupportedModel(f"several linear layers consume the image together ({names})")
    if combo.kind == "sum":
        with_bn = tuple(i for i, b in enumerate(branches) if b.bn is not None)
        if not combo.linear or combo.folded != with_bn:
            raise UnsupportedModel(
                f"the branches {names} consuming the image are combined non-linearly, so "
                "they have no single equivalent kernel"
            )
        ordered = sorted(
            branches,
            key=lambda b: (b.kind == "identity", -b.kernel_size[0] * b.kernel_size[1]),
        )
        _check_fusable(ordered, names)
        return "sum", ordered, {"fused_branches": len(branches), "branch_combination": "sum"}
    ordered = [branches[i] for i in combo.branches]
    if any(b.kind == "identity" for b in ordered):
        raise UnsupportedModel(f"an input BatchNorm is concatenated with convolutions ({names})")
    _check_fusable(ordered, names)
    return "concat", ordered, {"fused_branches": len(branches), "branch_combination": "concat"}


def _check_fusable(branches: list[Branch], names: str) -> None:
    """Raise unless the branches share one output grid (same stride, centred kernels)."""
    primary = reference_branch(branches)
    for b in conv_branches(branches):
        if (b.stride, b.groups) != (primary.stride, primary.groups) or b.dilation != (1, 1):
            raise UnsupportedModel(
                f"the branches {names} differ in stride, groups or dilation; they have no "
                "single equivalent kernel"
            )
    for b in branches:
        if b.kind == "identity" and (
            primary.stride != (1, 1) or b.out_channels != primary.out_channels
        ):
            raise UnsupportedModel(
                f"the identity branch of {names} does not match the convolutions"
            )
        centre(np.zeros((1, 1, *((1, 1) if b.kind == "identity" else b.kernel_size))), b,
                fused_kernel_size(branches), primary.padding, names)  # fmt: skip


def branch_flags(branches: list[Branch], tracer: Tracer) -> dict[str, Any]:
    """Flags about the chosen branches: other image consumers, standardisation,
    unrecognised weight transforms, non-zero padding modes."""
    flags: dict[str, Any] = {}
    others = [b.module for b in branches]  # names not already in the layer
    consumers = [n for n in tracer.other_consumers if n not in others]
    if consumers:
        flags["other_image_consumers"] = consumers
    std = [b.standardization for b in branches if b.standardization is not None]
    if std:
        flags["standardized"] = True
        if any(s.gain_key for s in std):
            flags["standardization"] = "scaled"
    for b in branches:
        hit = tracer.hits[tracer.hit_index[b.module]]
        if (
            hit.call is not None
            and not hit.call["weight_is_parameter"]
            and b.standardization is None
        ):
            flags["weight_transform"] = (
                f"'{b.module}' transforms its weight in forward in a way "
                "zooscan does not recognise; the stored weight is used as is"
            )
        if getattr(hit.module, "padding_mode", "zeros") != "zeros":
            flags["padding_mode"] = hit.module.padding_mode
    return flags
