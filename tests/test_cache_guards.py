"""The activation cache never destroys or overwrites data without being asked.

Lost manifest (rebuilt from verified shard sidecars, else refused with nothing deleted),
leftover temporary files (only the library's own are removed), checksums re-verified on
resume (corrupted shard named, or re-cached with ``recache_corrupt=True``), and one writer
per folder (``cache.lock``; a second process fails at once; stale locks taken over; the
lock is released on exceptions and KeyboardInterrupt).
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_VERBOSITY"] = "error"

import chex
import numpy as np
import pytest
import torch
from _cache_worker import make_tiny_model, run_cache, synthetic_texts

from sae.activations import ActivationStore, cache_activations
from sae.cache import CacheLockedError

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("_cache_worker.py")
KW = {"layers": [0, 2], "context_length": 16, "batch_size": 4, "tokens_per_shard": 40,
      "progress": False}
TEXTS = list(synthetic_texts(24, seed=7))


@pytest.fixture(autouse=True)
def _one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("guards") / "gpt2"), "gpt2")


def _cache(model, out, texts=TEXTS, **kw):
    return cache_activations(model, texts, out, **{**KW, **kw})


def _shard_view(m):
    return [{k: s[k] for k in ("index", "n_tokens", "n_texts", "first_text", "text_chain",
                               "files")} for s in m["shards"]]


def _files(out):
    """name -> (inode, bytes): an atomic rewrite changes the inode."""
    return {p.name: (p.stat().st_ino, p.read_bytes()) for p in sorted(Path(out).iterdir())}


def _mkstemp_name(out, target):
    """The name sae._atomic's writer gives a temporary file of ``target`` (as a killed run
    leaves it)."""
    import tempfile

    fd, path = tempfile.mkstemp(dir=out, prefix=f".{target}.tmp-")
    os.write(fd, b"partial")
    os.close(fd)
    return Path(path).name


# ------------------------------------------------------------------------- 1. lost manifest
def test_lost_manifest_is_rebuilt_from_sidecars(model, tmp_path):
    out = tmp_path / "c"
    ref = _cache(model, out)
    assert ref["complete"] and len(ref["shards"]) >= 3
    (out / "manifest.json").unlink()
    before = _files(out)
    m = _cache(model, out)
    # the shards were adopted as they are (same inodes, same bytes), not deleted and redone
    after = _files(out)
    assert {k: v for k, v in after.items() if k != "manifest.json"} == before
    assert _shard_view(m) == _shard_view(ref) and m["complete"]
    assert m["n_tokens"] == ref["n_tokens"] and m["source"] == ref["source"]
    assert m["runs"][-1]["rebuilt_manifest_from_sidecars"] == len(ref["shards"])
    ActivationStore(out, layer=2, verify="full")  # the rebuilt manifest opens with full verification


def test_lost_manifest_unverifiable_refuses_and_deletes_nothing(model, tmp_path):
    out = tmp_path / "c"
    ref = _cache(model, out)
    (out / "manifest.json").unlink()
    f = out / ref["shards"][1]["files"]["layer_002"]["file"]
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 0xFF  # same size, other bytes
    f.write_bytes(bytes(raw))
    before = _files(out)
    with pytest.raises(ValueError, match=r"manifest.json is missing.*shard_000001\.json.*"
                                         r"checksum mismatch in shard_000001\.layer_002\.npy"
                                         r".*Nothing was deleted.*overwrite=True"):
        _cache(model, out)
    assert _files(out) == before
    # a shard without sidecar (e.g. written by an older version) is refused the same way
    (out / "shard_000001.json").unlink()
    before = _files(out)
    with pytest.raises(ValueError, match=r"shard 1 has no sidecar shard_000001\.json"):
        _cache(model, out)
    assert _files(out) == before
    # asked explicitly: start over
    m = _cache(model, out, overwrite=True)
    assert _shard_view(m) == _shard_view(ref) and len(m["runs"]) == 1


def test_verified_shard_beyond_manifest_is_adopted(model, tmp_path):
    """Killed between a shard's sidecar and the manifest commit: the shard is kept."""
    out = tmp_path / "c"
    ref = _cache(model, out)
    old = json.loads((out / "manifest.json").read_text())
    last = old["shards"].pop()
    old["n_tokens"] -= last["n_tokens"]
    old["source"].update(texts_consumed=last["first_text"],
                         text_chain=old["shards"][-1]["text_chain"])
    old["complete"] = False
    (out / "manifest.json").write_text(json.dumps(old))
    before = _files(out)
    m = _cache(model, out)
    assert {k: v for k, v in _files(out).items() if k != "manifest.json"} == \
        {k: v for k, v in before.items() if k != "manifest.json"}
    assert _shard_view(m) == _shard_view(ref)
    assert m["runs"][-1]["adopted_shards_from_sidecars"] == 1


