"""Phase transitions of SubGM-ℓ1 vs GD-ℓ2 (beyond Ma & Fattahi, JMLR 24(96), 2023).

    python -m experiments.subgm.phase_transition [--quick] [--seeds 8] [--out results/subgm]

Success = ‖UUᵀ − X*‖_F/‖X*‖_F ≤ 1e-3 after T iterations. Two maps:
  (a) success probability over m/(d·r) × p, SubGM on the ℓ1 loss vs GD on the ℓ2 loss, same
      problems and the same Algorithm 2 init (r' = r);
  (b) SubGM success probability over r' × α at fixed m and p.
Every cell is ``seeds`` instances; each map column (one m) is ONE call of
:func:`jaxsense.sweep.sweep` (vmapped over p × seed, or r' × α × seed, sharing the operator).

All settings here are ours (the paper has no phase-transition experiment), chosen so the
default run takes a few minutes on a 2-core CPU: d = 10, r = 2, X* eigenvalues (2, 1),
outliers N(0, 100) (the paper's Fig. 1b law), SubGM geometric step η = 0.3, ρ = 0.985,
α = 1e-6, T = 1500 (measured: η = 0.2, ρ = 0.996 leaves ~5e-3 error at T = 1000–2000, the
step budget decays too slowly to reach 1e-3; ρ = 0.985 reaches ~1e-10 at p ≤ 0.2);
GD constant step η = 0.02 (stable for this spectrum), same init and T.
Map (b): m/(d·r) = 8, p = 0.2. float64 throughout. ``--quick``: 3×3 grids, 3 seeds.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import numpy as np

from experiments import cli, common
from jaxsense.sweep import sweep

D, R, SPECTRUM = 10, 2, (2.0, 1.0)
ETA, RHO, ALPHA, GD_ETA = 0.3, 0.985, 1e-6, 0.02
THRESH = 1e-3


def settings(quick: bool, seeds: int | None):
    if quick:
        return {"ratios": [2, 4, 8], "p": [0.0, 0.2, 0.4], "r_search": [2, 10],
                "alpha": [1.0, 1e-3, 1e-10], "seeds": seeds or 3, "T": 1500}
    return {"ratios": [1, 1.5, 2, 3, 4, 6, 8, 12], "p": [0.0, 0.1, 0.2, 0.3, 0.4, 0.5],
            "r_search": [2, 3, 5, 10], "alpha": [1.0, 1e-1, 1e-2, 1e-4, 1e-7, 1e-10, 1e-15],
            "seeds": seeds or 8, "T": 1500}


def compute(quick: bool = False, seeds: int | None = None) -> dict:
    s = settings(quick, seeds)
    T = s["T"]
    rec = T // 10
    common_kw = {"d": D, "r": R, "spectrum": SPECTRUM, "num_steps": T, "record_every": rec}
    seeds_l = list(range(s["seeds"]))
    maps = {"subgm_l1": [], "gd_l2": []}
    errs = {"subgm_l1": [], "gd_l2": []}
    t0 = time.perf_counter()
    for ratio in s["ratios"]:
        m = round(ratio * D * R)
        key = jax.random.PRNGKey(1000 + m)
        sub = sweep({"p": s["p"], "seed": seeds_l, "r_search": R, "alpha": ALPHA, "eta": ETA,
                     "rho": RHO}, key=key, m=m, **common_kw)
        gd = sweep({"p": s["p"], "seed": seeds_l, "r_search": R, "alpha": ALPHA, "eta": GD_ETA},
                   key=key, m=m, method="gd", **common_kw)
        for name, res in (("subgm_l1", sub), ("gd_l2", gd)):
            e = res.as_grid("rel_fro_error")  # (p, seed)
            e = np.where(np.isfinite(e), e, np.inf)
            maps[name].append(np.mean(e <= THRESH, axis=-1))
            errs[name].append(np.median(e, axis=-1))
        print(f"m/(dr)={ratio:>4}: SubGM success {np.round(maps['subgm_l1'][-1], 2)}  "
              f"GD {np.round(maps['gd_l2'][-1], 2)}  ({time.perf_counter() - t0:.0f}s)", flush=True)
    m_b = 8 * D * R
    rb = sweep({"r_search": s["r_search"], "alpha": s["alpha"], "seed": seeds_l, "p": 0.2,
                "eta": ETA, "rho": RHO}, key=jax.random.PRNGKey(7), m=m_b, **common_kw)
    eb = rb.as_grid("rel_fro_error")  # (r', α, seed)
    eb = np.where(np.isfinite(eb), eb, np.inf)
    print(f"r' x alpha (m/(dr)=8, p=0.2): success\n{np.round(np.mean(eb <= THRESH, -1), 2)}")
    return {
        "settings": {"d": D, "r": R, "spectrum": SPECTRUM, "threshold": THRESH, "T": T,
                     "seeds": seeds_l, "outliers": "N(0, 100)", "dtype": "float64",
                     "subgm": {"eta": ETA, "rho": RHO, "alpha": ALPHA, "r_search": R},
                     "gd": {"eta": GD_ETA, "alpha": ALPHA, "r_search": R},
                     "map_b": {"m": m_b, "p": 0.2, "eta": ETA, "rho": RHO},
                     "init": "Algorithm 2", "reconstructed": "all (no such experiment in the paper)",
                     "quick": quick},
        "ratios": s["ratios"], "m": [round(x * D * R) for x in s["ratios"]], "p": s["p"],
        "success": {k: np.stack(v, axis=1) for k, v in maps.items()},  # (p, ratio)
        "median_rel_error": {k: np.stack(v, axis=1) for k, v in errs.items()},
        "r_search": s["r_search"], "alpha": s["alpha"],
        "success_r_alpha": np.mean(eb <= THRESH, -1),  # (r', α)
        "median_rel_error_r_alpha": np.median(eb, -1),
        "wall_s": time.perf_counter() - t0,
    }


def plot(data, path):
    fig, axes = common.new_figure(3, size=(4.4, 3.6))
    for ax, name, title in ((axes[0], "subgm_l1", "SubGM, ℓ1 loss"),
                            (axes[1], "gd_l2", "GD, ℓ2 loss")):
        im = ax.imshow(np.asarray(data["success"][name]), origin="lower", aspect="auto",
                       vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(data["ratios"])), [str(x) for x in data["ratios"]])
        ax.set_yticks(range(len(data["p"])), [str(x) for x in data["p"]])
        ax.set_xlabel("m / (d·r)")
        ax.set_ylabel("outlier rate p")
        ax.set_title(title)
    ax = axes[2]
    im = ax.imshow(np.asarray(data["success_r_alpha"]), origin="lower", aspect="auto", vmin=0,
                   vmax=1, cmap="viridis")
    ax.set_xticks(range(len(data["alpha"])), [f"{a:g}" for a in data["alpha"]], rotation=45)
    ax.set_yticks(range(len(data["r_search"])), [str(x) for x in data["r_search"]])
    ax.set_xlabel("α (init scale)")
    ax.set_ylabel("r'")
    ax.set_title(f"SubGM, m={data['settings']['map_b']['m']}, p=0.2")
    fig.subplots_adjust(wspace=0.4)
    fig.colorbar(im, ax=list(axes), shrink=0.8, label=f"P(rel. error ≤ {THRESH:g})")
    common.save_fig(fig, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small grid, 3 seeds (a reduced run)")
    ap.add_argument("--seeds", type=cli.pos_int, default=None, help="seeds per cell (default 8)")
    ap.add_argument("--out", default="results/subgm")
    a = ap.parse_args(argv)
    low = (["--quick: 3x3 grids"] if a.quick else []) + (
        [f"seeds={a.seeds} < 8"] if a.seeds is not None and a.seeds < 8 else [])
    reduced = "reduced run (smaller than the default setting): " + ", ".join(low) if low else None
    with jax.enable_x64(True):
        data = compute(a.quick, a.seeds)
    data["reduced"] = reduced
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    common.save_json(out / "phase_transition.json", data)
    with common.figure_note(reduced):
        plot(data, out / "phase_transition.png")
    print(f"wrote {out / 'phase_transition.json'} and .png  ({data['wall_s']:.0f}s)")


if __name__ == "__main__":
    main()
