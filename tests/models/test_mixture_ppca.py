import numpy as np
import pytest
from scipy.special import logsumexp
from sklearn.exceptions import ConvergenceWarning, NotFittedError
from sklearn.utils.estimator_checks import check_estimator

from fastlvm import PPCA, MixtureOfPPCA
from fastlvm.kernels import mppca_log_prob_ref, mppca_stats_ref
from fastlvm.kernels.mppca_stats import MPPCAStats
from fastlvm.mixture import _mppca_params as mp
from tests.conftest import CUDA, HAS_TRITON, kernel_rows_per_call


def planted(rng, n=3000, d=12, k=3, q=2, noise=0.25, offset=0.0):
    """Rows from K well-separated PPCA components; returns X, labels, truth."""
    means = rng.standard_normal((k, d)) * 12 + offset
    comps = rng.standard_normal((k, q, d)) * 3
    labels = np.arange(n) % k
    X = (means[labels] + np.einsum("nq,nqd->nd", rng.standard_normal((n, q)), comps[labels])
         + np.sqrt(noise) * rng.standard_normal((n, d)))
    return X, labels, (means, comps, noise)


def _subspace_gap(a, b):
    """Largest principal angle's sine between the row spaces of a and b (q, D)."""
    qa, _ = np.linalg.qr(a.T)
    qb, _ = np.linalg.qr(b.T)
    return np.linalg.norm(qb - qa @ (qa.T @ qb), 2)


def test_recovers_planted_components(rng):
    X, labels, (means, comps, noise) = planted(rng)
    m = MixtureOfPPCA(3, n_latent=2, random_state=0, tol=1e-8, max_iter=500).fit(X)
    assert m.converged_
    order = [int(np.argmin(((m.means_ - mu) ** 2).sum(1))) for mu in means]
    assert sorted(order) == [0, 1, 2]
    np.testing.assert_allclose(m.means_[order], means, atol=0.2)
    np.testing.assert_allclose(m.noise_variance_, noise, rtol=0.1)
    for j, k in enumerate(order):
        assert _subspace_gap(m.components_[k], comps[j]) < 0.05
    assert (m.predict(X) == np.array(order)[labels]).mean() == 1.0


def test_lower_bound_never_decreases(rng):
    X, _, _ = planted(rng, k=4, q=3)
    m = MixtureOfPPCA(4, n_latent=3, init_params="random", random_state=1, tol=0,
                      max_iter=60)
    with pytest.warns(ConvergenceWarning):
        m.fit(X)
    assert np.all(np.diff(m.lower_bounds_) >= -1e-10 * abs(m.lower_bounds_[-1]))


@pytest.mark.parametrize("reg_covar", [1e-6, 1e-3])
def test_em_ascends_where_reg_covar_holds_a_noise_variance(reg_covar):
    # 6 rows span 5 dimensions, fewer than q = 8: the noise variance sits at
    # reg_covar.  Added to sigma^2 after each M-step (whose update depends on
    # sigma^2), it compounded, and the bound fell 1.6 nats per row over 30 steps.
    X = np.random.default_rng(0).standard_normal((6, 9))
    m = MixtureOfPPCA(1, n_latent=8, tol=0, max_iter=30, reg_covar=reg_covar,
                      random_state=0)
    with pytest.warns(ConvergenceWarning):
        m.fit(X)
    assert np.all(np.diff(m.lower_bounds_) >= -1e-10 * abs(m.lower_bounds_[-1]))
    assert m.noise_variance_[0] == reg_covar


def test_one_component_reaches_the_ppca_optimum(rng):
    X, _, _ = planted(rng, k=1, q=3, n=2000)
    m = MixtureOfPPCA(1, n_latent=3, tol=1e-12, max_iter=2000, reg_covar=0.0,
                      random_state=0).fit(X)
    p = PPCA(3).fit(X)
    assert np.isclose(m.score(X), p.score(X), rtol=1e-9)
    np.testing.assert_allclose(m.noise_variance_[0], p.noise_variance_, rtol=1e-6)
    np.testing.assert_allclose(m.get_covariances()[0], p.get_covariance(), atol=1e-6)


