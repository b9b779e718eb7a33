"""Find the first layer of any ``torch.nn.Module`` and turn it into one kernel.

The *first layer* (DESIGN §1) is the first 2-D convolution or linear layer applied to
the image input, possibly after parameter-free transforms (padding, space-to-depth,
flattening into patches, a fixed per-channel affine). :func:`find_first_layer` finds it
without weights:

1. **Trace.** The model, normally built on the ``meta`` device, runs one dummy forward
   under a :class:`~torch.overrides.TorchFunctionMode` that labels every tensor:
   *derived* (computed from the image by parameter-free operations), *tainted*
   (depends on the image through a learned parameter) or *parametric*. Forward
   pre-hooks on the modules see which tensor each ``Conv2d``/``Linear`` (subclasses
   included) consumes. The first one whose input is *derived* is the first layer.
2. **Branches.** The forward goes on while further convolutions consume the very same
   tensor object (re-parameterisable stems: RepVGG, MobileOne), recording the
   BatchNorm that follows each one and how their outputs are combined (summed, or
   concatenated). It is aborted, by an exception raised from a hook, at the first
   convolution or linear layer that consumes anything else, so the network is never
   run to the end.
3. **Probe.** When the first layer does not consume the image tensor itself, the
   parameter-free part of the forward before it is replayed on small CPU probe
   images (zeros, ones, channel index, pixel index, random): a meta model runs that
   part on CPU since it touches no parameter. This shows, for every value the layer
   reads, which image pixel it comes from and with which per-channel affine, hence the
   exact channel order of space-to-depth stems, the flatten order of linear patch
   embeddings, explicit padding, channel permutations and fixed input transforms
   (torchvision GoogLeNet/Inception3 ``transform_input``).

:class:`LayerSpec` holds the result. :meth:`LayerSpec.materialize` turns the
state-dict tensors it names (:attr:`LayerSpec.parameter_names`) into one
``(out, C, kh, kw)`` kernel in the image-input space: weight standardisation applied
(timm ``StdConv2d``/``ScaledStdConv2d``), summed branches fused with their BatchNorms
folded in, and space-to-depth or patch-embedding weights re-indexed so that the
kernel is applied to image patches flattened in ``(c, kh, kw)`` order, the order of
``weight.reshape(out, -1)``.

Decisions: 3-D, 1-D and transposed convolutions are not 2-D first layers
(:class:`~zooscan.errors.UnsupportedModel`); an image that reaches every
convolution only through a learned layer (an input BatchNorm, a LayerNorm before a
patch projection) has no first layer (:class:`~zooscan.errors.FirstLayerNotFound`);
the BatchNorm after a single convolution is not folded (the stored weight is what the
checkpoint holds), it is folded only where several branches are summed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.overrides import TorchFunctionMode

from zooscan.errors import CheckpointError, FirstLayerNotFound, UnsupportedModel
from zooscan.records import FirstLayer, Provenance

__all__ = [
    "Branch",
    "InputMap",
    "LayerSpec",
    "WeightStandardization",
    "build_on_meta",
    "find_first_layer",
    "space_to_depth_kernel",
]

Pair = tuple[int, int]
TensorLike = Any  # np.ndarray | torch.Tensor


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class WeightStandardization:
    """How a weight-standardised convolution rescales its stored weight in ``forward``.

    The applied weight is ``(w - mean) / sqrt(var + eps)`` per output filter (biased
    variance, as ``F.batch_norm(..., training=True)`` computes it), times
    ``gain * scale`` for scaled weight standardisation (NFNets).
    """

    eps: float
    gain_key: str | None = None
    """State-dict key of the per-filter gain (``ScaledStdConv2d.gain``), if any."""
    scale: float = 1.0
    """Constant factor applied with the gain (``ScaledStdConv2d.scale``)."""


@dataclass
class Branch:
    """One layer that consumes the image input (a stem may have several)."""

    module: str
    """Dotted module name (for an identity branch, the BatchNorm applied to the input)."""
    kind: str
    """``conv``, ``linear``, or ``identity`` (a BatchNorm on the input, summed with convs)."""
    weight_key: str
    """State-dict key of the weight (empty for an identity branch)."""
    bn: str | None = None
    """Dotted name of a BatchNorm applied directly to this branch's output, else ``None``."""
    kernel_size: Pair = (1, 1)
    stride: Pair = (1, 1)
    padding: Pair | str = (0, 0)
    """As applied by the layer's forward: a pair, or ``"same"`` for TF-style dynamic padding."""
    dilation: Pair = (1, 1)
    groups: int = 1
    bias: bool = False
    out_channels: int = 0
    in_channels: int = 0
    """Channels (conv) or features (linear) of the tensor the layer consumes."""
    module_class: str = ""
    bn_eps: float = 1e-5
    bn_affine: bool = True
    standardization: WeightStandardization | None = None

    def _key(self, name: str) -> str:
        return f"{self.module}.{name}" if self.module else name

    @property
    def bias_key(self) -> str | None:
        """State-dict key of the layer's own bias (``None`` when it has none)."""
        return self._key("bias") if self.bias and self.kind != "identity" else None

    def bn_keys(self) -> dict[str, str]:
        """State-dict keys of the following BatchNorm (empty when there is none)."""
        if self.bn is None:
            return {}
        names = ["running_mean", "running_var"] + (["weight", "bias"] if self.bn_affine else [])
        return {n: f"{self.bn}.{n}" for n in names}


@dataclass(frozen=True)
class InputMap:
    """How the tensor the first layer consumes is read from the image.

    Position ``(Y, X)`` of that tensor (a spatial position for a convolution, a token
    for a linear layer) and its channel/feature ``f`` hold
    ``scale[c] * image[c, origin_h + Y*grid_h + dy, origin_w + X*grid_w + dx] + offset[c]``
    with ``(c, dy, dx) = features[f]``, or a constant where that pixel is outside the
    image (padding).
    """

    features: tuple[tuple[int, int, int], ...]
    """For each consumed channel (conv) or feature (linear): ``(image channel, dy, dx)``."""
    footprint: Pair = (1, 1)
    """Image window read at one position: ``(max dy + 1, max dx + 1)``."""
    grid: Pair = (1, 1)
    """Image pixels between neighbouring positions of the consumed tensor."""
    origin: Pair = (0, 0)
    """Image pixel read at position ``(0, 0)`` with offset ``(0, 0)`` (negative: padding)."""
    exact: bool = True
    """``False`` when the input is resampled (resized) first: only the channels are mapped."""
    size: Pair | None = None
    """Spatial size ``(H', W')`` of the consumed tensor (convolutions; ``None`` if unknown)."""

    @property
    def is_channel_map(self) -> bool:
        """True when each consumed channel is one image channel at the same pixel."""
        return (
            self.footprint == (1, 1)
            and self.grid == (1, 1)
            and all(dy == 0 and dx == 0 for _, dy, dx in self.features)
        )

    @property
    def in_order(self) -> bool:
        """True when consumed channel ``f`` reads image channel ``f``."""
        return all(c == f for f, (c, _, _) in enumerate(self.features))

    @property
    def is_identity(self) -> bool:
        """True when the layer reads the image unchanged (up to a per-channel affine)."""
        return self.is_channel_map and self.origin == (0, 0) and self.in_order

    @classmethod
    def identity(cls, channels: int) -> InputMap:
        """The map of a layer that consumes the image itself."""
        return cls(features=tuple((c, 0, 0) for c in range(channels)))


