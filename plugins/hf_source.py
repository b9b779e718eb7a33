"""The ``hf`` source: vision models of the Hugging Face hub built with ``transformers``.

**Listing** (no weights fetched). Without patterns, the hub's vision models are listed
through its ``/api/models`` endpoint, the request ``HfApi.list_models`` makes, sent by
:class:`zooscan.remote.HubClient` so that listing pages get the same retries, rate-limit
pacing and offline handling as file reads, and a page size of :data:`PAGE_SIZE` (which
``list_models`` cannot set without also capping the total). Filters: ``pipeline_tag``
(default :data:`DEFAULT_PIPELINE_TAGS`; one listing per tag, merged lazily in sort
order), ``library`` (default ``transformers``), ``search`` (substring of the repo id)
and ``sort`` (``downloads`` by default, descending). The scan's ``--limit`` consumes
the generator lazily, so only the pages needed are requested.

Patterns: a pattern with a ``/`` and no wildcard is an explicit repo id (yielded as is,
without any request); a pattern with wildcards (``google/vit-*``, ``*dinov2*``) filters
the listing by ``fnmatch`` on the repo id or on its name part, and its owner and
longest literal run narrow the hub query (``author``, ``search``). Offline
(``HF_HUB_OFFLINE``), wildcard patterns are matched against the model repositories in
the local Hugging Face cache whose ``config.json`` is cached (filters do not apply).

**Loading** one repo:

1. ``config.json`` is located (cache first, else one ``HEAD``: the commit sha) and
   read, and ``/api/models/{repo}/revision/{sha}`` lists the commit's files (offline:
   the cache decides). The config becomes a ``transformers`` config with the class of its
   ``model_type``. **Remote code never runs**: a config that declares ``auto_map``
   (custom code) or whose ``model_type`` transformers does not know is reported as
   :class:`~zooscan.errors.UnsupportedModel` ("needs trust_remote_code").
2. The architecture is built on the ``meta`` device (:func:`zooscan.layers.build_on_meta`):
   the vision tower for multimodal configs (``config.vision_config``: CLIP, SigLIP,
   BLIP, ALIGN, OWL-ViT...; the encoder of a ``vision-encoder-decoder``), else
   ``AutoModel.from_config``, else the class named in ``architectures``.
   :func:`zooscan.layers.find_first_layer` finds the first layer with a ``(1, C, H, W)``
   input (``num_channels``; ``image_size`` from the config, else the preprocessor's crop
   size / size, else 224) passed as ``pixel_values`` (SigLIP 2's NaFlex models get the
   image as patches, the way their processor makes them). Video models are refused.
3. The checkpoint key of each tensor the layer needs is found among the checkpoint's
   keys (``model.safetensors``; sharded through ``model.safetensors.index.json``; else
   ``pytorch_model.bin`` and its index): first with transformers' own load-time key
   renaming (base-model prefix added or stripped, per-model renames), else as the one
   checkpoint key that ends with ``"." + meta key``. Ambiguous or absent keys fail the
   model with the candidates named. Only those tensors' bytes are fetched: the file's
   header (or zip directory) is read once through :mod:`zooscan.remote`, the keys
   matched, then the tensors' byte ranges (a sharded checkpoint: the index, then
   :func:`zooscan.remote.fetch_tensors` on the shard holding them); shapes are checked
   against the meta parameters.
4. Input normalisation comes from ``preprocessor_config.json`` (or the
   ``image_processor`` section of ``processor_config.json``), completed with the
   defaults of the transformers image-processor class it names. The model sees
   ``x = (255 * p * r - o - mean) / std`` for pixels ``p`` in ``[0, 1]`` (``r`` =
   ``rescale_factor`` when ``do_rescale``, else 1; ``o`` = 1 with EfficientNet's
   ``rescale_offset``; mean 0 and std 1 when ``do_normalize`` is false), i.e. the
   effective ``mean' = (mean + o) / (255 r)`` and ``std' = std / (255 r)``
   (EfficientNet's ``include_top`` divides by ``image_std`` once more: ``std' * std``).
   ``do_flip_channel_order`` (MobileViT) means BGR. timm repositories (a ``config.json``
   with ``pretrained_cfg``, built as transformers' ``timm_wrapper``) take mean, std and
   input size from ``pretrained_cfg``. Without any of these the identity is assumed and
   the layer is flagged ``normalization_unknown``.

Options (``-o KEY=VALUE``): ``revision``, ``pipeline_tag`` (comma-separated, ``any``
for none), ``library`` (``any`` for none), ``sort``, ``search``.

The hub endpoint, token, cache and offline mode come from the environment
(``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HOME``/``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``), read
when the source is created.
"""

from __future__ import annotations

import contextlib
import fnmatch
import heapq
import json
import os
import re
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import zooscan
from zooscan.errors import (
    CheckpointError,
    FirstLayerNotFound,
    ModelError,
    UnsupportedModel,
    UserError,
)
from zooscan.records import FirstLayer, ModelRef, Provenance, check_options
from zooscan.remote import fetch_tensors

__all__ = [
    "DEFAULT_PIPELINE_TAGS",
    "HfOptions",
    "HfSource",
    "Normalisation",
    "conversion_renamer",
    "input_normalisation",
    "is_explicit_repo_id",
    "locate_first_layer",
    "match_checkpoint_keys",
    "matches_pattern",
    "model_candidates",
    "parse_config",
    "query_narrowing",
    "transformers_model_class",
]

