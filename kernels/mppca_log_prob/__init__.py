"""``mppca_log_prob``: log-densities of every row under every component of a
mixture of probabilistic PCA analysers."""

from fastlvm._arrays import to_numpy
from fastlvm._dispatch import is_device_backend, lazy, like, resolve, to_host_view

from .._checks import check_data, check_device_data, check_low_rank_params
from ._numba import mppca_log_prob_numba
from ._reference import mppca_log_prob_ref

IMPLEMENTATIONS = {
    "reference": lambda X, *a: mppca_log_prob_ref(X, *a).astype(X.dtype, copy=False),
    "numba": mppca_log_prob_numba,
    "triton": lazy("fastlvm.kernels.mppca_log_prob._triton", "mppca_log_prob_triton"),
    "cupy": lazy("fastlvm.kernels.mppca_log_prob._cupy", "mppca_log_prob_cupy"),
}


def mppca_log_prob(X, means, components, noise_variance, *, check_finite=True):
    """log N(x_n | mu_k, W_k^T W_k + sigma_k^2 I) for every row n and component k.

    By the Woodbury identity and the matrix determinant lemma: q x q algebra
    per component, never a D x D inverse.

    Parameters
    ----------
    X : array of shape (n_samples, n_features), float32 or float64
        NumPy array or torch CPU tensor (Numba), torch CUDA tensor (Triton),
        cupy array (CuPy).
    means : array-like of shape (n_components, n_features)
    components : array-like of shape (n_components, q, n_features)
        Each component's loadings W_k (sklearn's ``components_`` layout), 1 <= q
        < n_features.
    noise_variance : array-like of shape (n_components,)
        sigma_k^2 > 0.
    check_finite : bool, default=True
        Check X for NaN/inf (one pass over X).

    Returns
    -------
    log_prob : array of shape (n_samples, n_components), X's dtype and type
    """
    backend, impl = resolve("mppca_log_prob", IMPLEMENTATIONS, X)
    if is_device_backend(backend):
        check_device_data(X, check_finite=check_finite)
        params = check_low_rank_params(X, *map(to_numpy, (means, components, noise_variance)))
        return impl(X, *params)
    Xh = check_data(to_host_view(X), check_finite=check_finite)
    params = check_low_rank_params(Xh, means, components, noise_variance)
    return like(X, impl(Xh, *params))


__all__ = ["mppca_log_prob", "mppca_log_prob_ref", "IMPLEMENTATIONS"]
