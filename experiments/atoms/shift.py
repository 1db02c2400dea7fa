"""Representation-shift plots from an existing cache: ``python -m experiments.atoms.shift``.

Per layer: pairwise-angle histograms of activations, Euclidean vs AIP, with the controls of
``sae.atoms.representation_shift`` (N(0,I); N(0,E[xxᵀ]); N(x̄,Cov); and — if
``units_layer{L}.npz`` from ``experiments.atoms.run`` is in --units-dir — the Euclidean
SAE's atoms). S̃ from the first 80% of the rows, angles on the last 20% (as in run.py).
Writes shift.json and shift.png.
"""
from __future__ import annotations

import argparse
import json
import os

import jax
import numpy as np

from experiments import cli
from experiments.common import atomic_write_bytes
from sae import atoms as at


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m experiments.atoms.shift",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--cache-dir", default="results/atoms/cache")
    ap.add_argument("--units-dir", default="results/atoms")
    ap.add_argument("--layers", type=cli.nonneg_ints, default=None,
                    help="comma list (default: every cached layer)")
    ap.add_argument("--n-pairs", type=cli.pos_int, default=20_000)
    ap.add_argument("--ridge", type=cli.nonneg_float, default=0.0)
    ap.add_argument("--out", default="results/atoms")
    a = ap.parse_args(argv)
    from sae.activations import read_manifest

    from experiments.atoms.pipeline import _plots, layer_data

    man = read_manifest(a.cache_dir)
    layers = man["layers"] if a.layers is None else a.layers
    out = {"layers": []}
    for layer in layers:
        x = layer_data(a.cache_dir, layer)
        n_eval = int(round(0.2 * x.shape[0]))
        mom = at.second_moment(x[:-n_eval])
        try:
            aip = at.aip_from_moment(mom, ridge=a.ridge)
        except ValueError:  # rank-deficient layer: pseudo-inverse (as run.py does)
            aip = at.aip_from_moment(mom, singular="pinv")
        f = os.path.join(a.units_dir, f"units_layer{layer}.npz")
        W = np.load(f)["D_features"].T if os.path.exists(f) else None
        rs = at.representation_shift(x[-n_eval:], aip, key=jax.random.key(layer),
                                     n_pairs=a.n_pairs, W_dec_euclid=W)
        out["layers"].append({"layer": layer, "aip_cond": aip.cond, "representation_shift": rs})
        print(f"layer {layer}: " + "; ".join(
            f"{k} {v['euclid']['mean']:.1f}→{v['aip']['mean']:.1f}°" for k, v in rs.items()))
    os.makedirs(a.out, exist_ok=True)
    atomic_write_bytes(os.path.join(a.out, "shift.json"), json.dumps(out).encode())
    # reuse the run's angle plot (rows of the table are not needed for it)
    import matplotlib

    matplotlib.use("Agg")
    import shutil
    import tempfile
    from pathlib import Path

    tmp = Path(tempfile.mkdtemp(prefix="shift_plot_"))  # never clobber run.py's angles.png
    res = {"layers": [dict(L, rows={}) for L in out["layers"]]}
    try:
        _plots(res, tmp)
    except (IndexError, KeyError, ValueError):
        pass
    if (tmp / "angles.png").exists():
        atomic_write_bytes(os.path.join(a.out, "shift.png"), (tmp / "angles.png").read_bytes())
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {a.out}/shift.json shift.png")
    return out


if __name__ == "__main__":
    main()
