"""The side-by-side runner (``fastlvm bench``) on tiny workloads: its table and rows."""

import re

import numpy as np
import pytest

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


_DISCOVER = """
import importlib, importlib.abc, pkgutil, sys
blocked = set(sys.argv[1].split(",")) - {""}

class Block(importlib.abc.MetaPathFinder):  # as if these were not installed
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r}")

sys.meta_path.insert(0, Block())
sys.path.insert(0, sys.argv[2])
import bench
failed = []
for m in pkgutil.iter_modules(bench.__path__):
    try:
        importlib.import_module("bench." + m.name)
    except Exception as exc:
        failed.append(f"bench.{m.name}: {exc!r}")
print("\\n".join(failed))
"""


@pytest.mark.parametrize("missing", ["", "torch,triton,cupy,pyro"])
def test_asv_can_import_every_module_of_bench(missing):
    """asv imports every module of its benchmark_dir (bench/) before it runs anything,
    and one import error stops it; its own environment has no torch (no extras).
    A script whose sibling import or top-level ``import torch`` failed there broke
    ``asv run`` outright."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", _DISCOVER, missing, root], cwd="/",
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", done.stdout


@pytest.mark.parametrize("args, message", [
    (["--scale", "-1"], "--scale: must be above 0"),
    (["--repeat", "0"], "--repeat: must be above 0"),
    (["--dtypes", "float16"], "invalid choice: 'float16'"),
    (["--covariance-types", "fulll"], "invalid choice: 'fulll'"),
])
def test_bench_refuses_bad_arguments_before_it_runs(args, message, capsys):
    """A negative scale reached sklearn as an ill-defined-covariance error."""
    from fastlvm.benchmarks import main

    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.slow
def test_sm90_tile_stacks_reports_each_candidates_builds():
    """``bench/sm90_tile_stacks.py`` compiles the table's tiles and a candidate's for
    sm_90 (no GPU) and prints each launch's registers and stack: the MPPCA kernels'
    two float32 passes, one line per candidate."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, os.path.join(root, "bench", "sm90_tile_stacks.py"),
                          "mppca", "32", "--q", "4", "--tiles", "16,4"], env=env,
                         capture_output=True, text=True, timeout=600)
    if run.returncode and "ptxas" in run.stderr and "not found" in run.stderr.lower():
        pytest.skip("Triton's CUDA backend has no ptxas here")
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["q=4 table", "q=4 (16, 4)"]
    for line in lines:  # both passes of both kernels, each with registers and stack
        assert len(re.findall(r"\[pass [12],\d+,\d\] \d+r/\d+B", line)) == 4, line
    assert "stats[pass 1,16,4]" in lines[1]


def test_bench_patches_come_undone_even_on_an_error(monkeypatch):
    """``bench/_patched.py``: the scripts' one way to set a module attribute or an
    environment variable for a block of timings; a candidate that fails must not
    leave its value behind for the rows timed after it."""
    import os
    import types

    bench_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "bench")
    monkeypatch.syspath_prepend(bench_dir)
    from _patched import attributes_set, environ_set

    module = types.SimpleNamespace(TILE=32, BLOCKS=2)
    monkeypatch.setenv("FASTLVM_BENCH_SET", "before")
    monkeypatch.delenv("FASTLVM_BENCH_UNSET", raising=False)
    with pytest.raises(RuntimeError, match="candidate failed"):
        with attributes_set(module, TILE=128, BLOCKS=4), environ_set(
                FASTLVM_BENCH_SET=None, FASTLVM_BENCH_UNSET="during"):
            assert (module.TILE, module.BLOCKS) == (128, 4)
            assert "FASTLVM_BENCH_SET" not in os.environ
            assert os.environ["FASTLVM_BENCH_UNSET"] == "during"
            raise RuntimeError("candidate failed")
    assert (module.TILE, module.BLOCKS) == (32, 2)
    assert os.environ["FASTLVM_BENCH_SET"] == "before"
    assert "FASTLVM_BENCH_UNSET" not in os.environ
