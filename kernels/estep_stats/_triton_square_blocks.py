"""Triton kernels for the D x D work of 'full' and 'tied' on wide rows, in square
blocks of features.

Design
------
The fused 'full' kernels (``_triton.py``, ``_triton_gaussian.full_log_prob``)
and 'tied''s ``_scatter_kernel`` hold a tile of whole rows in registers and take
the D x D products in column blocks.  Past 256 padded features that spilled
kilobytes per thread ('full' in float32, the scatter in both dtypes: 5.8-10.6 KB
in float64 at D = 768) and did not fit an H100/H200's shared memory at the
smallest tiles ('full' in float64 at BLOCK_D = 1024, the scatter at 4096).  Here
nothing holds a whole row: every product is BLOCK_F x BLOCK_F features at a time.

1. ``_full_chunk_log_prob_kernel``: grid (row tile, component tile) over one
   chunk of rows (``_triton_chunked.py``, whose chunks, tile states,
   log-normaliser kernel and partials it shares).  For each of its components,
   each BLOCK_F-wide column block of y = (x' - mu'_k) U_k is summed over
   BLOCK_F-wide steps of the features with ``tl.dot``, and |y|^2 accumulates
   into the rows' quadratic form.  U_k is upper triangular (sklearn's precision
   Cholesky factor, which ``_checks.check_gaussian_params`` requires and the
   M-step makes), so column block j sums only the feature steps up to its own:
   half the products of the full square.  The differences are taken directly,
   as the fused kernels take them (no expanded form, nothing lost to the
   shift).  Writes the chunk's log-densities G (m x K, a column per component)
   and each (row, component tile)'s log-sum-exp state.
2. ``_pair_moments_kernel``: grid (pair of feature blocks, component, split of
   the rows).  The program for blocks (i, j), i <= j, adds (r d_i)^T d_j into
   the (i, j) block of sum r d d^T and its transpose into the (j, i) block (half
   the products again; programs with i > j do nothing).  'full' (over a
   chunk): r = w exp(G - lse) from the stored G, d = x' - mu'_k, and the
   diagonal programs add sum r d_i (block 0: N_k too); 'tied' (over all of X):
   r = w, d = x', the scatter sum w x' x'^T.  The partials, (splits, K,
   BLOCK_D, BLOCK_D) like ``_full_stats_kernel``'s and (splits, BLOCK_D,
   BLOCK_D) like ``_scatter_kernel``'s, start at zero and are added into (across
   chunks for 'full'); each slot belongs to one program, so no atomics, and
   every sum has a fixed order.

Both loops stop at the last feature block that holds a feature of X, so rows of
768 features (BLOCK_D = 1024) pay for 768 and not 1024.

Limits: K x BLOCK_D^2 factors and moment partials per split, as on the fused
path (at D = 768 and K = 16, 64 MiB each in float32); X is read once per
(component, column block) by the log-density kernel and once per feature-block
pair (and component) by the moments kernel, from L2 at the chunk sizes of
``_triton_chunked.chunk_rows`` ('full'), from memory for the scatter.  The
tiles are a compile-time choice (:func:`square_block_configs`), the moments' row
tile checked against a smaller one on an H200.  There, at N = 1M, D = 300,
K = 16, float32, an E-step took 283 ms for 'full' and 51 for 'tied' (the fused
'tied' kernels 670).
"""

import torch
import triton
import triton.language as tl

from .._triton_gaussian import (TileConfig, interpreting, load_shifted_rows,
                                online_logsumexp_column, responsibilities, row_weights,
                                split_bounds, split_rows)
from .._triton_launch import cdiv, launch_kernel


