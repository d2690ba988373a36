"""A NumPy-backed ``cupy`` module for the CPU, strict where CuPy is (tests only).

With it the CuPy backend, and the estimators on cupy arrays, run end to end in
CI: its ``RawModule`` compiles the CUDA kernels for the fiber emulator
(``cuda_emulator.py``), and everything else is NumPy's.

Its arrays (:class:`FakeCupyArray`) wrap a NumPy array and keep the rules a
GPU array lives by, so code that would fail on a GPU fails here:

- No implicit trip to the host: ``numpy.asarray(a)`` raises CuPy's TypeError
  (use ``a.get()`` or ``cupy.asnumpy(a)``), and so does any NumPy code that
  needs the host array (``np.testing`` on a cupy result, say).
- No host arrays in device work: a NumPy array among the arguments of a cupy
  function, an operator or a kernel launch raises CuPy's "Unsupported type"
  TypeError.  ``cupy.array`` / ``asarray`` / ``asanyarray`` take host data (a
  copy to the device); ``cupy.ascontiguousarray`` does not, as in CuPy.
  Indices may be host arrays (CuPy copies them over); a value assigned
  through basic indexing may not (CuPy: "non-scalar numpy.ndarray cannot be
  used for fill").
- Reductions and scalar indexing give 0-d arrays, not NumPy scalars; ``float``,
  ``int`` and ``bool`` of one read it back, as in CuPy.
- ``a.device`` is a :class:`FakeDevice` (GPU 0, a context manager).
- No floating-point warnings: a GPU overflows or divides by zero silently.

NumPy functions on these arrays (``np.exp(a)``, ``np.sum(a)``) give cupy
arrays, as CuPy's ``__array_ufunc__`` / ``__array_function__`` do.  Streams,
events and graphs keep CuPy's bookkeeping (:class:`FakeStream`): the current
stream, and a capture, during which anything that reads back to the host
(``get``, ``float``, a boolean mask's count) raises, as does any copy of host
data to the device (``asarray`` of a NumPy array, ``set``, a host index array:
CuPy stages it through a pinned buffer it reuses, which a replay would read
stale), and which keeps the device work issued in it (every operation, copy,
fill and kernel launch goes through :func:`issue`) for its graph's replays
(:class:`FakeGraph`).  Fresh ``empty``
/ ``empty_like`` arrays hold NaN, as a GPU's memory may hold anything
(``tests/undefined_memory.py``).  The factorisations fail as CuPy's do by
default, with NaN and no exception.

What it cannot check: timing, float rounding on the GPU, what CUDA or CuPy
refuse inside a capture beyond reads back and copies up (cuBLAS and cuSOLVER
calls among the candidates, cupy/cupy#6290), and functions CuPy lacks (NumPy's
are all here).
"""

import contextlib
import operator
import types

import numpy as np

from tests.undefined_memory import allocating_undefined

_HOST_ARRAY = ("Unsupported type <class 'numpy.ndarray'>: CuPy takes no host arrays in "
               "device work; copy it over with cupy.asarray first")


class FakeDevice:
    """``cupy.cuda.Device``: GPU ``id`` 0, the only one; entering it makes it
    current (it always is).  Its compute capability is an H100's."""

    compute_capability = "90"

    def __init__(self, device=None):
        self.id = 0 if device is None else int(getattr(device, "id", device))
        if self.id != 0:
            raise RuntimeError("cudaErrorInvalidDevice: invalid device ordinal")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def __eq__(self, other):
        return isinstance(other, FakeDevice) and other.id == self.id

    def __hash__(self):
        return hash((FakeDevice, self.id))

    def __repr__(self):
        return f"<CUDA Device {self.id}>"

    def synchronize(self):
        pass


