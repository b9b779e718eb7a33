"""Read a zip archive's structure from byte ranges: end-of-central-directory record
(zip64 included), central directory entries and local file headers.

Torch checkpoints (``torch.save`` since 1.6) and ``.npz`` files are zip archives whose
members are stored uncompressed, so one member's bytes are one byte range. This module
parses only what locating those bytes needs; it trusts nothing it reads (every offset
and length is checked against the file size) and raises
:class:`zooscan.errors.CheckpointError` for anything malformed.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from zooscan.errors import CheckpointError

__all__ = ["ZipEntry", "find_central_directory", "local_data_offset", "parse_central_directory"]

_EOCD = struct.Struct("<4s4H2LH")
_EOCD64_LOCATOR = struct.Struct("<4sLQL")
_EOCD64 = struct.Struct("<4sQ2H2L4Q")
_CENTRAL = struct.Struct("<4s4B4H3L5H2L")
LOCAL_HEADER = struct.Struct("<4s5H3L2H")
"""The fixed 30-byte part of a local file header."""
MAX_EOCD_SEARCH = 22 + 0xFFFF
"""The end record (22 bytes) plus the longest possible archive comment."""
MAX_CENTRAL_DIRECTORY = 32 * 1024 * 1024
"""Largest central directory read (about 250 000 torch members): a checkpoint claiming
more is refused before the directory is fetched or parsed."""

STORED = 0
DEFLATED = 8


@dataclass(frozen=True)
class ZipEntry:
    """One member as the central directory describes it."""

    name: str
    method: int
    """0 stored, 8 deflated."""
    crc32: int
    compressed_size: int
    size: int
    header_offset: int
    """Offset of the member's local file header."""


def find_central_directory(tail: bytes, tail_start: int, file_size: int) -> tuple[int, int, int]:
    """``(offset, size, entries)`` of the central directory, from the last bytes of
    the file (``tail`` starts at byte ``tail_start``). Needs the zip64 records to be
    inside ``tail`` when the archive uses them."""
    pos = _find_eocd(tail)
    _, disk, cd_disk, _, entries, cd_size, cd_offset, _ = _EOCD.unpack_from(tail, pos)
    if disk != 0 or cd_disk != 0:
        raise CheckpointError("multi-volume zip archives are not supported")
    if 0xFFFF in (entries,) or 0xFFFFFFFF in (cd_size, cd_offset):
        cd_offset, cd_size, entries = _zip64_directory(tail, tail_start, pos)
    if cd_offset + cd_size > file_size:
        raise CheckpointError(
            f"corrupt zip: central directory [{cd_offset}, {cd_offset + cd_size}) is outside "
            f"the file ({file_size} bytes)"
        )
    if cd_size > MAX_CENTRAL_DIRECTORY:
        raise CheckpointError(
            f"zip central directory of {cd_size} bytes is larger than any checkpoint's "
            f"({MAX_CENTRAL_DIRECTORY}): refused"
        )
    if entries * _CENTRAL.size > cd_size:
        raise CheckpointError(
            f"corrupt zip: {entries} members claimed in a central directory of {cd_size} bytes"
        )
    return cd_offset, cd_size, entries


def parse_central_directory(data: bytes, entries: int, file_size: int) -> dict[str, ZipEntry]:
    """Every member of a central directory (``data``) by name."""
    out: dict[str, ZipEntry] = {}
    pos = 0
    for _ in range(entries):
        if pos + _CENTRAL.size > len(data):
            raise CheckpointError("corrupt zip: central directory ends early")
        fields = _CENTRAL.unpack_from(data, pos)
        if fields[0] != b"PK\x01\x02":
            raise CheckpointError(f"corrupt zip: bad central directory entry at {pos}")
        method, crc, csize, usize = fields[6], fields[9], fields[10], fields[11]
        name_len, extra_len, comment_len, offset = fields[12], fields[13], fields[14], fields[18]
        start = pos + _CENTRAL.size
        raw_name = data[start : start + name_len]
        extra = data[start + name_len : start + name_len + extra_len]
        usize, csize, offset = _apply_zip64_extra(extra, usize, csize, offset)
        try:
            name = raw_name.decode("utf-8" if fields[5] & 0x800 else "cp437")
        except UnicodeDecodeError:
            raise CheckpointError(f"corrupt zip: member name {raw_name!r} is not UTF-8") from None
        if offset + LOCAL_HEADER.size + csize > file_size:
            raise CheckpointError(f"corrupt zip: member {name!r} lies outside the file")
        if name in out:
            raise CheckpointError(f"corrupt zip: two members named {name!r}")
        if method == STORED and csize != usize:
            raise CheckpointError(
                f"corrupt zip: stored member {name!r} claims {usize} bytes but holds {csize}"
            )
        out[name] = ZipEntry(name, method, crc, csize, usize, offset)
        pos = start + name_len + extra_len + comment_len
    return out


