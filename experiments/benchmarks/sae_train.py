"""SAE training throughput: JAX (sae.train) vs a plain PyTorch JumpReLU step, and a vmapped
sweep of 8 SAEs vs 8 sequential runs.

    python -m experiments.benchmarks.sae_train            # CPU config d=384, M=1536, B=4096
    python -m experiments.benchmarks.sae_train --quick    # fewer timed steps
    python -m experiments.benchmarks.sae_train --gpu      # d=2304, M=16384, B=4096, bf16
                                                          # (automatic when a GPU is present)

Work per step: 12·B·d·M FLOPs (forward 2 matmuls, backward 3, counted as 6 matmul-equivalents
of 2·B·d·M, the usual training-FLOP convention). Timings exclude compilation and data loading: the
batches are already on the device; each number is the best of a few timed calls (the CPU
here is shared, so means are noisy). The JAX step is the jitted ``lax.scan`` of
``sae.step.train_step`` that ``sae.train`` runs. The sweep's "sequential" time is 8× the
single-SAE step time, measured interleaved with the sweep's calls in the same process (8
sequential runs of the same step).

The PyTorch step is written here: the same loss (GDM L0 on pre-activations, JumpReLU and step
as autograd Functions with rectangle-kernel pseudo-derivatives), global-norm clip 1.0,
torch.optim.Adam(betas=(0, 0.999)). LAST line:
    tokens_per_s=<x> vs_torch=<ratio> sweep_vs_sequential=<ratio>
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from experiments import cli


def _jax_setup(d, M, B, k, matmul_dtype, n_sae=None):
    import jax
    import jax.numpy as jnp

    import sae
    from sae.loop import make_chunk_fn
    from sae.step import init_state

    cfg = sae.TrainConfig(d_in=d, width=M, batch_size=B, steps_per_call=k, total_steps=10_000,
                        lam=1e-2, lr=7e-5, matmul_dtype=matmul_dtype, progress=False)
    stacked = n_sae is not None
    if stacked:
        hp, seeds = sae.sweep(cfg, lam=np.geomspace(1e-3, 1e-1, n_sae))
        state = jax.jit(jax.vmap(lambda h, kk: init_state(cfg, h, kk)[1]))(
            hp, jax.vmap(jax.random.key)(jnp.asarray(seeds)))
    else:
        hp = sae.HParams.from_config(cfg)
        state = jax.jit(lambda h, kk: init_state(cfg, h, kk)[1])(hp, jax.random.key(0))
    fn = make_chunk_fn(cfg, stacked)
    chunk = jax.random.normal(jax.random.key(1), (k, B, d), jnp.float32) / np.sqrt(d)
    return fn, state, chunk, hp


def time_jax(d, M, B, k, calls, matmul_dtype=None, n_sae=None):
    """Seconds per step of a single SAE (or of a sweep of ``n_sae``): the best of ``calls``
    timed calls after one warm-up call that compiles."""
    return _time_interleaved({"x": (_jax_setup(d, M, B, k, matmul_dtype, n_sae), calls)},
                             k)["x"]


def time_jax_pair(d, M, B, k, calls, matmul_dtype=None, n_sae=8, sweep_calls=1):
    """(single s/step, sweep-of-n_sae s/step), timed interleaved so that both see the same
    machine load; each the best of its timed calls (best-of, not mean: this CPU is shared)."""
    out = _time_interleaved({"single": (_jax_setup(d, M, B, k, matmul_dtype), calls),
                             "sweep": (_jax_setup(d, M, B, k, matmul_dtype, n_sae),
                                       sweep_calls)}, k)
    return out["single"], out["sweep"]


def _time_interleaved(runs, k):
    import jax

    states, best = {}, {}
    for name, ((fn, state, chunk, hp), _) in runs.items():  # warm-up: compile
        state, _, _ = fn(state, chunk, hp)
        states[name] = jax.block_until_ready(state)
        best[name] = float("inf")
    for r in range(max(n for _, n in runs.values())):
        for name, ((fn, _, chunk, hp), n_calls) in runs.items():
            if r >= n_calls:
                continue
            t0 = time.perf_counter()
            state, _, _ = fn(states[name], chunk, hp)
            states[name] = jax.block_until_ready(state)
            best[name] = min(best[name], time.perf_counter() - t0)
    return {name: b / k for name, b in best.items()}


def time_torch(d, M, B, steps):
    """Seconds per step of a plain PyTorch JumpReLU SAE step on the CPU."""
    import torch

    class JumpReLU(torch.autograd.Function):
        @staticmethod
        def forward(ctx, z, theta, eps):
            ctx.save_for_backward(z, theta)
            ctx.eps = eps
            return z * (z > theta)

        @staticmethod
        def backward(ctx, g):
            z, theta = ctx.saved_tensors
            eps = ctx.eps
            k = ((z - theta).abs() < eps / 2).to(z.dtype)
            return g * (z > theta), (-(theta / eps) * k * g).sum(0), None

    class Step(torch.autograd.Function):
        @staticmethod
        def forward(ctx, z, theta, eps):
            ctx.save_for_backward(z, theta)
            ctx.eps = eps
            return (z > theta).to(z.dtype)

        @staticmethod
        def backward(ctx, g):
            z, theta = ctx.saved_tensors
            eps = ctx.eps
            k = ((z - theta).abs() < eps / 2).to(z.dtype)
            return torch.zeros_like(z), (-(1.0 / eps) * k * g).sum(0), None

    torch.manual_seed(0)
    w_dec = torch.nn.functional.normalize(torch.rand(M, d) * 2 - 1, dim=1)
    W_dec = torch.nn.Parameter(w_dec.clone())
    W_enc = torch.nn.Parameter(w_dec.T.clone().contiguous())
    b_enc = torch.nn.Parameter(torch.zeros(M))
    b_dec = torch.nn.Parameter(torch.zeros(d))
    theta = torch.nn.Parameter(torch.full((M,), 1e-3))
    params = [W_enc, W_dec, b_enc, b_dec, theta]
    opt = torch.optim.Adam(params, lr=7e-5, betas=(0.0, 0.999), eps=1e-8)
    x = torch.randn(B, d) / np.sqrt(d)
    eps, lam = 1e-3, 1e-2

    def one():
        pi = (x - b_dec) @ W_enc + b_enc
        f = JumpReLU.apply(pi, theta, eps)
        x_hat = f @ W_dec + b_dec
        mse = ((x - x_hat) ** 2).sum(-1).mean()
        l0 = Step.apply(pi, theta, eps).sum(-1).mean()
        loss = mse + lam * l0
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return loss

    one()
    best = float("inf")
    for _ in range(steps):
        t0 = time.perf_counter()
        one()
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_rate(dtype_name="bfloat16", n=8192, reps=10):
    """Measured dense matmul FLOP/s of the default device for one dtype."""
    import jax
    import jax.numpy as jnp

    dt = getattr(jnp, dtype_name)
    a = jax.random.normal(jax.random.key(0), (n, n), dt)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(reps):
        out = f(a)
    out.block_until_ready()
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer timed steps")
    ap.add_argument("--gpu", action="store_true", help="GPU config (auto if a GPU is present)")
    ap.add_argument("--cpu", action="store_true", help="force the CPU config")
    ap.add_argument("--d", type=cli.pos_int)
    ap.add_argument("--width", type=cli.pos_int)
    ap.add_argument("--batch", type=cli.pos_int, default=4096)
    ap.add_argument("--k", type=cli.pos_int, default=None, help="steps scanned per jitted call")
    ap.add_argument("--n-sae", type=cli.pos_int, default=8)
    ap.add_argument("--no-torch", action="store_true")
    a = ap.parse_args(argv)

    import jax

    on_gpu = (a.gpu or jax.default_backend() == "gpu") and not a.cpu
    d = a.d or (2304 if on_gpu else 384)
    M = a.width or (16384 if on_gpu else 1536)
    B = a.batch
    mm = "bfloat16" if on_gpu else None
    k = a.k or (8 if on_gpu else 2)
    calls = (2 if a.quick else 3) if not on_gpu else (5 if a.quick else 20)
    flops = 12 * B * d * M
    dev = jax.devices()[0]
    print(f"device: {dev.platform} {getattr(dev, 'device_kind', '')} | d={d} M={M} B={B} "
          f"matmul={mm or 'float32'} | steps/call={k}", flush=True)

    n = a.n_sae
    sw_calls = calls  # same number of timed calls: best-of-n is biased by n otherwise
    t_jax, t_sweep = time_jax_pair(d, M, B, k, calls, mm, n_sae=n, sweep_calls=sw_calls)
    tok_s = B / t_jax
    print(f"jax single   : {t_jax * 1e3:9.1f} ms/step  {tok_s:12,.0f} tok/s  "
          f"{flops / t_jax / 1e12:7.3f} TFLOP/s", flush=True)
    if on_gpu:
        peak = matmul_rate("bfloat16", n=8192 if jax.default_backend() != "cpu" else 1024)
        print(f"bf16 matmul ceiling (measured): {peak / 1e12:.1f} TFLOP/s → fraction "
              f"{flops / t_jax / peak:.2f}", flush=True)

    vs_torch = float("nan")
    if not a.no_torch and not on_gpu:
        t_torch = time_torch(d, M, B, 3 if a.quick else 6)
        vs_torch = t_torch / t_jax
        print(f"torch single : {t_torch * 1e3:9.1f} ms/step  {B / t_torch:12,.0f} tok/s  "
              f"{flops / t_torch / 1e12:7.3f} TFLOP/s", flush=True)

    ratio = n * t_jax / t_sweep
    print(f"jax sweep x{n}: {t_sweep * 1e3:9.1f} ms/step  {n * B / t_sweep:12,.0f} SAE·tok/s  "
          f"(8 sequential: {n * t_jax * 1e3:.1f} ms/step)", flush=True)
    print(f"tokens_per_s={tok_s:.0f} vs_torch={vs_torch:.2f} sweep_vs_sequential={ratio:.2f}")


if __name__ == "__main__":
    main()
