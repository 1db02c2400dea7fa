"""Linear measurement maps 𝒜: R^{d×d} → R^m and their adjoints, as pytrees.

Every operator has
  ``apply(X)``       X: (..., d, d)            -> (..., m)   𝒜(X)_i = ⟨A_i, X⟩ = tr(A_iᵀ X)
  ``apply_gram(U)``  U: (d, r')                -> (m,)       𝒜(U Uᵀ), possibly without forming UUᵀ
  ``adjoint(v)``     v: (m,)                   -> (d, d)     𝒜*(v) = Σ_i v_i A_i
with the adjoint identity ⟨𝒜(X), v⟩ = ⟨X, 𝒜*(v)⟩ (tested). No 1/m scaling is applied: the
paper puts the 1/m in the loss (Ma & Fattahi, eq. 2). Operators are pytrees
(``flax.struct.dataclass``), so they pass through ``jit``/``vmap``; instances that share one
operator (``in_axes=None``) turn residuals and adjoints into single matmuls.

Ensembles:
- :class:`DenseGaussian` — A_i with i.i.d. N(0, 1) entries, not symmetrised, not rescaled
  (paper §2), stored as one (m, d·d) matrix (row i = vec(A_i), row-major).
- :class:`RankOne` — A_i = a_i a_iᵀ (quadratic sampling / phase retrieval); only the
  (m, d) vectors are stored, A_i is never materialised.
- :class:`EntrySampling` — A_i = e_{r_i} e_{c_i}ᵀ (matrix completion).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxsense import _checks


def _triu(d: int):
    return np.triu_indices(d)


def pack_symmetric(A, d: int):
    """Packed symmetric part: (m, d·d) -> (m, d(d+1)/2) with ⟨A_i, X⟩ = B_i · X[triu] for
    every symmetric X (diagonal A_jj; off-diagonal A_jk + A_kj, j < k)."""
    iu, ju = _triu(d)
    A3 = A.reshape(A.shape[:-1] + (d, d))
    return jnp.where(jnp.asarray(iu == ju), A3[..., iu, ju], A3[..., iu, ju] + A3[..., ju, iu])


@struct.dataclass
class DenseGaussian:
    """Dense measurement matrices. ``A``: (m, d·d), row i is vec(A_i) (row-major).

    ``B`` (optional, (m, d(d+1)/2)) caches :func:`pack_symmetric` of A: 𝒜(UUᵀ) only sees the
    symmetric part of A_i, so :meth:`apply_gram` reads ≈ half the bytes (the CPU hot loop is
    bound by reading A; the SubGM iteration time is measured by
    ``python -m experiments.benchmarks.subgm_vs_numpy``, numbers in the README).
    """

    A: jax.Array
    d: int = struct.field(pytree_node=False)
    B: jax.Array | None = None

    @property
    def m(self) -> int:
        return self.A.shape[-2]

    @property
    def dtype(self):
        return self.A.dtype

    def apply(self, X):
        """𝒜(X): (..., d, d) -> (..., m). Batched X becomes one matmul."""
        _checks.check_trailing_shape("X", X, (self.d, self.d))
        flat = X.reshape(X.shape[:-2] + (self.d * self.d,))
        # contract A's own last axis: `flat @ A.T` made XLA copy a transposed A per call
        return jnp.einsum("mk,...k->...m", self.A, flat)

    def apply_gram(self, U):
        """𝒜(U Uᵀ) for U: (d, r') -> (m,)."""
        _checks.check_shape("U", U, (self.d, None))
        X = U @ U.T
        if self.B is None:
            return self.apply(X)
        iu, ju = _triu(self.d)
        return self.B @ X[iu, ju]

    def adjoint(self, v):
        """𝒜*(v) = Σ_i v_i A_i: (..., m) -> (..., d, d)."""
        _checks.check_trailing_shape("v", v, (self.m,))
        return (v @ self.A).reshape(v.shape[:-1] + (self.d, self.d))

    def l1_one_pass(self, U, y, block_rows: int | None = None):
        """(‖r‖₁, 𝒜*(Sign r)) with r = 𝒜(UUᵀ) − y, in ONE pass over the rows of A.

        U: (d, r'), y: (m,) -> (scalar, (d, d)). The ℓ1 loss and sub-gradient of Ma & Fattahi
        (eq. 2 and Q of eq. 3, before the 1/m) need r = A vec(UUᵀ) − y and Q = Aᵀ Sign(r);
        both are separable by rows, so each block of ``block_rows`` rows A_b serves both
        products while it is in cache: r_b = A_b vec(UUᵀ) − y_b, ‖r‖₁ += ‖r_b‖₁,
        Q += A_bᵀ Sign(r_b) (Sign(0) = 0). ``block_rows=None`` (or ≥ m) is one block: both
        products read the same A and never the packed B (whose extra bytes can push the
        working set out of cache). Blocks run in a ``lax.fori_loop`` over dynamic slices
        of A (a last partial block, if m is not a multiple of ``block_rows``, runs after
        it). Same maths as ``apply_gram`` + ``adjoint``; only the summation order of ‖r‖₁
        and Q changes. Under ``vmap`` with this operator shared (``in_axes=None``) every
        block's two products become matmuls over the instances. Which block size is
        fastest is measured by ``python -m experiments.benchmarks.subgm_vs_numpy``
        (numbers in the README).
        """
        _checks.check_shape("U", U, (self.d, None))
        _checks.check_shape("y", y, (self.m,))
        block_rows = _checks.check_positive_int("block_rows", block_rows, allow_none=True)
        m, k = self.m, self.d * self.d
        b = m if block_rows is None else min(block_rows, m)
        x = (U @ U.T).reshape(k)

        def block(Ab, yb):
            r = jnp.einsum("bk,k->b", Ab, x) - yb  # contract A's own last axis (no transpose)
            return jnp.sum(jnp.abs(r)), jnp.einsum("b,bk->k", jnp.sign(r), Ab)

        n, tail = divmod(m, b)
        if n == 1 and tail == 0:
            s, q = block(self.A, y)
        else:
            def body(i, carry):
                Ab = jax.lax.dynamic_slice_in_dim(self.A, i * b, b)
                yb = jax.lax.dynamic_slice_in_dim(y, i * b, b)
                sb, qb = block(Ab, yb)
                return carry[0] + sb, carry[1] + qb

            dt = jnp.result_type(self.A, x, y)
            s, q = jax.lax.fori_loop(0, n, body, (jnp.zeros((), dt), jnp.zeros((k,), dt)))
            if tail:
                st, qt = block(self.A[n * b:], y[n * b:])
                s, q = s + st, q + qt
        return s, q.reshape(self.d, self.d)

    def with_packed(self) -> "DenseGaussian":
        """Return a copy carrying the packed symmetric part B (see class docstring)."""
        return self.replace(B=pack_symmetric(self.A, self.d))


@struct.dataclass
class RankOne:
    """Quadratic sampling A_i = a_i a_iᵀ. ``a``: (m, d). A_i is never formed."""

    a: jax.Array

    @property
    def m(self) -> int:
        return self.a.shape[-2]

    @property
    def d(self) -> int:
        return self.a.shape[-1]

    @property
    def dtype(self):
        return self.a.dtype

    def apply(self, X):
        """⟨a_i a_iᵀ, X⟩ = a_iᵀ X a_i: (..., d, d) -> (..., m)."""
        _checks.check_trailing_shape("X", X, (self.d, self.d))
        return jnp.einsum("md,...de,me->...m", self.a, X, self.a)

    def apply_gram(self, U):
        """‖Uᵀ a_i‖² for U: (d, r') -> (m,); costs m·d·r' instead of m·d²."""
        _checks.check_shape("U", U, (self.d, None))
        return jnp.sum((self.a @ U) ** 2, axis=-1)

    def adjoint(self, v):
        """Σ_i v_i a_i a_iᵀ = aᵀ diag(v) a: (m,) -> (d, d)."""
        _checks.check_shape("v", v, (self.m,))
        return (self.a.T * v) @ self.a


@struct.dataclass
class EntrySampling:
    """Entry sampling A_i = e_{rows_i} e_{cols_i}ᵀ (matrix completion).

    ``rows``, ``cols``: (m,) int arrays; ``d`` the matrix size; ``dtype`` the value dtype.
    """

    rows: jax.Array
    cols: jax.Array
    d: int = struct.field(pytree_node=False)
    dtype_name: str = struct.field(pytree_node=False, default="float32")

    @property
    def m(self) -> int:
        return self.rows.shape[-1]

    @property
    def dtype(self):
        return jnp.dtype(self.dtype_name)

    def apply(self, X):
        _checks.check_trailing_shape("X", X, (self.d, self.d))
        return X[..., self.rows, self.cols]

    def apply_gram(self, U):
        _checks.check_shape("U", U, (self.d, None))
        return jnp.sum(U[self.rows] * U[self.cols], axis=-1)

    def adjoint(self, v):
        _checks.check_shape("v", v, (self.m,))
        return jnp.zeros((self.d, self.d), v.dtype).at[self.rows, self.cols].add(v)


Operator = DenseGaussian | RankOne | EntrySampling


def _check_md(m, d):
    _checks.check_int("m", m, low=1)
    _checks.check_int("d", d, low=1)


def dense_gaussian(key, m: int, d: int, dtype=jnp.float32, packed: bool = True) -> DenseGaussian:
    """m measurement matrices with i.i.d. N(0,1) entries, stored as (m, d·d).

    ``packed=True`` also stores the packed symmetric part B (1.5× the memory, faster
    𝒜(UUᵀ)); pass False for very large m·d².
    """
    _check_md(m, d)
    _checks.check_float_dtype_arg("dtype", dtype)
    op = DenseGaussian(A=jax.random.normal(key, (m, d * d), dtype), d=d)
    return op.with_packed() if packed else op


def rank_one(key, m: int, d: int, dtype=jnp.float32) -> RankOne:
    """Quadratic sampling with a_i ~ N(0, I_d)."""
    _check_md(m, d)
    _checks.check_float_dtype_arg("dtype", dtype)
    return RankOne(a=jax.random.normal(key, (m, d), dtype))


def entry_sampling(key, m: int, d: int, dtype=jnp.float32, replace: bool = True) -> EntrySampling:
    """m entries (r_i, c_i) drawn uniformly from the d×d grid (with or without replacement)."""
    _check_md(m, d)
    _checks.check_float_dtype_arg("dtype", dtype)
    if not replace and m > d * d:
        raise ValueError(f"m={m}: expected m <= d*d={d * d} when sampling without replacement")
    idx = jax.random.choice(key, d * d, (m,), replace=replace)
    return EntrySampling(rows=idx // d, cols=idx % d, d=d, dtype_name=jnp.dtype(dtype).name)


def make_operator(kind: str, key, m: int, d: int, dtype=jnp.float32) -> Operator:
    """Build an operator by name: 'gaussian' | 'rank_one' | 'entry'."""
    makers = {"gaussian": dense_gaussian, "rank_one": rank_one, "entry": entry_sampling}
    _checks.check_choice("kind", kind, sorted(makers))
    return makers[kind](key, m, d, dtype)
