"""MixtureOfPPCA on device arrays: torch tensors (Triton) and cupy arrays (CuPy).

torch: on a CUDA machine the tensors live on the GPU; elsewhere they are CPU
tensors run through Triton's interpreter (``FASTLVM_BACKEND=triton``), the same
code.  cupy: CuPy on a GPU, elsewhere the NumPy-backed cupy of
tests/kernels/fake_cupy.py with the CUDA kernels on the emulator.
"""

import numpy as np
import pytest

from fastlvm import MixtureOfPPCA
from tests.conftest import CUDA, HAS_TRITON

torch = pytest.importorskip("torch")
DEVICE = "cuda" if CUDA else "cpu"
triton_only = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


def _planted(n=300, d=6, k=3, q=2, dtype=np.float64, seed=0):
    """Rows near K planted q-dimensional subspaces."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((k, d)) * 6
    loadings = rng.standard_normal((k, q, d)) * 2
    labels = rng.integers(0, k, n)
    X = (means[labels] + np.einsum("nq,nqd->nd", rng.standard_normal((n, q)), loadings[labels])
         + 0.3 * rng.standard_normal((n, d)))
    return X.astype(dtype)


def _host_fit(X, **kw):
    """A host (Numba) fit and its outputs on X, with no backend override."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("FASTLVM_BACKEND", raising=False)
        model = MixtureOfPPCA(**kw).fit(X)
        return model, dict(predict=model.predict(X), predict_proba=model.predict_proba(X),
                           score_samples=model.score_samples(X), score=model.score(X))


def _compare(dev, host, out, X_dev, to_host, rtol):
    for name in ("weights_", "means_", "components_", "noise_variance_"):
        np.testing.assert_allclose(to_host(getattr(dev, name)), getattr(host, name),
                                   rtol=rtol, atol=rtol, err_msg=name)
    np.testing.assert_allclose(dev.lower_bounds_, host.lower_bounds_, rtol=rtol)
    labels = dev.predict(X_dev)
    assert type(labels) is type(X_dev)
    assert (to_host(labels) == out["predict"]).mean() > 0.99
    np.testing.assert_allclose(to_host(dev.predict_proba(X_dev)), out["predict_proba"],
                               atol=10 * rtol)
    np.testing.assert_allclose(to_host(dev.score_samples(X_dev)), out["score_samples"],
                               rtol=rtol)
    assert dev.score(X_dev) == pytest.approx(out["score"], rel=rtol)


FIT = dict(n_components=3, n_latent=2, init_params="random_from_data", random_state=0,
           max_iter=5, tol=0)


@triton_only
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_torch_fit_matches_the_host_fit(dtype, torch_device_path):
    # 150 rows under the interpreter, where every row tile of every iteration is Python
    X = _planted(n=150 if not CUDA else 300, dtype=dtype)
    with pytest.warns(Warning):  # max_iter reached with tol=0: ConvergenceWarning
        host, out = _host_fit(X, **FIT)
        Xt = torch.as_tensor(X, device=DEVICE)
        dev = MixtureOfPPCA(**FIT).fit(Xt)
    for name in ("weights_", "means_", "components_", "noise_variance_"):
        value = getattr(dev, name)
        assert isinstance(value, torch.Tensor) and value.device.type == DEVICE, name
        assert value.dtype == torch.float64, name
    _compare(dev, host, out, Xt, lambda a: a.cpu().numpy(),
             1e-7 if dtype == np.float64 else 2e-3)


@triton_only
@pytest.mark.parametrize("init_params", ["kmeans", "k-means++", "random"])
def test_torch_initialisations_run_on_the_device_and_are_reproducible(init_params,
                                                                      torch_device_path):
    Xt = torch.as_tensor(_planted(n=200), device=DEVICE)
    kw = dict(n_components=3, n_latent=2, init_params=init_params, random_state=1,
              max_iter=2, tol=0)
    with pytest.warns(Warning):
        a = MixtureOfPPCA(**kw).fit(Xt)
        b = MixtureOfPPCA(**kw).fit(Xt)
    assert a.means_.device.type == DEVICE
    torch.testing.assert_close(a.means_, b.means_, rtol=0, atol=0)
    torch.testing.assert_close(a.components_, b.components_, rtol=0, atol=0)
    assert np.isfinite(a.lower_bounds_).all()


