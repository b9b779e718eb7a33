"""The trainer plugin through the real CLI: runs land in a real store and are queried,
correlated and fitted like scanned models; the linear CNN matches the exact theory."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from zooscan import query
from zooscan.cli import build_cli
from zooscan.store import Store


def invoke(*args: str):
    result = CliRunner().invoke(build_cli(), list(args), catch_exceptions=False)
    return result


@pytest.fixture(scope="module")
def linear_store(tmp_path_factory):
    """A fixed-sum linear CNN trained by full-batch GD on the synthetic images."""
    store = tmp_path_factory.mktemp("linear") / "zoo.h5"
    result = invoke(
        "train", "--arch", "linear", "--width", "0.125", "--steps", "120",
        "--snapshot-every", "20", "--n-train", "300", "--n-test", "100",
        "--device", "cpu", "--store", str(store), "--format", "json",
    )
    assert result.exit_code == 0, result.output
    return store, json.loads(result.stdout)[0]


def test_linear_cnn_matches_exact_gradient_descent_at_every_snapshot(linear_store):
    store, run = linear_store
    summary = run["summary"]
    assert summary["exact_r_min"] >= 0.999
    exact = [r for r in summary["exact_r"] if r is not None]
    assert len(exact) == 6 and min(exact) >= 0.999  # steps 20, 40, ..., 120
    closed = [r for r in summary["closed_form_r"] if r is not None]
    assert len(closed) == 6 and all(-1 <= r <= 1 for r in closed)
    assert len(summary["implied_s"]) == 7 and summary["implied_s"][0] == 0
    with Store(store, mode="r") as s:
        stored = s.load_run(run["run_id"])
    np.testing.assert_array_equal(stored.steps, [0, 20, 40, 60, 80, 100, 120])
    basis = summary["basis"]
    assert set(stored.profiles) >= {"energy", "energy_raw", "exact", "closed_form"}
    learned, exact_rows = stored.profiles["energy"][basis], stored.profiles["exact"][basis]
    for t in range(1, len(stored.steps)):
        assert np.corrcoef(learned[t], exact_rows[t])[0, 1] >= 0.999


def test_runs_are_models_to_ls_corr_fit_and_show(linear_store, tmp_path):
    store, run = linear_store
    listing = invoke("ls", "--source", "trainer", "--store", str(store), "--format", "json")
    assert [m["name"] for m in json.loads(listing.stdout)] == [run["run_id"]]
    fit = invoke("fit", run["run_id"], "--store", str(store), "--format", "json")
    assert fit.exit_code == 0 and json.loads(fit.stdout)[0]["r"] == pytest.approx(
        run["summary"]["fit_r"], abs=1e-9
    )
    shown = invoke("show", run["run_id"], "--store", str(store), "--format", "json")
    assert shown.exit_code == 0, shown.output
    runs = invoke("runs", "--store", str(store), "--format", "json")
    assert json.loads(runs.stdout)[0]["run_id"] == run["run_id"]
    plot = tmp_path / "run.png"
    one = invoke("runs", run["run_id"], "--store", str(store), "--plot", str(plot))
    assert one.exit_code == 0, one.output
    assert plot.stat().st_size > 1000 and "energy profile over training" in one.output
    with h5py.File(store, "r") as h5:  # the documented layout, read by plain h5py
        group = h5["runs"][next(iter(h5["runs"]))]
        assert group["snapshots"].shape[0] == 7 and "config" in group.attrs


def test_second_train_reuses_the_stored_run(linear_store):
    store, run = linear_store
    again = invoke(
        "train", "--arch", "linear", "--width", "0.125", "--steps", "120",
        "--snapshot-every", "20", "--n-train", "300", "--n-test", "100",
        "--device", "cpu", "--store", str(store),
    )
    assert again.exit_code == 0 and "stored" in again.output and run["run_id"] in again.output


def test_cnn_true_random_and_frozen_runs(tmp_path):
    store = tmp_path / "zoo.h5"
    common = ["--arch", "vgg11", "--width", "0.125", "--epochs", "1", "--n-train", "256",
              "--n-test", "64", "--batch-size", "64", "--device", "cpu", "--store", str(store),
              "--format", "json"]
    true = invoke("train", *common, "--seed", "0", "--seed", "1")
    assert true.exit_code == 0, true.output
    runs = json.loads(true.stdout)
    assert len({r["run_id"] for r in runs}) == 2
    for run in runs:
        assert 0 <= run["summary"]["test_acc"] <= 1 and run["summary"]["fit_r"] is not None
    random = invoke("train", *common, "--labels", "random")
    frozen = invoke("train", *common, "--freeze-first")
    assert random.exit_code == 0 and frozen.exit_code == 0, random.output + frozen.output
    frozen_run = json.loads(frozen.stdout)[0]
    with Store(store, mode="r") as s:
        stored = s.load_run(frozen_run["run_id"])
        np.testing.assert_array_equal(stored.snapshots[0], stored.snapshots[-1])
        table = query.runs_table(s)
        corr = query.correlations(s, source="trainer")[(3, 3, 3)]
    assert len(table) == 4 and len(corr) == 4


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dataset", "nosuch"], "unknown dataset"),
        (["--arch", "linear", "--loss", "ce"], "scalar"),
        (["--epochs", "1", "--steps", "2"], "exactly one"),
        (["--head", "linear"], "linear CNN only"),
    ],
)
def test_bad_input_is_one_line(tmp_path, args, message):
    result = CliRunner().invoke(build_cli(), ["train", "--store", str(tmp_path / "z.h5"), *args])
    assert result.exit_code != 0
    assert message in result.output and "Traceback" not in result.output


def test_reproduce_prints_the_papers_tables_on_photos_and_reuses_its_runs(tmp_path, photos):
    """`zooscan reproduce` end to end on the photo-crop task of real photographs: every
    comparison of Tab. 1–3 is measured next to the paper's number, the linear CNN
    matches its exact dynamics, and a second call trains nothing."""
    from PIL import Image

    from zooscan_builtins.trainer.reproduce import PAPER_CIFAR10

    photo_folder = tmp_path / "photos"
    photo_folder.mkdir()
    for name, img in list(photos.items())[:4]:
        pil = Image.fromarray((img * 255).astype(np.uint8)).resize((200, 150))
        pil.save(photo_folder / f"{name}.png")
    store = tmp_path / "zoo.h5"
    args = ("reproduce", "--scale", "tiny", "--dataset", f"folder:{photo_folder}",
            "--device", "cpu", "--store", str(store))
    result = invoke(*args, "--format", "json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["dataset"] == f"folder:{photo_folder}"
    rows = {row["comparison"]: row for row in report["tables"]}
    assert {name: row["paper"] for name, row in rows.items()} == PAPER_CIFAR10
    counts = {name: row["n"] for name, row in rows.items()}
    assert counts == {"seeds": 1, "widths": 1, "trained vs init": 2, "VGG vs ResNet": 2,
                      "random-label vs init": 2, "true vs random": 2, "formula fit": 2,
                      "formula fit, random init": 2}
    assert all(-1.0 <= row["ours"] <= 1.0 for row in rows.values())
    extras = {row["what"]: row["value"] for row in report["extras"]}
    assert extras["linear CNN vs exact GD dynamics, min r over snapshots"] >= 0.999
    assert 0.0 < extras["VGG-11-BN true labels: test acc"] <= 1.0
    assert 0.0 < extras["VGG-11-BN random labels: colour share of what the first layer learned"] < 1.0

    with Store(store) as opened:
        runs = {r: opened.load_run(r) for r in opened.runs()}
    assert len(runs) == 7
    documented = {"train_acc", "test_acc", "train_loss", "test_loss", "lr", "seconds", "device",
                  "images_per_second", "basis", "init_subtracted", "fit_r", "fit_s",
                  "fit_r_lambda", "fit_r_inv_lambda", "whitening_index", "snapshot_fit_r",
                  "init_fit_r", "r_trained_vs_init", "colour_share"}  # docs/store.md
    linear = {"exact_r", "exact_r_min", "exact_relative_error", "closed_form_r",
              "closed_form_s", "closed_form_r_lambda", "implied_s", "moments_s"}
    for run in runs.values():
        expected = documented | (linear if run.config["arch"] == "linear" else set())
        assert set(run.summary) == expected, run.run_id
    assert {r.config["train_images"].split(":")[0] for r in runs.values()} == {"folder"}

    table = invoke(*args)
    assert table.exit_code == 0, table.output
    assert "Tab. 1" in table.stdout and "true vs random" in table.stdout
    assert "NaN" not in table.stdout  # the single widths pair has no sd: shown as "-"
    with Store(store) as opened:
        again = {r: opened.load_run(r).created_at for r in opened.runs()}
    assert again == {r: run.created_at for r, run in runs.items()}


def test_reproduce_full_scale_on_a_cpu_warns_then_fails_in_one_line(tmp_path):
    """The full scale is for a GPU: on a CPU it says so before starting, and a dataset
    it cannot open is one line and exit 1, with nothing trained."""
    store = tmp_path / "zoo.h5"
    result = invoke("reproduce", "--scale", "full", "--device", "cpu", "--dataset",
                    f"folder:{tmp_path / 'missing'}", "--store", str(store))
    assert result.exit_code == 1
    assert "days on a CPU; it is meant for a GPU" in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "missing" in errors[0]
    with Store(store) as opened:
        assert opened.runs() == []
