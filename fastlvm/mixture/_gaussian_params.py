"""Gaussian mixture parameters from sufficient statistics (the M-step), in float64.

The statistics are those of :func:`fastlvm.kernels.estep_stats`: N_k, sum r x
and second moments around a shift c_k.  The covariance around the new mean
m_k = sum r x / N_k follows exactly from

    sum r (x - m)(x - m)^T = S - a d^T - d a^T + N d d^T,
    a = sum r (x - c) = sum_x - N c,   d = m - c,

which never subtracts two large second moments (the float32 failure mode of
E[xx^T] - m m^T).  Formulas, the 10 * eps added to N_k, the normalisation of
the weights and the error messages follow sklearn's GaussianMixture.
"""

import sys

import numpy as np
from scipy import linalg

from fastlvm._arrays import (add_to_diagonal, as_f64, is_cupy, is_torch, namespace, off_device,
                             to_numpy)
from fastlvm._moments import overflow_error, refuse_underflow, smallest_normal, underflow_error
from fastlvm.kernels._covariance import precision_factors_torch, shift_second_moment

ILL_DEFINED_COVARIANCE = (
    "Fitting the mixture model failed because some components have ill-defined "
    "empirical covariance (for instance caused by singleton or collapsed samples). "
    "Try to decrease the number of components, increase reg_covar, or scale the "
    "input data.")
FLOAT32_HINT = (" The numerical accuracy can also be improved by passing float64 data "
                "instead of float32.")


def parameters_from_stats(nk, sum_x, second_moment, center, covariance_type, reg_covar, eps):
    """M-step: weights, means and covariances from summed statistics.

    Parameters
    ----------
    nk : ndarray (K,)
        (All inputs NumPy, or all float64 torch tensors or cupy arrays on one
        device: the M-step then runs on that device.)
    sum_x : ndarray (K, D)
    second_moment : ndarray
        Around ``center``; (K, D, D) full, (D, D) tied, (K, D) diag, (K,) spherical.
    center : ndarray (K, D)
    covariance_type : str
    reg_covar : float
    eps : float
        Machine epsilon of the data's dtype (sklearn adds 10 * eps to N_k).

    Returns
    -------
    weights : ndarray (K,), summing to one
    nk_eps : ndarray (K,), N_k + 10 eps
    means : ndarray (K, D)
    covariances : ndarray, sklearn's shape for ``covariance_type``
    """
    nk = as_f64(nk)
    nk_eps = nk + 10 * eps
    means = sum_x / nk_eps[:, None]
    scatter = shift_second_moment(nk, sum_x, second_moment, center, means, covariance_type)
    if covariance_type == "full":
        cov = add_to_diagonal(scatter / nk_eps[:, None, None], reg_covar)
    elif covariance_type == "tied":
        cov = add_to_diagonal(scatter / nk_eps.sum(), reg_covar)
    elif covariance_type == "diag":
        cov = scatter / nk_eps[:, None] + reg_covar
    else:
        cov = scatter / (nk_eps * means.shape[1]) + reg_covar
    if covariance_type in ("full", "tied"):
        cov = 0.5 * (cov + cov.swapaxes(-1, -2))  # exact symmetry
    return nk_eps / nk_eps.sum(), nk_eps, means, cov


def precision_cholesky(covariances, covariance_type, float32_data=False, deferred=False):
    """Upper-triangular Cholesky factors of the precisions (sklearn's layout).

    Parameters
    ----------
    covariances : sklearn's shape for ``covariance_type``
        NumPy, or a float64 torch tensor or cupy array (factored there).
    covariance_type : str
    float32_data : bool, default=False
        The data are float32 (the messages' hint and the kernels' dtype).
    deferred : bool, default=False
        Return ``(factors, flags)``: on a device without waiting for it, the
        checks left in ``flags``, a (3,) array there for
        :func:`refuse_flagged_covariances` once the caller has read it back
        with whatever else it reads; host covariances are checked at once
        (their ``flags`` all true).

    Raises
    ------
    ValueError
        sklearn's ill-defined-covariance message when a covariance is not
        positive definite: raise ``reg_covar``.  When one is not finite (X is,
        so its statistics overflowed), :func:`fastlvm._moments.overflow_error`;
        when even the largest variance is below the smallest normal number of
        the kernels' dtype (X's values are that small; with ``reg_covar`` near
        0), :func:`fastlvm._moments.underflow_error`: scale the data.
    """
    if is_torch(covariances) or is_cupy(covariances):
        factor = _precision_cholesky_torch if is_torch(covariances) else _precision_cholesky_cupy
        out, flags = factor(covariances, covariance_type)
        flags = namespace(out).stack(
            [flags[0], _normal_flag(covariances, covariance_type, float32_data), flags[1]])
        if deferred:
            return out, flags
        refuse_flagged_covariances(to_numpy(flags), float32_data)  # the one wait
        return out
    out = _precision_cholesky_host(covariances, covariance_type, float32_data)
    return (out, np.ones(3, dtype=bool)) if deferred else out


