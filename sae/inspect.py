"""Look at an SAE's latents on a cached corpus: density histogram, top activations, HTML.

``python -m sae.inspect --sae PATH --cache DIR --layer L --out DIR [--latents 3,17,42]
[--n-latents 20] [--top-k 20] [--context 8] [--max-tokens N] [--k K]`` writes, into
``--out`` (every file atomically, via :mod:`sae._atomic`):

* ``density_histogram.png`` — histogram of log10 firing density p_i = (1/N) Σ_n 1[f_ni ≠ 0]
  over the live latents, the dead ones (p_i = 0) counted in the title (the plot of
  Bricken et al. 2023, "Towards Monosemanticity", and Rajamanoharan et al. 2024,
  arXiv 2407.14435, Fig. 5);
* ``latent_density.npy`` — p, float64 (M,);
* ``top_activations.json`` — for each chosen latent (``--latents``, else the
  ``--n-latents`` most frequently firing ones), its ``top_k`` largest non-zero codes over
  the cache, largest first, each with the token and a context window of ``context``
  cached rows either side from the same text, the latent's code on every row of the
  window, token ids, positions, text index, shard and row;
* ``latents.html`` — one self-contained static page (inline CSS and JS, no network) that
  lists the same latents; each context window is shown with the tokens highlighted by the
  latent's activation (opacity ∝ code / the latent's max code), a filter box selects
  latents by id.

Tokens are decoded with the tokenizer named in the cache manifest
(``manifest["tokenizer"]["name_or_path"]``, written by :func:`sae.cache.cache_activations`);
when it cannot be loaded (offline, moved folder) the tokens are shown as ``#<id>``.

Context windows run over *cached rows*: with ``exclude_special=True`` the cache has no
BOS/CLS/SEP rows, so a window shows the text's stored tokens only (their ``positions`` tell
where a special token was left out). Rows of one text never span shards.

``--sae`` is a SAELens folder (``cfg.json`` + ``sae_weights.safetensors``; read by
:func:`sae.io.load_saelens`, TopK ``k`` and ``apply_b_dec_to_input`` from cfg.json) or a
Gemma Scope ``params.npz`` (:func:`sae.io.load_gemmascope`; ``--k`` for a TopK SAE).
The library entry point is :func:`inspect_latents`.
"""
from __future__ import annotations

import argparse
import html
import io
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

__all__ = ["inspect_latents", "load_sae", "main", "render_html"]

HIST_NAME, DENSITY_NAME = "density_histogram.png", "latent_density.npy"
JSON_NAME, HTML_NAME = "top_activations.json", "latents.html"


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def load_sae(path: str | os.PathLike, *, k: int | None = None) -> tuple[dict, dict]:
    """(params, {"k", "apply_b_dec_to_input"}) from a SAELens folder or a Gemma Scope
    ``.npz`` (loaded for ``apply_b_dec_to_input=True``: b_dec W_enc folded into b_enc)."""
    from sae import io as sio

    p = Path(path)
    if p.is_dir():
        params, cfg = sio.load_saelens(str(p))
        kk = cfg.get("k") if k is None else k
        return params, {"k": kk, "apply_b_dec_to_input": bool(cfg["apply_b_dec_to_input"])}
    if p.is_file() and p.suffix == ".npz":
        return sio.load_gemmascope(str(p), apply_b_dec_to_input=True), \
            {"k": k, "apply_b_dec_to_input": True}
    raise FileNotFoundError(f"sae={str(path)!r}: expected a SAELens folder (cfg.json + "
                            f"sae_weights.safetensors) or a Gemma Scope params .npz file")


def _tokenizer(manifest: dict):
    """The cache's tokenizer, or None when it cannot be loaded here."""
    name = (manifest.get("tokenizer") or {}).get("name_or_path")
    if not name:
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(name)
    except Exception:  # noqa: BLE001 - any failure falls back to token ids
        return None


def _token_text(tok, ids: Sequence[int]) -> list[str]:
    if tok is None:
        return [f"#{int(i)}" for i in ids]
    return [tok.decode([int(i)]) for i in ids]


def _merge_top(vals, rows, cand_vals, cand_rows, top_k):
    """Per column, keep the top_k largest of (vals ∪ cand): (k, M) arrays, ties by row."""
    v = np.concatenate([vals, cand_vals], 0)
    r = np.concatenate([rows, cand_rows], 0)
    order = np.lexsort((r, -v), axis=0)[:top_k]  # value desc, then row asc
    return np.take_along_axis(v, order, 0), np.take_along_axis(r, order, 0)


