"""ℓ1 / ℓ2 losses of the factored model and their (sub)gradients (Ma & Fattahi eqs. 2–3).

With residual r = 𝒜(UUᵀ) − y (shape (m,)):
  f_ℓ1(U) = (1/m) ‖r‖₁,        Q_ℓ1 = (1/m) Σ_i Sign(r_i) A_i ∈ ∂_X f      (Sign(0) = 0)
  f_ℓ2(U) = (1/m) ‖r‖₂²,       Q_ℓ2 = (2/m) Σ_i r_i A_i = ∇_X f
and in U (eq. 3)  D = (Q + Qᵀ) U, which equals ``jax.grad`` of f wherever f is differentiable
(tested). The expected ℓ1 loss (§4, Gaussian A, no noise) is f̄_ℓ1(U) = ‖UUᵀ − X*‖_F with
sub-gradient Q̄ = (UUᵀ − X*)/‖UUᵀ − X*‖_F (E f_ℓ1 = √(2/π) f̄_ℓ1).

For the dense Gaussian operator the ℓ1 pair (f_ℓ1, Q_ℓ1) is formed in one pass over the rows
of A (``l1_pass="one"``, :meth:`DenseGaussian.l1_one_pass`) or in two (``"two"``: 𝒜(UUᵀ)
from the packed symmetric part, then 𝒜*(Sign r)); the maths is the same.
"""
from __future__ import annotations

import jax.numpy as jnp

from jaxsense import _checks

LOSSES = ("l1", "l2", "expected_l1")
L1_PASSES = ("one", "two")


def residual(op, U, y):
    """r = 𝒜(UUᵀ) − y: (m,)."""
    return op.apply_gram(U) - y


def l1_loss(op, U, y):
    """f_ℓ1(U) = (1/m)‖y − 𝒜(UUᵀ)‖₁ (eq. 2)."""
    return jnp.mean(jnp.abs(residual(op, U, y)))


def l2_loss(op, U, y):
    """f_ℓ2(U) = (1/m)‖y − 𝒜(UUᵀ)‖₂²."""
    return jnp.mean(residual(op, U, y) ** 2)


def expected_l1_loss(U, X_star):
    """f̄_ℓ1(U) = ‖UUᵀ − X*‖_F (§4)."""
    return jnp.linalg.norm(U @ U.T - X_star)


def l1_loss_and_q(op, U, y, *, l1_pass: str = "one", block_rows: int | None = None):
    """(f_ℓ1(U), Q_ℓ1) = ((1/m)‖r‖₁, (1/m) 𝒜*(Sign r)), r = 𝒜(UUᵀ) − y (eqs. 2–3); Q: (d, d).

    ``l1_pass="one"``: operators with an ``l1_one_pass`` method (the dense Gaussian one)
    read A once per call, in row blocks of ``block_rows`` (None: one block of all m rows);
    other operators (rank-one, entry sampling: no stored A_i to re-read) take the two-pass
    form. ``"two"``: r = 𝒜(UUᵀ) − y (packed symmetric part when stored), then 𝒜*(Sign r).
    """
    _checks.check_choice("l1_pass", l1_pass, L1_PASSES)
    block_rows = _checks.check_positive_int("block_rows", block_rows, allow_none=True)
    if l1_pass == "one" and hasattr(op, "l1_one_pass"):
        s, q = op.l1_one_pass(U, y, block_rows)
        m = y.shape[-1]
        return s / m, q / m
    r = residual(op, U, y)
    return jnp.mean(jnp.abs(r)), op.adjoint(jnp.sign(r)) / r.shape[-1]


def loss_and_q(kind: str, op, U, y, X_star=None, *, l1_pass: str = "one",
               block_rows: int | None = None):
    """Return (f(U), Q) for ``kind`` in {'l1', 'l2', 'expected_l1'}; Q: (d, d).

    ``l1_pass`` / ``block_rows`` choose how the ℓ1 pair is formed (:func:`l1_loss_and_q`);
    the other losses ignore them."""
    if kind == "l1":
        return l1_loss_and_q(op, U, y, l1_pass=l1_pass, block_rows=block_rows)
    if kind == "l2":
        r = residual(op, U, y)
        return jnp.mean(r**2), op.adjoint(r) * (2.0 / r.shape[-1])
    if kind == "expected_l1":
        if X_star is None:
            raise ValueError("X_star=None: the expected ℓ1 loss needs the ground truth X_star")
        M = U @ U.T - X_star
        f = jnp.linalg.norm(M)
        return f, M / jnp.where(f > 0, f, 1.0)
    raise ValueError(f"kind={kind!r}: expected one of {LOSSES}")


def direction(Q, U):
    """D = (Q + Qᵀ) U (eq. 3): the (sub)gradient in U. Q: (d, d), U: (d, r') -> (d, r')."""
    return (Q + Q.T) @ U


def subgradient(kind: str, op, U, y, X_star=None, **l1_options):
    """(f(U), D) with D ∈ ∂f(U) the (sub)gradient in U (``l1_options``: see loss_and_q)."""
    f, Q = loss_and_q(kind, op, U, y, X_star, **l1_options)
    return f, direction(Q, U)
