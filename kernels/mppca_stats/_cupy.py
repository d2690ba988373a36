"""CuPy ``mppca_stats``: the fused E-step pass of a mixture of PPCA on cupy arrays.

Design: one pass over chunks of rows (``kernels/_cupy_low_rank.py``).  Per chunk
the ``low_rank_log_prob`` kernel writes the weighted log-densities, the whitened
projections u = B_k^T (x - mu_k) and |x - mu_k|^2; ``row_softmax`` turns the
log-densities in place into responsibilities times the sample weights (and
each row's log-normaliser); then, in float64:

- N_k, sum r |c|^2, sum r u, sum r x' and sum r x' u^T from one cuBLAS product
  [1, x']^T [R, R |c|^2, R u] over the rows shifted by c0 (the weighted mean of
  the means), moved to the centres mu_k exactly:
  sum r c u^T = sum r x' u^T - (mu_k - c0) (sum r u)^T;
- sum r u u^T as the K diagonal q x q blocks of one (K q x K q) product
  (R u)^T U.  Every sum over rows is a product: CuPy's reductions over the rows
  of tall, narrow arrays and cuBLAS's batch of K long (q x m)(m x q) products
  each ran on a handful of blocks (together 85% of an 81 ms E-step at N=1M,
  D=64, K=16, q=4 on an H200).

Those products run in float64 because sum r c u^T is found by that subtraction:
in float64 it keeps ~1e-16 (|mu_k - c0| / spread) of its digits, where float32
would lose the spread of a distant component.  Only the chunk's (m, K) and
(m, K, q) arrays are held; chunk partials are added in float64 in chunk order
(no atomics: reproducible on one device).  The u-statistics are mapped to the
projections y = L_k u at the end, as the other backends do.  Statistics are
centred on the means rounded to the data's dtype (``center``).
"""

import cupy
import numpy as np

from .._cupy_gaussian import MODE_RESP, row_softmax, weighted_sum
from .._cupy_low_rank import LowRankParams, chunk_rows, low_rank_rows
from .._expanded_gaussian import shift_weights
from .._low_rank import projection_stats

_F64 = cupy.float64
# up to this K, sum r u u^T is one (K q x K q) product (K times the operations
# of the K products it replaces, but a shape cuBLAS fills the device with)
BLOCK_DIAGONAL_MAX_K = 64


def mppca_stats_cupy(X, weights, means, components, noise_variance, sample_weight=None, *,
                     keep_on_device=False):
    """CuPy mixture-of-PPCA E-step statistics (see :func:`fastlvm.kernels.mppca_stats`).

    Parameters
    ----------
    X : cupy.ndarray of shape (n, D), float32/float64
    weights : ndarray or cupy.ndarray (K,)
    means : ndarray or cupy.ndarray (K, D)
    components : ndarray or cupy.ndarray (K, q, D)
    noise_variance : ndarray or cupy.ndarray (K,)
    sample_weight : cupy.ndarray (n,) of X's dtype, or None
    keep_on_device : bool, default=False
        Return the log-likelihood as a 0-d device array instead of a float.

    Returns
    -------
    (log_likelihood, nk, sum_x, sum_sq, cross, sum_proj, proj_second, center):
    a Python float (or 0-d array) and float64 cupy arrays on X's device.
    """
    with np.errstate(divide="ignore"):
        log_w = cupy.log(cupy.asarray(weights, dtype=_F64))
    p = LowRankParams(X.dtype, means, components, noise_variance, log_w)
    k, q, d, n = p.n_components, p.n_latent, p.n_features, X.shape[0]
    c0 = (shift_weights(log_w, cupy)[:, None] * p.mu_64).sum(0)
    ll = cupy.zeros((), dtype=_F64)
    # [1, x']^T [R, R |c|^2, R u]: row 0 holds N_k, sum r |c|^2 and sum r u,
    # the rest sum r x' and sum r x' u^T (the middle block is not used)
    moments = cupy.zeros((1 + d, k * (2 + q)), dtype=_F64)
    u_second = cupy.zeros((k, q, q), dtype=_F64)
    diagonal = cupy.arange(k)
    step = chunk_rows(p)
    for start in range(0, n, step):
        stop = min(n, start + step)
        sw = None if sample_weight is None else sample_weight[start:stop]
        _add_chunk(X, p, start, stop, sw, c0, ll, moments, u_second, diagonal)
    nk, sum_sq = moments[0, :k], moments[0, k:2 * k]
    sum_u = moments[0, 2 * k:].reshape(k, q)
    mom_x, mom_xu = moments[1:, :k], moments[1:, 2 * k:]
    center = p.mu_64
    sum_x = mom_x.T + nk[:, None] * c0
    cross_u = (mom_xu.reshape(d, k, q).transpose(1, 0, 2)
               - (center - c0)[:, :, None] * sum_u[:, None, :])
    cross, sum_proj, proj_second = projection_stats(p.chol, cross_u, sum_u, u_second)
    return ((ll if keep_on_device else float(ll)), nk, sum_x, sum_sq, cross, sum_proj,
            proj_second, center)


def _add_chunk(X, p, start, stop, sw, c0, ll, moments, u_second, diagonal):
    """Add rows start:stop's sums into ll, moments and u_second (in place).  The
    chunk's scratch dies with this call, so the pool has it back before the next
    chunk allocates its own."""
    k, q, d, m = p.n_components, p.n_latent, p.n_features, stop - start
    g, u, sq = low_rank_rows(X, p, start, stop, stats=True)
    resp, norm = row_softmax(g, MODE_RESP, out=g, w=sw)
    ll += weighted_sum(norm, sw)
    r = resp.astype(_F64)
    u = u.astype(_F64)  # (m, K, q)
    ru = u * r[:, :, None]
    ones_xs = cupy.empty((m, 1 + d), dtype=_F64)
    ones_xs[:, 0] = 1.0
    cupy.subtract(X[start:stop], c0, out=ones_xs[:, 1:])
    moments += cupy.matmul(ones_xs.T,
                           cupy.concatenate([r, r * sq, ru.reshape(m, k * q)], axis=1))
    if k <= BLOCK_DIAGONAL_MAX_K:  # the diagonal blocks of one (R u)^T U product
        full = cupy.matmul(ru.reshape(m, k * q).T, u.reshape(m, k * q))
        u_second += full.reshape(k, q, k, q)[diagonal, :, diagonal, :]
    else:  # K products: enough blocks, and K times fewer operations
        u_second += cupy.matmul(ru.transpose(1, 2, 0), u.transpose(1, 0, 2))
