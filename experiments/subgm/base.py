"""Shared plumbing of the SubGM figure scripts: instances per seed, batched runs, the CLI.

Every figure script defines ``compute(seeds, steps, ...) -> dict``, ``plot(data, path)``,
``claims(data) -> list[dict]`` (rows for results/subgm/claims.md) and ``main(argv)``, which
calls :func:`cli`. ``cli`` parses ``--seeds --steps --out``, runs ``compute`` under
``jax.enable_x64(True)`` (float64, never enabled at import), writes <name>.png and
<name>.json (all settings, seeds, per-iteration curves, wall time) and prints a summary.

Seed convention: seed s draws (k_op, k_truth, k_noise, k_init) = split(PRNGKey(s), 4); the
operator and X* of seed s are shared by every instance of that seed, so the instances of a
figure (values of p, α, r', step rules) run as one vmapped batch whose residuals and Q are
single matmuls.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxsense as js
from experiments import cli as cli_types
from experiments import common
from experiments.subgm import settings as S

F64 = jnp.float64


def seed_instance(seed: int, m: int = S.M, d: int = S.D, spectrum=S.SPECTRUM):
    """(op, truth, k_noise, k_init) of one seed: Gaussian 𝒜 (m, d·d) and X* in float64."""
    k_op, k_truth, k_noise, k_init = jax.random.split(jax.random.PRNGKey(seed), 4)
    op = js.dense_gaussian(k_op, m, d, F64)
    truth = js.ground_truth(k_truth, d, spectrum, F64)
    return op, truth, k_noise, k_init


def measurements(op, truth, k_noise, p=0.0, nu=0.0, outlier_scale=S.OUTLIER_SCALE,
                 distribution="gaussian"):
    """y = 𝒜(X*) + s for one noise setting (same k_noise ⇒ same outlier positions for a seed)."""
    return js.make_problem(k_noise, op.d, truth.r, op.m, p=p, nu=nu, outlier_scale=outlier_scale,
                           outlier_distribution=distribution, op=op, truth=truth, dtype=F64).y


def alg2(op, y, r_search: int, alpha, pad_to: int | None = None):
    """Algorithm 2 init with r' columns, optionally zero-padded to ``pad_to`` columns.

    Zero columns stay exactly zero under SubGM/GD (D = (Q + Qᵀ)U acts column-wise), and the
    first r' columns of Algorithm 2 with r'' ≥ r' columns are Algorithm 2 with r' columns
    (eigenpairs sorted decreasingly), so a padded U runs the r'-problem exactly; this lets
    different r' share one vmapped batch.
    """
    U = js.spectral_sign_init(op, y, pad_to or r_search, alpha)
    if pad_to is not None:
        U = U.at[:, r_search:].set(0.0)
    return U


def geometric_batch(eta, rho) -> js.Solver:
    """SubGM with a geometric step whose η, ρ are (B,) arrays (solver in_axes=0)."""
    return js.subgm(js.StepRule(eta=jnp.asarray(eta, F64), rho=jnp.asarray(rho, F64),
                                kind="geometric"))


def over_seeds(seeds: int, one_seed):
    """Call ``one_seed(seed) -> dict of arrays (B, ...)`` per seed and stack to (B, seeds, ...)."""
    outs = [one_seed(s) for s in range(seeds)]
    return {k: np.stack([np.asarray(o[k]) for o in outs], 1) for k in outs[0]}


def final_stats(x) -> dict:
    x = np.asarray(x, float)
    return {"median": float(np.median(x)), "min": float(x.min()), "max": float(x.max())}


def spread(x, spec: str = ".2e") -> str:
    """'median M [min, max]' of per-seed final values, as every figure's summary prints it."""
    st = final_stats(x)
    return f"median {st['median']:{spec}} [{st['min']:{spec}}, {st['max']:{spec}}]"


def fmt(x) -> str:
    return f"{x:.2e}"


def loglog_slope(x, y) -> float:
    """Least-squares slope of log10(y) against log10(x)."""
    lx, ly = np.log10(np.asarray(x, float)), np.log10(np.asarray(y, float))
    return float(np.polyfit(lx, ly, 1)[0])


def claim(fig: str, claim_text: str, measured: str, verdict: str) -> dict:
    """One row of claims.md. verdict: 'supported' | 'contradicted' | 'partly supported'."""
    return {"fig": fig, "claim": claim_text, "measured": measured, "verdict": verdict}


def reduced_note(values: dict, paper: dict) -> str | None:
    """'reduced run: seeds=2 < 5, steps=600 < 6000' when any flag in ``values`` is below its
    paper setting in ``paper`` (a value of 0 means 'skipped' and is not a reduction)."""
    low = [f"{k}={values[k]} < {v}" for k, v in paper.items() if 0 < values[k] < v]
    return "reduced run (smaller than the paper setting): " + ", ".join(low) if low else None


def cli(name: str, doc: str, compute, plot, summary, argv=None, out=None,
        default_seeds: int = 5, default_steps: int = S.T, extra=None,
        paper_extra: dict | None = None) -> dict:
    """Parse --seeds/--steps/--out (+ ``extra(parser)``), compute in float64, save PNG+JSON.

    A run with fewer seeds or steps than the paper setting (``default_seeds``,
    ``default_steps``, and ``paper_extra`` {dest: value} of extra flags) records
    ``data["reduced"]`` (a sentence; None for a paper-sized run) in the JSON and prints it
    on the plot (:func:`experiments.common.figure_note`)."""
    ap = argparse.ArgumentParser(prog=f"python -m experiments.subgm.{name}",
                                 description=doc.strip().splitlines()[0])
    ap.add_argument("--seeds", type=cli_types.pos_int, default=default_seeds,
                    help=f"number of seeds (paper setting: {default_seeds})")
    ap.add_argument("--steps", type=cli_types.pos_int, default=default_steps,
                    help=f"iterations T (paper setting: {default_steps})")
    ap.add_argument("--out", default=out or "results/subgm", help="output folder")
    if extra is not None:
        extra(ap)
    args = ap.parse_args(argv)
    kw = {k: v for k, v in vars(args).items() if k not in ("seeds", "steps", "out")}
    paper = {"seeds": default_seeds, "steps": default_steps, **(paper_extra or {})}
    reduced = reduced_note(vars(args), paper)
    t0 = time.time()
    with jax.enable_x64(True):
        data = compute(seeds=args.seeds, steps=args.steps, **kw)
    data["reduced"] = reduced
    data["paper_setting"] = paper
    outdir = common.out_dir(root=args.out)
    with common.figure_note(reduced):
        plot(data, outdir / f"{name}.png")
    data["wall_s"] = time.time() - t0
    data["figure"] = name
    common.save_json(outdir / f"{name}.json", data)
    for line in summary(data):
        print(line)
    if reduced:
        print(reduced)
    print(f"wrote {outdir / (name + '.png')} and {name}.json in {data['wall_s']:.1f}s")
    return data


def record_every(steps: int, n: int = 300) -> int:
    """The largest divisor of ``steps`` that is ≤ max(1, steps // n) (≈ n records)."""
    k = max(1, steps // n)
    while steps % k:
        k -= 1
    return k


def first_below(iterations, curve, thr):
    """First recorded iteration with curve ≤ thr, or None."""
    idx = np.nonzero(np.asarray(curve) <= thr)[0]
    return int(np.asarray(iterations)[idx[0]]) if idx.size else None