# --------------------------------------------------------------------- 2. leftover temp files
def test_own_temp_files_are_cleaned_and_nothing_else(model, tmp_path):
    out = tmp_path / "c"
    part = _cache(model, out, max_texts=8)
    assert not part["complete"]
    n = len(part["shards"])
    mine = [_mkstemp_name(out, "manifest.json"),
            _mkstemp_name(out, f"shard_{n:06d}.layer_000.npy"),
            _mkstemp_name(out, f"shard_{n:06d}.json")]
    theirs = [".notes.txt.tmp-abcdefgh", "manifest.json.bak", ".shard_000000.json.tmp-x"]
    for name in theirs:
        (out / name).write_text("not the cache's")
    m = _cache(model, out)
    assert m["complete"]
    names = {p.name for p in out.iterdir()}
    assert not set(mine) & names and set(theirs) <= names
    for name in theirs:
        assert (out / name).read_text() == "not the cache's"


def test_temp_manifest_alone_does_not_block_a_fresh_cache(model, tmp_path):
    out = tmp_path / "c"
    out.mkdir()
    tmp = _mkstemp_name(out, "manifest.json")
    m = _cache(model, out)
    assert m["complete"] and not (out / tmp).exists()


# Temporary names of earlier releases: sae.io's writer (mkstemp prefix ".tmp-", suffix the
# target) and sae.store's (".<target>.tmp-<pid>"). A folder left by an older version must
# resume, and its leftovers be cleaned, like the current writer's.
LEGACY_MANIFEST_TEMPS = [".tmp-k2j3h4_9manifest.json", ".manifest.json.tmp-17599"]


@pytest.mark.parametrize("name", LEGACY_MANIFEST_TEMPS)
def test_legacy_temp_manifest_does_not_block_a_fresh_cache(model, tmp_path, name):
    out = tmp_path / "c"
    out.mkdir()
    (out / name).write_bytes(b'{"partial')
    m = _cache(model, out)
    assert m["complete"] and not (out / name).exists()


@pytest.mark.parametrize("name", LEGACY_MANIFEST_TEMPS
                         + [".shard_000001.layer_000.npy.tmp-17599"])
def test_legacy_temp_files_are_cleaned_on_resume(model, tmp_path, name):
    out = tmp_path / "c"
    assert not _cache(model, out, max_texts=8)["complete"]
    (out / name).write_bytes(b"partial")
    (out / ".tmp-k2j3h4_9notes.txt").write_text("not the cache's")
    m = _cache(model, out)
    assert m["complete"] and not (out / name).exists()
    assert (out / ".tmp-k2j3h4_9notes.txt").read_text() == "not the cache's"


