"""NumPy float64 references for the k-means kernels: the specification."""

import numpy as np


def _sq_dist(X, centers):
    X = np.asarray(X, dtype=np.float64)
    C = np.asarray(centers, dtype=np.float64)
    return np.square(X[:, None, :] - C[None, :, :]).sum(axis=2)  # (n, C)


def lloyd_step_ref(X, centers, sample_weight=None):
    """Assign rows to their nearest center and sum them per cluster.

    Returns
    -------
    labels : ndarray (n,), int64 (ties go to the lowest index)
    inertia : float, sum_n w_n min_k ||x_n - c_k||^2
    counts : ndarray (K,), float64, sum of weights per cluster
    sums : ndarray (K, D), float64, weighted sum of rows per cluster
    """
    d2 = _sq_dist(X, centers)
    n, k = d2.shape
    w = np.ones(n) if sample_weight is None else np.asarray(sample_weight, float)
    labels = d2.argmin(axis=1)
    onehot = np.zeros((n, k))
    onehot[np.arange(n), labels] = w
    return (labels.astype(np.int64), float(w @ d2[np.arange(n), labels]), onehot.sum(0),
            onehot.T @ np.asarray(X, dtype=np.float64))


def kmeans_potentials_ref(X, candidates, closest_sq, sample_weight=None):
    """sum_n w_n min(closest_sq[n], ||x_n - candidate_j||^2) for every candidate j."""
    d2 = _sq_dist(X, candidates)
    w = np.ones(d2.shape[0]) if sample_weight is None else np.asarray(sample_weight, float)
    return w @ np.minimum(np.asarray(closest_sq, float)[:, None], d2)


def min_sq_dist_ref(X, center, closest_sq=None):
    """min(closest_sq, ||x_n - center||^2) per row (closest_sq=None: no minimum)."""
    d2 = _sq_dist(X, np.asarray(center)[None, :])[:, 0]
    return d2 if closest_sq is None else np.minimum(np.asarray(closest_sq, float), d2)


def label_stats_ref(X, labels, n_clusters, centers, covariance_type, sample_weight=None):
    """Counts, sums and second moments of hard labels (one-hot responsibilities);
    ``labels=None`` puts every row in cluster 0.

    Returns
    -------
    nk : ndarray (K,), float64, sum of weights per cluster
    sum_x : ndarray (K, D), float64, weighted sum of rows per cluster
    second_moment : ndarray or None
        sum over each cluster's rows of w (x - c_k)(x - c_k)^T around
        ``centers`` (K, D): (K, D, D) 'full', summed over clusters (D, D)
        'tied', its diagonal (K, D) 'diag', its trace (K,) 'spherical'; None
        when ``centers`` is None.
    """
    X = np.asarray(X, dtype=np.float64)
    n = X.shape[0]
    labels = np.zeros(n, dtype=np.int64) if labels is None else labels
    w = np.ones(n) if sample_weight is None else np.asarray(sample_weight, float)
    onehot = np.zeros((n, n_clusters))
    onehot[np.arange(n), labels] = w
    nk, sum_x = onehot.sum(0), onehot.T @ X
    if centers is None:
        return nk, sum_x, None
    diff = X[:, None, :] - np.asarray(centers, dtype=np.float64)[None]  # (n, K, D)
    full = np.einsum("nk,nki,nkj->kij", onehot, diff, diff)
    second = {"full": full, "tied": full.sum(0),
              "diag": np.einsum("kii->ki", full), "spherical": np.einsum("kii->k", full)}
    return nk, sum_x, second[covariance_type]
