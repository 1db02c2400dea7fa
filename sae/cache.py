"""Cache residual-stream activations of a Hugging Face model to disk (resumable).

:func:`cache_activations` runs a causal LM or encoder (``AutoModel``: the base model, no
LM head) over a deterministic stream of texts and writes, per committed shard, the
activations of the chosen layers plus token ids, positions and text indices (format: see
:mod:`sae.format`).

Which activation is "layer l"
-----------------------------
Layer ``l`` (0-based, ``0 <= l < num_hidden_layers``) is the **output of transformer block
l**, i.e. the residual stream after block l's attention and MLP, captured with a forward
hook on the block. This equals ``model(..., output_hidden_states=True).hidden_states[l + 1]``
for every ``l < num_hidden_layers - 1``. For the last block, models with a final norm
(Llama, Gemma2, GPT-2: ``norm`` / ``ln_f``) return the *normed* state in
``hidden_states[-1]``; the cache stores the un-normed residual stream there (encoders such
as BERT/MiniLM have no final norm, so ``hidden_states[-1]`` is the same thing).
The forward pass stops right after the deepest requested block (the rest of the network is
never run).

Tokens and order
----------------
Each text is one sequence: tokenised with the tokenizer's own special tokens
(BOS for Llama/Gemma, [CLS] … [SEP] for BERT) and truncated to ``context_length`` tokens;
``batch_size`` consecutive texts are right-padded into one forward pass. Rows are written
in text order, then position order. With ``exclude_special=True`` the positions holding
BOS/EOS/PAD/CLS/SEP/MASK ids are dropped (pass a set of ids to choose yourself).

Resume
------
A shard is committed only when all its files are renamed into place and the manifest
(the commit point) lists it with checksums. Shards end on batch boundaries, and a shard
records how many texts it consumed plus the hash chain over them
(:func:`sae.corpus.chain_hash`). A re-run with the same arguments skips exactly the
consumed texts (checking their hash chain) and re-forms the same batches, so an
interrupted-then-resumed cache is byte-identical to an uninterrupted one.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import itertools
import json
import os
import re
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxsense._checks import check_positive_int

from sae.corpus import CHAIN_START, TextSource, as_text_source, chain_hash
from sae._atomic import atomic_save_npy, fsync_dir, is_temp_name
from sae.format import (
    FORMAT,
    MANIFEST_NAME,
    STORAGE_DTYPES,
    layer_key,
    read_manifest,
    shard_file_name,
    verify_cache,
    write_manifest,
)

__all__ = ["cache_activations", "disk_bytes_per_million_tokens", "find_blocks"]

DTYPES = tuple(STORAGE_DTYPES)
#: Manifest fields that must agree for a run to continue (resume) an existing cache.
IDENTITY_FIELDS = ("model", "tokenizer", "layers", "d_model", "dtype", "context_length",
                   "batch_size", "tokens_per_shard", "exclude_special_ids", "source")
_OWN_FILE = re.compile(r"^(manifest\.json|shard_\d{6}\.[a-z_0-9]+\.npy)$")


def _own_file(name: str) -> bool:
    """A file this module writes: the manifest, a shard file, or a temporary file of the
    atomic writer (a leftover of a killed run)."""
    return bool(_OWN_FILE.match(name)) or is_temp_name(name)


def disk_bytes_per_million_tokens(d_model: int, dtype: str = "bfloat16", n_layers: int = 1,
                                  with_tokens: bool = True) -> int:
    """Bytes on disk per 1e6 cached tokens: ``d_model × bytes(dtype) × 1e6 × n_layers``
    plus 16 bytes/token of token id, position and text index when ``with_tokens``."""
    act = d_model * STORAGE_DTYPES[dtype].itemsize * n_layers
    return int(1_000_000 * (act + (16 if with_tokens else 0)))


# ---------------------------------------------------------------------------- validation
def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _check_positive_int(name: str, value, allow_none: bool = False) -> None:
    check_positive_int(name, value, allow_none=allow_none)


def _check_layers(layers) -> list[int]:
    if _is_int(layers):
        layers = [layers]
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
        raise TypeError(f"layers={layers!r}: expected an int or a sequence of ints")
    layers = list(layers)
    if not layers:
        raise ValueError("layers=[]: expected at least one block index")
    for l in layers:
        if not _is_int(l) or l < 0:
            raise ValueError(f"layers={layers!r}: entry {l!r} is not a block index >= 0")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers={layers!r}: duplicate entries")
    return sorted(int(l) for l in layers)


def _check_args(out_dir, layers, context_length, batch_size, dtype, device, tokens_per_shard,
                max_texts, max_tokens):
    if not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"out_dir={out_dir!r}: expected a str or os.PathLike folder path")
    layers = _check_layers(layers)
    _check_positive_int("context_length", context_length)
    _check_positive_int("batch_size", batch_size)
    _check_positive_int("tokens_per_shard", tokens_per_shard)
    _check_positive_int("max_texts", max_texts, allow_none=True)
    _check_positive_int("max_tokens", max_tokens, allow_none=True)
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {DTYPES}")
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={device!r}: not a torch device ('cpu', 'cuda:0', …)") from e
    return layers, device


def _peek_texts(source: TextSource) -> Iterator[str]:
    """Return an iterator over the source that has been checked to be non-empty."""
    it = iter(source)
    try:
        first = next(it)
    except StopIteration:
        raise ValueError(
            f"texts: empty corpus (source {source.description}); expected at least one text"
        ) from None
    if not isinstance(first, str):
        raise TypeError(f"texts: element 0 is {type(first).__name__}, expected str")
    return itertools.chain([first], it)


def _resolve_model_name(model) -> str:
    """A name/folder transformers can load: the embedded names of :mod:`sae.models`
    (``"smollm2-135m"``, ``"minilm"``) map to their local folders (SmolLM2's float32 cache
    is built on first use); an existing folder must hold a config.json; anything else is
    taken as a Hugging Face Hub name."""
    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    if not isinstance(model, str) or not model:
        raise TypeError(f"model={model!r}: expected a Hugging Face model name, a local path "
                        f"or an embedded name such as 'smollm2-135m' / 'minilm'")
    from sae import models

    if models._canonical(model) is not None:
        return models.local_path(model)
    p = Path(model).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"model={model!r}: folder has no config.json")
        return str(p.resolve())
    looks_local = model.startswith(("/", ".", "~")) or os.sep + os.sep in model \
        or model.count("/") > 1
    if looks_local:
        raise FileNotFoundError(f"model={model!r}: no such local model folder")
    return model


def _load_config(name: str, revision: str | None, trust_remote_code: bool):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name, revision=revision,
                                          trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        raise FileNotFoundError(
            f"model={name!r}: neither a local model folder nor a model reachable on the "
            f"Hugging Face Hub{' (HF_HUB_OFFLINE is set)' if offline else ''}: {e}"
        ) from e


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def _config_sha256(config) -> str:
    d = {k: v for k, v in config.to_dict().items()
         if not k.startswith("_") and k not in ("transformers_version", "dtype", "torch_dtype")}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def _tokenizer_sha256(tok) -> str:
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        s = backend.to_str()
    else:  # slow tokenizer: vocabulary + special tokens
        s = json.dumps([sorted(tok.get_vocab().items()), tok.all_special_tokens])
    return hashlib.sha256(s.encode()).hexdigest()


def _special_ids(tok, exclude_special) -> list[int]:
    if exclude_special is False or exclude_special is None:
        return []
    if exclude_special is True:
        ids = {getattr(tok, f"{k}_token_id", None) for k in ("bos", "eos", "pad", "cls", "sep",
                                                               "mask")}
        return sorted(int(i) for i in ids if i is not None)
    if isinstance(exclude_special, Iterable) and not isinstance(exclude_special, (str, bytes)):
        ids = list(exclude_special)
        if all(_is_int(i) for i in ids):
            return sorted({int(i) for i in ids})
    raise TypeError(f"exclude_special={exclude_special!r}: expected a bool or a set of token ids")


def _existing_cache_check(out: Path, identity: dict, resume: bool) -> dict | None:
    """Return the existing manifest to resume from, or None for a fresh cache.

    Raises ValueError for a folder holding another cache (or unrelated files)."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise ValueError(f"out_dir={str(out)!r}: exists and is not a folder")
    if (out / MANIFEST_NAME).exists():
        old = read_manifest(out)
        def ident(m, k):
            v = m.get(k)
            return {"description": v.get("description")} if k == "source" and v else v

        diffs = [k for k in IDENTITY_FIELDS if ident(old, k) != identity[k]]
        if diffs:
            detail = "; ".join(f"{k}: cache has {ident(old, k)!r}, this run {identity[k]!r}"
                               for k in diffs[:4])
            raise ValueError(
                f"out_dir={str(out)!r}: holds the cache of another model or setting "
                f"({', '.join(diffs)} differ: {detail}); expected an empty folder or a cache "
                f"made with the same arguments"
            )
        if not resume:
            raise ValueError(
                f"out_dir={str(out)!r}: already holds a cache with {len(old['shards'])} shards; "
                f"pass resume=True to continue it or choose an empty folder"
            )
        return old
    strangers = [p.name for p in out.iterdir() if not _own_file(p.name)]
    if strangers:
        raise ValueError(
            f"out_dir={str(out)!r}: not empty and holds no activation cache "
            f"(found {strangers[:3]}); expected an empty or new folder"
        )
    return None


