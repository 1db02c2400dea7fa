"""Scaling grid (the data-size × dictionary-size experiment of Hu et al., "Towards atoms of large
language models"): data size |M| × dictionary size |D| → R² heat maps, in-sample AND held out.

    python -m experiments.atoms.scaling [--cache-dir DIR] [--layer 1]
        [--M 500,2000,8000,32000] [--D-mult 1,2,4,8,16] [--variant tied|whitened|euclid]
        [--steps 600] [--plateau-window 0]

Uses an existing activation cache (``experiments.atoms.run`` writes one; by default the
embedded MiniLM is cached to results/atoms/cache if missing). For each |M| the first |M|
train rows are used (S̃ from those rows too); held-out rows: the last ``eval_frac`` of the
cache. Each cell trains one SAE of width |D| = mult·H by ``sae.train`` (Anthropic recipe)
for a fixed number of steps (so small |M| means more epochs; RECONSTRUCTED — the paper's
per-cell budget is not public), or until its training loss plateaus (``sae.loop.Plateau``,
``steps`` the cap). Each cell reports R² on its own training rows (``r2_train``, in-sample)
and on the held-out rows (``r2``): the grid crosses |D| = |M| so memorisation — a dictionary
with more atoms than training rows can give each row its own atom — shows up as in-sample
R² → 1 without held-out R² following.

Cells run |D|-major: every |M| of one |D| reuses the one jitted train step (``sae.train``
caches it by its static config, which is identical across |M|: same width, batch size and
steps), so the grid compiles the step once per |D|; the backend compile count and time are
measured per |D| (``jax.monitoring``) and stored in the JSON.

Paper: |D| in steps of 4H (9216 for Gemma2-2B) up to ~1.9B activations; R² ~0.6–0.8 until
|D| passes a critical value tied to |M|, then ≈ 1. Writes results/atoms/scaling.{json,png}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from experiments import cli
from experiments.common import atomic_write_bytes, save_fig
from sae import atoms as at

_COMPILES = {"n": 0, "seconds": 0.0}
_LISTENING = []


def _listen_compiles() -> dict:
    """Count XLA backend compiles of this process (a process-wide jax.monitoring listener,
    registered once)."""
    if not _LISTENING:
        import jax
        from jax._src import dispatch

        def on_event(event, duration, **kw):
            if event == dispatch.BACKEND_COMPILE_EVENT:
                _COMPILES["n"] += 1
                _COMPILES["seconds"] += float(duration)

        jax.monitoring.register_event_duration_secs_listener(on_event)
        _LISTENING.append(on_event)
    return _COMPILES


def cell_config(H: int, width: int, *, variant: str, lam: float, steps: int, batch_size: int,
                seed: int = 0, lam_warmup_steps: int | None = None, steps_per_call: int = 1):
    """The ``sae.TrainConfig`` of one grid cell (Anthropic recipe). It does not depend on |M|,
    so every |M| of one |D| shares the jitted train step."""
    from sae import TrainConfig

    kw = {} if lam_warmup_steps is None else {"lam_warmup_steps": lam_warmup_steps}
    return TrainConfig(d_in=H, width=width, recipe="anthropic", lam=lam,
                       arch="tied" if variant == "tied" else "jumprelu", total_steps=steps,
                       batch_size=batch_size, progress=False, seed=seed,
                       steps_per_call=steps_per_call, **kw)


def r2_cell(x_train, x_eval, aip, width, *, variant="tied", lam=1.0, steps=400,
            batch_size=256, seed=0, n_r2: int = 4096, lam_warmup_steps=None,
            plateau=None) -> dict:
    """One SAE trained by ``sae.train`` on ``x_train`` (Anthropic recipe): "tied" (AIP-tied,
    whitened inputs), "whitened" (untied, whitened inputs) or "euclid". Returns R² and mean L0
    on the first ``n_r2`` rows of ``x_eval`` (``r2``, ``l0``) and of ``x_train`` (``r2_train``,
    ``l0_train``: in-sample), and the steps run."""
    from sae import train

    whitened = variant in ("tied", "whitened")
    xin = np.asarray(at.whiten(x_train, aip)) if whitened else x_train
    spc = plateau.window if plateau is not None and plateau.window <= 50 else 1
    cfg = cell_config(x_train.shape[1], width, variant=variant, lam=lam, steps=steps,
                      batch_size=min(batch_size, x_train.shape[0]), seed=seed,
                      lam_warmup_steps=lam_warmup_steps, steps_per_call=spc)
    res = train(xin, cfg, plateau=plateau)
    out = {"steps_run": int(res.steps), "stop": res.stop}
    for tag, xx in (("", x_eval[:n_r2]), ("_train", x_train[:n_r2])):
        u = at.sae_units(res.params, xx, lambda p, z: res.encode(z), aip=aip,
                         whitened=whitened)
        out["r2" + tag] = float(at.r2(xx, u["x_hat"]))
        out["l0" + tag] = float((u["codes"] != 0).sum(1).mean())
    return out


def run_scaling(x, *, M_sizes, D_mults, variant="tied", lam=1.0, steps=400, eval_frac=0.2,
                batch_size=256, n_r2=4096, lam_warmup_steps=None, plateau=None, seed=0,
                log=print) -> dict:
    """The |M| × |D| grid on one layer's rows x (n, H) in cache order (see the module
    docstring). Returns lists indexed [i_M][j_D]: r2 (held out), r2_train (in-sample), l0,
    l0_train, steps_run; plus per-|D| compile counts/times in ``compiles``."""
    from sae import loop

    n, H = x.shape
    n_eval = int(round(eval_frac * n))
    x_tr_all, x_eval = x[: n - n_eval], x[n - n_eval:]
    M_sizes = [m for m in M_sizes if m <= x_tr_all.shape[0]]
    if not M_sizes:
        raise ValueError(f"M_sizes: all exceed the {x_tr_all.shape[0]} train rows available")
    B = min(batch_size, min(M_sizes))  # one batch size for every cell: one config per |D|
    shape = (len(M_sizes), len(D_mults))
    grids = {k: np.full(shape, np.nan) for k in ("r2", "r2_train", "l0", "l0_train",
                                                 "steps_run", "seconds", "backend_compiles",
                                                 "compile_seconds")}
    aips = {}
    for M in M_sizes:
        mom = at.second_moment(x_tr_all[:M])
        try:
            aips[M] = at.aip_from_moment(mom, ridge=0.0 if M > 4 * H else 1e-6)
        except ValueError:  # rank-deficient layer: pseudo-inverse (as the pipeline does)
            aips[M] = at.aip_from_moment(mom, singular="pinv")
    counter = _listen_compiles()
    compiles = []
    for j, m in enumerate(D_mults):
        c0, t0c, tD = counter["n"], counter["seconds"], time.perf_counter()
        for i, M in enumerate(M_sizes):
            t, c1, t1c = time.perf_counter(), counter["n"], counter["seconds"]
            r = r2_cell(x_tr_all[:M], x_eval, aips[M], m * H, variant=variant, lam=lam,
                        steps=steps, batch_size=B, seed=seed, n_r2=n_r2,
                        lam_warmup_steps=lam_warmup_steps, plateau=plateau)
            for k in ("r2", "r2_train", "l0", "l0_train", "steps_run"):
                grids[k][i, j] = r[k]
            grids["seconds"][i, j] = time.perf_counter() - t
            grids["backend_compiles"][i, j] = counter["n"] - c1
            grids["compile_seconds"][i, j] = counter["seconds"] - t1c
            log(f"|M|={M} |D|={m}H={m * H}: R² held-out {r['r2']:.4f} in-sample "
                f"{r['r2_train']:.4f}, L0 {r['l0']:.1f} / {r['l0_train']:.1f}, "
                f"{r['steps_run']} steps ({r['stop']}), {grids['seconds'][i, j]:.1f}s, "
                f"{counter['n'] - c1} backend compiles ({counter['seconds'] - t1c:.1f}s)")
        cfg = cell_config(H, m * H, variant=variant, lam=lam, steps=steps, batch_size=B,
                          seed=seed, lam_warmup_steps=lam_warmup_steps,
                          steps_per_call=(plateau.window if plateau is not None
                                          and plateau.window <= 50 else 1))
        step_fn = loop.make_chunk_fn(cfg)
        rec = {"D_mult": m, "backend_compiles": counter["n"] - c0,
               "compile_seconds": counter["seconds"] - t0c,
               "train_step_compiles": int(step_fn._cache_size()),
               "seconds": time.perf_counter() - tD}
        compiles.append(rec)
        log(f"|D|={m}H: {rec['train_step_compiles']} train-step compile(s) for "
            f"{len(M_sizes)} |M| cells; {rec['backend_compiles']} backend compiles in all "
            f"({rec['compile_seconds']:.1f}s of {rec['seconds']:.0f}s)")
    return {"M": M_sizes, "D_mult": list(D_mults), "H": H, "variant": variant, "lam": lam,
            "steps": steps, "batch_size": B, "n_r2": n_r2, "n_eval_rows": int(x_eval.shape[0]),
            "lam_warmup_steps": lam_warmup_steps,
            "plateau": None if plateau is None else plateau._asdict(),
            **{k: v.tolist() for k, v in grids.items()}, "compiles": compiles}


def plot(res, path):
    """Two heat maps on one colour scale: in-sample R² (training rows of each cell) and
    held-out R²; cells with |D| ≥ |M| (more atoms than training rows) are marked †."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("r2_train", "in-sample R² (training rows)"), ("r2", "held-out R²")]
    if "r2_train" not in res:
        panels = panels[1:]
    lo = 0.0  # colour scale [0, 1] so the in-sample / held-out gap near 1 stays visible;
    # negative R² cells take the lowest colour (their values are printed in the cells)
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (k, title) in zip(axes[0], panels):
        R2 = np.asarray(res[k])
        im = ax.imshow(R2, origin="lower", cmap="viridis", vmin=lo, vmax=1.0)
        ax.set_xticks(range(len(res["D_mult"])), [f"{m}H" for m in res["D_mult"]])
        ax.set_yticks(range(len(res["M"])), [str(m) for m in res["M"]])
        ax.set_xlabel(f"|D| (H={res['H']})")
        ax.set_ylabel("|M| (train activations)")
        for i, M in enumerate(res["M"]):
            for j, m in enumerate(res["D_mult"]):
                mark = "†" if m * res["H"] >= M else ""
                ax.text(j, i, f"{R2[i, j]:.3f}{mark}", ha="center", va="center", color="w",
                        fontsize=7)
        ax.set_title(f"{title} ({res['variant']})", fontsize=9)
        fig.colorbar(im, ax=ax, label="R²", extend="min")
    fig.suptitle(f"{res['steps']} steps × {res.get('batch_size', '?')} rows per cell; "
                 "† = |D| ≥ |M|", fontsize=8)
    fig.tight_layout()
    save_fig(fig, path, dpi=110, bbox_inches=None)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m experiments.atoms.scaling",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--cache-dir", default="results/atoms/cache")
    ap.add_argument("--layer", type=cli.nonneg_int, default=1)
    ap.add_argument("--M", type=cli.pos_ints, default=[500, 2000, 8000, 32000])
    ap.add_argument("--D-mult", type=cli.pos_ints, default=[1, 2, 4, 8, 16])
    ap.add_argument("--variant", default="tied", choices=["tied", "whitened", "euclid"])
    ap.add_argument("--lam", type=cli.pos_float, default=1.0)
    ap.add_argument("--steps", type=cli.pos_int, default=600)
    ap.add_argument("--batch-size", type=cli.pos_int, default=256)
    ap.add_argument("--n-r2", type=cli.pos_int, default=4096,
                    help="rows (held-out and in-sample) each R² uses")
    ap.add_argument("--lam-warmup-steps", type=cli.nonneg_int, default=None)
    ap.add_argument("--plateau-window", type=cli.nonneg_int, default=0,
                    help="> 0: stop each cell at the plateau of its training loss")
    ap.add_argument("--plateau-tol", type=cli.nonneg_float, default=1e-3)
    ap.add_argument("--max-tokens", type=cli.pos_int, default=200_000)
    ap.add_argument("--out", default="results/atoms")
    a = ap.parse_args(argv)
    from experiments.atoms.pipeline import AtomsConfig, cache, git_state, layer_data
    from sae.loop import Plateau

    if not os.path.exists(os.path.join(a.cache_dir, "manifest.json")):
        cache(AtomsConfig(layers=(a.layer,), max_tokens=a.max_tokens), a.cache_dir)
    git = git_state()  # the code this run starts with (HEAD may move while it runs)
    x = layer_data(a.cache_dir, a.layer, a.max_tokens)
    plateau = None
    if a.plateau_window > 0:
        plateau = Plateau(window=a.plateau_window, tol=a.plateau_tol,
                          min_steps=a.steps if a.lam_warmup_steps is None
                          else a.lam_warmup_steps)
    res = run_scaling(x, M_sizes=a.M, D_mults=a.D_mult, variant=a.variant, lam=a.lam,
                      steps=a.steps, batch_size=a.batch_size, n_r2=a.n_r2,
                      lam_warmup_steps=a.lam_warmup_steps, plateau=plateau,
                      log=lambda m: print(m, flush=True))
    res.update(layer=a.layer, n_rows=int(x.shape[0]), git=git,
               command="python -m experiments.atoms.scaling " + " ".join(
                   sys.argv[1:] if argv is None else argv))
    os.makedirs(a.out, exist_ok=True)
    atomic_write_bytes(os.path.join(a.out, "scaling.json"), json.dumps(res, indent=1).encode())
    plot(res, os.path.join(a.out, "scaling.png"))
    print(f"wrote {a.out}/scaling.json scaling.png")
    return res


if __name__ == "__main__":
    main()
