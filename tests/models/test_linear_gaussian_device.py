"""PPCA and FactorAnalysis on device arrays: torch tensors (Triton) and cupy arrays (CuPy).

torch: on a CUDA machine the tensors live on the GPU; elsewhere they are CPU
tensors with ``FASTLVM_BACKEND=triton`` (PPCA's EM pass through Triton's
interpreter), the same code.  cupy: CuPy on a GPU, elsewhere the NumPy-backed
cupy of tests/kernels/fake_cupy.py with the CUDA kernels on the emulator.
Each device fit is compared with the host fit of the same rows.
"""

import contextlib
import warnings

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning

from fastlvm import PPCA, FactorAnalysis
from fastlvm.kernels.masked_latent_stats import IMPLEMENTATIONS as MASKED_STATS
from fastlvm.kernels.ppca_stats import IMPLEMENTATIONS as PPCA_STATS
from tests.conftest import CUDA, HAS_TRITON, to_numpy

torch = pytest.importorskip("torch")
DEVICE = "cuda" if CUDA else "cpu"

# (estimator, its settings): PPCA both ways, FactorAnalysis with a rotation
MODELS = [
    (PPCA, dict(n_components=2)),
    (PPCA, dict(n_components=2, method="em", max_iter=4, tol=0.0, random_state=0)),
    (FactorAnalysis, dict(n_components=2, rotation="varimax")),
]
MODEL_IDS = ["ppca-closed_form", "ppca-em", "factor_analysis"]
FITTED = {PPCA: ("mean_", "components_", "explained_variance_", "explained_variance_ratio_"),
          FactorAnalysis: ("mean_", "components_", "noise_variance_")}


@pytest.fixture(params=["torch", "cupy"])
def device_rows(request):
    """A function that puts a host array where the backend fits it."""
    if request.param == "cupy":
        cupy = request.getfixturevalue("cupy")
        return lambda a: cupy.asarray(a)
    if not HAS_TRITON:
        pytest.skip("triton is not installed (pip install 'fastlvm[triton]')")
    request.getfixturevalue("torch_device_path")
    return lambda a: torch.as_tensor(a, device=DEVICE)


def _data(n=120, d=6, q=2, dtype=np.float64, seed=0):
    """Rows near a q-dimensional subspace, away from the origin."""
    rng = np.random.default_rng(seed)
    X = (rng.standard_normal((n, q)) @ (2 * rng.standard_normal((q, d)))
         + 0.4 * rng.standard_normal((n, d)) * rng.uniform(0.5, 2.0, d) + 5.0)
    return X.astype(dtype)


def _host(fit):
    """``fit()`` with no backend override: the host (Numba) path."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("FASTLVM_BACKEND", raising=False)
        return fit()


def _fit_both(cls, kw, X, device_rows):
    """(host fit, device fit) of X with the same settings."""
    with _convergence_warnings_ignored():
        return _host(lambda: cls(**kw).fit(X)), cls(**kw).fit(device_rows(X))


@contextlib.contextmanager
def _convergence_warnings_ignored():
    """'em' with tol=0 stops at max_iter and warns: expected, and not the point."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        yield


def _device_passes_counted(monkeypatch, implementations, X):
    """[calls of the implementation in ``implementations`` (an op's table) of X's
    device backend], updated as they happen."""
    backend = "triton" if isinstance(X, torch.Tensor) else "cupy"
    calls = [0]
    device_pass = implementations[backend]

    def counted(*args, **kwargs):
        calls[0] += 1
        return device_pass(*args, **kwargs)

    monkeypatch.setitem(implementations, backend, counted)
    return calls


