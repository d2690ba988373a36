"""fastlvm.kernels: the drop-in compute kernels, with no estimator code.

Each op takes NumPy arrays (or torch CPU tensors through a zero-copy view)
and dispatches on the input's array type; ``FASTLVM_BACKEND`` overrides the
choice.  ``BACKENDS`` lists which backends implement each op.
"""

from .estep_stats import EStepStats, estep_stats, estep_stats_ref
from .estep_stats import IMPLEMENTATIONS as _ESTEP
from .gaussian_log_prob import IMPLEMENTATIONS as _LOGPROB
from .gaussian_log_prob import gaussian_log_prob, gaussian_log_prob_ref
from .kmeans import IMPLEMENTATIONS as _KMEANS
from .kmeans import kmeans_potentials, lloyd_step, min_sq_dist
from .log_responsibilities import IMPLEMENTATIONS as _LOGRESP
from .log_responsibilities import log_responsibilities, log_responsibilities_ref
from .masked_latent_stats import IMPLEMENTATIONS as _MASKED
from .masked_latent_stats import MaskedLatentStats, masked_latent_stats, masked_posterior
from .mppca_log_prob import IMPLEMENTATIONS as _MPPCA_LOGPROB
from .mppca_log_prob import mppca_log_prob, mppca_log_prob_ref
from .mppca_stats import IMPLEMENTATIONS as _MPPCA_STATS
from .mppca_stats import MPPCAStats, mppca_stats, mppca_stats_ref
from .ppca_stats import IMPLEMENTATIONS as _PPCA
from .ppca_stats import PPCAStats, ppca_stats, ppca_stats_ref

BACKENDS = {
    "gaussian_log_prob": tuple(_LOGPROB),
    "log_responsibilities": tuple(_LOGRESP),
    "estep_stats": tuple(_ESTEP),
    "ppca_stats": tuple(_PPCA),
    "masked_latent_stats": tuple(_MASKED),
    "mppca_log_prob": tuple(_MPPCA_LOGPROB),
    "mppca_stats": tuple(_MPPCA_STATS),
    **{op: tuple(impls) for op, impls in _KMEANS.items()},
}

__all__ = [
    "BACKENDS", "EStepStats", "estep_stats", "estep_stats_ref", "gaussian_log_prob",
    "gaussian_log_prob_ref", "kmeans_potentials", "lloyd_step", "log_responsibilities",
    "log_responsibilities_ref", "MaskedLatentStats", "masked_latent_stats", "masked_posterior",
    "min_sq_dist", "MPPCAStats", "mppca_log_prob",
    "mppca_log_prob_ref", "mppca_stats", "mppca_stats_ref", "PPCAStats", "ppca_stats",
    "ppca_stats_ref",
]
