"""zooscan.remote against the loopback hub: ranged reads are bit-identical to local
reads for every format, transfer only the tensor plus headers, and the loopback hub
speaks the API the real ``huggingface_hub`` client expects."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from hub_server import HubServer, free_env, random_state_dict, write_checkpoint

from zooscan import checkpoints
from zooscan.errors import CheckpointError
from zooscan.remote import (
    HubAccessDenied,
    HubClient,
    HubNotFound,
    HubOffline,
    fetch_tensors,
    list_remote_keys,
    remote_index,
    sharded_safetensors,
)

KEYS = ["conv1.weight", "bn1.weight", "layer1.0.conv1.weight"]
FILES = {
    "model.safetensors": "safetensors",
    "pytorch_model.bin": "torch-zip",
    "legacy.pth": "torch-legacy",
    "weights.npz": "npz",
}
BUDGET = 150 * 1024


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    free_env(monkeypatch, tmp_path)


@pytest.fixture
def hub():
    with HubServer() as server:
        yield server


@pytest.fixture(scope="module")
def resnet18_sd() -> dict[str, torch.Tensor]:
    """torchvision ResNet-18's real state dict (its own random init)."""
    torch.manual_seed(0)
    return {k: v.detach().clone() for k, v in torchvision.models.resnet18().state_dict().items()}


@pytest.fixture(scope="module")
def r18_files(tmp_path_factory, resnet18_sd) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("r18")
    files = {name: write_checkpoint(root / name, resnet18_sd, fmt) for name, fmt in FILES.items()}
    files["nested_state_dict.pth"] = write_checkpoint(
        root / "nested_state_dict.pth", {"state_dict": resnet18_sd, "epoch": 3}, "torch-zip"
    )
    files["nested_model.pth"] = write_checkpoint(
        root / "nested_model.pth",
        {"model": {f"module.{k}": v for k, v in resnet18_sd.items()}, "ema": resnet18_sd},
        "torch-zip",
    )
    return files


@pytest.fixture
def client(hub) -> HubClient:
    return HubClient(endpoint=hub.endpoint, token=False, backoff_base=0.01, backoff_max=0.05)


def _assert_same(remote, local) -> None:
    assert remote.key == local.key
    assert remote.dtype == local.dtype and remote.shape == local.shape
    assert remote.sha256 == local.sha256
    assert remote.byte_range == local.byte_range
    assert remote.array.dtype == np.float32
    assert np.array_equal(remote.array, local.array)


# ------------------------------------------------------------------ bit-identical reads


@pytest.mark.parametrize(
    "filename",
    [*FILES, "nested_state_dict.pth", "nested_model.pth"],
)
def test_fetch_is_bit_identical_to_local_read(hub, client, r18_files, filename):
    hub.add_repo("org/resnet18", r18_files)
    f = client.resolve("org/resnet18", filename)
    assert f.revision == hub.repos["org/resnet18"].sha
    assert f.size == r18_files[filename].stat().st_size

    result = fetch_tensors(client, f, KEYS)

    local = checkpoints.read_tensors(r18_files[filename], KEYS)
    for key in KEYS:
        _assert_same(result.tensors[key], local[key])
    assert result.keys == [i.key for i in checkpoints.list_tensors(r18_files[filename])]
    assert result.format == checkpoints.checkpoint_format(r18_files[filename])
    assert result.bytes_fetched == client.bytes_fetched  # one fetch on a fresh client
    if result.format != "torch-legacy":
        assert result.bytes_fetched < 300 * 1024  # not the 46 MB file


def test_nested_checkpoints_resolve_wrapped_keys(hub, client, r18_files):
    hub.add_repo("org/nested", r18_files)
    f = client.resolve("org/nested", "nested_model.pth")
    result = fetch_tensors(client, f, ["conv1.weight"])
    # {"model": {"module.conv1.weight"}, "ema": {...}}: the plain model wins over EMA.
    assert result.tensors["conv1.weight"].key == "model.module.conv1.weight"


