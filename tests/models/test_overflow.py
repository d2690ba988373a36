"""Finite data whose statistics overflow: a ValueError that says to scale the data.

X passes the finiteness checks, but its squares (or, for the PPCA models, higher
powers) leave the range of the fit's dtype.  Every estimator must stop with
:func:`fastlvm._moments.overflow_error`'s message instead of returning NaN
parameters, a -inf score, or a LinAlgError.  Every case but the one that keeps
sklearn's message fails without the checks (a LinAlgError, NaN parameters,
sklearn's ill-defined-covariance message, or no error at all)."""

import warnings

import numpy as np
import pytest

from fastlvm import (PPCA, BayesianGaussianMixture, FactorAnalysis, GaussianMixture,
                     MixtureOfPPCA)
from tests.conftest import COVARIANCE_TYPES

OVERFLOW = "overflowed float(32|64).*Scale the input data"


def _data(scale, dtype=np.float64, missing=False):
    X = np.random.default_rng(0).standard_normal((300, 5))
    if missing:
        X[::7, 1] = np.nan
    return (X * scale).astype(dtype)


def _fit(estimator, X):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning of a stopped fit
        return estimator.fit(X)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
@pytest.mark.parametrize("dtype, scale", [(np.float64, 1e200), (np.float32, 1e25)])
def test_gaussian_mixture(covariance_type, dtype, scale):
    gm = GaussianMixture(3, covariance_type=covariance_type, random_state=0)
    if covariance_type == "full" and dtype == np.float32:
        # the float32 tile sums stay finite here and the covariance is not positive
        # definite: sklearn's message, which also says to scale the data
        with pytest.raises(ValueError, match="ill-defined empirical covariance.*scale"):
            _fit(gm, _data(scale, dtype))
        return
    with pytest.raises(ValueError, match=OVERFLOW):
        _fit(gm, _data(scale, dtype))


@pytest.mark.parametrize("make", [
    lambda: BayesianGaussianMixture(n_components=3, random_state=0),
    lambda: GaussianMixture(3, prior={}, random_state=0),
    lambda: PPCA(2),
    lambda: PPCA(2, method="em"),
    lambda: FactorAnalysis(2),
    lambda: MixtureOfPPCA(3, n_latent=2, random_state=0),
], ids=["bayesian", "map", "ppca", "ppca-em", "factor-analysis", "mixture-of-ppca"])
def test_scatter_overflow(make):
    with pytest.raises(ValueError, match=OVERFLOW):
        _fit(make(), _data(1e200))


@pytest.mark.parametrize("make", [lambda: PPCA(2), lambda: FactorAnalysis(2)],
                         ids=["ppca", "factor-analysis"])
def test_missing_data_overflow(make):
    with pytest.raises(ValueError, match=OVERFLOW):
        _fit(make(), _data(1e200, missing=True))


def test_partial_fit_overflow():
    with pytest.raises(ValueError, match=OVERFLOW):
        PPCA(2).partial_fit(_data(1e200))
    with pytest.raises(ValueError, match=OVERFLOW), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        GaussianMixture(3, random_state=0).partial_fit(_data(1e200))


@pytest.mark.parametrize("make", [
    lambda: GaussianMixture(3, covariance_type="full", random_state=0),
    lambda: GaussianMixture(3, covariance_type="diag", random_state=0, prior={}),
    lambda: BayesianGaussianMixture(n_components=3, random_state=0),
    lambda: PPCA(2),
], ids=["gmm", "map", "bgm", "ppca"])
def test_a_batch_that_fails_leaves_the_streamed_model_as_it_was(make):
    # The mixtures find the overflow in the M-step, after the batch's statistics
    # were blended into the running ones: those and half the parameters held
    # it, and every later batch failed too.
    first, last = _data(1.0)[:150], _data(1.0)[150:] + 0.5
    model, reference = make(), make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.partial_fit(first)
        with pytest.raises(ValueError, match=OVERFLOW):
            model.partial_fit(_data(1e200)[:40])
        model.partial_fit(last)
        reference.partial_fit(first)
        reference.partial_fit(last)
    np.testing.assert_array_equal(model.score_samples(first), reference.score_samples(first))
    assert vars(model).keys() == vars(reference).keys()
    fresh = make()
    with pytest.raises(ValueError, match=OVERFLOW), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh.partial_fit(_data(1e200))
    assert vars(fresh) == vars(make())  # still unfitted


