"""Plain-torch reference of the diagonal-Gaussian KL divergence."""

import torch


def gaussian_kl_ref(mu, logvar, mu_prior=None, logvar_prior=None):
    """sum_j KL(N(mu_j, e^logvar_j) || N(mu_prior_j, e^logvar_prior_j)): (batch,).

    Parameters
    ----------
    mu, logvar : tensors of shape (batch, L)
    mu_prior, logvar_prior : None (the standard normal N(0, I)) or tensors of shape
        (batch, L)
    """
    if mu_prior is None:  # expm1: no "- 1" cancelling against e^logvar near logvar = 0
        return 0.5 * (torch.expm1(logvar) + mu * mu - logvar).sum(dim=-1)
    diff = mu - mu_prior
    delta = logvar - logvar_prior  # e^delta - 1 - delta, again without the cancellation
    return 0.5 * (torch.expm1(delta) - delta
                  + diff * diff * torch.exp(-logvar_prior)).sum(dim=-1)
