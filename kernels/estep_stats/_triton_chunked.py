"""Triton E-step at large K or on wide rows: each chunk's log-densities computed once
and kept.

Design
------
Where one component tile cannot hold K ('tied', 'diag', 'spherical'; Flash-GMM's
K = 1024), the fused path of ``_triton.py`` computes every log-density twice: once
for the rows' log-normalisers and again, beside the moments, for the
responsibilities (three GEMM-shaped passes over X, two of them inside kernels that
also carry an online log-sum-exp and a second product).  Here the rows go through
in chunks of m rows, and each chunk takes two kernels of plain GEMM shape and a
small one between them:

1. ``_chunk_log_prob_kernel``: grid (row tile, component tile).  A GEMM tile of
   G = x' A^T (+ (x' * x') B^T for 'diag') over the features in BLOCK_F steps, plus
   q s^T (q = |x'|^2 summed in the same loop for 'spherical', and stored by the
   first component tile; |x' U|^2 from ``_row_quadratic_kernel`` for 'tied') and
   the constants: the weighted log-densities, stored in the compute dtype (m x K,
   at most CHUNK_ELEMENTS), and each (row, component tile)'s log-sum-exp state
   (its maximum and its sum of exp(G - maximum)).
2. ``_chunk_log_norm_kernel``: each row's tile states merged into its
   log-normaliser (m numbers; MERGE_TILES states a step, in tile order) and
   each block's sum of w lse, once per chunk.
3. ``_chunk_moments_kernel``: grid (feature block, component tile, split of the
   chunk's rows).  r = w exp(G - lse); N_k, r^T x' and r^T (x' * x') ('diag') or
   r^T q ('spherical') accumulate with ``tl.dot``, and are added into the
   per-split partials, which persist across chunks.  In float32 one feature
   block spans all features (32-component tiles, mma.sync): on an H200 that was
   faster than feature blocks at Hopper's 64-wide warpgroup tiles, each of which
   formed the tile's responsibilities again (:func:`chunk_configs`).

Both GEMM-shaped kernels read the chunk's rows shifted, x' = x - c0: the log-density
kernel once per component tile, the moments kernel once per component tile and
feature block (16 and 32 times at Flash-GMM's K = 1024).  Shifting them there
(masks on rows and features, X's strides, the subtraction, 'spherical''s row sums
of x' * x') took a third to a half of the instructions of each kernel's loop, around
its 48 (tf32x3) or 16 (tf32) tensor-core instructions.  In Triton 3.9's sm_90
builds (float32, D = 128, the table's tiles; per warp and step, shifted in the
kernels -> shifted once): the moments' 811 -> 545 ('spherical', tf32x3), 605 -> 323
(tf32), 'diag' 1022 -> 692 and 564 -> 303, 'tied' 761 -> 485 and 556 -> 267; the
log-densities' 825 -> 442 ('spherical', tf32x3), 'diag' 974 -> 734, 'tied' 636 ->
442; their shared memory 61.5 -> 28.8 KB (moments) and 98.6 -> 65.5 KB
('spherical''s log-densities, tf32x3).
So where a chunk's x' fits SHIFTED_ELEMENTS, ``_shift_rows_kernel`` writes it once
per chunk (and 'spherical''s q = |x'|^2), contiguous, BLOCK_D to a row, zero past
the features, and both kernels read it with no masks (``_chunk_rows``); wider
chunks (rows of thousands of features at small K) shift in the kernels as before.
The same bits either way.  Not yet timed on a GPU.

The two GEMM-shaped kernels have the shapes Triton's matmul reaches cuBLAS-like
speed on, and no n x K array is stored: one chunk's G at a time.  The partials
have the layout of ``_triton.EStepPartials`` (splits are the chunk's; chunk c's
blocks of log-likelihood partials follow chunk c - 1's), so the fused M-step and
``estep_stats_triton`` take them as they take the fused path's.  No atomics: each
program adds into its own slots (a moments slot belongs to one feature block and
one split; N_k and 'spherical''s s2 to feature block 0), the chunks run in order
on one stream, and every sum has a fixed order.  The statistics are around c0, as
on the fused path; the log-densities are the same expanded forms
(``_triton_gaussian.py``).

Rows past FUSED_MAX_BLOCK_D = 256 padded features come here at any K, and the
log-density matrix and the log-normalisers of such rows (``gaussian_log_prob``,
``score_samples``) come from the first two kernels (:func:`wide_rows`): the fused
kernels hold whole rows in registers, which at 512 padded features did not fit
an H100's shared memory ('diag') or kept kilobytes of spilled registers, while
these step through the features (the log-density GEMM in BLOCK_F steps, the
moments in feature blocks, 'tied''s |x' U|^2 in 64-feature steps of each column
block).  Those steps stop at the last one that holds a feature of X, 'tied''s
also at the diagonal of its upper-triangular U, and the moments' feature blocks
wholly past the features are not launched: rows of 300 features (BLOCK_D = 512)
pay for 320 and not 512 in the log-density GEMM, with the sums of the whole width
to the bit (the padding adds exact zeros).  Not yet timed on a GPU.

'full' comes here only for wide rows (its fused kernels take one component at a
time, at any K), through kernels of its own in place of 1. and 3.
(``_triton_square_blocks.py``: the D x D product per component and the D x D
moments in feature blocks) and the same 2.

Limits: BLOCK_D up to MAX_BLOCK_D = 16384 (1024 compiled in the tests; 4096 and
16384 by ``bench/sm90_tile_stacks.py gaussian 3000`` / ``10000``, where every
type fits with no spills at 4096, 'tied''s D x D scatter taken in square blocks
too, and 'diag' and 'spherical' at 16384; the fused M-step's coefficient
kernels hold whole rows and keep 1.6 KB of stack at 4096 padded features, 12-14
KB at 8192-16384); the chunk's m x K log-densities are the memory beyond X
(CHUNK_ELEMENTS in the data's dtype, plus its shifted rows, at most
SHIFTED_ELEMENTS, the splits' partials and m floats of q for 'tied' and
'spherical').
"""

