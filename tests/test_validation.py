"""Bad input raises a clear error naming the argument, the value and the expectation."""
import jax
import jax.numpy as jnp
import pytest

import jaxsense as js

KEY = jax.random.PRNGKey(0)


@pytest.fixture(scope="module")
def prob():
    return js.make_problem(KEY, d=6, r=2, m=40, spectrum=(2.0, 1.0))


def test_r_search_out_of_range(prob):
    with pytest.raises(ValueError, match=r"r_search=0.*>= 1"):
        js.spectral_sign_init(prob.op, prob.y, 0, 1e-3)
    with pytest.raises(ValueError, match=r"r_search=7.*<= 6"):
        js.spectral_sign_init(prob.op, prob.y, 7, 1e-3)
    with pytest.raises(ValueError, match=r"r_search=9"):
        js.small_random_init(KEY, 6, 9, 1e-3)


def test_p_outside_unit_interval():
    for p in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match=rf"p={p}.*\[0.0, 1.0\)"):
            js.make_problem(KEY, d=6, r=2, m=40, spectrum=(2.0, 1.0), p=p)


def test_alpha_nonpositive(prob):
    for a in (0.0, -1e-3):
        with pytest.raises(ValueError, match=rf"alpha={a}"):
            js.spectral_sign_init(prob.op, prob.y, 2, a)


def test_m_nonpositive():
    with pytest.raises(ValueError, match="m=0"):
        js.make_problem(KEY, d=6, r=2, m=0, spectrum=(2.0, 1.0))


def test_y_length_and_finiteness(prob):
    U0 = js.spectral_sign_init(prob.op, prob.y, 2, 1e-3)
    solver = js.subgm()
    with pytest.raises(ValueError, match=r"y: expected length m=40"):
        js.run(solver, U0, prob.op, prob.y[:30], prob.truth, num_steps=10)
    with pytest.raises(ValueError, match=r"y: expected shape \(40,\)"):
        js.spectral_sign_init(prob.op, prob.y[:30], 2, 1e-3)
    bad = prob.y.at[3].set(jnp.nan)
    with pytest.raises(ValueError, match=r"y: expected all entries finite, found 1"):
        js.run(solver, U0, prob.op, bad, prob.truth, num_steps=10)
    with pytest.raises(ValueError, match=r"y: expected all entries finite"):
        js.spectral_sign_init(prob.op, bad.at[5].set(jnp.inf), 2, 1e-3)


def test_eta_and_rho():
    for eta in (0.0, -1.0):
        with pytest.raises(ValueError, match=rf"eta={eta}"):
            js.geometric(eta, 0.99)
        with pytest.raises(ValueError, match=rf"eta={eta}"):
            js.constant(eta)
    for rho in (0.0, 1.01, -0.5):
        with pytest.raises(ValueError, match=rf"rho={rho}.*\(0.0, 1.0\]"):
            js.geometric(0.1, rho)
    js.geometric(0.1, 1.0)  # ρ = 1 is allowed


def test_mismatched_dtypes_and_shapes(prob, x64):
    U0 = js.spectral_sign_init(prob.op, prob.y, 2, 1e-3)
    with pytest.raises(TypeError, match=r"y: expected dtype float32.*got float64"):
        js.run(js.subgm(), U0, prob.op, prob.y.astype(jnp.float64), prob.truth, num_steps=10)
    with pytest.raises(TypeError, match=r"U0: expected dtype float32.*got float64"):
        js.run(js.subgm(), U0.astype(jnp.float64), prob.op, prob.y, prob.truth, num_steps=10)
    with pytest.raises(ValueError, match=r"U0: expected shape \(d=6, r'\)"):
        js.run(js.subgm(), jnp.zeros((5, 2)), prob.op, prob.y, prob.truth, num_steps=10)
    with pytest.raises(ValueError, match="num_steps=15: expected a multiple of record_every=10"):
        js.run(js.subgm(), U0, prob.op, prob.y, prob.truth, num_steps=15, record_every=10)
    with pytest.raises(ValueError, match=r"metrics=.*unknown \['nope'\]"):
        js.run(js.subgm(), U0, prob.op, prob.y, prob.truth, num_steps=10, metrics=("nope",))
    with pytest.raises(ValueError, match="truth=None"):
        js.run(js.subgm(), U0, prob.op, prob.y, None, num_steps=10, metrics=("fro_error",))
    with pytest.raises(TypeError, match="solver="):
        js.run("subgm", U0, prob.op, prob.y, prob.truth, num_steps=10)


def test_unknown_names():
    with pytest.raises(ValueError, match="loss='l3'"):
        js.subgm(loss="l3")
    with pytest.raises(ValueError, match="distribution='laplace'"):
        js.outlier_noise(KEY, jnp.ones(5), 0.1, "laplace")
    with pytest.raises(ValueError, match=r"spectrum=.*expected r=3 eigenvalues"):
        js.make_problem(KEY, d=6, r=3, m=40, spectrum=(2.0, 1.0))
