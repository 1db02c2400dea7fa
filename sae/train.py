"""Training JumpReLU / TopK SAEs: a pure jitted step, vmapped sweeps, data parallelism,
dead-latent counters, logging, orbax checkpoints with exact resume, NaN/Inf guards.

Quick API (what the atoms analysis needs)
-----------------------------------------
    import sae
    cfg = sae.TrainConfig(d_in=384, width=1536, lam=3e-3, total_steps=2000, batch_size=1024)
    res = sae.train(X, cfg)                 # X: (N, d) array, or any iterator of (B, d) arrays
    p = res.params                          # dict of numpy arrays in ORIGINAL input units:
                                            #   W_enc (d,M) W_dec (M,d) b_enc (M,) b_dec (d,)
                                            #   threshold (M,)
    codes = res.encode(X)                   # (N, M) codes f(x)
    # vmapped λ sweep: 4 SAEs trained on the same batches in one jitted call
    res = sae.train(X, cfg, sweep=sae.sweep(cfg, lam=[1e-3, 3e-3, 1e-2, 3e-2]))
    res.params["W_dec"].shape               # (4, M, d); res.encode(X, i=2) → codes of SAE 2
    sae.TrainConfig.anthropic(d_in, width)  # tanh-penalty recipe (trains more easily)

Pure pieces (for custom loops): ``init_state(config, hp, key) -> (graphdef, TrainState)``,
``train_step(graphdef, state, batch, hp, config) -> (state, metrics)`` — the whole update in
one function: loss + straight-through grads, optax clip + Adam(β1=0), lr/λ schedules,
decoder-norm option, dead counters — and ``train_chunk`` (``lax.scan`` of the step over a
(k, B, d) chunk). Sweeps are ``jax.vmap`` of these over stacked states/hparams with the batch
broadcast (``in_axes=None``).

Input scaling (jumprelu.md): one scalar c with E‖c x‖² = 1 ("norm2", GDM) or
E‖c x‖ = √d ("sqrt_d", Anthropic) is estimated from the first batches and folded back into
the returned weights: W_enc ← c W_enc, W_dec ← W_dec / c, b_dec ← b_dec / c (codes unchanged).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from .model import JumpReLUSAE, TopKSAE
from .model import encode as _encode

__all__ = [
    "ArraySource",
    "HParams",
    "NonFiniteError",
    "PlantedSource",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "estimate_scale",
    "fold_scale",
    "init_state",
    "make_chunk_fn",
    "make_mesh",
    "planted_dictionary",
    "sweep",
    "train",
    "train_chunk",
    "train_step",
]


# --------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------
_RECIPES = {
    # GDM (Rajamanoharan et al. 2024 / Gemma Scope), jumprelu.md "Defaults"
    "gdm": dict(sparsity="l0", lam=1e-2, lr=7e-5, eps=1e-3, theta_init=1e-3,
                lam_warmup_steps=10_000, lr_warmup_steps=1_000, lr_decay_frac=0.0,
                input_scaling="norm2", preact_coef=0.0),
    # Anthropic Jan 2025 update (reconstructed from jumprelu.md "Known pains")
    "anthropic": dict(sparsity="tanh", lam=1.0, lr=2e-4, eps=2.0, theta_init=0.1,
                      lam_warmup_steps=None, lr_warmup_steps=0, lr_decay_frac=0.2,
                      input_scaling="sqrt_d", preact_coef=3e-6),
}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Static settings of a training run (hashable; passed to jit as static).

    Fields left as ``None`` take the ``recipe`` default ("gdm" or "anthropic", see
    jumprelu.md). ``lam``, ``lr``, ``eps`` and ``theta_init`` are only the defaults of the
    per-SAE ``HParams`` (a sweep overrides them per SAE).

    arch: "jumprelu" | "topk" (k active latents).  sparsity: "l0" (GDM, on π) | "tanh".
    lam_warmup_steps: λ ramps linearly 0 → λ (None: over the whole run).
    lr_warmup_steps / lr_decay_frac: lr ramps linearly up, then linearly to 0 over the last
      ``lr_decay_frac`` of ``total_steps``.
    input_scaling: "norm2" (E‖x‖² = 1) | "sqrt_d" (E‖x‖ = √d) | None; estimated on
      ``scale_batches`` batches.
    decoder_norm: "none" | "unit" (rows of W_dec renormalised to 1 after every update).
    preact_on: "dead" (Anthropic pre-activation loss only on dead latents) | "all".
    dead_tokens: a latent is dead after this many tokens without firing.
    steps_per_call: steps scanned inside one jitted call (data arrive as (k, B, d) chunks).
    matmul_dtype: None | "bfloat16" (matmul operands; accumulation and Adam in f32).
    seed: init seed of a single SAE (a sweep has its own seeds); data_seed: shuffling seed of
      an in-memory array source (None: ``seed``).
    """

    d_in: int
    width: int
    arch: str = "jumprelu"
    k: int = 32
    recipe: str = "gdm"
    sparsity: str | None = None
    lam: float | None = None
    lr: float | None = None
    eps: float | None = None
    theta_init: float | None = None
    log_theta: bool = False
    apply_b_dec_to_input: bool = True
    total_steps: int = 10_000
    batch_size: int = 4096
    lr_warmup_steps: int | None = None
    lr_decay_frac: float | None = None
    lam_warmup_steps: int | None = None
    clip_norm: float = 1.0
    b1: float = 0.0
    b2: float = 0.999
    adam_eps: float = 1e-8
    input_scaling: str | None = "recipe"
    scale_batches: int = 8
    decoder_norm: str = "none"
    tanh_c: float = 4.0
    preact_coef: float | None = None
    preact_on: str = "dead"
    dead_tokens: int = 10_000_000
    steps_per_call: int = 1
    log_every: int = 100
    checkpoint_every: int = 0
    matmul_dtype: str | None = None
    seed: int = 0
    data_seed: int | None = None
    progress: bool = True

    def __post_init__(self):
        _check_int("d_in", self.d_in)
        _check_int("width", self.width)
        if self.recipe not in _RECIPES:
            raise ValueError(f"recipe must be one of {sorted(_RECIPES)}, got recipe={self.recipe!r}")
        rec = _RECIPES[self.recipe]
        for name in ("sparsity", "lam", "lr", "eps", "theta_init", "lr_warmup_steps",
                     "lr_decay_frac", "preact_coef"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, rec[name])
        if self.lam_warmup_steps is None:
            lw = rec["lam_warmup_steps"]
            object.__setattr__(self, "lam_warmup_steps",
                               self.total_steps if lw is None else lw)
        if self.input_scaling == "recipe":
            object.__setattr__(self, "input_scaling", rec["input_scaling"])
        _check_choice("arch", self.arch, ("jumprelu", "topk"))
        _check_choice("sparsity", self.sparsity, ("l0", "tanh"))
        _check_choice("input_scaling", self.input_scaling, ("norm2", "sqrt_d", None))
        _check_choice("decoder_norm", self.decoder_norm, ("none", "unit"))
        _check_choice("preact_on", self.preact_on, ("dead", "all"))
        _check_choice("matmul_dtype", self.matmul_dtype, (None, "bfloat16", "float32"))
        for n in ("total_steps", "batch_size", "steps_per_call", "log_every", "scale_batches",
                  "k", "dead_tokens"):
            _check_int(n, getattr(self, n))
        for n in ("lr_warmup_steps", "lam_warmup_steps", "checkpoint_every"):
            _check_int(n, getattr(self, n), allow_zero=True)
        if self.arch == "topk" and self.k > self.width:
            raise ValueError(f"k must be ≤ width for arch='topk', got k={self.k}, "
                             f"width={self.width}")
        _check_nonneg("lam", self.lam)
        _check_pos("lr", self.lr)
        _check_pos("eps", self.eps)
        _check_pos("theta_init", self.theta_init)
        _check_pos("clip_norm", self.clip_norm)
        _check_nonneg("preact_coef", self.preact_coef)
        if not 0.0 <= self.lr_decay_frac <= 1.0:
            raise ValueError(f"lr_decay_frac must be in [0, 1], got {self.lr_decay_frac!r}")
        if not (0.0 <= self.b1 < 1.0 and 0.0 <= self.b2 < 1.0):
            raise ValueError(f"b1, b2 must be in [0, 1), got b1={self.b1}, b2={self.b2}")
        if self.checkpoint_every % self.steps_per_call:
            raise ValueError(
                f"checkpoint_every must be a multiple of steps_per_call={self.steps_per_call}, "
                f"got checkpoint_every={self.checkpoint_every}")

    @classmethod
    def gdm(cls, d_in: int, width: int, **kw) -> TrainConfig:
        """GDM / Gemma Scope recipe: L0 penalty, ε=1e-3, θ0=1e-3, E‖x‖²=1 (jumprelu.md)."""
        return cls(d_in=d_in, width=width, recipe="gdm", **kw)

    @classmethod
    def anthropic(cls, d_in: int, width: int, **kw) -> TrainConfig:
        """Anthropic (Jan 2025) recipe: tanh penalty c=4, pre-act loss 3e-6 on dead latents,
        ε=2, θ0=0.1, E‖x‖=√d, λ warmed over the run, lr decayed over the last 20%."""
        return cls(d_in=d_in, width=width, recipe="anthropic", **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_int(name, v, allow_zero=False):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(v).__name__} {v!r}")
    if v < 0 or (v == 0 and not allow_zero):
        exp = "≥ 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be an integer {exp}, got {name}={v}")


