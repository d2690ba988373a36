"""The floor of ``bench/vae_vs_peers.py``'s loss table and ``bench/triton_launch_host.py
--harness``, which times the losses' host work against it.

The floor is what any fused loss (one autograd node) costs at least in the table's
harness; eager / floor bounds the fused loss's gain over eager where a GPU call is
host-bound (issue 7's 3x).  A floor that ran kernels, or built more than one node,
would understate that bound."""

import os
import subprocess
import sys

import pytest

from tests.conftest import SCRIPT_DRY_RUN, bench_script

torch = pytest.importorskip("torch")

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("k", [1, 3])
def test_the_floor_is_one_node_that_runs_no_kernel(k, monkeypatch):
    from torch.utils._python_dispatch import TorchDispatchMode

    script = bench_script("vae_vs_peers", monkeypatch)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 7, generator=g)
    logits = torch.randn(k, 5, 7, generator=g, requires_grad=True)
    mu = torch.randn(5, 3, generator=g, requires_grad=True)
    logvar = torch.randn(5, 3, generator=g, requires_grad=True)
    z = torch.randn(k, 5, 3, generator=g, requires_grad=True) if k > 1 else None
    inputs = [logits, mu, logvar] + ([z] if k > 1 else [])

    ops = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(func.__name__)
            return func(*args, **(kwargs or {}))

    upstream = torch.ones(5)
    with Record():
        out = script.floor_loss(x, logits, mu, logvar, z)
        grads = torch.autograd.grad(out, inputs, upstream)
    assert out.shape == (5,)
    assert [g.shape for g in grads] == [t.shape for t in inputs]
    # unfilled memory only: the floor computes nothing
    assert ops and set(ops) <= {"empty.memory_format", "new_empty.default"}, ops
    # one node, straight onto the inputs' accumulators
    nexts = [f for f, _ in out.grad_fn.next_functions if f is not None]
    assert [f.variable for f in nexts] == inputs


@SCRIPT_DRY_RUN
def test_the_harness_rows_time_fused_eager_and_floor():
    """``--harness`` at two rounds of one call (Triton's sm_90 stand-in; no GPU)."""
    run = subprocess.run([sys.executable, "bench/triton_launch_host.py", "--harness",
                          "--rounds", "2", "--calls", "1"], cwd=_ROOT, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [line for line in run.stdout.splitlines() if line.startswith("harness")]
    assert [row.split(",")[1].strip() for row in rows] == ["k = 1", "k = 50"], run.stdout
    for row in rows:
        for part in ("fused, stub", "fused, direct", "eager", "floor", "eager / floor"):
            assert part in row, row
