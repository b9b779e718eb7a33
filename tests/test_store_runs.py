"""Trainer runs in the HDF5 store (``/runs``): real files, real photographs, real kills.

Run as a script, this file is also the run writer that the crash test SIGKILLs:
``python test_store_runs.py STORE N [--pause write_run|replace]`` commits the runs
``run_name(0..N-1)`` that the store lacks, replacing every third one's predecessor by
a second version, and prints ``committed <version> <run id>`` after each
:meth:`Store.commit_run` returns. ``--pause`` makes the writer's first compaction that
holds a run stop (and print ``paused <where>``) before it writes the run into the new
file (``write_run``: the model view is already in it) or before it installs the new
file (``replace``), so a kill lands exactly there.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import random
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest

from zooscan.errors import StoreError, UserError
from zooscan.records import (
    Analysis,
    FirstLayer,
    LabelledImages,
    ModelRecord,
    PatchBasis,
    Provenance,
    RunRecord,
)
from zooscan.store import SCHEMA_VERSION, Store, escape_name

THIS = Path(__file__)
STEPS = (0, 3, 7, 15, 40)
SHAPE = (8, 3, 3, 3)

# ----------------------------------------------------------------------------- runs


@functools.cache
def noise_basis(c: int = 3, k: int = 3) -> PatchBasis:
    """A deterministic basis of noise patches (the crash writer's; no image needed).
    Cached: callers must not modify it."""
    rng = np.random.default_rng(11)
    d = c * k * k
    patches = rng.standard_normal((400, d)) * np.linspace(2.0, 0.2, d)
    second = patches.T @ patches / len(patches)
    values, vectors = np.linalg.eigh(second)
    order = np.argsort(values)[::-1]
    return PatchBasis(
        "noise", c, k, k, False, vectors[:, order], values[order], patches.mean(0), second, 400, 1
    )


def _energy(weights: np.ndarray, basis: PatchBasis) -> np.ndarray:
    """DESIGN §1: ``e_i = sqrt(mean_k (w_k . u_i)^2) / max`` (all zero stays zero)."""
    proj = weights.reshape(len(weights), -1).astype(np.float64) @ basis.components
    e = np.sqrt(np.mean(proj**2, axis=0))
    return e / e.max() if e.max() > 0 else e


def make_run(
    run_id: str,
    bases: list[PatchBasis],
    *,
    seed: int = 0,
    steps: tuple[int, ...] = STEPS,
    shape: tuple[int, ...] = SHAPE,
    version: int = 1,
) -> tuple[RunRecord, ModelRecord]:
    """A run of gradient descent on the patch second moment of ``bases[0]`` (the
    dynamics of a linear CNN's first layer: ``w <- w - eta (w A - b)``), with its
    model view. Deterministic in its arguments."""
    rng = np.random.default_rng(zlib.crc32(f"{run_id}/{seed}/{version}".encode()))
    k, d = shape[0], int(np.prod(shape[1:]))
    a = bases[0].second_moment
    b = rng.standard_normal((k, d)) * 0.1
    eta = 0.5 / np.linalg.eigvalsh(a)[-1]
    w = rng.standard_normal((k, d)) * 0.05
    snapshots = []
    for step in range(steps[-1] + 1):
        if step in steps:
            snapshots.append(w.reshape(shape).astype(np.float32))
        w = w - eta * (w @ a - b)
    snaps = np.stack(snapshots)
    final = snaps[-1].copy()
    layer = FirstLayer(
        weight=final,
        module="features.0",
        padding=(1, 1),
        mean=(0.49, 0.48, 0.45),
        std=(0.25, 0.24, 0.26),
        input_size=(32, 32),
        flags={"trained": True},
        provenance=Provenance(file=f"runs/{run_id}"),
        metadata={"arch": "linear", "version": version},
    )
    profiles = {
        "energy": {b.id: np.stack([_energy(s - snaps[0], b) for s in snaps]) for b in bases},
        "energy_raw": {b.id: np.stack([_energy(s, b) for s in snaps]) for b in bases},
    }
    n_eval = 3 + version
    run = RunRecord(
        run_id=run_id,
        config={
            "arch": "linear",
            "seed": seed,
            "version": version,
            "optimizer": {"name": "sgd", "lr": float(eta), "momentum": 0.0},
            "widths": (8, 16),
        },
        layer=layer,
        steps=np.array(steps, dtype=np.int64),
        snapshots=snaps,
        metrics={
            "epoch": np.arange(n_eval),
            "train_acc": np.linspace(0.1, 0.9, n_eval),
            "test_loss": np.linspace(2.0, 1.0, n_eval),
        },
        profiles=profiles,
        summary={"train_acc": 0.9, "test_acc": 0.5 + seed / 100, "fit_r": 0.97, "per_step": [1, 2]},
        created_at=f"2025-03-0{1 + version}T10:00:{seed % 60:02d}Z",
    )
    proj = final.reshape(k, -1).astype(np.float64) @ bases[0].components
    view = ModelRecord(
        "trainer",
        run_id,
        layer,
        [Analysis(bases[0].id, proj, _energy(final, bases[0]))],
        scanned_at=run.created_at,
    )
    return run, view


def assert_same_run(got: RunRecord, want: RunRecord) -> None:
    """Everything of ``want`` came back: arrays bit for bit, JSON equal, layer fields."""
    assert got.run_id == want.run_id and got.created_at == want.created_at
    assert got.config == json.loads(json.dumps(want.config))  # tuples come back as lists
    assert got.summary == want.summary
    assert got.steps.dtype == np.int64 and np.array_equal(got.steps, want.steps)
    assert got.snapshots.dtype == np.float32
    assert got.snapshots.tobytes() == np.asarray(want.snapshots, np.float32).tobytes()
    assert got.metrics.keys() == want.metrics.keys()
    for name, values in want.metrics.items():
        assert np.array_equal(got.metrics[name], values)
    assert {k: set(v) for k, v in got.profiles.items()} == {
        k: set(v) for k, v in want.profiles.items()
    }
    for kind, by_basis in want.profiles.items():
        for bid, values in by_basis.items():
            assert got.profiles[kind][bid].tobytes() == np.asarray(values, np.float64).tobytes()
    for f in dataclasses.fields(FirstLayer):
        if f.name != "weight":
            assert getattr(got.layer, f.name) == getattr(want.layer, f.name), f.name
    assert got.layer.weight.tobytes() == np.asarray(want.layer.weight, np.float32).tobytes()


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def bases(photos) -> list[PatchBasis]:
    """Centered and uncentered 3x3 bases of real photographs (crops at 32x32)."""
    from PIL import Image

    from zooscan.patches import compute_basis

    images = np.stack(
        [
            np.asarray(Image.fromarray((img * 255).astype(np.uint8)).resize((32, 32)))
            for img in photos.values()
        ]
    ).transpose(0, 3, 1, 2)
    labelled = LabelledImages(images, np.zeros(len(images), np.int64), ("all",), "photos32")
    return [compute_basis(labelled, 3, 3, 3, centered=c) for c in (True, False)]


@pytest.fixture
def path(tmp_path) -> Path:
    return tmp_path / "zoo.h5"


# ----------------------------------------------------------------------------- round trip


def test_round_trip_through_journal_compaction_and_reopen(path, bases):
    run, view = make_run("cifar/linear seed=0 ü", bases)
    with Store(path, mode="a") as store:
        store.commit_run(run, view)
        assert store.runs() == [run.run_id] and store.has_run(run.run_id)
        assert_same_run(store.load_run(run.run_id), run)  # from the journal (overlay)
        store.flush()
        assert list(Path(f"{path}.journal").iterdir()) == []
        assert_same_run(store.load_run(run.run_id), run)  # from the main file
    with Store(path) as store:
        assert store.runs() == [run.run_id]
        assert_same_run(store.load_run(run.run_id), run)
        assert not store.has_run("other")
        got = store.load_model("trainer", run.run_id)
        assert got.layer.weight.tobytes() == view.layer.weight.tobytes()
        (analysis,) = view.analyses
        assert got.energy[analysis.basis_id].tobytes() == analysis.energy.tobytes()
        assert got.scanned_at == view.scanned_at


def test_json_is_strict_and_non_finite_numbers_become_null(path, bases):
    run, view = make_run("r", bases)
    run.summary = {"fit_r": float("nan"), "s": float("inf"), "r": np.float32(0.5), "k": [1.0]}
    run.config = {"data": Path("/x/y"), "lr": np.float64(0.1), "sizes": np.arange(2)}
    with Store(path, mode="a") as store:
        store.commit_run(run, view)
    with h5py.File(path) as f:
        text = f["runs/r"].attrs["summary"]
        assert "NaN" not in text and "Infinity" not in text
        assert json.loads(text) == {"fit_r": None, "s": None, "r": 0.5, "k": [1.0]}
    with Store(path) as store:
        assert store.load_run("r").config == {"data": "/x/y", "lr": 0.1, "sizes": [0, 1]}


def test_run_info_reads_no_big_array(path, bases):
    run, view = make_run("r1", bases)
    with Store(path, mode="a") as store:
        store.commit_run(run, view)
        pending = store.run_info("r1")
        store.flush()
        assert store.run_info("r1") == pending
    assert pending == {
        "run_id": "r1",
        "created_at": run.created_at,
        "config": json.loads(json.dumps(run.config)),
        "summary": run.summary,
        "snapshots": len(STEPS),
        "steps": list(STEPS),
        "shape": SHAPE,
        "metrics": ["epoch", "test_loss", "train_acc"],
        "profiles": {
            "energy": sorted(b.id for b in bases),
            "energy_raw": sorted(b.id for b in bases),
        },
    }


def test_unknown_runs_raise_user_errors(path, bases):
    with Store(path, mode="a") as store:
        store.commit_run(*make_run("known", bases))
        for call in (store.load_run, store.run_info):
            with pytest.raises(UserError, match="no trainer run 'nope'"):
                call("nope")
        with pytest.raises(UserError, match="no trainer run 'nope'"):
            store.run_profile("nope", "energy", bases[0].id)
        with pytest.raises(UserError, match="has no 'exact' profile"):
            store.run_profile("known", "exact", bases[0].id)


# ----------------------------------------------------------------------------- readers


def test_reader_sees_runs_while_the_writer_is_open(path, bases):
    run, view = make_run("live", bases)
    with Store(path, mode="a", compact_every=1000) as writer:
        writer.commit_run(run, view)
        with Store(path) as reader:  # journal only: the main file has no /runs yet
            assert reader.runs() == ["live"]
            assert ("trainer", "live") in reader.models()
            assert_same_run(reader.load_run("live"), run)
            with h5py.File(path) as f:
                assert "runs" not in f
            writer.flush()
            assert_same_run(reader.load_run("live"), run)  # its snapshot stays readable
            run2, view2 = make_run("live2", bases, seed=2)
            writer.commit_run(run2, view2)
            assert reader.runs() == ["live"]
            reader.refresh()  # main file (compacted) + journal
            assert reader.runs() == ["live", "live2"]
            assert_same_run(reader.load_run("live"), run)
            assert_same_run(reader.load_run("live2"), run2)
        with h5py.File(path) as f:
            assert list(f["runs"]) == ["live"]


def test_model_view_is_listed_correlated_and_tabled_like_a_scanned_model(path, bases):
    from zooscan import query

    runs = [make_run(f"run{i}", bases, seed=i) for i in range(3)]
    scanned = dataclasses.replace(runs[0][1], source="files", name="ckpt.safetensors")
    with Store(path, mode="a") as store:
        store.commit_model(scanned)
        for run, view in runs:
            store.commit_run(run, view)
    with Store(path) as store:
        assert store.models("trainer") == [("trainer", f"run{i}") for i in range(3)]
        table = query.models_table(store, source="trainer")
        assert list(table["name"]) == ["run0", "run1", "run2"]
        assert list(table["out"]) == [SHAPE[0]] * 3 and set(table["kh"]) == {3}
        ((shape, corr),) = query.correlations(store).items()
        assert shape == SHAPE[1:] and corr.attrs["basis"] == bases[0].id
        assert ("trainer", "run1") in corr.index and ("files", "ckpt.safetensors") in corr.index
        assert corr.loc[("trainer", "run0"), ("files", "ckpt.safetensors")] == pytest.approx(1.0)


# ----------------------------------------------------------------------------- replacement


def test_replacing_a_run_replaces_it_and_its_model_view(path, bases):
    old, old_view = make_run("r", bases, version=1)
    new, new_view = make_run("r", bases[1:], steps=(0, 2, 4), version=2)
    new.metrics = {"step": np.array([0, 4])}
    new.profiles = {"exact": {bases[1].id: new.profiles["energy"][bases[1].id]}}
    with Store(path, mode="a") as store:
        store.commit_run(old, old_view)
        store.commit_run(new, new_view)  # both in the journal
        assert_same_run(store.load_run("r"), new)
        store.flush()
        assert_same_run(store.load_run("r"), new)
        store.commit_run(old, old_view)  # replaces one in the main file
        store.flush()
        with h5py.File(path) as f:
            assert f.attrs["wasted_bytes"] > 0  # the replaced run's bytes are counted
        store.commit_run(new, new_view)
    with Store(path) as store:
        assert store.runs() == ["r"] and store.models() == [("trainer", "r")]
        assert_same_run(store.load_run("r"), new)
        model = store.load_model("trainer", "r")
        assert model.layer.metadata["version"] == 2 and list(model.energy) == [bases[1].id]
    with h5py.File(path) as f:
        assert sorted(f["runs/r/metrics"]) == ["step"]
        assert sorted(f["runs/r/profiles"]) == ["exact"]


def test_repack_keeps_runs(path, bases):
    run, view = make_run("r", bases)
    with Store(path, mode="a") as store:
        store.commit_run(run, view)
        store.flush()
        store.flush(repack=True)
    with Store(path) as store:
        assert_same_run(store.load_run("r"), run)


# ----------------------------------------------------------------------------- validation


def _mutations(bases):
    def weight_changed(run, view):
        view.layer = dataclasses.replace(view.layer, weight=view.layer.weight + 1)

    def snapshots_not_final(run, view):
        run.snapshots = run.snapshots.copy()
        run.snapshots[-1, 0, 0, 0, 0] += 1

    def steps_set(values):
        return lambda run, view: setattr(run, "steps", np.array(values))

    return {
        "model source": (lambda r, v: setattr(v, "source", "files"), "source 'trainer'"),
        "model name": (lambda r, v: setattr(v, "name", "other"), "named 'r'"),
        "empty id": (lambda r, v: (setattr(r, "run_id", ""), setattr(v, "name", "")), "non-empty"),
        "view weight": (weight_changed, "model view's weight differs"),
        "steps start": (steps_set([1, 3, 7, 15, 40]), "start at 0"),
        "steps order": (steps_set([0, 3, 3, 15, 40]), "increase strictly"),
        "steps float": (steps_set([0.0, 3, 7, 15, 40]), "integer array"),
        "steps count": (steps_set([0, 3, 7, 15]), r"expected \(4, 8, 3, 3, 3\)"),
        "snapshot shape": (
            lambda r, v: setattr(r, "snapshots", r.snapshots[:, :, :2]),
            r"shape \(5, 8, 2, 3, 3\)",
        ),
        "last snapshot": (snapshots_not_final, "last snapshot differs"),
        "metric lengths": (
            lambda r, v: r.metrics.update(epoch=np.arange(9)),
            "metrics of unequal lengths",
        ),
        "metric 2-D": (lambda r, v: r.metrics.update(x=np.zeros((4, 2))), "1-D numeric"),
        "metric text": (lambda r, v: r.metrics.update(x=np.array(["a"] * 4)), "1-D numeric"),
        "profile d": (
            lambda r, v: r.profiles["energy"].update({bases[0].id: np.zeros((5, 26))}),
            r"expected \(5, 27\)",
        ),
        "profile S": (
            lambda r, v: r.profiles.update(exact={bases[0].id: np.zeros((4, 27))}),
            r"'exact' on basis .* expected \(5, 27\)",
        ),
        "config": (lambda r, v: r.config.update(bad=object()), "cannot store the config"),
        "summary": (lambda r, v: setattr(r, "summary", [1]), "cannot store the summary"),
    }


def test_inconsistent_runs_are_refused_and_nothing_is_written(path, bases):
    with Store(path, mode="a") as store:
        for label, (mutate, message) in _mutations(bases).items():
            run, view = make_run("r", bases)
            mutate(run, view)
            with pytest.raises(StoreError, match=message):
                store.commit_run(run, view)
            assert not store.has_run(run.run_id), label
            assert store.models() == [], label
        assert list(Path(f"{path}.journal").iterdir()) == []
        store.commit_run(*make_run("r", bases))  # the unmutated run is accepted
    with Store(path) as reader, pytest.raises(StoreError, match="read-only"):
        reader.commit_run(*make_run("r2", bases))


# ----------------------------------------------------------------------------- layout


def test_layout_as_documented_read_with_plain_h5py(path, bases):
    run, view = make_run("org/run 1", bases)
    with Store(path, mode="a") as store:
        store.commit_run(run, view)
    with h5py.File(path, "r") as f:
        assert f.attrs["schema_version"] == SCHEMA_VERSION == 1
        g = f["runs"][escape_name("org/run 1")]
        assert escape_name("org/run 1") == "org%2Frun%201"
        assert g.attrs["run_id"] == "org/run 1" and g.attrs["created_at"] == run.created_at
        assert json.loads(g.attrs["config"])["optimizer"] == run.config["optimizer"]
        assert json.loads(g.attrs["summary"]) == run.summary
        assert g.attrs["module"] == "features.0" and list(g.attrs["stride"]) == [1, 1]
        assert np.allclose(g.attrs["std"], run.layer.std) and g.attrs["std"].dtype == np.float64
        assert json.loads(g.attrs["metadata"]) == {"arch": "linear", "version": 1}
        assert "scanned_at" not in g.attrs and "source" not in g.attrs
        assert g["steps"].dtype == np.int64 and list(g["steps"][()]) == list(STEPS)
        snaps = g["snapshots"]
        assert snaps.dtype == np.float32 and snaps.shape == (len(STEPS), *SHAPE)
        assert snaps.chunks == (1, *SHAPE) and snaps.compression == "gzip" and snaps.shuffle
        assert snaps[-1].tobytes() == run.layer.weight.tobytes()
        assert sorted(g["metrics"]) == ["epoch", "test_loss", "train_acc"]
        assert g["metrics/epoch"].dtype == np.int64 and g["metrics/train_acc"].dtype == np.float64
        assert sorted(g["profiles"]) == ["energy", "energy_raw"]
        for b in bases:
            ds = g["profiles/energy"][escape_name(b.id)]
            assert ds.attrs["basis"] == b.id and ds.dtype == np.float64
            assert ds.shape == (len(STEPS), 27)
            assert np.array_equal(ds[()], run.profiles["energy"][b.id])
        model = f["models/trainer"][escape_name("org/run 1")]
        assert model["weight"][()].tobytes() == run.layer.weight.tobytes()
        assert model.attrs["source"] == "trainer" and model.attrs["name"] == "org/run 1"


def test_a_store_without_runs_has_no_runs_group(path, bases):
    with Store(path, mode="a") as store:
        store.commit_model(dataclasses.replace(make_run("r", bases)[1], source="files"))
        assert store.runs() == []
    with h5py.File(path) as f:
        assert "runs" not in f


# ----------------------------------------------------------------------------- queries


def test_runs_table(path, bases):
    from zooscan import query

    with Store(path, mode="a") as store:
        assert list(query.runs_table(store).columns) == ["run_id", "snapshots", "created_at"]
        for i in (1, 0):
            run, view = make_run(f"run{i}", bases, seed=i)
            if i == 1:
                run.config["snapshots"] = 9  # collides with a table column
                run.summary["seed"] = 7  # collides with a config column
            store.commit_run(run, view)
        table = query.runs_table(store)
    assert list(table["run_id"]) == ["run0", "run1"]
    assert list(table.columns[:6]) == [
        "run_id",
        "arch",
        "optimizer.lr",
        "optimizer.momentum",
        "optimizer.name",
        "seed",
    ]
    assert list(table.columns[-2:]) == ["snapshots", "created_at"]
    assert list(table["snapshots"]) == [len(STEPS)] * 2
    assert list(table["test_acc"]) == pytest.approx([0.5, 0.51]) and list(table["fit_r"]) == [
        0.97,
        0.97,
    ]
    assert "per_step" not in table.columns  # lists in the summary are not scalars
    assert table.loc[1, "widths"] == [8, 16]
    assert table.loc[1, "config.snapshots"] == 9 and pd_isna(table.loc[0, "config.snapshots"])
    assert table.loc[1, "summary.seed"] == 7 and list(table["seed"]) == [0, 1]


def pd_isna(value) -> bool:
    import pandas as pd

    return bool(pd.isna(value))


def test_run_profiles_chooses_the_basis_like_profiles(path, bases):
    from zooscan import query

    centered, uncentered = bases
    run, view = make_run("r", bases)
    with Store(path, mode="a") as store:
        store.commit_run(run, view)
        frame = query.run_profiles(store, "r")
        assert frame.attrs["basis"] == centered.id  # centered before uncentered
        assert frame.attrs["dataset"] == "photos32" and frame.attrs["shape_key"] == (3, 3, 3)
        assert frame.index.name == "step" and list(frame.index) == list(STEPS)
        assert list(frame.columns) == list(range(27))
        assert np.array_equal(frame.to_numpy(), run.profiles["energy"][centered.id])
        raw = query.run_profiles(store, "r", kind="energy_raw", basis=uncentered.id)
        assert np.array_equal(raw.to_numpy(), run.profiles["energy_raw"][uncentered.id])
        assert query.run_profiles(store, "r", basis="photos32").attrs["basis"] == centered.id
        with pytest.raises(UserError, match="has no 'exact' profiles"):
            query.run_profiles(store, "r", kind="exact")
        with pytest.raises(UserError, match="no 'energy' profile on 'cifar10'"):
            query.run_profiles(store, "r", basis="cifar10")
        with pytest.raises(UserError, match="no trainer run"):
            query.run_profiles(store, "missing")


def test_run_profiles_prefers_the_stores_common_dataset(path, bases):
    from zooscan import query

    other = dataclasses.replace(noise_basis(), centered=True)
    run, view = make_run("r", [other, *bases])
    scanned = make_run("s", bases)[1]
    with Store(path, mode="a") as store:
        store.commit_run(run, view)  # its model view has a profile on "noise" only
        for i in range(2):  # two scanned models on "photos32"
            store.commit_model(dataclasses.replace(scanned, source="files", name=f"m{i}"))
        assert query.run_profiles(store, "r").attrs["basis"] == bases[0].id


# ----------------------------------------------------------------------------- crash safety

KILLS = 6
N_RUNS = 60
CRASH_SHAPE = (16, 3, 5, 5)


def crash_run(i: int, version: int) -> tuple[RunRecord, ModelRecord]:
    """The writer's run ``i`` in ``version`` (1, or 2 when replaced)."""
    return make_run(run_name(i), [noise_basis(3, 5)], seed=i, shape=CRASH_SHAPE, version=version)


def run_name(i: int) -> str:
    return f"crash/run {i:03d}"


def _writer(path: str, n: int, pause: str | None) -> None:
    if pause is not None:
        _install_pause(pause)
    with Store(path, mode="a", compact_every=2, compact_ratio=0.0) as store:
        for i in range(n):
            if not store.has_run(run_name(i)):
                store.commit_run(*crash_run(i, 1))
                print(f"committed 1 {run_name(i)}", flush=True)
            previous = run_name(i - 1)
            if i % 3 == 2 and store.run_info(previous)["config"]["version"] != 2:
                store.commit_run(*crash_run(i - 1, 2))
                print(f"committed 2 {previous}", flush=True)
    print("done", flush=True)


def _install_pause(where: str) -> None:
    """Stop the first compaction that holds a run at ``where`` until killed."""
    import zooscan.store.compaction as compaction
    import zooscan.store.store as store_module

    def pause() -> None:
        print(f"paused {where}", flush=True)
        time.sleep(60)

    if where == "write_run":
        original = compaction.write_run

        def write_run(*args, **kwargs):
            pause()
            return original(*args, **kwargs)

        compaction.write_run = write_run
    else:
        original_replace = store_module.replace_durably

        def replace_durably(tmp, target):
            with h5py.File(tmp, "r") as f:
                if "runs" in f:
                    pause()
            return original_replace(tmp, target)

        store_module.replace_durably = replace_durably


def _start(path: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(THIS), str(path), str(N_RUNS), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1"),
    )


def _kill_after(proc: subprocess.Popen[str], stop: str | None, rng: random.Random) -> list[str]:
    """Read lines until ``stop`` (or a random number of commits and a random delay),
    SIGKILL the writer, return every line it printed."""
    watchdog = threading.Timer(60, proc.kill)
    watchdog.start()
    lines: list[str] = []
    try:
        target = rng.randint(1, 6)
        while True:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            commits = sum(x.startswith("committed") for x in lines)
            if (stop is not None and line.startswith(stop)) or (stop is None and commits >= target):
                break
        if stop is None:
            time.sleep(rng.uniform(0.0, 0.05))
        proc.kill()
        out, err = proc.communicate()
    finally:
        watchdog.cancel()
    assert proc.returncode in (-9, 0), err
    return lines + out.splitlines(keepends=True)


def _check_store(path: Path, reported: dict[str, int]) -> None:
    """Every reported run is there in (at least) its reported version, and every stored
    run is whole and has exactly its own model view: never one without the other."""
    with Store(path) as store:
        runs = store.runs()
        assert [name for _, name in store.models("trainer")] == runs
        assert set(reported) <= set(runs), "a committed run was lost"
        for name in runs:
            got = store.load_run(name)
            version = got.config["version"]
            assert version >= reported.get(name, 1)
            want, view = crash_run(int(name[-3:]), version)
            assert_same_run(got, want)
            model = store.load_model("trainer", name)
            assert model.layer.metadata["version"] == version
            assert model.layer.weight.tobytes() == view.layer.weight.tobytes()


def _reported(lines: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in lines:
        if line.startswith("committed "):
            _, version, name = line.rstrip("\n").split(" ", 2)
            out[name] = max(out.get(name, 0), int(version))
    return out


def test_sigkill_never_separates_a_run_from_its_model_view(tmp_path):
    path = tmp_path / "zoo.h5"
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    reported: dict[str, int] = {}
    plan = [("write_run", "paused"), ("replace", "paused")] + [(None, None)] * KILLS
    for pause, stop in plan:
        args = ("--pause", pause) if pause else ()
        lines = _kill_after(_start(path, *args), stop, rng)
        assert not any(line.strip() == "done" for line in lines), f"finished early (seed {seed})"
        if pause:
            assert lines[-1].startswith("paused"), lines
            assert list(tmp_path.glob("zoo.h5.tmp-*")), "the kill did not land in a compaction"
        for name, version in _reported(lines).items():
            reported[name] = max(reported.get(name, 0), version)
        _check_store(path, reported)
    proc = _start(path)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    _check_store(path, reported)
    with Store(path) as store:
        assert store.runs() == sorted(run_name(i) for i in range(N_RUNS))
        versions = {name: store.run_info(name)["config"]["version"] for name in store.runs()}
    assert versions == {
        run_name(i): 2 if i % 3 == 1 and i < N_RUNS - 1 else 1 for i in range(N_RUNS)
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zoo.h5", "zoo.h5.journal", "zoo.h5.lock"]


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="run writer for the crash test")
    parser.add_argument("store")
    parser.add_argument("n", type=int)
    parser.add_argument("--pause", choices=("write_run", "replace"))
    args = parser.parse_args()
    _writer(args.store, args.n, args.pause)
