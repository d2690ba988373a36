"""A fit that passes over the rows each iteration (the mixtures', PPCA's EM, the
missing-data EM of PPCA and FactorAnalysis) hands the host kernels its rows in C
order, read-only, whatever the caller's layout.

The kernels read X a row at a time once an EM iteration: a fit on
Fortran-ordered rows (a pandas DataFrame's values) or a strided selection took
1.5x-3.1x as long as on C-ordered ones, so the fit copies such rows once.  A
mixture's fitted model is the same to the bit either way (the kernels'
arithmetic does not depend on the layout), and the caller's array is left as it
was."""

import numpy as np
import pytest
from sklearn.base import clone

import fastlvm
from fastlvm.kernels.estep_stats import _numba as estep
from fastlvm.kernels.kmeans import _numba as kmeans
from fastlvm.kernels.masked_latent_stats import _numba as masked
from fastlvm.kernels.mppca_stats import _numba as mppca
from fastlvm.kernels.ppca_stats import _numba as ppca


def _fortran(X):
    return np.asfortranarray(X)


def _strided(X):
    wide = np.zeros((X.shape[0], 2 * X.shape[1]))
    wide[:, ::2] = X
    return wide[:, ::2]


def _c_ordered(X):  # writable: the kernels still see a read-only view
    return X.copy()


@pytest.fixture
def kernel_rows(monkeypatch):
    """The rows (the first 2-D array argument) of every E-step, k-means,
    mixture-of-PPCA, PPCA and missing-data kernel launch."""
    seen = []

    def recording(launch):
        def launch_and_record(*args, **kwargs):
            seen.append(next(a for a in args if isinstance(a, np.ndarray) and a.ndim == 2))
            return launch(*args, **kwargs)
        return launch_and_record

    for module in (estep, kmeans, mppca, ppca, masked):
        for name in ("run_groups", "run_spans"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, recording(getattr(module, name)))
    return seen


def _fits_of_the_layout_and_of_c_rows(model, layout, X, kernel_rows):
    """(model fitted on ``layout(X)``, model fitted on X), having checked that every
    kernel launch of the first fit saw C-ordered, read-only rows and that the
    caller's array kept its flags."""
    given = layout(X)
    flags = given.flags.c_contiguous, given.flags.writeable
    fitted = clone(model).fit(given)
    assert kernel_rows, "no kernel launch was recorded"
    assert all(rows.flags.c_contiguous and not rows.flags.writeable for rows in kernel_rows)
    assert (given.flags.c_contiguous, given.flags.writeable) == flags
    return fitted, clone(model).fit(X)


@pytest.mark.parametrize("layout", [_c_ordered, _fortran, _strided])
@pytest.mark.parametrize("model", [
    fastlvm.GaussianMixture(3, covariance_type="full", random_state=0),
    fastlvm.GaussianMixture(3, covariance_type="diag", init_params="k-means++",
                            random_state=0),
    fastlvm.BayesianGaussianMixture(n_components=3, max_iter=20, random_state=0),
    fastlvm.MixtureOfPPCA(3, n_latent=2, random_state=0),
], ids=["gmm-full", "gmm-diag-kmeans++", "bgm", "mppca"])
def test_fit_reads_c_ordered_read_only_rows(model, layout, kernel_rows):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((600, 6)) + rng.integers(0, 3, (600, 1)) * 3.0
    fitted, reference = _fits_of_the_layout_and_of_c_rows(model, layout, X, kernel_rows)
    assert fitted.lower_bound_ == reference.lower_bound_
    np.testing.assert_array_equal(fitted.means_, reference.means_)


@pytest.mark.parametrize("layout", [_fortran, _strided])
def test_ppca_em_reads_c_ordered_rows(layout, kernel_rows):
    """PPCA's EM (``method="em"``) passes over the rows each iteration as the
    mixtures do; its closed form reads them once and copies nothing."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((500, 3)) @ rng.standard_normal((3, 7))
    X += 0.3 * rng.standard_normal(X.shape)
    fitted = fastlvm.PPCA(2, method="em", random_state=0).fit(layout(X))
    assert kernel_rows and all(rows.flags.c_contiguous for rows in kernel_rows)
    reference = fastlvm.PPCA(2, method="em", random_state=0).fit(X)
    # the same to rounding, not to the bit: the mean and scatter that start EM
    # are NumPy's sums over the caller's layout
    np.testing.assert_allclose(fitted.lower_bound_, reference.lower_bound_, rtol=1e-12)
    np.testing.assert_allclose(fitted.components_, reference.components_, rtol=1e-9,
                               atol=1e-12)


@pytest.mark.parametrize("layout", [_fortran, _strided])
@pytest.mark.parametrize("model", [
    fastlvm.PPCA(2, random_state=0),
    fastlvm.FactorAnalysis(2, random_state=0),
], ids=["ppca", "factor-analysis"])
def test_missing_data_em_reads_c_ordered_rows(model, layout, kernel_rows):
    """The EM that marginalises missing entries (PPCA and FactorAnalysis on rows
    with NaN) passes over the rows each iteration: C-ordered and read-only rows
    for its kernel, and the fit of the C-ordered rows to the bit (its starting
    mean and scatter are NumPy's sums over the copy)."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((500, 3)) @ rng.standard_normal((3, 7))
    X += 0.3 * rng.standard_normal(X.shape)
    X[rng.random(X.shape) < 0.1] = np.nan
    fitted, reference = _fits_of_the_layout_and_of_c_rows(model, layout, X, kernel_rows)
    np.testing.assert_array_equal(fitted.components_, reference.components_)
    np.testing.assert_array_equal(fitted.noise_variance_, reference.noise_variance_)
