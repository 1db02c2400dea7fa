"""No silent garbage: bad inputs are refused before any compute, with an error that names our
argument (not a reshape that measures the wrong thing, all-NaN metrics, or an error from deep
inside JAX / orbax / numpy), and unreadable files give one error naming the file."""
from __future__ import annotations

import json
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsense as js
from jaxsense import sparse as sp
from sae import atoms as at
from sae import checkpoint as ck
from sae import io as sio

KEY = jax.random.PRNGKey(0)
D_OP, M_OP = 4, 10


# ----------------------------------------------------------------------------- operators
OPS = {"gaussian": js.dense_gaussian(KEY, M_OP, D_OP),
       "rank_one": js.rank_one(KEY, M_OP, D_OP),
       "entry": js.entry_sampling(KEY, M_OP, D_OP)}


@pytest.mark.parametrize("kind", sorted(OPS))
@pytest.mark.parametrize("jit", [False, True])
def test_operator_shapes_checked_eagerly_and_under_jit(kind, jit):
    op = OPS[kind]
    wrap = (lambda f: jax.jit(f)) if jit else (lambda f: f)
    apply = wrap(lambda o, X: o.apply(X))
    adjoint = wrap(lambda o, v: o.adjoint(v))
    gram = wrap(lambda o, U: o.apply_gram(U))
    # (2, 8) has d·d = 16 entries: DenseGaussian used to reshape and measure it silently
    with pytest.raises(ValueError, match=r"X: expected shape \(\.\.\., 4, 4\), got \(2, 8\)"):
        apply(op, jnp.ones((2, 8)))
    with pytest.raises(ValueError, match=r"v: expected shape \(.*10,?\), got \(7,\)"):
        adjoint(op, jnp.ones(7))
    with pytest.raises(ValueError, match=r"U: expected shape \(4, '\*'\), got \(5, 2\)"):
        gram(op, jnp.ones((5, 2)))
    # correct shapes still work (batched X for apply)
    X = jnp.eye(D_OP)
    assert apply(op, jnp.stack([X, 2 * X])).shape == (2, M_OP)
    assert adjoint(op, jnp.ones(M_OP)).shape == (D_OP, D_OP)
    np.testing.assert_allclose(gram(op, jnp.ones((D_OP, 2))),
                               op.apply(2 * jnp.ones((D_OP, D_OP))), rtol=1e-5)


@pytest.mark.parametrize("maker", [js.dense_gaussian, js.rank_one, js.entry_sampling])
def test_integer_operator_dtype_refused(maker):
    with pytest.raises(TypeError, match=r"dtype=.*int32.*expected a floating dtype"):
        maker(KEY, M_OP, D_OP, jnp.int32)


def test_make_problem_integer_dtype_names_the_argument():
    # before: "dtype argument to `normal` must be a float or complex dtype" from jax.random
    with pytest.raises(TypeError, match=r"dtype=.*int32.*expected a floating dtype"):
        js.make_problem(KEY, 4, 3, 10, dtype=jnp.int32)
    with pytest.raises(TypeError, match=r"dtype='int8'"):
        js.ground_truth(KEY, 4, (1.0,), dtype="int8")


# ----------------------------------------------------------------------------- jaxsense.sparse
def _dict(H=8, N=16, seed=0):
    return np.array(jax.random.normal(jax.random.PRNGKey(seed), (H, N)), np.float32)


SPARSE_CALLS = {
    "atom_coherence": lambda D, Y: sp.atom_coherence(D),
    "mutual_coherence": lambda D, Y: sp.mutual_coherence(D),
    "basis_pursuit": lambda D, Y: sp.basis_pursuit(D, Y, n_iter=5),
    "omp": lambda D, Y: sp.omp(D, Y, 2),
    "lasso_fista": lambda D, Y: sp.lasso_fista(D, Y, 0.1, n_iter=5),
}


