"""torch.autograd plumbing of the fused VAE losses, shared by every backend.

Design: a backend supplies forward kernels (a :class:`BoundKernels`); the
autograd Functions here combine them and own the backward passes, which are
closed form (a backend may fuse the ELBO's two passes, the IWAE's log-weights
and backward, or the IWAE backward's latent part into kernels of its own; the
defaults here compose them):

- the reconstruction kernel already wrote d log p(x | z) / d(decoder output)
  per pixel during the forward pass, so the decoder's gradient is that buffer
  scaled in place by one coefficient per row (upstream gradient / k for the
  ELBO, upstream gradient times the normalised importance weight for IWAE):
  one pass over memory, and the per-pixel log-probabilities were never stored;
- the latent terms (KL, log p(z) - log q(z | x)) touch only (k, batch, L)
  arrays.  Their gradients come from a buffer the forward kernel wrote (d/dz
  of the latent terms, the Numba KL's d KL / d logvar), scaled per row, and,
  for IWAE's score terms, from the backend's ``latent_backward`` (one Numba
  pass on the CPU, a few torch ops elsewhere).

Each backward runs once per forward in training; a second backward through the
same graph (``retain_graph=True``, gradcheck) recomputes the buffers, since the
first one scaled them in place.  Double backward is not supported
(``once_differentiable``).  No gradient flows to the data ``x``.
"""

import functools
from typing import Callable, NamedTuple

import torch
from torch.autograd import function as _function


def once_differentiable(backward):
    """``torch.autograd.function.once_differentiable``, without its ``no_grad``
    context where grad mode is off already: a backward without ``create_graph``
    (training's), where torch's wrapper only adds a context manager, about 4 us
    of the host's time a call (``bench/triton_launch_host.py --harness``).  With
    ``create_graph=True`` torch's wrapper runs, and a second backward raises."""
    wrapped = _function.once_differentiable(backward)

    @functools.wraps(backward)
    def run(ctx, *grads):
        if not torch.is_grad_enabled():
            return backward(ctx, *grads)
        return wrapped(ctx, *grads)
    return run


def _rows(coef):
    """(k, batch) coefficients as a (k, batch, 1) multiplier."""
    return coef[..., None]


def latent_backward_torch(z, mu, logvar, coef, d_z, want_mu, want_logvar):
    """The IWAE backward's latent part, as torch ops (any device).

    Parameters
    ----------
    z : tensor of shape (k, batch, L)
    mu, logvar : tensors of shape (batch, L)
    coef : tensor of shape (k, batch)
        Upstream gradient times each sample's normalised importance weight.
    d_z : tensor of shape (k, batch, L) or None
        d [log p(z) - log q(z | x)] / dz from the forward kernel; scaled in
        place by ``coef`` (it belongs to this backward).
    want_mu, want_logvar : bool
        Whether to return the score terms: the direct dependence of
        -log q(z | x) on mu and logvar with z held fixed, weighted by ``coef``
        and summed over the samples.

    Returns
    -------
    (d_z, grad_mu, grad_logvar): the scaled ``d_z`` and tensors of shape
    (batch, L) in z's dtype, or None where not wanted.
    """
    coef = coef.to(z.dtype)
    grad_mu = grad_logvar = None
    if want_mu or want_logvar:
        diff = z - mu
        u = diff * torch.exp(-logvar)
        c = _rows(coef)
        grad_mu = -(c * u).sum(dim=0) if want_mu else None
        grad_logvar = 0.5 * (c.sum(dim=0) - (c * u * diff).sum(dim=0)) if want_logvar else None
    return _scaled(d_z, coef), grad_mu, grad_logvar


