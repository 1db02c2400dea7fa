"""Fig. 1c — SubGM error ‖UUᵀ − X*‖_F vs iteration for α ∈ {1, 1e-5, 1e-10, 1e-15}, with a
fixed step schedule and with one tuned per α.

    python -m experiments.subgm.fig1c [--seeds 5] [--steps 6000] [--out results/subgm]
                                      [--tune-seeds 3] [--rho-grid 0.98,0.985,...]

Stated: d=20, r=3, m=500, Algorithm 2 init scaled by α, α ∈ {1, 1e-5, 1e-10, 1e-15}.
Reconstructed: r'=20 and 10% outliers N(0, 100) (as Fig. 1a), spectrum (10,5,1), η=0.2,
T=6000, float64. Two schedules of the geometric step η_t = η ρ^t/‖Q_t‖ (eq. 10):
- "fixed": ρ = 0.996 for every α (the schedule tuned for α = 1e-15, settings.RHO);
- "per_alpha": ρ chosen for each α. The paper's theory ties the decay to α:
  η ≲ 1/(κ log(1/α)) and ρ = 1 − Θ(η/(κ log(1/α))), constants unstated. We *tune* ρ per α
  (reconstructed choice, kept a parameter): for each α, the ρ of ``rho_grid`` with the
  smallest worst-case final ‖UUᵀ − X*‖_F over ``tune_seeds`` held-out seeds (1000, 1001, …;
  never the figure's seeds 0…seeds−1), at the same η, T and problem sizes. The worst case,
  not the median, because too small a ρ falls off a cliff (σ₃ is never learned, error ≈ 1)
  while too large a ρ degrades smoothly. The tuning table is saved in the JSON.
Both schedules run on the same seeds, problems and inits (one vmapped batch of 2×4
instances per seed).
Claims checked: (i) final error ≈ d·α^{2−o(1)} — slope of log10(final error) against
log10(α) over α < 1, fitted for both schedules; the verdict rests on the per-α schedule
(with one schedule for all α, the final error measures how well that schedule suits each α,
not the α law); (ii) small α beats α = 1; (iii) the tuned ρ follows ρ = 1 − c/ln(1/α),
i.e. (1 − ρ*)·ln(1/α) is roughly constant over α < 1. Note d·α² ≤ 2e-9 for α ≤ 1e-5: below
what T = 6000 geometric steps (and float64 at ‖X*‖_F ≈ 11) resolve.
:func:`alpha_sweep` is shared with Fig. 3b (Gaussian noise, operator-norm error).
"""
from __future__ import annotations

import itertools

import jax.numpy as jnp
import numpy as np

import jaxsense as js
from experiments import cli as cli_types
from experiments import common
from experiments.subgm import base
from experiments.subgm import settings as S

ALPHAS = (1.0, 1e-5, 1e-10, 1e-15)
P = 0.1
RHO_GRID = (0.98, 0.985, 0.988, 0.99, 0.992, 0.993, 0.994, 0.995, 0.996, 0.9975, 0.999)
TUNE_SEED0 = 1000
SCHEDULES = ("fixed", "per_alpha")


