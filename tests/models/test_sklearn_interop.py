"""fastlvm's estimators in sklearn's machinery: pandas DataFrames in and out
(``set_output``, ``get_feature_names_out``) and read-only arrays.

sklearn's own estimator checks skip their DataFrame checks when pandas is
missing; pandas is in the test extra, and these tests say what the checks
would not: the transformers' output column names, and that fitting on a
frame with column names warns of nothing."""

import subprocess
import sys
import warnings

import numpy as np
import pytest
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import fastlvm

pd = pytest.importorskip("pandas")

TRANSFORMERS = [
    ("PPCA", dict(n_components=2), "ppca"),
    ("FactorAnalysis", dict(n_components=2), "factoranalysis"),
    ("VAE", dict(n_components=2, likelihood="gaussian", max_epochs=2, random_state=0), "vae"),
]

ESTIMATORS = [
    ("GaussianMixture", dict(n_components=2, random_state=0)),
    ("BayesianGaussianMixture", dict(n_components=2, random_state=0)),
    ("MixtureOfPPCA", dict(n_components=2, n_latent=1, random_state=0)),
    ("PPCA", dict(n_components=2)),
    ("PPCA", dict(n_components=2, method="em", random_state=0)),
    ("FactorAnalysis", dict(n_components=2)),
    ("VAE", dict(n_components=2, likelihood="gaussian", max_epochs=2, random_state=0)),
]

# what each estimator offers to call on fitted data, where it has it
METHODS = ("transform", "score", "score_samples", "predict", "predict_proba", "bic", "elbo")


def _estimator(name, params):
    if name == "VAE":
        pytest.importorskip("torch")
    return getattr(fastlvm, name)(**params)


def _frame(rng, n=120, d=5):
    X = rng.standard_normal((n, d))
    X[: n // 2] += 3.0
    return pd.DataFrame(X, columns=[f"f{j}" for j in range(d)])


@pytest.mark.parametrize("name, params, prefix", TRANSFORMERS)
def test_pandas_output_names_the_latent_columns(name, params, prefix, rng):
    X = _frame(rng)
    model = _estimator(name, params)
    pipe = make_pipeline(StandardScaler(), model).set_output(transform="pandas")
    out = pipe.fit_transform(X)
    names = [f"{prefix}0", f"{prefix}1"]
    assert isinstance(out, pd.DataFrame)
    assert list(out.columns) == names and list(out.index) == list(X.index)
    np.testing.assert_array_equal(model.get_feature_names_out(), names)
    np.testing.assert_allclose(out.to_numpy(), pipe.transform(X).to_numpy())


@pytest.mark.parametrize("name, params, prefix", TRANSFORMERS)
def test_feature_names_out_before_fit_raises_not_fitted(name, params, prefix):
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        _estimator(name, params).get_feature_names_out()


@pytest.mark.parametrize("name, params", ESTIMATORS)
def test_fitting_a_frame_with_column_names_warns_of_nothing(name, params, rng):
    """The closed-form PPCA scored its own training rows through the public
    ``score``, whose check of X's column names warned that the validated
    array had none."""
    X = _frame(rng)
    model = _estimator(name, params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.fit(X)
        for method in METHODS:
            if hasattr(model, method):
                getattr(model, method)(X)
    np.testing.assert_array_equal(model.feature_names_in_, X.columns)


def test_vae_reads_a_read_only_array_without_a_warning():
    """torch warns on a view of a read-only array (a memmap opened 'r', a pandas 3
    frame's values); the VAE never writes into X, so there is nothing to warn of.
    In a fresh process: torch gives that warning once a process."""
    pytest.importorskip("torch")
    script = (
        "import numpy as np, fastlvm\n"
        "X = np.random.default_rng(0).random((64, 4))\n"
        "X.flags.writeable = False\n"
        "model = fastlvm.VAE(2, max_epochs=1, random_state=0).fit(X)\n"
        "assert model.transform(X).shape == (64, 2)\n")
    done = subprocess.run([sys.executable, "-W", "error", "-c", script],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
