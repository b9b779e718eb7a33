"""The networks the trainer trains: the paper's linear CNN and CIFAR-style standard CNNs.

Every model exposes the layer the analysis tracks as ``model.first_conv``: the
:class:`torch.nn.Conv2d` that is applied to the input image first (:func:`first_conv`).
Weights start from PyTorch's default initialisation (Kaiming-uniform), so the seed
(``build_model(..., seed=)`` or the global torch seed) fixes them.

Output shapes: ``(n, num_classes)``, except the scalar-output models
(``num_classes == 1``, e.g. the linear CNN with its fixed ``sum`` head), which return
``(n,)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from zooscan.errors import UserError

ARCHITECTURES: dict[str, str] = {
    "linear": "the paper's linear CNN: conv (64*width filters, k x k, stride 1, no bias) -> "
    "global average pool -> fixed sum (scalar) or trained linear readout",
    "vgg11": "CIFAR VGG-11 (config A, chenyaofo/pytorch-cifar-models), no batch norm",
    "vgg11_bn": "CIFAR VGG-11 (config A) with batch norm",
    "vgg13": "CIFAR VGG-13 (config B), no batch norm",
    "vgg13_bn": "CIFAR VGG-13 (config B) with batch norm",
    "resnet18": "ResNet-18 (64-512 channels); 3x3 stride-1 CIFAR stem, or with first_kernel=7 "
    "the ImageNet 7x7 stride-2 stem + max-pool",
    "resnet20": "CIFAR ResNet-20 (16/32/64 channels, 3 basic blocks per stage)",
}

HEADS = ("sum", "linear")
"""Heads of the linear CNN: ``sum`` (fixed, untrained, scalar output: the paper's setting)
and ``linear`` (a trained ``K -> num_classes`` readout with bias)."""

_VGG_CONFIGS: dict[str, tuple[int | str, ...]] = {
    "A": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "B": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
}
_VGG_ARCHS = {"vgg11": ("A", False), "vgg11_bn": ("A", True), "vgg13": ("B", False),
              "vgg13_bn": ("B", True)}  # fmt: skip


def scaled(channels: int, width: float) -> int:
    """``channels`` scaled by ``width``, rounded, at least 1."""
    return max(1, round(channels * width))


# --------------------------------------------------------------------------- linear CNN


class LinearCNN(nn.Module):
    """The paper's linear CNN (paper §4, App. A): no nonlinearity anywhere.

    ``y(x) = head( mean_j conv(x)_j )``: a bias-free stride-1 convolution with ``K``
    filters, global average pooling over the ``J`` valid positions, then either the
    fixed sum over the ``K`` channels (``head="sum"``: one scalar, ``y = sum_k p̄(x)·w_k``,
    untrained, the theory's setting) or a trained linear readout ``K -> num_classes``.
    """

    def __init__(
        self, in_channels: int, filters: int, kernel: int, head: str, num_classes: int
    ) -> None:
        super().__init__()
        self.head = head
        self.first_conv = nn.Conv2d(in_channels, filters, kernel, stride=1, padding=0, bias=False)
        self.readout = nn.Linear(filters, num_classes) if head == "linear" else None
        self.scalar_output = head == "sum" or num_classes == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.first_conv(x).mean(dim=(2, 3))
        out = pooled.sum(dim=1) if self.readout is None else self.readout(pooled)
        return out.reshape(-1) if self.scalar_output else out


# --------------------------------------------------------------------------- VGG


class CifarVGG(nn.Module):
    """CIFAR VGG as in chenyaofo/pytorch-cifar-models (the models the paper trained).

    3x3 convolutions (padding 1, with bias), optional batch norm, ReLU, 2x2 max-pools,
    adaptive average pooling to 1x1 (so any input of at least 32x32 works), and the
    classifier ``c -> h -> h -> num_classes`` with ReLU and Dropout(0.5), where ``c`` and
    ``h`` are 512 scaled by the width. The first convolution may use another odd kernel
    (padding ``k // 2`` keeps the size).
    """

    def __init__(
        self,
        config: Sequence[int | str],
        *,
        batch_norm: bool,
        num_classes: int,
        width: float,
        first_kernel: int,
        in_channels: int,
    ) -> None:
        super().__init__()
        channels = [scaled(v, width) if v != "M" else v for v in config]
        first = channels[0]
        assert isinstance(first, int)
        self.first_conv = nn.Conv2d(in_channels, first, first_kernel, padding=first_kernel // 2)
        layers: list[nn.Module] = [*_bn_relu(first, batch_norm)]
        current = first
        for value in channels[1:]:
            if value == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            assert isinstance(value, int)
            layers += [nn.Conv2d(current, value, 3, padding=1), *_bn_relu(value, batch_norm)]
            current = value
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        hidden = scaled(512, width)
        self.classifier = nn.Sequential(
            nn.Linear(current, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(),
            nn.Linear(hidden, num_classes),
        )
        self.scalar_output = num_classes == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(self.first_conv(x))).flatten(1)
        out = self.classifier(x)
        return out.reshape(-1) if self.scalar_output else out


def _bn_relu(channels: int, batch_norm: bool) -> list[nn.Module]:
    norm: list[nn.Module] = [nn.BatchNorm2d(channels)] if batch_norm else []
    return [*norm, nn.ReLU(inplace=True)]


# --------------------------------------------------------------------------- ResNets


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN projection) shortcut."""

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """A ResNet of basic blocks: stem (``first_conv``, BN, ReLU, optional max-pool),
    stages of blocks (the first block of each later stage has stride 2), global average
    pooling, a linear classifier."""

    def __init__(
        self,
        *,
        stage_channels: Sequence[int],
        blocks_per_stage: int,
        num_classes: int,
        in_channels: int,
        first_kernel: int,
        stem_stride: int,
        stem_pool: bool,
    ) -> None:
        super().__init__()
        stem = stage_channels[0]
        self.first_conv = nn.Conv2d(
            in_channels, stem, first_kernel, stride=stem_stride, padding=first_kernel // 2,
            bias=False,
        )  # fmt: skip
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool: nn.Module = (
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if stem_pool else nn.Identity()
        )
        stages: list[nn.Module] = []
        current = stem
        for index, channels in enumerate(stage_channels):
            blocks = [BasicBlock(current, channels, stride=1 if index == 0 else 2)]
            blocks += [
                BasicBlock(channels, channels, stride=1) for _ in range(blocks_per_stage - 1)
            ]
            stages.append(nn.Sequential(*blocks))
            current = channels
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(current, num_classes)
        self.scalar_output = num_classes == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.first_conv(x))))
        out = self.fc(self.pool(self.stages(x)).flatten(1))
        return out.reshape(-1) if self.scalar_output else out


