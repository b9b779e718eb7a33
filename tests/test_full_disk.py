"""A scan that runs out of disk: it stops with one clear line and a non-zero exit,
keeps every model it stored, the store opens, and once space is back the same command
completes the store (equal to an uninterrupted scan's).

Two ways to run out of space: ``RLIMIT_FSIZE`` in the scan process (writes past the
limit fail with EFBIG; portable, always run), and a real 6 MB tmpfs filled up to its
last 400 kB (ENOSPC; needs root and ``mount``, skipped otherwise).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from crash_helpers import (
    MIXED_DATASET,
    contents,
    file_size_limit,
    mount_tmpfs,
    reported,
    scan_argv,
    scan_env,
    unmount,
    write_mixed_zoo,
)

from zooscan.fsck import check_store

N_SMALL, N_LARGE = 30, 6
FSIZE_LIMIT = 200_000
"""Bytes: above a small model's journal entry (~5 kB), below a large one's (~230 kB)."""


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    """30 small models, then 6 whose journal entries exceed :data:`FSIZE_LIMIT`."""
    return write_mixed_zoo(tmp_path_factory.mktemp("zoo"), N_SMALL, N_LARGE)


@pytest.fixture(scope="module")
def reference(zoo, tmp_path_factory):
    """The contents of an uninterrupted scan of the zoo (in a process of its own, like
    the scans compared with it)."""
    path = tmp_path_factory.mktemp("reference") / "zoo.h5"
    done = _scan(zoo, path)
    assert done.returncode == 0, done.stderr
    return contents(path)


def _scan(zoo: Path, store: Path, **popen) -> subprocess.CompletedProcess[str]:
    env = scan_env("files", PYTHONDONTWRITEBYTECODE="1")
    argv = scan_argv("files", [str(zoo)], store, MIXED_DATASET)
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300, **popen)


def _assert_stopped_cleanly(result, store: Path, reference, reason: str) -> list[str]:
    """Exit 1, the summary printed, one ``Error:`` line naming ``reason``, no
    traceback; every reported model intact; the store opens and fsck finds it sound."""
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    assert "the scan stopped" in errors[0] and reason in errors[0], errors[0]
    assert "free space and run the same command to resume" in errors[0]
    assert "Traceback" not in result.stderr
    stored = reported(result.stdout)
    assert stored and f"stopped: stored {len(stored)}," in result.stdout
    got = contents(store)
    for name in stored:
        assert got.models[("files", name)] == reference.models[("files", name)], name
    report = check_store(store)
    assert report.ok, [p.line() for p in report.problems]
    return stored


def test_file_size_limit_stops_the_scan_and_a_rerun_completes(zoo, reference, tmp_path):
    store = tmp_path / "zoo.h5"
    result = _scan(zoo, store, preexec_fn=file_size_limit(FSIZE_LIMIT))
    stored = _assert_stopped_cleanly(result, store, reference, "File too large")
    # no large model fits; small ones still being fetched when it stopped are left
    assert all(int(name[1:]) < N_SMALL for name in stored)
    assert len(stored) >= N_SMALL // 2

    again = _scan(zoo, store)  # the limit is gone: the same command resumes
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"skipped {len(stored)} already stored" in again.stdout
    assert contents(store) == reference


@pytest.fixture
def small_disk(tmp_path) -> Path:
    """A 6 MB tmpfs mounted for this test (skipped where mounting is not allowed)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    why_not = mount_tmpfs(mount, "6m")
    if why_not:
        pytest.skip(why_not)
    try:
        yield mount
    finally:
        unmount(mount)


def test_full_tmpfs_stops_the_scan_and_a_rerun_completes_once_space_is_freed(
    zoo, reference, small_disk
):
    filler = small_disk / "filler"  # leaves room for a few small models only
    filler.write_bytes(b"\0" * (shutil.disk_usage(small_disk).free - 400_000))
    store = small_disk / "zoo.h5"
    result = _scan(zoo, store)
    stored = _assert_stopped_cleanly(result, store, reference, "No space left on device")
    assert 0 < len(stored) < N_SMALL + N_LARGE

    filler.unlink()  # space is back
    again = _scan(zoo, store)
    assert again.returncode == 0, again.stderr[-2000:]
    assert contents(store) == reference
    assert check_store(store).ok
    assert sorted(p.name for p in small_disk.iterdir()) == [
        "zoo.h5",
        "zoo.h5.journal",
        "zoo.h5.lock",
    ]
