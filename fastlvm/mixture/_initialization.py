"""Initial responsibilities/parameters for mixtures, on the fast kernels.

'random' and 'random_from_data' draw exactly what sklearn draws from the same
``random_state`` (so fits start from identical parameters); 'k-means++' and
'kmeans' seed and iterate with fastlvm's own kernels (greedy k-means++ with
2 + log(K) trials, then Lloyd), which differ from sklearn's KMeans in their
random draws but never form an n x K array.  Statistics from explicit
responsibilities are summed over chunks of rows.
"""

import math
import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning

from fastlvm import _config
from fastlvm._arrays import (add_to_diagonal, as_f64, f64_like, is_device_array, namespace,
                             one_hot, stack, zeros_like)
from fastlvm.kernels.kmeans._numba import (kmeans_potentials_numba, label_stats_numba,
                                           lloyd_step_numba, min_sq_dist_numba)


def _chunks(n, chunk):
    for start in range(0, n, chunk):
        yield start, min(n, start + chunk)


def stats_from_resp(X, resp_chunks, center, covariance_type, sample_weight=None):
    """Sufficient statistics from explicit responsibilities, chunk by chunk.

    Parameters
    ----------
    X : ndarray (n, D), or a torch tensor (the sums then run on its device)
    resp_chunks : iterable of (start, stop, resp) with resp (stop - start, K)
    center : ndarray (K, D) or None
        Shift of the second moments; None skips them (first pass).
    covariance_type : str
    sample_weight : ndarray (n,) or None

    Returns
    -------
    nk, sum_x, second_moment (None when ``center`` is None)
    """
    nk = sum_x = second = None
    for start, stop, resp in resp_chunks:
        Xc = as_f64(X[start:stop])
        r = f64_like(X, resp)
        if sample_weight is not None:
            r = r * sample_weight[start:stop, None]
        k = r.shape[1]
        if nk is None:
            nk, sum_x = zeros_like(X, (k,)), zeros_like(X, (k, X.shape[1]))
        nk += r.sum(0)
        sum_x += r.T @ Xc
        if center is None:
            continue
        part = []
        for j in range(k):
            diff = Xc - center[j]
            if covariance_type in ("full", "tied"):
                part.append((r[:, j, None] * diff).T @ diff)
            elif covariance_type == "diag":
                part.append(r[:, j] @ diff**2)
            else:
                part.append(r[:, j] @ (diff**2).sum(1))
        part = stack(part)
        part = part.sum(0) if covariance_type == "tied" else part
        second = part if second is None else second + part
    return nk, sum_x, second


def stats_from_labels(X, labels, k, center, covariance_type, sample_weight=None, chunk=None):
    """:func:`stats_from_resp` for hard labels (one-hot responsibilities).

    Host arrays go through the label-statistics kernel
    (:func:`fastlvm.kernels.label_stats`): one pass, each row added to its own
    cluster, O(n D) work for the means and 'diag'/'spherical' moments and
    O(n D^2) for 'full'/'tied', where the one-hot responsibilities cost K
    times that and an (chunk, K) array (a default ``kmeans`` initialisation
    of 500k x 32 rows into 16 'diag' clusters spent 0.58 s there, against
    12 ms for an EM iteration).  Device arrays take the one-hot path, ``chunk``
    rows at a time.

    Parameters
    ----------
    X : ndarray (n, D), or a torch tensor / cupy array
    labels : ndarray (n,), int, in [0, k); on X's device
    k : int
    center : ndarray (k, D), float64, or None
        Shift of the second moments; None skips them.
    covariance_type : str
    sample_weight : ndarray (n,) or None
    chunk : int, optional
        Rows per block of the one-hot path (default: see
        :func:`fastlvm._config.chunk_rows`).

    Returns
    -------
    nk (k,), sum_x (k, D), second_moment (None when ``center`` is None), in
    float64: the sums of :func:`stats_from_resp` of the one-hot
    responsibilities (added in another order on the host).
    """
    if is_device_array(X) or is_device_array(labels):
        chunk = _config.chunk_rows(max(k, X.shape[1]), chunk)
        return stats_from_resp(X, label_resp_chunks(labels, k, chunk), center, covariance_type,
                               sample_weight)
    return label_stats_numba(X, labels, k, center, covariance_type, sample_weight)


def tied_covariance_over_all_rows(X, sample_weight, nk_eps, means, reg_covar, chunk):
    """sklearn's tied covariance (sum_n w x x^T - sum_k N_k m m^T) / sum N_k + reg."""
    xtx = zeros_like(X, (X.shape[1], X.shape[1]))
    for start, stop in _chunks(X.shape[0], chunk):
        Xc = as_f64(X[start:stop])
        wc = Xc if sample_weight is None else Xc * sample_weight[start:stop, None]
        xtx += wc.T @ Xc
    cov = (xtx - (nk_eps[:, None] * means).T @ means) / nk_eps.sum()
    return add_to_diagonal(0.5 * (cov + cov.T), reg_covar)


def random_resp_chunks(random_state, n, k, dtype, chunk):
    """sklearn's 'random' responsibilities, drawn chunk by chunk (same stream)."""
    for start, stop in _chunks(n, chunk):
        resp = np.asarray(random_state.uniform(size=(stop - start, k)), dtype=dtype)
        resp /= resp.sum(axis=1)[:, None]
        yield start, stop, resp


