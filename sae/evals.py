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
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

import numpy as np

__all__ = ["splice_eval", "splice_eval_many", "whitened_sae"]


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
    from sae.cache import _special_ids, find_blocks

    special = _special_ids(tokenizer, exclude_special)
    blocks = find_blocks(model, n_layers)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "right"
    device = next(model.parameters()).device
    special_t = torch.tensor(special, dtype=torch.long, device=device)

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
                if len(special):
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
