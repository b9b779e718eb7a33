"""Read only the tensors we need from local checkpoint files.

Supported formats (detected from the file's content, not its extension):

- **safetensors**: the JSON header gives every tensor's dtype, shape and byte range;
  values come from :func:`safetensors.safe_open` (memory-mapped, one tensor copied).
- **torch zip** (``torch.save`` since PyTorch 1.6, torchvision ``.pth``, HF ``.bin``):
  ``data.pkl`` is scanned by a restricted unpickler that only records storage keys,
  offsets, shapes and strides (it imports nothing and executes nothing); values come
  from ``torch.load(path, mmap=True, weights_only=True, map_location="cpu")``, so only
  the pages of the tensors we touch are read. Storage entries are stored uncompressed
  in the zip, which gives each contiguous tensor an exact byte range.
- **legacy torch** (``_use_new_zipfile_serialization=False``): ``torch.load(...,
  weights_only=True)`` reads the whole file (unavoidable); no byte ranges.
- **npz** (``numpy.savez``/``savez_compressed``): ``np.load(allow_pickle=False)``,
  only the named member is decompressed; byte ranges for uncompressed members.

Nested torch checkpoints (``{"state_dict": {...}}``, ``{"model": ..., "ema": ...}``)
are flattened with ``.``: ``state_dict.conv1.weight``. :func:`resolve_key` maps the
name a model uses (``conv1.weight``) onto such keys.

**What ``sha256`` hashes**: the tensor's elements in their stored dtype, in C
(row-major) order, little-endian — for a contiguous tensor exactly the file bytes in
its ``byte_range``. Values are returned as ``float32`` (bf16/fp16 are widened).

Every failure raises :class:`zooscan.errors.CheckpointError` with a one-line reason.
"""

from __future__ import annotations

import collections
import difflib
import hashlib
import json
import math
import os
import pickle
import struct
import sys
import warnings
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zooscan.errors import CheckpointError

__all__ = [
    "LoadedTensor",
    "PickleRefused",
    "TensorInfo",
    "TorchTensorRef",
    "UnboundedStructure",
    "checkpoint_format",
    "first_4d_tensor",
    "list_tensors",
    "read_tensors",
    "refused_unpickle",
    "resolve_key",
    "scan_torch_pickle",
]

PathLike = str | os.PathLike

SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E8M0": "float8_e8m0fnu",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
    "C64": "complex64",
}
"""safetensors dtype names and their torch spelling (without ``torch.``)."""
SAFETENSORS_SUB_BYTE = {
    "F4": ("float4_e2m1", 4),
    "F6_E2M3": ("float6_e2m3", 6),
    "F6_E3M2": ("float6_e3m2", 6),
}
"""safetensors dtypes narrower than a byte: ``(name, bits)``; listed, never read."""
_TORCH_STORAGE_DTYPES = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "Float8_e4m3fnStorage": "float8_e4m3fn",
    "Float8_e5m2Storage": "float8_e5m2",
}
ITEMSIZE = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "float8_e4m3fnuz": 1,
    "float8_e5m2fnuz": 1,
    "float8_e8m0fnu": 1,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint64": 8,
    "uint32": 4,
    "uint16": 2,
    "uint8": 1,
    "bool": 1,
    "complex64": 8,
}
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024
MAX_RANK = 32
"""Most dimensions a tensor may claim (real ones have at most 5 or 6)."""
MAX_DIM = 2**62
"""Largest size one dimension may claim (bounds every product of sizes)."""
MAX_PICKLE_BYTES = 64 * 1024 * 1024
"""Largest ``data.pkl`` read from a torch zip: an index of tensors, a few MB at most
even for models with tens of thousands of tensors."""
MAX_INFLATED_BYTES = 1024**3
"""Most bytes the compressed members read from one zip (npz, re-zipped torch) may
inflate to: a zip bomb's tiny file never becomes gigabytes in memory."""
MAX_NESTING = 64
"""Deepest nesting of containers in a checkpoint (real ones nest 2 to 5 levels)."""
MAX_ENTRIES = 1_000_000
"""Most containers and leaves visited when flattening a checkpoint."""
_ZIP_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")
_ZIP_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    OSError,
    EOFError,
    ValueError,
    RuntimeError,
    struct.error,
    zlib.error,
)
"""What :mod:`zipfile` raises for damaged archives (``NotImplementedError`` for an
unknown method and ``RecursionError`` are ``RuntimeError`` subclasses)."""
# torch warns when a (refused or odd) pickle uses a newer protocol: the refusal says enough
warnings.filterwarnings(
    "ignore", message="Detected pickle protocol", module=r"torch\._weights_only_unpickler"
)
_TORCH_ALLOWLIST_ROOTS = frozenset({"torch", "collections", "_codecs", "builtins", "__builtin__"})
"""Top-level modules of every global torch's ``weights_only`` loader may accept."""
_TORCH_BOILERPLATE = (
    "Weights only load failed",
    "(1)",
    "(2)",
    "Please file an issue",
    "Check the documentation",
)

