"""experiments.subgm.all publishes a whole run atomically: a run that fails (or is
interrupted) at figure k leaves the published results byte-identical; a complete run
replaces them with one os.replace of the link; timings land in summary.json."""
import json
import sys
import types

import pytest

from experiments import common
from experiments.subgm import all as subgm_all


def _fake_figure(name, calls, fail=None):
    """A figure module: main(argv) writes <name>.json/.png into --out (atomically)."""

    def main(argv):
        out = argv[argv.index("--out") + 1]
        calls.append(name)
        if fail is not None:
            raise fail
        data = {"figure": name, "call": len(calls)}
        common.save_json(f"{out}/{name}.json", data)
        common.atomic_write_bytes(f"{out}/{name}.png", f"png {name} {len(calls)}".encode())
        return data

    def claims(data):
        return [{"fig": name, "claim": f"claim of {name}", "measured": str(data["call"]),
                 "verdict": "supported"}]

    return types.SimpleNamespace(main=main, claims=claims)


@pytest.fixture
def figures(monkeypatch):
    """install(fail_at=None): fake fig1a/fig1b/fig1c; the one named fail_at raises."""
    calls = []

    def install(fail_at=None, exc=None):
        exc = RuntimeError("boom") if exc is None else exc
        for n in ("fig1a", "fig1b", "fig1c"):
            mod = _fake_figure(n, calls, exc if n == fail_at else None)
            monkeypatch.setitem(sys.modules, f"experiments.subgm.{n}", mod)
        return calls

    return install


def _snapshot(out):
    """Link target and every file's bytes under the published folder."""
    return (out.readlink() if out.is_symlink() else None,
            {f.name: f.read_bytes() for f in sorted(out.iterdir())})


ONLY = ["--only", "fig1a,fig1b,fig1c"]


@pytest.mark.parametrize("exc", [RuntimeError("boom at fig1b"), KeyboardInterrupt()])
def test_failed_run_leaves_published_results_byte_identical(tmp_path, figures, capsys, exc):
    out = tmp_path / "results" / "subgm"
    figures()
    first = subgm_all.main(ONLY + ["--out", str(out)])
    assert out.is_symlink() and out.resolve() == first["stage"].resolve()
    before = _snapshot(out)
    assert {"fig1a.json", "fig1b.png", "fig1c.json", "claims.md", "summary.json"} <= set(before[1])

    calls = figures(fail_at="fig1b", exc=exc)
    with pytest.raises(type(exc)):
        subgm_all.main(ONLY + ["--out", str(out)])
    assert calls[-2:] == ["fig1a", "fig1b"]  # fig1a of the new run did write its files
    assert _snapshot(out) == before  # ... but the published results are untouched
    err = capsys.readouterr().err
    partial = [p for p in subgm_all.runs_dir(out).iterdir() if p.resolve() != out.resolve()]
    assert len(partial) == 1 and str(partial[0]) in err and "untouched" in err
    assert json.loads((partial[0] / "fig1a.json").read_bytes())["call"] == len(calls) - 1
    assert not (partial[0] / "summary.json").exists()  # never marked complete


def test_complete_run_replaces_results_and_records_timings(tmp_path, figures):
    out = tmp_path / "subgm"
    out.mkdir()  # a plain folder from before: migrated, its extra file carried over
    (out / "phase_transition.json").write_text("{}")
    figures()
    a = subgm_all.main(ONLY + ["--out", str(out)])
    legacy = subgm_all.runs_dir(out) / f"legacy-{a['run_id']}"
    assert (legacy / "phase_transition.json").read_text() == "{}"
    assert out.is_symlink() and (out / "phase_transition.json").read_text() == "{}"
    before = _snapshot(out)

    b = subgm_all.main(["--only", "fig1b", "--out", str(out), "--keep-runs", "1"])
    after = _snapshot(out)
    assert after[0] != before[0] and out.resolve() == b["stage"].resolve()
    assert after[1]["fig1b.png"] != before[1]["fig1b.png"]  # re-run
    assert after[1]["fig1a.png"] == before[1]["fig1a.png"]  # carried over, not lost
    s = json.loads(after[1]["summary.json"])
    assert s["complete"] and s["figures_run"] == ["fig1b"]
    assert s["carried_from_previous"] == {"fig1a": a["run_id"], "fig1c": a["run_id"]}
    assert set(s["files_kept_from_previous"]) >= {"fig1a.json", "phase_transition.json"}
    t = s["figures"]["fig1b"]["timing"]
    assert {"wall_s", "compile_s", "run_s", "n_compiles"} <= set(t)
    assert t["compile_s"] >= 0 and abs(t["wall_s"] - t["compile_s"] - t["run_s"]) < 1e-9
    claims = after[1]["claims.md"].decode()
    assert "claim of fig1a" in claims and "claim of fig1b" in claims
    assert f"fig1a (run {a['run_id']})" in claims
    # --keep-runs 1: the older complete run is removed, the legacy folder never
    assert not a["stage"].exists() and legacy.exists()


@pytest.mark.parametrize("mod,argv,flag", [
    ("all", ["--keep-runs", "0"], "--keep-runs"),
    ("fig1c", ["--rho-grid", "0.99,1.5"], "--rho-grid"),
    ("fig1c", ["--tune-seeds", "0"], "--tune-seeds"),
    ("fig4", ["--pad", "min"], "--pad"),
])
def test_new_flags_are_range_checked(tmp_path, monkeypatch, capsys, mod, argv, flag):
    import importlib

    monkeypatch.chdir(tmp_path)
    m = importlib.import_module(f"experiments.subgm.{mod}")
    with pytest.raises(SystemExit) as e:
        m.main(argv)
    assert e.value.code == 2 and flag in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # refused before any folder was made
