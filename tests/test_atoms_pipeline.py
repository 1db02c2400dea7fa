"""Atoms pipeline end to end on a tiny random-weight model, the trained-SAE planted check,
and the empty-store error."""
import json
import os
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))

from sae import atoms as at


@pytest.fixture(autouse=True)
def _one_torch_thread():
    torch = pytest.importorskip("torch")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_pipeline_tiny_model_end_to_end(tmp_path):
    from _cache_worker import make_tiny_model, synthetic_texts

    from experiments.atoms.pipeline import AtomsConfig, run_pipeline

    model = make_tiny_model(str(tmp_path / "llama"), "llama", n_layers=2)
    cfg = AtomsConfig(model=model, layers=None, texts=list(synthetic_texts(200, seed=1)),
                      max_tokens=1200, context_length=64, width_mult=2, lams=(0.3, 1.0),
                      steps=30, batch_size=64, n_pairs=400, n_bp=16, bp_iter=50,
                      n_supports=16, max_eval=256, splice_texts=4)
    res = run_pipeline(cfg, str(tmp_path / "out"), log=lambda m: None, command="test")
    assert [L["layer"] for L in res["layers"]] == [0, 1]  # every layer
    for L in res["layers"]:
        assert set(L["rows"]) == {"neurons", "features", "atoms_whitened", "atoms_tied"}
        assert L["rows"]["neurons"]["r2"] == pytest.approx(1.0)
        assert L["rows"]["features"]["N"] == 64 and L["rows"]["features"]["H"] == 32
        assert len(L["sweeps"]["features"]["members"]) == 2
        for r in L["rows"].values():
            # q* = sup{q : μ_q < 1/(2K_q − 1)} over an interval [0, q*] and the grid holds
            # q = 0.5, where μ_q is the row's median coherence and K_q its K (k_quantile = 0.5):
            # so q* ≥ 0.5 exactly when the median atom passes the uniqueness bound
            median_ok = r["mu_median"] < 1.0 / (2.0 * max(r["K"], 1.0) - 1.0)
            assert (r["q_star"] >= 0.5) == median_ok, r
            assert np.isfinite(r["r2"])
        assert "l1_exact_support" in L["rows"]["atoms_tied"]
        # spliced-model columns: identity for neurons; the features SAE's CE recovered equals
        # sae.evals.splice_eval of the saved SAE on the same held-out texts
        assert L["rows"]["neurons"]["ce_loss_recovered"] == 1.0
        for n in ("features", "atoms_whitened", "atoms_tied"):
            assert np.isfinite(L["rows"][n]["ce_loss_recovered"]) and L["rows"][n]["kl_div"] >= 0
        from sae import evals, models

        m, tok = models.load(model)
        p = dict(np.load(tmp_path / "out" / f"sae_features_layer{L['layer']}.npz"))
        texts = list(synthetic_texts(200, seed=1))
        first = res["layers"][0]["rows"]["features"]["splice_tokens"]
        assert first > 0
        import json as _json

        consumed = _json.load(open(tmp_path / "out" / "cache" / "manifest.json"))["source"][
            "texts_consumed"]
        direct = evals.splice_eval(m, tok, texts[consumed:consumed + 4], L["layer"], p,
                                   context_length=64, progress=False)
        assert L["rows"]["features"]["ce_loss_recovered"] == pytest.approx(
            direct["ce_loss_recovered"], rel=1e-5, abs=1e-6)
    from experiments.atoms.pipeline import _select
    from sae.model import encode

    for L in res["layers"]:
        # three splits: λ chosen on the select rows, the table on the report rows
        for v, sw in L["sweeps"].items():
            assert sw["selected"] == _select(sw["members"], cfg.select_r2)
            m = sw["members"][sw["selected"]]
            assert L["rows"][v]["r2_select"] == m["r2"]
            assert L["rows"][v]["r2_eval"] == L["rows"][v]["r2"]
            assert L["rows"][v]["r2_eval"] == pytest.approx(m["r2_eval"], abs=1e-6)
            assert L["training"][v]["steps"] == 30 and L["training"][v]["stop"] == "total_steps"
        # r2_train is the in-sample R² of the saved features SAE on the first training rows
        from experiments.atoms.pipeline import layer_data, split_rows

        x = layer_data(str(tmp_path / "out" / "cache"), L["layer"], cfg.max_tokens)
        tr, sel, rep = split_rows(x.shape[0], cfg.eval_frac, cfg.select_frac)
        assert (L["n_train"], L["n_select"], L["n_eval"]) == (
            tr.stop, min(sel.stop - sel.start, cfg.max_eval), min(rep.stop - rep.start,
                                                                  cfg.max_eval))
        assert L["n_select"] > 0 and tr.stop + (sel.stop - sel.start) < x.shape[0]
        xt = x[tr][: cfg.max_eval]
        p = {k: jax.numpy.asarray(v) for k, v in
             np.load(tmp_path / "out" / f"sae_features_layer{L['layer']}.npz").items()}
        xh = np.asarray(encode(p, xt)) @ np.asarray(p["W_dec"]) + np.asarray(p["b_dec"])
        assert L["rows"]["features"]["r2_train"] == pytest.approx(float(at.r2(xt, xh)),
                                                                  abs=1e-4)
        assert L["rows"]["neurons"]["r2_train"] == 1.0
        # the readings: v1 at the median K is the table's uniqueness column, v2 is q*
        for r in L["rows"].values():
            ex = r["readings"]["exact"]
            assert ex["v1"]["q0.5"] == r["uniqueness_atoms"] and ex["q_star"] == r["q_star"]
            assert "rel0.01" in r["readings"]
    assert "## Uniqueness readings" in (tmp_path / "out" / "table.md").read_text()
    j = json.loads((tmp_path / "out" / "table.json").read_text())
    assert j["git"]["commit"] is None or len(j["git"]["commit"]) == 40
    for f in ("table.md", "table.json", "angles.png", "units_per_layer.png", "loss_curves.png"):
        assert (tmp_path / "out" / f).stat().st_size > 0
    j = json.loads((tmp_path / "out" / "table.json").read_text())
    assert set(j["average"]) == {"neurons", "features", "atoms_whitened", "atoms_tied"}
    assert "| avg | atoms_tied |" in (tmp_path / "out" / "table.md").read_text()


