# Numba CPU kernel for gaussian_log_prob, and the per-tile log-density code that
# the fused E-step (estep_stats) reuses.
#
# Design: rows are processed in tiles of `tile_rows` rows, copied transposed into
# a (D, tile) scratch so every inner loop runs over rows (contiguous, vectorised
# by LLVM, no horizontal reductions).  Differences x - mu are formed directly in
# the data's dtype, never expanded as x.x - 2 x.mu + mu.mu, so float32 keeps its
# digits far from the origin.  'full' exploits the upper-triangular Cholesky
# factor (D(D+1)/2 multiply-adds per row and component, unrolled by four);
# 'tied' transforms each row once by U and compares with the K transformed means
# (D(D+1)/2 + 2D per row instead of K D(D+1)/2); 'diag' and 'spherical' are D
# subtract/multiply-adds per pair.  Tiles are independent, so the parallel
# driver is a plain prange.  Limits: float32/float64 only; the precision factors
# must be upper triangular (checked by the public function).
import numba
import numpy as np
from numba import prange

from .._covariance import DIAG, FULL, SPHERICAL, TIED, log_normaliser
from .._numba_support import CACHE, FASTMATH, load_tile_transposed

_jit = dict(fastmath=FASTMATH, cache=CACHE)


@numba.njit(**_jit)
def _maha_upper(diffT, nb, U, acc, y):
    """acc[t] = || diffT[:, t] @ U ||^2 for upper-triangular U (D, D)."""
    d = diffT.shape[0]
    for t in range(nb):
        acc[t] = 0.0
    for j in range(d):
        u0 = U[0, j]
        for t in range(nb):
            y[t] = u0 * diffT[0, t]
        i = 1
        while i + 3 <= j:
            u0 = U[i, j]
            u1 = U[i + 1, j]
            u2 = U[i + 2, j]
            u3 = U[i + 3, j]
            for t in range(nb):
                y[t] += (u0 * diffT[i, t] + u1 * diffT[i + 1, t]) + (
                    u2 * diffT[i + 2, t] + u3 * diffT[i + 3, t])
            i += 4
        while i <= j:
            u0 = U[i, j]
            for t in range(nb):
                y[t] += u0 * diffT[i, t]
            i += 1
        for t in range(nb):
            acc[t] += y[t] * y[t]


@numba.njit(**_jit)
def _transform_upper(zT, nb, U, yT):
    """yT[:, t] = zT[:, t] @ U for upper-triangular U (D, D)."""
    d = zT.shape[0]
    for j in range(d):
        u0 = U[0, j]
        for t in range(nb):
            yT[j, t] = u0 * zT[0, t]
        for i in range(1, j + 1):
            u0 = U[i, j]
            for t in range(nb):
                yT[j, t] += u0 * zT[i, t]


@numba.njit(**_jit)
def sq_dist_tile(xT, nb, centers, dist):
    """dist[k, t] = || xT[:, t] - centers[k] ||^2, differences taken directly.

    Parameters
    ----------
    xT : ndarray (D, tile)
    nb : int, rows of the tile in use
    centers : ndarray (K, D), same dtype as xT
    dist : ndarray (K, tile), written
    """
    d = xT.shape[0]
    for k in range(centers.shape[0]):
        for t in range(nb):
            dist[k, t] = 0.0
        i = 0
        while i + 4 <= d:
            m0 = centers[k, i]
            m1 = centers[k, i + 1]
            m2 = centers[k, i + 2]
            m3 = centers[k, i + 3]
            for t in range(nb):
                a0 = xT[i, t] - m0
                a1 = xT[i + 1, t] - m1
                a2 = xT[i + 2, t] - m2
                a3 = xT[i + 3, t] - m3
                dist[k, t] += (a0 * a0 + a1 * a1) + (a2 * a2 + a3 * a3)
            i += 4
        while i < d:
            m0 = centers[k, i]
            for t in range(nb):
                a0 = xT[i, t] - m0
                dist[k, t] += a0 * a0
            i += 1


@numba.njit(**_jit)
def _weighted_sq_dist_tile(xT, nb, means, scale, dist):
    """dist[k, t] = sum_i ((xT[i, t] - means[k, i]) * scale[k, i])^2  ('diag')."""
    d = xT.shape[0]
    for k in range(means.shape[0]):
        for t in range(nb):
            dist[k, t] = 0.0
        i = 0
        while i + 4 <= d:
            m0 = means[k, i]
            m1 = means[k, i + 1]
            m2 = means[k, i + 2]
            m3 = means[k, i + 3]
            s0 = scale[k, i]
            s1 = scale[k, i + 1]
            s2 = scale[k, i + 2]
            s3 = scale[k, i + 3]
            for t in range(nb):
                a0 = (xT[i, t] - m0) * s0
                a1 = (xT[i + 1, t] - m1) * s1
                a2 = (xT[i + 2, t] - m2) * s2
                a3 = (xT[i + 3, t] - m3) * s3
                dist[k, t] += (a0 * a0 + a1 * a1) + (a2 * a2 + a3 * a3)
            i += 4
        while i < d:
            m0 = means[k, i]
            s0 = scale[k, i]
            for t in range(nb):
                a0 = (xT[i, t] - m0) * s0
                dist[k, t] += a0 * a0
            i += 1


