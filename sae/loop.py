"""The host loop around ``sae.step``: data → device chunks, sharding over a mesh, NaN/Inf
guards, logging with a progress bar, orbax checkpoints with exact resume.

    import sae
    cfg = sae.TrainConfig(d_in=384, width=1536, lam=3e-3, total_steps=2000, batch_size=1024)
    res = sae.train(X, cfg)                 # X: (N, d) array, or any iterator of (B, d) arrays
    res.params                              # numpy dict in ORIGINAL input units:
                                            #   W_enc (d,M) W_dec (M,d) b_enc (M,) b_dec (d,)
                                            #   threshold (M,)
    res.encode(X)                           # (N, M) codes f(x)
    # vmapped λ sweep: 4 SAEs trained on the same batches in one jitted call
    res = sae.train(X, cfg, sweep=sae.sweep(cfg, lam=[1e-3, 3e-3, 1e-2, 3e-2]))
    res.params["W_dec"].shape               # (4, M, d); res.encode(X, i=2) → codes of SAE 2

Input scaling (Rajamanoharan et al. 2024, §4; Anthropic 2025): one scalar c with
E‖c x‖² = 1 ("norm2") or E‖c x‖ = √d ("sqrt_d") is estimated from the first batches and
folded back into the returned weights: W_enc ← c W_enc, W_dec ← W_dec / c, b_dec ← b_dec / c
(codes unchanged).
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsense.mesh import host_gather as _to_host
from jaxsense.mesh import make_mesh as _make_mesh

from . import checkpoint as ckpt
from jaxsense._checks import check_int, check_scalar

from .config import HParams, TrainConfig
from .data import as_source, check_batch
from .model import encode as _encode
from .step import TrainState, graphdef_of, init_state, make_model, train_chunk

__all__ = ["NonFiniteError", "Plateau", "TrainResult", "estimate_scale", "fold_scale",
           "make_chunk_fn", "make_mesh", "plateau_improvement", "train"]

_LOGGED = ("loss", "mse", "l0", "ev", "dead_frac", "lam", "lr")


class NonFiniteError(FloatingPointError):
    """Raised when loss or parameters become NaN/Inf; the message names step and SAE index."""


class Plateau(NamedTuple):
    """Stop training when the training loss stops improving (our rule — no SAE paper we
    follow states one; the common "relative improvement below a tolerance" early stop):
    after ``min_steps``, at every multiple of ``window`` steps, compare the mean per-step loss
    of the last ``window`` steps, m₁, with that of the ``window`` steps before, m₀; stop when
    (m₀ − m₁)/|m₀| < ``tol`` for every SAE of a sweep (:func:`plateau_improvement`).
    ``config.total_steps`` stays the cap and the schedules still assume it (set
    ``lam_warmup_steps`` ≤ ``min_steps`` so λ has reached its value before the test)."""

    window: int = 200
    tol: float = 1e-3
    min_steps: int = 0

    def check(self) -> None:
        check_int("plateau.window", self.window, low=1)
        check_scalar("plateau.tol", self.tol, low=0.0)
        check_int("plateau.min_steps", self.min_steps, low=0)


def plateau_improvement(losses, window: int) -> np.ndarray:
    """Relative improvement (m₀ − m₁)/|m₀| of the windowed mean loss: m₁ the mean of the last
    ``window`` rows of ``losses`` (T,) or (T, N), m₀ the mean of the ``window`` rows before.
    Returns a scalar (T,) input) or (N,) array; +inf where T < 2·window (no verdict yet)."""
    check_int("window", window, low=1)
    x = np.asarray(losses, np.float64)
    if x.ndim not in (1, 2):
        raise ValueError(f"losses: expected (T,) or (T, N) per-step losses, got shape {x.shape}")
    if x.shape[0] < 2 * window:
        return np.full(x.shape[1:], np.inf)
    m1 = x[-window:].mean(0)
    m0 = x[-2 * window:-window].mean(0)
    return (m0 - m1) / np.maximum(np.abs(m0), 1e-30)


@dataclasses.dataclass
class TrainResult:
    """Output of ``train``.

    params: numpy dict in original input units (see ``fold_scale``): W_enc (d,M),
      W_dec (M,d), b_enc (M,), b_dec (d,), threshold (M,) — each with a leading (N,) axis
      for a sweep.  state: final ``TrainState`` (in scaled units).  scale: c.
    history: list of logged dicts (step, tokens, and per-SAE lists of loss, l0, ev,
      dead_frac, lam, lr).  n_sae: None (single) or N.
    steps: steps trained (this call and any resumed run).  stop: "total_steps" (cap
      reached), "max_steps", "plateau" (the ``Plateau`` rule fired) or "data" (data ended).
    losses: per-step training loss of this call, (T,) or (T, N) float32.
    """

    params: dict
    state: TrainState
    graphdef: Any
    config: TrainConfig
    scale: float
    history: list
    n_sae: int | None
    hparams: HParams
    steps: int = 0
    stop: str = "total_steps"
    losses: Any = None

    def sae_params(self, i: int | None = None) -> dict:
        """Params of SAE ``i`` of a sweep (or of the single SAE)."""
        if self.n_sae is None:
            return self.params
        if i is None:
            raise ValueError("this result holds a sweep: pass the SAE index i")
        if not -self.n_sae <= i < self.n_sae:
            raise IndexError(f"i={i}: expected an SAE index in [0, {self.n_sae})")
        return {k: v[i] for k, v in self.params.items()}

    def encode(self, x, i: int | None = None):
        """Codes f(x) (N, M) of SAE ``i`` on inputs in original units (N, d)."""
        p = jax.tree.map(jnp.asarray, self.sae_params(i))
        k = self.config.k if self.config.arch == "topk" else None
        return np.asarray(_encode(p, jnp.asarray(x, jnp.float32),
                                  apply_b_dec_to_input=self.config.apply_b_dec_to_input, k=k))

    def model(self, i: int | None = None):
        """An NNX module holding SAE ``i``'s weights in original units. A tied SAE comes back
        as an untied ``JumpReLUSAE``: folding the input scale c into the weights makes
        W_enc = c² W_decᵀ, which a tied module cannot hold."""
        cfg = self.config
        if cfg.arch == "tied":
            cfg = dataclasses.replace(cfg, arch="jumprelu")
        m = make_model(cfg, jax.random.key(0), cfg.theta_init)
        p = self.sae_params(i)
        for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
            getattr(m, name)[...] = jnp.asarray(p[name])
        if cfg.arch == "jumprelu":
            t = jnp.asarray(p["threshold"])
            m.theta[...] = jnp.log(t) if cfg.log_theta else t
        return m


def estimate_scale(batches: Sequence, mode: str | None) -> float:
    """c with E‖c x‖² = 1 ("norm2"), E‖c x‖² = d ("norm2_d") or E‖c x‖ = √d ("sqrt_d"),
    from the given batches (float64 accumulation); 1.0 for mode None."""
    if mode is None:
        return 1.0
    sq = n = s1 = 0.0
    d = None
    for b in batches:
        b = np.asarray(b, np.float64)
        d = b.shape[1]
        r2 = np.sum(b * b, axis=1)
        sq += r2.sum()
        s1 += np.sqrt(r2).sum()
        n += b.shape[0]
    m = s1 / n if mode == "sqrt_d" else sq / n
    if m <= 0:
        raise ValueError(f"cannot scale inputs (input_scaling={mode!r}): the scaling batches "
                         f"are all zero")
    if mode == "sqrt_d":
        return float(math.sqrt(d) / m)
    return float(math.sqrt((d if mode == "norm2_d" else 1.0) / m))


def fold_scale(params: dict, c: float) -> dict:
    """Weights trained on c·x → weights for x: π(x) unchanged requires W_enc ← c W_enc,
    b_dec ← b_dec / c; x̂ = x̂'/c requires W_dec ← W_dec / c. b_enc and θ are unchanged, so
    codes are identical. Works on stacked (N, …) params too."""
    out = dict(params)
    out["W_enc"] = params["W_enc"] * c
    out["W_dec"] = params["W_dec"] / c
    out["b_dec"] = params["b_dec"] / c
    return out


def make_mesh(n_data: int | None = None, n_sweep: int = 1, devices=None):
    """A ('sweep', 'data') mesh (``jaxsense.mesh.make_mesh``): the batch is sharded over
    'data', parameters replicated over it; stacked sweep states are sharded over 'sweep'.
    Defaults to all devices on 'data'."""
    devices = list(jax.devices() if devices is None else devices)
    if n_data is None:
        n_data = max(len(devices) // max(int(n_sweep), 1), 1)
    return _make_mesh((n_sweep, n_data), ("sweep", "data"), devices)


def _process_rows(data_sh, chunk_shape) -> tuple[int, int]:
    """(start, stop): the rows of a (k, B, d) chunk that this process's devices hold."""
    B = chunk_shape[1]
    if data_sh is None or jax.process_count() == 1:
        return 0, B
    sl = [i[1] for i in data_sh.addressable_devices_indices_map(chunk_shape).values()]
    start = min(s.start or 0 for s in sl)
    stop = max(B if s.stop is None else s.stop for s in sl)
    covered = np.zeros(B, bool)
    for s in sl:
        covered[s] = True
    if not covered[start:stop].all():
        raise ValueError("the mesh gives this process rows that are not contiguous in the "
                         "batch; order the mesh's devices by process")
    return start, stop


