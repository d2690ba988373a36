"""Relaunch a compiled Triton kernel with a fraction of ``kernel[grid](...)``'s host work.

Design: ``JITFunction.run`` does, for every launch, what only the first launch of a
specialisation needs: it binds the arguments to the signature, specialises each one
(a tensor by dtype and 16-byte alignment, an int as 1, divisible by 16, and i32 /
i64 / u64), builds a string cache key of all that and the options, looks the
compiled kernel up, and checks the kernel's globals.  On the 2-core VM, with the C
launcher stubbed (``bench/triton_launch_host.py``), the fused ELBO's two launches
took 38-46 us of its 183-185 us forward + backward in Triton 3.6 and 3.9, and the
IWAE's three 63-65 us of 288; a host-bound call (the VAE loss on a GPU: about 0.07
ms of device time in a 0.7-1 ms call) pays that on every kernel.

:func:`launch_kernel` keys the compiled kernel by a tuple that is at least as fine as
Triton's specialisation (:func:`launch_key`), takes the first launch of each key
through ``kernel[grid]`` (which compiles, checks resources and launches), keeps the
``CompiledKernel`` it returns, and launches it directly afterwards, as
``JITFunction.run`` itself ends: the current device's stream, the compiled function,
every argument in signature order.  The same launches then took 7-11 us (ELBO) and
14-17 us (IWAE): the losses' host time fell 17-19%.  The launchers' grids and tiles
use this module's :func:`cdiv` and :func:`next_power_of_2` (Triton's are constexpr
functions, about 2 us a host call); with them the losses' host time fell 23-28% and
an eager EM iteration's launches' 30-40%.

Limits, each falling back to ``kernel[grid]`` (so results never depend on the path):
the interpreter (``TRITON_INTERPRET=1``), launch or pre-run hooks (profilers such
as Proton), a callable grid, and an argument of another type than a tensor, int,
bool, float or None.  Runtime arguments go positionally and only constexprs and
launch options (``num_warps``) by keyword, since keywords key the cache by value.
The kernel's globals are checked at its first launch only (Triton checks them
every launch; fastlvm's kernels read module constants that never change), and a
change of Triton's debug or instrumentation knobs after a first launch is not seen.
``DIRECT_LAUNCHES = False`` sends every launch through ``kernel[grid]``
(``tests/kernels/sm90_launches.py`` does, since its launches only compile).

The direct launch calls Triton's compiled-kernel launcher the way ``JITFunction.run``
does, which is Triton's internal interface: read in the sources of Triton 3.4 to 3.9,
and tested with each (``tests/kernels/test_launch_kernel.py`` under each wheel,
session 64).  Other versions (``DIRECT_SUPPORTED`` False) take ``kernel[grid]``
always; a new Triton joins the range once that test passes under it.
"""

import functools
import inspect
import re

import triton
from torch import Tensor
from triton.runtime import driver
from triton.runtime.jit import JITFunction

# the Triton versions whose launcher convention this module was checked against
VERIFIED_TRITON = (3, 4), (3, 10)
DIRECT_SUPPORTED = (VERIFIED_TRITON[0]
                    <= tuple(int(v) for v in re.findall(r"\d+", triton.__version__)[:2])
                    < VERIFIED_TRITON[1])
DIRECT_LAUNCHES = DIRECT_SUPPORTED

_I32 = 2**31
_I64 = 2**63
_COMPILED = {}  # launch key -> (CompiledKernel, the arguments after the positional ones)


@triton.jit
def _decorated():
    """Decorated when the kernel modules are: what ``triton.jit`` gives this process."""
    pass


def interpreting():
    """Whether ``triton.jit`` gives this process interpreted kernels (Triton's
    interpreter, on CPU tensors): the tile tables' question, asked at every launch.

    Triton decides at decoration, by ``TRITON_INTERPRET`` when the kernel modules
    are imported, so this asks a kernel decorated with them, not the environment.
    Reading an unset variable costs ``os.environ.get`` a caught ``KeyError``: the
    fused ELBO's four reads took about 10 us of its 112 us of host time in
    ``bench/triton_launch_host.py --harness``.  (Dispatch still reads the
    environment: ``fastlvm._dispatch.triton_interpreter_on``.)"""
    return not isinstance(_decorated, JITFunction)


def cdiv(a, b):
    """``triton.cdiv(a, b)``, ceil(a / b), as plain host arithmetic.

    Triton 3.9 makes ``triton.cdiv`` and ``triton.next_power_of_2`` constexpr
    functions, so a call from the host costs about 2 us (50 ns here), and the
    launchers make several a launch: the grid, the tiles.  The same values
    (``tests/kernels/test_launch_kernel.py`` compares them)."""
    return (a + b - 1) // b


def next_power_of_2(n):
    """``triton.next_power_of_2(n)``: the least power of 2 at or above n, 0 for n <= 0."""
    n = int(n)  # a NumPy or torch integer has no bit_length
    return 1 << (n - 1).bit_length() if n > 0 else 0


