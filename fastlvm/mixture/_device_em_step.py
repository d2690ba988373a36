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
is recorded once as a CUDA graph and replayed (:class:`GraphedStep`), with the
same values bit for bit; on cupy arrays the CuPy iteration is, with
``cuda_graph=True``.  A replayed iteration queues the next one before it waits
for its own summary, so the device does not idle while the host reads it and
goes round the fit loop.
"""

import math
import sys
from typing import NamedTuple

import numpy as np

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


class _DeviceStep:
    """What the backends' fused iterations share: a step is the backend's
    ``launch`` (the kernels, nothing read back) and its one ``read``."""

    @classmethod
    def step(cls, model, X, params, sample_weight):
        """(MStepResult, the summary as a list: the one read, next params)."""
        result, next_params = cls.launch(model, X, params, sample_weight)
        return result, cls.read(result.summary), next_params  # the one wait

    @classmethod
    def read_later(cls, summary, host):
        """Queue ``summary``'s copy into ``host`` (a page-locked ``host_buffer``) on the
        current stream; returns a function that waits for that copy alone (an event
        recorded after it) and gives the list."""
        cls.copy_to_host(summary, host)
        copied = cls.mark()
        return lambda: (copied.synchronize(), host.tolist())[1]


class _TritonStep(_DeviceStep):
    """The fused iteration's pieces on torch tensors (Triton kernels), and what
    :class:`GraphedStep` needs of torch to record them."""

    # the E-step coefficients' terms (GaussianTileParams), which the static
    # coefficients copy
    term_fields = ("c0", "a", "b", "s", "c", "u")

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
    def launch(model, X, params, sample_weight, fitted=None):
        """(MStepResult, next params): the iteration's kernels, nothing read back.

        ``fitted``, a :class:`FittedParameters` of tensors, receives the fitted
        parameters, and then the next coefficients are written into ``params``' own
        buffers, which are returned (:class:`GraphedStep`'s static buffers: no
        copies); else both are new tensors."""
        from fastlvm.kernels.estep_stats._triton import estep_partials
        from fastlvm.kernels.gaussian_mstep import _triton as mstep

        torch = sys.modules["torch"]
        with torch.no_grad():
            parts = estep_partials(X, params, sample_weight)
            center = statistics_centers(params.c0_64, params.mu_64, model.covariance_type)
            out = None if fitted is None else mstep.tile_params_outputs(params, fitted)
            result = mstep.gaussian_mstep_triton(parts.nk, parts.s1, parts.s2, parts.ll_parts,
                                                 center, model.covariance_type,
                                                 model.reg_covar, eps_of(X.dtype), out)
            if fitted is None:
                return result, mstep.next_tile_params(result, params)
            mstep.refresh_float64_views(params)
            return result, params

    # -- for GraphedStep --
    @staticmethod
    def on_gpu(X):
        return X.is_cuda

    @staticmethod
    def forget_derived(params):
        """Drop what ``params`` keeps derived from its terms, which the graphed step
        overwrites in place: GaussianTileParams keeps nothing."""

    @staticmethod
    def static_params(params):
        """Copies of ``params``' terms, which the graphed iterations overwrite."""
        from fastlvm.kernels._triton_gaussian import GaussianTileParams

        return GaussianTileParams.from_terms(
            params.code, params.n_features,
            *(getattr(params, name).clone() for name in _TritonStep.term_fields))

    @staticmethod
    def empty_flat(size, X):
        torch = sys.modules["torch"]
        return torch.empty(size, dtype=torch.float64, device=X.device)

    @staticmethod
    def copy(a):
        return a.clone()

    @staticmethod
    def read(summary):
        return summary.tolist()

    @staticmethod
    def host_buffer(summary):
        """Page-locked host memory of ``summary``'s size, for ``read_later``."""
        return sys.modules["torch"].empty(summary.shape, dtype=summary.dtype, pin_memory=True)

    @staticmethod
    def copy_to_host(summary, host):
        """Queue ``summary``'s copy into ``host`` (a :meth:`host_buffer`) on the current
        stream, asynchronously."""
        host.copy_(summary, non_blocking=True)

    @staticmethod
    def mark():
        """An event recorded on the current stream: ``synchronize()`` waits for the
        work queued so far."""
        event = sys.modules["torch"].cuda.Event()
        event.record()
        return event

    @staticmethod
    def side_stream(X):
        return sys.modules["torch"].cuda.Stream(device=X.device)

    @staticmethod
    def on_stream(side, body):
        """body() on the stream ``side``, after the current stream's work and before
        its next."""
        torch = sys.modules["torch"]
        current = torch.cuda.current_stream(side.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            body()
        current.wait_stream(side)

    @staticmethod
    def record(side, body):
        """body() recorded as a CUDA graph (``torch.cuda.graph`` captures on a stream
        of its own, from a private memory pool that holds what it allocates); the
        graph's ``replay()`` runs it."""
        torch = sys.modules["torch"]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            body()
        return graph


class _CupyStep(_DeviceStep):
    """The fused iteration's pieces on cupy arrays (CuPy kernels), and what
    :class:`GraphedStep` needs of CuPy to record them."""

    # ExpandedParams' terms, as _TritonStep's
    term_fields = ("c0", "coef", "s", "c", "u")

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
    def launch(model, X, params, sample_weight, fitted=None):
        """As :meth:`_TritonStep.launch`."""
        from fastlvm.kernels.estep_stats._cupy import centers, estep_sums
        from fastlvm.kernels.gaussian_mstep import _cupy as mstep

        ll, nk, s1, s2 = estep_sums(X, params, sample_weight)
        out, shift64 = (None, None) if fitted is None else mstep.expanded_params_outputs(
            params, fitted)
        result = mstep.gaussian_mstep_cupy(nk, s1, s2, ll, centers(params),
                                           model.covariance_type, model.reg_covar,
                                           eps_of(X.dtype), params.dtype, out, shift64)
        if fitted is None:
            return result, mstep.next_expanded_params(result, params)
        mstep.refresh_float64_views(params)
        return result, params

    # -- for GraphedStep --
    @staticmethod
    def on_gpu(X):
        return True  # every cupy array lives on a GPU

    @staticmethod
    def forget_derived(params):
        """As :meth:`_TritonStep.forget_derived`: ExpandedParams' cached operands of the
        chunked path's products, made again (inside the graph, when recording)."""
        params.forget_operands()

    @staticmethod
    def static_params(params):
        """As :meth:`_TritonStep.static_params`."""
        from fastlvm.kernels._cupy_gaussian import ExpandedParams

        return ExpandedParams.from_terms(
            params.covariance_type,
            *(None if getattr(params, name) is None else getattr(params, name).copy()
              for name in _CupyStep.term_fields))

    @staticmethod
    def empty_flat(size, X):
        return sys.modules["cupy"].empty(size, dtype=np.float64)

    @staticmethod
    def copy(a):
        return a.copy()

    @staticmethod
    def read(summary):
        return sys.modules["cupy"].asnumpy(summary).tolist()

    @staticmethod
    def host_buffer(summary):
        """As :meth:`_TritonStep.host_buffer` (``cupyx.empty_pinned``'s recipe)."""
        memory = sys.modules["cupy"].cuda.alloc_pinned_memory(summary.nbytes)
        return np.ndarray(summary.shape, summary.dtype, memory)

    @staticmethod
    def copy_to_host(summary, host):
        """As :meth:`_TritonStep.copy_to_host`."""
        sys.modules["cupy"].asnumpy(summary, out=host, blocking=False)

    @staticmethod
    def mark():
        """As :meth:`_TritonStep.mark`."""
        cupy = sys.modules["cupy"]
        event = cupy.cuda.Event()
        event.record(cupy.cuda.get_current_stream())
        return event

    @staticmethod
    def side_stream(X):
        # one for the warm-up and the capture: the memory pool keeps freed blocks
        # by stream, so a stream for each warm-up would strand its blocks there
        return sys.modules["cupy"].cuda.Stream(non_blocking=True)

    @staticmethod
    def on_stream(side, body):
        """As :meth:`_TritonStep.on_stream`."""
        cupy = sys.modules["cupy"]
        current = cupy.cuda.get_current_stream()
        side.wait_event(current.record())
        with side:
            body()
        current.wait_event(side.record())

    @staticmethod
    def record(side, body):
        """body() captured on the stream ``side`` into a CUDA graph, its allocations
        from a memory pool of its own, which the returned graph keeps: the arrays it
        frees inside the capture are reused only inside it, and no other code (nor
        ``free_all_blocks`` of the default pool) can take an address a replay
        writes.  Capture mode: CuPy's default, relaxed (the pool may call
        cudaMalloc)."""
        cupy = sys.modules["cupy"]
        pool = cupy.cuda.MemoryPool()
        side.wait_event(cupy.cuda.get_current_stream().record())
        with cupy.cuda.using_allocator(pool.malloc), side:
            side.begin_capture()
            try:
                body()
            finally:
                graph = side.end_capture()
        return _CupyGraph(graph, pool)


class _CupyGraph:
    """A captured ``cupy.cuda.Graph`` and the memory pool its addresses come from."""

    def __init__(self, graph, pool):
        self.graph, self.pool = graph, pool

    def replay(self):
        self.graph.launch(sys.modules["cupy"].cuda.get_current_stream())


_BACKENDS = {"triton": _TritonStep, "cupy": _CupyStep}

GRAPH_WARMUP_STEPS = 3  # eager iterations before the recording
# elements between the starts of the fitted parameters in the step's one output
# buffer: 512 bytes, the alignment of a fresh allocation, so that products of the
# parameters take the same paths (and give the same bits) as on separate arrays
_ALIGN = 64


class FittedParameters(NamedTuple):
    """What the model takes from an iteration (float64 arrays on X's device)."""

    weights: object
    means: object
    covariances: object
    precisions_cholesky: object


class GraphedStep:
    """The fused iteration on static buffers, recorded as a CUDA graph on a GPU
    (``GaussianMixture(cuda_graph=True)``; the default 'auto' on CUDA tensors).

    ``backend``: :class:`_TritonStep` (torch tensors; ``torch.cuda.graph``) or
    :class:`_CupyStep` (cupy arrays; ``Stream.begin_capture`` with a private
    memory pool).  At the EM benchmarks' sizes an iteration's kernels take a
    fraction of a millisecond on an H100/H200, and launching them costs the host
    as much: the statistics and M-step kernels and about twenty allocations
    (Triton 'full' and 'tied' add torch's batched Cholesky and a triangular
    solve).  Recorded once, the iteration is one launch.  What the recording
    reads and writes stays in place from one replay to the next:

    - inputs: X and the fit's sample weights (the same arrays every iteration),
      and the E-step's coefficients (``params``), over which the M-step writes
      the next ones (the E-step has read them by then);
    - outputs: the summary (the one read) and one flat float64 buffer, whose
      views (``fitted``) the M-step writes the new weights, means, covariances
      and precision factors into; it is copied after each replay, so no
      parameter the model holds is the graph's buffer.

    Nothing is copied inside the iteration but the float64 views of the shift
    (and 'full''s mu'_k), and Triton's transposing write of the 'full' and 'tied'
    factors: a graph node each, where copying the M-step's results into the
    static buffers took nine to ten.  The first GRAPH_WARMUP_STEPS iterations
    run eagerly on a side stream (kernels compile and their configs are chosen;
    the allocator settles); the next one records and replays, and each replay
    queues the next iteration before its summary is read (:meth:`step`).  Off a
    GPU (CPU tensors under the Triton interpreter; the tests run the CuPy step
    this way too, on the CUDA emulator, by setting ``on_gpu`` False) there is no
    graph: every iteration runs the same body on the same buffers, the next one
    ahead as on a GPU, which the tests compare with the plain iteration value for
    value; they also run the GPU course on CPU tensors, with the recording and
    its replays stood in for (``tests/torch_graphs.py``, and the emulator's
    graphs for CuPy).  New inputs or coefficients from
    elsewhere (a new start, ``_set_parameters``) start the warm-up again.
    Limits: a recording that fails raises, naming the option.
    """

    def __init__(self, backend):
        self.backend = backend
        self.graph = None
        self.steps = 0
        self.inputs = None  # (X, sample_weight) of the recording
        self.params = None  # the static coefficients
        self.stream = None  # the side stream of the warm-up (and CuPy's capture)
        self.flat = self.fitted = self.summary = self.shapes = self.offsets = None
        self.host = None  # page-locked host copy of the summary (on a GPU)
        self.ahead = None  # the next iteration, already queued: its end, or True off a GPU

    def __getstate__(self):
        """A graph cannot be pickled or copied: a copy warms up and records anew (and
        runs nothing ahead)."""
        state = self.__dict__.copy()
        state.update(graph=None, steps=0, inputs=None, stream=None, host=None, ahead=None)
        return state

    def step(self, model, X, params, sample_weight):
        """As :meth:`_DeviceStep.step`, through the static buffers.

        Once the iteration is recorded (and on every iteration off a GPU), each step
        also queues the next one, on the coefficients it has just written, before it
        waits for its own summary: the device runs iteration n + 1 while the host
        reads iteration n's summary, checks it and returns through the fit loop,
        instead of idling for that round trip.  The next call takes that iteration if
        it asks for it (the same inputs, and these coefficients); anything else
        (new coefficients: a new start, float64 coefficients, parameters set from
        outside) discards it, after waiting for it to end.  A fit's last iteration
        thus runs one more on the device, whose results nothing reads.
        """
        backend = self.backend
        if (self.inputs is None or self.inputs[0] is not X or self.inputs[1] is not sample_weight
                or params is not self.params):
            self.settle()
            self.graph, self.steps, self.inputs = None, 0, (X, sample_weight)
            self.params = backend.static_params(params)
            self._allocate(model, X)
            self.host = None  # made for the new summary's size
        if self.ahead is None:
            self._run(model, X, sample_weight)
        self.ahead = None
        self.steps += 1
        parts = self._views(backend.copy(self.flat))
        if self.graph is None and backend.on_gpu(X):  # warming up: no iteration ahead
            return FittedParameters(*parts), backend.read(self.summary), self.params
        if self.graph is None:  # off a GPU: read before the next iteration overwrites it
            summary = backend.read(self.summary)
            read = lambda: summary  # noqa: E731
        else:
            if self.host is None:
                self.host = backend.host_buffer(self.summary)
            read = backend.read_later(self.summary, self.host)
        self._run(model, X, sample_weight)  # the next iteration, ahead
        self.ahead = backend.mark() if self.graph is not None else True
        return FittedParameters(*parts), read(), self.params  # the one wait

    def settle(self):
        """Wait for an iteration queued ahead to end, and forget it (before its buffers
        are dropped or made anew)."""
        if self.ahead is not None and self.ahead is not True:
            self.ahead.synchronize()
        self.ahead = None

    def _run(self, model, X, sample_weight):
        """One iteration from the static buffers into them: eager while warming up,
        then recorded, then replayed (eager throughout off a GPU)."""
        backend = self.backend
        body = lambda: self._body(model, X, sample_weight)  # noqa: E731
        if self.graph is not None:
            self.graph.replay()
        elif not backend.on_gpu(X):
            body()
        elif self.steps < GRAPH_WARMUP_STEPS:
            backend.on_stream(self._side_stream(X), body)
        else:
            try:
                self.graph = backend.record(self._side_stream(X), body)
            except Exception as exc:
                raise RuntimeError(
                    f"cuda_graph={model.cuda_graph!r} could not record the EM iteration as a "
                    f"CUDA graph ({exc}); fit with cuda_graph=False.") from exc
            self.graph.replay()

    def _side_stream(self, X):
        if self.stream is None:
            self.stream = self.backend.side_stream(X)
        return self.stream

    def _body(self, model, X, sample_weight):
        """One iteration from and into the static buffers: the M-step writes the fitted
        parameters into ``fitted``'s views of the flat buffer and the next
        coefficients over the ones the E-step read, with no copies."""
        backend, params = self.backend, self.params
        backend.forget_derived(params)  # made again from this iteration's terms
        result, _ = backend.launch(model, X, params, sample_weight, self.fitted)
        self.summary = result.summary

    def _allocate(self, model, X):
        """The flat output buffer and its views, in the shapes of the model's
        parameters (which the M-step's are)."""
        self.shapes = [tuple(a.shape) for a in model._get_parameters()]
        self.offsets, start = [], 0
        for shape in self.shapes:
            self.offsets.append(start)
            start += -(-shape_size(shape) // _ALIGN) * _ALIGN
        self.flat = self.backend.empty_flat(start, X)
        self.fitted = FittedParameters(*self._views(self.flat))

    def _views(self, flat):
        return tuple(flat[offset:offset + shape_size(shape)].reshape(shape)
                     for shape, offset in zip(self.shapes, self.offsets))


def shape_size(shape):
    """The number of elements of an array of ``shape``."""
    return math.prod(shape)


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
        self.graphed = None  # GraphedStep, where records_graph()

    def __getstate__(self):
        """A copy taken while an iteration runs ahead (:meth:`GraphedStep.step`) makes
        its coefficients anew from its parameters: the static ones already hold the
        iteration ahead's."""
        state = self.__dict__.copy()
        if self.graphed is not None and self.graphed.ahead is not None:
            state.update(sources=None, params=None)
        return state

    def settle(self):
        """Wait for any iteration queued ahead (before the cache is dropped)."""
        if self.graphed is not None:
            self.graphed.settle()

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


def drop_fused_step(model):
    """Forget what ``model``'s fused iterations carried (at a new start and at the end
    of a fit), once any iteration queued ahead has ended: no buffer it writes is
    released while it runs."""
    cache = model.__dict__.pop("_fused_step", None)
    if cache is not None:
        cache.settle()


def _sources(model, dtype):
    """What the E-step's coefficients are made from, compared by identity."""
    return model.weights_, model.means_, model.precisions_cholesky_, dtype


def records_graph(model, X, backend):
    """Whether ``backend``'s iteration runs through :class:`GraphedStep`:
    ``cuda_graph=True``, or 'auto' on a torch CUDA tensor (``GaussianMixture``'s
    doc).  'auto' leaves cupy arrays eager: CuPy's recording has not yet run on a
    GPU (``bench/results/gpu-h200.md``), so it is taken only when asked for."""
    option = getattr(model, "cuda_graph", False)
    if isinstance(option, str):  # 'auto'
        return backend is _TritonStep and X.device.type == "cuda"
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
    if records_graph(model, X, backend):
        if cache.graphed is None or cache.graphed.backend is not backend:
            cache.graphed = GraphedStep(backend)
        step = cache.graphed.step
    result, summary, next_params = step(model, X, params, sw)
    ll, n_nonfinite, n_nonpositive = summary[:3]
    float32 = is_float32(X)
    # (variances below the normal numbers are refused where the fit starts, by
    # precision_cholesky: the data's scale does not change between iterations)
    gp.refuse_flagged_covariances((n_nonfinite == 0, True, n_nonpositive == 0), float32)
    model.weights_, model.means_ = result.weights, result.means
    model.covariances_, model.precisions_cholesky_ = result.covariances, result.precisions_cholesky
    if next_params.dtype == X.dtype and float32 and kappa_needs_float64(max(summary[3:])):
        # the means have moved far enough apart that the next E-step's float32
        # expansion would lose digits: float64 coefficients from here on (the
        # M-step keeps the dtype of the partials it is given)
        next_params = backend.params(model, X, in_float64=True)
    cache.keep(model, next_params, X.dtype)
    return ll / total
