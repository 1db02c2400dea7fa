"""Text sources for the activation cache: a deterministic, resumable stream of strings.

Every source the cache accepts is normalised to a :class:`TextSource`: a description that
goes into the manifest, a factory that re-creates the stream *from the start in the same
order* (needed to resume a run), and, where known, the number of texts.

Sources
-------
- ``None`` or ``"default"``: :func:`default_corpus` — docstrings of the Python standard
  library, parsed with :mod:`ast` (nothing is imported), files in sorted order. It exists
  offline on every machine; its fingerprint includes the Python version, because a different
  standard library is a different corpus.
- a path (``str`` / ``os.PathLike``) to a text file or a folder: :func:`local_texts`.
- ``"hf:<dataset>[:<config>][@<split>]"`` or :func:`hf_dataset`: a Hugging Face dataset,
  streamed; ``datasets`` is imported only then.
- any other iterable of strings (list, tuple, generator). A one-shot generator cannot be
  re-created, so an interrupted run over a generator resumes only if the caller passes an
  equal generator again (the text-prefix hash in the manifest checks that it is equal).

The fingerprint of what was consumed is a hash chain over texts
(:func:`chain_hash`): ``h_i = sha256(h_{i-1} || sha256(text_i))``. The manifest records
the chain value after every committed shard, so a resumed run verifies that the texts it
skips are exactly the texts the earlier run consumed.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jaxsense._checks import check_positive_int

__all__ = [
    "CHAIN_START",
    "TextSource",
    "as_text_source",
    "chain_hash",
    "default_corpus",
    "hf_dataset",
    "local_texts",
]

#: Initial value of the text hash chain (hash of zero texts).
CHAIN_START = hashlib.sha256(b"sae.corpus.chain/1").hexdigest()

_TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text", ".jsonl")
_SKIP_STDLIB_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib",
                     "lib2to3", "__pycache__", "turtledemo", "ensurepip"}


@dataclass(frozen=True)
class TextSource:
    """A re-creatable, ordered stream of texts.

    Attributes:
      description: JSON-serialisable dict identifying the source (goes into the manifest).
      factory: zero-argument callable returning a fresh iterator over the texts, in order.
      length: number of texts if known, else ``None``.
    """

    description: dict
    factory: Callable[[], Iterator[str]] = field(repr=False)
    length: int | None = None

    def __iter__(self) -> Iterator[str]:
        return iter(self.factory())


def chain_hash(prev: str, text: str) -> str:
    """One step of the text hash chain: ``sha256(prev || sha256(text))`` as hex."""
    inner = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
    return hashlib.sha256(prev.encode("ascii") + inner).hexdigest()


# ---------------------------------------------------------------------------- default corpus
def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames if d not in _SKIP_STDLIB_DIRS and not d.startswith(".")
        )
        files.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    return files


def _docstrings(path: Path, min_chars: int) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return []
    out = []
    # ast.walk is breadth-first over a deterministic tree: deterministic order.
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= min_chars:
                out.append(doc)
    return out


@functools.lru_cache(maxsize=4)
def _default_corpus_tuple(min_chars: int) -> tuple[str, ...]:
    texts: list[str] = []
    for p in _stdlib_files():
        texts.extend(_docstrings(p, min_chars))
    return tuple(texts)


def default_corpus(min_chars: int = 40) -> TextSource:
    """The embedded offline corpus: docstrings (≥ ``min_chars`` characters) of the Python
    standard library, in sorted-file, breadth-first-AST order. About 6.5k texts / 1.6M
    characters on CPython 3.11. Deterministic for a given Python version (recorded in the
    description)."""
    check_positive_int("min_chars", min_chars)
    texts = _default_corpus_tuple(min_chars)
    desc = {
        "kind": "default",
        "name": "python-stdlib-docstrings",
        "python": ".".join(map(str, sys.version_info[:3])),
        "min_chars": min_chars,
    }
    return TextSource(desc, lambda: iter(texts), len(texts))


# ---------------------------------------------------------------------------- local files
def _list_text_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(
        p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _TEXT_SUFFIXES
    )


def _read_file_texts(p: Path, text_field: str) -> Iterator[str]:
    if p.suffix.lower() == ".jsonl":
        with p.open(encoding="utf-8") as f:
            for i, line in enumerate(f):
                if line.strip():
                    rec = json.loads(line)
                    if not isinstance(rec, dict) or text_field not in rec:
                        raise ValueError(
                            f"{p}:{i + 1}: expected a JSON object with a {text_field!r} field"
                        )
                    yield rec[text_field]
    else:
        yield p.read_text(encoding="utf-8")


def local_texts(path: str | os.PathLike, text_field: str = "text") -> TextSource:
    """Texts from a local file or folder.

    A folder is walked recursively; files with suffix .txt/.md/.rst/.text/.jsonl are read in
    sorted path order. A plain file is one text; a .jsonl file gives one text per line (the
    ``text_field`` of each JSON object).

    Raises:
      FileNotFoundError: the path does not exist.
      ValueError: a folder holding no text files.
    """
    p = Path(path).expanduser().resolve()
    if not p.exists():
        raise FileNotFoundError(f"texts={str(path)!r}: no such file or folder")
    files = _list_text_files(p)
    if not files:
        raise ValueError(
            f"texts={str(path)!r}: folder holds no text files (expected {_TEXT_SUFFIXES})"
        )
    listing = hashlib.sha256(
        "\n".join(f"{f.relative_to(p) if p.is_dir() else f.name}:{f.stat().st_size}"
                  for f in files).encode()
    ).hexdigest()
    desc = {"kind": "local", "path": str(p), "n_files": len(files), "listing_sha256": listing}

    def factory() -> Iterator[str]:
        for f in files:
            yield from _read_file_texts(f, text_field)

    n = None if any(f.suffix.lower() == ".jsonl" for f in files) else len(files)
    return TextSource(desc, factory, n)


# ---------------------------------------------------------------------------- HF datasets
def hf_dataset(
    name: str, config: str | None = None, split: str = "train", text_field: str = "text",
    revision: str | None = None,
) -> TextSource:
    """A Hugging Face dataset, streamed (``datasets.load_dataset(..., streaming=True)``).

    ``datasets`` is imported lazily, when the stream is first created.

    Raises:
      ImportError: ``datasets`` is not installed (message says how to install it).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name={name!r}: expected a non-empty dataset name")
    try:
        import datasets  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"texts='hf:{name}' needs the `datasets` package: pip install datasets"
        ) from e
    desc = {"kind": "hf", "name": name, "config": config, "split": split,
            "text_field": text_field, "revision": revision}

    def factory() -> Iterator[str]:
        import datasets

        ds = datasets.load_dataset(name, config, split=split, streaming=True, revision=revision)
        for rec in ds:
            yield rec[text_field]

    return TextSource(desc, factory, None)


