"""Shared helpers for experiment scripts: atomic JSON/PNG writing, min–max band plots."""
from __future__ import annotations

import contextlib
import contextvars
import json
import os
from pathlib import Path

import numpy as np


def out_dir(*parts: str, root: str | os.PathLike = "results") -> Path:
    p = Path(root, *parts)
    p.mkdir(parents=True, exist_ok=True)
    return p


def _to_jsonable(x):
    if isinstance(x, dict):
        return {str(k): _to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_jsonable(v) for v in x]
    if hasattr(x, "tolist"):
        return _to_jsonable(np.asarray(x).tolist())
    if isinstance(x, float) and not np.isfinite(x):
        return str(x)
    return x


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically with the repo's one writer,
    :func:`sae._atomic.atomic_write_bytes` (temporary file, fsync, rename); returns a Path.
    (Imported on use: importing ``sae`` loads jax.)"""
    from sae._atomic import atomic_write_bytes as write

    return Path(write(path, data))


def atomic_savez(path: str | os.PathLike, **arrays) -> Path:
    """``np.savez`` to ``path``, atomically (:func:`sae._atomic.atomic_savez`)."""
    from sae._atomic import atomic_savez as savez

    return Path(savez(path, **arrays))


def save_json(path, obj, **dumps_kw) -> Path:
    """``obj`` as JSON (numpy arrays as lists, non-finite floats as strings), atomically.
    ``dumps_kw`` go to ``json.dumps`` (default ``indent=1``)."""
    dumps_kw.setdefault("indent", 1)
    return atomic_write_bytes(path, json.dumps(_to_jsonable(obj), **dumps_kw).encode())


def save_text(path, text: str) -> Path:
    """``text`` as UTF-8, atomically."""
    return atomic_write_bytes(path, text.encode())


_FIGURE_NOTE: contextvars.ContextVar = contextvars.ContextVar("figure_note", default=None)


@contextlib.contextmanager
def figure_note(note: str | None):
    """Within the block, :func:`save_fig` prints ``note`` (e.g. 'reduced run: …') as the
    figure's top title, so a plot of a run smaller than the paper setting says so."""
    token = _FIGURE_NOTE.set(note)
    try:
        yield
    finally:
        _FIGURE_NOTE.reset(token)


def save_fig(fig, path, *, dpi: int = 130, bbox_inches: str | None = "tight") -> Path:
    """A matplotlib figure as PNG, atomically (with the :func:`figure_note` in effect, if
    any, as its top title)."""
    import io

    note = _FIGURE_NOTE.get()
    if note:
        fig.suptitle(note, color="darkred", fontsize=8, y=1.02)

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches=bbox_inches)
    return atomic_write_bytes(path, buf.getvalue())


def band(ax, x, curves, label=None, color=None, logy=True):
    """Median line and min–max band over seeds. curves: (seeds, len(x))."""
    curves = np.asarray(curves, float)
    med = np.median(curves, axis=0)
    (line,) = ax.plot(x, med, label=label, color=color, lw=1.5)
    ax.fill_between(x, curves.min(0), curves.max(0), color=line.get_color(), alpha=0.25, lw=0)
    if logy:
        ax.set_yscale("log")
    return line


def new_figure(ncols=1, size=(5.0, 3.6)):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(size[0] * ncols, size[1]), squeeze=False)
    return fig, axes[0]
