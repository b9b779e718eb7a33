"""The ``torchvision`` source through the plugin contract, offline, with a seeded cache."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import json
import math
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torchvision.models import get_model_weights

from zooscan.errors import CheckpointError, ModelError, UnsupportedModel, UserError
from zooscan.plugins import get_source
from zooscan.records import ModelRef
from zooscan.remote.ranged import HEAD_BLOCK, TAIL_BLOCK
from zooscan_builtins import torchvision_source as tv

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(autouse=True)
def torch_home(tmp_path, monkeypatch) -> Path:
    """An empty TORCH_HOME; downloads go to a refused local port (never the internet)."""
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setenv(tv.URL_BASE_ENV, f"http://127.0.0.1:{_closed_port()}/")
    return home


def _source(**options: str):
    return get_source("torchvision", options)


def _seed_cache(builder: str, tensors: dict[str, torch.Tensor]) -> Path:
    path = tv.cache_path(get_model_weights(builder).DEFAULT.url)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(tensors, path)
    return path


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- listing


def test_lists_every_task_with_weights_metadata():
    refs = list(_source().list_models([]))
    names = [r.name for r in refs]
    assert names == sorted(names) and len(set(names)) == len(names)
    supported = [r for r in refs if r.info["supported"]]
    tasks = {r.info["task"] for r in supported}
    assert tasks == {"classification", "detection", "segmentation"}
    assert len(supported) > 80
    by_name = {r.name: r for r in refs}
    resnet = by_name["resnet50"].info
    assert resnet["builder"] == "resnet50" and resnet["weights"] == "IMAGENET1K_V2"
    assert resnet["url"] == "https://download.pytorch.org/models/resnet50-11ad3fa6.pth"
    assert resnet["file"] == "resnet50-11ad3fa6.pth" and resnet["num_params"] == 25557032
    assert by_name["fasterrcnn_resnet50_fpn"].info["task"] == "detection"
    assert by_name["fcn_resnet50"].info["task"] == "segmentation"


@pytest.mark.parametrize(
    ("name", "reason"),
    [("r3d_18", "3-D convolution"), ("raft_large", "two images"), ("quantized_resnet18", "int8")],
)
def test_unsupported_models_are_listed_with_a_reason(name, reason):
    (ref,) = _source().list_models([name])
    assert ref.info["supported"] is False and reason in ref.info["reason"]
    with pytest.raises(UnsupportedModel, match=reason):
        _source().load_first_layer(ref)


def test_patterns_and_weights_selection():
    assert {r.name for r in _source().list_models(["resnet1*", "vgg11"])} == {
        "resnet101",
        "resnet152",
        "resnet18",
        "vgg11",
    }
    v1 = {r.name: r for r in _source(weights="IMAGENET1K_V1").list_models(["resnet*", "fcn_*"])}
    assert "resnet18" in v1  # IMAGENET1K_V1 is resnet18's DEFAULT: same tensor, same name
    assert v1["resnet50@IMAGENET1K_V1"].info["weights"] == "IMAGENET1K_V1"
    assert not any(n.startswith("fcn_") for n in v1)  # no such weights: not listed
    random = list(_source(weights="none", seed="3").list_models(["resnet18"]))
    assert [r.name for r in random] == ["resnet18@random-seed3"]
    assert random[0].info["seed"] == 3 and random[0].info["url"] is None


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ({"key": "conv1.weight"}, "unknown option\\(s\\) key .*known: weights"),
        ({"weights": "none", "seed": "x"}, "seed must be an integer"),
        ({"seed": "1"}, "seed applies only with weights=none"),
    ],
)
def test_bad_options_are_user_errors(options, reason):
    with pytest.raises(UserError, match=reason):
        _source(**options)


def test_unknown_model_and_weights():
    with pytest.raises(ModelError, match="no model builder 'resnet9000'"):
        _source().load_first_layer(ModelRef("torchvision", "resnet9000"))
    with pytest.raises(ModelError, match="has no weights 'COCO_V1' \\(has: IMAGENET1K_V1\\)"):
        _source().load_first_layer(ModelRef("torchvision", "resnet18@COCO_V1"))


# ------------------------------------------------------------------ cached weights


def test_cached_real_checkpoint_reads_only_the_first_layer(torch_home):
    from torchvision.models import ResNet18_Weights, resnet18

    torch.manual_seed(0)
    state = resnet18(weights=None).state_dict()
    weights = ResNet18_Weights.IMAGENET1K_V1
    path = torch_home / "hub" / "checkpoints" / Path(weights.url).name
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    (ref,) = _source().list_models(["resnet18"])
    layer = _source().load_first_layer(ref)
    assert np.array_equal(layer.weight, state["conv1.weight"].numpy())
    assert layer.module == "conv1" and layer.kind == "conv"
    assert layer.stride == (2, 2) and layer.padding == (3, 3) and layer.bias is False
    preset = weights.transforms()
    assert layer.mean == tuple(preset.mean) == IMAGENET_MEAN
    assert layer.std == tuple(preset.std) == IMAGENET_STD
    assert layer.input_size == (224, 224) and layer.channel_order == "RGB"
    prov = layer.provenance
    assert (prov.repo, prov.revision, prov.file) == (
        "torchvision",
        torchvision.__version__,
        weights.url,
    )
    assert prov.tensor_key == "conv1.weight" and prov.bytes_fetched == 0
    start, end = prov.byte_range
    raw = path.read_bytes()[start:end]
    assert _sha(raw) == prov.sha256 == _sha(state["conv1.weight"].numpy().tobytes())
    assert layer.metadata["builder"] == "resnet18" and layer.metadata["weights"] == "IMAGENET1K_V1"
    assert layer.metadata["task"] == "classification" and layer.metadata["num_params"] == 11689512


# (builder, weight key, (out, C, kh, kw), mean, std): keys and constants as torchvision has them
ZOO = [
    ("alexnet", "features.0.weight", (64, 3, 11, 11), IMAGENET_MEAN, IMAGENET_STD),
    ("vit_b_16", "conv_proj.weight", (768, 3, 16, 16), IMAGENET_MEAN, IMAGENET_STD),
    ("regnet_x_400mf", "stem.0.weight", (32, 3, 3, 3), IMAGENET_MEAN, IMAGENET_STD),
    ("efficientnet_v2_l", "features.0.0.weight", (32, 3, 3, 3), (0.5,) * 3, (0.5,) * 3),
    (
        "fasterrcnn_resnet50_fpn",
        "backbone.body.conv1.weight",
        (64, 3, 7, 7),
        IMAGENET_MEAN,
        IMAGENET_STD,
    ),
    (
        "ssd300_vgg16",
        "backbone.features.0.weight",
        (64, 3, 3, 3),
        (0.48235, 0.45882, 0.40784),
        (1 / 255,) * 3,
    ),
    ("fcn_resnet50", "backbone.conv1.weight", (64, 3, 7, 7), IMAGENET_MEAN, IMAGENET_STD),
    (
        "lraspp_mobilenet_v3_large",
        "backbone.0.0.weight",
        (16, 3, 3, 3),
        IMAGENET_MEAN,
        IMAGENET_STD,
    ),
]


@pytest.mark.parametrize(("builder", "key", "shape", "mean", "std"), ZOO, ids=[z[0] for z in ZOO])
def test_zoo_across_tasks(builder, key, shape, mean, std):
    """A checkpoint holding only the first-layer tensor suffices: nothing else is read."""
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    _seed_cache(builder, {key: weight})
    layer = _source().load_first_layer(ModelRef("torchvision", builder))
    assert np.array_equal(layer.weight, weight.numpy())
    assert layer.provenance.tensor_key == key
    assert layer.mean == pytest.approx(mean) and layer.std == pytest.approx(std)


def test_googlenet_transform_input_is_folded_into_mean_std():
    weight = torch.randn(64, 3, 7, 7, generator=torch.Generator().manual_seed(2))
    _seed_cache("googlenet", {"conv1.conv.weight": weight})
    layer = _source().load_first_layer(ModelRef("torchvision", "googlenet"))
    assert layer.mean == pytest.approx((0.5,) * 3, abs=1e-9)
    assert layer.std == pytest.approx((0.5,) * 3, abs=1e-9)
    assert layer.metadata["model_mean"] == pytest.approx(IMAGENET_MEAN)
    # What the real model computes: ImageNet-normalise, transform_input, conv1.
    model = torchvision.models.googlenet(
        weights=None, transform_input=True, aux_logits=False, init_weights=False
    )
    pixels = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    x = (pixels - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[
        :, None, None
    ]
    expected = torch.nn.functional.conv2d(model._transform_input(x), weight)
    mean, std = torch.tensor(layer.mean)[:, None, None], torch.tensor(layer.std)[:, None, None]
    got = torch.nn.functional.conv2d((pixels - mean) / std, torch.from_numpy(layer.weight))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_concurrent_loads_match_sequential_ones():
    """The scan engine loads models from a thread pool: builds must not interfere."""
    from concurrent.futures import ThreadPoolExecutor

    for i, (builder, key, shape, _, _) in enumerate(ZOO):
        _seed_cache(builder, {key: torch.randn(*shape, generator=torch.Generator().manual_seed(i))})
    refs = [ModelRef("torchvision", z[0]) for z in ZOO]
    refs += [ModelRef("torchvision", "resnet18@random-seed5")]
    source = _source()
    sequential = [source.load_first_layer(ref).weight for ref in refs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(source.load_first_layer, refs))
    for ref, expected, layer in zip(refs, sequential, concurrent, strict=True):
        assert np.array_equal(layer.weight, expected), ref.name
    for parameter in torch.nn.Conv2d(3, 4, 3).parameters():  # nothing left patched
        assert parameter.device.type == "cpu"


# -------------------------------------------------------------------- downloading


def test_offline_and_not_cached_fails_fast_and_clearly(torch_home):
    started = time.monotonic()
    with pytest.raises(CheckpointError) as err:
        _source().load_first_layer(ModelRef("torchvision", "resnet34"))
    message = str(err.value)
    assert time.monotonic() - started < 10
    assert message.startswith("weights for resnet34 (IMAGENET1K_V1) not in TORCH_HOME cache")
    assert str(torch_home / "hub" / "checkpoints" / "resnet34-b627a593.pth") in message
    assert "download failed" in message and "refused" in message.lower()
    checkpoints_dir = torch_home / "hub" / "checkpoints"
    assert not checkpoints_dir.exists() or not any(checkpoints_dir.iterdir())


@contextlib.contextmanager
def _serve(directory: Path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def test_download_fills_the_cache_and_checks_the_hash(tmp_path, monkeypatch):
    served = tmp_path / "served"
    served.mkdir()
    blob = tmp_path / "blob.pth"
    torch.save({"conv1.weight": torch.ones(2, 3, 3, 3)}, blob)
    good = f"tiny-{_sha(blob.read_bytes())[:8]}.pth"
    (served / good).write_bytes(blob.read_bytes())
    (served / "resnet18-f37072fd.pth").write_bytes(blob.read_bytes())  # hash will not match
    with _serve(served) as base:
        monkeypatch.setenv(tv.URL_BASE_ENV, base)
        url = tv.OFFICIAL_URL_BASE + good
        size = tv.download_to_cache(url, tv.cache_path(url), "tiny")
        assert size == blob.stat().st_size
        assert tv.cache_path(url).read_bytes() == blob.read_bytes()
        with pytest.raises(CheckpointError, match="download failed: invalid hash value"):
            _source(fetch="full").load_first_layer(ModelRef("torchvision", "resnet18"))
    assert not tv.cache_path(get_model_weights("resnet18").DEFAULT.url).exists()


# --------------------------------------------------------------------- random init


def test_random_init_is_the_library_init_and_deterministic():
    from torchvision.models import resnet18

    before = torch.random.get_rng_state()
    source = _source(weights="none")
    (ref,) = source.list_models(["resnet18"])
    first = source.load_first_layer(ref)
    again = source.load_first_layer(ref)
    assert torch.equal(torch.random.get_rng_state(), before)  # global RNG untouched
    assert np.array_equal(first.weight, again.weight)
    torch.manual_seed(0)
    assert np.array_equal(first.weight, resnet18(weights=None).conv1.weight.detach().numpy())
    other = source.load_first_layer(ModelRef("torchvision", "resnet18@random-seed1"))
    assert not np.allclose(first.weight, other.weight)
    # kaiming_normal_(mode="fan_out", nonlinearity="relu"): std = sqrt(2 / (64 * 7 * 7))
    assert first.weight.std() == pytest.approx(math.sqrt(2 / (64 * 49)), rel=0.05)
    assert abs(first.weight.mean()) < 0.002
    assert first.flags["random_init"] is True and first.metadata["seed"] == 0
    assert first.mean == IMAGENET_MEAN and first.provenance.file is None
    assert first.provenance.sha256 == _sha(first.weight.tobytes())


def test_random_vit_uses_its_own_default_geometry():
    layer = _source(weights="none").load_first_layer(
        ModelRef("torchvision", "vit_b_16@random-seed0")
    )
    assert layer.shape_key == (3, 16, 16) and layer.stride == (16, 16)
    # conv_proj init: trunc_normal_(std=sqrt(1 / fan_in)), fan_in = 3 * 16 * 16
    assert layer.weight.std() == pytest.approx(math.sqrt(1 / 768), rel=0.05)


# ----------------------------------------------------------- every listed model


@pytest.mark.slow
def test_every_supported_builder_builds_on_meta_and_has_a_first_layer():
    failures = []
    for ref in _source().list_models([]):
        if not ref.info["supported"]:
            continue
        builder, task = ref.info["builder"], ref.info["task"]
        weights = get_model_weights(builder).DEFAULT
        try:
            model = tv.build_meta_model(builder, weights)
            spec = tv.probe_first_layer(model, builder, task, weights)
            mean, std = tv.normalisation(model, builder, task, weights)
            assert spec.in_channels == 3 and len(spec.weight_keys) == 1
            assert mean is not None and std is not None and min(std) > 0
        except Exception as exc:  # collect them all, report at once
            failures.append(f"{builder}: {type(exc).__name__}: {exc}")
    assert not failures, "\n".join(failures)


@pytest.fixture(scope="module")
def resnet50_blob(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A real ``torch.save`` of a (seeded, random) resnet50 state dict."""
    torch.manual_seed(3)
    state = torchvision.models.resnet50().state_dict()
    blob = tmp_path_factory.mktemp("served") / "served.pth"
    torch.save(state, blob)
    return blob, state


