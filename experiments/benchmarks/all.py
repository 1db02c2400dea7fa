"""`make bench`: run every benchmark script in turn (each prints a table and a LAST line)."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

BENCHMARKS = ("subgm_vs_numpy", "subgm_sweep", "sae_train", "activation_cache", "atoms")


def _name(s: str) -> str:
    if s not in BENCHMARKS:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(BENCHMARKS)}, got {s!r}")
    return s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.benchmarks.all",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", type=_name, default=[], metavar="NAME",
                    help="benchmarks to run, default all: " + " ".join(BENCHMARKS))
    a = ap.parse_args(argv)
    names = a.names or list(BENCHMARKS)
    failed = []
    for name in names:
        mod = f"experiments.benchmarks.{name}"
        if importlib.util.find_spec(mod) is None:
            print(f"== {name}: not present, skipped ==")
            continue
        print(f"== {name} ==", flush=True)
        try:
            importlib.import_module(mod).main([])
        except Exception as e:  # keep going; report at the end
            failed.append(f"{name}: {type(e).__name__}: {e}")
    for f in failed:
        print("FAILED", f)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
