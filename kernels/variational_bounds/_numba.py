"""Numba forward kernels of the fused VAE bounds, on torch CPU tensors.

Design: one parallel pass over the (k * batch) rows of the decoder's output
(one row per importance sample and example, ``prange`` over rows).  Each row
reads its data row x_b and decoder row once and leaves only the row's summed
reconstruction log-likelihood log p(x_b | z_sb), each pixel's term (computed
in the input's dtype) added to a float64 sum, and,
when gradients are wanted, the per-pixel derivative d log p / d(decoder output)
in the input's dtype -- the array the backward pass scales in place into the
decoder's gradient.  The (k x batch x D) per-pixel log-probabilities are never
stored.  Softplus, sigmoid and exp use the vectorisable polynomials of
:mod:`.._numba_softplus` and :mod:`.._numba_support`, so the pixel loops run in
SIMD registers.  The same pass checks the data rows (values in [0, 1] for the
Bernoulli likelihood, finite values for the Gaussian) and counts bad entries.

A second, small pass over the latent rows adds log p(z) - log q(z | x) for the
importance-weighted bound (the 2 pi constants cancel) and its z-derivative; the
IWAE backward's latent part (that derivative scaled by each sample's weight, and
the score terms of log q summed over the samples) is one more pass over them,
one example per task.

Kernels use ``error_model="numpy"``: Python's zero-division check on every
float division would stop LLVM from vectorising the pixel loops.

Limits: float32 and float64 only; C-contiguous inputs (the launcher makes them
so); every row is independent, so the result does not depend on the thread
count.
"""

import numba
import numpy as np
import torch

from .._host_tensors import empty_host, empty_host_like
from .._numba_softplus import log1p_unit
from .._numba_support import CACHE, FASTMATH, fast_exp
from .._vae_autograd import BoundKernels, elbo_function, iwae_function
from ..gaussian_kl._numba import gaussian_kl_numba_forward
from ..log_mean_exp._numba import log_mean_exp_numba_forward

_HALF_LOG_2PI = 0.9189385332046727


@numba.njit(fastmath=FASTMATH, cache=CACHE, error_model="numpy")
def _count_outside_unit(row):
    """Entries of a data row outside [0, 1], NaN included.  (Written as a select of
    0 or 1: a sum of the comparisons' booleans stayed scalar, as slow as the
    log-likelihood itself.)"""
    count = 0
    for i in range(row.shape[0]):
        v = row[i]
        count += 0 if (v >= 0) & (v <= 1) else 1
    return count


# Two Bernoulli bodies, with and without the gradient write, rather than one with a
# ``want_grad`` branch: two inlined copies of the polynomial exp in one function
# trip Numba 0.68's SSA pass (NumbaIRAssumptionWarning, mistyped variables).
@numba.njit(parallel=True, fastmath=FASTMATH, cache=CACHE, error_model="numpy")
def _bernoulli_rows_kernel(x, logits, log_p, bad):
    n_rows, n_features = logits.shape
    n_batch = x.shape[0]
    half = logits.dtype.type(0.5)
    for r in numba.prange(n_rows):
        b = r % n_batch
        acc = 0.0
        for d in range(n_features):
            v = logits[r, d]
            # log p = x v - softplus(v),  softplus(v) = max(v, 0) + log1p(exp(-|v|))
            acc += np.float64(x[b, d] * v - (half * (v + abs(v))
                                             + log1p_unit(fast_exp(-abs(v)))))
        log_p[r] = acc
        if r < n_batch:
            bad[b] = _count_outside_unit(x[b])


@numba.njit(parallel=True, fastmath=FASTMATH, cache=CACHE, error_model="numpy")
def _bernoulli_rows_grad_kernel(x, logits, log_p, d_logits, bad):
    n_rows, n_features = logits.shape
    n_batch = x.shape[0]
    zero = logits.dtype.type(0)
    half = logits.dtype.type(0.5)
    one = logits.dtype.type(1)
    for r in numba.prange(n_rows):
        b = r % n_batch
        acc = 0.0
        for d in range(n_features):
            xv = x[b, d]
            v = logits[r, d]
            e = fast_exp(-abs(v))
            acc += np.float64(xv * v - (half * (v + abs(v)) + log1p_unit(e)))
            # d log p / dv = x - sigmoid(v): 1 / (1 + e) for v >= 0, e / (1 + e) below
            d_logits[r, d] = xv - (one - (one - e) * (v < zero)) / (one + e)
        log_p[r] = acc
        if r < n_batch:
            bad[b] = _count_outside_unit(x[b])


