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
float64, summed in another fixed order); each path is deterministic.  On
CUDA tensors (``cuda_graph='auto'``, the default, or True) the Triton iteration
is recorded once as a CUDA graph and replayed (:class:`GraphedTritonStep`), with
the same values bit for bit.
"""

import sys
from typing import NamedTuple

from fastlvm._arrays import eps_of, is_cupy, is_float32, is_torch
from fastlvm._dispatch import resolve
from fastlvm.kernels._expanded_gaussian import kappa_needs_float64, statistics_centers
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
    def params(model, X, in_float64=None):
        """The E-step's coefficients from the model's parameters; ``in_float64``
        None decides the compute dtype from them (one read)."""
        from fastlvm.kernels._triton_gaussian import GaussianTileParams

        torch = sys.modules["torch"]
        return GaussianTileParams(X, model.means_, model.precisions_cholesky_,
                                  model.covariance_type, torch.log(model.weights_), in_float64)

    @staticmethod
    def cast_weights(sample_weight, X):
        return sample_weight.to(X.dtype).contiguous()

    @staticmethod
    def launch(model, X, params, sample_weight):
        """(MStepResult, next params): the iteration's kernels, nothing read back."""
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
            return result, next_tile_params(result, params)

    @staticmethod
    def step(model, X, params, sample_weight):
        """(MStepResult, the summary as a list: the one read, next params)."""
        result, next_params = _TritonStep.launch(model, X, params, sample_weight)
        return result, result.summary.tolist(), next_params  # the one wait


class _CupyStep:
    """The fused iteration's pieces on cupy arrays (CuPy kernels)."""

    @staticmethod
    def params(model, X, in_float64=None):
        """As :meth:`_TritonStep.params`."""
        from fastlvm.kernels._cupy_gaussian import ExpandedParams

        cupy = sys.modules["cupy"]
        return ExpandedParams(X.dtype, model.means_, model.precisions_cholesky_,
                              model.covariance_type, cupy.log(model.weights_), in_float64)

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
                                     model.reg_covar, eps_of(X.dtype), params.dtype)
        summary = cupy.asnumpy(result.summary).tolist()  # the one wait
        return result, summary, next_expanded_params(result, params)


_BACKENDS = {"triton": _TritonStep, "cupy": _CupyStep}

GRAPH_WARMUP_STEPS = 3  # eager iterations before the recording
# elements between the starts of the fitted parameters in the step's one output
# buffer: 512 bytes, the alignment of a fresh allocation, so that products of the
# parameters take the same paths (and give the same bits) as on separate tensors
_ALIGN = 64
# the E-step coefficients' fields (GaussianTileParams): the terms, and with their
# float64 views those an iteration replaces
_TERM_FIELDS = ("c0", "a", "b", "s", "c", "u")
_PARAM_FIELDS = _TERM_FIELDS + ("c0_64", "mu_64")


class FittedParameters(NamedTuple):
    """What the model takes from an iteration (float64 tensors on X's device)."""

    weights: object
    means: object
    covariances: object
    precisions_cholesky: object


