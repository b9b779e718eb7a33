"""Fetch only the tensors a scan needs from a remote checkpoint, by byte ranges.

The format is recognised from the file's first bytes, never from its name:

- **safetensors**: the first block read (64 KiB) holds the 8-byte header length and,
  usually, the whole JSON header (a second read fetches the rest when it is longer);
  the wanted tensors then come in one ranged read (nearby tensors are coalesced).
- **torch zip** (``torch.save``, torchvision ``.pth``, HF ``pytorch_model.bin``): the
  end-of-central-directory record and the central directory come from one read of the
  tail, ``data.pkl`` from the head block (or one more read) and is indexed by
  :func:`zooscan.checkpoints.scan_torch_pickle` (a restricted unpickler that executes
  nothing); each wanted tensor is then one read covering its storage entry's local
  header and the tensor's own bytes (not the rest of a shared storage).
- **npz** (``numpy.savez[_compressed]``): the central directory, then the member.
- **legacy torch** (not a zip) and torch zips whose ``data.pkl`` holds more than
  tensors and dicts: the whole file is downloaded and read by
  :func:`zooscan.checkpoints.read_tensors` (``torch.load(weights_only=True)``).

What arrives is verified: every range has the requested length (the client retries
otherwise), a safetensors entry's byte length must equal its shape times its dtype
size and lie inside the file, a torch tensor must fit its storage entry, and a whole
zip member (``data.pkl``, a storage read in full, an npz member) must match the CRC-32
of the central directory. Values and sha256 follow :mod:`zooscan.checkpoints` exactly,
so a remote read is bit-identical to a local one.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import posixpath
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from zooscan import checkpoints
from zooscan.checkpoints import LoadedTensor, TensorInfo, TorchTensorRef, resolve_key
from zooscan.errors import CheckpointError
from zooscan.remote.client import HubClient, RemoteFile, is_repo_path
from zooscan.remote.zipdir import (
    DEFLATED,
    LOCAL_HEADER,
    MAX_EOCD_SEARCH,
    STORED,
    ZipEntry,
    find_central_directory,
    local_data_offset,
    parse_central_directory,
)

__all__ = [
    "FetchResult",
    "fetch_tensors",
    "list_remote_keys",
    "remote_index",
    "sharded_safetensors",
]

HEAD_BLOCK = 64 * 1024
"""First read of every file: format, safetensors header or zip head (``data.pkl``)."""
TAIL_BLOCK = 32 * 1024
"""First read of a zip's tail: the end records and usually the central directory."""
MERGE_GAP = 16 * 1024
"""Wanted byte ranges closer than this are fetched in one request."""
HEADER_SLACK = 256
"""Bytes allowed for a zip local header's name and extra field (torch pads to 64)."""
NPY_HEADER_READ = 4096
"""Bytes read from the start of an npz member to parse its ``.npy`` header."""
_MAX_INDEX_FILE = 64 * 1024 * 1024


@dataclass
class FetchResult:
    """What :func:`fetch_tensors` read from one file."""

    tensors: dict[str, LoadedTensor]
    """By the *requested* key (each resolved with :func:`zooscan.checkpoints.resolve_key`)."""
    keys: list[str]
    """Every tensor key of the file, in storage order."""
    bytes_fetched: int
    """Body bytes received over the network for this call (0 from a local copy)."""
    requests: int
    """HTTP requests made for this call (retries included)."""
    file: RemoteFile
    format: str = ""
    """``safetensors``, ``torch-zip``, ``torch-legacy`` or ``npz``."""
    infos: list[TensorInfo] = field(default_factory=list)
    """Key, shape and dtype of every tensor in storage order, from the index that was
    read anyway (safetensors header, ``data.pkl``; ``byte_range`` only for tensors read
    in a torch zip). An npz has no such index: only the members read are listed (use
    :func:`remote_index` for all)."""


KeyChoice = Sequence[str] | Callable[[Sequence[str]], Sequence[str]]


