"""The real click CLI end to end: scan → ls → show → corr → fit, resume, failures,
bad input. Uses the third-party Gabor source (tests/plugin_example) and a folder of
real photographs as the patch dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from zooscan.cli import build_cli
from zooscan.store import Store


def run(*args: str, ok: bool = True):
    result = CliRunner().invoke(build_cli(), list(args), catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    return result


@pytest.fixture(scope="module")
def scanned(tmp_path_factory, photo_folder) -> tuple[Path, str]:
    """A store with the Gabor zoo scanned on the photo basis (one model fails on purpose)."""
    store = tmp_path_factory.mktemp("cli") / "zoo.h5"
    dataset = f"folder:{photo_folder}"
    result = run(
        "scan",
        "--source",
        "gabor",
        "--store",
        str(store),
        "--dataset",
        dataset,
        "--workers",
        "3",
        ok=False,
    )
    assert result.exit_code == 1
    assert "1 of 9 models failed" in result.output
    assert "gabor-broken" in result.output
    return store, dataset


def test_scan_stores_models_and_records_the_failure(scanned):
    store, _ = scanned
    with Store(store) as s:
        names = [n for _, n in s.models("gabor")]
        failures = s.failures("gabor")
    assert len(names) == 8 and "gabor-broken" not in names
    assert [f["name"] for f in failures] == ["gabor-broken"]
    assert failures[0]["error_class"] == "ModelError"
    assert "broken on purpose" in failures[0]["message"]


def test_rescan_resumes_and_skips_failures(scanned):
    store, dataset = scanned
    result = run(
        "scan", "--source", "gabor", "--store", str(store), "--dataset", dataset, "--format", "json"
    )
    summary = json.loads(result.output)
    assert summary["stored"] == 0
    assert summary["skipped_stored"] == 8
    assert summary["skipped_failed"] == 1


def test_retry_failed_retries_and_counts_attempts(scanned):
    store, dataset = scanned
    result = run(
        "scan",
        "--source",
        "gabor",
        "gabor-broken",
        "--store",
        str(store),
        "--dataset",
        dataset,
        "--retry-failed",
        ok=False,
    )
    assert result.exit_code == 1 and "1 of 1 models failed" in result.output
    failures = json.loads(run("ls", "--failures", "--store", str(store), "--format", "json").output)
    assert failures[0]["attempts"] == 2


def test_dry_run_fetches_nothing(scanned, tmp_path):
    store, dataset = scanned
    report = json.loads(
        run(
            "scan", "--source", "gabor", "--store", str(store), "--dry-run", "--format", "json"
        ).output
    )
    assert report["to_scan"] == [] and report["already_stored"] == 8
    fresh = tmp_path / "new.h5"
    report = json.loads(
        run(
            "scan",
            "--source",
            "gabor",
            "gabor-3x3-*",
            "--store",
            str(fresh),
            "--dry-run",
            "--format",
            "json",
        ).output
    )
    assert report["to_scan"] == ["gabor-3x3-low", "gabor-3x3-high"]
    assert not fresh.exists()


def test_ls_formats(scanned):
    store, _ = scanned
    rows = json.loads(run("ls", "--store", str(store), "--format", "json").output)
    assert len(rows) == 8
    shapes = {(r["C"], r["kh"], r["kw"]) for r in rows}
    assert shapes == {(3, 3, 3), (3, 5, 5), (3, 7, 7), (3, 11, 11)}
    only7 = json.loads(
        run("ls", "--store", str(store), "--kernel", "7x7", "--format", "json").output
    )
    assert sorted(r["name"] for r in only7) == ["gabor-7x7-high", "gabor-7x7-low"]
    csv = run("ls", "--store", str(store), "--format", "csv").output
    assert csv.splitlines()[0].startswith("source,name") and len(csv.splitlines()) == 9
    assert "gabor-11x11-high" in run("ls", "--store", str(store)).output


def test_show_json_is_complete(scanned):
    store, _ = scanned
    data = json.loads(
        run("show", "gabor-7x7-low", "--store", str(store), "--format", "json").output
    )
    assert data["source"] == "gabor" and data["name"] == "gabor-7x7-low"
    assert data["layer"]["shape"] == [16, 3, 7, 7]
    assert data["layer"]["std"] == [0.25, 0.25, 0.25]
    assert len(data["energy"]) == 147 and max(data["energy"]) == pytest.approx(1.0)
    assert len(data["basis"]["eigenvalues"]) == 147
    eig = np.array(data["basis"]["eigenvalues"])
    assert np.all(np.diff(eig) <= 1e-12)
    assert data["provenance"]["repo"] == "zooscan-example-gabor"
    assert set(data["fit"]) >= {"s", "r", "r_lambda", "r_inv_lambda", "whitening_index"}


def test_energy_profiles_separate_low_and_high_frequency_banks(scanned):
    """A real property of the analysis: high-frequency Gabors put their energy on later
    (higher-frequency) principal components than low-frequency ones."""
    store, _ = scanned

    def centroid(name):
        e = np.array(
            json.loads(run("show", name, "--store", str(store), "--format", "json").output)[
                "energy"
            ]
        )
        return float((np.arange(len(e)) * e**2).sum() / (e**2).sum())

    for k in (5, 7, 11):
        assert centroid(f"gabor-{k}x{k}-high") > centroid(f"gabor-{k}x{k}-low") + 1


def test_show_table_and_plot(scanned, tmp_path):
    store, _ = scanned
    png = tmp_path / "gabor.png"
    result = run("show", "gabor:gabor-5x5-high", "--store", str(store), "--plot", str(png))
    assert "energy" in result.output and "fit" in result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_corr_formats_and_heatmap(scanned, tmp_path):
    store, _ = scanned
    groups = json.loads(run("corr", "--store", str(store), "--format", "json").output)
    assert set(groups) == {"3x3x3", "3x5x5", "3x7x7", "3x11x11"}
    matrix = np.array(groups["3x7x7"]["matrix"])
    assert matrix.shape == (2, 2)
    assert np.allclose(np.diag(matrix), 1) and np.allclose(matrix, matrix.T)
    csv = run("corr", "--store", str(store), "--kernel", "3x3", "--format", "csv").output
    assert csv.splitlines()[0] == "shape,a,b,r" and len(csv.splitlines()) == 5
    png = tmp_path / "heat.png"
    run("corr", "--store", str(store), "--kernel", "7x7", "--plot", str(png))
    assert png.stat().st_size > 1000
    result = run("corr", "--store", str(store), "--plot", str(tmp_path / "x.png"), ok=False)
    assert result.exit_code == 1 and "--kernel" in result.output


def test_fit_all(scanned):
    store, _ = scanned
    rows = json.loads(run("fit", "--all", "--store", str(store), "--format", "json").output)
    assert len(rows) == 8
    for row in rows:
        assert -1 <= row["r"] <= 1 and row["s"] > 0
        assert row["r"] >= max(row["r_lambda"], row["r_inv_lambda"]) - 1e-9


@pytest.mark.parametrize(
    "args, message",
    [
        (["scan", "--source", "no-such-source"], "unknown source 'no-such-source'"),
        (["scan", "--source", "gabor", "nothing-matches-*"], "no model matching"),
        (["scan", "--source", "gabor", "--dataset", "nope"], "unknown dataset 'nope'"),
        (["show", "not-a-model"], "no model 'not-a-model'"),
        (["fit"], "name MODELs or use --all"),
        (["ls", "--kernel", "7by7"], "expected KxK"),
        (["scan", "--source", "gabor", "-o", "novalue"], "expected KEY=VALUE"),
    ],
)
def test_bad_input_gives_one_clear_line(scanned, args, message):
    store, _ = scanned
    result = run(*args, "--store", str(store), ok=False)
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output


def test_missing_store_and_non_hdf5_store(tmp_path):
    result = run("ls", "--store", str(tmp_path / "absent.h5"), ok=False)
    assert result.exit_code == 1 and "no store" in result.output.lower()
    text = tmp_path / "notes.h5"
    text.write_text("not an HDF5 file")
    for args in (["ls"], ["scan", "--source", "gabor"]):
        result = run(*args, "--store", str(text), ok=False)
        assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert text.read_text() == "not an HDF5 file"
    result = run("ls", "--store", str(tmp_path), ok=False)
    assert result.exit_code != 0 and "Traceback" not in result.output


def test_bases_are_cached_in_the_store_and_reused(tmp_path, photo_folder):
    store = str(tmp_path / "zoo.h5")
    dataset = f"folder:{photo_folder}"
    scan = ("scan", "--source", "gabor", "--store", store, "--dataset", dataset, "--format", "json")
    first = json.loads(run(*scan, "gabor-7x7-low").output)
    assert len(first["bases_computed"]) == 1 and first["bases_computed"][0].endswith("~3x7x7~centered")
    second = json.loads(run(*scan, "gabor-7x7-high").output)
    assert second["stored"] == 1 and second["bases_computed"] == []
    uncentered = json.loads(run(*scan, "gabor-5x5-low", "--uncentered").output)
    assert uncentered["bases_computed"][0].endswith("~3x5x5~uncentered")
    with Store(store) as s:
        assert len(s.bases()) == 2
        low, high = s.load_model("gabor", "gabor-7x7-low"), s.load_model("gabor", "gabor-7x7-high")
        assert list(low.energy) == list(high.energy) == first["bases_computed"]
