"""First-layer finding on hand-made modules with real weights and real photographs.

Every special case is checked numerically: the kernel (and bias) that
``LayerSpec.materialize`` builds, applied to a photograph with ``F.conv2d``, must
reproduce what the model's own first layer computes on that photograph.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from zooscan.errors import CheckpointError, FirstLayerNotFound, UnsupportedModel
from zooscan.layers import (
    InputMap,
    LayerSpec,
    find_first_layer,
    space_to_depth_kernel,
)
from zooscan.records import FirstLayer, Provenance

# ----------------------------------------------------------------------------- helpers


def photo_tensor(photos, name: str = "astronaut", size: int = 64, channels: int = 3):
    """A real photograph as a float64 ``(1, C, size, size)`` tensor in ``[0, 1]``."""
    img = photos[name]
    step = max(1, min(img.shape[:2]) // size)
    img = img[::step, ::step][:size, :size]
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].double()
    if channels == 1:
        return x.mean(dim=1, keepdim=True)
    if channels > 3:  # stack shifted copies: real image content in every channel
        extra = [torch.roll(x, shifts=k + 1, dims=-1) for k in range(channels - 3)]
        return torch.cat([x, *[e[:, :1] for e in extra]], dim=1)
    return x


def randomized(module: nn.Module, seed: int = 0) -> nn.Module:
    """``module`` in float64 eval mode with random weights and BatchNorm statistics."""
    gen = torch.Generator().manual_seed(seed)
    module = module.double().eval()
    with torch.no_grad():
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            if not t.dtype.is_floating_point:
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen, dtype=t.dtype) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=gen, dtype=t.dtype) * 0.5)
    return module


def spec_of(module: nn.Module, shape=(1, 3, 64, 64), **kwargs) -> LayerSpec:
    """Find the first layer of a weight-free (meta) copy of ``module``."""
    meta = copy.deepcopy(module).float().to("meta")
    return find_first_layer(meta, shape, **kwargs)


def apply_spec(spec: LayerSpec, module: nn.Module, x: torch.Tensor, **kwargs) -> torch.Tensor:
    """Apply the materialised kernel + bias to the image ``x`` with the spec's geometry."""
    tensors = module.state_dict()
    kernel, _ = spec.materialize(tensors, **kwargs)
    bias = spec.effective_bias(tensors)
    geom = spec.geometry(kwargs.get("convert_space_to_depth", True))
    b = None if bias is None else torch.from_numpy(bias).double()
    w = torch.from_numpy(kernel).double()
    padding = geom["padding"]
    if padding == "same":
        x = tf_same_pad(x, geom["kernel_size"], geom["stride"], geom["dilation"])
        padding = (0, 0)
    return F.conv2d(x, w, b, geom["stride"], padding, geom["dilation"], geom["groups"])


