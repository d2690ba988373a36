"""Mixture models fitted by EM."""

from ._bayesian_mixture import BayesianGaussianMixture
from ._gaussian_mixture import GaussianMixture
from ._mixture_ppca import MixtureOfPPCA

__all__ = ["BayesianGaussianMixture", "GaussianMixture", "MixtureOfPPCA"]
