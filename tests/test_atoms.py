"""sae.atoms formula layer on hand-checkable examples, the planted-data theory check and
bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sae import atoms as at


def test_moment_accumulator_streams_equal_direct(x64):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1000, 5)).astype(np.float32) + 1.0
    acc = at.MomentAccumulator()
    for i in range(0, 1000, 137):
        acc.update(x[i:i + 137])
    m = acc.result()
    xd = x.astype(np.float64)
    np.testing.assert_allclose(m.m2, xd.T @ xd / 1000, rtol=1e-12)
    np.testing.assert_allclose(m.mean, xd.mean(0), rtol=1e-12)
    assert m.n == 1000 and m.m2.dtype == np.float64
    m2 = at.second_moment(iter([x[:500], x[500:]]), max_samples=700)
    assert m2.n == 700
    np.testing.assert_allclose(m2.m2, xd[:700].T @ xd[:700] / 700, rtol=1e-12)
    # uncentred: a constant vector has second moment c cᵀ, not 0
    c = at.second_moment(np.ones((4, 2), np.float32))
    np.testing.assert_allclose(c.m2, np.ones((2, 2)))


def test_aip_hand_example():
    """x = D δ with E[δδᵀ] = I and D = [[1, 1], [0, 1]] (atoms 45° apart): S̃ = (D Dᵀ)⁻¹
    makes the atoms AIP-orthogonal (90°) and whitening gives unit second moment."""
    D = np.array([[1.0, 1.0], [0.0, 1.0]])
    deltas = np.array([[1.0, 0], [-1, 0], [0, 1], [0, -1]]) * np.sqrt(2)  # E[δδᵀ] = I
    x = deltas @ D.T
    m = at.second_moment(x)
    np.testing.assert_allclose(m.m2, D @ D.T)
    aip = at.aip_from_moment(m)
    np.testing.assert_allclose(aip.S @ (D @ D.T), np.eye(2), atol=1e-12)
    np.testing.assert_allclose(aip.S_half @ aip.S_half, aip.S, atol=1e-12)
    np.testing.assert_allclose(aip.S_half @ aip.S_inv_half, np.eye(2), atol=1e-12)
    ev = np.linalg.eigvalsh(D @ D.T)
    np.testing.assert_allclose(aip.cond, ev[-1] / ev[0])
    d1, d2 = jnp.asarray(D[:, 0]), jnp.asarray(D[:, 1])
    np.testing.assert_allclose(at.aip_cosine(d1, d2), np.cos(np.pi / 4), atol=1e-6)
    np.testing.assert_allclose(at.aip_cosine(d1, d2, aip.S), 0.0, atol=1e-6)
    xw = np.asarray(at.whiten(jnp.asarray(x, jnp.float32), aip), np.float64)
    np.testing.assert_allclose(xw.T @ xw / 4, np.eye(2), atol=1e-5)
    ang = at.pairwise_angles(jnp.asarray(D.T), aip.S, key=jax.random.key(0), n_pairs=8)
    np.testing.assert_allclose(ang, 90.0, atol=1e-3)


def test_ridge_and_singular_moment():
    m2 = np.diag([1.0, 0.0])
    with pytest.raises(ValueError, match=r"m2 .*singular.*ridge"):
        at.aip_from_moment(m2)
    aip = at.aip_from_moment(m2, ridge=0.5)  # r = 0.5 · tr/H = 0.25
    np.testing.assert_allclose(aip.ridge, 0.25)
    np.testing.assert_allclose(aip.S, np.diag([1 / 1.25, 1 / 0.25]))
    np.testing.assert_allclose(aip.cond, 5.0)
    p = at.aip_from_moment(m2, singular="pinv")  # pseudo-inverse on the data's span
    np.testing.assert_allclose(p.S, np.diag([1.0, 0.0]))
    assert p.rank == 1 and p.cond == 1.0
    with pytest.raises(ValueError, match="ridge must be >= 0"):
        at.aip_from_moment(np.eye(2), ridge=-1.0)


def test_empty_store_and_width_mismatch():
    with pytest.raises(ValueError, match="empty"):
        at.second_moment(iter([]))
    with pytest.raises(ValueError, match="empty"):
        at.second_moment([np.zeros((0, 4), np.float32)])
    acc = at.MomentAccumulator(4)
    with pytest.raises(ValueError, match="width 3"):
        acc.update(np.zeros((2, 3)))
    aip = at.aip_from_moment(np.eye(4))
    with pytest.raises(ValueError, match="dictionary width mismatch"):
        at.whiten(np.ones((2, 3)), aip)
    units = {"D": np.eye(3, dtype=np.float32), "codes": np.ones((5, 3)), "x_hat": np.ones((5, 4))}
    with pytest.raises(ValueError, match="dictionary width mismatch"):
        at.unit_metrics(np.ones((5, 4)), units, aip, key=jax.random.key(0))
    with pytest.raises(ValueError, match="dictionary width mismatch"):
        at.uniqueness_per_sample(np.eye(4), np.ones((5, 3)))
    with pytest.raises(ValueError, match="dictionary width mismatch"):
        at.sae_units({"W_dec": np.ones((8, 3)), "b_dec": np.zeros(3)}, np.ones((5, 4)), None)


def test_r2_hand():
    x = np.array([[1.0, 2.0], [-1.0, 0.0]])  # mean (0, 1): Σ‖x − x̄‖² = 2 + 2 = 4
    xh = np.array([[0.5, 2.0], [-1.0, 1.0]])  # errors (0.5, 0), (0, −1): Σ = 1.25
    np.testing.assert_allclose(at.r2(x, xh), 1 - 1.25 / 4)
    S = np.diag([4.0, 1.0])  # S-norms: errors 1 + 1 = 2; centred 4·1·2 + 1·1·2 = 10
    np.testing.assert_allclose(at.r2(x, xh, S), 1 - 2 / 10)
    np.testing.assert_allclose(at.r2(x, x), 1.0)


def test_q_star_and_uniqueness_hand():
    mu = np.array([0.1, 0.2, 0.5, 0.6])
    # L0 = 2 everywhere → bound 1/3; μ_q = 1/3 at q = (1 + (1/3 − 0.2)/0.3)/3 = 0.48148
    q = at.q_star(mu, np.full(10, 2))
    assert abs(q - 0.48148) < 1e-3
    assert at.q_star(mu, np.ones(10)) == 1.0  # K = 1: bound 1 > every μ
    assert at.q_star(np.array([0.9]), np.full(3, 5)) == 0.0
    u = at.uniqueness_per_atom(mu, np.array([1, 2, 2, 3, 9]))  # median K = 2
    assert u["K"] == 2 and u["fraction"] == 0.5
    assert at.uniqueness_per_atom(mu, np.array([1, 9]), k_quantile="max")["K"] == 9
    assert int(at.l0_per_sample(np.array([[0.0, 1, -2], [0, 0, 0]]))[0]) == 2


def test_per_sample_uniqueness_dirac_hadamard():
    x, D, codes = at.planted_data(jax.random.key(0), H=16, N=32, K=2, n=200,
                                  dictionary="dirac_hadamard")
    us = at.uniqueness_per_sample(D, codes)  # μ = 1/4 < 1/3 everywhere
    assert us["support_fraction"] == 1.0 and us["atom_fraction"] == 1.0
    _, D4, c4 = at.planted_data(jax.random.key(1), H=16, N=32, K=4, n=400)
    us4 = at.uniqueness_per_sample(D4, c4)  # 1/7 < 1/4: the atom-wise test fails for all
    assert us4["atom_fraction"] == 0.0
    # closed form of the support-restricted test: Dirac–Dirac and Hadamard–Hadamard pairs are
    # orthogonal, Dirac–Hadamard pairs have |cos| = 1/4 > 1/7; so a 4-support passes iff it
    # lies in one half (probability 2·C(16,4)/C(32,4) ≈ 0.10)
    nz = c4 != 0
    assert np.all(nz.sum(1) == 4)
    one_half = (nz[:, :16].sum(1) == 4) | (nz[:, 16:].sum(1) == 4)
    assert 0 < one_half.sum() < len(one_half)  # both outcomes occur in this draw
    np.testing.assert_array_equal(us4["support_ok"], one_half)


def test_neurons_are_trivial_and_unique_fraction_small():
    rng = np.random.default_rng(1)
    A = rng.standard_normal((8, 8))
    x = (rng.standard_normal((400, 8)) @ A.T).astype(np.float32)
    aip = at.aip_from_moment(at.second_moment(x))
    row = at.unit_metrics(x, at.neuron_units(x), aip, key=jax.random.key(0), n_supports=64)
    assert row["r2"] == pytest.approx(1.0) and row["r2_aip"] == pytest.approx(1.0)
    assert row["l0_median"] == 8 and row["K"] == 8  # dense: every coordinate active
    assert row["uniqueness_atoms"] == 0.0  # 1/(2·8 − 1) = 0.067 below typical AIP coherence
    assert "l1_exact_support" not in row  # N = H: recovery is trivial (skipped)


def test_whitened_sae_units_map_back():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((50, 4)).astype(np.float32) @ np.diag([1, 2, 3, 4]).astype(np.float32)
    aip = at.aip_from_moment(at.second_moment(x))
    params = {"W_dec": np.eye(4, dtype=np.float32), "b_dec": np.zeros(4, np.float32)}
    u = at.sae_units(params, x, lambda p, z: z, aip=aip, whitened=True)  # codes = whitened x
    np.testing.assert_allclose(u["x_hat"], x, atol=1e-4)
    assert u["D"].shape == (4, 4)


def test_representation_shift_controls():
    rng = np.random.default_rng(3)
    H = 16
    shared = rng.standard_normal(H) * 3
    x = (rng.standard_normal((2000, H)) + shared).astype(np.float32)  # a shared direction
    aip = at.aip_from_moment(at.second_moment(x))
    rs = at.representation_shift(x, aip, key=jax.random.key(0), n_pairs=4000,
                                 W_dec_euclid=rng.standard_normal((32, H)))
    assert rs["activations"]["euclid"]["mean"] < 60  # concentrated well below 90°
    assert abs(rs["activations"]["aip"]["mean"] - 90) < 15  # re-centred ...
    assert abs(rs["gaussian_matched"]["aip"]["mean"] - 90) < 3  # ... as the control is
    assert abs(rs["gaussian_iso"]["euclid"]["mean"] - 90) < 3
    assert abs(rs["gaussian_mean_cov"]["euclid"]["mean"] - rs["activations"]["euclid"]["mean"]) < 5
    assert set(rs) == {"activations", "gaussian_iso", "gaussian_matched", "gaussian_mean_cov",
                       "euclid_sae_atoms"}
    assert len(rs["activations"]["hist_aip"]) == 90


def test_theory_check_planted():
    """W_dec = D, W_enc = Dᵀ S̃, τ in the theorem's interval: every support recovered."""
    x, D, codes = at.planted_data(jax.random.key(0), H=64, N=128, K=3, n=2000,
                                  delta_range=(0.7, 1.0))
    S = np.linalg.inv(D.astype(np.float64) @ D.T)  # = I/2: μ_S = 1/8
    r = at.theory_check(x, D, codes, S)
    assert r["interval_feasible"] and r["eps"] == pytest.approx(0.125, abs=1e-6)
    assert r["interval_lo"] < r["tau"] < r["interval_hi"]
    assert r["support_recovery"] == 1.0
    assert r["max_pre_off_support"] < r["tau"] <= r["min_pre_on_support"]
    # the estimated AIP (paper's recipe, S̃ = (E[xxᵀ])⁻¹): non-negative codes have
    # E[δδᵀ] ≠ c²I, S̃ picks up a rank-one distortion, ε grows and the interval is empty —
    # the guarantee is lost, recovery stays high but is no longer certified
    aip = at.aip_from_moment(at.second_moment(x))
    re = at.theory_check(x, D, codes, aip.S)
    assert not re["interval_feasible"] and re["eps"] > 0.125
    assert re["support_recovery"] > 0.95
    # a τ outside the interval (above δ_min) loses supports
    assert at.theory_check(x, D, codes, S, tau=0.9)["support_recovery"] < 1.0
    iv = at.threshold_interval(0.125, 3, 0.7, 1.0)
    np.testing.assert_allclose([iv["lo"], iv["hi"]], [0.375, 0.45])


