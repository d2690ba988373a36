"""Accesses that make a Triton launch's result depend on the order of its
programs, caught under the interpreter (tests only).

A GPU runs a launch's programs in no set order and, without atomics or a
grid-wide barrier (the project's kernels use neither), nothing orders one
program's stores before another's loads.  So within one launch:

- two programs storing to the same address leave whichever came last: the
  result changes from run to run (or is lost), and
- a program loading an address another program stores to reads the old value or
  the new one, by timing.

The interpreter runs the programs one after another in grid order, where both
give the same answer every time and no test can see them.  :func:`install`
records, during each interpreted launch, the addresses each program's masked
loads and stores enable (``InterpreterBuilder.set_grid_idx`` marks where a
program starts), and at the launch's end (``GridExecutor._restore_args_dev``)
raises :class:`ProgramOrderHazard` naming the kernel, the two programs, and
the address's place in the launch's arguments.  A program that loads and stores
its own addresses is fine: its accesses are ordered.

Limits: addresses are compared as element starts, so two programs' accesses
of different widths that only overlap are not seen (the kernels read and write
each buffer in one dtype); atomics and tensor descriptors are not recorded (none
in the project's kernels: ``tests/kernels/test_triton_bounds.py``).  It relies on
the interpreter's ``GridExecutor._init_args_hst`` and ``_restore_args_dev`` and
``InterpreterBuilder.set_grid_idx`` / ``create_masked_load`` /
``create_masked_store`` (the same in Triton 3.2 to 3.9); where a release lacks
them, :func:`install` changes nothing and returns False.
"""

import functools
import threading

import numpy as np

_launch = threading.local()  # .program, .loads, .stores, .kernel, .args of the launch
_MARK = "__race_checked_by_fastlvm_tests__"


class ProgramOrderHazard(AssertionError):
    """Two programs of one Triton launch touch an address, one of them storing."""


def _recording(init_args):
    @functools.wraps(init_args)
    def init(self, args_dev, kwargs):
        args_hst, kwargs_hst = init_args(self, args_dev, kwargs)
        _launch.kernel = getattr(self.fn, "__name__", "a Triton kernel")
        _launch.args = [(n, a) for n, a in zip(self.arg_names, args_hst)
                        if hasattr(a, "data_ptr")]
        _launch.program, _launch.loads, _launch.stores = (0, 0, 0), [], []
        return args_hst, kwargs_hst

    return init


def _program_start(set_grid_idx):
    @functools.wraps(set_grid_idx)
    def start(self, x, y, z):
        _launch.program = (x, y, z)
        return set_grid_idx(self, x, y, z)

    return start


def _recorded_access(access, kind):
    @functools.wraps(access)
    def recorded(self, ptrs, *rest):
        records = getattr(_launch, kind, None)
        if records is not None:
            mask = rest[0] if kind == "loads" else rest[1]
            enabled = np.broadcast_to(mask.data, ptrs.data.shape)
            addresses = np.unique(ptrs.data[enabled].astype(np.uint64))
            if addresses.size:
                records.append((_launch.program, addresses))
        return access(self, ptrs, *rest)

    return recorded


def _pairs(records, index):
    """The distinct (address, program id) pairs of ``records`` ((program,
    addresses) list), sorted by address then program, as two arrays."""
    if not records:
        return np.zeros(0, np.uint64), np.zeros(0, np.uint64)
    n = np.uint64(len(index))
    keys = np.unique(np.concatenate([a * n + np.uint64(index[p]) for p, a in records]))
    return keys // n, keys % n


def _where(address):
    """An address's place among the launch's tensor arguments."""
    for name, t in getattr(_launch, "args", []):
        storage = t.untyped_storage()
        if t.data_ptr() <= address < storage.data_ptr() + storage.nbytes():
            return f"+{address - t.data_ptr()} bytes from the start of {name}"
    return f"address {address:#x}"


def hazards(stores, loads):
    """The first hazard among a launch's records ((program, addresses) lists,
    programs as grid indices), as text, or None."""
    programs = sorted({p for p, _ in stores} | {p for p, _ in loads})
    index = {p: i for i, p in enumerate(programs)}
    s_addr, s_prog = _pairs(stores, index)
    if s_addr.size == 0:
        return None
    twice = np.flatnonzero(s_addr[1:] == s_addr[:-1])  # distinct pairs: two programs
    if twice.size:
        i = twice[0]
        return (f"programs {programs[s_prog[i]]} and {programs[s_prog[i + 1]]} both store "
                f"to {_where(int(s_addr[i]))}")
    l_addr, l_prog = _pairs(loads, index)
    slot = np.minimum(np.searchsorted(s_addr, l_addr), s_addr.size - 1)
    crossing = np.flatnonzero((s_addr[slot] == l_addr) & (s_prog[slot] != l_prog))
    if crossing.size:
        i = crossing[0]
        return (f"program {programs[l_prog[i]]} loads {_where(int(l_addr[i]))}, which "
                f"program {programs[s_prog[slot[i]]]} stores to")
    return None


def _checking_end(restore):
    @functools.wraps(restore)
    def end(self, *args, **kwargs):
        stores, loads = getattr(_launch, "stores", None), getattr(_launch, "loads", None)
        _launch.stores = _launch.loads = None
        result = restore(self, *args, **kwargs)
        found = None if stores is None else hazards(stores, loads)
        if found is not None:
            raise ProgramOrderHazard(f"{_launch.kernel}: {found} in one launch; on a GPU "
                                     "the result depends on the programs' order")
        return result

    return end


def installed():
    """Whether :func:`install` is in effect."""
    from triton.runtime import interpreter

    return getattr(interpreter.InterpreterBuilder.set_grid_idx, _MARK, False)


def install():
    """Check every interpreted launch for program-order hazards; True when it is
    (or already was) in place, False where this Triton lacks what it patches."""
    from triton.runtime import interpreter

    grid, builder = (getattr(interpreter, name, None)
                     for name in ("GridExecutor", "InterpreterBuilder"))
    wrappers = {(grid, "_init_args_hst"): _recording,
                (grid, "_restore_args_dev"): _checking_end,
                (builder, "set_grid_idx"): _program_start,
                (builder, "create_masked_load"): lambda f: _recorded_access(f, "loads"),
                (builder, "create_masked_store"): lambda f: _recorded_access(f, "stores")}
    if any(owner is None or not hasattr(owner, attr) for owner, attr in wrappers):
        return False
    if installed():
        return True
    for (owner, attr), wrap in wrappers.items():
        original = getattr(owner, attr)
        wrapper = wrap(original)
        setattr(wrapper, _MARK, True)
        setattr(owner, attr, wrapper)
    return True

