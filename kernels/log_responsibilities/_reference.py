"""NumPy float64 reference for ``log_responsibilities``: the specification.

Row-wise log-sum-exp normalisation, shifted by the row maximum.  A row whose
entries are all -inf has log_norm = -inf and NaN log-responsibilities (no
component can claim the row); +inf or NaN entries propagate as in
``v - logsumexp(v)``.
"""

import numpy as np


def log_responsibilities_ref(weighted_log_prob):
    """Normalise each row of log-weights by its log-sum-exp, in float64.

    Parameters
    ----------
    weighted_log_prob : ndarray of shape (n_samples, n_components)

    Returns
    -------
    log_resp : ndarray of shape (n_samples, n_components), float64
        ``weighted_log_prob - log_norm[:, None]``, computed as
        ``(v - max) - log(sum exp(v - max))`` so huge magnitudes stay exact.
    log_norm : ndarray of shape (n_samples,), float64
        ``log(sum_k exp(weighted_log_prob[:, k]))``.
    """
    v = np.asarray(weighted_log_prob, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore", under="ignore"):
        m = v.max(axis=1)
        finite_m = np.where(np.isfinite(m), m, 0.0)
        shifted = v - finite_m[:, None]
        log_s = np.log(np.exp(shifted).sum(axis=1))
        log_norm = np.where(np.isfinite(m), finite_m + log_s, m)
        # (v - m) - log s, not v - (m + log s): exact even when m + log s rounds to m
        log_resp = np.where(np.isfinite(m)[:, None], shifted - log_s[:, None],
                            v - log_norm[:, None])
    return log_resp, log_norm
