# Atomic int64 counters and bounded spin-waits for compiled code, the
# hand-over between the span pool's threads (:mod:`._thread_spans`).
#
# Design: Numba has no CPU atomics, so the three used here are LLVM
# instructions emitted by intrinsics -- a sequentially consistent load and
# fetch-and-add on an element of a C-contiguous int64 array, and the x86
# ``pause`` hint inside spin loops (a no-op elsewhere).  The spin-waits are
# ``nogil`` functions: a thread waiting in one holds no GIL, so the thread it
# waits for can run Python.  Waits are bounded by a count of pause
# iterations; :func:`pause_iterations_per_us` measures what a microsecond is
# in those units on this machine (a pause takes 10 to 150 cycles depending on
# the CPU), once per process.
# Limits: counters are int64 elements of arrays the caller keeps alive; the
# spin loops burn their core for as long as they wait, so callers bound them
# and fall back to blocking waits.
import platform
import time

import numba
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from ._numba_support import CACHE

_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


def _element_pointer(context, builder, array_type, array, index):
    data = context.make_array(array_type)(context, builder, array).data
    return builder.gep(data, [index])


def _check_counter(array, index):
    if not (isinstance(array, types.Array) and array.dtype == types.int64
            and array.ndim == 1 and isinstance(index, types.Integer)):
        raise numba.TypingError("atomics act on an element of a 1-d int64 array")


@intrinsic
def atomic_load(typingctx, array, index):
    """array[index], read atomically (sequentially consistent)."""
    _check_counter(array, index)

    def codegen(context, builder, signature, args):
        index = context.cast(builder, args[1], signature.args[1], types.intp)
        ptr = _element_pointer(context, builder, signature.args[0], args[0], index)
        return builder.load_atomic(ptr, "seq_cst", 8)

    return types.int64(array, index), codegen


@intrinsic
def atomic_add(typingctx, array, index, value):
    """array[index] += value atomically (sequentially consistent); returns the
    value before the addition."""
    _check_counter(array, index)

    def codegen(context, builder, signature, args):
        index = context.cast(builder, args[1], signature.args[1], types.intp)
        ptr = _element_pointer(context, builder, signature.args[0], args[0], index)
        value = context.cast(builder, args[2], signature.args[2], types.int64)
        return builder.atomic_rmw("add", ptr, value, "seq_cst")

    return types.int64(array, index, value), codegen


@intrinsic
def cpu_relax(typingctx):
    """The spin-loop hint (x86 ``pause``: yields the core's pipeline to its
    sibling and saves power); emits nothing on other CPUs."""

    def codegen(context, builder, signature, args):
        if _X86:
            fn = builder.module.declare_intrinsic(
                "llvm.x86.sse2.pause", fnty=ir.FunctionType(ir.VoidType(), []))
            builder.call(fn, [])
        return context.get_dummy_value()

    return types.none(), codegen


@numba.njit(nogil=True, cache=CACHE)
def fetch_add(counter, index, value):
    """counter[index] += value atomically; returns the value before."""
    return atomic_add(counter, index, value)


@numba.njit(nogil=True, cache=CACHE)
def load(counter, index):
    """counter[index], read atomically."""
    return atomic_load(counter, index)


@numba.njit(nogil=True, cache=CACHE)
def spin(iterations):
    """Spin for ``iterations`` pause iterations (the unit of the waits below)."""
    for _ in range(iterations):
        cpu_relax()


@numba.njit(nogil=True, cache=CACHE)
def await_change(counter, index, seen, iterations, grace):
    """Spin, without the GIL, until counter[index] != seen or ``iterations``
    pause iterations have passed; then ``grace`` more iterations if it changed
    (see the pool's use).  Returns counter[index] (``seen`` on a timeout)."""
    for _ in range(iterations):
        value = atomic_load(counter, index)
        if value != seen:
            for _ in range(grace):
                cpu_relax()
            return value
        cpu_relax()
    return seen


@numba.njit(nogil=True, cache=CACHE)
def await_at_least(counter, index, target, iterations):
    """Spin, without the GIL, until counter[index] >= target (True) or
    ``iterations`` pause iterations have passed (False)."""
    for _ in range(iterations):
        if atomic_load(counter, index) >= target:
            return True
        cpu_relax()
    return atomic_load(counter, index) >= target


_ITERATIONS_PER_US = None


def pause_iterations_per_us():
    """Pause iterations of :func:`spin` in a microsecond on this machine (the
    fastest of three timings of about 0.2 ms each; measured once)."""
    global _ITERATIONS_PER_US
    if _ITERATIONS_PER_US is None:
        spin(1)  # compiled or loaded before it is timed
        n, best = 4096, float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            spin(n)
            best = min(best, time.perf_counter() - t0)
        _ITERATIONS_PER_US = max(1.0, n / max(best * 1e6, 1e-3))
    return _ITERATIONS_PER_US
