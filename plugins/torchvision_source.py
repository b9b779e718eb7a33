"""The ``torchvision`` source: every torchvision model builder that ships weights.

The architecture is built on the ``meta`` device (no weights, no memory) and the
first layer found by :func:`zooscan.layers.find_first_layer`; only that layer's
tensors are then read from torchvision's own checkpoint cache
(``torch.hub.get_dir()/checkpoints/<file>``, which honours ``TORCH_HOME``) with
``mmap`` and ``weights_only=True``. A checkpoint missing from the cache is downloaded
there with :func:`torch.hub.download_url_to_file` (checked against the hash prefix in
its name, as torchvision does).

Options (``--weights``, ``-o seed=N``):

- ``weights``: ``default`` (each builder's ``DEFAULT`` weights), ``none`` (random
  initialisation, the paper's control: the model is built for real on CPU with
  ``torch.manual_seed(seed)`` so the library's own init applies, and only the first
  layer is kept), or a weights name such as ``IMAGENET1K_V1`` (only builders that
  have it are listed).
- ``seed``: the seed for ``weights=none`` (default 0).

Model names identify the tensor: ``resnet50`` is the builder with its DEFAULT weights,
``resnet50@IMAGENET1K_V1`` other weights, ``resnet50@random-seed0`` a random init.
A name with an ``@`` suffix is loaded as its suffix says, whatever the options.

Video models (3-D convolutions), optical-flow models (two images, two encoders) and
quantized models (packed int8 weights) are listed with ``supported=False`` and a
``reason``; loading them raises :class:`UnsupportedModel`.

``ZOOSCAN_TORCHVISION_URL_BASE`` replaces ``https://download.pytorch.org/models/`` in
download URLs (a mirror, or a local server in tests); provenance keeps the official URL.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import importlib
import inspect
import io
import os
import re
import threading
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn
from torchvision.models import get_model_builder, get_model_weights
from torchvision.models import list_models as tv_list_models

import zooscan
from zooscan.checkpoints import LoadedTensor, read_tensors
from zooscan.errors import CheckpointError, ModelError, UnsupportedModel, UserError
from zooscan.layers import LayerSpec, build_on_meta, find_first_layer
from zooscan.records import FirstLayer, ModelRef, Provenance, check_options
from zooscan.remote import HubClient, fetch_tensors
from zooscan.remote.ranged import HEAD_BLOCK, HEADER_SLACK, TAIL_BLOCK, merge_spans
from zooscan.remote.zipdir import LOCAL_HEADER

URL_BASE_ENV = "ZOOSCAN_TORCHVISION_URL_BASE"
OFFICIAL_URL_BASE = "https://download.pytorch.org/models/"
KNOWN_OPTIONS = {
    "weights": "default | none (random init) | a weights name such as IMAGENET1K_V1",
    "seed": "integer seed for weights=none (default 0)",
    "fetch": "uncached weights: ranged (default: only the first-layer bytes) | full "
    "(download the whole file into the TORCH_HOME cache)",
}
FETCH_MODES = ("ranged", "full")
TASK_MODULES = {
    "classification": "torchvision.models",
    "detection": "torchvision.models.detection",
    "segmentation": "torchvision.models.segmentation",
    "video": "torchvision.models.video",
    "optical_flow": "torchvision.models.optical_flow",
    "quantization": "torchvision.models.quantization",
}
UNSUPPORTED_TASKS = {
    "video": "video model: its first layer is a 3-D convolution over time (Conv3d), "
    "not a 2-D filter bank on images",
    "optical_flow": "optical-flow model: it takes two images and two encoders (feature and "
    "context) consume them, so there is no single first layer",
    "quantization": "quantized model: packed int8 weights; scan the float builder of the "
    "same architecture instead",
}
_RANDOM_PREFIX = "random-seed"
_HASH_REGEX = re.compile(r"-([a-f0-9]*)\.")
_DETECTION_PROBE = 320
_DEFAULT_PROBE = 224

# Building for real (random init) uses the global RNG, and build_on_meta's fallback
# patches nn.Module for the duration of a build: builds are serialised.
_BUILD_LOCK = threading.RLock()


class TorchvisionSource:
    """Source over torchvision's model builders (see the module docstring)."""

    name = "torchvision"
    description = (
        "torchvision model builders (classification, detection, segmentation); "
        "first layer read from the TORCH_HOME cache, else fetched by ranged requests"
    )

    def __init__(self, options: dict[str, str]) -> None:
        check_options("torchvision source", options, KNOWN_OPTIONS)
        self.weights_option = _parse_weights_option(options.get("weights", "default"))
        self.seed = _parse_seed(options.get("seed"), self.weights_option)
        self.fetch = options.get("fetch", "ranged")
        if self.fetch not in FETCH_MODES:
            raise UserError(f"torchvision source: fetch must be ranged or full, not {self.fetch!r}")
        self._client: HubClient | None = None
        self._client_lock = threading.Lock()

    @property
    def client(self) -> HubClient:
        """One HTTP client for every worker of a scan (rate limits and retries shared)."""
        with self._client_lock:
            if self._client is None:
                self._client = HubClient()
            return self._client

    # ------------------------------------------------------------------ listing

    def list_models(self, patterns: Sequence[str]) -> Iterator[ModelRef]:
        """Every builder with weights matching ``patterns`` (fnmatch on the builder name
        or the model name), sorted by name; no weights are fetched."""
        for builder_name, task in _all_builders():
            weights = _select_weights(builder_name, self.weights_option)
            if weights is _ABSENT:
                continue
            name = _model_name(builder_name, weights, self.weights_option, self.seed)
            if patterns and not any(
                fnmatchcase(builder_name, p) or fnmatchcase(name, p) for p in patterns
            ):
                continue
            yield ModelRef(self.name, name, _info(builder_name, task, weights, self.seed))

    # ------------------------------------------------------------------ loading

    def load_first_layer(self, ref: ModelRef) -> FirstLayer:
        """The first layer of ``ref`` (builder name, optionally ``@WEIGHTS`` or
        ``@random-seedN``)."""
        builder_name, weights, seed = self._resolve(ref.name)
        task = task_of(builder_name)
        if task in UNSUPPORTED_TASKS:
            raise UnsupportedModel(f"{builder_name}: {UNSUPPORTED_TASKS[task]}")
        if weights is None:
            return _load_random(builder_name, task, seed)
        return _load_pretrained(builder_name, task, weights, self)

    def _resolve(self, name: str) -> tuple[str, Any, int]:
        builder_name, _, suffix = name.partition("@")
        if builder_name not in dict(_all_builders()):
            raise ModelError(f"torchvision has no model builder {builder_name!r}")
        if suffix.startswith(_RANDOM_PREFIX):
            try:
                return builder_name, None, int(suffix[len(_RANDOM_PREFIX) :])
            except ValueError as exc:
                raise ModelError(f"{name}: bad random seed suffix {suffix!r}") from exc
        option = suffix or self.weights_option
        weights = _select_weights(builder_name, option)
        if weights is _ABSENT:
            raise ModelError(
                f"{builder_name} has no weights {option!r} (has: {_weights_names(builder_name)})"
            )
        return builder_name, weights, self.seed

    # ------------------------------------------------------------------ dry run

    def plan(self, ref: ModelRef) -> dict[str, Any]:
        """What loading ``ref`` would cost, without any network request.

        ``cached``: random initialisation, or the checkpoint is in the TORCH_HOME cache
        (0 requests, 0 bytes). Unsupported models (video, optical flow, quantized) fail
        without fetching anything: 0 requests, 0 bytes, not cached. Otherwise, with
        ``fetch=full``, one download of the whole file (its size from the weights'
        ``_file_size``, a MiB figure rounded to the kilobyte; ``num_params`` × 4 where
        that is missing); with ``fetch=ranged``, what
        :func:`zooscan.remote.fetch_tensors` reads from a torch zip checkpoint laid out
        as ``torch.save`` writes the meta model's state dict (see
        :func:`ranged_fetch_cost`), plus the ``HEAD`` that locates the file. A legacy
        (non-zip) checkpoint would be downloaded whole instead; that cannot be known
        without reading it.
        """
        builder_name, weights, _ = self._resolve(ref.name)
        task = task_of(builder_name)
        if task in UNSUPPORTED_TASKS:
            return {"requests": 0, "bytes": 0, "cached": False}  # fails without fetching
        if weights is None or cache_path(weights.url).is_file():
            return {"requests": 0, "bytes": 0, "cached": True}
        if self.fetch == "full":
            return {"requests": 1, "bytes": file_size_estimate(weights), "cached": False}
        model = build_meta_model(builder_name, weights)
        spec = probe_first_layer(model, builder_name, task, weights)
        requests, nbytes = ranged_fetch_cost(
            model.state_dict(), spec.parameter_names, file_size_estimate(weights)
        )
        return {"requests": requests + 1, "bytes": nbytes, "cached": False}