DEFAULT_PIPELINE_TAGS = (
    "image-classification",
    "image-feature-extraction",
    "zero-shot-image-classification",
)
DEFAULT_LIBRARY = "transformers"
SORT_KEYS = {
    "downloads": "downloads",
    "likes": "likes",
    "created_at": "createdAt",
    "last_modified": "lastModified",
    "trending_score": "trendingScore",
}
"""Option value -> the hub's ``sort`` parameter, also the field of the listing entries."""
PAGE_SIZE = 100
MAX_PAGES = 10_000
"""Bound on the pages of one listing (a million models at :data:`PAGE_SIZE`)."""
LISTING_FIELDS = (
    "pipeline_tag",
    "library_name",
    "downloads",
    "likes",
    "createdAt",
    "lastModified",
    "trendingScore",
    "sha",
    "config",
    "gated",
)
KNOWN_OPTIONS = {
    "revision": "branch, tag or commit sha to read (default main)",
    "pipeline_tag": "comma-separated hub pipeline tags to list, or 'any' "
    f"(default {','.join(DEFAULT_PIPELINE_TAGS)})",
    "library": f"hub library filter, or 'any' (default {DEFAULT_LIBRARY})",
    "sort": f"listing order, descending: {' | '.join(SORT_KEYS)} (default downloads)",
    "search": "only repo ids containing this text",
}
DEFAULT_IMAGE_SIZE = 224
WEIGHT_FILES = (
    ("model.safetensors", None),
    ("model.safetensors.index.json", "index"),
    ("pytorch_model.bin", None),
    ("pytorch_model.bin.index.json", "index"),
)
"""Checkpoint files in order of preference; ``index`` marks a sharded checkpoint's index."""
PREPROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
_WILDCARD = re.compile(r"[*?\[]")
_REMOTE_CODE = (
    "needs trust_remote_code (custom modelling code in the repository), which zooscan never enables"
)

# transformers builds touch module-level state (init flags, the meta-device patches of
# build_on_meta): one build + first-layer search at a time; fetching stays concurrent.
_BUILD_LOCK = threading.RLock()


# ================================================================== the source


class HfSource:
    """Source over transformers vision models on the Hugging Face hub (module docstring)."""

    name = "hf"
    description = (
        "Hugging Face hub vision models (transformers): architecture from config.json on "
        "meta, only the first-layer tensor fetched"
    )

    def __init__(self, options: dict[str, str]) -> None:
        check_options("hf source", options, KNOWN_OPTIONS)
        self.options = HfOptions.parse(options)
        self._client = None
        self._client_lock = threading.Lock()

    @property
    def client(self):
        """The :class:`zooscan.remote.HubClient` shared by every worker (made on first use)."""
        with self._client_lock:
            if self._client is None:
                from zooscan.remote import HubClient

                self._client = HubClient()
            return self._client

    # ------------------------------------------------------------------ listing

    def list_models(self, patterns: Sequence[str]) -> Iterator[ModelRef]:
        """Explicit repo ids as given, the rest from the hub listing (or, offline, the
        cache) filtered by the wildcard patterns; lazily, duplicates dropped."""
        seen: set[str] = set()
        for entry in self._entries(list(patterns)):
            repo_id = entry["id"]
            if repo_id not in seen:
                seen.add(repo_id)
                yield ModelRef(self.name, repo_id, listing_info(entry))

    def _entries(self, patterns: list[str]) -> Iterator[dict[str, Any]]:
        if not patterns:
            yield from self._listing(None)
            return
        for pattern in patterns:
            if is_explicit_repo_id(pattern):
                yield {"id": pattern.strip("/"), "explicit": True}
            else:
                yield from self._listing(pattern)

    def _listing(self, pattern: str | None) -> Iterator[dict[str, Any]]:
        client = self.client
        if client.offline:
            yield from cached_listing(client.cache_dir, pattern)
            return
        for entry in hub_listing(client, self.options, pattern):
            if pattern is None or matches_pattern(entry.get("id", ""), pattern):
                yield entry

    # ------------------------------------------------------------------ loading

    def load_first_layer(self, ref: ModelRef) -> FirstLayer:
        """The first layer of the repo ``ref.name`` (see the module docstring)."""
        client = self.client
        with client.meter() as meter:
            repo = RepoView.open(client, ref.name, self.options.revision)
            layer = load_repo(repo)
        layer.provenance.bytes_fetched = int(meter.bytes)
        layer.metadata["requests"] = int(meter.requests)
        return layer

    # ------------------------------------------------------------------ dry run

    def plan(self, ref: ModelRef) -> dict[str, Any]:
        """What loading ``ref`` would cost, without any network request
        (:func:`plan_fetch`)."""
        return plan_fetch(self.client, ref.name, self.options.revision)


@zooscan.hookimpl
def register_sources(register) -> None:
    """Register the ``hf`` source."""
    register(HfSource)


# ================================================================== options


@dataclass(frozen=True)
class HfOptions:
    """The ``hf`` source's parsed options."""

    revision: str | None = None
    pipeline_tags: tuple[str, ...] = DEFAULT_PIPELINE_TAGS
    library: str | None = DEFAULT_LIBRARY
    sort: str = "downloads"
    search: str | None = None

    @classmethod
    def parse(cls, options: Mapping[str, str]) -> HfOptions:
        """Validate ``options`` (already checked for unknown keys)."""
        sort = options.get("sort", "downloads").strip().lower().replace("-", "_")
        sort = {"createdat": "created_at", "lastmodified": "last_modified"}.get(sort, sort)
        sort = {"trendingscore": "trending_score"}.get(sort, sort)
        if sort not in SORT_KEYS:
            raise UserError(f"hf source: sort must be one of {', '.join(SORT_KEYS)}, got {sort!r}")
        tags_text = options.get("pipeline_tag")
        if tags_text is None:
            tags = DEFAULT_PIPELINE_TAGS
        elif tags_text.strip().lower() in ("any", "all", "none", ""):
            tags = ()
        else:
            tags = tuple(dict.fromkeys(t.strip() for t in tags_text.split(",") if t.strip()))
        library = options.get("library", DEFAULT_LIBRARY).strip()
        revision = (options.get("revision") or "").strip() or None
        search = (options.get("search") or "").strip() or None
        return cls(
            revision=revision,
            pipeline_tags=tags,
            library=None if library.lower() in ("any", "all", "none", "") else library,
            sort=sort,
            search=search,
        )


# ================================================================== listing


def is_explicit_repo_id(pattern: str) -> bool:
    """A pattern with a ``/`` and no wildcard names one repository."""
    return "/" in pattern.strip("/") and not _WILDCARD.search(pattern)


def matches_pattern(repo_id: str, pattern: str) -> bool:
    """``fnmatch`` on the whole repo id, or (for patterns without ``/``) on its name part;
    case-insensitive, like hub repo ids."""
    repo_id, pattern = repo_id.lower(), pattern.lower()
    if fnmatch.fnmatchcase(repo_id, pattern):
        return True
    return "/" not in pattern and fnmatch.fnmatchcase(repo_id.rsplit("/", 1)[-1], pattern)


