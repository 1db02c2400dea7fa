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

Guards (never destroy data without being asked)
-----------------------------------------------
One writer per folder: ``cache.lock`` (pid, hostname, start time; O_CREAT|O_EXCL) is taken
before the folder is read and removed on return, on exceptions and on KeyboardInterrupt;
a lock of a dead pid on this host is stale and taken over. Each shard has a sidecar
``shard_######.json`` (checksums, rows, texts, run identity) written before the manifest
commit. Resume re-verifies every committed shard (size, header, sha256 by default). A lost
manifest is rebuilt from the sidecars when all of them verify, else the run refuses,
deleting nothing. Only the atomic writer's temporary files of this module's own file
names, and the partial files of the one shard a killed run was writing, are deleted
without ``overwrite=True``.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import itertools
import json
import os
import re
import socket
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxsense._checks import check_positive_int

from sae.corpus import CHAIN_START, TextSource, as_text_source, chain_hash
from sae._atomic import atomic_save_npy, fsync_dir, temp_target
from sae.format import (
    FORMAT,
    MANIFEST_NAME,
    SHARD_META_FORMAT,
    STORAGE_DTYPES,
    layer_key,
    read_manifest,
    read_shard_meta,
    shard_file_name,
    shard_meta_name,
    verify_shard,
    write_manifest,
    write_shard_meta,
)

__all__ = ["CacheLockedError", "cache_activations", "disk_bytes_per_million_tokens",
           "find_blocks"]

DTYPES = tuple(STORAGE_DTYPES)
#: Manifest fields that must agree for a run to continue (resume) an existing cache.
IDENTITY_FIELDS = ("model", "tokenizer", "layers", "d_model", "dtype", "context_length",
                   "batch_size", "tokens_per_shard", "exclude_special_ids", "source")
LOCK_NAME = "cache.lock"
#: files this module writes (the lock is created directly, never through a temporary file)
_OWN_FILE = re.compile(r"^(manifest\.json|cache\.lock|shard_\d{6}\.json"
                       r"|shard_\d{6}\.[a-z_0-9]+\.npy)$")
_SHARD_FILE = re.compile(r"^shard_(\d{6})\.(?:[a-z_0-9]+\.npy|json)$")


def _own_temp(name: str) -> bool:
    """A temporary file that :mod:`sae._atomic` created for one of this module's files
    (exact name pattern of the writer, target a manifest/shard/sidecar name): a leftover
    of a killed run or of a failed write. Nothing else is ever deleted as a leftover."""
    target = temp_target(name)
    return target is not None and target != LOCK_NAME and bool(_OWN_FILE.match(target))


def _own_file(name: str) -> bool:
    """A file this module writes: the manifest, the lock, a shard file or sidecar, or a
    temporary file of the atomic writer for one of them."""
    return bool(_OWN_FILE.match(name)) or _own_temp(name)


