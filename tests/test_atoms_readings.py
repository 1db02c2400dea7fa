"""Readings of Hu et al.'s uniqueness numbers (``sae.atoms.uniqueness_readings``): per-atom
(v1) at several K, quantile q* (v2), with exact and relative-threshold L0."""
import numpy as np
import pytest

from sae import atoms as at


def test_l0_relative_counts_codes_above_fraction_of_row_max():
    codes = np.array([[10.0, 0.05, 0.2, 0.0],    # threshold 0.1 → {10, 0.2}
                      [-3.0, 0.02, -0.04, 1.0],  # |c| used: threshold 0.03 → {3, 0.04, 1}
                      [0.0, 0.0, 0.0, 0.0]])     # empty row → 0
    np.testing.assert_array_equal(np.asarray(at.l0_relative(codes, 1e-2)), [2, 3, 0])
    np.testing.assert_array_equal(np.asarray(at.l0_relative(codes, 0.0)), [3, 4, 0])


def test_readings_match_their_definitions():
    rng = np.random.default_rng(0)
    N, B = 50, 400
    mu = rng.uniform(0.0, 0.6, N)
    l0_target = rng.integers(1, 6, B)
    codes = np.zeros((B, N), np.float32)
    for b, k in enumerate(l0_target):
        codes[b, rng.choice(N, k, replace=False)] = rng.uniform(1.0, 2.0, k)
    r = at.uniqueness_readings(mu, codes, k_readings=(0.1, 0.5, "mean", 0.9))
    ex = r["exact"]
    assert set(ex["v1"]) == {"q0.1", "q0.5", "mean", "q0.9"}
    for lab, q in (("q0.1", 0.1), ("q0.5", 0.5), ("q0.9", 0.9)):
        K = np.quantile(l0_target, q)
        assert ex["K"][lab] == pytest.approx(K)
        assert ex["v1"][lab] == pytest.approx(np.mean(mu < 1.0 / (2 * max(K, 1.0) - 1)))
    assert ex["K"]["mean"] == pytest.approx(l0_target.mean())
    # v1 at the median is the table's uniqueness_atoms; v2 is the table's q*
    assert ex["v1"]["q0.5"] == at.uniqueness_per_atom(mu, l0_target)["fraction"]
    assert ex["q_star"] == at.q_star(mu, l0_target)
    # a larger K can only shrink the bound: v1 is non-increasing in the quantile
    assert ex["v1"]["q0.1"] >= ex["v1"]["q0.5"] >= ex["v1"]["q0.9"]
    # codes all within a factor 2 of each row's max: a 1e-2 relative threshold drops nothing
    assert r["rel0.01"] == ex


def test_relative_reading_gives_dense_codes_a_small_support():
    """Neuron-like dense codes (one large entry, the rest tiny): exact L0 = N, so nothing is
    unique; with the relative threshold K = 1 and every atom with μ < 1 passes."""
    N = 20
    codes = np.full((30, N), 1e-4, np.float32)
    codes[np.arange(30), np.arange(30) % N] = 5.0
    mu = np.full(N, 0.5)
    r = at.uniqueness_readings(mu, codes, k_readings=(0.5,))
    assert r["exact"]["K"]["q0.5"] == N and r["exact"]["v1"]["q0.5"] == 0.0
    assert r["rel0.01"]["K"]["q0.5"] == 1 and r["rel0.01"]["v1"]["q0.5"] == 1.0
    assert r["rel0.01"]["q_star"] == 1.0 and r["exact"]["q_star"] == 0.0


def test_readings_bad_input():
    mu = np.full(4, 0.1)
    codes = np.ones((3, 4), np.float32)
    with pytest.raises(ValueError, match="codes"):
        at.uniqueness_readings(mu, np.ones((3, 5)))
    with pytest.raises(ValueError, match="k_readings"):
        at.uniqueness_readings(mu, codes, k_readings=(1.5,))
    with pytest.raises(ValueError, match="k_readings"):
        at.uniqueness_readings(mu, codes, k_readings=("median",))
    with pytest.raises(ValueError, match="rel_tols"):
        at.uniqueness_readings(mu, codes, rel_tols=(1.0,))
    with pytest.raises(ValueError, match="rel_tol"):
        at.l0_relative(codes, -0.1)


def test_extra_coherence_kinds():
    """experiments.atoms.readings.coherences: max / 99th percentile / mean of |G_ij|, j ≠ i."""
    from experiments.atoms.readings import coherences

    D = np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]], np.float32)  # atoms e1, e2, (e1+e2)/√2
    c = coherences(D)
    r = 1 / np.sqrt(2)
    np.testing.assert_allclose(c["max"], [r, r, r], rtol=1e-6)
    np.testing.assert_allclose(c["mean"], [r / 2, r / 2, r], rtol=1e-6)
    np.testing.assert_allclose(c["p99"], [0.99 * r, 0.99 * r, r], rtol=1e-6)
    # in the metric S = diag(1, 4) the atoms are re-normalised: G_13 = 1/√5, G_23 = 2/√5
    cS = coherences(D, np.diag([1.0, 4.0]))
    np.testing.assert_allclose(cS["max"], [1 / np.sqrt(5), 2 / np.sqrt(5), 2 / np.sqrt(5)],
                               rtol=1e-6)
