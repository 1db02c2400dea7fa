"""ActivationStore: shuffling, batching, device sharding, float64 moments, integrity checks."""
import gc
import itertools
import json
import os
import shutil
import threading

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_VERBOSITY"] = "error"

import jax
import numpy as np
import pytest
from _cache_worker import make_tiny_model, synthetic_texts

from sae.activations import ActivationStore, cache_activations
from sae.shuffle import plan_rows

D = 32


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    import torch

    root = tmp_path_factory.mktemp("store")
    model = make_tiny_model(str(root / "llama"), "llama")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cache_activations(model, list(synthetic_texts(60, seed=7)), root / "cache",
                          layers=[0, 2], context_length=24, batch_size=4,
                          tokens_per_shard=100, progress=False)
    finally:
        torch.set_num_threads(n)
    return root / "cache"


def _rows(store):
    return np.concatenate([np.asarray(store.activations(s)) for s in range(store.n_shards)])


def _as_sorted_set(x):
    x = np.asarray(x)
    return x[np.lexsort(x.T[::-1])]


def test_epoch_is_a_permutation_of_all_rows(cache_dir):
    st = ActivationStore(cache_dir, layer=2, batch_size=64, seed=1, drop_last=False)
    assert st.n_shards >= 6 and st.d_model == D
    batches = list(st)
    assert all(isinstance(b, jax.Array) for b in batches)
    assert [b.shape for b in batches[:-1]] == [(64, D)] * (len(batches) - 1)
    got = np.concatenate([np.asarray(b) for b in batches])
    all_rows = _rows(st)
    assert len(got) == st.n_tokens == len(all_rows)
    np.testing.assert_array_equal(_as_sorted_set(got), _as_sorted_set(all_rows))
    assert not np.array_equal(got, all_rows)  # shuffled
    # batches mix shards: the first batch draws rows from more than one shard
    first = np.asarray(batches[0])
    owners = {s for s in range(st.n_shards)
              for r in first[:8] if (np.asarray(st.activations(s)) == r).all(1).any()}
    assert len(owners) > 1


