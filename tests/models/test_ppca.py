import warnings

import numpy as np
import pytest
from scipy.stats import multivariate_normal
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning

from fastlvm import PPCA


def _data(rng, n=4000, d=10, q=3, offset=3.0):
    Z = rng.standard_normal((n, q))
    W = rng.standard_normal((q, d)) * np.array([3.0, 2.0, 1.5])[:q, None]
    return Z @ W + 0.5 * rng.standard_normal((n, d)) + offset


def test_closed_form_is_the_ml_solution(rng):
    X = _data(rng)
    m = PPCA(3).fit(X)
    # PCA's noise variance and score use n - 1 denominators; PPCA is the MLE (n)
    pca = PCA(3).fit(X)
    assert np.isclose(m.score(X), pca.score(X), rtol=1e-5)
    n = X.shape[0]
    assert np.isclose(m.noise_variance_, pca.noise_variance_ * (n - 1) / n, rtol=1e-10)
    assert np.allclose(m.explained_variance_, pca.explained_variance_ * (n - 1) / n)
    np.testing.assert_allclose(m.explained_variance_ratio_, pca.explained_variance_ratio_,
                               rtol=1e-10)
    # components span the principal subspace
    proj = pca.components_.T @ pca.components_
    assert np.allclose(proj @ m.components_.T, m.components_.T, atol=1e-10)
    assert m.n_iter_ == 1


def test_score_samples_is_the_exact_gaussian_log_density(rng):
    X = _data(rng, n=500)
    m = PPCA(2).fit(X)
    expected = multivariate_normal(m.mean_, m.get_covariance()).logpdf(X)
    assert np.allclose(m.score_samples(X), expected, rtol=1e-12)
    assert np.allclose(m.get_precision() @ m.get_covariance(), np.eye(10), atol=1e-10)


def test_em_reaches_the_closed_form_optimum(rng):
    X = _data(rng)
    cf = PPCA(3).fit(X)
    em = PPCA(3, method="em", tol=1e-12, max_iter=3000, random_state=0).fit(X)
    assert np.isclose(em.score(X), cf.score(X), rtol=1e-9)
    assert np.isclose(em.noise_variance_, cf.noise_variance_, rtol=1e-5)
    assert np.allclose(em.components_, cf.components_, atol=1e-3)
    np.testing.assert_allclose(em.explained_variance_ratio_, cf.explained_variance_ratio_,
                               rtol=1e-5)
    bounds = np.array(em.lower_bounds_)
    assert np.all(np.diff(bounds) >= -1e-12), "EM must not decrease the likelihood"
    assert em.lower_bounds_[-1] == em.lower_bound_


def test_em_converges_fast_with_a_strong_signal(rng):
    """sigma^2 / lambda ~ 1e-3: plain EM crawls (see ritz_em_step), this must not."""
    n, d, q = 5000, 64, 8
    X = rng.standard_normal((n, q)) @ (rng.standard_normal((q, d)) * 2) + rng.standard_normal(
        (n, d)) * 0.1
    em = PPCA(q, method="em", tol=1e-9, max_iter=50, random_state=0).fit(X)
    assert em.n_iter_ <= 15
    assert np.isclose(em.score(X), PPCA(q).fit(X).score(X), rtol=1e-10)


def test_em_is_reproducible_and_warns(rng):
    X = _data(rng, n=500)
    a = PPCA(2, method="em", max_iter=5, random_state=3)
    with pytest.warns(ConvergenceWarning):
        a.fit(X)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        b = PPCA(2, method="em", max_iter=5, random_state=3).fit(X)
    assert np.array_equal(a.components_, b.components_)


def test_partial_fit_equals_fit(rng):
    X = _data(rng, n=3000)
    whole = PPCA(3).fit(X)
    streamed = PPCA(3)
    for i in range(0, 3000, 700):
        streamed.partial_fit(X[i:i + 700])
    assert streamed.n_samples_seen_ == 3000
    assert streamed.lower_bound_ == pytest.approx(whole.lower_bound_, rel=1e-12)
    assert whole.lower_bound_ == pytest.approx(whole.score(X), rel=1e-12)
    assert np.allclose(streamed.mean_, whole.mean_, atol=1e-12)
    assert np.allclose(streamed.components_, whole.components_, atol=1e-10)
    assert np.isclose(streamed.noise_variance_, whole.noise_variance_, rtol=1e-12)


