"""Benchmark: jaxsense SubGM vs a plain NumPy implementation of Algorithm 1 (float64).

    python -m experiments.benchmarks.subgm_vs_numpy [--steps 2000] [--numpy-steps 2000]
        [--rounds 3] [--block-rows B]

Paper size d=20, r=3, m=500, r'=20, geometric step (eq. 10) with ‖Q‖₂:
 (a) one instance, T steps: NumPy loop (np.linalg.norm(Q, 2)) vs jaxsense (jit + lax.scan,
     ‖Q‖₂ by the warm-started power iteration; the exact-SVD option is timed too);
 (b) 64 instances (8 seeds × 8 outlier rates p) sharing one operator: NumPy runs them one
     after another; jaxsense vmaps them, so residuals and Q become single matmuls.
jaxsense is timed with both forms of the ℓ1 sub-gradient (``l1_pass``): "one" pass over
A's rows (blocks of ``--block-rows``, default one block) and "two" (packed 𝒜(UUᵀ), then
𝒜*(Sign r)). Compile time is excluded (one warm-up call). Also timed: the same jaxsense
loop with a constant step (no ‖Q‖₂ at all) — the floor any norm computation adds to,
printed as the best speed-up this loop could reach. Every case is timed once per round,
rounds interleaved (the machine may be shared); the table shows the best round and the
spread, and ``uptime`` is printed before each round. The LAST line is
``speedup single=<x> sweep=<y>`` for the solver's default ``l1_pass``.
"""
from __future__ import annotations

import argparse
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxsense as js
from experiments import cli

D, R, M, RS = 20, 3, 500, 20
ETA, RHO, ALPHA = 0.2, 0.996, 1e-15


def numpy_subgm(A, y, U0, eta, rho, T):
    """Algorithm 1 in plain NumPy: A (m, d*d), y (m,), U0 (d, r')."""
    m, d = A.shape[0], U0.shape[0]
    U = U0.copy()
    for t in range(T):
        r = A @ (U @ U.T).ravel() - y
        Q = (np.sign(r) @ A).reshape(d, d) / m
        U = U - (eta * rho**t / np.linalg.norm(Q, 2)) * ((Q + Q.T) @ U)
    return U


