"""``bench/triton_check.py --no-flash`` (the last stage of a GPU session's
``backlog2``: the reference grid, float64's compute cost, the EM iteration
against sklearn) at small shapes on the CPU: Triton through the interpreter,
CuPy on the CUDA emulator.  A part that fails costs a GPU session its tables;
here it fails the test.  The timings mean nothing here."""

import numpy as np
import pytest

from tests.conftest import SCRIPT_DRY_RUN, bench_script, script_output

pytestmark = SCRIPT_DRY_RUN
pytest.importorskip("torch")


@pytest.fixture
def script(cupy, monkeypatch):
    """The script, with the emulator's cupy installed (``bench_script``)."""
    return bench_script("triton_check", monkeypatch)


def test_reference_grid(script, capsys):
    worst = script.check(np.random.default_rng(0), "cpu", shapes=((1, 1, 1), (37, 5, 3)))
    lines = script_output(capsys, ("FAIL", "ERROR"))
    assert len(lines) == 4 * 2 * 2 and worst < 2e-4


def test_float64_compute_cost(script, capsys, kernel_launches):
    rows = script.run_float64_compute_cost(np.random.default_rng(0), "cpu",
                                           (("spherical", 60, 6, 70), ("tied", 60, 5, 3)))
    script_output(capsys, ("FAIL", "ERROR"))
    assert [(r[0], r[1]) for r in rows] == [("triton", "spherical"), ("cupy", "spherical"),
                                             ("triton", "tied"), ("cupy", "tied")]
    assert kernel_launches["triton"] and kernel_launches["cupy"], kernel_launches


def test_em_iteration_table(script, capsys, kernel_launches):
    script.run_em_iteration_table("cpu", (("diag", 120, 3, 4), ("full", 90, 2, 3)),
                                  iterations=2)
    lines = script_output(capsys, ("FAIL", "ERROR"))
    assert [line.split()[1] for line in lines] == ["diag", "full"]
    assert kernel_launches["triton"], kernel_launches
