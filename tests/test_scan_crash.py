"""SIGKILL a running `zooscan scan` at random moments: the store always opens, every
model the scan reported as stored is intact, and a re-run completes the rest."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from zooscan.store import Store

N_MODELS = 400
KILLS = 10


def weight_for(i: int) -> np.ndarray:
    shape = [(16, 3, 3, 3), (8, 3, 5, 5), (12, 3, 7, 7)][i % 3]
    return np.random.default_rng(i).standard_normal(shape).astype(np.float32)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ckpts")
    for i in range(N_MODELS):
        save_file(
            {
                "stem.weight": weight_for(i),
                "stem.bias": np.zeros(weight_for(i).shape[0], np.float32),
            },
            str(root / f"m{i:03d}.safetensors"),
        )
    return root


def scan_command(store: Path, root: Path, photo_folder: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "zooscan",
        "scan",
        "--source",
        "files",
        str(root),
        "--store",
        str(store),
        "--dataset",
        f"folder:{photo_folder}",
        "--workers",
        "2",
        "--verbose",
    ]


def reported_in(output: str) -> set[str]:
    """Models the scan printed as stored (`scan --verbose` prints after each commit)."""
    return set(re.findall(r"^stored (m\d{3})$", output, flags=re.MULTILINE))


@pytest.mark.slow
def test_sigkill_during_scan_loses_nothing_committed(tmp_path, checkpoints, photo_folder):
    store = tmp_path / "zoo.h5"
    rng = random.Random(1234)
    reported: set[str] = set()
    killed = 0
    env = dict(os.environ)
    for trial in range(KILLS):
        log = tmp_path / f"scan-{trial}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(
                scan_command(store, checkpoints, photo_folder),
                stdout=out,
                stderr=subprocess.DEVNULL,
                env=env,
            )
            # kill at a random moment: every third trial during start-up or basis
            # computation (a random time), the others after a random number of commits
            if trial % 3 == 0:
                deadline, after_commits = time.monotonic() + rng.uniform(0.5, 3.0), None
            else:
                deadline, after_commits = time.monotonic() + 120, rng.randint(1, 60)
            while proc.poll() is None and time.monotonic() < deadline:
                if after_commits and len(reported_in(log.read_text())) >= after_commits:
                    break
                time.sleep(0.01)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                killed += 1
            proc.wait()
        reported |= reported_in(log.read_text())
        if not store.exists():
            assert not reported, "models were reported stored but there is no store"
            continue
        with Store(store) as s:  # always opens
            present = {n for _, n in s.models("files")}
            missing = reported - present
            assert not missing, f"trial {trial}: reported stored but lost: {sorted(missing)}"
            for name in reported:
                stored = s.load_model("files", name)
                np.testing.assert_array_equal(stored.layer.weight, weight_for(int(name[1:])))
    assert killed >= KILLS - 2, "most trials must be killed while the scan is running"
    assert 0 < len(reported) < N_MODELS, "the kills must land while models are being committed"
    # the re-run completes the rest
    result = subprocess.run(
        scan_command(store, checkpoints, photo_folder),
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    with Store(store) as s:
        names = [n for _, n in s.models("files")]
        assert sorted(names) == [f"m{i:03d}" for i in range(N_MODELS)]
        for name in names:
            np.testing.assert_array_equal(
                s.load_model("files", name).layer.weight, weight_for(int(name[1:]))
            )
            assert s.load_model("files", name).energy, f"{name} has no energy profile"
