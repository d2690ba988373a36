"""The CuPy E-step in one or two kernels, for mixtures with few components.

Design: ``estep_tiles`` (``kernels/_cupy_estep.cu``) streams the rows in tiles
through shared memory; each tile's log-densities, responsibilities and moments
are computed there, each thread summing one 4 x 4 output tile of the moments (a
"micro-tile") in float64 registers, written at the end to one partial row per
block and row phase.  'full' takes two kernels: ``full_log_norm`` writes each
row's log-normaliser (n numbers), its components passing through shared memory
CHUNKS at a time, then ``full_moments`` runs one block per (run of tiles,
component).  :func:`column_sums` adds the partial rows in a fixed
order and one gather reads the statistics out of the slots: four launches and
one read of X per E-step (five and two for 'full'), where the chunked path
(``_cupy_gaussian.py``) takes 7-16 array operations per chunk of rows; at
K = 16 and a million rows an E-step there is bound by its launches.

The plan (:func:`tile_plan`) depends on n, K, D, the covariance type and the
dtype only, not on the device, and nothing is added by atomics: the same bits
every run.  ``estep_tiles`` takes the most rows per tile (ROWS_PER_TILE at most,
a multiple of 32) that fit its shared memory beside the coefficients, at row
strides of 16-byte vectors (:func:`_layout`).  The plan is None where 32 rows do
not fit, a block would need more micro-tiles than it has threads, or K exceeds
MAX_COMPONENTS; those go through the chunked path, whose cuBLAS products suit
large K and D.
"""

from typing import NamedTuple

import numpy as np
import cupy

from .._covariance import COVARIANCE_CODE, second_moment_shape
from .._cupy_gaussian import column_sums, element_strides
from .._cupy_source import CudaSource

THREADS = 256  # the kernels' THREADS
SMEM_DOUBLES = 6144  # the kernels' SMEM_DOUBLES: a block's shared memory, in float64s
ROWS_PER_TILE = 128  # at most this many rows per tile of estep_tiles and full_log_norm
MAX_COMPONENTS = 64  # above this the chunked cuBLAS path
MAX_BLOCKS = 1024
PARTS_BYTES = 64 << 20  # at most this many bytes of float64 partial rows
CHUNKS = (4, 2, 1)  # full_log_norm's components in shared memory at a time, tried in turn
ESTEP_KERNELS = CudaSource("_cupy_estep.cu", ("estep_tiles", "full_log_norm",
                                              "full_moments"))


class TilePlan(NamedTuple):
    """The launches of one E-step: the shapes their arguments describe.  For 'full',
    ``tile_rows``, ``runs`` and ``tiles_per_run`` are ``full_moments``' (its blocks
    are runs x K), the ``norm_*`` fields ``full_log_norm``'s, and ``lda`` the stride
    of its log-densities."""
    lda: int  # row strides of a tile's A and B in shared memory
    ldb: int
    micro_tiles: int  # per block ('full': per component)
    phases: int  # interleaved subsets of a tile's rows, one per thread of a micro-tile
    tile_rows: int
    runs: int
    tiles_per_run: int
    norm_runs: int = 0
    norm_tiles_per_run: int = 0
    norm_tile_rows: int = 0
    norm_chunk: int = 0  # components in shared memory at a time

    @property
    def width(self):
        """Slots of one block's partial row: the log-likelihood, 16 per micro-tile."""
        return 1 + 16 * self.micro_tiles


