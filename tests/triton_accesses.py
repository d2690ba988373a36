"""Every interpreted Triton launch's programs and masked accesses, handed to the
suite's checks (tests only): one hook on the interpreter for all of them.

Under ``TRITON_INTERPRET=1`` a launch runs on the host:
``GridExecutor._init_args_hst`` copies its arguments in,
``InterpreterBuilder.set_grid_idx`` starts each program,
``create_masked_load`` / ``create_masked_store`` (which the unmasked forms call)
make each access, and ``GridExecutor._restore_args_dev`` copies the results back.
:func:`watch` registers a check's callbacks for those events; the first call
wraps the five methods once, and each access's enabled addresses (the lanes its
mask enables, as uint64) are taken out once for every check that reads them
(``tests/triton_bounds.py``, ``tests/triton_races.py``).

The callbacks, each optional:

- ``on_launch(kernel, named_args)``: a launch begins; ``kernel`` is its name,
  ``named_args`` its host arguments as (name, value) pairs;
- ``on_program(grid_index)``: a program starts, (x, y, z);
- ``on_access(kind, addresses, n_bytes)``: before a 'load' or 'store' runs, its
  enabled addresses (uint64 array) and each element's bytes; raising stops it;
- ``on_end()``: the launch's programs are done and its results copied back;
  raising fails the launch.

It relies on those five methods (the same in Triton 3.2 to 3.9); where a Triton
release lacks one, :func:`watch` changes nothing and returns False.
"""

import functools

import numpy as np

_EVENTS = ("on_launch", "on_program", "on_access", "on_end")
_CALLBACKS = {event: [] for event in _EVENTS}
_MARK = "__watched_by_fastlvm_tests__"


def _each(event, *args):
    for callback in _CALLBACKS[event]:
        callback(*args)


def _launching(init_args):
    @functools.wraps(init_args)
    def init(self, args_dev, kwargs):
        args_hst, kwargs_hst = init_args(self, args_dev, kwargs)
        _each("on_launch", getattr(self.fn, "__name__", "a Triton kernel"),
              list(zip(self.arg_names, args_hst)) + list(kwargs_hst.items()))
        return args_hst, kwargs_hst

    return init


def _ending(restore):
    @functools.wraps(restore)
    def end(self, *args, **kwargs):
        result = restore(self, *args, **kwargs)
        _each("on_end")
        return result

    return end


def _starting(set_grid_idx):
    @functools.wraps(set_grid_idx)
    def start(self, x, y, z):
        _each("on_program", (x, y, z))
        return set_grid_idx(self, x, y, z)

    return start


def _accessing(access, kind):
    @functools.wraps(access)
    def accessed(self, ptrs, *rest):
        if _CALLBACKS["on_access"]:
            mask = rest[0] if kind == "load" else rest[1]  # (mask, ...) / (value, mask, ...)
            enabled = np.broadcast_to(mask.data, ptrs.data.shape)
            addresses = ptrs.data[enabled].astype(np.uint64, copy=False)
            n_bytes = max(ptrs.get_element_ty().primitive_bitwidth // 8, 1)
            _each("on_access", kind, addresses, n_bytes)
        return access(self, ptrs, *rest)

    return accessed


def _hooks():
    """{(owner, method name): wrapper factory}, or None where this Triton lacks one."""
    from triton.runtime import interpreter

    grid, builder = (getattr(interpreter, name, None)
                     for name in ("GridExecutor", "InterpreterBuilder"))
    hooks = {(grid, "_init_args_hst"): _launching, (grid, "_restore_args_dev"): _ending,
             (builder, "set_grid_idx"): _starting,
             (builder, "create_masked_load"): lambda f: _accessing(f, "load"),
             (builder, "create_masked_store"): lambda f: _accessing(f, "store")}
    if any(owner is None or not hasattr(owner, attr) for owner, attr in hooks):
        return None
    return hooks


def _install():
    hooks = _hooks()
    if hooks is None:
        return False
    for (owner, attr), wrap in hooks.items():
        original = getattr(owner, attr)
        if not getattr(original, _MARK, False):
            wrapper = wrap(original)
            setattr(wrapper, _MARK, True)
            setattr(owner, attr, wrapper)
    return True


def watch(**callbacks):
    """Hand every interpreted launch's events to ``callbacks`` (keywords among
    ``on_launch``, ``on_program``, ``on_access``, ``on_end``; see the module's
    doc), after those already watching.  True when they are (or already were)
    registered, False where this Triton lacks what the hook wraps."""
    unknown = set(callbacks) - set(_EVENTS)
    if unknown:
        raise TypeError(f"watch: unknown events {sorted(unknown)}; use {list(_EVENTS)}")
    if not _install():
        return False
    for event, callback in callbacks.items():
        if callback not in _CALLBACKS[event]:
            _CALLBACKS[event].append(callback)
    return True


def watching(callback):
    """Whether ``callback`` is registered for an event."""
    return any(callback in callbacks for callbacks in _CALLBACKS.values())
