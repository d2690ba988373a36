"""``masked_latent_stats``: PPCA / factor-analysis E-step statistics on data
with missing entries, each row marginalised over its missing coordinates."""

from typing import NamedTuple

import numpy as np

from fastlvm._arrays import is_device_array, namespace, to_numpy
from fastlvm._dispatch import is_device_backend, lazy, resolve, to_host_view

from .._checks import (check_data, check_device_data, check_device_sample_weight,
                       check_loadings, check_param, check_sample_weight)
from ._numba import masked_latent_stats_numba, masked_posterior_numba
from ._reference import masked_latent_stats_ref, masked_posterior_ref, masked_row_posterior


class MaskedLatentStats(NamedTuple):
    """Additive statistics of one missing-data E-step pass (all float64).

    NumPy arrays for host inputs; float64 arrays on the input's device for
    device inputs (torch tensors, cupy arrays).

    For row n with observed set O_n: c = x - mean on O_n, z~ = (E[z|x_O], 1),
    E~ = E[z~ z~^T] (the posterior covariance included), w_n its weight.

    Attributes
    ----------
    log_likelihood : float
        sum_n w_n log p(x_{n,O_n}).
    total_second : ndarray (q + 1, q + 1)
        sum_n w_n E~_n.
    missing_second : ndarray (n_features, q + 1, q + 1)
        sum over rows missing feature i of w_n E~_n (the rows observing i
        contribute total_second - missing_second[i]).
    cross : ndarray (n_features, q + 1)
        sum over rows observing feature i of w_n c_ni z~_n.
    sq : ndarray (n_features,)
        sum over rows observing feature i of w_n c_ni^2.
    n_observed : ndarray (n_features,)
        sum over rows observing feature i of w_n.
    """

    log_likelihood: float
    total_second: np.ndarray
    missing_second: np.ndarray
    cross: np.ndarray
    sq: np.ndarray
    n_observed: np.ndarray


_DEVICE = "fastlvm.kernels.masked_latent_stats._device"
IMPLEMENTATIONS = {
    "reference": masked_latent_stats_ref,
    "numba": masked_latent_stats_numba,
    # torch's and CuPy's own operations (batched GEMMs and q x q factorisations)
    "triton": lazy(_DEVICE, "masked_latent_stats_device"),
    "cupy": lazy(_DEVICE, "masked_latent_stats_device"),
}
POSTERIOR_IMPLEMENTATIONS = {
    "reference": masked_posterior_ref,
    "numba": masked_posterior_numba,
    "triton": lazy(_DEVICE, "masked_posterior_device"),
    "cupy": lazy(_DEVICE, "masked_posterior_device"),
}


def check_masked_data(X, name="X"):
    """A float array (host, or a device array left where it is) whose missing
    entries are NaN (no inf) and in which every row has an observed entry.

    Returns
    -------
    X : the array
    observed : ndarray of shape (n_features,), int64
        Each feature's count of observed entries (on the host).
    """
    if is_device_array(X):
        X = check_device_data(X, name=name, check_finite=False)
    else:
        X = check_data(X, name=name, check_finite=False)
    xp = namespace(X)
    missing = xp.isnan(X)
    if bool(xp.isinf(X).any()):
        raise ValueError(f"{name} contains infinity; only NaN marks a missing entry.")
    empty = missing.all(1)
    if bool(empty.any()):
        empty_rows = np.flatnonzero(to_numpy(empty))  # n booleans, on this error's path only
        raise ValueError(
            f"{name} has {empty_rows.size} row(s) with every entry missing (first: row "
            f"{empty_rows[0]}); a row needs at least one observed value. Drop those rows.")
    return X, np.asarray(to_numpy((~missing).sum(0)), dtype=np.int64)


def check_latent_params(d, mean, components, noise):
    mean = check_param(mean, "mean", (d,))
    components = check_loadings(components, d)
    noise = check_param(noise, "noise_variance", (d,), positive=True)
    return mean, components, noise


def masked_latent_stats(X, mean, components, noise_variance, sample_weight=None):
    """One E-step pass of x = W^T z + mean + noise over rows with missing entries.

    Each row is marginalised over its missing coordinates: its posterior
    uses only the observed ones (per-row q x q solves, inside the kernel), and
    its log-density is that of the observed coordinates.  Statistics add over
    chunks of rows; the pass is deterministic.  Serves PPCA (all noise
    variances equal) and factor analysis (one per feature).

    Parameters
    ----------
    X : array of shape (n_samples, n_features), float32 or float64
        NaN marks a missing entry; every row needs one observed entry.  NumPy
        array or torch CPU tensor (Numba), torch CUDA tensor or cupy array (the
        device backend: torch's or CuPy's batched products).
    mean : array-like of shape (n_features,)
    components : array-like of shape (q, n_features)
        W, 1 <= q < n_features.
    noise_variance : array-like of shape (n_features,)
        Per-feature noise variances psi_i > 0.
    sample_weight : array-like of shape (n_samples,), optional

    Returns
    -------
    MaskedLatentStats
    """
    backend, impl = resolve("masked_latent_stats", IMPLEMENTATIONS, X)
    if is_device_backend(backend):
        X, _ = check_masked_data(X)
        params = check_latent_params(X.shape[1], *map(to_numpy, (mean, components,
                                                                   noise_variance)))
        sw = check_device_sample_weight(sample_weight, X, float64=True)
        return MaskedLatentStats(*impl(X, *params, sw))
    Xh, _ = check_masked_data(to_host_view(X))
    params = check_latent_params(Xh.shape[1], mean, components, noise_variance)
    sw = check_sample_weight(to_host_view(sample_weight, "sample_weight"), Xh.shape[0])
    return MaskedLatentStats(*impl(Xh, *params, sw))


def masked_posterior(X, mean, components, noise_variance):
    """Per-row log p(x_O) and E[z | x_O] for rows with missing entries (Numba, or
    the device backend for a torch CUDA tensor or a cupy array).

    Parameters
    ----------
    X, mean, components, noise_variance : as :func:`masked_latent_stats`

    Returns
    -------
    log_prob : ndarray (X's kind) of shape (n_samples,), float64
    z : ndarray (X's kind) of shape (n_samples, q), float64
    """
    backend, impl = resolve("masked_posterior", POSTERIOR_IMPLEMENTATIONS, X)
    if not is_device_backend(backend):
        X = to_host_view(X)
    X, _ = check_masked_data(X)
    params = check_latent_params(X.shape[1], *map(to_numpy, (mean, components,
                                                             noise_variance)))
    return impl(X, *params)


__all__ = ["masked_latent_stats", "masked_latent_stats_ref", "masked_posterior",
           "masked_posterior_ref", "masked_row_posterior", "MaskedLatentStats",
           "IMPLEMENTATIONS", "POSTERIOR_IMPLEMENTATIONS"]
