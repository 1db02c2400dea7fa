"""sae.io against the installed SAELens (the PyTorch peer, https://github.com/decoderesearch/SAELens,
pinned by the ``peer`` extra): files written by one library are read by the other's own
loader, and both compute the same codes f(x) and reconstructions x̂ on the same inputs.

(a) ours → SAELens: ``sae.io.save_saelens`` on SAEs trained by ``sae.train`` (JumpReLU with
    input scaling folded in, TopK) and on random params; read by ``SAE.load_from_disk``.
(b) SAELens → ours: SAEs trained a few steps by SAELens's ``SAETrainer`` on random data
    (JumpReLU with ``normalize_activations="expected_average_only_in"``, TopK with
    ``rescale_acts_by_decoder_norm=True``, a mid-training checkpoint whose scale lives in
    ``activation_scaler.json``) and a ReLU "standard" SAE built by ``SAE.from_dict``; written
    by SAELens's ``save_model`` / ``save_inference_model`` / ``save_checkpoint`` and read by
    ``sae.io.load_saelens``.
(c) Gemma Scope ``params.npz`` written by ``sae.io.save_gemmascope``, converted by SAELens's
    own Gemma Scope loader (``gemma_2_sae_huggingface_loader`` through ``SAE.from_pretrained``;
    only ``hf_hub_download`` is replaced by the local file, and d_in / d_sae are overridden
    because a real release file is 2304 × 16k) and read by ``sae.io.load_gemmascope``.

Every comparison is float32 with max |Δ| ≤ 1e-5 on codes and reconstructions, plus an exact
check that the same latents fire.
"""
import copy
import json
import os

import numpy as np
import pytest

pytest.importorskip("sae_lens")

import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402
from sae_lens import SAE  # noqa: E402
from sae_lens.config import SAETrainerConfig  # noqa: E402
from sae_lens.loading import pretrained_sae_loaders as sl_loaders  # noqa: E402
from sae_lens.saes.jumprelu_sae import (  # noqa: E402
    JumpReLUTrainingSAE,
    JumpReLUTrainingSAEConfig,
)
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig  # noqa: E402
from sae_lens.training.sae_trainer import SAETrainer  # noqa: E402

import sae  # noqa: E402
from sae import io  # noqa: E402
from sae.model import decode, encode  # noqa: E402

TOL = 1e-5
D, M = 16, 48


def _x(n=256, seed=0, d=D, scale=3.0):
    r = np.random.default_rng(seed)
    return (scale * r.normal(size=(n, d)) + 0.5).astype(np.float32)


def _ours(params, x, cfg):
    """Codes and reconstruction of sae.model on a params dict, as numpy."""
    p = {k: jnp.asarray(v) for k, v in params.items()}
    f = encode(p, jnp.asarray(x), apply_b_dec_to_input=cfg["apply_b_dec_to_input"],
               k=cfg.get("k"))
    return np.asarray(f), np.asarray(decode(p, f))


def _theirs(model, x):
    with torch.no_grad():
        f = model.encode(torch.from_numpy(x))
        f = f.to_dense() if f.is_sparse else f
        return f.numpy(), model.decode(f).numpy()


def _assert_same(a, b, what):
    (fa, xa), (fb, xb) = a, b
    assert fa.shape == fb.shape and xa.shape == xb.shape, what
    np.testing.assert_array_equal(fa > 0, fb > 0, err_msg=f"{what}: different latents fire")
    assert (fa > 0).sum(-1).mean() >= 1.0, f"{what}: nothing fires, the check is vacuous"
    df, dx = np.abs(fa - fb).max(), np.abs(xa - xb).max()
    assert df <= TOL and dx <= TOL, f"{what}: max|Δf|={df:.2e} max|Δx̂|={dx:.2e} > {TOL}"


def _random_params(seed, d=D, m=M, dtype=np.float32):
    r = np.random.default_rng(seed)
    return {"W_enc": (r.normal(size=(d, m)) / np.sqrt(d)).astype(dtype),
            "W_dec": (r.normal(size=(m, d)) / np.sqrt(d)).astype(dtype),
            "b_enc": (0.1 * r.normal(size=m)).astype(dtype),
            "b_dec": (0.3 * r.normal(size=d)).astype(dtype),
            "threshold": r.uniform(0.2, 1.0, size=m).astype(dtype)}