def _assert_on_device(value, like):
    assert type(value) is type(like), type(value)
    assert value.dtype in (np.float64, torch.float64), value.dtype
    assert value.device == like.device


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("cls, kw", MODELS, ids=MODEL_IDS)
def test_device_fit_matches_the_host_fit(cls, kw, dtype, device_rows, monkeypatch):
    X = _data(dtype=dtype)
    # the scatter matrix is float64 arithmetic on either dtype; EM's passes run in
    # float32 on float32 rows (the GPU's products in tf32x3), four iterations
    rtol = 1e-3 if dtype == np.float32 and kw.get("method") == "em" else 1e-9
    Xd = device_rows(X)
    passes = _device_passes_counted(monkeypatch, PPCA_STATS, Xd)
    host, dev = _fit_both(cls, kw, X, device_rows)
    # PPCA's EM passes ran on the device kernels, one an iteration
    assert passes == ([kw["max_iter"]] if kw.get("method") == "em" else [0])
    for name in FITTED[cls]:
        value = getattr(dev, name)
        _assert_on_device(value, Xd)
        np.testing.assert_allclose(to_numpy(value), getattr(host, name), rtol=rtol,
                                   atol=rtol * np.abs(getattr(host, name)).max(), err_msg=name)
    if cls is PPCA:
        assert dev.noise_variance_ == pytest.approx(host.noise_variance_, rel=rtol)
        np.testing.assert_allclose(dev.lower_bounds_, host.lower_bounds_, rtol=rtol)
        assert dev.lower_bound_ == pytest.approx(host.lower_bound_, rel=rtol)
    else:
        np.testing.assert_allclose(dev.loglike_, host.loglike_, rtol=rtol)
    assert dev.n_iter_ == host.n_iter_

    Z = dev.transform(Xd)
    assert type(Z) is type(Xd) and Z.shape == (X.shape[0], 2)
    z_rtol = max(rtol, 1e-6 if Z.dtype in (np.float32, torch.float32) else 0.0)  # rounded
    np.testing.assert_allclose(to_numpy(Z), host.transform(X), rtol=z_rtol, atol=z_rtol * 10)
    log_p = dev.score_samples(Xd)
    _assert_on_device(log_p, Xd)
    np.testing.assert_allclose(to_numpy(log_p), host.score_samples(X), rtol=rtol)
    assert dev.score(Xd) == pytest.approx(host.score(X), rel=rtol)
    for method in ("get_covariance", "get_precision"):
        value = getattr(dev, method)()
        _assert_on_device(value, Xd)
        ref = getattr(host, method)()
        np.testing.assert_allclose(to_numpy(value), ref, rtol=rtol,
                                   atol=rtol * np.abs(ref).max(), err_msg=method)
    if cls is PPCA:
        assert Z.dtype == Xd.dtype  # PPCA's transform keeps X's dtype, as on the host
        back = dev.inverse_transform(Z)
        _assert_on_device(back, Xd)
        np.testing.assert_allclose(to_numpy(back), host.inverse_transform(to_numpy(Z)),
                                   rtol=rtol)
        rows = dev.sample(5, random_state=3)
        _assert_on_device(rows, Xd)
        np.testing.assert_allclose(to_numpy(rows), host.sample(5, random_state=3),
                                   rtol=rtol)


@pytest.mark.parametrize("cls, kw", MODELS, ids=MODEL_IDS)
def test_device_sample_weight_equals_repeated_rows(cls, kw, device_rows):
    X = _data(n=80)
    reps = np.random.default_rng(3).integers(1, 4, X.shape[0])
    with _convergence_warnings_ignored():
        weighted = cls(**kw).fit(device_rows(X), sample_weight=device_rows(reps.astype(float)))
        repeated = _host(lambda: cls(**kw).fit(np.repeat(X, reps, axis=0)))
    for name in FITTED[cls]:
        expected = getattr(repeated, name)
        np.testing.assert_allclose(to_numpy(getattr(weighted, name)), expected, rtol=1e-8,
                                   atol=1e-8 * np.abs(expected).max(), err_msg=name)


@pytest.mark.parametrize("cls", [PPCA, FactorAnalysis])
def test_device_partial_fit_streams_exactly(cls, device_rows):
    X = _data(n=150)
    model = cls(n_components=2)
    for start in range(0, 150, 50):
        model.partial_fit(device_rows(X[start:start + 50]))
    whole = _host(lambda: cls(n_components=2).fit(X))
    for name in FITTED[cls]:
        value = getattr(model, name)
        _assert_on_device(value, device_rows(X[:1]))
        np.testing.assert_allclose(to_numpy(value), getattr(whole, name), rtol=1e-9,
                                   atol=1e-12, err_msg=name)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("cls", [PPCA, FactorAnalysis])
