"""Streaming uncentred second moment and mean in float64: the one accumulator behind
:meth:`sae.store.ActivationStore.moments` and :func:`sae.atoms.second_moment`.

Needs only numpy.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["MomentAccumulator", "Moments", "SecondMoment"]


class Moments(NamedTuple):
    """Streaming statistics of one layer of an activation cache, float64
    (:meth:`sae.store.ActivationStore.moments`).

    mean: (d,) E[x]; second_moment: (d, d) uncentred E[x xᵀ]; count: number of rows."""

    mean: np.ndarray
    second_moment: np.ndarray
    count: int

# ============================================================================ second moment
class SecondMoment(NamedTuple):
    """Uncentred second moment E[x xᵀ] (H, H), mean E[x] (H,), both float64; sample count."""

    m2: np.ndarray
    mean: np.ndarray
    n: int


class MomentAccumulator:
    """Streaming float64 accumulator of Σ x and Σ x xᵀ (uncentred), chunk by chunk.

    Host-side numpy on purpose: float64 without touching JAX's global x64 flag, and it
    reads memory-mapped shards directly. ``update`` accepts any (B, H) array-like (float16,
    bfloat16 via numpy conversion, float32 …); each chunk is upcast to float64 before the
    outer product (exact for ≥ 1e9 samples at float64's 53-bit mantissa).

    ``precision="mixed"`` (opt-in, faster): each sub-chunk of ≤ ``mixed_rows`` rows is
    multiplied in float32 and ADDED into the float64 accumulators (relative error per
    sub-chunk ~ √mixed_rows · 6e-8); the default "float64" upcasts every chunk."""

    def __init__(self, H: int | None = None, *, precision: str = "float64",
                 mixed_rows: int = 1024):
        if precision not in ("float64", "mixed"):
            raise ValueError(f"precision must be 'float64' or 'mixed'; got {precision!r}")
        self.precision, self.mixed_rows = precision, int(mixed_rows)
        self.H = H
        self.n = 0
        self._s1 = None
        self._s2 = None

    def update(self, x) -> MomentAccumulator:
        x = np.asarray(x)
        if x.ndim != 2:
            raise ValueError(f"x must have shape (B, H); got shape {x.shape}")
        if self.H is None:
            self.H = x.shape[1]
        if x.shape[1] != self.H:
            raise ValueError(
                f"x has width {x.shape[1]} but this accumulator holds H = {self.H}; "
                f"expected x.shape[1] == {self.H}")
        if x.shape[0] == 0:
            return self
        if self._s2 is None:
            self._s1 = np.zeros(self.H, np.float64)
            self._s2 = np.zeros((self.H, self.H), np.float64)
        if self.precision == "mixed":
            x32 = x.astype(np.float32, copy=False)
            for a in range(0, x32.shape[0], self.mixed_rows):
                c = x32[a:a + self.mixed_rows]
                self._s2 += c.T @ c
            self._s1 += x32.sum(0, dtype=np.float64)
        else:
            xd = x.astype(np.float64, copy=False)
            self._s1 += xd.sum(0)
            self._s2 += xd.T @ xd
        self.n += x.shape[0]
        return self

    def result(self) -> SecondMoment:
        if self.n == 0:
            raise ValueError(
                "second moment: the activation source is empty (0 samples seen); expected at "
                "least one (B, H) batch with B >= 1 — empty store?")
        return SecondMoment(self._s2 / self.n, self._s1 / self.n, self.n)
