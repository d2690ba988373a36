# Numba CPU kernels for k-means (used to initialise mixtures): a Lloyd step
# (assign + per-cluster sums), k-means++ candidate potentials, the running
# nearest-center distance, and the statistics of hard labels (a mixture's
# initial counts, means and second moments from k-means' clusters).
#
# Design: the same transposed tiles and direct-difference squared distances
# (sq_dist_tile) as the Gaussian kernels, so k-means costs what a spherical E-step
# costs and never forms an n x K array.  The running nearest-center distance is
# the potentials kernel with one candidate, writing each row's minimum out: one
# distance kernel less to compile in every first fit.  Sums are per-tile float64
# partials merged in tile order (add_partials): deterministic.  Ties go to the
# lowest center index.  Tiles are distance_tile_rows' long ones (a float64 Lloyd
# step at K = 16 ran 1.4x-1.9x faster than on the general 48 KiB tiles), in
# new_tile's scratch, whose row stride is never a power of two (1024-row tiles
# without it ran 4x slower).  Limits: float32/float64; distances are computed in X's dtype.
#
# Label statistics: each row adds to its own cluster's sums only, read row by
# row from X (no tiles, nothing of size n x K): O(D) work per row for the
# means and 'diag'/'spherical', D(D+1)/2 multiply-adds for 'full'/'tied' (the
# lower triangle, mirrored once at the end: 1.23x / 1.11x over the whole square
# at 500k x 32, K = 16).
# Differences from the centers and all sums are float64; the partial sums of
# each run of 1024-row blocks are merged in run order (add_partials), so the
# result does not depend on the thread count.
import numba
import numpy as np

from .._covariance import COVARIANCE_CODE, DIAG, FULL, SPHERICAL, TIED
from .._numba_support import (CACHE, FASTMATH, group_size, kernel_weights, load_tile_transposed,
                              new_tile, read_only, run_count, tiles_per_run, zeroed_row)
from .._thread_spans import run_groups
from ..gaussian_log_prob._numba import sq_dist_tile

_jit = dict(fastmath=FASTMATH, cache=CACHE)


@numba.njit(nogil=True, **_jit)
def _lloyd_runs(X, centers, sw, has_w, tile, labels, g0, partials, b0, b1):
    """Labels, and per tile g0 + b (b0 <= b < b1) row b of partials
    (:func:`_lloyd_views`), which :func:`run_groups` adds into the totals in
    tile order."""
    n, d = X.shape
    k = centers.shape[0]
    # scratch, reused tile after tile through the span
    xT = new_tile(X, d, tile)
    dist = np.empty((k, tile), dtype=X.dtype)
    nearest = np.empty(tile, dtype=X.dtype)
    label = np.empty(tile, dtype=np.int64)
    for b in range(b0, b1):
        row = zeroed_row(partials, b)
        inertia, counts, sums = _lloyd_views(row, k, d)
        r0 = (g0 + b) * tile
        nb = min(tile, n - r0)
        load_tile_transposed(X, r0, nb, xT)
        sq_dist_tile(xT, nb, centers, dist)
        # argmin over centers with the rows innermost: selects, no branches,
        # so it vectorises (a per-row loop over centers stayed scalar and
        # mispredicted); a strict < keeps the lowest index on ties
        for t in range(nb):
            nearest[t] = dist[0, t]
            label[t] = 0
        for c in range(1, k):
            for t in range(nb):
                v = dist[c, t]
                closer = v < nearest[t]
                nearest[t] = v if closer else nearest[t]
                label[t] = c if closer else label[t]
        acc = 0.0
        for t in range(nb):
            best = label[t]
            labels[r0 + t] = best
            w = sw[r0 + t] if has_w else 1.0
            acc += w * nearest[t]
            counts[best] += w
            for i in range(d):  # the row from X: contiguous
                sums[best, i] += w * X[r0 + t, i]
        inertia[0] = acc


@numba.njit(**_jit)
def _lloyd_views(row, k, d):
    """A Lloyd step's sums in one row of floats -- a tile's partials, or the
    totals: inertia (1,), counts (K,), per-cluster sums (K, D) -- as views."""
    return row[0:1], row[1:1 + k], row[1 + k:1 + k + k * d].reshape((k, d))