# Wrapper prefixes that checkpoints add around a model's own parameter names
# (DataParallel, Lightning/timm/mmcv nesting, torch.compile). EMA wrappers come last:
# when both a model and its EMA copy hold the key, the plain model wins.
_WRAPPERS = ("state_dict.", "model.", "module.", "backbone.", "_orig_mod.", "net.")
_EMA_WRAPPERS = ("state_dict_ema.", "model_ema.", "ema_state_dict.", "ema_model.", "ema.")


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a checkpoint, described without reading its data."""

    key: str
    """Flattened key (nested dicts joined with ``.``)."""
    shape: tuple[int, ...]
    dtype: str
    """Stored dtype, torch spelling without ``torch.``: ``float32``, ``bfloat16``..."""
    byte_range: tuple[int, int] | None
    """``(start, end)`` offsets of the raw data in the file (end exclusive), when the
    tensor is stored contiguously and uncompressed; ``None`` otherwise."""

    @property
    def ndim(self) -> int:
        """Number of dimensions."""
        return len(self.shape)


@dataclass
class LoadedTensor:
    """A tensor read from a checkpoint."""

    key: str
    """The key as found in the file (after :func:`resolve_key`)."""
    array: np.ndarray
    """The values as ``float32``, C-contiguous, owned (not a view of the file)."""
    sha256: str
    """sha256 of the stored bytes (stored dtype, C order, little-endian)."""
    byte_range: tuple[int, int] | None
    dtype: str
    """Stored dtype (before the float32 conversion)."""
    shape: tuple[int, ...]


@dataclass(frozen=True)
class TorchTensorRef:
    """Where a tensor of a torch zip checkpoint lives, as recorded in ``data.pkl``."""

    storage_key: str
    """Name of the storage entry: ``<archive>/data/<storage_key>``."""
    dtype: str
    storage_numel: int
    offset: int
    """Element offset of the tensor inside its storage."""
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def is_contiguous(self) -> bool:
        """True when the elements are laid out in C order without gaps."""
        return _is_c_contiguous(self.shape, self.stride)

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor's own elements."""
        return math.prod(self.shape) * ITEMSIZE.get(self.dtype, 0)


# --------------------------------------------------------------------------- public API


def checkpoint_format(path: PathLike) -> str:
    """Detect the format of ``path`` from its first bytes.

    Returns ``"safetensors"``, ``"torch-zip"``, ``"torch-legacy"`` or ``"npz"``.
    """
    p = _check_file(path)
    with open(p, "rb") as fh:
        head = fh.read(16)
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return _zip_kind(p)
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:1] == b"\x80":
        return "torch-legacy"
    raise CheckpointError(f"{p}: not a safetensors, torch or npz checkpoint (unknown format)")


def list_tensors(path: PathLike) -> list[TensorInfo]:
    """Every tensor of the checkpoint, in storage order (the order their data appear
    in the file). Reads headers only (for legacy torch files: the whole file)."""
    p = _check_file(path)
    fmt = checkpoint_format(p)
    if fmt == "safetensors":
        return _safetensors_index(p)
    if fmt == "npz":
        return _npz_index(p)
    archive = _torch_zip_index(p) if fmt == "torch-zip" else None
    if archive is not None and archive.infos is not None:
        return archive.infos
    tensors = _tensors_of(p, _torch_load(p, archive))
    return [_info_from_tensor(k, t, None) for k, t in tensors.items()]


def read_tensors(path: PathLike, keys: Sequence[str]) -> dict[str, LoadedTensor]:
    """Read only ``keys`` from ``path``.

    Each key is matched with :func:`resolve_key` (wrapper prefixes tolerated); the
    result is keyed by the *requested* names. Raises :class:`CheckpointError` when a
    key is absent or the file is broken.
    """
    p = _check_file(path)
    fmt = checkpoint_format(p)
    if fmt == "safetensors":
        return _read_safetensors(p, keys)
    if fmt == "npz":
        return _read_npz(p, keys)
    return _read_torch(p, keys, zipped=fmt == "torch-zip")


