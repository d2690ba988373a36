"""One EM iteration of a GaussianMixture on a GPU (torch tensors on Triton, cupy
arrays on CuPy) in a few launches and one read of the device.

The unfused iteration (``GaussianMixture._estep`` then ``_m_step``) builds the
E-step's coefficients from the parameters, sums the statistics and runs the
M-step as array operations: 85-105 small launches, whose host time exceeds the
statistics pass's own at a million rows.  Here the statistics pass
(``kernels/estep_stats``) leaves its partials on the device, the fused M-step
(``kernels/gaussian_mstep``) turns them into the new parameters *and* the next
E-step's coefficients (three launches for 'diag' and 'spherical', five for
'full' and 'tied'), and one transfer reads the log-likelihood and the
covariance checks.  The coefficients are kept for the next iteration, keyed by
the identity of the parameter arrays they were made from: any other parameters
(a new start, ``_set_parameters``, an assignment) are rebuilt from scratch.

The values equal the unfused iteration's to rounding (the same formulas in
float64, summed in another fixed order); each path is deterministic.
"""

import sys

from fastlvm._arrays import eps_of, is_cupy, is_float32, is_torch
from fastlvm._dispatch import resolve
from fastlvm.kernels._expanded_gaussian import statistics_centers
from fastlvm.kernels.estep_stats import IMPLEMENTATIONS as ESTEP_IMPLEMENTATIONS

from . import _gaussian_params as gp


def fused_iteration_applies(model, X):
    """Whether :func:`fused_em_iteration` runs ``model``'s iteration on X: no prior,
    and a torch tensor the Triton backend takes or a cupy array the CuPy one does."""
    if model.prior is not None or not (is_torch(X) or is_cupy(X)):
        return False
    return resolve("estep_stats", ESTEP_IMPLEMENTATIONS, X)[0] in _BACKENDS


class _TritonStep:
    """The fused iteration's pieces on torch tensors (Triton kernels)."""

    @staticmethod
    def params(model, X):
        from fastlvm.kernels._triton_gaussian import GaussianTileParams

        torch = sys.modules["torch"]
        return GaussianTileParams(X, model.means_, model.precisions_cholesky_,
                                  model.covariance_type, torch.log(model.weights_))

    @staticmethod
    def cast_weights(sample_weight, X):
        return sample_weight.to(X.dtype).contiguous()

    @staticmethod
    def step(model, X, params, sample_weight):
        """(MStepResult, the summary as a list: the one read, next params)."""
        from fastlvm.kernels.estep_stats._triton import estep_partials
        from fastlvm.kernels.gaussian_mstep._triton import (gaussian_mstep_triton,
                                                            next_tile_params)

        torch = sys.modules["torch"]
        with torch.no_grad():
            parts = estep_partials(X, params, sample_weight)
            center = statistics_centers(params.c0_64, params.mu_64, model.covariance_type)
            result = gaussian_mstep_triton(parts.nk, parts.s1, parts.s2, parts.ll_parts, center,
                                           model.covariance_type, model.reg_covar,
                                           eps_of(X.dtype))
            summary = result.summary.tolist()  # the one wait
        return result, summary, next_tile_params(result, params)


class _CupyStep:
    """The fused iteration's pieces on cupy arrays (CuPy kernels)."""

    @staticmethod
    def params(model, X):
        from fastlvm.kernels._cupy_gaussian import ExpandedParams

        cupy = sys.modules["cupy"]
        return ExpandedParams(X.dtype, model.means_, model.precisions_cholesky_,
                              model.covariance_type, cupy.log(model.weights_))

    @staticmethod
    def cast_weights(sample_weight, X):
        return sample_weight.astype(X.dtype)

    @staticmethod
    def step(model, X, params, sample_weight):
        from fastlvm.kernels.estep_stats._cupy import centers, estep_sums
        from fastlvm.kernels.gaussian_mstep._cupy import gaussian_mstep_cupy, next_expanded_params

        cupy = sys.modules["cupy"]
        ll, nk, s1, s2 = estep_sums(X, params, sample_weight)
        result = gaussian_mstep_cupy(nk, s1, s2, ll, centers(params), model.covariance_type,
                                     model.reg_covar, eps_of(X.dtype), X.dtype)
        summary = cupy.asnumpy(result.summary).tolist()  # the one wait
        return result, summary, next_expanded_params(result, params)


_BACKENDS = {"triton": _TritonStep, "cupy": _CupyStep}


class FusedStepCache:
    """What one fit's fused iterations carry from one to the next: the E-step's
    coefficients for the parameters they were made from, and the sample weights
    in the data's dtype with their total."""

    def __init__(self):
        self.sources = None  # _sources() of params
        self.params = None
        self.weights_source = None
        self.sample_weight = None
        self.total = None

    def tile_params(self, model, X, backend):
        sources = _sources(model, X.dtype)
        if self.sources is None or any(a is not b for a, b in zip(self.sources, sources)):
            self.params = backend.params(model, X)
            self.sources = sources
        return self.params

    def weights(self, X, sample_weight, backend):
        """(sample weights of X's dtype or None, their total as a float)."""
        if sample_weight is None:
            return None, X.shape[0]
        if sample_weight is not self.weights_source:
            self.sample_weight = backend.cast_weights(sample_weight, X)
            self.total = float(sample_weight.sum())
            self.weights_source = sample_weight
        return self.sample_weight, self.total

    def keep(self, model, params, dtype):
        self.sources = _sources(model, dtype)
        self.params = params


def _sources(model, dtype):
    """What the E-step's coefficients are made from, compared by identity."""
    return model.weights_, model.means_, model.precisions_cholesky_, dtype


def fused_em_iteration(model, X, sample_weight, cache):
    """One E-step and M-step on the device; sets the model's parameters and returns the
    mean log-likelihood under the parameters before the step (as ``_em_iteration``).

    Raises the M-step's errors of :func:`fastlvm.mixture._gaussian_params.precision_cholesky`:
    a covariance that is not finite (scale the data) or not positive definite (raise
    ``reg_covar``).
    """
    backend = _BACKENDS[resolve("estep_stats", ESTEP_IMPLEMENTATIONS, X)[0]]
    params = cache.tile_params(model, X, backend)
    sw, total = cache.weights(X, sample_weight, backend)
    result, (ll, n_nonfinite, n_nonpositive), next_params = backend.step(model, X, params, sw)
    float32 = is_float32(X)
    gp._refuse((n_nonfinite == 0, n_nonpositive == 0),
               gp.ILL_DEFINED_COVARIANCE + (gp.FLOAT32_HINT if float32 else ""), float32)
    model.weights_, model.means_ = result.weights, result.means
    model.covariances_, model.precisions_cholesky_ = result.covariances, result.precisions_cholesky
    cache.keep(model, next_params, X.dtype)
    return ll / total
