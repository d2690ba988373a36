"""Numba forward kernel of the log-mean-exp over importance samples.

Design: the columns (examples) split over threads; each takes the maximum over
its k samples, then the shifted sum of exponentials, in float64, and writes the
normalised weights softmax_s(log_w[:, b]) that the backward pass needs.  The
exp is the vectorisable one of :mod:`.._numba_support`.  Non-finite maxima
follow ``torch.logsumexp``: an all -inf column gives -inf, +inf gives +inf, a
NaN anywhere gives NaN; the weights of such columns are NaN.
Limits: float32 / float64 (k, batch) input, reduced over its first axis.
"""

import math

import numba
import numpy as np
import torch

from .._numba_support import CACHE, FASTMATH, fast_exp
from .._thread_spans import run_spans, span_grain


@numba.njit(fastmath=FASTMATH, cache=CACHE, error_model="numpy")
def log_mean_exp_column(log_w, b, weights):
    """log mean_s exp(log_w[s, b]) of column b (float64), writing the column's
    normalised weights into ``weights[:, b]``.  The fused VAE step
    (``vae_mlp_step``) calls it too."""
    k = log_w.shape[0]
    m = -np.inf
    for s in range(k):
        v = np.float64(log_w[s, b])
        if v > m:
            m = v
    finite = abs(m) < np.inf
    shift = m if finite else 0.0
    total = 0.0
    for s in range(k):
        w = fast_exp(np.float64(log_w[s, b]) - shift)
        weights[s, b] = w
        total += w
    scale = 1.0 / total
    if not finite:
        scale = np.nan
    for s in range(k):
        weights[s, b] *= scale
    if total != total:
        return np.nan
    if finite:
        return shift + math.log(total) - math.log(k)
    return m


@numba.njit(nogil=True, fastmath=FASTMATH, cache=CACHE, error_model="numpy")
def _log_mean_exp_columns(log_w, out, weights, b0, b1):
    for b in range(b0, b1):
        out[b] = log_mean_exp_column(log_w, np.int64(b), weights)


def log_mean_exp_numba_forward(log_w, out_dtype=torch.float64):
    """(log mean_s exp(log_w[s]) of shape (batch,) in ``out_dtype``, float64 weights
    (k, batch)).

    Parameters
    ----------
    log_w : tensor of shape (k, batch), float32 or float64, contiguous
    out_dtype : torch.dtype, default float64
        The bound's dtype (computed in float64, rounded once).
    """
    k, n_cols = log_w.shape
    out = torch.empty(n_cols, dtype=torch.float64)
    weights = torch.empty((k, n_cols), dtype=torch.float64)
    run_spans(_log_mean_exp_columns, n_cols, log_w.detach().numpy(), out.numpy(),
              weights.numpy(), grain=span_grain(k))
    return out.to(out_dtype), weights


def log_mean_exp_numba(log_w):
    """:func:`fastlvm.kernels.log_mean_exp` on the Numba kernel (torch CPU tensors)."""
    from .._vae_autograd import LogMeanExpFunction

    return LogMeanExpFunction.apply(log_w, log_mean_exp_numba_forward)