def resolve_key(available: Sequence[str], wanted: str) -> str:
    """Find ``wanted`` among ``available`` keys, tolerating wrapper prefixes.

    Exact matches win. Otherwise keys are compared after stripping leading wrappers
    (``module.``, ``model.``, ``backbone.``, ``state_dict.``, ``_orig_mod.``, ``net.``
    and EMA wrappers such as ``ema.``/``state_dict_ema.``) from both sides; among
    several matches a non-EMA key wins, then the one with the fewest wrappers, then
    the first in ``available``. Raises :class:`CheckpointError` naming close matches.
    """
    if wanted in available:
        return wanted
    target, _, _ = _strip_wrappers(wanted)
    matches = []
    for position, key in enumerate(available):
        core, n_wrappers, ema = _strip_wrappers(key)
        if core == target:
            matches.append((ema, n_wrappers, position, key))
    if matches:
        return min(matches)[3]
    raise CheckpointError(_missing_key_message(available, wanted, target))


def first_4d_tensor(path: PathLike) -> TensorInfo:
    """The first 4-D tensor in storage order (the ``files`` source's fallback)."""
    infos = list_tensors(path)
    for info in infos:
        if info.ndim == 4:
            return info
    shown = ", ".join(f"{i.key}{list(i.shape)}" for i in infos[:8])
    more = f" (+{len(infos) - 8} more)" if len(infos) > 8 else ""
    raise CheckpointError(f"{path}: no 4-D tensor among {len(infos)} tensors: {shown}{more}")


def scan_torch_pickle(data: bytes) -> dict[str, TorchTensorRef]:
    """Index the tensors of a torch zip checkpoint's ``data.pkl`` without loading them.

    A restricted unpickler: it resolves only the few globals ``torch.save`` emits for
    tensors and dicts (to inert stand-ins, never the real callables) and records each
    tensor's storage key, offset, shape and stride. Anything else (a class, a function,
    ``os.system``...) raises :class:`PickleRefused`, containers nested too deep, in a
    cycle or too many :class:`UnboundedStructure`, a malformed pickle
    :class:`CheckpointError`; nothing is imported or run. Keys of nested containers are
    joined with ``.`` as in :func:`list_tensors`.
    """
    import io

    try:
        obj = _IndexUnpickler(io.BytesIO(data)).load()
    except PickleRefused:
        raise
    except Exception as exc:  # any malformed pickle ends here
        raise CheckpointError(
            f"data.pkl is corrupt: {type(exc).__name__}: {_first_line(exc)}"
        ) from exc
    return {key: ref for key, ref in _flatten(obj, leaf_type=TorchTensorRef)}


# ----------------------------------------------------------------------------- helpers


