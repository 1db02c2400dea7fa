"""sae.shuffle: the store's batch plans as pure functions of (sizes, seed, epoch, …), no files."""
import itertools

import numpy as np
import pytest

from sae import shuffle as sh

SIZES = [100, 0, 37, 250, 64, 1, 128]  # an empty shard, a one-row shard, uneven sizes
N = sum(SIZES)

MODES = [
    ("blocks", {"chunk_rows": 16, "block_rows": 48, "shuffle_buffer": 2}),
    ("blocks", {"chunk_rows": 1, "block_rows": 8, "shuffle_buffer": 1}),
    ("blocks", {"chunk_rows": 32, "block_rows": 1024, "shuffle_buffer": 16}),
    ("rows", {}),
    ("rows", {"window_shards": 2}),
    ("none", {}),
]


def _epoch(mode, kw, *, seed=0, epoch=0, batch_size=32, drop_last=False, sizes=SIZES):
    plans = list(sh.batch_plans(sizes, batch_size, mode=mode, seed=seed, epoch=epoch,
                                drop_last=drop_last, **kw))
    c = kw.get("chunk_rows", 1)
    return [sh.plan_rows(p, sizes, c) for p in plans], plans


@pytest.mark.parametrize(("mode", "kw"), MODES)
def test_every_row_exactly_once_per_epoch(mode, kw):
    for batch_size in (32, 50, N, N + 7):
        ids, plans = _epoch(mode, kw, batch_size=batch_size)
        flat = np.concatenate(ids)
        np.testing.assert_array_equal(np.sort(flat), np.arange(N))
        assert [len(b) for b in ids[:-1]] == [batch_size] * (len(ids) - 1)
        assert len(ids) == sh.batches_per_epoch(N, batch_size, drop_last=False)
        assert all(sh.plan_size(p, kw.get("chunk_rows", 1)) == len(b)
                   for p, b in zip(plans, ids))
        # drop_last: the same full batches, the partial one left out
        full, _ = _epoch(mode, kw, batch_size=batch_size, drop_last=True)
        assert len(full) == N // batch_size == sh.batches_per_epoch(N, batch_size, True)
        for a, b in zip(full, ids):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(("mode", "kw"), MODES)
def test_plans_are_deterministic_and_differ_between_epochs_and_seeds(mode, kw):
    a, _ = _epoch(mode, kw, seed=3, epoch=5)
    b, _ = _epoch(mode, kw, seed=3, epoch=5)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    a = np.concatenate(a)
    if mode == "none":  # cache order, whatever the seed and epoch
        np.testing.assert_array_equal(a, np.arange(N))
        np.testing.assert_array_equal(np.concatenate(_epoch(mode, kw, seed=4, epoch=6)[0]), a)
        return
    assert not np.array_equal(a, np.arange(N))
    assert not np.array_equal(a, np.concatenate(_epoch(mode, kw, seed=3, epoch=6)[0]))
    assert not np.array_equal(a, np.concatenate(_epoch(mode, kw, seed=4, epoch=5)[0]))


def test_batches_group_rows_by_shard_and_sort_them():
    offsets = np.concatenate([[0], np.cumsum(SIZES)])
    for mode, kw in MODES:
        _, plans = _epoch(mode, kw, batch_size=64)
        for plan in plans:
            if mode == "blocks":  # whole chunks first (shards ascending), then slices
                chunks = [s for s, p in plan if isinstance(p, sh.Chunks)]
                assert chunks == sorted(set(chunks))
                kinds = [isinstance(p, sh.Chunks) for _, p in plan]
                assert kinds == sorted(kinds, reverse=True)
                for _, p in plan:
                    if isinstance(p, sh.Chunks):
                        assert np.all(np.diff(p.idx) > 0)
            elif mode == "rows":
                assert [s for s, _ in plan] == sorted({s for s, _ in plan})
                for s, p in plan:
                    assert np.all(np.diff(p) > 0) and p.max() < SIZES[s]
            for s, p in plan:  # every item lies inside its shard
                r = sh.plan_rows([(s, p)], SIZES, kw.get("chunk_rows", 1))
                assert r.min() >= offsets[s] and r.max() < offsets[s + 1]