def tf_same_pad(x, kernel, stride, dilation):
    """TensorFlow 'SAME' padding (extra pixel at the bottom/right)."""
    pads = []
    for size, k, s, d in zip(x.shape[-2:], kernel, stride, dilation, strict=True):
        total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
        pads.append((total // 2, total - total // 2))
    return F.pad(x, (*pads[1], *pads[0]))


def first_layer_input(module: nn.Module, target: str, x: torch.Tensor) -> torch.Tensor:
    """What the sub-module ``target`` receives when ``module`` runs on ``x``."""
    box = []
    handle = module.get_submodule(target).register_forward_pre_hook(
        lambda m, args: box.append(args[0])
    )
    with torch.no_grad():
        module(x)
    handle.remove()
    return box[0]


def assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------ modules


class Head(nn.Module):
    """What follows a stem: another convolution (the trace stops there)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, 4, 3)

    def forward(self, x):
        return self.conv(x)


class RepVggStem(nn.Module):
    """RepVGG-style: 3x3 conv+BN and 1x1 conv+BN on the image, summed."""

    def __init__(self, out: int = 8, stride: int = 2):
        super().__init__()
        self.conv_kxk = nn.Sequential(
            nn.Conv2d(3, out, 3, stride, 1, bias=False), nn.BatchNorm2d(out)
        )
        self.conv_1x1 = nn.Sequential(
            nn.Conv2d(3, out, 1, stride, 0, bias=True), nn.BatchNorm2d(out)
        )

    def forward(self, x):
        return F.relu(self.conv_1x1(x) + self.conv_kxk(x))


class MobileOneStem(nn.Module):
    """MobileOne-style: scale branch, k over-parameterised kxk branches, identity BN."""

    def __init__(self, channels: int = 3, out: int = 3, stride: int = 1, k: int = 3):
        super().__init__()
        self.identity = nn.BatchNorm2d(channels) if out == channels and stride == 1 else None
        self.conv_scale = nn.Sequential(
            nn.Conv2d(channels, out, 1, stride, 0, bias=False), nn.BatchNorm2d(out)
        )
        self.conv_kxk = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(channels, out, k, stride, k // 2, bias=False), nn.BatchNorm2d(out)
            )
            for _ in range(2)
        )

    def forward(self, x):
        identity_out = 0
        if self.identity is not None:
            identity_out = self.identity(x)
        out = self.conv_scale(x)
        for ck in self.conv_kxk:
            out += ck(x)
        out += identity_out
        return F.relu(out)


class ConcatStem(nn.Module):
    """Inception-style: two kernel sizes on the image, outputs concatenated."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 6, 5, padding=2)

    def forward(self, x):
        return torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=1)


class NonLinearSum(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return F.relu(self.a(x)) + F.relu(self.b(x))


class TransformInput(nn.Module):
    """torchvision GoogLeNet/Inception3 ``transform_input``: a fixed per-channel affine."""

    def forward(self, x):
        x_ch0 = torch.unsqueeze(x[:, 0], 1) * (0.229 / 0.5) + (0.485 - 0.5) / 0.5
        x_ch1 = torch.unsqueeze(x[:, 1], 1) * (0.224 / 0.5) + (0.456 - 0.5) / 0.5
        x_ch2 = torch.unsqueeze(x[:, 2], 1) * (0.225 / 0.5) + (0.406 - 0.5) / 0.5
        return torch.cat((x_ch0, x_ch1, x_ch2), 1)


class Flip(nn.Module):
    def forward(self, x):
        return x.flip(1)


class BufferNormalize(nn.Module):
    """Normalisation with registered (checkpoint) buffers before the first convolution."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


class PatchesLast(nn.Module):
    """einops-style ``b c (h p1) (w p2) -> b (h w) (p1 p2 c)`` patch flattening."""

    def __init__(self, ph: int, pw: int):
        super().__init__()
        self.ph, self.pw = ph, pw

    def forward(self, x):
        n, c, h, w = x.shape
        x = x.reshape(n, c, h // self.ph, self.ph, w // self.pw, self.pw)
        return x.permute(0, 2, 4, 3, 5, 1).reshape(n, (h // self.ph) * (w // self.pw), -1)


class PatchesUnfold(nn.Module):
    """``F.unfold`` patches, ``(c, kh, kw)`` order, possibly overlapping."""

    def __init__(self, p: int, stride: int):
        super().__init__()
        self.p, self.stride = p, stride

    def forward(self, x):
        return F.unfold(x, self.p, stride=self.stride).transpose(1, 2)


class Boom(nn.Module):
    """Raises if the forward ever gets here."""

    calls = 0

    def forward(self, x):
        Boom.calls += 1
        raise RuntimeError("the forward should have been aborted before this module")


# --------------------------------------------------------------------- plain conv


def test_plain_conv_kernel_and_patch_order(photos):
    model = randomized(nn.Sequential(nn.Conv2d(3, 8, 5, stride=2, padding=2), nn.ReLU(), Head(8)))
    spec = spec_of(model)
    assert (spec.module, spec.kind, spec.in_channels) == ("0", "conv", 3)
    assert (spec.kernel_size, spec.stride, spec.padding) == ((5, 5), (2, 2), (2, 2))
    assert (spec.dilation, spec.groups, spec.bias) == ((1, 1), 1, True)
    assert spec.parameter_names == ["0.weight"] and spec.bias_parameter_names == [
        "0.weight",
        "0.bias",
    ]
    assert spec.input_map is not None and spec.input_map.is_identity
    kernel, flags = spec.materialize(model.state_dict())
    assert kernel.dtype == np.float32 and flags == {}
    np.testing.assert_array_equal(kernel, model[0].weight.detach().float().numpy())

    x = photo_tensor(photos)
    out = model[0](x).detach()
    # A patch flattened in (c, kh, kw) order, dotted with weight.reshape(out, -1), is
    # exactly what F.conv2d computes at that position (DESIGN §1 patch vector).
    padded = F.pad(x, (2, 2, 2, 2))[0]
    flat = kernel.reshape(8, -1).astype(np.float64)
    bias = model[0].bias.detach().numpy()
    for y, xx in [(0, 0), (5, 17), (31, 31), (12, 3)]:
        patch = padded[:, 2 * y : 2 * y + 5, 2 * xx : 2 * xx + 5].numpy()
        np.testing.assert_allclose(
            flat @ patch.reshape(-1) + bias, out[0, :, y, xx].numpy(), atol=1e-5
        )
        # the paper demo's (kh, kw, c) flattening projects onto other directions
        wrong = patch.transpose(1, 2, 0).reshape(-1)
        assert not np.allclose(flat @ wrong + bias, out[0, :, y, xx].numpy(), atol=1e-3)


def test_forward_stops_at_the_next_layer():
    Boom.calls = 0
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), Boom())
    spec = find_first_layer(model.to("meta"), (1, 3, 32, 32))
    assert spec.module == "0" and Boom.calls == 0


def test_errors_after_the_first_layer_do_not_matter():
    Boom.calls = 0
    model = nn.Sequential(nn.Conv2d(3, 8, 3), Boom())  # no second layer to stop at
    spec = find_first_layer(model.to("meta"), (1, 3, 32, 32))
    assert spec.module == "0" and Boom.calls == 1


def test_eval_mode_is_restored_and_real_models_work(photos):
    model = randomized(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), Head(8)))
    model.train()
    model[1].eval()
    spec = find_first_layer(model, (1, 3, 32, 32))  # a real (CPU) model works too
    assert spec.module == "0"
    assert model.training and model[0].training and not model[1].training


def test_forward_adapter_for_keyword_inputs():
    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Conv2d(3, 16, 4, stride=4)

        def forward(self, *, pixel_values):
            return self.embed(pixel_values)

    spec = find_first_layer(
        Wrapped().to("meta"), (1, 3, 32, 32), forward=lambda m, x: m(pixel_values=x)
    )
    assert spec.module == "embed" and spec.stride == (4, 4)


def test_example_input_sets_the_shape():
    model = nn.Sequential(nn.Conv2d(5, 8, 3)).to("meta")
    spec = find_first_layer(model, example_input=torch.zeros(2, 5, 20, 24, device="meta"))
    assert spec.in_channels == 5 and spec.input_shape == (2, 5, 20, 24)


# ---------------------------------------------------------------- fused branches


def test_repvgg_stem_fuses_to_one_kernel(photos):
    model = randomized(nn.Sequential(RepVggStem(), Head(8)))
    spec = spec_of(model)
    assert spec.kind == "fused" and spec.combination == "sum"
    assert spec.module == "0.conv_kxk.0+0.conv_1x1.0"
    assert spec.flags["fused_branches"] == 2 and spec.bias
    assert [b.bn for b in spec.branches] == ["0.conv_kxk.1", "0.conv_1x1.1"]
    assert (spec.kernel_size, spec.stride, spec.padding) == ((3, 3), (2, 2), (1, 1))
    assert set(spec.parameter_names) >= {
        "0.conv_kxk.0.weight",
        "0.conv_1x1.0.weight",
        "0.conv_1x1.0.bias",
        "0.conv_kxk.1.running_var",
        "0.conv_1x1.1.running_mean",
    }
    x = photo_tensor(photos, "coffee")
    assert_close(F.relu(apply_spec(spec, model, x)), model[0](x).detach())
    # only the keys the spec names are needed
    tensors = {k: v for k, v in model.state_dict().items() if k in spec.parameter_names}
    kernel, _ = spec.materialize(tensors)
    assert kernel.shape == (8, 3, 3, 3)


@pytest.mark.parametrize(("out", "stride"), [(3, 1), (16, 2)])
def test_mobileone_stem_fuses_with_identity_branch(photos, out, stride):
    model = randomized(nn.Sequential(MobileOneStem(out=out, stride=stride), Head(out)), seed=3)
    spec = spec_of(model)
    kinds = [b.kind for b in spec.branches]
    assert kinds == ["conv", "conv", "conv"] + (["identity"] if out == 3 else [])
    assert spec.flags["fused_branches"] == len(kinds)
    assert spec.branches[0].module == "0.conv_kxk.0.0"  # largest kernel first
    x = photo_tensor(photos, "chelsea")
    assert_close(F.relu(apply_spec(spec, model, x)), model[0](x).detach())


def test_concatenated_branches_stack_their_filters(photos):
    model = randomized(nn.Sequential(ConcatStem(), Head(10)), seed=5)
    spec = spec_of(model)
    assert spec.combination == "concat" and spec.kind == "fused"
    assert spec.module == "0.a+0.b" and spec.out_channels == 10
    assert (spec.kernel_size, spec.padding) == ((5, 5), (2, 2))
    kernel, _ = spec.materialize(model.state_dict())
    assert kernel.shape == (10, 3, 5, 5)
    assert np.all(kernel[:4, :, 0, :] == 0) and np.all(kernel[:4, :, :, 4] == 0)
    x = photo_tensor(photos, "rocket")
    assert_close(F.relu(apply_spec(spec, model, x)), model[0](x).detach())


def test_non_linearly_combined_branches_are_refused():
    with pytest.raises(UnsupportedModel, match="non-linearly"):
        spec_of(nn.Sequential(NonLinearSum(), Head(4)))


def test_branches_merged_later_fall_back_to_the_first():
    class Late(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, padding=1)
            self.b = nn.Conv2d(3, 4, 1)
            self.b2 = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return torch.cat([self.a(x), self.b2(self.b(x))], 1)

    spec = spec_of(Late())
    assert spec.module == "a" and spec.kind == "conv"
    assert spec.flags["other_image_consumers"] == ["b"]


# ------------------------------------------------------------ standardised convs


@pytest.mark.parametrize("cls_name", ["StdConv2d", "ScaledStdConv2d", "StdConv2dSame"])
def test_weight_standardised_convs(photos, cls_name):
    from timm import layers

    cls = getattr(layers, cls_name)
    stride = 2
    conv = cls(3, 8, 3, stride=stride, eps=1e-8)
    model = randomized(nn.Sequential(conv, Head(8)), seed=7)
    if cls_name == "ScaledStdConv2d":
        with torch.no_grad():
            conv.gain.uniform_(0.5, 2.0)
    spec = spec_of(model)
    std = spec.branches[0].standardization
    assert spec.flags["standardized"] is True and std is not None and std.eps == 1e-8
    if cls_name == "ScaledStdConv2d":
        assert std.gain_key == "0.gain" and std.scale == pytest.approx(conv.scale)
        assert spec.parameter_names == ["0.weight", "0.gain"]
    if cls_name == "StdConv2dSame":
        assert spec.padding == "same"
    kernel, _ = spec.materialize(model.state_dict())
    flat = kernel.reshape(8, -1)
    if cls_name != "ScaledStdConv2d":  # standardised: zero mean, unit variance per filter
        np.testing.assert_allclose(flat.mean(1), 0, atol=1e-6)
        np.testing.assert_allclose(flat.var(1), 1, atol=1e-5)
    x = photo_tensor(photos, "motorcycle_left")
    assert_close(apply_spec(spec, model, x), conv(x).detach())


# ----------------------------------------------------------------- space to depth


@pytest.mark.parametrize("order", ["pixel_unshuffle", "tresnet"])
def test_space_to_depth_stems(photos, order):
    from timm.models.tresnet import SpaceToDepth

    s2d = nn.PixelUnshuffle(4) if order == "pixel_unshuffle" else SpaceToDepth(4)
    model = randomized(nn.Sequential(s2d, nn.Conv2d(48, 16, 3, padding=1), Head(16)), seed=11)
    spec = spec_of(model)
    assert spec.module == "1" and spec.in_channels == 3
    assert spec.flags["space_to_depth"] == 4
    expected_order = "(c, dy, dx)" if order == "pixel_unshuffle" else "(dy, dx, c)"
    assert spec.flags["space_to_depth_order"] == expected_order
    assert (spec.kernel_size, spec.stride, spec.padding) == ((12, 12), (4, 4), (4, 4))
    kernel, flags = spec.materialize(model.state_dict())
    assert kernel.shape == (16, 3, 12, 12) and flags["space_to_depth_converted"] is True
    x = photo_tensor(photos, "astronaut")
    assert_close(apply_spec(spec, model, x), model[1](model[0](x)).detach())
    # the public helper agrees with the probe-derived order
    helper = space_to_depth_kernel(model[1].weight, 4, order=order)
    np.testing.assert_allclose(helper, kernel, atol=1e-6)
    # unconverted: the stored kernel and the layer's own geometry
    raw, raw_flags = spec.materialize(model.state_dict(), convert_space_to_depth=False)
    assert raw.shape == (16, 48, 3, 3) and raw_flags["space_to_depth_converted"] is False
    assert spec.geometry(False)["stride"] == (1, 1)


def test_space_to_depth_orders_differ():
    w = torch.randn(2, 12, 3, 3, generator=torch.Generator().manual_seed(0))
    a = space_to_depth_kernel(w, 2, order="pixel_unshuffle")
    b = space_to_depth_kernel(w, 2, order="tresnet")
    assert a.shape == b.shape == (2, 3, 6, 6) and not np.allclose(a, b)
    with pytest.raises(ValueError, match="order"):
        space_to_depth_kernel(w, 2, order="nope")


def test_grayscale_space_to_depth(photos):
    model = randomized(nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(4, 6, 3, stride=2), Head(6)))
    spec = spec_of(model, (1, 1, 64, 64))
    assert spec.in_channels == 1 and spec.stride == (4, 4) and spec.kernel_size == (6, 6)
    x = photo_tensor(photos, "coffee", channels=1)
    assert_close(apply_spec(spec, model, x), model[1](model[0](x)).detach())


# ------------------------------------------------------------ linear embeddings


@pytest.mark.parametrize(
    ("embed", "patch", "stride", "order"),
    [
        (PatchesLast(8, 8), (8, 8), (8, 8), "(dy, dx, c)"),
        (PatchesLast(4, 8), (4, 8), (4, 8), "(dy, dx, c)"),
        (PatchesUnfold(8, 8), (8, 8), (8, 8), "(c, dy, dx)"),
        (PatchesUnfold(8, 4), (8, 8), (4, 4), "(c, dy, dx)"),
    ],
)
def test_linear_patch_embeddings(photos, embed, patch, stride, order):
    d = 3 * patch[0] * patch[1]
    model = randomized(nn.Sequential(embed, nn.Linear(d, 24), nn.Linear(24, 5)), seed=13)
    spec = spec_of(model)
    assert (spec.module, spec.kind) == ("1", "linear")
    assert (spec.kernel_size, spec.stride, spec.padding) == (patch, stride, (0, 0))
    assert spec.flags["patch_order"] == order
    kernel, _ = spec.materialize(model.state_dict())
    assert kernel.shape == (24, 3, *patch)
    x = photo_tensor(photos, "hubble_deep_field")
    conv = apply_spec(spec, model, x)  # (1, 24, H', W')
    tokens = model[1](model[0](x)).detach()  # (1, N, 24), row-major tokens
    assert_close(conv.flatten(2).transpose(1, 2), tokens)


def test_linear_on_the_flattened_image(photos):
    model = randomized(nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 10), nn.Linear(10, 2)))
    spec = spec_of(model, (1, 3, 16, 16))
    assert spec.kind == "linear" and spec.kernel_size == (16, 16)
    x = photo_tensor(photos, size=16)
    assert_close(apply_spec(spec, model, x).flatten(1), model[1](model[0](x)).detach())


def test_linear_that_does_not_read_patches_is_refused():
    model = nn.Sequential(nn.Linear(32, 8), nn.Linear(8, 2))  # mixes rows of each channel
    with pytest.raises(UnsupportedModel, match="does not read image patches"):
        spec_of(model, (1, 3, 32, 32))


# ------------------------------------------------------ transforms and channels


def test_transform_input_is_an_affine_folded_into_mean_std(photos):
    model = randomized(nn.Sequential(TransformInput(), nn.Conv2d(3, 8, 7, 2, 3), Head(8)))
    spec = spec_of(model)
    assert spec.module == "1" and spec.flags["input_transform"] == "affine per channel"
    np.testing.assert_allclose(spec.input_scale, [0.458, 0.448, 0.45], rtol=1e-6)
    np.testing.assert_allclose(spec.input_offset, [-0.03, -0.088, -0.188], atol=1e-6)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    layer = spec.to_first_layer(model.state_dict(), mean=mean, std=std)
    # paper pitfall 9: the conv of an ImageNet-normalised GoogLeNet sees (p - 0.5) / 0.5
    np.testing.assert_allclose(layer.mean, 0.5, atol=1e-6)
    np.testing.assert_allclose(layer.std, 0.5, atol=1e-6)
    assert layer.metadata["model_mean"] == list(mean) and layer.metadata["model_std"] == list(std)
    pixels = photo_tensor(photos, "retina")
    x = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    seen = first_layer_input(model, "1", x)
    eff = (pixels - torch.tensor(layer.mean).view(1, 3, 1, 1)) / torch.tensor(layer.std).view(
        1, 3, 1, 1
    )
    assert_close(eff, seen)


def test_channel_permutation_is_folded_into_the_kernel(photos):
    model = randomized(nn.Sequential(Flip(), nn.Conv2d(3, 8, 3), Head(8)))
    spec = spec_of(model)
    assert spec.flags["input_transform"] == "channel permutation"
    assert [c for c, _, _ in spec.input_map.features] == [2, 1, 0]
    kernel, _ = spec.materialize(model.state_dict())
    np.testing.assert_array_equal(kernel, model[1].weight.detach().float().flip(1).numpy())
    x = photo_tensor(photos)
    assert_close(apply_spec(spec, model, x), model[1](model[0](x)).detach())


def test_explicit_padding_before_the_layer(photos):
    model = randomized(nn.Sequential(nn.ZeroPad2d(2), nn.Conv2d(3, 8, 5, padding=1), Head(8)))
    spec = spec_of(model)
    assert spec.padding == (3, 3) and spec.input_map.origin == (-2, -2)
    assert spec.flags["input_transform"] == "padding"
    x = photo_tensor(photos)
    assert_close(apply_spec(spec, model, x), model[1](model[0](x)).detach())


def test_same_padding_is_recorded():
    from timm.layers import Conv2dSame

    native = nn.Sequential(nn.Conv2d(3, 8, 3, padding="same"), Head(8))
    assert spec_of(native).padding == "same"
    tf_same = nn.Sequential(Conv2dSame(3, 8, 3, stride=2), Head(8))
    spec = spec_of(tf_same)
    assert spec.padding == "same" and spec.stride == (2, 2)


def test_reflect_padding_mode():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect"), Head(8))
    spec = spec_of(model)
    assert spec.padding == (1, 1) and spec.flags["padding_mode"] == "reflect"


@pytest.mark.parametrize("channels", [1, 4, 12])
def test_other_channel_counts(photos, channels):
    model = randomized(nn.Sequential(nn.Conv2d(channels, 6, 3, stride=2, dilation=2), Head(6)))
    spec = spec_of(model, (1, channels, 64, 64))
    assert spec.in_channels == channels and spec.dilation == (2, 2)
    kernel, _ = spec.materialize(model.state_dict())
    assert kernel.shape == (6, channels, 3, 3)
    x = photo_tensor(photos, channels=channels)
    assert_close(apply_spec(spec, model, x), model[0](x).detach())
    layer = spec.to_first_layer(model.state_dict(), channel_order="L" if channels == 1 else "other")
    assert layer.shape_key == (channels, 3, 3)


def test_grouped_first_layer_keeps_its_groups():
    model = nn.Sequential(nn.Conv2d(3, 12, 3, groups=3), Head(12))
    spec = spec_of(model)
    assert spec.groups == 3
    kernel, _ = spec.materialize(randomized(model).state_dict())
    assert kernel.shape == (12, 1, 3, 3)


def test_buffer_normalisation_probe(photos):
    real = randomized(nn.Sequential(BufferNormalize(), nn.Conv2d(3, 8, 3), Head(8)))
    with torch.no_grad():  # randomized() overwrote the constants
        real[0].mean.copy_(torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        real[0].std.copy_(torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
    # on meta the buffers have no values: the layer is found, its input map is not
    meta_spec = spec_of(real)
    assert meta_spec.input_map is None and "computed from buffers" in meta_spec.flags["input_map"]
    assert "taken to be the image channels" in meta_spec.flags["input_map"]
    assert meta_spec.materialize(real.state_dict())[0].shape == (8, 3, 3, 3)
    # on a real model the probe reads the buffers and exposes the affine
    spec = find_first_layer(real, (1, 3, 32, 32))
    np.testing.assert_allclose(spec.input_scale, 1 / np.array([0.229, 0.224, 0.225]), rtol=1e-6)
    np.testing.assert_allclose(
        spec.input_offset,
        -np.array([0.485, 0.456, 0.406]) / np.array([0.229, 0.224, 0.225]),
        rtol=1e-6,
    )
    layer = spec.to_first_layer(real.state_dict())
    np.testing.assert_allclose(layer.mean, [0.485, 0.456, 0.406], rtol=1e-6)
    np.testing.assert_allclose(layer.std, [0.229, 0.224, 0.225], rtol=1e-6)
    assert layer.metadata["model_mean"] is None


# ------------------------------------------------------------------ first layer


def test_to_first_layer_record(photos):
    model = randomized(nn.Sequential(RepVggStem(), Head(8)))
    spec = spec_of(model)
    prov = Provenance(repo="local", file="stem.safetensors", bytes_fetched=10)
    layer = spec.to_first_layer(
        model.state_dict(),
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        channel_order="BGR",
        input_size=(64, 64),
        provenance=prov,
        metadata={"architecture": "repvgg-like"},
    )
    assert isinstance(layer, FirstLayer)
    assert (layer.module, layer.kind, layer.stride, layer.padding) == (
        spec.module,
        "fused",
        (2, 2),
        (1, 1),
    )
    assert layer.weight.shape == (8, 3, 3, 3) and layer.weight.dtype == np.float32
    assert layer.mean == (0.5, 0.5, 0.5) and layer.std == (0.25, 0.25, 0.25)
    assert layer.channel_order == "BGR" and layer.input_size == (64, 64) and layer.bias
    assert layer.flags["fused_branches"] == 2
    assert layer.provenance.tensor_key == "0.conv_kxk.0.weight+0.conv_1x1.0.weight"
    assert prov.tensor_key is None  # the caller's object is not modified
    assert layer.metadata["architecture"] == "repvgg-like"


def test_to_first_layer_unconverted_space_to_depth_repeats_mean_std():
    model = randomized(nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(12, 4, 3), Head(4)))
    spec = spec_of(model)
    layer = spec.to_first_layer(
        model.state_dict(), mean=(0.1, 0.2, 0.3), std=(1.0, 2.0, 3.0), convert_space_to_depth=False
    )
    assert layer.weight.shape == (4, 12, 3, 3) and layer.channel_order == "other"
    assert layer.mean == tuple(m for m in (0.1, 0.2, 0.3) for _ in range(4))
    assert layer.stride == (1, 1)
    converted = spec.to_first_layer(model.state_dict(), mean=(0.1, 0.2, 0.3))
    assert converted.weight.shape == (4, 3, 6, 6) and converted.stride == (2, 2)


def test_checkpoint_problems_are_reported():
    model = randomized(nn.Sequential(nn.Conv2d(3, 8, 3), Head(8)))
    spec = spec_of(model)
    with pytest.raises(CheckpointError, match="no tensor '0.weight'"):
        spec.materialize({})
    with pytest.raises(CheckpointError, match="shape"):
        spec.materialize({"0.weight": np.zeros((8, 3, 5, 5))})
    with pytest.raises(UnsupportedModel, match="mean has 2 values"):
        spec.to_first_layer(model.state_dict(), mean=(0.5, 0.5))
    bf16 = {"0.weight": model[0].weight.detach().to(torch.bfloat16)}
    assert spec.materialize(bf16)[0].dtype == np.float32


# -------------------------------------------------------------------------- errors


def test_no_layer_consumes_the_image():
    model = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()).to("meta")
    with pytest.raises(FirstLayerNotFound, match="no Conv2d or Linear layer"):
        find_first_layer(model, (1, 3, 32, 32))


def test_learned_layer_before_every_conv():
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 8, 3)).to("meta")
    with pytest.raises(FirstLayerNotFound, match="only through 'batch_norm' in module '0'"):
        find_first_layer(model, (1, 3, 32, 32))


def test_layernorm_before_a_patch_projection():
    class VitPytorchStyle(nn.Module):  # lucidrains/vit-pytorch: LayerNorm(patch) -> Linear
        def __init__(self):
            super().__init__()
            self.patches = PatchesLast(4, 4)
            self.norm = nn.LayerNorm(48)
            self.proj = nn.Linear(48, 16)

        def forward(self, x):
            return self.proj(self.norm(self.patches(x)))

    with pytest.raises(FirstLayerNotFound, match="'proj'.*'layer_norm' in module 'norm'"):
        spec_of(VitPytorchStyle(), (1, 3, 16, 16))


def test_three_d_first_layer_is_not_a_2d_first_layer():
    model = nn.Sequential(nn.Conv3d(3, 8, 3)).to("meta")
    with pytest.raises(UnsupportedModel, match="Conv3d"):
        find_first_layer(model, (1, 3, 4, 16, 16))


def test_forward_failing_before_any_layer():
    class Picky(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)

        def forward(self, x):
            if x.shape[-1] != 299:
                raise ValueError("expects 299x299 images")
            return self.conv(x)

    with pytest.raises(FirstLayerNotFound, match="ValueError: expects 299x299"):
        find_first_layer(Picky().to("meta"), (1, 3, 224, 224))
    assert find_first_layer(Picky().to("meta"), (1, 3, 299, 299)).module == "conv"


def test_weight_norm_parametrisation_is_reported():
    conv = nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 8, 3))
    with pytest.raises(UnsupportedModel, match="not a stored parameter"):
        spec_of(nn.Sequential(conv, Head(8)))


def test_input_map_identity_helper():
    m = InputMap.identity(3)
    assert m.is_identity and m.is_channel_map and m.features == ((0, 0, 0), (1, 0, 0), (2, 0, 0))


def test_another_transform_of_the_image_is_flagged():
    class TwoScales(nn.Module):  # timm CrossViT: a patch embedding per image scale
        def __init__(self):
            super().__init__()
            self.fine = nn.Conv2d(3, 8, 4, stride=4)
            self.coarse = nn.Conv2d(3, 8, 4, stride=4)

        def forward(self, x):
            small = F.interpolate(x, scale_factor=0.5, mode="bilinear")
            return self.fine(x).mean() + self.coarse(small).mean()

    spec = spec_of(TwoScales())
    assert spec.module == "fine" and spec.flags["other_image_consumers"] == ["coarse"]


def test_unknown_map_with_other_channel_count_cannot_be_materialized():
    class Dct(nn.Module):  # a fixed transform held in a buffer: unknown on meta
        def __init__(self):
            super().__init__()
            self.register_buffer("basis", torch.randn(16, 3 * 4 * 4))
            self.conv = nn.Conv2d(16, 8, 1)

        def forward(self, x):
            patches = F.unfold(x, 4, stride=4)  # (1, 48, L)
            coeffs = (self.basis @ patches).reshape(1, 16, x.shape[2] // 4, x.shape[3] // 4)
            return self.conv(coeffs)

    model = randomized(Dct())
    spec = spec_of(model, (1, 3, 32, 32))
    assert spec.module == "conv" and spec.input_map is None
    assert "computed from buffers" in spec.flags["input_map"]
    assert "channels are taken" not in spec.flags["input_map"]
    with pytest.raises(UnsupportedModel, match="cannot map the 16 input channels"):
        spec.materialize(model.state_dict())


def test_sum_of_a_raw_output_whose_batchnorm_is_used_elsewhere_is_refused():
    class RawSum(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
            self.b = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            ya = self.a(x)
            return ya + self.b(x), self.bn(ya)  # the sum uses the raw output of `a`

    with pytest.raises(UnsupportedModel, match="no single equivalent kernel"):
        spec_of(RawSum())


def test_branches_summed_with_the_builtin_sum(photos):
    class BuiltinSum(nn.Module):
        def __init__(self):
            super().__init__()
            self.convs = nn.ModuleList(nn.Conv2d(3, 4, k, padding=k // 2) for k in (1, 3, 5))

        def forward(self, x):
            return sum(conv(x) for conv in self.convs)

    model = randomized(nn.Sequential(BuiltinSum(), Head(4)))
    spec = spec_of(model)
    assert spec.combination == "sum" and spec.kernel_size == (5, 5) and spec.padding == (2, 2)
    assert spec.branches[0].module == "0.convs.2"
    x = photo_tensor(photos, "coffee")
    assert_close(apply_spec(spec, model, x), model[0](x).detach())