def query_narrowing(pattern: str | None) -> tuple[str | None, str | None]:
    """``(author, search)`` a wildcard pattern allows the hub query to be narrowed by:
    its literal owner part, and the longest literal run of its name part."""
    if not pattern:
        return None, None
    author = None
    name = pattern
    if "/" in pattern:
        owner, name = pattern.split("/", 1)
        author = owner if owner and not _WILDCARD.search(owner) else None
    runs = [r for r in re.split(r"\*|\?|\[[^\]]*\]", name) if r]
    search = max(runs, key=len) if runs else None
    return author, search


def hub_query(options: HfOptions, pattern: str | None, pipeline_tag: str | None) -> dict[str, Any]:
    """The ``/api/models`` parameters ``HfApi.list_models`` would send for these filters,
    with :data:`PAGE_SIZE` entries per page."""
    author, search = query_narrowing(pattern)
    if options.search:
        search = options.search
    params: dict[str, Any] = {
        "filter": [options.library] if options.library else None,
        "author": author,
        "search": search,
        "pipeline_tag": pipeline_tag,
        "sort": SORT_KEYS[options.sort],
        "limit": PAGE_SIZE,
        "expand": list(LISTING_FIELDS),
    }
    return {k: v for k, v in params.items() if v is not None}


def hub_listing(client, options: HfOptions, pattern: str | None) -> Iterator[dict[str, Any]]:
    """Listing entries from the hub, one paged listing per pipeline tag merged lazily in
    descending sort order."""
    tags: Sequence[str | None] = options.pipeline_tags or (None,)
    streams = [_pages(client, hub_query(options, pattern, tag)) for tag in tags]
    if len(streams) == 1:
        yield from streams[0]
        return
    field_name = SORT_KEYS[options.sort]
    yield from heapq.merge(*streams, key=lambda e: _sort_value(e.get(field_name)), reverse=True)


def _pages(client, params: dict[str, Any]) -> Iterator[dict[str, Any]]:
    try:
        for page in client.iter_json_pages("/api/models", params, max_pages=MAX_PAGES):
            if not isinstance(page, list):
                raise UserError(f"hub listing: expected a JSON list, got {type(page).__name__}")
            yield from (e for e in page if isinstance(e, dict) and e.get("id"))
    except CheckpointError as exc:
        raise UserError(f"cannot list models on {client.endpoint}: {exc}") from exc


def _sort_value(value: Any) -> tuple[int, Any]:
    """Sort key tolerant of missing values (numbers and ISO dates compare within kind)."""
    if value is None:
        return (0, 0)
    if isinstance(value, (int, float)):
        return (1, value)
    return (2, str(value))


def listing_info(entry: Mapping[str, Any]) -> dict[str, Any]:
    """``ModelRef.info`` from a listing entry (scalars only)."""
    config = entry.get("config") if isinstance(entry.get("config"), dict) else {}
    archs = config.get("architectures") or []
    info: dict[str, Any] = {
        "model_type": config.get("model_type"),
        "architectures": ",".join(a for a in archs if isinstance(a, str)) or None,
        "pipeline_tag": entry.get("pipeline_tag"),
        "library": entry.get("library_name"),
        "downloads": entry.get("downloads"),
        "likes": entry.get("likes"),
        "sha": entry.get("sha"),
        "gated": entry.get("gated") if isinstance(entry.get("gated"), (bool, str)) else None,
    }
    if entry.get("cached"):
        info["cached"] = True
    if entry.get("explicit"):
        info["explicit"] = True
    return {k: v for k, v in info.items() if v is not None}


def cached_listing(cache_dir: str, pattern: str | None) -> Iterator[dict[str, Any]]:
    """Offline listing: model repos in the hub cache with a cached ``config.json`` of a
    vision model type, matching ``pattern``; sorted by repo id."""
    from zooscan.remote.cache import cached_file

    try:
        folders = sorted(os.listdir(cache_dir))
    except OSError:
        return
    for folder in folders:
        if not folder.startswith("models--"):
            continue
        repo_id = folder[len("models--") :].replace("--", "/")
        if pattern is not None and not matches_pattern(repo_id, pattern):
            continue
        path = cached_file(cache_dir, repo_id, "config.json", "main", "model")
        config = _read_json_file(path) if path else None
        if not isinstance(config, dict):
            continue
        timm_repo = "model_type" not in config and "pretrained_cfg" in config
        if not (timm_repo or is_vision_model_type(config.get("model_type"))):
            continue
        yield {"id": repo_id, "config": config, "cached": True}