# ---------------------------------------------------------------------------- model plumbing
def find_blocks(model, n_layers: int):
    """The ``torch.nn.ModuleList`` of the ``n_layers`` transformer blocks of ``model``.

    Found structurally: the ModuleList of length ``n_layers`` whose entries share one
    class (``model.layers`` for Llama/Gemma2, ``h`` for GPT-2, ``encoder.layer`` for BERT).
    """
    import torch

    cands = [(name, m) for name, m in model.named_modules()
             if isinstance(m, torch.nn.ModuleList) and len(m) == n_layers and n_layers > 0
             and len({type(c) for c in m}) == 1]
    if not cands:
        raise ValueError(
            f"model {type(model).__name__}: found no list of {n_layers} transformer blocks"
        )
    return min(cands, key=lambda nm: nm[0].count("."))[1]


class _StopForward(Exception):
    """Raised by the hook of the deepest requested block to skip the rest of the model."""


class _Capture:
    """Forward hooks on the requested blocks; ``run`` returns {layer: (b, t, d) tensor}."""

    def __init__(self, model, blocks, layers: Sequence[int]):
        self.model, self.out, self.last = model, {}, max(layers)
        self.handles = [blocks[l].register_forward_hook(self._hook(l)) for l in layers]

    def _hook(self, layer):
        def hook(module, args, output):
            h = output[0] if isinstance(output, (tuple, list)) else output
            self.out[layer] = h
            if layer == self.last:
                raise _StopForward
        return hook

    def run(self, input_ids, attention_mask) -> dict:
        self.out = {}
        try:
            self.model(input_ids=input_ids, attention_mask=attention_mask)
        except _StopForward:
            pass
        return self.out

    def close(self):
        for h in self.handles:
            h.remove()


