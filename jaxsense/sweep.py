"""Hyper-parameter sweeps: one vmapped, device-sharded run over a grid of instances.

    res = sweep({"p": [0.0, 0.2, 0.4], "r_search": [3, 20], "seed": range(5)},
                d=20, r=3, m=500, num_steps=6000, record_every=50)
    res.as_grid("rel_fro_error")          # (3, 2, 5) final errors, axes in res.axes order
    res.history["rel_fro_error"]          # (30, 120) per instance × record

Grid axes (any subset; each a list of values, or a scalar to fix it):
  p (outlier rate), r_search (r'), alpha (init scale), eta, rho (step rule),
  outlier_scale (the scale of P, "noise scale" for outliers), nu (Gaussian noise), seed.
Unlisted axes take :data:`DEFAULTS` (the paper's setting; η, ρ, α reconstructed, see
experiments/subgm/settings.py). The instance list is the Cartesian product in the order
of :data:`AXES`.

How it is computed
- One measurement operator is drawn from ``key`` and SHARED by all instances
  (``share_operator=True``, default): residuals 𝒜(U Uᵀ) − y and Q = 𝒜*(Sign(r))/m of the
  whole batch become single (B, d²)×(d², m) / (B, m)×(m, d²) matmuls. The seed decides the
  ground truth X* (Haar V with the given spectrum), the outlier mask and values (common
  random numbers across p and scale: the same seed gives the same uniforms) and the random
  init. ``share_operator=False`` draws one operator per seed (memory B·m·d²).
- r' changes shapes. Every instance is run with U of width r'_max = max(r_search) whose
  columns beyond its own r' are ZERO at t = 0. Zero columns stay exactly zero under SubGM
  and GD: D = (Q + Qᵀ) U has zero columns wherever U does, and U Uᵀ, Q, the step size and
  every recorded metric are unchanged by zero columns — so a padded instance follows the
  same trajectory as the unpadded run (tested). With Algorithm 2 the first r' of the r'_max
  columns are exactly Algorithm 2's U₀ for r' (eigenvalues are sorted).
- The batch is padded to a multiple of the number of devices (copies of the last instance,
  dropped from the results) and sharded along a 1-D mesh ``("batch",)`` with
  ``NamedSharding``; the operator is replicated. XLA partitions the vmapped scan along the
  batch, so each device runs B/n_devices instances with no communication.
- ``precision`` sets ``jax.default_matmul_precision`` for the run ("highest" keeps f32
  matmuls in full f32 on GPU/TPU; the default there is TF32/bf16 passes, whose rounding
  flips signs of small residuals and can floor the error). None keeps JAX's default.

m changes shapes too: :func:`pad_rows` pads a problem's measurement rows to a common
m_pad (zero rows, the real rows rescaled so the 1/m of the losses is the true m's), so runs
over several m reuse one compiled scan (experiments/subgm/fig4.py sweeps m this way).
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .mesh import host_gather
from .mesh import make_mesh as _make_mesh

from jaxsense import _checks
from jaxsense.driver import METRICS, run
from jaxsense.init import small_random_init, spectral_sign_init
from jaxsense.operators import DenseGaussian, RankOne, make_operator
from jaxsense.problems import OUTLIER_DISTRIBUTIONS, make_problem
from jaxsense.solvers import STEP_KINDS, StepRule, make_solver

AXES = ("p", "r_search", "alpha", "eta", "rho", "outlier_scale", "nu", "seed")
DEFAULTS = {"p": 0.0, "r_search": None, "alpha": 1e-15, "eta": 0.2, "rho": 0.996,
            "outlier_scale": 10.0, "nu": 0.0, "seed": 0}
METHODS = ("subgm", "gd")
INITS = ("spectral", "random")
PRECISIONS = (None, "default", "high", "highest", "bfloat16", "tensorfloat32", "float32")


class SweepResult(NamedTuple):
    """params: axis -> (B,) value per instance; axes/shape: the swept axes and grid shape;
    history: metric -> (B, n_records[, r]); final: error metrics after the last step (B,);
    iterations: (n_records,); state: final solver state (padded batch, sharded);
    n_devices: devices the batch was sharded over."""

    params: dict
    axes: tuple
    shape: tuple
    history: dict
    final: dict
    iterations: np.ndarray
    state: object
    n_devices: int

    def as_grid(self, name: str):
        """A final metric (or a history) reshaped to the grid: (*shape[, n_records, ...])."""
        src = self.final if name in self.final else self.history
        if name not in src:
            raise ValueError(f"name={name!r}: expected one of {sorted(self.final) + sorted(self.history)}")
        a = np.asarray(src[name])
        return a.reshape(tuple(self.shape) + a.shape[1:])


def _values(name, v):
    if isinstance(v, (str, bytes)):
        raise TypeError(f"grid[{name!r}]={v!r}: expected a number or a sequence of numbers")
    if isinstance(v, (numbers.Number, np.number)) or (hasattr(v, "ndim") and np.ndim(v) == 0):
        return [v], False
    vals = list(v)
    if not vals:
        raise ValueError(f"grid[{name!r}]=[]: expected at least one value")
    return vals, True


def _validate(grid, d):
    unknown = set(grid) - set(AXES)
    if unknown:
        raise ValueError(f"grid: unknown axes {sorted(unknown)}; expected a subset of {AXES}")
    full, swept = {}, []
    for name in AXES:
        raw = grid.get(name, DEFAULTS[name] if DEFAULTS[name] is not None else d)
        vals, is_axis = _values(name, raw)
        if is_axis:
            swept.append(name)
        for v in vals:
            if name == "r_search":
                _checks.check_int("r_search", v, low=1, high=d)
            elif name == "seed":
                _checks.check_int("seed", v, low=0)
            elif name == "p":
                _checks.check_scalar("p", v, low=0.0, high=1.0, high_open=True)
            elif name in ("alpha", "eta"):
                _checks.check_scalar(name, v, low=0.0, low_open=True)
            elif name == "rho":
                _checks.check_scalar("rho", v, low=0.0, high=1.0, low_open=True)
            else:
                _checks.check_scalar(name, v, low=0.0)
        full[name] = vals
    return full, tuple(swept)


def _instances(full, swept):
    """Cartesian product over swept axes (AXES order); fixed axes broadcast."""
    shape = tuple(len(full[a]) for a in swept)
    combos = list(itertools.product(*[full[a] for a in swept])) or [()]
    params = {}
    for name in AXES:
        if name in swept:
            i = swept.index(name)
            params[name] = np.array([c[i] for c in combos])
        else:
            params[name] = np.array([full[name][0]] * len(combos))
    return params, shape


class PaddedRows(NamedTuple):
    """A problem with its measurement rows padded from ``m`` to ``m_pad`` (:func:`pad_rows`).

    op: the operator with m_pad rows; y: (..., m_pad); m: the true number of measurements;
    scale: s = √(m_pad/m), the factor applied to the real rows of A and y."""

    op: object
    y: jax.Array
    m: int
    scale: float


def pad_rows(op, y, m_pad: int) -> PaddedRows:
    """Pad the measurement rows of (𝒜, y) from m to ``m_pad`` so that runs over several m
    share one compiled program (shapes depend only on m_pad).

    op: a :class:`~jaxsense.operators.DenseGaussian` (A: (m, d·d)) or
    :class:`~jaxsense.operators.RankOne` (a: (m, d)); y: (..., m) (a batch of measurement
    vectors of the same operator is fine); m_pad ≥ m. Returns :class:`PaddedRows`.

    Construction: rows m…m_pad−1 are A_i = 0, y_i = 0, so their residual
    r_i = ⟨A_i, UUᵀ⟩ − y_i is exactly 0 and they add exactly nothing to any sum over i
    (Sign(0) = 0). The losses divide by the array length m_pad instead of m (Ma & Fattahi
    eq. 2 has 1/m), so the real rows are scaled by s = √(m_pad/m) (A_i → s A_i, y_i → s y_i,
    r_i → s r_i; for RankOne a_i → √s a_i). Then, in exact arithmetic:

    - ℓ2 loss, its gradient and the ℓ2-RIP ratio are those of the m-row problem:
      (1/m_pad) Σ (s r_i)² = (1/m) Σ r_i²,  (2/m_pad) Σ (s r_i)(s A_i) = (2/m) Σ r_i A_i,
      (1/m_pad) ‖s 𝒜(M)‖² = (1/m) ‖𝒜(M)‖²  (Def. 4) — so GD with any step rule and
      :func:`jaxsense.rip.l2_rip_constant` give the m-row results;
    - ℓ1: Sign(s r_i) = Sign(r_i), so f_ℓ1 and Q_ℓ1 = (1/m) Σ Sign(r_i) A_i (eq. 3) come out
      divided by s. The geometric step η ρ^t/‖Q_t‖ (eq. 10) is invariant to the scale of Q,
      so SubGM with it runs the m-row trajectory; the recorded ℓ1 ``loss``/``q_norm`` are
      1/s of the true ones, and a Polyak step (η/2) f needs η·s² to match.
    - Algorithm 2 (C = (1/m) 𝒜*(Sign y)) would give U₀ scaled by s^(−1/2): compute the
      initialisation on the unpadded problem.

    Floating point: the scaled rows round differently (relative 1e-16), and that is the
    only difference from the unpadded run; tests/test_fig4_padding.py measures it. Draw
    the noise and outliers with the true m (before padding), so the padded problem holds
    the same draws. Under jit, ``m_pad`` is static and op/y may be traced.
    """
    m_pad = _checks.check_int("m_pad", m_pad, low=1)
    if not isinstance(op, (DenseGaussian, RankOne)):
        raise TypeError(f"op={type(op).__name__}: expected a DenseGaussian or RankOne "
                        "operator (rows of an entry-sampling operator cannot be zeroed)")
    m = op.m
    if m_pad < m:
        raise ValueError(f"m_pad={m_pad}: expected an integer >= op.m={m}")
    _checks.check_trailing_shape("y", y, (m,))
    _checks.check_float_dtype("y", y, op.dtype)
    s = float(np.sqrt(m_pad / m))
    n = m_pad - m

    def pad(x, axis):
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, n)
        return jnp.pad(x, widths)

    if isinstance(op, DenseGaussian):
        new = DenseGaussian(A=pad(op.A * s, -2), d=op.d)
        if op.B is not None:
            new = new.with_packed()
    else:
        new = RankOne(a=pad(op.a * np.sqrt(s), -2))
    return PaddedRows(op=new, y=pad(jnp.asarray(y) * s, -1), m=m, scale=s)


class Prepared(NamedTuple):
    """The inputs of one sweep (``sweep(..., prepare_only=True)``), ready for
    :func:`jaxsense.run` with ``in_axes``: the batch is padded and sharded (B real instances)."""

    solver: object
    U0: jax.Array
    op: object
    y: jax.Array
    truth: object
    in_axes: dict
    precision: str | None
    B: int
    mesh: Mesh


def matmul_precision(precision):
    """Context manager: ``jax.default_matmul_precision(precision)``, or nothing for None."""
    return jax.default_matmul_precision(precision) if precision else contextlib.nullcontext()


def make_mesh(devices=None) -> Mesh:
    """A 1-D ("batch",) mesh over ``devices`` (default: all of ``jax.devices()``)."""
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("devices=[]: expected at least one device")
    return _make_mesh((len(devices),), ("batch",), devices)


def _pad(x, n_pad):
    if n_pad == 0:
        return x
    return np.concatenate([x, np.repeat(x[-1:], n_pad, axis=0)], axis=0)


@functools.lru_cache(maxsize=32)
def _instance_setup(operator, m, d, r, spectrum, kappa, outlier_distribution, init, r_max,
                    share_operator, dtype_name):
    """The jitted, vmapped per-instance set-up (problem + initial U) for these static
    settings — cached, so repeated sweeps with the same settings compile it once."""
    dtype = jnp.dtype(dtype_name)

    def make_instance(shared, k_inst, seed, p, scale, nu, alpha, r_search):
        # the shared operator is an ARGUMENT (not a closure): a captured array would be
        # embedded in the program as a constant (slow to compile at d = 100, m = 4000)
        ik = jax.random.fold_in(k_inst, seed)
        k_prob, k_init, k_op_i = jax.random.split(ik, 3)
        op = shared if share_operator else make_operator(operator, k_op_i, m, d, dtype)
        prob = make_problem(k_prob, d, r, m, spectrum=spectrum, kappa=kappa, p=p,
                            outlier_distribution=outlier_distribution, outlier_scale=scale,
                            nu=nu, dtype=dtype, op=op)
        if init == "spectral":
            U0 = spectral_sign_init(prob.op, prob.y, r_max, alpha)
        else:
            U0 = small_random_init(k_init, d, r_max, alpha, dtype)
        U0 = jnp.where(jnp.arange(r_max) < r_search, U0, 0.0)
        # return the operator only when it is per-instance: a shared one would be broadcast
        # to (B, m, d²) by vmap's outputs (82 GB at d = 100, m = 4000, B = 256)
        return (None if share_operator else prob.op), prob.y, prob.truth, U0

    return jax.jit(jax.vmap(make_instance, in_axes=(None, None) + (0,) * 6))


def sweep(grid: dict, *, key=None, d: int = 20, r: int = 3, m: int = 500,
          spectrum=(10.0, 5.0, 1.0), kappa=None, operator: str = "gaussian",
          outlier_distribution: str = "gaussian", method: str = "subgm",
          step: str | None = None, loss: str | None = None, init: str = "spectral",
          num_steps: int = 6000, record_every: int = 20, metrics=("rel_fro_error",),
          dtype=None, devices=None, precision: str | None = None,
          share_operator: bool = True, power_squarings: int = 10,
          power_filter_dtype: str | None = "float32",
          progress: bool = False, num_chunks: int | None = None,
          prepare_only: bool = False) -> SweepResult:
    """Run every instance of ``grid`` (see module docstring) as one sharded, vmapped scan.

    method: 'subgm' (ℓ1 loss, geometric step by default) or 'gd' (ℓ2 loss, constant step η);
    ``step``/``loss`` override the defaults (step in geometric/polyak/constant). init:
    'spectral' (Algorithm 2) or 'random' (small random). dtype: default float64 when x64 is
    enabled, else float32. Returns :class:`SweepResult` (or, with ``prepare_only=True``, the
    padded, sharded inputs as :class:`Prepared` without running — used by the benchmark).
    """
    if not isinstance(grid, dict):
        raise TypeError(f"grid={grid!r}: expected a dict axis -> value(s)")
    _checks.check_int("d", d, low=1)
    _checks.check_int("r", r, low=1, high=d)
    _checks.check_int("m", m, low=1)
    _checks.check_choice("method", method, METHODS)
    _checks.check_choice("init", init, INITS)
    power_filter_dtype = _checks.check_filter_dtype("power_filter_dtype", power_filter_dtype)
    _checks.check_choice("precision", precision, PRECISIONS)
    _checks.check_choice("outlier_distribution", outlier_distribution, OUTLIER_DISTRIBUTIONS)
    step = step or ("geometric" if method == "subgm" else "constant")
    _checks.check_choice("step", step, STEP_KINDS)
    loss = loss or ("l1" if method == "subgm" else "l2")
    metrics = tuple(metrics)
    _checks.check_names("metrics", metrics, METRICS)
    num_steps = _checks.check_int("num_steps", num_steps, low=1)
    record_every = _checks.check_int("record_every", record_every, low=1)
    _checks.check_multiple("num_steps", num_steps, "record_every", record_every)
    if dtype is None:
        dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    dtype = jnp.dtype(dtype)
    if dtype.kind != "f":
        raise TypeError(f"dtype={dtype}: expected a floating dtype")
    if kappa is None:
        spec = tuple(float(s) for s in spectrum)
        if len(spec) != r:
            raise ValueError(f"spectrum={spectrum!r}: expected r={r} eigenvalues")
    full, swept = _validate(grid, d)
    params, shape = _instances(full, swept)
    mesh = make_mesh(devices)
    n_dev = mesh.devices.size
    B = len(params["p"])
    n_pad = (-B) % n_dev
    r_max = int(params["r_search"].max())
    key = jax.random.PRNGKey(0) if key is None else key

    # ---- per-instance inputs, padded and sharded along the batch
    batch = NamedSharding(mesh, PartitionSpec("batch"))
    repl = NamedSharding(mesh, PartitionSpec())
    fdt = np.dtype(dtype)
    host = {
        "seed": _pad(params["seed"].astype(np.uint32), n_pad),
        "p": _pad(params["p"].astype(fdt), n_pad),
        "outlier_scale": _pad(params["outlier_scale"].astype(fdt), n_pad),
        "nu": _pad(params["nu"].astype(fdt), n_pad),
        "alpha": _pad(params["alpha"].astype(fdt), n_pad),
        "eta": _pad(params["eta"].astype(fdt), n_pad),
        "rho": _pad(params["rho"].astype(fdt), n_pad),
        "r_search": _pad(params["r_search"].astype(np.int32), n_pad),
    }
    dev = {k: jax.device_put(v, batch) for k, v in host.items()}
    k_op, k_inst = jax.random.split(key)
    shared_op = make_operator(operator, k_op, m, d, dtype) if share_operator else None
    if shared_op is not None:
        shared_op = jax.device_put(shared_op, repl)

    setup = _instance_setup(operator, m, d, r, tuple(float(v) for v in spectrum), kappa,
                            outlier_distribution, init, r_max, share_operator,
                            np.dtype(dtype).name)
    ops, y, truth, U0 = setup(shared_op, k_inst, dev["seed"], dev["p"], dev["outlier_scale"],
                              dev["nu"], dev["alpha"], dev["r_search"])
    solver = make_solver(StepRule(eta=dev["eta"], rho=dev["rho"], kind=step), loss,
                         power_squarings=power_squarings, power_filter_dtype=power_filter_dtype)
    in_axes = {"solver": 0, "U0": 0, "y": 0, "truth": 0}
    op = shared_op if share_operator else ops
    if not share_operator:
        in_axes["op"] = 0
    prepared = Prepared(solver=solver, U0=U0, op=op, y=y, truth=truth,
                        in_axes=in_axes, precision=precision, B=B, mesh=mesh)
    if prepare_only:
        return prepared
    with matmul_precision(precision):
        res = run(solver, U0, op, y, truth, num_steps=num_steps,
                  record_every=record_every, metrics=metrics, in_axes=in_axes,
                  progress=progress, num_chunks=num_chunks, desc=f"sweep[{B}]")
    # every process gets the whole result (host_gather is device_get on one process)
    history = {k: np.asarray(v)[:B] for k, v in host_gather(res.history).items()}
    final = {k: np.asarray(v)[:B] for k, v in host_gather(res.final).items()}
    return SweepResult(params=params, axes=swept, shape=shape, history=history, final=final,
                       iterations=res.iterations, state=res.state, n_devices=n_dev)
