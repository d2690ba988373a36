"""The CUDA emulator's guarded arguments (``guarded_args.py``): a kernel's
arrays are copies between guard pages, so a write outside them is reported, a
read just outside gives NaN, one further faults; alignment and shared memory
between arguments are kept, and the arrays get the kernel's writes back.  A
launch of several blocks runs in both block orders, and one whose result
changes with the order is reported."""

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tests.kernels import cuda_emulator
from tests.kernels.fake_cupy import FakeCupyArray
from tests.kernels.guarded_args import ALIGN, BlockOrderHazard, GuardedArgs, OutOfBoundsWrite

pytestmark = pytest.mark.skipif(not cuda_emulator.AVAILABLE,
                                reason="the CUDA emulator needs g++ on Linux")
ROOT = Path(__file__).resolve().parents[2]

# y[i + shift] = x[i + shift] + 1 for i < n (shift may be negative, or reach out)
OFFSET_COPY = """
template <typename T>
__global__ void offset_copy(const T* x, T* y, long long n, long long shift) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i + shift] = x[i] + (T)1;
}
template <typename T>
__global__ void offset_read(const T* x, T* y, long long n, long long shift) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = x[i + shift];
}
template <typename T>
__global__ void last_block_wins(const T* x, T* y, long long n, long long shift) {
    if (threadIdx.x == 0) y[0] = (T)blockIdx.x;
}
"""


def _kernel(name):
    """The emulated kernel, launched on NumPy buffers through device arrays over
    them (views: the tests read the kernel's writes back from the buffers)."""
    kernel = cuda_emulator.EmulatedRawModule(OFFSET_COPY).get_function(f"{name}<double>")

    def launch(grid, block, args):
        return kernel(grid, block, tuple(FakeCupyArray(a) if isinstance(a, np.ndarray)
                                         else a for a in args))

    launch.kernel = kernel
    return launch


def test_kernels_see_copies_with_their_alignment_and_write_back():
    x = np.arange(40.0)[3:]  # 24 bytes past a 256-byte boundary, or wherever numpy put it
    y = np.zeros(37)
    _kernel("offset_copy")((2,), (32,), (x, y, np.int64(37), np.int64(0)))
    np.testing.assert_array_equal(y, x + 1)
    seen = []
    kernel = _kernel("offset_copy")
    kernel.kernel.fn = lambda grid, block, reversed_, *values: seen.extend(values) or 0
    kernel((1,), (32,), (x, y, np.int64(37), np.int64(0)))
    assert seen[0] != x.ctypes.data and seen[0] % ALIGN == x.ctypes.data % ALIGN
    assert seen[1] % ALIGN == y.ctypes.data % ALIGN


def test_arguments_that_share_memory_share_their_copy():
    buf = np.arange(64.0)
    _kernel("offset_copy")((1,), (32,), (buf[:32], buf[16:48], np.int64(16), np.int64(0)))
    # y = buf[16:48] is written from x = buf[:32]; the overlap is one copy, as on a GPU
    np.testing.assert_array_equal(buf[16:32], np.arange(16.0) + 1)
    np.testing.assert_array_equal(buf[32:], np.arange(32.0, 64.0))


@pytest.mark.parametrize("shift, at", [(1, r"\+296"), (-1, "-8")])
def test_a_write_just_outside_an_array_is_reported(shift, at):
    x, y = np.arange(37.0), np.zeros(37)
    with pytest.raises(OutOfBoundsWrite, match=rf"offset_copy<double> wrote at {at} bytes "
                                               r"from the start of argument 1 \(which "
                                               r"spans 296 bytes\)"):
        _kernel("offset_copy")((2,), (32,), (x, y, np.int64(37), np.int64(shift)))
    assert not y.any()  # nothing copied back from a launch that strayed


def test_a_read_just_past_an_array_gives_nan():
    x, y = np.arange(37.0), np.zeros(37)
    _kernel("offset_read")((2,), (32,), (x, y, np.int64(37), np.int64(1)))
    np.testing.assert_array_equal(y[:-1], x[1:])
    assert np.isnan(y[-1])


def test_a_read_a_page_past_an_array_faults():
    """Past the canaries (under 256 bytes past the end) lies a guard page: the
    emulated kernel's process ends with SIGSEGV, and Python's traceback names the
    launch.  The read here is 320 bytes past the end."""
    script = textwrap.dedent("""
        import faulthandler, numpy as np
        faulthandler.enable()
        from tests.kernels import cuda_emulator
        from tests.kernels.test_guarded_args import _kernel
        x, y = np.arange(37.0), np.zeros(37)
        _kernel("offset_read")((1,), (32,), (x, y, np.int64(1), np.int64(77)))
    """)
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode < 0 and "Segmentation fault" in run.stderr, run.stderr
    assert "cuda_emulator.py" in run.stderr


def test_blocks_storing_to_one_place_are_reported():
    x, y = np.zeros(1), np.full(3, 7.0)
    with pytest.raises(BlockOrderHazard, match=r"last_block_wins<double>: .* bytes of "
                                                r"argument 1 different, the first at \+[0-7]:"):
        _kernel("last_block_wins")((3,), (32,), (x, y, np.int64(0), np.int64(0)))
    assert (y == 7.0).all()  # nothing copied back
    _kernel("last_block_wins")((1,), (32,), (x, y, np.int64(0), np.int64(0)))  # one block
    assert y[0] == 0.0


def test_a_block_reading_what_another_writes_is_reported():
    """y[i + 32] = y[i] + 1 over two blocks of 32: block 1 reads what block 0
    writes (in place: x and y are one array)."""
    y = np.zeros(96)
    with pytest.raises(BlockOrderHazard, match=r"offset_copy<double>: .* bytes of argument "
                                                r"0/1 different, the first at \+51\d:"):
        _kernel("offset_copy")((2,), (32,), (y, y, np.int64(64), np.int64(32)))


def test_guarded_args_unit():
    a = np.full(5, 2.0)
    guarded = GuardedArgs([("a", a)])
    copy = np.ctypeslib.as_array((np.ctypeslib.ctypes.c_double * 6).from_address(
        guarded.address(a)))
    assert np.isnan(copy[5])  # the canary just past the end
    copy[:5] = 3.0
    guarded.finish("unit")
    np.testing.assert_array_equal(a, 3.0)
    empty = np.zeros(0)
    assert GuardedArgs([("e", empty)]).address(empty) == empty.ctypes.data
