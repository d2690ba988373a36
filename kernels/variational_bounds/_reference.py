"""Plain-torch references of the VAE bounds: the specification of the kernels.

Written with ordinary torch ops (each a pass over memory, autograd for the
gradients) on the inputs as :mod:`fastlvm.kernels.variational_bounds` has
normalised them.  Tests run them in float64.
"""

import math

import torch
import torch.nn.functional as F

from .._vae_autograd import raise_bad_data, reweight_path
from ..gaussian_kl._reference import gaussian_kl_ref

LOG_2PI = math.log(2.0 * math.pi)


def reconstruction_ref(x, dec, dec_logvar, likelihood, check_input=True):
    """log p(x_b | decoder row (s, b)) summed over pixels: (k, batch).

    Parameters
    ----------
    x : tensor of shape (batch, D)
    dec : tensor of shape (k, batch, D)
        Bernoulli logits or Gaussian means.
    dec_logvar : None or tensor of shape (1, D) or (k, batch, D)
    likelihood : {'bernoulli', 'gaussian'}
    check_input : bool
        Count x's entries off the likelihood's support and raise if there are any.
    """
    if likelihood == "bernoulli":
        if check_input:
            raise_bad_data(~((x >= 0) & (x <= 1)), likelihood)
        return (x * dec - F.softplus(dec)).sum(dim=-1)
    if check_input:
        raise_bad_data(~torch.isfinite(x), likelihood)
    resid = x - dec
    return -0.5 * (resid * resid * torch.exp(-dec_logvar) + dec_logvar + LOG_2PI).sum(dim=-1)


def elbo_ref(x, dec, dec_logvar, mu, logvar, likelihood, check_input=True):
    """mean_s log p(x | z_s) - KL(N(mu, e^logvar) || N(0, I)): (batch,)."""
    return (reconstruction_ref(x, dec, dec_logvar, likelihood, check_input).mean(dim=0)
            - gaussian_kl_ref(mu, logvar))


def log_importance_weights_ref(x, dec, dec_logvar, z, mu, logvar, likelihood, gradient,
                               check_input=True):
    """log w_sb = log p(x_b | z_sb) + log p(z_sb) - log q(z_sb | x_b): (k, batch)."""
    if gradient != "reparam":  # STL and DReG: q's parameters held fixed inside log q
        mu, logvar = mu.detach(), logvar.detach()
    diff = z - mu
    latent = 0.5 * (diff * diff * torch.exp(-logvar) + logvar - z * z).sum(dim=-1)
    return reconstruction_ref(x, dec, dec_logvar, likelihood, check_input) + latent


def iwae_bound_ref(x, dec, dec_logvar, z, mu, logvar, likelihood, gradient, check_input=True):
    """log mean_s w_sb (Burda et al. 2016): (batch,)."""
    log_w = log_importance_weights_ref(x, dec, dec_logvar, z, mu, logvar, likelihood,
                                       gradient, check_input)
    if gradient == "dreg":
        reweight_path(z, torch.softmax(log_w, dim=0))
    return torch.logsumexp(log_w, dim=0) - math.log(log_w.shape[0])