@dataclass
class LayerSpec:
    """The first layer of an architecture: which tensors define it and how to build it.

    ``stride``, ``padding``, ``dilation``, ``groups`` and ``kernel_size`` describe the
    kernel :meth:`materialize` returns by default, applied to the image: for a
    space-to-depth stem the equivalent ``(b*k) x (b*k)`` kernel with stride ``b*s``,
    for a linear patch embedding the ``p x p`` patch with the patch stride. Use
    :meth:`geometry` for the unconverted variant.
    """

    module: str
    """Primary module name; branch names joined with ``+`` for fused stems."""
    kind: str
    """``conv``, ``linear`` or ``fused``."""
    branches: list[Branch]
    in_channels: int
    """Channels ``C`` of the image input."""
    stride: Pair
    padding: Pair | str
    dilation: Pair
    groups: int
    bias: bool
    flags: dict[str, Any] = field(default_factory=dict)
    input_scale: tuple[float, ...] | None = None
    """Per image channel ``a_c`` of a fixed affine the model applies before the layer."""
    input_offset: tuple[float, ...] | None = None
    """Per image channel ``b_c``: the layer sees ``a_c * x_c + b_c``; ``None`` = identity."""
    kernel_size: Pair = (1, 1)
    out_channels: int = 0
    combination: str = "single"
    """``single``, ``sum`` (branches summed) or ``concat`` (branch outputs concatenated)."""
    input_map: InputMap | None = None
    """How the consumed tensor is read from the image; ``None`` when the probe failed."""
    input_shape: tuple[int, ...] = ()

    # ------------------------------------------------------------------ names

    @property
    def weight_key(self) -> str:
        """State-dict key of the layer's weight; ``+``-joined keys for fused stems
        (like :attr:`module` and :attr:`zooscan.records.Provenance.tensor_key`)."""
        return "+".join(self.weight_keys)

    @property
    def weight_keys(self) -> list[str]:
        """State-dict keys of the branch weights (what the checkpoint calls the layer)."""
        return [b.weight_key for b in self.branches if b.weight_key]

    @property
    def parameter_names(self) -> list[str]:
        """Every state-dict key :meth:`materialize` reads.

        Branch weights and standardisation gains; for summed branches also the
        BatchNorm weight/bias/running_mean/running_var and the branch biases, which
        define the fused layer (and its bias) together.
        """
        names: list[str] = []
        for b in self.branches:
            names += [b.weight_key] if b.weight_key else []
            if b.standardization and b.standardization.gain_key:
                names.append(b.standardization.gain_key)
            if self.combination == "sum":
                names += list(b.bn_keys().values())
                names += [b.bias_key] if b.bias_key else []
        return list(dict.fromkeys(names))

    @property
    def bias_parameter_names(self) -> list[str]:
        """Every state-dict key :meth:`effective_bias` reads."""
        names = list(self.parameter_names)
        for b in self.branches:
            names += [b.bias_key] if b.bias_key else []
        return list(dict.fromkeys(names))

    # --------------------------------------------------------------- geometry

    @property
    def _is_space_to_depth(self) -> bool:
        m = self.input_map
        return self.kind != "linear" and m is not None and not m.is_channel_map

    def geometry(self, convert_space_to_depth: bool = True) -> dict[str, Any]:
        """``kernel_size``, ``stride``, ``padding``, ``dilation``, ``groups`` of the kernel
        :meth:`materialize` returns with the same ``convert_space_to_depth``."""
        b = _reference(self.branches)
        m = self.input_map
        origin = m.origin if m is not None else (0, 0)
        if self.kind == "linear":
            if m is None:
                return _geom(b.kernel_size, (1, 1), (0, 0), (1, 1), 1)
            return _geom(m.footprint, m.grid, (-origin[0], -origin[1]), (1, 1), 1)
        kernel = _fused_kernel_size(self.branches)
        if m is None or (self._is_space_to_depth and not convert_space_to_depth):
            return _geom(kernel, b.stride, b.padding, b.dilation, b.groups)
        if m.is_channel_map:
            padding = self._image_padding(b, kernel, b.stride, b.dilation)
            return _geom(kernel, b.stride, padding, b.dilation, b.groups)
        size = tuple((kernel[i] - 1) * b.dilation[i] * m.grid[i] + m.footprint[i] for i in range(2))
        stride = (b.stride[0] * m.grid[0], b.stride[1] * m.grid[1])
        padding = self._image_padding(b, size, stride, (1, 1))
        return _geom(size, stride, padding, (1, 1), b.groups)

    def _image_padding(self, b: Branch, kernel: Pair, stride: Pair, dilation: Pair) -> Pair | str:
        """Padding in image pixels: the layer's own plus any applied before it.

        Leading padding is returned; where leading and trailing padding differ the way
        TensorFlow's SAME padding makes them differ, ``"same"``.
        """
        m = self.input_map
        assert m is not None
        before = _shift_padding(b.padding, m.grid, m.origin)
        if isinstance(before, str) or m.size is None or len(self.input_shape) != 4:
            return before
        image = self.input_shape[2:]
        after = tuple(
            b.padding[i] * m.grid[i] + m.origin[i] + (m.size[i] - 1) * m.grid[i]
            + m.footprint[i] - image[i]
            for i in range(2)
        )  # fmt: skip
        if after == before:
            return before
        same = [_same_total(image[i], kernel[i], stride[i], dilation[i]) for i in range(2)]
        if all(before[i] + after[i] == same[i] and before[i] == same[i] // 2 for i in range(2)):
            return "same"
        return before

    # ----------------------------------------------------------- materialise

    def materialize(
        self,
        tensors: Mapping[str, TensorLike],
        *,
        convert_space_to_depth: bool = True,
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Effective kernel ``(out, C, kh, kw)`` float32 in the image-input space + flags.

        ``tensors`` maps state-dict keys (at least :attr:`parameter_names`) to arrays
        or tensors. The kernel is what the layer applies (standardised, branches
        fused), re-indexed onto image pixels: flattening it with ``reshape(out, -1)``
        gives the ``(c, kh, kw)`` patch order. With ``convert_space_to_depth=False`` a
        space-to-depth stem keeps its ``(out, C*b*b, k, k)`` kernel. The model's
        per-channel input affine (:attr:`input_scale`) is not folded in (see
        :meth:`to_first_layer`).
        """
        kernel = self._stem_kernel(tensors)
        kernel, converted = self._to_image_space(kernel, convert_space_to_depth)
        flags = dict(self.flags)
        if "space_to_depth" in flags:
            flags["space_to_depth_converted"] = converted
        return kernel.astype(np.float32), flags

    def effective_bias(self, tensors: Mapping[str, TensorLike]) -> np.ndarray | None:
        """The bias added to the :meth:`materialize` kernel's output, ``(out,)`` float32.

        Summed branches: their biases with the BatchNorms folded in; concatenated
        branches: stacked; ``None`` when the layer has no bias. It applies to the
        layer's own input (the input affine of :attr:`input_offset` is not folded in).
        """
        if self.combination == "sum":
            total = sum(_folded_bias(b, tensors, self.module) for b in self.branches)
            return np.asarray(total, dtype=np.float32)
        if not any(b.bias for b in self.branches):
            return None
        parts = []
        for b in self.branches:
            if b.bias_key:
                parts.append(_load(tensors, b.bias_key, self.module).reshape(-1))
            else:
                parts.append(np.zeros(b.out_channels))
        return np.concatenate(parts).astype(np.float32)

    def to_first_layer(
        self,
        tensors: Mapping[str, TensorLike],
        *,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        channel_order: str = "RGB",
        input_size: tuple[int, int] | None = None,
        provenance: Provenance | None = None,
        metadata: Mapping[str, Any] | None = None,
        convert_space_to_depth: bool = True,
    ) -> FirstLayer:
        """Build the :class:`~zooscan.records.FirstLayer` of this layer.

        ``mean``/``std`` are the model's own input normalisation (pixels in
        ``[0, 1]``, in ``channel_order``); they are recorded in
        ``metadata["model_mean"]``/``["model_std"]``. The record's mean/std are the
        *effective* ones: with the model's fixed input affine the layer sees
        ``a*(p - mean)/std + b = (p - (mean - b*std/a)) / (std/a)``. For an
        unconverted space-to-depth kernel they are repeated per consumed channel and
        the channel order becomes ``other``.
        """
        weight, flags = self.materialize(tensors, convert_space_to_depth=convert_space_to_depth)
        geometry = self.geometry(convert_space_to_depth)
        eff_mean, eff_std = self._effective_normalisation(mean, std)
        order = channel_order
        if flags.get("space_to_depth_converted") is False and self.input_map is not None:
            chans = [c for c, _, _ in self.input_map.features]
            eff_mean = None if eff_mean is None else tuple(eff_mean[c] for c in chans)
            eff_std = None if eff_std is None else tuple(eff_std[c] for c in chans)
            order = "other"
        prov = dataclasses.replace(provenance) if provenance is not None else Provenance()
        if prov.tensor_key is None:
            prov.tensor_key = self.weight_key
        meta = dict(metadata or {})
        meta["model_mean"] = None if mean is None else [float(v) for v in mean]
        meta["model_std"] = None if std is None else [float(v) for v in std]
        return FirstLayer(
            weight=weight,
            module=self.module,
            kind=self.kind,
            stride=geometry["stride"],
            padding=geometry["padding"],
            dilation=geometry["dilation"],
            groups=geometry["groups"],
            bias=self.bias,
            mean=eff_mean,
            std=eff_std,
            channel_order=order,
            input_size=input_size,
            flags=flags,
            provenance=prov,
            metadata=meta,
        )

    # ----------------------------------------------------------- internals

    def _effective_normalisation(
        self, mean: Sequence[float] | None, std: Sequence[float] | None
    ) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
        c = self.in_channels
        for name, values in (("mean", mean), ("std", std)):
            if values is not None and len(values) != c:
                raise UnsupportedModel(
                    f"{name} has {len(values)} values but the first layer '{self.module}' "
                    f"reads {c} image channels"
                )
        if self.input_scale is None:
            return _tuple_or_none(mean), _tuple_or_none(std)
        m = np.zeros(c) if mean is None else np.asarray(mean, dtype=np.float64)
        s = np.ones(c) if std is None else np.asarray(std, dtype=np.float64)
        a = np.asarray(self.input_scale, dtype=np.float64)
        b = np.asarray(self.input_offset or (0.0,) * c, dtype=np.float64)
        return tuple((m - b * s / a).tolist()), tuple((s / a).tolist())

    def _stem_kernel(self, tensors: Mapping[str, TensorLike]) -> np.ndarray:
        """The kernel the layer applies to its own input (before re-indexing)."""
        if self.combination == "single":
            return _applied_weight(self.branches[0], tensors, self.module)
        size = _fused_kernel_size(self.branches)
        pad = _reference(self.branches).padding
        parts = []
        for b in self.branches:
            w = _applied_weight(b, tensors, self.module) if b.kind != "identity" else None
            if self.combination == "sum":
                w = _identity_kernel(b, _reference(self.branches)) if w is None else w
                w = w * _bn_factor(b, tensors, self.module)[:, None, None, None]
            parts.append(_centre(w, b, size, pad, self.module))
        if self.combination == "sum":
            return np.sum(parts, axis=0)
        return np.concatenate(parts, axis=0)

    def _to_image_space(self, kernel: np.ndarray, convert: bool) -> tuple[np.ndarray, bool]:
        m = self.input_map
        b = _reference(self.branches)
        if self.kind == "linear":
            if m is None:
                raise UnsupportedModel(
                    f"cannot tell which image pixels the linear layer '{self.module}' reads "
                    f"({self.flags.get('input_map', 'no input map')})"
                )
            w4 = kernel.reshape(kernel.shape[0], kernel.shape[1], 1, 1)
            return _scatter(w4, m, (1, 1), self.in_channels), True
        if m is None:
            if kernel.shape[1] * b.groups != self.in_channels:
                raise UnsupportedModel(
                    f"cannot map the {kernel.shape[1] * b.groups} input channels of "
                    f"'{self.module}' onto the {self.in_channels} image channels "
                    f"({self.flags.get('input_map', 'no input map')})"
                )
            return kernel, False
        if m.is_channel_map and m.in_order and kernel.shape[1] * b.groups == self.in_channels:
            return kernel, False
        if m.is_channel_map:
            return _permute_channels(kernel, m, self.in_channels, b.groups, self.module), False
        if not convert:
            return kernel, False
        if b.groups != 1:
            raise UnsupportedModel(
                f"space-to-depth with a grouped convolution ('{self.module}') is not supported"
            )
        return _scatter(kernel, m, b.dilation, self.in_channels), True


def _geom(
    kernel: Sequence[int], stride: Pair, padding: Pair | str, dilation: Pair, groups: int
) -> dict[str, Any]:
    return {
        "kernel_size": (int(kernel[0]), int(kernel[1])),
        "stride": (int(stride[0]), int(stride[1])),
        "padding": padding if isinstance(padding, str) else (int(padding[0]), int(padding[1])),
        "dilation": (int(dilation[0]), int(dilation[1])),
        "groups": int(groups),
    }


def _shift_padding(padding: Pair | str, grid: Pair, origin: Pair) -> Pair | str:
    """Padding in image pixels of a layer padding ``padding`` its input (on a ``grid``)."""
    if isinstance(padding, str):
        return padding
    return (padding[0] * grid[0] - origin[0], padding[1] * grid[1] - origin[1])


def _tuple_or_none(values: Sequence[float] | None) -> tuple[float, ...] | None:
    return None if values is None else tuple(float(v) for v in values)


# ------------------------------------------------------------------ kernel maths


def _load(tensors: Mapping[str, TensorLike], key: str, module: str) -> np.ndarray:
    if key not in tensors:
        raise CheckpointError(f"no tensor '{key}' (needed for the first layer '{module}')")
    value = tensors[key]
    if isinstance(value, torch.Tensor):
        if value.device.type == "meta":
            raise CheckpointError(f"tensor '{key}' is on the meta device (it has no values)")
        return value.detach().to("cpu", torch.float64).numpy()
    return np.asarray(value, dtype=np.float64)


def _applied_weight(b: Branch, tensors: Mapping[str, TensorLike], module: str) -> np.ndarray:
    """The weight the branch applies in its forward, 4-D (linear: ``(out, in, 1, 1)``)."""
    w = _load(tensors, b.weight_key, module)
    if b.kind == "linear":
        expected: tuple[int, ...] = (b.out_channels, b.in_channels)
    else:
        expected = (b.out_channels, b.in_channels // b.groups, *b.kernel_size)
    if tuple(w.shape) != expected:
        raise CheckpointError(
            f"tensor '{b.weight_key}' has shape {tuple(w.shape)}, the architecture expects "
            f"{expected}"
        )
    if b.standardization is not None:
        w = _standardize(w, b.standardization, tensors, module)
    return w.reshape(w.shape[0], w.shape[1], 1, 1) if b.kind == "linear" else w


def _standardize(
    w: np.ndarray, std: WeightStandardization, tensors: Mapping[str, TensorLike], module: str
) -> np.ndarray:
    flat = w.reshape(w.shape[0], -1)
    mean = flat.mean(axis=1, keepdims=True)
    var = flat.var(axis=1, keepdims=True)
    flat = (flat - mean) / np.sqrt(var + std.eps)
    if std.gain_key is not None:
        gain = _load(tensors, std.gain_key, module).reshape(-1, 1)
        flat = flat * gain * std.scale
    return flat.reshape(w.shape)


def _bn_factor(b: Branch, tensors: Mapping[str, TensorLike], module: str) -> np.ndarray:
    """Per-output-channel multiplier of the branch's BatchNorm (ones without one)."""
    if b.bn is None:
        return np.ones(b.out_channels)
    keys = b.bn_keys()
    var = _load(tensors, keys["running_var"], module)
    gamma = _load(tensors, keys["weight"], module) if b.bn_affine else np.ones_like(var)
    return gamma / np.sqrt(var + b.bn_eps)


def _folded_bias(b: Branch, tensors: Mapping[str, TensorLike], module: str) -> np.ndarray:
    bias = _load(tensors, b.bias_key, module) if b.bias_key else np.zeros(b.out_channels)
    if b.bn is None:
        return bias
    keys = b.bn_keys()
    mean = _load(tensors, keys["running_mean"], module)
    beta = _load(tensors, keys["bias"], module) if b.bn_affine else np.zeros_like(mean)
    return (bias - mean) * _bn_factor(b, tensors, module) + beta


def _identity_kernel(b: Branch, primary: Branch) -> np.ndarray:
    """A ``1x1`` kernel copying each input channel to the same output channel."""
    n = b.out_channels
    per_group = n // primary.groups
    w = np.zeros((n, per_group, 1, 1))
    w[np.arange(n), np.arange(n) % per_group, 0, 0] = 1.0
    return w


def _reference(branches: Sequence[Branch]) -> Branch:
    """The branch with the largest kernel: it sets the fused layer's geometry."""
    convs = [b for b in branches if b.kind != "identity"]
    return max(convs, key=lambda b: b.kernel_size[0] * b.kernel_size[1])


def _fused_kernel_size(branches: Sequence[Branch]) -> Pair:
    convs = [b for b in branches if b.kind != "identity"]
    return (max(b.kernel_size[0] for b in convs), max(b.kernel_size[1] for b in convs))


def _centre_offset(b: Branch, size: Pair, padding: Pair | str) -> Pair:
    """Where a branch's kernel sits inside the fused ``size`` kernel (same output grid)."""
    k = (1, 1) if b.kind == "identity" else b.kernel_size
    if b.kind == "identity":
        if isinstance(padding, str):
            return ((size[0] - 1) // 2, (size[1] - 1) // 2)
        return padding
    if isinstance(padding, str) or isinstance(b.padding, str):
        return ((size[0] - k[0]) // 2, (size[1] - k[1]) // 2)
    return (padding[0] - b.padding[0], padding[1] - b.padding[1])


def _centre(w: np.ndarray, b: Branch, size: Pair, padding: Pair | str, module: str) -> np.ndarray:
    oy, ox = _centre_offset(b, size, padding)
    kh, kw = w.shape[-2:]
    if oy < 0 or ox < 0 or oy + kh > size[0] or ox + kw > size[1]:
        raise UnsupportedModel(
            f"branch '{b.module}' of '{module}' is not aligned with the largest branch "
            "(its padding does not centre it), so the branches have no single equivalent kernel"
        )
    out = np.zeros((*w.shape[:2], *size))
    out[:, :, oy : oy + kh, ox : ox + kw] = w
    return out


def _permute_channels(
    kernel: np.ndarray, m: InputMap, channels: int, groups: int, module: str
) -> np.ndarray:
    if groups != 1:
        raise UnsupportedModel(
            f"'{module}' is a grouped convolution reading image channels in a permuted order"
        )
    out = np.zeros((kernel.shape[0], channels, *kernel.shape[2:]))
    for f, (c, _, _) in enumerate(m.features):
        out[:, c] += kernel[:, f]
    return out


def _scatter(weight: np.ndarray, m: InputMap, dilation: Pair, channels: int) -> np.ndarray:
    """Re-index a kernel over the consumed tensor onto image pixels (see :class:`InputMap`)."""
    out_ch, n_feat, kh, kw = weight.shape
    if n_feat != len(m.features):
        raise UnsupportedModel(
            f"the layer reads {n_feat} channels but {len(m.features)} were mapped to the image"
        )
    size = [(k - 1) * dilation[i] * m.grid[i] + m.footprint[i] for i, k in enumerate((kh, kw))]
    out = np.zeros((out_ch, channels, *size))
    feats = np.asarray(m.features, dtype=np.int64)
    f, ky, kx = np.meshgrid(np.arange(n_feat), np.arange(kh), np.arange(kw), indexing="ij")
    c = feats[f, 0]
    y = ky * dilation[0] * m.grid[0] + feats[f, 1]
    x = kx * dilation[1] * m.grid[1] + feats[f, 2]
    np.add.at(
        out.transpose(1, 2, 3, 0),
        (c.ravel(), y.ravel(), x.ravel()),
        weight[:, f, ky, kx].reshape(out_ch, -1).T,
    )
    return out


def space_to_depth_kernel(
    weight: TensorLike,
    block: int,
    *,
    order: str = "pixel_unshuffle",
    dilation: int = 1,
) -> np.ndarray:
    """Equivalent image kernel of a convolution applied after a space-to-depth step.

    ``weight`` ``(out, C*b*b, k, k)`` applied with stride ``s`` to the space-to-depth
    tensor equals the returned ``(out, C, b*k, b*k)`` kernel (more with ``dilation``)
    applied to the image with stride ``b*s`` and padding ``b*p``. ``order`` is the
    channel order of the space-to-depth tensor: ``"pixel_unshuffle"``
    (``torch.nn.PixelUnshuffle``: channel ``c*b*b + dy*b + dx``) or ``"tresnet"`` (timm
    ``SpaceToDepth``: channel ``(dy*b + dx)*C + c``).
    """
    w = weight.detach().cpu().numpy() if isinstance(weight, torch.Tensor) else np.asarray(weight)
    w = w.astype(np.float64)
    n = w.shape[1]
    if n % (block * block):
        raise ValueError(f"{n} input channels are not a multiple of block*block = {block * block}")
    channels = n // (block * block)
    features = []
    for f in range(n):
        if order == "pixel_unshuffle":
            c, rest = divmod(f, block * block)
            dy, dx = divmod(rest, block)
        elif order == "tresnet":
            pos, c = divmod(f, channels)
            dy, dx = divmod(pos, block)
        else:
            raise ValueError(f"unknown space-to-depth order {order!r}")
        features.append((c, dy, dx))
    m = InputMap(features=tuple(features), footprint=(block, block), grid=(block, block))
    return _scatter(w, m, (dilation, dilation), channels).astype(np.float32)


# ------------------------------------------------------------------ tracing


class _Abort(BaseException):
    """Raised from a hook to stop the forward once the first layer is known."""


class _Stop(BaseException):
    """Raised from a hook to stop the forward with a user-facing error."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


class _Status(enum.Enum):
    DERIVED = "derived"  # parameter-free function of the image
    TAINTED = "tainted"  # depends on the image through a learned parameter
    PARAMETRIC = "parametric"  # depends on parameters only


@dataclass(frozen=True)
class _Tag:
    """What a tensor is in terms of the branches (tracked once the first layer is found)."""

    kind: str  # "single" | "sum" | "cat"
    branches: tuple[int, ...]
    linear: bool  # a linear combination of raw branch outputs and their BatchNorms
    bn_applied: bool = False  # "single": its BatchNorm has been applied
    folded: tuple[int, ...] = ()  # "sum": the branches summed after their BatchNorm

    @property
    def normalized(self) -> tuple[int, ...]:
        """The branches this tensor contains with their BatchNorm applied."""
        if self.kind == "single":
            return self.branches if self.bn_applied else ()
        return self.folded


@dataclass
class _Hit:
    name: str
    module: nn.Module
    kind: str  # "conv" | "linear" | "identity"
    input_shape: tuple[int, ...]
    call: dict[str, Any] | None = None  # the functional conv2d/linear call seen inside
    std_eps: float | None = None  # eps of a batch_norm applied to the weight inside
    std_scaled: bool = False
    bn: str | None = None
    bn_module: nn.Module | None = None


_LINEAR_KEEP = {"contiguous", "clone", "dropout", "dropout2d", "alpha_dropout", "float", "to"}
_ADD = {"add", "__add__", "__radd__", "add_", "__iadd__"}
_CAT = {"cat", "concat", "concatenate"}
_INPLACE = {"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__idiv__"}
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS = (None, None, None, 1, 0, 1, 1)
_BATCH_NORM_ARGS = ("running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    """The tensors inside nested tuples/lists/dicts."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    for item in (*args, *kwargs.values()):
        if isinstance(item, torch.Tensor):
            return item
    return None


def _pair(value: Any) -> Pair:
    if isinstance(value, (tuple, list)):
        return (int(value[0]), int(value[-1]))
    return (int(value), int(value))


def _is_layer(module: nn.Module) -> bool:
    return isinstance(module, (nn.Conv2d, nn.Linear))


class _Tracer(TorchFunctionMode):
    """Labels tensors during the dummy forward and records the first-layer branches."""

    def __init__(self, model: nn.Module, image: torch.Tensor):
        super().__init__()
        self.model = model
        self.image = image
        self.status: dict[int, _Status] = {id(p): _Status.PARAMETRIC for p in model.parameters()}
        self.status[id(image)] = _Status.DERIVED
        # tensors whose values depend on meta buffers: the CPU probe cannot replay them
        self.valueless: set[int] = {id(b) for b in model.buffers() if b.device.type == "meta"}
        self.keep: list[torch.Tensor] = [image]  # keeps ids unique while tracing
        self.stack: list[str] = []
        self.first_break: str | None = None
        self.source: torch.Tensor | None = None
        self.hits: list[_Hit] = []
        self.hit_index: dict[str, int] = {}
        self.raw_out: dict[int, int] = {}
        self.tags: dict[int, _Tag] = {}
        self.combos: list[_Tag] = []
        self.other_consumers: list[str] = []
        self.early_bns: list[tuple[str, nn.Module, torch.Tensor, list[torch.Tensor]]] = []
        self._handles: list[Any] = []

    # ------------------------------------------------------------- hooks

    @contextlib.contextmanager
    def hooked(self) -> Iterator[None]:
        """Install the module hooks (removed on exit)."""
        try:
            for name, module in self.model.named_modules():
                pre = functools.partial(self._pre_hook, name)
                post = functools.partial(self._post_hook, name)
                self._handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
                self._handles.append(module.register_forward_hook(post))
            yield
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles.clear()

    def _pre_hook(self, name: str, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.stack.append(name)
        inp = _first_tensor(args, kwargs)
        if inp is None:
            return
        if isinstance(module, (nn.Linear, _ConvNd)):
            self._on_consumer(name, module, inp)
        elif isinstance(module, _BatchNorm) and _has_running_stats(module):
            if self.hits:
                self._on_batchnorm(name, module, inp)
            elif self.status.get(id(inp)) is _Status.DERIVED:
                self.early_bns.append((name, module, inp, []))

    def _post_hook(self, name: str, module: nn.Module, args: tuple, output: Any) -> None:
        if self.stack and self.stack[-1] == name:
            self.stack.pop()
        if not isinstance(output, torch.Tensor):
            return
        index = self.hit_index.get(name)
        if index is not None:
            self._tag_output(index, output)
        elif not self.hits:
            for bn_name, _, _, outputs in self.early_bns:
                if bn_name == name:
                    outputs.append(output)

    def _tag_output(self, index: int, output: torch.Tensor) -> None:
        self.raw_out[id(output)] = index
        self.tags[id(output)] = _Tag("single", (index,), True, self.hits[index].kind == "identity")
        self.keep.append(output)

    def _on_consumer(self, name: str, module: nn.Module, inp: torch.Tensor) -> None:
        if self.source is None:
            status = self.status.get(id(inp))
            if status is _Status.DERIVED:
                if not _is_layer(module):
                    raise _Stop(
                        UnsupportedModel(
                            f"the first layer '{name}' is a {type(module).__name__}: zooscan "
                            "analyses 2-D convolutions and linear patch embeddings (3-D, 1-D "
                            "and transposed convolutions are not 2-D first layers)"
                        )
                    )
                self.source = inp
                self._add_hit(
                    name, module, inp, "conv" if isinstance(module, nn.Conv2d) else "linear"
                )
                self._adopt_early_batchnorms()
            elif status is _Status.TAINTED:
                raise _Stop(
                    FirstLayerNotFound(
                        f"the image reaches '{name}' ({type(module).__name__}) only through "
                        f"{self.first_break or 'a layer with learned parameters'}; no "
                        "convolution or linear layer is applied to the image itself"
                    )
                )
            return
        if inp is self.source and _is_layer(module):
            self._add_hit(name, module, inp, "conv" if isinstance(module, nn.Conv2d) else "linear")
            return
        if self.status.get(id(inp)) is _Status.DERIVED:
            self.other_consumers.append(name)  # reads another transform of the image
        raise _Abort

    def _adopt_early_batchnorms(self) -> None:
        """BatchNorms that ran on the image before the first conv are identity branches."""
        for name, module, inp, outputs in self.early_bns:
            if inp is self.source and outputs:
                hit = self._add_hit(name, module, inp, "identity")
                hit.bn, hit.bn_module = name, module
                self._tag_output(self.hit_index[name], outputs[0])

    def _on_batchnorm(self, name: str, module: nn.Module, inp: torch.Tensor) -> None:
        """A BatchNorm (with running statistics) seen once the first layer is known."""
        if inp is self.source:
            hit = self._add_hit(name, module, inp, "identity")
            hit.bn, hit.bn_module = name, module
            return
        index = self.raw_out.get(id(inp))
        if index is not None and self.hits[index].bn is None:
            self.hits[index].bn, self.hits[index].bn_module = name, module

    def _add_hit(self, name: str, module: nn.Module, inp: torch.Tensor, kind: str) -> _Hit:
        hit = _Hit(name=name, module=module, kind=kind, input_shape=tuple(inp.shape))
        self.hit_index[name] = len(self.hits)
        self.hits.append(hit)
        return hit

    # ----------------------------------------------------------- functions

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self._record(func, args, kwargs, out)
        return out

    def _record(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        inputs = list(_tensors((args, kwargs)))
        if not inputs:
            return
        name = getattr(func, "__name__", "") or ""
        outputs = list(_tensors(out))
        inplace = name in _INPLACE or (name.endswith("_") and not name.startswith("_"))
        if inplace and args and isinstance(args[0], torch.Tensor):
            outputs.append(args[0])
        if not outputs:
            return
        status = self._status_of(inputs, name)
        if self.valueless and any(id(t) in self.valueless for t in inputs):
            self.valueless.update(id(t) for t in outputs)
            self.keep.extend(outputs)
        for t in outputs:
            if status is None:
                self.status.pop(id(t), None)
            else:
                self.status[id(t)] = status
                self.keep.append(t)
        if self.hits:
            self._observe_inside(name, args, kwargs)
            if self.tags:
                self._propagate(name, args, kwargs, inputs, outputs)

    def _status_of(self, inputs: list[torch.Tensor], name: str) -> _Status | None:
        found = {self.status.get(id(t)) for t in inputs}
        derived = _Status.DERIVED in found
        if _Status.TAINTED in found or (derived and _Status.PARAMETRIC in found):
            if derived and not self.hits and self.first_break is None:
                where = self.stack[-1] if self.stack else ""
                self.first_break = f"'{name}' in module '{where or type(self.model).__name__}'"
            return _Status.TAINTED
        if derived:
            return _Status.DERIVED
        return _Status.PARAMETRIC if _Status.PARAMETRIC in found else None

    def _observe_inside(self, name: str, args: tuple, kwargs: dict) -> None:
        """Record the functional calls a first-layer module makes in its forward."""
        index = self.hit_index.get(self.stack[-1]) if self.stack else None
        if index is None:
            return
        hit = self.hits[index]
        if name in ("conv2d", "linear") and hit.call is None:
            values = dict(zip(_CONV_ARGS, _CONV_DEFAULTS, strict=True))
            values.update(zip(_CONV_ARGS, args, strict=False))
            values.update(kwargs)
            values["input_shape"] = tuple(values["input"].shape)
            values["weight_is_parameter"] = values["weight"] is getattr(hit.module, "weight", None)
            values.pop("input"), values.pop("weight"), values.pop("bias")
            hit.call = values
        elif name == "batch_norm" and args and hit.std_eps is None:
            self._observe_standardization(hit, args, kwargs)

    def _observe_standardization(self, hit: _Hit, args: tuple, kwargs: dict) -> None:
        """A ``batch_norm`` over the weight inside the layer: weight standardisation."""
        if self.status.get(id(args[0])) is not _Status.PARAMETRIC:
            return
        values = {"eps": 1e-5, "weight": None}
        values.update(zip(_BATCH_NORM_ARGS, args[1:], strict=False))
        values.update(kwargs)
        hit.std_eps = float(values["eps"])
        hit.std_scaled = values["weight"] is not None

    def _propagate(self, name: str, args: tuple, kwargs: dict, inputs: list, outputs: list) -> None:
        tags = [self.tags.get(id(t)) for t in inputs]
        if not any(tags):
            return
        tag = self._combine(name, args, kwargs, inputs, tags)
        for t in outputs:
            self.tags[id(t)] = tag
            self.keep.append(t)
        if tag.kind in ("sum", "cat"):
            self.combos.append(tag)

    def _combine(self, name: str, args: tuple, kwargs: dict, inputs: list, tags: list) -> _Tag:
        first = next(t for t in tags if t is not None)
        if name in _CAT and len(inputs) == len(tags) and all(tags):
            dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
            if dim in (1, -3) and all(t.kind == "single" for t in tags):
                order = tuple(t.branches[0] for t in tags)
                return _Tag("cat", order, all(t.linear for t in tags))
        if name in _ADD and kwargs.get("alpha", 1) == 1:
            if len(inputs) == 2 and all(tags):
                merged = tuple(sorted(set(tags[0].branches) | set(tags[1].branches)))
                folded = tuple(sorted(set(tags[0].normalized) | set(tags[1].normalized)))
                linear = all(t.linear and t.kind != "cat" for t in tags)
                return _Tag("sum", merged, linear, folded=folded)
            other = args[1] if len(args) > 1 else kwargs.get("other")
            if len(inputs) == 1 and isinstance(other, (int, float)) and other == 0:
                return first
        if name in _LINEAR_KEEP and len(inputs) == 1:
            return first
        if name == "batch_norm" and first.kind == "single" and not first.bn_applied:
            hit = self.hits[first.branches[0]]
            if hit.bn is not None and self.stack and self.stack[-1] == hit.bn:
                return dataclasses.replace(first, bn_applied=True)
        return dataclasses.replace(first, linear=False)


# ------------------------------------------------------------------ probing


class _MapError(Exception):
    """The probe could not map the consumed tensor onto image pixels."""


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
        box.append(_first_tensor(args, kwargs))
        raise _Abort

    handle = target.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        forward(model, image)
    except _Abort:
        pass
    except Exception as err:  # the model cannot run its prefix on CPU values
        raise _MapError(f"{type(err).__name__}: {str(err).splitlines()[0][:200]}") from err
    finally:
        handle.remove()
    if not box or box[0] is None:
        raise _MapError("the probe forward did not reach the first layer")
    if box[0].device.type == "meta":
        raise _MapError("the values reaching the first layer come from meta tensors (buffers)")
    return box[0].detach().to("cpu", torch.float64).numpy()


def _probe_outputs(
    run: Callable[[torch.Tensor], np.ndarray], shape: tuple[int, ...]
) -> tuple[dict[str, np.ndarray], dict[str, torch.Tensor]]:
    error: _MapError | None = None
    for dtype in (torch.float64, torch.float32):
        images = _probe_images(shape, dtype)
        try:
            return {k: run(v) for k, v in images.items()}, images
        except _MapError as err:
            error = err
    assert error is not None
    raise error


def _features_view(t: np.ndarray, kind: str) -> tuple[np.ndarray, tuple[int, ...]]:
    """``(features, positions)`` view of the consumed tensor and its position grid shape."""
    if kind == "conv":
        if t.ndim != 4 or t.shape[0] != 1:
            raise _MapError(f"unexpected shape {t.shape} of the convolution input")
        return t[0].reshape(t.shape[1], -1), t.shape[2:]
    flat = t.reshape(-1, t.shape[-1]).T
    grid = tuple(s for s in t.shape[:-1] if s != 1)
    return flat, grid


def _derive_input_map(
    outs: dict[str, np.ndarray], images: dict[str, torch.Tensor], kind: str
) -> tuple[InputMap, np.ndarray, np.ndarray]:
    """Map the probed tensor onto the image; returns the map and per-channel scale/offset."""
    shapes = {v.shape for v in outs.values()}
    if len(shapes) != 1:
        raise _MapError("the consumed tensor's shape depends on the pixel values")
    tz, to = outs["zeros"], outs["ones"]
    a = to - tz
    tol = 1e-6 * max(1.0, float(np.abs(a).max(initial=0.0)))
    valid = np.abs(a) > tol
    try:
        return _gather_map(outs, images, kind, a, valid)
    except _MapError as gather_error:
        if kind != "conv":
            raise
        try:
            return _resampled_map(outs, images, a, valid)
        except _MapError:
            raise gather_error from None


def _gather_map(
    outs: dict[str, np.ndarray],
    images: dict[str, torch.Tensor],
    kind: str,
    a: np.ndarray,
    valid: np.ndarray,
) -> tuple[InputMap, np.ndarray, np.ndarray]:
    """The map when every consumed value is one image pixel under a per-channel affine."""
    _, c_img, h_img, w_img = images["index"].shape
    idx = _pixel_indices(outs, images, a, valid)
    feat_idx, grid_shape = _features_view(idx, kind)
    feat_valid = feat_idx >= 0
    chan = np.where(feat_valid, feat_idx // (h_img * w_img), -1)
    hh = np.where(feat_valid, (feat_idx // w_img) % h_img, 0)
    ww = np.where(feat_valid, feat_idx % w_img, 0)
    channels = _feature_channels(chan, feat_valid)
    ref = np.flatnonzero(feat_valid.all(axis=0))
    if ref.size == 0:
        raise _MapError("no position of the consumed tensor reads only image pixels")
    dy = hh[:, ref[0]] - hh[:, ref[0]].min()
    dx = ww[:, ref[0]] - ww[:, ref[0]].min()
    footprint = (int(dy.max()) + 1, int(dx.max()) + 1)
    oh = _position_origins(hh, dy, feat_valid)
    ow = _position_origins(ww, dx, feat_valid)
    grid, origin, oh, ow = _fit_grid(oh, ow, grid_shape, footprint)
    _check_padding(oh, ow, dy, dx, feat_valid, (h_img, w_img))
    features = tuple((int(c), int(y), int(x)) for c, y, x in zip(channels, dy, dx, strict=True))
    scale, offset = _channel_affine(a, outs["zeros"], kind, chan, c_img)
    size = (int(grid_shape[0]), int(grid_shape[1])) if kind == "conv" else None
    imap = InputMap(features=features, footprint=footprint, grid=grid, origin=origin, size=size)
    return imap, scale, offset


def _pixel_indices(
    outs: dict[str, np.ndarray], images: dict[str, torch.Tensor], a: np.ndarray, valid: np.ndarray
) -> np.ndarray:
    """For each consumed value, the flat index of the image pixel it reads (-1: constant).

    The pixel-index probe names the pixel; the random probe then checks that the value
    really is ``offset + scale * pixel`` (a value mixing several pixels can mimic an
    index, it cannot mimic random content).
    """
    tz = outs["zeros"]
    n = int(np.prod(images["index"].shape))
    ratio = (outs["index"] - tz) / np.where(valid, a, 1.0)
    if not np.all(np.isfinite(ratio)) or not np.all(np.isfinite(outs["random"])):
        raise _MapError("the consumed values are not finite functions of the image")
    idx = np.rint(ratio).astype(np.int64) - 1
    if np.any(valid & ((np.abs(ratio - np.rint(ratio)) > 0.1) | (idx < 0) | (idx >= n))):
        raise _MapError("the consumed values are not single image pixels (mixing or resampling)")
    rand = images["random"].to(torch.float64).numpy().reshape(-1)
    expected = tz + a * rand[np.where(valid, idx, 0)]
    random_ok = np.abs(outs["random"] - expected) <= 1e-4 * (np.abs(tz) + np.abs(a) + 1.0)
    probes = ("index", "random", "channel")
    const_ok = np.all([np.abs(outs[k] - tz) <= 1e-6 * (np.abs(tz) + 1.0) for k in probes], axis=0)
    if not np.all(np.where(valid, random_ok, const_ok)):
        raise _MapError("the consumed values are not a per-pixel affine function of the image")
    return np.where(valid, idx, -1)


def _feature_channels(chan: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """The one image channel each consumed channel/feature reads."""
    lo = np.where(valid, chan, np.iinfo(np.int64).max).min(axis=1)
    hi = np.where(valid, chan, -1).max(axis=1)
    if np.any(hi < 0) or np.any(lo != hi):
        raise _MapError("a consumed channel reads different image channels at different positions")
    return hi


def _position_origins(coord: np.ndarray, offset: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Per position, the image coordinate of its offset-0 pixel (NaN if it reads none)."""
    base = np.where(valid, coord - offset[:, None], 0).astype(np.float64)
    lo = np.where(valid, base, np.inf).min(axis=0)
    hi = np.where(valid, base, -np.inf).max(axis=0)
    known = np.isfinite(lo)
    if np.any(lo[known] != hi[known]):
        raise _MapError("the consumed positions do not all read the same pixel pattern")
    return np.where(known, lo, np.nan)


def _fit_grid(
    oh: np.ndarray, ow: np.ndarray, grid_shape: tuple[int, ...], footprint: Pair
) -> tuple[Pair, Pair, np.ndarray, np.ndarray]:
    """Fit ``origin + (Y, X) * grid`` to the position origins; fill unknown positions."""
    if len(grid_shape) == 2:
        rows, cols = np.meshgrid(np.arange(grid_shape[0]), np.arange(grid_shape[1]), indexing="ij")
        rows, cols = rows.ravel(), cols.ravel()
    else:
        known = np.isfinite(oh)
        if not known.all():
            raise _MapError("some tokens read no image pixel")
        uh, uw = np.unique(oh), np.unique(ow)
        if (
            uh.size * uw.size != oh.size
            or len({(y, x) for y, x in zip(oh, ow, strict=True)}) != oh.size
        ):
            raise _MapError("the tokens do not tile the image on a regular grid")
        rows, cols = np.searchsorted(uh, oh), np.searchsorted(uw, ow)
    gh, o_h = _fit_axis(oh, rows, footprint[0])
    gw, o_w = _fit_axis(ow, cols, footprint[1])
    return (gh, gw), (o_h, o_w), o_h + rows * gh, o_w + cols * gw


def _fit_axis(origin: np.ndarray, along: np.ndarray, default: int) -> Pair:
    """``(step, start)`` with ``origin = start + along * step`` at every known position."""
    known = np.isfinite(origin)
    o, a = origin[known], along[known]
    if a.size == 0:
        raise _MapError("no position reads the image")
    if np.unique(a).size < 2:
        step = default
    else:
        i, j = np.argmin(a), np.argmax(a)
        step_f = (o[j] - o[i]) / (a[j] - a[i])
        if step_f != round(step_f) or step_f <= 0:
            raise _MapError("the consumed positions are not on a regular grid")
        step = int(step_f)
    start = o - a * step
    if np.any(start != start[0]):
        raise _MapError("the consumed positions are not on a regular grid")
    return step, int(start[0])


def _check_padding(
    oh: np.ndarray, ow: np.ndarray, dy: np.ndarray, dx: np.ndarray, valid: np.ndarray, size: Pair
) -> None:
    """Values that read no pixel must sit outside the image (padding)."""
    ys = oh[None, :] + dy[:, None]
    xs = ow[None, :] + dx[:, None]
    inside = (ys >= 0) & (ys < size[0]) & (xs >= 0) & (xs < size[1])
    if np.any(inside & ~valid) or np.any(~inside & valid):
        raise _MapError("some consumed values inside the image do not read their pixel")


def _channel_affine(
    a: np.ndarray, b: np.ndarray, kind: str, chan: np.ndarray, channels: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per image channel, the scale and offset of the values reading it (one affine map)."""
    fa, _ = _features_view(a, kind)
    fb, _ = _features_view(b, kind)
    scale, offset = np.ones(channels), np.zeros(channels)
    for c in range(channels):
        sel = chan == c
        if not sel.any():
            continue
        va, vb = fa[sel], fb[sel]
        if not (np.allclose(va, va[0], rtol=1e-5, atol=1e-7) and np.allclose(vb, vb[0], atol=1e-5)):
            raise _MapError(f"the input transform of image channel {c} is not one affine map")
        scale[c], offset[c] = va[0], vb[0]
    return scale, offset


def _mode(values: np.ndarray) -> float:
    """The most frequent value (to 6 decimals), averaged at full precision."""
    rounded = np.round(values, 6)
    uniq, counts = np.unique(rounded, return_counts=True)
    return float(values[rounded == uniq[np.argmax(counts)]].mean())


def _resampled_map(
    outs: dict[str, np.ndarray], images: dict[str, torch.Tensor], a: np.ndarray, valid: np.ndarray
) -> tuple[InputMap, np.ndarray, np.ndarray]:
    """Channel-level map of a convolution input that was resampled (e.g. resized) first."""
    channels = images["index"].shape[1]
    tz = outs["zeros"]
    if tz.ndim != 4 or tz.shape[:2] != (1, channels):
        raise _MapError("the resampled input does not keep the image channels")
    ratio = (outs["channel"] - tz) / np.where(valid, a, 1.0)
    scale, offset = np.ones(channels), np.zeros(channels)
    features = []
    for f in range(channels):
        sel = valid[0, f]
        if not sel.any():
            raise _MapError("a channel of the resampled input reads no image value")
        c = int(round(_mode(ratio[0, f][sel]))) - 1
        if not 0 <= c < channels:
            raise _MapError("the resampled input mixes image channels")
        features.append((c, 0, 0))
        scale[c], offset[c] = _mode(a[0, f][sel]), _mode(tz[0, f][sel])
    if sorted(c for c, _, _ in features) != list(range(channels)):
        raise _MapError("the resampled input does not read each image channel once")
    return InputMap(features=tuple(features), exact=False), scale, offset


# ------------------------------------------------------------------ assembly


def _branch_from_hit(hit: _Hit, params: set[str]) -> Branch:
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


def _has_running_stats(module: nn.Module) -> bool:
    return bool(module.track_running_stats) and module.running_var is not None


def _standardization(hit: _Hit) -> WeightStandardization | None:
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


def _same_total(size: int, k: int, s: int, d: int) -> int:
    """Total padding TensorFlow's SAME adds along one axis."""
    return max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)


def _conv_padding(hit: _Hit) -> Pair | str:
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
    same = [_same_total(hit.input_shape[i - 2], k[i], s[i], d[i]) for i in (0, 1)]
    if padding == (0, 0) and extra == same:
        return "same"
    if all(e % 2 == 0 for e in extra):
        return (padding[0] + extra[0] // 2, padding[1] + extra[1] // 2)
    return "same"


def _choose_combination(tracer: _Tracer, branches: list[Branch]) -> tuple[str, list[Branch], dict]:
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
    convs = [b for b in branches if b.kind != "identity"]
    primary = _reference(branches)
    for b in convs:
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
        _centre(np.zeros((1, 1, *((1, 1) if b.kind == "identity" else b.kernel_size))), b,
                _fused_kernel_size(branches), primary.padding, names)  # fmt: skip


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


def _input_map(
    tracer: _Tracer,
    model: nn.Module,
    forward: Callable,
    shape: tuple[int, ...],
    primary: Branch,
    target: nn.Module,
) -> tuple[InputMap | None, dict[str, Any], tuple | None, tuple | None]:
    channels = shape[1]
    if id(tracer.source) in tracer.valueless:
        reason = "it is computed from buffers, which have no values on the meta device"
        return _unknown_map(primary, channels, reason)
    if tracer.source is tracer.image and primary.kind == "conv":
        size = (shape[-2], shape[-1]) if len(shape) == 4 else None
        return dataclasses.replace(InputMap.identity(channels), size=size), {}, None, None
    try:
        if len(shape) != 4:
            raise _MapError(f"the probe needs an (N, C, H, W) input, not {shape}")
        if tracer.source is tracer.image:
            images = _probe_images(shape, torch.float64)
            outs = {k: v.numpy() for k, v in images.items()}
        else:
            outs, images = _probe_outputs(
                functools.partial(_run_prefix, model, forward, target), shape
            )
        imap, scale, offset = _derive_input_map(outs, images, primary.kind)
    except _MapError as err:
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
    tracer = _Tracer(model, x)
    with _eval_mode(model), torch.no_grad():
        _trace(tracer, model, forward, x, shape)
        params = {n for n, _ in model.named_parameters()}
        branches = [_branch_from_hit(h, params) for h in tracer.hits]
        combination, branches, flags = _choose_combination(tracer, branches)
        primary = branches[0]
        target = tracer.hits[tracer.hit_index[primary.module]].module
        imap, map_flags, scale, offset = _input_map(tracer, model, forward, shape, primary, target)
    extra = _branch_flags(branches, tracer)
    others = flags.pop("other_image_consumers", []) + extra.pop("other_image_consumers", [])
    flags.update(map_flags)
    flags.update(extra)
    if others:
        flags["other_image_consumers"] = others
    return _assemble(branches, combination, shape, imap, flags, scale, offset)


def _trace(
    tracer: _Tracer, model: nn.Module, forward: Callable, x: torch.Tensor, shape: tuple
) -> None:
    try:
        with tracer.hooked(), tracer:
            forward(model, x)
    except _Abort:
        pass
    except _Stop as stop:
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


def _branch_flags(branches: list[Branch], tracer: _Tracer) -> dict[str, Any]:
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


def _assemble(
    branches: list[Branch],
    combination: str,
    shape: tuple[int, ...],
    imap: InputMap | None,
    flags: dict[str, Any],
    scale: tuple | None,
    offset: tuple | None,
) -> LayerSpec:
    primary = _reference(branches)
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


# ------------------------------------------------------------------ building


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
