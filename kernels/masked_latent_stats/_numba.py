# Numba CPU kernel for masked_latent_stats: PPCA / factor-analysis E-step
# statistics on data with missing entries (NaN), marginalised row by row.
#
# Design: each row has its own observed set O, so its posterior precision
# P = I + W_O Psi_O^{-1} W_O^T differs from row to row.  It is formed as the
# complete-data P minus the missing features' rank-one terms (q^2 work per
# missing entry, none for a complete row, whose factorisation is shared), then
# factorised by a small in-register Cholesky (q^3 / 6).  Per row: D q for
# b = W_O Psi_O^{-1} c, D (q + 1) for the cross moments, (q + 1)^2 per missing
# entry for the per-feature second moments (stored as "all rows minus the rows
# missing feature i", so complete data costs nothing there).  The log-density
# uses the matrix determinant lemma and the Woodbury identity.  All arithmetic
# is float64, whatever the data's dtype (rows are read and widened one at a
# time).  Rows are processed in blocks; per-block partial statistics are merged
# in block order (add_partials, no atomics), so results do not depend on the
# thread count.
# Limits: every row must have an observed entry (checked by the public
# function); q is expected to be small (the per-row q x q work is scalar code).
import math

import numba
import numpy as np

from .._numba_support import CACHE, FASTMATH, group_size, kernel_weights, read_only, zeroed_row
from .._thread_spans import run_groups, run_spans

_jit = dict(fastmath=FASTMATH, cache=CACHE)
_BLOCK_ROWS = 128
_LOG_2PI = math.log(2 * math.pi)


@numba.njit(**_jit)
def _cholesky_inverse(P, L, L_inv, cov):
    """cov = P^{-1} through P = L L^T (L, L_inv: lower-triangular scratch); returns
    log det P."""
    q = P.shape[0]
    log_det = 0.0
    for j in range(q):
        s = P[j, j]
        for k in range(j):
            s -= L[j, k] * L[j, k]
        ljj = math.sqrt(s)
        L[j, j] = ljj
        log_det += 2.0 * math.log(ljj)
        for i in range(j + 1, q):
            s = P[i, j]
            for k in range(j):
                s -= L[i, k] * L[j, k]
            L[i, j] = s / ljj
    for j in range(q):
        L_inv[j, j] = 1.0 / L[j, j]
        for i in range(j + 1, q):
            s = 0.0
            for k in range(j, i):
                s -= L[i, k] * L_inv[k, j]
            L_inv[i, j] = s / L[i, i]
    for i in range(q):
        for j in range(i + 1):
            s = 0.0
            for k in range(i, q):
                s += L_inv[k, i] * L_inv[k, j]
            cov[i, j] = s
            cov[j, i] = s
    return log_det


@numba.njit(**_jit)
def _row_posterior(x, mean, W, inv_psi, log_psi, P_full, cov_full, log_det_full, c, b, P, L,
                   L_inv, cov, z):
    """Posterior of one row: fills c (centred, NaN where missing), z, and cov
    (or points at cov_full); returns (log p(x_O), n observed, covariance used)."""
    q, d = W.shape
    n_obs = 0
    quad = 0.0
    log_psi_sum = 0.0
    for j in range(q):
        b[j] = 0.0
    for i in range(d):
        v = np.float64(x[i])
        if v == v:
            ci = v - mean[i]
            c[i] = ci
            n_obs += 1
            t = ci * inv_psi[i]
            quad += ci * t
            log_psi_sum += log_psi[i]
            for j in range(q):
                b[j] += W[j, i] * t
        else:
            c[i] = np.nan
    if n_obs == d:
        cv = cov_full
        log_det = log_det_full
    else:
        for j in range(q):
            for k in range(q):
                P[j, k] = P_full[j, k]
        for i in range(d):
            if c[i] != c[i]:
                s = inv_psi[i]
                for j in range(q):
                    wj = W[j, i] * s
                    for k in range(q):
                        P[j, k] -= wj * W[k, i]
        log_det = _cholesky_inverse(P, L, L_inv, cov)
        cv = cov
    bz = 0.0
    for j in range(q):
        s = 0.0
        for k in range(q):
            s += cv[j, k] * b[k]
        z[j] = s
        bz += b[j] * s
    log_p = -0.5 * (n_obs * _LOG_2PI + log_psi_sum + log_det + quad - bz)
    return log_p, n_obs, cv