@pytest.mark.parametrize("fn", sorted(SPARSE_CALLS))
def test_sparse_refuses_integer_and_nonfinite_inputs(fn):
    call = SPARSE_CALLS[fn]
    D, Y = _dict(), np.ones((3, 8), np.float32)
    Di = np.arange(8 * 16, dtype=np.int32).reshape(8, 16) % 5 - 2
    with pytest.raises(TypeError, match=r"D: expected a floating-point array, got dtype int32"):
        call(Di, Y)
    Dn = D.copy()
    Dn[1, 2] = np.nan
    with pytest.raises(ValueError, match=r"D: expected all entries finite, found 1 non-finite"):
        call(Dn, Y)
    if fn not in ("atom_coherence", "mutual_coherence"):
        Yn = Y.copy()
        Yn[0, 0] = np.inf
        with pytest.raises(ValueError, match=r"Y: expected all entries finite"):
            call(D, Yn)


def test_integer_dictionary_used_to_give_nan_now_refused_but_float_works():
    D = np.array([[1, 0, 1], [0, 1, 1]], np.int32)
    with pytest.raises(TypeError, match="D: expected a floating-point"):
        sp.atom_coherence(D)
    mu = np.asarray(sp.atom_coherence(D.astype(np.float32)))
    assert np.all(np.isfinite(mu))
    np.testing.assert_allclose(mu, [1 / np.sqrt(2), 1 / np.sqrt(2), 1 / np.sqrt(2)], rtol=1e-6)


# ----------------------------------------------------------------------------- sae.atoms
def test_atoms_metrics_refuse_integer_and_nonfinite_dictionaries():
    Di = np.arange(8 * 16, dtype=np.int64).reshape(8, 16) % 3
    codes = np.zeros((4, 16), np.float32)
    codes[:, 0] = 1.0
    with pytest.raises(TypeError, match="D: expected a floating-point array"):
        at.uniqueness_per_sample(Di, codes)
    with pytest.raises(TypeError, match="D: expected a floating-point array"):
        at.rip_estimate(Di, None, 2, key=jax.random.key(0), n_supports=4)
    with pytest.raises(TypeError, match="D: expected a floating-point array"):
        at.l1_recoverability(Di, codes, n_iter=2)
    with pytest.raises(TypeError, match="D: expected a floating-point array"):
        at.tsae_construction(Di)
    with pytest.raises(TypeError, match="D_true: expected a floating-point array"):
        at.match_atoms(Di, np.ones((16, 8)))
    Dn = _dict()
    Dn[0, 0] = np.inf
    with pytest.raises(ValueError, match="D: expected all entries finite"):
        at.uniqueness_per_sample(Dn, codes)
    x = np.ones((4, 8), np.float32)
    x[2, 3] = np.nan
    with pytest.raises(ValueError, match="x: expected all entries finite"):
        at.l1_recoverability(_dict(), codes, x=x, target="activation", n_iter=2)
    with pytest.raises(ValueError, match="x: expected all entries finite"):
        at.r2(x, np.ones((4, 8)))


def _units(B=6, H=4, N=8):
    rng = np.random.default_rng(0)
    return {"D": rng.normal(size=(H, N)).astype(np.float32),
            "codes": np.abs(rng.normal(size=(B, N))).astype(np.float32),
            "x_hat": rng.normal(size=(B, H)).astype(np.float32)}


def test_unit_metrics_checks_rows_and_values():
    x = np.random.default_rng(1).normal(size=(6, 4)).astype(np.float32)
    aip = at.aip_from_moment(np.eye(4))
    u = _units()
    u_rows = dict(u, codes=u["codes"][:5])
    with pytest.raises(ValueError, match=r"units\['codes'\]: expected \(6, N\).*got shape \(5, 8\)"):
        at.unit_metrics(x, u_rows, aip, key=jax.random.key(0))
    xn = x.copy()
    xn[0, 0] = np.nan
    with pytest.raises(ValueError, match="x: expected all entries finite"):
        at.unit_metrics(xn, u, aip, key=jax.random.key(0))
    with pytest.raises(TypeError, match=r"units\['D'\]: expected a floating-point array"):
        at.unit_metrics(x, dict(u, D=u["D"].astype(np.int32)), aip, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"units\['x_hat'\]: expected the shape of x"):
        at.unit_metrics(x, dict(u, x_hat=u["x_hat"][:, :3]), aip, key=jax.random.key(0))