def _global_scale_batches(buffer, rows, B):
    """The full (B, d) scale batches from every process's rows (for the same input scale
    as one process on the same batches)."""
    if jax.process_count() == 1:
        return buffer
    from jax.experimental import multihost_utils

    local = np.stack([np.asarray(b, np.float32) for b in buffer])
    parts = multihost_utils.process_allgather(local)          # (P, nb, rows, d)
    ranges = multihost_utils.process_allgather(np.asarray(rows))  # (P, 2)
    full = np.zeros((len(buffer), B, local.shape[-1]), np.float32)
    for part, (a, b) in zip(parts, ranges):
        full[:, a:b] = part
    return list(full)


_COMPILED: dict = {}


def _export_params(graphdef, params_state, stacked: bool) -> dict:
    key = ("export", graphdef, stacked)
    if key not in _COMPILED:  # one jitted export per (graphdef, stacked): no recompiles
        def one(p):
            return nnx.merge(graphdef, p).params()

        _COMPILED[key] = jax.jit(jax.vmap(one) if stacked else one)
    return jax.tree.map(np.asarray, _to_host(_COMPILED[key](params_state)))


def _init_fn(config, stacked: bool):
    """The jitted state initialiser, cached by its static config like the train step, so
    repeated ``train`` calls with one config (e.g. a grid over data sizes) compile it once."""
    key = ("init", config, stacked)
    if key not in _COMPILED:
        fn = lambda h, kk: init_state(config, h, kk)[1]
        _COMPILED[key] = jax.jit(jax.vmap(fn) if stacked else fn)
    return _COMPILED[key]