def elbo_forward_composed(kernels, x, dec, dec_logvar, mu, logvar, likelihood, want_dec,
                          want_logvar, want_kl_logvar):
    """The ELBO's forward pass from the backend's reconstruction and KL kernels.

    Parameters
    ----------
    kernels : BoundKernels
    x : tensor of shape (batch, D)
    dec : tensor of shape (k, batch, D)
    dec_logvar : None or tensor of shape (1, D) or (k, batch, D)
    mu, logvar : tensors of shape (batch, L)
    likelihood : {'bernoulli', 'gaussian'}
    want_dec, want_logvar, want_kl_logvar : bool
        Whether to return the per-pixel derivatives in the decoder's output and
        log-variance, and d KL / d logvar.

    Returns
    -------
    (value, n_bad, d_dec, d_logvar, kl_logvar_grad): the (batch,) ELBO in
    ``dec``'s dtype, the count of entries of x off the support (see
    :func:`raise_bad_data`), the (k, batch, D) derivative buffers or None, and
    the (batch, L) d KL / d logvar or None (the backward computes it then).
    """
    log_p, n_bad, d_dec, d_lv = kernels.reconstruction(x, dec, dec_logvar, likelihood,
                                                       want_dec, want_logvar)
    kl, kl_logvar_grad = kernels.gaussian_kl(mu, logvar, None, None, want_kl_logvar)
    return (log_p.mean(dim=0) - kl).to(dec.dtype), n_bad, d_dec, d_lv, kl_logvar_grad


def elbo_backward_torch(grad, k, d_dec, d_lv, mu, logvar, kl_logvar_grad, want_mu,
                        want_logvar):
    """The ELBO's backward pass as torch ops (any device).

    Parameters
    ----------
    grad : tensor of shape (batch,)
        The upstream gradient, in the ELBO's dtype.
    k : int
        The number of decoder samples.
    d_dec, d_lv : tensors of shape (k, batch, D) or None
        The forward's per-pixel derivatives, scaled in place by grad / k (they
        belong to this backward).
    mu, logvar : tensors of shape (batch, L)
    kl_logvar_grad : tensor of shape (batch, L) or None
        d KL / d logvar from the forward, read and never changed (a second
        backward through the same graph reads it again); computed here if None.
    want_mu, want_logvar : bool

    Returns
    -------
    (d_dec, d_lv, grad_mu, grad_logvar): the scaled buffers, and the (batch, L)
    gradients in mu and logvar or None where not wanted.
    """
    coef = (grad / k).expand(k, -1)
    g = grad[:, None]
    return (_scaled(d_dec, coef), _scaled(d_lv, coef), -g * mu if want_mu else None,
            -g * kl_logvar_grad_of(kl_logvar_grad, logvar) if want_logvar else None)


def iwae_log_weights_composed(kernels, x, dec, dec_logvar, z, mu, logvar, likelihood,
                              want_dec, want_logvar, want_z):
    """The IWAE forward's log-weights from the backend's reconstruction and latent kernels.

    Parameters
    ----------
    kernels : BoundKernels
    x : tensor of shape (batch, D)
    dec : tensor of shape (k, batch, D)
    dec_logvar : None or tensor of shape (1, D) or (k, batch, D)
    z : tensor of shape (k, batch, L)
    mu, logvar : tensors of shape (batch, L)
    likelihood : {'bernoulli', 'gaussian'}
    want_dec, want_logvar, want_z : bool
        Whether to return the per-pixel derivatives in the decoder's output and
        log-variance, and d [log p(z) - log q(z | x)] / dz.

    Returns
    -------
    (log_w, n_bad, d_dec, d_logvar, d_z): the (k, batch) float64 log-weights
    log p(x | z) + log p(z) - log q(z | x), the count of entries of x off the
    support (see :func:`raise_bad_data`), and the derivative buffers or None.
    """
    log_w, n_bad, d_dec, d_lv = kernels.reconstruction(x, dec, dec_logvar, likelihood,
                                                       want_dec, want_logvar)
    d_z = kernels.latent(z, mu, logvar, log_w, want_z)
    return log_w, n_bad, d_dec, d_lv, d_z


