"""NumPy float64 reference for ``estep_stats``: the specification.

Stores the full (n, K) responsibilities and (n, K, D) differences, which is
exactly what the compiled kernels avoid; use it on small inputs only.
"""

import numpy as np

from ..gaussian_log_prob._reference import gaussian_log_prob_ref
from ..log_responsibilities._reference import log_responsibilities_ref


def estep_stats_ref(X, weights, means, precisions_cholesky, covariance_type,
                    sample_weight=None, *, keep_on_device=False):
    """Sufficient statistics of one E-step, in float64.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features)
    weights : ndarray of shape (n_components,)
    means : ndarray of shape (n_components, n_features)
    precisions_cholesky : ndarray (sklearn's shape for ``covariance_type``)
    covariance_type : {'full', 'tied', 'diag', 'spherical'}
    sample_weight : ndarray of shape (n_samples,) or None
    keep_on_device : bool
        Accepted as the device backends' is; the results here are host values.

    Returns
    -------
    log_likelihood : float
        sum_n w_n log p(x_n).
    nk : ndarray (n_components,)
        sum_n w_n r_nk.
    sum_x : ndarray (n_components, n_features)
        sum_n w_n r_nk x_n.
    second_moment : ndarray
        Around ``center``: sum_n w_n r_nk (x_n - mu_k)(x_n - mu_k)^T, shape
        (K, D, D) 'full'; its sum over k, (D, D) 'tied'; the diagonal, (K, D)
        'diag'; the trace, (K,) 'spherical'.
    center : ndarray (n_components, n_features)
        The shift mu_k used (``means`` as float64).
    """
    X = np.asarray(X, dtype=np.float64)
    means = np.asarray(means, dtype=np.float64)
    w = np.ones(X.shape[0]) if sample_weight is None else np.asarray(sample_weight, float)
    with np.errstate(divide="ignore"):
        wlp = gaussian_log_prob_ref(X, means, precisions_cholesky, covariance_type) + np.log(
            np.asarray(weights, dtype=np.float64))
    log_resp, log_norm = log_responsibilities_ref(wlp)
    r = np.exp(log_resp) * w[:, None]
    diff = X[:, None, :] - means[None, :, :]
    if covariance_type == "full":
        second = np.einsum("nk,nki,nkj->kij", r, diff, diff)
    elif covariance_type == "tied":
        second = np.einsum("nk,nki,nkj->ij", r, diff, diff)
    elif covariance_type == "diag":
        second = np.einsum("nk,nki->ki", r, diff**2)
    else:
        second = np.einsum("nk,nki->k", r, diff**2)
    return float(w @ log_norm), r.sum(axis=0), r.T @ X, second, means
