"""Smoke run of ``experiments.benchmarks.vs_saelens --quick`` (synthetic 32-d data, 20 steps;
a check that the script runs end to end against the installed SAELens, not a benchmark):
its LAST line parses, the numbers are finite, and its JSON shows that SAELens's own forward
and ``sae.model`` on the weights read back by ``sae.io.load_saelens`` agree."""
import json
import math
import re

import pytest

pytest.importorskip("sae_lens")

from experiments.benchmarks import vs_saelens  # noqa: E402

LAST = re.compile(r"^speed_vs_saelens=(\S+) sweep4_vs_saelens=(\S+) ev_delta=(\S+) "
                  r"l0_ratio=(\S+)$")


def test_quick_run_last_line_parses(tmp_path, capsys):
    vs_saelens.main(["--quick", "--out", str(tmp_path)])
    lines = capsys.readouterr().out.strip().splitlines()
    m = LAST.match(lines[-1])
    assert m, f"last line does not parse: {lines[-1]!r}"
    speed, sweep4, ev_delta, l0_ratio = map(float, m.groups())
    assert all(math.isfinite(v) for v in (speed, sweep4, ev_delta, l0_ratio))
    assert speed > 0 and sweep4 > 0 and l0_ratio > 0 and abs(ev_delta) < 1
    rec = json.loads((tmp_path / "vs_saelens_quick.json").read_text())
    assert rec["forward_max_abs_diff"] <= 1e-4
    assert len(rec["rows"]) == 10  # 2 single runs + 2 × 4 sweep members
    assert {r["who"] for r in rec["rows"]} == {"ours", "saelens"}
    assert all(0 < r["ev"] <= 1 and r["l0"] > 0 for r in rec["rows"])
    assert (tmp_path / "vs_saelens_quick.png").stat().st_size > 1000