def _read_json_file(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def is_vision_model_type(model_type: Any) -> bool:
    """Whether transformers maps ``model_type`` to an image model (classification,
    backbone, image features, zero-shot image classification)."""
    if not isinstance(model_type, str):
        return False
    from transformers.models.auto import modeling_auto as ma

    mappings = (
        ma.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
        ma.MODEL_FOR_IMAGE_MAPPING_NAMES,
        ma.MODEL_FOR_ZERO_SHOT_IMAGE_CLASSIFICATION_MAPPING_NAMES,
        ma.MODEL_FOR_BACKBONE_MAPPING_NAMES,
    )
    return any(model_type in m for m in mappings)


# ================================================================== repo access


@dataclass
class RepoView:
    """One repository at one commit: its file list and cache-first file access."""

    client: Any
    repo: str
    revision: str | None
    """The requested branch/tag/sha (``None``: main)."""
    commit: str | None
    """The commit sha the hub resolved (offline: the cached snapshot's)."""
    files: frozenset[str] | None
    """Files of the commit (``None`` when unknown, offline)."""
    config_file: Any = None
    """The located ``config.json`` (:class:`zooscan.remote.RemoteFile`)."""

    @classmethod
    def open(cls, client, repo: str, revision: str | None) -> RepoView:
        """Locate ``repo`` through its ``config.json`` (cache first; errors name the repo,
        revision and file), then list the commit's files (one model-info request
        online, none offline)."""
        config_file = client.resolve(repo, "config.json", revision=revision)
        commit = config_file.revision
        if client.offline:
            return cls(client, repo, revision, commit, None, config_file)
        path = f"/api/models/{quote(repo, safe='/')}"
        if commit or revision:
            path += f"/revision/{quote(commit or revision, safe='')}"
        info = client.json(path)
        siblings = info.get("siblings") if isinstance(info, dict) else None
        files = None
        if isinstance(siblings, list):
            files = frozenset(
                s["rfilename"] for s in siblings if isinstance(s, dict) and "rfilename" in s
            )
        return cls(client, repo, revision, commit, files, config_file)

    @property
    def ref(self) -> str | None:
        """The revision to resolve files at: the commit when known."""
        return self.commit or self.revision

    def may_have(self, filename: str) -> bool:
        """False only when the file list is known and lacks ``filename``."""
        return self.files is None or filename in self.files

    def locate(self, filename: str):
        """:class:`zooscan.remote.RemoteFile` of ``filename`` (cache first)."""
        f = self.client.resolve(self.repo, filename, revision=self.ref)
        if self.commit is None and f.revision:
            self.commit = f.revision
        return f

    def find(self, filename: str):
        """Like :meth:`locate`, ``None`` when the file does not exist (or, offline, is
        not cached)."""
        from zooscan.remote.client import HubNotFound, HubOffline

        if not self.may_have(filename):
            return None
        try:
            return self.locate(filename)
        except (HubNotFound, HubOffline):
            return None

    def read_json(self, filename: str, f=None) -> Any:
        """Parse ``filename`` (already located as ``f``, or located now) as JSON."""
        f = f or self.locate(filename)
        data = self.client.read_all(f)
        try:
            return json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise CheckpointError(f"{self.repo}/{filename}: not valid JSON ({exc})") from exc


# ================================================================== config


def parse_config(config_dict: Mapping[str, Any], repo: str):
    """The transformers config of ``config.json``, refusing anything that needs custom
    code (raises :class:`UnsupportedModel`)."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if not isinstance(config_dict, Mapping):
        raise CheckpointError(f"{repo}/config.json is not a JSON object")
    config_dict = dict(config_dict)
    if "model_type" not in config_dict and "pretrained_cfg" in config_dict:
        config_dict["model_type"] = "timm_wrapper"  # what AutoConfig does for timm repos
    if config_dict.get("model_type") == "timm_wrapper" and isinstance(
        config_dict.get("model_args"), Mapping
    ):
        # timm's save_for_hf records num_classes in model_args too; TimmWrapperModel passes
        # its own (0: no head), and timm.create_model would get it twice
        config_dict["model_args"] = {
            k: v for k, v in config_dict["model_args"].items() if k != "num_classes"
        }
    if config_dict.get("auto_map"):
        targets = ", ".join(sorted(map(str, dict(config_dict["auto_map"]).keys())))
        raise UnsupportedModel(f"{repo}: config.json declares auto_map ({targets}): {_REMOTE_CODE}")
    model_type = config_dict.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise UnsupportedModel(f"{repo}: config.json has no model_type: not a transformers model")
    if model_type not in CONFIG_MAPPING:
        raise UnsupportedModel(
            f"{repo}: model_type {model_type!r} is unknown to transformers "
            f"{transformers.__version__}: it {_REMOTE_CODE}, or a newer transformers"
        )
    config_class = CONFIG_MAPPING[model_type]
    try:
        with warnings.catch_warnings(), _quiet_transformers():
            warnings.simplefilter("ignore")
            return config_class.from_dict(config_dict)
    except Exception as exc:  # transformers validates configs in many ways
        raise UnsupportedModel(
            f"{repo}: transformers cannot read its {model_type} config: "
            f"{type(exc).__name__}: {_first_line(exc)}"
        ) from exc


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' logger (config validation chatter) for the block."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


# ================================================================== architecture


@dataclass
class Candidate:
    """One way to build the model whose first layer is searched."""

    what: str
    """``vision tower``, ``base model`` or the architecture class name."""
    build: Callable[[], Any]
    config: Any
    """The config the built model reads (the vision config for a tower)."""


def model_candidates(config) -> list[Candidate]:
    """How to build ``config``'s image model, in order: the vision tower of a
    multimodal config, the base model (``AutoModel``), each ``architectures`` class."""
    from transformers import AutoModel, PreTrainedConfig
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    out: list[Candidate] = []
    vision = getattr(config, "vision_config", None)
    if config.model_type == "vision-encoder-decoder":  # TrOCR, Donut...: the image encoder
        vision = getattr(config, "encoder", None)
    if isinstance(vision, PreTrainedConfig):
        if vision.model_type in MODEL_MAPPING_NAMES:
            out.append(Candidate("vision tower", lambda: AutoModel.from_config(vision), vision))
        else:
            tower = vision_model_class(vision)
            if tower is not None:
                out.append(Candidate("vision tower", lambda: tower(vision), vision))
    if config.model_type in MODEL_MAPPING_NAMES:
        out.append(Candidate("base model", lambda: AutoModel.from_config(config), config))
    for name in config.architectures or []:
        cls = transformers_model_class(name)
        if cls is not None:
            out.append(Candidate(name, lambda cls=cls: cls(config), config))
    return out


def vision_model_class(vision_config):
    """The model class of a vision sub-config that ``AutoModel`` does not map (BLIP-2,
    Mllama, Llama 4...): the ``*VisionModel`` class of the same transformers package
    whose ``config_class`` is the sub-config's class; ``None`` if there is none."""
    import importlib

    from transformers import PreTrainedModel

    module_name = type(vision_config).__module__
    if not module_name.startswith("transformers.models.") or ".configuration_" not in module_name:
        return None
    try:
        module = importlib.import_module(module_name.replace(".configuration_", ".modeling_"))
    except ImportError:
        return None
    found = [
        obj
        for name, obj in sorted(vars(module).items())
        if isinstance(obj, type)
        and issubclass(obj, PreTrainedModel)
        and name.endswith("VisionModel")
        and getattr(obj, "config_class", None) is type(vision_config)
    ]
    return found[0] if len(found) == 1 else None


def refuse_video(config, repo: str) -> None:
    """Video models take frames over time (5-D input, tubelet embeddings): not a 2-D
    filter bank on images (:class:`UnsupportedModel`)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_VIDEO_CLASSIFICATION_MAPPING_NAMES

    configs = [config, getattr(config, "vision_config", None)]
    for cfg in (c for c in configs if c is not None):
        model_type = getattr(cfg, "model_type", None)
        if model_type in MODEL_FOR_VIDEO_CLASSIFICATION_MAPPING_NAMES or hasattr(
            cfg, "tubelet_size"
        ):
            raise UnsupportedModel(
                f"{repo}: {model_type} is a video model: its input is a clip of frames "
                "(5-D), not an image, so it has no 2-D first layer on images"
            )


def transformers_model_class(name: Any):
    """The transformers model class ``name`` (``None`` if transformers has none)."""
    import transformers
    from transformers import PreTrainedModel

    if not isinstance(name, str) or not re.fullmatch(r"[A-Z][A-Za-z0-9_]*", name):
        return None
    try:
        obj = getattr(transformers, name)
    except (AttributeError, ImportError, RuntimeError):
        return None
    return obj if isinstance(obj, type) and issubclass(obj, PreTrainedModel) else None


@dataclass
class Located:
    """The model a first layer was found in."""

    model: Any
    spec: Any
    candidate: Candidate
    image_size: tuple[int, int]
    channels: int


def locate_first_layer(config, preprocessor: Mapping[str, Any] | None, repo: str) -> Located:
    """Build each candidate on meta and return the first one whose first layer is found."""
    from zooscan.layers import build_on_meta, find_first_layer

    refuse_video(config, repo)
    reasons: list[str] = []
    candidates = model_candidates(config)
    if not candidates:
        raise UnsupportedModel(
            f"{repo}: transformers has no model class for model_type {config.model_type!r} "
            f"(architectures: {', '.join(config.architectures or []) or 'none'})"
        )
    for cand in candidates:
        channels = int(getattr(cand.config, "num_channels", None) or 3)
        with _BUILD_LOCK, warnings.catch_warnings(), _quiet_transformers():
            warnings.simplefilter("ignore")
            try:
                model = build_on_meta(cand.build).eval()
            except Exception as exc:  # a library build failing is this candidate's failure
                reasons.append(
                    f"{cand.what}: build failed: {type(exc).__name__}: {_first_line(exc)}"
                )
                continue
            forward = image_forward(model, cand.config)
            for size in probe_image_sizes(cand.config, preprocessor):
                try:
                    spec = find_first_layer(model, (1, channels, *size), forward=forward)
                except FirstLayerNotFound as exc:
                    detail = str(exc).removeprefix(f"{repo}: ")[:300]
                    reasons.append(f"{cand.what} ({type(model).__name__}, {size}): {detail}")
                    continue
                return Located(model, spec, cand, size, channels)
    raise FirstLayerNotFound(f"{repo}: no first layer found: " + "; ".join(reasons))


def image_forward(model, config) -> Callable[[Any, Any], Any]:
    """``forward(model, x)`` passing the image the way the model's forward takes it.

    NaFlex models (SigLIP 2: ``pixel_attention_mask`` and ``spatial_shapes``) take
    patches flattened in ``(p, p, C)`` order, as their image processor makes them.
    """
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    if "spatial_shapes" in params and "pixel_attention_mask" in params:
        return _naflex_forward(int(config.patch_size))
    for name in ("pixel_values", "inputs", "images", "x"):
        if name in params:
            return lambda m, x, name=name: m(**{name: x})
    return lambda m, x: m(x)


def _naflex_forward(patch: int) -> Callable[[Any, Any], Any]:
    import torch

    def forward(model, x):
        b, c, h, w = x.shape
        nh, nw = h // patch, w // patch
        patches = x[:, :, : nh * patch, : nw * patch].reshape(b, c, nh, patch, nw, patch)
        patches = patches.permute(0, 2, 4, 3, 5, 1).reshape(b, nh * nw, patch * patch * c)
        mask = torch.ones(b, nh * nw, dtype=torch.int32, device=x.device)
        shapes = torch.tensor([[nh, nw]] * b, dtype=torch.long)
        return model(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=shapes)

    return forward


def probe_image_sizes(config, preprocessor: Mapping[str, Any] | None) -> list[tuple[int, int]]:
    """Input sizes to try, best first: the config's ``image_size`` (or a square of its
    ``num_patches``), the preprocessor's crop size or size, :data:`DEFAULT_IMAGE_SIZE`."""
    sizes = [_size_pair(getattr(config, "image_size", None))]
    patches, patch = getattr(config, "num_patches", None), getattr(config, "patch_size", None)
    if isinstance(patches, int) and isinstance(patch, int) and patches > 0:
        side = int(round(patches**0.5)) * patch
        sizes.append((side, side))
    if preprocessor:
        settings = preprocessor.get("image_processor", preprocessor)
        if isinstance(settings, Mapping):
            if settings.get("do_center_crop", True):
                sizes.append(_size_pair(settings.get("crop_size")))
            sizes.append(_size_pair(settings.get("size")))
    sizes.append((DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE))
    return list(dict.fromkeys(s for s in sizes if s is not None))


