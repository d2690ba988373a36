"""``bench/gpu_profile.py``'s ``flash`` and ``peers`` targets (what a GPU session's
``backlog2`` stage profiles, issue 3) at small shapes on the CPU: Triton through
the interpreter, CuPy on the CUDA emulator (``tests/kernels/fake_cupy.py``), the
profiler on the host's operations.  A target that fails costs a GPU session its
tables; here it fails the test.  The tables' figures mean nothing here."""

import pytest

from tests.conftest import SCRIPT_DRY_RUN, bench_script, script_output

pytestmark = SCRIPT_DRY_RUN
pytest.importorskip("torch")


@pytest.fixture
def script(cupy, monkeypatch):
    """The script, with the emulator's cupy installed (``bench_script``)."""
    return bench_script("gpu_profile", monkeypatch)


def _tables(capsys):
    """The tables' headings, after checking no target printed a failure."""
    return [line for line in script_output(capsys, ("failed", "ERROR"))
            if line.startswith("## ")]


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
