"""Continuing a mixture's fit (``warm_start``, ``partial_fit``) after ``set_params``.

The fitted arrays are made for the structural parameters (n_components,
covariance_type, weight_concentration_prior_type, n_latent).  Changed between
calls, a continuation kept the old number of components without a word, or
died with NumPy's broadcasting error; it now names the parameter.  The other
parameters (reg_covar, tol, the step sizes, a prior) may change between steps,
and a fresh ``fit`` takes any change, as do PPCA's and FactorAnalysis's exact
streaming, which refit from their moments.  A prior changed between
``partial_fit`` steps is set again from the next batch (it was ignored)."""

import warnings

import numpy as np
import pytest

from fastlvm import (PPCA, BayesianGaussianMixture, FactorAnalysis, GaussianMixture,
                     MixtureOfPPCA)

CHANGES = [
    (lambda **kw: GaussianMixture(3, random_state=0, **kw), "n_components", 4),
    (lambda **kw: GaussianMixture(3, random_state=0, **kw), "covariance_type", "diag"),
    (lambda **kw: BayesianGaussianMixture(n_components=3, random_state=0, **kw),
     "covariance_type", "spherical"),
    (lambda **kw: BayesianGaussianMixture(n_components=3, random_state=0, **kw),
     "weight_concentration_prior_type", "dirichlet_distribution"),
    (lambda **kw: MixtureOfPPCA(3, n_latent=1, random_state=0, **kw), "n_latent", 2),
]
IDS = ["gmm-k", "gmm-covariance", "bgm-covariance", "bgm-prior-type", "mppca-latent"]


@pytest.fixture(scope="module")
def X():
    return np.random.default_rng(0).standard_normal((300, 4))


def _quietly(call, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning
        return call(*args)


@pytest.mark.parametrize("make, name, value", CHANGES, ids=IDS)
def test_a_warm_start_refuses_a_changed_structure(make, name, value, X):
    model = _quietly(make(warm_start=True).fit, X)
    model.set_params(**{name: value})
    state = dict(vars(model))
    with pytest.raises(ValueError, match=f"{name} changed from .* to {value!r} since the "
                                         "model was fitted.*warm_start=False"):
        _quietly(model.fit, X)
    assert all(vars(model)[k] is v for k, v in state.items())
    refit = _quietly(model.set_params(warm_start=False).fit, X)  # fits afresh
    assert getattr(refit, name) == value
    _quietly(refit.set_params(warm_start=True).fit, X)  # and continues that fit


@pytest.mark.parametrize("make, name, value", CHANGES[:4], ids=IDS[:4])
def test_partial_fit_refuses_a_changed_structure(make, name, value, X):
    model = _quietly(make().partial_fit, X[:150])
    model.set_params(**{name: value})
    with pytest.raises(ValueError, match=f"{name} changed from"):
        _quietly(model.partial_fit, X[150:])
    # a fit made for the new value continues
    _quietly(_quietly(model.fit, X).partial_fit, X[150:])


def test_unstructural_changes_continue(X):
    model = _quietly(GaussianMixture(3, random_state=0).partial_fit, X[:150])
    model.set_params(reg_covar=1e-3, learning_decay=0.9, prior={})
    _quietly(model.partial_fit, X[150:])
    warm = _quietly(GaussianMixture(3, warm_start=True, random_state=0).fit, X)
    _quietly(warm.set_params(tol=1e-6, reg_covar=1e-4).fit, X)
    assert warm.n_iter_ >= 1


@pytest.mark.parametrize("make", [lambda: PPCA(1), lambda: FactorAnalysis(1)],
                         ids=["ppca", "factor-analysis"])
def test_exact_streaming_refits_with_the_new_n_components(make, X):
    streamed = make().partial_fit(X[:150])
    streamed.set_params(n_components=2).partial_fit(X[150:])
    np.testing.assert_allclose(np.abs(streamed.components_),
                               np.abs(make().set_params(n_components=2).fit(X).components_),
                               rtol=1e-7, atol=1e-10)


def test_a_changed_prior_is_set_again_from_the_next_batch(X):
    bgm = _quietly(BayesianGaussianMixture(n_components=3, mean_prior=np.zeros(4),
                                           random_state=0).partial_fit, X[:100])
    first_covariance_prior = bgm.covariance_prior_
    _quietly(bgm.set_params(mean_prior=np.zeros(4)).partial_fit, X[100:200])  # equal values
    assert bgm.covariance_prior_ is first_covariance_prior  # not set again
    bgm.set_params(weight_concentration_prior=1e3, mean_prior=np.ones(4))
    _quietly(bgm.partial_fit, X[200:])
    assert bgm.weight_concentration_prior_ == 1e3
    np.testing.assert_array_equal(bgm.mean_prior_, np.ones(4))
    fresh = BayesianGaussianMixture(n_components=3, random_state=0).partial_fit(X[200:])
    np.testing.assert_allclose(bgm.covariance_prior_, fresh.covariance_prior_)

    prior = {"mean_precision": 0.5}
    gmm = _quietly(GaussianMixture(3, prior=prior, random_state=0).partial_fit, X[:150])
    prior["mean_precision"] = 2.0  # edited in place: a change too
    _quietly(gmm.partial_fit, X[150:])
    assert gmm.prior_["mean_precision"] == 2.0


def test_same_value_reads_parameters_as_sklearn_users_give_them():
    from fastlvm._continuation import same_value

    torch = pytest.importorskip("torch")

    module = torch.nn.Linear(2, 2)
    assert same_value([256], (256,)) and same_value((8, [4]), [8, (4,)])
    assert same_value(np.ones(3), np.ones(3)) and not same_value(np.ones(3), np.zeros(3))
    assert same_value({"mean": np.ones(2)}, {"mean": np.ones(2)})
    assert same_value(module, module) and not same_value(module, torch.nn.Linear(2, 2))
    assert not same_value(None, {}) and not same_value("full", "diag")
    assert not same_value([256], (256, 128)) and not same_value(np.ones(3), None)