def test_uncached_weights_are_fetched_by_ranged_requests(torch_home, resnet50_blob, monkeypatch):
    """Not in TORCH_HOME: only the first layer's bytes travel (loopback server's counter),
    nothing is written to the cache, and the tensor is bit-identical; the dry-run
    estimate matches what the fetch really cost."""
    from hub_server import HubServer

    blob, state = resnet50_blob
    weights = get_model_weights("resnet50").DEFAULT
    ref = ModelRef("torchvision", "resnet50")
    with HubServer() as hub:
        hub.add_url("/models/" + Path(weights.url).name, blob)
        monkeypatch.setenv(tv.URL_BASE_ENV, hub.endpoint + "/models/")
        planned = _source().plan(ref)
        assert hub.requests() == []  # planning makes no request
        layer = _source().load_first_layer(ref)
        hub.settle()
        sent = hub.bytes_sent()
        body = hub.body_bytes_sent()
        requests = hub.requests()
    np.testing.assert_array_equal(layer.weight, state["conv1.weight"].numpy())
    tensor_bytes = state["conv1.weight"].numel() * 4
    assert layer.provenance.bytes_fetched <= tensor_bytes + 150_000
    assert sent <= tensor_bytes + 150_000 < blob.stat().st_size / 100
    assert layer.provenance.sha256 == _sha(state["conv1.weight"].numpy().tobytes())
    assert not tv.cache_path(weights.url).exists()
    # HEAD, head block, tail block (central directory), conv1's storage past the head;
    # the server logs a request when it completes, so the order may interleave
    assert sorted(r.method for r in requests) == ["GET", "GET", "GET", "HEAD"]
    assert planned["cached"] is False and planned["requests"] == len(requests)
    assert planned["bytes"] == pytest.approx(body, rel=0.10)


