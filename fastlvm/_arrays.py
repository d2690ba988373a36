"""The few array operations the drivers need on NumPy, torch and CuPy arrays alike.

The M-step and the initialisation run where the data lives: NumPy on the
host, torch on the tensor's device, CuPy on the cupy array's device (float64
there too).  Everything else in those modules is written with operators and
methods the three share; these helpers cover the rest.  torch and cupy are
never imported here: an array's module is found through ``sys.modules``.
"""

import contextlib
import sys

import numpy as np


def is_torch(a):
    """True for a torch tensor (without importing torch)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(a, torch.Tensor)


def is_cupy(a):
    """True for a cupy array (without importing cupy)."""
    cupy = sys.modules.get("cupy")
    return cupy is not None and isinstance(a, cupy.ndarray)


def numpy_readable(a):
    """A CPU tensor as the NumPy array sklearn's checks read; anything else as it is.

    The array is a zero-copy view of the tensor's memory (of its detached
    view, where it requires grad: the estimators never differentiate through
    their data), so a float32 tensor stays float32, as a float32 array does,
    and is not copied: sklearn's own checks would copy it to float64 (they
    read a dtype that is not NumPy's as unknown).  A tensor of a dtype NumPy
    lacks (bfloat16, the float8 types) becomes a float64 copy, as sklearn
    converts float16 arrays; torch would refuse it with "Got unsupported
    ScalarType".  CUDA tensors never go through NumPy (their own checks name
    the dtypes).
    """
    if not is_torch(a) or a.device.type != "cpu":
        return a
    torch = sys.modules["torch"]
    if a.requires_grad:
        a = a.detach()
    if a.is_floating_point() and a.dtype not in (torch.float16, torch.float32, torch.float64):
        a = a.double()
    return a.resolve_conj().resolve_neg().numpy()


def is_device_array(a):
    """True for the arrays whose work runs on their own device: torch tensors, cupy arrays."""
    return is_torch(a) or is_cupy(a)


def namespace(a):
    """The module whose functions take ``a``: torch, cupy or numpy (for the names
    the three share: minimum, cumsum, searchsorted, argmin, where, ...)."""
    if is_torch(a):
        return sys.modules["torch"]
    if is_cupy(a):
        return sys.modules["cupy"]
    return np


def _on_device_of(template):
    """Context that makes ``template``'s GPU current for new cupy arrays."""
    return template.device if is_cupy(template) else contextlib.nullcontext()


def as_f64(a):
    """float64 copy-if-needed of an array, on the same device."""
    if is_torch(a):
        return a.to(sys.modules["torch"].float64)
    if is_cupy(a):
        return a.astype(np.float64, copy=False)
    return np.asarray(a, dtype=np.float64)


def _array_like(template, value, dtype):
    """``value`` (any kind) as a ``dtype`` array of ``template``'s kind and device."""
    if is_torch(template):
        torch = sys.modules["torch"]
        return torch.as_tensor(value if is_torch(value) else to_numpy(value),
                               dtype=getattr(torch, np.dtype(dtype).name),
                               device=template.device)
    if is_cupy(template):
        with _on_device_of(template):
            return sys.modules["cupy"].asarray(
                to_numpy(value) if is_torch(value) else value, dtype=dtype)
    return np.asarray(to_numpy(value), dtype=dtype)


def f64_like(template, value):
    """``value`` (NumPy, tensor or cupy) as float64 of ``template``'s kind and device."""
    return _array_like(template, value, np.float64)


def f64_together(template, values):
    """``values`` (NumPy arrays, numbers, or arrays of ``template``'s kind and
    device) as float64 arrays of ``template``'s kind and device, the host ones
    copied there in one copy: torch's copy from pageable host memory to a GPU
    is a synchronous transfer that waits for the work queued, a round trip each
    where the values went one by one.  The copies are views of one buffer (read
    them; write to copies of them).

    Returns
    -------
    list of arrays, shaped as ``values``
    """
    if not is_device_array(template):
        return [np.asarray(to_numpy(v), dtype=np.float64) for v in values]
    host = [np.asarray(v, dtype=np.float64) for v in values if not is_device_array(v)]
    flat = f64_like(template, np.concatenate([h.reshape(-1) for h in host])) if host else None
    return _unpacked(flat, values, lambda v: not is_device_array(v),
                     lambda v: f64_like(template, v))


