# Numba CPU kernel for mppca_log_prob: log-densities of a mixture of PPCA.
#
# Design: per tile of rows, transposed into a (Dp, tile) scratch, and per
# component: one register-blocked pass per four latent columns
# (``accumulate_columns``) that centres each value c = x - mu_k in a register
# and feeds it to the projection u = B_k^T c with the whitened loadings
# B_k = W_k^T L_k^{-T} (kernels._low_rank) and, in the first pass, to ||c||^2;
# then the Woodbury form
# c^T C^{-1} c = (||c||^2 - ||u||^2) / sigma^2.  That is D q + 2 D
# multiply-adds per (row, component), no D x D matrix and no centred copy of
# the tile anywhere (a separate centring pass that stored c and loaded and
# stored ||c||^2 per feature made the log-densities 2x slower).
#
# The difference ||c||^2 - ||u||^2 cancels when a row lies close to the
# component's subspace (small sigma^2): where it keeps less than 1/64 (float32)
# or 1/4096 (float64) of ||c||^2, that (row, component) is recomputed in
# float64 from the explicit residual ||c - B u||^2 / sigma^2 + ||L^{-T} u||^2,
# so no result loses more than those few bits; the slow path costs nothing
# on rows it does not touch.  Features and latent dimensions are zero-padded
# to multiples of 4.  Tiles are 128 KiB, beyond tile_rows' usual 48 KiB: every
# inner loop runs over a tile's rows, and at D=64 a 32 KiB tile held
# only 64 float64 rows, too few to amortise each 2 x 4 register block's set-up;
# at N=1M, D=64, K=16, q=4 the larger tile made an EM iteration 1.3-1.7x
# faster.  Limits: float32/float64.  Tiles are independent (no
# reductions across rows), so the result is deterministic.
import numba
import numpy as np

from .._low_rank import inverse_cholesky, log_norm_constants, low_rank_factors
from .._numba_support import (CACHE, FASTMATH, accumulate_columns, load_tile_transposed, new_tile,
                              padded_features, read_only)
from .._thread_spans import run_spans

_jit = dict(fastmath=FASTMATH, cache=CACHE)

# bytes of one (Dp, tile) data tile of the mixture-of-PPCA kernels (see above)
LOW_RANK_TILE_BYTES = 131072

# keep the fast difference while it retains more than this fraction of ||c||^2
CANCELLATION_LIMIT = {np.dtype(np.float32): 2.0**-6, np.dtype(np.float64): 2.0**-12}


class LowRankTileParams:
    """Parameters of a mixture of PPCA as the tile kernels take them.

    Attributes
    ----------
    means : ndarray (K, Dp), the data's dtype (zero-padded)
    whitened : ndarray (K, Dp, qp), the data's dtype: B_k = W_k^T L_k^{-T}
    inv_noise : ndarray (K,), the data's dtype: 1 / sigma_k^2
    const : ndarray (K,), float64: -0.5 (D log 2 pi + log det C_k)
    whitened64 : ndarray (K, D, q), float64 (the exact path)
    chol_inv_t : ndarray (K, q, q), float64: L_k^{-T} (the exact path)
    inv_noise64 : ndarray (K,), float64
    chol : ndarray (K, q, q), float64: L_k (maps u back to y = L_k u)
    cancel : float, the data's dtype (see the module header)
    """

    def __init__(self, means, components, noise_variance, dtype):
        dtype = np.dtype(dtype)
        chol, log_det, whitened = low_rank_factors(components, noise_variance)
        n_comp, q, d = np.shape(components)
        dp, qp = padded_features(d), padded_features(q)
        self.means = np.zeros((n_comp, dp), dtype=dtype)
        self.means[:, :d] = means
        self.whitened = np.zeros((n_comp, dp, qp), dtype=dtype)
        self.whitened[:, :d, :q] = whitened
        self.inv_noise64 = 1.0 / np.asarray(noise_variance, dtype=np.float64)
        self.inv_noise = self.inv_noise64.astype(dtype)
        self.const = log_norm_constants(log_det, d)
        self.whitened64 = np.ascontiguousarray(whitened)
        self.chol_inv_t = np.ascontiguousarray(inverse_cholesky(chol).swapaxes(1, 2))
        self.chol = chol
        self.cancel = dtype.type(CANCELLATION_LIMIT[dtype])

    def kernel_args(self):
        return (self.means, self.whitened, self.inv_noise, self.whitened64, self.chol_inv_t,
                self.inv_noise64, self.cancel)


@numba.njit(**_jit)
def exact_quad(x, mean, b, lt, inv_noise, c64, u64):
    """c^T C^{-1} c in float64 from the explicit residual, for one row x (D,)."""
    d, q = b.shape
    for i in range(d):
        c64[i] = np.float64(x[i]) - np.float64(mean[i])
    for j in range(q):
        s = 0.0
        for i in range(d):
            s += b[i, j] * c64[i]
        u64[j] = s
    res = 0.0
    for i in range(d):
        r = c64[i]
        for j in range(q):
            r -= b[i, j] * u64[j]
        res += r * r
    zz = 0.0
    for j in range(q):
        z = 0.0
        for i in range(j, q):  # L^{-T} is upper triangular
            z += lt[j, i] * u64[i]
        zz += z * z
    return res * inv_noise + zz


