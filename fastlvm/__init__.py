"""fastlvm: fast latent variable models.

Estimators with scikit-learn's API on fused compiled kernels; the kernels
themselves are in :mod:`fastlvm.kernels`.  Importing fastlvm imports no GPU
library and not torch: ``fastlvm.VAE`` (which needs torch) is loaded on first
use.
"""

from .decomposition import FactorAnalysis, PPCA
from .mixture import BayesianGaussianMixture, GaussianMixture, MixtureOfPPCA

__version__ = "0.1.0"
__all__ = ["BayesianGaussianMixture", "FactorAnalysis", "GaussianMixture", "MixtureOfPPCA",
           "PPCA", "VAE", "__version__"]


def __getattr__(name):
    if name == "VAE":
        from .vae import VAE

        return VAE
    raise AttributeError(f"module 'fastlvm' has no attribute {name!r}")
