"""Orbax checkpoints of the structured training state.

Under ``jax.distributed`` every process calls the same functions; orbax writes each array
once (the primary process writes replicated arrays and the metadata) and every process
restores. The state is saved as the ``TrainState`` pytree itself — ``params`` (an ``nnx.State``, keyed
by parameter name), the optax state (keyed by field), ``step`` and ``since_fired`` — so each
array is stored under its path: adding a field cannot shift another. It is restored into
abstract targets (``jax.ShapeDtypeStruct`` with the live state's shardings), so a sharded
state restores sharded. Beside it, a JSON ``meta`` record holds the step, the input scale
and the config; a restore under another config fails with a message listing the fields that
differ, before any array is read.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax

__all__ = ["CheckpointCorruptError", "CheckpointMismatchError", "abstract_like", "open_manager", "restore", "save"]


class CheckpointMismatchError(ValueError):
    """The checkpoint was written by a run with another config / sweep."""


class CheckpointCorruptError(ValueError):
    """A checkpoint step's files cannot be read (garbled meta JSON, truncated arrays, …)."""


def _unreadable(mngr, step: int, part: str, err: Exception) -> CheckpointCorruptError:
    """One readable error naming the step folder and the part that failed, suggesting the
    previous step still on disk (orbax keeps the last 2) when there is one."""
    folder = os.path.join(str(mngr.directory), str(step))
    first = (str(err).strip().splitlines() or [""])[0][:300]
    older = sorted(s for s in mngr.all_steps() if s < step)
    hint = (f"; the previous step {older[-1]} is still in {mngr.directory}: delete {folder} "
            f"to resume from it" if older else
            "; no earlier step is kept: delete the folder (or pass overwrite=True) to start over")
    return CheckpointCorruptError(
        f"checkpoint step {step} in {mngr.directory} is unreadable: its {part} "
        f"({os.path.join(folder, part)}) could not be restored ({type(err).__name__}: "
        f"{first}){hint}")


def _has_checkpoints(directory: str) -> bool:
    return os.path.isdir(directory) and any(os.scandir(directory))


def open_manager(directory: str, *, resume: bool, overwrite: bool = False):
    """An ``orbax.checkpoint.CheckpointManager`` on ``directory`` (keeps the last 2).

    A non-empty ``directory`` with ``resume=False`` raises ``FileExistsError`` naming it —
    orbax would otherwise skip every save at or below the old run's latest step, silently —
    unless ``overwrite=True``, which deletes the folder's contents first.
    """
    import orbax.checkpoint as ocp

    directory = os.path.abspath(directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise NotADirectoryError(f"checkpoint_dir={directory!r} exists and is not a folder")
    if not resume and _has_checkpoints(directory):
        if not overwrite:
            raise FileExistsError(
                f"checkpoint_dir={directory!r} already holds a run's checkpoints and "
                f"resume=False: pass resume=True to continue that run, overwrite=True to "
                f"delete it and start over, or choose an empty folder")
        if jax.process_index() == 0:  # the primary process deletes, the others wait
            shutil.rmtree(directory)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"sae.checkpoint.overwrite:{directory}")
    return ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False),
    )


def abstract_like(tree) -> Any:
    """``jax.ShapeDtypeStruct`` leaves carrying each array's shape, dtype and sharding."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree)


def save(mngr, state, meta: dict) -> None:
    """Save ``state`` (any pytree) and the JSON-able ``meta`` (must hold ``step``) at
    ``meta["step"]``; blocks until written."""
    import orbax.checkpoint as ocp

    mngr.save(int(meta["step"]), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
    mngr.wait_until_finished()


def _diff(saved: dict, now: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(saved) | set(now)):
        a, b = saved.get(k, "<absent>"), now.get(k, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: checkpoint {a!r}, this run {b!r}")
    return out


def restore(mngr, template_state, expected: dict, *, check_keys=("config", "n_sae", "hparams",
                                                                    "seeds")):
    """Latest checkpoint as (state, meta), or None when there is none.

    template_state: a live state of the right structure (its shapes, dtypes and shardings
      are the restore targets). expected: this run's meta; the ``check_keys`` entries must
      equal the saved ones, else ``CheckpointMismatchError`` lists what differs.
    """
    import orbax.checkpoint as ocp

    step = mngr.latest_step()
    if step is None:
        return None
    try:
        meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # garbled / truncated JSON, missing files: name the step folder
        raise _unreadable(mngr, step, "meta", e) from e
    if not isinstance(meta, dict):
        raise _unreadable(mngr, step, "meta", TypeError(
            f"expected a JSON object, got {type(meta).__name__}"))
    now = json.loads(json.dumps({k: expected[k] for k in check_keys}))
    diffs = _diff({k: meta.get(k) for k in check_keys}, now)
    if diffs:
        raise CheckpointMismatchError(
            f"checkpoint at step {step} in {mngr.directory} was written by another run; "
            f"differences: " + "; ".join(diffs))
    try:
        out = mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_like(template_state))))
    except Exception as e:  # truncated / garbled array files (tensorstore errors)
        raise _unreadable(mngr, step, "state", e) from e
    return out["state"], meta
