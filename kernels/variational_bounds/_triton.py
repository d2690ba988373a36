"""Triton forward kernels of the fused VAE bounds, on torch CUDA tensors.

Design: the same pass as the Numba backend.  One program takes BLOCK_R of the
(k * batch) decoder rows and sweeps their D pixels in BLOCK_D tiles: each tile
is read once, its log-likelihood terms summed per row in float64, and, when
gradients are wanted, d log p / d(decoder output) written in the input's dtype
for the backward pass to scale in place (:mod:`.._vae_autograd`).  The
(k x batch x D) per-pixel log-probabilities are never stored, and the rows of
the first sample check the data's support (counted per program, no atomics).
A second kernel adds the latent terms log p(z) - log q(z | x) of the
importance-weighted bound.

Tile sizes are fixed (no autotuner): they fix the order of every sum, so the
same inputs give the same bits on every run.  Limits: float32 / float64,
C-contiguous inputs; softplus is max(v, 0) + log(1 + exp(-|v|)), accurate to
the dtype's epsilon in absolute terms per pixel.
"""

import torch
import triton
import triton.language as tl

from fastlvm._dispatch import triton_interpreter_on as interpreting

from .._vae_autograd import BoundKernels, elbo_function, iwae_function
from ..gaussian_kl._triton import gaussian_kl_triton_forward
from ..log_mean_exp._triton import log_mean_exp_triton_forward

_HALF_LOG_2PI = 0.9189385332046727


