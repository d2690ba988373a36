"""Latent linear models: probabilistic PCA."""

from ._ppca import PPCA

__all__ = ["PPCA"]
