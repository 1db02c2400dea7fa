"""Shuffle planning of :class:`sae.store.ActivationStore`: pure functions, no files.

A *plan* says which rows of which shards make up one batch, in copy order: a list of
``(shard, item)`` where ``item`` is

- a ``slice`` of consecutive rows of the shard,
- a sorted ``np.ndarray`` of row indices (``"rows"`` mode), or
- :class:`Chunks` — indices of whole chunks of ``chunk_rows`` consecutive rows (chunk ``i``
  = rows ``[i c, (i + 1) c)``), each copied with one memmove (``"blocks"`` mode).

Every planner is a deterministic function of ``(shard sizes, batch size, seed, epoch, mode
parameters)``; each epoch lists every row exactly once (the last partial batch is dropped
with ``drop_last``). The modes are described in :class:`sae.store.ActivationStore`.
:func:`plan_rows` turns a plan into global row ids (row ``r`` of shard ``s`` has id
``offset[s] + r``), and :func:`stream_position` maps a position of a multi-epoch batch
stream to ``(epoch, batch)``, which is how a resumed run finds its next batch.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np

from jaxsense._checks import check_positive_int

__all__ = [
    "CHUNK_BYTES",
    "MODES",
    "Chunks",
    "batch_plans",
    "batches_per_epoch",
    "block_plans",
    "default_chunk_rows",
    "plan_rows",
    "plan_size",
    "row_plans",
    "sequential_plans",
    "stream_position",
]

MODES = ("blocks", "rows", "none")
CHUNK_BYTES = 384 << 10  # default chunk of the block shuffle: one memmove of about this size

Plan = list[tuple[int, Any]]


class Chunks(NamedTuple):
    """Plan item of the block shuffle: indices (1-d int64) of whole chunks of one shard."""

    idx: np.ndarray


def _positive_int(name: str, v) -> int:
    return check_positive_int(name, v)


def _sizes(shard_sizes: Sequence[int] | np.ndarray) -> np.ndarray:
    s = np.asarray(shard_sizes)
    if s.ndim != 1 or (s.size and (not np.issubdtype(s.dtype, np.integer) or s.min() < 0)):
        raise ValueError(f"shard_sizes={shard_sizes!r}: expected a 1-d sequence of ints >= 0")
    return s.astype(np.int64)


def batches_per_epoch(n_rows: int, batch_size: int, drop_last: bool) -> int:
    """Batches in one epoch of ``n_rows`` rows."""
    full, rem = divmod(int(n_rows), _positive_int("batch_size", batch_size))
    return full + (0 if drop_last or rem == 0 else 1)


def default_chunk_rows(row_bytes: int, block_rows: int, batch_size: int,
                       chunk_bytes: int = CHUNK_BYTES) -> int:
    """About ``chunk_bytes`` of rows, at most ``block_rows`` and ``batch_size // 16`` (so a
    batch always holds at least 16 runs), at least 1: 256 rows at d=384 float32 with
    batches of 4096, 85 rows at d=2304 bfloat16."""
    return max(1, min(chunk_bytes // _positive_int("row_bytes", row_bytes), block_rows,
                      batch_size // 16))


def stream_position(k: int, n_batches: int, start_epoch: int = 0) -> tuple[int, int]:
    """``(epoch, batch)`` of batch number ``k`` (0-based) of a stream over successive
    epochs of ``n_batches`` batches each, starting at epoch ``start_epoch``."""
    if k < 0:
        raise ValueError(f"k={k}: expected k >= 0")
    e, i = divmod(int(k), _positive_int("n_batches", n_batches))
    return start_epoch + e, i


def plan_size(plan: Plan, chunk_rows: int) -> int:
    """Rows in a plan."""
    return sum((p.stop - p.start) if isinstance(p, slice)
               else len(p.idx) * chunk_rows if isinstance(p, Chunks) else len(p)
               for _, p in plan)


def plan_rows(plan: Plan, shard_sizes, chunk_rows: int) -> np.ndarray:
    """Global row ids (int64, in copy order) of the rows a plan reads."""
    offsets = np.concatenate([[0], np.cumsum(_sizes(shard_sizes))])
    ids = []
    for s, p in plan:
        if isinstance(p, slice):
            r = np.arange(p.start, p.stop)
        elif isinstance(p, Chunks):
            r = (p.idx[:, None] * chunk_rows + np.arange(chunk_rows)).ravel()
        else:
            r = np.asarray(p)
        ids.append(r.astype(np.int64) + offsets[s])
    return np.concatenate(ids) if ids else np.empty(0, np.int64)


def batch_plans(shard_sizes, batch_size: int, *, mode: str = "blocks", seed: int = 0,
                epoch: int = 0, drop_last: bool = True, chunk_rows: int = 1,
                block_rows: int = 1024, shuffle_buffer: int = 16,
                window_shards: int | None = None) -> Iterator[Plan]:
    """The plans of one epoch, batch by batch, for ``mode`` in :data:`MODES`."""
    if mode == "blocks":
        return block_plans(shard_sizes, batch_size, seed=seed, epoch=epoch,
                           chunk_rows=chunk_rows, block_rows=block_rows,
                           shuffle_buffer=shuffle_buffer, drop_last=drop_last)
    if mode == "rows":
        return row_plans(shard_sizes, batch_size, seed=seed, epoch=epoch,
                         window_shards=window_shards, drop_last=drop_last)
    if mode == "none":
        return sequential_plans(shard_sizes, batch_size, drop_last=drop_last)
    raise ValueError(f"mode={mode!r}: expected one of {MODES}")


def sequential_plans(shard_sizes, batch_size: int, *, drop_last: bool = True
                     ) -> Iterator[Plan]:
    """Cache order: batch ``j`` = global rows ``[j B, (j+1) B)`` (batches may span shards)."""
    sizes, B = _sizes(shard_sizes), _positive_int("batch_size", batch_size)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).tolist()
    n_rows = offsets[-1]
    for start in range(0, n_rows, B):
        stop = min(start + B, n_rows)
        if stop - start < B and drop_last:
            return
        yield [(s, slice(max(start, lo) - lo, min(stop, hi) - lo))
               for s, (lo, hi) in enumerate(itertools.pairwise(offsets))
               if max(start, lo) < min(stop, hi)]


def row_plans(shard_sizes, batch_size: int, *, seed: int, epoch: int,
              window_shards: int | None = None, drop_last: bool = True) -> Iterator[Plan]:
    """Exact row-level shuffle: the shard order is permuted, shards are taken
    ``window_shards`` at a time (``None``: all = one global permutation), the rows of a
    window are permuted together, and rows left at the end of a window carry into the next.
    Each batch is grouped by shard, rows sorted (near-sequential reads)."""
    sizes, B = _sizes(shard_sizes), _positive_int("batch_size", batch_size)
    n_shards = len(sizes)
    w = n_shards if window_shards is None else _positive_int("window_shards", window_shards)
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n_shards)
    pend_s = np.empty(0, np.int64)
    pend_r = np.empty(0, np.int64)
    for g in range(0, n_shards, max(w, 1)):
        group = order[g:g + w]
        sids = np.concatenate([np.full(sizes[s], s, np.int64) for s in group])
        rows = np.concatenate([np.arange(sizes[s], dtype=np.int64) for s in group])
        perm = rng.permutation(len(sids))
        pend_s = np.concatenate([pend_s, sids[perm]])
        pend_r = np.concatenate([pend_r, rows[perm]])
        n_full = len(pend_s) // B
        for b in range(n_full):
            yield _group(pend_s[b * B:(b + 1) * B], pend_r[b * B:(b + 1) * B])
        pend_s, pend_r = pend_s[n_full * B:], pend_r[n_full * B:]
    if len(pend_s) and not drop_last:
        yield _group(pend_s, pend_r)


def _group(sids: np.ndarray, rows: np.ndarray) -> Plan:
    """(shard ids, rows) of one batch → [(shard, sorted rows)], shards ascending."""
    key = np.sort((sids << 32) | rows)
    s_sorted = key >> 32
    bounds = np.flatnonzero(np.diff(s_sorted)) + 1
    starts = np.concatenate([[0], bounds])
    ends = np.concatenate([bounds, [len(key)]])
    mask = np.int64((1 << 32) - 1)
    return [(int(s_sorted[a]), key[a:b] & mask) for a, b in zip(starts, ends)]


def block_plans(shard_sizes, batch_size: int, *, seed: int, epoch: int, chunk_rows: int,
                block_rows: int = 1024, shuffle_buffer: int = 16, drop_last: bool = True
                ) -> Iterator[Plan]:
    """Block shuffle. Every shard is cut into chunks of ``chunk_rows`` rows and the chunks
    into blocks of ``ceil(block_rows / chunk_rows)`` chunks, the cuts shifted by a random
    phase per shard and epoch. All blocks go in one random order; the resulting chunk
    stream is cut into shuffle buffers of ``shuffle_buffer * batch_size`` rows whose chunks
    are permuted; batch ``j`` is rows ``[j B, (j+1) B)`` of the permuted stream.

    Per batch: ``(shard, Chunks(sorted chunk indices))`` for the whole chunks inside it,
    grouped by shard, then ``(shard, slice)`` for partial chunks (a shard's short last
    chunk, or a chunk split between two batches). ``chunk_rows`` must be at most
    ``batch_size`` (a chunk spans at most two batches)."""
    sizes, B = _sizes(shard_sizes), _positive_int("batch_size", batch_size)
    c = _positive_int("chunk_rows", chunk_rows)
    if c > B:
        raise ValueError(f"chunk_rows={c}: expected at most batch_size={B}")
    _positive_int("block_rows", block_rows)
    _positive_int("shuffle_buffer", shuffle_buffer)
    n_rows = int(sizes.sum())
    if n_rows == 0:
        return
    Lc = -(-block_rows // c)  # chunks per block
    # a stream of its own (3 words): "rows" keeps the orders of earlier versions
    rng = np.random.default_rng([seed, epoch, 1])
    b_shard, b_start, b_n = [], [], []  # blocks, in chunk units
    for s, n in enumerate(sizes.tolist()):
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
    ch_len = np.minimum(c, sizes[ch_shard] - ch_idx * c)
    # shuffle buffers: chunks starting in rows [k R, (k+1) R) of the stream are permuted
    # together
    R = B * shuffle_buffer
    start = np.cumsum(ch_len) - ch_len
    bounds = np.searchsorted(start, np.arange(0, n_rows, R)).tolist() + [total]
    order = np.concatenate([lo + rng.permutation(hi - lo)
                            for lo, hi in itertools.pairwise(bounds)])
    ch_shard, ch_idx, ch_len = ch_shard[order], ch_idx[order], ch_len[order]
    yield from _cut_batches(ch_shard, ch_idx, ch_len, B, c,
                            batches_per_epoch(n_rows, B, drop_last))


def _cut_batches(ch_shard, ch_idx, ch_len, B: int, c: int, n_batches: int) -> list[Plan]:
    """Batch ``j`` = stream rows ``[j B, (j+1) B)`` of a chunk stream: whole chunks inside
    one batch become :class:`Chunks` items grouped by shard (sorted); chunks cut by a batch
    boundary or short become slices."""
    ch_end = np.cumsum(ch_len)
    st = ch_end - ch_len
    b0, b1 = st // B, (ch_end - 1) // B
    plans: list[Plan] = [[] for _ in range(n_batches)]
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
            plans[bj].append((sj, Chunks(fx[p:q])))
    pi = np.flatnonzero(~full)
    r0 = ch_idx[pi] * c
    split = np.minimum(ch_len[pi], (b0[pi] + 1) * B - st[pi])  # rows in the first batch
    for sj, bj, bk, r, k, n in zip(ch_shard[pi].tolist(), b0[pi].tolist(), b1[pi].tolist(),
                                   r0.tolist(), split.tolist(), ch_len[pi].tolist()):
        if bj < n_batches:
            plans[bj].append((sj, slice(r, r + k)))
        if bk != bj and bk < n_batches:
            plans[bk].append((sj, slice(r + k, r + n)))
    return plans
