"""NumPy float64 reference for ``ppca_stats``: the specification.

Forms the (n, q) posterior means and (n, D) residuals of the whole input at
once; use it on small inputs only.
"""

import math

import numpy as np

from fastlvm._arrays import f64_like, to_numpy


def ppca_posterior(components, noise_variance):
    """M^{-1} and log det C for the PPCA model C = W W^T + sigma^2 I.

    Parameters
    ----------
    components : ndarray of shape (q, D)
        W^T, the loadings as rows (sklearn's ``components_`` layout).
    noise_variance : float
        sigma^2 > 0.

    Returns
    -------
    m_inv : ndarray of shape (q, q)
        (W^T W + sigma^2 I)^{-1}, float64, exactly symmetric.
    log_det_cov : float
        log det(W W^T + sigma^2 I_D) = (D - q) log sigma^2 + log det M.
    """
    wt = np.asarray(components, dtype=np.float64)
    q, d = wt.shape
    m = wt @ wt.T + noise_variance * np.eye(q)
    chol = np.linalg.cholesky(m)
    chol_inv = np.linalg.solve(chol, np.eye(q))
    m_inv = chol_inv.T @ chol_inv
    m_inv = 0.5 * (m_inv + m_inv.T)
    log_det = (d - q) * math.log(noise_variance) + 2.0 * np.log(np.diag(chol)).sum()
    return m_inv, float(log_det)


def ppca_log_density(centered, components, noise_variance, posterior=None):
    """Per-row marginal log-density and posterior mean, float64.

    Uses the cancellation-free c^T C^{-1} c = ||c - W^T z||^2 / sigma^2 + ||z||^2.
    The rows may be a device array (torch tensor, cupy array; PPCA's predictions
    on device rows): the q x q posterior is formed on the host, the rows'
    products run where they are.

    Parameters
    ----------
    centered : ndarray (or device array) of shape (n_samples, n_features), float64
        x - mean.
    components : ndarray (or an array of centered's kind) of shape
        (n_components, n_features)
    noise_variance : float
    posterior : (m_inv, log_det), optional
        :func:`ppca_posterior` of the parameters, formed once by a caller that
        passes the rows in blocks, with ``m_inv`` (q, q) already of
        ``centered``'s kind and device: each block then neither reads the
        components back nor copies M^{-1} to the device behind the last
        block's work.

    Returns
    -------
    log_p : ndarray (centered's kind) of shape (n_samples,)
        log N(x | mean, W W^T + sigma^2 I).
    z : ndarray (centered's kind) of shape (n_samples, n_components)
        Posterior means M^{-1} W c.
    """
    if posterior is None:
        posterior = ppca_posterior(to_numpy(components), noise_variance)
    m_inv, log_det = posterior
    wt, m_inv = f64_like(centered, components), f64_like(centered, m_inv)
    z = centered @ wt.T @ m_inv
    resid = centered - z @ wt
    quad = (resid**2).sum(1) / noise_variance + (z**2).sum(1)
    log_p = -0.5 * (centered.shape[1] * math.log(2 * math.pi) + log_det + quad)
    return log_p, z


def ppca_stats_ref(X, mean, components, noise_variance, sample_weight=None):
    """E-step statistics of probabilistic PCA, in float64.

    For each row, c = x - mean, the posterior mean z = M^{-1} W c (W^T is
    ``components``), and the exact marginal log-density
    log N(x | mean, W W^T + sigma^2 I) from the cancellation-free form
    c^T C^{-1} c = ||c - W^T z||^2 / sigma^2 + ||z||^2.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features)
    mean : ndarray of shape (n_features,)
    components : ndarray of shape (n_components, n_features)
    noise_variance : float
    sample_weight : ndarray of shape (n_samples,) or None

    Returns
    -------
    log_likelihood : float
        sum_n w_n log p(x_n).
    sq_norm : float
        sum_n w_n ||c_n||^2.
    cross : ndarray of shape (n_features, n_components)
        sum_n w_n c_n z_n^T.
    z_second : ndarray of shape (n_components, n_components)
        sum_n w_n z_n z_n^T (the posterior covariance sigma^2 M^{-1} is not
        included: add sum_n w_n sigma^2 M^{-1} for E[z z^T]).
    """
    X = np.asarray(X, dtype=np.float64)
    w = np.ones(X.shape[0]) if sample_weight is None else np.asarray(sample_weight, float)
    c = X - np.asarray(mean, dtype=np.float64)
    log_p, z = ppca_log_density(c, components, noise_variance)
    wz = z * w[:, None]
    return float(w @ log_p), float(w @ (c**2).sum(1)), c.T @ wz, z.T @ wz