@numba.njit(**_jit)
def component_log_prob(aT, nb, mean, whitened, ck, inv_noise, whitened64, chol_inv_t,
                       inv_noise64, cancel, uk, sqk, lk, c64, u64):
    """One component's log-densities of the first ``nb`` columns of ``aT``.

    Parameters
    ----------
    aT : ndarray (Dp, tile), rows of X transposed (a tile, or rows gathered from one)
    nb : int, columns in use
    mean : ndarray (Dp,), whitened : ndarray (Dp, qp), the data's dtype
    ck : float, added to the log-density
    inv_noise, whitened64 (D, q), chol_inv_t (q, q), inv_noise64, cancel
        The component's entries of :meth:`LowRankTileParams.kernel_args`.
    uk : ndarray (qp, tile), written: whitened projections u = B^T (x - mu)
    sqk : ndarray (tile,), written: ||x - mu||^2
    lk : ndarray (tile,), written: ck + log N(x | mu, C)
    c64, u64 : ndarray (D,), (q,) float64 scratch of the exact path
    """
    qp = whitened.shape[1]
    dp = aT.shape[0]
    # the first four latent columns also give ||x - mu||^2
    accumulate_columns(aT, nb, whitened, 0, dp, uk, 0, mean, sqk)
    for jb in range(4, qp, 4):
        accumulate_columns(aT, nb, whitened, jb, dp, uk, jb, mean)
    if _woodbury(uk, sqk, nb, ck, inv_noise, cancel, lk):
        for t in range(nb):
            if _cancels(uk, sqk, t, cancel):
                quad = exact_quad(aT[:, t], mean, whitened64, chol_inv_t, inv_noise64, c64, u64)
                lk[t] = ck - 0.5 * quad


@numba.njit(**_jit)
def _woodbury(uk, sqk, nb, ck, inv_noise, cancel, lk):
    """lk[t] = ck - (||c||^2 - ||u||^2) / (2 sigma^2) from the projections
    ``uk`` (qp, tile) and ``sqk`` (tile,); returns how many of the ``nb`` rows
    lose too much to cancellation (see the module header: those the caller
    recomputes by the exact path)."""
    half = uk.dtype.type(0.5)
    zero = uk.dtype.type(0)
    h = half * inv_noise
    # ||u||^2 summed in lk over the latent dimensions, rows innermost so that
    # the loops vectorise (with j innermost they stayed scalar: 5-8x slower)
    for t in range(nb):
        lk[t] = zero
    for j in range(uk.shape[0]):
        for t in range(nb):
            lk[t] += uk[j, t] * uk[j, t]
    n_flagged = 0
    for t in range(nb):
        a = sqk[t]
        diff = a - lk[t]
        lk[t] = ck - h * diff
        n_flagged += diff < cancel * a
    return n_flagged


@numba.njit(**_jit)
def _cancels(uk, sqk, t, cancel):
    """Whether row t's ||c||^2 - ||u||^2 keeps less than ``cancel`` of ||c||^2."""
    uu = uk.dtype.type(0)
    for j in range(uk.shape[0]):
        uu += uk[j, t] * uk[j, t]
    a = sqk[t]
    return a - uu < cancel * a


