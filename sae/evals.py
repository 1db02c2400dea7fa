"""Splice evaluation of an SAE inside a causal LM: CE loss recovered and KL.

For a causal LM, a block index l and an SAE x ↦ x̂(x) = decode(encode(x)), the model is run
three times on the same tokens, with a forward hook on the output of block l (the residual
stream that :func:`sae.cache.cache_activations` stores as "layer l", i.e.
``hidden_states[l + 1]``):

* clean:   unchanged;
* spliced: the block output h_t is replaced by x̂(h_t) at every kept position t;
* zero:    h_t is replaced by 0 at every kept position t (zero ablation).

With p(·|t) the next-token distribution at position t and y_{t+1} the actual next token,

    CE_run = mean_t −log p_run(y_{t+1} | t)
    ce_loss_recovered = (CE_zero − CE_spliced) / (CE_zero − CE_clean)
    kl_spliced = mean_t KL(p_clean(·|t) ‖ p_spliced(·|t))

("CE loss recovered" / "loss recovered" and the splice KL as in Bricken et al. 2023,
"Towards Monosemanticity", and Rajamanoharan et al. 2024, arXiv 2407.14435, §5: 1 for a
perfect reconstruction, 0 for one as bad as zero ablation.)

Positions. ``keep[b, t]`` = real token (attention mask) and, with ``exclude_special``, not
a BOS/EOS/PAD/CLS/SEP/MASK id — the same rows the activation cache stores and SAEs are
trained on. The SAE (and zero ablation) act only on kept positions; special positions keep
their clean activation. Means run over the predictions at positions t with ``keep[b, t]``
and a real next token at t + 1 (token-weighted over all texts).

The SAE runs in JAX on float32 numpy activations (torch → numpy → JAX → numpy → torch at
the hook). Importing this module does not import torch.

Also here: :func:`encoder_splice_eval` (the same splice into an encoder such as MiniLM,
scored by the change of the sentence embedding and of the last hidden state) and
:func:`core_metrics` (SAEBench's "core" evaluation under its metric names).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

import numpy as np

__all__ = ["core_metrics", "encoder_splice_eval", "splice_eval", "splice_eval_many",
           "whitened_sae"]


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def whitened_sae(params: Mapping, aip, *, k: int | None = None,
                 apply_b_dec_to_input: bool = True) -> tuple[Callable, Callable]:
    """(encode, decode) in activation coordinates for an SAE trained on whitened inputs
    z = x S̃^{1/2} (the atoms SAEs of Hu et al., *Towards atoms of LLMs*; see
    :func:`sae.atoms.whiten`):

        encode(x) = f(x S̃^{1/2}),   decode(f) = (f W_dec + b_dec) S̃^{-1/2}

    (the same un-whitening as :func:`sae.atoms.sae_units`). ``aip``: an
    :class:`sae.atoms.AIP` or a pair ``(S_half, S_inv_half)`` of (H, H) arrays."""
    import jax.numpy as jnp

    from sae.model import decode, encode

    if hasattr(aip, "S_half") and hasattr(aip, "S_inv_half"):
        s_half, s_inv_half = aip.S_half, aip.S_inv_half
    elif isinstance(aip, (tuple, list)) and len(aip) == 2:
        s_half, s_inv_half = aip
    else:
        raise TypeError(f"aip={type(aip).__name__}: expected an sae.atoms.AIP or a pair "
                        f"(S_half, S_inv_half) of (H, H) arrays")
    s_half = jnp.asarray(s_half, jnp.float32)
    s_inv_half = jnp.asarray(s_inv_half, jnp.float32)
    p = _as_jax_params(params, "params")
    H = p["W_dec"].shape[1]
    if s_half.shape != (H, H) or s_inv_half.shape != (H, H):
        raise ValueError(f"aip: S_half {s_half.shape} / S_inv_half {s_inv_half.shape}; "
                         f"expected ({H}, {H}) to match params['W_dec'] {p['W_dec'].shape}")

    def enc(x):
        return encode(p, jnp.asarray(x) @ s_half, k=k, apply_b_dec_to_input=apply_b_dec_to_input)

    def dec(f):
        return decode(p, f) @ s_inv_half

    return enc, dec


def _as_jax_params(params, name: str) -> dict:
    import jax.numpy as jnp

    missing = [key for key in ("W_enc", "W_dec", "b_enc", "b_dec") if key not in params]
    if missing:
        raise ValueError(f"{name}: missing {missing}; expected the keys W_enc (H, M), "
                         f"W_dec (M, H), b_enc (M,), b_dec (H,) and threshold (M,) or k")
    return {key: jnp.asarray(v, jnp.float32) for key, v in params.items()}


def _sae_fns(sae, k, apply_b_dec_to_input, H: int, arg: str = "sae"
             ) -> tuple[Callable, Callable]:
    """Normalise the accepted SAE forms to (encode(x (n, H)) → f, decode(f) → x̂ (n, H))."""
    if isinstance(sae, Mapping):
        from sae.model import decode, encode

        p = _as_jax_params(sae, arg)
        if p["W_dec"].ndim != 2 or p["W_dec"].shape[1] != H or p["W_enc"].shape[0] != H:
            raise ValueError(f"{arg}: W_enc {tuple(p['W_enc'].shape)}, W_dec "
                             f"{tuple(p['W_dec'].shape)}; expected (H, M) and (M, H) with the "
                             f"model's hidden size H = {H}")
        if k is None and "threshold" not in p:
            raise ValueError(f"{arg}: no 'threshold' (JumpReLU) and k=None; expected a "
                             f"threshold or k for a TopK SAE")
        return (lambda x: encode(p, x, k=k, apply_b_dec_to_input=apply_b_dec_to_input),
                lambda f: decode(p, f))
    if isinstance(sae, (tuple, list)) and len(sae) == 2 and all(map(callable, sae)):
        return sae[0], sae[1]
    if callable(getattr(sae, "encode", None)) and callable(getattr(sae, "decode", None)):
        return sae.encode, sae.decode
    raise TypeError(f"{arg}={type(sae).__name__}: expected a params dict (W_enc, W_dec, b_enc, "
                    f"b_dec, threshold), a pair (encode, decode) of callables, or an object "
                    f"with encode/decode methods")


class _Hook:
    """Forward hook on one block: records its output (mode None) or overwrites the kept
    positions with ``self.value`` ((n, H) tensor; mode "replace")."""

    def __init__(self):
        self.keep = self.value = self.captured = None
        self.replace = False

    def __call__(self, module, args, output):
        h = output[0] if isinstance(output, (tuple, list)) else output
        if not self.replace:
            self.captured = h
            return None
        new = h.clone()
        new[self.keep] = self.value.to(dtype=h.dtype, device=h.device)
        if isinstance(output, tuple):
            return (new,) + tuple(output[1:])
        if isinstance(output, list):
            return [new] + list(output[1:])
        return new


def splice_eval(model, tokenizer, texts: Iterable[str], layer: int, sae, *,
                k: int | None = None, apply_b_dec_to_input: bool = True, batch_size: int = 8,
                context_length: int = 128, exclude_special: bool | Iterable[int] = True,
                progress: bool = True) -> dict:
    """CE loss recovered and KL of splicing ``sae`` into block ``layer`` of a causal LM.

    Args:
      model: a transformers causal LM (``…ForCausalLM``: forward returns ``logits``), eval
        mode; it stays on its device.
      tokenizer: its tokenizer (right padding is used; pad = eos when it has none).
      texts: list (or iterable) of str; each is one sequence truncated to
        ``context_length`` tokens (the tokenizer's own special tokens included).
      layer: block index l, 0 <= l < num_hidden_layers (output of block l).
      sae: a params dict in the Gemma Scope layout (W_enc (H, M), W_dec (M, H), b_enc,
        b_dec, threshold; run with :func:`sae.model.encode` / :func:`sae.model.decode`,
        ``k`` for TopK), a pair ``(encode, decode)`` of callables on (n, H) / (n, M) arrays,
        or an object with ``encode``/``decode`` methods. Whitened (atoms) SAEs: wrap with
        :func:`whitened_sae`.
      batch_size: texts per forward pass (three passes per batch).
      exclude_special: True (default): BOS/EOS/PAD/CLS/SEP/MASK positions are neither
        spliced nor counted; False: all real tokens; or a set of token ids.
      progress: tqdm bar over batches.

    Returns: dict with ``ce_clean``, ``ce_spliced``, ``ce_zero`` (nats/token),
    ``ce_loss_recovered``, ``kl_spliced`` = mean KL(p_clean ‖ p_spliced), ``kl_zero``,
    ``r2`` = 1 − Σ‖x − x̂‖² / Σ‖x − x̄‖² of the spliced rows, ``n_tokens`` (counted
    predictions), ``n_spliced`` (rows passed through the SAE), ``n_texts``, ``layer``.

    Raises (before any forward pass): TypeError / ValueError naming the argument.
    """
    return splice_eval_many(model, tokenizer, texts, layer, {"sae": sae}, k=k,
                            apply_b_dec_to_input=apply_b_dec_to_input, batch_size=batch_size,
                            context_length=context_length, exclude_special=exclude_special,
                            progress=progress, _arg="sae")["sae"]


def splice_eval_many(model, tokenizer, texts: Iterable[str], layer: int, saes: Mapping, *,
                     k: int | None = None, apply_b_dec_to_input: bool = True,
                     batch_size: int = 8, context_length: int = 128,
                     exclude_special: bool | Iterable[int] = True, progress: bool = True,
                     _arg: str = "saes") -> dict:
    """:func:`splice_eval` for several SAEs of one layer, ``saes`` = {name: sae}: the clean
    and zero-ablated passes are shared (2 + len(saes) forward passes per batch). Returns
    {name: result dict of :func:`splice_eval`}."""
    import torch

    # ------------------------------------------------------------------ validation
    cfg = getattr(model, "config", None)
    if cfg is None or not callable(model):
        raise TypeError(f"model={type(model).__name__}: expected a transformers causal LM")
    get_out = getattr(model, "get_output_embeddings", None)
    if not callable(get_out) or get_out() is None:
        raise TypeError(f"model={type(model).__name__}: has no LM head; expected a causal LM "
                        f"(…ForCausalLM) whose forward returns logits")
    tcfg = cfg.get_text_config() if callable(getattr(cfg, "get_text_config", None)) else cfg
    n_layers, H = int(tcfg.num_hidden_layers), int(tcfg.hidden_size)
    if not _is_int(layer) or not 0 <= layer < n_layers:
        raise ValueError(f"layer={layer!r}: expected an int block index in [0, {n_layers - 1}]")
    for name, v in (("batch_size", batch_size), ("context_length", context_length)):
        if not _is_int(v) or v <= 0:
            raise ValueError(f"{name}={v!r}: expected a positive int")
    if k is not None and (not _is_int(k) or k <= 0):
        raise ValueError(f"k={k!r}: expected None or a positive int")
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Iterable):
        raise TypeError(f"texts={type(texts).__name__}: expected a list of str")
    texts = list(texts)
    if not texts:
        raise ValueError("texts=[]: expected at least one text")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise TypeError(f"texts: element {bad[0]} is {type(texts[bad[0]]).__name__}, "
                        f"expected str")
    if not isinstance(saes, Mapping) or not saes:
        raise TypeError(f"saes={type(saes).__name__}: expected a non-empty dict name → SAE")
    fns = {name: _sae_fns(s, k, apply_b_dec_to_input, H,
                          _arg if _arg == "sae" else f"saes[{name!r}]")
           for name, s in saes.items()}
    blocks, device, special_t = _prepare_model(model, tokenizer, n_layers, exclude_special)

    # ------------------------------------------------------------------ passes
    hook = _Hook()
    handle = blocks[layer].register_forward_hook(hook)
    shared = {"ce_clean": 0.0, "ce_zero": 0.0, "kl_zero": 0.0}
    per = {name: {"ce_spliced": 0.0, "kl_spliced": 0.0, "sse": 0.0} for name in fns}
    n_tok = n_rows = 0
    sum_x = np.zeros(H, np.float64)
    sum_x2 = 0.0
    from tqdm.auto import tqdm

    n_batches = math.ceil(len(texts) / batch_size)
    try:
        with torch.inference_mode():
            for b0 in tqdm(range(0, len(texts), batch_size), total=n_batches, unit="batch",
                           desc=f"splice layer {layer}", disable=not progress,
                           dynamic_ncols=True):
                enc = tokenizer(texts[b0:b0 + batch_size], truncation=True,
                                max_length=context_length, padding=True, return_tensors="pt")
                ids = enc["input_ids"].to(device)
                att = enc["attention_mask"].to(device).bool()
                keep = att.clone()
                if len(special_t):
                    keep &= ~torch.isin(ids, special_t)
                count = keep[:, :-1] & att[:, 1:]  # prediction at t of the token at t + 1
                if not bool(count.any()):
                    continue
                target = ids[:, 1:][count][:, None]

                def logprobs():
                    logits = model(input_ids=ids, attention_mask=att.long()).logits
                    return torch.log_softmax(logits[:, :-1][count].float(), dim=-1)

                hook.replace = False
                lp_clean = logprobs()
                p_clean = lp_clean.exp()
                x = hook.captured[keep].float().cpu().numpy()
                hook.replace, hook.keep = True, keep
                hook.value = torch.zeros(x.shape, dtype=torch.float32)
                lp = logprobs()
                shared["ce_clean"] -= float(lp_clean.gather(1, target).double().sum())
                shared["ce_zero"] -= float(lp.gather(1, target).double().sum())
                shared["kl_zero"] += float((p_clean * (lp_clean - lp)).sum(-1).double().sum())
                for name, (encode_fn, decode_fn) in fns.items():
                    x_hat = np.array(decode_fn(encode_fn(x)), dtype=np.float32)  # writable
                    if x_hat.shape != x.shape:
                        raise ValueError(f"{_arg}[{name!r}]: decode(encode(x)) has shape "
                                         f"{x_hat.shape} for x {x.shape}; expected the same")
                    hook.value = torch.from_numpy(x_hat)
                    lp = logprobs()
                    a = per[name]
                    a["ce_spliced"] -= float(lp.gather(1, target).double().sum())
                    a["kl_spliced"] += float((p_clean * (lp_clean - lp)).sum(-1).double().sum())
                    a["sse"] += float(((x.astype(np.float64) - x_hat) ** 2).sum())
                hook.replace, hook.value, hook.captured = False, None, None
                n_tok += int(count.sum())
                x64 = x.astype(np.float64)
                sum_x += x64.sum(0)
                sum_x2 += float((x64 ** 2).sum())
                n_rows += x.shape[0]
    finally:
        handle.remove()
    if n_tok == 0:
        raise ValueError("texts: no position with a next token to predict after excluding "
                         "special tokens; expected texts of at least two kept tokens")
    base = {key: v / n_tok for key, v in shared.items()}
    sst = sum_x2 - float(sum_x @ sum_x) / max(n_rows, 1)
    gap = base["ce_zero"] - base["ce_clean"]
    results = {}
    for name, a in per.items():
        r = dict(base, ce_spliced=a["ce_spliced"] / n_tok, kl_spliced=a["kl_spliced"] / n_tok)
        r["ce_loss_recovered"] = (r["ce_zero"] - r["ce_spliced"]) / gap if gap != 0 \
            else float("nan")
        r["r2"] = 1.0 - a["sse"] / sst if sst > 0 else float("nan")
        r.update(n_tokens=n_tok, n_spliced=n_rows, n_texts=len(texts), layer=int(layer))
        results[name] = r
    return results


# ---------------------------------------------------------------------------- shared checks
def _prepare_model(model, tokenizer, n_layers: int, exclude_special):
    """(blocks, device, special-token ids as a tensor) for the splice passes; pads on the
    right (with EOS/UNK when the tokenizer has no pad token)."""
    import torch

    from sae.cache import _special_ids, find_blocks

    special = _special_ids(tokenizer, exclude_special)
    blocks = find_blocks(model, n_layers)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "right"
    device = next(model.parameters()).device
    return blocks, device, torch.tensor(special, dtype=torch.long, device=device)


def _check_texts(texts) -> list[str]:
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Iterable):
        raise TypeError(f"texts={type(texts).__name__}: expected a list of str")
    texts = list(texts)
    if not texts:
        raise ValueError("texts=[]: expected at least one text")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise TypeError(f"texts: element {bad[0]} is {type(texts[bad[0]]).__name__}, "
                        f"expected str")
    return texts


def _check_pos_ints(**values) -> None:
    for name, v in values.items():
        if not _is_int(v) or v <= 0:
            raise ValueError(f"{name}={v!r}: expected a positive int")


def _model_dims(model, arg: str = "model") -> tuple[int, int]:
    """(num_hidden_layers, hidden_size) of a transformers model, or TypeError."""
    cfg = getattr(model, "config", None)
    if cfg is None or not callable(model) or not callable(getattr(model, "parameters", None)):
        raise TypeError(f"{arg}={type(model).__name__}: expected a transformers model "
                        f"(a torch module with a .config)")
    tcfg = cfg.get_text_config() if callable(getattr(cfg, "get_text_config", None)) else cfg
    return int(tcfg.num_hidden_layers), int(tcfg.hidden_size)


def _torch_sae_fns(sae) -> tuple[Callable, Callable] | None:
    """(encode, decode) on numpy arrays for a torch SAE module (e.g. a SAELens ``SAE``, whose
    ``encode``/``decode`` take and return torch tensors), else None."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None or not isinstance(sae, torch.nn.Module):
        return None
    p = next(iter(sae.parameters()), None)
    dtype = p.dtype if p is not None else torch.float32
    device = p.device if p is not None else "cpu"

    def enc(x):
        with torch.no_grad():
            t = torch.as_tensor(np.asarray(x, np.float32)).to(device=device, dtype=dtype)
            return sae.encode(t)

    def dec(f):
        with torch.no_grad():
            if not isinstance(f, torch.Tensor):
                f = torch.as_tensor(np.asarray(f)).to(device=device, dtype=dtype)
            return sae.decode(f).detach().float().cpu().numpy()

    return enc, dec


def _to_numpy(a) -> np.ndarray:
    if hasattr(a, "detach"):  # torch tensor
        a = a.detach().float().cpu().numpy()
    return np.asarray(a)


# ---------------------------------------------------------------------------- encoders
def encoder_splice_eval(model, tokenizer, texts: Iterable[str], layer: int, sae, *,
                        k: int | None = None, apply_b_dec_to_input: bool = True,
                        batch_size: int = 8, context_length: int = 128,
                        exclude_special: bool | Iterable[int] = True,
                        progress: bool = True) -> dict:
    """Splice an SAE into block ``layer`` of an encoder (BERT / all-MiniLM-L6-v2) and
    measure how much the model's output moves.

    Encoders have no next-token loss, so the splice is scored on the output itself. Per
    text, with H_run (T, d) the last hidden state (``last_hidden_state``) over its T real
    tokens (attention mask) and e_run = mean_t H_run[t] the mean-pooled sentence embedding
    (the pooling of the sentence-transformers model all-MiniLM-L6-v2; Reimers & Gurevych
    2019, arXiv 1908.10084):

        cosine     = cos(e_clean, e_spliced)
        rel_change = ‖H_spliced − H_clean‖_F / ‖H_clean‖_F

    both averaged over texts. The splice is :func:`splice_eval`'s: a forward hook on block
    ``layer`` replaces its output h_t by x̂(h_t) at the kept positions (real tokens that are
    not [CLS]/[SEP]/PAD/… with ``exclude_special=True``: the rows the activation cache
    stores), other positions keep their clean value. ``cosine_zero`` / ``rel_change_zero``
    are the same scores for zero ablation of those positions (the scale a bad SAE is
    measured against).

    Args: as :func:`splice_eval`; ``model`` is a transformers encoder (``AutoModel``: its
      forward returns ``last_hidden_state``), eval mode, on its own device.

    Returns: dict with ``cosine`` (mean over texts), ``cosine_min``, ``rel_change`` (mean
    over texts), ``rel_change_all`` (√(Σ‖ΔH‖²/Σ‖H_clean‖²) over all real tokens of all
    texts), ``cosine_zero``, ``rel_change_zero``, ``r2`` of the spliced rows,
    ``n_texts``, ``n_spliced`` (rows through the SAE), ``layer``.

    Raises (before any forward pass): TypeError / ValueError naming the argument.
    """
    import torch

    n_layers, H = _model_dims(model)
    if not _is_int(layer) or not 0 <= layer < n_layers:
        raise ValueError(f"layer={layer!r}: expected an int block index in [0, {n_layers - 1}]")
    _check_pos_ints(batch_size=batch_size, context_length=context_length)
    if k is not None and (not _is_int(k) or k <= 0):
        raise ValueError(f"k={k!r}: expected None or a positive int")
    texts = _check_texts(texts)
    fns = _torch_sae_fns(sae) or _sae_fns(sae, k, apply_b_dec_to_input, H)
    encode_fn, decode_fn = fns
    blocks, device, special_t = _prepare_model(model, tokenizer, n_layers, exclude_special)
    from tqdm.auto import tqdm

    hook = _Hook()
    handle = blocks[layer].register_forward_hook(hook)
    cos, cos_zero, rel, rel_zero = [], [], [], []
    d2_all = h2_all = 0.0
    sse = sum_x2 = 0.0
    sum_x = np.zeros(H, np.float64)
    n_rows = 0
    try:
        with torch.inference_mode():
            for b0 in tqdm(range(0, len(texts), batch_size),
                           total=math.ceil(len(texts) / batch_size), unit="batch",
                           desc=f"encoder splice layer {layer}", disable=not progress,
                           dynamic_ncols=True):
                enc = tokenizer(texts[b0:b0 + batch_size], truncation=True,
                                max_length=context_length, padding=True, return_tensors="pt")
                ids = enc["input_ids"].to(device)
                att = enc["attention_mask"].to(device).bool()
                keep = att.clone()
                if len(special_t):
                    keep &= ~torch.isin(ids, special_t)
                extra = {k_: v.to(device) for k_, v in enc.items()
                         if k_ not in ("input_ids", "attention_mask")}

                def last_hidden():
                    out = model(input_ids=ids, attention_mask=att.long(), **extra)
                    h = getattr(out, "last_hidden_state", None)
                    return (out[0] if h is None else h).float()

                hook.replace = False
                h_clean = last_hidden()
                x = hook.captured[keep].float().cpu().numpy()
                hook.replace, hook.keep = True, keep
                if x.shape[0]:
                    x_hat = np.array(_to_numpy(decode_fn(encode_fn(x))), dtype=np.float32)
                    if x_hat.shape != x.shape:
                        raise ValueError(f"sae: decode(encode(x)) has shape {x_hat.shape} "
                                         f"for x {x.shape}; expected the same")
                else:
                    x_hat = x
                hook.value = torch.from_numpy(x_hat)
                h_sp = last_hidden()
                hook.value = torch.zeros(x.shape, dtype=torch.float32)
                h_zero = last_hidden()
                hook.replace, hook.value, hook.captured = False, None, None
                m = att[..., None].float()
                n_real = m.sum(1).clamp(min=1.0)

                def pool(h):
                    return (h * m).sum(1) / n_real

                e_clean = pool(h_clean)
                h2 = ((h_clean * m) ** 2).sum((1, 2)).double()
                for h_run, c_list, r_list in ((h_sp, cos, rel), (h_zero, cos_zero, rel_zero)):
                    c = torch.nn.functional.cosine_similarity(
                        e_clean.double(), pool(h_run).double(), dim=-1, eps=1e-30)
                    d2 = (((h_run - h_clean) * m) ** 2).sum((1, 2)).double()
                    c_list.extend(c.cpu().tolist())
                    r_list.extend((d2.sqrt() / h2.sqrt().clamp(min=1e-30)).cpu().tolist())
                    if h_run is h_sp:
                        d2_all += float(d2.sum())
                h2_all += float(h2.sum())
                x64 = x.astype(np.float64)
                sse += float(((x64 - x_hat) ** 2).sum())
                sum_x += x64.sum(0)
                sum_x2 += float((x64 ** 2).sum())
                n_rows += x.shape[0]
    finally:
        handle.remove()
    sst = sum_x2 - float(sum_x @ sum_x) / max(n_rows, 1)
    return {"cosine": float(np.mean(cos)), "cosine_min": float(np.min(cos)),
            "rel_change": float(np.mean(rel)),
            "rel_change_all": math.sqrt(d2_all / h2_all) if h2_all > 0 else float("nan"),
            "cosine_zero": float(np.mean(cos_zero)), "rel_change_zero": float(np.mean(rel_zero)),
            "r2": 1.0 - sse / sst if sst > 0 else float("nan"),
            "n_texts": len(texts), "n_spliced": n_rows, "layer": int(layer)}


# ---------------------------------------------------------------------------- SAEBench core
#: SAEBench "core" metric names by category (``sae_bench/evals/core/eval_output.py`` of
#: https://github.com/adamkarvonen/SAEBench; the same names as SAELens's ``run_evals``).
CORE_CATEGORIES = {
    "model_behavior_preservation": ("kl_div_score", "kl_div_with_ablation", "kl_div_with_sae"),
    "model_performance_preservation": ("ce_loss_score", "ce_loss_with_ablation",
                                       "ce_loss_with_sae", "ce_loss_without_sae"),
    "reconstruction_quality": ("explained_variance", "mse", "cossim"),
    "shrinkage": ("l2_norm_in", "l2_norm_out", "l2_ratio", "relative_reconstruction_bias"),
    "sparsity": ("l0", "l1"),
    "token_stats": ("total_tokens_eval_reconstruction", "total_tokens_eval_sparsity_variance"),
    "misc_metrics": ("frac_alive", "freq_over_1_percent", "freq_over_10_percent",
                     "normalized_freq_over_1_percent", "normalized_freq_over_10_percent",
                     "average_max_encoder_cosine_sim", "average_max_decoder_cosine_sim"),
}


def _activation_chunks(activations, rows: int, max_tokens: int | None):
    """(total rows, iterator of float32 (n, H) chunks) of an (N, H) array or a store."""
    if hasattr(activations, "activations") and hasattr(activations, "n_shards"):
        store = activations
        sizes = [int(s) for s in store.shard_sizes]
        total = sum(sizes) if max_tokens is None else min(sum(sizes), max_tokens)

        def gen():
            left = total
            for s, n in enumerate(sizes):
                a = store.activations(s)
                for r0 in range(0, n, rows):
                    if left <= 0:
                        return
                    c = np.asarray(a[r0:min(r0 + rows, n, r0 + left)], np.float32)
                    left -= c.shape[0]
                    yield c
        return total, gen()
    a = activations
    total = a.shape[0] if max_tokens is None else min(a.shape[0], max_tokens)
    return total, (np.asarray(_to_numpy(a[r0:min(r0 + rows, total)]), np.float32)
                   for r0 in range(0, total, rows))


def _max_cosine_sim(w: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """(F,) max cosine of column i of w (D, F) with any other column (SAEBench's
    ``calculate_max_cosine_sim``), computed in column chunks (O(F² D) work)."""
    w = np.asarray(w, np.float32)
    w = w / np.maximum(np.linalg.norm(w, axis=0, keepdims=True), 1e-30)
    F = w.shape[1]
    out = np.empty(F, np.float32)
    for c0 in range(0, F, chunk):
        sims = w[:, c0:c0 + chunk].T @ w
        idx = np.arange(sims.shape[0])
        sims[idx, c0 + idx] = -np.inf
        out[c0:c0 + chunk] = sims.max(1) if F > 1 else np.nan
    return out


def core_metrics(sae, activations, *, model=None, tokenizer=None, layer: int | None = None,
                 texts: Iterable[str] | None = None, k: int | None = None,
                 apply_b_dec_to_input: bool = True, batch_size: int = 8,
                 context_length: int = 128, exclude_special: bool | Iterable[int] = True,
                 rows_per_batch: int = 4096, max_tokens: int | None = None,
                 weight_metrics: bool = True, progress: bool = True) -> dict:
    """SAEBench's "core" evaluation of any SAE, under SAEBench's metric names.

    SAEBench (Karvonen et al. 2025, "SAEBench: A Comprehensive Benchmark for Sparse
    Autoencoders", arXiv 2503.09532; https://github.com/adamkarvonen/SAEBench,
    ``sae_bench/evals/core``) reports, per category (``CORE_CATEGORIES``), with x (N, H)
    the evaluation activations, x̂ = decode(encode(x)), f = encode(x) (N, M):

    * ``sparsity``: ``l0`` = mean_n ‖f_n‖_0; ``l1`` = mean_n ‖f_n‖_1.
    * ``reconstruction_quality``: ``explained_variance`` = 1 − mean‖x − x̂‖² / (mean‖x‖² −
      ‖mean x‖²) (SAELens's ``ExplainedVarianceCalculator``: 1 when the variance is
      < 1e-10 and the MSE too, else 0 there); ``mse`` = mean_n ‖x_n − x̂_n‖² (summed over
      dims); ``cossim`` = mean_n cos(x_n, x̂_n).
    * ``shrinkage``: ``l2_norm_in`` = mean ‖x‖, ``l2_norm_out`` = mean ‖x̂‖, ``l2_ratio`` =
      mean ‖x̂‖/‖x‖ (‖x‖ < 1e-4 divides by 1, as SAELens), ``relative_reconstruction_bias``
      = mean‖x̂‖² / mean⟨x, x̂⟩ (Wright & Sharkey 2024 / Marks et al., arXiv 2404.16014
      eq. 10: < 1 means shrinkage). Computed over all N rows at once; SAELens averages the
      per-batch ratio over its batches (identical with one batch).
    * ``misc_metrics`` from the firing density p_i = mean_n 1[f_ni ≠ 0]: ``frac_alive`` =
      mean_i 1[p_i > 0] (dead fraction = 1 − frac_alive), ``freq_over_1_percent`` /
      ``freq_over_10_percent`` = fraction of latents with p_i > 0.01 / 0.1,
      ``normalized_freq_over_1_percent`` / ``…_10_percent`` = Σ_{p_i > 0.01} p_i / Σ_i p_i
      (share of all firings made by those latents), ``average_max_encoder_cosine_sim`` /
      ``average_max_decoder_cosine_sim`` = mean_i max_{j≠i} cos of encoder columns /
      decoder rows (only with ``weight_metrics`` and an SAE whose weights are known: a
      params dict or a torch module with ``W_enc``/``W_dec``; else absent).
    * ``model_performance_preservation`` / ``model_behavior_preservation`` (only with
      ``model``): ``ce_loss_without_sae`` / ``_with_sae`` / ``_with_ablation`` (nats per
      token: clean, spliced, zero-ablated), ``ce_loss_score`` = (CE_abl − CE_sae) /
      (CE_abl − CE_clean); ``kl_div_with_sae`` / ``kl_div_with_ablation`` = mean
      KL(p_clean ‖ p_run), ``kl_div_score`` = (KL_abl − KL_sae) / KL_abl. Computed by
      :func:`splice_eval` on ``texts`` (not on ``activations``).
    * ``token_stats``: ``total_tokens_eval_sparsity_variance`` = N,
      ``total_tokens_eval_reconstruction`` = predictions counted by the splice (0 without
      a model).
    * ``feature_metrics``: ``feature_density`` (M,) = p.

    SAEBench's ``explained_variance_legacy`` (a per-batch, per-token ratio that depends on
    the batching) is not reported.

    Differences from SAELens's ``run_evals`` (``sae_lens.evals``, 6.x) for the CE/KL part:
    SAELens runs a TransformerLens ``HookedTransformer`` on unpadded token batches, zero-
    ablates *every* position (also BOS and other special tokens) and averages the KL over
    all T positions of a sequence (also the last, which has no next token), while
    :func:`splice_eval` runs the transformers model, splices and ablates only the kept
    positions (special tokens keep their clean value) and counts the T − 1 predictions
    that have a target. With ``exclude_special=False`` and texts of one token length the
    CE numbers are the same quantity; ``tests/test_evals_core.py`` checks them and the
    activation metrics against SAELens's own functions on a tiny GPT-2 (to 1e-4).

    Args:
      sae: a params dict (Gemma Scope layout, e.g. from :func:`sae.io.load_saelens` — pass
        its cfg's ``k`` and ``apply_b_dec_to_input`` — or :func:`sae.io.load_gemmascope`
        with ``apply_b_dec_to_input=False``), a pair ``(encode, decode)`` of callables on
        (n, H) / (n, M) arrays, an object with ``encode``/``decode`` methods, or a torch
        SAE module (a SAELens ``SAE``: torch tensors in and out).
      activations: (N, H) array (numpy, memmap, jax or torch) or an
        :class:`sae.store.ActivationStore` (its layer, shards in cache order).
      model, tokenizer, layer, texts: optional causal LM (or an embedded name for
        :func:`sae.models.load`) for the CE/KL metrics; all four needed together.
      k, apply_b_dec_to_input: for a params dict (TopK when ``k`` is given).
      batch_size, context_length, exclude_special: passed to :func:`splice_eval`.
      rows_per_batch: activation rows per SAE call; max_tokens: use only the first rows.
      weight_metrics: compute the max-cosine metrics (O(M² H)).
      progress: tqdm bars.

    Returns: ``{category: {name: float}}`` for the categories above (those that apply),
    plus ``"feature_metrics": {"feature_density": ndarray (M,)}``.

    Raises (before any compute): TypeError / ValueError naming the argument.
    """
    # ------------------------------------------------------------------ validation
    is_store = hasattr(activations, "activations") and hasattr(activations, "n_shards")
    if is_store:
        H = int(activations.d_model)
    else:
        shape = getattr(activations, "shape", None)
        if shape is None:
            activations = np.asarray(activations)
            shape = activations.shape
        if len(shape) != 2 or shape[0] == 0:
            raise ValueError(f"activations: shape {tuple(shape)}; expected (N, H) with N >= 1 "
                             f"or an sae.store.ActivationStore")
        H = int(shape[1])
    _check_pos_ints(rows_per_batch=rows_per_batch)
    if max_tokens is not None:
        _check_pos_ints(max_tokens=max_tokens)
    if k is not None and (not _is_int(k) or k <= 0):
        raise ValueError(f"k={k!r}: expected None or a positive int")
    fns = _torch_sae_fns(sae) or _sae_fns(sae, k, apply_b_dec_to_input, H)
    weights = None
    if weight_metrics:
        if isinstance(sae, Mapping):
            weights = (_to_numpy(sae["W_enc"]), _to_numpy(sae["W_dec"]))
        elif hasattr(sae, "W_enc") and hasattr(sae, "W_dec"):
            weights = (_to_numpy(sae.W_enc), _to_numpy(sae.W_dec))
    lm = (model, tokenizer, layer, texts)
    if any(v is not None for v in lm):
        if any(v is None for v in lm):
            missing = [n for n, v in zip(("model", "tokenizer", "layer", "texts"), lm)
                       if v is None]
            if not (isinstance(model, str) and missing == ["tokenizer"]):
                raise ValueError(f"core_metrics: {missing} missing; the CE/KL metrics need "
                                 f"model, tokenizer, layer and texts together")
        texts = _check_texts(texts)
        if isinstance(model, str):
            from sae.models import load

            model, tok = load(model)
            tokenizer = tokenizer or tok
        n_layers, H_model = _model_dims(model)
        if H_model != H:
            raise ValueError(f"activations: H = {H} but model hidden_size = {H_model}; "
                             f"expected activations of that model")
        if not _is_int(layer) or not 0 <= layer < n_layers:
            raise ValueError(f"layer={layer!r}: expected an int block index in "
                             f"[0, {n_layers - 1}]")
        _check_pos_ints(batch_size=batch_size, context_length=context_length)

    # ------------------------------------------------------------------ activations
    encode_fn, decode_fn = fns
    total, chunks = _activation_chunks(activations, rows_per_batch, max_tokens)
    acc = dict(l0=0.0, l1=0.0, sse=0.0, x2=0.0, n_in=0.0, n_out=0.0, ratio=0.0, xh2=0.0,
               dot=0.0, cos=0.0)
    sum_x = np.zeros(H, np.float64)
    fires = None
    n = 0
    from tqdm.auto import tqdm

    for x in tqdm(chunks, total=math.ceil(total / rows_per_batch), unit="batch",
                  desc="core metrics", disable=not progress, dynamic_ncols=True):
        f = encode_fn(x)
        x_hat = np.asarray(_to_numpy(decode_fn(f)), np.float64)
        f = np.asarray(_to_numpy(f))
        if x_hat.shape != x.shape:
            raise ValueError(f"sae: decode(encode(x)) has shape {x_hat.shape} for x "
                             f"{x.shape}; expected the same")
        nz = f != 0
        fires = nz.sum(0, dtype=np.int64) if fires is None else fires + nz.sum(0)
        x = x.astype(np.float64)
        nx, nxh = np.linalg.norm(x, axis=1), np.linalg.norm(x_hat, axis=1)
        dot = (x * x_hat).sum(1)
        acc["l0"] += float(nz.sum())
        acc["l1"] += float(np.abs(f).astype(np.float64).sum())
        acc["sse"] += float(((x - x_hat) ** 2).sum())
        acc["x2"] += float((nx ** 2).sum())
        acc["n_in"] += float(nx.sum())
        acc["n_out"] += float(nxh.sum())
        acc["ratio"] += float((nxh / np.where(np.abs(nx) < 1e-4, 1.0, nx)).sum())
        acc["xh2"] += float((nxh ** 2).sum())
        acc["dot"] += float(dot.sum())
        acc["cos"] += float((dot / np.maximum(nx * nxh, 1e-30)).sum())
        sum_x += x.sum(0)
        n += x.shape[0]
    mse = acc["sse"] / n
    var = acc["x2"] / n - float((sum_x / n) @ (sum_x / n))
    ev = (1.0 if mse < 1e-10 else 0.0) if var < 1e-10 else 1.0 - mse / var
    dens = fires / n
    tot = float(dens.sum())
    out = {
        "reconstruction_quality": {"explained_variance": ev, "mse": mse,
                                   "cossim": acc["cos"] / n},
        "shrinkage": {"l2_norm_in": acc["n_in"] / n, "l2_norm_out": acc["n_out"] / n,
                      "l2_ratio": acc["ratio"] / n,
                      "relative_reconstruction_bias": acc["xh2"] / acc["dot"]
                      if acc["dot"] != 0 else float("nan")},
        "sparsity": {"l0": acc["l0"] / n, "l1": acc["l1"] / n},
        "misc_metrics": {
            "frac_alive": float((dens > 0).mean()),
            "freq_over_1_percent": float((dens > 0.01).mean()),
            "freq_over_10_percent": float((dens > 0.1).mean()),
            "normalized_freq_over_1_percent": float(dens[dens > 0.01].sum()) / tot
            if tot > 0 else 0.0,
            "normalized_freq_over_10_percent": float(dens[dens > 0.1].sum()) / tot
            if tot > 0 else 0.0},
        "token_stats": {"total_tokens_eval_reconstruction": 0,
                        "total_tokens_eval_sparsity_variance": n},
        "feature_metrics": {"feature_density": dens},
    }
    if weights is not None:
        w_enc, w_dec = weights
        out["misc_metrics"]["average_max_encoder_cosine_sim"] = float(
            np.mean(_max_cosine_sim(w_enc)))
        out["misc_metrics"]["average_max_decoder_cosine_sim"] = float(
            np.mean(_max_cosine_sim(np.asarray(w_dec).T)))

    # ------------------------------------------------------------------ splice (CE / KL)
    if model is not None:
        r = splice_eval(model, tokenizer, texts, layer, (encode_fn, _np_decode(decode_fn)),
                        batch_size=batch_size, context_length=context_length,
                        exclude_special=exclude_special, progress=progress)
        gap_kl = r["kl_zero"]
        out["model_behavior_preservation"] = {
            "kl_div_score": (r["kl_zero"] - r["kl_spliced"]) / gap_kl if gap_kl != 0
            else float("nan"),
            "kl_div_with_ablation": r["kl_zero"], "kl_div_with_sae": r["kl_spliced"]}
        out["model_performance_preservation"] = {
            "ce_loss_score": r["ce_loss_recovered"], "ce_loss_with_ablation": r["ce_zero"],
            "ce_loss_with_sae": r["ce_spliced"], "ce_loss_without_sae": r["ce_clean"]}
        out["token_stats"]["total_tokens_eval_reconstruction"] = r["n_tokens"]
    return out


def _np_decode(decode_fn: Callable) -> Callable:
    return lambda f: _to_numpy(decode_fn(f))
