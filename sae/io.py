"""Load / save SAE weights: Gemma Scope ``params.npz`` and the SAELens folder layout
(``sae_weights.safetensors`` + ``cfg.json``). Every file is written atomically by
:func:`sae._atomic.atomic_write_bytes` (temporary name in the same folder, fsync,
``os.replace``, fsync of the folder); in the SAELens layout cfg.json is written last and is
the commit point.

Params are plain dicts of numpy arrays in the Gemma Scope layout:
    W_enc (d, M), W_dec (M, d), b_enc (M,), b_dec (d,), threshold (M,)
used by ``sae.model.encode`` / ``decode``. Two conventions matter when moving them between
libraries, and each function below states which one it reads or writes:

* ``apply_b_dec_to_input``: π = (x − b_dec) W_enc + b_enc (True: ``sae.train``'s default and
  SAELens's) or π = x W_enc + b_enc (False: the Gemma Scope release, Lieberum et al. 2024,
  arXiv:2408.05147; SAELens's Gemma Scope loader sets ``apply_b_dec_to_input=False``). The
  two are converted exactly by b_enc ← b_enc ∓ b_dec W_enc.
* input normalisation: our params are always in the units of the raw activations. SAELens
  may store weights for scaled inputs (``normalize_activations="expected_average_only_in"``,
  scale c = √d / E‖x‖, kept in ``activation_scaler.json`` next to a training checkpoint);
  ``load_saelens`` folds c into the weights exactly as SAELens's
  ``SAE.fold_activation_norm_scaling_factor`` does (W_enc·c, W_dec/c, b_dec/c).

The SAELens file format followed here is that of SAELens 6.x (``SAE.save_model`` /
``SAE.load_from_disk``, https://github.com/decoderesearch/SAELens, ``sae_lens/saes/sae.py``):
cfg.json holds ``architecture`` ("jumprelu" | "topk" | "standard"), ``d_in``, ``d_sae``,
``dtype``, ``device``, ``apply_b_dec_to_input``, ``normalize_activations``,
``reshape_activations``, ``metadata`` and, for TopK, ``k`` and
``rescale_acts_by_decoder_norm``; the safetensors file holds exactly the module's state
dict: W_enc, W_dec, b_enc, b_dec, plus ``threshold`` for JumpReLU (older files:
``log_threshold``) and nothing else for TopK / standard. ``tests/test_saelens_interop.py``
checks both directions against the installed SAELens.
"""
from __future__ import annotations

import io as _io
import json
import os

import numpy as np

from sae._atomic import atomic_write_bytes  # the one atomic writer (re-exported)

__all__ = [
    "WeightsFileError",
    "atomic_write_bytes",
    "fold_b_dec_into_b_enc",
    "load_gemmascope",
    "load_saelens",
    "save_gemmascope",
    "save_saelens",
    "validate_params",
]

KEYS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
SAELENS_ARCHS = ("jumprelu", "topk", "standard")
SAELENS_DTYPES = ("float32", "float64", "float16")
# the cfg.json schema written by save_saelens (SAELens ≥ 6 reads a config without a version
# as a pre-6.0 one); recorded in metadata as SAELens itself does
SAELENS_SCHEMA_VERSION = "6.0.0"


def validate_params(params: dict) -> tuple[int, int]:
    """Check keys and shapes; return (d, M). Raises ValueError naming the offending entry."""
    if not isinstance(params, dict):
        raise TypeError(f"params must be a dict of arrays, got {type(params).__name__}")
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


def fold_b_dec_into_b_enc(params: dict, *, sign: int = -1) -> dict:
    """Switch the ``apply_b_dec_to_input`` convention of ``params`` exactly (in float64).

    (x − b_dec) W_enc + b_enc = x W_enc + (b_enc − b_dec W_enc), so ``sign=-1`` turns params
    for ``apply_b_dec_to_input=True`` into params for False (b_enc ← b_enc − b_dec W_enc) and
    ``sign=+1`` does the reverse. Shapes as in ``validate_params``; returns a new dict.
    """
    if sign not in (-1, 1):
        raise ValueError(f"sign={sign!r}: expected -1 or +1")
    validate_params(params)
    out = {k: np.asarray(v) for k, v in params.items()}
    b_enc = out["b_enc"]
    shift = np.asarray(out["b_dec"], np.float64) @ np.asarray(out["W_enc"], np.float64)
    out["b_enc"] = (np.asarray(b_enc, np.float64) + sign * shift).astype(b_enc.dtype)
    return out


