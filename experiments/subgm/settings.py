"""Settings of the paper's simulations (Ma & Fattahi §6) and our reconstructed constants.

Stated in the paper: d = 20, r = 3, m = 500, A_i i.i.d. N(0, 1), U₀ = α B with B from
Algorithm 2, outliers N(0, 100) (Fig. 1b). *Reconstructed* (not stated): X* eigenvalues
(10, 5, 1) with Haar-random V; float64; geometric step η = 0.2, ρ = 0.996, T = 6000
(a measured working choice, see README); α = 1e-15 unless the figure varies it.
"""
D, R, M = 20, 3, 500
SPECTRUM = (10.0, 5.0, 1.0)
ETA, RHO, T = 0.2, 0.996, 6000
ALPHA = 1e-15
OUTLIER_SCALE = 10.0  # N(0, 100)