def test_transform_and_inverse_transform(rng):
    X = _data(rng, n=800)
    m = PPCA(3).fit(X)
    Z = m.transform(X)
    assert Z.shape == (800, 3)
    # posterior mean: M^{-1} W^T (x - mean)
    wt = m.components_
    M = wt @ wt.T + m.noise_variance_ * np.eye(3)
    assert np.allclose(Z, np.linalg.solve(M, wt @ (X - m.mean_).T).T, atol=1e-10)
    rec = m.inverse_transform(Z)
    assert rec.shape == X.shape
    # the reconstruction explains most of the variance of this low-rank data
    assert ((X - rec) ** 2).sum() < 0.2 * ((X - X.mean(0)) ** 2).sum()


def _posterior_means(m, X):
    """M^{-1} W^T (x - mean) of each row, from the fitted attributes as they are now."""
    wt = m.components_
    M = wt @ wt.T + m.noise_variance_ * np.eye(len(wt))
    return np.linalg.solve(M, wt @ (X - m.mean_).T).T


def test_transform_follows_edits_of_the_fitted_parameters(rng, monkeypatch):
    """transform uses the W^T M^{-1} its fit formed, forming none of its own; edits
    of components_ (in place or by assignment), of noise_variance_, a partial_fit
    and a refit are never served the projection of the parameters before them."""
    import fastlvm.decomposition._ppca as ppca_module

    formed, original = [], ppca_module.ppca_posterior

    def counted(*args):
        formed.append(1)
        return original(*args)

    monkeypatch.setattr(ppca_module, "ppca_posterior", counted)
    X = _data(rng, n=600)
    m = PPCA(3).fit(X)
    formed.clear()
    for _ in range(3):
        np.testing.assert_allclose(m.transform(X[:5]), _posterior_means(m, X[:5]),
                                   atol=1e-12)
    assert formed == []
    m.components_ *= 2.0  # in place: the same array object
    np.testing.assert_allclose(m.transform(X[:5]), _posterior_means(m, X[:5]), atol=1e-12)
    m.components_ = m.components_[::-1].copy()
    np.testing.assert_allclose(m.transform(X[:5]), _posterior_means(m, X[:5]), atol=1e-12)
    m.noise_variance_ *= 3.0
    np.testing.assert_allclose(m.transform(X[:5]), _posterior_means(m, X[:5]), atol=1e-12)
    m.partial_fit(2.0 * X[:200])
    np.testing.assert_allclose(m.transform(X[:5]), _posterior_means(m, X[:5]), atol=1e-12)
    m.fit(X[::-1] + 1.0)
    np.testing.assert_allclose(m.transform(X[:5]), _posterior_means(m, X[:5]), atol=1e-12)


def test_sample_matches_the_model_covariance(rng):
    m = PPCA(2).fit(_data(rng, n=2000))
    S = m.sample(200_000, random_state=0)
    cov = m.get_covariance()
    assert np.allclose(np.cov(S.T), cov, atol=0.05 * np.abs(cov).max())
    assert np.array_equal(S[:5], m.sample(200_000, random_state=0)[:5])
    # with no random_state of its own, sample follows the estimator's, as the mixtures do
    seeded = m.set_params(random_state=3)
    assert np.array_equal(seeded.sample(4), seeded.sample(4))
    assert np.array_equal(seeded.sample(4), m.sample(4, random_state=3))
    assert not np.array_equal(seeded.sample(4), m.sample(4, random_state=4))
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match=f"n_samples must be a positive integer; got {bad}"):
            m.sample(bad)