@pytest.fixture(scope="module")
def trained_ours():
    """A JumpReLU and a TopK SAE from sae.train (input scaling E‖x‖ = √d folded into the
    returned weights, so the files must carry it)."""
    x = _x(4096, seed=1)
    out = {}
    for arch in ("jumprelu", "topk"):
        cfg = sae.TrainConfig(d_in=D, width=M, arch=arch, k=5, lr=3e-3, eps=0.05,
                              theta_init=0.05, lam=0.05, total_steps=40, batch_size=128,
                              lam_warmup_steps=10, lr_warmup_steps=5,
                              input_scaling="sqrt_d", progress=False, log_every=40)
        res = sae.train(x, cfg)
        assert res.scale != 1.0
        out[arch] = (res, cfg)
    return out


# ------------------------------------------------------------------ (a) ours → SAELens
@pytest.mark.parametrize("arch", ["jumprelu", "topk"])
def test_trained_ours_loads_in_saelens(tmp_path, trained_ours, arch):
    res, tcfg = trained_ours[arch]
    folder = str(tmp_path / arch)
    io.save_saelens(folder, res.params, architecture=arch,
                    k=tcfg.k if arch == "topk" else None)
    theirs = SAE.load_from_disk(folder)
    assert theirs.cfg.architecture() == arch and theirs.cfg.dtype == "float32"
    assert theirs.cfg.normalize_activations == "none" and theirs.cfg.apply_b_dec_to_input
    if arch == "topk":
        assert theirs.cfg.k == tcfg.k and not theirs.cfg.rescale_acts_by_decoder_norm
    x = _x(512, seed=7)
    cfg = {"apply_b_dec_to_input": True, "k": tcfg.k if arch == "topk" else None}
    ours = _ours(res.params, x, cfg)
    np.testing.assert_allclose(ours[0], res.encode(x), atol=TOL)  # the result's own encode
    _assert_same(ours, _theirs(theirs, x), f"sae.train {arch} → SAELens")


@pytest.mark.parametrize("apply_b_dec", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_random_jumprelu_loads_in_saelens(tmp_path, apply_b_dec, dtype):
    p = _random_params(3, dtype=dtype)
    folder = str(tmp_path / "j")
    io.save_saelens(folder, p, apply_b_dec_to_input=apply_b_dec,
                    extra_cfg={"hook_name": "blocks.3.hook_resid_post"})
    theirs = SAE.load_from_disk(folder)
    assert theirs.cfg.dtype == np.dtype(dtype).name and theirs.W_enc.dtype == getattr(
        torch, np.dtype(dtype).name)
    assert theirs.cfg.apply_b_dec_to_input is apply_b_dec
    x = _x(256, seed=4).astype(dtype)
    ours = _ours(p, x, {"apply_b_dec_to_input": apply_b_dec})
    _assert_same(ours, _theirs(theirs, x), f"random jumprelu {dtype.__name__}")
    # and back: our reader returns exactly what was written
    q, cfg = io.load_saelens(folder)
    for name in io.KEYS:
        np.testing.assert_array_equal(q[name], p[name])
    assert cfg["hook_name"] == "blocks.3.hook_resid_post"


def test_save_saelens_rejects_bad_arguments(tmp_path):
    p = _random_params(0)
    with pytest.raises(ValueError, match="k=None"):
        io.save_saelens(str(tmp_path / "a"), p, architecture="topk")
    with pytest.raises(ValueError, match="k=49"):
        io.save_saelens(str(tmp_path / "a"), p, architecture="topk", k=M + 1)
    with pytest.raises(ValueError, match="architecture='gated'"):
        io.save_saelens(str(tmp_path / "a"), p, architecture="gated")
    with pytest.raises(ValueError, match="int32"):
        io.save_saelens(str(tmp_path / "a"), {k: v.astype(np.int32) for k, v in p.items()})
    assert not os.path.exists(tmp_path / "a")


# ------------------------------------------------------------------ (b) SAELens → ours
def _sl_trainer(sae_model, x, steps=25, batch=64, lr=3e-3):
    """SAELens's own trainer on an iterator of (batch, d) tensors (cycling over x)."""
    xt = torch.from_numpy(x)

    def provider():
        while True:
            for i in range(0, len(xt) - batch + 1, batch):
                yield xt[i:i + batch]

    tcfg = SAETrainerConfig(total_training_samples=steps * batch, train_batch_size_samples=batch,
                            lr=lr, lr_end=lr, adam_beta1=0.0, adam_beta2=0.999,
                            n_batches_for_norm_estimate=4, dead_feature_window=10)
    return SAETrainer(tcfg, sae_model, provider())


@pytest.fixture(scope="module")
def trained_saelens():
    torch.manual_seed(0)
    x = _x(2048, seed=11)
    jr = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(
        d_in=D, d_sae=M, jumprelu_init_threshold=0.05, jumprelu_bandwidth=0.05,
        l0_coefficient=0.05, l0_warm_up_steps=5, decoder_init_norm=1.0,
        normalize_activations="expected_average_only_in"))
    tr = _sl_trainer(jr, x)
    tr.fit()
    assert jr.cfg.normalize_activations == "none"  # SAETrainer folded the scale at the end
    tk = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D, d_sae=M, k=5, decoder_init_norm=0.1))
    assert tk.cfg.rescale_acts_by_decoder_norm
    _sl_trainer(tk, x).fit()
    return {"jumprelu": jr, "topk": tk}


