"""CuPy ``estep_stats``: the fused E-step on cupy arrays.

Design: with few components (K <= 64, and a tile that fits the kernels' shared
memory: :func:`fastlvm.kernels.estep_stats._cupy_tiles.tile_plan`) the E-step is
one CUDA kernel over tiles of rows (two for 'full'), ``_cupy_tiles.py``, unless
float32 rows are computed in float64 (``ExpandedParams.dtype``: means far apart),
which take the chunks below, each converted as it is shifted.
Otherwise it is one pass over chunks of rows (``kernels/_cupy_gaussian.py``).  Per
chunk, cuBLAS forms the log-density tile, ``row_softmax`` turns it in place
into responsibilities times the sample weights (writing each row's
log-normaliser), and cuBLAS products give the moments:

- sum r x' = R^T x' and N_k = R^T 1 for every type, in one product with the
  second moments of 'spherical' (R^T [x', |x'|^2, 1]) and 'diag'
  (R^T [x', x' * x', 1]): R is read once;
- 'tied': x'^T W x' (needs no responsibilities);  'full': (R_k Z_k)^T Z_k with
  Z_k = x' - mu'_k, a batch of products over slabs of rows, so the second
  moments are taken around the component means (the first, R^T x' - N_k mu'_k,
  moves there in float64).

Only the chunk's (m, K) tile (and (K, m, D) for 'full') is ever held; the
chunk partials are added in float64 in chunk order (no atomics: the result is
reproducible on one device).  Statistics come out around the centres the
kernel used, as with Triton: c0 for 'tied', 'diag', 'spherical', c0 + mu'_k
for 'full' (:func:`fastlvm.kernels.estep_stats.recenter` moves them).
"""

import cupy
import numpy as np

from .._covariance import second_moment_shape
from .._cupy_gaussian import (MODE_RESP, ChunkParts, ExpandedParams, chunk_rows,
                              moments_product, row_softmax, slab_gram, weighted_sum)
from .._expanded_gaussian import statistics_centers
from ._cupy_tiles import estep_sums_tiles, tile_plan

_F64 = cupy.float64


def estep_stats_cupy(X, weights, means, precisions_cholesky, covariance_type,
                     sample_weight=None, *, keep_on_device=False,
                     compute_in_float64=None):
    """CuPy E-step statistics (see :func:`fastlvm.kernels.estep_stats`).

    Parameters
    ----------
    X : cupy.ndarray of shape (n, D), float32/float64
    weights : ndarray or cupy.ndarray (K,)
    means : ndarray or cupy.ndarray (K, D)
    precisions_cholesky : ndarray or cupy.ndarray, sklearn's shape for ``covariance_type``
    covariance_type : str
    sample_weight : cupy.ndarray (n,) of X's dtype, or None
    keep_on_device : bool, default=False
        Return the log-likelihood as a 0-d device array instead of a float, so
        the call does not wait for the device.
    compute_in_float64 : bool or None
        Whether float32 rows are computed in float64 (:class:`ExpandedParams`);
        None decides from the parameters (``_expanded_gaussian.computes_in_float64``,
        which reads device parameters once: a streamed pass decides once for all
        its chunks).

    Returns
    -------
    (log_likelihood, nk, sum_x, second_moment, center): a Python float (or a
    0-d array) and float64 cupy arrays on X's device.
    """
    with np.errstate(divide="ignore"):  # a zero weight: log-weight -inf
        log_w = cupy.log(cupy.asarray(weights, dtype=_F64))  # host or device weights
    p = ExpandedParams(X.dtype, means, precisions_cholesky, covariance_type, log_w,
                       compute_in_float64)
    ll, nk, s1, s2 = estep_sums(X, p, sample_weight)
    center = centers(p)
    if center.ndim == 1:
        center = cupy.tile(center, (p.n_components, 1))
    sum_x = s1 + nk[:, None] * center
    return (ll if keep_on_device else float(ll)), nk, sum_x, s2, center


