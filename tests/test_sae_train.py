"""sae.train: vmapped sweeps == separate runs, data-parallel == single device, exact
checkpoint resume, NaN/Inf guards, input scaling fold-back, bad-input errors."""
import jax
import numpy as np
import pytest

import sae

D_IN, WIDTH, B = 16, 64, 128


def _data(n=2048, seed=0):
    """Small planted data: 4-sparse non-negative combinations of 48 random unit atoms."""
    D = sae.planted_dictionary(jax.random.key(seed), D_IN, 48)
    src = sae.PlantedSource(D, 4, n, seed=seed)
    return np.asarray(next(src))


def _cfg(**kw):
    base = dict(d_in=D_IN, width=WIDTH, batch_size=B, total_steps=60, lr=3e-3, lam=1e-2,
                eps=0.05, theta_init=0.05, lam_warmup_steps=20, lr_warmup_steps=5,
                steps_per_call=10, log_every=20, progress=False, scale_batches=2)
    base.update(kw)
    return sae.TrainConfig(**base)


def _close(a, b, rtol=2e-4, atol=2e-5):
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=atol, err_msg=k)


def test_vmapped_lambda_sweep_equals_separate_runs_and_l0_falls():
    X = _data()
    cfg = _cfg(total_steps=80)
    lams = [1e-3, 1e-2, 3e-2, 1e-1]
    res = sae.train(X, cfg, sweep=sae.sweep(cfg, lam=lams, seed=[7, 7, 7, 7]))
    assert res.params["W_dec"].shape == (4, WIDTH, D_IN)
    l0 = []
    for i, lam in enumerate(lams):
        hp = sae.HParams.from_config(cfg)._replace(lam=np.float32(lam))  # same compiled step
        single = sae.train(X, _cfg(total_steps=80, seed=7, data_seed=0), hparams=hp)
        _close(res.sae_params(i), single.params)
        l0.append(float(sae.metrics.l0(res.encode(X, i))))
    assert all(a > b for a, b in zip(l0, l0[1:])), l0
    assert res.history[-1]["step"] == 80 and len(res.history[-1]["l0"]) == 4


def test_data_parallel_8_devices_equals_1_device():
    assert len(jax.devices()) == 8
    X = _data()
    cfg = _cfg(total_steps=30)
    one = sae.train(X, cfg)
    eight = sae.train(X, cfg, mesh=sae.make_mesh(n_data=8))
    _close(one.params, eight.params)
    shard = eight.state.since_fired.sharding
    assert len(shard.device_set) == 8
    # sweep axis sharded over 2 devices × batch over 4
    sw = sae.sweep(cfg, lam=[1e-3, 3e-2])
    a = sae.train(X, cfg, sweep=sw)
    b = sae.train(X, cfg, sweep=sw, mesh=sae.make_mesh(n_data=4, n_sweep=2))
    _close(a.params, b.params)
    assert b.state.step.sharding.spec[0] == "sweep"


def test_checkpoint_resume_equals_uninterrupted(tmp_path):
    X = _data()
    cfg = _cfg(total_steps=60, checkpoint_every=20, recipe="anthropic", lam=0.1, eps=1.0,
               theta_init=0.1, lr_decay_frac=0.3)
    full = sae.train(X, cfg)
    ck = str(tmp_path / "ck")
    part = sae.train(X, cfg, checkpoint_dir=ck, max_steps=40)  # "interrupted" after 40 steps
    assert part.history[-1]["step"] == 40
    with pytest.raises(ValueError, match="hparams"):  # another λ cannot resume this run
        sae.train(X, cfg, checkpoint_dir=ck, hparams=sae.HParams.from_config(cfg)._replace(
            lam=np.float32(0.5)))
    resumed = sae.train(X, cfg, checkpoint_dir=ck)
    for k in full.params:
        np.testing.assert_array_equal(full.params[k], resumed.params[k], err_msg=k)
    np.testing.assert_array_equal(full.state.since_fired, resumed.state.since_fired)
    assert resumed.scale == full.scale and int(resumed.state.step) == 60
    # also for an iterator without skip(): fast-forwarded by consuming batches
    src = sae.PlantedSource(sae.planted_dictionary(jax.random.key(1), D_IN, 48), 4, B, seed=3)
    cfg2 = _cfg(total_steps=40, checkpoint_every=20)
    full2 = sae.train(iter(list(src.batch(t) for t in range(40))), cfg2)
    ck2 = str(tmp_path / "ck2")
    sae.train(iter([src.batch(t) for t in range(40)]), cfg2, checkpoint_dir=ck2, max_steps=20)
    res2 = sae.train(iter([src.batch(t) for t in range(40)]), cfg2, checkpoint_dir=ck2)
    for k in full2.params:
        np.testing.assert_array_equal(full2.params[k], res2.params[k], err_msg=k)


