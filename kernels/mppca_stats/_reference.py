"""NumPy float64 reference for ``mppca_stats``: the specification.

Forms the (n, K) responsibilities and each component's (n, q) projections at
once; use it on small inputs only.
"""

import numpy as np
from scipy.special import logsumexp

from ..mppca_log_prob._reference import mppca_log_prob_ref


def mppca_stats_ref(X, weights, means, components, noise_variance, sample_weight=None, *,
                    keep_on_device=False):
    """E-step statistics of a mixture of PPCA, in float64, around the means.

    With responsibilities r_nk (times the sample weight w_n), centred rows
    c = x_n - mu_k and projections y = W_k c:

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features)
    weights : ndarray of shape (n_components,)
    means : ndarray of shape (n_components, n_features)
    components : ndarray of shape (n_components, q, n_features)
    noise_variance : ndarray of shape (n_components,)
    sample_weight : ndarray of shape (n_samples,) or None
    keep_on_device : bool
        Accepted as the device backends' is; the results here are host values.

    Returns
    -------
    log_likelihood : float
        sum_n w_n log sum_k pi_k N(x_n | mu_k, C_k).
    nk : ndarray (n_components,)
        sum_n w_n r_nk.
    sum_x : ndarray (n_components, n_features)
        sum_n w_n r_nk x_n.
    sum_sq : ndarray (n_components,)
        sum_n w_n r_nk ||x_n - center_k||^2.
    cross : ndarray (n_components, n_features, q)
        sum_n w_n r_nk (x_n - center_k) y_nk^T.
    sum_proj : ndarray (n_components, q)
        sum_n w_n r_nk y_nk.
    proj_second : ndarray (n_components, q, q)
        sum_n w_n r_nk y_nk y_nk^T.
    center : ndarray (n_components, n_features)
        The centres c_k = the means (y_nk = W_k (x_n - c_k) too).
    """
    X = np.asarray(X, dtype=np.float64)
    means = np.asarray(means, dtype=np.float64)
    w = np.asarray(components, dtype=np.float64)
    n = X.shape[0]
    sw = np.ones(n) if sample_weight is None else np.asarray(sample_weight, np.float64)
    with np.errstate(divide="ignore"):
        wlp = mppca_log_prob_ref(X, means, w, noise_variance) + np.log(weights)
    log_norm = logsumexp(wlp, axis=1) if n else np.zeros(0)
    resp = np.exp(wlp - log_norm[:, None]) * sw[:, None]
    n_comp, q, d = w.shape
    sum_sq = np.empty(n_comp)
    cross = np.empty((n_comp, d, q))
    sum_proj = np.empty((n_comp, q))
    proj_second = np.empty((n_comp, q, q))
    for k in range(n_comp):
        c = X - means[k]
        y = c @ w[k].T
        ry = resp[:, k, None] * y
        sum_sq[k] = resp[:, k] @ (c**2).sum(1)
        cross[k] = c.T @ ry
        sum_proj[k] = ry.sum(0)
        proj_second[k] = y.T @ ry
    return (float(sw @ log_norm), resp.sum(0), resp.T @ X, sum_sq, cross, sum_proj,
            proj_second, means.copy())