@pytest.mark.parametrize("singular", ["raise", "pinv"])
def test_aip_from_zero_moment_names_m2(singular):
    # before: singular="pinv" died with an IndexError on an empty eigenvalue list, and
    # "raise" suggested ridge > 0, which cannot help a zero moment (ridge is relative)
    with pytest.raises(ValueError, match=r"m2 \(second moment, H=3\) is all zeros"):
        at.aip_from_moment(np.zeros((3, 3)), singular=singular)


def test_k_quantile_out_of_range_names_the_argument():
    l0 = np.array([1, 2, 3, 4])
    assert at.k_from_l0(l0, 1.0) == 4.0 and at.k_from_l0(l0, "mean") == 2.5
    with pytest.raises(ValueError, match=r"k_quantile=1.5: expected a value in \[0.0, 1.0\]"):
        at.k_from_l0(l0, 1.5)
    with pytest.raises(ValueError, match=r"k_quantile='median': expected one of"):
        at.k_from_l0(l0, "median")
    with pytest.raises(ValueError, match=r"k_quantile=-0.1"):
        at.uniqueness_per_atom(np.zeros(3), l0, k_quantile=-0.1)


# ----------------------------------------------------------------------------- checkpoint
def _meta(step):
    return {"step": step, "config": {"a": 1}, "n_sae": 1, "hparams": {}, "seeds": [0]}


def _two_steps(tmp_path):
    d = str(tmp_path / "ck")
    mngr = ck.open_manager(d, resume=False)
    state = {"w": jnp.arange(3.0)}
    ck.save(mngr, state, _meta(10))
    ck.save(mngr, state, _meta(20))
    return d, state


def test_garbled_checkpoint_meta_names_step_and_previous_step(tmp_path):
    d, state = _two_steps(tmp_path)
    with open(os.path.join(d, "20", "meta", "metadata"), "w") as fh:
        fh.write("{not json")
    with pytest.raises(ck.CheckpointCorruptError) as e:
        ck.restore(ck.open_manager(d, resume=True), state, _meta(0))
    msg = str(e.value)
    assert "step 20" in msg and d in msg and "meta" in msg and "JSONDecodeError" in msg
    assert "previous step 10" in msg and f"delete {os.path.join(d, '20')}" in msg
    # following the advice restores step 10 exactly
    import shutil

    shutil.rmtree(os.path.join(d, "20"))
    got, meta = ck.restore(ck.open_manager(d, resume=True), state, _meta(0))
    assert meta["step"] == 10
    np.testing.assert_array_equal(np.asarray(got["w"]), [0.0, 1.0, 2.0])


def test_garbled_checkpoint_arrays_name_the_state_folder(tmp_path):
    d, state = _two_steps(tmp_path)
    n = 0
    for root, _, files in os.walk(os.path.join(d, "20", "state")):
        if os.path.basename(root) == "d":
            for f in files:
                with open(os.path.join(root, f), "wb") as fh:
                    fh.write(b"garbage")
                n += 1
    assert n > 0
    with pytest.raises(ck.CheckpointCorruptError,
                       match=r"step 20 .* its state .*previous step 10"):
        ck.restore(ck.open_manager(d, resume=True), state, _meta(0))


def test_single_garbled_step_says_no_earlier_step(tmp_path):
    d = str(tmp_path / "ck")
    mngr = ck.open_manager(d, resume=False)
    state = {"w": jnp.zeros(2)}
    ck.save(mngr, state, _meta(5))
    with open(os.path.join(d, "5", "meta", "metadata"), "w") as fh:
        fh.write("[1, 2]")  # valid JSON, not an object
    with pytest.raises(ck.CheckpointCorruptError, match=r"step 5 .*no earlier step"):
        ck.restore(ck.open_manager(d, resume=True), state, _meta(0))


# ----------------------------------------------------------------------------- weight files
def _params(d=4, M=8):
    rng = np.random.default_rng(0)
    return {"W_enc": rng.normal(size=(d, M)).astype(np.float32),
            "W_dec": rng.normal(size=(M, d)).astype(np.float32),
            "b_enc": np.zeros(M, np.float32), "b_dec": np.zeros(d, np.float32),
            "threshold": np.full(M, 0.1, np.float32)}


