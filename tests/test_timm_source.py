"""The ``timm`` source: identification on meta across timm's families, weight location
as timm resolves it, and real scans from a loopback hub.

The end-to-end tests write real checkpoints of small timm models (``safetensors`` and
``torch.save``), serve them from :mod:`hub_server` on 127.0.0.1 under the repository
names of their pretrained_cfg, and scan them with the real CLI through ``HF_ENDPOINT``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from hub_server import HubServer, free_env
from safetensors.torch import save_file
from timm.models import _builder as timm_builder
from timm.models import _hub as timm_hub
from timm.models import get_pretrained_cfg

from zooscan.cli import build_cli
from zooscan.errors import CheckpointError, ModelError, UnsupportedModel, UserError
from zooscan.layers import find_first_layer
from zooscan.records import ModelRef
from zooscan.store import Store
from zooscan_builtins import timm_source as ts

COMMIT = "c0ffee" + "0" * 34
VIT, NFNET, RESNET, EFFNET = (
    "test_vit.r160_in1k",
    "test_nfnet.r160_in1k",
    "test_resnet.r160_in1k",
    "test_efficientnet.r160_in1k",
)


def run_cli(*args: str) -> tuple[int, str]:
    """Exit status and standard output (``--format json`` prints only JSON there)."""
    result = CliRunner().invoke(build_cli(), list(args), catch_exceptions=False)
    assert "Traceback" not in result.output
    return result.exit_code, result.stdout


def real_model(tag: str, seed: int = 0) -> torch.nn.Module:
    """The model with random weights (the library's own init), on CPU."""
    torch.manual_seed(seed)
    return timm.create_model(tag, pretrained=False).eval()


def write_safetensors(path: Path, state: dict[str, torch.Tensor]) -> Path:
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path))
    return path


def write_torch(path: Path, state: dict[str, torch.Tensor]) -> Path:
    torch.save({k: v.detach().clone() for k, v in state.items()}, path)
    return path


# --------------------------------------------------------- identification on meta

FAMILIES = {
    # tag: (module, kernel, stride, flags that must be present)
    "resnet50.a1_in1k": ("conv1", (7, 7), (2, 2), {}),
    "convnext_tiny.fb_in1k": ("stem.0", (4, 4), (4, 4), {}),
    "vit_base_patch16_224.augreg2_in21k_ft_in1k": ("patch_embed.proj", (16, 16), (16, 16), {}),
    "deit_small_patch16_224.fb_in1k": ("patch_embed.proj", (16, 16), (16, 16), {}),
    "swin_tiny_patch4_window7_224.ms_in1k": ("patch_embed.proj", (4, 4), (4, 4), {}),
    "tf_efficientnet_b0.ns_jft_in1k": ("conv_stem", (3, 3), (2, 2), {}),
    "efficientnet_b0.ra_in1k": ("conv_stem", (3, 3), (2, 2), {}),
    "repvgg_a0.rvgg_in1k": (
        "stem.conv_kxk.conv+stem.conv_1x1.conv",
        (3, 3),
        (2, 2),
        {"fused_branches": 2},
    ),
    "mobileone_s0.apple_in1k": (
        "stem.conv_kxk.0.conv+stem.conv_scale.conv",
        (3, 3),
        (2, 2),
        {"fused_branches": 2},
    ),
    "fastvit_t8.apple_in1k": (
        "stem.0.conv_kxk.0.conv+stem.0.conv_scale.conv",
        (3, 3),
        (2, 2),
        {"fused_branches": 2},
    ),
    "tresnet_m.miil_in1k": ("body.conv1.conv", (12, 12), (4, 4), {"space_to_depth": 4}),
    "resnetv2_50x1_bit.goog_in21k": ("stem.conv", (7, 7), (2, 2), {"standardized": True}),
    "vit_base_r50_s16_384.orig_in21k_ft_in1k": (
        "patch_embed.backbone.stem.conv",
        (7, 7),
        (2, 2),
        {"standardized": True},
    ),
    "regnety_002.pycls_in1k": ("stem.conv", (3, 3), (2, 2), {}),
    "levit_128s.fb_dist_in1k": ("stem.conv1.linear", (3, 3), (2, 2), {}),
    "coat_lite_tiny.in1k": ("patch_embed1.proj", (4, 4), (4, 4), {}),
    "cspresnet50.ra_in1k": ("stem.conv1.conv", (7, 7), (2, 2), {}),
    "dla34.in1k": ("base_layer.0", (7, 7), (1, 1), {}),
    "dm_nfnet_f0.dm_in1k": ("stem.conv1", (3, 3), (2, 2), {"standardization": "scaled"}),
    "nf_resnet50.ra2_in1k": ("stem.conv", (7, 7), (2, 2), {"standardization": "scaled"}),
    "hrnet_w18_small.ms_in1k": ("conv1", (3, 3), (2, 2), {}),
    "inception_v3.tv_in1k": ("Conv2d_1a_3x3.conv", (3, 3), (2, 2), {}),
    "legacy_xception.tf_in1k": ("conv1", (3, 3), (2, 2), {}),
    "xception41.tf_in1k": ("stem.0.conv", (3, 3), (2, 2), {}),
    "mixer_b16_224.goog_in21k_ft_in1k": ("stem.proj", (16, 16), (16, 16), {}),
    "eva02_tiny_patch14_224.mim_in22k": ("patch_embed.proj", (14, 14), (14, 14), {}),
    "beit_base_patch16_224.in22k_ft_in22k_in1k": ("patch_embed.proj", (16, 16), (16, 16), {}),
    "vit_base_patch16_clip_224.openai": ("patch_embed.proj", (16, 16), (16, 16), {}),
    "naflexvit_base_patch16_gap.e300_s576_in1k": ("embeds.proj", (16, 16), (16, 16), {}),
    "crossvit_9_240.in1k": ("patch_embed.0.proj", (12, 12), (12, 12), {}),
    "crossvit_9_dagger_240.in1k": ("patch_embed.0.proj.0", (7, 7), (4, 4), {}),
    "davit_base_fl.msft_florence2": ("stem.conv", (7, 7), (4, 4), {}),
}


