"""The low-rank-plus-isotropic covariance of a mixture of PPCA, shared by its ops.

Component k has C_k = W_k^T W_k + sigma_k^2 I_D, with ``components[k]`` = W_k
of shape (q, D) (sklearn's ``components_`` layout).  Everything here is q x q
algebra (Woodbury identity, matrix determinant lemma), never a D x D inverse:

    M_k = W_k W_k^T + sigma_k^2 I_q = L_k L_k^T           (Cholesky)
    c^T C_k^{-1} c = (||c||^2 - ||u||^2) / sigma_k^2,  u = L_k^{-1} W_k c
    log det C_k = (D - q) log sigma_k^2 + 2 sum log diag L_k

B_k = W_k^T L_k^{-T} (D, q) maps a centred row to u = B_k^T c in one product.
"""

import math

import numpy as np


def low_rank_factors(components, noise_variance):
    """Cholesky factors, log-determinants and whitened loadings, float64.

    Parameters
    ----------
    components : ndarray of shape (n_components, q, n_features)
        W_k for each component.
    noise_variance : ndarray of shape (n_components,)
        sigma_k^2 > 0.

    Returns
    -------
    chol : ndarray of shape (n_components, q, q)
        Lower-triangular L_k with L_k L_k^T = W_k W_k^T + sigma_k^2 I.
    log_det_cov : ndarray of shape (n_components,)
        log det C_k.
    whitened : ndarray of shape (n_components, n_features, q)
        B_k = W_k^T L_k^{-T}: u = B_k^T (x - mu_k) has ||u||^2 = y^T M_k^{-1} y
        with y = W_k (x - mu_k).
    """
    w = np.asarray(components, dtype=np.float64)
    s2 = np.asarray(noise_variance, dtype=np.float64)
    n_comp, q, d = w.shape
    m = w @ np.swapaxes(w, 1, 2) + s2[:, None, None] * np.eye(q)
    chol = np.linalg.cholesky(m)
    # L^{-1} W, solved per component (q x q triangular systems)
    whitened = np.stack([np.linalg.solve(chol[k], w[k]).T for k in range(n_comp)])
    log_det = (d - q) * np.log(s2) + 2.0 * np.log(np.diagonal(chol, axis1=1, axis2=2)).sum(1)
    return chol, log_det, whitened


def log_norm_constants(log_det_cov, n_features):
    """-0.5 (D log 2 pi + log det C_k), (n_components,) float64."""
    return -0.5 * (n_features * math.log(2 * math.pi) + np.asarray(log_det_cov))
