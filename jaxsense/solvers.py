"""SubGM (Algorithm 1) and GD as optax-style pairs of pure functions, and their step rules.

    solver = subgm(geometric(eta=0.2, rho=0.996))      # Algorithm 1, eq. 10
    state  = solver.init(U0)
    state, info = solver.update(state, op, y)          # one iteration, pure, jit/vmap-able

One iteration (Ma & Fattahi, Algorithm 1 / eq. 3):
    Q_t = ∂_X f(U_t Uᵀ_t)   (ℓ1: (1/m) Σ Sign(⟨A_i, U_tU_tᵀ⟩ − y_i) A_i)
    D_t = (Q_t + Q_tᵀ) U_t,   U_{t+1} = U_t − η_t D_t.

Step rules (pytrees: η, ρ are leaves, so a sweep can vmap over them):
- :func:`geometric` — η_t = η ρ^t / ‖Q_t‖₂ (eq. 10). ‖Q_t‖₂ comes from a power iteration
  whose vector is carried in the state (warm start). Plain warm-started power steps lose
  accuracy when the top singular vector of Q_t switches (measured: up to 20–40% relative
  error with 3 steps/iteration around the iterations where a new eigenvalue is learned),
  so each iteration applies (QᵀQ)^(2^s) to the carried vector, formed by s trace-normalised
  repeated squarings of QᵀQ (matmuls only: GPU-friendly, no SVD). s = 10 measured
  ≤ 2e-15 relative error against the SVD along 6000-step runs at the paper's size.
  ``norm='svd'`` takes the exact value instead — slow on GPU.
- :func:`polyak` — η_t = (η/2) f(U_t): (η/2) f_ℓ1 for noiseless data (Thm 22), and with
  ``loss='expected_l1'`` (η/2) f̄_ℓ1, which makes the update exactly
  U_{t+1} = U_t − η (UUᵀ − X*) U (§4).
- :func:`constant` — η_t = η (GD on the ℓ2 loss, the non-robust baseline).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from jaxsense import _checks
from jaxsense.losses import LOSSES, direction, loss_and_q

STEP_KINDS = ("geometric", "polyak", "constant")
NORMS = ("power", "svd")


@struct.dataclass
class StepRule:
    """η_t rule. ``kind`` is static; ``eta`` and ``rho`` are (possibly batched) leaves."""

    eta: jax.Array
    rho: jax.Array
    kind: str = struct.field(pytree_node=False, default="geometric")


def geometric(eta=0.2, rho=0.996) -> StepRule:
    """η_t = η ρ^t / ‖Q_t‖₂ (eq. 10). η > 0, ρ ∈ (0, 1]."""
    _checks.check_scalar("eta", eta, low=0.0, low_open=True)
    _checks.check_scalar("rho", rho, low=0.0, high=1.0, low_open=True)
    return StepRule(eta=jnp.asarray(eta), rho=jnp.asarray(rho), kind="geometric")


def polyak(eta=1.0) -> StepRule:
    """η_t = (η/2) f(U_t) (Thm 22; with the expected loss, §4)."""
    _checks.check_scalar("eta", eta, low=0.0, low_open=True)
    return StepRule(eta=jnp.asarray(eta), rho=jnp.asarray(1.0), kind="polyak")


def constant(eta=0.01) -> StepRule:
    """η_t = η."""
    _checks.check_scalar("eta", eta, low=0.0, low_open=True)
    return StepRule(eta=jnp.asarray(eta), rho=jnp.asarray(1.0), kind="constant")


class SolverState(NamedTuple):
    """U: (d, r'); t: iteration counter; v: (d,) power-iteration vector (warm start)."""

    U: jax.Array
    t: jax.Array
    v: jax.Array


class StepInfo(NamedTuple):
    """Per-iteration scalars, evaluated at U_t (before the update)."""

    loss: jax.Array
    step: jax.Array
    q_norm: jax.Array


def _safe_normalize(x):
    n = jnp.linalg.norm(x)
    return x / jnp.where(n > 0, n, 1.0)


def power_iteration(Q, v, squarings: int = 10):
    """Spectral norm ‖Q‖₂ by the power method: v ← (QᵀQ)^(2^s) v, σ = ‖Q v‖.

    Q: (d, d) (or (n, d)), v: (d,) unit start vector (warm start). The power 2^s is built by
    ``squarings`` = s repeated squarings B ← B²/tr(B²) of B = QᵀQ (PSD, so the trace is a
    cheap positive normaliser), unrolled so that XLA sees straight-line small matmuls. The
    error of v contracts like (σ₂/σ₁)^(2^(s+1)). Returns (σ, v).
    """

    def normalize_psd(B):
        tr = jnp.trace(B)
        return B / jnp.where(tr > 0, tr, 1.0)

    B = normalize_psd(Q.T @ Q)
    for _ in range(squarings):
        B = normalize_psd(B @ B)
    v = _safe_normalize(B @ v)
    return jnp.linalg.norm(Q @ v), v


def _start_vector(d, dtype):
    # Deterministic, generic start (not orthogonal to any fixed direction in practice).
    v = jnp.cos(jnp.arange(1, d + 1, dtype=dtype) * 1.2345) + 0.1
    return v / jnp.linalg.norm(v)


@struct.dataclass
class Solver:
    """(init, update) pair over :class:`SolverState`. ``step`` is a pytree (vmappable)."""

    step: StepRule
    loss: str = struct.field(pytree_node=False, default="l1")
    norm: str = struct.field(pytree_node=False, default="power")
    power_squarings: int = struct.field(pytree_node=False, default=10)

    def init(self, U0) -> SolverState:
        """U0: (d, r') -> state."""
        U0 = jnp.asarray(U0)
        if U0.ndim != 2:
            raise ValueError(f"U0: expected shape (d, r'), got {U0.shape}")
        _checks.check_float_dtype("U0", U0)
        return SolverState(U=U0, t=jnp.zeros((), jnp.int32), v=_start_vector(U0.shape[0], U0.dtype))

    def update(self, state: SolverState, op, y, X_star=None):
        """One iteration: returns (new_state, StepInfo at U_t)."""
        U, t = state.U, state.t
        f, Q = loss_and_q(self.loss, op, U, y, X_star)
        v = state.v
        if self.step.kind == "geometric":
            if self.norm == "svd":
                q_norm = jnp.linalg.norm(Q, 2)
            else:
                q_norm, v = power_iteration(Q, v, self.power_squarings)
            rho_t = self.step.rho.astype(U.dtype) ** t.astype(U.dtype)
            eta_t = jnp.where(q_norm > 0, self.step.eta * rho_t / jnp.where(q_norm > 0, q_norm, 1.0), 0.0)
        elif self.step.kind == "polyak":
            q_norm = jnp.zeros((), U.dtype)
            eta_t = 0.5 * self.step.eta * f
        else:
            q_norm = jnp.zeros((), U.dtype)
            eta_t = self.step.eta * jnp.ones((), U.dtype)
        eta_t = eta_t.astype(U.dtype)
        U_new = U - eta_t * direction(Q, U)
        return SolverState(U=U_new, t=t + 1, v=v), StepInfo(loss=f, step=eta_t, q_norm=q_norm)


def make_solver(step: StepRule, loss: str, norm: str = "power", power_squarings: int = 10) -> Solver:
    if not isinstance(step, StepRule):
        raise TypeError(f"step={step!r}: expected a StepRule (geometric/polyak/constant)")
    if step.kind not in STEP_KINDS:
        raise ValueError(f"step.kind={step.kind!r}: expected one of {STEP_KINDS}")
    if loss not in LOSSES:
        raise ValueError(f"loss={loss!r}: expected one of {LOSSES}")
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r}: expected one of {NORMS}")
    _checks.check_int("power_squarings", power_squarings, low=0)
    return Solver(step=step, loss=loss, norm=norm, power_squarings=power_squarings)


def subgm(step: StepRule | None = None, *, loss: str = "l1", **kw) -> Solver:
    """Algorithm 1: sub-gradient method on the ℓ1 loss (default geometric step, eq. 10)."""
    return make_solver(geometric() if step is None else step, loss, **kw)


def gd(step: StepRule | None = None, *, loss: str = "l2", **kw) -> Solver:
    """Gradient descent on the ℓ2 loss (the non-robust baseline), constant step by default."""
    return make_solver(constant() if step is None else step, loss, **kw)
