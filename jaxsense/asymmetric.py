"""The asymmetric problem X* = L* R*ᵀ and two sub-gradient solvers on factors X = L Rᵀ.

Problem: X* ∈ R^{n×n} of rank r with singular values geometric from 1 down to 1/κ (Haar
singular vectors), L* = P Σ^{1/2}, R* = W Σ^{1/2}; y = 𝒜(X*) + s with any operator of
:mod:`jaxsense.operators` (Gaussian by default) and the noise models of
:mod:`jaxsense.problems`. Tong–Ma–Chi's outlier setup is the default:
n = 100, r = 10, κ = 10, m = 8nr, outliers s_i = 10‖y*‖_∞·U[−1, 1] w.p. p.

Loss f(L, R) = (1/m)‖𝒜(L Rᵀ) − y‖₁ with Q = (1/m) 𝒜*(Sign(𝒜(L Rᵀ) − y)) ∈ ∂_X f and
∂_L f = Q R, ∂_R f = Qᵀ L.

- :func:`subgm` — the asymmetric analogue of Ma & Fattahi's Algorithm 1 (our extension; the
  paper treats the symmetric case): L ← L − η_t Q R, R ← R − η_t Qᵀ L with η_t = η ρ^t/‖Q‖₂
  (eq. 10, ‖Q‖₂ by the warm-started power iteration of :mod:`jaxsense.solvers`), from the
  BALANCED small initialisation :func:`balanced_small_init`: the top-r' SVD P D Wᵀ of
  C = (1/m)𝒜*(Sign(y)) (Algorithm 2 without the symmetrisation), L₀ = α P D^{1/2},
  R₀ = α W D^{1/2}, so L₀ᵀL₀ = R₀ᵀR₀. r' ≥ r is allowed (over-parameterised).
- :func:`scaledsm` — the scaled sub-gradient method (Tong, Ma, Chi, "Low-rank matrix recovery
  with scaled subgradient methods: fast and robust convergence without the condition
  number", IEEE TSP 2021), exact rank r:
      L ← L − η_t Q R (RᵀR)⁻¹,   R ← R − η_t Qᵀ L (LᵀL)⁻¹,
  with Polyak's step η_t = (f(L, R) − f*) / (‖Q R (RᵀR)^{-1/2}‖_F² + ‖Qᵀ L (LᵀL)^{-1/2}‖_F²),
  where f* = f(L*, R*) = (1/m)‖s‖₁ is the ORACLE optimal value (their analysis assumes it is
  known; we pass the true one), or a geometric step η λ^t. Initialisation
  :func:`scaled_spectral_init` — *reconstructed*: the rank-r SVD of (1/m)𝒜*(Sign(y)) gives
  the subspaces, and the scale c minimising (1/m)‖y − c 𝒜(M)‖₁ (a weighted median, exact and
  robust to outliers) fixes the magnitude; L₀ = P (cD)^{1/2}, R₀ = W (cD)^{1/2}.

All updates are pure (state pytree in, state out), jit/vmap-able. :func:`run_until` runs a
solver in jitted chunks until a relative error is reached and returns the iteration count
and the wall time (compile excluded: the chunk function is compiled before the clock starts).
"""
from __future__ import annotations

import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxsense import _checks
from jaxsense.operators import Operator, make_operator
from jaxsense.problems import OUTLIER_DISTRIBUTIONS, gaussian_noise, outlier_noise
from jaxsense.solvers import _start_vector, geometric_step, power_iteration

METHODS = ("subgm", "scaledsm")
STEPS = ("geometric", "polyak")


# ----------------------------------------------------------------------------- problem
@struct.dataclass
class AsymTruth:
    """X* = L* R*ᵀ = P diag(sigma) Wᵀ. X_star: (n, n); L, R: (n, r); sigma: (r,)."""

    X_star: jax.Array
    L: jax.Array
    R: jax.Array
    sigma: jax.Array


@struct.dataclass
class AsymProblem:
    op: Operator
    y: jax.Array
    truth: AsymTruth
    noise: jax.Array

    @property
    def f_star(self):
        """(1/m)‖s‖₁ = f(L*, R*): the loss at the truth (the oracle value of Polyak's step)."""
        return jnp.mean(jnp.abs(self.noise))


