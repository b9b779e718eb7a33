"""Kernel maths: from state-dict tensors to the kernel a layer applies to the image.

The weight a branch applies (loaded, shape-checked, standardised), its BatchNorm
folded in, several branches centred on one kernel grid, and a kernel over the consumed
tensor re-indexed onto image pixels (space-to-depth, patch embeddings, permutations).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from zooscan.errors import CheckpointError, UnsupportedModel
from zooscan.layers.parts import Branch, InputMap, Pair, TensorLike, WeightStandardization


def load_array(tensors: Mapping[str, TensorLike], key: str, module: str) -> np.ndarray:
    """``tensors[key]`` as a float64 array (``module`` names the layer in errors)."""
    if key not in tensors:
        raise CheckpointError(f"no tensor '{key}' (needed for the first layer '{module}')")
    value = tensors[key]
    if isinstance(value, torch.Tensor):
        if value.device.type == "meta":
            raise CheckpointError(f"tensor '{key}' is on the meta device (it has no values)")
        return value.detach().to("cpu", torch.float64).numpy()
    return np.asarray(value, dtype=np.float64)


def applied_weight(b: Branch, tensors: Mapping[str, TensorLike], module: str) -> np.ndarray:
    """The weight the branch applies in its forward, 4-D (linear: ``(out, in, 1, 1)``)."""
    w = load_array(tensors, b.weight_key, module)
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
        gain = load_array(tensors, std.gain_key, module).reshape(-1, 1)
        flat = flat * gain * std.scale
    return flat.reshape(w.shape)


def bn_factor(b: Branch, tensors: Mapping[str, TensorLike], module: str) -> np.ndarray:
    """Per-output-channel multiplier of the branch's BatchNorm (ones without one)."""
    if b.bn is None:
        return np.ones(b.out_channels)
    keys = b.bn_keys()
    var = load_array(tensors, keys["running_var"], module)
    gamma = load_array(tensors, keys["weight"], module) if b.bn_affine else np.ones_like(var)
    return gamma / np.sqrt(var + b.bn_eps)


def folded_bias(b: Branch, tensors: Mapping[str, TensorLike], module: str) -> np.ndarray:
    """The branch bias with its BatchNorm folded in (zeros without either)."""
    bias = load_array(tensors, b.bias_key, module) if b.bias_key else np.zeros(b.out_channels)
    if b.bn is None:
        return bias
    keys = b.bn_keys()
    mean = load_array(tensors, keys["running_mean"], module)
    beta = load_array(tensors, keys["bias"], module) if b.bn_affine else np.zeros_like(mean)
    return (bias - mean) * bn_factor(b, tensors, module) + beta


def identity_kernel(b: Branch, primary: Branch) -> np.ndarray:
    """A ``1x1`` kernel copying each input channel to the same output channel."""
    n = b.out_channels
    per_group = n // primary.groups
    w = np.zeros((n, per_group, 1, 1))
    w[np.arange(n), np.arange(n) % per_group, 0, 0] = 1.0
    return w


def conv_branches(branches: Sequence[Branch]) -> list[Branch]:
    """The branches with a weight (all but identity branches)."""
    return [b for b in branches if b.kind != "identity"]


def reference_branch(branches: Sequence[Branch]) -> Branch:
    """The branch with the largest kernel: it sets the fused layer's geometry."""
    return max(conv_branches(branches), key=lambda b: b.kernel_size[0] * b.kernel_size[1])


def fused_kernel_size(branches: Sequence[Branch]) -> Pair:
    """Kernel size of the fused layer: the largest branch kernel along each axis."""
    convs = conv_branches(branches)
    return (max(b.kernel_size[0] for b in convs), max(b.kernel_size[1] for b in convs))


def _centre_offset(b: Branch, size: Pair, padding: Pair | str) -> Pair:
    """Where a branch's kernel sits inside the fused ``size`` kernel (same output grid)."""
    if b.kind == "identity":
        if isinstance(padding, str):
            return ((size[0] - 1) // 2, (size[1] - 1) // 2)
        return padding
    k = b.kernel_size
    if isinstance(padding, str) or isinstance(b.padding, str):
        return ((size[0] - k[0]) // 2, (size[1] - k[1]) // 2)
    return (padding[0] - b.padding[0], padding[1] - b.padding[1])


def centre(w: np.ndarray, b: Branch, size: Pair, padding: Pair | str, module: str) -> np.ndarray:
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


def permute_channels(
    kernel: np.ndarray, m: InputMap, channels: int, groups: int, module: str
) -> np.ndarray:
    """Re-index a kernel reading permuted image channels onto the image channel order."""
    if groups != 1:
        raise UnsupportedModel(
            f"'{module}' is a grouped convolution reading image channels in a permuted order"
        )
    out = np.zeros((kernel.shape[0], channels, *kernel.shape[2:]))
    for f, (c, _, _) in enumerate(m.features):
        out[:, c] += kernel[:, f]
    return out


def scatter(weight: np.ndarray, m: InputMap, dilation: Pair, channels: int) -> np.ndarray:
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
    return scatter(w, m, (dilation, dilation), channels).astype(np.float32)


def same_total(size: int, k: int, s: int, d: int) -> int:
    """Total padding TensorFlow's SAME adds along one axis."""
    return max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