def _as_float(name, v):
    try:
        return float(v)
    except Exception as e:
        raise TypeError(f"{name} must be a real number, got {type(v).__name__} {v!r}") from e


def _check_pos(name, v):
    f = _as_float(name, v)
    if not (math.isfinite(f) and f > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {name}={v!r}")


def _check_nonneg(name, v):
    f = _as_float(name, v)
    if not (math.isfinite(f) and f >= 0):
        raise ValueError(f"{name} must be a finite number ≥ 0, got {name}={v!r}")


def _check_choice(name, v, choices):
    if v not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {name}={v!r}")


class HParams(NamedTuple):
    """Per-SAE hyper-parameters (a pytree of float32 scalars, or (N,) arrays in a sweep).

    lam: sparsity coefficient λ; lr: peak learning rate; eps: bandwidth ε;
    theta_init: initial threshold θ0 (used by ``init_state``).
    """

    lam: Any
    lr: Any
    eps: Any
    theta_init: Any

    @classmethod
    def from_config(cls, config: TrainConfig) -> HParams:
        return cls(*(jnp.asarray(getattr(config, n), jnp.float32)
                     for n in ("lam", "lr", "eps", "theta_init")))


def sweep(config: TrainConfig, *, lam=None, lr=None, eps=None, theta_init=None,
          seed=None) -> tuple[HParams, np.ndarray]:
    """Stacked per-SAE hyper-parameters for a vmapped sweep.

    Each argument is a scalar or a sequence; sequences must share one length N, scalars (or
    None: the config value) are broadcast. ``seed`` defaults to ``config.seed + arange(N)``.
    Returns (HParams with (N,) leaves, seeds (N,) int).
    """
    vals = {"lam": lam, "lr": lr, "eps": eps, "theta_init": theta_init, "seed": seed}
    lens = {k: len(v) for k, v in vals.items() if v is not None and np.ndim(v) == 1}
    if len(set(lens.values())) > 1:
        raise ValueError(f"sweep sequences must have one length, got lengths {lens}")
    n = next(iter(lens.values()), 1)
    out = {}
    for name in ("lam", "lr", "eps", "theta_init"):
        v = vals[name]
        v = getattr(config, name) if v is None else v
        arr = np.broadcast_to(np.asarray(v, np.float64), (n,))
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name} must be finite, got {name}={arr.tolist()}")
        if name == "lam" and np.any(arr < 0):
            raise ValueError(f"lam must be ≥ 0 for every SAE, got lam={arr.tolist()}")
        if name != "lam" and np.any(arr <= 0):
            raise ValueError(f"{name} must be > 0 for every SAE, got {name}={arr.tolist()}")
        out[name] = jnp.asarray(arr, jnp.float32)
    seeds = (config.seed + np.arange(n)) if seed is None else np.broadcast_to(
        np.asarray(seed, np.int64), (n,))
    return HParams(**out), np.asarray(seeds)


