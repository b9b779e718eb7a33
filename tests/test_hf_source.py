"""The ``hf`` source through the loopback hub: real transformers checkpoints, the real
HTTP client, the real CLI and store. Nothing leaves 127.0.0.1."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import warnings
from pathlib import Path
from urllib.parse import parse_qs

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hub_server import HubServer, free_env
from safetensors import safe_open

from zooscan.cli import build_cli
from zooscan.errors import CheckpointError, ModelError, UnsupportedModel, UserError
from zooscan.plugins import get_source
from zooscan.store import Store
from zooscan_builtins import hf_source as hf

transformers = pytest.importorskip("transformers")

VIT_MEAN, VIT_STD = (0.1, 0.2, 0.3), (0.5, 0.6, 0.7)
CLIP_MEAN, CLIP_STD = (0.3, 0.4, 0.5), (0.2, 0.25, 0.3)
TINY_VIT = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37
) | dict(image_size=32, patch_size=4)
MARKER_ENV = "ZOOSCAN_TEST_REMOTE_CODE_MARKER"


# ----------------------------------------------------------------- real checkpoints


def _quiet():
    warnings.simplefilter("ignore")
    transformers.logging.set_verbosity_error()


def _save_vit(root: Path) -> Path:
    out = root / "vit"
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(transformers.ViTConfig(**TINY_VIT, num_labels=3))
    model.save_pretrained(out)
    transformers.ViTImageProcessor(
        image_mean=list(VIT_MEAN), image_std=list(VIT_STD), size={"height": 32, "width": 32}
    ).save_pretrained(out)
    return out


def _save_convnext(root: Path) -> Path:
    """ConvNeXt whose processor maps pixels to [-1, 1] by its rescale factor alone."""
    out = root / "convnext"
    torch.manual_seed(1)
    config = transformers.ConvNextConfig(
        num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3, image_size=32
    )
    transformers.ConvNextForImageClassification(config).save_pretrained(out)
    transformers.ConvNextImageProcessor(
        rescale_factor=1 / 127.5, image_mean=[1.0, 1.0, 1.0], image_std=[1.0, 1.0, 1.0]
    ).save_pretrained(out)
    return out


def _save_resnet(root: Path) -> Path:
    """ResNet as transformers 4 wrote it: ``pytorch_model.bin`` (a torch zip), and a
    preprocessor config without mean/std (the class defaults apply)."""
    out = root / "resnet"
    torch.manual_seed(2)
    config = transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3
    )
    model = transformers.ResNetForImageClassification(config)
    config.save_pretrained(out)
    torch.save(model.state_dict(), out / "pytorch_model.bin")
    processor = {"image_processor_type": "ConvNextImageProcessor", "do_normalize": True}
    (out / "preprocessor_config.json").write_text(json.dumps(processor))
    return out


def _save_clip(root: Path) -> Path:
    """CLIP (scanned through its vision tower) with a real ``CLIPProcessor``, which
    transformers 5 saves as ``processor_config.json`` (image settings nested)."""
    out = root / "clip"
    torch.manual_seed(3)
    text = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2) | dict(
        intermediate_size=37, vocab_size=99
    )
    config = transformers.CLIPConfig(vision_config=TINY_VIT, text_config=text, projection_dim=16)
    transformers.CLIPModel(config).save_pretrained(out)
    vocab_dir = root / "clip_vocab"
    vocab_dir.mkdir()
    (vocab_dir / "vocab.json").write_text(json.dumps({"<|startoftext|>": 0, "<|endoftext|>": 1}))
    (vocab_dir / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer(
        vocab_file=str(vocab_dir / "vocab.json"), merges_file=str(vocab_dir / "merges.txt")
    )
    image_processor = transformers.CLIPImageProcessor(
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
    )
    transformers.CLIPProcessor(
        image_processor=image_processor, tokenizer=tokenizer
    ).save_pretrained(out)
    return out


def _save_sharded(root: Path) -> Path:
    """A ViT saved in shards: ``model.safetensors.index.json`` + several files."""
    out = root / "sharded"
    torch.manual_seed(4)
    model = transformers.ViTModel(transformers.ViTConfig(**TINY_VIT), add_pooling_layer=False)
    model.save_pretrained(out, max_shard_size="20KB")
    return out


def _save_custom_code(root: Path, vit: Path) -> Path:
    """A repo that needs trust_remote_code: ``auto_map`` in its config and a Python
    file that would leave a marker file behind if anything imported it."""
    out = root / "custom"
    out.mkdir()
    config = json.loads((vit / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    (out / "config.json").write_text(json.dumps(config))
    shutil.copy(vit / "model.safetensors", out / "model.safetensors")
    (out / "modeling_evil.py").write_text(
        "import os, pathlib\n"
        f"pathlib.Path(os.environ['{MARKER_ENV}']).write_text('remote code ran')\n"
        "class EvilModel:\n    pass\n"
    )
    return out


def _save_timm(root: Path) -> Path:
    """A timm repository as timm pushes it: ``config.json`` with ``pretrained_cfg``."""
    import timm
    from timm.models import save_for_hf

    out = root / "timm"
    torch.manual_seed(5)
    save_for_hf(timm.create_model("test_resnet.r160_in1k"), str(out), safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Tiny models with random weights, each saved by transformers itself."""
    root = tmp_path_factory.mktemp("hf_checkpoints")
    with warnings.catch_warnings():
        _quiet()
        vit = _save_vit(root)
        return {
            "vit": vit,
            "convnext": _save_convnext(root),
            "resnet": _save_resnet(root),
            "clip": _save_clip(root),
            "sharded": _save_sharded(root),
            "custom": _save_custom_code(root, vit),
            "timm": _save_timm(root),
        }


