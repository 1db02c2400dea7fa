"""jaxsense.rip: φ(X) of Thms 10–11, Q(X) → φ(X) X/‖X‖_F at rate 1/√m, ℓ2-/Sign-RIP estimators."""
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsense as js
from jaxsense import rip

KEY = jax.random.PRNGKey(0)


def _deviation_vs_m(noise_kind, ms, reps=16, d=8):
    """Mean over ``reps`` draws of ‖Q(X) − φ(X) X̂‖_F using the first m rows, per m."""
    X = 2.0 * rip.random_low_rank(jax.random.PRNGKey(7), d, 2, 1, dtype=jnp.float64)[0]
    xn = float(jnp.linalg.norm(X))
    if noise_kind == "outliers":
        phi = float(rip.phi_outliers(xn, 0.3, sigma=5.0))
    else:
        phi = float(rip.phi_gaussian(xn, 1.5))
    m_max = int(max(ms))

    @jax.jit
    def one(key):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        A = jax.random.normal(k1, (m_max, d * d), jnp.float64)
        if noise_kind == "outliers":
            s = jnp.where(jax.random.uniform(k2, (m_max,)) < 0.3,
                          5.0 * jax.random.normal(k3, (m_max,), jnp.float64), 0.0)
        else:
            s = 1.5 * jax.random.normal(k4, (m_max,), jnp.float64)
        return jnp.stack([rip.q_deviation(js.DenseGaussian(A=A[:m], d=d), X, s[:m], phi)
                          for m in ms])

    keys = jax.random.split(jax.random.PRNGKey(100), reps)
    return np.mean(np.stack([np.asarray(one(k)) for k in keys]), axis=0)


@pytest.mark.parametrize("noise_kind", ["outliers", "gaussian"])
def test_q_concentrates_at_rate_one_over_sqrt_m(x64, noise_kind):
    ms = np.array([250, 500, 1000, 2000, 4000, 8000])
    devs = _deviation_vs_m(noise_kind, ms)
    slope = np.polyfit(np.log(ms), np.log(devs), 1)[0]
    assert abs(slope + 0.5) < 0.08, (slope, devs)
    # and the limit is φ(X)·X̂ itself: a wrong φ leaves a floor (slope far from −0.5)
    assert devs[-1] < 0.6 * devs[0] / np.sqrt(8)


def test_wrong_phi_does_not_concentrate(x64):
    """Control: the noiseless constant √(2/π) is the wrong scaling under outliers."""
    d, m = 8, 8000
    X = rip.random_low_rank(jax.random.PRNGKey(7), d, 2, 1, dtype=jnp.float64)[0]
    op = js.dense_gaussian(KEY, m, d, jnp.float64)
    s = js.outlier_noise(jax.random.PRNGKey(1), jnp.zeros(m, jnp.float64), 0.5, "gaussian", 5.0)
    right = float(rip.q_deviation(op, X, s, rip.phi_outliers(1.0, 0.5, sigma=5.0)))
    wrong = float(rip.q_deviation(op, X, s, rip.SQRT_2_OVER_PI))
    assert wrong > 3 * right


def test_phi_closed_forms(x64):
    xs = jnp.array([0.3, 1.0, 4.0])
    samples = 5.0 * jax.random.normal(KEY, (400_000,), jnp.float64)
    np.testing.assert_allclose(rip.phi_outliers(xs, 0.3, sigma=5.0),
                               rip.phi_outliers(xs, 0.3, samples=samples), rtol=3e-3)
    # p = 0 and ν = 0: the noiseless constant √(2/π)
    np.testing.assert_allclose(rip.phi_outliers(xs, 0.0, sigma=5.0), np.sqrt(2 / np.pi))
    np.testing.assert_allclose(rip.phi_gaussian(xs, 0.0), np.sqrt(2 / np.pi))
    np.testing.assert_allclose(rip.phi_gaussian(xs, 2.0), np.sqrt(2 / np.pi) * xs / np.sqrt(xs**2 + 4))


