"""Scaling grid (the data-size × dictionary-size experiment of Hu et al., "Towards atoms of large
language models"): data size |M| × dictionary size |D| → eval R² heat map.

    python -m experiments.atoms.scaling [--cache-dir DIR] [--layer 1] [--M 1000,3000,9000]
        [--D-mult 1,2,4,8] [--variant tied|whitened|euclid] [--steps 400]

Uses an existing activation cache (``experiments.atoms.run`` writes one; by default the
embedded MiniLM is cached to results/atoms/cache if missing). For each |M| the first |M|
train rows are used (held-out eval rows: the last 20% of the cache), each cell trains one
SAE of width |D| = mult·H for a fixed number of steps (so small |M| means more epochs;
RECONSTRUCTED — the paper's per-cell budget is not public). Paper: |D| in steps of 4H
(9216 for Gemma2-2B) up to ~1.9B activations; R² ~0.6–0.8 until |D| passes a critical
value tied to |M|, then ≈ 1. Writes results/atoms/scaling.{json,png}.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from experiments import cli
from experiments.common import atomic_write_bytes, save_fig
from sae import atoms as at


def r2_cell(x_train, x_eval, aip, width, *, variant="tied", lam=1.0, steps=400,
            batch_size=256, seed=0):
    """R² and mean L0 on ``x_eval`` of one SAE trained by ``sae.train`` (Anthropic recipe):
    "tied" (AIP-tied, whitened inputs), "whitened" (untied, whitened inputs) or "euclid"."""
    from sae import TrainConfig, train

    whitened = variant in ("tied", "whitened")
    xin = np.asarray(at.whiten(x_train, aip)) if whitened else x_train
    cfg = TrainConfig(d_in=x_train.shape[1], width=width, recipe="anthropic", lam=lam,
                      arch="tied" if variant == "tied" else "jumprelu", total_steps=steps,
                      batch_size=min(batch_size, x_train.shape[0]), progress=False, seed=seed)
    res = train(xin, cfg)
    u = at.sae_units(res.params, x_eval, lambda p, z: res.encode(z), aip=aip,
                     whitened=whitened)
    return float(at.r2(x_eval, u["x_hat"])), float((u["codes"] != 0).sum(1).mean())


def run_scaling(x, *, M_sizes, D_mults, variant="tied", lam=1.0, steps=400, eval_frac=0.2,
                seed=0, log=print) -> dict:
    n, H = x.shape
    n_eval = int(round(eval_frac * n))
    x_tr_all, x_eval = x[: n - n_eval], x[n - n_eval:]
    M_sizes = [m for m in M_sizes if m <= x_tr_all.shape[0]]
    if not M_sizes:
        raise ValueError(f"M_sizes: all exceed the {x_tr_all.shape[0]} train rows available")
    R2 = np.full((len(M_sizes), len(D_mults)), np.nan)
    L0 = np.full_like(R2, np.nan)
    for i, M in enumerate(M_sizes):
        xt = x_tr_all[:M]
        aip = at.aip_from_moment(at.second_moment(xt), ridge=0.0 if M > 4 * H else 1e-6)
        for j, m in enumerate(D_mults):
            t = time.perf_counter()
            R2[i, j], L0[i, j] = r2_cell(xt, x_eval, aip, m * H, variant=variant, lam=lam,
                                         steps=steps, seed=seed)
            log(f"|M|={M} |D|={m}H={m * H}: R²={R2[i, j]:.4f} L0={L0[i, j]:.1f} "
                f"({time.perf_counter() - t:.1f}s)")
    return {"M": M_sizes, "D_mult": list(D_mults), "H": H, "variant": variant, "lam": lam,
            "steps": steps, "r2": R2.tolist(), "l0": L0.tolist()}


def plot(res, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    R2 = np.asarray(res["r2"])
    fig, ax = plt.subplots(figsize=(5, 4))
    im = ax.imshow(R2, origin="lower", cmap="viridis", vmin=min(0.0, np.nanmin(R2)), vmax=1.0)
    ax.set_xticks(range(len(res["D_mult"])), [f"{m}H" for m in res["D_mult"]])
    ax.set_yticks(range(len(res["M"])), [str(m) for m in res["M"]])
    ax.set_xlabel("|D|")
    ax.set_ylabel("|M| (train activations)")
    for i in range(R2.shape[0]):
        for j in range(R2.shape[1]):
            ax.text(j, i, f"{R2[i, j]:.2f}", ha="center", va="center", color="w", fontsize=8)
    fig.colorbar(im, label="eval R²")
    ax.set_title(f"R² heat map ({res['variant']}, H={res['H']})", fontsize=9)
    fig.tight_layout()
    save_fig(fig, path, dpi=110, bbox_inches=None)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m experiments.atoms.scaling",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--cache-dir", default="results/atoms/cache")
    ap.add_argument("--layer", type=cli.nonneg_int, default=1)
    ap.add_argument("--M", type=cli.pos_ints, default=[1000, 3000, 9000])
    ap.add_argument("--D-mult", type=cli.pos_ints, default=[1, 2, 4, 8])
    ap.add_argument("--variant", default="tied", choices=["tied", "whitened", "euclid"])
    ap.add_argument("--lam", type=cli.pos_float, default=1.0)
    ap.add_argument("--steps", type=cli.pos_int, default=400)
    ap.add_argument("--max-tokens", type=cli.pos_int, default=12_000)
    ap.add_argument("--out", default="results/atoms")
    a = ap.parse_args(argv)
    from experiments.atoms.pipeline import AtomsConfig, cache, layer_data

    if not os.path.exists(os.path.join(a.cache_dir, "manifest.json")):
        cache(AtomsConfig(layers=(a.layer,), max_tokens=a.max_tokens), a.cache_dir)
    x = layer_data(a.cache_dir, a.layer, a.max_tokens)
    res = run_scaling(x, M_sizes=a.M, D_mults=a.D_mult, variant=a.variant, lam=a.lam,
                      steps=a.steps)
    os.makedirs(a.out, exist_ok=True)
    atomic_write_bytes(os.path.join(a.out, "scaling.json"), json.dumps(res, indent=1).encode())
    plot(res, os.path.join(a.out, "scaling.png"))
    print(f"wrote {a.out}/scaling.json scaling.png")
    return res


if __name__ == "__main__":
    main()
