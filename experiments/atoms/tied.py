"""The AIP-tied threshold SAE: encoder tied to W_decᵀ S̃ (atoms.md "The threshold SAE").

In whitened coordinates x_w = S̃^{1/2} x an SAE with a TIED encoder (W_enc = W_decᵀ) has
pre-activations π = (x_w − b) W_decᵀ + b_enc; mapped back to activation space (atoms
D = S̃^{-1/2} W_decᵀ) this is exactly π = (x − b′) S̃ D + b_enc, i.e. W_enc = S̃ D — the
theorem's construction. So the tied-AIP SAE is trained here as a tied SAE on whitened
inputs, with the reconstruction loss in whitened coordinates (= the S̃-norm loss in
activation space).

RECONSTRUCTED recipe (the paper's is not public): JumpReLU with the Anthropic-style tanh
sparsity penalty λ Σ_i tanh(c f_i ‖w_i‖) (c = 4), rectangle straight-through bandwidth
ε = 2.0 (``sae.model.jumprelu``), θ init 0.1 (raw), Adam(lr 2e-4, β1 0.9, β2 0.999), global
norm clip 1.0, λ warmed linearly over the run. A vmapped λ sweep: N SAEs, one batch each
step. Returns params in the Gemma-Scope layout (whitened coordinates) usable with
``sae.model.encode``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sae.model import jumprelu


def _init(key, H, N):
    W = jax.random.normal(key, (N, H))
    W = W / jnp.linalg.norm(W, axis=1, keepdims=True)
    return {"W": W, "b_enc": jnp.zeros((N,)), "b_dec": jnp.zeros((H,)),
            "theta": jnp.full((N,), 0.1)}


def _loss(p, x, lam, eps, c):
    pi = (x - p["b_dec"]) @ p["W"].T + p["b_enc"]
    f = jumprelu(pi, p["theta"], eps)
    xh = f @ p["W"] + p["b_dec"]
    rec = jnp.mean(jnp.sum((x - xh) ** 2, -1))
    nrm = jnp.linalg.norm(p["W"], axis=1)
    sp = jnp.mean(jnp.sum(jnp.tanh(c * f * nrm), -1))
    return rec + lam * sp, (rec, jnp.mean(jnp.sum(f > 0, -1)))


def train_tied(x_w, *, width: int, lams, steps: int = 1000, batch_size: int = 512,
               lr: float = 2e-4, eps: float = 2.0, tanh_c: float = 4.0, seed: int = 0,
               progress: bool = False) -> dict:
    """Train len(lams) tied SAEs (vmapped) on whitened inputs x_w (n, H). Returns
    {"params": [dict per λ], "history": [...]} with params W_enc (H,N) = W_decᵀ, W_dec (N,H),
    b_enc, b_dec, threshold — all in whitened coordinates."""
    x_w = np.asarray(x_w, np.float32)
    n, H = x_w.shape
    if width < 1 or steps < 1 or batch_size < 1:
        raise ValueError(f"width, steps, batch_size must be >= 1; got {width}, {steps}, {batch_size}")
    if n < batch_size:
        raise ValueError(f"x_w has {n} rows, fewer than batch_size={batch_size}")
    lams = jnp.asarray(np.atleast_1d(np.asarray(lams, np.float32)))
    L = lams.shape[0]
    keys = jax.random.split(jax.random.key(seed), L)
    params = jax.vmap(lambda k: _init(k, H, width))(keys)
    params["b_dec"] = jnp.broadcast_to(jnp.asarray(x_w.mean(0)), (L, H))
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(lr))
    opt_state = jax.vmap(opt.init)(params)

    @jax.jit
    def step(params, opt_state, x, t):
        ramp = jnp.minimum(1.0, (t + 1.0) / steps)

        def one(p, s, lam):
            (_, (rec, l0)), g = jax.value_and_grad(_loss, has_aux=True)(p, x, lam * ramp, eps,
                                                                          tanh_c)
            u, s = opt.update(g, s, p)
            p = optax.apply_updates(p, u)
            p["theta"] = jnp.maximum(p["theta"], 1e-6)
            return p, s, rec, l0

        return jax.vmap(one)(params, opt_state, lams)

    rng = np.random.default_rng(seed)
    hist = []
    for t in range(steps):
        idx = rng.integers(0, n, batch_size)
        params, opt_state, rec, l0 = step(params, opt_state, jnp.asarray(x_w[idx]), t)
        if t % max(1, steps // 5) == 0 or t == steps - 1:
            hist.append({"step": t, "rec": np.asarray(rec).tolist(), "l0": np.asarray(l0).tolist()})
            if progress:
                print(f"  tied step {t}: rec {np.asarray(rec).round(2)} l0 {np.asarray(l0).round(1)}")
    out = []
    for i in range(L):
        p = jax.tree.map(lambda a, i=i: np.asarray(a[i]), params)
        out.append({"W_enc": p["W"].T.copy(), "W_dec": p["W"], "b_enc": p["b_enc"],
                    "b_dec": p["b_dec"], "threshold": p["theta"]})
    return {"params": out, "history": hist, "lams": np.asarray(lams).tolist()}
