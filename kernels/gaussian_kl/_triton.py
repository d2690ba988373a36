"""Triton forward kernel of the diagonal-Gaussian KL divergence.

Design: one program per BLOCK_R rows, sweeping the L latent columns in
BLOCK_L tiles and summing each row in float64 (fixed tiles, so a fixed order).
The terms are expm1(d) - d + (mu - mu_p)^2 e^-logvar_p with d = logvar -
logvar_p (d = logvar against the standard normal), with expm1 as the Numba
kernel's (the Taylor polynomial below |x| = 1/2, exp - 1 above), so q close to
the prior keeps its digits.  The closed-form backward runs as
torch ops (:mod:`.._vae_autograd`).
Limits: float32 / float64, C-contiguous (batch, L) inputs.
"""

import torch
import triton
import triton.language as tl

from .._triton_launch import cdiv, interpreting, launch_kernel, next_power_of_2


@triton.jit
def _expm1(x):
    """exp(x) - 1 without the cancellation near 0 (see the module doc)."""
    series = tl.full(x.shape, 1.0, x.dtype)
    for i in tl.static_range(17, 1, -1):
        series = 1.0 + x * series / i
    return tl.where(tl.abs(x) < 0.5, x * series, tl.exp(x) - 1.0)


@triton.jit
def kl_rows(mu_ptr, lv_ptr, mp_ptr, lvp_ptr, dlv_ptr, rows, row_ok, n_latent,
            HAS_PRIOR: tl.constexpr, WANT_GRAD: tl.constexpr, BLOCK_L: tl.constexpr):
    """KL of the (batch, L) rows ``rows`` (a vector; float64 sums); against the
    standard normal, with ``WANT_GRAD``, also writes d KL / d logvar =
    expm1(logvar) / 2.  Shared with the fused ELBO kernel."""
    acc = tl.zeros(rows.shape, dtype=tl.float64)
    for j0 in range(0, n_latent, BLOCK_L):
        cols = j0 + tl.arange(0, BLOCK_L)
        mask = row_ok[:, None] & (cols[None, :] < n_latent)
        offs = rows[:, None] * n_latent + cols[None, :]
        mu = tl.load(mu_ptr + offs, mask=mask, other=0.0)
        lv = tl.load(lv_ptr + offs, mask=mask, other=0.0)
        if HAS_PRIOR:
            diff = mu - tl.load(mp_ptr + offs, mask=mask, other=0.0)
            lvp = tl.load(lvp_ptr + offs, mask=mask, other=0.0)
            delta = lv - lvp
            term = _expm1(delta) - delta + diff * diff * tl.exp(-lvp)
        else:
            e = _expm1(lv)
            term = e + mu * mu - lv
            if WANT_GRAD:
                tl.store(dlv_ptr + offs, 0.5 * e, mask=mask)
        acc += tl.sum(tl.where(mask, term, 0.0).to(tl.float64), axis=1)
    return 0.5 * acc


@triton.jit
def _gaussian_kl_kernel(mu_ptr, lv_ptr, mp_ptr, lvp_ptr, out_ptr, n_rows, n_latent,
                        HAS_PRIOR: tl.constexpr, BLOCK_R: tl.constexpr,
                        BLOCK_L: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    kl = kl_rows(mu_ptr, lv_ptr, mp_ptr, lvp_ptr, out_ptr, rows, row_ok, n_latent, HAS_PRIOR,
                 False, BLOCK_L)
    tl.store(out_ptr + rows, kl, mask=row_ok)


def gaussian_kl_triton_forward(mu, logvar, mu_prior=None, logvar_prior=None, want_grad=False):
    """As :func:`fastlvm.kernels.gaussian_kl._numba.gaussian_kl_numba_forward`, but the
    gradient buffer is never written (``(kl, None)``): the backward's torch ops
    run on the GPU too."""
    n_rows, n_latent = mu.shape
    out = torch.empty(n_rows, dtype=torch.float64, device=mu.device)
    block_r = 4 if interpreting() else 16
    block_l = 16 if interpreting() else min(256, max(16, next_power_of_2(n_latent)))
    has_prior = mu_prior is not None
    launch_kernel(_gaussian_kl_kernel, (cdiv(n_rows, block_r),),
        mu, logvar, mu_prior if has_prior else mu, logvar_prior if has_prior else mu, out,
        n_rows, n_latent, HAS_PRIOR=has_prior, BLOCK_R=block_r, BLOCK_L=block_l)
    return out, None


def gaussian_kl_triton(mu, logvar, mu_prior=None, logvar_prior=None):
    """:func:`fastlvm.kernels.gaussian_kl` on the Triton kernel (torch CUDA tensors)."""
    from .._vae_autograd import GaussianKLFunction

    return GaussianKLFunction.apply(mu, logvar, mu_prior, logvar_prior,
                                    gaussian_kl_triton_forward)
