"""Triton ``log_responsibilities``: row-wise log-sum-exp normalisation.

Design: one program per block of rows; three sweeps over the row's component
tiles (maximum, shifted sum, write), each tile read from memory again (it sits
in L2), so any K runs in registers of BLOCK_N x BLOCK_K.  Semantics follow the
reference exactly: rows that are all -inf get log_norm = -inf and NaN
log-responsibilities, NaN and +inf propagate, and the result is
(v - max) - log(sum), exact for huge magnitudes.
"""

import torch
import triton
import triton.language as tl

from .._triton_gaussian import interpreting, require_int32_rows
from .._triton_launch import cdiv, launch_kernel, next_power_of_2


@triton.jit
def _log_resp_kernel(v_ptr, resp_ptr, norm_ptr, n_rows, n_comp, stride_v, stride_r,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    v_rows = v_ptr + rows.to(tl.int64)[:, None] * stride_v  # int64: n x K may pass 2^31
    # element-wise running max and sum over the tiles, reduced once after each sweep
    # (no reduction inside the loops: Triton 3.6 miscompiles that pattern here)
    m_tile = tl.full((BLOCK_N, BLOCK_K), float("-inf"), dtype=v_ptr.dtype.element_ty)
    for k0 in range(0, n_comp, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        mask = row_ok[:, None] & (ks[None, :] < n_comp)
        v = tl.load(v_rows + ks[None, :], mask=mask,
                    other=float("-inf"))
        m_tile = tl.maximum(m_tile, v)
    m = tl.max(m_tile, axis=1)
    # a NaN entry makes the sum below NaN, so log_norm and the row come out NaN
    # whether or not the maximum saw it
    finite = (m == m) & (tl.abs(m) < float("inf"))
    m_f = tl.where(finite, m, 0.0)
    s_tile = tl.zeros((BLOCK_N, BLOCK_K), dtype=v_ptr.dtype.element_ty)
    for k0 in range(0, n_comp, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        mask = row_ok[:, None] & (ks[None, :] < n_comp)
        v = tl.load(v_rows + ks[None, :], mask=mask,
                    other=float("-inf"))
        s_tile += tl.exp(v - m_f[:, None])
    s = tl.sum(s_tile, axis=1)
    log_s = tl.log(s)
    norm = tl.where(finite, m_f + log_s, m)
    tl.store(norm_ptr + rows, norm, mask=row_ok)
    for k0 in range(0, n_comp, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        mask = row_ok[:, None] & (ks[None, :] < n_comp)
        v = tl.load(v_rows + ks[None, :], mask=mask, other=0.0)
        resp = tl.where(finite[:, None], (v - m_f[:, None]) - log_s[:, None],
                        v - norm[:, None])
        tl.store(resp_ptr + rows.to(tl.int64)[:, None] * stride_r + ks[None, :], resp,
                 mask=mask)


def log_responsibilities_triton(V):
    """(log_resp (n, K), log_norm (n,)) of a torch tensor of weighted log-densities."""
    n, k = V.shape
    require_int32_rows(n, "weighted_log_prob")
    if V.stride(1) != 1:
        V = V.contiguous()  # the kernel reads rows with unit column stride
    resp = torch.empty_like(V, memory_format=torch.contiguous_format)
    norm = torch.empty(n, device=V.device, dtype=V.dtype)
    if n == 0:
        return resp, norm
    bn = 16 if interpreting() else 32
    bk = 16 if interpreting() else min(128, max(16, next_power_of_2(k)))
    launch_kernel(_log_resp_kernel, (cdiv(n, bn),), V, resp, norm, n, k, V.stride(0),
                  resp.stride(0), BLOCK_N=bn, BLOCK_K=bk, num_warps=4)
    return resp, norm