@triton.jit
def _bernoulli_rows_kernel(x_ptr, v_ptr, logp_ptr, grad_ptr, bad_ptr, n_rows, n_batch,
                           n_features, WANT_GRAD: tl.constexpr, BLOCK_R: tl.constexpr,
                           BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    xrows = rows % n_batch
    acc = tl.zeros((BLOCK_R,), dtype=tl.float64)
    bad = tl.zeros((BLOCK_R,), dtype=tl.int32)
    for d0 in range(0, n_features, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (cols[None, :] < n_features)
        xv = tl.load(x_ptr + xrows[:, None] * n_features + cols[None, :], mask=mask, other=0.0)
        v = tl.load(v_ptr + rows[:, None] * n_features + cols[None, :], mask=mask, other=0.0)
        e = tl.exp(-tl.abs(v))
        term = xv * v - (tl.maximum(v, 0.0) + tl.log(1.0 + e))
        acc += tl.sum(tl.where(mask, term, 0.0).to(tl.float64), axis=1)
        outside = mask & (rows[:, None] < n_batch) & ~((xv >= 0.0) & (xv <= 1.0))
        bad += tl.sum(outside.to(tl.int32), axis=1)
        if WANT_GRAD:
            sig = tl.where(v >= 0.0, 1.0 / (1.0 + e), e / (1.0 + e))
            tl.store(grad_ptr + rows[:, None] * n_features + cols[None, :], xv - sig,
                     mask=mask)
    tl.store(logp_ptr + rows, acc, mask=row_ok)
    tl.store(bad_ptr + rows, bad, mask=row_ok & (rows < n_batch))


@triton.jit
def _gaussian_rows_kernel(x_ptr, m_ptr, lv_ptr, logp_ptr, dm_ptr, dlv_ptr, bad_ptr, n_rows,
                          n_batch, n_features, PER_ELEMENT: tl.constexpr,
                          WANT_MEAN: tl.constexpr, WANT_LOGVAR: tl.constexpr,
                          BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    xrows = rows % n_batch
    lv_rows = rows if PER_ELEMENT else rows * 0
    acc = tl.zeros((BLOCK_R,), dtype=tl.float64)
    bad = tl.zeros((BLOCK_R,), dtype=tl.int32)
    for d0 in range(0, n_features, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (cols[None, :] < n_features)
        offs = rows[:, None] * n_features + cols[None, :]
        xv = tl.load(x_ptr + xrows[:, None] * n_features + cols[None, :], mask=mask, other=0.0)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0)
        lv = tl.load(lv_ptr + lv_rows[:, None] * n_features + cols[None, :], mask=mask,
                     other=0.0)
        resid = xv - m
        scaled = resid * tl.exp(-lv)
        term = lv + resid * scaled
        acc += tl.sum(tl.where(mask, term, 0.0).to(tl.float64), axis=1)
        finite = (xv == xv) & (tl.abs(xv) < float("inf"))
        bad += tl.sum((mask & (rows[:, None] < n_batch) & ~finite).to(tl.int32), axis=1)
        if WANT_MEAN:
            tl.store(dm_ptr + offs, scaled, mask=mask)
        if WANT_LOGVAR:
            tl.store(dlv_ptr + offs, 0.5 * (resid * scaled - 1.0), mask=mask)
    tl.store(logp_ptr + rows, -0.5 * acc, mask=row_ok)  # the 2 pi term: on the host, in float64
    tl.store(bad_ptr + rows, bad, mask=row_ok & (rows < n_batch))


@triton.jit
def _latent_rows_kernel(z_ptr, mu_ptr, lv_ptr, logw_ptr, dz_ptr, n_rows, n_batch, n_latent,
                        WANT_GRAD: tl.constexpr, BLOCK_R: tl.constexpr,
                        BLOCK_L: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    qrows = rows % n_batch
    acc = tl.zeros((BLOCK_R,), dtype=tl.float64)
    for j0 in range(0, n_latent, BLOCK_L):
        cols = j0 + tl.arange(0, BLOCK_L)
        mask = row_ok[:, None] & (cols[None, :] < n_latent)
        qoffs = qrows[:, None] * n_latent + cols[None, :]
        zv = tl.load(z_ptr + rows[:, None] * n_latent + cols[None, :], mask=mask, other=0.0)
        diff = zv - tl.load(mu_ptr + qoffs, mask=mask, other=0.0)
        lv = tl.load(lv_ptr + qoffs, mask=mask, other=0.0)
        u = diff * tl.exp(-lv)
        acc += tl.sum(tl.where(mask, lv + u * diff - zv * zv, 0.0).to(tl.float64), axis=1)
        if WANT_GRAD:
            tl.store(dz_ptr + rows[:, None] * n_latent + cols[None, :], u - zv, mask=mask)
    logw = tl.load(logw_ptr + rows, mask=row_ok, other=0.0)
    tl.store(logw_ptr + rows, logw + 0.5 * acc, mask=row_ok)


def _tiles(n_cols):
    """(BLOCK_R, BLOCK_D): small tiles under the interpreter, to cross tile edges."""
    if interpreting():
        return 4, 16
    return 4, min(1024, max(16, triton.next_power_of_2(n_cols)))


def reconstruction_triton(x, dec, dec_logvar, likelihood, want_dec, want_logvar):
    """As :func:`fastlvm.kernels.variational_bounds._numba.reconstruction_numba`."""
    k, n_batch, n_features = dec.shape
    rows = k * n_batch
    log_p = torch.empty((k, n_batch), dtype=torch.float64, device=dec.device)
    bad = torch.zeros(n_batch, dtype=torch.int32, device=dec.device)
    d_dec = torch.empty_like(dec) if want_dec else None
    d_lv = torch.empty_like(dec) if want_logvar else None
    block_r, block_d = _tiles(n_features)
    grid = (triton.cdiv(rows, block_r),)
    if likelihood == "bernoulli":
        _bernoulli_rows_kernel[grid](x, dec, log_p, d_dec if want_dec else log_p, bad, rows,
                                     n_batch, n_features, WANT_GRAD=want_dec,
                                     BLOCK_R=block_r, BLOCK_D=block_d)
    else:
        _gaussian_rows_kernel[grid](x, dec, dec_logvar, log_p,
                                    d_dec if want_dec else log_p,
                                    d_lv if want_logvar else log_p, bad, rows, n_batch,
                                    n_features, PER_ELEMENT=dec_logvar.ndim == 3,
                                    WANT_MEAN=want_dec, WANT_LOGVAR=want_logvar,
                                    BLOCK_R=block_r, BLOCK_D=block_d)
        log_p -= n_features * _HALF_LOG_2PI
    return log_p, bad, d_dec, d_lv  # the counts stay on the device until checked


def latent_triton(z, mu, logvar, log_w, want_grad):
    """As :func:`fastlvm.kernels.variational_bounds._numba.latent_numba`."""
    k, n_batch, n_latent = z.shape
    d_z = torch.empty_like(z) if want_grad else None
    block_r, block_l = _tiles(n_latent)
    _latent_rows_kernel[(triton.cdiv(k * n_batch, block_r),)](
        z, mu, logvar, log_w, d_z if want_grad else log_w, k * n_batch, n_batch, n_latent,
        WANT_GRAD=want_grad, BLOCK_R=block_r, BLOCK_L=block_l)
    return d_z


TRITON_KERNELS = BoundKernels(reconstruction=reconstruction_triton, latent=latent_triton,
                              gaussian_kl=gaussian_kl_triton_forward,
                              log_mean_exp=log_mean_exp_triton_forward)


def elbo_triton(*args, **kwargs):
    """:func:`fastlvm.kernels.elbo` on the Triton kernels (torch CUDA tensors)."""
    return elbo_function(TRITON_KERNELS, *args, **kwargs)


def iwae_bound_triton(*args, **kwargs):
    """:func:`fastlvm.kernels.iwae_bound` on the Triton kernels (torch CUDA tensors)."""
    return iwae_function(TRITON_KERNELS, *args, **kwargs)
