import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

import jaxsense as js

KINDS = ["gaussian", "rank_one", "entry"]


@pytest.mark.parametrize("kind", KINDS)
def test_adjoint_identity(kind, x64):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(1), 3)
    d, m = 7, 40
    op = js.make_operator(kind, k1, m, d, jnp.float64)
    X = jax.random.normal(k2, (d, d), jnp.float64)
    v = jax.random.normal(k3, (m,), jnp.float64)
    lhs = jnp.vdot(op.apply(X), v)
    rhs = jnp.vdot(X, op.adjoint(v))
    np.testing.assert_allclose(lhs, rhs, rtol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_apply_matches_explicit_matrices(kind, x64):
    """𝒜(X)_i = tr(A_iᵀ X) with A_i materialised from the adjoint of unit vectors."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(2))
    d, m = 5, 12
    op = js.make_operator(kind, k1, m, d, jnp.float64)
    A = jax.vmap(op.adjoint)(jnp.eye(m, dtype=jnp.float64))  # (m, d, d)
    X = jax.random.normal(k2, (d, d), jnp.float64)
    np.testing.assert_allclose(op.apply(X), jnp.einsum("mij,ij->m", A, X), rtol=1e-12, atol=1e-12)
    if kind == "rank_one":  # A_i = a_i a_iᵀ exactly
        np.testing.assert_allclose(A, jnp.einsum("mi,mj->mij", op.a, op.a), rtol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_apply_gram_and_batching(kind, x64):
    k1, k2 = jax.random.split(jax.random.PRNGKey(3))
    d, m = 6, 30
    op = js.make_operator(kind, k1, m, d, jnp.float64)
    U = jax.random.normal(k2, (4, d, 3), jnp.float64)
    gram = jax.vmap(op.apply_gram)(U)
    np.testing.assert_allclose(gram, op.apply(U @ jnp.swapaxes(U, 1, 2)), rtol=1e-11, atol=1e-11)


def test_gaussian_statistics():
    """Entries are i.i.d. N(0,1), not symmetrised: (1/m)‖𝒜(M)‖² ≈ ‖M‖_F² for a fixed M."""
    op = js.dense_gaussian(jax.random.PRNGKey(0), 4000, 10)
    assert op.A.shape == (4000, 100)
    A = op.A.reshape(4000, 10, 10)
    assert abs(float(jnp.mean(A))) < 0.01 and abs(float(jnp.std(A)) - 1) < 0.01
    assert float(jnp.max(jnp.abs(A - jnp.swapaxes(A, 1, 2)))) > 1.0
    M = jnp.eye(10)
    ratio = jnp.mean(op.apply(M) ** 2) / jnp.sum(M**2)
    assert abs(float(ratio) - 1) < 0.1


def test_operator_bad_input():
    with pytest.raises(ValueError, match="m=0"):
        js.dense_gaussian(jax.random.PRNGKey(0), 0, 5)
    with pytest.raises(ValueError, match="kind='foo'"):
        js.make_operator("foo", jax.random.PRNGKey(0), 5, 5)
    with pytest.raises(TypeError, match="d=2.5"):
        js.rank_one(jax.random.PRNGKey(0), 5, 2.5)


# ---- one pass over A's rows for the ℓ1 pair (‖r‖₁, 𝒜*(Sign r))

def _two_pass_l1(op, U, y):
    r = op.apply_gram(U) - y
    return jnp.sum(jnp.abs(r)), op.adjoint(jnp.sign(r))


class TestL1OnePass(chex.TestCase):
    """DenseGaussian.l1_one_pass equals the two-read form (apply_gram, then adjoint) for
    every block size, under jit and eagerly, single and vmapped over a shared operator."""

    def _setup(self, m=53, d=5, r=3, packed=True):
        k1, k2, k3 = jax.random.split(jax.random.PRNGKey(7), 3)
        op = js.dense_gaussian(k1, m, d, jnp.float64, packed=packed)
        U = jax.random.normal(k2, (4, d, r), jnp.float64)
        Y = jax.random.normal(k3, (4, m), jnp.float64) * 3
        return op, U, Y

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(None, 1, 7, 10, 52, 53, 100)  # 53 = m: one block; 52, 7: a tail
    def test_equals_two_pass(self, block_rows):
        with jax.enable_x64(True):
            op, U, Y = self._setup()
            s2, q2 = _two_pass_l1(op, U[0], Y[0])
            s1, q1 = self.variant(lambda U, y: op.l1_one_pass(U, y, block_rows))(U[0], Y[0])
            assert q1.shape == (5, 5)
            assert float(jnp.abs(s1 - s2)) <= 1e-12 * float(s2)
            np.testing.assert_allclose(q1, q2, rtol=1e-12, atol=1e-12)
            # not a vacuous comparison: Q is far from 0 and from a single row's contribution
            assert float(jnp.max(jnp.abs(q2))) > 1.0

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(None, 10, 16)
    def test_vmapped_shared_operator(self, block_rows):
        with jax.enable_x64(True):
            op, U, Y = self._setup(packed=False)  # the one-pass form never reads B
            fn = self.variant(jax.vmap(lambda U, y: op.l1_one_pass(U, y, block_rows)))
            s1, q1 = fn(U, Y)
            assert q1.shape == (4, 5, 5)
            for i in range(4):
                s2, q2 = _two_pass_l1(op, U[i], Y[i])
                np.testing.assert_allclose(s1[i], s2, rtol=1e-12)
                np.testing.assert_allclose(q1[i], q2, rtol=1e-12, atol=1e-12)

    def test_sign_zero_rows_contribute_nothing(self):
        with jax.enable_x64(True):
            op, U, _ = self._setup()
            # U = 0: r = -y exactly, zero except rows 0, 1 (block 0) and 12 (block 1)
            y = jnp.zeros(op.m, jnp.float64).at[jnp.array([0, 1, 12])].set(
                jnp.array([1.0, 2.0, -0.5]))
            s, q = op.l1_one_pass(jnp.zeros_like(U[0]), y, 10)
            np.testing.assert_allclose(s, 3.5, rtol=1e-12)
            want = (-op.A[0] - op.A[1] + op.A[12]).reshape(5, 5)
            np.testing.assert_allclose(q, want, atol=1e-11)

    def test_bad_input(self):
        with jax.enable_x64(True):
            op, U, Y = self._setup()
        with pytest.raises(ValueError, match="block_rows=0"):
            op.l1_one_pass(U[0], Y[0], 0)
        with pytest.raises(ValueError, match="block_rows=2.5"):
            op.l1_one_pass(U[0], Y[0], 2.5)
        with pytest.raises(ValueError, match=r"y: expected shape \(53,\)"):
            op.l1_one_pass(U[0], Y[0, :10], 10)
        with pytest.raises(ValueError, match="U: expected shape"):
            op.l1_one_pass(U[0, :3], Y[0], 10)