def _host_values(value):
    """``value`` with every :class:`FakeCupyArray` (in lists and tuples too)
    replaced by its NumPy array; a NumPy array raises, as in CuPy."""
    if isinstance(value, FakeCupyArray):
        return value._array
    if isinstance(value, np.ndarray):
        raise TypeError(_HOST_ARRAY)
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_host_values(v) for v in value)
    if isinstance(value, list):
        return [_host_values(v) for v in value]
    return value


def _silently(function, *args, **kwargs):
    """``function(*args, **kwargs)`` with NumPy's floating-point warnings off: a
    GPU divides by zero or overflows without a word."""
    with np.errstate(all="ignore"):
        return function(*args, **kwargs)


def _kwargs_values(kwargs):
    return {k: _host_values(v) for k, v in kwargs.items()}


def _on_device(result):
    """NumPy results as CuPy gives them: arrays (and scalars, as 0-d arrays)
    wrapped, in tuples and lists too; anything else as it is."""
    if isinstance(result, np.ndarray):
        return FakeCupyArray(result)
    if isinstance(result, (np.number, np.bool_)):
        return FakeCupyArray(np.asarray(result))
    if isinstance(result, tuple):
        return tuple(_on_device(r) for r in result)
    if isinstance(result, list):
        return [_on_device(r) for r in result]
    return result


def issue(compute):
    """Device work: ``compute()`` (NumPy work on device arrays' own arrays) run now,
    its result as device arrays.  While a stream captures, the work is also kept
    for the graph (:class:`FakeGraph`), whose replays run it again, in order,
    writing its results into the same arrays, as a CUDA graph's replay writes the
    addresses the capture recorded."""
    result = _on_device(compute())
    if FakeStream.capturing is not None:
        FakeStream.capturing.work.append((compute, result))
    return result


def _write_back(captured, fresh):
    """A replay's ``fresh`` results into the arrays its capture gave out."""
    if isinstance(captured, FakeCupyArray):
        if captured._array.flags.writeable:  # (a read-only one is a view of an input)
            np.copyto(captured._array, fresh)
    elif isinstance(captured, (tuple, list)):
        for c, f in zip(captured, fresh):
            _write_back(c, f)


def _device_work(function, args, kwargs=None):
    """``function`` (NumPy's) on device arrays, as device work (:func:`issue`)."""
    kwargs = kwargs or {}
    return issue(lambda: _silently(function, *_host_values(args), **_kwargs_values(kwargs)))


# cupy functions whose result's size depends on the data: CuPy reads a count back
# from the device to size it, which a capture refuses
_SIZED_BY_DATA = frozenset({"nonzero", "flatnonzero", "argwhere", "unique", "compress",
                            "extract"})


def _device_function(function):
    """``function`` (NumPy's) as a cupy function: device arrays in, device arrays out."""
    def run(*args, **kwargs):
        if getattr(function, "__name__", None) in _SIZED_BY_DATA:
            _refuse_in_capture()
        return _device_work(function, args, kwargs)

    run.__name__ = getattr(function, "__name__", "function")
    run.__doc__ = getattr(function, "__doc__", None)
    return run


def _index_values(key):
    """An index with device arrays unwrapped; host arrays and lists are fine
    there (CuPy copies them over), but not in a capture."""
    if isinstance(key, FakeCupyArray):
        return key._array
    if isinstance(key, tuple):
        return tuple(_index_values(k) for k in key)
    if isinstance(key, (np.ndarray, list)):
        _refuse_copy_up_in_capture()
    return key


def _masks(key):
    """True for an index holding a boolean array."""
    parts = key if isinstance(key, tuple) else (key,)
    return any(isinstance(k, (np.ndarray, FakeCupyArray)) and k.dtype == np.bool_
               for k in parts)


def _advanced(key):
    """True for an index CuPy scatters through (arrays, lists, booleans)."""
    parts = key if isinstance(key, tuple) else (key,)
    return any(isinstance(k, (np.ndarray, FakeCupyArray, list, bool, np.bool_))
               for k in parts)


