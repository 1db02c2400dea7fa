"""Training configuration: the frozen ``TrainConfig``, named recipes, per-SAE ``HParams``.

Every field in ``RECIPE_FIELDS`` is left ``None`` (``input_scaling``: ``"recipe"``) by default
and then takes the value of the chosen recipe; each recipe sets every one of them explicitly
(no recipe inherits another's values). Sources, and which values are ours:

* ``"gdm"`` — Rajamanoharan et al. 2024, "Jumping Ahead: improving reconstruction fidelity
  with JumpReLU sparse autoencoders" (arXiv:2407.14435) and Gemma Scope (Lieberum et al.
  2024, arXiv:2408.05147): L0 penalty on π, bandwidth ε = 1e-3, θ0 = 1e-3 stored as log θ
  (their appendix pseudo-code and Gemma Scope colab train log θ), lr 7e-5 with a 1k-step
  warm-up and no decay, λ warmed over 10k steps, Adam(β1 = 0, β2 = 0.999, eps 1e-8), global
  gradient-norm clip 1, inputs scaled to E‖cx‖² = 1; W_dec rows He-uniform then unit norm,
  W_enc = W_decᵀ, biases 0; unit decoder rows kept by projecting the gradient's component
  along each row out before Adam and renormalising after it (the public dictionary_learning
  port of this recipe, ``trainers/jumprelu.py``). λ = 1e-2 is our default (a sweep value).
* ``"anthropic"`` — Anthropic's January 2025 circuits update ("Dictionary learning
  optimization techniques", Conerly et al.) on top of their April 2024 update ("Training
  sparse autoencoders"): tanh penalty λ Σ tanh(c f_i ‖d_i‖) with c = 4, pre-activation loss
  λ_P Σ ReLU(θ_i − π_i) ‖d_i‖ with λ_P = 3e-6 over *all* latents, bandwidth ε = 2, θ0 = 0.1
  stored as log thresholds t = log θ, W_dec entries U(−1/√d, 1/√d), W_enc = (d/M) W_decᵀ,
  b_d = 0, decoder norms unconstrained (the penalty carries ‖d_i‖), Adam(0.9, 0.999, 1e-8),
  clip 1, λ warmed over the whole run, lr decayed linearly to 0 over the last 20 %, no lr
  warm-up, inputs scaled to E‖cx‖ = √d (as SAELens's port of this setup,
  ``normalize_activations="expected_average_only_in"``). Not in the source, so
  reconstructed and plain fields: λ = 1, lr = 2e-4. Not implemented: the data-dependent
  b_e init (each latent firing on 10000/M of the data at the start; b_e = 0 here).
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from jaxsense._checks import check_choice, check_int, check_scalar

__all__ = ["ARCHS", "RECIPES", "RECIPE_FIELDS", "HParams", "TrainConfig", "sweep"]

ARCHS = ("jumprelu", "topk", "tied")

#: The fields every recipe sets (a ``TrainConfig`` field left ``None`` takes the recipe value).
RECIPE_FIELDS = ("sparsity", "lam", "lr", "eps", "theta_init", "log_theta", "init",
                 "lr_warmup_steps", "lr_decay_frac", "lam_warmup_steps", "b1", "b2",
                 "adam_eps", "clip_norm", "input_scaling", "decoder_norm", "tanh_c",
                 "preact_coef", "preact_on")

RECIPES = {
    # Rajamanoharan et al. 2024 (arXiv:2407.14435) / Gemma Scope (arXiv:2408.05147).
    "gdm": dict(sparsity="l0", lam=1e-2, lr=7e-5, eps=1e-3, theta_init=1e-3, log_theta=True,
                init="gdm", lr_warmup_steps=1_000, lr_decay_frac=0.0, lam_warmup_steps=10_000,
                b1=0.0, b2=0.999, adam_eps=1e-8, clip_norm=1.0, input_scaling="norm2",
                decoder_norm="constrained",
                tanh_c=4.0, preact_coef=0.0, preact_on="all"),  # tanh_c, preact_on: unused
    # Anthropic, circuits updates of January 2025 and April 2024 (module docstring).
    "anthropic": dict(sparsity="tanh", lam=1.0, lr=2e-4, eps=2.0, theta_init=0.1,
                      log_theta=True, init="anthropic", lr_warmup_steps=0, lr_decay_frac=0.2,
                      lam_warmup_steps=None, b1=0.9, b2=0.999, adam_eps=1e-8, clip_norm=1.0,
                      input_scaling="sqrt_d", decoder_norm="none", tanh_c=4.0,
                      preact_coef=3e-6, preact_on="all"),
}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Static settings of a training run (hashable; passed to jit as static).

    Fields left as ``None`` (``input_scaling``: ``"recipe"``) take the ``recipe`` default;
    ``RECIPE_FIELDS`` lists them and the module docstring gives each recipe's source.
    ``lam``, ``lr``, ``eps`` and ``theta_init`` are only the defaults of the per-SAE
    ``HParams`` (a sweep overrides them per SAE).

    arch: "jumprelu" | "topk" (k active latents, Gao et al. 2024) | "tied" (JumpReLU with
      W_enc = W_decᵀ; on AIP-whitened inputs this is the AIP-tied SAE W_enc = S̃D of Hu et al.,
      see ``sae.model.TiedJumpReLUSAE``).
    sparsity: "l0" (GDM, on the pre-activations) | "tanh" (Anthropic).
    log_theta: store log θ (both sources) instead of raw θ (SAELens and dictionary_learning
      train raw θ: log θ moves by only ≈ lr·θ per Adam step, SAELens issue #494). Raw θ is
      projected onto θ ≥ 0 after every update.
    init: "gdm" (W_dec rows He-uniform then unit norm, W_enc = W_decᵀ) | "anthropic" (W_dec
      entries U(−1/√d, 1/√d), W_enc = (d/M) W_decᵀ); biases 0 and θ = θ0 in both.
    b1, b2, adam_eps, clip_norm: Adam(β1, β2, eps) after a global gradient-norm clip.
    lam_warmup_steps: λ ramps linearly 0 → λ (None: over the whole run).
    lr_warmup_steps / lr_decay_frac: lr ramps linearly up, then linearly to 0 over the last
      ``lr_decay_frac`` of ``total_steps``.
    input_scaling: one scalar c with "norm2" E‖cx‖² = 1 (GDM) | "norm2_d" E‖cx‖² = d |
      "sqrt_d" E‖cx‖ = √d (Anthropic, as SAELens ports it) | None (c = 1); estimated on
      ``scale_batches`` batches and folded back into the returned weights.
    decoder_norm: "none" | "unit" (rows of W_dec renormalised after every update, the
      gradient untouched) | "constrained" (dictionary_learning's ConstrainedAdam: the
      component of each row's gradient along the row is removed before clipping and Adam,
      ``sae.step.project_out_parallel``, and rows renormalised after the update).
    tanh_c: c of the tanh penalty.
    preact_coef / preact_on: weight λ_P of the pre-activation loss and the latents it covers:
      "all" (Anthropic's January 2025 update) | "dead" (SAELens's variant: dead latents only).
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
    log_theta: bool | None = None
    init: str | None = None
    apply_b_dec_to_input: bool = True
    total_steps: int = 10_000
    batch_size: int = 4096
    lr_warmup_steps: int | None = None
    lr_decay_frac: float | None = None
    lam_warmup_steps: int | None = None
    clip_norm: float | None = None
    b1: float | None = None
    b2: float | None = None
    adam_eps: float | None = None
    input_scaling: str | None = "recipe"
    scale_batches: int = 8
    decoder_norm: str | None = None
    tanh_c: float | None = None
    preact_coef: float | None = None
    preact_on: str | None = None
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
        check_int("total_steps", self.total_steps, low=1)
        rec = RECIPES[self.recipe]
        for name in RECIPE_FIELDS:
            v = getattr(self, name)
            if (v == "recipe") if name == "input_scaling" else (v is None):
                v = rec[name]
                if name == "lam_warmup_steps" and v is None:  # λ warmed over the whole run
                    v = self.total_steps
                object.__setattr__(self, name, v)
        check_choice("arch", self.arch, ARCHS)
        check_choice("sparsity", self.sparsity, ("l0", "tanh"))
        check_choice("init", self.init, ("gdm", "anthropic"))
        if not isinstance(self.log_theta, bool):
            raise TypeError(f"log_theta={self.log_theta!r}: expected a bool (or None: recipe)")
        check_choice("input_scaling", self.input_scaling, ("norm2", "norm2_d", "sqrt_d", None))
        check_choice("decoder_norm", self.decoder_norm, ("none", "unit", "constrained"))
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
        log θ with θ0 = 1e-3, Adam β1 = 0, unit decoder rows (constrained), E‖cx‖² = 1."""
        return cls(d_in=d_in, width=width, recipe="gdm", **kw)

    @classmethod
    def anthropic(cls, d_in: int, width: int, **kw) -> TrainConfig:
        """Anthropic (Jan 2025) recipe: tanh penalty c = 4, pre-act loss 3e-6 on all latents,
        ε = 2, log θ with θ0 = 0.1, Anthropic init, Adam(0.9, 0.999), E‖cx‖ = √d, λ warmed
        over the run, lr decayed over the last 20%."""
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
