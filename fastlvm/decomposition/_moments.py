"""Weighted mean and scatter matrix of a (possibly memory-mapped) array, chunk by chunk.

Two passes over the rows: the mean, then sum_n w_n (x_n - mean)(x_n - mean)^T
around it, each chunk a GEMM in float64, never E[xx^T] - mean mean^T (which
loses the digits of data far from the origin).  PPCA and factor analysis fit
from these D x D statistics alone.
"""

import numpy as np

from fastlvm import _config


def row_ranges(n, chunk_size=None):
    """(start, stop) ranges of ``chunk_size`` rows (None: the default) covering n rows."""
    chunk = chunk_size or _config.DEFAULT_CHUNK_ROWS
    return ((s, min(n, s + chunk)) for s in range(0, n, chunk))


def mean_and_scatter(X, chunks, sample_weight=None):
    """Total weight, weighted mean and scatter of the rows of X.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features)
    chunks : callable
        ``chunks(n) -> iterable of (start, stop)`` row ranges covering X.
    sample_weight : ndarray of shape (n_samples,) or None

    Returns
    -------
    total : float
        n_samples, or the sum of the weights.
    mean : ndarray (n_features,), float64
    scatter : ndarray (n_features, n_features), float64
        sum_n w_n (x_n - mean)(x_n - mean)^T.
    """
    n, d = X.shape
    total = float(n) if sample_weight is None else float(sample_weight.sum())
    mean = np.zeros(d)
    for start, stop in chunks(n):
        part = np.asarray(X[start:stop], dtype=np.float64)
        mean += (part.sum(axis=0) if sample_weight is None
                 else sample_weight[start:stop] @ part)
    mean /= total
    scatter = np.zeros((d, d))
    for start, stop in chunks(n):
        c = np.asarray(X[start:stop], dtype=np.float64) - mean
        wc = c if sample_weight is None else c * sample_weight[start:stop, None]
        scatter += wc.T @ c
    return total, mean, 0.5 * (scatter + scatter.T)