class FakeCupyArray:
    """``cupy.ndarray`` on the host: a NumPy array (``_array``) behind CuPy's rules
    (see the module's docstring).  Attributes and methods not defined here are
    NumPy's, with device arrays in and out."""

    __slots__ = ("_array",)
    __array_priority__ = 100
    __hash__ = None

    def __init__(self, array):
        if not isinstance(array, np.ndarray):
            raise TypeError(f"FakeCupyArray wraps a NumPy array, got {type(array).__name__}")
        self._array = array

    # -- what CuPy refuses ------------------------------------------------------
    def __array__(self, *args, **kwargs):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. Please use "
                        "`.get()` to construct a NumPy array explicitly.")

    def __getattr__(self, name):
        if name.startswith("__") or name == "_array":  # __array_interface__ and kin
            raise AttributeError(name)
        value = getattr(self._array, name)
        return _device_function(value) if callable(value) else _on_device(value)

    # -- CuPy's own -------------------------------------------------------------
    @property
    def device(self):
        return FakeDevice(0)

    def get(self, stream=None, order="C", out=None, blocking=True):
        return _asnumpy(self, stream, order, out, blocking=blocking)

    def set(self, arr, stream=None):
        if not isinstance(arr, np.ndarray) or arr.shape != self._array.shape:
            raise ValueError("set() takes a NumPy array of the same shape")
        _refuse_copy_up_in_capture()
        issue(lambda: self._array.__setitem__(Ellipsis, arr))

    def fill(self, value):
        if isinstance(value, np.ndarray) and value.shape != ():
            raise ValueError("non-scalar numpy.ndarray cannot be used for fill")
        issue(lambda: self._array.fill(_host_values(value)))

    # -- NumPy's protocols: NumPy functions on device arrays stay on the device ----
    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        out = kwargs.get("out")
        result = _device_work(getattr(ufunc, method), inputs, kwargs)
        if out is not None:
            return out[0] if len(out) == 1 else out
        return result

    def __array_function__(self, function, types_, args, kwargs):
        return _device_work(function, args, kwargs)

    # -- the Python protocols -----------------------------------------------------
    def __getitem__(self, key):
        if _masks(key):
            _refuse_in_capture()  # the result's size is the mask's count, read back
        return issue(lambda: self._array[_index_values(key)])

    def __setitem__(self, key, value):
        if _masks(key):
            _refuse_in_capture()  # CuPy counts the mask's entries on the host
        if isinstance(value, np.ndarray):
            if value.shape != () and not _advanced(key):
                raise ValueError("non-scalar numpy.ndarray cannot be used for fill")
        host = value if isinstance(value, np.ndarray) else None  # copied over by CuPy
        if host is not None and host.shape != ():
            _refuse_copy_up_in_capture()
        issue(lambda: self._array.__setitem__(
            _index_values(key), host if host is not None else _host_values(value)))

    def __len__(self):
        return len(self._array)

    def __iter__(self):
        return (_on_device(row) for row in self._array)

    # -- reads back to the host (each waits for the device: refused in a capture) --
    def __bool__(self):
        return bool(_read_back(self))

    def __float__(self):
        return float(_read_back(self))

    def __int__(self):
        return int(_read_back(self))

    def __complex__(self):
        return complex(_read_back(self))

    def __format__(self, spec):
        return format(_read_back(self), spec)

    def __repr__(self):
        return repr(_read_back(self))

    def __str__(self):
        return str(_read_back(self))

    def item(self, *args):
        return _read_back(self).item(*args)

    def tolist(self):
        return _read_back(self).tolist()

    def __copy__(self):
        return issue(lambda: self._array.copy())

    def __deepcopy__(self, memo):
        return issue(lambda: self._array.copy())

    def __reduce__(self):  # pickling reads the array back, as CuPy's does
        return FakeCupyArray, (_read_back(self).copy(),)


