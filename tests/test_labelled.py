"""Labelled splits of the built-in datasets: synthetic oriented leaves, folder:PATH
(class folders and photo crops) and CIFAR-10/100 files, through ``open_labelled``."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from zooscan import plugins
from zooscan.errors import DatasetError
from zooscan.patches import compute_basis
from zooscan.records import LabelledImages

CIFAR10_NAMES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


@pytest.fixture(autouse=True)
def _only_dataset_plugins(monkeypatch):
    """Load just the dataset plugins, with no folder downscaling."""
    monkeypatch.setenv(plugins.LOAD_ENV, "image_datasets,cifar")
    monkeypatch.delenv("ZOOSCAN_FOLDER_MAX_SIDE", raising=False)
    plugins.reset()


def _digests(images: np.ndarray) -> set[bytes]:
    return {hashlib.sha256(image.tobytes()).digest() for image in images}


def _check_split(split: LabelledImages, n: int, size: int, n_classes: int) -> None:
    assert isinstance(split, LabelledImages)
    assert split.images.shape == (n, 3, size, size) and split.images.dtype == np.uint8
    assert split.labels.shape == (n,) and split.labels.dtype == np.int64
    assert len(split.classes) == n_classes


# --- synthetic -----------------------------------------------------------------------


def test_synthetic_splits_are_balanced_deterministic_and_disjoint():
    train = plugins.open_labelled("synthetic:seed=3", "train", count=120, size=24)
    test = plugins.open_labelled("synthetic:seed=3", "test", count=40, size=24)
    _check_split(train, 120, 24, 10)
    _check_split(test, 40, 24, 10)
    assert train.classes == tuple(f"orient{18 * k:03d}" for k in range(10))
    np.testing.assert_array_equal(train.labels, np.arange(120) % 10)
    np.testing.assert_array_equal(np.bincount(test.labels), np.full(10, 4))
    again = plugins.open_labelled("synthetic:seed=3", "train", count=120, size=24)
    np.testing.assert_array_equal(again.images, train.images)
    assert not _digests(train.images) & _digests(test.images)
    other_seed = plugins.open_labelled("synthetic:seed=4", "train", count=120, size=24)
    assert not _digests(train.images) & _digests(other_seed.images)
    # natural-image-like pixels: the full range is used, the images are not flat
    assert train.images.min() < 30 and train.images.max() > 225
    assert float(train.images.std(axis=(1, 2, 3)).min()) > 5.0


def test_synthetic_keys_name_split_size_count_seed_and_version():
    dataset = plugins.open_dataset("synthetic")
    keys = {
        dataset.labelled("train", count=20).key,
        dataset.labelled("test", count=20).key,
        dataset.labelled("train", count=30).key,
        dataset.labelled("train", count=20, size=16).key,
        plugins.open_labelled("synthetic:seed=1", "train", count=20).key,
    }
    assert len(keys) == 5
    assert dataset.labelled("train", count=20).key == (
        "synthetic-oriented:train,n=20,size=32,seed=0,v=1"
    )


def test_synthetic_unlabelled_keys_and_images_are_unchanged():
    """Stored bases depend on them: the keys and the pixels of ``batches()`` are pinned."""
    assert plugins.open_dataset("synthetic").key == "synthetic:n=2000,size=64,seed=0,v=1"
    small = plugins.open_dataset("synthetic:n=8,size=32,seed=5")
    assert small.key == "synthetic:n=8,size=32,seed=5,v=1"
    pixels = np.concatenate(list(small.batches(3)))
    # sum of the 8-bit values as generator v1 made them before labelled splits existed
    assert abs(float(np.round(pixels * 255.0).sum()) - 3105709) <= 16


def test_synthetic_spec_sets_the_defaults_and_arguments_override():
    dataset = plugins.open_dataset("synthetic:n=30,size=20,seed=2")
    train, test = dataset.labelled("train"), dataset.labelled("test")
    _check_split(train, 30, 20, 10)
    _check_split(test, 10, 20, 10)  # max(10, 30 // 5)
    assert "seed=2" in train.key
    _check_split(dataset.labelled("test", count=25, size=12), 25, 12, 10)
    plain = plugins.open_dataset("synthetic")
    assert plain._labelled_count("train", None) == 5000
    assert plain._labelled_count("test", None) == 1000
    assert plain._labelled_size(None) == 32


def test_synthetic_labelled_cache_hands_out_copies():
    dataset = plugins.open_dataset("synthetic")
    first = dataset.labelled("test", count=10, size=16)
    first.images[:] = 0
    second = dataset.labelled("test", count=10, size=16)
    assert second.images.max() > 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"split": "validation"},
        {"split": "train", "size": 4},
        {"split": "train", "size": 5000},
        {"split": "train", "count": 0},
        {"split": "train", "count": 2.5},
        {"split": "train", "count": 3_000_000, "size": 1000},
    ],
)
def test_synthetic_impossible_requests_are_dataset_errors(kwargs):
    dataset = plugins.open_dataset("synthetic")
    split = kwargs.pop("split")
    with pytest.raises(DatasetError, match="synthetic"):
        dataset.labelled(split, **kwargs)


def test_synthetic_training_basis_looks_like_the_unlabelled_one():
    labelled = plugins.open_labelled("synthetic", "train", count=600)
    basis = compute_basis(labelled, 3, 3, 3)
    assert basis.dataset == labelled.key
    reference = compute_basis(plugins.open_dataset("synthetic:n=300,size=32"), 3, 3, 3)
    assert np.corrcoef(basis.eigenvalues, reference.eigenvalues)[0, 1] > 0.995
    ratio = basis.eigenvalues[:6] / reference.eigenvalues[:6]
    assert np.all((ratio > 0.8) & (ratio < 1.25))
    # u_0: the luminance DC component; u_1, u_2: the span of the two gradients
    assert abs(basis.components[:, 0] @ np.full(27, 27**-0.5)) > 0.99
    overlap = reference.components[:, 1:3].T @ basis.components[:, 1:3]
    assert np.linalg.svd(overlap, compute_uv=False).min() > 0.95


@pytest.fixture(scope="module")
def synthetic_test500() -> LabelledImages:
    from zooscan_builtins.image_datasets import SyntheticDataset

    return SyntheticDataset().labelled("test", count=500)


def test_synthetic_class_k_has_leaves_along_k_times_18_degrees(synthetic_test500):
    """The documented convention: counterclockwise from the x axis as displayed."""
    luminance = synthetic_test500.images.astype(np.float64).mean(axis=1)
    gy_down, gx = np.gradient(luminance, axis=(1, 2))
    gy = -gy_down  # rows run downwards
    for k in range(10):
        mine = synthetic_test500.labels == k
        jxx, jyy = (gx[mine] ** 2).sum(), (gy[mine] ** 2).sum()
        jxy = (gx[mine] * gy[mine]).sum()
        gradient = 0.5 * np.degrees(np.arctan2(2 * jxy, jxx - jyy))
        axis = (gradient + 90.0) % 180.0  # edges run along the leaves, across the gradient
        error = (axis - 18 * k + 90.0) % 180.0 - 90.0
        assert abs(error) < 8.0, f"class {k}: leaves along {axis:.1f} degrees"
        assert np.hypot(jxx - jyy, 2 * jxy) / (jxx + jyy) > 0.2  # clearly anisotropic


def test_a_small_cnn_learns_the_synthetic_orientation_task(synthetic_test500):
    """The class is learnable from local structure: a tiny CNN, 4 epochs, 2000 images."""
    train = plugins.open_labelled("synthetic", "train", count=2000)
    test = synthetic_test500

    def tensors(split: LabelledImages) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(split.images).float() / 255.0
        return x - x.mean(dim=(1, 2, 3), keepdim=True), torch.from_numpy(split.labels)

    (x_train, y_train), (x_test, y_test) = tensors(train), tensors(test)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # fastest on a shared 2-core machine
    try:
        generator = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3),
            torch.nn.ReLU(),
            torch.nn.Conv2d(16, 32, 3, stride=2),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
            torch.nn.Linear(32, 10),
        )
        optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(4):
            order = torch.randperm(len(x_train), generator=generator)
            for start in range(0, len(order), 50):
                batch = order[start : start + 50]
                loss = torch.nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
        with torch.no_grad():
            accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    finally:
        torch.set_num_threads(threads)
    assert accuracy >= 0.6, f"test accuracy {accuracy:.2f} (chance 0.10)"


# --- folder: photo crops --------------------------------------------------------------


def _find(photo: np.ndarray, crop: np.ndarray) -> list[tuple[int, int]]:
    """Every (top, left) where ``crop`` (3, s, s) appears in ``photo`` (3, H, W)."""
    size = crop.shape[-1]
    windows = np.lib.stride_tricks.sliding_window_view(photo, (size, size), axis=(1, 2))
    hits = np.all(windows == crop[:, None, None], axis=(0, 3, 4))
    return [(int(t), int(left)) for t, left in zip(*np.nonzero(hits), strict=True)]


def test_photo_crops_come_from_disjoint_regions_of_each_photo(photo_folder):
    dataset = plugins.open_dataset(f"folder:{photo_folder}")
    files = sorted(
        (p for p in photo_folder.rglob("*") if p.is_file()),
        key=lambda p: p.relative_to(photo_folder).as_posix(),
    )
    names = tuple(p.relative_to(photo_folder).as_posix() for p in files)
    # 96x96 photos and size 24: no downscaling, width cut at 72 (75%)
    train = dataset.labelled("train", size=24, count=4 * len(files))
    test = dataset.labelled("test", size=24, count=4 * len(files))
    assert train.classes == names and "sub/" in " ".join(names)
    np.testing.assert_array_equal(train.labels, np.arange(len(train)) % len(files))
    for label, path in enumerate(files):
        photo = np.asarray(Image.open(path).convert("RGB")).transpose(2, 0, 1)
        for crop in train.images[train.labels == label]:
            assert all(left + 24 <= 72 for _, left in _find(photo, crop)) and _find(photo, crop)
        for crop in test.images[test.labels == label]:
            assert all(left >= 72 for _, left in _find(photo, crop)) and _find(photo, crop)
    gray = train.images[train.labels == names.index(next(n for n in names if "gray" in n))]
    assert np.array_equal(gray[:, 0], gray[:, 1]) and np.array_equal(gray[:, 1], gray[:, 2])


def test_photo_crops_defaults_balance_and_determinism(photo_folder):
    dataset = plugins.open_dataset(f"folder:{photo_folder}")
    n_photos = len(dataset.files)
    train = plugins.open_labelled(f"folder:{photo_folder}", "train", size=16)
    test = dataset.labelled("test", size=16)
    _check_split(train, 400 * n_photos, 16, n_photos)
    _check_split(test, 100 * n_photos, 16, n_photos)
    np.testing.assert_array_equal(np.bincount(test.labels), np.full(n_photos, 100))
    assert not _digests(train.images) & _digests(test.images)
    again = plugins.open_dataset(f"folder:{photo_folder}").labelled("test", size=16)
    np.testing.assert_array_equal(again.images, test.images)
    assert train.key.startswith(f"folder:{photo_folder.resolve()}#")
    assert train.key.endswith(f":photo-crop:train,size=16,count={400 * n_photos},v=1")
    basis = compute_basis(train, 3, 3, 3)
    assert basis.dataset == train.key and basis.n_images == len(train)
    dc = basis.components[:, 0].reshape(3, 9)  # a mean colour, flat over the 3x3 window
    assert dc.min() > 0 and np.all(dc.std(axis=1) < 0.1 * dc.mean(axis=1))


def test_photo_crop_size_too_large_and_single_photo_are_errors(photo_folder, tmp_path):
    dataset = plugins.open_dataset(f"folder:{photo_folder}")
    with pytest.raises(DatasetError, match=r"size 25 is too large for photo .*at most 24"):
        dataset.labelled("train", size=25)
    single = tmp_path / "single"
    single.mkdir()
    Image.open(dataset.files[0]).save(single / "only.png")
    with pytest.raises(DatasetError, match="one photo"):
        plugins.open_labelled(f"folder:{single}", "train", size=8)
    with pytest.raises(DatasetError, match="unknown split"):
        dataset.labelled("val")


# --- folder: class folders (ImageFolder) ------------------------------------------------


def _save(image: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(image * 255).astype(np.uint8)).save(path)


@pytest.fixture
def class_tree(tmp_path, photos) -> Path:
    """``cat/`` (6 crops of chelsea and coffee) and ``space/`` (7 of astronaut and
    hubble), real photographs of varied sizes and aspect ratios."""
    root = tmp_path / "classes"
    for name, sources in {
        "cat": ("chelsea", "coffee"),
        "space": ("astronaut", "hubble_deep_field"),
    }.items():
        count = 6 if name == "cat" else 7
        for i in range(count):
            photo = photos[sources[i % 2]]
            crop = photo[5 * i : 5 * i + 80 + 7 * i, 3 * i : 3 * i + 60 + 11 * i]
            _save(crop, root / name / f"{i:02d}.png")
    return root


def test_class_folders_holdout_split(class_tree):
    dataset = plugins.open_dataset(f"folder:{class_tree}")
    train = plugins.open_labelled(f"folder:{class_tree}", "train")
    test = dataset.labelled("test")
    assert train.classes == ("cat", "space")
    # every 5th image of a class (by path) is a test image: cat/04, space/04
    _check_split(train, 11, 32, 2)
    _check_split(test, 2, 32, 2)
    np.testing.assert_array_equal(train.labels, [0] * 5 + [1] * 6)
    np.testing.assert_array_equal(test.labels, [0, 1])
    assert ":holdout:test,size=32,count=2,v=1" in test.key
    assert not _digests(train.images) & _digests(test.images)
    subset = dataset.labelled("train", count=3, size=20)
    _check_split(subset, 3, 20, 2)
    np.testing.assert_array_equal(subset.labels, [0, 0, 1])  # dealt cat, space, cat
    keys = {train.key, test.key, subset.key, dataset.labelled("train", size=20).key}
    assert len(keys) == 4
    assert compute_basis(train, 3, 3, 3).n_images == 11


def test_class_images_are_resized_on_the_shorter_side_and_centre_cropped(tmp_path):
    stripes = np.zeros((64, 96, 3))
    stripes[:, :32, 0] = stripes[:, 32:64, 1] = stripes[:, 64:, 2] = 1.0  # R | G | B
    _save(stripes, tmp_path / "tree" / "a" / "x.png")
    _save(stripes[::-1, ::-1], tmp_path / "tree" / "b" / "y.png")
    split = plugins.open_labelled(f"folder:{tmp_path / 'tree'}", "train", size=32)
    # 64x96 -> 32x48, centre crop keeps columns 8..40: red, green, blue from left to right
    image = split.images[0]
    assert image.shape == (3, 32, 32)
    assert image[0, 16, 2] == 255 and image[1, 16, 16] == 255 and image[2, 16, 29] == 255
    assert image[1, 16, 2] == 0 and image[0, 16, 16] == 0
    np.testing.assert_array_equal(split.images[1], image[:, ::-1, ::-1])


def test_train_and_test_folders_are_the_splits(tmp_path, photos):
    root = tmp_path / "tt"
    names = sorted(photos)
    for split, count in (("train", 3), ("test", 2)):
        for label in ("ant", "bee"):
            for i in range(count):
                _save(
                    photos[names[i + (label == "bee")]][:50, :70], root / split / label / f"{i}.png"
                )
    _save(photos[names[0]][:40, :40], root / "train" / "stray.png")  # outside class folders
    train = plugins.open_labelled(f"folder:{root}", "train", size=16)
    test = plugins.open_labelled(f"folder:{root}", "test", size=16)
    _check_split(train, 6, 16, 2)
    _check_split(test, 4, 16, 2)
    np.testing.assert_array_equal(test.labels, [0, 0, 1, 1])
    assert ":train-test:test,size=16,count=4,v=1" in test.key
    _save(photos[names[0]][:40, :40], root / "test" / "wasp" / "0.png")
    with pytest.raises(DatasetError, match="no train folder: wasp"):
        plugins.open_labelled(f"folder:{root}", "test")


def test_class_folder_errors(tmp_path, photos):
    photo = next(iter(photos.values()))
    one = tmp_path / "one"
    for i in range(6):
        _save(photo[:40, i : i + 40], one / "only" / f"{i}.png")
    with pytest.raises(DatasetError, match="at least 2 class folders, found only 'only'"):
        plugins.open_labelled(f"folder:{one}", "train")
    few = tmp_path / "few"
    for label in ("a", "b"):
        for i in range(2):
            _save(photo[:40, i : i + 40], few / label / f"{i}.png")
    with pytest.raises(DatasetError, match="no test images"):
        plugins.open_labelled(f"folder:{few}", "test")
    with pytest.raises(DatasetError, match="5 images asked for, but the split has 4"):
        plugins.open_labelled(f"folder:{few}", "train", count=5)
    (few / "b" / "9.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(DatasetError, match="cannot read .*9.png"):
        plugins.open_labelled(f"folder:{few}", "train")


def test_folder_unlabelled_key_is_unchanged(class_tree, monkeypatch):
    digest = hashlib.sha256()
    for path in sorted(
        class_tree.rglob("*.png"), key=lambda p: p.relative_to(class_tree).as_posix()
    ):
        stat = path.stat()
        digest.update(
            f"{path.relative_to(class_tree).as_posix()}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode()
        )
    expected = f"folder:{class_tree.resolve()}#{digest.hexdigest()[:16]}"
    assert plugins.open_dataset(f"folder:{class_tree}").key == expected
    labelled_key = plugins.open_labelled(f"folder:{class_tree}", "train").key
    assert labelled_key.startswith(expected + ":")
    monkeypatch.setenv("ZOOSCAN_FOLDER_MAX_SIDE", "50")  # changes the unlabelled images only
    assert plugins.open_dataset(f"folder:{class_tree}").key != expected
    assert plugins.open_labelled(f"folder:{class_tree}", "train").key == labelled_key


# --- CIFAR ---------------------------------------------------------------------------


def _photo_crops32(photos, count: int, offset: int) -> np.ndarray:
    """``count`` 32x32 crops of real photographs, uint8 ``(count, 3, 32, 32)``."""
    sources = [photos[name] for name in sorted(photos)]
    crops = []
    for i in range(count):
        image = sources[(i + offset) % len(sources)]
        top = 41 * (i + offset) % (image.shape[0] - 32)
        left = 29 * (i + 3 * offset) % (image.shape[1] - 32)
        crops.append(image[top : top + 32, left : left + 32].transpose(2, 0, 1))
    return (np.stack(crops) * 255).round().astype(np.uint8)


def _dump(entry: dict, path: Path, byte_keys: bool = False) -> None:
    if byte_keys:
        entry = {key.encode(): value for key, value in entry.items()}
    with open(path, "wb") as handle:
        pickle.dump(entry, handle, protocol=2)  # the protocol of the official files


def _write_cifar(root: Path, photos, variant: str, per_file: int, byte_keys=False) -> dict:
    """The official python-version layout; returns ``{file: (images, labels)}``."""
    rng = np.random.default_rng(7)
    if variant == "cifar10":
        folder, files = (
            root / "cifar-10-batches-py",
            [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"],
        )
        meta = (
            "batches.meta",
            {"label_names": list(CIFAR10_NAMES), "num_cases_per_batch": per_file},
        )
        n_classes, label_key = 10, "labels"
    else:
        folder, files = root / "cifar-100-python", ["train", "test"]
        fine = [f"fine{k:02d}" for k in range(100)]
        meta = (
            "meta",
            {"fine_label_names": fine, "coarse_label_names": [f"c{k}" for k in range(20)]},
        )
        n_classes, label_key = 100, "fine_labels"
    folder.mkdir(parents=True)
    written = {}
    for index, name in enumerate(files):
        images = _photo_crops32(photos, per_file, offset=index * per_file)
        labels = rng.integers(0, n_classes, size=per_file).tolist()
        entry = {
            "batch_label": f"batch {index + 1}",
            "data": images.reshape(per_file, 3072),
            "filenames": [f"img_{index}_{i}.png" for i in range(per_file)],
            label_key: labels,
        }
        if variant == "cifar100":
            entry["coarse_labels"] = [label // 5 for label in labels]
        _dump(entry, folder / name, byte_keys)
        written[name] = (images, np.array(labels))
    _dump(meta[1], folder / meta[0], byte_keys)
    return written


def test_cifar10_labelled_splits_read_the_official_format(photos, tmp_path, monkeypatch):
    monkeypatch.setenv("ZOOSCAN_DATA", str(tmp_path))
    written = _write_cifar(tmp_path, photos, "cifar10", per_file=24)
    train = plugins.open_labelled("cifar10", "train")
    _check_split(train, 120, 32, 10)
    assert train.classes == CIFAR10_NAMES
    expected = [written[f"data_batch_{i}"] for i in range(1, 6)]
    np.testing.assert_array_equal(train.images, np.concatenate([im for im, _ in expected]))
    np.testing.assert_array_equal(train.labels, np.concatenate([lab for _, lab in expected]))
    unlabelled = plugins.open_dataset("cifar10")
    assert train.key == unlabelled.key  # exactly the images the patch dataset gives
    # the train-split dataset also gives the test split, and vice versa
    test = unlabelled.labelled("test")
    np.testing.assert_array_equal(test.images, written["test_batch"][0])
    np.testing.assert_array_equal(test.labels, written["test_batch"][1])
    assert test.key == plugins.open_dataset("cifar10:test").key != train.key
    assert plugins.open_dataset("cifar10:test").labelled("train").key == train.key


def test_cifar_count_keeps_a_balanced_subset_in_file_order(photos, tmp_path, monkeypatch):
    monkeypatch.setenv("ZOOSCAN_DATA", str(tmp_path))
    written = _write_cifar(tmp_path, photos, "cifar10", per_file=40)
    all_images = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    all_labels = np.concatenate([written[f"data_batch_{i}"][1] for i in range(1, 6)])
    subset = plugins.open_labelled("cifar10", "train", count=50)
    assert np.bincount(subset.labels, minlength=10).tolist() == [5] * 10
    chosen = np.sort(np.concatenate([np.nonzero(all_labels == k)[0][:5] for k in range(10)]))
    np.testing.assert_array_equal(subset.images, all_images[chosen])
    np.testing.assert_array_equal(subset.labels, all_labels[chosen])
    assert subset.key.endswith(":size=32,count=50")
    again = plugins.open_labelled("cifar10", "train", count=50)
    np.testing.assert_array_equal(again.images, subset.images)
    small = plugins.open_labelled("cifar10", "train", count=50, size=16)
    _check_split(small, 50, 16, 10)
    np.testing.assert_array_equal(small.labels, subset.labels)
    # antialiased downscaling keeps each image's mean colour
    mean_small = small.images.astype(float).mean(axis=(2, 3))
    mean_full = subset.images.astype(float).mean(axis=(2, 3))
    assert np.abs(mean_small - mean_full).max() < 2.0
    keys = {subset.key, small.key, plugins.open_labelled("cifar10", "test", count=30).key}
    assert len(keys) == 3
    basis = compute_basis(small, 3, 3, 3)
    assert basis.n_images == 50 and basis.dataset == small.key
    with pytest.raises(DatasetError, match="201 images asked for, but the split has 200"):
        plugins.open_labelled("cifar10", "train", count=201)


def test_cifar100_fine_labels_and_byte_keys(photos, tmp_path, monkeypatch):
    monkeypatch.setenv("ZOOSCAN_DATA", str(tmp_path))
    written = _write_cifar(tmp_path, photos, "cifar100", per_file=30, byte_keys=True)
    train = plugins.open_labelled("cifar100", "train", size=40)
    _check_split(train, 30, 40, 100)
    assert train.classes[7] == "fine07"
    np.testing.assert_array_equal(train.labels, written["train"][1])
    test = plugins.open_labelled("cifar100", "test")
    np.testing.assert_array_equal(test.images, written["test"][0])
    assert test.key.startswith("cifar100:test#")


def test_cifar_broken_labels_and_missing_files_are_dataset_errors(photos, tmp_path, monkeypatch):
    monkeypatch.setenv("ZOOSCAN_DATA", str(tmp_path))
    _write_cifar(tmp_path, photos, "cifar10", per_file=10)
    folder = tmp_path / "cifar-10-batches-py"
    dataset = plugins.open_dataset("cifar10")
    with pytest.raises(DatasetError, match="unknown split"):
        dataset.labelled("validation")
    with pytest.raises(DatasetError, match="size must be a positive integer"):
        dataset.labelled("train", size=0)
    _dump({"label_names": list(CIFAR10_NAMES[:5])}, folder / "batches.meta")
    with pytest.raises(DatasetError, match="names 5 classes"):
        dataset.labelled("test")
    (folder / "batches.meta").unlink()
    with pytest.raises(DatasetError, match="batches.meta missing"):
        dataset.labelled("test")
    entry = {"data": _photo_crops32(photos, 10, 0).reshape(10, 3072), "labels": [1] * 9}
    _dump(entry, folder / "test_batch")
    _dump({"label_names": list(CIFAR10_NAMES)}, folder / "batches.meta")
    with pytest.raises(DatasetError, match="expected 10 non-negative 'labels'"):
        dataset.labelled("test")
