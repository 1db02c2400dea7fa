"""experiments.atoms.scaling: the |M| × |D| grid reports in-sample and held-out R² and
compiles the train step once per |D| across every |M|."""
import numpy as np
import pytest

from sae import atoms as at


def test_scaling_grid_one_step_compile_per_D(tmp_path):
    from experiments.atoms import scaling

    rng = np.random.default_rng(0)
    D = rng.standard_normal((48, 8))
    x = ((rng.random((1500, 48)) * (rng.random((1500, 48)) < 0.08)) @ D).astype(np.float32)
    x += 0.01 * rng.standard_normal(x.shape).astype(np.float32)
    res = scaling.run_scaling(x, M_sizes=[64, 400, 1000, 5000], D_mults=[1, 4],
                              variant="tied", lam=0.3, steps=20, batch_size=32, n_r2=200,
                              log=lambda m: None)
    assert res["M"] == [64, 400, 1000]  # 5000 > the 1200 train rows: dropped
    assert np.shape(res["r2"]) == np.shape(res["r2_train"]) == (3, 2)
    for rec in res["compiles"]:
        assert rec["train_step_compiles"] == 1, rec  # one jitted step per |D|, all |M|
    # once a |D|'s first cell has compiled, its other |M| cells compile nothing at all
    # (train step, init and export are cached by config; data shapes seen at the first |D|)
    assert np.all(np.asarray(res["backend_compiles"])[1:, 1:] == 0), res["backend_compiles"]
    # the in-sample R² is the R² on the cell's own first rows: recompute one cell directly
    xt = x[:64]
    aip = at.aip_from_moment(at.second_moment(xt), ridge=1e-6)
    r = scaling.r2_cell(xt, x[1200:], aip, 32, variant="tied", lam=0.3, steps=20,
                        batch_size=32, n_r2=200)
    assert r["r2_train"] == pytest.approx(res["r2_train"][0][1], rel=1e-5)
    assert r["r2"] == pytest.approx(res["r2"][0][1], rel=1e-5)
    assert np.all(np.asarray(res["steps_run"]) == 20)
    scaling.plot(res, tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 0
