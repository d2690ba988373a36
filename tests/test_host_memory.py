"""The test command's poisoned host memory (``MALLOC_PERTURB_=128``, README and
``.ci/run``): fresh ``np.empty`` buffers, NumPy's and Numba's, hold 0x7f bytes,
so a kernel that reads an entry it never wrote gets 1.4e306 (float64) or 3.4e38
(float32) rather than the zeros of fresh pages or a stale copy of the right
answer."""

import os

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(
    os.environ.get("MALLOC_PERTURB_") != "128",
    reason="the README's test command and .ci/run set MALLOC_PERTURB_=128")


def _poison(dtype):
    return np.frombuffer(b"\x7f" * np.dtype(dtype).itemsize, dtype=dtype)[0]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_fresh_host_buffers_hold_the_poison(dtype):
    from numba import njit

    @njit
    def numba_empty(n, like):
        return np.empty(n, dtype=like.dtype)

    for fresh in (np.empty(1 << 16, dtype=dtype),
                  numba_empty(1 << 16, np.zeros(1, dtype=dtype))):
        assert (fresh.view(np.uint8) == 0x7F).all()
        assert fresh[0] == _poison(dtype) and fresh[0] > 1e38
    reused = np.empty(1 << 16, dtype=dtype)
    reused[:] = 1.0
    del reused
    assert (np.empty(1 << 16, dtype=dtype) != 1.0).all()  # a freed block is poisoned too
