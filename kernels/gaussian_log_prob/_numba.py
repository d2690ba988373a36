# Numba CPU kernel for gaussian_log_prob, and the per-tile log-density code that
# the fused E-step (estep_stats) reuses.
#
# Design: rows are processed in tiles of `tile_rows` rows ('diag' and
# 'spherical': `distance_tile_rows`, longer), copied transposed into
# a (Dp, tile) scratch so every inner loop runs over rows (contiguous, vectorised
# by LLVM, no horizontal reductions).  Features are zero-padded to Dp, a
# multiple of 4, in the tile and in every parameter, so the register-blocked
# loops need no remainder code (padded features add exact zeros).  Differences
# x - mu are formed directly in the data's dtype, never expanded as
# x.x - 2 x.mu + mu.mu, so float32 keeps its digits far from the origin.
# 'full' applies the upper-triangular Cholesky factor in 4 x 4 register blocks
# (each loaded row value is centred in a register and feeds four multiply-adds;
# the diagonal block is squared straight into the result; no centred copy of
# the tile is written), about D(D+1)/2 + 3D/2 multiply-adds per
# row and component; 'tied' transforms each row once by U the same way and
# compares with the K transformed means; 'diag' and 'spherical' take components
# in pairs so each loaded x serves two (plain distances in float64: fours).
# The distance helpers, 'full''s Mahalanobis blocks and log_prob_tile compile for
# 512-bit vectors where the CPU has them (kernels/_vector_width.py); 'tied''s
# transform keeps 256 (at 512 its float64 E-step ran 5-10% slower).
# Runs of tiles are independent: spans over threads (kernels/_thread_spans.py).
# ``log_prob_tile`` is inlined at Numba's level (inline="always"): in a kernel
# whose covariance code is a constant (``LOG_PROB_RUNS``, the E-step's
# ``ESTEP_RUNS``) Numba prunes the other types' branches before typing them, so
# a first fit or predict compiles one type's helpers, not four.  Limits:
# float32/float64 only; the precision factors must be upper triangular (checked
# by the public function).
import numba
import numpy as np

from .._covariance import COVARIANCE_TYPES, DIAG, FULL, SPHERICAL, TIED, log_normaliser
from .._numba_support import (CACHE, FASTMATH, accumulate_columns, load_tile_transposed,
                              named_span_kernel, new_tile, padded_features, read_only, run_count,
                              tiles_per_run)
from .._thread_spans import run_spans
from .._vector_width import prefer_wide_vectors
from ..log_responsibilities._numba import row_max

_jit = dict(fastmath=FASTMATH, cache=CACHE)


@numba.njit(**_jit)
def _maha_upper(xT, nb, center, U, acc, Y):
    """acc[t] = || (xT[:, t] - center) @ U ||^2 for upper-triangular U (Dp, Dp),
    Dp % 4 == 0.

    Y is a (4, tile) scratch.  The differences are formed on the fly (never
    stored); the diagonal block of each group of four output columns is applied
    in registers and squared straight into ``acc``.
    """
    prefer_wide_vectors()
    dp = xT.shape[0]
    for t in range(nb):
        acc[t] = 0.0
    for jb in range(0, dp, 4):
        accumulate_columns(xT, nb, U, jb, jb, Y, 0, center)  # rows above the diagonal block
        u00 = U[jb, jb]
        u01 = U[jb, jb + 1]
        u02 = U[jb, jb + 2]
        u03 = U[jb, jb + 3]
        u11 = U[jb + 1, jb + 1]
        u12 = U[jb + 1, jb + 2]
        u13 = U[jb + 1, jb + 3]
        u22 = U[jb + 2, jb + 2]
        u23 = U[jb + 2, jb + 3]
        u33 = U[jb + 3, jb + 3]
        m0 = center[jb]
        m1 = center[jb + 1]
        m2 = center[jb + 2]
        m3 = center[jb + 3]
        for t in range(nb):
            v0 = xT[jb, t] - m0
            v1 = xT[jb + 1, t] - m1
            v2 = xT[jb + 2, t] - m2
            v3 = xT[jb + 3, t] - m3
            y0 = Y[0, t] + u00 * v0
            y1 = Y[1, t] + (u01 * v0 + u11 * v1)
            y2 = Y[2, t] + ((u02 * v0 + u12 * v1) + u22 * v2)
            y3 = Y[3, t] + ((u03 * v0 + u13 * v1) + (u23 * v2 + u33 * v3))
            acc[t] += (y0 * y0 + y1 * y1) + (y2 * y2 + y3 * y3)


