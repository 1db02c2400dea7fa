"""sae.evals.splice_eval on a tiny random-weight Llama (from_config): perfect reconstruction
recovers all CE (KL 0), a zero SAE equals zero ablation (recovered 0), and CE/KL agree with
a direct per-text computation written here."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_VERBOSITY"] = "error"

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from _cache_worker import make_tiny_model, synthetic_texts  # noqa: E402

from sae.evals import splice_eval, splice_eval_many, whitened_sae  # noqa: E402

H = 32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = make_tiny_model(str(tmp_path_factory.mktemp("tiny_llama")), "llama", n_layers=3)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield (AutoModelForCausalLM.from_pretrained(path).eval(),
           AutoTokenizer.from_pretrained(path), list(synthetic_texts(7, seed=5)))
    torch.set_num_threads(n)


def _params(W_enc, W_dec, b_enc=None, b_dec=None, threshold=None):
    M = W_enc.shape[1]
    return {"W_enc": W_enc.astype(np.float32), "W_dec": W_dec.astype(np.float32),
            "b_enc": np.zeros(M, np.float32) if b_enc is None else b_enc,
            "b_dec": np.zeros(H, np.float32) if b_dec is None else b_dec,
            "threshold": np.full(M, -np.inf, np.float32) if threshold is None else threshold}


def test_identity_sae_recovers_everything(tiny):
    model, tok, texts = tiny
    eye = np.eye(H, dtype=np.float32)
    r = splice_eval(model, tok, texts, 1, _params(eye, eye), batch_size=3, progress=False)
    assert r["ce_zero"] > r["ce_clean"] + 0.1  # zero ablation hurts: the ratio is meaningful
    assert r["ce_spliced"] == pytest.approx(r["ce_clean"], abs=1e-6)
    assert r["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-6)
    assert abs(r["kl_spliced"]) < 1e-7 and r["kl_zero"] > 0.01
    assert r["r2"] == pytest.approx(1.0, abs=1e-6)
    # BOS (position 0) is neither spliced nor counted: one fewer prediction than tokens
    n_tok = sum(len(tok(t)["input_ids"]) for t in texts)
    assert r["n_spliced"] == n_tok - len(texts) and r["n_tokens"] == n_tok - 2 * len(texts)
    # the same SAE as a pair of callables
    r2 = splice_eval(model, tok, texts, 1, (lambda x: x, lambda f: f), batch_size=4,
                     progress=False)
    assert r2["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-6)


def test_zero_sae_equals_zero_ablation(tiny):
    model, tok, texts = tiny
    p = _params(np.eye(H), np.zeros((H, H)))
    r = splice_eval(model, tok, texts, 2, p, batch_size=4, progress=False)
    assert r["ce_spliced"] == pytest.approx(r["ce_zero"], abs=1e-6)
    assert r["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-6)
    assert r["kl_spliced"] == pytest.approx(r["kl_zero"], rel=1e-6)


def test_many_shares_clean_and_zero_passes(tiny):
    model, tok, texts = tiny
    eye = np.eye(H, dtype=np.float32)
    many = splice_eval_many(model, tok, texts, 0, {"id": _params(eye, eye),
                                                   "zero": _params(eye, 0 * eye)},
                            batch_size=4, progress=False)
    one = splice_eval(model, tok, texts, 0, _params(eye, 0 * eye), batch_size=4,
                      progress=False)
    assert many["id"]["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-6)
    assert many["zero"]["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-6)
    for key in ("ce_clean", "ce_zero", "ce_spliced", "kl_spliced", "r2"):
        assert many["zero"][key] == pytest.approx(one[key], rel=1e-6, abs=1e-9)
    with pytest.raises(ValueError, match=r"saes\['bad'\]: W_enc"):
        splice_eval_many(model, tok, texts, 0, {"bad": _params(np.eye(8), np.eye(8))})


def test_matches_direct_computation(tiny):
    """A lossy random TopK SAE; the reference splices per text (no padding) with numpy."""
    from sae.cache import find_blocks

    model, tok, texts = tiny
    rng = np.random.default_rng(0)
    M, k, layer = 64, 6, 1
    W_enc = rng.normal(size=(H, M)).astype(np.float32) / np.sqrt(H)
    W_dec = rng.normal(size=(M, H)).astype(np.float32) / np.sqrt(M)
    b_dec = rng.normal(size=H).astype(np.float32) * 0.1
    p = _params(W_enc, W_dec, b_dec=b_dec)
    r = splice_eval(model, tok, texts, layer, p, k=k, batch_size=3, progress=False)

    def recon(x):  # ReLU(TopK((x − b_dec) W_enc + b_enc)) W_dec + b_dec
        pi = (x - b_dec) @ W_enc
        f = np.zeros_like(pi)
        idx = np.argsort(-pi, axis=1)[:, :k]
        np.put_along_axis(f, idx, np.maximum(np.take_along_axis(pi, idx, 1), 0), 1)
        return (f @ W_dec + b_dec).astype(np.float32)

    block = find_blocks(model, 3)[layer]
    ce = {"clean": [], "spliced": [], "zero": []}
    kls = []
    for t in texts:
        ids = tok(t, return_tensors="pt")["input_ids"]
        keep = ids[0] != tok.bos_token_id
        logp = {}
        for mode in ("clean", "spliced", "zero"):
            def hook(m, a, out, mode=mode):
                h = out[0] if isinstance(out, tuple) else out
                if mode == "clean":
                    return None
                h = h.clone()
                x = h[0, keep].numpy()
                h[0, keep] = torch.from_numpy(recon(x) if mode == "spliced" else 0 * x)
                return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h
            hd = block.register_forward_hook(hook)
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0, :-1].double()
            hd.remove()
            logp[mode] = torch.log_softmax(logits, -1)[keep[:-1]]
            tgt = ids[0, 1:][keep[:-1]]
            ce[mode].append(-logp[mode].gather(1, tgt[:, None]).numpy().ravel())
        pc = logp["clean"].exp()
        kls.append((pc * (logp["clean"] - logp["spliced"])).sum(-1).numpy())
    direct = {m: np.concatenate(v).mean() for m, v in ce.items()}
    assert r["ce_clean"] == pytest.approx(direct["clean"], rel=1e-4)
    assert r["ce_spliced"] == pytest.approx(direct["spliced"], rel=1e-4)
    assert r["ce_zero"] == pytest.approx(direct["zero"], rel=1e-4)
    assert r["kl_spliced"] == pytest.approx(np.concatenate(kls).mean(), rel=1e-3, abs=1e-6)
    rec = (direct["zero"] - direct["spliced"]) / (direct["zero"] - direct["clean"])
    assert r["ce_loss_recovered"] == pytest.approx(rec, rel=1e-3, abs=1e-5)
    assert 0.0 < r["kl_spliced"] and r["ce_clean"] < r["ce_spliced"]  # lossy but not broken


def test_whitened_sae_unwhitens():
    """decode(encode(x)) = (f(x S^{1/2}) W_dec + b_dec) S^{-1/2}; identity SAE → x back."""
    rng = np.random.default_rng(1)
    A = rng.normal(size=(H, H)) / np.sqrt(H) + np.eye(H)
    S_half, S_inv_half = A.astype(np.float32), np.linalg.inv(A).astype(np.float32)
    eye = np.eye(H, dtype=np.float32)
    enc, dec = whitened_sae(_params(eye, eye), (S_half, S_inv_half))
    x = rng.normal(size=(5, H)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(dec(enc(x))), x, atol=1e-4)


def test_bad_input_fails_before_compute(tiny):
    from transformers import LlamaModel

    model, tok, texts = tiny
    eye = np.eye(H, dtype=np.float32)
    p = _params(eye, eye)
    with pytest.raises(ValueError, match=r"layer=3.*\[0, 2\]"):
        splice_eval(model, tok, texts, 3, p, progress=False)
    with pytest.raises(ValueError, match="hidden size H = 32"):
        splice_eval(model, tok, texts, 0, _params(np.eye(16), np.eye(16)), progress=False)
    with pytest.raises(TypeError, match="texts=str"):
        splice_eval(model, tok, "one text", 0, p, progress=False)
    with pytest.raises(ValueError, match="texts=\\[\\]"):
        splice_eval(model, tok, [], 0, p, progress=False)
    with pytest.raises(TypeError, match="sae=int"):
        splice_eval(model, tok, texts, 0, 3, progress=False)
    with pytest.raises(ValueError, match="batch_size=0"):
        splice_eval(model, tok, texts, 0, p, batch_size=0, progress=False)
    with pytest.raises(TypeError, match="no LM head"):
        splice_eval(LlamaModel(model.config), tok, texts, 0, p, progress=False)