def test_scale_is_folded_back_into_weights():
    X = _data() * 37.0
    cfg = _cfg(total_steps=20)
    res = sae.train(X, cfg)
    c = res.scale
    src = sae.ArraySource(X, B, seed=0)  # the scale comes from the first scale_batches=2
    first = np.concatenate([next(src), next(src)])
    assert np.mean(np.sum((first * c) ** 2, axis=1)) == pytest.approx(1.0, rel=1e-4)
    # codes of the exported (original-unit) SAE on x == codes of the raw model on c·x
    raw = jax.tree.map(np.asarray, res.graphdef and __import__("flax").nnx.merge(
        res.graphdef, res.state.params).params())
    f_raw = np.asarray(sae.encode(raw, X[:256] * c))
    np.testing.assert_allclose(res.encode(X[:256]), f_raw, rtol=1e-4, atol=1e-5)
    xh = sae.reconstruct(res.params, X[:256])
    np.testing.assert_allclose(xh, np.asarray(sae.reconstruct(raw, X[:256] * c)) / c,
                               rtol=1e-3, atol=1e-3)


def test_decoder_norm_unit_and_topk_training():
    X = _data()
    res = sae.train(X, _cfg(total_steps=20, decoder_norm="unit", lr=1e-2))
    np.testing.assert_allclose(np.linalg.norm(res.state.params["W_dec"][...], axis=1), 1.0,
                               rtol=1e-5)
    top = sae.train(X, _cfg(total_steps=20, arch="topk", k=3))
    assert top.history[-1]["l0"] <= 3.0
    assert np.all((top.encode(X[:100]) != 0).sum(1) <= 3)


def test_nan_batch_is_rejected_with_step():
    X = _data()
    batches = [X[i * B:(i + 1) * B].copy() for i in range(6)]
    batches[4][7, 3] = np.nan
    with pytest.raises(ValueError, match=r"step 4.*NaN"):
        sae.train(iter(batches), _cfg(total_steps=6, steps_per_call=1))


def test_non_finite_params_stop_with_step_and_sae_index(tmp_path):
    X = _data()
    cfg = _cfg(total_steps=60, checkpoint_every=20, clip_norm=1e30, lr_warmup_steps=0)

    class Exploding:  # finite data, then values that overflow the float32 loss from step 40
        def __init__(self):
            self.src, self.t = sae.ArraySource(X, B), 0

        def __iter__(self):
            return self

        def __next__(self):
            x = next(self.src) * (1e25 if self.t >= 40 else 1.0)
            self.t += 1
            return x

    ck = str(tmp_path / "ck")
    sw = sae.sweep(cfg, lr=[1e-3, 1e-3], lam=[0.0, 1e-2])
    with pytest.raises(sae.NonFiniteError, match=r"step 40 .*SAE index 0"):
        sae.train(Exploding(), cfg, sweep=sw, checkpoint_dir=ck)
    import orbax.checkpoint as ocp

    mngr = ocp.CheckpointManager(ck)
    assert mngr.latest_step() == 40  # the last good checkpoint is intact and finite
    # a huge lr on SAE 1 only: blows up its parameters, names index 1
    sw2 = sae.sweep(cfg, lr=[1e-3, 1e30])
    with pytest.raises(sae.NonFiniteError, match=r"SAE index 1"):
        sae.train(X, cfg, sweep=sw2)


