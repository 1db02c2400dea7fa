"""SubGM (Algorithm 1) and GD as optax-style pairs of pure functions, and their step rules.

    solver = subgm(geometric(eta=0.2, rho=0.996))      # Algorithm 1, eq. 10
    state  = solver.init(U0)
    state, info = solver.update(state, op, y)          # one iteration, pure, jit/vmap-able

One iteration (Ma & Fattahi, Algorithm 1 / eq. 3):
    Q_t = ∂_X f(U_t Uᵀ_t)   (ℓ1: (1/m) Σ Sign(⟨A_i, U_tU_tᵀ⟩ − y_i) A_i)
    D_t = (Q_t + Q_tᵀ) U_t,   U_{t+1} = U_t − η_t D_t.
For a dense Gaussian operator the ℓ1 residuals and Q_t come from one pass over A's rows
(``l1_pass="one"``, :meth:`jaxsense.operators.DenseGaussian.l1_one_pass`) or two reads
(``"two"``); same iterates up to float rounding. "one" is the default: on this project's
CPU it was faster for a single instance and not slower for sweeps sharing the operator
(``python -m experiments.benchmarks.subgm_vs_numpy``; numbers in the README).

Step rules (pytrees: η, ρ are leaves, so a sweep can vmap over them):
- :func:`geometric` — η_t = η ρ^t / ‖Q_t‖₂ (eq. 10). ‖Q_t‖₂ comes from a power iteration
  whose vector is carried in the state (warm start). Plain warm-started power steps lose
  accuracy when the top singular vector of Q_t switches (around the iterations where a new
  eigenvalue is learned; the measured error is in the README, "On ‖Q_t‖₂ without SVD"),
  so each iteration applies (QᵀQ)^(2^s) to the carried vector, formed by s trace-normalised
  repeated squarings of QᵀQ (matmuls only: GPU-friendly, no SVD), formed in float32 by
  default (``power_filter_dtype``); σ is the 2×2 Rayleigh–Ritz value on the filtered warm
  start and a filtered fixed second vector, in Q's dtype. Its measured error against the
  SVD (64 paper-size runs) is in the README, "On ‖Q_t‖₂ without SVD";
  ``tests/test_solvers.py`` asserts the bound along a run.
  ``norm='svd'`` takes the exact value instead — slow on GPU.
- :func:`polyak` — η_t = (η/2) f(U_t): (η/2) f_ℓ1 for noiseless data (Thm 22), and with
  ``loss='expected_l1'`` (η/2) f̄_ℓ1, which makes the update exactly
  U_{t+1} = U_t − η (UUᵀ − X*) U (§4).
- :func:`constant` — η_t = η (GD on the ℓ2 loss, the non-robust baseline).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import struct
from jax.custom_batching import custom_vmap

from jaxsense import _checks
from jaxsense.losses import L1_PASSES, LOSSES, direction, loss_and_q

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


def geometric_step(eta, rho, t, q_norm, dtype):
    """The step of eq. 10 (Ma & Fattahi, JMLR 24(96), 2023): η_t = η ρ^t / ‖Q_t‖₂.

    ``eta``, ``rho``: the rule's (possibly batched) arrays; ``t``: the integer iteration;
    ``q_norm``: ‖Q_t‖₂ (any estimate); ρ^t is formed in ``dtype`` (the iterate's). A zero
    sub-gradient (q_norm = 0) gives step 0 instead of 0/0. Shared by the symmetric solver
    here and the factored one of :mod:`jaxsense.asymmetric`; pure, jit/vmap-able."""
    rho_t = rho.astype(dtype) ** t.astype(dtype)
    return jnp.where(q_norm > 0, eta * rho_t / jnp.where(q_norm > 0, q_norm, 1.0), 0.0)


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


# Batch-last elementwise squarings beat XLA's batched small matmuls on CPU up to about this
# size (see _power_batched); larger d keeps the batched matmuls.
_BATCH_LAST_MAX_D = 32


def _normalize_psd(B, trace):
    tr = trace(B)
    return B / jnp.where(tr > 0, tr, 1.0)


def _scaled(Q, filter_dtype, axes):
    """Q / max|Q| in the filter dtype (so a float32 filter cannot overflow)."""
    fdt = Q.dtype if filter_dtype is None else filter_dtype
    s = jnp.max(jnp.abs(Q), axis=axes, keepdims=True)
    return (Q / jnp.where(s > 0, s, 1.0)).astype(fdt)


def _unit(x):
    n = jnp.linalg.norm(x, axis=-1, keepdims=True)
    return x / jnp.where(n > 0, n, 1.0), n[..., 0]


def _second_vector(d, dtype):
    """A fixed generic unit vector (not the warm start), filtered alongside it."""
    v = jnp.sin(jnp.arange(1, d + 1, dtype=dtype) * 2.71828) + 0.05
    return v / jnp.linalg.norm(v)


def _ritz_pair(Q, w1, w2):
    """Largest singular value of Q on span{w₁, w₂} (Rayleigh–Ritz, 2×2, in Q's dtype).

    Q: (..., n, d); w₁ = B v (the filtered warm start), w₂ = B v₂ (a fixed second start)
    with B ≈ (QᵀQ)^(2^s). Returns (σ, unit Ritz vector). With q₁ = w₁/‖w₁‖, q₂ the unit part
    of w₂ orthogonal to q₁ and pⱼ = Q qⱼ, the projected QᵀQ is [[a, b], [b, c]] =
    [[‖p₁‖², p₁·p₂], [p₁·p₂, ‖p₂‖²]]; σ² is its top eigenvalue (≤ σ₁², interlacing).

    Why two filtered vectors: when σ₁ ≈ σ₂ the filter cannot separate the pair, but both
    filtered vectors then lie in its 2-D span and the Ritz value is exact there; when the
    pair is separated, w₁ alone is accurate and the Ritz value can only be higher. A single
    filtered vector plus a Krylov direction QᵀQw₁ is worse: float32 rounding of the filter
    leaves ~1e-7 of other directions in w₁, which swamps QᵀQw₁'s component along the pair
    (the measured errors of both designs: README, "On ‖Q_t‖₂ without SVD").
    """
    mv = lambda M, x: jnp.einsum("...ij,...j->...i", M, x)  # noqa: E731
    q1, _ = _unit(w1)
    u = w2 - jnp.sum(w2 * q1, axis=-1, keepdims=True) * q1
    u = u - jnp.sum(u * q1, axis=-1, keepdims=True) * q1  # re-orthogonalise once
    q2, nu = _unit(u)
    p1, p2 = mv(Q, q1), mv(Q, q2)
    a = jnp.sum(p1 * p1, axis=-1)
    c = jnp.sum(p2 * p2, axis=-1)
    b = jnp.where(nu > 0, jnp.sum(p1 * p2, axis=-1), 0.0)
    half = 0.5 * (a - c)
    lam = 0.5 * (a + c) + jnp.sqrt(half * half + b * b)
    # eigenvector of [[a, b], [b, c]] for lam, in the better-conditioned of its two forms
    y1 = jnp.where(half >= 0, lam - c, b)
    y2 = jnp.where(half >= 0, b, lam - a)
    v, _ = _unit(y1[..., None] * q1 + y2[..., None] * q2)
    v = jnp.where(jnp.any(v != 0, axis=-1, keepdims=True), v, q1)
    return jnp.sqrt(jnp.maximum(lam, 0.0)), v


def _filtered_pair(Q, B, v):
    """(B v, B v₂) in Q's dtype; B: (..., d, d) filter, v: (..., d) warm start."""
    V = jnp.stack([v, jnp.broadcast_to(_second_vector(v.shape[-1], v.dtype), v.shape)], -1)
    W = jnp.einsum("...ij,...jk->...ik", B.astype(Q.dtype), V)
    return W[..., 0], W[..., 1]


def _gram_outer(M):
    """Mᵀ M = Σ_k m_k m_kᵀ (m_k the rows of M) as ONE elementwise fusion of d outer products;
    for symmetric M this is M². M: (n, d) with small n."""
    C = M[0, :, None] * M[0, None, :]
    for k in range(1, M.shape[0]):
        C = C + M[k, :, None] * M[k, None, :]
    return C


def _power_single(Q, v, squarings, filter_dtype):
    """One instance. For square Q, d ≤ 32 and a float32 (or narrower) filter, QᵀQ and its
    squarings are sums of outer products (:func:`_gram_outer`), one fusion each: XLA CPU
    ran them faster than its 20×20 matmul calls in the single-instance SubGM loop (A/B
    timing: README, "Measured benchmarks"); otherwise matmuls."""
    Qf = _scaled(Q, filter_dtype, None)
    n, d = Qf.shape
    outer = n == d and d <= _BATCH_LAST_MAX_D and Qf.dtype.itemsize <= 4
    B = _normalize_psd(_gram_outer(Qf) if outer else Qf.T @ Qf, jnp.trace)
    for _ in range(squarings):
        B = _normalize_psd(_gram_outer(B) if outer else B @ B, jnp.trace)
    return _ritz_pair(Q, *_filtered_pair(Q, B, v))


def _power_batched(Q, v, squarings, filter_dtype):
    """Q: (b, n, d), v: (b, d). Same maths as :func:`_power_single`, laid out for a batch.

    For square Q, small d and a float32 filter, B = QᵀQ and its squarings all run
    batch-last, B[i, j, b] ← Σ_k B[k, i, b] B[k, j, b] / trace (= B² once B is symmetric),
    as one elementwise fusion per step vectorised over the instances, inside one
    ``fori_loop`` whose carry forces the physical batch-last layout (a bare XLA transpose
    became a strided view). On this project's CPU it beat XLA's batched float32 matmuls for
    64 instances at d = 20, and was not faster in float64, so float64 filters keep the
    batched matmuls (the sweep timings: README, "Measured benchmarks",
    ``python -m experiments.benchmarks.subgm_vs_numpy``).
    """
    n, d = Q.shape[-2:]
    Qf = _scaled(Q, filter_dtype, (-2, -1))
    if n == d and d <= _BATCH_LAST_MAX_D and Qf.dtype.itemsize <= 4 and squarings >= 1:
        def gram(_, B):
            C = B[0, :, None, :] * B[0, None, :, :]
            for k in range(1, n):
                C = C + B[k, :, None, :] * B[k, None, :, :]
            return _normalize_psd(C, lambda M: jnp.trace(M)[None, None, :])

        B = jnp.moveaxis(jax.lax.fori_loop(0, squarings + 1, gram, jnp.moveaxis(Qf, 0, -1)), -1, 0)
    else:
        trace = lambda M: jnp.trace(M, axis1=-2, axis2=-1)[:, None, None]  # noqa: E731
        B = _normalize_psd(jnp.einsum("bki,bkj->bij", Qf, Qf), trace)
        B = jax.lax.fori_loop(0, squarings, lambda _, B: _normalize_psd(B @ B, trace), B)
    return _ritz_pair(Q, *_filtered_pair(Q, B, v))


@functools.lru_cache(maxsize=None)
def _power_fn(squarings: int, filter_dtype):
    fdt = None if filter_dtype is None else jnp.dtype(filter_dtype)

    @custom_vmap
    def power(Q, v):
        return _power_single(Q, v, squarings, fdt)

    @power.def_vmap
    def _rule(axis_size, in_batched, Q, v):
        q_b, v_b = in_batched
        Q = Q if q_b else jnp.broadcast_to(Q, (axis_size,) + Q.shape)
        v = v if v_b else jnp.broadcast_to(v, (axis_size,) + v.shape)
        return _power_batched(Q, v, squarings, fdt), (True, True)

    @jax.custom_jvp
    def power_diff(Q, v):
        return power(Q, v)

    @power_diff.defjvp
    def _jvp(primals, tangents):
        # dσ₁ = u₁ᵀ dQ v₁ (simple top singular value); v is a warm start: no tangent.
        Q, v = primals
        dQ, _ = tangents
        sigma, w = power(Q, v)
        u = Q @ w
        u = u / jnp.where(sigma > 0, sigma, 1.0)
        return (sigma, w), (u @ (dQ @ w), jnp.zeros_like(w))

    return power_diff


def power_iteration(Q, v, squarings: int = 10, filter_dtype=None):
    """Spectral norm ‖Q‖₂ by the power method: v ← (QᵀQ)^(2^s) v, σ = ‖Q v‖.

    Q: (n, d) (usually (d, d)), v: (d,) unit start vector (warm start). The power 2^s is
    built by ``squarings`` = s repeated squarings B ← B²/tr(B²) of B = QᵀQ (PSD, so the trace
    is a cheap positive normaliser), so XLA sees straight-line small matmuls. The error of v
    contracts like (σ₂/σ₁)^(2^(s+1)). Returns (σ, v).

    ``filter_dtype`` (e.g. ``jnp.float32``) forms and squares B in that dtype; v ← B v and
    B is also applied to a fixed second vector, and σ comes from a 2×2 Rayleigh–Ritz step on
    the two filtered vectors, in Q's dtype (:func:`_ritz_pair`), which keeps nearly
    degenerate top pairs exact. B only selects directions, so a float32 filter costs little
    accuracy (measured errors: README, "On ‖Q_t‖₂ without SVD"). Under
    ``jax.grad``/``jax.jvp`` use dσ₁ = u₁ᵀ dQ v₁ (exact for a simple top singular value; the
    returned v carries no tangent). Under ``jax.vmap`` a custom batching rule runs the
    squarings batch-last (see
    :func:`_power_batched`; its effect on the 64-instance sweep is timed by
    ``python -m experiments.benchmarks.subgm_vs_numpy``, numbers in the README).
    """
    name = None if filter_dtype is None else jnp.dtype(filter_dtype).name
    return _power_fn(int(squarings), name)(Q, v)


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
    power_filter_dtype: str | None = struct.field(pytree_node=False, default="float32")
    l1_pass: str = struct.field(pytree_node=False, default="one")
    l1_block_rows: int | None = struct.field(pytree_node=False, default=None)

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
        f, Q = loss_and_q(self.loss, op, U, y, X_star, l1_pass=self.l1_pass,
                          block_rows=self.l1_block_rows)
        v = state.v
        if self.step.kind == "geometric":
            if self.norm == "svd":
                q_norm = jnp.linalg.norm(Q, 2)
            else:
                q_norm, v = power_iteration(Q, v, self.power_squarings, self.power_filter_dtype)
            eta_t = geometric_step(self.step.eta, self.step.rho, t, q_norm, U.dtype)
        elif self.step.kind == "polyak":
            q_norm = jnp.zeros((), U.dtype)
            eta_t = 0.5 * self.step.eta * f
        else:
            q_norm = jnp.zeros((), U.dtype)
            eta_t = self.step.eta * jnp.ones((), U.dtype)
        eta_t = eta_t.astype(U.dtype)
        U_new = U - eta_t * direction(Q, U)
        return SolverState(U=U_new, t=t + 1, v=v), StepInfo(loss=f, step=eta_t, q_norm=q_norm)


def make_solver(step: StepRule, loss: str, norm: str = "power", power_squarings: int = 10,
                power_filter_dtype: str | None = "float32", l1_pass: str = "one",
                l1_block_rows: int | None = None) -> Solver:
    """Validate the settings and build a :class:`Solver`.

    ``l1_pass`` / ``l1_block_rows``: how the ℓ1 loss and Q are formed for a dense Gaussian
    operator — ``"one"`` pass over A's rows in blocks of ``l1_block_rows`` (None: one block
    of all m rows) or ``"two"`` reads (packed 𝒜(UUᵀ), then 𝒜*(Sign r)); see
    :func:`jaxsense.losses.l1_loss_and_q`. Identical maths."""
    if not isinstance(step, StepRule):
        raise TypeError(f"step={step!r}: expected a StepRule (geometric/polyak/constant)")
    _checks.check_choice("step.kind", step.kind, STEP_KINDS)
    _checks.check_choice("loss", loss, LOSSES)
    _checks.check_choice("norm", norm, NORMS)
    _checks.check_int("power_squarings", power_squarings, low=0)
    power_filter_dtype = _checks.check_filter_dtype("power_filter_dtype", power_filter_dtype)
    _checks.check_choice("l1_pass", l1_pass, L1_PASSES)
    l1_block_rows = _checks.check_positive_int("l1_block_rows", l1_block_rows, allow_none=True)
    return Solver(step=step, loss=loss, norm=norm, power_squarings=power_squarings,
                  power_filter_dtype=power_filter_dtype, l1_pass=l1_pass,
                  l1_block_rows=l1_block_rows)


def subgm(step: StepRule | None = None, *, loss: str = "l1", **kw) -> Solver:
    """Algorithm 1: sub-gradient method on the ℓ1 loss (default geometric step, eq. 10)."""
    return make_solver(geometric() if step is None else step, loss, **kw)


def gd(step: StepRule | None = None, *, loss: str = "l2", **kw) -> Solver:
    """Gradient descent on the ℓ2 loss (the non-robust baseline), constant step by default."""
    return make_solver(constant() if step is None else step, loss, **kw)
