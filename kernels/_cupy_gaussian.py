"""CuPy building blocks shared by the Gaussian-mixture kernels on cupy arrays.

Design
------
Rows go through in chunks of m rows (:func:`chunk_rows`: m x K elements, at
most ``CHUNK_ELEMENTS``, and K x m x D for 'full', at most FULL_CHUNK_FACTOR
times that), so memory is O(m K + K D^2) and the n x K responsibility matrix is
never stored.  Per chunk:

1. The rows are shifted by one centre c0 (the weighted mean of the means, in
   the compute dtype): x' = x - c0 (``kernels/_expanded_gaussian.py`` has the
   algebra below; float32 rows whose means lie far apart are computed in float64,
   ``ExpandedParams.dtype``, the chunk converted first), by ``shift_rows``
   (CUDA, one read of the chunk, any layout), which also writes 'diag''s
   [x', x' * x'] block and 'spherical''s |x'|^2, and for the E-step statistics
   the moments' columns after them (|x'|^2 for 'spherical', then ones; the
   log-density products meet them with zero rows).
2. The GEMM-shaped part of the log-densities runs on cuBLAS (``cupy.matmul``):
   'spherical': G = x' A^T and q = |x'|^2; 'diag': G = [x', x' * x'] [A, B]^T;
   'tied': G = x' A^T and q = |x' U|^2; 'full': Z_k = x' - mu'_k for all k at
   once (K, m, D), one batched product Z_k U_k and G = c_k - |Z_k U_k|^2 / 2.
   The differences of 'full' are taken directly: nothing is lost to expansion.
3. ``row_softmax`` (CUDA, ``kernels/_cupy_rows.cu``, one warp per row) forms
   L = G + q s_k + c_k and, by mode, writes L, the log-responsibilities, or the
   responsibilities times the row's sample weight (in place over G), and the
   row's log-normaliser.  ``row_sumsq`` gives 'tied''s q = |x' U|^2.
4. The moments are GEMMs again, one product reading R once: R^T [x', 1]
   ('tied', 'full'), R^T [x', |x'|^2, 1] ('spherical'), R^T [x', x' * x', 1]
   ('diag') hold sum r x', the second moments and N_k (summed within the chunk
   in the data's dtype, as the first moments are); then x'^T W x' ('tied') and
   (R_k Z_k)^T Z_k ('full', :func:`slab_gram`).  N_k and R^T |x'|^2 were a
   column sum and a product with a vector of their own, each another read of
   the chunk's largest array.  No sum over rows is CuPy's own reduction, which
   gives each column of a tall, narrow array to one block (1.5 ms for N_k of a
   (300k, 16) chunk on an H200, 75% of the E-step); where a column sum remains
   (the tile kernels' partials) it is ``column_partials`` (CUDA, float64 sums of
   blocks of rows, then of the blocks: :func:`column_sums`).  cuBLAS runs a
   batch of tall, thin products on one block per batch entry (1.2 ms per 'full'
   chunk at K=16, D=32), which :func:`slab_gram` splits.

Sums within a chunk run in the data's dtype (cuBLAS and CuPy reductions, whose
order depends only on the shapes and the device); chunk partials are added in
float64, in chunk order.  No atomics: results are reproducible on one device.
float32 log-density products ('tied', 'diag', 'spherical') run on TF32 tensor
cores at float32 accuracy ('tf32x3', ``kernels/_cupy_tf32.py``, as the Triton
backend's do); the moments' products and 'full''s stay IEEE float32.

Kernels are compiled by NVRTC once per device for float and double
(``kernels/_cupy_source.py``).

The E-step statistics of mixtures with few components do not come here: one
kernel over tiles of rows (``estep_stats/_cupy_tiles.py``) does the whole pass.

Limits: 'full' holds two (K, m, D) scratch arrays, so m shrinks as K D grows
(down to one row per chunk); rows are handed to cuBLAS as they are (any
strides), the kernels take the strides they are given.
"""

import numpy as np
import cupy

from ._cupy_source import CudaSource
from ._cupy_tf32 import dot_precision, product, right_operand
from ._expanded_gaussian import computes_in_float64, expanded_terms, shift_weights

