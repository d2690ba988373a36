"""Triton ``estep_stats``: the fused E-step on torch tensors (CUDA, or the interpreter).

Design
------
Two launches, neither storing anything of size n x K:

1. ``_log_norm_kernel`` (``kernels/_triton_gaussian.py``): one program per block
   of rows streams over the component tiles with an online log-sum-exp and
   writes the row's log-normaliser (n floats) and a per-block partial of the
   log-likelihood.
2. ``_stats_kernel`` (here): a grid of (component tile, row split).  Each
   program recomputes its log-density tile for the rows of its split, turns it
   into responsibilities with the stored normalisers, and accumulates N_k,
   sum r x' and the second moments with ``tl.dot`` in registers; it writes one
   partial per (split, component).  'full' runs one component per program
   (its D x D moment is the accumulator); 'tied' needs no responsibilities for
   its second moment, sum_n w_n x' x'^T, which ``_scatter_kernel`` sums per split.

Beyond one component tile, 'tied', 'diag' and 'spherical' take
``_triton_chunked.py`` by default: per chunk of rows, one GEMM-shaped kernel
stores the chunk's log-densities (at most 2^24 numbers) and one accumulates the
moments from them, so the log-densities are computed once instead of twice
(``large_k='recompute'`` keeps the two launches above, for comparison).  Rows
past 256 padded features take the chunks at any K and for every type, 'full'
included (unless ``large_k='recompute'``): the kernels above hold whole rows.

Where one component tile holds every component (K <= BLOCK_K: the small
mixtures of the EM benchmarks, K = 16 or 64; not 'full'), the first launch is
skipped: the statistics kernel takes each row's log-normaliser from its own
tile and writes the per-block log-likelihood partials itself (``ONE_PASS``),
so X is read once instead of twice.  The partials are laid out and summed as
the first kernel's are.

Everything here runs in the compute dtype of the parameters
(``GaussianTileParams.dtype``): the data's, or float64 for float32 rows whose
means lie far apart, converted as they are loaded.

The partials (splits x K x D, a few MB) are summed in float64 over the split
axis in a fixed order: no atomics anywhere, so the result is bitwise
reproducible for a given device, shape and dtype.  Per program, sums run in
the data's dtype over at most ceil(n / splits) rows.

Statistics come out around centres the kernel chooses, which the M-step
accepts (see ``fastlvm.mixture._gaussian_params``): c0 (the weighted mean of
the means) for 'tied', 'diag' and 'spherical', where the moments are
GEMM-shaped in x' = x - c0, and the component means themselves for 'full',
whose differences are taken directly.
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .._covariance import DIAG, FULL, TIED
from .._triton_gaussian import (GaussianTileParams, block_log_likelihood, dot_precision,
                                finish_logsumexp, full_log_prob, interpreting, launch_fitted,
                                load_shifted_rows, log_norm_parts, moment_accumulators,
                                moment_splits_per_sm, online_logsumexp, responsibilities,
                                responsibilities_given, row_quadratic, row_weights, split_bounds,
                                split_rows, tile_config, tile_log_prob)
from .._triton_launch import cdiv, launch_kernel
from ._triton_chunked import chunked_applies, chunked_partials, wide_rows
from . import _triton_square_blocks as square_blocks


@triton.jit
def _row_block(x_ptr, c0_ptr, r0, stop, n_feat, stride_n, stride_d, BLOCK_N: tl.constexpr,
               BLOCK_D: tl.constexpr):
    """Rows r0.. of a split, their mask, and the shifted (BLOCK_N, BLOCK_D) tile."""
    rows = r0 + tl.arange(0, BLOCK_N)
    x = load_shifted_rows(x_ptr, c0_ptr, rows, stop, n_feat, stride_n, stride_d, 0, BLOCK_D)
    return rows, rows < stop, x


@triton.jit
def _stats_kernel(x_ptr, sw_ptr, log_norm_ptr, ll_part_ptr, c0_ptr, a_ptr, b_ptr, s_ptr,
                  c_ptr, u_ptr, nk_ptr, s1_ptr, s2_ptr, n_rows, n_feat, n_comp,
                  rows_per_split, stride_n, stride_d, COV: tl.constexpr,
                  HAS_SW: tl.constexpr, ONE_PASS: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_J: tl.constexpr,
                  PRECISION: tl.constexpr):
    """Partial N_k, sum r x' and second moments of one component tile over one split.

    Output layout, split-major: nk (splits, K), s1 (splits, K, BLOCK_D),
    s2 (splits, K, BLOCK_D) 'diag', (splits, K) 'spherical', unused for 'tied'.
    ``ONE_PASS`` (one tile holds every component): each row's log-normaliser
    comes from its own tile, not from ``log_norm_ptr``, and each block of
    BLOCK_N rows writes its partial log-likelihood to ``ll_part_ptr`` at the
    block's index, as ``_log_norm_kernel`` does.
    """
    kt = tl.program_id(0)
    split = tl.program_id(1)
    k0 = kt * BLOCK_K
    ks = k0 + tl.arange(0, BLOCK_K)
    k_ok = ks < n_comp
    cols = tl.arange(0, BLOCK_D)
    dt = c0_ptr.dtype.element_ty  # the compute dtype
    nk, s1, s2, s2_sph = moment_accumulators(c0_ptr, BLOCK_K, BLOCK_D)
    start, stop = split_bounds(split, rows_per_split, n_rows)
    for r0 in range(start, stop, BLOCK_N):
        rows, row_ok, x = _row_block(x_ptr, c0_ptr, r0, stop, n_feat, stride_n, stride_d,
                                     BLOCK_N, BLOCK_D)
        q = row_quadratic(x, u_ptr, COV, BLOCK_D, BLOCK_J, PRECISION)
        logp = tile_log_prob(x, q, a_ptr, b_ptr, s_ptr, c_ptr, k0, n_comp, COV, BLOCK_K,
                             BLOCK_D, PRECISION)
        if ONE_PASS:
            row_max, row_sum = online_logsumexp(tl.full((BLOCK_N,), float("-inf"), dtype=dt),
                                                tl.zeros((BLOCK_N,), dtype=dt), logp)
            lse = finish_logsumexp(row_max, row_sum)
            w = row_weights(sw_ptr, rows, row_ok, HAS_SW)  # loaded once for both
            r = responsibilities_given(logp, lse, w, row_ok)
            tl.store(ll_part_ptr + r0 // BLOCK_N, block_log_likelihood(lse, w))
        else:
            r = responsibilities(logp, log_norm_ptr, sw_ptr, rows, row_ok, HAS_SW)
        r = tl.where(k_ok[None, :], r, 0.0)
        r_t = tl.trans(r)
        nk += tl.sum(r, axis=0)
        s1 += tl.dot(r_t, x, input_precision=PRECISION)
        if COV == 2:
            s2 += tl.dot(r_t, x * x, input_precision=PRECISION)
        if COV == 3:
            s2_sph += tl.sum(r * q[:, None], axis=0)
    out = split * n_comp + ks
    tl.store(nk_ptr + out, nk, mask=k_ok)
    tl.store(s1_ptr + out[:, None] * BLOCK_D + cols[None, :], s1, mask=k_ok[:, None])
    if COV == 2:
        tl.store(s2_ptr + out[:, None] * BLOCK_D + cols[None, :], s2, mask=k_ok[:, None])
    if COV == 3:
        tl.store(s2_ptr + out, s2_sph, mask=k_ok)


@triton.jit
def _full_stats_kernel(x_ptr, sw_ptr, log_norm_ptr, c0_ptr, a_ptr, c_ptr, u_ptr,
                       nk_ptr, s1_ptr, s2_ptr, n_rows, n_feat, n_comp, rows_per_split,
                       stride_n, stride_d, HAS_SW: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_D: tl.constexpr, BLOCK_J: tl.constexpr, PRECISION: tl.constexpr):
    """Partial N_k, sum r (x - mu_k) and one BLOCK_J-wide column block of
    sum r (x - mu_k)(x - mu_k)^T for 'full' component k over one split.

    Grid (K, BLOCK_D / BLOCK_J, splits); outputs nk (splits, K),
    s1 (splits, K, BLOCK_D) (written by column block 0), s2 (splits, K, BLOCK_D,
    BLOCK_D).
    """
    k = tl.program_id(0)
    jb = tl.program_id(1)
    split = tl.program_id(2)
    j0 = jb * BLOCK_J
    cols = tl.arange(0, BLOCK_D)
    cols_j = j0 + tl.arange(0, BLOCK_J)
    dt = c0_ptr.dtype.element_ty  # the compute dtype
    mu_j = tl.load(a_ptr + k * BLOCK_D + cols_j)
    nk = tl.zeros((BLOCK_N,), dtype=dt)
    s1 = tl.zeros((BLOCK_D,), dtype=dt)
    s2 = tl.zeros((BLOCK_D, BLOCK_J), dtype=dt)
    start, stop = split_bounds(split, rows_per_split, n_rows)
    for r0 in range(start, stop, BLOCK_N):
        rows, row_ok, x = _row_block(x_ptr, c0_ptr, r0, stop, n_feat, stride_n, stride_d,
                                     BLOCK_N, BLOCK_D)
        diff, logp = full_log_prob(x, k, a_ptr, u_ptr, c_ptr, BLOCK_D, BLOCK_J, PRECISION)
        r = responsibilities(logp, log_norm_ptr, sw_ptr, rows, row_ok, HAS_SW)
        rd = diff * r[:, None]
        if BLOCK_J == BLOCK_D:
            diff_j = diff
        else:
            x_j = load_shifted_rows(x_ptr, c0_ptr, rows, stop, n_feat, stride_n, stride_d,
                                    j0, BLOCK_J)
            diff_j = tl.where(row_ok[:, None], x_j - mu_j[None, :], 0.0)
        nk += r
        s1 += tl.sum(rd, axis=0)
        s2 += tl.dot(tl.trans(rd), diff_j, input_precision=PRECISION)
    out = split * n_comp + k
    if jb == 0:
        tl.store(nk_ptr + out, tl.sum(nk, axis=0))
        tl.store(s1_ptr + out * BLOCK_D + cols, s1)
    tl.store(s2_ptr + out * BLOCK_D * BLOCK_D + cols[:, None] * BLOCK_D + cols_j[None, :], s2)


@triton.jit
def _scatter_kernel(x_ptr, sw_ptr, c0_ptr, s2_ptr, n_rows, n_feat, rows_per_split,
                    stride_n, stride_d, HAS_SW: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_J: tl.constexpr, PRECISION: tl.constexpr):
    """One column block of the partial sum_n w_n x' x'^T of one split ('tied').

    Grid (BLOCK_D / BLOCK_J, splits); output s2 (splits, BLOCK_D, BLOCK_D).
    """
    jb = tl.program_id(0)
    split = tl.program_id(1)
    j0 = jb * BLOCK_J
    cols = tl.arange(0, BLOCK_D)
    cols_j = j0 + tl.arange(0, BLOCK_J)
    acc = tl.zeros((BLOCK_D, BLOCK_J), dtype=c0_ptr.dtype.element_ty)
    start, stop = split_bounds(split, rows_per_split, n_rows)
    for r0 in range(start, stop, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N)
        x = load_shifted_rows(x_ptr, c0_ptr, rows, stop, n_feat, stride_n, stride_d, 0,
                              BLOCK_D)
        x_j = load_shifted_rows(x_ptr, c0_ptr, rows, stop, n_feat, stride_n, stride_d, j0,
                                BLOCK_J)
        if HAS_SW:
            w = tl.load(sw_ptr + rows, mask=rows < stop, other=0.0)
            x = x * w[:, None]
        acc += tl.dot(tl.trans(x), x_j, input_precision=PRECISION)
    tl.store(s2_ptr + split * BLOCK_D * BLOCK_D + cols[:, None] * BLOCK_D + cols_j[None, :],
             acc)


def moment_block(bd, dtype, cfg):
    """Column-block width of the D x D moments: whole when they fit in registers."""
    return bd if bd * torch.empty(0, dtype=dtype).element_size() <= 512 else cfg.block_j


def scatter_launch(bd):
    """(BLOCK_N, num_warps) of the 'tied' scatter kernel."""
    if interpreting():
        return 16, 4
    return (32 if bd >= 128 else 64), (8 if bd >= 64 else 4)


def one_pass_applies(code, n_components, cfg):
    """Whether the statistics kernel can form the rows' log-normalisers itself: one
    component tile of ``cfg`` holds every component, and the covariance code is
    'tied', 'diag' or 'spherical'."""
    return code != FULL and n_components <= cfg.block_k


def launch_moments(X, sample_weight, lse, params, cfg, precision, per_sm=None):
    """The statistics kernel's per-split partials (nk, s1, s2, ll_part) in the
    compute dtype (``params.dtype``):
    ``_full_stats_kernel`` for 'full', ``_stats_kernel`` otherwise, launched at
    ``cfg`` with ``per_sm`` row splits per SM (:func:`n_splits`; by default
    :func:`moment_splits_per_sm`'s).

    ``lse`` holds the rows' log-normalisers (:func:`log_norm`), and ``ll_part``
    is None.  ``lse=None`` asks for the one-pass kernel (where
    :func:`one_pass_applies`): each row's log-normaliser comes from its own
    component tile, and ``ll_part`` holds the per-block partial log-likelihoods
    (cdiv(n, cfg.block_n), as :func:`log_norm` sums them).  ``sample_weight``
    is a tensor of X's or the compute dtype, or None.  Used by
    :func:`estep_stats_triton` and by ``bench/triton_tiles.py``, which times
    candidate configs and splits.
    """
    dev, dt = X.device, params.dtype
    n, d, k, bd = X.shape[0], params.n_features, params.n_components, params.block_d
    if per_sm is None:
        per_sm = moment_splits_per_sm(params.code, dt)
    one_pass = lse is None
    if one_pass and not one_pass_applies(params.code, k, cfg):
        raise ValueError("the one-pass statistics kernel needs every component in one tile "
                         f"and a covariance type other than 'full'; got K = {k} with "
                         f"BLOCK_K = {cfg.block_k}, covariance code {params.code}.")
    # one pass: each block of rows writes its entry (every split a whole number of
    # blocks); no rows, the one entry stays 0
    ll_part = ((torch.empty if n else torch.zeros)(max(1, cdiv(n, cfg.block_n)),
                                                   device=dev, dtype=dt)
               if one_pass else None)
    sw_arg = sample_weight if sample_weight is not None else (ll_part if one_pass else lse)
    has_sw = sample_weight is not None
    if params.code == FULL:
        bj = moment_block(bd, dt, cfg)
        n_jb = bd // bj
        splits, per = split_rows(n, k * n_jb, cfg.block_n, per_sm)
        nk = torch.empty(splits, k, device=dev, dtype=dt)
        s1 = torch.empty(splits, k, bd, device=dev, dtype=dt)
        s2 = torch.empty(splits, k, bd, bd, device=dev, dtype=dt)
        launch_kernel(_full_stats_kernel, (k, n_jb, splits),
            X, sw_arg, lse, params.c0, params.a, params.c, params.u, nk, s1, s2, n, d, k, per,
            X.stride(0), X.stride(1), HAS_SW=has_sw, BLOCK_N=cfg.block_n, BLOCK_D=bd,
            BLOCK_J=bj, PRECISION=precision, **cfg.launch())
        return nk, s1, s2, None
    n_tiles = cdiv(k, cfg.block_k)
    splits, per = split_rows(n, n_tiles, cfg.block_n, per_sm)
    nk = torch.empty(splits, k, device=dev, dtype=dt)
    s1 = torch.empty(splits, k, bd, device=dev, dtype=dt)
    s2_shape = {TIED: (1,), DIAG: (splits, k, bd)}.get(params.code, (splits, k))
    s2 = torch.empty(s2_shape, device=dev, dtype=dt)
    launch_kernel(_stats_kernel, (n_tiles, splits),
        X, sw_arg, ll_part if one_pass else lse, ll_part if one_pass else lse, params.c0,
        params.a, params.b, params.s, params.c, params.u, nk, s1, s2, n, d, k, per,
        X.stride(0), X.stride(1), COV=params.code, HAS_SW=has_sw, ONE_PASS=one_pass,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_D=bd, BLOCK_J=cfg.block_j,
        PRECISION=precision, **cfg.launch())
    return nk, s1, s2, ll_part


class EStepPartials(NamedTuple):
    """Per-split partial statistics of one E-step pass, in the compute dtype
    (``GaussianTileParams.dtype``), on X's device.

    nk : (S, K)
    s1 : (S, K, BLOCK_D), sum r (x - c0) ('full': sum r (x - mu_k))
    s2 : (S, K, BLOCK_D, BLOCK_D) 'full', (S', BLOCK_D, BLOCK_D) 'tied' (the
        scatter sum w x' x'^T), (S, K, BLOCK_D) 'diag', (S, K) 'spherical'
    ll_parts : (P,) partial log-likelihoods, from the statistics kernel (one
        pass), from :func:`log_norm_parts` (two passes) or from the chunks'
        moments kernel (``_triton_chunked.py``: chunks x S)
    """

    nk: torch.Tensor
    s1: torch.Tensor
    s2: torch.Tensor
    ll_parts: torch.Tensor


LARGE_K_PATHS = ("chunked", "recompute")


def estep_partials(X, params, sample_weight=None, large_k="chunked"):
    """Launch the E-step's kernels for :class:`GaussianTileParams` ``params``: the
    per-split partials, nothing summed or read back (:class:`EStepPartials`).

    ``sample_weight`` is a contiguous tensor of X's or the compute dtype, or None (the
    kernels promote float32 weights as they load them).  One pass over X
    where :func:`one_pass_applies`.  Beyond one component tile, 'tied', 'diag' and
    'spherical' take ``_triton_chunked.py``'s two GEMM-shaped kernels per chunk of
    rows (``large_k='chunked'``), or :func:`log_norm_parts` first and the log-densities
    recomputed beside the moments (``'recompute'``, which 'full' takes up to 256
    padded features).  By default wider rows take the chunks at any K, 'full''s
    through ``_triton_square_blocks.py`` (:func:`_triton_chunked.chunked_applies`);
    ``'recompute'`` keeps the fused kernels for them too, for comparison.  'tied'
    adds the scatter kernel.
    """
    if large_k not in LARGE_K_PATHS:
        raise ValueError(f"large_k={large_k!r}; use one of {LARGE_K_PATHS}.")
    dev, dt = X.device, params.dtype
    sw = sample_weight
    k, d, bd = params.n_components, params.n_features, params.block_d
    n = X.shape[0]
    prec = dot_precision(dt)
    cfg = tile_config(params.code, dt, bd, prec, k)
    key = (params.code, X.dtype, dt, bd, prec, cfg.block_k)
    first_pass = []  # (lse, ll_parts) of log_norm's pass, where the config needs one

    def launch(cfg):
        if one_pass_applies(params.code, k, cfg):
            return launch_moments(X, sw, None, params, cfg, prec)
        if not first_pass:
            first_pass.append(log_norm_parts(X, params, sw))
        return launch_moments(X, sw, first_pass[0][0], params, cfg, prec)

    if large_k == "chunked" and chunked_applies(params.code, k, bd, cfg.block_k):
        nk, s1, s2, ll_parts = chunked_partials(X, params, sw, prec)
    else:
        nk, s1, s2, ll_parts = launch_fitted(
            "full_stats" if params.code == FULL else "stats", key, cfg, launch)
    if ll_parts is None:
        ll_parts = first_pass[0][1]
    if params.code == TIED and large_k == "chunked" and wide_rows(bd):
        # rows too wide to hold: the scatter in square feature blocks
        s2 = launch_fitted("wide_scatter", key, square_blocks.square_block_configs(dt)[1],
                           lambda scfg: square_blocks.wide_scatter(X, sw, params, prec, scfg))
    elif params.code == TIED:
        sw_arg, has_sw = (params.c0, False) if sw is None else (sw, True)

        def launch_scatter(scfg):
            bj = moment_block(bd, dt, scfg)
            n_jb = bd // bj
            splits, per = split_rows(n, n_jb, scfg.block_n)
            s2 = torch.empty(splits, bd, bd, device=dev, dtype=dt)
            launch_kernel(_scatter_kernel, (n_jb, splits),
                X, sw_arg, params.c0, s2, n, d, per, X.stride(0), X.stride(1),
                HAS_SW=has_sw, BLOCK_N=scfg.block_n, BLOCK_D=bd, BLOCK_J=bj,
                PRECISION=prec, **scfg.launch())
            return s2

        sbn, swarps = scatter_launch(bd)
        s2 = launch_fitted("scatter", key, cfg._replace(block_n=sbn, num_warps=swarps),
                           launch_scatter)
    return EStepPartials(nk, s1, s2, ll_parts)


def estep_stats_triton(X, weights, means, precisions_cholesky, covariance_type,
                       sample_weight=None, *, keep_on_device=False, large_k="chunked",
                       compute_in_float64=None):
    """Triton E-step statistics (see :func:`fastlvm.kernels.estep_stats`).

    Parameters
    ----------
    X : torch.Tensor of shape (n, D), float32/float64, on a CUDA device (or the
        CPU under ``TRITON_INTERPRET=1``)
    weights : array-like (K,)
    means : array-like (K, D)
    precisions_cholesky : array-like, sklearn's shape for ``covariance_type``
    covariance_type : str
    sample_weight : torch.Tensor (n,) or None
    keep_on_device : bool, default=False
        Return the log-likelihood as a 0-d device tensor instead of a float, so
        the call does not wait for the device (streamed chunks).
    large_k : {'chunked', 'recompute'}, default='chunked'
        The path beyond one component tile (:func:`estep_partials`);
        ``bench/triton_check.py`` times both.
    compute_in_float64 : bool or None
        Whether float32 rows are computed in float64 (:class:`GaussianTileParams`);
        None decides from the parameters (``_expanded_gaussian.computes_in_float64``,
        which reads device parameters once: a streamed pass decides once for all
        its chunks).

    Returns
    -------
    (log_likelihood, nk, sum_x, second_moment, center): a Python float and
    float64 tensors on X's device (see :class:`fastlvm.kernels.EStepStats`).
    """
    dev = X.device
    f64 = torch.float64
    with torch.no_grad():
        w = torch.as_tensor(weights, device=dev, dtype=f64)
        params = GaussianTileParams(X, means, precisions_cholesky, covariance_type, torch.log(w),
                                    compute_in_float64)
        dt = params.dtype
        sw = None if sample_weight is None else torch.as_tensor(
            sample_weight, device=dev).to(dt).contiguous()
        k, d = params.n_components, params.n_features
        parts = estep_partials(X, params, sw, large_k)
        ll = parts.ll_parts.to(f64).sum()
        nk = parts.nk.to(f64).sum(0)
        if params.code == FULL:
            center = params.c0_64[None, :] + params.mu_64
            sum_x = parts.s1[:, :, :d].to(f64).sum(0) + nk[:, None] * center
            second = parts.s2[:, :, :d, :d].to(f64).sum(0)
        else:
            center = params.c0_64[None, :].expand(k, d).clone()
            sum_x = parts.s1[:, :, :d].to(f64).sum(0) + nk[:, None] * params.c0_64
            if params.code == TIED:
                second = parts.s2[:, :d, :d].to(f64).sum(0)
            elif params.code == DIAG:
                second = parts.s2[:, :, :d].to(f64).sum(0)
            else:
                second = parts.s2.to(f64).sum(0)
        # read last, so every sum is queued before the one wait
        return (ll if keep_on_device else float(ll)), nk, sum_x, second, center
