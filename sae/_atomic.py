"""The one atomic file writer of ``sae`` and ``experiments``.

Every file is written to a unique temporary name in the target's own folder
(``tempfile.mkstemp``, so the final rename never crosses a filesystem), flushed and
fsync'ed, renamed over the target with ``os.replace`` (atomic on POSIX), and the folder is
fsync'ed so that the rename itself is durable. On any failure — an exception raised while
serialising, a full disk, ``KeyboardInterrupt`` — the temporary file is removed and an
existing target is left untouched: a reader sees the old file or the new one, never a
half-written one.

Temporary names are ``.<target name>.tmp-<random>``; :func:`is_temp_name` recognises them
(the activation cache deletes leftovers of a killed run on resume).

This module needs only the standard library and numpy.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

__all__ = [
    "HashingWriter",
    "atomic_save_npy",
    "atomic_savez",
    "atomic_write_bytes",
    "atomic_writer",
    "fsync_dir",
    "is_temp_name",
    "temp_target",
]

_TEMP_NAME = re.compile(r"^\..+\.tmp-[A-Za-z0-9_]+$")
#: exactly what ``tempfile.mkstemp(prefix=".<target>.tmp-")`` creates: 8 characters of
#: ``tempfile._RandomNameSequence.characters`` (``[a-z0-9_]``) after the prefix
_OWN_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.tmp-[a-z0-9_]{8}$")
#: the names earlier releases' writers gave their temporaries, still recognised so that a
#: folder left by an older version resumes: ``sae.io`` used ``mkstemp(prefix=".tmp-",
#: suffix=<target>)`` and ``sae.store`` used ``.<target>.tmp-<pid>``
_LEGACY_TEMP_NAMES = (re.compile(r"^\.tmp-[a-z0-9_]{8}(?P<target>[^.].*)$"),
                      re.compile(r"^\.(?P<target>.+)\.tmp-\d+$"))


def is_temp_name(name: str) -> bool:
    """True for the name of a temporary file of :func:`atomic_writer` (``.<name>.tmp-<x>``)."""
    return bool(_TEMP_NAME.match(name))


def temp_target(name: str) -> str | None:
    """The target file name whose temporary file :func:`atomic_writer` would name ``name``
    (``".manifest.json.tmp-ab12cd_9"`` -> ``"manifest.json"``), or None when ``name`` is not
    exactly such a temporary name. The temporary names of earlier releases
    (``".tmp-ab12cd_9manifest.json"``, ``".manifest.json.tmp-<pid>"``) are recognised too.
    Stricter than :func:`is_temp_name`: a caller that deletes leftovers can also check the
    target, so it deletes only its own files' temporaries."""
    for pattern in (_OWN_TEMP_NAME, *_LEGACY_TEMP_NAMES):
        m = pattern.match(name)
        if m:
            return m.group("target")
    return None


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync the folder ``path`` so that renames inside it are durable (no-op where the
    platform or filesystem refuses to open or fsync a folder)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on a folder
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, *, sync_dir: bool = True) -> Iterator[BinaryIO]:
    """Context manager yielding a binary file whose content replaces ``path`` atomically on
    a clean exit of the ``with`` block.

    The parent folder is created if missing. On any exception in the block (including
    ``KeyboardInterrupt``) or in the flush/fsync/rename, the temporary file is removed, the
    exception propagates and ``path`` is untouched. ``sync_dir=False`` skips the fsync of
    the folder (for a caller that writes several files and then calls :func:`fsync_dir`
    once)."""
    target = Path(os.fspath(path))
    if target.name in ("", ".", ".."):
        raise ValueError(f"path={str(path)!r}: expected a file path")
    folder = target.absolute().parent
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{target.name}.tmp-")
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if sync_dir:
        fsync_dir(folder)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, sync_dir: bool = True) -> str:
    """Write the bytes ``data`` to ``path`` atomically (see :func:`atomic_writer`); returns
    ``os.fspath(path)``."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data={type(data).__name__}: expected bytes")
    with atomic_writer(path, sync_dir=sync_dir) as fh:
        fh.write(data)
    return os.fspath(path)


class HashingWriter:
    """Write-only file-like object: passes every write through to ``f`` and keeps the
    sha256 (``sha256``) and byte count (``n_bytes``) of what went through."""

    def __init__(self, f: BinaryIO):
        self.f, self._h, self.n_bytes = f, hashlib.sha256(), 0

    def write(self, b) -> int:
        mv = memoryview(b).cast("B")
        self._h.update(mv)
        self.n_bytes += mv.nbytes
        return self.f.write(mv)

    @property
    def sha256(self) -> str:
        return self._h.hexdigest()


def atomic_save_npy(path: str | os.PathLike, arr: np.ndarray, *, sync_dir: bool = True) -> dict:
    """Save ``arr`` (any shape; no object dtype) as ``.npy`` atomically, hashing it while it
    streams to disk. Returns ``{"file": name, "sha256": hex digest, "bytes": size}``."""
    arr = np.ascontiguousarray(arr)
    with atomic_writer(path, sync_dir=sync_dir) as fh:
        w = HashingWriter(fh)
        np.lib.format.write_array(w, arr, allow_pickle=False)
    return {"file": Path(path).name, "sha256": w.sha256, "bytes": w.n_bytes}


def atomic_savez(path: str | os.PathLike, **arrays) -> str:
    """``np.savez(path, **arrays)``, atomically: the archive is built in memory, then
    written with :func:`atomic_write_bytes`. Unlike ``np.savez`` no ``.npz`` suffix is
    added to ``path``. Returns ``os.fspath(path)``."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return atomic_write_bytes(path, buf.getbuffer())