def fetch_tensors(client: HubClient, f: RemoteFile, keys: KeyChoice) -> FetchResult:
    """Read only ``keys`` from ``f`` (see the module docstring). A file with
    ``local_path`` (the hub cache) is read from disk with no request.

    ``keys`` names the tensors (wrapper prefixes tolerated, see
    :func:`zooscan.checkpoints.resolve_key`), or is a callable that receives the file's
    key list (read once, with the header) and returns the exact keys to read.

    Raises :class:`~zooscan.errors.CheckpointError` when a key is absent (naming close
    matches), the file is malformed, or the network keeps failing.
    """
    if f.local_path:
        return _fetch_local(f, keys)
    with client.meter() as meter, _open_index(client, f) as index:
        wanted = _choose_keys(keys, index.keys)
        index.prefetch(sorted(set(wanted.values())))
        tensors = {w: index.load(key) for w, key in wanted.items()}
    return FetchResult(
        tensors=tensors,
        keys=list(index.keys),
        bytes_fetched=meter.bytes,
        requests=meter.requests,
        file=f,
        format=index.format,
        infos=index.infos(),
    )


def remote_index(client: HubClient, f: RemoteFile) -> list[TensorInfo]:
    """Every tensor of ``f`` (key, shape, dtype) in storage order, reading only the
    header or central directory and ``data.pkl`` (a legacy file is downloaded whole)."""
    if f.local_path:
        return checkpoints.list_tensors(f.local_path)
    with _open_index(client, f) as index:
        return index.index()


def list_remote_keys(client: HubClient, f: RemoteFile) -> list[str]:
    """The tensor keys of ``f`` in storage order (see :func:`remote_index`)."""
    return [info.key for info in remote_index(client, f)]


