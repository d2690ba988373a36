"""BayesianGaussianMixture: sklearn's bound and attributes, sklearn's own tests,
stochastic VI, the full ELBO and the posterior predictive."""

import warnings

import numpy as np
import pytest
import sklearn.mixture.tests.test_bayesian_mixture as sklearn_tests
from scipy import special, stats
from scipy.special import logsumexp
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import BayesianGaussianMixture as SkBayesianGaussianMixture
from sklearn.utils.estimator_checks import check_estimator

from fastlvm import BayesianGaussianMixture
from fastlvm.mixture import _variational_params as vp
from tests.conftest import COVARIANCE_TYPES, HAS_TRITON, grouped_blobs, rebound

PRIOR_TYPES = ["dirichlet_process", "dirichlet_distribution"]


def blobs(rng, n=300, d=3, k=3, offset=0.0, dtype=np.float64):
    return grouped_blobs(rng, n, d, k, 5.0, offset, dtype)


def _fit_both(X, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return (SkBayesianGaussianMixture(**kw).fit(X), BayesianGaussianMixture(**kw).fit(X))


# sklearn's own BayesianGaussianMixture tests, run on fastlvm's class: each test
# function is rebuilt with the name BayesianGaussianMixture bound to ours (the
# tests of sklearn's private norm helpers, which never build the class, are left out).
SKLEARN_TESTS = sorted(name for name, f in vars(sklearn_tests).items()
                       if name.startswith("test_") and callable(f)
                       and "BayesianGaussianMixture" in f.__code__.co_names)
for _name in SKLEARN_TESTS:
    globals()["test_sklearn_" + _name[len("test_"):]] = rebound(
        getattr(sklearn_tests, _name), BayesianGaussianMixture=BayesianGaussianMixture)


def test_sklearn_suite_is_collected():
    assert len(SKLEARN_TESTS) >= 10, SKLEARN_TESTS


@pytest.mark.parametrize("init_params", ["kmeans", "random"])
@pytest.mark.parametrize("prior_type", PRIOR_TYPES)
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_bound_trajectory_and_attributes_match_sklearn(covariance_type, prior_type,
                                                       init_params, rng):
    X = blobs(rng)
    sk, fl = _fit_both(X, n_components=5, covariance_type=covariance_type,
                       weight_concentration_prior_type=prior_type, init_params=init_params,
                       random_state=0, max_iter=25, tol=0)
    np.testing.assert_allclose(fl.lower_bounds_, np.ravel(sk.lower_bounds_), rtol=1e-9)
    assert fl.lower_bound_ == pytest.approx(float(np.ravel(sk.lower_bound_)[0]), rel=1e-9)
    assert fl.n_iter_ == sk.n_iter_
    for attr in ("weights_", "means_", "covariances_", "precisions_", "precisions_cholesky_",
                 "mean_precision_", "degrees_of_freedom_", "mean_prior_", "covariance_prior_"):
        np.testing.assert_allclose(getattr(fl, attr), getattr(sk, attr), rtol=1e-7,
                                   atol=1e-10, err_msg=attr)
    np.testing.assert_allclose(np.asarray(fl.weight_concentration_),
                               np.asarray(sk.weight_concentration_), rtol=1e-9)
    np.testing.assert_array_equal(fl.predict(X), sk.predict(X))
    np.testing.assert_allclose(fl.predict_proba(X), sk.predict_proba(X), atol=1e-9)
    np.testing.assert_allclose(fl.score_samples(X), sk.score_samples(X), rtol=1e-9)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_converged_bound_equals_sklearn(covariance_type, rng):
    X = blobs(rng, n=600)
    sk, fl = _fit_both(X, n_components=6, covariance_type=covariance_type, random_state=2,
                       tol=1e-8, max_iter=500)
    assert fl.converged_ and sk.converged_
    assert fl.lower_bound_ == pytest.approx(float(np.ravel(sk.lower_bound_)[0]), rel=1e-6)


def test_float32_fit_is_close_to_float64(rng):
    X = blobs(rng, offset=1e3)
    f64 = BayesianGaussianMixture(n_components=3, random_state=0).fit(X)
    f32 = BayesianGaussianMixture(n_components=3, random_state=0).fit(X.astype(np.float32))
    np.testing.assert_allclose(f32.means_, f64.means_, rtol=1e-5)
    np.testing.assert_allclose(f32.covariances_, f64.covariances_, rtol=1e-3)
    assert f32.lower_bound_ == pytest.approx(f64.lower_bound_, rel=1e-5)


def test_sample_weight_equals_repeated_rows(rng):
    X = blobs(rng, n=150)
    w = rng.integers(0, 4, X.shape[0])
    w[:3] = 1  # every k-means seed row kept
    kw = dict(n_components=3, covariance_type="full", random_state=0, init_params="random",
              max_iter=15, tol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        weighted = BayesianGaussianMixture(**kw).fit(X, sample_weight=w)
        repeated = BayesianGaussianMixture(**kw).fit(np.repeat(X, w, axis=0))
    np.testing.assert_allclose(weighted.mean_prior_, repeated.mean_prior_, rtol=1e-12)
    np.testing.assert_allclose(weighted.covariance_prior_, repeated.covariance_prior_,
                               rtol=1e-12)
    # random init draws differ with n; compare fits from one start: warm-start both
    # from the repeated fit's parameters for one more iteration
    for model, data, sw in ((weighted, X, w), (repeated, np.repeat(X, w, axis=0), None)):
        model._set_parameters(repeated._get_parameters())
        model.set_params(warm_start=True, max_iter=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(data, sample_weight=sw)
    np.testing.assert_allclose(weighted.means_, repeated.means_, rtol=1e-9)
    np.testing.assert_allclose(weighted.lower_bound_, repeated.lower_bound_, rtol=1e-9)


def test_fit_predict_and_reproducible(rng):
    X = blobs(rng)
    a = BayesianGaussianMixture(n_components=4, random_state=3)
    labels = a.fit_predict(X)
    np.testing.assert_array_equal(labels, a.predict(X))
    b = BayesianGaussianMixture(n_components=4, random_state=3).fit(X)
    np.testing.assert_array_equal(a.means_, b.means_)


def test_passes_sklearn_check_estimator():
    failures = [r for r in check_estimator(BayesianGaussianMixture(), on_fail=None)
                if r["status"] == "failed"]
    assert not failures, [(r["check_name"], str(r["exception"])[:200]) for r in failures]


@pytest.mark.parametrize("params, match", [
    (dict(degrees_of_freedom_prior=0.5), "should be greater than 2"),
    (dict(mean_prior=[0.0, 1.0]), "'means' should have the shape"),
    (dict(covariance_prior=np.eye(2)), "'full covariance_prior' should have the shape"),
    (dict(covariance_prior=-np.eye(3)), "should be symmetric, positive-definite"),
    (dict(covariance_type="diag", covariance_prior=[1.0, -1.0, 1.0]), "should be positive"),
    (dict(covariance_type="spherical", covariance_prior=[1.0, 2.0]), "positive float"),
    (dict(weight_concentration_prior_type="beta"), "weight_concentration_prior_type"),
    (dict(weight_concentration_prior=0.0), "weight_concentration_prior"),
])
def test_bad_priors(params, match, rng):
    X = blobs(rng)
    with pytest.raises(ValueError, match=match):
        BayesianGaussianMixture(n_components=2, **params).fit(X)


def test_bad_input(rng):
    with pytest.raises(ValueError, match="NaN"):
        BayesianGaussianMixture().fit(np.array([[0.0, np.nan], [1.0, 2.0]]))
    with pytest.raises(ValueError, match="n_samples >= n_components"):
        BayesianGaussianMixture(n_components=5).fit(np.ones((3, 2)) + np.arange(3)[:, None])
    X = blobs(rng)
    with pytest.raises(ValueError, match="sample_weight must contain at least one positive"):
        BayesianGaussianMixture(n_components=2).fit(X, sample_weight=np.zeros(len(X)))
    w = np.full(len(X), 1e-3)
    with pytest.raises(ValueError, match="pass covariance_prior explicitly"):
        BayesianGaussianMixture(n_components=2).fit(X, sample_weight=w)
    fitted = BayesianGaussianMixture(n_components=2).fit(X)
    with pytest.raises(ValueError, match="X has 2 features"):
        fitted.predict(X[:, :2])


# ------------------------------------------------------------- stochastic VI
def _stream(model, X, batch, passes):
    for _ in range(passes):
        for start in range(0, X.shape[0], batch):
            model.partial_fit(X[start:start + batch])
    return model


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_svi_reaches_the_batch_elbo(covariance_type, rng):
    X = blobs(rng, n=6000, d=4, k=4)
    rng.shuffle(X)
    batch = BayesianGaussianMixture(n_components=4, covariance_type=covariance_type,
                                    random_state=0, max_iter=300).fit(X)
    svi = _stream(BayesianGaussianMixture(n_components=4, covariance_type=covariance_type,
                                          random_state=0, total_samples=len(X)), X, 500, 2)
    assert svi.n_steps_ == 24
    full, online = batch.elbo(X), svi.elbo(X)
    assert abs(online - full) < 0.01 * abs(full), (online, full)
    assert np.isfinite(svi.lower_bound_)


def test_svi_step_is_the_batch_update_when_rho_is_one(rng):
    # one step with rho = 1 on the whole data (batch = total) is one VB iteration
    X = blobs(rng)
    kw = dict(n_components=3, random_state=0, max_iter=1, tol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        vb = BayesianGaussianMixture(**kw).fit(X)
        svi = BayesianGaussianMixture(**kw).fit(X)  # same start, then one SVI step
    svi.set_params(total_samples=len(X), max_iter=2)
    vb.set_params(warm_start=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        vb.fit(X)
    svi.partial_fit(X)
    np.testing.assert_allclose(svi.means_, vb.means_, rtol=1e-10)
    np.testing.assert_allclose(svi.covariances_, vb.covariances_, rtol=1e-10)
    assert svi.lower_bound_ == pytest.approx(vb.lower_bound_, rel=1e-10)


def test_partial_fit_errors(rng):
    X = blobs(rng)
    with pytest.raises(ValueError, match="total_samples"):
        BayesianGaussianMixture(n_components=2, total_samples=0).partial_fit(X)
    model = BayesianGaussianMixture(n_components=2, total_samples=1000).partial_fit(X)
    with pytest.raises(ValueError, match="X has 2 features, but BayesianGaussianMixture is "
                                         "expecting 3 features"):
        model.partial_fit(X[:, :2])
    with pytest.raises(ValueError, match="n_samples >= n_components"):
        BayesianGaussianMixture(n_components=4, total_samples=10).partial_fit(X[:3])
    with pytest.raises(ValueError, match="infinity"):
        model.partial_fit(np.full((4, 3), np.inf))


# ------------------------------------------------------------- the full ELBO
def _random_posterior(rng, covariance_type, k=3, d=3):
    means = rng.standard_normal((k, d))
    beta = rng.uniform(2, 10, k)
    if covariance_type == "tied":
        nu = rng.uniform(d + 1, d + 8)
    else:
        nu = rng.uniform(d + 1, d + 8, k)
    if covariance_type in ("full", "tied"):
        kk = k if covariance_type == "full" else 1
        a = rng.standard_normal((kk, d, d))
        p = a @ a.swapaxes(1, 2) + d * np.eye(d)
        precisions = p if covariance_type == "full" else p[0]
        psi0 = np.cov(rng.standard_normal((50, d)).T)
    elif covariance_type == "diag":
        precisions = rng.uniform(0.5, 2.0, (k, d))
        psi0 = rng.uniform(0.5, 2.0, d)
    else:
        precisions = rng.uniform(0.5, 2.0, k)
        psi0 = 1.3
    priors = dict(mean_precision=1.5, mean=rng.standard_normal(d),
                  degrees_of_freedom=d + 0.5, covariance=psi0)
    return means, beta, nu, precisions, priors


def _full(matrix, covariance_type, k, d):
    return vp._as_full(matrix, covariance_type, k, d)


def _wishart_logpdf(lam, df, scale):
    """log W(lam | df, scale) of a stack (n, d, d) of draws, vectorised (scipy's
    logpdf factors every draw on its own: 4 s for 40000 draws)."""
    d = scale.shape[0]
    logdet_lam = np.linalg.slogdet(lam)[1]
    trace = np.einsum("ij,nji->n", np.linalg.inv(scale), lam)
    return (0.5 * (df - d - 1) * logdet_lam - 0.5 * trace - 0.5 * df * d * np.log(2.0)
            - 0.5 * df * np.linalg.slogdet(scale)[1] - special.multigammaln(0.5 * df, d))


@pytest.mark.parametrize("covariance_type", ["full", "tied"])
def test_normal_wishart_kl_matches_monte_carlo(covariance_type, rng):
    """The closed-form KL(q(mu, Lambda) || p(mu, Lambda)) against a Monte Carlo
    estimate, within five of the estimate's standard errors (one is about 0.06 of a
    KL near 90; a wrong constant or a misweighted term moves it by more)."""
    k, d, draws = 3, 3, 200000
    means, beta, nu, precisions, priors = _random_posterior(rng, covariance_type, k, d)
    exact = vp.kl_normal_wishart(means, beta, nu, precisions, priors, covariance_type)
    p = np.broadcast_to(_full(precisions, covariance_type, k, d), (k, d, d))
    nus = np.broadcast_to(nu, (k,))
    psi0 = _full(priors["covariance"], covariance_type, 1, d)[0]
    prior_df, prior_scale = priors["degrees_of_freedom"], np.linalg.inv(psi0)
    total = variance = 0.0
    for j in range(k):
        q_w = stats.wishart(df=nus[j], scale=p[j] / nus[j])
        lam = q_w.rvs(draws, random_state=rng)
        # the Gaussian part, given each Wishart draw
        diff = means[j] - priors["mean"]
        d_b = priors["mean_precision"] / beta[j]
        terms = 0.5 * (d * d_b - d - d * np.log(d_b)
                       + priors["mean_precision"] * np.einsum("i,nij,j->n", diff, lam, diff))
        if j == 0 or covariance_type == "full":  # the Wishart part, once when tied
            log_q = _wishart_logpdf(lam, nus[j], p[j] / nus[j])
            log_p = _wishart_logpdf(lam, prior_df, prior_scale)
            np.testing.assert_allclose(log_q[:20], q_w.logpdf(lam[:20].T), rtol=1e-10)
            np.testing.assert_allclose(
                log_p[:20], stats.wishart(df=prior_df, scale=prior_scale).logpdf(lam[:20].T),
                rtol=1e-10)
            terms = terms + (log_q - log_p)
        total += terms.mean()
        variance += terms.var() / draws
    assert abs(exact - total) <= 5 * np.sqrt(variance)


@pytest.mark.parametrize("prior_type", PRIOR_TYPES)
def test_weight_kl_matches_monte_carlo(prior_type, rng):
    if prior_type == "dirichlet_process":
        conc = (rng.uniform(1, 20, 4), rng.uniform(0.5, 30, 4))
        a, b = conc
        v = rng.beta(a, b, size=(200000, 4))
        mc = np.mean(np.sum(stats.beta(a, b).logpdf(v) - stats.beta(1.0, 0.7).logpdf(v), 1))
    else:
        conc = rng.uniform(0.5, 20, 4)
        pi = rng.dirichlet(conc, 200000)
        mc = np.mean(stats.dirichlet(conc).logpdf(pi.T) - stats.dirichlet(np.full(4, 0.7))
                     .logpdf(pi.T))
    assert vp.kl_weights(conc, 0.7, prior_type) == pytest.approx(mc, rel=0.02, abs=0.01)


def test_elbo_rises_with_every_vb_iteration(rng):
    X = blobs(rng, n=300)
    model = BayesianGaussianMixture(n_components=5, covariance_type="full", random_state=0,
                                    warm_start=True, max_iter=1, init_params="random")
    values = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for _ in range(15):
            values.append(model.fit(X).elbo(X))
    assert np.all(np.diff(values) >= -1e-8 * np.abs(values[1:])), np.diff(values)


@pytest.mark.parametrize("covariance_type", ["full", "tied", "diag"])
def test_elbo_refuses_an_improper_prior(covariance_type, rng):
    """A constant column makes the default covariance prior (the data
    covariance) singular: fitting works as in sklearn, the full bound would be
    -inf for every fit, so elbo says why and what to pass instead."""
    X = np.hstack([blobs(rng, n=120), np.full((120, 1), 3.0)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = BayesianGaussianMixture(n_components=2, covariance_type=covariance_type,
                                        random_state=0, max_iter=5).fit(X)
        assert np.isfinite(model.lower_bound_)
        with pytest.raises(ValueError, match="covariance_prior_ is singular"):
            model.elbo(X)
        cov = np.cov(X.T) + 1e-6 * np.eye(4)
        prior = cov if covariance_type != "diag" else np.diag(cov)
        proper = BayesianGaussianMixture(n_components=2, covariance_type=covariance_type,
                                         random_state=0, max_iter=5,
                                         covariance_prior=prior).fit(X)
    assert np.isfinite(proper.elbo(X))


# ------------------------------------------------------ posterior predictive
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_predictive_is_a_mixture_of_student_t(covariance_type, rng):
    X = blobs(rng, n=90, d=2)
    model = BayesianGaussianMixture(n_components=3, covariance_type=covariance_type,
                                    random_state=0).fit(X)
    Y = rng.standard_normal((7, 2)) * 4
    d, k = 2, 3
    nu = np.broadcast_to(model.degrees_of_freedom_, (k,))
    p = np.broadcast_to(_full(model.precisions_, covariance_type, k, d), (k, d, d))
    dof = nu + 1 - d
    parts = []
    for j in range(k):
        beta = model.mean_precision_[j]
        shape = np.linalg.inv(p[j] / nu[j] * dof[j] * beta / (1 + beta))
        parts.append(np.log(model.weights_[j])
                     + stats.multivariate_t(model.means_[j], shape, df=dof[j]).logpdf(Y))
    np.testing.assert_allclose(model.score_samples(Y, predictive=True),
                               logsumexp(parts, axis=0), rtol=1e-10)
    # ... unlike sklearn's plug-in score, it is a normalised density
    grid = np.linspace(-60, 60, 801)
    G = np.stack(np.meshgrid(grid, grid), -1).reshape(-1, 2)
    mass = np.exp(model.score_samples(G, predictive=True)).sum() * (grid[1] - grid[0]) ** 2
    assert mass == pytest.approx(1.0, abs=2e-3)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_a_vb_iteration_on_tensors_waits_for_the_device_once(covariance_type, weighted, rng,
                                                             torch_device_path):
    """A fit's iteration on torch tensors reads what the host needs (the bound's
    parts, N_k, beta_k, nu_k, the log-determinants, the covariance checks) back
    in one copy: it waited eight times (the log-likelihood and the entropy read
    one by one, the log-weights' round trip, N_k, beta_k, nu_k, the checks and
    the log-determinants copied one by one).  A ``partial_fit`` step reads the
    batch's checks in one copy (three reads) and its update in one, with, for
    the types the GPU kernels expand around one centre, the centre-loss check's
    parameters (three copies, then a copy of their own)."""
    torch = pytest.importorskip("torch")
    from tests import torch_graphs
    from tests.conftest import CUDA

    X = torch.as_tensor(blobs(rng, n=120), device="cuda" if CUDA else "cpu")
    sw = (torch.as_tensor(rng.random(120) + 0.5, device=X.device) if weighted else None)
    kw = dict(n_components=3, covariance_type=covariance_type, random_state=0, tol=0)
    waits, fits = torch_graphs.waits_beyond(
        lambda iterations: BayesianGaussianMixture(max_iter=iterations, **kw).fit(
            X, sample_weight=sw), 2, 5)
    assert waits == ["Tensor.numpy"] * 3, waits
    assert fits[1].lower_bounds_[:2] == fits[0].lower_bounds_
    model = BayesianGaussianMixture(total_samples=240, **kw).partial_fit(X, sample_weight=sw)
    with torch_graphs.counted_waits() as step_waits:
        model.partial_fit(X, sample_weight=sw)
    assert [str(w) for w in step_waits] == ["Tensor.numpy"] * 2


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("prior_type", PRIOR_TYPES)
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_vb_on_tensors_keeps_its_moments_on_the_device(covariance_type, prior_type, rng,
                                                       monkeypatch, torch_device_path):
    """The variational E-step is the EM kernel with other log-weights: a fit on
    torch tensors runs it on the Triton kernels (the interpreter on a CPU), and its
    M-step where the tensors are: only K-vectors (N_k, beta_k, nu_k, the
    log-determinants) and numbers come to the host, never K x D arrays."""
    torch = pytest.importorskip("torch")
    from fastlvm.mixture import _bayesian_mixture
    from tests.conftest import CUDA

    X = blobs(rng, n=120)
    kw = dict(n_components=3, covariance_type=covariance_type, random_state=0,
              weight_concentration_prior_type=prior_type, init_params="random_from_data",
              max_iter=5, tol=0)
    host_copies = []

    def reading(read):
        def read_noting_shapes(values):
            many = isinstance(values, (list, tuple))
            host_copies.extend(v.ndim for v in (values if many else [values])
                               if isinstance(v, torch.Tensor))
            return read(values)
        return read_noting_shapes

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        with monkeypatch.context() as host_path:
            host_path.delenv("FASTLVM_BACKEND", raising=False)
            host = BayesianGaussianMixture(**kw).fit(X)
        for name in ("to_numpy", "to_numpy_together"):
            monkeypatch.setattr(_bayesian_mixture, name,
                                reading(getattr(_bayesian_mixture, name)))
        dev = BayesianGaussianMixture(**kw).fit(
            torch.as_tensor(X, device="cuda" if CUDA else "cpu"))
    assert host_copies and max(host_copies) <= 1, host_copies
    assert isinstance(dev.means_, torch.Tensor)
    assert isinstance(dev.precisions_cholesky_, torch.Tensor)
    np.testing.assert_allclose(dev.lower_bounds_, host.lower_bounds_, rtol=1e-9)
    np.testing.assert_allclose(dev.means_.cpu().numpy(), host.means_, rtol=1e-8)
    np.testing.assert_allclose(dev.covariances_.cpu().numpy(), host.covariances_, rtol=1e-8)
    for name in ("mean_precision_", "degrees_of_freedom_"):
        assert type(getattr(dev, name)) is type(getattr(host, name)), name
        np.testing.assert_allclose(getattr(dev, name), getattr(host, name), rtol=1e-10)
