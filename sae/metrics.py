"""SAE evaluation metrics (the standard evaluation of Rajamanoharan et al. 2024, "Jumping
ahead: improving reconstruction fidelity with JumpReLU sparse autoencoders",
arXiv:2407.14435).

Shapes: x, x_hat (N, d); codes f (N, M). Reductions are over the whole evaluation set.
The array metrics (l0, explained_variance, fvu, mse, cosine, firing_density, dead_latents,
dense_latents, shrinkage) are pure jnp and jit/vmap-able (shape checks run at trace time).
Host-side: :func:`log_density_histogram` (numpy histogram, returns an int) and
:func:`evaluate` (a dict of Python floats).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

__all__ = [
    "cosine",
    "dead_latents",
    "dense_latents",
    "evaluate",
    "explained_variance",
    "firing_density",
    "fvu",
    "l0",
    "log_density_histogram",
    "mse",
    "shrinkage",
]


def _check_pair(x, x_hat):
    if np.shape(x) != np.shape(x_hat) or np.ndim(x) != 2:
        raise ValueError(f"x and x_hat must both have shape (N, d), got {np.shape(x)} and "
                         f"{np.shape(x_hat)}")


def l0(f):
    """Mean number of non-zero codes per example, (1/N) Σ_n ‖f_n‖_0. f (N, M) → scalar."""
    f = jnp.asarray(f)
    return jnp.mean(jnp.sum(f != 0, axis=-1).astype(jnp.float32))


def explained_variance(x, x_hat):
    """EV = 1 − Σ_n ‖x_n − x̂_n‖² / Σ_n ‖x_n − x̄‖², x̄ the mean over the evaluation set
    (mean-centred as in Rajamanoharan et al. 2024, arXiv:2407.14435, and SAEBench/SAELens;
    the same quantity as Hu et al.'s faithfulness R², :func:`sae.atoms.r2`). (N, d) → ()."""
    _check_pair(x, x_hat)
    x = jnp.asarray(x, jnp.float32)
    err = jnp.sum(jnp.square(x - jnp.asarray(x_hat, jnp.float32)))
    tot = jnp.sum(jnp.square(x - x.mean(axis=0)))
    return 1.0 - err / tot


def fvu(x, x_hat):
    """Fraction of variance unexplained = 1 − EV."""
    return 1.0 - explained_variance(x, x_hat)


def mse(x, x_hat):
    """Mean over examples of ‖x − x̂‖² (summed over dims, as in the training loss)."""
    _check_pair(x, x_hat)
    return jnp.mean(jnp.sum(jnp.square(jnp.asarray(x) - jnp.asarray(x_hat)), axis=-1))


def cosine(x, x_hat):
    """Mean cosine similarity between x_n and x̂_n."""
    _check_pair(x, x_hat)
    x, x_hat = jnp.asarray(x), jnp.asarray(x_hat)
    num = jnp.sum(x * x_hat, axis=-1)
    den = jnp.linalg.norm(x, axis=-1) * jnp.linalg.norm(x_hat, axis=-1)
    return jnp.mean(num / jnp.maximum(den, 1e-30))


def firing_density(f):
    """Fraction of examples on which each latent fires. (N, M) → (M,)."""
    return jnp.mean((jnp.asarray(f) != 0).astype(jnp.float32), axis=0)


def dead_latents(f):
    """Boolean (M,): latents that never fire on the evaluation set (with N tokens, this is
    the 'no activation in N tokens' definition)."""
    return firing_density(f) == 0


def dense_latents(f, threshold: float = 0.1):
    """Boolean (M,): latents firing on more than ``threshold`` of the examples."""
    return firing_density(f) > threshold


def log_density_histogram(f, bins=None):
    """Histogram of log10 firing density over live latents (dead ones counted apart).

    Returns (counts (len(bins)-1,), bin edges, n_dead). Default bins: −8 … 0 by 0.25.
    """
    dens = np.asarray(firing_density(f))
    bins = np.arange(-8.0, 0.0001, 0.25) if bins is None else np.asarray(bins)
    live = dens > 0
    counts, edges = np.histogram(np.log10(dens[live]), bins=bins)
    return counts, edges, int((~live).sum())


def shrinkage(x, x_hat):
    """Mean ‖x̂_n‖ / ‖x_n‖ (< 1: the SAE shrinks its reconstructions)."""
    _check_pair(x, x_hat)
    x, x_hat = jnp.asarray(x), jnp.asarray(x_hat)
    return jnp.mean(jnp.linalg.norm(x_hat, axis=-1) /
                    jnp.maximum(jnp.linalg.norm(x, axis=-1), 1e-30))


def evaluate(x, x_hat, f, dense_threshold: float = 0.1) -> dict:
    """All scalar metrics at once, as Python floats."""
    return {
        "l0": float(l0(f)),
        "explained_variance": float(explained_variance(x, x_hat)),
        "fvu": float(fvu(x, x_hat)),
        "mse": float(mse(x, x_hat)),
        "cosine": float(cosine(x, x_hat)),
        "dead_fraction": float(jnp.mean(dead_latents(f))),
        "dense_fraction": float(jnp.mean(dense_latents(f, dense_threshold))),
        "shrinkage": float(shrinkage(x, x_hat)),
    }
