"""k-means kernels: Lloyd steps and k-means++ seeding without an n x K array."""

import numpy as np

from fastlvm._dispatch import like, resolve, to_host_view

from .._checks import check_data, check_param, check_sample_weight
from ._numba import kmeans_potentials_numba, lloyd_step_numba, min_sq_dist_numba
from ._reference import kmeans_potentials_ref, lloyd_step_ref, min_sq_dist_ref

IMPLEMENTATIONS = {
    "lloyd_step": {"reference": lloyd_step_ref, "numba": lloyd_step_numba},
    "kmeans_potentials": {"reference": kmeans_potentials_ref, "numba": kmeans_potentials_numba},
    "min_sq_dist": {"reference": min_sq_dist_ref, "numba": min_sq_dist_numba},
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


__all__ = ["lloyd_step", "kmeans_potentials", "min_sq_dist", "IMPLEMENTATIONS"]