def _unpacked(flat, values, packed, other):
    """``values`` with each one ``packed(v)`` is true of replaced, in order, by the
    next slice of ``flat`` in its shape, and every other one by ``other(v)``."""
    out, start = [], 0
    for v in values:
        if not packed(v):
            out.append(other(v))
            continue
        shape = tuple(np.shape(v))
        size = int(np.prod(shape))
        out.append(flat[start:start + size].reshape(shape))
        start += size
    return out


def index_like(template, value):
    """Integer indices ``value`` as an int64 array of ``template``'s kind and device."""
    return _array_like(template, value, np.int64)


def sign_of_largest(rows):
    """(...,) the sign of each row's entry of largest magnitude (+1 for a zero row),
    for rows of shape (..., n) of any array kind: multiplying each row by it fixes
    the sign that eigensolvers and SVDs leave free (sklearn's ``svd_flip`` rule),
    so a result does not depend on the backend, the chunking or the rounding."""
    flat = rows.reshape(-1, rows.shape[-1])
    xp = namespace(flat)
    largest = xp.argmax(xp.abs(flat), 1)[:, None]
    # (a gather on the device: no row indices copied there behind the argmax)
    picked = (flat.gather(1, largest) if is_torch(flat)
              else xp.take_along_axis(flat, largest, 1))[:, 0]
    signs = xp.sign(picked)
    return (signs + (signs == 0)).reshape(rows.shape[:-1])  # a zero row: +1


def copy_of(a):
    """A copy of an array of any kind, on its device (``clone`` for a tensor)."""
    return a.clone() if is_torch(a) else a.copy()


def empty_like_rows(template, shape, dtype=None):
    """An uninitialised array of ``shape`` for results of the rows ``template``, on
    its device, of ``dtype`` (a NumPy dtype) or the template's own (a cupy one is
    zeroed)."""
    if is_torch(template):
        torch = sys.modules["torch"]
        dt = template.dtype if dtype is None else getattr(torch, np.dtype(dtype).name)
        return torch.empty(shape, dtype=dt, device=template.device)
    if is_cupy(template):
        return zeros_like(template, shape, dtype=template.dtype if dtype is None else dtype)
    return np.empty(shape, dtype=template.dtype if dtype is None else dtype)


def zeros_like(template, shape, dtype=np.float64):
    """Zeros of ``shape`` (float64 unless told) on ``template``'s device."""
    if is_torch(template):
        torch = sys.modules["torch"]
        return torch.zeros(shape, dtype=getattr(torch, np.dtype(dtype).name),
                           device=template.device)
    with _on_device_of(template):
        return namespace(template).zeros(shape, dtype=dtype)


def stack(arrays):
    """Stack a list of same-kind arrays along a new first axis."""
    if is_device_array(arrays[0]):
        return namespace(arrays[0]).stack(arrays)
    return np.asarray(arrays)


def one_hot(labels, n_classes):
    """(n, n_classes) float64 one-hot rows of int labels in [0, n_classes), on the
    labels' device.  torch's ``one_hot`` reads the labels' range back to the host
    (a synchronisation a call); a scatter does not."""
    out = zeros_like(labels, (labels.shape[0], n_classes))
    if is_torch(labels):
        return out.scatter_(1, labels[:, None], 1.0)
    out[namespace(labels).arange(labels.shape[0]), labels] = 1.0
    return out


def arrays_equal(a, b):
    """True when two same-kind arrays hold the same values."""
    if is_torch(a):
        return bool(sys.modules["torch"].equal(a, b))
    return bool(namespace(a).array_equal(a, b))


