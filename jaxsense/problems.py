"""Ground truth, noise models and the :class:`Problem` pytree (Ma & Fattahi §2).

- Ground truth X* = V Σ Vᵀ, PSD, rank r, with a chosen spectrum (or condition number κ).
- Noise (all functions of an explicit key, jit/vmap-able in ``p``/``scale``/``nu``):
  * outliers (Def. 8): s_i = z_i·b_i with b_i ~ Bernoulli(p), z_i ~ P of any magnitude:
    'gaussian' (z ~ N(0, scale²); the paper's Fig. 1b uses N(0, 100), i.e. scale = 10),
    'uniform' (z = scale·‖𝒜(X*)‖_∞·U[−1, 1], Tong–Ma–Chi's setup), 'cauchy'
    (z = scale·Cauchy(0, 1));
  * Gaussian (Def. 9): s_i ~ N(0, ν²) for every i;
  * mixed (Remark 30): outliers plus Gaussian noise.
- y = 𝒜(X*) + s.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxsense import _checks
from jaxsense.operators import Operator, make_operator

OUTLIER_DISTRIBUTIONS = ("gaussian", "uniform", "cauchy")


@struct.dataclass
class GroundTruth:
    """X* = V diag(sigma) Vᵀ.

    X_star: (d, d); V: (d, r) orthonormal eigenvectors; V_perp: (d, d−r) its complement;
    sigma: (r,) eigenvalues in decreasing order.
    """

    X_star: jax.Array
    V: jax.Array
    V_perp: jax.Array
    sigma: jax.Array

    @property
    def d(self) -> int:
        return self.X_star.shape[-1]

    @property
    def r(self) -> int:
        return self.V.shape[-1]


@struct.dataclass
class Problem:
    """A recovery instance: operator, measurements y = 𝒜(X*) + s, truth and the noise s."""

    op: Operator
    y: jax.Array
    truth: GroundTruth
    noise: jax.Array

    @property
    def m(self) -> int:
        return self.y.shape[-1]

    @property
    def d(self) -> int:
        return self.truth.d


def spectrum_from_condition(r: int, kappa: float, top: float = 1.0) -> np.ndarray:
    """r eigenvalues geometrically spaced from ``top`` down to ``top/kappa``."""
    _checks.check_int("r", r, low=1)
    _checks.check_scalar("kappa", kappa, low=1.0)
    return top * np.asarray(kappa, float) ** (-np.linspace(0.0, 1.0, r))


def ground_truth(key, d: int, spectrum: Sequence[float], dtype=jnp.float32) -> GroundTruth:
    """PSD X* = V diag(spectrum) Vᵀ with V uniformly random orthonormal (QR of a Gaussian).

    ``spectrum``: (r,) positive eigenvalues (sorted decreasingly here).
    """
    _checks.check_int("d", d, low=1)
    _checks.check_float_dtype_arg("dtype", dtype)
    spec = np.sort(np.asarray(spectrum, dtype=float))[::-1]
    if spec.ndim != 1 or spec.size < 1 or spec.size > d:
        raise ValueError(f"spectrum={list(spectrum)!r}: expected 1..d={d} eigenvalues")
    if not np.all(spec > 0) or not np.all(np.isfinite(spec)):
        raise ValueError(f"spectrum={list(spectrum)!r}: expected finite positive eigenvalues")
    r = spec.size
    G = jax.random.normal(key, (d, d), dtype)
    Qfull, R = jnp.linalg.qr(G)
    Qfull = Qfull * jnp.sign(jnp.diagonal(R))  # Haar-uniform
    V, V_perp = Qfull[:, :r], Qfull[:, r:]
    sigma = jnp.asarray(spec, dtype)
    return GroundTruth(X_star=(V * sigma) @ V.T, V=V, V_perp=V_perp, sigma=sigma)


def truth_from_matrix(X_star, r: int) -> GroundTruth:
    """GroundTruth from a given PSD matrix, keeping its top-r eigenpairs for diagnostics."""
    d = X_star.shape[-1]
    _checks.check_shape("X_star", X_star, (d, d))
    _checks.check_int("r", r, low=1, high=d)
    w, Q = jnp.linalg.eigh((X_star + X_star.T) / 2)
    w, Q = w[::-1], Q[:, ::-1]
    return GroundTruth(X_star=X_star, V=Q[:, :r], V_perp=Q[:, r:], sigma=w[:r])


def outlier_noise(key, y_clean, p, distribution: str = "gaussian", scale=10.0):
    """Outliers (Def. 8): each s_i is, with prob. p, drawn from P, else 0.

    y_clean: (m,) = 𝒜(X*). p ∈ [0, 1); ``scale`` as described in the module docstring.
    Returns s: (m,).
    """
    _checks.check_choice("distribution", distribution, OUTLIER_DISTRIBUTIONS)
    _checks.check_scalar("p", p, low=0.0, high=1.0, high_open=True)
    _checks.check_scalar("scale", scale, low=0.0)
    kb, kz = jax.random.split(key)
    m, dtype = y_clean.shape[-1], y_clean.dtype
    mask = jax.random.uniform(kb, (m,), dtype) < p
    if distribution == "gaussian":
        z = scale * jax.random.normal(kz, (m,), dtype)
    elif distribution == "uniform":
        z = scale * jnp.max(jnp.abs(y_clean)) * jax.random.uniform(kz, (m,), dtype, -1.0, 1.0)
    else:
        z = scale * jax.random.cauchy(kz, (m,), dtype)
    return jnp.where(mask, z, jnp.zeros_like(z))


def gaussian_noise(key, m: int, nu, dtype=jnp.float32):
    """Dense Gaussian noise (Def. 9): s_i ~ N(0, ν²)."""
    _checks.check_scalar("nu", nu, low=0.0)
    return nu * jax.random.normal(key, (m,), dtype)


def make_problem(
    key,
    d: int = 20,
    r: int = 3,
    m: int = 500,
    *,
    spectrum: Sequence[float] | None = (10.0, 5.0, 1.0),
    kappa: float | None = None,
    operator: str = "gaussian",
    p=0.0,
    outlier_distribution: str = "gaussian",
    outlier_scale=10.0,
    nu=0.0,
    dtype=jnp.float32,
    op: Operator | None = None,
    truth: GroundTruth | None = None,
) -> Problem:
    """Draw a problem y = 𝒜(X*) + s with outliers (rate p) and/or Gaussian noise (ν).

    Defaults are the paper's simulation setting (d=20, r=3, m=500); the spectrum (10, 5, 1)
    is *reconstructed* (the paper does not state X*'s eigenvalues). ``kappa`` overrides the
    spectrum with r geometrically spaced eigenvalues from 1 down to 1/κ. Pass ``op`` and/or
    ``truth`` to share them between instances (a sweep over noise with one operator).
    p and nu may be traced (vmap over them); the key decides everything else.
    """
    _checks.check_int("d", d, low=1)
    _checks.check_int("r", r, low=1, high=d)
    _checks.check_int("m", m, low=1)
    _checks.check_scalar("p", p, low=0.0, high=1.0, high_open=True)
    _checks.check_scalar("nu", nu, low=0.0)
    _checks.check_float_dtype_arg("dtype", dtype)
    if kappa is not None:
        spectrum = spectrum_from_condition(r, kappa)
    if truth is None and len(spectrum) != r:
        raise ValueError(f"spectrum={tuple(spectrum)!r}: expected r={r} eigenvalues")
    k_op, k_truth, k_out, k_gauss = jax.random.split(key, 4)
    if op is None:
        op = make_operator(operator, k_op, m, d, dtype)
    else:
        _checks.check_operator_dims(op, m, d)
    if truth is None:
        truth = ground_truth(k_truth, d, spectrum, dtype)
    y_clean = op.apply(truth.X_star)
    s = outlier_noise(k_out, y_clean, p, outlier_distribution, outlier_scale)
    s = s + gaussian_noise(k_gauss, m, nu, y_clean.dtype)
    return Problem(op=op, y=y_clean + s, truth=truth, noise=s)