def alpha_sweep(seeds, steps, alphas, r_search=20, p=0.0, nu=0.0, metrics=("fro_error", "op_error"),
                rhos=None, seed_list=None):
    """SubGM from Algorithm 2 scaled by each α (B instances, one vmapped batch per seed).

    alphas: (B,) init scales; rhos: (B,) ρ per instance (default settings.RHO for all), η =
    settings.ETA. seed_list: the seeds (default 0…seeds−1). Returns {metric: (B, seeds, n),
    "final_fro_error"/"final_op_error": (B, seeds), "iterations": (n,)}."""
    B = len(alphas)
    rhos = [S.RHO] * B if rhos is None else list(rhos)
    if len(rhos) != B:
        raise ValueError(f"rhos={rhos!r}: expected {B} values (one per alpha)")
    solver = base.geometric_batch([S.ETA] * B, rhos)
    k = base.record_every(steps)

    def one_seed(seed):
        op, truth, k_noise, _ = base.seed_instance(seed)
        y = base.measurements(op, truth, k_noise, p=p, nu=nu)
        B0 = js.spectral_sign_init(op, y, r_search, 1.0)
        U0 = jnp.asarray(alphas, base.F64)[:, None, None] * B0
        res = js.run(solver, U0, op, y, truth, num_steps=steps, record_every=k,
                     metrics=metrics, in_axes={"solver": 0, "U0": 0})
        out = {m: res.history[m] for m in metrics}
        out.update({f"final_{m}": res.final[m] for m in ("fro_error", "op_error")})
        return out

    seed_list = list(range(seeds)) if seed_list is None else list(seed_list)
    outs = [one_seed(s) for s in seed_list]
    out = {k_: np.stack([np.asarray(o[k_]) for o in outs], 1) for k_ in outs[0]}
    out["iterations"] = np.arange(steps // k) * k
    return out


def tune_rho(steps, alphas, rho_grid, tune_seeds, p=P, r_search=20) -> dict:
    """ρ per α: argmin over ``rho_grid`` of the worst final ‖UUᵀ − X*‖_F over the held-out
    seeds TUNE_SEED0…TUNE_SEED0+tune_seeds−1. Returns {"rho": (A,) chosen, "table":
    (A, G, tune_seeds) final errors, "grid", "seeds", "criterion"}."""
    combos = list(itertools.product(alphas, rho_grid))
    seeds = [TUNE_SEED0 + i for i in range(tune_seeds)]
    out = alpha_sweep(None, steps, [a for a, _ in combos], r_search, p=p, metrics=("fro_error",),
                      rhos=[r for _, r in combos], seed_list=seeds)
    table = out["final_fro_error"].reshape(len(alphas), len(rho_grid), len(seeds))
    worst = np.where(np.isfinite(table), table, np.inf).max(-1)  # (A, G)
    best = np.argmin(worst, axis=1)
    return {"rho": [float(rho_grid[i]) for i in best], "table": table, "grid": list(rho_grid),
            "seeds": seeds, "criterion": "min over the grid of the max over tuning seeds",
            "at_grid_edge": [bool(i in (0, len(rho_grid) - 1)) for i in best]}


def compute(seeds: int = 5, steps: int = S.T, alphas=ALPHAS, p: float = P, r_search: int = 20,
            tune_seeds: int = 3, rho_grid=RHO_GRID) -> dict:
    tuned = tune_rho(steps, alphas, rho_grid, tune_seeds, p=p, r_search=r_search)
    rhos = {"fixed": [S.RHO] * len(alphas), "per_alpha": tuned["rho"]}
    A = len(alphas)
    out = alpha_sweep(seeds, steps, list(alphas) * 2, r_search, p=p, metrics=("fro_error",),
                      rhos=rhos["fixed"] + rhos["per_alpha"])
    sched = {name: {"rho": rhos[name], "curves": out["fro_error"][i * A:(i + 1) * A],
                    "final": out["final_fro_error"][i * A:(i + 1) * A]}
             for i, name in enumerate(SCHEDULES)}
    return {"iterations": out["iterations"], "alpha": list(alphas), "schedules": sched,
            "tuning": tuned,
            "settings": {"d": S.D, "r": S.R, "m": S.M, "r_search": r_search, "p": p,
                         "outliers": "N(0, 100)", "eta": S.ETA, "rho_fixed": S.RHO,
                         "rho_per_alpha": tuned["rho"], "steps": steps,
                         "seeds": list(range(seeds)), "tune_seeds": tuned["seeds"],
                         "rho_grid": list(rho_grid), "spectrum": S.SPECTRUM, "dtype": "float64",
                         "init": "Algorithm 2 scaled by alpha",
                         "reconstructed": ["r_search", "p", "spectrum", "eta", "rho_fixed",
                                           "rho per alpha (grid-tuned on held-out seeds)",
                                           "steps"]}}


def _panel(ax, iterations, alphas, curves, title, ylabel):
    for i, a in enumerate(alphas):
        common.band(ax, iterations, curves[i], label=f"α = {a:g}")
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)


def plot(data: dict, path, ylabel=r"$\|UU^\top - X^*\|_F$", title=None):
    s = data["settings"]
    if "schedules" not in data:  # one schedule (Fig. 3b)
        fig, (ax,) = common.new_figure()
        _panel(ax, data["iterations"], data["alpha"], data["curves"],
               title or f"Fig. 1c: SubGM, r' = {s['r_search']}, p = {s['p']}", ylabel)
        common.save_fig(fig, path)
        return
    fig, axes = common.new_figure(2)
    for ax, name in zip(axes, SCHEDULES):
        sc = data["schedules"][name]
        rho = ", ".join(f"{r:g}" for r in sc["rho"])
        what = f"(a) fixed ρ = {sc['rho'][0]:g}" if name == "fixed" else f"(b) ρ tuned per α: {rho}"
        _panel(ax, data["iterations"], data["alpha"], sc["curves"],
               f"Fig. 1c {what}; r' = {s['r_search']}, p = {s['p']}", ylabel)
    common.save_fig(fig, path)


