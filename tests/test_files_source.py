"""The ``files`` source, through the plugin contract, on real checkpoint files."""

from __future__ import annotations

import collections
import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from zooscan.errors import ModelError, UserError
from zooscan.plugins import get_source
from zooscan.records import FirstLayer, ModelRef

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _weights(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def zoo(tmp_path) -> dict[str, object]:
    """A folder of checkpoints in every format, with sidecars, nesting and junk."""
    root = tmp_path / "zoo"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    (root / "nested" / "deep").mkdir(parents=True)
    (root / ".hidden").mkdir()
    tensors = {
        "conv3": _weights(1, 16, 3, 3, 3),
        "caffe7": _weights(2, 32, 3, 7, 7),
        "vit16": _weights(3, 24, 3, 16, 16),
        "gray5": _weights(4, 8, 1, 5, 5),
    }
    save_file(
        {
            "stem.conv.weight": tensors["conv3"],
            "stem.bn.weight": torch.ones(16),
            "head.weight": torch.zeros(10, 16),
        },
        str(root / "a" / "convnet.safetensors"),
    )
    (root / "a" / "convnet.safetensors.json").write_text(
        json.dumps({"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "channel_order": "RGB"})
    )
    torch.save(
        {"state_dict": {"conv1.weight": tensors["caffe7"], "conv1.bias": torch.zeros(32)}},
        root / "b" / "caffe.pt",
    )
    (root / "b" / "caffe.json").write_text(
        json.dumps(
            {
                "mean": [0.406, 0.456, 0.485],
                "std": [1 / 255] * 3,
                "channel_order": "BGR",
                "input_size": 224,
            }
        )
    )
    vit = collections.OrderedDict(
        cls_token=torch.zeros(1, 1, 24).numpy(),
        pos_embed=torch.zeros(1, 197, 24).numpy(),
        norm_running_mean=torch.zeros(24).numpy(),
        patch_embed_proj_weight=tensors["vit16"].numpy(),
        head_weight=torch.zeros(10, 24, 1, 1).numpy(),
    )
    np.savez(root / "vit.npz", **vit)
    torch.save({"conv.weight": tensors["gray5"]}, root / "nested" / "deep" / "gray.pth")
    torch.save({"w": torch.ones(1, 1, 1, 1)}, root / ".hidden" / "secret.pt")
    (root / "notes.txt").write_text("not a checkpoint")
    return {"root": root, "tensors": tensors}


def _source(**options: str):
    return get_source("files", options)


def _load(source, root: Path, name: str) -> FirstLayer:
    refs = {ref.name: ref for ref in source.list_models([str(root)])}
    return source.load_first_layer(refs[name])


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- listing


def test_lists_recursively_with_relative_names(zoo):
    root = zoo["root"]
    refs = list(_source().list_models([str(root)]))
    assert [r.name for r in refs] == ["a/convnet", "b/caffe", "nested/deep/gray", "vit"]
    assert all(r.source == "files" for r in refs)
    gray = refs[2].info
    assert gray["path"] == str(root.resolve() / "nested" / "deep" / "gray.pth")
    assert gray["root"] == str(root.resolve()) and gray["file"] == "nested/deep/gray.pth"
    assert (
        gray["format"] == "pth" and gray["bytes"] == (root / "nested/deep/gray.pth").stat().st_size
    )


def test_single_file_is_named_by_its_stem_and_collisions_keep_suffixes(zoo, tmp_path):
    root = zoo["root"]
    refs = list(_source().list_models([str(root / "b" / "caffe.pt")]))
    assert [r.name for r in refs] == ["caffe"]
    both = tmp_path / "dups"
    both.mkdir()
    torch.save({"w": torch.ones(2, 3, 3, 3)}, both / "m.pt")
    np.savez(both / "m.npz", w=np.ones((2, 3, 3, 3), np.float32))
    assert [r.name for r in _source().list_models([str(both)])] == ["m.npz", "m.pt"]
    other = tmp_path / "other"
    other.mkdir()
    torch.save({"w": torch.ones(2, 3, 3, 3)}, other / "m.pt")
    names = [r.name for r in _source().list_models([str(both), str(other), str(both / "m.pt")])]
    assert names == ["m.npz", "dups/m.pt", "other/m.pt"]  # the repeated file is listed once


def test_listing_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="give one or more"):
        list(_source().list_models([]))
    with pytest.raises(UserError, match="no such file or directory"):
        list(_source().list_models([str(tmp_path / "absent")]))


# --------------------------------------------------------------------------- loading


def test_safetensors_with_full_name_sidecar(zoo):
    root = zoo["root"]
    layer = _load(_source(), root, "a/convnet")
    assert np.array_equal(layer.weight, zoo["tensors"]["conv3"].numpy())
    assert layer.module == "stem.conv" and layer.kind == "conv" and layer.bias is False
    assert layer.mean == (0.5, 0.5, 0.5) and layer.std == (0.25, 0.25, 0.25)
    assert layer.channel_order == "RGB"
    prov = layer.provenance
    path = root / "a" / "convnet.safetensors"
    assert prov.repo == str(root.resolve()) and prov.file == "a/convnet.safetensors"
    assert prov.tensor_key == "stem.conv.weight" and prov.bytes_fetched == 0
    start, end = prov.byte_range
    assert _sha(path.read_bytes()[start:end]) == prov.sha256
    mtime = datetime.fromtimestamp(path.stat().st_mtime, tz=timezone.utc)
    assert datetime.fromisoformat(prov.revision) == mtime
    assert layer.metadata["located_by"] == "first 4-D tensor"


def test_nested_torch_checkpoint_with_stem_sidecar_bgr(zoo):
    layer = _load(_source(), zoo["root"], "b/caffe")
    assert np.array_equal(layer.weight, zoo["tensors"]["caffe7"].numpy())
    assert layer.provenance.tensor_key == "state_dict.conv1.weight"
    assert layer.module == "state_dict.conv1" and layer.bias is True
    assert layer.channel_order == "BGR" and layer.input_size == (224, 224)
    assert layer.mean == (0.406, 0.456, 0.485) and layer.std == pytest.approx((1 / 255,) * 3)
    assert layer.shape_key == (3, 7, 7)


def test_first_4d_fallback_is_not_fooled_by_tokens_and_buffers(zoo):
    layer = _load(_source(), zoo["root"], "vit")
    assert layer.provenance.tensor_key == "patch_embed_proj_weight"
    assert np.array_equal(layer.weight, zoo["tensors"]["vit16"].numpy())
    assert layer.shape_key == (3, 16, 16) and layer.mean is None and layer.std is None
    start, end = layer.provenance.byte_range  # np.savez stores members uncompressed
    raw = (zoo["root"] / "vit.npz").read_bytes()[start:end]
    assert np.array_equal(np.frombuffer(raw, "<f4").reshape(24, 3, 16, 16), layer.weight)


def test_grayscale_defaults_to_luminance(zoo):
    layer = _load(_source(), zoo["root"], "nested/deep/gray")
    assert layer.shape_key == (1, 5, 5) and layer.channel_order == "L"


def test_options_override_the_sidecar(zoo):
    layer = _load(_source(mean="0.45", std="0.2", channel_order="RGB"), zoo["root"], "b/caffe")
    assert layer.mean == (0.45, 0.45, 0.45) and layer.std == (0.2, 0.2, 0.2)
    assert layer.channel_order == "RGB"
    assert layer.input_size == (224, 224)  # not overridden: still from the sidecar


def test_key_option_and_2d_patch_embeddings(tmp_path):
    proj = _weights(5, 12, 3 * 4 * 4)
    other = _weights(6, 5, 3, 3, 3)
    path = tmp_path / "m.pt"
    torch.save(
        {"first.weight": other, "embed.proj.weight": proj, "embed.proj.bias": torch.zeros(12)}, path
    )
    ref = ModelRef("files", "m", {"path": str(path), "root": str(tmp_path)})
    with pytest.raises(ModelError, match=r"2-D \[12, 48\].*patch=CxKHxKW"):
        _source(key="embed.proj.weight").load_first_layer(ref)
    layer = _source(key="module.embed.proj.weight", patch="3x4x4").load_first_layer(ref)
    assert layer.kind == "linear" and layer.stride == (4, 4) and layer.bias is True
    assert np.array_equal(layer.weight, proj.numpy().reshape(12, 3, 4, 4))
    assert layer.provenance.tensor_key == "embed.proj.weight"
    with pytest.raises(ModelError, match="patch 3x5x5 has 75 inputs"):
        _source(key="embed.proj.weight", patch="3x5x5").load_first_layer(ref)
    with pytest.raises(ModelError, match="no tensor 'nope.weight'"):
        _source(key="nope.weight").load_first_layer(ref)
    with pytest.raises(ModelError, match=r"shape \[12\]"):
        _source(key="embed.proj.bias").load_first_layer(ref)


def test_sidecar_key_is_used(tmp_path):
    path = tmp_path / "two.safetensors"
    first, second = _weights(7, 4, 3, 3, 3), _weights(8, 6, 3, 5, 5)
    save_file({"a.weight": first, "b.weight": second}, str(path))
    (tmp_path / "two.json").write_text(json.dumps({"key": "b.weight"}))
    layer = _load(_source(), tmp_path, "two")
    assert np.array_equal(layer.weight, second.numpy()) and layer.metadata["located_by"] == "key"


def test_arch_locates_the_first_layer(tmp_path):
    from torchvision.models import resnet18

    torch.manual_seed(0)
    state = resnet18(weights=None).state_dict()
    decoy = {"aux.decoy.weight": torch.ones(4, 3, 3, 3)}  # a 4-D tensor first in storage order
    path = tmp_path / "ddp.pth"
    torch.save({"model": decoy | {"module." + k: v for k, v in state.items()}}, path)
    assert _load(_source(), tmp_path, "ddp").provenance.tensor_key == "model.aux.decoy.weight"
    layer = _load(
        _source(arch="resnet18", mean="0.485,0.456,0.406", std="0.229,0.224,0.225"), tmp_path, "ddp"
    )
    assert np.array_equal(layer.weight, state["conv1.weight"].numpy())
    assert layer.provenance.tensor_key == "model.module.conv1.weight"
    assert layer.module == "conv1" and layer.stride == (2, 2) and layer.padding == (3, 3)
    assert layer.mean == IMAGENET_MEAN and layer.std == IMAGENET_STD
    start, end = layer.provenance.byte_range
    assert _sha(path.read_bytes()[start:end]) == layer.provenance.sha256


def test_arch_of_a_detection_model_brings_its_own_normalisation(tmp_path):
    weight = _weights(13, 64, 3, 3, 3)
    torch.save({"backbone.features.0.weight": weight}, tmp_path / "ssd.pt")
    layer = _load(_source(arch="ssd300_vgg16"), tmp_path, "ssd")
    assert np.array_equal(layer.weight, weight.numpy())
    assert layer.mean == pytest.approx((0.48235, 0.45882, 0.40784))
    assert layer.std == pytest.approx((1 / 255,) * 3)
    layer = _load(_source(arch="ssd300_vgg16", mean="0.5", std="0.5"), tmp_path, "ssd")
    assert layer.mean == (0.5,) * 3 and layer.std == (0.5,) * 3


# -------------------------------------------------------------------------- failures


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("trunc.safetensors", "truncate", "truncated"),
        ("garbage.pt", b"definitely not a checkpoint", "unknown format"),
        ("empty.npz", b"", "empty file"),
    ],
)
def test_corrupt_checkpoints_fail_with_reason(tmp_path, name, content, reason):
    path = tmp_path / name
    if content == "truncate":
        save_file({"w": _weights(9, 8, 3, 3, 3)}, str(path))
        path.write_bytes(path.read_bytes()[:-100])
    else:
        path.write_bytes(content)
    (ref,) = _source().list_models([str(path)])
    with pytest.raises(ModelError, match=reason):
        _source().load_first_layer(ref)