# --------------------------------------------------------------------------- builders


def build_model(
    arch: str,
    *,
    num_classes: int,
    width: float = 1.0,
    first_kernel: int | None = None,
    in_channels: int = 3,
    head: str | None = None,
    seed: int | None = None,
) -> nn.Module:
    """Build architecture ``arch`` (a key of :data:`ARCHITECTURES`) on the CPU, float32.

    ``num_classes`` is the output size (1 for a scalar output, e.g. the ``binary``
    target); ``width`` scales every channel count (rounded, at least 1); ``first_kernel``
    is the first layer's kernel size (default 3; ``linear`` takes any size, VGG and
    ResNet-20 any odd size, ResNet-18 3 or 7). ``head`` applies to ``linear`` only:
    ``"sum"`` (the default when ``num_classes == 1``; the paper's fixed sum) or
    ``"linear"`` (the default otherwise). ``seed`` initialises the weights
    reproducibly without touching the global random state; ``None`` uses it.

    Raises :class:`UserError` for an unknown architecture or an impossible combination.
    """
    builder = _BUILDERS.get(arch)
    if builder is None:
        raise UserError(f"unknown architecture {arch!r} (known: {', '.join(ARCHITECTURES)})")
    _check_common(arch, num_classes, width, in_channels, head)
    kernel = 3 if first_kernel is None else first_kernel
    if kernel < 1:
        raise UserError(f"first_kernel must be at least 1, got {kernel}")
    if seed is None:
        return builder(arch, num_classes, width, kernel, in_channels, head)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return builder(arch, num_classes, width, kernel, in_channels, head)


