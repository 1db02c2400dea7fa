"""One device-mesh constructor for the whole repo (``jaxsense.sweep`` and ``sae`` training).

A thin, validated front of :func:`jax.make_mesh`: it takes the first ∏ shape devices of
``devices`` (default ``jax.devices()``), so a mesh may use a subset of the devices, and it
raises a ValueError naming the shape and the device count when they do not fit.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import jax
from jax.sharding import Mesh

from ._checks import check_int

__all__ = ["host_gather", "make_mesh"]


def make_mesh(axis_shapes: Sequence[int], axis_names: Sequence[str], devices=None) -> Mesh:
    """A mesh of ``axis_shapes`` named ``axis_names`` over the first ∏ axis_shapes devices.

    Args:
      axis_shapes: size of each mesh axis, e.g. ``(n_sweep, n_data)``.
      axis_names: one name per axis, e.g. ``("sweep", "data")``.
      devices: devices to use (default: all of ``jax.devices()``, i.e. every process's
        devices under ``jax.distributed``).
    Returns:
      ``jax.sharding.Mesh`` with ``mesh.shape == dict(zip(axis_names, axis_shapes))``.
    """
    shapes = [check_int(f"axis_shapes[{i}]", s, low=1) for i, s in enumerate(axis_shapes)]
    names = list(axis_names)
    if len(names) != len(shapes) or len(set(names)) != len(names):
        raise ValueError(f"axis_names={names!r}: expected {len(shapes)} distinct names, one "
                         f"per entry of axis_shapes={shapes}")
    devices = list(jax.devices() if devices is None else devices)
    need = math.prod(shapes)
    if need > len(devices):
        raise ValueError(f"axis_shapes={shapes} needs {need} devices, only {len(devices)} "
                         f"available")
    # Auto axes: jit's sharding propagation decides intermediate layouts (as with a plain
    # ``Mesh``); jax.make_mesh would otherwise default to Explicit axes.
    auto = (jax.sharding.AxisType.Auto,) * len(shapes)
    return jax.make_mesh(tuple(shapes), tuple(names), auto, devices=devices[:need])


def host_gather(tree):
    """numpy copy of a pytree of (possibly sharded) arrays, on every process.

    One process: ``jax.device_get``. Under ``jax.distributed``, arrays sharded across
    processes are gathered with ``jax.experimental.multihost_utils.process_allgather``
    (every process must call this, in the same order)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)
