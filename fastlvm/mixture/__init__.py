"""Mixture models fitted by EM."""

from ._gaussian_mixture import GaussianMixture
from ._mixture_ppca import MixtureOfPPCA

__all__ = ["GaussianMixture", "MixtureOfPPCA"]
