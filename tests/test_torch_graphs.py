"""The CUDA-graph stand-in for CPU tensors (``tests/torch_graphs.py``): a replay
runs the recorded operations and Triton launches again into the same tensors,
host values stay as recorded, and what a capture refuses raises."""

import numpy as np
import pytest

from tests.conftest import CUDA, HAS_TRITON

torch = pytest.importorskip("torch")
from tests import torch_graphs  # noqa: E402


def test_a_replay_runs_the_operations_again_into_the_same_tensors():
    a, out, total = torch.arange(4.0), torch.zeros(4), torch.zeros(())
    scale = 3.0

    def body():
        fresh = a * scale + 1  # a tensor the recording gives out
        out.copy_(fresh)
        out[1:3] = a[1:3] * 0  # through views
        total.add_(fresh.sum())  # in place
        body.fresh = fresh

    graph = torch_graphs.record(body)
    assert out.tolist() == [1.0, 0.0, 0.0, 10.0] and total.item() == 22.0
    graph.replay()  # stands for the recording's own run
    assert total.item() == 22.0
    a.copy_(torch.tensor([1.0, 1.0, 1.0, 2.0]))
    scale = 100.0  # host values are as recorded
    graph.replay()
    assert out.tolist() == [4.0, 0.0, 0.0, 7.0] and total.item() == 22.0 + 19.0
    assert body.fresh.tolist() == [4.0, 4.0, 4.0, 7.0]  # written where it was given out
    assert graph.replays == 2


@pytest.mark.parametrize("read", [lambda t: t.item(), float, bool,
                                  torch.nonzero, lambda t: t[t > 0], torch.unique,
                                  lambda t: t.__setitem__(t > 0, t * 2),
                                  lambda t: torch.equal(t, t),
                                  lambda t: torch.linalg.inv(t.reshape(1, 1)),
                                  lambda t: torch.linalg.cholesky(t.reshape(1, 1))])
def test_a_recording_refuses_what_a_capture_refuses(read):
    t = torch.ones(1)
    with pytest.raises(torch_graphs.CaptureRefused, match="stream is capturing"):
        torch_graphs.record(lambda: read(t))


def test_waits_are_counted_not_refused():
    t = torch.full((2, 2), 4.0)
    with torch_graphs.counted_waits() as waits:
        t.sum().item()
        torch.linalg.inv(t + torch.eye(2))
        torch.linalg.inv_ex(t + torch.eye(2))
        t[t > 1]
    assert [str(w) for w in waits] == ["aten._local_scalar_dense.default",
                                       "aten._linalg_check_errors.default",
                                       "aten.index.Tensor"]


def test_reads_into_numpy_and_python_are_counted_as_copies():
    """A GPU tensor's numpy(), tolist() or np.asarray goes through a copy to the
    host, which waits: a CPU tensor's reads are counted in their place."""
    t = torch.arange(3.0)
    with torch_graphs.counted_waits() as waits:
        t.numpy()
        t.cpu().tolist()
        np.asarray(t)
        t + 1
    assert [str(w) for w in waits] == ["Tensor.numpy", "Tensor.tolist", "Tensor.numpy"]
    assert torch.Tensor.numpy(t).tolist() == [0.0, 1.0, 2.0]  # the methods put back


def test_a_recording_takes_factorisations_that_keep_their_status_on_the_device():
    t = torch.full((1, 1), 4.0)
    torch_graphs.record(lambda: (torch.linalg.inv_ex(t), torch.linalg.cholesky_ex(t)))


@pytest.mark.skipif(not HAS_TRITON or CUDA, reason="Triton's interpreter runs off a GPU")
def test_a_replay_launches_the_recorded_triton_kernels_again():
    import triton
    import triton.language as tl

    @triton.jit
    def _plus_one(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        tl.store(y_ptr + i, tl.load(x_ptr + i, mask=i < n) + 1, mask=i < n)

    x, y = torch.zeros(5), torch.zeros(5)
    graph = torch_graphs.record(lambda: _plus_one[(1,)](x, y, 5, BLOCK=8))
    assert y.tolist() == [1.0] * 5
    x.fill_(2.0)
    graph.replay()
    assert y.tolist() == [1.0] * 5  # the first replay stands for the recording's run
    graph.replay()
    assert y.tolist() == [3.0] * 5
    assert len(graph.work) == 1  # the launch alone: the interpreter's copies are its own
