import numpy as np
import pytest
from scipy.special import logsumexp

from fastlvm.kernels import log_responsibilities, log_responsibilities_ref
from fastlvm.kernels.log_responsibilities import IMPLEMENTATIONS
from tests.conftest import DTYPES, backend_arrays, to_numpy
from tests.tolerances import assert_close


@pytest.mark.parametrize("backend", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (5, 1), (1, 7), (1001, 13), (64, 64)])
def test_matches_reference_and_scipy(backend, dtype, shape, rng, monkeypatch):
    V = (rng.standard_normal(shape) * 30 - 200).astype(dtype)
    monkeypatch.setenv("FASTLVM_BACKEND", backend)
    log_resp, log_norm = map(to_numpy, log_responsibilities(*backend_arrays(backend, V)))
    assert log_resp.dtype == dtype and log_norm.dtype == dtype
    ref_resp, ref_norm = log_responsibilities_ref(V)
    np.testing.assert_allclose(ref_norm, logsumexp(V.astype(np.float64), axis=1), rtol=1e-12)
    assert_close(log_norm, ref_norm, dtype)
    assert_close(np.exp(log_resp.astype(np.float64)), np.exp(ref_resp), dtype, scale=1.0)


@pytest.mark.parametrize("backend", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_infinities_and_huge_magnitudes(backend, dtype, monkeypatch):
    big = np.finfo(dtype).max / 4
    V = np.array([
        [-np.inf, 0.0, -np.inf],          # one finite entry: exactly one
        [-np.inf, -np.inf, -np.inf],      # nothing can claim the row
        [big, big, -big],                 # huge magnitudes, no overflow
        [-big, -big * 0.5, -big],         # huge negative
        [0.0, -1000.0, -np.inf],          # underflowing term is exactly zero
    ], dtype=dtype)
    monkeypatch.setenv("FASTLVM_BACKEND", backend)
    log_resp, log_norm = map(to_numpy, log_responsibilities(*backend_arrays(backend, V)))
    resp = np.exp(log_resp.astype(np.float64))
    np.testing.assert_array_equal(resp[0], [0.0, 1.0, 0.0])
    assert log_norm[0] == 0.0
    assert log_norm[1] == -np.inf and np.isnan(log_resp[1]).all()
    np.testing.assert_allclose(resp[2], [0.5, 0.5, 0.0], rtol=1e-6)
    assert float(log_norm[2]) == pytest.approx(float(big) + np.log(2), rel=1e-6)
    np.testing.assert_allclose(resp[3], [0.0, 1.0, 0.0])
    assert resp[4, 0] == 1.0 and resp[4, 1] == 0.0 and resp[4, 2] == 0.0


@pytest.mark.parametrize("backend", sorted(IMPLEMENTATIONS))
def test_nan_propagates(backend, monkeypatch):
    monkeypatch.setenv("FASTLVM_BACKEND", backend)
    V = np.array([[0.0, np.nan], [1.0, 2.0]])
    log_resp, log_norm = map(to_numpy, log_responsibilities(*backend_arrays(backend, V)))
    assert np.isnan(log_norm[0]) and np.isnan(log_resp[0]).all()
    assert np.isfinite(log_norm[1])


def test_needs_a_column():
    with pytest.raises(ValueError, match="at least one column"):
        log_responsibilities(np.zeros((3, 0)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_exp_tile_matches_numpy(dtype, rng):
    """``exp_tile`` is the fused E-steps' normaliser, on a (K, tile) block: each
    finite row gets its log-sum-exp in ``mx`` and 1 / (sum of exponentials) in
    ``s``; a row whose max is infinite or NaN keeps that max and gets s = NaN.
    Its last loop is branch-free (so that fast_log vectorises): the rows
    below cover both sides of that select, next to each other."""
    from fastlvm.kernels.log_responsibilities._numba import exp_tile

    k, tile, nb = 5, 40, 37
    big = float(np.finfo(dtype).max) / 4
    V = (rng.standard_normal((tile, k)) * 30 - 200).astype(dtype)
    V[1] = -np.inf                     # max -inf
    V[2, 3] = np.inf                   # max +inf
    V[3, 0] = np.nan                   # NaN in the row
    V[4] = [big, big, -big, 0.0, -1.0]  # huge magnitudes
    V[5, 1:] = -np.inf                 # one finite entry
    V[6] = [0.0, -1000.0, -np.inf, -50.0, -20.0]
    V[nb:] = np.nan                    # past nb: must not be read or written
    logp = np.ascontiguousarray(V.T)
    mx = np.full(tile, 7.0, dtype=dtype)
    s = np.full(tile, 7.0, dtype=dtype)
    resp = np.full_like(logp, 7.0)
    exp_tile(logp, nb, mx, s, resp)
    assert (mx[nb:] == 7.0).all() and (s[nb:] == 7.0).all() and (resp[:, nb:] == 7.0).all()
    V64 = V[:nb].astype(np.float64)
    with np.errstate(invalid="ignore"):
        peak = V64.max(axis=1)
    finite = np.isfinite(peak)
    assert finite.sum() == nb - 3
    ref_norm = logsumexp(V64[finite], axis=1)
    ref_sum = np.exp(V64[finite] - peak[finite, None]).sum(axis=1)
    assert_close(mx[:nb][finite], ref_norm, dtype)
    assert_close(s[:nb][finite], 1.0 / ref_sum, dtype, scale=1.0)
    assert_close(resp[:, :nb].T[finite], np.exp(V64[finite] - peak[finite, None]), dtype,
                 scale=1.0)
    assert mx[1] == -np.inf and mx[2] == np.inf and np.isnan(mx[3])
    assert np.isnan(s[1]) and np.isnan(s[2]) and np.isnan(s[3])
    assert mx[5] == V[5, 0] and s[5] == 1.0