def iwae_backward_composed(kernels, grad, weights, d_dec, d_lv, z, mu, logvar, d_z, want_mu,
                           want_logvar):
    """The IWAE backward from the backend's ``latent_backward`` and torch ops.

    Parameters
    ----------
    kernels : BoundKernels
    grad : tensor of shape (batch,)
        The upstream gradient, in the bound's dtype.
    weights : tensor of shape (k, batch), float64
        The normalised importance weights softmax_s(log w_sb).
    d_dec, d_lv : tensors of shape (k, batch, D) or None
        The forward's per-pixel derivatives, scaled in place per row by the
        sample's coefficient grad_b w_sb (they belong to this backward).
    z : tensor of shape (k, batch, L)
    mu, logvar : tensors of shape (batch, L)
    d_z : tensor of shape (k, batch, L) or None
        The forward's d [log p(z) - log q(z | x)] / dz, scaled in place likewise.
    want_mu, want_logvar : bool
        Whether to return the score terms (see :func:`latent_backward_torch`).

    Returns
    -------
    (d_dec, d_lv, d_z, grad_mu, grad_logvar): the scaled buffers, and the
    (batch, L) score terms or None where not wanted.
    """
    coef = (grad[None, :] * weights).to(z.dtype)
    d_z, grad_mu, grad_logvar = kernels.latent_backward(z, mu, logvar, coef, d_z, want_mu,
                                                        want_logvar)
    return _scaled(d_dec, coef), _scaled(d_lv, coef), d_z, grad_mu, grad_logvar


class BoundKernels(NamedTuple):
    """The kernels of one backend (see ``variational_bounds._numba`` for the
    signatures): forward kernels; the IWAE backward's latent part, the IWAE's
    log-weights and backward, and the ELBO's forward and backward passes, which
    a backend may fuse (composed from the kernels and torch ops by default)."""

    reconstruction: Callable
    latent: Callable
    gaussian_kl: Callable
    log_mean_exp: Callable
    latent_backward: Callable = latent_backward_torch
    elbo_forward: Callable = elbo_forward_composed
    elbo_backward: Callable = elbo_backward_torch
    iwae_log_weights: Callable = iwae_log_weights_composed
    iwae_backward: Callable = iwae_backward_composed


def raise_bad_data(n_bad, likelihood):
    """Raise when the reconstruction pass counted entries of x off the support.

    ``n_bad`` is the count, or a tensor whose sum is the count (the Triton kernel's
    per-example counts, the reference's mask of bad entries): on a device that
    sum is read back here, one wait for the device, only when the data is checked."""
    if isinstance(n_bad, torch.Tensor):
        n_bad = int(n_bad.sum())
    if n_bad:
        if likelihood == "bernoulli":
            raise ValueError(
                f"x has {n_bad} entries outside [0, 1] (or NaN); the Bernoulli likelihood "
                "needs data in [0, 1]. Scale the data to [0, 1] (e.g. X / X.max()), or use "
                "likelihood='gaussian'.")
        raise ValueError(
            f"x contains {n_bad} NaN or infinite entries; remove or impute them first.")


def _scaled(buffer, coef):
    """buffer * coef per row, in place (the buffer belongs to this backward)."""
    return None if buffer is None else buffer.mul_(_rows(coef))


def kl_logvar_grad_of(buffer, logvar):
    """d KL(q || N(0, I)) / d logvar = expm1(logvar) / 2: the forward's buffer
    when its kernel wrote one, else computed here (the backends' fused ELBO
    backwards call it too).  Never changed in place, so
    a second backward through the same graph reads it again."""
    return 0.5 * torch.expm1(logvar) if buffer is None else buffer


def _decoder_logvar_grad(scaled, dec_logvar):
    """Reduce the per-pixel log-variance gradient to the (1, D) shared row."""
    if scaled is None or dec_logvar.ndim == 3:  # one log-variance per pixel
        return scaled
    return scaled.sum(dim=(0, 1)).reshape(1, -1)