@pytest.mark.parametrize("tag", sorted(FAMILIES))
def test_first_layer_of_real_tags_on_meta(tag):
    module, kernel, stride, flags = FAMILIES[tag]
    ident = ts.identify(tag)
    spec = ident.spec
    assert (spec.module, spec.kernel_size, spec.stride) == (module, kernel, stride)
    assert flags.items() <= spec.flags.items()
    # the tensors it reads are real parameters of the model timm builds
    state = ident.model.state_dict()
    assert set(spec.parameter_names) <= set(state)
    assert all(state[n].device.type == "meta" for n in spec.parameter_names)
    # consistent with timm's own metadata: every branch is a declared first conv
    declared = ts._first_conv_tuple(get_pretrained_cfg(tag).first_conv)
    assert {b.module for b in spec.branches} <= set(declared)
    assert ident.first_conv_check.startswith("agrees")
    # the pretrained geometry: the probe used the tag's input size
    assert spec.input_shape == (1, *get_pretrained_cfg(tag).input_size)


def test_fused_stem_matches_timm_reparameterize():
    """RepVGG's stem from a real (random) checkpoint equals timm's own fusion."""
    ident = ts.identify("repvgg_a0.rvgg_in1k")
    model = real_model("repvgg_a0.rvgg_in1k")
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for name, t in model.stem.named_buffers():
            if name.endswith("running_var"):
                t.uniform_(0.5, 2.0)
            elif name.endswith("running_mean"):
                t.uniform_(-0.5, 0.5)
    state = model.state_dict()
    kernel, _ = ident.spec.materialize(state)
    model.stem.reparameterize()
    np.testing.assert_allclose(kernel, model.stem.reparam_conv.weight.detach().numpy(), atol=1e-5)


def test_multi_scale_stem_keeps_the_first_scale_and_says_so():
    ident = ts.identify("crossvit_9_dagger_240.in1k")
    assert ident.first_conv_check == (
        "agrees; also consuming the image: patch_embed.1.proj.0 (not part of the layer)"
    )


def test_dct_stem_is_unsupported_with_the_reason():
    with pytest.raises(UnsupportedModel, match="does not read image pixels"):
        ts.identify("csatv2.r512_in1k")


def test_unknown_tag_is_a_model_error():
    with pytest.raises(ModelError, match="timm has no pretrained tag 'resnet50.nope'"):
        ts.identify("resnet50.nope")


def test_first_conv_disagreement_is_reported():
    ident = ts.identify("resnet50.a1_in1k")
    with pytest.raises(Exception, match="disagrees with timm's first_conv"):
        ts.check_first_conv(ident.spec, ("layer1.0.conv1",), ident.model)


