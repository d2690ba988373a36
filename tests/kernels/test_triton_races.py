"""The test suite's program-order check of interpreted Triton launches
(``tests/triton_races.py``): it is in place wherever the interpreter runs the
kernels, it reports two programs storing to one address and a program loading
what another stores (in a project kernel too), and it lets a program load and
store its own addresses."""

import numpy as np
import pytest

from tests import triton_races
from tests.conftest import CUDA, HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON or CUDA,
                                reason="Triton's interpreter runs where there is no GPU "
                                       "(and Triton is installed)")
torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def _scaled(x_ptr, y_ptr, n, SHIFT: tl.constexpr, BLOCK: tl.constexpr):
        """y[i + SHIFT] = 2 x[i] for i < n (in place when y is x)."""
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        v = tl.load(x_ptr + i, mask=i < n)
        tl.store(y_ptr + i + SHIFT, 2 * v, mask=i < n)

    @triton.jit
    def _total(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        """out[0] = the sum of one program's block (every program stores it)."""
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out_ptr, tl.sum(tl.load(x_ptr + i, mask=i < n, other=0.0), axis=0))

    return _scaled, _total


def _raises_hazard(launch, match):
    with pytest.raises(Exception, match=match) as info:
        launch()
    assert "ProgramOrderHazard" in repr(info.value)


def test_the_check_is_installed_under_the_interpreter():
    assert triton_races.installed()


def test_programs_that_keep_to_their_own_addresses_pass(kernels):
    scaled, _ = kernels
    x = torch.arange(40.0)
    scaled[(3,)](x, x, 40, SHIFT=0, BLOCK=16)  # in place, each program its own block
    assert torch.equal(x, 2 * torch.arange(40.0))
    y = torch.zeros(41)
    scaled[(3,)](x, y, 40, SHIFT=1, BLOCK=16)  # shifted, into another tensor
    assert torch.equal(y[1:], 2 * x)


def test_two_programs_storing_to_one_address_are_reported(kernels):
    _, total = kernels
    x, out = torch.arange(40.0), torch.zeros(1)
    _raises_hazard(lambda: total[(3,)](x, out, 40, BLOCK=16),
                   r"_total: programs \(0, 0, 0\) and \(1, 0, 0\) both store to \+0 bytes "
                   r"from the start of out_ptr")


def test_a_program_loading_what_another_stores_is_reported(kernels):
    scaled, _ = kernels
    x = torch.arange(41.0)
    # in place, one to the right: program 0 stores x[16], which program 1 loads
    _raises_hazard(lambda: scaled[(3,)](x, x, 40, SHIFT=1, BLOCK=16),
                   r"_scaled: program \(1, 0, 0\) loads \+64 bytes from the start of x_ptr, "
                   r"which program \(0, 0, 0\) stores to")


def test_a_project_kernel_whose_partials_collide_is_reported():
    """The mixture of PPCA's statistics kernel writes its partials at split * K +
    k; told K = 1 while launched over 3 components, the programs (k, split) =
    (1, 0) and (0, 1) write the same partials: the check reports it, where the
    interpreter alone keeps the last program's numbers and nothing shows."""
    from fastlvm.kernels._triton_gaussian import dot_precision, split_rows
    from fastlvm.kernels._triton_low_rank import TritonLowRankParams, new_marks
    from fastlvm.kernels.mppca_stats._triton import _stats_kernel

    rng = np.random.default_rng(0)
    n, d, k, q = 70, 5, 3, 2
    X = torch.as_tensor(rng.standard_normal((n, d)))
    p = TritonLowRankParams(X, rng.standard_normal((k, d)), rng.standard_normal((k, q, d)),
                            np.ones(k), np.full(k, 1.0 / k))
    splits, per = split_rows(n, 1, 16)
    assert splits > 1
    bd, bq = p.block_d, p.block_q
    parts = [torch.zeros(shape, dtype=X.dtype) for shape in (
        (splits, k), (splits, k, bd), (splits, k), (splits, k, bd, bq), (splits, k, bq),
        (splits, k, bq, bq))]
    lse = torch.zeros(n, dtype=X.dtype)

    def launch(n_comp):
        _stats_kernel[(k, splits)](
            X, lse, lse, *p.kernel_args(), new_marks(X, p), *parts, n, d, n_comp, per,
            X.stride(0), X.stride(1), CANCEL=p.cancel, HAS_SW=False, PASS=p.passes[0],
            BLOCK_N=16, BLOCK_D=bd, BLOCK_Q=bq, PRECISION=dot_precision(X.dtype))

    launch(k)  # as the backend launches it
    # which partials buffer is named first goes by where the allocator put them
    _raises_hazard(lambda: launch(1), r"_stats_kernel: programs \(0, 1, 0\) and \(1, 0, 0\) "
                                      r"both store to \+\d+ bytes from the start of "
                                      r"(nk|s1|ssq|cross|su|suu)_ptr")


def test_hazards_of_records():
    a = np.array([100, 108], dtype=np.uint64)
    assert triton_races.hazards([((0, 0, 0), a), ((1, 0, 0), a + np.uint64(16))],
                                [((1, 0, 0), a)]) is not None  # 1 loads what 0 stores
    assert triton_races.hazards([((0, 0, 0), a)], [((0, 0, 0), a)]) is None
    assert triton_races.hazards([], [((0, 0, 0), a), ((1, 0, 0), a)]) is None
    assert "both store" in triton_races.hazards([((0, 0, 0), a), ((2, 0, 0), a[1:])], [])