def save_gemmascope(path: str, params: dict, *, apply_b_dec_to_input: bool = False) -> str:
    """Write a Gemma Scope ``params.npz`` (keys W_enc, W_dec, b_enc, b_dec, threshold).

    The Gemma Scope file convention is π = x W_enc + b_enc (no b_dec subtraction; SAELens's
    ``gemma_2_sae_huggingface_loader`` reads it with ``apply_b_dec_to_input=False``).
    ``apply_b_dec_to_input`` names the convention of ``params``: pass True for params from
    ``sae.train`` with its default config (``TrainConfig.apply_b_dec_to_input=True``), and
    b_dec W_enc is folded into b_enc before writing (``fold_b_dec_into_b_enc``); the default
    False writes the arrays unchanged.
    """
    validate_params(params)
    if not isinstance(apply_b_dec_to_input, bool):
        raise TypeError(f"apply_b_dec_to_input must be a bool, got {apply_b_dec_to_input!r}")
    if apply_b_dec_to_input:
        params = fold_b_dec_into_b_enc(params, sign=-1)
    buf = _io.BytesIO()
    np.savez(buf, **{k: np.asarray(params[k]) for k in KEYS})
    atomic_write_bytes(path, buf.getvalue())
    return path


class WeightsFileError(ValueError):
    """A weights / config file that cannot be parsed as the format it should be in."""


def _unreadable(path: str, what: str, err: Exception) -> WeightsFileError:
    first = (str(err).strip().splitlines() or [""])[0][:300]
    return WeightsFileError(f"{path}: not readable as {what} ({type(err).__name__}: {first})")


