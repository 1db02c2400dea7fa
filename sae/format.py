"""On-disk format of the activation cache: layout, names, dtypes, manifest, verification.

Layout of a cache folder ``out_dir``::

    manifest.json                      # the commit point (written last, atomically)
    shard_000000.layer_003.npy         # (n_tokens_0, d_model) activations after block 3
    shard_000000.token_ids.npy         # (n_tokens_0,) int32 token id of each row
    shard_000000.positions.npy         # (n_tokens_0,) int32 position in its sequence
    shard_000000.text_index.npy        # (n_tokens_0,) int64 index of its text in the source
    shard_000000.json                  # the shard's own record (sidecar, see below)
    shard_000001....

Every file is plain ``.npy`` (memory-mappable with ``np.load(mmap_mode="r")``), written by
:mod:`sae._atomic` (temporary name, fsync, rename, fsync of the folder). A shard exists only
once ``manifest.json`` lists it with the sha256 and size of each of its files.

Each shard also carries a sidecar ``shard_######.json`` (:func:`write_shard_meta`), written
atomically after its ``.npy`` files and before the manifest commit: its index, rows, texts
(first text, hash chain before and after it), the sha256 and size of each file, and the
identity of the run that wrote it. A lost manifest can be rebuilt from verified sidecars
(:mod:`sae.cache`); readers use only the manifest.
``bfloat16`` activations are stored as their raw 16-bit patterns (``uint16`` on disk, dtype
``"bfloat16"`` in the manifest) and viewed as ``ml_dtypes.bfloat16`` on read
(:func:`view_activations`).

Needs only numpy (and ml_dtypes for bfloat16 caches).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from sae._atomic import atomic_write_bytes

__all__ = [
    "FORMAT",
    "MANIFEST_NAME",
    "STORAGE_DTYPES",
    "layer_key",
    "read_manifest",
    "read_shard_meta",
    "shard_file_name",
    "shard_meta_name",
    "verify_cache",
    "verify_shard",
    "view_activations",
    "write_manifest",
    "write_shard_meta",
]

MANIFEST_NAME = "manifest.json"
FORMAT = "sae.activations/1"
SHARD_META_FORMAT = "sae.activations.shard/1"
#: fields every shard sidecar holds
SHARD_META_FIELDS = ("format", "index", "n_tokens", "n_texts", "first_text", "prev_chain",
                     "text_chain", "files", "identity", "n_layers")
#: manifest dtype name -> dtype of the activation files on disk
STORAGE_DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"),
                  "bfloat16": np.dtype("<u2")}
VERIFY_LEVELS = ("full", "size", "none")
#: the per-row token fields of a shard and their dtypes on disk
TOKEN_FIELDS = {"token_ids": np.dtype("<i4"), "positions": np.dtype("<i4"),
                "text_index": np.dtype("<i8")}


def shard_file_name(index: int, key: str) -> str:
    """File name of one array of shard ``index``; ``key`` is ``layer_###`` or a token field."""
    return f"shard_{index:06d}.{key}.npy"


def shard_meta_name(index: int) -> str:
    """File name of the sidecar of shard ``index``: ``shard_######.json``."""
    return f"shard_{index:06d}.json"


def write_shard_meta(out_dir: str | os.PathLike, meta: dict, *, sync_dir: bool = True) -> dict:
    """Atomically write the sidecar of shard ``meta["index"]``; returns its
    ``{"file", "sha256", "bytes"}``."""
    data = json.dumps(meta, indent=1, sort_keys=True).encode()
    name = shard_meta_name(meta["index"])
    atomic_write_bytes(Path(out_dir) / name, data, sync_dir=sync_dir)
    return {"file": name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def read_shard_meta(path: str | os.PathLike) -> dict:
    """Load and sanity-check one shard sidecar (``shard_######.json``).

    Raises:
      ValueError naming the file: unreadable JSON, unknown format, a missing field, or an
      index that does not match the file name.
    """
    p = Path(path)
    try:
        meta = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"shard sidecar {p.name}: unreadable: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != SHARD_META_FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"shard sidecar {p.name}: format {got!r}, expected "
                         f"{SHARD_META_FORMAT!r}")
    missing = [k for k in SHARD_META_FIELDS if k not in meta]
    if missing:
        raise ValueError(f"shard sidecar {p.name}: lacks the fields {missing}")
    if not isinstance(meta["index"], int) or shard_meta_name(meta["index"]) != p.name:
        raise ValueError(f"shard sidecar {p.name}: index {meta['index']!r} does not match "
                         f"its file name")
    return meta


def layer_key(layer: int) -> str:
    """Manifest key of the activations of block ``layer``: ``"layer_###"``."""
    return f"layer_{layer:03d}"


def view_activations(a: np.ndarray, dtype_name: str) -> np.ndarray:
    """The stored array ``a`` viewed as the manifest dtype ``dtype_name`` (no copy):
    ``uint16`` bit patterns become ``ml_dtypes.bfloat16`` for ``"bfloat16"``."""
    if dtype_name == "bfloat16":
        import ml_dtypes

        return a.view(ml_dtypes.bfloat16)
    return a


