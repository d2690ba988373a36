"""Stepwise averaging of additive E-step statistics: online EM and stochastic VI.

Online EM (Cappe & Moulines 2009) and stochastic variational inference
(Hoffman et al. 2013) on a conjugate mixture are the same recursion on the
statistics of one pass over a mini-batch:

    s_t = (1 - rho_t) s_{t-1} + rho_t * scale * s(batch_t),
    rho_t = (t + learning_offset) ** -learning_decay,

followed by the model's usual update from s_t (the M-step; for VB the update
of q(theta), whose natural parameters are affine in s, which makes this the
natural-gradient step).  ``scale`` is 1 / batch weight for online EM (running
per-row averages) and total_samples / batch weight for SVI (statistics of a
data set of that size).  Second moments are kept around the current means:
each step moves the batch's to the running shift and, after the update, the
running ones to the new means (exact algebra, ``shift_second_moment``).
NumPy arrays or float64 torch tensors alike.
"""

import numpy as np
from sklearn.utils.validation import validate_data

from fastlvm._arrays import numpy_readable
from fastlvm.kernels._covariance import shift_second_moment


def step_size(step, learning_offset, learning_decay):
    """rho_t = (t + tau)^(-kappa); 1 for the first step of a fresh model.

    Parameters
    ----------
    step : int
        Steps taken before this one (0 for the first).
    """
    if step == 0:
        return 1.0
    return float((step + learning_offset) ** (-learning_decay))


class OnlineStatistics:
    """Running (N_k, sum r x, second moments around ``center``) of a mixture.

    Parameters
    ----------
    covariance_type : str
    """

    def __init__(self, covariance_type):
        self.covariance_type = covariance_type
        self.nk = self.sum_x = self.second = self.center = None

    def update(self, nk, sum_x, second, center, rho, scale):
        """Blend one batch's statistics in with step ``rho`` after scaling them.

        Returns
        -------
        (nk, sum_x, second, center) : the running statistics
        """
        if self.nk is None or rho >= 1.0:
            self.nk, self.sum_x, self.second = scale * nk, scale * sum_x, scale * second
            self.center = center
        else:
            second = shift_second_moment(nk, sum_x, second, center, self.center,
                                         self.covariance_type)
            self.nk = (1.0 - rho) * self.nk + (rho * scale) * nk
            self.sum_x = (1.0 - rho) * self.sum_x + (rho * scale) * sum_x
            self.second = (1.0 - rho) * self.second + (rho * scale) * second
        return self.nk, self.sum_x, self.second, self.center

    def recenter(self, new_center):
        """Move the running second moments to ``new_center`` (the new means)."""
        self.second = shift_second_moment(self.nk, self.sum_x, self.second, self.center,
                                          new_center, self.covariance_type)
        self.center = new_center


def check_partial_fit_batch(estimator, X, first):
    """Validate a partial_fit batch: sklearn's checks, same n_features as before.

    Parameters
    ----------
    estimator : the mixture
    X : array-like of shape (n_samples, n_features)
    first : bool
        True for the batch that initialises the model (sets n_features_in_).
    """
    return validate_data(estimator, numpy_readable(X), dtype=[np.float64, np.float32],
                         reset=first, ensure_min_samples=1)
