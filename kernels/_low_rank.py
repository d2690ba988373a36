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

from fastlvm._arrays import (add_to_diagonal, as_f64, linalg_cholesky, linalg_solve,
                             namespace)


def low_rank_factors(components, noise_variance):
    """Cholesky factors, log-determinants and whitened loadings, float64.

    Written once for NumPy, torch and CuPy: the results are arrays of the
    kind and on the device of ``components``.

    Parameters
    ----------
    components : array of shape (n_components, q, n_features)
        W_k for each component.
    noise_variance : array of shape (n_components,), the same kind
        sigma_k^2 > 0.

    Returns
    -------
    chol : array of shape (n_components, q, q)
        Lower-triangular L_k with L_k L_k^T = W_k W_k^T + sigma_k^2 I.
    log_det_cov : array of shape (n_components,)
        log det C_k.
    whitened : array of shape (n_components, n_features, q)
        B_k = W_k^T L_k^{-T}: u = B_k^T (x - mu_k) has ||u||^2 = y^T M_k^{-1} y
        with y = W_k (x - mu_k).
    """
    w = as_f64(components)
    s2 = as_f64(noise_variance)
    xp = namespace(w)
    n_comp, q, d = w.shape
    m = add_to_diagonal(w @ w.swapaxes(1, 2), s2[:, None])
    chol = linalg_cholesky(m)
    whitened = linalg_solve(chol, w).swapaxes(1, 2)  # (L^{-1} W)^T, q x q systems
    log_diag = xp.log(chol.diagonal(0, 1, 2))
    log_det = (d - q) * xp.log(s2) + 2.0 * log_diag.sum(1)
    return chol, log_det, whitened


def inverse_cholesky(chol):
    """L_k^{-1} for a stack of lower-triangular (K, q, q) factors, same kind."""
    return linalg_solve(chol, add_to_diagonal(namespace(chol).zeros_like(chol), 1.0))


def log_norm_constants(log_det_cov, n_features):
    """-0.5 (D log 2 pi + log det C_k), (n_components,) float64, same kind."""
    return -0.5 * (n_features * math.log(2 * math.pi) + log_det_cov)


def projection_stats(chol, cross_u, sum_u, u_second):
    """Statistics of the whitened projections u = L_k^{-1} y mapped to the
    projections y = W_k c = L_k u (exact float64 algebra, any array kind).

    Parameters
    ----------
    chol : array (K, q, q), L_k
    cross_u : array (K, D, q), sum r c u^T
    sum_u : array (K, q), sum r u
    u_second : array (K, q, q), sum r u u^T

    Returns
    -------
    cross : (K, D, q) sum r c y^T;  sum_proj : (K, q) sum r y;
    proj_second : (K, q, q) sum r y y^T (symmetrised)
    """
    chol_t = chol.swapaxes(1, 2)
    second = chol @ u_second @ chol_t
    return (cross_u @ chol_t, (chol @ sum_u[:, :, None])[:, :, 0],
            0.5 * (second + second.swapaxes(1, 2)))
