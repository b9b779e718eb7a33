"""Readers while a scan writes, a second writer, and the atomic replace that makes them
safe.

- A real ``zooscan scan`` subprocess writes a store while (1) another process runs the
  real ``ls``, ``corr`` and ``show`` commands in a loop and (2) this process reads it
  with ``Store(path, "r")``: every model they list loads in full and is bit-identical to
  its checkpoint, no command fails, and the snapshots only grow. Meanwhile a second
  ``zooscan scan`` of the same store is refused with one clear line, and the store
  ends complete and sound (``zooscan fsck``).
- A reader holding the store keeps reading its snapshot after a writer replaced the
  main file.
- h5py never opens the main file for writing: every writable open during a scan,
  compactions, a repack and an fsck repair is of a temporary file (``*.tmp-*``) or in
  memory, while a reader holds the main file open.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from crash_helpers import file_weight, reported, scan_argv, scan_env, write_files_zoo
from store_writer import SOURCE, make_record

from zooscan.cli import build_cli
from zooscan.fsck import check_store
from zooscan.store import Store

N_MODELS = 160
DATASET = "synthetic:n=30,size=32"

READER_LOOP = textwrap.dedent(
    """
    import json, random, sys, time
    from pathlib import Path
    from click.testing import CliRunner
    from zooscan.cli import build_cli

    store, stop = sys.argv[1], Path(sys.argv[2])
    cli, runner, rng = build_cli(), CliRunner(), random.Random(0)
    counts, runs, errors = [], 0, []

    def run(*args):
        result = runner.invoke(cli, [*args, "--store", store, "--format", "json"])
        if result.exit_code != 0:
            errors.append(f"{args}: exit {result.exit_code}: {result.output[-500:]!r}")
            return None
        return json.loads(result.output)

    print("ready", flush=True)
    while not Path(store).exists():
        time.sleep(0.01)
    while not stop.exists():
        rows = run("ls")
        if not rows:
            continue
        runs += 1
        counts.append(len(rows))
        for row in rng.sample(rows, min(3, len(rows))):
            shown = run("show", row["name"], "--source", row["source"])
            _, c, kh, kw = shown["layer"]["shape"] if shown else (0, 0, 0, 0)
            if shown is not None and len(shown["energy"]) != c * kh * kw:
                errors.append(f"show {row['name']}: energy of length {len(shown['energy'])}")
        for shape, group in (run("corr") or {}).items():
            size = len(group["models"])
            matrix = group["matrix"]
            diagonal = [matrix[i][i] for i in range(size)]
            if len(matrix) != size or any(abs(v - 1) > 1e-9 for v in diagonal):
                errors.append(f"corr {shape}: a {len(matrix)}-row matrix for {size} models")
    print(json.dumps({"runs": runs, "counts": counts, "errors": errors}), flush=True)
    """
)


SECOND_WRITER = textwrap.dedent(
    """
    import sys
    from zooscan import plugins
    from zooscan.cli import build_cli

    cli = build_cli()
    plugins.sources(), plugins.datasets()  # every import done before the go
    print("ready", flush=True)
    sys.stdin.readline()  # go: the first scan is writing
    cli(sys.argv[1:], prog_name="zooscan")
    """
)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    return write_files_zoo(tmp_path_factory.mktemp("zoo"), N_MODELS)


def _check_snapshot(store: Path) -> int:
    """Read every model of a new snapshot in full; return how many there are."""
    with Store(store) as reader:
        names = [name for _, name in reader.models("files")]
        for name in names:
            model = reader.load_model("files", name)
            assert model.layer.weight.tobytes() == file_weight(int(name[1:])).tobytes(), name
            (energy,) = model.energy.values()
            (projections,) = model.projections.values()
            assert energy.shape == (projections.shape[1],) and np.isfinite(energy).all()
        assert len(reader.summaries("files")) == len(names)
        return len(names)


@pytest.mark.slow
def test_readers_and_a_second_writer_while_a_scan_writes(zoo, tmp_path):
    store, stop = tmp_path / "zoo.h5", tmp_path / "stop"
    env = scan_env("files")
    readers = subprocess.Popen(
        [sys.executable, "-c", READER_LOOP, str(store), str(stop)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    second = subprocess.Popen(  # started (and imported) now, told to scan later
        [sys.executable, "-c", SECOND_WRITER, *scan_argv("files", [str(zoo)], store, DATASET)[3:]],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert readers.stdout.readline().strip() == "ready"
    assert second.stdout.readline().strip() == "ready"
    log = tmp_path / "scan.log"
    with open(log, "w") as out:
        scan = subprocess.Popen(
            scan_argv("files", [str(zoo)], store, DATASET), stdout=out, stderr=out, env=env
        )
    snapshots, refused, told = [], None, False
    try:
        while scan.poll() is None:
            if store.exists():
                snapshots.append(_check_snapshot(store))
            if not told and len(reported(log.read_text())) >= 5:
                second.stdin.write("go\n")
                second.stdin.flush()
                told = True
            time.sleep(0.01)
        assert scan.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        stop.touch()
        out, err = readers.communicate(timeout=120)
        refused = second.communicate(input="" if told else "go\n", timeout=120)
        if scan.poll() is None:
            scan.kill()
    summary = json.loads(out.strip().splitlines()[-1])
    assert readers.returncode == 0, err[-3000:]
    assert not summary["errors"], summary["errors"][:5]
    assert summary["runs"] >= 3 and len(set(summary["counts"])) >= 2, summary
    assert snapshots == sorted(snapshots), "a later snapshot had fewer models"
    assert len(set(snapshots)) >= 3, f"too few intermediate states seen: {sorted(set(snapshots))}"

    assert told, "the scan finished before the second writer could start"
    assert second.returncode == 1, refused
    assert refused[1].strip().splitlines() == [
        f"Error: store {store} is being written by another zooscan process (pid {scan.pid})"
    ]
    assert not reported(refused[0])
    assert _check_snapshot(store) == N_MODELS
    assert check_store(store).ok


def test_a_reader_keeps_its_snapshot_while_the_file_is_replaced(tmp_path):
    path = tmp_path / "zoo.h5"
    with Store(path, mode="a") as writer:
        for i in range(6):
            writer.commit_model(make_record(i))
        writer.flush()
        with Store(path) as reader:
            held = os.fstat(reader._h5.id.get_vfd_handle()).st_ino
            for i in range(6, 12):
                writer.commit_model(make_record(i))
            writer.flush(repack=True)  # a new main file replaces the one the reader holds
            assert os.stat(path).st_ino != held
            assert len(reader.models()) == 6
            for i in range(6):
                expected = make_record(i)
                got = reader.load_model(SOURCE, expected.name)
                assert got.layer.weight.tobytes() == expected.layer.weight.tobytes()
                (analysis,) = expected.analyses
                assert got.energy[analysis.basis_id].tobytes() == analysis.energy.tobytes()
            reader.refresh()
            assert len(reader.models()) == 12


class _AuditedFile(h5py.File):
    """h5py.File that records every open: (path, mode, driver)."""

    opens: list[tuple[str, str, str | None]] = []

    def __init__(self, name, mode="r", *args, **kwargs):
        type(self).opens.append((str(name), mode, kwargs.get("driver")))
        super().__init__(name, mode, *args, **kwargs)


def test_h5py_never_opens_the_main_file_for_writing(zoo, tmp_path, monkeypatch):
    path = tmp_path / "zoo.h5"
    monkeypatch.setattr(h5py, "File", _AuditedFile)
    monkeypatch.setattr(_AuditedFile, "opens", [])
    monkeypatch.setenv("ZOOSCAN_LOAD_PLUGINS", "files,image_datasets")
    with Store(path, mode="a") as writer:
        writer.commit_model(make_record(0))
    with Store(path) as reader:  # holds the main file open (an HDF5 file lock) throughout
        args = scan_argv("files", [str(zoo)], path, DATASET)[3:]
        result = CliRunner().invoke(build_cli(), args, catch_exceptions=False)
        assert result.exit_code == 0, result.output[-2000:]
        with Store(path, mode="a", compact_every=8, compact_ratio=0.0) as writer:
            for i in range(1, 20):
                writer.commit_model(make_record(i))
            writer.flush(repack=True)
        with h5py.File(path, "r") as raw:  # damage one model, so fsck rewrites the file
            link = f"models/files/{next(iter(raw['models/files']))}/weight"
        _flip_data_byte(path, link)
        assert check_store(path, repair=True).ok
        assert reader.models()[0] == (SOURCE, make_record(0).name)
    writable = [(p, m, d) for p, m, d in _AuditedFile.opens if m != "r"]
    assert len(writable) >= 5
    for name, mode, driver in writable:
        assert driver == "core" or ".tmp-" in Path(name).name, (name, mode)
    assert all(Path(name) != path or mode == "r" for name, mode, _ in _AuditedFile.opens)


def _flip_data_byte(path: Path, link: str) -> None:
    """Flip one bit of a dataset's data in place (as bit rot would)."""
    with h5py.File(path, "r") as raw:
        offset = raw[link].id.get_offset()
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0x01]))


def test_readers_in_threads_during_commits(tmp_path):
    """Threads of one process reading snapshots while the writer commits and compacts."""
    path = tmp_path / "zoo.h5"
    errors: list[BaseException] = []
    done = threading.Event()

    def read() -> None:
        try:
            while not done.is_set():
                with Store(path) as reader:
                    for key in reader.models():
                        reader.load_model(*key)
        except BaseException as exc:  # reported below
            errors.append(exc)

    with Store(path, mode="a", compact_every=4, compact_ratio=0.0) as writer:
        threads = [threading.Thread(target=read) for _ in range(2)]
        for thread in threads:
            thread.start()
        for i in range(40):
            writer.commit_model(make_record(i))
        done.set()
        for thread in threads:
            thread.join(timeout=60)
    assert not errors, errors[:3]
