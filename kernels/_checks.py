"""Input checks for the public kernel functions: clear errors, never asserts.

Each check names the parameter and says how to fix it.  The estimators call
the kernels' backends directly after validating once, so these checks cost one
pass over the data per public call, not per EM iteration.
"""

import sys

import numpy as np

from fastlvm._arrays import cast_like, f64_like, is_torch, namespace, to_numpy_together, zeros_like

from ._covariance import COVARIANCE_TYPES, precision_cholesky_shape

FLOAT_DTYPES = (np.float32, np.float64)


def check_covariance_type(covariance_type):
    if covariance_type not in COVARIANCE_TYPES:
        raise ValueError(
            f"covariance_type must be one of {COVARIANCE_TYPES}; got {covariance_type!r}.")


def check_data(X, name="X", check_finite=True, ndim=2):
    """A float32/float64 host array of the given rank, finite unless told otherwise."""
    if X.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must have dtype float32 or float64; got {X.dtype}. "
            f"Convert it with {name}.astype(numpy.float64) (or float32; a torch tensor "
            f"with {name}.to(torch.float64)).")
    if X.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D; got an array of shape {X.shape}.")
    if check_finite and X.size and not np.isfinite(X).all():
        raise ValueError(
            f"{name} contains NaN or infinity; remove or impute those entries first.")
    return X


def check_param(value, name, shape, positive=False):
    """A finite float64 parameter array of exactly ``shape``."""
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a real-valued array; {exc}") from None
    if arr.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}; got {arr.shape}.")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinity.")
    if positive and (arr <= 0).any():
        raise ValueError(f"{name} must be strictly positive; got min {arr.min():g}.")
    return arr


def check_mixture_weights(weights, n_components):
    """Mixing weights (n_components,): finite, non-negative, with a positive sum."""
    weights = check_param(weights, "weights", (n_components,))
    if (weights < 0).any() or not weights.sum() > 0:
        raise ValueError("weights must be non-negative with a positive sum.")
    return weights


def check_gaussian_params(X, means, precisions_cholesky, covariance_type):
    """Validate means (K, D) and precisions_cholesky against X (n, D)."""
    check_covariance_type(covariance_type)
    means = np.asarray(means)
    if means.ndim != 2 or means.shape[1] != X.shape[1]:
        raise ValueError(
            f"means must have shape (n_components, {X.shape[1]}) to match X's "
            f"{X.shape[1]} features; got {means.shape}.")
    n_comp, d = means.shape
    if n_comp < 1:
        raise ValueError("means must have at least one component (row).")
    means = check_param(means, "means", (n_comp, d))
    shape = precision_cholesky_shape(covariance_type, n_comp, d)
    pc = check_param(precisions_cholesky, "precisions_cholesky", shape)
    if covariance_type in ("full", "tied"):
        diag = np.diagonal(pc, axis1=-2, axis2=-1)
        if (diag <= 0).any():
            raise ValueError(
                "precisions_cholesky must have a strictly positive diagonal (it is the "
                "Cholesky factor of a positive-definite precision matrix).")
        if np.any(np.tril(pc, -1) != 0):
            raise ValueError(
                "precisions_cholesky must be upper triangular (sklearn's "
                "parameterisation: precision = U @ U.T, as in GaussianMixture."
                "precisions_cholesky_); it has nonzero entries below the diagonal.")
    elif (pc <= 0).any():
        raise ValueError("precisions_cholesky must be strictly positive for "
                         f"covariance_type={covariance_type!r}.")
    return means, pc


def check_loadings(components, n_features):
    """Loadings W of shape (q, n_features) with 1 <= q < n_features, as float64."""
    d = n_features
    components = np.asarray(components)
    if components.ndim != 2 or components.shape[1] != d or not 1 <= components.shape[0] < d:
        raise ValueError(
            f"components must have shape (n_components, {d}) with 1 <= n_components < "
            f"{d} (X has {d} features); got {components.shape}.")
    return check_param(components, "components", components.shape)


