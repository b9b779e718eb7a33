"""`zooscan demo` runs offline and shows the paper's control: random-init profiles are
flat and mutually uncorrelated."""

from __future__ import annotations

import numpy as np
from click.testing import CliRunner

from zooscan import query
from zooscan.cli import build_cli
from zooscan.store import Store


def test_demo_quick_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    out = tmp_path / "demo"
    result = CliRunner().invoke(build_cli(), ["demo", "--quick", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "3x7x7" in result.output and "3x3x3" in result.output
    assert "no pretrained torchvision weights in the local cache" in result.output
    assert {p.name for p in out.glob("*.png")} >= {
        "profiles_3x7x7.png",
        "corr_3x7x7.png",
        "trained_profiles.png",
    }
    assert "The paper's comparisons on the trained zoo" in result.output
    assert "linear CNN vs exact GD dynamics" in result.output
    with Store(out / "zoo.h5") as store:
        runs = [store.load_run(r) for r in store.runs()]
        assert {r.config["arch"] for r in runs} == {"vgg11_bn", "resnet18", "linear"}
        assert {r.config["labels"] for r in runs} == {"true", "random"}
        linear = next(r for r in runs if r.config["arch"] == "linear")
        assert linear.summary["exact_r_min"] >= 0.999
        trained = sorted(n for _, n in store.models("trainer"))
        assert trained == sorted(r.run_id for r in runs)
        names = sorted(n for _, n in store.models("torchvision"))
        assert names == sorted(f"{a}@random-seed{s}" for a in ("resnet18", "resnet34",
                                                               "mobilenet_v2", "mnasnet0_5")
                               for s in (0, 1))
        profiles = query.profiles_by_shape(store)
        corr = query.correlations(store, kernel="7x7")[(3, 7, 7)].to_numpy()
    flat = profiles[(3, 7, 7)].to_numpy()
    assert flat.min(axis=1).min() > 0.3, "random-init profiles must be flat"
    off_diagonal = corr[~np.eye(len(corr), dtype=bool)]
    assert np.abs(off_diagonal).max() < 0.4 and abs(off_diagonal.mean()) < 0.15
    # a re-run resumes: nothing is scanned twice
    again = CliRunner().invoke(build_cli(), ["demo", "--quick", "--out", str(out)])
    assert again.exit_code == 0 and "scanning 0 models" in again.output
    with Store(out / "zoo.h5") as store:
        assert len(store.runs()) == len(runs)  # runs are reused, not trained twice