def _files(folder: Path) -> dict[str, Path]:
    return {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file()}


REPOS = {
    "acme/vit-tiny": "vit",
    "acme/convnext-tiny": "convnext",
    "acme/resnet-tiny": "resnet",
    "openish/clip-tiny": "clip",
    "acme/vit-sharded": "sharded",
    "shady/custom-code": "custom",
}


@pytest.fixture(scope="module")
def model_hub(checkpoints):
    """The loopback hub serving every checkpoint above (plus a gated copy of the ViT)."""
    with HubServer() as server:
        for i, (repo_id, key) in enumerate(REPOS.items()):
            server.add_repo(
                repo_id,
                _files(checkpoints[key]),
                pipeline_tag="image-classification",
                library_name="transformers",
                downloads=100 - i,
            )
        server.add_repo("acme/vit-gated", _files(checkpoints["vit"]), gated=True)
        server.add_repo("timm/test_resnet.r160_in1k", _files(checkpoints["timm"]))
        yield server


@pytest.fixture
def env(model_hub, monkeypatch, tmp_path):
    """Online, empty HF cache, HF_ENDPOINT on the loopback hub, fresh request log."""
    free_env(monkeypatch, tmp_path)
    model_hub.use_as_hf_endpoint(monkeypatch)
    monkeypatch.setenv(MARKER_ENV, str(tmp_path / "remote_code_ran"))
    model_hub.clear_faults()
    model_hub.reset_log()
    return model_hub


def _load(name: str, **options):
    source = get_source("hf", options)
    (ref,) = list(source.list_models([name]))
    return source.load_first_layer(ref)


def _tensor(folder: Path, key: str, filename: str = "model.safetensors") -> np.ndarray:
    with safe_open(str(folder / filename), "pt") as fh:
        return fh.get_tensor(key).numpy()


def _summary(output: str) -> dict:
    """The JSON summary ``scan --format json`` prints (an error line may follow it)."""
    return json.JSONDecoder().raw_decode(output[output.index("{") :])[0]


def _safetensors_range(path: Path, key: str) -> tuple[int, int]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    start, end = json.loads(raw[8 : 8 + n])[key]["data_offsets"]
    return 8 + n + start, 8 + n + end


# ----------------------------------------------------------------------- listing


LISTED = {
    # repo id: (pipeline tag, library, downloads, likes)
    "a/vit-cls": ("image-classification", "transformers", 500, 5),
    "a/vit-feat": ("image-feature-extraction", "transformers", 900, 1),
    "b/clip-zs": ("zero-shot-image-classification", "transformers", 700, 9),
    "b/resnet-timm": ("image-classification", "timm", 1000, 3),
    "c/bert": ("fill-mask", "transformers", 2000, 50),
    "c/detr": ("object-detection", "transformers", 800, 2),
    "c/vit-small": ("image-classification", "transformers", 100, 20),
    "d/sam": ("mask-generation", "transformers", 50, 0),
}


@pytest.fixture
def listing_hub(monkeypatch, tmp_path):
    free_env(monkeypatch, tmp_path)
    with HubServer(page_size=50) as server:
        for repo_id, (tag, library, downloads, likes) in LISTED.items():
            server.add_repo(
                repo_id,
                {"config.json": b"{}"},
                pipeline_tag=tag,
                library_name=library,
                downloads=downloads,
                likes=likes,
            )
        server.use_as_hf_endpoint(monkeypatch)
        yield server


def _names(options: dict[str, str] | None = None, patterns: tuple[str, ...] = ()) -> list[str]:
    return [r.name for r in get_source("hf", options or {}).list_models(list(patterns))]


def test_default_listing_is_vision_transformers_by_downloads(listing_hub):
    refs = list(get_source("hf", {}).list_models([]))
    assert [r.name for r in refs] == ["a/vit-feat", "b/clip-zs", "a/vit-cls", "c/vit-small"]
    assert refs[0].info["pipeline_tag"] == "image-feature-extraction"
    assert refs[0].info["downloads"] == 900 and refs[0].info["library"] == "transformers"
    queries = [parse_qs(r.query) for r in listing_hub.requests(path="/api/models")]
    assert sorted(q["pipeline_tag"][0] for q in queries) == sorted(hf.DEFAULT_PIPELINE_TAGS)
    assert all(q["filter"] == ["transformers"] and q["sort"] == ["downloads"] for q in queries)