def asymmetric_truth(key, n: int, r: int, kappa=10.0, dtype=jnp.float32) -> AsymTruth:
    """Rank-r X* with singular values κ^{-(i)/(r−1)}, i = 0..r−1 (1 down to 1/κ)."""
    _checks.check_int("n", n, low=1)
    _checks.check_int("r", r, low=1, high=n)
    _checks.check_scalar("kappa", kappa, low=1.0)
    k1, k2 = jax.random.split(key)
    P, _ = jnp.linalg.qr(jax.random.normal(k1, (n, r), dtype))
    W, _ = jnp.linalg.qr(jax.random.normal(k2, (n, r), dtype))
    sigma = jnp.asarray(float(kappa) ** (-np.linspace(0.0, 1.0, r)), dtype)
    s = jnp.sqrt(sigma)
    return AsymTruth(X_star=(P * sigma) @ W.T, L=P * s, R=W * s, sigma=sigma)


def make_asymmetric_problem(key, n: int = 100, r: int = 10, m: int | None = None, *,
                            kappa=10.0, operator: str = "gaussian", p=0.0,
                            outlier_distribution: str = "uniform", outlier_scale=10.0, nu=0.0,
                            dtype=jnp.float32, op: Operator | None = None) -> AsymProblem:
    """y = 𝒜(L*R*ᵀ) + s. Defaults: Tong–Ma–Chi's outlier setup (m = 8nr, uniform outliers
    of magnitude 10‖y*‖_∞). ``op`` may be passed to share one operator."""
    _checks.check_int("n", n, low=1)
    _checks.check_int("r", r, low=1, high=n)
    m = 8 * n * r if m is None else m
    _checks.check_int("m", m, low=1)
    _checks.check_scalar("p", p, low=0.0, high=1.0, high_open=True)
    _checks.check_scalar("nu", nu, low=0.0)
    _checks.check_choice("outlier_distribution", outlier_distribution, OUTLIER_DISTRIBUTIONS)
    k_op, k_truth, k_out, k_g = jax.random.split(key, 4)
    if op is None:
        op = make_operator(operator, k_op, m, n, dtype)
    else:
        _checks.check_operator_dims(op, m, n, "d=n")
    truth = asymmetric_truth(k_truth, n, r, kappa, dtype)
    y_clean = op.apply(truth.X_star)
    s = outlier_noise(k_out, y_clean, p, outlier_distribution, outlier_scale)
    s = s + gaussian_noise(k_g, m, nu, y_clean.dtype)
    return AsymProblem(op=op, y=y_clean + s, truth=truth, noise=s)


# ----------------------------------------------------------------------------- init
def _sign_svd(op, y, k):
    C = op.adjoint(jnp.sign(y)) / y.shape[-1]
    P, D, Wt = jnp.linalg.svd(C, full_matrices=False)
    return P[:, :k], D[:k], Wt[:k].T


def _check_init(op, y, r):
    _checks.check_int("r_search", r, low=1, high=op.d)
    _checks.check_measurements("y", y, op)


def balanced_small_init(op, y, r_search: int, alpha):
    """L₀ = α P D^{1/2}, R₀ = α W D^{1/2} from the top-r' SVD of (1/m)𝒜*(Sign(y)).

    Balanced (L₀ᵀL₀ = R₀ᵀR₀); the asymmetric analogue of Algorithm 2. Returns (L₀, R₀), (n, r').
    """
    _check_init(op, y, r_search)
    _checks.check_scalar("alpha", alpha, low=0.0, low_open=True)
    P, D, W = _sign_svd(op, y, r_search)
    s = jnp.sqrt(D)
    return alpha * P * s, alpha * W * s


def _weighted_median(v, w):
    order = jnp.argsort(v)
    v, w = v[order], w[order]
    c = jnp.cumsum(w)
    return v[jnp.argmax(c >= 0.5 * c[-1])]


def scaled_spectral_init(op, y, r: int):
    """Rank-r spectral start for ScaledSM (*reconstructed*, see module docstring)."""
    _check_init(op, y, r)
    P, D, W = _sign_svd(op, y, r)
    a = op.apply((P * D) @ W.T)
    ok = jnp.abs(a) > 0
    c = _weighted_median(jnp.where(ok, y / jnp.where(ok, a, 1.0), 0.0), jnp.abs(a))
    s = jnp.sqrt(jnp.maximum(c, 0.0) * D)
    return P * s, W * s


