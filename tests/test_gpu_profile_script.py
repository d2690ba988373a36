"""``bench/gpu_profile.py``'s ``flash`` and ``peers`` targets (what a GPU session's
``backlog2`` stage profiles, issue 3) at small shapes on the CPU: Triton through
the interpreter, CuPy on the CUDA emulator (``tests/kernels/fake_cupy.py``), the
profiler on the host's operations.  A target that fails costs a GPU session its
tables; here it fails the test.  The tables' figures mean nothing here."""

import sys
from pathlib import Path

import pytest

from tests.conftest import CUDA, HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON or CUDA,
                                reason="on a GPU the script runs itself (bench/gpu_session.sh"
                                       " backlog2); here Triton needs its interpreter")
pytest.importorskip("torch")
BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def script(cupy, monkeypatch):
    """The script as a module, with its directory on sys.path (its own imports, as
    when run) and the emulator's cupy installed."""
    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.delitem(sys.modules, "gpu_profile", raising=False)
    import gpu_profile

    return gpu_profile


def _tables(capsys):
    printed = capsys.readouterr().out
    assert "failed" not in printed and "ERROR" not in printed, printed
    return [line for line in printed.splitlines() if line.startswith("## ")]


def test_flash(script, capsys, tmp_path):
    script.profile_flash(str(tmp_path), n=80, d=6, k=70, reps=1, device="cpu")
    tables = _tables(capsys)
    # per covariance type: Triton at two precisions, CuPy; 'spherical' two more
    assert len(tables) == 3 * 3 + 2 and "K=70" in tables[0]
    assert (tmp_path / "gpu-profile.txt").read_text().count("## ") == len(tables)


def test_peers(script, capsys, kernel_launches):
    script.profile_peers(None, reps=1, device="cpu",
                         workloads=(("diag", 120, 3, 4), ("full", 90, 2, 3)))
    tables = _tables(capsys)
    assert len(tables) == 2 * 3
    assert [t.split()[1] for t in tables[:3]] == ["Triton", "Triton", "CuPy"]
    assert kernel_launches["triton"] and kernel_launches["cupy"], kernel_launches
