import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsense as js
from jaxsense import diagnostics


def test_ground_truth_spectrum(x64):
    t = js.ground_truth(jax.random.PRNGKey(0), 12, (10.0, 5.0, 1.0), jnp.float64)
    np.testing.assert_allclose(jnp.linalg.eigvalsh(t.X_star)[::-1][:3], [10, 5, 1], rtol=1e-12)
    np.testing.assert_allclose(jnp.linalg.eigvalsh(t.X_star)[:9], 0, atol=1e-12)
    full = jnp.concatenate([t.V, t.V_perp], 1)
    np.testing.assert_allclose(full.T @ full, jnp.eye(12), atol=1e-12)
    t2 = js.truth_from_matrix(t.X_star, 3)
    np.testing.assert_allclose(t2.sigma, [10, 5, 1], rtol=1e-12)


def test_condition_number(x64):
    prob = js.make_problem(jax.random.PRNGKey(0), d=10, r=4, m=50, kappa=8.0, dtype=jnp.float64)
    np.testing.assert_allclose(prob.truth.sigma[0] / prob.truth.sigma[-1], 8.0, rtol=1e-12)


@pytest.mark.parametrize("dist", ["gaussian", "uniform", "cauchy"])
def test_outlier_rate_and_distribution(dist, x64):
    y = jnp.linspace(-3.0, 5.0, 20000, dtype=jnp.float64)
    s = js.outlier_noise(jax.random.PRNGKey(1), y, 0.3, dist, 10.0)
    frac = float(jnp.mean(s != 0))
    assert abs(frac - 0.3) < 0.015
    z = s[s != 0]
    if dist == "gaussian":
        assert abs(float(jnp.std(z)) - 10.0) < 0.3
    elif dist == "uniform":
        assert float(jnp.max(jnp.abs(z))) <= 10.0 * 5.0 and float(jnp.max(jnp.abs(z))) > 45.0
    else:
        assert abs(float(jnp.median(jnp.abs(z))) - 10.0) < 1.0  # median |Cauchy| = scale
    assert float(jnp.sum(js.outlier_noise(jax.random.PRNGKey(1), y, 0.0, dist) != 0)) == 0


def test_noise_models_compose(x64):
    key = jax.random.PRNGKey(3)
    clean = js.make_problem(key, m=2000, dtype=jnp.float64)
    mixed = js.make_problem(key, m=2000, p=0.2, nu=0.5, dtype=jnp.float64)
    gauss = js.make_problem(key, m=2000, nu=0.5, dtype=jnp.float64)
    np.testing.assert_allclose(mixed.y - mixed.noise, clean.y, atol=1e-9)
    assert abs(float(jnp.std(gauss.noise)) - 0.5) < 0.03
    assert float(jnp.mean(jnp.abs(mixed.noise) > 5)) > 0.1


def test_vmap_over_p():
    key = jax.random.PRNGKey(2)
    op = js.dense_gaussian(key, 300, 8)
    probs = jax.vmap(lambda p: js.make_problem(key, d=8, r=3, m=300, p=p, op=op))(
        jnp.array([0.0, 0.3, 0.6]))
    rates = np.asarray(jnp.mean(probs.noise != 0, axis=1))
    assert rates[0] == 0 and abs(rates[1] - 0.3) < 0.08 and abs(rates[2] - 0.6) < 0.08


def test_decomposition_identities(x64):
    truth = js.ground_truth(jax.random.PRNGKey(0), 10, (4.0, 2.0, 1.0), jnp.float64)
    # U exactly the truth factor: signal 0, cross 0, residual 0
    U = truth.V * jnp.sqrt(truth.sigma)
    dec = diagnostics.decomposition(U, truth)
    for k in ("signal", "cross", "residual", "F_norm", "G_norm"):
        assert float(dec[k]) < 1e-12
    np.testing.assert_allclose(dec["eigs"], [4, 2, 1], rtol=1e-12)
    # E = F + G with F in the row space of S; ‖EEᵀ‖ ≥ max(‖FFᵀ‖, ‖GGᵀ‖)
    U = jax.random.normal(jax.random.PRNGKey(1), (10, 6), jnp.float64)
    dec = diagnostics.decomposition(U, truth)
    assert dec["residual"] + 1e-12 >= max(dec["F_norm"], dec["G_norm"])
    E = truth.V_perp.T @ U
    np.testing.assert_allclose(dec["residual"], jnp.linalg.norm(E @ E.T, 2), rtol=1e-10)
    np.testing.assert_allclose(diagnostics.op_error(U, truth.X_star),
                               jnp.linalg.norm(U @ U.T - truth.X_star, 2), rtol=1e-10)
