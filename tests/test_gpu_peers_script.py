"""``bench/gpu_peers.py``'s fastlvm rows (what a GPU session's ``peers`` stage
times against torchgmm and pomegranate, issue 3) at small shapes on the CPU:
Triton through the interpreter (``FASTLVM_BACKEND=triton``, as CUDA tensors take
it), eager and with ``cuda_graph=True``.  A row that fails prints its error and
gets a dash, which on a GPU costs the table its figure; here it fails the test.
The timings mean nothing here; the peers are not installed here."""

import math

import pytest

from tests.conftest import SCRIPT_DRY_RUN, bench_script, script_output

pytestmark = SCRIPT_DRY_RUN
pytest.importorskip("torch")


def test_fastlvm_rows_and_table(monkeypatch, capsys, kernel_launches):
    script = bench_script("gpu_peers", monkeypatch)
    monkeypatch.setenv("FASTLVM_BACKEND", "triton")
    workloads = (("diag", 1200, 3, 4), ("tied", 900, 2, 3))  # N / 10 under quick
    rows = script.table("cpu", True, 1, workloads, only=["fastlvm", "fastlvm graph"])
    script_output(capsys, ("Error", "error"))
    assert [label.split()[:2] for label, _ in rows] == [["diag", "N=120"], ["tied", "N=90"]]
    for label, times in rows:
        assert sorted(times) == ["fastlvm", "fastlvm graph"], label
        assert all(math.isfinite(t) for t in times.values()), (label, times)
    assert kernel_launches["triton"], kernel_launches
    table = script.markdown(rows, "cpu", 1).splitlines()
    assert table[0].endswith("on CPU: fastlvm, torchgmm, pomegranate")
    assert [line.split(" | ")[0] for line in table[-2:]] == [
        "| diag N=120 D=3 K=4", "| tied N=90 D=2 K=3"]
