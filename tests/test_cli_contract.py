"""One CLI contract for every command (``python -m experiments.…`` / ``sae.…``).

Entry points are DISCOVERED (every module under experiments/ and sae/ with an
``if __name__ == "__main__":`` guard or a ``def main(argv…)``), so a new command cannot skip
the contract: ``main(argv)`` parses with argparse, ``--help`` prints usage and exits 0
without starting work, an unknown flag exits 2, and out-of-range numbers are refused by
argparse (exit 2, the flag named in stderr) before any model loads or any file is written.

All checks run in ONE subprocess (importing each module once, calling ``main([...])``, with
a per-call alarm so a command that starts work instead of exiting is reported, not waited
for), in an empty temporary working folder that must still be empty afterwards.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def discover() -> list[str]:
    mods = []
    for pkg in ("experiments", "sae"):
        for f in sorted((ROOT / pkg).rglob("*.py")):
            src = f.read_text()
            if re.search(r'^if __name__ == ["\']__main__["\']', src, re.M) or re.search(
                    r"^def main\(\s*argv", src, re.M):
                mods.append(".".join(f.relative_to(ROOT).with_suffix("").parts))
    return mods


ENTRY_POINTS = discover()

# (module, argv, text that must appear in stderr): each must exit 2 before any work.
RANGE_CASES = [
    ("experiments.subgm.all", ["--steps-scale", "-1"], "--steps-scale"),
    ("experiments.subgm.all", ["--seeds", "0"], "--seeds"),
    ("experiments.subgm.all", ["--only", "fig1a,fig99"], "--only"),
    ("experiments.subgm.fig1a", ["--seeds", "0"], "--seeds"),
    ("experiments.subgm.fig4", ["--steps", "0"], "--steps"),
    ("experiments.subgm.fig1b", ["--slow-steps", "-5"], "--slow-steps"),
    ("experiments.subgm.phase_transition", ["--seeds", "0"], "--seeds"),
    ("experiments.subgm.scaledsm", ["--max-steps", "10", "0", "10"], "--max-steps"),
    ("experiments.atoms.run", ["--width-mult", "0"], "--width-mult"),
    ("experiments.atoms.run", ["--lams", "1,nan"], "--lams"),
    ("experiments.atoms.run", ["--select-r2", "1.5"], "--select-r2"),
    ("experiments.atoms.run", ["--gemma-scope", "three=x.npz"], "--gemma-scope"),
    ("experiments.atoms.scaling", ["--M", "1000,-3"], "--M"),
    ("experiments.atoms.shift", ["--n-pairs", "0"], "--n-pairs"),
    ("experiments.atoms.splice", ["--ce-texts", "0"], "--ce-texts"),
    ("experiments.benchmarks.subgm_sweep", ["--instances", "12"], "--instances"),
    ("experiments.benchmarks.atoms", ["--bp-iter", "0"], "--bp-iter"),
    ("experiments.benchmarks.activation_cache", ["--threads", "0"], "--threads"),
    ("experiments.benchmarks.all", ["not_a_benchmark"], "NAME"),
    ("experiments.demo", ["--seeds", "0"], "--seeds"),
    ("experiments.target_l0", ["--steps", "0"], "--steps"),
]
RANGE_CASES = [c for c in RANGE_CASES if c[0] in ENTRY_POINTS]

DRIVER = r'''
import contextlib, importlib, io, json, signal, sys

class StartedWork(Exception):
    pass

def _alarm(*_):
    raise StartedWork("no exit within 30 s: the command started work")

signal.signal(signal.SIGALRM, _alarm)
cases = json.loads(sys.argv[1])
out = []
for mod, argv in cases:
    rec = {"mod": mod, "argv": argv}
    o, e = io.StringIO(), io.StringIO()
    try:
        m = importlib.import_module(mod)
        signal.alarm(30)
        with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
            m.main(list(argv))
        rec["code"] = "returned"
    except SystemExit as ex:
        rec["code"] = ex.code if isinstance(ex.code, int) or ex.code is None else str(ex.code)
    except BaseException as ex:
        rec["code"] = f"raised {type(ex).__name__}: {ex}"
    finally:
        signal.alarm(0)
    rec["stdout"], rec["stderr"] = o.getvalue()[:2000], e.getvalue()[-2000:]
    out.append(rec)
print("@@RESULT@@" + json.dumps(out))
'''


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    cases = [(m, ["--help"]) for m in ENTRY_POINTS]
    cases += [(m, ["--definitely-not-a-flag"]) for m in ENTRY_POINTS]
    cases += [(m, argv) for m, argv, _ in RANGE_CASES]
    cwd = tmp_path_factory.mktemp("cli_cwd")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
    p = subprocess.run([PY, "-c", DRIVER, json.dumps(cases)], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=300)
    assert "@@RESULT@@" in p.stdout, p.stderr[-3000:]
    recs = json.loads(p.stdout.split("@@RESULT@@", 1)[1])
    return {(r["mod"], tuple(r["argv"])): r for r in recs}, sorted(os.listdir(cwd))


def test_discovery_finds_the_known_commands():
    for m in ("experiments.subgm.all", "experiments.subgm.fig1a", "experiments.atoms.theory",
              "experiments.atoms.demo", "experiments.benchmarks.all", "experiments.demo"):
        assert m in ENTRY_POINTS
    assert len(ENTRY_POINTS) >= 25


@pytest.mark.parametrize("mod", ENTRY_POINTS)
def test_entry_point_has_main_argv_and_a_plain_main_guard(mod):
    """``main(argv)`` exists and the ``__main__`` block passes no sys.argv of its own (so the
    in-process checks below are what ``python -m`` runs)."""
    src = (ROOT / Path(*mod.split("."))).with_suffix(".py").read_text()
    assert re.search(r"^def main\(\s*argv\b", src, re.M), f"{mod}: no main(argv) function"
    guard = re.split(r'^if __name__ == ["\']__main__["\']:', src, flags=re.M)
    assert len(guard) == 2, f"{mod}: no __main__ guard"
    assert "sys.argv" not in guard[1], f"{mod}: the __main__ block reads sys.argv itself"
    assert re.search(r"\bmain\(\)", guard[1]), f"{mod}: the __main__ block does not call main()"


@pytest.mark.parametrize("mod", ENTRY_POINTS)
def test_help_exits_0_with_usage(results, mod):
    r = results[0][(mod, ("--help",))]
    assert r["code"] in (0, None), r
    assert "usage" in r["stdout"].lower(), r


@pytest.mark.parametrize("mod", ENTRY_POINTS)
def test_unknown_flag_exits_2(results, mod):
    r = results[0][(mod, ("--definitely-not-a-flag",))]
    assert r["code"] == 2, r
    # argparse reports missing required flags (e.g. sae.inspect --sae) before unknown ones
    assert "--definitely-not-a-flag" in r["stderr"] or "required" in r["stderr"], r


@pytest.mark.parametrize("mod,argv,flag", RANGE_CASES)
def test_out_of_range_numbers_refused_naming_the_flag(results, mod, argv, flag):
    r = results[0][(mod, tuple(argv))]
    assert r["code"] == 2, r
    assert flag in r["stderr"] and "expected" in r["stderr"], r


def test_nothing_written_by_help_or_refused_runs(results):
    assert results[1] == [], f"files written in the working folder: {results[1]}"


@pytest.mark.parametrize("argv", [["experiments.atoms.theory", "--help"],
                                  ["experiments.atoms.demo", "--help"],
                                  ["experiments.subgm.all", "--steps-scale", "-1"]])
def test_python_dash_m(tmp_path, argv):
    """The real ``python -m`` path of the three former offenders (theory ran on --help,
    atoms.demo took --help as its output folder, subgm.all clamped a negative scale)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    p = subprocess.run([PY, "-m", *argv], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120)
    if argv[-1] == "--help":
        assert p.returncode == 0 and "usage" in p.stdout.lower(), p.stderr[-2000:]
    else:
        assert p.returncode == 2 and "--steps-scale" in p.stderr, p.stderr[-2000:]
    assert os.listdir(tmp_path) == []


