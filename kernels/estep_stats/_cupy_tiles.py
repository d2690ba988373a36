"""The CuPy E-step in one or two kernels, for mixtures with few components.

Design: ``estep_tiles`` (``kernels/_cupy_estep.cu``) streams the rows in tiles
through shared memory; each tile's log-densities, responsibilities and moments
are computed there, each thread summing one 4 x 4 output tile of the moments (a
"micro-tile") in float64 registers, written at the end to one partial row per
block and row phase.  'full' takes two kernels: ``full_log_norm`` writes each
row's log-normaliser (n numbers), then ``full_moments`` runs one block per (run
of tiles, component).  :func:`column_sums` adds the partial rows in a fixed
order and one gather reads the statistics out of the slots: four launches and
one read of X per E-step (five and two for 'full'), where the chunked path
(``_cupy_gaussian.py``) takes 7-16 array operations per chunk of rows; at
K = 16 and a million rows an E-step there is bound by its launches.

The plan (:func:`tile_plan`) depends on n, K, D, the covariance type and the
dtype only, not on the device, and nothing is added by atomics: the same bits
every run.  It is None where a tile does not fit the kernels' shared memory, a
block would need more micro-tiles than it has threads, or K exceeds
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
SMEM_DOUBLES = 6000  # the kernels' SMEM_DOUBLES: a tile's shared memory, in float64s
TILE_ROWS = 32  # rows per tile of estep_tiles and full_log_norm (one per lane)
MAX_COMPONENTS = 64  # above this the chunked cuBLAS path
MAX_BLOCKS = 1024
PARTS_BYTES = 64 << 20  # at most this many bytes of float64 partial rows
ESTEP_KERNELS = CudaSource("_cupy_estep.cu", ("estep_tiles", "full_log_norm",
                                              "full_moments"))


class TilePlan(NamedTuple):
    """The launches of one E-step: the shapes their arguments describe.  For 'full',
    ``tile_rows``, ``runs`` and ``tiles_per_run`` are ``full_moments``' (its blocks
    are runs x K) and ``norm_runs``, ``norm_tiles_per_run`` ``full_log_norm``'s."""
    lda: int  # row strides of a tile's A and B in shared memory
    ldb: int
    micro_tiles: int  # per block ('full': per component)
    phases: int  # interleaved subsets of a tile's rows, one per thread of a micro-tile
    tile_rows: int
    runs: int
    tiles_per_run: int
    norm_runs: int = 0
    norm_tiles_per_run: int = 0

    @property
    def width(self):
        """Slots of one block's partial row: the log-likelihood, 16 per micro-tile."""
        return 1 + 16 * self.micro_tiles


def _widths(covariance_type, k, d):
    """Columns of a tile's B ([x', 1], [x', x' * x', 1] or [x', q, 1]) and A (the
    responsibilities, and 'tied''s w x')."""
    wb = {"full": d + 1, "diag": 2 * d + 1}.get(covariance_type, d + 2)
    return wb, k + d if covariance_type == "tied" else k


def _micro_tiles(covariance_type, k, d):
    """4 x 4 micro-tiles of a block: of A^T B, or of one component's upper triangle
    of z~ z~^T ('full')."""
    wb, wa = _widths(covariance_type, k, d)
    mb = -(-wb // 4)
    if covariance_type == "full":
        return mb * (mb + 1) // 2
    return -(-wa // 4) * mb


def _runs(n, tile_rows, max_runs):
    """(runs, tiles per run) covering n rows with at most max_runs runs."""
    n_tiles = -(-n // tile_rows)
    per_run = -(-n_tiles // max(1, min(n_tiles, max_runs)))
    return -(-n_tiles // per_run), per_run


def tile_plan(n, k, d, covariance_type, dtype):
    """The launches for an E-step over n rows, or None where the kernels do not take it."""
    if k > MAX_COMPONENTS or n == 0:
        return None
    itemsize = np.dtype(dtype).itemsize
    wb, wa = _widths(covariance_type, k, d)
    ldb, lda = wb | 1, wa | 1  # odd strides: a tile's rows fall in different banks
    micro = _micro_tiles(covariance_type, k, d)
    if micro > THREADS or TILE_ROWS * (lda + ldb) * itemsize > 8 * SMEM_DOUBLES:
        return None
    phases = max(1, min(TILE_ROWS, THREADS // micro))
    row_bytes = 8 * phases * (1 + 16 * micro)
    if covariance_type != "full":
        runs, per_run = _runs(n, TILE_ROWS, min(MAX_BLOCKS, PARTS_BYTES // row_bytes))
        return TilePlan(lda, ldb, micro, phases, TILE_ROWS, runs, per_run)
    # full_moments: one thread per row for L_k, so up to THREADS rows per tile (32
    # always fit: at most THREADS micro-tiles means D < 88)
    rows = THREADS
    while rows > 32 and rows * (ldb + 1) * itemsize > 8 * SMEM_DOUBLES:
        rows //= 2
    max_runs = min(max(1, MAX_BLOCKS // k), PARTS_BYTES // (row_bytes * k))
    runs, per_run = _runs(n, rows, max_runs)
    norm_runs, norm_per_run = _runs(n, TILE_ROWS, MAX_BLOCKS)
    return TilePlan(lda, ldb, micro, phases, rows, runs, per_run, norm_runs, norm_per_run)


def _slot(mt, ii, jj):
    return 1 + 16 * mt + 4 * ii + jj


def statistic_slots(covariance_type, k, d):
    """Where each statistic lies in a partial row: one index array of
    [log-likelihood, N_k (K), s1 (K, D), s2] in that order, s2 of the shape
    :func:`fastlvm.kernels.estep_stats._cupy.estep_sums` returns ('full' and 'tied'
    read from the upper triangle, so s2 comes out exactly symmetric)."""
    wb, _ = _widths(covariance_type, k, d)
    mb = -(-wb // 4)
    kk, ii = np.meshgrid(np.arange(k), np.arange(d), indexing="ij")
    if covariance_type == "full":  # component k's slots start at k (1 + 16 micro-tiles)
        width = 1 + 16 * _micro_tiles(covariance_type, k, d)

        def entry(comp, i, j):  # O_k[i, j] of z~ z~^T, read from its upper triangle
            i, j = np.minimum(i, j), np.maximum(i, j)
            ib, jb = i // 4, j // 4
            pair = ib * mb - ib * (ib - 1) // 2 + (jb - ib)
            return comp * width + _slot(pair, i % 4, j % 4)

        nk = entry(np.arange(k), d, d)
        s1 = entry(kk, ii, d)
        ck, ci, cj = np.meshgrid(np.arange(k), np.arange(d), np.arange(d), indexing="ij")
        s2 = entry(ck, ci, cj)
    else:
        def entry(a, b):  # O[a, b] of A^T B
            return _slot((a // 4) * mb + b // 4, a % 4, b % 4)

        nk = entry(np.arange(k), wb - 1)
        s1 = entry(kk, ii)
        if covariance_type == "diag":
            s2 = entry(kk, ii + d)
        elif covariance_type == "spherical":
            s2 = entry(np.arange(k), d)
        else:  # 'tied': sum_n w_n x'_n x'_n^T, A's rows K.. against B's x', upper triangle
            ti, tj = np.meshgrid(np.arange(d), np.arange(d), indexing="ij")
            s2 = entry(k + np.minimum(ti, tj), np.maximum(ti, tj))
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
                (*head, p.c0, p.coef, p.c, p.u, i64(n), i64(d), i64(k), i64(TILE_ROWS),
                 i64(plan.norm_tiles_per_run), i64(plan.lda), i64(plan.ldb), norm))
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