@pytest.mark.parametrize("kw, exc, msg", [
    (dict(width=0), ValueError, "width=0"),
    (dict(d_in=-2), ValueError, "d_in=-2"),
    (dict(lam=-0.1), ValueError, "lam"),
    (dict(eps=0.0), ValueError, "eps"),
    (dict(eps=-1.0), ValueError, "eps"),
    (dict(width=8.0), TypeError, "width"),
    (dict(sparsity="l1"), ValueError, "sparsity"),
    (dict(checkpoint_every=15), ValueError, "checkpoint_every"),
])
def test_bad_config(kw, exc, msg):
    with pytest.raises(exc, match=msg):
        _cfg(**kw)


def test_bad_data_and_sweep():
    cfg = _cfg()
    with pytest.raises(ValueError, match=r"d_in=16.*\(128, 15\)"):
        sae.train(iter([np.ones((B, 15), np.float32)]), cfg)
    with pytest.raises(ValueError, match="lam"):
        sae.sweep(cfg, lam=[1e-3, -1e-3])
    with pytest.raises(ValueError, match="eps"):
        sae.sweep(cfg, eps=[0.0, 1.0])
    with pytest.raises(ValueError, match="fewer than batch_size"):
        sae.train(np.ones((10, D_IN), np.float32), cfg)
    with pytest.raises(ValueError, match="n_sae=3"):
        sae.train(np.ones((256, D_IN), np.float32), cfg, sweep=sae.sweep(cfg, lam=[0, 1, 2.0]),
                mesh=sae.make_mesh(n_data=4, n_sweep=2))
    with pytest.raises(TypeError, match="config"):
        sae.train(np.ones((256, D_IN)), {"d_in": 16})


def test_bf16_matmuls_and_progress_bar(capsys):
    X = _data()
    cfg = _cfg(total_steps=20, matmul_dtype="bfloat16", progress=True, log_every=10)
    res = sae.train(X, cfg)
    f32 = sae.train(X, _cfg(total_steps=20, log_every=10))
    assert [h["step"] for h in res.history] == [10, 20]
    assert np.isfinite(res.params["W_dec"]).all()
    # bf16 operands change the numbers a little, not the training outcome
    assert abs(res.history[-1]["ev"] - f32.history[-1]["ev"]) < 0.05
    assert not np.array_equal(res.params["W_enc"], f32.params["W_enc"])
    assert "tok" in capsys.readouterr().err


def test_jax_array_iterator_matches_numpy_and_nan_detected_in_jit():
    import jax.numpy as jnp

    X = _data()
    batches = [X[i * B:(i + 1) * B] for i in range(10)]
    cfg = _cfg(total_steps=10, steps_per_call=5)
    a = sae.train(iter(batches), cfg)
    b = sae.train(iter([jnp.asarray(x) for x in batches]), cfg)
    for k in a.params:
        np.testing.assert_allclose(a.params[k], b.params[k], rtol=1e-6, atol=1e-7)
    bad = [jnp.asarray(x) for x in batches]
    bad[7] = bad[7].at[0, 0].set(jnp.inf)
    with pytest.raises(ValueError, match=r"step 7 .*NaN/Inf"):
        sae.train(iter(bad), cfg)


