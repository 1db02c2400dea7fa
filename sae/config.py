"""Training configuration: the frozen ``TrainConfig``, named recipes, per-SAE ``HParams``.

Recipes (the defaults a ``None`` field takes):

* ``"gdm"`` — Rajamanoharan et al. 2024, "Jumping ahead: improving reconstruction fidelity
  with JumpReLU sparse autoencoders" (arXiv:2407.14435) and Gemma Scope (Lieberum et al.
  2024, arXiv:2408.05147): L0 penalty, bandwidth ε = 1e-3, θ0 = 1e-3, lr 7e-5 with a 1k-step
  warm-up, λ warmed over 10k steps, Adam(β1 = 0, β2 = 0.999), inputs scaled to E‖x‖² = 1.
* ``"anthropic"`` — Anthropic's January 2025 circuits update ("Dictionary learning
  optimization techniques"): tanh penalty λ Σ tanh(c f_i ‖d_i‖) with c = 4, pre-activation
  loss 3e-6 on dead latents, ε = 2, θ0 = 0.1, lr 2e-4 decayed linearly over the last 20%,
  λ warmed over the whole run, inputs scaled to E‖x‖ = √d. The constants that the update
  does not state (λ = 1, θ0, ε) are our reconstruction and are plain fields here.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from jaxsense._checks import check_choice, check_int, check_scalar

__all__ = ["ARCHS", "RECIPES", "HParams", "TrainConfig", "sweep"]

ARCHS = ("jumprelu", "topk", "tied")

RECIPES = {
    "gdm": dict(sparsity="l0", lam=1e-2, lr=7e-5, eps=1e-3, theta_init=1e-3,
                lam_warmup_steps=10_000, lr_warmup_steps=1_000, lr_decay_frac=0.0,
                input_scaling="norm2", preact_coef=0.0),
    "anthropic": dict(sparsity="tanh", lam=1.0, lr=2e-4, eps=2.0, theta_init=0.1,
                      lam_warmup_steps=None, lr_warmup_steps=0, lr_decay_frac=0.2,
                      input_scaling="sqrt_d", preact_coef=3e-6),
}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Static settings of a training run (hashable; passed to jit as static).

    Fields left as ``None`` take the ``recipe`` default (see the module docstring).
    ``lam``, ``lr``, ``eps`` and ``theta_init`` are only the defaults of the per-SAE
    ``HParams`` (a sweep overrides them per SAE).

    arch: "jumprelu" | "topk" (k active latents, Gao et al. 2024) | "tied" (JumpReLU with
      W_enc = W_decᵀ; on AIP-whitened inputs this is the AIP-tied SAE W_enc = S̃D of Hu et al.,
      see ``sae.model.TiedJumpReLUSAE``).
    sparsity: "l0" (GDM, on the pre-activations) | "tanh" (Anthropic).
    lam_warmup_steps: λ ramps linearly 0 → λ (None: over the whole run).
    lr_warmup_steps / lr_decay_frac: lr ramps linearly up, then linearly to 0 over the last
      ``lr_decay_frac`` of ``total_steps``.
    input_scaling: "norm2" (E‖x‖² = 1) | "sqrt_d" (E‖x‖ = √d) | None; estimated on
      ``scale_batches`` batches and folded back into the returned weights.
    decoder_norm: "none" | "unit" (rows of W_dec projected onto the unit sphere after every
      update).
    preact_on: "dead" (Anthropic pre-activation loss only on dead latents) | "all".
    dead_tokens: a latent is dead after this many tokens without firing.
    target_l0: None, or the mean L0 the run should land on: λ is then adapted during
      training by an integral controller in log space (``sae.step.train_step``):
      a ← a + ``target_l0_rate`` · log(max(L0_batch, 0.5) / target_l0), λ(t) = λ_sched(t)·eᵃ.
      (Our method; SAELens and sparsify offer target-L0 training under other schemes.) The
      L0 answers λ with a lag of many steps (θ moves at the learning rate), so a large rate
      overshoots: the default suits the Anthropic recipe's lr over a few thousand steps;
      a short run with a large lr can take a larger rate (measurements: docs/sae.md).
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
    target_l0: float | None = None
    target_l0_rate: float = 0.001
    steps_per_call: int = 1
    log_every: int = 100
    checkpoint_every: int = 0
    matmul_dtype: str | None = None
    seed: int = 0
    data_seed: int | None = None
    progress: bool = True

    def __post_init__(self):
        check_int("d_in", self.d_in, low=1)
        check_int("width", self.width, low=1)
        check_choice("recipe", self.recipe, tuple(RECIPES))
        rec = RECIPES[self.recipe]
        for name in ("sparsity", "lam", "lr", "eps", "theta_init", "lr_warmup_steps",
                     "lr_decay_frac", "preact_coef"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, rec[name])
        if self.lam_warmup_steps is None:
            lw = rec["lam_warmup_steps"]
            object.__setattr__(self, "lam_warmup_steps", self.total_steps if lw is None else lw)
        if self.input_scaling == "recipe":
            object.__setattr__(self, "input_scaling", rec["input_scaling"])
        check_choice("arch", self.arch, ARCHS)
        check_choice("sparsity", self.sparsity, ("l0", "tanh"))
        check_choice("input_scaling", self.input_scaling, ("norm2", "sqrt_d", None))
        check_choice("decoder_norm", self.decoder_norm, ("none", "unit"))
        check_choice("preact_on", self.preact_on, ("dead", "all"))
        check_choice("matmul_dtype", self.matmul_dtype, (None, "bfloat16", "float32"))
        for n in ("total_steps", "batch_size", "steps_per_call", "log_every", "scale_batches",
                  "k", "dead_tokens"):
            check_int(n, getattr(self, n), low=1)
        for n in ("lr_warmup_steps", "lam_warmup_steps", "checkpoint_every"):
            check_int(n, getattr(self, n), low=0)
        for n in ("seed",):
            check_int(n, getattr(self, n), low=0)
        if self.data_seed is not None:
            check_int("data_seed", self.data_seed, low=0)
        if self.arch == "topk" and self.k > self.width:
            raise ValueError(f"k={self.k}: expected k ≤ width={self.width} for arch='topk'")
        check_scalar("lam", self.lam, low=0.0)
        for n in ("lr", "eps", "theta_init", "clip_norm", "tanh_c", "adam_eps"):
            check_scalar(n, getattr(self, n), low=0.0, low_open=True)
        check_scalar("preact_coef", self.preact_coef, low=0.0)
        check_scalar("lr_decay_frac", self.lr_decay_frac, low=0.0, high=1.0)
        check_scalar("target_l0_rate", self.target_l0_rate, low=0.0, low_open=True)
        if self.target_l0 is not None:
            check_scalar("target_l0", self.target_l0, low=0.0, high=float(self.width),
                         low_open=True)
            if self.arch == "topk":
                raise ValueError(f"target_l0={self.target_l0}: a TopK SAE has L0 = k by "
                                 f"construction; set k instead (arch='topk')")
        check_scalar("b1", self.b1, low=0.0, high=1.0, high_open=True)
        check_scalar("b2", self.b2, low=0.0, high=1.0, high_open=True)
        if self.checkpoint_every % self.steps_per_call:
            raise ValueError(
                f"checkpoint_every={self.checkpoint_every}: expected a multiple of "
                f"steps_per_call={self.steps_per_call}")

    @classmethod
    def gdm(cls, d_in: int, width: int, **kw) -> TrainConfig:
        """GDM / Gemma Scope recipe (Rajamanoharan et al. 2024): L0 penalty, ε = 1e-3,
        θ0 = 1e-3, E‖x‖² = 1."""
        return cls(d_in=d_in, width=width, recipe="gdm", **kw)

    @classmethod
    def anthropic(cls, d_in: int, width: int, **kw) -> TrainConfig:
        """Anthropic (Jan 2025) recipe: tanh penalty c = 4, pre-act loss 3e-6 on dead latents,
        ε = 2, θ0 = 0.1, E‖x‖ = √d, λ warmed over the run, lr decayed over the last 20%."""
        return cls(d_in=d_in, width=width, recipe="anthropic", **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class HParams(NamedTuple):
    """Per-SAE hyper-parameters (a pytree of float32 scalars, or (N,) arrays in a sweep).

    lam: sparsity coefficient λ; lr: peak learning rate; eps: bandwidth ε;
    theta_init: initial threshold θ0 (used by ``sae.step.init_state``).
    """

    lam: Any
    lr: Any
    eps: Any
    theta_init: Any

    @classmethod
    def from_config(cls, config: TrainConfig) -> HParams:
        return cls(*(jnp.asarray(getattr(config, n), jnp.float32)
                     for n in ("lam", "lr", "eps", "theta_init")))

    def check(self) -> None:
        """ValueError naming the field unless λ ≥ 0 and lr, ε, θ0 > 0, all finite."""
        for name, v in self._asdict().items():
            arr = np.asarray(v)
            if name == "lam":
                check_scalar(f"hparams.{name}", arr, low=0.0)
            else:
                check_scalar(f"hparams.{name}", arr, low=0.0, low_open=True)


def sweep(config: TrainConfig, *, lam=None, lr=None, eps=None, theta_init=None,
          seed=None) -> tuple[HParams, np.ndarray]:
    """Stacked per-SAE hyper-parameters for a vmapped sweep.

    Each argument is a scalar or a sequence; sequences must share one length N, scalars (or
    None: the config value) are broadcast. ``seed`` defaults to ``config.seed + arange(N)``.
    Returns (HParams with (N,) float32 leaves, seeds (N,) int).
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
        if name == "lam":
            check_scalar(name, arr, low=0.0)
        else:
            check_scalar(name, arr, low=0.0, low_open=True)
        out[name] = jnp.asarray(arr, jnp.float32)
    seeds = (config.seed + np.arange(n)) if seed is None else np.broadcast_to(
        np.asarray(seed, np.int64), (n,))
    return HParams(**out), np.asarray(seeds)
