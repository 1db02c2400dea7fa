"""Benchmark: a 256-instance SubGM sweep (jaxsense.sweep) against this machine's roofline.

    python -m experiments.benchmarks.subgm_sweep [--instances 256] [--dtype float64]
        [--precision highest] [--steps-paper 200] [--steps-large 6] [--accuracy-steps 6000]

Sizes: the paper's (d=20, r=3, m=500, r'=20) and a large one (d=100, r=5, m=4000, r'=10).
The 256 instances (8 outlier rates × 32 seeds) share ONE Gaussian operator, so each
iteration is two (B, d²)×(d², m)-sized matmuls (residuals 𝒜(UUᵀ) and Q = 𝒜*(Sign r)/m) plus
per-instance d×d work (‖Q‖₂ by power iteration with s = 10 repeated squarings, D = (Q+Qᵀ)U).

Counted per iteration (B instances):
  FLOPs = B·(4·m·d² + (2s+2)·d³ + 2·d²·r' + 4·d²·r')     (matmul FLOPs, 2 per multiply-add)
  bytes = 2·m·d²·w + B·(2·d·r' + 2·d² + 2·m)·w            (𝒜 read twice + per-instance state;
                                                          w = bytes per element; a lower bound)
Measured in this script: memory bandwidth (a 256 MB np.copyto: read + write bytes / time) and
the matmul rate (a large square matmul in the benchmark dtype). Roofline = min(matmul rate,
bandwidth × FLOPs/bytes); roofline_fraction = achieved FLOP/s ÷ roofline. Compile time is
excluded (one warm-up run of the identical jitted scan).

Precision: ``--precision`` sets jax.default_matmul_precision for the timed runs and the
accuracy run (default "highest"; on GPU the JAX default for float32 is TF32, whose rounding
flips Signs of small residuals and floors the error — pass ``--precision default`` to measure
that trade-off explicitly). On CPU, float64 matmuls are exact-rounding whatever the flag.
Accuracy: a separate sweep at the paper's size runs to completion (``--accuracy-steps``,
p ∈ {0, 0.2}, 8 seeds, r' = 20) and reports the final relative errors.
LAST line: ``sweep_instance_iters_per_s=<x> roofline_fraction=<y>`` for the large size.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxsense as js
from jaxsense.sweep import matmul_precision, sweep
from experiments import cli

SIZES = {"paper": {"d": 20, "r": 3, "m": 500, "r_search": 20, "spectrum": (10.0, 5.0, 1.0)},
         "large": {"d": 100, "r": 5, "m": 4000, "r_search": 10,
                   "spectrum": (10.0, 7.0, 5.0, 3.0, 1.0)}}
SQUARINGS = 10


def measure_bandwidth(n_bytes=256 * 2**20, repeat=5):
    """Bytes/s of a large copy into a preallocated buffer (np.copyto: read n + write n bytes).

    NumPy rather than a jitted x + 1: XLA allocates a fresh output per call and its page
    faults (not DRAM) dominate a single large elementwise op on this machine."""
    src = np.ones(n_bytes // 8)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    best = np.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * n_bytes / best


def measure_matmul(dtype, sizes=(1024, 2048), repeat=5, precision=None):
    """Best FLOP/s of n×n×n matmuls over ``sizes`` (best of ``repeat`` each)."""
    rate = 0.0
    for n in sizes:
        a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
        with matmul_precision(precision):
            f = jax.jit(lambda x: x @ x)
            jax.block_until_ready(f(a))
            for _ in range(repeat):
                t0 = time.perf_counter()
                jax.block_until_ready(f(a))
                rate = max(rate, 2 * n**3 / (time.perf_counter() - t0))
    return rate


def counts(d, m, rs, B, w):
    flops = B * (4 * m * d * d + (2 * SQUARINGS + 2) * d**3 + 6 * d * d * rs)
    nbytes = 2 * m * d * d * w + B * (2 * d * rs + 2 * d * d + 2 * m) * w
    return flops, nbytes


def time_sweep(size, B, steps, dtype, precision):
    cfg = SIZES[size]
    n_p = 8
    grid = {"p": list(np.linspace(0.0, 0.35, n_p)), "seed": list(range(B // n_p)),
            "r_search": cfg["r_search"], "alpha": 1e-15, "eta": 0.2, "rho": 0.996}
    prep = sweep(grid, d=cfg["d"], r=cfg["r"], m=cfg["m"], spectrum=cfg["spectrum"],
                 dtype=dtype, precision=precision, prepare_only=True)
    with matmul_precision(precision):
        def go():
            res = js.run(prep.solver, prep.U0, prep.op, prep.y, prep.truth, num_steps=steps,
                         record_every=steps, metrics=("rel_fro_error",), in_axes=prep.in_axes)
            return jax.block_until_ready(res.state.U)

        go()  # compile + warm-up
        best = np.inf
        for _ in range(2):
            t0 = time.perf_counter()
            go()
            best = min(best, time.perf_counter() - t0)
    return best, prep


def accuracy(dtype, precision, steps):
    cfg = SIZES["paper"]
    res = sweep({"p": [0.0, 0.2], "seed": list(range(8)), "r_search": 20, "alpha": 1e-15,
                 "eta": 0.2, "rho": 0.996}, d=cfg["d"], r=cfg["r"], m=cfg["m"],
                spectrum=cfg["spectrum"], dtype=dtype, precision=precision, num_steps=steps,
                record_every=steps // 10)
    return res.as_grid("rel_fro_error")  # (p, seed)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instances", type=cli.pos_int, default=256)
    ap.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    ap.add_argument("--precision", default="highest",
                    choices=["highest", "high", "default", "tensorfloat32", "bfloat16"])
    ap.add_argument("--steps-paper", type=cli.pos_int, default=200)
    ap.add_argument("--steps-large", type=cli.pos_int, default=6)
    ap.add_argument("--accuracy-steps", type=cli.pos_int, default=6000)
    a = ap.parse_args(argv)
    if a.instances % 8:
        ap.error(f"argument --instances: expected a positive multiple of 8, got {a.instances}")
    x64 = a.dtype == "float64"
    with jax.enable_x64(x64):
        dtype = jnp.dtype(a.dtype)
        w = dtype.itemsize
        dev = jax.devices()
        print(f"device: {dev[0].device_kind} x{len(dev)} ({jax.default_backend()}), "
              f"{platform.processor() or platform.machine()}, cpus={os.cpu_count()}; "
              f"jax {jax.__version__}; dtype={a.dtype}, matmul precision={a.precision}")
        bw = measure_bandwidth()
        mm = measure_matmul(dtype, precision=a.precision)
        print(f"machine: copy bandwidth {bw / 1e9:.1f} GB/s, {a.dtype} matmul {mm / 1e9:.1f} GFLOP/s"
              " (measured now; the machine may be shared)")
        rows = {}
        for size, steps in (("paper", a.steps_paper), ("large", a.steps_large)):
            cfg = SIZES[size]
            wall, prep = time_sweep(size, a.instances, steps, dtype, a.precision)
            B = a.instances
            flops, nbytes = counts(cfg["d"], cfg["m"], cfg["r_search"], B, w)
            per_it = wall / steps
            ips = B * steps / wall
            ai = flops / nbytes
            roof = min(mm, bw * ai)
            frac = (flops / per_it) / roof
            rows[size] = {"ips": ips, "frac": frac}
            print(f"{size:>5}: d={cfg['d']} m={cfg['m']} r'={cfg['r_search']} B={B} "
                  f"steps={steps}: {per_it * 1e3:.2f} ms/iter, {ips:,.0f} instance-iters/s, "
                  f"{1e6 / ips:.3f} us/instance-iter | per iter {flops / 1e9:.3f} GFLOP, "
                  f"{nbytes / 1e6:.1f} MB (AI {ai:.1f} flop/B) | {flops / per_it / 1e9:.1f} "
                  f"GFLOP/s, {nbytes / per_it / 1e9:.1f} GB/s | roofline "
                  f"{roof / 1e9:.1f} GFLOP/s ({'matmul' if mm <= bw * ai else 'bandwidth'}-bound)"
                  f" -> fraction {frac:.3f}  [sharded over {prep.mesh.devices.size} device(s)]")
        if a.accuracy_steps:
            t0 = time.perf_counter()
            err = accuracy(dtype, a.precision, a.accuracy_steps)
            print(f"accuracy (paper size, r'=20, T={a.accuracy_steps}, {a.dtype}, precision="
                  f"{a.precision}): final rel. error p=0: median {np.median(err[0]):.2e} max "
                  f"{np.max(err[0]):.2e}; p=0.2: median {np.median(err[1]):.2e} max "
                  f"{np.max(err[1]):.2e}  ({time.perf_counter() - t0:.0f}s)")
    print(f"sweep_instance_iters_per_s={rows['large']['ips']:.1f} "
          f"roofline_fraction={rows['large']['frac']:.3f}")


if __name__ == "__main__":
    main()
