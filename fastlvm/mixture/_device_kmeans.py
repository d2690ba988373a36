"""k-means++ seeding and Lloyd's k-means on the device of a torch tensor or cupy array.

The same algorithms as ``_initialization.kmeans_plusplus`` / ``kmeans`` (greedy
k-means++ with 2 + log(K) trials, then Lloyd with sklearn's stopping rule), for
data that lives on a GPU: distances are formed chunk by chunk as matrix
products around one shift (the first row), so memory stays O(chunk x (K + D)),
each chunk's float64 arrays within ``_config.ROW_COPY_BYTES``;
cluster sums are one-hot products (cuBLAS, no atomics), so results are
deterministic.  The random draws come from the caller's NumPy
``random_state`` (a few numbers per centre), so a seed fixes the result.

Written with the operators torch, CuPy and NumPy share plus the helpers of
``fastlvm._arrays``; ``xp`` is the array's own module.  (On NumPy arrays it
runs too, which is how CI checks the code path CuPy takes.)
"""

import math

import numpy as np

from fastlvm._arrays import (as_f64, cast_like, clamp, f64_like, namespace, one_hot,
                             to_numpy_together, zeros_like)
from fastlvm._moments import row_ranges

from ._initialization import mean_variance, warn_fewer_distinct_clusters

def _chunks(X, width):
    """Row ranges of X whose float64 (rows, D) copy and (rows, ``width``) distances
    each take at most ``_config.ROW_COPY_BYTES``.  (Chunks of 2^25 / width rows
    made 2 GB float64 copies at K = 16, D = 128, and one centre's distances
    copied all of X: 10 GB at 10M x 128.)"""
    return row_ranges((X.shape[0], max(X.shape[1], width)))


def _sq_dist(Xc, centers, shift):
    """(rows, C) squared distances, float64, of shifted rows to shifted centres."""
    x = as_f64(Xc) - shift
    c = centers - shift
    d = (x * x).sum(1)[:, None] - 2.0 * (x @ c.T) + (c * c).sum(1)[None, :]
    return clamp(d, low=0.0)


def min_sq_dist(X, center, closest=None):
    """min(closest, |x - center|^2) for every row: (n,) float64 on X's device.
    ``center`` is (D,) or (1, D)."""
    shift = as_f64(X[0])
    center = as_f64(center.reshape(1, -1))
    out = zeros_like(X, (X.shape[0],))
    for a, b in _chunks(X, 1):
        d = _sq_dist(X[a:b], center, shift)[:, 0]
        out[a:b] = d if closest is None else namespace(X).minimum(d, closest[a:b])
    return out


def kmeans_plusplus(X, n_clusters, random_state, sample_weight=None):
    """Greedy k-means++ on the device, waiting for it nowhere.

    Each centre is chosen on the device from draws made on the host before the
    first: the candidates, their potentials, the best of them and the running
    distances are all queued, and nothing is read back (three reads a centre
    made the host wait for every pass over the rows before queuing the next).
    The draws are the host RNG's uniform stream in order, as when they were
    drawn a centre at a time; where every row coincides with a chosen centre
    (no potential left), a draw u picks row floor(u n).

    Returns
    -------
    centers : array (n_clusters, D), float64, on X's device
    indices : array (n_clusters,), int64, rows of X chosen
    """
    xp = namespace(X)
    n = X.shape[0]
    n_trials = 2 + int(math.log(n_clusters))
    first = float(random_state.uniform())
    # every later draw in one copy to the device, made before any work is queued
    # (torch's copy from pageable host memory waits for the work queued)
    draws = f64_like(X, random_state.uniform(size=(max(n_clusters - 1, 0), n_trials)))
    w = zeros_like(X, (n,)) + 1.0 if sample_weight is None else as_f64(sample_weight)
    cum_w = xp.cumsum(w, 0)
    chosen = [clamp(xp.searchsorted(cum_w, cum_w[-1:] * first), high=n - 1)]  # (1,) each
    closest = min_sq_dist(X, X[chosen[0]])
    shift = as_f64(X[0])
    for u in draws:
        cum = xp.cumsum(w * closest, 0)
        potential = cum[-1:]
        drawn = xp.searchsorted(cum, u * potential)
        cand = clamp(xp.where(potential > 0, drawn, cast_like(xp.floor(u * n), drawn)),
                     high=n - 1)
        pots = zeros_like(X, (n_trials,))
        centers = as_f64(X[cand])
        for a, b in _chunks(X, n_trials):
            pots += w[a:b] @ xp.minimum(_sq_dist(X[a:b], centers, shift), closest[a:b, None])
        chosen.append(cand[xp.argmin(pots).reshape(1)])
        closest = min_sq_dist(X, X[chosen[-1]], closest)
    idx = xp.concatenate(chosen)
    return as_f64(X[idx]), idx


def lloyd_step(X, centers, sample_weight=None):
    """Labels (n,), per-cluster weights (C,) and sums (C, D) under ``centers``."""
    k = centers.shape[0]
    shift = as_f64(X[0])
    labels = zeros_like(X, (X.shape[0],), dtype=np.int64)
    counts = zeros_like(X, (k,))
    sums = zeros_like(X, (k, X.shape[1]))
    for a, b in _chunks(X, k):
        lab = namespace(X).argmin(_sq_dist(X[a:b], centers, shift), 1)
        labels[a:b] = lab
        onehot = one_hot(lab, k)
        if sample_weight is not None:
            onehot *= as_f64(sample_weight[a:b, None])
        # as products: CuPy's sum over the rows of a tall, narrow array runs each
        # column on one block (see kernels/_cupy_gaussian.py)
        counts += onehot.T @ (zeros_like(X, (b - a,)) + 1.0)
        sums += onehot.T @ as_f64(X[a:b])
    return labels, counts, sums


def kmeans(X, n_clusters, random_state, sample_weight=None, max_iter=300, tol=1e-4):
    """Lloyd's k-means from a k-means++ seeding, on the device.

    Returns
    -------
    labels : array (n,), int64, on X's device
    centers : array (n_clusters, D), float64
    """
    centers, _ = kmeans_plusplus(X, n_clusters, random_state, sample_weight)
    var = mean_variance(X)
    labels = None
    for _ in range(max_iter):
        new_labels, counts, sums = lloyd_step(X, centers, sample_weight)
        nonempty = counts > 0
        new_centers = namespace(X).where(nonempty[:, None],
                                         sums / clamp(counts, low=1e-300)[:, None], centers)
        shift = ((new_centers - centers) ** 2).sum()
        # the shift and the count of changed labels read back together: one wait
        changed = 1 if labels is None else (labels != new_labels).sum()
        shift, changed = (float(v) for v in to_numpy_together([shift, changed]))
        unchanged = changed == 0
        centers, labels = new_centers, new_labels
        if unchanged or shift <= tol * var:
            break
    labels, _, _ = lloyd_step(X, centers, sample_weight)
    warn_fewer_distinct_clusters(labels, n_clusters)
    return labels, centers