def test_device_missing_entries_fit_as_on_the_host(cls, dtype, device_rows, monkeypatch):
    """Rows with missing entries (NaN): EM over the observed entries on the device
    (``masked_latent_stats``' device backend each iteration), predictions of
    partly observed rows there too, equal to the host's."""
    X = _data(n=90, dtype=dtype)
    X[np.random.default_rng(1).random(X.shape) < 0.15] = np.nan
    X[:, 0][np.isnan(X).all(1)] = 1.0  # every row keeps an entry
    Xd = device_rows(X)
    passes = _device_passes_counted(monkeypatch, MASKED_STATS, Xd)
    kw = dict(n_components=2, max_iter=5, tol=0.0)
    host, dev = _fit_both(cls, kw, X, device_rows)
    assert passes == [5]
    rtol = 1e-8  # float64 arithmetic for either dtype
    for name in FITTED[cls][:2] + ("noise_variance_",):
        value = getattr(dev, name)
        if cls is FactorAnalysis or name != "noise_variance_":
            _assert_on_device(value, Xd)
        np.testing.assert_allclose(to_numpy(value), getattr(host, name), rtol=rtol,
                                   atol=rtol * np.abs(getattr(host, name)).max(), err_msg=name)
    bounds = dev.lower_bounds_ if cls is PPCA else dev.loglike_
    np.testing.assert_allclose(bounds, host.lower_bounds_ if cls is PPCA else host.loglike_,
                               rtol=rtol)
    Z = dev.transform(Xd)
    assert type(Z) is type(Xd) and Z.dtype == (Xd.dtype if cls is PPCA else Z.dtype)
    np.testing.assert_allclose(to_numpy(Z), _host(lambda: host.transform(X)), rtol=1e-6,
                               atol=1e-6)
    np.testing.assert_allclose(to_numpy(dev.score_samples(Xd)),
                               _host(lambda: host.score_samples(X)), rtol=1e-8)