import torch
import triton
import triton.language as tl

from .._covariance import DIAG, FULL, SPHERICAL, TIED
from .._triton_gaussian import (WIDEST_STREAMED_ROWS, TileConfig, finish_logsumexp,
                                interpreting, launch_fitted, load_shifted_rows,
                                moment_accumulators, moment_splits_per_sm, online_logsumexp,
                                quadratic_form, responsibilities, split_bounds, split_rows,
                                store_log_norm)
from .._triton_launch import cdiv, launch_kernel, next_power_of_2
from . import _triton_square_blocks as square_blocks
from ._triton_square_blocks import launch_full_log_prob, launch_full_moments, pair_programs

CHUNK_ELEMENTS = 1 << 24  # a chunk's stored log-densities (64 MiB in float32)
# a chunk's shifted rows (m x BLOCK_D in the compute dtype), kept where they fit:
# 2M at Flash-GMM's size (16,384 rows of 128), 8 MiB in float32
SHIFTED_ELEMENTS = 1 << 24
SHIFT_ROWS = 64  # rows a program of the shifting kernel
# the fused path holds whole rows in registers up to this padded width; wider rows
# take the chunks at any K (:func:`chunked_applies`)
FUSED_MAX_BLOCK_D = 256
MAX_BLOCK_D = WIDEST_STREAMED_ROWS


@triton.jit
def _row_quadratic_kernel(x_ptr, c0_ptr, u_ptr, q_ptr, n_rows, n_feat, stride_n, stride_d,
                          BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_J: tl.constexpr,
                          BLOCK_F: tl.constexpr, PRECISION: tl.constexpr):
    """'tied''s q = |x' U|^2 for one tile of a chunk's rows: the whole rows held
    (BLOCK_F = BLOCK_D), or, for wide rows, each BLOCK_J-wide column block of x' U
    summed over BLOCK_F-wide steps of the features (the rows read once a column
    block)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    if BLOCK_F == BLOCK_D:
        x = load_shifted_rows(x_ptr, c0_ptr, rows, n_rows, n_feat, stride_n, stride_d, 0,
                              BLOCK_D)
        q = quadratic_form(x, u_ptr, BLOCK_D, BLOCK_J, PRECISION)
    else:
        feats = tl.arange(0, BLOCK_F)
        cols = tl.arange(0, BLOCK_J)
        q = tl.zeros((BLOCK_M,), dtype=c0_ptr.dtype.element_ty)
        # past the features U and x' are zero padding, and U is upper triangular
        # (``_checks``): the steps skipped would add exact zeros
        for j0 in range(0, n_feat, BLOCK_J):
            y = tl.zeros((BLOCK_M, BLOCK_J), dtype=c0_ptr.dtype.element_ty)
            for f0 in range(0, tl.minimum(j0 + BLOCK_J, n_feat), BLOCK_F):
                x = load_shifted_rows(x_ptr, c0_ptr, rows, n_rows, n_feat, stride_n, stride_d,
                                      f0, BLOCK_F)
                u = tl.load(u_ptr + (f0 + feats)[:, None] * BLOCK_D + (j0 + cols)[None, :])
                y += tl.dot(x, u, input_precision=PRECISION)
            q += tl.sum(y * y, axis=1)
    tl.store(q_ptr + rows, q, mask=rows < n_rows)


@triton.jit
def _chunk_rows(x_ptr, c0_ptr, rows, n_rows, n_feat, stride_n, stride_d, f0,
                WIDTH: tl.constexpr, BLOCK_D: tl.constexpr, SHIFTED: tl.constexpr):
    """(rows, WIDTH) tile of the chunk's x', features f0..f0+WIDTH: SHIFTED, read as
    it is from the chunk's buffer of shifted rows (``x_ptr``: the compute dtype,
    BLOCK_D to a row, zero past the features, finite past the chunk's rows), with
    no masks; otherwise shifted here from X's rows (any strides)."""
    if SHIFTED:
        x = tl.load(x_ptr + rows[:, None] * BLOCK_D + (f0 + tl.arange(0, WIDTH))[None, :])
    else:
        x = load_shifted_rows(x_ptr, c0_ptr, rows, n_rows, n_feat, stride_n, stride_d, f0,
                              WIDTH)
    return x


