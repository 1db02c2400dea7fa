"""The atoms paper, end to end: ``python -m experiments.atoms.run``.

Caches the residual stream of every layer of a model (default: the embedded SmolLM2-135M,
``--model smollm2-135m``, offline; ``--model minilm`` for all-MiniLM-L6-v2), trains per
layer a vmapped λ sweep of each unit variant (Euclidean "features", AIP "atoms" with
whitened inputs and with the tied encoder W_enc = S̃D), runs the atoms analysis and
writes results/atoms/{table.md, table.json, angles.png, units_per_layer.png,
loss_curves.png}. Rows are split train / select (λ choice) / report (the table); every
unit carries ``r2_train`` (in-sample) and ``r2_eval`` (report split) and the uniqueness
readings of ``sae.atoms.uniqueness_readings``; ``--plateau-window`` trains each sweep until
its training loss plateaus (``sae.loop.Plateau``, ``--steps`` the cap).

Full scale (the paper's Gemma2-2B; needs the weights and a GPU):
    python -m experiments.atoms.run --model google/gemma-2-2b --device cuda \
        --max-tokens 1000000 --steps 20000 --batch-size 4096 --cache-dtype bfloat16 \
        --gemma-scope 12=/path/to/gemma-scope-2b-pt-res/layer_12/width_16k/.../params.npz
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys

from experiments import cli
from experiments.atoms.pipeline import AtomsConfig, run_pipeline


def _gemma_scope(s: str):
    """'LAYER=path' → (layer, path)."""
    layer, sep, path = s.partition("=")
    if not sep or not path:
        raise argparse.ArgumentTypeError(f"expected LAYER=path/params.npz, got {s!r}")
    return cli.nonneg_int(layer), path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m",
                    help="embedded 'smollm2-135m' (default: SmolLM2-135M, Q4_1 GGUF dequantised) "
                         "or 'minilm' (all-MiniLM-L6-v2), or an HF name / local folder")
    ap.add_argument("--layers", type=cli.nonneg_ints, default=None,
                    help="comma list (default: every layer)")
    ap.add_argument("--analyze-layers", type=cli.nonneg_ints, default=None,
                    help="comma list: analyse only these of the cached --layers (several "
                         "processes can share one cache this way)")
    ap.add_argument("--splice-texts", type=cli.nonneg_int, default=16,
                    help="held-out texts for the spliced-model columns (CE recovered and KL "
                         "for a causal LM, embedding cosine for an encoder); 0 turns them off")
    ap.add_argument("--texts", default=None, help="corpus: path, hf:<dataset>, default offline")
    ap.add_argument("--max-tokens", type=cli.pos_int, default=12_000)
    ap.add_argument("--context-length", type=cli.pos_int, default=128)
    ap.add_argument("--cache-dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--width-mult", type=cli.pos_int, default=4)
    ap.add_argument("--recipe", default="anthropic", choices=["anthropic", "gdm"])
    ap.add_argument("--lams", type=cli.pos_floats, default=(1.0, 3.0, 10.0))
    ap.add_argument("--steps", type=cli.pos_int, default=600)
    ap.add_argument("--batch-size", type=cli.pos_int, default=512)
    ap.add_argument("--no-tied", action="store_true")
    ap.add_argument("--ridge", type=cli.nonneg_float, default=0.0)
    ap.add_argument("--select-r2", type=cli.probability, default=0.9)
    ap.add_argument("--eval-frac", type=cli.probability, default=0.2,
                    help="report split: the last fraction of each layer's rows")
    ap.add_argument("--select-frac", type=cli.probability, default=0.1,
                    help="λ-selection split: the rows just before the report split")
    ap.add_argument("--max-eval", type=cli.pos_int, default=4096,
                    help="rows of the select / report splits (and of the training rows for "
                         "r2_train) the metrics use")
    ap.add_argument("--lam-warmup-steps", type=cli.nonneg_int, default=None,
                    help="λ warm-up length (default: the recipe's; Anthropic: the whole run)")
    ap.add_argument("--plateau-window", type=cli.nonneg_int, default=0,
                    help="> 0: stop each sweep when the windowed mean training loss improves by "
                         "less than --plateau-tol (relative) over a window; --steps is the cap")
    ap.add_argument("--plateau-tol", type=cli.nonneg_float, default=1e-3)
    ap.add_argument("--gemma-scope", type=_gemma_scope, action="append", default=[],
                    help="LAYER=path/params.npz (repeatable): a public SAE as 'features_public'")
    ap.add_argument("--out", default="results/atoms")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--seed", type=cli.nonneg_int, default=0)
    a = ap.parse_args(argv)
    gs = dict(a.gemma_scope) or None
    if a.model.lower().startswith("smollm2"):  # embedded GGUF model → its float32 cache folder
        from sae import models

        a.model = models.local_path(a.model, progress=True)
    cfg = AtomsConfig(
        model=a.model, layers=None if a.layers is None else tuple(a.layers),
        analyze_layers=None if a.analyze_layers is None else tuple(a.analyze_layers),
        texts=a.texts, max_tokens=a.max_tokens, context_length=a.context_length,
        cache_dtype=a.cache_dtype, device=a.device, width_mult=a.width_mult, recipe=a.recipe,
        lams=a.lams, steps=a.steps, batch_size=a.batch_size, tied=not a.no_tied, ridge=a.ridge,
        select_r2=a.select_r2, gemma_scope=gs, seed=a.seed, splice_texts=a.splice_texts,
        eval_frac=a.eval_frac, select_frac=a.select_frac, max_eval=a.max_eval,
        lam_warmup_steps=a.lam_warmup_steps, plateau_window=a.plateau_window,
        plateau_tol=a.plateau_tol)
    cmd = "python -m experiments.atoms.run " + " ".join(shlex.quote(v) for v in (argv or sys.argv[1:]))
    res = run_pipeline(cfg, a.out, a.cache_dir, command=cmd,
                       log=lambda m: print(m, flush=True))
    print(json.dumps(res["average"], indent=1))
    print(f"wrote {a.out}/table.md table.json angles.png units_per_layer.png "
          f"({res['seconds_total']:.0f}s)")
    return res


if __name__ == "__main__":
    main()
