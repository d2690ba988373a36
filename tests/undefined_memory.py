"""Fresh allocations filled with NaN, as a GPU's may hold anything (tests only).

A GPU's ``torch.empty`` or ``cupy.empty`` hands back memory with whatever its
last user left.  On the host a fresh allocation often holds zeros (new pages
from the operating system), so a kernel or a host step that reads an entry
nobody wrote -- a partial sum never stored, a tile past the last one written --
can pass every test here and give garbage on a GPU.  CUDA's compute-sanitizer
calls finding these an initcheck.

:func:`undefined` fills an array or tensor with NaN (floats), the largest value
(integers) or True, so such a read shows in the results.  :func:`install`
makes ``torch.empty`` and ``torch.empty_like`` do so when fastlvm's own code
(a module under ``fastlvm``) calls them; torch's and the tests' allocations are
left alone.  The CUDA emulator's ``cupy.empty`` and ``cupy.empty_like`` fill
theirs too (``tests/kernels/fake_cupy.py``).

Limits: NumPy's ``np.empty`` is left alone (Numba compiles it inside its
kernels, and would not compile a wrapped one), so the Numba backend's host
buffers are not filled; tensors made by other means (``new_empty``,
``empty_strided``) are not either (fastlvm uses neither).  Conftest installs it
only where there is no GPU: there the memory is the device's own.
"""

import functools
import sys
import threading

import numpy as np

from tests.thread_flags import flag_raised

_MARK = "__filled_by_fastlvm_tests__"
_state = threading.local()  # .suspended: allocations left unfilled for now


def undefined(a):
    """``a`` (a NumPy array or a torch tensor) filled as a fresh GPU allocation
    may be; returns ``a``."""
    dtype = a.dtype
    if hasattr(dtype, "is_floating_point"):  # torch
        if dtype.is_floating_point or dtype.is_complex:
            a.fill_(float("nan"))
        elif dtype == sys.modules["torch"].bool:
            a.fill_(True)
        else:
            a.fill_(sys.modules["torch"].iinfo(dtype).max)
        return a
    if dtype.kind in "fc":
        a.fill(float("nan"))
    elif dtype.kind in "iu":
        a.fill(np.iinfo(dtype).max)
    elif dtype.kind == "b":
        a.fill(True)
    return a


def allocating_undefined(allocate, callers=None):
    """``allocate`` (an ``empty``) whose results are :func:`undefined`; with
    ``callers`` (a module-name prefix), only when the calling module's name
    starts with it."""
    @functools.wraps(allocate)
    def run(*args, **kwargs):
        out = allocate(*args, **kwargs)
        if getattr(_state, "suspended", False):
            return out
        if callers is None or sys._getframe(1).f_globals.get("__name__", "").startswith(
                callers):
            undefined(out)
        return out

    setattr(run, _MARK, True)
    return run


def suspended():
    """Within the block allocations are left as made (for a test that counts the
    torch operations fastlvm runs, which the fills would add to)."""
    return flag_raised(_state, "suspended")


def installed():
    """Whether :func:`install` is in effect."""
    import torch

    return getattr(torch.empty, _MARK, False)


def install():
    """Make ``torch.empty`` and ``torch.empty_like`` give fastlvm's code NaN."""
    import torch

    if not installed():
        torch.empty = allocating_undefined(torch.empty, "fastlvm")
        torch.empty_like = allocating_undefined(torch.empty_like, "fastlvm")
