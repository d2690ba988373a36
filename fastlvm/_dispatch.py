"""Array type -> backend, with the ``FASTLVM_BACKEND`` override.

NumPy arrays and torch CPU tensors run on Numba (torch through a zero-copy
view), torch CUDA tensors on Triton, CuPy arrays on CuPy.  The check looks in
``sys.modules``, so importing fastlvm never imports torch, Triton or CuPy.
Results come back as the array type that came in.  An op with no kernel for the
chosen backend raises and lists the backends it has: there is no silent copy
between devices and no silent fallback.
"""

import importlib
import importlib.util
import os
import sys

import numpy as np

from fastlvm._arrays import is_torch

BACKENDS = ("reference", "numba", "triton", "cupy")
ENV_VAR = "FASTLVM_BACKEND"
# which array kinds each backend computes on without a copy between devices
_HOST_BACKENDS = ("reference", "numba")


def array_kind(x):
    """'numpy', 'torch-cpu', 'torch-cuda' or 'cupy' for a supported array, else None."""
    if isinstance(x, np.ndarray):
        return "numpy"
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return "torch-cpu" if x.device.type == "cpu" else "torch-cuda"
    cupy = sys.modules.get("cupy")
    if cupy is not None and isinstance(x, cupy.ndarray):
        return "cupy"
    return None


_DEFAULT_BACKEND = {"numpy": "numba", "torch-cpu": "numba", "torch-cuda": "triton",
                    "cupy": "cupy"}


def requested_backend():
    """The backend named by ``FASTLVM_BACKEND``, or None when it is unset."""
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if not value:
        return None
    if value not in BACKENDS:
        raise ValueError(
            f"{ENV_VAR}={value!r} is not a backend; use one of {', '.join(BACKENDS)} "
            f"or unset it to follow the input's array type.")
    return value


def on_device(X):
    """True when the estimators fit X on the device backends: a CUDA tensor, a
    cupy array, or a CPU tensor with ``FASTLVM_BACKEND=triton`` (Triton's
    interpreter); other CPU tensors are read through a zero-copy NumPy view."""
    kind = array_kind(X)
    return kind in ("torch-cuda", "cupy") or (kind == "torch-cpu"
                                              and requested_backend() == "triton")


def resolve(op, implementations, x, name="X", any_device=()):
    """Choose the backend that runs ``op`` on ``x``.

    Parameters
    ----------
    op : str
        The op's public name, for messages.
    implementations : dict
        backend name -> callable, the backends that implement ``op``.
    x : array
        The data argument whose type decides the backend.
    name : str
        The parameter name of ``x``, for messages.
    any_device : tuple of str
        Backends written in the input's own array library (the plain-torch
        references of the VAE losses), which run on whatever device ``x`` is
        on; every other host backend takes host arrays only.

    Returns
    -------
    backend : str
    impl : callable

    Raises
    ------
    TypeError
        ``x`` is not a NumPy array, torch tensor or CuPy array.
    NotImplementedError
        The chosen backend has no kernel for ``op``, or cannot run on ``x``'s
        device; the message lists the backends ``op`` has.
    ValueError
        ``x`` is on a GPU other than the current one (the kernels launch on the
        current device).
    """
    kind = array_kind(x)
    if kind is None:
        raise TypeError(
            f"{op}: {name} must be a numpy.ndarray (or a torch tensor / cupy array); "
            f"got {type(x).__name__}. Convert it with numpy.asarray({name}).")
    forced = requested_backend()
    backend = forced or _DEFAULT_BACKEND[kind]
    # the messages' parts are built on the error paths only: resolve runs on every
    # kernel call, where a microsecond is a share of a small GPU call's host time
    if backend not in implementations:
        raise NotImplementedError(
            f"{op} has no '{backend}' kernel (requested by {_how(forced, kind)}); it is "
            f"implemented for: {_available(implementations)}. Pass a NumPy array, or set "
            f"{ENV_VAR} to one of those.")
    host = kind in ("numpy", "torch-cpu")
    if backend in ("triton", "cupy"):
        _check_current_device(op, x, kind, name)
    if backend == "triton":
        _check_triton_can_run(op, kind, name, forced, implementations)
    elif backend == "cupy" and kind != "cupy":
        raise NotImplementedError(
            f"{op}: the 'cupy' backend (requested by {_how(forced, kind)}) takes cupy "
            f"arrays; got a {kind} array, which fastlvm does not copy between devices "
            f"silently. Pass cupy.asarray({name}) (on the GPU), or unset {ENV_VAR}. "
            f"Backends of {op}: {_available(implementations)}.")
    elif backend not in any_device and host != (backend in _HOST_BACKENDS):
        raise NotImplementedError(
            f"{op}: backend '{backend}' cannot run on a {kind} array without copying it "
            f"between devices, which fastlvm never does silently. Move {name} to the "
            f"right device yourself, or choose another backend (available: "
            f"{_available(implementations)}).")
    return backend, implementations[backend]


