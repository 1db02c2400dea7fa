"""Settings of the paper's simulations (Ma & Fattahi §6) and our reconstructed constants.

Stated in the paper: d = 20, r = 3, m = 500, A_i i.i.d. N(0, 1), U₀ = α B with B from
Algorithm 2, outliers N(0, 100) (Fig. 1b). *Reconstructed* (not stated): X* eigenvalues
(10, 5, 1) with Haar-random V; float64; geometric step η = 0.2, ρ = 0.996, T = 6000;
α = 1e-15 unless the figure varies it; every other constant below.

Step-schedule exploration (measured here, 2–3 seeds, r'=20, α=1e-15, median final ‖·‖_F):
  (η, ρ, T)              p=0.4      p=0.6
  (0.2, 0.996, 6000)     2.4e-3     1.9
  (0.2, 0.998, 12000)    4.1e-1     3.0     budget η/(1−ρ) too large: residual grows
  (0.1, 0.998, 12000)    9.9e-3     2.0
  (0.05, 0.999, 12000)   9.1e-3     2.0
  (0.2, 0.999, 12000)    9.2e-1     3.2
  (0.02, 0.9995, 12000)  1.4e-3     0.9
  (0.02, 0.9995, 24000)  4e-6       0.6–1.8 (also 0.6–1.5 with r'=3: not over-parameterisation)
  (0.01, 0.99975, 24000) 6e-4       0.6–1.8
  (0.01, 0.9997, 24000)  1.2        1.5     budget too small: σ₃ = 1 never learned
Small random init (α·N(0,1/d)) instead of Algorithm 2 gave the same picture (within ~2×).
Hence: default (0.2, 0.996, 6000) for all figures (≈1e-10 for p ≤ 0.2); Fig. 1b adds the
slow schedule (0.02, 0.9995, 24000).
"""
D, R, M = 20, 3, 500
SPECTRUM = (10.0, 5.0, 1.0)
ETA, RHO, T = 0.2, 0.996, 6000
SLOW_ETA, SLOW_RHO, SLOW_T = 0.02, 0.9995, 24000
ALPHA = 1e-15
OUTLIER_SCALE = 10.0  # N(0, 100)
NU = 1.0  # Gaussian noise level of Figs 3a/3b (reconstructed)
GD_ETA = 0.005  # constant GD step on the ℓ2 loss (reconstructed; stable below ≈ 1/(4σ₁·2))
P_FIG2 = (0.2, 0.5)  # outlier rates of Fig. 2 (reconstructed; see fig2.py)
EXPECTED_ETA, EXPECTED_T = 0.02, 10000  # Fig. 5 (reconstructed)
FIG6_ALPHA, FIG6_T = 1e-3, 1500  # Figs 6–7 (reconstructed)
FIG7_ETA, FIG7_T = 0.03, 3000  # Fig. 7 (reconstructed)

NOTES = """
- Common constants (not stated in the paper): X* spectrum (10, 5, 1) with Haar-random V,
  float64, geometric step η = 0.2, ρ = 0.996, T = 6000, α = 1e-15, outliers N(0, 100);
  Gaussian noise ν = 1 (Figs 3a/3b); GD-ℓ2 constant step 0.005; Fig. 2 at p ∈ {0.2, 0.5};
  expected loss η = 0.02 (Figs 5–6), Fig. 7 Polyak step η = 0.03, α = 1e-3; small random
  init α·N(0, 1/d) for the expected loss (Figs 5–6). Each script's docstring lists its own.
- Step-schedule exploration for Fig. 1b (r' = 20, α = 1e-15, 2–3 seeds, median final
  ‖UUᵀ − X*‖_F), m = 500:

  | (η, ρ, T) | p = 0.4 | p = 0.6 |
  |---|---|---|
  | (0.2, 0.996, 6000) — default | 2.4e-3 | 1.9 |
  | (0.2, 0.998, 12000) | 4.1e-1 | 3.0 |
  | (0.1, 0.998, 12000) | 9.9e-3 | 2.0 |
  | (0.05, 0.999, 12000) | 9.1e-3 | 2.0 |
  | (0.2, 0.999, 12000) | 9.2e-1 | 3.2 |
  | (0.02, 0.9995, 12000) | 1.4e-3 | 0.9 |
  | (0.02, 0.9995, 24000) — Fig. 1b panel (b) | ≈ 3e-6 (still decreasing) | 0.6–1.8 |
  | (0.01, 0.99975, 24000) | 6e-4 | 0.6–1.8 |
  | (0.01, 0.9997, 24000) | 1.2 (σ₃ never learned) | 1.5 |
  | (0.005, 0.99985, 24000) | 1.2 (σ₃ never learned) | 1.5 |

  A step budget η/(1−ρ) of 100–200 lets the over-parameterised residual fit the outliers
  (error grows); at ≈ 33 the smallest eigenvalue is never learned; 40–50 works, and within
  that range a smaller η (with ρ closer to 1 and a longer T) is better at large p. Small random init
  (α·N(0, 1/d)) instead of Algorithm 2 gave the same numbers within ≈ 2×.
- p = 0.6 fails at m = 500 also with r' = 3 (0.6–1.5), so it is not over-parameterisation.
  It is the sample size (the theory needs m ∝ 1/(1−p)²): at p = 0.6 with the default
  schedule, m = 1000 reaches 6e-7 – 5e-3 and m = 2000 reaches ≈ 1e-12 (3 seeds each).
- Fig. 1c: the final error is not ≈ d·α² at these sizes: d·α² ≤ 2e-9 for α ≤ 1e-5, but with
  10% outliers α = 1e-5 ends at ≈ 1e-2 — the residual E grows during eigenvalue learning
  (Fig. 7b measures ‖GGᵀ‖ growing ≈ 1700× from its initial α²-scale on the empirical loss)
  and then shrinks only sub-linearly. On the noiseless empirical loss (Fig. 7) max ‖GGᵀ‖ and
  the final error both scale like α^0.96 between α = 1e-3 and 1e-6 (not α²); on the
  expected loss (Fig. 5) the slope is ≈ 1.6.
"""
