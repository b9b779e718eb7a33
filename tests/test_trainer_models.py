"""The trainer's networks: shapes, the first layer, widths, kernels, the linear CNN's algebra."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from zooscan.errors import UserError
from zooscan_builtins.trainer.models import ARCHITECTURES, build_model, first_conv, is_linear

STANDARD = [name for name in ARCHITECTURES if name != "linear"]


def _first_applied(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
    """The first Conv2d/Linear module that runs in ``model(x)``, and the input it got."""
    calls: list[tuple[nn.Module, torch.Tensor]] = []
    handles = [
        module.register_forward_hook(lambda mod, inp, out: calls.append((mod, inp[0])))
        for module in model.modules()
        if isinstance(module, nn.Conv2d | nn.Linear)
    ]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for handle in handles:
            handle.remove()
    return calls[0]


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_every_architecture_builds_and_first_conv_is_applied_first(arch):
    model = build_model(arch, num_classes=10, width=0.25, seed=0)
    x = torch.randn(2, 3, 32, 32)
    module, seen = _first_applied(model, x)
    assert module is first_conv(model)
    assert seen is x  # it consumes the model's input itself, nothing before it
    assert model(x).shape == (2, 10)
    assert first_conv(model).in_channels == 3
    assert first_conv(model).kernel_size == (3, 3)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_scalar_output_and_other_channel_counts(arch):
    model = build_model(arch, num_classes=1, width=0.125, in_channels=1, seed=0)
    out = model.eval()(torch.randn(3, 1, 40, 40))  # not 32: adaptive pooling takes any size
    assert out.shape == (3,)
    assert first_conv(model).in_channels == 1


@pytest.mark.parametrize(
    ("arch", "full_first", "full_convs"),
    [
        ("linear", 64, 64),
        ("vgg11", 64, 64 + 128 + 256 * 2 + 512 * 4),
        ("vgg13_bn", 64, 64 * 2 + 128 * 2 + 256 * 2 + 512 * 4),
        ("resnet18", 64, 64 + 4 * 64 + 4 * 128 + 4 * 256 + 4 * 512 + 128 + 256 + 512),
        ("resnet20", 16, 16 + 6 * 16 + 6 * 32 + 6 * 64 + 32 + 64),
    ],
)
def test_widths_scale_every_channel_count(arch, full_first, full_convs):
    for width in (1.0, 0.5, 0.25):
        model = build_model(arch, num_classes=10, width=width)
        convs = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
        assert first_conv(model).out_channels == round(full_first * width)
        assert sum(convs) == pytest.approx(full_convs * width, abs=len(convs))
    tiny = build_model(arch, num_classes=10, width=1e-3)
    assert all(m.out_channels == 1 for m in tiny.modules() if isinstance(m, nn.Conv2d))


def test_vgg_classifier_is_the_cifar_one():
    model = build_model("vgg11_bn", num_classes=7)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 512), (512, 512), (512, 7)]
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 5
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 8
    assert sum(isinstance(m, nn.Dropout) for m in model.modules()) == 2
    assert not any(
        isinstance(m, nn.BatchNorm2d) for m in build_model("vgg11", num_classes=7).modules()
    )


def test_resnet18_stems():
    cifar = build_model("resnet18", num_classes=10, width=0.125)
    imagenet = build_model("resnet18", num_classes=10, width=0.125, first_kernel=7)
    assert first_conv(cifar).stride == (1, 1) and isinstance(cifar.maxpool, nn.Identity)
    conv = first_conv(imagenet)
    assert (conv.kernel_size, conv.stride, conv.padding) == ((7, 7), (2, 2), (3, 3))
    assert isinstance(imagenet.maxpool, nn.MaxPool2d)
    assert imagenet.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    with pytest.raises(UserError, match="3 .* or 7"):
        build_model("resnet18", num_classes=10, first_kernel=5)


def test_first_kernel_sizes():
    assert first_conv(build_model("linear", num_classes=1, first_kernel=7)).kernel_size == (7, 7)
    vgg = build_model("vgg11", num_classes=10, width=0.125, first_kernel=5)
    assert first_conv(vgg).kernel_size == (5, 5)
    assert vgg.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    with pytest.raises(UserError, match="odd"):
        build_model("resnet20", num_classes=10, first_kernel=4)


def test_linear_cnn_is_the_papers_model():
    """conv (no bias, stride 1, valid) -> mean over positions -> fixed sum over filters:
    y(x) = sum_k mean_j p_j(x) . w_k, computed here from the patches themselves."""
    model = build_model("linear", num_classes=1, width=0.5, first_kernel=5, seed=3)
    conv = first_conv(model)
    assert conv.bias is None and conv.stride == (1, 1) and conv.padding == (0, 0)
    assert conv.out_channels == 32
    assert is_linear(model) and not is_linear(build_model("vgg11", num_classes=2))
    assert list(model.parameters()) == [conv.weight]  # the sum head is not trained
    x = torch.randn(4, 3, 20, 20, dtype=torch.float64)
    model = model.double()
    mean_patch = F.unfold(x, 5).mean(dim=2)  # (n, 75) in (c, kh, kw) order
    expected = (mean_patch @ conv.weight.reshape(32, -1).T).sum(dim=1)
    torch.testing.assert_close(model(x), expected)


def test_linear_cnn_has_no_nonlinearity():
    x, y = (
        torch.randn(2, 3, 16, 16, dtype=torch.float64),
        torch.randn(2, 3, 16, 16, dtype=torch.float64),
    )
    summed = build_model("linear", num_classes=1, seed=0).double()
    torch.testing.assert_close(summed(2 * x - 3 * y), 2 * summed(x) - 3 * summed(y))
    readout = build_model("linear", num_classes=5, seed=0).double()  # affine: linear + bias
    assert readout.head == "linear" and readout(x).shape == (2, 5)
    zero = readout(torch.zeros_like(x))
    torch.testing.assert_close(
        readout(2 * x - 3 * y) - zero, 2 * (readout(x) - zero) - 3 * (readout(y) - zero)
    )


def test_seed_fixes_the_default_initialisation_without_touching_global_state():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = build_model("resnet20", num_classes=10, width=0.5, seed=7)
    assert torch.equal(torch.random.get_rng_state(), before)
    b = build_model("resnet20", num_classes=10, width=0.5, seed=7)
    c = build_model("resnet20", num_classes=10, width=0.5, seed=8)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(first_conv(a).weight, first_conv(c).weight)
    weight = first_conv(build_model("vgg11", num_classes=10, seed=0)).weight
    bound = 1 / math.sqrt(3 * 3 * 3)  # PyTorch's default kaiming-uniform(a=sqrt(5)) bound
    assert 0.9 * bound < weight.abs().max() <= bound


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"arch": "alexnet", "num_classes": 10}, "unknown architecture"),
        ({"arch": "linear", "num_classes": 10, "head": "sum"}, "scalar"),
        ({"arch": "linear", "num_classes": 10, "head": "mlp"}, "unknown head"),
        ({"arch": "vgg11", "num_classes": 10, "head": "linear"}, "linear CNN only"),
        ({"arch": "vgg11", "num_classes": 0}, "num_classes"),
        ({"arch": "vgg11", "num_classes": 10, "width": 0}, "width"),
        ({"arch": "linear", "num_classes": 1, "first_kernel": 0}, "first_kernel"),
    ],
)
def test_impossible_requests_are_one_line_user_errors(kwargs, message):
    arch = kwargs.pop("arch")
    with pytest.raises(UserError, match=message) as info:
        build_model(arch, **kwargs)
    assert "\n" not in str(info.value)


def test_first_conv_rejects_foreign_models_and_sees_through_compile_wrappers():
    with pytest.raises(UserError, match="not a trainer model"):
        first_conv(nn.Sequential(nn.Conv2d(3, 4, 3)))
    model = build_model("linear", num_classes=1)
    wrapper = nn.Module()
    wrapper._orig_mod = model  # what torch.compile's OptimizedModule holds
    assert first_conv(wrapper) is first_conv(model)