@numba.njit(parallel=True, fastmath=FASTMATH, cache=CACHE, error_model="numpy")
def _gaussian_rows_kernel(x, mean, logvar, log_p, d_mean, d_logvar, bad, want_mean,
                          want_logvar):
    n_rows, n_features = mean.shape
    n_batch = x.shape[0]
    per_element = logvar.shape[0] > 1
    half = mean.dtype.type(0.5)
    one = mean.dtype.type(1)
    for r in numba.prange(n_rows):
        b = r % n_batch
        lr = r * per_element
        acc = 0.0
        for d in range(n_features):
            lv = logvar[lr, d]
            resid = x[b, d] - mean[r, d]
            scaled = resid * fast_exp(-lv)
            acc += lv + resid * scaled
            if want_mean:
                d_mean[r, d] = scaled
            if want_logvar:
                d_logvar[r, d] = half * (resid * scaled - one)
        log_p[r] = -0.5 * acc - n_features * _HALF_LOG_2PI
        if r < n_batch:
            count = 0
            for d in range(n_features):
                count += 0 if abs(x[b, d]) < np.inf else 1  # NaN and +-inf
            bad[b] = count


@numba.njit(parallel=True, fastmath=FASTMATH, cache=CACHE, error_model="numpy")
def _latent_rows_kernel(z, mu, logvar, log_w, d_z, want_grad):
    n_rows, n_latent = z.shape
    n_batch = mu.shape[0]
    for r in numba.prange(n_rows):
        b = r % n_batch
        acc = 0.0
        for j in range(n_latent):
            zv = z[r, j]
            lv = logvar[b, j]
            u = (zv - mu[b, j]) * fast_exp(-lv)
            acc += lv + u * (zv - mu[b, j]) - zv * zv
            if want_grad:
                d_z[r, j] = u - zv
        log_w[r] += 0.5 * acc


@numba.njit(parallel=True, fastmath=FASTMATH, cache=CACHE, error_model="numpy")
def _latent_backward_kernel(z, mu, inv_var, coef, d_z, want_dz, want_score, g_mu, g_lv):
    k, n_batch, n_latent = z.shape
    for b in numba.prange(n_batch):
        c_sum = 0.0
        for s in range(k):
            c = coef[s, b]
            c_sum += c
            if want_score:
                for j in range(n_latent):
                    diff = np.float64(z[s, b, j] - mu[b, j])
                    cu = c * diff * inv_var[b, j]
                    g_mu[b, j] += cu
                    g_lv[b, j] += cu * diff
            if want_dz:
                cz = z.dtype.type(c)
                for j in range(n_latent):
                    d_z[s, b, j] *= cz
        if want_score:
            for j in range(n_latent):
                g_mu[b, j] = -g_mu[b, j]
                g_lv[b, j] = 0.5 * (c_sum - g_lv[b, j])


def _view(t):
    return t.detach().numpy()


def reconstruction_numba(x, dec, dec_logvar, likelihood, want_dec, want_logvar):
    """Summed reconstruction log-likelihood of every (sample, example) row.

    Parameters
    ----------
    x : tensor of shape (batch, D), contiguous
    dec : tensor of shape (k, batch, D), contiguous, x's dtype
        Bernoulli logits, or Gaussian means.
    dec_logvar : None or tensor of shape (1, D) or (k, batch, D)
        Gaussian log-variances (one row shared by every row, or one per row).
    likelihood : {'bernoulli', 'gaussian'}
    want_dec, want_logvar : bool
        Whether to return the per-pixel derivatives.

    Returns
    -------
    log_p : tensor of shape (k, batch), float64
    n_bad : int
        Entries of x outside the likelihood's support (see module doc); the
        Triton kernel returns its per-example counts as a device tensor instead,
        read only where the data is checked.
    d_dec, d_logvar : tensor of shape (k, batch, D) or None
    """
    k, n_batch, n_features = dec.shape
    rows = k * n_batch
    log_p = empty_host((k, n_batch), torch.float64)
    bad = np.zeros(n_batch, dtype=np.int64)
    d_dec = empty_host_like(dec) if want_dec else None
    d_lv = empty_host_like(dec) if want_logvar else None
    scratch = np.empty((1, 1), dtype=_view(dec).dtype)
    d_dec_np = _view(d_dec).reshape(rows, n_features) if want_dec else scratch
    d_lv_np = _view(d_lv).reshape(rows, n_features) if want_logvar else scratch
    dec_np = _view(dec).reshape(rows, n_features)
    if likelihood == "bernoulli" and want_dec:
        _bernoulli_rows_grad_kernel(_view(x), dec_np, _view(log_p).reshape(rows), d_dec_np,
                                    bad)
    elif likelihood == "bernoulli":
        _bernoulli_rows_kernel(_view(x), dec_np, _view(log_p).reshape(rows), bad)
    else:
        lv = _view(dec_logvar).reshape(-1, n_features)
        _gaussian_rows_kernel(_view(x), dec_np, lv, _view(log_p).reshape(rows), d_dec_np,
                              d_lv_np, bad, want_dec, want_logvar)
    return log_p, int(bad.sum()), d_dec, d_lv