def test_building_downloads_nothing_and_restores_timm():
    """``pretrained=True`` is recorded, not loaded; meanwhile another thread still gets
    timm's real loading; timm's function is back afterwards."""
    original = timm_builder.load_pretrained
    donor = real_model(VIT, seed=1).state_dict()
    loaded = real_model(VIT, seed=2)

    def other_thread():  # loads a state dict through timm's own code path
        cfg = dict(get_pretrained_cfg(VIT).to_dict(), state_dict=donor)
        timm_builder.load_pretrained(loaded, pretrained_cfg=cfg)

    with ts.recording_loads() as calls:
        model = timm.create_model(VIT, pretrained=True)  # would download if it loaded
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
    assert timm_builder.load_pretrained is original
    assert len(calls) == 1 and calls[0].pretrained_cfg["hf_hub_id"] == f"timm/{VIT}"
    assert calls[0].filter_fn is not None  # the ViT checkpoint filter
    assert isinstance(model, torch.nn.Module)
    torch.testing.assert_close(
        loaded.patch_embed.proj.weight.detach(), donor["patch_embed.proj.weight"]
    )


def test_build_keeps_pretrained_only_architecture_changes():
    """fbnetc_100 uses a different BatchNorm eps when built pretrained: the meta model
    is built as ``pretrained=True`` builds it."""
    ident = ts.identify("fbnetc_100.rmsp_in1k")
    assert ident.model.bn1.eps == pytest.approx(1e-3)
    assert timm.create_model("fbnetc_100", pretrained=False).bn1.eps == pytest.approx(1e-5)


def _fingerprint(ident: ts.Identified) -> tuple:
    """Everything a scan takes from an identification, with a kernel materialised from
    fixed values (so the layer's arithmetic is compared, not just its names)."""
    shapes = ident.parameter_shapes()
    values = {n: np.arange(np.prod(s), dtype=np.float32).reshape(s) % 7 for n, s in shapes.items()}
    kernel, flags = ident.spec.materialize(values)
    return (
        ident.tag, ident.cfg, ident.spec.module, ident.spec.parameter_names, shapes,
        ident.parameter_nbytes(), ident.first_conv, ident.first_conv_check, ident.filter_fn,
        ident.metadata(), kernel.tobytes(), sorted(flags),
    )  # fmt: skip


@pytest.mark.parametrize("tag", ["resnet50.a1_in1k", "vit_small_patch16_224.augreg_in21k"])
def test_skipping_meta_init_builds_the_same_architecture(tag, monkeypatch):
    """Weight initialisation skipped on meta changes no parameter or buffer (name,
    shape, dtype, stride) and no identification result."""
    fast, _ = ts.build_meta_model(tag)
    fast_ident = _fingerprint(ts.identify(tag))
    monkeypatch.setattr(ts, "_INIT_OPS", frozenset())  # every init op runs on meta
    slow, _ = ts.build_meta_model(tag)

    def layout(model):
        return [(k, v.shape, v.dtype, v.stride()) for k, v in model.state_dict().items()]

    assert layout(fast) == layout(slow)
    assert fast_ident == _fingerprint(ts.identify(tag))


def test_skip_meta_init_leaves_real_tensors_alone():
    real = torch.zeros(4)
    with ts.SkipMetaInit():
        real.add_(1.0)
        meta = torch.zeros(4, device="meta").add_(1.0)
        torch.nn.init.normal_(real, mean=5.0, std=0.0)
    assert real.tolist() == [5.0] * 4 and meta.is_meta and meta.shape == (4,)