class GraphedTritonStep:
    """The Triton iteration on static buffers, recorded as a CUDA graph on a GPU
    (``GaussianMixture(cuda_graph=True)``, or the default 'auto' on CUDA tensors).

    At the EM benchmarks' sizes an iteration's kernels take a fraction of a
    millisecond on an H100/H200, and launching them costs the host as much: the
    statistics and M-step kernels, about twenty tensor allocations, and for
    'full' and 'tied' the batched Cholesky and a triangular solve.  Recorded
    once, the iteration is one launch.  What the recording reads and writes
    stays in place from one replay to the next:

    - inputs: X and the fit's sample weights (the same tensors every iteration),
      and the E-step's coefficients (``params``), which the iteration itself
      overwrites with the next ones after reading them;
    - outputs: the summary (the one read) and one flat float64 buffer of the new
      weights, means, covariances and precision factors, cloned after each
      replay, so no parameter the model holds is the graph's buffer.

    The first GRAPH_WARMUP_STEPS iterations run eagerly on a side stream (Triton
    compiles and the kernels' configs are chosen; the allocator settles); the
    next one records and replays.  On a CPU tensor there is no graph: every
    iteration runs the same body on the same buffers, which the tests compare with
    the plain iteration value for value.  New inputs or coefficients from
    elsewhere (a new start, ``_set_parameters``) start the warm-up again.
    Limits: Triton only; a recording that fails raises, naming the option.
    """

    def __init__(self):
        self.graph = None
        self.steps = 0
        self.inputs = None  # (X, sample_weight) of the recording
        self.params = None  # static GaussianTileParams
        self.flat = self.summary = self.shapes = self.offsets = None

    def __getstate__(self):
        """A graph cannot be pickled or copied: a copy warms up and records anew."""
        state = self.__dict__.copy()
        state.update(graph=None, steps=0, inputs=None)
        return state

    def step(self, model, X, params, sample_weight):
        """As :meth:`_TritonStep.step`, through the static buffers."""
        torch = sys.modules["torch"]
        if (self.inputs is None or self.inputs[0] is not X or self.inputs[1] is not sample_weight
                or params is not self.params):
            self._restart(X, params, sample_weight)
        if self.graph is not None:
            self.graph.replay()
        elif not X.is_cuda:
            self._body(model, X, sample_weight)
        elif self.steps < GRAPH_WARMUP_STEPS:
            current = torch.cuda.current_stream(X.device)
            side = torch.cuda.Stream(device=X.device)
            side.wait_stream(current)
            with torch.cuda.stream(side):
                self._body(model, X, sample_weight)
            current.wait_stream(side)
        else:
            self._record(model, X, sample_weight)
            self.graph.replay()
        self.steps += 1
        values = self.flat.clone()
        parts = (values[offset:offset + shape.numel()].view(shape)
                 for shape, offset in zip(self.shapes, self.offsets))
        return FittedParameters(*parts), self.summary.tolist(), self.params  # the one wait

    def _restart(self, X, params, sample_weight):
        from fastlvm.kernels._triton_gaussian import GaussianTileParams

        self.graph, self.steps, self.inputs = None, 0, (X, sample_weight)
        self.params = GaussianTileParams.from_terms(
            params.code, params.n_features,
            *(getattr(params, name).clone() for name in _TERM_FIELDS))

    def _body(self, model, X, sample_weight):
        """One iteration from and into the static buffers."""
        torch = sys.modules["torch"]
        params = self.params
        result, following = _TritonStep.launch(model, X, params, sample_weight)
        with torch.no_grad():
            for name in _PARAM_FIELDS:
                new, old = getattr(following, name), getattr(params, name)
                if new is not None and new is not old:
                    old.copy_(new)
            fitted = (result.weights, result.means, result.covariances,
                      result.precisions_cholesky)
            self.shapes, self.offsets, start = [t.shape for t in fitted], [], 0
            for t in fitted:
                self.offsets.append(start)
                start += -(-t.numel() // _ALIGN) * _ALIGN
            self.flat = torch.empty(start, dtype=torch.float64, device=X.device)
            for t, offset in zip(fitted, self.offsets):
                self.flat[offset:offset + t.numel()].copy_(t.reshape(-1))
        self.summary = result.summary

    def _record(self, model, X, sample_weight):
        torch = sys.modules["torch"]
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._body(model, X, sample_weight)
        except RuntimeError as exc:
            raise RuntimeError(
                f"cuda_graph={model.cuda_graph!r} could not record the EM iteration as a "
                f"CUDA graph ({exc}); fit with cuda_graph=False.") from exc
        self.graph = graph


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
        self.graphed = None  # GraphedTritonStep, where records_graph()

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


def records_graph(model, X):
    """Whether the Triton iteration runs through :class:`GraphedTritonStep`:
    ``cuda_graph=True``, or 'auto' on a CUDA tensor (``GaussianMixture``'s doc)."""
    option = getattr(model, "cuda_graph", False)
    if isinstance(option, str):  # 'auto'
        return X.device.type == "cuda"
    return bool(option)


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
    step = backend.step
    if backend is _TritonStep and records_graph(model, X):
        if cache.graphed is None:
            cache.graphed = GraphedTritonStep()
        step = cache.graphed.step
    result, summary, next_params = step(model, X, params, sw)
    ll, n_nonfinite, n_nonpositive = summary[:3]
    float32 = is_float32(X)
    # (variances below the normal numbers are refused where the fit starts, by
    # precision_cholesky: the data's scale does not change between iterations)
    gp._refuse(n_nonfinite == 0, n_nonpositive == 0,
               gp.ILL_DEFINED_COVARIANCE + (gp.FLOAT32_HINT if float32 else ""), float32)
    model.weights_, model.means_ = result.weights, result.means
    model.covariances_, model.precisions_cholesky_ = result.covariances, result.precisions_cholesky
    if next_params.dtype == X.dtype and float32 and kappa_needs_float64(max(summary[3:])):
        # the means have moved far enough apart that the next E-step's float32
        # expansion would lose digits: float64 coefficients from here on (the
        # M-step keeps the dtype of the partials it is given)
        next_params = backend.params(model, X, in_float64=True)
    cache.keep(model, next_params, X.dtype)
    return ll / total
