"""Recipe fidelity: every recipe sets every recipe field itself, and each recipe option does
what its source says — log θ (GDM appendix / Anthropic Jan 2025: t = log θ), the
pre-activation loss on all latents (Anthropic) vs dead ones only (SAELens), the Anthropic
init, the three input scalings, and the constrained decoder (dictionary_learning's
ConstrainedAdam: the gradient's component along each decoder row removed before Adam, rows
renormalised after)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sae
from sae.config import RECIPE_FIELDS, RECIPES, HParams, TrainConfig
from sae.loop import estimate_scale
from sae.model import JumpReLUSAE
from sae.step import init_state, project_out_parallel, remove_parallel_component, train_step

#: TrainConfig fields whose default is None but which no recipe sets (run settings).
NON_RECIPE_NONE = {"target_l0", "matmul_dtype", "data_seed"}


# ------------------------------------------------------------------ recipes are explicit
def test_every_recipe_sets_every_recipe_field_explicitly():
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for name in RECIPE_FIELDS:  # each recipe field is "unset" by default
        unset = "recipe" if name == "input_scaling" else None
        assert fields[name].default == unset, name
    # no optimiser/loss field left with a None default outside the recipes
    none_default = {n for n, f in fields.items() if f.default is None}
    assert none_default - set(RECIPE_FIELDS) == NON_RECIPE_NONE
    for r, rec in RECIPES.items():
        assert set(rec) == set(RECIPE_FIELDS), (r, set(RECIPE_FIELDS) ^ set(rec))
        cfg = TrainConfig(d_in=4, width=8, recipe=r, total_steps=500)
        for name in RECIPE_FIELDS:
            want = rec[name]
            if name == "lam_warmup_steps" and want is None:
                want = 500  # the whole run
            assert getattr(cfg, name) == want, (r, name)


def test_recipe_values_follow_their_sources():
    g, a = RECIPES["gdm"], RECIPES["anthropic"]
    assert g["log_theta"] and a["log_theta"]  # both sources train log θ
    assert (g["b1"], g["b2"]) == (0.0, 0.999) and (a["b1"], a["b2"]) == (0.9, 0.999)
    assert g["init"] == "gdm" and a["init"] == "anthropic"
    assert g["decoder_norm"] == "constrained" and a["decoder_norm"] == "none"
    assert a["preact_on"] == "all" and a["preact_coef"] == 3e-6
    assert g["input_scaling"] == "norm2" and a["input_scaling"] == "sqrt_d"
    assert (a["eps"], a["theta_init"], a["tanh_c"]) == (2.0, 0.1, 4.0)
    assert (g["eps"], g["theta_init"], g["lr"]) == (1e-3, 1e-3, 7e-5)
    # an explicit field still overrides the recipe
    cfg = TrainConfig(d_in=4, width=8, recipe="anthropic", b1=0.0, log_theta=False)
    assert cfg.b1 == 0.0 and cfg.log_theta is False and cfg.init == "anthropic"


@pytest.mark.parametrize("kw, exc, word", [
    (dict(init="he"), ValueError, "init"),
    (dict(decoder_norm="sphere"), ValueError, "decoder_norm"),
    (dict(input_scaling="norm1"), ValueError, "input_scaling"),
    (dict(preact_on="some"), ValueError, "preact_on"),
    (dict(log_theta="yes"), TypeError, "log_theta"),
])
def test_bad_recipe_options_are_named(kw, exc, word):
    with pytest.raises(exc, match=word):
        TrainConfig(d_in=4, width=8, **kw)


# ------------------------------------------------------------------ 1. log θ
def test_log_theta_is_stored_and_its_gradient_is_the_chain_rule():
    """The recipe default stores t = log θ; ∂L/∂t = θ · ∂L/∂θ (jax.grad through exp) where
    ∂L/∂θ is taken on the raw-θ model with the same weights."""
    cfg = TrainConfig(d_in=6, width=10, recipe="anthropic", batch_size=64)
    hp = HParams.from_config(cfg)
    graphdef, state = init_state(cfg, hp, jax.random.key(0))
    np.testing.assert_allclose(state.params["theta"][...], np.log(0.1), rtol=1e-6)

    x = jax.random.normal(jax.random.key(1), (64, 6)) * 2.0
    log_m = JumpReLUSAE(6, 10, rngs=nnx.Rngs(3), log_theta=True, theta_init=0.1)
    raw_m = JumpReLUSAE(6, 10, rngs=nnx.Rngs(3), log_theta=False, theta_init=0.1)
    theta = jnp.linspace(0.05, 0.6, 10)  # spread so some pre-activations sit in the window
    log_m.theta[...] = jnp.log(theta)
    raw_m.theta[...] = theta
    kw = dict(lam=1.0, eps=2.0, sparsity="tanh", tanh_c=4.0, preact_coef=3e-2)

    def grad_theta(m):
        gd, p = nnx.split(m)
        return jax.jit(jax.grad(lambda q: nnx.merge(gd, q).loss(x, **kw).loss))(p)["theta"][...]

    g_log, g_raw = grad_theta(log_m), grad_theta(raw_m)
    assert float(jnp.max(jnp.abs(g_raw))) > 0
    np.testing.assert_allclose(g_log, theta * g_raw, rtol=1e-5, atol=1e-9)

    # a train step moves t (θ = exp(t) > 0 needs no projection)
    s, _ = jax.jit(lambda st: train_step(graphdef, st, x, hp, cfg))(state)
    t = s.params["theta"][...]
    assert not np.allclose(t, np.log(0.1))  # it moved
    assert bool(jnp.all(jnp.isfinite(t)))


# ------------------------------------------------------------------ 2. pre-activation loss
def _preact_closed_form(m, x, mask):
    p = {k: np.asarray(v, np.float64) for k, v in m.params().items()}
    pi = (np.asarray(x, np.float64) - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    dn = np.linalg.norm(p["W_dec"], axis=1)
    return np.mean(np.sum(np.maximum(p["threshold"] - pi, 0) * dn * mask, axis=1))


def test_preact_all_vs_dead_differs_by_the_closed_form():
    """loss(all) − loss(dead mask) = λ_P · mean_b Σ_{i alive} ReLU(θ_i − π_bi) ‖d_i‖."""
    m = JumpReLUSAE(5, 12, rngs=nnx.Rngs(0), theta_init=0.3, init="anthropic")
    x = jax.random.normal(jax.random.key(2), (40, 5))
    dead = (np.arange(12) % 3 == 0).astype(np.float32)
    kw = dict(lam=0.5, eps=2.0, sparsity="tanh", preact_coef=0.01)
    l_all = float(m.loss(x, **kw).loss)
    l_dead = float(m.loss(x, preact_mask=jnp.asarray(dead), **kw).loss)
    alive = 1.0 - dead
    np.testing.assert_allclose(l_all - l_dead, 0.01 * _preact_closed_form(m, x, alive),
                               rtol=1e-4)
    assert l_all - l_dead > 0


def test_preact_on_config_reaches_the_train_step():
    """At step 0 no latent is dead: preact_on="dead" adds no pre-activation loss, "all" adds
    λ_P Σ_i ReLU(θ_i − π_i)‖d_i‖ over every latent (Anthropic's January 2025 update)."""
    x = jax.random.normal(jax.random.key(3), (32, 6))
    out = {}
    for on in ("all", "dead"):
        cfg = TrainConfig(d_in=6, width=10, recipe="anthropic", batch_size=32, preact_on=on,
                          preact_coef=0.05)
        hp = HParams.from_config(cfg)
        graphdef, state = init_state(cfg, hp, jax.random.key(0))
        out[on] = float(jax.jit(lambda st: train_step(graphdef, st, x, hp, cfg))(state)[1]["loss"])
        model = nnx.merge(graphdef, state.params)
    assert TrainConfig(d_in=6, width=10, recipe="anthropic").preact_on == "all"
    want = 0.05 * _preact_closed_form(model, x, np.ones(10))
    assert want > 0
    np.testing.assert_allclose(out["all"] - out["dead"], want, rtol=1e-4)


# ------------------------------------------------------------------ 3. init
def test_anthropic_and_gdm_inits():
    d, M = 16, 64
    a = JumpReLUSAE(d, M, rngs=nnx.Rngs(0), init="anthropic")
    w_dec, w_enc = np.asarray(a.W_dec[...]), np.asarray(a.W_enc[...])
    assert np.abs(w_dec).max() <= 1 / np.sqrt(d)
    assert np.abs(w_dec).max() > 0.9 / np.sqrt(d)  # fills the range U(−1/√d, 1/√d)
    np.testing.assert_allclose(w_enc, (d / M) * w_dec.T, rtol=1e-6)
    g = JumpReLUSAE(d, M, rngs=nnx.Rngs(0), init="gdm")
    np.testing.assert_allclose(np.linalg.norm(g.W_dec[...], axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(g.W_enc[...], np.asarray(g.W_dec[...]).T)
    with pytest.raises(ValueError, match="init"):
        JumpReLUSAE(d, M, rngs=nnx.Rngs(0), init="xavier")
    # the recipe picks its init
    cfg = TrainConfig(d_in=d, width=M, recipe="anthropic")
    _, st = init_state(cfg, HParams.from_config(cfg), jax.random.key(0))
    assert float(jnp.max(jnp.linalg.norm(st.params["W_dec"][...], axis=1))) < 0.9


# ------------------------------------------------------------------ 4. input scaling
def test_three_input_scalings():
    r = np.random.default_rng(0)
    d = 7
    x = r.normal(size=(500, d)) * r.uniform(0.2, 3.0, size=(500, 1))  # spread of norms
    batches = [x[:250], x[250:]]
    n2 = lambda c: np.mean(np.sum((c * x) ** 2, axis=1))  # noqa: E731
    c1, cd, cs = (estimate_scale(batches, m) for m in ("norm2", "norm2_d", "sqrt_d"))
    np.testing.assert_allclose(n2(c1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(n2(cd), d, rtol=1e-12)
    np.testing.assert_allclose(np.mean(np.linalg.norm(cs * x, axis=1)), np.sqrt(d), rtol=1e-12)
    assert abs(cd / cs - 1) > 0.05  # E‖cx‖² = d and E‖cx‖ = √d differ when norms vary
    assert TrainConfig(d_in=4, width=8, input_scaling="norm2_d").input_scaling == "norm2_d"


# ------------------------------------------------------------------ 5. constrained decoder
def test_project_out_parallel_is_orthogonal_to_each_row():
    w = jax.random.normal(jax.random.key(0), (9, 5))
    g = jax.random.normal(jax.random.key(1), (9, 5))
    p = remove_parallel_component(g, w)
    cos = jnp.sum(p * w, 1) / (jnp.linalg.norm(p, axis=1) * jnp.linalg.norm(w, axis=1))
    assert float(jnp.max(jnp.abs(cos))) < 1e-5
    # what was removed is parallel to the row; projecting twice changes nothing
    removed = g - p
    np.testing.assert_allclose(jnp.abs(jnp.sum(removed * w, 1)),
                               jnp.linalg.norm(removed, axis=1) * jnp.linalg.norm(w, axis=1),
                               rtol=1e-5)
    np.testing.assert_allclose(remove_parallel_component(p, w), p, atol=1e-6)
    # as an optax transformation: only W_dec is touched
    tx = project_out_parallel("W_dec")
    params = {"W_dec": w, "b": jnp.ones(3)}
    upd, _ = tx.update({"W_dec": g, "b": jnp.arange(3.0)}, tx.init(params), params)
    np.testing.assert_allclose(upd["W_dec"], p, atol=1e-6)
    np.testing.assert_allclose(upd["b"], jnp.arange(3.0))


def _numpy_constrained_step(p, g, lr, b2=0.999, eps=1e-8, clip=1.0):
    """One step of dictionary_learning's JumpReLU trainer order: remove each W_dec row's
    parallel gradient, clip the global norm, Adam(β1 = 0) with bias correction, renormalise."""
    g = dict(g)
    w = p["W_dec"]
    u = w / np.linalg.norm(w, axis=1, keepdims=True)
    g["W_dec"] = g["W_dec"] - np.sum(g["W_dec"] * u, 1, keepdims=True) * u
    gn = np.sqrt(sum(np.sum(v * v) for v in g.values()))
    s = min(1.0, clip / gn)
    out = {}
    for k, v in g.items():
        v = v * s
        nu_hat = (1 - b2) * v * v / (1 - b2)
        out[k] = p[k] - lr * v / (np.sqrt(nu_hat) + eps)
    out["W_dec"] = out["W_dec"] / np.linalg.norm(out["W_dec"], axis=1, keepdims=True)
    return out


def test_constrained_decoder_step_matches_constrained_adam_and_keeps_unit_rows():
    x = jax.random.normal(jax.random.key(4), (64, 6)) + 0.5
    res = {}
    for mode in ("constrained", "unit"):
        cfg = TrainConfig(d_in=6, width=12, recipe="gdm", batch_size=64, decoder_norm=mode,
                          lr=1e-2, lr_warmup_steps=0, log_theta=False, eps=0.5,
                          theta_init=0.05, lam=0.1, lam_warmup_steps=0)
        hp = HParams.from_config(cfg)
        graphdef, state = init_state(cfg, hp, jax.random.key(0))
        grads = jax.grad(lambda q: nnx.merge(graphdef, q).loss(
            x, lam=hp.lam, eps=hp.eps, sparsity="l0").loss)(state.params)
        new, _ = jax.jit(lambda st: train_step(graphdef, st, x, hp, cfg))(state)
        w = np.asarray(new.params["W_dec"][...])
        np.testing.assert_allclose(np.linalg.norm(w, axis=1), 1.0, rtol=1e-6)
        res[mode] = w
    p = {k: np.asarray(v[...], np.float64) for k, v in state.params.items()}
    g = {k: np.asarray(v[...], np.float64) for k, v in grads.items()}
    ref = _numpy_constrained_step(p, g, 1e-2)
    np.testing.assert_allclose(res["constrained"], ref["W_dec"], rtol=2e-4, atol=2e-6)
    # without the projection ("unit": renormalise only) the step is a different one
    assert np.max(np.abs(res["unit"] - ref["W_dec"])) > 1e-3


def test_gdm_recipe_chain_projects_first():
    cfg = TrainConfig(d_in=4, width=8, lr_warmup_steps=0)  # gdm: decoder_norm="constrained"
    tx = sae.step.optimizer(cfg, 1e-3)
    w = jax.random.normal(jax.random.key(0), (8, 4))
    params = {"W_dec": w}
    tangent = remove_parallel_component(jax.random.normal(jax.random.key(1), (8, 4)), w)
    # a radial part added to the gradient is removed before clipping and Adam see it
    upd_t, _ = tx.update({"W_dec": tangent}, tx.init(params), params)
    upd_g, _ = tx.update({"W_dec": tangent + 3.0 * w}, tx.init(params), params)
    np.testing.assert_allclose(upd_g["W_dec"], upd_t["W_dec"], rtol=1e-3, atol=1e-7)
    tx_unit = sae.step.optimizer(dataclasses.replace(cfg, decoder_norm="unit"), 1e-3)
    upd_u, _ = tx_unit.update({"W_dec": tangent + 3.0 * w}, tx_unit.init(params), params)
    diff = float(jnp.max(jnp.abs(upd_u["W_dec"] - upd_t["W_dec"])))
    assert diff > 0.5 * float(jnp.max(jnp.abs(upd_t["W_dec"])))