# ------------------------------------------------------------------- plugin hook


@zooscan.hookimpl
def register_sources(register) -> None:
    """Register the ``torchvision`` source."""
    register(TorchvisionSource)


# -------------------------------------------------------------- options, naming

_ABSENT = object()


def _parse_weights_option(value: str) -> str | None:
    text = value.strip()
    if text.lower() == "default":
        return "DEFAULT"
    if text.lower() in ("none", "random"):
        return None
    if not text:
        raise UserError("torchvision source: option weights is empty (default | none | NAME)")
    return text.rsplit(".", 1)[-1]  # accept "ResNet50_Weights.IMAGENET1K_V1"


def _parse_seed(value: str | None, weights_option: str | None) -> int:
    if value is None:
        return 0
    if weights_option is not None:
        raise UserError("torchvision source: option seed applies only with weights=none")
    try:
        return int(value)
    except ValueError as exc:
        raise UserError(f"torchvision source: seed must be an integer, got {value!r}") from exc


@functools.lru_cache(maxsize=1)
def _all_builders() -> tuple[tuple[str, str], ...]:
    """``(builder name, task)`` for every registered builder that has weights."""
    found = {}
    for task, module_name in TASK_MODULES.items():
        module = importlib.import_module(module_name)
        for name in tv_list_models(module=module):
            with contextlib.suppress(ValueError, KeyError):
                if len(get_model_weights(name)) > 0:
                    found.setdefault(name, task)
    return tuple(sorted(found.items()))


