"""NumPy float64 reference for ``masked_latent_stats``: the specification.

Row by row, in plain NumPy; use it on small inputs only.
"""

import math

import numpy as np


def masked_row_posterior(x, mean, components, noise):
    """Posterior of one partially observed row under x = W^T z + mean + noise.

    Parameters
    ----------
    x : ndarray of shape (n_features,), NaN where missing (at least one observed)
    mean : ndarray of shape (n_features,)
    components : ndarray of shape (q, n_features)
    noise : ndarray of shape (n_features,)
        Per-feature noise variances psi_i > 0 (all equal for PPCA).

    Returns
    -------
    log_p : float
        log N(x_o | mean_o, W_o^T W_o + Psi_o), the observed coordinates' marginal.
    z : ndarray (q,)
        E[z | x_o].
    cov : ndarray (q, q)
        Cov[z | x_o] = (I + W_o Psi_o^{-1} W_o^T)^{-1}.
    """
    obs = ~np.isnan(x)
    c = x[obs] - mean[obs]
    w = components[:, obs]
    psi = noise[obs]
    q = components.shape[0]
    precision = np.eye(q) + (w / psi) @ w.T
    cov = np.linalg.inv(precision)
    z = cov @ (w @ (c / psi))
    C = w.T @ w + np.diag(psi)
    _, log_det = np.linalg.slogdet(C)
    log_p = -0.5 * (obs.sum() * math.log(2 * math.pi) + log_det + c @ np.linalg.solve(C, c))
    return float(log_p), z, cov


def masked_posterior_ref(X, mean, components, noise):
    """Per-row log p(x_O) (n,) and E[z | x_O] (n, q), float64, row by row
    (:func:`masked_row_posterior`)."""
    X = np.asarray(X, dtype=np.float64)
    rows = [masked_row_posterior(x, mean, components, noise)[:2] for x in X]
    log_p = np.array([r[0] for r in rows])
    z = np.array([r[1] for r in rows]).reshape(X.shape[0], np.shape(components)[0])
    return log_p, z


def masked_latent_stats_ref(X, mean, components, noise, sample_weight=None):
    """E-step statistics of PPCA / factor analysis on data with missing entries.

    For each row n, c = x - mean on its observed set O_n, z~ = (E[z|x_o], 1)
    and E~ = E[z~ z~^T]; w_n is the sample weight.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features), NaN where missing
    mean : ndarray of shape (n_features,)
    components : ndarray of shape (q, n_features)
    noise : ndarray of shape (n_features,)
    sample_weight : ndarray of shape (n_samples,) or None

    Returns
    -------
    log_likelihood : float
        sum_n w_n log p(x_{n,O_n}).
    total_second : ndarray (q + 1, q + 1)
        sum_n w_n E~_n.
    missing_second : ndarray (n_features, q + 1, q + 1)
        sum_{n: i missing} w_n E~_n, so that the rows observing feature i have
        total_second - missing_second[i].
    cross : ndarray (n_features, q + 1)
        sum_{n: i observed} w_n c_ni z~_n.
    sq : ndarray (n_features,)
        sum_{n: i observed} w_n c_ni^2.
    n_observed : ndarray (n_features,)
        sum_{n: i observed} w_n.
    """
    X = np.asarray(X, dtype=np.float64)
    n, d = X.shape
    q = components.shape[0]
    sw = np.ones(n) if sample_weight is None else np.asarray(sample_weight, np.float64)
    ll = 0.0
    total = np.zeros((q + 1, q + 1))
    missing = np.zeros((d, q + 1, q + 1))
    cross = np.zeros((d, q + 1))
    sq = np.zeros(d)
    n_obs = np.zeros(d)
    for row, w in zip(X, sw):
        log_p, z, cov = masked_row_posterior(row, mean, components, noise)
        zt = np.append(z, 1.0)
        e = np.outer(zt, zt)
        e[:q, :q] += cov
        obs = ~np.isnan(row)
        c = np.where(obs, row - mean, 0.0)
        ll += w * log_p
        total += w * e
        missing[~obs] += w * e
        cross += w * np.outer(c, zt)
        sq += w * c**2
        n_obs += w * obs
    return ll, total, missing, cross, sq, n_obs
