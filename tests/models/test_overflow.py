"""Finite data whose statistics overflow or underflow: a ValueError that says to
scale the data.

X passes the finiteness checks, but its squares (or, for the PPCA models, higher
powers) leave the range of the fit's dtype: above it, or below its smallest
normal number.  Every estimator must stop with
:func:`fastlvm._moments.overflow_error`'s or
:func:`fastlvm._moments.underflow_error`'s message instead of returning NaN
parameters, a -inf score, a LinAlgError or a model of the rounding.  Every case
but the one that keeps sklearn's message fails without the checks (a
LinAlgError, NaN parameters, sklearn's ill-defined-covariance message, an
overflow message for values that are too small, or no error at all)."""

import warnings

import numpy as np
import pytest

from fastlvm import (PPCA, BayesianGaussianMixture, FactorAnalysis, GaussianMixture,
                     MixtureOfPPCA)
from tests.conftest import COVARIANCE_TYPES

OVERFLOW = "overflowed float(32|64).*Scale the input data"
UNDERFLOW = "underflowed float(32|64): .* too small .*Scale the input data"


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


@pytest.mark.parametrize("scale", [2.0**-465, 2.0**266, 2.0**465])  # 1e-140, 1e80, 1e140
def test_ppca_em_reaches_the_closed_forms_range(scale):
    """PPCA's EM step runs in units of a power of two near the data's spread, so
    its |x|^3 and |x|^4 products stay in range: it fits wherever the closed form
    does (it stopped with a LinAlgError at 1e-140 and an overflow at 1e110), and
    data scaled by a power of two give the same fit, scaled (to the last bits:
    the random start is scaled by the data's spread, not a power of two)."""
    X = _data(scale)
    em = _fit(PPCA(2, method="em", max_iter=1000, random_state=0), X)
    assert em.score(X) == pytest.approx(PPCA(2).fit(X).score(X), rel=1e-8)
    unit = _fit(PPCA(2, method="em", max_iter=1000, random_state=0), _data(1.0))
    assert em.n_iter_ == unit.n_iter_
    np.testing.assert_allclose(em.components_ / scale, unit.components_, rtol=1e-13)
    assert em.noise_variance_ / scale**2 == pytest.approx(unit.noise_variance_, rel=1e-13)


@pytest.mark.parametrize("max_iter", [1, 100])
def test_ppca_em_overflow(max_iter):
    with pytest.raises(ValueError, match=OVERFLOW):
        _fit(PPCA(2, method="em", max_iter=max_iter), _data(1e160))


@pytest.mark.parametrize("make, dtype, scale", [
    *[(lambda c=c: GaussianMixture(3, covariance_type=c, reg_covar=0.0, random_state=0),
       dtype, scale)
      for c in COVARIANCE_TYPES for dtype, scale in [(np.float64, 1e-156), (np.float32, 1e-21)]],
    (lambda: BayesianGaussianMixture(n_components=3, random_state=0), np.float64, 1e-160),
    (lambda: GaussianMixture(3, prior={}, random_state=0), np.float64, 1e-160),
    (lambda: PPCA(2), np.float64, 1e-155),
    (lambda: PPCA(2, method="em"), np.float64, 1e-155),
    (lambda: PPCA(2, method="em"), np.float32, 1e-21),
    (lambda: FactorAnalysis(2), np.float64, 1e-155),
    (lambda: FactorAnalysis(2), np.float64, 1e-200),
    (lambda: MixtureOfPPCA(3, n_latent=2, reg_covar=0.0, random_state=0), np.float64, 1e-100),
    (lambda: MixtureOfPPCA(3, n_latent=2, reg_covar=0.0, random_state=0), np.float32, 1e-21),
], ids=[*(f"gmm-{c}-{d}" for c in COVARIANCE_TYPES for d in ("float64", "float32")),
        "bayesian", "map", "ppca", "ppca-em", "ppca-em-float32", "factor-analysis",
        "factor-analysis-zero-squares", "mixture-of-ppca", "mixture-of-ppca-float32"])
def test_underflow(make, dtype, scale):
    """Values whose variances fall below the arithmetic's smallest normal number:
    before, NaN scores (PPCA, FactorAnalysis at 1e-155), a model of the rounding
    (FactorAnalysis at 1e-200, the mixture of PPCA at 1e-140), a LinAlgError, or
    an overflow message.  Just inside the range the same models fit."""
    with pytest.raises(ValueError, match=UNDERFLOW) as error:
        _fit(make(), _data(scale, dtype))
    assert ("pass it as float64" in str(error.value)) == (dtype == np.float32)
    if dtype == np.float32:
        inside = 1e-18
    else:
        inside = 1e-76 if isinstance(make(), MixtureOfPPCA) else 1e-145
    X = _data(inside, dtype)
    assert np.isfinite(_fit(make(), X).score(X))


@pytest.mark.parametrize("make", [lambda: PPCA(2), lambda: FactorAnalysis(2)],
                         ids=["ppca", "factor-analysis"])
def test_missing_data_underflow(make):
    with pytest.raises(ValueError, match=UNDERFLOW):
        _fit(make(), _data(1e-155, missing=True))


def test_constant_data_is_not_refused_as_underflow():
    """Tiny constant values: the rounding of the mean is no spread."""
    X = np.full((10, 3), 1e-200)
    with pytest.raises(ValueError, match="subspace"):
        PPCA(1).fit(X)
    assert np.isfinite(FactorAnalysis(1).fit(X).score(X))


def test_mixture_of_ppca_without_a_noise_floor_refuses_a_collapsed_component():
    """With reg_covar=0 a component on repeated rows has no noise: sklearn's
    ill-defined-covariance error, where the kernel raised a LinAlgError."""
    rng = np.random.default_rng(0)
    X = np.vstack([rng.standard_normal((300, 5)), np.tile(rng.normal(20, 10, 5), (50, 1))])
    with pytest.raises(ValueError, match="ill-defined empirical covariance"):
        _fit(MixtureOfPPCA(2, n_latent=1, reg_covar=0.0, random_state=0), X)
    assert np.isfinite(_fit(MixtureOfPPCA(2, n_latent=1, random_state=0), X).score(X))


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