@numba.njit(**_jit)
def _transform_upper(zT, nb, U, yT, Y):
    """yT[:, t] = zT[:, t] @ U for upper-triangular U (Dp, Dp), Dp % 4 == 0.

    Y is a (4, tile) scratch (see :func:`_maha_upper`).
    """
    dp = zT.shape[0]
    for jb in range(0, dp, 4):
        accumulate_columns(zT, nb, U, jb, jb, Y, 0)
        u00 = U[jb, jb]
        u01 = U[jb, jb + 1]
        u02 = U[jb, jb + 2]
        u03 = U[jb, jb + 3]
        u11 = U[jb + 1, jb + 1]
        u12 = U[jb + 1, jb + 2]
        u13 = U[jb + 1, jb + 3]
        u22 = U[jb + 2, jb + 2]
        u23 = U[jb + 2, jb + 3]
        u33 = U[jb + 3, jb + 3]
        for t in range(nb):
            v0 = zT[jb, t]
            v1 = zT[jb + 1, t]
            v2 = zT[jb + 2, t]
            v3 = zT[jb + 3, t]
            yT[jb, t] = Y[0, t] + u00 * v0
            yT[jb + 1, t] = Y[1, t] + (u01 * v0 + u11 * v1)
            yT[jb + 2, t] = Y[2, t] + ((u02 * v0 + u12 * v1) + u22 * v2)
            yT[jb + 3, t] = Y[3, t] + ((u03 * v0 + u13 * v1) + (u23 * v2 + u33 * v3))


@numba.njit(**_jit)
def _sq_dist_pair(xT, nb, centers, scale, k0, k1, dist):
    """dist[k, t] = sum_i ((xT[i, t] - centers[k, i]) * scale[k, i])^2 for the
    two components k = k0, k1 (k0 != k1): each loaded x value serves both.
    ``scale`` is None for plain squared distances.  D must be even.

    Plain distances take features in fours when D allows: a subtraction and a
    multiply-add per (feature, component, row), and dist loaded and stored once
    per four features, so neither the adders nor the store port limit the
    loop (1.2-1.3x over pairs in float64).  Scaled distances need a multiply
    more per term and are bound by the multiply-add units either way.
    """
    prefer_wide_vectors()
    for t in range(nb):
        dist[k0, t] = 0.0
        dist[k1, t] = 0.0
    dp = xT.shape[0]
    step = 4 if scale is None and dp % 4 == 0 else 2
    for i in range(0, dp, step):
        m00 = centers[k0, i]
        m01 = centers[k0, i + 1]
        m10 = centers[k1, i]
        m11 = centers[k1, i + 1]
        if step == 4:
            m02 = centers[k0, i + 2]
            m03 = centers[k0, i + 3]
            m12 = centers[k1, i + 2]
            m13 = centers[k1, i + 3]
            for t in range(nb):
                x0 = xT[i, t]
                x1 = xT[i + 1, t]
                x2 = xT[i + 2, t]
                x3 = xT[i + 3, t]
                a0 = x0 - m00
                a1 = x1 - m01
                a2 = x2 - m02
                a3 = x3 - m03
                b0 = x0 - m10
                b1 = x1 - m11
                b2 = x2 - m12
                b3 = x3 - m13
                dist[k0, t] += (a0 * a0 + a1 * a1) + (a2 * a2 + a3 * a3)
                dist[k1, t] += (b0 * b0 + b1 * b1) + (b2 * b2 + b3 * b3)
        elif scale is None:
            for t in range(nb):
                x0 = xT[i, t]
                x1 = xT[i + 1, t]
                a0 = x0 - m00
                a1 = x1 - m01
                b0 = x0 - m10
                b1 = x1 - m11
                dist[k0, t] += a0 * a0 + a1 * a1
                dist[k1, t] += b0 * b0 + b1 * b1
        else:
            s00 = scale[k0, i]
            s01 = scale[k0, i + 1]
            s10 = scale[k1, i]
            s11 = scale[k1, i + 1]
            for t in range(nb):
                x0 = xT[i, t]
                x1 = xT[i + 1, t]
                a0 = (x0 - m00) * s00
                a1 = (x1 - m01) * s01
                b0 = (x0 - m10) * s10
                b1 = (x1 - m11) * s11
                dist[k0, t] += a0 * a0 + a1 * a1
                dist[k1, t] += b0 * b0 + b1 * b1


