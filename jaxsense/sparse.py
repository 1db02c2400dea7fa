"""Compressed-sensing tools: coherence, RIP estimates, basis pursuit and OMP — all batched.

Conventions (classical compressed sensing): a dictionary ``D`` has shape (H, N) and its
COLUMNS d_1 … d_N are the atoms; a signal is y = D δ with δ ∈ R^N. (An SAE decoder
``W_dec`` of shape (N, H) gives ``D = W_dec.T``.)

Every function takes an optional metric ``S`` (H, H), symmetric positive definite; the
inner product is ⟨u, v⟩_S = uᵀ S v and ‖u‖_S = √(uᵀ S u). ``S=None`` is the Euclidean
metric. The normalised Gram matrix G_ij = ⟨d_i, d_j⟩_S / (‖d_i‖_S ‖d_j‖_S) (atoms paper,
"AIP") underlies coherence and the RIP estimates.

Classical results used by the tests (Donoho–Elad 2003, Tropp 2004, Gershgorin):
- mutual coherence μ = max_{i≠j} |G_ij|;
- δ_K ≤ (K − 1) μ  (Gershgorin);
- every K-sparse δ is the unique sparsest representation and is recovered exactly by basis
  pursuit and by OMP when μ < 1/(2K − 1).

All public functions are pure and jit-able (shape arguments such as ``K`` are static);
batched functions take a leading batch axis and are built from matmuls / ``vmap``.
"""
from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxsense import _checks

__all__ = [
    "BPResult",
    "RIPEstimate",
    "atom_coherence",
    "basis_pursuit",
    "coherence_bound_K",
    "lasso_fista",
    "mutual_coherence",
    "normalize_atoms",
    "normalized_gram",
    "omp",
    "rip_constant",
    "rip_gershgorin_bound",
    "support_agreement",
    "support_atom_coherence",
    "support_coherence",
    "support_from_codes",
]


# ----------------------------------------------------------------------------- checks
def _check_dictionary(D, name="D"):
    if not hasattr(D, "shape") or len(D.shape) != 2:
        raise ValueError(
            f"{name} must be a 2-D dictionary of shape (H, N) with atoms as columns; "
            f"got shape {getattr(D, 'shape', type(D))}"
        )
    if D.shape[0] < 1 or D.shape[1] < 1:
        raise ValueError(f"{name} must have H >= 1 rows and N >= 1 atoms; got shape {D.shape}")
    _checks.check_real_array(name, D)  # integer D gives all-NaN normalised atoms


def _check_metric(S, H, name="S"):
    if S is None:
        return
    if not hasattr(S, "shape") or tuple(S.shape) != (H, H):
        raise ValueError(
            f"{name} must be an (H, H) = ({H}, {H}) metric matching the dictionary's "
            f"{H} rows; got shape {getattr(S, 'shape', type(S))}"
        )
    _checks.check_real_array(name, S)


def _check_signals(Y, H, name="Y"):
    if not hasattr(Y, "shape") or len(Y.shape) not in (1, 2):
        raise ValueError(f"{name} must have shape (H,) or (B, H); got {getattr(Y, 'shape', Y)}")
    if Y.shape[-1] != H:
        raise ValueError(
            f"{name} has width {Y.shape[-1]} but the dictionary has H = {H} rows "
            f"(dictionary width mismatch); expected {name}.shape[-1] == {H}"
        )
    _checks.check_real_array(name, Y)


# ----------------------------------------------------------------------------- Gram / coherence
def normalize_atoms(D, S=None):
    """Scale each column of ``D`` (H, N) to unit ‖·‖_S norm. Zero columns stay zero."""
    _check_dictionary(D)
    _check_metric(S, D.shape[0])
    return _normalize_atoms(D, S)


