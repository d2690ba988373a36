"""Mixture models fitted by EM."""

from ._gaussian_mixture import GaussianMixture

__all__ = ["GaussianMixture"]
