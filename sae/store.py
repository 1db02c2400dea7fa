"""On-disk format of the activation cache and its reader, :class:`ActivationStore`.

This module needs only numpy (and jax for device batches); it never imports torch.

Layout of a cache folder ``out_dir``::

    manifest.json                      # the commit point (written last, atomically)
    shard_000000.layer_003.npy         # (n_tokens_0, d_model) activations after block 3
    shard_000000.token_ids.npy         # (n_tokens_0,) int32 token id of each row
    shard_000000.positions.npy         # (n_tokens_0,) int32 position in its sequence
    shard_000000.text_index.npy        # (n_tokens_0,) int64 index of its text in the source
    shard_000001....

Every file is plain ``.npy`` (memory-mappable with ``np.load(mmap_mode="r")``), written to a
temporary name, fsync'ed, then renamed; the folder is fsync'ed after the rename. A shard
exists only once ``manifest.json`` lists it with the sha256 and size of each of its files.
``bfloat16`` activations are stored as their raw 16-bit patterns (``uint16`` on disk, dtype
``"bfloat16"`` in the manifest) and viewed as ``ml_dtypes.bfloat16`` on read.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import queue
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "FORMAT",
    "MANIFEST_NAME",
    "ActivationStore",
    "Moments",
    "read_manifest",
    "verify_cache",
]

MANIFEST_NAME = "manifest.json"
FORMAT = "sae.activations/1"
_STORAGE_DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"),
                   "bfloat16": np.dtype("<u2")}
_VERIFY_LEVELS = ("full", "size", "none")
_CHUNK_BYTES = 384 << 10  # default chunk of the block shuffle: one memmove of about this size


# ---------------------------------------------------------------------------- atomic writes
def fsync_dir(path: Path) -> None:
    """fsync a folder so that renames inside it are durable (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (tmp file, fsync, ``os.replace``, fsync folder):
    the repo's one atomic writer, :func:`sae.io.atomic_write_bytes`."""
    from .io import atomic_write_bytes as _write

    _write(path, data)


class _HashingWriter:
    """File-like object that writes through to ``f`` while hashing what was written."""

    def __init__(self, f):
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def write(self, b) -> int:
        mv = memoryview(b).cast("B")
        self.h.update(mv)
        self.n += mv.nbytes
        return self.f.write(mv)


def atomic_save_npy(path: Path, arr: np.ndarray, *, sync_dir: bool = True) -> dict:
    """Save ``arr`` as ``.npy`` atomically; return ``{"file", "sha256", "bytes"}``."""
    arr = np.ascontiguousarray(arr)
    tmp = _tmp_name(path)
    with open(tmp, "wb") as f:
        w = _HashingWriter(f)
        np.lib.format.write_array(w, arr, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    if sync_dir:
        fsync_dir(path.parent)
    return {"file": path.name, "sha256": w.h.hexdigest(), "bytes": w.n}


def write_manifest(out_dir: Path, manifest: dict) -> None:
    """Atomically (re)write ``manifest.json`` — the commit point of the cache."""
    data = json.dumps(manifest, indent=1, sort_keys=True).encode()
    atomic_write_bytes(Path(out_dir) / MANIFEST_NAME, data)


def shard_file_name(index: int, key: str) -> str:
    """File name of one array of shard ``index``; ``key`` is ``layer_###`` or a token field."""
    return f"shard_{index:06d}.{key}.npy"


def layer_key(layer: int) -> str:
    return f"layer_{layer:03d}"


# ---------------------------------------------------------------------------- reading
def read_manifest(path: str | os.PathLike) -> dict:
    """Load and sanity-check ``manifest.json`` of the cache folder ``path``.

    Raises:
      FileNotFoundError: no such folder or no manifest in it.
      ValueError: unreadable manifest or unknown format.
    """
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"path={str(path)!r}: no such cache folder")
    mf = p / MANIFEST_NAME
    if not mf.is_file():
        raise FileNotFoundError(
            f"path={str(path)!r}: no {MANIFEST_NAME} (not an activation cache, or no shard "
            f"committed yet)"
        )
    try:
        manifest = json.loads(mf.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"path={str(path)!r}: unreadable {MANIFEST_NAME}: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(
            f"path={str(path)!r}: manifest format {manifest.get('format')!r}, expected {FORMAT!r}"
        )
    for key in ("layers", "d_model", "dtype", "shards"):
        if key not in manifest:
            raise ValueError(f"path={str(path)!r}: manifest lacks the field {key!r}")
    return manifest


def _sha256_file(path: Path, chunk: int = 1 << 23) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(chunk)
        mv = memoryview(buf)
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(mv[:n])
    return h.hexdigest()


def _expected_arrays(manifest: dict, shard: dict) -> dict[str, tuple[tuple, np.dtype]]:
    n, d = int(shard["n_tokens"]), int(manifest["d_model"])
    act = _STORAGE_DTYPES[manifest["dtype"]]
    out = {layer_key(l): ((n, d), act) for l in manifest["layers"]}
    out.update(token_ids=((n,), np.dtype("<i4")), positions=((n,), np.dtype("<i4")),
               text_index=((n,), np.dtype("<i8")))
    return out


def verify_cache(path: str | os.PathLike, verify: str = "full") -> dict:
    """Check that every shard the manifest lists is present and intact; return the manifest.

    Args:
      verify: ``"full"`` (size, .npy header, sha256 of every file), ``"size"`` (size and
        header only: catches missing and truncated files) or ``"none"``.

    Raises:
      FileNotFoundError: missing manifest or shard file.
      ValueError: truncated file, header (shape/dtype) not matching the manifest, or a
        checksum mismatch (corrupted file).
    """
    if verify not in _VERIFY_LEVELS:
        raise ValueError(f"verify={verify!r}: expected one of {_VERIFY_LEVELS}")
    manifest = read_manifest(path)
    if manifest["dtype"] not in _STORAGE_DTYPES:
        raise ValueError(f"path={str(path)!r}: manifest dtype {manifest['dtype']!r} unknown")
    if verify == "none":
        return manifest
    root = Path(path)
    for shard in manifest["shards"]:
        expected = _expected_arrays(manifest, shard)
        if set(shard["files"]) != set(expected):
            raise ValueError(
                f"shard {shard['index']}: manifest lists files {sorted(shard['files'])}, "
                f"expected {sorted(expected)}"
            )
        for key, (shape, dtype) in expected.items():
            info = shard["files"][key]
            f = root / info["file"]
            if not f.is_file():
                raise FileNotFoundError(f"shard {shard['index']}: missing file {f}")
            size = f.stat().st_size
            if size != info["bytes"]:
                raise ValueError(
                    f"shard {shard['index']}: file {f.name} has {size} bytes, manifest says "
                    f"{info['bytes']} ({'truncated' if size < info['bytes'] else 'too long'})"
                )
            try:
                mm = np.load(f, mmap_mode="r")
            except ValueError as e:
                raise ValueError(f"shard {shard['index']}: unreadable .npy {f.name}: {e}") from e
            if mm.shape != shape or mm.dtype != dtype:
                raise ValueError(
                    f"shard {shard['index']}: file {f.name} holds {mm.shape} {mm.dtype}, "
                    f"manifest expects {shape} {dtype}"
                )
            del mm
            if verify == "full":
                digest = _sha256_file(f)
                if digest != info["sha256"]:
                    raise ValueError(
                        f"shard {shard['index']}: checksum mismatch in {f.name} (sha256 "
                        f"{digest[:16]}…, manifest {info['sha256'][:16]}…): file corrupted"
                    )
    return manifest


class Moments(NamedTuple):
    """Streaming statistics of one layer, float64.

    mean: (d,) E[x]; second_moment: (d, d) uncentred E[x xᵀ]; count: number of rows."""

    mean: np.ndarray
    second_moment: np.ndarray
    count: int


def _aligned_empty(shape: tuple, dtype, align: int = 64) -> np.ndarray:
    """Uninitialised C-contiguous array whose data pointer is a multiple of ``align``."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(nbytes + align, np.uint8)
    off = (-raw.ctypes.data) % align
    return raw[off:off + nbytes].view(dtype).reshape(shape)


class _Chunks(NamedTuple):
    """Plan item of the block shuffle: indices of whole ``chunk_rows``-row chunks."""

    idx: np.ndarray


class _BufferPool:
    """Recycles 64-byte-aligned batch buffers once nothing references them any more.

    A batch handed out (numpy, or a jax array that aliases it on a CPU device) keeps a
    reference to its buffer, so a buffer is reused only when the pool's reference is the last
    one (checked with ``sys.getrefcount``). Fresh memory costs page faults — about as much as
    the gather itself — so recycling keeps a shuffled epoch near the speed of a raw read."""

    def __init__(self, max_free: int = 8):
        self._bufs: list[np.ndarray] = []
        self._lock = threading.Lock()
        self.max_free = max_free
        self.n_allocated = 0

    def get(self, shape: tuple, dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        with self._lock:
            for i in range(len(self._bufs)):
                # references: the list, and getrefcount's argument
                if self._bufs[i].nbytes >= nbytes + 64 and sys.getrefcount(self._bufs[i]) <= 2:
                    raw = self._bufs[i]
                    break
            else:
                raw = np.empty(nbytes + 64, np.uint8)
                self.n_allocated += 1
                if len(self._bufs) >= self.max_free:
                    # every pooled buffer is held (or too small): forget the oldest, the
                    # caller keeps it as its own memory
                    self._bufs.pop(0)
                self._bufs.append(raw)
        off = (-raw.ctypes.data) % 64
        return raw[off:off + nbytes].view(dtype).reshape(shape)


def _view_activations(a: np.ndarray, dtype_name: str) -> np.ndarray:
    if dtype_name == "bfloat16":
        import ml_dtypes

        return a.view(ml_dtypes.bfloat16)
    return a


class ActivationStore:
    """Reader of an activation cache: shuffled ``(B, d)`` batches of one layer.

    Iterating the store yields one epoch of batches ``(batch_size, d_model)`` as jax arrays
    on ``device``/``sharding`` (on an accelerator prefetched by a background thread,
    ``prefetch`` batches ahead — 2 = double buffering; on CPU synchronous and zero-copy, see
    ``prefetch``), or numpy arrays with ``as_numpy=True``. Each new
    ``iter(store)`` is the next epoch, reshuffled from ``(seed, epoch)``. It plugs straight
    into SAE training: ``for x in store: state = step(state, x)``.

    Shuffling (``shuffle=``):

    - ``"blocks"`` (default, also ``True``) — *block shuffle*. Every shard is cut into
      chunks of ``chunk_rows`` consecutive rows and the chunks into blocks of about
      ``block_rows`` rows (block cuts shifted by a random phase per shard and epoch, so
      blocks differ between epochs). All blocks of all shards are put in one seeded random
      order; that stream is cut into shuffle buffers of ``shuffle_buffer`` batches, the
      chunks of each buffer are permuted, and consecutive rows of the permuted stream form
      the batches. A batch thus holds ``batch_size / chunk_rows`` runs of consecutive rows,
      drawn from about ``min(batch_size / chunk_rows, shuffle_buffer * batch_size /
      block_rows)`` different blocks of (in general) different shards. Each chunk is copied
      with one memmove, so a shuffled epoch copies about as fast as an unshuffled one
      (default chunks, jax batches on CPU: ≈ 0.85–0.95 of ``np.fromfile``; ``"rows"``:
      ≈ 0.4; see docs/activations.md).
      *Trade-off*: rows of one chunk or block are consecutive tokens (usually of one text),
      so they are correlated. Larger ``chunk_rows`` = faster reads but fewer, longer runs
      per batch; larger ``block_rows`` / smaller ``shuffle_buffer`` = fewer distinct texts
      per buffer. ``chunk_rows=1`` permutes single rows inside each buffer (best mixing of
      the block shuffle, about as slow as ``"rows"``). ``shuffle_buffer`` costs no memory
      (the buffer is a plan; rows are copied once, straight into the batch).
      The default ``chunk_rows`` is about 384 KiB of rows, and at most ``batch_size // 16``
      (so a batch always holds at least 16 runs): 256 rows at d=384 float32 with batches of
      4096 (16 runs of 256 tokens per batch), 85 rows at d=2304 bfloat16. Shorter chunks mix
      better but copy slower here (d=384 float32, jax batches, fraction of ``np.fromfile``:
      64 rows ≈ 0.70–0.8, 128 ≈ 0.75–0.8, 192 ≈ 0.85, 256 ≈ 0.9); pass ``chunk_rows=64``
      for the finer mixing of earlier versions.
    - ``"rows"`` — exact row-level shuffle: the shard order is permuted, then shards are
      taken ``window_shards`` at a time (default: all shards = an exact global shuffle); the
      rows of a window are permuted together, and rows left over at the end of a window
      carry into the next. Best mixing, but every row is a random single-row read
      (several times slower than ``"blocks"`` on page-cached data).
    - ``False`` / ``"none"`` — cache order (batches may span shards).

    Within one batch, rows are grouped by shard and sorted by row (a batch is a random
    *set*; sorting makes the memory-mapped reads nearly sequential; ``"blocks"`` puts
    chunks split at a batch boundary last). No row is repeated or
    skipped in an epoch; with ``drop_last=True`` the final partial batch is dropped. Every
    mode is deterministic in ``(seed, epoch)``.

    Args:
      path: cache folder (written by :func:`sae.cache.cache_activations`).
      layer: which cached layer to read; may be omitted when a single layer was cached.
      batch_size: rows per batch B.
      seed: shuffle seed.
      shuffle: ``"blocks"``/``True`` (default), ``"rows"`` or ``"none"``/``False``; see
        above.
      block_rows: rows per contiguous block of the block shuffle (default 1024).
      shuffle_buffer: batches per shuffle buffer of the block shuffle (default 16).
      chunk_rows: rows per chunk, the unit that the block shuffle permutes and copies
        (default ``None``: about 384 KiB of rows, at most ``block_rows`` and
        ``batch_size // 16``).
      window_shards: shards mixed together per shuffle window of ``shuffle="rows"``
        (``None`` = all).
      drop_last: drop the last, partial batch of an epoch.
      prefetch: batches prepared ahead by a background thread (0 = synchronous). Default
        ``None``: 2 when the batches go to a non-CPU device (double buffering overlaps the
        gather with the host-to-device transfer and the consumer's steps), 0 for numpy
        batches or a CPU device — there ``device_put`` aliases the batch buffer (no
        transfer to overlap), and on a small CPU the thread costs more than it hides
        (measured here: 0.55–0.63 of ``np.fromfile`` with it, 0.70–0.73 without, at 64-row
        chunks). Results do not depend on it.
      device: a ``jax.Device`` for the batches (default device if ``None``).
      sharding: a ``jax.sharding.Sharding`` or a ``Mesh`` (batch axis split over all mesh
        axes: ``NamedSharding(mesh, P(mesh.axis_names, None))``).
      as_numpy: yield numpy arrays instead of jax arrays (no device transfer).
      dtype: cast batches to this dtype (default: the cached dtype).
      verify: ``"full"`` (sha256 of every file, default), ``"size"`` or ``"none"``;
        see :func:`verify_cache`.

    Raises (on open, before any batch): FileNotFoundError / ValueError from
    :func:`verify_cache`; ValueError for a layer not in the cache or bad arguments.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        layer: int | None = None,
        batch_size: int = 4096,
        *,
        seed: int = 0,
        shuffle: bool | str = True,
        block_rows: int = 1024,
        shuffle_buffer: int = 16,
        chunk_rows: int | None = None,
        window_shards: int | None = None,
        drop_last: bool = True,
        prefetch: int | None = None,
        device: Any = None,
        sharding: Any = None,
        as_numpy: bool = False,
        dtype: Any = None,
        verify: str = "full",
    ):
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}: expected a positive int")
        if prefetch is not None and (not isinstance(prefetch, int) or isinstance(prefetch, bool)
                                     or prefetch < 0):
            raise ValueError(f"prefetch={prefetch!r}: expected None or an int >= 0")
        if window_shards is not None and (not isinstance(window_shards, int) or window_shards < 1):
            raise ValueError(f"window_shards={window_shards!r}: expected None or a positive int")
        modes = {True: "blocks", False: "none", "blocks": "blocks", "rows": "rows",
                 "none": "none"}
        if not isinstance(shuffle, (bool, str)) or shuffle not in modes:
            raise ValueError(
                f"shuffle={shuffle!r}: expected True/'blocks', 'rows' or False/'none'"
            )
        for name, v in (("block_rows", block_rows), ("shuffle_buffer", shuffle_buffer),
                        ("chunk_rows", 1 if chunk_rows is None else chunk_rows)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}={v!r}: expected a positive int")
        self.path = Path(path)
        self.manifest = verify_cache(path, verify)
        self.layers: list[int] = [int(l) for l in self.manifest["layers"]]
        if layer is None:
            if len(self.layers) != 1:
                raise ValueError(
                    f"layer=None: the cache holds layers {self.layers}; pass one of them"
                )
            layer = self.layers[0]
        if layer not in self.layers:
            raise ValueError(f"layer={layer!r}: not in the cache, which holds {self.layers}")
        self.layer = int(layer)
        self.d_model = int(self.manifest["d_model"])
        self.dtype_name = self.manifest["dtype"]
        self.batch_size = batch_size
        self.seed, self.window_shards = int(seed), window_shards
        self.shuffle: str = modes[shuffle]  # "blocks", "rows" or "none"
        self.block_rows, self.shuffle_buffer = block_rows, shuffle_buffer
        if chunk_rows is None:  # about 384 KiB per chunk (256 rows of d=384 float32), at
            # least 16 chunks per batch, at most one block
            row_bytes = self.d_model * _STORAGE_DTYPES[self.dtype_name].itemsize
            chunk_rows = max(1, min(_CHUNK_BYTES // row_bytes, block_rows, batch_size // 16))
        self.chunk_rows = min(chunk_rows, batch_size)  # a chunk spans at most 2 batches
        self.drop_last, self.as_numpy = bool(drop_last), bool(as_numpy)
        self.out_dtype = None if dtype is None else np.dtype(dtype)
        self.device = device
        self.sharding = self._resolve_sharding(sharding)
        self.prefetch: int = self._default_prefetch() if prefetch is None else prefetch
        self.shard_sizes = np.array([s["n_tokens"] for s in self.manifest["shards"]], np.int64)
        self.n_tokens = int(self.shard_sizes.sum())
        self._offsets = np.concatenate([[0], np.cumsum(self.shard_sizes)])
        self._mm: dict[tuple, np.ndarray] = {}  # (shard, key[, "chunks"]) -> memmap view
        self._pool = _BufferPool(max_free=self.prefetch + 6)
        self._put = None  # numpy batch -> jax array (see _make_put)
        self._release = None  # runs jaxlib's deferred releases of dropped batches
        self._epoch = 0

    # ------------------------------------------------------------------ construction helpers
    def _resolve_sharding(self, sharding):
        if sharding is None:
            return None
        import jax
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        if isinstance(sharding, Mesh):
            sharding = NamedSharding(sharding, PartitionSpec(tuple(sharding.axis_names), None))
        if not isinstance(sharding, jax.sharding.Sharding):
            raise TypeError(
                f"sharding={type(sharding).__name__}: expected a jax.sharding.Sharding or Mesh"
            )
        try:
            sharding.shard_shape((self.batch_size, int(self.manifest["d_model"])))
        except ValueError as e:
            raise ValueError(
                f"batch_size={self.batch_size}: not divisible over sharding {sharding}: {e}"
            ) from e
        return sharding

    def _default_prefetch(self) -> int:
        """2 (double buffering in a background thread) when batches go to an accelerator,
        0 (synchronous) for numpy batches or a CPU device: there ``device_put`` aliases the
        64-byte-aligned batch buffer (no transfer to overlap), so the thread would only add a
        hand-off and contend with the consumer for the cores."""
        if self.as_numpy:
            return 0
        import jax

        if self.sharding is not None:
            devices = self.sharding.device_set
        else:
            devices = {self.device if self.device is not None else jax.devices()[0]}
        return 0 if all(d.platform == "cpu" for d in devices) else 2

    # ------------------------------------------------------------------ raw access
    def _memmap(self, shard: int, key: str) -> np.ndarray:
        k = (shard, key)
        if k not in self._mm:
            info = self.manifest["shards"][shard]["files"][key]
            self._mm[k] = np.load(self.path / info["file"], mmap_mode="r")
        return self._mm[k]

    def activations(self, shard: int, layer: int | None = None) -> np.ndarray:
        """Memory-mapped activations of one shard: (n_tokens_shard, d_model), cached dtype."""
        layer = self.layer if layer is None else layer
        if layer not in self.layers:
            raise ValueError(f"layer={layer!r}: not in the cache, which holds {self.layers}")
        return _view_activations(self._memmap(shard, layer_key(layer)), self.dtype_name)

    def tokens(self, shard: int) -> dict[str, np.ndarray]:
        """Token ids, positions and text indices of the rows of one shard (memmaps, (n,))."""
        return {k: self._memmap(shard, k) for k in ("token_ids", "positions", "text_index")}

    @property
    def n_shards(self) -> int:
        return len(self.shard_sizes)

    def __len__(self) -> int:
        """Batches per epoch."""
        full, rem = divmod(self.n_tokens, self.batch_size)
        return full + (0 if self.drop_last or rem == 0 else 1)

    # ------------------------------------------------------------------ batch plan
    def _batch_plans(self, epoch: int) -> Iterator[list[tuple[int, np.ndarray]]]:
        """Yield per batch a list of (shard, sorted row indices) — the rows to gather
        (``"rows"``, ``"none"``), or whole chunks and slices (``"blocks"``: :meth:`_block_plans`)."""
        B = self.batch_size
        if self.shuffle == "blocks":
            yield from self._block_plans(epoch)
            return
        if self.shuffle == "none":
            start = 0
            while start < self.n_tokens:
                stop = min(start + B, self.n_tokens)
                if stop - start < B and self.drop_last:
                    return
                plan = []
                for s in range(self.n_shards):
                    lo, hi = max(start, self._offsets[s]), min(stop, self._offsets[s + 1])
                    if lo < hi:
                        plan.append((s, slice(int(lo - self._offsets[s]), int(hi - self._offsets[s]))))
                yield plan
                start = stop
            return
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.n_shards)
        w = self.window_shards or self.n_shards
        pend_s = np.empty(0, np.int64)
        pend_r = np.empty(0, np.int64)
        for g in range(0, self.n_shards, w):
            group = order[g:g + w]
            sids = np.concatenate([np.full(self.shard_sizes[s], s, np.int64) for s in group])
            rows = np.concatenate([np.arange(self.shard_sizes[s], dtype=np.int64) for s in group])
            perm = rng.permutation(len(sids))
            pend_s = np.concatenate([pend_s, sids[perm]])
            pend_r = np.concatenate([pend_r, rows[perm]])
            n_full = len(pend_s) // B
            for b in range(n_full):
                yield self._group(pend_s[b * B:(b + 1) * B], pend_r[b * B:(b + 1) * B])
            pend_s, pend_r = pend_s[n_full * B:], pend_r[n_full * B:]
        if len(pend_s) and not self.drop_last:
            yield self._group(pend_s, pend_r)

    def _block_plans(self, epoch: int) -> Iterator[list[tuple[int, Any]]]:
        """Block shuffle plan (see the class docstring): per batch a list of
        ``(shard, _Chunks(sorted chunk indices))`` (whole aligned chunks of ``chunk_rows``
        rows, each copied with one memmove) and ``(shard, slice)`` (partial chunks: a
        shard's short last chunk, or a chunk split between two batches)."""
        B, c = self.batch_size, self.chunk_rows
        Lc = -(-self.block_rows // c)  # chunks per block
        # a stream of its own (3 words): "rows" keeps the exact orders of earlier versions
        rng = np.random.default_rng([self.seed, epoch, 1])
        b_shard, b_start, b_n = [], [], []  # blocks, in chunk units
        for s, n in enumerate(self.shard_sizes.tolist()):
            nch = -(-n // c)
            if nch == 0:
                continue
            phase = int(rng.integers(0, min(Lc, nch)))  # shift the cuts per shard and epoch
            cuts = np.arange(phase, nch, Lc, dtype=np.int64)
            if phase:
                cuts = np.concatenate([[0], cuts])
            b_start.append(cuts)
            b_n.append(np.diff(np.append(cuts, nch)))
            b_shard.append(np.full(len(cuts), s, np.int64))
        perm = rng.permutation(sum(len(x) for x in b_start))
        b_shard = np.concatenate(b_shard)[perm]
        b_start = np.concatenate(b_start)[perm]
        b_n = np.concatenate(b_n)[perm]
        # the epoch's chunk stream, blocks in random order (concatenated aranges)
        total = int(b_n.sum())
        ch_shard = np.repeat(b_shard, b_n)
        ch_idx = np.repeat(b_start - (np.cumsum(b_n) - b_n), b_n) + np.arange(total)
        ch_len = np.minimum(c, self.shard_sizes[ch_shard] - ch_idx * c)
        # shuffle buffers: chunks starting in rows [k R, (k+1) R) of the stream are
        # permuted together
        R = B * self.shuffle_buffer
        start = np.cumsum(ch_len) - ch_len
        bounds = np.searchsorted(start, np.arange(0, self.n_tokens, R)).tolist() + [total]
        order = np.concatenate([lo + rng.permutation(hi - lo)
                                for lo, hi in itertools.pairwise(bounds)])
        ch_shard, ch_idx, ch_len = ch_shard[order], ch_idx[order], ch_len[order]
        # batch j = stream rows [j B, (j+1) B): whole chunks inside one batch are copied
        # as items, grouped by shard (sorted); chunks cut by a batch boundary or short
        # (a shard's last chunk) are copied as slices
        ch_end = np.cumsum(ch_len)
        st = ch_end - ch_len
        b0, b1 = st // B, (ch_end - 1) // B
        n_batches = self.n_tokens // B if self.drop_last else -(-self.n_tokens // B)
        plans: list[list[tuple[int, Any]]] = [[] for _ in range(n_batches)]
        full = (ch_len == c) & (b0 == b1)
        fi = np.flatnonzero(full)
        fb, fs, fx = b0[fi], ch_shard[fi], ch_idx[fi]
        o = np.lexsort((fx, fs, fb))
        fb, fs, fx = fb[o], fs[o], fx[o]
        cut = (np.flatnonzero((np.diff(fb) != 0) | (np.diff(fs) != 0)) + 1).tolist()
        lo_ = [0, *cut]
        for p, q, bj, sj in zip(lo_, [*cut, len(fx)], fb[lo_].tolist() if len(fx) else [],
                                fs[lo_].tolist() if len(fx) else []):
            if bj < n_batches:
                plans[bj].append((sj, _Chunks(fx[p:q])))
        pi = np.flatnonzero(~full)
        r0 = ch_idx[pi] * c
        split = np.minimum(ch_len[pi], (b0[pi] + 1) * B - st[pi])  # rows in the first batch
        for sj, bj, bk, r, k, n in zip(ch_shard[pi].tolist(), b0[pi].tolist(),
                                       b1[pi].tolist(), r0.tolist(), split.tolist(),
                                       ch_len[pi].tolist()):
            if bj < n_batches:
                plans[bj].append((sj, slice(r, r + k)))
            if bk != bj and bk < n_batches:
                plans[bk].append((sj, slice(r + k, r + n)))
        yield from plans

    @staticmethod
    def _group(sids: np.ndarray, rows: np.ndarray) -> list[tuple[int, np.ndarray]]:
        key = np.sort((sids << 32) | rows)
        s_sorted = key >> 32
        bounds = np.flatnonzero(np.diff(s_sorted)) + 1
        starts = np.concatenate([[0], bounds])
        ends = np.concatenate([bounds, [len(key)]])
        mask = np.int64((1 << 32) - 1)
        return [(int(s_sorted[a]), key[a:b] & mask) for a, b in zip(starts, ends)]

    def _gather(self, plan) -> np.ndarray:
        """Copy the planned rows out of the memmaps into one fresh (n, d) array (one copy)."""
        key = layer_key(self.layer)
        c = self.chunk_rows
        n = sum((p.stop - p.start) if isinstance(p, slice)
                else len(p.idx) * c if isinstance(p, _Chunks) else len(p) for _, p in plan)
        # 64-byte aligned: jax.device_put onto a CPU device then aliases it (no second copy);
        # the pool reuses a buffer only once no batch refers to it, so aliasing is safe.
        if self._release is not None:
            self._release()
        out = self._pool.get((n, self.d_model), self._memmap(plan[0][0], key).dtype)
        o = 0
        for s, rows in plan:
            mm = self._memmap(s, key)
            if isinstance(rows, slice):
                k = rows.stop - rows.start
                out[o:o + k] = mm[rows]
            elif isinstance(rows, _Chunks):  # whole chunks as opaque items: one memmove each
                k = len(rows.idx) * c
                dst = out[o:o + k].reshape(-1).view(self._chunk_dtype(mm.dtype))
                np.take(self._chunk_view(s, key), rows.idx, out=dst, mode="clip")
            else:  # rows are in range by construction; mode="clip" avoids numpy's
                k = len(rows)  # buffered copy for out= with mode="raise"
                np.take(mm, rows, axis=0, out=out[o:o + k], mode="clip")
            o += k
        return self._finish(out)

    def _finish(self, out: np.ndarray) -> np.ndarray:
        out = _view_activations(out, self.dtype_name)
        if self.out_dtype is not None and out.dtype != self.out_dtype:
            out = out.astype(self.out_dtype)
        return out

    def _chunk_dtype(self, dt: np.dtype) -> np.dtype:
        return np.dtype((np.void, self.chunk_rows * self.d_model * dt.itemsize))

    def _chunk_view(self, shard: int, key: str) -> np.ndarray:
        """The whole chunks of a shard's memmap as a 1-d array of opaque items."""
        k = (shard, key, "chunks")
        if k not in self._mm:
            mm = self._memmap(shard, key)
            n = (len(mm) // self.chunk_rows) * self.chunk_rows
            self._mm[k] = np.asarray(mm[:n]).reshape(-1).view(self._chunk_dtype(mm.dtype))
        return self._mm[k]

    def _to_device(self, x: np.ndarray):
        if self.as_numpy:
            return x
        if self._put is None:
            self._put = self._make_put()
            try:  # a dropped jax batch releases its numpy buffer only at jaxlib's next
                # garbage collection of deferred references (e.g. the next device_put):
                # running it before taking a buffer lets the pool reuse the batch dropped
                # just before (2 buffers in rotation instead of 3: cache-warmer copies)
                from jax._src.lib import _jax

                self._release = _jax.collect_garbage
            except (ImportError, AttributeError):  # pragma: no cover
                self._release = None
        return self._put(x)

    def _make_put(self):
        """The function that turns a gathered numpy batch into a jax array.

        ``jax.device_put`` in general. For one CPU device (no sharding) and a dtype that jax
        keeps as is, the batch goes through ``jaxlib``'s ``batched_device_put`` directly:
        the same zero-copy aliasing ``ArrayImpl`` that ``jax.device_put`` returns
        (committed iff ``device`` was given), without ``device_put``'s Python dispatch
        (≈ 2.5 µs instead of ≈ 18 µs per batch here — about 6 % of a batch's copy time at
        4096 × 384 float32). Falls back to ``jax.device_put`` if that internal API is
        missing or fails."""
        import jax

        if self.sharding is not None:
            sharding = self.sharding
            return lambda x: jax.device_put(x, sharding)
        device = self.device
        slow = (lambda x: jax.device_put(x)) if device is None else (
            lambda x: jax.device_put(x, device))
        dev = device if device is not None else jax.devices()[0]
        try:
            from jax._src import core as jcore
            from jax._src.lib import xla_client as xc
            from jax.sharding import SingleDeviceSharding

            dtypes = {np.dtype(np.float32), np.dtype(np.float16)}
            try:
                import ml_dtypes

                dtypes.add(np.dtype(ml_dtypes.bfloat16))
            except ImportError:  # pragma: no cover
                pass
            sharding = SingleDeviceSharding(dev)
            committed = device is not None
            batched = xc.batched_device_put
            if dev.platform != "cpu":
                return slow
            # one probe: the fast path must give what jax.device_put gives
            probe = _aligned_empty((2, 3), np.float32)
            probe[:] = 1.5
            a = batched(jcore.ShapedArray(probe.shape, probe.dtype), sharding, [probe],
                        [dev], committed)
            if not (isinstance(a, jax.Array) and a.committed == committed
                    and a.sharding == sharding and np.array_equal(np.asarray(a), probe)):
                return slow  # pragma: no cover
        except Exception:  # noqa: BLE001  (internal API moved: use the public one)  # pragma: no cover
            return slow

        def fast(x):
            if x.dtype not in dtypes:
                return slow(x)
            return batched(jcore.ShapedArray(x.shape, x.dtype), sharding, [x], [dev],
                           committed)

        return fast

    # ------------------------------------------------------------------ iteration
    def iter_epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Any]:
        """Batches of epoch ``epoch`` (deterministic in ``(seed, epoch)``), from batch
        ``start_batch`` on (earlier batches are planned but never read)."""
        plans = itertools.islice(self._batch_plans(epoch), start_batch, None)
        produce = (self._to_device(self._gather(p)) for p in plans)
        if self.prefetch == 0:
            yield from produce
            return
        yield from _prefetch(produce, self.prefetch)

    def __iter__(self) -> Iterator[Any]:
        epoch = self._epoch
        self._epoch += 1
        return self.iter_epoch(epoch)

    def batches(self, num_batches: int | None = None, start_epoch: int = 0) -> BatchStream:
        """An endless (or ``num_batches`` long) iterator of batches over successive epochs.

        The iterator has ``skip(n)``: it jumps n batches ahead without reading them, so a
        resumed training run (``sae.train``) sees exactly the batches it would have seen."""
        if len(self) == 0:
            raise ValueError(
                f"batch_size={self.batch_size}: larger than the cache ({self.n_tokens} rows) "
                f"with drop_last=True"
            )
        return BatchStream(self, num_batches, start_epoch)

    # ------------------------------------------------------------------ statistics
    def moments(self, layer: int | None = None, max_tokens: int | None = None,
                chunk_tokens: int = 16384) -> Moments:
        """Mean and uncentred second moment of a layer, accumulated in float64.

        Streams the shards in cache order, ``chunk_tokens`` rows at a time.

        Returns:
          Moments(mean (d,), second_moment (d, d) = E[x xᵀ], count).
        """
        layer = self.layer if layer is None else layer
        d = self.d_model
        s1 = np.zeros(d, np.float64)
        s2 = np.zeros((d, d), np.float64)
        n = 0
        limit = self.n_tokens if max_tokens is None else min(int(max_tokens), self.n_tokens)
        for sh in range(self.n_shards):
            mm = self.activations(sh, layer)
            for a in range(0, mm.shape[0], chunk_tokens):
                if n >= limit:
                    break
                x = np.asarray(mm[a:min(a + chunk_tokens, a + limit - n)], dtype=np.float64)
                s1 += x.sum(0)
                s2 += x.T @ x
                n += x.shape[0]
        if n == 0:
            raise ValueError(f"path={str(self.path)!r}: cache holds no rows for moments")
        return Moments(s1 / n, s2 / n, n)

    def __repr__(self) -> str:
        return (f"ActivationStore({str(self.path)!r}, layer={self.layer}, d={self.d_model}, "
                f"n_tokens={self.n_tokens}, shards={self.n_shards}, "
                f"batch_size={self.batch_size}, dtype={self.dtype_name})")


class BatchStream:
    """Iterator over batches of successive epochs of an :class:`ActivationStore`.

    Batch number k (0-based) is batch ``k % len(store)`` of epoch ``start_epoch +
    k // len(store)``; ``skip(n)`` moves the position n batches ahead without reading."""

    def __init__(self, store: ActivationStore, num_batches: int | None, start_epoch: int):
        self.store, self.num_batches, self.start_epoch = store, num_batches, start_epoch
        self.pos = 0
        self._it: Iterator[Any] | None = None

    def __iter__(self) -> BatchStream:
        return self

    def skip(self, n: int) -> None:
        if n < 0:
            raise ValueError(f"n={n}: expected n >= 0")
        self._close()
        self.pos += n

    def _close(self) -> None:
        if self._it is not None:
            self._it.close()
            self._it = None

    def __next__(self):
        if self.num_batches is not None and self.pos >= self.num_batches:
            self._close()
            raise StopIteration
        while True:
            if self._it is None:
                e, i = divmod(self.pos, len(self.store))
                self._it = self.store.iter_epoch(self.start_epoch + e, i)
            try:
                x = next(self._it)
            except StopIteration:
                self._it = None  # epoch finished: the position is at the next epoch
                continue
            self.pos += 1
            return x


_DONE = object()


def _prefetch(it: Iterator[Any], depth: int) -> Iterator[Any]:
    """Run ``it`` in a background thread, keeping up to ``depth`` items ready."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def worker():
        try:
            for item in it:
                while not stop.is_set():
                    try:
                        q.put((True, item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put((True, _DONE))
        except BaseException as e:  # noqa: BLE001  (re-raised in the consumer)
            q.put((False, e))

    t = threading.Thread(target=worker, daemon=True, name="ActivationStore-prefetch")
    t.start()
    try:
        while True:
            ok, item = q.get()
            if not ok:
                raise item
            if item is _DONE:
                return
            yield item
    finally:
        stop.set()
        while t.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                pass
            t.join(timeout=0.05)
