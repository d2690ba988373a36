"""``gaussian_log_prob``: log-densities of every row under every component."""

from fastlvm._arrays import to_numpy
from fastlvm._dispatch import is_device_backend, lazy, like, resolve, to_host_view

from .._checks import check_data, check_device_data, check_gaussian_params
from ._numba import gaussian_log_prob_numba
from ._reference import gaussian_log_prob_ref

IMPLEMENTATIONS = {
    "reference": lambda X, *a: gaussian_log_prob_ref(X, *a).astype(X.dtype, copy=False),
    "numba": gaussian_log_prob_numba,
    "triton": lazy("fastlvm.kernels.gaussian_log_prob._triton", "gaussian_log_prob_triton"),
    "cupy": lazy("fastlvm.kernels.gaussian_log_prob._cupy", "gaussian_log_prob_cupy"),
}


def gaussian_log_prob(X, means, precisions_cholesky, covariance_type, *, check_finite=True):
    """log N(x_n | mu_k, Sigma_k) for every row n and component k.

    Parameters
    ----------
    X : array of shape (n_samples, n_features), float32 or float64
        NumPy array or torch CPU tensor (Numba), torch CUDA tensor (Triton),
        cupy array (CuPy).
    means : array-like of shape (n_components, n_features)
    precisions_cholesky : array-like
        sklearn's parameterisation: upper-triangular U_k with precision
        U_k U_k^T, shape (K, D, D) for 'full' and (D, D) for 'tied'; square
        roots of the precisions, (K, D) for 'diag' and (K,) for 'spherical'.
    covariance_type : {'full', 'tied', 'diag', 'spherical'}
    check_finite : bool, default=True
        Check X for NaN/inf (one pass over X).

    Returns
    -------
    log_prob : array of shape (n_samples, n_components), X's dtype and type
    """
    backend, impl = resolve("gaussian_log_prob", IMPLEMENTATIONS, X)
    if is_device_backend(backend):
        check_device_data(X, check_finite=check_finite)
        means, pc = check_gaussian_params(X, to_numpy(means), to_numpy(precisions_cholesky),
                                          covariance_type)
        return impl(X, means, pc, covariance_type)
    Xh = check_data(to_host_view(X), check_finite=check_finite)
    means, pc = check_gaussian_params(Xh, means, precisions_cholesky, covariance_type)
    return like(X, impl(Xh, means, pc, covariance_type))


__all__ = ["gaussian_log_prob", "gaussian_log_prob_ref", "IMPLEMENTATIONS"]
