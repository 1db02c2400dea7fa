"""The pure train step: loss → straight-through grads → one optax chain → apply_updates →
projections. Everything here is jit- and vmap-able; a sweep is ``jax.vmap`` over stacked
states and hyper-parameters with the batch broadcast (``in_axes=None``).

    graphdef, state = init_state(config, hp, key)
    state, metrics = train_step(graphdef, state, batch (B, d), hp, config)
    state, metrics (k, …), finite = train_chunk(graphdef, state, chunk (k, B, d), hp, config)

The optimiser (``optimizer``) is ``optax.chain([project_out_parallel,] clip_by_global_norm,
Adam direction, scale_by_learning_rate(schedule))``; with β1 = 0 (the GDM recipe) the Adam
direction is ``optax.scale_by_rms(decay=β2, eps_in_sqrt=False, bias_correction=True)`` —
Adam without the first-moment buffer, one fewer (M, d) state array. The constraints are optax
projections applied after ``apply_updates``: θ ≥ 0 (``projection_non_negative``, raw θ only)
and, with ``decoder_norm`` "unit" or "constrained", unit decoder rows
(``projection_l2_sphere`` per row). "constrained" also removes, before clipping and Adam, the
component of each W_dec row's gradient along that row (``project_out_parallel``) — the
ConstrainedAdam of dictionary_learning (Marks et al.), used there for the GDM JumpReLU recipe.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from .config import HParams, TrainConfig
from .model import JumpReLUSAE, TiedJumpReLUSAE, TopKSAE

__all__ = ["TrainState", "graphdef_of", "init_state", "lam_schedule", "lr_schedule",
           "make_model", "optimizer", "project_out_parallel", "remove_parallel_component",
           "train_chunk", "train_step"]


class TrainState(NamedTuple):
    """Everything that evolves during training (a pytree; stacked with a leading N axis in a
    sweep). params: ``nnx.State`` of the model; opt_state: optax state; step: int32 ();
    since_fired: int32 (M,) steps since each latent last fired (tokens = steps · B);
    log_lam: float32 () the log-multiplier a of λ that ``target_l0`` adapts (0 otherwise)."""

    params: Any
    opt_state: Any
    step: Any
    since_fired: Any
    log_lam: Any


def make_model(config: TrainConfig, key, theta_init) -> nnx.Module:
    """The NNX SAE that ``config.arch`` names, initialised from ``key``."""
    rngs = nnx.Rngs(params=key)
    if config.arch == "topk":
        m = TopKSAE(config.d_in, config.width, config.k, rngs=rngs, init=config.init,
                    apply_b_dec_to_input=config.apply_b_dec_to_input)
    else:
        cls = TiedJumpReLUSAE if config.arch == "tied" else JumpReLUSAE
        m = cls(config.d_in, config.width, rngs=rngs, theta_init=theta_init,
                log_theta=config.log_theta, init=config.init,
                apply_b_dec_to_input=config.apply_b_dec_to_input)
    m.compute_dtype = None if config.matmul_dtype in (None, "float32") else config.matmul_dtype
    return m


def graphdef_of(config: TrainConfig):
    """The static graphdef of the model a config describes (cheap: abstract evaluation)."""
    return nnx.split(nnx.eval_shape(lambda: make_model(config, jax.random.key(0),
                                                       config.theta_init)))[0]


def lr_schedule(config: TrainConfig, lr) -> optax.Schedule:
    """lr(t), t = optimiser steps done: linear warm-up lr·(t+1)/W over W =
    ``lr_warmup_steps`` steps, constant, then linear to 0 over the last ``lr_decay_frac`` of
    ``total_steps`` (the Anthropic recipe's decay). ``lr`` may be traced (a sweep)."""
    T = config.total_steps
    W = max(config.lr_warmup_steps, 1)
    n_decay = int(round(config.lr_decay_frac * T))
    warm = optax.linear_schedule(lr / W, lr, transition_steps=W - 1) if W > 1 else (
        optax.constant_schedule(lr))
    if n_decay <= 0:
        return warm
    start = T - n_decay
    decay = optax.linear_schedule(lr, 0.0, transition_steps=n_decay)
    return optax.join_schedules([warm, decay], boundaries=[start])


def lam_schedule(config: TrainConfig, lam) -> optax.Schedule:
    """λ(t) = λ · min(1, (t+1)/W), W = ``lam_warmup_steps`` (linear warm-up)."""
    W = max(config.lam_warmup_steps, 1)
    return optax.linear_schedule(lam / W, lam, transition_steps=W - 1) if W > 1 else (
        optax.constant_schedule(lam))


def remove_parallel_component(g, w):
    """g − ⟨g_i, ŵ_i⟩ ŵ_i row by row, ŵ_i = w_i/‖w_i‖: the gradient of each decoder row
    without its component along the row (the tangent space of the sphere at ŵ_i). (M, d),
    (M, d) → (M, d). A zero row of w leaves its gradient row unchanged."""
    n2 = jnp.sum(w * w, axis=-1, keepdims=True)
    coef = jnp.sum(g * w, axis=-1, keepdims=True) / jnp.where(n2 > 0, n2, 1.0)
    return g - coef * w


def project_out_parallel(name: str = "W_dec") -> optax.GradientTransformation:
    """Optax transformation: replace the update of parameter ``name`` (an (M, d) matrix of
    rows) by ``remove_parallel_component(update, param)``; every other leaf passes through.

    Stateless; needs ``params`` in ``update``. This is the gradient step of
    dictionary_learning's ``ConstrainedAdam`` / ``remove_gradient_parallel_to_decoder_
    directions`` (unit-norm decoder rows, Bricken et al. 2023): put it first in the chain and
    renormalise the rows after ``apply_updates`` (``train_step`` does both for
    ``decoder_norm="constrained"``). Works on any mapping with key ``name`` (a dict or an
    ``nnx.State``); a pytree without it is returned unchanged.
    """

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("project_out_parallel needs params: call update(g, s, params)")
        if name not in updates:
            return updates, state
        out = jax.tree.map(lambda u: u, updates)  # shallow copy of the containers
        u, w = updates[name], params[name]
        if hasattr(u, "replace"):  # nnx.Variable leaves of an nnx.State
            out[name] = u.replace(remove_parallel_component(u[...], w[...]))
        else:
            out[name] = remove_parallel_component(u, w)
        return out, state

    return optax.GradientTransformation(init_fn, update_fn)


def optimizer(config: TrainConfig, lr) -> optax.GradientTransformation:
    """[project_out_parallel (decoder_norm="constrained")] → clip_by_global_norm →
    Adam(β1, β2, ε) direction → −lr(t) (``lr_schedule``). The projection comes before the
    clip, as in dictionary_learning's JumpReLU trainer."""
    if config.b1 == 0:
        adam = optax.scale_by_rms(decay=config.b2, eps=config.adam_eps, eps_in_sqrt=False,
                                  bias_correction=True)
    else:
        adam = optax.scale_by_adam(b1=config.b1, b2=config.b2, eps=config.adam_eps)
    parts = [optax.clip_by_global_norm(config.clip_norm), adam,
             optax.scale_by_learning_rate(lr_schedule(config, lr))]
    if config.decoder_norm == "constrained":
        parts.insert(0, project_out_parallel("W_dec"))
    return optax.chain(*parts)


def _project(params, config: TrainConfig):
    """θ ≥ 0 (raw θ parameterisation) and, with ``decoder_norm`` "unit" or "constrained",
    unit W_dec rows."""
    if "theta" in params and not config.log_theta:
        params["theta"] = params["theta"].replace(
            optax.projections.projection_non_negative(params["theta"][...]))
    if config.decoder_norm in ("unit", "constrained"):
        w = params["W_dec"][...]
        params["W_dec"] = params["W_dec"].replace(
            jax.vmap(optax.projections.projection_l2_sphere)(w))
    return params


def init_state(config: TrainConfig, hp: HParams, key) -> tuple[Any, TrainState]:
    """Fresh model + optimiser state. vmap over (hp, key) for a sweep. Returns
    (graphdef, TrainState); the graphdef is static (same for every SAE of the sweep)."""
    model = make_model(config, key, hp.theta_init)
    graphdef, params = nnx.split(model)
    opt_state = optimizer(config, hp.lr).init(params)
    return graphdef, TrainState(params, opt_state, jnp.zeros((), jnp.int32),
                                jnp.zeros((config.width,), jnp.int32),
                                jnp.zeros((), jnp.float32))


def train_step(graphdef, state: TrainState, batch, hp: HParams, config: TrainConfig):
    """One optimisation step on a batch (B, d). Pure; jit/vmap-able.

    Loss (``JumpReLUSAE.loss``: eq. 4 of Rajamanoharan et al. 2024 or the tanh penalty) →
    straight-through grads → ``optimizer`` → ``optax.apply_updates`` → ``_project`` → dead
    counters → (with ``config.target_l0``) the λ controller a += rate·log(L0/target). Returns (new state, metrics dict of scalars).
    """
    B = batch.shape[0]
    dead_steps = max(1, -(-config.dead_tokens // B))
    lam_t = lam_schedule(config, hp.lam)(state.step) * jnp.exp(state.log_lam)
    lr_t = lr_schedule(config, hp.lr)(state.step)
    dead = state.since_fired >= dead_steps
    mask = dead.astype(jnp.float32) if config.preact_on == "dead" else None

    def loss_fn(params):
        model = nnx.merge(graphdef, params)
        parts = model.loss(batch, lam=lam_t, eps=hp.eps, sparsity=config.sparsity,
                           tanh_c=config.tanh_c, preact_coef=config.preact_coef,
                           preact_mask=mask)
        return parts.loss, parts

    grads, parts = jax.grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = optimizer(config, hp.lr).update(grads, state.opt_state, state.params)
    params = _project(optax.apply_updates(state.params, updates), config)
    since = jnp.where(parts.fired > 0, 0, state.since_fired + 1)
    new_dead = since >= dead_steps
    log_lam = state.log_lam
    if config.target_l0 is not None:  # integral control of λ in log space (TrainConfig)
        log_lam = log_lam + config.target_l0_rate * jnp.log(
            jnp.maximum(parts.l0, 0.5) / config.target_l0)
    metrics = dict(loss=parts.loss, mse=parts.mse, l0=parts.l0,
                   ev=1.0 - parts.sse / jnp.maximum(parts.sst, 1e-30),
                   dead_frac=jnp.mean(new_dead.astype(jnp.float32)), lam=lam_t, lr=lr_t,
                   batch_finite=jnp.all(jnp.isfinite(batch)))
    return TrainState(params, opt_state, state.step + 1, since, log_lam), metrics


def train_chunk(graphdef, state: TrainState, chunk, hp: HParams, config: TrainConfig):
    """``lax.scan`` of ``train_step`` over a (k, B, d) chunk. Returns (state, metrics with a
    leading k axis, params_finite flag)."""

    def body(s, x):
        return train_step(graphdef, s, x, hp, config)

    state, metrics = jax.lax.scan(body, state, chunk)
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(p))
                                for p in jax.tree.leaves(state.params)]))
    return state, metrics, finite
