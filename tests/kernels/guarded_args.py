"""A launch's array arguments staged between guard pages, for the CUDA emulator (tests only).

On a GPU a kernel that reads or writes past the arrays it was given faults
("illegal memory access") or, where the address happens to be mapped, reads or
overwrites another allocation.  The emulator (``cuda_emulator.py``) runs the
kernels on the host, where the same access lands in the host's heap, usually
without a sign.  :class:`GuardedArgs` gives a kernel copies of its array
arguments that sit between pages the process may not touch:

- The arguments' byte ranges (``byte_bounds``: first to one past the last
  element of each view) are merged where they overlap, so arguments that share
  memory still share it; each merged range is copied into a mapping of its own,
  ``PROT_NONE`` pages before and after it.
- Each range starts at its original address modulo 256 (what CuPy's allocator
  aligns to), so vector accesses keep their alignment, and so ends within 255
  bytes of the page after it.  The bytes between the guard pages and the range
  are canaries (0xff: NaN as float and as double).
- :meth:`GuardedArgs.finish` checks the canaries (a write outside a range, by
  less than a page, is reported with its argument and offset), copies each
  range back to its arrays and unmaps the copies.
- :meth:`GuardedArgs.require_same_bytes` compares two stagings of the same
  arrays after one launch each: the emulator runs a launch's blocks in order on
  one and in reverse on the other, and differing bytes mean the result depends
  on the blocks' order (:class:`BlockOrderHazard`).

A read of a canary gives NaN, which the tests' comparisons catch; an access
past a canary into a guard page is a segmentation fault, which ends the test
process with Python's traceback (pytest turns ``faulthandler`` on): the kernel
call is named there.  Limits: ranges past MAX_STAGED_BYTES are passed as they
are; an access that skips a whole guard page lands wherever it lands; the check
is against the views passed, not the allocations behind them.
"""

import ctypes
import mmap

import numpy as np

from tests.byte_spans import merged_spans

PAGE = mmap.PAGESIZE
PROT_NONE = 0  # <sys/mman.h>; Python's mmap module names the others only
ALIGN = 256  # CuPy's allocations are 256-byte aligned; views keep their offset from one
CANARY = 0xFF
# ranges wider than this are passed as they are: the tests of offsets past 2^31
# elements pass views three rows wide spread over 8 GiB of address space, which
# no copy could stage
MAX_STAGED_BYTES = 1 << 28

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value
try:  # NumPy 2 moved it
    from numpy.lib.array_utils import byte_bounds
except ImportError:  # NumPy 1
    byte_bounds = np.byte_bounds


class OutOfBoundsWrite(RuntimeError):
    """A kernel wrote outside the arrays it was given (a canary changed)."""


class BlockOrderHazard(RuntimeError):
    """A kernel's result changed with the order its blocks ran in."""


def _check(status, what):
    if status != 0:
        raise OSError(ctypes.get_errno(), f"{what} failed")


def _bytes_at(low, high):
    """The host's bytes [low, high) as a NumPy uint8 view (no copy)."""
    return np.frombuffer((ctypes.c_ubyte * (high - low)).from_address(low), dtype=np.uint8)


class _Staged:
    """One merged byte range [low, high) of the host's memory, copied into a
    mapping with a guard page on each side."""

    def __init__(self, low, high, names):
        self.low, self.high, self.names = low, high, names
        span = high - low
        data_pages = -(-(span + ALIGN) // PAGE)
        self.size = (data_pages + 2) * PAGE
        base = _libc.mmap(None, self.size, mmap.PROT_READ | mmap.PROT_WRITE,
                          mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        if base in (None, _MAP_FAILED):
            raise OSError(ctypes.get_errno(), "mmap failed")
        self.base = base
        try:
            _check(_libc.mprotect(base, PAGE, PROT_NONE), "mprotect")
            _check(_libc.mprotect(base + self.size - PAGE, PAGE, PROT_NONE), "mprotect")
        except OSError:
            self.release()
            raise
        self.region = base + PAGE  # the data pages
        region_end = self.region + data_pages * PAGE
        self.start = region_end - span - (region_end - span - low) % ALIGN
        ctypes.memset(self.region, CANARY, data_pages * PAGE)
        ctypes.memmove(self.start, low, span)
        self.region_end = region_end

    def address(self, original):
        """Where the byte at host address ``original`` (inside the range) lies here."""
        return self.start + (original - self.low)

    def written_outside(self):
        """The offset in bytes from the range's start of the first changed canary
        (negative before the start), or None."""
        end = self.start + (self.high - self.low)
        before = np.flatnonzero(_bytes_at(self.region, self.start) != CANARY)
        if before.size:
            return int(before[0]) - (self.start - self.region)
        after = np.flatnonzero(_bytes_at(end, self.region_end) != CANARY)
        return int(after[0]) + (self.high - self.low) if after.size else None

    def contents(self):
        """The staged range's bytes (a NumPy view of the copy)."""
        return _bytes_at(self.start, self.start + (self.high - self.low))

    def copy_back_and_unmap(self):
        ctypes.memmove(self.low, self.start, self.high - self.low)
        self.release()

    def release(self):
        if self.base is not None:
            _check(_libc.munmap(self.base, self.size), "munmap")
            self.base = None


class GuardedArgs:
    """The array arguments of one launch, staged between guard pages.

    Parameters
    ----------
    arrays : list of (name, numpy.ndarray)
        The launch's array arguments, each named for the reports.
    """

    def __init__(self, arrays):
        groups = merged_spans((name, byte_bounds(a)) for name, a in arrays if a.size)
        self._staged = []
        try:
            for low, high, names in groups:
                if high - low <= MAX_STAGED_BYTES:
                    self._staged.append(_Staged(low, high, names))
        except BaseException:
            self._release()
            raise

    def address(self, a):
        """The address to pass for array ``a`` (one of the launch's): its first
        element's copy, or its own address when it is empty (nothing to read)
        or spans more than MAX_STAGED_BYTES."""
        first = a.ctypes.data
        for s in self._staged:
            if a.size and s.low <= first < s.high:
                return s.address(first)
        return first

    def finish(self, kernel):
        """Check the canaries, copy every range back to its arrays and unmap the
        copies; raise :class:`OutOfBoundsWrite` naming ``kernel`` and the
        arguments nearest a changed canary."""
        try:
            for s in self._staged:
                at = s.written_outside()
                if at is not None:
                    raise OutOfBoundsWrite(
                        f"{kernel} wrote at {at:+d} bytes from the start of argument "
                        f"{'/'.join(s.names)} (which spans {s.high - s.low} bytes): outside "
                        "the arrays it was given, another allocation or a fault on a GPU")
            for s in self._staged:
                s.copy_back_and_unmap()
        finally:
            self._release()

    def require_same_bytes(self, other, kernel):
        """Raise :class:`BlockOrderHazard` naming ``kernel`` unless ``other``'s
        copies (staged from the same arrays) hold the same bytes as these."""
        for mine, theirs in zip(self._staged, other._staged):
            a, b = mine.contents(), theirs.contents()
            differ = np.flatnonzero(a != b)
            if differ.size:
                raise BlockOrderHazard(
                    f"{kernel}: its blocks in reverse order left {differ.size} bytes of "
                    f"argument {'/'.join(mine.names)} different, the first at "
                    f"+{int(differ[0])}: the result depends on the blocks' order, which a "
                    "GPU does not keep (a block reading what another writes, or two "
                    "writing one place)")

    def discard(self):
        """Unmap the copies without copying anything back (a launch that failed)."""
        self._release()

    def _release(self):
        for s in self._staged:
            s.release()