def test_missing_key_names_close_matches(hub, client, r18_files):
    hub.add_repo("org/r18", r18_files)
    f = client.resolve("org/r18", "model.safetensors")
    with pytest.raises(CheckpointError, match="no tensor 'conv1.wieght'.*conv1.weight"):
        fetch_tensors(client, f, ["conv1.wieght"])


def test_strided_shared_and_half_precision_tensors(hub, client, tmp_path):
    base = torch.randn(4000)
    state = {
        "transposed": torch.randn(16, 3 * 7 * 7).t(),  # non-contiguous view
        "slice_a": base[100:1000].view(100, 9),  # offset into a shared storage
        "slice_b": base[2000:2600].view(6, 100),
        "bf16": torch.randn(8, 3, 3, 3).to(torch.bfloat16),
        "fp16": torch.randn(8, 3, 3, 3).to(torch.float16),
        "scalar": torch.tensor(1.5),
    }
    zipped = write_checkpoint(tmp_path / "odd.pth", state, "torch-zip")
    st = write_checkpoint(
        tmp_path / "odd.safetensors",
        {k: v for k, v in state.items() if k != "transposed"},
        "safetensors",
    )
    hub.add_repo("org/odd", {"odd.pth": zipped, "odd.safetensors": st})
    for name, path in (("odd.pth", zipped), ("odd.safetensors", st)):
        f = client.resolve("org/odd", name)
        keys = [k for k in state if name.endswith("pth") or k != "transposed"]
        result = fetch_tensors(client, f, keys)
        local = checkpoints.read_tensors(path, keys)
        for key in keys:
            _assert_same(result.tensors[key], local[key])
    # The shared storage is not downloaded whole: only each slice's bytes.
    f = client.resolve("org/odd", "odd.pth")
    result = fetch_tensors(client, f, ["slice_b"])
    assert result.tensors["slice_b"].byte_range[1] - result.tensors["slice_b"].byte_range[0] == 2400


def test_sharded_safetensors_via_index(hub, client, tmp_path, resnet18_sd):
    keys = list(resnet18_sd)
    shards = {
        "model-00001-of-00002.safetensors": keys[:40],
        "model-00002-of-00002.safetensors": keys[40:],
    }
    files, weight_map = {}, {}
    for shard, shard_keys in shards.items():
        files[shard] = write_checkpoint(
            tmp_path / shard, {k: resnet18_sd[k] for k in shard_keys}, "safetensors"
        )
        weight_map.update(dict.fromkeys(shard_keys, shard))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    files["model.safetensors.index.json"] = json.dumps(index).encode()
    hub.add_repo("org/sharded", files)

    mapping = sharded_safetensors(client, "org/sharded", None)

    assert mapping == weight_map
    wanted = "layer4.1.conv2.weight"
    f = client.resolve("org/sharded", mapping[wanted])
    assert f.filename == "model-00002-of-00002.safetensors"
    result = fetch_tensors(client, f, [wanted])
    _assert_same(
        result.tensors[wanted], checkpoints.read_tensors(files[f.filename], [wanted])[wanted]
    )
    with pytest.raises(HubNotFound, match="no such file"):
        sharded_safetensors(client, "org/sharded", None, "pytorch_model.bin.index.json")


def test_list_remote_keys_and_index_read_headers_only(hub, client, r18_files):
    hub.add_repo("org/r18", r18_files)
    for name in ("model.safetensors", "pytorch_model.bin", "weights.npz"):
        f = client.resolve("org/r18", name)
        before = client.bytes_fetched
        infos = remote_index(client, f)
        local = checkpoints.list_tensors(r18_files[name])
        assert [(i.key, i.shape, i.dtype) for i in infos] == [
            (i.key, i.shape, i.dtype) for i in local
        ]
        assert list_remote_keys(client, f) == [i.key for i in local]
        assert client.bytes_fetched - before < 2 * 300 * 1024


def test_plain_url_file(hub, client, r18_files):
    url = hub.add_url("/models/resnet18-f37072fd.pth", r18_files["pytorch_model.bin"])
    f = client.url_file(url)
    assert f.repo is None and f.filename == "resnet18-f37072fd.pth"
    assert f.size == r18_files["pytorch_model.bin"].stat().st_size
    result = fetch_tensors(client, f, ["conv1.weight"])
    local = checkpoints.read_tensors(r18_files["pytorch_model.bin"], ["conv1.weight"])
    _assert_same(result.tensors["conv1.weight"], local["conv1.weight"])


