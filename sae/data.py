"""Data sources for ``sae.train``: shuffled in-memory arrays and planted dictionaries.

A source is an iterator of (B, d) float arrays. A source with ``skip(n)`` is fast-forwarded
exactly on resume (``sae.train`` calls it with the number of steps already done); any other
iterator is fast-forwarded by consuming n batches. ``sae.ActivationStore.batches()`` is the
on-disk source.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jaxsense._checks import check_choice, check_int, check_scalar

from .config import TrainConfig

__all__ = ["ArraySource", "PlantedSource", "as_source", "check_batch", "planted_dictionary"]


class ArraySource:
    """Shuffled (B, d) batches from an in-memory (N, d) array; epoch e uses the permutation
    of ``np.random.default_rng((seed, e))``. Batch t is a pure function of (seed, t), so
    ``skip`` resumes exactly. Rows beyond the last full batch of an epoch are skipped.

    ``rows=(start, stop)`` yields only that row range of each batch, (stop − start, d): under
    ``jax.distributed`` each process reads just the rows its devices hold (``sae.train``
    passes the range its mesh assigns), and the batches of all processes put together are
    the one-process batches."""

    def __init__(self, data, batch_size: int, seed: int = 0, *,
                 rows: tuple[int, int] | None = None):
        data = np.asarray(data)
        if data.ndim != 2:
            raise ValueError(f"data must be a 2-D (N, d) array, got shape {data.shape}")
        check_int("batch_size", batch_size, low=1)
        if data.shape[0] < batch_size:
            raise ValueError(f"data has N={data.shape[0]} rows, fewer than "
                             f"batch_size={batch_size}")
        start, stop = (0, batch_size) if rows is None else rows
        if not 0 <= start < stop <= batch_size:
            raise ValueError(f"rows={rows!r}: expected (start, stop) with "
                             f"0 <= start < stop <= batch_size={batch_size}")
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.rows = (int(start), int(stop))
        self.per_epoch = data.shape[0] // batch_size
        self.pos = 0
        self._perm_epoch, self._perm = -1, None

    def __iter__(self):
        return self

    def skip(self, n: int):
        self.pos += n

    def __next__(self):
        e, i = divmod(self.pos, self.per_epoch)
        if e != self._perm_epoch:
            self._perm = np.random.default_rng((self.seed, e)).permutation(self.data.shape[0])
            self._perm_epoch = e
        idx = np.sort(self._perm[i * self.batch_size:(i + 1) * self.batch_size])
        self.pos += 1
        return self.data[idx[self.rows[0]:self.rows[1]]]


def planted_dictionary(key, d: int = 64, n_atoms: int = 256, *, kind: str = "gaussian",
                       dtype=np.float32) -> np.ndarray:
    """Unit-norm planted atoms, (n_atoms, d) — the one generator of planted dictionaries.

    kind: "gaussian" (i.i.d. Gaussian directions, normalised in float64) or
      "dirac_hadamard" ([I; Hadamard/√d], n_atoms = 2d, mutual coherence 1/√d; d a power
      of 2 — the classic incoherent pair of compressed sensing, Donoho & Huo 2001).
    """
    check_int("d", d, low=1)
    check_int("n_atoms", n_atoms, low=1)
    check_choice("kind", kind, ("gaussian", "dirac_hadamard"))
    if kind == "dirac_hadamard":
        if d & (d - 1) or n_atoms != 2 * d:
            raise ValueError(f"kind='dirac_hadamard' needs d a power of 2 and n_atoms = 2d; "
                             f"got d={d}, n_atoms={n_atoms}")
        h = np.array([[1.0]])
        while h.shape[0] < d:
            h = np.block([[h, h], [h, -h]])
        return np.vstack([np.eye(d), h / np.sqrt(d)]).astype(dtype)
    D = np.asarray(jax.random.normal(key, (n_atoms, d), jnp.float32), np.float64)
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    return D.astype(dtype)


class PlantedSource:
    """Synthetic batches x = Σ_{i∈S} c_i d_i with |S| = k random atoms per example and
    non-negative codes c_i ~ U[lo, hi] (planted-dictionary recovery). Batch t is a pure
    function of (seed, t), so ``skip`` resumes exactly.

    D: (n_atoms, d) atoms (rows), e.g. from ``planted_dictionary``.
    """

    def __init__(self, D, k: int, batch_size: int, seed: int = 0, lo: float = 0.5,
                 hi: float = 1.5):
        self.D = np.asarray(D, np.float32)
        if self.D.ndim != 2:
            raise ValueError(f"D must be a 2-D (n_atoms, d) array, got shape {self.D.shape}")
        check_int("k", k, low=1, high=self.D.shape[0])
        check_int("batch_size", batch_size, low=1)
        check_scalar("lo", lo, low=0.0)
        check_scalar("hi", hi, low=float(lo))
        self.k, self.batch_size, self.seed, self.lo, self.hi = k, batch_size, seed, lo, hi
        self.pos = 0

    def __iter__(self):
        return self

    def skip(self, n: int):
        self.pos += n

    def codes_and_batch(self, t: int):
        """(support indices (B, k), codes (B, k)) of batch t."""
        rng = np.random.default_rng((self.seed, t))
        n = self.D.shape[0]
        idx = np.argsort(rng.random((self.batch_size, n)), axis=1)[:, :self.k]
        c = rng.uniform(self.lo, self.hi, (self.batch_size, self.k)).astype(np.float32)
        return idx, c

    def batch(self, t: int) -> np.ndarray:
        """Batch t, (B, d) float32."""
        idx, c = self.codes_and_batch(t)
        return np.einsum("bk,bkd->bd", c, self.D[idx])

    def __next__(self):
        x = self.batch(self.pos)
        self.pos += 1
        return x


def as_source(data, config: TrainConfig, seed: int, rows: tuple[int, int] | None = None):
    """An (N, d) array → ``ArraySource`` (only ``rows`` of each batch, see there); an
    iterable of (B, d) arrays → its iterator."""
    if isinstance(data, (np.ndarray, jax.Array)) and np.ndim(data) == 2:
        return ArraySource(np.asarray(data), config.batch_size, seed, rows=rows)
    if isinstance(data, (np.ndarray, jax.Array)):
        raise ValueError(f"data must be a 2-D (N, d) array or an iterator of (B, d) arrays, "
                         f"got an array of shape {np.shape(data)}")
    if isinstance(data, Iterator):
        return data
    if isinstance(data, Iterable):
        return iter(data)
    raise TypeError(f"data must be an (N, d) array or an iterator of (B, d) arrays, "
                    f"got {type(data).__name__}")


def check_batch(x, config: TrainConfig, step: int, rows: int | None = None) -> None:
    """ValueError/TypeError naming the step unless x is a finite (rows, d_in) float array,
    rows = ``config.batch_size`` by default (this process's share under
    ``jax.distributed``); the finiteness of device arrays is checked inside the jitted
    step."""
    rows = config.batch_size if rows is None else rows
    shape = np.shape(x)
    if len(shape) != 2 or shape[1] != config.d_in:
        raise ValueError(f"batch at step {step} must have shape (B, d_in={config.d_in}), "
                         f"got shape {shape} (wrong input width?)")
    if shape[0] != rows:
        what = (f"batch_size={config.batch_size}" if rows == config.batch_size else
                f"{rows} (this process's share of batch_size={config.batch_size})")
        raise ValueError(f"batch at step {step} must have {what} rows, got {shape[0]}")
    dt = np.dtype(getattr(x, "dtype", np.float32))
    if not np.issubdtype(dt, np.floating) and dt != jnp.bfloat16:
        raise TypeError(f"batch at step {step} must hold floats, got dtype {dt}")
    if isinstance(x, np.ndarray) and not np.all(np.isfinite(x)):
        bad = np.argwhere(~np.isfinite(x))[0]
        raise ValueError(f"batch at step {step} contains NaN/Inf (first at row {bad[0]}, "
                         f"column {bad[1]}); expected finite activations")