def test_l1_recoverability_planted_and_rip():
    x, D, codes = at.planted_data(jax.random.key(4), H=16, N=32, K=2, n=128)
    r = at.l1_recoverability(D, codes)
    assert r["exact_support"] == 1.0 and r["bp_residual_median"] < 1e-3
    rip = at.rip_estimate(D, None, 2, key=jax.random.key(0), n_supports=256)
    assert rip["delta_sampled"] <= rip["gershgorin_bound"] + 1e-6
    np.testing.assert_allclose(rip["gershgorin_bound"], 0.25, atol=1e-6)


def test_match_atoms_sign_flipped_and_permuted():
    """Atoms are directions: a learned decoder holding the planted atoms permuted, rescaled
    and with some negated must match every planted atom to its own row with |cos| = 1."""
    _, D, codes = at.planted_data(jax.random.key(5), H=16, N=32, K=2, n=64)
    rng = np.random.default_rng(7)
    perm = rng.permutation(32)
    signs = np.where(rng.random(32) < 0.5, -1.0, 1.0)
    signs[:2] = [-1.0, 1.0]  # at least one of each
    W_dec = (signs[:, None] * 3.0 * D.T[perm]).astype(np.float32)  # row j = ±3 d_{perm[j]}
    m = at.match_atoms(D, W_dec)
    np.testing.assert_array_equal(perm[m["index"]], np.arange(32))
    np.testing.assert_allclose(m["abs_cos"], 1.0, atol=1e-6)
    np.testing.assert_allclose(m["cos"], signs[m["index"]], atol=1e-6)  # the sign is kept
    # supports are compared as sets of firing latents, so the sign-flipped latents (firing
    # with negative codes) recover every planted support
    learned = codes[:, perm] * signs[None, :] / 3.0
    rec = at.planted_support_recovery(D, W_dec, codes, learned)
    assert rec["support_recovery"] == 1.0 and rec["atoms_found"] == 1.0
    # a dictionary of unrelated directions finds nothing at min_cos = 0.9
    W_rand = rng.standard_normal((32, 16)).astype(np.float32)
    assert at.planted_support_recovery(D, W_rand, codes, learned)["atoms_found"] < 0.5