@pytest.mark.parametrize("cls", [PPCA, FactorAnalysis])
def test_device_rows_meet_clear_errors(cls, device_rows):
    X = _data(n=60)
    Xd = device_rows(X)
    name = cls.__name__
    infinite = X.copy()
    infinite[3, 1] = np.inf
    with pytest.raises(ValueError, match="X contains infinity; only NaN marks a missing"):
        cls(n_components=2).fit(device_rows(infinite))
    empty_row = X.copy()
    empty_row[4] = np.nan
    with pytest.raises(ValueError, match=r"1 row\(s\) with every entry missing \(first: row 4"):
        cls(n_components=2).fit(device_rows(empty_row))
    with pytest.raises(ValueError, match="partial_fit takes complete rows"):
        cls(n_components=2).partial_fit(device_rows(np.where(np.isinf(infinite), np.nan, X)))
    with pytest.raises(TypeError, match="float32 or float64"):
        cls(n_components=2).fit(device_rows(X.astype(np.int64)))
    with pytest.raises(ValueError, match="minimum of 2 is required"):
        cls(n_components=2).fit(Xd[:1])
    model = cls(n_components=2).fit(Xd)
    with pytest.raises(ValueError, match=rf"This {name} was fitted on (a torch tensor|a cupy)"):
        model.transform(X)  # host rows to a model whose parameters are on a device
    with pytest.raises(ValueError, match=rf"This {name} was fitted on (a torch tensor|a cupy)"):
        model.partial_fit(X)
    with pytest.raises(ValueError, match="expecting 6 features"):
        model.score_samples(Xd[:, :5])
    host = _host(lambda: cls(n_components=2).fit(X))
    with pytest.raises(ValueError, match=rf"This {name} was fitted on a host array"):
        host.score_samples(Xd)
    if cls is PPCA:
        with pytest.raises(ValueError, match="n_components must be smaller"):
            PPCA(n_components=6).fit(Xd)
        with pytest.raises(ValueError, match=r"Z must have shape \(n_samples, 2\)"):
            model.inverse_transform(Xd[:, :3])
        with pytest.raises(ValueError, match=r"fitted on a host array \(NumPy\); pass Z"):
            host.inverse_transform(model.transform(Xd))


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("weighted", [False, True])
def test_a_torch_em_iteration_reads_its_statistics_back_at_once(weighted, torch_device_path):
    """PPCA's EM pass on torch tensors keeps its sums on the device and reads the
    bound, |c|^2, the (D, q) cross moments and the total weight back in one copy:
    an iteration waits for the device once (three reads of a single value did,
    four with weights, and a copy)."""
    from tests import torch_graphs

    X = torch.as_tensor(_data(dtype=np.float32), device=DEVICE)
    sw = (torch.as_tensor(np.random.default_rng(1).random(X.shape[0]) + 0.5, device=DEVICE)
          if weighted else None)
    kw = dict(n_components=2, method="em", tol=0.0, random_state=0)
    waits, fits = torch_graphs.waits_beyond(
        lambda iterations: PPCA(max_iter=iterations, **kw).fit(X, sample_weight=sw), 2, 5)
    assert waits == ["Tensor.numpy"] * 3, waits
    assert fits[1].lower_bounds_[:2] == fits[0].lower_bounds_


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("cls", [PPCA, FactorAnalysis])
def test_a_torch_missing_data_iteration_reads_its_statistics_back_at_once(cls,
                                                                          torch_device_path):
    """The missing-data EM on torch tensors reads an iteration's sums (bound,
    second moments, cross moments, total weight) back in one copy: an iteration
    waits for the device once (the bound's read did too, and the total weight's,
    beside five copies)."""
    from tests import torch_graphs

    rng = np.random.default_rng(2)
    X = _data()
    X[rng.random(X.shape) < 0.15] = np.nan
    X = torch.as_tensor(X, device=DEVICE)
    sw = torch.as_tensor(rng.random(X.shape[0]) + 0.5, device=DEVICE)
    waits, fits = torch_graphs.waits_beyond(
        lambda iterations: cls(n_components=2, max_iter=iterations,
                               tol=0.0).fit(X, sample_weight=sw), 2, 5)
    assert waits == ["Tensor.numpy"] * 3, waits
    bounds = [m.loglike_ if cls is FactorAnalysis else m.lower_bounds_ for m in fits]
    assert list(bounds[1][:2]) == list(bounds[0])


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("method", ["transform", "score_samples"])
@pytest.mark.parametrize("cls", [PPCA, FactorAnalysis])
def test_device_predictions_wait_twice_over_any_number_of_blocks(cls, method,
                                                                 torch_device_path):
    """A prediction on torch rows waits for the device twice: one read of the rows'
    sum answers both the infinity and the missing-entry checks (they were a read
    each), and the parameters come to the host in one copy (PPCA's transform:
    its kept projection's equality).  PPCA's log-density read the components
    back and copied M^-1 to the device in every block of rows, behind the last
    block's work: six blocks here waited 2 + 6 times."""
    from tests import torch_graphs

    X = _data(n=60)
    Xd = torch.as_tensor(X, device=DEVICE)
    model = cls(n_components=2, chunk_size=10).fit(Xd)
    with torch_graphs.counted_waits() as waits:
        out = getattr(model, method)(Xd)
    assert len(waits) == 2, waits
    host = _host(lambda: getattr(cls(n_components=2).fit(X), method)(X))
    np.testing.assert_allclose(to_numpy(out), host, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cls", [PPCA, FactorAnalysis])
@pytest.mark.parametrize("where", ["fit", "partial_fit", "transform", "score_samples"])
def test_infinity_is_refused_beside_missing_entries(cls, where, device_rows):
    """Device rows holding an infinity are refused on every path that takes NaN,
    with NaN in the rows too: the check that reads the rows' sum once looks at
    the entries when the sum is not finite."""
    X = _data(n=60)
    bad = X.copy()
    bad[3, 1], bad[5, 2] = np.inf, np.nan
    if where in ("fit", "partial_fit"):
        call = getattr(cls(n_components=2), where)
    else:
        call = getattr(cls(n_components=2).fit(device_rows(X)), where)
    with pytest.raises(ValueError, match="X contains infinity; only NaN marks a missing"):
        call(device_rows(bad))


def test_missing_entries_are_found_from_one_read_of_the_sum(device_rows):
    """``has_missing`` on device rows: finite rows answer from their sum; rows with
    NaN, or whose sum overflows with every entry finite, are looked at."""
    from fastlvm.decomposition._masked_em import has_missing

    X = _data(n=60)
    missing = X.copy()
    missing[5, 2] = np.nan
    huge = X.copy()
    huge[:, 0] = 1e308  # the sum overflows; no entry is infinite or missing
    assert has_missing(device_rows(X)) is False
    assert has_missing(device_rows(missing)) is True
    assert has_missing(device_rows(huge)) is False
