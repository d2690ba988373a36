"""``bench/triton_check.py --no-flash`` (the last stage of a GPU session's
``backlog2``: the reference grid, float64's compute cost, the EM iteration
against sklearn) at small shapes on the CPU: Triton through the interpreter,
CuPy on the CUDA emulator.  A part that fails costs a GPU session its tables;
here it fails the test.  The timings mean nothing here."""

import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import CUDA, HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON or CUDA,
                                reason="on a GPU the script runs itself (bench/gpu_session.sh"
                                       " check); here Triton needs its interpreter")
pytest.importorskip("torch")
BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def script(cupy, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.delitem(sys.modules, "triton_check", raising=False)
    import triton_check

    return triton_check


def _printed(capsys):
    printed = capsys.readouterr().out
    assert "FAIL" not in printed and "ERROR" not in printed, printed
    return printed.splitlines()


def test_reference_grid(script, capsys):
    worst = script.check(np.random.default_rng(0), "cpu", shapes=((1, 1, 1), (37, 5, 3)))
    lines = _printed(capsys)
    assert len(lines) == 4 * 2 * 2 and worst < 2e-4


def test_float64_compute_cost(script, capsys, kernel_launches):
    rows = script.run_float64_compute_cost(np.random.default_rng(0), "cpu",
                                           (("spherical", 60, 6, 70), ("tied", 60, 5, 3)))
    _printed(capsys)
    assert [(r[0], r[1]) for r in rows] == [("triton", "spherical"), ("cupy", "spherical"),
                                             ("triton", "tied"), ("cupy", "tied")]
    assert kernel_launches["triton"] and kernel_launches["cupy"], kernel_launches


def test_em_iteration_table(script, capsys, kernel_launches):
    script.run_em_iteration_table("cpu", (("diag", 120, 3, 4), ("full", 90, 2, 3)),
                                  iterations=2)
    lines = _printed(capsys)
    assert [line.split()[1] for line in lines] == ["diag", "full"]
    assert kernel_launches["triton"], kernel_launches