@numba.njit(**_jit)
def log_prob_tile(cov, xT, nb, means, prec, const, shift, offsets, diffT, y, dist, logp):
    """Log-densities of one tile: logp[k, t] = log N(x_t | mu_k, Sigma_k).

    Parameters
    ----------
    cov : int
        Covariance code (FULL, TIED, DIAG, SPHERICAL).
    xT : ndarray (D, tile)
        The tile, transposed.
    nb : int
        Rows of the tile in use.
    means : ndarray (K, D)
    prec : ndarray
        (K, D, D) full, (1, D, D) tied, (K, 1, D) diag, (K, 1, 1) spherical.
    const : ndarray (K,), float64
        Per-component additive constant (log-normaliser, plus log-weight in
        the E-step).
    shift, offsets : ndarray (D,) and (K, D)
        'tied' only: the shift c and the transformed offsets (mu_k - c) @ U.
    diffT : ndarray (D, tile), scratch
    y : ndarray (tile,), scratch
    dist : ndarray (K, tile)
        'spherical' only: written with the squared distances ||x_t - mu_k||^2
        (the E-step's second moments reuse them); untouched otherwise.
    logp : ndarray (K, tile)
        Written.

    Notes
    -----
    'tied' shifts ``xT`` in place by ``shift`` (the E-step's tied statistics
    are taken around that shift).
    """
    n_comp = means.shape[0]
    d = xT.shape[0]
    if cov == FULL:
        for k in range(n_comp):
            for i in range(d):
                m = means[k, i]
                for t in range(nb):
                    diffT[i, t] = xT[i, t] - m
            _maha_upper(diffT, nb, prec[k], logp[k], y)
    elif cov == TIED:
        for i in range(d):
            c = shift[i]
            for t in range(nb):
                xT[i, t] -= c
        _transform_upper(xT, nb, prec[0], diffT)
        sq_dist_tile(diffT, nb, offsets, logp)
    elif cov == DIAG:
        _weighted_sq_dist_tile(xT, nb, means, prec[:, 0, :], logp)
    else:
        sq_dist_tile(xT, nb, means, dist)
        for k in range(n_comp):
            p2 = prec[k, 0, 0] * prec[k, 0, 0]
            for t in range(nb):
                logp[k, t] = p2 * dist[k, t]
    for k in range(n_comp):
        c = const[k]
        for t in range(nb):
            logp[k, t] = c - 0.5 * logp[k, t]


@numba.njit(parallel=True, **_jit)
def _gaussian_log_prob_kernel(X, means, prec, const, shift, offsets, cov, tile, out):
    n, d = X.shape
    n_comp = means.shape[0]
    n_tiles = (n + tile - 1) // tile
    for b in prange(n_tiles):
        r0 = b * tile
        nb = min(tile, n - r0)
        xT = np.empty((d, tile), dtype=X.dtype)
        diffT = np.empty((d, tile), dtype=X.dtype)
        y = np.empty(tile, dtype=X.dtype)
        logp = np.empty((n_comp, tile), dtype=X.dtype)
        dist = np.empty((n_comp if cov == SPHERICAL else 1, tile), dtype=X.dtype)
        load_tile_transposed(X, r0, nb, xT)
        log_prob_tile(cov, xT, nb, means, prec, const, shift, offsets, diffT, y, dist, logp)
        for t in range(nb):
            for k in range(n_comp):
                out[r0 + t, k] = logp[k, t]


def prepare_params(means, precisions_cholesky, covariance_type, dtype):
    """Pack sklearn-shaped parameters into the kernels' uniform layout.

    Parameters
    ----------
    means : ndarray (K, D)
    precisions_cholesky : ndarray, sklearn's shape for ``covariance_type``
    covariance_type : str
    dtype : numpy dtype of the data (the compute dtype)

    Returns
    -------
    means_c : ndarray (K, D), ``dtype``
    prec : ndarray, 3-D, ``dtype`` (see :func:`log_prob_tile`)
    const : ndarray (K,), float64 log-normalisers
    shift : ndarray (D,), ``dtype`` ('tied': the mean of the means)
    offsets : ndarray (K, D), ``dtype`` ('tied': (mu_k - shift) @ U)
    cov : int covariance code
    """
    from .._covariance import COVARIANCE_CODE

    means64 = np.asarray(means, dtype=np.float64)
    pc64 = np.asarray(precisions_cholesky, dtype=np.float64)
    n_comp, d = means64.shape
    cov = COVARIANCE_CODE[covariance_type]
    const = log_normaliser(pc64, covariance_type, n_comp, d)
    shift = np.zeros(d)
    offsets = np.zeros((n_comp, d))
    if cov == FULL:
        prec = pc64
    elif cov == TIED:
        prec = pc64[None, :, :]
        # the shift as the kernel will see it (rounded to the data dtype)
        shift = means64.mean(axis=0).astype(dtype).astype(np.float64)
        offsets = (means64.astype(dtype).astype(np.float64) - shift) @ pc64
    elif cov == DIAG:
        prec = pc64[:, None, :]
    else:
        prec = pc64[:, None, None]
    return (np.ascontiguousarray(means64, dtype=dtype), np.ascontiguousarray(prec, dtype=dtype),
            np.ascontiguousarray(const), shift.astype(dtype), np.ascontiguousarray(offsets, dtype=dtype),
            cov)


def gaussian_log_prob_numba(X, means, precisions_cholesky, covariance_type):
    """Numba backend of :func:`fastlvm.kernels.gaussian_log_prob` (inputs checked)."""
    from fastlvm._config import tile_rows

    means_c, prec, const, shift, offsets, cov = prepare_params(
        means, precisions_cholesky, covariance_type, X.dtype)
    out = np.empty((X.shape[0], means_c.shape[0]), dtype=X.dtype)
    if X.shape[0]:
        _gaussian_log_prob_kernel(X, means_c, prec, const, shift, offsets, cov,
                                  tile_rows(X.shape[1], X.dtype.itemsize), out)
    return out

