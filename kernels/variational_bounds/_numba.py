"""Numba kernels of the fused VAE bounds, on torch CPU tensors.

Design: one parallel pass over the (k * batch) rows of the decoder's output
(one row per importance sample and example; blocks of eight, split over threads,
rows, each block with one scratch row for float32's pixel terms).  Each row
reads its data row x_b and decoder row once and leaves only the row's summed
reconstruction log-likelihood log p(x_b | z_sb), each pixel's term (computed
in the input's dtype) added to a float64 sum, and,
when gradients are wanted, the per-pixel derivative d log p / d(decoder output)
in the input's dtype -- the array the backward pass scales in place into the
decoder's gradient.  The (k x batch x D) per-pixel log-probabilities are never
stored.  Softplus, sigmoid and exp use the vectorisable polynomials of
:mod:`.._numba_softplus` and :mod:`.._numba_support`, so the pixel loops run in
SIMD registers; the Bernoulli rows, bound by that arithmetic, ask for 512-bit
vectors (:func:`.._vector_width.prefer_wide_vectors`: 7% off the fused float32
loss, 17% off float64), while the Gaussian row, bound by its five streams, keeps
256 (at 512 its float32 loss took about 8% longer).  The same pass checks the
data rows (values in [0, 1] for the Bernoulli likelihood, finite values for the
Gaussian) and counts bad entries.

The one-sample ELBO (k = 1, the usual case) runs whole in one launch
(``_elbo_blocks``: per example, in blocks of eight, its reconstruction row, its KL to
N(0, I) from ``gaussian_kl``'s row function and their difference) and its
backward in one more (``_elbo_backward_rows``: the row's derivatives scaled by
grad in place, where grad is not 1 -- with ``.sum()`` the forward's values are
the gradient already; the gradients in mu and logvar): at a training batch
(128 x 64) two launches and the torch ops between them cost more than the
arithmetic.
With k > 1 the ELBO takes the composed route (see ``elbo_forward_numba``).
The pixel loops are row functions shared by these kernels and the row kernel.

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
from numba import types
from numba.extending import overload

from .._host_tensors import empty_host, empty_host_like
from .._numba_softplus import log1p_unit
from .._numba_support import CACHE, FASTMATH, fast_exp
from .._thread_spans import STREAM_SPAN_ELEMENTS, run_spans, span_grain
from .._vae_autograd import (BoundKernels, elbo_backward_torch, elbo_forward_composed,
                              elbo_function, iwae_function, kl_logvar_grad_of)
from .._vector_width import prefer_wide_vectors
from ..gaussian_kl._numba import gaussian_kl_numba_forward, standard_kl_row
from ..log_mean_exp._numba import log_mean_exp_numba_forward

_HALF_LOG_2PI = 0.9189385332046727


# The pixel loops of one row are functions of their own, called (not inlined at
# Numba's level) by the row kernels and the fused ELBO kernel: two inlined copies
# of the polynomial exp in one function trip Numba 0.68's SSA pass
# (NumbaIRAssumptionWarning, mistyped variables).  LLVM inlines them afterwards.
# For the same reason the Bernoulli row comes in two bodies, with and without the
# gradient write, rather than one with a ``want_grad`` branch.
#
# In float32 each pixel loop stores its per-pixel terms in ``terms`` (a row of
# scratch) and :func:`_sum_terms` adds them in float64 afterwards.  With the
# float64 sum inside the pixel loop, LLVM vectorised that loop at the float64
# sum's width, four float32 lanes of eight: the Bernoulli row with its gradient
# took 1.25 ns a pixel on one thread, 0.70 ns split in two (2026-12-01, 1024 x
# 784; the Gaussian row, bound by its five streams, 0.88 ns either way).
# float64 rows keep the sum in the loop (``_split_sum``: the lanes match, and the
# extra pass cost 3-4%).  Either way each term, in the data's dtype, is added
# to a float64 sum.
# Rows go to the parallel tasks in blocks of ``_ROWS_PER_TASK``, one scratch row
# per block (empty in float64, which does not use it).
_ROWS_PER_TASK = 8


def _split_sum(row):
    """Whether a pixel loop over ``row``'s dtype (``row``: any array of it) leaves
    its float64 sum to :func:`_sum_terms`: float32.  Compiled, a constant of the
    specialisation, so the loop's other branch is gone before LLVM vectorises it
    (a run-time ``row.itemsize == 4`` left the float32 loop at four lanes)."""
    return row.dtype == np.float32


@overload(_split_sum, inline="always")
def _split_sum_overload(row):
    split = row.dtype == types.float32
    return lambda row: split


@numba.njit(fastmath=FASTMATH, cache=CACHE, error_model="numpy")
def _sum_terms(terms, n):
    """sum_d terms[d] for d < n, in float64."""
    acc = 0.0
    for d in range(n):
        acc += np.float64(terms[d])
    return acc


@numba.njit(fastmath=FASTMATH, cache=CACHE, error_model="numpy")
def _bernoulli_row(x, logits, terms):
    """(sum_d log p(x_d | logits_d) of one row, in float64; the row's count of
    data entries outside [0, 1], NaN included, as a float) (``terms``: scratch
    (>= D,) in the logits' dtype).

    The count rides in the pixel loop, which loads x anyway: a pass of its own
    over the row cost 12% more at 1024 x 784.  It is a float of the logits'
    dtype (a select of 0 or 1, summed: an integer sum of the comparisons'
    booleans stayed scalar), exact up to 2^24 entries a row in float32 and
    never 0 once one entry is bad.
    """
    prefer_wide_vectors()
    zero = logits.dtype.type(0)
    half = logits.dtype.type(0.5)
    one = logits.dtype.type(1)
    split = _split_sum(logits)
    acc = 0.0
    outside = zero
    for d in range(logits.shape[0]):
        xv = x[d]
        v = logits[d]
        # log p = x v - softplus(v),  softplus(v) = max(v, 0) + log1p(exp(-|v|))
        term = xv * v - (half * (v + abs(v)) + log1p_unit(fast_exp(-abs(v))))
        if split:
            terms[d] = term
        else:
            acc += np.float64(term)
        outside += zero if (xv >= zero) & (xv <= one) else one
    return (_sum_terms(terms, logits.shape[0]) if split else acc), outside


@numba.njit(fastmath=FASTMATH, cache=CACHE, error_model="numpy")
def _bernoulli_row_grad(x, logits, d_logits, terms):
    """:func:`_bernoulli_row` (the same pair), also writing d log p / d logits
    into ``d_logits``."""
    prefer_wide_vectors()
    zero = logits.dtype.type(0)
    half = logits.dtype.type(0.5)
    one = logits.dtype.type(1)
    split = _split_sum(logits)
    acc = 0.0
    outside = zero
    for d in range(logits.shape[0]):
        xv = x[d]
        v = logits[d]
        e = fast_exp(-abs(v))
        term = xv * v - (half * (v + abs(v)) + log1p_unit(e))
        if split:
            terms[d] = term
        else:
            acc += np.float64(term)
        # d log p / dv = x - sigmoid(v): 1 / (1 + e) for v >= 0, e / (1 + e) below
        # (a select of the numerator: 5% off the row against the arithmetic
        # 1 - (1 - e) [v < 0], which took a mask-to-float conversion and a multiply)
        d_logits[d] = xv - (e if v < zero else one) / (one + e)
        outside += zero if (xv >= zero) & (xv <= one) else one
    return (_sum_terms(terms, logits.shape[0]) if split else acc), outside


@numba.njit(fastmath=FASTMATH, cache=CACHE, error_model="numpy")
def _gaussian_row(x, mean, logvar, d_mean, d_logvar, want_mean, want_logvar, terms):
    """(sum_d log N(x_d | mean_d, e^logvar_d) of one row, in float64; the row's
    count of data entries that are NaN or infinite, as a float, counted in the
    pixel loop as :func:`_bernoulli_row` counts its own); writes the derivatives
    in the mean and the log-variance where wanted.  ``terms`` is scratch (>= D,)
    in the mean's dtype."""
    zero = mean.dtype.type(0)
    half = mean.dtype.type(0.5)
    one = mean.dtype.type(1)
    n_features = mean.shape[0]
    split = _split_sum(mean)
    acc = 0.0
    nonfinite = zero
    for d in range(n_features):
        lv = logvar[d]
        xv = x[d]
        nonfinite += zero if abs(xv) < np.inf else one
        resid = xv - mean[d]
        scaled = resid * fast_exp(-lv)
        if split:
            terms[d] = lv + resid * scaled
        else:
            acc += lv + resid * scaled
        if want_mean:
            d_mean[d] = scaled
        if want_logvar:
            d_logvar[d] = half * (resid * scaled - one)
    if split:
        acc = _sum_terms(terms, n_features)
    return -0.5 * acc - n_features * _HALF_LOG_2PI, nonfinite


@numba.njit(inline="always", fastmath=FASTMATH, cache=CACHE, error_model="numpy")
def _reconstruction_row(x, dec, dec_logvar, d_dec, d_lv, bernoulli, want_dec, want_lv, r,
                        terms):
    """Row r of (k * batch) decoder rows: its summed log-likelihood, its derivatives
    written where wanted.  ``dec_logvar`` has one row (shared) or one per row;
    unwanted outputs are (1, D) scratch; ``terms`` is a scratch row.  The fused
    training step's row function, inlined, so that a step made for one
    likelihood compiles that likelihood's row functions only; the loss kernels'
    block loops call the row functions themselves, which ran 5-10% faster."""
    i = np.int64(r)  # an index mixed with 0 in a conditional would type as float
    b = i % x.shape[0]
    if bernoulli:
        if want_dec:
            return _bernoulli_row_grad(x[b], dec[i], d_dec[i], terms)[0]
        return _bernoulli_row(x[b], dec[i], terms)[0]
    return _gaussian_row(x[b], dec[i], dec_logvar[i if dec_logvar.shape[0] > 1 else 0],
                         d_dec[i if want_dec else 0], d_lv[i if want_lv else 0], want_dec,
                         want_lv, terms)[0]


@numba.njit(nogil=True, fastmath=FASTMATH, cache=CACHE, error_model="numpy")
def _reconstruction_blocks(x, dec, dec_logvar, log_p, d_dec, d_lv, bad, bernoulli, want_dec,
                           want_lv, b0, b1):
    n_batch = x.shape[0]
    n_rows = dec.shape[0]
    for blk in range(b0, b1):
        terms = np.empty(dec.shape[1] if _split_sum(dec) else 0, dtype=dec.dtype)
        r0 = np.int64(blk) * _ROWS_PER_TASK
        for r in range(r0, min(r0 + _ROWS_PER_TASK, n_rows)):
            # the row functions called here, as in _elbo_blocks (through
            # _reconstruction_row, or any helper, the pass took 5-10% longer)
            b = r % n_batch
            if bernoulli:
                if want_dec:
                    log_p[r], n_bad = _bernoulli_row_grad(x[b], dec[r], d_dec[r], terms)
                else:
                    log_p[r], n_bad = _bernoulli_row(x[b], dec[r], terms)
            else:
                log_p[r], n_bad = _gaussian_row(
                    x[b], dec[r], dec_logvar[r if dec_logvar.shape[0] > 1 else 0],
                    d_dec[r if want_dec else 0], d_lv[r if want_lv else 0], want_dec, want_lv,
                    terms)
            if r < n_batch:
                bad[r] = np.int64(n_bad)


@numba.njit(nogil=True, fastmath=FASTMATH, cache=CACHE, error_model="numpy")
def _elbo_blocks(x, dec, dec_logvar, mu, logvar, out, d_dec, d_lv, d_kl, bad, bernoulli,
                 want_dec, want_lv, want_kl, b0, b1):
    """The whole per-example ELBO of one decoder sample (k = 1) in one pass, one
    block of examples per task: each one's reconstruction row minus its KL to
    N(0, I), stored in ``out``'s dtype."""
    n_batch = x.shape[0]
    for blk in range(b0, b1):
        terms = np.empty(dec.shape[1] if _split_sum(dec) else 0, dtype=dec.dtype)
        e0 = np.int64(blk) * _ROWS_PER_TASK
        for e in range(e0, min(e0 + _ROWS_PER_TASK, n_batch)):
            # the row functions called here, not through _reconstruction_row: that
            # took about 50 us more of the 470 us of a 1024 x 784 float32 call (a
            # helper inlined at Numba's level too; LLVM's code for it was slower)
            if bernoulli:
                if want_dec:
                    rec, n_bad = _bernoulli_row_grad(x[e], dec[e], d_dec[e], terms)
                else:
                    rec, n_bad = _bernoulli_row(x[e], dec[e], terms)
            else:
                rec, n_bad = _gaussian_row(x[e], dec[e],
                                           dec_logvar[e if dec_logvar.shape[0] > 1 else 0],
                                           d_dec[e if want_dec else 0], d_lv[e if want_lv else 0],
                                           want_dec, want_lv, terms)
            bad[e] = np.int64(n_bad)
            out[e] = rec - standard_kl_row(mu[e], logvar[e], d_kl[e if want_kl else 0],
                                           want_kl)


@numba.njit(nogil=True, fastmath=FASTMATH, cache=CACHE, error_model="numpy")
def _elbo_backward_rows(grad, d_dec, d_lv, mu, d_kl, g_mu, g_lv, want_dec, want_lv,
                          want_mu, want_logvar, b0, b1):
    """The backward of the one-sample ELBO in one pass, one example per task: its
    decoder row's derivatives scaled in place by grad (left as they are where
    grad is 1, as ``elbo(...).sum()`` gives: a pass over the whole buffer saved);
    -grad mu and -grad d KL / d logvar written to ``g_mu`` and ``g_lv``."""
    n_features = d_dec.shape[1] if want_dec else d_lv.shape[1]
    for b in range(b0, b1):
        e = np.int64(b)
        g = grad[e]
        if want_dec and g != 1.0:
            for d in range(n_features):
                d_dec[e, d] *= g
        if want_lv and g != 1.0:
            for d in range(n_features):
                d_lv[e, d] *= g
        if want_mu:
            for j in range(mu.shape[1]):
                g_mu[e, j] = -g * mu[e, j]
        if want_logvar:
            for j in range(mu.shape[1]):
                g_lv[e, j] = -g * d_kl[e, j]


@numba.njit(fastmath=FASTMATH, cache=CACHE, error_model="numpy")
def latent_log_ratio_row(z, mu, logvar, d_z, want_grad):
    """log N(z; 0, I) - log N(z; mu, e^logvar) of one latent row (float64; the
    2 pi terms cancel); with ``want_grad`` also writes its z-derivative with q's
    parameters held fixed, (z - mu) e^-logvar - z, into ``d_z``.  The fused VAE
    step (``vae_mlp_step``) calls it too."""
    acc = 0.0
    for j in range(z.shape[0]):
        zv = z[j]
        lv = logvar[j]
        u = (zv - mu[j]) * fast_exp(-lv)
        acc += lv + u * (zv - mu[j]) - zv * zv
        if want_grad:
            d_z[j] = u - zv
    return 0.5 * acc


@numba.njit(nogil=True, fastmath=FASTMATH, cache=CACHE, error_model="numpy")
def _latent_rows(z, mu, logvar, log_w, d_z, want_grad, b0, b1):
    n_batch = mu.shape[0]
    for r in range(b0, b1):
        i = np.int64(r)
        b = i % n_batch
        log_w[i] += latent_log_ratio_row(z[i], mu[b], logvar[b], d_z[i if want_grad else 0],
                                         want_grad)


@numba.njit(nogil=True, fastmath=FASTMATH, cache=CACHE, error_model="numpy")
def _latent_backward_columns(z, mu, inv_var, coef, d_z, want_dz, want_score, g_mu, g_lv, b0, b1):
    k, _, n_latent = z.shape
    for b in range(b0, b1):
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


def _row_buffer(like, wanted, scratch):
    """(tensor shaped as ``like`` or None, its (rows, D) array or ``scratch``): an
    output buffer of per-pixel derivatives, when wanted."""
    if not wanted:
        return None, scratch
    t = empty_host_like(like)
    return t, t.numpy().reshape(-1, like.shape[-1])


def _decoder_arrays(dec, dec_logvar, likelihood):
    """(dec as (rows, D), the log-variance rows or scratch, scratch, bernoulli flag)."""
    dec_np = _view(dec).reshape(-1, dec.shape[-1])
    scratch = np.empty((1, 1), dtype=dec_np.dtype)
    bernoulli = likelihood == "bernoulli"
    lv = scratch if bernoulli else _view(dec_logvar).reshape(-1, dec.shape[-1])
    return dec_np, lv, scratch, bernoulli


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
    dec_np, lv, scratch, bernoulli = _decoder_arrays(dec, dec_logvar, likelihood)
    log_p = empty_host(tuple(dec.shape[:2]), torch.float64)
    bad = np.empty(x.shape[0], dtype=np.int64)
    d_dec, d_dec_np = _row_buffer(dec, want_dec, scratch)
    d_lv, d_lv_np = _row_buffer(dec, want_logvar, scratch)
    n_rows, n_features = dec_np.shape
    run_spans(_reconstruction_blocks, -(-n_rows // _ROWS_PER_TASK), _view(x), dec_np, lv,
              log_p.numpy().reshape(-1), d_dec_np, d_lv_np, bad, bernoulli, want_dec,
              want_logvar, grain=span_grain(_ROWS_PER_TASK * n_features))
    return log_p, int(bad.sum()), d_dec, d_lv


def elbo_forward_numba(kernels, x, dec, dec_logvar, mu, logvar, likelihood, want_dec,
                       want_logvar, want_kl_logvar):
    """The ELBO's forward pass (see
    :func:`fastlvm.kernels._vae_autograd.elbo_forward_composed` for the arguments
    and returns): for one decoder sample, one kernel launch, each example's
    reconstruction row, its KL to N(0, I) and their difference from one task.

    With k > 1 samples it is the composed route.  A task per example would walk
    rows (batch x D) apart, and at batch 1024, D = 784 that ran 10-19% slower than
    the composed row kernel's streaming pass (k = 8 and 50).
    """
    if dec.shape[0] > 1:
        return elbo_forward_composed(kernels, x, dec, dec_logvar, mu, logvar, likelihood,
                                     want_dec, want_logvar, want_kl_logvar)
    dec_np, lv, scratch, bernoulli = _decoder_arrays(dec, dec_logvar, likelihood)
    out = empty_host((x.shape[0],), dec.dtype)
    bad = np.empty(x.shape[0], dtype=np.int64)
    d_dec, d_dec_np = _row_buffer(dec, want_dec, scratch)
    d_lv, d_lv_np = _row_buffer(dec, want_logvar, scratch)
    d_kl, d_kl_np = _row_buffer(mu, want_kl_logvar, scratch)
    run_spans(_elbo_blocks, -(-x.shape[0] // _ROWS_PER_TASK), _view(x), dec_np, lv, _view(mu),
              _view(logvar), out.numpy(), d_dec_np, d_lv_np, d_kl_np, bad, bernoulli, want_dec,
              want_logvar, want_kl_logvar, grain=span_grain(_ROWS_PER_TASK * dec_np.shape[1]))
    return out, int(bad.sum()), d_dec, d_lv, d_kl


def elbo_backward_numba(grad, k, d_dec, d_lv, mu, logvar, kl_logvar_grad, want_mu,
                        want_logvar):
    """The ELBO's backward pass (as
    :func:`fastlvm.kernels._vae_autograd.elbo_backward_torch`: same arguments
    and returns): one kernel launch for one decoder sample, the torch ops for
    k > 1 (as the forward).  ``kl_logvar_grad`` is the forward's buffer, read,
    never changed."""
    if k > 1:
        return elbo_backward_torch(grad, k, d_dec, d_lv, mu, logvar, kl_logvar_grad, want_mu,
                                   want_logvar)
    scratch = np.empty((1, 1), dtype=_view(mu).dtype)
    g_mu, g_mu_np = _row_buffer(mu, want_mu, scratch)
    g_lv, g_lv_np = _row_buffer(mu, want_logvar, scratch)
    if want_logvar:
        kl_logvar_grad = kl_logvar_grad_of(kl_logvar_grad, logvar.detach())
    row = (d_dec if d_dec is not None else d_lv if d_lv is not None else mu).shape[-1]
    run_spans(
        _elbo_backward_rows, grad.shape[0], _view(grad.contiguous()),
        scratch if d_dec is None else d_dec.numpy().reshape(-1, d_dec.shape[-1]),
        scratch if d_lv is None else d_lv.numpy().reshape(-1, d_lv.shape[-1]),
        _view(mu), scratch if kl_logvar_grad is None else _view(kl_logvar_grad), g_mu_np,
        g_lv_np, d_dec is not None, d_lv is not None, want_mu, want_logvar,
        grain=span_grain(row, STREAM_SPAN_ELEMENTS))
    return d_dec, d_lv, g_mu, g_lv


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
    run_spans(_latent_rows, k * n_batch, _view(z).reshape(k * n_batch, n_latent), _view(mu),
              _view(logvar), _view(log_w).reshape(-1), out, want_grad,
              grain=span_grain(n_latent))
    return d_z


def latent_backward_numba(z, mu, logvar, coef, d_z, want_mu, want_logvar):
    """The IWAE backward's latent part in one pass over the (k, batch, L) arrays.

    As :func:`fastlvm.kernels._vae_autograd.latent_backward_torch` (same
    arguments and returns): ``d_z`` is scaled in place by ``coef`` per row and
    the score terms are summed over the samples in float64, one example at a
    time (spans of examples over threads), so the sums do not depend on the
    thread count.  The torch ops it replaces made five passes, each with a
    fresh (k, batch, L) temporary.
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
    run_spans(_latent_backward_columns, n_batch, _view(z), _view(mu), inv_var,
              _view(coef.to(torch.float64)), out, d_z is not None, want_score, g_mu, g_lv,
              grain=span_grain(z.shape[0] * n_latent))

    def grad(g, wanted):
        return torch.from_numpy(g).to(z.dtype) if wanted else None

    return d_z, grad(g_mu, want_mu), grad(g_lv, want_logvar)


NUMBA_KERNELS = BoundKernels(reconstruction=reconstruction_numba, latent=latent_numba,
                             gaussian_kl=gaussian_kl_numba_forward,
                             log_mean_exp=log_mean_exp_numba_forward,
                             latent_backward=latent_backward_numba,
                             elbo_forward=elbo_forward_numba,
                             elbo_backward=elbo_backward_numba)


def elbo_numba(*args, **kwargs):
    """:func:`fastlvm.kernels.elbo` on the Numba kernels (torch CPU tensors)."""
    return elbo_function(NUMBA_KERNELS, *args, **kwargs)


def iwae_bound_numba(*args, **kwargs):
    """:func:`fastlvm.kernels.iwae_bound` on the Numba kernels (torch CPU tensors)."""
    return iwae_function(NUMBA_KERNELS, *args, **kwargs)
