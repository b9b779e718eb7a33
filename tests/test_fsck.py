"""``zooscan fsck`` on real stores damaged the ways stores get damaged: bits flipped in a
weight, an energy profile or a basis; a truncated main file; a dataset deleted and
attributes broken with h5py; a stale temporary; a damaged or left-over journal entry.
Each is reported in one line; ``--repair`` fixes what it can without deleting good
data (the previous main file is kept), and a plain re-scan then restores the store
to what an undamaged scan holds.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from crash_helpers import contents
from safetensors.numpy import save_file
from store_writer import make_record
from test_store_runs import make_run, noise_basis

from zooscan import fsck
from zooscan.cli import build_cli
from zooscan.errors import StoreError
from zooscan.fsck import check_store, provenance_status
from zooscan.store import DAMAGED, Store, escape_name

DATASET = "synthetic:n=20,size=32"
N_MODELS = 6


def _weight(i: int) -> np.ndarray:
    shape = (8, 3, 3, 3) if i % 2 else (6, 3, 5, 5)
    return np.random.default_rng(900 + i).standard_normal(shape).astype(np.float32)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("zoo")
    for i in range(N_MODELS):
        save_file({"conv.weight": _weight(i)}, str(root / f"m{i}.safetensors"))
    return root


def _cli(*args: str):
    return CliRunner().invoke(build_cli(), list(args), catch_exceptions=False)


def _scan(zoo: Path, store: Path):
    result = _cli("scan", "--source", "files", str(zoo), "--store", str(store), "-d", DATASET)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def pristine(zoo, tmp_path_factory) -> Path:
    """A scanned store (6 models, 2 bases) plus one trainer run; never modified."""
    path = tmp_path_factory.mktemp("pristine") / "zoo.h5"
    _scan(zoo, path)
    with Store(path, mode="a") as store:
        store.put_basis(noise_basis())
        store.commit_run(*make_run("run-1", [noise_basis()]))
    return path


@pytest.fixture
def store(pristine, tmp_path, monkeypatch) -> Path:
    """A fresh copy of the pristine store to damage (fsck gives up on an object that
    hangs HDF5 after 2 s instead of 30)."""
    monkeypatch.setattr(fsck, "STALL_SECONDS", 2.0)
    monkeypatch.setenv("ZOOSCAN_LOAD_PLUGINS", "files,image_datasets,trainer")
    path = tmp_path / "zoo.h5"
    shutil.copyfile(pristine, path)
    return path


def _model_path(name: str) -> str:
    return f"models/files/{escape_name(name)}"


def _flip(path: Path, dataset: str, at: int = 3) -> None:
    """Flip one bit of ``dataset``'s stored bytes in place (as bit rot would)."""
    with h5py.File(path, "r") as h5:
        ds = h5[dataset]
        offset = ds.id.get_offset()
        if offset is None:  # chunked: the first chunk
            offset = ds.id.get_chunk_info(0).byte_offset
    with open(path, "r+b") as fh:
        fh.seek(offset + at)
        byte = fh.read(1)
        fh.seek(offset + at)
        fh.write(bytes([byte[0] ^ 0x04]))


def _repair_and_rescan(zoo: Path, store: Path, pristine: Path) -> None:
    """``fsck --repair`` leaves a sound store, and a plain re-scan (no --retry-failed)
    brings it back to the pristine contents."""
    result = _cli("fsck", "--store", str(store), "--repair")
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] in ("clean", "clean after repair")
    _scan(zoo, store)
    assert contents(store) == contents(pristine)
    assert _cli("fsck", "--store", str(store)).exit_code == 0


def test_a_sound_store_is_clean(store):
    report = check_store(store)
    assert report.ok and not report.problems, [p.line() for p in report.problems]
    assert report.checked["models"] == N_MODELS + 1  # + the run's model view
    assert report.checked["bases"] == 3 and report.checked["runs"] == 1
    assert report.checked["provenance_verified"] == N_MODELS  # float32 safetensors
    result = _cli("fsck", "--store", str(store))
    assert result.exit_code == 0
    assert f"{N_MODELS + 1} models, 3 bases, 1 runs" in result.output
    assert result.output.strip().endswith("clean")
    data = json.loads(_cli("fsck", "--store", str(store), "--format", "json").output)
    assert data["ok"] and data["problems"] == [] and data["checked"]["datasets"] > 30


def test_bit_flip_in_a_weight(zoo, store, pristine):
    _flip(store, _model_path("m2") + "/weight")
    result = _cli("fsck", "--store", str(store))
    assert result.exit_code == 1
    problems = [line for line in result.output.splitlines() if line.startswith("problem:")]
    assert problems == [
        "problem: model files:m2: weight does not match its sha256 (the bytes changed after "
        "writing) [--repair: removed, recorded as a failure: the next scan fetches it]"
    ]
    report = check_store(store, repair=True)
    assert report.ok and report.backup is not None and report.backup.exists()
    assert contents(report.backup) != contents(pristine)  # the damaged file is kept aside
    with Store(store) as s:
        assert not s.has_model("files", "m2")
        (failure,) = s.failures()
        assert failure["error_class"] == DAMAGED and "sha256" in failure["message"]
    _repair_and_rescan(zoo, store, pristine)


