"""``estep_stats``: the fused E-step pass yielding additive sufficient statistics."""

from typing import NamedTuple

import numpy as np

from fastlvm._arrays import to_numpy
from fastlvm._dispatch import is_device_backend, lazy, resolve, to_host_view

from .._checks import (check_data, check_device_data, check_device_sample_weight,
                       check_gaussian_params, check_mixture_weights, check_sample_weight)
from .._covariance import shift_second_moment
from ._numba import estep_stats_numba
from ._reference import estep_stats_ref


class EStepStats(NamedTuple):
    """Additive sufficient statistics of one E-step pass (all float64).

    NumPy arrays for host inputs; float64 arrays on the input's device for
    device inputs: torch tensors (Triton), cupy arrays (CuPy).

    Attributes
    ----------
    log_likelihood : float
        sum_n w_n log p(x_n) under the current parameters.
    nk : ndarray (n_components,)
        sum_n w_n r_nk.
    sum_x : ndarray (n_components, n_features)
        sum_n w_n r_nk x_n.
    second_moment : ndarray
        Shifted second moments around ``center``: (K, D, D) 'full',
        (D, D) 'tied' (summed over components), (K, D) 'diag', (K,) 'spherical'.
    center : ndarray (n_components, n_features)
        The shift c_k each backend chose: the means (rounded to the data's
        dtype) on the host backends and for the GPU backends' 'full'; one
        common centre, the weighted mean of the means, for the GPU backends'
        'tied', 'diag' and 'spherical'.  :func:`recenter` moves statistics to any other shift.
    """

    log_likelihood: float
    nk: np.ndarray
    sum_x: np.ndarray
    second_moment: np.ndarray
    center: np.ndarray


IMPLEMENTATIONS = {
    "reference": estep_stats_ref,
    "numba": estep_stats_numba,
    "triton": lazy("fastlvm.kernels.estep_stats._triton", "estep_stats_triton"),
    "cupy": lazy("fastlvm.kernels.estep_stats._cupy", "estep_stats_cupy"),
}


def recenter(stats, center, covariance_type):
    """The same statistics with second moments around another shift.

    sum r (x - c')(x - c')^T = S - a e^T - e a^T + N e e^T with
    a = sum r (x - c), e = c' - c: exact algebra in float64, for comparing
    backends that chose different shifts or merging their statistics.

    Parameters
    ----------
    stats : EStepStats
    center : array (n_components, n_features), same array type as ``stats``
    covariance_type : {'full', 'tied', 'diag', 'spherical'}

    Returns
    -------
    EStepStats with ``center`` as its shift ('tied': summed over components)
    """
    second = shift_second_moment(stats.nk, stats.sum_x, stats.second_moment, stats.center,
                                 center, covariance_type)
    return EStepStats(stats.log_likelihood, stats.nk, stats.sum_x, second, center)


def estep_stats(X, weights, means, precisions_cholesky, covariance_type, sample_weight=None,
                *, check_finite=True):
    """One fused E-step pass: log-likelihood and sufficient statistics.

    Log-densities, log-sum-exp responsibilities and the responsibility-weighted
    moments are computed tile by tile; the (n, K) responsibility matrix is never
    stored.  Statistics add across chunks of rows, so summing the results of
    calls on the chunks of X equals one call on X (up to rounding).  Sums are
    accumulated in float64 in a fixed order: the result is deterministic.

    Parameters
    ----------
    X : array of shape (n_samples, n_features), float32 or float64
        NumPy array or torch CPU tensor (Numba), torch CUDA tensor (Triton),
        cupy array (CuPy).
    weights : array-like of shape (n_components,)
        Mixture weights (non-negative; zero weights are allowed).
    means : array-like of shape (n_components, n_features)
    precisions_cholesky : array-like
        sklearn's parameterisation (see :func:`gaussian_log_prob`).
    covariance_type : {'full', 'tied', 'diag', 'spherical'}
    sample_weight : array-like of shape (n_samples,), optional
    check_finite : bool, default=True

    Returns
    -------
    EStepStats
    """
    backend, impl = resolve("estep_stats", IMPLEMENTATIONS, X)
    if is_device_backend(backend):
        check_device_data(X, check_finite=check_finite)
        means, pc = check_gaussian_params(X, to_numpy(means), to_numpy(precisions_cholesky),
                                          covariance_type)
        weights = check_mixture_weights(to_numpy(weights), means.shape[0])
        sw = check_device_sample_weight(sample_weight, X)
        return EStepStats(*impl(X, weights, means, pc, covariance_type, sw))
    Xh = check_data(to_host_view(X), check_finite=check_finite)
    means, pc = check_gaussian_params(Xh, means, precisions_cholesky, covariance_type)
    weights = check_mixture_weights(weights, means.shape[0])
    sw = check_sample_weight(to_host_view(sample_weight, "sample_weight"), Xh.shape[0])
    return EStepStats(*impl(Xh, weights, means, pc, covariance_type, sw))


__all__ = ["estep_stats", "estep_stats_ref", "EStepStats", "IMPLEMENTATIONS", "recenter"]
