"""``mppca_stats``: the fused E-step pass of a mixture of PPCA, yielding
additive sufficient statistics."""

from typing import NamedTuple

import numpy as np

from fastlvm._arrays import to_numpy
from fastlvm._dispatch import is_device_backend, lazy, resolve, to_host_view

from .._checks import (check_data, check_device_data, check_device_sample_weight,
                       check_low_rank_params, check_mixture_weights, check_sample_weight)
from ._numba import mppca_stats_numba
from ._reference import mppca_stats_ref


class MPPCAStats(NamedTuple):
    """Additive statistics of one mixture-of-PPCA E-step pass (all float64).

    NumPy arrays for host inputs; float64 arrays on the input's device for
    device inputs: torch tensors (Triton), cupy arrays (CuPy).

    With responsibilities r_nk times the sample weight w_n, centred rows
    c = x_n - center_k and projections y_nk = W_k c (q-vectors):

    Attributes
    ----------
    log_likelihood : float
        sum_n w_n log p(x_n) under the current parameters.
    nk : ndarray (n_components,)
        sum_n w_n r_nk.
    sum_x : ndarray (n_components, n_features)
        sum_n w_n r_nk x_n.
    sum_sq : ndarray (n_components,)
        sum_n w_n r_nk ||c||^2.
    cross : ndarray (n_components, n_features, q)
        sum_n w_n r_nk c y^T.
    sum_proj : ndarray (n_components, q)
        sum_n w_n r_nk y.
    proj_second : ndarray (n_components, q, q)
        sum_n w_n r_nk y y^T.
    center : ndarray (n_components, n_features)
        The centres c_k: the means, rounded to the data's dtype by the
        compiled backends (the log-densities use the same rounded means).
    """

    log_likelihood: float
    nk: np.ndarray
    sum_x: np.ndarray
    sum_sq: np.ndarray
    cross: np.ndarray
    sum_proj: np.ndarray
    proj_second: np.ndarray
    center: np.ndarray


IMPLEMENTATIONS = {
    "reference": mppca_stats_ref,
    "numba": mppca_stats_numba,
    "triton": lazy("fastlvm.kernels.mppca_stats._triton", "mppca_stats_triton"),
    "cupy": lazy("fastlvm.kernels.mppca_stats._cupy", "mppca_stats_cupy"),
}


def mppca_stats(X, weights, means, components, noise_variance, sample_weight=None, *,
                check_finite=True):
    """One fused E-step pass of a mixture of PPCA: log-likelihood and statistics.

    Log-densities (Woodbury form, see :func:`mppca_log_prob`), log-sum-exp
    responsibilities and the responsibility-weighted moments are computed tile
    by tile; the (n, K) responsibilities and the (n, K, q) projections are
    never stored.  Statistics add across chunks of rows; sums are accumulated
    in float64 in a fixed order, so the result is deterministic.  They are
    what the mixture-of-PPCA M-step (Tipping & Bishop 1999) needs: with
    S_k W_k^T and W_k S_k W_k^T from ``cross`` and ``proj_second`` it costs
    O(D q^2) per component and never forms a D x D matrix.

    Parameters
    ----------
    X : array of shape (n_samples, n_features), float32 or float64
        NumPy array or torch CPU tensor (Numba), torch CUDA tensor (Triton),
        cupy array (CuPy).
    weights : array-like of shape (n_components,)
        Mixing weights (non-negative, positive sum).
    means : array-like of shape (n_components, n_features)
    components : array-like of shape (n_components, q, n_features)
    noise_variance : array-like of shape (n_components,)
    sample_weight : array-like of shape (n_samples,), optional
    check_finite : bool, default=True

    Returns
    -------
    MPPCAStats
    """
    backend, impl = resolve("mppca_stats", IMPLEMENTATIONS, X)
    if is_device_backend(backend):
        check_device_data(X, check_finite=check_finite)
        params = check_low_rank_params(X, *map(to_numpy, (means, components, noise_variance)))
        weights = check_mixture_weights(to_numpy(weights), params[0].shape[0])
        sw = check_device_sample_weight(sample_weight, X)
        return MPPCAStats(*impl(X, weights, *params, sw))
    Xh = check_data(to_host_view(X), check_finite=check_finite)
    params = check_low_rank_params(Xh, means, components, noise_variance)
    weights = check_mixture_weights(weights, params[0].shape[0])
    sw = check_sample_weight(to_host_view(sample_weight, "sample_weight"), Xh.shape[0])
    return MPPCAStats(*impl(Xh, weights, *params, sw))


__all__ = ["mppca_stats", "mppca_stats_ref", "MPPCAStats", "IMPLEMENTATIONS"]
