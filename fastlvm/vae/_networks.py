"""The default encoder and decoder of :class:`fastlvm.VAE`, and the networks' contract.

An encoder maps x of shape (batch, D) to q(z | x)'s mean and log-variance: a
tuple ``(mu, logvar)`` of (batch, L) tensors, or one (batch, 2 L) tensor split
in halves.  A decoder maps z of shape (..., L) to (..., D): Bernoulli logits or
Gaussian means.  The defaults are multilayer perceptrons with ReLU hidden
layers, as in Kingma & Welling (2014) and Burda et al. (2016).
"""

from numbers import Integral

import torch
from torch import nn


def mlp(sizes):
    """Linear layers of the given widths with ReLU between them (none after the last)."""
    layers = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(n_in, n_out))
    return nn.Sequential(*layers)


def hidden_widths(hidden_layer_sizes):
    """The hidden widths as a list of ints: an int is one layer (as in sklearn's MLP)."""
    widths = (list(hidden_layer_sizes) if hasattr(hidden_layer_sizes, "__iter__")
              else [hidden_layer_sizes])
    if any(isinstance(w, bool) or not isinstance(w, Integral) or w < 1 for w in widths):
        raise ValueError("hidden_layer_sizes must hold positive integers, one width per "
                         f"hidden layer (() for none); got {hidden_layer_sizes!r}.")
    return [int(w) for w in widths]


def default_networks(n_features, n_latent, hidden_layer_sizes):
    """(encoder, decoder): D -> hidden -> 2 L and L -> reversed hidden -> D."""
    hidden = hidden_widths(hidden_layer_sizes)
    encoder = mlp([n_features, *hidden, 2 * n_latent])
    decoder = mlp([n_latent, *hidden[::-1], n_features])
    return encoder, decoder


def split_posterior(out, n_latent, n_rows):
    """(mu, logvar) from an encoder's output (a tuple, or a (batch, 2 L) tensor) for
    a batch of ``n_rows`` rows."""
    if isinstance(out, (tuple, list)):
        if len(out) != 2:
            raise ValueError(f"the encoder must return (mu, logvar) or one (batch, "
                             f"2 * n_components) tensor; got a sequence of {len(out)}.")
        mu, logvar = out
    elif isinstance(out, torch.Tensor) and out.ndim == 2 and out.shape[1] == 2 * n_latent:
        mu, logvar = out[:, :n_latent], out[:, n_latent:]
    else:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"the encoder must return (mu, logvar) of shape (batch, "
                         f"n_components={n_latent}) or one (batch, {2 * n_latent}) tensor; "
                         f"got {shape}.")
    if mu.shape != (n_rows, n_latent) or mu.shape != logvar.shape:
        raise ValueError(f"the encoder's mu and logvar must have shape (batch, "
                         f"n_components) = ({n_rows}, {n_latent}) for a batch of {n_rows} "
                         f"rows; got {tuple(mu.shape)} and {tuple(logvar.shape)}.")
    return mu, logvar


def check_networks(encoder, decoder, x, n_latent):
    """Run the networks once on the rows ``x`` (a few rows of X), in eval mode
    without gradients, so that a network that does not fit the data or the
    latent size is named, with the shapes it must map, before training starts,
    not by a matrix product deep inside it.  The modules' training modes are
    put back.

    Parameters
    ----------
    encoder, decoder : torch.nn.Module
    x : tensor of shape (rows, D)
    n_latent : int
        L.
    """
    n_features = x.shape[1]
    modes = encoder.training, decoder.training
    encoder.eval()
    decoder.eval()
    try:
        with torch.no_grad():
            try:
                out = encoder(x)
            except Exception as error:
                raise ValueError(
                    f"The encoder fails on rows of X of shape {tuple(x.shape)}: "
                    f"{str(error).rstrip('.')}. It must map (batch, n_features={n_features}) "
                    f"to (mu, logvar) of shape (batch, n_components={n_latent}) or one "
                    f"(batch, {2 * n_latent}) tensor.") from error
            split_posterior(out, n_latent, x.shape[0])
            z = torch.zeros((1, x.shape[0], n_latent), dtype=x.dtype, device=x.device)
            want = (*z.shape[:2], n_features)
            try:
                dec = decoder(z)
            except Exception as error:
                raise ValueError(
                    f"The decoder fails on latent codes of shape {tuple(z.shape)} (samples, "
                    f"batch, n_components): {str(error).rstrip('.')}. It must map (..., "
                    f"n_components={n_latent}) to (..., n_features={n_features}).") from error
            if not isinstance(dec, torch.Tensor) or dec.shape != want:
                got = tuple(dec.shape) if isinstance(dec, torch.Tensor) else type(dec).__name__
                raise ValueError(
                    f"The decoder maps latent codes of shape {tuple(z.shape)} (samples, "
                    f"batch, n_components) to {got}; it must map (..., n_components="
                    f"{n_latent}) to (..., n_features={n_features}), here {want}.")
    finally:
        encoder.train(modes[0])
        decoder.train(modes[1])
