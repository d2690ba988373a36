"""``elbo`` and ``iwae_bound``: fused per-example VAE objectives with their gradients."""

from fastlvm._dispatch import lazy, resolve

from .._vae_checks import (GRADIENTS, TORCH_REFERENCE, autocast_to_float32, check_choice,
                           check_decoder, check_posterior, check_samples)

ELBO_IMPLEMENTATIONS = {
    "reference": lazy("fastlvm.kernels.variational_bounds._reference", "elbo_ref"),
    "numba": lazy("fastlvm.kernels.variational_bounds._numba", "elbo_numba"),
    "triton": lazy("fastlvm.kernels.variational_bounds._triton", "elbo_triton"),
}
IWAE_IMPLEMENTATIONS = {
    "reference": lazy("fastlvm.kernels.variational_bounds._reference", "iwae_bound_ref"),
    "numba": lazy("fastlvm.kernels.variational_bounds._numba", "iwae_bound_numba"),
    "triton": lazy("fastlvm.kernels.variational_bounds._triton", "iwae_bound_triton"),
}


@autocast_to_float32
def elbo(x, decoder_out, mu, logvar, likelihood="bernoulli", decoder_logvar=None,
         check_input=True):
    """Per-example evidence lower bound with the KL term in closed form.

        ELBO_b = (1/k) sum_s log p(x_b | z_sb) - KL(N(mu_b, diag e^logvar_b) || N(0, I))

    One fused pass over the decoder's output gives the reconstruction sums and
    the per-pixel gradient; the per-pixel log-probabilities are never stored.
    Differentiable in ``decoder_out``, ``decoder_logvar``, ``mu`` and ``logvar``
    (no gradient flows to ``x``).  The training loss is ``-elbo(...).mean()``.

    Parameters
    ----------
    x : torch.Tensor of shape (batch, D), float32 or float64
        The data; in [0, 1] for the Bernoulli likelihood (binary or grey levels).
    decoder_out : torch.Tensor of shape (batch, D) or (k, batch, D)
        The decoder's output for k samples z_sb ~ q(z | x_b): Bernoulli logits,
        or Gaussian means.
    mu, logvar : torch.Tensor of shape (batch, L)
        q(z | x)'s mean and log-variance (the encoder's output).
    likelihood : {'bernoulli', 'gaussian'}
    decoder_logvar : float or torch.Tensor, optional
        Gaussian only (required there): the log-variance, a float (fixed), a
        () or (D,) tensor (one learned value, or one per feature) or a tensor of
        ``decoder_out``'s shape (one per pixel, a decoder output).
    check_input : bool, default=True
        Raise where x has entries off the likelihood's support (outside [0, 1]
        or NaN for the Bernoulli, NaN or infinite for the Gaussian).  The kernel
        counts them in its pass; on a GPU reading the count back makes the call
        wait for the device.  ``False`` skips that read, for callers that
        checked x already (``fastlvm.VAE`` checks X once per fit, as sklearn's
        ``check_input=False`` does for trees); bad entries then give a wrong
        bound, not an error.

    Returns
    -------
    torch.Tensor of shape (batch,), x's dtype and device
    """
    x, dec, dec_logvar = check_decoder(x, decoder_out, likelihood, decoder_logvar)
    mu, logvar = check_posterior(x, mu, logvar, x.shape[0])
    _, impl = resolve("elbo", ELBO_IMPLEMENTATIONS, x, name="x",
                      any_device=TORCH_REFERENCE)
    return impl(x, dec, dec_logvar, mu, logvar, likelihood, check_input)


@autocast_to_float32
def iwae_bound(x, decoder_out, z, mu, logvar, likelihood="bernoulli", decoder_logvar=None,
               gradient="reparam", check_input=True):
    """Per-example importance-weighted bound (Burda et al. 2016), k samples.

        IWAE_b = log (1/k) sum_s w_sb,
        log w_sb = log p(x_b | z_sb) + log N(z_sb; 0, I) - log N(z_sb; mu_b, e^logvar_b)

    With k = 1 it is the single-sample Monte-Carlo ELBO.  The reconstruction
    pass, the latent terms and the log-mean-exp are fused kernels; the
    (k x batch x D) per-pixel log-probabilities are never stored.

    Parameters
    ----------
    x : torch.Tensor of shape (batch, D), float32 or float64
    decoder_out : torch.Tensor of shape (k, batch, D)
        The decoder's output at ``z``.
    z : torch.Tensor of shape (k, batch, L)
        The samples, reparameterised: ``z = mu + exp(logvar / 2) * eps``.
    mu, logvar : torch.Tensor of shape (batch, L)
    likelihood, decoder_logvar, check_input :
        As in :func:`elbo`.
    gradient : {'reparam', 'stl', 'dreg'}
        The gradient estimator for the encoder: 'reparam' is the plain IWAE
        gradient; 'stl' (sticking the landing, Roeder et al. 2017) drops the
        score term of log q (q's parameters held fixed inside log q); 'dreg'
        (doubly reparameterised, Tucker et al. 2019) drops it too and squares
        the importance weights on the path through ``z``, by a hook on ``z``
        that reweights every gradient reaching it.  The decoder's gradient and
        the value are the same for all three.

    Returns
    -------
    torch.Tensor of shape (batch,), x's dtype and device
    """
    check_choice(gradient, "gradient", GRADIENTS)
    x, dec, dec_logvar = check_decoder(x, decoder_out, likelihood, decoder_logvar)
    mu, logvar = check_posterior(x, mu, logvar, x.shape[0])
    z = check_samples(z, x, dec, mu)
    _, impl = resolve("iwae_bound", IWAE_IMPLEMENTATIONS, x, name="x",
                      any_device=TORCH_REFERENCE)
    return impl(x, dec, dec_logvar, z, mu, logvar, likelihood, gradient, check_input)


__all__ = ["elbo", "iwae_bound", "ELBO_IMPLEMENTATIONS", "IWAE_IMPLEMENTATIONS"]
