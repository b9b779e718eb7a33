"""The :class:`LayerSpec` record: which tensors define the first layer.

It also gives the layer's geometry in image pixels and materialises it into one kernel
or a :class:`~zooscan.records.FirstLayer`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from zooscan.errors import UnsupportedModel
from zooscan.layers.kernels import (
    applied_weight,
    bn_factor,
    centre,
    folded_bias,
    fused_kernel_size,
    identity_kernel,
    load_array,
    permute_channels,
    reference_branch,
    same_total,
    scatter,
)
from zooscan.layers.parts import Branch, InputMap, Pair, TensorLike
from zooscan.records import FirstLayer, Provenance


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
        b = reference_branch(self.branches)
        m = self.input_map
        origin = m.origin if m is not None else (0, 0)
        if self.kind == "linear":
            if m is None:
                return _geom(b.kernel_size, (1, 1), (0, 0), (1, 1), 1)
            return _geom(m.footprint, m.grid, (-origin[0], -origin[1]), (1, 1), 1)
        kernel = fused_kernel_size(self.branches)
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
        same = [same_total(image[i], kernel[i], stride[i], dilation[i]) for i in range(2)]
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
            total = sum(folded_bias(b, tensors, self.module) for b in self.branches)
            return np.asarray(total, dtype=np.float32)
        if not any(b.bias for b in self.branches):
            return None
        parts = []
        for b in self.branches:
            if b.bias_key:
                parts.append(load_array(tensors, b.bias_key, self.module).reshape(-1))
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
            return applied_weight(self.branches[0], tensors, self.module)
        size = fused_kernel_size(self.branches)
        pad = reference_branch(self.branches).padding
        parts = []
        for b in self.branches:
            w = applied_weight(b, tensors, self.module) if b.kind != "identity" else None
            if self.combination == "sum":
                w = identity_kernel(b, reference_branch(self.branches)) if w is None else w
                w = w * bn_factor(b, tensors, self.module)[:, None, None, None]
            parts.append(centre(w, b, size, pad, self.module))
        if self.combination == "sum":
            return np.sum(parts, axis=0)
        return np.concatenate(parts, axis=0)

    def _to_image_space(self, kernel: np.ndarray, convert: bool) -> tuple[np.ndarray, bool]:
        m = self.input_map
        b = reference_branch(self.branches)
        if self.kind == "linear":
            if m is None:
                raise UnsupportedModel(
                    f"cannot tell which image pixels the linear layer '{self.module}' reads "
                    f"({self.flags.get('input_map', 'no input map')})"
                )
            w4 = kernel.reshape(kernel.shape[0], kernel.shape[1], 1, 1)
            return scatter(w4, m, (1, 1), self.in_channels), True
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
            return permute_channels(kernel, m, self.in_channels, b.groups, self.module), False
        if not convert:
            return kernel, False
        if b.groups != 1:
            raise UnsupportedModel(
                f"space-to-depth with a grouped convolution ('{self.module}') is not supported"
            )
        return scatter(kernel, m, b.dilation, self.in_channels), True


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
