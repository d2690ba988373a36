"""Triton forward kernel of the log-mean-exp over importance samples.

Design: one program per BLOCK_B columns; two sweeps over the k samples in
BLOCK_K tiles (the maximum, then the shifted sum), a third writes the
normalised weights softmax_s(log_w[:, b]) for the backward pass.  Sums are
taken in float64, in a fixed order.  Non-finite maxima follow
``torch.logsumexp``, as in the Numba kernel.  Limits: (k, batch) float32 /
float64 input, C-contiguous.
"""

import torch
import triton
import triton.language as tl

from .._triton_launch import cdiv, interpreting, launch_kernel, next_power_of_2


@triton.jit
def _log_mean_exp_kernel(w_ptr, out_ptr, weights_ptr, k, n_cols,
                         BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    col_ok = cols < n_cols
    m_tile = tl.full((BLOCK_K, BLOCK_B), float("-inf"), dtype=tl.float64)
    for s0 in range(0, k, BLOCK_K):
        ss = s0 + tl.arange(0, BLOCK_K)
        mask = (ss[:, None] < k) & col_ok[None, :]
        v = tl.load(w_ptr + ss[:, None] * n_cols + cols[None, :], mask=mask,
                    other=float("-inf")).to(tl.float64)
        m_tile = tl.maximum(m_tile, v)
    m = tl.max(m_tile, axis=0)
    finite = tl.abs(m) < float("inf")
    shift = tl.where(finite, m, 0.0)
    s_tile = tl.zeros((BLOCK_K, BLOCK_B), dtype=tl.float64)
    for s0 in range(0, k, BLOCK_K):
        ss = s0 + tl.arange(0, BLOCK_K)
        mask = (ss[:, None] < k) & col_ok[None, :]
        v = tl.load(w_ptr + ss[:, None] * n_cols + cols[None, :], mask=mask,
                    other=float("-inf")).to(tl.float64)
        s_tile += tl.exp(v - shift[None, :])
    total = tl.where(col_ok, tl.sum(s_tile, axis=0), 1.0)
    log_k = tl.log(tl.zeros((BLOCK_B,), dtype=tl.float64) + k)
    out = tl.where(finite, shift + tl.log(total) - log_k, m)
    out = tl.where(total == total, out, total)
    tl.store(out_ptr + cols, out.to(out_ptr.dtype.element_ty), mask=col_ok)
    scale = tl.where(finite, 1.0 / total, float("nan"))
    for s0 in range(0, k, BLOCK_K):
        ss = s0 + tl.arange(0, BLOCK_K)
        mask = (ss[:, None] < k) & col_ok[None, :]
        v = tl.load(w_ptr + ss[:, None] * n_cols + cols[None, :], mask=mask,
                    other=float("-inf")).to(tl.float64)
        tl.store(weights_ptr + ss[:, None] * n_cols + cols[None, :],
                 tl.exp(v - shift[None, :]) * scale[None, :], mask=mask)


def log_mean_exp_triton_forward(log_w, out_dtype=torch.float64):
    """As :func:`fastlvm.kernels.log_mean_exp._numba.log_mean_exp_numba_forward` (the
    bound is rounded to ``out_dtype`` as the kernel stores it)."""
    k, n_cols = log_w.shape
    out = torch.empty(n_cols, dtype=out_dtype, device=log_w.device)
    weights = torch.empty((k, n_cols), dtype=torch.float64, device=log_w.device)
    block_k = 4 if interpreting() else min(64, max(16, next_power_of_2(k)))
    block_b = 16 if interpreting() else 64
    launch_kernel(_log_mean_exp_kernel, (cdiv(n_cols, block_b),),
        log_w, out, weights, k, n_cols, BLOCK_K=block_k, BLOCK_B=block_b)
    return out, weights


def log_mean_exp_triton(log_w):
    """:func:`fastlvm.kernels.log_mean_exp` on the Triton kernel (torch CUDA tensors)."""
    from .._vae_autograd import LogMeanExpFunction

    return LogMeanExpFunction.apply(log_w, log_mean_exp_triton_forward)
