"""Rows and parameters of PPCA and FactorAnalysis on the host or on a device.

Host arrays go through sklearn's ``validate_data``.  Device arrays (torch CUDA
tensors, cupy arrays; CPU tensors with ``FASTLVM_BACKEND=triton``) are checked
where they are, and a fit on them leaves its parameters there: the passes over
the rows (the mean and scatter matrix, PPCA's E-step, the predictions) run on
the device, while the algebra on D x D or q x q statistics runs on the host in
float64 and its results (D x D numbers at most) go back to the device.  A model
takes rows of the kind and device it was fitted on, as the mixtures do.
Missing entries (NaN) are allowed where sklearn's ``allow-nan`` allows them, on
either kind of array.
"""

import numpy as np
from sklearn.utils.validation import _check_sample_weight, validate_data

from fastlvm._arrays import f64_like, is_device_array, is_torch, numpy_readable
from fastlvm._dispatch import on_device
from fastlvm.kernels._checks import check_device_data, check_device_sample_weight


def validate_rows(estimator, X, sample_weight=None, *, reset, min_samples, allow_nan,
                  name="X"):
    """(X, float64 sample weights or None), checked for ``estimator``.

    Parameters
    ----------
    estimator : PPCA or FactorAnalysis
    X : array-like of shape (n_samples, n_features)
    sample_weight : array-like of shape (n_samples,) or None
    reset : bool
        True to set ``n_features_in_`` from X (a fit's first rows); False to check
        X against the fitted model: its feature count and where its parameters are.
    min_samples : int
    allow_nan : bool
        The rows may hold missing entries (NaN).  Host rows with an infinite
        entry are refused here; device rows by ``_masked_em.has_missing``, which
        the caller must run next (it reads the rows' sum once for both checks).
    name : str
        The rows' parameter name, for the messages.

    Returns
    -------
    X : ndarray, or the device array as it came (float32 or float64)
    sample_weight : float64 array of X's kind, or None
    """
    if not reset:
        check_same_place(estimator, X, name)
    if not on_device(X):
        X = validate_data(estimator, numpy_readable(X), dtype=[np.float64, np.float32],
                          ensure_min_samples=min_samples, reset=reset,
                          ensure_all_finite="allow-nan" if allow_nan else True)
        if sample_weight is not None:
            sample_weight = _check_sample_weight(sample_weight, X, dtype=np.float64,
                                                 ensure_non_negative=True)
        return X, sample_weight
    # with allow_nan, an infinite entry is refused by _masked_em.has_missing, which
    # every such caller runs next: one read of X's sum answers both for finite rows
    X = check_device_data(X, name=name, check_finite=not allow_nan)
    if X.shape[0] < min_samples:
        raise ValueError(f"Found array with {X.shape[0]} sample(s) (shape={tuple(X.shape)}) "
                         f"while a minimum of {min_samples} is required.")
    if reset:
        if X.shape[1] < 1:
            raise ValueError(f"Found array with 0 feature(s) (shape={tuple(X.shape)}) while "
                             "a minimum of 1 is required.")
        estimator.n_features_in_ = X.shape[1]
        estimator.__dict__.pop("feature_names_in_", None)
    elif X.shape[1] != estimator.n_features_in_:
        raise ValueError(f"X has {X.shape[1]} features, but {type(estimator).__name__} is "
                         f"expecting {estimator.n_features_in_} features as input.")
    return X, check_device_sample_weight(sample_weight, X, float64=True)


def check_same_place(estimator, X, name="X"):
    """Refuse rows of another kind or device than the fitted parameters
    (``estimator.mean_``), naming where they must be."""
    mean = estimator.mean_
    if on_device(X) == is_device_array(mean) and (
            not is_device_array(mean) or (is_torch(X) == is_torch(mean)
                                          and X.device == mean.device)):
        return
    where = (f"a torch tensor on {mean.device}" if is_torch(mean) else
             f"a cupy array on GPU {mean.device.id}" if is_device_array(mean) else
             "a host array (NumPy)")
    raise ValueError(f"This {type(estimator).__name__} was fitted on {where}; pass {name} "
                     "as one (fit again to move the model).")


def place_parameters(estimator, X, names):
    """Leave the fitted arrays ``names`` (host, float64) where X is: float64 arrays
    of X's kind on its device for device rows, as they are for host rows."""
    if on_device(X):
        for name in names:
            setattr(estimator, name, f64_like(X, getattr(estimator, name)))


def like_parameters(estimator, value):
    """A host result (float64) as an array of the fitted parameters' kind and device."""
    return f64_like(estimator.mean_, value) if is_device_array(estimator.mean_) else value
