"""GaussianMixture on torch tensors: Triton kernels, device M-step and initialisation.

On a CUDA machine the tensors live on the GPU; elsewhere they are CPU tensors
run through Triton's interpreter (``FASTLVM_BACKEND=triton``), the same code.
"""

import contextlib
import copy

import numpy as np
import pytest

from fastlvm import GaussianMixture
from fastlvm.mixture import _device_em_step, _gaussian_params
from fastlvm.mixture._device_em_step import GRAPH_WARMUP_STEPS
from tests import torch_graphs, undefined_memory
from tests.conftest import (COVARIANCE_FLAWS, COVARIANCE_TYPES, CUDA, HAS_TRITON,
                            flawed_covariances)
from tests.tolerances import assert_close

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed"),
              pytest.mark.usefixtures("torch_device_path")]
DEVICE = "cuda" if CUDA else "cpu"


def _blobs(n=240, d=3, dtype=np.float64, seed=0, spread=5.0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((3, d)) * spread
    X = centers[rng.integers(0, 3, n)] + rng.standard_normal((n, d))
    return X.astype(dtype)


def _host_results(X, **kw):
    """A host fit (Numba) and its outputs on X, with no backend override."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("FASTLVM_BACKEND", raising=False)
        gm = GaussianMixture(**kw).fit(X)
        return gm, dict(predict=gm.predict(X), predict_proba=gm.predict_proba(X),
                        score_samples=gm.score_samples(X), score=gm.score(X), bic=gm.bic(X))


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_same_bounds_and_predictions_as_host(covariance_type):
    X = _blobs()
    kw = dict(n_components=3, covariance_type=covariance_type, init_params="random_from_data",
              random_state=0, max_iter=6, tol=0)
    with pytest.warns(Warning):
        host, out = _host_results(X, **kw)
    Xt = torch.as_tensor(X, device=DEVICE)
    with pytest.warns(Warning):  # max_iter reached with tol=0: ConvergenceWarning
        dev = GaussianMixture(**kw).fit(Xt)
    for name in ("weights_", "means_", "covariances_", "precisions_cholesky_", "precisions_"):
        value = getattr(dev, name)
        assert isinstance(value, torch.Tensor) and value.device.type == DEVICE, name
        assert value.dtype == torch.float64, name
        np.testing.assert_allclose(value.cpu().numpy(), getattr(host, name), rtol=1e-7,
                                   atol=1e-9, err_msg=name)
    np.testing.assert_allclose(dev.lower_bounds_, host.lower_bounds_, rtol=1e-9)
    labels = dev.predict(Xt)
    assert isinstance(labels, torch.Tensor) and labels.device.type == DEVICE
    np.testing.assert_array_equal(labels.cpu().numpy(), out["predict"])
    np.testing.assert_allclose(dev.predict_proba(Xt).cpu().numpy(), out["predict_proba"],
                               atol=1e-9)
    np.testing.assert_allclose(dev.score_samples(Xt).cpu().numpy(), out["score_samples"],
                               rtol=1e-9)
    assert dev.score(Xt) == pytest.approx(out["score"], rel=1e-9)
    assert dev.bic(Xt) == pytest.approx(out["bic"], rel=1e-9)


def test_float32_tensors_give_float32_parameters_like_the_host():
    """sklearn (>= 1.7) keeps float32 data's parameters in float32; so does the fit
    on the host and on the device, with the same values."""
    X = _blobs(dtype=np.float32)
    kw = dict(n_components=3, covariance_type="full", init_params="random_from_data",
              random_state=0, max_iter=5, tol=0)
    with pytest.warns(Warning):
        host, _ = _host_results(X, **kw)
    with pytest.warns(Warning):
        dev = GaussianMixture(**kw).fit(torch.as_tensor(X, device=DEVICE))
    for name in ("weights_", "means_", "covariances_", "precisions_cholesky_", "precisions_"):
        value = getattr(dev, name)
        assert value.dtype == torch.float32 and value.device.type == DEVICE, name
        assert getattr(host, name).dtype == np.float32, name
        np.testing.assert_allclose(value.cpu().numpy(), getattr(host, name), rtol=1e-4,
                                   atol=1e-6, err_msg=name)


@pytest.mark.parametrize("init_params", ["kmeans", "k-means++", "random"])
def test_initialisations_run_on_the_device_and_are_reproducible(init_params):
    Xt = torch.as_tensor(_blobs(dtype=np.float32, spread=20.0), device=DEVICE)
    fits = [GaussianMixture(3, covariance_type="diag", init_params=init_params,
                            random_state=1, max_iter=20).fit(Xt) for _ in range(2)]
    assert torch.equal(fits[0].means_, fits[1].means_)  # same seed, same bits
    assert fits[0].means_.device.type == DEVICE
    if init_params == "random":  # random responsibilities may merge two blobs for good
        return
    # three well-separated blobs of ~80 rows: k-means based starts find them
    labels = fits[0].predict(Xt).cpu().numpy()
    _, truth = _host_results(Xt.cpu().numpy(), n_components=3, random_state=0)
    contingency = np.zeros((3, 3), int)
    np.add.at(contingency, (labels, truth["predict"]), 1)
    assert (contingency > 0).sum() == 3  # the same partition up to relabelling


def test_device_sample_weight_checks_match_the_host():
    X = torch.as_tensor(_blobs(n=60), device=DEVICE)
    for sw, match in ((torch.ones(60, dtype=torch.complex128), "real; got complex"),
                      (torch.tensor([1.0] + [0.0] * 59), "positive sample_weight, got 1")):
        with pytest.raises(ValueError, match=match):
            GaussianMixture(3).fit(X, sample_weight=sw.to(DEVICE))
    kw = dict(n_components=3, random_state=0, max_iter=3, tol=0)
    with pytest.warns(Warning):
        plain = GaussianMixture(**kw).fit(X)
    with pytest.warns(Warning):
        scalar = GaussianMixture(**kw).fit(X, sample_weight=2.0)
    np.testing.assert_allclose(scalar.lower_bounds_, plain.lower_bounds_, rtol=1e-9)


def test_sample_weight_equals_repeated_rows():
    X = _blobs(n=120)
    reps = np.random.default_rng(3).integers(1, 3, X.shape[0])
    kw = dict(n_components=2, covariance_type="full", means_init=X[:2], random_state=0,
              max_iter=5, tol=0)
    a = GaussianMixture(**kw)
    b = GaussianMixture(**kw)
    with pytest.warns(Warning):
        a.fit(torch.as_tensor(X, device=DEVICE),
              sample_weight=torch.as_tensor(reps.astype(float), device=DEVICE))
        b.fit(torch.as_tensor(np.repeat(X, reps, axis=0), device=DEVICE))
    np.testing.assert_allclose(a.means_.cpu().numpy(), b.means_.cpu().numpy(), rtol=1e-9)
    np.testing.assert_allclose(a.covariances_.cpu().numpy(), b.covariances_.cpu().numpy(),
                               rtol=1e-8)


def test_sample_returns_tensors_on_the_device():
    Xt = torch.as_tensor(_blobs(), device=DEVICE)
    gm = GaussianMixture(2, random_state=0, max_iter=3).fit(Xt)
    X, y = gm.sample(7)
    assert X.shape == (7, 3) and y.shape == (7,) and X.device.type == DEVICE


def test_bad_input_is_refused_clearly():
    X = _blobs()
    bad = torch.as_tensor(X, device=DEVICE).clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinity"):
        GaussianMixture(2).fit(bad)
    with pytest.raises(TypeError, match="float32 or float64"):
        GaussianMixture(2).fit(torch.ones(10, 2, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="minimum of 2"):
        GaussianMixture(1).fit(torch.ones(1, 2, dtype=torch.float64, device=DEVICE))
    gm = GaussianMixture(2, random_state=0, max_iter=3).fit(torch.as_tensor(X, device=DEVICE))
    with pytest.raises(ValueError, match="expecting 3 features"):
        gm.predict(torch.ones(4, 2, dtype=torch.float64, device=DEVICE))
    with pytest.raises(ValueError, match="torch tensor on that device"):
        gm.predict(X)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_float32_data_too_small_for_the_kernels_is_refused(covariance_type):
    """The device M-step's flags read the largest variance with the others: below
    float32's smallest normal number the kernels' precisions overflow."""
    X = torch.as_tensor(_blobs(dtype=np.float32) * 1e-21, device=DEVICE)
    with pytest.raises(ValueError, match="underflowed float32.*pass it as float64"):
        GaussianMixture(3, covariance_type=covariance_type, reg_covar=0.0,
                        random_state=0).fit(X)
    GaussianMixture(3, covariance_type=covariance_type, reg_covar=0.0, random_state=0,
                    max_iter=2).fit(X.double())  # float64 reaches that far


def test_triton_on_cpu_tensors_needs_the_interpreter(monkeypatch):
    from fastlvm.kernels import gaussian_log_prob

    monkeypatch.setenv("FASTLVM_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(NotImplementedError, match="TRITON_INTERPRET=1"):
        gaussian_log_prob(torch.zeros(3, 2), np.zeros((1, 2)), np.ones(1), "spherical")


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_streamed_host_array_fits_like_the_tensor(covariance_type):
    """device= with a NumPy array: pinned chunks streamed to the device (on a CPU
    "device" under the interpreter, plain chunks): same fit as the whole tensor."""
    X = _blobs(n=150)  # four chunks, the last one short
    kw = dict(n_components=3, covariance_type=covariance_type,
              init_params="random_from_data", random_state=0, max_iter=4, tol=0)
    with pytest.warns(Warning):
        streamed = GaussianMixture(device=DEVICE, chunk_size=40, **kw).fit(X)
        whole = GaussianMixture(**kw).fit(torch.as_tensor(X, device=DEVICE))
    assert streamed.means_.device.type == DEVICE
    np.testing.assert_allclose(streamed.lower_bounds_, whole.lower_bounds_, rtol=1e-10)
    np.testing.assert_allclose(streamed.covariances_.cpu().numpy(),
                               whole.covariances_.cpu().numpy(), rtol=1e-9, atol=1e-12)
    labels = streamed.predict(X)  # host rows in, host labels out
    assert isinstance(labels, np.ndarray)
    np.testing.assert_array_equal(labels, whole.predict(torch.as_tensor(X, device=DEVICE))
                                  .cpu().numpy())
    np.testing.assert_allclose(streamed.score_samples(X),
                               whole.score_samples(torch.as_tensor(X, device=DEVICE))
                               .cpu().numpy(), rtol=1e-9)


def test_streaming_to_a_device_without_gpu_kernels_is_refused(monkeypatch):
    monkeypatch.delenv("FASTLVM_BACKEND", raising=False)
    with pytest.raises(ValueError, match="CUDA device"):
        GaussianMixture(2, device="cpu").fit(_blobs())


@pytest.mark.parametrize("device, match", [
    ("tpu", r"device='tpu' is not a torch device \(Expected one of"),
    (1.5, r"device must be a str, an int or a torch.device; got float 1.5"),
    (True, r"device must be a str, an int or a torch.device; got bool True"),
    ("cuda:9999", r"device='cuda:9999': (no CUDA GPU is available to this process|this "
                  r"process sees \d+ CUDA device\(s\))"),
])
def test_a_device_that_cannot_take_the_stream_is_named(device, match):
    """device= parsed by torch, and a CUDA device that this process has: a
    ValueError naming the parameter (it was torch's AssertionError "Torch not
    compiled with CUDA enabled", or a RuntimeError)."""
    with pytest.raises(ValueError, match=match):
        GaussianMixture(2, device=device).fit(_blobs())


@pytest.mark.skipif(CUDA, reason="checks the error of a machine without a CUDA GPU")
def test_a_cuda_device_without_a_gpu_is_named():
    with pytest.raises(ValueError, match="device='cuda': no CUDA GPU is available to this "
                                         "process.*leave device=None"):
        GaussianMixture(2, device="cuda").fit(_blobs())


# ------------------------------------------------------------- partial_fit
def _stream(model, X, batch, **kw):
    for start in range(0, len(X), batch):
        model.partial_fit(X[start:start + batch], **kw)
    return model


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
@pytest.mark.parametrize("prior", [None, {"weight_concentration": 2.0}])
def test_partial_fit_on_tensors_steps_like_the_host(covariance_type, prior):
    """Online EM (and online MAP-EM) on tensor batches: the steps of the host
    model, parameters and running statistics on the device."""
    X = _blobs(n=240)
    kw = dict(n_components=3, covariance_type=covariance_type,
              init_params="random_from_data", random_state=0, prior=prior)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("FASTLVM_BACKEND", raising=False)
        host = _stream(GaussianMixture(**kw), X, 80)
    dev = _stream(GaussianMixture(**kw), torch.as_tensor(X, device=DEVICE), 80)
    assert dev.n_steps_ == host.n_steps_ == 3
    assert dev._running_statistics.second.device.type == DEVICE
    for name in ("weights_", "means_", "covariances_"):
        value = getattr(dev, name)
        assert isinstance(value, torch.Tensor) and value.device.type == DEVICE, name
        np.testing.assert_allclose(value.cpu().numpy(), getattr(host, name), rtol=1e-7,
                                   atol=1e-9, err_msg=name)
    assert dev.lower_bound_ == pytest.approx(host.lower_bound_, rel=1e-9)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_map_fit_on_tensors_runs_like_the_host_with_no_host_copies(covariance_type,
                                                                   monkeypatch):
    """MAP-EM on tensors: the host fit's bounds and parameters, with the initial MAP
    step, every M-step and the prior's density on the device (no copy to the host of
    anything with two or more dimensions)."""
    X = _blobs(n=150)
    kw = dict(n_components=3, covariance_type=covariance_type, random_state=0, max_iter=4,
              tol=0, prior={"weight_concentration": 2.0})
    with pytest.MonkeyPatch.context() as mp, pytest.warns(Warning):  # max_iter: warns
        mp.delenv("FASTLVM_BACKEND", raising=False)
        host = GaussianMixture(**kw).fit(X)
    copied, original, recording = [], torch.Tensor.cpu, []

    def cpu(tensor, *args, **kwargs):
        if recording:
            copied.append(tensor.ndim)
        return original(tensor, *args, **kwargs)

    def recorded(step):
        def run(self, *args, **kwargs):
            recording.append(True)
            try:
                return step(self, *args, **kwargs)
            finally:
                recording.pop()
        return run

    # the iterations and the start, not the prior's hyperparameters (NumPy, once a fit)
    for name in ("_em_initialize", "_em_iteration"):
        monkeypatch.setattr(GaussianMixture, name, recorded(getattr(GaussianMixture, name)))
    monkeypatch.setattr(torch.Tensor, "cpu", cpu)
    with pytest.warns(Warning):
        dev = GaussianMixture(**kw).fit(torch.as_tensor(X, device=DEVICE))
    monkeypatch.setattr(torch.Tensor, "cpu", original)
    assert max(copied, default=0) <= 1, copied
    np.testing.assert_allclose(dev.lower_bounds_, host.lower_bounds_, rtol=1e-9)
    for name in ("weights_", "means_", "covariances_"):
        value = getattr(dev, name)
        assert isinstance(value, torch.Tensor), name
        np.testing.assert_allclose(value.cpu().numpy(), getattr(host, name), rtol=1e-7,
                                   atol=1e-9, err_msg=name)


def test_bayesian_partial_fit_on_tensors_steps_like_the_host():
    from fastlvm import BayesianGaussianMixture

    X = _blobs(n=240)
    kw = dict(n_components=3, init_params="random_from_data", random_state=0,
              total_samples=2400)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("FASTLVM_BACKEND", raising=False)
        host = _stream(BayesianGaussianMixture(**kw), X, 80)
    dev = _stream(BayesianGaussianMixture(**kw), torch.as_tensor(X, device=DEVICE), 80)
    for name in ("weights_", "means_", "covariances_", "degrees_of_freedom_"):
        value = getattr(dev, name)
        value = value.cpu().numpy() if isinstance(value, torch.Tensor) else value
        np.testing.assert_allclose(value, getattr(host, name), rtol=1e-7, atol=1e-9,
                                   err_msg=name)
    assert isinstance(dev.means_, torch.Tensor) and dev.means_.device.type == DEVICE
    assert dev.lower_bound_ == pytest.approx(host.lower_bound_, rel=1e-9)


def test_partial_fit_batches_must_be_where_the_parameters_are():
    X = _blobs(n=120)
    Xt = torch.as_tensor(X, device=DEVICE)
    model = GaussianMixture(2, random_state=0).partial_fit(Xt)
    with pytest.raises(ValueError, match="torch tensor on that device"):
        model.partial_fit(X)
    with pytest.raises(ValueError, match="expecting 3 features"):
        model.partial_fit(Xt[:, :2])
    with pytest.raises(ValueError, match="NaN or infinity"):
        model.partial_fit(torch.full((4, 3), float("nan"), dtype=torch.float64, device=DEVICE))
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("FASTLVM_BACKEND", raising=False)
        host = GaussianMixture(2, random_state=0).partial_fit(X)
    with pytest.raises(ValueError, match="move it to the host"):
        host.partial_fit(Xt)
    weighted = GaussianMixture(2, random_state=0).partial_fit(
        Xt, sample_weight=torch.ones(len(X), dtype=torch.float64, device=DEVICE))
    np.testing.assert_allclose(weighted.means_.cpu().numpy(), model.means_.cpu().numpy(),
                               rtol=1e-12)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
@pytest.mark.parametrize("flaw", COVARIANCE_FLAWS)
def test_device_cholesky_refuses_what_the_host_refuses(covariance_type, flaw):
    """The device M-step computes its factors before its one check of them: a
    bad covariance is still refused, with the host's message: sklearn's for one that
    is not positive definite, the overflow error for one that is not finite."""
    cov = flawed_covariances(covariance_type, flaw)
    match = "overflowed float64" if flaw in ("nan", "inf") else "increase reg_covar"
    with pytest.raises(ValueError, match=match):
        _gaussian_params.precision_cholesky(cov.copy(), covariance_type)
    with pytest.raises(ValueError, match=match):
        _gaussian_params.precision_cholesky(torch.as_tensor(cov, device=DEVICE), covariance_type)
    good = flawed_covariances(covariance_type, None)
    np.testing.assert_allclose(
        _gaussian_params.precision_cholesky(torch.as_tensor(good, device=DEVICE),
                                            covariance_type).cpu().numpy(),
        _gaussian_params.precision_cholesky(good, covariance_type), rtol=1e-12, atol=1e-12)


def _unfused(monkeypatch):
    """Route GaussianMixture's iterations through the unfused E-step and M-step."""
    from fastlvm.mixture import _gaussian_mixture

    monkeypatch.setattr(_gaussian_mixture, "fused_iteration_applies", lambda model, X: False)


def _two_start_problem(covariance_type, dtype, max_iter):
    """(X, X as a tensor, sample weights (float64 only) or None, the fit's keywords:
    two starts of ``max_iter`` iterations each, no convergence test).  150 rows
    cross the interpreter's row tiles; every iteration under it costs seconds
    ('full': 2 s at 300 rows on a 2-core VM), so the rows are few."""
    X = _blobs(n=150, d=4, dtype=dtype)
    sw = np.random.default_rng(1).uniform(0.5, 2.0, X.shape[0])
    swt = torch.as_tensor(sw, device=DEVICE) if dtype == np.float64 else None
    kw = dict(n_components=3, covariance_type=covariance_type, init_params="random_from_data",
              random_state=0, max_iter=max_iter, tol=0, n_init=2)
    return X, torch.as_tensor(X, device=DEVICE), swt, kw


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_fused_iteration_equals_the_unfused_one(covariance_type, dtype, monkeypatch):
    """Fits on tensors take the fused device M-step; the same fits through the
    unfused E-step and M-step give the same bounds and parameters to rounding, and
    each is bitwise reproducible (float64 fits with sample weights, float32 without;
    two starts, so the second rebuilds the coefficients)."""
    X, Xt, swt, kw = _two_start_problem(covariance_type, dtype, max_iter=3)
    with pytest.warns(Warning):
        fused = [GaussianMixture(**kw).fit(Xt, sample_weight=swt) for _ in range(2)]
    with monkeypatch.context() as mp:
        _unfused(mp)
        with pytest.warns(Warning):
            plain = GaussianMixture(**kw).fit(Xt, sample_weight=swt)
    assert fused[0].lower_bounds_ == fused[1].lower_bounds_
    rtol = 1e-12 if dtype == np.float64 else 1e-6
    np.testing.assert_allclose(fused[0].lower_bounds_, plain.lower_bounds_, rtol=rtol)
    for name in ("weights_", "means_", "covariances_", "precisions_cholesky_", "precisions_"):
        a, b = getattr(fused[0], name), getattr(plain, name)
        assert torch.equal(a, getattr(fused[1], name)), name
        assert a.dtype == b.dtype == torch.from_numpy(X[:0]).dtype, name
        np.testing.assert_allclose(a.cpu().numpy(), b.cpu().numpy(), rtol=100 * rtol,
                                   err_msg=name)
    assert "_fused_step" not in vars(fused[0])  # nothing carried beyond the fit


def _recorded_graphs(monkeypatch):
    """The graphed Triton step's course on a GPU, on CPU tensors: ``torch.cuda``'s
    graphs, streams and events stood in for (``tests/torch_graphs.py``: the torch
    operations and Triton launches recorded and replayed into the same tensors),
    and the summary read through a host buffer (pageable: CPU torch pins nothing)."""
    torch_graphs.install(monkeypatch)
    monkeypatch.setattr(_device_em_step._TritonStep, "on_gpu", staticmethod(lambda X: True))
    monkeypatch.setattr(_device_em_step._TritonStep, "host_buffer",
                        staticmethod(torch.empty_like))


# cuda_graph values for the graphed step's tests: off a GPU also 'recorded',
# cuda_graph=True through _recorded_graphs (on a GPU True records)
CUDA_GRAPH_OPTIONS = [False, True] + ([] if CUDA else ["recorded"])


def _cuda_graph_option(option, monkeypatch):
    """``GaussianMixture``'s cuda_graph for a test's ``option`` (see
    :data:`CUDA_GRAPH_OPTIONS`)."""
    if option == "recorded":
        _recorded_graphs(monkeypatch)
        return True
    return option


@pytest.mark.parametrize("cuda_graph", [o for o in CUDA_GRAPH_OPTIONS if o is not False])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_cuda_graph_iteration_equals_the_plain_fused_one(covariance_type, dtype, cuda_graph,
                                                         monkeypatch):
    """``cuda_graph=True`` runs the fused iteration from and into static buffers
    (recorded as a CUDA graph and replayed on a GPU, eagerly on the CPU, or, off a
    GPU, recorded and replayed by :func:`_recorded_graphs`): the same bounds and
    parameters bit for bit, over two starts (float64 with sample weights), the
    coefficients updated in place from one iteration to the next, and the model's
    parameters never the buffers themselves."""
    recorded = cuda_graph == "recorded"
    cuda_graph = _cuda_graph_option(cuda_graph, monkeypatch)
    # each start: the warm-up iterations, the recording and a replay (on a GPU)
    _, Xt, swt, kw = _two_start_problem(covariance_type, dtype,
                                        max_iter=GRAPH_WARMUP_STEPS + 2)
    with pytest.warns(Warning):
        plain = GaussianMixture(cuda_graph=False, **kw).fit(Xt, sample_weight=swt)
        graphed = GaussianMixture(cuda_graph=cuda_graph, **kw).fit(Xt, sample_weight=swt)
    assert graphed.lower_bounds_ == plain.lower_bounds_
    for name in ("weights_", "means_", "covariances_", "precisions_cholesky_", "precisions_"):
        assert torch.equal(getattr(graphed, name), getattr(plain, name)), name
    # iterations after the fit: the recording (on a GPU) and its replays
    steps = GRAPH_WARMUP_STEPS + 2
    bounds = [graphed._em_iteration(Xt, None) for _ in range(steps)]
    graph_step = graphed._fused_step.graphed
    assert graph_step.steps == steps and (graph_step.graph is not None) == (CUDA or recorded)
    if recorded:  # recorded at step warm + 1, replayed then and once ahead of each step
        assert graph_step.graph.replays == steps - GRAPH_WARMUP_STEPS + 1
    assert graph_step.ahead is not None  # the next iteration already queued (run, on the CPU)
    assert graphed._fused_step.params is graph_step.params  # updated in place
    twin = copy.deepcopy(plain)
    assert bounds == [twin._em_iteration(Xt, None) for _ in range(steps)]
    graph_step.flat.fill_(float("nan"))  # what the next replay would overwrite
    for name in ("weights_", "means_", "covariances_", "precisions_cholesky_"):
        assert torch.equal(getattr(graphed, name), getattr(twin, name)), name


def test_cuda_graph_auto_records_on_cuda_tensors_only():
    """The default, cuda_graph='auto', records the iteration on CUDA tensors and runs
    the plain step on CPU tensors; either way the fit is cuda_graph=False's."""
    Xt = torch.as_tensor(_blobs(n=150, d=4), device=DEVICE)
    kw = dict(n_components=3, covariance_type="diag", random_state=0, tol=0,
              max_iter=GRAPH_WARMUP_STEPS + 2)
    with pytest.warns(Warning):
        plain = GaussianMixture(cuda_graph=False, **kw).fit(Xt)
        auto = GaussianMixture(**kw).fit(Xt)
    assert auto.cuda_graph == "auto" and auto.lower_bounds_ == plain.lower_bounds_
    assert auto._em_iteration(Xt, None) == plain._em_iteration(Xt, None)
    assert (auto._fused_step.graphed is not None) == CUDA
    assert torch.equal(auto.means_, plain.means_)


@contextlib.contextmanager
def _counted_ops():
    """A record of the torch operations run inside the block outside kernel launches
    (the interpreter runs a launch with torch operations of its own), ``.ops``, and
    of the launches (under the interpreter), ``.launches``."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops, self.launches, self.in_launch = [], 0, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not self.in_launch:
                self.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    mode = CountOps()
    # fastlvm's own operations: not the NaN the tests fill its allocations with
    # (tests/undefined_memory.py)
    with pytest.MonkeyPatch.context() as mp, undefined_memory.suspended():
        if not CUDA:
            from triton.runtime import interpreter

            run = interpreter.InterpretedFunction.run

            def counted_run(self, *args, **kwargs):
                mode.launches += 1
                mode.in_launch += 1
                try:
                    return run(self, *args, **kwargs)
                finally:
                    mode.in_launch -= 1

            mp.setattr(interpreter.InterpretedFunction, "run", counted_run)
        with mode:
            yield mode


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_fused_iteration_is_a_few_kernels_and_few_torch_ops(covariance_type):
    """The fused iteration's host work, a structural count (not a timing): 'diag' and
    'spherical' launch three Triton kernels (statistics, and the M-step's two) and
    otherwise only allocate; 'tied' and 'full' launch five (two E-step kernels, the
    M-step's three) around torch's batched Cholesky.  The unfused iteration ran
    85-105 torch operations."""
    Xt = torch.as_tensor(_blobs(n=200, d=4, dtype=np.float32), device=DEVICE)
    gm = GaussianMixture(3, covariance_type=covariance_type, random_state=0, max_iter=2, tol=0,
                         cuda_graph=False)
    with pytest.warns(Warning):
        gm.fit(Xt)
    gm._em_iteration(Xt, None)  # builds the coefficients once
    with _counted_ops() as mode:
        gm._em_iteration(Xt, None)
    factor = covariance_type in ("full", "tied")
    if not CUDA:
        assert mode.launches == (5 if factor else 3)
    allowed = {"empty", "zeros", "slice", "_to_copy", "_local_scalar_dense"}
    if factor:  # precision_factors_torch, and 'full''s centres c0 + mu'_k
        allowed |= {"linalg_cholesky_ex", "eye", "expand", "linalg_solve_triangular",
                    "transpose", "clone", "select", "add", "unsqueeze", "alias"}
    if CUDA:  # the device read and CUDA's own allocation and copy ops
        allowed |= {"copy_", "fill_", "empty_strided", "as_strided", "detach"}
    assert set(mode.ops) <= allowed, sorted(set(mode.ops) - allowed)
    assert len(mode.ops) <= (32 if factor else 20), mode.ops


@pytest.mark.parametrize("cuda_graph", CUDA_GRAPH_OPTIONS)
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_fused_iterations_write_every_buffer_they_read(covariance_type, cuda_graph,
                                                       monkeypatch):
    """Every tensor the fused iteration allocates with ``torch.empty`` (partials,
    per-block log-likelihoods, M-step outputs and the graphed step's buffers) is
    written before it is read: with each one NaN-filled the fit is the same bit for
    bit (a stray entry left unwritten would be whatever the allocator held)."""
    cuda_graph = _cuda_graph_option(cuda_graph, monkeypatch)
    Xt = torch.as_tensor(_blobs(n=300, d=4, dtype=np.float32), device=DEVICE)
    kw = dict(n_components=3, covariance_type=covariance_type, random_state=0, tol=0,
              max_iter=GRAPH_WARMUP_STEPS + 2, cuda_graph=cuda_graph)
    with pytest.warns(Warning):
        plain = GaussianMixture(**kw).fit(Xt)
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", poisoned)
    with pytest.warns(Warning):
        got = GaussianMixture(**kw).fit(Xt)
    assert got.lower_bounds_ == plain.lower_bounds_
    for name in ("weights_", "means_", "covariances_", "precisions_cholesky_"):
        assert torch.equal(getattr(got, name), getattr(plain, name)), name


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_cuda_graph_iteration_writes_its_buffers_in_place(covariance_type):
    """The graphed iteration (what a CUDA graph records) is the fused iteration's
    kernels with no copies of their results: the M-step writes the fitted
    parameters into views of the flat output buffer and the next coefficients over
    the static ones.  What is left: the float64 views of the shift (and 'full''s
    mu'_k) and the transposing write of the 'full' and 'tied' precision factors."""
    Xt = torch.as_tensor(_blobs(n=200, d=4, dtype=np.float32), device=DEVICE)
    gm = GaussianMixture(3, covariance_type=covariance_type, random_state=0,
                         max_iter=GRAPH_WARMUP_STEPS + 2, tol=0, cuda_graph=True)
    with pytest.warns(Warning):
        gm.fit(Xt)
    gm._em_iteration(Xt, None)
    step = gm._fused_step.graphed
    step.settle()
    terms = {name: getattr(step.params, name).data_ptr() for name in ("c0", "a", "b", "s", "c",
                                                                       "u", "c0_64")}
    with _counted_ops() as mode:
        step._body(gm, Xt, None)
    copies = {"full": 3, "tied": 2}.get(covariance_type, 1)
    assert mode.ops.count("copy_") == copies and "_to_copy" not in mode.ops, mode.ops
    assert {name: getattr(step.params, name).data_ptr() for name in terms} == terms
    flat = step.flat.data_ptr()
    for view, offset in zip(step.fitted, step.offsets):
        assert view.data_ptr() == flat + 8 * offset


@pytest.mark.parametrize("cuda_graph", CUDA_GRAPH_OPTIONS)
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_fused_iteration_follows_parameters_set_between_iterations(covariance_type,
                                                                   cuda_graph, monkeypatch):
    """The next E-step's coefficients are kept only for the tensors they came from:
    new means (or weights, or precisions) between two iterations are used (with
    ``cuda_graph``, past the recording: the static coefficients are made anew)."""
    cuda_graph = _cuda_graph_option(cuda_graph, monkeypatch)
    Xt = torch.as_tensor(_blobs(n=240, d=3), device=DEVICE)
    gm = GaussianMixture(3, covariance_type=covariance_type, random_state=0, max_iter=2, tol=0,
                         cuda_graph=cuda_graph)
    with pytest.warns(Warning):
        gm.fit(Xt)
    for _ in range(GRAPH_WARMUP_STEPS + 2 if cuda_graph else 1):
        gm._em_iteration(Xt, None)
    gm.means_ = gm.means_ + 0.5
    gm.weights_ = torch.flip(gm.weights_, (0,))
    twin = copy.deepcopy(gm)
    got = gm._em_iteration(Xt, None)
    _unfused(monkeypatch)
    expected = twin._em_iteration(Xt, None)
    assert got == pytest.approx(expected, rel=1e-12)
    np.testing.assert_allclose(gm.means_.cpu().numpy(), twin.means_.cpu().numpy(), rtol=1e-10)


@pytest.mark.parametrize("cuda_graph", [False, True])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_fused_m_step_refuses_what_the_unfused_one_refuses(covariance_type, dtype, cuda_graph,
                                                           monkeypatch):
    """A covariance that is not positive definite (a negative regularisation pushed in
    after validation) or not finite (rows whose squares overflow): the same errors, with
    the float32 hint, from the fused M-step (plain or through ``cuda_graph``'s static
    buffers) as from the unfused one."""
    X = _blobs(n=240, d=3, dtype=dtype, spread=2.0) * 0.1
    Xt = torch.as_tensor(X, device=DEVICE)
    big = torch.as_tensor(X * (1e20 if dtype == np.float32 else 1e160), device=DEVICE)
    gm = GaussianMixture(3, covariance_type=covariance_type, random_state=0, max_iter=2, tol=0,
                         cuda_graph=cuda_graph)
    with pytest.warns(Warning):
        gm.fit(Xt)
    hint = "passing float64 data" if dtype == np.float32 else "scale the input data.$"
    for unfused in (False, True):
        with monkeypatch.context() as mp:
            if unfused:
                _unfused(mp)
            model = copy.deepcopy(gm)
            model.reg_covar = -1.0
            with pytest.raises(ValueError, match=f"ill-defined empirical covariance.*{hint}"):
                model._em_iteration(Xt, None)
            with pytest.raises(ValueError, match="overflowed float(32|64).*Scale the input"):
                copy.deepcopy(gm)._em_iteration(big, None)


def _centre_loss_warnings(fit):
    """The 'common centre' warnings of ``fit()``."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit()
    return [w for w in caught if "common centre" in str(w.message)]


@pytest.mark.parametrize("unfused", [False, True])
@pytest.mark.parametrize("covariance_type", ["diag", "spherical", "tied"])
def test_device_fit_of_separated_float32_clusters_matches_the_host(covariance_type, unfused,
                                                                    monkeypatch):
    """float32 means 2000 deviations apart: expanded around their common centre in
    float32, the GPU kernels lost 1e-2 of the covariances (a warning said so);
    they now compute such mixtures in float64, and the fit (fused or not) is the
    host fit's, without a warning."""
    if unfused:
        _unfused(monkeypatch)
    X = _blobs(n=90, d=2, dtype=np.float32, spread=2000.0)
    kw = dict(n_components=3, covariance_type=covariance_type, random_state=0, max_iter=3,
              tol=0)
    host, _ = _host_results(X, **kw)
    gm = GaussianMixture(**kw)
    assert _centre_loss_warnings(lambda: gm.fit(torch.as_tensor(X, device=DEVICE))) == []
    for name in ("weights_", "means_", "covariances_"):
        assert_close(getattr(gm, name).cpu().numpy(), getattr(host, name), np.float32,
                     err_msg=name)
    if covariance_type == "diag":  # a host array streamed to the device: the same kernels
        streamed = GaussianMixture(**kw, device=DEVICE, chunk_size=40)
        assert _centre_loss_warnings(lambda: streamed.fit(X)) == []
        assert_close(streamed.covariances_.cpu().numpy(), host.covariances_, np.float32)


def test_fused_iterations_turn_to_float64_when_the_means_move_apart(monkeypatch):
    """Started at the blobs' centres under covariances 300 deviations wide (the means
    about 10 of those from their common centre: float32 coefficients), the first
    M-step shrinks the covariances to the blobs': the means now lie thousands of
    deviations apart, the M-step's summary (kappa_k) says so, and the next E-step's
    coefficients are float64."""
    from fastlvm.mixture import _device_em_step

    X = _blobs(n=90, d=2, dtype=np.float32, spread=2000.0)
    centres = np.random.default_rng(0).standard_normal((3, 2)) * 2000.0  # _blobs' own
    kw = dict(n_components=3, covariance_type="diag", random_state=0, max_iter=4, tol=0,
              means_init=centres + 1.0, precisions_init=np.full((3, 2), 1e-5))
    host, _ = _host_results(X, **kw)
    made = []
    params = _device_em_step._TritonStep.params

    def recorded(model, X, in_float64=None):
        made.append(params(model, X, in_float64))
        return made[-1]

    monkeypatch.setattr(_device_em_step._TritonStep, "params", staticmethod(recorded))
    gm = GaussianMixture(**kw)
    assert _centre_loss_warnings(lambda: gm.fit(torch.as_tensor(X, device=DEVICE))) == []
    assert [p.dtype for p in made] == [torch.float32, torch.float64]
    assert_close(gm.covariances_.cpu().numpy(), host.covariances_, np.float32)
    assert_close(gm.means_.cpu().numpy(), host.means_, np.float32)


@pytest.mark.parametrize("covariance_type, spread, warns", [
    ("diag", 2e7, True), ("spherical", 2e7, True), ("tied", 2e7, True), ("full", 2e7, False),
    ("diag", 5.0, False)])
def test_device_fit_warns_where_its_common_centre_loses_digits(covariance_type, spread,
                                                               warns):
    """float64 rows have no wider dtype to turn to: with means millions of
    deviations from their common centre, the fit says how much of the
    covariances rounding may have taken, and how to avoid it.  'full' (around
    each mean) and close means fit without a word."""
    X = torch.as_tensor(_blobs(n=90, d=2, dtype=np.float64, spread=spread), device=DEVICE)
    gm = GaussianMixture(3, covariance_type=covariance_type, random_state=0, max_iter=3)
    lost = _centre_loss_warnings(lambda: gm.fit(X))
    assert len(lost) == warns
    if warns:
        assert "float64" in str(lost[0].message)
        assert lost[0].filename == __file__  # points at the caller's fit


@pytest.mark.parametrize("bayesian", [False, True])
def test_device_partial_fit_warns_where_its_common_centre_loses_digits(bayesian):
    """A ``partial_fit`` step on the device kernels warns as ``fit`` does,
    pointing at its caller."""
    from fastlvm import BayesianGaussianMixture

    X = torch.as_tensor(_blobs(n=90, d=2, dtype=np.float64, spread=2e7), device=DEVICE)
    # the default priors (the data's covariance, and the pull of the means to the
    # data's mean) keep the components about 650 of their deviations apart at any
    # spread: a unit covariance prior and a negligible pull do not
    cls, kw = ((BayesianGaussianMixture, dict(covariance_prior=np.ones(2),
                                              mean_precision_prior=1e-20)) if bayesian
               else (GaussianMixture, {}))
    model = cls(n_components=3, covariance_type="diag", random_state=0, **kw)
    lost = _centre_loss_warnings(lambda: model.partial_fit(X))
    assert len(lost) == 1 and lost[0].filename == __file__


@pytest.mark.parametrize("covariance_type, d, fused_max", [
    ("diag", 300, None), ("spherical", 300, None), ("full", 40, 32), ("tied", 40, 32)])
def test_wide_rows_fit_and_predict_as_on_the_host(covariance_type, d, fused_max, monkeypatch):
    """D = 300 (rows of 512 padded features): fit, score, score_samples, predict and
    predict_proba through the chunks' kernels, which step through the features
    (the fused kernels hold whole rows; on an H100 'diag''s did not fit at this
    width), the same as the host fit's.  'full' and 'tied' (their D x D work in
    square feature blocks, ``_triton_square_blocks.py``) at D = 40 with the fused
    kernels' width lowered to 32: the same routing, without the interpreter's
    minutes of D x D products at 300 (the kernels' own tests take D = 300)."""
    from fastlvm.kernels.estep_stats import _triton_chunked as ch

    if fused_max is not None:
        monkeypatch.setattr(ch, "FUSED_MAX_BLOCK_D", fused_max)
    launches = []
    log_prob = ch._ChunkLogDensities._log_prob
    monkeypatch.setattr(ch._ChunkLogDensities, "_log_prob",
                        lambda self, *a: launches.append(1) or log_prob(self, *a))
    rng = np.random.default_rng(0)
    X = np.vstack([rng.standard_normal((40, d)) + 3, rng.standard_normal((40, d)) - 3])
    kw = dict(n_components=2, covariance_type=covariance_type, init_params="random_from_data",
              random_state=0, max_iter=5, tol=0, reg_covar=1e-3)
    with pytest.warns(Warning):
        host, out = _host_results(X, **kw)
    Xt = torch.as_tensor(X, device=DEVICE)
    with pytest.warns(Warning):  # max_iter reached with tol=0: ConvergenceWarning
        # the launches counted are the host's: a CUDA graph's replay makes none
        dev = GaussianMixture(cuda_graph=False, **kw).fit(Xt)
    np.testing.assert_allclose(dev.means_.cpu().numpy(), host.means_, rtol=1e-9, atol=1e-12)
    assert_close(float(dev.score(Xt)), out["score"], np.float64)
    np.testing.assert_allclose(dev.score_samples(Xt).cpu().numpy(), out["score_samples"],
                               rtol=1e-10)
    np.testing.assert_array_equal(dev.predict(Xt).cpu().numpy(), out["predict"])
    np.testing.assert_allclose(dev.predict_proba(Xt).cpu().numpy(), out["predict_proba"],
                               atol=1e-12)
    assert len(launches) >= 5 + 4  # an E-step an iteration, then the four calls above


@pytest.mark.parametrize("weighted", [False, True])
def test_kmeans_plusplus_waits_for_nothing(weighted):
    """k-means++ on the device queues every centre's choice without reading
    anything back (three reads a centre made the host wait for each pass over
    the rows), from the host RNG's draws in the order it drew them a centre at a
    time; with no potential left (every row a chosen centre) a draw u picks row
    floor(u n)."""
    from fastlvm.mixture import _device_kmeans

    X = torch.as_tensor(_blobs(n=300), device=DEVICE)
    sw = torch.as_tensor(np.random.default_rng(1).random(300), device=DEVICE) if weighted \
        else None
    with torch_graphs.counted_waits() as waits:
        centers, indices = _device_kmeans.kmeans_plusplus(X, 5, np.random.RandomState(0), sw)
    assert waits == []
    # the same choice drawn a centre at a time on the host, from the same stream
    X64, w = X.cpu().numpy(), np.ones(300) if sw is None else sw.cpu().numpy()
    rs = np.random.RandomState(0)
    cum = np.cumsum(w)
    want = [min(int(np.searchsorted(cum, cum[-1] * rs.uniform())), 299)]
    closest = ((X64 - X64[want[0]]) ** 2).sum(1)
    for _ in range(4):
        cum = np.cumsum(w * closest)
        cand = np.minimum(np.searchsorted(cum, rs.uniform(size=3) * cum[-1]), 299)
        dist = ((X64[:, None, :] - X64[cand][None]) ** 2).sum(2)
        best = cand[np.argmin(w @ np.minimum(dist, closest[:, None]))]
        want.append(int(best))
        closest = np.minimum(closest, ((X64 - X64[best]) ** 2).sum(1))
    assert indices.cpu().tolist() == want
    np.testing.assert_array_equal(centers.cpu().numpy(), X64[want])
    same = torch.zeros((50, 3), dtype=torch.float64, device=DEVICE)  # no potential left
    _, indices = _device_kmeans.kmeans_plusplus(same, 4, np.random.RandomState(0))
    assert indices.shape == (4,) and 0 <= int(indices.min()) and int(indices.max()) < 50


def test_a_lloyd_step_waits_for_nothing():
    """k-means' step on the device reads nothing back (its one-hot rows are a
    scatter: torch's one_hot reads the labels' range back, a synchronisation a
    chunk), and its counts and sums are the labels'."""
    from fastlvm.mixture import _device_kmeans

    X = torch.as_tensor(_blobs(n=300), device=DEVICE)
    centers = X[::100].to(torch.float64)
    with torch_graphs.counted_waits() as waits:
        labels, counts, sums = _device_kmeans.lloyd_step(X, centers)
    assert waits == []
    labels, X64 = labels.cpu().numpy(), X.cpu().numpy()
    np.testing.assert_array_equal(counts.cpu().numpy(), np.bincount(labels, minlength=3))
    for k in range(3):
        np.testing.assert_allclose(sums[k].cpu().numpy(), X64[labels == k].sum(0),
                                   rtol=1e-12)


@pytest.mark.parametrize("prior", [None, {}])
@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_an_em_iteration_waits_for_the_device_once(covariance_type, prior):
    """An EM iteration on torch tensors reads what the host needs in one copy: the
    fused iteration its summary; with a prior (no fused iteration) the
    log-likelihood, log-prior, total weight and covariance checks, which it read
    one by one (four waits, and three copies of the prior to the device behind
    the E-step)."""
    X = torch.as_tensor(_blobs(), device=DEVICE)
    sw = torch.as_tensor(np.random.default_rng(1).random(X.shape[0]) + 0.5, device=DEVICE)
    kw = dict(n_components=3, covariance_type=covariance_type, prior=prior, random_state=0,
              tol=0, cuda_graph=False)
    waits, fits = torch_graphs.waits_beyond(
        lambda iterations: GaussianMixture(max_iter=iterations, **kw).fit(
            X, sample_weight=sw), 2, 5)
    assert waits == ["Tensor.tolist" if prior is None else "Tensor.numpy"] * 3, waits
    assert fits[1].lower_bounds_[:2] == fits[0].lower_bounds_


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
@pytest.mark.parametrize("prior", [None, {}])
def test_a_partial_fit_step_reads_its_bound_and_checks_at_once(prior, covariance_type):
    """A step on a torch batch reads the batch's checks in one copy (three reads
    before), and its bound, total weight and covariance checks in one (three).
    Without a prior the weights' row unit is made on the device (its read was a
    wait of its own); 'diag''s centre-loss check reads its parameters in the
    step's copy (a third wait before)."""
    X = torch.as_tensor(_blobs(), device=DEVICE)
    sw = torch.as_tensor(np.random.default_rng(1).random(X.shape[0]) + 0.5, device=DEVICE)
    model = GaussianMixture(3, covariance_type=covariance_type, random_state=0,
                            prior=prior).partial_fit(X, sample_weight=sw)
    with torch_graphs.counted_waits() as waits:
        model.partial_fit(X, sample_weight=sw)
    assert [str(w) for w in waits] == ["Tensor.numpy", "Tensor.numpy"]


ROW_UNIT_CASES = [  # the host's cases (test_weights_in_row_units_scale_exactly) and more
    np.ones(5), np.array([1.0, 2.0, 3.0]), np.full(4, 2.0**-40 / 3), np.full(3, 1e308),
    np.array([5e-324, 0.0, 0.0, 0.0]), np.random.default_rng(0).random(7) * 1e5,
    np.array([3.0, 0.0]), np.array([1.5, 1.5]),
]
# each case in each dtype that holds it as weights (finite, a positive sum): float32
# rounds 1e308 to infinity and 5e-324 to zero
ROW_UNIT_CALLS = [(case, dtype) for dtype in (np.float64, np.float32)
                  for case in range(len(ROW_UNIT_CASES))
                  if np.isfinite(ROW_UNIT_CASES[case].astype(dtype)).all()
                  and ROW_UNIT_CASES[case].astype(dtype).sum(dtype=np.float64) > 0]


@pytest.mark.parametrize("case, dtype", ROW_UNIT_CALLS)
def test_device_row_units_are_the_hosts_made_on_the_device(case, dtype):
    """Device weights are put in row units where they are, with nothing read back,
    to the host's bits: the unit a 0-d float64 tensor there."""
    from fastlvm._sample_weight import scaled_to_row_units

    host = ROW_UNIT_CASES[case].astype(dtype)
    sw = torch.as_tensor(host, device=DEVICE)
    with torch_graphs.counted_waits() as waits:
        scaled, unit = scaled_to_row_units(sw)
    assert waits == []
    want, want_unit = scaled_to_row_units(host)
    assert unit.shape == () and unit.dtype == torch.float64 and unit.device == sw.device
    assert float(unit) == want_unit
    assert scaled.dtype == sw.dtype and scaled.device == sw.device
    np.testing.assert_array_equal(scaled.cpu().numpy(), want)
