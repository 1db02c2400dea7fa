"""Atoms run + CE loss recovered of its selected SAEs: ``python -m experiments.atoms.splice``.

Runs ``experiments.atoms.run`` with the given arguments (everything after ``--``; default
model: the embedded SmolLM2-135M) and records, per layer, the SAE that the units table
selected for ``features``, ``atoms_whitened`` and ``atoms_tied`` (the parameters reach
``sae.atoms.sae_units``; the run itself is unchanged). Each is then spliced into the causal
LM at its block with :func:`sae.evals.splice_eval_many` (clean / spliced / zero-ablated
passes) on ``--ce-texts`` texts of the default corpus that come AFTER the texts the
activation cache consumed (held out from the S̃ estimate and from training).

Whitened SAEs are evaluated in activation coordinates exactly as ``sae_units`` maps them:
x̂ = (f(x S̃^{1/2}) W_dec + b_dec) S̃^{-1/2}.

Writes ``<out>/ce.json`` and ``<out>/ce.md`` next to the run's table.md.

Example (the docs/smollm2.md table):
    python -m experiments.atoms.splice --ce-texts 16 -- --layers 3,8,13,18,23,28 \\
        --out results/atoms_smollm2
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from experiments import cli

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

VARIANTS = ("features", "atoms_whitened", "atoms_tied")


class _Recorder:
    """Wraps ``sae.atoms.sae_units`` and ``pipeline.analyze_layer``: after each layer, the
    (params, encode_fn, aip, whitened) of the selected unit of each trained variant go to
    ``on_layer(layer, chosen)`` (the splice), so that partial runs keep their CE rows."""

    def __init__(self, on_layer):
        self.calls, self.on_layer = [], on_layer

    def install(self):
        import sae.atoms as at
        from experiments.atoms import pipeline

        self._orig_units, self._orig_layer = at.sae_units, pipeline.analyze_layer

        def sae_units(params, x, encode_fn, *, aip=None, whitened=False):
            u = self._orig_units(params, x, encode_fn, aip=aip, whitened=whitened)
            self.calls.append({"params": {k: np.asarray(v) for k, v in params.items()},
                               "encode_fn": encode_fn, "whitened": bool(whitened),
                               "aip": aip, "r2": float(at.r2(x, u["x_hat"]))})
            return u

        def analyze_layer(x, cfg, layer, *args, **kw):
            self.calls = []
            out = self._orig_layer(x, cfg, layer, *args, **kw)
            chosen = self._pick(out, len(cfg.lams))
            self.calls = []
            self.on_layer(layer, chosen)
            return out

        at.sae_units, pipeline.analyze_layer = sae_units, analyze_layer

    def uninstall(self):
        import sae.atoms as at
        from experiments.atoms import pipeline

        at.sae_units, pipeline.analyze_layer = self._orig_units, self._orig_layer

    def _pick(self, out, n):
        """Calls per layer (pipeline order): n feature members, the selected feature SAE,
        n whitened members, the selected whitened SAE, n tied members."""
        plain = [c for c in self.calls if not c["whitened"]]
        white = [c for c in self.calls if c["whitened"]]
        chosen = {"features": plain[n] if len(plain) == n + 1 else None,
                  "atoms_whitened": white[n] if len(white) >= n + 1 else None}
        tied = out["sweeps"].get("atoms_tied")
        if tied is not None:
            chosen["atoms_tied"] = (white[n + 1 + tied["selected"]] if len(white) == 2 * n + 1
                                    else None)
        for name, c in chosen.items():
            if c is None:
                raise RuntimeError(f"layer {out['layer']}: unexpected sae_units call pattern "
                                   f"({len(plain)} plain, {len(white)} whitened for {n} λ)")
            sw = out["sweeps"][name]
            want = sw["members"][sw["selected"]]["r2"]
            if not np.isclose(c["r2"], want, rtol=1e-5, atol=1e-6):
                raise RuntimeError(f"layer {out['layer']} {name}: recorded SAE has eval R² "
                                   f"{c['r2']:.6f}, the table's selection {want:.6f}")
        return chosen


def _sae_pair(c):
    """(encode, decode) in activation coordinates for a recorded unit."""
    import jax.numpy as jnp

    p, enc_fn = c["params"], c["encode_fn"]
    W_dec, b_dec = p["W_dec"].astype(np.float32), p["b_dec"].astype(np.float32)
    if not c["whitened"]:
        return (lambda x: enc_fn(p, jnp.asarray(x)),
                lambda f: np.asarray(f) @ W_dec + b_dec)
    s_half = np.asarray(c["aip"].S_half, np.float32)
    s_inv_half = np.asarray(c["aip"].S_inv_half, np.float32)
    return (lambda x: enc_fn(p, jnp.asarray(x @ s_half)),
            lambda f: (np.asarray(f) @ W_dec + b_dec) @ s_inv_half)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    run_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ce-texts", type=cli.pos_int, default=16, help="held-out texts for the splice")
    ap.add_argument("--ce-batch-size", type=cli.pos_int, default=8)
    ap.add_argument("--ce-context-length", type=cli.pos_int, default=128)
    a = ap.parse_args(own)
    rp = argparse.ArgumentParser(add_help=False)
    rp.add_argument("--out", default="results/atoms")
    rp.add_argument("--cache-dir", default=None)
    rp.add_argument("--model", default="smollm2-135m")
    rp.add_argument("--texts", default=None)
    ra, _ = rp.parse_known_args(run_args)

    from experiments.atoms import pipeline, run
    from sae import models
    from sae.evals import splice_eval_many

    cache_dir = ra.cache_dir or os.path.join(ra.out, "cache")
    out = {"command": "python -m experiments.atoms.splice " + " ".join(argv),
           "model": ra.model, "layers": {}, "seconds_ce": 0.0}
    state = {}

    def on_layer(layer, chosen):
        t0 = time.perf_counter()
        if not state:  # the cache is complete once the first layer is analysed
            texts, consumed = pipeline.held_out_texts(cache_dir, ra.texts, a.ce_texts,
                                                      "--ce-texts")
            state["texts"], state["first"] = texts, consumed
            state["model"], state["tok"] = models.load(ra.model)
            out.update(ce_texts=len(texts), first_text=consumed)
        saes = {name: _sae_pair(c) for name, c in chosen.items()}
        r = splice_eval_many(state["model"], state["tok"], state["texts"], layer, saes,
                             batch_size=a.ce_batch_size, context_length=a.ce_context_length,
                             progress=False)
        out["layers"][layer] = r
        out["seconds_ce"] += time.perf_counter() - t0
        print(f"[layer {layer}] " + "; ".join(
            f"{n}: CE rec {v['ce_loss_recovered']:.3f} KL {v['kl_spliced']:.3f}"
            for n, v in r.items()), flush=True)
        _write(out, ra.out, state)

    rec = _Recorder(on_layer)
    rec.install()
    try:
        res = run.main(run_args)
    finally:
        rec.uninstall()
    print(open(os.path.join(ra.out, "ce.md")).read())
    return res, out


def _write(out, out_dir, state):
    from experiments.common import atomic_write_bytes

    first = out["layers"][next(iter(out["layers"]))]
    n_tok = next(iter(first.values()))["n_tokens"]
    lines = [f"# CE loss recovered — {out['model']}", "", out["command"], "",
             f"{len(state['texts'])} held-out texts (default-corpus texts {state['first']}…"
             f"{state['first'] + len(state['texts']) - 1}), {n_tok} predicted tokens; CE in "
             f"nats/token; KL = mean KL(clean ‖ spliced).", "",
             "| layer | CE clean | CE zero-abl. | " + " | ".join(
                 f"{v}: CE / recovered / KL" for v in VARIANTS) + " |",
             "|---|---|---|" + "---|" * len(VARIANTS)]
    for layer, r in sorted(out["layers"].items()):
        base = next(iter(r.values()))
        cells = [f"{r[v]['ce_spliced']:.3f} / {r[v]['ce_loss_recovered']:.3f} / "
                 f"{r[v]['kl_spliced']:.3f}" if v in r else "—" for v in VARIANTS]
        lines.append(f"| {layer} | {base['ce_clean']:.3f} | {base['ce_zero']:.3f} | "
                     + " | ".join(cells) + " |")
    atomic_write_bytes(os.path.join(out_dir, "ce.json"),
                       json.dumps(out, indent=1, default=float).encode())
    atomic_write_bytes(os.path.join(out_dir, "ce.md"), ("\n".join(lines) + "\n").encode())


if __name__ == "__main__":
    main()
