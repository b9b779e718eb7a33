"""The ``timm`` source: every pretrained tag of ``timm.list_models(pretrained=True)``.

**Names** are timm's tags (``resnet50.a1_in1k``); patterns are fnmatch patterns on
them or on the architecture (``'convnext*'``). Listing builds nothing.

**The first layer** comes from the architecture built on the ``meta`` device, exactly
as ``timm.create_model(tag, pretrained=True)`` builds it (the tag's pretrained_cfg
sets ``num_classes``, ``in_chans`` and, for fixed-size models, ``img_size``; a few
builders also change the architecture when ``pretrained`` is set). Nothing is
downloaded: while the model is built, timm's own ``load_pretrained`` is replaced (in
the building thread only) by a recorder that keeps what it would have loaded with,
notably the model's ``checkpoint_filter_fn``. :func:`zooscan.layers.find_first_layer`
then runs on a ``(1, C, H, W)`` input of the pretrained ``input_size`` and the result
is cross-checked with ``pretrained_cfg["first_conv"]``: every branch found must be a
declared first conv (or inside one); declared convs that are not part of the layer
must be other consumers of the image (CrossViT's second scale). A disagreement fails
the model with both names.

Weight initialisation is skipped on meta tensors (:class:`SkipMetaInit`; it computes
nothing there but was most of a build's time), and tags that share an architecture and
every build-relevant pretrained_cfg entry (:func:`build_key`: ``resnet50.a1_in1k``,
``resnet50.a2_in1k``...) share one build per :class:`TimmSource`.

**Input normalisation**: ``mean``/``std`` (on the ``[0, 1]`` scale, RGB: timm models
are RGB) and ``input_size`` come from the pretrained_cfg; ``crop_pct`` plays no part.

**Weights** are located the way timm's ``load_pretrained`` does (``_builder.py``,
``_hub.py``): an ``hf_hub_id`` (optionally ``repo@revision``) with ``hf_hub_filename``
or else ``model.safetensors``, falling back to ``pytorch_model.bin`` (timm's
``_get_safe_alternatives``); the ``url`` of URL-only entries; a ``file`` path. Only
the first layer's tensors are read, with :func:`zooscan.remote.fetch_tensors`
(safetensors header + one ranged read, torch zip central directory + ``data.pkl`` +
the storage entries); a file already in the Hugging Face cache (``HF_HOME``), or for
URL entries in timm's torch-hub cache (``TORCH_HOME``), is read from there and nothing
is fetched. ``ZOOSCAN_TIMM_URL_MIRROR`` serves URL entries
from a mirror: ``https://HOST/PATH`` is fetched from ``$ZOOSCAN_TIMM_URL_MIRROR/HOST/PATH``
(provenance keeps the official URL).

**Checkpoint keys** normally equal the module names (the ``timm/`` hub repos hold
timm-format weights). When a model has a ``checkpoint_filter_fn``, it is applied to a
state dict of *meta* placeholders shaped as the file's header says (no data), so the
key each parameter comes from is known exactly: a renamed key (Florence-2's
``vision_tower.convs.0.proj.weight`` → DaViT ``stem.conv.weight``) is followed; a
value the filter *computes* (reshaped, resampled, re-ordered) is not replayed and
fails the model with the reason, as does a key absent from the file. The fetched
tensor's shape must equal the meta parameter's shape. Never silently wrong.

Options (``-o revision=REV``): ``revision``, a branch, tag or commit used for every hub
repository instead of the pretrained_cfg's own (``repo@rev``) or ``main``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib
import inspect
import os
import re
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import timm
import torch
from timm.models import _builder as timm_builder
from timm.models import _registry as timm_registry
from timm.models import get_model_traits, get_pretrained_cfg
from torch import nn
from torch.overrides import TorchFunctionMode

import zooscan
from zooscan.checkpoints import LoadedTensor, TensorInfo, resolve_key
from zooscan.errors import (
    CheckpointError,
    FirstLayerNotFound,
    ModelError,
    UnsupportedModel,
    UserError,
)
from zooscan.layers import LayerSpec, build_on_meta, find_first_layer
from zooscan.records import FirstLayer, ModelRef, Provenance, check_options
from zooscan.remote import (
    FetchResult,
    HubAccessDenied,
    HubClient,
    HubNotFound,
    HubOffline,
    HubUnavailable,
    RemoteFile,
    fetch_tensors,
    remote_index,
)

KNOWN_OPTIONS = {
    "revision": "branch, tag or commit for every hub repository (default: the "
    "pretrained_cfg's own, else main)",
}
URL_MIRROR_ENV = "ZOOSCAN_TIMM_URL_MIRROR"
SAFE_WEIGHTS = "model.safetensors"
TORCH_WEIGHTS = "pytorch_model.bin"
OPEN_CLIP_WEIGHTS = "open_clip_pytorch_model.bin"
OPEN_CLIP_SAFE_WEIGHTS = "open_clip_model.safetensors"
CFG_KEYS = (
    "architecture", "tag", "hf_hub_id", "hf_hub_filename", "url", "file", "source",
    "custom_load", "input_size", "fixed_input_size", "interpolation", "mean", "std",
    "num_classes", "first_conv", "license",
)  # fmt: skip
"""The pretrained_cfg entries kept in each model's metadata."""
LOCAL_DIR_FILES = (SAFE_WEIGHTS, TORCH_WEIGHTS, "pytorch_model.pth", "model.pth")
"""Files of a ``local-dir`` source, in timm's order of preference."""
HEADER_ALLOWANCE = 64 * 1024
"""Bytes :meth:`TimmSource.plan` counts for a checkpoint's header: the first block
:func:`zooscan.remote.fetch_tensors` reads (which holds a timm safetensors header)."""
_CACHE_SIZE = 16
_REPO_LEVEL_ERRORS = ("RepoNotFound", "RevisionNotFound", "GatedRepo")
"""Hub error codes after which trying another file name is pointless."""