def test_tags_sharing_a_build_key_share_one_build(monkeypatch):
    """Tags of one architecture and build-relevant pretrained_cfg are built once; each
    gets its own pretrained_cfg, and every result equals a fresh identification."""
    builds = []
    build = ts.build_meta_model
    monkeypatch.setattr(ts, "build_meta_model", lambda tag: builds.append(tag) or build(tag))
    source = ts.TimmSource({})
    tags = ["resnet50.a1_in1k", "resnet50.a2_in1k", "resnet50.tv_in1k", "resnet50.bamboo"]
    idents = {}

    def work(tag):
        idents[tag] = source.identify(tag)

    threads = [threading.Thread(target=work, args=(t,)) for t in tags[:2] * 3 + tags[2:]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    keys = {t: ts.build_key(t, ts.pretrained_cfg(t)) for t in tags}
    # tv_in1k differs in weights location, crop and interpolation only: shared;
    # bamboo has no classifier (num_classes 0): built on its own.
    assert keys["resnet50.a1_in1k"] == keys["resnet50.a2_in1k"] == keys["resnet50.tv_in1k"]
    assert len(set(keys.values())) == len(builds) == 2
    assert idents["resnet50.bamboo"].model.fc.__class__ is not torch.nn.Linear
    assert idents["resnet50.a2_in1k"].model is idents["resnet50.a1_in1k"].model
    assert idents["resnet50.a2_in1k"].cfg["tag"] == "a2_in1k"
    assert source.identify("resnet50.a2_in1k").cfg["hf_hub_id"] == "timm/resnet50.a2_in1k"
    for tag in tags:
        assert _fingerprint(idents[tag]) == _fingerprint(ts.identify(tag))
    # A build whose builder altered the pretrained_cfg is never lent to another tag.
    altered = dataclasses.replace(idents["resnet50.a1_in1k"], cfg_from_registry=False)
    own = altered.for_tag("resnet50.a2_in1k", ts.pretrained_cfg("resnet50.a2_in1k"))
    assert own.model is not altered.model and own.tag == "resnet50.a2_in1k"


def test_build_key_keeps_tags_apart_when_the_builder_reads_them():
    """inception_v3's builder looks at its tag (``tv_in1k`` loads non-strictly): its
    module reads the tag, so each tag is built on its own."""
    tv, tf = "inception_v3.tv_in1k", "inception_v3.tf_in1k"
    assert ts._reads_tag("inception_v3") and not ts._reads_tag("resnet50")
    assert ts.build_key(tv, ts.pretrained_cfg(tv)) != ts.build_key(tf, ts.pretrained_cfg(tf))
    source = ts.TimmSource({})
    assert source.identify(tv).model is not source.identify(tf).model
    assert _fingerprint(source.identify(tf)) == _fingerprint(ts.identify(tf))


# ------------------------------------------------------------ weight location


def test_hub_file_order_is_timms():
    for name in (None, "pytorch_model.bin", "open_clip_pytorch_model.bin", "weights.bin"):
        own = name or timm_hub.HF_WEIGHTS_NAME
        expected = (*timm_hub._get_safe_alternatives(own), own)
        assert ts.hub_filenames(name) == expected
    assert ts.hub_filenames("open_clip_model.safetensors") == ("open_clip_model.safetensors",)


def test_every_registry_location_agrees_with_timms_resolver():
    """For every pretrained tag, where timm's own ``_resolve_pretrained_source`` loads
    from is where the source looks."""
    kinds = {}
    for tag in timm.list_models(pretrained=True):
        cfg = get_pretrained_cfg(tag).to_dict()
        load_from, loc = timm_builder._resolve_pretrained_source(cfg)
        location = ts.weight_location(cfg)
        kinds[location.kind] = kinds.get(location.kind, 0) + 1
        if load_from == "hf-hub":
            repo, filename = loc if isinstance(loc, tuple) else (loc, None)
            assert location.kind == "hub" and location.repo == repo.partition("@")[0], tag
            assert location.filenames == ts.hub_filenames(filename)
        else:
            assert (location.kind, location.url) == ("url", loc), tag
    assert kinds["hub"] > 1700 and kinds["url"] >= 1


def test_revision_option_and_hub_id_revision():
    cfg = {"architecture": "x", "hf_hub_id": "org/repo@v2"}
    assert ts.weight_location(cfg).revision == "v2"
    assert ts.weight_location(cfg, "abc").revision == "abc"
    assert ts.weight_location({"url": "https://h/x.pth"}).kind == "url"
    with pytest.raises(Exception, match="names no weights"):
        ts.weight_location({"architecture": "x"})


def test_mirror_rewrites_urls(monkeypatch):
    url = "https://github.com/org/repo/releases/download/v1/w-1234.pth"
    assert ts.mirrored_url(url) == url
    monkeypatch.setenv(ts.URL_MIRROR_ENV, "http://127.0.0.1:9/mirror/")
    assert ts.mirrored_url(url) == (
        "http://127.0.0.1:9/mirror/github.com/org/repo/releases/download/v1/w-1234.pth"
    )


# ------------------------------------------------------------------ listing


def test_listing_patterns_info_and_options():
    source = ts.TimmSource({})
    everything = [r.name for r in source.list_models([])]
    assert everything == sorted(timm.list_models(pretrained=True))
    refs = list(source.list_models(["convnext_tiny*"]))
    assert refs and all(r.name.startswith("convnext_tiny") for r in refs)
    by_arch = {r.name for r in source.list_models(["resnet50"])}  # architecture pattern
    assert "resnet50.a1_in1k" in by_arch and all(n.startswith("resnet50.") for n in by_arch)
    info = next(r for r in refs if r.name == "convnext_tiny.fb_in1k").info
    cfg = get_pretrained_cfg("convnext_tiny.fb_in1k")
    assert info["architecture"] == "convnext_tiny" and info["tag"] == "fb_in1k"
    assert info["hf_hub_id"] == "timm/convnext_tiny.fb_in1k"
    assert info["filename"] == "model.safetensors"
    assert info["input_size"] == list(cfg.input_size) and info["mean"] == list(cfg.mean)
    assert info["std"] == list(cfg.std) and info["first_conv"] == ("stem.0",)
    with pytest.raises(UserError, match="unknown option"):
        ts.TimmSource({"weights": "none"})
    with pytest.raises(UserError, match="revision is empty"):
        ts.TimmSource({"revision": " "})


# ------------------------------------------------------- scans from a loopback hub


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, photo_folder):
    """A loopback hub serving real checkpoints; one CLI scan of four tags into a store.

    ViT and NFNet as ``model.safetensors``, the ResNet only as ``pytorch_model.bin``
    (torch zip), and no repository at all for the EfficientNet.
    """
    tmp = tmp_path_factory.mktemp("timm_zoo")
    with HubServer() as hub, pytest.MonkeyPatch.context() as mp:
        free_env(mp, tmp)
        mp.setenv("TORCH_HOME", str(tmp / "torch_home"))
        hub.use_as_hf_endpoint(mp)
        states, files = {}, {}
        for tag, writer, name in (
            (VIT, write_safetensors, "model.safetensors"),
            (NFNET, write_safetensors, "model.safetensors"),
            (RESNET, write_torch, "pytorch_model.bin"),
        ):
            states[tag] = real_model(tag).state_dict()
            files[tag] = writer(tmp / f"{tag}-{name}", states[tag])
            hub.add_repo(get_pretrained_cfg(tag).hf_hub_id, {name: files[tag]}, sha=COMMIT)
        store = tmp / "zoo.h5"
        tags = [VIT, NFNET, RESNET, EFFNET]
        common = ["--source", "timm", *tags, "--store", str(store)]
        dry_code, dry = run_cli("scan", *common, "--dry-run", "--format", "json")
        dry_requests = len(hub.requests())
        code, output = run_cli(
            "scan", *common, "--dataset", f"folder:{photo_folder}", "--workers", "2",
            "--format", "json",
        )  # fmt: skip
        log = list(hub.requests())
        again_code, again = run_cli(
            "scan", *common, "--dataset", f"folder:{photo_folder}", "--format", "json"
        )
        yield {
            "store": store,
            "states": states,
            "files": files,
            "scan": (code, json.loads(output)),
            "dry": (dry_code, json.loads(dry), dry_requests),
            "again": (again_code, json.loads(again)),
            "log": log,
            "requests_after_rescan": len(hub.requests()) - len(log),
        }