def test_disk_full_during_shard_write_leaves_no_temp_and_resumes(model, tmp_path,
                                                                 monkeypatch):
    import errno

    import sae._atomic as atomic

    out = tmp_path / "c"
    ref = _cache(model, tmp_path / "ref")
    real = np.lib.format.write_array
    calls = {"n": 0}

    def write_array(fp, arr, **kw):  # the 12th shard file: half written, then ENOSPC
        calls["n"] += 1
        if calls["n"] == 12:
            fp.write(b"\x93NUMPY partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fp, arr, **kw)

    monkeypatch.setattr(atomic.np.lib.format, "write_array", write_array)
    with pytest.raises(OSError, match="No space left"):
        _cache(model, out)
    monkeypatch.undo()
    names = {p.name for p in out.iterdir()}
    assert not [n for n in names if ".tmp-" in n] and "cache.lock" not in names
    m = _cache(model, out)
    assert _shard_view(m) == _shard_view(ref) and len(m["runs"]) == 2


# ------------------------------------------------------------------ 3. checksums on resume
def test_corrupted_shard_is_named_on_resume_and_recached_on_request(model, tmp_path):
    out = tmp_path / "c"
    ref = _cache(model, out)
    info = ref["shards"][1]["files"]["layer_000"]
    f = out / info["file"]
    good = f.read_bytes()
    bad = bytearray(good)
    bad[200] ^= 0x01  # one bit inside the data, size unchanged
    f.write_bytes(bytes(bad))
    with pytest.raises(ValueError, match=r"1 committed shard\(s\) fail verification.*"
                                         r"checksum mismatch in shard_000001\.layer_000\.npy"
                                         r".*recache_corrupt=True"):
        _cache(model, out)
    assert f.read_bytes() == bytes(bad)  # refused, not touched
    m = _cache(model, out, recache_corrupt=True)
    assert m["runs"][-1]["recached_shards"] == [1]
    assert f.read_bytes() == good  # deterministic on CPU: the same bytes again
    assert _shard_view(m) == _shard_view(ref)
    a = ActivationStore(out, layer=0, verify="full", as_numpy=True).activations(1)
    b = np.load(tmp_path / "c" / info["file"])
    chex.assert_trees_all_close({"x": np.asarray(a)}, {"x": b}, rtol=0, atol=0)
    # a truncated file is named too
    f.write_bytes(good[:-4])
    with pytest.raises(ValueError, match=r"shard_000001\.layer_000\.npy has .* bytes.*truncated"):
        _cache(model, out)


# --------------------------------------------------------------------------- 4. two writers
def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
               OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _committed(out):
    try:
        return len(json.loads((out / "manifest.json").read_text())["shards"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def test_second_writer_fails_at_once_and_stale_lock_is_taken_over(model, tmp_path):
    out = tmp_path / "c"
    n_texts = 40
    worker = subprocess.Popen([sys.executable, str(WORKER), model, str(out), str(n_texts),
                               "0.2"], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while not (out / "cache.lock").exists():
            assert worker.poll() is None, f"worker ended early: {worker.communicate()}"
            assert time.monotonic() < deadline, "worker took no lock in 90 s"
            time.sleep(0.02)
        holder = json.loads((out / "cache.lock").read_text())
        assert holder["pid"] == worker.pid and {"hostname", "started"} <= set(holder)
        t = time.monotonic()
        with pytest.raises(CacheLockedError, match=rf"out_dir='{out}': another writer holds "
                                                   rf"cache.lock \(pid {worker.pid} on host"):
            run_cache(model, str(out), n_texts)
        assert time.monotonic() - t < 10  # at once (no model run, no waiting)
        while not _committed(out):  # let it commit a shard, then kill it
            assert worker.poll() is None, f"worker ended early: {worker.communicate()}"
            assert time.monotonic() < deadline, "worker committed no shard in 90 s"
            time.sleep(0.02)
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    assert (out / "cache.lock").exists()  # SIGKILL leaves the lock: stale (pid dead, same host)
    m = run_cache(model, str(out), n_texts)
    assert m["complete"] and not (out / "cache.lock").exists()
    assert len(m["runs"]) == 2 and m["runs"][1]["start_shard"] >= 1  # continued its cache


def test_lock_released_on_exception_and_keyboard_interrupt(model, tmp_path):
    out = tmp_path / "c"

    def texts(exc):
        yield from TEXTS[:9]
        raise exc

    with pytest.raises(KeyboardInterrupt):
        _cache(model, out, texts=texts(KeyboardInterrupt()))
    assert not (out / "cache.lock").exists()
    with pytest.raises(TypeError, match="texts: element 9 is int"):
        _cache(model, out, texts=(t for t in TEXTS[:9] + [3]))
    assert not (out / "cache.lock").exists()
    # a refused run (bad folder) takes the lock and leaves neither lock nor folder behind
    with pytest.raises(ValueError, match="verify='fast': expected 'full' or 'size'"):
        _cache(model, tmp_path / "new", verify="fast")
    assert not (tmp_path / "new").exists()
    m = _cache(model, out, texts=(t for t in TEXTS))
    assert m["complete"] and not (out / "cache.lock").exists()


def test_live_lock_of_this_process_refuses(model, tmp_path):
    """A lock naming a live pid (here: this test process) is never taken over."""
    out = tmp_path / "c"
    out.mkdir()
    lock = {"pid": os.getpid(), "hostname": __import__("socket").gethostname(),
            "started": "2026-01-01T00:00:00+00:00"}
    (out / "cache.lock").write_text(json.dumps(lock))
    with pytest.raises(CacheLockedError, match=rf"pid {os.getpid()}.*delete '{out}/cache.lock'"):
        _cache(model, out)
    assert json.loads((out / "cache.lock").read_text()) == lock
