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
# # 02 — Sweeps and phase transitions: one vmapped, sharded call per grid
#
# Ma & Fattahi, *Global convergence of sub-gradient method for robust matrix recovery*,
# JMLR 24(96), 2023.
#
# `jaxsense.sweep(grid, …)` runs every instance of a grid over (p, r', α, η, ρ, noise
# scale, seed) as **one** `jax.vmap`-ed `lax.scan`; the batch is sharded along a 1-D device
# mesh, so the same call uses every device of the runtime (all GPUs of a GPU runtime, the 8
# cores of a TPU v2/v3 runtime). All instances of a call share one measurement operator.
#
# This notebook sweeps (outlier rate p, search rank r', seed) and draws phase-transition
# maps: success probability over m/(d·r) × p for SubGM on the ℓ1 loss vs GD on the ℓ2
# loss, from the same Algorithm-2 initialisation. The phase-transition experiment is not
# in the paper; its settings are ours, those of `experiments/subgm/phase_transition.py`
# (d = 10, r = 2, X* eigenvalues (2, 1), outliers N(0, 100), η = 0.3, ρ = 0.985,
# α = 1e-6, GD step 0.02; success = relative error ≤ 1e-3).

# %% [markdown]
# ## Set-up
# On Colab this cell installs the package from its repository; in a local checkout it does
# nothing. **Set `REPO_URL`** to the repository you use (replace `<org>`).

# %%
# ---- SET THIS: the repository Colab installs from ----------------------------------------
REPO_URL = "git+https://github.com/<org>/jaxsense"
EXTRAS = ""  # this notebook needs only the core package
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
# `SMALL=1` (the test suite's fast mode): a 2 × 3 map (m/(dr) ∈ {2, 8}, p ∈ {0, 0.2, 0.4}),
# 2 seeds, T = 600 iterations (ρ^600 ≈ 1e-4, enough for the 1e-3 threshold). Full mode:
# 7 × 6 map, 6 seeds, T = 1500.
#
# `CPU_DEVICES`: on a CPU-only runtime, XLA can split the host into N devices (it must be
# set before jax is imported); this makes the sharding visible on a laptop. It has no
# effect on GPU/TPU runtimes, where `jax.devices()` lists the accelerators.

# %%
import os

SMALL = os.environ.get("SMALL", "0") == "1"

