"""CuPy building blocks of the mixture-of-PPCA kernels (``mppca_log_prob``,
``mppca_stats``) on cupy arrays.

Design
------
The log-densities come from one CUDA kernel, ``low_rank_log_prob``
(``kernels/_cupy_rows.cu``): one warp per row, components in turn, the
differences c = x - mu_k taken directly, the whitened projections u = B_k^T c
reduced across the warp, and the Woodbury form (|c|^2 - |u|^2) / sigma_k^2 with
the Numba kernel's rule for rows near a component's subspace (recomputed in
double from the explicit residual where the difference cancels).  The
projections are q warp sums per (row, component), not a GEMM: q is small, and a
GEMM would need the (K, m, D) differences in memory.

Rows go through in chunks of m rows (:func:`chunk_rows`), so the (m, K)
log-densities, (m, K, q) projections and the float64 copies the statistics use
stay within ``CHUNK_ELEMENTS``; the statistics are float64 cuBLAS products
(``kernels/mppca_stats/_cupy.py``).  Parameters are built on the device
(float64 linear algebra on K q x q systems), so a fit on the GPU sends nothing
to the host.

Limits: one warp per row wastes lanes below 32 features; the q warp sums per
(row, component) make the kernel's cost grow as K q (D / 32 + 5).
"""

import cupy
import numpy as np

from ._cupy_gaussian import element_strides, launch_rows
from ._low_rank import inverse_cholesky, log_norm_constants, low_rank_factors

CHUNK_ELEMENTS = 1 << 25  # scratch elements per chunk (128 MiB in float32)

# recompute an entry from the explicit residual where |c|^2 - |u|^2 keeps less
# than this fraction of |c|^2 (the Numba kernel's CANCELLATION_LIMIT)
EXACT_PATH_BELOW = {np.dtype(np.float32): 2.0**-6, np.dtype(np.float64): 2.0**-12}


class LowRankParams:
    """A mixture of PPCA's parameters on the device, as the kernel takes them.

    Attributes
    ----------
    mu : cupy.ndarray (K, D), the means in X's dtype (the centres as applied)
    bt : cupy.ndarray (K, q, D), X's dtype: B_k^T = L_k^{-1} W_k
    inv_noise, const : cupy.ndarray (K,), X's dtype: 1 / sigma_k^2 and
        -0.5 (D log 2 pi + log det C_k) (+ log w_k when weights are given)
    bt64, lt64, inv_noise64, const64 : float64 copies for the exact path;
        lt64 (K, q, q) = L_k^{-T}
    cancel : float, the exact path's threshold
    mu_64 : cupy.ndarray (K, D) float64, ``mu`` exactly
    chol : cupy.ndarray (K, q, q) float64, L_k
    """

    def __init__(self, dtype, means, components, noise_variance, log_weights=None):
        f64 = cupy.float64
        dtype = np.dtype(dtype)
        w = cupy.asarray(components, dtype=f64)
        s2 = cupy.asarray(noise_variance, dtype=f64)
        k, q, d = w.shape
        chol, log_det, whitened = low_rank_factors(w, s2)
        const = log_norm_constants(log_det, d)
        if log_weights is not None:
            const = const + cupy.asarray(log_weights, dtype=f64)

        def device(a, dt=dtype):
            return cupy.ascontiguousarray(cupy.asarray(a, dtype=dt))

        self.n_components, self.n_latent, self.n_features = k, q, d
        self.mu = device(means)
        self.mu_64 = self.mu.astype(f64)
        self.chol = chol
        self.bt64 = device(whitened.swapaxes(1, 2), f64)
        self.lt64 = device(inverse_cholesky(chol).swapaxes(1, 2), f64)
        self.inv_noise64, self.const64 = device(1.0 / s2, f64), device(const, f64)
        self.bt, self.inv_noise, self.const = (device(a) for a in (self.bt64, self.inv_noise64,
                                                                   self.const64))
        self.cancel = EXACT_PATH_BELOW[dtype]


def chunk_rows(params):
    """Rows per chunk: the statistics' scratch (in X's dtype and float64) stays
    within CHUNK_ELEMENTS elements."""
    k, q, d = params.n_components, params.n_latent, params.n_features
    width = k * (2 + q) + 2 * (q + d + k * (2 + 2 * q))
    return max(1, CHUNK_ELEMENTS // width)


def low_rank_rows(X, params, start, stop, out=None, stats=False):
    """The kernel on rows start..stop of X.

    Parameters
    ----------
    X : cupy.ndarray (n, D), float32/float64, any strides
    params : LowRankParams
    start, stop : int
    out : cupy.ndarray (stop - start, K), C order, optional
    stats : bool
        Also return the projections and squared distances.

    Returns
    -------
    log_prob : cupy.ndarray (m, K), const_k + log N(x | mu_k, C_k)
    u : cupy.ndarray (m, K, q) or None, the whitened projections B_k^T (x - mu_k)
    sq : cupy.ndarray (m, K) or None, |x - mu_k|^2
    """
    p, dt, m = params, X.dtype, stop - start
    k, q, d = p.n_components, p.n_latent, p.n_features
    out = cupy.empty((m, k), dtype=dt) if out is None else out
    u = cupy.empty((m, k, q), dtype=dt) if stats else None
    sq = cupy.empty((m, k), dtype=dt) if stats else None
    scratch = cupy.empty((m, q), dtype=cupy.float64)
    rows = X[start:stop]
    i64 = np.int64
    launch_rows("low_rank_log_prob", dt, m, (
        rows, *element_strides(rows), p.mu, p.bt, p.inv_noise, p.const, p.bt64, p.lt64,
        p.inv_noise64, p.const64, float(p.cancel), out, out if u is None else u,
        out if sq is None else sq, scratch, i64(m), i64(d), i64(k), i64(q), i64(stats)))
    return out, u, sq
