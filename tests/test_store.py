"""The HDF5 store and its pandas queries, on real HDF5 files and bases of real photographs."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zooscan import query
from zooscan.errors import StoreError, UserError
from zooscan.records import Analysis, FirstLayer, ModelRecord, PatchBasis, Provenance
from zooscan.store import (
    SCHEMA_VERSION,
    Store,
    default_store_path,
    escape_name,
    unescape_name,
)

# ----------------------------------------------------------------------------- helpers


def photo_basis(
    photos: dict[str, np.ndarray], c: int, k: int, dataset: str = "photos"
) -> PatchBasis:
    """Exact PCA of every stride-1 patch of three downscaled real photographs."""
    d = c * k * k
    total, outer, n = np.zeros(d), np.zeros((d, d)), 0
    for img in list(photos.values())[:3]:
        small = img[::6, ::6].astype(np.float64)  # (H, W, 3)
        chw = (
            small.transpose(2, 0, 1)
            if c == 3
            else small.mean(axis=2, keepdims=True).transpose(2, 0, 1)
        )
        windows = np.lib.stride_tricks.sliding_window_view(chw, (c, k, k))[0]
        patches = windows.reshape(-1, d)  # (c, kh, kw) order
        total += patches.sum(axis=0)
        outer += patches.T @ patches
        n += len(patches)
    mean, second = total / n, outer / n
    values, vectors = np.linalg.eigh(second - np.outer(mean, mean))
    order = np.argsort(values)[::-1]
    values, vectors = np.clip(values[order], 0, None), vectors[:, order]
    signs = np.sign(vectors[np.abs(vectors).argmax(axis=0), np.arange(d)])
    return PatchBasis(dataset, c, k, k, True, vectors * signs, values, mean, second, n, 3)


def analyse(weight: np.ndarray, basis: PatchBasis) -> Analysis:
    """Projection and energy profile exactly as DESIGN §1 defines them."""
    projections = weight.reshape(len(weight), -1).astype(np.float64) @ basis.components
    energy = np.sqrt(np.mean(projections**2, axis=0))
    return Analysis(basis.id, projections, energy / energy.max())


def full_layer(weight: np.ndarray) -> FirstLayer:
    """A layer with every field away from its default."""
    return FirstLayer(
        weight=weight,
        module="stem.0.conv",
        kind="fused",
        stride=(2, 3),
        padding="same",
        dilation=(1, 2),
        groups=1,
        bias=True,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        channel_order="BGR",
        input_size=(224, 240),
        flags={"fused_branches": 3, "standardized": True, "nested": {"a": [1, 2]}},
        provenance=Provenance(
            repo="timm/resnet50.a1_in1k",
            revision="0123abcd",
            file="model.safetensors",
            tensor_key="conv1.weight+conv1.bn",
            byte_range=(1024, 1024 + weight.nbytes),
            sha256="ab" * 32,
            bytes_fetched=40_000,
        ),
        metadata={"architecture": "resnet50", "ünïcode": "✓", "zero": 0.0},
    )


def smooth_weight(rng: np.random.Generator, out: int, c: int, k: int) -> np.ndarray:
    """Low-frequency filters (blurred noise), unlike white-noise random init."""
    w = rng.standard_normal((out, c, k + 4, k + 4))
    w = (w[..., :-2, :] + w[..., 1:-1, :] + w[..., 2:, :]) / 3
    w = (w[..., :, :-2] + w[..., :, 1:-1] + w[..., :, 2:]) / 3
    return w[..., 1 : 1 + k, 1 : 1 + k].astype(np.float32)


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_layer_equal(got: FirstLayer, want: FirstLayer) -> None:
    assert got.weight.dtype == np.float32
    assert got.weight.tobytes() == np.asarray(want.weight, np.float32).tobytes()
    for name in FirstLayer.__dataclass_fields__:
        if name != "weight":
            assert getattr(got, name) == getattr(want, name), name


@pytest.fixture(scope="module")
def bases(photos) -> dict[tuple[int, int, int], PatchBasis]:
    return {(3, 3, 3): photo_basis(photos, 3, 3), (3, 7, 7): photo_basis(photos, 3, 7)}


@pytest.fixture
def store_path(tmp_path) -> Path:
    return tmp_path / "zoo.h5"


def record(
    name: str, basis: PatchBasis, seed: int = 0, source: str = "hub", out: int = 8
) -> ModelRecord:
    rng = np.random.default_rng(seed)
    weight = smooth_weight(rng, out, basis.channels, basis.kh)
    return ModelRecord(
        source, name, full_layer(weight), [analyse(weight, basis)], "2025-02-03T04:05:06Z"
    )


# ----------------------------------------------------------------------------- names


@given(st.text())
@settings(max_examples=300, deadline=None, database=None)
def test_escape_is_reversible_and_a_single_hdf5_link_name(name):
    escaped = escape_name(name)
    assert unescape_name(escaped) == name
    assert escaped and "/" not in escaped and escaped not in (".", "..")
    assert not escaped.startswith(".")
    with h5py.File(f"mem-{os.getpid()}.h5", "w", driver="core", backing_store=False) as f:
        f.create_group(escaped)
        assert list(f.keys()) == [escaped]


@pytest.mark.parametrize(
    ("name", "escaped"),
    [
        ("", "%"),
        (".", "%2E"),
        ("..", "%2E."),
        ("timm/resnet50.a1_in1k", "timm%2Fresnet50.a1_in1k"),
        ("a b%c", "a%20b%25c"),
        ("ü", "%C3%BC"),
        ("x~1-2_3", "x~1-2_3"),
    ],
)
def test_escape_examples(name, escaped):
    assert escape_name(name) == escaped
    assert unescape_name(escaped) == name


@pytest.mark.parametrize("bad", ["", "%zz", "%4", "a/b", "a b"])
def test_unescape_rejects_malformed_names(bad):
    with pytest.raises(ValueError):
        unescape_name(bad)


def test_default_store_path_honours_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("ZOOSCAN_STORE", raising=False)
    assert default_store_path() == Path("zoo.h5")
    monkeypatch.setenv("ZOOSCAN_STORE", str(tmp_path / "x.h5"))
    assert default_store_path() == tmp_path / "x.h5"


# ----------------------------------------------------------------------------- round trips


def test_model_round_trips_through_journal_main_file_and_reader(store_path, bases):
    rec = record("timm/resnet50.a1_in1k", bases[3, 7, 7])
    with Store(store_path, mode="a") as store:
        store.commit_model(rec)
        pending = store.load_model("hub", rec.name)  # from the journal
        store.flush()
        compacted = store.load_model("hub", rec.name)  # from the main file
    with Store(store_path) as reader:
        reread = reader.load_model("hub", rec.name)
    (analysis,) = rec.analyses
    for got in (pending, compacted, reread):
        assert (got.source, got.name, got.scanned_at) == ("hub", rec.name, rec.scanned_at)
        assert_layer_equal(got.layer, rec.layer)
        assert got.energy[analysis.basis_id].tobytes() == analysis.energy.tobytes()
        assert got.projections[analysis.basis_id].tobytes() == analysis.projections.tobytes()
        assert got.to_record().analyses[0].basis_id == analysis.basis_id


def test_default_fields_and_none_values_round_trip(store_path, bases):
    weight = np.arange(2 * 3 * 3 * 3, dtype=np.float32).reshape(2, 3, 3, 3)
    layer = FirstLayer(weight=weight, module="conv1", padding=(1, 1))
    with Store(store_path, mode="a") as store:
        store.commit_model(ModelRecord("tv", "", layer))  # empty name is a valid name
    with Store(store_path) as reader:
        got = reader.load_model("tv", "")
    assert_layer_equal(got.layer, layer)
    assert got.layer.mean is None and got.layer.provenance.byte_range is None
    assert got.energy == {} and got.scanned_at  # scanned_at defaults to the commit time


def test_plain_h5py_sees_the_documented_schema(store_path, bases):
    basis = bases[3, 7, 7]
    rec = record("org/model.v1", basis)
    with Store(store_path, mode="a") as store:
        store.put_basis(basis)
        store.commit_model(rec)
        store.record_failure("hub", "broken/one", "CheckpointError", "no tensor conv1.weight")
    with h5py.File(store_path, "r") as f:
        assert f.attrs["format"] == "zooscan" and f.attrs["schema_version"] == SCHEMA_VERSION
        assert isinstance(f.attrs["zooscan_version"], str)
        g = f["models/hub/org%2Fmodel.v1"]
        assert g["weight"].dtype == np.float32 and g["weight"].shape == (8, 3, 7, 7)
        assert g.attrs["module"] == "stem.0.conv" and g.attrs["name"] == "org/model.v1"
        assert list(g.attrs["stride"]) == [2, 3] and g.attrs["padding"] == "same"
        assert list(g.attrs["byte_range"]) == [1024, 1024 + rec.layer.weight.nbytes]
        assert json.loads(g.attrs["flags"])["fused_branches"] == 3
        assert np.allclose(g.attrs["std"], [0.229, 0.224, 0.225])
        link = escape_name(basis.id)
        assert g[f"energy/{link}"].shape == (147,) and g[f"energy/{link}"].dtype == np.float64
        assert g[f"projections/{link}"].shape == (8, 147)
        assert g[f"energy/{link}"].attrs["basis"] == basis.id
        b = f[f"bases/{link}"]
        assert b["components"].shape == (147, 147) and b["second_moment"].shape == (147, 147)
        assert b.attrs["space"] == "pixel-rgb" and b.attrs["n_patches"] == basis.n_patches
        assert bool(b.attrs["centered"]) and b.attrs["dataset"] == "photos"
        fail = f["failures/hub/broken%2Fone"]
        assert fail.attrs["error_class"] == "CheckpointError" and fail.attrs["attempts"] == 1


def test_commit_replaces_a_model_and_clears_its_failure(store_path, bases):
    with Store(store_path, mode="a") as store:
        store.record_failure("hub", "m", "CheckpointError", "truncated")
        store.commit_model(record("m", bases[3, 3, 3], seed=1))
        assert store.failures() == []
        store.flush()
        store.commit_model(record("m", bases[3, 3, 3], seed=2))
        assert store.models() == [("hub", "m")]
    with Store(store_path) as reader:
        got = reader.load_model("hub", "m").layer.weight
    assert got.tobytes() == record("m", bases[3, 3, 3], seed=2).layer.weight.tobytes()


def test_failures_count_attempts_and_can_be_cleared(store_path):
    with Store(store_path, mode="a") as store:
        store.record_failure("hub", "a/b", "CheckpointError", "first")
        first = store.failures()[0]
        time.sleep(1.1)
        store.flush()
        store.record_failure("hub", "a/b", "UnsupportedModel", "second\x00nul")
        store.record_failure("other", "c", "ModelError", "x")
    with Store(store_path) as reader:
        fails = reader.failures("hub")
        assert [(f["source"], f["name"], f["attempts"]) for f in fails] == [("hub", "a/b", 2)]
        assert (
            fails[0]["error_class"] == "UnsupportedModel"
            and fails[0]["message"] == "second\ufffdnul"
        )
        assert fails[0]["first_failed_at"] == first["first_failed_at"] < fails[0]["last_failed_at"]
        assert len(reader.failures()) == 2
    with Store(store_path, mode="a") as store:
        store.clear_failure("hub", "a/b")
        store.clear_failure("hub", "never-failed")
        assert [f["name"] for f in store.failures()] == ["c"]
    with Store(store_path) as reader, h5py.File(store_path, "r") as f:
        assert [f["name"] for f in reader.failures()] == ["c"]
        assert "hub" not in f["failures"]


def test_bases_round_trip_bit_identically(store_path, photos, bases):
    gray = photo_basis(photos, 1, 5)
    with Store(store_path, mode="a") as store:
        store.put_basis(bases[3, 3, 3])
        store.put_basis(gray)
        assert store.bases() == sorted([bases[3, 3, 3].id, gray.id])
    with Store(store_path) as reader:
        assert reader.get_basis("nope") is None
        got = reader.get_basis(gray.id)
        assert reader.basis_info(gray.id)["space"] == "pixel-luminance"
    for key in ("components", "eigenvalues", "mean", "second_moment"):
        assert getattr(got, key).tobytes() == getattr(gray, key).tobytes()
    assert (got.id, got.n_patches, got.n_images, got.centered) == (gray.id, gray.n_patches, 3, True)


def test_add_analysis_extends_a_stored_model(store_path, photos, bases):
    rec = record("m", bases[3, 3, 3])
    other = photo_basis(dict(list(photos.items())[3:]), 3, 3, dataset="more-photos")
    extra = analyse(rec.layer.weight, other)
    with Store(store_path, mode="a") as store:
        store.commit_model(rec)
        store.add_analysis("hub", "m", extra)  # onto a model still in the journal
        store.flush()
        store.add_analysis("hub", "m", extra)  # replaces it in the main file
        with pytest.raises(StoreError, match="expected"):
            store.add_analysis(
                "hub", "m", Analysis(other.id, extra.projections[:, :5], extra.energy[:5])
            )
        with pytest.raises(UserError, match="no model 'ghost' from source 'hub'"):
            store.add_analysis("hub", "ghost", extra)
    with Store(store_path) as reader:
        got = reader.load_model("hub", "m")
        assert sorted(got.energy) == sorted([rec.analyses[0].basis_id, other.id])
        assert got.energy[other.id].tobytes() == extra.energy.tobytes()
        assert reader.summary("hub", "m").bases == tuple(sorted(got.energy))


def test_store_usage_errors(store_path, bases):
    with pytest.raises(StoreError, match="no store at .*run zooscan scan first"):
        Store(store_path)
    with pytest.raises(StoreError, match="does not exist"):
        Store(store_path.parent / "missing" / "zoo.h5", mode="a")
    with Store(store_path, mode="a") as store:
        with pytest.raises(UserError, match="no model 'x' from source 'y' in store"):
            store.load_model("y", "x")
        bad = record("m", bases[3, 3, 3])
        bad.layer.weight = bad.layer.weight[0]
        with pytest.raises(StoreError, match="weight must be"):
            store.commit_model(bad)
    with Store(store_path) as reader, pytest.raises(StoreError, match="read-only"):
        reader.commit_model(record("m", bases[3, 3, 3]))
    with pytest.raises(StoreError, match="closed"):
        reader.models()
    with pytest.raises(ValueError):
        Store(store_path, mode="w")


# ----------------------------------------------------------------------------- bad paths


def _not_hdf5(path: Path) -> None:
    path.write_bytes(b"this is a text file, not HDF5\n" * 10)


def _foreign_hdf5(path: Path) -> None:
    with h5py.File(path, "w") as f:
        f["data"] = np.arange(10)


def _newer_store(path: Path) -> None:
    with h5py.File(path, "w") as f:
        f.attrs["format"] = "zooscan"
        f.attrs["schema_version"] = SCHEMA_VERSION + 1


def _truncated_store(path: Path) -> None:
    with Store(path, mode="a") as store:
        store.put_basis(photo_basis({"x": np.random.default_rng(0).random((90, 90, 3))}, 3, 3))
    data = path.read_bytes()
    for sibling in path.parent.iterdir():
        if sibling != path:
            sibling.unlink() if sibling.is_file() else sibling.rmdir()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_not_hdf5, "is not an HDF5 file"),
        (_foreign_hdf5, "not a zooscan store"),
        (_newer_store, f"schema version {SCHEMA_VERSION + 1}, newer than this zooscan reads"),
        (_truncated_store, "corrupt or unreadable"),
    ],
)
@pytest.mark.parametrize("mode", ["r", "a"])
def test_bad_store_files_are_refused_and_left_untouched(store_path, make, message, mode):
    make(store_path)
    before = file_digest(store_path)
    with pytest.raises(StoreError, match=message):
        Store(store_path, mode=mode)
    assert file_digest(store_path) == before
    assert [p.name for p in store_path.parent.iterdir()] == ["zoo.h5"]


@pytest.mark.parametrize("mode", ["r", "a"])
def test_directory_is_refused(store_path, mode):
    store_path.mkdir()
    with pytest.raises(StoreError, match="is a directory"):
        Store(store_path, mode=mode)


# ----------------------------------------------------------------------------- journal


def _journal(store_path: Path) -> Path:
    return store_path.with_name(store_path.name + ".journal")


def test_commits_are_journaled_and_compacted_in_batches(store_path, bases):
    with Store(store_path, mode="a", compact_every=3, compact_ratio=0.0) as store:
        main_inode = store_path.stat().st_ino
        store.commit_model(record("a", bases[3, 3, 3]))
        store.commit_model(record("b", bases[3, 3, 3]))
        assert len(list(_journal(store_path).glob("*.rec"))) == 2
        assert store_path.stat().st_ino == main_inode  # main file untouched so far
        with Store(store_path) as reader:  # a reader sees journaled commits
            assert reader.models() == [("hub", "a"), ("hub", "b")]
        store.commit_model(record("c", bases[3, 3, 3]))  # third entry: compaction
        assert list(_journal(store_path).iterdir()) == []
        assert store_path.stat().st_ino != main_inode  # replaced, never edited
        with h5py.File(store_path, "r") as f:
            assert sorted(f["models/hub"]) == ["a", "b", "c"] and f.attrs["journal_seq"] == 3
        store.commit_model(record("d", bases[3, 3, 3]))
    # close compacts the rest
    assert list(_journal(store_path).iterdir()) == []
    assert sorted(p.name for p in store_path.parent.iterdir()) == [
        "zoo.h5",
        "zoo.h5.journal",
        "zoo.h5.lock",
    ]


def test_compaction_waits_for_the_journal_to_be_a_fraction_of_the_file(store_path, bases):
    with Store(store_path, mode="a", compact_every=1, compact_ratio=0.0) as store:
        for i in range(20):
            store.commit_model(record(f"m{i}", bases[3, 7, 7], seed=i))
    with Store(store_path, mode="a", compact_every=1, compact_ratio=0.5) as store:
        store.commit_model(record("small", bases[3, 3, 3]))
        assert len(list(_journal(store_path).glob("*.rec"))) == 1  # too small to compact yet


def test_recovery_after_a_crash(store_path, bases):
    with Store(store_path, mode="a", compact_every=100) as store:
        store.commit_model(record("kept", bases[3, 3, 3]))
        store.commit_model(record("also-kept", bases[3, 3, 3]))
        entries = sorted(_journal(store_path).glob("*.rec"))
        # simulate a SIGKILL: the process dies without close (keep the journal as is)
        snapshot = {p.name: p.read_bytes() for p in entries}
        store.flush()
    for name, data in snapshot.items():  # entries already in the main file (seq <= journal_seq)
        (_journal(store_path) / name).write_bytes(data)
    with Store(store_path, mode="a", compact_every=100) as store:
        store.commit_model(record("new", bases[3, 3, 3]))
        store.commit_model(record("torn", bases[3, 3, 3]))
        torn = sorted(_journal(store_path).glob("*.rec"))[-1]
        store._release_lock()  # simulate the kill: lock gone, journal left behind
        store._h5.close()
        store._h5 = None
    torn.write_bytes(torn.read_bytes()[:-100])  # a damaged entry (final name, bad checksum)
    (_journal(store_path) / ".tmp-0000000000000099-1").write_bytes(b"half")
    store_path.with_name("zoo.h5.tmp-1").write_bytes(b"half a compaction")
    with Store(store_path) as reader:  # readers skip the damaged entry
        assert reader.models() == [("hub", "also-kept"), ("hub", "kept"), ("hub", "new")]
    with Store(store_path, mode="a") as store:
        assert store.models() == [("hub", "also-kept"), ("hub", "kept"), ("hub", "new")]
        assert not store_path.with_name("zoo.h5.tmp-1").exists()
        assert [p.name for p in _journal(store_path).iterdir()] == [torn.name + ".corrupt"]
        store.commit_model(record("after", bases[3, 3, 3]))  # sequence numbers go on past it
    with Store(store_path) as reader:
        assert ("hub", "after") in reader.models()
        assert_layer_equal(
            reader.load_model("hub", "new").layer, record("new", bases[3, 3, 3]).layer
        )


def test_second_writer_in_the_same_process_is_refused(store_path):
    with Store(store_path, mode="a"):
        with pytest.raises(StoreError, match=rf"another zooscan process \(pid {os.getpid()}\)"):
            Store(store_path, mode="a")
        Store(store_path).close()


def test_replaced_models_are_repacked_away(store_path, bases):
    basis = bases[3, 7, 7]
    with Store(store_path, mode="a") as store:
        for seed in range(12):
            store.commit_model(record("big", basis, seed=seed, out=512))
            store.flush()
        sizes = os.path.getsize(store_path)
        with h5py.File(store_path, "r") as f:
            wasted = int(f.attrs["wasted_bytes"])
        assert sizes < 4 * 512 * (147 * 4 + 147 * 8)  # never the 12 copies
        store.flush(repack=True)
        with h5py.File(store_path, "r") as f:
            assert int(f.attrs["wasted_bytes"]) == 0 and wasted > 0
    with Store(store_path) as reader:
        got = reader.load_model("hub", "big")
    assert (
        got.layer.weight.tobytes() == record("big", basis, seed=11, out=512).layer.weight.tobytes()
    )


@pytest.mark.slow
def test_a_thousand_models_open_and_list_quickly(store_path):
    rng = np.random.default_rng(0)
    basis_id = "photos~3x7x7~centered"
    with Store(store_path, mode="a", compact_every=10_000) as store:
        for i in range(1000):
            weight = rng.standard_normal((64, 3, 7, 7)).astype(np.float32)
            analysis = Analysis(basis_id, rng.standard_normal((64, 147)), rng.random(147))
            store.commit_model(
                ModelRecord("timm", f"model-{i:04d}", FirstLayer(weight, "conv1"), [analysis])
            )
    start = time.perf_counter()
    with Store(store_path) as reader:
        listed = reader.models()
    elapsed = time.perf_counter() - start
    assert len(listed) == 1000
    assert elapsed < 1.0, f"open + models() took {elapsed:.2f} s"


# ----------------------------------------------------------------------------- queries


@pytest.fixture
def zoo(store_path, photos, bases) -> Path:
    """A store of smooth (trained-like) and white-noise (random-init) filter banks of two
    shapes, profiled on bases of real photographs, plus a second dataset for some."""
    rng = np.random.default_rng(42)
    more = photo_basis(dict(list(photos.items())[3:]), 3, 3, dataset="more-photos")
    with Store(store_path, mode="a") as store:
        for shape, basis in bases.items():
            store.put_basis(basis)
            for i in range(3):
                for kind, weight in (
                    ("smooth", smooth_weight(rng, 16, 3, shape[1])),
                    ("noise", rng.standard_normal((16, 3, shape[1], shape[2])).astype(np.float32)),
                ):
                    name = f"{kind}-{shape[1]}x{shape[2]}-{i}"
                    analyses = [analyse(weight, basis)]
                    if shape == (3, 3, 3) and i < 2:
                        analyses.append(analyse(weight, more))
                    store.commit_model(
                        ModelRecord(
                            "hub" if i else "tv", name, FirstLayer(weight, "conv1"), analyses
                        )
                    )
        store.record_failure("hub", "broken", "CheckpointError", "truncated file")
    return store_path


def test_profiles_are_the_stored_energies_on_one_basis(zoo, bases):
    with Store(zoo) as store:
        with pytest.raises(UserError, match=r"several kernel shapes match \(3x3x3: 6, 3x7x7: 6\)"):
            query.profiles(store)
        frame = query.profiles(store, kernel="3x3")
        assert frame.attrs["basis"] == bases[3, 3, 3].id and frame.attrs["shape_key"] == (3, 3, 3)
        assert frame.shape == (6, 27) and list(frame.columns) == list(range(27))
        assert frame.index.names == ["source", "name"]
        stored = store.load_model("hub", "smooth-3x3-1").energy[bases[3, 3, 3].id]
        assert np.array_equal(frame.loc[("hub", "smooth-3x3-1")].to_numpy(), stored)
        assert query.profiles(store, kernel=(3, 3, 3)).equals(frame)
        assert query.profiles(store, kernel="3x3", source="tv").shape == (2, 27)
        other = query.profiles(store, kernel=3, basis="more-photos")
        assert other.attrs["dataset"] == "more-photos" and len(other) == 4
        assert sorted(other.attrs["missing"]) == [("hub", "noise-3x3-2"), ("hub", "smooth-3x3-2")]
        by_id = query.profiles(store, basis=bases[3, 7, 7].id)
        assert by_id.attrs["shape_key"] == (3, 7, 7) and len(by_id) == 6
        with pytest.raises(UserError, match="no stored model matches"):
            query.profiles(store, kernel="5x5")
        with pytest.raises(UserError, match="no stored profile on dataset 'cifar10'"):
            query.profiles(store, kernel="3x3", basis="cifar10")


def test_correlations_separate_smooth_from_random_filters(zoo):
    with Store(zoo) as store:
        corr = query.correlations(store)
        assert sorted(corr) == [(3, 3, 3), (3, 7, 7)]
        by_shape = query.profiles_by_shape(store)
        for shape, matrix in corr.items():
            values = by_shape[shape].to_numpy()
            assert np.allclose(matrix.to_numpy(), np.corrcoef(values))
            assert matrix.attrs["basis"] == by_shape[shape].attrs["basis"]
            smooth = [key for key in matrix.index if key[1].startswith("smooth")]
            noise = [key for key in matrix.index if key[1].startswith("noise")]
            within = matrix.loc[smooth, smooth].to_numpy()[np.triu_indices(3, 1)]
            across = matrix.loc[smooth, noise].to_numpy()
            assert within.min() > across.max()  # blurred filters share a low-frequency profile
        only = query.correlations(store, kernel="7x7")
        assert list(only) == [(3, 7, 7)]
        assert list(query.correlations(store, dataset="more-photos")) == [(3, 3, 3)]


def test_models_and_failures_tables(zoo):
    with Store(zoo) as store:
        table = query.models_table(store, kernel="3x7x7")
        assert list(table.columns) == list(query.MODEL_COLUMNS)
        assert len(table) == 6 and set(table["kh"]) == {7} and set(table["out"]) == {16}
        assert table.iloc[0][["source", "C", "stride", "module", "kind"]].tolist() == [
            "hub",
            3,
            (1, 1),
            "conv1",
            "conv",
        ]
        assert all(len(b) == 1 for b in table["bases"])
        assert len(query.models_table(store, source="tv")) == 4
        fails = query.failures_table(store)
        assert fails[["source", "name", "error_class", "attempts"]].values.tolist() == [
            ["hub", "broken", "CheckpointError", 1]
        ]
        assert list(query.failures_table(store, source="tv").columns) == list(query.FAILURE_COLUMNS)
        assert query.models_table(store, kernel="9x9").empty


@pytest.mark.parametrize(
    ("spec", "parsed"),
    [
        (None, None),
        ("7x7", (None, 7, 7)),
        ("3x7x7", (3, 7, 7)),
        ("7", (None, 7, 7)),
        (3, (None, 3, 3)),
        ((5, 7), (None, 5, 7)),
        ((1, 3, 3), (1, 3, 3)),
        (" 3 X 3 ", (None, 3, 3)),
    ],
)
def test_parse_kernel(spec, parsed):
    assert query.parse_kernel(spec) == parsed


@pytest.mark.parametrize("bad", ["7by7", "1x2x3x4", "", (1, 2, 3, 4), (True, 3), 2.5])
def test_parse_kernel_rejects_nonsense(bad):
    with pytest.raises(UserError, match="bad kernel"):
        query.parse_kernel(bad)


def test_dataframes_are_plain_pandas(zoo):
    with Store(zoo) as store:
        frame = query.profiles(store, kernel="7x7")
    assert isinstance(frame, pd.DataFrame) and frame.dtypes.unique().tolist() == [np.float64]
    assert np.allclose(frame.max(axis=1), 1.0)


def test_refresh_shows_a_reader_what_was_committed_since_it_opened(store_path, bases):
    with Store(store_path, mode="a") as writer, Store(store_path) as reader:
        writer.commit_model(record("first", bases[3, 3, 3]))
        assert reader.models() == []  # a reader works on the snapshot it opened
        reader.refresh()
        assert reader.models() == [("hub", "first")]
        writer.flush()
        writer.commit_model(record("second", bases[3, 3, 3]))
        reader.refresh()
        assert reader.models() == [("hub", "first"), ("hub", "second")]


def test_a_commit_keeps_what_was_committed_not_later_changes_by_the_caller(store_path, bases):
    rec = record("m", bases[3, 3, 3])
    original = rec.layer.weight.copy()
    with Store(store_path, mode="a") as store:
        store.commit_model(rec)
        rec.layer.weight[:] = 0  # the scan engine may reuse its buffers
        rec.analyses[0].energy[:] = 0
        assert store.load_model("hub", "m").layer.weight.tobytes() == original.tobytes()
    with Store(store_path) as reader:
        got = reader.load_model("hub", "m")
    assert got.layer.weight.tobytes() == original.tobytes()
    assert got.energy[rec.analyses[0].basis_id].max() == 1.0