# ----------------------------------------------------------------------------- solvers
class FactorState(NamedTuple):
    """L, R: (n, r'); t: iteration; v: (n,) power-iteration vector (warm start)."""

    L: jax.Array
    R: jax.Array
    t: jax.Array
    v: jax.Array


class FactorInfo(NamedTuple):
    loss: jax.Array
    step: jax.Array


@struct.dataclass
class AsymSolver:
    """(init, update) over :class:`FactorState`. eta/rho/f_star are (vmappable) leaves."""

    eta: jax.Array
    rho: jax.Array
    f_star: jax.Array
    method: str = struct.field(pytree_node=False, default="subgm")
    step: str = struct.field(pytree_node=False, default="geometric")
    power_squarings: int = struct.field(pytree_node=False, default=10)

    def init(self, L0, R0) -> FactorState:
        L0, R0 = jnp.asarray(L0), jnp.asarray(R0)
        if L0.ndim != 2 or L0.shape != R0.shape:
            raise ValueError(f"L0, R0: expected equal shapes (n, r'), got {L0.shape}, {R0.shape}")
        _checks.check_float_dtype("L0", L0)
        _checks.check_float_dtype("R0", R0, L0.dtype)
        return FactorState(L0, R0, jnp.zeros((), jnp.int32), _start_vector(L0.shape[0], L0.dtype))

    def update(self, state: FactorState, op, y):
        L, R, t, v = state
        res = op.apply(L @ R.T) - y
        f = jnp.mean(jnp.abs(res))
        Q = op.adjoint(jnp.sign(res)) / res.shape[-1]
        GL, GR = Q @ R, Q.T @ L
        dt = L.dtype
        if self.method == "scaledsm":
            RtR, LtL = R.T @ R, L.T @ L
            DL = jnp.linalg.solve(RtR, GL.T).T  # Q R (RᵀR)⁻¹
            DR = jnp.linalg.solve(LtL, GR.T).T  # Qᵀ L (LᵀL)⁻¹
        else:
            DL, DR = GL, GR
        if self.step == "polyak":
            denom = jnp.sum(GL * DL) + jnp.sum(GR * DR)  # ‖G (·)^{-1/2}‖_F² (scaled) or ‖G‖_F²
            gap = jnp.maximum(f - self.f_star, 0.0)
            eta_t = jnp.where(denom > 0, gap / jnp.where(denom > 0, denom, 1.0), 0.0)
            eta_t = self.eta * eta_t
        else:
            q_norm, v = power_iteration(Q, v, self.power_squarings)
            eta_t = geometric_step(self.eta, self.rho, t, q_norm, dt)
        eta_t = eta_t.astype(dt)
        return FactorState(L - eta_t * DL, R - eta_t * DR, t + 1, v), FactorInfo(f, eta_t)


def _make(method, step, eta, rho, f_star, power_squarings):
    _checks.check_scalar("eta", eta, low=0.0, low_open=True)
    _checks.check_scalar("rho", rho, low=0.0, high=1.0, low_open=True)
    _checks.check_scalar("f_star", f_star, low=0.0)
    _checks.check_choice("step", step, STEPS)
    _checks.check_int("power_squarings", power_squarings, low=0)
    return AsymSolver(eta=jnp.asarray(eta), rho=jnp.asarray(rho), f_star=jnp.asarray(f_star),
                      method=method, step=step, power_squarings=power_squarings)


def subgm(eta=0.2, rho=0.99, *, step: str = "geometric", f_star=0.0,
          power_squarings: int = 10) -> AsymSolver:
    """SubGM on factors L Rᵀ (geometric step η ρ^t/‖Q‖₂ by default)."""
    return _make("subgm", step, eta, rho, f_star, power_squarings)


def scaledsm(f_star=0.0, *, step: str = "polyak", eta=1.0, rho=0.99,
             power_squarings: int = 10) -> AsymSolver:
    """ScaledSM (Tong–Ma–Chi). Polyak step with the oracle ``f_star`` by default
    (``eta`` multiplies it); ``step='geometric'``: η ρ^t/‖Q‖₂ times the scaled direction."""
    return _make("scaledsm", step, eta, rho, f_star, power_squarings)


# ----------------------------------------------------------------------------- driver
def rel_error(L, R, X_star):
    """‖L Rᵀ − X*‖_F / ‖X*‖_F."""
    return jnp.linalg.norm(L @ R.T - X_star) / jnp.linalg.norm(X_star)


