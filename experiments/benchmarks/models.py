"""Benchmark of the embedded SmolLM2-135M: load times and caching throughput on this CPU.

1. ``first_load_s``: ``sae.models.load("smollm2-135m")`` with an empty cache folder (a temp
   ``cache_dir``): read + dequantise the Q4_1 GGUF file (``load_gguf``), write the float32
   safetensors cache (+ SHA-256 marker). ``later_load_s``: the same call once the cache
   exists (``from_pretrained(cache folder)``), median of ``--repeats``.
2. ``cache_tokens_per_s``: ``cache_activations("smollm2-135m", default corpus, layers=…)``
   on ``--tokens`` tokens (context 128, float32 storage), tokens/s of the caching loop
   (model load excluded: ``tokens / loop_seconds`` of the manifest's run record), and the
   share of that loop spent in tokenise + forward (``forward_seconds / loop_seconds``).

Run: ``python -m experiments.benchmarks.models`` (~2-3 min on 2 cores). The LAST line is
``first_load_s=… later_load_s=… cache_tokens_per_s=…``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

from experiments import cli

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=cli.pos_int, default=4096, help="tokens to cache")
    ap.add_argument("--layers", type=cli.nonneg_ints, default=[3, 8, 13, 18, 23, 28],
                    help="comma list of blocks")
    ap.add_argument("--batch-size", type=cli.pos_int, default=32)
    ap.add_argument("--context-length", type=cli.pos_int, default=128)
    ap.add_argument("--repeats", type=cli.pos_int, default=3, help="later loads to time")
    a = ap.parse_args(argv)
    import torch

    from sae import models
    from sae.activations import cache_activations

    layers = list(a.layers)
    out = {"torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="bench_models_") as tmp:
        root = os.path.join(tmp, "models")
        t0 = time.perf_counter()
        model, tok = models.load("smollm2-135m", cache_dir=root)
        out["first_load_s"] = time.perf_counter() - t0
        del model
        later = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            model, tok = models.load("smollm2-135m", cache_dir=root)
            later.append(time.perf_counter() - t0)
            del model
        out["later_load_s"] = statistics.median(later)
        out["later_load_all_s"] = later
        folder = os.path.join(root, "smollm2-135m")
        out["cache_bytes"] = sum(os.path.getsize(os.path.join(folder, f))
                                 for f in os.listdir(folder))
        old = os.environ.get("SAE_CACHE_DIR")
        os.environ["SAE_CACHE_DIR"] = root
        try:
            m = cache_activations("smollm2-135m", None, os.path.join(tmp, "acts"),
                                  layers=layers, context_length=a.context_length,
                                  batch_size=a.batch_size, dtype="float32",
                                  max_tokens=a.tokens, progress=False)
        finally:
            if old is None:
                os.environ.pop("SAE_CACHE_DIR", None)
            else:
                os.environ["SAE_CACHE_DIR"] = old
        run = m["runs"][-1]
        out.update(cache_tokens=run["tokens"], cache_loop_s=run["loop_seconds"],
                   cache_tokens_per_s=run["tokens"] / run["loop_seconds"],
                   forward_share=run["forward_seconds"] / run["loop_seconds"],
                   layers=layers, batch_size=a.batch_size, context_length=a.context_length)
    print(json.dumps(out, indent=1))
    print(f"first_load_s={out['first_load_s']:.1f} later_load_s={out['later_load_s']:.2f} "
          f"cache_tokens_per_s={out['cache_tokens_per_s']:.0f}")
    return out


if __name__ == "__main__":
    main()