def _parse_hf_spec(spec: str) -> TextSource:
    body = spec[len("hf:"):].lstrip("/")
    split = "train"
    if "@" in body:
        body, split = body.rsplit("@", 1)
    name, _, config = body.partition(":")
    return hf_dataset(name, config or None, split)


# ---------------------------------------------------------------------------- dispatcher
def as_text_source(texts: Any) -> TextSource:
    """Normalise any accepted ``texts`` argument to a :class:`TextSource` (see module doc).

    Raises:
      TypeError: ``texts`` is not a path, a source spec or an iterable of strings.
      FileNotFoundError: a path that does not exist.
    """
    if isinstance(texts, TextSource):
        return texts
    if texts is None or (isinstance(texts, str) and texts == "default"):
        return default_corpus()
    if isinstance(texts, str) and texts.startswith("hf:"):
        return _parse_hf_spec(texts)
    if isinstance(texts, (str, os.PathLike)):
        return local_texts(texts)
    if isinstance(texts, (bytes, dict)) or not isinstance(texts, Iterable):
        raise TypeError(
            f"texts={type(texts).__name__}: expected None/'default', a path, "
            f"'hf:<dataset>[:<config>][@<split>]', or an iterable of str"
        )
    if isinstance(texts, (list, tuple)):
        seq = tuple(texts)
        return TextSource({"kind": "sequence", "type": type(texts).__name__},
                          lambda: iter(seq), len(seq))
    # A one-shot iterator/generator or another re-iterable container.
    it_obj = texts
    length = len(texts) if hasattr(texts, "__len__") else None
    return TextSource({"kind": "iterable", "type": type(texts).__name__},
                      lambda: iter(it_obj), length)
