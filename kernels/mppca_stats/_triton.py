"""Triton ``mppca_stats``: the fused E-step pass of a mixture of PPCA on torch tensors.

Design
------
Two kernels, neither storing anything of size n x K (float32 launches each
twice, a pass over all rows and one over the rows that take the exact path:
``kernels/_triton_low_rank.py``):

1. ``_low_rank_log_norm_kernel`` (``kernels/_triton_low_rank.py``): one program
   per block of rows runs over the components with an online log-sum-exp and
   writes each row's log-normaliser, float32's marks and a per-block
   log-likelihood partial.
2. ``_stats_kernel`` (here): a grid of (component, row split).  Each program
   recomputes its component's centred rows c, whitened projections u and
   log-densities for the pass's rows of its split, turns them into
   responsibilities r with the stored normalisers, and accumulates in registers
   sum r, sum r c, sum r |c|^2, sum r c u^T (``tl.dot``), sum r u and
   sum r u u^T (``tl.dot``); it writes one partial per (split, component).

The partials (splits x K x (D + 1) x (q + 1) numbers) are summed in float64
over the split axis in a fixed order, then the passes' sums added in order,
and the u-statistics are mapped to the projections y = W_k c = L_k u in
float64 (q x q products), as the Numba kernel does.  No atomics: the result
is bitwise reproducible for a given device, shape and dtype.  Per program, sums
run in the data's dtype over at most ceil(n / splits) rows.  The statistics
are centred on the means rounded to the data's dtype (returned as ``center``),
like the host backends'.

Rows past 128 padded features take ``kernels/_triton_low_rank_wide.py``'s
kernels instead (features in steps, chunks of rows with their log-densities and
projections kept), whose sums come in the same layout.
"""

import torch
import triton
import triton.language as tl

from .._low_rank import projection_stats
from .._triton_gaussian import (dot_precision, load_rows, responsibilities, split_bounds,
                                split_rows)
from .._triton_launch import launch_kernel
from .._triton_low_rank import (TritonLowRankParams, launch_passes, low_rank_log_norm,
                                new_marks, pass_component, pass_rows, pass_tile_has_rows)
from .._triton_low_rank_wide import wide_low_rank_rows, wide_stats_sums


@triton.jit
def _stats_kernel(x_ptr, sw_ptr, log_norm_ptr, mu_ptr, b_ptr, l_inv_ptr, inv_noise_ptr,
                  const_ptr, b64_ptr, inv_noise64_ptr, const64_ptr, flags_ptr, nk_ptr, s1_ptr,
                  ssq_ptr, cross_ptr, su_ptr, suu_ptr, n_rows, n_feat, n_comp, rows_per_split,
                  stride_n, stride_d, CANCEL: tl.constexpr, HAS_SW: tl.constexpr,
                  PASS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_Q: tl.constexpr, PRECISION: tl.constexpr):
    """Partial statistics of component k over the pass's rows of one split
    (``_triton_low_rank.pass_rows``: all of them, the unmarked or the marked).

    Output layout, split-major: nk, ssq (splits, K); s1 (splits, K, BLOCK_D);
    cross (splits, K, BLOCK_D, BLOCK_Q); su (splits, K, BLOCK_Q);
    suu (splits, K, BLOCK_Q, BLOCK_Q).
    """
    k = tl.program_id(0)
    split = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    lat = tl.arange(0, BLOCK_Q)
    dt = x_ptr.dtype.element_ty
    nk = tl.zeros((BLOCK_N,), dtype=dt)
    ssq = tl.zeros((BLOCK_N,), dtype=dt)
    s1 = tl.zeros((BLOCK_D,), dtype=dt)
    su = tl.zeros((BLOCK_Q,), dtype=dt)
    cross = tl.zeros((BLOCK_D, BLOCK_Q), dtype=dt)
    suu = tl.zeros((BLOCK_Q, BLOCK_Q), dtype=dt)
    start, stop = split_bounds(split, rows_per_split, n_rows)
    for r0 in range(start, stop, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N)
        rows_in = pass_rows(flags_ptr, rows, rows < stop, PASS)
        if pass_tile_has_rows(rows_in, PASS):
            x = load_rows(x_ptr, rows, stop, n_feat, stride_n, stride_d, 0, BLOCK_D)
            c, u, logp, _ = pass_component(x, rows_in, k, mu_ptr, b_ptr, l_inv_ptr,
                                           inv_noise_ptr, const_ptr, b64_ptr, inv_noise64_ptr,
                                           const64_ptr, CANCEL, PASS, BLOCK_D, BLOCK_Q,
                                           PRECISION)
            r = responsibilities(logp, log_norm_ptr, sw_ptr, rows, rows_in, HAS_SW)
            rc = c * r[:, None]
            ru = u * r[:, None]
            nk += r
            ssq += tl.sum(rc * c, axis=1)
            s1 += tl.sum(rc, axis=0)
            su += tl.sum(ru, axis=0)
            cross += tl.dot(tl.trans(rc), u, input_precision=PRECISION)
            suu += tl.dot(tl.trans(ru), u, input_precision=PRECISION)
    out = split * n_comp + k
    tl.store(nk_ptr + out, tl.sum(nk, axis=0))
    tl.store(ssq_ptr + out, tl.sum(ssq, axis=0))
    tl.store(s1_ptr + out * BLOCK_D + cols, s1)
    tl.store(su_ptr + out * BLOCK_Q + lat, su)
    tl.store(cross_ptr + out * BLOCK_D * BLOCK_Q + cols[:, None] * BLOCK_Q + lat[None, :],
             cross)
    tl.store(suu_ptr + out * BLOCK_Q * BLOCK_Q + lat[:, None] * BLOCK_Q + lat[None, :], suu)


