"""The reader of the activation cache: :class:`ActivationStore` and :class:`BatchStream`.

Needs only numpy (and jax for device batches); never imports torch. The on-disk format is
:mod:`sae.format`, the shuffle plans :mod:`sae.shuffle`, the device side
:mod:`sae.transfer`, the atomic writer :mod:`sae._atomic`; their names used elsewhere are
re-exported here.
"""
from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from jaxsense._checks import check_positive_int

from sae import shuffle as _shuffle
from sae._atomic import atomic_save_npy, atomic_write_bytes, fsync_dir  # noqa: F401 (re-export)
from sae.format import (  # noqa: F401  (shard_file_name, write_manifest: re-exports)
    FORMAT,
    MANIFEST_NAME,
    STORAGE_DTYPES,
    layer_key,
    read_manifest,
    shard_file_name,
    verify_cache,
    view_activations,
    write_manifest,
)
from sae.moments import MomentAccumulator, Moments
from sae.shuffle import Chunks
from sae.transfer import BufferPool, aligned_empty, default_prefetch, make_put, resolve_sharding
from sae.transfer import prefetch as _prefetch

__all__ = [
    "FORMAT",
    "MANIFEST_NAME",
    "ActivationStore",
    "BatchStream",
    "Moments",
    "read_manifest",
    "verify_cache",
]

# names of earlier versions of this module, still imported from here
_STORAGE_DTYPES = STORAGE_DTYPES
_Chunks = Chunks
_MODES = {True: "blocks", False: "none", "blocks": "blocks", "rows": "rows", "none": "none"}


