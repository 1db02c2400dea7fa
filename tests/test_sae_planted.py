"""Planted dictionary: unit-norm atoms D (H=64, N=256), K=4 non-negative codes.

Recipe (tuned for ~20 CPU-seconds): Anthropic tanh variant (E‖x‖ = √d scaling, ε = 2,
θ0 = 0.1), λ = 0.15 warmed over the run, lr 3e-3 with linear decay over the last 20%,
M = 512 latents, B = 1024, 2000 steps, with the values the recipe had when λ and lr were
tuned pinned (GDM init, raw θ, Adam β1 = 0, pre-activation loss on dead latents).

Explained variance: an oracle that knows D and every true support and encodes by inner
products (codes ⟨x, d_i⟩ on the support, W_dec = D — linear on its support, like an SAE
encoder) explains only ≈ 0.95 of the variance, because random unit atoms in 64 dimensions
interfere (RMS coherence ≈ 1/8, Welch bound ≈ 0.108 for any 256 atoms). Least squares on
the true supports explains all of it (noiseless data), so 0.99 is not impossible in
principle; it needs an encoder that undoes the interference. We assert EV ≥ 0.9 × the
inner-product oracle's EV on the same held-out data (numbers: docs/sae.md).
"""
import jax
import numpy as np

import sae
from sae import metrics


def test_planted_dictionary_recovery():
    H, N, K, M = 64, 256, 4, 512
    D = sae.planted_dictionary(jax.random.key(0), H, N)
    src = sae.PlantedSource(D, K, 1024, seed=1)
    # λ and lr were tuned under these settings (the Anthropic recipe's values before it
    # followed its source for init, log θ, Adam β1 and the pre-activation loss)
    old = dict(init="gdm", log_theta=False, b1=0.0, preact_on="dead")
    cfg = sae.TrainConfig.anthropic(H, M, lam=0.15, lr=3e-3, total_steps=2000, batch_size=1024,
                                  steps_per_call=20, log_every=500, progress=False, **old)
    res = sae.train(src, cfg)

    W = res.params["W_dec"] / np.linalg.norm(res.params["W_dec"], axis=1, keepdims=True)
    best = (D @ W.T).max(axis=1)  # best decoder cosine for each planted atom
    assert np.mean(best >= 0.95) >= 0.95, np.mean(best >= 0.95)

    held = sae.PlantedSource(D, K, 4096, seed=99)
    idx, c = held.codes_and_batch(0)
    x = np.einsum("bk,bkd->bd", c, D[idx])
    ev = float(metrics.explained_variance(x, np.asarray(
        __import__("sae").reconstruct(res.params, x))))
    est = np.einsum("bd,bkd->bk", x, D[idx])  # oracle: true support, codes ⟨x, d_i⟩
    ev_oracle = float(metrics.explained_variance(x, np.einsum("bk,bkd->bd", est, D[idx])))
    assert ev_oracle < 0.99
    # least squares on the true supports is exact on this noiseless data: the 0.99 gap is
    # the inner-product encoder's, not a limit of every decoder with these supports
    A = D[idx]
    ls = np.stack([np.linalg.lstsq(A[b].T, x[b], rcond=None)[0] for b in range(len(x))])
    assert float(metrics.explained_variance(x, np.einsum("bk,bkd->bd", ls, A))) > 0.9999
    assert ev >= 0.9 * ev_oracle, (ev, ev_oracle)
    l0 = float(metrics.l0(res.encode(x)))
    assert 3.0 <= l0 <= 6.0, l0
