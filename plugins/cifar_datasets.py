"""Built-in patch datasets ``cifar10`` and ``cifar100`` (train split, or ``:test``).

The files are the official "python version" batches, laid out as
``torchvision.datasets.CIFAR10``/``CIFAR100`` lay them out
(``<root>/cifar-10-batches-py/data_batch_1`` ...) under the root
``$ZOOSCAN_DATA`` or, when unset, ``~/.cache/zooscan/data``. An existing
torchvision download can be reused by pointing ``$ZOOSCAN_DATA`` at its root.
When the files are missing, the archive is downloaded once with torchvision's
downloader (URL and MD5 from torchvision's dataset classes); offline, opening the
dataset fails at once with a :class:`~zooscan.errors.DatasetError` that says
where it looked.

The batches are pickled dicts of numpy arrays. torchvision reads them with a
plain ``pickle.load``, which can execute code; zooscan reads them with an
unpickler that resolves only the few numpy reconstruction functions such a file
needs and refuses everything else. Files that differ from the official release
(MD5) still load, with a warning, and the dataset key then carries their hash
(``cifar10:train#<hash>``) so bases computed from them are never mistaken for
bases of the real CIFAR.

Labelled splits (``dataset.labelled(split, size=None, count=None)``, for the
trainer): ``train`` is ``data_batch_1`` ... ``data_batch_5`` (CIFAR-100:
``train``), ``test`` is ``test_batch`` (``test``), whichever split the dataset was
opened with. Labels are the batches' ``labels`` (CIFAR-100: ``fine_labels``),
class names the meta file's ``label_names`` in ``batches.meta`` (``fine_label_names``
in ``meta``), all read with the same restricted unpickler. ``count`` keeps the
first ``count`` images dealt round robin over the classes (a class-balanced subset,
kept in file order); ``size`` other than 32 resizes (bilinear, antialiased). The
key of the whole 32x32 split is its dataset key (``cifar10:train``), the images
being exactly those the patch dataset gives; other requests append
``:size=S,count=N``.
"""

from __future__ import annotations

import codecs
import hashlib
import importlib
import logging
import os
import pickle
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

import zooscan
from zooscan.errors import DatasetError
from zooscan.records import LabelledImages
from zooscan_builtins.image_datasets import (
    balanced_subset,
    check_labelled_bytes,
    check_split,
    positive_int,
    resize_square,
)

log = logging.getLogger(__name__)

DATA_ENV = "ZOOSCAN_DATA"
DEFAULT_ROOT = Path("~/.cache/zooscan/data")
PROBE_TIMEOUT_S = 10.0
"""How long to wait for the download server before declaring the machine offline."""
IMAGES_PER_BATCH = 1000
LUMA_601 = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@zooscan.hookimpl
def register_datasets(register: Callable[[Any], None]) -> None:
    """Register ``cifar10`` and ``cifar100``."""
    register(Cifar10Dataset)
    register(Cifar100Dataset)


@dataclass(frozen=True)
class CifarSpec:
    """Where one CIFAR variant lives and what its files are called."""

    name: str
    folder: str
    url: str
    archive: str
    archive_md5: str
    train: tuple[tuple[str, str], ...]
    """``(file name, md5)`` of the train batches."""
    test: tuple[tuple[str, str], ...]
    meta: tuple[str, str] = ("batches.meta", "label_names")
    """``(file name, key)`` of the class names."""
    label_key: str = "labels"
    """The key of the labels in a batch (``labels``; ``fine_labels`` for CIFAR-100)."""


def _spec_from_torchvision(name: str, cls_name: str, label_key: str) -> CifarSpec:
    from torchvision import datasets

    cls = getattr(datasets, cls_name)
    return CifarSpec(
        name=name,
        folder=cls.base_folder,
        url=cls.url,
        archive=cls.filename,
        archive_md5=cls.tgz_md5,
        train=tuple((f, md5) for f, md5 in cls.train_list),
        test=tuple((f, md5) for f, md5 in cls.test_list),
        meta=(cls.meta["filename"], cls.meta["key"]),
        label_key=label_key,
    )


