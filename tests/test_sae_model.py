"""sae.model: straight-through pseudo-derivatives against hand-derived values, pure
functions vs module methods, TopK, and bad-input errors."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sae.model import JumpReLUSAE, TopKSAE, decode, encode, jumprelu, reconstruct, step, topk_codes

# z around θ = 1 with ε = 0.1: (z − θ)/ε = [-5, 0, 0.4, -0.4, 10, 0.6]
Z = jnp.array([0.5, 1.0, 1.04, 0.96, 2.0, 1.06])
THETA = jnp.array([1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
EPS = 0.1
G = jnp.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])  # upstream cotangent


def _ramp(z, t, eps):
    """Smooth(er) surrogate of H(z − θ): the ramp clip((z − θ)/ε + ½, 0, 1), whose θ-slope is
    exactly −(1/ε) K((z − θ)/ε) for the rectangle kernel K (away from |u| = ½)."""
    return jnp.clip((z - t) / eps + 0.5, 0.0, 1.0)


class TestPseudoDerivatives(chex.TestCase):
    """Each property asserted both under jax.jit and eagerly (chex.variants)."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_jumprelu_forward_and_pseudo_derivatives_match_hand_values(self):
        out = self.variant(jumprelu)(Z, THETA, EPS)
        # z·H(z−θ) with strict inequality: z = θ = 1.0 does not fire
        np.testing.assert_allclose(out, [0.0, 0.0, 1.04, 0.0, 2.0, 1.06], rtol=1e-6)
        grad = self.variant(jax.grad(lambda z, t: jnp.sum(G * jumprelu(z, t, EPS)),
                                     argnums=(0, 1)))
        gz, gt = grad(Z, THETA)
        # ∂/∂z = H(z − θ) · g
        np.testing.assert_allclose(gz, [0, 0, 3.0, 0, 5.0, 6.0], rtol=1e-6)
        # ∂/∂θ = −(θ/ε) K((z−θ)/ε) · g;  K = 1 at u ∈ {0, 0.4, −0.4}, 0 at −5, 10, 0.6
        np.testing.assert_allclose(gt, [0, -10 * 2.0, -10 * 3.0, -10 * 4.0, 0, 0], rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_step_pseudo_derivatives_match_hand_values(self):
        np.testing.assert_allclose(self.variant(step)(Z, THETA, EPS), [0, 0, 1, 0, 1, 1])
        grad = self.variant(jax.grad(lambda z, t: jnp.sum(G * step(z, t, EPS)),
                                     argnums=(0, 1)))
        gz, gt = grad(Z, THETA)
        np.testing.assert_allclose(gz, np.zeros(6))
        # ∂/∂θ = −(1/ε) K((z−θ)/ε) · g ; here θ = 2 for one entry: θ does not scale it
        np.testing.assert_allclose(gt, [0, -20.0, -30.0, -40.0, 0, 0], rtol=1e-5)
        t2 = THETA.at[1].set(2.0)
        z2 = Z.at[1].set(2.0)
        gt2 = self.variant(jax.grad(lambda t: jnp.sum(G * step(z2, t, EPS))))(t2)
        np.testing.assert_allclose(gt2[1], -20.0, rtol=1e-5)
        gt3 = self.variant(jax.grad(lambda t: jnp.sum(G * jumprelu(z2, t, EPS))))(t2)
        np.testing.assert_allclose(gt3[1], -(2.0 / EPS) * 2.0, rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_theta_pseudo_derivatives_equal_grad_of_ramp_surrogate(self):
        """At random points (none on a kernel edge) the θ pseudo-derivatives equal jax.grad
        of the ramp surrogate: step ↔ ramp, JumpReLU ↔ stop_gradient(θ)·ramp."""
        kz, kt, kg = jax.random.split(jax.random.key(7), 3)
        t = jax.random.uniform(kt, (64,), minval=0.5, maxval=1.5)
        z = t + jax.random.uniform(kz, (64,), minval=-2.0, maxval=2.0) * EPS
        g = jax.random.normal(kg, (64,))
        assert float(jnp.min(jnp.abs(jnp.abs((z - t) / EPS) - 0.5))) > 1e-3
        pseudo = self.variant(jax.jacrev(
            lambda t: jnp.stack([jnp.sum(g * step(z, t, EPS)),
                                 jnp.sum(g * jumprelu(z, t, EPS))])))(t)
        smooth = self.variant(jax.jacrev(
            lambda t: jnp.stack([jnp.sum(g * _ramp(z, t, EPS)),
                                 jnp.sum(g * jax.lax.stop_gradient(t) * _ramp(z, t, EPS))])))(t)
        assert float(jnp.abs(pseudo).max()) > 1.0  # some points lie inside the kernel
        chex.assert_trees_all_close(pseudo, smooth, rtol=1e-5, atol=1e-5)


def test_broadcast_theta_gradient_sums_over_batch():
    z = jnp.stack([Z, Z])  # (2, 6), θ (6,)
    gt = jax.grad(lambda t: jnp.sum(step(z, t, EPS)))(THETA)
    np.testing.assert_allclose(gt, 2 * np.array([0, -10, -10, -10, 0, 0.0]), rtol=1e-5)


def test_l0_sparsity_trains_only_threshold():
    m = JumpReLUSAE(8, 16, rngs=nnx.Rngs(0), theta_init=0.05)
    x = jax.random.normal(jax.random.key(1), (32, 8)) * 0.3
    g, s = nnx.split(m)

    def sparsity_only(state):
        mm = nnx.merge(g, state)
        return mm.loss(x, lam=1.0, eps=0.1).sparsity

    grads = jax.grad(sparsity_only)(s)
    assert float(jnp.abs(grads["theta"][...]).sum()) > 0
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert float(jnp.abs(grads[name][...]).sum()) == 0.0, name


def test_pure_functions_match_module_and_init_is_gdm():
    m = JumpReLUSAE(8, 16, rngs=nnx.Rngs(0), theta_init=0.01)
    p = m.params()
    np.testing.assert_allclose(jnp.linalg.norm(p["W_dec"], axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(p["W_enc"], p["W_dec"].T)
    p["b_dec"] = jnp.linspace(-1, 1, 8)
    m.b_dec[...] = p["b_dec"]
    x = jax.random.normal(jax.random.key(2), (5, 8))
    f = encode(p, x)
    np.testing.assert_allclose(f, m.encode(x), rtol=1e-6)
    np.testing.assert_allclose(reconstruct(p, x), m(x), rtol=1e-6)
    np.testing.assert_allclose(decode(p, f), f @ p["W_dec"] + p["b_dec"], rtol=1e-5, atol=1e-6)
    # apply_b_dec_to_input changes pre-activations by −b_dec W_enc
    f2 = encode(p, x, apply_b_dec_to_input=False)
    assert not np.allclose(f, f2)


def test_log_threshold_parameterisation():
    m = JumpReLUSAE(4, 6, rngs=nnx.Rngs(0), theta_init=0.2, log_theta=True)
    np.testing.assert_allclose(m.theta[...], np.log(0.2), rtol=1e-6)
    np.testing.assert_allclose(m.threshold, 0.2, rtol=1e-6)


def test_topk_keeps_exactly_k_nonnegative():
    pi = jax.random.normal(jax.random.key(0), (7, 20))
    f = topk_codes(pi, 3)
    nz = np.asarray((f != 0).sum(-1))
    assert np.all(nz <= 3)
    srt = np.sort(np.asarray(pi), axis=-1)[:, -3:]
    for r in range(7):  # kept entries are the top-3 positive values
        np.testing.assert_allclose(np.sort(np.asarray(f[r])[np.asarray(f[r]) != 0]),
                                   srt[r][srt[r] > 0], rtol=1e-6)
    m = TopKSAE(8, 32, 4, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(3), (10, 8))
    assert int((m.encode(x) != 0).sum(-1).max()) <= 4


@pytest.mark.parametrize("kw, msg", [
    (dict(d_in=0, width=4), "d_in"),
    (dict(d_in=4, width=0), "width"),
    (dict(d_in=4, width=-3), "width"),
    (dict(d_in=4, width=8, theta_init=-1.0), "theta_init"),
])
def test_model_bad_input(kw, msg):
    with pytest.raises(ValueError, match=msg):
        JumpReLUSAE(rngs=nnx.Rngs(0), **kw)
    with pytest.raises(TypeError, match="width"):
        JumpReLUSAE(4, 2.5, rngs=nnx.Rngs(0))


def test_loss_terms_match_formulas():
    m = JumpReLUSAE(6, 10, rngs=nnx.Rngs(0), theta_init=0.05)
    m.b_enc[...] = jnp.linspace(-0.2, 0.2, 10)
    m.W_dec[...] = m.W_dec[...] * jnp.linspace(0.5, 2.0, 10)[:, None]  # non-unit rows
    x = np.asarray(jax.random.normal(jax.random.key(4), (16, 6))) * 0.5
    p = {k: np.asarray(v) for k, v in m.params().items()}
    pi = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    act = pi > p["threshold"]
    f = pi * act
    xh = f @ p["W_dec"] + p["b_dec"]
    mse = np.mean(np.sum((x - xh) ** 2, axis=1))
    lam = 0.3
    gdm = m.loss(jnp.asarray(x), lam=lam, eps=0.01, sparsity="l0")
    np.testing.assert_allclose(gdm.mse, mse, rtol=1e-5)
    np.testing.assert_allclose(gdm.sparsity, lam * np.mean(act.sum(1)), rtol=1e-6)
    np.testing.assert_allclose(gdm.loss, mse + lam * np.mean(act.sum(1)), rtol=1e-5)
    np.testing.assert_array_equal(gdm.fired, act.sum(0))
    dn = np.linalg.norm(p["W_dec"], axis=1)
    mask = (np.arange(10) % 2).astype(np.float32)  # "dead" latents
    anth = m.loss(jnp.asarray(x), lam=lam, eps=2.0, sparsity="tanh", tanh_c=4.0,
                  preact_coef=3e-2, preact_mask=jnp.asarray(mask))
    tanh = lam * np.mean(np.sum(np.tanh(4.0 * np.abs(f) * dn), axis=1))
    pre = 3e-2 * np.mean(np.sum(np.maximum(p["threshold"] - pi, 0) * dn * mask, axis=1))
    np.testing.assert_allclose(anth.sparsity, tanh, rtol=1e-5)
    np.testing.assert_allclose(anth.preact, pre, rtol=1e-5)
    assert pre > 0
    ev = 1 - np.sum((x - xh) ** 2) / np.sum((x - x.mean(0)) ** 2)
    np.testing.assert_allclose(1 - gdm.sse / gdm.sst, ev, rtol=1e-5)


def test_optimizer_b1_zero_matches_optax_adam_with_lr_schedule():
    """Our chain (clip → scale_by_rms(bias-corrected, eps outside √) → −lr(t)) equals
    clip → optax.scale_by_adam(b1=0) → −lr(t) with lr(t) written out by hand."""
    import optax

    from sae.config import TrainConfig
    from sae.step import lr_schedule, optimizer

    cfg = TrainConfig(d_in=4, width=8, lr=1e-2, lr_warmup_steps=3, lr_decay_frac=0.5,
                      total_steps=8, clip_norm=0.5)
    lr_hand = [1e-2 * min(1.0, (t + 1) / 3) * (1.0 if t < 4 else (8 - t) / 4) for t in range(8)]
    np.testing.assert_allclose([float(lr_schedule(cfg, 1e-2)(t)) for t in range(8)], lr_hand,
                               rtol=1e-6)
    params = {"a": jnp.ones((3, 4)), "b": jnp.zeros(5)}
    ref = optax.chain(optax.clip_by_global_norm(0.5), optax.scale_by_adam(b1=0.0, b2=0.999,
                                                                        eps=1e-8))
    ours = optimizer(cfg, 1e-2)
    s_ref, s_ours = ref.init(params), ours.init(params)
    for t in range(8):
        g = jax.tree.map(lambda p: jax.random.normal(jax.random.key(t), p.shape), params)
        u_ref, s_ref = ref.update(g, s_ref, params)
        u_ours, s_ours = ours.update(g, s_ours, params)
        for k in params:
            np.testing.assert_allclose(u_ours[k], -lr_hand[t] * u_ref[k], rtol=1e-5, atol=1e-9)


# ---- TopK: exactly k kept, ties broken as lax.top_k breaks them, on both code paths ----
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from sae.model import topk_mask  # noqa: E402


def _ref_mask(pi, k):
    idx = np.asarray(jax.lax.top_k(jnp.asarray(pi), k)[1])
    ref = np.zeros(pi.shape, bool)
    np.put_along_axis(ref, idx, True, axis=-1)
    return ref


@settings(max_examples=40, deadline=None)
@given(data=st.data(), k=st.sampled_from([1, 2, 3, 8, 9, 12]), M=st.sampled_from([12, 20]),
       rows=st.just(4))
def test_topk_mask_exactly_k_under_ties(data, k, M, rows):
    # few shapes (one compilation each), many value patterns
    # few distinct values → many ties, including at the k-th value
    vals = data.draw(st.lists(st.sampled_from([-1.0, 0.0, 1.0, 3.0]), min_size=rows * M,
                              max_size=rows * M))
    pi = np.asarray(vals, np.float32).reshape(rows, M)
    mask = np.asarray(topk_mask(jnp.asarray(pi), k))
    np.testing.assert_array_equal(mask.sum(-1), k)
    np.testing.assert_array_equal(mask, _ref_mask(pi, k))
    np.testing.assert_array_equal(np.asarray(jax.vmap(lambda r: topk_mask(r, k))(pi)), mask)
    f = np.asarray(topk_codes(jnp.asarray(pi), k))
    assert ((f != 0) <= mask).all() and (f[mask] == np.maximum(pi[mask], 0)).all()


def test_topk_issue_example_keeps_two():
    pi = jnp.asarray([[3.0, 3.0, 1.0, 0.5, 3.0]])
    assert int(topk_mask(pi, 2).sum()) == 2  # the k ≤ 8 path once kept all three 3.0s
    wide = jnp.tile(pi, (1, 4))  # the lax.top_k path (k > 8), 12 tied 3.0s
    assert int(topk_mask(wide, 10).sum()) == 10
    np.testing.assert_array_equal(np.asarray(topk_codes(pi, 2)), [[3.0, 3.0, 0, 0, 0]])
