"""Fig. 1b — SubGM error ‖UUᵀ − X*‖_F vs iteration for p ∈ {0, 0.2, 0.4, 0.6}, r' = 20.

    python -m experiments.subgm.fig1b [--seeds 5] [--steps 6000] [--slow-steps 0|24000] [--out results/subgm]

Stated: d=20, r=3, m=500, r'=20, outliers N(0, 100) with rate p, Algorithm 2 init.
Reconstructed (experiments/subgm/settings.py): spectrum (10,5,1), α=1e-15, float64, and the
step schedule. Panel (a) uses the default schedule η=0.2, ρ=0.996, T=6000. Panel (b) is the
slow schedule η=0.02, ρ=0.9995, T=24000 (``--slow-steps 24000``, which
``experiments.subgm.all`` passes; the default 0 skips it so that the demo stays fast), the best of the
schedules we measured for large p (see settings.py), plus a diagnostic run at p=0.6 with
r'=3 (is a failure at p=0.6 due to over-parameterisation, or to m=500 being too few
samples?). Per seed: one operator and X*, every (p, schedule) instance in one vmapped batch.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

import jaxsense as js
from experiments import cli, common
from experiments.subgm import base
from experiments.subgm import settings as S

P_VALUES = (0.0, 0.2, 0.4, 0.6)


def _batch(seed, steps, p_values, r_values, eta, rho):
    op, truth, k_noise, _ = base.seed_instance(seed)
    ys = jnp.stack([base.measurements(op, truth, k_noise, p=p) for p in p_values])
    U0 = jnp.stack([base.alg2(op, y, rs, S.ALPHA, pad_to=20) for y, rs in zip(ys, r_values)])
    B = len(p_values)
    k = base.record_every(steps)
    res = js.run(base.geometric_batch([eta] * B, [rho] * B), U0, op, ys, truth, num_steps=steps,
                 record_every=k, metrics=("fro_error",), in_axes={"solver": 0, "U0": 0, "y": 0})
    return {"curves": res.history["fro_error"], "final": res.final["fro_error"]}, np.arange(steps // k) * k


def compute(seeds: int = 5, steps: int = S.T, slow_steps: int = S.SLOW_T, r_search: int = 20,
            p_values=P_VALUES) -> dict:
    p_values = list(p_values)
    data = {"p": p_values, "settings": {
        "d": S.D, "r": S.R, "m": S.M, "r_search": r_search, "eta": S.ETA, "rho": S.RHO,
        "steps": steps, "alpha": S.ALPHA, "seeds": list(range(seeds)), "spectrum": S.SPECTRUM,
        "outliers": "N(0, 100)", "dtype": "float64", "init": "Algorithm 2",
        "slow": {"eta": S.SLOW_ETA, "rho": S.SLOW_RHO, "steps": slow_steps},
        "reconstructed": ["spectrum", "eta", "rho", "steps", "alpha", "slow schedule"]}}
    its = None

    def one(seed):
        nonlocal its
        out, its = _batch(seed, steps, p_values, [r_search] * len(p_values), S.ETA, S.RHO)
        return out

    o = base.over_seeds(seeds, one)
    data.update(iterations=its, curves=o["curves"], final=o["final"])
    if slow_steps:
        # slow schedule: every p at r' = r_search, plus p = 0.6 (last value) with r' = 3
        ps = p_values + [p_values[-1]]
        rs = [r_search] * len(p_values) + [S.R]

        def one_slow(seed):
            nonlocal its
            out, its = _batch(seed, slow_steps, ps, rs, S.SLOW_ETA, S.SLOW_RHO)
            return out

        o = base.over_seeds(seeds, one_slow)
        data["slow"] = {"iterations": its, "p": ps, "r_search": rs, "curves": o["curves"],
                        "final": o["final"]}
    return data


def plot(data: dict, path):
    slow = data.get("slow")
    fig, axes = common.new_figure(2 if slow else 1)
    ax = axes[0]
    s = data["settings"]
    for i, p in enumerate(data["p"]):
        common.band(ax, data["iterations"], data["curves"][i], label=f"p = {p}")
    ax.set_xlabel("iteration")
    ax.set_ylabel(r"$\|UU^\top - X^*\|_F$")
    ax.set_title(f"Fig. 1b (a): r' = {s['r_search']}, η={s['eta']}, ρ={s['rho']}")
    ax.legend()
    if slow:
        ax = axes[1]
        for i, (p, rs) in enumerate(zip(slow["p"], slow["r_search"])):
            common.band(ax, slow["iterations"], slow["curves"][i], label=f"p = {p}, r' = {rs}")
        ax.set_xlabel("iteration")
        ax.set_title(f"(b) slow schedule η={s['slow']['eta']}, ρ={s['slow']['rho']}")
        ax.legend(fontsize=8)
    common.save_fig(fig, path)


def summary(data: dict):
    for p, f in zip(data["p"], data["final"]):
        yield f"p={p:.1f}  final ‖UUᵀ−X*‖_F: {base.spread(f)}"
    slow = data.get("slow")
    if slow:
        for p, rs, f in zip(slow["p"], slow["r_search"], slow["final"]):
            st = base.final_stats(f)
            yield (f"slow p={p:.1f} r'={rs:2d}  final: median {st['median']:.2e} "
                   f"[{st['min']:.2e}, {st['max']:.2e}]")


def claims(data: dict):
    rows = []
    med = np.median(np.asarray(data["final"]), axis=1)
    txt = "; ".join(f"p={p}: {m:.1e}" for p, m in zip(data["p"], med))
    slow = data.get("slow")
    stxt = ""
    best = med
    if slow:
        smed = np.median(np.asarray(slow["final"]), axis=1)
        n = len(data["p"])
        best = np.minimum(med, smed[:n])
        stxt = (" | slow schedule (η,ρ,T)=({eta},{rho},{T}): ".format(
            eta=data["settings"]["slow"]["eta"], rho=data["settings"]["slow"]["rho"],
            T=data["settings"]["slow"]["steps"])
            + "; ".join(f"p={p}: {m:.1e}" for p, m in zip(slow["p"][:n], smed[:n]))
            + f"; p={slow['p'][-1]} with r'={slow['r_search'][-1]}: {smed[-1]:.1e}")
    s = data["settings"]
    rows.append(base.claim(
        "1b", "SubGM with small init recovers X* for every outlier rate p up to 0.6 (r'=20)",
        f"median final ‖·‖_F, (η,ρ,T)=({s['eta']},{s['rho']},{s['steps']}): {txt}{stxt}",
        "supported" if best.max() <= 1e-4 else (
            "partly supported (exact for small p; fails at the largest p at m=500)"
            if best.min() <= 1e-6 else "contradicted")))
    mono = bool(np.all(np.diff(med) >= 0))
    rows.append(base.claim("1b", "final error grows with p (more outliers, slower/looser convergence)",
                           f"medians {txt}; monotone in p: {mono}",
                           "supported" if mono else "contradicted"))
    return rows


def main(argv=None, out=None) -> dict:
    def extra(ap):
        ap.add_argument("--slow-steps", type=cli.nonneg_int, default=0,
                        help=f"iterations of the slow-schedule panel (b) (0: skip; "
                             f"experiments.subgm.all uses {S.SLOW_T})")
    return base.cli("fig1b", __doc__, compute, plot, summary, argv, out, extra=extra,
                    paper_extra={"slow_steps": S.SLOW_T})


if __name__ == "__main__":
    main()