def test_random_low_rank_is_unit_and_rank_k(x64):
    X = rip.random_low_rank(KEY, 10, 3, 5, dtype=jnp.float64)
    np.testing.assert_allclose(jnp.linalg.norm(X, axis=(-2, -1)), 1.0, rtol=1e-12)
    sv = np.linalg.svd(np.asarray(X), compute_uv=False)
    assert np.all(sv[:, 3:] < 1e-12) and np.all(sv[:, 2] > 1e-6)
    np.testing.assert_allclose(X, np.swapaxes(X, -1, -2), atol=1e-14)
    Xe = rip.random_low_rank(KEY, 10, 3, 50, eps=0.1, dtype=jnp.float64)
    tail = np.sqrt(np.sum(np.linalg.svd(np.asarray(Xe), compute_uv=False)[:, 3:] ** 2, -1))
    assert np.all(tail <= 0.1 / 0.9 + 1e-12) and np.max(tail) > 0.01


def test_l2_rip_shrinks_with_m_and_adversarial_is_larger(x64):
    d, k = 10, 2
    deltas = [float(rip.l2_rip_constant(js.dense_gaussian(KEY, m, d, jnp.float64), KEY, k, 64).delta)
              for m in (200, 3200)]
    assert deltas[1] < 0.5 * deltas[0]
    op = js.dense_gaussian(KEY, 200, d, jnp.float64)
    rnd = rip.l2_rip_constant(op, KEY, k, 64)
    adv = rip.l2_rip_constant(op, KEY, k, 64, mode="adversarial", steps=30)
    assert float(adv.delta) > float(rnd.delta)
    assert float(adv.lo) < float(rnd.lo) and float(adv.hi) > float(rnd.hi)
    # adversarial value is achieved by a rank-k unit matrix: never above the full spectrum
    A = np.asarray(op.A)
    ev = np.linalg.eigvalsh(A.T @ A / 200)
    assert float(adv.hi) <= ev[-1] + 1e-9


def test_sign_rip_estimates(x64):
    d, k = 10, 2
    p, sigma = 0.2, 5.0
    phi = partial(rip.phi_outliers, p=p, sigma=sigma)
    ests = []
    for m in (300, 4800):
        prob = js.make_problem(KEY, d=d, r=k, m=m, spectrum=(1.0, 0.5), p=p, outlier_scale=sigma,
                               dtype=jnp.float64)
        ests.append(rip.sign_rip_constant(prob.op, KEY, k, 32, s=prob.noise, phi=phi))
    assert float(ests[1].delta) < 0.5 * float(ests[0].delta)
    # the sup over Y dominates any random pair
    assert float(ests[0].delta) >= float(ests[0].delta_pairs)
    prob = js.make_problem(KEY, d=d, r=k, m=300, spectrum=(1.0, 0.5), p=p, outlier_scale=sigma,
                           dtype=jnp.float64)
    adv = rip.sign_rip_constant(prob.op, KEY, k, 32, s=prob.noise, phi=phi, mode="adversarial",
                                steps=20)
    assert float(adv.delta) > float(ests[0].delta)


def test_bad_inputs():
    op = js.dense_gaussian(KEY, 50, 6)
    with pytest.raises(ValueError, match=r"k=7.*<= 6"):
        rip.l2_rip_constant(op, KEY, 7, 10)
    with pytest.raises(ValueError, match=r"n_samples=0"):
        rip.l2_rip_constant(op, KEY, 2, 0)
    with pytest.raises(ValueError, match=r"mode='foo'"):
        rip.sign_rip_constant(op, KEY, 2, 10, mode="foo")
    with pytest.raises(ValueError, match=r"s: expected shape \(50,\)"):
        rip.sign_rip_constant(op, KEY, 2, 10, s=jnp.zeros(49))
    with pytest.raises(ValueError, match=r"p=1.0"):
        rip.phi_outliers(1.0, 1.0, sigma=1.0)
    with pytest.raises(ValueError, match="exactly one"):
        rip.phi_outliers(1.0, 0.1)
    with pytest.raises(ValueError, match=r"nu=-1"):
        rip.phi_gaussian(1.0, -1.0)
    with pytest.raises(TypeError, match="phi="):
        rip.sign_rip_constant(op, KEY, 2, 10, phi=3.0)
    with pytest.raises(TypeError, match="op="):
        rip.l2_rip_constant(np.zeros((3, 3)), KEY, 2, 10)
