"""First-layer finding on real architectures: every torchvision classifier, a sample of
torchvision detection/segmentation/video models, timm and Hugging Face transformers.

Models are built on the ``meta`` device (no weights, nothing downloaded).
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import get_model, list_models

from zooscan.errors import UnsupportedModel
from zooscan.layers import build_on_meta, find_first_layer

CLASSIFIERS = list_models(module=torchvision.models)

EXPECTED_MODULE = {
    "alexnet": "features.0",
    "convnext_tiny": "features.0.0",
    "densenet121": "features.conv0",
    "efficientnet_b0": "features.0.0",
    "googlenet": "conv1.conv",
    "inception_v3": "Conv2d_1a_3x3.conv",
    "maxvit_t": "stem.0.0",
    "mnasnet1_0": "layers.0",
    "mobilenet_v2": "features.0.0",
    "regnet_y_400mf": "stem.0",
    "resnet50": "conv1",
    "shufflenet_v2_x1_0": "conv1.0",
    "squeezenet1_0": "features.0",
    "swin_t": "features.0.0",
    "vgg16": "features.0",
    "vit_b_16": "conv_proj",
}


def torchvision_model(name: str, **kwargs) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # init-weights deprecation notices
        return build_on_meta(get_model, name, weights=None, **kwargs)


def timm_model(name: str) -> nn.Module:
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False)


# ------------------------------------------------------------------- torchvision


def test_every_torchvision_classifier_is_listed():
    assert len(CLASSIFIERS) >= 70 and set(EXPECTED_MODULE) <= set(CLASSIFIERS)


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_torchvision_classifier(name):
    model = torchvision_model(name)
    spec = find_first_layer(model, (1, 3, 224, 224))
    module = model.get_submodule(spec.module)
    state = model.state_dict()
    assert spec.kind == "conv" and isinstance(module, nn.Conv2d)
    assert spec.weight_key == f"{spec.module}.weight" and spec.weight_key in state
    assert state[spec.weight_key].shape == (module.out_channels, 3, *module.kernel_size)
    assert (spec.kernel_size, spec.stride) == (module.kernel_size, module.stride)
    assert (spec.padding, spec.dilation, spec.groups) == (
        module.padding,
        module.dilation,
        module.groups,
    )
    assert spec.bias == (module.bias is not None) and spec.flags == {}
    assert spec.input_map.is_identity and spec.input_scale is None
    # independent oracle: in torchvision the stem conv is also the first one registered
    first = next(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    assert spec.module == first
    if name in EXPECTED_MODULE:
        assert spec.module == EXPECTED_MODULE[name]


def test_regnets_need_build_on_meta():
    with pytest.raises(NotImplementedError), torch.device("meta"):
        get_model("regnet_x_400mf", weights=None)  # computes its widths with .tolist()
    model = torchvision_model("regnet_x_400mf")
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {b.device.type for b in model.buffers()} == {"meta"}
    assert nn.Module.register_parameter.__qualname__ == "Module.register_parameter"


@pytest.mark.parametrize("name", ["googlenet", "inception_v3"])
def test_torchvision_transform_input(name):
    kwargs = {"transform_input": True, "init_weights": False}
    spec = find_first_layer(torchvision_model(name, **kwargs), (1, 3, 299, 299))
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(spec.input_scale, std / 0.5, rtol=1e-6)
    np.testing.assert_allclose(spec.input_offset, (mean - 0.5) / 0.5, atol=1e-6)
    assert spec.flags == {"input_transform": "affine per channel"}
    assert spec.stride == (2, 2)


@pytest.mark.parametrize(
    ("name", "module"),
    [
        ("fasterrcnn_resnet50_fpn", "backbone.body.conv1"),
        ("ssd300_vgg16", "backbone.features.0"),
        ("deeplabv3_resnet50", "backbone.conv1"),
        ("lraspp_mobilenet_v3_large", "backbone.0.0"),
    ],
)
def test_torchvision_detection_and_segmentation(name, module):
    model = torchvision_model(name, weights_backbone=None)
    spec = find_first_layer(model, (1, 3, 224, 224))
    assert spec.module == module and spec.weight_key in model.state_dict()
    if name == "fasterrcnn_resnet50_fpn":
        # GeneralizedRCNNTransform normalises with ImageNet constants, then resizes
        assert spec.flags["input_transform"] == "resampled; affine per channel"
        np.testing.assert_allclose(spec.input_scale, 1 / np.array([0.229, 0.224, 0.225]), rtol=1e-5)
        np.testing.assert_allclose(
            spec.input_offset, -np.array([0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225], rtol=1e-5
        )
    elif name == "ssd300_vgg16":  # SSD works on the 0..255 scale
        np.testing.assert_allclose(spec.input_scale, 255.0, rtol=1e-5)
    else:
        assert spec.input_scale is None


@pytest.mark.parametrize("name", ["r3d_18", "mvit_v2_s"])
def test_torchvision_video_models_are_not_2d(name):
    with pytest.raises(UnsupportedModel, match="Conv3d"):
        find_first_layer(torchvision_model(name), (1, 3, 16, 112, 112))


def test_finding_is_fast():
    timm = pytest.importorskip("timm")
    models = [torchvision_model("resnet50")]
    with torch.device("meta"):
        models.append(timm.create_model("vit_large_patch16_224", pretrained=False))
    for model in models:
        find_first_layer(model)  # warm-up
        best = min(_timed(find_first_layer, model) for _ in range(3))
        assert best < 1.0, f"{type(model).__name__}: {best:.2f}s"


def _timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


# -------------------------------------------------------------------------- timm


@pytest.mark.parametrize(
    ("name", "kernel", "stride", "padding", "flags"),
    [
        ("tresnet_m", (12, 12), (4, 4), (4, 4), {"space_to_depth": 4}),
        ("repvgg_a0", (3, 3), (2, 2), (1, 1), {"fused_branches": 2}),
        ("mobileone_s0", (3, 3), (2, 2), (1, 1), {"fused_branches": 2}),
        ("resnetv2_50x1_bit", (7, 7), (2, 2), (3, 3), {"standardized": True}),
        ("nfnet_f0", (3, 3), (2, 2), (1, 1), {"standardization": "scaled"}),
        ("vit_base_r50_s16_224", (7, 7), (2, 2), "same", {"standardized": True}),
        ("vit_base_patch16_224", (16, 16), (16, 16), (0, 0), {}),
        ("convnext_tiny", (4, 4), (4, 4), (0, 0), {}),
        ("efficientnet_b0", (3, 3), (2, 2), (1, 1), {}),
        ("tf_efficientnet_b0", (3, 3), (2, 2), "same", {}),
    ],
)
def test_timm_models(name, kernel, stride, padding, flags):
    model = timm_model(name)
    spec = find_first_layer(model)
    assert (spec.kernel_size, spec.stride, spec.padding) == (kernel, stride, padding)
    assert flags.items() <= spec.flags.items()
    first_conv = model.pretrained_cfg["first_conv"]
    expected = {first_conv} if isinstance(first_conv, str) else set(first_conv)
    assert {b.module for b in spec.branches} == expected
    state = model.state_dict()
    assert set(spec.parameter_names) <= set(state)


def test_timm_bit_standardisation_eps():
    spec = find_first_layer(timm_model("resnetv2_50x1_bit"))
    assert spec.branches[0].standardization.eps == 1e-8


@pytest.mark.parametrize("block", ["RepVggBlock", "MobileOneBlock"])
def test_fusion_matches_timm_reparameterize(block):
    """timm's own ``reparameterize()`` fuses the branches: our kernel must equal it."""
    pytest.importorskip("timm")
    from timm.models import byobnet

    gen = torch.Generator().manual_seed(0)
    stem = getattr(byobnet, block)(3, 16, stride=2)
    with torch.no_grad():
        for name, t in stem.state_dict().items():
            if t.dtype.is_floating_point:
                scale = 1.0 if "running_var" in name else 0.5
                t.copy_(torch.rand(t.shape, generator=gen) * scale + (0.5 if scale == 1 else 0))
    model = nn.Sequential(stem, nn.Conv2d(16, 4, 3)).eval()
    meta = build_on_meta(
        lambda: nn.Sequential(getattr(byobnet, block)(3, 16, stride=2), nn.Conv2d(16, 4, 3))
    )
    spec = find_first_layer(meta, (1, 3, 32, 32))
    assert spec.kind == "fused"
    kernel, _ = spec.materialize(model.state_dict())
    bias = spec.effective_bias(model.state_dict())
    stem.reparameterize()
    np.testing.assert_allclose(kernel, stem.reparam_conv.weight.detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(bias, stem.reparam_conv.bias.detach().numpy(), atol=1e-5)


# ------------------------------------------------------------------ transformers


def hf_model(cls_name: str, config_name: str, **config):
    transformers = pytest.importorskip("transformers")
    config = getattr(transformers, config_name)(**config)
    with torch.device("meta"):
        return getattr(transformers, cls_name)(config)


def pixel_values(model, x):
    return model(pixel_values=x)


def test_transformers_vit_patch_embedding():
    model = hf_model("ViTModel", "ViTConfig", num_hidden_layers=1, hidden_size=32,
                     intermediate_size=32, num_attention_heads=2)  # fmt: skip
    spec = find_first_layer(model, forward=pixel_values)
    assert spec.module == "embeddings.patch_embeddings.projection"
    assert (spec.kernel_size, spec.stride) == ((16, 16), (16, 16))


def test_transformers_bit_standardised_same_padding():
    model = hf_model("BitModel", "BitConfig", global_padding="SAME", layer_type="bottleneck")
    spec = find_first_layer(model, forward=pixel_values)
    assert spec.module == "embedder.convolution" and spec.padding == "same"
    assert spec.flags["standardized"] is True


def test_transformers_efficientnet_asymmetric_padding_is_same():
    model = hf_model("EfficientNetModel", "EfficientNetConfig", image_size=64)
    spec = find_first_layer(model, (1, 3, 64, 64), forward=pixel_values)
    # a ZeroPad2d((0, 1, 0, 1)) before a "valid" stride-2 conv is TensorFlow's SAME
    assert spec.module == "embeddings.convolution" and spec.padding == "same"
