"""``bench/cupy_vs_triton.py``'s E-step rows (part of what a GPU session's
``kernels`` stage times, issue 4) at small shapes on the CPU: Triton through the
interpreter, CuPy on the CUDA emulator.  A row whose call fails prints ERROR
and times NaN, which on a GPU costs the stage's device time; here it fails the
test.  Timings here mean nothing.  The EM rows fit whole models, which the
emulator's NumPy-backed ``cupy`` cannot (its arrays are NumPy's, whose
``device`` is a string, and it takes every NumPy array for a cupy one)."""

import math
from pathlib import Path

import pytest

from tests.conftest import CUDA, HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON or CUDA,
                                reason="on a GPU the script runs itself (bench/gpu_session.sh"
                                       " kernels); here Triton needs its interpreter")
torch = pytest.importorskip("torch")
BENCH = Path(__file__).resolve().parents[1] / "bench"


def _rows(rows, capsys):
    rows = list(rows)
    printed = capsys.readouterr().out
    assert "ERROR" not in printed, printed
    for label, t_tr, t_cp, t_chunked in rows:
        assert math.isfinite(t_tr) and math.isfinite(t_cp), label
        assert t_chunked is None or math.isfinite(t_chunked), label
    return rows


def test_estep_rows(cupy_backend, monkeypatch, capsys):
    from bench import cupy_vs_triton as cvt

    monkeypatch.syspath_prepend(str(BENCH))  # the script's own imports, as when run
    rows = _rows(cvt.estep_rows(torch, cupy_backend.estep.cupy, True, 1, device="cpu",
                                shape=(90, 6, 70)), capsys)
    assert [r[0].split()[-2] for r in rows] == list(cvt.COVS)
    assert "K=64 full" in rows[0][0] and "K=70 tied" in rows[1][0]

