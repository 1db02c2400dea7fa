"""A small slice of the atoms pipeline for ``make demo`` (≤ 5 min on a 2-core CPU).

Embedded all-MiniLM-L6-v2, one layer (3), ~3k tokens of the offline default corpus,
4× over-complete SAEs (width 1536), a vmapped sweep of 2 λ values × 3 unit variants
(features, atoms_whitened, atoms_tied), 300 steps each; then the units table, and the
latents page of the selected features SAE (``latents/latents.html``, by ``sae.inspect``).
Measured: 35 s (λ 0.3, 1) on a quiet 2-core CPU, 177 s under load 8; 500 steps took 241 s
under load 4.5, hence 300.

    python -m experiments.atoms.demo [--out results/atoms_demo]
"""
from __future__ import annotations

import argparse
import json
import time

from experiments.atoms.pipeline import AtomsConfig, run_pipeline

DEMO_CONFIG = dict(layers=(3,), max_tokens=3000, lams=(1.0, 3.0), steps=300, batch_size=256,
                   n_pairs=5000, n_bp=128, bp_iter=300, n_supports=128, max_eval=1024)


def run_demo(out_dir: str) -> dict:
    """Run the slice, write table.md / table.json / plots under ``out_dir``; return a summary
    dict {unit: {r2, l0_mean, q_star, uniqueness_atoms, l1_exact_support}, seconds, …}."""
    t0 = time.perf_counter()
    cfg = AtomsConfig(**DEMO_CONFIG)
    res = run_pipeline(cfg, out_dir, log=lambda m: print("  " + m, flush=True),
                       command="experiments.atoms.demo.run_demo (MiniLM layer 3, 3k tokens)")
    L = res["layers"][0]
    rs = L["representation_shift"]["activations"]
    summary = {
        "model": res["model"], "layer": L["layer"], "n_train": L["n_train"],
        "n_eval": L["n_eval"], "aip_cond": L["aip_cond"],
        "angle_mean_euclid": rs["euclid"]["mean"], "angle_mean_aip": rs["aip"]["mean"],
        "units": {n: {k: r.get(k) for k in ("r2", "r2_aip", "l0_mean", "q_star",
                                            "uniqueness_atoms", "l1_exact_support")}
                  for n, r in L["rows"].items()},
        "seconds": time.perf_counter() - t0, "out_dir": out_dir,
    }
    # browsable latents of the selected features SAE: density histogram, top activations
    # with context, one static HTML page (sae.inspect)
    import os

    import numpy as np

    from sae.inspect import inspect_latents

    params = dict(np.load(os.path.join(out_dir, f"sae_features_layer{L['layer']}.npz")))
    doc = inspect_latents(params, os.path.join(out_dir, "cache"), L["layer"],
                          os.path.join(out_dir, "latents"), n_latents=20, top_k=10,
                          sae_name=f"features SAE, MiniLM layer {L['layer']}", progress=False)
    summary["latents_html"] = doc["files"]["html"]
    return summary


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m experiments.atoms.demo",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/atoms_demo", help="output folder")
    a = ap.parse_args(argv)
    summary = run_demo(a.out)
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
