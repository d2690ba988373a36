"""A CUDA graph for CPU tensors: the torch operations and Triton launches issued
in a block, recorded and replayed into the same tensors (tests only).

``torch.cuda.graph`` records the kernels a block queues and each ``replay()``
runs them again on the addresses they had: the inputs are read where they were,
the outputs written where they were, and nothing the host computed during the
recording (Python arithmetic, shapes, a value baked into a launch) runs again.
A step that depends on it goes stale on a GPU, and a test on CPU tensors never
sees it, since off a GPU the graphed step runs eagerly.  :func:`record` runs a
block under a ``TorchDispatchMode`` that keeps every aten operation with its
arguments and outputs, and keeps every interpreted Triton launch with its
arguments; :meth:`RecordedGraph.replay` runs them again in order, each
operation's results copied into the tensors the recording gave out (views and
in-place results already are those).  As with the CuPy stand-in
(``tests/kernels/fake_cupy.py``) the recording runs its work once, as issued,
and the first replay stands for that run.

A recording refuses what a capture refuses and the dispatcher sees: a read of
a value back to the host (``item``, ``float``, ``bool``, a comparison's
``equal``) and the operations whose output size is data (``nonzero``,
``masked_select``, ``unique``, indexing by a boolean mask), raising
:class:`CaptureRefused`.

Limits: CPU tensors are host memory, so a read through ``tolist``, ``numpy``
or ``cpu`` (no aten operation on a CPU tensor) and a copy from host data are
not seen; nor are streams, the private memory pool, or CUDA's own limits.
"""

import threading

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

_aten = torch.ops.aten
# what a capture cannot do: wait for the device to read a value, or size an output by data
_REFUSED = {_aten._local_scalar_dense.default: "reads a value back to the host",
            _aten.equal.default: "reads a comparison back to the host",
            _aten.is_nonzero.default: "reads a value back to the host",
            _aten.nonzero.default: "sizes its output by the data",
            _aten.masked_select.default: "sizes its output by the data",
            _aten._unique2.default: "sizes its output by the data",
            _aten.unique_consecutive.default: "sizes its output by the data"}
# indexing by a boolean mask counts the mask's entries first (a nonzero)
_MASKED = {_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default,
           _aten._index_put_impl_.default}
_state = threading.local()  # .recording: the work list of the recording under way


class CaptureRefused(RuntimeError):
    """An operation a CUDA graph's capture cannot hold."""


class _Operation:
    def __init__(self, func, args, kwargs, out):
        self.func, self.args, self.kwargs, self.out = func, args, kwargs, out

    def run(self):
        fresh = self.func(*self.args, **self.kwargs)
        for old, new in zip(tree_flatten(self.out)[0], tree_flatten(fresh)[0]):
            if (isinstance(old, torch.Tensor) and old is not new
                    and old.untyped_storage().data_ptr() != new.untyped_storage().data_ptr()):
                old.copy_(new)  # a view or an in-place result is already in place


class _Launch:
    def __init__(self, launch, executor, args, kwargs):
        self.launch, self.executor, self.args, self.kwargs = launch, executor, args, kwargs

    def run(self):
        self.launch(self.executor, *self.args, **self.kwargs)


class _Recorder(TorchDispatchMode):
    def __init__(self, work):
        super().__init__()
        self.work = work

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(_state, "launching", False):  # the interpreter's own copies
            return func(*args, **kwargs)
        refused = _REFUSED.get(func)
        if func in _MASKED and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                   for i in args[1]):
            refused = "sizes its work by a boolean mask's count"
        if refused:
            raise CaptureRefused(f"operation not permitted when stream is capturing: "
                                 f"{func} {refused}")
        out = func(*args, **kwargs)
        self.work.append(_Operation(func, args, kwargs, out))
        return out


class RecordedGraph:
    """What :func:`record` kept; ``replays`` counts the calls of :meth:`replay`."""

    def __init__(self, work):
        self.work, self.replays = work, 0

    def replay(self):
        self.replays += 1
        if self.replays == 1:
            return  # the recording ran the work once, as issued
        with torch.no_grad():
            for item in self.work:
                item.run()


def _recording_launches(work):
    """A ``GridExecutor.__call__`` that keeps each launch in ``work`` and runs it
    with the recorder's operations let through (the interpreter copies the
    arguments in and out with torch operations of its own)."""
    from triton.runtime.interpreter import GridExecutor

    original = GridExecutor.__call__

    def launching(executor, *args, **kwargs):
        work.append(_Launch(launching_unrecorded, executor, args, kwargs))
        return launching_unrecorded(executor, *args, **kwargs)

    def launching_unrecorded(executor, *args, **kwargs):
        before = getattr(_state, "launching", False)
        _state.launching = True
        try:
            return original(executor, *args, **kwargs)
        finally:
            _state.launching = before

    return GridExecutor, original, launching


def record(body):
    """body() run, and its torch operations and Triton launches kept: a
    :class:`RecordedGraph` of them."""
    work = []
    executor_class, original, launching = _recording_launches(work)
    executor_class.__call__ = launching
    try:
        with _Recorder(work):
            body()
    finally:
        executor_class.__call__ = original
    return RecordedGraph(work)
