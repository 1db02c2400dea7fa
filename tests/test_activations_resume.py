"""A caching process killed with SIGKILL mid-run, then resumed, gives the same cache as an
uninterrupted run: same tokens, same order, same checksums."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

os.environ["HF_HUB_OFFLINE"] = "1"
from _cache_worker import make_tiny_model, run_cache

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("_cache_worker.py")
N_TEXTS = 120


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
               OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _run_worker(model, out, sleep):
    return subprocess.Popen([sys.executable, str(WORKER), model, str(out), str(N_TEXTS),
                             str(sleep)], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _committed_shards(out):
    try:
        return len(json.loads((out / "manifest.json").read_text())["shards"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def _shard_view(manifest):
    """What must be identical: every shard's texts, token counts and file checksums."""
    return [{k: s[k] for k in ("index", "n_tokens", "n_texts", "first_text", "text_chain",
                               "files")} for s in manifest["shards"]]


def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    model = make_tiny_model(str(tmp_path / "gpt2"), "gpt2")
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"

    victim = _run_worker(model, cut_dir, 0.01)
    a = run_cache(model, str(ref_dir), N_TEXTS)  # uninterrupted, here, while it starts up
    deadline = time.monotonic() + 90
    while _committed_shards(cut_dir) < 3:
        assert victim.poll() is None, f"worker ended early: {victim.communicate()}"
        assert time.monotonic() < deadline, "worker committed no shards in 90 s"
        time.sleep(0.01)
    time.sleep(0.07)  # land somewhere inside a later batch / shard write
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    killed = json.loads((cut_dir / "manifest.json").read_text())
    assert not killed["complete"] and killed["source"]["texts_consumed"] < N_TEXTS

    resumed = _run_worker(model, cut_dir, 0.0)
    out_r, err_r = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err_r
    assert "runs=2" in out_r  # it continued the killed cache, it did not start over

    b = json.loads((cut_dir / "manifest.json").read_text())
    assert a["complete"] and b["complete"]
    assert b["runs"][1]["start_shard"] == len(killed["shards"]) >= 3
    assert a["n_tokens"] == b["n_tokens"] and a["source"] == b["source"]
    assert _shard_view(a) == _shard_view(b)
    # and the bytes themselves: token ids / positions / text indices, in order
    for key in ("token_ids", "text_index", "layer_002"):
        xa = np.concatenate([np.load(ref_dir / s["files"][key]["file"]) for s in a["shards"]])
        xb = np.concatenate([np.load(cut_dir / s["files"][key]["file"]) for s in b["shards"]])
        np.testing.assert_array_equal(xa, xb)
    ti = np.concatenate([np.load(cut_dir / s["files"]["text_index"]["file"])
                         for s in b["shards"]])
    assert (np.diff(ti) >= 0).all() and set(ti.tolist()) == set(range(N_TEXTS))
    # no stray temporary or uncommitted files (nor the lock) are left: the listed files, one
    # sidecar per shard and the manifest
    listed = {f["file"] for s in b["shards"] for f in s["files"].values()} | {"manifest.json"}
    listed |= {f"shard_{s['index']:06d}.json" for s in b["shards"]}
    assert {p.name for p in cut_dir.iterdir()} == listed
