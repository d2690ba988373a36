"""``bench/asv_cells.py``, which times asv classes' cells on the device machine
(no asv there), at small sizes on the CPU: Triton through its interpreter, CuPy
on the CUDA emulator."""

import pytest

from tests.conftest import SCRIPT_DRY_RUN, bench_script

pytestmark = SCRIPT_DRY_RUN
pytest.importorskip("torch")


def test_every_cell_gets_a_timed_row(cupy, monkeypatch, capsys, tmp_path):
    suite = bench_script("benchmarks_gpu", monkeypatch)
    monkeypatch.setattr(suite, "DEVICE", "cpu")
    monkeypatch.setattr(suite, "LINEAR_GAUSSIAN", (60, 5, 2))
    script = bench_script("asv_cells", monkeypatch)
    monkeypatch.setattr(script, "benchmarks_gpu", suite)
    runs = {}
    for backend in ("triton", "cupy"):
        # CPU tensors take Triton's kernels when asked (cupy arrays then cannot)
        if backend == "triton":
            monkeypatch.setenv("FASTLVM_BACKEND", "triton")
        else:
            monkeypatch.delenv("FASTLVM_BACKEND")
        lines = script.main(["LinearGaussianFitGPU", "--reps", "1", "--out",
                             str(tmp_path / "t.md")])
        assert capsys.readouterr().out.splitlines() == lines
        assert (tmp_path / "t.md").read_text().splitlines() == lines
        assert len(lines) == 2 + 8  # header, 2 backends x 4 models
        runs[backend] = [r for r in lines[2:] if f"backend={backend}" in r]
    for backend, rows in runs.items():
        assert len(rows) == 4 and all(r.split(" | ")[2] == "time_fit" and "ERROR" not in r
                                      and float(r.split(" | ")[3].rstrip(" |")) > 0
                                      for r in rows), rows
