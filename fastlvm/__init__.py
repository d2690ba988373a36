"""fastlvm: fast latent variable models.

Estimators with scikit-learn's API on fused compiled kernels; the kernels
themselves are in :mod:`fastlvm.kernels`.  Importing fastlvm imports no GPU
library.
"""

from .decomposition import FactorAnalysis, PPCA
from .mixture import BayesianGaussianMixture, GaussianMixture, MixtureOfPPCA

__version__ = "0.1.0"
__all__ = ["BayesianGaussianMixture", "FactorAnalysis", "GaussianMixture", "MixtureOfPPCA", "PPCA", "__version__"]