def test_tied_arch_trains_through_the_one_trainer():
    X = _data()
    res = sae.train(X, _cfg(total_steps=30, arch="tied"),
                    sweep=sae.sweep(_cfg(arch="tied"), lam=[1e-3, 1e-2]))
    assert "W_enc" not in res.state.params  # one tied matrix in the state
    c = res.scale
    for i in range(2):
        p = res.sae_params(i)  # folding the scale: W_enc = c·Wᵀ, W_dec = W/c
        np.testing.assert_allclose(p["W_enc"], c * c * p["W_dec"].T, rtol=1e-5, atol=1e-7)
    assert res.history[-1]["ev"][0] > 0.3
    m = res.model(1)  # an untied module with the folded weights gives the same codes
    np.testing.assert_allclose(np.asarray(m.encode(X[:64])), res.encode(X[:64], 1),
                               rtol=1e-5, atol=1e-6)


def test_tied_sae_on_whitened_inputs_is_the_aip_tied_sae():
    """Hu et al.'s threshold SAE: π = (x − b′) S̃ D + b_enc and the S̃-norm loss, with
    D = S̃^{-1/2} W_decᵀ and b′ = S̃^{-1/2} b_w, equal the tied SAE on x_w = S̃^{1/2} x."""
    from flax import nnx

    rng = np.random.default_rng(0)
    H, M = 6, 10
    A = rng.normal(size=(H, H))
    S = A @ A.T + H * np.eye(H)
    w, V = np.linalg.eigh(S)
    S_half, S_mhalf = (V * np.sqrt(w)) @ V.T, (V / np.sqrt(w)) @ V.T
    x = rng.normal(size=(32, H))
    m = sae.TiedJumpReLUSAE(H, M, rngs=nnx.Rngs(0), theta_init=0.05)
    m.b_dec[...] = rng.normal(size=H).astype(np.float32) * 0.1
    m.b_enc[...] = rng.normal(size=M).astype(np.float32) * 0.1
    xw = (x @ S_half).astype(np.float32)
    Wd, bw = np.asarray(m.W_dec[...], np.float64), np.asarray(m.b_dec[...], np.float64)
    D, b_act = S_mhalf @ Wd.T, S_mhalf @ bw
    pi_act = (x - b_act) @ S @ D + np.asarray(m.b_enc[...])
    np.testing.assert_allclose(np.asarray(m.pre_activations(xw)), pi_act, rtol=1e-4, atol=1e-4)
    xh_act = np.asarray(m(xw), np.float64) @ S_mhalf
    err = x - xh_act
    sq_S = np.einsum("ni,ij,nj->n", err, S, err)
    np.testing.assert_allclose(np.sum((xw - np.asarray(m(xw))) ** 2, -1), sq_S, rtol=1e-4)


def test_target_l0_lands_on_the_target():
    # raw θ: the rate 0.02 was chosen for it. Under log θ (the recipes' default) θ moves by
    # ≈ lr·θ per Adam step, L0 lags λ further and this rate overshoots (docs/sae.md).
    X = _data(n=4096)
    lam_end = {}
    for target in (3.0, 8.0):
        cfg = _cfg(total_steps=600, target_l0=target, target_l0_rate=0.02, lam=1e-2,
                   lam_warmup_steps=0, steps_per_call=50, log_every=50, log_theta=False)
        res = sae.train(X, cfg)
        l0_end = np.mean([h["l0"] for h in res.history[-4:]])  # last 200 steps
        assert abs(l0_end / target - 1) <= 0.10, (l0_end, target)
        held = np.mean((res.encode(X[:1024]) != 0).sum(1))
        assert abs(held / target - 1) <= 0.15, (held, target)
        lam_end[target] = res.history[-1]["lam"]
    assert lam_end[3.0] > lam_end[8.0]  # a sparser target needs a larger λ


def test_target_l0_rejected_for_topk_and_out_of_range():
    with pytest.raises(ValueError, match="target_l0"):
        _cfg(arch="topk", k=3, target_l0=3.0)
    with pytest.raises(ValueError, match="target_l0"):
        _cfg(target_l0=0.0)
    with pytest.raises(ValueError, match="target_l0"):
        _cfg(target_l0=1e6)