def _binary(op):
    def forward(self, other):
        return _device_work(op, (self, other))

    def reflected(self, other):
        return _device_work(op, (other, self))

    def in_place(self, other):
        _device_work(op, (self, other))  # NumPy's in-place operators keep the array
        return self

    return forward, reflected, in_place


for _name in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and",
              "or", "xor", "lshift", "rshift"):
    _forward, _reflected, _ = _binary(getattr(operator, _name + "_" if _name in ("and", "or")
                                              else _name))
    _, _, _in_place = _binary(getattr(operator, f"i{_name}"))
    setattr(FakeCupyArray, f"__{_name}__", _forward)
    setattr(FakeCupyArray, f"__r{_name}__", _reflected)
    setattr(FakeCupyArray, f"__i{_name}__", _in_place)
for _name in ("lt", "le", "eq", "ne", "gt", "ge"):
    setattr(FakeCupyArray, f"__{_name}__", _binary(getattr(operator, _name))[0])
for _name in ("neg", "pos", "abs", "invert"):
    setattr(FakeCupyArray, f"__{_name}__",
            (lambda op: lambda self: _device_work(op, (self,)))(getattr(operator, _name)))


class _DeviceUfunc:
    """A NumPy ufunc as a cupy one: called, or through ``reduce`` / ``at`` / ..."""

    def __init__(self, ufunc):
        self._ufunc = ufunc

    def __call__(self, *args, **kwargs):
        return self._method("__call__", args, kwargs)

    def __getattr__(self, name):
        value = getattr(self._ufunc, name)
        if not callable(value):
            return value
        return lambda *args, **kwargs: self._method(name, args, kwargs)

    def _method(self, name, args, kwargs):
        out = kwargs.get("out")
        result = _device_work(getattr(self._ufunc, name), args, kwargs)
        if out is not None:
            return out[0] if isinstance(out, tuple) and len(out) == 1 else out
        return result


def _testing_namespace():
    """``cupy.testing``: NumPy's assertions, reading device arrays back."""
    module = types.ModuleType("cupy.testing")

    def attribute(attr):
        if attr.startswith("__"):  # NumPy's __file__, __version__ are not cupy's
            raise AttributeError(attr)
        check = getattr(np.testing, attr)
        return lambda *args, **kwargs: check(
            *(a._array if isinstance(a, FakeCupyArray) else a for a in args), **kwargs)

    module.__dict__["__getattr__"] = attribute
    return module


def _device_namespace(name, numpy_module, **own):
    """A module named ``name`` whose functions are ``numpy_module``'s as cupy
    functions, with ``own`` in place of some."""
    module = types.ModuleType(name)

    def attribute(attr):
        if attr.startswith("__"):  # NumPy's __file__, __version__ are not cupy's
            raise AttributeError(attr)
        value = getattr(numpy_module, attr)
        if isinstance(value, np.ufunc):
            return _DeviceUfunc(value)
        if isinstance(value, type) or not callable(value):
            return value  # dtypes and scalar types, finfo, constants
        return _device_function(value)

    module.__dict__["__getattr__"] = attribute
    module.__dict__.update(own)
    return module


