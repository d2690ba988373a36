import numpy as np
import pytest

from fastlvm.kernels import mppca_log_prob, mppca_log_prob_ref
from fastlvm.kernels.mppca_log_prob import IMPLEMENTATIONS
from tests.conftest import DTYPES, MPPCA_SHAPES, backend_arrays, mppca_problem, to_numpy
from tests.tolerances import assert_close


@pytest.mark.parametrize("backend", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", MPPCA_SHAPES)
def test_matches_reference(backend, dtype, shape, rng, monkeypatch):
    X, _, means, comp, noise = mppca_problem(rng, shape, dtype)
    (Xb,) = backend_arrays(backend, X)
    monkeypatch.setenv("FASTLVM_BACKEND", backend)
    got = to_numpy(mppca_log_prob(Xb, means, comp, noise))
    assert got.dtype == dtype and got.shape == shape[:1] + shape[2:3]
    assert_close(got, mppca_log_prob_ref(X, means, comp, noise), dtype)


def test_is_the_gaussian_density(rng):
    from scipy.stats import multivariate_normal

    X, _, means, comp, noise = mppca_problem(rng, (40, 6, 3, 2), np.float64)
    got = mppca_log_prob(X, means, comp, noise)
    for k in range(3):
        cov = comp[k].T @ comp[k] + noise[k] * np.eye(6)
        np.testing.assert_allclose(got[:, k], multivariate_normal(means[k], cov).logpdf(X),
                                   rtol=1e-12)


@pytest.mark.parametrize("backend", ["numba", "triton", "cupy"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_on_the_subspace_keep_their_digits(dtype, backend, rng, monkeypatch):
    """Near-noiseless rows: ||c||^2 - ||u||^2 cancels; Numba's exact path takes
    over, the GPU kernels' explicit residual never cancels."""
    n, d, q = 2000 if backend == "numba" else 300, 10, 3
    comp = rng.standard_normal((2, q, d)) * 10
    means = np.array([np.full(d, 5.0), np.full(d, -5.0)])
    X = (rng.standard_normal((n, q)) @ comp[0] + means[0]
         + 1e-3 * rng.standard_normal((n, d))).astype(dtype)
    noise = np.array([1e-6, 1.0])
    (Xb,) = backend_arrays(backend, X)
    monkeypatch.setenv("FASTLVM_BACKEND", backend)
    got = to_numpy(mppca_log_prob(Xb, means, comp, noise))
    ref = mppca_log_prob_ref(X, means, comp, noise)
    np.testing.assert_allclose(got, ref, rtol=1e-5 if dtype == np.float32 else 1e-11)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 2, 1, 1), (37, 5, 2, 3), (130, 9, 3, 6), (70, 17, 2, 8)])
def test_row_layout_matches_tiles(shape, dtype, rng):
    """component_log_prob_rows (the pruned E-step's centred row blocks) gives
    each component's projections, ||x - mu||^2 and log-densities as the tile
    code does on the transposed tile: padded D, q above one block of four,
    and rows on a component's subspace (its exact path)."""
    from fastlvm.kernels._numba_support import load_tile_transposed, new_tile
    from fastlvm.kernels.mppca_log_prob._numba import (LowRankTileParams, component_log_prob,
                                                       component_log_prob_rows)

    X, weights, means, comp, noise = mppca_problem(rng, shape, dtype)
    n, d, k, q = shape
    noise[0] = 1e-6  # component 0 near-noiseless: its rows cancel
    X[::2] = (rng.standard_normal((X[::2].shape[0], q)) @ comp[0] + means[0]).astype(dtype)
    p = LowRankTileParams(means, comp, noise, dtype)
    dp, qp = p.whitened.shape[1:]
    xT = new_tile(X, dp, n)
    load_tile_transposed(X, 0, n, xT)
    ref = mppca_log_prob_ref(X, means, comp, noise)  # (n, K)
    rtol = 1e-5 if dtype == np.float32 else 1e-11
    for j in range(k):
        outs = []
        for rows_layout in (False, True):
            u, sq, lp = np.empty((qp, n), dtype), np.empty(n, dtype), np.empty(n, dtype)
            c64, u64 = np.empty(d), np.empty(q)
            if rows_layout:
                c = np.zeros((n, dp), dtype)
                c[:, :d] = X - p.means[j, :d]
                component_log_prob_rows(c, n, np.ascontiguousarray(p.whitened[j].T), 0.0,
                                        p.inv_noise[j], p.whitened64[j], p.chol_inv_t[j],
                                        p.inv_noise64[j], p.cancel, u, sq, lp, c64, u64,
                                        np.zeros(dp, dtype))
            else:
                component_log_prob(xT, n, p.means[j], p.whitened[j], 0.0, p.inv_noise[j],
                                   p.whitened64[j], p.chol_inv_t[j], p.inv_noise64[j],
                                   p.cancel, u, sq, lp, c64, u64)
            outs.append((u, sq, lp))
        (u0, sq0, lp0), (u1, sq1, lp1) = outs
        np.testing.assert_allclose(u1, u0, rtol=rtol, atol=rtol * np.abs(u0).max())
        np.testing.assert_allclose(sq1, sq0, rtol=rtol)
        np.testing.assert_allclose(lp1 + p.const[j], ref[:, j], rtol=rtol,
                                   atol=rtol * np.abs(ref[:, j]).max() if j else 0)


def test_torch_cpu_tensor_comes_back_as_a_tensor(rng):
    torch = pytest.importorskip("torch")
    X, _, means, comp, noise = mppca_problem(rng, (50, 4, 2, 1), np.float32)
    got = mppca_log_prob(torch.from_numpy(X), means, comp, noise)
    assert isinstance(got, torch.Tensor)
    np.testing.assert_array_equal(got.numpy(), mppca_log_prob(X, means, comp, noise))


@pytest.mark.parametrize("change, match", [
    (dict(means=np.zeros((2, 3))), r"means must have shape \(n_components, 4\)"),
    (dict(components=np.zeros((2, 2, 3))), r"components must have shape \(2, q, 4\)"),
    (dict(components=np.zeros((2, 4, 4))), "1 <= q < n_features"),
    (dict(noise_variance=np.array([1.0, 0.0])), "noise_variance must be strictly positive"),
    (dict(noise_variance=np.ones(3)), r"noise_variance must have shape \(2,\)"),
    (dict(X=np.array([[np.nan, 0, 0, 0]])), "NaN or infinity"),
    (dict(X=np.zeros((3, 4), dtype=np.int64)), "float32 or float64"),
])
def test_bad_input_is_named(change, match):
    args = dict(X=np.zeros((3, 4)), means=np.zeros((2, 4)), components=np.ones((2, 1, 4)),
                noise_variance=np.ones(2))
    args.update(change)
    with pytest.raises((ValueError, TypeError), match=match):
        mppca_log_prob(**args)
