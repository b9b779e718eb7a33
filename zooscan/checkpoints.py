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
import os
import pickle
import struct
import sys
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zooscan.errors import CheckpointError

__all__ = [
    "LoadedTensor",
    "TensorInfo",
    "TorchTensorRef",
    "checkpoint_format",
    "first_4d_tensor",
    "list_tensors",
    "read_tensors",
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
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}
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
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
}
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024
_ZIP_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")

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
        return int(np.prod(self.shape, dtype=np.int64)) * ITEMSIZE.get(self.dtype, 0)


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
    if fmt == "torch-zip":
        index = _torch_zip_index(p)
        if index is not None:
            return index
        return [_info_from_tensor(k, t, None) for k, t in _flatten(_torch_load(p, True))]
    return [_info_from_tensor(k, t, None) for k, t in _flatten(_torch_load(p, False))]


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
    ``os.system``...) raises :class:`CheckpointError`; nothing is imported or run.
    Keys of nested containers are joined with ``.`` as in :func:`list_tensors`.
    """
    import io

    try:
        obj = _IndexUnpickler(io.BytesIO(data)).load()
    except _RefusedGlobal as exc:
        raise CheckpointError(
            f"data.pkl references {exc}, which a weights file never needs"
        ) from exc
    except Exception as exc:  # any malformed pickle ends here
        raise CheckpointError(f"data.pkl is corrupt: {type(exc).__name__}: {exc}") from exc
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
    try:
        with zipfile.ZipFile(p) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(f"{p}: corrupt or truncated zip archive ({exc})") from exc
    if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        return "torch-zip"
    if names and all(n.endswith(".npy") for n in names):
        return "npz"
    raise CheckpointError(f"{p}: zip archive that is neither a torch checkpoint nor an npz")


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
    return tensor.detach().to(torch.float32).contiguous().numpy().copy()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _info_from_tensor(key: str, tensor: torch.Tensor, byte_range) -> TensorInfo:
    return TensorInfo(
        key, tuple(int(s) for s in tensor.shape), _dtype_name(tensor.dtype), byte_range
    )


def _flatten(
    obj: Any, prefix: str = "", leaf_type: type = torch.Tensor
) -> Iterator[tuple[str, Any]]:
    """Yield ``(dotted key, leaf)`` for every leaf of type ``leaf_type`` in nested
    dicts, lists and tuples, in container order."""
    if isinstance(obj, leaf_type):
        yield prefix, obj
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            yield from _flatten(value, f"{prefix}.{key}" if prefix else str(key), leaf_type)
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _flatten(value, f"{prefix}.{i}" if prefix else str(i), leaf_type)


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
    (n,) = struct.unpack("<Q", first8)
    if n > min(size - 8, _MAX_SAFETENSORS_HEADER):
        raise CheckpointError(
            f"{where}: corrupt safetensors header (claims {n} bytes, file has {size})"
        )
    return n


def decode_safetensors_header(raw: bytes, where: str) -> dict[str, Any]:
    """The JSON header of a safetensors file (a corrupt one is a :class:`CheckpointError`)."""
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{where}: corrupt safetensors header ({exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{where}: corrupt safetensors header (not a JSON object)")
    return header


def _safetensors_index(p: Path) -> list[TensorInfo]:
    header, data_start = _safetensors_header(p)
    return safetensors_infos(header, data_start, p.stat().st_size, str(p))


def safetensors_infos(header: dict, data_start: int, size: int, where: str) -> list[TensorInfo]:
    """The tensors a safetensors ``header`` describes, in storage order, each entry
    checked: offsets inside a file of ``size`` bytes and a length that matches its
    dtype and shape. ``where`` names the file in errors (a path or a URL)."""
    infos = []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in entry["data_offsets"])
            shape = tuple(int(s) for s in entry["shape"])
            dtype = SAFETENSORS_DTYPES.get(entry["dtype"], str(entry["dtype"]).lower())
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{where}: corrupt safetensors header entry for {key!r}") from exc
        itemsize = ITEMSIZE.get(dtype)
        if begin < 0 or (
            itemsize is not None and end - begin != int(np.prod(shape, dtype=np.int64)) * itemsize
        ):
            raise CheckpointError(
                f"{where}: corrupt safetensors header entry for {key!r} (bytes [{begin}, {end}) "
                f"for {dtype}{list(shape)})"
            )
        if data_start + end > size:
            raise CheckpointError(
                f"{where}: truncated safetensors file ({key!r} ends at byte {data_start + end}, "
                f"file has {size})"
            )
        infos.append(TensorInfo(key, shape, dtype, (data_start + begin, data_start + end)))
    infos.sort(key=lambda info: info.byte_range)
    return infos


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
    return LoadedTensor(
        key=key,
        array=_to_float32(tensor, key),
        sha256=hashlib.sha256(_stored_bytes(tensor)).hexdigest(),
        byte_range=byte_range,
        dtype=_dtype_name(tensor.dtype),
        shape=tuple(int(s) for s in tensor.shape),
    )


# ------------------------------------------------------------------------------- torch


class _RefusedGlobal(Exception):
    pass


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
        raise _RefusedGlobal(f"{module}.{name}")

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


def _torch_zip_index(p: Path) -> list[TensorInfo] | None:
    """Storage-ordered index of a torch zip file, or ``None`` when ``data.pkl`` holds
    something the restricted scanner does not know (torch's own loader decides then)."""
    try:
        with zipfile.ZipFile(p) as zf, open(p, "rb") as fh:
            pkl = next(n for n in zf.namelist() if n == "data.pkl" or n.endswith("/data.pkl"))
            archive = pkl[: -len("data.pkl")]
            try:
                refs = scan_torch_pickle(zf.read(pkl))
            except CheckpointError:
                return None
            members = {i.filename: i for i in zf.infolist()}
            return _torch_infos(p, refs, archive, members, fh)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise CheckpointError(f"{p}: corrupt or truncated torch checkpoint ({exc})") from exc


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


def _torch_load(p: Path, zipped: bool) -> Any:
    try:
        return torch.load(p, map_location="cpu", weights_only=True, mmap=zipped)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{p}: refused to unpickle (weights_only=True: the file holds more than tensors): "
            f"{_weights_only_reason(exc)}"
        ) from exc
    except Exception as exc:  # torch raises RuntimeError/EOFError/... for damaged files
        raise CheckpointError(
            f"{p}: corrupt or truncated torch checkpoint ({_first_line(exc)})"
        ) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _weights_only_reason(exc: BaseException) -> str:
    """The informative line of torch's long weights_only message."""
    for line in str(exc).splitlines():
        if "WeightsUnpickler error:" in line:
            reason = line.split("WeightsUnpickler error:", 1)[1].strip()
            return reason.split(". Please use", 1)[0]
    return _first_line(exc)


