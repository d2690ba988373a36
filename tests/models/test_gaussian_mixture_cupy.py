"""GaussianMixture on cupy arrays: CuPy kernels, device M-step and initialisation.

Every test runs with CuPy on a GPU where there is one, and elsewhere on the
NumPy-backed ``cupy`` of ``tests/kernels/fake_cupy.py`` (CUDA kernels on the CPU
emulator), which refuses host arrays in device work as CuPy does: whole fits,
predictions, partial fits, the fused EM iteration, and its CUDA graph recorded and
replayed (the stand-in's graphs replay the captured work).  Only CuPy's own
capture needs a GPU (a test of its own).
"""

import copy
import importlib
import sys
import types

import numpy as np
import pytest

from fastlvm import GaussianMixture
from fastlvm.mixture import _device_em_step, _device_kmeans, _gaussian_params
from tests.conftest import COVARIANCE_FLAWS, COVARIANCE_TYPES, CUPY_GPU, flawed_covariances
from tests.conftest import to_numpy
from tests.kernels import fake_cupy

gpu = pytest.mark.skipif(not CUPY_GPU, reason="needs cupy and a CUDA GPU "
                         "(pip install 'fastlvm[cupy]')")


# a fitted mixture's parameters: what a fit on cupy arrays keeps on the device
PARAMETERS = ("weights_", "means_", "covariances_", "precisions_cholesky_", "precisions_")


def _on_device(model, cupy):
    """``model`` (fitted on the host) with its parameters copied to the device."""
    for name in PARAMETERS:
        setattr(model, name, cupy.asarray(getattr(model, name)))
    return model


