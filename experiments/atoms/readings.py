"""More readings of Hu et al.'s uniqueness fractions, computed after a run from its saved
units: ``python -m experiments.atoms.readings results/atoms/r3/fixed600``.

The paper's headline fractions (neurons 0.5%, features 68.2%, atoms 99.8% "satisfy the
uniqueness condition") do not state which coherence or which K they use. ``sae.atoms``
implements the per-atom test μ_i < 1/(2K − 1) with μ_i = max_{j≠i} |G_ij| (the classical
mutual-coherence condition, Donoho & Elad 2003) and K from per-sample L0 (table.json holds
those readings for several K). This script adds RECONSTRUCTED alternatives for μ_i, each
evaluated at every K the run recorded:

- ``max``: max_{j≠i}|G_ij| (the default; recomputed as a check against table.json);
- ``p99``: the 99th percentile of |G_ij| over j ≠ i (a "typical worst" coherence);
- ``mean``: the mean of |G_ij| over j ≠ i (average coherence);
each in the AIP (G from S̃) and in the Euclidean metric.

Inputs: ``table.json`` and ``units_layer{L}.npz`` (D_<unit> (H, N) and S) of one run folder;
neurons are D = I. Writes ``readings_extra.json`` and ``readings_extra.md`` there.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import jax.numpy as jnp
import numpy as np

from experiments.common import atomic_write_bytes, save_text
from jaxsense import sparse as sp

MU_KINDS = ("max", "p99", "mean")


def coherences(D, S=None) -> dict:
    """Per-atom μ_i for every kind in ``MU_KINDS`` (D (H, N) atoms as columns; S the metric
    or None for Euclidean). Returns {kind: (N,) float64}."""
    G = np.asarray(sp.normalized_gram(jnp.asarray(D, jnp.float32),
                                      None if S is None else jnp.asarray(S, jnp.float32)),
                   np.float64)
    N = G.shape[0]
    A = np.abs(G[~np.eye(N, dtype=bool)].reshape(N, N - 1))
    return {"max": A.max(1), "p99": np.quantile(A, 0.99, axis=1), "mean": A.mean(1)}


def _bound(K):
    return 1.0 / (2.0 * max(float(K), 1.0) - 1.0)


def extra_readings(run_dir: str) -> dict:
    res = json.load(open(os.path.join(run_dir, "table.json")))
    out = {"run": run_dir, "command": res.get("command"), "layers": []}
    for L in res["layers"]:
        z = np.load(os.path.join(run_dir, f"units_layer{L['layer']}.npz"))
        S = z["S"]
        rec = {"layer": L["layer"], "units": {}}
        for name, row in L["rows"].items():
            if "readings" not in row:
                continue
            D = np.eye(S.shape[0], dtype=np.float32) if name == "neurons" else z["D_" + name]
            mus = {"aip": coherences(D, S), "euclid": coherences(D, None)}
            u = {"mu_median": {g: {k: float(np.median(v)) for k, v in m.items()}
                               for g, m in mus.items()},
                 "mu_max_check": float(mus["aip"]["max"].max()), "v1": {}}
            for l0n, rd in row["readings"].items():
                for lab, K in rd["K"].items():
                    for g, m in mus.items():
                        for kind, mu in m.items():
                            u["v1"][f"{l0n}|K={lab}|{g}|{kind}"] = float(np.mean(mu < _bound(K)))
            rec["units"][name] = u
        out["layers"].append(rec)
    return out


def to_markdown(ex: dict) -> str:
    lines = [f"# Extra uniqueness readings — {ex['run']}", "",
             "Fraction of atoms with μ_i < 1/(2K−1) (v1), for μ_i = max / 99th percentile / "
             "mean of |G_ij| over j ≠ i, in the AIP and the Euclidean metric, at each K the run "
             "recorded (exact L0 and relative-threshold L0). Median μ per kind in brackets.", ""]
    for L in ex["layers"]:
        for name, u in L["units"].items():
            keys = sorted(u["v1"])
            l0ns = sorted({k.split("|")[0] for k in keys})
            labs = list(dict.fromkeys(k.split("|")[1] for k in keys))
            lines.append(f"## layer {L['layer']} {name}")
            lines.append("")
            lines.append("| L0 | μ | " + " | ".join(labs) + " |")
            lines.append("|" + "---|" * (len(labs) + 2))
            for l0n in l0ns:
                for g in ("aip", "euclid"):
                    for kind in MU_KINDS:
                        med = u["mu_median"][g][kind]
                        cells = [f"{u['v1'][f'{l0n}|{lab}|{g}|{kind}']:.4f}" for lab in labs]
                        lines.append(f"| {l0n} | {g} {kind} ({med:.3g}) | " + " | ".join(cells)
                                     + " |")
            lines.append("")
    return "\n".join(lines) + "\n"


def _run_dir(s: str) -> str:
    if not os.path.isfile(os.path.join(s, "table.json")):
        raise argparse.ArgumentTypeError(
            f"{s!r}: expected a run folder of experiments.atoms.run (with table.json)")
    return s


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m experiments.atoms.readings",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=_run_dir,
                    help="run folder holding table.json and units_layer{L}.npz")
    run_dir = ap.parse_args(sys.argv[1:] if argv is None else argv).run_dir
    ex = extra_readings(run_dir)
    atomic_write_bytes(os.path.join(run_dir, "readings_extra.json"),
                       json.dumps(ex, indent=1).encode())
    save_text(os.path.join(run_dir, "readings_extra.md"), to_markdown(ex))
    print(f"wrote {run_dir}/readings_extra.json readings_extra.md")
    return ex


if __name__ == "__main__":
    main()