# ----------------------------------------------------------------- the source


class TimmSource:
    """Source over timm's pretrained tags (see the module docstring)."""

    name = "timm"
    description = (
        "timm pretrained tags (timm.list_models(pretrained=True)); architecture on meta, "
        "only the first-layer tensor fetched from the hub"
    )

    def __init__(self, options: dict[str, str]) -> None:
        check_options("timm source", options, KNOWN_OPTIONS)
        revision = options.get("revision")
        if revision is not None and not revision.strip():
            raise UserError("timm source: option revision is empty")
        self.revision = revision.strip() if revision else None
        self._client: HubClient | None = None
        self._client_lock = threading.Lock()
        self._identified: OrderedDict[tuple, Identified] = OrderedDict()
        self._identified_lock = threading.Lock()
        self._building: dict[tuple, threading.Lock] = {}
        self._plan_bytes: dict[tuple, int] = {}

    # ------------------------------------------------------------------ listing

    def list_models(self, patterns: Sequence[str]) -> Iterator[ModelRef]:
        """Every pretrained tag matching ``patterns`` (fnmatch on the tag or the
        architecture; all when empty), sorted; nothing is built or fetched."""
        for tag in sorted(timm.list_models(pretrained=True)):
            cfg = pretrained_cfg(tag)
            arch = cfg.get("architecture") or tag.split(".", 1)[0]
            if patterns and not any(fnmatchcase(tag, p) or fnmatchcase(arch, p) for p in patterns):
                continue
            yield ModelRef(self.name, tag, model_info(tag, cfg, self.revision))

    # ------------------------------------------------------------------ loading

    def load_first_layer(self, ref: ModelRef) -> FirstLayer:
        """The first layer of the timm tag ``ref.name``, read from its checkpoint."""
        ident = self.identify(ref.name)
        location = weight_location(ident.cfg, self.revision)
        return ident.to_first_layer(fetch_weights(self.client, location, ident))

    def identify(self, tag: str) -> Identified:
        """:func:`identify`, built once per :func:`build_key`: tags that share an
        architecture and everything of their pretrained_cfg that can shape the build
        (``resnet50.a1_in1k``, ``resnet50.a2_in1k``...) share one build, each with its
        own pretrained_cfg. A small LRU cache; concurrent callers of one key wait for a
        single build. Failures are not cached."""
        cfg = pretrained_cfg(tag)  # an unknown tag fails here
        key = build_key(tag, cfg)
        with self._identified_lock:
            cached = self._lookup(key)
            if cached is None:
                building = self._building.setdefault(key, threading.Lock())
        if cached is not None:
            return cached.for_tag(tag, cfg)
        with building:
            with self._identified_lock:
                cached = self._lookup(key)
            if cached is None:
                try:
                    cached = identify(tag)
                    with self._identified_lock:
                        self._store(key, cached)
                finally:
                    with self._identified_lock:
                        self._building.pop(key, None)
        return cached.for_tag(tag, cfg)

    def _lookup(self, key: tuple) -> Identified | None:
        found = self._identified.get(key)
        if found is not None:
            self._identified.move_to_end(key)
        return found

    def _store(self, key: tuple, ident: Identified) -> None:
        self._identified[key] = ident
        while len(self._identified) > _CACHE_SIZE:
            self._identified.popitem(last=False)

    def plan(self, ref: ModelRef) -> dict[str, Any]:
        """What loading ``ref`` would cost, without network access.

        ``cached``: a candidate file is in the Hugging Face cache (or the weights are a
        local file). Otherwise ``requests`` is a resolve, the first block and one ranged
        read (a safetensors file, timm's default) and ``bytes`` the first-layer tensors
        at the meta model's dtype plus that first block (:data:`HEADER_ALLOWANCE`).
        Tags of one :func:`build_key` are built once.
        """
        cfg = pretrained_cfg(ref.name)
        location = weight_location(cfg, self.revision)
        if location.kind in ("file", "dir") or cached_candidate(self.client, location):
            return {"requests": 0, "bytes": 0, "cached": True}
        group = build_key(ref.name, cfg)
        with self._identified_lock:
            tensor_bytes = self._plan_bytes.get(group)
        if tensor_bytes is None:
            tensor_bytes = sum(self.identify(ref.name).parameter_nbytes().values())
            with self._identified_lock:
                self._plan_bytes[group] = tensor_bytes
        return {"requests": 3, "bytes": tensor_bytes + HEADER_ALLOWANCE, "cached": False}

    @property
    def client(self) -> HubClient:
        """The :class:`~zooscan.remote.HubClient` shared by every worker of this source
        (made on first use: ``HF_ENDPOINT``, tokens, ``HF_HUB_OFFLINE``, the cache)."""
        with self._client_lock:
            if self._client is None:
                self._client = HubClient()
            return self._client


