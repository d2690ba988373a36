"""CuPy ``mppca_stats``: the fused E-step pass of a mixture of PPCA on cupy arrays.

Design: one pass over chunks of rows (``kernels/_cupy_low_rank.py``).  Per chunk
the ``low_rank_log_prob`` kernel writes the weighted log-densities, the whitened
projections u = B_k^T (x - mu_k) and |x - mu_k|^2; ``row_softmax`` turns the
log-densities in place into responsibilities times the sample weights (and
each row's log-normaliser); then, in float64:

- N_k, sum r |c|^2, sum r u and sum r u u^T (one batched product) from those;
- sum r x' and sum r x' u^T from one cuBLAS product x'^T [R, R u] over the
  rows shifted by c0 (the weighted mean of the means), moved to the centres
  mu_k exactly: sum r c u^T = sum r x' u^T - (mu_k - c0) (sum r u)^T.

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
    nk = cupy.zeros(k, dtype=_F64)
    sum_sq = cupy.zeros(k, dtype=_F64)
    sum_u = cupy.zeros((k, q), dtype=_F64)
    u_second = cupy.zeros((k, q, q), dtype=_F64)
    moments = cupy.zeros((d, k * (1 + q)), dtype=_F64)  # x'^T [R, R u]
    step = chunk_rows(p)
    for start in range(0, n, step):
        stop = min(n, start + step)
        m = stop - start
        sw = None if sample_weight is None else sample_weight[start:stop]
        g, u, sq = low_rank_rows(X, p, start, stop, stats=True)
        resp, norm = row_softmax(g, MODE_RESP, out=g, w=sw)
        ll += weighted_sum(norm, sw)
        r = resp.astype(_F64)
        u = u.astype(_F64)
        ru = u * r[:, :, None]
        nk += r.sum(0)
        sum_sq += (r * sq).sum(0, dtype=_F64)
        sum_u += ru.sum(0)
        u_second += cupy.matmul(ru.transpose(1, 2, 0), u.transpose(1, 0, 2))
        xs = X[start:stop].astype(_F64) - c0
        moments += cupy.matmul(xs.T, cupy.concatenate([r, ru.reshape(m, k * q)], axis=1))
    center = p.mu_64
    sum_x = moments[:, :k].T + nk[:, None] * c0
    cross_u = (moments[:, k:].reshape(d, k, q).transpose(1, 0, 2)
               - (center - c0)[:, :, None] * sum_u[:, None, :])
    cross, sum_proj, proj_second = projection_stats(p.chol, cross_u, sum_u, u_second)
    return ((ll if keep_on_device else float(ll)), nk, sum_x, sum_sq, cross, sum_proj,
            proj_second, center)
