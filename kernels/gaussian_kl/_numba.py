"""Numba forward kernel of the diagonal-Gaussian KL divergence.

Design: one ``prange`` over rows, each summing its L latent terms in float64
(one inlined vectorisable exp per loop: Numba 0.68's SSA pass mislabels two);
rows are independent, so the result does not depend on the thread count.  The
backward pass is closed form and runs as torch ops in
:mod:`fastlvm.kernels._vae_autograd` (it touches only (batch, L) arrays).
Limits: float32 / float64, C-contiguous (batch, L) inputs.
"""

import numba
import numpy as np
import torch

from .._numba_support import CACHE, FASTMATH, fast_exp


@numba.njit(parallel=True, fastmath=FASTMATH, cache=CACHE, error_model="numpy")
def _standard_kl_kernel(mu, logvar, out):
    n_rows, n_latent = mu.shape
    for r in numba.prange(n_rows):
        acc = 0.0
        for j in range(n_latent):
            acc += fast_exp(logvar[r, j]) + mu[r, j] * mu[r, j] - logvar[r, j]
        out[r] = 0.5 * (acc - n_latent)


@numba.njit(parallel=True, fastmath=FASTMATH, cache=CACHE, error_model="numpy")
def _gaussian_kl_kernel(mu, logvar, mu_p, logvar_p, out):
    n_rows, n_latent = mu.shape
    for r in numba.prange(n_rows):
        acc = 0.0
        for j in range(n_latent):
            diff = mu[r, j] - mu_p[r, j]
            acc += (logvar_p[r, j] - logvar[r, j]
                    + (fast_exp(logvar[r, j]) + diff * diff) * np.exp(-logvar_p[r, j]))
        out[r] = 0.5 * (acc - n_latent)


def gaussian_kl_numba_forward(mu, logvar, mu_prior=None, logvar_prior=None):
    """Row sums of KL(N(mu, e^logvar) || N(mu_prior, e^logvar_prior)), (batch,) float64.

    Parameters
    ----------
    mu, logvar : tensors of shape (batch, L), contiguous
    mu_prior, logvar_prior : None (the standard normal) or tensors of shape (batch, L)
    """
    out = torch.empty(mu.shape[0], dtype=torch.float64)
    if mu_prior is None:
        _standard_kl_kernel(mu.detach().numpy(), logvar.detach().numpy(), out.numpy())
    else:
        _gaussian_kl_kernel(*(t.detach().numpy() for t in (mu, logvar, mu_prior, logvar_prior)),
                            out.numpy())
    return out


def gaussian_kl_numba(mu, logvar, mu_prior=None, logvar_prior=None):
    """:func:`fastlvm.kernels.gaussian_kl` on the Numba kernel (torch CPU tensors)."""
    from .._vae_autograd import GaussianKLFunction

    return GaussianKLFunction.apply(mu, logvar, mu_prior, logvar_prior,
                                    gaussian_kl_numba_forward)
