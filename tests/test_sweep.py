"""jaxsense.sweep: sharded over 8 devices == 1 device; padded r' == unpadded run; bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsense as js
from jaxsense.sweep import sweep

SMALL = {"d": 8, "r": 2, "m": 160, "spectrum": (2.0, 1.0), "num_steps": 600, "record_every": 50}




def test_eight_devices_equal_one_device(x64):
    grid = {"p": [0.0, 0.3], "r_search": [2, 8], "seed": [0, 1, 2], "rho": 0.995}  # 12 -> pad 16
    many = sweep(grid, **SMALL)
    one = sweep(grid, devices=jax.devices()[:1], **SMALL)
    assert many.n_devices == 8 and one.n_devices == 1
    assert len(many.state.U.sharding.device_set) == 8
    assert many.state.U.shape[0] == 16 and one.state.U.shape[0] == 12  # padded to 8·2
    assert many.history["rel_fro_error"].shape == (12, 12)
    # 2 vs 12 instances per device: XLA vectorises the small per-instance reductions of the
    # norm's Rayleigh–Ritz step differently, a 1e-16 difference that residual sign flips
    # amplify to 2.5e-9 over 600 steps (measured, float64 and float32 filter alike).
    np.testing.assert_allclose(many.history["rel_fro_error"], one.history["rel_fro_error"],
                               rtol=1e-7, atol=0)
    np.testing.assert_allclose(many.final["rel_fro_error"], one.final["rel_fro_error"], rtol=1e-7)
    # and the sweep did its job: clean instances recover X*, seeds differ
    grid_err = many.as_grid("rel_fro_error")  # (p, r', seed)
    assert grid_err.shape == (2, 2, 3)
    assert np.all(grid_err[0] < 0.05), grid_err  # from 1.0 at t = 0
    assert len(np.unique(np.round(grid_err[0, 0], 12))) == 3


def test_padded_instance_equals_its_own_run(x64):
    """An r'=2 instance padded to r'_max=8 follows the r'_max=2 run exactly; instances match
    independent single runs (per-instance η, shared operator, same problem)."""
    key = jax.random.PRNGKey(3)
    base = {"p": [0.0, 0.3], "eta": [0.1, 0.2], "seed": 1, "rho": 0.995}
    res = sweep({**base, "r_search": [2, 8]}, key=key, metrics=("rel_fro_error", "step"), **SMALL)
    narrow = sweep({**base, "r_search": [2, 2]}, key=key, metrics=("rel_fro_error", "step"),
                   **SMALL)
    sel = res.params["r_search"] == 2
    np.testing.assert_allclose(res.history["rel_fro_error"][sel],
                               narrow.history["rel_fro_error"][sel], rtol=1e-12)
    np.testing.assert_allclose(res.history["step"][sel], narrow.history["step"][sel], rtol=1e-12)
    U = np.asarray(res.state.U)[: len(sel)]
    assert np.all(U[sel][:, :, 2:] == 0.0) and np.any(U[~sel][:, :, 2:] != 0.0)

    d, r, m = SMALL["d"], SMALL["r"], SMALL["m"]
    k_op, k_inst = jax.random.split(key)
    k_prob, _, _ = jax.random.split(jax.random.fold_in(k_inst, 1), 3)
    op = js.dense_gaussian(k_op, m, d, jnp.float64)
    for p, r_s, eta in [(0.3, 2, 0.1), (0.0, 8, 0.2)]:
        prob = js.make_problem(k_prob, d, r, m, spectrum=(2.0, 1.0), p=p, dtype=jnp.float64, op=op)
        U0 = js.spectral_sign_init(op, prob.y, r_s, 1e-15)
        ref = js.run(js.subgm(js.geometric(eta, 0.995)), U0, op, prob.y, prob.truth,
                     num_steps=SMALL["num_steps"], record_every=SMALL["record_every"],
                     metrics=("rel_fro_error", "step"))
        i = int(np.flatnonzero((res.params["p"] == p) & (res.params["r_search"] == r_s)
                               & (res.params["eta"] == eta))[0])
        got, want = res.history["rel_fro_error"][i], ref.history["rel_fro_error"]
        # batched and single matmuls round differently; components that start at α = 1e-15
        # turn those 1e-16 absolute differences into O(1) relative ones that then grow with
        # the signal (measured: 1e-13 at t=200, ~1e-2 by t=600): tight early, loose late
        np.testing.assert_allclose(got[:5], want[:5], rtol=1e-9)
        np.testing.assert_allclose(res.history["step"][i][:5], ref.history["step"][:5], rtol=1e-9)
        np.testing.assert_allclose(got[-1], want[-1], rtol=0.3)


def test_gd_sweep_is_not_robust(x64):
    grid = {"p": [0.2], "seed": [0, 1], "r_search": 2, "eta": 0.01}
    gd = sweep(grid, method="gd", **SMALL)
    sub = sweep({**grid, "eta": 0.2, "rho": 0.995}, **SMALL)
    assert np.all(gd.final["rel_fro_error"] > 20 * sub.final["rel_fro_error"])


def test_per_seed_operators(x64):
    """share_operator=False: each seed draws its own operator (batched op, never broadcast)."""
    small = {**SMALL, "num_steps": 600, "record_every": 300}
    prep = sweep({"seed": [0, 1], "p": [0.0, 0.2]}, share_operator=False, prepare_only=True,
                 **small)
    assert prep.op.A.shape == (8, small["m"], small["d"] ** 2)  # padded 4 -> 8 devices
    A = np.asarray(prep.op.A)
    assert not np.allclose(A[0], A[1])  # seeds 0, 1 (p = 0): different operators
    np.testing.assert_array_equal(A[0], A[2])  # seed 0 at p = 0 and p = 0.2: the same one
    res = sweep({"seed": [0, 1], "p": [0.0, 0.2]}, share_operator=False, **small)
    assert np.all(np.isfinite(res.final["rel_fro_error"]))
    assert np.all(res.final["rel_fro_error"] < 0.05)  # from 1.0 at t = 0


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"unknown axes \['q'\]"):
        sweep({"q": [1]}, **SMALL)
    with pytest.raises(ValueError, match=r"grid\['p'\]=\[\]"):
        sweep({"p": []}, **SMALL)
    with pytest.raises(ValueError, match=r"r_search=9.*<= 8"):
        sweep({"r_search": [2, 9]}, **SMALL)
    with pytest.raises(ValueError, match=r"p=1.0"):
        sweep({"p": [0.1, 1.0]}, **SMALL)
    with pytest.raises(ValueError, match=r"rho=1.5"):
        sweep({"rho": 1.5}, **SMALL)
    with pytest.raises(ValueError, match=r"method='adam'"):
        sweep({}, method="adam", **SMALL)
    with pytest.raises(ValueError, match=r"precision='tf64'"):
        sweep({}, precision="tf64", **SMALL)
    with pytest.raises(ValueError, match=r"devices=\[\]"):
        sweep({}, devices=[], **SMALL)
    with pytest.raises(TypeError, match=r"grid\['seed'\]='0'"):
        sweep({"seed": "0"}, **SMALL)
    with pytest.raises(ValueError, match=r"num_steps=601.*record_every=50"):
        sweep({}, **{**SMALL, "num_steps": 601})


def _padded_pair(kind, m=30, m_pad=50, d=4):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(7), 3)
    op = (js.dense_gaussian(k1, m, d, jnp.float64) if kind == "dense"
          else js.rank_one(k1, m, d, jnp.float64))
    y = jax.random.normal(k2, (m,), jnp.float64)
    U = jax.random.normal(k3, (d, 2), jnp.float64)
    return op, y, U, js.sweeps.pad_rows(op, y, m_pad)


@pytest.mark.parametrize("kind", ["dense", "rank_one"])
def test_pad_rows_keeps_the_m_row_problem(x64, kind):
    """Zero rows + √(m_pad/m) scaling: ℓ2 loss/gradient and the ℓ2-RIP ratio are the m-row
    ones; the ℓ1 sub-gradient keeps its Sign pattern and is scaled by 1/s; one geometric
    SubGM step (eq. 10) and one constant-step GD step equal the unpadded ones."""
    op, y, U, pr = _padded_pair(kind)
    m, m_pad = 30, 50
    s = np.sqrt(m_pad / m)
    assert pr.op.m == m_pad and pr.y.shape == (m_pad,) and pr.m == m
    np.testing.assert_allclose(pr.scale, s, rtol=1e-15)
    assert np.all(np.asarray(pr.y[m:]) == 0.0)
    r_pad = np.asarray(js.losses.residual(pr.op, U, pr.y))
    assert np.all(r_pad[m:] == 0.0)  # padded rows: residual exactly 0, Sign(0) = 0
    for kind_loss, factor in (("l2", 1.0), ("l1", 1.0 / s)):
        f, Q = js.losses.loss_and_q(kind_loss, op, U, y)
        fp, Qp = js.losses.loss_and_q(kind_loss, pr.op, U, pr.y)
        np.testing.assert_allclose(fp, factor * f, rtol=1e-13)
        np.testing.assert_allclose(Qp, factor * Q, rtol=1e-12, atol=1e-14)
    # ℓ2-RIP ratio (1/m)‖𝒜(M)‖² of Def. 4 on random symmetric M (the adversarial ascent's
    # gradient (2/m)𝒜*𝒜(M) is the ℓ2 Q above with y = 0)
    M = jax.random.normal(jax.random.PRNGKey(1), (5, 4, 4), jnp.float64)
    M = M + jnp.swapaxes(M, -1, -2)
    ratio = jnp.sum(op.apply(M) ** 2, -1) / m
    ratio_p = jnp.sum(pr.op.apply(M) ** 2, -1) / m_pad
    np.testing.assert_allclose(ratio_p, ratio, rtol=1e-13)
    # one SubGM step (geometric, scale-free in Q) and one GD step (ℓ2, constant) agree
    for solver in (js.subgm(js.geometric(0.2, 0.99)), js.gd(js.constant(0.01))):
        st = solver.init(U)
        a, _ = solver.update(st, op, y)
        b, _ = solver.update(st, pr.op, pr.y)
        np.testing.assert_allclose(b.U, a.U, rtol=1e-12)
        assert not np.allclose(a.U, U)  # the step moved U


def test_pad_rows_batched_y_and_packed(x64):
    op, y, U, _ = _padded_pair("dense")
    ys = jnp.stack([y, 2 * y])
    pr = js.sweeps.pad_rows(op, ys, 64)
    assert pr.y.shape == (2, 64) and pr.op.B is not None and pr.op.B.shape[0] == 64
    np.testing.assert_allclose(pr.y[1, :30], 2 * pr.y[0, :30], rtol=1e-15)
    same = js.sweeps.pad_rows(op, y, 30)  # m_pad = m: the same problem
    np.testing.assert_array_equal(same.op.A, op.A)
    np.testing.assert_array_equal(same.y, y)


def test_pad_rows_bad_inputs(x64):
    op, y, U, _ = _padded_pair("dense")
    with pytest.raises(ValueError, match=r"m_pad=20: expected an integer >= op.m=30"):
        js.sweeps.pad_rows(op, y, 20)
    with pytest.raises(TypeError, match=r"m_pad=40.0: expected an integer"):
        js.sweeps.pad_rows(op, y, 40.0)
    with pytest.raises(ValueError, match=r"y: expected shape \(\.\.\., 30\)"):
        js.sweeps.pad_rows(op, y[:29], 40)
    ent = js.entry_sampling(jax.random.PRNGKey(0), 30, 4, jnp.float64)
    with pytest.raises(TypeError, match=r"op=EntrySampling: expected a DenseGaussian or RankOne"):
        js.sweeps.pad_rows(ent, y, 40)
