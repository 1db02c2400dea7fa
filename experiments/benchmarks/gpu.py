"""`make bench-gpu`: SubGM sweep, JumpReLU SAE train step and ActivationStore feed on one device.

    python -m experiments.benchmarks.gpu            # full size, for one GPU (make bench-gpu)
    python -m experiments.benchmarks.gpu --tiny     # the same code path at tiny sizes (CPU, seconds)
        [--parts subgm,sae,feed] [--inject-failure PARTS]

Prints ONE table (a row per part) and exits 1 if a correctness check fails, else 0.

1. SubGM sweep (:func:`jaxsense.sweep`, instances sharing one Gaussian operator, the
   power-iteration norm, the solver's default ℓ1 form unless ``--l1-pass`` picks one):
   full size d=100, r=5, m=4000, r'=10, 256 instances (4 outlier rates × 64 seeds), step
   η = 0.2, ρ = 0.99 (chosen here so that 2000 steps reach float32's error floor at this
   size), float32 with matmul precision "highest"
   (the JAX default on GPU, TF32, flips signs of small residuals and floors the error).
   Throughput: instance-iterations/s of the whole checked run (compile excluded by a
   warm-up chunk). Ceiling: the roofline min(matmul rate, bandwidth × FLOPs/bytes), with
   the FLOP and byte counts of ``experiments.benchmarks.subgm_sweep.counts`` and the matmul
   rate (in the run's dtype and precision) and device copy bandwidth measured here.
   Check: every instance ends with ‖UUᵀ − X*‖_F/‖X*‖_F ≤ ``--subgm-tol``.
2. JumpReLU SAE train step (the jitted ``lax.scan`` of ``sae.step.train_step`` that
   ``sae.train`` runs, ``sae.loop.make_chunk_fn``; GDM recipe): full size d=2304, 16384
   latents, 4096 tokens per step, bfloat16 matmul operands (f32 accumulation and Adam).
   Throughput: tokens/s, best of the timed calls. Ceiling: the dense bf16 tensor-core peak
   of the device kind (:data:`BF16_PEAK_TFLOPS`, spec sheets; "unknown" otherwise), work
   12·B·d·M FLOPs per step (the convention of ``experiments.benchmarks.sae_train``); the
   target is ≥ 1.0 M tokens/s. Check: parameters and metrics finite, and the loss of the
   last timed call below that of the first (the same chunk is trained on repeatedly).
3. ActivationStore → device feed (``sae.store.ActivationStore``, its default prefetch and
   device put from ``sae.transfer``): a synthetic bfloat16 cache of ``--feed-batches``
   batches of the SAE's (B, d), written to a temporary folder, read as one shuffled epoch
   from the page cache (a warm-up epoch first). Throughput: tokens/s delivered on the
   device; compared with the tokens/s the SAE step consumes (ratio ≥ 1: the feed keeps up).
   Check: every row arrives once (row count and Σx² against the cache, float64).

``--inject-failure PARTS`` (comma-separated) corrupts those parts' inputs (SubGM:
measurements reversed, so they no longer match the operator; SAE: a NaN in the batch; feed:
the consumer drops one batch) so that their checks fail — used by tests/test_bench_gpu.py
to check the exit status.
LAST line: ``bench_gpu subgm_iters_per_s=… subgm_roofline=… sae_tokens_per_s=…
sae_peak_fraction=… feed_over_step=… checks=ok|FAILED``.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from experiments import cli

PARTS = ("subgm", "sae", "feed")

#: Dense (no 2:4 sparsity) BF16 tensor-core peak in TFLOP/s by device kind (first substring
#: match wins). NVIDIA's datasheets print the sparse figure: H100 SXM and H200 SXM
#: "BF16 Tensor Core 1,979 TFLOPS*" (* with sparsity) → 989; H100 PCIe 1,513 → 756;
#: H100 NVL / H200 NVL 1,671 → 835; A100 624 → 312 (NVIDIA H100, H200 and A100 Tensor Core
#: GPU datasheets).
BF16_PEAK_TFLOPS = (("H200 NVL", 835.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0),
                    ("H200", 989.0), ("H100", 989.0), ("A100", 312.0))

SIZES = {
    "full": {"subgm": dict(d=100, r=5, m=4000, r_search=10, seeds=64, steps=2000, rho=0.99),
             "sae": dict(d=2304, width=16384, batch=4096, k=8, calls=10),
             "feed": dict(batches=48)},
    "tiny": {"subgm": dict(d=10, r=2, m=300, r_search=4, seeds=4, steps=1500, rho=0.99),
             "sae": dict(d=64, width=256, batch=256, k=4, calls=3),
             "feed": dict(batches=12)},
}
P_VALUES = (0.0, 0.05, 0.1, 0.2)  # outlier rates of the SubGM sweep (× seeds = instances)
SAE_TARGET_TOK_S = 1.0e6


def bf16_peak(device_kind: str) -> tuple[float | None, str]:
    """(dense bf16 peak FLOP/s, label) for a device kind, or (None, "unknown")."""
    for name, tflops in BF16_PEAK_TFLOPS:
        if name.lower() in device_kind.lower():
            return tflops * 1e12, f"{name} spec {tflops:g} TFLOP/s"
    return None, "unknown"


def measure_device_bandwidth(n_bytes: int, repeat: int = 5) -> float:
    """Bytes/s of a jitted elementwise pass over ``n_bytes`` on the default device (read +
    write). On CPU XLA's fresh output buffers add page faults; this is a GPU figure."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones(n_bytes // 4, jnp.float32)
    f = jax.jit(lambda x: x * 1.5)
    jax.block_until_ready(f(x))
    best = np.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        jax.block_until_ready(f(x))
        best = min(best, time.perf_counter() - t0)
    return 2 * n_bytes / best


