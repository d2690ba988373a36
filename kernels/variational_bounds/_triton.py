"""Triton kernels of the fused VAE bounds, on torch CUDA tensors.

Design: the same passes as the Numba backend.  One program takes BLOCK_R of the
(k * batch) decoder rows and sweeps their D pixels in BLOCK_D tiles: each tile
is read once, its log-likelihood terms summed per row in float64, and, when
gradients are wanted, d log p / d(decoder output) written in the input's dtype
for the backward pass to scale in place (:mod:`.._vae_autograd`).  The
(k x batch x D) per-pixel log-probabilities are never stored, and the rows of
the first sample check the data's support (counted per program, no atomics).
The ELBO runs whole in one launch (one program per BLOCK_R examples: their k
rows through the same row code, their KL to N(0, I), the difference) and its
backward in one more: a GPU session found the composed route (two launches,
five torch kernels forward, about eight backward) bound by host work, with
0.07 ms of device time in a 1 ms call (``bench/results/gpu-h200.md``).
The importance-weighted bound takes two launches forward (the k * batch rows'
reconstruction and latent terms log p(z) - log q(z | x) in one, the
log-mean-exp over the samples in the other) and one backward (each row's
coefficient grad_b w_sb scales its buffers, and the score terms are summed over
the samples), where the composed route ran three kernels and about fifteen torch
ops, each a host launch.  The upstream gradient is read through its stride, so
the stride-0 expansion ``.sum()`` hands back is never copied.

Tile sizes are fixed (no autotuner): they fix the order of every sum, so the
same inputs give the same bits on every run.  Limits: float32 / float64,
C-contiguous inputs; offsets are int32, so a decoder output of 2^31 elements or
more is refused (split the batch); softplus is max(v, 0) + log(1 + exp(-|v|)),
accurate to the dtype's epsilon in absolute terms per pixel.
"""

import torch
import triton
import triton.language as tl

from .._triton_launch import cdiv, interpreting, launch_kernel, next_power_of_2
from .._vae_autograd import BoundKernels, elbo_function, iwae_function, kl_logvar_grad_of
from ..gaussian_kl._triton import gaussian_kl_triton_forward, kl_rows
from ..log_mean_exp._triton import log_mean_exp_triton_forward

_HALF_LOG_2PI = tl.constexpr(0.9189385332046727)