def _chunk_fn(graphdef, config, stacked: bool):
    key = (graphdef, config, stacked)
    if key not in _COMPILED:
        fn = lambda s, c, hp: train_chunk(graphdef, s, c, hp, config)
        if stacked:
            fn = jax.vmap(fn, in_axes=(0, None, 0))
        _COMPILED[key] = jax.jit(fn, donate_argnums=(0,))
    return _COMPILED[key]


def make_chunk_fn(config: TrainConfig, stacked: bool = False):
    """The jitted ``(state, chunk (k,B,d), hp) -> (state, metrics, params_finite)`` used by
    ``train`` (vmapped over stacked states/hparams when ``stacked``; the state is donated)."""
    return _chunk_fn(graphdef_of(config), config, stacked)


def _meta(config, step, scale, n_sae, hp, seeds):
    return dict(step=int(step), scale=float(scale), n_sae=n_sae, config=config.to_dict(),
                hparams={k: np.asarray(v).tolist() for k, v in hp._asdict().items()},
                seeds=np.asarray(seeds).tolist())


def _fast_forward(source, n: int) -> None:
    if hasattr(source, "skip"):
        source.skip(n)
    else:
        for _ in range(n):
            next(source)


def _scale_batches(source, config, rows):
    buffer = []
    for _ in range(config.scale_batches):
        try:
            b = next(source)
        except StopIteration:
            break
        check_batch(b, config, len(buffer), rows[1] - rows[0])
        buffer.append(b)
    if not buffer:
        raise ValueError("data yielded no batches")
    return buffer


