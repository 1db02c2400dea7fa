import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