def _round4(m):
    return -(-m // 4) * 4


def _vector_stride(width, itemsize):
    """The least row stride of at least ``width`` entries whose bytes are an odd
    multiple of 16: rows start on 16-byte boundaries (estep_tiles reads them as
    vectors), and a thread per row reads its row's vectors without bank conflicts."""
    stride = max(width, 1)
    while (stride * itemsize) % 32 != 16:
        stride += 1
    return stride


class _Layout(NamedTuple):
    """estep_tiles' shared memory for ('tied', 'diag', 'spherical'), K, D (the header
    of ``_cupy_estep.cu``): B's and A's row strides, the column blocks of A^T B, and
    the entries (in the dtype) before the tile, the coefficients and 'tied''s U."""
    lda: int
    ldb: int
    row_blocks: int  # A's blocks of four columns: the responsibilities, 'tied''s w x'
    column_blocks: int  # x', 'diag''s x' * x', then [q, 1, 0, 0] or [1, 0, 0, 0]
    fixed: int


def _layout(covariance_type, k, d, itemsize):
    kp, dp = _round4(k), _round4(d)
    diag, tied = covariance_type == "diag", covariance_type == "tied"
    wa = kp + dp if tied else kp
    fixed = kp * dp * (2 if diag else 1) + 2 * kp + (dp * dp if tied else 0)
    return _Layout(_vector_stride(wa, itemsize), _vector_stride(dp + 4, itemsize), wa // 4,
                   (2 * dp if diag else dp) // 4 + 1, fixed)


def _full_micro_tiles(d):
    """'full''s 4 x 4 micro-tiles of one component's upper triangle of z~ z~^T: the
    blocks of x' (D rounded up to 4) and [1, 0, 0, 0]."""
    mb = _round4(d) // 4 + 1
    return mb * (mb + 1) // 2


def _tile_rows(cap, fit):
    """Rows per tile: at most ``cap`` and ``fit``, a multiple of 32 from 32 up; None
    where fewer than 32 (or ``cap``) fit."""
    rows = min(cap, fit)
    if rows < min(32, cap):
        return None
    return rows - rows % 32 if rows >= 32 else rows


def _runs(n, tile_rows, max_runs):
    """(runs, tiles per run) covering n rows with at most max_runs runs."""
    n_tiles = -(-n // tile_rows)
    per_run = -(-n_tiles // max(1, min(n_tiles, max_runs)))
    return -(-n_tiles // per_run), per_run


def _phases(micro, rows):
    """Interleaved subsets of a tile's ``rows``: one per thread of a micro-tile (at
    most 32)."""
    return max(1, min(32, rows, THREADS // micro))


def tile_plan(n, k, d, covariance_type, dtype):
    """The launches for an E-step over n rows, or None where the kernels do not take it."""
    if k > MAX_COMPONENTS or n == 0:
        return None
    itemsize = np.dtype(dtype).itemsize
    budget = 8 * SMEM_DOUBLES // itemsize  # shared memory, in entries of the dtype
    if covariance_type != "full":
        lay = _layout(covariance_type, k, d, itemsize)
        micro = lay.row_blocks * lay.column_blocks
        rows = _tile_rows(ROWS_PER_TILE, (budget - lay.fixed) // (lay.lda + lay.ldb))
        if micro > THREADS or rows is None:
            return None
        phases = _phases(micro, rows)
        row_bytes = 8 * phases * (1 + 16 * micro)
        runs, per_run = _runs(n, rows, min(MAX_BLOCKS, PARTS_BYTES // row_bytes))
        return TilePlan(lay.lda, lay.ldb, micro, phases, rows, runs, per_run)
    # both kernels: x' at the vector stride estep_tiles' B takes, U_k and mu'_k of a
    # component (Dp x Dp, Dp + 4); full_log_norm: `chunk` components, and L at the
    # vector stride of K rounded up to 4; full_moments: one thread per row for L_k, so
    # up to THREADS rows a tile
    dp = _round4(d)
    ldb, lda = _vector_stride(dp + 4, itemsize), _vector_stride(_round4(k), itemsize)
    component = dp * dp + dp + 4
    micro = _full_micro_tiles(d)
    rows = _tile_rows(THREADS, (budget - component) // (ldb + 1))
    if micro > THREADS or rows is None:
        return None
    for chunk in CHUNKS:
        norm_rows = _tile_rows(ROWS_PER_TILE, (budget - chunk * component) // (ldb + lda))
        if norm_rows is not None:
            break
    else:
        return None
    phases = _phases(micro, rows)
    row_bytes = 8 * phases * (1 + 16 * micro)
    max_runs = min(max(1, MAX_BLOCKS // k), PARTS_BYTES // (row_bytes * k))
    runs, per_run = _runs(n, rows, max_runs)
    norm_runs, norm_per_run = _runs(n, norm_rows, MAX_BLOCKS)
    return TilePlan(lda, ldb, micro, phases, rows, runs, per_run, norm_runs, norm_per_run,
                    norm_rows, chunk)


def _slot(mt, ii, jj):
    return 1 + 16 * mt + 4 * ii + jj


def statistic_slots(covariance_type, k, d):
    """Where each statistic lies in a partial row: one index array of
    [log-likelihood, N_k (K), s1 (K, D), s2] in that order, s2 of the shape
    :func:`fastlvm.kernels.estep_stats._cupy.estep_sums` returns ('full' and 'tied'
    read from the upper triangle, so s2 comes out exactly symmetric)."""
    kk, ii = np.meshgrid(np.arange(k), np.arange(d), indexing="ij")
    if covariance_type == "full":  # component k's slots start at k (1 + 16 micro-tiles)
        dp = _round4(d)
        mb = dp // 4 + 1
        width = 1 + 16 * _full_micro_tiles(d)

        def entry(comp, i, j):  # O_k[i, j] of z~ z~^T, read from its upper triangle
            i, j = np.minimum(i, j), np.maximum(i, j)
            i, j = np.where(i < d, i, dp), np.where(j < d, j, dp)  # z~'s 1 is column Dp
            ib, jb = i // 4, j // 4
            pair = ib * mb - ib * (ib - 1) // 2 + (jb - ib)
            return comp * width + _slot(pair, i % 4, j % 4)

        nk = entry(np.arange(k), d, d)
        s1 = entry(kk, ii, d)
        ck, ci, cj = np.meshgrid(np.arange(k), np.arange(d), np.arange(d), indexing="ij")
        s2 = entry(ck, ci, cj)
    else:
        lay = _layout(covariance_type, k, d, 8)  # the blocks do not depend on the dtype
        kp, dp = _round4(k), _round4(d)
        ones = 2 * dp if covariance_type == "diag" else dp + 1  # A^T B's column of ones

        def entry(a, b):  # O[a, b] of A^T B (header of _cupy_estep.cu)
            return _slot((a // 4) * lay.column_blocks + b // 4, a % 4, b % 4)

        nk = entry(np.arange(k), ones)
        s1 = entry(kk, ii)
        if covariance_type == "diag":
            s2 = entry(kk, ii + dp)
        elif covariance_type == "spherical":
            s2 = entry(np.arange(k), dp)
        else:  # 'tied': sum_n w_n x'_n x'_n^T, A's w x' against B's x', upper triangle
            ti, tj = np.meshgrid(np.arange(d), np.arange(d), indexing="ij")
            s2 = entry(kp + np.minimum(ti, tj), np.maximum(ti, tj))
    return np.concatenate([[0], nk.ravel(), s1.ravel(), s2.ravel()]).astype(np.int64)


_SLOTS = {}  # (device, covariance type, K, D) -> the slots, on that device


def _device_slots(covariance_type, k, d):
    key = (cupy.cuda.runtime.getDevice(), covariance_type, k, d)
    if key not in _SLOTS:
        _SLOTS[key] = cupy.asarray(statistic_slots(covariance_type, k, d))
    return _SLOTS[key]


def estep_sums_tiles(X, params, plan, sample_weight=None):
    """:func:`fastlvm.kernels.estep_stats._cupy.estep_sums` by the kernels of
    ``_cupy_estep.cu`` (``plan`` from :func:`tile_plan`); the same returns."""
    p, n = params, X.shape[0]
    k, d, cov = p.n_components, p.n_features, p.covariance_type
    i64 = np.int64
    sw = X if sample_weight is None else sample_weight  # a pointer never read without
    head = (X, *element_strides(X))
    if cov == "full":
        norm = cupy.empty(n, dtype=X.dtype)
        _launch("full_log_norm", X.dtype, plan.norm_runs,
                (*head, p.c0, p.coef, p.c, p.u, i64(n), i64(d), i64(k),
                 i64(plan.norm_tile_rows), i64(plan.norm_tiles_per_run), i64(plan.lda),
                 i64(plan.ldb), i64(plan.norm_chunk), norm))
        parts = cupy.empty((plan.runs * plan.phases, k * plan.width), dtype=cupy.float64)
        _launch("full_moments", X.dtype, plan.runs * k,
                (*head, sw, p.c0, p.coef, p.c, p.u, norm, i64(n), i64(d), i64(k),
                 i64(sample_weight is not None), i64(plan.tile_rows),
                 i64(plan.tiles_per_run), i64(plan.ldb), i64(plan.phases),
                 i64(plan.micro_tiles), parts))
    else:
        parts = cupy.empty((plan.runs * plan.phases, plan.width), dtype=cupy.float64)
        _launch("estep_tiles", X.dtype, plan.runs,
                (*head, sw, p.c0, p.coef, p.c if p.s is None else p.s, p.c,
                 p.c if p.u is None else p.u, i64(n), i64(d), i64(k),
                 i64(COVARIANCE_CODE[cov]), i64(sample_weight is not None),
                 i64(plan.tile_rows), i64(plan.tiles_per_run), i64(plan.lda),
                 i64(plan.ldb), i64(plan.phases), i64(plan.micro_tiles), parts))
    flat = column_sums(parts)[_device_slots(cov, k, d)]
    return (flat[0], flat[1:1 + k], flat[1 + k:1 + k + k * d].reshape(k, d),
            flat[1 + k + k * d:].reshape(second_moment_shape(cov, k, d)))


def _launch(name, dtype, blocks, args):
    ESTEP_KERNELS.function(name, dtype)((blocks,), (THREADS,), args)