def _to_storage(h, dtype: str) -> np.ndarray:
    """(n, d) torch tensor -> numpy in the storage dtype (bf16 as uint16 bit patterns)."""
    import torch

    if dtype == "bfloat16":
        return h.to(torch.bfloat16).view(torch.int16).cpu().numpy().view(np.uint16)
    if dtype == "float16":
        return h.to(torch.float16).cpu().numpy()
    return h.to(torch.float32).cpu().numpy()


def _versions() -> dict:
    import torch
    import transformers

    v = {"python": ".".join(map(str, sys.version_info[:3])), "numpy": np.__version__,
         "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import tokenizers

        v["tokenizers"] = tokenizers.__version__
    except ImportError:  # pragma: no cover
        pass
    return v


# ---------------------------------------------------------------------------- shard writer
class _ShardBuffer:
    """Accumulates rows of the current (uncommitted) shard."""

    def __init__(self, layers):
        self.layers = layers
        self.reset()

    def reset(self):
        self.acts = {l: [] for l in self.layers}
        self.token_ids, self.positions, self.text_index = [], [], []
        self.n_tokens = 0
        self.n_texts = 0

    def add(self, acts: dict, token_ids, positions, text_index, n_texts):
        for l in self.layers:
            self.acts[l].append(acts[l])
        self.token_ids.append(token_ids)
        self.positions.append(positions)
        self.text_index.append(text_index)
        self.n_tokens += len(token_ids)
        self.n_texts += n_texts


def _commit_shard(out: Path, manifest: dict, buf: _ShardBuffer, chain: str) -> None:
    """Write the buffered shard (all files atomic), then commit it in the manifest."""
    index = len(manifest["shards"])
    d = manifest["d_model"]
    dt = STORAGE_DTYPES[manifest["dtype"]]
    arrays = {}
    for l in buf.layers:
        arrays[layer_key(l)] = (np.concatenate(buf.acts[l]) if buf.acts[l]
                                else np.zeros((0, d), dt))
    arrays["token_ids"] = np.concatenate(buf.token_ids).astype("<i4")
    arrays["positions"] = np.concatenate(buf.positions).astype("<i4")
    arrays["text_index"] = np.concatenate(buf.text_index).astype("<i8")
    files = {k: atomic_save_npy(out / shard_file_name(index, k), a, sync_dir=False)
             for k, a in arrays.items()}
    fsync_dir(out)
    first_text = manifest["source"]["texts_consumed"]
    manifest["shards"].append({
        "index": index, "n_tokens": buf.n_tokens, "n_texts": buf.n_texts,
        "first_text": first_text, "text_chain": chain, "files": files,
    })
    manifest["source"]["texts_consumed"] = first_text + buf.n_texts
    manifest["source"]["text_chain"] = chain
    manifest["n_tokens"] += buf.n_tokens
    write_manifest(out, manifest)  # the commit point
    buf.reset()


def _remove_uncommitted(out: Path, manifest: dict | None) -> None:
    """Delete temporary files and shard files the manifest does not list."""
    keep = set()
    if manifest:
        for s in manifest["shards"]:
            keep.update(f["file"] for f in s["files"].values())
    for p in out.iterdir():
        if p.name != MANIFEST_NAME and _own_file(p.name) and p.name not in keep:
            p.unlink()


# ---------------------------------------------------------------------------- main entry
def cache_activations(
    model: str | os.PathLike,
    texts: Any = None,
    out_dir: str | os.PathLike = "activations",
    layers: int | Sequence[int] = 0,
    context_length: int = 128,
    batch_size: int = 16,
    dtype: str = "float32",
    exclude_special: bool | Iterable[int] = True,
    device: str = "cpu",
    *,
    tokens_per_shard: int = 1 << 16,
    max_texts: int | None = None,
    max_tokens: int | None = None,
    tokenizer: str | os.PathLike | None = None,
    revision: str | None = None,
    model_dtype: str | None = None,
    model_kwargs: dict | None = None,
    trust_remote_code: bool = False,
    resume: bool = True,
    progress: bool = True,
) -> dict:
    """Cache the residual stream after blocks ``layers`` of ``model`` over ``texts``.

    Args:
      model: embedded name (``"smollm2-135m"``: the paper-style causal LM of this repo,
        ``"minilm"``: the small encoder for fast tests; see :mod:`sae.models`), Hugging
        Face model name (e.g. ``"google/gemma-2-2b"``) or local folder.
      texts: ``None``/``"default"`` (stdlib docstrings, offline), a file/folder path,
        ``"hf:<dataset>[:<config>][@<split>]"``, a :class:`sae.corpus.TextSource`, or any
        iterable of str. Order is the cache order.
      out_dir: cache folder (created; must be empty, new, or a cache of the same run).
      layers: block index or indices l (0-based); stored activation = output of block l.
      context_length: max tokens per text (special tokens included); longer texts are
        truncated.
      batch_size: texts per forward pass.
      dtype: storage dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"``.
      exclude_special: drop BOS/EOS/PAD/CLS/SEP/MASK positions (True), keep all (False), or
        the set of token ids to drop.
      device: torch device for the model (``"cpu"``, ``"cuda"``, ``"auto"``).
      tokens_per_shard: a shard is committed once it holds at least this many rows (at
        the next batch boundary).
      max_texts / max_tokens: stop once this many texts / rows in total are cached (counts
        include earlier runs of a resumed cache; the last batch is kept whole).
      tokenizer: tokenizer name/path if not the model's own.
      revision: hub revision of the model.
      model_dtype: torch dtype for the weights (default float32; ``"bfloat16"`` on GPU).
      model_kwargs: extra ``AutoModel.from_pretrained`` keyword arguments.
      resume: continue an existing cache of the same run in ``out_dir``.
      progress: show a tqdm bar (texts, with tokens/s and ETA).

    Returns:
      The final manifest (dict); ``manifest["complete"]`` is True once the source is
      exhausted.

    Raises (all before the model is run):
      TypeError / ValueError naming the argument for bad arguments (layer out of range,
      context_length <= 0, empty corpus, folder holding another model's cache, …);
      FileNotFoundError for an unknown model path or name, or missing text path.
    """
    layers, torch_device = _check_args(out_dir, layers, context_length, batch_size, dtype,
                                       device, tokens_per_shard, max_texts, max_tokens)
    source = as_text_source(texts)
    text_iter = _peek_texts(source)
    name = _resolve_model_name(model)
    config = _load_config(name, revision, trust_remote_code)
    tcfg = _text_config(config)
    n_layers = int(tcfg.num_hidden_layers)
    d_model = int(tcfg.hidden_size)
    bad = [l for l in layers if l >= n_layers]
    if bad:
        raise ValueError(
            f"layers={layers}: {bad} out of range; model {name!r} has {n_layers} blocks, "
            f"expected indices in [0, {n_layers - 1}]"
        )
    max_pos = getattr(tcfg, "max_position_embeddings", None)
    if isinstance(max_pos, int) and context_length > max_pos:
        raise ValueError(
            f"context_length={context_length}: model {name!r} supports at most {max_pos} "
            f"positions (max_position_embeddings)"
        )
    from transformers import AutoTokenizer

    tok_name = name if tokenizer is None else os.fspath(tokenizer)
    try:
        tok = AutoTokenizer.from_pretrained(tok_name, revision=revision if tokenizer is None
                                            else None, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"tokenizer={tok_name!r}: could not load a tokenizer: {e}") from e
    special_ids = _special_ids(tok, exclude_special)
    identity = {
        "model": {"name_or_path": name, "revision": revision or getattr(config, "_commit_hash",
                                                                          None),
                  "class": type(config).__name__, "config_sha256": _config_sha256(config)},
        "tokenizer": {"name_or_path": tok_name, "class": type(tok).__name__,
                      "vocab_size": len(tok), "sha256": _tokenizer_sha256(tok)},
        "layers": layers, "d_model": d_model, "dtype": dtype,
        "context_length": int(context_length), "batch_size": int(batch_size),
        "tokens_per_shard": int(tokens_per_shard), "exclude_special_ids": special_ids,
        "source": {"description": source.description},
    }
    out = Path(out_dir)
    old = _existing_cache_check(out, identity, resume)
    if old is not None:
        manifest = verify_cache(out, "size")
    else:
        manifest = {"format": FORMAT, **identity,
                    "n_layers": n_layers, "complete": False, "n_tokens": 0, "shards": [],
                    "layer_semantics": "output of block l (0-based) = hidden_states[l+1], "
                                       "pre-final-norm at the last block",
                    "storage_dtype": str(STORAGE_DTYPES[dtype]), "runs": []}
        manifest["source"] = {"description": source.description, "texts_consumed": 0,
                              "text_chain": CHAIN_START}
    # Skip (and re-hash) the texts that committed shards consumed.
    consumed = manifest["source"]["texts_consumed"]
    chain = CHAIN_START
    for t in itertools.islice(text_iter, consumed):
        chain = chain_hash(chain, t)
    if chain != manifest["source"]["text_chain"]:
        raise ValueError(
            f"texts: the first {consumed} texts differ from those the cache in "
            f"out_dir={str(out)!r} consumed (hash chain mismatch); expected the same source "
            f"in the same order"
        )

    # ------------------------------------------------------------------ heavy set-up
    out.mkdir(parents=True, exist_ok=True)
    _remove_uncommitted(out, old)
    import torch
    from transformers import AutoModel

    kwargs = dict(model_kwargs or {})
    kwargs.setdefault("dtype", getattr(torch, model_dtype) if isinstance(model_dtype, str)
                      else (model_dtype or torch.float32))
    net = AutoModel.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code,
                                    **kwargs)
    net.eval().to(torch_device)
    blocks = find_blocks(net, n_layers)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    tok.padding_side = "right"
    special_t = torch.tensor(special_ids, dtype=torch.long, device=torch_device)
    manifest["versions"] = _versions()
    manifest["runs"].append({"started": _dt.datetime.now(_dt.timezone.utc).isoformat(),
                             "start_text": consumed, "start_shard": len(manifest["shards"])})

    limit_texts = None if max_texts is None else max(0, max_texts - consumed)
    if limit_texts is not None:
        text_iter = itertools.islice(text_iter, limit_texts)
    total = source.length if max_texts is None else (
        max_texts if source.length is None else min(max_texts, source.length))
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=consumed, unit="text", disable=not progress,
               desc=f"caching {Path(name).name}", dynamic_ncols=True)
    capture = _Capture(net, blocks, layers)
    buf = _ShardBuffer(layers)
    t0, run_tokens, t_forward = time.perf_counter(), 0, 0.0
    text_idx = consumed
    exhausted = False
    try:
        with torch.inference_mode():
            while True:
                if max_tokens is not None and manifest["n_tokens"] + buf.n_tokens >= max_tokens:
                    break
                batch = list(itertools.islice(text_iter, batch_size))
                if not batch:
                    exhausted = limit_texts is None or text_idx - consumed < limit_texts
                    break
                for j, t in enumerate(batch):
                    if not isinstance(t, str):
                        raise TypeError(f"texts: element {text_idx + j} is "
                                        f"{type(t).__name__}, expected str")
                tf = time.perf_counter()
                enc = tok(batch, truncation=True, max_length=context_length, padding=True,
                          return_tensors="pt")
                ids = enc["input_ids"].to(torch_device)
                att = enc["attention_mask"].to(torch_device)
                hs = capture.run(ids, att)
                if torch_device.type == "cuda":
                    torch.cuda.synchronize(torch_device)
                t_forward += time.perf_counter() - tf
                keep = att.bool()
                if len(special_ids):
                    keep &= ~torch.isin(ids, special_t)
                b, T = ids.shape
                pos = torch.arange(T, device=torch_device).expand(b, T)
                tix = (torch.arange(b, device=torch_device) + text_idx)[:, None].expand(b, T)
                acts = {l: _to_storage(hs[l][keep], dtype) for l in layers}
                buf.add(acts, ids[keep].cpu().numpy(), pos[keep].cpu().numpy(),
                        tix[keep].cpu().numpy(), len(batch))
                for t in batch:
                    chain = chain_hash(chain, t)
                text_idx += len(batch)
                n_new = int(keep.sum())
                run_tokens += n_new
                bar.update(len(batch))
                bar.set_postfix(tok_s=f"{run_tokens / max(time.perf_counter() - t0, 1e-9):.0f}",
                                tokens=manifest["n_tokens"] + buf.n_tokens, refresh=False)
                if buf.n_tokens >= tokens_per_shard:
                    _commit_shard(out, manifest, buf, chain)
        if buf.n_texts:
            _commit_shard(out, manifest, buf, chain)
        manifest["complete"] = bool(exhausted)
        manifest["runs"][-1].update(
            finished=_dt.datetime.now(_dt.timezone.utc).isoformat(), tokens=run_tokens,
            loop_seconds=round(time.perf_counter() - t0, 4),
            forward_seconds=round(t_forward, 4))  # tokenise + model forward only
        write_manifest(out, manifest)
    finally:
        capture.close()
        bar.close()
    return manifest