@pytest.mark.parametrize("arch", ["jumprelu", "topk"])
@pytest.mark.parametrize("writer", ["save_model", "save_inference_model"])
def test_saelens_trained_loads_in_ours(tmp_path, trained_saelens, arch, writer):
    model = trained_saelens[arch]
    folder = str(tmp_path / f"{arch}_{writer}")
    getattr(model, writer)(folder)
    params, cfg = io.load_saelens(folder)
    assert cfg["architecture"] == arch and cfg["normalize_activations"] == "none"
    if arch == "topk":
        assert cfg["k"] == 5
        # decoder rows are not unit norm after training: the fold is not a no-op
        assert np.abs(np.linalg.norm(model.W_dec.detach().numpy(), axis=1) - 1).max() > 1e-2
    x = _x(512, seed=12)
    ours = _ours(params, x, cfg)
    model.eval()
    _assert_same(ours, _theirs(model, x), f"SAELens {arch} via {writer} → ours")
    _assert_same(ours, _theirs(SAE.load_from_disk(folder), x),
                 f"SAELens load_from_disk({arch}, {writer}) vs ours")


def test_saelens_checkpoint_with_activation_scaler(tmp_path):
    """A mid-training SAELens checkpoint stores weights for scaled inputs plus
    activation_scaler.json; load_saelens folds the scale as SAELens's
    fold_activation_norm_scaling_factor does."""
    torch.manual_seed(1)
    x = _x(1024, seed=13, scale=5.0)
    model = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(
        d_in=D, d_sae=M, jumprelu_init_threshold=0.05, l0_coefficient=0.05,
        decoder_init_norm=1.0, normalize_activations="expected_average_only_in"))
    tr = _sl_trainer(model, x)
    tr.activation_scaler.estimate_scaling_factor(D, tr.data_provider, 4)
    for _ in range(10):
        tr.step(next(tr.data_provider))
    tr.save_checkpoint("ckpt", base_path=str(tmp_path))
    folder = str(tmp_path / "ckpt")
    c = tr.activation_scaler.scaling_factor
    with open(os.path.join(folder, "activation_scaler.json")) as fh:
        assert json.load(fh)["scaling_factor"] == pytest.approx(c)
    assert abs(c - 1.0) > 0.1
    params, cfg = io.load_saelens(folder)
    assert cfg["folded_scaling_factor"] == pytest.approx(c)
    folded = copy.deepcopy(model)
    folded.fold_activation_norm_scaling_factor(c)
    folded.eval()
    _assert_same(_ours(params, x, cfg), _theirs(folded, x), "checkpoint + scaler → ours")
    # the scale cannot be guessed: without the scaler file the loader refuses
    os.remove(os.path.join(folder, "activation_scaler.json"))
    with pytest.raises(ValueError, match="expected_average_only_in"):
        io.load_saelens(folder)
    params2, _ = io.load_saelens(folder, scaling_factor=c)
    for name in io.KEYS:
        np.testing.assert_array_equal(params2[name], params[name])


