"""Fig. 1b — SubGM error ‖UUᵀ − X*‖_F vs iteration for p ∈ {0, 0.2, 0.4, 0.6}, r' = 20.

    python -m experiments.subgm.fig1b [--seeds 5] [--steps 6000] [--out results/subgm]

Stated: d=20, r=3, m=500, r'=20, outliers N(0, 100) with rate p, Algorithm 2 init.
Reconstructed (see experiments/subgm/settings.py): spectrum (10,5,1), η=0.2, ρ=0.996,
T=6000, α=1e-15, float64. Per seed: one operator and X*, the p values vmapped (they share
the operator, so residuals and Q are single matmuls). Writes fig1b.png and fig1b.json.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxsense as js
from experiments import common
from experiments.subgm import settings as S

P_VALUES = (0.0, 0.2, 0.4, 0.6)


def compute(seeds: int = 5, steps: int = S.T, r_search: int = 20, p_values=P_VALUES,
            record_every: int = 20, progress: bool = True) -> dict:
    p_arr = jnp.asarray(p_values, jnp.float64)
    curves, finals = [], []
    solver = js.subgm(js.geometric(S.ETA, S.RHO))
    for seed in range(seeds):
        k_op, k_truth, k_noise = jax.random.split(jax.random.PRNGKey(seed), 3)
        op = js.dense_gaussian(k_op, S.M, S.D, jnp.float64)
        truth = js.ground_truth(k_truth, S.D, S.SPECTRUM, jnp.float64)
        probs = jax.vmap(lambda p: js.make_problem(
            k_noise, S.D, S.R, S.M, p=p, outlier_scale=S.OUTLIER_SCALE, op=op, truth=truth,
            dtype=jnp.float64))(p_arr)
        U0 = jax.vmap(lambda y: js.spectral_sign_init(op, y, r_search, S.ALPHA))(probs.y)
        res = js.run(solver, U0, op, probs.y, truth, num_steps=steps, record_every=record_every,
                     metrics=("fro_error",), in_axes={"U0": 0, "y": 0}, progress=progress,
                     desc=f"fig1b seed {seed}")
        curves.append(res.history["fro_error"])  # (P, n)
        finals.append(res.final["fro_error"])
    curves = np.stack(curves, 1)  # (P, seeds, n)
    finals = np.stack(finals, 1)  # (P, seeds)
    return {"iterations": res.iterations, "p": list(p_values), "curves": curves, "final": finals,
            "settings": {"d": S.D, "r": S.R, "m": S.M, "r_search": r_search, "eta": S.ETA,
                         "rho": S.RHO, "steps": steps, "alpha": S.ALPHA, "seeds": seeds,
                         "spectrum": S.SPECTRUM, "outliers": "N(0, 100)", "dtype": "float64",
                         "init": "Algorithm 2"}}


def plot(data: dict, path):
    fig, (ax,) = common.new_figure()
    for i, p in enumerate(data["p"]):
        common.band(ax, data["iterations"], data["curves"][i], label=f"p = {p}")
    ax.set_xlabel("iteration")
    ax.set_ylabel(r"$\|UU^\top - X^*\|_F$")
    ax.set_title(f"Fig. 1b: SubGM, r' = {data['settings']['r_search']}, outliers N(0,100)")
    ax.legend()
    common.save_fig(fig, path)


def main(argv=None, out=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=S.T)
    ap.add_argument("--out", default=out or "results/subgm")
    args = ap.parse_args(argv)
    t0 = time.time()
    with jax.enable_x64(True):
        data = compute(args.seeds, args.steps)
    outdir = common.out_dir(root=args.out)
    plot(data, outdir / "fig1b.png")
    data["wall_s"] = time.time() - t0
    common.save_json(outdir / "fig1b.json", data)
    for p, f in zip(data["p"], data["final"]):
        print(f"p={p:.1f}  final ‖UUᵀ−X*‖_F over {args.seeds} seeds: "
              f"median {np.median(f):.2e}  min {f.min():.2e}  max {f.max():.2e}")
    print(f"wrote {outdir / 'fig1b.png'} and fig1b.json in {data['wall_s']:.1f}s")
    return data


if __name__ == "__main__":
    main()