@triton.jit
def _rows_log_likelihood(x_ptr, v_ptr, lv_ptr, dv_ptr, dlv_ptr, rows, row_ok, n_batch,
                         n_features, BERNOULLI: tl.constexpr, PER_ELEMENT: tl.constexpr,
                         WANT_DEC: tl.constexpr, WANT_LV: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    """(summed log-likelihoods, counts of x entries off the support) of the decoder
    rows ``rows`` (a BLOCK_R vector), their derivatives written where wanted.

    Only rows of the first sample (rows < n_batch) count bad entries.  Shared by
    the row kernel and the fused ELBO kernel."""
    xrows = rows % n_batch
    lv_rows = rows if PER_ELEMENT else rows * 0
    acc = tl.zeros(rows.shape, dtype=tl.float64)
    bad = tl.zeros(rows.shape, dtype=tl.int32)
    for d0 in range(0, n_features, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (cols[None, :] < n_features)
        offs = rows[:, None] * n_features + cols[None, :]
        xv = tl.load(x_ptr + xrows[:, None] * n_features + cols[None, :], mask=mask, other=0.0)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)
        if BERNOULLI:
            e = tl.exp(-tl.abs(v))
            term = xv * v - (tl.maximum(v, 0.0) + tl.log(1.0 + e))
            ok = (xv >= 0.0) & (xv <= 1.0)
            if WANT_DEC:
                sig = tl.where(v >= 0.0, 1.0 / (1.0 + e), e / (1.0 + e))
                tl.store(dv_ptr + offs, xv - sig, mask=mask)
        else:
            lv = tl.load(lv_ptr + lv_rows[:, None] * n_features + cols[None, :], mask=mask,
                         other=0.0)
            resid = xv - v
            scaled = resid * tl.exp(-lv)
            term = lv + resid * scaled
            ok = (xv == xv) & (tl.abs(xv) < float("inf"))
            if WANT_DEC:
                tl.store(dv_ptr + offs, scaled, mask=mask)
            if WANT_LV:
                tl.store(dlv_ptr + offs, 0.5 * (resid * scaled - 1.0), mask=mask)
        acc += tl.sum(tl.where(mask, term, 0.0).to(tl.float64), axis=1)
        bad += tl.sum((mask & (rows[:, None] < n_batch) & ~ok).to(tl.int32), axis=1)
    if not BERNOULLI:
        # tl.cast, not n_features.to: the launcher passes an int argument equal to 1
        # as a constexpr (a Python int), which has no .to (D = 1 failed on the H200)
        acc = -0.5 * acc - tl.cast(n_features, tl.float64) * _HALF_LOG_2PI  # in float64
    return acc, bad


@triton.jit
def _reconstruction_rows_kernel(x_ptr, v_ptr, lv_ptr, logp_ptr, dv_ptr, dlv_ptr, bad_ptr,
                                n_rows, n_batch, n_features, BERNOULLI: tl.constexpr,
                                PER_ELEMENT: tl.constexpr, WANT_DEC: tl.constexpr,
                                WANT_LV: tl.constexpr, BLOCK_R: tl.constexpr,
                                BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    acc, bad = _rows_log_likelihood(x_ptr, v_ptr, lv_ptr, dv_ptr, dlv_ptr, rows, row_ok,
                                    n_batch, n_features, BERNOULLI, PER_ELEMENT, WANT_DEC,
                                    WANT_LV, BLOCK_D)
    tl.store(logp_ptr + rows, acc, mask=row_ok)
    tl.store(bad_ptr + rows, bad, mask=row_ok & (rows < n_batch))


@triton.jit
def _elbo_kernel(x_ptr, v_ptr, lv_ptr, mu_ptr, qlv_ptr, out_ptr, dv_ptr, dlv_ptr, dkl_ptr,
                 bad_ptr, n_batch, n_features, n_latent, k, BERNOULLI: tl.constexpr,
                 PER_ELEMENT: tl.constexpr, WANT_DEC: tl.constexpr, WANT_LV: tl.constexpr,
                 WANT_KL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_L: tl.constexpr):
    """The per-example ELBO in one launch: one program per BLOCK_R examples, their
    k reconstruction rows, their KL to N(0, I) (d KL / d logvar written where
    wanted) and the difference, stored in the output's dtype."""
    ex = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ex_ok = ex < n_batch
    rec = tl.zeros((BLOCK_R,), dtype=tl.float64)
    bad = tl.zeros((BLOCK_R,), dtype=tl.int32)
    for s in range(0, k):
        acc, bad_s = _rows_log_likelihood(x_ptr, v_ptr, lv_ptr, dv_ptr, dlv_ptr,
                                          s * n_batch + ex, ex_ok, n_batch, n_features,
                                          BERNOULLI, PER_ELEMENT, WANT_DEC, WANT_LV, BLOCK_D)
        rec += acc
        bad += bad_s
    kl = kl_rows(mu_ptr, qlv_ptr, mu_ptr, qlv_ptr, dkl_ptr, ex, ex_ok, n_latent, False, WANT_KL,
                 BLOCK_L)
    value = rec / k - kl
    tl.store(out_ptr + ex, value.to(out_ptr.dtype.element_ty), mask=ex_ok)
    tl.store(bad_ptr + ex, bad, mask=ex_ok)


@triton.jit
def _scale_rows(dv_ptr, dlv_ptr, rows, row_ok, c, n_features, WANT_DEC: tl.constexpr,
                WANT_LV: tl.constexpr, BLOCK_D: tl.constexpr):
    """Scale the per-pixel derivative rows ``rows`` (a vector) by ``c`` (one value a
    row), in place, in BLOCK_D-wide tiles."""
    for d0 in range(0, n_features, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (cols[None, :] < n_features)
        offs = rows[:, None] * n_features + cols[None, :]
        if WANT_DEC:
            tl.store(dv_ptr + offs, tl.load(dv_ptr + offs, mask=mask) * c[:, None], mask=mask)
        if WANT_LV:
            tl.store(dlv_ptr + offs, tl.load(dlv_ptr + offs, mask=mask) * c[:, None],
                     mask=mask)


@triton.jit
def _elbo_backward_kernel(g_ptr, g_stride, dv_ptr, dlv_ptr, mu_ptr, dkl_ptr, gmu_ptr, glv_ptr,
                          n_batch, n_features, n_latent, k, WANT_DEC: tl.constexpr,
                          WANT_LV: tl.constexpr, WANT_MU: tl.constexpr,
                          WANT_LOGVAR: tl.constexpr, BLOCK_R: tl.constexpr,
                          BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    """The ELBO's backward in one launch: the k decoder rows' derivatives of BLOCK_R
    examples scaled in place by grad / k, except where that is 1 (as ``.sum()``
    gives at k = 1: masked off, those rows cost no memory traffic); -grad mu and
    -grad d KL / d logvar (the upstream gradient may be a stride-0 expansion of
    one value, as ``.sum()`` gives)."""
    ex = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ex_ok = ex < n_batch
    g = tl.load(g_ptr + ex * g_stride, mask=ex_ok, other=0.0)
    c = g / k
    if WANT_DEC or WANT_LV:
        scaled = ex_ok & (c != 1.0)
        for s in range(0, k):
            _scale_rows(dv_ptr, dlv_ptr, s * n_batch + ex, scaled, c, n_features, WANT_DEC,
                        WANT_LV, BLOCK_D)
    if WANT_MU or WANT_LOGVAR:
        for j0 in range(0, n_latent, BLOCK_L):
            cols = j0 + tl.arange(0, BLOCK_L)
            mask = ex_ok[:, None] & (cols[None, :] < n_latent)
            offs = ex[:, None] * n_latent + cols[None, :]
            if WANT_MU:
                tl.store(gmu_ptr + offs, -g[:, None] * tl.load(mu_ptr + offs, mask=mask),
                         mask=mask)
            if WANT_LOGVAR:
                tl.store(glv_ptr + offs, -g[:, None] * tl.load(dkl_ptr + offs, mask=mask),
                         mask=mask)


@triton.jit
def _latent_log_terms(z_ptr, mu_ptr, lv_ptr, dz_ptr, rows, row_ok, n_batch, n_latent,
                      WANT_GRAD: tl.constexpr, BLOCK_L: tl.constexpr):
    """log p(z) - log q(z | x) of the sample rows ``rows`` (a BLOCK_R vector) in
    float64, d/dz written where wanted.  Shared by the latent kernel and the fused
    IWAE log-weights kernel."""
    qrows = rows % n_batch
    acc = tl.zeros(rows.shape, dtype=tl.float64)
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
    return 0.5 * acc


@triton.jit
def _latent_rows_kernel(z_ptr, mu_ptr, lv_ptr, logw_ptr, dz_ptr, n_rows, n_batch, n_latent,
                        WANT_GRAD: tl.constexpr, BLOCK_R: tl.constexpr,
                        BLOCK_L: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    latent = _latent_log_terms(z_ptr, mu_ptr, lv_ptr, dz_ptr, rows, row_ok, n_batch, n_latent,
                               WANT_GRAD, BLOCK_L)
    logw = tl.load(logw_ptr + rows, mask=row_ok, other=0.0)
    tl.store(logw_ptr + rows, logw + latent, mask=row_ok)


@triton.jit
def _iwae_log_weights_kernel(x_ptr, v_ptr, lv_ptr, z_ptr, mu_ptr, qlv_ptr, logw_ptr, dv_ptr,
                             dlv_ptr, dz_ptr, bad_ptr, n_rows, n_batch, n_features, n_latent,
                             BERNOULLI: tl.constexpr, PER_ELEMENT: tl.constexpr,
                             WANT_DEC: tl.constexpr, WANT_LV: tl.constexpr,
                             WANT_Z: tl.constexpr, BLOCK_R: tl.constexpr,
                             BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    """The IWAE forward's log-weights in one launch: BLOCK_R of the (k * batch)
    sample rows, their reconstruction terms and their latent terms, summed as the
    reconstruction and latent kernels sum them one after the other."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    acc, bad = _rows_log_likelihood(x_ptr, v_ptr, lv_ptr, dv_ptr, dlv_ptr, rows, row_ok,
                                    n_batch, n_features, BERNOULLI, PER_ELEMENT, WANT_DEC,
                                    WANT_LV, BLOCK_D)
    latent = _latent_log_terms(z_ptr, mu_ptr, qlv_ptr, dz_ptr, rows, row_ok, n_batch, n_latent,
                               WANT_Z, BLOCK_L)
    tl.store(logw_ptr + rows, acc + latent, mask=row_ok)
    tl.store(bad_ptr + rows, bad, mask=row_ok & (rows < n_batch))


@triton.jit
def _sample_coefficients(g_ptr, g_stride, w_ptr, rows, row_ok, n_batch):
    """grad_b w_sb of the sample rows ``rows`` = s * batch + b, in float64 (the
    upstream gradient may be a stride-0 expansion of one value)."""
    g = tl.load(g_ptr + (rows % n_batch) * g_stride, mask=row_ok, other=0.0)
    w = tl.load(w_ptr + rows, mask=row_ok, other=0.0)
    return g.to(tl.float64) * w


@triton.jit
def _iwae_backward_kernel(g_ptr, g_stride, w_ptr, dv_ptr, dlv_ptr, z_ptr, mu_ptr, qlv_ptr,
                          dz_ptr, gmu_ptr, glv_ptr, n_batch, n_features, n_latent, k,
                          n_latent_programs, WANT_DEC: tl.constexpr, WANT_LV: tl.constexpr,
                          WANT_Z: tl.constexpr, WANT_MU: tl.constexpr,
                          WANT_LOGVAR: tl.constexpr, BLOCK_R: tl.constexpr,
                          BLOCK_D: tl.constexpr, BLOCK_B: tl.constexpr,
                          BLOCK_L: tl.constexpr):
    """The IWAE backward in one launch, each sample row's coefficient
    c_sb = grad_b w_sb formed where it is used.

    The first ``n_latent_programs`` programs take BLOCK_B examples each: their k
    rows of d_z scaled in place, and the score terms -sum_s c_sb u_sb and
    sum_s c_sb (1 - u_sb (z_sb - mu_b)) / 2, u = (z - mu) e^-logvar, summed over
    the samples in float64.  They come first so that their walk over the k
    samples overlaps the others: those scale BLOCK_R decoder rows' derivatives
    each, in place (the (k, batch, D) buffers).
    """
    pid = tl.program_id(0)
    dt = z_ptr.dtype.element_ty  # of every buffer (an unused pointer may be another's)
    if pid < n_latent_programs:
        ex = pid * BLOCK_B + tl.arange(0, BLOCK_B)
        ex_ok = ex < n_batch
        for j0 in range(0, n_latent, BLOCK_L):
            cols = j0 + tl.arange(0, BLOCK_L)
            mask = ex_ok[:, None] & (cols[None, :] < n_latent)
            qoffs = ex[:, None] * n_latent + cols[None, :]
            g_mu = tl.zeros((BLOCK_B, BLOCK_L), dtype=tl.float64)
            g_lv = tl.zeros((BLOCK_B, BLOCK_L), dtype=tl.float64)
            if WANT_MU or WANT_LOGVAR:
                mu = tl.load(mu_ptr + qoffs, mask=mask, other=0.0)
                inv_var = tl.exp(-tl.load(qlv_ptr + qoffs, mask=mask, other=0.0))
            for s in range(0, k):
                rows = s * n_batch + ex
                c = _sample_coefficients(g_ptr, g_stride, w_ptr, rows, ex_ok,
                                         n_batch).to(dt)[:, None]
                offs = rows[:, None] * n_latent + cols[None, :]
                if WANT_Z:
                    tl.store(dz_ptr + offs, tl.load(dz_ptr + offs, mask=mask) * c, mask=mask)
                if WANT_MU or WANT_LOGVAR:
                    diff = tl.load(z_ptr + offs, mask=mask, other=0.0) - mu
                    u = diff * inv_var
                    g_mu -= (c * u).to(tl.float64)
                    g_lv += (c - c * u * diff).to(tl.float64)
            if WANT_MU:
                tl.store(gmu_ptr + qoffs, g_mu.to(dt), mask=mask)
            if WANT_LOGVAR:
                tl.store(glv_ptr + qoffs, (0.5 * g_lv).to(dt), mask=mask)
    else:
        if WANT_DEC or WANT_LV:
            rows = (pid - n_latent_programs) * BLOCK_R + tl.arange(0, BLOCK_R)
            row_ok = rows < k * n_batch
            c = _sample_coefficients(g_ptr, g_stride, w_ptr, rows, row_ok, n_batch).to(dt)
            _scale_rows(dv_ptr, dlv_ptr, rows, row_ok, c, n_features, WANT_DEC, WANT_LV,
                        BLOCK_D)


def _tiles(n_cols, dtype):
    """(BLOCK_R, BLOCK_D): small tiles under the interpreter, to cross tile edges.

    Columns go in tiles of up to 1024 in float32 and 256 in float64: sm_90's
    compiler spills float64 row tiles of 512 and 1024 columns (8-160 and
    800-1720 bytes of stack in the reconstruction, ELBO and IWAE log-weights
    kernels) and none of 256.
    """
    if interpreting():
        return 4, 16
    widest = 256 if dtype == torch.float64 else 1024
    return 4, min(widest, max(16, next_power_of_2(n_cols)))


def _decoder_rows(dec, dec_logvar, likelihood, want_dec, want_logvar):
    """What every launch over the decoder's rows allocates and passes.

    Returns
    -------
    bad : tensor of shape (batch,), int32
        Per-example counts of x's bad entries (every entry written by the kernel).
    d_dec, d_lv : tensors of ``dec``'s shape, or None where not wanted
    lv : tensor
        The log-variance argument (``dec`` itself for the Bernoulli likelihood,
        which reads none).
    constexprs : dict
        BERNOULLI, PER_ELEMENT, WANT_DEC, WANT_LV, BLOCK_R and BLOCK_D.
    """
    bad = torch.empty(dec.shape[1], dtype=torch.int32, device=dec.device)
    d_dec = torch.empty_like(dec) if want_dec else None
    d_lv = torch.empty_like(dec) if want_logvar else None
    bernoulli = likelihood == "bernoulli"
    block_r, block_d = _tiles(dec.shape[2], dec.dtype)
    constexprs = dict(BERNOULLI=bernoulli, PER_ELEMENT=not bernoulli and dec_logvar.ndim == 3,
                      WANT_DEC=want_dec, WANT_LV=want_logvar, BLOCK_R=block_r,
                      BLOCK_D=block_d)
    return bad, d_dec, d_lv, dec if bernoulli else dec_logvar, constexprs


def reconstruction_triton(x, dec, dec_logvar, likelihood, want_dec, want_logvar):
    """As :func:`fastlvm.kernels.variational_bounds._numba.reconstruction_numba`."""
    k, n_batch, n_features = dec.shape
    rows = k * n_batch
    log_p = torch.empty((k, n_batch), dtype=torch.float64, device=dec.device)
    bad, d_dec, d_lv, lv, constexprs = _decoder_rows(dec, dec_logvar, likelihood, want_dec,
                                                     want_logvar)
    launch_kernel(_reconstruction_rows_kernel, (cdiv(rows, constexprs["BLOCK_R"]),),
        x, dec, lv, log_p, log_p if d_dec is None else d_dec,
        log_p if d_lv is None else d_lv, bad, rows, n_batch, n_features, **constexprs)
    return log_p, bad, d_dec, d_lv  # the counts stay on the device until checked


def elbo_forward_triton(kernels, x, dec, dec_logvar, mu, logvar, likelihood, want_dec,
                        want_logvar, want_kl_logvar):
    """The ELBO's forward pass in one launch (as
    :func:`fastlvm.kernels._vae_autograd.elbo_forward_composed`; ``kernels`` is
    unused, and the count of bad entries stays on the device as per-example
    counts, read only where the data is checked)."""
    k, n_batch, n_features = dec.shape
    n_latent = mu.shape[1]
    out = torch.empty(n_batch, dtype=dec.dtype, device=dec.device)
    bad, d_dec, d_lv, lv, constexprs = _decoder_rows(dec, dec_logvar, likelihood, want_dec,
                                                     want_logvar)
    d_kl = torch.empty_like(mu) if want_kl_logvar else None
    launch_kernel(_elbo_kernel, (cdiv(n_batch, constexprs["BLOCK_R"]),),
        x, dec, lv, mu, logvar, out, out if d_dec is None else d_dec,
        out if d_lv is None else d_lv, out if d_kl is None else d_kl, bad, n_batch,
        n_features, n_latent, k, WANT_KL=want_kl_logvar,
        BLOCK_L=_tiles(n_latent, mu.dtype)[1], **constexprs)
    return out, bad, d_dec, d_lv, d_kl


def elbo_backward_triton(grad, k, d_dec, d_lv, mu, logvar, kl_logvar_grad, want_mu,
                         want_logvar):
    """The ELBO's backward pass in one launch (as
    :func:`fastlvm.kernels._vae_autograd.elbo_backward_torch`)."""
    n_batch, n_latent = mu.shape
    if want_logvar:
        kl_logvar_grad = kl_logvar_grad_of(kl_logvar_grad, logvar.detach())
    g_mu = torch.empty_like(mu) if want_mu else None
    g_lv = torch.empty_like(mu) if want_logvar else None
    buffer = d_dec if d_dec is not None else d_lv
    block_r, block_d = _tiles(1 if buffer is None else buffer.shape[-1], mu.dtype)
    dummy = grad  # stands for the pointers a launch does not use
    launch_kernel(_elbo_backward_kernel, (cdiv(n_batch, block_r),),
        grad, grad.stride(0), dummy if d_dec is None else d_dec, dummy if d_lv is None else d_lv,
        mu, dummy if kl_logvar_grad is None else kl_logvar_grad,
        dummy if g_mu is None else g_mu, dummy if g_lv is None else g_lv, n_batch,
        1 if buffer is None else buffer.shape[-1], n_latent, k, WANT_DEC=d_dec is not None,
        WANT_LV=d_lv is not None,
        WANT_MU=want_mu, WANT_LOGVAR=want_logvar, BLOCK_R=block_r, BLOCK_D=block_d,
        BLOCK_L=_tiles(n_latent, mu.dtype)[1])
    return d_dec, d_lv, g_mu, g_lv


def iwae_log_weights_triton(kernels, x, dec, dec_logvar, z, mu, logvar, likelihood, want_dec,
                            want_logvar, want_z):
    """The IWAE forward's log-weights in one launch (as
    :func:`fastlvm.kernels._vae_autograd.iwae_log_weights_composed`; ``kernels`` is
    unused)."""
    k, n_batch, n_features = dec.shape
    rows = k * n_batch
    log_w = torch.empty((k, n_batch), dtype=torch.float64, device=dec.device)
    bad, d_dec, d_lv, lv, constexprs = _decoder_rows(dec, dec_logvar, likelihood, want_dec,
                                                     want_logvar)
    d_z = torch.empty_like(z) if want_z else None
    launch_kernel(_iwae_log_weights_kernel, (cdiv(rows, constexprs["BLOCK_R"]),),
        x, dec, lv, z, mu, logvar, log_w, log_w if d_dec is None else d_dec,
        log_w if d_lv is None else d_lv, log_w if d_z is None else d_z, bad, rows, n_batch,
        n_features, mu.shape[1], WANT_Z=want_z, BLOCK_L=_tiles(mu.shape[1], mu.dtype)[1],
        **constexprs)
    return log_w, bad, d_dec, d_lv, d_z


def iwae_backward_triton(kernels, grad, weights, d_dec, d_lv, z, mu, logvar, d_z, want_mu,
                         want_logvar):
    """The IWAE backward in one launch (as
    :func:`fastlvm.kernels._vae_autograd.iwae_backward_composed`; ``kernels`` is
    unused)."""
    k, n_batch, n_latent = z.shape
    g_mu = torch.empty_like(mu) if want_mu else None
    g_lv = torch.empty_like(mu) if want_logvar else None
    buffer = d_dec if d_dec is not None else d_lv
    block_r, block_d = _tiles(1 if buffer is None else buffer.shape[-1], mu.dtype)
    block_b = block_r
    latent_programs = (cdiv(n_batch, block_b)
                       if d_z is not None or want_mu or want_logvar else 0)
    row_programs = 0 if buffer is None else cdiv(k * n_batch, block_r)
    if latent_programs + row_programs:
        dummy = weights  # stands for the pointers a launch does not use
        launch_kernel(_iwae_backward_kernel, (latent_programs + row_programs,),
            grad, grad.stride(0), weights, dummy if d_dec is None else d_dec,
            dummy if d_lv is None else d_lv, z, mu, logvar, dummy if d_z is None else d_z,
            dummy if g_mu is None else g_mu, dummy if g_lv is None else g_lv, n_batch,
            1 if buffer is None else buffer.shape[-1], n_latent, k, latent_programs,
            WANT_DEC=d_dec is not None, WANT_LV=d_lv is not None, WANT_Z=d_z is not None,
            WANT_MU=want_mu, WANT_LOGVAR=want_logvar, BLOCK_R=block_r, BLOCK_D=block_d,
            BLOCK_B=block_b, BLOCK_L=_tiles(n_latent, mu.dtype)[1])
    return d_dec, d_lv, d_z, g_mu, g_lv


def latent_triton(z, mu, logvar, log_w, want_grad):
    """As :func:`fastlvm.kernels.variational_bounds._numba.latent_numba`."""
    k, n_batch, n_latent = z.shape
    d_z = torch.empty_like(z) if want_grad else None
    block_r, block_l = _tiles(n_latent, z.dtype)
    launch_kernel(_latent_rows_kernel, (cdiv(k * n_batch, block_r),),
        z, mu, logvar, log_w, d_z if want_grad else log_w, k * n_batch, n_batch, n_latent,
        WANT_GRAD=want_grad, BLOCK_R=block_r, BLOCK_L=block_l)
    return d_z


TRITON_KERNELS = BoundKernels(reconstruction=reconstruction_triton, latent=latent_triton,
                              gaussian_kl=gaussian_kl_triton_forward,
                              log_mean_exp=log_mean_exp_triton_forward,
                              elbo_forward=elbo_forward_triton,
                              elbo_backward=elbo_backward_triton,
                              iwae_log_weights=iwae_log_weights_triton,
                              iwae_backward=iwae_backward_triton)


INT32_ELEMENTS = 2**31  # the kernels' offsets are int32


def require_int32_offsets(dec):
    """Refuse a decoder output (k, batch, D) whose elements the kernels' int32
    offsets cannot reach (the largest buffer of a call has its shape)."""
    if dec.numel() >= INT32_ELEMENTS:
        raise ValueError(
            f"decoder_out has {dec.numel():,} elements (shape {tuple(dec.shape)}); the "
            f"Triton VAE kernels index buffers in int32 and take fewer than 2^31. Split "
            f"the batch (or the samples) into calls below that size.")


def elbo_triton(x, dec, *args, **kwargs):
    """:func:`fastlvm.kernels.elbo` on the Triton kernels (torch CUDA tensors)."""
    require_int32_offsets(dec)
    return elbo_function(TRITON_KERNELS, x, dec, *args, **kwargs)


def iwae_bound_triton(x, dec, *args, **kwargs):
    """:func:`fastlvm.kernels.iwae_bound` on the Triton kernels (torch CUDA tensors)."""
    require_int32_offsets(dec)
    return iwae_function(TRITON_KERNELS, x, dec, *args, **kwargs)
