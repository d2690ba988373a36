import math

import numpy as np
import pytest
from scipy import stats

from fastlvm.kernels import gaussian_log_prob, gaussian_log_prob_ref
from fastlvm.kernels.gaussian_log_prob import IMPLEMENTATIONS
from tests.conftest import (COVARIANCE_TYPES, DTYPES, SHAPES, assert_mixture_density_matches,
                            backend_arrays, make_params, separated_float32_problem, to_numpy)
from tests.tolerances import assert_close


@pytest.mark.parametrize("backend", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_matches_reference(backend, dtype, shape, covariance_type, rng, monkeypatch):
    n, d, k = shape
    X = (rng.standard_normal((n, d)) * 2 + 50).astype(dtype)  # far from the origin
    means = (X[rng.integers(0, n, k)] + rng.standard_normal((k, d))).astype(dtype)
    pc = make_params(rng, covariance_type, k, d)
    monkeypatch.setenv("FASTLVM_BACKEND", backend)
    (Xb,) = backend_arrays(backend, X)
    out = to_numpy(gaussian_log_prob(Xb, means, pc, covariance_type))
    assert out.dtype == dtype and out.shape == (n, k)
    ref = gaussian_log_prob_ref(X, means, pc, covariance_type)
    assert_close(out, ref, dtype, scale=max(1.0, float(np.abs(ref).max())))


@pytest.mark.parametrize("covariance_type", ["tied", "diag", "spherical"])
def test_triton_log_prob_of_separated_float32_clusters(covariance_type, rng, monkeypatch):
    """Means 1000 deviations apart: expanded around their common centre in float32,
    the rows' log p(x) lost 1-3% (Triton); such parameters are computed in float64."""
    pytest.importorskip("triton")
    X, w, means, pc = separated_float32_problem(rng, covariance_type)
    monkeypatch.setenv("FASTLVM_BACKEND", "triton")
    (Xb,) = backend_arrays("triton", X)
    out = to_numpy(gaussian_log_prob(Xb, means, pc, covariance_type)) + np.log(w).astype(
        np.float32)
    assert out.dtype == np.float32
    assert_mixture_density_matches(out, X, w, means, pc, covariance_type)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_runs_of_tiles_match_reference(covariance_type, rng):
    """At 140k rows each parallel task of the Numba kernel takes a run of several
    tiles (tiles_per_run), the last one short; every row must still be written,
    once, with its own log-densities."""
    from fastlvm.kernels._covariance import COVARIANCE_CODE
    from fastlvm.kernels._numba_support import padded_features, tiles_per_run
    from fastlvm.kernels.gaussian_log_prob._numba import gaussian_tile_rows

    n, d, k = 140_001, 5, 3
    tile = gaussian_tile_rows(COVARIANCE_CODE[covariance_type], padded_features(d), k, 4)
    assert tiles_per_run(n, tile) > 1 and n % tile  # the case this test is for
    X = (rng.standard_normal((n, d)) + 3).astype(np.float32)
    means = X[rng.integers(0, n, k)].astype(np.float64)
    pc = make_params(rng, covariance_type, k, d)
    out = gaussian_log_prob(X, means, pc, covariance_type)
    ref = gaussian_log_prob_ref(X, means, pc, covariance_type)
    assert_close(out, ref, np.float32, scale=max(1.0, float(np.abs(ref).max())))


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_reference_matches_scipy(covariance_type, rng):
    n, d, k = 50, 3, 2
    X = rng.standard_normal((n, d))
    means = rng.standard_normal((k, d))
    pc = make_params(rng, covariance_type, k, d)
    ref = gaussian_log_prob_ref(X, means, pc, covariance_type)
    for j in range(k):
        if covariance_type == "full":
            prec = pc[j] @ pc[j].T
        elif covariance_type == "tied":
            prec = pc @ pc.T
        elif covariance_type == "diag":
            prec = np.diag(pc[j] ** 2)
        else:
            prec = np.eye(d) * pc[j] ** 2
        expected = stats.multivariate_normal(means[j], np.linalg.inv(prec)).logpdf(X)
        np.testing.assert_allclose(ref[:, j], expected, rtol=1e-10)


def test_matches_sklearn_private_formula(rng):
    from sklearn.mixture._gaussian_mixture import _estimate_log_gaussian_prob

    X = rng.standard_normal((100, 4))
    means = rng.standard_normal((3, 4))
    for cov in COVARIANCE_TYPES:
        pc = make_params(rng, cov, 3, 4)
        np.testing.assert_allclose(gaussian_log_prob(X, means, pc, cov),
                                   _estimate_log_gaussian_prob(X, means, pc, cov), rtol=1e-10)


def test_float32_far_from_origin_keeps_digits(rng):
    # 1e4 offset, unit spread: the expanded formula loses everything in float32
    X = (rng.standard_normal((500, 3)) + 1e4).astype(np.float32)
    means = np.full((2, 3), 1e4) + rng.standard_normal((2, 3)) * 0.1
    pc = np.ones(2)
    ref = gaussian_log_prob_ref(X, means.astype(np.float32), pc, "spherical")
    out = gaussian_log_prob(X, means.astype(np.float32), pc, "spherical")
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-4)


def test_log_normaliser_value():
    X = np.zeros((1, 2))
    out = gaussian_log_prob(X, np.zeros((1, 2)), np.ones((1, 2)), "diag")
    assert out[0, 0] == pytest.approx(-math.log(2 * math.pi))


@pytest.mark.parametrize("bad, match", [
    (dict(covariance_type="banana"), "covariance_type"),
    (dict(means=np.zeros((2, 4))), "means must have shape"),
    (dict(precisions_cholesky=np.ones((3, 3, 3))), "precisions_cholesky must have shape"),
    (dict(precisions_cholesky=np.tril(np.ones((2, 3, 3)))), "upper triangular"),
    (dict(precisions_cholesky=-np.eye(3)[None].repeat(2, 0)), "positive diagonal"),
    (dict(X=np.full((4, 3), np.nan)), "NaN or infinity"),
    (dict(X=np.zeros(3)), "2-D"),
])
def test_bad_input(bad, match):
    args = dict(X=np.zeros((4, 3)), means=np.zeros((2, 3)),
                precisions_cholesky=np.eye(3)[None].repeat(2, 0), covariance_type="full")
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        gaussian_log_prob(args.pop("X"), **args)


def test_wrong_dtype_and_type():
    with pytest.raises(TypeError, match="float32 or float64"):
        gaussian_log_prob(np.zeros((2, 2), dtype=np.int64), np.zeros((1, 2)), np.ones(1),
                          "spherical")
    with pytest.raises(TypeError, match="numpy.ndarray"):
        gaussian_log_prob([[0.0, 0.0]], np.zeros((1, 2)), np.ones(1), "spherical")
