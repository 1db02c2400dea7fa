"""Input validation shared by the public functions.

Every public function validates its arguments *before* any compute starts and raises a
ValueError/TypeError that names the argument, the value it got and what was expected.
Values that are JAX tracers (inside jit/vmap) cannot be inspected and are skipped: the
check then happens once, at the outermost concrete call.

Array checks (shape, floating dtype, finiteness) run chex's own asserts
(``chex.assert_shape``, ``chex.assert_type``, ``chex.assert_tree_all_finite``); chex raises a
bare ``AssertionError`` that does not know the argument's name, so each is caught here and
re-raised as the ValueError/TypeError of this module's contract, naming the argument, with
chex's message kept as the cause.
"""
from __future__ import annotations

import numbers

import chex
import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(x) -> bool:
    """True when ``x`` holds a concrete value (not a tracer under jit/vmap/grad)."""
    leaves = jax.tree_util.tree_leaves(x)
    return not any(isinstance(leaf, jax.core.Tracer) for leaf in leaves)


def check_int(name: str, value, *, low: int | None = None, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, np.integer)):
        raise TypeError(f"{name}={value!r}: expected an integer")
    value = int(value)
    if low is not None and value < low:
        hi = f" and <= {high}" if high is not None else ""
        raise ValueError(f"{name}={value}: expected an integer >= {low}{hi}")
    if high is not None and value > high:
        raise ValueError(f"{name}={value}: expected an integer <= {high}")
    return value


def check_positive_int(name: str, value, *, allow_none: bool = False):
    """``value`` must be an int ≥ 1 (or None when ``allow_none``); returns it as int/None.
    ValueError "name=value: expected a positive int" otherwise."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, np.integer)) \
            or value < 1:
        raise ValueError(f"{name}={value!r}: expected a positive int"
                         + (" or None" if allow_none else ""))
    return int(value)


def check_scalar(name: str, value, *, low=None, high=None, low_open=False, high_open=False):
    """Check a real scalar (python number or 0-d/batched array) lies in an interval.

    Arrays are checked element-wise, so a stacked hyper-parameter (for a vmapped sweep)
    is validated as a whole. Tracers are skipped (see module docstring).
    """
    if not is_concrete(value):
        return value
    arr = np.asarray(value)
    if arr.dtype.kind not in "fiu" or arr.dtype == bool:
        raise TypeError(f"{name}={value!r}: expected a real number")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}={value!r}: expected a finite number")
    lo_s = "(" if low_open else "["
    hi_s = ")" if high_open else "]"
    rng = f"{lo_s}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi_s}"
    if low is not None and (np.any(arr <= low) if low_open else np.any(arr < low)):
        raise ValueError(f"{name}={value!r}: expected a value in {rng}")
    if high is not None and (np.any(arr >= high) if high_open else np.any(arr > high)):
        raise ValueError(f"{name}={value!r}: expected a value in {rng}")
    return value


def check_finite(name: str, x) -> None:
    if not is_concrete(x):
        return
    if isinstance(x, jax.Array) and not x.is_fully_addressable:  # sharded across processes
        from .mesh import host_gather

        x = host_gather(x)
    x = np.asarray(x)
    try:
        chex.assert_tree_all_finite(x)
    except AssertionError as e:
        bad = int(np.size(x) - np.isfinite(x).sum())
        raise ValueError(f"{name}: expected all entries finite, found {bad} non-finite "
                         "entries") from e


def check_shape(name: str, x, shape: tuple) -> None:
    """``shape`` may contain None as a wildcard."""
    got = tuple(np.shape(x))
    try:
        chex.assert_shape(jax.ShapeDtypeStruct(got, np.float32), tuple(shape))
    except AssertionError as e:
        want = tuple("*" if s is None else s for s in shape)
        raise ValueError(f"{name}: expected shape {want}, got {got}") from e


def check_trailing_shape(name: str, x, trailing: tuple) -> None:
    """``x`` has shape (..., *trailing) (any leading batch axes; None in ``trailing`` is a
    wildcard). Shapes are static, so this also checks tracers under jit/vmap."""
    got = tuple(np.shape(x))
    k = len(trailing)
    ok = len(got) >= k and all(s is None or s == g for s, g in zip(trailing, got[len(got) - k:]))
    if not ok:
        want = ("...",) + tuple("*" if s is None else s for s in trailing)
        raise ValueError(f"{name}: expected shape ({', '.join(map(str, want))}), got {got}")


def check_real_array(name: str, x) -> None:
    """A floating-point array whose entries are all finite (the finiteness part is skipped
    for tracers). Integer arrays are refused: they give NaN (or silently truncated)
    results in the float arithmetic of the metrics and solvers."""
    check_float_dtype(name, x)
    check_finite(name, x)


def check_float_dtype(name: str, x, dtype=None) -> None:
    dt = np.dtype(x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype)
    try:
        chex.assert_type(jax.ShapeDtypeStruct((), dt), float)
    except AssertionError as e:
        raise TypeError(f"{name}: expected a floating-point array, got dtype {dt}") from e
    if dtype is not None and dt != np.dtype(dtype):
        raise TypeError(f"{name}: expected dtype {np.dtype(dtype)} (to match the operator), got {dt}")


def check_float_dtype_arg(name: str, value) -> None:
    """A ``dtype=`` argument must name a floating dtype (jax.random and the solvers need
    one; an integer dtype otherwise fails deep inside JAX)."""
    try:
        dt = jnp.dtype(value)
    except TypeError:
        dt = None
    if dt is None or not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(f"{name}={value!r}: expected a floating dtype such as float32 or "
                        "float64")


def check_choice(name: str, value, choices) -> None:
    """``value`` must be one of ``choices`` (compared with ``in``)."""
    if value not in tuple(choices):
        raise ValueError(f"{name}={value!r}: expected one of {tuple(choices)!r}")


def check_names(name: str, values: tuple, allowed) -> None:
    """Every entry of ``values`` (e.g. the requested metrics) must be in ``allowed``."""
    bad = [v for v in values if v not in allowed]
    if bad:
        raise ValueError(f"{name}={values}: unknown {bad}; expected names from {allowed}")


def check_multiple(name: str, value: int, of_name: str, of: int) -> None:
    if value % of:
        raise ValueError(f"{name}={value}: expected a multiple of {of_name}={of}")


def check_measurements(name: str, y, op) -> None:
    """A measurement vector of ``op``: shape (op.m,), op's dtype, all entries finite."""
    check_shape(name, y, (op.m,))
    check_float_dtype(name, y, op.dtype)
    check_finite(name, y)


def check_operator_dims(op, m: int, d: int, d_name: str = "d") -> None:
    """A passed-in operator must have the m and d the caller asked for."""
    if op.m != m or op.d != d:
        raise ValueError(f"op: expected an operator with m={m}, {d_name}={d}, got m={op.m}, "
                         f"d={op.d}")


def check_filter_dtype(name: str, value):
    """None (the array's own dtype) or a floating dtype name, e.g. 'float32'; returns the
    canonical name (or None)."""
    if value is None:
        return None
    try:
        dt = jnp.dtype(value)
    except TypeError:
        dt = None
    if dt is None or not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(f"{name}={value!r}: expected None or a floating "
                         "dtype such as 'float32' or 'float64'")
    return dt.name
