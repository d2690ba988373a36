import warnings

import numpy as np
import pytest
import sklearn.mixture.tests.test_gaussian_mixture as sklearn_tests
from sklearn.exceptions import ConvergenceWarning, NotFittedError
from sklearn.mixture import GaussianMixture as SkGaussianMixture
from sklearn.utils.estimator_checks import check_estimator

from fastlvm import GaussianMixture, MixtureOfPPCA
from tests.conftest import COVARIANCE_TYPES, grouped_blobs, kernel_rows_per_call, rebound


def blobs(rng, n=400, d=3, k=3, offset=0.0, dtype=np.float64):
    return grouped_blobs(rng, n, d, k, 6.0, offset, dtype)


# sklearn's own GaussianMixture tests, run on fastlvm's class (float32 data
# included: sklearn keeps float32 parameters, and so does fastlvm).  Two are left
# out because they reach into sklearn's private code; what each checks is
# checked here by test_user_initial_parameters_match_sklearn (given weights,
# means and precisions are used as they are, the precisions' Cholesky factors
# included, from the first bound on).
SKLEARN_PRIVATE = {
    "test_gaussian_mixture_precisions_init": "calls sklearn's private _initialize(X, resp)",
    "test_gaussian_mixture_all_init_does_not_estimate_gaussian_parameters":
        "counts calls of sklearn's private _estimate_gaussian_parameters",
}
SKLEARN_TESTS = sorted(name for name, f in vars(sklearn_tests).items()
                       if name.startswith("test_") and callable(f)
                       and "GaussianMixture" in f.__code__.co_names
                       and name not in SKLEARN_PRIVATE)
for _name in SKLEARN_TESTS:
    globals()["test_sklearn_" + _name[len("test_"):]] = rebound(
        getattr(sklearn_tests, _name), GaussianMixture=GaussianMixture)


@pytest.fixture(params=[np.float64, np.float32])
def global_dtype(request):
    """sklearn's fixture of the same name (its suite runs float32 only on request)."""
    return request.param


@pytest.fixture
def global_random_seed():
    """sklearn's fixture of the same name, at its default seed."""
    return 42


def test_sklearn_suite_is_collected():
    assert len(SKLEARN_TESTS) >= 30, SKLEARN_TESTS
    assert set(SKLEARN_PRIVATE) <= set(vars(sklearn_tests)), "sklearn renamed a test"