def local_data_offset(header: bytes, entry: ZipEntry) -> int:
    """Offset of ``entry``'s data, from its local header (at least the 30 fixed bytes;
    the name and extra field lengths come from it, not from the central directory)."""
    if len(header) < LOCAL_HEADER.size:
        raise CheckpointError(f"corrupt zip: short local header for {entry.name!r}")
    fields = LOCAL_HEADER.unpack_from(header, 0)
    if fields[0] != b"PK\x03\x04":
        raise CheckpointError(f"corrupt zip: bad local header for {entry.name!r}")
    name_len, extra_len = fields[-2], fields[-1]
    return entry.header_offset + LOCAL_HEADER.size + name_len + extra_len


def read_member(
    read: Callable[[int, int], bytes], entry: ZipEntry, file_size: int, slack: int = 256
) -> tuple[int, bytes]:
    """``(data offset, compressed bytes)`` of a whole member, through ``read(start, end)``:
    one read covering the local header (``slack`` bytes allowed for its name and extra
    field) and the data, a second only if the header was longer."""
    guess = entry.header_offset + LOCAL_HEADER.size + slack + entry.compressed_size
    block = read(entry.header_offset, min(file_size, guess))
    start = local_data_offset(block, entry)
    end = start + entry.compressed_size
    if end > file_size:
        raise CheckpointError(f"corrupt zip: member {entry.name!r} lies outside the file")
    if end <= entry.header_offset + len(block):
        return start, block[start - entry.header_offset : end - entry.header_offset]
    return start, read(start, end)


# ----------------------------------------------------------------------------- helpers


def _find_eocd(tail: bytes) -> int:
    pos = tail.rfind(b"PK\x05\x06")
    while pos >= 0:
        if pos + _EOCD.size <= len(tail):
            comment_len = struct.unpack_from("<H", tail, pos + 20)[0]
            if pos + _EOCD.size + comment_len == len(tail):
                return pos
        pos = tail.rfind(b"PK\x05\x06", 0, pos)
    raise CheckpointError("corrupt or truncated zip: no end-of-central-directory record")


def _zip64_directory(tail: bytes, tail_start: int, eocd_pos: int) -> tuple[int, int, int]:
    loc = eocd_pos - _EOCD64_LOCATOR.size
    if loc < 0:
        raise CheckpointError("corrupt zip64: locator outside the bytes read")
    sig, _, eocd64_offset, _ = _EOCD64_LOCATOR.unpack_from(tail, loc)
    if sig != b"PK\x06\x07":
        raise CheckpointError("corrupt zip: 0xFFFF counts without a zip64 locator")
    rel = eocd64_offset - tail_start
    if rel < 0 or rel + _EOCD64.size > len(tail):
        raise CheckpointError("corrupt zip64: end record outside the bytes read")
    fields = _EOCD64.unpack_from(tail, rel)
    if fields[0] != b"PK\x06\x06":
        raise CheckpointError("corrupt zip64 end-of-central-directory record")
    entries, cd_size, cd_offset = fields[7], fields[8], fields[9]
    return cd_offset, cd_size, entries


def _apply_zip64_extra(extra: bytes, usize: int, csize: int, offset: int) -> tuple[int, int, int]:
    pos = 0
    while pos + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, pos)
        body = extra[pos + 4 : pos + 4 + length]
        if tag == 0x0001:
            values = list(struct.unpack_from(f"<{len(body) // 8}Q", body))
            if usize == 0xFFFFFFFF and values:
                usize = values.pop(0)
            if csize == 0xFFFFFFFF and values:
                csize = values.pop(0)
            if offset == 0xFFFFFFFF and values:
                offset = values.pop(0)
        pos += 4 + length
    return usize, csize, offset