def task_of(builder_name: str) -> str | None:
    """The task (``classification``, ``detection``...) of a builder, ``None`` if unknown."""
    return dict(_all_builders()).get(builder_name)


def _weights_names(builder_name: str) -> str:
    return ", ".join(w.name for w in get_model_weights(builder_name))


def _select_weights(builder_name: str, option: str | None):
    """The weights enum member the option selects, ``None`` for random init, or
    ``_ABSENT`` when the builder has no weights of that name."""
    if option is None:
        return None
    enum = get_model_weights(builder_name)
    if option == "DEFAULT":
        return enum.DEFAULT
    return enum.__members__.get(option, _ABSENT)


def _model_name(builder_name: str, weights, option: str | None, seed: int) -> str:
    if option is None:
        return f"{builder_name}@{_RANDOM_PREFIX}{seed}"
    if weights == get_model_weights(builder_name).DEFAULT:
        return builder_name
    return f"{builder_name}@{weights.name}"


def _info(builder_name: str, task: str, weights, seed: int) -> dict[str, Any]:
    default = get_model_weights(builder_name).DEFAULT
    shown = weights if weights is not None else default
    info: dict[str, Any] = {
        "builder": builder_name,
        "task": task,
        "weights": weights.name if weights is not None else "none",
        "url": weights.url if weights is not None else None,
        "file": _file_name(weights.url) if weights is not None else None,
        "num_params": shown.meta.get("num_params"),
        "supported": task not in UNSUPPORTED_TASKS,
        "cached": weights is not None and cache_path(weights.url).is_file(),
    }
    if weights is None:
        info["seed"] = seed
    if task in UNSUPPORTED_TASKS:
        info["reason"] = UNSUPPORTED_TASKS[task]
    return info