def _blobs(n=240, d=3, dtype=np.float64, seed=0, spread=5.0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((3, d)) * spread
    X = centers[rng.integers(0, 3, n)] + rng.standard_normal((n, d))
    return X.astype(dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_same_bounds_and_predictions_as_host(covariance_type, dtype, cupy):
    X = _blobs(dtype=dtype)
    kw = dict(n_components=3, covariance_type=covariance_type, init_params="random_from_data",
              random_state=0, max_iter=6, tol=0)
    with pytest.warns(Warning):  # max_iter reached with tol=0: ConvergenceWarning
        host = GaussianMixture(**kw).fit(X)
        dev = GaussianMixture(**kw).fit(cupy.asarray(X))
    rtol = 1e-7 if dtype == np.float64 else 2e-3
    for name in ("weights_", "means_", "covariances_", "precisions_cholesky_", "precisions_"):
        value = getattr(dev, name)
        # float32 data keeps float32 parameters, on the host too (as sklearn >= 1.7)
        assert isinstance(value, cupy.ndarray) and value.dtype == dtype, name
        assert getattr(host, name).dtype == dtype, name
        np.testing.assert_allclose(value.get(), getattr(host, name), rtol=rtol, atol=rtol,
                                   err_msg=name)
    np.testing.assert_allclose(dev.lower_bounds_, host.lower_bounds_, rtol=rtol)
    Xd = cupy.asarray(X)
    labels = dev.predict(Xd)
    assert isinstance(labels, cupy.ndarray)
    assert (labels.get() == host.predict(X)).mean() > 0.99
    np.testing.assert_allclose(dev.predict_proba(Xd).get(), host.predict_proba(X),
                               atol=10 * rtol)
    np.testing.assert_allclose(dev.score_samples(Xd).get(), host.score_samples(X), rtol=rtol)
    assert dev.score(Xd) == pytest.approx(host.score(X), rel=rtol)


@pytest.mark.parametrize("init_params", ["kmeans", "k-means++", "random"])
def test_initialisations_run_on_the_device_and_are_reproducible(init_params, cupy):
    Xd = cupy.asarray(_blobs(dtype=np.float32, spread=20.0))
    fits = [GaussianMixture(3, covariance_type="diag", init_params=init_params,
                            random_state=1, max_iter=20).fit(Xd) for _ in range(2)]
    assert bool((fits[0].means_ == fits[1].means_).all())  # same seed, same bits
    assert isinstance(fits[0].means_, cupy.ndarray)


def test_sample_weights_samples_and_bad_input(cupy):
    X = _blobs(n=120)
    reps = np.random.default_rng(3).integers(1, 3, X.shape[0])
    kw = dict(n_components=2, covariance_type="full", means_init=X[:2], random_state=0,
              max_iter=5, tol=0)
    with pytest.warns(Warning):
        a = GaussianMixture(**kw).fit(cupy.asarray(X), sample_weight=cupy.asarray(reps * 1.0))
        b = GaussianMixture(**kw).fit(cupy.asarray(np.repeat(X, reps, axis=0)))
    np.testing.assert_allclose(a.means_.get(), b.means_.get(), rtol=1e-9)
    Xs, ys = a.sample(7)
    assert isinstance(Xs, cupy.ndarray) and Xs.shape == (7, 3) and ys.shape == (7,)
    bad = cupy.asarray(X)
    bad[3, 1] = cupy.nan
    with pytest.raises(ValueError, match="NaN or infinity"):
        GaussianMixture(2).fit(bad)
    with pytest.raises(TypeError, match="float32 or float64"):
        GaussianMixture(2).fit(cupy.ones((10, 2), dtype=cupy.int64))
    with pytest.raises(ValueError, match="cupy.asarray"):
        a.predict(X)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_partial_fit_on_cupy_batches_steps_like_the_host(covariance_type, cupy):
    from fastlvm import BayesianGaussianMixture

    X = _blobs()
    for cls, extra in ((GaussianMixture, {}), (GaussianMixture, {"prior": {}}),
                       (BayesianGaussianMixture, {"total_samples": 2400})):
        kw = dict(n_components=3, covariance_type=covariance_type,
                  init_params="random_from_data", random_state=0, **extra)
        host, dev = cls(**kw), cls(**kw)
        for start in range(0, len(X), 80):
            host.partial_fit(X[start:start + 80])
            dev.partial_fit(cupy.asarray(X[start:start + 80]))
        assert isinstance(dev.means_, cupy.ndarray)
        np.testing.assert_allclose(dev.means_.get(), host.means_, rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(dev.covariances_.get(), host.covariances_, rtol=1e-7,
                                   atol=1e-9)
    with pytest.raises(ValueError, match="cupy array there"):
        dev.partial_fit(X)


@pytest.mark.parametrize("given", ["init", "prior", "bayesian prior"])
def test_parameters_given_as_cupy_arrays_are_the_host_ones(given, cupy):
    """``means_init`` and kin, and the priors' arrays, may be cupy arrays (they are
    read back for sklearn's checks): the fit is the one with the same NumPy arrays."""
    from fastlvm import BayesianGaussianMixture

    X = _blobs(n=120)
    rng = np.random.default_rng(5)
    host = {
        "init": dict(weights_init=np.full(3, 1 / 3), means_init=X[:3],
                     precisions_init=rng.random((3, 3)) + 0.5),
        "prior": dict(prior={"mean": X.mean(0), "covariance": np.full(3, 1.5)}),
        "bayesian prior": dict(mean_prior=X.mean(0), covariance_prior=np.full(3, 2.0)),
    }[given]
    on_device = {name: {k: cupy.asarray(v) for k, v in value.items()}
                 if isinstance(value, dict) else cupy.asarray(value)
                 for name, value in host.items()}
    cls = BayesianGaussianMixture if given == "bayesian prior" else GaussianMixture
    kw = dict(n_components=3, covariance_type="diag", random_state=0, max_iter=4, tol=0)
    Xd = cupy.asarray(X)
    with pytest.warns(Warning):
        a = cls(**kw, **host).fit(Xd)
        b = cls(**kw, **on_device).fit(Xd)
    assert a.lower_bounds_ == b.lower_bounds_
    np.testing.assert_array_equal(a.means_.get(), b.means_.get())


def test_device_kmeans_on_numpy_matches_torch():
    """The device k-means, run on NumPy arrays (CuPy's code path), gives the torch
    result bit for bit: the same seeds, the same sums."""
    torch = pytest.importorskip("torch")
    X = _blobs(n=300, spread=8.0)
    sw = np.random.default_rng(1).random(300)
    for weights in (None, sw):
        a = _device_kmeans.kmeans(X, 3, np.random.RandomState(4), weights)
        b = _device_kmeans.kmeans(torch.as_tensor(X), 3, np.random.RandomState(4),
                                  None if weights is None else torch.as_tensor(weights))
        np.testing.assert_array_equal(a[0], b[0].numpy())
        np.testing.assert_allclose(a[1], b[1].numpy(), rtol=1e-12)
        assert a[0].dtype == np.int64 and a[1].dtype == np.float64


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_cupy_precision_cholesky_matches_host(covariance_type, cupy):
    """The batched inverse-Cholesky of the CuPy M-step."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 4, 4))
    full = a @ a.swapaxes(1, 2) + np.eye(4)
    cov = {"full": full, "tied": full[0], "diag": rng.random((3, 4)) + 0.1,
           "spherical": rng.random(3) + 0.1}[covariance_type]
    got = _gaussian_params.precision_cholesky(cupy.asarray(cov), covariance_type)
    want = _gaussian_params.precision_cholesky(cov, covariance_type)
    np.testing.assert_allclose(got.get(), want, rtol=1e-10, atol=1e-12)
    for flaw in COVARIANCE_FLAWS:  # CuPy's factorisations never raise: the check does
        # not finite: the statistics overflowed (X is checked); else sklearn's message
        match = "overflowed float32" if flaw in ("nan", "inf") else "ill-defined empirical"
        with pytest.raises(ValueError, match=match):
            _gaussian_params.precision_cholesky(
                cupy.asarray(flawed_covariances(covariance_type, flaw)), covariance_type,
                float32_data=True)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_fused_iteration_steps_like_the_host(covariance_type, dtype, weighted, cupy,
                                             monkeypatch):
    """The fused CuPy iteration (the E-step's sums, the M-step kernels, coefficients
    carried from one iteration to the next), run on the emulator, from the host's
    starting point: the host's unfused bounds and parameters, three iterations on."""
    X = _blobs(n=150, d=4, dtype=dtype)
    sw = np.random.default_rng(2).random(150) + 0.5 if weighted else None
    with pytest.warns(Warning):  # max_iter=1: ConvergenceWarning
        host = GaussianMixture(3, covariance_type=covariance_type, random_state=0,
                               max_iter=1).fit(X, sample_weight=sw)
    dev = _on_device(copy.deepcopy(host), cupy)
    bounds = [host._em_iteration(X, sw) for _ in range(3)]
    built = []
    expanded = importlib.import_module("fastlvm.kernels._cupy_gaussian").ExpandedParams
    monkeypatch.setattr(expanded, "__init__", _counting(expanded.__init__, built))
    cache = _device_em_step.FusedStepCache()
    Xd, swd = cupy.asarray(X), None if sw is None else cupy.asarray(sw)
    got = [_device_em_step.fused_em_iteration(dev, Xd, swd, cache) for _ in range(3)]
    assert len(built) == 1  # later iterations take the M-step's coefficients
    rtol = 1e-10 if dtype == np.float64 else 1e-4
    np.testing.assert_allclose(got, bounds, rtol=rtol)
    for name in ("weights_", "means_", "covariances_", "precisions_cholesky_"):
        value = getattr(dev, name)
        assert isinstance(value, cupy.ndarray) and value.dtype == np.float64, name
        np.testing.assert_allclose(value.get(), getattr(host, name), rtol=rtol, atol=rtol,
                                   err_msg=name)


def test_fused_iterations_turn_to_float64_when_the_means_move_apart(cupy, monkeypatch):
    """float32 blobs 2000 deviations apart, started at their centres under
    covariances 300 deviations wide: the first E-step's coefficients are float32;
    its M-step's summary (kappa_k) shows the means far apart under the new,
    narrow covariances, so the next coefficients are float64 (CUDA kernels on the
    emulator).  The first M-step's moments were float32 sums around the common
    centre of rows thousands of their new deviations from it: its parameters are
    off by 1e-3 (the bound after it: 7e-3 nats of -7.6); the float64 iterations
    after it come back to the host's."""
    X = _blobs(n=90, d=2, dtype=np.float32, spread=2000.0)
    with pytest.warns(Warning):  # max_iter=1: ConvergenceWarning
        host = GaussianMixture(3, covariance_type="diag", random_state=0, max_iter=1).fit(X)
    host.precisions_cholesky_ = np.full((3, 2), np.sqrt(1e-5))
    host.covariances_ = np.full((3, 2), 1e5)
    dev = _on_device(copy.deepcopy(host), cupy)
    bounds = [host._em_iteration(X, None) for _ in range(3)]
    dtypes = []
    expanded = importlib.import_module("fastlvm.kernels._cupy_gaussian").ExpandedParams

    def recorded(init):
        def made(self, *args, **kwargs):
            init(self, *args, **kwargs)
            dtypes.append(self.dtype)

        return made

    monkeypatch.setattr(expanded, "__init__", recorded(expanded.__init__))
    cache = _device_em_step.FusedStepCache()
    Xd = cupy.asarray(X)
    got = [_device_em_step.fused_em_iteration(dev, Xd, None, cache) for _ in range(3)]
    assert dtypes == [np.float32, np.float64]
    assert cache.params.dtype == np.float64  # the M-step kept float64 coefficients
    np.testing.assert_allclose(got[0], bounds[0], rtol=1e-6)
    np.testing.assert_allclose(got[2], bounds[2], rtol=1e-6)
    for name in ("means_", "covariances_"):
        np.testing.assert_allclose(getattr(dev, name).get(), getattr(host, name), rtol=2e-4,
                                   err_msg=name)


def _graph_problem(covariance_type, dtype, cuda_graph, cupy):
    """(data, sample weights, plain, graphed), all on the device: two twins of a model
    fitted one iteration on the host, with cuda_graph False and ``cuda_graph``."""
    X = _blobs(n=150, d=4, dtype=dtype)
    sw = np.random.default_rng(2).random(150) + 0.5
    with pytest.warns(Warning):  # max_iter=1: ConvergenceWarning
        host = GaussianMixture(3, covariance_type=covariance_type, random_state=0,
                               max_iter=1).fit(X, sample_weight=sw)
    plain, graphed = (_on_device(copy.deepcopy(host), cupy) for _ in range(2))
    plain.cuda_graph, graphed.cuda_graph = False, cuda_graph
    return cupy.asarray(X), cupy.asarray(sw), plain, graphed


def _eager_graphs(monkeypatch):
    """The graphed CuPy step run eagerly, from and into its static buffers, as it
    runs off a GPU (CPU tensors under Triton's interpreter take this path)."""
    monkeypatch.setattr(_device_em_step._CupyStep, "on_gpu", staticmethod(lambda X: False))


def _same_iterations(plain, graphed, X, sw, steps, caches=None):
    """Run ``steps`` fused iterations of both models (each with its cache in
    ``caches``, new ones by default); assert the same bounds and parameters bit for
    bit; return the caches."""
    caches = caches or [_device_em_step.FusedStepCache() for _ in range(2)]
    bounds = [[_device_em_step.fused_em_iteration(m, X, sw, c) for _ in range(steps)]
              for m, c in zip((plain, graphed), caches)]
    assert bounds[1] == bounds[0]
    for name in ("weights_", "means_", "covariances_", "precisions_cholesky_"):
        np.testing.assert_array_equal(to_numpy(getattr(graphed, name)),
                                      to_numpy(getattr(plain, name)), name)
    return caches


@pytest.mark.parametrize("recorded", [True, False], ids=["recorded", "eager"])
@pytest.mark.parametrize("path", ["tiles", "chunks"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_cuda_graph_step_equals_the_plain_fused_one(covariance_type, dtype, path, recorded,
                                                    cupy_backend, monkeypatch):
    """``cuda_graph=True`` on cupy arrays runs the CuPy iteration from and into static
    buffers, recorded and replayed (the emulator's graphs replay the captured
    device work, :class:`fake_cupy.FakeGraph`), or eagerly as off a GPU
    (:func:`_eager_graphs`): the plain iteration's bounds and parameters bit for
    bit, the coefficients updated in place, and the model's parameters never the
    buffers.  On the chunked path ('chunks') the products' operands, cached on the
    coefficients, are made again from each iteration's (inside the graph)."""
    X, sw, plain, graphed = _graph_problem(covariance_type, dtype, True, cupy_backend.cupy)
    if path == "chunks":
        monkeypatch.setattr(cupy_backend.tiles, "MAX_COMPONENTS", 0)
    if not recorded:
        _eager_graphs(monkeypatch)
    warm = _device_em_step.GRAPH_WARMUP_STEPS
    steps = warm + 3
    cache = _same_iterations(plain, graphed, X, sw, steps)[1]
    step = cache.graphed
    assert step.backend is _device_em_step._CupyStep
    # recorded at step warm + 1, replayed then and once ahead of each step from there
    assert (step.graph.graph.launches == steps - warm + 1) if recorded else step.graph is None
    assert step.steps == steps and cache.params is step.params  # updated in place
    kept = {name: getattr(graphed, name).get() for name in ("means_", "covariances_")}
    step.flat.fill(np.nan)  # what the next replay would overwrite
    for name, value in kept.items():
        np.testing.assert_array_equal(getattr(graphed, name).get(), value, name)


class _ReplayedBody:
    """A stand-in for a recorded graph: each replay runs the recorded body, as a
    CUDA graph replays the work captured (capture itself runs nothing)."""

    def __init__(self, body):
        self.body, self.replays = body, 0

    def replay(self):
        self.replays += 1
        self.body()


@pytest.mark.parametrize("covariance_type", ["tied", "diag"])
def test_cuda_graph_warms_up_records_once_then_replays(covariance_type, cupy_backend,
                                                       monkeypatch):
    """The graphed step's course on a GPU, with CuPy's side stream and recording
    stood in for: GRAPH_WARMUP_STEPS eager iterations, one recording, replays from
    then on, each step queuing the next iteration's replay before it reads its own
    summary (through page-locked memory), the plain iteration's values throughout;
    new coefficients set between iterations discard the iteration ahead, after
    waiting for it, and start again; a recording that fails names the option."""
    X, sw, plain, graphed = _graph_problem(covariance_type, np.float64, True,
                                           cupy_backend.cupy)
    calls = []
    cupy_step = _device_em_step._CupyStep
    monkeypatch.setattr(cupy_step, "side_stream",
                        staticmethod(lambda X: (calls.append("stream"), object())[1]))
    monkeypatch.setattr(cupy_step, "on_stream",
                        staticmethod(lambda side, body: (calls.append("side"), body())))
    monkeypatch.setattr(cupy_step, "record",
                        staticmethod(lambda side, body: (calls.append("record"),
                                                         _ReplayedBody(body))[1]))
    warm = _device_em_step.GRAPH_WARMUP_STEPS
    caches = _same_iterations(plain, graphed, X, sw, warm + 3)
    # one side stream, made for the first warm-up iteration
    assert calls == ["stream"] + ["side"] * warm + ["record"]
    step = caches[1].graphed
    assert step.graph.replays == 4  # three iterations, and the one ahead
    ahead = step.ahead
    assert isinstance(ahead, fake_cupy.FakeEvent) and ahead.stream is not None
    # parameters set from outside: new coefficients, a new warm-up
    for model in (plain, graphed):
        model.means_ = model.means_ + 0.25  # on the device, as the fit left them
    calls.clear()
    waited = []
    monkeypatch.setattr(ahead, "synchronize", lambda: waited.append(ahead))
    _same_iterations(plain, graphed, X, sw, 1, caches)
    assert calls == ["side"] and step.graph is None
    assert waited == [ahead] and step.ahead is None

    def failing(side, body):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(cupy_step, "record", staticmethod(failing))
    cache = _device_em_step.FusedStepCache()
    with pytest.raises(RuntimeError, match="cuda_graph=True could not record .* "
                                           "fit with cuda_graph=False"):
        for _ in range(warm + 1):
            _device_em_step.fused_em_iteration(graphed, X, sw, cache)


@pytest.mark.parametrize("path", ["tiles", "chunks"])
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_cuda_graph_capture_reads_nothing_back(covariance_type, path, cupy_backend,
                                               monkeypatch):
    """CuPy's recording itself (``_CupyStep.record``, with the emulator's streams): the
    warm-up on one side stream, then the capture on that stream, from the memory
    pool of its own, with nothing read back to the host inside it (which a capture
    refuses).  The emulator runs the captured work as it is issued, so the first
    launch stands for it, and the second (the iteration queued ahead) replays it:
    the four iterations are the plain ones bit for bit."""
    X, sw, plain, graphed = _graph_problem(covariance_type, np.float32, True,
                                           cupy_backend.cupy)
    if path == "chunks":
        monkeypatch.setattr(cupy_backend.tiles, "MAX_COMPONENTS", 0)
    cupy_step = _device_em_step._CupyStep
    warm = _device_em_step.GRAPH_WARMUP_STEPS
    caches = _same_iterations(plain, graphed, X, sw, warm + 1)
    step = caches[1].graphed
    assert step.graph.graph.launches == 2 and not step.stream.is_capturing()
    assert step.stream.capture_allocator == step.graph.pool.malloc
    assert len(step.stream.waited) == warm + 1  # each warm-up and the capture after the current
    # a read inside the iteration: the capture refuses it, and the step says what to do
    launch = cupy_step.launch

    def reading(*args):
        result, following = launch(*args)
        sys.modules["cupy"].asnumpy(result.summary)
        return result, following

    monkeypatch.setattr(cupy_step, "launch", staticmethod(reading))
    with pytest.raises(RuntimeError, match="could not record .*D2H transfers are disallowed"):
        _same_iterations(plain, graphed, X, sw, warm + 1)


def _counted_bodies(monkeypatch):
    """A list that grows by one at each run of the graphed step's body."""
    bodies = []
    body = _device_em_step.GraphedStep._body

    def counted(self, *args):
        bodies.append(self.params.dtype)
        return body(self, *args)

    monkeypatch.setattr(_device_em_step.GraphedStep, "_body", counted)
    return bodies


def test_cuda_graph_step_runs_the_next_iteration_ahead(cupy_backend, monkeypatch):
    """Each graphed step queues the next iteration (on the coefficients it has just
    written) before reading its own summary; the next step takes it.  Where the
    summary turns the coefficients to float64 (the float32 problem of
    :func:`test_fused_iterations_turn_to_float64_when_the_means_move_apart`), the
    iteration ahead ran on the float32 ones: it is discarded and the step starts
    again.  The bounds and parameters are the plain iteration's bit for bit."""
    X = _blobs(n=90, d=2, dtype=np.float32, spread=2000.0)
    with pytest.warns(Warning):  # max_iter=1: ConvergenceWarning
        host = GaussianMixture(3, covariance_type="diag", random_state=0, max_iter=1).fit(X)
    host.precisions_cholesky_ = np.full((3, 2), np.sqrt(1e-5))
    host.covariances_ = np.full((3, 2), 1e5)
    cp = cupy_backend.cupy
    plain, graphed = (_on_device(copy.deepcopy(host), cp) for _ in range(2))
    plain.cuda_graph, graphed.cuda_graph = False, True
    _eager_graphs(monkeypatch)  # the bodies run in Python: counted
    bodies = _counted_bodies(monkeypatch)
    caches = _same_iterations(plain, graphed, cp.asarray(X), None, 3)
    # iteration 1 and the one ahead on float32 coefficients; iteration 2 anew on
    # float64 ones, and one ahead; iteration 3 is that one, and one ahead
    assert bodies == [np.float32] * 2 + [np.float64] * 3
    assert caches[1].graphed.ahead is True and caches[1].params.dtype == np.float64


def test_a_copy_taken_with_an_iteration_ahead_makes_its_coefficients_anew(cupy_backend):
    """A copy of a model and its step cache taken while an iteration runs ahead (a
    fit's callback, say) does not take the static coefficients, which already hold
    the iteration ahead's: it makes them from its parameters, so its next iteration
    is the plain one's (to rounding: made by the host's code, not the M-step's)."""
    X, sw, plain, graphed = _graph_problem("full", np.float64, True, cupy_backend.cupy)
    caches = _same_iterations(plain, graphed, X, sw, _device_em_step.GRAPH_WARMUP_STEPS + 1)
    assert caches[1].graphed.graph is not None  # recorded, replaying
    assert caches[1].graphed.ahead is not None
    twin, twin_cache = copy.deepcopy((graphed, caches[1]))
    assert twin_cache.params is None and twin_cache.graphed.ahead is None
    expected = _device_em_step.fused_em_iteration(plain, X, sw, caches[0])
    got = _device_em_step.fused_em_iteration(twin, X, sw, twin_cache)
    assert got == pytest.approx(expected, rel=1e-12)
    # the original takes its iteration ahead: the plain one's bit for bit
    assert _device_em_step.fused_em_iteration(graphed, X, sw, caches[1]) == expected
    np.testing.assert_allclose(twin.means_.get(), plain.means_.get(), rtol=1e-10)


def test_the_end_of_a_fit_waits_for_the_iteration_ahead():
    """Dropping the step cache (a new start, the end of a fit) waits for the
    iteration queued ahead before its buffers go."""
    X = _blobs(n=40, d=2)
    gm = GaussianMixture(2, covariance_type="diag", random_state=0, max_iter=1)
    with pytest.warns(Warning):
        gm.fit(X)
    waited = []

    def fit():  # its start drops the cache
        with pytest.warns(Warning):
            gm.fit(X)

    for drop in (lambda: gm._set_parameters(gm._get_parameters()), fit):
        cache = _device_em_step.FusedStepCache()
        cache.graphed = _device_em_step.GraphedStep(_device_em_step._CupyStep)
        cache.graphed.ahead = types.SimpleNamespace(synchronize=lambda: waited.append(1))
        gm.__dict__["_fused_step"] = cache
        drop()
        assert "_fused_step" not in vars(gm) and cache.graphed.ahead is None
    assert waited == [1, 1]


@pytest.mark.parametrize("cuda_graph, records", [("auto", False), (True, True),
                                                 (False, False)])
def test_cuda_graph_auto_leaves_cupy_arrays_eager(cuda_graph, records, cupy_backend):
    """'auto' records the Triton iteration only: CuPy's recording is taken when asked
    for (True) until it has run on a GPU."""
    X, sw, plain, graphed = _graph_problem("diag", np.float64, cuda_graph, cupy_backend.cupy)
    cache = _same_iterations(plain, graphed, X, sw, 2)[1]
    assert (cache.graphed is not None) == records


@gpu
@pytest.mark.parametrize("path", ["tiles", "chunks"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_cuda_graph_records_the_cupy_iteration_on_a_gpu(covariance_type, dtype, path,
                                                        monkeypatch):
    """On a GPU, ``cuda_graph=True`` captures the CuPy iteration and replays it: the
    fit's bounds and parameters are cuda_graph=False's bit for bit, before and after
    the recording, and the parameters are not the graph's buffers.  'chunks': the
    E-step's chunked path, whose products are cuBLAS calls inside the capture
    (which CuPy may refuse: cupy/cupy#6290)."""
    import cupy

    from fastlvm.kernels.estep_stats import _cupy_tiles

    if path == "chunks":
        monkeypatch.setattr(_cupy_tiles, "MAX_COMPONENTS", 0)
    X = cupy.asarray(_blobs(n=400, d=4, dtype=dtype))
    steps = _device_em_step.GRAPH_WARMUP_STEPS + 3
    kw = dict(n_components=3, covariance_type=covariance_type, random_state=0,
              init_params="random_from_data", max_iter=steps, tol=0)
    with pytest.warns(Warning):
        plain = GaussianMixture(cuda_graph=False, **kw).fit(X)
        graphed = GaussianMixture(cuda_graph=True, **kw).fit(X)
    assert graphed.lower_bounds_ == plain.lower_bounds_
    # iterations after the fit (a step cache of their own): the warm-up, the
    # recording and replays again
    twin = copy.deepcopy(plain)
    assert ([graphed._em_iteration(X, None) for _ in range(steps)]
            == [twin._em_iteration(X, None) for _ in range(steps)])
    step = graphed._fused_step.graphed
    assert step.graph is not None and step.backend is _device_em_step._CupyStep
    assert step.steps == steps and step.ahead is not None  # the next one already queued
    step.flat.fill(cupy.nan)
    for name in ("weights_", "means_", "covariances_", "precisions_cholesky_"):
        assert bool((getattr(graphed, name) == getattr(twin, name)).all()), name


def _counting(init, calls):
    def counted(self, *args, **kwargs):
        calls.append(1)
        init(self, *args, **kwargs)

    return counted


@pytest.mark.parametrize("covariance_type", ["full", "diag", "spherical"])
def test_fused_iteration_refuses_a_collapsed_component(covariance_type, cupy):
    """A component far from every row takes no responsibility: with reg_covar=0 its
    covariance is zero, which the summary's one read reports as sklearn's error
    ('tied' shares one covariance, which the other component keeps positive)."""
    X = _blobs(n=90, d=2)
    model = GaussianMixture(2, covariance_type=covariance_type, reg_covar=0.0)
    model.weights_ = cupy.asarray([0.5, 0.5])
    model.means_ = cupy.asarray(np.array([X.mean(0), X.mean(0) + 1e4]))
    shape = {"full": (2, 2, 2), "tied": (2, 2), "diag": (2, 2), "spherical": (2,)}
    model.precisions_cholesky_ = cupy.asarray(
        {"full": np.stack([np.eye(2)] * 2), "tied": np.eye(2)}.get(
            covariance_type, np.ones(shape[covariance_type])))
    with pytest.raises(ValueError, match="ill-defined empirical covariance"):
        _device_em_step.fused_em_iteration(model, cupy.asarray(X), None,
                                           _device_em_step.FusedStepCache())


@pytest.mark.parametrize("weights", [[1.0, 2.0, 3.0], [2.0**-40 / 3] * 4, [1e308] * 3,
                                     [5e-324, 0.0, 0.0, 0.0], [1.0] * 5])
def test_device_row_units_are_the_hosts_made_on_the_device(cupy, weights):
    """cupy weights are put in row units on the device (a 0-d float64 unit there),
    to the host's bits; the torch tests check that nothing is read back."""
    from fastlvm._sample_weight import scaled_to_row_units

    host = np.array(weights)
    scaled, unit = scaled_to_row_units(cupy.asarray(host))
    want, want_unit = scaled_to_row_units(host)
    assert isinstance(unit, cupy.ndarray) and unit.shape == () and unit.dtype == np.float64
    assert float(unit) == want_unit
    assert isinstance(scaled, cupy.ndarray)
    np.testing.assert_array_equal(cupy.asnumpy(scaled), want)
