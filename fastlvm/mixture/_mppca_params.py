"""Mixture-of-PPCA parameters from sufficient statistics (the M-step), in float64.

Tipping & Bishop (1999), "Mixtures of probabilistic principal component
analysers", appendix C: with the responsibility-weighted covariance S_k around
the new mean mu_k' and the current W_k (here A = W_k^T, D x q),

    A' = S A (sigma^2 I + M^{-1} A^T S A)^{-1},   M = A^T A + sigma^2 I
    sigma^2' = tr(S - S A M^{-1} A'^T) / D

needs S only through S A (D x q), A^T S A (q x q) and tr S, which follow
exactly from the statistics of :func:`fastlvm.kernels.mppca_stats` taken
around the centre e (y = W_k (x - e)):

    delta = mu' - e,   s = sum r y / N = W_k delta
    S A   = sum r (x - e) y^T / N - delta s^T
    A^T S A = sum r y y^T / N - s s^T
    tr S  = sum r ||x - e||^2 / N - ||delta||^2

so an M-step costs O(K D q^2), never a D x D matrix.
"""

import numpy as np

EMPTY_COMPONENT_FLOOR = 10.0  # times eps, added to N_k as sklearn's GaussianMixture does
MIN_INITIAL_SCALE = 1e-3  # squared length of a fresh loading column, times sigma^2


def parameters_from_stats(stats, components, noise_variance, reg_covar, eps):
    """M-step of a mixture of PPCA.

    Parameters
    ----------
    stats : MPPCAStats
        Summed over all rows, under the parameters ``components`` and
        ``noise_variance`` (their projections define ``cross`` etc.).
    components : ndarray of shape (K, q, D)
    noise_variance : ndarray of shape (K,)
    reg_covar : float
        Added to every new sigma_k^2 (keeps C_k positive definite).
    eps : float
        Machine epsilon of the data's dtype.

    Returns
    -------
    weights : ndarray (K,)
    means : ndarray (K, D)
    components : ndarray (K, q, D)
    noise_variance : ndarray (K,)
    """
    n_comp, q, d = components.shape
    nk = np.asarray(stats.nk, dtype=np.float64) + EMPTY_COMPONENT_FLOOR * eps
    means = stats.sum_x / nk[:, None]
    new_components = np.empty_like(components, dtype=np.float64)
    new_noise = np.empty(n_comp)
    eye = np.eye(q)
    for k in range(n_comp):
        delta = means[k] - stats.center[k]
        s = stats.sum_proj[k] / nk[k]
        sa = stats.cross[k] / nk[k] - np.outer(delta, s)
        asa = stats.proj_second[k] / nk[k] - np.outer(s, s)
        tr_s = max(stats.sum_sq[k] / nk[k] - delta @ delta, 0.0)
        w = components[k]
        s2 = noise_variance[k]
        m_inv = np.linalg.inv(w @ w.T + s2 * eye)
        a_new = np.linalg.solve((s2 * eye + m_inv @ asa).T, sa.T).T
        explained = float(np.sum((sa @ m_inv) * a_new))
        new_components[k] = a_new.T
        new_noise[k] = max(tr_s - explained, 0.0) / d + reg_covar
    return nk / nk.sum(), means, new_components, new_noise


def ppca_from_covariance(cov, n_latent, reg_covar):
    """Closed-form PPCA of each component's covariance (the initialisation).

    sigma^2 is the mean of the discarded eigenvalues (plus ``reg_covar``),
    W = (U_q (Lambda_q - sigma^2)^{1/2})^T, except that no column starts
    shorter than 1e-3^{1/2} sigma: W = 0 is a fixed point of EM, so a
    component whose data look isotropic must not start there.

    Parameters
    ----------
    cov : ndarray of shape (K, D, D)
    n_latent : int
    reg_covar : float

    Returns
    -------
    components : ndarray (K, q, D)
    noise_variance : ndarray (K,)
    """
    n_comp, d, _ = cov.shape
    components = np.empty((n_comp, n_latent, d))
    noise = np.empty(n_comp)
    for k in range(n_comp):
        val, vec = np.linalg.eigh(0.5 * (cov[k] + cov[k].T))
        val, vec = np.clip(val[::-1], 0.0, None), vec[:, ::-1]
        noise[k] = val[n_latent:].mean() + reg_covar
        scale = np.sqrt(np.maximum(val[:n_latent] - noise[k], MIN_INITIAL_SCALE * noise[k]))
        components[k] = (vec[:, :n_latent] * scale).T
    return components, noise


def n_parameters(n_components, n_features, n_latent):
    """Free parameters: weights, means, loadings (modulo rotation), noise variances."""
    loadings = n_features * n_latent - n_latent * (n_latent - 1) // 2
    return int(n_components - 1 + n_components * (n_features + loadings + 1))