def _fit_both(X, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return SkGaussianMixture(**kw).fit(X), GaussianMixture(**kw).fit(X)


@pytest.mark.parametrize("init_params", ["random", "random_from_data", "k-means++"])
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_bound_trajectory_matches_sklearn(covariance_type, init_params, rng):
    X = blobs(rng)
    sk, fl = _fit_both(X, n_components=3, covariance_type=covariance_type,
                       init_params=init_params, random_state=0, max_iter=25, tol=0)
    np.testing.assert_allclose(fl.lower_bounds_, sk.lower_bounds_, rtol=1e-7)
    assert fl.n_iter_ == sk.n_iter_ and fl.lower_bound_ == pytest.approx(sk.lower_bound_,
                                                                          rel=1e-7)
    for attr in ("weights_", "means_", "covariances_", "precisions_", "precisions_cholesky_"):
        np.testing.assert_allclose(getattr(fl, attr), getattr(sk, attr), rtol=1e-6,
                                   atol=1e-9, err_msg=attr)
    np.testing.assert_array_equal(fl.predict(X), sk.predict(X))
    np.testing.assert_allclose(fl.score_samples(X), sk.score_samples(X), rtol=1e-9)
    np.testing.assert_allclose(fl.predict_proba(X), sk.predict_proba(X), atol=1e-9)
    assert fl.bic(X) == pytest.approx(sk.bic(X), rel=1e-9)
    assert fl.aic(X) == pytest.approx(sk.aic(X), rel=1e-9)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_user_initial_parameters_match_sklearn(covariance_type, rng):
    X = blobs(rng)
    ref = SkGaussianMixture(3, covariance_type=covariance_type, random_state=1,
                            max_iter=2).fit(X)
    kw = dict(n_components=3, covariance_type=covariance_type, weights_init=ref.weights_,
              means_init=ref.means_, precisions_init=ref.precisions_, max_iter=20, tol=0)
    sk, fl = _fit_both(X, **kw)
    np.testing.assert_allclose(fl.lower_bounds_, sk.lower_bounds_, rtol=1e-7)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_reference_backend_gives_the_same_trajectory(covariance_type, rng, monkeypatch):
    X = blobs(rng)
    kw = dict(n_components=3, covariance_type=covariance_type, random_state=0, max_iter=10,
              tol=0, init_params="random_from_data")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        numba_fit = GaussianMixture(**kw).fit(X)
        monkeypatch.setenv("FASTLVM_BACKEND", "reference")
        ref_fit = GaussianMixture(**kw).fit(X)
    np.testing.assert_allclose(numba_fit.lower_bounds_, ref_fit.lower_bounds_, rtol=1e-10)


def test_separated_float64_full_trajectory_matches_sklearn_and_reference(rng, monkeypatch):
    """Eight clusters 12 sigma apart: most float64 responsibilities are tiny but
    not zero, so the 'full' kernel leaves those rows out of the moments (see
    ``responsibilities_and_masses``).  The fit must not notice: sklearn's
    trajectory to 1e-7, the float64 reference backend's to 1e-10."""
    X = grouped_blobs(rng, 6000, 5, 8, 12.0, 0.0, np.float64)
    kw = dict(n_components=8, covariance_type="full", random_state=0, max_iter=15, tol=0,
              init_params="random_from_data")
    sk, fl = _fit_both(X, **kw)
    np.testing.assert_allclose(fl.lower_bounds_, sk.lower_bounds_, rtol=1e-7)
    np.testing.assert_allclose(fl.covariances_, sk.covariances_, rtol=1e-6, atol=1e-9)
    monkeypatch.setenv("FASTLVM_BACKEND", "reference")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ref = GaussianMixture(**kw).fit(X)
    np.testing.assert_allclose(fl.lower_bounds_, ref.lower_bounds_, rtol=1e-10)
    np.testing.assert_allclose(fl.covariances_, ref.covariances_, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_fit_predict_equals_fit_then_predict(covariance_type, rng):
    X = blobs(rng)
    a = GaussianMixture(3, covariance_type=covariance_type, random_state=2).fit_predict(X)
    b = GaussianMixture(3, covariance_type=covariance_type, random_state=2).fit(X).predict(X)
    np.testing.assert_array_equal(a, b)


def test_reproducible_with_random_state(rng):
    X = blobs(rng, n=3000)
    a = GaussianMixture(4, random_state=7, n_init=2).fit(X)
    b = GaussianMixture(4, random_state=7, n_init=2).fit(X)
    np.testing.assert_array_equal(a.means_, b.means_)
    assert a.lower_bounds_ == b.lower_bounds_


def test_chunk_size_does_not_change_the_fit(rng):
    X = blobs(rng, n=2000)
    a = GaussianMixture(3, random_state=0, chunk_size=333).fit(X)
    b = GaussianMixture(3, random_state=0).fit(X)
    np.testing.assert_allclose(a.lower_bounds_, b.lower_bounds_, rtol=1e-12)
    np.testing.assert_allclose(a.predict_proba(X), b.predict_proba(X), atol=1e-12)


def test_estep_calls_split_the_rows_only_when_chunk_size_is_set(rng, monkeypatch):
    """The fused E-step on a host array is one kernel call per pass by default
    (the kernel never holds n x K), and chunk_size rows a call when it is set."""
    from fastlvm.kernels.estep_stats import IMPLEMENTATIONS

    # a default smaller than the data: predictions and the initialisation still use it
    rows = kernel_rows_per_call(monkeypatch, IMPLEMENTATIONS, 500)
    X = blobs(rng, n=2000)
    gm = GaussianMixture(3, random_state=0, max_iter=2, tol=0).fit(X)
    n = X.shape[0]
    assert rows and set(rows) == {n}
    rows.clear()
    gm.set_params(chunk_size=333).fit(X)
    assert rows and max(rows) == 333 and sum(rows) % n == 0 and len(rows) > sum(rows) // n


def test_sample_weight_equals_repeated_rows(rng):
    X = blobs(rng, n=300)
    reps = rng.integers(1, 4, X.shape[0])
    Xr = np.repeat(X, reps, axis=0)
    ref = SkGaussianMixture(3, random_state=0, max_iter=3).fit(X)
    kw = dict(n_components=3, weights_init=ref.weights_, means_init=ref.means_,
              precisions_init=ref.precisions_, tol=0, max_iter=15)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        a = GaussianMixture(**kw).fit(X, sample_weight=reps)
        b = GaussianMixture(**kw).fit(Xr)
    np.testing.assert_allclose(a.lower_bounds_, b.lower_bounds_, rtol=1e-10)
    np.testing.assert_allclose(a.means_, b.means_, rtol=1e-9)


@pytest.mark.parametrize("scale", [1 / 3000, 1e-300, 3.0, 1e300])
def test_the_weights_scale_does_not_change_the_fit(scale, rng):
    """Maximum likelihood does not depend on the weights' scale, and neither does
    the fit: the weights are taken in units of a row, so the 10 eps added to
    each N_k against empty components stays a row's worth (float32: 1.2e-6).
    Counted in the weights' own units, weights summing to 1 moved the means
    4e-6 (relative) from the unit-weight fit here, and weights of 1e-300
    fitted a model scoring -1.5e10 nats a row (-5.3 unweighted)."""
    X = (blobs(rng, n=3000, offset=100.0)).astype(np.float32)
    kw = dict(n_components=3, covariance_type="diag", random_state=0, tol=1e-6)
    a = GaussianMixture(**kw).fit(X, sample_weight=np.ones(len(X)))
    b = GaussianMixture(**kw).fit(X, sample_weight=np.full(len(X), scale))
    np.testing.assert_allclose(b.means_, a.means_, rtol=3e-7)
    np.testing.assert_allclose(b.weights_, a.weights_, rtol=1e-6)
    np.testing.assert_allclose(b.covariances_, a.covariances_, rtol=1e-5)
    assert b.lower_bound_ == pytest.approx(a.lower_bound_, rel=1e-6)


def test_weights_in_row_units_scale_exactly():
    """Divided by the power of two nearest their mean: unit weights unchanged,
    integer ones exact, and sums past float64's top or means below its bottom
    still give a unit."""
    from fastlvm._sample_weight import in_row_units

    assert in_row_units(None) is None
    ones = np.ones(5)
    assert in_row_units(ones) is ones
    np.testing.assert_array_equal(in_row_units(np.array([1.0, 2.0, 3.0])), [0.5, 1.0, 1.5])
    np.testing.assert_array_equal(in_row_units(np.full(4, 2.0**-40 / 3)), np.full(4, 4 / 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        big = in_row_units(np.full(3, 1e308))
    tiny = in_row_units(np.array([5e-324, 0.0, 0.0, 0.0]))
    np.testing.assert_array_equal(big, np.full(3, 1e308 / 2.0**1023))
    np.testing.assert_array_equal(tiny, [1.0, 0.0, 0.0, 0.0])


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_float32_stays_accurate_far_from_origin(covariance_type, rng):
    # offset 1e4, unit spread.  Compare with a float64 fit of the *same* rounded
    # data, so only the arithmetic differs.
    X32 = blobs(rng, n=3000, offset=1e4).astype(np.float32)
    X64 = X32.astype(np.float64)
    ref = SkGaussianMixture(3, covariance_type=covariance_type, random_state=0,
                            max_iter=2).fit(X64)
    kw = dict(n_components=3, covariance_type=covariance_type, weights_init=ref.weights_,
              means_init=ref.means_, precisions_init=ref.precisions_, tol=0, max_iter=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        f64 = GaussianMixture(**kw).fit(X64)
        f32 = GaussianMixture(**kw).fit(X32)
        try:
            sk32 = SkGaussianMixture(**kw).fit(X32).covariances_
        except ValueError:  # sklearn's float32 tied fit breaks down here entirely
            sk32 = np.full_like(f64.covariances_, np.inf)
    scale = np.abs(f64.covariances_).max()
    err_fl = np.abs(f32.covariances_ - f64.covariances_).max() / scale
    err_sk = np.abs(sk32 - f64.covariances_).max() / scale
    assert err_fl < 1e-4, err_fl
    if covariance_type != "full":  # sklearn expands E[x^2] - mu^2 there: loses digits
        assert err_fl < err_sk / 10, (err_fl, err_sk)
    assert f32.score_samples(X32).dtype == np.float32


def test_warm_start_continues(rng):
    X = blobs(rng)
    gm = GaussianMixture(3, random_state=0, max_iter=2, warm_start=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gm.fit(X)
        first = gm.lower_bound_
        gm.fit(X)
    assert gm.lower_bound_ >= first - 1e-12


def test_convergence_warning_and_verbose(rng, capsys):
    X = blobs(rng)
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        GaussianMixture(3, max_iter=1, random_state=0, verbose=2, verbose_interval=1).fit(X)
    out = capsys.readouterr().out
    assert "Initialization 0" in out and "Iteration 1" in out


def test_sample_matches_sklearn(rng):
    X = blobs(rng)
    sk, fl = _fit_both(X, n_components=3, init_params="random_from_data", random_state=0)
    Xs, ys = fl.sample(50)
    Xk, yk = sk.sample(50)
    np.testing.assert_allclose(Xs, Xk, rtol=1e-6, atol=1e-8)
    np.testing.assert_array_equal(ys, yk)


def test_passes_sklearn_check_estimator():
    failures = [r for r in check_estimator(GaussianMixture(), on_fail=None)
                if r["status"] == "failed"]
    assert not failures, [(r["check_name"], str(r["exception"])[:200]) for r in failures]


# ----------------------------------------------------------------- bad input
@pytest.mark.parametrize("X, error, match", [
    (np.array([[1.0, np.nan], [0.0, 1.0], [2.0, 2.0]]), ValueError, "NaN"),
    (np.array([[1.0, np.inf], [0.0, 1.0], [2.0, 2.0]]), ValueError, "infinity"),
    (np.arange(5.0), ValueError, "Expected 2D array"),
    (np.zeros((3, 2, 2)), ValueError, "dim 3"),
    (np.zeros((0, 2)), ValueError, "0 sample"),
    (np.array([["a", "b"], ["c", "d"]]), ValueError, "convert"),
    (np.array([[1 + 1j, 2], [3, 4]]), ValueError, "Complex data not supported"),
    (np.zeros((1, 2)), ValueError, "minimum of 2 is required"),
])
def test_bad_X(X, error, match):
    with pytest.raises(error, match=match):
        GaussianMixture(1).fit(X)


def test_fewer_samples_than_components():
    with pytest.raises(ValueError, match="Expected n_samples >= n_components"):
        GaussianMixture(5).fit(np.random.default_rng(0).standard_normal((3, 2)))


@pytest.mark.parametrize("params, match", [
    (dict(n_components=0), "n_components"),
    (dict(covariance_type="triangular"), "covariance_type"),
    (dict(tol=-1.0), "tol"),
    (dict(reg_covar=-1.0), "reg_covar"),
    (dict(max_iter=-1), "max_iter"),
    (dict(n_init=0), "n_init"),
    (dict(init_params="magic"), "init_params"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(cuda_graph="yes"), "'cuda_graph' parameter"),
    (dict(weights_init=[0.2, 0.2]), "should be normalized"),
    (dict(weights_init=[1.5, -0.5]), r"range \[0, 1\]"),
    (dict(weights_init=[0.5, 0.25, 0.25]), "should have the shape"),
    (dict(means_init=np.zeros((2, 5))), "should have the shape"),
    (dict(precisions_init=-np.ones((2, 3, 3))), "symmetric, positive-definite"),
    (dict(covariance_type="diag", precisions_init=-np.ones((2, 3))), "should be positive"),
    (dict(covariance_type="spherical", precisions_init=np.ones(3)), "should have the shape"),
])
def test_bad_parameters(params, match, rng):
    with pytest.raises(ValueError, match=match):
        GaussianMixture(**{"n_components": 2, **params}).fit(rng.standard_normal((20, 3)))


def test_not_fitted_and_wrong_n_features(rng):
    X = rng.standard_normal((20, 3))
    with pytest.raises(NotFittedError):
        GaussianMixture(2).predict(X)
    gm = GaussianMixture(2, random_state=0).fit(X)
    with pytest.raises(ValueError, match="features"):
        gm.predict(rng.standard_normal((5, 4)))
    with pytest.raises(ValueError, match="'n_samples': 0\\."):  # not n_components' 2
        gm.sample(0)


def test_bad_sample_weight(rng):
    X = rng.standard_normal((20, 3))
    one_row = np.r_[1.0, np.zeros(19)]
    for sw, match in ((np.ones(3), "shape"), (-np.ones(20), "non-negative"),
                      (np.zeros(20), "zero"), (np.ones(20) + 1j, "real; got complex"),
                      (one_row, "n_components = 2 samples with a positive sample_weight, "
                                "got 1")):
        with pytest.raises(ValueError, match=match):
            GaussianMixture(2).fit(X, sample_weight=sw)
        with pytest.raises(ValueError, match=match):
            GaussianMixture(2).partial_fit(X, sample_weight=sw)
        with pytest.raises(ValueError, match=match):
            MixtureOfPPCA(2, n_latent=1).fit(X, sample_weight=sw)


def test_scalar_sample_weight_weighs_every_row(rng):
    """As sklearn's _check_sample_weight: a scalar is every row's weight, which
    leaves the EM fixed point of an unweighted fit unchanged."""
    X = rng.standard_normal((40, 3))
    plain = GaussianMixture(2, random_state=0).fit(X)
    scalar = GaussianMixture(2, random_state=0).fit(X, sample_weight=3.0)
    np.testing.assert_allclose(scalar.means_, plain.means_, rtol=1e-9)
    np.testing.assert_allclose(scalar.lower_bounds_, plain.lower_bounds_, rtol=1e-9)


# ------------------------------------------------------------ degenerate data
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_identical_rows_and_constant_column_give_finite_parameters(covariance_type, rng):
    X = np.ones((50, 3))
    Y = np.column_stack([rng.standard_normal(60), np.full(60, 7.0)])
    Z = np.repeat(rng.standard_normal((4, 2)), 10, axis=0)  # duplicated points
    for data in (X, Y, Z):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            gm = GaussianMixture(2, covariance_type=covariance_type, random_state=0).fit(data)
        for attr in ("weights_", "means_", "covariances_", "precisions_cholesky_"):
            assert np.isfinite(getattr(gm, attr)).all(), attr
        assert np.isfinite(gm.score_samples(data)).all()


def test_singular_covariance_raises_sklearns_message():
    X = np.ones((20, 2))
    with pytest.raises(ValueError, match="increase reg_covar"):
        GaussianMixture(1, reg_covar=0.0).fit(X)


def test_streaming_without_torch_names_the_remedy(rng, monkeypatch):
    """device= streams through torch: without it, an ImportError that says so."""
    import sys

    monkeypatch.setitem(sys.modules, "torch", None)  # import torch raises ImportError
    monkeypatch.delitem(sys.modules, "fastlvm.mixture._streaming", raising=False)
    X = rng.standard_normal((50, 2))
    with pytest.raises(ImportError, match="device='cuda' streams a host array to a GPU "
                                          "through torch: install a CUDA build of torch"):
        GaussianMixture(2, device="cuda").fit(X)