@numba.njit(inline="always", **_jit)
def _add_sq_diff4(s, x, m):
    """s + sum_j (x[j] - m[j])^2 over four values, added one term at a time."""
    v = x[0] - m[0]
    s = s + v * v
    v = x[1] - m[1]
    s += v * v
    v = x[2] - m[2]
    s += v * v
    v = x[3] - m[3]
    return s + v * v


@numba.njit(**_jit)
def _sq_dist_quad(xT, nb, centers, k0, dist):
    """Plain squared distances of four components k0..k0+3 (Dp % 4 == 0): each
    loaded x value serves four.

    Per four features and row: four loads of x, sixteen subtractions and
    sixteen multiply-adds, four loads and stores of ``dist``; half the loop
    set-ups of :func:`_sq_dist_pair`.  Used in float64, where it ran 1.15-1.25x
    faster than pairs in cache (in float32 it was slower).
    """
    prefer_wide_vectors()
    for k in range(k0, k0 + 4):
        for t in range(nb):
            dist[k, t] = 0.0
    for i in range(0, xT.shape[0], 4):
        a = (centers[k0, i], centers[k0, i + 1], centers[k0, i + 2], centers[k0, i + 3])
        b = (centers[k0 + 1, i], centers[k0 + 1, i + 1], centers[k0 + 1, i + 2],
             centers[k0 + 1, i + 3])
        c = (centers[k0 + 2, i], centers[k0 + 2, i + 1], centers[k0 + 2, i + 2],
             centers[k0 + 2, i + 3])
        e = (centers[k0 + 3, i], centers[k0 + 3, i + 1], centers[k0 + 3, i + 2],
             centers[k0 + 3, i + 3])
        for t in range(nb):
            x = (xT[i, t], xT[i + 1, t], xT[i + 2, t], xT[i + 3, t])
            dist[k0, t] = _add_sq_diff4(dist[k0, t], x, a)
            dist[k0 + 1, t] = _add_sq_diff4(dist[k0 + 1, t], x, b)
            dist[k0 + 2, t] = _add_sq_diff4(dist[k0 + 2, t], x, c)
            dist[k0 + 3, t] = _add_sq_diff4(dist[k0 + 3, t], x, e)


@numba.njit(**_jit)
def _sq_dist_one(xT, nb, centers, scale, k, dist):
    """One component of :func:`_sq_dist_pair` (any D)."""
    prefer_wide_vectors()
    for t in range(nb):
        dist[k, t] = 0.0
    for i in range(xT.shape[0]):
        m = centers[k, i]
        if scale is None:
            for t in range(nb):
                a = xT[i, t] - m
                dist[k, t] += a * a
        else:
            s = scale[k, i]
            for t in range(nb):
                a = (xT[i, t] - m) * s
                dist[k, t] += a * a