def mppca_stats_triton(X, weights, means, components, noise_variance, sample_weight=None, *,
                       keep_on_device=False):
    """Triton mixture-of-PPCA E-step statistics (see :func:`fastlvm.kernels.mppca_stats`).

    Parameters
    ----------
    X : torch.Tensor of shape (n, D), float32/float64, on a CUDA device (or the
        CPU under ``TRITON_INTERPRET=1``)
    weights : array-like (K,)
    means : array-like (K, D)
    components : array-like (K, q, D)
    noise_variance : array-like (K,)
    sample_weight : torch.Tensor (n,) or None
    keep_on_device : bool, default=False
        Return the log-likelihood as a 0-d device tensor instead of a float, so
        the call does not wait for the device.

    Returns
    -------
    (log_likelihood, nk, sum_x, sum_sq, cross, sum_proj, proj_second, center):
    a Python float and float64 tensors on X's device (see
    :class:`fastlvm.kernels.MPPCAStats`).
    """
    dev, dt = X.device, X.dtype
    with torch.no_grad():
        p = TritonLowRankParams(X, means, components, noise_variance, weights)
        sw = None if sample_weight is None else torch.as_tensor(
            sample_weight, device=dev).to(dt).contiguous()
        d, q = p.n_features, p.n_latent
        if wide_low_rank_rows(p.block_d):  # features in steps, chunk by chunk
            ll, nk, s1, ssq, cross_u, su, suu = wide_stats_sums(X, p, sw)
        else:
            ll, nk, s1, ssq, cross_u, su, suu = _fused_sums(X, p, sw)
        center = p.mu_64
        sum_x = s1[:, :d] + nk[:, None] * center
        cross, sum_proj, proj_second = projection_stats(p.chol, cross_u[:, :d, :q],
                                                        su[:, :q], suu[:, :q, :q])
        return ((ll if keep_on_device else float(ll)), nk, sum_x, ssq, cross, sum_proj,
                proj_second, center)


def _fused_sums(X, p, sw):
    """The E-step's sums by the kernels that hold whole rows (the module doc): the
    log-likelihood and nk, s1, ssq, cross_u, su, suu in float64, as
    ``_triton_low_rank_wide.wide_stats_sums`` returns them."""
    dev, dt, f64 = X.device, X.dtype, torch.float64
    n, k, d = X.shape[0], p.n_components, p.n_features
    bd, bq = p.block_d, p.block_q
    lse, ll, marks = low_rank_log_norm(X, p, sw)
    if marks is None:  # float64: a placeholder, never read
        marks = new_marks(X, p)

    def launch(cfg, pass_):
        splits, per = split_rows(n, k, cfg.block_n)
        parts = [torch.empty(shape, device=dev, dtype=dt) for shape in (
            (splits, k), (splits, k, bd), (splits, k), (splits, k, bd, bq),
            (splits, k, bq), (splits, k, bq, bq))]
        launch_kernel(_stats_kernel, (k, splits),
            X, lse if sw is None else sw, lse, *p.kernel_args(), marks, *parts, n, d, k,
            per, X.stride(0), X.stride(1), CANCEL=p.cancel, HAS_SW=sw is not None,
            PASS=pass_, BLOCK_N=cfg.block_n, BLOCK_D=bd, BLOCK_Q=bq,
            PRECISION=dot_precision(dt), **cfg.launch())
        return [a.to(f64).sum(0) for a in parts]

    # each pass's partials summed over its splits, then the passes added in order
    return (ll, *(sum(sums) for sums in zip(*launch_passes("mppca_stats", X, p, launch))))
