"""``ppca_stats``: one pass of probabilistic-PCA E-step statistics over rows."""

from typing import NamedTuple

import numpy as np

from fastlvm._arrays import to_numpy
from fastlvm._dispatch import is_device_backend, lazy, resolve, to_host_view

from .._checks import (check_data, check_device_data, check_device_sample_weight,
                       check_loadings, check_param, check_sample_weight)
from ._numba import ppca_stats_numba
from ._reference import ppca_posterior, ppca_stats_ref


class PPCAStats(NamedTuple):
    """Additive statistics of one PPCA E-step pass (all float64).

    NumPy arrays for host inputs; float64 arrays on the input's device for
    device inputs: torch tensors (Triton), cupy arrays (CuPy).

    Attributes
    ----------
    log_likelihood : float
        sum_n w_n log N(x_n | mean, W W^T + sigma^2 I).
    sq_norm : float
        sum_n w_n ||x_n - mean||^2.
    cross : ndarray (n_features, n_components)
        sum_n w_n (x_n - mean) E[z_n]^T.
    z_second : ndarray (n_components, n_components)
        sum_n w_n E[z_n] E[z_n]^T (add sigma^2 M^{-1} sum_n w_n for E[z z^T]).
    """

    log_likelihood: float
    sq_norm: float
    cross: np.ndarray
    z_second: np.ndarray


IMPLEMENTATIONS = {
    "reference": ppca_stats_ref,
    "numba": ppca_stats_numba,
    "triton": lazy("fastlvm.kernels.ppca_stats._triton", "ppca_stats_triton"),
    "cupy": lazy("fastlvm.kernels.ppca_stats._cupy", "ppca_stats_cupy"),
}


def ppca_stats(X, mean, components, noise_variance, sample_weight=None, *,
               check_finite=True):
    """Posterior means and their moments for x = W z + mean + noise, in one pass.

    Never forms an (n, D, q) array, nor (with the compiled backends) the (n, q)
    posterior means: each tile's statistics are summed as it is processed.
    Statistics add across chunks of rows.  On a device the pass is the
    one-component case of :func:`mppca_stats`' fused kernels.

    Parameters
    ----------
    X : array of shape (n_samples, n_features), float32 or float64
        NumPy array or torch CPU tensor (Numba), torch CUDA tensor (Triton),
        cupy array (CuPy).
    mean : array-like of shape (n_features,)
    components : array-like of shape (n_components, n_features)
        W^T, as in sklearn's ``components_``; n_components < n_features.
    noise_variance : float
        sigma^2 > 0.
    sample_weight : array-like of shape (n_samples,), optional
    check_finite : bool, default=True

    Returns
    -------
    PPCAStats
    """
    backend, impl = resolve("ppca_stats", IMPLEMENTATIONS, X)
    if is_device_backend(backend):
        X = check_device_data(X, check_finite=check_finite)
        params = _checked_params(X.shape[1], *map(to_numpy, (mean, components, noise_variance)))
        return PPCAStats(*impl(X, *params, check_device_sample_weight(sample_weight, X)))
    Xh = check_data(to_host_view(X), check_finite=check_finite)
    params = _checked_params(Xh.shape[1], mean, components, noise_variance)
    sw = check_sample_weight(to_host_view(sample_weight, "sample_weight"), Xh.shape[0])
    return PPCAStats(*impl(Xh, *params, sw))


def _checked_params(d, mean, components, noise_variance):
    """(mean (d,), components (q, d), noise_variance float), float64, checked."""
    return (check_param(mean, "mean", (d,)), check_loadings(components, d),
            float(check_param(noise_variance, "noise_variance", (), positive=True)))


__all__ = ["ppca_stats", "ppca_stats_ref", "ppca_posterior", "PPCAStats", "IMPLEMENTATIONS"]