@numba.njit(**_jit)
def scaled_sq_dist_tile(xT, nb, centers, scale, dist):
    """dist[k, t] = sum_i ((xT[i, t] - centers[k, i]) * scale[k, i])^2.

    Differences are taken directly (no x.x - 2 x.c + c.c expansion).
    Components go in pairs (see :func:`_sq_dist_pair`), plain float64
    distances in fours first (:func:`_sq_dist_quad`); an odd D falls back to
    one component at a time.

    Parameters
    ----------
    xT : ndarray (D, tile)
    nb : int, rows of the tile in use
    centers : ndarray (K, D), same dtype as xT
    scale : ndarray (K, D) or None (plain squared distances)
    dist : ndarray (K, tile), written
    """
    n_comp = centers.shape[0]
    k0 = np.intp(0)  # not a literal 0: the helpers compile for int64 only
    if scale is None and xT.shape[0] % 4 == 0 and xT.itemsize == 8:
        while k0 + 4 <= n_comp:
            _sq_dist_quad(xT, nb, centers, k0, dist)
            k0 += 4
    if xT.shape[0] % 2 == 0:
        while k0 + 2 <= n_comp:
            _sq_dist_pair(xT, nb, centers, scale, k0, k0 + 1, dist)
            k0 += 2
    while k0 < n_comp:
        _sq_dist_one(xT, nb, centers, scale, k0, dist)
        k0 += 1


@numba.njit(**_jit)
def sq_dist_tile(xT, nb, centers, dist):
    """dist[k, t] = || xT[:, t] - centers[k] ||^2 (see :func:`scaled_sq_dist_tile`)."""
    scaled_sq_dist_tile(xT, nb, centers, None, dist)


@numba.njit(inline="always", **_jit)
def log_prob_tile(cov, xT, nb, means, prec, const, shift, offsets, diffT, Y, dist, logp,
                  mx, want_max):
    """Log-densities of one tile: logp[k, t] = log N(x_t | mu_k, Sigma_k).

    Parameters
    ----------
    cov : int
        Covariance code (FULL, TIED, DIAG, SPHERICAL).
    xT : ndarray (Dp, tile)
        The tile, transposed, with rows D..Dp-1 zero (Dp = D rounded up to a
        multiple of 4; every parameter below is zero-padded the same way).
    nb : int
        Rows of the tile in use.
    means : ndarray (K, Dp)
    prec : ndarray
        (K, Dp, Dp) full, (1, Dp, Dp) tied, (K, 1, Dp) diag, (K, 1, 1) spherical.
    const : ndarray (K,), float64
        Per-component additive constant (log-normaliser, plus log-weight in
        the E-step).
    shift, offsets : ndarray (Dp,) and (K, Dp)
        'tied' only: the shift c and the transformed offsets (mu_k - c) @ U.
    diffT : ndarray (Dp, tile), scratch ('tied')
    Y : ndarray (4, tile), scratch
    dist : ndarray (K, tile)
        'spherical' only: written with the squared distances ||x_t - mu_k||^2
        (the E-step's second moments reuse them); untouched otherwise.
    logp : ndarray (K, tile)
        Written.
    mx : ndarray (tile,)
        With ``want_max``, 'diag' and 'spherical' write each row's max of
        ``logp`` over the components here ('spherical' in the pass that forms
        ``logp``, 'diag' right after it; the E-step's sparse path starts from
        it); otherwise untouched.
    want_max : bool

    Notes
    -----
    'tied' shifts ``xT`` in place by ``shift`` (the E-step's tied statistics
    are taken around that shift).  Inlined into its callers at Numba's level:
    where ``cov`` is a constant there, only its branch is compiled.
    """
    prefer_wide_vectors()
    n_comp = means.shape[0]
    d = xT.shape[0]
    if cov == FULL:
        for k in range(n_comp):
            _maha_upper(xT, nb, means[k], prec[k], logp[k], Y)
    elif cov == TIED:
        for i in range(d):
            c = shift[i]
            for t in range(nb):
                xT[i, t] -= c
        _transform_upper(xT, nb, prec[0], diffT, Y)
        sq_dist_tile(diffT, nb, offsets, logp)
    elif cov == DIAG:
        scaled_sq_dist_tile(xT, nb, means, prec[:, 0, :], logp)
    else:  # one pass from the distances to the log-densities (and row maxima)
        sq_dist_tile(xT, nb, means, dist)
        if want_max:
            for t in range(nb):
                mx[t] = -np.inf
        for k in range(n_comp):
            p2 = prec[k, 0, 0] * prec[k, 0, 0]
            c = const[k]
            if want_max:
                for t in range(nb):
                    v = logp.dtype.type(c - 0.5 * (p2 * dist[k, t]))
                    logp[k, t] = v
                    mx[t] = max(mx[t], v)
            else:
                for t in range(nb):
                    logp[k, t] = c - 0.5 * (p2 * dist[k, t])
        return
    for k in range(n_comp):
        c = const[k]
        for t in range(nb):
            logp[k, t] = c - 0.5 * logp[k, t]
    if cov == DIAG and want_max:  # (in the loop above, the diag E-step ran 3-13% slower)
        row_max(logp, nb, mx)


