"""The ``files`` source: first layers of local checkpoints.

Patterns are files or directories; directories are scanned recursively for
``.safetensors``, ``.pt``, ``.pth``, ``.bin`` (torch) and ``.npz`` files (hidden
files and folders are skipped). A model's name is its path relative to the scanned
directory without the extension (``runs/a/model``), or the file's stem for a file
argument. Names stay unique: files that would share one keep their extensions, then
get the scanned directory's name in front, and last their absolute path.

The first-layer tensor is, in order of precedence:

1. ``key`` (``--key``): that tensor (wrapper prefixes such as ``module.`` tolerated).
   A 2-D key (a linear patch embedding) also needs ``patch=CxKHxKW`` (``-o
   patch=3x16x16``), the ``(c, kh, kw)`` flatten order of its columns.
2. ``arch`` (``--arch``, a torchvision builder name): the architecture is built on
   the ``meta`` device with the builder's defaults (``weights=None``: GoogLeNet's
   ``transform_input`` is off, pass mean/std accordingly) and its first layer located
   there. Detection architectures normalise inside the model; their own
   ``image_mean``/``image_std`` apply unless mean/std are given.
3. Otherwise the first 4-D tensor in storage order.

Input normalisation (``mean``/``std`` on the ``[0, 1]`` pixel scale, comma-separated,
one value or one per channel; ``channel_order`` RGB, BGR or L) comes from the options
or from a sidecar JSON next to the checkpoint: ``<file>.json`` (``model.pt.json``) or
else ``<stem>.json`` (``model.json``)::

    {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
     "channel_order": "RGB", "key": "stem.conv.weight", "input_size": 224}

**Options override the sidecar**, key by key (a sidecar describes one file, options
a whole run, so the explicit command line wins). A broken sidecar (bad JSON, unknown
keys, wrong lengths, non-numbers, ``std`` below 1e-4) fails that model with the reason.
"""

from __future__ import annotations

import collections
import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

import zooscan
from zooscan.checkpoints import LoadedTensor, first_4d_tensor, list_tensors, read_tensors
from zooscan.errors import CheckpointError, ModelError, UserError
from zooscan.records import FirstLayer, ModelRef, Provenance, check_options

EXTENSIONS = (".safetensors", ".pt", ".pth", ".bin", ".npz")
KNOWN_OPTIONS = {
    "key": "checkpoint key of the first-layer tensor",
    "arch": "torchvision builder name that locates the first layer",
    "mean": "input mean per channel, comma-separated, [0,1] scale",
    "std": "input std per channel, comma-separated, [0,1] scale",
    "channel_order": "RGB | BGR | L",
    "patch": "CxKHxKW shape of a 2-D (linear patch embedding) key, e.g. 3x16x16",
}
SIDECAR_KEYS = ("mean", "std", "channel_order", "key", "input_size", "patch")
CHANNEL_ORDERS = ("RGB", "BGR", "L")
MIN_STD = 1e-4
"""Smallest input std accepted (on the [0, 1] scale): dividing filters by less would
only amplify them towards overflow (1/255, a std of 1 on the 0-255 scale, is the
smallest real models use)."""
_PATCH_RE = re.compile(r"^\s*(\d+)\s*x\s*(\d+)\s*x\s*(\d+)\s*$")


@dataclass(frozen=True)
class Settings:
    """How to read one checkpoint: options merged over its sidecar."""

    key: str | None = None
    arch: str | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    channel_order: str | None = None
    input_size: tuple[int, int] | None = None
    patch: tuple[int, int, int] | None = None

    def over(self, base: Settings) -> Settings:
        """These settings where set, ``base`` elsewhere."""
        return replace(base, **{k: v for k, v in self.__dict__.items() if v is not None})


