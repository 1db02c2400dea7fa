# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 05 — The atoms pipeline at paper scale: Gemma-2-2B on a Colab GPU/TPU
#
# Hu et al., *Towards atoms of large language models* (2025/26), ran on Gemma 2 (Gemma
# Team, *Gemma 2: improving open language models at a practical size*, arXiv:2408.00118).
# This notebook points `experiments.atoms.pipeline` (cache → AIP → vmapped SAE sweeps →
# units table) at `google/gemma-2-2b`. It prints the cost estimate (disk, time) **before**
# any work starts.
#
# * On a GPU runtime with access to the weights (Gemma is gated: accept its licence on the
#   Hub and log in with `huggingface_hub.login()`), it runs at the size set below.
# * On a CPU without the weights, or with `SMALL=1` (the test suite's fast mode), it runs
#   the same code path on a tiny random-weight Gemma2 (`transformers.Gemma2Config` +
#   `from_config`, saved to a temporary folder with a small word-level tokenizer). Its
#   numbers mean nothing; the run checks the code path end to end.

# %% [markdown]
# ## Set-up
# On Colab this cell installs the package (with the `llm` extra) from its repository; in a
# local checkout it does nothing. **Set `REPO_URL`** to the repository you use.

# %%
# ---- SET THIS: the repository Colab installs from ----------------------------------------
REPO_URL = "git+https://github.com/<org>/jaxsense"
EXTRAS = "llm"
# -------------------------------------------------------------------------------------------
import importlib.util
import subprocess
import sys

IN_COLAB = importlib.util.find_spec("google.colab") is not None
if IN_COLAB:
    if "<org>" in REPO_URL:
        raise SystemExit("Set REPO_URL in the set-up cell to the repository's URL, "
                         "e.g. git+https://github.com/ORG/jaxsense")
    spec = f"jaxsense[{EXTRAS}] @ {REPO_URL}" if EXTRAS else f"jaxsense @ {REPO_URL}"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", spec], check=True)
    importlib.invalidate_caches()

# %% [markdown]
# ## Parameters (the paper-scale run)

# %%
import os

SMALL = os.environ.get("SMALL", "0") == "1"

MODEL = "google/gemma-2-2b"
LAYERS = None                    # None: every layer (26); e.g. [6, 12, 18]
MAX_TOKENS = 1_000_000           # cached tokens per layer
WIDTH_MULT = 4                   # SAE width = WIDTH_MULT × d_model (9216 for Gemma-2-2B)
LAMS = (0.3, 1.0, 3.0)           # one vmapped λ sweep per unit variant
STEPS, BATCH = 20_000, 4096
TIED = True                      # also train the AIP-tied SAE (3 variants instead of 2)
CACHE_DTYPE = "bfloat16"
OUT = "results/atoms_gemma2"     # on Colab, point this at a Drive folder to keep the outputs
# Rates the time estimate assumes (not measured in this repository): bf16 SAE-step
# throughput, model forward throughput and the disk's write speed.
ASSUMED_TFLOPS = 340.0           # an H200; use ~300 for an H100, ~60 for an A100-40GB … L4
ASSUMED_FORWARD_UTIL = 0.3       # fraction of ASSUMED_TFLOPS reached by the caching forward
ASSUMED_DISK_MB_S = 200.0
# known sizes, so that the estimate needs no download: (d_model, layers, parameters)
KNOWN = {"google/gemma-2-2b": (2304, 26, 2.6e9), "google/gemma-2-9b": (3584, 42, 9.2e9)}

# the tiny stand-in (CPU without the weights, or SMALL=1)
TINY = dict(hidden_size=64, layers=3, layers_run=(1,), max_tokens=1500, lams=(1.0, 3.0),
            steps=150, batch=256, width_mult=2)

# %%
# %matplotlib inline
import json
import tempfile
from pathlib import Path

import jax
import torch
from IPython.display import HTML, display

from experiments.atoms import pipeline as pl
from sae.cache import disk_bytes_per_million_tokens

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
print("jax:", jax.devices(), "| torch device for caching:", DEVICE)