def test_block_shuffle_keeps_chunks_contiguous():
    c = 16
    ids, plans = _epoch("blocks", {"chunk_rows": c, "block_rows": 48, "shuffle_buffer": 2},
                        batch_size=64)
    for plan in plans:
        for s, p in plan:
            if isinstance(p, sh.Chunks):  # whole, aligned chunks of c rows
                assert np.all(p.idx * c + c <= SIZES[s])
            else:  # a partial chunk: at most c consecutive rows inside one aligned chunk
                assert 0 < p.stop - p.start <= c and p.start // c == (p.stop - 1) // c
    # across an epoch, every aligned chunk's rows are read in full (whole or in 2 pieces)
    flat = np.concatenate(ids)
    np.testing.assert_array_equal(np.sort(flat), np.arange(N))


def test_stream_position_and_resume_are_consistent():
    n = sh.batches_per_epoch(N, 40, drop_last=True)
    stream = [(e, i) for e in range(2, 5) for i in range(n)]  # epochs 2, 3, 4
    for k, want in enumerate(stream):
        assert sh.stream_position(k, n, start_epoch=2) == want
    # resuming at position k = planning epoch e and skipping i batches: the same rows
    kw = {"chunk_rows": 16, "block_rows": 48, "shuffle_buffer": 2}
    full = {e: [sh.plan_rows(p, SIZES, 16) for p in sh.batch_plans(
        SIZES, 40, seed=9, epoch=e, **kw)] for e in (2, 3, 4)}
    for k in (0, 1, n - 1, n, n + 3, 3 * n - 1):
        e, i = sh.stream_position(k, n, start_epoch=2)
        resumed = itertools.islice(sh.batch_plans(SIZES, 40, seed=9, epoch=e, **kw), i, None)
        np.testing.assert_array_equal(sh.plan_rows(next(resumed), SIZES, 16), full[e][i])
    with pytest.raises(ValueError, match="k=-1: expected k >= 0"):
        sh.stream_position(-1, n)
    with pytest.raises(ValueError, match="n_batches=0: expected a positive int"):
        sh.stream_position(3, 0)


def test_default_chunk_rows():
    assert sh.default_chunk_rows(384 * 4, 1024, 4096) == 256  # 384 KiB, d=384 float32
    assert sh.default_chunk_rows(2304 * 2, 1024, 4096) == 85  # d=2304 bfloat16
    assert sh.default_chunk_rows(384 * 4, 100, 4096) == 100  # at most one block
    assert sh.default_chunk_rows(384 * 4, 1024, 320) == 20  # at least 16 runs per batch
    assert sh.default_chunk_rows(1 << 30, 1024, 4096) == 1


def test_empty_and_bad_input():
    assert list(sh.batch_plans([], 8, mode="blocks", chunk_rows=2)) == []
    assert list(sh.batch_plans([0, 0], 8, mode="rows")) == []
    assert list(sh.batch_plans([0], 8, mode="none")) == []
    with pytest.raises(ValueError, match="mode='random': expected one of"):
        list(sh.batch_plans(SIZES, 8, mode="random"))
    with pytest.raises(ValueError, match="batch_size=0: expected a positive int"):
        list(sh.batch_plans(SIZES, 0, mode="none"))
    with pytest.raises(ValueError, match="chunk_rows=9: expected at most batch_size=8"):
        list(sh.block_plans(SIZES, 8, seed=0, epoch=0, chunk_rows=9))
    with pytest.raises(ValueError, match=r"shard_sizes=\[3, -1\]: expected a 1-d sequence"):
        list(sh.row_plans([3, -1], 8, seed=0, epoch=0))
    with pytest.raises(ValueError, match="window_shards=0: expected a positive int"):
        list(sh.row_plans(SIZES, 8, seed=0, epoch=0, window_shards=0))
