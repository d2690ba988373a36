"""The side-by-side runner (``fastlvm bench``) on tiny workloads: its table and rows."""

import numpy as np

import fastlvm.benchmarks
from fastlvm.benchmarks import run


def test_runner_times_in_rounds_and_prints_one_row_per_workload(monkeypatch):
    monkeypatch.setattr(fastlvm.benchmarks, "BLAS_SETTLE_SECONDS", 0.0)  # a 1000-row iteration
    lines = []
    rows = run([("diag", 1000, 8, 3), ("spherical", 1000, 8, 4)], ["float32", "float64"],
               repeat=3, out=lines.append)
    assert len(rows) == 4
    table = [line for line in lines if line.startswith("| ") and "N=" in line]
    assert len(table) == 4
    for row, line in zip(rows, table):
        assert len(row["round_ratios"]) == 3
        assert all(r > 0 for r in row["round_ratios"])
        assert np.isclose(row["ratio"], row["sklearn"] / row["fastlvm"])
        assert f"{np.median(row['round_ratios']):.1f}x (" in line
        assert row["dtype"] in line
