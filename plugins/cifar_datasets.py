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


def _spec_from_torchvision(name: str, cls_name: str) -> CifarSpec:
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
    )


SPECS: dict[str, CifarSpec] = {
    "cifar10": _spec_from_torchvision("cifar10", "CIFAR10"),
    "cifar100": _spec_from_torchvision("cifar100", "CIFAR100"),
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
        return self.spec.train if self.split == "train" else self.spec.test

    def _present(self) -> bool:
        return all((self.folder / name).is_file() for name, _ in self._files)

    @cached_property
    def key(self) -> str:
        """``cifar10:train`` for the official files, ``cifar10:train#<hash>`` otherwise."""
        digests = [(name, _md5(self.folder / name), md5) for name, md5 in self._files]
        base = f"{self.name}:{self.split}"
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


def read_batch(path: Path) -> np.ndarray:
    """The images of one CIFAR python batch file, uint8 ``(n, 3, 32, 32)`` RGB.

    Raises :class:`DatasetError` if the file is not such a batch (or asks the
    unpickler for anything but numpy arrays).
    """
    try:
        with open(path, "rb") as handle:
            entry = _ArrayUnpickler(handle, encoding="latin1").load()
    except Exception as exc:  # a corrupt or hostile pickle can fail in many ways
        raise DatasetError(f"cannot read CIFAR batch {path}: {exc}") from exc
    data = entry.get("data", entry.get(b"data")) if isinstance(entry, dict) else None
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
