"""Amortized variational inference: the variational autoencoder on fused loss kernels.

Imported lazily by ``fastlvm.VAE`` (this package needs torch).
"""

from ._vae import VAE

__all__ = ["VAE"]
