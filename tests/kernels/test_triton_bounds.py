"""The test suite's bounds check of interpreted Triton launches
(``tests/triton_bounds.py``): it is in place wherever the interpreter runs the
kernels, it reports loads and stores past the views a launch was given (in a
project kernel too), and it lets pass what a GPU would: masked-off lanes,
views of one storage, empty tensors."""

import ast
from pathlib import Path

import numpy as np
import pytest

from tests import triton_bounds
from tests.conftest import CUDA, HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON or CUDA,
                                reason="Triton's interpreter runs where there is no GPU "
                                       "(and Triton is installed)")
torch = pytest.importorskip("torch")

KERNELS = Path(__file__).resolve().parents[2] / "kernels"


@pytest.fixture(scope="module")
def copy_kernel():
    """y[i] = x[i + SHIFT] for the i < n_load, stored where i < n_store."""
    import triton
    import triton.language as tl

    @triton.jit
    def _copy(x_ptr, y_ptr, n_load, n_store, SHIFT: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        v = tl.load(x_ptr + i + SHIFT, mask=i < n_load, other=-1.0)
        tl.store(y_ptr + i, v, mask=i < n_store)

    return _copy


def _raises_out_of_bounds(launch, match):
    """The error a launch with a stray access ends in: the interpreter wraps the
    check's :class:`OutOfBoundsAccess` in its own InterpreterError.  Its counts
    are of the first program (block) that strays, for one access."""
    with pytest.raises(Exception, match=match) as info:
        launch()
    assert "OutOfBoundsAccess" in repr(info.value)


def test_the_check_is_installed_under_the_interpreter():
    # conftest installs it; a Triton release without what it wraps would leave
    # the suite unchecked, which must not pass unnoticed
    assert triton_bounds.installed()


def test_accesses_inside_the_views_pass(copy_kernel):
    x = torch.arange(40.0)
    y = torch.full((37,), 7.0)
    copy_kernel[(3,)](x, y, 37, 37, SHIFT=3, BLOCK=16)  # lanes 37-47 masked off
    assert torch.equal(y, x[3:40])
    empty = torch.empty(0)
    copy_kernel[(1,)](empty, empty, 0, 0, SHIFT=0, BLOCK=16)  # nothing enabled
    both = torch.arange(64.0)  # two overlapping views of one storage: one span (one
    copy_kernel[(1,)](both[8:], both[:40], 40, 32, SHIFT=0, BLOCK=64)  # program: no race)
    assert torch.equal(both[:32], torch.arange(8.0, 40.0))
    inner = torch.arange(64.0)  # a view inside another: loads of the outer pass it
    copy_kernel[(3,)](inner, inner[2:4], 40, 2, SHIFT=0, BLOCK=16)
    assert torch.equal(inner[:4], torch.tensor([0.0, 1.0, 0.0, 1.0]))


def test_a_load_past_the_end_is_reported(copy_kernel):
    x, y = torch.arange(40.0), torch.empty(40)
    _raises_out_of_bounds(lambda: copy_kernel[(3,)](x, y, 40, 40, SHIFT=1, BLOCK=16),
                          r"_copy: load: 1 of 8 enabled lanes .* \+160 bytes from the "
                          r"start of x_ptr \(which spans 160 bytes\)")


def test_a_load_before_the_start_is_reported(copy_kernel):
    x, y = torch.arange(40.0), torch.empty(40)
    _raises_out_of_bounds(lambda: copy_kernel[(3,)](x[2:], y, 38, 38, SHIFT=-3, BLOCK=16),
                          r"load: 3 of 16 enabled lanes .* -12 bytes from the start of x_ptr")


def test_a_store_past_a_view_inside_its_storage_is_reported(copy_kernel):
    # the stray write lands on memory the storage owns, so nothing else would see it
    storage = torch.zeros(48)
    x, y = torch.arange(40.0), storage[:32]
    _raises_out_of_bounds(lambda: copy_kernel[(3,)](x, y, 40, 40, SHIFT=0, BLOCK=16),
                          r"_copy: store: 8 of 8 enabled lanes .* \+128 bytes from the "
                          r"start of y_ptr")


def test_a_project_kernel_writing_past_its_output_is_reported():
    """The log-normaliser kernel of the mixture of PPCA, given an output one row
    short (a view of a longer buffer, so the stray write is harmless here): the
    check reports it, and without the check the interpreter writes past the view
    silently, which is the mistake it exists to catch."""
    from fastlvm.kernels._triton_gaussian import dot_precision
    from fastlvm.kernels._triton_low_rank import (TritonLowRankParams,
                                                  _low_rank_log_norm_kernel, new_marks)

    rng = np.random.default_rng(0)
    n, d, k, q = 19, 5, 3, 2
    X = torch.as_tensor(rng.standard_normal((n, d)))
    p = TritonLowRankParams(X, rng.standard_normal((k, d)), rng.standard_normal((k, q, d)),
                            np.ones(k), np.full(k, 1.0 / k))
    longer = torch.full((n,), 123.0, dtype=X.dtype)

    def launch():
        _low_rank_log_norm_kernel[(2,)](
            X, p.const, *p.kernel_args(), new_marks(X, p), longer[:n - 1],
            torch.empty(2, dtype=X.dtype), n, d, k, X.stride(0), X.stride(1), CANCEL=p.cancel,
            HAS_SW=False, PASS=p.passes[0], BLOCK_N=16, BLOCK_D=p.block_d,
            BLOCK_Q=p.block_q, PRECISION=dot_precision(X.dtype))

    _raises_out_of_bounds(launch, r"_low_rank_log_norm_kernel: store: 1 of 3 enabled lanes"
                                  r" .* \+144 bytes from the start of log_norm_ptr")
    with triton_bounds.suspended():
        launch()
    assert longer[n - 1] != 123.0  # written past the view, unreported


def test_check_addresses_names_the_nearest_argument():
    spans = triton_bounds.launch_spans([("a", torch.empty(4)), ("b", torch.empty(0))])
    start = int(spans[0][0])
    addresses = np.array([start, start + 12], dtype=np.uint64)
    triton_bounds.check_addresses(addresses, 4, spans, "k: load")
    with pytest.raises(triton_bounds.OutOfBoundsAccess, match=r"1 of 2 .* \+13 bytes "
                                                              r"from the start of a"):
        triton_bounds.check_addresses(addresses + np.uint64(1), 4, spans, "k: load")
    with pytest.raises(triton_bounds.OutOfBoundsAccess, match="with no tensor argument"):
        triton_bounds.check_addresses(addresses, 4, triton_bounds.launch_spans([]), "k: load")


# tl.* calls whose accesses the check does not see (its module doc)
UNCHECKED = {"atomic_add", "atomic_and", "atomic_cas", "atomic_max", "atomic_min", "atomic_or",
             "atomic_xchg", "atomic_xor", "make_block_ptr", "advance", "make_tensor_descriptor",
             "load_tensor_descriptor", "store_tensor_descriptor", "inline_asm_elementwise"}


def test_no_unchecked_memory_ops():
    found = []
    for path in sorted(KERNELS.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in UNCHECKED:
                found.append(f"{path.relative_to(KERNELS)}:{node.lineno} {node.attr}")
    assert not found, ("memory operations tests/triton_bounds.py does not check; extend it "
                       f"before using them: {found}")
