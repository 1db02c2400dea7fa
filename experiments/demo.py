"""`make demo`: a fast end-to-end slice of both papers.

    python -m experiments.demo [--out results/demo] [--seeds 5] [--skip-atoms]

1. SubGM (Ma & Fattahi), Fig. 1b at full size in float64: p ∈ {0, 0.2, 0.4, 0.6}, r' = 20,
   several seeds, vmapped over p → results/demo/fig1b.png.
2. Atoms (Hu et al.): a small slice of `experiments.atoms.run` on the embedded MiniLM model
   (when its module is present) → results/demo/atoms/.
Everything measured is collected in results/demo/summary.json.
"""
from __future__ import annotations

import argparse
import importlib.util
import time

import numpy as np

from experiments import cli, common


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/demo")
    ap.add_argument("--seeds", type=cli.pos_int, default=5,
                    help="seeds of Fig. 1b (paper: 5; fewer is marked as a reduced run)")
    ap.add_argument("--skip-atoms", action="store_true")
    args = ap.parse_args(argv)
    out = common.out_dir(root=args.out)
    t0 = time.time()
    summary: dict = {}

    print("== [1/2] SubGM, Fig. 1b (d=20, r=3, m=500, r'=20, outliers N(0,100)) ==", flush=True)
    from experiments.subgm import fig1b

    data = fig1b.main(["--seeds", str(args.seeds), "--out", str(out)])
    summary["fig1b"] = {
        "p": data["p"],
        "final_fro_error_median": [float(np.median(f)) for f in data["final"]],
        "final_fro_error_max": [float(np.max(f)) for f in data["final"]],
        "seeds": args.seeds, "wall_s": data["wall_s"], "settings": data["settings"],
    }

    if not args.skip_atoms and importlib.util.find_spec("experiments.atoms.demo") is not None:
        print("== [2/2] Atoms slice (all-MiniLM-L6-v2, embedded) ==", flush=True)
        from experiments.atoms import demo as atoms_demo

        t1 = time.time()
        summary["atoms"] = atoms_demo.run_demo(str(out / "atoms"))
        summary["atoms_wall_s"] = time.time() - t1
    summary["total_wall_s"] = time.time() - t0
    common.save_json(out / "summary.json", summary)
    print(f"== demo done in {summary['total_wall_s']:.0f}s; summary: {out / 'summary.json'} ==")
    return summary


if __name__ == "__main__":
    main()