def refuse_flagged_covariances(flags, float32_data):
    """Raise for a device M-step's flags, read back: (finite, largest variance
    normal in the kernels' dtype, factorised), as :func:`precision_cholesky`
    raises."""
    finite, normal, ok = (bool(f) for f in flags)
    _refuse(finite, ok, _ill_defined(float32_data), float32_data, normal)


def _ill_defined(float32_data):
    return ILL_DEFINED_COVARIANCE + (FLOAT32_HINT if float32_data else "")


def _precision_cholesky_host(covariances, covariance_type, float32_data):
    message = _ill_defined(float32_data)
    if not np.all(np.isfinite(covariances)):
        raise _covariance_overflow(float32_data)
    refuse_underflow(float(_largest_variance(covariances, covariance_type)),
                     _kernel_dtype(float32_data), "The empirical covariances")
    if covariance_type in ("full", "tied"):
        stack = covariances if covariance_type == "full" else covariances[None]
        d = stack.shape[-1]
        out = np.empty_like(stack)
        eye = np.eye(d)
        for k in range(stack.shape[0]):
            try:
                lower = linalg.cholesky(stack[k], lower=True, check_finite=False)
            except linalg.LinAlgError:
                raise ValueError(message) from None
            out[k] = linalg.solve_triangular(lower, eye, lower=True, check_finite=False).T
        return out if covariance_type == "full" else out[0]
    if np.any(covariances <= 0.0):
        raise ValueError(message)
    return 1.0 / np.sqrt(covariances)


def _kernel_dtype(float32_data):
    return "float32" if float32_data else "float64"


def _covariance_overflow(float32_data):
    return overflow_error("The empirical covariances", _kernel_dtype(float32_data))


def _largest_variance(covariances, covariance_type):
    """The largest variance of any component along any feature (0-d, any array kind)."""
    if covariance_type in ("full", "tied"):
        covariances = covariances.diagonal(0, -2, -1)
    return covariances.max()


def _normal_flag(covariances, covariance_type, float32_data):
    """0-d device flag: the largest variance is normal in the kernels' dtype, or 0."""
    largest = _largest_variance(covariances, covariance_type)
    return (largest >= smallest_normal(_kernel_dtype(float32_data))) | (largest <= 0.0)


def _refuse(finite, ok, message, float32_data, normal=True):
    """Raise for a device M-step's flags, read in one transfer: the covariances
    are finite, factorised, and (``normal``) their largest variance is a normal
    number of the kernels' dtype."""
    if not finite:
        raise _covariance_overflow(float32_data)
    if not normal:
        raise underflow_error("The empirical covariances", _kernel_dtype(float32_data))
    if not ok:
        raise ValueError(message)


def _precision_cholesky_torch(covariances, covariance_type):
    """The factors on the tensor's device (batched Cholesky) and the 0-d flags
    (finite, factorised), unread: a factor of a bad covariance is computed (NaN
    or inf, never an exception) and then refused from the flags."""
    torch = sys.modules["torch"]
    if covariance_type in ("full", "tied"):
        out, info = precision_factors_torch(covariances, covariance_type)
        finite = torch.isfinite(covariances).all()
        ok = (info == 0).all()
    else:
        finite = torch.isfinite(covariances).all()
        ok = (covariances > 0.0).all()
        out = 1.0 / torch.sqrt(covariances)
    return out, (finite, ok)


def _precision_cholesky_cupy(covariances, covariance_type):
    """The factors on the cupy array's device (batched Cholesky) and the 0-d flags
    (finite, factorised), unread.

    CuPy's factorisation does not raise on a matrix that is not positive
    definite (unless asked to, which synchronises); its factor then holds NaN
    or a non-positive diagonal, which is checked instead.
    """
    cupy = sys.modules["cupy"]
    if covariance_type in ("full", "tied"):
        stack = covariances if covariance_type == "full" else covariances[None]
        lower = cupy.linalg.cholesky(stack)
        diag = cupy.diagonal(lower, axis1=-2, axis2=-1)
        finite = cupy.isfinite(stack).all()
        ok = cupy.isfinite(lower).all() & (diag > 0).all()
        # inv(L)^T is upper triangular; triu clears the rounding below the diagonal
        out = cupy.triu(cupy.linalg.inv(lower).swapaxes(-1, -2))
        out = cupy.ascontiguousarray(out if covariance_type == "full" else out[0])
    else:
        finite = cupy.isfinite(covariances).all()
        ok = (covariances > 0.0).all()
        out = 1.0 / cupy.sqrt(covariances)
    return out, (finite, ok)


