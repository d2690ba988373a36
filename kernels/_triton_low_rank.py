"""Triton building blocks of the mixture-of-PPCA kernels (``mppca_log_prob``,
``mppca_stats``) on torch tensors.

Design
------
Component k has C_k = W_k^T W_k + sigma_k^2 I (``kernels/_low_rank.py`` has the
algebra).  A tile of BLOCK_N rows is held in registers and, per component,
taken through three ``tl.dot`` products, all on differences taken directly:

    c = x - mu_k            (BLOCK_N, BLOCK_D)
    u = c B_k               (BLOCK_N, BLOCK_Q)   whitened projections, B_k = W_k^T L_k^{-T}
    r = c - u B_k^T         (BLOCK_N, BLOCK_D)   the residual off the subspace
    z = u L_k^{-1}          (BLOCK_N, BLOCK_Q)   the posterior mean E[z | x]

    log N(x | mu_k, C_k) = const_k - (|r|^2 / sigma_k^2 + |z|^2) / 2

This is the cancellation-free form of the reference, where the shorter
(|c|^2 - |u|^2) / sigma^2 cancels as soon as most of a row's spread lies in the
component's subspace.  The explicit residual still loses digits in proportion
to |c| / |r| (the rounding of c and of u B^T is relative to |c|), so in float32
rows with |r|^2 < 2^-10 |c|^2 (keeping fewer than ~18 bits) are recomputed in
float64, for the whole tile and only when one of its rows needs it: c = x - mu_k
taken in float64 and (|c|^2 - |u|^2) / sigma^2 with float64 loadings, which
keeps 53 - log2(|c|^2 / |r|^2) bits.  Nothing of size n x K x D is formed.

Features are zero-padded to BLOCK_D and latent dimensions to BLOCK_Q (powers of
two, at least 16, which ``tl.dot`` needs) in every parameter buffer.  float32
products use the precision of :func:`dot_precision`; float64 is IEEE.

Limits: a tile holds all BLOCK_D columns in registers (D up to 256 runs well,
as for the Gaussian kernels); BLOCK_Q >= 16, so q < 16 pads the latent products.
"""

import torch
import triton
import triton.language as tl

from ._low_rank import inverse_cholesky, log_norm_constants, low_rank_factors
from ._triton_gaussian import (TileConfig, block_d, dot_precision, finish_logsumexp,
                               interpreting, launch_fitted, load_rows,
                               online_logsumexp_column, require_int32_rows, store_log_norm)


# float32: recompute a tile in float64 where a row keeps |r|^2 < this |c|^2
EXACT_PATH_BELOW = 2.0**-10


class TritonLowRankParams:
    """Padded device parameters of a mixture of PPCA for the Triton kernels.

    Attributes (torch tensors on X's device, X's dtype, contiguous, unless said)
    ----------
    block_d, block_q : int, padded feature and latent widths
    mu : (K, BLOCK_D) means rounded to X's dtype
    b : (K, BLOCK_D, BLOCK_Q) whitened loadings B_k
    l_inv : (K, BLOCK_Q, BLOCK_Q) L_k^{-1}
    inv_noise : (K,) 1 / sigma_k^2
    const : (K,) -0.5 (D log 2 pi + log det C_k), plus log w_k when weights are given
    b_64, inv_noise_64, const_64 : float64 copies for the exact path
    cancel : float, the exact path's threshold on |r|^2 / |c|^2 (0: never, for float64)
    mu_64 : (K, D) float64, the means as the kernels apply them (the statistics' centres)
    chol : (K, q, q) float64, L_k (maps u to the projections y = W_k c = L_k u)
    """

    def __init__(self, X, means, components, noise_variance, log_weights=None):
        require_int32_rows(X.shape[0])
        dev, dt = X.device, X.dtype
        f64 = dict(device=dev, dtype=torch.float64)
        w = torch.as_tensor(components, **f64)
        s2 = torch.as_tensor(noise_variance, **f64)
        k, q, d = w.shape
        bd, bq = block_d(d), block_d(q)
        chol, log_det, whitened = low_rank_factors(w, s2)
        const = log_norm_constants(log_det, d)
        if log_weights is not None:
            const = const + torch.as_tensor(log_weights, **f64)
        self.mu_64 = torch.as_tensor(means, **f64).to(dt).to(torch.float64)
        self.chol = chol
        self.block_d, self.block_q = bd, bq
        self.n_components, self.n_features, self.n_latent = k, d, q

        def padded(a, shape, dtype=dt):
            out = torch.zeros(shape, **f64)
            out[tuple(slice(0, s) for s in a.shape)] = a
            return out.to(dtype).contiguous()

        self.mu = padded(self.mu_64, (k, bd))
        self.b = padded(whitened, (k, bd, bq))
        self.l_inv = padded(inverse_cholesky(chol), (k, bq, bq))
        self.inv_noise = (1.0 / s2).to(dt).contiguous()
        self.const = const.to(dt).contiguous()
        self.cancel = EXACT_PATH_BELOW if dt == torch.float32 else 0.0
        if self.cancel:
            self.b_64 = padded(whitened, (k, bd, bq), torch.float64)
            self.inv_noise_64, self.const_64 = 1.0 / s2, const.contiguous()
        else:
            self.b_64, self.inv_noise_64, self.const_64 = self.b, self.inv_noise, self.const

    def kernel_args(self):
        return (self.mu, self.b, self.l_inv, self.inv_noise, self.const, self.b_64,
                self.inv_noise_64, self.const_64)


