"""sae.evals.encoder_splice_eval (tiny random BERT) and sae.evals.core_metrics (tiny random
Llama / GPT-2): identity and zero SAEs give the exact end points, the encoder scores equal
a direct computation written here, the activation metrics equal numpy formulas, and on a
tiny GPT-2 the numbers equal those of SAELens's own evaluator (``sae_lens.evals``) run on
the same weights converted to a TransformerLens ``HookedTransformer``."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_VERBOSITY"] = "error"

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from _cache_worker import WORDS, make_tiny_model, make_tokenizer, synthetic_texts  # noqa: E402

from sae.evals import CORE_CATEGORIES, core_metrics, encoder_splice_eval  # noqa: E402

H = 32


def _params(W_enc, W_dec, threshold=None, b_enc=None, b_dec=None):
    M = W_enc.shape[1]
    return {"W_enc": np.asarray(W_enc, np.float32), "W_dec": np.asarray(W_dec, np.float32),
            "b_enc": np.zeros(M, np.float32) if b_enc is None else b_enc,
            "b_dec": np.zeros(W_enc.shape[0], np.float32) if b_dec is None else b_dec,
            "threshold": np.full(M, -np.inf, np.float32) if threshold is None else threshold}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------ encoder
@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    from transformers import BertConfig, BertModel

    tok = make_tokenizer(str(tmp_path_factory.mktemp("bert_tok")), "bos")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=H, num_hidden_layers=3,
                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                     pad_token_id=tok.pad_token_id)
    return BertModel(cfg).eval(), tok, list(synthetic_texts(5, seed=3))


def _direct_encoder_scores(model, tok, texts, layer, sae_fn):
    """Per text, unpadded: a hook that applies sae_fn to the non-special rows of block
    ``layer``; cosine of mean-pooled last hidden states and relative Frobenius change."""
    cos, rel = [], []
    block = model.encoder.layer[layer]
    for t in texts:
        enc = tok(t, return_tensors="pt")
        keep = enc["input_ids"][0] != tok.bos_token_id
        with torch.no_grad():
            h0 = model(**enc).last_hidden_state[0]

            def hook(mod, args, out):
                h = (out[0] if isinstance(out, tuple) else out).clone()
                h[0, keep] = torch.from_numpy(sae_fn(h[0, keep].numpy()))
                return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h

            handle = block.register_forward_hook(hook)
            try:
                h1 = model(**enc).last_hidden_state[0]
            finally:
                handle.remove()
        cos.append(float(torch.nn.functional.cosine_similarity(h0.mean(0), h1.mean(0),
                                                               dim=0)))
        rel.append(float((h1 - h0).norm() / h0.norm()))
    return np.mean(cos), np.mean(rel)


def test_encoder_identity_and_direct(bert):
    model, tok, texts = bert
    eye = np.eye(H, dtype=np.float32)
    r = encoder_splice_eval(model, tok, texts, 1, _params(eye, eye), batch_size=2,
                            progress=False)
    assert r["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert r["rel_change"] < 1e-6 and r["rel_change_all"] < 1e-6
    assert r["r2"] == pytest.approx(1.0, abs=1e-6)
    assert r["rel_change_zero"] > 0.05 and r["cosine_zero"] < 0.999  # ablation moves it
    n_kept = sum(len(tok(t)["input_ids"]) - 1 for t in texts)  # minus <bos>
    assert r["n_spliced"] == n_kept and r["n_texts"] == len(texts)
    # a lossy SAE (keep half the dimensions), padded batches vs a direct per-text loop
    half = _params(eye[:, :16], eye[:16])
    r = encoder_splice_eval(model, tok, texts, 2, half, batch_size=3, progress=False)
    cos, rel = _direct_encoder_scores(model, tok, texts, 2, lambda x: x * (np.arange(H) < 16))
    assert r["cosine"] == pytest.approx(cos, abs=1e-5)
    assert r["rel_change"] == pytest.approx(rel, rel=1e-4)
    assert 0 < r["rel_change"] and r["cosine"] < 1


def test_encoder_bad_input(bert):
    model, tok, texts = bert
    eye = np.eye(H, dtype=np.float32)
    with pytest.raises(ValueError, match=r"layer=3"):
        encoder_splice_eval(model, tok, texts, 3, _params(eye, eye), progress=False)
    with pytest.raises(TypeError, match="texts"):
        encoder_splice_eval(model, tok, "one text", 0, _params(eye, eye), progress=False)
    with pytest.raises(ValueError, match="W_enc"):
        encoder_splice_eval(model, tok, texts, 0, _params(np.eye(8), np.eye(8)),
                            progress=False)


# ------------------------------------------------------------------------------ core
@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = make_tiny_model(str(tmp_path_factory.mktemp("tiny_llama")), "llama", n_layers=3)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    texts = list(synthetic_texts(6, seed=7))
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(300, H)) * 2 + 0.3).astype(np.float32)
    return model, tok, texts, x


def test_core_perfect_and_zero(llama):
    model, tok, texts, x = llama
    eye = np.eye(H, dtype=np.float32)
    r = core_metrics(_params(eye, eye), x, model=model, tokenizer=tok, layer=1, texts=texts,
                     batch_size=3, progress=False)
    assert set(CORE_CATEGORIES) | {"feature_metrics"} == set(r)
    for cat, names in CORE_CATEGORIES.items():
        assert set(names) == set(r[cat]), cat
    pp, bp = r["model_performance_preservation"], r["model_behavior_preservation"]
    assert pp["ce_loss_score"] == pytest.approx(1.0, abs=1e-6)
    assert pp["ce_loss_with_sae"] == pytest.approx(pp["ce_loss_without_sae"], abs=1e-6)
    assert abs(bp["kl_div_with_sae"]) < 1e-7 and bp["kl_div_score"] == pytest.approx(1.0)
    rq, sh = r["reconstruction_quality"], r["shrinkage"]
    assert rq["explained_variance"] == pytest.approx(1.0, abs=1e-6) and rq["mse"] < 1e-10
    assert rq["cossim"] == pytest.approx(1.0, abs=1e-6)
    assert sh["l2_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert sh["relative_reconstruction_bias"] == pytest.approx(1.0, abs=1e-6)
    assert r["token_stats"]["total_tokens_eval_sparsity_variance"] == len(x)
    assert r["token_stats"]["total_tokens_eval_reconstruction"] > 0
    zero = core_metrics(_params(eye, 0 * eye), x, model=model, tokenizer=tok, layer=2,
                        texts=texts, batch_size=4, weight_metrics=False, progress=False)
    assert zero["model_performance_preservation"]["ce_loss_score"] == pytest.approx(0, abs=1e-6)
    assert zero["model_behavior_preservation"]["kl_div_score"] == pytest.approx(0, abs=1e-6)
    assert "average_max_encoder_cosine_sim" not in zero["misc_metrics"]


def test_core_activation_metrics_by_hand(llama):
    _, _, _, x = llama
    rng = np.random.default_rng(1)
    M = 48
    p = _params(rng.normal(size=(H, M)) / 4, rng.normal(size=(M, H)) / 4,
                threshold=np.linspace(0.0, 15.0, M).astype(np.float32),
                b_dec=rng.normal(size=H).astype(np.float32))
    r = core_metrics(p, x, rows_per_batch=64, progress=False)  # 5 uneven chunks
    pi = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    f = pi * (pi > p["threshold"])
    xh = f @ p["W_dec"] + p["b_dec"]
    dens = (f != 0).mean(0)
    assert np.array_equal(r["feature_metrics"]["feature_density"], dens)
    assert r["sparsity"]["l0"] == pytest.approx((f != 0).sum(1).mean(), rel=1e-6)
    assert r["sparsity"]["l1"] == pytest.approx(np.abs(f).sum(1).mean(), rel=1e-4)
    err = ((x - xh) ** 2).sum(1)
    ev = 1 - err.mean() / ((x - x.mean(0)) ** 2).sum(1).mean()
    assert r["reconstruction_quality"]["explained_variance"] == pytest.approx(ev, rel=1e-4)
    assert r["reconstruction_quality"]["mse"] == pytest.approx(err.mean(), rel=1e-4)
    nx, nh = np.linalg.norm(x, axis=1), np.linalg.norm(xh, axis=1)
    assert r["shrinkage"]["l2_ratio"] == pytest.approx((nh / nx).mean(), rel=1e-4)
    assert r["reconstruction_quality"]["cossim"] == pytest.approx(
        ((x * xh).sum(1) / nx / nh).mean(), rel=1e-4)
    mm = r["misc_metrics"]
    assert mm["frac_alive"] == pytest.approx((dens > 0).mean())
    assert 0 < mm["frac_alive"] < 1  # the high thresholds kill some latents
    assert mm["normalized_freq_over_10_percent"] == pytest.approx(
        dens[dens > 0.1].sum() / dens.sum())
    wn = p["W_dec"] / np.linalg.norm(p["W_dec"], axis=1, keepdims=True)
    c = wn @ wn.T - 3 * np.eye(M)
    assert mm["average_max_decoder_cosine_sim"] == pytest.approx(c.max(1).mean(), rel=1e-5)
    # the same SAE as (encode, decode) callables; TopK via k
    r2 = core_metrics((lambda a: np.maximum(a, 0), lambda a: a), x, progress=False)
    assert r2["sparsity"]["l0"] == pytest.approx((x > 0).sum(1).mean())
    rk = core_metrics(p, x, k=3, progress=False)
    assert rk["sparsity"]["l0"] == pytest.approx(3.0)


def test_core_bad_input(llama):
    model, tok, texts, x = llama
    eye = np.eye(H, dtype=np.float32)
    with pytest.raises(ValueError, match=r"activations: shape \(32,\)"):
        core_metrics(_params(eye, eye), x[0], progress=False)
    with pytest.raises(ValueError, match=r"\['tokenizer', 'texts'\] missing"):
        core_metrics(_params(eye, eye), x, model=model, layer=0, progress=False)
    with pytest.raises(ValueError, match="layer=9"):
        core_metrics(_params(eye, eye), x, model=model, tokenizer=tok, layer=9, texts=texts,
                     progress=False)
    with pytest.raises(ValueError, match="rows_per_batch=0"):
        core_metrics(_params(eye, eye), x, rows_per_batch=0, progress=False)
    with pytest.raises(TypeError, match="sae=str"):
        core_metrics("sae", x, progress=False)


# ------------------------------------------------------------------------------ vs SAELens
def test_core_matches_saelens_evaluator(tmp_path):
    """SAELens's run_evals (CE, L0/L1, EV, MSE, cossim, l2 norms, densities) and
    get_recons_loss (KL) on a HookedTransformer holding the same tiny GPT-2 weights, with a
    JumpReLU SAE saved by sae.io.save_saelens and read back by both libraries."""
    pytest.importorskip("sae_lens")
    pytest.importorskip("transformer_lens")
    from sae_lens import SAE
    from sae_lens.evals import EvalConfig, get_recons_loss, run_evals
    from sae_lens.training.activation_scaler import ActivationScaler
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sae import io

    path = make_tiny_model(str(tmp_path / "gpt2"), "gpt2", n_layers=3, seed=2)
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    cfg = HookedTransformerConfig(n_layers=3, d_model=H, n_ctx=128, d_head=8, n_heads=4,
                                  d_mlp=4 * H, d_vocab=len(tok), act_fn="gelu_new",
                                  normalization_type="LN", default_prepend_bos=False)
    ht = HookedTransformer(cfg)
    ht.load_state_dict(convert_gpt2_weights(hf, cfg), strict=False)
    ht.eval()
    rng = np.random.default_rng(4)
    T, B, layer, M = 12, 4, 1, 64
    texts = [" ".join(rng.choice(WORDS, T)) for _ in range(B)]  # one word = one token
    tokens = tok(texts, return_tensors="pt")["input_ids"]
    assert tokens.shape == (B, T)
    hook = f"blocks.{layer}.hook_resid_post"
    p = _params(rng.normal(size=(H, M)) / 3, rng.normal(size=(M, H)) / 3,
                threshold=rng.uniform(0, 1.5, M).astype(np.float32),
                b_dec=rng.normal(size=H).astype(np.float32) * 0.1)
    io.save_saelens(str(tmp_path / "sae"), p, extra_cfg={"metadata": {
        "sae_lens_version": "6.0.0", "sae_lens_training_version": None, "hook_name": hook}})
    sl_sae = SAE.load_from_disk(str(tmp_path / "sae"))
    params, scfg = io.load_saelens(str(tmp_path / "sae"))

    class Store:  # what run_evals reads from an ActivationsStore
        context_size, store_batch_size_prompts = T, B

        def get_batch_tokens(self, n):
            return tokens

        def reset_input_dataset(self):
            pass

    ec = EvalConfig(batch_size_prompts=B, n_eval_reconstruction_batches=1, compute_kl=True,
                    compute_ce_loss=True, n_eval_sparsity_variance_batches=1,
                    compute_l2_norms=True, compute_sparsity_metrics=True,
                    compute_variance_metrics=True, compute_featurewise_density_statistics=True)
    theirs, feat = run_evals(sl_sae, Store(), ht, ActivationScaler(), ec,
                             exclude_special_tokens=False)
    with torch.no_grad():
        x = hf(tokens, output_hidden_states=True).hidden_states[layer + 1].reshape(-1, H)
        kl = get_recons_loss(sl_sae, ht, ActivationScaler(), tokens, compute_kl=True,
                             compute_ce_loss=False)
    ours = core_metrics(params, x.numpy(), model=hf, tokenizer=tok, layer=layer, texts=texts,
                        apply_b_dec_to_input=scfg["apply_b_dec_to_input"], batch_size=B,
                        exclude_special=False, progress=False)
    # also the SAELens module itself as the SAE: same activation metrics
    ours_torch = core_metrics(sl_sae, x.numpy(), progress=False)
    for cat, vals in theirs.items():
        if cat in ("token_stats", "model_behavior_preservation"):  # KL: below
            continue
        for name, v in vals.items():
            if name == "explained_variance_legacy":
                continue
            assert ours[cat][name] == pytest.approx(v, rel=1e-4, abs=1e-4), (cat, name)
            if cat in ("sparsity", "reconstruction_quality", "shrinkage"):
                assert ours_torch[cat][name] == pytest.approx(v, rel=1e-4, abs=1e-4), (cat, name)
    assert ours["model_performance_preservation"]["ce_loss_score"] < 0.999  # not trivial
    np.testing.assert_allclose(ours["feature_metrics"]["feature_density"],
                               feat["feature_density"], atol=1e-6)
    # KL: SAELens averages over all T positions; ours over the T - 1 that have a target
    kl_sae, kl_abl = (float(kl[key][:, :-1].mean())
                      for key in ("kl_div_with_sae", "kl_div_with_ablation"))
    bp = ours["model_behavior_preservation"]
    assert bp["kl_div_with_sae"] == pytest.approx(kl_sae, abs=1e-4)
    assert bp["kl_div_with_ablation"] == pytest.approx(kl_abl, abs=1e-4)
    assert bp["kl_div_score"] == pytest.approx((kl_abl - kl_sae) / kl_abl, abs=1e-4)
