"""fastlvm.kernels: the drop-in compute kernels, with no estimator code.

Each op takes NumPy arrays (or torch CPU tensors through a zero-copy view)
and dispatches on the input's array type (torch CUDA tensors go to Triton,
cupy arrays to CuPy, where the op has those backends); ``FASTLVM_BACKEND`` overrides the
choice.  ``BACKENDS`` lists which backends implement each op.  The VAE losses
(``elbo``, ``iwae_bound``, ``gaussian_kl``, ``log_mean_exp``) take torch
tensors and are differentiable (``torch.autograd.Function``); their modules
import torch only when first called.
"""

from .estep_stats import EStepStats, estep_stats, estep_stats_ref
from .estep_stats import IMPLEMENTATIONS as _ESTEP
from .gaussian_kl import IMPLEMENTATIONS as _KL
from .gaussian_kl import gaussian_kl
from .gaussian_log_prob import IMPLEMENTATIONS as _LOGPROB
from .gaussian_log_prob import gaussian_log_prob, gaussian_log_prob_ref
from .kmeans import IMPLEMENTATIONS as _KMEANS
from .kmeans import kmeans_potentials, label_stats, lloyd_step, min_sq_dist
from .log_mean_exp import IMPLEMENTATIONS as _LME
from .log_mean_exp import log_mean_exp
from .log_responsibilities import IMPLEMENTATIONS as _LOGRESP
from .log_responsibilities import log_responsibilities, log_responsibilities_ref
from .masked_latent_stats import IMPLEMENTATIONS as _MASKED
from .masked_latent_stats import POSTERIOR_IMPLEMENTATIONS as _MASKED_POSTERIOR
from .masked_latent_stats import MaskedLatentStats, masked_latent_stats, masked_posterior
from .mppca_log_prob import IMPLEMENTATIONS as _MPPCA_LOGPROB
from .mppca_log_prob import mppca_log_prob, mppca_log_prob_ref
from .mppca_stats import IMPLEMENTATIONS as _MPPCA_STATS
from .mppca_stats import MPPCAStats, mppca_stats, mppca_stats_ref
from .ppca_stats import IMPLEMENTATIONS as _PPCA
from .ppca_stats import PPCAStats, ppca_stats, ppca_stats_ref
from .variational_bounds import ELBO_IMPLEMENTATIONS as _ELBO
from .variational_bounds import IWAE_IMPLEMENTATIONS as _IWAE
from .variational_bounds import elbo, iwae_bound

BACKENDS = {
    "gaussian_log_prob": tuple(_LOGPROB),
    "log_responsibilities": tuple(_LOGRESP),
    "estep_stats": tuple(_ESTEP),
    "ppca_stats": tuple(_PPCA),
    "masked_latent_stats": tuple(_MASKED),
    "masked_posterior": tuple(_MASKED_POSTERIOR),
    "mppca_log_prob": tuple(_MPPCA_LOGPROB),
    "mppca_stats": tuple(_MPPCA_STATS),
    **{op: tuple(impls) for op, impls in _KMEANS.items()},
    "gaussian_kl": tuple(_KL),
    "log_mean_exp": tuple(_LME),
    "elbo": tuple(_ELBO),
    "iwae_bound": tuple(_IWAE),
}

__all__ = [
    "BACKENDS", "elbo", "EStepStats", "estep_stats", "estep_stats_ref", "gaussian_kl",
    "gaussian_log_prob", "iwae_bound", "log_mean_exp",
    "gaussian_log_prob_ref", "kmeans_potentials", "label_stats", "lloyd_step",
    "log_responsibilities",
    "log_responsibilities_ref", "MaskedLatentStats", "masked_latent_stats", "masked_posterior",
    "min_sq_dist", "MPPCAStats", "mppca_log_prob",
    "mppca_log_prob_ref", "mppca_stats", "mppca_stats_ref", "PPCAStats", "ppca_stats",
    "ppca_stats_ref",
]