# Factorisations of (stacks of) small matrices without waiting for the device:
# torch's linalg.cholesky / solve / inv read their status back to the host to
# raise on a matrix they cannot factor (a synchronisation a call); the _ex forms
# leave it on the device.  CuPy reads it back only under
# cupyx.errstate(linalg='raise').  The callers factor matrices that are positive
# definite by construction (I or sigma^2 I plus positive semi-definite terms);
# parameters that overflowed to inf or NaN give NaN here, which the EM driver
# refuses with the remedy (fastlvm.em).

def linalg_cholesky(a):
    """Lower Cholesky factors of ``a`` (..., m, m), of its kind."""
    if is_torch(a):
        return sys.modules["torch"].linalg.cholesky_ex(a)[0]
    return namespace(a).linalg.cholesky(a)


def linalg_solve(a, b):
    """x with a x = b for ``a`` (..., m, m) and ``b`` (..., m, k), of their kind."""
    if is_torch(a):
        return sys.modules["torch"].linalg.solve_ex(a, b)[0]
    return namespace(a).linalg.solve(a, b)


def linalg_inv(a):
    """The inverses of ``a`` (..., m, m), of its kind."""
    if is_torch(a):
        return sys.modules["torch"].linalg.inv_ex(a)[0]
    return namespace(a).linalg.inv(a)


def clamp(a, low=None, high=None):
    """``a`` limited to [low, high] (either may be None), a new array."""
    if is_torch(a):
        return a.clamp(min=low, max=high)
    xp = namespace(a)
    if low is not None:
        a = xp.maximum(a, low)
    if high is not None:
        a = xp.minimum(a, high)
    return a


def cast_like(a, template):
    """``a`` (same kind and device as ``template``) in ``template``'s dtype."""
    return a.to(template.dtype) if is_torch(a) else a.astype(template.dtype)


def add_to_diagonal(a, value):
    """a[..., i, i] += value, in place."""
    if is_torch(a):
        a.diagonal(dim1=-2, dim2=-1).add_(value)
    elif is_cupy(a):
        idx = namespace(a).arange(a.shape[-1])
        a[..., idx, idx] += value
    else:
        np.einsum("...ii->...i", a)[...] += value
    return a


def log(a):
    """Natural log, -inf at zero without a warning."""
    if is_device_array(a):
        return namespace(a).log(a)
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


def as_float32(a):
    """``a`` (NumPy, torch or CuPy, any float dtype) as float32, on its own device."""
    return a.float() if is_torch(a) else a.astype(np.float32)


def off_device(value):
    """A parameter the user gave (``means_init``, a prior's mean, ...) for the
    checks on the host: a torch tensor or cupy array (any device) read back as a
    NumPy array, anything else as it is, so sklearn's checks see lists, sparse
    input and the rest as they would (K x D x D numbers at most; the fit makes
    its own copies where the data are)."""
    return to_numpy(value) if is_device_array(value) else value


def to_numpy(a):
    """A NumPy copy of a (small) array, torch tensor or CuPy array, for host-side work.

    Used for parameters (K x D x D numbers at most), never for data rows.
    """
    if is_torch(a):
        return a.detach().cpu().numpy()
    if is_cupy(a):
        return a.get()
    return np.asarray(a)


def to_numpy_together(values):
    """NumPy float64 copies of arrays of one kind and device (any shapes, 0-d
    included) and of Python numbers, the device arrays read back in one copy: one
    wait for the device where a copy each would wait once each.  Host arrays and
    numbers become float64 arrays of their own.

    Parameters
    ----------
    values : sequence of arrays of one kind (NumPy, torch, CuPy) on one device,
        and numbers

    Returns
    -------
    list of ndarray, float64, shaped as ``values``
    """
    on_device = [v for v in values if is_device_array(v)]
    if not on_device:
        return [np.asarray(v, dtype=np.float64) for v in values]
    xp = namespace(on_device[0])
    flat = to_numpy(xp.concatenate([as_f64(a).reshape(-1) for a in on_device]))
    return _unpacked(flat, values, is_device_array,
                     lambda v: np.asarray(v, dtype=np.float64))
