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
in-place results already are those).  :func:`install` puts the recording in
place of ``torch.cuda``'s ``CUDAGraph`` and ``graph``, with streams and events
that order nothing (CPU work runs as it is issued).  As with the CuPy stand-in
(``tests/kernels/fake_cupy.py``) the recording runs its work once, as issued,
and the first replay stands for that run.

A recording refuses what a capture refuses and the dispatcher sees: a read of
a value back to the host (``item``, ``float``, ``bool``, a comparison's
``equal``) and the operations whose output size is data (``nonzero``,
``masked_select``, ``unique``, indexing by a boolean mask), raising
:class:`CaptureRefused`.

:func:`counted_waits` lists the same operations in a block without refusing
them, and the copies between host and device that wait: a read into NumPy or
Python (``numpy``, ``tolist``, ``np.asarray``, where a ``cpu()`` copy goes), and a
tensor made from host data (``torch.as_tensor`` of a NumPy array, ...) while work
is queued, which torch copies from pageable memory and then synchronises.  On a
GPU each is a synchronisation, so a test can hold a loop to the reads it means
to make.

Limits: CPU tensors are host memory, so a read through ``cpu`` (no aten
operation on a CPU tensor) is not seen by a recording, nor a copy from host
data; :func:`counted_waits` does not see a host tensor moved to the device
(``.to``, ``.cuda``, ``copy_``), and takes every operation but views and
unfilled memory for queued work.  Neither sees streams, the private memory
pool, or CUDA's own limits.
"""

import contextlib
import importlib.util
import threading
import warnings

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

_aten = torch.ops.aten
# what a capture cannot do: wait for the device to read a value, or size an output by data
_REFUSED = {_aten._local_scalar_dense.default: "reads a value back to the host",
            _aten.equal.default: "reads a comparison back to the host",
            _aten.is_nonzero.default: "reads a value back to the host",
            # linalg.inv, cholesky, solve... raising on a singular matrix (the _ex
            # forms leave their status on the device)
            _aten._linalg_check_errors.default: "reads a factorisation's status back "
                                                "to the host",
            _aten.nonzero.default: "sizes its output by the data",
            _aten.masked_select.default: "sizes its output by the data",
            _aten._unique2.default: "sizes its output by the data",
            _aten.unique_consecutive.default: "sizes its output by the data"}
# indexing by a boolean mask counts the mask's entries first (a nonzero)
_MASKED = {_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default,
           _aten._index_put_impl_.default}
_state = threading.local()  # .launching: inside an interpreted Triton launch
_HAS_TRITON = importlib.util.find_spec("triton") is not None


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
        refused = _refusal(func, args)
        if refused:
            raise CaptureRefused(f"operation not permitted when stream is capturing: "
                                 f"{func} {refused}")
        out = func(*args, **kwargs)
        self.work.append(_Operation(func, args, kwargs, out))
        return out


def _refusal(func, args):
    """Why a capture refuses the aten operation ``func`` on ``args`` (it waits for
    the device), or None."""
    if func in _MASKED and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                               for i in args[1]):
        return "sizes its work by a boolean mask's count"
    return _REFUSED.get(func)


# operations that queue no work on a GPU: views, and memory taken unfilled
_QUEUE_NOTHING = {_aten.empty.memory_format, _aten.empty_strided.default,
                  _aten.empty_like.default}


class _WaitCounter(TorchDispatchMode):
    """The waits of a block (``waits``), and whether work was queued since the
    last one (``queued``): every aten operation but views and unfilled memory,
    and every Triton launch, queues some."""

    def __init__(self):
        super().__init__()
        self.waits, self.queued = [], False

    def wait(self, what):
        self.waits.append(what)
        self.queued = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not getattr(_state, "launching", False):
            if _refusal(func, args):
                self.wait(func)
            elif not (func.is_view or func in _QUEUE_NOTHING):
                self.queued = True
        return func(*args, **(kwargs or {}))


class HostCopy:
    """A copy between the host and the device that waits for the work queued:
    a tensor read into NumPy or Python (``Tensor.numpy``, ``tolist``), or a
    tensor made from host data (``torch.as_tensor`` of a NumPy array, ...) while
    work is queued: torch copies from pageable host memory to a GPU and then
    synchronises the stream."""

    def __init__(self, what):
        self.what = what

    def __str__(self):
        return self.what

    __repr__ = __str__


class _HostCopies(TorchFunctionMode):
    """Hands ``counter`` a :class:`HostCopy` for each read of a tensor into NumPy
    or Python, and for each tensor made from host data behind queued work,
    outside interpreted launches (the mode is off while it handles one, so
    ``np.asarray``'s own ``numpy`` is not counted again)."""

    _READS = {torch.Tensor.numpy: "Tensor.numpy", torch.Tensor.__array__: "Tensor.numpy",
              torch.Tensor.tolist: "Tensor.tolist"}
    _FROM_HOST = {torch.as_tensor: "torch.as_tensor", torch.tensor: "torch.tensor",
                  torch.asarray: "torch.asarray"}

    def __init__(self, counter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        launching = getattr(_state, "launching", False)
        if not launching and func in self._READS:
            self.counter.wait(HostCopy(self._READS[func]))
        from_host = (not launching and func in self._FROM_HOST and args
                     and not isinstance(args[0], torch.Tensor))
        if from_host and self.counter.queued:
            self.counter.wait(HostCopy(f"{self._FROM_HOST[func]} behind queued work"))
        out = func(*args, **(kwargs or {}))
        if from_host:
            self.counter.queued = False  # the copy waited for what it queued itself
        return out


class _Queued(list):
    """A launch's record that marks work queued on ``counter``."""

    def __init__(self, counter):
        super().__init__()
        self.counter = counter

    def append(self, item):
        self.counter.queued = True


@contextlib.contextmanager
def counted_waits():
    """What in the block waits for the device, outside interpreted Triton
    launches, in order: the aten operations :func:`record` refuses (reads back to
    the host, outputs sized by data) and the copies between host and device that
    wait for queued work (a :class:`HostCopy` each).  On a GPU each is a
    synchronisation."""
    counter = _WaitCounter()
    undo = _launches_into(_Queued(counter)) if _HAS_TRITON else (lambda: None)
    try:
        with counter, _HostCopies(counter):
            yield counter.waits
    finally:
        undo()


def waits_beyond(fit, few, many):
    """What ``fit(many)`` waits for beyond ``fit(few)`` (:func:`counted_waits`, as
    strings), and the two results: for a fit of ``few`` or ``many`` iterations
    from the same start, the waits of ``many - few`` iterations (the start's and
    the end's are in both).  A fit of ``few`` runs first, uncounted, so that what
    a process makes once (cached constants) falls in neither.  The fits'
    ConvergenceWarnings (they stop at the iterations asked for) are ignored."""
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        fit(few)
    waits, results = [], []
    for iterations in (few, many):
        with counted_waits() as counted, warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            results.append(fit(iterations))
        waits.append([str(w) for w in counted])
    extra = list(waits[1])
    for w in waits[0]:
        extra.remove(w)
    return extra, results


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


def _launches_into(work):
    """Make every interpreted Triton launch also go into ``work``, run with the
    recorder's operations let through (the interpreter copies the arguments in
    and out with torch operations of its own); returns the undo."""
    from triton.runtime.interpreter import GridExecutor

    original = GridExecutor.__call__

    def unrecorded(executor, *args, **kwargs):
        before = getattr(_state, "launching", False)
        _state.launching = True
        try:
            return original(executor, *args, **kwargs)
        finally:
            _state.launching = before

    def launching(executor, *args, **kwargs):
        work.append(_Launch(unrecorded, executor, args, kwargs))
        return unrecorded(executor, *args, **kwargs)

    GridExecutor.__call__ = launching
    return lambda: setattr(GridExecutor, "__call__", original)


class CUDAGraph(RecordedGraph):
    """``torch.cuda.CUDAGraph``: empty until :class:`graph` records into it."""

    def __init__(self, *args, **kwargs):
        super().__init__([])


class graph:  # noqa: N801 (torch.cuda.graph's name)
    """``torch.cuda.graph(cuda_graph)``: the block's work recorded into ``cuda_graph``."""

    def __init__(self, cuda_graph, pool=None, stream=None, capture_error_mode="global"):
        self.cuda_graph = cuda_graph

    def __enter__(self):
        self.cuda_graph.work[:] = []
        self._undo = _launches_into(self.cuda_graph.work) if _HAS_TRITON else (lambda: None)
        self._recorder = _Recorder(self.cuda_graph.work)
        self._recorder.__enter__()
        return self

    def __exit__(self, *exc):
        try:
            self._recorder.__exit__(*exc)
        finally:
            self._undo()


def record(body):
    """body() run, and its torch operations and Triton launches kept: a
    :class:`RecordedGraph` of them."""
    recorded = CUDAGraph()
    with graph(recorded):
        body()
    return recorded


class Stream:
    """``torch.cuda.Stream`` on the CPU: work runs as it is issued, so a stream
    orders nothing."""

    def __init__(self, device=None, priority=0):
        self.device = device

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        event = event or Event()
        event.record(self)
        return event

    def synchronize(self):
        pass


class Event:
    """``torch.cuda.Event`` on the CPU: the work before it has run once it is recorded."""

    def __init__(self, *args, **kwargs):
        self.recorded = False

    def record(self, stream=None):
        self.recorded = True

    def query(self):
        return True

    def synchronize(self):
        if not self.recorded:
            raise RuntimeError("synchronize() on an event never recorded")

    def wait(self, stream=None):
        pass


_CURRENT = Stream()


def install(monkeypatch):
    """Put the stand-ins in place of ``torch.cuda``'s graphs, streams and events for
    the test (``monkeypatch``): code written for a GPU records and replays its
    graphs on CPU tensors."""
    import contextlib

    torch_cuda = torch.cuda
    for name, stand_in in dict(CUDAGraph=CUDAGraph, graph=graph, Stream=Stream, Event=Event,
                               stream=lambda s=None: contextlib.nullcontext(s),
                               current_stream=lambda device=None: _CURRENT).items():
        monkeypatch.setattr(torch_cuda, name, stand_in)