def test_a_store_without_digests_is_checked_against_provenance(store):
    with h5py.File(store, "a") as h5:  # as written before datasets carried digests
        for name in ("m1", "m4"):
            del h5[_model_path(name) + "/weight"].attrs["sha256"]
    assert check_store(store).ok
    _flip(store, _model_path("m4") + "/weight")
    (problem,) = check_store(store).problems
    assert problem.line() == (
        "model files:m4: weight does not match the sha256 of the checkpoint tensor it came from"
    )


@pytest.mark.parametrize("kind", ["energy", "projections"])
def test_bit_flip_in_an_analysis(zoo, store, pristine, kind):
    with h5py.File(store, "r") as h5:
        (link,) = h5[_model_path("m3") + f"/{kind}"]
    _flip(store, _model_path("m3") + f"/{kind}/{link}", at=9)
    (problem,) = check_store(store).problems
    assert problem.where == "model files:m3" and "does not match its sha256" in problem.message
    _repair_and_rescan(zoo, store, pristine)


def test_bit_flip_in_a_basis_drops_it_with_its_models(zoo, store, pristine):
    with Store(store) as s:
        bid = next(b for b in s.bases() if "3x5x5" in b)
    _flip(store, f"bases/{escape_name(bid)}/components", at=100)
    report = check_store(store, repair=True)
    assert [p.where for p in report.problems] == [f"basis {bid}"]
    with Store(store) as s:
        assert bid not in s.bases()
        dropped = {f["name"] for f in s.failures()}
    assert dropped == {"m0", "m2", "m4"}  # the 5x5 models, analysed on it
    _repair_and_rescan(zoo, store, pristine)


def test_truncated_main_file_is_salvaged(zoo, store, pristine):
    size = store.stat().st_size
    os.truncate(store, int(size * 0.8))
    with pytest.raises(StoreError, match="corrupt or unreadable"):
        Store(store)
    result = _cli("fsck", "--store", str(store))
    assert result.exit_code == 1
    assert "problem: file zoo.h5: HDF5 cannot open it (" in result.output
    report = check_store(store, repair=True)
    assert report.ok, [p.line() for p in report.remaining]
    assert report.backup.stat().st_size == int(size * 0.8)  # the original, kept
    with Store(store) as s:  # opens again; what was lost is to be fetched again
        assert len(s.models("files")) + len(s.failures("files")) <= N_MODELS
    _scan(zoo, store)
    with Store(store) as s:
        assert sorted(n for _, n in s.models("files")) == [f"m{i}" for i in range(N_MODELS)]
    got, want = contents(store), contents(pristine)
    files = {k: v for k, v in want.models.items() if k[0] == "files"}
    assert {k: v for k, v in got.models.items() if k[0] == "files"} == files


def test_deleted_datasets_and_broken_attributes(zoo, store, pristine):
    with h5py.File(store, "a") as h5:
        del h5[_model_path("m0") + "/weight"]
        (link,) = h5[_model_path("m1") + "/energy"]
        del h5[_model_path("m1") + f"/energy/{link}"]
        h5[_model_path("m5")].attrs["groups"] = "one"
        h5[_model_path("m3")].attrs["flags"] = "{not json"
    report = check_store(store)
    lines = sorted(p.line() for p in report.problems)
    assert lines[0] == "model files:m0: weight is not a dataset"
    assert (
        lines[1].startswith("model files:m1: basis ") and "energy without projections" in lines[1]
    )
    assert lines[2].startswith("model files:m3: attributes cannot be decoded")
    assert lines[3].startswith("model files:m5: attributes cannot be decoded")
    assert len(lines) == 4
    _repair_and_rescan(zoo, store, pristine)


def test_broken_root_attributes(store):
    original = store.read_bytes()
    with h5py.File(store, "a") as h5:
        h5.attrs["journal_seq"] = "seven"
    with pytest.raises(StoreError, match="invalid journal_seq attribute 'seven'; run zooscan fsck"):
        Store(store)
    report = check_store(store, repair=True)
    assert [p.line() for p in report.problems] == ["root: journal_seq attribute is 'seven'"]
    assert report.ok
    with Store(store) as s:
        assert len(s.models()) == N_MODELS + 1

    store.write_bytes(original)
    with h5py.File(store, "a") as h5:
        del h5.attrs["format"]
    damaged = store.read_bytes()
    result = _cli("fsck", "--store", str(store), "--repair")
    assert result.exit_code == 1
    assert "problem: root: format attribute is None, not 'zooscan'" in result.output
    assert "[cannot be repaired safely]" in result.output
    assert store.read_bytes() == damaged  # not a store we know: never touched


