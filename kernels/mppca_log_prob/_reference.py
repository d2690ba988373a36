"""NumPy float64 reference for ``mppca_log_prob``: the specification.

Forms each component's (n, q) posterior means and (n, D) residuals at once;
use it on small inputs only.
"""

import numpy as np

from .._low_rank import log_norm_constants, low_rank_factors


def mppca_log_prob_ref(X, means, components, noise_variance):
    """log N(x_n | mu_k, W_k^T W_k + sigma_k^2 I) for every row and component.

    Uses the cancellation-free c^T C^{-1} c = ||c - W^T z||^2 / sigma^2 + ||z||^2
    with z = M^{-1} W c, exact however small sigma^2 is.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features)
    means : ndarray of shape (n_components, n_features)
    components : ndarray of shape (n_components, q, n_features)
    noise_variance : ndarray of shape (n_components,)

    Returns
    -------
    log_prob : ndarray of shape (n_samples, n_components), float64
    """
    X = np.asarray(X, dtype=np.float64)
    w = np.asarray(components, dtype=np.float64)
    s2 = np.asarray(noise_variance, dtype=np.float64)
    chol, log_det, _ = low_rank_factors(w, s2)
    const = log_norm_constants(log_det, X.shape[1])
    out = np.empty((X.shape[0], w.shape[0]))
    for k in range(w.shape[0]):
        c = X - np.asarray(means[k], dtype=np.float64)
        m_inv = np.linalg.inv(chol[k] @ chol[k].T)
        z = c @ w[k].T @ m_inv
        resid = c - z @ w[k]
        out[:, k] = const[k] - 0.5 * ((resid**2).sum(1) / s2[k] + (z**2).sum(1))
    return out
