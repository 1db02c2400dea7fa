"""The SubGM figure scripts at a tiny size: real properties of their outputs, files written."""
import json

import jax.numpy as jnp
import numpy as np
import pytest

import jaxsense as js
from experiments.subgm import all as subgm_all
from experiments.subgm import base, fig1a, fig6
from experiments.subgm import settings as S


def test_zero_padded_alg2_runs_the_smaller_problem_exactly(x64):
    """fig1a batches r' ∈ {3, …, 20} by zero-padding U to 20 columns; that must be exact."""
    op, truth, k_noise, _ = base.seed_instance(0)
    y = base.measurements(op, truth, k_noise, p=0.1)
    U3 = js.spectral_sign_init(op, y, 3, 1e-3)
    U3p = base.alg2(op, y, 3, 1e-3, pad_to=20)
    assert U3p.shape == (S.D, 20) and np.all(np.asarray(U3p[:, 3:]) == 0)
    np.testing.assert_allclose(np.asarray(U3p[:, :3]), np.asarray(U3), rtol=0, atol=0)
    solver = js.subgm(js.geometric(S.ETA, S.RHO))
    a = js.run(solver, U3, op, y, truth, num_steps=200, record_every=200, metrics=("fro_error",))
    b = js.run(solver, U3p, op, y, truth, num_steps=200, record_every=200, metrics=("fro_error",))
    assert np.all(np.asarray(b.state.U[:, 3:]) == 0)
    Xa = np.asarray(a.state.U @ a.state.U.T)
    Xb = np.asarray(b.state.U @ b.state.U.T)
    np.testing.assert_allclose(Xb, Xa, atol=1e-10 * np.abs(Xa).max())


def test_fig1a_compute_shapes_and_decrease(x64):
    seeds, steps = 2, 400
    data = fig1a.compute(seeds=seeds, steps=steps)
    n = steps // base.record_every(steps)
    curves = np.asarray(data["curves"])
    assert curves.shape == (4, seeds, n)
    assert np.asarray(data["final"]).shape == (4, seeds)
    assert np.all(np.isfinite(curves))
    assert curves.dtype == np.float64
    # SubGM from α=1e-15 starts at ‖X*‖_F and has dropped by ≥ 10× after 400 iterations
    np.testing.assert_allclose(curves[:, :, 0], float(jnp.linalg.norm(jnp.asarray(S.SPECTRUM))), rtol=1e-6)
    assert np.all(np.asarray(data["final"]) < 0.1 * curves[:, :, 0])
    rows = fig1a.claims(data)
    assert rows and {"fig", "claim", "measured", "verdict"} <= set(rows[0])


def test_fig6_main_writes_files_and_learns_larger_eigenvalues_first(tmp_path):
    data = fig6.main(["--seeds", "5", "--steps", "600", "--out", str(tmp_path)])
    png, js_path = tmp_path / "fig6.png", tmp_path / "fig6.json"
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    loaded = json.loads(js_path.read_text())
    assert loaded["settings"]["seeds"] == [0, 1, 2, 3, 4]
    assert loaded["settings"]["dtype"] == "float64"
    eigs = np.asarray(loaded["eigs"])
    assert eigs.shape == (5, len(loaded["iterations"]), S.R)
    np.testing.assert_allclose(eigs, np.asarray(data["eigs"]), rtol=1e-12)
    # incremental learning: every seed learns σ1 = 10, then 5, then 1, all within 600 steps
    for ts in loaded["t_learned"]:
        assert all(t is not None for t in ts) and ts[0] < ts[1] < ts[2]
    np.testing.assert_allclose(eigs[:, -1], np.broadcast_to(S.SPECTRUM, (5, S.R)), rtol=1e-3)
    err = np.asarray(loaded["fro_error"])
    assert np.all(err[:, -1] < 1e-2 * err[:, 0])
    # claims rows → claims.md
    rows = fig6.claims(data)
    assert rows[0]["verdict"] == "supported"
    path = subgm_all.write_claims(rows, {"fig6": data["wall_s"]}, tmp_path / "claims.md", data["wall_s"], 5)
    text = path.read_text()
    assert "| 6 | incremental learning" in text and "supported" in text


def test_fig1c_per_alpha_schedule_is_tuned_on_held_out_seeds(x64):
    """ρ per α = argmin over the grid of the worst held-out final error; both schedules run
    on the same problems and inits (where they pick the same ρ, the curves coincide)."""
    from experiments.subgm import fig1c

    grid = (0.95, S.RHO)
    data = fig1c.compute(seeds=1, steps=300, tune_seeds=2, rho_grid=grid)
    t = data["tuning"]
    assert t["seeds"] == [1000, 1001]  # never the figure's seed 0
    table = np.asarray(t["table"])  # (α, grid, tune seeds)
    assert table.shape == (4, 2, 2)
    want = [grid[i] for i in np.argmin(table.max(-1), axis=1)]
    assert t["rho"] == want
    # at T = 300 the fast decay (budget η/(1−ρ) = 4) leaves small α unlearned: ρ = 0.996 wins
    assert t["rho"][1:] == [S.RHO] * 3
    fixed, per = data["schedules"]["fixed"], data["schedules"]["per_alpha"]
    assert fixed["rho"] == [S.RHO] * 4
    for i, r in enumerate(per["rho"]):
        if r == S.RHO:
            np.testing.assert_array_equal(per["curves"][i], fixed["curves"][i])
        else:
            assert not np.allclose(per["curves"][i], fixed["curves"][i])
    rows = fig1c.claims(data)
    assert [r["fig"] for r in rows] == ["1c"] * 3
    assert "per-α" in rows[0]["claim"] and f"fixed ρ = {S.RHO}: slope" in rows[0]["measured"]
    with pytest.raises(ValueError, match=r"rhos=\[0.9\]: expected 2 values"):
        fig1c.alpha_sweep(1, 10, [1.0, 1e-3], rhos=[0.9])