# -- streams, events, graphs, allocators: CuPy's bookkeeping --------------------------
class FakeStream:
    """``cupy.cuda.Stream``.  Work runs as it is issued (NumPy is eager), so a
    stream orders nothing; what it keeps is CuPy's bookkeeping: the current
    stream (``with stream:``), the events waited on, and a capture, between
    ``begin_capture`` and ``end_capture``, during which reading an array back to
    the host (``asnumpy``, ``get``) raises as CuPy does (a capture cannot wait
    for the device) and the device work issued is kept (``work``: see
    :func:`issue`) for the graph ``end_capture`` returns.  The allocator in use
    when the capture began is kept (``capture_allocator``)."""

    capturing = None  # the stream in capture, if any
    current = []  # the streams entered, innermost last

    def __init__(self, non_blocking=False):
        self.non_blocking = non_blocking
        self.waited = []
        self.capture_allocator = None

    def record(self, event=None):
        return ("event", self)

    def wait_event(self, event):
        self.waited.append(event)

    def synchronize(self):
        pass

    def __enter__(self):
        FakeStream.current.append(self)
        return self

    def __exit__(self, *exc):
        FakeStream.current.pop()

    def begin_capture(self, mode=None):
        if FakeStream.capturing is not None:
            raise RuntimeError("a capture is already under way")
        if not FakeStream.current or FakeStream.current[-1] is not self:
            raise RuntimeError("capture began on a stream that is not the current one")
        FakeStream.capturing = self
        self.capture_allocator = _ALLOCATORS[-1]
        self.work = []

    def end_capture(self):
        if FakeStream.capturing is not self:
            raise RuntimeError("end_capture on a stream that is not capturing")
        FakeStream.capturing = None
        return FakeGraph(self.work)

    def is_capturing(self):
        return FakeStream.capturing is self


class FakeGraph:
    """``cupy.cuda.Graph``: the captured work already ran, once, as it was issued;
    the first launch stands for that run.  Each later launch replays it: every
    piece of device work captured (kernel launches, array operations, copies,
    fills) runs again, in order, on the arrays the capture gave it, and writes
    into the arrays it gave out, as a CUDA graph replays its recorded addresses.
    What ran on the host during the capture (Python's own arithmetic, caches,
    choices) does not run again, as on a GPU: a step that depends on it goes
    stale, and differs from the plain iteration.  ``launches`` counts them."""

    def __init__(self, work=()):
        self.work, self.launches = list(work), 0

    def launch(self, stream=None):
        self.launches += 1
        if self.launches > 1:
            for compute, result in self.work:
                _write_back(result, compute())


class FakeMemoryPool:
    """``cupy.cuda.MemoryPool``: NumPy allocates, so ``malloc`` is never called."""

    def malloc(self, size):
        raise NotImplementedError("NumPy-backed arrays do not allocate through a pool")


_NULL_STREAM = FakeStream()
_ALLOCATORS = [None]  # the allocators set by using_allocator, innermost last


@contextlib.contextmanager
def _using_allocator(allocator=None):
    _ALLOCATORS.append(allocator)
    try:
        yield
    finally:
        _ALLOCATORS.pop()


class FakeEvent:
    """``cupy.cuda.Event``: work has run by the time it is issued, so an event is
    done when recorded; it keeps the stream it was recorded on."""

    def __init__(self, *args, **kwargs):
        self.stream = None

    def record(self, stream=None):
        self.stream = stream

    def synchronize(self):
        if self.stream is None:
            raise RuntimeError("synchronize() on an event never recorded")


def _refuse_in_capture():
    """Raise while a stream captures, as CuPy does for any read back to the host
    (anything that waits for the device)."""
    if FakeStream.capturing is not None:
        raise RuntimeError("the current stream is capturing, so D2H transfers are disallowed")


def _refuse_copy_up_in_capture():
    """Raise while a stream captures, for a copy of host data to the device: CuPy
    stages it through a pinned buffer that goes back to its pool once the copy is
    done, so a graph replaying the copy would read a buffer since reused; and a
    copy from pageable memory synchronises, which a capture refuses.  Copy before
    the capture, into arrays the graph reads."""
    if FakeStream.capturing is not None:
        raise RuntimeError("the current stream is capturing: a copy of host data to the "
                           "device cannot be part of the graph (copy it before the capture)")


def _read_back(a):
    """A device array's NumPy array, for a read back to the host (refused in a
    capture)."""
    _refuse_in_capture()
    return a._array


def _asnumpy(a, stream=None, order="C", out=None, *, blocking=True):
    host = _read_back(a) if isinstance(a, FakeCupyArray) else np.asarray(a)
    if out is None:
        return np.array(host, order=order)
    out[...] = host
    return out


