"""Triton mixture-of-PPCA kernels for wide rows: the features in steps, the rows in
chunks whose log-densities and projections are kept.

Design
------
The kernels of ``_triton_low_rank.py`` hold a tile's whole rows, c = x - mu_k and
the residual r, in registers.  Past FUSED_MAX_BLOCK_D = 128 padded features their
sm_90 builds keep kilobytes of stack per thread (q = 4 at BLOCK_D = 256: 8-9 KB,
``bench/results/sm90-spills.md``), and rows of 768 features did not fit a block's
shared memory at the smallest tiles.  Here the rows go through in chunks of m rows
(their (m, K) log-densities and (m, K, BLOCK_Q) whitened projections within
CHUNK_ELEMENTS), each chunk in three kernels:

1. ``_wide_log_prob_kernel``: grid (row tile, component tile).  For each component
   of its tile in turn, one sweep over the features in BLOCK_F steps: the whitened
   projections u = c B_k (``tl.dot``, summed over the steps) and |c|^2, then in
   float32 Woodbury's form, as CuPy's and Numba's kernels take it:

       log w_k N(x | k) = const_k - (|c|^2 - |u|^2) / (2 sigma_k^2).

   It stores the log-densities in G (m x K) and, for the statistics, u in U (m x K
   x BLOCK_Q), and its rows' log-sum-exp state over the tile's components.  float32
   rows whose |c|^2 - |u|^2 keeps less than 2^-6 of |c|^2 under a component
   (``WOODBURY_EXACT_BELOW``: at most ~6 bits of float32's 24 lost) are recomputed
   in float64 in a second sweep, taken only by tiles that hold such a row: c in
   float64 and the same form with float64 loadings, as the fused kernels' exact
   pass does.  In steps of BLOCK_F features that sweep holds few registers, so it
   stays inline here (the fused kernels, which hold whole rows, run it as a launch
   of its own).  float64 rows take the fused kernels' cancellation-free form
   instead, with the residual's |c - u B_k^T|^2 from a second sweep over the
   features (the rows read again, from L2), z = u L_k^{-1} in column steps, and
   const_k - (|r|^2 / sigma_k^2 + |z|^2) / 2.  The explicit residual was float32's
   form too until session 60 (rows below 2^-10 went to the float64 sweep): its
   second sweep took half the kernel's time.  On an H200 at D = 784, K = 16, q = 4
   the kernel took 49 ms a call in two sweeps, about 25 in one at the same tiles
   (``bench/results/gpu-h200.md``, sixth session).
2. ``_chunk_log_norm_kernel`` (the Gaussian chunks', ``estep_stats/_triton_chunked``):
   each row's tile states merged into its log-normaliser, and each block's partial
   sum of w lse.
3. ``_wide_stats_kernel``: grid (feature block and one more, component, split of
   the chunk's rows).  r = w exp(G - lse) and the stored u; over a block's
   features sum r c, sum r c * c (per feature) and sum r c u^T (``tl.dot``); the
   last program N_k, sum r u and sum r u u^T (``tl.dot``).  Each program adds
   into its own slots of per-split partials that persist across chunks.

Every sweep stops at the last BLOCK_F step that holds a feature of X, and the
statistics' feature blocks past it do nothing: rows of 784 features (BLOCK_D =
1024) pay for 832 in the log-densities' 64-feature steps, not 1024; the padding
would only add zeros, so the sums are those of the whole width to the bit.

The partials have the fused statistics kernel's layout (the squared norms per
feature, summed over the features with the splits), so ``mppca_stats_triton``
finishes them as it finishes the fused ones.  No atomics: every slot has one
writer, the chunks run in order on one stream, and every sum has a fixed order.
The rows' log-densities, u and the statistics are in X's dtype; products in
float32 use the precision of :func:`dot_precision`.

Limits: BLOCK_D up to ``WIDEST_STREAMED_ROWS`` (16384); the memory beyond X is a
chunk's G and U (CHUNK_ELEMENTS in X's dtype), its tile states, and the partials
(splits x K x BLOCK_D x (BLOCK_Q + 2)).  Latent widths past 64 take 16-row tiles
and 32-feature steps (:func:`wide_configs`); float64's statistics there keep 288
bytes of stack per thread.
"""

import torch
import triton
import triton.language as tl

from ._triton_gaussian import (WIDEST_STREAMED_ROWS, TileConfig, dot_precision, interpreting,
                               launch_fitted, load_rows, online_logsumexp_column,
                               responsibilities, split_bounds, split_rows)