def _placement(mesh, state, hp, config, stacked, n_sae):
    """Shard state/hp over the mesh; returns (state, hp, sharding of a (k, B, d) chunk)."""
    if mesh is None:
        return state, hp, None
    P = jax.sharding.PartitionSpec
    nd = mesh.shape.get("data", 1)
    if config.batch_size % nd:
        raise ValueError(f"batch_size={config.batch_size} must be divisible by the mesh's "
                         f"'data' axis size {nd}")
    ns = mesh.shape.get("sweep", 1)
    if ns > 1 and (not stacked or n_sae % ns):
        raise ValueError(f"the mesh's 'sweep' axis has size {ns}: it needs a sweep whose "
                         f"size is a multiple of it, got n_sae={n_sae}")
    spec = P("sweep") if (stacked and "sweep" in mesh.axis_names) else P()
    state = jax.device_put(state, jax.sharding.NamedSharding(mesh, spec))
    hp = jax.device_put(hp, jax.sharding.NamedSharding(mesh, spec))
    return state, hp, jax.sharding.NamedSharding(mesh, P(None, "data", None))


def _check_finite(metrics, finite, step, k, stacked):
    bf = np.asarray(metrics["batch_finite"]).reshape(k, -1)
    if not bf.all():
        s_bad = step + int(np.argwhere(~bf)[0][0])
        raise ValueError(f"batch at step {s_bad} contains NaN/Inf; expected finite "
                         f"activations (training stopped; the last checkpoint, if any, "
                         f"is untouched)")
    loss = np.asarray(metrics["loss"]).reshape(k, -1)
    if np.isfinite(loss).all() and finite.all():
        return
    if not np.isfinite(loss).all():
        j, i = np.argwhere(~np.isfinite(loss))[0]
        what, s_bad = "loss", step + int(j)
    else:
        i = int(np.argwhere(~finite.reshape(-1))[0][0])
        what, s_bad = "parameters", step + k
    idx = f"SAE index {int(i)} of the sweep" if stacked else "SAE index 0"
    raise NonFiniteError(f"non-finite {what} at step {s_bad} ({idx}); training stopped, the "
                         f"last good checkpoint (if any) is untouched. Lower lr or check the "
                         f"data.")