@triton_only
def test_torch_sample_weight_equals_repeated_rows(torch_device_path):
    X = _planted(n=120)
    reps = np.random.default_rng(3).integers(1, 3, X.shape[0])
    kw = dict(n_components=2, n_latent=1, init_params="random", random_state=0, max_iter=3,
              tol=0)
    with pytest.warns(Warning):
        weighted = MixtureOfPPCA(**kw).fit(torch.as_tensor(X, device=DEVICE),
                                           sample_weight=torch.as_tensor(reps, device=DEVICE))
        host = MixtureOfPPCA(**kw)
        with pytest.MonkeyPatch.context() as mp:
            mp.delenv("FASTLVM_BACKEND", raising=False)
            host.fit(X, sample_weight=reps)
    np.testing.assert_allclose(weighted.means_.cpu().numpy(), host.means_, rtol=1e-7)
    np.testing.assert_allclose(weighted.noise_variance_.cpu().numpy(), host.noise_variance_,
                               rtol=1e-7)


@triton_only
def test_torch_sample_covariances_and_bad_input(torch_device_path):
    Xt = torch.as_tensor(_planted(n=150), device=DEVICE)
    with pytest.warns(Warning):
        model = MixtureOfPPCA(n_components=2, n_latent=2, max_iter=2, tol=0,
                              random_state=0).fit(Xt)
    X_new, y = model.sample(7)
    assert isinstance(X_new, torch.Tensor) and X_new.shape == (7, 6)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.int64
    cov = model.get_covariances()
    assert isinstance(cov, torch.Tensor) and cov.shape == (2, 6, 6)
    assert bool((torch.linalg.eigvalsh(cov) > 0).all())
    with pytest.raises(ValueError, match="fitted on"):
        model.predict(Xt.cpu().numpy())
    with pytest.raises(ValueError, match="expecting 6 features"):
        model.predict(Xt[:, :5])
    with pytest.raises(ValueError, match="n_latent must be smaller"):
        MixtureOfPPCA(n_latent=6).fit(Xt)
    # values too small for the arithmetic (its statistics hold fourth powers; the
    # float32 kernels need normal variances): refused at the start, on the device
    for scale, dtype in [(1e-100, torch.float64), (1e-21, torch.float32)]:
        with pytest.raises(ValueError, match="initial covariances underflowed"):
            MixtureOfPPCA(n_components=2, n_latent=2, reg_covar=0.0,
                          random_state=0).fit((Xt * scale).to(dtype))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_cupy_fit_matches_the_host_fit(dtype, cupy):
    X = _planted(dtype=dtype)
    with pytest.warns(Warning):
        host, out = _host_fit(X, **FIT)
        Xd = cupy.asarray(X)
        dev = MixtureOfPPCA(**FIT).fit(Xd)
    for name in ("weights_", "means_", "components_", "noise_variance_"):
        value = getattr(dev, name)
        assert isinstance(value, cupy.ndarray) and value.dtype == np.float64, name
    _compare(dev, host, out, Xd, lambda a: a.get(), 1e-7 if dtype == np.float64 else 2e-3)


@pytest.mark.parametrize("init_params", ["kmeans", "k-means++", "random"])
def test_cupy_initialisations_and_sampling(init_params, cupy):
    Xd = cupy.asarray(_planted(n=400))
    kw = dict(n_components=3, n_latent=2, init_params=init_params, random_state=1,
              max_iter=3, tol=0)
    with pytest.warns(Warning):
        a = MixtureOfPPCA(**kw).fit(Xd)
        b = MixtureOfPPCA(**kw).fit(Xd)
    cupy.testing.assert_array_equal(a.means_, b.means_)
    X_new, y = a.sample(5)
    assert isinstance(X_new, cupy.ndarray) and isinstance(y, cupy.ndarray)
    with pytest.raises(ValueError, match="cupy arrays"):
        a.predict(Xd.get())


@triton_only
def test_a_torch_iteration_waits_for_the_device_once(torch_device_path):
    """An EM iteration on torch tensors reads one number back, its bound: the q x q
    factorisations of the E-step's set-up and of the M-step keep their status on
    the device (torch's linalg.cholesky, solve and inv read it back, five
    synchronisations an iteration)."""
    from tests import torch_graphs

    X = torch.as_tensor(_planted(n=200), device=DEVICE)
    model = MixtureOfPPCA(**dict(FIT, max_iter=1)).fit(X)
    with torch_graphs.counted_waits() as waits:
        model._em_iteration(X, None)
    assert [str(w) for w in waits] == ["aten._local_scalar_dense.default"]
