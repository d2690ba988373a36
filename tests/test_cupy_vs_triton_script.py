"""``bench/cupy_vs_triton.py``'s rows (what a GPU session's ``kernels`` stage
times, issue 4) at small shapes on the CPU: Triton through the interpreter, CuPy
on the CUDA emulator (``tests/kernels/fake_cupy.py``), the E-step, the whole EM
iteration (eager and graphed), fused against unfused, and MPPCA.  A row whose
call fails prints ERROR and times NaN, which on a GPU costs the stage's device
time; here it fails the test.  Timings here mean nothing.  Not here: the memory
row, which reads the GPU's allocator."""

import math

import pytest

from tests.conftest import SCRIPT_DRY_RUN, bench_script, script_output

pytestmark = SCRIPT_DRY_RUN
torch = pytest.importorskip("torch")


def _rows(rows, capsys):
    """The rows, each of a label and timings (None: not timed), after checking that
    nothing printed ERROR and every timing is a number."""
    rows = list(rows)
    script_output(capsys)
    for label, *times in rows:
        assert all(t is None or math.isfinite(t) for t in times), (label, times)
        assert times[0] is not None and times[1] is not None, label
    return rows


@pytest.fixture
def script(cupy, monkeypatch):
    """The script, with the emulator's cupy installed (``bench_script``)."""
    return bench_script("cupy_vs_triton", monkeypatch)


def test_estep_rows(script, cupy, capsys):
    rows = _rows(script.estep_rows(torch, cupy, True, 1, device="cpu", shape=(90, 6, 70)),
                 capsys)
    assert [r[0].split()[-2] for r in rows] == list(script.COVS)
    assert "K=64 full" in rows[0][0] and "K=70 tied" in rows[1][0]


def test_em_rows(script, cupy, capsys, kernel_launches):
    rows = _rows(script.em_rows(torch, cupy, True, 1, device="cpu", shape=(120, 3, 4)),
                 capsys)
    assert len(rows) == 2 * len(script.COVS) and "graph" in rows[-1][0]
    assert kernel_launches["triton"] and kernel_launches["cupy"], kernel_launches


def test_fused_rows(script, cupy, capsys, kernel_launches):
    rows = _rows(script.fused_rows(torch, cupy, True, 1, device="cpu", shape=(120, 3, 2)),
                 capsys)
    assert [r[0].split()[0] for r in rows] == ["Triton"] * 5 + ["CuPy"] * 5
    assert "K=8 spherical" in rows[-1][0]
    assert kernel_launches["triton"] and kernel_launches["cupy"], kernel_launches


def test_mppca_rows(script, cupy, capsys):
    rows = _rows(script.mppca_rows(torch, cupy, True, 1, device="cpu",
                                   shape=(40, 6, 3, 2, 140)), capsys)
    assert "N=10 D=140" in rows[1][0] and "diag GMM" in rows[2][0]