def precision_cholesky_from_precisions(precisions, covariance_type):
    """Upper-triangular U with U U^T = precision, as sklearn computes it."""
    if covariance_type in ("full", "tied"):
        stack = precisions if covariance_type == "full" else precisions[None]
        out = np.stack([np.flipud(np.fliplr(linalg.cholesky(np.flipud(np.fliplr(p)),
                                                            lower=True))) for p in stack])
        return out if covariance_type == "full" else out[0]
    return np.sqrt(precisions)


def precisions_from_cholesky(precisions_cholesky, covariance_type):
    """Precision matrices (or vectors) from their Cholesky factors."""
    if covariance_type == "full":
        return precisions_cholesky @ precisions_cholesky.swapaxes(1, 2)
    if covariance_type == "tied":
        return precisions_cholesky @ precisions_cholesky.T
    return precisions_cholesky**2


def covariances_from_cholesky(precisions_cholesky, covariance_type):
    """Covariances from precision Cholesky factors (used after precisions_init)."""
    if covariance_type in ("full", "tied"):
        stack = precisions_cholesky if covariance_type == "full" else precisions_cholesky[None]
        out = np.empty_like(stack)
        for k, u in enumerate(stack):
            u_inv = linalg.solve_triangular(u, np.eye(u.shape[0]), lower=False)
            out[k] = u_inv.T @ u_inv
        return out if covariance_type == "full" else out[0]
    return 1.0 / precisions_cholesky**2


def covariance_of_type(covariance, covariance_type):
    """One (D, D) covariance as ``covariance_type`` holds it for a single
    component: itself ('full', 'tied'), its diagonal (D,) ('diag'), the mean
    variance, a float ('spherical')."""
    if covariance_type in ("full", "tied"):
        return covariance
    if covariance_type == "diag":
        return np.diag(covariance).copy()
    return float(np.diag(covariance).mean())


def n_parameters(covariance_type, n_components, n_features):
    """Number of free parameters, as sklearn counts them for BIC/AIC."""
    cov_params = {
        "full": n_components * n_features * (n_features + 1) / 2.0,
        "diag": n_components * n_features,
        "tied": n_features * (n_features + 1) / 2.0,
        "spherical": n_components,
    }[covariance_type]
    return int(cov_params + n_features * n_components + n_components - 1)


def check_weights_init(weights, n_components):
    """sklearn's checks on ``weights_init``."""
    weights = _as_float_array(weights, "weights_init", 1)
    check_shape(weights, (n_components,), "weights")
    if np.any(weights < 0.0) or np.any(weights > 1.0):
        raise ValueError(
            "The parameter 'weights' should be in the range [0, 1], but got max value "
            "%.5f, min value %.5f" % (np.min(weights), np.max(weights)))
    atol = 1e-6 if weights.dtype == np.float32 else 1e-8
    if not np.allclose(np.abs(1.0 - np.sum(weights)), 0.0, atol=atol):
        raise ValueError(
            "The parameter 'weights' should be normalized, but got sum(weights) = %.5f"
            % np.sum(weights))
    return weights.astype(np.float64)


def check_means_init(means, n_components, n_features):
    """sklearn's checks on ``means_init``."""
    means = _as_float_array(means, "means_init", None)
    check_shape(means, (n_components, n_features), "means")
    return means.astype(np.float64)


def check_precisions_init(precisions, covariance_type, n_components, n_features):
    """sklearn's checks on ``precisions_init`` (shape, symmetry, definiteness)."""
    precisions = _as_float_array(precisions, "precisions_init", None).astype(np.float64)
    shape = {"full": (n_components, n_features, n_features),
             "tied": (n_features, n_features), "diag": (n_components, n_features),
             "spherical": (n_components,)}[covariance_type]
    check_shape(precisions, shape, "%s precision" % covariance_type)
    check_positive_definite(precisions, covariance_type)
    return precisions


def check_positive_definite(matrices, covariance_type):
    """sklearn's definiteness checks: every matrix of a (..., D, D) stack symmetric
    positive definite ('full', 'tied'), or every entry positive ('diag', 'spherical').

    Raises
    ------
    ValueError
        sklearn's "'<type> precision' should be ..." message.
    """
    if covariance_type in ("full", "tied"):
        for p in np.reshape(matrices, (-1,) + np.shape(matrices)[-2:]):
            if not (np.allclose(p, p.T) and np.all(np.linalg.eigvalsh(p) > 0.0)):
                raise ValueError("'%s precision' should be symmetric, positive-definite"
                                 % covariance_type)
    elif np.any(np.asarray(matrices) <= 0.0):
        raise ValueError("'%s precision' should be positive" % covariance_type)


def _as_float_array(value, name, ndim):
    from sklearn.utils import check_array

    return check_array(off_device(value), dtype=[np.float64, np.float32], ensure_2d=False,
                       allow_nd=True, input_name=name)


def check_shape(param, param_shape, name):
    """sklearn's shape error for a parameter array."""
    if param.shape != param_shape:
        raise ValueError("The parameter '%s' should have the shape of %s, but got %s"
                         % (name, param_shape, param.shape))