GRAM_TILES = 1024  # 32 x 32 output tiles wanted of slab_gram's batch (a large GPU's fill)
# slabs of rows of a chunk's moments product R^T [x', ..., 1] (:func:`moments_product`):
# 1 is one cuBLAS product, whose output at K = 1024, D = 128 is 1024 x 130, about 160
# of those tiles for a 16k-row reduction; more slabs make a batch (untimed: the flash
# profile of bench/gpu_profile.py times 1, 4 and 16)
MOMENT_SLABS = 1
MODE_LOG_PROB, MODE_LOG_RESP, MODE_RESP, MODE_NORM = range(4)  # modes of row_softmax
# scratch elements per chunk (96 MiB in float32).  Mixtures of few components take the
# tile kernels (estep_stats/_cupy_tiles.py); what comes here is large K, where the
# (m, K) tile is most of an E-step's memory (issue 4's N = 10M, D = 128, K = 1024
# 'spherical' row: about 107 MiB at 128 MiB of scratch, 81 MiB at 96, against
# Triton's 67 MiB) and a chunk's products (~9 GFLOP) still outlast its launches.
CHUNK_ELEMENTS = 3 << 23
# 'full' chunks hold K x m x D twice: at K = 64, D = 128 a budget of 2^25 made
# 2032-row chunks, 492 of 20 array operations each for a million rows, their launches
# a large share of the E-step (434 ms on an H200, Triton's 253 ms).  Small 'full'
# mixtures take the tile kernels; the large ones that come here get four times the
# budget (384 MiB in float32; 6096-row chunks there).
FULL_CHUNK_FACTOR = 4
COLUMN_BLOCK_ROWS = 256  # rows a lane of column_partials adds before its partial is written
ROW_KERNELS = CudaSource("_cupy_rows.cu", ("row_softmax", "row_sumsq", "shift_rows",
                                           "column_partials", "low_rank_log_prob"))


def launch_rows(name, dtype, n_rows, args):
    """One warp per row (``_cupy_rows.cu``'s kernels)."""
    ROW_KERNELS.launch(name, dtype, n_rows, args)


