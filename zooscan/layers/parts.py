"""The records a :class:`~zooscan.layers.LayerSpec` is made of.

One :class:`Branch` per layer consuming the image (a stem may have several), the
:class:`WeightStandardization` a branch applies to its stored weight, and the
:class:`InputMap` from the tensor the first layer consumes to image pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Pair = tuple[int, int]
TensorLike = Any  # np.ndarray | torch.Tensor


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