class FilesSource:
    """Source over local checkpoint files (see the module docstring)."""

    name = "files"
    description = (
        "local checkpoints (.safetensors, .pt/.pth/.bin, .npz) in files or folders; "
        "normalisation from options or a <file>.json sidecar"
    )

    def __init__(self, options: dict[str, str]) -> None:
        check_options("files source", options, KNOWN_OPTIONS)
        try:
            self.options = _settings(options, origin="option")
        except ValueError as exc:
            raise UserError(f"files source: {exc}") from exc
        if self.options.key and self.options.arch:
            raise UserError("files source: give either key or arch, not both")
        if self.options.arch:
            _check_arch(self.options.arch)

    # ------------------------------------------------------------------ listing

    def list_models(self, patterns: Sequence[str]) -> Iterator[ModelRef]:
        """Checkpoints under ``patterns`` (files or directories), in a stable order."""
        if not patterns:
            raise UserError("files source: give one or more checkpoint files or directories")
        pairs = _unique(_expand(patterns))
        for (root, path), name in zip(pairs, _unique_names(pairs), strict=True):
            yield ModelRef(self.name, name, _info(root, path))

    # ------------------------------------------------------------------ loading

    def load_first_layer(self, ref: ModelRef) -> FirstLayer:
        """Read ``ref``'s first-layer tensor and its normalisation."""
        path = Path(ref.info.get("path") or ref.name)
        root = Path(ref.info.get("root") or path.parent)
        if not path.is_file():
            raise CheckpointError(f"{path}: no such file")
        try:
            settings = self.options.over(_settings(_read_sidecar(path), origin="sidecar"))
        except ValueError as exc:
            raise ModelError(f"{_sidecar_path(path)}: {exc}") from exc
        try:
            if settings.arch:  # only an option sets arch; it takes precedence over a sidecar key
                layer = _layer_from_arch(path, settings)
            else:
                layer = _layer_from_key(path, settings)
        except _ChannelMismatch as exc:
            origin = (
                "options" if getattr(self.options, exc.what) is not None else _sidecar_path(path)
            )
            raise ModelError(f"{origin}: {exc}") from exc
        _check_weight(layer, path)
        layer.provenance = _provenance(root, path, layer.provenance)
        layer.metadata = {**layer.metadata, "path": str(path.resolve())}
        return layer


# ------------------------------------------------------------------- plugin hook


@zooscan.hookimpl
def register_sources(register) -> None:
    """Register the ``files`` source."""
    register(FilesSource)


# ------------------------------------------------------------------- listing


def _expand(patterns: Sequence[str]) -> Iterator[tuple[Path, Path]]:
    """``(root, file)`` pairs; ``root`` is the scanned directory (a file's parent)."""
    for pattern in patterns:
        given = Path(pattern).expanduser()
        if given.is_file():
            yield given.parent.resolve(), given.resolve()
        elif given.is_dir():
            root = given.resolve()
            for path in sorted(root.rglob("*")):
                hidden = any(part.startswith(".") for part in path.relative_to(root).parts)
                if path.suffix.lower() in EXTENSIONS and path.is_file() and not hidden:
                    yield root, path
        else:
            raise UserError(f"files source: no such file or directory: {pattern}")


def _unique(pairs: Iterator[tuple[Path, Path]]) -> list[tuple[Path, Path]]:
    seen: dict[Path, tuple[Path, Path]] = {}
    for root, path in pairs:
        seen.setdefault(path, (root, path))
    return list(seen.values())


def _unique_names(pairs: list[tuple[Path, Path]]) -> list[str]:
    """Relative path without extension; where two files collide, with the extension;
    then prefixed by the scanned directory's name; last, the absolute path."""
    styles = (
        lambda root, path: path.relative_to(root).with_suffix("").as_posix(),
        lambda root, path: path.relative_to(root).as_posix(),
        lambda root, path: f"{root.name}/{path.relative_to(root).as_posix()}",
        lambda root, path: path.as_posix(),
    )
    names = [styles[0](root, path) for root, path in pairs]
    for style in styles[1:]:
        counts = collections.Counter(names)
        names = [
            style(root, path) if counts[name] > 1 else name
            for (root, path), name in zip(pairs, names, strict=True)
        ]
    return names


def _info(root: Path, path: Path) -> dict[str, Any]:
    return {
        "path": str(path),
        "root": str(root),
        "file": path.relative_to(root).as_posix(),
        "format": path.suffix.lower().lstrip("."),
        "bytes": path.stat().st_size,
    }


# ------------------------------------------------------------- settings, sidecars


def _sidecar_path(path: Path) -> Path | None:
    for candidate in (path.with_name(path.name + ".json"), path.with_suffix(".json")):
        if candidate.is_file():
            return candidate
    return None


def _read_sidecar(path: Path) -> dict[str, Any]:
    sidecar = _sidecar_path(path)
    if sidecar is None:
        return {}
    try:
        data = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{sidecar}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ModelError(f"{sidecar}: must hold a JSON object")
    unknown = sorted(set(data) - set(SIDECAR_KEYS))
    if unknown:
        raise ModelError(
            f"{sidecar}: unknown key(s) {', '.join(unknown)} (known: {', '.join(SIDECAR_KEYS)})"
        )
    return data