# ------------------------------------------------------------------------ dry run


def _dry_run(store: Path, *args: str) -> dict:
    from click.testing import CliRunner

    from zooscan.cli import build_cli

    argv = ["scan", "--source", "torchvision", *args, "--store", str(store)]
    result = CliRunner().invoke(build_cli(), [*argv, "--dry-run", "--format", "json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_dry_run_reports_cache_requests_and_bytes_without_network(torch_home, tmp_path):
    """resnet18 seeded in TORCH_HOME is cached; resnet50 would take the ranged fetch
    (HEAD + head block + tail block + the rest of conv1); nothing is contacted (the URL
    base is a closed port) and nothing is written."""
    _seed_cache("resnet18", {"conv1.weight": torch.zeros(64, 3, 7, 7)})
    store = tmp_path / "zoo.h5"
    started = time.monotonic()
    report = _dry_run(store, "resnet18", "resnet50")
    assert time.monotonic() - started < 20
    fetch = report["fetch"]
    assert report["to_scan"] == ["resnet18", "resnet50"] and not store.exists()
    assert fetch["models"] == 2 and fetch["estimated"] == 2 and fetch["errors"] == []
    assert fetch["cached"] == 1 and fetch["requests"] == 4
    conv1 = 64 * 3 * 7 * 7 * 4
    blocks = HEAD_BLOCK + TAIL_BLOCK
    assert blocks < fetch["bytes"] < blocks + conv1
    assert fetch == _dry_run(store, "resnet50")["fetch"] | {
        "models": 2,
        "estimated": 2,
        "cached": 1,
    }
    assert not tv.cache_path(get_model_weights("resnet50").DEFAULT.url).exists()


def test_dry_run_full_fetch_and_random_init(tmp_path):
    store = tmp_path / "zoo.h5"
    full = _dry_run(store, "resnet50", "-o", "fetch=full")["fetch"]
    mib = get_model_weights("resnet50").DEFAULT.meta["_file_size"]
    assert full["requests"] == 1 and full["cached"] == 0
    assert full["bytes"] == round(mib * 2**20)
    random = _dry_run(store, "resnet*", "--weights", "none")["fetch"]
    assert random["models"] > 3 and random["cached"] == random["models"]
    assert random["requests"] == 0 and random["bytes"] == 0
