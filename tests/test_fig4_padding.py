"""Fig. 4 sweeps m with one compiled scan: padded rows give the unpadded numbers, and the
second m compiles neither the ℓ2-RIP estimator nor the GD/SubGM scans."""
import numpy as np

from experiments.subgm import fig4
from experiments.subgm.timing import CompileClock

HEAVY = ("jit(single)", "jit(_l2_rip)")  # jaxsense.run's scan, jaxsense.rip's estimator
# the adversarial ℓ2-RIP program alone takes ≈ 4–8 s to compile here, three times over:
# skipped (adv_samples=0); its objective and gradient are the ℓ2 ratio and ℓ2 gradient
# that tests/test_sweep.py::test_pad_rows_* checks exactly
KW = {"steps": 200, "rip_samples": 64, "adv_samples": 0}
M_PAD = 400


def _heavy(clock):
    return {k: clock.by_function[k] for k in HEAVY}


def test_padded_cells_equal_unpadded_and_compile_once(x64):
    padded, plain, clocks = {}, {}, {}
    for m in (200, 300):
        with CompileClock() as clocks[m]:
            padded[m] = fig4.cell(m, 0, m_pad=M_PAD, **KW)
    # the second m reuses every heavy program of the first (same padded shapes)
    assert _heavy(clocks[300]) == {k: 0 for k in HEAVY}, clocks[300].by_function
    for m in (200, 300):
        with CompileClock() as c:
            plain[m] = fig4.cell(m, 0, **KW)
        # positive control (the counter sees compiles): true shapes are new programs
        assert all(n >= 1 for n in _heavy(c).values()), c.by_function
    for m in (200, 300):
        a, b = padded[m], plain[m]
        # ℓ2 quantities (RIP ratio, GD on the ℓ2 loss) are exactly the m-row ones; only
        # the rounding of the √(m_pad/m)-scaled rows differs (measured ≤ 1.1e-15)
        np.testing.assert_allclose(a["delta_random"], b["delta_random"], rtol=1e-13)
        np.testing.assert_allclose(a["GD-ℓ2"], b["GD-ℓ2"], rtol=1e-13)
        # SubGM: same Sign pattern, scale-free step (eq. 10); sign-sensitive dynamics carry
        # the 1e-16 rounding to 6e-11 relative after 200 steps (measured)
        np.testing.assert_allclose(a["SubGM-ℓ1"], b["SubGM-ℓ1"], rtol=1e-9)
        # the comparison is not vacuous: errors moved from 1.0 and differ between m
        assert np.all(a["SubGM-ℓ1"] < 0.5) and np.all(a["GD-ℓ2"] < 0.5)
    assert not np.allclose(padded[200]["GD-ℓ2"], padded[300]["GD-ℓ2"], rtol=1e-3)