def inspect_latents(params: Mapping, cache, layer: int | None = None, out=None, *,
                    latents: Sequence[int] | None = None, n_latents: int = 20,
                    top_k: int = 20, context: int = 8, k: int | None = None,
                    apply_b_dec_to_input: bool = True, max_tokens: int | None = None,
                    rows_per_batch: int = 4096, sae_name: str = "",
                    progress: bool = True) -> dict:
    """Density histogram, top activations and an HTML page for an SAE on a cache.

    Args:
      params: SAE params dict (W_enc (H, M), W_dec (M, H), b_enc, b_dec, threshold), run
        with :func:`sae.model.encode` (``k`` for TopK, ``apply_b_dec_to_input``).
      cache: cache folder or an :class:`sae.store.ActivationStore`.
      layer: cached layer (may be omitted for a one-layer cache).
      out: output folder (created).
      latents: latent ids to show; default: the ``n_latents`` with the highest density.
      top_k: activations per latent; context: cached rows either side of each.
      max_tokens: use only the first rows of the cache.

    Returns: the JSON document written to ``top_activations.json`` plus ``"files"`` (paths).
    Raises ValueError / TypeError naming the argument before reading activations.
    """
    import jax.numpy as jnp

    from sae._atomic import atomic_save_npy, atomic_write_bytes
    from sae.evals import _as_jax_params
    from sae.model import encode
    from sae.store import ActivationStore

    if out is None:
        raise ValueError("out=None: expected an output folder")
    for name, v, lo in (("top_k", top_k, 1), ("context", context, 0), ("n_latents", n_latents, 1),
                        ("rows_per_batch", rows_per_batch, 1)):
        if not _is_int(v) or v < lo:
            raise ValueError(f"{name}={v!r}: expected an int >= {lo}")
    if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 1):
        raise ValueError(f"max_tokens={max_tokens!r}: expected None or an int >= 1")
    if k is not None and (not _is_int(k) or k < 1):
        raise ValueError(f"k={k!r}: expected None or an int >= 1")
    if not isinstance(params, Mapping):
        raise TypeError(f"params={type(params).__name__}: expected a dict of SAE arrays")
    p = _as_jax_params(params, "params")
    store = cache if isinstance(cache, ActivationStore) else \
        ActivationStore(cache, layer, batch_size=1, as_numpy=True, verify="size")
    H, M = int(p["W_enc"].shape[0]), int(p["W_enc"].shape[1])
    if H != store.d_model:
        raise ValueError(f"params: W_enc {tuple(p['W_enc'].shape)} but the cache has d_model "
                         f"{store.d_model}; expected an SAE for these activations")
    if k is None and "threshold" not in p:
        raise ValueError("params: no 'threshold' and k=None; expected a JumpReLU threshold "
                         "or k for a TopK SAE")
    if k is not None and k > M:
        raise ValueError(f"k={k}: expected <= the number of latents {M}")
    if latents is not None:
        latents = list(latents)
        bad = [i for i in latents if not _is_int(i) or not 0 <= i < M]
        if bad or not latents:
            raise ValueError(f"latents={latents!r}: expected a non-empty list of ids in "
                             f"[0, {M - 1}]" + (f" ({bad[:5]} are not)" if bad else ""))

    def codes(x):
        return np.asarray(encode(p, jnp.asarray(x, jnp.float32), k=k,
                                 apply_b_dec_to_input=apply_b_dec_to_input))

    # ------------------------------------------------------------------ one pass
    sizes = [int(s) for s in store.shard_sizes]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    total = int(offsets[-1]) if max_tokens is None else min(int(offsets[-1]), max_tokens)
    if total == 0:
        raise ValueError(f"cache={str(store.path)!r}: holds no rows")
    kk = min(top_k, total)
    top_v = np.full((0, M), -np.inf, np.float32)
    top_r = np.zeros((0, M), np.int64)
    fires = np.zeros(M, np.int64)
    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit="tok", desc="inspect latents", disable=not progress,
               dynamic_ncols=True)
    try:
        for s, n in enumerate(sizes):
            a = store.activations(s)
            for r0 in range(0, n, rows_per_batch):
                g0 = int(offsets[s]) + r0
                if g0 >= total:
                    break
                r1 = min(r0 + rows_per_batch, n, r0 + total - g0)
                f = codes(np.asarray(a[r0:r1], np.float32))
                fires += (f != 0).sum(0)
                rows = np.arange(g0, g0 + (r1 - r0), dtype=np.int64)
                m = min(kk, f.shape[0])
                part = np.argpartition(-f, m - 1, axis=0)[:m] if m < f.shape[0] else \
                    np.broadcast_to(np.arange(f.shape[0])[:, None], f.shape)
                top_v, top_r = _merge_top(top_v, top_r, np.take_along_axis(f, part, 0),
                                          rows[part], kk)
                bar.update(r1 - r0)
    finally:
        bar.close()
    density = fires / total
    if latents is None:
        alive = np.flatnonzero(fires > 0)
        latents = alive[np.lexsort((alive, -fires[alive]))][:n_latents].tolist()

    # ------------------------------------------------------------------ windows
    tok = _tokenizer(store.manifest)
    docs = []
    for lat in latents:
        entries = []
        for v, g in zip(top_v[:, lat].tolist(), top_r[:, lat].tolist()):
            if v == 0 or not np.isfinite(v):  # never fired (or padding of top_v)
                continue
            s = int(np.searchsorted(offsets, g, side="right") - 1)
            r = int(g - offsets[s])
            t = store.tokens(s)
            n = sizes[s]
            lo, hi = max(0, r - context), min(n, r + context + 1)
            same = np.asarray(t["text_index"][lo:hi]) == t["text_index"][r]
            idx = np.arange(lo, hi)[same]  # rows of one text are consecutive
            ids = np.asarray(t["token_ids"])[idx].tolist()
            win = codes(np.asarray(store.activations(s)[idx], np.float32))[:, lat]
            entries.append({
                "value": float(v), "row": int(g), "shard": s, "shard_row": r,
                "text_index": int(t["text_index"][r]), "position": int(t["positions"][r]),
                "token_id": int(t["token_ids"][r]),
                "token": _token_text(tok, [t["token_ids"][r]])[0],
                "context": {"rows": idx.tolist(), "token_ids": ids,
                            "tokens": _token_text(tok, ids),
                            "positions": np.asarray(t["positions"])[idx].tolist(),
                            "values": [float(w) for w in win],
                            "center": int(np.flatnonzero(idx == r)[0])}})
        docs.append({"latent": int(lat), "density": float(density[lat]),
                     "max_value": entries[0]["value"] if entries else 0.0, "top": entries})
    n_dead = int((fires == 0).sum())
    doc = {"sae": sae_name, "cache": str(store.path), "layer": store.layer,
           "model": (store.manifest.get("model") or {}).get("name_or_path"),
           "tokenizer": (store.manifest.get("tokenizer") or {}).get("name_or_path")
           if tok is not None else None,
           "n_tokens": total, "n_latents": M, "k": k, "top_k": top_k, "context": context,
           "n_dead": n_dead, "frac_alive": float(1 - n_dead / M), "latents": docs}

    # ------------------------------------------------------------------ files
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"histogram": str(out / HIST_NAME), "density": str(out / DENSITY_NAME),
             "json": str(out / JSON_NAME), "html": str(out / HTML_NAME)}
    atomic_write_bytes(files["histogram"], _histogram_png(density, total, sae_name))
    atomic_save_npy(files["density"], density.astype(np.float64))
    atomic_write_bytes(files["json"], json.dumps(doc, indent=1).encode())
    atomic_write_bytes(files["html"], render_html(doc).encode())
    return dict(doc, files=files)