def latent_numba(z, mu, logvar, log_w, want_grad):
    """Add log p(z) - log q(z | x) to ``log_w`` (k, batch) in place.

    Parameters
    ----------
    z : tensor of shape (k, batch, L), contiguous
    mu, logvar : tensors of shape (batch, L), contiguous, z's dtype
    log_w : tensor of shape (k, batch), float64
    want_grad : bool

    Returns
    -------
    d_z : tensor of shape (k, batch, L), or None
        d [log p(z) - log q(z | x)] / dz with q's parameters held fixed.
    """
    k, n_batch, n_latent = z.shape
    d_z = empty_host_like(z) if want_grad else None
    out = _view(d_z).reshape(k * n_batch, n_latent) if want_grad else np.empty(
        (1, 1), dtype=_view(z).dtype)
    _latent_rows_kernel(_view(z).reshape(k * n_batch, n_latent), _view(mu), _view(logvar),
                        _view(log_w).reshape(-1), out, want_grad)
    return d_z


def latent_backward_numba(z, mu, logvar, coef, d_z, want_mu, want_logvar):
    """The IWAE backward's latent part in one pass over the (k, batch, L) arrays.

    As :func:`fastlvm.kernels._vae_autograd.latent_backward_torch` (same
    arguments and returns): ``d_z`` is scaled in place by ``coef`` per row and
    the score terms are summed over the samples in float64 (one ``prange`` task
    per example, so the sums do not depend on the thread count).  The torch ops
    it replaces made five passes, each with a fresh (k, batch, L) temporary.
    """
    _, n_batch, n_latent = z.shape
    want_score = want_mu or want_logvar
    if d_z is None and not want_score:
        return None, None, None
    shape = (n_batch, n_latent) if want_score else (1, 1)
    g_mu, g_lv = np.zeros(shape), np.zeros(shape)
    inv_var = (torch.exp(-logvar.detach().to(torch.float64)).numpy() if want_score
               else g_mu)
    out = _view(d_z) if d_z is not None else np.empty((1, 1, 1), dtype=_view(z).dtype)
    _latent_backward_kernel(_view(z), _view(mu), inv_var,
                            _view(coef.to(torch.float64)), out, d_z is not None,
                            want_score, g_mu, g_lv)

    def grad(g, wanted):
        return torch.from_numpy(g).to(z.dtype) if wanted else None

    return d_z, grad(g_mu, want_mu), grad(g_lv, want_logvar)


NUMBA_KERNELS = BoundKernels(reconstruction=reconstruction_numba, latent=latent_numba,
                             gaussian_kl=gaussian_kl_numba_forward,
                             log_mean_exp=log_mean_exp_numba_forward,
                             latent_backward=latent_backward_numba)


def elbo_numba(*args, **kwargs):
    """:func:`fastlvm.kernels.elbo` on the Numba kernels (torch CPU tensors)."""
    return elbo_function(NUMBA_KERNELS, *args, **kwargs)


def iwae_bound_numba(*args, **kwargs):
    """:func:`fastlvm.kernels.iwae_bound` on the Numba kernels (torch CPU tensors)."""
    return iwae_function(NUMBA_KERNELS, *args, **kwargs)
