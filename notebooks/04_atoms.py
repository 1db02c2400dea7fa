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
# # 04 — Atoms: the atomic inner product, representation shift, neurons vs features vs atoms
#
# Hu et al., *Towards atoms of large language models* (2025/26): represent activations in
# the geometry of the **atomic inner product** (AIP) ⟨u, v⟩_S̃ = uᵀS̃v with
# S̃ = (E[xxᵀ])⁻¹, and compare three kinds of units — neurons (the identity dictionary),
# features (a Euclidean sparse autoencoder) and atoms (SAEs in the AIP geometry) — on
# reconstruction (R²), sparsity (L0), coherence, uniqueness (q*), RIP and ℓ1
# recoverability. Several details of the paper are reconstructed; `docs/atoms.md` names
# each. The Gaussian controls of the representation shift are ours (the circularity
# critique: N(0, E[xxᵀ]) vectors re-centre at 90° under the AIP by construction).
#
# This notebook runs the functions of `experiments.atoms.pipeline` on one MiniLM layer at
# a small size (the full run is `python -m experiments.atoms.run`).

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
# ## Parameters
# Embedded all-MiniLM-L6-v2, one layer, the offline default corpus. `SMALL=1` (the test
# suite's fast mode): 1.5k tokens, SAEs 2× over-complete, 2 λ values, 200 steps at
# lr 1e-3, small metric samples, and no tied variant (atoms = atoms_whitened only). Full
# mode: 12k tokens, 4× over-complete, 3 λ values, 600 steps, and the tied variant.

# %%
import os

SMALL = os.environ.get("SMALL", "0") == "1"

LAYER = 3
if SMALL:
    SIZE = dict(max_tokens=1500, lams=(1.0, 3.0), steps=200, lr=1e-3, width_mult=2,
                tied=False, batch_size=256, n_pairs=2000, n_bp=16, bp_iter=50, n_supports=16,
                max_eval=300)
else:
    SIZE = dict(max_tokens=12_000, lams=(1.0, 3.0, 10.0), steps=600, batch_size=512,
                n_pairs=20_000, n_bp=256, bp_iter=300, n_supports=256, max_eval=2400)

# %%
# %matplotlib inline
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from IPython.display import HTML, display

from experiments.atoms import pipeline as pl
from sae import atoms as at

cfg = pl.AtomsConfig(model="minilm", layers=(LAYER,), progress=True, **SIZE)
WORK = Path(tempfile.mkdtemp(prefix="atoms_"))
print(cfg)

# %% [markdown]
# ## Activations
# `pipeline.cache` runs the model once over the corpus and stores the requested layers;
# `pipeline.layer_data` reads one layer back in cache order. The last 20 % of the rows are
# held out (evaluation), as in the pipeline.

# %%
model_path, layers = pl.cache(cfg, str(WORK / "cache"))
x = pl.layer_data(str(WORK / "cache"), LAYER, cfg.max_tokens)
n_eval = max(2, int(round(cfg.eval_frac * len(x))))
x_train, x_eval = x[:-n_eval], x[-n_eval:][: cfg.max_eval]
print(f"layer {LAYER}: {x.shape[0]} tokens × H = {x.shape[1]}; train {len(x_train)}, "
      f"eval {len(x_eval)}")

# %% [markdown]
# ## The atomic inner product
# S̃ = (E[xxᵀ])⁻¹ from the training rows (float64). Whitening x ↦ S̃^{1/2}x turns the AIP
# into the ordinary cosine. The spectrum of E[xxᵀ] shows how anisotropic the activations
# are: a few directions (the shared mean among them) carry most of the energy, which is
# what makes Euclidean angles between tokens small.

# %%
mom = at.second_moment(x_train)
aip = at.aip_from_moment(mom)
print(f"cond(E[xxᵀ]) = {aip.cond:.3g}, rank {aip.rank}/{x.shape[1]}")
xw = np.asarray(at.whiten(x_eval, aip))
i, j = 0, len(x_eval) // 2
cos_e = float(x_eval[i] @ x_eval[j] / np.linalg.norm(x_eval[i]) / np.linalg.norm(x_eval[j]))
cos_a = float(at.aip_cosine(x_eval[i], x_eval[j], aip.S))
cos_w = float(xw[i] @ xw[j] / np.linalg.norm(xw[i]) / np.linalg.norm(xw[j]))
print(f"two eval tokens: Euclidean cosine {cos_e:.3f}, AIP {cos_a:.3f}, "
      f"cosine after whitening {cos_w:.3f}")

