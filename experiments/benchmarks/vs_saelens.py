"""``sae.train`` against SAELens's own trainer (the PyTorch peer, SAELens 6.x,
https://github.com/decoderesearch/SAELens) on the same cached activations, same recipe.

Data: the residual stream after block ``--layer`` of all-MiniLM-L6-v2 (H = 384, embedded
model ``"minilm"``) over the built-in offline corpus (``sae.default_corpus``: stdlib
docstrings), cached once by ``sae.cache_activations`` into ``results/vs_saelens/`` and reused
(``--tokens`` rows). The last ``--heldout`` fraction of rows (the last texts) is held out;
the training rows are shuffled once (seed 0) into one fixed sequence of ``(B, H)`` batches
that BOTH trainers consume in the same order: SAELens's ``SAETrainer`` first consumes
``scale_batches`` batches to estimate its input scale, so its data provider replays those
first and then restarts the sequence — both estimate c = √H / E‖x‖ on the same 8 batches
and train on identical batches.

Recipe (identical on both sides; SAELens name in brackets): JumpReLU, width 4H, L0 penalty
(Rajamanoharan et al. 2024, arXiv:2407.14435) [``jumprelu_sparsity_loss_mode="step"``], STE
into θ only [``jumprelu_ste_to_input=False``], bandwidth ε [``jumprelu_bandwidth``], θ0
[``jumprelu_init_threshold``], λ [``l0_coefficient``] warmed linearly over
``lam_warmup_steps`` [``l0_warm_up_steps``], lr with a linear warm-up [``lr_warm_up_steps``],
constant after, Adam(β1, β2, eps 1e-8) [``adam_beta1/2``], global grad-norm clip 1.0 (fixed in
SAELens), inputs scaled to E‖x‖ = √H and the scale folded back at the end
[``normalize_activations="expected_average_only_in"``], unit-norm decoder rows at init with
W_enc = W_decᵀ [``decoder_init_norm=1.0``], zero biases, raw θ clamped ≥ 0.

Runs: (1) one SAE each — SAELens's ``SAETrainer.fit()`` fed by an iterator of activation
batches (its documented entry point for a custom activation source; the LLM runner needs a
TransformerLens model) vs ``sae.train``; (2) a 4-λ sweep — 4 sequential SAELens runs vs one
vmapped ``sae.train(..., sweep=sae.sweep(cfg, lam=[...]))``. Timings are wall-clock of the
whole training call (scale estimate, our JIT compile included), interleaved over
``--repeats`` rounds, best kept. Evaluation on the held-out rows, one code path for both
(weights read back through ``sae.io.load_saelens`` for SAELens, and SAELens's own forward is
checked against it): explained variance 1 − Σ‖x − x̂‖² / Σ‖x − x̄‖², mean L0, and the fraction of
latents that never fire on the held-out rows.

Run: ``python -m experiments.benchmarks.vs_saelens`` (``--quick``: a synthetic smoke run in
well under a minute). Writes ``results/benchmarks/vs_saelens.json`` and ``.png`` (L0–EV
frontier). LAST printed line::

    speed_vs_saelens=<x> sweep4_vs_saelens=<x> ev_delta=<x> l0_ratio=<x>

speed = our single-run tokens/s ÷ SAELens's; sweep4 = SAELens's 4-run wall time ÷ our sweep's;
ev_delta = our held-out EV − SAELens's (single run, same step count); l0_ratio = our held-out
L0 ÷ SAELens's.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402

OUT = os.path.join("results", "benchmarks")


def load_activations(args) -> np.ndarray:
    """(N, H) float32 rows of the MiniLM cache (built on first use, then reused)."""
    from sae import cache_activations, default_corpus
    from sae.store import ActivationStore

    folder = os.path.join("results", "vs_saelens", f"minilm_l{args.layer}")
    t = time.perf_counter()
    m = cache_activations("minilm", default_corpus(), folder, layers=[args.layer],
                          context_length=256, batch_size=32, max_tokens=args.tokens,
                          progress=False)
    print(f"cache: {m['n_tokens']} tokens of MiniLM layer {args.layer} in {folder} "
          f"({time.perf_counter() - t:.1f}s; reused when present)")
    store = ActivationStore(folder, layer=args.layer, batch_size=4096, shuffle=False,
                            drop_last=False, verify="none")
    x = np.concatenate([np.asarray(b, np.float32) for b in store])
    return x[:args.tokens]


def synthetic(n=6000, d=32, seed=0) -> np.ndarray:
    """--quick data: sparse non-negative mixtures of 4d random unit directions plus noise."""
    r = np.random.default_rng(seed)
    D = r.normal(size=(4 * d, d))
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    codes = r.exponential(size=(n, 4 * d)) * (r.random((n, 4 * d)) < 0.05)
    return (codes @ D + 0.05 * r.normal(size=(n, d)) + 1.0).astype(np.float32)


class Batches:
    """The fixed batch sequence: ``batch(t)`` = rows ``perm[t·B:(t+1)·B]`` of one shuffled
    epoch after another (seed 0), as a float32 (B, d) array."""

    def __init__(self, x, batch_size, seed=0):
        self.x, self.B = x, batch_size
        self.per_epoch = len(x) // batch_size
        if self.per_epoch < 1:
            raise ValueError(f"batch_size={batch_size} exceeds the {len(x)} training rows")
        self.rng = np.random.default_rng(seed)
        self.perms: list = []

    def batch(self, t):
        e, i = divmod(t, self.per_epoch)
        while len(self.perms) <= e:
            self.perms.append(self.rng.permutation(len(self.x)))
        return self.x[self.perms[e][i * self.B:(i + 1) * self.B]]

    def numpy_iter(self, n):
        return (self.batch(t) for t in range(n))


def ours_config(args, d, lam):
    import sae

    return sae.TrainConfig(d_in=d, width=args.expansion * d, arch="jumprelu", recipe="gdm",
                           lam=lam, lr=args.lr, eps=args.eps, theta_init=args.theta_init,
                           total_steps=args.steps, batch_size=args.batch,
                           lr_warmup_steps=args.lr_warmup, lam_warmup_steps=args.lam_warmup,
                           lr_decay_frac=0.0, b1=args.b1, b2=args.b2, clip_norm=1.0,
                           log_theta=False, decoder_norm="none",  # as SAELens trains
                           input_scaling="sqrt_d", scale_batches=args.scale_batches,
                           steps_per_call=args.steps_per_call, log_every=args.steps,
                           progress=False, seed=0)


def run_ours(args, batches, d, lams):
    """One sae.train call (a vmapped sweep when len(lams) > 1). Returns (wall s, params list)."""
    import sae

    cfg = ours_config(args, d, lams[0])
    sweep = sae.sweep(cfg, lam=list(lams)) if len(lams) > 1 else None
    t = time.perf_counter()
    res = sae.train(batches.numpy_iter(args.steps + args.scale_batches), cfg, sweep=sweep)
    wall = time.perf_counter() - t
    ps = [res.sae_params(i) for i in range(len(lams))] if sweep else [res.params]
    return wall, [{k: np.asarray(v) for k, v in p.items()} for p in ps]


def run_saelens(args, batches, d, lam, seed=0):
    """SAELens's SAETrainer.fit() on the same batches. Returns (wall s, params, model)."""
    import torch
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    from sae import io

    torch.manual_seed(seed)
    model = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(
        d_in=d, d_sae=args.expansion * d, jumprelu_init_threshold=args.theta_init,
        jumprelu_bandwidth=args.eps, jumprelu_sparsity_loss_mode="step",
        jumprelu_ste_to_input=False, l0_coefficient=lam, l0_warm_up_steps=args.lam_warmup,
        pre_act_loss_coefficient=None, decoder_init_norm=1.0, apply_b_dec_to_input=True,
        normalize_activations="expected_average_only_in", dtype="float32"))
    tcfg = SAETrainerConfig(
        total_training_samples=args.steps * args.batch, train_batch_size_samples=args.batch,
        lr=args.lr, lr_end=args.lr, lr_scheduler_name="constant",
        lr_warm_up_steps=args.lr_warmup, lr_decay_steps=0, adam_beta1=args.b1,
        adam_beta2=args.b2, device="cpu", autocast=False,
        n_batches_for_norm_estimate=args.scale_batches, save_final_checkpoint=False)
    # the scale estimate consumes the first scale_batches batches, then training restarts
    # at batch 0: the same scale and the same training batches as sae.train
    seq = itertools.chain(batches.numpy_iter(args.scale_batches),
                          batches.numpy_iter(args.steps))
    provider = (torch.from_numpy(b) for b in seq)
    t = time.perf_counter()
    SAETrainer(tcfg, model, provider).fit()
    wall = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:  # read back through the tested interop path
        model.save_model(tmp)
        params, cfg = io.load_saelens(tmp)
    assert cfg["normalize_activations"] == "none" and cfg["apply_b_dec_to_input"]
    return wall, params, model