def sharded_safetensors(
    client: HubClient,
    repo_id: str,
    revision: str | None,
    index_filename: str = "model.safetensors.index.json",
) -> dict[str, str]:
    """The ``weight_map`` of a sharded safetensors checkpoint: tensor key -> shard file
    name (relative to the repository root, like the index file's own folder)."""
    f = client.resolve(repo_id, index_filename, revision)
    if f.size is not None and f.size > _MAX_INDEX_FILE:
        raise CheckpointError(f"{f.display}: index file too large ({f.size} bytes)")
    try:
        index = json.loads(client.read_all(f))
        weight_map = index["weight_map"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{f.display}: not a safetensors index ({exc})") from exc
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError(f"{f.display}: weight_map is not a mapping of names to files")
    bad = sorted({shard for shard in weight_map.values() if not is_repo_path(shard)})
    if bad:
        raise CheckpointError(
            f"{f.display}: weight_map names files outside the repository: {', '.join(bad[:3])}"
        )
    folder = posixpath.dirname(index_filename)
    return {
        key: posixpath.join(folder, shard) if folder else shard for key, shard in weight_map.items()
    }


# ------------------------------------------------------------------------------ reader


class _Reader:
    """Byte ranges of one remote file; blocks already fetched are served again."""

    def __init__(self, client: HubClient, f: RemoteFile) -> None:
        self.client = client
        self.f = f
        self.size = int(f.size or 0)
        self._blocks: list[tuple[int, bytes]] = []

    def read(self, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` (clipped to the file): what cached blocks hold is
        reused, the rest comes in one ranged request."""
        end = min(end, self.size)
        pieces = []
        pos = start
        while pos < end:
            block = self._block_at(pos)
            if block is None:
                break
            offset, data = block
            piece = data[pos - offset : min(end, offset + len(data)) - offset]
            pieces.append(piece)
            pos += len(piece)
        if pos < end:
            data = self.client.read_range(self.f, pos, end)
            self._blocks.append((pos, data))
            pieces.append(data)
        return b"".join(pieces)

    def _block_at(self, pos: int) -> tuple[int, bytes] | None:
        for offset, data in self._blocks:
            if offset <= pos < offset + len(data):
                return offset, data
        return None

    def prefetch(self, spans: Iterable[tuple[int, int]]) -> None:
        """Fetch ``spans`` with nearby ones merged into one request each."""
        for start, end in merge_spans(spans, self.size, self._covered):
            self.read(start, end)

    def _covered(self, start: int, end: int) -> bool:
        return any(o <= start and end <= o + len(d) for o, d in self._blocks)


class _Index:
    """One opened checkpoint: its tensor keys and how to load one."""

    format = ""

    def __init__(self) -> None:
        self.keys: list[str] = []

    def infos(self) -> list[TensorInfo]:
        """What is known of every tensor without reading more."""
        raise NotImplementedError

    def index(self) -> list[TensorInfo]:
        """Every tensor's key, shape and dtype (reading more if the format needs it)."""
        return self.infos()

    def prefetch(self, keys: Sequence[str]) -> None:
        """Fetch the bytes of ``keys`` with as few requests as possible."""

    def load(self, key: str) -> LoadedTensor:
        raise NotImplementedError

    def __enter__(self) -> _Index:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Release temporary files."""


def merge_spans(
    spans: Iterable[tuple[int, int]], size: int, covered: Callable[[int, int], bool]
) -> list[tuple[int, int]]:
    """The reads that fetch ``spans``: clipped to ``size``, those ``covered`` by bytes
    already held left out, and spans less than :data:`MERGE_GAP` apart merged."""
    merged: list[list[int]] = []
    for start, end in sorted((s, min(e, size)) for s, e in spans):
        if covered(start, end):
            continue
        if merged and start - merged[-1][1] <= MERGE_GAP:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(start, end) for start, end in merged]


class _NeedWholeFile(Exception):
    """The file cannot be read by ranges (legacy format, unusual ``data.pkl``)."""


def _open_index(client: HubClient, f: RemoteFile) -> _Index:
    if not f.size:
        if f.size == 0:
            raise CheckpointError(f"{f.display}: empty file (0 bytes)")
        return _WholeFileIndex(client, f)
    reader = _Reader(client, f)
    head = reader.read(0, HEAD_BLOCK)
    try:
        if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
            return _open_zip(reader)
        if len(head) >= 9 and head[8:9] == b"{":
            return _SafetensorsIndex(reader, head)
        if head[:1] == b"\x80":
            raise _NeedWholeFile
    except _NeedWholeFile:
        return _WholeFileIndex(client, f)
    raise CheckpointError(f"{f.display}: {_unknown_format(head)}")


def _unknown_format(head: bytes) -> str:
    if head.lstrip()[:1] in (b"<", b"{"):
        return "not a checkpoint (the server sent a text/HTML/JSON page)"
    return f"not a safetensors, torch or npz checkpoint (starts with {head[:8]!r})"


# ------------------------------------------------------------------------- safetensors


class _SafetensorsIndex(_Index):
    format = "safetensors"

    def __init__(self, reader: _Reader, head: bytes) -> None:
        super().__init__()
        self.reader = reader
        f = reader.f
        n = checkpoints.safetensors_header_length(head[:8], reader.size, f.display)
        header = checkpoints.decode_safetensors_header(reader.read(8, 8 + n), f.display)
        self._infos = checkpoints.safetensors_infos(header, 8 + n, reader.size, f.display)
        self._by_key = {info.key: info for info in self._infos}
        self.keys = [info.key for info in self._infos]

    def infos(self) -> list[TensorInfo]:
        return list(self._infos)

    def prefetch(self, keys: Sequence[str]) -> None:
        self.reader.prefetch(self._by_key[k].byte_range for k in keys)

    def load(self, key: str) -> LoadedTensor:
        info = self._by_key[key]
        start, end = info.byte_range
        raw = self.reader.read(start, end)
        tensor = _tensor_from_bytes(raw, info.dtype, info.shape, key)
        return checkpoints.loaded_tensor(key, tensor, info.byte_range)


# --------------------------------------------------------------------------------- zip


def _open_zip(reader: _Reader) -> _Index:
    size = reader.size
    tail_start = max(0, size - TAIL_BLOCK)
    tail = reader.read(tail_start, size)
    try:
        cd_offset, cd_size, count = find_central_directory(tail, tail_start, size)
    except CheckpointError:
        if tail_start == 0:
            raise
        # A long archive comment (or zip64 records) before the end: the widest search.
        tail_start = max(0, size - MAX_EOCD_SEARCH - 1024)
        tail = reader.read(tail_start, size)
        cd_offset, cd_size, count = find_central_directory(tail, tail_start, size)
    entries = parse_central_directory(reader.read(cd_offset, cd_offset + cd_size), count, size)
    pkl = [n for n in entries if n == "data.pkl" or n.endswith("/data.pkl")]
    if pkl:
        return _TorchZipIndex(reader, entries, pkl[0])
    if entries and all(n.endswith(".npy") for n in entries):
        return _NpzIndex(reader, entries)
    raise CheckpointError(
        f"{reader.f.display}: zip archive that is neither a torch checkpoint nor an npz"
    )


def _member_span(entry: ZipEntry, lo: int, hi: int) -> tuple[int, int]:
    """A byte span that (very likely) covers a member's local header and its data bytes
    ``[lo, hi)``: one request when ``lo`` is near the start of the member."""
    if lo > MERGE_GAP:
        return entry.header_offset, entry.header_offset + LOCAL_HEADER.size + HEADER_SLACK
    return entry.header_offset, entry.header_offset + LOCAL_HEADER.size + HEADER_SLACK + hi


def _member_bytes(reader: _Reader, entry: ZipEntry, lo: int, hi: int) -> tuple[int, bytes]:
    """``(data offset, data bytes [lo, hi))`` of a member (offsets within its data)."""
    span_start, span_end = _member_span(entry, lo, hi)
    block = reader.read(span_start, span_end)
    data_start = local_data_offset(block, entry)
    if data_start + entry.compressed_size > reader.size:
        raise CheckpointError(f"{reader.f.display}: member {entry.name!r} lies outside the file")
    start, end = data_start + lo, data_start + hi
    if span_start <= start and end <= span_start + len(block):
        return data_start, block[start - span_start : end - span_start]
    return data_start, reader.read(start, end)


def _whole_member(
    reader: _Reader, entry: ZipEntry, limit: int = checkpoints.MAX_INFLATED_BYTES
) -> tuple[int, bytes]:
    """A member's uncompressed data, checked against its CRC-32. A member larger than
    ``limit`` (compressed or inflated) is refused before a byte of it is read, and
    inflating never produces more than the size the directory declares."""
    size = max(entry.size, entry.compressed_size)
    if size > limit:
        raise CheckpointError(
            f"{reader.f.display}: zip member {entry.name!r} would be {size} bytes "
            f"(more than {limit}): refused as a zip bomb"
        )
    data_start, raw = _member_bytes(reader, entry, 0, entry.compressed_size)
    if entry.method == DEFLATED:
        try:
            raw = zlib.decompressobj(-15).decompress(raw, entry.size + 1)
        except zlib.error as exc:
            raise CheckpointError(f"{reader.f.display}: corrupt member {entry.name!r}") from exc
    elif entry.method != STORED:
        raise CheckpointError(
            f"{reader.f.display}: member {entry.name!r} uses zip method {entry.method}"
        )
    _check_crc(reader.f, entry, raw)
    return data_start, raw


def _check_crc(f: RemoteFile, entry: ZipEntry, data: bytes) -> None:
    if len(data) != entry.size or zlib.crc32(data) != entry.crc32:
        raise CheckpointError(
            f"{f.display}: member {entry.name!r} does not match its CRC-32 (corrupt or changed)"
        )


class _TorchZipIndex(_Index):
    format = "torch-zip"

    def __init__(self, reader: _Reader, entries: dict[str, ZipEntry], pkl_name: str) -> None:
        super().__init__()
        self.reader = reader
        self.entries = entries
        self.archive = pkl_name[: -len("data.pkl")]
        _, pkl = _whole_member(reader, entries[pkl_name], checkpoints.MAX_PICKLE_BYTES)
        try:
            self.refs = checkpoints.scan_torch_pickle(pkl)
        except checkpoints.PickleRefused as exc:
            if not exc.torch_may_allow:  # torch would refuse it too: no download
                raise checkpoints.refused_unpickle(reader.f.display, str(exc)) from None
            raise _NeedWholeFile from exc
        except checkpoints.UnboundedStructure as exc:  # the same for torch: no download
            raise CheckpointError(f"{reader.f.display}: {exc}") from None
        except CheckpointError as exc:
            raise _NeedWholeFile from exc
        self.big_endian = self._big_endian()
        self.members = {key: self._member(key, ref) for key, ref in self.refs.items()}
        order = {
            key: (self.members[key].header_offset, ref.offset) for key, ref in self.refs.items()
        }
        self.keys = sorted(self.refs, key=order.__getitem__)
        self.ranges: dict[str, tuple[int, int] | None] = {}

    def _big_endian(self) -> bool:
        entry = self.entries.get(f"{self.archive}byteorder")
        if entry is None:
            return False
        _, data = _whole_member(self.reader, entry)
        return data.strip() == b"big"

    def _member(self, key: str, ref: TorchTensorRef) -> ZipEntry:
        entry = self.entries.get(f"{self.archive}data/{ref.storage_key}")
        if entry is None:
            raise CheckpointError(f"{self.reader.f.display}: storage of {key!r} is missing")
        itemsize = checkpoints.ITEMSIZE.get(ref.dtype, 0)
        if not itemsize or ref.offset < 0 or any(s < 0 for s in ref.shape):
            raise CheckpointError(f"{self.reader.f.display}: unsupported tensor record {key!r}")
        if _element_span(ref)[1] * itemsize > entry.size:
            raise CheckpointError(
                f"{self.reader.f.display}: storage of {key!r} is shorter than the tensor"
            )
        return entry

    def infos(self) -> list[TensorInfo]:
        return [
            TensorInfo(k, self.refs[k].shape, self.refs[k].dtype, self.ranges.get(k))
            for k in self.keys
        ]

    def prefetch(self, keys: Sequence[str]) -> None:
        spans = []
        for key in keys:
            ref, entry = self.refs[key], self.members[key]
            lo, hi = self._byte_span(ref, entry)
            spans.append(_member_span(entry, lo, hi))
        self.reader.prefetch(spans)

    def _byte_span(self, ref: TorchTensorRef, entry: ZipEntry) -> tuple[int, int]:
        if entry.method != STORED:
            return 0, entry.compressed_size
        itemsize = checkpoints.ITEMSIZE[ref.dtype]
        lo, hi = _element_span(ref)
        return lo * itemsize, hi * itemsize

    def load(self, key: str) -> LoadedTensor:
        ref, entry = self.refs[key], self.members[key]
        itemsize = checkpoints.ITEMSIZE[ref.dtype]
        lo, hi = _element_span(ref)
        if entry.method == STORED:
            data_start, raw = _member_bytes(self.reader, entry, lo * itemsize, hi * itemsize)
            if lo == 0 and hi * itemsize == entry.size:
                _check_crc(self.reader.f, entry, raw)
        else:
            data_start, storage = _whole_member(self.reader, entry)
            raw = storage[lo * itemsize : hi * itemsize]
        if self.big_endian:
            raw = _byteswap(raw, itemsize)
        flat = _tensor_from_bytes(raw, ref.dtype, (hi - lo,), key)
        tensor = torch.as_strided(flat, ref.shape, ref.stride, 0)
        byte_range = None
        if entry.method == STORED and ref.is_contiguous and not self.big_endian:
            begin = data_start + lo * itemsize
            byte_range = (begin, begin + ref.nbytes)
        self.ranges[key] = byte_range
        return checkpoints.loaded_tensor(key, tensor, byte_range)


def _element_span(ref: TorchTensorRef) -> tuple[int, int]:
    """``[lo, hi)``: the storage elements a (possibly strided) tensor touches."""
    if any(s == 0 for s in ref.shape):
        return ref.offset, ref.offset
    last = ref.offset + sum((s - 1) * st for s, st in zip(ref.shape, ref.stride, strict=True))
    return ref.offset, last + 1


def _byteswap(raw: bytes, itemsize: int) -> bytes:
    if itemsize == 1:
        return raw
    return np.frombuffer(raw, dtype=np.uint8).reshape(-1, itemsize)[:, ::-1].tobytes()


class _NpzIndex(_Index):
    format = "npz"

    def __init__(self, reader: _Reader, entries: dict[str, ZipEntry]) -> None:
        super().__init__()
        self.reader = reader
        self.entries = {name.removesuffix(".npy"): e for name, e in entries.items()}
        self.keys = sorted(self.entries, key=lambda k: self.entries[k].header_offset)
        self._arrays: dict[str, tuple[np.ndarray, tuple[int, int] | None]] = {}

    def infos(self) -> list[TensorInfo]:
        """The members read so far (an npz has no index of shapes: see :meth:`index`)."""
        return [self._info(key) for key in self.keys if key in self._arrays]

    def index(self) -> list[TensorInfo]:
        """Every member's key, shape and dtype, reading only the start of each member
        (its ``.npy`` header; nearby members in one request)."""
        self.reader.prefetch(
            _member_span(e, 0, min(e.compressed_size, NPY_HEADER_READ))
            for key, e in self.entries.items()
            if key not in self._arrays
        )
        return [
            self._info(key) if key in self._arrays else self._header_info(key) for key in self.keys
        ]

    def _info(self, key: str) -> TensorInfo:
        array, byte_range = self._arrays[key]
        return TensorInfo(key, tuple(int(s) for s in array.shape), array.dtype.name, byte_range)

    def _header_info(self, key: str) -> TensorInfo:
        entry = self.entries[key]
        head_len = min(entry.compressed_size, NPY_HEADER_READ)
        data_start, head = _member_bytes(self.reader, entry, 0, head_len)
        if entry.method == DEFLATED:
            try:
                head = zlib.decompressobj(-15).decompress(head, NPY_HEADER_READ)
            except zlib.error as exc:
                raise CheckpointError(f"{self.reader.f.display}: bad npy member {key!r}") from exc
        stream = io.BytesIO(head)
        shape, fortran, dtype = self._npy_header(stream, key, entry.size)
        byte_range = None
        if entry.method == STORED and not fortran and dtype.byteorder in "<|=":
            begin = data_start + stream.tell()
            byte_range = (begin, begin + math.prod(shape) * dtype.itemsize)
        return TensorInfo(key, tuple(int(x) for x in shape), dtype.name, byte_range)

    def _npy_header(self, stream: io.BytesIO, key: str, member_size: int):
        """``(shape, fortran_order, dtype)`` of an ``.npy`` member whose data, after the
        header, must be exactly the bytes the header describes (object arrays aside:
        they are refused when read)."""
        shape, fortran, dtype = checkpoints.read_npy_header(stream, key, self.reader.f.display)
        if not dtype.hasobject:
            data_bytes = member_size - stream.tell()
            checkpoints.check_npy_size(key, shape, dtype, data_bytes, self.reader.f.display)
        return shape, fortran, dtype

    def _check_no_objects(self, key: str, dtype: np.dtype) -> None:
        if dtype.hasobject:
            raise checkpoints.refused_unpickle(
                self.reader.f.display, f"npz member {key!r} holds Python objects (a pickle)"
            )

    def prefetch(self, keys: Sequence[str]) -> None:
        self.reader.prefetch(
            _member_span(self.entries[k], 0, self.entries[k].compressed_size) for k in keys
        )

    def load(self, key: str) -> LoadedTensor:
        array, byte_range = self._array(key)
        return checkpoints.loaded_array(key, array, byte_range)

    def _array(self, key: str) -> tuple[np.ndarray, tuple[int, int] | None]:
        if key not in self._arrays:
            entry = self.entries[key]
            data_start, data = _whole_member(self.reader, entry)
            stream = io.BytesIO(data)
            _, _, dtype = self._npy_header(stream, key, len(data))
            self._check_no_objects(key, dtype)
            stream.seek(0)
            try:
                array = np.lib.format.read_array(stream, allow_pickle=False)
            except ValueError as exc:
                raise CheckpointError(f"{self.reader.f.display}: bad npy member {key!r}") from exc
            byte_range = None
            if (
                entry.method == STORED
                and array.flags.c_contiguous
                and array.dtype.byteorder in "<|="
            ):
                begin = data_start + entry.size - array.nbytes
                byte_range = (begin, begin + array.nbytes)
            self._arrays[key] = (array, byte_range)
        return self._arrays[key]


# -------------------------------------------------------------------------- whole file


class _WholeFileIndex(_Index):
    """Download the file and read it with :mod:`zooscan.checkpoints` (legacy torch)."""

    def __init__(self, client: HubClient, f: RemoteFile) -> None:
        super().__init__()
        self.display = f.display
        self._dir = tempfile.TemporaryDirectory(prefix="zooscan-fetch-")
        self.path = os.path.join(self._dir.name, "checkpoint")
        try:
            with open(self.path, "wb") as fh:
                fh.write(client.read_all(f))
            with self._named():
                self.format = checkpoints.checkpoint_format(self.path)
                self._infos = checkpoints.list_tensors(self.path)
        except BaseException:
            self._dir.cleanup()
            raise
        self.keys = [info.key for info in self._infos]

    @contextlib.contextmanager
    def _named(self) -> Iterator[None]:
        """Errors name the remote file, not the temporary copy."""
        try:
            yield
        except CheckpointError as exc:
            raise CheckpointError(str(exc).replace(self.path, self.display)) from exc

    def infos(self) -> list[TensorInfo]:
        return list(self._infos)

    def load(self, key: str) -> LoadedTensor:
        with self._named():
            return checkpoints.read_tensors(self.path, [key])[key]

    def close(self) -> None:
        self._dir.cleanup()


# ----------------------------------------------------------------------------- helpers


def _choose_keys(keys: KeyChoice, available: Sequence[str]) -> dict[str, str]:
    """``{requested name: key in the file}``."""
    if callable(keys):
        chosen = list(keys(list(available)))
        missing = [k for k in chosen if k not in set(available)]
        if missing:
            raise CheckpointError(f"keys not in the checkpoint: {', '.join(missing)}")
        return {k: k for k in chosen}
    return {w: resolve_key(available, w) for w in keys}


def _fetch_local(f: RemoteFile, keys: KeyChoice) -> FetchResult:
    infos = checkpoints.list_tensors(f.local_path)
    if callable(keys):
        keys = list(_choose_keys(keys, [info.key for info in infos]))
    return FetchResult(
        tensors=checkpoints.read_tensors(f.local_path, keys),
        keys=[info.key for info in infos],
        bytes_fetched=0,
        requests=0,
        file=f,
        format=checkpoints.checkpoint_format(f.local_path),
        infos=infos,
    )


def _tensor_from_bytes(raw: bytes, dtype: str, shape: tuple[int, ...], key: str) -> torch.Tensor:
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise CheckpointError(f"tensor {key!r} has unsupported dtype {dtype}")
    numel = math.prod(shape)
    if numel == 0:
        return torch.empty(shape, dtype=torch_dtype)
    return torch.frombuffer(bytearray(raw), dtype=torch_dtype).reshape(shape)
