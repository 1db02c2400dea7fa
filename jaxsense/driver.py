"""``run``: drive a solver with ``lax.scan``, recording chosen metrics every k steps.

    res = run(subgm(geometric(0.2, 0.996)), U0, problem.op, problem.y, problem.truth,
              num_steps=6000, record_every=20, metrics=("fro_error", "loss", "step"))
    res.history["fro_error"]   # (num_steps // record_every,) at iterations res.iterations
    res.final["rel_fro_error"] # after the last step

Batched runs (a sweep) pass ``in_axes`` naming which arguments carry a leading batch axis,
e.g. ``in_axes={"U0": 0, "y": 0, "truth": 0}``: the scan is ``jax.vmap``-ed and instances
that share the operator (``op`` unbatched) compute residuals and Q as single matmuls.
The run is split into equal chunks (one compilation) so that a tqdm bar shows progress.

Metrics (recorded at iterations t = 0, k, 2k, …; loss/step/q_norm are those of iteration t):
  fro_error, rel_fro_error, op_error, loss, step, q_norm,
  signal, cross, residual, F_norm, G_norm, eigs  (eq. 13; see diagnostics.decomposition).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxsense import _checks, diagnostics
from jaxsense.mesh import host_gather
from jaxsense.solvers import Solver, SolverState

TRUTH_METRICS = ("fro_error", "rel_fro_error", "op_error", "signal", "cross", "residual",
                 "F_norm", "G_norm", "eigs")
INFO_METRICS = ("loss", "step", "q_norm")
METRICS = TRUTH_METRICS + INFO_METRICS
_DECOMP = ("signal", "cross", "residual", "F_norm", "G_norm", "eigs")
ARGS = ("solver", "U0", "op", "y", "truth")


class RunResult(NamedTuple):
    state: SolverState
    history: dict  # name -> (*batch, n_records[, r])
    iterations: np.ndarray  # (n_records,)
    final: dict  # name -> (*batch,) error metrics after the last step


def _record(U, info, truth, metrics):
    out = {}
    if any(m in _DECOMP for m in metrics):
        dec = diagnostics.decomposition(U, truth)
        out.update({m: dec[m] for m in metrics if m in _DECOMP})
    for m in metrics:
        if m == "fro_error":
            out[m] = diagnostics.fro_error(U, truth.X_star)
        elif m == "rel_fro_error":
            out[m] = diagnostics.rel_fro_error(U, truth.X_star)
        elif m == "op_error":
            out[m] = diagnostics.op_error(U, truth.X_star)
        elif m in INFO_METRICS:
            out[m] = getattr(info, m)
    return out


def _final(U, truth):
    if truth is None:
        return {}
    return {"fro_error": diagnostics.fro_error(U, truth.X_star),
            "rel_fro_error": diagnostics.rel_fro_error(U, truth.X_star),
            "op_error": diagnostics.op_error(U, truth.X_star)}


@functools.lru_cache(maxsize=64)
def _chunk_fn(k: int, n_records: int, metrics: tuple, axes: tuple):
    """A jitted function running n_records × k iterations of one (possibly vmapped) run."""

    def single(solver, state, op, y, truth):
        X_star = None if truth is None else truth.X_star

        def outer(state, _):
            new, info = solver.update(state, op, y, X_star)
            rec = _record(state.U, info, truth, metrics)
            new = jax.lax.fori_loop(1, k, lambda i, s: solver.update(s, op, y, X_star)[0], new)
            return new, rec

        state, hist = jax.lax.scan(outer, state, None, length=n_records)
        return state, hist

    fn = single
    if any(a is not None for a in axes):
        # state follows U0's axis; histories come out with the batch axis first.
        fn = jax.vmap(single, in_axes=(axes[0], 0, axes[2], axes[3], axes[4]))
    return jax.jit(fn)


def _batch_size(in_axes, args):
    sizes = set()
    for name, ax in in_axes.items():
        if ax is not None:
            for leaf in jax.tree_util.tree_leaves(args[name]):
                sizes.add(np.shape(leaf)[ax])
    if len(sizes) > 1:
        raise ValueError(f"in_axes={in_axes}: batched arguments disagree on the batch size {sorted(sizes)}")
    return sizes.pop() if sizes else None


def run(solver: Solver, U0, op, y, truth=None, *, num_steps: int, record_every: int = 10,
        metrics=("rel_fro_error", "loss", "step"), in_axes: dict | None = None,
        progress: bool = False, num_chunks: int | None = None, desc: str = "SubGM") -> RunResult:
    """Run ``num_steps`` iterations of ``solver`` from U0 and record ``metrics``.

    Shapes (unbatched): U0 (d, r'), y (m,), truth a GroundTruth (or None: then only
    loss/step/q_norm can be recorded). ``num_steps`` must be a multiple of ``record_every``.
    ``in_axes``: dict over {"solver", "U0", "op", "y", "truth"} → 0 or None (default: all
    None). Batched histories have the batch axis first.
    """
    if not isinstance(solver, Solver):
        raise TypeError(f"solver={solver!r}: expected a jaxsense Solver (subgm/gd/make_solver)")
    num_steps = _checks.check_int("num_steps", num_steps, low=1)
    record_every = _checks.check_int("record_every", record_every, low=1)
    _checks.check_multiple("num_steps", num_steps, "record_every", record_every)
    metrics = tuple(metrics)
    _checks.check_names("metrics", metrics, METRICS)
    if truth is None and (any(m in TRUTH_METRICS for m in metrics) or solver.loss == "expected_l1"):
        raise ValueError("truth=None: the requested metrics (or the expected loss) need the ground truth")
    in_axes = dict(in_axes or {})
    unknown = set(in_axes) - set(ARGS)
    if unknown:
        raise ValueError(f"in_axes={in_axes}: unknown keys {sorted(unknown)}; expected {ARGS}")
    for name, ax in in_axes.items():
        if ax not in (0, None):
            raise ValueError(f"in_axes[{name!r}]={ax!r}: expected 0 or None")
    axes = tuple(in_axes.get(a) for a in ARGS)
    U0 = jnp.asarray(U0)
    y = jnp.asarray(y)
    batched_U, batched_y = axes[1] is not None, axes[3] is not None
    # ---- shapes and dtypes, before any compute
    d, m = op.d, op.m
    u_shape = U0.shape[1:] if batched_U else U0.shape
    if len(u_shape) != 2 or u_shape[0] != d:
        raise ValueError(f"U0: expected shape {'(B, ' if batched_U else '('}d={d}, r'), got {U0.shape}")
    if not 1 <= u_shape[1] <= d:
        raise ValueError(f"U0: r'={u_shape[1]} columns, expected 1 <= r' <= d={d}")
    y_shape = y.shape[1:] if batched_y else y.shape
    if y_shape != (m,):
        raise ValueError(f"y: expected length m={m} per instance, got shape {y.shape}")
    for name, arr in (("U0", U0), ("y", y)):
        _checks.check_float_dtype(name, arr, op.dtype)
    _checks.check_finite("y", y)
    _checks.check_finite("U0", U0)
    args = {"solver": solver, "U0": U0, "op": op, "y": y, "truth": truth}
    B = _batch_size(in_axes, args)
    # ---- run in equal chunks (one compilation), with a progress bar
    n_records = num_steps // record_every
    if num_chunks is None:
        num_chunks = 20 if progress else 1
    num_chunks = max(1, min(int(num_chunks), n_records))
    while n_records % num_chunks:
        num_chunks -= 1
    per_chunk = n_records // num_chunks
    state = solver.init(U0[0] if batched_U else U0)  # validates U0 once
    if batched_U:
        state = jax.vmap(solver.init)(U0)
    elif B is not None:  # broadcast one start to every instance of the batch
        state = jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (B,) + a.shape), state)
    fn = _chunk_fn(record_every, per_chunk, metrics, axes)
    hists = []
    with tqdm(total=num_steps, desc=desc, disable=not progress, unit="it") as bar:
        for _ in range(num_chunks):
            state, hist = fn(solver, state, op, y, truth)
            hists.append(hist)
            bar.update(per_chunk * record_every)
    rec_axis = 1 if any(a is not None for a in axes) else 0
    hists = host_gather(hists)  # device_get, or an all-gather under jax.distributed
    history = {k: np.concatenate([np.asarray(h[k]) for h in hists], axis=rec_axis) for k in metrics}
    if truth is None:
        final = {}
    elif any(a is not None for a in axes):
        final = jax.vmap(_final, in_axes=(0, axes[4]))(state.U, truth)
    else:
        final = _final(state.U, truth)
    final = {k: np.asarray(v) for k, v in host_gather(final).items()}
    iterations = np.arange(n_records) * record_every
    return RunResult(state=state, history=history, iterations=iterations, final=final)