def first_conv(model: nn.Module) -> nn.Conv2d:
    """The first layer of a trainer model: the convolution applied to the input first."""
    module = getattr(model, "first_conv", None)
    if module is None:  # a torch.compile wrapper keeps the model as ``_orig_mod``
        module = getattr(getattr(model, "_orig_mod", None), "first_conv", None)
    if not isinstance(module, nn.Conv2d):
        raise UserError(f"{type(model).__name__} is not a trainer model (no first_conv Conv2d)")
    return module


def is_linear(model: nn.Module) -> bool:
    """Whether ``model`` is the linear CNN (trained in exact fp32, contiguous layout)."""
    return isinstance(getattr(model, "_orig_mod", model), LinearCNN)


def _check_common(
    arch: str, num_classes: int, width: float, in_channels: int, head: str | None
) -> None:
    if num_classes < 1:
        raise UserError(f"num_classes must be at least 1, got {num_classes}")
    if not width > 0:
        raise UserError(f"width must be positive, got {width}")
    if in_channels < 1:
        raise UserError(f"in_channels must be at least 1, got {in_channels}")
    if head is not None and arch != "linear":
        raise UserError(f"head={head!r} applies to the linear CNN only, not {arch!r}")
    if head is not None and head not in HEADS:
        raise UserError(f"unknown head {head!r} (known: {', '.join(HEADS)})")
    if head == "sum" and num_classes != 1:
        raise UserError(
            f"the 'sum' head gives one scalar output; it cannot serve {num_classes} classes "
            "(use head='linear' or the binary target)"
        )


def _odd_kernel(arch: str, kernel: int) -> int:
    if kernel % 2 == 0:
        raise UserError(
            f"{arch}: first_kernel must be odd (padding k//2 keeps the size), got {kernel}"
        )
    return kernel


def _build_linear(
    arch: str, num_classes: int, width: float, kernel: int, in_channels: int, head: str | None
) -> nn.Module:
    head = head or ("sum" if num_classes == 1 else "linear")
    return LinearCNN(in_channels, scaled(64, width), kernel, head, num_classes)


def _build_vgg(
    arch: str, num_classes: int, width: float, kernel: int, in_channels: int, head: str | None
) -> nn.Module:
    config, batch_norm = _VGG_ARCHS[arch]
    return CifarVGG(
        _VGG_CONFIGS[config],
        batch_norm=batch_norm,
        num_classes=num_classes,
        width=width,
        first_kernel=_odd_kernel(arch, kernel),
        in_channels=in_channels,
    )


def _build_resnet18(
    arch: str, num_classes: int, width: float, kernel: int, in_channels: int, head: str | None
) -> nn.Module:
    if kernel not in (3, 7):
        raise UserError(
            f"resnet18: first_kernel must be 3 (CIFAR stem) or 7 (ImageNet stem), got {kernel}"
        )
    imagenet = kernel == 7
    return ResNet(
        stage_channels=[scaled(c, width) for c in (64, 128, 256, 512)],
        blocks_per_stage=2,
        num_classes=num_classes,
        in_channels=in_channels,
        first_kernel=kernel,
        stem_stride=2 if imagenet else 1,
        stem_pool=imagenet,
    )


def _build_resnet20(
    arch: str, num_classes: int, width: float, kernel: int, in_channels: int, head: str | None
) -> nn.Module:
    return ResNet(
        stage_channels=[scaled(c, width) for c in (16, 32, 64)],
        blocks_per_stage=3,
        num_classes=num_classes,
        in_channels=in_channels,
        first_kernel=_odd_kernel(arch, kernel),
        stem_stride=1,
        stem_pool=False,
    )


_Builder = Callable[[str, int, float, int, int, "str | None"], nn.Module]
_BUILDERS: dict[str, _Builder] = {
    "linear": _build_linear,
    **{name: _build_vgg for name in _VGG_ARCHS},
    "resnet18": _build_resnet18,
    "resnet20": _build_resnet20,
}