# rows per block of the label statistics (runs of blocks per parallel task)
_LABEL_BLOCK = 1024
_NO_OUT = np.empty(1)  # the running distances' place, where none are written


@numba.njit(nogil=True, **_jit)
def _label_stats_runs(X, labels, has_labels, centers, sw, has_w, cov, want_second, run,
                      sec_shape, g0, partials, b0, b1):
    """Per run g0 + b of row blocks (b0 <= b < b1), row b of partials
    (:func:`label_stats_views`), which :func:`run_groups` adds into the totals
    in run order."""
    n, d = X.shape
    k = centers.shape[0]
    # scratch, reused tile after tile through the span
    v = np.empty(d)
    for b in range(b0, b1):
        row = zeroed_row(partials, b)
        nk, first, second = label_stats_views(row, k, d, sec_shape)
        stop = min(n, (g0 + b + 1) * run * _LABEL_BLOCK)
        for r in range((g0 + b) * run * _LABEL_BLOCK, stop):
            c = labels[r] if has_labels else 0
            w = sw[r] if has_w else 1.0
            nk[c] += w
            for i in range(d):
                v[i] = np.float64(X[r, i]) - centers[c, i]
                first[c, i] += w * v[i]
            if not want_second:
                continue
            if cov == DIAG:
                for i in range(d):
                    second[c, 0, i] += w * v[i] * v[i]
            elif cov == SPHERICAL:
                s = 0.0
                for i in range(d):
                    s += v[i] * v[i]
                second[c, 0, 0] += w * s
            else:  # the lower triangle; label_stats_numba mirrors it
                block = second[0] if cov == TIED else second[c]
                for i in range(d):
                    wv = w * v[i]
                    for j in range(i + 1):
                        block[i, j] += wv * v[j]


@numba.njit(**_jit)
def label_stats_views(row, k, d, sec_shape):
    """The label statistics in one row of floats -- a run's partials, or the
    totals: weighted counts (K,), first moments around the centers (K, D),
    second moments ``sec_shape`` -- as views of ``row``."""
    o1 = k + k * d
    n_second = sec_shape[0] * sec_shape[1] * sec_shape[2]
    return (row[0:k], row[k:o1].reshape((k, d)), row[o1:o1 + n_second].reshape(sec_shape))


@numba.njit(nogil=True, **_jit)
def _potentials_runs(X, cands, closest, sw, has_w, tile, out, write_out, g0, partials, b0, b1):
    """Per tile g0 + b (b0 <= b < b1), row b of partials: each candidate's
    sum_t w_t min(closest_t, |x_t - c|^2) over the tile's rows.  With
    ``write_out`` (one candidate) each row's min(closest_t, |x_t - c|^2) also
    goes to ``out``, which may be ``closest`` itself (each row is read before it
    is written): the running nearest-center distance of k-means++, from the same
    kernel, so that a first fit compiles one distance kernel for both."""
    n, d = X.shape
    m = cands.shape[0]
    # scratch, reused tile after tile through the span
    xT = new_tile(X, d, tile)
    dist = np.empty((m, tile), dtype=X.dtype)
    for b in range(b0, b1):
        r0 = (g0 + b) * tile
        nb = min(tile, n - r0)
        load_tile_transposed(X, r0, nb, xT)
        sq_dist_tile(xT, nb, cands, dist)
        for c in range(m):
            s = 0.0
            for t in range(nb):
                v = min(closest[r0 + t], np.float64(dist[c, t]))
                s += (sw[r0 + t] if has_w else 1.0) * v
            partials[b, c] = s
        if write_out:
            for t in range(nb):
                out[r0 + t] = min(closest[r0 + t], np.float64(dist[0, t]))


def _tiles(X, n_centers, floats_per_tile):
    """(rows per tile, tiles per group): distance_tile_rows' tiles, for the
    (n_centers, tile) distances each tile computes, and :func:`group_size`'s
    groups of ``floats_per_tile`` partials."""
    from fastlvm._config import distance_tile_rows

    return (distance_tile_rows(X.shape[1], X.dtype.itemsize, n_centers),
            group_size(floats_per_tile))