def test_stale_temporaries(store):
    (store.parent / "zoo.h5.tmp-99999").write_bytes(b"half a file")
    journal = store.parent / "zoo.h5.journal"
    journal.mkdir(exist_ok=True)
    (journal / ".tmp-0000000000000009-99999").write_bytes(b"half an entry")
    report = check_store(store)
    assert sorted(p.line() for p in report.problems) == [
        "file zoo.h5.journal/.tmp-0000000000000009-99999: stale temporary left by a killed "
        "writer (13 bytes)",
        "file zoo.h5.tmp-99999: stale temporary left by a killed writer (11 bytes)",
    ]
    report = check_store(store, repair=True)
    assert report.ok and all(p.repaired for p in report.problems) and report.backup is None
    assert sorted(p.name for p in store.parent.iterdir()) == [
        "zoo.h5",
        "zoo.h5.journal",
        "zoo.h5.lock",
    ]


def test_damaged_and_left_over_journal_entries(tmp_path):
    """The journal as a killed writer leaves it (entries above ``journal_seq``), one of
    them damaged, plus one entry the main file already holds."""
    path, saved = tmp_path / "zoo.h5", tmp_path / "saved"
    with Store(path, mode="a") as writer:
        writer.commit_model(make_record(0))
    shutil.copyfile(path, saved)  # the main file before the next commits
    with Store(path, mode="a", compact_every=1000) as writer:
        for i in (1, 2, 3):
            writer.commit_model(make_record(i))
        entries = {p.name: p.read_bytes() for p in (tmp_path / "zoo.h5.journal").iterdir()}
    shutil.copyfile(saved, path)
    for name, data in entries.items():
        (tmp_path / "zoo.h5.journal" / name).write_bytes(data)
    with h5py.File(path, "r") as h5:
        base = int(h5.attrs["journal_seq"])
    first, damaged, last = sorted(entries)
    raw = bytearray(entries[damaged])
    raw[len(raw) // 2] ^= 0xFF
    (tmp_path / "zoo.h5.journal" / damaged).write_bytes(bytes(raw))
    (tmp_path / "zoo.h5.journal" / f"{base:016d}.rec").write_bytes(entries[first])

    report = check_store(path)
    assert sorted(p.line() for p in report.problems) == [
        f"journal entry {base}: already folded into the main file (left by an interrupted "
        "compaction)",
        f"journal entry {int(damaged[:16])}: damaged (checksum mismatch); its commit is lost",
    ]
    assert any("2 journal entries are not folded" in note for note in report.notes)
    report = check_store(path, repair=True)
    assert report.ok and all(p.repaired for p in report.problems)
    assert any("set aside earlier (*.rec.corrupt" in note for note in report.notes)
    with Store(path) as s:
        assert {n for _, n in s.models()} == {make_record(i).name for i in (0, 1, 3)}


def test_a_damaged_run_is_reported_never_removed(store):
    _flip(store, "runs/run-1/snapshots", at=40)
    report = check_store(store, repair=True)
    assert not report.ok
    (problem,) = report.remaining
    assert problem.where == "run run-1" and problem.repair is None
    with Store(store) as s:
        assert s.runs() == ["run-1"]


def test_repair_is_refused_while_a_writer_runs(store):
    with Store(store, mode="a"):
        result = _cli("fsck", "--store", str(store), "--repair")
        assert result.exit_code == 1
        assert result.output.strip().splitlines() == [
            f"Error: store {store} is being written by another zooscan process (pid {os.getpid()})"
        ]
        report = check_store(store)  # checking works, as a reader
        assert report.ok and any("a writer (pid" in note for note in report.notes)


def test_provenance_status_for_the_dtypes_a_float32_weight_holds_exactly():
    import hashlib

    w = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)
    half = w.astype(np.float16)
    bf16 = (w.view(np.uint32) >> 16).astype(np.uint16)
    sha = lambda a: hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()  # noqa: E731
    assert provenance_status(w, sha(w), "conv.weight", {}) == "verified"
    assert provenance_status(half.astype(np.float32), sha(half), "k", {}) == "verified"
    widened = (bf16.astype(np.uint32) << 16).view(np.float32)
    assert provenance_status(widened, sha(bf16), "k", {}) == "verified"
    assert provenance_status(w, sha(w.astype(np.float64)), "k", {}) == "mismatch"
    assert provenance_status(w, sha(w), "a.weight+b.weight", {}) == "not comparable"
    assert provenance_status(w, sha(w), "k", {"fused_branches": 2}) == "not comparable"
    assert provenance_status(w, None, "k", {}) == "not comparable"
