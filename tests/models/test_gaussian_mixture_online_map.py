"""GaussianMixture.partial_fit (online EM) and MAP-EM through prior=."""

import warnings

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning

from fastlvm import GaussianMixture
from fastlvm.kernels import estep_stats, gaussian_log_prob_ref
from fastlvm.mixture import _gaussian_params as gp
from fastlvm.mixture import _map_prior as map_prior
from tests.conftest import COVARIANCE_TYPES


def blobs(rng, n=3000, d=3, k=3, dtype=np.float64):
    centers = rng.standard_normal((k, d)) * 5
    X = centers[rng.integers(0, k, n)] + rng.standard_normal((n, d))
    return X.astype(dtype)


# ---------------------------------------------------------------- online EM
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_online_em_reaches_batch_em(covariance_type, dtype, rng):
    X = blobs(rng, n=8000, d=4, k=4, dtype=dtype)
    batch = GaussianMixture(4, covariance_type=covariance_type, random_state=0).fit(X)
    online = GaussianMixture(4, covariance_type=covariance_type, random_state=0)
    for _ in range(2):
        for start in range(0, len(X), 500):
            online.partial_fit(X[start:start + 500])
    assert online.n_steps_ == 32
    full, streamed = batch.score(X), online.score(X)
    assert abs(streamed - full) <= 0.005 * abs(full), (streamed, full)
    assert np.isfinite(online.lower_bound_)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_first_online_step_on_all_rows_is_an_em_iteration(dtype, rng):
    """Also in float32, where the M-step's 10 eps against empty components is
    1.2e-6 a row: the online statistics (averages over the batch) take it in
    rows too.  Taken against averages that sum to 1, it moved the means 3.6e-6."""
    X = blobs(rng, n=600, dtype=dtype)
    rtol = 1e-10 if dtype == np.float64 else 2.5e-7  # one float32 rounding of each
    kw = dict(n_components=3, random_state=0, max_iter=1, tol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        em = GaussianMixture(**kw).fit(X)
        online = GaussianMixture(**kw).fit(X)
        em.set_params(warm_start=True).fit(X)
    online.partial_fit(X)  # rho = 1 after fit: the M-step of one full pass
    for attr in ("weights_", "means_", "covariances_"):
        np.testing.assert_allclose(getattr(online, attr), getattr(em, attr), rtol=rtol)
    assert online.lower_bound_ == pytest.approx(em.lower_bound_, rel=1e-12)


@pytest.mark.parametrize("scale", [1e-50, 1e-20, 1e30])
def test_online_steps_do_not_depend_on_the_weights_scale(scale, rng):
    """Float32 batches weighted by a common factor step as unweighted ones, the
    first (the initialisation) included: the weights are taken in units of a
    row.  Counted in their own units, weights of 1e-20 started the model from
    means near 0 (the 10 eps against empty components, 1.2e-6, dwarfed every
    N_k) and ended 6 away; at 1e-50 the float32 E-step weighed every row 0.
    The weight seen (the MAP step's row count, for a prior set later) stays in
    the caller's units."""
    X = blobs(rng, n=2000, dtype=np.float32)
    a = GaussianMixture(3, random_state=0)
    b = GaussianMixture(3, random_state=0)
    for start in range(0, len(X), 500):
        a.partial_fit(X[start:start + 500])
        b.partial_fit(X[start:start + 500], sample_weight=np.full(500, scale))
    np.testing.assert_allclose(b.means_, a.means_, rtol=1e-6, atol=1e-6)
    assert b.lower_bound_ == pytest.approx(a.lower_bound_, rel=1e-7)
    assert b._seen_weight == pytest.approx(scale * a._seen_weight, rel=1e-6)


def test_online_steps_blend_with_the_step_size(rng):
    X = blobs(rng, n=400)
    a, b = X[:200], X[200:]
    model = GaussianMixture(2, covariance_type="diag", random_state=0, learning_offset=3.0,
                            learning_decay=0.6).partial_fit(a)
    means0 = model.means_.copy()
    stats_b = estep_stats(b, model.weights_, model.means_, model.precisions_cholesky_, "diag")
    stats_a = model._running_statistics
    rho = (1 + 3.0) ** -0.6
    nk = (1 - rho) * stats_a.nk + rho * stats_b.nk / len(b)
    sum_x = (1 - rho) * stats_a.sum_x + rho * stats_b.sum_x / len(b)
    model.partial_fit(b)
    np.testing.assert_allclose(model.means_, sum_x / (nk + 10 * np.finfo(float).eps)[:, None],
                               rtol=1e-10)
    assert not np.allclose(model.means_, means0)


def test_partial_fit_errors(rng):
    X = blobs(rng, n=100)
    model = GaussianMixture(2).partial_fit(X)
    with pytest.raises(ValueError, match="X has 2 features, but GaussianMixture is expecting 3"):
        model.partial_fit(X[:, :2])
    with pytest.raises(ValueError, match="NaN"):
        model.partial_fit(np.full((3, 3), np.nan))
    with pytest.raises(ValueError, match="n_samples >= n_components"):
        GaussianMixture(5).partial_fit(X[:2])
    with pytest.raises(ValueError, match="total_samples"):
        GaussianMixture(2, prior={}, total_samples=0).partial_fit(X)
    with pytest.raises(ValueError, match="prior\\['mean'\\]"):
        GaussianMixture(2, prior={"mean": [0.0]}).partial_fit(X)
    with pytest.raises(ValueError, match="learning_decay"):
        GaussianMixture(2, learning_decay=0.3).partial_fit(X)


# ------------------------------------------------------------------- MAP-EM
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_first_online_map_step_on_all_rows_is_a_map_em_iteration(covariance_type, rng):
    """rho = 1 after fit, n = the batch's weight: partial_fit(X) is fit's
    MAP-EM iteration, weights included, and records the same MAP objective."""
    X = blobs(rng, n=600)
    w = rng.uniform(0.5, 2.0, len(X))
    kw = dict(n_components=3, covariance_type=covariance_type, random_state=0, max_iter=1,
              tol=0, prior={"weight_concentration": 2.0})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        em = GaussianMixture(**kw).fit(X, sample_weight=w)
        online = GaussianMixture(**kw).fit(X, sample_weight=w)
        em.set_params(warm_start=True).fit(X, sample_weight=w)
    online.partial_fit(X, sample_weight=w)
    for attr in ("weights_", "means_", "covariances_"):
        np.testing.assert_allclose(getattr(online, attr), getattr(em, attr), rtol=1e-10)
    assert online.lower_bound_ == pytest.approx(em.lower_bound_, rel=1e-12)
    # a different data-set size weighs the prior differently
    online.set_params(total_samples=60.0).partial_fit(X, sample_weight=w)
    assert not np.allclose(online.covariances_, em.covariances_, rtol=1e-3)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_online_map_em_reaches_batch_map_em(covariance_type, rng):
    X = blobs(rng, n=8000, d=4, k=4)
    kw = dict(n_components=4, covariance_type=covariance_type, random_state=0,
              prior={"weight_concentration": 2.0, "mean_precision": 0.1})
    batch = GaussianMixture(**kw).fit(X)
    online = GaussianMixture(total_samples=len(X), **kw)
    for _ in range(2):
        for start in range(0, len(X), 500):
            online.partial_fit(X[start:start + 500])
    # the prior's defaults come from the first batch, close to the data's
    np.testing.assert_allclose(online.prior_["mean"], batch.prior_["mean"], atol=0.5)
    full, streamed = batch.score(X), online.score(X)
    assert abs(streamed - full) <= 0.005 * abs(full), (streamed, full)


def test_online_map_em_keeps_a_collapsing_component_finite(rng):
    X = np.vstack([blobs(rng, n=200), np.full((6, 3), 40.0)])  # six identical rows
    with pytest.raises(ValueError, match="ill-defined empirical covariance"):
        GaussianMixture(4, reg_covar=0.0, random_state=0).partial_fit(X)
    model = GaussianMixture(4, reg_covar=0.0, random_state=0, prior={})
    for _ in range(3):
        model.partial_fit(X)
    assert np.all(np.isfinite(model.covariances_))
    assert np.all(np.linalg.eigvalsh(model.covariances_) > 0)


def test_partial_fit_with_a_prior_after_a_plain_fit(rng):
    X = blobs(rng, n=600)
    model = GaussianMixture(3, random_state=0).fit(X)
    assert not hasattr(model, "prior_")
    model.set_params(prior={}).partial_fit(X[:300])
    assert model.prior_["mean"] == pytest.approx(X[:300].mean(axis=0))
    assert np.isfinite(model.lower_bound_)
    model.set_params(prior=None).fit(X)
    assert not hasattr(model, "prior_")


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_map_em_raises_the_map_objective_every_iteration(covariance_type, rng):
    X = blobs(rng, n=300)
    model = GaussianMixture(5, covariance_type=covariance_type, random_state=0, tol=0,
                            max_iter=60, prior={"weight_concentration": 2.0})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(X)
    steps = np.diff(model.lower_bounds_)
    assert np.all(steps >= -1e-10), steps.min()


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_map_m_step_maximises_the_expected_log_posterior(covariance_type, rng):
    """The closed form beats every nearby parameter value on
    E_r[log p(X, Z | theta)] + log p(theta), the M-step's objective."""
    X = blobs(rng, n=200)
    model = GaussianMixture(3, covariance_type=covariance_type, random_state=0, max_iter=3,
                            prior={"weight_concentration": 1.5})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(X)
    resp = model.predict_proba(X)
    s = estep_stats(X, model.weights_, model.means_, model.precisions_cholesky_,
                    covariance_type)
    w, m, c = map_prior.map_parameters_from_stats(s.nk, s.sum_x, s.second_moment, s.center,
                                                  covariance_type, 0.0, 0.0, model.prior_)

    def objective(w, m, c):
        pc = gp.precision_cholesky(c, covariance_type)
        log_density = gaussian_log_prob_ref(X, m, pc, covariance_type)
        return (np.sum(resp * (np.log(w) + log_density))
                + map_prior.log_prior_density(w, m, c, pc, covariance_type, model.prior_))

    best = objective(w, m, c)
    for _ in range(10):
        dm = m + 1e-3 * rng.standard_normal(m.shape)
        dc = c * np.exp(1e-3 * rng.standard_normal(np.shape(c))) if covariance_type in (
            "diag", "spherical") else c + 1e-3 * np.eye(c.shape[-1])
        dw = w * np.exp(1e-3 * rng.standard_normal(w.shape))
        dw /= dw.sum()
        assert objective(dw, dm, dc) < best


def test_prior_keeps_a_collapsing_component_finite(rng):
    X = np.vstack([blobs(rng, n=200), np.full((6, 3), 40.0)])  # six identical rows
    with pytest.raises(ValueError, match="ill-defined empirical covariance"):
        GaussianMixture(4, reg_covar=0.0, random_state=0).fit(X)
    model = GaussianMixture(4, reg_covar=0.0, random_state=0, prior={}).fit(X)
    assert np.all(np.isfinite(model.covariances_))
    assert np.all(np.linalg.eigvalsh(model.covariances_) > 0)


def test_weak_prior_approaches_maximum_likelihood(rng):
    X = blobs(rng, n=5000)
    ml = GaussianMixture(3, random_state=0, tol=1e-10, max_iter=500).fit(X)
    weak = GaussianMixture(3, random_state=0, tol=1e-10, max_iter=500,
                           prior={"mean_precision": 1e-8, "degrees_of_freedom": 2.0 + 1e-6,
                                  "covariance": 1e-8 * np.eye(3)}).fit(X)
    np.testing.assert_allclose(weak.means_, ml.means_, rtol=1e-5, atol=1e-6)
    # the mode's denominator is N_k + nu_0 + D + 2, not N_k
    nk = ml.weights_ * len(X)
    expected = ml.covariances_ * (nk / (nk + 2.0 + 3 + 2))[:, None, None]
    np.testing.assert_allclose(weak.covariances_, expected, rtol=1e-4, atol=3e-5)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_default_prior_with_a_constant_column(covariance_type, rng):
    """A constant column leaves the data covariance singular: the default
    Psi_0 takes reg_covar on its diagonal, so fit and partial_fit stay finite;
    with reg_covar=0 the error says what to do ('spherical' uses the mean
    variance, which stays positive)."""
    X = np.hstack([blobs(rng, n=300), np.full((300, 1), 2.0)])
    kw = dict(n_components=3, covariance_type=covariance_type, random_state=0, prior={})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = GaussianMixture(max_iter=20, **kw).fit(X)
    assert np.isfinite(model.lower_bound_) and np.all(np.isfinite(model.lower_bounds_))
    online = GaussianMixture(**kw).partial_fit(X[:150]).partial_fit(X[150:])
    assert np.isfinite(online.lower_bound_)
    if covariance_type == "spherical":  # the mean variance: positive all the same
        assert np.isfinite(GaussianMixture(reg_covar=0.0, max_iter=5, **kw).fit(X)
                           .prior_["covariance"])
        return
    with pytest.raises(ValueError, match="Set reg_covar > 0, pass prior\\['covariance'\\]"):
        GaussianMixture(reg_covar=0.0, **kw).fit(X)


@pytest.mark.parametrize("prior, match", [
    ({"shrinkage": 1.0}, "unknown keys"),
    ({"weight_concentration": 0.5}, "must be >= 1"),
    ({"mean_precision": -1.0}, "mean_precision'\\] must be a positive number"),
    ({"mean": [0.0, 1.0]}, "shape \\(3,\\)"),
    ({"covariance": -np.eye(3)}, "symmetric positive definite"),
    ({"degrees_of_freedom": 1.0}, "must be > n_features - 1"),
])
def test_bad_prior(prior, match, rng):
    with pytest.raises(ValueError, match=match):
        GaussianMixture(2, prior=prior).fit(blobs(rng, n=50))


def _scipy_log_prior(weights, means, covariances, covariance_type, prior):
    """log p(theta) by scipy.stats' densities, term by term."""
    from scipy import stats
    from scipy.special import gammaln

    k, d = means.shape
    alpha, kappa0 = prior["weight_concentration"], prior["mean_precision"]
    nu0, mu0, psi0 = prior["degrees_of_freedom"], prior["mean"], prior["covariance"]
    out = gammaln(k * alpha) - k * gammaln(alpha) + (alpha - 1.0) * np.sum(np.log(weights))
    if covariance_type in ("full", "tied"):
        covs = covariances if covariance_type == "full" else [covariances] * k
        if covariance_type == "tied":
            out += stats.invwishart.logpdf(covariances, df=nu0, scale=psi0)
        for m, c in zip(means, covs):
            if covariance_type == "full":
                out += stats.invwishart.logpdf(c, df=nu0, scale=psi0)
            out += stats.multivariate_normal.logpdf(m, mu0, c / kappa0)
        return out
    var = covariances if covariance_type == "diag" else covariances[:, None] * np.ones(d)
    if covariance_type == "diag":
        out += np.sum(stats.invgamma.logpdf(var, a=0.5 * nu0, scale=0.5 * psi0))
    else:
        out += np.sum(stats.invgamma.logpdf(covariances, a=0.5 * nu0, scale=0.5 * psi0))
    return out + np.sum(stats.norm.logpdf(means, mu0, np.sqrt(var / kappa0)))


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_log_prior_density_is_scipys_on_every_array_kind(covariance_type, rng):
    """The written-out densities equal scipy.stats' on NumPy arrays; on torch tensors the
    M-step and the density give NumPy's numbers (the device path's code)."""
    X = blobs(rng, n=200)
    model = GaussianMixture(3, covariance_type=covariance_type, random_state=0, max_iter=3,
                            prior={"weight_concentration": 1.5, "degrees_of_freedom": 7.0})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(X)
    params = (model.weights_, model.means_, model.covariances_, model.precisions_cholesky_)
    got = map_prior.log_prior_density(*params, covariance_type, model.prior_)
    want = _scipy_log_prior(*params[:3], covariance_type, model.prior_)
    assert got == pytest.approx(want, rel=1e-10)
    torch = pytest.importorskip("torch")
    tensors = [torch.as_tensor(a) for a in params]
    assert map_prior.log_prior_density(*tensors, covariance_type, model.prior_) == (
        pytest.approx(got, rel=1e-12))
    s = estep_stats(X, *params[:2], model.precisions_cholesky_, covariance_type)
    stats = (s.nk, s.sum_x, s.second_moment, s.center)
    host = map_prior.map_parameters_from_stats(*stats, covariance_type, 1e-6, 1e-16,
                                               model.prior_)
    device = map_prior.map_parameters_from_stats(*(torch.as_tensor(a) for a in stats),
                                                 covariance_type, 1e-6, 1e-16, model.prior_)
    for a, b in zip(device, host):
        assert isinstance(a, torch.Tensor) and a.dtype == torch.float64
        np.testing.assert_allclose(a.numpy(), b, rtol=1e-12, atol=1e-14)