class CacheLockedError(RuntimeError):
    """Another writer holds the lock of the cache folder (``cache.lock``)."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except (OverflowError, ValueError):
        return False
    return True


class _CacheLock:
    """``cache.lock`` in the cache folder: created with O_CREAT|O_EXCL, holding the JSON
    ``{"pid", "hostname", "started"}`` of the writer; removed by :meth:`release`.

    A lock whose holder ran on this host and whose pid is no longer alive is stale (its
    writer was killed) and is taken over. A live holder, or one on another host, makes
    :meth:`acquire` raise :class:`CacheLockedError` naming the folder and the holder."""

    def __init__(self, out: Path):
        self.out, self.path = out, out / LOCK_NAME
        self.info = {"pid": os.getpid(), "hostname": socket.gethostname(),
                     "started": _dt.datetime.now(_dt.timezone.utc).isoformat()}
        self.data = json.dumps(self.info, sort_keys=True).encode()
        self.held = False

    def _read(self) -> tuple[bytes, dict | None]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return b"", None
        try:
            info = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return raw, None
        ok = isinstance(info, dict) and isinstance(info.get("pid"), int)
        return raw, info if ok else None

    def _stale(self, info: dict | None) -> bool:
        return (info is not None and info.get("hostname") == self.info["hostname"]
                and info["pid"] != os.getpid() and not _pid_alive(info["pid"]))

    def _break(self, raw: bytes) -> None:
        """Remove the stale lock whose content is ``raw`` — unless another process replaced
        it meanwhile (then put that one back)."""
        aside = self.out / f".{LOCK_NAME}.stale-{os.getpid()}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # another process broke it first
        if aside.read_bytes() != raw:  # a live lock slipped in: restore it
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
        aside.unlink()

    def acquire(self) -> None:
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                raw, info = self._read()
                if self._stale(info):
                    self._break(raw)
                    continue
                if not raw and info is None and not self.path.exists():
                    continue  # released meanwhile
                holder = (f"pid {info['pid']} on host {info.get('hostname')!r}, started "
                          f"{info.get('started')}" if info else f"unreadable content {raw[:80]!r}")
                raise CacheLockedError(
                    f"out_dir={str(self.out)!r}: another writer holds {LOCK_NAME} ({holder}); "
                    f"expected no other process caching into this folder. Wait for it to "
                    f"finish; if that process is gone (it ran on another host, or the lock is "
                    f"unreadable), delete {str(self.path)!r} and run again"
                ) from None
            try:
                os.write(fd, self.data)
                os.fsync(fd)
            finally:
                os.close(fd)
            self.held = True
            return
        raise CacheLockedError(f"out_dir={str(self.out)!r}: could not take {LOCK_NAME} "
                               f"(other writers kept replacing it)")

    def release(self) -> None:
        """Remove the lock if it is still ours."""
        if self.held:
            self.held = False
            raw, _ = self._read()
            if raw == self.data:
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()


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


def _ident(m: dict, k: str):
    v = m.get(k)
    return {"description": v.get("description")} if k == "source" and v else v


def _identity_mismatch(out: Path, what: str, old: dict, identity: dict) -> str | None:
    diffs = [k for k in IDENTITY_FIELDS if _ident(old, k) != identity[k]]
    if not diffs:
        return None
    detail = "; ".join(f"{k}: {what} has {_ident(old, k)!r}, this run {identity[k]!r}"
                       for k in diffs[:4])
    return f"{', '.join(diffs)} differ: {detail}"


def _new_manifest(identity: dict, n_layers: int) -> dict:
    manifest = {"format": FORMAT, **identity,
                "n_layers": n_layers, "complete": False, "n_tokens": 0, "shards": [],
                "layer_semantics": "output of block l (0-based) = hidden_states[l+1], "
                                   "pre-final-norm at the last block",
                "storage_dtype": str(STORAGE_DTYPES[identity["dtype"]]), "runs": []}
    manifest["source"] = {"description": identity["source"]["description"],
                          "texts_consumed": 0, "text_chain": CHAIN_START}
    return manifest


def _shard_entry(meta: dict) -> dict:
    return {k: meta[k] for k in ("index", "n_tokens", "n_texts", "first_text", "text_chain",
                                 "files")}


def _append_shard(manifest: dict, entry: dict) -> None:
    manifest["shards"].append(entry)
    manifest["source"]["texts_consumed"] = entry["first_text"] + entry["n_texts"]
    manifest["source"]["text_chain"] = entry["text_chain"]
    manifest["n_tokens"] += entry["n_tokens"]


def _adopt_sidecars(out: Path, manifest: dict, by_index: dict, identity: dict,
                    verify: str) -> str | None:
    """Append to ``manifest`` the shards after its last one whose sidecars verify (same run
    identity, continuing the text hash chain, every file's size and sha256); stop at the
    first that does not and return why (None when every shard file was adopted)."""
    n = len(manifest["shards"])
    while n in by_index:
        names, meta_name = set(by_index[n]), shard_meta_name(n)
        if meta_name not in names:
            return f"shard {n} has no sidecar {meta_name} (files {sorted(names)[:3]})"
        try:
            meta = read_shard_meta(out / meta_name)
            bad = _identity_mismatch(out, meta_name, meta["identity"], identity)
            if bad:
                raise ValueError(f"written by another run ({bad})")
            if (meta["first_text"] != manifest["source"]["texts_consumed"]
                    or meta["prev_chain"] != manifest["source"]["text_chain"]):
                raise ValueError(f"does not continue shard {n - 1} (first text "
                                 f"{meta['first_text']}, expected "
                                 f"{manifest['source']['texts_consumed']}, or its hash chain)")
            extra = names - {f["file"] for f in meta["files"].values()} - {meta_name}
            if extra:
                raise ValueError(f"files {sorted(extra)} are not listed in it")
            verify_shard(out, identity, meta, verify)
        except (ValueError, FileNotFoundError, KeyError, TypeError) as e:
            return f"sidecar {meta_name}: {e}"
        _append_shard(manifest, _shard_entry(meta))
        n += 1
    return None


def _plan_existing(out: Path, identity: dict, n_layers: int, resume: bool, overwrite: bool,
                   verify: str) -> tuple[dict | None, list[str], list[tuple[dict, str]], dict]:
    """Decide what to do with ``out`` before any work; deletes nothing.

    Returns ``(manifest, delete, bad, info)``: the manifest to continue (None: start a
    fresh cache), the names of files to delete (the atomic writer's leftovers of this
    module's files; the partial files of the one shard a killed run was writing; with
    ``overwrite`` every file of the cache), the committed shards failing verification
    (with the reason), and ``{"adopted": n, "rebuilt": bool}``.

    Raises ValueError naming ``out_dir`` for a folder holding another cache or unrelated
    files, for shard files that are neither committed nor provably leftovers (with how to
    recover), and for an existing cache with ``resume=False``."""
    if not out.exists():
        return None, [], [], {}
    names = sorted(p.name for p in out.iterdir())
    strangers = [n for n in names if not _own_file(n)]
    own = [n for n in names if _own_file(n) and n != LOCK_NAME]
    has_manifest = MANIFEST_NAME in names
    if strangers and not has_manifest:
        raise ValueError(
            f"out_dir={str(out)!r}: not empty and holds no activation cache "
            f"(found {strangers[:3]}); expected an empty or new folder"
        )
    if overwrite:
        return None, own, [], {}
    temps = [n for n in names if _own_temp(n)]
    by_index: dict[int, list[str]] = {}
    for n in names:
        m = _SHARD_FILE.match(n)
        if m:
            by_index.setdefault(int(m.group(1)), []).append(n)
    if has_manifest:
        manifest = read_manifest(out)
        bad_ident = _identity_mismatch(out, "cache", manifest, identity)
        if bad_ident:
            raise ValueError(
                f"out_dir={str(out)!r}: holds the cache of another model or setting "
                f"({bad_ident}); expected an empty folder or a cache made with the same "
                f"arguments (overwrite=True deletes it and starts over)"
            )
        if not resume:
            raise ValueError(
                f"out_dir={str(out)!r}: already holds a cache with {len(manifest['shards'])} "
                f"shards; pass resume=True to continue it, overwrite=True to delete it and "
                f"start over, or choose an empty folder"
            )
        bad = []
        for shard in manifest["shards"]:
            try:
                verify_shard(out, manifest, shard, verify)
            except (ValueError, FileNotFoundError) as e:
                bad.append((shard, str(e)))
        n0 = len(manifest["shards"])
        why = _adopt_sidecars(out, manifest, by_index, identity, verify)
        n = len(manifest["shards"])
        beyond = sorted(i for i in by_index if i >= n)
        partial = []
        if beyond == [n] and shard_meta_name(n) not in by_index[n]:
            partial = by_index[n]  # the shard a killed run was writing: no sidecar yet
        elif beyond:
            raise ValueError(
                f"out_dir={str(out)!r}: files of shards {beyond} lie beyond the {n} shards "
                f"{MANIFEST_NAME} lists and do not continue it ({why}); expected at most the "
                f"partial files of shard {n} left by a killed run. Nothing was deleted: "
                f"move those files away and run again, or pass overwrite=True to delete the "
                f"whole cache and start over"
            )
        return manifest, temps + partial, bad, {"adopted": n - n0, "rebuilt": False}
    if not by_index:
        return None, temps, [], {}
    manifest = _new_manifest(identity, n_layers)
    why = _adopt_sidecars(out, manifest, by_index, identity, verify)
    if why is not None:
        n = len(manifest["shards"])
        left = sorted(i for i in by_index if i >= n)
        n_files = sum(len(v) for v in by_index.values())
        raise ValueError(
            f"out_dir={str(out)!r}: {MANIFEST_NAME} is missing and the shard files cannot "
            f"all be rebuilt into a cache: {why}. Nothing was deleted. To recover: restore "
            f"{MANIFEST_NAME} (e.g. from a backup); or move away the files of shards "
            f"{left[:5]}{' …' if len(left) > 5 else ''} and run again (the manifest is then "
            f"rebuilt from the {n} shards before them, whose sidecars verify); or pass "
            f"overwrite=True to delete all {n_files} shard files and start over"
        )
    if not resume:
        raise ValueError(
            f"out_dir={str(out)!r}: holds a cache of {len(manifest['shards'])} shards whose "
            f"{MANIFEST_NAME} is missing (rebuildable from the shard sidecars); pass "
            f"resume=True to rebuild and continue it, or overwrite=True to delete it"
        )
    return manifest, temps, [], {"adopted": len(manifest["shards"]), "rebuilt": True}


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


def _write_shard(out: Path, manifest: dict, buf: _ShardBuffer, index: int, first_text: int,
                 prev_chain: str, chain: str) -> dict:
    """Write the buffered rows as shard ``index`` (each file atomic), then its sidecar;
    return the shard's manifest entry. Nothing is committed until the manifest lists it."""
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
    entry = {"index": index, "n_tokens": buf.n_tokens, "n_texts": buf.n_texts,
             "first_text": first_text, "text_chain": chain, "files": files}
    meta = {"format": SHARD_META_FORMAT, **entry, "prev_chain": prev_chain,
            "identity": {k: _ident(manifest, k) for k in IDENTITY_FIELDS},
            "n_layers": manifest["n_layers"],
            "written": _dt.datetime.now(_dt.timezone.utc).isoformat()}
    write_shard_meta(out, meta)  # durable before the manifest names the shard
    return entry


def _commit_shard(out: Path, manifest: dict, buf: _ShardBuffer, chain: str) -> None:
    """Write the buffered shard (files, then sidecar), then commit it in the manifest."""
    entry = _write_shard(out, manifest, buf, len(manifest["shards"]),
                         manifest["source"]["texts_consumed"],
                         manifest["source"]["text_chain"], chain)
    _append_shard(manifest, entry)
    write_manifest(out, manifest)  # the commit point
    buf.reset()


def _delete(out: Path, names: Iterable[str]) -> None:
    """Delete the named files of ``out`` (own files only; a name vanished meanwhile is fine)."""
    for name in names:
        if not _own_file(name) or name == LOCK_NAME:  # never anything else
            raise AssertionError(f"refusing to delete {name!r}: not a file of the cache")
        with contextlib.suppress(FileNotFoundError):
            (out / name).unlink()


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
    overwrite: bool = False,
    verify: str = "full",
    recache_corrupt: bool = False,
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
      resume: continue an existing cache of the same run in ``out_dir`` (its committed
        shards are verified first; a lost ``manifest.json`` is rebuilt from the shard
        sidecars when every one of them verifies).
      overwrite: delete the cache already in ``out_dir`` (its own files only: manifest,
        shards, sidecars, temporary files) and start over. Without it nothing that is or
        may be cache data is ever deleted; only the atomic writer's temporary files and
        the partial files of the one shard a killed run was writing are removed.
      verify: how resume checks the committed shards: ``"full"`` (size, ``.npy`` header
        and sha256 of every file; default) or ``"size"`` (size and header only).
      recache_corrupt: on resume, re-cache committed shards that fail verification from
        their own texts instead of raising.
      progress: show a tqdm bar (texts, with tokens/s and ETA).

    Returns:
      The final manifest (dict); ``manifest["complete"]`` is True once the source is
      exhausted.

    Raises (all before the model is run):
      TypeError / ValueError naming the argument for bad arguments (layer out of range,
      context_length <= 0, empty corpus, folder holding another model's cache, shard files
      that are not committed and not provably leftovers, committed shards failing
      verification, …); FileNotFoundError for an unknown model path or name, or missing
      text path; :class:`CacheLockedError` while another writer holds ``cache.lock``.
    """
    for flag, v in (("resume", resume), ("overwrite", overwrite),
                    ("recache_corrupt", recache_corrupt)):
        if not isinstance(v, (bool, np.bool_)):
            raise TypeError(f"{flag}={v!r}: expected a bool")
    if verify not in ("full", "size"):
        raise ValueError(f"verify={verify!r}: expected 'full' or 'size'")
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
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir={str(out)!r}: exists and is not a folder")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    lock = _CacheLock(out)
    try:
        lock.acquire()  # before reading the folder: one writer at a time
        return _cache_locked(
            out, identity, n_layers, resume=resume, overwrite=overwrite, verify=verify,
            recache_corrupt=recache_corrupt, source=source, text_iter=text_iter, name=name,
            revision=revision, trust_remote_code=trust_remote_code, model_dtype=model_dtype,
            model_kwargs=model_kwargs, torch_device=torch_device, tok=tok,
            special_ids=special_ids, max_texts=max_texts, max_tokens=max_tokens,
            progress=progress)
    finally:  # also on exceptions and KeyboardInterrupt
        lock.release()
        if created and not any(out.iterdir()):
            with contextlib.suppress(OSError):
                out.rmdir()  # a failed fresh run leaves no empty folder behind


def _cache_locked(out: Path, identity: dict, n_layers: int, *, resume, overwrite, verify,
                  recache_corrupt, source, text_iter, name, revision, trust_remote_code,
                  model_dtype, model_kwargs, torch_device, tok, special_ids, max_texts,
                  max_tokens, progress) -> dict:
    """The part of :func:`cache_activations` that runs while ``cache.lock`` is held."""
    layers, dtype = identity["layers"], identity["dtype"]
    context_length, batch_size = identity["context_length"], identity["batch_size"]
    tokens_per_shard = identity["tokens_per_shard"]
    manifest, delete, bad, info = _plan_existing(out, identity, n_layers, resume, overwrite,
                                                 verify)
    if bad and not recache_corrupt:
        detail = "; ".join(msg for _, msg in bad[:3])
        raise ValueError(
            f"out_dir={str(out)!r}: {len(bad)} committed shard(s) fail verification "
            f"(verify={verify!r}): {detail}; expected intact shard files. Pass "
            f"recache_corrupt=True to re-cache those shards from the same texts, or "
            f"overwrite=True to delete the cache and start over"
        )
    if manifest is None:
        manifest = _new_manifest(identity, n_layers)
    # Skip (and re-hash) the texts that committed shards consumed; keep those of shards to
    # re-cache.
    consumed = manifest["source"]["texts_consumed"]
    redo = {s["index"]: (s["first_text"], s["first_text"] + s["n_texts"]) for s, _ in bad}
    redo_texts: dict[int, list[str]] = {i: [] for i in redo}
    chain = CHAIN_START
    for k, t in enumerate(itertools.islice(text_iter, consumed)):
        for i, (lo, hi) in redo.items():
            if lo <= k < hi:
                redo_texts[i].append(t)
        chain = chain_hash(chain, t)
    if chain != manifest["source"]["text_chain"]:
        raise ValueError(
            f"texts: the first {consumed} texts differ from those the cache in "
            f"out_dir={str(out)!r} consumed (hash chain mismatch); expected the same source "
            f"in the same order"
        )

    # ------------------------------------------------------------------ heavy set-up
    _delete(out, delete)
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
    run = {"started": _dt.datetime.now(_dt.timezone.utc).isoformat(),
           "start_text": consumed, "start_shard": len(manifest["shards"])}
    if info.get("rebuilt"):
        run["rebuilt_manifest_from_sidecars"] = info["adopted"]
    elif info.get("adopted"):
        run["adopted_shards_from_sidecars"] = info["adopted"]
    manifest["runs"].append(run)

    capture = _Capture(net, blocks, layers)

    def encode(batch: list, text_idx: int, buf: _ShardBuffer) -> int:
        """Run one batch and add its rows to ``buf``; returns the rows added."""
        for j, t in enumerate(batch):
            if not isinstance(t, str):
                raise TypeError(f"texts: element {text_idx + j} is "
                                f"{type(t).__name__}, expected str")
        enc = tok(batch, truncation=True, max_length=context_length, padding=True,
                  return_tensors="pt")
        ids = enc["input_ids"].to(torch_device)
        att = enc["attention_mask"].to(torch_device)
        hs = capture.run(ids, att)
        if torch_device.type == "cuda":
            torch.cuda.synchronize(torch_device)
        keep = att.bool()
        if len(special_ids):
            keep &= ~torch.isin(ids, special_t)
        b, T = ids.shape
        pos = torch.arange(T, device=torch_device).expand(b, T)
        tix = (torch.arange(b, device=torch_device) + text_idx)[:, None].expand(b, T)
        acts = {l: _to_storage(hs[l][keep], dtype) for l in layers}
        buf.add(acts, ids[keep].cpu().numpy(), pos[keep].cpu().numpy(),
                tix[keep].cpu().numpy(), len(batch))
        return int(keep.sum())

    try:
        with torch.inference_mode():
            if redo:  # re-cache corrupted shards from their own texts, same batches
                for i in sorted(redo):
                    _recache_shard(out, manifest, i, redo_texts[i], batch_size, layers, encode)
                manifest["runs"][-1]["recached_shards"] = sorted(redo)
            write_manifest(out, manifest)  # a cache has a manifest before its first shard
            return _cache_loop(out, manifest, text_iter, encode, source=source, name=name,
                               consumed=consumed, chain=chain, layers=layers,
                               batch_size=batch_size, tokens_per_shard=tokens_per_shard,
                               max_texts=max_texts, max_tokens=max_tokens, progress=progress)
    finally:
        capture.close()


def _recache_shard(out: Path, manifest: dict, index: int, texts: list, batch_size: int,
                   layers, encode) -> None:
    """Rewrite shard ``index`` from its texts (its own batches), update its manifest entry
    and sidecar, and commit."""
    entry = manifest["shards"][index]
    buf = _ShardBuffer(layers)
    first = entry["first_text"]
    for j in range(0, len(texts), batch_size):
        encode(texts[j:j + batch_size], first + j, buf)
    if buf.n_tokens != entry["n_tokens"] or buf.n_texts != entry["n_texts"]:
        raise ValueError(
            f"shard {index}: re-cached {buf.n_tokens} rows from {buf.n_texts} texts, the "
            f"manifest says {entry['n_tokens']} from {entry['n_texts']}; cannot repair it "
            f"(pass overwrite=True to start over)"
        )
    prev = manifest["shards"][index - 1]["text_chain"] if index else CHAIN_START
    manifest["shards"][index] = _write_shard(out, manifest, buf, index, first, prev,
                                             entry["text_chain"])
    write_manifest(out, manifest)


def _cache_loop(out: Path, manifest: dict, text_iter, encode, *, source, name, consumed, chain,
                layers, batch_size, tokens_per_shard, max_texts, max_tokens, progress) -> dict:
    """Cache the remaining texts, committing a shard every ``tokens_per_shard`` rows."""
    limit_texts = None if max_texts is None else max(0, max_texts - consumed)
    if limit_texts is not None:
        text_iter = itertools.islice(text_iter, limit_texts)
    total = source.length if max_texts is None else (
        max_texts if source.length is None else min(max_texts, source.length))
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=consumed, unit="text", disable=not progress,
               desc=f"caching {Path(name).name}", dynamic_ncols=True)
    buf = _ShardBuffer(layers)
    t0, run_tokens, t_forward = time.perf_counter(), 0, 0.0
    text_idx = consumed
    exhausted = False
    try:
        while True:
            if max_tokens is not None and manifest["n_tokens"] + buf.n_tokens >= max_tokens:
                break
            batch = list(itertools.islice(text_iter, batch_size))
            if not batch:
                exhausted = limit_texts is None or text_idx - consumed < limit_texts
                break
            tf = time.perf_counter()
            n_new = encode(batch, text_idx, buf)
            t_forward += time.perf_counter() - tf
            for t in batch:
                chain = chain_hash(chain, t)
            text_idx += len(batch)
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
        bar.close()
    return manifest