def _read_torch(p: Path, keys: Sequence[str], zipped: bool) -> dict[str, LoadedTensor]:
    ranges = {}
    if zipped:
        index = _torch_zip_index(p)
        ranges = {info.key: info.byte_range for info in index or []}
    tensors = dict(_flatten(_torch_load(p, zipped)))
    out = {}
    for wanted in keys:
        key = resolve_key(list(tensors), wanted)
        out[wanted] = loaded_tensor(key, tensors[key], ranges.get(key))
    return out


# --------------------------------------------------------------------------------- npz


def _npz_index(p: Path) -> list[TensorInfo]:
    infos = []
    try:
        with zipfile.ZipFile(p) as zf, open(p, "rb") as fh:
            for member in zf.infolist():
                infos.append(_npz_member_info(zf, fh, member))
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise CheckpointError(f"{p}: corrupt or truncated npz archive ({exc})") from exc
    return infos


def _npz_member_info(zf: zipfile.ZipFile, fh, member: zipfile.ZipInfo) -> TensorInfo:
    key = member.filename.removesuffix(".npy")
    with zf.open(member) as stream:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
        header_len = stream.tell()
    byte_range = None
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    little = dtype.byteorder in "<|" or (dtype.byteorder == "=" and sys.byteorder == "little")
    if member.compress_type == zipfile.ZIP_STORED and not fortran and little:
        start = _zip_data_offset(fh, member) + header_len
        byte_range = (start, start + nbytes)
    return TensorInfo(key, tuple(int(s) for s in shape), dtype.name, byte_range)


def _read_npz(p: Path, keys: Sequence[str]) -> dict[str, LoadedTensor]:
    index = {info.key: info for info in _npz_index(p)}
    out = {}
    try:
        with np.load(p, allow_pickle=False) as npz:
            for wanted in keys:
                key = resolve_key(list(index), wanted)
                out[wanted] = loaded_array(key, npz[key], index[key].byte_range)
    except CheckpointError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{p}: unreadable npz member ({exc})") from exc
    return out


def loaded_array(key: str, array: np.ndarray, byte_range) -> LoadedTensor:
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
