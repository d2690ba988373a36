"""torch CPU tensors on the host estimators: read through NumPy without a copy, a
tensor that requires grad as well (its detached view), as CUDA tensors are on the
device path, and a float32 tensor as float32; bfloat16, which NumPy lacks, as a
float64 copy."""

import numpy as np
import pytest

import fastlvm

torch = pytest.importorskip("torch")

ESTIMATORS = [
    ("GaussianMixture", dict(n_components=2, random_state=0), "predict"),
    ("BayesianGaussianMixture", dict(n_components=2, random_state=0), "predict_proba"),
    ("MixtureOfPPCA", dict(n_components=2, n_latent=1, random_state=0), "predict_proba"),
    ("PPCA", dict(n_components=1), "transform"),
    ("FactorAnalysis", dict(n_components=1), "transform"),
]


@pytest.mark.parametrize("name, params, method", ESTIMATORS)
def test_a_tensor_that_requires_grad_fits_as_its_values(name, params, method, rng):
    X = rng.standard_normal((120, 4))
    X[:60] += 4.0
    tensor = torch.tensor(X, requires_grad=True)
    plain = getattr(fastlvm, name)(**params).fit(X)
    model = getattr(fastlvm, name)(**params).fit(tensor)
    assert model.score(tensor) == plain.score(X)
    np.testing.assert_array_equal(getattr(model, method)(tensor), getattr(plain, method)(X))
    assert tensor.requires_grad and tensor.grad is None  # the caller's tensor is untouched


@pytest.mark.parametrize("name, params, method", ESTIMATORS)
def test_a_float32_tensor_fits_as_the_float32_array_without_a_copy(name, params, method, rng):
    """sklearn's checks read torch's float32 as an unknown dtype and copied the
    tensor to float64: twice its memory, and a float64 fit of float32 data."""
    from fastlvm._arrays import numpy_readable

    X = rng.standard_normal((120, 4)).astype(np.float32)
    X[:60] += 4.0
    tensor = torch.from_numpy(X.copy())
    view = numpy_readable(tensor)
    assert view.dtype == np.float32 and view.ctypes.data == tensor.data_ptr()
    plain = getattr(fastlvm, name)(**params).fit(X)
    model = getattr(fastlvm, name)(**params).fit(tensor)
    assert model.score(tensor) == plain.score(X)
    np.testing.assert_array_equal(getattr(model, method)(tensor), getattr(plain, method)(X))
    fitted = model.means_ if hasattr(model, "means_") else model.mean_
    assert fitted.dtype == plain.__dict__[
        "means_" if hasattr(model, "means_") else "mean_"].dtype


def test_partial_fit_takes_a_tensor_that_requires_grad(rng):
    X = rng.standard_normal((80, 3))
    tensor = torch.tensor(X, requires_grad=True)
    plain = fastlvm.GaussianMixture(2, random_state=0)
    model = fastlvm.GaussianMixture(2, random_state=0)
    for rows in (slice(0, 40), slice(40, 80)):
        plain.partial_fit(X[rows])
        model.partial_fit(tensor[rows])
    np.testing.assert_array_equal(model.means_, plain.means_)


@pytest.mark.parametrize("name, params, method", ESTIMATORS)
def test_a_bfloat16_tensor_fits_as_its_float64_values(name, params, method, rng):
    # NumPy has no bfloat16 (torch refuses the view: "Got unsupported ScalarType"),
    # so it is read as float64, as sklearn reads float16
    X = rng.standard_normal((120, 4))
    X[:60] += 4.0
    half = torch.tensor(X, dtype=torch.bfloat16, requires_grad=True)
    wide = half.detach().double().numpy()
    plain = getattr(fastlvm, name)(**params).fit(wide)
    model = getattr(fastlvm, name)(**params).fit(half)
    assert model.score(half) == plain.score(wide)
    np.testing.assert_array_equal(getattr(model, method)(half), getattr(plain, method)(wide))
    assert half.dtype == torch.bfloat16  # the caller's tensor is untouched