def evaluate(params, x, chunk=8192):
    """Held-out EV, mean L0 and dead fraction (latents that never fire) of a params dict."""
    import jax
    import jax.numpy as jnp

    from sae.model import decode, encode

    p = {k: jnp.asarray(v) for k, v in params.items()}

    @jax.jit
    def part(xb):
        f = encode(p, xb)
        err = xb - decode(p, f)
        return jnp.sum(err * err), jnp.sum(f > 0), jnp.any(f > 0, axis=0)

    sse, nnz, fired = 0.0, 0, None
    for i in range(0, len(x), chunk):
        s, n, fi = part(jnp.asarray(x[i:i + chunk]))
        sse, nnz = sse + float(s), nnz + int(n)
        fired = np.asarray(fi) if fired is None else fired | np.asarray(fi)
    xd = x.astype(np.float64)
    sst = float(np.sum((xd - xd.mean(0)) ** 2))
    return {"ev": 1.0 - sse / sst, "l0": nnz / len(x), "dead_frac": float(1 - fired.mean())}


def check_same_forward(model, params, x):
    """SAELens's own forward on the trained model vs sae.model on the params read back."""
    import torch

    from sae.model import reconstruct

    with torch.no_grad():
        model.eval()
        theirs = model(torch.from_numpy(x)).numpy()
    import jax.numpy as jnp

    ours = np.asarray(reconstruct({k: jnp.asarray(v) for k, v in params.items()},
                                  jnp.asarray(x)))
    return float(np.abs(theirs - ours).max())