def label_resp_chunks(labels, k, chunk):
    """One-hot float64 responsibilities from hard labels, chunk by chunk, on the
    labels' device (the device path of :func:`stats_from_labels`)."""
    for start, stop in _chunks(labels.shape[0], chunk):
        yield start, stop, one_hot(labels[start:stop], k)


def kmeans_plusplus(X, n_clusters, random_state, sample_weight=None):
    """Greedy k-means++ seeding (Arthur & Vassilvitskii) on the fast kernels.

    Returns
    -------
    centers : ndarray (n_clusters, D), float64
    indices : ndarray (n_clusters,), int64, rows of X chosen
    """
    n = X.shape[0]
    n_trials = 2 + int(math.log(n_clusters))
    indices = np.empty(n_clusters, dtype=np.int64)
    # sklearn's draw, p = sample_weight / sum (uniform without weights): the same stream
    p = np.full(n, 1.0 / n) if sample_weight is None else sample_weight / sample_weight.sum()
    indices[0] = random_state.choice(n, p=p)
    del p
    closest = min_sq_dist_numba(X, X[indices[0]])
    # float64 and n long, like closest (updated in place): the only n-sized
    # arrays (no array of unit weights, no product with one); k-means++ on a
    # billion rows holds 16 GB here
    cum = np.empty(n)
    potential = float(closest.sum(dtype=np.float64) if sample_weight is None
                      else sample_weight @ closest)
    for c in range(1, n_clusters):
        if potential > 0:
            if sample_weight is None:
                np.cumsum(closest, dtype=np.float64, out=cum)
            else:
                np.multiply(sample_weight, closest, out=cum)
                np.cumsum(cum, out=cum)
            rand = random_state.uniform(size=n_trials) * cum[-1]
            cand = np.clip(np.searchsorted(cum, rand), None, n - 1)
        else:  # every row coincides with a chosen center: any row will do
            cand = random_state.choice(n, size=n_trials)
        pots = kmeans_potentials_numba(X, X[cand], closest,
                                       None if sample_weight is None else sample_weight)
        best = int(np.argmin(pots))
        indices[c] = cand[best]
        min_sq_dist_numba(X, X[cand[best]], closest, out=closest)  # in place
        potential = float(pots[best])
    return X[indices].astype(np.float64), indices


def kmeans(X, n_clusters, random_state, sample_weight=None, max_iter=300, tol=1e-4):
    """Lloyd's k-means from a k-means++ seeding, on the fast kernels.

    Stops when the squared center shift drops below ``tol`` times the mean
    per-feature variance of X (sklearn's rule) or labels stop changing.  An
    empty cluster keeps its previous center.

    Returns
    -------
    labels : ndarray (n,), int64
    centers : ndarray (n_clusters, D), float64
    """
    centers, _ = kmeans_plusplus(X, n_clusters, random_state, sample_weight)
    var = mean_variance(X)
    for _ in range(max_iter):
        # the labels are dropped at once (one n-sized array at a time): labels that
        # stop changing give the same counts and sums, bit for bit (a fixed
        # reduction order), so the same centers and a shift of exactly 0
        _, _, counts, sums = lloyd_step_numba(X, centers, sample_weight)
        new_centers = centers.copy()
        nonempty = counts > 0
        new_centers[nonempty] = sums[nonempty] / counts[nonempty, None]
        shift = float(((new_centers - centers) ** 2).sum())
        centers = new_centers
        if shift <= tol * var:
            break
    labels, _, _, _ = lloyd_step_numba(X, centers, sample_weight)
    warn_fewer_distinct_clusters(labels, n_clusters)
    return labels, centers


def warn_fewer_distinct_clusters(labels, n_clusters):
    """sklearn's KMeans warning, as its GaussianMixture's 'kmeans' start gives it,
    when ``labels`` (n,) int, any array kind, use fewer than ``n_clusters``
    clusters (duplicate rows).  One read of the device."""
    n_distinct = int((namespace(labels).bincount(labels, minlength=n_clusters) > 0).sum())
    if n_distinct < n_clusters:
        warnings.warn(f"Number of distinct clusters ({n_distinct}) found smaller than "
                      f"n_clusters ({n_clusters}). Possibly due to duplicate points in X.",
                      ConvergenceWarning, stacklevel=4)


def mean_variance(X, chunk=None):
    """Mean per-feature variance of X in float64, chunk by chunk, on X's device.

    Shifted by the first row, so data far from the origin keeps its digits.
    Host arrays take one pass of the label-statistics kernel, every row in one
    cluster (the NumPy chunks below cost 41 ms of a 0.25 s default fit of
    500k x 32 rows).
    """
    n = X.shape[0]
    if not is_device_array(X):
        shift = np.asarray(X[:1], dtype=np.float64)
        _, sum_x, second = label_stats_numba(X, None, 1, shift, "diag")
        mean = sum_x[0] / n - shift[0]
        return float((second[0] / n - mean**2).mean())
    chunk = _config.chunk_rows(X.shape[1], chunk)
    total = zeros_like(X, (X.shape[1],))
    total_sq = zeros_like(X, (X.shape[1],))
    shift = as_f64(X[0])
    for start, stop in _chunks(X.shape[0], chunk):
        z = as_f64(X[start:stop]) - shift
        total += z.sum(0)
        total_sq += (z * z).sum(0)
    return float((total_sq / n - (total / n) ** 2).mean())