def _size_pair(value: Any) -> tuple[int, int] | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)) and value > 0:
        return int(value), int(value)
    if (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, (int, float)) and v > 0 for v in value)
    ):
        return int(value[0]), int(value[1])
    if isinstance(value, Mapping):
        if "height" in value and "width" in value:
            return _size_pair([value["height"], value["width"]])
        for key in ("shortest_edge", "longest_edge"):
            if key in value:
                return _size_pair(value[key])
    return None


# ================================================================== normalisation


@dataclass
class Normalisation:
    """What the model's input is, on the ``[0, 1]`` pixel scale."""

    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    channel_order: str
    processor: str | None
    """The image-processor class the values came from (``None``: none found)."""
    known: bool = True


def processor_settings(preprocessor: Mapping[str, Any]) -> tuple[dict[str, Any], str | None]:
    """The preprocessor config completed with its transformers class's defaults, and the
    class name. Only class attributes are read: no processor code runs."""
    settings = dict(preprocessor)
    if isinstance(settings.get("image_processor"), Mapping):  # processor_config.json
        settings = dict(settings["image_processor"])
    cls = image_processor_class(
        settings.get("image_processor_type") or settings.get("feature_extractor_type")
    )
    if cls is None:
        return settings, None
    for key in ("do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std"):
        if key not in settings and getattr(cls, key, None) is not None:
            settings[key] = getattr(cls, key)
    for key in ("do_flip_channel_order", "rescale_offset", "include_top"):
        if key not in settings and getattr(cls, key, None) is not None:
            settings[key] = getattr(cls, key)
    return settings, cls.__name__