def _read_json(path: str, what: str) -> dict:
    """A JSON object from ``path``, or one WeightsFileError naming the file."""
    try:
        with open(path, "rb") as fh:
            obj = json.loads(fh.read().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise _unreadable(path, what, e) from e
    if not isinstance(obj, dict):
        raise _unreadable(path, what, TypeError(
            f"expected a JSON object, got {type(obj).__name__}"))
    return obj


def load_gemmascope(path: str, dtype=None, *, apply_b_dec_to_input: bool = False) -> dict:
    """Read a Gemma Scope ``params.npz`` into a dict of numpy arrays (``log_threshold`` is
    accepted and exponentiated).

    With the default ``apply_b_dec_to_input=False`` the arrays are returned as stored, for
    ``encode(params, x, apply_b_dec_to_input=False)`` (the Gemma Scope convention). With True,
    b_dec W_enc is added to b_enc so that ``encode(params, x)`` (default True) gives the same
    codes.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no Gemma Scope params file at {path!r}")
    try:
        z = np.load(path)  # allow_pickle=False: a pickle is refused, never executed
    except Exception as e:  # not .npy/.npz (pickle, text, truncated zip, …)
        raise _unreadable(path, "a Gemma Scope params.npz", e) from e
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise _unreadable(path, "a Gemma Scope params.npz", TypeError(
            f"it holds a single {type(z).__name__}, not an .npz archive of named arrays"))
    try:
        with z:
            out = {k: np.asarray(z[k]) for k in KEYS if k in z}
            if "threshold" not in out and "log_threshold" in z:
                out["threshold"] = np.exp(z["log_threshold"])
        validate_params(out)
    except Exception as e:  # corrupt member, pickled member, missing/mis-shaped arrays
        raise _unreadable(path, "a Gemma Scope params.npz", e) from e
    if apply_b_dec_to_input:
        out = fold_b_dec_into_b_enc(out, sign=+1)
    return {k: v.astype(dtype) for k, v in out.items()} if dtype else out


def save_saelens(folder: str, params: dict, *, apply_b_dec_to_input: bool = True,
                 architecture: str = "jumprelu", k: int | None = None,
                 extra_cfg: dict | None = None) -> str:
    """Write the SAELens 6.x layout: ``folder/sae_weights.safetensors`` then
    ``folder/cfg.json`` (the commit point), readable by SAELens's ``SAE.load_from_disk``.

    params: Gemma Scope layout (see ``validate_params``), in raw activation units, for the
      ``apply_b_dec_to_input`` convention given (written to cfg.json as is).
    architecture: "jumprelu" (writes ``threshold``) or "topk" (needs ``k``; ``threshold`` is
      not written — SAELens's TopKSAE has no such parameter and its loader is strict).
    extra_cfg: further top-level cfg.json entries (e.g. ``hook_name``); SAELens ignores keys
      that are not fields of its config class.
    The dtype written is that of W_enc (float32 / float64 / float16); every array is cast to
    it, as SAELens's loader does on reading.
    """
    from safetensors.numpy import save as st_save

    d, M = validate_params(params)
    if architecture not in ("jumprelu", "topk"):
        raise ValueError(f"architecture={architecture!r}: expected 'jumprelu' or 'topk'")
    if not isinstance(apply_b_dec_to_input, bool):
        raise TypeError(f"apply_b_dec_to_input must be a bool, got {apply_b_dec_to_input!r}")
    if architecture == "topk":
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= M:
            raise ValueError(f"k={k!r}: architecture='topk' needs an integer 1 <= k <= {M}")
    elif k is not None:
        raise ValueError(f"k={k!r}: only architecture='topk' takes k")
    if extra_cfg is not None and not isinstance(extra_cfg, dict):
        raise TypeError(f"extra_cfg must be a dict, got {type(extra_cfg).__name__}")
    dtype = np.asarray(params["W_enc"]).dtype
    if str(dtype) not in SAELENS_DTYPES:
        raise ValueError(f"params['W_enc'].dtype={dtype}: SAELens files hold one of "
                         f"{SAELENS_DTYPES}")
    names = KEYS if architecture == "jumprelu" else KEYS[:4]
    arrays = {n: np.ascontiguousarray(np.asarray(params[n]).astype(dtype, copy=False))
              for n in names}
    cfg = {"architecture": architecture, "d_in": d, "d_sae": M, "dtype": str(dtype),
           "device": "cpu", "apply_b_dec_to_input": apply_b_dec_to_input,
           "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"sae_lens_version": SAELENS_SCHEMA_VERSION,
                        "sae_lens_training_version": None}}
    if architecture == "topk":
        cfg["k"] = int(k)
        cfg["rescale_acts_by_decoder_norm"] = False
    cfg.update(extra_cfg or {})
    os.makedirs(folder, exist_ok=True)
    atomic_write_bytes(os.path.join(folder, "sae_weights.safetensors"), st_save(arrays))
    atomic_write_bytes(os.path.join(folder, "cfg.json"),
                       json.dumps(cfg, indent=2, sort_keys=True).encode())
    return folder


def _saelens_architecture(cfg: dict, weights: dict) -> tuple[str, int | None]:
    """(architecture, k) of a SAELens cfg.json, including pre-6.0 configs (no
    ``architecture``; TopK as ``activation_fn="topk"`` with ``activation_fn_kwargs.k``)."""
    arch = cfg.get("architecture")
    k = cfg.get("k")
    if arch is None:
        kw = cfg.get("activation_fn_kwargs") or {}
        if cfg.get("activation_fn", cfg.get("activation_fn_str")) == "topk" and "k" in kw:
            arch, k = "topk", kw["k"]
        elif "threshold" in weights or "log_threshold" in weights:
            arch = "jumprelu"
        else:
            arch = "standard"
    if arch not in SAELENS_ARCHS:
        raise ValueError(f"cfg.json architecture={arch!r}: load_saelens reads {SAELENS_ARCHS} "
                         f"(other SAELens architectures have no Gemma Scope-layout equivalent)")
    if arch == "topk" and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"cfg.json k={k!r}: a TopK SAE needs an integer k >= 1")
    return arch, (k if arch == "topk" else None)


def _saelens_scale(folder: str, cfg: dict, scaling_factor) -> float | None:
    """The input scale c to fold, or None. ``normalize_activations`` values that cannot be
    folded into weights raise ValueError."""
    mode = cfg.get("normalize_activations", "none")
    if isinstance(mode, bool) or mode is None:  # pre-6.0 configs stored a bool
        mode = "expected_average_only_in" if mode else "none"
    if mode == "none":
        if scaling_factor is not None:
            raise ValueError(f"scaling_factor={scaling_factor!r} given but cfg.json says "
                             f"normalize_activations='none'")
        return None
    if mode != "expected_average_only_in":
        raise ValueError(f"cfg.json normalize_activations={mode!r}: a per-input "
                         f"normalisation that a fixed params dict cannot represent; "
                         f"load_saelens reads 'none' and 'expected_average_only_in'")
    if scaling_factor is None:
        spath = os.path.join(folder, "activation_scaler.json")
        if os.path.isfile(spath):
            scaling_factor = _read_json(spath, "activation_scaler.json").get("scaling_factor")
    if scaling_factor is None:
        raise ValueError(f"cfg.json normalize_activations='expected_average_only_in' but no "
                         f"scaling factor: {folder!r} has no activation_scaler.json with one; "
                         f"pass scaling_factor= (for released SAEs: SAELens's "
                         f"pretrained_saes.yaml norm_scaling_factor)")
    c = float(scaling_factor)
    if not np.isfinite(c) or c <= 0:
        raise ValueError(f"scaling_factor={scaling_factor!r}: expected a finite number > 0")
    return c


def load_saelens(folder: str, *, scaling_factor: float | None = None) -> tuple[dict, dict]:
    """Read a SAELens folder → (params dict, cfg dict), with params in raw activation units
    for ``sae.model.encode(params, x, apply_b_dec_to_input=cfg["apply_b_dec_to_input"],
    k=cfg.get("k"))``.

    Reads what SAELens's ``SAE.save_model`` writes (6.x) and older files:
    * ``threshold`` or ``log_threshold`` (exponentiated); architecture "standard" (a ReLU
      SAE) becomes threshold 0, "topk" threshold zeros (unused, as ``TopKSAE.params()``);
    * TopK with ``rescale_acts_by_decoder_norm=True`` (SAELens's training default): the
      decoder row norms n are folded (W_enc·n, b_enc·n, W_dec/n, as SAELens's
      ``_fold_norm_topk``), which leaves its codes and reconstructions unchanged;
    * ``normalize_activations="expected_average_only_in"``: the scale c from
      ``scaling_factor`` or the folder's ``activation_scaler.json`` (a SAELens training
      checkpoint) is folded (W_enc·c, W_dec/c, b_dec/c), and the returned cfg says "none"
      plus ``folded_scaling_factor``;
    * θ < 0 is read as 0 (SAELens's JumpReLU applies ReLU before the threshold gate);
    * arrays are cast to cfg.json's ``dtype`` (float32 / float64 / float16), as SAELens does.
    Raises ValueError for cfg/weight mismatches and for what a params dict cannot represent
    (layer_norm / constant_norm_rescale / whitening inputs, other architectures, a
    non-trivial ``finetuning_scaling_factor``).
    """
    from safetensors.numpy import load_file

    wpath = os.path.join(folder, "sae_weights.safetensors")
    cpath = os.path.join(folder, "cfg.json")
    for p in (wpath, cpath):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"SAELens folder {folder!r} lacks {os.path.basename(p)}")
    cfg = _read_json(cpath, "a SAELens cfg.json")
    try:
        w = dict(load_file(wpath))
    except Exception as e:  # safetensors' own errors (header too large, truncated, …)
        raise _unreadable(wpath, "a SAELens sae_weights.safetensors", e) from e
    arch, k = _saelens_architecture(cfg, w)
    dtype = cfg.get("dtype", str(np.asarray(w["W_enc"]).dtype) if "W_enc" in w else "float32")
    dtype = str(dtype).removeprefix("torch.")
    if dtype not in SAELENS_DTYPES:
        raise ValueError(f"cfg.json dtype={cfg.get('dtype')!r}: load_saelens reads "
                         f"{SAELENS_DTYPES}")
    sf = w.pop("scaling_factor", w.pop("finetuning_scaling_factor", None))
    if sf is not None and not np.allclose(sf, 1.0):
        raise ValueError("sae_weights.safetensors has a finetuning scaling_factor != 1, which "
                         "load_saelens does not fold")
    if "threshold" not in w and "log_threshold" in w:
        w["threshold"] = np.exp(np.asarray(w.pop("log_threshold"), np.float64))
    if arch != "jumprelu":
        if "W_enc" not in w:
            raise ValueError(f"sae_weights.safetensors in {folder!r} has no W_enc")
        w["threshold"] = np.zeros((np.shape(w["W_enc"])[1],))
    params = {n: np.asarray(w[n]) for n in KEYS if n in w}
    d, M = validate_params(params)
    if cfg.get("d_in", d) != d or cfg.get("d_sae", M) != M:
        raise ValueError(f"cfg.json says d_in={cfg.get('d_in')}, d_sae={cfg.get('d_sae')} but "
                         f"the weights are d={d}, M={M}")
    if arch == "topk" and k > M:
        raise ValueError(f"cfg.json k={k} exceeds d_sae={M}")
    p64 = {n: np.asarray(v, np.float64) for n, v in params.items()}
    # SAELens's JumpReLU is ReLU(π)·1[π > θ] (its training keeps θ ≥ 0); sae.model's is
    # π·1[π > θ]. They agree for θ ≥ 0, and max(θ, 0) makes them agree for any θ.
    p64["threshold"] = np.maximum(p64["threshold"], 0.0)
    if arch == "topk" and cfg.get("rescale_acts_by_decoder_norm", False):
        n = np.maximum(np.linalg.norm(p64["W_dec"], axis=1), 1e-8)  # SAELens clamps at 1e-8
        p64["W_enc"] = p64["W_enc"] * n[None, :]
        p64["b_enc"] = p64["b_enc"] * n
        p64["W_dec"] = p64["W_dec"] / n[:, None]
    c = _saelens_scale(folder, cfg, scaling_factor)
    out_cfg = dict(cfg)
    out_cfg.update(architecture=arch, apply_b_dec_to_input=bool(
        cfg.get("apply_b_dec_to_input", True)), dtype=dtype)
    if arch == "topk":
        out_cfg.update(k=int(k), rescale_acts_by_decoder_norm=False)
    if c is not None:
        p64["W_enc"] = p64["W_enc"] * c
        p64["W_dec"] = p64["W_dec"] / c
        p64["b_dec"] = p64["b_dec"] / c
        out_cfg.update(normalize_activations="none", folded_scaling_factor=c)
    params = {n: v.astype(dtype) for n, v in p64.items()}
    return params, out_cfg