def _normalize_atoms(D, S=None):
    SD = D if S is None else S @ D
    nrm2 = jnp.sum(D * SD, axis=0)
    nrm = jnp.sqrt(jnp.maximum(nrm2, 0.0))
    return D / jnp.where(nrm > 0, nrm, 1.0)


def normalized_gram(D, S=None):
    """G = D̂ᵀ S D̂ with atoms normalised in ‖·‖_S: G_ij = ⟨d_i,d_j⟩_S/(‖d_i‖_S‖d_j‖_S). (N, N)."""
    _check_dictionary(D)
    _check_metric(S, D.shape[0])
    return _gram(D, S)


def _gram(D, S=None):
    Dn = _normalize_atoms(D, S)
    SD = Dn if S is None else S @ Dn
    return Dn.T @ SD


def _offdiag_abs(G):
    N = G.shape[0]
    return jnp.abs(G) * (1.0 - jnp.eye(N, dtype=G.dtype))


def atom_coherence(D, S=None, *, block: int | None = None):
    """Per-atom coherence μ_i = max_{j≠i} |G_ij| under metric S. Returns (N,).

    ``block``: compute the Gram matrix in column blocks of this many atoms (memory O(N·block)
    instead of O(N²)) — for wide dictionaries (N ≳ 20k).
    """
    _check_dictionary(D)
    _check_metric(S, D.shape[0])
    N = D.shape[1]
    if N == 1:
        return jnp.zeros((1,), D.dtype)
    if block is None or block >= N:
        return jnp.max(_offdiag_abs(_gram(D, S)), axis=1)
    Dn = _normalize_atoms(D, S)
    SD = Dn if S is None else S @ Dn
    nb = -(-N // block)
    pad = nb * block - N
    SDp = jnp.pad(SD, ((0, 0), (0, pad)))
    idx = jnp.arange(nb * block).reshape(nb, block)

    def one(args):
        cols, ids = args
        g = jnp.abs(Dn.T @ cols)  # (N, block)
        g = jnp.where(jnp.arange(N)[:, None] == ids[None, :], 0.0, g)
        g = jnp.where(ids[None, :] < N, g, 0.0)
        return jnp.max(g, axis=0)

    out = jax.lax.map(one, (SDp.T.reshape(nb, block, -1).transpose(0, 2, 1), idx))
    return out.reshape(-1)[:N]


def mutual_coherence(D, S=None):
    """Mutual coherence μ = max_{i≠j} |⟨d_i, d_j⟩_S| / (‖d_i‖_S ‖d_j‖_S) (scalar)."""
    return jnp.max(atom_coherence(D, S))


def coherence_bound_K(mu):
    """Largest K guaranteed by μ < 1/(2K − 1), i.e. K < (1 + 1/μ)/2 (Donoho–Elad)."""
    mu = jnp.asarray(mu)
    kb = 0.5 * (1.0 + 1.0 / jnp.maximum(mu, 1e-30))
    # strict inequality: largest integer strictly below kb
    return jnp.ceil(kb - 1.0).astype(jnp.int32)


def support_from_codes(codes, k_max: int, tol: float = 0.0):
    """Fixed-size supports from codes (B, N): indices (B, k_max) of the k_max largest |code|
    and a validity mask (B, k_max) marking entries with |code| > tol. Samples with more than
    k_max non-zeros are truncated (check ``(codes != 0).sum(-1) <= k_max`` if it matters)."""
    if codes.ndim != 2:
        raise ValueError(f"codes must have shape (B, N); got {codes.shape}")
    _checks.check_int("k_max", k_max, low=1, high=codes.shape[1])
    vals, idx = jax.lax.top_k(jnp.abs(codes), k_max)
    return idx, vals > tol


@jax.jit
def support_coherence(G, idx, valid):
    """Per-sample coherence of an active support: max_{i≠j ∈ T} |G_ij| (0 if |T| ≤ 1).

    G: (N, N) normalised Gram; idx, valid: (B, k) from :func:`support_from_codes`.
    Support-restricted ("does the active set itself look orthogonal?"). Returns (B,).
    """
    sub = jnp.abs(G[idx[:, :, None], idx[:, None, :]])  # (B, k, k)
    k = idx.shape[1]
    m = valid[:, :, None] & valid[:, None, :] & ~jnp.eye(k, dtype=bool)[None]
    return jnp.max(jnp.where(m, sub, 0.0), axis=(1, 2))


@jax.jit
def support_atom_coherence(mu_atoms, idx, valid):
    """max_{i ∈ T} μ_i with μ_i the per-atom coherence against ALL atoms. Returns (B,).

    (2|T| − 1) · this < 1 is a rigorous sufficient condition for exact recovery of a
    sample with support T by BP and OMP (Tropp's ERC bounded via Gershgorin)."""
    return jnp.max(jnp.where(valid, mu_atoms[idx], 0.0), axis=1)


# ----------------------------------------------------------------------------- RIP
class RIPEstimate(NamedTuple):
    """Sampled RIP constant of order K: δ̂_K = max over sampled supports T of
    max(λ_max(G_T) − 1, 1 − λ_min(G_T)). A LOWER bound on the true δ_K (the maximum over all
    supports); ``per_support`` lets one report quantiles."""

    delta: jax.Array
    lam_min: jax.Array
    lam_max: jax.Array
    per_support: jax.Array


@partial(jax.jit, static_argnames=("K", "n_supports"))
def _rip(G, key, K, n_supports):
    N = G.shape[0]
    u = jax.random.uniform(key, (n_supports, N))
    _, supp = jax.lax.top_k(u, K)  # uniformly random K-subsets
    sub = G[supp[:, :, None], supp[:, None, :]]
    ev = jnp.linalg.eigvalsh(sub)
    lo, hi = ev[:, 0], ev[:, -1]
    per = jnp.maximum(hi - 1.0, 1.0 - lo)
    return RIPEstimate(jnp.max(per), jnp.min(lo), jnp.max(hi), per)


def rip_constant(D, K: int, key, n_supports: int = 1024, S=None):
    """Estimate δ_K of the S-normalised dictionary by sampling ``n_supports`` random supports
    of size K and taking extreme eigenvalues of their Gram sub-matrices (RIP in the form
    (1−δ)‖δ‖² ≤ ‖Dδ‖_S² ≤ (1+δ)‖δ‖² for unit-S-norm atoms)."""
    _check_dictionary(D)
    _check_metric(S, D.shape[0])
    N = D.shape[1]
    _checks.check_int("K", K, low=1, high=N)
    _checks.check_int("n_supports", n_supports, low=1)
    return _rip(_gram(D, S), key, int(K), int(n_supports))


def rip_gershgorin_bound(mu, K):
    """δ_K ≤ (K − 1) μ (Gershgorin discs of the normalised Gram); meaningful when < 1."""
    return (jnp.asarray(K) - 1) * jnp.asarray(mu)


# ----------------------------------------------------------------------------- recovery
class BPResult(NamedTuple):
    """Solutions (B, N) and the final primal residual ‖Dδ − y‖ / ‖y‖ per sample (B,)."""

    coef: jax.Array
    residual: jax.Array


def _soft(v, t, nonneg):
    if nonneg:
        return jnp.maximum(v - t, 0.0)
    return jnp.sign(v) * jnp.maximum(jnp.abs(v) - t, 0.0)


@partial(jax.jit, static_argnames=("n_iter", "nonneg"))
def _bp_admm(D, Y, weights, rho, n_iter, nonneg):
    # Scale-free formulation: each y normalised to unit norm, solution rescaled back.
    scale = jnp.linalg.norm(Y, axis=1, keepdims=True)
    scale = jnp.where(scale > 0, scale, 1.0)
    Yn = Y / scale
    Dw = D / weights[None, :]  # weighted ℓ1 ⇔ plain ℓ1 over rescaled atoms
    DDt = Dw @ Dw.T
    Q = jnp.linalg.solve(DDt, Dw).T  # (N, H) = Dwᵀ (Dw Dwᵀ)⁻¹
    x0 = Yn @ Q.T  # least-norm solution (B, N)

    def proj(V):
        return V - (V @ Dw.T - Yn) @ Q.T

    def body(_, c):
        z, u = c
        x = proj(z - u)
        z = _soft(x + u, 1.0 / rho, nonneg)
        u = u + x - z
        return z, u

    z, _ = jax.lax.fori_loop(0, n_iter, body, (x0, jnp.zeros_like(x0)))
    res = jnp.linalg.norm(z @ Dw.T - Yn, axis=1)
    return BPResult(z / weights[None, :] * scale, res)


def basis_pursuit(D, Y, *, S=None, n_iter: int = 500, rho: float = 10.0, nonneg: bool = False,
                  normalize: bool = True):
    """Basis pursuit min ‖δ‖₁ s.t. D δ = y, by ADMM (Boyd et al. 2011, §6.2), vmapped as
    matmuls over a batch.

    D: (H, N) with N ≥ H and full row rank (so every y is representable); Y: (B, H) or (H,).
    ``S``/``normalize``: the ℓ1 norm is taken over atoms normalised in ‖·‖_S (a weighted ℓ1
    with weights ‖d_i‖_S); equality constraints are metric-invariant. ``nonneg``: add δ ≥ 0.
    ``rho``: ADMM penalty for unit-norm y (each y is normalised internally and the solution
    rescaled, so ``rho`` is scale-free). Returns :class:`BPResult`.
    """
    _check_dictionary(D)
    H, N = D.shape
    _check_metric(S, H)
    _check_signals(Y, H)
    _checks.check_int("n_iter", n_iter, low=1)
    _checks.check_scalar("rho", rho, low=0.0, low_open=True)
    single = Y.ndim == 1
    Y2 = Y[None] if single else Y
    if normalize:
        SD = D if S is None else S @ D
        w = jnp.sqrt(jnp.maximum(jnp.sum(D * SD, axis=0), 1e-30))
    else:
        w = jnp.ones((N,), D.dtype)
    out = _bp_admm(D, Y2, w.astype(D.dtype), jnp.asarray(rho, D.dtype), int(n_iter), bool(nonneg))
    if single:
        return BPResult(out.coef[0], out.residual[0])
    return out


@partial(jax.jit, static_argnames=("n_iter", "nonneg"))
def _fista(D, Y, lam, n_iter, nonneg):
    L = jnp.linalg.norm(D, 2) ** 2
    DtY = Y @ D  # (B, N)
    G = D.T @ D

    def body(_, c):
        x, z, t = c
        grad = z @ G - DtY
        xn = _soft(z - grad / L, lam / L, nonneg)
        tn = 0.5 * (1 + jnp.sqrt(1 + 4 * t * t))
        z = xn + ((t - 1) / tn) * (xn - x)
        return xn, z, tn

    x0 = jnp.zeros((Y.shape[0], D.shape[1]), D.dtype)
    x, _, _ = jax.lax.fori_loop(0, n_iter, body, (x0, x0, jnp.asarray(1.0, D.dtype)))
    return x


def lasso_fista(D, Y, lam: float, *, n_iter: int = 500, nonneg: bool = False):
    """LASSO min ½‖Dδ − y‖² + lam‖δ‖₁ by FISTA (Beck & Teboulle 2009), batched. (B, N)."""
    _check_dictionary(D)
    _check_signals(Y, D.shape[0])
    _checks.check_scalar("lam", lam, low=0.0)
    _checks.check_int("n_iter", n_iter, low=1)
    single = Y.ndim == 1
    out = _fista(D, Y[None] if single else Y, jnp.asarray(lam, D.dtype), int(n_iter), bool(nonneg))
    return out[0] if single else out


@partial(jax.jit, static_argnames=("K",))
def _omp(D, Y, K):
    N = D.shape[1]
    ar = jnp.arange(K)

    def one(y):
        def body(k, c):
            idx, chosen, r = c
            corr = jnp.abs(D.T @ r)
            corr = jnp.where(chosen, -jnp.inf, corr)
            j = jnp.argmax(corr)
            idx = idx.at[k].set(j)
            chosen = chosen.at[j].set(True)
            on = ar <= k
            A = D[:, idx] * on[None, :]
            Gm = A.T @ A + jnp.diag(jnp.where(on, 0.0, 1.0).astype(D.dtype))
            c_ = jnp.linalg.solve(Gm, A.T @ y)
            r = y - A @ c_
            return idx, chosen, r

        idx0 = jnp.zeros((K,), jnp.int32)
        idx, _, _ = jax.lax.fori_loop(
            0, K, body, (idx0, jnp.zeros((N,), bool), y))
        A = D[:, idx]
        c_ = jnp.linalg.solve(A.T @ A + 1e-12 * jnp.eye(K, dtype=D.dtype), A.T @ y)
        return jnp.zeros((N,), D.dtype).at[idx].add(c_)

    return jax.vmap(one)(Y)


def omp(D, Y, K: int, *, S=None):
    """Orthogonal matching pursuit with a fixed number K of steps (``lax.fori_loop``),
    vmapped over samples. Atoms are selected by |⟨d̂_i, r⟩_S| with S-normalised atoms.
    D: (H, N); Y: (B, H) or (H,). Returns coefficients (B, N) in the ORIGINAL atom scale."""
    _check_dictionary(D)
    H, N = D.shape
    _check_metric(S, H)
    _check_signals(Y, H)
    _checks.check_int("K", K, low=1, high=min(H, N))
    if S is None:
        Dn = _normalize_atoms(D)
        Yw = Y
    else:  # whiten: S = W Wᵀ with W = S^{1/2}; ⟨u, v⟩_S = (Wu)·(Wv)
        ev, V = jnp.linalg.eigh(S)
        W = (V * jnp.sqrt(jnp.maximum(ev, 0.0))) @ V.T
        Dn = _normalize_atoms(W @ D)
        Yw = Y @ W.T
    w = jnp.linalg.norm(Dn, axis=0) / jnp.maximum(
        jnp.linalg.norm(D if S is None else W @ D, axis=0), 1e-30)
    single = Y.ndim == 1
    c = _omp(Dn, Yw[None] if single else Yw, int(K)) * w[None, :]
    return c[0] if single else c


def support_agreement(codes_true, codes_est, tol: float = 1e-6, relative: bool = True):
    """Support agreement per sample between two code arrays (B, N). An entry is "on" when
    |c| > tol (× max_i |c_i| of that sample if ``relative``). Returns a dict of (B,) arrays:
    ``exact`` (supports identical), ``jaccard``, ``precision`` and ``recall`` (of est vs true).
    """
    a, b = jnp.abs(codes_true), jnp.abs(codes_est)
    if relative:
        ta = tol * jnp.max(a, axis=-1, keepdims=True)
        tb = tol * jnp.max(b, axis=-1, keepdims=True)
    else:
        ta = tb = tol
    sa, sb = a > ta, b > tb
    inter = jnp.sum(sa & sb, -1)
    union = jnp.sum(sa | sb, -1)
    na, nb = jnp.sum(sa, -1), jnp.sum(sb, -1)
    return {
        "exact": jnp.all(sa == sb, axis=-1),
        "jaccard": jnp.where(union > 0, inter / jnp.maximum(union, 1), 1.0),
        "precision": jnp.where(nb > 0, inter / jnp.maximum(nb, 1), 1.0),
        "recall": jnp.where(na > 0, inter / jnp.maximum(na, 1), 1.0),
    }
