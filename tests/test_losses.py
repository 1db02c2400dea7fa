import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsense as js
from jaxsense import losses


def _setup(kind, seed=0, d=6, m=50, r=4):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    op = js.make_operator(kind, k1, m, d, jnp.float64)
    U = jax.random.normal(k2, (d, r), jnp.float64)
    y = jax.random.normal(k3, (m,), jnp.float64) * 3
    return op, U, y


@pytest.mark.parametrize("kind", ["gaussian", "rank_one", "entry"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_l1_subgradient_equals_jax_grad(kind, seed, x64):
    op, U, y = _setup(kind, seed)
    r = losses.residual(op, U, y)
    assert float(jnp.min(jnp.abs(r))) > 1e-8  # a differentiable point
    f, D = losses.subgradient("l1", op, U, y)
    g = jax.grad(lambda U: losses.l1_loss(op, U, y))(U)
    np.testing.assert_allclose(f, losses.l1_loss(op, U, y))
    np.testing.assert_allclose(D, g, rtol=1e-10, atol=1e-12)


class TestGradientsJitAndEager(chex.TestCase):
    """Loss (sub)gradients vs jax.grad, each asserted under jax.jit and eagerly."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_l2_gradient_equals_jax_grad(self):
        with jax.enable_x64(True):
            for kind in ("gaussian", "rank_one", "entry"):
                op, U, y = _setup(kind, 3)
                f, D = self.variant(lambda U: losses.subgradient("l2", op, U, y))(U)
                g = self.variant(jax.grad(lambda U: losses.l2_loss(op, U, y)))(U)
                chex.assert_trees_all_close(D, g, rtol=1e-10, atol=1e-10)
                # and the paper's explicit form (2/m) Σ r_i (A_i + A_iᵀ) U
                A = jax.vmap(op.adjoint)(jnp.eye(op.m, dtype=jnp.float64))
                r = losses.residual(op, U, y)
                explicit = (2 / op.m) * jnp.einsum("m,mij,jk->ik", r,
                                                   A + jnp.swapaxes(A, 1, 2), U)
                chex.assert_trees_all_close(D, explicit, rtol=1e-10, atol=1e-10)

    @chex.variants(with_jit=True, without_jit=True)
    def test_expected_loss_subgradient(self):
        with jax.enable_x64(True):
            U = jax.random.normal(jax.random.PRNGKey(5), (5, 3), jnp.float64)
            X = jnp.eye(5, dtype=jnp.float64)
            f, Q = self.variant(lambda U: losses.loss_and_q("expected_l1", None, U, None, X))(U)
            g = self.variant(jax.grad(lambda U: losses.expected_l1_loss(U, X)))(U)
            chex.assert_trees_all_close(losses.direction(Q, U), g, rtol=1e-10, atol=0)
            chex.assert_trees_all_close(f, jnp.linalg.norm(U @ U.T - X), rtol=1e-10, atol=0)


@pytest.mark.parametrize("l1_pass", ["one", "two"])
def test_sign_zero_is_zero(l1_pass, x64):
    """Sign(0) = 0: measurements fitted exactly contribute nothing to Q."""
    op, U, _ = _setup("gaussian", 4)
    # U = 0 fits y = 0 exactly in both forms (y = apply_gram(U) is exact only for the packed
    # product it was computed with; the one-pass form contracts A and rounds differently)
    U = jnp.zeros_like(U)
    y = jnp.zeros(op.m, U.dtype).at[:10].add(1.0)  # only the first 10 residuals are non-zero
    _, Q = losses.loss_and_q("l1", op, U, y, l1_pass=l1_pass, block_rows=8)
    A = op.A.reshape(op.m, op.d, op.d)
    np.testing.assert_allclose(Q, -jnp.sum(A[:10], 0) / op.m, atol=1e-12)


def test_expected_l1_matches_empirical_mean(x64):
    """E f_ℓ1 = √(2/π) ‖UUᵀ − X*‖_F for Gaussian A and no noise."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(6))
    op = js.dense_gaussian(k1, 200_000, 4, jnp.float64)
    U = jax.random.normal(k2, (4, 2), jnp.float64)
    X = jnp.diag(jnp.array([2.0, 1.0, 0, 0]))
    emp = losses.l1_loss(op, U, op.apply(X))
    np.testing.assert_allclose(emp, np.sqrt(2 / np.pi) * losses.expected_l1_loss(U, X), rtol=0.01)


@pytest.mark.parametrize("kind", ["gaussian", "rank_one", "entry"])
@pytest.mark.parametrize("block_rows", [None, 8])
def test_l1_one_pass_equals_two_pass(kind, block_rows, x64):
    """l1_pass="one" (one pass over A's rows; other operators fall back) == l1_pass="two",
    for the loss, Q and D, under jit."""
    op, U, y = _setup(kind, 5)
    fn = jax.jit(lambda U, y, lp: losses.subgradient("l1", op, U, y, l1_pass=lp,
                                                     block_rows=block_rows), static_argnums=2)
    f1, D1 = fn(U, y, "one")
    f2, D2 = fn(U, y, "two")
    np.testing.assert_allclose(f1, f2, rtol=1e-13)
    np.testing.assert_allclose(D1, D2, rtol=1e-12, atol=1e-12)
    assert float(jnp.max(jnp.abs(D2))) > 0.1  # a non-trivial sub-gradient


def test_l1_pass_bad_input(x64):
    op, U, y = _setup("gaussian")
    with pytest.raises(ValueError, match="l1_pass='three'"):
        losses.loss_and_q("l1", op, U, y, l1_pass="three")
    with pytest.raises(ValueError, match="block_rows=-1"):
        losses.loss_and_q("l1", op, U, y, block_rows=-1)