def test_scan_stores_three_and_records_the_missing_repo(zoo):
    code, summary = zoo["scan"]
    assert code == 1  # a failure makes the exit status non-zero, the scan goes on
    assert summary["stored"] == 3
    with Store(zoo["store"]) as store:
        assert sorted(n for _, n in store.models("timm")) == sorted([VIT, NFNET, RESNET])
        failures = store.failures("timm")
        for tag, d in ((VIT, 3 * 16 * 16), (NFNET, 27), (RESNET, 27)):
            (energy,) = store.load_model("timm", tag).energy.values()  # the photo basis
            assert energy.shape == (d,) and energy.max() == pytest.approx(1.0)
    assert [f["name"] for f in failures] == [EFFNET]
    assert "not found" in failures[0]["message"]
    assert f"timm/{EFFNET}" in failures[0]["message"]
    # A missing repository (RepoNotFound) ends the search after one HEAD; a missing
    # file (EntryNotFound) goes on to the next candidate, as timm does.
    missing = [r for r in zoo["log"] if r.repo == get_pretrained_cfg(EFFNET).hf_hub_id]
    assert [(r.method, r.path.rsplit("/", 1)[-1]) for r in missing] == [
        ("HEAD", "model.safetensors")
    ]
    resnet = get_pretrained_cfg(RESNET).hf_hub_id
    heads = [
        r.path.rsplit("/", 1)[-1] for r in zoo["log"] if r.repo == resnet and r.method == "HEAD"
    ]
    assert heads == ["model.safetensors", "pytorch_model.bin"]


