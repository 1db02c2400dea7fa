"""Fig. 5 — SubGM on the EXPECTED ℓ1 loss, r' = 20: three phases of the error.

    python -m experiments.subgm.fig5 [--seeds 5] [--steps 10000] [--out results/subgm]

Stated: d=20, r=3, r'=20, expected loss f̄_ℓ1(U) = ‖UUᵀ − X*‖_F with step η_t = (η/2)f̄_ℓ1,
i.e. exactly U ← U − η(UUᵀ − X*)U (§4). Three phases: eigenvalue learning, global linear
convergence, local sub-linear convergence. Reconstructed: η = 0.02, T = 10000, spectrum
(10,5,1), α ∈ {1e-1, 1e-2, 1e-3}, and the init: small random U₀ = α·G, G_ij ~ N(0, 1/d)
(Algorithm 2 has no expected-loss analogue: its population version is aligned with V and
would give E = 0), float64. All α of a seed run as one vmapped batch.
Why these α: in the last phase the part G of the residual outside the signal's row space
shrinks only through the cubic term, ‖GGᵀ‖ ≈ 1/(1/‖G₀G₀ᵀ‖ + 2ηt), so the sub-linear
phase becomes visible within T only when ‖G₀G₀ᵀ‖ ≳ 1/(2ηT) ≈ 2.5e-3, i.e. α ≳ 0.05; with
smaller α the error stalls at ≈ α²·‖G₀G₀ᵀ‖ (that plateau is the "d·α²" final error).
Phases are measured per run: t₁ = first iteration with every eigenvalue of S Sᵀ within 10%
of σᵢ (end of eigenvalue learning); t₂ = first iteration ≥ t₁ at which the error decays slower than
1e-3 decades per iteration (start of the local phase; the linear phase runs at ≳ 1e-2); the linear rate is the slope of
log10(error) over [t₁, t₂]; the local phase's log–log slope is fitted over the last half of
[t₂, T] (−1 means error ∝ 1/t).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

import jaxsense as js
from experiments import common
from experiments.subgm import base
from experiments.subgm import settings as S

ALPHAS = (1e-1, 1e-2, 1e-3)
LOCAL_RATE = 1e-3  # decades per iteration: below this the run is in the local (slow) phase
METRICS = ("fro_error", "signal", "cross", "residual", "F_norm", "G_norm", "eigs")


def expected_runs(seeds, steps, alphas, eta, k, r_search=20, metrics=METRICS):
    """Runs of U ← U − η(UUᵀ−X*)U from α·G for each α (one vmapped batch per seed)."""
    B = len(alphas)
    solver = js.subgm(js.StepRule(eta=jnp.full((B,), eta, base.F64), rho=jnp.ones((B,), base.F64),
                                  kind="polyak"), loss="expected_l1")

    def one_seed(seed):
        op, truth, _, k_init = base.seed_instance(seed, m=1)  # 𝒜 unused by the expected loss
        G = js.small_random_init(k_init, S.D, r_search, 1.0, base.F64)
        U0 = jnp.asarray(alphas, base.F64)[:, None, None] * G
        y = jnp.zeros((1,), base.F64)
        res = js.run(solver, U0, op, y, truth, num_steps=steps, record_every=k, metrics=metrics,
                     in_axes={"solver": 0, "U0": 0})
        return {m: res.history[m] for m in metrics} | {"final": res.final["fro_error"],
                                                       "sigma": np.broadcast_to(np.asarray(truth.sigma), (B, S.R))}

    out = base.over_seeds(seeds, one_seed)
    out["iterations"] = np.arange(steps // k) * k
    return out


def phases(iterations, err, eigs, sigma):
    """Phase boundaries and rates of one run (see the module docstring)."""
    it = np.asarray(iterations, float)
    learned = [base.first_below(it, np.abs(eigs[:, i] - sigma[i]) / sigma[i], 0.1) for i in range(len(sigma))]
    t1 = None if any(t is None for t in learned) else max(learned)
    # local decay rate in decades per iteration; the linear phase ends when it falls below
    # LOCAL_RATE (the linear phase runs at ≳ 1e-2 decades/iteration here)
    rate = np.gradient(np.log10(np.maximum(err, 1e-300)), it)
    after = np.where(it >= (t1 if t1 is not None else np.inf), -rate, np.inf)
    t2 = base.first_below(it, after, LOCAL_RATE)
    out = {"t_learned": learned, "t1": t1, "t2": t2, "linear_slope": None, "local_loglog_slope": None}
    if t1 is not None and t2 is not None and t2 > t1:
        w = (it >= t1) & (it <= t2)
        if w.sum() >= 3:
            out["linear_slope"] = float(np.polyfit(it[w], np.log10(err[w]), 1)[0])
    if t2 is not None:
        w = it >= (t2 + it[-1]) / 2
        if w.sum() >= 3:
            out["local_loglog_slope"] = base.loglog_slope(it[w], err[w])
    return out


def compute(seeds: int = 5, steps: int = S.EXPECTED_T, alphas=ALPHAS, eta: float = S.EXPECTED_ETA) -> dict:
    k = base.record_every(steps, 400)
    out = expected_runs(seeds, steps, alphas, eta, k)
    ph = [[phases(out["iterations"], out["fro_error"][a, s], out["eigs"][a, s],
                  out["sigma"][a, s]) for s in range(seeds)] for a in range(len(alphas))]
    return {"iterations": out["iterations"], "alpha": list(alphas), "curves": out["fro_error"],
            "G_norm": out["G_norm"], "final": out["final"], "phases": ph,
            "settings": {"d": S.D, "r": S.R, "r_search": 20, "eta": eta, "steps": steps,
                         "loss": "expected l1, step (eta/2)*f", "seeds": list(range(seeds)),
                         "spectrum": S.SPECTRUM, "dtype": "float64",
                         "init": "small random alpha*N(0,1/d)",
                         "reconstructed": ["eta", "steps", "alphas", "init", "spectrum"]}}


def plot(data: dict, path):
    fig, (ax1, ax2) = common.new_figure(2)
    it = np.asarray(data["iterations"])
    for i, a in enumerate(data["alpha"]):
        line = common.band(ax1, it, data["curves"][i], label=f"α = {a:g}")
        common.band(ax2, it[1:], np.asarray(data["curves"][i])[:, 1:], label=f"α = {a:g}", color=line.get_color())
        ax2.plot(it[1:], np.median(np.asarray(data["G_norm"][i])[:, 1:], 0), ":", color=line.get_color(), lw=1)
        t1 = [p["t1"] for p in data["phases"][i] if p["t1"] is not None]
        t2 = [p["t2"] for p in data["phases"][i] if p["t2"] is not None]
        for t, ls in ((t1, "--"), (t2, "-.")):
            if t:
                ax1.axvline(np.median(t), color=line.get_color(), ls=ls, lw=0.8)
    ax2.set_xscale("log")
    for ax in (ax1, ax2):
        ax.set_xlabel("iteration")
        ax.set_ylabel(r"$\|UU^\top - X^*\|_F$")
        ax.legend(fontsize=8)
    ax1.set_title("Fig. 5: expected loss, r'=20 (-- end of learning, -. local phase)")
    ax2.set_title(r"log–log; dotted: $\|GG^\top\|$")
    common.save_fig(fig, path)


def _median_of(ph):
    """key -> median over seeds of the phase quantity (nan if no seed has it)."""
    def med(key):
        vals = [p[key] for p in ph if p[key] is not None]
        return float(np.median(vals)) if vals else float("nan")
    return med


def summary(data: dict):
    for i, a in enumerate(data["alpha"]):
        ph = data["phases"][i]
        st = base.final_stats(data["final"][i])
        med = _median_of(ph)
        yield (f"α={a:g}: t1 (learned) {med('t1'):.0f}, t2 (local) {med('t2'):.0f}, linear slope "
               f"{med('linear_slope'):.2e}/it, local log-log slope {med('local_loglog_slope'):.2f}, "
               f"final error median {st['median']:.2e}")


def _f0(x):
    return "n/a" if x is None else f"{x:.0f}"


def claims(data: dict):
    rows = []
    meds = {}
    for i, a in enumerate(data["alpha"]):
        ph = data["phases"][i]
        med = _median_of(ph)
        meds[a] = {key: (None if np.isnan(med(key)) else float(med(key))) for key in
                   ("t1", "t2", "linear_slope", "local_loglog_slope")}
    a_big = max(data["alpha"])
    m = meds[a_big]
    three = (m["t1"] is not None and m["t2"] is not None and m["t2"] > m["t1"]
             and m["linear_slope"] is not None and m["linear_slope"] < 0
             and m["local_loglog_slope"] is not None and -1.5 <= m["local_loglog_slope"] <= -0.5)
    txt = "; ".join(
        f"α={a:g}: t1={_f0(v['t1'])}, t2={_f0(v['t2'])}, linear slope "
        + (f"{v['linear_slope']:.1e}" if v['linear_slope'] is not None else "n/a")
        + ", local log-log slope " + (f"{v['local_loglog_slope']:.2f}" if v['local_loglog_slope'] is not None else "n/a")
        for a, v in meds.items())
    rows.append(base.claim("5", "expected loss: three phases — eigenvalue learning, global linear, local sub-linear (≈1/t)",
                           txt, "supported" if three else "contradicted"))
    fin = np.median(np.asarray(data["final"]), axis=1)
    alphas = np.asarray(data["alpha"], float)
    slope = base.loglog_slope(alphas, fin)
    rows.append(base.claim("5", "final error ≈ d·α^(2−o(1)) (expected loss)",
                           "median final " + "; ".join(f"α={a:g}: {f:.1e}" for a, f in zip(alphas, fin))
                           + f"; fitted slope {slope:.2f}",
                           "supported" if 1.5 <= slope <= 2.5 else "contradicted"))
    return rows


def main(argv=None, out=None) -> dict:
    return base.cli("fig5", __doc__, compute, plot, summary, argv, out, default_steps=S.EXPECTED_T)


if __name__ == "__main__":
    main()