def _histogram_png(density: np.ndarray, n_tokens: int, title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    live = density[density > 0]
    lo = math.floor(math.log10(1.0 / n_tokens) * 4) / 4 - 0.25
    bins = np.arange(lo, 0.25, 0.25)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    try:
        ax.hist(np.log10(live), bins=bins, color="#d9661f")
        ax.set_xlabel("log10 firing density")
        ax.set_ylabel("latents")
        ax.set_title(f"{title + ': ' if title else ''}{len(density)} latents, "
                     f"{int((density == 0).sum())} dead, {n_tokens} tokens", fontsize=9)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    return buf.getvalue()


_CSS = """body{font-family:system-ui,sans-serif;margin:0;display:flex;height:100vh}
nav{width:12em;overflow-y:auto;border-right:1px solid #ccc;padding:.5em;flex:none}
nav a{display:block;text-decoration:none;color:#124;padding:1px 0}
main{overflow-y:auto;padding:0 1em;flex:1}
section{border-bottom:1px solid #ddd;padding-bottom:.5em}
.ex{font-family:ui-monospace,monospace;white-space:pre-wrap;margin:.2em 0}
.ex span{border-radius:2px}.ex .c{outline:1px solid #b40}
.v{color:#666;display:inline-block;width:6em}.meta{color:#555;font-size:.9em}"""

_JS = """function f(){var q=document.getElementById('q').value.trim();
document.querySelectorAll('section,nav a').forEach(function(e){
e.style.display=(!q||e.dataset.latent.indexOf(q)===0)?'':'none';});}"""


def render_html(doc: dict) -> str:
    """The static page for a ``top_activations.json`` document (every string escaped)."""
    esc = html.escape
    nav, body = [], []
    for lat in doc["latents"]:
        i = lat["latent"]
        nav.append(f'<a href="#latent-{i}" data-latent="{i}">latent {i} '
                   f'<small>{lat["density"]:.2e}</small></a>')
        rows = []
        mx = lat["max_value"] or 1.0
        for e in lat["top"]:
            c = e["context"]
            spans = []
            for j, (t, v) in enumerate(zip(c["tokens"], c["values"])):
                a = max(0.0, min(1.0, v / mx))
                cls = ' class="c"' if j == c["center"] else ""
                spans.append(f'<span{cls} style="background:rgba(255,110,0,{a:.3f})" '
                             f'title="{v:.4g} (pos {c["positions"][j]})">{esc(t)}</span>')
            rows.append(f'<div class="ex"><span class="v">{e["value"]:.4g}</span>'
                        f'{" ".join(spans)} <span class="meta">text {e["text_index"]}, '
                        f'pos {e["position"]}</span></div>')
        body.append(f'<section id="latent-{i}" data-latent="{i}"><h2>Latent {i}</h2>'
                    f'<p class="meta">density {lat["density"]:.3e} · max {lat["max_value"]:.4g}'
                    f' · {len(lat["top"])} activations</p>{"".join(rows) or "<p>never fires</p>"}'
                    f'</section>')
    head = (f'<p class="meta">SAE {esc(str(doc.get("sae") or ""))} · cache '
            f'{esc(str(doc["cache"]))} · layer {doc["layer"]} · model '
            f'{esc(str(doc.get("model")))} · {doc["n_tokens"]} tokens · {doc["n_latents"]} '
            f'latents ({doc["n_dead"]} dead) · tokenizer '
            f'{esc(str(doc.get("tokenizer") or "unavailable: token ids shown"))}</p>')
    return ('<!DOCTYPE html><html><head><meta charset="utf-8"><title>SAE latents</title>'
            f'<style>{_CSS}</style><script>{_JS}</script></head><body><nav>'
            '<input id="q" placeholder="latent id" oninput="f()" style="width:10em">'
            f'{"".join(nav)}</nav><main><h1>SAE latents</h1>{head}{"".join(body)}</main>'
            '</body></html>\n')


# ------------------------------------------------------------------------------ CLI
def _int_range(lo: int, hi: int | None = None):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r}: expected an integer") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(
                f"{v}: expected an integer in [{lo}, {'∞' if hi is None else hi}]")
        return v
    return parse


