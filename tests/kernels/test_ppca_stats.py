import numpy as np
import pytest

from fastlvm.kernels import PPCAStats, ppca_stats, ppca_stats_ref
from fastlvm.kernels.ppca_stats import IMPLEMENTATIONS
from tests.conftest import (DTYPES, assert_same_bits_across_thread_counts, backend_arrays,
                            to_numpy)
from tests.tolerances import assert_close

# (n_samples, n_features, n_components): n = 1, q = 1, D and q on and off the
# 4-wide blocks, q = D - 1, n not a multiple of any tile size
PPCA_SHAPES = [(1, 2, 1), (7, 3, 2), (257, 5, 1), (1003, 8, 4), (600, 17, 6), (130, 9, 8)]


def _problem(rng, shape, dtype, offset=30.0):
    n, d, q = shape
    X = (rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) + offset).astype(dtype)
    mean = X.astype(np.float64).mean(axis=0)
    components = rng.standard_normal((q, d))
    return X, mean, components, 0.3 + rng.random()


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("backend", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", PPCA_SHAPES)
def test_matches_reference(weighted, backend, dtype, shape, rng, monkeypatch):
    X, mean, comp, s2 = _problem(rng, shape, dtype)
    sw = rng.random(shape[0]) * 2 if weighted else None
    Xb, swb = backend_arrays(backend, X, sw)
    monkeypatch.setenv("FASTLVM_BACKEND", backend)
    got = ppca_stats(Xb, mean, comp, s2, sample_weight=swb)
    assert isinstance(got, PPCAStats)
    for value in got[2:]:  # the arrays come back where X is
        assert type(value) is (np.ndarray if Xb is X else type(Xb))
    ref = ppca_stats_ref(X, mean, comp, s2, sample_weight=sw)
    for name, a, b in zip(PPCAStats._fields, got, ref):
        assert_close(to_numpy(a), b, dtype, err_msg=name)


def test_one_component_map_moves_the_centre_to_the_mean(rng):
    """The device backends take the one-component mixture-of-PPCA pass, centred
    on the mean rounded to the data's dtype, and map its sums to PPCA's around
    the float64 mean.  The map is exact: with a centre half a standard deviation
    off the mean (far beyond any rounding), PPCA's statistics come out to
    float64's digits.  Left out, every statistic is off by far more."""
    from fastlvm.kernels.mppca_stats import mppca_stats_ref
    from fastlvm.kernels.ppca_stats._one_component import ppca_stats_one_component

    X, mean, comp, s2 = _problem(rng, (400, 7, 3), np.float64)
    sw = rng.random(400) * 2
    off = 0.5 * X.std(0) * rng.choice([-1.0, 1.0], 7)

    def centred_off_the_mean(X, weights, means, components, noise, sample_weight,
                             keep_on_device):
        return mppca_stats_ref(X, weights, means - off, components, noise, sample_weight,
                               keep_on_device=keep_on_device)

    got = ppca_stats_one_component(centred_off_the_mean, X, mean, comp, s2, sw)
    ref = ppca_stats_ref(X, mean, comp, s2, sample_weight=sw)
    for name, a, b in zip(PPCAStats._fields, got, ref):
        assert_close(a, b, np.float64, err_msg=name)
    unmapped = ppca_stats_ref(X, mean - off, comp, s2, sample_weight=sw)
    for name, a, b in zip(PPCAStats._fields, unmapped, ref):
        assert not np.allclose(a, b, rtol=1e-3), name


@pytest.mark.parametrize("backend", ["triton", "cupy"])
def test_device_pass_far_from_the_origin(backend, rng, monkeypatch):
    """float32 rows near 1e5 (an ulp of 0.008) and a mean off the rows' own: the
    device kernels centre on the mean's float32 rounding, and the statistics
    around the float64 mean still match the reference."""
    X, mean, comp, s2 = _problem(rng, (300, 6, 2), np.float32, offset=1e5)
    mean = mean + 0.3 * rng.standard_normal(6)
    Xb, = backend_arrays(backend, X)
    monkeypatch.setenv("FASTLVM_BACKEND", backend)
    got = ppca_stats(Xb, mean, comp, s2)
    ref = ppca_stats_ref(X, mean, comp, s2)
    for name, a, b in zip(PPCAStats._fields, got, ref):
        assert_close(to_numpy(a), b, np.float32, err_msg=name)


def test_log_likelihood_is_the_gaussian_density(rng):
    from scipy.stats import multivariate_normal

    X, mean, comp, s2 = _problem(rng, (50, 6, 2), np.float64)
    cov = comp.T @ comp + s2 * np.eye(6)
    expected = multivariate_normal(mean, cov).logpdf(X).sum()
    assert np.isclose(ppca_stats(X, mean, comp, s2).log_likelihood, expected, rtol=1e-12)


def test_small_noise_keeps_digits(rng):
    """Near-noiseless data: the residual form must not cancel (float32 too)."""
    n, d, q = 2000, 10, 3
    Z = rng.standard_normal((n, q))
    comp = rng.standard_normal((q, d)) * 10
    X64 = Z @ comp + 1e-3 * rng.standard_normal((n, d))
    for dtype in DTYPES:
        X = X64.astype(dtype)
        got = ppca_stats(X, np.zeros(d), comp, 1e-6).log_likelihood
        ref = ppca_stats_ref(X, np.zeros(d), comp, 1e-6)[0]
        assert np.isclose(got, ref, rtol=1e-4 if dtype == np.float32 else 1e-10)


def test_statistics_add_over_chunks(rng):
    X, mean, comp, s2 = _problem(rng, (3000, 7, 3), np.float64)
    whole = ppca_stats(X, mean, comp, s2)
    parts = [ppca_stats(X[i:i + 1000], mean, comp, s2) for i in range(0, 3000, 1000)]
    for j in range(4):
        assert_close(sum(p[j] for p in parts), whole[j], np.float64)


def test_deterministic_across_thread_counts_and_groups(rng, monkeypatch):
    """The same bits with any thread count, and with the tiles' partials merged
    a couple of tiles at a time (add_partials) as with the default groups."""
    import fastlvm._config

    X, mean, comp, s2 = _problem(rng, (20_000, 9, 4), np.float32)
    assert_same_bits_across_thread_counts(lambda: ppca_stats(X, mean, comp, s2))
    default = ppca_stats(X, mean, comp, s2)
    monkeypatch.setattr(fastlvm._config, "TILES_PER_GROUP", 1)
    for a, b in zip(default, ppca_stats(X, mean, comp, s2)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kwargs, match", [
    (dict(components=np.ones((5, 5))), "1 <= n_components < 5"),
    (dict(components=np.ones((2, 4))), "components must have shape"),
    (dict(mean=np.ones(4)), "mean must have shape"),
    (dict(noise_variance=0.0), "noise_variance must be strictly positive"),
    (dict(noise_variance=np.nan), "noise_variance contains NaN"),
])
def test_bad_parameters(kwargs, match, rng):
    X = rng.standard_normal((10, 5))
    args = dict(mean=np.zeros(5), components=np.ones((2, 5)), noise_variance=1.0) | kwargs
    with pytest.raises(ValueError, match=match):
        ppca_stats(X, **args)


def test_bad_data(rng):
    X = rng.standard_normal((10, 5))
    X[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        ppca_stats(X, np.zeros(5), np.ones((2, 5)), 1.0)
    with pytest.raises(TypeError, match="float32 or float64"):
        ppca_stats(X.astype(np.int64), np.zeros(5), np.ones((2, 5)), 1.0)
