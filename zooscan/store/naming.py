"""Reversible escaping of any string into one HDF5 link name (``docs/store.md``)."""

from __future__ import annotations

from zooscan.errors import StoreError

__all__ = ["escape_name", "unescape_link", "unescape_name"]

_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.~")
_HEX = frozenset("0123456789abcdefABCDEF")


def escape_name(name: str) -> str:
    """Escape any string into one valid, non-empty HDF5 link name, reversibly.

    The RFC 3986 unreserved characters ``A-Z a-z 0-9 - _ . ~`` are kept, except a
    leading ``.`` (so ``.`` and ``..`` never occur); every other character is
    percent-encoded as its UTF-8 bytes (``/`` -> ``%2F``). The empty string is ``%``.
    """
    if name == "":
        return "%"
    out: list[str] = []
    for i, ch in enumerate(name):
        if ch in _SAFE and not (i == 0 and ch == "."):
            out.append(ch)
        else:
            out.extend(f"%{b:02X}" for b in ch.encode("utf-8", "surrogatepass"))
    return "".join(out)


def unescape_name(escaped: str) -> str:
    """Invert :func:`escape_name`. Raise :class:`ValueError` on a malformed name."""
    if escaped == "%":
        return ""
    if not escaped:
        raise ValueError("an escaped name is never empty")
    buf = bytearray()
    i = 0
    while i < len(escaped):
        ch = escaped[i]
        if ch == "%":
            digits = escaped[i + 1 : i + 3]
            if len(digits) != 2 or not set(digits) <= _HEX:
                raise ValueError(f"bad percent escape in {escaped!r}")
            buf.append(int(digits, 16))
            i += 3
        elif ch in _SAFE:
            buf.append(ord(ch))
            i += 1
        else:
            raise ValueError(f"{escaped!r} is not an escaped name (character {ch!r})")
    return buf.decode("utf-8", "surrogatepass")


def unescape_link(escaped: str) -> str:
    """:func:`unescape_name` of a link read from a store: :class:`StoreError` when malformed."""
    try:
        return unescape_name(escaped)
    except ValueError as exc:
        raise StoreError(f"the store holds a malformed name: {exc}") from None