def element_strides(a):
    """Strides of ``a`` in elements (what the kernels take), as int64."""
    return tuple(np.int64(s // a.itemsize) for s in a.strides)


def row_sumsq(y, scale=1.0, offset=None):
    """scale * sum_j y[i, j]^2 for every row of an (n, d) array -> (n,); with
    ``offset`` (G,), y's dtype, row i also adds offset[i // (n // G)] (G equal
    groups of rows)."""
    y = cupy.ascontiguousarray(y)  # no copy when it already is
    n, d = y.shape
    out = cupy.empty(n, dtype=y.dtype)
    i64 = np.int64
    group = max(1, n // offset.shape[0]) if offset is not None else 1
    launch_rows("row_sumsq", y.dtype, n, (y, i64(n), i64(d), np.float64(scale),
                                          y if offset is None else offset, i64(group),
                                          i64(offset is not None), out))
    return out


def shift_rows(X, c0, squares=False, sumsq=False, split=False, q_column=False, ones=False):
    """The shifted rows x' = x - c0 of X (m, D), any strides, in C order.

    Parameters
    ----------
    X : cupy.ndarray (m, D), float32/float64
    c0 : cupy.ndarray (D,), X's dtype, contiguous
    squares : bool
        Follow x' with x' * x' ('diag''s [x', x' * x'] block).
    sumsq : bool
        Also return |x'|^2 per row (m,).
    split : bool
        Also return the shifted rows as a 'tf32x3' left operand (``_cupy_tf32.py``).
    q_column, ones : bool
        Then a column of |x'|^2, and a column of ones: the moments' right operand
        [x', ..., q, 1], whose product with R^T ends in N_k.

    Returns
    -------
    shifted : cupy.ndarray (m, W), W = D (2 D with squares) + q_column + ones
    q : cupy.ndarray (m,) or None
    split : cupy.ndarray (m, 3 W) [hi, hi, lo] of ``shifted``, or None
    """
    m, d = X.shape
    i64 = np.int64
    w = (2 * d if squares else d) + q_column + ones
    out = cupy.empty((m, w), dtype=X.dtype)
    q = cupy.empty(m, dtype=X.dtype) if sumsq else None
    parts = cupy.empty((m, 3 * w), dtype=X.dtype) if split else None
    launch_rows("shift_rows", X.dtype, m, (X, *element_strides(X), c0, i64(m), i64(d),
                                           i64(squares), i64(q_column), i64(ones),
                                           i64(sumsq), i64(split), out,
                                           out if q is None else q,
                                           out if parts is None else parts))
    return out, q, parts


def row_softmax(g, mode, out=None, q=None, s=None, c=None, w=None, norm=None):
    """Row-wise log-sum-exp of L = g + q s^T + c over the K columns.

    Parameters
    ----------
    g : cupy.ndarray (n, K), float32/float64, any strides
    mode : MODE_LOG_PROB | MODE_LOG_RESP | MODE_RESP | MODE_NORM
        What is written to ``out``: L, L - logsumexp(L), w exp(L - logsumexp(L)),
        or nothing.
    out : cupy.ndarray (n, K), any strides, optional (may be ``g`` itself)
    q, s : cupy.ndarray (n,) and (K,), contiguous, g's dtype, optional (together)
    c : cupy.ndarray (K,), optional
    w : cupy.ndarray (n,), optional; row weights for MODE_RESP
    norm : cupy.ndarray (n,), contiguous, optional

    Returns
    -------
    out : cupy.ndarray (n, K) or None (MODE_NORM)
    norm : cupy.ndarray (n,), logsumexp(L) per row (MODE_LOG_PROB: not written)
    """
    n, k = g.shape
    if norm is None:
        norm = cupy.empty(n, dtype=g.dtype)
    if out is None and mode != MODE_NORM:
        out = cupy.empty((n, k), dtype=g.dtype)
    target = g if out is None else out
    i64 = np.int64
    args = (g, *element_strides(g), g if q is None else q, g if s is None else s,
            g if c is None else c, g if w is None else w, target, *element_strides(target),
            norm, i64(n), i64(k), i64(q is not None), i64(c is not None), i64(w is not None),
            i64(mode))
    launch_rows("row_softmax", g.dtype, n, args)
    return out, norm


class ExpandedParams:
    """The coefficients of :func:`expanded_terms` on the device, in the compute dtype.

    Attributes
    ----------
    dtype : numpy dtype, the dtype the kernels compute in: the data's, or
        float64 for float32 rows whose parameters the expanded form would lose
        digits of (:func:`fastlvm.kernels._expanded_gaussian.computes_in_float64`);
        each chunk of float32 rows is then converted as it is shifted
    covariance_type : str
    c0 : cupy.ndarray (D,), the shift
    coef : cupy.ndarray (K, D), or (K, 2 D) [A, B] for 'diag'; 'full': mu'_k
    s : cupy.ndarray (K,) or None, coefficient of q
    c : cupy.ndarray (K,), the constants (log-weights folded in)
    u : cupy.ndarray (D, D) 'tied', (K, D, D) 'full', else None
    c0_64 : cupy.ndarray (D,), float64 value of the shift as applied
    mu_64 : cupy.ndarray (K, D), float64 value of mu'_k as applied ('full'; None for
        the other types when made by :meth:`from_terms`)

    Built on the device from parameters that are cupy arrays already (a fit on
    the GPU: nothing crosses to the host but the compute dtype's decision, one
    read, which callers that made it already skip by passing ``in_float64``)
    or NumPy arrays (copied up once).
    """

    def __init__(self, dtype, means, precisions_cholesky, covariance_type, log_weights=None,
                 in_float64=None):
        f64 = cupy.float64
        means = cupy.asarray(means, dtype=f64)
        pc = cupy.asarray(precisions_cholesky, dtype=f64)
        k, d = means.shape
        log_w = cupy.zeros(k) if log_weights is None else cupy.asarray(log_weights, dtype=f64)
        if in_float64 is None:  # decided on the device: one number read
            in_float64 = computes_in_float64(np.dtype(dtype) == np.float32, log_w, means, pc,
                                             covariance_type)
        dtype = self.dtype = np.dtype(f64 if in_float64 else dtype)
        c0 = (shift_weights(log_w, cupy)[:, None] * means).sum(0).astype(dtype).astype(f64)
        mu = (means - c0).astype(dtype).astype(f64)
        terms = expanded_terms(mu, pc, covariance_type, log_w, cupy)

        def device(a):
            return cupy.ascontiguousarray(cupy.asarray(a, dtype=dtype))

        self.covariance_type = covariance_type
        self.n_components, self.n_features = k, d
        self._operands = {}
        self.c0_64, self.mu_64 = c0, mu
        self.c0 = device(c0)
        self.coef = device(terms.a if terms.b is None
                           else cupy.concatenate([terms.a, terms.b], axis=1))
        self.s = (None if terms.s is None
                  else device(cupy.broadcast_to(cupy.asarray(terms.s, dtype=f64), (k,))))
        self.c = device(terms.c)
        self.u = device(pc) if covariance_type in ("tied", "full") else None

    @classmethod
    def from_terms(cls, covariance_type, c0, coef, s, c, u):
        """Parameters from coefficients already on the device in the data's dtype (the
        fused M-step's, ``kernels/gaussian_mstep/_cupy.py``), with no new launches but
        the float64 copies of the shift and, for 'full', of mu'_k (``mu_64`` is None
        for the other types, whose E-step does not read it)."""
        self = cls.__new__(cls)
        self.covariance_type, self.dtype = covariance_type, c0.dtype
        self.n_components, self.n_features = c.shape[0], c0.shape[0]
        self._operands = {}
        self.c0, self.coef, self.s, self.c, self.u = c0, coef, s, c, u
        self.c0_64 = c0.astype(cupy.float64)
        self.mu_64 = coef.astype(cupy.float64) if covariance_type == "full" else None
        return self

    def forget_operands(self):
        """Drop the cached operands of :meth:`right_operand`: for coefficients
        overwritten in place (``cuda_graph``'s static ones), whose next products
        must take operands made from the new terms."""
        self._operands.clear()

    def right_operand(self, name, precision, rows):
        """coef^T ('coef') or U ('u') as the right operand of the chunks' products at
        ``precision`` (``_cupy_tf32.right_operand``), with zero rows below it up to
        ``rows`` (the width of the chunk's shifted rows), made once per parameters."""
        key = (name, precision, rows)
        if key not in self._operands:
            b = self.coef.T if name == "coef" else self.u
            if rows > b.shape[0]:
                b = cupy.concatenate([b, cupy.zeros((rows - b.shape[0], b.shape[1]),
                                                    dtype=b.dtype)])
            self._operands[key] = right_operand(b, precision)
        return self._operands[key]


def gram_slabs(k, d):
    """Slabs the rows of a 'full' chunk are cut into for :func:`slab_gram`: enough
    that the batch makes ~GRAM_TILES 32 x 32 output tiles (one block each), at
    most 64; 1 where K products of D x D already do (K=16, D=32: 64 slabs;
    K=64, D=128: 1)."""
    tiles = k * (-(-d // 32)) ** 2
    return max(1, min(64, -(-GRAM_TILES // tiles)))


def chunk_rows(params):
    """Rows per chunk: the scratch of one chunk stays within CHUNK_ELEMENTS
    ('full': FULL_CHUNK_FACTOR times that, and a multiple of :func:`gram_slabs`
    where that many fit, so the slabs of every chunk but the last are free views)."""
    k, d = params.n_components, params.n_features
    if params.covariance_type == "full":
        budget = FULL_CHUNK_FACTOR * CHUNK_ELEMENTS
        rows, slabs = budget // (k * (2 * d + 2)), gram_slabs(k, d)
        return max(1, rows - rows % slabs if rows >= slabs else rows)
    width = max(k, 1) + 3 * d + 2  # the tile, the rows and their moments' columns
    if dot_precision(params.coef.dtype) == "tf32x3":  # the rows' [hi, hi, lo] split
        width += 3 * ((2 * d if params.covariance_type == "diag" else d) + 2)
    return max(1, CHUNK_ELEMENTS // width)


def column_sums(a):
    """Sums over the rows of an (m, w) array (any strides), float64 (w,), in a fixed
    order: ``column_partials`` adds blocks of COLUMN_BLOCK_ROWS rows in float64,
    reading the array once in its own dtype, then adds those partials the same way
    in one block (see the module doc for why not ``a.sum(0)``)."""
    m, w = a.shape
    f64, i64 = cupy.float64, np.int64
    groups = -(-w // 32)
    n_blocks = max(1, -(-m // COLUMN_BLOCK_ROWS))
    parts = (cupy.empty if m else cupy.zeros)((n_blocks, w), dtype=f64)  # no rows: zeros
    launch_rows("column_partials", a.dtype, n_blocks * groups,
                (a, *element_strides(a), i64(m), i64(w), i64(COLUMN_BLOCK_ROWS), parts))
    out = cupy.empty((1, w), dtype=f64)
    launch_rows("column_partials", f64, groups,
                (parts, i64(w), i64(1), i64(n_blocks), i64(w), i64(n_blocks), out))
    return out[0]


def moments_product(resp, rows, out, slabs=None):
    """Add a chunk's R^T rows, (K, W), into ``out`` (float64) and return it.

    ``resp`` (m, K) and ``rows`` (m, W) in the compute dtype.  With ``slabs``
    (``MOMENT_SLABS`` by default) of at most 1, or a transposed ``resp`` (the
    'full' chunks'), one product, added in float64; else :func:`slab_gram` over
    that many slabs of rows, summed in float64 in slab order.  Fixed shapes, fixed
    order: the same bits every run on one device, for a given slab count."""
    slabs = MOMENT_SLABS if slabs is None else slabs
    if slabs <= 1 or not resp.flags.c_contiguous:
        out += cupy.matmul(resp.T, rows)
        return out
    slab_gram(resp[None], rows[None], out=out[None], slabs=slabs)
    return out


def slab_gram(a, b, out=None, slabs=None):
    """sum_n a[k, n]^T b[k, n] for a (K, m, Da) and b (K, m, Db): (K, Da, Db), float64,
    added into ``out`` (float64, (K, Da, Db)) when given.

    The rows are cut into ``slabs`` (:func:`gram_slabs` by default) slabs of
    m // slabs rows, whose products run as one batch of K x slabs products (enough
    blocks to fill the device, where K long products can leave most of it idle);
    the slab products, in the data's dtype, are summed in float64 in slab order,
    and the rows past the last full slab are one more batch of K products.  Fixed
    shapes, fixed order: the same bits every run on one device.
    """
    k, m, da = a.shape
    db = b.shape[2]
    slabs = gram_slabs(k, max(da, db)) if slabs is None else slabs
    rows = m // slabs
    head = rows * slabs
    f64 = cupy.float64
    if out is None:
        out = cupy.zeros((k, da, db), dtype=f64)
    if rows:
        pa = a[:, :head].reshape(k * slabs, rows, da)  # a view unless this is a last chunk
        pb = b[:, :head].reshape(k * slabs, rows, db)
        out += cupy.matmul(pa.transpose(0, 2, 1), pb).reshape(k, slabs, da, db).sum(1, dtype=f64)
    if head < m:
        out += cupy.matmul(a[:, head:].transpose(0, 2, 1), b[:, head:]).astype(f64)
    return out


class ChunkParts:
    """The parts of one chunk's log-densities: L = g + q s^T + c (see module doc).

    Attributes
    ----------
    rows : (m, W) the chunk's shifted rows as ``shift_rows`` wrote them: x'
        ([x', x' * x'] for 'diag'), and with ``moments`` then |x'|^2 ('spherical')
        and a column of ones, so R^T rows holds the first moments, 'diag''s and
        'spherical''s second, and N_k (last column) in one product
    g : (m, K) ('full': a transposed view of a (K, m) array, c already added)
    q : (m,) or None
    s, c : (K,) or None
    extra : 'full': Z (K, m, D); else None
    """

    def __init__(self, X, params, start, stop, moments=False):
        p, k, d = params, params.n_components, params.n_features
        cov = p.covariance_type
        precision = dot_precision(p.dtype) if cov != "full" else "ieee"
        chunk = X[start:stop]
        if chunk.dtype != p.dtype:  # float32 rows computed in float64: one chunk at a time
            chunk = chunk.astype(p.dtype)
        # one pass over the chunk's rows (any layout): x', 'diag''s [x', x' * x'],
        # 'spherical''s |x'|^2, the moments' columns, and for 'tf32x3' the left
        # operand of the products
        self.rows, q, split = shift_rows(chunk, p.c0, squares=cov == "diag",
                                         sumsq=cov == "spherical",
                                         split=precision == "tf32x3",
                                         q_column=moments and cov == "spherical",
                                         ones=moments)
        xs = self.rows[:, :d]
        m = xs.shape[0]
        self.q = self.s = self.c = self.extra = None
        if cov == "full":
            z = xs[None, :, :] - p.coef[:, None, :]
            # c_k - |z U_k|^2 / 2, component by component (K groups of m rows)
            qk = row_sumsq(cupy.matmul(z, p.u).reshape(k * m, d), -0.5, p.c).reshape(k, m)
            self.g, self.extra = qk.T, z
            return
        self.c = p.c
        # the whole row is the left operand: the right one has zero rows for the
        # moments' columns
        left, width = (self.rows if split is None else split), self.rows.shape[1]
        self.g = product(left, p.right_operand("coef", precision, width), precision)
        if cov == "diag":
            return
        self.s = p.s
        self.q = (row_sumsq(product(left, p.right_operand("u", precision, width), precision))
                  if cov == "tied" else q)


def log_prob(X, params):
    """(n, K) weighted log-densities L, X's dtype (the op's output is n x K)."""
    n, k = X.shape[0], params.n_components
    out = cupy.empty((n, k), dtype=X.dtype)
    step = chunk_rows(params)
    for start in range(0, n, step):
        stop = min(n, start + step)
        parts = ChunkParts(X, params, start, stop)
        if params.dtype == X.dtype:
            row_softmax(parts.g, MODE_LOG_PROB, out=out[start:stop], q=parts.q, s=parts.s,
                        c=parts.c)
        else:  # computed in float64 over the chunk's tile, then rounded into ``out``
            row_softmax(parts.g, MODE_LOG_PROB, out=parts.g, q=parts.q, s=parts.s, c=parts.c)
            out[start:stop] = parts.g
        del parts  # back to the pool before the next chunk's: one tile at a time
    return out


def log_norm(X, params, sample_weight=None):
    """Per-row log-normaliser and sum_n w_n log p(x_n), no n x K array.

    Returns
    -------
    norm : cupy.ndarray (n,), X's dtype
    log_likelihood : cupy.ndarray (), float64
    """
    n = X.shape[0]
    norm = cupy.empty(n, dtype=params.dtype)
    step = chunk_rows(params)
    for start in range(0, n, step):
        stop = min(n, start + step)
        parts = ChunkParts(X, params, start, stop)
        row_softmax(parts.g, MODE_NORM, q=parts.q, s=parts.s, c=parts.c,
                    norm=norm[start:stop])
        del parts  # back to the pool before the next chunk's: one tile at a time
    return norm.astype(X.dtype, copy=False), weighted_sum(norm, sample_weight)


def weighted_sum(values, sample_weight=None):
    """sum_n w_n v_n in float64 (a fixed-order CuPy reduction), 0-d; rows of
    weight zero add nothing, even where v_n is infinite."""
    if sample_weight is None:
        return values.sum(dtype=cupy.float64)  # one launch: the cast is the reduction's
    v = values.astype(cupy.float64)
    w = sample_weight.astype(cupy.float64)
    return cupy.where(w != 0, v * w, 0.0).sum()