from ._triton_launch import cdiv, launch_kernel
from .estep_stats._triton_chunked import ChunkLogNormalisers

# the fused kernels hold whole rows up to this padded width; wider rows come here
FUSED_MAX_BLOCK_D = 128
CHUNK_ELEMENTS = 1 << 24  # a chunk's G and U (64 MiB in float32)
# float32: a row takes the inline float64 sweep under a component where Woodbury's
# |c|^2 - |u|^2 keeps less than this fraction of |c|^2 (CuPy's and Numba's limit)
WOODBURY_EXACT_BELOW = 2.0**-6
# row splits of the statistics kernel per SM, divided among its K x feature blocks
# (``wide_configs``)
STATS_SPLITS_PER_SM = 16


def wide_low_rank_rows(block_d):
    """Whether rows of BLOCK_D padded features take these kernels (module doc)."""
    return FUSED_MAX_BLOCK_D < block_d <= WIDEST_STREAMED_ROWS


def wide_configs(dtype, block_d, block_q):
    """(log-density config, statistics config), TileConfigs whose block_n is the row
    tile (BLOCK_M, BLOCK_R), block_k the components a log-density program takes in
    turn (BLOCK_KT; unused by the statistics) and block_j the feature step BLOCK_F.

    One stage.  The tiles shrink as the latent width grows: u, a step of B_k and
    the statistics' c u^T block are BLOCK_M x BLOCK_Q, BLOCK_F x BLOCK_Q and
    BLOCK_F x BLOCK_Q.  First chosen by sm_90 builds (Triton 3.9 and 3.6) at
    D = 300, q = 4, 20, 60, 100 (``bench/results/sm90-spills.md``, session 54):
    8 warps, no stack but float64's statistics at BLOCK_Q = 128 (280-288 bytes,
    in the program that holds the BLOCK_Q x BLOCK_Q sum, at every tile tried).

    float32 at BLOCK_Q <= 32 was then timed on an H200 (``bench/triton_tiles.py
    --mppca-wide``, session 60, N = 250k, D = 784, K = 16): 64 rows and 4 warps
    for both kernels, with 16 row splits per SM for the statistics
    (``STATS_SPLITS_PER_SM``), against 32 and 64 rows of 8 warps and 4 splits.
    With the other kernel at 64 rows and 4 warps, the E-step at q = 4 took 39.1
    ms at the log-densities' old tiles and 44.2 at the statistics' old warps,
    26.4 at neither; the 64-feature steps and the 16 splits each took about 3.5
    ms off that (q = 20: 57.9 and 47.6 against 29.2).  The 64-feature steps keep
    no stack in 3.9's builds at BLOCK_D = 1024, q = 4, but 216 bytes at BLOCK_D =
    256 and 512 and 104-488 at q = 20 (32-feature steps: none), so they are taken
    at BLOCK_Q = 16 past 512 padded features alone.  float64 and BLOCK_Q >= 64
    keep the first tiles, untimed; the 16 splits apply to them too (more programs
    and more partials to add, at most 4x the memory of the 4 splits).
    """
    if interpreting():
        return TileConfig(16, 2, 16, 4, 1), TileConfig(16, 1, 16, 4, 1)
    if block_q > 64:
        return TileConfig(16, 8, 32, 8, 1), TileConfig(16, 1, 32, 8, 1)
    if dtype == torch.float32:
        if block_q <= 32:
            block_f = 64 if block_q <= 16 and block_d > 512 else 32
            return TileConfig(64, 8, block_f, 4, 1), TileConfig(64, 1, 64, 4, 1)
        return TileConfig(16, 8, 64, 8, 1), TileConfig(32, 1, 64, 8, 1)
    return TileConfig(32, 8, 64, 8, 1), TileConfig(32, 1, 64, 8, 1)


