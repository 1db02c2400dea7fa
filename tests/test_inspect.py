"""sae.inspect end to end on a tiny cache (random-weight Llama saved with save_pretrained,
a handful of texts): the top activations are the true top codes of each latent, sorted,
with correct context windows and code values; the HTML lists the latents; the CLI's
argument checks; the token-id fallback; core_metrics reads an ActivationStore."""
import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_VERBOSITY"] = "error"

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from _cache_worker import make_tiny_model, synthetic_texts  # noqa: E402

from sae import inspect as si  # noqa: E402
from sae import io  # noqa: E402
from sae.store import ActivationStore  # noqa: E402

H, M, LAYER = 32, 24, 1


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from sae.cache import cache_activations

    root = tmp_path_factory.mktemp("inspect")
    model_dir = make_tiny_model(str(root / "model"), "llama", n_layers=2, seed=1)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cache_activations(model_dir, list(synthetic_texts(12, seed=2)), str(root / "cache"),
                          layers=[LAYER], context_length=24, batch_size=4,
                          tokens_per_shard=60, progress=False)
    finally:
        torch.set_num_threads(n)
    rng = np.random.default_rng(0)
    p = {"W_enc": (rng.normal(size=(H, M)) / 4).astype(np.float32),
         "W_dec": rng.normal(size=(M, H)).astype(np.float32),
         "b_enc": np.zeros(M, np.float32), "b_dec": np.zeros(H, np.float32),
         "threshold": np.linspace(0.0, 6.0, M).astype(np.float32)}
    p["threshold"][-2:] = 1e9  # two latents that never fire
    io.save_saelens(str(root / "sae"), p)
    store = ActivationStore(str(root / "cache"), LAYER, batch_size=1, as_numpy=True)
    x = np.concatenate([np.asarray(store.activations(s)) for s in range(store.n_shards)])
    tok = {k: np.concatenate([np.asarray(store.tokens(s)[k]) for s in range(store.n_shards)])
           for k in ("token_ids", "positions", "text_index")}
    pi = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    f = pi * (pi > p["threshold"])
    return root, p, store, x, tok, f


def test_cli_end_to_end(setup, capsys):
    root, p, store, x, tok, f = setup
    assert store.n_shards >= 2
    out = root / "out"
    assert si.main(["--sae", str(root / "sae"), "--cache", str(root / "cache"), "--layer",
                    str(LAYER), "--out", str(out), "--top-k", "5", "--context", "3",
                    "--n-latents", "6", "--quiet"]) == 0
    assert "latents shown: 6" in capsys.readouterr().out
    doc = json.loads((out / "top_activations.json").read_text())
    dens = (f != 0).mean(0)
    np.testing.assert_allclose(np.load(out / "latent_density.npy"), dens)
    assert doc["n_tokens"] == len(x) and doc["n_latents"] == M
    assert doc["n_dead"] == int((dens == 0).sum()) == 2
    # the 6 most frequent latents, most frequent first
    shown = [d["latent"] for d in doc["latents"]]
    assert [dens[i] for i in shown] == sorted(dens, reverse=True)[:6]
    assert doc["tokenizer"] is not None
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(str(root / "model"))
    for d in doc["latents"]:
        lat = d["latent"]
        vals = [e["value"] for e in d["top"]]
        assert vals == sorted(vals, reverse=True)
        top_true = np.sort(f[:, lat][f[:, lat] != 0])[::-1][:5]
        np.testing.assert_allclose(vals, top_true, rtol=1e-5)
        for e in d["top"]:
            g = e["row"]
            assert e["value"] == pytest.approx(f[g, lat], rel=1e-5)
            assert e["token_id"] == tok["token_ids"][g]
            assert (e["text_index"], e["position"]) == (tok["text_index"][g],
                                                        tok["positions"][g])
            c = e["context"]
            rows = [r for r in range(g - 3, g + 4)
                    if 0 <= r < len(x) and tok["text_index"][r] == e["text_index"]]
            shard_start = g - e["shard_row"]
            assert [r + shard_start for r in c["rows"]] == rows
            assert c["token_ids"] == tok["token_ids"][rows].tolist()
            assert c["positions"] == tok["positions"][rows].tolist()
            np.testing.assert_allclose(c["values"], f[rows, lat], rtol=1e-5, atol=1e-6)
            assert rows[c["center"]] == g
            assert c["tokens"] == [hf_tok.decode([i]) for i in c["token_ids"]]
    page = (out / "latents.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "http" not in page  # no network
    for lat in shown:
        assert f'id="latent-{lat}"' in page
    assert (out / "density_histogram.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [n for n in os.listdir(out) if ".tmp-" in n]


def test_chosen_latents_and_token_fallback(setup, monkeypatch):
    root, p, store, x, tok, f = setup
    monkeypatch.setattr(si, "_tokenizer", lambda manifest: None)
    dead = int(np.flatnonzero((f != 0).sum(0) == 0)[0])
    doc = si.inspect_latents(p, store, None, root / "out2", latents=[0, dead], top_k=3,
                             context=0, progress=False)
    assert [d["latent"] for d in doc["latents"]] == [0, dead]
    assert doc["latents"][1]["top"] == [] and doc["tokenizer"] is None
    e = doc["latents"][0]["top"][0]
    assert e["token"] == f"#{e['token_id']}" and e["context"]["rows"] == [e["shard_row"]]
    with pytest.raises(ValueError, match=r"latents=\[0, 99\]"):
        si.inspect_latents(p, store, None, root / "out3", latents=[0, 99], progress=False)
    with pytest.raises(ValueError, match="top_k=0"):
        si.inspect_latents(p, store, None, root / "out3", top_k=0, progress=False)


def test_cli_arguments(setup, capsys):
    with pytest.raises(SystemExit) as e:
        si.main(["--help"])
    assert e.value.code == 0 and "--top-k" in capsys.readouterr().out
    root = setup[0]
    base = ["--sae", str(root / "sae"), "--cache", str(root / "cache"), "--out", "o"]
    for bad in (["--bogus"], ["--top-k", "0"], ["--context", "-1"], ["--latents", "a,b"]):
        with pytest.raises(SystemExit) as e:
            si.main(base + bad)
        assert e.value.code == 2, bad
    with pytest.raises(FileNotFoundError, match="sae="):
        si.main(["--sae", str(root / "nope"), "--cache", str(root / "cache"), "--out", "o"])


def test_core_metrics_reads_a_store(setup):
    from sae.evals import core_metrics

    _, p, store, x, _, _ = setup
    a = core_metrics(p, x, progress=False, weight_metrics=False)
    b = core_metrics(p, store, rows_per_batch=17, progress=False, weight_metrics=False)
    for cat in ("sparsity", "reconstruction_quality", "shrinkage", "misc_metrics"):
        for name, v in a[cat].items():
            assert b[cat][name] == pytest.approx(v, rel=1e-6, abs=1e-9), (cat, name)
    c = core_metrics(p, store, max_tokens=50, progress=False, weight_metrics=False)
    assert c["token_stats"]["total_tokens_eval_sparsity_variance"] == 50
