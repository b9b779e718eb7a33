"""Durable file operations: fsync, write-then-rename, atomic replace, space reservation,
the writer lock."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path

from zooscan.errors import StoreError

__all__ = [
    "TMP_INFIX",
    "acquire_lock",
    "fsync_path",
    "install",
    "lock_holder",
    "release_lock",
    "replace_durably",
    "reserve",
    "write_durably",
]

_NO_FALLOCATE = frozenset({errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS})
"""``posix_fallocate`` errors that mean "not supported here", not "no space"."""
TMP_INFIX = ".tmp-"
"""Marks the temporary files that are renamed into place (``<name>.tmp-<pid>``)."""


def fsync_path(path: Path) -> None:
    """fsync a file or a directory by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes, tmp: Path) -> None:
    """Write ``data`` to ``tmp``, fsync it, rename it to ``path``, fsync the directory."""
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_path(path.parent)


def reserve(path: Path, size: int) -> None:
    """Allocate the file ``path`` up to ``size`` bytes, so that writes into it cannot
    fail for want of space: a full disk (ENOSPC) or a file size limit (EFBIG) raises
    :class:`OSError` here, before HDF5 writes anything (an HDF5 file whose writes failed
    cannot even be closed). HDF5 truncates the file to what it used when it closes it."""
    fd = os.open(path, os.O_RDWR)
    try:
        try:
            os.posix_fallocate(fd, 0, size)
            return
        except AttributeError:  # no posix_fallocate (macOS)
            pass
        except OSError as exc:
            if exc.errno not in _NO_FALLOCATE:
                raise
        end = os.fstat(fd).st_size  # the file system cannot allocate: write the zeros
        chunk = b"\0" * (1 << 20)
        while end < size:
            end += os.pwrite(fd, chunk[: min(len(chunk), size - end)], end)
    finally:
        os.close(fd)


def replace_durably(tmp: Path, target: Path) -> None:
    """fsync the complete file ``tmp``, rename it over ``target``, fsync the directory."""
    fsync_path(tmp)
    os.replace(tmp, target)
    fsync_path(target.parent)


def install(tmp: Path, target: Path, backup: Path | None = None) -> None:
    """:func:`replace_durably` ``tmp`` over ``target``, first keeping the file ``target``
    names as ``backup`` when given (a hard link: no copy, and ``target`` is never
    missing)."""
    if backup is not None and target.exists():
        os.link(target, backup)
    replace_durably(tmp, target)


def acquire_lock(lock_path: Path, store: Path) -> int:
    """Take the exclusive writer lock on ``lock_path`` (without waiting); return its fd.

    The lock file holds the holder's pid. A held lock raises :class:`StoreError` naming
    ``store`` and that pid.
    """
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise StoreError(f"cannot create the lock file {lock_path}: {exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise StoreError(
                f"store {store} is being written by another zooscan process (pid {holder})"
            ) from None
        raise StoreError(f"cannot lock {lock_path}: {exc}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    return fd


def lock_holder(lock_path: Path) -> str | None:
    """The pid (as text, ``"unknown"`` when the lock file holds none) of the writer
    holding the lock on ``lock_path``, or ``None`` when no writer holds it. Probes with
    a shared lock, so it writes nothing."""
    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def release_lock(fd: int) -> None:
    """Clear the pid from the lock file and release the lock (closing ``fd``)."""
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
    os.close(fd)