# --------------------------------------------------------------------------------------
# Pure state / step
# --------------------------------------------------------------------------------------
class TrainState(NamedTuple):
    """Everything that evolves during training (a pytree; stacked with a leading N axis in a
    sweep). params: ``nnx.State`` of the model; opt_state: optax state; step: int32 ();
    since_fired: int32 (M,) steps since each latent last fired (tokens = steps · B)."""

    params: Any
    opt_state: Any
    step: Any
    since_fired: Any


def _make_model(config: TrainConfig, key, theta_init):
    rngs = nnx.Rngs(params=key)
    if config.arch == "topk":
        m = TopKSAE(config.d_in, config.width, config.k, rngs=rngs,
                    apply_b_dec_to_input=config.apply_b_dec_to_input)
    else:
        m = JumpReLUSAE(config.d_in, config.width, rngs=rngs, theta_init=theta_init,
                        log_theta=config.log_theta,
                        apply_b_dec_to_input=config.apply_b_dec_to_input)
    m.compute_dtype = None if config.matmul_dtype in (None, "float32") else config.matmul_dtype
    return m


class ScaleByAdamB1ZeroState(NamedTuple):
    count: Any
    nu: Any


def scale_by_adam_b1_zero(b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
    """Adam's direction with β1 = 0, without the first-moment buffer: identical to
    ``optax.scale_by_adam(b1=0, b2, eps)`` (μ̂_t = g_t) but one fewer (M, d)-sized state
    array to read and write per step (the GDM recipe's optimiser)."""

    def init(params):
        return ScaleByAdamB1ZeroState(jnp.zeros((), jnp.int32),
                                      jax.tree.map(jnp.zeros_like, params))

    def update(updates, state, params=None):
        count = state.count + 1
        nu = jax.tree.map(lambda n, g: b2 * n + (1 - b2) * g * g, state.nu, updates)
        corr = 1 - b2 ** count.astype(jnp.float32)
        out = jax.tree.map(lambda g, n: g / (jnp.sqrt(n / corr) + eps), updates, nu)
        return out, ScaleByAdamB1ZeroState(count, nu)

    return optax.GradientTransformation(init, update)


def _optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clip then Adam(β1, β2, eps) direction; the lr is applied by the step."""
    adam = (scale_by_adam_b1_zero(config.b2, config.adam_eps) if config.b1 == 0 else
            optax.scale_by_adam(b1=config.b1, b2=config.b2, eps=config.adam_eps))
    return optax.chain(optax.clip_by_global_norm(config.clip_norm), adam)


def init_state(config: TrainConfig, hp: HParams, key) -> tuple[Any, TrainState]:
    """Fresh model + optimiser state. vmap over (hp, key) for a sweep. Returns
    (graphdef, TrainState); the graphdef is static (same for every SAE of the sweep)."""
    model = _make_model(config, key, hp.theta_init)
    graphdef, params = nnx.split(model)
    opt_state = _optimizer(config).init(params)
    return graphdef, TrainState(params, opt_state, jnp.zeros((), jnp.int32),
                                jnp.zeros((config.width,), jnp.int32))


def graphdef_of(config: TrainConfig):
    """The static graphdef of the model a config describes (cheap: abstract evaluation)."""
    return nnx.split(nnx.eval_shape(lambda: _make_model(config, jax.random.key(0),
                                                        config.theta_init)))[0]


def lr_at(step, hp_lr, config: TrainConfig):
    """lr(t) = lr · min(1, (t+1)/warm-up) · decay, decay linear to 0 over the last
    ``lr_decay_frac`` of the run."""
    t = jnp.asarray(step, jnp.float32) + 1.0
    warm = jnp.minimum(1.0, t / max(config.lr_warmup_steps, 1))
    if config.lr_decay_frac > 0:
        n_decay = config.lr_decay_frac * config.total_steps
        start = config.total_steps - n_decay
        decay = jnp.clip((config.total_steps - t + 1.0) / n_decay, 0.0, 1.0)
        decay = jnp.where(t <= start, 1.0, decay)
    else:
        decay = 1.0
    return hp_lr * warm * decay


def lam_at(step, hp_lam, config: TrainConfig):
    """λ(t) = λ · min(1, (t+1)/λ warm-up) (linear warm-up)."""
    t = jnp.asarray(step, jnp.float32) + 1.0
    return hp_lam * jnp.minimum(1.0, t / max(config.lam_warmup_steps, 1))


def _path_has(path, name):
    return any(getattr(k, "key", getattr(k, "name", None)) == name for k in path)


def train_step(graphdef, state: TrainState, batch, hp: HParams, config: TrainConfig):
    """One optimisation step on a batch (B, d). Pure; jit/vmap-able.

    loss (JumpReLUSAE.loss) → straight-through grads → clip_by_global_norm → Adam(β1=0)
    direction → params −= lr(t)·direction → optional unit-norm decoder rows → θ ≥ 0 (raw θ)
    → dead counters. Returns (new state, metrics dict of scalars).
    """
    B = batch.shape[0]
    dead_steps = max(1, -(-config.dead_tokens // B))
    lam_t = lam_at(state.step, hp.lam, config)
    lr_t = lr_at(state.step, hp.lr, config)
    dead = state.since_fired >= dead_steps
    mask = dead.astype(jnp.float32) if config.preact_on == "dead" else None

    def loss_fn(params):
        model = nnx.merge(graphdef, params)
        parts = model.loss(batch, lam=lam_t, eps=hp.eps, sparsity=config.sparsity,
                           tanh_c=config.tanh_c, preact_coef=config.preact_coef,
                           preact_mask=mask)
        return parts.loss, parts

    grads, parts = jax.grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = _optimizer(config).update(grads, state.opt_state, state.params)

    def apply(path, p, u):
        new = p - (lr_t * u).astype(p.dtype)
        if _path_has(path, "theta") and not config.log_theta:
            new = jnp.maximum(new, 0.0)
        if _path_has(path, "W_dec") and config.decoder_norm == "unit":
            new = new / jnp.maximum(jnp.linalg.norm(new, axis=-1, keepdims=True), 1e-12)
        return new

    params = jax.tree_util.tree_map_with_path(apply, state.params, updates)
    since = jnp.where(parts.fired > 0, 0, state.since_fired + 1)
    new_dead = since >= dead_steps
    metrics = dict(loss=parts.loss, mse=parts.mse, l0=parts.l0,
                   ev=1.0 - parts.sse / jnp.maximum(parts.sst, 1e-30),
                   dead_frac=jnp.mean(new_dead.astype(jnp.float32)), lam=lam_t, lr=lr_t,
                   batch_finite=jnp.all(jnp.isfinite(batch)))
    return TrainState(params, opt_state, state.step + 1, since), metrics


def train_chunk(graphdef, state: TrainState, chunk, hp: HParams, config: TrainConfig):
    """``lax.scan`` of ``train_step`` over a (k, B, d) chunk. Returns (state, metrics with a
    leading k axis, params_finite flag)."""

    def body(s, x):
        return train_step(graphdef, s, x, hp, config)

    state, metrics = jax.lax.scan(body, state, chunk)
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(p))
                                for p in jax.tree.leaves(state.params)]))
    return state, metrics, finite


# --------------------------------------------------------------------------------------
# Data sources
# --------------------------------------------------------------------------------------
class ArraySource:
    """Shuffled (B, d) batches from an in-memory (N, d) array; epoch e uses the permutation
    of ``np.random.default_rng((seed, e))``. Deterministic per batch index → exact resume
    (``skip``)."""

    def __init__(self, data, batch_size: int, seed: int = 0):
        data = np.asarray(data)
        if data.ndim != 2:
            raise ValueError(f"data must be a 2-D (N, d) array, got shape {data.shape}")
        _check_int("batch_size", batch_size)
        if data.shape[0] < batch_size:
            raise ValueError(f"data has N={data.shape[0]} rows, fewer than "
                             f"batch_size={batch_size}")
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.per_epoch = data.shape[0] // batch_size
        self.pos = 0
        self._perm_epoch, self._perm = -1, None

    def __iter__(self):
        return self

    def skip(self, n: int):
        self.pos += n

    def __next__(self):
        e, i = divmod(self.pos, self.per_epoch)
        if e != self._perm_epoch:
            self._perm = np.random.default_rng((self.seed, e)).permutation(self.data.shape[0])
            self._perm_epoch = e
        idx = np.sort(self._perm[i * self.batch_size:(i + 1) * self.batch_size])
        self.pos += 1
        return self.data[idx]


def planted_dictionary(key, d: int = 64, n_atoms: int = 256, *, dtype=np.float32):
    """Unit-norm random atoms D (n_atoms, d) (Gaussian directions)."""
    D = np.asarray(jax.random.normal(key, (n_atoms, d), jnp.float32), np.float64)
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    return D.astype(dtype)


class PlantedSource:
    """Synthetic batches x = Σ_{i∈S} c_i d_i with |S| = k random atoms per example and
    non-negative codes c_i ~ U[lo, hi] (planted-dictionary test). Batch t is a pure function
    of (seed, t) → exact resume."""

    def __init__(self, D, k: int, batch_size: int, seed: int = 0, lo: float = 0.5,
                 hi: float = 1.5):
        self.D = np.asarray(D, np.float32)
        self.k, self.batch_size, self.seed, self.lo, self.hi = k, batch_size, seed, lo, hi
        self.pos = 0

    def __iter__(self):
        return self

    def skip(self, n: int):
        self.pos += n

    def batch(self, t: int):
        rng = np.random.default_rng((self.seed, t))
        n, _ = self.D.shape
        B = self.batch_size
        idx = np.argsort(rng.random((B, n)), axis=1)[:, :self.k]
        c = rng.uniform(self.lo, self.hi, (B, self.k)).astype(np.float32)
        return np.einsum("bk,bkd->bd", c, self.D[idx])

    def codes_and_batch(self, t: int):
        rng = np.random.default_rng((self.seed, t))
        n, _ = self.D.shape
        idx = np.argsort(rng.random((self.batch_size, n)), axis=1)[:, :self.k]
        c = rng.uniform(self.lo, self.hi, (self.batch_size, self.k)).astype(np.float32)
        return idx, c

    def __next__(self):
        x = self.batch(self.pos)
        self.pos += 1
        return x


def _as_source(data, config: TrainConfig, seed: int):
    if isinstance(data, (np.ndarray, jax.Array)) and np.ndim(data) == 2:
        return ArraySource(np.asarray(data), config.batch_size, seed)
    if isinstance(data, (np.ndarray, jax.Array)):
        raise ValueError(f"data must be a 2-D (N, d) array or an iterator of (B, d) arrays, "
                         f"got an array of shape {np.shape(data)}")
    if isinstance(data, Iterator):
        return data
    if isinstance(data, Iterable):
        return iter(data)
    raise TypeError(f"data must be an (N, d) array or an iterator of (B, d) arrays, "
                    f"got {type(data).__name__}")


def _check_batch(x, config: TrainConfig, step: int):
    shape = np.shape(x)
    if len(shape) != 2 or shape[1] != config.d_in:
        raise ValueError(f"batch at step {step} must have shape (B, d_in={config.d_in}), "
                         f"got shape {shape} (wrong input width?)")
    if shape[0] != config.batch_size:
        raise ValueError(f"batch at step {step} must have batch_size={config.batch_size} rows, "
                         f"got {shape[0]}")
    dt = np.dtype(getattr(x, "dtype", np.float32))
    if not np.issubdtype(dt, np.floating) and dt != jnp.bfloat16:
        raise TypeError(f"batch at step {step} must hold floats, got dtype {dt}")
    if isinstance(x, np.ndarray) and not np.all(np.isfinite(x)):
        bad = np.argwhere(~np.isfinite(x))[0]
        raise ValueError(f"batch at step {step} contains NaN/Inf (first at row {bad[0]}, "
                         f"column {bad[1]}); expected finite activations")


# --------------------------------------------------------------------------------------
# Scaling
# --------------------------------------------------------------------------------------
def estimate_scale(batches: Sequence, mode: str | None) -> float:
    """c with E‖c x‖² = 1 ("norm2") or E‖c x‖ = √d ("sqrt_d"), from the given batches
    (float64 accumulation); 1.0 for mode None."""
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
    if mode == "norm2":
        m2 = sq / n
        if m2 <= 0:
            raise ValueError("cannot scale inputs: E‖x‖² = 0 on the scaling batches")
        return float(1.0 / math.sqrt(m2))
    m1 = s1 / n
    if m1 <= 0:
        raise ValueError("cannot scale inputs: E‖x‖ = 0 on the scaling batches")
    return float(math.sqrt(d) / m1)


def fold_scale(params: dict, c: float) -> dict:
    """Weights trained on c·x → weights for x (jumprelu.md): π(x) unchanged requires
    W_enc ← c W_enc, b_dec ← b_dec / c; x̂ = x̂'/c requires W_dec ← W_dec / c. b_enc and θ
    are unchanged, so codes are identical. Works on stacked (N, …) params too."""
    out = dict(params)
    out["W_enc"] = params["W_enc"] * c
    out["W_dec"] = params["W_dec"] / c
    out["b_dec"] = params["b_dec"] / c
    return out


# --------------------------------------------------------------------------------------
# Sharding
# --------------------------------------------------------------------------------------
def make_mesh(n_data: int | None = None, n_sweep: int = 1, devices=None):
    """A ('sweep', 'data') mesh: the batch is sharded over 'data', parameters replicated over
    it; stacked sweep states are sharded over 'sweep'. Defaults to all devices on 'data'."""
    devices = list(jax.devices() if devices is None else devices)
    if n_data is None:
        n_data = len(devices) // n_sweep
    if n_data * n_sweep > len(devices) or n_data < 1 or n_sweep < 1:
        raise ValueError(f"mesh needs n_sweep·n_data ≤ {len(devices)} devices, got "
                         f"n_sweep={n_sweep}, n_data={n_data}")
    arr = np.array(devices[: n_data * n_sweep]).reshape(n_sweep, n_data)
    return jax.sharding.Mesh(arr, ("sweep", "data"))


# --------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------
class NonFiniteError(FloatingPointError):
    """Raised when loss or parameters become NaN/Inf; the message names step and SAE index."""


@dataclasses.dataclass
class TrainResult:
    """Output of ``train``.

    params: numpy dict in original input units (see ``fold_scale``): W_enc (d,M),
      W_dec (M,d), b_enc (M,), b_dec (d,), threshold (M,) — each with a leading (N,) axis
      for a sweep.  state: final ``TrainState`` (in scaled units).  scale: c.
    history: list of logged dicts (step, tokens, and per-SAE lists of loss, l0, ev,
      dead_frac, lam, lr).  n_sae: None (single) or N.
    """

    params: dict
    state: TrainState
    graphdef: Any
    config: TrainConfig
    scale: float
    history: list
    n_sae: int | None
    hparams: HParams

    def sae_params(self, i: int | None = None) -> dict:
        """Params of SAE ``i`` of a sweep (or of the single SAE)."""
        if self.n_sae is None:
            return self.params
        if i is None:
            raise ValueError("this result holds a sweep: pass the SAE index i")
        return {k: v[i] for k, v in self.params.items()}

    def encode(self, x, i: int | None = None):
        """Codes f(x) (N, M) of SAE ``i`` on inputs in original units (N, d)."""
        p = jax.tree.map(jnp.asarray, self.sae_params(i))
        k = self.config.k if self.config.arch == "topk" else None
        return np.asarray(_encode(p, jnp.asarray(x, jnp.float32),
                                  apply_b_dec_to_input=self.config.apply_b_dec_to_input, k=k))

    def model(self, i: int | None = None):
        """An NNX module holding SAE ``i``'s weights in original units."""
        cfg = self.config
        m = _make_model(cfg, jax.random.key(0), cfg.theta_init)
        p = self.sae_params(i)
        m.W_enc[...] = jnp.asarray(p["W_enc"])
        m.W_dec[...] = jnp.asarray(p["W_dec"])
        m.b_enc[...] = jnp.asarray(p["b_enc"])
        m.b_dec[...] = jnp.asarray(p["b_dec"])
        if cfg.arch == "jumprelu":
            t = jnp.asarray(p["threshold"])
            m.theta[...] = jnp.log(t) if cfg.log_theta else t
        return m


def _export_params(graphdef, params_state, config, stacked: bool) -> dict:
    def one(p):
        m = nnx.merge(graphdef, p)
        return m.params()

    f = jax.vmap(one) if stacked else one
    return jax.tree.map(np.asarray, jax.jit(f)(params_state))


_COMPILED: dict = {}


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


def _ckpt_manager(directory):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False),
    )


