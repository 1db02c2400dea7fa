"""Load / save SAE weights: Gemma Scope ``params.npz`` and the SAELens folder layout
(``sae_weights.safetensors`` + ``cfg.json``). Every file is written atomically by
:func:`sae._atomic.atomic_write_bytes` (temporary name in the same folder, fsync,
``os.replace``, fsync of the folder); in the SAELens layout cfg.json is written last and is
the commit point.

Params are plain dicts of numpy arrays in the Gemma Scope layout:
    W_enc (d, M), W_dec (M, d), b_enc (M,), b_dec (d,), threshold (M,)
"""
from __future__ import annotations

import io as _io
import json
import os

import numpy as np

from sae._atomic import atomic_write_bytes  # the one atomic writer (re-exported)

__all__ = [
    "atomic_write_bytes",
    "load_gemmascope",
    "load_saelens",
    "save_gemmascope",
    "save_saelens",
    "validate_params",
]

KEYS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")


def validate_params(params: dict) -> tuple[int, int]:
    """Check keys and shapes; return (d, M). Raises ValueError naming the offending entry."""
    missing = [k for k in KEYS if k not in params]
    if missing:
        raise ValueError(f"params is missing {missing}; expected keys {KEYS}")
    W_enc = np.asarray(params["W_enc"])
    if W_enc.ndim != 2:
        raise ValueError(f"W_enc must be (d, M), got shape {W_enc.shape}")
    d, M = W_enc.shape
    want = {"W_dec": (M, d), "b_enc": (M,), "b_dec": (d,), "threshold": (M,)}
    for k, s in want.items():
        if np.shape(params[k]) != s:
            raise ValueError(f"{k} must have shape {s} to match W_enc {W_enc.shape}, got "
                             f"{np.shape(params[k])}")
    return d, M


def save_gemmascope(path: str, params: dict) -> str:
    """Write a Gemma Scope ``params.npz`` (keys W_enc, W_dec, b_enc, b_dec, threshold)."""
    validate_params(params)
    buf = _io.BytesIO()
    np.savez(buf, **{k: np.asarray(params[k]) for k in KEYS})
    atomic_write_bytes(path, buf.getvalue())
    return path


def load_gemmascope(path: str, dtype=None) -> dict:
    """Read a Gemma Scope ``params.npz`` into a dict of numpy arrays."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no Gemma Scope params file at {path!r}")
    with np.load(path) as z:
        out = {k: np.asarray(z[k]) for k in KEYS if k in z}
        if "threshold" not in out and "log_threshold" in z:
            out["threshold"] = np.exp(z["log_threshold"])
    validate_params(out)
    return {k: v.astype(dtype) for k, v in out.items()} if dtype else out


def save_saelens(folder: str, params: dict, *, apply_b_dec_to_input: bool = True,
                 architecture: str = "jumprelu", extra_cfg: dict | None = None) -> str:
    """Write the SAELens layout: ``folder/sae_weights.safetensors`` then ``folder/cfg.json``."""
    from safetensors.numpy import save as st_save

    d, M = validate_params(params)
    arrays = {k: np.ascontiguousarray(np.asarray(params[k])) for k in KEYS}
    dtype = str(arrays["W_enc"].dtype)
    cfg = {"architecture": architecture, "d_in": d, "d_sae": M, "dtype": dtype,
           "apply_b_dec_to_input": bool(apply_b_dec_to_input),
           "normalize_activations": "none", "device": "cpu"}
    cfg.update(extra_cfg or {})
    os.makedirs(folder, exist_ok=True)
    atomic_write_bytes(os.path.join(folder, "sae_weights.safetensors"), st_save(arrays))
    atomic_write_bytes(os.path.join(folder, "cfg.json"),
                       json.dumps(cfg, indent=2, sort_keys=True).encode())
    return folder


def load_saelens(folder: str) -> tuple[dict, dict]:
    """Read a SAELens folder → (params dict, cfg dict). Accepts ``log_threshold``."""
    from safetensors.numpy import load_file

    wpath = os.path.join(folder, "sae_weights.safetensors")
    cpath = os.path.join(folder, "cfg.json")
    for p in (wpath, cpath):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"SAELens folder {folder!r} lacks {os.path.basename(p)}")
    with open(cpath) as fh:
        cfg = json.load(fh)
    w = load_file(wpath)
    if "threshold" not in w and "log_threshold" in w:
        w["threshold"] = np.exp(w.pop("log_threshold"))
    params = {k: np.asarray(w[k]) for k in KEYS if k in w}
    d, M = validate_params(params)
    if cfg.get("d_in", d) != d or cfg.get("d_sae", M) != M:
        raise ValueError(f"cfg.json says d_in={cfg.get('d_in')}, d_sae={cfg.get('d_sae')} but "
                         f"the weights are d={d}, M={M}")
    return params, cfg
