"""k-means kernels: Lloyd steps, k-means++ seeding and the statistics of hard
labels, without an n x K array."""

import numpy as np

from fastlvm._dispatch import like, resolve, to_host_view

from .._checks import check_covariance_type, check_data, check_param, check_sample_weight
from ._numba import (kmeans_potentials_numba, label_stats_numba, lloyd_step_numba,
                     min_sq_dist_numba)
from ._reference import kmeans_potentials_ref, label_stats_ref, lloyd_step_ref, min_sq_dist_ref

IMPLEMENTATIONS = {
    "lloyd_step": {"reference": lloyd_step_ref, "numba": lloyd_step_numba},
    "kmeans_potentials": {"reference": kmeans_potentials_ref, "numba": kmeans_potentials_numba},
    "min_sq_dist": {"reference": min_sq_dist_ref, "numba": min_sq_dist_numba},
    "label_stats": {"reference": label_stats_ref, "numba": label_stats_numba},
}


def _centers(centers, X, name):
    c = np.asarray(centers)
    if c.ndim != 2 or c.shape[1] != X.shape[1] or c.shape[0] < 1:
        raise ValueError(f"{name} must have shape (n_centers >= 1, {X.shape[1]}); got {c.shape}.")
    return check_param(c, name, c.shape)


def lloyd_step(X, centers, sample_weight=None, *, check_finite=True):
    """One Lloyd iteration: nearest-center labels and per-cluster weighted sums.

    Parameters
    ----------
    X : ndarray (n_samples, n_features), float32 or float64
    centers : array-like (n_clusters, n_features)
    sample_weight : array-like (n_samples,), optional

    Returns
    -------
    labels : ndarray (n_samples,), int64
    inertia : float
    counts : ndarray (n_clusters,), float64
    sums : ndarray (n_clusters, n_features), float64
    """
    _, impl = resolve("lloyd_step", IMPLEMENTATIONS["lloyd_step"], X)
    Xh = check_data(to_host_view(X), check_finite=check_finite)
    labels, inertia, counts, sums = impl(Xh, _centers(centers, Xh, "centers"),
                                         check_sample_weight(sample_weight, Xh.shape[0]))
    return like(X, labels), inertia, counts, sums


def kmeans_potentials(X, candidates, closest_sq, sample_weight=None, *, check_finite=True):
    """k-means++ potential of each candidate center.

    Parameters
    ----------
    X : ndarray (n_samples, n_features)
    candidates : array-like (n_candidates, n_features)
    closest_sq : ndarray (n_samples,), float64
        Squared distance of each row to its nearest chosen center so far.
    sample_weight : array-like (n_samples,), optional

    Returns
    -------
    ndarray (n_candidates,), float64
        sum_n w_n min(closest_sq[n], ||x_n - candidate||^2).
    """
    _, impl = resolve("kmeans_potentials", IMPLEMENTATIONS["kmeans_potentials"], X)
    Xh = check_data(to_host_view(X), check_finite=check_finite)
    closest = check_param(closest_sq, "closest_sq", (Xh.shape[0],))
    return impl(Xh, _centers(candidates, Xh, "candidates"), closest,
                 check_sample_weight(sample_weight, Xh.shape[0]))


def min_sq_dist(X, center, closest_sq=None, *, check_finite=True):
    """Squared distance of each row to ``center``, or its minimum with ``closest_sq``.

    Returns
    -------
    ndarray (n_samples,), float64
    """
    _, impl = resolve("min_sq_dist", IMPLEMENTATIONS["min_sq_dist"], X)
    Xh = check_data(to_host_view(X), check_finite=check_finite)
    c = _centers(np.asarray(center)[None, :], Xh, "center")[0]
    closest = None if closest_sq is None else check_param(closest_sq, "closest_sq",
                                                          (Xh.shape[0],))
    return impl(Xh, c, closest)


def label_stats(X, labels, n_clusters, centers=None, covariance_type="full", sample_weight=None,
                *, check_finite=True):
    """Weighted counts, sums and second moments of the rows of each cluster of
    hard labels: a mixture's statistics for one-hot responsibilities, without
    forming them.

    Parameters
    ----------
    X : ndarray (n_samples, n_features), float32 or float64
    labels : array-like (n_samples,), integers in [0, n_clusters), or None
        None puts every row in cluster 0 (the moments of the whole data,
        without an array of zeros).
    n_clusters : int
    centers : array-like (n_clusters, n_features), optional
        The second moments are taken around ``centers[label]``; None skips them.
    covariance_type : {'full', 'tied', 'diag', 'spherical'}
        The second moments' shape (see Returns).
    sample_weight : array-like (n_samples,), optional

    Returns
    -------
    nk : ndarray (n_clusters,), float64
    sum_x : ndarray (n_clusters, n_features), float64
    second_moment : ndarray or None, float64
        sum over each cluster's rows of w (x - c)(x - c)^T: (n_clusters,
        n_features, n_features) 'full', summed over clusters (n_features,
        n_features) 'tied', the diagonals (n_clusters, n_features) 'diag', the
        traces (n_clusters,) 'spherical'; None without ``centers``.
    """
    _, impl = resolve("label_stats", IMPLEMENTATIONS["label_stats"], X)
    Xh = check_data(to_host_view(X), check_finite=check_finite)
    check_covariance_type(covariance_type)
    if isinstance(n_clusters, bool) or not isinstance(n_clusters, (int, np.integer)) \
            or n_clusters < 1:
        raise ValueError(f"n_clusters must be an integer >= 1; got {n_clusters!r}.")
    lab = None
    if labels is not None:
        lab = np.asarray(to_host_view(labels, "labels"))
        if lab.shape != (Xh.shape[0],) or not np.issubdtype(lab.dtype, np.integer):
            raise ValueError(f"labels must be integers of shape ({Xh.shape[0]},); got "
                             f"{lab.dtype} of shape {lab.shape}.")
        if lab.size and (lab.min() < 0 or lab.max() >= n_clusters):
            raise ValueError(f"labels must lie in [0, n_clusters={n_clusters}); got values "
                             f"from {lab.min()} to {lab.max()}.")
        lab = np.ascontiguousarray(lab, dtype=np.int64)
    c = None if centers is None else check_param(centers, "centers",
                                                 (n_clusters, Xh.shape[1]))
    return impl(Xh, lab, int(n_clusters), c, covariance_type,
                check_sample_weight(sample_weight, Xh.shape[0]))


__all__ = ["label_stats", "lloyd_step", "kmeans_potentials", "min_sq_dist", "IMPLEMENTATIONS"]