def _check_file(path: PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file")
    if not p.is_file():
        raise CheckpointError(f"{p}: not a regular file")
    if p.stat().st_size == 0:
        raise CheckpointError(f"{p}: empty file (0 bytes)")
    return p


def _zip_kind(p: Path) -> str:
    _check_zip_directory(p)
    try:
        with zipfile.ZipFile(p) as zf:
            names = zf.namelist()
    except _ZIP_ERRORS as exc:
        raise CheckpointError(
            f"{p}: corrupt or truncated zip archive ({_first_line(exc)})"
        ) from exc
    if len(set(names)) != len(names):
        raise CheckpointError(f"{p}: corrupt zip archive (two members share a name)")
    if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        return "torch-zip"
    if names and all(n.endswith(".npy") for n in names):
        return "npz"
    raise CheckpointError(f"{p}: zip archive that is neither a torch checkpoint nor an npz")


def _check_zip_directory(p: Path) -> None:
    """Check the end records and the central directory's size before ``zipfile`` reads
    the whole directory into memory (an absurd member count is refused here)."""
    # zooscan.remote imports this module: import its zip parser when first needed
    from zooscan.remote.zipdir import MAX_EOCD_SEARCH, find_central_directory

    size = p.stat().st_size
    tail_start = max(0, size - MAX_EOCD_SEARCH - 1024)
    with open(p, "rb") as fh:
        fh.seek(tail_start)
        tail = fh.read()
    try:
        find_central_directory(tail, tail_start, size)
    except CheckpointError as exc:
        raise CheckpointError(f"{p}: {exc}") from None


def _check_member(p: Path, member: zipfile.ZipInfo, archive_size: int) -> None:
    """A member's sizes are plausible: a stored member's two sizes agree and fit in the
    archive; a compressed one inflates to at most :data:`MAX_INFLATED_BYTES`."""
    name = member.filename
    if member.compress_type == zipfile.ZIP_STORED:
        if member.file_size != member.compress_size:
            raise CheckpointError(
                f"{p}: corrupt zip: stored member {name!r} claims {member.file_size} bytes "
                f"but holds {member.compress_size}"
            )
        if member.header_offset + member.compress_size > archive_size:
            raise CheckpointError(f"{p}: corrupt zip: member {name!r} lies outside the file")
    elif member.file_size > MAX_INFLATED_BYTES:
        raise CheckpointError(
            f"{p}: zip member {name!r} would inflate to {member.file_size} bytes (more than "
            f"{MAX_INFLATED_BYTES}): refused as a zip bomb"
        )


def _is_c_contiguous(shape: Sequence[int], stride: Sequence[int]) -> bool:
    expected = 1
    if len(shape) != len(stride):
        return False
    for size, step in zip(reversed(shape), reversed(stride), strict=True):
        if size != 1 and step != expected:
            return False
        expected *= size
    return True


def _stored_bytes(tensor: torch.Tensor) -> bytes:
    """The tensor's elements in their dtype, C order, native (little-endian) bytes."""
    flat = tensor.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


def _to_float32(tensor: torch.Tensor, key: str) -> np.ndarray:
    if tensor.is_quantized or tensor.is_complex():
        raise CheckpointError(f"tensor {key!r} has dtype {tensor.dtype}, not a real-valued weight")
    try:
        return tensor.detach().to(torch.float32).contiguous().numpy().copy()
    except (RuntimeError, TypeError) as exc:  # e.g. packed 4-bit floats: no conversion
        raise CheckpointError(
            f"tensor {key!r} has dtype {tensor.dtype}, which zooscan cannot read as float32"
        ) from exc


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _info_from_tensor(key: str, tensor: torch.Tensor, byte_range) -> TensorInfo:
    return TensorInfo(
        key, tuple(int(s) for s in tensor.shape), _dtype_name(tensor.dtype), byte_range
    )


def _flatten(obj: Any, leaf_type: type = torch.Tensor) -> list[tuple[str, Any]]:
    """``(dotted key, leaf)`` for every leaf of type ``leaf_type`` in nested dicts,
    lists and tuples, in container order.

    Raises :class:`UnboundedStructure` when containers nest deeper than
    :data:`MAX_NESTING` (a cycle nests forever) or more than :data:`MAX_ENTRIES` items
    are visited (a shared sub-container is walked each time it occurs).
    """
    out: list[tuple[str, Any]] = []
    _walk(obj, "", leaf_type, 0, out, [MAX_ENTRIES])
    return out


def _walk(obj: Any, prefix: str, leaf_type: type, depth: int, out: list, budget: list[int]) -> None:
    budget[0] -= 1
    if budget[0] < 0:
        raise UnboundedStructure(f"the checkpoint holds more than {MAX_ENTRIES} entries")
    if isinstance(obj, leaf_type):
        out.append((prefix, obj))
        return
    if isinstance(obj, Mapping):
        items = [(_key_text(key), value) for key, value in obj.items()]
    elif isinstance(obj, (list, tuple)):
        items = [(str(i), value) for i, value in enumerate(obj)]
    else:
        return
    if depth >= MAX_NESTING:
        raise UnboundedStructure(f"the checkpoint nests containers more than {MAX_NESTING} deep")
    for key, value in items:
        _walk(value, f"{prefix}.{key}" if prefix else key, leaf_type, depth + 1, out, budget)


def _key_text(key: Any) -> str:
    try:
        return str(key)
    except ValueError as exc:  # an integer key too long to print
        raise CheckpointError(f"the checkpoint has an unprintable key ({exc})") from None


def _tensors_of(p: Path, obj: Any) -> dict[str, torch.Tensor]:
    """The flattened tensors of what ``torch.load`` returned for ``p``."""
    try:
        return dict(_flatten(obj))
    except CheckpointError as exc:
        raise CheckpointError(f"{p}: {exc}") from None


def _strip_wrappers(key: str) -> tuple[str, int, bool]:
    """``(core key, number of wrappers stripped, whether an EMA wrapper was among them)``."""
    count, ema = 0, False
    while True:
        for prefix in _EMA_WRAPPERS + _WRAPPERS:
            if key.startswith(prefix) and len(key) > len(prefix):
                key, count = key[len(prefix) :], count + 1
                ema = ema or prefix in _EMA_WRAPPERS
                break
        else:
            return key, count, ema


def _missing_key_message(available: Sequence[str], wanted: str, target: str) -> str:
    cores = {}
    for key in available:
        cores.setdefault(_strip_wrappers(key)[0], key)
    close = [cores[c] for c in difflib.get_close_matches(target, list(cores), n=5, cutoff=0.6)]
    tail = ".".join(target.split(".")[-2:])
    close += [k for k in available if k.endswith(tail) and k not in close][:3]
    hint = f"; close matches: {', '.join(close)}" if close else ""
    return f"no tensor {wanted!r} among {len(available)} tensors{hint}"


# ------------------------------------------------------------------------- safetensors


def _safetensors_header(p: Path) -> tuple[dict[str, Any], int]:
    size = p.stat().st_size
    with open(p, "rb") as fh:
        n = safetensors_header_length(fh.read(8), size, str(p))
        header = decode_safetensors_header(fh.read(n), str(p))
    return header, 8 + n


def safetensors_header_length(first8: bytes, size: int, where: str) -> int:
    """The header length a safetensors file of ``size`` bytes declares in its first 8
    bytes, checked to fit in the file and under the format's limit."""
    if len(first8) < 8:
        raise CheckpointError(f"{where}: truncated safetensors file (no header length)")
    (n,) = struct.unpack_from("<Q", first8)
    if n > min(size - 8, _MAX_SAFETENSORS_HEADER):
        raise CheckpointError(
            f"{where}: corrupt safetensors header (claims {n} bytes, file has {size})"
        )
    return n


def decode_safetensors_header(raw: bytes, where: str) -> dict[str, Any]:
    """The JSON header of a safetensors file: a UTF-8 JSON object without duplicate
    keys or non-standard constants (``NaN``); anything else is a :class:`CheckpointError`."""
    try:
        header = json.loads(
            raw.decode("utf-8"),
            object_pairs_hook=_unique_keys,
            parse_constant=_no_constant,
        )
    except RecursionError:
        raise CheckpointError(f"{where}: corrupt safetensors header (nested too deeply)") from None
    except ValueError as exc:  # UnicodeDecodeError, JSONDecodeError, digit limits, hooks
        raise CheckpointError(f"{where}: corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{where}: corrupt safetensors header (not a JSON object)")
    return header


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _safetensors_index(p: Path) -> list[TensorInfo]:
    header, data_start = _safetensors_header(p)
    return safetensors_infos(header, data_start, p.stat().st_size, str(p))


def safetensors_infos(header: dict, data_start: int, size: int, where: str) -> list[TensorInfo]:
    """The tensors a safetensors ``header`` describes, in storage order, each entry
    checked: a known dtype, a shape of non-negative integers, offsets inside a file of
    ``size`` bytes, a length that matches dtype and shape, no two tensors sharing
    bytes. ``where`` names the file in errors (a path or a URL)."""
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(
            f"{where}: corrupt safetensors header (__metadata__ must map to strings)"
        )
    infos = []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        dtype, shape, begin, end = _safetensors_entry(key, entry, where)
        if data_start + end > size:
            raise CheckpointError(
                f"{where}: truncated safetensors file ({key!r} ends at byte {data_start + end}, "
                f"file has {size})"
            )
        infos.append(TensorInfo(key, shape, dtype, (data_start + begin, data_start + end)))
    infos.sort(key=lambda info: info.byte_range)
    _check_disjoint(infos, where)
    return infos


def _safetensors_entry(key: str, entry: Any, where: str) -> tuple[str, tuple[int, ...], int, int]:
    """``(dtype, shape, begin, end)`` of one header entry, or a :class:`CheckpointError`."""

    def corrupt(why: str) -> CheckpointError:
        return CheckpointError(f"{where}: corrupt safetensors header entry for {key!r} ({why})")

    if not isinstance(entry, dict):
        raise corrupt("not a JSON object")
    name, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(name, str) or (
        name not in SAFETENSORS_DTYPES and name not in SAFETENSORS_SUB_BYTE
    ):
        raise corrupt(f"unknown dtype {name!r}")
    if not _sizes(shape, MAX_DIM) or len(shape) > MAX_RANK:
        raise corrupt(f"shape {shape!r} is not a list of at most {MAX_RANK} sizes in [0, 2**62]")
    if not _sizes(offsets, 2**63) or len(offsets) != 2 or offsets[0] > offsets[1]:
        raise corrupt(f"data_offsets {offsets!r} is not [begin, end]")
    if name in SAFETENSORS_SUB_BYTE:
        dtype, bits = SAFETENSORS_SUB_BYTE[name]
    else:
        dtype = SAFETENSORS_DTYPES[name]
        bits = 8 * ITEMSIZE[dtype]
    begin, end = offsets
    if math.prod(shape) * bits != 8 * (end - begin):
        raise corrupt(f"bytes [{begin}, {end}) do not hold {dtype}{list(shape)}")
    return dtype, tuple(shape), begin, end


def _sizes(value: Any, limit: int) -> bool:
    """True for a list of integers in ``[0, limit]`` (JSON booleans are not sizes)."""
    return isinstance(value, list) and all(type(v) is int and 0 <= v <= limit for v in value)


def _check_disjoint(infos: Sequence[TensorInfo], where: str) -> None:
    """No two non-empty tensors share a byte (``infos`` sorted by byte range)."""
    last_key, last_end = None, -1
    for info in infos:
        begin, end = info.byte_range
        if begin == end:
            continue
        if begin < last_end:
            raise CheckpointError(
                f"{where}: corrupt safetensors header ({info.key!r} overlaps {last_key!r})"
            )
        last_key, last_end = info.key, end


def _read_safetensors(p: Path, keys: Sequence[str]) -> dict[str, LoadedTensor]:
    from safetensors import SafetensorError, safe_open

    index = {info.key: info for info in _safetensors_index(p)}
    out = {}
    try:
        with safe_open(str(p), framework="pt", device="cpu") as fh:
            for wanted in keys:
                key = resolve_key(list(index), wanted)
                out[wanted] = loaded_tensor(key, fh.get_tensor(key), index[key].byte_range)
    except SafetensorError as exc:
        raise CheckpointError(f"{p}: unreadable safetensors file ({exc})") from exc
    return out


def loaded_tensor(key: str, tensor: torch.Tensor, byte_range) -> LoadedTensor:
    """A :class:`LoadedTensor` of ``tensor`` (values as float32, sha256 of its stored bytes)."""
    array = _to_float32(tensor, key)
    return LoadedTensor(
        key=key,
        array=array,
        sha256=hashlib.sha256(_stored_bytes(tensor)).hexdigest(),
        byte_range=byte_range,
        dtype=_dtype_name(tensor.dtype),
        shape=tuple(int(s) for s in tensor.shape),
    )


# ------------------------------------------------------------------------------- torch


class UnboundedStructure(CheckpointError):
    """Containers nested too deep (or in a cycle), or too many entries, to flatten: the
    same for any loader, so a checkpoint raising it is refused without another try."""


class PickleRefused(CheckpointError):
    """``data.pkl`` names a global the restricted scanner never resolves."""

    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"data.pkl references {module}.{name}, which a weights file never needs")
        self.module = module
        self.name = name

    @property
    def torch_may_allow(self) -> bool:
        """False when torch's ``weights_only`` loader refuses it too (its allowlist
        holds globals of a few modules only): then no loader zooscan uses accepts the
        file, and it is refused without being loaded or downloaded whole."""
        return self.module.split(".", 1)[0] in _TORCH_ALLOWLIST_ROOTS