def _gaussian_log_prob_runs_of(cov):
    """The span kernel of covariance code ``cov``: the log-densities of the rows
    of runs b0 <= b < b1 of tiles, into ``out``, with the code a compile-time
    constant (a closure variable), so only that type's branches compile.  The
    run loop is the closure itself, not a body inlined into it, as the E-step's
    (:func:`fastlvm.kernels.estep_stats._numba._estep_runs_of`)."""
    def runs(X, means, prec, const, shift, offsets, tile, run, out, b0, b1):
        n = X.shape[0]
        n_comp, dp = means.shape
        # scratch, reused tile after tile through the span
        xT = new_tile(X, dp, tile)
        diffT = np.empty((dp, tile), dtype=X.dtype)
        Y = np.empty((4, tile), dtype=X.dtype)
        logp = np.empty((n_comp, tile), dtype=X.dtype)
        dist = np.empty((n_comp if cov == SPHERICAL else 1, tile), dtype=X.dtype)
        for b in range(b0, b1):  # runs of tiles
            for r0 in range(b * run * tile, min(n, (b + 1) * run * tile), tile):
                nb = min(tile, n - r0)
                load_tile_transposed(X, r0, nb, xT)
                log_prob_tile(cov, xT, nb, means, prec, const, shift, offsets, diffT, Y, dist,
                              logp, dist[0], False)
                for t in range(nb):
                    for k in range(n_comp):
                        out[r0 + t, k] = logp[k, t]
    return named_span_kernel(runs, f"log_prob_runs_{COVARIANCE_TYPES[cov]}")


LOG_PROB_RUNS = {code: _gaussian_log_prob_runs_of(code)
                 for code in (FULL, TIED, DIAG, SPHERICAL)}


def gaussian_tile_rows(cov, dp, n_comp, itemsize):
    """Rows per tile of the Gaussian kernels (log-densities and the fused E-step).

    'full' and 'tied' take :func:`fastlvm._config.tile_rows`' tiles (48 KiB of
    X): their D^2 work per row (and component, for 'full') rereads the tile,
    and longer tiles did not pay (paired EM iterations on a 2-core Zen 5:
    'tied' float64 at D = 32 5% slower on 624 rows than on 192, 9% faster at
    D = 128; 'full' at D = 16 1024 rows 5-15% slower than 384).  'diag' and
    'spherical' do O(D) work per row and component, then more loops over the
    tile's rows per component (the E-step's exponentials, masks and moments;
    the log-densities' copy out): :func:`fastlvm._config.distance_tile_rows`'
    longer tiles.
    """
    from fastlvm._config import distance_tile_rows, tile_rows

    if cov in (DIAG, SPHERICAL):
        return distance_tile_rows(dp, itemsize, n_comp)
    return tile_rows(dp, itemsize)


def _zero_pad(a, dp, axes):
    """Zero-pad the given axes of ``a`` to length ``dp`` (a new array).

    A zeros block and one slice copy: ``np.pad`` did the same in about 12 us a
    call, a sixth of a small E-step call's fixed cost (four pads per call).
    """
    shape = tuple(dp if ax in axes else n for ax, n in enumerate(a.shape))
    out = np.zeros(shape, dtype=a.dtype)
    out[tuple(slice(0, n) for n in a.shape)] = a
    return out