SPECS: dict[str, CifarSpec] = {
    "cifar10": _spec_from_torchvision("cifar10", "CIFAR10", "labels"),
    "cifar100": _spec_from_torchvision("cifar100", "CIFAR100", "fine_labels"),
}


def data_root() -> Path:
    """The data root: ``$ZOOSCAN_DATA`` or ``~/.cache/zooscan/data``."""
    raw = os.environ.get(DATA_ENV, "").strip()
    return Path(raw).expanduser() if raw else DEFAULT_ROOT.expanduser()


class _CifarDataset:
    """One split of a CIFAR variant, read from disk (downloaded once if missing)."""

    name = ""
    description = ""

    def __init__(self, argument: str | None = None) -> None:
        split = (argument or "train").strip().lower()
        if split not in ("train", "test"):
            raise DatasetError(f"{self.name}: unknown split {argument!r} (use train or test)")
        self.split = split
        self.spec = SPECS[self.name]
        self.root = data_root()
        self.folder = self.root / self.spec.folder
        self._keys: dict[str, str] = {}
        if not self._present():
            _download(self.spec, self.root)
            if not self._present():
                raise DatasetError(
                    f"{self.name}: the download did not produce {self.folder} "
                    f"with {', '.join(f for f, _ in self._files)}"
                )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.split!r}, root={str(self.root)!r})"

    @property
    def _files(self) -> tuple[tuple[str, str], ...]:
        return self._split_files(self.split)

    def _split_files(self, split: str) -> tuple[tuple[str, str], ...]:
        return self.spec.train if split == "train" else self.spec.test

    def _present(self) -> bool:
        return all((self.folder / name).is_file() for name, _ in self._files)

    @cached_property
    def key(self) -> str:
        """``cifar10:train`` for the official files, ``cifar10:train#<hash>`` otherwise."""
        return self._split_key(self.split)

    def _split_key(self, split: str) -> str:
        if split not in self._keys:
            self._keys[split] = self._compute_key(split)
        return self._keys[split]

    def _compute_key(self, split: str) -> str:
        files = self._split_files(split)
        digests = [(name, _md5(self.folder / name), md5) for name, md5 in files]
        base = f"{self.name}:{split}"
        if all(actual == expected for _, actual, expected in digests):
            return base
        changed = ", ".join(name for name, actual, expected in digests if actual != expected)
        log.warning(
            "%s: %s in %s differ from the official release (MD5); using them anyway",
            self.name,
            changed,
            self.folder,
        )
        joined = hashlib.sha256("".join(actual for _, actual, _ in digests).encode())
        return f"{base}#{joined.hexdigest()[:12]}"

    def batches(self, channels: int) -> Iterator[np.ndarray]:
        """Yield float32 ``(n, channels, 32, 32)`` batches in ``[0, 1]`` (RGB or luminance)."""
        if channels not in (1, 3):
            raise DatasetError(
                f"{self.name}: gives 3 (RGB) or 1 (luminance) channels, not {channels}"
            )
        for name, _ in self._files:
            images = read_batch(self.folder / name)
            for start in range(0, len(images), IMAGES_PER_BATCH):
                rgb = images[start : start + IMAGES_PER_BATCH].astype(np.float32) / 255.0
                if channels == 1:
                    luma = np.tensordot(rgb, LUMA_601, axes=([1], [0]))
                    yield np.clip(luma, 0.0, 1.0).astype(np.float32)[:, None]
                else:
                    yield rgb

    def labelled(
        self, split: str, *, size: int | None = None, count: int | None = None
    ) -> LabelledImages:
        """One split (``train``: the five data batches / ``train``; ``test``) with its labels.

        Labels come from the batches (``labels``; CIFAR-100: ``fine_labels``), class
        names from the meta file (``label_names``; ``fine_label_names``). ``count``
        keeps a class-balanced subset (:func:`balanced_subset`) in file order; ``size``
        other than 32 resizes (bilinear, antialiased). The key is the split's dataset
        key (``cifar10:train``, with ``#<hash>`` for unofficial files) when all
        32x32 images are given, so the training images share the scanned basis, and
        gets ``:size=S,count=N`` otherwise.
        """
        split = check_split(self.name, split)
        size = 32 if size is None else positive_int(self.name, "size", size)
        if count is not None:
            count = positive_int(self.name, "count", count)
        names = [name for name, _ in self._split_files(split)]
        missing = [
            name for name in [*names, self.spec.meta[0]] if not (self.folder / name).is_file()
        ]
        if missing:
            raise DatasetError(f"{self.name}: {', '.join(missing)} missing in {self.folder}")
        classes = read_class_names(self.folder / self.spec.meta[0], self.spec.meta[1])
        parts = [read_labelled_batch(self.folder / name, self.spec.label_key) for name in names]
        images = np.concatenate([batch for batch, _ in parts])
        labels = np.concatenate([batch_labels for _, batch_labels in parts])
        if labels.size and labels.max() >= len(classes):
            raise DatasetError(
                f"{self.name}: label {labels.max()} but {self.spec.meta[0]} names "
                f"{len(classes)} classes"
            )
        key = self._split_key(split)
        if count is not None or size != 32:
            chosen = (
                np.arange(len(labels))
                if count is None
                else balanced_subset(labels, count, self.name)
            )
            check_labelled_bytes(self.name, len(chosen), size)
            images, labels = images[chosen], labels[chosen]
            if size != 32:
                images = _resize(images, size)
            key = f"{key}:size={size},count={len(chosen)}"
        return LabelledImages(images, labels, classes, key)


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 ``(n, 3, 32, 32)`` resized to ``size`` x ``size``, in chunks."""
    return np.concatenate(
        [
            resize_square(images[start : start + IMAGES_PER_BATCH].astype(np.float32) / 255.0, size)
            for start in range(0, len(images), IMAGES_PER_BATCH)
        ]
    )


class Cifar10Dataset(_CifarDataset):
    """CIFAR-10 (50 000 train / 10 000 test images, 32x32 RGB)."""

    name = "cifar10"
    description = "CIFAR-10 train split (cifar10:test for test); $ZOOSCAN_DATA, downloads once"


class Cifar100Dataset(_CifarDataset):
    """CIFAR-100 (50 000 train / 10 000 test images, 32x32 RGB)."""

    name = "cifar100"
    description = "CIFAR-100 train split (cifar100:test for test); $ZOOSCAN_DATA, downloads once"


# --- reading the batches without executing code -------------------------------------


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles of bytes use it, latin-1 only."""
    if codecs.lookup(encoding).name != "iso8859-1":
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return codecs.encode(text, "latin1")


