"""Patch datasets through the plugin contract: synthetic, folder:PATH, cifar10/100."""

from __future__ import annotations

import hashlib
import http.server
import io
import logging
import os
import pickle
import shutil
import socket
import struct
import tarfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zooscan import plugins
from zooscan.errors import DatasetError
from zooscan.patches import PatchStats, compute_basis
from zooscan.records import PatchDataset

LUMA = np.array([0.299, 0.587, 0.114])


@pytest.fixture(autouse=True)
def _only_dataset_plugins(monkeypatch):
    """Load just the dataset plugins (the model-source plugins are not under test here)."""
    monkeypatch.setenv(plugins.LOAD_ENV, "image_datasets,cifar")
    monkeypatch.delenv("ZOOSCAN_FOLDER_MAX_SIDE", raising=False)
    plugins.reset()


def _all(dataset, channels=3) -> np.ndarray:
    return np.concatenate(list(dataset.batches(channels)))


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return np.tensordot(rgb, LUMA, axes=([1], [0]))[:, None]


def test_the_builtin_datasets_are_registered():
    factories = plugins.datasets()
    assert {"synthetic", "folder", "cifar10", "cifar100"} <= set(factories)
    for factory in factories.values():
        assert factory.description
    with pytest.raises(DatasetError):
        plugins.open_dataset("synthetic:n=zero")


# --- synthetic ----------------------------------------------------------------------


def test_synthetic_key_encodes_every_parameter():
    default = plugins.open_dataset("synthetic")
    assert isinstance(default, PatchDataset)
    assert default.key == "synthetic:n=2000,size=64,seed=0,v=1"
    custom = plugins.open_dataset("synthetic:seed=3, n=10")
    assert custom.key == "synthetic:n=10,size=64,seed=3,v=1"
    assert plugins.open_dataset(custom.key).key == custom.key  # the key reopens the dataset


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("synthetic:colour=1", "bad option"),
        ("synthetic:n", "bad option"),
        ("synthetic:n=1.5", "integer"),
        ("synthetic:n=0", "n must be"),
        ("synthetic:size=4", "size must be"),
        ("synthetic:seed=-1", "seed must be"),
        ("synthetic:v=99", "v=1"),
    ],
)
def test_synthetic_rejects_bad_arguments(spec, message):
    with pytest.raises(DatasetError, match=message):
        plugins.open_dataset(spec)


def test_synthetic_is_deterministic_and_well_formed():
    first = plugins.open_dataset("synthetic:n=150,size=64,seed=5")
    batches = list(first.batches(3))
    images = np.concatenate(batches)
    assert images.shape == (150, 3, 64, 64) and images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert [b.shape[0] for b in batches] == [64, 64, 22]  # fixed by size, not by channels
    again = _all(plugins.open_dataset("synthetic:n=150,size=64,seed=5"))
    np.testing.assert_array_equal(images, again)
    np.testing.assert_array_equal(images, _all(first))  # cached second pass
    other = _all(plugins.open_dataset("synthetic:n=150,size=64,seed=6"))
    assert np.abs(images - other).mean() > 0.05
    # 8-bit images, like photographs
    np.testing.assert_allclose(images * 255, np.round(images * 255), atol=1e-4)


def test_synthetic_channels():
    dataset = plugins.open_dataset("synthetic:n=40,size=32,seed=1")
    rgb = _all(dataset, 3)
    np.testing.assert_allclose(_all(dataset, 1), _luminance(rgb), atol=1e-6)
    np.testing.assert_array_equal(_all(dataset, 2), rgb[:, :2])
    five = _all(dataset, 5)
    np.testing.assert_array_equal(five[:, :3], rgb)
    np.testing.assert_array_equal(_all(dataset, 4), five[:, :4])
    luma = _luminance(rgb)[:, 0].ravel()
    for extra in (3, 4):  # correlated with the scene, not a copy of it
        r = np.corrcoef(five[:, extra].ravel(), luma)[0, 1]
        assert 0.5 < r < 0.99
    with pytest.raises(DatasetError, match="channels"):
        next(dataset.batches(0))


