"""Out-of-bounds loads and stores of Triton kernels, caught under the interpreter (tests only).

On a GPU a kernel that reads or writes past its arguments' memory either stops
with "illegal memory access" (which poisons the CUDA context) or, when the
address happens to be mapped, reads another buffer's numbers or overwrites
them.  Under ``TRITON_INTERPRET=1`` the same access reads or writes the host's
heap, usually without a sign: the tests compare values, and a stray read into
masked-off lanes or a stray write past an output can leave them right.

:func:`install` makes every interpreted launch check its accesses.  At a launch
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
should be.  It relies on ``triton.runtime.interpreter``'s
``GridExecutor._init_args_hst`` (which every launch calls before its grid runs)
and ``InterpreterBuilder`` (the same in Triton 3.2 to 3.9); where a Triton
release lacks them, :func:`install` changes nothing and returns False.
"""

import functools
import threading

import numpy as np

from tests.byte_spans import merged_spans
from tests.thread_flags import flag_raised

_launch = threading.local()  # .spans: (starts, ends, names) of the running launch
_MARK = "__bounds_checked_by_fastlvm_tests__"


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


def _kernel_name():
    return getattr(_launch, "kernel", "a Triton kernel")


def _checked_access(access, kind):
    @functools.wraps(access)
    def checked(self, ptrs, *rest):
        spans = getattr(_launch, "spans", None)
        if spans is not None and not getattr(_launch, "suspended", False):
            mask = rest[0] if kind == "load" else rest[1]  # (mask, ...) / (value, mask, ...)
            enabled = np.broadcast_to(mask.data, ptrs.data.shape)
            n_bytes = max(ptrs.get_element_ty().primitive_bitwidth // 8, 1)
            check_addresses(ptrs.data[enabled], n_bytes, spans, f"{_kernel_name()}: {kind}")
        return access(self, ptrs, *rest)

    return checked


def _recording_init_args(init_args):
    @functools.wraps(init_args)
    def init(self, args_dev, kwargs):
        args_hst, kwargs_hst = init_args(self, args_dev, kwargs)
        named = list(zip(self.arg_names, args_hst)) + list(kwargs_hst.items())
        _launch.spans = launch_spans(named)
        _launch.kernel = getattr(self.fn, "__name__", "a Triton kernel")
        return args_hst, kwargs_hst

    return init


def installed():
    """Whether :func:`install` is in effect."""
    from triton.runtime import interpreter

    return getattr(interpreter.InterpreterBuilder.create_masked_load, _MARK, False)


def install():
    """Check every interpreted launch's loads and stores; True when it is (or
    already was) in place, False where this Triton lacks what it patches."""
    from triton.runtime import interpreter

    grid, builder = (getattr(interpreter, name, None)
                     for name in ("GridExecutor", "InterpreterBuilder"))
    needed = [(grid, "_init_args_hst"), (builder, "create_masked_load"),
              (builder, "create_masked_store")]
    if any(owner is None or not hasattr(owner, attr) for owner, attr in needed):
        return False
    if installed():
        return True
    wrappers = {"_init_args_hst": _recording_init_args,
                "create_masked_load": lambda f: _checked_access(f, "load"),
                "create_masked_store": lambda f: _checked_access(f, "store")}
    for owner, attr in needed:
        original = getattr(owner, attr)
        wrapper = wrappers[attr](original)
        setattr(wrapper, _MARK, True)
        setattr(owner, attr, wrapper)
    return True

