"""Triton ``gaussian_log_prob``: the (n, K) log-density matrix on torch tensors.

Design: one program per (block of rows, tile of components) for 'tied', 'diag'
and 'spherical', computing the tile with ``tl.dot`` on rows shifted by one
centre (``kernels/_triton_gaussian.py`` has the algebra and its limits); one
program per (block of rows, component) for 'full', whose difference
x - mu_k is taken directly before the D x D triangular product.  Rows past 256
padded features go through the chunked E-step's log-density kernels instead,
which step through the features (``estep_stats/_triton_chunked.py``, 'full''s in
``estep_stats/_triton_square_blocks.py``).  The output is n x K by definition of
this op; the fitting path never calls it (it streams through ``estep_stats``),
only predict / predict_proba do, chunk by chunk.
"""

import torch
import triton
import triton.language as tl

from .._covariance import FULL
from .._triton_gaussian import (GaussianTileParams, dot_precision, full_log_prob, launch_fitted,
                                load_shifted_rows, row_quadratic, tile_config, tile_log_prob)
from .._triton_launch import cdiv, launch_kernel
from ..estep_stats._triton_chunked import chunked_log_prob, wide_rows


@triton.jit
def _log_prob_kernel(x_ptr, c0_ptr, a_ptr, b_ptr, s_ptr, c_ptr, u_ptr, out_ptr, n_rows,
                     n_feat, n_comp, stride_n, stride_d, stride_on, COV: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_J: tl.constexpr, PRECISION: tl.constexpr):
    """One (BLOCK_N, BLOCK_K) tile of log-densities ('full': one column)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    x = load_shifted_rows(x_ptr, c0_ptr, rows, n_rows, n_feat, stride_n, stride_d, 0, BLOCK_D)
    if COV == 0:
        _, logp = full_log_prob(x, pid_k, a_ptr, u_ptr, c_ptr, BLOCK_D, BLOCK_J, PRECISION)
        tl.store(out_ptr + rows.to(tl.int64) * stride_on + pid_k, logp, mask=row_ok)
    else:
        q = row_quadratic(x, u_ptr, COV, BLOCK_D, BLOCK_J, PRECISION)
        k0 = pid_k * BLOCK_K
        logp = tile_log_prob(x, q, a_ptr, b_ptr, s_ptr, c_ptr, k0, n_comp, COV, BLOCK_K,
                             BLOCK_D, PRECISION)
        ks = k0 + tl.arange(0, BLOCK_K)
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_on + ks[None, :], logp,
                 mask=row_ok[:, None] & (ks[None, :] < n_comp))


def gaussian_log_prob_triton(X, means, precisions_cholesky, covariance_type,
                             log_weights=None):
    """(n, K) log N(x_n | mu_k, Sigma_k) (+ log_weights[k] when given), X's dtype.

    Parameters
    ----------
    X : torch.Tensor (n, D) float32/float64, CUDA (or CPU under TRITON_INTERPRET=1)
    means : array-like (K, D)
    precisions_cholesky : array-like, sklearn's shape for ``covariance_type``
    covariance_type : str
    log_weights : array-like (K,), optional; folded into the per-component constant

    Returns
    -------
    torch.Tensor (n, K) on X's device
    """
    with torch.no_grad():
        p = GaussianTileParams(X, means, precisions_cholesky, covariance_type, log_weights)
        n, k = X.shape[0], p.n_components
        out = torch.empty(n, k, device=X.device, dtype=X.dtype)
        if n == 0:
            return out
        precision = dot_precision(p.dtype)  # the compute dtype; ``out`` is X's
        if wide_rows(p.block_d):  # the chunks' kernel steps through the features
            return chunked_log_prob(X, p, precision, out)
        cfg = tile_config(p.code, p.dtype, p.block_d, precision, k)

        def launch(cfg):
            grid = (cdiv(n, cfg.block_n),
                    k if p.code == FULL else cdiv(k, cfg.block_k))
            launch_kernel(_log_prob_kernel, grid,
                X, p.c0, p.a, p.b, p.s, p.c, p.u, out, n, p.n_features, k, X.stride(0),
                X.stride(1), out.stride(0), COV=p.code, BLOCK_N=cfg.block_n,
                BLOCK_K=cfg.block_k, BLOCK_D=p.block_d, BLOCK_J=cfg.block_j,
                PRECISION=precision, **cfg.launch())

        launch_fitted("log_prob", (p.code, X.dtype, p.dtype, p.block_d, precision, cfg.block_k),
                      cfg, launch)
        return out
