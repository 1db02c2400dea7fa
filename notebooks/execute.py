"""Execute the notebooks with nbclient (used by ``make notebooks`` and tests/test_notebooks.py).

    python notebooks/execute.py [--small] [--out results/notebooks] [--timeout 1800] [NAME ...]

Each ``.ipynb`` runs in a fresh kernel of *this* Python (``sys.executable``: the venv), with
its working directory a temporary folder (or ``--cwd``), ``SMALL=1`` in the environment
with ``--small`` (fast mode) and ``HF_HUB_OFFLINE=1`` unless already set. ``--out`` writes
the executed copies there. Prints the wall time of each notebook; exits non-zero if one
fails (the failing cell's error is printed).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
NOTEBOOKS = sorted(p.name for p in HERE.glob("[0-9][0-9]_*.ipynb"))


def _kernel_manager(kernel_dir: Path):
    """A kernel manager whose only kernelspec runs ``sys.executable -m ipykernel_launcher``
    (so the kernel is this venv's Python whatever kernelspecs the machine has)."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec = kernel_dir / "kernels" / "jaxsense-venv"
    spec.mkdir(parents=True, exist_ok=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "jaxsense venv", "language": "python"}))
    ksm = KernelSpecManager(kernel_dirs=[str(spec.parent)])
    return KernelManager(kernel_name="jaxsense-venv", kernel_spec_manager=ksm)


def execute(path, *, small: bool, cwd=None, timeout: int = 1800, out=None, env=None):
    """Run one notebook; returns (executed notebook, wall seconds, kernel CPU seconds).
    Raises ``nbclient.exceptions.CellExecutionError`` on the first failing cell. The CPU
    time is the kernel process's (user + system, all threads) after its last cell; on a
    machine shared with other jobs it is a steadier measure than the wall time."""
    import nbformat
    import psutil
    from nbclient import NotebookClient

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    run_env = dict(os.environ if env is None else env)
    run_env.setdefault("HF_HUB_OFFLINE", "1")
    run_env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    if small:
        run_env["SMALL"] = "1"
    else:
        run_env.pop("SMALL", None)
    with tempfile.TemporaryDirectory(prefix="nbkernel_") as kd, \
            tempfile.TemporaryDirectory(prefix="nbcwd_") as tmp_cwd:
        work = Path(cwd) if cwd is not None else Path(tmp_cwd)
        km = _kernel_manager(Path(kd))
        cpu = {"s": float("nan")}

        def sample_cpu(**_):  # after every cell: the kernel's CPU time so far
            try:
                t = psutil.Process(km.provisioner.process.pid).cpu_times()
                cpu["s"] = t.user + t.system + t.children_user + t.children_system
            except (AttributeError, psutil.Error):
                pass

        client = NotebookClient(nb, km=km, timeout=timeout, on_cell_executed=sample_cpu,
                                resources={"metadata": {"path": str(work)}})
        t0 = time.perf_counter()
        try:
            client.execute(env=run_env, cwd=str(work))
        finally:
            seconds = time.perf_counter() - t0
            if out is not None:
                Path(out).mkdir(parents=True, exist_ok=True)
                nbformat.write(nb, Path(out) / path.name)
    return nb, seconds, cpu["s"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help=f"notebooks (default: all of {NOTEBOOKS})")
    ap.add_argument("--small", action="store_true", help="fast mode (SMALL=1)")
    ap.add_argument("--out", default=None, help="folder for the executed copies")
    ap.add_argument("--cwd", default=None, help="working directory (default: a temp folder)")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    a = ap.parse_args(argv)
    from nbclient.exceptions import CellExecutionError

    names = a.names or NOTEBOOKS
    total, total_cpu, failed = 0.0, 0.0, []
    for name in names:
        p = HERE / (name if name.endswith(".ipynb") else name + ".ipynb")
        if not p.is_file():
            p = Path(name)
        t0 = time.perf_counter()
        try:
            _, s, cpu = execute(p, small=a.small, cwd=a.cwd, timeout=a.timeout, out=a.out)
            status = "ok"
        except CellExecutionError as e:
            s, cpu, status = time.perf_counter() - t0, float("nan"), "FAILED"
            failed.append(p.name)
            print(str(e)[-3000:], file=sys.stderr)
        total += s
        total_cpu += cpu
        print(f"{p.name}: {status} in {s:.1f} s wall, {cpu:.1f} s CPU "
              f"({'SMALL=1' if a.small else 'full'}; load average {os.getloadavg()[0]:.1f})",
              flush=True)
    print(f"total {total:.1f} s wall, {total_cpu:.1f} s CPU for {len(names)} notebooks")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