def refused_unpickle(where: str, reason: str) -> CheckpointError:
    """The one-line error for a checkpoint whose pickle zooscan will not load."""
    return CheckpointError(
        f"{where}: refused to unpickle: {reason} (zooscan reads only tensors and never runs "
        "a checkpoint's code)"
    )


@dataclass(frozen=True)
class _StorageRef:
    key: str
    dtype: str
    numel: int


class _StorageType:
    def __init__(self, name: str) -> None:
        self.dtype = _TORCH_STORAGE_DTYPES.get(name, name)


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored) -> TorchTensorRef:
    if not isinstance(storage, _StorageRef):
        raise TypeError("tensor without a storage")
    return TorchTensorRef(
        storage.key,
        storage.dtype,
        storage.numel,
        int(storage_offset),
        tuple(int(s) for s in size),
        tuple(int(s) for s in stride),
    )


def _rebuild_parameter(data, *_ignored):
    return data


def _rebuild_from_type(func, _new_type, args, _state):
    return func(*args)


_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("torch", "Size"): tuple,
}


class _IndexUnpickler(pickle.Unpickler):
    """Resolves only inert stand-ins; records storages instead of loading them."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        if module == "torch" and name in _TORCH_STORAGE_DTYPES:
            return _StorageType(name)
        raise PickleRefused(module, name)

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise TypeError(f"unexpected persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise TypeError("storage without a known type")
        return _StorageRef(str(key), storage_type.dtype, int(numel))


def _zip_data_offset(fh, info: zipfile.ZipInfo) -> int:
    """Offset of a member's data: its local header's offset plus the header's length."""
    fh.seek(info.header_offset)
    fields = _ZIP_LOCAL_HEADER.unpack(fh.read(_ZIP_LOCAL_HEADER.size))
    if fields[0] != b"PK\x03\x04":
        raise CheckpointError(f"corrupt zip local header for {info.filename}")
    name_len, extra_len = fields[-2], fields[-1]
    return info.header_offset + _ZIP_LOCAL_HEADER.size + name_len + extra_len