# ---------------------------------------------------------- building on meta


def build_kwargs(builder_name: str, weights) -> dict[str, Any]:
    """The builder keyword arguments that give the architecture ``weights`` expect,
    when the builder is called with ``weights=None`` (so nothing is downloaded).

    Mirrors what torchvision's builders set from a weights enum: ``num_classes`` from
    the categories, GoogLeNet/Inception's ``transform_input``/``aux_logits``, ViT's
    ``image_size``, MaxViT's ``input_size``; backbone weights are always disabled.
    """
    builder = get_model_builder(builder_name)
    params = inspect.signature(builder).parameters
    kwargs: dict[str, Any] = {}
    if "weights_backbone" in params:
        kwargs["weights_backbone"] = None
    if builder_name in ("googlenet", "inception_v3"):
        kwargs["init_weights"] = weights is None
    if weights is None:
        return kwargs
    meta = weights.meta
    if "categories" in meta and meta["categories"] is not None:
        kwargs["num_classes"] = len(meta["categories"])
    if builder_name in ("googlenet", "inception_v3"):
        kwargs.update(transform_input=True, aux_logits=True)
    if builder_name.startswith("vit_"):
        kwargs["image_size"] = meta["min_size"][0]
    if builder_name == "maxvit_t":
        kwargs["input_size"] = meta["min_size"]
    return kwargs


def build_meta_model(builder_name: str, weights) -> nn.Module:
    """The architecture for ``weights`` with every parameter on the ``meta`` device
    (:func:`zooscan.layers.build_on_meta`), in eval mode."""
    builder = get_model_builder(builder_name)
    kwargs = build_kwargs(builder_name, weights)
    with _BUILD_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_on_meta(builder, weights=None, **kwargs)
    return model.eval()


def probe_first_layer(model: nn.Module, builder_name: str, task: str, weights) -> LayerSpec:
    """:func:`find_first_layer` with the input the model expects (detection models:
    their backbone, after the model's own normalising transform)."""
    if task == "detection":
        size = _DETECTION_PROBE
        return find_first_layer(model, (1, 3, size, size), forward=lambda m, x: m.backbone(x))
    size = getattr(model, "image_size", None) or _crop_size(weights, builder_name)
    size = int(size or _DEFAULT_PROBE)
    return find_first_layer(model, (1, 3, size, size))


def _crop_size(weights, builder_name: str) -> int | None:
    if weights is None:
        weights = get_model_weights(builder_name).DEFAULT
    crop = getattr(weights.transforms(), "crop_size", None)
    return int(crop[0]) if crop else None


def normalisation(
    model: nn.Module, builder_name: str, task: str, weights
) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """``(mean, std)`` the model's input is normalised with, on the [0, 1] scale."""
    transform = getattr(model, "transform", None)
    if task == "detection" and transform is not None and hasattr(transform, "image_mean"):
        return tuple(map(float, transform.image_mean)), tuple(map(float, transform.image_std))
    preset = (weights or get_model_weights(builder_name).DEFAULT).transforms()
    mean, std = getattr(preset, "mean", None), getattr(preset, "std", None)
    if mean is None or std is None:
        return None, None
    return tuple(map(float, mean)), tuple(map(float, std))


# ------------------------------------------------------------------- loading


