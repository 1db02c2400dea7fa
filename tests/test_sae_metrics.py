"""sae.metrics against hand computations on tiny examples."""
import numpy as np
import pytest

from sae import metrics as M

X = np.array([[1.0, 0.0], [3.0, 2.0]])
XH = np.array([[1.0, 1.0], [2.0, 2.0]])


def test_explained_variance_hand_example():
    # mean(x) = (2, 1); Σ‖x − mean‖² = (1+1) + (1+1) = 4; Σ‖x − x̂‖² = 1 + 1 = 2
    assert float(M.explained_variance(X, XH)) == pytest.approx(0.5)
    assert float(M.fvu(X, XH)) == pytest.approx(0.5)
    assert float(M.mse(X, XH)) == pytest.approx(1.0)
    # uncentred denominator would give 1 − 2/14: make sure we are not doing that
    assert float(M.explained_variance(X, XH)) != pytest.approx(1 - 2 / 14)
    assert float(M.explained_variance(X, X)) == pytest.approx(1.0)


def test_cosine_and_shrinkage_hand_example():
    # row 0: cos((1,0),(1,1)) = 1/√2; row 1: (6+4)/(√13·√8)
    c = (1 / np.sqrt(2) + 10 / (np.sqrt(13) * np.sqrt(8))) / 2
    assert float(M.cosine(X, XH)) == pytest.approx(c, rel=1e-6)
    s = (np.sqrt(2) / 1 + np.sqrt(8) / np.sqrt(13)) / 2
    assert float(M.shrinkage(X, XH)) == pytest.approx(s, rel=1e-6)


def test_l0_dead_dense_and_histogram():
    f = np.array([[0.0, 1.0, 0.0, 2.0],
                  [0.0, 0.5, 0.0, 0.0],
                  [0.0, 3.0, 0.1, 0.0],
                  [0.0, 1.0, 0.0, 0.0]])
    assert float(M.l0(f)) == pytest.approx((2 + 1 + 2 + 1) / 4)
    np.testing.assert_array_equal(M.dead_latents(f), [True, False, False, False])
    np.testing.assert_allclose(M.firing_density(f), [0, 1, 0.25, 0.25])
    np.testing.assert_array_equal(M.dense_latents(f, 0.5), [False, True, False, False])
    counts, edges, n_dead = M.log_density_histogram(f, bins=[-1.0, -0.5, 0.0001])
    assert n_dead == 1
    np.testing.assert_array_equal(counts, [2, 1])  # log10(.25) = −0.60 (×2), log10(1) = 0
    ev = M.evaluate(X, XH, f[:2])
    assert ev["explained_variance"] == pytest.approx(0.5) and ev["l0"] == pytest.approx(1.5)


def test_metrics_bad_shapes():
    with pytest.raises(ValueError, match="shape"):
        M.explained_variance(X, XH[:1])


def _jit_vs_eager(fn, *args, **kw):
    import jax
    eager = np.asarray(fn(*args, **kw))
    jitted = np.asarray(jax.jit(lambda *a: fn(*a, **kw))(*args))
    np.testing.assert_allclose(jitted, eager, rtol=1e-6, atol=1e-7)
    return eager


def test_array_metrics_jit_equal_eager():
    import jax
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 8)).astype(np.float32)
    xh = (0.8 * x + 0.1 * rng.standard_normal((64, 8))).astype(np.float32)
    f = np.maximum(rng.standard_normal((64, 12)) - 1.0, 0.0).astype(np.float32)
    f[:, 3] = 0.0  # one dead latent
    for fn in (M.explained_variance, M.fvu, M.mse, M.cosine, M.shrinkage):
        _jit_vs_eager(fn, x, xh)
    for fn in (M.l0, M.firing_density, M.dead_latents):
        _jit_vs_eager(fn, f)
    _jit_vs_eager(M.dense_latents, f, threshold=0.1)
    # the jitted values are the hand computations, not only self-consistent
    ev = float(jax.jit(M.explained_variance)(x, xh))
    xd, xhd = x.astype(np.float64), xh.astype(np.float64)
    want = 1 - np.sum((xd - xhd) ** 2) / np.sum((xd - xd.mean(0)) ** 2)
    assert ev == pytest.approx(want, rel=1e-5)
    assert bool(jax.jit(M.dead_latents)(f)[3]) and int(np.sum(jax.jit(M.dead_latents)(f))) >= 1
    # shape validation still runs under jit (at trace time)
    with pytest.raises(ValueError, match="shape"):
        jax.jit(M.explained_variance)(x, xh[:3])