def _row(part, size, dtype, throughput, ceiling, fraction, ok, detail):
    return {"part": part, "size": size, "dtype": dtype, "throughput": throughput,
            "ceiling": ceiling, "fraction": fraction, "ok": bool(ok), "check": detail}


# ------------------------------------------------------------------ 1. SubGM sweep
def bench_subgm(c: dict, dtype_name: str, precision: str, tol: float, inject: bool,
                tiny: bool, l1_pass: str | None = None) -> tuple[dict, dict]:
    import jax
    import jax.numpy as jnp

    import jaxsense as js
    from experiments.benchmarks.subgm_sweep import counts, measure_matmul
    from jaxsense.sweep import matmul_precision, sweep

    with jax.enable_x64(dtype_name == "float64"):
        dtype = jnp.dtype(dtype_name)
        d, r, m, rs, T = c["d"], c["r"], c["m"], c["r_search"], c["steps"]
        grid = {"p": list(P_VALUES), "seed": list(range(c["seeds"])), "r_search": rs,
                "alpha": 1e-6 if dtype == jnp.float32 else 1e-15, "eta": 0.2, "rho": c["rho"]}
        prep = sweep(grid, d=d, r=r, m=m, spectrum=tuple(np.linspace(10.0, 1.0, r)),
                     dtype=dtype, precision=precision, devices=jax.devices()[:1],
                     prepare_only=True)  # one device, as `make bench-gpu` measures
        y = prep.y[:, ::-1] if inject else prep.y  # injected: y no longer matches 𝒜(X*)
        solver = prep.solver if l1_pass is None else prep.solver.replace(l1_pass=l1_pass)
        k = T // 10
        kw = dict(record_every=k, metrics=("rel_fro_error",), in_axes=prep.in_axes)
        with matmul_precision(precision):
            js.run(solver, prep.U0, prep.op, y, prep.truth, num_steps=k, **kw)  # compile
            t0 = time.perf_counter()
            res = js.run(solver, prep.U0, prep.op, y, prep.truth, num_steps=T,
                         num_chunks=10, **kw)
            jax.block_until_ready(res.state.U)
            wall = time.perf_counter() - t0
        B = prep.B
        err = np.asarray(res.final["rel_fro_error"])[:B]
        mm = measure_matmul(dtype, sizes=(256,) if tiny else (4096, 8192), precision=precision)
        bw = measure_device_bandwidth(2**22 if tiny else 2**30)
    flops, nbytes = counts(d, m, rs, B, dtype.itemsize)
    per_it = wall / T
    ai = flops / nbytes
    roof = min(mm, bw * ai)
    frac = flops / per_it / roof
    ips = B * T / wall
    ok = bool(np.all(np.isfinite(err)) and err.max() <= tol)
    row = _row("SubGM sweep", f"d={d} m={m} r'={rs} B={B} T={T} l1_pass={solver.l1_pass}",
               f"{dtype_name}/{precision}",
               f"{ips:,.0f} inst-iter/s ({flops / per_it / 1e12:.2f} TFLOP/s)",
               f"roofline {roof / 1e12:.2f} TFLOP/s "
               f"({'matmul' if mm <= bw * ai else 'bandwidth'}-bound)",
               frac, ok, f"max rel err {err.max():.1e} (median {np.median(err):.1e}) "
                         f"<= {tol:g}")
    return row, {"ips": ips, "frac": frac}


