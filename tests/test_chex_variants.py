"""Properties of the pure functions asserted both jitted and eagerly (chex.variants, as in
optax's tests): operator adjointness, one SubGM update against its definition (eq. 3 and
eq. 10 of Ma & Fattahi), one SAE train step (jit vs eager, and the θ ≥ 0 projection), and
the SAE metrics against numpy formulas."""
import chex
import jax
import jax.numpy as jnp
import numpy as np

import jaxsense as js
import sae
from sae import metrics
from sae.step import init_state, train_step


class OperatorsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_adjointness(self):
        k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
        for kind in ("gaussian", "rank_one", "entry"):
            op = js.operators.make_operator(kind, k1, 40, 6)
            X = jax.random.normal(k2, (6, 6))
            X = (X + X.T) / 2
            v = jax.random.normal(k3, (40,))
            lhs = self.variant(lambda X, v, op=op: jnp.dot(op.apply(X), v))(X, v)
            rhs = self.variant(lambda X, v, op=op: jnp.sum(X * op.adjoint(v)))(X, v)
            chex.assert_trees_all_close(lhs, rhs, rtol=1e-4, atol=1e-4)


class SubGMUpdateTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_one_update_is_eq3_with_the_geometric_step(self):
        prob = js.make_problem(jax.random.PRNGKey(1), d=6, r=2, m=60, p=0.1,
                               spectrum=(2.0, 1.0))
        U0 = 0.1 * jax.random.normal(jax.random.key(2), (6, 3))
        solver = js.subgm(js.geometric(eta=0.2, rho=0.99), norm="svd")
        state = solver.init(U0)
        new, _ = self.variant(lambda s: solver.update(s, prob.op, prob.y))(state)
        # definition: Q = 𝒜*(Sign(𝒜(UUᵀ) − y))/m, D = (Q + Qᵀ)U, U⁺ = U − η ρ⁰/‖Q‖₂ · D
        r = prob.op.apply(U0 @ U0.T) - prob.y
        Q = prob.op.adjoint(jnp.sign(r)) / prob.op.m
        D = (Q + Q.T) @ U0
        U1 = U0 - 0.2 / jnp.linalg.norm(Q, 2) * D
        chex.assert_trees_all_close(new.U, U1, rtol=1e-4, atol=1e-6)


class SAEStepTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_train_step_jit_equals_eager_and_projects_theta(self):
        cfg = sae.TrainConfig(d_in=8, width=16, batch_size=32, lr=1e-2, lam=1.0, eps=0.5,
                              theta_init=1e-3, log_theta=False,  # raw θ: the projection
                              progress=False)
        hp = sae.HParams.from_config(cfg)
        graphdef, state = init_state(cfg, hp, jax.random.key(0))
        x = jax.random.normal(jax.random.key(1), (32, 8))
        new, m = self.variant(lambda s, x: train_step(graphdef, s, x, hp, cfg))(state, x)
        ref, m_ref = train_step(graphdef, state, x, hp, cfg)  # eager reference
        chex.assert_trees_all_close(new.params, ref.params, rtol=1e-5, atol=1e-6)
        chex.assert_trees_all_close(m["loss"], m_ref["loss"], rtol=1e-5)
        assert float(jnp.min(new.params["theta"][...])) >= 0.0  # projection_non_negative
        chex.assert_trees_all_equal(new.step, jnp.asarray(1, jnp.int32))


class MetricsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_metrics_match_numpy(self):
        rng = np.random.default_rng(0)
        x = rng.normal(size=(50, 6)).astype(np.float32)
        xh = x + 0.1 * rng.normal(size=(50, 6)).astype(np.float32)
        f = np.maximum(rng.normal(size=(50, 9)), 0).astype(np.float32)
        ev = self.variant(metrics.explained_variance)(x, xh)
        ev_np = 1 - np.sum((x - xh) ** 2) / np.sum((x - x.mean(0)) ** 2)
        chex.assert_trees_all_close(ev, ev_np, rtol=1e-5)
        l0 = self.variant(metrics.l0)(f)
        chex.assert_trees_all_close(l0, np.mean((f != 0).sum(1)), rtol=1e-6)
        mse = self.variant(metrics.mse)(x, xh)
        chex.assert_trees_all_close(mse, np.mean(np.sum((x - xh) ** 2, 1)), rtol=1e-5)