@pytest.mark.parametrize("max_iter", [1, 100])
@pytest.mark.parametrize("dtype, scale", [(np.float64, 1e80), (np.float32, 1e18)])
def test_mixture_of_ppca_fourth_powers(max_iter, dtype, scale):
    """Its statistics hold |x|^4: they overflow where GaussianMixture's do not.
    With max_iter=1 only the parameters show it (the bound came before them)."""
    X = _data(scale, dtype)
    with pytest.raises(ValueError, match=OVERFLOW):
        _fit(MixtureOfPPCA(3, n_latent=2, max_iter=max_iter, random_state=0), X)
    assert np.isfinite(_fit(GaussianMixture(3, random_state=0), X).score(X))


@pytest.mark.parametrize("max_iter", [1, 100])
def test_ppca_em_range(max_iter):
    """PPCA's EM step keeps |x|^4 out of its arithmetic: at 1e80 it fits, with the
    closed form's likelihood; beyond about 1e100 (|x|^3) it stops with the error."""
    X = _data(1e80)
    em = _fit(PPCA(2, method="em", max_iter=1000), X)
    assert em.score(X) == pytest.approx(PPCA(2).fit(X).score(X), rel=1e-8)
    with pytest.raises(ValueError, match=OVERFLOW):
        _fit(PPCA(2, method="em", max_iter=max_iter), _data(1e110))


def _driver_model(bound, params):
    class Model:
        n_init, max_iter, tol, warm_start, verbose, verbose_interval = 1, 5, 1e-3, False, 0, 1
        random_state = 0

        def _em_initialize(self, X, sample_weight, random_state):
            pass

        def _em_iteration(self, X, sample_weight):
            return bound

        def _get_parameters(self):
            return params

    return Model()


def test_em_driver_refuses_a_bound_that_is_not_finite():
    from fastlvm.em import fit_em

    with pytest.raises(ValueError, match="bound at iteration 1 \\(nan\\) overflowed float64"):
        fit_em(_driver_model(np.nan, (np.ones(2),)), np.zeros((4, 2)))


@pytest.mark.parametrize("params", [
    (np.ones(2), np.array([1.0, np.inf])),
    (2.0, (np.ones(3), np.array([np.nan]))),  # nested, as BayesianGaussianMixture's
    (float("nan"),),
])
def test_em_driver_refuses_parameters_that_are_not_finite(params):
    """The last M-step has no bound after it: its parameters are checked instead."""
    from fastlvm.em import fit_em

    with pytest.raises(ValueError, match="parameters after iteration 2 overflowed float32"):
        fit_em(_driver_model(-1.0, params), np.zeros((4, 2), dtype=np.float32))


@pytest.mark.parametrize("make", [
    lambda: GaussianMixture(3, covariance_type="full", random_state=0, warm_start=True),
    lambda: GaussianMixture(3, covariance_type="diag", random_state=0, prior={}),
    lambda: BayesianGaussianMixture(n_components=3, random_state=0, warm_start=True),
    lambda: MixtureOfPPCA(3, n_latent=1, random_state=0),
], ids=["gmm-warm", "map", "bgm-warm", "mppca"])
def test_a_fit_that_fails_leaves_the_fitted_model_as_it_was(make):
    """A warm start's parameters were overwritten by the failing fit's first
    iterations before its M-step found the overflow."""
    model = make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(_data(1.0))
        state = dict(vars(model))
        with pytest.raises(ValueError, match=OVERFLOW):
            model.fit(_data(1e200))
        with pytest.raises(ValueError, match=OVERFLOW):
            model.fit_predict(_data(1e200))
    assert vars(model).keys() == state.keys()
    assert all(vars(model)[k] is v for k, v in state.items())