@pytest.mark.parametrize(
    ("tag", "key"), [(VIT, "patch_embed.proj.weight"), (RESNET, "conv1.0.weight")]
)
def test_stored_weight_is_the_checkpoint_tensor_exactly(zoo, tag, key):
    with Store(zoo["store"]) as store:
        layer = store.load_model("timm", tag).layer
    np.testing.assert_array_equal(layer.weight, zoo["states"][tag][key].numpy())
    assert layer.provenance.tensor_key == key


def test_standardised_weight_reproduces_timms_own_forward(zoo):
    """NFNet's ScaledStdConv2d: the stored (standardised) kernel, applied with plain
    conv2d, gives what timm's module computes on the same input."""
    with Store(zoo["store"]) as store:
        layer = store.load_model("timm", NFNET).layer
    model = real_model(NFNET)
    model.load_state_dict(zoo["states"][NFNET])
    conv = model.stem.conv1
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ours = F.conv2d(x, torch.from_numpy(layer.weight), conv.bias, conv.stride, conv.padding)
    with torch.no_grad():
        torch.testing.assert_close(ours, conv(x), atol=1e-5, rtol=1e-4)
    assert layer.flags["standardization"] == "scaled"


@pytest.mark.parametrize("tag", [VIT, NFNET, RESNET])
def test_normalisation_and_provenance(zoo, tag):
    with Store(zoo["store"]) as store:
        layer = store.load_model("timm", tag).layer
    cfg = get_pretrained_cfg(tag)
    assert layer.mean == pytest.approx(cfg.mean) and layer.std == pytest.approx(cfg.std)
    assert layer.channel_order == "RGB" and layer.input_size == tuple(cfg.input_size[1:])
    meta = layer.metadata
    assert meta["architecture"] == cfg.architecture and meta["tag"] == cfg.tag
    assert meta["timm"] == timm.__version__
    assert meta["pretrained_cfg"]["hf_hub_id"] == cfg.hf_hub_id
    prov = layer.provenance
    path = zoo["files"][tag]
    assert (prov.repo, prov.revision) == (cfg.hf_hub_id, COMMIT)
    assert prov.file == ("pytorch_model.bin" if tag == RESNET else "model.safetensors")
    start, end = prov.byte_range
    data = path.read_bytes()
    assert hashlib.sha256(data[start:end]).hexdigest() == prov.sha256
    assert end - start == layer.weight.nbytes  # float32 in the checkpoint
    # only the header/directory and the tensor crossed the wire
    assert 0 < prov.bytes_fetched <= end - start + 150_000
    assert prov.bytes_fetched < len(data) / 4
    if prov.file == "model.safetensors":  # the dry-run estimate is exact for safetensors
        plan = ts.TimmSource({}).plan(ModelRef("timm", tag))
        assert plan == {"requests": 3, "bytes": prov.bytes_fetched, "cached": False}


def test_safetensors_preferred_then_torch_zip(zoo):
    """As timm: model.safetensors first; pytorch_model.bin when the hub has no such file."""

    def heads(tag):
        rows = [r for r in zoo["log"] if r.repo == f"timm/{tag}" and r.method == "HEAD"]
        return [(r.path.rsplit("/", 1)[-1], r.status) for r in rows]

    assert heads(RESNET) == [("model.safetensors", 404), ("pytorch_model.bin", 302)]
    assert heads(VIT) == [("model.safetensors", 302)]


def test_rescan_resumes_without_fetching(zoo):
    code, summary = zoo["again"]
    assert summary["stored"] == 0 and summary["skipped_stored"] == 3
    assert summary["skipped_failed"] == 1 and code == 0
    assert zoo["requests_after_rescan"] == 0


def test_dry_run_estimates_without_network(zoo):
    code, dry, requests = zoo["dry"]
    assert code == 0 and requests == 0
    fetch = dry["fetch"]
    assert fetch["models"] == 4 and fetch["estimated"] == 4 and fetch["cached"] == 0
    vit_bytes = 64 * 3 * 16 * 16 * 4
    assert fetch["bytes"] >= vit_bytes + 4 * ts.HEADER_ALLOWANCE
    assert fetch["requests"] >= 4 * 3


# -------------------------------------------- single loads: remapping, URLs, cache


@pytest.fixture
def hub_env(monkeypatch, tmp_path):
    """A loopback hub as ``HF_ENDPOINT``, an empty private hub cache, no token."""
    with HubServer() as server:
        free_env(monkeypatch, tmp_path)
        monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
        server.use_as_hf_endpoint(monkeypatch)
        yield server