def _load_pretrained(builder_name: str, task: str, weights, source: TorchvisionSource):
    model = build_meta_model(builder_name, weights)
    spec = probe_first_layer(model, builder_name, task, weights)
    mean, std = normalisation(model, builder_name, task, weights)
    loaded, fetched = _first_layer_tensors(
        spec, weights, source, f"{builder_name} ({weights.name})"
    )
    key, byte_range, sha = describe_tensors(spec, loaded)
    provenance = Provenance(
        repo="torchvision",
        revision=torchvision.__version__,
        file=weights.url,
        tensor_key=key,
        byte_range=byte_range,
        sha256=sha,
        bytes_fetched=fetched,
    )
    crop = _crop_size(weights, builder_name) if task == "classification" else None
    return spec.to_first_layer(
        {name: t.array for name, t in loaded.items()},
        mean=mean,
        std=std,
        input_size=(crop, crop) if crop else None,
        provenance=provenance,
        metadata=_metadata(builder_name, task, weights),
    )


def _first_layer_tensors(spec: LayerSpec, weights, source: TorchvisionSource, what: str):
    """``({name: LoadedTensor}, bytes fetched)``: from the TORCH_HOME cache when the file
    is there, else by ranged requests for only those tensors (``fetch=ranged``) or by
    downloading the whole file into the cache (``fetch=full``)."""
    path = cache_path(weights.url)
    if path.is_file():
        return read_tensors(path, spec.parameter_names), 0
    if source.fetch == "full":
        fetched = download_to_cache(weights.url, path, what)
        return read_tensors(path, spec.parameter_names), fetched
    try:
        remote = source.client.url_file(download_url(weights.url))
        result = fetch_tensors(source.client, remote, spec.parameter_names)
    except CheckpointError as exc:
        raise CheckpointError(
            f"weights for {what} not in TORCH_HOME cache ({path}) and download failed: {exc}"
        ) from exc
    return result.tensors, result.bytes_fetched


def _load_random(builder_name: str, task: str, seed: int) -> FirstLayer:
    meta_model = build_meta_model(builder_name, None)
    spec = probe_first_layer(meta_model, builder_name, task, None)
    mean, std = normalisation(meta_model, builder_name, task, None)
    state = random_state(builder_name, seed, spec.parameter_names)
    loaded = {
        name: LoadedTensor(
            key=name,
            array=tensor.numpy().astype("float32"),
            sha256=hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest(),
            byte_range=None,
            dtype=str(tensor.dtype).removeprefix("torch."),
            shape=tuple(tensor.shape),
        )
        for name, tensor in state.items()
    }
    key, _, sha = describe_tensors(spec, loaded)
    provenance = Provenance(
        repo="torchvision", revision=torchvision.__version__, tensor_key=key, sha256=sha
    )
    metadata = _metadata(builder_name, task, None) | {"seed": seed}
    layer = spec.to_first_layer(
        {name: t.array for name, t in loaded.items()},
        mean=mean,
        std=std,
        provenance=provenance,
        metadata=metadata,
    )
    layer.flags["random_init"] = True
    return layer