@triton.jit
def _shift_rows_kernel(x_ptr, c0_ptr, xs_ptr, q_ptr, n_rows, n_feat, stride_n, stride_d,
                       WANT_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr,
                       BLOCK_D: tl.constexpr):
    """A BLOCK_M-row block of the chunk's shifted rows x' = x - c0, into ``xs`` (the
    compute dtype, BLOCK_D to a row, zero past the features) and, WANT_Q
    ('spherical'), q = |x'|^2 into ``q``, summed in the log-density kernel's
    BLOCK_F steps (its order, so q has the bits that kernel gave it)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    q = tl.zeros((BLOCK_M,), dtype=c0_ptr.dtype.element_ty)
    for f0 in range(0, BLOCK_D, BLOCK_F):
        x = load_shifted_rows(x_ptr, c0_ptr, rows, n_rows, n_feat, stride_n, stride_d, f0,
                              BLOCK_F)
        feats = f0 + tl.arange(0, BLOCK_F)
        tl.store(xs_ptr + rows[:, None] * BLOCK_D + feats[None, :], x, mask=row_ok[:, None])
        if WANT_Q:
            q += tl.sum(x * x, axis=1)
    if WANT_Q:
        tl.store(q_ptr + rows, q, mask=row_ok)


@triton.jit
def _chunk_log_prob_kernel(x_ptr, c0_ptr, a_ptr, b_ptr, s_ptr, c_ptr, q_ptr, g_ptr,
                           tile_max_ptr, tile_sum_ptr, n_rows, n_feat, n_comp, n_ktiles,
                           stride_n, stride_d, COV: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_K: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
                           WIDE: tl.constexpr, SHIFTED: tl.constexpr, PRECISION: tl.constexpr):
    """One (BLOCK_M, BLOCK_K) tile of the chunk's weighted log-densities G (row-major,
    n_rows x n_comp) and its rows' log-sum-exp states at (row, component tile)
    ((n_rows, n_ktiles) each); WIDE: :func:`wide_rows`; SHIFTED: the rows come
    from ``_shift_rows_kernel`` ('spherical''s q with them), else from X."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    kt = tl.program_id(1)
    ks = kt * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < n_rows
    k_ok = ks < n_comp
    dt = c0_ptr.dtype.element_ty  # the compute dtype
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=dt)
    q = tl.zeros((BLOCK_M,), dtype=dt)
    # WIDE rows stop at the last step that holds a feature (the padding would add
    # exact zeros); narrower ones keep the static trip count their tiles were timed at
    if WIDE:
        f_stop = n_feat
    else:
        f_stop = BLOCK_D
    for f0 in range(0, f_stop, BLOCK_F):
        x = _chunk_rows(x_ptr, c0_ptr, rows, n_rows, n_feat, stride_n, stride_d, f0, BLOCK_F,
                        BLOCK_D, SHIFTED)
        feats = f0 + tl.arange(0, BLOCK_F)
        a_t = tl.load(a_ptr + ks[None, :] * BLOCK_D + feats[:, None], mask=k_ok[None, :],
                      other=0.0)
        acc += tl.dot(x, a_t, input_precision=PRECISION)
        if COV == 2:
            b_t = tl.load(b_ptr + ks[None, :] * BLOCK_D + feats[:, None], mask=k_ok[None, :],
                          other=0.0)
            acc += tl.dot(x * x, b_t, input_precision=PRECISION)
        if COV == 3 and not SHIFTED:
            q += tl.sum(x * x, axis=1)
    if COV == 1 or (COV == 3 and SHIFTED):
        q = tl.load(q_ptr + rows, mask=row_ok, other=0.0)
    if COV == 3 and not SHIFTED:
        if kt == 0:  # for the moments kernel's feature blocks, which see only theirs
            tl.store(q_ptr + rows, q, mask=row_ok)
    if COV != 2:
        s = tl.load(s_ptr + ks, mask=k_ok, other=0.0)
        acc += q[:, None] * s[None, :]
    c = tl.load(c_ptr + ks, mask=k_ok, other=0.0)
    logp = tl.where(k_ok[None, :], acc + c[None, :], float("-inf"))
    tl.store(g_ptr + rows[:, None] * n_comp + ks[None, :], logp,
             mask=row_ok[:, None] & k_ok[None, :])
    m, s_exp = online_logsumexp(tl.full((BLOCK_M,), float("-inf"), dtype=dt),
                                tl.zeros((BLOCK_M,), dtype=dt), logp)
    tl.store(tile_max_ptr + rows * n_ktiles + kt, m, mask=row_ok)
    tl.store(tile_sum_ptr + rows * n_ktiles + kt, s_exp, mask=row_ok)