def _scalar_key(arg):
    """How Triton specialises a runtime argument other than a tensor, or finer; a
    ``TypeError`` for a type this module does not key."""
    if arg is None:
        return None
    if isinstance(arg, bool):
        return arg, "bool"
    if isinstance(arg, int):
        return arg == 1, arg % 16 == 0, -_I32 <= arg < _I32, arg < _I64
    if isinstance(arg, float):
        return float
    raise TypeError(type(arg))


def launch_key(kernel, device, args, kwargs):
    """The key :func:`launch_kernel` caches ``kernel``'s compiled form under: the kernel,
    the current device, the keywords' values, then each positional argument: a
    tensor's dtype and 16-byte alignment, a scalar's :func:`_scalar_key`.  Two
    calls with one key have one Triton specialisation
    (``tests/kernels/test_launch_kernel.py`` checks that against Triton's binder).
    About 3.5 us for the ELBO kernel's 14 arguments on the 2-core VM, most of it
    reading the ten tensors' dtypes and addresses."""
    key = [kernel, device, *kwargs.items()]
    for arg in args:
        if isinstance(arg, Tensor):
            key += (arg.dtype, arg.data_ptr() % 16 == 0)
        else:
            key.append(_scalar_key(arg))
    return tuple(key)


@functools.lru_cache(maxsize=None)
def _parameters(kernel):
    """(name, is a constexpr, default) of each of ``kernel``'s parameters, read from
    its Python function as Triton reads them (a JIT or an interpreted kernel)."""
    return tuple((name, "constexpr" in str(param.annotation), param.default)
                 for name, param in inspect.signature(kernel.fn).parameters.items())


def _tail(kernel, n_positional, kwargs):
    """The arguments after the positional ones, in signature order: the keywords
    given, else the parameters' defaults.  A keyword naming a runtime parameter is
    refused: its value would key the cache."""
    tail = []
    for i, (name, constexpr, default) in enumerate(_parameters(kernel)):
        if name in kwargs and (i < n_positional or not constexpr):
            raise TypeError(f"launch_kernel({kernel.fn.__name__}): pass the runtime argument "
                            f"{name!r} positionally; keywords are for constexprs")
        if i >= n_positional:
            tail.append(kwargs.get(name, default))
    return tuple(tail)


_CHECKED = set()  # (kernel, positional count, keyword names) whose keywords are constexprs


def _check_keywords(kernel, n_positional, kwargs):
    """:func:`_tail`'s refusal on the launches that go through ``kernel[grid]`` (the
    interpreter's too, so CI sees a call a GPU would refuse), once per call shape."""
    shape = kernel, n_positional, tuple(kwargs)
    if shape not in _CHECKED and hasattr(kernel, "fn"):  # not a test's stand-in
        _tail(kernel, n_positional, kwargs)
        _CHECKED.add(shape)


def _hook_set(hook):
    """Whether a launch hook is set: Triton's knob is None, a function, or a
    ``HookChain`` (empty when nothing is set)."""
    return bool(getattr(hook, "calls", hook is not None))


def _hooked(kernel):
    knobs = triton.knobs.runtime
    return (bool(kernel.pre_run_hooks) or _hook_set(knobs.launch_enter_hook)
            or _hook_set(knobs.launch_exit_hook))


def launch_kernel(kernel, grid, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)``, launched directly after its first call.

    Parameters
    ----------
    kernel : triton.runtime.jit.JITFunction
        A ``@triton.jit`` kernel (an interpreted one is launched as usual).
    grid : tuple of int
        One to three program counts.
    *args : torch.Tensor, int, bool, float or None
        The runtime arguments, the kernel's first ``len(args)`` parameters.
    **kwargs
        Constexprs and launch options (``num_warps``, ``num_stages``).
    """
    key = None
    if (DIRECT_LAUNCHES and isinstance(kernel, JITFunction) and not callable(grid)
            and not _hooked(kernel)):
        active = driver.active
        device = active.get_current_device()
        try:
            key = launch_key(kernel, device, args, kwargs)
            found = _COMPILED.get(key)
        except TypeError:  # an argument not keyed, or unhashable: Triton's own launch
            key = None
    if key is None:
        _check_keywords(kernel, len(args), kwargs)
        kernel[grid](*args, **kwargs)
        return
    if found is None:
        tail = _tail(kernel, len(args), kwargs)
        compiled = kernel[grid](*args, **kwargs)
        if hasattr(compiled, "result"):  # Triton's asynchronous compile mode
            compiled = compiled.result()
        _COMPILED[key] = compiled, tail
        return
    compiled, tail = found
    n = len(grid)
    compiled.run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1,
                 active.get_current_stream(device), compiled.function,
                 compiled.packed_metadata, None, None, None, *args, *tail)