def _uptime():
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "uptime unavailable"


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    jax.block_until_ready(out)
    return time.perf_counter() - t0, out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=cli.pos_int, default=2000)
    ap.add_argument("--numpy-steps", type=cli.pos_int, default=2000,
                    help="steps per NumPy instance in the sweep (timed per iteration)")
    ap.add_argument("--rounds", type=cli.pos_int, default=3,
                    help="interleaved timing rounds (best and spread reported)")
    ap.add_argument("--block-rows", type=cli.pos_int, default=None,
                    help="row block of the one-pass ℓ1 sub-gradient (default: one block)")
    args = ap.parse_args(argv)
    T, Tn = args.steps, args.numpy_steps
    default_single = default_sweep = js.make_solver(js.geometric(), "l1").l1_pass
    times, outs = {}, {}

    def record(name, fn):
        t, out = _timed(fn)
        times.setdefault(name, []).append(t)
        outs[name] = out

    with jax.enable_x64(True):
        key = jax.random.PRNGKey(0)
        op = js.dense_gaussian(jax.random.fold_in(key, 1), M, D, jnp.float64)
        truth = js.ground_truth(jax.random.fold_in(key, 2), D, (10.0, 5.0, 1.0), jnp.float64)
        prob = js.make_problem(jax.random.fold_in(key, 3), D, R, M, p=0.1, op=op, truth=truth,
                               dtype=jnp.float64)
        U0 = js.spectral_sign_init(op, prob.y, RS, ALPHA)
        A_np, y_np, U0_np = np.asarray(op.A), np.asarray(prob.y), np.asarray(U0)
        Xs = np.asarray(truth.X_star)
        ps = jnp.repeat(jnp.linspace(0.0, 0.35, 8), 8)
        keys = jax.random.split(jax.random.fold_in(key, 4), 64)
        probs = jax.vmap(lambda k, p: js.make_problem(k, D, R, M, p=p, op=op, truth=truth,
                                                      dtype=jnp.float64))(keys, ps)
        U0s = jax.vmap(lambda y: js.spectral_sign_init(op, y, RS, ALPHA))(probs.y)
        Y_np, U0s_np = np.asarray(probs.y), np.asarray(U0s)

        def solver(step, l1_pass, norm="power"):
            return js.subgm(step, norm=norm, l1_pass=l1_pass,
                            l1_block_rows=args.block_rows if l1_pass == "one" else None)

        def single(sv):
            return lambda: js.run(sv, U0, op, prob.y, truth, num_steps=T, record_every=T,
                                  metrics=("loss",)).state.U

        def batch(sv):
            return lambda: js.run(sv, U0s, op, probs.y, truth, num_steps=T, record_every=T,
                                  metrics=("loss",), in_axes={"U0": 0, "y": 0}).state.U

        geo, flat = js.geometric(ETA, RHO), js.constant(1e-3)
        cases = {}
        for lp in ("one", "two"):
            cases[("single", lp)] = single(solver(geo, lp))
            cases[("floor1", lp)] = single(solver(flat, lp))
            cases[("sweep", lp)] = batch(solver(geo, lp))
            cases[("floorb", lp)] = batch(solver(flat, lp))
        cases[("svd", default_single)] = single(solver(geo, default_single, "svd"))
        for fn in cases.values():
            fn()  # compile + warm-up

        def numpy_sweep():
            errs = []
            for i in range(64):
                Ui = numpy_subgm(A_np, Y_np[i], U0s_np[i], ETA, RHO, Tn)
                errs.append(np.linalg.norm(Ui @ Ui.T - Xs) / np.linalg.norm(Xs))
            return np.asarray(errs)

        for rnd in range(args.rounds):
            print(f"round {rnd + 1}/{args.rounds}: {_uptime()}", flush=True)
            record("numpy single", lambda: numpy_subgm(A_np, y_np, U0_np, ETA, RHO, T))
            for name, fn in cases.items():
                record(name, fn)
            record("numpy sweep", numpy_sweep)
        print(f"after: {_uptime()}")

        rel = lambda U: float(js.diagnostics.rel_fro_error(U, truth.X_star))  # noqa: E731
        rel_b = lambda U: float(np.median(np.asarray(jax.vmap(  # noqa: E731
            js.diagnostics.rel_fro_error, (0, None))(U, truth.X_star))))
        U_np = outs["numpy single"]
        rows = [("single", "numpy", T, 1, "numpy single",
                 np.linalg.norm(U_np @ U_np.T - Xs) / np.linalg.norm(Xs))]
        for lp in ("one", "two"):
            rows.append(("single", f"jaxsense power/{lp}", T, 1, ("single", lp),
                         rel(outs[("single", lp)])))
        rows.append(("single", f"jaxsense svd/{default_single}", T, 1, ("svd", default_single),
                     rel(outs[("svd", default_single)])))
        scale = T / Tn  # the NumPy sweep is timed at Tn steps per instance, scaled to T
        times["numpy sweep"] = [t * scale for t in times["numpy sweep"]]
        rows.append(("sweep64", "numpy (sequential)", T, 64, "numpy sweep",
                     float(np.median(outs["numpy sweep"]))))
        for lp in ("one", "two"):
            rows.append(("sweep64", f"jaxsense vmap/{lp}", T, 64, ("sweep", lp),
                         rel_b(outs[("sweep", lp)])))

    best = {k: min(v) for k, v in times.items()}
    br = "one block" if args.block_rows is None else f"block_rows={args.block_rows}"
    print(f"device: {jax.devices()[0].device_kind}  dtype: float64  d={D} m={M} r'={RS}  "
          f"one-pass: {br}  default l1_pass: single={default_single} sweep={default_sweep}  "
          f"rounds={args.rounds}")
    print(f"{'case':8s} {'impl':22s} {'steps':>6s} {'inst':>5s} {'wall s':>8s} "
          f"{'us/inst-iter':>13s} {'(worst round)':>13s} {'rel err (median)':>17s}")
    for case, impl, steps, n, name, err in rows:
        t, worst = best[name], max(times[name])
        print(f"{case:8s} {impl:22s} {steps:6d} {n:5d} {t:8.3f} {1e6 * t / (steps * n):13.2f} "
              f"{1e6 * worst / (steps * n):13.2f} {err:17.2e}")
    if Tn != T:
        print(f"(numpy sweep timed at {Tn} steps per instance and scaled to {T}; its error column "
              f"is after {Tn} steps)")
    t_np, t_nb = best["numpy single"], best["numpy sweep"]
    for lp in ("one", "two"):
        f1, fb = best[("floor1", lp)], best[("floorb", lp)]
        print(f"floor {lp}-pass (constant step, no norm): single {1e6 * f1 / T:.2f} us/iter, "
              f"sweep {1e6 * fb / (T * 64):.2f} us/inst-iter -> best reachable speedup "
              f"single={t_np / f1:.2f} sweep={t_nb / fb:.2f}")
    for lp in ("one", "two"):
        print(f"l1_pass={lp}: speedup single={t_np / best[('single', lp)]:.2f} "
              f"sweep={t_nb / best[('sweep', lp)]:.2f}")
    single = t_np / best[("single", default_single)]
    sweep = t_nb / best[("sweep", default_sweep)]
    print(f"speedup single={single:.2f} sweep={sweep:.2f}")
    return {"single": single, "sweep": sweep, "times": times}


if __name__ == "__main__":
    main()