def _save(mngr, state, meta):
    import orbax.checkpoint as ocp

    leaves = {f"{i:05d}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(state))}
    mngr.save(meta["step"], args=ocp.args.Composite(state=ocp.args.StandardSave(leaves),
                                                   meta=ocp.args.JsonSave(meta)))
    mngr.wait_until_finished()


def _restore(mngr, template_state):
    import orbax.checkpoint as ocp

    step = mngr.latest_step()
    if step is None:
        return None
    leaves, treedef = jax.tree.flatten(template_state)
    target = {f"{i:05d}": np.zeros(np.shape(x), np.asarray(x).dtype)
              for i, x in enumerate(leaves)}
    out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                     meta=ocp.args.JsonRestore()))
    restored = [jnp.asarray(out["state"][f"{i:05d}"]) for i in range(len(leaves))]
    return jax.tree.unflatten(treedef, restored), out["meta"]


def train(data, config: TrainConfig, *, sweep: tuple[HParams, Any] | None = None,
          hparams: HParams | None = None, mesh=None, checkpoint_dir: str | None = None,
          resume: bool = True, max_steps: int | None = None) -> TrainResult:
    """Train one SAE, or a vmapped sweep of N SAEs on the same batches.

    data: (N, d) array (shuffled by ``ArraySource``, seed ``config.seed``) or any iterator of
      (B, d) arrays with B = ``config.batch_size`` (objects with ``skip(n)`` resume exactly;
      other iterators are fast-forwarded by consuming n batches).
    sweep: ``sae.sweep(config, lam=[...], ...)`` → N stacked SAEs (one jitted vmap; each
      SAE's seed from the sweep's seeds).  hparams: override for a single SAE.
    mesh: a ``make_mesh(...)`` mesh: batch sharded over 'data', params replicated (and the
      sweep axis sharded over 'sweep').
    checkpoint_dir: orbax checkpoints every ``config.checkpoint_every`` steps and at the end;
      with ``resume`` training continues from the latest one exactly (step, data position,
      scale, optimiser and dead counters).
    max_steps: stop after this many steps (e.g. to simulate an interruption); the schedule
      still assumes ``config.total_steps``.

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
        seeds = np.asarray(config.seed)
        n_sae = None
    for name, v in hp._asdict().items():
        arr = np.asarray(v)
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"hparams.{name} must be finite, got {arr.tolist()}")
        if (np.any(arr < 0) if name == "lam" else np.any(arr <= 0)):
            exp = "≥ 0" if name == "lam" else "> 0"
            raise ValueError(f"hparams.{name} must be {exp}, got {name}={arr.tolist()}")
    source = _as_source(data, config, config.seed if config.data_seed is None
                        else config.data_seed)
    k = config.steps_per_call
    total = config.total_steps if max_steps is None else min(max_steps, config.total_steps)

    # --- init (or restore) ---
    keys = jax.vmap(jax.random.key)(jnp.asarray(seeds)) if stacked else jax.random.key(
        int(seeds))
    init = jax.vmap(lambda h, kk: init_state(config, h, kk)[1]) if stacked else (
        lambda h, kk: init_state(config, h, kk)[1])
    graphdef = graphdef_of(config)
    state = jax.jit(init)(hp, keys)
    mngr = _ckpt_manager(checkpoint_dir) if checkpoint_dir is not None else None
    scale = None
    start = 0
    if mngr is not None and resume:
        got = _restore(mngr, state)
        if got is not None:
            state, meta = got
            if meta["config"] != json.loads(json.dumps(config.to_dict())):
                raise ValueError(f"checkpoint in {checkpoint_dir} was written with another "
                                 f"config: {meta['config']}")
            now = _meta(config, 0, 0.0, n_sae, hp, seeds)
            for key in ("n_sae", "hparams", "seeds"):
                if meta[key] != now[key]:
                    raise ValueError(f"checkpoint in {checkpoint_dir} has {key}={meta[key]}, "
                                     f"this run has {key}={now[key]}")
            scale, start = meta["scale"], meta["step"]
            if hasattr(source, "skip"):
                source.skip(start)
            else:
                for _ in range(start):
                    next(source)

    # --- scale from the first batches (kept for training) ---
    buffer = []
    if scale is None:
        for _ in range(max(config.scale_batches, 1)):
            try:
                b = next(source)
            except StopIteration:
                break
            _check_batch(b, config, len(buffer))
            buffer.append(b)
        if not buffer:
            raise ValueError("data yielded no batches")
        scale = estimate_scale(buffer, config.input_scaling)
    it = itertools.chain(buffer, source)

    # --- placement ---
    P = jax.sharding.PartitionSpec
    if mesh is not None:
        nd = mesh.shape.get("data", 1)
        if config.batch_size % nd:
            raise ValueError(f"batch_size={config.batch_size} must be divisible by the mesh's "
                             f"'data' axis size {nd}")
        ns = mesh.shape.get("sweep", 1)
        if ns > 1 and (not stacked or n_sae % ns):
            raise ValueError(f"the mesh's 'sweep' axis has size {ns}: it needs a sweep whose "
                             f"size is a multiple of it, got n_sae={n_sae}")
        data_sh = jax.sharding.NamedSharding(mesh, P(None, "data", None))
        spec = P("sweep") if (stacked and "sweep" in mesh.axis_names) else P()
        state = jax.device_put(state, jax.sharding.NamedSharding(mesh, spec))
        hp = jax.device_put(hp, jax.sharding.NamedSharding(mesh, spec))
    else:
        data_sh = None
    step_fn = _chunk_fn(graphdef, config, stacked)

    def next_chunk(step0):
        xs = []
        for j in range(k):
            try:
                b = next(it)
            except StopIteration:
                return None
            _check_batch(b, config, step0 + j)
            xs.append(b)
        if all(isinstance(b, np.ndarray) for b in xs):
            c = np.stack(xs).astype(np.float32, copy=False) * np.float32(scale)
            return jax.device_put(c, data_sh) if data_sh is not None else jnp.asarray(c)
        c = jnp.stack([jnp.asarray(b, jnp.float32) for b in xs]) * scale
        return jax.device_put(c, data_sh) if data_sh is not None else c

    history: list = []
    bar = None
    if config.progress:
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
            nxt_step = step + k
            chunk = next_chunk(nxt_step) if nxt_step < total else None  # overlaps compute
            metrics = jax.device_get(metrics)
            if stacked:  # vmapped: (N, k) → (k, N)
                metrics = {n: np.moveaxis(np.asarray(v), 0, 1) for n, v in metrics.items()}
            finite = np.asarray(jax.device_get(finite))
            bf = np.asarray(metrics["batch_finite"]).reshape(k, -1)
            if not bf.all():
                s_bad = step + int(np.argwhere(~bf)[0][0])
                raise ValueError(f"batch at step {s_bad} contains NaN/Inf; expected finite "
                                 f"activations (training stopped; the last checkpoint, if any, "
                                 f"is untouched)")
            loss = np.asarray(metrics["loss"]).reshape(k, -1)
            if not np.isfinite(loss).all() or not finite.all():
                if not np.isfinite(loss).all():
                    j, i = np.argwhere(~np.isfinite(loss))[0]
                    what, s_bad = "loss", step + int(j)
                else:
                    i = int(np.argwhere(~finite.reshape(-1))[0][0])
                    what, s_bad = "parameters", nxt_step
                idx = f"SAE index {int(i)} of the sweep" if stacked else "SAE index 0"
                raise NonFiniteError(
                    f"non-finite {what} at step {s_bad} ({idx}); training stopped, the last "
                    f"good checkpoint (if any) is untouched. Lower lr or check the data.")
            for j in range(k):
                s = step + j + 1
                if s % config.log_every == 0 or s == total:
                    rec = {"step": s, "tokens": s * config.batch_size}
                    for name in ("loss", "mse", "l0", "ev", "dead_frac", "lam", "lr"):
                        v = np.asarray(metrics[name])[j]
                        rec[name] = v.tolist() if stacked else float(v)
                    history.append(rec)
                    if bar is not None:
                        f0 = (lambda v: v[0] if stacked else v)
                        bar.set_postfix(L0=f"{f0(rec['l0']):.1f}", EV=f"{f0(rec['ev']):.3f}",
                                        dead=f"{f0(rec['dead_frac']):.2f}", refresh=False)
            step = nxt_step
            if bar is not None:
                bar.update(k * config.batch_size)
            if mngr is not None and config.checkpoint_every and step % config.checkpoint_every \
                    == 0 and step < total:
                _save(mngr, state, _meta(config, step, scale, n_sae, hp, seeds))
    finally:
        if bar is not None:
            bar.close()
    if step < total:
        warnings.warn(f"data ended after {step} of {total} steps", stacklevel=2)
    if mngr is not None and (mngr.latest_step() or 0) < step:
        _save(mngr, state, _meta(config, step, scale, n_sae, hp, seeds))
    params = fold_scale(_export_params(graphdef, state.params, config, stacked), scale)
    return TrainResult(params=params, state=state, graphdef=graphdef, config=config,
                       scale=float(scale), history=history, n_sae=n_sae, hparams=hp)


# `sae.train` is both this module and the training entry point: calling the module calls
# `train(...)`, so `sae.train(X, cfg)` and `from sae.train import TrainConfig` both work.
class _CallableModule(__import__("types").ModuleType):
    def __call__(self, *args, **kwargs):
        return train(*args, **kwargs)


__import__("sys").modules[__name__].__class__ = _CallableModule
