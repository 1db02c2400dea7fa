"""Sparse-autoencoder models: JumpReLU (GDM / Anthropic recipes) and TopK, in Flax NNX.

Notation (Rajamanoharan et al. 2024, "Jumping Ahead", arXiv 2407.14435):
    x ∈ R^d (one activation), M latents, parameters
        W_enc (d, M), b_enc (M,), W_dec (M, d), b_dec (d,), threshold θ (M,) > 0.
    π(x) = (x − b_dec·[apply_b_dec_to_input]) W_enc + b_enc        pre-activations (eq. 1)
    f(x) = JumpReLU_θ(π) = π ⊙ H(π − θ)                             codes (eq. 2)
    x̂(x) = f(x) W_dec + b_dec                                        reconstruction (eq. 3)

Everything below is usable without any training code:

* the pure functions ``encode(params, x)``, ``decode(params, f)``, ``reconstruct(params, x)``
  work on a plain mapping of arrays with keys W_enc, b_enc, W_dec, b_dec, threshold (the
  Gemma Scope layout, see ``sae.io``) and are jit/vmap-able;
* the NNX modules ``JumpReLUSAE`` and ``TopKSAE`` hold the same parameters as ``nnx.Param``
  and expose ``encode/decode/__call__/loss`` and ``params()`` (a plain dict of arrays).

Shapes: ``x`` is (..., d); codes ``f`` and pre-activations are (..., M).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsense._checks import check_int, check_scalar

Array = jax.Array

__all__ = [
    "JumpReLUSAE",
    "LossParts",
    "TopKSAE",
    "decode",
    "encode",
    "jumprelu",
    "pre_activations",
    "reconstruct",
    "rectangle",
    "step",
    "TiedJumpReLUSAE",
    "topk_codes",
    "topk_mask",
]


# --------------------------------------------------------------------------------------
# Straight-through JumpReLU / Heaviside with rectangle-kernel pseudo-derivatives
# --------------------------------------------------------------------------------------
def rectangle(u: Array) -> Array:
    """Rectangle kernel K(u) = 1[−½ < u < ½] (Rajamanoharan et al. 2024, eq. 10)."""
    return ((u > -0.5) & (u < 0.5)).astype(u.dtype)


@jax.custom_vjp
def jumprelu(z: Array, theta: Array, eps: Array) -> Array:
    """JumpReLU_θ(z) = z · H(z − θ), elementwise; θ broadcasts against z (eq. 2).

    Pseudo-derivatives (Rajamanoharan et al. 2024, eq. 11; rectangle kernel, bandwidth ε):
        ∂/∂z  := H(z − θ)
        ∂/∂θ  := −(θ/ε) K((z − θ)/ε)
        ∂/∂ε  := 0   (ε is a hyper-parameter; it may be traced for vmapped sweeps)
    """
    return z * (z > theta).astype(z.dtype)


def _jumprelu_fwd(z, theta, eps):
    return jumprelu(z, theta, eps), (z, theta, eps)


def _jumprelu_bwd(res, g):
    z, theta, eps = res
    eps_c = jnp.asarray(eps, z.dtype)
    gz = g * (z > theta).astype(z.dtype)
    gtheta = -(theta / eps_c) * rectangle((z - theta) / eps_c) * g
    gtheta = _unbroadcast(gtheta, jnp.shape(theta))
    return gz, gtheta.astype(jnp.result_type(theta)), jnp.zeros_like(eps)


jumprelu.defvjp(_jumprelu_fwd, _jumprelu_bwd)


@jax.custom_vjp
def step(z: Array, theta: Array, eps: Array) -> Array:
    """Heaviside step H(z − θ), elementwise (the L0 counter of eq. 4).

    Pseudo-derivatives (Rajamanoharan et al. 2024, eq. 12):
        ∂/∂z := 0,   ∂/∂θ := −(1/ε) K((z − θ)/ε),   ∂/∂ε := 0
    so the L0 sparsity loss trains only θ.
    """
    return (z > theta).astype(z.dtype)


def _step_fwd(z, theta, eps):
    return step(z, theta, eps), (z, theta, eps)


def _step_bwd(res, g):
    z, theta, eps = res
    eps_c = jnp.asarray(eps, z.dtype)
    gtheta = -(1.0 / eps_c) * rectangle((z - theta) / eps_c) * g
    gtheta = _unbroadcast(gtheta, jnp.shape(theta))
    return jnp.zeros_like(z), gtheta.astype(jnp.result_type(theta)), jnp.zeros_like(eps)


step.defvjp(_step_fwd, _step_bwd)


def _unbroadcast(g: Array, shape: tuple) -> Array:
    """Sum ``g`` over the axes that were broadcast to reach its shape from ``shape``."""
    if g.shape == tuple(shape):
        return g
    lead = g.ndim - len(shape)
    g = g.sum(axis=tuple(range(lead))) if lead > 0 else g
    axes = tuple(i for i, s in enumerate(shape) if s == 1 and g.shape[i] != 1)
    return g.sum(axis=axes, keepdims=True) if axes else g


# --------------------------------------------------------------------------------------
# Pure functions on a params mapping (Gemma Scope layout)
# --------------------------------------------------------------------------------------
def _mm(a, w, compute_dtype):
    if compute_dtype is None:
        return jnp.matmul(a.astype(w.dtype), w)
    return jnp.matmul(a.astype(compute_dtype), w.astype(compute_dtype),
                      preferred_element_type=jnp.float32).astype(w.dtype)


def pre_activations(params: Mapping[str, Array], x: Array, *,
                    apply_b_dec_to_input: bool = True, compute_dtype=None) -> Array:
    """π(x) = (x − b_dec·[apply_b_dec_to_input]) W_enc + b_enc (eq. 1). (..., d) → (..., M).

    ``compute_dtype`` (e.g. ``jnp.bfloat16``) casts the matmul operands, accumulating in f32.
    """
    w_enc = params["W_enc"]
    if apply_b_dec_to_input:
        x = x - params["b_dec"].astype(x.dtype)
    return _mm(x, w_enc, compute_dtype) + params["b_enc"]


def encode(params: Mapping[str, Array], x: Array, *, apply_b_dec_to_input: bool = True,
           k: int | None = None) -> Array:
    """Codes f(x) of a JumpReLU SAE (eq. 2), or of a TopK SAE when ``k`` is given.

    x: (..., d) → f: (..., M). With ``k`` the threshold is not used (f = ReLU(TopK(π))).
    """
    pi = pre_activations(params, x, apply_b_dec_to_input=apply_b_dec_to_input)
    if k is not None:
        return topk_codes(pi, k)
    theta = params["threshold"]
    return pi * (pi > theta).astype(pi.dtype)


def decode(params: Mapping[str, Array], f: Array, *, compute_dtype=None) -> Array:
    """x̂ = f W_dec + b_dec (eq. 3). (..., M) → (..., d)."""
    return _mm(f, params["W_dec"], compute_dtype) + params["b_dec"]


def reconstruct(params: Mapping[str, Array], x: Array, *, apply_b_dec_to_input: bool = True,
                k: int | None = None) -> Array:
    """x̂(x) = decode(encode(x)). (..., d) → (..., d)."""
    return decode(params, encode(params, x, apply_b_dec_to_input=apply_b_dec_to_input, k=k))


def topk_codes(pi: Array, k: int) -> Array:
    """f = ReLU(TopK(π)): keep the k largest pre-activations per row, zero the rest.

    (Gao et al. 2024, "Scaling and evaluating sparse autoencoders", arXiv:2406.04093, eq. 3.)
    (..., M) → (..., M). Exactly k entries are kept per row; among tied values the lower
    indices are kept, as ``jax.lax.top_k`` orders them. Gradient flows to the kept entries.
    """
    keep = jax.lax.stop_gradient(topk_mask(pi, k))
    return jax.nn.relu(pi) * keep.astype(pi.dtype)


def topk_mask(pi: Array, k: int) -> Array:
    """Boolean (..., M) mask of the k entries ``jax.lax.top_k(pi, k)`` selects per row.

    For k ≤ 8: k passes of first-index ``argmax`` and masking (``lax.top_k`` is slow on
    XLA:CPU). Otherwise ``lax.top_k``'s k-th value v, every entry > v, and the first
    k − #{π > v} entries equal to v (lowest indices first, as ``lax.top_k`` breaks ties).
    """
    iota = jax.lax.broadcasted_iota(jnp.int32, pi.shape, pi.ndim - 1)
    if k <= 8:
        cur = pi
        keep = jnp.zeros(pi.shape, bool)
        for _ in range(k):
            hit = iota == jnp.argmax(cur, axis=-1, keepdims=True).astype(jnp.int32)
            keep = keep | hit
            cur = jnp.where(hit, -jnp.inf, cur)
        return keep
    kth = jax.lax.top_k(pi, k)[0][..., -1:]
    above = pi > kth
    tied = pi == kth
    room = k - above.sum(axis=-1, keepdims=True)
    return above | (tied & (jnp.cumsum(tied, axis=-1) <= room))


# --------------------------------------------------------------------------------------
# NNX modules
# --------------------------------------------------------------------------------------
class LossParts(NamedTuple):
    """Per-batch loss terms (scalars) and the activity needed by counters/metrics.

    loss = mse + sparsity + preact; ``fired`` (M,) counts, over the batch, examples whose
    latent fired; ``l0`` mean active latents per example; ``sse`` Σ‖x − x̂‖²; ``sst``
    Σ‖x − mean(x)‖² (batch mean), so EV = 1 − sse/sst.
    """

    loss: Array
    mse: Array
    sparsity: Array
    preact: Array
    l0: Array
    sse: Array
    sst: Array
    fired: Array


INITS = ("gdm", "anthropic")


def _init_weights(key, d, M, dtype, init: str = "gdm"):
    """(W_enc (d, M), W_dec (M, d)) at initialisation.

    ``init="gdm"`` (Rajamanoharan et al. 2024 / Gemma Scope): W_dec rows He-uniform
    (fan_in = M), then unit norm; W_enc = W_decᵀ.
    ``init="anthropic"`` (Anthropic's January 2025 circuits update, with its erratum: the
    bound is 1/√n, n = d the input dimension): W_dec entries U(−1/√d, 1/√d), so rows have
    norm ≈ 1/√3; W_enc = (d/M) W_decᵀ (the factor n/m of the update as ported in the public
    model-diffing code, ``jan_update_init.py``).
    """
    if init == "gdm":
        bound = math.sqrt(6.0 / M)  # He-uniform with fan_in = M (decoder input dim)
        w_dec = jax.random.uniform(key, (M, d), jnp.float32, -bound, bound)
        w_dec = w_dec / jnp.linalg.norm(w_dec, axis=1, keepdims=True)
        return w_dec.T.astype(dtype), w_dec.astype(dtype)
    if init == "anthropic":
        bound = 1.0 / math.sqrt(d)
        w_dec = jax.random.uniform(key, (M, d), jnp.float32, -bound, bound)
        return (w_dec.T * (d / M)).astype(dtype), w_dec.astype(dtype)
    raise ValueError(f"init={init!r}: expected one of {INITS}")


class _SAEBase(nnx.Module):
    d_in: int
    width: int
    apply_b_dec_to_input: bool
    compute_dtype = None  # matmul operand dtype (None: parameter dtype)

    def _w_enc(self) -> Array:
        return self.W_enc[...]

    def params(self) -> dict[str, Array]:
        """Plain dict (Gemma Scope layout): W_enc (d,M), W_dec (M,d), b_enc (M,), b_dec (d,),
        threshold (M,) (for TopK: zeros, unused)."""
        return {
            "W_enc": self._w_enc(),
            "W_dec": self.W_dec[...],
            "b_enc": self.b_enc[...],
            "b_dec": self.b_dec[...],
            "threshold": self.threshold,
        }

    def pre_activations(self, x: Array) -> Array:
        """π(x), eq. 1. (..., d) → (..., M)."""
        return pre_activations(self.params(), x, apply_b_dec_to_input=self.apply_b_dec_to_input,
                               compute_dtype=self.compute_dtype)

    def decode(self, f: Array) -> Array:
        """x̂ = f W_dec + b_dec, eq. 3. (..., M) → (..., d)."""
        return decode(self.params(), f, compute_dtype=self.compute_dtype)

    def __call__(self, x: Array) -> Array:
        """Reconstruction x̂(x). (..., d) → (..., d)."""
        return self.decode(self.encode(x))

    def decoder_norms(self) -> Array:
        """‖d_i‖ = row norms of W_dec, (M,)."""
        return jnp.linalg.norm(self.W_dec[...].astype(jnp.float32), axis=-1)

    def _recon_terms(self, x, x_hat):
        xf = x.astype(jnp.float32)
        err = xf - x_hat.astype(jnp.float32)
        sse = jnp.sum(err * err)
        sst = jnp.sum(jnp.square(xf - xf.mean(axis=0)))
        return sse / x.shape[0], sse, sst


def _init_dictionary(module, rngs, d_in, width, apply_b_dec_to_input, dtype, init="gdm"):
    """Shared SAE parameters: W_enc/W_dec by ``_init_weights(init)``, zero biases."""
    if init not in INITS:
        raise ValueError(f"init={init!r}: expected one of {INITS}")
    module.d_in, module.width = d_in, width
    module.apply_b_dec_to_input = bool(apply_b_dec_to_input)
    w_enc, w_dec = _init_weights(rngs.params(), d_in, width, dtype, init)
    module.W_enc = nnx.Param(w_enc)
    module.W_dec = nnx.Param(w_dec)
    module.b_enc = nnx.Param(jnp.zeros((width,), dtype))
    module.b_dec = nnx.Param(jnp.zeros((d_in,), dtype))


class JumpReLUSAE(_SAEBase):
    """JumpReLU SAE (Rajamanoharan et al. 2024) as a Flax NNX module.

    Args:
      d_in: input width d.  width: number of latents M.
      rngs: ``nnx.Rngs`` (uses ``rngs.params()``).
      theta_init: initial per-latent threshold (GDM 0.001; Anthropic recipe 0.1).
      log_theta: store t = log θ (as GDM's and Anthropic's code do; θ = exp(t), gradients
        by the chain rule through exp) instead of raw θ (SAELens and dictionary_learning:
        under Adam log θ moves by only ≈ lr·θ per step, SAELens issue #494). The module
        default is raw θ; ``TrainConfig`` recipes set it.
      init: "gdm" | "anthropic" initialisation of W_enc/W_dec (``_init_weights``).
      apply_b_dec_to_input: subtract b_dec from x before encoding (eq. 1).
      dtype: parameter dtype (float32 default).
    Biases start at 0, θ at ``theta_init``.
    """

    def __init__(self, d_in: int, width: int, *, rngs: nnx.Rngs, theta_init=0.001,
                 log_theta: bool = False, init: str = "gdm", apply_b_dec_to_input: bool = True,
                 dtype=jnp.float32):
        check_int("d_in", d_in, low=1)
        check_int("width", width, low=1)
        if not isinstance(theta_init, jax.core.Tracer):
            check_scalar("theta_init", theta_init, low=0.0, low_open=True)
        self.log_theta = bool(log_theta)
        _init_dictionary(self, rngs, d_in, width, apply_b_dec_to_input, dtype, init)
        t0 = jnp.full((width,), theta_init, jnp.float32)
        self.theta = nnx.Param((jnp.log(t0) if self.log_theta else t0).astype(dtype))

    @property
    def threshold(self) -> Array:
        """θ (M,), positive (exp of the stored value under the log parameterisation)."""
        t = self.theta[...]
        return jnp.exp(t) if self.log_theta else t

    def encode(self, x: Array, eps: float | Array = 1e-3) -> Array:
        """f(x) = JumpReLU_θ(π(x)) with the straight-through gradient of bandwidth ε (eq. 2).
        (..., d) → (..., M)."""
        return jumprelu(self.pre_activations(x), self.threshold, jnp.asarray(eps))

    def loss(self, x: Array, *, lam, eps, sparsity: str = "l0", tanh_c: float = 4.0,
             preact_coef: float = 0.0, preact_mask: Array | None = None) -> LossParts:
        """Training loss on a batch x (B, d); mean over the batch.

        ``sparsity="l0"`` (GDM, Rajamanoharan et al. eq. 4, L0 on pre-activations):
            L = ‖x − x̂‖² + λ Σ_i H(π_i − θ_i)
        ``sparsity="tanh"`` (Anthropic's January 2025 circuits update, L_S and L_P):
            L = ‖x − x̂‖² + λ Σ_i tanh(c · f_i · ‖d_i‖) + c_p Σ_i ReLU(θ_i − π_i) ‖d_i‖ · m_i
        where m_i = ``preact_mask`` (e.g. dead latents; all ones when None).
        """
        pi = self.pre_activations(x)
        theta = self.threshold
        eps = jnp.asarray(eps, jnp.float32)
        f = jumprelu(pi, theta, eps)
        x_hat = self.decode(f)
        mse, sse, sst = self._recon_terms(x, x_hat)
        active = step(pi, theta, eps)  # straight-through only into θ
        l0_per = active.sum(axis=-1)
        fired = jax.lax.stop_gradient(active).sum(axis=0)
        if sparsity == "l0":
            sp = jnp.mean(l0_per)
            pre = jnp.zeros((), jnp.float32)
        elif sparsity == "tanh":
            dn = self.decoder_norms()
            sp = jnp.mean(jnp.sum(jnp.tanh(tanh_c * jnp.abs(f) * dn), axis=-1))
            w = dn if preact_mask is None else dn * preact_mask
            pre = jnp.mean(jnp.sum(jax.nn.relu(theta - pi) * w, axis=-1))
        else:
            raise ValueError(f"sparsity must be 'l0' or 'tanh', got sparsity={sparsity!r}")
        sparsity_term = lam * sp
        pre_term = preact_coef * pre
        loss = mse + sparsity_term + pre_term
        return LossParts(loss, mse, sparsity_term, pre_term,
                         jax.lax.stop_gradient(jnp.mean(l0_per)), sse, sst, fired)


class TopKSAE(_SAEBase):
    """TopK SAE baseline (Gao et al. 2024): f = ReLU(TopK_k(π)), loss ‖x − x̂‖².

    Same parameters as ``JumpReLUSAE`` except θ (``threshold`` returns zeros, unused).
    The AuxK dead-latent loss of Gao et al. is not implemented.
    """

    def __init__(self, d_in: int, width: int, k: int, *, rngs: nnx.Rngs, init: str = "gdm",
                 apply_b_dec_to_input: bool = True, dtype=jnp.float32):
        check_int("d_in", d_in, low=1)
        check_int("width", width, low=1)
        check_int("k", k, low=1)
        if k > width:
            raise ValueError(f"k must be ≤ width, got k={k}, width={width}")
        self.k = k
        _init_dictionary(self, rngs, d_in, width, apply_b_dec_to_input, dtype, init)

    @property
    def threshold(self) -> Array:
        return jnp.zeros((self.width,), self.W_enc[...].dtype)

    def encode(self, x: Array, eps=None) -> Array:
        """f = ReLU(TopK(π(x))). (..., d) → (..., M)."""
        return topk_codes(self.pre_activations(x), self.k)

    def loss(self, x: Array, *, lam=0.0, eps=None, sparsity: str = "l0", tanh_c: float = 4.0,
             preact_coef: float = 0.0, preact_mask=None) -> LossParts:
        """L = ‖x − x̂‖² (mean over the batch); λ is ignored (sparsity is fixed at k)."""
        f = self.encode(x)
        x_hat = self.decode(f)
        mse, sse, sst = self._recon_terms(x, x_hat)
        active = jax.lax.stop_gradient((f > 0).astype(jnp.float32))
        z = jnp.zeros((), jnp.float32)
        return LossParts(mse, mse, z, z, jnp.mean(active.sum(-1)), sse, sst, active.sum(0))


class TiedJumpReLUSAE(JumpReLUSAE):
    """JumpReLU SAE with a tied encoder, W_enc = W_decᵀ; everything else as ``JumpReLUSAE``.

    The AIP-tied SAE of Hu et al. ("Towards atoms of large language models", the threshold
    SAE of their uniqueness theorem) has pre-activations π = (x − b) S̃ D + b_enc with atoms
    D (H, N) and the AIP matrix S̃, and its reconstruction error is measured in the S̃ norm.
    With x_w = S̃^{1/2} x and W_dec = (S̃^{1/2} D)ᵀ this is exactly a tied SAE on whitened
    inputs, with the Euclidean loss on x_w equal to the S̃-norm loss on x. So the AIP-tied SAE
    is this module trained by ``sae.train`` on ``sae.atoms.whiten(x, aip)``; the atoms in
    activation space are D = S̃^{-1/2} W_decᵀ (``sae.atoms.sae_units(..., whitened=True)``).
    The state holds W_dec, b_enc, b_dec and θ (no separate W_enc).
    """

    def __init__(self, d_in: int, width: int, *, rngs: nnx.Rngs, theta_init=0.001,
                 log_theta: bool = False, init: str = "gdm", apply_b_dec_to_input: bool = True,
                 dtype=jnp.float32):
        super().__init__(d_in, width, rngs=rngs, theta_init=theta_init, log_theta=log_theta,
                         init=init, apply_b_dec_to_input=apply_b_dec_to_input, dtype=dtype)
        del self.W_enc

    def _w_enc(self) -> Array:
        return self.W_dec[...].T