def _host_data(obj):
    """``obj`` for NumPy to read: a device array's own array, or host data (lists
    of device arrays included)."""
    if isinstance(obj, FakeCupyArray):
        return obj._array
    return _host_values(obj) if isinstance(obj, (list, tuple)) else obj


def _array(obj, dtype=None, copy=True, order="K", subok=False, ndmin=0, *, blocking=False,
           device=None):
    """``cupy.array``: host data is always copied (to the device)."""
    on_device = isinstance(obj, FakeCupyArray)
    if not on_device:
        _refuse_copy_up_in_capture()
    return issue(lambda: np.array(_host_data(obj), dtype=dtype, order=order, ndmin=ndmin,
                                  copy=copy if on_device else True))


def _asarray(a, dtype=None, order=None, *, copy=None, blocking=False, device=None):
    """``cupy.asarray``: a device array as it is where it can be; host data copied."""
    if isinstance(a, FakeCupyArray) and not copy:
        return issue(lambda: np.asarray(a._array, dtype=dtype, order=order))
    return _array(a, dtype, copy=True, order=order or "K")


def _device_only(function):
    """A cupy function that takes device arrays only (``ascontiguousarray``)."""
    def run(a, *args, **kwargs):
        if not isinstance(a, FakeCupyArray):
            raise TypeError(f"Argument 'a' has incorrect type (expected cupy.ndarray, got "
                            f"{type(a).__name__})")
        return issue(lambda: function(a._array, *args, **kwargs))

    return run


def _quiet(factorisation):
    """A NumPy factorisation that fails as CuPy's does by default: no exception,
    NaN in its result (CuPy checks its solver's status only when asked to,
    which would wait for the device)."""
    def compute(a):
        out = np.empty_like(a)
        for index in np.ndindex(a.shape[:-2]):
            try:
                out[index] = factorisation(a[index])
            except np.linalg.LinAlgError:
                out[index] = np.nan
        return out

    return lambda a: _device_work(compute, (a,))


def fake_cupy():
    """A fresh module named ``cupy`` (see the module's docstring); its
    ``RawModule`` runs kernels on the fiber emulator."""
    from tests.kernels.cuda_emulator import EmulatedRawModule

    undefined_empty = allocating_undefined(np.empty)
    undefined_empty_like = allocating_undefined(np.empty_like)
    fake = _device_namespace(
        "cupy", np, ndarray=FakeCupyArray, RawModule=EmulatedRawModule,
        array=_array, asarray=_asarray, asanyarray=_asarray,
        ascontiguousarray=_device_only(np.ascontiguousarray),
        copy=_device_only(np.copy), asnumpy=_asnumpy,
        empty=lambda *a, **kw: FakeCupyArray(undefined_empty(*a, **kw)),
        empty_like=lambda a, *args, **kw: FakeCupyArray(
            undefined_empty_like(_host_values(a), *args, **kw)),
        linalg=_device_namespace("cupy.linalg", np.linalg,
                                 cholesky=_quiet(np.linalg.cholesky),
                                 inv=_quiet(np.linalg.inv)),
        random=_device_namespace("cupy.random", np.random), testing=_testing_namespace())
    FakeStream.capturing, FakeStream.current[:] = None, []
    fake.cuda = types.SimpleNamespace(
        runtime=types.SimpleNamespace(getDevice=lambda: 0), Device=FakeDevice,
        Stream=FakeStream, Graph=FakeGraph, MemoryPool=FakeMemoryPool,
        using_allocator=_using_allocator, Event=FakeEvent, alloc_pinned_memory=bytearray,
        get_current_stream=lambda: (FakeStream.current or [_NULL_STREAM])[-1])
    fake.EMULATED = True  # what tells this module from CuPy
    fake.get_array_module = lambda *arrays: (
        fake if any(isinstance(a, FakeCupyArray) for a in arrays) else np)
    return fake