def summary(data: dict):
    t = data["tuning"]
    worst = np.asarray(t["table"]).max(-1)
    yield f"tuning (worst final error over seeds {t['seeds']}), ρ grid: {t['grid']}"
    for a, row, r in zip(data["alpha"], worst, t["rho"]):
        yield f"  α={a:7.0e} " + " ".join(f"{v:.1e}" for v in row) + f"  -> ρ={r:g}"
    for name in SCHEDULES:
        sc = data["schedules"][name]
        for a, r, f in zip(data["alpha"], sc["rho"], sc["final"]):
            yield f"{name:9s} α={a:7.0e} ρ={r:<7g} final error: {base.spread(f)}"
    for name in SCHEDULES:
        yield f"{name:9s} slope of log10(final) vs log10(α) over α<1: {alpha_slope(data, name):.2f}"


def alpha_slope(data: dict, schedule: str) -> float:
    """Least-squares slope of log10(median final error) vs log10(α) over α < 1."""
    alphas = np.asarray(data["alpha"], float)
    med = np.median(np.asarray(data["schedules"][schedule]["final"]), axis=1)
    small = alphas < 1
    return base.loglog_slope(alphas[small], med[small])


def alpha_claims(fig, data, what):
    """Rows (i) and (ii) for one schedule's {"alpha", "final", "curves"}."""
    alphas = np.asarray(data["alpha"], float)
    med = np.median(np.asarray(data["final"]), axis=1)
    small = alphas < 1
    slope = base.loglog_slope(alphas[small], med[small])
    txt = "; ".join(f"α={a:g}: {m:.1e}" for a, m in zip(alphas, med))
    # is the smallest α still decreasing at T (schedule-limited)? last record vs 10% earlier
    c = np.median(np.asarray(data["curves"])[int(np.argmin(alphas))], axis=0)
    still = c[-1] < 0.5 * c[int(0.9 * (len(c) - 1))]
    note = f"; α={alphas.min():g} is still decreasing at T" if still else ""
    rows = [base.claim(fig, f"final {what} ≈ d·α^(2−o(1)): slope of log(final error) vs log(α) ≈ 2",
                       f"median final {txt}; fitted slope over α<1: {slope:.2f}",
                       "supported" if 1.5 <= slope <= 2.5 else
                       f"contradicted (final error ∝ α^{slope:.2f}{note})")]
    best_small = med[small].min()
    rows.append(base.claim(fig, "small α gives a much smaller final error than α = 1",
                           f"α=1: {med[~small].max():.1e} vs best small α: {best_small:.1e}",
                           "supported" if med[~small].max() > 10 * best_small else "contradicted"))
    return rows


def claims(data: dict):
    one = {name: {"alpha": data["alpha"], "final": data["schedules"][name]["final"],
                  "curves": data["schedules"][name]["curves"]} for name in SCHEDULES}
    rows = alpha_claims("1c", one["per_alpha"], "error")
    fixed = alpha_slope(data, "fixed")
    rho = data["schedules"]["per_alpha"]["rho"]
    rows[0]["claim"] += " (verdict on the per-α schedule)"
    rows[0]["measured"] = (f"ρ tuned per α ({', '.join(f'{r:g}' for r in rho)}): "
                           + rows[0]["measured"] + f"; with the fixed ρ = {S.RHO}: slope {fixed:.2f}")
    rows[1]["measured"] = "ρ tuned per α: " + rows[1]["measured"]
    alphas = np.asarray(data["alpha"], float)
    small = alphas < 1
    c = (1 - np.asarray(rho)[small]) * np.log(1 / alphas[small])
    edge = [a for a, e, s in zip(alphas, data["tuning"]["at_grid_edge"], small) if e and s]
    spread = c.max() / c.min()
    ok = spread <= 2 and not edge
    rows.append(base.claim(
        "1c", "the step decay ties to α: ρ = 1 − Θ(1/log(1/α)) (theory: ρ = 1 − Θ(η/(κ log(1/α))))",
        "tuned (1−ρ*)·ln(1/α) over α<1: " + ", ".join(f"α={a:g}: {v:.3f}" for a, v in zip(alphas[small], c))
        + f" (max/min {spread:.2f}; grid {min(data['tuning']['grid'])}–{max(data['tuning']['grid'])}"
        + (f"; at the grid edge for α={edge}" if edge else "") + ")",
        "supported" if ok else "partly supported (the tuned ρ varies more than a factor 2 from the rule, "
                               "or sits at the grid edge)"))
    return rows


def _extra(ap):
    ap.add_argument("--tune-seeds", type=cli_types.pos_int, default=3,
                    help="held-out seeds (1000, 1001, …) on which ρ is tuned per α")
    ap.add_argument("--rho-grid", type=cli_types.comma_list(
        cli_types.float_range(0.0, 1.0, low_open=True), tuple_out=True), default=RHO_GRID,
        help="candidate ρ values, comma-separated, each in (0, 1]")


def main(argv=None, out=None) -> dict:
    return base.cli("fig1c", __doc__, compute, plot, summary, argv, out, extra=_extra)


if __name__ == "__main__":
    main()