@dataclass(frozen=True)
class _TorchZip:
    """What :func:`_torch_zip_index` learned about a torch zip checkpoint."""

    infos: list[TensorInfo] | None
    """Storage-ordered index; ``None`` when ``data.pkl`` holds more than the restricted
    scanner knows (torch's ``weights_only`` loader decides then)."""
    mmap: bool
    """False when a storage is compressed: torch's ``mmap`` loader would return the
    compressed bytes as the tensor's values."""
    refusal: str | None = None
    """Why the restricted scanner declined ``data.pkl``."""


def _torch_zip_index(p: Path) -> _TorchZip:
    """Index a torch zip checkpoint, refusing zip bombs before anything is inflated."""
    try:
        with zipfile.ZipFile(p) as zf, open(p, "rb") as fh:
            members = {i.filename: i for i in zf.infolist()}
            pkl, archive = _data_pkl(p, members)
            mmap = _check_torch_members(p, members, archive)
            try:
                refs = scan_torch_pickle(zf.read(pkl))
            except PickleRefused as exc:
                if not exc.torch_may_allow:
                    raise refused_unpickle(str(p), str(exc)) from None
                return _TorchZip(None, mmap, str(exc))
            except UnboundedStructure as exc:
                raise CheckpointError(f"{p}: {exc}") from None
            except CheckpointError:  # something the scanner does not parse: torch decides
                return _TorchZip(None, mmap)
            return _TorchZip(_torch_infos(p, refs, archive, members, fh), mmap)
    except _ZIP_ERRORS as exc:
        raise CheckpointError(
            f"{p}: corrupt or truncated torch checkpoint ({_first_line(exc)})"
        ) from exc


