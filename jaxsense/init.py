"""Initialisations of the factor U ∈ R^{d×r'} (Ma & Fattahi, Algorithm 2 and p. 27).

- :func:`spectral_sign_init` — Algorithm 2, used in every simulation of the paper:
  C = (1/m) Σ_i Sign(y_i)(A_i + A_iᵀ)/2 = sym(𝒜*(Sign(y)))/m; C = Λ D Λᵀ; keep the r'
  largest eigenpairs, clip negative eigenvalues to 0; U₀ = α Λ_{r'} (D₊)^{1/2}.
  Columns with a clipped eigenvalue are exactly zero and stay zero under SubGM.
- :func:`small_random_init` — U₀ = α·G with G i.i.d. N(0, 1/d) (the paper reports this
  behaves almost the same; the 1/d scaling is our choice so ‖G‖ ≈ O(1)).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxsense import _checks


def _check_common(op, y, r_search, alpha):
    d = op.d
    _checks.check_int("r_search", r_search, low=1, high=d)
    _checks.check_scalar("alpha", alpha, low=0.0, low_open=True)
    _checks.check_measurements("y", y, op)


def spectral_sign_init(op, y, r_search: int, alpha):
    """Algorithm 2. op: measurement operator, y: (m,), r_search = r' -> U₀: (d, r')."""
    _check_common(op, y, r_search, alpha)
    C = op.adjoint(jnp.sign(y)) / y.shape[-1]
    w, Lam = jnp.linalg.eigh((C + C.T) / 2)  # ascending
    w, Lam = w[::-1][:r_search], Lam[:, ::-1][:, :r_search]
    return alpha * Lam * jnp.sqrt(jnp.maximum(w, 0.0))


def small_random_init(key, d: int, r_search: int, alpha, dtype=jnp.float32):
    """U₀ = α G, G_ij ~ N(0, 1/d): (d, r')."""
    _checks.check_int("d", d, low=1)
    _checks.check_int("r_search", r_search, low=1, high=d)
    _checks.check_scalar("alpha", alpha, low=0.0, low_open=True)
    return alpha * jax.random.normal(key, (d, r_search), dtype) / jnp.sqrt(d)