def load(tag: str, **options: str):
    return ts.TimmSource(options).load_first_layer(ModelRef("timm", tag))


def florence_checkpoint(path: Path) -> tuple[Path, torch.Tensor]:
    """A checkpoint in Florence-2's layout (vision tower keys under ``vision_tower.``,
    DaViT's stem as ``convs.0.proj``), as the microsoft/Florence-2-base repo holds."""
    gen = torch.Generator().manual_seed(3)
    stem = torch.randn(128, 3, 7, 7, generator=gen)
    state = {
        "vision_tower.convs.0.proj.weight": stem,
        "vision_tower.convs.0.proj.bias": torch.randn(128, generator=gen),
        "vision_tower.convs.0.norm.weight": torch.ones(128),
        "vision_tower.convs.0.norm.bias": torch.zeros(128),
        "vision_tower.blocks.0.0.window_attn.norm.weight": torch.ones(128),
        "language_model.model.shared.weight": torch.randn(64, 32, generator=gen),
    }
    return write_safetensors(path, state), stem


def test_renamed_checkpoint_keys_follow_timms_filter(hub_env, tmp_path):
    """DaViT Florence-2: timm's checkpoint filter renames ``vision_tower.convs.0.proj``
    to ``stem.conv``; the source reads the renamed tensor, and only it."""
    path, stem = florence_checkpoint(tmp_path / "florence.safetensors")
    hub_env.add_repo("microsoft/Florence-2-base", {"model.safetensors": path}, sha=COMMIT)
    layer = load("davit_base_fl.msft_florence2")
    np.testing.assert_array_equal(layer.weight, stem.numpy())
    assert layer.provenance.tensor_key == "vision_tower.convs.0.proj.weight"
    assert layer.metadata["checkpoint_keys"] == {
        "stem.conv.weight": "vision_tower.convs.0.proj.weight"
    }
    assert layer.provenance.repo == "microsoft/Florence-2-base"


def test_computed_checkpoint_value_is_reported_not_guessed(hub_env, tmp_path):
    """A ViT checkpoint with a 2-D patch embedding: timm's filter reshapes it; the
    source does not replay computations and says so."""
    state = real_model(VIT).state_dict()
    state["patch_embed.proj.weight"] = state["patch_embed.proj.weight"].reshape(64, -1)
    path = write_safetensors(tmp_path / "vit.safetensors", state)
    hub_env.add_repo(f"timm/{VIT}", {"model.safetensors": path})
    with pytest.raises(CheckpointError, match="checkpoint keys differ: timm's checkpoint filter "
                       "computes patch_embed.proj.weight"):  # fmt: skip
        load(VIT)


def test_absent_key_is_reported_with_close_matches(hub_env, tmp_path):
    state = real_model(RESNET).state_dict()
    state["stem.0.weight"] = state.pop("conv1.0.weight")
    path = write_safetensors(tmp_path / "resnet.safetensors", state)
    hub_env.add_repo(f"timm/{RESNET}", {"model.safetensors": path})
    with pytest.raises(CheckpointError, match=r"checkpoint keys differ.*conv1\.0\.weight"):
        load(RESNET)


def test_url_only_entry_through_a_mirror(hub_env, tmp_path, monkeypatch):
    """gcvit_xxtiny has only a GitHub URL: a torch zip served at mirror/<host>/<path>."""
    tag = "gcvit_xxtiny.in1k"
    url = get_pretrained_cfg(tag).url
    assert not get_pretrained_cfg(tag).hf_hub_id
    stem = torch.randn(64, 3, 3, 3, generator=torch.Generator().manual_seed(5))
    path = write_torch(tmp_path / "gcvit.pth", {"stem.conv1.weight": stem,
                                                "stem.conv1.bias": torch.zeros(64)})  # fmt: skip
    host_path = url.split("://", 1)[1]
    hub_env.add_url(f"/mirror/{host_path}", path)
    monkeypatch.setenv(ts.URL_MIRROR_ENV, f"{hub_env.endpoint}/mirror")
    layer = load(tag)
    np.testing.assert_array_equal(layer.weight, stem.numpy())
    assert (layer.provenance.repo, layer.provenance.file) == ("github.com", url)
    assert layer.provenance.bytes_fetched < path.stat().st_size + 1


