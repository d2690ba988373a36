import numpy as np
import pytest
import sklearn.decomposition.tests.test_factor_analysis as sklearn_tests
from sklearn.decomposition import FactorAnalysis as SkFA
from sklearn.utils.estimator_checks import check_estimator

from fastlvm import FactorAnalysis
from tests.conftest import rebound

# sklearn's own FactorAnalysis test (both SVD methods, the log-likelihood history,
# get_covariance / get_precision at 0, 2 and D components, the rotations), run
# on fastlvm's class at a few seeds
test_sklearn_factor_analysis = rebound(sklearn_tests.test_factor_analysis,
                                       FactorAnalysis=FactorAnalysis)


@pytest.fixture(params=[0, 1, 42])
def global_random_seed(request):
    """sklearn's fixture of the same name."""
    return request.param


def _data(n=500, d=8, q=3, seed=0, offset=0.0):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((q, d))
    psi = rng.random(d) + 0.2
    return (rng.standard_normal((n, q)) @ W + rng.standard_normal((n, d)) * np.sqrt(psi)
            + offset)


def _same_up_to_sign(a, b, **kw):
    signs = np.sign((a * b).sum(axis=1))
    np.testing.assert_allclose(a * signs[:, None], b, **kw)


@pytest.mark.parametrize("rotation", [None, "varimax", "quartimax"])
@pytest.mark.parametrize("n_components", [1, 2, 3])
def test_matches_sklearn_lapack(n_components, rotation):
    # up to the data's 3 factors, so every retained scaled eigenvalue is >= 1
    # and sklearn's log-likelihood formula is exact (see the test below)
    X = _data(offset=50.0)
    kw = dict(n_components=n_components, rotation=rotation, tol=1e-4)
    ours = FactorAnalysis(**kw).fit(X)
    ref = SkFA(svd_method="lapack", **kw).fit(X)
    np.testing.assert_allclose(ours.loglike_, ref.loglike_, rtol=1e-8)
    assert ours.n_iter_ == ref.n_iter_
    np.testing.assert_allclose(ours.noise_variance_, ref.noise_variance_, rtol=1e-6)
    np.testing.assert_allclose(ours.mean_, ref.mean_, rtol=1e-12)
    _same_up_to_sign(ours.components_, ref.components_, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(ours.get_covariance(), ref.get_covariance(), rtol=1e-6,
                               atol=1e-9)
    np.testing.assert_allclose(ours.get_precision(), ref.get_precision(), rtol=1e-5,
                               atol=1e-8)
    np.testing.assert_allclose(ours.score_samples(X), ref.score_samples(X), rtol=1e-7)
    assert ours.score(X) == pytest.approx(ref.score(X), rel=1e-8)
    Z, Zr = ours.transform(X), ref.transform(X)
    _same_up_to_sign(Z.T, Zr.T, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n_components", [2, 5, None])
def test_loglike_is_the_fitted_models_log_likelihood(n_components):
    # Beyond the data's 3 factors some retained eigenvalues of
    # Psi^-1/2 S Psi^-1/2 fall below 1, where sklearn's loglike_ overstates the
    # log-likelihood (log s + 1 for s) and, at n_components=None, stops the
    # fit after 2 iterations 9.5 nats short of the optimum.
    X = _data(offset=50.0)
    ours = FactorAnalysis(n_components, tol=1e-4).fit(X)
    assert ours.loglike_[-1] == pytest.approx(ours.score_samples(X).sum(), rel=1e-10)
    assert np.all(np.diff(ours.loglike_) >= -1e-9 * abs(ours.loglike_[-1]))
    ref = SkFA(n_components, tol=1e-4, svd_method="lapack").fit(X)
    assert ours.score(X) >= ref.score(X) - 1e-12


def test_rank_deficient_data_has_a_finite_log_likelihood():
    # fewer rows than features: Psi^-1/2 S Psi^-1/2 has exact zero eigenvalues,
    # whose log sklearn's formula takes
    X = _data(n=4, d=9, seed=114) * np.geomspace(0.02, 200.0, 9)
    fa = FactorAnalysis(4, tol=1e-4).fit(X)
    assert np.all(np.isfinite(fa.loglike_)), fa.loglike_
    assert np.all(np.isfinite(fa.score_samples(X)))


@pytest.mark.parametrize("missing", [False, True])
def test_data_in_other_units_gives_the_same_fit(missing):
    # x -> c x maps the fit to psi -> c^2 psi, W -> c W.  sklearn's absolute
    # floor of 1e-12 on psi pins the noise variances of data of variance about
    # 1e-12 or below (micrometres in metres): its score there is off by 30 per row.
    X, scale = _data(n=500, d=8, offset=3.0), 1e-8
    if missing:
        X[np.random.default_rng(5).random(X.shape) < 0.1] = np.nan
    # tol: on the total log-likelihood for complete data, per row with missing entries
    kw = dict(n_components=3, tol=1e-4 if missing else 1e-7, max_iter=5000)
    ref = FactorAnalysis(**kw).fit(X)
    scaled = FactorAnalysis(**kw).fit(X * scale)
    np.testing.assert_allclose(scaled.noise_variance_ / scale**2, ref.noise_variance_, rtol=1e-4)
    np.testing.assert_allclose(scaled.get_covariance() / scale**2, ref.get_covariance(),
                               rtol=1e-4, atol=1e-6)
    Xc = np.nan_to_num(X)
    d = X.shape[1]
    assert scaled.score(Xc * scale) + d * np.log(scale) == pytest.approx(ref.score(Xc), rel=1e-6)


def test_sample_weight_equals_repeated_rows():
    X = _data(n=200)
    reps = np.random.default_rng(1).integers(0, 3, X.shape[0])
    a = FactorAnalysis(3, tol=1e-6).fit(X, sample_weight=reps.astype(float))
    b = FactorAnalysis(3, tol=1e-6).fit(np.repeat(X, reps, axis=0))
    np.testing.assert_allclose(a.loglike_, b.loglike_, rtol=1e-9)
    np.testing.assert_allclose(a.noise_variance_, b.noise_variance_, rtol=1e-8)


def test_chunking_does_not_change_the_fit():
    X = _data(n=1000, offset=1e4)
    a = FactorAnalysis(2).fit(X)
    b = FactorAnalysis(2, chunk_size=77).fit(X)
    np.testing.assert_allclose(a.loglike_, b.loglike_, rtol=1e-10)


def test_bad_input():
    X = _data()
    with pytest.raises(ValueError, match="noise_variance_init"):
        FactorAnalysis(2, noise_variance_init=np.ones(3)).fit(X)
    for bad in (-1.0, np.nan):
        with pytest.raises(ValueError, match="noise_variance_init must be finite and non-neg"):
            FactorAnalysis(2, noise_variance_init=np.r_[bad, np.ones(X.shape[1] - 1)]).fit(X)
    zero_start = FactorAnalysis(2, noise_variance_init=np.zeros(X.shape[1])).fit(X)
    assert np.all(np.isfinite(zero_start.loglike_))
    Xn = X.copy()
    Xn[0, 0] = np.inf  # NaN marks a missing entry; infinity is an error
    with pytest.raises(ValueError, match="infinity"):
        FactorAnalysis(2).fit(Xn)
    with pytest.raises(ValueError, match="sample_weight"):
        FactorAnalysis(2).fit(X, sample_weight=-np.ones(X.shape[0]))
    one_row = np.r_[1.0, np.zeros(X.shape[0] - 1)]
    for data in (X, np.where(np.eye(*X.shape, dtype=bool), np.nan, X)):  # and missing
        with pytest.raises(ValueError, match="at least 2 samples with a positive sample_w"):
            FactorAnalysis(2).fit(data, sample_weight=one_row)
    with pytest.warns(Warning, match="did not converge"):
        FactorAnalysis(2, max_iter=1, tol=0).fit(X)


def test_passes_sklearn_estimator_checks():
    check_estimator(FactorAnalysis(n_components=2))


def test_missing_data_reaches_the_complete_data_fit():
    rng = np.random.default_rng(3)
    X = _data(n=4000, d=10, q=2, seed=3, offset=5.0)
    Xm = X.copy()
    Xm[rng.random(X.shape) < 0.15] = np.nan
    full = FactorAnalysis(2).fit(X)
    fa = FactorAnalysis(2, tol=1e-8, max_iter=5000).fit(Xm)
    assert np.all(np.diff(fa.loglike_) >= -1e-7)
    np.testing.assert_allclose(fa.noise_variance_, full.noise_variance_, rtol=0.1)
    assert np.isclose(fa.score(X), full.score(X), rtol=2e-3)
    np.testing.assert_allclose(fa.get_covariance(), full.get_covariance(), atol=0.15)


def test_missing_data_rows_score_on_their_observed_entries():
    from scipy.stats import multivariate_normal

    X = _data(n=600, d=6, q=2, seed=1)
    X[::3, 2] = np.nan
    fa = FactorAnalysis(2, max_iter=200).fit(X)
    cov = fa.get_covariance()
    for x, s in zip(X[:6], fa.score_samples(X[:6])):
        o = ~np.isnan(x)
        assert np.isclose(s, multivariate_normal(fa.mean_[o], cov[np.ix_(o, o)]).logpdf(x[o]))
    assert fa.transform(X[:6]).shape == (6, 2)


def test_missing_data_with_weights_equals_repeated_rows():
    X = _data(n=300, d=6, q=2, seed=2)
    X[::4, 1] = np.nan
    w = np.random.default_rng(0).integers(1, 3, len(X))
    a = FactorAnalysis(2, max_iter=30, tol=0).fit(X, sample_weight=w.astype(float))
    b = FactorAnalysis(2, max_iter=30, tol=0).fit(np.repeat(X, w, axis=0))
    np.testing.assert_allclose(a.noise_variance_, b.noise_variance_, rtol=1e-8)


@pytest.mark.parametrize("rotation", [None, "varimax"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("n_components", [3, None])
def test_partial_fit_equals_fit_on_all_rows(n_components, weighted, rotation):
    """Batches of any sizes, one of a single row, far from the origin: the model of
    fit on all the rows, to rounding, with the same iterations."""
    X = _data(n=3000, offset=1e3)
    w = np.random.default_rng(3).random(X.shape[0]) if weighted else None
    whole = FactorAnalysis(n_components, rotation=rotation).fit(X, sample_weight=w)
    streamed = FactorAnalysis(n_components, rotation=rotation)
    for start, stop in ((0, 1000), (1000, 1001), (1001, 2500), (2500, 3000)):
        streamed.partial_fit(X[start:stop], sample_weight=None if w is None else w[start:stop])
    np.testing.assert_allclose(streamed.mean_, whole.mean_, rtol=1e-12)
    np.testing.assert_allclose(streamed.components_, whole.components_, atol=1e-9)
    np.testing.assert_allclose(streamed.noise_variance_, whole.noise_variance_, rtol=1e-9)
    np.testing.assert_allclose(streamed.loglike_, whole.loglike_, rtol=1e-11)
    np.testing.assert_allclose(streamed.score_samples(X), whole.score_samples(X), rtol=1e-10)


def test_factor_signs_are_canonical():
    """Each factor's largest loading is positive: a fit does not flip a factor with
    the last bits of the covariance (how the rows were chunked or streamed)."""
    for seed in range(5):  # 15 factors: eigh's free signs would give some negative
        X = _data(n=2000, seed=seed)
        for model in (FactorAnalysis(3).fit(X), FactorAnalysis(3, chunk_size=7).fit(X)):
            W = model.components_
            assert np.all(W[np.arange(3), np.abs(W).argmax(axis=1)] > 0)


def test_partial_fit_continues_a_fit_and_refuses_what_it_cannot_add():
    X = _data(n=1000)
    continued = FactorAnalysis(2).fit(X[:600]).partial_fit(X[600:])
    np.testing.assert_allclose(continued.components_, FactorAnalysis(2).fit(X).components_,
                               atol=1e-10)
    model = FactorAnalysis(2).partial_fit(X[:300])
    state = dict(vars(model))
    with_nan = X[300:310].copy()
    with_nan[0, 0] = np.nan
    for batch, weights, match in ((with_nan, None, "NaN"), (X[300:310, :3], None, "features"),
                                  (X[300:310], np.zeros(10), "non-zero")):
        with pytest.raises(ValueError, match=match):
            model.partial_fit(batch, sample_weight=weights)
    # each failed batch left the model as it was
    assert vars(model).keys() == state.keys()
    assert all(vars(model)[k] is v for k, v in state.items())
    with pytest.raises(ValueError, match="at least 2 samples"):
        FactorAnalysis(2).partial_fit(X[:5], sample_weight=np.r_[1.0, np.zeros(4)])
    missing = X.copy()
    missing[0, 0] = np.nan
    with pytest.raises(ValueError, match="missing entries"):
        FactorAnalysis(2).fit(missing).partial_fit(X[:10])
    fresh = FactorAnalysis(2)
    with pytest.raises(ValueError, match=r"partial_fit takes complete rows.*with fit"):
        fresh.partial_fit(missing[:10])
    assert not hasattr(fresh, "n_features_in_")


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_a_constant_feature_is_constant_however_its_mean_is_rounded():
    """A constant column's weighted (or streamed) mean is off in its last bits, which
    left its variance at about 1e-33 instead of 0; a noise floor of 1e-12 times that
    then set the (unbounded) likelihood by the rounding: weighted rows scored 20
    nats per row away from the same rows repeated."""
    X = _data(n=200)
    X[:, 0] = 0.1  # not a binary fraction: its weighted mean rounds
    reps = np.random.default_rng(1).integers(1, 4, X.shape[0])
    # the same 300 iterations each (tol=0): the scaled weights change the stopping test
    weighted = FactorAnalysis(3, tol=0, max_iter=300).fit(X, sample_weight=reps * 0.7)
    repeated = FactorAnalysis(3, tol=0, max_iter=300).fit(np.repeat(X, reps, axis=0))
    streamed = FactorAnalysis(3)
    for start in range(0, 200, 60):
        streamed.partial_fit(X[start:start + 60])
    plain = FactorAnalysis(3).fit(X)
    np.testing.assert_allclose(weighted.score(X), repeated.score(X), rtol=1e-9)
    np.testing.assert_allclose(streamed.score(X), plain.score(X), rtol=1e-9)
    np.testing.assert_allclose(weighted.noise_variance_[0], repeated.noise_variance_[0],
                               rtol=1e-9)


def test_a_fit_that_raises_leaves_the_model_as_it_was():
    """fit validates X (setting n_features_in_) before it finds one row of positive
    weight too few: the earlier model stays whole, so partial_fit and transform
    still see it."""
    X = _data(n=300)
    model = FactorAnalysis(2).fit(X)
    state = dict(vars(model))
    with pytest.raises(ValueError, match="at least 2 samples"):
        model.fit(X[:5, :3], sample_weight=np.r_[1.0, np.zeros(4)])
    assert vars(model).keys() == state.keys()
    assert all(vars(model)[k] is v for k, v in state.items())
    model.partial_fit(X[:10])  # continues the first fit


def test_missing_data_fit_of_scaled_weights_with_scaled_tol():
    """``tol`` applies to the weighted total, so weights scaled by c with tol
    scaled by c give the same fit; the missing-data EM's float32 kernel takes
    the weights in units of a row (at 1e-100 they summed to zero)."""
    X = _data(n=2000, d=6, q=2, offset=100.0).astype(np.float32)
    X[::7, 2] = np.nan
    a = FactorAnalysis(2).fit(X)
    for scale in (1e-100, 3.0):
        b = FactorAnalysis(2, tol=1e-2 * scale).fit(X, sample_weight=np.full(len(X), scale))
        assert b.n_iter_ == a.n_iter_
        np.testing.assert_allclose(b.noise_variance_, a.noise_variance_, rtol=1e-9)
        np.testing.assert_allclose(np.asarray(b.loglike_) / scale, a.loglike_, rtol=1e-9)