class ActivationStore:
    """Reader of an activation cache: shuffled ``(B, d)`` batches of one layer.

    Iterating the store yields one epoch of batches ``(batch_size, d_model)`` as jax arrays
    on ``device``/``sharding`` (on an accelerator prefetched by a background thread,
    ``prefetch`` batches ahead — 2 = double buffering; on CPU synchronous and zero-copy, see
    ``prefetch``), or numpy arrays with ``as_numpy=True``. Each new ``iter(store)`` is the
    next epoch, reshuffled from ``(seed, epoch)``. It plugs straight into SAE training:
    ``for x in store: state = step(state, x)``.

    Shuffling (``shuffle=``; the plans are :mod:`sae.shuffle`):

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
      ≈ 0.6; see docs/activations.md).
      *Trade-off*: rows of one chunk or block are consecutive tokens (usually of one text),
      so they are correlated. Larger ``chunk_rows`` = faster reads but fewer, longer runs
      per batch; larger ``block_rows`` / smaller ``shuffle_buffer`` = fewer distinct texts
      per buffer. ``chunk_rows=1`` permutes single rows inside each buffer (best mixing of
      the block shuffle, about as slow as ``"rows"``). ``shuffle_buffer`` costs no memory
      (the buffer is a plan; rows are copied once, straight into the batch).
      The default ``chunk_rows`` is about 384 KiB of rows, and at most ``batch_size // 16``
      (so a batch always holds at least 16 runs): 256 rows at d=384 float32 with batches of
      4096, 85 rows at d=2304 bfloat16; pass ``chunk_rows=64`` for finer mixing.
    - ``"rows"`` — exact row-level shuffle: the shard order is permuted, then shards are
      taken ``window_shards`` at a time (default: all shards = an exact global shuffle); the
      rows of a window are permuted together, and rows left over at the end of a window
      carry into the next. Best mixing, but every row is a random single-row read.
    - ``False`` / ``"none"`` — cache order (batches may span shards).

    Within one batch, rows are grouped by shard and sorted by row (a batch is a random
    *set*; sorting makes the memory-mapped reads nearly sequential; ``"blocks"`` puts
    chunks split at a batch boundary last). No row is repeated or skipped in an epoch; with
    ``drop_last=True`` the final partial batch is dropped. Every mode is deterministic in
    ``(seed, epoch)``.

    Every batch is gathered into a 64-byte-aligned buffer that a CPU ``device_put``
    aliases; a buffer is reused only once no array (numpy, view, or jax array aliasing it)
    refers to it any more, so a batch the caller keeps is never overwritten (see
    ``reuse_buffers``).

    Args:
      path: cache folder (written by :func:`sae.cache.cache_activations`).
      layer: which cached layer to read; may be omitted when a single layer was cached.
      batch_size: rows per batch B.
      seed: shuffle seed.
      shuffle: ``"blocks"``/``True`` (default), ``"rows"`` or ``"none"``/``False``.
      block_rows: rows per contiguous block of the block shuffle (default 1024).
      shuffle_buffer: batches per shuffle buffer of the block shuffle (default 16).
      chunk_rows: rows per chunk, the unit that the block shuffle permutes and copies
        (default ``None``: :func:`sae.shuffle.default_chunk_rows`).
      window_shards: shards mixed together per shuffle window of ``shuffle="rows"``
        (``None`` = all).
      drop_last: drop the last, partial batch of an epoch.
      prefetch: batches prepared ahead by a background thread (0 = synchronous). Default
        ``None``: 2 when the batches go to a non-CPU device, 0 for numpy batches or a CPU
        device (:func:`sae.transfer.default_prefetch`). Results do not depend on it.
      device: a ``jax.Device`` for the batches (default device if ``None``).
      sharding: a ``jax.sharding.Sharding`` or a ``Mesh`` (batch axis split over all mesh
        axes: ``NamedSharding(mesh, P(mesh.axis_names, None))``).
      as_numpy: yield numpy arrays instead of jax arrays (no device transfer).
      dtype: cast batches to this dtype (default: the cached dtype).
      verify: ``"full"`` (sha256 of every file, default), ``"size"`` or ``"none"``;
        see :func:`sae.format.verify_cache`.
      reuse_buffers: gather into buffers of a :class:`sae.transfer.BufferPool` (default),
        reused only once no array refers to them any more (the same rule as ``malloc``
        for freed numpy memory; risk: a raw pointer kept without a Python reference, e.g.
        ``unsafe_buffer_pointer()``, may see a later batch); ``False``: fresh memory for
        every batch (≈ 15 % more CPU per shuffled epoch here).

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
        reuse_buffers: bool = True,
    ):
        check_positive_int("batch_size", batch_size)
        if prefetch is not None and (not isinstance(prefetch, int) or isinstance(prefetch, bool)
                                     or prefetch < 0):
            raise ValueError(f"prefetch={prefetch!r}: expected None or an int >= 0")
        check_positive_int("window_shards", window_shards, allow_none=True)
        if not isinstance(reuse_buffers, bool):
            raise TypeError(f"reuse_buffers={reuse_buffers!r}: expected a bool")
        if not isinstance(shuffle, (bool, str)) or shuffle not in _MODES:
            raise ValueError(
                f"shuffle={shuffle!r}: expected True/'blocks', 'rows' or False/'none'"
            )
        for name, v in (("block_rows", block_rows), ("shuffle_buffer", shuffle_buffer),
                        ("chunk_rows", 1 if chunk_rows is None else chunk_rows)):
            check_positive_int(name, v)
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
        self.shuffle: str = _MODES[shuffle]  # "blocks", "rows" or "none"
        self.block_rows, self.shuffle_buffer = block_rows, shuffle_buffer
        if chunk_rows is None:
            row_bytes = self.d_model * STORAGE_DTYPES[self.dtype_name].itemsize
            chunk_rows = _shuffle.default_chunk_rows(row_bytes, block_rows, batch_size)
        self.chunk_rows = min(chunk_rows, batch_size)  # a chunk spans at most 2 batches
        self.drop_last, self.as_numpy = bool(drop_last), bool(as_numpy)
        self.out_dtype = None if dtype is None else np.dtype(dtype)
        self.device = device
        self.sharding = resolve_sharding(sharding, (batch_size, self.d_model))
        self.prefetch: int = (default_prefetch(self.as_numpy, device, self.sharding)
                              if prefetch is None else prefetch)
        self.shard_sizes = np.array([s["n_tokens"] for s in self.manifest["shards"]], np.int64)
        self.n_tokens = int(self.shard_sizes.sum())
        self._offsets = np.concatenate([[0], np.cumsum(self.shard_sizes)])
        self._mm: dict[tuple, np.ndarray] = {}  # (shard, key[, view]) -> memmap (view)
        self._pool = BufferPool(max_free=self.prefetch + 4) if reuse_buffers else None
        self._put = None  # numpy batch -> jax array (sae.transfer.make_put), made on first use
        self._epoch = 0

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
        return view_activations(self._memmap(shard, layer_key(layer)), self.dtype_name)

    def tokens(self, shard: int) -> dict[str, np.ndarray]:
        """Token ids, positions and text indices of the rows of one shard (memmaps, (n,))."""
        return {k: self._memmap(shard, k) for k in ("token_ids", "positions", "text_index")}

    @property
    def n_shards(self) -> int:
        return len(self.shard_sizes)

    def __len__(self) -> int:
        """Batches per epoch."""
        return _shuffle.batches_per_epoch(self.n_tokens, self.batch_size, self.drop_last)

    # ------------------------------------------------------------------ gather and put
    def _batch_plans(self, epoch: int) -> Iterator[list[tuple[int, Any]]]:
        """The plans of epoch ``epoch`` (:func:`sae.shuffle.batch_plans`)."""
        return _shuffle.batch_plans(
            self.shard_sizes, self.batch_size, mode=self.shuffle, seed=self.seed,
            epoch=epoch, drop_last=self.drop_last, chunk_rows=self.chunk_rows,
            block_rows=self.block_rows, shuffle_buffer=self.shuffle_buffer,
            window_shards=self.window_shards)

    def _gather(self, plan) -> np.ndarray:
        """Copy the planned rows out of the memmaps into one 64-byte-aligned (n, d) array
        (one copy; aligned so that a CPU ``device_put`` aliases it), from the buffer pool
        unless ``reuse_buffers=False``."""
        key = layer_key(self.layer)
        c, d = self.chunk_rows, self.d_model
        n = _shuffle.plan_size(plan, c)
        storage = self._rows(plan[0][0], key).dtype
        chunk = np.dtype((np.void, c * d * storage.itemsize))  # one chunk as an opaque item
        out = (self._pool.get if self._pool is not None else aligned_empty)((n, d), storage)
        flat = out.reshape(-1)
        o = 0
        for s, rows in plan:
            if isinstance(rows, Chunks):  # whole chunks as opaque items: one memmove each
                k = len(rows.idx) * c
                self._chunk_view(s, key, chunk).take(
                    rows.idx, out=flat[o * d:(o + k) * d].view(chunk), mode="clip")
            elif isinstance(rows, slice):
                k = rows.stop - rows.start
                out[o:o + k] = self._rows(s, key)[rows]
            else:  # rows are in range by construction; mode="clip" avoids numpy's
                k = len(rows)  # buffered copy for out= with mode="raise"
                self._rows(s, key).take(rows, axis=0, out=out[o:o + k], mode="clip")
            o += k
        out = view_activations(out, self.dtype_name)
        if self.out_dtype is not None and out.dtype != self.out_dtype:
            out = out.astype(self.out_dtype)
        return out

    def _rows(self, shard: int, key: str) -> np.ndarray:
        """A shard's memmap as a plain ndarray view (slicing a ``np.memmap`` costs more)."""
        k = (shard, key, "rows")
        if k not in self._mm:
            self._mm[k] = np.asarray(self._memmap(shard, key))
        return self._mm[k]

    def _chunk_view(self, shard: int, key: str, chunk: np.dtype) -> np.ndarray:
        """The whole chunks of a shard's memmap as a 1-d array of ``chunk`` (opaque) items."""
        k = (shard, key, "chunks")
        if k not in self._mm:
            rows = self._rows(shard, key)
            n = (len(rows) // self.chunk_rows) * self.chunk_rows
            self._mm[k] = rows[:n].reshape(-1).view(chunk)
        return self._mm[k]

    def _to_device(self, x: np.ndarray):
        if self.as_numpy:
            return x
        if self._put is None:
            self._put = make_put(self.device, self.sharding)
        return self._put(x)

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
        """Mean and uncentred second moment of a layer, accumulated in float64 by
        :class:`sae.moments.MomentAccumulator` (the accumulator of
        :func:`sae.atoms.second_moment`).

        Streams the shards in cache order, ``chunk_tokens`` rows at a time, up to
        ``max_tokens`` rows (default: all).

        Returns:
          Moments(mean (d,), second_moment (d, d) = E[x xᵀ], count).
        """
        layer = self.layer if layer is None else layer
        for name, v in (("max_tokens", 1 if max_tokens is None else max_tokens),
                        ("chunk_tokens", chunk_tokens)):
            check_positive_int(name, v)
        limit = self.n_tokens if max_tokens is None else min(int(max_tokens), self.n_tokens)
        acc = MomentAccumulator(self.d_model)
        for sh in range(self.n_shards):
            mm = self.activations(sh, layer)
            for a in range(0, mm.shape[0], chunk_tokens):
                if acc.n >= limit:
                    break
                acc.update(mm[a:min(a + chunk_tokens, a + limit - acc.n)])
        if acc.n == 0:
            raise ValueError(f"path={str(self.path)!r}: cache holds no rows for moments")
        m = acc.result()
        return Moments(m.mean, m.m2, m.n)

    def __repr__(self) -> str:
        return (f"ActivationStore({str(self.path)!r}, layer={self.layer}, d={self.d_model}, "
                f"n_tokens={self.n_tokens}, shards={self.n_shards}, "
                f"batch_size={self.batch_size}, dtype={self.dtype_name})")


class BatchStream:
    """Iterator over batches of successive epochs of an :class:`ActivationStore`.

    Batch number k (0-based) is batch ``k % len(store)`` of epoch ``start_epoch +
    k // len(store)`` (:func:`sae.shuffle.stream_position`); ``skip(n)`` moves the position
    n batches ahead without reading."""

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
                epoch, i = _shuffle.stream_position(self.pos, len(self.store), self.start_epoch)
                self._it = self.store.iter_epoch(epoch, i)
            try:
                x = next(self._it)
            except StopIteration:
                self._it = None  # epoch finished: the position is at the next epoch
                continue
            self.pos += 1
            return x
