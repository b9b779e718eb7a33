"""Acceptance checks as a new user would run them, through the real CLI:

* local `.safetensors` first layers with sidecar JSON (several kernel sizes, BGR and
  RGB, various mean/std) scanned on a folder of real photographs, their stored energy
  profiles checked against an independent NumPy implementation of DESIGN §1;
* `zooscan scan --source torchvision resnet18` against a pre-seeded TORCH_HOME cache,
  offline: the stored filter equals the checkpoint's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import save_file

from zooscan.cli import build_cli
from zooscan.store import Store

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


def run(*args: str) -> str:
    result = CliRunner().invoke(build_cli(), list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


# ------------------------------------------------------- an independent implementation


def reference_basis(folder: Path, kh: int, kw: int) -> tuple[np.ndarray, np.ndarray]:
    """Centered patch covariance of every stride-1 valid (c, kh, kw) patch of every
    image, eigendecomposed: (eigenvalues desc, components as columns)."""
    d = 3 * kh * kw
    total, outer, count = np.zeros(d), np.zeros((d, d)), 0
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        image = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255.0
        chw = image.transpose(2, 0, 1)
        windows = np.lib.stride_tricks.sliding_window_view(chw, (3, kh, kw))
        patches = windows.reshape(-1, d)  # (c, kh, kw) order
        total += patches.sum(axis=0)
        outer += patches.T @ patches
        count += len(patches)
    mean = total / count
    cov = outer / count - np.outer(mean, mean)
    values, vectors = np.linalg.eigh(cov)
    order = np.argsort(values)[::-1]
    return values[order], vectors[:, order]


def reference_profile(weight, mean, std, order, components) -> np.ndarray:
    """DESIGN §1: filters into RGB [0,1] pixel space, RMS projection, / max."""
    w = np.asarray(weight, dtype=np.float64) / np.asarray(std)[None, :, None, None]
    if order == "BGR":
        w = w[:, ::-1]
    coefficients = w.reshape(len(w), -1) @ components
    energy = np.sqrt((coefficients**2).mean(axis=0))
    return energy / energy.max()


# ------------------------------------------------------- first layers to scan


def structured_bank(out: int, k: int, seed: int) -> np.ndarray:
    """A first layer with structure like a trained one: oriented edges, blobs and
    colour-opponent filters at several frequencies, plus a little noise."""
    rng = np.random.default_rng(seed)
    ax = np.arange(k) - (k - 1) / 2
    yy, xx = np.meshgrid(ax, ax, indexing="ij")
    filters = []
    for i in range(out):
        theta = rng.uniform(0, np.pi)
        freq = rng.uniform(0.5, 2.5) / k
        sigma = rng.uniform(0.25, 0.6) * k
        g = np.exp(-(xx**2 + yy**2) / (2 * sigma**2)) * np.cos(
            2 * np.pi * freq * (xx * np.cos(theta) + yy * np.sin(theta)) + rng.uniform(0, np.pi)
        )
        colour = rng.standard_normal(3) if i % 3 == 0 else np.ones(3)
        filters.append(colour[:, None, None] * g[None] + 0.05 * rng.standard_normal((3, k, k)))
    return np.asarray(filters, dtype=np.float32)


CASES = [
    # name, kernel, channel order, mean, std
    ("rgb_imagenet_7x7", 7, "RGB", [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ("bgr_caffe_7x7", 7, "BGR", [0.406, 0.458, 0.485], [1 / 255, 1 / 255, 1 / 255]),
    ("rgb_half_3x3", 3, "RGB", [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
    ("bgr_odd_5x5", 5, "BGR", [0.2, 0.4, 0.6], [0.1, 0.3, 0.9]),
    ("nested/rgb_clip_11x11", 11, "RGB", [0.481, 0.458, 0.408], [0.269, 0.261, 0.276]),
]


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trained")
    for i, (name, k, order, mean, std) in enumerate(CASES):
        path = root / f"{name}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        weight = torch.from_numpy(structured_bank(24, k, seed=i))
        save_file({"pos_embed": torch.zeros(1, 4, 8), "stem.conv.weight": weight,
                   "stem.bn.running_var": torch.ones(24)}, str(path))
        Path(f"{path}.json").write_text(json.dumps({"mean": mean, "std": std,
                                                     "channel_order": order}))
    return root


def test_files_scan_matches_an_independent_implementation(tmp_path, checkpoint_dir, photo_folder):
    store = tmp_path / "zoo.h5"
    run("scan", "--source", "files", str(checkpoint_dir), "--store", str(store),
        "--dataset", f"folder:{photo_folder}")
    bases: dict[int, np.ndarray] = {}
    with Store(store) as s:
        assert sorted(n for _, n in s.models("files")) == sorted(name for name, *_ in CASES)
    for i, (name, k, order, mean, std) in enumerate(CASES):
        shown = json.loads(run("show", name, "--store", str(store), "--format", "json"))
        assert shown["layer"]["channel_order"] == order
        assert shown["layer"]["std"] == pytest.approx(std)
        np.testing.assert_allclose(shown["layer"]["mean"], mean)
        if k not in bases:
            eigenvalues, components = reference_basis(photo_folder, k, k)
            np.testing.assert_allclose(shown["basis"]["eigenvalues"], eigenvalues,
                                       rtol=1e-7, atol=1e-12 * eigenvalues[0])
            bases[k] = components
        expected = reference_profile(structured_bank(24, k, seed=i), mean, std, order, bases[k])
        r = np.corrcoef(shown["energy"], expected)[0, 1]
        assert r >= 0.999, f"{name}: r = {r:.5f}"


def test_torchvision_scan_from_a_seeded_cache_offline(tmp_path, monkeypatch, photo_folder):
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    home = tmp_path / "torch-home"
    cache = home / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.manual_seed(7)
    state = torchvision.models.resnet18().state_dict()
    torch.save(state, cache / Path(weights.url).name)
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # any download attempt would go to a closed local port, never the internet
    monkeypatch.setenv("ZOOSCAN_TORCHVISION_URL_BASE", "http://127.0.0.1:9/")
    store = tmp_path / "zoo.h5"
    run("scan", "--source", "torchvision", "resnet18", "--store", str(store),
        "--dataset", f"folder:{photo_folder}")
    with Store(store) as s:
        stored = s.load_model("torchvision", "resnet18")
    np.testing.assert_array_equal(stored.layer.weight, state["conv1.weight"].numpy())
    assert stored.layer.provenance.bytes_fetched == 0
    assert stored.layer.std == pytest.approx((0.229, 0.224, 0.225))
    assert stored.energy, "no energy profile stored"