def test_split_rows():
    from experiments.atoms.pipeline import split_rows

    tr, sel, rep = split_rows(100, 0.2, 0.1)
    assert (tr, sel, rep) == (slice(0, 70), slice(70, 80), slice(80, 100))
    with pytest.raises(ValueError, match="select_frac"):
        split_rows(100, 0.2, 0.0)
    with pytest.raises(ValueError, match="n=5 rows"):
        split_rows(5, 0.2, 0.1)


def test_trained_tied_sae_recovers_planted_supports():
    """The AIP-tied SAE (``arch="tied"`` on whitened inputs), trained by ``sae.train`` with
    the Anthropic recipe at lr 3e-3 on planted Dirac–Hadamard data (μ = 1/8, K = 3), finds
    the atoms and the supports. Measured with this exact run (init seed 0): atoms_found
    0.992, support_recovery 0.970, R² 0.980. Over init seeds 0–8 (``TrainConfig.seed``, same
    data) the worst seed reached atoms_found 0.977, support_recovery 0.932, R² 0.970. A
    different float reduction order (another BLAS / XLA version) should perturb training no
    more than a new init does, so each threshold sits just below that worst seed: 0.015 /
    0.04 / 0.02 under this run. (Other planted draws vary more: key 2 gave support 0.911.)"""
    import sae

    x, D, codes = at.planted_data(jax.random.key(0), H=64, N=128, K=3, n=4096,
                                  delta_range=(0.7, 1.0))
    aip = at.aip_from_moment(at.second_moment(x))
    cfg = sae.TrainConfig(d_in=64, width=128, arch="tied", recipe="anthropic", lr=3e-3,
                          lam=0.3, total_steps=1500, batch_size=256, steps_per_call=50,
                          progress=False)
    res = sae.train(np.asarray(at.whiten(x, aip)), cfg)
    u = at.sae_units(res.params, x, lambda p, z: res.encode(z), aip=aip, whitened=True)
    rec = at.planted_support_recovery(D, u["D"].T, codes, u["codes"])
    assert rec["atoms_found"] >= 0.97
    assert rec["support_recovery"] >= 0.93
    assert at.r2(x, u["x_hat"]) > 0.96


def test_match_atoms_exact():
    _, D, codes = at.planted_data(jax.random.key(1), H=16, N=32, K=2, n=64)
    perm = np.random.default_rng(0).permutation(32)
    W_dec = 2.0 * D.T[perm]  # learned = permuted, rescaled atoms
    m = at.match_atoms(D, W_dec)
    np.testing.assert_array_equal(perm[m["index"]], np.arange(32))
    learned = codes[:, perm] / 2.0
    assert at.planted_support_recovery(D, W_dec, codes, learned)["support_recovery"] == 1.0


def test_empty_store_errors(tmp_path):
    class Empty:
        n_tokens = 0
        layer = 0

    with pytest.raises(ValueError, match="empty store"):
        at.store_second_moment(Empty())