def random_state(builder_name: str, seed: int, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Build the model for real on CPU after ``torch.manual_seed(seed)`` (the library's
    own initialisation) and keep only the tensors ``names``. The global RNG state is
    restored afterwards."""
    builder = get_model_builder(builder_name)
    kwargs = build_kwargs(builder_name, None)
    with _BUILD_LOCK, torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        with torch.device("cpu"):
            model = builder(weights=None, **kwargs)
    state = model.state_dict()
    return {name: state[name].detach().clone() for name in names}


def describe_tensors(
    spec: LayerSpec, loaded: dict[str, LoadedTensor]
) -> tuple[str, tuple[int, int] | None, str]:
    """Provenance fields for the first layer's weight tensor(s).

    One weight tensor (the usual case): its key, byte range and sha256. Several (fused
    multi-branch stems): keys joined with ``+``, no byte range, and the sha256 of the
    branch digests joined with newlines, in branch order.
    """
    weights = [loaded[k] for k in spec.weight_keys]
    if len(weights) == 1:
        return weights[0].key, weights[0].byte_range, weights[0].sha256
    combined = hashlib.sha256("\n".join(w.sha256 for w in weights).encode()).hexdigest()
    return "+".join(w.key for w in weights), None, combined


def _metadata(builder_name: str, task: str, weights) -> dict[str, Any]:
    shown = weights or get_model_weights(builder_name).DEFAULT
    return {
        "builder": builder_name,
        "weights": weights.name if weights is not None else "none",
        "task": task,
        "num_params": shown.meta.get("num_params"),
        "torchvision": torchvision.__version__,
    }


# ------------------------------------------------------------------- the cache


def _file_name(url: str) -> str:
    return os.path.basename(urlparse(url).path)


def cache_path(url: str) -> Path:
    """Where torchvision caches ``url``: ``torch.hub.get_dir()/checkpoints/<file>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / _file_name(url)


def download_url(url: str) -> str:
    """``url`` with the official base replaced by ``$ZOOSCAN_TORCHVISION_URL_BASE``."""
    base = os.environ.get(URL_BASE_ENV)
    if base and url.startswith(OFFICIAL_URL_BASE):
        return base.rstrip("/") + "/" + url[len(OFFICIAL_URL_BASE) :]
    return url


def download_to_cache(url: str, path: Path, what: str) -> int:
    """Download ``url`` (through :func:`download_url`) to ``path`` and return its size.

    :func:`torch.hub.download_url_to_file` writes a temporary file and renames it, so
    a failed download leaves nothing behind; the sha256 prefix in the file name
    (``resnet18-f37072fd.pth``) is verified as torchvision does. Any failure raises
    :class:`CheckpointError` naming ``what`` and the cache path.
    """
    match = _HASH_REGEX.search(path.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(
            download_url(url),
            str(path),
            hash_prefix=match.group(1) if match else None,
            progress=False,
        )
    except Exception as exc:  # urllib, socket and hash errors all mean "not available"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"weights for {what} not in TORCH_HOME cache ({path}) and download failed: {reason}"
        ) from exc
    return path.stat().st_size


# ------------------------------------------------------------------- dry run

_EOCD_SIZE = 22


def file_size_estimate(weights) -> int:
    """The checkpoint's size in bytes: the weights' ``_file_size`` (MiB, as torchvision
    records it) when present, else ``num_params`` × 4 (float32) as an estimate."""
    size_mib = weights.meta.get("_file_size")
    if size_mib:
        return int(round(float(size_mib) * 1024 * 1024))
    return int(weights.meta.get("num_params") or 0) * 4


def ranged_fetch_cost(
    state: dict[str, torch.Tensor], keys: Sequence[str], file_size: int
) -> tuple[int, int]:
    """``(requests, bytes)`` that :func:`zooscan.remote.fetch_tensors` makes to read
    ``keys`` from a torch zip checkpoint of ``state`` (meta tensors are fine) of about
    ``file_size`` bytes (the ``HEAD`` that locates the file is not counted).

    The archive is laid out by saving ``state`` with one-element storages (``data.pkl``,
    the small members and the central directory come out as in the real file), each
    storage's offset is then moved by the real sizes of the storages before it, and the
    reader's requests are replayed: the head block, the tail block, the central directory,
    ``data.pkl`` and ``byteorder`` where those blocks miss them, then one span per wanted storage
    (local header, :data:`~zooscan.remote.ranged.HEADER_SLACK` and the tensor's bytes),
    nearby spans merged, bytes already held reused.
    """
    names = list(state)
    wanted = sorted({names.index(k) for k in keys if k in state})
    layout = _zip_layout(state)
    size = max(file_size, layout.end_of_data(state) + layout.cd_size + _EOCD_SIZE)
    reader = _ReadReplay(size)
    reader.read(0, HEAD_BLOCK)
    reader.read(max(0, size - TAIL_BLOCK), size)
    cd_offset = size - _EOCD_SIZE - layout.cd_size
    reader.read(cd_offset, cd_offset + layout.cd_size)
    for header, nbytes in layout.small_members:
        reader.read(header, header + LOCAL_HEADER.size + HEADER_SLACK + nbytes)
    spans = []
    for index in wanted:
        header = layout.storage_header(index, state)
        nbytes = _nbytes(state[names[index]])
        spans.append((header, header + LOCAL_HEADER.size + HEADER_SLACK + nbytes))
    reader.prefetch(spans)
    return reader.requests, reader.bytes


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class _ZipLayout:
    """Where ``torch.save`` puts the members of a state dict's archive."""

    def __init__(self, small: bytes, count: int) -> None:
        archive = zipfile.ZipFile(io.BytesIO(small))
        infos = archive.infolist()
        storage_prefix = infos[0].filename.rsplit("/", 1)[0] + "/data/"
        storages = {
            int(i.filename[len(storage_prefix) :]): i
            for i in infos
            if i.filename.startswith(storage_prefix)
        }
        self.first = [storages[k].header_offset for k in range(count)]
        self.small_sizes = [storages[k].file_size for k in range(count)]
        first_storage = self.first[0] if count else len(small)
        self.small_members = [
            (i.header_offset, i.file_size)
            for i in infos
            if i.header_offset < first_storage and i.filename.endswith(("/data.pkl", "/byteorder"))
        ]
        """``data.pkl`` and ``byteorder``: the members the reader reads whole."""
        self.cd_size = sum(46 + len(i.filename) + len(i.extra) + len(i.comment) for i in infos)

    def storage_header(self, index: int, state: dict[str, torch.Tensor]) -> int:
        """The local header offset of storage ``index`` in the real archive."""
        tensors = list(state.values())
        grown = sum(_nbytes(tensors[k]) - self.small_sizes[k] for k in range(index))
        return self.first[index] + grown

    def end_of_data(self, state: dict[str, torch.Tensor]) -> int:
        """Where the last storage's bytes end in the real archive."""
        count = len(self.first)
        if not count:
            return 0
        last = list(state.values())[-1]
        return self.storage_header(count - 1, state) + LOCAL_HEADER.size + _nbytes(last)


def _zip_layout(state: dict[str, torch.Tensor]) -> _ZipLayout:
    """Save ``state`` with each tensor a one-element storage viewed as its real shape:
    the pickle (``_metadata`` of a ``state_dict()`` included), member names and directory
    match the real archive's."""
    small = collections.OrderedDict((name, _one_element(tensor)) for name, tensor in state.items())
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:
        small._metadata = metadata  # type: ignore[attr-defined]
    buffer = io.BytesIO()
    torch.save(small, buffer)
    return _ZipLayout(buffer.getvalue(), len(small))


def _one_element(tensor: torch.Tensor) -> torch.Tensor:
    if not tensor.dim():
        return torch.zeros((), dtype=tensor.dtype)
    return torch.zeros(1, dtype=tensor.dtype).expand(tensor.shape)


class _ReadReplay:
    """Counts the requests and bytes of :class:`zooscan.remote.ranged._Reader` calls
    (same reuse of held blocks, same merging of nearby spans)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.blocks: list[tuple[int, int]] = []
        self.requests = 0
        self.bytes = 0

    def read(self, start: int, end: int) -> None:
        end = min(end, self.size)
        pos = start
        while pos < end:
            block = next((b for b in self.blocks if b[0] <= pos < b[1]), None)
            if block is None:
                break
            pos = min(end, block[1])
        if pos < end:
            self.blocks.append((pos, end))
            self.requests += 1
            self.bytes += end - pos

    def prefetch(self, spans: Sequence[tuple[int, int]]) -> None:
        for start, end in merge_spans(spans, self.size, self._covered):
            self.read(start, end)

    def _covered(self, start: int, end: int) -> bool:
        return any(a <= start and end <= b for a, b in self.blocks)