RATIOS = [2, 8] if SMALL else [1, 1.5, 2, 3, 4, 6, 8]   # m / (d·r)
P = [0.0, 0.2, 0.4] if SMALL else [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
SEEDS = 2 if SMALL else 6
NUM_STEPS = 600 if SMALL else 1500
CPU_DEVICES = 4

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={CPU_DEVICES}").strip()

# %%
# %matplotlib inline
import time

import tempfile

import jax
import matplotlib.pyplot as plt
import numpy as np
from tqdm.auto import tqdm

from experiments.subgm.phase_transition import ALPHA, D, ETA, GD_ETA, R, RHO, SPECTRUM, THRESH
from jaxsense import sweep

# Each sweep call compiles its instance set-up (problems + Algorithm 2) afresh. With JAX's
# persistent compilation cache, the GD sweep below, which runs on the same instances as
# the SubGM sweep, reuses that compiled set-up instead of compiling it again.
jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="jax_cache_"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

print("jax", jax.__version__, "| backend:", jax.default_backend())
print("devices:", jax.devices())
R_SEARCH = [R, D]  # r' = r (exact rank) and r' = d (over-parameterised)
print(f"d={D}, r={R}, spectrum={SPECTRUM}, r' ∈ {R_SEARCH}, SubGM η={ETA} ρ={RHO}, "
      f"GD η={GD_ETA}, α={ALPHA}, T={NUM_STEPS}")

# %% [markdown]
# ## The sweeps
# For every m: one SubGM sweep and one GD sweep over (p, r', seed), each a single call on
# the same instances. Within a call the instances share the operator; the seed draws X*,
# the outliers and the init (common random numbers across p).

# %%
runs = {}
t0 = time.perf_counter()
with jax.enable_x64(True):
    for ratio in tqdm(RATIOS, desc="m/(dr)"):
        m = round(ratio * D * R)
        key = jax.random.PRNGKey(1000 + m)
        common = dict(key=key, d=D, r=R, m=m, spectrum=SPECTRUM, num_steps=NUM_STEPS,
                      record_every=NUM_STEPS // 20)
        grid = {"p": P, "r_search": R_SEARCH, "seed": range(SEEDS), "alpha": ALPHA}
        sub = sweep({**grid, "eta": ETA, "rho": RHO}, **common)
        gd = sweep({**grid, "eta": GD_ETA}, method="gd", **common)
        runs[ratio] = {"m": m, "subgm": sub, "gd": gd}
print(f"{len(RATIOS)} × 2 sweep calls in {time.perf_counter() - t0:.1f} s")

last = runs[RATIOS[-1]]["subgm"]
print("swept axes:", last.axes, "grid shape:", last.shape,
      "instances per call:", int(np.prod(last.shape)), "| sharded over", last.n_devices,
      "device(s)")

# %% [markdown]
# ## Where the instances ran
# The final solver state of the sweep is a sharded array: each device holds a slice of the
# batch (padded to a multiple of the device count).

# %%
U = last.state.U
print("state U:", U.shape, U.sharding)
shards = sorted(((s.device.id, s.data.shape[0]) for s in U.addressable_shards))
for dev_id, rows in shards:
    print(f"  device {dev_id}: {rows} instances")
used = {s.device for s in U.addressable_shards}

# %% [markdown]
# ## (p, r', seed) at the largest m
# Median final relative error over seeds, and the error curves (median over seeds).

# %%
err = last.as_grid("rel_fro_error")  # (p, r', seed)
print(f"m/(dr) = {RATIOS[-1]}: median final relative error")
print("p      " + "  ".join(f"r'={r:<8d}" for r in R_SEARCH))
for i, p in enumerate(P):
    print(f"{p:<6} " + "  ".join(f"{np.median(err[i, j]):.2e}  " for j in range(len(R_SEARCH))))

# as_grid("rel_fro_error") gives the final errors; the recorded curves are in .history
curves = np.asarray(last.history["rel_fro_error"]).reshape(last.shape + (-1,))
fig, axes = plt.subplots(1, len(R_SEARCH), figsize=(5 * len(R_SEARCH), 3.6), sharey=True)
for ax, j in zip(np.atleast_1d(axes), range(len(R_SEARCH))):
    for i, p in enumerate(P):
        ax.semilogy(last.iterations, np.median(curves[i, j], axis=0), label=f"p={p}")
    ax.axhline(THRESH, color="gray", lw=0.8, ls=":")
    ax.set_title(f"SubGM-ℓ1, m={runs[RATIOS[-1]]['m']}, r'={R_SEARCH[j]}")
    ax.set_xlabel("iteration")
np.atleast_1d(axes)[0].set_ylabel("median ‖UUᵀ−X*‖_F/‖X*‖_F")
np.atleast_1d(axes)[0].legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Phase-transition maps
# P(relative error ≤ 1e-3) over m/(d·r) × p. GD on the ℓ2 loss fails as soon as there are
# outliers; SubGM on the ℓ1 loss tolerates a rate of outliers that grows with m.

# %%
def success(name, j):
    """(p, ratio) fraction of seeds with final relative error ≤ THRESH, r' = R_SEARCH[j]."""
    cols = []
    for ratio in RATIOS:
        e = runs[ratio][name].as_grid("rel_fro_error")[:, j]  # (p, seed)
        cols.append(np.mean(np.where(np.isfinite(e), e, np.inf) <= THRESH, axis=-1))
    return np.stack(cols, axis=1)


maps = {f"{label}, r'={r}": success(name, j) for name, label in
        (("subgm", "SubGM-ℓ1"), ("gd", "GD-ℓ2")) for j, r in enumerate(R_SEARCH)}
fig, axes = plt.subplots(1, 4, figsize=(18, 3.6))
for ax, (title, s) in zip(axes, maps.items()):
    im = ax.imshow(s, origin="lower", aspect="auto", vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(RATIOS)), [str(x) for x in RATIOS])
    ax.set_yticks(range(len(P)), [str(x) for x in P])
    ax.set_xlabel("m / (d·r)")
    ax.set_ylabel("outlier rate p")
    ax.set_title(title)
fig.colorbar(im, ax=list(axes), shrink=0.8, label=f"P(rel. error ≤ {THRESH:g})")
plt.show()

# %% [markdown]
# ## Checks

# %%
sub_map, gd_map = maps[f"SubGM-ℓ1, r'={R}"], maps[f"GD-ℓ2, r'={R}"]
i0, i2 = P.index(0.0), P.index(0.2)
# every device of the runtime took part in the same sweep call
assert last.n_devices == len(jax.devices()) and used == set(jax.devices()), (used, jax.devices())
# without outliers both methods recover X* at the largest m
assert sub_map[i0, -1] == 1.0 and gd_map[i0, -1] == 1.0, (sub_map, gd_map)
# with 20 % outliers at the largest m, SubGM-ℓ1 succeeds on every seed and GD-ℓ2 on none
assert sub_map[i2, -1] == 1.0 and gd_map[i2, -1] == 0.0, (sub_map, gd_map)
# more measurements never hurt SubGM here (monotone in m for every p)
assert np.all(sub_map[:, -1] >= sub_map[:, 0]), sub_map
print("checks passed")