# ------------------------------------------------------------------ 2. SAE train step
def bench_sae(c: dict, inject: bool) -> tuple[dict, dict]:
    import jax
    import jax.numpy as jnp

    import sae
    from sae.loop import make_chunk_fn
    from sae.step import init_state

    d, M, B, k = c["d"], c["width"], c["batch"], c["k"]
    cfg = sae.TrainConfig(d_in=d, width=M, batch_size=B, steps_per_call=k,
                          total_steps=100_000, lr_warmup_steps=0, matmul_dtype="bfloat16",
                          progress=False)
    hp = sae.HParams.from_config(cfg)
    state = jax.jit(lambda h, kk: init_state(cfg, h, kk)[1])(hp, jax.random.key(0))
    fn = make_chunk_fn(cfg)
    chunk = jax.random.normal(jax.random.key(1), (k, B, d), jnp.float32) / np.sqrt(d)
    if inject:
        chunk = chunk.at[0, 0, 0].set(jnp.nan)
    state, m0, fin = fn(state, chunk, hp)  # compile + warm-up
    first_loss = float(jnp.mean(m0["loss"]))
    finite = bool(fin) and bool(np.all(np.isfinite(np.asarray(m0["loss"]))))
    best = np.inf
    for _ in range(c["calls"]):
        t0 = time.perf_counter()
        state, mt, fin = fn(state, chunk, hp)
        jax.block_until_ready(state)
        best = min(best, time.perf_counter() - t0)
        finite = finite and bool(fin) and bool(np.all(np.isfinite(np.asarray(mt["loss"]))))
    last_loss = float(jnp.mean(mt["loss"]))
    s_step = best / k
    tok_s = B / s_step
    flops = 12 * B * d * M
    kind = jax.devices()[0].device_kind
    peak, label = bf16_peak(kind)
    frac = flops / s_step / peak if peak else float("nan")
    ok = finite and last_loss < first_loss
    target = "met" if tok_s >= SAE_TARGET_TOK_S else "not met"
    row = _row("SAE train step", f"d={d} M={M} B={B} k={k}", "bfloat16",
               f"{tok_s:,.0f} tok/s ({flops / s_step / 1e12:.2f} TFLOP/s; target "
               f">= {SAE_TARGET_TOK_S / 1e6:.1f}M: {target})", f"bf16 peak: {label}", frac, ok,
               f"finite={finite}, loss {first_loss:.4g} -> {last_loss:.4g}")
    return row, {"tok_s": tok_s, "frac": frac}


# ------------------------------------------------------------------ 3. store -> device
def write_synthetic_cache(root: Path, n_rows: int, d: int, rows_per_shard: int,
                          seed: int = 0) -> float:
    """A bfloat16 activation cache (sae.format layout) of N(0, 1) rows; returns Σx² of the
    stored values in float64."""
    import ml_dtypes

    from sae._atomic import atomic_save_npy
    from sae.format import FORMAT, layer_key, shard_file_name, write_manifest

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    shards, total, sumsq = [], 0, 0.0
    while total < n_rows:
        n = min(rows_per_shard, n_rows - total)
        idx = len(shards)
        x = rng.standard_normal((n, d), np.float32).astype(ml_dtypes.bfloat16)
        sumsq += float(np.sum(np.square(x.astype(np.float64))))
        arrays = {layer_key(0): x.view(np.uint16),
                  "token_ids": np.zeros(n, "<i4"), "positions": np.arange(n, dtype="<i4"),
                  "text_index": np.full(n, idx, "<i8")}
        files = {key: atomic_save_npy(root / shard_file_name(idx, key), a, sync_dir=False)
                 for key, a in arrays.items()}
        shards.append({"index": idx, "n_tokens": n, "n_texts": 1, "files": files})
        total += n
    write_manifest(root, {"format": FORMAT, "layers": [0], "d_model": d, "dtype": "bfloat16",
                          "shards": shards, "n_tokens": total})
    return sumsq


def bench_feed(c: dict, d: int, B: int, step_tok_s: float | None, inject: bool,
               tmp: Path) -> tuple[dict, dict]:
    import jax
    import jax.numpy as jnp

    from sae.store import ActivationStore

    n_rows = c["batches"] * B
    ref = write_synthetic_cache(tmp / "cache", n_rows, d, rows_per_shard=4 * B)
    store = ActivationStore(tmp / "cache", layer=0, batch_size=B, seed=0, verify="size")
    sumsq = jax.jit(lambda x: jnp.sum(jnp.square(x.astype(jnp.float32))))

    def epoch():
        sums, rows = [], 0
        for i, x in enumerate(store):
            if inject and i == 0:
                continue  # injected: the consumer loses a batch
            sums.append(sumsq(x))
            rows += x.shape[0]
        return float(np.sum(np.asarray(jax.block_until_ready(sums), np.float64))), rows

    epoch()  # warm-up: page cache, compile of the checksum
    t0 = time.perf_counter()
    got, rows = epoch()
    wall = time.perf_counter() - t0
    tok_s = rows / wall
    gb_s = rows * d * 2 / wall / 1e9
    ok = rows == n_rows and abs(got - ref) <= 1e-4 * ref
    ratio = tok_s / step_tok_s if step_tok_s else float("nan")
    row = _row("store -> device", f"{c['batches']} batches of ({B}, {d})", "bfloat16",
               f"{tok_s:,.0f} tok/s ({gb_s:.2f} GB/s)",
               "SAE step consumes " + (f"{step_tok_s:,.0f} tok/s" if step_tok_s else "n/a"),
               ratio, ok, f"rows {rows}/{n_rows}, sum x^2 rel diff {abs(got - ref) / ref:.1e}")
    return row, {"tok_s": tok_s, "ratio": ratio}