def _data_pkl(p: Path, members: dict[str, zipfile.ZipInfo]) -> tuple[zipfile.ZipInfo, str]:
    """``data.pkl`` of the archive folder torch reads (the first member's folder), size-checked."""
    first = next(iter(members), "")
    archive = first.split("/", 1)[0] + "/" if "/" in first else ""
    pkl = members.get(f"{archive}data.pkl")
    if pkl is None:
        raise CheckpointError(f"{p}: torch checkpoint without {archive}data.pkl")
    if pkl.file_size > MAX_PICKLE_BYTES:
        raise CheckpointError(
            f"{p}: data.pkl would be {pkl.file_size} bytes (a tensor index needs at most "
            f"{MAX_PICKLE_BYTES}): refused as a zip bomb"
        )
    return pkl, archive


def _check_torch_members(p: Path, members: dict[str, zipfile.ZipInfo], archive: str) -> bool:
    """Check every member's sizes and the storages' inflated total; True when every
    storage is stored uncompressed (so memory-mapping is exact)."""
    size = p.stat().st_size
    for member in members.values():
        _check_member(p, member, size)
    compressed = [
        m
        for name, m in members.items()
        if name.startswith(f"{archive}data/") and m.compress_type != zipfile.ZIP_STORED
    ]
    inflated = sum(m.file_size for m in compressed)
    if inflated > MAX_INFLATED_BYTES:
        raise CheckpointError(
            f"{p}: compressed storages would inflate to {inflated} bytes (more than "
            f"{MAX_INFLATED_BYTES}): refused as a zip bomb"
        )
    return not compressed


def _torch_infos(p, refs, archive, members, fh) -> list[TensorInfo]:
    rows = []
    for order, (key, ref) in enumerate(refs.items()):
        member = members.get(f"{archive}data/{ref.storage_key}")
        if member is None:
            raise CheckpointError(f"{p}: storage {ref.storage_key} of {key!r} is missing")
        if ref.offset < 0 or any(size < 0 for size in ref.shape):
            raise CheckpointError(f"{p}: corrupt tensor record for {key!r}")
        start = _zip_data_offset(fh, member)
        itemsize = ITEMSIZE.get(ref.dtype, 0)
        begin = start + ref.offset * itemsize
        if begin + ref.nbytes > start + member.file_size:
            raise CheckpointError(f"{p}: storage of {key!r} is shorter than the tensor")
        stored = member.compress_type == zipfile.ZIP_STORED and itemsize and ref.is_contiguous
        byte_range = (begin, begin + ref.nbytes) if stored else None
        rows.append(((begin, order), TensorInfo(key, ref.shape, ref.dtype, byte_range)))
    rows.sort(key=lambda row: row[0])
    return [info for _, info in rows]