def low_rank_config(dtype, bd):
    """The :class:`TileConfig` of the low-rank kernels (block_k and block_j unused).

    A fixed table, as for the Gaussian kernels (tile sizes fix the order of
    every sum): rows per tile shrink as D grows, since a tile keeps its centred
    rows and their residuals in registers.
    """
    if interpreting():
        return TileConfig(16, 16, 16, 4, 1)
    f64 = dtype == torch.float64
    if bd <= 64:
        bn = 32 if f64 else 64
    elif bd <= 128:
        bn = 32
    else:
        bn = 16
    return TileConfig(bn, 16, 16, 4 if bd <= 64 else 8, 1)


@triton.jit
def low_rank_tile(x, row_ok, k, mu_ptr, b_ptr, l_inv_ptr, inv_noise_ptr, const_ptr, b64_ptr,
                  inv_noise64_ptr, const64_ptr, CANCEL: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_Q: tl.constexpr, PRECISION: tl.constexpr):
    """(c, u, logp): centred rows, whitened projections and const_k + log N(x | k)
    for a (BLOCK_N, BLOCK_D) tile of rows under component k (see the module doc;
    ``row_ok`` keeps rows past the end from calling for the exact path)."""
    cols = tl.arange(0, BLOCK_D)
    lat = tl.arange(0, BLOCK_Q)
    b_off = k * BLOCK_D * BLOCK_Q + cols[:, None] * BLOCK_Q + lat[None, :]
    mu = tl.load(mu_ptr + k * BLOCK_D + cols)
    c = x - mu[None, :]
    b = tl.load(b_ptr + b_off)
    u = tl.dot(c, b, input_precision=PRECISION)
    r = c - tl.dot(u, tl.trans(b), input_precision=PRECISION)
    l_inv = tl.load(l_inv_ptr + k * BLOCK_Q * BLOCK_Q + lat[:, None] * BLOCK_Q + lat[None, :])
    z = tl.dot(u, l_inv, input_precision=PRECISION)
    rr = tl.sum(r * r, axis=1)
    logp = tl.load(const_ptr + k) - 0.5 * (rr * tl.load(inv_noise_ptr + k)
                                           + tl.sum(z * z, axis=1))
    if CANCEL > 0:
        exact = row_ok & (rr < CANCEL * tl.sum(c * c, axis=1))
        if tl.max(exact.to(tl.int32), axis=0) > 0:
            c64 = x.to(tl.float64) - mu.to(tl.float64)[None, :]
            u64 = tl.dot(c64, tl.load(b64_ptr + b_off), input_precision="ieee")
            quad = (tl.sum(c64 * c64, axis=1) - tl.sum(u64 * u64, axis=1)) * tl.load(
                inv_noise64_ptr + k)
            logp = tl.where(exact, (tl.load(const64_ptr + k) - 0.5 * quad).to(logp.dtype),
                            logp)
    return c, u, logp


@triton.jit
def _low_rank_log_norm_kernel(x_ptr, sw_ptr, mu_ptr, b_ptr, l_inv_ptr, inv_noise_ptr,
                              const_ptr, b64_ptr, inv_noise64_ptr, const64_ptr, log_norm_ptr,
                              ll_part_ptr, n_rows, n_feat, n_comp, stride_n, stride_d,
                              CANCEL: tl.constexpr, HAS_SW: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                              BLOCK_Q: tl.constexpr, PRECISION: tl.constexpr):
    """log sum_k w_k N(x_n | k) for one block of rows, online over the components;
    writes the (BLOCK_N,) log-normalisers and the block's partial log-likelihood."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    x = load_rows(x_ptr, rows, n_rows, n_feat, stride_n, stride_d, 0, BLOCK_D)
    m = tl.full((BLOCK_N,), float("-inf"), dtype=x.dtype)
    s = tl.zeros((BLOCK_N,), dtype=x.dtype)
    for k in range(0, n_comp):
        _, _, logp = low_rank_tile(x, row_ok, k, mu_ptr, b_ptr, l_inv_ptr, inv_noise_ptr,
                                   const_ptr, b64_ptr, inv_noise64_ptr, const64_ptr, CANCEL,
                                   BLOCK_D, BLOCK_Q, PRECISION)
        m, s = online_logsumexp_column(m, s, logp)
    store_log_norm(finish_logsumexp(m, s), rows, row_ok, sw_ptr, log_norm_ptr, ll_part_ptr,
                   pid, HAS_SW)


def low_rank_log_norm(X, params, sample_weight=None):
    """Per-row log-normaliser and the weighted log-likelihood, on X's device.

    Parameters
    ----------
    X : torch.Tensor (n, D), float32/float64
    params : TritonLowRankParams built with the log-weights
    sample_weight : torch.Tensor (n,) of X's dtype, or None

    Returns
    -------
    log_norm : torch.Tensor (n,), X's dtype
    log_likelihood : torch.Tensor (), float64 (fixed-order sum of block partials)
    """
    n = X.shape[0]
    precision = dot_precision(X.dtype)
    out = torch.empty(n, device=X.device, dtype=X.dtype)
    sw = sample_weight if sample_weight is not None else params.const

    def launch(cfg):
        n_blocks = max(1, triton.cdiv(n, cfg.block_n))
        part = torch.empty(n_blocks, device=X.device, dtype=X.dtype)
        _low_rank_log_norm_kernel[(n_blocks,)](
            X, sw, *params.kernel_args(), out, part, n, params.n_features,
            params.n_components, X.stride(0), X.stride(1), CANCEL=params.cancel,
            HAS_SW=sample_weight is not None,
            BLOCK_N=cfg.block_n, BLOCK_D=params.block_d, BLOCK_Q=params.block_q,
            PRECISION=precision, **cfg.launch())
        return part

    key = (X.dtype, params.block_d, params.block_q, precision)
    part = launch_fitted("low_rank_log_norm", key, low_rank_config(X.dtype, params.block_d),
                         launch)
    return out, part.to(torch.float64).sum()
