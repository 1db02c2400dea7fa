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