def test_listing_options_filter_and_sort(listing_hub):
    assert _names({"pipeline_tag": "object-detection"}) == ["c/detr"]
    assert _names({"pipeline_tag": "image-classification", "library": "any"}) == [
        "b/resnet-timm",
        "a/vit-cls",
        "c/vit-small",
    ]
    assert _names({"sort": "likes"}) == ["c/vit-small", "b/clip-zs", "a/vit-cls", "a/vit-feat"]
    assert _names({"search": "vit"}) == ["a/vit-feat", "a/vit-cls", "c/vit-small"]
    assert _names({"pipeline_tag": "any"}) == [
        "c/bert",
        "a/vit-feat",
        "c/detr",
        "b/clip-zs",
        "a/vit-cls",
        "c/vit-small",
        "d/sam",
    ]


def test_wildcards_filter_the_listing_and_narrow_the_query(listing_hub):
    assert _names(patterns=("a/*",)) == ["a/vit-feat", "a/vit-cls"]
    query = parse_qs(listing_hub.requests(path="/api/models")[-1].query)
    assert query["author"] == ["a"]
    assert _names(patterns=("*small*",)) == ["c/vit-small"]
    assert _names(patterns=("vit-c?s",)) == ["a/vit-cls"]


def test_explicit_repo_ids_need_no_request(listing_hub):
    listing_hub.reset_log()
    refs = list(get_source("hf", {}).list_models(["x/not-listed", "c/bert", "c/bert"]))
    assert [r.name for r in refs] == ["x/not-listed", "c/bert"]
    assert refs[0].info == {"explicit": True}
    assert listing_hub.requests() == []
    assert _names(patterns=("c/bert", "a/*")) == ["c/bert", "a/vit-feat", "a/vit-cls"]


def test_listing_is_lazy_and_paged(listing_hub, monkeypatch):
    monkeypatch.setattr(hf, "PAGE_SIZE", 1)
    source = get_source("hf", {"library": "any", "pipeline_tag": "image-classification"})
    listing_hub.reset_log()
    first = [r.name for r in itertools.islice(source.list_models([]), 1)]
    assert first == ["b/resnet-timm"]
    calls = listing_hub.requests(path="/api/models")
    assert len(calls) == 1 and parse_qs(calls[0].query)["limit"] == ["1"]
    assert _names({"library": "any", "pipeline_tag": "image-classification"}) == [
        "b/resnet-timm",
        "a/vit-cls",
        "c/vit-small",
    ]