# ------------------------------------------------------------------ bytes transferred


@pytest.fixture(scope="module")
def big_models(tmp_path_factory) -> dict[str, tuple[str, dict[str, Path]]]:
    """ResNet-50 and ViT-B/16 checkpoints (real keys and shapes, random values) in
    safetensors and torch-zip form."""
    import timm

    root = tmp_path_factory.mktemp("big")
    with torch.device("meta"):
        models = {
            "resnet50": (torchvision.models.resnet50(), "conv1.weight"),
            "vit_base_patch16_224": (
                timm.create_model("vit_base_patch16_224"),
                "patch_embed.proj.weight",
            ),
        }
    out = {}
    for name, (model, key) in models.items():
        sd = random_state_dict(model)
        out[name] = (
            key,
            {
                "model.safetensors": write_checkpoint(
                    root / name / "model.safetensors", sd, "safetensors"
                ),
                "pytorch_model.bin": write_checkpoint(
                    root / name / "pytorch_model.bin", sd, "torch-zip"
                ),
            },
        )
    return out


@pytest.mark.parametrize("model", ["resnet50", "vit_base_patch16_224"])
@pytest.mark.parametrize("filename", ["model.safetensors", "pytorch_model.bin"])
def test_bytes_transferred_within_budget(hub, client, big_models, model, filename):
    key, files = big_models[model]
    hub.add_repo(f"timm/{model}", files)
    f = client.resolve(f"timm/{model}", filename)
    hub.reset_log()

    result = fetch_tensors(client, f, [key])

    tensor = result.tensors[key]
    tensor_bytes = tensor.array.size * 4
    sent = hub.bytes_sent()  # status lines, headers and bodies, as the server wrote them
    assert sent <= tensor_bytes + BUDGET, (sent, tensor_bytes)
    assert result.bytes_fetched == hub.body_bytes_sent()
    assert sent < files[filename].stat().st_size / 40
    local = checkpoints.read_tensors(files[filename], [key])[key]
    _assert_same(tensor, local)


# ------------------------------------------------------------------ hub conventions


def test_resolve_errors_are_clear(hub, client, r18_files):
    hub.add_repo("org/r18", {"model.safetensors": r18_files["model.safetensors"]})
    hub.add_repo("org/gated", {"model.safetensors": r18_files["model.safetensors"]}, gated=True)
    hub.add_repo("org/private", {"model.safetensors": r18_files["model.safetensors"]}, private=True)

    with pytest.raises(HubNotFound, match=r"repository org/nope not found on http://127\.0\.0\.1"):
        client.resolve("org/nope", "model.safetensors")
    with pytest.raises(
        HubNotFound, match=r"org/r18/pytorch_model\.bin@main: no such file in org/r18"
    ):
        client.resolve("org/r18", "pytorch_model.bin")
    with pytest.raises(HubNotFound, match="revision 'v9' not found"):
        client.resolve("org/r18", "model.safetensors", revision="v9")
    with pytest.raises(HubAccessDenied, match="org/gated is gated: accept its conditions"):
        client.resolve("org/gated", "model.safetensors")
    with pytest.raises(HubNotFound, match="not found.*set HF_TOKEN"):
        client.resolve("org/private", "model.safetensors")

    with_token = HubClient(endpoint=hub.endpoint, token=hub.token)
    assert with_token.resolve("org/gated", "model.safetensors").size > 0
    assert with_token.resolve("org/private", "model.safetensors").size > 0
    stranger = HubClient(endpoint=hub.endpoint, token="hf_someone_else")
    with pytest.raises(HubAccessDenied, match="gated"):
        stranger.resolve("org/gated", "model.safetensors")