def prepare_params(means, precisions_cholesky, covariance_type, dtype, weights=None):
    """Pack sklearn-shaped parameters into the kernels' uniform, padded layout.

    Feature axes are zero-padded to Dp = :func:`padded_features` (D) so the
    register-blocked loops need no remainder code; padded features contribute
    exactly zero everywhere.

    Parameters
    ----------
    means : ndarray (K, D)
    precisions_cholesky : ndarray, sklearn's shape for ``covariance_type``
    covariance_type : str
    dtype : numpy dtype of the data (the compute dtype)
    weights : ndarray (K,) or None
        'tied' only: mixture weights for the shift, the weighted mean of the
        means (else their plain mean).  Weighting keeps a near-empty component
        parked far from the data (one that caught a lone outlier) from dragging
        the shift away from the rows, where float32 x - c would lose digits.

    Returns
    -------
    means_c : ndarray (K, Dp), ``dtype``
    prec : ndarray, 3-D, ``dtype`` (see :func:`log_prob_tile`)
    const : ndarray (K,), float64 log-normalisers
    shift : ndarray (Dp,), ``dtype`` ('tied': the (weighted) mean of the means)
    offsets : ndarray (K, Dp), ``dtype`` ('tied': (mu_k - shift) @ U)
    cov : int covariance code
    """
    from .._covariance import COVARIANCE_CODE

    means64 = np.asarray(means, dtype=np.float64)
    pc64 = np.asarray(precisions_cholesky, dtype=np.float64)
    n_comp, d = means64.shape
    dp = padded_features(d)
    cov = COVARIANCE_CODE[covariance_type]
    const = log_normaliser(pc64, covariance_type, n_comp, d)
    shift = np.zeros(d)
    offsets = np.zeros((n_comp, d))
    if cov == FULL:
        prec = _zero_pad(pc64, dp, (1, 2))
    elif cov == TIED:
        prec = _zero_pad(pc64, dp, (0, 1))[None, :, :]
        # the shift as the kernel will see it (rounded to the data dtype)
        w = None if weights is None else np.asarray(weights, dtype=np.float64)
        if w is None or not np.isfinite(w).all() or w.sum() <= 0:
            w = np.ones(n_comp)
        shift = (w @ means64 / w.sum()).astype(dtype).astype(np.float64)
        offsets = (means64.astype(dtype).astype(np.float64) - shift) @ pc64
    elif cov == DIAG:
        prec = _zero_pad(pc64, dp, (1,))[:, None, :]
    else:
        prec = pc64[:, None, None]
    return (np.ascontiguousarray(_zero_pad(means64, dp, (1,)), dtype=dtype),
            np.ascontiguousarray(prec, dtype=dtype), np.ascontiguousarray(const),
            _zero_pad(shift, dp, (0,)).astype(dtype),
            np.ascontiguousarray(_zero_pad(offsets, dp, (1,)), dtype=dtype), cov)


def gaussian_log_prob_numba(X, means, precisions_cholesky, covariance_type):
    """Numba backend of :func:`fastlvm.kernels.gaussian_log_prob` (inputs checked)."""
    X = read_only(X)
    means_c, prec, const, shift, offsets, cov = prepare_params(
        means, precisions_cholesky, covariance_type, X.dtype)
    out = np.empty((X.shape[0], means_c.shape[0]), dtype=X.dtype)
    if X.shape[0]:
        n_comp, dp = means_c.shape
        tile = gaussian_tile_rows(cov, dp, n_comp, X.dtype.itemsize)
        run = tiles_per_run(X.shape[0], tile)
        n_runs = run_count(X.shape[0], tile, run)
        run_spans(LOG_PROB_RUNS[cov], n_runs, X, means_c, prec, const, shift,
                  offsets, tile, run, out)
    return out
