"""Empirical ℓ2-RIP and Sign-RIP constants, and the scaling function φ(X) (Ma & Fattahi §3).

ℓ2-RIP (Def. 4): (1−δ)‖M‖_F² ≤ (1/m)‖𝒜(M)‖² ≤ (1+δ)‖M‖_F² for rank-k M.
  :func:`l2_rip_constant` estimates δ by Monte-Carlo over random unit-Frobenius rank-k M
  (``mode='random'``) or by projected ascent/descent of (1/m)‖𝒜(M)‖² on the set of unit
  rank-k matrices (``mode='adversarial'``: M ← P_k(M ± τ·(2/m)𝒜*𝒜(M)), renormalised; the
  projected power method for the largest / smallest restricted eigenvalue). Random sampling
  gives a lower bound on the true δ; the adversarial mode gives a larger (tighter) lower bound.

Sign-RIP (Def. 7): for nonzero ε-approximate rank-k X, Y and Q ∈ 𝒬(X),
  ⟨Q − φ(X) X/‖X‖_F , Y/‖Y‖_F⟩ ≤ φ(X) δ,    𝒬(X) = (1/m) Σ_i Sign(⟨A_i, X⟩ − s_i) A_i.
  :func:`sign_rip_constant` estimates δ as the largest value of
  ⟨Q(X) − φ(X) X̂, Ŷ⟩ / φ(X) found, over
    * random pairs (X, Y) of ε-approximate rank-k matrices (``delta_pairs``), and
    * for each sampled X, the supremum over exact rank-k unit Y, which is closed-form:
      sup_Y ⟨G, Y⟩ = ‖P_k(G)‖_F (Frobenius norm of the best rank-k approximation of G;
      with ``symmetric=True`` the best symmetric rank-k one, from the k largest |eigenvalues|
      of sym(G)) — reported as ``delta``.
  ``mode='adversarial'`` additionally runs projected ascent on δ over X (rank-k, fixed
  ‖X‖_F): Sign is piecewise constant, so the ascent direction is the gradient of a
  tanh-smoothed surrogate (temperature annealed from 0.3‖X‖ down to 0.01‖X‖, our choice),
  the iterate is projected back to rank k and to the sphere, and the EXACT (unsmoothed) δ
  is evaluated at every iterate; the maximum is reported.

φ(X) (the scaling of Sign-RIP):
  Thm 10 (outliers, rate p, any zero-mean P):  φ = √(2/π)(1 − p + p E_s[exp(−s²/(2‖X‖_F²))]),
    :func:`phi_outliers` — E_s from samples of P, or closed form for P = N(0, σ²):
    E exp(−s²/(2x²)) = x/√(x² + σ²).
  Thm 11 (Gaussian noise N(0, ν²)):  φ = √(2/π) ‖X‖_F/√(‖X‖_F² + ν²)  (:func:`phi_gaussian`).
Both are the exact expectation E[𝒬(X)] = φ(X) X/‖X‖_F for Gaussian A (tested: the
deviation of the empirical Q shrinks like 1/√m).

All estimators work with any operator of :mod:`jaxsense.operators` (apply/adjoint); batches
of X become single matmuls for :class:`DenseGaussian`.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxsense import _checks

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
MODES = ("random", "adversarial")


# ----------------------------------------------------------------------------- φ(X)
def phi_gaussian(x_norm, nu):
    """Thm 11: φ(X) = √(2/π) ‖X‖_F / √(‖X‖_F² + ν²). ``x_norm`` = ‖X‖_F (any shape)."""
    _checks.check_scalar("nu", nu, low=0.0)
    _checks.check_scalar("x_norm", x_norm, low=0.0, low_open=True)
    x = jnp.asarray(x_norm)
    return SQRT_2_OVER_PI * x / jnp.sqrt(x**2 + jnp.asarray(nu, x.dtype) ** 2)


def phi_outliers(x_norm, p, *, sigma=None, samples=None):
    """Thm 10: φ(X) = √(2/π)(1 − p + p E_s[exp(−s²/(2‖X‖_F²))]), s ~ P (the outlier law).

    Give exactly one of ``sigma`` (P = N(0, σ²), closed form E = x/√(x²+σ²)) or ``samples``
    ((n,) draws from any P; Monte-Carlo mean). ``x_norm`` = ‖X‖_F (scalar or array).
    """
    _checks.check_scalar("p", p, low=0.0, high=1.0, high_open=True)
    _checks.check_scalar("x_norm", x_norm, low=0.0, low_open=True)
    if (sigma is None) == (samples is None):
        raise ValueError(f"sigma={sigma!r}, samples=<{'None' if samples is None else 'array'}>: "
                         "expected exactly one of them")
    x = jnp.asarray(x_norm)
    if sigma is not None:
        _checks.check_scalar("sigma", sigma, low=0.0)
        e = x / jnp.sqrt(x**2 + jnp.asarray(sigma, x.dtype) ** 2)
    else:
        samples = jnp.asarray(samples)
        if samples.ndim != 1 or samples.shape[0] < 1:
            raise ValueError(f"samples: expected shape (n,) with n >= 1, got {samples.shape}")
        _checks.check_finite("samples", samples)
        e = jnp.mean(jnp.exp(-(samples[None, :] ** 2) / (2.0 * jnp.reshape(x, (-1, 1)) ** 2)), axis=-1)
        e = jnp.reshape(e, x.shape)
    return SQRT_2_OVER_PI * (1.0 - p + p * e)


def empirical_q(op, X, s=None):
    """𝒬(X) = (1/m) Σ_i Sign(⟨A_i, X⟩ − s_i) A_i, Sign(0) = 0. X: (..., d, d) -> (..., d, d).

    With X = UUᵀ − X* and s the noise this is exactly the ℓ1 sub-gradient Q of Algorithm 1.
    """
    r = op.apply(X)
    if s is not None:
        r = r - s
    return _adjoint(op, jnp.sign(r)) / op.m


def _adjoint(op, v):
    if v.ndim == 1:
        return op.adjoint(v)
    lead = v.shape[:-1]
    out = jax.vmap(op.adjoint)(v.reshape((-1, v.shape[-1])))
    return out.reshape(lead + out.shape[-2:])


# ----------------------------------------------------------------------------- sampling
def _check_common(op, k, n_samples, eps=0.0):
    if not all(hasattr(op, a) for a in ("apply", "adjoint", "d", "m")):
        raise TypeError(f"op={type(op).__name__}: expected a jaxsense operator (apply/adjoint/d/m)")
    _checks.check_int("k", k, low=1, high=op.d)
    _checks.check_int("n_samples", n_samples, low=1)
    _checks.check_scalar("eps", eps, low=0.0)


def random_low_rank(key, d: int, k: int, n: int, *, eps=0.0, symmetric: bool = True,
                    dtype=jnp.float32):
    """n random unit-Frobenius ε-approximate rank-k matrices: (n, d, d).

    X = (X' + E)/‖X' + E‖_F where X' is rank-k with ‖X'‖_F = 1 (symmetric: W diag(λ) Wᵀ
    with Gaussian W (d×k) and λ of random signs, like UUᵀ − X*; otherwise L Rᵀ with
    Gaussian factors) and E is a random direction with ‖E‖_F = ε·u, u ~ U[0, 1], so before the final
    normalisation ‖X − X'‖_F ≤ ε.
    """
    _checks.check_int("d", d, low=1)
    _checks.check_int("k", k, low=1, high=d)
    _checks.check_int("n", n, low=1)
    _checks.check_scalar("eps", eps, low=0.0)
    return _random_low_rank(key, int(d), int(k), int(n), jnp.asarray(eps, dtype), bool(symmetric),
                            jnp.dtype(dtype))


@partial(jax.jit, static_argnames=("d", "k", "n", "symmetric", "dtype"))
def _random_low_rank(key, d, k, n, eps, symmetric, dtype):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    if symmetric:
        W = jax.random.normal(k1, (n, d, k), dtype)
        lam = jax.random.normal(k2, (n, k), dtype)
        Xp = jnp.einsum("nik,nk,njk->nij", W, lam, W)
    else:
        L = jax.random.normal(k1, (n, d, k), dtype)
        R = jax.random.normal(k2, (n, d, k), dtype)
        Xp = L @ jnp.swapaxes(R, -1, -2)
    Xp = Xp / jnp.linalg.norm(Xp, axis=(-2, -1), keepdims=True)
    E = jax.random.normal(k3, (n, d, d), dtype)
    if symmetric:
        E = E + jnp.swapaxes(E, -1, -2)
    E = E / jnp.linalg.norm(E, axis=(-2, -1), keepdims=True)
    E = E * (eps * jax.random.uniform(k4, (n, 1, 1), dtype))
    X = Xp + E
    return X / jnp.linalg.norm(X, axis=(-2, -1), keepdims=True)


def project_rank(X, k: int, symmetric: bool = True):
    """Best rank-k approximation in Frobenius norm (symmetric: k largest |eigenvalues|)."""
    if symmetric:
        w, V = jnp.linalg.eigh((X + jnp.swapaxes(X, -1, -2)) / 2)
        idx = jnp.argsort(-jnp.abs(w), axis=-1)[..., :k]
        w = jnp.take_along_axis(w, idx, -1)
        V = jnp.take_along_axis(V, idx[..., None, :], -1)
        return jnp.einsum("...ik,...k,...jk->...ij", V, w, V)
    Uu, S, Vt = jnp.linalg.svd(X, full_matrices=False)
    return (Uu[..., :, :k] * S[..., None, :k]) @ Vt[..., :k, :]


def rank_k_norm(G, k: int, symmetric: bool = True):
    """sup over unit rank-k Y of ⟨G, Y⟩ = ‖P_k(G)‖_F (symmetric Y: uses sym(G))."""
    if symmetric:
        w = jnp.linalg.eigvalsh((G + jnp.swapaxes(G, -1, -2)) / 2)
        top = -jnp.sort(-jnp.abs(w), axis=-1)[..., :k]
    else:
        top = jnp.linalg.svd(G, compute_uv=False)[..., :k]
    return jnp.sqrt(jnp.sum(top**2, axis=-1))


def _unit(X):
    return X / jnp.linalg.norm(X, axis=(-2, -1), keepdims=True)


# ----------------------------------------------------------------------------- ℓ2-RIP
class L2RIPEstimate(NamedTuple):
    """delta = max(hi − 1, 1 − lo); lo/hi = min/max of (1/m)‖𝒜(M)‖² over the unit rank-k M
    tried; ratios: (n_samples,) the values at the random samples (or at the final iterates)."""

    delta: jax.Array
    lo: jax.Array
    hi: jax.Array
    ratios: jax.Array


def _ratios(op, M):
    return jnp.sum(op.apply(M) ** 2, axis=-1) / op.m


@partial(jax.jit, static_argnames=("k", "n_samples", "symmetric", "mode", "steps"))
def _l2_rip(op, key, k, n_samples, symmetric, mode, steps, lr):
    M = _random_low_rank(key, op.d, k, n_samples, 0.0, symmetric, op.dtype)
    r0 = _ratios(op, M)
    if mode == "random":
        return L2RIPEstimate(jnp.maximum(r0.max() - 1, 1 - r0.min()), r0.min(), r0.max(), r0)

    def grad(M):  # ∇_M (1/m)‖𝒜(M)‖² = (2/m) 𝒜*(𝒜(M))
        return 2.0 * _adjoint(op, op.apply(M)) / op.m

    def body(_, carry):
        Mu, Md, hi, lo = carry
        # ascent and descent projected in ONE batched eigh: two independent batched eigh
        # calls run concurrently on XLA's CPU intra-op pool, and each (jaxlib's LAPACK
        # ParallelBatchMap) blocks a pool thread waiting for sub-tasks queued on that same
        # pool, so on a 2-thread pool the loop deadlocked (seen on a 2-core CPU, jax 0.10.2)
        n = Mu.shape[0]
        both = _unit(project_rank(jnp.concatenate([Mu + lr * grad(Mu), Md - lr * grad(Md)]),
                                  k, symmetric))
        Mu, Md = both[:n], both[n:]
        return Mu, Md, jnp.maximum(hi, _ratios(op, Mu)), jnp.minimum(lo, _ratios(op, Md))

    _, _, hi, lo = jax.lax.fori_loop(0, steps, body, (M, M, r0, r0))
    return L2RIPEstimate(jnp.maximum(hi.max() - 1, 1 - lo.min()), lo.min(), hi.max(),
                         jnp.concatenate([lo, hi]))


def l2_rip_constant(op, key, k: int, n_samples: int = 1024, *, mode: str = "random",
                    symmetric: bool = True, steps: int = 50, lr: float = 0.2) -> L2RIPEstimate:
    """Empirical ℓ2-RIP constant δ_k of ``op`` (Def. 4): a lower bound on the true δ.

    ``mode='random'``: max |(1/m)‖𝒜(M)‖² − 1| over ``n_samples`` random unit rank-k M
    (symmetric by default, like UUᵀ − X*). ``mode='adversarial'``: additionally ``steps`` of
    projected ascent (and descent) of (1/m)‖𝒜(M)‖² from each sample with step ``lr``.
    Returns :class:`L2RIPEstimate` (``.delta`` is the estimate).
    """
    _check_common(op, k, n_samples)
    _checks.check_choice("mode", mode, MODES)
    _checks.check_int("steps", steps, low=1)
    _checks.check_scalar("lr", lr, low=0.0, low_open=True)
    return _l2_rip(op, key, int(k), int(n_samples), bool(symmetric), mode, int(steps),
                   jnp.asarray(lr, op.dtype))


# ----------------------------------------------------------------------------- Sign-RIP
class SignRIPEstimate(NamedTuple):
    """delta: max over sampled X of sup_Y (rank-k) ⟨Q − φX̂, Ŷ⟩/φ; delta_pairs: max over the
    random (X, Y) pairs; per_x: (n,) the sup_Y value per X; phi: (n,) φ(X) used."""

    delta: jax.Array
    delta_pairs: jax.Array
    per_x: jax.Array
    phi: jax.Array


def _sign_rip_terms(op, X, s, phi_fn, k, symmetric):
    """X: (n, d, d) with ‖X‖_F = x_scale -> (per-X sup_Y value, G, φ)."""
    xn = jnp.linalg.norm(X, axis=(-2, -1))
    phi = phi_fn(xn)
    G = empirical_q(op, X, s) - phi[:, None, None] * X / xn[:, None, None]
    return rank_k_norm(G, k, symmetric) / phi, G, phi


@partial(jax.jit, static_argnames=("phi_fn", "k", "n_samples", "symmetric", "mode", "steps"))
def _sign_rip(op, key, s, phi_fn, k, n_samples, eps, x_scale, symmetric, mode, steps, lr):
    kx, ky = jax.random.split(key)
    X = x_scale * _random_low_rank(kx, op.d, k, n_samples, eps, symmetric, op.dtype)
    Y = _random_low_rank(ky, op.d, k, n_samples, eps, symmetric, op.dtype)
    per_x, G, phi = _sign_rip_terms(op, X, s, phi_fn, k, symmetric)
    pairs = jnp.sum(G * Y, axis=(-2, -1)) / phi
    if mode == "adversarial":
        m = op.m
        sv = jnp.zeros((m,), op.dtype) if s is None else s

        def surrogate(X, Yhat, tau):  # smoothed ⟨Q(X) − φ X̂, Ŷ⟩/φ (one X)
            xn = jnp.linalg.norm(X)
            q = jnp.tanh((op.apply(X) - sv) / tau)
            phi = phi_fn(xn)
            return (jnp.dot(q, op.apply(Yhat)) / m - phi * jnp.sum(X * Yhat) / xn) / phi

        g_fn = jax.vmap(jax.grad(surrogate), in_axes=(0, 0, None))

        def body(i, carry):
            X, best = carry
            per, G, _ = _sign_rip_terms(op, X, s, phi_fn, k, symmetric)
            best = jnp.maximum(best, per)
            Yhat = _unit(project_rank(G, k, symmetric))
            frac = i / jnp.maximum(steps - 1, 1)
            tau = x_scale * 0.3 * (0.01 / 0.3) ** frac
            g = g_fn(X, Yhat, tau)
            X = project_rank(X + lr * x_scale * _unit(g), k, symmetric)
            return x_scale * _unit(X), best

        X, per_x = jax.lax.fori_loop(0, steps, body, (X, per_x))
        per_x = jnp.maximum(per_x, _sign_rip_terms(op, X, s, phi_fn, k, symmetric)[0])
    return SignRIPEstimate(per_x.max(), pairs.max(), per_x, phi)


def sign_rip_constant(op, key, k: int, n_samples: int = 256, *, s=None,
                      phi: Callable | None = None, eps=0.0, x_scale=1.0, mode: str = "random",
                      symmetric: bool = True, steps: int = 100, lr: float = 0.05) -> SignRIPEstimate:
    """Empirical Sign-RIP constant δ (Def. 7) of ``op`` with noise ``s``: a lower bound.

    op: operator; s: (m,) noise vector (None = noiseless); phi: callable ‖X‖_F -> φ(X)
    (default √(2/π), the noiseless value; use ``partial(phi_outliers, p=.., sigma=..)`` or
    ``partial(phi_gaussian, nu=..)`` for Thms 10/11); X and Y are ε-approximate rank-k with
    ‖X‖_F = ``x_scale``. ``mode='adversarial'`` adds projected ascent over X (``steps``,
    relative step ``lr``). Returns :class:`SignRIPEstimate` (``.delta`` is the estimate).
    """
    _check_common(op, k, n_samples, eps)
    _checks.check_choice("mode", mode, MODES)
    _checks.check_scalar("x_scale", x_scale, low=0.0, low_open=True)
    _checks.check_int("steps", steps, low=1)
    _checks.check_scalar("lr", lr, low=0.0, low_open=True)
    if s is not None:
        s = jnp.asarray(s)
        _checks.check_measurements("s", s, op)
    if phi is None:
        phi = _phi_noiseless
    elif not callable(phi):
        raise TypeError(f"phi={phi!r}: expected a callable ‖X‖_F -> φ(X)")
    dt = op.dtype
    return _sign_rip(op, key, s, phi, int(k), int(n_samples), jnp.asarray(eps, dt),
                     jnp.asarray(x_scale, dt), bool(symmetric), mode, int(steps), jnp.asarray(lr, dt))


def _phi_noiseless(x_norm):
    return SQRT_2_OVER_PI * jnp.ones_like(x_norm)


def q_deviation(op, X, s, phi_value):
    """‖𝒬(X) − φ(X) X/‖X‖_F‖_F for X: (d, d) (or batched (n, d, d)) and φ(X) given."""
    Xn = jnp.linalg.norm(X, axis=(-2, -1), keepdims=True)
    phi_value = jnp.asarray(phi_value)[..., None, None] if np.ndim(phi_value) else phi_value
    return jnp.linalg.norm(empirical_q(op, X, s) - phi_value * X / Xn, axis=(-2, -1))