def test_url_entry_in_timms_torch_cache_is_read_locally(hub_env, tmp_path, monkeypatch):
    """timm caches URL weights in TORCH_HOME/hub/checkpoints: read there, no request."""
    tag = "gcvit_xxtiny.in1k"
    url = get_pretrained_cfg(tag).url
    cache = tmp_path / "torch_home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    stem = torch.randn(64, 3, 3, 3, generator=torch.Generator().manual_seed(6))
    write_torch(cache / url.rsplit("/", 1)[-1], {"stem.conv1.weight": stem})
    source = ts.TimmSource({})
    assert source.plan(ModelRef("timm", tag)) == {"requests": 0, "bytes": 0, "cached": True}
    layer = source.load_first_layer(ModelRef("timm", tag))
    np.testing.assert_array_equal(layer.weight, stem.numpy())
    assert layer.provenance.bytes_fetched == 0 and hub_env.requests() == []
    assert layer.provenance.file == url


def test_cached_file_is_used_offline_and_plan_says_cached(hub_env, tmp_path, monkeypatch):
    """A file huggingface_hub downloaded earlier (the real client, into HF_HOME) is read
    offline with nothing fetched; plan() reports it cached."""
    from huggingface_hub import hf_hub_download

    state = real_model(VIT).state_dict()
    path = write_safetensors(tmp_path / "vit.safetensors", state)
    hub_env.add_repo(f"timm/{VIT}", {"model.safetensors": path}, sha=COMMIT)
    cache = os.environ["HF_HUB_CACHE"]  # huggingface_hub read its default at import
    hf_hub_download(f"timm/{VIT}", "model.safetensors", cache_dir=cache)
    assert (Path(cache) / f"models--timm--{VIT}").is_dir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_env.reset_log()
    source = ts.TimmSource({})
    ref = ModelRef("timm", VIT)
    assert source.plan(ref) == {"requests": 0, "bytes": 0, "cached": True}
    layer = source.load_first_layer(ref)
    assert hub_env.requests() == []
    np.testing.assert_array_equal(layer.weight, state["patch_embed.proj.weight"].numpy())
    assert layer.provenance.bytes_fetched == 0 and layer.provenance.revision == COMMIT


def test_plan_estimates_tensor_bytes_without_network(hub_env):
    plan = ts.TimmSource({}).plan(ModelRef("timm", "mobileone_s0.apple_in1k"))
    tensors = (48 * 3 * 3 * 3 + 48 * 3 + 8 * 48) * 4  # two kernels + two BatchNorms
    assert plan == {"requests": 3, "bytes": tensors + ts.HEADER_ALLOWANCE, "cached": False}
    assert hub_env.requests() == []


def test_fused_stem_from_the_hub_matches_timm(hub_env, tmp_path):
    """MobileOne's two-branch stem, read from a real checkpoint: the stored kernel and
    bias reproduce timm's reparameterised conv."""
    tag = "mobileone_s0.apple_in1k"
    model = real_model(tag)
    with torch.no_grad():
        for name, t in model.stem.named_buffers():
            if name.endswith("running_var"):
                t.uniform_(0.5, 2.0)
    state = {k: v for k, v in model.state_dict().items() if k.startswith("stem.")}
    path = write_safetensors(tmp_path / "mobileone.safetensors", state)
    hub_env.add_repo(f"timm/{tag}", {"model.safetensors": path})
    layer = load(tag)
    model.stem.reparameterize()
    np.testing.assert_allclose(layer.weight, model.stem.reparam_conv.weight.detach(), atol=1e-5)
    assert layer.kind == "fused" and layer.provenance.byte_range is None
    assert "+" in layer.provenance.tensor_key


def test_concurrent_loads_share_one_client(hub_env, tmp_path):
    tags = [VIT, RESNET, NFNET]
    states = {}
    for tag in tags:
        states[tag] = real_model(tag).state_dict()
        path = write_safetensors(tmp_path / f"{tag}.safetensors", states[tag])
        hub_env.add_repo(f"timm/{tag}", {"model.safetensors": path})
    source = ts.TimmSource({})
    results: dict[str, object] = {}

    def work(tag):
        results[tag] = source.load_first_layer(ModelRef("timm", tag))

    threads = [threading.Thread(target=work, args=(t,)) for t in tags * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert set(results) == set(tags)
    spec = find_first_layer(real_model(RESNET), (1, 3, 160, 160))
    np.testing.assert_array_equal(results[RESNET].weight, states[RESNET][spec.weight_key].numpy())
    assert source.client.requests >= 3