class RunUntil(NamedTuple):
    """iterations: first checked iteration with rel error ≤ target (−1: not reached);
    wall_s: wall time from the start until then (or until the run stopped), compile excluded;
    history: rel error at iterations 0, k, 2k, …; for a batched run every field has a leading
    batch axis (the instances share each pass over the operator, so their wall times overlap)."""

    iterations: np.ndarray
    wall_s: np.ndarray
    reached: np.ndarray
    history: np.ndarray
    loss: np.ndarray
    state: FactorState


def run_until(solver: AsymSolver, L0, R0, op, y, X_star, *, target=1e-6, max_steps: int = 5000,
              check_every: int = 10) -> RunUntil:
    """Run ``solver`` in jitted chunks of ``check_every`` steps until ‖LRᵀ−X*‖_F/‖X*‖_F ≤
    ``target`` or ``max_steps``. The chunk is compiled (and run once on a copy) before the
    clock starts, so ``wall_s`` is execution time only.

    Batched: y (B, m), X_star (B, n, n), L0/R0 (B, n, r'), solver leaves scalar or (B,):
    the B instances share ``op`` (one matmul per pass over 𝒜) and run until all reach target.
    """
    if not isinstance(solver, AsymSolver):
        raise TypeError(f"solver={solver!r}: expected an AsymSolver (subgm/scaledsm)")
    _checks.check_scalar("target", target, low=0.0, low_open=True)
    max_steps = _checks.check_int("max_steps", max_steps, low=1)
    check_every = _checks.check_int("check_every", check_every, low=1)
    y, X_star = jnp.asarray(y), jnp.asarray(X_star)
    L0, R0 = jnp.asarray(L0), jnp.asarray(R0)
    batched = y.ndim == 2
    B = y.shape[0] if batched else None
    _checks.check_shape("y", y, ((B, op.m) if batched else (op.m,)))
    _checks.check_shape("X_star", X_star, ((B, op.d, op.d) if batched else (op.d, op.d)))
    _checks.check_shape("L0", L0, ((B, op.d, None) if batched else (op.d, None)))
    _checks.check_shape("R0", R0, L0.shape)
    _checks.check_finite("y", y)
    if batched:
        solver = jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (B,)), solver)
        state = jax.vmap(solver.init)(L0, R0)
        err_fn = jax.vmap(rel_error)

        def step(s, slv, op, y):
            return jax.vmap(lambda st, sv, yy: sv.update(st, op, yy))(s, slv, y)
    else:
        state = solver.init(L0, R0)
        err_fn = rel_error

        def step(s, slv, op, y):
            return slv.update(s, op, y)

    @jax.jit
    def chunk(state, slv, op, y, X_star):  # arrays as arguments, never captured constants
        def body(s, _):
            s2, info = step(s, slv, op, y)
            return s2, info.loss

        state, losses = jax.lax.scan(body, state, None, length=check_every)
        return state, err_fn(state.L, state.R, X_star), losses[0]

    jax.block_until_ready(chunk(state, solver, op, y, X_star))  # compile + warm-up, discarded
    err0 = np.atleast_1d(np.asarray(err_fn(state.L, state.R, X_star)))
    hist, losses = [err0], []
    n = err0.shape[0]
    iters = np.where(err0 <= target, 0, -1)
    walls = np.zeros(n)
    t0 = time.perf_counter()
    it = 0
    while np.any(iters < 0) and it < max_steps:
        state, err, f0 = chunk(state, solver, op, y, X_star)
        err = np.atleast_1d(np.asarray(err))  # blocks
        it += check_every
        now = time.perf_counter() - t0
        hist.append(err)
        losses.append(np.atleast_1d(np.asarray(f0)))
        new = (iters < 0) & (err <= target)
        iters[new], walls[new] = it, now
        if not np.all(np.isfinite(err)):
            break
    walls[iters < 0] = time.perf_counter() - t0
    hist, losses = np.stack(hist, -1), (np.stack(losses, -1) if losses else np.zeros((n, 0)))
    if not batched:
        return RunUntil(int(iters[0]), float(walls[0]), bool(iters[0] >= 0), hist[0], losses[0],
                        state)
    return RunUntil(iters, walls, iters >= 0, hist, losses, state)