def test_array_metrics_jit_equal_eager():
    """The pure array → array functions of sae.atoms give the eager result under jax.jit."""
    from functools import partial
    rng = np.random.default_rng(11)
    x = rng.standard_normal((40, 6)).astype(np.float32)
    xh = (0.9 * x + 0.2 * rng.standard_normal((40, 6))).astype(np.float32)
    A = rng.standard_normal((6, 6))
    S = (A @ A.T + np.eye(6)).astype(np.float32)
    codes = np.where(rng.random((40, 10)) < 0.3, rng.standard_normal((40, 10)), 0.0)
    cases = [(at.aip_cosine, (x, xh)), (at.aip_cosine, (x, xh, S)), (at.r2, (x, xh)),
             (at.r2, (x, xh, S)), (at.whiten, (x, S)), (at.l0_per_sample, (codes,)),
             (at.dictionary_from_decoder, (x,)),
             (partial(at.pairwise_angles, key=jax.random.key(0), n_pairs=50), (x, S))]
    for fn, args in cases:
        eager = np.asarray(fn(*args))
        np.testing.assert_allclose(np.asarray(jax.jit(fn)(*args)), eager, rtol=1e-5, atol=1e-5)
    # r2 against an independent float64 numpy computation (S-norm)
    e, c = (x - xh).astype(np.float64), (x - x.mean(0)).astype(np.float64)
    want = 1 - np.sum((e @ S) * e) / np.sum((c @ S) * c)
    np.testing.assert_allclose(float(jax.jit(at.r2)(x, xh, S)), want, rtol=1e-5)
    # shape checks also under jit; the zero-variance check on concrete input
    with pytest.raises(ValueError, match="shape of x"):
        jax.jit(at.r2)(x, xh[:5])
    with pytest.raises(ValueError, match="zero variance"):
        at.r2(np.ones((4, 3)), np.zeros((4, 3)))