@triton.jit
def _projections(x_ptr, rows, n_rows, n_feat, stride_n, stride_d, mu_ptr, b_ptr, k,
                 BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_Q: tl.constexpr, PRECISION: tl.constexpr):
    """(u, cc): u = (x - mu_k) B_k, (BLOCK_M, BLOCK_Q), and |x - mu_k|^2, (BLOCK_M,),
    over the features in BLOCK_F steps, in B's dtype (x converted as it is read)."""
    feats = tl.arange(0, BLOCK_F)
    lat = tl.arange(0, BLOCK_Q)
    dt = b_ptr.dtype.element_ty
    u = tl.zeros((BLOCK_M, BLOCK_Q), dtype=dt)
    cc = tl.zeros((BLOCK_M,), dtype=dt)
    for f0 in range(0, n_feat, BLOCK_F):  # past the features: zero padding, nothing added
        x = load_rows(x_ptr, rows, n_rows, n_feat, stride_n, stride_d, f0, BLOCK_F)
        c = x.to(dt) - tl.load(mu_ptr + k * BLOCK_D + f0 + feats).to(dt)[None, :]
        b = tl.load(b_ptr + (k * BLOCK_D + f0 + feats)[:, None] * BLOCK_Q + lat[None, :])
        u += tl.dot(c, b, input_precision=PRECISION)
        cc += tl.sum(c * c, axis=1)
    return u, cc


@triton.jit
def _residual_norms(x_ptr, rows, n_rows, n_feat, stride_n, stride_d, mu_ptr, b_ptr, k, u,
                    BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_Q: tl.constexpr, PRECISION: tl.constexpr):
    """|c - u B_k^T|^2 per row, (BLOCK_M,), over the features in BLOCK_F steps."""
    feats = tl.arange(0, BLOCK_F)
    lat = tl.arange(0, BLOCK_Q)
    rr = tl.zeros((BLOCK_M,), dtype=u.dtype)
    for f0 in range(0, n_feat, BLOCK_F):
        x = load_rows(x_ptr, rows, n_rows, n_feat, stride_n, stride_d, f0, BLOCK_F)
        c = x - tl.load(mu_ptr + k * BLOCK_D + f0 + feats)[None, :]
        b = tl.load(b_ptr + (k * BLOCK_D + f0 + feats)[:, None] * BLOCK_Q + lat[None, :])
        r = c - tl.dot(u, tl.trans(b), input_precision=PRECISION)
        rr += tl.sum(r * r, axis=1)
    return rr


@triton.jit
def _whitened_norms(u, l_inv_ptr, k, BLOCK_Q: tl.constexpr, BLOCK_QJ: tl.constexpr,
                    PRECISION: tl.constexpr):
    """|u L_k^{-1}|^2 per row, L_k^{-1}'s columns BLOCK_QJ at a time."""
    lat = tl.arange(0, BLOCK_Q)
    cols = tl.arange(0, BLOCK_QJ)
    zz = tl.zeros((u.shape[0],), dtype=u.dtype)
    for j0 in range(0, BLOCK_Q, BLOCK_QJ):
        l_inv = tl.load(l_inv_ptr + k * BLOCK_Q * BLOCK_Q + lat[:, None] * BLOCK_Q
                        + (j0 + cols)[None, :])
        z = tl.dot(u, l_inv, input_precision=PRECISION)
        zz += tl.sum(z * z, axis=1)
    return zz


