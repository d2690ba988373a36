"""Latent linear models: probabilistic PCA and factor analysis."""

from ._factor_analysis import FactorAnalysis
from ._ppca import PPCA

__all__ = ["FactorAnalysis", "PPCA"]