def model_dims(name):
    """(d_model, n_layers, n_params or None) from the config (a small download), else KNOWN."""
    try:
        from transformers import AutoConfig

        c = AutoConfig.from_pretrained(name)
        c = getattr(c, "text_config", c)
        return int(c.hidden_size), int(c.num_hidden_layers), KNOWN.get(name, (0, 0, None))[2]
    except Exception as e:  # noqa: BLE001 - offline, gated, or no such model
        if name in KNOWN:
            return KNOWN[name]
        raise ValueError(f"cannot read the config of {name!r} ({e})") from None


def cost_estimate(H, n_layers, n_params, tokens, width_mult, n_lams, n_variants, steps, batch,
                  dtype):
    """Disk (bytes) and time (s) of a run, from arithmetic: the cache holds
    H × bytes(dtype) per token per layer (+16 B/token of ids and positions); one SAE step
    costs ≈ 12·B·H·M FLOP (encoder + decoder, forward + backward); caching costs the
    model's forward, 2·params FLOP per token, plus writing the cache."""
    disk = disk_bytes_per_million_tokens(H, dtype, n_layers) * tokens / 1e6
    sae_steps = n_layers * n_lams * n_variants * steps
    train_flop = 12.0 * batch * H * (width_mult * H) * sae_steps
    train_s = train_flop / (ASSUMED_TFLOPS * 1e12)
    fwd_s = (2.0 * n_params * tokens / (ASSUMED_FORWARD_UTIL * ASSUMED_TFLOPS * 1e12)
             if n_params else float("nan"))
    cache_s = fwd_s + disk / (ASSUMED_DISK_MB_S * 1e6)
    return {"disk_GB": disk / 1e9, "sae_steps": sae_steps, "train_PFLOP": train_flop / 1e15,
            "train_h": train_s / 3600, "cache_h": cache_s / 3600}


H, NL, NP = model_dims(MODEL)
n_layers = NL if LAYERS is None else len(LAYERS)
est = cost_estimate(H, n_layers, NP, MAX_TOKENS, WIDTH_MULT, len(LAMS), 3 if TIED else 2,
                    STEPS, BATCH, CACHE_DTYPE)
print(f"{MODEL}: d_model {H}, {n_layers} of {NL} layers, {MAX_TOKENS:,} tokens, "
      f"SAE width {WIDTH_MULT * H}, {len(LAMS)} λ × {3 if TIED else 2} variants × {STEPS} steps")
print(f"  disk for the cache:  {est['disk_GB']:.1f} GB ({CACHE_DTYPE})")
print(f"  SAE training:        {est['sae_steps']:,} SAE-steps, {est['train_PFLOP']:.0f} PFLOP "
      f"≈ {est['train_h']:.1f} h at an assumed {ASSUMED_TFLOPS:g} TFLOP/s")
print(f"  caching:             ≈ {est['cache_h']:.2f} h (assumed rates)")

# %% [markdown]
# ## Which run: the real model or the tiny stand-in
# The real model runs when not in fast mode and its weights can be loaded here (on Colab
# they are downloaded); otherwise a tiny random-weight Gemma2 is built.

# %%
def weights_available(name):
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "tokenizer*"])
        return True
    except Exception as e:  # noqa: BLE001 - offline, gated, not logged in
        print(f"weights of {name} not available here ({type(e).__name__})")
        return False