def _spectrum_slope(images: np.ndarray) -> float:
    """Slope of the radially averaged luminance power spectrum on log-log axes."""
    size = images.shape[-1]
    window = np.outer(np.hanning(size), np.hanning(size))
    power = 0.0
    for image in _luminance(images)[:, 0]:
        power = power + np.abs(np.fft.fft2((image - image.mean()) * window)) ** 2
    freq = np.fft.fftfreq(size)
    radius = np.hypot(freq[:, None], freq[None, :])
    band = (radius > 2.0 / size) & (radius < 0.25)
    return float(np.polyfit(np.log(radius[band]), np.log(power[band]), 1)[0])


def test_synthetic_images_have_natural_statistics(photo_folder):
    synthetic = plugins.open_dataset("synthetic:n=300,size=64,seed=0")
    real = plugins.open_dataset(f"folder:{photo_folder}")
    ours = compute_basis(synthetic, 3, 7, 7)
    photos = compute_basis(real, 3, 7, 7)
    # the patch spectrum decays like the photographs' one
    assert np.corrcoef(ours.lambdas, photos.lambdas)[0, 1] > 0.9
    assert np.corrcoef(np.log(ours.lambdas), np.log(photos.lambdas))[0, 1] > 0.95
    # the top component is the mean-luminance (DC) one, for both
    for basis in (ours, photos):
        top = basis.components[:, 0]
        assert top.min() > 0 and top.sum() / np.sqrt(top.size) > 0.95
    images = _all(synthetic)
    assert -2.8 < _spectrum_slope(images) < -1.8  # ~1/f^2 power spectrum
    red_green = np.corrcoef(images[:, 0].ravel(), images[:, 1].ravel())[0, 1]
    assert 0.6 < red_green < 0.95  # colours correlated like real ones, not grey


# --- folder:PATH ----------------------------------------------------------------------