def write_manifest(out_dir: str | os.PathLike, manifest: dict) -> None:
    """Atomically (re)write ``manifest.json`` of ``out_dir`` — the commit point of the cache."""
    data = json.dumps(manifest, indent=1, sort_keys=True).encode()
    atomic_write_bytes(Path(out_dir) / MANIFEST_NAME, data)


def read_manifest(path: str | os.PathLike) -> dict:
    """Load and sanity-check ``manifest.json`` of the cache folder ``path``.

    Raises:
      FileNotFoundError: no such folder or no manifest in it.
      ValueError: unreadable manifest or unknown format.
    """
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"path={str(path)!r}: no such cache folder")
    mf = p / MANIFEST_NAME
    if not mf.is_file():
        raise FileNotFoundError(
            f"path={str(path)!r}: no {MANIFEST_NAME} (not an activation cache, or no shard "
            f"committed yet)"
        )
    try:
        manifest = json.loads(mf.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"path={str(path)!r}: unreadable {MANIFEST_NAME}: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(f"path={str(path)!r}: manifest format {got!r}, expected {FORMAT!r}")
    for key in ("layers", "d_model", "dtype", "shards"):
        if key not in manifest:
            raise ValueError(f"path={str(path)!r}: manifest lacks the field {key!r}")
    return manifest


def _sha256_file(path: Path, chunk: int = 1 << 23) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(chunk)
        mv = memoryview(buf)
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(mv[:n])
    return h.hexdigest()


def expected_arrays(manifest: dict, shard: dict) -> dict[str, tuple[tuple, np.dtype]]:
    """Shape and on-disk dtype of every file of one shard, by manifest key."""
    n, d = int(shard["n_tokens"]), int(manifest["d_model"])
    act = STORAGE_DTYPES[manifest["dtype"]]
    out = {layer_key(l): ((n, d), act) for l in manifest["layers"]}
    out.update({k: ((n,), dt) for k, dt in TOKEN_FIELDS.items()})
    return out


def verify_cache(path: str | os.PathLike, verify: str = "full") -> dict:
    """Check that every shard the manifest lists is present and intact; return the manifest.

    Args:
      verify: ``"full"`` (size, .npy header, sha256 of every file), ``"size"`` (size and
        header only: catches missing and truncated files) or ``"none"``.

    Raises:
      FileNotFoundError: missing manifest or shard file.
      ValueError: truncated file, header (shape/dtype) not matching the manifest, or a
        checksum mismatch (corrupted file).
    """
    if verify not in VERIFY_LEVELS:
        raise ValueError(f"verify={verify!r}: expected one of {VERIFY_LEVELS}")
    manifest = read_manifest(path)
    if manifest["dtype"] not in STORAGE_DTYPES:
        raise ValueError(f"path={str(path)!r}: manifest dtype {manifest['dtype']!r} unknown, "
                         f"expected one of {tuple(STORAGE_DTYPES)}")
    if verify == "none":
        return manifest
    root = Path(path)
    for shard in manifest["shards"]:
        verify_shard(root, manifest, shard, verify)
    return manifest


def verify_shard(root: str | os.PathLike, manifest: dict, shard: dict,
                 verify: str = "full") -> None:
    """Check the files of one shard entry (``{"index", "n_tokens", "files"}``) against
    ``manifest`` (``layers``, ``d_model``, ``dtype``): present, right size and ``.npy``
    header, and with ``verify="full"`` the sha256. Raises as :func:`verify_cache`, naming
    the shard and the file."""
    if verify not in VERIFY_LEVELS:
        raise ValueError(f"verify={verify!r}: expected one of {VERIFY_LEVELS}")
    if verify == "none":
        return
    expected = expected_arrays(manifest, shard)
    if set(shard["files"]) != set(expected):
        raise ValueError(
            f"shard {shard['index']}: manifest lists files {sorted(shard['files'])}, "
            f"expected {sorted(expected)}"
        )
    for key, (shape, dtype) in expected.items():
        _verify_file(Path(root), shard["index"], shard["files"][key], shape, dtype, verify)


def _verify_file(root: Path, index: int, info: dict, shape: tuple, dtype: np.dtype,
                 verify: str) -> None:
    f = root / info["file"]
    if not f.is_file():
        raise FileNotFoundError(f"shard {index}: missing file {f}")
    size = f.stat().st_size
    if size != info["bytes"]:
        raise ValueError(
            f"shard {index}: file {f.name} has {size} bytes, manifest says "
            f"{info['bytes']} ({'truncated' if size < info['bytes'] else 'too long'})"
        )
    try:
        mm = np.load(f, mmap_mode="r")
    except ValueError as e:
        raise ValueError(f"shard {index}: unreadable .npy {f.name}: {e}") from e
    if mm.shape != shape or mm.dtype != dtype:
        raise ValueError(
            f"shard {index}: file {f.name} holds {mm.shape} {mm.dtype}, "
            f"manifest expects {shape} {dtype}"
        )
    del mm
    if verify == "full":
        digest = _sha256_file(f)
        if digest != info["sha256"]:
            raise ValueError(
                f"shard {index}: checksum mismatch in {f.name} (sha256 "
                f"{digest[:16]}…, manifest {info['sha256'][:16]}…): file corrupted"
            )