@numba.njit(nogil=True, **_jit)
def _masked_stats_runs(X, sample_weight, has_weight, mean, W, inv_psi, log_psi, P_full,
                       cov_full, log_det_full, g0, partials, b0, b1):
    """Per block g0 + blk of rows (b0 <= blk < b1), row blk of partials
    (:func:`_statistics_views`), which :func:`run_groups` adds into the totals
    in block order."""
    n, d = X.shape
    q = W.shape[0]
    q1 = q + 1
    for blk in range(b0, b1):
        row = zeroed_row(partials, blk)
        ll_p, tot_p, mis_p, cross_p, sq_p, obs_p = _statistics_views(row, d, q1)
        c = np.empty(d)
        b = np.empty(q)
        z = np.empty(q + 1)
        P = np.empty((q, q))
        L = np.zeros((q, q))
        L_inv = np.zeros((q, q))
        cov = np.empty((q, q))
        e = np.empty((q + 1, q + 1))
        r0 = (g0 + blk) * _BLOCK_ROWS
        for r in range(r0, min(n, r0 + _BLOCK_ROWS)):
            w = sample_weight[r] if has_weight else 1.0
            log_p, _, cv = _row_posterior(X[r], mean, W, inv_psi, log_psi, P_full, cov_full,
                                          log_det_full, c, b, P, L, L_inv, cov, z)
            z[q] = 1.0
            ll_p[0] += w * log_p
            for j in range(q + 1):
                for k in range(q + 1):
                    v = w * z[j] * z[k]
                    if j < q and k < q:
                        v += w * cv[j, k]
                    e[j, k] = v
                    tot_p[j, k] += v
            for i in range(d):
                ci = c[i]
                if ci == ci:
                    wc = w * ci
                    for j in range(q + 1):
                        cross_p[i, j] += wc * z[j]
                    sq_p[i] += wc * ci
                    obs_p[i] += w
                else:
                    for j in range(q + 1):
                        for k in range(q + 1):
                            mis_p[i, j, k] += e[j, k]


@numba.njit(nogil=True, **_jit)
def _masked_posterior_blocks(X, mean, W, inv_psi, log_psi, P_full, cov_full, log_det_full,
                             log_p, z_out, b0, b1):
    """log p(x_O) and E[z | x_O] of the rows of blocks b0 <= blk < b1."""
    n, d = X.shape
    q = W.shape[0]
    for blk in range(b0, b1):
        c = np.empty(d)
        b = np.empty(q)
        z = np.empty(q)
        P = np.empty((q, q))
        L = np.zeros((q, q))
        L_inv = np.zeros((q, q))
        cov = np.empty((q, q))
        for r in range(blk * _BLOCK_ROWS, min(n, (blk + 1) * _BLOCK_ROWS)):
            lp, _, _ = _row_posterior(X[r], mean, W, inv_psi, log_psi, P_full, cov_full,
                                      log_det_full, c, b, P, L, L_inv, cov, z)
            log_p[r] = lp
            for j in range(q):
                z_out[r, j] = z[j]


def _complete_data_factors(components, noise):
    W = np.ascontiguousarray(components, dtype=np.float64)
    psi = np.asarray(noise, dtype=np.float64)
    inv_psi = 1.0 / psi
    q = W.shape[0]
    P_full = np.eye(q) + (W * inv_psi) @ W.T
    cov_full = np.linalg.inv(P_full)
    cov_full = 0.5 * (cov_full + cov_full.T)
    log_det_full = float(np.linalg.slogdet(P_full)[1])
    return W, inv_psi, np.log(psi), P_full, cov_full, log_det_full


@numba.njit(**_jit)
def _statistics_views(row, d, q1):
    """The statistics in one row of floats -- a block's partials, or the totals:
    log-likelihood (1,), total (q+1, q+1), missing (D, q+1, q+1), cross (D, q+1),
    sq (D,), n_obs (D,) -- as views of ``row``."""
    o1 = 1 + q1 * q1
    o2 = o1 + d * q1 * q1
    o3 = o2 + d * q1
    return (row[0:1], row[1:o1].reshape((q1, q1)), row[o1:o2].reshape((d, q1, q1)),
            row[o2:o3].reshape((d, q1)), row[o3:o3 + d], row[o3 + d:o3 + 2 * d])


def masked_latent_stats_numba(X, mean, components, noise, sample_weight=None):
    """Numba backend of :func:`fastlvm.kernels.masked_latent_stats` (inputs checked)."""
    X = read_only(X)
    n, d = X.shape
    q = components.shape[0]
    factors = _complete_data_factors(components, noise)
    q1 = q + 1
    totals = np.zeros(1 + (d + 1) * q1 * q1 + d * (q + 3))
    loglik, total, missing, cross, sq, n_obs = _statistics_views(totals, d, q1)
    sw, has_weight = kernel_weights(sample_weight)
    if n:
        run_groups(_masked_stats_runs, -(-n // _BLOCK_ROWS), group_size(totals.shape[0]), totals,
                   X, sw, has_weight,
                   np.asarray(mean, dtype=np.float64), *factors)
    total = 0.5 * (total + total.T)
    return float(loglik[0]), total, missing, cross, sq, n_obs


def masked_posterior_numba(X, mean, components, noise):
    """Per-row log p(x_O) (n,) and E[z | x_O] (n, q), float64 (inputs checked)."""
    X = read_only(X)
    n = X.shape[0]
    q = components.shape[0]
    log_p = np.empty(n)
    z = np.empty((n, q))
    if n:
        run_spans(_masked_posterior_blocks, -(-n // _BLOCK_ROWS), X,
                  np.asarray(mean, dtype=np.float64), *_complete_data_factors(components, noise),
                  log_p, z)
    return log_p, z