class _Reconstruction:
    """Hands the reconstruction pass's buffers to the first backward.

    The buffers live on ``ctx`` rather than in ``save_for_backward``: the first
    backward scales them in place and drops them, and a later backward through
    the same graph recomputes them.
    """

    @staticmethod
    def keep(ctx, kernels, likelihood, n_bad, check_input, d_dec, d_lv, want_dec, want_lv):
        """Check the data's count of bad entries and keep the buffers on ``ctx``."""
        if check_input:
            raise_bad_data(n_bad, likelihood)
        ctx.kernels, ctx.likelihood, ctx.want = kernels, likelihood, (want_dec, want_lv)
        ctx.buffers = (d_dec, d_lv)

    @staticmethod
    def buffers(ctx, x, dec, dec_logvar):
        """(d_dec, d_lv, first): the forward's buffers the first time, then recomputed ones."""
        if ctx.buffers is not None:
            buffers, ctx.buffers = ctx.buffers, None
            return (*buffers, True)
        _, _, d_dec, d_lv = ctx.kernels.reconstruction(x, dec, dec_logvar, ctx.likelihood,
                                                        *ctx.want)
        return d_dec, d_lv, False


class ELBOFunction(torch.autograd.Function):
    """Per-example ELBO: mean over k decoder samples of log p(x | z) - KL(q || N(0, I))."""

    @staticmethod
    def forward(ctx, x, dec, dec_logvar, mu, logvar, kernels, likelihood, check_input):
        need = ctx.needs_input_grad
        value, n_bad, d_dec, d_lv, ctx.kl_logvar_grad = kernels.elbo_forward(
            kernels, x, dec, dec_logvar, mu, logvar, likelihood, need[1], need[2], need[4])
        _Reconstruction.keep(ctx, kernels, likelihood, n_bad, check_input, d_dec, d_lv,
                             need[1], need[2])
        ctx.save_for_backward(x, dec, dec_logvar, mu, logvar)
        return value

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, dec, dec_logvar, mu, logvar = ctx.saved_tensors
        d_dec, d_lv, _ = _Reconstruction.buffers(ctx, x, dec, dec_logvar)
        need = ctx.needs_input_grad
        d_dec, d_lv, grad_mu, grad_logvar = ctx.kernels.elbo_backward(
            grad, dec.shape[0], d_dec, d_lv, mu, logvar, ctx.kl_logvar_grad, need[3], need[4])
        return (None, d_dec, _decoder_logvar_grad(d_lv, dec_logvar), grad_mu, grad_logvar,
                None, None, None)


class IWAEFunction(torch.autograd.Function):
    """Per-example importance-weighted bound log mean_s w_s, and the normalised
    weights softmax_s(log w_s) (not differentiable)."""

    @staticmethod
    def forward(ctx, x, dec, dec_logvar, z, mu, logvar, kernels, likelihood, score_terms,
                check_input):
        need = ctx.needs_input_grad
        ctx.score_terms = score_terms
        # the weights take no gradient: None in the backward, not a (k, batch) zero tensor
        ctx.set_materialize_grads(False)
        log_w, n_bad, d_dec, d_lv, ctx.d_z = kernels.iwae_log_weights(
            kernels, x, dec, dec_logvar, z, mu, logvar, likelihood, need[1], need[2], need[3])
        _Reconstruction.keep(ctx, kernels, likelihood, n_bad, check_input, d_dec, d_lv,
                             need[1], need[2])
        bound, weights = kernels.log_mean_exp(log_w, dec.dtype)
        ctx.save_for_backward(x, dec, dec_logvar, z, mu, logvar, weights)
        ctx.mark_non_differentiable(weights)
        return bound, weights

    @staticmethod
    @once_differentiable
    def backward(ctx, grad, _grad_weights):
        if grad is None:  # no gradient reached the bound (grads are not materialised)
            return (None,) * 10
        x, dec, dec_logvar, z, mu, logvar, weights = ctx.saved_tensors
        d_dec, d_lv, first = _Reconstruction.buffers(ctx, x, dec, dec_logvar)
        d_z, ctx.d_z = ctx.d_z, None
        if not first and ctx.needs_input_grad[3]:
            d_z = ctx.kernels.latent(z, mu, logvar, torch.zeros_like(weights), True)
        need = ctx.needs_input_grad
        d_dec, d_lv, d_z, grad_mu, grad_logvar = ctx.kernels.iwae_backward(
            ctx.kernels, grad, weights, d_dec, d_lv, z, mu, logvar, d_z,
            ctx.score_terms and need[4], ctx.score_terms and need[5])
        return (None, d_dec, _decoder_logvar_grad(d_lv, dec_logvar), d_z, grad_mu, grad_logvar,
                None, None, None, None)