def _id_list(s: str) -> list[int]:
    try:
        ids = [int(t) for t in s.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r}: expected comma-separated latent ids") from None
    if not ids or min(ids) < 0:
        raise argparse.ArgumentTypeError(f"{s!r}: expected non-negative latent ids")
    return ids


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m sae.inspect", description=(
        "Density histogram, top activating tokens with context and a static HTML page for "
        "the latents of an SAE on an activation cache."))
    ap.add_argument("--sae", required=True, help="SAELens folder or Gemma Scope params .npz")
    ap.add_argument("--cache", required=True, help="activation cache folder (sae.cache)")
    ap.add_argument("--layer", type=_int_range(0), default=None,
                    help="cached layer (default: the only one)")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--latents", type=_id_list, default=None,
                    help="latent ids, e.g. 3,17,42 (default: the most frequent ones)")
    ap.add_argument("--n-latents", type=_int_range(1, 100000), default=20,
                    help="how many latents without --latents (default 20)")
    ap.add_argument("--top-k", type=_int_range(1, 10000), default=20,
                    help="activations per latent (default 20)")
    ap.add_argument("--context", type=_int_range(0, 1000), default=8,
                    help="cached tokens either side (default 8)")
    ap.add_argument("--max-tokens", type=_int_range(1), default=None,
                    help="use only the first rows of the cache")
    ap.add_argument("--k", type=_int_range(1), default=None, help="TopK k (npz files)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    params, cfg = load_sae(args.sae, k=args.k)
    res = inspect_latents(params, args.cache, args.layer, args.out, latents=args.latents,
                          n_latents=args.n_latents, top_k=args.top_k, context=args.context,
                          k=cfg["k"], apply_b_dec_to_input=cfg["apply_b_dec_to_input"],
                          max_tokens=args.max_tokens, sae_name=os.fspath(args.sae),
                          progress=not args.quiet)
    for key, path in res["files"].items():
        print(f"{key}: {path}")
    print(f"latents shown: {len(res['latents'])}, tokens: {res['n_tokens']}, "
          f"dead: {res['n_dead']}/{res['n_latents']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