def test_mstep_equals_tipping_bishop_with_explicit_covariance(rng):
    """The statistics-only M-step equals appendix C's formulas with S formed."""
    X, _, _ = planted(rng, n=500, d=7, k=2, q=2)
    w = np.array([0.4, 0.6])
    means = X[[0, 1]] + 0.5
    comps = rng.standard_normal((2, 2, 7))
    noise = np.array([0.5, 2.0])
    stats = MPPCAStats(*mppca_stats_ref(X, w, means, comps, noise))
    weights, new_means, new_comps, new_noise = mp.parameters_from_stats(
        stats, comps, noise, 0.0, 0.0)
    wlp = mppca_log_prob_ref(X, means, comps, noise) + np.log(w)
    resp = np.exp(wlp - logsumexp(wlp, axis=1, keepdims=True))
    for k in range(2):
        r = resp[:, k]
        mu = r @ X / r.sum()
        S = ((X - mu) * r[:, None]).T @ (X - mu) / r.sum()
        A = comps[k].T
        m_inv = np.linalg.inv(A.T @ A + noise[k] * np.eye(2))
        A_new = S @ A @ np.linalg.inv(noise[k] * np.eye(2) + m_inv @ A.T @ S @ A)
        s2 = np.trace(S - S @ A @ m_inv @ A_new.T) / 7
        np.testing.assert_allclose(weights[k], r.mean(), rtol=1e-12)
        np.testing.assert_allclose(new_means[k], mu, rtol=1e-12)
        np.testing.assert_allclose(new_comps[k], A_new.T, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(new_noise[k], s2, rtol=1e-9)


def test_score_samples_is_the_mixture_density(rng):
    X, _, _ = planted(rng, n=600)
    m = MixtureOfPPCA(3, n_latent=2, random_state=0).fit(X)
    wlp = mppca_log_prob_ref(X, m.means_, m.components_, m.noise_variance_) + np.log(
        m.weights_)
    np.testing.assert_allclose(m.score_samples(X), logsumexp(wlp, axis=1), rtol=1e-12)
    np.testing.assert_allclose(m.predict_proba(X),
                               np.exp(wlp - logsumexp(wlp, axis=1, keepdims=True)),
                               atol=1e-12)
    np.testing.assert_array_equal(m.predict(X), wlp.argmax(1))


@pytest.mark.parametrize("init_params", ["kmeans", "k-means++", "random", "random_from_data"])
def test_fit_predict_equals_fit_then_predict(init_params, rng):
    X, _, _ = planted(rng, n=900)
    a = MixtureOfPPCA(3, init_params=init_params, random_state=3).fit_predict(X)
    b = MixtureOfPPCA(3, init_params=init_params, random_state=3).fit(X).predict(X)
    np.testing.assert_array_equal(a, b)


def test_same_seed_same_bits_and_best_of_restarts(rng):
    X, _, _ = planted(rng, n=900)
    a = MixtureOfPPCA(3, init_params="random", random_state=5, n_init=3).fit(X)
    b = MixtureOfPPCA(3, init_params="random", random_state=5, n_init=3).fit(X)
    assert np.array_equal(a.components_, b.components_) and a.lower_bound_ == b.lower_bound_
    singles = [MixtureOfPPCA(3, init_params="random", random_state=s).fit(X).lower_bound_
               for s in range(2)]
    assert a.lower_bound_ >= min(singles) - 1e-12


def test_integer_sample_weights_equal_repeated_rows(rng):
    X, _, _ = planted(rng, n=300)
    sw = rng.integers(0, 3, X.shape[0])
    kw = dict(n_components=3, n_latent=2, init_params="random", random_state=0, max_iter=5)
    a = MixtureOfPPCA(**kw)
    a._em_initialize(X, sw.astype(float), np.random.RandomState(0))
    b = MixtureOfPPCA(**kw)
    b._set_parameters(a._get_parameters())
    for _ in range(3):
        la = a._em_iteration(X, sw.astype(float))
        lb = b._em_iteration(np.repeat(X, sw, axis=0), None)
        assert np.isclose(la, lb, rtol=1e-12)
    np.testing.assert_allclose(a.components_, b.components_, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("scale", [1 / 2000, 1e-300])
def test_the_weights_scale_does_not_change_the_fit(scale, rng):
    """As GaussianMixture's: weights in units of a row, so the 10 eps added to
    each N_k stays a row's worth whatever their scale."""
    X, _, _ = planted(rng, n=2000, offset=500.0)
    X = X.astype(np.float32)
    kw = dict(n_components=3, random_state=0, tol=1e-6)
    a = MixtureOfPPCA(**kw).fit(X, sample_weight=np.ones(len(X)))
    b = MixtureOfPPCA(**kw).fit(X, sample_weight=np.full(len(X), scale))
    np.testing.assert_allclose(b.means_, a.means_, rtol=3e-7)
    np.testing.assert_allclose(b.weights_, a.weights_, rtol=1e-6)
    assert b.lower_bound_ == pytest.approx(a.lower_bound_, rel=1e-6)


def test_float32_fit_tracks_float64(rng):
    X, _, _ = planted(rng, n=2000, offset=500.0)
    a = MixtureOfPPCA(3, random_state=0, max_iter=20, tol=0)
    b = MixtureOfPPCA(3, random_state=0, max_iter=20, tol=0)
    with pytest.warns(ConvergenceWarning):
        a.fit(X)
        b.fit(X.astype(np.float32))
    assert np.isclose(a.lower_bound_, b.lower_bound_, rtol=1e-4)
    np.testing.assert_allclose(a.noise_variance_, b.noise_variance_, rtol=1e-3)


def test_chunking_does_not_change_the_fit(rng):
    X, _, _ = planted(rng, n=1000)
    a = MixtureOfPPCA(3, random_state=0, chunk_size=137).fit(X)
    b = MixtureOfPPCA(3, random_state=0).fit(X)
    assert a.n_iter_ == b.n_iter_
    np.testing.assert_allclose(a.lower_bounds_, b.lower_bounds_, rtol=1e-12)


def test_estep_takes_a_host_array_in_one_call_unless_chunk_size_is_set(rng, monkeypatch):
    """Each call of the E-step kernel pays its set-up (the pruning bounds, their
    probe) and a part-idle last group of tiles, so fit's E-step hands a host
    array over whole, as GaussianMixture's does; ``chunk_size`` still splits it."""
    from fastlvm.kernels.mppca_stats import IMPLEMENTATIONS

    # a default smaller than the data: the initialisation and predictions use it
    rows = kernel_rows_per_call(monkeypatch, IMPLEMENTATIONS, 500)
    X, _, _ = planted(rng, n=2000)
    m = MixtureOfPPCA(3, random_state=0, max_iter=2, tol=0)
    with pytest.warns(ConvergenceWarning):
        m.fit(X)
    assert rows and set(rows) == {X.shape[0]}
    rows.clear()
    with pytest.warns(ConvergenceWarning):
        m.set_params(chunk_size=333).fit(X)
    assert rows and max(rows) == 333 and sum(rows) == 2 * X.shape[0]


def test_pruned_fit_carries_anchor_hints_and_stays_reproducible(rng, monkeypatch):
    """On separated components the Numba E-step keeps each row's anchor from one
    iteration to the next (from the second iteration on, the hints it gets are
    set); a fit with them follows the dense fit's bounds to rounding, gives
    the same bits twice, in chunks too, and leaves no hints behind."""
    from fastlvm.kernels.mppca_stats import IMPLEMENTATIONS

    numba_stats = IMPLEMENTATIONS["numba"]
    # thin components far apart: the pruning bound clears nearly every row
    n, d, k, q = 6000, 8, 6, 2
    means = rng.standard_normal((k, d)) * 10
    comps = rng.standard_normal((k, q, d)) * 0.7
    labels = np.arange(n) % k
    X = (means[labels] + np.einsum("nq,nqd->nd", rng.standard_normal((n, q)), comps[labels])
         + 0.5 * rng.standard_normal((n, d)))
    seen = []

    def spy(*args, anchors=None, **kw):
        seen.append(None if anchors is None else (anchors >= 0).mean())
        return numba_stats(*args, anchors=anchors, **kw)

    monkeypatch.setitem(IMPLEMENTATIONS, "numba", spy)
    kw = dict(n_components=6, n_latent=2, random_state=0, max_iter=8, tol=0)
    with pytest.warns(ConvergenceWarning):
        a = MixtureOfPPCA(**kw).fit(X)
    assert len(seen) == 8 and seen[0] == 0.0 and min(seen[1:]) > 0.9
    assert not hasattr(a, "_anchor_hints")
    with pytest.warns(ConvergenceWarning):
        b = MixtureOfPPCA(**kw).fit(X)
        c = MixtureOfPPCA(chunk_size=2500, **kw).fit(X)
    np.testing.assert_array_equal(a.lower_bounds_, b.lower_bounds_)
    np.testing.assert_array_equal(a.components_, b.components_)
    np.testing.assert_allclose(c.lower_bounds_, a.lower_bounds_, rtol=1e-12)

    def dense(*args, anchors=None, **kw):
        return numba_stats(*args, prune=False, **kw)

    monkeypatch.setitem(IMPLEMENTATIONS, "numba", dense)
    with pytest.warns(ConvergenceWarning):
        d = MixtureOfPPCA(**kw).fit(X)
    np.testing.assert_allclose(a.lower_bounds_, d.lower_bounds_, rtol=1e-12)
    np.testing.assert_allclose(a.components_, d.components_, rtol=1e-8, atol=1e-10)


def test_sample_follows_the_model(rng):
    X, _, _ = planted(rng, n=900)
    m = MixtureOfPPCA(3, random_state=0).fit(X)
    S, y = m.sample(20_000)
    assert S.shape == (20_000, 12) and np.bincount(y, minlength=3).sum() == 20_000
    np.testing.assert_allclose(np.bincount(y) / 20_000, m.weights_, atol=0.02)
    for k in range(3):
        np.testing.assert_allclose(np.cov(S[y == k].T), m.get_covariances()[k], atol=1.5)


def test_bic_aic_count_parameters(rng):
    X, _, _ = planted(rng, n=600)
    m = MixtureOfPPCA(3, n_latent=2, random_state=0).fit(X)
    n_par = 2 + 3 * (12 + (12 * 2 - 1) + 1)
    assert np.isclose(m.bic(X), -2 * m.score(X) * 600 + n_par * np.log(600))
    assert np.isclose(m.aic(X), -2 * m.score(X) * 600 + 2 * n_par)


def test_passes_sklearn_check_estimator():
    failures = [r for r in check_estimator(MixtureOfPPCA(n_latent=1), on_fail=None)
                if r["status"] == "failed"]
    assert not failures, [(r["check_name"], str(r["exception"])[:200]) for r in failures]


@pytest.mark.parametrize("X, kw, match", [
    (np.ones((5, 3)), dict(n_latent=3), "n_latent must be smaller than n_features"),
    (np.ones((2, 3)), dict(n_components=3, n_latent=1), "n_samples >= n_components"),
    (np.array([[1.0, np.nan, 0], [0, 1, 2], [2, 2, 2]]), dict(n_latent=1), "NaN"),
])
def test_bad_input(X, kw, match):
    with pytest.raises(ValueError, match=match):
        MixtureOfPPCA(**kw).fit(X)


def test_predict_before_fit():
    with pytest.raises(NotFittedError):
        MixtureOfPPCA().predict(np.ones((2, 3)))


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_wide_rows_fit_and_predict_on_torch_tensors_as_on_the_host(monkeypatch,
                                                                   torch_device_path):
    """D = 200 (rows of 256 padded features, past the fused kernels' 128): fit,
    score, score_samples, predict and predict_proba on torch tensors through the
    Triton kernels that step through the features (``_triton_low_rank_wide.py``),
    the same as the host fit's."""
    torch = pytest.importorskip("torch")
    from fastlvm.kernels import _triton_low_rank_wide as wide

    device = "cuda" if CUDA else "cpu"
    rng = np.random.default_rng(0)
    X = np.vstack([rng.standard_normal((40, 200)) + 3, rng.standard_normal((40, 200)) - 3])
    kw = dict(n_components=2, n_latent=3, random_state=0, max_iter=3, tol=0)
    with pytest.warns(ConvergenceWarning), monkeypatch.context() as host_path:
        host_path.delenv("FASTLVM_BACKEND", raising=False)
        host = MixtureOfPPCA(**kw).fit(X)
        want = (host.score(X), host.score_samples(X), host.predict(X), host.predict_proba(X))
    launches = []
    log_prob = wide.WideLogDensities._log_prob
    monkeypatch.setattr(wide.WideLogDensities, "_log_prob",
                        lambda self, *a: launches.append(1) or log_prob(self, *a))
    Xt = torch.as_tensor(X, device=device)
    with pytest.warns(ConvergenceWarning):
        dev = MixtureOfPPCA(**kw).fit(Xt)
    assert dev.means_.device == Xt.device
    np.testing.assert_allclose(dev.means_.cpu().numpy(), host.means_, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(float(dev.score(Xt)), want[0], rtol=1e-12)
    np.testing.assert_allclose(dev.score_samples(Xt).cpu().numpy(), want[1], rtol=1e-12)
    np.testing.assert_array_equal(dev.predict(Xt).cpu().numpy(), want[2])
    np.testing.assert_allclose(dev.predict_proba(Xt).cpu().numpy(), want[3], atol=1e-12)
    assert len(launches) >= 3 + 4  # an E-step an iteration, then the four calls above
