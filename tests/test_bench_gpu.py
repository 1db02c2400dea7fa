"""``make bench-gpu`` (experiments.benchmarks.gpu) in its --tiny mode on CPU: the same code
path as the full GPU run, one table, exit status 1 when a correctness check fails."""
import os
import re
import subprocess
import sys

import pytest

from experiments.benchmarks import gpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ("SubGM sweep", "SAE train step", "store -> device")


def _table(out: str) -> dict:
    """Rows of the printed table by part name -> list of cells."""
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] in PARTS:
            rows[cells[0]] = cells
    return rows


def test_tiny_run_prints_one_table_and_passes(capsys):
    rc = gpu.main(["--tiny"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert out.count("| part ") == 1  # one table
    rows = _table(out)
    assert set(rows) == set(PARTS), out
    for name, cells in rows.items():
        assert cells[-1].startswith("ok: "), (name, cells)
    # SubGM recovered every instance; the SAE loss fell; the feed delivered every row
    err = float(re.search(r"max rel err ([0-9.e+-]+)", rows["SubGM sweep"][-1]).group(1))
    assert err <= 1e-4
    first, last = map(float, re.search(r"loss ([0-9.e+-]+) -> ([0-9.e+-]+)",
                                       rows["SAE train step"][-1]).groups())
    assert last < first
    assert re.search(r"rows (\d+)/\1,", rows["store -> device"][-1])
    last_line = out.strip().splitlines()[-1]
    m = re.fullmatch(r"bench_gpu subgm_iters_per_s=(\S+) subgm_roofline=(\S+) "
                     r"sae_tokens_per_s=(\S+) sae_peak_fraction=(\S+) feed_over_step=(\S+) "
                     r"checks=ok", last_line)
    assert m, last_line
    ips, roof, tok, _, ratio = (float(x) for x in m.groups())
    assert ips > 0 and 0 < roof <= 1.5 and tok > 0 and ratio > 0
    # a CPU has no bf16 peak in the table: the fraction says "n/a", not a made-up number
    assert rows["SAE train step"][5] == "n/a"


def test_injected_failures_fail_every_check(capsys):
    rc = gpu.main(["--tiny", "--inject-failure", "subgm,sae,feed"])
    out = capsys.readouterr().out
    assert rc == 1, out
    rows = _table(out)
    assert set(rows) == set(PARTS), out
    for name, cells in rows.items():
        assert cells[-1].startswith("FAIL: "), (name, cells)
    assert out.strip().endswith("checks=FAILED")


def test_exit_status_is_nonzero_on_failure():
    """The command line itself exits 1 on a failed check (status 0 of a clean run: above)."""
    cmd = [sys.executable, "-m", "experiments.benchmarks.gpu", "--tiny", "--parts", "feed"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    bad = subprocess.run(cmd + ["--inject-failure", "feed"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "FAIL: rows" in bad.stdout
    assert bad.stdout.strip().endswith("checks=FAILED")


@pytest.mark.parametrize("kind,peak", [("NVIDIA H200", 989e12), ("NVIDIA H100 80GB HBM3", 989e12),
                                       ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200 NVL", 835e12),
                                       ("cpu", None)])
def test_bf16_peak_table(kind, peak):
    got, label = gpu.bf16_peak(kind)
    assert got == peak
    assert (label == "unknown") == (peak is None)


def test_bad_arguments_exit_2():
    with pytest.raises(SystemExit) as e:
        gpu.main(["--tiny", "--parts", "subgm,gpu"])
    assert e.value.code == 2