def test_not_found_carries_the_hubs_error_code(hub, client, r18_files):
    import pickle

    hub.add_repo("org/r18", {"model.safetensors": r18_files["model.safetensors"]})
    hub.add_repo("org/gated", {"model.safetensors": r18_files["model.safetensors"]}, gated=True)
    cases = [
        (("org/nope", "model.safetensors", None), HubNotFound, "RepoNotFound"),
        (("org/r18", "pytorch_model.bin", None), HubNotFound, "EntryNotFound"),
        (("org/r18", "model.safetensors", "v9"), HubNotFound, "RevisionNotFound"),
        (("org/gated", "model.safetensors", None), HubAccessDenied, "GatedRepo"),
    ]
    for (repo, filename, revision), error, code in cases:
        hub.reset_log()
        with pytest.raises(error) as info:
            client.resolve(repo, filename, revision=revision)
        assert info.value.code == code
        assert len(hub.requests()) == 1  # a refusal is final: no retry
        again = pickle.loads(pickle.dumps(info.value))  # scan workers may be processes
        assert (type(again), str(again), again.code) == (error, str(info.value), code)
    with pytest.raises(HubNotFound) as info:  # a plain 404 (no X-Error-Code)
        client.url_file(f"{hub.endpoint}/no/such/url.pth")
    assert info.value.code is None


def test_token_goes_to_the_hub_only_never_to_the_cdn(hub, r18_files, monkeypatch):
    hub.add_repo("org/private", r18_files, private=True)
    monkeypatch.setenv("HF_TOKEN", hub.token)
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    client = HubClient()  # endpoint and token from the environment
    assert client.endpoint == hub.endpoint
    f = client.resolve("org/private", "model.safetensors")
    fetch_tensors(client, f, ["conv1.weight"])
    hub.settle()
    hub_requests = [r for r in hub.log if r.port == hub.port]
    cdn_requests = [r for r in hub.log if r.port == hub.cdn_port]
    assert hub_requests and cdn_requests
    assert all(r.headers.get("Authorization") == f"Bearer {hub.token}" for r in hub_requests)
    assert not any("Authorization" in r.headers for r in cdn_requests)


def test_json_api_and_pagination(hub, client, r18_files):
    hub.page_size = 3
    for i in range(7):
        hub.add_repo(
            f"org/m{i}",
            {"config.json": b'{"model_type": "resnet"}'},
            pipeline_tag="image-classification" if i % 2 == 0 else "object-detection",
            library_name="timm",
            downloads=100 - i,
        )
    info = client.json("/api/models/org/m0")
    assert info["id"] == "org/m0" and info["sha"] == hub.repos["org/m0"].sha
    assert info["config"] == {"model_type": "resnet"}
    pages = list(
        client.iter_json_pages(
            "/api/models", {"pipeline_tag": "image-classification", "sort": "downloads"}
        )
    )
    assert [len(p) for p in pages] == [3, 1]
    assert [m["id"] for page in pages for m in page] == ["org/m0", "org/m2", "org/m4", "org/m6"]
    with pytest.raises(HubNotFound, match="not found"):
        client.json("/api/models/org/missing")


# ------------------------------------------------------- the real huggingface_hub client


def test_real_huggingface_hub_client_works_against_the_loopback_hub(
    hub,
    r18_files,
    tmp_path,
    monkeypatch,
):
    import huggingface_hub as hf
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        RepositoryNotFoundError,
    )

    hub.use_as_hf_endpoint(monkeypatch)
    hub.page_size = 2
    config = {"model_type": "resnet", "architectures": ["ResNetForImageClassification"]}
    for i in range(5):
        hub.add_repo(
            f"org/vision{i}",
            {
                "config.json": json.dumps(config).encode(),
                "model.safetensors": r18_files["model.safetensors"],
            },
            pipeline_tag="image-classification",
            library_name="transformers",
            downloads=10 * i,
        )
    hub.add_repo("org/gated", {"model.safetensors": r18_files["model.safetensors"]}, gated=True)
    api = hf.HfApi(endpoint=hub.endpoint, token=False)

    listed = list(
        api.list_models(
            pipeline_tag="image-classification", filter="transformers", sort="downloads"
        )
    )
    assert [m.id for m in listed] == [f"org/vision{i}" for i in (4, 3, 2, 1, 0)]
    assert len(list(api.list_models(search="vision", limit=3))) == 3

    info = api.model_info("org/vision1", files_metadata=True)
    assert info.sha == hub.repos["org/vision1"].sha
    assert info.pipeline_tag == "image-classification"
    sizes = {s.rfilename: s.size for s in info.siblings}
    assert sizes["model.safetensors"] == r18_files["model.safetensors"].stat().st_size

    meta = api.get_safetensors_metadata("org/vision1")
    assert meta.files_metadata["model.safetensors"].tensors["conv1.weight"].shape == [64, 3, 7, 7]

    path = hf.hf_hub_download(
        "org/vision1", "model.safetensors", cache_dir=tmp_path / "cache", token=False
    )
    assert Path(path).read_bytes() == r18_files["model.safetensors"].read_bytes()

    with pytest.raises(RepositoryNotFoundError):
        api.model_info("org/absent")
    with pytest.raises(EntryNotFoundError):
        hf.hf_hub_download("org/vision1", "absent.bin", cache_dir=tmp_path / "cache", token=False)
    with pytest.raises(GatedRepoError):
        hf.hf_hub_download(
            "org/gated", "model.safetensors", cache_dir=tmp_path / "cache", token=False
        )


