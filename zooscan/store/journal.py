"""The journal: ``<store>.journal/``, one checksummed file per committed operation.

An entry is ``MAGIC | u64 header length | JSON header | raw arrays | sha256 of all
before``, written to a temporary name, fsynced and renamed (so it is either whole or
absent); a damaged one is detected on reading and can be quarantined.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from zooscan.store.files import TMP_INFIX, fsync_path, write_durably

__all__ = ["CorruptEntry", "Entry", "Journal"]

_ENTRY_SUFFIX = ".rec"
_CORRUPT_SUFFIX = ".corrupt"
_MAGIC = b"ZSJRNL01"
_DIGEST = 32


@dataclass
class Entry:
    """One journaled operation: ``op``, JSON-able ``fields`` and named arrays."""

    op: str
    fields: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


class CorruptEntry(Exception):
    """A journal entry that is not whole or not well formed."""


def _encode_entry(seq: int, entry: Entry) -> bytes:
    """``MAGIC | u64 header length | JSON header | raw arrays | sha256 of all before``."""
    arrays = {
        key: np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
        for key, arr in entry.arrays.items()
    }
    header = {
        "seq": seq,
        "op": entry.op,
        "fields": entry.fields,
        "arrays": [[key, arr.dtype.str, list(arr.shape)] for key, arr in arrays.items()],
    }
    head = json.dumps(header, ensure_ascii=True).encode("ascii")
    parts = [
        _MAGIC,
        struct.pack("<Q", len(head)),
        head,
        *(arr.tobytes() for arr in arrays.values()),
    ]
    body = b"".join(parts)
    return body + hashlib.sha256(body).digest()


def _decode_entry(data: bytes, seq: int) -> Entry:
    """Parse and verify one journal entry; raise :class:`CorruptEntry` when it is not whole."""
    if len(data) < len(_MAGIC) + 8 + _DIGEST or not data.startswith(_MAGIC):
        raise CorruptEntry("bad magic or truncated")
    body, digest = data[:-_DIGEST], data[-_DIGEST:]
    if hashlib.sha256(body).digest() != digest:
        raise CorruptEntry("checksum mismatch")
    (head_len,) = struct.unpack_from("<Q", body, len(_MAGIC))
    pos = len(_MAGIC) + 8
    try:
        header = json.loads(body[pos : pos + head_len].decode("ascii"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CorruptEntry(f"bad header: {exc}") from None
    if header.get("seq") != seq:
        raise CorruptEntry(f"sequence number {header.get('seq')} in entry {seq}")
    pos += head_len
    arrays: dict[str, np.ndarray] = {}
    for key, dtype, shape in header["arrays"]:
        dt = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        nbytes = count * dt.itemsize
        if pos + nbytes > len(body):
            raise CorruptEntry("array data truncated")
        arr = np.frombuffer(body, dtype=dt, count=count, offset=pos).reshape(shape)
        arrays[key] = arr.astype(dt.newbyteorder("="), copy=True)
        pos += nbytes
    if pos != len(body):
        raise CorruptEntry("trailing bytes")
    return Entry(op=header["op"], fields=header["fields"], arrays=arrays)


class Journal:
    """The ``<store>.journal/`` directory: entries ``<seq:016d>.rec``."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def _path(self, seq: int) -> Path:
        return self.dir / f"{seq:016d}{_ENTRY_SUFFIX}"

    def seqs(self, *, include_corrupt: bool = False) -> list[int]:
        """Sequence numbers of the complete entries (and quarantined ones when asked)."""
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return []
        suffixes = (
            (_ENTRY_SUFFIX, _ENTRY_SUFFIX + _CORRUPT_SUFFIX)
            if include_corrupt
            else (_ENTRY_SUFFIX,)
        )
        found = []
        for name in names:
            for suffix in suffixes:
                stem = name[: -len(suffix)]
                if name.endswith(suffix) and stem.isdigit():
                    found.append(int(stem))
        return sorted(found)

    def read(self, seq: int) -> Entry:
        """Read one entry (FileNotFoundError when compacted away; CorruptEntry)."""
        return _decode_entry(self._path(seq).read_bytes(), seq)

    def write(self, seq: int, entry: Entry) -> int:
        """Write one entry durably; return its size in bytes."""
        data = _encode_entry(seq, entry)
        write_durably(self._path(seq), data, self.dir / f"{TMP_INFIX}{seq:016d}-{os.getpid()}")
        return len(data)

    def remove(self, seqs: list[int]) -> None:
        """Delete these entries (those already gone are skipped)."""
        for seq in seqs:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(seq))

    def ensure(self) -> None:
        """Create the directory (durably) when missing."""
        if not self.dir.is_dir():
            self.dir.mkdir()
            fsync_path(self.dir.parent)

    def quarantine(self, seq: int) -> None:
        """Set a damaged entry aside as ``<seq>.rec.corrupt``."""
        path = self._path(seq)
        with contextlib.suppress(FileNotFoundError):
            os.rename(path, path.with_name(path.name + _CORRUPT_SUFFIX))

    def remove_temporaries(self) -> None:
        """Delete the half-written entries a killed writer left."""
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(self.dir):
                if name.startswith(TMP_INFIX):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.dir / name)