def _settings(raw: dict[str, Any], origin: str) -> Settings:
    """Validate options (strings) or a sidecar (JSON values); ``ValueError`` says why."""
    mean = _floats(raw.get("mean"), "mean", origin)
    std = _floats(raw.get("std"), "std", origin)
    if std is not None and any(s <= 0 for s in std):
        raise ValueError(f"std must be > 0, got {list(std)}")
    if std is not None and any(s < MIN_STD for s in std):
        raise ValueError(
            f"std {list(std)} is not on the [0, 1] pixel scale (the smallest plausible is "
            f"{MIN_STD}: a std of 1 on the 0-255 scale is 1/255)"
        )
    if mean is not None and any(abs(m) > 1.5 for m in mean):
        raise ValueError(f"mean {list(mean)} is not on the [0, 1] pixel scale (divide by 255?)")
    order = raw.get("channel_order")
    if order is not None and (not isinstance(order, str) or order.upper() not in CHANNEL_ORDERS):
        raise ValueError(f"channel_order must be one of {', '.join(CHANNEL_ORDERS)}, got {order!r}")
    key = raw.get("key")
    if key is not None and (not isinstance(key, str) or not key.strip()):
        raise ValueError(f"key must be a non-empty string, got {key!r}")
    arch = raw.get("arch")
    return Settings(
        key=key.strip() if key else None,
        arch=arch.strip() if arch else None,
        mean=mean,
        std=std,
        channel_order=order.upper() if order else None,
        input_size=_input_size(raw.get("input_size")),
        patch=_patch(raw.get("patch")),
    )


def _floats(value: Any, what: str, origin: str) -> tuple[float, ...] | None:
    if value is None:
        return None
    if origin == "option":
        items: list[Any] = [v for v in str(value).split(",") if v.strip()]
    else:
        items = value if isinstance(value, list) else [value]
    if not items:
        raise ValueError(f"{what} is empty")
    out = []
    for item in items:
        if isinstance(item, bool) or (origin == "sidecar" and not isinstance(item, (int, float))):
            raise ValueError(f"{what} must be numbers, got {item!r}")
        try:
            number = float(item)
        except ValueError as exc:
            raise ValueError(f"{what} must be numbers, got {item!r}") from exc
        if not math.isfinite(number):
            raise ValueError(f"{what} must be finite, got {item!r}")
        out.append(number)
    return tuple(out)