def _how(forced, kind):
    """What chose the backend, for messages."""
    return f"{ENV_VAR}={forced}" if forced else f"a {kind} input"


def _available(implementations):
    """The backends an op has, for messages."""
    return ", ".join(b for b in BACKENDS if b in implementations)


def _device_index(x, kind):
    """The index of the GPU ``x`` lives on, or None (host arrays, other devices)."""
    if kind == "torch-cuda":
        return x.device.index if x.device.type == "cuda" else None
    if kind == "cupy":  # cupy.cuda.Device; NumPy stand-ins have none
        return getattr(getattr(x, "device", None), "id", None)
    return None


def _current_device(kind):
    if kind == "torch-cuda":
        return sys.modules["torch"].cuda.current_device()
    return sys.modules["cupy"].cuda.runtime.getDevice()


def _check_current_device(op, x, kind, name):
    """Raise where ``x`` is on a GPU other than the current one: the Triton and CuPy
    kernels launch on the current device (its stream, its compiled code), where
    ``x``'s memory is not theirs to read."""
    index = _device_index(x, kind)
    if index is None:
        return
    current = _current_device(kind)
    if index != current:
        how = (f"torch.cuda.device({index})" if kind == "torch-cuda"
               else f"cupy.cuda.Device({index})")
        raise ValueError(
            f"{op}: {name} is on GPU {index}, but the current device is GPU {current}, "
            f"where fastlvm's kernels would launch. Make GPU {index} current for the call "
            f"(with {how}: ...), or move {name} to GPU {current}.")


def triton_interpreter_on():
    """True when ``TRITON_INTERPRET=1``: Triton kernels run on torch CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _check_triton_can_run(op, kind, name, forced, implementations):
    """Raise unless the Triton backend can run ``op`` on a ``kind`` array as it is."""
    if kind == "torch-cpu" and not triton_interpreter_on():
        raise NotImplementedError(
            f"{op}: the 'triton' backend (requested by {_how(forced, kind)}) runs on CUDA "
            f"tensors, or on CPU tensors only under Triton's interpreter. Move {name} to the "
            f"GPU ({name}.cuda()), set TRITON_INTERPRET=1 before importing triton, or unset "
            f"{ENV_VAR}. Backends of {op}: {_available(implementations)}.")
    if kind not in ("torch-cpu", "torch-cuda"):
        raise NotImplementedError(
            f"{op}: the 'triton' backend (requested by {_how(forced, kind)}) takes torch "
            f"tensors; got a {kind} array, which fastlvm does not copy between devices "
            f"silently. Pass torch.as_tensor({name}, device='cuda'), or unset {ENV_VAR}. "
            f"Backends of {op}: {_available(implementations)}.")
    # imported already after the first launch; else a search of sys.path
    if sys.modules.get("triton") is None and importlib.util.find_spec("triton") is None:
        raise NotImplementedError(
            f"{op}: the 'triton' backend (requested by {_how(forced, kind)}) needs the "
            "triton package, which is not installed: pip install 'fastlvm[triton]' (see the "
            f"README). Backends of {op}: {_available(implementations)}.")


def lazy(module, name):
    """A callable that imports ``module`` on first use and calls its ``name``.

    Keeps GPU libraries out of ``import fastlvm``: backend modules that import
    torch, triton or cupy are listed in the op tables through this.
    """
    target = []

    def call(*args, **kwargs):
        if not target:
            target.append(getattr(importlib.import_module(module), name))
        return target[0](*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    call.__module__ = module
    return call


def is_device_backend(backend):
    """True for the backends that compute on torch/cupy arrays in place (GPU)."""
    return backend not in _HOST_BACKENDS


def to_host_view(x, name="X"):
    """A NumPy view of a torch CPU tensor (zero-copy); anything else (NumPy
    arrays, None, array-likes for the checks to convert) as it is.  ``name``,
    the parameter's, is for the error on a tensor dtype NumPy lacks."""
    if not is_torch(x):
        return x
    try:
        return x.detach().numpy()
    except TypeError:  # bfloat16, the float8 types: "Got unsupported ScalarType"
        raise TypeError(
            f"{name} is a {x.dtype} tensor, which NumPy cannot view, and the host kernels "
            f"take float32 or float64: convert it with {name}.to(torch.float32) (or "
            "torch.float64).") from None


def like(template, value):
    """Return ``value`` (NumPy) as the array type of ``template`` (no copy)."""
    if isinstance(template, np.ndarray) or not isinstance(value, np.ndarray):
        return value
    torch = sys.modules["torch"]
    return torch.from_numpy(value)