def test_cli_models_applies_limit(listing_hub):
    args = ["models", "--source", "hf", "--limit", "2", "--format", "json"]
    result = CliRunner().invoke(build_cli(), args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [r["name"] for r in rows] == ["a/vit-feat", "b/clip-zs"]


def test_options_are_checked():
    with pytest.raises(UserError, match="unknown option.*weights"):
        get_source("hf", {"weights": "x"})
    with pytest.raises(UserError, match="sort must be one of"):
        get_source("hf", {"sort": "size"})
    assert get_source("hf", {"sort": "createdAt"}).options.sort == "created_at"


def test_pattern_helpers():
    assert hf.is_explicit_repo_id("google/vit-base-patch16-224")
    assert not hf.is_explicit_repo_id("google/vit-*")
    assert not hf.is_explicit_repo_id("vit-base")
    assert hf.query_narrowing("google/vit-*-224") == ("google", "vit-")
    assert hf.query_narrowing("*/dinov2-?mall") == (None, "dinov2-")
    assert hf.matches_pattern("facebook/dinov2-small", "dinov2-*")
    assert hf.matches_pattern("Salesforce/blip-base", "salesforce/BLIP-*")
    assert not hf.matches_pattern("facebook/dinov2-small", "other/dinov2-*")


# ------------------------------------------------------------------- loading


def test_vit_weight_normalisation_and_provenance(env, checkpoints):
    layer = _load("acme/vit-tiny")
    key = "vit.embeddings.patch_embeddings.projection.weight"
    np.testing.assert_array_equal(layer.weight, _tensor(checkpoints["vit"], key))
    assert layer.module == "embeddings.patch_embeddings.projection"
    assert layer.kind == "conv" and layer.stride == (4, 4) and layer.input_size == (32, 32)
    np.testing.assert_allclose(layer.mean, VIT_MEAN, rtol=1e-12)
    np.testing.assert_allclose(layer.std, VIT_STD, rtol=1e-12)
    assert layer.channel_order == "RGB" and "normalization_unknown" not in layer.flags
    prov = layer.provenance
    path = checkpoints["vit"] / "model.safetensors"
    start, end = _safetensors_range(path, key)
    assert (prov.repo, prov.file, prov.tensor_key) == ("acme/vit-tiny", "model.safetensors", key)
    assert prov.revision == env.repos["acme/vit-tiny"].sha
    assert prov.byte_range == (start, end)
    assert prov.sha256 == hashlib.sha256(path.read_bytes()[start:end]).hexdigest()
    assert prov.bytes_fetched == env.body_bytes_sent()
    assert prov.bytes_fetched < path.stat().st_size + 10_000
    assert layer.metadata["model_type"] == "vit"
    assert layer.metadata["architecture"] == "ViTModel"
    assert layer.metadata["architectures"] == ["ViTForImageClassification"]
    assert layer.metadata["transformers"] == transformers.__version__


def test_fetches_only_the_needed_bytes(env, checkpoints, tmp_path):
    """A checkpoint much larger than the fetch window: the tensor bytes plus headers."""
    big = tmp_path / "big"
    shutil.copytree(checkpoints["vit"], big)
    with safe_open(str(big / "model.safetensors"), "pt") as fh:
        names = list(fh.keys())
        state = {k: fh.get_tensor(k) for k in names}
    state["zz_padding.weight"] = torch.zeros(4_000_000)  # 16 MB stored after the layer
    from safetensors.torch import save_file

    save_file(state, str(big / "model.safetensors"))
    env.add_repo("acme/vit-big", _files(big))
    layer = _load("acme/vit-big")
    size = (big / "model.safetensors").stat().st_size
    assert layer.provenance.bytes_fetched == env.body_bytes_sent(repo="acme/vit-big")
    assert layer.provenance.bytes_fetched < layer.weight.nbytes + 150_000 < size / 50


def test_convnext_rescale_factor_gives_effective_constants(env, checkpoints):
    layer = _load("acme/convnext-tiny")
    key = "convnext.embeddings.patch_embeddings.weight"
    np.testing.assert_array_equal(layer.weight, _tensor(checkpoints["convnext"], key))
    # x = 2 p - 1 = (p - 0.5) / 0.5
    np.testing.assert_allclose(layer.mean, (0.5,) * 3, rtol=1e-12)
    np.testing.assert_allclose(layer.std, (0.5,) * 3, rtol=1e-12)


def test_pytorch_bin_and_processor_class_defaults(env, checkpoints):
    layer = _load("acme/resnet-tiny")
    state = torch.load(checkpoints["resnet"] / "pytorch_model.bin", weights_only=True)
    key = "resnet.embedder.embedder.convolution.weight"
    np.testing.assert_array_equal(layer.weight, state[key].numpy())
    assert layer.provenance.file == "pytorch_model.bin" and layer.provenance.tensor_key == key
    assert layer.stride == (2, 2) and layer.padding == (3, 3)
    defaults = transformers.ConvNextImageProcessor
    np.testing.assert_allclose(layer.mean, defaults.image_mean, rtol=1e-12)
    np.testing.assert_allclose(layer.std, defaults.image_std, rtol=1e-12)


def test_clip_is_scanned_through_its_vision_tower(env, checkpoints):
    layer = _load("openish/clip-tiny")
    key = "vision_model.embeddings.patch_embedding.weight"
    np.testing.assert_array_equal(layer.weight, _tensor(checkpoints["clip"], key))
    assert layer.metadata["built_from"] == "vision tower"
    assert layer.metadata["preprocessor_file"] == "processor_config.json"
    np.testing.assert_allclose(layer.mean, CLIP_MEAN, rtol=1e-12)
    np.testing.assert_allclose(layer.std, CLIP_STD, rtol=1e-12)


def test_sharded_checkpoint_reads_one_shard(env, checkpoints):
    index = json.loads((checkpoints["sharded"] / "model.safetensors.index.json").read_text())
    key = "embeddings.patch_embeddings.projection.weight"
    shard = index["weight_map"][key]
    assert len(set(index["weight_map"].values())) > 1
    layer = _load("acme/vit-sharded")
    np.testing.assert_array_equal(layer.weight, _tensor(checkpoints["sharded"], key, shard))
    assert layer.provenance.file == shard
    assert layer.flags.get("normalization_unknown")
    other_shards = set(index["weight_map"].values()) - {shard}
    assert not [r for r in env.requests() if any(r.path.endswith(s) for s in other_shards)]


def test_timm_repository_through_timm_wrapper(env, checkpoints):
    """A timm-format repo (no model_type): built as transformers' TimmWrapperModel, the
    checkpoint's timm keys found by transformers' renaming, constants from pretrained_cfg."""
    layer = _load("timm/test_resnet.r160_in1k")
    (key,) = layer.metadata["checkpoint_keys"].values()
    assert not key.startswith("timm_model.")
    np.testing.assert_array_equal(layer.weight, _tensor(checkpoints["timm"], key))
    assert layer.metadata["model_type"] == "timm_wrapper"
    assert layer.metadata["preprocessor_file"] == "config.json:pretrained_cfg"
    assert layer.mean == (0.5, 0.5, 0.5) and layer.std == (0.5, 0.5, 0.5)
    assert layer.input_size == (160, 160)


def test_remote_code_repo_is_refused_without_running_it(env, tmp_path):
    with pytest.raises(UnsupportedModel, match="trust_remote_code"):
        _load("shady/custom-code")
    assert not (tmp_path / "remote_code_ran").exists()
    assert not env.requests(path="*modeling_evil.py")
    assert not env.requests(path="*model.safetensors")


def test_transient_faults_are_retried_and_verified(env, checkpoints):
    """A 503 on the model info, a 429 with Retry-After on config.json and a connection
    reset in the middle of the tensor read: the layer still arrives, bit-exact."""
    env.inject("status", path="/api/models/acme/vit-tiny*", status=503)
    env.inject("status", path="/acme/vit-tiny/resolve/*/config.json", status=429, retry_after=0.2)
    env.inject("reset", path="/_cdn/acme/vit-tiny/*", method="GET", after_bytes=3000)
    layer = _load("acme/vit-tiny")
    key = "vit.embeddings.patch_embeddings.projection.weight"
    np.testing.assert_array_equal(layer.weight, _tensor(checkpoints["vit"], key))
    assert all(f.hits == 1 for f in env.faults)
    path = checkpoints["vit"] / "model.safetensors"
    start, end = layer.provenance.byte_range
    assert layer.provenance.sha256 == hashlib.sha256(path.read_bytes()[start:end]).hexdigest()


def test_missing_and_gated_repos_fail_clearly(env):
    with pytest.raises(CheckpointError, match="not found"):
        _load("acme/nope")
    with pytest.raises(CheckpointError, match="gated"):
        _load("acme/vit-gated")


def test_revision_option_pins_the_commit(env, checkpoints):
    env.repos["acme/vit-tiny"].revisions["v1"] = env.repos["acme/vit-tiny"].sha
    layer = _load("acme/vit-tiny", revision="v1")
    assert layer.provenance.revision == env.repos["acme/vit-tiny"].sha
    with pytest.raises(CheckpointError, match="revision"):
        _load("acme/vit-tiny", revision="no-such-branch")


# ------------------------------------------------------------- scan end to end


def test_scan_end_to_end(env, checkpoints, photo_folder, tmp_path):
    store_path = tmp_path / "zoo.h5"
    names = [n for n in REPOS if n != "acme/vit-sharded"]
    args = ["scan", "--source", "hf", *names, "--store", str(store_path)]
    args += ["--dataset", f"folder:{photo_folder}", "--workers", "2", "--format", "json"]
    result = CliRunner().invoke(build_cli(), args, catch_exceptions=False)
    assert result.exit_code == 1, result.output  # one model failed (recorded), the rest stored
    summary = _summary(result.output)
    assert summary["stored"] == 4
    assert [(f["name"], f["error"]) for f in summary["failed"]] == [
        ("shady/custom-code", "UnsupportedModel")
    ]
    assert "trust_remote_code" in summary["failed"][0]["message"]
    assert not (tmp_path / "remote_code_ran").exists()
    expected = {
        "acme/vit-tiny": ("vit", "vit.embeddings.patch_embeddings.projection.weight"),
        "acme/convnext-tiny": ("convnext", "convnext.embeddings.patch_embeddings.weight"),
        "openish/clip-tiny": ("clip", "vision_model.embeddings.patch_embedding.weight"),
    }
    with Store(store_path, mode="r") as store:
        assert {n for s, n in store.models("hf")} == set(expected) | {"acme/resnet-tiny"}
        for name, (folder, key) in expected.items():
            stored = store.load_model("hf", name)
            np.testing.assert_array_equal(stored.layer.weight, _tensor(checkpoints[folder], key))
            prov = stored.layer.provenance
            path = checkpoints[folder] / "model.safetensors"
            start, end = prov.byte_range
            assert prov.sha256 == hashlib.sha256(path.read_bytes()[start:end]).hexdigest()
            assert prov.revision == env.repos[name].sha and prov.tensor_key == key
            assert stored.energy and all(np.isfinite(e).all() for e in stored.energy.values())
        vit = store.load_model("hf", "acme/vit-tiny").layer
        np.testing.assert_allclose(vit.mean, VIT_MEAN)
        failure = store.failures("hf")[0]
        assert failure["name"] == "shady/custom-code"
    stored_names = [*expected, "acme/resnet-tiny"]
    assert summary["bytes_fetched"] == sum(env.body_bytes_sent(repo=n) for n in stored_names)


# -------------------------------------------------------------------- offline


def test_offline_without_cache_fails_clearly_and_makes_no_request(env, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    env.reset_log()
    with pytest.raises(CheckpointError, match="offline"):
        _load("acme/vit-tiny")
    store_path = tmp_path / "zoo.h5"
    args = ["scan", "--source", "hf", "acme/vit-tiny", "openish/clip-tiny"]
    args += ["--store", str(store_path), "--format", "json"]
    result = CliRunner().invoke(build_cli(), args, catch_exceptions=False)
    summary = _summary(result.output)
    assert summary["stored"] == 0 and len(summary["failed"]) == 2
    assert all(
        "offline" in f["message"] and "HF_HUB_OFFLINE" in f["message"] for f in summary["failed"]
    )
    args = ["scan", "--source", "hf", "acme/*", "--store", str(store_path)]
    result = CliRunner().invoke(build_cli(), args, catch_exceptions=False)
    assert result.exit_code != 0 and "no model matching acme/*" in result.output
    assert env.requests() == []


def test_offline_uses_the_hf_cache(env, monkeypatch):
    """Files downloaded by the real ``huggingface_hub`` into the cache are scanned
    offline: same tensor, no request, nothing fetched."""
    from huggingface_hub import hf_hub_download

    for filename in ("config.json", "preprocessor_config.json", "model.safetensors"):
        hf_hub_download(
            "acme/vit-tiny", filename, endpoint=env.endpoint, cache_dir=os.environ["HF_HUB_CACHE"]
        )
    online = _load("acme/vit-tiny")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    env.reset_log()
    source = get_source("hf", {})
    assert [r.name for r in source.list_models(["acme/*"])] == ["acme/vit-tiny"]
    offline = source.load_first_layer(next(iter(source.list_models(["acme/vit-tiny"]))))
    np.testing.assert_array_equal(offline.weight, online.weight)
    assert offline.provenance.revision == online.provenance.revision
    assert offline.provenance.sha256 == online.provenance.sha256
    assert offline.provenance.bytes_fetched == 0
    assert offline.mean == online.mean
    assert env.requests() == []


# ------------------------------------------------------------- normalisation


def _processed(processor, image: np.ndarray) -> np.ndarray:
    out = processor(images=image, return_tensors="np", do_resize=False, do_center_crop=False)
    return np.asarray(out["pixel_values"][0], dtype=np.float64)


@pytest.mark.parametrize(
    ("cls_name", "kwargs"),
    [
        ("ViTImageProcessor", {}),
        (
            "ViTImageProcessor",
            {"rescale_factor": 1 / 127.5, "image_mean": [1.0] * 3, "image_std": [1.0] * 3},
        ),
        (
            "ViTImageProcessor",
            {"do_rescale": False, "image_mean": [120.0, 110, 100], "image_std": [60.0, 55, 50]},
        ),
        ("ViTImageProcessor", {"do_normalize": False}),
        ("ViTImageProcessor", {"do_normalize": False, "rescale_factor": 1 / 100}),
        (
            "EfficientNetImageProcessor",
            {"rescale_offset": True, "image_mean": [0.1] * 3, "image_std": [2.0] * 3},
        ),
        ("EfficientNetImageProcessor", {"include_top": False, "image_std": [0.5, 0.25, 2.0]}),
        ("EfficientNetImageProcessor", {"do_normalize": False, "image_std": [0.5, 0.25, 2.0]}),
        ("MobileViTImageProcessor", {}),
        ("CLIPImageProcessor", {}),
    ],
)
def test_normalisation_matches_the_real_processor(cls_name, kwargs, tmp_path):
    """What the real image processor feeds the model equals ``(p - mean') / std'`` on
    ``[0, 1]`` pixels in the stated channel order."""
    processor = getattr(transformers, cls_name)(**kwargs)
    processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    norm = hf.input_normalisation(config, 3)
    image = np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    p = image.astype(np.float64).transpose(2, 0, 1) / 255.0
    if norm.channel_order == "BGR":
        p = p[::-1]
    mean = np.zeros(3) if norm.mean is None else np.asarray(norm.mean)
    std = np.ones(3) if norm.std is None else np.asarray(norm.std)
    expected = (p - mean[:, None, None]) / std[:, None, None]
    np.testing.assert_allclose(_processed(processor, image), expected, rtol=1e-5, atol=1e-5)
    assert norm.channel_order == ("BGR" if cls_name == "MobileViTImageProcessor" else "RGB")


def test_normalisation_edge_cases():
    identity = hf.input_normalisation({"do_normalize": False}, 3)
    assert (identity.mean, identity.std, identity.known) == (None, None, True)
    unknown = hf.input_normalisation(None, 1)
    assert (unknown.mean, unknown.channel_order, unknown.known) == (None, "L", False)
    scalar = hf.input_normalisation({"do_normalize": True, "image_mean": 0.5, "image_std": 0.5}, 3)
    assert scalar.mean == (0.5, 0.5, 0.5)
    with pytest.raises(UnsupportedModel, match="2 values for a 3-channel"):
        hf.input_normalisation({"do_normalize": True, "image_mean": [0.5, 0.5]}, 3)
    with pytest.raises(UnsupportedModel, match="<= 0"):
        hf.input_normalisation({"do_normalize": True, "image_std": [0.5, 0, 0.5]}, 3)


# ------------------------------------------------------------- config and keys


def test_config_refusals():
    with pytest.raises(UnsupportedModel, match="auto_map.*trust_remote_code"):
        hf.parse_config({"model_type": "vit", "auto_map": {"AutoModel": "m.M"}}, "r/x")
    with pytest.raises(UnsupportedModel, match="unknown to transformers.*trust_remote_code"):
        hf.parse_config({"model_type": "not-a-real-type"}, "r/x")
    with pytest.raises(UnsupportedModel, match="no model_type"):
        hf.parse_config({"architectures": ["Foo"]}, "r/x")
    timm_config = {"architecture": "resnet18", "num_classes": 10, "pretrained_cfg": {}}
    assert hf.parse_config(timm_config, "timm/resnet18").model_type == "timm_wrapper"


def test_video_models_are_unsupported():
    config = hf.parse_config({"model_type": "videomae"}, "r/video")
    with pytest.raises(UnsupportedModel, match="video model"):
        hf.locate_first_layer(config, None, "r/video")


def test_key_matching():
    keep = lambda key: key  # noqa: E731 - no renaming
    keys = ["vit.embeddings.patch.weight", "vit.embeddings.patch.bias", "head.weight"]
    assert hf.match_checkpoint_keys(["embeddings.patch.weight"], keys, keep, "r") == {
        "embeddings.patch.weight": "vit.embeddings.patch.weight"
    }
    assert hf.match_checkpoint_keys(["head.weight"], keys, keep, "r") == {
        "head.weight": "head.weight"
    }
    two = ["a.stem.weight", "b.stem.weight"]
    with pytest.raises(ModelError, match="ambiguous: a.stem.weight, b.stem.weight"):
        hf.match_checkpoint_keys(["stem.weight"], two, keep, "r")
    with pytest.raises(CheckpointError, match="no checkpoint key for 'stem.weight'"):
        hf.match_checkpoint_keys(["stem.weight"], ["other.weight"], keep, "r")
    renamed = hf.match_checkpoint_keys(["stem.weight"], two, lambda k: k.removeprefix("b."), "r")
    assert renamed == {"stem.weight": "b.stem.weight"}


def test_meta_model_keys_match_real_checkpoint_keys(checkpoints):
    """transformers' own load-time renaming finds the checkpoint key of a base model
    built from a head-class checkpoint (ViTModel from ViTForImageClassification)."""
    config = hf.parse_config(json.loads((checkpoints["vit"] / "config.json").read_text()), "r")
    found = hf.locate_first_layer(config, None, "r")
    with safe_open(str(checkpoints["vit"] / "model.safetensors"), "pt") as fh:
        keys = list(fh.keys())
    renamer = hf.conversion_renamer(found.model)
    assert renamer("vit.embeddings.patch_embeddings.projection.weight") == (
        "embeddings.patch_embeddings.projection.weight"
    )
    mapping = hf.match_checkpoint_keys(found.spec.parameter_names, keys, renamer, "r")
    assert mapping == {
        "embeddings.patch_embeddings.projection.weight": (
            "vit.embeddings.patch_embeddings.projection.weight"
        )
    }


def test_naflex_patch_embedding_kernel_is_what_the_model_applies():
    """SigLIP 2 takes patches flattened in (p, p, C) order by its image processor; the
    kernel found applies to image patches in (c, kh, kw) order and gives the same
    embeddings as the model's own Linear on the processor's patches."""
    from transformers.models.siglip2.image_processing_siglip2 import convert_image_to_patches

    config = hf.parse_config(
        {
            "model_type": "siglip2_vision_model",
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "patch_size": 4,
            "num_patches": 16,
        },
        "r/siglip2",
    )
    found = hf.locate_first_layer(config, None, "r/siglip2")
    assert found.spec.kind == "linear" and found.image_size == (16, 16)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        _quiet()
        model = transformers.Siglip2VisionModel(config).eval()
    state = model.state_dict()
    kernel, _ = found.spec.materialize({k: state[k] for k in found.spec.parameter_names})
    assert kernel.shape == (32, 3, 4, 4) and found.spec.stride == (4, 4)
    image = torch.rand(3, 16, 16)
    with torch.no_grad():
        patches = convert_image_to_patches(image, 4)
        expected = model.embeddings.patch_embedding(patches)
        bias = state["embeddings.patch_embedding.bias"]
        conv = torch.nn.functional.conv2d(image[None], torch.from_numpy(kernel), bias, stride=4)
    np.testing.assert_allclose(conv[0].flatten(1).T.numpy(), expected.numpy(), atol=1e-5)


SAMPLE_TYPES = {
    # model type: (class a hub checkpoint is saved from, kind of first layer)
    "vit": ("ViTForImageClassification", "conv"),
    "deit": ("DeiTForImageClassificationWithTeacher", "conv"),
    "beit": ("BeitForImageClassification", "conv"),
    "convnext": ("ConvNextForImageClassification", "conv"),
    "resnet": ("ResNetForImageClassification", "conv"),
    "swin": ("SwinForImageClassification", "conv"),
    "dinov2": ("Dinov2Model", "conv"),
    "efficientnet": ("EfficientNetForImageClassification", "conv"),
    "mobilenet_v2": ("MobileNetV2ForImageClassification", "conv"),
    "regnet": ("RegNetForImageClassification", "conv"),
    "levit": ("LevitForImageClassificationWithTeacher", "conv"),
    "clip": ("CLIPModel", "conv"),
    "siglip": ("SiglipModel", "conv"),
    "perceiver": ("PerceiverForImageClassificationLearned", "conv"),
}


@pytest.mark.parametrize("model_type", sorted(SAMPLE_TYPES))
def test_model_types_on_meta(model_type):
    """Default configs of common vision model types: the first layer is found on meta and
    its key is the one key of a checkpoint saved from the usual class."""
    from zooscan.layers import build_on_meta

    class_name, kind = SAMPLE_TYPES[model_type]
    config = hf.parse_config({"model_type": model_type, "architectures": [class_name]}, "r")
    found = hf.locate_first_layer(config, None, "r")
    assert found.spec.kind == kind and found.spec.in_channels == 3
    cls = hf.transformers_model_class(class_name)
    with warnings.catch_warnings():
        _quiet()
        saved = build_on_meta(lambda: cls(config)).state_dict()
    mapping = hf.match_checkpoint_keys(
        found.spec.parameter_names, list(saved), hf.conversion_renamer(found.model), "r"
    )
    model_state = found.model.state_dict()
    for meta_key, ckpt_key in mapping.items():
        assert saved[ckpt_key].shape == model_state[meta_key].shape


# -------------------------------------------------------------------- dry run


def _dry_run(store: Path, *names: str) -> dict:
    args = ["scan", "--source", "hf", *names, "--store", str(store), "--dry-run"]
    result = CliRunner().invoke(build_cli(), [*args, "--format", "json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)["fetch"]


def _download(env, repo: str, *filenames: str) -> None:
    from huggingface_hub import hf_hub_download

    for filename in filenames:
        hf_hub_download(repo, filename, endpoint=env.endpoint, cache_dir=os.environ["HF_HUB_CACHE"])


def test_dry_run_makes_no_request_and_reports_the_estimate(env, tmp_path):
    from zooscan.remote.ranged import HEAD_BLOCK

    fetch = _dry_run(tmp_path / "zoo.h5", "acme/vit-tiny", "acme/convnext-tiny")
    assert env.requests() == []
    assert fetch["models"] == 2 and fetch["estimated"] == 2 and fetch["cached"] == 0
    assert fetch["typical"] == 2  # no config cached: sized as a typical ViT-B/16 layer
    assert fetch["requests"] == 2 * sum(hf.UNCACHED_REQUESTS.values()) == 16
    assert fetch["bytes"] == 2 * (HEAD_BLOCK + hf.TYPICAL_LAYER_BYTES)
    assert hf.TYPICAL_LAYER_BYTES == 768 * 3 * 16 * 16 * 4
    plan = get_source("hf", {}).plan(next(get_source("hf", {}).list_models(["acme/vit-tiny"])))
    assert plan["estimated"] is True and env.requests() == []
    assert not (tmp_path / "zoo.h5").exists()


def test_dry_run_uses_the_cached_config_and_weights(env, checkpoints, tmp_path):
    """config.json cached: the first layer's real size; weights cached too: cached.
    Checked against what loading then really costs (loopback server's log), with 4 MB
    stored ahead of the layer so that it lies past the first block, as in real models."""
    from safetensors.torch import save_file

    from zooscan.remote.ranged import HEAD_BLOCK

    padded = tmp_path / "padded"
    shutil.copytree(checkpoints["convnext"], padded)
    with safe_open(str(padded / "model.safetensors"), "pt") as fh:
        names = list(fh.keys())
        state = {k: fh.get_tensor(k) for k in names}
    state["aa_padding.weight"] = torch.zeros(1_000_000)  # sorted first: stored first
    save_file(state, str(padded / "model.safetensors"), metadata={"format": "pt"})
    env.add_repo("acme/convnext-padded", _files(padded))
    _download(env, "acme/convnext-padded", "config.json", "preprocessor_config.json")
    _download(env, "acme/vit-tiny", "config.json", "preprocessor_config.json", "model.safetensors")
    env.reset_log()
    source = get_source("hf", {})
    refs = {r.name: r for r in source.list_models(["acme/vit-tiny", "acme/convnext-padded"])}
    convnext = source.plan(refs["acme/convnext-padded"])
    vit = source.plan(refs["acme/vit-tiny"])
    assert env.requests() == []
    assert vit == {"requests": 0, "bytes": 0, "cached": True, "estimated": False}
    patch = 8 * 3 * 4 * 4 * 4  # ConvNeXt stem: 8 filters of 3x4x4, float32
    # config HEAD, model info, model.safetensors HEAD, first block, the layer's range
    assert convnext == {
        "requests": 5,
        "bytes": HEAD_BLOCK + patch,
        "cached": False,
        "estimated": False,
    }
    fetch = _dry_run(tmp_path / "zoo.h5", "acme/vit-tiny", "acme/convnext-padded")
    assert fetch["cached"] == 1 and fetch["requests"] == 5 and env.requests() == []
    layer = source.load_first_layer(refs["acme/convnext-padded"])
    env.settle()
    assert layer.weight.nbytes == patch
    assert len(env.requests()) == layer.metadata["requests"] == convnext["requests"]
    weights_bytes = env.body_bytes_sent(path="*/model.safetensors")
    assert weights_bytes == pytest.approx(convnext["bytes"], rel=0.10)