fig, ax = plt.subplots(figsize=(5, 3.2))
ax.semilogy(np.sort(aip.eigvals)[::-1])
ax.set_xlabel("index")
ax.set_ylabel("eigenvalue of E[xxᵀ]")
ax.set_title(f"MiniLM layer {LAYER}")
plt.show()

# %% [markdown]
# ## Units and metrics: `pipeline.analyze_layer`
# Trains, each as one vmapped λ sweep by `sae.train` with the same recipe: features
# (Euclidean JumpReLU SAE on x), atoms_whitened (the same SAE on S̃^{1/2}x, atoms mapped
# back) and atoms_tied (tied SAE in whitened coordinates ⇔ W_enc = S̃D); picks one member
# per sweep (smallest L0 with R² ≥ 0.9, else the best R²); then the metrics on the eval
# rows and the representation shift.

# %%
out = pl.analyze_layer(x, cfg, LAYER, log=print)
print(f"trained and measured in {out['seconds_total']:.1f} s")

# %% [markdown]
# ## Representation shift, with controls
# Histograms of pairwise angles, Euclidean vs AIP. The data re-centre towards 90° under
# the AIP — but so does N(0, E[xxᵀ]) by construction, and N(x̄, Cov) (same mean and
# covariance as the data) moves the same way: the shift is explained by the first two
# moments.

# %%
rs = out["representation_shift"]
styles = {"activations": "-", "gaussian_matched": ":", "gaussian_mean_cov": (0, (1, 3)),
          "gaussian_iso": "--", "euclid_sae_atoms": "-."}
fig, axes = plt.subplots(1, 2, figsize=(12, 3.8), sharey=True)
for ax, geo in zip(axes, ("euclid", "aip")):
    for name, style in styles.items():
        if name in rs:
            e = np.asarray(rs[name]["edges"])
            ax.plot(0.5 * (e[1:] + e[:-1]), rs[name]["hist_" + geo], linestyle=style,
                    label=f"{name} (mean {rs[name][geo]['mean']:.1f}°)")
    ax.set_xlim(0, 180)
    ax.set_xlabel("pairwise angle (degrees)")
    ax.set_title("Euclidean" if geo == "euclid" else "AIP ⟨u,v⟩_S̃")
    ax.legend(fontsize=7)
axes[0].set_ylabel("density")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Neurons vs features vs atoms
# Eval-split metrics (definitions in `docs/atoms.md`): R² Euclidean and in the S̃ norm, L0,
# median/max coherence μ under the AIP, K = median L0, fraction of atoms passing the
# uniqueness test μ < 1/(2K−1), q*, sampled RIP δ_K and the Gershgorin bound (K−1)μ, and
# how often basis pursuit recovers the SAE's support exactly.

# %%
def fmt(v):
    return "—" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))


head = "".join(f"<th>{c}</th>" for _, c in pl.COLS)
body = "".join(f"<tr><td>{name}</td>" + "".join(f"<td>{fmt(r.get(k))}</td>" for k, _ in pl.COLS)
               + "</tr>" for name, r in out["rows"].items())
display(HTML(f"<table><tr><th>unit</th>{head}</tr>{body}</table>"))
for v, s in out["sweeps"].items():
    print(v, "; ".join(f"λ={m['lam']:g}: R² {m['r2']:.3f}, L0 {m['l0_mean']:.1f}"
                       + ("*" if i == s["selected"] else "") for i, m in enumerate(s["members"])))

# %% [markdown]
# ## Checks

# %%
rows = out["rows"]
variants = ["features", "atoms_whitened"] + (["atoms_tied"] if cfg.tied else [])
assert set(rows) == {"neurons", *variants}, set(rows)
# neurons are the identity dictionary: exact reconstruction with every unit active
assert abs(rows["neurons"]["r2"] - 1) < 1e-5 and rows["neurons"]["l0_mean"] == x.shape[1]
# held-out reconstruction: features in the Euclidean norm, atoms in the S̃ norm they are
# trained for, each with fewer active units than there are neurons
assert rows["features"]["r2"] > 0.5 and rows["features"]["l0_mean"] < x.shape[1], rows["features"]
for name in variants[1:]:
    assert rows[name]["r2_aip"] > 0.4 and rows[name]["l0_mean"] < x.shape[1], rows[name]
# representation shift: the AIP spreads the data's angles towards 90°, and the matched
# Gaussian control sits at 90° under the AIP (its whitened covariance is I)
act = rs["activations"]
assert act["aip"]["mean"] > act["euclid"]["mean"] + 2, act
assert abs(rs["gaussian_matched"]["aip"]["mean"] - 90) < 3, rs["gaussian_matched"]["aip"]
# the AIP equals the cosine of whitened vectors
assert abs(cos_a - cos_w) < 1e-3, (cos_a, cos_w)
print("checks passed")