def image_processor_class(name: Any):
    """The transformers image-processor class for a ``*ImageProcessor[Fast]`` or
    ``*FeatureExtractor`` name, or ``None``."""
    import transformers
    from transformers.image_processing_base import ImageProcessingMixin

    if not isinstance(name, str) or not re.fullmatch(r"[A-Z][A-Za-z0-9_]*", name):
        return None
    base = name.removesuffix("Fast")
    if base.endswith("FeatureExtractor"):
        base = base[: -len("FeatureExtractor")] + "ImageProcessor"
    for candidate in (base, name):
        try:
            obj = getattr(transformers, candidate)
        except (AttributeError, ImportError, RuntimeError):
            continue
        if isinstance(obj, type) and issubclass(obj, ImageProcessingMixin):
            return obj
    return None


def input_normalisation(preprocessor: Mapping[str, Any] | None, channels: int) -> Normalisation:
    """Effective mean/std/channel order of the model input (module docstring, step 4)."""
    if not preprocessor:
        return Normalisation(None, None, "RGB" if channels == 3 else _order(channels), None, False)
    settings, processor = processor_settings(preprocessor)
    scale = 255.0 * (
        float(settings.get("rescale_factor", 1 / 255)) if settings.get("do_rescale", True) else 1.0
    )
    if scale <= 0:
        raise UnsupportedModel(f"preprocessor rescale_factor gives a scale of {scale}")
    offset = 1.0 if settings.get("do_rescale", True) and settings.get("rescale_offset") else 0.0
    if settings.get("do_normalize", False):
        mean = _per_channel(settings.get("image_mean", 0.0), channels, "image_mean")
        std = _per_channel(settings.get("image_std", 1.0), channels, "image_std")
    else:
        mean, std = [0.0] * channels, [1.0] * channels
    if settings.get("include_top"):  # EfficientNet divides by image_std once more
        again = _per_channel(settings.get("image_std", 1.0), channels, "image_std")
        std = [s * t for s, t in zip(std, again, strict=True)]
    if any(s <= 0 for s in std):
        raise UnsupportedModel(f"preprocessor image_std {std} has a value <= 0")
    eff_mean = tuple((m + offset) / scale for m in mean)
    eff_std = tuple(s / scale for s in std)
    identity = all(abs(m) < 1e-12 for m in eff_mean) and all(abs(s - 1) < 1e-12 for s in eff_std)
    order = "BGR" if settings.get("do_flip_channel_order") and channels == 3 else _order(channels)
    if identity:
        return Normalisation(None, None, order, processor)
    return Normalisation(eff_mean, eff_std, order, processor)


def _order(channels: int) -> str:
    return {3: "RGB", 1: "L"}.get(channels, "other")


def _per_channel(value: Any, channels: int, name: str) -> list[float]:
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    try:
        floats = [float(v) for v in values]
    except (TypeError, ValueError) as exc:
        raise UnsupportedModel(f"preprocessor {name} {value!r} is not numeric") from exc
    if len(floats) == 1:
        return floats * channels
    if len(floats) != channels:
        raise UnsupportedModel(
            f"preprocessor {name} has {len(floats)} values for a {channels}-channel input"
        )
    return floats


def read_preprocessor(repo: RepoView) -> tuple[dict[str, Any] | None, str | None]:
    """The first preprocessor config the repo has, and its file name."""
    for filename in PREPROCESSOR_FILES:
        f = repo.find(filename)
        if f is None:
            continue
        data = repo.read_json(filename, f)
        if isinstance(data, dict):
            if filename == "processor_config.json" and not isinstance(
                data.get("image_processor"), dict
            ):
                continue
            return data, filename
    return None, None


# ================================================================== checkpoint keys


def conversion_renamer(model) -> Callable[[str], str | None]:
    """``checkpoint key -> model key`` the way ``from_pretrained`` renames keys (its
    per-model renames and base-model prefix), ``None`` for keys that a converter would
    transform (their stored tensor is not the model's parameter)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            rename_source_key,
        )
    except ImportError:  # another transformers version: suffix matching only
        return lambda key: key
    try:
        transforms = get_model_conversion_mapping(model)
    except Exception:  # a broken mapping must not stop the suffix matching
        transforms = []
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta_keys = dict.fromkeys(model.state_dict().keys(), True)
    prefix = getattr(model, "base_model_prefix", None) or None

    def rename(key: str) -> str | None:
        try:
            renamed, converted = rename_source_key(key, renamings, converters, prefix, meta_keys)
        except Exception:
            return key
        return None if converted is not None else renamed

    return rename


def match_checkpoint_keys(
    wanted: Sequence[str], available: Sequence[str], renamer: Callable[[str], str | None], repo: str
) -> dict[str, str]:
    """``meta key -> checkpoint key`` for every wanted key (raises :class:`ModelError`)."""
    renamed: dict[str, list[str]] = {}
    for key in available:
        target = renamer(key)
        if target is not None:
            renamed.setdefault(target, []).append(key)
    return {w: _match_one(w, available, renamed.get(w, []), repo) for w in wanted}


def _match_one(wanted: str, available: Sequence[str], by_rename: list[str], repo: str) -> str:
    if len(by_rename) == 1:
        return by_rename[0]
    if wanted in available:
        return wanted
    suffix = [k for k in available if k.endswith("." + wanted)]
    if len(suffix) == 1:
        return suffix[0]
    if suffix or len(by_rename) > 1:
        shown = ", ".join(sorted(set(suffix) | set(by_rename))[:6])
        raise ModelError(f"{repo}: the checkpoint key of {wanted!r} is ambiguous: {shown}")
    tail = ".".join(wanted.split(".")[-2:])
    close = [k for k in available if k.endswith(tail)][:4]
    hint = f" (keys ending in {tail!r}: {', '.join(close)})" if close else ""
    raise CheckpointError(
        f"{repo}: no checkpoint key for {wanted!r} among {len(available)} keys{hint}"
    )


# ================================================================== weights


@dataclass
class WeightsSource:
    """Where the checkpoint's tensors are: one file, or a sharded index."""

    filename: str
    file: Any = None
    """The located :class:`zooscan.remote.RemoteFile` of an unsharded checkpoint."""
    shard_of: dict[str, str] | None = None
    """``key -> shard file name`` for a sharded checkpoint (from its index)."""


