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
loads and stores enable (through ``tests/triton_accesses.py``'s hook on the
interpreter, which also marks where each program starts), and at the launch's
end raises :class:`ProgramOrderHazard` naming the kernel, the two programs, and
the address's place in the launch's arguments.  A program that loads and stores
its own addresses is fine: its accesses are ordered.

Limits: addresses are compared as element starts, so two programs' accesses
of different widths that only overlap are not seen (the kernels read and write
each buffer in one dtype); atomics and tensor descriptors are not recorded (none
in the project's kernels: ``tests/kernels/test_triton_bounds.py``).  Where a
Triton release lacks what the hook wraps, :func:`install` changes nothing and
returns False.
"""

import threading

import numpy as np

from tests import triton_accesses

_launch = threading.local()  # .program, .loads, .stores, .kernel, .args of the launch


class ProgramOrderHazard(AssertionError):
    """Two programs of one Triton launch touch an address, one of them storing."""


def _on_launch(kernel, named_args):
    _launch.kernel = kernel
    _launch.args = [(n, a) for n, a in named_args if hasattr(a, "data_ptr")]
    _launch.program, _launch.loads, _launch.stores = (0, 0, 0), [], []


def _on_program(grid_index):
    _launch.program = grid_index


def _on_access(kind, addresses, n_bytes):
    records = getattr(_launch, kind + "s", None)
    if records is not None:
        addresses = np.unique(addresses)
        if addresses.size:
            records.append((_launch.program, addresses))


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


def _on_end():
    stores, loads = getattr(_launch, "stores", None), getattr(_launch, "loads", None)
    _launch.stores = _launch.loads = None
    found = None if stores is None else hazards(stores, loads)
    if found is not None:
        raise ProgramOrderHazard(f"{_launch.kernel}: {found} in one launch; on a GPU "
                                 "the result depends on the programs' order")


def installed():
    """Whether :func:`install` is in effect."""
    return triton_accesses.watching(_on_end)


def install():
    """Check every interpreted launch for program-order hazards; True when it is
    (or already was) in place, False where this Triton lacks what it patches."""
    return triton_accesses.watch(on_launch=_on_launch, on_program=_on_program,
                                 on_access=_on_access, on_end=_on_end)