def test_float32_stays_float32_and_accurate(rng):
    X = _data(rng, offset=1e4)
    m64 = PPCA(3).fit(X)
    m32 = PPCA(3).fit(X.astype(np.float32))
    assert m32.transform(X.astype(np.float32)).dtype == np.float32
    assert np.isclose(m32.noise_variance_, m64.noise_variance_, rtol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        em32 = PPCA(3, method="em", tol=1e-10, max_iter=2000, random_state=0).fit(
            X.astype(np.float32))
    assert np.isclose(em32.noise_variance_, m64.noise_variance_, rtol=1e-3)


@pytest.mark.parametrize("method", ["closed_form", "em"])
def test_chunk_size_does_not_change_the_fit(method, rng):
    X = _data(rng, n=1000)
    a = PPCA(2, method=method, max_iter=20, tol=0, random_state=0)
    b = PPCA(2, method=method, max_iter=20, tol=0, random_state=0, chunk_size=97)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        a.fit(X)
        b.fit(X)
    assert np.allclose(a.components_, b.components_, atol=1e-10)


def test_bad_input(rng):
    X = _data(rng, n=50, d=4)
    with pytest.raises(ValueError, match="n_components must be smaller than n_features"):
        PPCA(4).fit(X)
    Xn = X.copy()
    Xn[1, 1] = np.inf  # NaN marks a missing entry; infinity is an error
    with pytest.raises(ValueError, match="infinity"):
        PPCA(2).fit(Xn)
    Xn[1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):  # streaming needs complete rows
        PPCA(2).partial_fit(Xn)
    with pytest.raises(ValueError):
        PPCA(2).fit(X[0])
    with pytest.raises(ValueError, match="method"):
        PPCA(2, method="svd").fit(X)
    with pytest.raises(ValueError, match="subspace"):
        PPCA(2).fit(np.repeat(X[:1], 10, axis=0) + np.outer(np.arange(10), [1, 2, 3, 4]))
    m = PPCA(2).fit(X)
    with pytest.raises(ValueError, match="features"):
        m.transform(X[:, :3])
    with pytest.raises(ValueError, match="Z must have shape"):
        m.inverse_transform(np.ones((3, 3)))
    with pytest.raises(ValueError, match="Input Z contains NaN"):
        m.inverse_transform(np.full((3, 2), np.nan))
    with pytest.raises(ValueError, match="0 sample"):
        m.inverse_transform(np.ones((0, 2)))
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        PPCA(2).transform(X)


@pytest.mark.parametrize("method", ["closed_form", "em"])
@pytest.mark.parametrize("n_rows", [2, 4])
def test_data_in_a_subspace_raise(method, n_rows):
    # n <= q + 1 rows in general position span at most q dimensions: the noise
    # variance is rounding (closed form) or EM's floor, never an exact zero
    X = np.random.default_rng(0).standard_normal((n_rows, 6))
    with pytest.raises(ValueError, match="subspace"):
        PPCA(3, method=method).fit(X)
    with pytest.raises(ValueError, match="subspace"):
        PPCA(3, method=method).fit(X[[0, 1, 0, 1, 1]] * 1e3 + 5.0)
    if method == "closed_form":  # a first batch that raises leaves the model unfitted
        streamed = PPCA(3)
        with pytest.raises(ValueError, match="subspace"):
            streamed.partial_fit(X)
        assert vars(streamed) == vars(PPCA(3))
        more = np.random.default_rng(2).standard_normal((30, 6))
        np.testing.assert_array_equal(streamed.partial_fit(more).get_covariance(),
                                      PPCA(3).partial_fit(more).get_covariance())
    # q + 2 rows do not
    X = np.random.default_rng(1).standard_normal((5, 6))
    assert PPCA(3, method=method, tol=1e-12).fit(X).noise_variance_ > 1e-3


def test_check_estimator():
    from sklearn.utils.estimator_checks import check_estimator

    check_estimator(PPCA(1), expected_failed_checks={}, on_fail="raise")


# ------------------------------------------------------------- missing data
def _with_missing(rng, n=3000, d=15, q=3, frac=0.2):
    X = (rng.standard_normal((n, q)) @ rng.standard_normal((q, d)) * 2
         + rng.standard_normal((n, d)) * 0.7 + 4.0)
    Xm = X.copy()
    Xm[rng.random((n, d)) < frac] = np.nan
    Xm[np.isnan(Xm).all(axis=1), 0] = X[np.isnan(Xm).all(axis=1), 0]
    return X, Xm


def test_missing_data_em_recovers_the_complete_data_fit(rng):
    X, Xm = _with_missing(rng)
    full = PPCA(3).fit(X)
    em = PPCA(3, method="em", tol=1e-9, max_iter=2000, random_state=0).fit(Xm)
    assert np.all(np.diff(em.lower_bounds_) >= -1e-9)
    assert np.isclose(em.noise_variance_, full.noise_variance_, rtol=0.03)
    assert np.isclose(em.score(X), full.score(X), rtol=2e-3)
    np.testing.assert_allclose(em.mean_, full.mean_, atol=0.05)


@pytest.mark.parametrize("missing", [False, True])
def test_data_in_other_units_gives_the_same_fit(rng, missing):
    # x -> c x maps sigma^2 -> c^2 sigma^2; an absolute floor of 1e-12 on the
    # noise variance (sklearn's, for factor analysis) would pin it here
    X, Xm = _with_missing(rng, n=300)
    data, scale = (Xm if missing else X), 1e-8
    kw = dict(n_components=3, method="em", tol=1e-8, max_iter=500, random_state=0)
    ref, scaled = PPCA(**kw).fit(data), PPCA(**kw).fit(data * scale)
    assert scaled.noise_variance_ / scale**2 == pytest.approx(ref.noise_variance_, rel=1e-6)
    np.testing.assert_allclose(scaled.get_covariance() / scale**2, ref.get_covariance(),
                               rtol=1e-6, atol=1e-9)


def test_missing_data_fit_ignores_method(rng):
    _, Xm = _with_missing(rng, n=300)
    a = PPCA(2, random_state=0, max_iter=30).fit(Xm)
    b = PPCA(2, method="em", random_state=0, max_iter=30).fit(Xm)
    np.testing.assert_array_equal(a.components_, b.components_)


def test_missing_data_predictions_use_the_observed_entries(rng):
    from scipy.stats import multivariate_normal

    X, Xm = _with_missing(rng, n=400)
    m = PPCA(3, method="em", random_state=0, max_iter=50, tol=1e-4).fit(Xm)
    cov = m.get_covariance()
    scores, z = m.score_samples(Xm[:20]), m.transform(Xm[:20])
    for x, s, zz in zip(Xm[:20], scores, z):
        o = ~np.isnan(x)
        assert np.isclose(s, multivariate_normal(m.mean_[o], cov[np.ix_(o, o)]).logpdf(x[o]))
        w = m.components_[:, o]
        expected = np.linalg.solve(w @ w.T + m.noise_variance_ * np.eye(3),
                                   w @ (x[o] - m.mean_[o]))
        np.testing.assert_allclose(zz, expected, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("make, kw, match", [
    (lambda X: np.vstack([X, np.full(X.shape[1], np.nan)]), dict(method="em"),
     "every entry missing"),
    (lambda X: np.column_stack([X, np.r_[1.0, np.full(len(X) - 1, np.nan)]]),
     dict(method="em"), "observed in fewer than 2 rows"),
])
def test_missing_data_errors(make, kw, match, rng):
    _, Xm = _with_missing(rng, n=50)
    with pytest.raises(ValueError, match=match):
        PPCA(2, **kw).fit(make(Xm))


def test_partial_fit_after_a_missing_data_fit_says_why_it_cannot(rng):
    """A missing-data fit keeps no scatter matrix to add to: a clear error (it was an
    AttributeError), and the model is left as it was."""
    X = _data(rng, n=500)
    missing = X.copy()
    missing[0, 0] = np.nan
    model = PPCA(2).fit(missing)
    components = model.components_.copy()
    with pytest.raises(ValueError, match="missing entries"):
        model.partial_fit(X[:50])
    np.testing.assert_array_equal(model.components_, components)
    # nor does a batch with missing entries give sklearn's "does not accept
    # missing values" (PPCA.fit does accept them)
    streamed = PPCA(2).partial_fit(X[:50])
    for model in (PPCA(2), streamed):
        with pytest.raises(ValueError, match=r"partial_fit takes complete rows.*with fit"):
            model.partial_fit(missing[:50])
    assert not hasattr(PPCA(2), "n_features_in_") and streamed.n_samples_seen_ == 50


@pytest.mark.parametrize("method", ["closed_form", "em"])
@pytest.mark.parametrize("missing", [False, True])
def test_sample_weight_equals_repeated_rows(method, missing, rng):
    X = _data(rng, n=400, d=7)
    if missing:
        X[rng.random(X.shape) < 0.1] = np.nan
        X[np.isnan(X).all(axis=1), 0] = 1.0
    reps = rng.integers(0, 4, X.shape[0])
    params = dict(method=method, tol=1e-12, max_iter=5000, random_state=0)
    weighted = PPCA(2, **params).fit(X, sample_weight=reps * 1.5)  # the scale is free
    repeated = PPCA(2, **params).fit(np.repeat(X, reps, axis=0))
    np.testing.assert_allclose(weighted.mean_, repeated.mean_, rtol=1e-10)
    np.testing.assert_allclose(weighted.noise_variance_, repeated.noise_variance_, rtol=1e-9)
    np.testing.assert_allclose(weighted.components_, repeated.components_, atol=1e-7)
    np.testing.assert_allclose(weighted.lower_bound_, repeated.lower_bound_, rtol=1e-10)
    assert weighted.n_samples_seen_ == X.shape[0]


def test_weighted_partial_fit_equals_weighted_fit_with_batches_of_any_size(rng):
    X = _data(rng, n=600)
    w = rng.random(X.shape[0])
    whole = PPCA(3).fit(X, sample_weight=w)
    streamed = PPCA(3)
    for start, stop in ((0, 250), (250, 251), (251, 600)):  # a batch of one row too
        streamed.partial_fit(X[start:stop], sample_weight=w[start:stop])
    np.testing.assert_allclose(streamed.components_, whole.components_, atol=1e-10)
    np.testing.assert_allclose(streamed.noise_variance_, whole.noise_variance_, rtol=1e-12)
    assert streamed.n_samples_seen_ == whole.n_samples_seen_ == 600
    with pytest.raises(ValueError, match="sample_weight|Sample weights"):
        PPCA(3).fit(X, sample_weight=-w)


def test_a_fit_that_raises_leaves_the_model_as_it_was(rng):
    """The closed form finds data in a subspace after the running moments were
    replaced: they are put back, so a later partial_fit adds to the earlier
    fit's rows, not to the failed fit's."""
    X = _data(rng, n=300)
    model = PPCA(2).fit(X)
    state = dict(vars(model))
    with pytest.raises(ValueError, match="subspace"):
        model.fit(np.repeat(X[:2], 3, axis=0))
    assert vars(model).keys() == state.keys()
    assert all(vars(model)[k] is v for k, v in state.items())


@pytest.mark.parametrize("missing", [False, True])
@pytest.mark.parametrize("scale", [1 / 2000, 1e-100, 1e200])
def test_the_weights_scale_does_not_change_the_fit(scale, missing, rng):
    """PPCA's optimum does not depend on the weights' scale, and neither does the
    fit of float32 data: the EM kernels weigh rows in X's dtype, so they take
    the weights in units of a row.  Before, EM raised "Singular matrix" at
    weights of 1e-100 (float32 products of them are zero), blamed X for an
    overflow at 1e200, and the missing-data fit at weights summing to 1 took
    twice the iterations to a noise variance 8e-5 away."""
    X = _data(rng, n=2000, d=6, q=2, offset=100.0).astype(np.float32)
    if missing:
        X[::7, 2] = np.nan
    kw = dict(n_components=2, method="em", random_state=0)
    a = PPCA(**kw).fit(X)
    b = PPCA(**kw).fit(X, sample_weight=np.full(len(X), scale))
    assert b.n_iter_ == a.n_iter_
    # float32 products of other weights round otherwise; the noise variance is
    # what is left of the total variance (40x it here), so it keeps less of it
    assert b.noise_variance_ == pytest.approx(a.noise_variance_, rel=2e-5)
    np.testing.assert_allclose(b.components_, a.components_, rtol=1e-5, atol=1e-5)
    assert b.lower_bound_ == pytest.approx(a.lower_bound_, rel=1e-7)