def test_shuffle_is_seeded_and_changes_per_epoch(cache_dir):
    def epoch(seed, **kw):
        return np.concatenate([np.asarray(b) for b in
                               ActivationStore(cache_dir, layer=0, batch_size=50, seed=seed,
                                               **kw)])
    a, b, c = epoch(0), epoch(0), epoch(1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    st = ActivationStore(cache_dir, layer=0, batch_size=50, seed=0)
    e0, e1 = (np.concatenate([np.asarray(x) for x in st]) for _ in range(2))
    np.testing.assert_array_equal(e0, a)
    assert not np.array_equal(e0, e1)
    assert len(e0) == (st.n_tokens // 50) * 50 == len(st) * 50  # drop_last
    # synchronous (prefetch=0) and windowed shuffles are permutations too
    sync = epoch(0, prefetch=0)
    np.testing.assert_array_equal(sync, a)
    w = ActivationStore(cache_dir, layer=0, batch_size=50, shuffle="rows", window_shards=2,
                        drop_last=False)
    np.testing.assert_array_equal(_as_sorted_set(np.concatenate([np.asarray(x) for x in w])),
                                  _as_sorted_set(_rows(w)))


def _plan_rows(st, epoch=0):
    """Global row ids of each batch of an epoch, from the store's plan (no reading)."""
    return [plan_rows(p, st.shard_sizes, st.chunk_rows) for p in st._batch_plans(epoch)]


BLOCK_CONFIGS = [{}, {"chunk_rows": 1},
                 {"chunk_rows": 7, "block_rows": 50, "shuffle_buffer": 3},
                 {"chunk_rows": 16, "block_rows": 16, "shuffle_buffer": 1, "batch_size": 40}]


@pytest.mark.parametrize("kw", BLOCK_CONFIGS)
def test_block_shuffle_reads_every_row_exactly_once(cache_dir, kw):
    kw = {"batch_size": 64, **kw}
    st = ActivationStore(cache_dir, layer=2, seed=4, drop_last=False, as_numpy=True, **kw)
    assert st.shuffle == "blocks"
    ids = _plan_rows(st)
    assert [len(b) for b in ids[:-1]] == [st.batch_size] * (len(ids) - 1)
    flat = np.concatenate(ids)
    np.testing.assert_array_equal(np.sort(flat), np.arange(st.n_tokens))  # once each
    assert not np.array_equal(flat, np.arange(st.n_tokens))
    all_rows = _rows(st)
    got = list(st)
    for x, i in zip(got, ids):  # the batches hold exactly the planned rows
        np.testing.assert_array_equal(_as_sorted_set(x), _as_sorted_set(all_rows[i]))
    full = ActivationStore(cache_dir, layer=2, seed=4, as_numpy=True, **kw)  # drop_last
    assert len(list(full)) == len(full) == st.n_tokens // st.batch_size


def test_block_shuffle_is_seeded_mixes_shards_and_resumes(cache_dir):
    def order(seed, epoch=0, **kw):
        st = ActivationStore(cache_dir, layer=0, batch_size=64, seed=seed, **kw)
        return np.concatenate(_plan_rows(st, epoch))

    a = order(0)
    np.testing.assert_array_equal(a, order(0))  # deterministic
    assert not np.array_equal(a, order(1))  # seeds differ
    assert not np.array_equal(a, order(0, epoch=1))  # epochs differ
    assert not np.array_equal(a, order(0, shuffle="rows"))
    st = ActivationStore(cache_dir, layer=0, batch_size=64, seed=0, as_numpy=True)
    shard_of = np.searchsorted(st._offsets, np.arange(st.n_tokens), side="right") - 1
    ids = _plan_rows(st)
    for b in ids:  # every batch draws from several shards …
        assert len(set(shard_of[b].tolist())) >= 3
    counts = [np.bincount(shard_of[b], minlength=st.n_shards) for b in ids]
    for c0, c1 in itertools.pairwise(counts):  # … in proportions that change batch to batch
        assert not np.array_equal(c0, c1)
    # the data matches the plan, synchronously or prefetched; resume lands on the same batch
    sync = np.concatenate(list(ActivationStore(cache_dir, layer=0, batch_size=64, seed=0,
                                               as_numpy=True, prefetch=0)))
    np.testing.assert_array_equal(np.concatenate(list(st.iter_epoch(0))), sync)
    n = len(st)
    full = list(st.batches(num_batches=2 * n + 2))
    for k in (3, n, n + 1):
        stream = st.batches(num_batches=2 * n + 2)
        stream.skip(k)
        rest = list(stream)
        assert len(rest) == 2 * n + 2 - k
        for x, y in zip(rest, full[k:]):
            np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="shuffle='random'"):
        ActivationStore(cache_dir, layer=0, shuffle="random")
    with pytest.raises(ValueError, match="chunk_rows=0"):
        ActivationStore(cache_dir, layer=0, chunk_rows=0)


def test_unshuffled_reads_cache_order_and_batches_stream(cache_dir):
    st = ActivationStore(cache_dir, layer=2, batch_size=37, shuffle=False, drop_last=False,
                         as_numpy=True)
    got = list(st)
    assert all(isinstance(b, np.ndarray) for b in got)
    np.testing.assert_array_equal(np.concatenate(got), _rows(st))
    stream = ActivationStore(cache_dir, layer=2, batch_size=37).batches(num_batches=3 * len(st))
    assert sum(1 for _ in stream) == 3 * len(st)


def _prefetch_threads():
    return {t for t in threading.enumerate() if t.name == "ActivationStore-prefetch"}


@pytest.mark.timeout(60)
def test_abandoning_an_epoch_stops_the_prefetch_thread(cache_dir):
    """Closing (or dropping) an iteration mid-epoch ends its prefetch thread, which was
    blocked on a full queue; a new iteration of the same epoch starts from batch 0 again."""
    kw = {"layer": 2, "batch_size": 8, "seed": 6, "as_numpy": True}
    ref = list(itertools.islice(ActivationStore(cache_dir, prefetch=0, **kw), 3))
    st = ActivationStore(cache_dir, prefetch=2, **kw)
    assert len(st) > 10  # the thread is far from the end of the epoch when abandoned
    before = _prefetch_threads()
    it = iter(st)
    np.testing.assert_array_equal(next(it), ref[0])
    (t,) = _prefetch_threads() - before
    assert t.is_alive()
    it.close()  # returns only once the thread has exited
    assert not t.is_alive()
    again = st.iter_epoch(0)
    for r in ref:
        np.testing.assert_array_equal(next(again), r)
    (t2,) = _prefetch_threads() - before
    del again  # dropped without close(): the generator's finaliser stops the thread
    gc.collect()
    t2.join(timeout=30)
    assert not t2.is_alive() and not (_prefetch_threads() - before)


def test_batches_sharded_over_device_mesh(cache_dir):
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    assert jax.device_count() == 8
    mesh = Mesh(np.array(jax.devices()), ("data",))
    st = ActivationStore(cache_dir, layer=0, batch_size=64, sharding=mesh, seed=3)
    ref = ActivationStore(cache_dir, layer=0, batch_size=64, as_numpy=True, seed=3)
    for x, y in zip(st, ref):
        assert isinstance(x.sharding, NamedSharding)
        assert x.sharding.spec == PartitionSpec(("data",), None)
        assert len(x.addressable_shards) == 8 and x.addressable_shards[0].data.shape == (8, D)
        np.testing.assert_array_equal(np.asarray(x), y)
    with pytest.raises(ValueError, match="batch_size=60: not divisible"):
        ActivationStore(cache_dir, layer=0, batch_size=60, sharding=mesh)


def test_moments_are_float64_and_exact(cache_dir):
    st = ActivationStore(cache_dir, layer=2)
    mom = st.moments(chunk_tokens=77)  # chunks straddle shard and chunk boundaries
    x = _rows(st).astype(np.float64)
    assert mom.mean.dtype == np.float64 and mom.second_moment.dtype == np.float64
    assert mom.count == len(x)
    np.testing.assert_allclose(mom.mean, x.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(mom.second_moment, x.T @ x / len(x), rtol=1e-12, atol=1e-12)
    part = st.moments(max_tokens=150)
    assert part.count == 150
    np.testing.assert_allclose(part.second_moment, x[:150].T @ x[:150] / 150, rtol=1e-12)


def test_store_moments_equal_atoms_second_moment(cache_dir):
    """``ActivationStore.moments`` and ``sae.atoms.second_moment`` /
    ``store_second_moment`` share one accumulator and agree on the same rows."""
    from sae import atoms as at

    st = ActivationStore(cache_dir, layer=0)
    mom = st.moments(chunk_tokens=53)
    for m in (at.second_moment(_rows(st)), at.store_second_moment(st, chunk_rows=200)):
        assert m.n == mom.count == st.n_tokens
        np.testing.assert_allclose(m.m2, mom.second_moment, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(m.mean, mom.mean, rtol=1e-12, atol=1e-12)
    part = st.moments(max_tokens=150)
    np.testing.assert_allclose(at.second_moment(_rows(st)[:150]).m2, part.second_moment,
                               rtol=1e-12, atol=1e-12)
    for bad in ({"max_tokens": 0}, {"chunk_tokens": 0}):
        with pytest.raises(ValueError, match=f"{next(iter(bad))}=0: expected a positive int"):
            st.moments(**bad)


def test_store_argument_errors(cache_dir):
    with pytest.raises(ValueError, match=r"layer=None: the cache holds layers \[0, 2\]"):
        ActivationStore(cache_dir)
    with pytest.raises(ValueError, match=r"layer=1: not in the cache, which holds \[0, 2\]"):
        ActivationStore(cache_dir, layer=1)
    with pytest.raises(ValueError, match="batch_size=0"):
        ActivationStore(cache_dir, layer=0, batch_size=0)
    with pytest.raises(FileNotFoundError, match="no such cache folder"):
        ActivationStore(cache_dir.parent / "nowhere", layer=0)


@pytest.fixture
def copy(cache_dir, tmp_path):
    dst = tmp_path / "cache"
    shutil.copytree(cache_dir, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    return dst, manifest


def _file(dst, manifest, shard, key):
    return dst / manifest["shards"][shard]["files"][key]["file"]


def test_corrupted_shard_detected_on_open(copy):
    dst, m = copy
    f = _file(dst, m, 3, "layer_002")
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit, size unchanged
    f.write_bytes(bytes(data))
    ActivationStore(dst, layer=2, verify="size")  # size-only check cannot see it …
    with pytest.raises(ValueError, match="shard 3: checksum mismatch in shard_000003.layer_002"):
        ActivationStore(dst, layer=2)  # … the default full check does


def test_truncated_shard_detected_on_open(copy):
    dst, m = copy
    f = _file(dst, m, 1, "token_ids")
    f.write_bytes(f.read_bytes()[:-4])
    for verify in ("size", "full"):
        with pytest.raises(ValueError, match="shard 1: file shard_000001.token_ids.npy .*truncated"):
            ActivationStore(dst, layer=0, verify=verify)


def test_missing_shard_detected_on_open(copy):
    dst, m = copy
    _file(dst, m, 0, "layer_000").unlink()
    with pytest.raises(FileNotFoundError, match="shard 0: missing file .*layer_000"):
        ActivationStore(dst, layer=2)


def test_manifest_mismatch_detected_on_open(copy):
    dst, m = copy
    m["d_model"] = D + 1
    (dst / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match=r"holds \(\d+, 32\) float32, manifest expects \(\d+, 33\)"):
        ActivationStore(dst, layer=0, verify="size")
    (dst / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="unreadable manifest.json"):
        ActivationStore(dst, layer=0)


def test_batch_stream_spans_epochs_and_skips_exactly(cache_dir):
    st = ActivationStore(cache_dir, layer=0, batch_size=100, seed=5, as_numpy=True)
    n = len(st)
    full = list(st.batches(num_batches=2 * n + 3))
    assert len(full) == 2 * n + 3
    np.testing.assert_array_equal(np.concatenate(full[:n]),
                                  np.concatenate(list(st.iter_epoch(0))))
    np.testing.assert_array_equal(np.concatenate(full[n:2 * n]),
                                  np.concatenate(list(st.iter_epoch(1))))
    for k in (1, n - 1, n + 2):  # skipping lands on exactly the same batch, across epochs
        stream = st.batches(num_batches=2 * n + 3)
        stream.skip(k)
        rest = list(stream)
        assert len(rest) == 2 * n + 3 - k
        np.testing.assert_array_equal(rest[0], full[k])


def test_store_plugs_into_sae_training(cache_dir):
    """The store's batch stream is accepted as-is by ``sae.train`` (any (B, d) iterator)."""
    import sae

    st = ActivationStore(cache_dir, layer=2, batch_size=64, seed=0)
    cfg = sae.TrainConfig(d_in=D, width=64, batch_size=64, total_steps=6, log_every=3,
                          scale_batches=2, progress=False)
    res = sae.train(st.batches(), cfg)
    assert res.params["W_dec"].shape == (64, D)
    assert np.isfinite(res.params["W_dec"]).all()


def test_batches_the_caller_keeps_are_never_overwritten(cache_dir):
    """A pooled buffer is reused only once no array refers to it: batches (or views of
    them) kept across a whole epoch still hold their rows afterwards, numpy or aliasing jax
    arrays alike, while the buffers of dropped batches are reused."""
    ref = list(ActivationStore(cache_dir, layer=2, batch_size=32, seed=9, as_numpy=True,
                               prefetch=0, reuse_buffers=False))
    ref = [r.copy() for r in ref]
    assert len(ref) >= 15
    for as_numpy, prefetch, reuse in itertools.product((True, False), (0, 2), (True, False)):
        st = ActivationStore(cache_dir, layer=2, batch_size=32, seed=9, as_numpy=as_numpy,
                             prefetch=prefetch, reuse_buffers=reuse)
        kept = {}
        for i, x in enumerate(st):  # keep every third batch (or a view of it), drop the rest
            if i % 3 == 0:
                kept[i] = x if i % 2 else x[:5]
            np.testing.assert_array_equal(np.asarray(x), ref[i])
        for i, x in kept.items():
            np.testing.assert_array_equal(np.asarray(x), ref[i][: len(x)])
        if reuse:  # slabs: the kept batches', plus the few in flight (prefetch queue, the
            # batch being consumed, jaxlib's deferred release of the one dropped before)
            assert st._pool.n_allocated <= len(kept) + prefetch + 3 < len(ref)
        else:
            assert st._pool is None
    with pytest.raises(TypeError, match="reuse_buffers=1: expected a bool"):
        ActivationStore(cache_dir, layer=2, reuse_buffers=1)


def test_pool_never_hands_out_a_buffer_a_jax_array_still_aliases(cache_dir):
    """The numpy buffer is dropped at once, only the aliasing jax array keeps it: its
    memory is not reused until that jax array is gone."""
    st = ActivationStore(cache_dir, layer=2, batch_size=32, seed=2)
    x0 = st._to_device(st._gather(next(iter(st._batch_plans(0)))))
    p0, want = x0.unsafe_buffer_pointer(), np.asarray(x0).copy()
    for plan in itertools.islice(st._batch_plans(1), 8):  # dropped right away
        y = st._to_device(st._gather(plan))
        assert y.unsafe_buffer_pointer() != p0
        del y
    np.testing.assert_array_equal(np.asarray(x0), want)
    n = st._pool.n_allocated
    del x0
    for plan in itertools.islice(st._batch_plans(2), 8):
        st._to_device(st._gather(plan))
    assert st._pool.n_allocated == n  # x0's slab (and the others) came back and are reused


def test_cpu_batches_are_synchronous_zero_copy_and_match_device_put(cache_dir):
    """On a CPU device the default is synchronous (no prefetch thread); the jax batches are
    what ``jax.device_put`` gives (values, committedness, sharding) and alias the
    64-byte-aligned gathered buffer (no second copy)."""
    cpu = jax.devices("cpu")[0]
    kw = {"layer": 2, "batch_size": 32, "seed": 3}
    assert ActivationStore(cache_dir, **kw).prefetch == 0
    assert ActivationStore(cache_dir, as_numpy=True, **kw).prefetch == 0
    assert ActivationStore(cache_dir, prefetch=2, **kw).prefetch == 2
    with pytest.raises(ValueError, match="prefetch=-1"):
        ActivationStore(cache_dir, prefetch=-1, **kw)
    ref = [x.copy() for x in ActivationStore(cache_dir, as_numpy=True, **kw)]
    for extra in ({}, {"device": cpu}, {"prefetch": 2}, {"device": cpu, "prefetch": 2}):
        st = ActivationStore(cache_dir, **kw, **extra)
        got = list(st)
        assert len(got) == len(ref)
        for x, r in zip(got, ref):
            assert isinstance(x, jax.Array) and x.dtype == r.dtype
            np.testing.assert_array_equal(np.asarray(x), r)
            want = jax.device_put(r, extra.get("device"))
            assert x.committed == want.committed and x.sharding == want.sharding
            assert np.asarray(x + 1).sum() == np.asarray(want + 1).sum()
    for extra in ({}, {"device": cpu}):
        st = ActivationStore(cache_dir, **kw, **extra)
        buf = st._gather(next(iter(st._batch_plans(0))))
        assert buf.ctypes.data % 64 == 0
        x = st._to_device(buf)
        assert x.unsafe_buffer_pointer() == buf.ctypes.data  # zero-copy alias
        np.testing.assert_array_equal(np.asarray(x), ref[0])
    # a cast to a dtype jax would change (float64 without x64) goes through device_put
    x64 = next(iter(ActivationStore(cache_dir, dtype=np.float64, **kw)))
    assert x64.dtype == jax.device_put(np.zeros(1)).dtype
