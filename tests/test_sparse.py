"""jaxsense.sparse: coherence, RIP, basis pursuit, OMP on hand-checkable dictionaries."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsense import sparse as sp


def hadamard(n):
    h = np.array([[1.0]])
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def dirac_hadamard(H):
    """[I, Hadamard/√H]: mutual coherence exactly 1/√H."""
    return np.hstack([np.eye(H), hadamard(H) / np.sqrt(H)]).astype(np.float32)


def sparse_codes(rng, B, N, K, nonneg=False):
    c = np.zeros((B, N), np.float32)
    for b in range(B):
        s = rng.choice(N, K, replace=False)
        v = rng.uniform(0.5, 1.5, K) * (1 if nonneg else rng.choice([-1, 1], K))
        c[b, s] = v
    return c


def test_coherence_hand_example():
    # two unit atoms at 60°, a third orthogonal to both: μ = cos 60° = 0.5
    D = jnp.array([[1.0, 0.5, 0.0], [0.0, np.sqrt(3) / 2, 0.0], [0.0, 0.0, 2.0]])
    np.testing.assert_allclose(sp.mutual_coherence(D), 0.5, atol=1e-6)
    np.testing.assert_allclose(sp.atom_coherence(D), [0.5, 0.5, 0.0], atol=1e-6)
    G = sp.normalized_gram(D)
    np.testing.assert_allclose(jnp.diag(G), 1.0, atol=1e-6)
    # μ = 0.5 → K < (1 + 2)/2 = 1.5 → K = 1
    assert int(sp.coherence_bound_K(0.5)) == 1
    assert int(sp.coherence_bound_K(0.25)) == 2  # K < 2.5
    assert int(sp.coherence_bound_K(1 / 3)) == 1  # K < 2 strictly


def test_coherence_under_metric_equals_whitened():
    rng = np.random.default_rng(0)
    H, N = 6, 10
    D = rng.standard_normal((H, N))
    A = rng.standard_normal((H, H))
    S = A @ A.T + 0.5 * np.eye(H)
    ev, V = np.linalg.eigh(S)
    W = (V * np.sqrt(ev)) @ V.T
    mu_S = sp.atom_coherence(jnp.asarray(D), jnp.asarray(S))
    mu_w = sp.atom_coherence(jnp.asarray(W @ D))
    np.testing.assert_allclose(mu_S, mu_w, rtol=1e-4)
    # blocked computation equals the dense one
    np.testing.assert_allclose(sp.atom_coherence(jnp.asarray(D), jnp.asarray(S), block=3),
                               mu_S, rtol=1e-5)
    # the metric the AIP would pick, S = (D Dᵀ)⁻¹, makes the frame tight: the S-Gram
    # Dᵀ(DDᵀ)⁻¹D is the orthogonal projector P onto D's row space (numpy SVD, independent),
    # so μ_S = max_{i≠j} |P_ij| / √(P_ii P_jj), and the Welch bound √((N−H)/(H(N−1))) holds
    S2 = np.linalg.inv(D @ D.T)
    Vt = np.linalg.svd(D, full_matrices=False)[2]
    P = Vt.T @ Vt
    C = np.abs(P) / np.sqrt(np.outer(np.diag(P), np.diag(P)))
    mu_P = np.max(C - np.eye(N) * np.diag(C))
    mu_S2 = float(sp.mutual_coherence(jnp.asarray(D), jnp.asarray(S2)))
    np.testing.assert_allclose(mu_S2, mu_P, rtol=1e-5)
    assert mu_S2 >= np.sqrt((N - H) / (H * (N - 1))) - 1e-6


@pytest.mark.parametrize("H", [2, 3, 7])
def test_simplex_frame_meets_welch_bound(H):
    """The N = H + 1 simplex frame (centred standard basis of R^{H+1} in an orthonormal basis
    of its H-dim span) is an equiangular tight frame: μ = 1/H, exactly the Welch bound
    √((N−H)/(H(N−1))) = 1/H."""
    N = H + 1
    E = np.eye(N) - 1.0 / N  # columns: e_i − mean, in the hyperplane Σ = 0
    B = np.linalg.svd(E)[0][:, :H]  # orthonormal basis of that hyperplane
    D = jnp.asarray(B.T @ E)  # (H, N)
    mu = float(sp.mutual_coherence(D))
    np.testing.assert_allclose(mu, 1.0 / H, rtol=1e-5)
    np.testing.assert_allclose(mu, np.sqrt((N - H) / (H * (N - 1))), rtol=1e-5)
    np.testing.assert_allclose(sp.atom_coherence(D), np.full(N, 1.0 / H), rtol=1e-5)


@pytest.mark.parametrize("K", [1, 3, 5])
def test_orthonormal_dictionary_mu0_delta0(K):
    rng = np.random.default_rng(1)
    Q, _ = np.linalg.qr(rng.standard_normal((12, 12)))
    for D in (np.eye(12), Q):
        D = jnp.asarray(D, jnp.float32)
        assert float(sp.mutual_coherence(D)) < 1e-5
        r = sp.rip_constant(D, K, jax.random.key(0), n_supports=64)
        assert float(r.delta) < 1e-5
        np.testing.assert_allclose(r.lam_min, 1.0, atol=1e-5)


def test_rip_within_gershgorin_and_exact_for_small_N():
    rng = np.random.default_rng(2)
    D = jnp.asarray(rng.standard_normal((8, 10)), jnp.float32)
    mu = sp.mutual_coherence(D)
    K = 3
    r = sp.rip_constant(D, K, jax.random.key(1), n_supports=4096)
    assert float(r.delta) <= float(sp.rip_gershgorin_bound(mu, K)) + 1e-5
    # with 4096 draws over C(10,3)=120 supports every support is seen: the estimate is exact
    G = np.asarray(sp.normalized_gram(D), np.float64)
    exact = max(
        max(np.linalg.eigvalsh(G[np.ix_(s, s)])[-1] - 1, 1 - np.linalg.eigvalsh(G[np.ix_(s, s)])[0])
        for s in map(list, itertools.combinations(range(10), K)))
    np.testing.assert_allclose(r.delta, exact, rtol=1e-4)


def test_exact_recovery_below_coherence_bound():
    """Dirac–Hadamard, H=16: μ = 1/4 < 1/(2K−1) for K = 2 → BP and OMP recover every
    2-sparse code exactly (sample of 300 random supports and signs)."""
    D = jnp.asarray(dirac_hadamard(16))
    mu = float(sp.mutual_coherence(D))
    np.testing.assert_allclose(mu, 0.25, atol=1e-6)
    K = 2
    assert mu < 1 / (2 * K - 1)
    codes = sparse_codes(np.random.default_rng(3), 300, 32, K)
    Y = jnp.asarray(codes) @ D.T
    bp = sp.basis_pursuit(D, Y, n_iter=500)
    np.testing.assert_allclose(bp.coef, codes, atol=1e-3)
    assert float(jnp.max(bp.residual)) < 1e-4
    om = sp.omp(D, Y, K)
    np.testing.assert_allclose(om, codes, atol=1e-4)
    agree = sp.support_agreement(codes, bp.coef, tol=1e-2)
    assert bool(jnp.all(agree["exact"]))
    # the per-sample sufficient conditions hold for every sample
    idx, valid = sp.support_from_codes(jnp.asarray(codes), K)
    mu_T = sp.support_atom_coherence(sp.atom_coherence(D), idx, valid)
    assert bool(jnp.all((2 * valid.sum(1) - 1) * mu_T < 1))


def test_known_failure_beyond_bound():
    """Beyond the bound (K = 4, μ = 1/4 > 1/7): the picket fence 1_A (A a subgroup of F_2^4
    of size 4) equals the sum of the 4 normalised Hadamard columns indexed by A⊥. One signal,
    two different 4-sparse codes with equal ℓ1 norm: no method can return both, so BP fails on
    at least one of them, and uniqueness (hence the guarantee) is lost."""
    H = 16
    D = dirac_hadamard(H)
    A = [0, 1, 2, 3]  # subgroup {x : x_2 = x_3 = 0} in bit order (x0 + 2 x1 + 4 x2 + 8 x3)
    Aperp = [0, 4, 8, 12]  # its annihilator
    c1 = np.zeros(2 * H, np.float32)
    c1[A] = 1.0
    c2 = np.zeros(2 * H, np.float32)
    c2[[H + j for j in Aperp]] = 1.0
    np.testing.assert_allclose(D @ c1, D @ c2, atol=1e-6)
    y = jnp.asarray(D @ c1)
    bp = sp.basis_pursuit(jnp.asarray(D), y, n_iter=1000)
    err1 = float(jnp.max(jnp.abs(bp.coef - c1)))
    err2 = float(jnp.max(jnp.abs(bp.coef - c2)))
    assert max(err1, err2) > 0.1
    om = sp.omp(jnp.asarray(D), y, 4)
    assert max(float(jnp.max(jnp.abs(om - c1))), float(jnp.max(jnp.abs(om - c2)))) > 0.1


def test_support_coherence_hand_example():
    G = jnp.array([[1.0, 0.1, 0.7], [0.1, 1.0, 0.2], [0.7, 0.2, 1.0]])
    idx = jnp.array([[0, 1], [0, 2], [1, 0]])
    valid = jnp.array([[True, True], [True, True], [True, False]])
    np.testing.assert_allclose(sp.support_coherence(G, idx, valid), [0.1, 0.7, 0.0], atol=1e-7)
    mu = jnp.array([0.7, 0.2, 0.7])
    np.testing.assert_allclose(sp.support_atom_coherence(mu, idx, valid), [0.7, 0.7, 0.2])


def test_nonneg_bp_and_lasso():
    D = jnp.asarray(dirac_hadamard(16))
    codes = sparse_codes(np.random.default_rng(4), 50, 32, 2, nonneg=True)
    Y = jnp.asarray(codes) @ D.T
    bp = sp.basis_pursuit(D, Y, nonneg=True)
    assert float(jnp.min(bp.coef)) >= 0.0
    np.testing.assert_allclose(bp.coef, codes, atol=1e-3)
    la = sp.lasso_fista(D, Y, 1e-4, n_iter=2000)
    np.testing.assert_allclose(la, codes, atol=2e-2)


def test_jit_vmap_and_single_sample():
    D = jnp.asarray(dirac_hadamard(8))
    f = jax.jit(lambda D: sp.mutual_coherence(D))
    np.testing.assert_allclose(f(D), 1 / np.sqrt(8), rtol=1e-6)
    mus = jax.vmap(sp.mutual_coherence)(jnp.stack([D, D[:, ::-1]]))
    np.testing.assert_allclose(mus, 1 / np.sqrt(8), rtol=1e-6)
    y = D[:, 3] * 2.0
    r = sp.basis_pursuit(D, y)
    assert r.coef.shape == (16,)
    np.testing.assert_allclose(r.coef[3], 2.0, atol=1e-3)


def test_bad_input():
    D = jnp.ones((4, 6))
    with pytest.raises(ValueError, match="dictionary width mismatch"):
        sp.basis_pursuit(D, jnp.ones((3, 5)))
    with pytest.raises(ValueError, match="S must be an"):
        sp.mutual_coherence(D, jnp.eye(5))
    with pytest.raises(ValueError, match=r"K=0: expected an integer >= 1 and <= 6"):
        sp.rip_constant(D, 0, jax.random.key(0))
    with pytest.raises(TypeError, match=r"K=2.5: expected an integer"):
        sp.omp(D, jnp.ones(4), 2.5)
    with pytest.raises(ValueError, match=r"n_iter=0"):
        sp.lasso_fista(D, jnp.ones(4), 0.1, n_iter=0)
    with pytest.raises(ValueError, match=r"lam=-1.0"):
        sp.lasso_fista(D, jnp.ones(4), -1.0)
    with pytest.raises(ValueError, match="2-D dictionary"):
        sp.atom_coherence(jnp.ones(4))
    with pytest.raises(ValueError, match=r"rho=0.0: expected a value in \(0.0, inf\]"):
        sp.basis_pursuit(D, jnp.ones(4), rho=0.0)
