"""The default encoder and decoder of :class:`fastlvm.VAE`, and the encoder contract.

An encoder maps x of shape (batch, D) to q(z | x)'s mean and log-variance: a
tuple ``(mu, logvar)`` of (batch, L) tensors, or one (batch, 2 L) tensor split
in halves.  A decoder maps z of shape (..., L) to (..., D): Bernoulli logits or
Gaussian means.  The defaults are multilayer perceptrons with ReLU hidden
layers, as in Kingma & Welling (2014) and Burda et al. (2016).
"""

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


def default_networks(n_features, n_latent, hidden_layer_sizes):
    """(encoder, decoder): D -> hidden -> 2 L and L -> reversed hidden -> D."""
    hidden = list(hidden_layer_sizes)
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