def test_gemmascope_loader_names_the_file(tmp_path):
    cases = {}
    p = tmp_path / "text.npz"
    p.write_text("not an archive")
    cases["text"] = p
    p = tmp_path / "pickle.npz"
    p.write_bytes(pickle.dumps({"W_enc": [1, 2]}))
    cases["pickle"] = p
    p = tmp_path / "single.npz"
    with open(p, "wb") as fh:
        np.save(fh, np.ones(3))
    cases["npy"] = p
    p = tmp_path / "other.npz"
    np.savez(p, weights=np.ones(3))
    cases["missing keys"] = p
    p = tmp_path / "objects.npz"
    np.savez(p, **dict(_params(), W_enc=np.array([{"a": 1}], dtype=object)))
    cases["object array"] = p
    for path in cases.values():
        with pytest.raises(sio.WeightsFileError,
                           match=rf"{path}: not readable as a Gemma Scope params.npz"):
            sio.load_gemmascope(str(path))
    good = tmp_path / "good.npz"
    sio.save_gemmascope(str(good), _params())
    np.testing.assert_array_equal(sio.load_gemmascope(str(good))["W_enc"], _params()["W_enc"])


def test_saelens_loader_names_the_bad_file(tmp_path):
    folder = str(tmp_path / "sl")
    sio.save_saelens(folder, _params())
    cfg_path = os.path.join(folder, "cfg.json")
    good_cfg = open(cfg_path).read()
    params, _ = sio.load_saelens(folder)  # the intact folder loads
    assert params["W_enc"].shape == (4, 8)
    for bad in ('{"architecture": "jumprelu",', "[1, 2, 3]", "\xff\xfe garbage"):
        with open(cfg_path, "w", encoding="latin-1") as fh:
            fh.write(bad)
        with pytest.raises(sio.WeightsFileError,
                           match=rf"{cfg_path}: not readable as a SAELens cfg.json"):
            sio.load_saelens(folder)
    with open(cfg_path, "w") as fh:
        fh.write(good_cfg)
    wpath = os.path.join(folder, "sae_weights.safetensors")
    with open(wpath, "wb") as fh:
        fh.write(b"\x00" * 5)
    with pytest.raises(sio.WeightsFileError,
                       match=rf"{wpath}: not readable as a SAELens sae_weights.safetensors"):
        sio.load_saelens(folder)
    # a SAELens training checkpoint's activation_scaler.json, garbled
    cfg = json.loads(good_cfg)
    cfg["normalize_activations"] = "expected_average_only_in"
    with open(cfg_path, "w") as fh:
        json.dump(cfg, fh)
    sio.save_saelens(str(tmp_path / "sl2"), _params())
    os.replace(str(tmp_path / "sl2" / "sae_weights.safetensors"), wpath)
    spath = os.path.join(folder, "activation_scaler.json")
    with open(spath, "w") as fh:
        fh.write("{scaling_factor: 2}")
    with pytest.raises(sio.WeightsFileError, match=rf"{spath}: not readable"):
        sio.load_saelens(folder)


def test_boundary_checks_run_chex_asserts_and_name_the_argument():
    """The array checks of jaxsense._checks are chex asserts re-raised under our contract:
    the error names the argument, chex's AssertionError is its cause."""
    import jax.numpy as jnp

    from jaxsense import _checks

    cases = [(ValueError, lambda: _checks.check_shape("X", np.zeros((2, 8)), (4, 4)), "X: "),
             (ValueError, lambda: _checks.check_finite("D", np.array([1.0, np.nan])), "D: "),
             (TypeError, lambda: _checks.check_float_dtype("Y", np.ones(3, np.int32)), "Y: ")]
    for exc, call, prefix in cases:
        with pytest.raises(exc, match=prefix) as info:
            call()
        assert isinstance(info.value.__cause__, AssertionError)
    # chex's notion of "floating" includes bfloat16 (numpy's dtype.kind calls it "V")
    _checks.check_float_dtype("x", jnp.ones(3, jnp.bfloat16))
    _checks.check_shape("x", np.zeros((5, 4)), (None, 4))
