"""The plateau stopping rule of ``sae.train`` (``sae.loop.Plateau``) used by the atoms
experiments to train to convergence, and the loss-curve binning of the pipeline."""
import numpy as np
import pytest

import sae
from sae.loop import Plateau, plateau_improvement


def test_plateau_improvement_values():
    w = 5
    assert plateau_improvement([4.0] * w + [2.0] * w, w) == pytest.approx(0.5)
    assert plateau_improvement([3.0] * (2 * w), w) == pytest.approx(0.0)
    assert plateau_improvement([2.0] * w + [3.0] * w, w) == pytest.approx(-0.5)  # got worse
    assert np.isinf(plateau_improvement([1.0] * (2 * w - 1), w))  # too short: no verdict
    # only the last 2w rows count; (T, N) gives one value per SAE
    x = np.stack([np.r_[9.0, [4.0] * w, [2.0] * w], np.r_[9.0, [1.0] * (2 * w)]], 1)
    np.testing.assert_allclose(plateau_improvement(x, w), [0.5, 0.0])


def test_plateau_improvement_bad_input():
    with pytest.raises(ValueError, match="window"):
        plateau_improvement([1.0, 2.0], 0)
    with pytest.raises(ValueError, match="losses"):
        plateau_improvement(np.ones((4, 2, 2)), 1)


def _data(n=2048, d=8, seed=0):
    rng = np.random.default_rng(seed)
    D = rng.standard_normal((24, d))
    codes = rng.random((n, 24)) * (rng.random((n, 24)) < 0.1)
    return (codes @ D).astype(np.float32)


def _cfg(**kw):
    base = dict(d_in=8, width=32, recipe="anthropic", lr=3e-3, lam=0.3, total_steps=3000,
                lam_warmup_steps=100, batch_size=64, steps_per_call=10, progress=False)
    base.update(kw)
    return sae.TrainConfig(**base)


def _first_firing(losses, rule, total):
    """The first window boundary at which the rule fires, recomputed from the losses."""
    for b in range(rule.window, total + 1, rule.window):
        if b - rule.min_steps >= 2 * rule.window and b <= len(losses):
            if np.all(plateau_improvement(losses[:b], rule.window) < rule.tol):
                return b
    return None


def test_train_stops_at_first_plateau_and_does_not_change_training():
    x = _data()
    rule = Plateau(window=50, tol=2e-2, min_steps=100)
    res = sae.train(x, _cfg(), plateau=rule)
    assert res.stop == "plateau"
    assert 200 <= res.steps < 3000 and res.steps % rule.window == 0
    assert res.losses.shape == (res.steps,)
    # it stopped at the FIRST boundary where the windowed improvement fell below tol
    assert _first_firing(res.losses, rule, 3000) == res.steps
    # the rule only stops: the same run capped by max_steps has the same losses and weights
    ref = sae.train(x, _cfg(), max_steps=res.steps)
    assert ref.stop == "max_steps" and ref.steps == res.steps
    np.testing.assert_allclose(ref.losses, res.losses, rtol=1e-6)
    np.testing.assert_allclose(ref.params["W_dec"], res.params["W_dec"], rtol=1e-5, atol=1e-7)
    # the history ends with the stopping step
    assert res.history[-1]["step"] == res.steps


def test_sweep_stops_only_when_every_sae_plateaus():
    x = _data(seed=1)
    rule = Plateau(window=50, tol=2e-2, min_steps=100)
    cfg = _cfg()
    res = sae.train(x, cfg, sweep=sae.sweep(cfg, lam=[0.1, 1.0]), plateau=rule)
    assert res.losses.shape == (res.steps, 2)
    assert res.stop == "plateau"
    assert np.all(plateau_improvement(res.losses, rule.window) < rule.tol)
    for b in range(2 * rule.window + rule.min_steps, res.steps, rule.window):
        # at every earlier boundary at least one SAE was still improving
        assert np.any(plateau_improvement(res.losses[:b], rule.window) >= rule.tol)


def test_no_plateau_runs_to_cap():
    res = sae.train(_data(), _cfg(total_steps=60))
    assert res.stop == "total_steps" and res.steps == 60 and res.losses.shape == (60,)


def test_plateau_bad_arguments():
    x = _data(n=256)
    with pytest.raises(TypeError, match="plateau"):
        sae.train(x, _cfg(total_steps=20), plateau=(50, 1e-2))
    with pytest.raises(ValueError, match="plateau.window"):
        sae.train(x, _cfg(total_steps=20), plateau=Plateau(window=0))
    with pytest.raises(ValueError, match="plateau.tol"):
        sae.train(x, _cfg(total_steps=20), plateau=Plateau(window=10, tol=-1.0))
    with pytest.raises(ValueError, match="steps_per_call"):
        sae.train(x, _cfg(total_steps=20), plateau=Plateau(window=15))


def test_loss_curve_bins():
    from experiments.atoms.pipeline import loss_curve

    c = loss_curve(np.arange(10.0), n_bins=3)  # bins of 4: [0..3], [4..7], [8, 9]
    assert c["step"] == [4, 8, 10]
    np.testing.assert_allclose(c["loss"], [1.5, 5.5, 8.5])
    c2 = loss_curve(np.ones((7, 2)), n_bins=100)
    assert c2["step"] == list(range(1, 8)) and np.shape(c2["loss"]) == (7, 2)