# ------------------------------------------------------------------ cache and offline


def _download_to_cache(hub: HubServer, repo: str, filename: str, cache: Path) -> str:
    import huggingface_hub as hf

    return hf.hf_hub_download(repo, filename, cache_dir=cache, endpoint=hub.endpoint, token=False)


def test_offline_reads_the_hf_cache_without_any_request(hub, r18_files, tmp_path, monkeypatch):
    hub.add_repo("org/r18", r18_files)
    cache = tmp_path / "hf_home" / "hub"
    _download_to_cache(hub, "org/r18", "model.safetensors", cache)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.reset_log()

    client = HubClient(endpoint=hub.endpoint)
    assert client.offline and client.cache_dir == str(cache)
    f = client.resolve("org/r18", "model.safetensors")
    result = fetch_tensors(client, f, KEYS)

    assert f.local_path and f.revision == hub.repos["org/r18"].sha
    assert result.bytes_fetched == 0 and result.requests == 0
    local = checkpoints.read_tensors(r18_files["model.safetensors"], KEYS)
    for key in KEYS:
        _assert_same(result.tensors[key], local[key])
    with pytest.raises(
        HubOffline, match=r"HF_HUB_OFFLINE.*org/r18/pytorch_model\.bin@main is not in"
    ):
        client.resolve("org/r18", "pytorch_model.bin")
    with pytest.raises(HubOffline):
        client.json("/api/models")
    with pytest.raises(HubOffline):
        client.url_file(f"{hub.endpoint}/models/x.pth")
    hub.settle()
    assert hub.log == []  # not one request


def test_online_uses_the_cache_for_the_current_commit(hub, client, r18_files, tmp_path):
    hub.add_repo("org/r18", r18_files)
    _download_to_cache(hub, "org/r18", "pytorch_model.bin", tmp_path / "hf_home" / "hub")
    hub.reset_log()

    f = client.resolve("org/r18", "pytorch_model.bin")  # one HEAD: which commit is main?
    result = fetch_tensors(client, f, KEYS)

    assert f.local_path is not None and result.bytes_fetched == 0
    hub.settle()
    assert [r.method for r in hub.log] == ["HEAD"]
    sha = hub.repos["org/r18"].sha
    by_sha = client.resolve(
        "org/r18", "pytorch_model.bin", revision=sha
    )  # exact commit: no request
    assert by_sha.local_path == f.local_path
    hub.settle()
    assert len(hub.log) == 1


def test_client_counts_are_per_thread_in_meters(hub, client, r18_files):
    import threading

    hub.add_repo("org/r18", r18_files)
    results = {}

    def work(name):
        f = client.resolve("org/r18", name)
        results[name] = fetch_tensors(client, f, ["conv1.weight"])

    threads = [
        threading.Thread(target=work, args=(n,)) for n in ("model.safetensors", "weights.npz")
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total = sum(r.bytes_fetched for r in results.values())
    assert 0 < total <= client.bytes_fetched
    assert client.requests >= sum(r.requests for r in results.values())