def _torch_load(p: Path, archive: _TorchZip | None) -> Any:
    """``torch.load(weights_only=True)``: memory-mapped for a zip whose storages are
    stored, read whole otherwise (legacy files, compressed storages)."""
    mmap = archive is not None and archive.mmap
    try:
        with warnings.catch_warnings():
            # pickle protocols above 2 are common (``pickle.dump``) and harmless here: the
            # weights-only unpickler refuses any opcode it cannot handle, reported below
            warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
            return torch.load(p, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        reason = (archive.refusal if archive else None) or _weights_only_reason(exc)
        raise refused_unpickle(str(p), reason) from exc
    except Exception as exc:  # torch raises RuntimeError/EOFError/... for damaged files
        raise CheckpointError(
            f"{p}: corrupt or truncated torch checkpoint ({_first_line(exc)})"
        ) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _weights_only_reason(exc: BaseException) -> str:
    """The informative line of torch's long ``weights_only`` message (which also
    suggests ``weights_only=False``: zooscan never does that)."""
    for line in str(exc).splitlines():
        text = line.split("WeightsUnpickler error:", 1)[-1].strip()
        if text and not text.startswith(_TORCH_BOILERPLATE):
            return text.split(". Please use", 1)[0].rstrip(".")
    return "the file holds objects other than tensors"


def _read_torch(p: Path, keys: Sequence[str], zipped: bool) -> dict[str, LoadedTensor]:
    archive = _torch_zip_index(p) if zipped else None
    ranges = {info.key: info.byte_range for info in (archive.infos or [])} if archive else {}
    tensors = _tensors_of(p, _torch_load(p, archive))
    out = {}
    for wanted in keys:
        key = resolve_key(list(tensors), wanted)
        out[wanted] = loaded_tensor(key, tensors[key], ranges.get(key))
    return out


# --------------------------------------------------------------------------------- npz


def _npz_index(p: Path) -> list[TensorInfo]:
    infos = []
    size = p.stat().st_size
    try:
        with zipfile.ZipFile(p) as zf, open(p, "rb") as fh:
            for member in zf.infolist():
                _check_member(p, member, size)
                infos.append(_npz_member_info(p, zf, fh, member))
    except _ZIP_ERRORS as exc:
        raise CheckpointError(
            f"{p}: corrupt or truncated npz archive ({_first_line(exc)})"
        ) from exc
    return infos


def _npz_member_info(p: Path, zf: zipfile.ZipFile, fh, member: zipfile.ZipInfo) -> TensorInfo:
    key = member.filename.removesuffix(".npy")
    with zf.open(member) as stream:
        shape, fortran, dtype = read_npy_header(stream, key, str(p))
        header_len = stream.tell()
    nbytes = math.prod(shape) * dtype.itemsize
    if not dtype.hasobject:  # object arrays are pickles: listed, refused when read
        check_npy_size(key, shape, dtype, member.file_size - header_len, str(p))
    byte_range = None
    little = dtype.byteorder in "<|" or (dtype.byteorder == "=" and sys.byteorder == "little")
    if member.compress_type == zipfile.ZIP_STORED and not fortran and little:
        start = _zip_data_offset(fh, member) + header_len
        byte_range = (start, start + nbytes)
    return TensorInfo(key, tuple(int(s) for s in shape), dtype.name, byte_range)


def read_npy_header(stream, key: str, where: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """``(shape, fortran_order, dtype)`` from an ``.npy`` header (``stream`` is left at
    the data). numpy evaluates the header's Python literal, so a damaged one raises
    anything from ``ValueError`` to ``SyntaxError``: all become :class:`CheckpointError`."""
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(stream)
        return np.lib.format.read_array_header_2_0(stream)
    except Exception as exc:  # a damaged header: any parse error
        raise CheckpointError(
            f"{where}: bad npy header in member {key!r} ({type(exc).__name__})"
        ) from None


def check_npy_size(key: str, shape: tuple, dtype: np.dtype, data_bytes: int, where: str) -> None:
    """An ``.npy`` member's header (shape, dtype) must describe exactly the ``data_bytes``
    that follow it: numpy allocates what the header says before reading."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes != data_bytes:
        raise CheckpointError(
            f"{where}: npz member {key!r} declares {dtype}{list(shape)} ({nbytes} bytes) "
            f"but holds {data_bytes} bytes"
        )


def _read_npz(p: Path, keys: Sequence[str]) -> dict[str, LoadedTensor]:
    index = {info.key: info for info in _npz_index(p)}
    out = {}
    try:
        with np.load(p, allow_pickle=False) as npz:
            for wanted in keys:
                key = resolve_key(list(index), wanted)
                if index[key].dtype == "object":  # allow_pickle stays False: refuse clearly
                    reason = f"npz member {key!r} holds Python objects (a pickle)"
                    raise refused_unpickle(str(p), reason)
                out[wanted] = loaded_array(key, npz[key], index[key].byte_range)
    except CheckpointError:
        raise
    except _ZIP_ERRORS as exc:
        raise CheckpointError(f"{p}: unreadable npz member ({_first_line(exc)})") from exc
    return out


def loaded_array(key: str, array: np.ndarray, byte_range) -> LoadedTensor:
    """A :class:`LoadedTensor` of a numpy ``array`` (as :func:`loaded_tensor`)."""
    if array.dtype.kind not in "fiub":
        raise CheckpointError(f"tensor {key!r} has dtype {array.dtype}, not a real-valued weight")
    stored = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return LoadedTensor(
        key=key,
        array=np.array(array, dtype=np.float32, order="C", copy=True),
        sha256=hashlib.sha256(stored.tobytes()).hexdigest(),
        byte_range=byte_range,
        dtype=array.dtype.name,
        shape=tuple(int(s) for s in array.shape),
    )