# ------------------------------------------------------------------- plugin hook


@zooscan.hookimpl
def register_sources(register) -> None:
    """Register the ``timm`` source."""
    register(TimmSource)


# ---------------------------------------------------------------- pretrained cfgs


def pretrained_cfg(tag: str) -> dict[str, Any]:
    """The registry's pretrained_cfg of ``tag`` as a dict (``None`` entries dropped)."""
    try:
        cfg = get_pretrained_cfg(tag)
    except RuntimeError as exc:  # a known architecture with an unknown tag
        raise ModelError(f"timm has no pretrained tag {tag!r} ({exc})") from None
    if cfg is None:
        raise ModelError(f"timm has no pretrained tag {tag!r}")
    return cfg.to_dict()


def model_info(tag: str, cfg: Mapping[str, Any], revision: str | None = None) -> dict[str, Any]:
    """The :attr:`ModelRef.info` of a tag: where its weights are and how it is fed."""
    location = weight_location(cfg, revision)
    return {
        "architecture": cfg.get("architecture"),
        "tag": cfg.get("tag"),
        "hf_hub_id": cfg.get("hf_hub_id"),
        "filename": location.filenames[0] if location.filenames else None,
        "filenames": list(location.filenames),
        "url": cfg.get("url") or None,
        "file": cfg.get("file"),
        "weights": location.kind,
        "input_size": list(cfg.get("input_size") or ()),
        "mean": list(cfg.get("mean") or ()),
        "std": list(cfg.get("std") or ()),
        "first_conv": _first_conv_tuple(cfg.get("first_conv")),
        "license": cfg.get("license"),
    }


@dataclass(frozen=True)
class WeightLocation:
    """Where timm would load a tag's weights from."""

    kind: str
    """``hub``, ``url``, ``file`` (a local file) or ``dir`` (a local directory)."""
    repo: str | None = None
    revision: str | None = None
    filenames: tuple[str, ...] = ()
    """Hub files to try, in timm's order of preference (the first one present wins)."""
    url: str | None = None
    path: str | None = None
    custom_format: bool = False
    """The file is in a foreign format that a model-specific loader converts (npz)."""

    @property
    def describe(self) -> str:
        """One line for messages."""
        if self.kind == "hub":
            at = f"@{self.revision}" if self.revision else ""
            return f"{self.repo}{at} ({' or '.join(self.filenames)})"
        return self.url or self.path or self.kind


def weight_location(cfg: Mapping[str, Any], revision: str | None = None) -> WeightLocation:
    """Resolve where the weights of a pretrained_cfg live, as timm's
    ``_resolve_pretrained_source`` and ``load_state_dict_from_hf`` do.

    ``revision`` replaces the hub revision (``hf_hub_id`` may carry ``@rev``).
    """
    source = cfg.get("source") or ""
    custom = bool(cfg.get("custom_load"))
    hub_id = cfg.get("hf_hub_id")
    if source == "hf-hub" or (source not in ("local-dir",) and not cfg.get("file") and hub_id):
        if not hub_id:
            raise ModelError("pretrained_cfg source is hf-hub but it has no hf_hub_id")
        repo, _, own_revision = hub_id.partition("@")
        filename = cfg.get("hf_hub_filename")
        return WeightLocation(
            kind="hub",
            repo=repo,
            revision=revision or own_revision or None,
            filenames=hub_filenames(filename),
            custom_format=bool(filename) and cfg.get("custom_load") == "hf",
        )
    if source == "local-dir":
        return WeightLocation(kind="dir", path=str(cfg.get("file") or ""))
    if cfg.get("file"):
        return WeightLocation(kind="file", path=str(cfg["file"]), custom_format=custom)
    if cfg.get("url"):
        return WeightLocation(kind="url", url=str(cfg["url"]), custom_format=custom)
    raise ModelError(
        f"{cfg.get('architecture', 'this model')}: the pretrained_cfg names no weights "
        "(no hf_hub_id, url or file)"
    )


def hub_filenames(filename: str | None) -> tuple[str, ...]:
    """The hub files timm tries for ``hf_hub_filename`` (``None``: the default), safest
    first: ``pytorch_model.bin`` → ``model.safetensors``, then itself."""
    name = filename or TORCH_WEIGHTS
    if name.endswith(".safetensors"):
        return (name,)
    if name == TORCH_WEIGHTS:
        return (SAFE_WEIGHTS, name)
    if name == OPEN_CLIP_WEIGHTS:
        return (OPEN_CLIP_SAFE_WEIGHTS, name)
    if name.endswith(".bin"):
        return (name[: -len(".bin")] + ".safetensors", name)
    return (name,)


def mirrored_url(url: str) -> str:
    """``url`` served from ``$ZOOSCAN_TIMM_URL_MIRROR/<host>/<path>`` when that is set."""
    mirror = os.environ.get(URL_MIRROR_ENV, "").strip()
    if not mirror:
        return url
    parts = urlparse(url)
    rest = parts.path + (f"?{parts.query}" if parts.query else "")
    return f"{mirror.rstrip('/')}/{parts.netloc}{rest}"