def check_low_rank_params(X, means, components, noise_variance):
    """Validate a mixture of PPCA's means (K, D), components (K, q, D) and
    noise_variance (K,) against X (n, D); returns float64 copies."""
    d = X.shape[1]
    means = np.asarray(means)
    if means.ndim != 2 or means.shape[1] != d or means.shape[0] < 1:
        raise ValueError(
            f"means must have shape (n_components, {d}) to match X's {d} features; got "
            f"{means.shape}.")
    n_comp = means.shape[0]
    means = check_param(means, "means", (n_comp, d))
    components = np.asarray(components)
    if components.ndim != 3 or components.shape[0] != n_comp or components.shape[2] != d:
        raise ValueError(
            f"components must have shape ({n_comp}, q, {d}) (one (q, n_features) loading "
            f"matrix per component); got {components.shape}.")
    q = components.shape[1]
    if not 1 <= q < d:
        raise ValueError(
            f"components must have 1 <= q < n_features latent dimensions; got q={q} with "
            f"n_features={d}.")
    components = check_param(components, "components", (n_comp, q, d))
    noise_variance = check_param(noise_variance, "noise_variance", (n_comp,), positive=True)
    return means, components, noise_variance


def check_sample_weight(sample_weight, n_samples):
    """None, or a finite non-negative float64 (n_samples,) array."""
    if sample_weight is None:
        return None
    sw = check_param(sample_weight, "sample_weight", (n_samples,))
    if (sw < 0).any():
        raise ValueError("sample_weight must be non-negative.")
    return np.ascontiguousarray(sw)


class DeviceChecks:
    """Checks of device arrays queued, then read back together: one wait for the
    device where a read each waited once each.

    ``add(flag, error)`` queues a 0-d boolean device array (true: the check
    passed) and the exception to raise when it failed; :meth:`raise_failed`
    reads every flag in one copy and raises the first failed check's exception,
    in the order added.
    """

    def __init__(self):
        self._flags, self._errors = [], []

    def add(self, flag, error):
        self._flags.append(flag)
        self._errors.append(error)

    def raise_failed(self):
        if not self._flags:
            return
        passed = to_numpy_together([namespace(self._flags[0]).stack(self._flags)])[0]
        self._flags, errors = [], self._errors
        self._errors = []
        for ok, error in zip(passed, errors):
            if not ok:
                raise error


def _check_now_or_later(flag, error, checks):
    """Raise ``error`` unless the device flag holds (a read of the device), or
    queue it in ``checks`` (a :class:`DeviceChecks`)."""
    if checks is not None:
        checks.add(flag, error)
    elif not bool(flag):
        raise error


def check_device_data(X, name="X", check_finite=True, ndim=2, checks=None):
    """The device-array (torch tensor or cupy array) counterpart of
    :func:`check_data`; X stays where it is.  With ``checks`` (a
    :class:`DeviceChecks`) the finiteness check is queued there instead of read."""
    if is_torch(X):
        torch = sys.modules["torch"]
        if X.dtype not in (torch.float32, torch.float64):
            raise TypeError(
                f"{name} must have dtype float32 or float64; got {X.dtype}. "
                f"Convert it with {name}.to(torch.float32) (or torch.float64).")
    elif X.dtype not in (np.float32, np.float64):
        raise TypeError(
            f"{name} must have dtype float32 or float64; got {X.dtype}. "
            f"Convert it with {name}.astype(cupy.float32) (or cupy.float64).")
    if X.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D; got an array of shape {tuple(X.shape)}.")
    if check_finite:  # (all() of an empty array is true)
        _check_now_or_later(namespace(X).isfinite(X).all(), ValueError(
            f"{name} contains NaN or infinity; remove or impute those entries first."), checks)
    return X


def check_device_sample_weight(sample_weight, X, float64=False, checks=None):
    """None, or a finite non-negative (n_samples,) array on X's device in X's dtype
    (float64 with ``float64``; a torch tensor for a tensor X, a cupy array for a
    cupy X; host weights are copied there: n numbers).  A scalar weighs every
    row alike; complex weights are refused.  With ``checks`` (a
    :class:`DeviceChecks`) the check of the values is queued there instead of
    read."""
    if sample_weight is None:
        return None
    if (sample_weight.is_complex() if is_torch(sample_weight)
            else np.iscomplexobj(sample_weight)):
        raise ValueError("sample_weight must be real; got complex values.")
    sw = f64_like(X, sample_weight)
    if sw.ndim == 0:  # one weight for every row, as on the host
        sw = zeros_like(X, (X.shape[0],)) + sw
    if not float64:
        sw = cast_like(sw, X)
    if tuple(sw.shape) != (X.shape[0],):
        raise ValueError(f"sample_weight must have shape ({X.shape[0]},); got "
                         f"{tuple(sw.shape)}.")
    _check_now_or_later((namespace(sw).isfinite(sw) & (sw >= 0)).all(),
                        ValueError("sample_weight must be finite and non-negative."), checks)
    return sw.contiguous() if is_torch(sw) else namespace(sw).ascontiguousarray(sw)