def train(data, config: TrainConfig, *, sweep: tuple[HParams, Any] | None = None,
          hparams: HParams | None = None, mesh=None, checkpoint_dir: str | None = None,
          resume: bool = True, overwrite: bool = False,
          max_steps: int | None = None, plateau: Plateau | None = None) -> TrainResult:
    """Train one SAE, or a vmapped sweep of N SAEs on the same batches.

    data: (N, d) array (shuffled by ``ArraySource``, seed ``config.data_seed``) or any
      iterator of (B, d) arrays with B = ``config.batch_size`` (objects with ``skip(n)``
      resume exactly; other iterators are fast-forwarded by consuming n batches).
      Under ``jax.distributed`` (one process per host, a ``mesh`` over every process's
      devices) each process passes the same array and reads only the rows of each batch
      its devices hold; an iterator must yield exactly those rows.
    sweep: ``sae.sweep(config, lam=[...], ...)`` → N stacked SAEs (one jitted vmap; each
      SAE's seed from the sweep's seeds).  hparams: override for a single SAE.
    mesh: a ``make_mesh(...)`` mesh: batch sharded over 'data', params replicated (and the
      sweep axis sharded over 'sweep').
    checkpoint_dir: orbax checkpoints every ``config.checkpoint_every`` steps and at the end.
      ``resume=True`` continues from the latest one exactly (step, data position, scale,
      optimiser and dead counters). ``resume=False`` on a folder that already holds
      checkpoints raises FileExistsError, unless ``overwrite=True`` deletes them first.
    max_steps: stop after this many steps (e.g. to simulate an interruption); the schedule
      still assumes ``config.total_steps``.
    plateau: a :class:`Plateau` rule: stop early once the training loss has stopped
      improving (``total_steps`` / ``max_steps`` remain the cap); ``result.stop`` and
      ``result.steps`` say what happened.

    Raises NonFiniteError (naming step and SAE index) on NaN/Inf loss or parameters, before
    any checkpoint of the bad state is written; ValueError on a malformed batch.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    stacked = sweep is not None
    if stacked:
        hp, seeds = sweep
        n_sae = int(np.shape(hp.lam)[0])
    else:
        hp = HParams.from_config(config) if hparams is None else hparams
        seeds, n_sae = np.asarray(config.seed), None
    hp.check()
    if max_steps is not None:
        from jaxsense._checks import check_int

        check_int("max_steps", max_steps, low=1)
    if plateau is not None:
        if not isinstance(plateau, Plateau):
            raise TypeError(f"plateau must be a sae.loop.Plateau or None, got "
                            f"{type(plateau).__name__}")
        plateau.check()
        if plateau.window % config.steps_per_call:
            raise ValueError(f"plateau.window={plateau.window}: expected a multiple of "
                             f"steps_per_call={config.steps_per_call}")
    if jax.process_count() > 1 and mesh is None:
        raise ValueError(f"mesh=None under jax.distributed ({jax.process_count()} processes): "
                         f"pass mesh=sae.make_mesh(...) over every process's devices")
    k = config.steps_per_call
    total = config.total_steps if max_steps is None else min(max_steps, config.total_steps)
    mngr = (ckpt.open_manager(checkpoint_dir, resume=resume, overwrite=overwrite)
            if checkpoint_dir is not None else None)

    # --- init (or restore) ---
    keys = (jax.vmap(jax.random.key)(jnp.asarray(seeds)) if stacked
            else jax.random.key(int(seeds)))
    graphdef = graphdef_of(config)
    state = _init_fn(config, stacked)(hp, keys)
    state, hp, data_sh = _placement(mesh, state, hp, config, stacked, n_sae)
    chunk_shape = (k, config.batch_size, config.d_in)
    rows = _process_rows(data_sh, chunk_shape)
    source = as_source(data, config, config.seed if config.data_seed is None
                       else config.data_seed, rows=None if rows == (0, chunk_shape[1]) else rows)
    scale, start = None, 0
    if mngr is not None and resume:
        got = ckpt.restore(mngr, state, _meta(config, 0, 0.0, n_sae, hp, seeds))
        if got is not None:
            state, meta = got
            scale, start = meta["scale"], meta["step"]
            _fast_forward(source, start)

    # --- scale from the first batches (kept for training) ---
    buffer = []
    if scale is None:
        buffer = _scale_batches(source, config, rows)
        scale = estimate_scale(_global_scale_batches(buffer, rows, config.batch_size),
                               config.input_scaling)
    it = itertools.chain(buffer, source)
    step_fn = _chunk_fn(graphdef, config, stacked)

    def next_chunk(step0):
        xs = []
        for j in range(k):
            try:
                b = next(it)
            except StopIteration:
                return None
            check_batch(b, config, step0 + j, rows[1] - rows[0])
            xs.append(b)
        if jax.process_count() > 1:  # this process's rows → one global (k, B, d) array
            c = np.stack([np.asarray(b, np.float32) for b in xs]) * np.float32(scale)
            return jax.make_array_from_process_local_data(data_sh, c, chunk_shape)
        if all(isinstance(b, np.ndarray) for b in xs):
            c = np.stack(xs).astype(np.float32, copy=False) * np.float32(scale)
        else:
            c = jnp.stack([jnp.asarray(b, jnp.float32) for b in xs]) * scale
        return jax.device_put(c, data_sh) if data_sh is not None else jnp.asarray(c)

    history: list = []
    trace: list = []  # per-step losses of this call, for the plateau rule and result.losses
    stop = "total_steps" if max_steps is None or max_steps >= config.total_steps else "max_steps"
    bar = None
    if config.progress and jax.process_index() == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.total_steps * config.batch_size, initial=start *
                   config.batch_size, unit="tok", unit_scale=True, desc="sae", leave=False)
    step = start
    chunk = next_chunk(step) if step < total else None
    if step < total and chunk is None:
        warnings.warn("data ended before training started", stacklevel=2)
    try:
        while chunk is not None and step < total:
            state, metrics, finite = step_fn(state, chunk, hp)
            chunk = next_chunk(step + k) if step + k < total else None  # overlaps compute
            metrics = _to_host(metrics)
            if stacked:  # vmapped: (N, k) → (k, N)
                metrics = {n: np.moveaxis(np.asarray(v), 0, 1) for n, v in metrics.items()}
            _check_finite(metrics, np.asarray(_to_host(finite)), step, k, stacked)
            trace.extend(np.asarray(metrics["loss"], np.float32).reshape(k, -1))
            plateaued = False
            if plateau is not None and (step + k) % plateau.window == 0 and \
                    step + k - plateau.min_steps >= 2 * plateau.window:
                imp = plateau_improvement(np.stack(trace[-2 * plateau.window:]), plateau.window)
                plateaued = bool(np.all(imp < plateau.tol))
            for j in range(k):
                s = step + j + 1
                if s % config.log_every == 0 or s == total or (plateaued and j == k - 1):
                    rec = {"step": s, "tokens": s * config.batch_size}
                    for name in _LOGGED:
                        v = np.asarray(metrics[name])[j]
                        rec[name] = v.tolist() if stacked else float(v)
                    history.append(rec)
                    if bar is not None:
                        f0 = (lambda v: v[0] if stacked else v)
                        bar.set_postfix(L0=f"{f0(rec['l0']):.1f}", EV=f"{f0(rec['ev']):.3f}",
                                        dead=f"{f0(rec['dead_frac']):.2f}", refresh=False)
            step += k
            if bar is not None:
                bar.update(k * config.batch_size)
            if (mngr is not None and config.checkpoint_every
                    and step % config.checkpoint_every == 0 and step < total):
                ckpt.save(mngr, state, _meta(config, step, scale, n_sae, hp, seeds))
            if plateaued and step < total:
                stop = "plateau"
                chunk = None
    finally:
        if bar is not None:
            bar.close()
    if step < total and stop != "plateau":
        stop = "data"
        warnings.warn(f"data ended after {step} of {total} steps", stacklevel=2)
    if mngr is not None and (mngr.latest_step() or 0) < step:
        ckpt.save(mngr, state, _meta(config, step, scale, n_sae, hp, seeds))
    params = fold_scale(_export_params(graphdef, state.params, stacked), scale)
    losses = np.stack(trace) if trace else np.zeros((0, n_sae or 1), np.float32)
    return TrainResult(params=params, state=state, graphdef=graphdef, config=config,
                       scale=float(scale), history=history, n_sae=n_sae, hparams=hp,
                       steps=int(step), stop=stop,
                       losses=losses if stacked else losses[:, 0])