def _centers(centers, dtype):
    """Centers as the kernels take them: C-ordered, of ``dtype`` and writable,
    as the Gaussian kernels' means are, so that the distance helpers both run
    (``sq_dist_tile`` and its callees) compile once.  The k-means++ seeds are
    rows of X, read-only where X is: those few rows are copied."""
    return np.require(centers, dtype=dtype, requirements=["C", "W"])


def lloyd_step_numba(X, centers, sample_weight=None):
    """Numba backend of :func:`fastlvm.kernels.lloyd_step` (inputs checked)."""
    X = read_only(X)
    n, d = X.shape
    k = centers.shape[0]
    labels = np.empty(n, dtype=np.int64)
    totals = np.zeros(1 + k + k * d)
    inertia, counts, sums = _lloyd_views(totals, k, d)
    sw, has_w = kernel_weights(sample_weight)
    if n:
        tile, group = _tiles(X, k, totals.shape[0])
        run_groups(_lloyd_runs, -(-n // tile), group, totals, X,
                   _centers(centers, X.dtype), sw, has_w, tile, labels)
    return labels, float(inertia[0]), counts, sums


def label_stats_numba(X, labels, n_clusters, centers, covariance_type, sample_weight=None):
    """Numba backend of :func:`fastlvm.kernels.label_stats` (inputs checked)."""
    X = read_only(X)
    n, d = X.shape
    k = n_clusters
    want_second = centers is not None
    c = _centers(np.zeros((k, d)) if centers is None else centers, np.float64)
    cov = COVARIANCE_CODE[covariance_type]
    sec_shape = ({FULL: (k, d, d), TIED: (1, d, d), DIAG: (k, 1, d), SPHERICAL: (k, 1, 1)}[cov]
                 if want_second else (0, 0, 0))
    totals = np.zeros(k + k * d + int(np.prod(sec_shape)))
    nk, first, second = label_stats_views(totals, k, d, sec_shape)
    sw, has_w = kernel_weights(sample_weight)
    has_labels = labels is not None
    if n:
        run = tiles_per_run(n, _LABEL_BLOCK)
        run_groups(_label_stats_runs, run_count(n, _LABEL_BLOCK, run),
                   group_size(totals.shape[0]), totals, X,
                   labels if has_labels else np.zeros(1, dtype=np.int64), has_labels, c, sw,
                   has_w, cov, want_second, run, sec_shape)
    sum_x = first + nk[:, None] * c
    if not want_second:
        return nk, sum_x, None
    if cov in (FULL, TIED):  # the kernel sums the lower triangles
        second = np.tril(second) + np.swapaxes(np.tril(second, -1), 1, 2)
    second = {FULL: second, TIED: second[0], DIAG: second[:, 0, :],
              SPHERICAL: second[:, 0, 0]}[cov]
    return nk, sum_x, second


def kmeans_potentials_numba(X, candidates, closest_sq, sample_weight=None):
    """Numba backend of :func:`fastlvm.kernels.kmeans_potentials` (inputs checked)."""
    X = read_only(X)
    pot = np.zeros(candidates.shape[0])
    sw, has_w = kernel_weights(sample_weight)
    if X.shape[0]:
        tile, group = _tiles(X, candidates.shape[0], pot.shape[0])
        run_groups(_potentials_runs, -(-X.shape[0] // tile), group, pot, X,
                   _centers(candidates, X.dtype), read_only(closest_sq), sw, has_w, tile,
                   _NO_OUT, False)
    return pot


def min_sq_dist_numba(X, center, closest_sq=None, out=None):
    """Numba backend of :func:`fastlvm.kernels.min_sq_dist` (inputs checked).

    ``out`` (n,) float64, optional, receives the result; it may be ``closest_sq``
    itself (each row's entry is read before it is written).
    """
    X = read_only(X)
    out = np.empty(X.shape[0]) if out is None else out
    if closest_sq is None:  # min(inf, d) = d: the distances themselves
        out.fill(np.inf)
        closest_sq = out
    if X.shape[0]:
        tile, group = _tiles(X, 1, 1)
        sw, has_w = kernel_weights(None)
        run_groups(_potentials_runs, -(-X.shape[0] // tile), group, np.zeros(1), X,
                   _centers(np.asarray(center)[None, :], X.dtype), read_only(closest_sq), sw,
                   has_w, tile, out, True)
    return out