def test_cli_types():
    import argparse

    from experiments import cli

    assert cli.pos_int("3") == 3 and cli.nonneg_int("0") == 0
    assert cli.pos_floats("0.5,2") == (0.5, 2.0) and cli.nonneg_ints("0,3") == [0, 3]
    assert cli.probability("1") == 1.0
    for t, s in ((cli.pos_int, "0"), (cli.pos_int, "1.5"), (cli.nonneg_int, "-1"),
                 (cli.pos_float, "0"), (cli.pos_float, "inf"), (cli.pos_float, "nan"),
                 (cli.probability, "1.01"), (cli.pos_ints, "1,,2"), (cli.pos_ints, "")):
        with pytest.raises(argparse.ArgumentTypeError, match="expected"):
            t(s)


def test_reduced_run_is_marked_in_json_and_plot(tmp_path):
    """A subgm figure run with fewer seeds/steps than the paper setting records it in the
    JSON (``reduced``) and prints it as the plot's top title; a paper-sized run does not."""
    from experiments import common
    from experiments.subgm import base

    titles = {}

    def compute(seeds, steps):
        return {"seeds": seeds, "steps": steps}

    def plot(data, path):
        fig, (ax,) = common.new_figure()
        ax.plot([0, 1], [0, 1])
        common.save_fig(fig, path)
        titles[path.name] = fig._suptitle.get_text() if fig._suptitle else None

    for name, argv in (("small", ["--seeds", "2", "--steps", "30"]),
                       ("paper", ["--seeds", "5", "--steps", "30"])):
        base.cli(name, "doc", compute, plot, lambda d: [], argv, out=str(tmp_path),
                 default_seeds=5, default_steps=30)
    small = json.loads((tmp_path / "small.json").read_text())
    paper = json.loads((tmp_path / "paper.json").read_text())
    assert "seeds=2 < 5" in small["reduced"] and "steps" not in small["reduced"].split(":")[1]
    assert paper["reduced"] is None
    assert titles["small.png"] == small["reduced"] and not titles["paper.png"]
    assert base.reduced_note({"steps_scale": 0.1}, {"steps_scale": 1.0}).endswith(
        "steps_scale=0.1 < 1.0")
