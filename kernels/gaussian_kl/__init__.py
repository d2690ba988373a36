"""``gaussian_kl``: KL divergence between diagonal Gaussians, with its gradient."""

from fastlvm._dispatch import lazy, resolve

from .._vae_checks import TORCH_REFERENCE, autocast_to_float32, check_posterior, check_tensor

IMPLEMENTATIONS = {
    "reference": lazy("fastlvm.kernels.gaussian_kl._reference", "gaussian_kl_ref"),
    "numba": lazy("fastlvm.kernels.gaussian_kl._numba", "gaussian_kl_numba"),
    "triton": lazy("fastlvm.kernels.gaussian_kl._triton", "gaussian_kl_triton"),
}


@autocast_to_float32
def gaussian_kl(mu, logvar, mu_prior=None, logvar_prior=None):
    """Per-example KL(N(mu, diag e^logvar) || N(mu_prior, diag e^logvar_prior)).

    The prior is the standard normal N(0, I) when ``mu_prior`` and
    ``logvar_prior`` are None.  Differentiable in every tensor argument
    (a ``torch.autograd.Function`` with a closed-form backward).

    Parameters
    ----------
    mu, logvar : torch.Tensor of shape (batch, L), float32 or float64
        The mean and log-variance of q (an encoder's output).
    mu_prior, logvar_prior : torch.Tensor broadcastable to (batch, L), or None
        The second Gaussian; give both or neither.

    Returns
    -------
    torch.Tensor of shape (batch,), the inputs' dtype and device
    """
    check_tensor(mu, "mu", ndim=2)
    mu, logvar = check_posterior(mu, mu, logvar, mu.shape[0])
    if (mu_prior is None) != (logvar_prior is None):
        raise ValueError("give both mu_prior and logvar_prior, or neither (for N(0, I)).")
    if mu_prior is not None:
        prior = []
        for t, name in ((mu_prior, "mu_prior"), (logvar_prior, "logvar_prior")):
            check_tensor(t, name, like=mu)
            try:
                prior.append(t.expand_as(mu).contiguous())
            except RuntimeError:
                raise ValueError(f"{name} of shape {tuple(t.shape)} does not broadcast to "
                                 f"mu's shape {tuple(mu.shape)}.") from None
        mu_prior, logvar_prior = prior
    _, impl = resolve("gaussian_kl", IMPLEMENTATIONS, mu, name="mu",
                      any_device=TORCH_REFERENCE)
    return impl(mu, logvar, mu_prior, logvar_prior)


__all__ = ["gaussian_kl", "IMPLEMENTATIONS"]