# ------------------------------------------------ building on meta, no download

_LOAD_SIGNATURE = inspect.signature(timm_builder.load_pretrained)
_ORIGINAL_LOAD = timm_builder.load_pretrained
_RECORDING = threading.local()
_PATCH_LOCK = threading.Lock()
_patch_users = 0
# Builds run one at a time. The load recorder, torch.device("meta") and the tracer's
# torch function modes are all thread-local, but warnings.catch_warnings() swaps
# process-wide state, and meta builds are Python-bound: measured with 4 threads and no
# lock, 77 distinct builds took 11.0 s against 8.5 s locked (9.6 s on one thread), as
# the GIL serialises them anyway. Tags sharing a build_key are built once instead.
_BUILD_LOCK = threading.RLock()


@dataclass
class PretrainedLoad:
    """The arguments timm's builder passed to ``load_pretrained`` (never run)."""

    pretrained_cfg: dict[str, Any]
    filter_fn: Callable | None
    num_classes: int
    in_chans: int
    strict: bool


def _recording_load_pretrained(*args: Any, **kwargs: Any) -> None:
    if not getattr(_RECORDING, "active", False):
        return _ORIGINAL_LOAD(*args, **kwargs)
    bound = _LOAD_SIGNATURE.bind(*args, **kwargs)
    bound.apply_defaults()
    values = bound.arguments
    _RECORDING.calls.append(
        PretrainedLoad(
            pretrained_cfg=dict(values.get("pretrained_cfg") or {}),
            filter_fn=values.get("filter_fn"),
            num_classes=int(values.get("num_classes", 0) or 0),
            in_chans=int(values.get("in_chans", 3) or 3),
            strict=bool(values.get("strict", True)),
        )
    )
    return None


@contextmanager
def recording_loads() -> Iterator[list[PretrainedLoad]]:
    """Within this context, in this thread, timm's builder records its
    ``load_pretrained`` calls instead of loading (so ``pretrained=True`` downloads
    nothing). Calls from other threads pass through to timm's own function; timm's
    module is restored when the last user leaves."""
    global _patch_users
    with _PATCH_LOCK:
        if _patch_users == 0:
            timm_builder.load_pretrained = _recording_load_pretrained
        _patch_users += 1
    calls: list[PretrainedLoad] = []
    _RECORDING.active, _RECORDING.calls = True, calls
    try:
        yield calls
    finally:
        _RECORDING.active = False
        with _PATCH_LOCK:
            _patch_users -= 1
            if _patch_users == 0:
                timm_builder.load_pretrained = _ORIGINAL_LOAD


_INIT_OPS = frozenset((
    "uniform_", "normal_", "trunc_normal_", "fill_", "zero_", "zeros_", "ones_", "constant_",
    "copy_", "clamp_", "clamp_min_", "clamp_max_", "clip_", "mul_", "div_", "add_", "sub_",
    "addcmul_", "addcdiv_", "erfinv_", "exp_", "log_", "sqrt_", "rsqrt_", "neg_", "abs_",
    "pow_", "fmod_", "remainder_", "lerp_", "exponential_", "log_normal_", "cauchy_",
    "geometric_", "bernoulli_", "random_", "xavier_uniform_", "xavier_normal_",
    "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "eye_", "dirac_", "sparse_",
    "masked_fill_", "index_fill_",
))  # fmt: skip
"""In-place operations a weight initialiser runs: values only, never a tensor's shape,
dtype or strides. On ``meta`` tensors they compute nothing, yet each still runs torch's
Python meta kernels; :class:`SkipMetaInit` skips them."""


class SkipMetaInit(TorchFunctionMode):
    """Within this mode, the in-place value operations of :data:`_INIT_OPS` applied to a
    ``meta`` tensor return that tensor at once.

    A meta tensor has no values, so weight initialisation (``trunc_normal_``,
    ``kaiming_normal_``, ``zero_``...) has no effect on it but costs most of a meta
    build (torch's reference meta kernels run in Python). Shapes, dtypes and strides are
    untouched by these operations, so the architecture built is the same; operations on
    ordinary tensors run as usual. The mode is thread-local, like every torch function
    mode.
    """

    def __torch_function__(
        self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None
    ) -> Any:
        name = getattr(func, "__name__", "")
        if name in _INIT_OPS and args:
            target = args[0]
            if isinstance(target, torch.Tensor) and target.is_meta:
                return target
        return func(*args, **(kwargs or {}))


def build_meta_model(tag: str) -> tuple[nn.Module, PretrainedLoad]:
    """``timm.create_model(tag, pretrained=True)`` on the ``meta`` device, in eval mode,
    with the load it would have done (nothing is downloaded; weight initialisation on
    meta tensors is skipped, see :class:`SkipMetaInit`)."""
    with _BUILD_LOCK, recording_loads() as calls, warnings.catch_warnings(), SkipMetaInit():
        warnings.simplefilter("ignore")
        try:
            model = build_on_meta(timm.create_model, tag, pretrained=True)
        except ModelError:
            raise
        except Exception as exc:
            raise UnsupportedModel(
                f"timm cannot build {tag} on the meta device: {type(exc).__name__}: "
                f"{_first_line(exc)}"
            ) from exc
    if not calls:
        raise UnsupportedModel(f"timm's builder for {tag} does not load pretrained weights")
    return model.eval(), calls[-1]