def make_tiny_gemma2(folder, texts, hidden_size, layers, seed=0):
    """A random-weight Gemma2 with a word-level tokenizer over ``texts`` (<bos> prepended)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import AutoModelForCausalLM, Gemma2Config, PreTrainedTokenizerFast

    pre = pre_tokenizers.Whitespace()
    words = sorted({w for t in texts for w, _ in pre.pre_tokenize_str(t)})
    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + words)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A",
                                                      special_tokens=[("<bos>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>",
                                  pad_token="<pad>", unk_token="<unk>")
    tok.save_pretrained(folder)
    cfg = Gemma2Config(hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=hidden_size // 4, vocab_size=len(vocab),
                       max_position_embeddings=256, sliding_window=64, pad_token_id=0,
                       bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # larger random weights: non-degenerate activations
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.3)
    model.save_pretrained(folder)
    return folder


USE_REAL = (not SMALL) and weights_available(MODEL)
if USE_REAL:
    cfg = pl.AtomsConfig(model=MODEL, layers=LAYERS, max_tokens=MAX_TOKENS, lams=LAMS,
                         steps=STEPS, batch_size=BATCH, width_mult=WIDTH_MULT, tied=TIED,
                         cache_dtype=CACHE_DTYPE, device=DEVICE, progress=True)
    out_dir = OUT
else:
    import sae

    tiny_dir = tempfile.mkdtemp(prefix="tiny_gemma2_")
    corpus = list(sae.default_corpus())[:400]
    make_tiny_gemma2(tiny_dir, corpus, TINY["hidden_size"], TINY["layers"])
    cfg = pl.AtomsConfig(model=tiny_dir, layers=TINY["layers_run"], texts=corpus,
                         max_tokens=TINY["max_tokens"], lams=TINY["lams"], steps=TINY["steps"],
                         batch_size=TINY["batch"], width_mult=TINY["width_mult"], tied=False,
                         lr=1e-3, cache_dtype="float32", n_pairs=2000, n_bp=16, bp_iter=50,
                         n_supports=16, max_eval=300, progress=True)
    out_dir = tempfile.mkdtemp(prefix="atoms_tiny_")
    H_run, NL_run, _ = model_dims(tiny_dir)
    est_run = cost_estimate(H_run, len(cfg.layers), None, cfg.max_tokens, cfg.width_mult,
                            len(cfg.lams), 2, cfg.steps, cfg.batch_size, cfg.cache_dtype)
    print(f"tiny stand-in: d_model {H_run}, {NL_run} layers (running {list(cfg.layers)}); "
          f"estimated cache {est_run['disk_GB'] * 1e3:.3f} MB")
print("model:", cfg.model, "| out:", out_dir)

# %% [markdown]
# ## Run the pipeline
# `run_pipeline` caches every requested layer in one pass (resumable: rerunning the cell
# after a disconnect continues the cache), then per layer trains the sweeps, computes the
# units table and writes `table.md`, `table.json` and the plots into the output folder
# after every layer.

# %%
result = pl.run_pipeline(cfg, out_dir, command="notebooks/05_paper_scale")
print(f"done in {result['seconds_total']:.1f} s; outputs in {out_dir}")

# %%
def fmt(v):
    return "—" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))


head = "".join(f"<th>{c}</th>" for _, c in pl.COLS)
body = "".join(f"<tr><td>{L['layer']}</td><td>{name}</td>"
               + "".join(f"<td>{fmt(r.get(k))}</td>" for k, _ in pl.COLS) + "</tr>"
               for L in result["layers"] for name, r in L["rows"].items())
display(HTML(f"<table><tr><th>layer</th><th>unit</th>{head}</tr>{body}</table>"))
rs = result["layers"][0]["representation_shift"]["activations"]
print(f"layer {result['layers'][0]['layer']}: mean pairwise angle "
      f"{rs['euclid']['mean']:.1f}° (Euclidean) → {rs['aip']['mean']:.1f}° (AIP)")

# %% [markdown]
# ## Checks
# The disk estimate printed before the run is the size the cache actually has (shard
# files: activations per layer plus token ids, positions and text indices).

# %%
cache_dir = Path(out_dir) / "cache"
shard_bytes = sum(f.stat().st_size for f in cache_dir.glob("shard_*.npy"))
manifest = json.loads((cache_dir / "manifest.json").read_text())
n_tok = int(manifest["n_tokens"])
predicted = disk_bytes_per_million_tokens(manifest["d_model"], manifest["dtype"],
                                          len(manifest["layers"])) * n_tok / 1e6
print(f"cache: {n_tok} tokens, {shard_bytes:,} bytes on disk, predicted {predicted:,.0f}")
assert abs(shard_bytes - predicted) <= 0.02 * predicted + 4096 * len(manifest["shards"]), \
    (shard_bytes, predicted)
L0 = result["layers"][0]
assert L0["H"] == (H if USE_REAL else H_run) and abs(L0["rows"]["neurons"]["r2"] - 1) < 1e-5
assert L0["rows"]["features"]["r2"] > 0, L0["rows"]["features"]
assert (Path(out_dir) / "table.md").is_file() and (Path(out_dir) / "angles.png").is_file()
print("checks passed")
