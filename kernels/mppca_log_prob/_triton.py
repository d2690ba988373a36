"""Triton ``mppca_log_prob``: the (n, K) log-density matrix of a mixture of PPCA
on torch tensors.

Design: one program per (block of rows, component), three ``tl.dot`` products
on the directly centred rows (``kernels/_triton_low_rank.py`` has the algebra,
the float32 exact path's pass of its own, and the limits; rows past 128 padded
features take ``_triton_low_rank_wide.py``'s kernels).  The output is n x K
by definition of this op; fitting streams through ``mppca_stats`` instead.
"""

import torch
import triton
import triton.language as tl

from .._triton_gaussian import dot_precision, load_rows
from .._triton_launch import cdiv, launch_kernel
from .._triton_low_rank import (FAST_ROWS, TritonLowRankParams, launch_passes,
                                marking_pass_rows, new_marks, pass_component,
                                pass_tile_has_rows)
from .._triton_low_rank_wide import wide_log_prob, wide_low_rank_rows


@triton.jit
def _log_prob_kernel(x_ptr, mu_ptr, b_ptr, l_inv_ptr, inv_noise_ptr, const_ptr, b64_ptr,
                     inv_noise64_ptr, const64_ptr, flags_ptr, out_ptr, n_rows, n_feat, stride_n,
                     stride_d, stride_on, CANCEL: tl.constexpr, PASS: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr,
                     PRECISION: tl.constexpr):
    """One column block out[rows, k]: every row (marking, in float32's first pass,
    those that need the exact path under k), or the marked rows (the exact pass)."""
    k = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    rows_in = marking_pass_rows(flags_ptr, rows, row_ok, PASS)
    if pass_tile_has_rows(rows_in, PASS):
        x = load_rows(x_ptr, rows, n_rows, n_feat, stride_n, stride_d, 0, BLOCK_D)
        _, _, logp, exact = pass_component(x, rows_in, k, mu_ptr, b_ptr, l_inv_ptr,
                                           inv_noise_ptr, const_ptr, b64_ptr, inv_noise64_ptr,
                                           const64_ptr, CANCEL, PASS, BLOCK_D, BLOCK_Q,
                                           PRECISION)
        tl.store(out_ptr + rows.to(tl.int64) * stride_on + k, logp, mask=rows_in)
        if PASS == FAST_ROWS:
            # programs of other components mark the same rows: each writes only 1s
            # (over zeros), so the marks do not depend on their order
            tl.store(flags_ptr + rows, tl.full((BLOCK_N,), 1, dtype=tl.int8), mask=exact)


def mppca_log_prob_triton(X, means, components, noise_variance):
    """(n, K) log N(x_n | mu_k, W_k^T W_k + sigma_k^2 I), X's dtype and device.

    Parameters
    ----------
    X : torch.Tensor (n, D) float32/float64, CUDA (or CPU under TRITON_INTERPRET=1)
    means : array-like (K, D)
    components : array-like (K, q, D)
    noise_variance : array-like (K,)

    Returns
    -------
    torch.Tensor (n, K) on X's device
    """
    with torch.no_grad():
        p = TritonLowRankParams(X, means, components, noise_variance)
        n, k = X.shape[0], p.n_components
        out = torch.empty(n, k, device=X.device, dtype=X.dtype)
        if n == 0:
            return out
        if wide_low_rank_rows(p.block_d):  # features in steps, chunk by chunk
            return wide_log_prob(X, p, out)
        marks = new_marks(X, p)
        if p.cancel:
            marks.zero_()  # the first pass writes only the 1s

        def launch(cfg, pass_):
            launch_kernel(_log_prob_kernel, (cdiv(n, cfg.block_n), k),
                X, *p.kernel_args(), marks, out, n, p.n_features, X.stride(0), X.stride(1),
                out.stride(0), CANCEL=p.cancel, PASS=pass_, BLOCK_N=cfg.block_n,
                BLOCK_D=p.block_d, BLOCK_Q=p.block_q, PRECISION=dot_precision(X.dtype),
                **cfg.launch())

        launch_passes("mppca_log_prob", X, p, launch, row_pass=True)
        return out