# ------------------------------------------------------------------ table
def print_table(rows: list[dict]) -> None:
    cols = ("part", "size", "dtype", "throughput", "ceiling", "fraction", "check")
    cells = [[r["part"], r["size"], r["dtype"], r["throughput"], r["ceiling"],
              "n/a" if not np.isfinite(r["fraction"]) else f"{r['fraction']:.3f}",
              ("ok: " if r["ok"] else "FAIL: ") + r["check"]] for r in rows]
    width = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
    line = lambda xs: "| " + " | ".join(x.ljust(w) for x, w in zip(xs, width)) + " |"  # noqa: E731
    print(line(cols))
    print("|" + "|".join("-" * (w + 2) for w in width) + "|")
    for x in cells:
        print(line(x))


def _parts(s: str) -> tuple[str, ...]:
    names = tuple(p for p in s.split(",") if p)
    bad = [p for p in names if p not in PARTS]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of "
                                         f"{','.join(PARTS)}, got {s!r}")
    return names


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.benchmarks.gpu",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (CPU, seconds)")
    ap.add_argument("--parts", type=_parts, default=PARTS, help="subset of subgm,sae,feed")
    ap.add_argument("--inject-failure", type=_parts, default=(), metavar="PARTS",
                    help="corrupt these parts' inputs so that their correctness checks fail")
    ap.add_argument("--subgm-dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--precision", default="highest",
                    choices=["highest", "high", "default", "tensorfloat32"])
    ap.add_argument("--l1-pass", choices=["one", "two"], default=None,
                    help="SubGM's l1 sub-gradient form (default: the solver's default)")
    ap.add_argument("--subgm-tol", type=cli.pos_float, default=None,
                    help="max final relative error (default 1e-4 float32, 1e-9 float64)")
    a = ap.parse_args(argv)

    import jax

    sizes = SIZES["tiny" if a.tiny else "full"]
    tol = a.subgm_tol if a.subgm_tol is not None else (1e-4 if a.subgm_dtype == "float32"
                                                        else 1e-9)
    dev = jax.devices()[0]
    print(f"device: {dev.platform} {dev.device_kind} x{len(jax.devices())}; jax "
          f"{jax.__version__}; mode={'tiny' if a.tiny else 'full'}", flush=True)
    t_start = time.perf_counter()
    rows, out = [], {}
    _log = lambda part: print(f"  {part} done ({time.perf_counter() - t_start:.0f} s)",  # noqa: E731
                              flush=True)
    if "subgm" in a.parts:
        row, out["subgm"] = bench_subgm(sizes["subgm"], a.subgm_dtype, a.precision, tol,
                                        "subgm" in a.inject_failure, a.tiny, a.l1_pass)
        rows.append(row)
        _log("subgm")
    if "sae" in a.parts:
        row, out["sae"] = bench_sae(sizes["sae"], "sae" in a.inject_failure)
        rows.append(row)
        _log("sae")
    if "feed" in a.parts:
        s = sizes["sae"]
        with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
            row, out["feed"] = bench_feed(sizes["feed"], s["d"], s["batch"],
                                          out.get("sae", {}).get("tok_s"),
                                          "feed" in a.inject_failure, Path(tmp))
        rows.append(row)
        _log("feed")
    wall = time.perf_counter() - t_start
    print_table(rows)
    ok = all(r["ok"] for r in rows)
    print(f"wall {wall:.0f} s (full mode budget: 360 s on one GPU)")
    g = lambda part, k: out.get(part, {}).get(k, float("nan"))  # noqa: E731
    print(f"bench_gpu subgm_iters_per_s={g('subgm', 'ips'):.1f} "
          f"subgm_roofline={g('subgm', 'frac'):.3f} sae_tokens_per_s={g('sae', 'tok_s'):.0f} "
          f"sae_peak_fraction={g('sae', 'frac'):.3f} feed_over_step={g('feed', 'ratio'):.2f} "
          f"checks={'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
