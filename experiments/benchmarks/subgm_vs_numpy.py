"""Benchmark: jaxsense SubGM vs a plain NumPy implementation of Algorithm 1 (float64).

    python -m experiments.benchmarks.subgm_vs_numpy [--steps 2000] [--numpy-steps 2000]

Paper size d=20, r=3, m=500, r'=20, geometric step (eq. 10) with ‖Q‖₂:
 (a) one instance, T steps: NumPy loop (np.linalg.norm(Q, 2)) vs jaxsense (jit + lax.scan,
     ‖Q‖₂ by the warm-started power iteration; the exact-SVD option is timed too);
 (b) 64 instances (8 seeds × 8 outlier rates p) sharing one operator: NumPy runs them one
     after another; jaxsense vmaps them, so residuals and Q become single matmuls.
Compile time is excluded (one warm-up call). Also timed: the same jaxsense loop with a
constant step (no ‖Q‖₂ at all) — the floor any norm computation adds to, printed as the
best speed-up this loop could reach. Prints a table; the LAST line is
``speedup single=<x> sweep=<y>``.
"""
from __future__ import annotations

import argparse
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


def _time(fn, repeat=3):
    best = np.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        jax.block_until_ready(out)
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=cli.pos_int, default=2000)
    ap.add_argument("--numpy-steps", type=cli.pos_int, default=2000,
                    help="steps per NumPy instance in the sweep (timed per iteration)")
    args = ap.parse_args(argv)
    T = args.steps
    rows = []
    with jax.enable_x64(True):
        key = jax.random.PRNGKey(0)
        op = js.dense_gaussian(jax.random.fold_in(key, 1), M, D, jnp.float64)
        truth = js.ground_truth(jax.random.fold_in(key, 2), D, (10.0, 5.0, 1.0), jnp.float64)
        prob = js.make_problem(jax.random.fold_in(key, 3), D, R, M, p=0.1, op=op, truth=truth,
                               dtype=jnp.float64)
        U0 = js.spectral_sign_init(op, prob.y, RS, ALPHA)
        A_np, y_np, U0_np = np.asarray(op.A), np.asarray(prob.y), np.asarray(U0)
        Xs = np.asarray(truth.X_star)

        # ---- (a) single instance
        t_np, U_np = _time(lambda: numpy_subgm(A_np, y_np, U0_np, ETA, RHO, T))  # best of 3, like jaxsense
        err_np = np.linalg.norm(U_np @ U_np.T - Xs) / np.linalg.norm(Xs)
        res = {}
        for norm in ("power", "svd"):
            solver = js.subgm(js.geometric(ETA, RHO), norm=norm)
            fn = lambda: js.run(solver, U0, op, prob.y, truth, num_steps=T, record_every=T,  # noqa: E731
                                metrics=("loss",)).state.U
            fn()  # compile
            res[norm] = _time(fn)
        floor = js.subgm(js.constant(1e-3))
        fn0 = lambda: js.run(floor, U0, op, prob.y, truth, num_steps=T, record_every=T,  # noqa: E731
                             metrics=("loss",)).state.U
        fn0()
        t_floor1 = _time(fn0)[0]
        t_js, U_js = res["power"]
        err_js = float(js.diagnostics.rel_fro_error(U_js, truth.X_star))
        rows.append(("single", "numpy", T, 1, t_np, err_np))
        rows.append(("single", "jaxsense (power)", T, 1, t_js, err_js))
        rows.append(("single", "jaxsense (svd)", T, 1, res["svd"][0],
                     float(js.diagnostics.rel_fro_error(res["svd"][1], truth.X_star))))

        # ---- (b) 64 instances: 8 seeds × 8 p, one shared operator
        ps = jnp.repeat(jnp.linspace(0.0, 0.35, 8), 8)
        keys = jax.random.split(jax.random.fold_in(key, 4), 64)
        probs = jax.vmap(lambda k, p: js.make_problem(k, D, R, M, p=p, op=op, truth=truth,
                                                      dtype=jnp.float64))(keys, ps)
        U0s = jax.vmap(lambda y: js.spectral_sign_init(op, y, RS, ALPHA))(probs.y)
        solver = js.subgm(js.geometric(ETA, RHO))
        fnb = lambda: js.run(solver, U0s, op, probs.y, truth, num_steps=T, record_every=T,  # noqa: E731
                             metrics=("loss",), in_axes={"U0": 0, "y": 0}).state.U
        fnb()
        t_jb, U_jb = _time(fnb)
        fnb0 = lambda: js.run(floor, U0s, op, probs.y, truth, num_steps=T, record_every=T,  # noqa: E731
                              metrics=("loss",), in_axes={"U0": 0, "y": 0}).state.U
        fnb0()
        t_floorb = _time(fnb0)[0]
        errs_jb = np.asarray(jax.vmap(js.diagnostics.rel_fro_error, (0, None))(U_jb, truth.X_star))
        Tn = args.numpy_steps
        Y_np, U0s_np = np.asarray(probs.y), np.asarray(U0s)
        t0 = time.perf_counter()
        errs_nb = []
        for i in range(64):
            Ui = numpy_subgm(A_np, Y_np[i], U0s_np[i], ETA, RHO, Tn)
            errs_nb.append(np.linalg.norm(Ui @ Ui.T - Xs) / np.linalg.norm(Xs))
        t_nb = (time.perf_counter() - t0) * T / Tn  # scaled to T steps per instance
        rows.append(("sweep64", "numpy (sequential)", T, 64, t_nb, float(np.median(errs_nb))))
        rows.append(("sweep64", "jaxsense (vmap)", T, 64, t_jb, float(np.median(errs_jb))))

    print(f"device: {jax.devices()[0].device_kind}  dtype: float64  d={D} m={M} r'={RS}")
    print(f"{'case':8s} {'impl':22s} {'steps':>6s} {'inst':>5s} {'wall s':>8s} "
          f"{'us/inst-iter':>13s} {'rel err (median)':>17s}")
    for case, impl, steps, n, t, err in rows:
        print(f"{case:8s} {impl:22s} {steps:6d} {n:5d} {t:8.3f} {1e6 * t / (steps * n):13.2f} {err:17.2e}")
    if Tn != T:
        print(f"(numpy sweep timed at {Tn} steps per instance and scaled to {T}; its error column "
              f"is after {Tn} steps)")
    print(f"floor (constant step, no norm): single {1e6 * t_floor1 / T:.2f} us/iter, "
          f"sweep {1e6 * t_floorb / (T * 64):.2f} us/inst-iter -> best reachable speedup "
          f"single={t_np / t_floor1:.2f} sweep={t_nb / t_floorb:.2f}")
    single = t_np / t_js
    sweep = t_nb / t_jb
    print(f"speedup single={single:.2f} sweep={sweep:.2f}")
    return {"single": single, "sweep": sweep, "rows": rows}


if __name__ == "__main__":
    main()
