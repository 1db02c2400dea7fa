"""The atoms analysis (Hu et al., "Towards Atoms of Large Language Models", 2025/26).

Formula layer on plain arrays; no training or model code is imported here (that lives in
``experiments.atoms``); definitions and measured results: ``docs/atoms.md``. Several
details of the paper (Hu et al., "Towards atoms of large language models") are not
public; every such *reconstructed* choice is marked "RECONSTRUCTED" below and kept a
parameter.

Conventions
-----------
* Activations ``x``: (B, H) rows.
* A dictionary ``D``: (H, N), atoms are COLUMNS (compressed-sensing convention, as in
  ``jaxsense.sparse``). An SAE decoder ``W_dec`` (N, H) gives ``D = W_dec.T``
  (:func:`dictionary_from_decoder`). Codes: (B, N) with x ≈ codes @ D.T + b_dec.
* Metric S̃ (H, H): the atomic inner product (AIP) ⟨u, v⟩_S̃ = uᵀS̃v / (‖u‖_S̃‖v‖_S̃).

Main entry points
-----------------
MomentAccumulator / second_moment  — streamed uncentred E[x xᵀ] in float64 (numpy).
aip_from_moment → AIP              — S̃ = (E[x xᵀ] + ridge)⁻¹, S̃^{1/2}, condition number.
whiten, pairwise_angles, angle_histogram, representation_shift — the "representation shift".
unit_metrics                        — one row of the units table (coherence, L0, uniqueness,
                                      q*, R² Euclidean and S̃, RIP, ℓ1 recoverability).
planted_data, threshold_interval, theory_check — the threshold-SAE identifiability check.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxsense import _checks
from jaxsense import sparse as sp
from sae.moments import MomentAccumulator, SecondMoment  # the one accumulator

__all__ = [
    "AIP",
    "MomentAccumulator",
    "SecondMoment",
    "aip_cosine",
    "aip_from_moment",
    "angle_histogram",
    "angle_summary",
    "dictionary_from_decoder",
    "k_from_l0",
    "l0_per_sample",
    "l1_recoverability",
    "match_atoms",
    "neuron_units",
    "pairwise_angles",
    "planted_data",
    "planted_support_recovery",
    "q_star",
    "r2",
    "representation_shift",
    "rip_estimate",
    "sae_units",
    "second_moment",
    "store_second_moment",
    "theory_check",
    "threshold_interval",
    "tsae_construction",
    "uniqueness_per_atom",
    "uniqueness_per_sample",
    "uniqueness_readings",
    "unit_metrics",
    "whiten",
]


# ============================================================================ second moment
def second_moment(batches: Iterable, *, max_samples: int | None = None,
                  precision: str = "float64") -> SecondMoment:
    """Streamed uncentred second moment E[x xᵀ] over an iterable of (B, H) batches
    (an ``ActivationStore``'s batch iterator, a list of arrays, a memmap …).

    RECONSTRUCTED: the paper (earlier code) uses ~100K samples, no centring, no shrinkage;
    ``max_samples`` caps the count (default: all)."""
    if isinstance(batches, np.ndarray) or hasattr(batches, "shape"):
        batches = [batches]
    acc = MomentAccumulator(precision=precision)
    for b in batches:
        if max_samples is not None and acc.n >= max_samples:
            break
        b = np.asarray(b)
        if max_samples is not None:
            b = b[: max_samples - acc.n]
        acc.update(b)
    return acc.result()


def store_second_moment(store, *, layer: int | None = None, max_samples: int | None = None,
                        chunk_rows: int = 16384, precision: str = "float64") -> SecondMoment:
    """Second moment of one layer of an ``sae.activations.ActivationStore``, streamed from its
    memory-mapped shards in cache order (``store.activations(shard, layer)``). An empty store
    raises ValueError (naming the store) before any compute."""
    n_tokens = int(getattr(store, "n_tokens", 0))
    if n_tokens == 0:
        raise ValueError(
            f"store={store!r}: empty store (n_tokens=0); expected a cache with >= 1 row")
    layer = store.layer if layer is None else layer

    def chunks():
        for sh in range(store.n_shards):
            mm = store.activations(sh, layer)
            for a in range(0, mm.shape[0], chunk_rows):
                yield mm[a:a + chunk_rows]

    return second_moment(chunks(), max_samples=max_samples, precision=precision)


# ============================================================================ AIP metric
class AIP(NamedTuple):
    """The atomic inner-product metric.

    S: S̃ = (E[xxᵀ] + r·I)⁻¹ (H, H); S_half: S̃^{1/2} (symmetric square root, the whitening
    map x ↦ S̃^{1/2} x); S_inv_half: S̃^{-1/2} (maps whitened atoms back); eigvals: the
    eigvals: the eigenvalues of E[xxᵀ] + r·I (ascending); cond: max/min ratio of the KEPT
    eigenvalues; ridge: r (absolute); rank: number of kept eigenvalues (H unless
    ``singular="pinv"`` dropped some). All float64 numpy."""

    S: np.ndarray
    S_half: np.ndarray
    S_inv_half: np.ndarray
    eigvals: np.ndarray
    cond: float
    ridge: float
    rank: int = -1


def aip_from_moment(m2, *, ridge: float = 0.0, ridge_relative: bool = True,
                    max_cond: float = 1e12, singular: str = "raise",
                    pinv_rtol: float = 1e-10) -> AIP:
    """S̃ = (E[x xᵀ])⁻¹ (Hu et al.'s atomic inner product), via a float64 eigendecomposition.

    ``ridge`` (default 0 = the paper's plain inverse): adds r·I before inverting; with
    ``ridge_relative`` r = ridge · tr(E[xxᵀ])/H (scale-free; RECONSTRUCTED choice).
    Raises ValueError when the (ridged) moment is singular — min eigenvalue ≤ 0 or condition
    number > ``max_cond`` — naming the value and suggesting ridge > 0 — unless
    ``singular="pinv"``: then eigenvalues ≤ ``pinv_rtol``·λ_max are dropped and S̃ is the
    Moore–Penrose pseudo-inverse (the AIP on the data's span; components outside it get
    norm 0). Real case: MiniLM's last layer is rank-deficient (measured rank in
    ``docs/atoms.md``).
    Pass a :class:`SecondMoment` or a (H, H) array."""
    if isinstance(m2, SecondMoment):
        m2 = m2.m2
    elif hasattr(m2, "second_moment"):  # sae.store.Moments (the ActivationStore's stats)
        m2 = m2.second_moment
    m2 = np.asarray(m2, np.float64)
    if m2.ndim != 2 or m2.shape[0] != m2.shape[1] or m2.shape[0] < 1:
        raise ValueError(f"m2 must be a square (H, H) second moment; got shape {m2.shape}")
    if not np.all(np.isfinite(m2)):
        raise ValueError("m2 contains NaN/Inf; expected a finite second moment")
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0; got {ridge}")
    if singular not in ("raise", "pinv"):
        raise ValueError(f"singular must be 'raise' or 'pinv'; got {singular!r}")
    if not np.any(m2):
        raise ValueError(f"m2 (second moment, H={m2.shape[0]}) is all zeros (all-zero "
                         "activations?); expected a non-zero moment — no ridge or "
                         "pseudo-inverse defines an AIP for it")
    H = m2.shape[0]
    r = float(ridge) * (np.trace(m2) / H if ridge_relative else 1.0)
    m = 0.5 * (m2 + m2.T) + r * np.eye(H)
    ev, V = np.linalg.eigh(m)
    lo, hi = ev[0], ev[-1]
    cond = float(hi / lo) if lo > 0 else float("inf")
    if singular == "pinv":
        keep = ev > pinv_rtol * max(hi, 1e-300)
        if not keep.any():
            raise ValueError(f"m2 (second moment, H={H}) has no positive eigenvalue (max "
                             f"{hi:.3e}); expected a positive semi-definite, non-zero moment")
        Vk, ek = V[:, keep], ev[keep]
        S = (Vk / ek) @ Vk.T
        return AIP(S, (Vk / np.sqrt(ek)) @ Vk.T, (Vk * np.sqrt(ek)) @ Vk.T, ev,
                   float(ek[-1] / ek[0]), r, int(keep.sum()))
    if lo <= 0 or cond > max_cond:
        raise ValueError(
            f"m2 (second moment, H={H}) is singular or ill-conditioned: min eigenvalue {lo:.3e}, "
            f"condition number {cond:.3e} > max_cond={max_cond:.1e} with ridge={ridge}; expected "
            f"a positive-definite moment — pass ridge > 0 (e.g. 1e-6) or more samples (n ≥ H)")
    S = (V / ev) @ V.T
    S_half = (V / np.sqrt(ev)) @ V.T
    S_inv_half = (V * np.sqrt(ev)) @ V.T
    return AIP(S, S_half, S_inv_half, ev, cond, r, H)


def whiten(x, aip: AIP):
    """x ↦ S̃^{1/2} x, row-wise for (B, H) input: under the whitened coordinates the AIP is the
    ordinary cosine (S̃^{1/2} is symmetric, so x @ S̃^{1/2} is the row form)."""
    S_half = jnp.asarray(aip.S_half if isinstance(aip, AIP) else aip)
    x = jnp.asarray(x)
    if x.shape[-1] != S_half.shape[0]:
        raise ValueError(
            f"x has width {x.shape[-1]} but the AIP metric is {S_half.shape[0]}-dimensional "
            f"(dictionary width mismatch); expected x.shape[-1] == {S_half.shape[0]}")
    return x @ S_half.astype(x.dtype)


def dictionary_from_decoder(W_dec):
    """SAE decoder (N, H) → dictionary D (H, N) with atoms as columns."""
    W_dec = jnp.asarray(W_dec)
    if W_dec.ndim != 2:
        raise ValueError(f"W_dec must be (N, H); got shape {W_dec.shape}")
    return W_dec.T


def aip_cosine(u, v, S=None):
    """⟨u, v⟩_S / (‖u‖_S ‖v‖_S), row-wise over a leading batch axis. S=None: cosine."""
    Su = u if S is None else u @ jnp.asarray(S, u.dtype)
    num = jnp.sum(Su * v, -1)
    nu = jnp.sum(Su * u, -1)
    Sv = v if S is None else v @ jnp.asarray(S, v.dtype)
    nv = jnp.sum(Sv * v, -1)
    return num / jnp.sqrt(jnp.maximum(nu * nv, 1e-30))


# ============================================================================ angles
def pairwise_angles(X, S=None, *, key, n_pairs: int = 10000):
    """Angles (degrees) between ``n_pairs`` random pairs of distinct rows of X (B, H) under the
    metric S (None = Euclidean). Pairs are drawn uniformly with replacement over pairs."""
    X = jnp.asarray(X)
    if X.ndim != 2 or X.shape[0] < 2:
        raise ValueError(f"X must be (B, H) with B >= 2; got shape {X.shape}")
    if S is not None and np.shape(S) != (X.shape[1], X.shape[1]):
        raise ValueError(f"S must be ({X.shape[1]}, {X.shape[1]}); got {np.shape(S)}")
    B = X.shape[0]
    k1, k2 = jax.random.split(key)
    i = jax.random.randint(k1, (n_pairs,), 0, B)
    j = (i + jax.random.randint(k2, (n_pairs,), 1, B)) % B  # j ≠ i
    c = aip_cosine(X[i], X[j], S)
    return jnp.degrees(jnp.arccos(jnp.clip(c, -1.0, 1.0)))


def angle_histogram(angles, bins: int = 90, range_: tuple = (0.0, 180.0)):
    """Histogram (density) of angles in degrees. Returns (density (bins,), edges (bins+1,))."""
    counts, edges = np.histogram(np.asarray(angles), bins=bins, range=range_, density=True)
    return counts, edges


def angle_summary(angles) -> dict:
    a = np.asarray(angles, np.float64)
    return {"mean": float(a.mean()), "median": float(np.median(a)), "std": float(a.std()),
            "frac_80_100": float(np.mean((a >= 80) & (a <= 100)))}


def representation_shift(x, aip: AIP, *, key, n_pairs: int = 10000, W_dec_euclid=None,
                         bins: int = 90) -> dict:
    """Pairwise-angle distributions, Euclidean vs AIP, with controls (Hu et al.'s
    "representation shift", plus controls for the circularity critique of it):

    - ``activations``: the data rows;
    - ``gaussian_iso``: N(0, I) vectors (a pure-noise reference, ~90° in both geometries
      only in the Euclidean one);
    - ``gaussian_matched``: N(0, E[xxᵀ]) vectors — same second moment as the data; under the
      AIP they re-centre at 90° BY CONSTRUCTION (whitening makes their covariance I), so
      the data's re-centring is only informative beyond this control;
    - ``gaussian_mean_cov``: N(x̄, Cov(x)) vectors (x̄, Cov from ``x``) — same mean AND
      covariance as the data, so it reproduces the Euclidean concentration from the shared
      mean; what the AIP does to it is what the AIP does to "any cloud with these moments";
    - ``euclid_sae_atoms``: decoder rows of a Euclidean-trained SAE (if given).
    Returns {name: {"euclid": summary, "aip": summary, "hist_euclid", "hist_aip", "edges"}}.
    """
    x = np.asarray(x, np.float32)
    B, H = x.shape
    S = jnp.asarray(aip.S, jnp.float32)
    ks = jax.random.split(key, 8)
    g_iso = jax.random.normal(ks[0], (B, H))
    # N(0, M2) = S̃^{-1/2} z, z ~ N(0, I)  (S̃^{-1/2} is symmetric)
    g_matched = jax.random.normal(ks[1], (B, H)) @ jnp.asarray(aip.S_inv_half, jnp.float32)
    xd = x.astype(np.float64)
    mu = xd.mean(0)
    ev, V = np.linalg.eigh(np.cov(xd, rowvar=False) if B > 1 else np.eye(H))
    C_half = (V * np.sqrt(np.maximum(ev, 0.0))) @ V.T
    g_mc = jnp.asarray(mu, jnp.float32) + jax.random.normal(ks[7], (B, H)) @ jnp.asarray(
        C_half, jnp.float32)
    sets = {"activations": jnp.asarray(x), "gaussian_iso": g_iso, "gaussian_matched": g_matched,
            "gaussian_mean_cov": g_mc}
    if W_dec_euclid is not None:
        W = jnp.asarray(W_dec_euclid, jnp.float32)
        if W.shape[-1] != H:
            raise ValueError(f"W_dec_euclid has width {W.shape[-1]}, expected H = {H}")
        sets["euclid_sae_atoms"] = W
    out = {}
    kp = jax.random.split(ks[2], len(sets))
    for t, (name, X) in enumerate(sets.items()):
        ae = pairwise_angles(X, None, key=kp[t], n_pairs=n_pairs)
        aa = pairwise_angles(X, S, key=kp[t], n_pairs=n_pairs)
        he, edges = angle_histogram(ae, bins)
        ha, _ = angle_histogram(aa, bins)
        out[name] = {"euclid": angle_summary(ae), "aip": angle_summary(aa),
                     "hist_euclid": he.tolist(), "hist_aip": ha.tolist(),
                     "edges": edges.tolist()}
    return out


# ============================================================================ sparsity / uniqueness
def l0_per_sample(codes, tol: float = 0.0):
    """Number of entries with |code| > tol per sample. (B,) int32."""
    return jnp.sum(jnp.abs(jnp.asarray(codes)) > tol, axis=-1).astype(jnp.int32)


def k_from_l0(l0, k_quantile: float | str = 0.5) -> float:
    """K for the coherence tests from per-sample L0. RECONSTRUCTED: we read Hu et al.'s K as "a
    quantile of per-sample L0"; default the median (0.5). Also "mean" or "max"."""
    l0 = np.asarray(l0, np.float64)
    if l0.size == 0:
        raise ValueError("l0 is empty; expected per-sample L0 of at least one sample")
    if isinstance(k_quantile, str):
        _checks.check_choice("k_quantile", k_quantile, ("mean", "max"))
        return float(l0.mean() if k_quantile == "mean" else l0.max())
    _checks.check_scalar("k_quantile", k_quantile, low=0.0, high=1.0)
    return float(np.quantile(l0, float(k_quantile)))


def _bound(K):
    """1/(2K − 1), with K < 1 treated as K = 1 (an empty / single support is always unique)."""
    K = np.maximum(np.asarray(K, np.float64), 1.0)
    return 1.0 / (2.0 * K - 1.0)


def uniqueness_per_atom(mu_atoms, l0, *, k_quantile: float | str = 0.5) -> dict:
    """Fraction of atoms with μ_i < 1/(2K − 1), K = :func:`k_from_l0` (Hu et al.'s
    uniqueness condition, our best reading). Returns {"fraction", "K", "bound", "ok" (N,)}."""
    K = k_from_l0(l0, k_quantile)
    b = float(_bound(K))
    ok = np.asarray(mu_atoms) < b
    return {"fraction": float(ok.mean()), "K": K, "bound": b, "ok": ok}


def q_star(mu_atoms, l0, *, n_grid: int = 2001) -> float:
    """v2 stability q* = sup{q ∈ [0, 1] : μ_q < 1/(2K_q − 1)}, μ_q and K_q the q-quantiles of
    per-atom coherence and per-sample L0 (Hu et al.'s stability metric). Both quantiles grow
    with q, so the set is an interval [0, q*]; evaluated on a grid of ``n_grid`` q values (0 if even
    q = 0 fails). Quantiles use numpy's linear interpolation (RECONSTRUCTED detail)."""
    mu = np.asarray(mu_atoms, np.float64)
    l0 = np.asarray(l0, np.float64)
    if mu.size == 0 or l0.size == 0:
        raise ValueError(f"mu_atoms and l0 must be non-empty; got sizes {mu.size}, {l0.size}")
    q = np.linspace(0.0, 1.0, n_grid)
    ok = np.quantile(mu, q) < _bound(np.quantile(l0, q))
    if not ok[0]:
        return 0.0
    bad = np.nonzero(~ok)[0]
    return float(q[-1] if bad.size == 0 else q[bad[0] - 1])


def l0_relative(codes, rel_tol: float):
    """Per-sample L0 counting only codes with |c_j| > ``rel_tol``·max_j |c_j| (a reading in
    which near-zero codes do not count toward the support; RECONSTRUCTED — Hu et al. do not
    state a threshold). All-zero rows have L0 0. (B,) int32."""
    _checks.check_scalar("rel_tol", rel_tol, low=0.0, high=1.0, high_open=True)
    a = jnp.abs(jnp.asarray(codes))
    m = jnp.max(a, axis=-1, keepdims=True)
    return jnp.sum((a > rel_tol * m) & (a > 0), axis=-1).astype(jnp.int32)


DEFAULT_K_READINGS = (0.1, 0.25, 0.5, "mean", 0.9)


def uniqueness_readings(mu_atoms, codes, *, k_readings=DEFAULT_K_READINGS,
                        rel_tols=(1e-2,)) -> dict:
    """Several readings of Hu et al.'s uniqueness numbers for one unit, so that the reading
    that reproduces the paper (if any) can be found:

    - per-atom ("v1"): fraction of atoms with μ_i < 1/(2K − 1) for K = each entry of
      ``k_readings`` (a quantile of per-sample L0, or "mean" / "max"; :func:`k_from_l0`);
    - quantile ("v2"): q* = sup{q : μ_q < 1/(2K_q − 1)} (:func:`q_star`);
    both with L0 = the exact count of non-zero codes ("exact") and with L0 counting only
    |c| > τ·max|c| per sample (``"rel{τ:g}"``, :func:`l0_relative`; neurons' dense codes x
    get a finite support this way).

    mu_atoms: (N,) per-atom coherence (in the AIP); codes: (B, N).
    Returns {l0_name: {"l0_mean", "K": {label: K}, "v1": {label: fraction}, "q_star"}} with
    labels "q0.1", …, "mean"."""
    mu = np.asarray(mu_atoms, np.float64)
    _checks.check_finite("codes", codes)
    if np.ndim(codes) != 2 or np.shape(codes)[1] != mu.shape[0]:
        raise ValueError(f"codes: expected (B, N={mu.shape[0]}) codes of the {mu.shape[0]} "
                         f"atoms in mu_atoms; got shape {np.shape(codes)}")
    for kq in k_readings:  # validate every reading before any compute
        if isinstance(kq, str):
            _checks.check_choice("k_readings entry", kq, ("mean", "max"))
        else:
            _checks.check_scalar("k_readings entry", kq, low=0.0, high=1.0)
    for t in rel_tols:
        _checks.check_scalar("rel_tols entry", t, low=0.0, high=1.0, high_open=True)
    l0s = {"exact": np.asarray(l0_per_sample(codes))}
    for t in rel_tols:
        l0s[f"rel{t:g}"] = np.asarray(l0_relative(codes, t))
    out = {}
    for name, l0 in l0s.items():
        lab = {kq: (kq if isinstance(kq, str) else f"q{kq:g}") for kq in k_readings}
        Ks = {lab[kq]: k_from_l0(l0, kq) for kq in k_readings}
        out[name] = {"l0_mean": float(l0.mean()), "K": Ks,
                     "v1": {n: float(np.mean(mu < _bound(K))) for n, K in Ks.items()},
                     "q_star": q_star(mu, l0)}
    return out


def uniqueness_per_sample(D, codes, S=None, *, k_max: int | None = None, mu_atoms=None,
                          tol: float = 0.0) -> dict:
    """Per-sample uniqueness tests with |T| = the sample's L0:

    - ``support``: support-restricted coherence max_{i≠j∈T}|⟨d_i,d_j⟩_S̃| < 1/(2|T|−1)
      (a per-sample variant of Hu et al.'s test: "does the active set itself look orthogonal?" — NOT a
      recovery guarantee on its own);
    - ``atom``: max_{i∈T} μ_i < 1/(2|T|−1) with μ_i against ALL atoms — a rigorous sufficient
      condition for exact recovery of that sample by BP/OMP (ERC via Gershgorin).
    Samples with L0 > k_max (default: max L0, capped at N) count as failures.
    Returns fractions and (B,) boolean arrays."""
    _check_dict("D", D)
    _checks.check_finite("codes", codes)
    D = jnp.asarray(D)
    codes = jnp.asarray(codes)
    _check_codes(D, codes)
    l0 = l0_per_sample(codes, tol)
    if k_max is None:
        k_max = int(max(1, min(int(jnp.max(l0)), D.shape[1])))
    G = sp.normalized_gram(D, None if S is None else jnp.asarray(S, D.dtype))
    if mu_atoms is None:
        mu_atoms = jnp.max(jnp.abs(G) * (1 - jnp.eye(G.shape[0], dtype=G.dtype)), axis=1)
    idx, valid = sp.support_from_codes(codes, k_max, tol)
    b = jnp.asarray(_bound(np.asarray(l0)), G.dtype)
    fits = l0 <= k_max
    ok_s = (sp.support_coherence(G, idx, valid) < b) & fits
    ok_a = (sp.support_atom_coherence(jnp.asarray(mu_atoms, G.dtype), idx, valid) < b) & fits
    return {"support_fraction": float(jnp.mean(ok_s)), "atom_fraction": float(jnp.mean(ok_a)),
            "support_ok": np.asarray(ok_s), "atom_ok": np.asarray(ok_a)}


def _check_dict(name, D):
    """A 2-D floating-point dictionary with finite entries (integer D gives all-NaN
    metrics); checked on the caller's array before any cast."""
    if np.ndim(D) != 2:
        raise ValueError(f"{name}: expected a 2-D array, got shape {np.shape(D)}")
    _checks.check_real_array(name, D)


def _check_codes(D, codes):
    if codes.ndim != 2 or codes.shape[1] != D.shape[1]:
        raise ValueError(
            f"codes must be (B, N) with N = {D.shape[1]} atoms of D (dictionary width "
            f"mismatch); got codes shape {codes.shape}")


# ============================================================================ R² / RIP / ℓ1
def r2(x, x_hat, S=None):
    """Faithfulness R² = 1 − Σ‖x − x̂‖² / Σ‖x − x̄‖² (mean-centred denominator, Hu et al.'s
    "faithfulness" R²); with ``S`` the norms are ‖v‖²_S = vᵀ S v. Pure jnp, jit/vmap-able:
    returns a 0-d array in the inputs' floating dtype (float32 unless x64 is enabled). Shapes
    are checked under jit too; the zero-variance check (ValueError) only on concrete input
    (under jit a constant x gives nan/−inf)."""
    _checks.check_finite("x", x)
    _checks.check_finite("x_hat", x_hat)
    x = jnp.asarray(x)
    xh = jnp.asarray(x_hat)
    if x.shape != xh.shape:
        raise ValueError(f"x_hat must have the shape of x {x.shape}; got {xh.shape}")
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"x must be (B, H) with B >= 2; got {x.shape}")
    dt = jnp.result_type(x.dtype, xh.dtype, float)
    x, xh = x.astype(dt), xh.astype(dt)
    e = x - xh
    c = x - x.mean(0, keepdims=True)
    if S is None:
        num, den = jnp.sum(e * e), jnp.sum(c * c)
    else:
        S = jnp.asarray(S)
        if S.shape != (x.shape[1], x.shape[1]):
            raise ValueError(f"S must be ({x.shape[1]}, {x.shape[1]}); got shape {S.shape}")
        S = S.astype(dt)
        num, den = jnp.sum((e @ S) * e), jnp.sum((c @ S) * c)
    if not isinstance(den, jax.core.Tracer) and not float(den) > 0:
        raise ValueError(f"x has zero variance (Σ‖x − x̄‖² = {float(den)}); R² is undefined")
    return 1.0 - num / den


def rip_estimate(D, S, K: int, *, key, n_supports: int = 1024, mu: float | None = None) -> dict:
    """Sampled δ_K (lower bound; :func:`jaxsense.sparse.rip_constant`) of the S̃-normalised
    dictionary and the Gershgorin upper bound (K−1)μ. K is rounded to an integer ≥ 1."""
    _check_dict("D", D)
    D = jnp.asarray(D)
    Ki = int(max(1, min(round(float(K)), D.shape[1])))
    Sj = None if S is None else jnp.asarray(S, D.dtype)
    est = sp.rip_constant(D, Ki, key, n_supports, Sj)
    if mu is None:
        mu = float(sp.mutual_coherence(D, Sj))
    return {"K": Ki, "delta_sampled": float(est.delta),
            "delta_q50": float(jnp.median(est.per_support)),
            "gershgorin_bound": float((Ki - 1) * mu), "rip_by_gershgorin": bool((Ki - 1) * mu < 1)}


def l1_recoverability(D, codes, *, x=None, b_dec=None, S=None, target: str = "reconstruction",
                      n_iter: int = 500, rho: float = 10.0, nonneg: bool = False,
                      tol: float = 1e-2) -> dict:
    """ℓ1 recoverability: basis pursuit min ‖δ‖₁ s.t. Dδ = y over the S̃-normalised atoms, and
    support agreement of its solution with the SAE's codes.

    ``target`` (RECONSTRUCTED choice): "reconstruction" — y = codes @ Dᵀ (= x̂ − b_dec), so
    the question is exactly "is the SAE's code the ℓ1-minimal representation of what it
    reconstructs?"; "activation" — y = x − b_dec (needs ``x``), which also mixes in the
    reconstruction error. Support: |δ_i| > tol·max|δ| (relative). Requires N ≥ H and a full-rank
    D (else the equality constraint may be infeasible; then ``bp_residual`` shows it).
    Returns exact-support rate, mean Jaccard / precision / recall, median relative residual."""
    _check_dict("D", D)
    _checks.check_finite("codes", codes)
    if x is not None:
        _checks.check_real_array("x", x)
    D = jnp.asarray(D, jnp.float32)
    codes = jnp.asarray(codes, jnp.float32)
    _check_codes(D, codes)
    H = D.shape[0]
    if target == "reconstruction":
        y = codes @ D.T
    elif target == "activation":
        if x is None:
            raise ValueError("target='activation' needs x; got x=None")
        y = jnp.asarray(x, jnp.float32)
        if y.shape[-1] != H:
            raise ValueError(f"x has width {y.shape[-1]}; expected H = {H}")
        if b_dec is not None:
            y = y - jnp.asarray(b_dec, jnp.float32)
    else:
        raise ValueError(f"target must be 'reconstruction' or 'activation'; got {target!r}")
    Sj = None if S is None else jnp.asarray(S, jnp.float32)
    res = sp.basis_pursuit(D, y, S=Sj, n_iter=n_iter, rho=rho, nonneg=nonneg)
    ag = sp.support_agreement(codes, res.coef, tol=tol)
    # samples with all-zero codes and y = 0: agreement is trivially exact
    return {"exact_support": float(jnp.mean(ag["exact"])),
            "jaccard": float(jnp.mean(ag["jaccard"])),
            "precision": float(jnp.mean(ag["precision"])),
            "recall": float(jnp.mean(ag["recall"])),
            "bp_residual_median": float(jnp.median(res.residual)),
            "n": int(codes.shape[0])}


# ============================================================================ units table
def neuron_units(x):
    """Neurons as units: D = I (H×H), codes = x, b_dec = 0 (Hu et al.'s neuron baseline)."""
    x = np.asarray(x, np.float32)
    return {"D": np.eye(x.shape[1], dtype=np.float32), "codes": x,
            "b_dec": np.zeros(x.shape[1], np.float32), "x_hat": x}


def sae_units(params: dict, x, encode_fn, *, aip: AIP | None = None, whitened: bool = False):
    """Units of an SAE given as a plain param dict (Gemma Scope layout: W_enc (H,N), W_dec (N,H),
    b_enc, b_dec, threshold) and an ``encode_fn(params, x) -> codes`` (e.g. ``sae.model.encode``).

    ``whitened=True`` (the AIP-geometry SAE trained on S̃^{1/2}x): codes are computed on the
    whitened x; atoms and b_dec are mapped back to activation space by S̃^{-1/2}, so
    x̂ = codes @ (W_dec S̃^{-1/2}) + b_dec S̃^{-1/2} in the original coordinates."""
    x = np.asarray(x, np.float32)
    W_dec = np.asarray(params["W_dec"], np.float32)
    b_dec = np.asarray(params["b_dec"], np.float32)
    if W_dec.shape[1] != x.shape[1]:
        raise ValueError(
            f"params['W_dec'] has width {W_dec.shape[1]} but x has {x.shape[1]} (dictionary "
            f"width mismatch); expected W_dec.shape[1] == x.shape[1]")
    xin = x
    if whitened:
        if aip is None:
            raise ValueError("whitened=True needs the AIP used for training; got aip=None")
        xin = np.asarray(whiten(x, aip))
        Sih = np.asarray(aip.S_inv_half, np.float32)
        W_dec = W_dec @ Sih
        b_dec = b_dec @ Sih
    codes = np.asarray(encode_fn(params, jnp.asarray(xin)), np.float32)
    x_hat = codes @ W_dec + b_dec
    return {"D": W_dec.T, "codes": codes, "b_dec": b_dec, "x_hat": x_hat}


def unit_metrics(x, units: dict, aip: AIP, *, key, k_quantile: float | str = 0.5,
                 n_supports: int = 512, n_bp: int = 512, bp_iter: int = 500,
                 coherence_block: int | None = 4096, per_sample: bool = True,
                 bp_target: str = "reconstruction", readings: bool = False,
                 k_readings=DEFAULT_K_READINGS, rel_tols=(1e-2,)) -> dict:
    """One row of the units table for activations x (B, H) and units {"D" (H,N), "codes" (B,N),
    "x_hat" (B,H)} (see :func:`neuron_units`, :func:`sae_units`):

    R² (Euclidean, S̃ norm), mean/median L0, coherence in the AIP (max, median per-atom),
    uniqueness fraction per atom (μ_i < 1/(2K−1), K = quantile of L0), q*, per-sample
    uniqueness (support-restricted and atom-wise), RIP (sampled δ_K and Gershgorin),
    ℓ1 recoverability on the first ``n_bp`` samples (only when N ≥ H; neurons are trivially
    recoverable and skipped). ``readings=True`` adds ``row["readings"]``: the per-atom and
    quantile uniqueness under several K and L0 readings (:func:`uniqueness_readings`)."""
    _checks.check_real_array("x", x)
    _check_dict("units['D']", units["D"])
    _checks.check_finite("units['codes']", units["codes"])
    _checks.check_finite("units['x_hat']", units["x_hat"])
    if np.ndim(x) != 2:
        raise ValueError(f"x: expected (B, H) activations, got shape {np.shape(x)}")
    if np.ndim(units["codes"]) != 2 or np.shape(units["codes"])[0] != np.shape(x)[0]:
        raise ValueError(f"units['codes']: expected ({np.shape(x)[0]}, N), one row per row of "
                         f"x; got shape {np.shape(units['codes'])}")
    if np.shape(units["x_hat"]) != np.shape(x):
        raise ValueError(f"units['x_hat']: expected the shape of x {np.shape(x)}; got "
                         f"{np.shape(units['x_hat'])}")
    x = np.asarray(x, np.float32)
    D = jnp.asarray(units["D"], jnp.float32)
    codes = jnp.asarray(units["codes"], jnp.float32)
    if D.shape[0] != x.shape[1]:
        raise ValueError(
            f"units['D'] has {D.shape[0]} rows but x has width {x.shape[1]} (dictionary width "
            f"mismatch); expected D of shape ({x.shape[1]}, N)")
    _check_codes(D, codes)
    S32 = jnp.asarray(aip.S, jnp.float32)
    k1, _ = jax.random.split(key)
    mu = np.asarray(sp.atom_coherence(D, S32, block=coherence_block))
    l0 = np.asarray(l0_per_sample(codes))
    uq = uniqueness_per_atom(mu, l0, k_quantile=k_quantile)
    row = {
        "H": int(D.shape[0]), "N": int(D.shape[1]), "n_samples": int(x.shape[0]),
        "r2": float(r2(x, units["x_hat"])), "r2_aip": float(r2(x, units["x_hat"], aip.S)),
        "l0_mean": float(l0.mean()), "l0_median": float(np.median(l0)),
        "mu_max": float(mu.max()), "mu_median": float(np.median(mu)),
        "K": uq["K"], "uniqueness_atoms": uq["fraction"], "q_star": q_star(mu, l0),
    }
    if readings:
        row["readings"] = uniqueness_readings(mu, codes, k_readings=k_readings,
                                              rel_tols=rel_tols)
    if per_sample:
        kmax = int(min(max(1, l0.max()), D.shape[1], 512))
        us = uniqueness_per_sample(D, codes, S32, k_max=kmax, mu_atoms=jnp.asarray(mu))
        row["uniqueness_samples_support"] = us["support_fraction"]
        row["uniqueness_samples_atom"] = us["atom_fraction"]
    rip = rip_estimate(D, S32, uq["K"], key=k1, n_supports=n_supports, mu=float(mu.max()))
    row.update({"rip_" + k: v for k, v in rip.items()})
    if D.shape[1] > D.shape[0] and n_bp > 0:
        l1 = l1_recoverability(D, codes[:n_bp], x=x[:n_bp], b_dec=units.get("b_dec"), S=S32,
                               n_iter=bp_iter, target=bp_target)
        row.update({"l1_" + k: v for k, v in l1.items()})
    return row


# ============================================================================ theory check
def planted_data(key, *, H: int = 64, N: int = 128, K: int = 3, n: int = 4096,
                 dictionary: str = "dirac_hadamard", delta_range=(0.7, 1.0),
                 fixed_k: bool = True):
    """Planted sparse data x = D δ: non-negative codes with exactly K (or ≤ K if not
    ``fixed_k``) non-zeros drawn uniformly in ``delta_range``.

    ``dictionary``: "dirac_hadamard" ([I, Hadamard/√H], N = 2H, Euclidean μ = 1/√H; H a
    power of 2) or "gaussian" (unit-norm Gaussian columns). Returns (x (n,H), D (H,N),
    codes (n,N)) as float32 numpy."""
    if K < 1 or K > N:
        raise ValueError(f"K must be in [1, N={N}]; got {K}")
    kd, ks, kv, kk = jax.random.split(key, 4)
    from .data import planted_dictionary  # the one planted-dictionary generator

    D = planted_dictionary(kd, H, N, kind=dictionary, dtype=np.float64).T
    _, supp = jax.lax.top_k(jax.random.uniform(ks, (n, N)), K)
    lo, hi = delta_range
    vals = jax.random.uniform(kv, (n, K), minval=lo, maxval=hi)
    if not fixed_k:
        keep = jax.random.uniform(kk, (n, K)) < 0.5
        keep = keep.at[:, 0].set(True)
        vals = vals * keep
    codes = np.zeros((n, N), np.float32)
    np.put_along_axis(codes, np.asarray(supp), np.asarray(vals), axis=1)
    x = (codes.astype(np.float64) @ D.T).astype(np.float32)
    return x, D.astype(np.float32), codes


def threshold_interval(eps: float, K: int, delta_min: float, delta_max: float) -> dict:
    """The threshold-SAE identifiability interval (Hu et al.'s identifiability conditions, classical form):
    ε K δ_max < τ < δ_min − ε (K − 1) δ_max, feasible iff δ_min > ε (2K − 1) δ_max."""
    lo = eps * K * delta_max
    hi = delta_min - eps * (K - 1) * delta_max
    return {"lo": float(lo), "hi": float(hi), "feasible": bool(hi > lo),
            "tau_mid": float(0.5 * (lo + hi))}


def tsae_construction(D, S=None):
    """The theorem's SAE: atoms normalised in ‖·‖_S, W_dec = D̂ᵀ (N, H), W_enc = S D̂ (H, N),
    i.e. pre-activations π = x W_enc = (D̂ᵀ S x)ᵀ. Returns (W_enc, W_dec, scale) where
    ``scale`` (N,) = ‖d_i‖_S rescales codes: δ̂_i = δ_i ‖d_i‖_S (so x = D̂ δ̂)."""
    _check_dict("D", D)
    D = np.asarray(D, np.float64)
    S = np.eye(D.shape[0]) if S is None else np.asarray(S, np.float64)
    scale = np.sqrt(np.einsum("hn,hk,kn->n", D, S, D))
    Dn = D / scale
    return (S @ Dn).astype(np.float32), Dn.T.astype(np.float32), scale


def theory_check(x, D, codes, S=None, *, tau: float | None = None) -> dict:
    """Planted-data check of the threshold-SAE theorem: with W_dec = D̂, W_enc = D̂ᵀS (atoms
    S-normalised), ε = μ_S(D), δ_min/δ_max the extreme non-zero rescaled codes and τ in the
    interval of :func:`threshold_interval` (midpoint unless given), the SAE's support
    1[π ≥ τ] equals the planted support for every sample. Returns the interval, ε, K and the
    measured support-recovery rate (and value error, which needs more than the theorem)."""
    _checks.check_real_array("x", x)
    _check_dict("D", D)
    _checks.check_finite("codes", codes)
    x = np.asarray(x, np.float64)
    codes = np.asarray(codes, np.float64)
    D = np.asarray(D, np.float64)
    if D.shape[0] != x.shape[1]:
        raise ValueError(f"D has {D.shape[0]} rows but x has width {x.shape[1]} (dictionary "
                         f"width mismatch); expected D of shape ({x.shape[1]}, N)")
    if codes.shape != (x.shape[0], D.shape[1]):
        raise ValueError(f"codes must be {(x.shape[0], D.shape[1])}; got {codes.shape}")
    W_enc, W_dec, scale = tsae_construction(D, S)
    c = codes * scale[None, :]
    nz = c[c != 0]
    if nz.size == 0 or np.any(nz < 0):
        raise ValueError("codes must be non-negative with at least one non-zero (theorem)")
    K = int((codes != 0).sum(1).max())
    eps = float(sp.mutual_coherence(jnp.asarray(D), None if S is None else jnp.asarray(S)))
    iv = threshold_interval(eps, K, float(nz.min()), float(nz.max()))
    t = iv["tau_mid"] if tau is None else float(tau)
    pi = x @ W_enc.astype(np.float64)
    f = pi * (pi >= t)
    supp_ok = np.all((f != 0) == (codes != 0), axis=1)
    x_hat = f @ W_dec.astype(np.float64)
    return {"eps": eps, "K": K, "delta_min": float(nz.min()), "delta_max": float(nz.max()),
            **{"interval_" + k: v for k, v in iv.items()}, "tau": t,
            "support_recovery": float(supp_ok.mean()), "r2": float(r2(x, x_hat)),
            "max_pre_off_support": float(np.max(np.where(codes == 0, pi, -np.inf))),
            "min_pre_on_support": float(np.min(np.where(codes != 0, pi, np.inf)))}


def match_atoms(D_true, W_dec) -> dict:
    """Greedy-free matching of planted atoms (columns of D_true (H, N)) to learned decoder rows
    W_dec (M, H) by best ABSOLUTE cosine (an atom is a direction up to sign: a row −c·d_i
    matches d_i). Returns, per true atom, {"index" (N,) the matched row, "abs_cos" (N,) its
    |cos| ∈ [0, 1], "cos" (N,) the signed cosine of that match (−1: found negated)}."""
    _check_dict("D_true", D_true)
    _check_dict("W_dec", W_dec)
    Dt = np.asarray(D_true, np.float64)
    W = np.asarray(W_dec, np.float64)
    if Dt.ndim != 2 or W.ndim != 2:
        raise ValueError(f"D_true must be (H, N) and W_dec (M, H); got shapes {Dt.shape} and "
                         f"{W.shape}")
    if W.shape[1] != Dt.shape[0]:
        raise ValueError(f"W_dec has width {W.shape[1]} but D_true has H = {Dt.shape[0]} rows "
                         f"(dictionary width mismatch)")
    Dt = Dt / np.maximum(np.linalg.norm(Dt, axis=0, keepdims=True), 1e-30)
    Wn = W / np.maximum(np.linalg.norm(W, axis=1, keepdims=True), 1e-30)
    C = Wn @ Dt  # (M, N)
    idx = np.argmax(np.abs(C), axis=0)
    cos = C[idx, np.arange(Dt.shape[1])]
    return {"index": idx, "cos": cos, "abs_cos": np.abs(cos)}


def planted_support_recovery(D_true, W_dec, codes_true, codes_learned, *,
                             min_cos: float = 0.9) -> dict:
    """Support recovery of a TRAINED SAE on planted data: each planted atom is matched to its
    best learned latent (:func:`match_atoms`, by |cos|: a latent whose decoder row is a
    negated atom counts, firing is judged by code ≠ 0 whatever its sign); a sample counts as
    recovered when the set of firing latents equals exactly the matched latents of its planted
    support (and every one of those atoms was found with |cos| ≥ ``min_cos``). Returns rates
    and the atom-match stats (``cos_median``: median |cos| of the matches)."""
    m = match_atoms(D_true, W_dec)
    ct = np.asarray(codes_true) != 0
    cl = np.asarray(codes_learned) != 0
    if ct.shape[0] != cl.shape[0]:
        raise ValueError(f"codes_true and codes_learned need the same number of samples; got "
                         f"{ct.shape[0]} and {cl.shape[0]}")
    found = m["abs_cos"] >= min_cos
    want = np.zeros_like(cl)
    for b in range(ct.shape[0]):
        want[b, m["index"][ct[b]]] = True
    ok = np.all(want == cl, axis=1) & np.all(found[None, :] | ~ct, axis=1)
    return {"support_recovery": float(ok.mean()), "atoms_found": float(found.mean()),
            "cos_median": float(np.median(m["abs_cos"])),
            "l0_learned": float(cl.sum(1).mean()), "l0_true": float(ct.sum(1).mean())}