def test_saelens_standard_and_unsupported(tmp_path):
    torch.manual_seed(2)
    std = SAE.from_dict({"architecture": "standard", "d_in": D, "d_sae": M})
    with torch.no_grad():
        std.b_enc.normal_(0, 0.5)
        std.b_dec.normal_(0, 0.5)
    std.save_model(str(tmp_path / "std"))
    params, cfg = io.load_saelens(str(tmp_path / "std"))
    assert cfg["architecture"] == "standard" and not params["threshold"].any()
    x = _x(256, seed=5)
    _assert_same(_ours(params, x, cfg), _theirs(std, x), "standard (ReLU) → ours")

    ln = SAE.from_dict({"architecture": "jumprelu", "d_in": D, "d_sae": M,
                        "normalize_activations": "layer_norm"})
    ln.save_model(str(tmp_path / "ln"))
    with pytest.raises(ValueError, match="normalize_activations='layer_norm'"):
        io.load_saelens(str(tmp_path / "ln"))
    gated = SAE.from_dict({"architecture": "gated", "d_in": D, "d_sae": M})
    gated.save_model(str(tmp_path / "gated"))
    with pytest.raises(ValueError, match="architecture='gated'"):
        io.load_saelens(str(tmp_path / "gated"))


def test_negative_threshold_reads_as_saelens_does(tmp_path):
    """SAELens's JumpReLU is ReLU(π)·1[π > θ]; sae.model's is π·1[π > θ]. They agree for
    θ ≥ 0, and load_saelens clamps θ at 0 so that a file with θ < 0 reads as SAELens reads it."""
    p = _random_params(6)
    p["threshold"][:10] = -0.5
    folder = str(tmp_path / "neg")
    io.save_saelens(folder, p)
    params, cfg = io.load_saelens(folder)
    assert (params["threshold"] >= 0).all()
    x = _x(256, seed=8)
    _assert_same(_ours(params, x, cfg), _theirs(SAE.load_from_disk(folder), x), "θ < 0")


# ------------------------------------------------------------------ (c) Gemma Scope npz
@pytest.mark.parametrize("convention", [True, False])
def test_gemmascope_npz_through_saelens_converter(tmp_path, monkeypatch, trained_ours,
                                                  convention):
    if convention:  # sae.train's params (b_dec subtracted from the input) are folded
        p = trained_ours["jumprelu"][0].params
    else:  # params already in the Gemma Scope convention are written unchanged
        p = _random_params(9)
    release, sae_id = "gemma-scope-2b-pt-res", "layer_3/width_16k/average_l0_14"
    folder = tmp_path / sae_id
    folder.mkdir(parents=True)
    path = str(folder / "params.npz")
    io.save_gemmascope(path, p, apply_b_dec_to_input=convention)

    def fake_download(repo_id, filename, subfolder=None, force_download=False):
        assert (repo_id, filename, subfolder) == ("google/gemma-scope-2b-pt-res",
                                                  "params.npz", sae_id)
        return path

    monkeypatch.setattr(sl_loaders, "hf_hub_download", fake_download)
    gemma2 = sl_loaders.NAMED_PRETRAINED_SAE_LOADERS["gemma_2"]

    def converter(**kw):  # SAELens's converter; only the release's shapes are overridden
        return gemma2(**{**kw, "cfg_overrides": {**kw["cfg_overrides"], "d_in": D,
                                                 "d_sae": M}})

    theirs = SAE.from_pretrained(release, sae_id, converter=converter)
    assert theirs.cfg.architecture() == "jumprelu" and not theirs.cfg.apply_b_dec_to_input
    x = _x(512, seed=10)
    raw = io.load_gemmascope(path)  # the file as stored: Gemma Scope convention
    _assert_same(_ours(raw, x, {"apply_b_dec_to_input": False}), _theirs(theirs, x),
                 "gemma scope npz, raw")
    ours = io.load_gemmascope(path, apply_b_dec_to_input=True)
    _assert_same(_ours(ours, x, {"apply_b_dec_to_input": True}), _theirs(theirs, x),
                 "gemma scope npz, folded back")
    if convention:  # and the original params of sae.train compute the same thing
        _assert_same(_ours(p, x, {"apply_b_dec_to_input": True}), _theirs(theirs, x),
                     "sae.train params vs SAELens gemma scope loader")
