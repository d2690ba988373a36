"""Out-of-bounds loads and stores of Triton kernels, caught under the interpreter (tests only).

On a GPU a kernel that reads or writes past its arguments' memory either stops
with "illegal memory access" (which poisons the CUDA context) or, when the
address happens to be mapped, reads another buffer's numbers or overwrites
them.  Under ``TRITON_INTERPRET=1`` the same access reads or writes the host's
heap, usually without a sign: the tests compare values, and a stray read into
masked-off lanes or a stray write past an output can leave them right.

:func:`install` makes every interpreted launch check its accesses (through
``tests/triton_accesses.py``'s hook on the interpreter).  At a launch
it records the byte range each tensor argument's view spans (from its first
element to one past its last, by its sizes and strides; an empty tensor spans
nothing), merged where views overlap.  Each masked load and store then checks
that every address its mask enables lies, with its element's bytes, inside
one of those ranges, and raises :class:`OutOfBoundsAccess` naming the kernel,
the access, the first bad address's distance from the nearest argument, and how
many lanes were out.  Masked-off lanes are not checked: their addresses are
never dereferenced, on a GPU either.

Limits: only ``tl.load`` and ``tl.store`` through pointers (the interpreter's
``create_masked_load`` / ``create_masked_store``, which its unmasked forms
call) are checked; atomics, block pointers and tensor descriptors are not, and
the project's kernels use none of them (``test_no_unchecked_memory_ops``).  The
check is against the views passed, not their storages, so a kernel that reaches
past the view it was given into the rest of the storage is reported, as it
should be.  Where a Triton release lacks what the hook wraps, :func:`install`
changes nothing and returns False.
"""

import threading

import numpy as np

from tests import triton_accesses
from tests.byte_spans import merged_spans
from tests.thread_flags import flag_raised

_launch = threading.local()  # .spans: (starts, ends, names), .kernel of the running launch


class OutOfBoundsAccess(AssertionError):
    """A Triton kernel loaded or stored outside its tensor arguments' memory."""


def _tensor_span(t):
    """(first byte, one past the last byte) of tensor ``t``'s view, or None when
    it is empty."""
    if t.numel() == 0:
        return None
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    start = t.data_ptr()
    return start, start + (last + 1) * t.element_size()


def _flatten(named_args):
    for name, arg in named_args:
        if isinstance(arg, (tuple, list)):
            yield from _flatten((f"{name}[{i}]", a) for i, a in enumerate(arg))
        elif hasattr(arg, "data_ptr") and hasattr(arg, "element_size"):
            yield name, arg


def launch_spans(named_args):
    """The merged byte ranges of the tensors among ``named_args`` ((name, value)
    pairs): (starts, ends, names), sorted by start, as NumPy uint64 arrays and a
    list of each range's argument names."""
    merged = merged_spans((name, span) for name, arg in _flatten(named_args)
                          if (span := _tensor_span(arg)) is not None)
    starts = np.array([m[0] for m in merged], dtype=np.uint64)
    ends = np.array([m[1] for m in merged], dtype=np.uint64)
    return starts, ends, [m[2] for m in merged]


def check_addresses(addresses, n_bytes, spans, what):
    """Raise :class:`OutOfBoundsAccess` unless every address in ``addresses``
    (uint64 array) with its ``n_bytes`` lies inside one of ``spans``."""
    if addresses.size == 0:
        return
    starts, ends, names = spans
    addresses = addresses.astype(np.uint64, copy=False)
    slot = np.searchsorted(starts, addresses, side="right") - 1
    inside = slot >= 0
    slot = np.maximum(slot, 0)
    if len(starts):
        inside &= addresses + np.uint64(n_bytes) <= ends[slot]
    else:
        inside[:] = False
    if inside.all():
        return
    bad = int(addresses[~inside][0])
    if len(starts):
        near = int(np.argmin([min(abs(bad - int(s)), abs(bad - int(e)))
                              for s, e in zip(starts, ends)]))
        where = (f"{bad - int(starts[near]):+d} bytes from the start of "
                 f"{'/'.join(names[near])} (which spans "
                 f"{int(ends[near]) - int(starts[near])} bytes)")
    else:
        where = "with no tensor argument at all"
    raise OutOfBoundsAccess(f"{what}: {int((~inside).sum())} of {addresses.size} enabled "
                            f"lanes out of bounds; the first at {where}")


def suspended():
    """Within the block, interpreted launches run unchecked (for a test that shows
    what happens without the check); the check is back after it."""
    return flag_raised(_launch, "suspended")


def _on_launch(kernel, named_args):
    _launch.spans = launch_spans(named_args)
    _launch.kernel = kernel


def _on_access(kind, addresses, n_bytes):
    spans = getattr(_launch, "spans", None)
    if spans is not None and not getattr(_launch, "suspended", False):
        check_addresses(addresses, n_bytes, spans,
                        f"{getattr(_launch, 'kernel', 'a Triton kernel')}: {kind}")


def installed():
    """Whether :func:`install` is in effect."""
    return triton_accesses.watching(_on_access)


def install():
    """Check every interpreted launch's loads and stores; True when it is (or
    already was) in place, False where this Triton lacks what it patches."""
    return triton_accesses.watch(on_launch=_on_launch, on_access=_on_access)
