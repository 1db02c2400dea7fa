"""Error measures and the signal–residual decomposition (Ma & Fattahi eq. 13, §3 and §5).

With X* = V Σ Vᵀ (V: d×r) and V⊥ its orthogonal complement:
  S = Vᵀ U (r×r', signal), E = V⊥ᵀ U ((d−r)×r', residual),
  F = E P_S (part of E in the row space of S), G = E P⊥_S,
  signal term ‖Σ − S Sᵀ‖, cross term ‖S Eᵀ‖, residual term ‖E Eᵀ‖, ‖F Fᵀ‖, ‖G Gᵀ‖,
all in the spectral norm, and the eigenvalues λ₁ ≥ … ≥ λ_r of S Sᵀ (Fig. 6a).
"""
from __future__ import annotations

import jax.numpy as jnp


def sym_spectral_norm(M):
    """‖M‖₂ for a symmetric M: max |eigenvalue| (d×d, exact; used only when recording)."""
    return jnp.max(jnp.abs(jnp.linalg.eigvalsh((M + M.T) / 2)))


def spectral_norm(M):
    """‖M‖₂ of a general (small) matrix by its largest singular value."""
    return jnp.linalg.svd(M, compute_uv=False)[0]


def fro_error(U, X_star):
    """‖UUᵀ − X*‖_F."""
    return jnp.linalg.norm(U @ U.T - X_star)


def rel_fro_error(U, X_star):
    """‖UUᵀ − X*‖_F / ‖X*‖_F."""
    return fro_error(U, X_star) / jnp.linalg.norm(X_star)


def op_error(U, X_star):
    """‖UUᵀ − X*‖₂ (operator norm)."""
    return sym_spectral_norm(U @ U.T - X_star)


def decomposition(U, truth):
    """Signal/cross/residual and F/G terms of eq. 13 for U: (d, r').

    ``truth``: a :class:`jaxsense.problems.GroundTruth`. Returns a dict of scalars plus
    ``eigs``: (r,) eigenvalues of S Sᵀ in decreasing order.
    """
    S = truth.V.T @ U
    E = truth.V_perp.T @ U
    P_S = jnp.linalg.pinv(S) @ S  # projector onto the row space of S (r'×r')
    F = E @ P_S
    G = E - F
    SSt = S @ S.T
    return {
        "signal": sym_spectral_norm(jnp.diag(truth.sigma) - SSt),
        "cross": spectral_norm(S @ E.T),
        "residual": sym_spectral_norm(E @ E.T),
        "F_norm": sym_spectral_norm(F @ F.T),
        "G_norm": sym_spectral_norm(G @ G.T),
        "eigs": jnp.linalg.eigvalsh(SSt)[::-1],
    }