@triton.jit
def merge_tile_states(m, s, tile_max, tile_sum):
    """Fold (BLOCK_R, BLOCK_T) tile states (maximum, sum of exp(v - maximum); absent
    tiles (-inf, 0)) into the rows' running maximum ``m`` and sum ``s`` of
    exp(v - m).  From (-inf, 0), one fold gives the states' own log-sum-exp
    terms exactly."""
    m_new = tl.maximum(m, tl.max(tile_max, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    s = s * tl.exp(m - m_safe) + tl.sum(tile_sum * tl.exp(tile_max - m_safe[:, None]), axis=1)
    return m_new, s


# tile states a step of the log-normaliser kernel merges: more in one step kept
# registers in local memory in sm_90 builds (128 rows, 4 warps: float64 1096 bytes at
# 64 tiles, float32 2008 at 256; 20-50 KB at 1024), while 16 keep none and hold the
# K = 1024 E-step's 16 tiles in one step
MERGE_TILES = 16


@triton.jit
def _chunk_log_norm_kernel(sw_ptr, tile_max_ptr, tile_sum_ptr, log_norm_ptr, ll_part_ptr,
                           n_rows, n_ktiles, HAS_SW: tl.constexpr, BLOCK_R: tl.constexpr,
                           BLOCK_T: tl.constexpr):
    """One block of the chunk's rows: their tile states merged, BLOCK_T tiles a step
    in tile order, into the log-normalisers, written with the block's partial
    sum_n w_n lse_n at its index (``store_log_norm``, as ``_log_norm_kernel``
    writes them)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    dt = tile_max_ptr.dtype.element_ty
    m = tl.full((BLOCK_R,), float("-inf"), dtype=dt)
    s = tl.zeros((BLOCK_R,), dtype=dt)
    for t0 in range(0, n_ktiles, BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T)
        states = rows[:, None] * n_ktiles + ts[None, :]
        state_ok = row_ok[:, None] & (ts < n_ktiles)[None, :]
        m, s = merge_tile_states(
            m, s, tl.load(tile_max_ptr + states, mask=state_ok, other=float("-inf")),
            tl.load(tile_sum_ptr + states, mask=state_ok, other=0.0))
    store_log_norm(finish_logsumexp(m, s), rows, row_ok, sw_ptr, log_norm_ptr, ll_part_ptr,
                   pid, HAS_SW)


@triton.jit
def _chunk_moments_kernel(x_ptr, sw_ptr, c0_ptr, q_ptr, g_ptr, log_norm_ptr, nk_ptr, s1_ptr,
                          s2_ptr, n_rows, n_feat, n_comp, rows_per_split, stride_n, stride_d,
                          COV: tl.constexpr, HAS_SW: tl.constexpr, BLOCK_R: tl.constexpr,
                          BLOCK_K: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
                          SHIFTED: tl.constexpr, PRECISION: tl.constexpr):
    """Add one (component tile, feature block)'s N_k, sum r x' and second moments
    over one split of the chunk's rows into the partials nk (splits, K),
    s1 (splits, K, BLOCK_D), s2 (splits, K, BLOCK_D) 'diag' / (splits, K)
    'spherical' (from the rows' q = |x'|^2, which the log-density kernel stored) /
    unused 'tied'.

    Grid (feature blocks holding a feature of X, component tiles, splits; the
    partials past them stay as allocated, zero): the feature blocks of one
    tile and split are neighbours in launch order, so they read the same
    log-densities at about the same time.  Block 0 adds N_k (and 'spherical''s
    s2).  Each block forms the tile's responsibilities itself.  SHIFTED: the rows
    come from the chunk's shifted rows (``_chunk_rows``).
    """
    fb = tl.program_id(0)
    kt = tl.program_id(1)
    split = tl.program_id(2)
    ks = kt * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = ks < n_comp
    f0 = fb * BLOCK_F
    cols = f0 + tl.arange(0, BLOCK_F)
    nk, s1, s2, s2_sph = moment_accumulators(c0_ptr, BLOCK_K, BLOCK_F)
    start, stop = split_bounds(split, rows_per_split, n_rows)
    for r0 in range(start, stop, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_ok = rows < stop
        x = _chunk_rows(x_ptr, c0_ptr, rows, stop, n_feat, stride_n, stride_d, f0, BLOCK_F,
                        BLOCK_D, SHIFTED)
        logp = tl.load(g_ptr + rows[:, None] * n_comp + ks[None, :],
                       mask=row_ok[:, None] & k_ok[None, :], other=float("-inf"))
        # components past K read -inf: their r is 0 (and only their own sums see it)
        r = responsibilities(logp, log_norm_ptr, sw_ptr, rows, row_ok, HAS_SW)
        r_t = tl.trans(r)
        s1 += tl.dot(r_t, x, input_precision=PRECISION)
        if COV == 2:
            s2 += tl.dot(r_t, x * x, input_precision=PRECISION)
        if fb == 0:
            nk += tl.sum(r, axis=0)
            if COV == 3:
                q = tl.load(q_ptr + rows, mask=row_ok, other=0.0)
                s2_sph += tl.sum(r * q[:, None], axis=0)
    out = split * n_comp + ks
    moments = out[:, None] * BLOCK_D + cols[None, :]
    tl.store(s1_ptr + moments, tl.load(s1_ptr + moments, mask=k_ok[:, None]) + s1,
             mask=k_ok[:, None])
    if COV == 2:
        tl.store(s2_ptr + moments, tl.load(s2_ptr + moments, mask=k_ok[:, None]) + s2,
                 mask=k_ok[:, None])
    if fb == 0:
        tl.store(nk_ptr + out, tl.load(nk_ptr + out, mask=k_ok) + nk, mask=k_ok)
        if COV == 3:
            tl.store(s2_ptr + out, tl.load(s2_ptr + out, mask=k_ok) + s2_sph, mask=k_ok)


def chunked_applies(code, n_components, block_d, fused_block_k):
    """Whether :func:`chunked_partials` serves an E-step: rows wider than the
    fused kernels hold (:func:`wide_rows`, every type), or 'tied', 'diag' or
    'spherical' with more components than the fused path's one tile holds
    (``fused_block_k``; the fused 'full' kernels take one component at a time),
    and BLOCK_D <= MAX_BLOCK_D."""
    return block_d <= MAX_BLOCK_D and (
        wide_rows(block_d) or (code != FULL and n_components > fused_block_k))


def chunk_configs(dtype, bd, code):
    """(log-density config, moments config): TileConfigs whose block_n is the
    row tile (BLOCK_M, BLOCK_R), block_k the component tile and block_j the
    feature step of the log-density GEMM (BLOCK_F) and the moments kernel's
    feature block (BLOCK_F: its accumulators are BLOCK_K x BLOCK_F).

    - 128 x 64 log-density tiles with 8 warps and 3 stages (Hopper's wgmma);
    - float32 moments tiles of 32 components over all features (BLOCK_F =
      BLOCK_D), 8 warps, the products r^T x' on mma.sync; 32 rows a step, 16
      at BLOCK_D = 256.  On an H200 (N = 1M, D = 128, K = 1024,
      ``bench/triton_check.py``) the E-step took 25.9 / 37.1 / 25.4 ms
      ('spherical' / 'diag' / 'tied', tf32x3) against 36.3 / 49.1 / 35.6 at
      session 34's wgmma tiles (64 components by 32 rows, feature blocks of 64
      for 'diag' and 128 otherwise), and 19.4 / 14.8 / 16.1 against 21.2 /
      20.8 / 18.9 in tf32.  Not taken apart; the wgmma tiles formed each
      tile's responsibilities again in every feature block.  'diag' took 16
      rows a step for a while (its two accumulators at 32 rows keep 24 bytes
      of stack in Triton 3.9's build, none in 3.6's): on the H200 that was
      42.9 ms in tf32x3 and 18.3 in tf32 (session 59), 15-24% slower than the
      32 rows, so 'diag' is back at 32;
    - float64 moments tiles of 32 components by 16 rows in feature blocks of 64
      (mma.sync on the FP64 tensor cores; 'spherical' spilled 8 bytes at 128).

    Past FUSED_MAX_BLOCK_D the float32 moments take feature blocks of 256 ('diag'
    over all 512 features spilled 472 bytes in an sm_90 build, none in blocks of
    256; wider tiles hold more accumulators still).  Spills and shared
    memory at BLOCK_D = 32, 128, 256 and 1024 in either dtype are checked by
    ``tests/kernels/test_triton_compiles.py`` (Triton's compiler for sm_90,
    ``cuobjdump -res-usage``).

    'full' (wide rows only) takes ``_triton_square_blocks.square_block_configs``.
    """
    if code == FULL:
        return square_blocks.square_block_configs(dtype)
    if interpreting():
        return TileConfig(16, 16, 16, 4, 1), TileConfig(16, 16, 16, 4, 1)
    if dtype == torch.float64:
        return TileConfig(64, 64, 16, 4, 2), TileConfig(16, 32, 64, 8, 2)
    return (TileConfig(128, 64, 32, 8, 3),
            TileConfig(32 if bd <= 128 else 16, 32,
                       min(bd, FUSED_MAX_BLOCK_D), 8, 2))


def merge_step(n_ktiles):
    """BLOCK_T of ``_chunk_log_norm_kernel``: every tile state in one step, up to
    MERGE_TILES."""
    return min(next_power_of_2(n_ktiles), MERGE_TILES)


def chunk_rows(n_components, block_m):
    """Rows per chunk: its log-densities within CHUNK_ELEMENTS, a whole number of
    row tiles (at least one)."""
    rows = max(1, CHUNK_ELEMENTS // max(1, n_components))
    return max(block_m, rows // block_m * block_m)


def chunked_partials(X, params, sample_weight, precision, per_sm=None):
    """The E-step's per-split partials by chunks (see the module doc).

    Parameters
    ----------
    X : torch.Tensor (n, D), float32/float64, on a CUDA device (or the CPU under
        Triton's interpreter)
    params : _triton_gaussian.GaussianTileParams, 'tied', 'diag' or 'spherical'
    sample_weight : torch.Tensor (n,) of X's dtype, contiguous, or None
    precision : str, ``tl.dot``'s input_precision
    per_sm : int or None
        Row splits per SM of the moments kernel (:func:`moment_splits_per_sm`'s
        by default).

    Returns
    -------
    nk : (S, K), s1 : (S, K, BLOCK_D), s2 : (S, K, BLOCK_D) 'diag', (S, K)
    'spherical', None 'tied' (its scatter kernel's), ll_parts : (chunks x S,),
    all in X's dtype on X's device
    """
    pass_ = _ChunkedPass(X, params, precision, per_sm)
    for c, start, stop in pass_.densities.chunks(X.shape[0]):
        sw = None if sample_weight is None else sample_weight[start:stop]
        pass_.add_chunk(c, X[start:stop], sw)
    return pass_.nk, pass_.s1, pass_.s2, pass_.ll_parts


def wide_rows(block_d):
    """Whether rows of BLOCK_D padded features take the chunks' log-density kernel
    for every use (E-step, log-density matrix, log-normalisers): every covariance
    type past FUSED_MAX_BLOCK_D, up to MAX_BLOCK_D ('full' through
    ``_triton_square_blocks.py``)."""
    return FUSED_MAX_BLOCK_D < block_d <= MAX_BLOCK_D


def chunked_log_prob(X, params, precision, out):
    """``out`` (n, K), contiguous: the weighted log-densities of X's rows (weighted
    where ``params`` carry log-weights), chunk by chunk through the log-density
    kernel, which steps through the features (:func:`wide_rows`)."""
    return _ChunkLogDensities(X, params, precision).log_densities(X, out)


def chunked_log_norm(X, params, precision, sample_weight=None):
    """(log_norm (n,), ll_parts): the rows' log-normalisers in the compute dtype and
    the blocks' partial sums of w lse, chunk by chunk (as :func:`chunked_partials`
    forms them, without the moments; :func:`wide_rows`)."""
    return _ChunkLogDensities(X, params, precision).log_norms(X, params.n_components,
                                                              sample_weight)


class ChunkLogNormalisers:
    """What a pass of chunks shares, whatever computes its log-densities: the chunk
    size, the tile-state buffers (reused chunk after chunk), the blocks of the
    log-normaliser kernel and its launch.  A subclass passes ``step`` (rows per
    chunk) and ``where`` (the buffers' device and dtype) to ``__init__`` and gives
    ``launch(rows, g)``, which writes a chunk's log-densities into ``g`` and
    returns its tile states (maxima, sums, count of component tiles)."""

    def __init__(self, X, step, where):
        self.step = step
        self.m_full = min(max(X.shape[0], 1), step)
        self.where = where
        self.tile_states = {}  # by component-tile count: (maxima, sums), (m, tiles) each
        self.norm_block = 16 if interpreting() else 128

    def chunks(self, n):
        """(c, start, stop) of each chunk of n rows."""
        return [(c, start, min(n, start + self.step))
                for c, start in enumerate(range(0, n, self.step))]

    def tile_state_buffers(self, n_ktiles):
        """The (m, n_ktiles) maxima and sums of the rows' log-sum-exp over each
        component tile."""
        if n_ktiles not in self.tile_states:
            self.tile_states[n_ktiles] = tuple(
                torch.empty(self.m_full, n_ktiles, **self.where) for _ in range(2))
        return self.tile_states[n_ktiles]

    def new_ll_parts(self, n):
        """(blocks, ll_parts): the blocks of rows in a chunk (the log-normaliser
        kernel's), and zeros for every chunk's block partials of w lse over n rows,
        chunk c's at c x blocks."""
        blocks = cdiv(self.m_full, self.norm_block)
        return blocks, torch.zeros(max(1, cdiv(n, self.step)) * blocks, **self.where)

    def launch_log_norm(self, rows, g, sw, lse, ll_parts):
        """The rows' log-densities into ``g``, then their log-normalisers into
        ``lse`` and each block's partial sum of w lse into ``ll_parts``."""
        t_max, t_sum, n_kt = self.launch(rows, g)
        m = rows.shape[0]
        launch_kernel(_chunk_log_norm_kernel, (cdiv(m, self.norm_block),),
            ll_parts if sw is None else sw, t_max, t_sum, lse, ll_parts, m, n_kt,
            HAS_SW=sw is not None, BLOCK_R=self.norm_block,
            BLOCK_T=merge_step(n_kt), num_warps=4)

    def log_densities(self, X, out):
        """``out`` (n, K): X's rows' log-densities, chunk by chunk (any row stride)."""
        for _, start, stop in self.chunks(X.shape[0]):
            self.launch(X[start:stop], out[start:stop])
        return out

    def log_norms(self, X, n_components, sample_weight=None):
        """(log_norm (n,), ll_parts): X's rows' log-normalisers and the blocks'
        partial sums of w lse (chunk c's at c x blocks), chunk by chunk, each
        chunk's log-densities in one (m, K) buffer."""
        n = X.shape[0]
        g = torch.empty(self.m_full, n_components, **self.where)
        lse = torch.empty(n, **self.where)
        blocks, ll_parts = self.new_ll_parts(n)
        for c, start, stop in self.chunks(n):
            sw = None if sample_weight is None else sample_weight[start:stop]
            self.launch_log_norm(X[start:stop], g, sw, lse[start:stop], ll_parts[c * blocks:])
        return lse, ll_parts


class _ChunkLogDensities(ChunkLogNormalisers):
    """A Gaussian mixture chunk's log-densities G and its rows' log-normalisers:
    :class:`ChunkLogNormalisers` and 'tied''s q."""

    def __init__(self, X, params, precision):
        dt, k, bd = params.dtype, params.n_components, params.block_d
        self.params, self.precision = params, precision
        self.cfg, moments_cfg = chunk_configs(dt, bd, params.code)
        super().__init__(X, chunk_rows(k, self.cfg.block_n),
                         {"device": X.device, "dtype": dt})  # the compute dtype
        self.q = torch.empty(self.m_full if params.code in (TIED, SPHERICAL) else 1,
                             **self.where)
        self.key = (params.code, X.dtype, dt, bd, precision)
        # the chunk's rows shifted once (module doc), where they fit: rows past the
        # chunk, up to the widest row tile past it, stay finite (zeros, or an earlier
        # chunk's rows) for the kernels' unmasked reads
        self.shifted = None
        if params.code != FULL and self.m_full * bd <= SHIFTED_ELEMENTS:
            pad = max(self.cfg.block_n, moments_cfg.block_n)
            self.shifted = torch.zeros(self.m_full + pad, bd, **self.where)

    def rows_of(self, rows):
        """(x, stride_n, stride_d, SHIFTED) by which the chunk kernels read the rows of
        the chunk ``rows``: the shifted rows where there are, X's rows otherwise."""
        if self.shifted is None:
            return rows, rows.stride(0), rows.stride(1), False
        return self.shifted, self.shifted.stride(0), 1, True

    def launch(self, rows, g):
        """g[:m] = the rows' weighted log-densities (m x K, row-major); returns the
        tile states (maxima, sums, count of component tiles)."""
        if self.params.code == TIED:
            _launch_row_quadratic(rows, self.params, self.q, self.precision)
        if self.shifted is not None:
            self._shift(rows)
        return launch_fitted("chunk_log_prob", self.key, self.cfg,
                             lambda cfg: self._log_prob(rows, g, cfg))

    def _shift(self, rows):
        """The chunk's shifted rows x' into ``shifted`` ('spherical''s q into ``q``)."""
        p, m = self.params, rows.shape[0]
        block_m = 16 if interpreting() else SHIFT_ROWS
        launch_kernel(_shift_rows_kernel, (cdiv(m, block_m),),
            rows, p.c0, self.shifted, self.q, m, p.n_features, rows.stride(0), rows.stride(1),
            WANT_Q=p.code == SPHERICAL, BLOCK_M=block_m,
            BLOCK_F=min(self.cfg.block_j, p.block_d), BLOCK_D=p.block_d, num_warps=4)

    def _log_prob(self, rows, g, cfg):
        p, m, k = self.params, rows.shape[0], self.params.n_components
        n_kt = cdiv(k, cfg.block_k)
        t_max, t_sum = self.tile_state_buffers(n_kt)
        if p.code == FULL:
            launch_full_log_prob(rows, p, g, (t_max, t_sum), self.precision, cfg)
            return t_max, t_sum, n_kt
        x, stride_n, stride_d, shifted = self.rows_of(rows)
        launch_kernel(_chunk_log_prob_kernel, (cdiv(m, cfg.block_n), n_kt),
            x, p.c0, p.a, p.b, p.s, p.c, self.q, g, t_max, t_sum, m, p.n_features, k,
            n_kt, stride_n, stride_d, COV=p.code, BLOCK_M=cfg.block_n,
            BLOCK_K=cfg.block_k, BLOCK_F=min(cfg.block_j, p.block_d), BLOCK_D=p.block_d,
            WIDE=wide_rows(p.block_d), SHIFTED=shifted, PRECISION=self.precision,
            **cfg.launch())
        return t_max, t_sum, n_kt


class _ChunkedPass:
    """The buffers of one pass (a chunk's log-densities, reused chunk after chunk;
    the partials, added into) and the launches of one chunk."""

    def __init__(self, X, params, precision, per_sm):
        dt = params.dtype  # the buffers' dtype: the compute dtype
        n, k, bd, code = X.shape[0], params.n_components, params.block_d, params.code
        self.params, self.precision = params, precision
        self.densities = dens = _ChunkLogDensities(X, params, precision)
        self.mo_cfg = chunk_configs(dt, bd, code)[1]
        self.step, self.key = dens.step, dens.key
        m, where = dens.m_full, dens.where
        mo_programs = (pair_programs(params, self.mo_cfg) if code == FULL else
                       cdiv(k, self.mo_cfg.block_k) * (bd // min(self.mo_cfg.block_j, bd)))
        self.splits, self.per = split_rows(
            m, mo_programs, self.mo_cfg.block_n,
            moment_splits_per_sm(code, dt) if per_sm is None else per_sm)

        zeros, empty = torch.zeros, torch.empty
        self.g = empty(m, k, **where)
        self.nk = zeros(self.splits, k, **where)
        self.s1 = zeros(self.splits, k, bd, **where)
        self.s2 = (zeros(self.splits, k, bd, bd, **where) if code == FULL else
                   zeros(self.splits, k, bd, **where) if code == DIAG else
                   zeros(self.splits, k, **where) if code == SPHERICAL else None)
        self.lse = empty(m, **where)
        self.blocks, self.ll_parts = dens.new_ll_parts(n)

    def add_chunk(self, c, rows, sw):
        """Chunk c (its rows and their weights, or None): its log-densities, its
        rows' log-normalisers with their log-likelihood partials (written at
        c x blocks), then its moments added into the partials."""
        self.densities.launch_log_norm(rows, self.g, sw, self.lse,
                                       self.ll_parts[c * self.blocks:])
        sw_arg = self.ll_parts if sw is None else sw
        launch_fitted("chunk_moments", self.key, self.mo_cfg,
                      lambda cfg: self._moments(rows, sw_arg, sw is not None, cfg))

    def _moments(self, rows, sw_arg, has_sw, cfg):
        """The moments kernel at ``cfg`` (the partials' layout does not depend on
        its tiles, so it may step down)."""
        p, m, k = self.params, rows.shape[0], self.params.n_components
        if p.code == FULL:
            return launch_full_moments(rows, sw_arg, has_sw, p, self.g, self.lse,
                                       (self.nk, self.s1, self.s2), self.per, self.precision,
                                       cfg)
        block_f = min(cfg.block_j, p.block_d)
        x, stride_n, stride_d, shifted = self.densities.rows_of(rows)
        # feature blocks wholly past X's features would add zeros into zeros: not launched
        grid = cdiv(p.n_features, block_f), cdiv(k, cfg.block_k), self.splits
        launch_kernel(_chunk_moments_kernel, grid,
            x, sw_arg, p.c0, self.densities.q, self.g, self.lse, self.nk, self.s1,
            self.nk if self.s2 is None else self.s2, m, p.n_features, k, self.per,
            stride_n, stride_d, COV=p.code, HAS_SW=has_sw, BLOCK_R=cfg.block_n,
            BLOCK_K=cfg.block_k, BLOCK_F=block_f, BLOCK_D=p.block_d, SHIFTED=shifted,
            PRECISION=self.precision, **cfg.launch())


def row_quadratic_config(block_d):
    """The TileConfig of ``_row_quadratic_kernel`` (block_n: its row tile BLOCK_M,
    block_j: BLOCK_J; block_k: the feature step BLOCK_F of rows wider than
    FUSED_MAX_BLOCK_D, whole rows otherwise): Triton's default three stages, as
    timed at Flash-GMM's D = 128.  At BLOCK_D = 256 they take 384 KiB of shared
    memory (an H200 has 227: 'tied' at D = 130 was refused on one), and
    :func:`launch_fitted` steps down to one stage.  Whole rows of 1024 float64
    features needed 262,144 bytes at the smallest tiles; 64-feature steps fit."""
    if interpreting():
        return TileConfig(16, 16, min(block_d, 64), 4, 1)
    return TileConfig(64, 64, min(block_d, 64), 8, 3)


def row_quadratic_step(block_d, cfg):
    """BLOCK_F of ``_row_quadratic_kernel`` at ``cfg``: whole rows up to
    FUSED_MAX_BLOCK_D, then ``cfg.block_k`` features a step."""
    return block_d if block_d <= FUSED_MAX_BLOCK_D else min(cfg.block_k, block_d)


def _launch_row_quadratic(rows, params, q, precision):
    """q[:m] = |x' U|^2 for a chunk's rows ('tied')."""
    m, bd = rows.shape[0], params.block_d

    def launch(cfg):
        launch_kernel(_row_quadratic_kernel, (cdiv(m, cfg.block_n),),
            rows, params.c0, params.u, q, m, params.n_features, rows.stride(0),
            rows.stride(1), BLOCK_M=cfg.block_n, BLOCK_D=bd, BLOCK_J=cfg.block_j,
            BLOCK_F=row_quadratic_step(bd, cfg), PRECISION=precision, **cfg.launch())

    launch_fitted("row_quadratic", (rows.dtype, params.dtype, bd, precision),
                  row_quadratic_config(bd), launch)
