# Numba CPU kernels for k-means (used to initialise mixtures): a Lloyd step
# (assign + per-cluster sums), k-means++ candidate potentials, and the running
# nearest-center distance.
#
# Design: the same transposed tiles and direct-difference squared distances
# (sq_dist_tile) as the Gaussian kernels, so k-means costs what a spherical E-step
# costs and never forms an n x K array.  Sums are per-tile float64 partials merged
# in tile order (add_partials): deterministic.  Ties go to the lowest center
# index.  Tiles are distance_tile_rows' long ones (a float64 Lloyd step at K = 16
# ran 1.4x-1.9x faster than on the general 48 KiB tiles), in new_tile's scratch,
# whose row stride is never a power of two (1024-row tiles without it ran 4x
# slower).  Limits: float32/float64; distances are computed in X's dtype.
import numba
import numpy as np
from numba import prange

from .._numba_support import CACHE, FASTMATH, add_partials, load_tile_transposed, new_tile
from ..gaussian_log_prob._numba import sq_dist_tile

_jit = dict(fastmath=FASTMATH, cache=CACHE)


@numba.njit(parallel=True, **_jit)
def _lloyd_kernel(X, centers, sw, has_w, tile, group, labels, totals):
    """Labels, and per tile a row of partials (:func:`_lloyd_views`) that
    :func:`add_partials` adds into ``totals`` in tile order."""
    n, d = X.shape
    k = centers.shape[0]
    n_tiles = (n + tile - 1) // tile
    partials = np.empty((min(group, n_tiles), totals.shape[0]))
    for g0 in range(0, n_tiles, group):
        g = min(group, n_tiles - g0)
        for b in prange(g):
            row = partials[b]
            for j in range(row.shape[0]):  # each tile zeroes its own row
                row[j] = 0.0
            inertia, counts, sums = _lloyd_views(row, k, d)
            r0 = (g0 + b) * tile
            nb = min(tile, n - r0)
            xT = new_tile(X, d, tile)
            dist = np.empty((k, tile), dtype=X.dtype)
            nearest = np.empty(tile, dtype=X.dtype)
            label = np.empty(tile, dtype=np.int64)
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
        add_partials(partials, g, totals)


@numba.njit(**_jit)
def _lloyd_views(row, k, d):
    """A Lloyd step's sums in one row of floats -- a tile's partials, or the
    totals: inertia (1,), counts (K,), per-cluster sums (K, D) -- as views."""
    return row[0:1], row[1:1 + k], row[1 + k:1 + k + k * d].reshape((k, d))


@numba.njit(parallel=True, **_jit)
def _potentials_kernel(X, cands, closest, sw, has_w, tile, group, pot):
    n, d = X.shape
    m = cands.shape[0]
    n_tiles = (n + tile - 1) // tile
    partials = np.empty((min(group, n_tiles), m))
    for g0 in range(0, n_tiles, group):
        g = min(group, n_tiles - g0)
        for b in prange(g):
            r0 = (g0 + b) * tile
            nb = min(tile, n - r0)
            xT = new_tile(X, d, tile)
            dist = np.empty((m, tile), dtype=X.dtype)
            load_tile_transposed(X, r0, nb, xT)
            sq_dist_tile(xT, nb, cands, dist)
            for c in range(m):
                s = 0.0
                for t in range(nb):
                    v = min(closest[r0 + t], np.float64(dist[c, t]))
                    s += (sw[r0 + t] if has_w else 1.0) * v
                partials[b, c] = s
        add_partials(partials, g, pot)


@numba.njit(parallel=True, **_jit)
def _min_sq_dist_kernel(X, center, closest, has_closest, tile, out):
    n, d = X.shape
    n_tiles = (n + tile - 1) // tile
    for b in prange(n_tiles):
        r0 = b * tile
        nb = min(tile, n - r0)
        xT = new_tile(X, d, tile)
        dist = np.empty((1, tile), dtype=X.dtype)
        load_tile_transposed(X, r0, nb, xT)
        sq_dist_tile(xT, nb, center, dist)
        for t in range(nb):
            v = np.float64(dist[0, t])
            out[r0 + t] = min(closest[r0 + t], v) if has_closest else v


def _tiles(X, n_centers):
    """(rows per tile, tiles per group): distance_tile_rows' tiles, for the
    (n_centers, tile) distances each tile computes."""
    from fastlvm._config import TILES_PER_GROUP, distance_tile_rows

    return (distance_tile_rows(X.shape[1], X.dtype.itemsize, n_centers),
            max(numba.get_num_threads(), TILES_PER_GROUP))


def _weights(sample_weight):
    return (np.ones(1), False) if sample_weight is None else (sample_weight, True)


def lloyd_step_numba(X, centers, sample_weight=None):
    """Numba backend of :func:`fastlvm.kernels.lloyd_step` (inputs checked)."""
    n, d = X.shape
    k = centers.shape[0]
    labels = np.empty(n, dtype=np.int64)
    totals = np.zeros(1 + k + k * d)
    inertia, counts, sums = _lloyd_views(totals, k, d)
    sw, has_w = _weights(sample_weight)
    if n:
        tile, group = _tiles(X, k)
        _lloyd_kernel(X, np.ascontiguousarray(centers, dtype=X.dtype), sw, has_w, tile, group,
                      labels, totals)
    return labels, float(inertia[0]), counts, sums


def kmeans_potentials_numba(X, candidates, closest_sq, sample_weight=None):
    """Numba backend of :func:`fastlvm.kernels.kmeans_potentials` (inputs checked)."""
    pot = np.zeros(candidates.shape[0])
    sw, has_w = _weights(sample_weight)
    if X.shape[0]:
        tile, group = _tiles(X, candidates.shape[0])
        _potentials_kernel(X, np.ascontiguousarray(candidates, dtype=X.dtype), closest_sq, sw,
                           has_w, tile, group, pot)
    return pot


def min_sq_dist_numba(X, center, closest_sq=None):
    """Numba backend of :func:`fastlvm.kernels.min_sq_dist` (inputs checked)."""
    out = np.empty(X.shape[0])
    if X.shape[0]:
        tile, _ = _tiles(X, 1)
        has = closest_sq is not None
        _min_sq_dist_kernel(X, np.ascontiguousarray(np.asarray(center)[None, :], dtype=X.dtype),
                            closest_sq if has else out, has, tile, out)
    return out
