"""sae.io: Gemma Scope npz and SAELens round trips on generated files; atomic writes."""
import json
import os

import numpy as np
import pytest

from sae import io


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