def _input_size(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    sizes = value if isinstance(value, list) else [value]
    if len(sizes) == 1:
        sizes = sizes * 2
    if len(sizes) != 2 or not all(
        isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes
    ):
        raise ValueError(f"input_size must be a positive integer or [height, width], got {value!r}")
    return int(sizes[0]), int(sizes[1])


def _patch(value: Any) -> tuple[int, int, int] | None:
    if value is None:
        return None
    match = _PATCH_RE.match(str(value))
    if not match or 0 in (dims := tuple(int(g) for g in match.groups())):
        raise ValueError(f"patch must look like CxKHxKW (e.g. 3x16x16), got {value!r}")
    return dims


def _check_arch(arch: str) -> None:
    from zooscan_builtins.torchvision_source import UNSUPPORTED_TASKS, task_of

    task = task_of(arch)
    if task is None:
        raise UserError(f"files source: arch {arch!r} is not a torchvision model builder")
    if task in UNSUPPORTED_TASKS:
        raise UserError(f"files source: arch {arch!r}: {UNSUPPORTED_TASKS[task]}")


# ------------------------------------------------------------------- loading


def _layer_from_arch(path: Path, settings: Settings) -> FirstLayer:
    from zooscan_builtins import torchvision_source as tv

    task = tv.task_of(settings.arch) or "classification"
    model = tv.build_meta_model(settings.arch, None)
    spec = tv.probe_first_layer(model, settings.arch, task, None)
    loaded = read_tensors(path, spec.parameter_names)
    key, byte_range, sha = tv.describe_tensors(spec, loaded)
    mean, std = _broadcast(settings, spec.in_channels)
    if task == "detection" and mean is None and std is None:
        # detection models normalise inside the architecture (GeneralizedRCNNTransform)
        mean, std = tv.normalisation(model, settings.arch, task, None)
    return spec.to_first_layer(
        {name: t.array for name, t in loaded.items()},
        mean=mean,
        std=std,
        channel_order=settings.channel_order or "RGB",
        input_size=settings.input_size,
        provenance=Provenance(tensor_key=key, byte_range=byte_range, sha256=sha),
        metadata={"arch": settings.arch, "located_by": "arch"},
    )


def _layer_from_key(path: Path, settings: Settings) -> FirstLayer:
    listed = list_tensors(path)  # storage order
    infos = {info.key: info for info in listed}
    located_by = "key" if settings.key else "first 4-D tensor"
    first_4d = next((info.key for info in listed if info.ndim == 4), None)
    wanted = settings.key or first_4d or first_4d_tensor(path).key  # the last one explains
    tensor = read_tensors(path, [wanted])[wanted]
    weight, kind = _as_4d(tensor, settings.patch)
    channels = weight.shape[1]
    mean, std = _broadcast(settings, channels)
    order = settings.channel_order or (
        "L" if channels == 1 else "RGB" if channels == 3 else "other"
    )
    _, kh, kw = weight.shape[1:]
    bias_key = _bias_key(tensor.key)
    return FirstLayer(
        weight=weight,
        module=tensor.key.removesuffix(".weight"),
        kind=kind,
        stride=(kh, kw) if kind == "linear" else (1, 1),
        bias=bias_key in infos,
        mean=mean,
        std=std,
        channel_order=order,
        input_size=settings.input_size,
        provenance=Provenance(
            tensor_key=tensor.key, byte_range=tensor.byte_range, sha256=tensor.sha256
        ),
        metadata={
            "located_by": located_by,
            "stored_dtype": tensor.dtype,
            "geometry": "unknown: stride and padding are not stored in a checkpoint"
            if kind == "conv"
            else "linear patch embedding: non-overlapping patches",
        },
    )


def _bias_key(weight_key: str) -> str:
    return weight_key[: -len("weight")] + "bias" if weight_key.endswith("weight") else ""


def _as_4d(tensor: LoadedTensor, patch: tuple[int, int, int] | None) -> tuple[np.ndarray, str]:
    array = tensor.array
    if array.ndim == 4:
        return array, "conv"
    if array.ndim == 2:
        if patch is None:
            raise ModelError(
                f"tensor {tensor.key!r} is 2-D {list(array.shape)}: a linear patch embedding "
                f"needs option patch=CxKHxKW (e.g. -o patch=3x16x16)"
            )
        c, kh, kw = patch
        if c * kh * kw != array.shape[1]:
            raise ModelError(
                f"patch {c}x{kh}x{kw} has {c * kh * kw} inputs but {tensor.key!r} has "
                f"{array.shape[1]} columns"
            )
        return np.ascontiguousarray(array.reshape(array.shape[0], c, kh, kw)), "linear"
    raise ModelError(
        f"tensor {tensor.key!r} has shape {list(array.shape)}: a first layer is 4-D "
        f"(out, C, kh, kw) or a 2-D linear patch embedding"
    )


class _ChannelMismatch(ValueError):
    def __init__(self, what: str, message: str) -> None:
        super().__init__(message)
        self.what = what


def _broadcast(settings: Settings, channels: int | None):
    """Mean and std with one value per input channel (a single value is repeated)."""
    out = []
    for name, values in (("mean", settings.mean), ("std", settings.std)):
        if values is not None and channels is not None and len(values) not in (1, channels):
            raise _ChannelMismatch(
                name,
                f"{name} has {len(values)} values but the first layer has "
                f"{channels} input channels",
            )
        if values is not None and channels is not None and len(values) == 1:
            values = values * channels
        out.append(values)
    return out[0], out[1]


def _check_weight(layer: FirstLayer, path: Path) -> None:
    weight = np.asarray(layer.weight)
    if weight.ndim != 4:
        raise ModelError(
            f"{path}: first-layer weight must be 4-D (out, C, kh, kw), got {list(weight.shape)}"
        )
    if not np.isfinite(weight).all():
        bad = int(np.size(weight) - np.isfinite(weight).sum())
        raise ModelError(
            f"{path}: first-layer weight {layer.provenance.tensor_key!r} has {bad} NaN/Inf values"
        )


def _provenance(root: Path, path: Path, found: Provenance) -> Provenance:
    mtime = datetime.fromtimestamp(path.stat().st_mtime, tz=timezone.utc)
    return Provenance(
        repo=str(root),
        revision=mtime.isoformat(),
        file=path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path),
        tensor_key=found.tensor_key,
        byte_range=found.byte_range,
        sha256=found.sha256,
        bytes_fetched=0,
    )