@numba.njit(inline="always", **_jit)
def component_log_prob_rows(c, nb, whitened_t, ck, inv_noise, whitened64, chol_inv_t,
                            inv_noise64, cancel, uk, sqk, lk, c64, u64, origin):
    """:func:`component_log_prob` for rows already centred on the component's
    mean and laid out as rows, not transposed.

    Each row's projections run along its features (four latent columns and
    ||c||^2 in five running sums, LLVM vectorising the feature loop with its
    reductions); the outputs are the same (qp, tile) and (tile,) arrays, and
    the same Woodbury form and exact path follow.  For the pruned E-step's
    per-component blocks, which are copied from X as rows: a row copy is a
    contiguous one where a transposed copy stores each value alone, and on the
    pruned pass's blocks (a few dozen rows, 64 features, float32) the row
    layout's log-densities and moments also ran faster than the transposed
    ones' (one thread, 1M rows: 106 -> 66 ms for the clean rows' whole pass,
    on a 2-core Xeon whose LLVM target prefers 256-bit vectors).  Each row
    ends in five horizontal sums; compiled for znver4 (512-bit vectors,
    NUMBA_CPU_NAME) on the same machine, the whole hinted pass still ran
    faster with row blocks than with transposed ones (117 against 177 ms in
    float32, 199 against 250 ms in float64).

    Parameters
    ----------
    c : ndarray (>= nb, Dp), rows x - mu, zero feature padding
    nb : int, rows in use
    whitened_t : ndarray (qp, Dp), the data's dtype: B^T (zero-padded)
    ck, inv_noise, whitened64, chol_inv_t, inv_noise64, cancel, uk, sqk, lk, c64, u64
        As :func:`component_log_prob`.
    origin : ndarray (>= D,), zeros: the exact path's mean (the rows are centred
        already), the caller's so that no call allocates it

    Inlined into its callers, the pruned pass's block loops, which call it
    once per block (see ``mppca_stats._numba_pruning._anchored_blocks``).
    """
    qp, dp = whitened_t.shape
    zero = c.dtype.type(0)
    for jb in range(0, qp, 4):
        b0 = whitened_t[jb]
        b1 = whitened_t[jb + 1]
        b2 = whitened_t[jb + 2]
        b3 = whitened_t[jb + 3]
        for t in range(nb):
            x = c[t]
            s0 = zero
            s1 = zero
            s2 = zero
            s3 = zero
            sq = zero
            for i in range(dp):
                v = x[i]
                s0 += v * b0[i]
                s1 += v * b1[i]
                s2 += v * b2[i]
                s3 += v * b3[i]
                sq += v * v
            uk[jb, t] = s0
            uk[jb + 1, t] = s1
            uk[jb + 2, t] = s2
            uk[jb + 3, t] = s3
            if jb == 0:
                sqk[t] = sq
    if _woodbury(uk, sqk, nb, ck, inv_noise, cancel, lk):
        for t in range(nb):
            if _cancels(uk, sqk, t, cancel):
                quad = exact_quad(c[t], origin, whitened64, chol_inv_t, inv_noise64, c64, u64)
                lk[t] = ck - 0.5 * quad


@numba.njit(**_jit)
def low_rank_log_prob_tile(xT, nb, const, means, whitened, inv_noise, whitened64, chol_inv_t,
                           inv_noise64, cancel, uT, sq, logp):
    """Per-component log-densities of a tile of rows.

    Parameters
    ----------
    xT : ndarray (Dp, tile), rows of X transposed (zero-padded features)
    nb : int, columns in use
    const : ndarray (K,) float64, added to each component's log-density
    means, whitened, inv_noise, whitened64, chol_inv_t, inv_noise64, cancel
        :meth:`LowRankTileParams.kernel_args`
    uT : ndarray (K, qp, tile), written: whitened projections u = B_k^T (x - mu_k)
    sq : ndarray (K, tile), written: ||x - mu_k||^2
    logp : ndarray (K, tile), written: const[k] + log N(x | mu_k, C_k)
    """
    c64 = np.empty(whitened64.shape[1])
    u64 = np.empty(whitened64.shape[2])
    for k in range(means.shape[0]):
        component_log_prob(xT, nb, means[k], whitened[k], const[k], inv_noise[k],
                           whitened64[k], chol_inv_t[k], inv_noise64[k], cancel, uT[k], sq[k],
                           logp[k], c64, u64)


@numba.njit(nogil=True, **_jit)
def _mppca_log_prob_tiles(X, const, means, whitened, inv_noise, whitened64, chol_inv_t,
                          inv_noise64, cancel, tile, out, b0, b1):
    """The log-densities of the rows of tiles b0 <= b < b1, into ``out``."""
    n = X.shape[0]
    n_comp, dp = means.shape
    qp = whitened.shape[2]
    # scratch, reused tile after tile through the span
    xT = new_tile(X, dp, tile)
    uT = np.empty((n_comp, qp, tile), dtype=X.dtype)
    sq = np.empty((n_comp, tile), dtype=X.dtype)
    logp = np.empty((n_comp, tile), dtype=X.dtype)
    for b in range(b0, b1):
        r0 = b * tile
        nb = min(tile, n - r0)
        load_tile_transposed(X, r0, nb, xT)
        low_rank_log_prob_tile(xT, nb, const, means, whitened, inv_noise, whitened64,
                               chol_inv_t, inv_noise64, cancel, uT, sq, logp)
        for t in range(nb):
            for k in range(n_comp):
                out[r0 + t, k] = logp[k, t]


def mppca_log_prob_numba(X, means, components, noise_variance):
    """Numba backend of :func:`fastlvm.kernels.mppca_log_prob` (inputs checked)."""
    from fastlvm._config import tile_rows

    X = read_only(X)
    params = LowRankTileParams(means, components, noise_variance, X.dtype)
    out = np.empty((X.shape[0], means.shape[0]), dtype=X.dtype)
    if X.shape[0]:
        tile = tile_rows(params.means.shape[1], X.dtype.itemsize, LOW_RANK_TILE_BYTES)
        run_spans(_mppca_log_prob_tiles, -(-X.shape[0] // tile), X, params.const,
                  *params.kernel_args(), tile, out)
    return out