@triton.jit
def _wide_log_prob_kernel(x_ptr, mu_ptr, b_ptr, l_inv_ptr, inv_noise_ptr, const_ptr, b64_ptr,
                          inv_noise64_ptr, const64_ptr, g_ptr, u_ptr, tile_max_ptr,
                          tile_sum_ptr, n_rows, n_feat, n_comp, n_ktiles, stride_n, stride_d,
                          stride_g, CANCEL: tl.constexpr, STORE_U: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_KT: tl.constexpr, BLOCK_F: tl.constexpr,
                          BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr,
                          BLOCK_QJ: tl.constexpr, PRECISION: tl.constexpr):
    """One row tile's weighted log-densities under the components of one tile,
    G[rows, k] (row stride ``stride_g``), their whitened projections U[rows, k, :]
    (m x K x BLOCK_Q, with STORE_U) and the rows' log-sum-exp state over the tile
    ((m, n_ktiles) maxima and sums)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    kt = tl.program_id(1)
    row_ok = rows < n_rows
    lat = tl.arange(0, BLOCK_Q)
    dt = mu_ptr.dtype.element_ty
    m = tl.full((BLOCK_M,), float("-inf"), dtype=dt)
    s = tl.zeros((BLOCK_M,), dtype=dt)
    for k in range(kt * BLOCK_KT, tl.minimum(kt * BLOCK_KT + BLOCK_KT, n_comp)):
        u, cc = _projections(x_ptr, rows, n_rows, n_feat, stride_n, stride_d, mu_ptr, b_ptr,
                             k, BLOCK_M, BLOCK_F, BLOCK_D, BLOCK_Q, PRECISION)
        if CANCEL > 0:  # float32: Woodbury's form, the rows it cancels on in float64
            rest = cc - tl.sum(u * u, axis=1)
            logp = tl.load(const_ptr + k) - 0.5 * rest * tl.load(inv_noise_ptr + k)
            exact = row_ok & (rest < CANCEL * cc)
            if tl.max(exact.to(tl.int32), axis=0) > 0:
                u64, cc64 = _projections(x_ptr, rows, n_rows, n_feat, stride_n, stride_d,
                                         mu_ptr, b64_ptr, k, BLOCK_M, BLOCK_F, BLOCK_D,
                                         BLOCK_Q, "ieee")
                quad = (cc64 - tl.sum(u64 * u64, axis=1)) * tl.load(inv_noise64_ptr + k)
                logp = tl.where(exact, (tl.load(const64_ptr + k) - 0.5 * quad).to(dt), logp)
        else:  # float64: the residual's second sweep, cancellation-free
            rr = _residual_norms(x_ptr, rows, n_rows, n_feat, stride_n, stride_d, mu_ptr,
                                 b_ptr, k, u, BLOCK_M, BLOCK_F, BLOCK_D, BLOCK_Q, PRECISION)
            zz = _whitened_norms(u, l_inv_ptr, k, BLOCK_Q, BLOCK_QJ, PRECISION)
            logp = tl.load(const_ptr + k) - 0.5 * (rr * tl.load(inv_noise_ptr + k) + zz)
        tl.store(g_ptr + rows.to(tl.int64) * stride_g + k, logp, mask=row_ok)
        if STORE_U:
            tl.store(u_ptr + (rows * n_comp + k)[:, None] * BLOCK_Q + lat[None, :], u,
                     mask=row_ok[:, None])
        m, s = online_logsumexp_column(m, s, logp)
    tl.store(tile_max_ptr + rows * n_ktiles + kt, m, mask=row_ok)
    tl.store(tile_sum_ptr + rows * n_ktiles + kt, s, mask=row_ok)


@triton.jit
def _add_into(ptr, offsets, values):
    """ptr[offsets] += values (a slot this program alone writes)."""
    tl.store(ptr + offsets, tl.load(ptr + offsets) + values)


@triton.jit
def _wide_stats_kernel(x_ptr, sw_ptr, log_norm_ptr, g_ptr, u_ptr, mu_ptr, nk_ptr, s1_ptr,
                       ssq_ptr, cross_ptr, su_ptr, suu_ptr, n_rows, n_feat, n_comp,
                       rows_per_split, stride_n, stride_d, HAS_SW: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_Q: tl.constexpr, PRECISION: tl.constexpr):
    """Add component k's statistics over one split of the chunk's rows into the
    partials.  Grid (BLOCK_D / BLOCK_F + 1, K, splits): program b < BLOCK_D / BLOCK_F
    adds its block of features' s1, ssq (splits, K, BLOCK_D) and cross (splits, K,
    BLOCK_D, BLOCK_Q); the last adds the latent sums nk (splits, K), su (splits, K,
    BLOCK_Q) and suu (splits, K, BLOCK_Q, BLOCK_Q), so no program holds both the
    c u^T block and the u u^T square."""
    fb = tl.program_id(0)
    k = tl.program_id(1)
    split = tl.program_id(2)
    lat = tl.arange(0, BLOCK_Q)
    dt = mu_ptr.dtype.element_ty
    out = split * n_comp + k
    start, stop = split_bounds(split, rows_per_split, n_rows)
    # blocks past the features (zero padding: their sums stay zero, as allocated)
    # and before the last do nothing
    if fb * BLOCK_F < n_feat:
        cols = fb * BLOCK_F + tl.arange(0, BLOCK_F)
        mu = tl.load(mu_ptr + k * BLOCK_D + cols)
        s1 = tl.zeros((BLOCK_F,), dtype=dt)
        ssq = tl.zeros((BLOCK_F,), dtype=dt)
        cross = tl.zeros((BLOCK_F, BLOCK_Q), dtype=dt)
        for r0 in range(start, stop, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            r, u = _chunk_responsibilities(g_ptr, u_ptr, log_norm_ptr, sw_ptr, rows, stop,
                                           n_comp, k, HAS_SW, BLOCK_Q)
            c = load_rows(x_ptr, rows, stop, n_feat, stride_n, stride_d, fb * BLOCK_F,
                          BLOCK_F) - mu[None, :]
            rc = c * r[:, None]
            s1 += tl.sum(rc, axis=0)
            ssq += tl.sum(rc * c, axis=0)
            cross += tl.dot(tl.trans(rc), u, input_precision=PRECISION)
        _add_into(s1_ptr, out * BLOCK_D + cols, s1)
        _add_into(ssq_ptr, out * BLOCK_D + cols, ssq)
        _add_into(cross_ptr, (out * BLOCK_D + cols)[:, None] * BLOCK_Q + lat[None, :], cross)
    elif fb == BLOCK_D // BLOCK_F:
        nk = tl.zeros((BLOCK_R,), dtype=dt)
        su = tl.zeros((BLOCK_Q,), dtype=dt)
        suu = tl.zeros((BLOCK_Q, BLOCK_Q), dtype=dt)
        for r0 in range(start, stop, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            r, u = _chunk_responsibilities(g_ptr, u_ptr, log_norm_ptr, sw_ptr, rows, stop,
                                           n_comp, k, HAS_SW, BLOCK_Q)
            ru = u * r[:, None]
            nk += r
            su += tl.sum(ru, axis=0)
            suu += tl.dot(tl.trans(ru), u, input_precision=PRECISION)
        _add_into(nk_ptr, out, tl.sum(nk, axis=0))
        _add_into(su_ptr, out * BLOCK_Q + lat, su)
        _add_into(suu_ptr, (out * BLOCK_Q + lat)[:, None] * BLOCK_Q + lat[None, :], suu)


@triton.jit
def _chunk_responsibilities(g_ptr, u_ptr, log_norm_ptr, sw_ptr, rows, stop, n_comp, k,
                            HAS_SW: tl.constexpr, BLOCK_Q: tl.constexpr):
    """(r, u): the rows' responsibilities w exp(G - lse) for component k, (BLOCK_R,),
    and their stored projections, (BLOCK_R, BLOCK_Q); zero on rows from ``stop``."""
    row_ok = rows < stop
    logp = tl.load(g_ptr + rows * n_comp + k, mask=row_ok, other=float("-inf"))
    r = responsibilities(logp, log_norm_ptr, sw_ptr, rows, row_ok, HAS_SW)
    u = tl.load(u_ptr + (rows * n_comp + k)[:, None] * BLOCK_Q + tl.arange(0, BLOCK_Q)[None, :],
                mask=row_ok[:, None], other=0.0)
    return r, u


def chunk_rows(n_components, block_q, block_m):
    """Rows per chunk: its log-densities and projections within CHUNK_ELEMENTS, a
    whole number of row tiles (at least one)."""
    rows = CHUNK_ELEMENTS // max(1, n_components * (block_q + 1))
    return max(block_m, rows // block_m * block_m)


class WideLogDensities(ChunkLogNormalisers):
    """A chunk's log-densities (and projections) and its rows' log-normalisers:
    :class:`ChunkLogNormalisers` (the chunk size, tile states and log-normaliser
    launch) with this module's log-density kernel.

    Parameters
    ----------
    X : torch.Tensor (n, D), float32/float64
    params : _triton_low_rank.TritonLowRankParams
    store_u : bool, keep the projections for the statistics
    """

    def __init__(self, X, params, store_u):
        self.params, self.store_u = params, store_u
        self.precision = dot_precision(X.dtype)
        self.cfg, self.stats_cfg = wide_configs(X.dtype, params.block_d, params.block_q)
        k, bq = params.n_components, params.block_q
        super().__init__(X, chunk_rows(k, bq if store_u else 0, self.cfg.block_n),
                         {"device": X.device, "dtype": X.dtype})
        self.u = torch.empty((self.m_full, k, bq) if store_u else (1,), **self.where)
        self.key = (X.dtype, params.block_d, bq, self.precision, store_u)

    def launch(self, rows, g):
        """g[:m, :K] = the rows' weighted log-densities (any row stride), and, with
        ``store_u``, their projections; returns the tile states (maxima, sums,
        count of component tiles)."""
        return launch_fitted("wide_low_rank_log_prob", self.key, self.cfg,
                             lambda cfg: self._log_prob(rows, g, cfg))

    def _log_prob(self, rows, g, cfg):
        p, m, k = self.params, rows.shape[0], self.params.n_components
        n_kt = cdiv(k, cfg.block_k)
        t_max, t_sum = self.tile_state_buffers(n_kt)
        # float32 rows' params have an exact path (p.cancel > 0, the fused kernels'
        # threshold) and carry its float64 copies: Woodbury's form here, with the
        # wide kernel's own threshold; float64: the cancellation-free sweeps
        woodbury = WOODBURY_EXACT_BELOW if p.cancel > 0 else 0.0
        launch_kernel(_wide_log_prob_kernel, (cdiv(m, cfg.block_n), n_kt),
            rows, *p.kernel_args(), g, self.u, t_max, t_sum, m, p.n_features, k, n_kt,
            rows.stride(0), rows.stride(1), g.stride(0), CANCEL=woodbury,
            STORE_U=self.store_u, BLOCK_M=cfg.block_n, BLOCK_KT=cfg.block_k,
            BLOCK_F=min(cfg.block_j, p.block_d), BLOCK_D=p.block_d, BLOCK_Q=p.block_q,
            BLOCK_QJ=min(p.block_q, 32), PRECISION=self.precision, **cfg.launch())
        return t_max, t_sum, n_kt


def wide_log_prob(X, params, out):
    """``out`` (n, K): the rows' log-densities (weighted where ``params`` carry
    log-weights), chunk by chunk."""
    return WideLogDensities(X, params, store_u=False).log_densities(X, out)


def wide_log_norm(X, params, sample_weight=None):
    """(log_norm (n,), log_likelihood ()): the rows' log-normalisers in X's dtype and
    sum_n w_n lse_n in float64 (the blocks' partials in a fixed order)."""
    lse, ll_parts = WideLogDensities(X, params, store_u=False).log_norms(
        X, params.n_components, sample_weight)
    return lse, ll_parts.to(torch.float64).sum()


def wide_stats_sums(X, params, sample_weight=None):
    """The E-step's sums over X's rows, chunk by chunk (module doc).

    Parameters
    ----------
    X : torch.Tensor (n, D), float32/float64, on a CUDA device (or the CPU under
        Triton's interpreter)
    params : _triton_low_rank.TritonLowRankParams built with the log-weights
    sample_weight : torch.Tensor (n,) of X's dtype, contiguous, or None

    Returns
    -------
    log_likelihood : torch.Tensor (), float64
    nk (K,), s1 (K, BLOCK_D), ssq (K,), cross_u (K, BLOCK_D, BLOCK_Q),
    su (K, BLOCK_Q), suu (K, BLOCK_Q, BLOCK_Q) : float64 tensors on X's device,
    the statistics of ``_triton_low_rank.py``'s fused kernel (about the means, in
    the whitened projections u), each summed over the splits in a fixed order.
    """
    n, k, bd, bq = X.shape[0], params.n_components, params.block_d, params.block_q
    dens = WideLogDensities(X, params, store_u=True)
    cfg = dens.stats_cfg
    block_f = min(cfg.block_j, bd)
    splits, per = split_rows(dens.m_full, k * (bd // block_f + 1), cfg.block_n,
                             STATS_SPLITS_PER_SM)
    where = dens.where
    g = torch.empty(dens.m_full, k, **where)
    lse = torch.empty(dens.m_full, **where)
    parts = [torch.zeros(shape, **where) for shape in (
        (splits, k), (splits, k, bd), (splits, k, bd), (splits, k, bd, bq), (splits, k, bq),
        (splits, k, bq, bq))]
    blocks, ll_parts = dens.new_ll_parts(n)
    for c, start, stop in dens.chunks(n):
        rows = X[start:stop]
        sw = None if sample_weight is None else sample_weight[start:stop]
        dens.launch_log_norm(rows, g, sw, lse, ll_parts[c * blocks:])

        def launch(cfg, rows=rows, sw=sw):
            block_f = min(cfg.block_j, bd)
            launch_kernel(_wide_stats_kernel, (bd // block_f + 1, k, splits),
                rows, lse if sw is None else sw, lse, g, dens.u, params.mu, *parts,
                rows.shape[0], params.n_features, k, per, rows.stride(0), rows.stride(1),
                HAS_SW=sw is not None, BLOCK_R=cfg.block_n, BLOCK_F=block_f, BLOCK_D=bd,
                BLOCK_Q=bq, PRECISION=dens.precision, **cfg.launch())

        # the partials' layout does not depend on the tiles, so they may step down
        launch_fitted("wide_low_rank_stats", dens.key, cfg, launch)
    nk, s1, ssq_f, cross_u, su, suu = (a.to(torch.float64).sum(0) for a in parts)
    return ll_parts.to(torch.float64).sum(), nk, s1, ssq_f.sum(1), cross_u, su, suu
