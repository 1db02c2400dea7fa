"""The planted-dictionary check of tests/test_sae_planted.py as a command: oracle explained
variances, and a vmapped λ sweep of a recipe with atom recovery per λ.

    python -m experiments.planted_recipes --oracle
    python -m experiments.planted_recipes --lams 0.15,0.5,1.5,5 --lr 3e-3
    python -m experiments.planted_recipes --lams 0.15 --lr 3e-3 --pin-old
    python -m experiments.planted_recipes --lams 0.3,0.6 --lr 3e-3 --init gdm

Data (as the test): H = 64, N = 256 random unit atoms (``sae.planted_dictionary`` key 0),
K = 4 non-negative codes U[0.5, 1.5] (``sae.PlantedSource``, seed 1 for training, seed 99
for the held-out batch of 4096).

``--oracle`` prints the explained variance on the held-out batch of two decoders that know D
and every true support: codes ⟨x, d_i⟩ (an encoder of an SAE's form: linear on the
support), and codes by least squares on the true support (exact for this noiseless data).

Otherwise: one ``sae.train`` sweep over ``--lams`` (M = 512, B = 1024, ``--steps`` steps,
Anthropic recipe with ``lam`` and ``lr`` overridden; ``--pin-old`` restores the values that
recipe had before it followed its source: init "gdm", raw θ, Adam β1 = 0, pre-activation
loss on dead latents); ``--init`` overrides only the init. Per λ: the fraction of planted atoms whose best decoder cosine is
≥ 0.95 / ≥ 0.99, and the last logged training L0, EV and dead fraction.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from experiments.cli import comma_list, pos_float, pos_int

H, N, K, M = 64, 256, 4, 512


def _data():
    import jax

    import sae

    return np.asarray(sae.planted_dictionary(jax.random.key(0), H, N))


def oracle() -> tuple[float, float]:
    """(EV of the inner-product oracle, EV of least squares on the true supports)."""
    import sae
    from sae import metrics

    D = _data()
    idx, c = sae.PlantedSource(D, K, 4096, seed=99).codes_and_batch(0)
    A = D[idx]  # (B, K, H): the true atoms of each example
    x = np.einsum("bk,bkd->bd", c, A)
    ip = np.einsum("bd,bkd->bk", x, A)
    ev_ip = float(metrics.explained_variance(x, np.einsum("bk,bkd->bd", ip, A)))
    ls = np.stack([np.linalg.lstsq(A[b].T, x[b], rcond=None)[0] for b in range(len(x))])
    ev_ls = float(metrics.explained_variance(x, np.einsum("bk,bkd->bd", ls, A)))
    return ev_ip, ev_ls


def sweep(lams, lr, steps, seed, pin_old, init=None):
    import sae

    D = _data()
    old = dict(init="gdm", log_theta=False, b1=0.0, preact_on="dead") if pin_old else {}
    if init is not None:
        old["init"] = init
    cfg = sae.TrainConfig.anthropic(H, M, lam=lams[0], lr=lr, total_steps=steps,
                                    batch_size=1024, steps_per_call=20, log_every=steps,
                                    progress=False, seed=seed, **old)
    res = sae.train(sae.PlantedSource(D, K, 1024, seed=1), cfg,
                    sweep=sae.sweep(cfg, lam=lams, seed=[seed] * len(lams)))
    h = res.history[-1]
    rows = []
    for i, lam in enumerate(lams):
        w = res.sae_params(i)["W_dec"]
        best = (D @ (w / np.linalg.norm(w, axis=1, keepdims=True)).T).max(axis=1)
        rows.append(dict(lam=lam, rec95=float(np.mean(best >= 0.95)),
                         rec99=float(np.mean(best >= 0.99)), l0=h["l0"][i], ev=h["ev"][i],
                         dead=h["dead_frac"][i]))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--oracle", action="store_true")
    ap.add_argument("--lams", type=comma_list(pos_float), default=[0.15])
    ap.add_argument("--lr", type=pos_float, default=3e-3)
    ap.add_argument("--steps", type=pos_int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pin-old", action="store_true")
    ap.add_argument("--init", choices=("gdm", "anthropic"), default=None)
    args = ap.parse_args(argv)
    if args.oracle:
        ev_ip, ev_ls = oracle()
        print(f"oracle_inner_product_ev={ev_ip:.4f} oracle_least_squares_ev={ev_ls:.6f}")
        return
    t = time.perf_counter()
    for r in sweep(args.lams, args.lr, args.steps, args.seed, args.pin_old, args.init):
        print(f"lam={r['lam']} lr={args.lr} seed={args.seed} pin_old={args.pin_old} "
              f"init={args.init or 'recipe'} "
              f"rec95={r['rec95']:.3f} rec99={r['rec99']:.3f} L0={r['l0']:.2f} "
              f"EV={r['ev']:.3f} dead={r['dead']:.3f}")
    print(f"wall_s={time.perf_counter() - t:.0f}")


if __name__ == "__main__":
    main()