def _numpy_attr(submodule: str, name: str) -> Any:
    """``numpy.<submodule>.<name>``, under numpy 2's ``_core`` or numpy 1's ``core``."""
    for package in ("numpy._core", "numpy.core"):
        try:
            return getattr(importlib.import_module(f"{package}.{submodule}"), name)
        except (ImportError, AttributeError):
            continue
    raise pickle.UnpicklingError(f"numpy has no {submodule}.{name}")


_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): lambda: _numpy_attr("multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): lambda: _numpy_attr("multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"): lambda: _numpy_attr("numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"): lambda: _numpy_attr("numeric", "_frombuffer"),
    ("_codecs", "encode"): lambda: _latin1_encode,
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler for plain containers of numpy arrays: every other global is refused."""

    def find_class(self, module: str, name: str) -> Any:
        factory = _ALLOWED_GLOBALS.get((module, name))
        if factory is None:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return factory()


def _unpickle(path: Path, what: str) -> dict:
    """The dict pickled in ``path`` (numpy arrays and plain containers only)."""
    try:
        with open(path, "rb") as handle:
            entry = _ArrayUnpickler(handle, encoding="latin1").load()
    except Exception as exc:  # a corrupt or hostile pickle can fail in many ways
        raise DatasetError(f"cannot read CIFAR {what} {path}: {exc}") from exc
    if not isinstance(entry, dict):
        raise DatasetError(f"{path} is not a CIFAR {what} (no dict inside)")
    return entry


def _field(entry: dict, name: str) -> Any:
    """``entry[name]`` whether the pickle stored the key as text or as bytes."""
    return entry.get(name, entry.get(name.encode()))


def read_batch(path: Path) -> np.ndarray:
    """The images of one CIFAR python batch file, uint8 ``(n, 3, 32, 32)`` RGB.

    Raises :class:`DatasetError` if the file is not such a batch (or asks the
    unpickler for anything but numpy arrays).
    """
    return _batch_images(path, _unpickle(path, "batch"))


def read_labelled_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (as :func:`read_batch`) and int64 labels (``entry[label_key]``) of a batch."""
    entry = _unpickle(path, "batch")
    images = _batch_images(path, entry)
    raw = _field(entry, label_key)
    try:
        labels = np.asarray(raw if raw is not None else [], dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise DatasetError(f"{path}: {label_key!r} are not integers ({exc})") from exc
    if labels.shape != (len(images),) or (labels.size and labels.min() < 0):
        raise DatasetError(
            f"{path}: expected {len(images)} non-negative {label_key!r}, got "
            f"{'none' if raw is None else labels.shape}"
        )
    return images, labels


def read_class_names(path: Path, key: str) -> tuple[str, ...]:
    """The class names stored under ``key`` in a CIFAR meta file."""
    raw = _field(_unpickle(path, "meta file"), key)
    if not isinstance(raw, (list, tuple)) or not raw:
        raise DatasetError(f"{path}: no {key!r} list of class names")
    return tuple(n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in raw)


def _batch_images(path: Path, entry: dict) -> np.ndarray:
    """The checked ``data`` array of an unpickled batch, as ``(n, 3, 32, 32)``."""
    data = _field(entry, "data")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        raise DatasetError(f"{path} is not a CIFAR batch (no uint8 'data' array)")
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetError(f"{path}: 'data' has shape {data.shape}, expected (n, 3072)")
    # each row: 1024 red, 1024 green, 1024 blue values, each a row-major 32x32 plane
    return data.reshape(-1, 3, 32, 32)


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --- downloading -------------------------------------------------------------------------


def _download(spec: CifarSpec, root: Path) -> None:
    """Fetch and unpack the archive with torchvision, failing fast when offline."""
    missing = f"{spec.name}: not found in {root / spec.folder}"
    try:
        request = urllib.request.Request(spec.url, method="HEAD", headers={"User-Agent": "zooscan"})
        with urllib.request.urlopen(request, timeout=PROBE_TIMEOUT_S):
            pass
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise DatasetError(
            f"{missing}, and {spec.url} cannot be reached ({_reason(exc)}). It needs the "
            f"network once: run again online, or put the extracted '{spec.folder}' folder "
            f"in {root} (set ${DATA_ENV} to use another root)"
        ) from exc
    from torchvision.datasets.utils import download_and_extract_archive

    log.info("%s: downloading %s into %s", spec.name, spec.url, root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        download_and_extract_archive(
            spec.url, str(root), filename=spec.archive, md5=spec.archive_md5, remove_finished=True
        )
    except (urllib.error.URLError, OSError, RuntimeError) as exc:
        raise DatasetError(f"{missing}, and downloading {spec.url} failed: {exc}") from exc


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    return str(reason if reason is not None else exc)