# ------------------------------------------------------------ identification


@dataclass
class Identified:
    """A tag's architecture on meta, its first layer and what timm would load."""

    tag: str
    cfg: dict[str, Any]
    """The resolved pretrained_cfg (as the builder passed it to ``load_pretrained``)."""
    model: nn.Module
    spec: LayerSpec
    filter_fn: Callable | None
    first_conv: tuple[str, ...]
    first_conv_check: str
    """How the layer found agrees with ``first_conv`` (for the metadata)."""
    cfg_from_registry: bool = True
    """The builder passed the registry's pretrained_cfg unchanged to ``load_pretrained``
    (so another tag of the same :func:`build_key` is described by its own)."""

    def for_tag(self, tag: str, registry_cfg: Mapping[str, Any]) -> Identified:
        """This identification for ``tag``, a tag of the same :func:`build_key`: the same
        architecture and layer, ``tag``'s own pretrained_cfg (``self`` for itself)."""
        if tag == self.tag:
            return self
        if not self.cfg_from_registry:  # the builder altered the cfg: never shared
            return identify(tag)
        return dataclasses.replace(self, tag=tag, cfg=dict(registry_cfg))

    @property
    def architecture(self) -> str:
        """timm's architecture name (the tag without its weights suffix)."""
        return str(self.cfg.get("architecture") or self.tag.split(".", 1)[0])

    @property
    def input_size(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the pretrained weights."""
        return _input_size(self.cfg)

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of each state-dict tensor the first layer reads, from the meta model."""
        state = self.model.state_dict()
        return {n: tuple(state[n].shape) for n in self.spec.parameter_names}

    def parameter_nbytes(self) -> dict[str, int]:
        """Bytes of each of those tensors at the meta model's dtype."""
        state = self.model.state_dict()
        return {n: state[n].numel() * state[n].element_size() for n in self.spec.parameter_names}

    def to_first_layer(self, fetched: Fetched) -> FirstLayer:
        """The :class:`FirstLayer` from the fetched tensors (keyed by parameter name)."""
        check_shapes(fetched.tensors, self.parameter_shapes(), self.tag)
        mean, std = self.cfg.get("mean"), self.cfg.get("std")
        _, h, w = self.input_size
        return self.spec.to_first_layer(
            {name: t.array for name, t in fetched.tensors.items()},
            mean=None if mean is None else tuple(float(v) for v in mean),
            std=None if std is None else tuple(float(v) for v in std),
            channel_order="RGB",
            input_size=(h, w),
            provenance=fetched.provenance(self.spec),
            metadata=self.metadata(fetched),
        )

    def metadata(self, fetched: Fetched | None = None) -> dict[str, Any]:
        """Architecture, tag, timm version, a pretrained_cfg subset, the input size."""
        cfg = {k: _plain(self.cfg[k]) for k in CFG_KEYS if self.cfg.get(k) is not None}
        meta: dict[str, Any] = {
            "architecture": self.architecture,
            "tag": self.cfg.get("tag") or self.tag.partition(".")[2],
            "timm": timm.__version__,
            "pretrained_cfg": cfg,
            "input_size": list(self.input_size),
            "first_conv_check": self.first_conv_check,
        }
        if fetched is not None and fetched.key_map:
            meta["checkpoint_keys"] = dict(fetched.key_map)
        return meta


def identify(tag: str) -> Identified:
    """Build ``tag`` on meta, find its first layer, cross-check it with timm's
    ``first_conv`` and check offline that its kernel can be materialised.

    Raises a :class:`~zooscan.errors.ModelError` subclass with the reason otherwise.
    """
    registry_cfg = pretrained_cfg(tag)  # an unknown tag fails here, before any build
    with _BUILD_LOCK:
        model, load = build_meta_model(tag)
        cfg = load.pretrained_cfg or registry_cfg
        c, h, w = _input_size(cfg)
        spec = find_first_layer(model, (1, c, h, w))
        declared = declared_first_conv(model, cfg)
        check = check_first_conv(spec, declared, model)
        dry_materialize(spec, model)
    same = _without_none(cfg) == _without_none(registry_cfg)
    return Identified(tag, cfg, model, spec, load.filter_fn, declared, check, same)


BUILD_NEUTRAL_CFG = frozenset(
    {
        "tag", "hf_hub_id", "hf_hub_filename", "url", "file", "source", "state_dict",
        "license", "description", "origin_url", "paper_ids", "paper_name", "notes",
        "crop_pct", "crop_mode", "interpolation", "test_input_size", "test_crop_pct",
        "test_crop_mode",
    }
)  # fmt: skip
"""pretrained_cfg entries that say where weights live, describe them or configure
evaluation transforms: timm's builder never reads them. Everything else (``num_classes``,
``input_size``, ``fixed_input_size``, ``first_conv``, ``mean``/``std``, custom entries)
is part of :func:`build_key`."""


def build_key(tag: str, cfg: Mapping[str, Any]) -> tuple:
    """What a meta build of ``tag`` depends on: the architecture, every pretrained_cfg
    entry except :data:`BUILD_NEUTRAL_CFG`, and the tag itself when the architecture's
    module reads its tag or pretrained_cfg name (``inception_v3.tv_in1k`` has aux
    logits, ``convnext_*.fcmae`` no head...). Tags with equal keys build identically."""
    arch = str(cfg.get("architecture") or tag.split(".", 1)[0])
    entries = tuple(
        sorted((k, repr(v)) for k, v in cfg.items() if k not in BUILD_NEUTRAL_CFG and v is not None)
    )
    return (arch, entries, tag if _reads_tag(arch) else None)


@functools.cache
def _reads_tag(architecture: str) -> bool:
    """True when the timm module defining ``architecture`` looks at the tag or the
    pretrained_cfg name it was created with (conservative: any mention counts)."""
    module = timm_registry._model_to_module.get(architecture)
    source = ""
    with contextlib.suppress(ImportError, OSError, TypeError):
        source = inspect.getsource(importlib.import_module(f"timm.models.{module}"))
    return not source or bool(_TAG_READ.search(source))


_TAG_READ = re.compile(r"""\.tag\b|['"]tag['"]|['"]pretrained_cfg['"]""")


def _without_none(cfg: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg.items() if v is not None}


def declared_first_conv(model: nn.Module, cfg: Mapping[str, Any]) -> tuple[str, ...]:
    """timm's first conv(s) of the model: its traits (what timm's loader uses), else the
    pretrained_cfg's ``first_conv``."""
    traits = get_model_traits(model) or {}
    value = traits.get("first_conv", cfg.get("first_conv"))
    return _first_conv_tuple(value)


def check_first_conv(spec: LayerSpec, declared: Sequence[str], model: nn.Module) -> str:
    """Cross-check the layer found with timm's ``first_conv``; return how they agree.

    Each branch found must be a declared first conv or inside one (``stem.conv`` for
    ``stem.conv.conv``). A declared conv that the layer does not use must consume the
    image too (multi-scale stems such as CrossViT keep their first scale). Raises
    :class:`FirstLayerNotFound` on a disagreement, :class:`UnsupportedModel` when timm
    declares no first conv and the layer found does not read pixels.
    """
    found = [b.module for b in spec.branches if b.kind != "identity"]
    if not declared:
        if "input_map" in spec.flags:
            raise UnsupportedModel(
                f"timm declares no first conv (pretrained_cfg first_conv is empty) and the "
                f"first layer found, '{spec.module}', does not read image pixels: "
                f"{spec.flags['input_map']}"
            )
        return "first_conv not declared by timm"
    unmatched = [m for m in found if not any(_within(m, d) for d in declared)]
    if unmatched:
        raise FirstLayerNotFound(
            f"the first layer found ({', '.join(found)}) disagrees with timm's first_conv "
            f"({', '.join(declared)})"
        )
    others = set(spec.flags.get("other_image_consumers", []))
    unused = [d for d in declared if not any(_within(m, d) for m in found)]
    unseen = [d for d in unused if not any(_within(o, d) for o in others)]
    wrong = [d for d in unseen if not _reads_image_channels(model, d, spec.in_channels)]
    if wrong:
        raise FirstLayerNotFound(
            f"timm's first_conv ({', '.join(declared)}) includes {', '.join(wrong)}, which "
            f"the first layer found ({', '.join(found)}) does not use and which does not "
            "consume the image"
        )
    if unused:
        return f"agrees; also consuming the image: {', '.join(unused)} (not part of the layer)"
    return "agrees"


def _reads_image_channels(model: nn.Module, name: str, channels: int) -> bool:
    """True when module ``name`` is a conv or linear layer (or begins with one) taking
    ``channels`` inputs: a second image consumer the trace stopped before reaching
    (CrossViT-dagger's second scale follows a multi-conv first scale)."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return False
    layers = [m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        layers = [module]
    if not layers:
        return False
    first = layers[0]
    width = first.in_channels if isinstance(first, nn.Conv2d) else first.in_features
    return width == channels or (isinstance(first, nn.Linear) and width % channels == 0)


def dry_materialize(spec: LayerSpec, model: nn.Module) -> None:
    """Materialise the kernel from ones shaped like the meta parameters: proves offline
    that the layer maps onto image pixels (raises :class:`UnsupportedModel` if not)."""
    state = model.state_dict()
    tensors = {n: np.ones(tuple(state[n].shape), dtype=np.float32) for n in spec.parameter_names}
    spec.materialize(tensors)


def check_shapes(
    tensors: Mapping[str, LoadedTensor], expected: Mapping[str, tuple[int, ...]], tag: str
) -> None:
    """Raise :class:`CheckpointError` unless every fetched tensor has the shape of the
    meta parameter it stands for."""
    for name, shape in expected.items():
        if name not in tensors:
            raise CheckpointError(f"{tag}: the checkpoint gave no tensor for {name}")
        got = tuple(tensors[name].shape)
        if got != tuple(shape):
            raise CheckpointError(
                f"{tag}: checkpoint tensor {tensors[name].key} has shape {list(got)} but the "
                f"model's {name} has shape {list(shape)}"
            )


# ------------------------------------------------------------------ fetching


@dataclass
class Fetched:
    """The first layer's tensors and where they came from."""

    tensors: dict[str, LoadedTensor]
    """Keyed by the model's parameter names."""
    repo: str | None
    revision: str | None
    file: str | None
    bytes_fetched: int = 0
    key_map: dict[str, str] = field(default_factory=dict)
    """Parameter name → checkpoint key, where they differ."""

    def provenance(self, spec: LayerSpec) -> Provenance:
        """Provenance of the layer's weight tensor(s): one tensor's key, byte range and
        sha256; several (fused stems) joined with ``+``, no byte range, and the sha256
        of the branch digests joined with newlines."""
        weights = [self.tensors[k] for k in spec.weight_keys]
        if len(weights) == 1:
            key, byte_range, sha = weights[0].key, weights[0].byte_range, weights[0].sha256
        else:
            key = "+".join(w.key for w in weights)
            byte_range = None
            sha = hashlib.sha256("\n".join(w.sha256 for w in weights).encode()).hexdigest()
        return Provenance(
            repo=self.repo,
            revision=self.revision,
            file=self.file,
            tensor_key=key,
            byte_range=tuple(byte_range) if byte_range else None,
            sha256=sha,
            bytes_fetched=int(self.bytes_fetched),
        )


def fetch_weights(client: HubClient, location: WeightLocation, ident: Identified) -> Fetched:
    """Read the first layer's tensors from where timm would load them, fetching only
    their bytes (a cached or local file is read from disk).

    The tensors are asked for by parameter name first (one header read, one ranged
    read). When the file lacks a name, or the model's checkpoint filter says a name
    comes from another key, the file's index decides (:func:`map_checkpoint_keys`) and
    the keys it names are fetched.
    """
    if location.custom_format:
        raise UnsupportedModel(
            f"{ident.tag}: the weights at {location.describe} are in a foreign format that "
            "timm converts with a model-specific loader (custom_load); zooscan does not "
            "replay it"
        )
    wanted = ident.spec.parameter_names
    with client.meter() as meter:
        remote = open_location(client, location)
        try:
            first = fetch_tensors(client, remote, wanted)
        except (HubUnavailable, HubAccessDenied, HubOffline):
            raise
        except CheckpointError:  # a name is absent: the file's keys decide
            first = None
            index = _index_of(remote_index(client, remote))
        else:
            index = _index_of(first.infos)
        key_map = map_checkpoint_keys(ident, index)
        tensors = _collect(client, remote, key_map, first)
    return Fetched(
        tensors=tensors,
        repo=_repo_of(location, remote),
        revision=_revision_of(remote),
        file=remote.filename if location.kind == "hub" else (location.url or location.path),
        bytes_fetched=meter.bytes,
        key_map={n: k for n, k in key_map.items() if n != k},
    )


def _collect(
    client: HubClient, remote: RemoteFile, key_map: Mapping[str, str], first: FetchResult | None
) -> dict[str, LoadedTensor]:
    """The tensor of each parameter name: from the first read when it read that key,
    else from one more read of the keys still missing."""
    tensors: dict[str, LoadedTensor] = {}
    missing: list[str] = []
    for name, key in key_map.items():
        got = first.tensors.get(name) if first is not None else None
        if got is not None and got.key == key:
            tensors[name] = got
        else:
            missing.append(name)
    if missing:
        more = fetch_tensors(client, remote, list(dict.fromkeys(key_map[n] for n in missing)))
        for name in missing:
            tensors[name] = more.tensors[key_map[name]]
    return tensors


def open_location(client: HubClient, location: WeightLocation) -> RemoteFile:
    """The file timm would load: the first hub candidate that exists
    (``model.safetensors`` before ``pytorch_model.bin``; the client answers from the
    Hugging Face cache when it can), the URL (through ``$ZOOSCAN_TIMM_URL_MIRROR``), or
    the local file."""
    if location.kind == "url":
        cached = torch_hub_cached(location.url or "")
        if cached is not None:
            return _local_file(cached, "file")
        return client.url_file(mirrored_url(location.url or ""))
    if location.kind in ("file", "dir"):
        return _local_file(Path(location.path or ""), location.kind)
    errors = []
    for filename in location.filenames:
        try:
            return client.resolve(location.repo, filename, revision=location.revision)
        except (HubNotFound, HubOffline) as exc:  # timm goes on to the next candidate
            if getattr(exc, "code", None) in _REPO_LEVEL_ERRORS:
                raise  # no other file of that repository/revision can exist either
            errors.append(str(exc))
    raise CheckpointError(f"{location.describe}: no weights file: {'; '.join(errors)}")


def _local_file(path: Path, kind: str) -> RemoteFile:
    if kind == "dir":
        path = next(
            (path / n for n in LOCAL_DIR_FILES if (path / n).is_file()),
            path / LOCAL_DIR_FILES[0],
        )
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    return RemoteFile(
        url=path.resolve().as_uri(),
        repo=None,
        revision=None,
        filename=path.name,
        size=path.stat().st_size,
        etag=None,
        local_path=str(path),
    )


def torch_hub_cached(url: str) -> Path | None:
    """Where timm caches a URL's weights (``torch.hub.get_dir()/checkpoints/<file>``,
    which honours ``TORCH_HOME``), when the file is there."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
    return path if path.is_file() else None


def cached_candidate(client: HubClient, location: WeightLocation) -> str | None:
    """The file a location would be read from without network: the first hub candidate
    in the Hugging Face cache, or a URL's file in timm's torch-hub cache."""
    if location.kind == "url":
        found = torch_hub_cached(location.url or "")
        return str(found) if found else None
    if location.kind != "hub" or not location.repo:
        return None
    for filename in location.filenames:
        found = client.cached(location.repo, filename, location.revision)
        if found:
            return found
    return None


def _repo_of(location: WeightLocation, remote: RemoteFile) -> str | None:
    if location.kind == "hub":
        return location.repo
    if location.kind == "url":
        return urlparse(location.url or "").netloc or None
    return str(Path(location.path or "").parent)


def _revision_of(remote: RemoteFile) -> str | None:
    if remote.revision:
        return remote.revision
    return f"etag:{remote.etag}" if remote.etag else None


def _index_of(infos: Sequence[TensorInfo]) -> dict[str, tuple[tuple[int, ...], str]]:
    return {i.key: (tuple(i.shape), i.dtype) for i in infos}


# ------------------------------------------------------------ checkpoint keys


def map_checkpoint_keys(
    ident: Identified, index: Mapping[str, tuple[tuple[int, ...], str]]
) -> dict[str, str]:
    """Parameter name → checkpoint key for every tensor the first layer reads.

    ``index`` maps the file's keys to ``(shape, dtype)``. With a checkpoint filter the
    model's ``checkpoint_filter_fn`` decides (see :func:`filtered_sources`); without one
    each name must be in the file (wrapper prefixes tolerated). Raises
    :class:`CheckpointError` with the reason when a name cannot be mapped exactly.
    """
    wanted = ident.spec.parameter_names
    keys = list(index)
    if ident.filter_fn is not None:
        sources = filtered_sources(ident, index)
        if sources is not None:
            return _from_filter(wanted, sources, keys, ident.tag)
    mapping = {}
    for name in wanted:
        try:
            mapping[name] = resolve_key(keys, name)
        except CheckpointError as exc:
            raise CheckpointError(f"{ident.tag}: checkpoint keys differ: {exc}") from None
    return mapping


def _from_filter(
    wanted: Sequence[str], sources: Mapping[str, str | None], keys: Sequence[str], tag: str
) -> dict[str, str]:
    mapping = {}
    for name in wanted:
        if name not in sources:
            raise CheckpointError(
                f"{tag}: checkpoint keys differ: wanted {name}, absent from the file even "
                f"after timm's checkpoint filter; file has {_key_sample(keys, name)}"
            )
        source = sources[name]
        if source is None:
            raise CheckpointError(
                f"{tag}: checkpoint keys differ: timm's checkpoint filter computes {name} "
                "from the file's tensors (reshaped, resampled or re-ordered), which zooscan "
                f"does not replay; file has {_key_sample(keys, name)}"
            )
        mapping[name] = source
    return mapping


def filtered_sources(
    ident: Identified, index: Mapping[str, tuple[tuple[int, ...], str]]
) -> dict[str, str | None] | None:
    """Run the model's checkpoint filter on meta placeholders of the file's tensors.

    Returns, for each key of the filtered state dict, the file key whose placeholder
    it holds unchanged, or ``None`` when the filter computed a new tensor. Returns
    ``None`` when the filter cannot run on placeholders (it needs values).
    """
    placeholders = {
        key: torch.empty(shape, dtype=_torch_dtype(dtype), device="meta")
        for key, (shape, dtype) in index.items()
    }
    origin = {id(t): key for key, t in placeholders.items()}
    try:
        with _BUILD_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = _apply_filter(ident.filter_fn, placeholders, ident.model)
    except Exception:  # a filter that needs values: fall back to plain key matching
        return None
    if not isinstance(out, Mapping):
        return None
    return {k: origin.get(id(v)) for k, v in out.items() if isinstance(v, torch.Tensor)}


def _apply_filter(filter_fn: Callable, state: dict, model: nn.Module) -> Any:
    try:
        return filter_fn(dict(state), model)
    except TypeError:  # timm accepts one-argument filters too
        return filter_fn(dict(state))


@functools.lru_cache(maxsize=32)
def _torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def _key_sample(keys: Sequence[str], name: str, limit: int = 6) -> str:
    """A few file keys, those resembling ``name`` first, for error messages."""
    import difflib

    close = difflib.get_close_matches(name, keys, n=limit, cutoff=0.3)
    shown = close + [k for k in keys if k not in close][: max(0, limit - len(close))]
    more = f" (+{len(keys) - len(shown)} more)" if len(keys) > len(shown) else ""
    return ", ".join(shown) + more if shown else "no tensors"


# ----------------------------------------------------------------- helpers


def _input_size(cfg: Mapping[str, Any]) -> tuple[int, int, int]:
    size = tuple(int(v) for v in (cfg.get("input_size") or (3, 224, 224)))
    if len(size) != 3:
        raise UnsupportedModel(f"pretrained_cfg input_size {list(size)} is not (C, H, W)")
    return size  # type: ignore[return-value]


def _first_conv_tuple(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value else ()
    return tuple(str(v) for v in value)


def _within(module: str, declared: str) -> bool:
    return module == declared or module.startswith(declared + ".")


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