def find_weights(repo: RepoView) -> WeightsSource:
    """The preferred PyTorch checkpoint of the repo (:data:`WEIGHT_FILES` order)."""
    for filename, kind in WEIGHT_FILES:
        f = repo.find(filename)
        if f is None:
            continue
        if kind != "index":
            return WeightsSource(filename, file=f)
        index = repo.read_json(filename, f)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{repo.repo}/{filename}: no weight_map in the index")
        folder = os.path.dirname(filename)
        shards = {k: os.path.join(folder, v) if folder else v for k, v in weight_map.items()}
        return WeightsSource(filename, shard_of=shards)
    others = sorted(n for n in repo.files or () if n.endswith((".h5", ".msgpack", ".ckpt")))
    where = "in the Hugging Face cache (offline)" if repo.files is None else "in the repository"
    detail = f" (it has only: {', '.join(others[:4])})" if others else ""
    raise CheckpointError(
        f"{repo.repo}: no PyTorch weights {where}: none of "
        f"{', '.join(n for n, _ in WEIGHT_FILES)}{detail}"
    )


@dataclass
class Fetched:
    """The first layer's tensors as read from the checkpoint."""

    mapping: dict[str, str]
    """``meta key -> checkpoint key``."""
    tensors: dict[str, Any]
    """``meta key -> LoadedTensor``."""
    files: dict[str, str]
    """``meta key -> file name`` the tensor came from."""


def fetch_layer_tensors(
    repo: RepoView, weights: WeightsSource, wanted: Sequence[str], renamer
) -> Fetched:
    """Match ``wanted`` meta keys to checkpoint keys and read only those tensors.

    Sharded: the keys come from the index, then each shard holding a wanted tensor is
    read by :func:`zooscan.remote.fetch_tensors`. One file: its header (or central
    directory) is read once, the keys matched, then only the wanted tensors' bytes.
    """
    if weights.shard_of is not None:
        mapping = match_checkpoint_keys(wanted, list(weights.shard_of), renamer, repo.repo)
        tensors, files = _fetch_sharded(repo, weights.shard_of, mapping)
    else:
        mapping, by_key = _fetch_single(repo, weights.file, wanted, renamer)
        tensors = {meta: by_key[ckpt] for meta, ckpt in mapping.items()}
        files = dict.fromkeys(mapping, weights.filename)
    return Fetched(mapping, tensors, files)


def _fetch_sharded(repo: RepoView, shard_of: Mapping[str, str], mapping: Mapping[str, str]):
    by_shard: dict[str, list[str]] = {}
    for ckpt in dict.fromkeys(mapping.values()):
        by_shard.setdefault(shard_of[ckpt], []).append(ckpt)
    loaded = {}
    for shard, keys in by_shard.items():
        loaded.update(fetch_tensors(repo.client, repo.locate(shard), keys).tensors)
    tensors = {meta: loaded[ckpt] for meta, ckpt in mapping.items()}
    files = {meta: shard_of[ckpt] for meta, ckpt in mapping.items()}
    return tensors, files


def _fetch_single(repo: RepoView, f, wanted: Sequence[str], renamer):
    """``(mapping, {checkpoint key: LoadedTensor})`` from one checkpoint file, opened
    once: its key list decides the mapping before any tensor byte is read."""
    mapping: dict[str, str] = {}

    def choose(available: Sequence[str]) -> list[str]:
        mapping.update(match_checkpoint_keys(wanted, available, renamer, repo.repo))
        return sorted(set(mapping.values()))

    result = fetch_tensors(repo.client, f, choose)
    return mapping, result.tensors


def check_shapes(model, loaded: Mapping[str, Any], mapping: Mapping[str, str], repo: str) -> None:
    """Every fetched tensor has its meta parameter's shape and a floating dtype."""
    state = model.state_dict()
    for meta_key, ckpt_key in mapping.items():
        tensor = loaded[meta_key]
        want = tuple(state[meta_key].shape) if meta_key in state else None
        if want is not None and tuple(tensor.shape) != want:
            raise CheckpointError(
                f"{repo}: checkpoint tensor {ckpt_key!r} has shape {list(tensor.shape)}, the "
                f"model's {meta_key!r} has {list(want)}"
            )
        if not (tensor.dtype.startswith("float") or tensor.dtype.startswith("bfloat")):
            raise UnsupportedModel(
                f"{repo}: checkpoint tensor {ckpt_key!r} is {tensor.dtype} (quantized weights)"
            )


# ================================================================== one model


def load_repo(repo: RepoView) -> FirstLayer:
    """Config -> architecture on meta -> first layer -> only its tensors (module docstring)."""
    import transformers

    config_dict = repo.read_json("config.json", repo.config_file)
    config = parse_config(config_dict, repo.repo)
    preprocessor, preprocessor_file = read_preprocessor(repo)
    if preprocessor is None and config.model_type == "timm_wrapper":
        preprocessor = timm_preprocessor(config_dict)
        preprocessor_file = "config.json:pretrained_cfg" if preprocessor else None
    found = locate_first_layer(config, preprocessor, repo.repo)
    norm = input_normalisation(preprocessor, found.channels)
    weights = find_weights(repo)
    renamer = conversion_renamer(found.model)
    fetched = fetch_layer_tensors(repo, weights, list(found.spec.parameter_names), renamer)
    check_shapes(found.model, fetched.tensors, fetched.mapping, repo.repo)
    provenance = weight_provenance(found.spec, fetched, repo)
    metadata = {
        "model_type": config.model_type,
        "architectures": list(config.architectures or []),
        "architecture": type(found.model).__name__,
        "built_from": found.candidate.what,
        "image_size": list(found.image_size),
        "transformers": transformers.__version__,
        "image_processor": norm.processor,
        "preprocessor_file": preprocessor_file,
        "checkpoint_keys": dict(fetched.mapping),
    }
    layer = found.spec.to_first_layer(
        {meta: t.array for meta, t in fetched.tensors.items()},
        mean=norm.mean,
        std=norm.std,
        channel_order=norm.channel_order,
        input_size=found.image_size,
        provenance=provenance,
        metadata=metadata,
    )
    if not norm.known:
        where = "in the Hugging Face cache (offline)" if repo.files is None else "in the repository"
        layer.flags["normalization_unknown"] = f"no preprocessor config {where}: identity assumed"
    return layer


# ================================================================== dry run

