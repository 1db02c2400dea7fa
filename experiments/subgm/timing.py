"""Compile time vs run time of a block of JAX work, from JAX's own compile timers.

    with CompileClock() as clock:
        fig4.compute(...)
    clock.compile_s, clock.run_s, clock.n_compiles, clock.by_function["jit(single)"]

JAX reports every compilation through :mod:`jax.monitoring` as three durations: tracing to
a jaxpr (``/jax/core/compile/jaxpr_trace_duration``), lowering to an MLIR module
(``…/jaxpr_to_mlir_module_duration``) and the XLA backend compile
(``…/backend_compile_duration``). :class:`CompileClock` sums them while it is active:
``compile_s`` = trace + lower + backend compile of every jitted function (including the
small eager-op kernels), ``run_s`` = wall − compile_s (execution, host work, plotting).
A jitted function traced inside another one emits no event of its own (its trace is part
of the outer one), so nothing is counted twice. ``by_function`` counts backend compiles
per function name (``seconds_by_function``: their trace + lower + compile seconds) ("jit(single)" is :func:`jaxsense.run`'s scan, "jit(_l2_rip)" the ℓ2-RIP
estimator), which is how the tests prove that a sweep over m compiles its scan once.
Cache hits (a function already compiled for these shapes) emit nothing: they cost nothing.
"""
from __future__ import annotations

import threading
import time
from collections import Counter

from jax import monitoring

TRACE = "/jax/core/compile/jaxpr_trace_duration"
LOWER = "/jax/core/compile/jaxpr_to_mlir_module_duration"
BACKEND = "/jax/core/compile/backend_compile_duration"
EVENTS = (TRACE, LOWER, BACKEND)

_active: list = []
_lock = threading.Lock()
_registered = False


def _listener(event: str, duration: float, **kw) -> None:
    if event not in EVENTS:
        return
    with _lock:
        for clock in _active:
            clock._add(event, duration, kw.get("fun_name"))


def _ensure_listener() -> None:
    global _registered
    with _lock:
        if not _registered:
            monitoring.register_event_duration_secs_listener(_listener)
            _registered = True


class CompileClock:
    """Context manager: wall time, compile time (JAX compile events) and compile counts of
    the block; clocks may nest (each sees every compile inside its own block)."""

    def __init__(self):
        self.seconds = {e: 0.0 for e in EVENTS}
        self.by_function: Counter = Counter()
        self.seconds_by_function: Counter = Counter()
        self.wall_s = 0.0
        self._t0 = None

    def _add(self, event, duration, fun_name):
        self.seconds[event] += float(duration)
        name = str(fun_name)
        self.seconds_by_function[name if name.startswith("jit(") else f"jit({name})"] += duration
        if event == BACKEND:
            self.by_function[str(fun_name)] += 1

    def __enter__(self) -> "CompileClock":
        _ensure_listener()
        self._t0 = time.perf_counter()
        with _lock:
            _active.append(self)
        return self

    def __exit__(self, *exc) -> None:
        with _lock:
            _active.remove(self)
        self.wall_s = time.perf_counter() - self._t0

    @property
    def compile_s(self) -> float:
        """Trace + lower + XLA compile seconds of every compilation in the block."""
        return sum(self.seconds.values())

    @property
    def run_s(self) -> float:
        """Wall seconds of the block minus :attr:`compile_s` (0 while the block runs)."""
        return max(0.0, self.wall_s - self.compile_s)

    @property
    def n_compiles(self) -> int:
        """Number of XLA backend compilations in the block."""
        return sum(self.by_function.values())

    def as_dict(self) -> dict:
        """JSON-ready summary: wall/compile/run seconds, trace/lower/backend split, counts."""
        return {"wall_s": self.wall_s, "compile_s": self.compile_s, "run_s": self.run_s,
                "trace_s": self.seconds[TRACE], "lower_s": self.seconds[LOWER],
                "backend_compile_s": self.seconds[BACKEND], "n_compiles": self.n_compiles,
                "method": "sum of jax.monitoring compile events (trace + lower + XLA "
                          "compile); run_s = wall_s - compile_s"}
