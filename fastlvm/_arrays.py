"""The few array operations the drivers need on NumPy arrays and torch tensors alike.

The M-step and the initialisation run where the data lives: NumPy on the
host, torch on the tensor's device (float64 there too).  Everything else in
those modules is written with operators and methods NumPy and torch share;
these helpers cover the rest.  torch is never imported here: a tensor's
module is found through ``sys.modules``.
"""

import sys

import numpy as np


def is_torch(a):
    """True for a torch tensor (without importing torch)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(a, torch.Tensor)


def as_f64(a):
    """float64 copy-if-needed of an array, on the same device."""
    if is_torch(a):
        return a.to(sys.modules["torch"].float64)
    return np.asarray(a, dtype=np.float64)


def f64_like(template, value):
    """``value`` (NumPy or tensor) as float64 of ``template``'s kind and device."""
    if is_torch(template):
        torch = sys.modules["torch"]
        return torch.as_tensor(np.asarray(value) if not is_torch(value) else value,
                               dtype=torch.float64, device=template.device)
    return as_f64(value if not is_torch(value) else value.detach().cpu().numpy())


def zeros_like(template, shape):
    """float64 zeros of ``shape`` on ``template``'s device."""
    if is_torch(template):
        torch = sys.modules["torch"]
        return torch.zeros(shape, dtype=torch.float64, device=template.device)
    return np.zeros(shape)


def stack(arrays):
    """Stack a list of same-kind arrays along a new first axis."""
    if is_torch(arrays[0]):
        return sys.modules["torch"].stack(arrays)
    return np.asarray(arrays)


def cast_like(a, template):
    """``a`` (same kind and device as ``template``) in ``template``'s dtype."""
    return a.to(template.dtype) if is_torch(a) else a.astype(template.dtype)


def add_to_diagonal(a, value):
    """a[..., i, i] += value, in place."""
    if is_torch(a):
        a.diagonal(dim1=-2, dim2=-1).add_(value)
    else:
        np.einsum("...ii->...i", a)[...] += value
    return a


def log(a):
    """Natural log, -inf at zero without a warning."""
    if is_torch(a):
        return sys.modules["torch"].log(a)
    with np.errstate(divide="ignore"):
        return np.log(a)


def eps_of(dtype):
    """Machine epsilon of a NumPy or torch floating dtype."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(dtype, torch.dtype):
        return float(torch.finfo(dtype).eps)
    return float(np.finfo(dtype).eps)


def is_float32(X):
    """True for float32 data, NumPy or torch."""
    torch = sys.modules.get("torch")
    return X.dtype == np.float32 or (torch is not None and X.dtype == torch.float32)


def to_numpy(a):
    """A NumPy copy of a (small) array, torch tensor or CuPy array, for host-side work.

    Used for parameters (K x D x D numbers at most), never for data rows.
    """
    if is_torch(a):
        return a.detach().cpu().numpy()
    if type(a).__module__.split(".")[0] == "cupy":
        return a.get()
    return np.asarray(a)