def test_no_4d_tensor_without_key_is_explained(tmp_path):
    np.savez(tmp_path / "mlp.npz", fc1=np.ones((8, 48), np.float32), b=np.zeros(8, np.float32))
    (ref,) = _source().list_models([str(tmp_path / "mlp.npz")])
    with pytest.raises(ModelError, match=r"no 4-D tensor among 2 tensors: fc1\[8, 48\]"):
        _source().load_first_layer(ref)
    layer = _source(key="fc1", patch="3x4x4").load_first_layer(ref)
    assert layer.shape_key == (3, 4, 4) and layer.kind == "linear"


def test_non_finite_weights_are_rejected(tmp_path):
    weight = _weights(10, 4, 3, 3, 3)
    weight[0, 0, 0, 0] = float("nan")
    torch.save({"w": weight}, tmp_path / "nan.pt")
    (ref,) = _source().list_models([str(tmp_path / "nan.pt")])
    with pytest.raises(ModelError, match="1 NaN/Inf values"):
        _source().load_first_layer(ref)


@pytest.mark.parametrize(
    ("sidecar", "reason"),
    [
        ("{not json", "not valid JSON"),
        ('["mean"]', "must hold a JSON object"),
        ('{"mean": [0.5, 0.5], "std": [0.2, 0.2]}', "mean has 2 values but the first layer has 3"),
        ('{"mean": [0.5, "x", 0.5]}', "mean must be numbers"),
        ('{"std": [0.2, 0.0, 0.2]}', "std must be > 0"),
        ('{"std": [0.2, -1, 0.2]}', "std must be > 0"),
        ('{"mean": [124, 117, 104]}', "not on the \\[0, 1\\] pixel scale"),
        ('{"channel_order": "GBR"}', "channel_order must be one of"),
        ('{"stds": [0.2]}', "unknown key\\(s\\) stds"),
        ('{"input_size": [0, 224]}', "input_size must be"),
    ],
)
def test_bad_sidecars_fail_clearly(tmp_path, sidecar, reason):
    torch.save({"w": _weights(11, 4, 3, 3, 3)}, tmp_path / "m.pt")
    (tmp_path / "m.pt.json").write_text(sidecar)
    (ref,) = _source().list_models([str(tmp_path / "m.pt")])
    with pytest.raises(ModelError, match=reason) as err:
        _source().load_first_layer(ref)
    assert "m.pt.json" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ({"weights": "default"}, "unknown option\\(s\\) weights"),
        ({"mean": "0.5,abc"}, "mean must be numbers"),
        ({"std": "0.2,0,0.2"}, "std must be > 0"),
        ({"channel_order": "XYZ"}, "channel_order must be one of"),
        ({"key": "a", "arch": "resnet18"}, "either key or arch"),
        ({"arch": "resnet_9000"}, "not a torchvision model builder"),
        ({"arch": "r3d_18"}, "3-D convolution"),
        ({"patch": "3x16"}, "CxKHxKW"),
    ],
)
def test_bad_options_are_user_errors(options, reason):
    with pytest.raises(UserError, match=reason):
        _source(**options)


def test_mtime_revision_tracks_changes(tmp_path):
    path = tmp_path / "m.pt"
    torch.save({"w": _weights(12, 2, 3, 3, 3)}, path)
    os.utime(path, (1_700_000_000, 1_700_000_000))
    (ref,) = _source().list_models([str(path)])
    layer = _source().load_first_layer(ref)
    assert layer.provenance.revision == "2023-11-14T22:13:20+00:00"