def _copy(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / "images"
    shutil.copytree(folder, target)
    return target


def _pil_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255.0


def test_folder_reads_every_photo(photo_folder):
    dataset = plugins.open_dataset(f"folder:{photo_folder}")
    files = sorted(p for p in photo_folder.rglob("*") if p.is_file())
    assert dataset.key.startswith(f"folder:{photo_folder.resolve()}#")
    assert len(dataset.key.rsplit("#", 1)[1]) == 16
    images = _all(dataset)
    assert images.shape == (len(files), 3, 96, 96) and images.dtype == np.float32
    expected = np.stack([_pil_rgb(path) for path in files])
    # same multiset of images (the order inside a batch is the sorted relative path)
    np.testing.assert_array_equal(
        np.sort(images.reshape(len(files), -1).sum(1)),
        np.sort(expected.reshape(len(files), -1).sum(1)),
    )
    gray = _pil_rgb(next(p for p in files if "_gray" in p.name))
    assert any(np.array_equal(image, gray) for image in images)
    np.testing.assert_allclose(_all(dataset, 1), _luminance(images), atol=1e-6)
    with pytest.raises(DatasetError, match="3 \\(RGB\\) or 1"):
        next(dataset.batches(4))


def test_folder_basis_equals_the_basis_of_the_files(photo_folder):
    dataset = plugins.open_dataset(f"folder:{photo_folder}")
    basis = compute_basis(dataset, 3, 5, 5)
    stats = PatchStats(3, 5, 5, method="direct")
    for path in sorted(p for p in photo_folder.rglob("*") if p.is_file()):
        stats.update(_pil_rgb(path)[None])
    direct = stats.to_basis(dataset.key)
    assert basis.dataset == dataset.key and basis.n_images == direct.n_images == 7
    np.testing.assert_allclose(basis.eigenvalues, direct.eigenvalues, atol=1e-12)
    np.testing.assert_allclose(basis.components[:, :5], direct.components[:, :5], atol=1e-8)


def test_folder_key_follows_the_files(photo_folder, tmp_path):
    root = _copy(photo_folder, tmp_path)
    key = plugins.open_dataset(f"folder:{root}").key
    assert plugins.open_dataset(f"folder:{root}").key == key
    (root / "notes.txt").write_text("not an image")
    assert plugins.open_dataset(f"folder:{root}").key == key
    target = next(root.glob("*.png"))
    stamp = target.stat().st_mtime_ns + 5_000_000_000
    os.utime(target, ns=(stamp, stamp))
    touched = plugins.open_dataset(f"folder:{root}").key
    assert touched != key
    shutil.copy(target, root / "sub" / "copy.png")
    assert plugins.open_dataset(f"folder:{root}").key not in (key, touched)


def test_folder_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        plugins.open_dataset(f"folder:{tmp_path / 'missing'}")
    (tmp_path / "empty" / "deeper").mkdir(parents=True)
    (tmp_path / "empty" / "readme.md").write_text("no images here")
    with pytest.raises(DatasetError, match="no images under"):
        plugins.open_dataset(f"folder:{tmp_path / 'empty'}")
    with pytest.raises(DatasetError, match="give a path"):
        plugins.open_dataset("folder")
    with pytest.raises(DatasetError, match="not a directory"):
        plugins.open_dataset(f"folder:{tmp_path / 'empty' / 'readme.md'}")


def test_folder_formats_modes_and_broken_files(photos, tmp_path, caplog):
    root = tmp_path / "mixed"
    root.mkdir()
    photo = (photos["astronaut"][::8, ::8] * 255).astype(np.uint8)  # 64x64 real photo
    pil = Image.fromarray(photo)
    pil.save(root / "upper.JPG", quality=95)
    pil.save(root / "mixed.Png")
    pil.save(root / "bitmap.bmp")
    pil.save(root / "scan.TIFF")
    pil.save(root / "web.webp", lossless=True)
    rgba = pil.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.full((64, 64), 40, np.uint8)))
    rgba.save(root / "alpha.png")
    palette = pil.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    palette.save(root / "palette.gif", transparency=0)
    gray16 = (np.asarray(pil.convert("L"), dtype=np.float64) / 255 * 65535).astype(np.uint16)
    Image.fromarray(gray16).save(root / "deep.png")
    png = io.BytesIO()
    pil.save(png, format="PNG")
    (root / "truncated.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    (root / "garbage.jpg").write_bytes(b"this is not a JPEG")
    Image.fromarray(photo[:, :40]).save(root / "narrow.png")

    caplog.set_level(logging.WARNING)
    dataset = plugins.open_dataset(f"folder:{root}")
    batches = list(dataset.batches(3))
    assert sorted(b.shape for b in batches) == [(1, 3, 64, 40), (8, 3, 64, 64)]
    square = next(b for b in batches if b.shape[3] == 64)
    by_name = dict(
        zip(
            sorted(
                p.name
                for p in root.iterdir()
                if p.name not in ("truncated.png", "garbage.jpg", "narrow.png")
            ),
            square,
            strict=True,
        )
    )
    exact = photo.transpose(2, 0, 1) / 255.0
    for name in ("mixed.Png", "bitmap.bmp", "scan.TIFF", "web.webp", "alpha.png"):
        np.testing.assert_allclose(by_name[name], exact, atol=1e-6, err_msg=name)
    assert np.abs(by_name["upper.JPG"] - exact).mean() < 0.02
    np.testing.assert_allclose(by_name["palette.gif"], _pil_rgb(root / "palette.gif"), atol=1e-6)
    deep = by_name["deep.png"]
    np.testing.assert_allclose(deep, np.repeat(gray16[None] / 65535.0, 3, 0), atol=1e-6)
    warned = " ".join(record.getMessage() for record in caplog.records)
    assert "truncated.png" in warned and "garbage.jpg" in warned


def test_folder_applies_exif_orientation_and_max_side(photos, tmp_path, monkeypatch):
    root = tmp_path / "exif"
    root.mkdir()
    photo = (photos["chelsea"][::4, ::4] * 255).astype(np.uint8)  # landscape
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, displayed rotated 90 degrees clockwise
    Image.fromarray(photo).save(root / "rotated.jpg", exif=exif.tobytes(), quality=95)
    height, width = photo.shape[:2]
    plain = plugins.open_dataset(f"folder:{root}")
    (image,) = _all(plain)
    assert image.shape == (3, width, height)
    monkeypatch.setenv("ZOOSCAN_FOLDER_MAX_SIDE", "40")
    small = plugins.open_dataset(f"folder:{root}")
    assert small.key != plain.key
    (shrunk,) = _all(small)
    assert shrunk.shape == (3, 40, round(height * 40 / width))
    assert abs(shrunk.mean() - image.mean()) < 0.01  # antialiased, same content
    monkeypatch.setenv("ZOOSCAN_FOLDER_MAX_SIDE", "big")
    with pytest.raises(DatasetError, match="ZOOSCAN_FOLDER_MAX_SIDE"):
        plugins.open_dataset(f"folder:{root}")


# --- CIFAR ------------------------------------------------------------------------------


class _Py2Pickler(pickle._Pickler):
    """Writes what Python 2's cPickle wrote for the official CIFAR files: ``str`` as
    BINSTRING (no ``_codecs``) and numpy globals under ``numpy.core``."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)

    def save_str_as_py2(self, obj):
        self.save_py2_str(obj.encode("latin1"))

    def save_global(self, obj, name=None):
        module = obj.__module__.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_str_as_py2
    dispatch[type] = save_global


def _dump(entry: dict, path: Path, style: str) -> None:
    with open(path, "wb") as handle:
        if style == "py2":
            _Py2Pickler(handle, protocol=2).dump(entry)
        else:
            pickle.dump(entry, handle, protocol=5 if style == "py3-5" else 2)


def _cifar_images(photos, count: int, offset: int) -> np.ndarray:
    """``count`` 32x32 crops of real photographs, uint8 (count, 3, 32, 32)."""
    sources = [photos[name] for name in sorted(photos)]
    crops = []
    for i in range(count):
        image = sources[(i + offset) % len(sources)]
        top, left = 37 * (i + offset) % (image.shape[0] - 32), 53 * i % (image.shape[1] - 32)
        crops.append(image[top : top + 32, left : left + 32].transpose(2, 0, 1))
    return (np.stack(crops) * 255).round().astype(np.uint8)


def _write_cifar(root: Path, photos, variant="cifar10", style="py2", count=12) -> dict:
    """The official on-disk format with real-photo content; returns images per file."""
    spec = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}[variant]
    folder = root / spec
    folder.mkdir(parents=True)
    if variant == "cifar10":
        names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        meta = ("batches.meta", {"label_names": ["airplane"] * 10, "num_vis": 3072})
    else:
        names = ["train", "test"]
        meta = ("meta", {"fine_label_names": ["apple"] * 100, "coarse_label_names": ["x"] * 20})
    written = {}
    for index, name in enumerate(names):
        images = _cifar_images(photos, count, offset=index * count)
        entry = {
            "batch_label": f"{name} of 6",
            "data": images.reshape(count, 3072),
            "filenames": [f"img_{i}.png" for i in range(count)],
        }
        labels = list(range(count))
        if variant == "cifar10":
            entry["labels"] = labels
        else:
            entry["fine_labels"], entry["coarse_labels"] = labels, labels
        _dump(entry, folder / name, style)
        written[name] = images
    _dump(meta[1], folder / meta[0], style)
    return written


@pytest.mark.parametrize("style", ["py2", "py3-2", "py3-5"])
def test_cifar10_reads_the_official_format(photos, tmp_path, monkeypatch, style, caplog):
    monkeypatch.setenv("ZOOSCAN_DATA", str(tmp_path))
    written = _write_cifar(tmp_path, photos, style=style)
    caplog.set_level(logging.WARNING)
    train = plugins.open_dataset("cifar10")
    images = _all(train)
    expected = np.concatenate([written[f"data_batch_{i}"] for i in range(1, 6)]) / 255.0
    assert images.shape == (60, 3, 32, 32) and images.dtype == np.float32
    np.testing.assert_allclose(images, expected, atol=1e-7)
    np.testing.assert_allclose(_all(train, 1), _luminance(expected), atol=1e-6)
    assert train.key.startswith("cifar10:train#")  # not the official files
    assert "differ from the official release" in caplog.text
    test = plugins.open_dataset("cifar10:test")
    np.testing.assert_allclose(_all(test), written["test_batch"] / 255.0, atol=1e-7)
    assert test.key.startswith("cifar10:test#") and test.key != train.key
    with pytest.raises(DatasetError, match="unknown split"):
        plugins.open_dataset("cifar10:validation")


def test_cifar_official_files_get_the_plain_key(photos, tmp_path, monkeypatch):
    from zooscan_builtins import cifar_datasets

    monkeypatch.setenv("ZOOSCAN_DATA", str(tmp_path))
    _write_cifar(tmp_path, photos, variant="cifar100")
    folder = tmp_path / "cifar-100-python"
    spec = cifar_datasets.SPECS["cifar100"]
    digests = {
        name: hashlib.md5((folder / name).read_bytes()).hexdigest() for name in ("train", "test")
    }
    official = replace(
        spec, train=(("train", digests["train"]),), test=(("test", digests["test"]),)
    )
    monkeypatch.setitem(cifar_datasets.SPECS, "cifar100", official)
    dataset = plugins.open_dataset("cifar100")
    assert dataset.key == "cifar100:train"
    assert _all(dataset).shape == (12, 3, 32, 32)


def test_cifar_refuses_code_in_pickles(photos, tmp_path, monkeypatch):
    monkeypatch.setenv("ZOOSCAN_DATA", str(tmp_path))
    _write_cifar(tmp_path, photos)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    with open(tmp_path / "cifar-10-batches-py" / "data_batch_2", "wb") as handle:
        pickle.dump({"data": Payload()}, handle, protocol=2)
    dataset = plugins.open_dataset("cifar10")
    with pytest.raises(DatasetError, match="refusing to load"):
        _all(dataset)
    assert not marker.exists()
    (tmp_path / "cifar-10-batches-py" / "data_batch_2").write_bytes(b"\x80\x02garbage")
    with pytest.raises(DatasetError, match="cannot read CIFAR batch"):
        _all(dataset)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_cifar_offline_with_an_empty_root_fails_fast_and_clearly(tmp_path, monkeypatch):
    from zooscan_builtins import cifar_datasets

    root = tmp_path / "data"
    monkeypatch.setenv("ZOOSCAN_DATA", str(root))
    url = f"http://127.0.0.1:{_closed_port()}/cifar-10-python.tar.gz"
    monkeypatch.setitem(
        cifar_datasets.SPECS, "cifar10", replace(cifar_datasets.SPECS["cifar10"], url=url)
    )
    start = time.monotonic()
    with pytest.raises(DatasetError) as caught:
        plugins.open_dataset("cifar10")
    assert time.monotonic() - start < 5
    message = str(caught.value)
    assert str(root / "cifar-10-batches-py") in message
    assert "network once" in message and "ZOOSCAN_DATA" in message


def test_cifar_downloads_once_through_torchvision(photos, tmp_path, monkeypatch):
    from zooscan_builtins import cifar_datasets

    staging = tmp_path / "staging"
    written = _write_cifar(staging, photos)
    served = tmp_path / "server"
    served.mkdir()
    archive = served / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(staging / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()

    def handler(*args, **kwargs):
        return http.server.SimpleHTTPRequestHandler(*args, directory=str(served), **kwargs)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/cifar-10-python.tar.gz"
        spec = replace(cifar_datasets.SPECS["cifar10"], url=url, archive_md5=md5)
        monkeypatch.setitem(cifar_datasets.SPECS, "cifar10", spec)
        root = tmp_path / "data"
        monkeypatch.setenv("ZOOSCAN_DATA", str(root))
        test = plugins.open_dataset("cifar10:test")
    finally:
        server.shutdown()
        server.server_close()
    assert (root / "cifar-10-batches-py" / "data_batch_5").is_file()
    assert not (root / "cifar-10-python.tar.gz").exists()  # the archive is not kept
    np.testing.assert_allclose(_all(test), written["test_batch"] / 255.0, atol=1e-7)
    assert plugins.open_dataset("cifar10").key.startswith("cifar10:train#")  # no new download