def centers(params):
    """The centres of :func:`estep_sums`' statistics (``statistics_centers``)."""
    return statistics_centers(params.c0_64, params.mu_64, params.covariance_type)


def estep_sums(X, params, sample_weight=None):
    """One pass over X's chunks: the E-step's sums around :func:`centers`.

    Parameters
    ----------
    X : cupy.ndarray (n, D)
    params : ExpandedParams, in X's dtype or (float32 X) in float64
    sample_weight : cupy.ndarray (n,) of X's or the compute dtype, or None

    Returns
    -------
    log_likelihood : cupy.ndarray (), float64
    nk : cupy.ndarray (K,), float64
    s1 : cupy.ndarray (K, D), float64, sum_n w_n r_nk (x_n - c_k)
    s2 : cupy.ndarray, float64, the second moments around the centres ('tied':
        sum_n w_n x'_n x'_n^T): (K, D, D) 'full', (D, D) 'tied', (K, D) 'diag',
        (K,) 'spherical'
    """
    p = params
    k, d, n = p.n_components, p.n_features, X.shape[0]
    cov = p.covariance_type
    # few components: the one-kernel E-step, which reads X in the compute dtype
    plan = tile_plan(n, k, d, cov, X.dtype) if X.dtype == p.dtype else None
    if plan is not None:
        return estep_sums_tiles(X, p, plan, sample_weight)
    if sample_weight is not None:
        sample_weight = sample_weight.astype(p.dtype, copy=False)
    ll = cupy.zeros((), dtype=_F64)
    # R^T [x', ..., 1] summed over the chunks: s1, 'diag''s or 'spherical''s s2, N_k
    sums = cupy.zeros((k, d + {"diag": d, "spherical": 1}.get(cov, 0) + 1), dtype=_F64)
    s2 = (cupy.zeros(second_moment_shape(cov, k, d), dtype=_F64) if cov in ("full", "tied")
          else None)  # 'diag''s and 'spherical''s are columns of the sums
    step = chunk_rows(p)
    for start in range(0, n, step):
        stop = min(n, start + step)
        sw = None if sample_weight is None else sample_weight[start:stop]
        _add_chunk(X, p, start, stop, sw, ll, sums, s2)
    nk = cupy.ascontiguousarray(sums[:, -1])
    s1 = cupy.ascontiguousarray(sums[:, :d])
    if cov == "full":  # the chunks added R^T x'; around mu'_k: sum r (x' - mu'_k)
        s1 -= nk[:, None] * p.mu_64
    elif cov == "diag":
        s2 = cupy.ascontiguousarray(sums[:, d:2 * d])
    elif cov == "spherical":
        s2 = cupy.ascontiguousarray(sums[:, d])
    return ll, nk, s1, s2


def _add_chunk(X, p, start, stop, sw, ll, sums, s2):
    """Add rows start:stop's sums into ll, ``sums`` (R^T [x', ..., 1], float64) and, for
    'full' and 'tied', s2 (in place).  The chunk's scratch dies with this call, so
    the pool has it back before the next chunk allocates its own: one tile at a
    time, not two."""
    d, cov = p.n_features, p.covariance_type
    parts = ChunkParts(X, p, start, stop, moments=True)
    resp, norm = row_softmax(parts.g, MODE_RESP, out=parts.g, q=parts.q, s=parts.s, c=parts.c,
                             w=sw)
    ll += weighted_sum(norm, sw)
    rows, rt = parts.rows, resp.T
    # R read once for the first moments, 'diag''s and 'spherical''s second ones and
    # N_k, added in float64
    moments_product(resp, rows, sums)
    if cov == "full":  # moments around mu'_k
        z = parts.extra  # (K, m, D)
        slab_gram(cupy.multiply(z, rt[:, :, None]), z, out=s2)
    elif cov == "tied":  # sum_n w_n x' x'^T (of the whole rows: no copy of a column slice)
        xw = rows if sw is None else rows * sw[:, None]
        s2 += cupy.matmul(xw.T, rows)[:d, :d]
