"""NumPy float64 reference for ``gaussian_log_prob``: the specification.

Every difference is taken as ``x - mu`` directly (never ``x.x - 2 x.mu +
mu.mu``), in float64, whatever the input dtype.
"""

import numpy as np

from .._covariance import log_normaliser


def gaussian_log_prob_ref(X, means, precisions_cholesky, covariance_type):
    """log N(x_n | mu_k, Sigma_k) for every row and component, float64.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features)
    means : ndarray of shape (n_components, n_features)
    precisions_cholesky : ndarray
        (K, D, D) 'full', (D, D) 'tied', (K, D) 'diag', (K,) 'spherical'.
    covariance_type : {'full', 'tied', 'diag', 'spherical'}

    Returns
    -------
    ndarray of shape (n_samples, n_components), float64
    """
    X = np.asarray(X, dtype=np.float64)
    means = np.asarray(means, dtype=np.float64)
    pc = np.asarray(precisions_cholesky, dtype=np.float64)
    n, d = X.shape
    k = means.shape[0]
    diff = X[:, None, :] - means[None, :, :]  # (n, K, D)
    if covariance_type == "full":
        maha = np.square(np.einsum("nki,kij->nkj", diff, pc)).sum(axis=2)
    elif covariance_type == "tied":
        maha = np.square(np.einsum("nki,ij->nkj", diff, pc)).sum(axis=2)
    elif covariance_type == "diag":
        maha = np.square(diff * pc[None, :, :]).sum(axis=2)
    else:
        maha = np.square(diff).sum(axis=2) * np.square(pc)[None, :]
    return log_normaliser(pc, covariance_type, k, d)[None, :] - 0.5 * maha