TYPICAL_LAYER_BYTES = 768 * 3 * 16 * 16 * 4
"""The first-layer bytes assumed when ``config.json`` is not cached: a ViT-B/16 patch
embedding in float32 (768 filters of 3×16×16), the commonest first layer on the hub."""
_SHA = re.compile(r"[0-9a-f]{40}")
UNCACHED_REQUESTS = {
    "config.json": 2,
    "model info": 1,
    "preprocessor_config.json": 2,
    "model.safetensors": 3,
}
"""Requests :meth:`HfSource.load_first_layer` makes for a repository with nothing
cached: ``HEAD`` + ``GET`` of ``config.json``, the commit's model info, ``HEAD`` + ``GET``
of the preprocessor config, and for an unsharded ``model.safetensors`` its ``HEAD``, the
first block (header) and one ranged read of the layer's tensors."""


def plan_fetch(client, repo: str, revision: str | None) -> dict[str, Any]:
    """``{"requests", "bytes", "cached", "estimated"}`` for loading ``repo``, from the
    local Hugging Face cache alone (no request).

    - ``config.json`` and a weights file (or a shard index and every shard it names)
      cached: ``cached`` is true, nothing to download (online, the ``HEAD`` requests that
      confirm the commit and the model-info request are still made; they carry no file
      bytes and are not counted).
    - ``config.json`` cached, weights not: the architecture is built on meta from the
      cached config (and cached preprocessor config), and ``bytes`` is the checkpoint's
      first block (:data:`zooscan.remote.ranged.HEAD_BLOCK`) plus the first layer's
      tensors at the meta model's dtype; requests as in :data:`UNCACHED_REQUESTS`, less
      the ``GET`` of ``config.json`` (and its ``HEAD`` at a pinned commit sha) and both
      requests of a cached preprocessor config (once the commit is known, a file cached
      at that commit needs no request).
    - nothing cached: :data:`UNCACHED_REQUESTS` and, since the layer is unknown, the
      first block plus :data:`TYPICAL_LAYER_BYTES`; ``estimated`` is true.

    Requests and bytes assume one ``model.safetensors`` with a preprocessor config, the
    layer's tensors lying past the first block (in a checkpoint smaller than that block
    they come with it: one request and fewer bytes); sharded or ``pytorch_model.bin``
    checkpoints take one to three more requests. The small JSON bodies (configs, model
    info) are not counted in ``bytes``. Offline with ``config.json`` or
    the weights missing from the cache raises :class:`CheckpointError`: such a model
    cannot be loaded.
    """
    from zooscan.remote.ranged import HEAD_BLOCK

    rev = revision or "main"
    config_path = client.cached(repo, "config.json", rev)
    weights_cached = config_path is not None and _weights_cached(client, repo, rev)
    if weights_cached:
        return {"requests": 0, "bytes": 0, "cached": True, "estimated": False}
    if client.offline:
        raise CheckpointError(
            f"{repo}: offline (HF_HUB_OFFLINE is set) and its config.json or weights are "
            f"not in the Hugging Face cache ({client.cache_dir})"
        )
    requests = sum(UNCACHED_REQUESTS.values())
    if config_path is None:
        return {
            "requests": requests,
            "bytes": HEAD_BLOCK + TYPICAL_LAYER_BYTES,
            "cached": False,
            "estimated": True,
        }
    config = parse_config(_read_cached_json(config_path, repo), repo)
    preprocessor_path = client.cached(repo, PREPROCESSOR_FILES[0], rev)
    preprocessor = _read_cached_json(preprocessor_path, repo) if preprocessor_path else None
    found = locate_first_layer(config, preprocessor, repo)
    state = found.model.state_dict()
    tensor_bytes = sum(
        state[k].numel() * state[k].element_size() for k in found.spec.parameter_names
    )
    requests -= 1  # config.json is read from the cache (its HEAD still finds the commit)
    if _SHA.fullmatch(rev):
        requests -= 1  # ... and at a pinned commit even the HEAD is skipped
    if preprocessor_path is not None:
        requests -= UNCACHED_REQUESTS["preprocessor_config.json"]  # cached at the commit
    return {
        "requests": requests,
        "bytes": HEAD_BLOCK + tensor_bytes,
        "cached": False,
        "estimated": False,
    }


def _weights_cached(client, repo: str, rev: str) -> bool:
    """A weights file of :data:`WEIGHT_FILES` is cached (an index: with all its shards)."""
    for filename, kind in WEIGHT_FILES:
        path = client.cached(repo, filename, rev)
        if path is None:
            continue
        if kind != "index":
            return True
        index = _read_cached_json(path, repo)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            continue
        folder = os.path.dirname(filename)
        shards = {os.path.join(folder, v) if folder else v for v in weight_map.values()}
        if all(client.cached(repo, shard, rev) for shard in shards):
            return True
    return False


def _read_cached_json(path: str, repo: str) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(
            f"{repo}: cached {os.path.basename(path)} unreadable ({exc})"
        ) from exc


def timm_preprocessor(config_dict: Mapping[str, Any]) -> dict[str, Any] | None:
    """The preprocessing of a timm repository (``config.json`` with ``pretrained_cfg``,
    which transformers loads as ``timm_wrapper``): mean/std on the ``[0, 1]`` scale and
    the input size, in preprocessor-config terms."""
    cfg = config_dict.get("pretrained_cfg")
    if not isinstance(cfg, Mapping) or cfg.get("mean") is None or cfg.get("std") is None:
        return None
    out: dict[str, Any] = {
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(cfg["mean"]),
        "image_std": list(cfg["std"]),
    }
    size = cfg.get("input_size")
    if isinstance(size, (list, tuple)) and len(size) == 3:
        out["size"] = {"height": size[1], "width": size[2]}
    return out


def weight_provenance(spec, fetched: Fetched, repo: RepoView) -> Provenance:
    """Provenance of the layer's weight tensor(s): key(s), file, byte range, sha256."""
    import hashlib

    weights = [(fetched.mapping[k], fetched.tensors[k], fetched.files[k]) for k in spec.weight_keys]
    if len(weights) == 1:
        key, tensor, filename = weights[0]
        byte_range, sha = tensor.byte_range, tensor.sha256
    else:
        key = "+".join(w[0] for w in weights)
        filename = "+".join(dict.fromkeys(w[2] for w in weights))
        byte_range = None
        sha = hashlib.sha256("\n".join(w[1].sha256 for w in weights).encode()).hexdigest()
    return Provenance(
        repo=repo.repo,
        revision=repo.commit or repo.revision,
        file=filename,
        tensor_key=key,
        byte_range=tuple(byte_range) if byte_range else None,
        sha256=sha,
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