def plot(path, rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for who, mk in (("ours", "o-"), ("saelens", "s--")):
        pts = sorted((r["l0"], r["ev"], r["lam"]) for r in rows if r["who"] == who
                     and r["run"] == "sweep")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], mk,
                label={"ours": "sae.train (vmapped sweep)",
                       "saelens": "SAELens SAETrainer (4 runs)"}[who])
        for l0, ev, lam in pts:
            ax.annotate(f"λ={lam:g}", (l0, ev), fontsize=7, xytext=(3, -9),
                        textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("held-out L0")
    ax.set_ylabel("held-out explained variance")
    ax.set_title("JumpReLU, same recipe and batches", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="synthetic 32-d data, tiny run: a smoke test, not a benchmark")
    ap.add_argument("--layer", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=240_000)
    ap.add_argument("--heldout", type=float, default=0.1)
    ap.add_argument("--expansion", type=int, default=4)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--eps", type=float, default=0.05)
    ap.add_argument("--theta-init", type=float, default=0.3)
    ap.add_argument("--lam", type=float, default=0.3, help="λ of the single run")
    ap.add_argument("--lams", type=float, nargs=4, default=[0.03, 0.1, 0.3, 1.0])
    ap.add_argument("--lr-warmup", type=int, default=20)
    ap.add_argument("--lam-warmup", type=int, default=100)
    ap.add_argument("--b1", type=float, default=0.0)
    ap.add_argument("--b2", type=float, default=0.999)
    ap.add_argument("--scale-batches", type=int, default=8)
    ap.add_argument("--steps-per-call", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=1,
                    help="interleaved rounds of every timed run; the best time is kept")
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.batch, args.lam_warmup, args.lr_warmup = 20, 128, 5, 2
        args.scale_batches, args.steps_per_call, args.repeats = 2, 10, 1
        args.lr, args.lam, args.lams = 3e-3, 0.03, [0.01, 0.03, 0.1, 0.3]
    if args.steps % args.steps_per_call:
        ap.error(f"--steps={args.steps} must be a multiple of "
                 f"--steps-per-call={args.steps_per_call}")
    if not 0 < args.heldout < 1:
        ap.error(f"--heldout={args.heldout}: expected a fraction in (0, 1)")
    return args


def main(argv=None):
    args = parse(argv)
    import torch

    x = synthetic() if args.quick else load_activations(args)
    n_hold = max(int(len(x) * args.heldout), 1)
    x_train, x_hold = x[:-n_hold], x[-n_hold:]
    d = x.shape[1]
    print(f"data: {len(x_train)} train rows + {n_hold} held-out rows, d={d}, "
          f"width={args.expansion * d}; torch threads={torch.get_num_threads()}, "
          f"cpu count={os.cpu_count()}")
    print(f"recipe: steps={args.steps} batch={args.batch} lr={args.lr} eps={args.eps} "
          f"theta_init={args.theta_init} lam={args.lam} lams={args.lams} "
          f"lr_warmup={args.lr_warmup} lam_warmup={args.lam_warmup} b1={args.b1} b2={args.b2} "
          f"scale=sqrt_d ({args.scale_batches} batches)")
    tokens = args.steps * args.batch
    best: dict = {}
    results: dict = {}

    def timed(key, fn):
        wall, *rest = fn()
        best[key] = min(best.get(key, np.inf), wall)
        results[key] = rest
        print(f"  {key}: {wall:.1f}s", flush=True)

    for r in range(args.repeats):
        print(f"round {r + 1}/{args.repeats}", flush=True)
        timed("ours_single", lambda: run_ours(args, Batches(x_train, args.batch), d,
                                              [args.lam]))
        timed("saelens_single", lambda: run_saelens(args, Batches(x_train, args.batch), d,
                                                    args.lam))
        timed("ours_sweep", lambda: run_ours(args, Batches(x_train, args.batch), d,
                                             args.lams))
        walls, outs = [], []
        for lam in args.lams:
            w, p, m = run_saelens(args, Batches(x_train, args.batch), d, lam)
            walls.append(w)
            outs.append((p, m))
        best["saelens_sweep"] = min(best.get("saelens_sweep", np.inf), sum(walls))
        results["saelens_sweep"] = outs
        print(f"  saelens_sweep: {sum(walls):.1f}s ({', '.join(f'{w:.1f}' for w in walls)})",
              flush=True)

    rows = []
    p, m = results["saelens_single"]
    fwd_diff = check_same_forward(m, p, x_hold[:2048])
    rows.append({"who": "saelens", "run": "single", "lam": args.lam, **evaluate(p, x_hold)})
    rows.append({"who": "ours", "run": "single", "lam": args.lam,
                 **evaluate(results["ours_single"][0][0], x_hold)})
    for lam, p in zip(args.lams, results["ours_sweep"][0]):
        rows.append({"who": "ours", "run": "sweep", "lam": lam, **evaluate(p, x_hold)})
    for lam, (p, m) in zip(args.lams, results["saelens_sweep"]):
        fwd_diff = max(fwd_diff, check_same_forward(m, p, x_hold[:2048]))
        rows.append({"who": "saelens", "run": "sweep", "lam": lam, **evaluate(p, x_hold)})
    tps = {k: tokens * (len(args.lams) if "sweep" in k else 1) / v for k, v in best.items()}
    print(f"\n{'run':<16}{'λ':>7}{'tokens/s':>11}{'EV':>8}{'L0':>8}{'dead':>7}")
    for r in rows:
        key = f"{r['who']}_{r['run']}"
        print(f"{key:<16}{r['lam']:>7g}{tps[key]:>11.0f}{r['ev']:>8.4f}{r['l0']:>8.1f}"
              f"{r['dead_frac']:>7.3f}")
    print(f"SAELens forward vs sae.model on the weights read back: max|Δx̂| = {fwd_diff:.2e}")
    single = {r["who"]: r for r in rows if r["run"] == "single"}
    speed = tps["ours_single"] / tps["saelens_single"]
    sweep4 = best["saelens_sweep"] / best["ours_sweep"]
    ev_delta = single["ours"]["ev"] - single["saelens"]["ev"]
    l0_ratio = single["ours"]["l0"] / max(single["saelens"]["l0"], 1e-12)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "vs_saelens" + ("_quick" if args.quick else ""))
    plot(stem + ".png", rows)
    with open(stem + ".json", "w") as fh:
        json.dump({"args": vars(args), "best_wall_s": best, "tokens_per_s": tps,
                   "rows": rows, "forward_max_abs_diff": fwd_diff}, fh, indent=2)
    print(f"wrote {stem}.png and {stem}.json")
    print(f"speed_vs_saelens={speed:.2f} sweep4_vs_saelens={sweep4:.2f} "
          f"ev_delta={ev_delta:+.4f} l0_ratio={l0_ratio:.2f}")


if __name__ == "__main__":
    main()