@triton.jit
def _full_chunk_log_prob_kernel(x_ptr, c0_ptr, a_ptr, c_ptr, u_ptr, g_ptr, tile_max_ptr,
                                tile_sum_ptr, n_rows, n_feat, n_comp, n_ktiles, stride_n,
                                stride_d, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                                BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
                                PRECISION: tl.constexpr):
    """The chunk's weighted log-densities c_k - |(x' - mu'_k) U_k|^2 / 2 for one
    tile of BLOCK_M rows and the components of tile ``program_id(1)`` (G
    row-major, n_rows x n_comp), and the rows' log-sum-exp states over those
    components ((n_rows, n_ktiles) each)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    kt = tl.program_id(1)
    row_ok = rows < n_rows
    feats = tl.arange(0, BLOCK_F)
    dt = c0_ptr.dtype.element_ty  # the compute dtype
    m = tl.full((BLOCK_M,), float("-inf"), dtype=dt)
    s = tl.zeros((BLOCK_M,), dtype=dt)
    k0 = kt * BLOCK_K
    for kk in range(0, tl.minimum(BLOCK_K, n_comp - k0)):
        k = k0 + kk  # a tensor (program id), so that it widens
        u_k = u_ptr + k.to(tl.int64) * BLOCK_D * BLOCK_D  # K x BLOCK_D^2 may pass 2^31
        q = tl.zeros((BLOCK_M,), dtype=dt)
        for j0 in range(0, n_feat, BLOCK_F):
            y = tl.zeros((BLOCK_M, BLOCK_F), dtype=dt)
            for f0 in range(0, j0 + BLOCK_F, BLOCK_F):  # U_k is zero below its diagonal
                x = load_shifted_rows(x_ptr, c0_ptr, rows, n_rows, n_feat, stride_n, stride_d,
                                      f0, BLOCK_F)
                mu = tl.load(a_ptr + k * BLOCK_D + f0 + feats)
                u = tl.load(u_k + (f0 + feats)[:, None] * BLOCK_D + (j0 + feats)[None, :])
                y += tl.dot(x - mu[None, :], u, input_precision=PRECISION)
            q += tl.sum(y * y, axis=1)
        logp = tl.load(c_ptr + k) - 0.5 * q
        tl.store(g_ptr + rows * n_comp + k, logp, mask=row_ok)
        m, s = online_logsumexp_column(m, s, logp)
    tl.store(tile_max_ptr + rows * n_ktiles + kt, m, mask=row_ok)
    tl.store(tile_sum_ptr + rows * n_ktiles + kt, s, mask=row_ok)


@triton.jit
def _pair_moments_kernel(x_ptr, sw_ptr, c0_ptr, a_ptr, g_ptr, log_norm_ptr, nk_ptr, s1_ptr,
                         s2_ptr, n_rows, n_feat, n_comp, rows_per_split, n_fblocks, stride_n,
                         stride_d, RESP: tl.constexpr, HAS_SW: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
                         PRECISION: tl.constexpr):
    """Add feature blocks (i, j), i <= j, of sum r d d^T over one split of the rows
    into the partials s2 (splits, n_comp, BLOCK_D, BLOCK_D), at (i, j) and
    transposed at (j, i).

    ``RESP`` ('full'): component k's responsibilities r from its column of the
    chunk's log-densities G (row-major, n_rows x n_comp) and d = x' - mu'_k
    (``a_ptr``: mu', (n_comp, BLOCK_D)); the diagonal programs add block i of
    sum r d into s1 (splits, n_comp, BLOCK_D), block 0's N_k into nk (splits,
    n_comp).  Otherwise ('tied''s scatter, n_comp = 1): r = the rows' weights,
    d = x', and nothing but s2 written.

    Grid (n_fblocks^2, n_comp, splits), program 0's index i n_fblocks + j.
    """
    pair = tl.program_id(0)
    k = tl.program_id(1)
    split = tl.program_id(2)
    ib = pair // n_fblocks
    jb = pair % n_fblocks
    if ib <= jb:
        cols_i = ib * BLOCK_F + tl.arange(0, BLOCK_F)
        cols_j = jb * BLOCK_F + tl.arange(0, BLOCK_F)
        dt = c0_ptr.dtype.element_ty  # the compute dtype
        nk = tl.zeros((BLOCK_R,), dtype=dt)
        s1 = tl.zeros((BLOCK_F,), dtype=dt)
        s2 = tl.zeros((BLOCK_F, BLOCK_F), dtype=dt)
        start, stop = split_bounds(split, rows_per_split, n_rows)
        for r0 in range(start, stop, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            row_ok = rows < stop
            d_i = load_shifted_rows(x_ptr, c0_ptr, rows, stop, n_feat, stride_n, stride_d,
                                    ib * BLOCK_F, BLOCK_F)
            d_j = load_shifted_rows(x_ptr, c0_ptr, rows, stop, n_feat, stride_n, stride_d,
                                    jb * BLOCK_F, BLOCK_F)
            if RESP:
                logp = tl.load(g_ptr + rows * n_comp + k, mask=row_ok, other=float("-inf"))
                r = responsibilities(logp, log_norm_ptr, sw_ptr, rows, row_ok, HAS_SW)
                d_i -= tl.load(a_ptr + k * BLOCK_D + cols_i)[None, :]
                d_j -= tl.load(a_ptr + k * BLOCK_D + cols_j)[None, :]
            else:
                r = row_weights(sw_ptr, rows, row_ok, HAS_SW)
            rd = d_i * r[:, None]  # rows outside the split have r = 0
            s2 += tl.dot(tl.trans(rd), d_j, input_precision=PRECISION)
            if RESP:
                if ib == jb:
                    s1 += tl.sum(rd, axis=0)
                    nk += r
        out = split * n_comp + k
        base = s2_ptr + out.to(tl.int64) * BLOCK_D * BLOCK_D
        block = base + cols_i[:, None] * BLOCK_D + cols_j[None, :]
        tl.store(block, tl.load(block) + s2)
        if ib != jb:
            mirror = base + cols_j[:, None] * BLOCK_D + cols_i[None, :]
            tl.store(mirror, tl.load(mirror) + tl.trans(s2))
        elif RESP:
            first = s1_ptr + out * BLOCK_D + cols_i
            tl.store(first, tl.load(first) + s1)
            if ib == 0:
                tl.store(nk_ptr + out, tl.load(nk_ptr + out) + tl.sum(nk, axis=0))


def square_block_configs(dtype):
    """(log-density config, moments config) of these kernels: TileConfigs whose
    block_n is the row tile (BLOCK_M, BLOCK_R), block_k the components of a
    log-density program and block_j the feature step BLOCK_F (every product is
    BLOCK_F wide); the moments config is the scatter's too.  Under the
    interpreter 4 components a program, so small tests cross component tiles.

    64 rows by 64 features with 8 warps, the one set of tiles that built without
    spills in both dtypes under Triton 3.9 and 3.6 (the H200's) for sm_90, at
    D = 300, 768 and 3000 (``bench/sm90_tile_stacks.py gaussian D --cov full``,
    ``bench/results/sm90-spills.md``): with 4 warps float32 kept 16-40 bytes of
    stack at 255 registers; float64 takes one stage, since at two Triton 3.6's
    build of the log-density kernel spilled 16-56 bytes and of the moments 88.

    The moments' builds with responsibilities ('full') do keep stack in Triton
    3.6: 288 bytes in float32 tf32x3 at BLOCK_D = 1024 on the H200 (its compile
    check, 2026-12-04).  The PyPI wheel of 3.6 (CUDA 12.8's ptxas) agrees there
    and gives 288-296 bytes from BLOCK_D = 512 to 4096, 104 in tf32, 72 in ieee
    and 576 in float64; Triton 3.9 keeps none.  32-row tiles keep none in
    either compiler (the wheel's builds), but on the H200 an E-step (N = 1M,
    D = 300, K = 16, float32) took 528 ms against 283 at 64 rows ('tied''s
    scatter 67 against 51; at D = 768 'full' 572 against 504, 'tied' level), so
    the 64-row tiles stay.
    """
    if interpreting():
        return TileConfig(16, 4, 16, 4, 1), TileConfig(16, 1, 16, 4, 1)
    stages = 1 if dtype == torch.float64 else 2
    return TileConfig(64, 16, 64, 8, stages), TileConfig(64, 1, 64, 8, stages)


def feature_blocks(n_features, cfg, block_d):
    """(BLOCK_F, count): the feature step at ``cfg`` and how many steps hold a
    feature of X."""
    block_f = min(cfg.block_j, block_d)
    return block_f, cdiv(n_features, block_f)


def launch_full_log_prob(rows, params, g, tile_states, precision, cfg):
    """The log-density kernel over a chunk's rows at ``cfg``; ``tile_states`` is
    (maxima, sums), each at least (m, cdiv(K, cfg.block_k))."""
    p, m, k = params, rows.shape[0], params.n_components
    n_kt = cdiv(k, cfg.block_k)
    t_max, t_sum = tile_states
    block_f, _ = feature_blocks(p.n_features, cfg, p.block_d)
    launch_kernel(_full_chunk_log_prob_kernel, (cdiv(m, cfg.block_n), n_kt),
        rows, p.c0, p.a, p.c, p.u, g, t_max, t_sum, m, p.n_features, k, n_kt,
        rows.stride(0), rows.stride(1), BLOCK_M=cfg.block_n, BLOCK_K=cfg.block_k,
        BLOCK_F=block_f, BLOCK_D=p.block_d, PRECISION=precision, **cfg.launch())


def launch_full_moments(rows, sw_arg, has_sw, params, g, lse, partials, rows_per_split,
                        precision, cfg):
    """'full''s moments over a chunk's rows at ``cfg``, added into ``partials`` =
    (nk, s1, s2) of (splits, K), (splits, K, BLOCK_D) and (splits, K, BLOCK_D,
    BLOCK_D); ``g`` and ``lse`` hold the chunk's log-densities and
    log-normalisers."""
    nk, s1, s2 = partials
    _launch_pairs(rows, sw_arg, has_sw, params, s2, rows_per_split, precision, cfg,
                  resp=(g, lse, nk, s1))


def wide_scatter(X, sample_weight, params, precision, cfg):
    """'tied''s per-split partials of sum_n w_n x' x'^T, (splits, BLOCK_D, BLOCK_D)
    in the compute dtype, by square blocks of features over all of X at ``cfg``
    (:func:`square_block_configs`' moments config, or smaller); ``sample_weight``
    is a tensor of X's or the compute dtype, or None."""
    splits, per = split_rows(X.shape[0], pair_programs(params, cfg, 1), cfg.block_n)
    s2 = torch.zeros(splits, params.block_d, params.block_d, device=X.device,
                     dtype=params.dtype)
    sw_arg = params.c0 if sample_weight is None else sample_weight
    _launch_pairs(X, sw_arg, sample_weight is not None, params, s2, per, precision, cfg)
    return s2


def _launch_pairs(rows, sw_arg, has_sw, params, s2, rows_per_split, precision, cfg,
                  resp=None):
    """``_pair_moments_kernel`` over ``rows`` at ``cfg`` into ``s2`` (splits first):
    'full''s K components from ``resp`` = (G, lse, nk, s1), or without ``resp``
    the weighted scatter ('tied', one "component")."""
    p, m = params, rows.shape[0]
    full = resp is not None
    # the scatter reads none of G, lse, N_k or sum r x': c0 stands in for them
    g, lse, nk, s1 = resp if full else (p.c0,) * 4
    n_comp = p.n_components if full else 1
    block_f, n_fb = feature_blocks(p.n_features, cfg, p.block_d)
    launch_kernel(_pair_moments_kernel, (n_fb * n_fb, n_comp, s2.shape[0]),
        rows, sw_arg, p.c0, p.a, g, lse, nk, s1, s2, m, p.n_features, n_comp, rows_per_split,
        n_fb, rows.stride(0), rows.stride(1), RESP=full, HAS_SW=has_sw, BLOCK_R=cfg.block_n,
        BLOCK_F=block_f, BLOCK_D=p.block_d, PRECISION=precision, **cfg.launch())


def pair_programs(params, cfg, n_comp=None):
    """The moments kernel's programs beside its row splits (feature-block pairs
    times components: K, or ``n_comp``), for ``split_rows``."""
    _, n_fb = feature_blocks(params.n_features, cfg, params.block_d)
    return n_fb * n_fb * (params.n_components if n_comp is None else n_comp)
