# Numba CPU kernel for ppca_stats: one pass of probabilistic-PCA E-step
# statistics (posterior means, their moments, the exact marginal log-density).
#
# Design: per tile of rows, transposed into a (Dp, tile) scratch and centred in
# place, three register-blocked tile products (tile_matmul): y = W^T c,
# z = M^{-1} y, and the reconstruction W z.  The log-density uses the
# cancellation-free form c^T C^{-1} c = ||c - W z||^2 / sigma^2 + ||z||^2 (the
# textbook (||c||^2 - y.z) / sigma^2 loses every digit when sigma^2 is small).
# The statistics sum_n w c z^T and sum_n w z z^T are 2 x 4 blocked tile moments.
# Per row that is 3 D q + q^2 multiply-adds; nothing of size n x q outlives a
# tile.  Tiles are the low-rank kernels' 128 KiB ones (LOW_RANK_TILE_BYTES):
# every loop runs over a tile's rows, and at D = 256 the usual 48 KiB held 48
# rows, too few to amortise each loop's set-up (1.3x slower per pass).
# Features and components are zero-padded to multiples of 4.  Sums over a
# tile's rows run in the data's dtype, everything across tiles in float64;
# per-tile partials are merged in tile order (add_partials: deterministic, no
# atomics).
# Limits: float32/float64; complete rows only (no NaN handling).
import math

import numba
import numpy as np

from .._numba_support import (CACHE, FASTMATH, group_size, kernel_weights, load_tile_transposed,
                              new_tile, padded_features, read_only, tile_matmul, tile_moments,
                              zeroed_row)
from .._thread_spans import run_groups
from ..mppca_log_prob._numba import LOW_RANK_TILE_BYTES
from ._reference import ppca_posterior

_jit = dict(fastmath=FASTMATH, cache=CACHE)


@numba.njit(nogil=True, **_jit)
def _ppca_stats_runs(X, sample_weight, has_weight, mean, loadings, m_inv, components, inv_noise,
                     log_const, tile, g0, partials, b0, b1):
    """Per tile g0 + b (b0 <= b < b1), row b of partials (:func:`_statistics_views`),
    which :func:`run_groups` adds into the totals in tile order."""
    n, d = X.shape
    dp, qp = loadings.shape
    # scratch, reused tile after tile through the span
    cT = new_tile(X, dp, tile)
    yT = np.empty((qp, tile), dtype=X.dtype)
    zT = np.empty((qp, tile), dtype=X.dtype)
    wzT = np.empty((qp, tile), dtype=X.dtype)
    recT = np.empty((dp, tile), dtype=X.dtype)
    res = np.empty(tile)
    norm = np.empty(tile)
    zn = np.empty(tile)
    for b in range(b0, b1):
        row = zeroed_row(partials, b)
        scalars, cross, z_second = _statistics_views(row, dp, qp)
        r0 = (g0 + b) * tile
        nb = min(tile, n - r0)
        load_tile_transposed(X, r0, nb, cT)
        for i in range(d):
            m = mean[i]
            for t in range(nb):
                cT[i, t] -= m
        tile_matmul(cT, nb, loadings, yT)
        tile_matmul(yT, nb, m_inv, zT)
        tile_matmul(zT, nb, components, recT)
        # per-row sums with the rows innermost: contiguous and vectorised (a
        # loop over features inside the row loop walked the tiles' columns,
        # one cache line per feature, and cost 3-4x the three products)
        for t in range(nb):
            res[t] = 0.0
            norm[t] = 0.0
            zn[t] = 0.0
        for i in range(d):
            for t in range(nb):
                c = cT[i, t]
                e = c - recT[i, t]
                res[t] += e * e
                norm[t] += c * c
        for j in range(qp):
            for t in range(nb):
                zn[t] += zT[j, t] * zT[j, t]
        ll = 0.0
        ss = 0.0
        for t in range(nb):
            w = sample_weight[r0 + t] if has_weight else 1.0
            ll += w * (log_const - 0.5 * (res[t] * inv_noise + zn[t]))
            ss += w * norm[t]
        for j in range(qp):
            for t in range(nb):
                wzT[j, t] = (sample_weight[r0 + t] if has_weight else 1.0) * zT[j, t]
        scalars[0] = ll
        scalars[1] = ss
        tile_moments(cT, wzT, nb, cross, False)
        tile_moments(zT, wzT, nb, z_second, False)


@numba.njit(**_jit)
def _statistics_views(row, dp, qp):
    """The statistics in one row of floats -- a tile's partials, or the totals:
    log-likelihood and squared norm (2,), cross moments (Dp, Qp), latent second
    moments (Qp, Qp) -- as views of ``row``."""
    o = 2 + dp * qp
    return row[0:2], row[2:o].reshape((dp, qp)), row[o:o + qp * qp].reshape((qp, qp))


def ppca_stats_numba(X, mean, components, noise_variance, sample_weight=None):
    """Numba backend of :func:`fastlvm.kernels.ppca_stats` (inputs checked)."""
    from fastlvm._config import tile_rows

    X = read_only(X)
    n, d = X.shape
    q = components.shape[0]
    dp, qp = padded_features(d), padded_features(q)
    m_inv, log_det = ppca_posterior(components, noise_variance)
    comp_p = np.zeros((qp, dp))
    comp_p[:q, :d] = components
    m_inv_p = np.zeros((qp, qp))
    m_inv_p[:q, :q] = m_inv
    totals = np.zeros(2 + dp * qp + qp * qp)
    scalars, cross, z_second = _statistics_views(totals, dp, qp)
    sw, has_weight = kernel_weights(sample_weight)
    if n:
        tile = tile_rows(dp, X.dtype.itemsize, LOW_RANK_TILE_BYTES)
        run_groups(
            _ppca_stats_runs, -(-n // tile), group_size(totals.shape[0]), totals,
            X, sw, has_weight,
            np.asarray(mean, dtype=X.dtype), np.ascontiguousarray(comp_p.T, dtype=X.dtype),
            np.ascontiguousarray(m_inv_p, dtype=X.dtype),
            np.ascontiguousarray(comp_p, dtype=X.dtype), 1.0 / noise_variance,
            -0.5 * (d * math.log(2 * math.pi) + log_det), tile)
    return float(scalars[0]), float(scalars[1]), cross[:d, :q], z_second[:q, :q]
