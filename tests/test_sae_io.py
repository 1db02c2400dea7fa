"""sae.io: Gemma Scope npz and SAELens round trips on generated files; the atomic writer
(sae._atomic) that every file write of sae and experiments goes through."""
import json
import os
import pickle

import numpy as np
import pytest

from sae import _atomic, io


def _params(d=6, m=10, seed=0):
    r = np.random.default_rng(seed)
    return {"W_enc": r.normal(size=(d, m)).astype(np.float32),
            "W_dec": r.normal(size=(m, d)).astype(np.float32),
            "b_enc": r.normal(size=m).astype(np.float32),
            "b_dec": r.normal(size=d).astype(np.float32),
            "threshold": r.uniform(0.01, 0.1, size=m).astype(np.float32)}


def test_gemmascope_round_trip(tmp_path):
    p = _params()
    path = str(tmp_path / "params.npz")
    io.save_gemmascope(path, p)
    q = io.load_gemmascope(path)
    assert set(q) == set(p)
    for k in p:
        np.testing.assert_array_equal(q[k], p[k])
    assert os.listdir(tmp_path) == ["params.npz"]  # no temporary left behind


def test_saelens_round_trip(tmp_path):
    p = _params(seed=1)
    folder = str(tmp_path / "sae")
    io.save_saelens(folder, p, apply_b_dec_to_input=False, extra_cfg={"hook_name": "x"})
    q, cfg = io.load_saelens(folder)
    for k in p:
        np.testing.assert_array_equal(q[k], p[k])
    assert cfg["d_in"] == 6 and cfg["d_sae"] == 10 and cfg["architecture"] == "jumprelu"
    assert cfg["apply_b_dec_to_input"] is False and cfg["hook_name"] == "x"
    assert sorted(os.listdir(folder)) == ["cfg.json", "sae_weights.safetensors"]


def test_saelens_log_threshold_and_mismatch(tmp_path):
    from safetensors.numpy import save_file

    p = _params(seed=2)
    folder = tmp_path / "old"
    folder.mkdir()
    w = {k: v for k, v in p.items() if k != "threshold"}
    w["log_threshold"] = np.log(p["threshold"])
    save_file(w, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"d_in": 6, "d_sae": 10}))
    q, _ = io.load_saelens(str(folder))
    np.testing.assert_allclose(q["threshold"], p["threshold"], rtol=1e-6)
    (folder / "cfg.json").write_text(json.dumps({"d_in": 7, "d_sae": 10}))
    with pytest.raises(ValueError, match="d_in=7"):
        io.load_saelens(str(folder))


def test_bad_params_rejected_before_writing(tmp_path):
    p = _params()
    p["W_dec"] = p["W_dec"][:, :5]
    path = tmp_path / "params.npz"
    with pytest.raises(ValueError, match="W_dec"):
        io.save_gemmascope(str(path), p)
    assert not path.exists() and os.listdir(tmp_path) == []


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = str(tmp_path / "params.npz")
    io.save_gemmascope(path, _params(seed=3))
    before = open(path, "rb").read()

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        io.save_gemmascope(path, _params(seed=4))
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["params.npz"]


# ---------------------------------------------------------------- the one atomic writer
class _ExplodingPayload:
    """Pickles as 1 MiB of bytes followed by an object whose serialisation raises; checks
    on the way that part of it already reached the temporary file."""

    def __init__(self, folder, exc):
        self.folder, self.exc = folder, exc

    def __reduce__(self):
        tmp = [p for p in os.listdir(self.folder) if _atomic.is_temp_name(p)]
        assert len(tmp) == 1 and os.path.getsize(os.path.join(self.folder, tmp[0])) > 0
        raise self.exc


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
@pytest.mark.parametrize("existing", [False, True])
def test_failed_write_leaves_no_temp_file_and_keeps_the_target(tmp_path, exc, existing):
    target = tmp_path / "out.pkl"
    if existing:
        _atomic.atomic_write_bytes(target, b"old content")
    with pytest.raises(type(exc)):
        with _atomic.atomic_writer(target) as fh:
            pickle.dump([b"x" * (1 << 20), _ExplodingPayload(tmp_path, exc)], fh, protocol=4)
    assert os.listdir(tmp_path) == (["out.pkl"] if existing else [])
    if existing:
        assert target.read_bytes() == b"old content"


def test_failed_npy_and_npz_writes_leave_nothing(tmp_path, monkeypatch):
    target = tmp_path / "a.npy"
    _atomic.atomic_save_npy(target, np.arange(3))
    before = target.read_bytes()

    def fail(fd):
        raise OSError("fsync failed")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="fsync failed"):
        _atomic.atomic_save_npy(target, np.arange(10**6))
    with pytest.raises(OSError, match="fsync failed"):
        _atomic.atomic_savez(tmp_path / "b.npz", x=np.arange(5))
    assert sorted(os.listdir(tmp_path)) == ["a.npy"] and target.read_bytes() == before
    with pytest.raises(ValueError, match="Object arrays cannot be saved"):
        _atomic.atomic_save_npy(target, np.array([{}], dtype=object))
    assert sorted(os.listdir(tmp_path)) == ["a.npy"]


def test_atomic_writes_round_trip_and_hash(tmp_path):
    import hashlib

    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    info = _atomic.atomic_save_npy(tmp_path / "sub" / "x.npy", x)  # folder created
    data = (tmp_path / "sub" / "x.npy").read_bytes()
    assert info == {"file": "x.npy", "sha256": hashlib.sha256(data).hexdigest(),
                    "bytes": len(data)}
    np.testing.assert_array_equal(np.load(tmp_path / "sub" / "x.npy"), x)
    assert _atomic.atomic_savez(tmp_path / "z.npz", a=x) == str(tmp_path / "z.npz")
    with np.load(tmp_path / "z.npz") as z:
        np.testing.assert_array_equal(z["a"], x)
    assert sorted(os.listdir(tmp_path)) == ["sub", "z.npz"]
    with pytest.raises(TypeError, match="data=str: expected bytes"):
        _atomic.atomic_write_bytes(tmp_path / "t.txt", "text")
    assert not _atomic.is_temp_name("x.npy") and _atomic.is_temp_name(".x.npy.tmp-ab_1z")


def test_every_writer_is_the_one_atomic_writer(tmp_path, monkeypatch):
    """sae.io, sae.store, sae.cache and experiments.common write through sae._atomic."""
    from experiments import common
    from sae import cache, store

    assert io.atomic_write_bytes is _atomic.atomic_write_bytes
    assert store.atomic_write_bytes is _atomic.atomic_write_bytes
    assert store.atomic_save_npy is cache.atomic_save_npy is _atomic.atomic_save_npy
    calls = []
    real = _atomic.atomic_write_bytes
    monkeypatch.setattr(_atomic, "atomic_write_bytes",
                        lambda path, data, **kw: calls.append(path) or real(path, data, **kw))
    common.save_json(tmp_path / "a.json", {"x": np.arange(2)})
    common.atomic_savez(tmp_path / "b.npz", x=np.arange(2))
    assert [os.path.basename(p) for p in calls] == ["a.json", "b.npz"]
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": [0, 1]}