class GaussianKLFunction(torch.autograd.Function):
    """Row sums of KL(N(mu, e^logvar) || N(mu_p, e^logvar_p)) (standard normal when
    the prior is None)."""

    @staticmethod
    def forward(ctx, mu, logvar, mu_p, logvar_p, kernel):
        ctx.save_for_backward(mu, logvar, mu_p, logvar_p)
        kl, ctx.logvar_grad = kernel(mu, logvar, mu_p, logvar_p, ctx.needs_input_grad[1])
        return kl.to(mu.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        mu, logvar, mu_p, logvar_p = ctx.saved_tensors
        g = grad[:, None]
        if mu_p is None:
            return g * mu, g * kl_logvar_grad_of(ctx.logvar_grad, logvar), None, None, None
        inv_var_p = torch.exp(-logvar_p)
        diff = mu - mu_p
        ratio_m1 = torch.expm1(logvar - logvar_p)  # var / var_p - 1, no cancellation
        d_mu = g * diff * inv_var_p
        return (d_mu, 0.5 * g * ratio_m1, -d_mu,
                -0.5 * g * (ratio_m1 + diff * diff * inv_var_p), None)


class LogMeanExpFunction(torch.autograd.Function):
    """log mean_s exp(log_w[s, b]) over the first axis."""

    @staticmethod
    def forward(ctx, log_w, kernel):
        out, weights = kernel(log_w, log_w.dtype)
        ctx.save_for_backward(weights)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (weights,) = ctx.saved_tensors
        return (grad[None, :] * weights).to(grad.dtype), None


def reweight_path(z, weights):
    """DReG: multiply every gradient that reaches ``z`` by its sample's weight.

    With q's parameters held fixed inside log q (no score terms), the gradient
    reaching z_s through the decoder and the latent terms is w_s d log w_s / dz_s;
    one more factor w_s makes it the doubly reparameterised estimator
    sum_s w_s^2 d log w_s / dz_s dz_s / dphi (Tucker et al. 2019).  The decoder's
    own parameters keep the IWAE gradient: the hook acts on z only.
    """
    if z.requires_grad:
        scale = weights.detach().to(z.dtype)[..., None]
        z.register_hook(lambda g: g * scale)


def elbo_function(kernels, x, dec, dec_logvar, mu, logvar, likelihood, check_input=True):
    """Run :class:`ELBOFunction` on normalised inputs (see ``variational_bounds``)."""
    return ELBOFunction.apply(x, dec, dec_logvar, mu, logvar, kernels, likelihood, check_input)


def iwae_function(kernels, x, dec, dec_logvar, z, mu, logvar, likelihood, gradient,
                  check_input=True):
    """Run :class:`IWAEFunction` on normalised inputs; returns the (batch,) bound."""
    bound, weights = IWAEFunction.apply(x, dec, dec_logvar, z, mu, logvar, kernels,
                                        likelihood, gradient == "reparam", check_input)
    if gradient == "dreg":
        reweight_path(z, weights)
    return bound
