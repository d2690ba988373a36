import sys
import types

import numpy as np
import pytest

from fastlvm import _dispatch
from fastlvm.kernels import BACKENDS, gaussian_log_prob


def test_backend_table_lists_every_op():
    assert set(BACKENDS) == {"gaussian_log_prob", "log_responsibilities", "estep_stats",
                             "lloyd_step", "kmeans_potentials", "min_sq_dist", "label_stats",
                             "ppca_stats",
                             "masked_latent_stats", "masked_posterior", "mppca_log_prob",
                             "mppca_stats",
                             "gaussian_kl", "log_mean_exp", "elbo", "iwae_bound"}
    for backends in BACKENDS.values():
        assert {"reference", "numba"} <= set(backends)


@pytest.mark.parametrize("backend", ["triton", "cupy"])
def test_unmet_request_raises_and_lists_backends(backend, monkeypatch):
    monkeypatch.setenv("FASTLVM_BACKEND", backend)
    with pytest.raises(NotImplementedError, match="reference, numba"):
        gaussian_log_prob(np.zeros((2, 2)), np.zeros((1, 2)), np.ones(1), "spherical")


def test_unknown_backend_name(monkeypatch):
    monkeypatch.setenv("FASTLVM_BACKEND", "fortran")
    with pytest.raises(ValueError, match="FASTLVM_BACKEND"):
        gaussian_log_prob(np.zeros((2, 2)), np.zeros((1, 2)), np.ones(1), "spherical")


def test_default_is_numba_for_numpy():
    backend, _ = _dispatch.resolve("op", {"numba": 1, "reference": 2}, np.zeros(1))
    assert backend == "numba"


def test_import_does_not_import_gpu_libraries():
    import subprocess
    import sys

    code = ("import sys, fastlvm, fastlvm.kernels; "
            "bad = [m for m in ('torch', 'triton', 'cupy') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_torch_cpu_tensor_zero_copy_roundtrip():
    torch = pytest.importorskip("torch")
    X = torch.randn(50, 3, dtype=torch.float64)
    out = gaussian_log_prob(X, np.zeros((2, 3)), np.ones(2), "spherical")
    assert isinstance(out, torch.Tensor) and out.shape == (50, 2)
    ref = gaussian_log_prob(X.numpy(), np.zeros((2, 3)), np.ones(2), "spherical")
    np.testing.assert_allclose(out.numpy(), ref)


def test_torch_cpu_dtypes_numpy_lacks_are_refused_by_name():
    torch = pytest.importorskip("torch")
    from fastlvm.kernels import estep_stats

    X = np.random.default_rng(0).standard_normal((20, 3))
    params = (np.full(2, 0.5), np.zeros((2, 3)), np.stack([np.eye(3)] * 2), "full")
    with pytest.raises(TypeError, match=r"X is a torch.bfloat16 tensor.*X.to\(torch.float32\)"):
        estep_stats(torch.tensor(X).bfloat16(), *params)
    with pytest.raises(TypeError, match="sample_weight is a torch.bfloat16 tensor"):
        estep_stats(torch.tensor(X), *params, sample_weight=torch.ones(20).bfloat16())
    with pytest.raises(TypeError, match=r"float32 or float64; got float16.*X.to\(torch.float64\)"):
        gaussian_log_prob(torch.tensor(X).half(), *params[1:])
    # array-likes other than tensors go on to the checks, which convert them
    listed = estep_stats(X, *params, sample_weight=[2.0] * 20)
    np.testing.assert_allclose(listed.nk, 2 * estep_stats(X, *params).nk)


def test_fast_exp_accuracy():
    from fastlvm.kernels._numba_support import fast_exp_array

    for dtype, lo, rtol in ((np.float64, -708.3, 5e-14), (np.float32, -87.3, 5e-7)):
        x = np.concatenate([np.linspace(lo, 0, 100_001), [-np.inf, -1e6]]).astype(dtype)
        out = np.empty_like(x)
        fast_exp_array(x, out)
        np.testing.assert_allclose(out[:-2], np.exp(x[:-2].astype(np.float64)), rtol=rtol)
        assert out[-1] == 0 and out[-2] == 0


def test_fast_log_accuracy():
    """fast_log against numpy's log: within one ulp in float64 where fast-math
    keeps fdlibm's order of additions (the helper is compiled as exp_tile,
    its caller, is: without reassociation), and within one float32 ulp of the
    exact log for float32 input; +inf and NaN return themselves."""
    from fastlvm.kernels._numba_support import fast_log_array

    rng = np.random.default_rng(0)
    x = np.concatenate([1 + rng.random(200_000) * 63,      # the E-steps' row sums
                        np.geomspace(1, 1e300, 20_001),
                        1 + np.geomspace(1e-300, 1, 2001),   # just above 1
                        np.geomspace(2.3e-308, 1, 2001),     # normal numbers below 1
                        [1.0, 2.0, np.sqrt(2), np.sqrt(0.5), 2**52]])
    out = np.empty_like(x)
    fast_log_array(x, out)
    ref = np.log(x)
    assert (out[ref == 0] == 0).all()
    err = np.abs(out - ref)[ref != 0] / np.spacing(np.abs(ref[ref != 0]))
    assert err.max() <= 1.0
    x32 = x[(x > 1.2e-38) & (x < 3e38)].astype(np.float32)
    out32 = np.empty_like(x32)
    fast_log_array(x32, out32)
    ref32 = np.log(x32.astype(np.float64))
    assert np.all(np.abs(out32 - ref32) <= np.spacing(np.abs(ref32).astype(np.float32)))
    special = np.array([np.inf, np.nan])
    fast_log_array(special, special)
    assert special[0] == np.inf and np.isnan(special[1])


def test_log1p_unit_accuracy():
    """log1p_unit on [0, 1], the range every caller gives it (exp(-|v|)): within
    three ulps of numpy's log1p in float64 (the atanh series), and in float32
    within 1.2e-7 absolute and four float32 ulps (the division-free polynomial),
    exactly e for tiny e in both; NaN returns NaN."""
    import numba

    from fastlvm.kernels._numba_softplus import log1p_unit
    from fastlvm.kernels._numba_support import FASTMATH

    @numba.njit(fastmath=FASTMATH, error_model="numpy")
    def apply(e, out):
        for i in range(e.shape[0]):
            out[i] = log1p_unit(e[i])

    e = np.unique(np.concatenate([np.linspace(0, 1, 400_001), np.geomspace(1e-300, 1, 4001),
                                  [np.sqrt(2) - 1, np.nextafter(np.sqrt(2) - 1, 1)]]))
    out = np.empty_like(e)
    apply(e, out)
    ref = np.log1p(e)
    assert out[0] == 0 and np.array_equal(out[e < 1e-17], e[e < 1e-17])
    assert (np.abs(out - ref)[1:] / np.spacing(ref[1:])).max() <= 3.0
    e32 = e[(e == 0) | (e > 1.2e-38)].astype(np.float32)
    out32 = np.empty_like(e32)
    apply(e32, out32)
    ref32 = np.log1p(e32.astype(np.float64))
    err = np.abs(out32.astype(np.float64) - ref32)
    assert err.max() <= 1.2e-7
    assert (err[1:] / np.spacing(ref32[1:].astype(np.float32))).max() <= 4.0
    assert np.array_equal(out32[e32 < 1e-8], e32[e32 < 1e-8])
    nan = np.array([np.nan], dtype=np.float32)
    apply(nan, nan)
    assert np.isnan(nan[0])


def test_fast_expm1_accuracy():
    from fastlvm.kernels._numba_support import fast_expm1_array

    for dtype, lo, hi, rtol in ((np.float64, -700.0, 700.0, 1e-13),
                                (np.float32, -80.0, 80.0, 1e-6)):
        x = np.concatenate([np.linspace(lo, hi, 200_001), np.geomspace(1e-30, 0.6, 1001),
                            -np.geomspace(1e-30, 0.6, 1001), [0.0]]).astype(dtype)
        out = np.empty_like(x)
        fast_expm1_array(x, out)
        np.testing.assert_allclose(out, np.expm1(x.astype(np.float64)), rtol=rtol, atol=0)
    out = np.empty(2)
    fast_expm1_array(np.array([-np.inf, -1e6]), out)
    assert np.all(out == -1.0)


def test_gpu_backends_are_listed():
    for op in ("gaussian_log_prob", "log_responsibilities", "estep_stats", "mppca_log_prob",
               "mppca_stats", "ppca_stats", "masked_latent_stats", "masked_posterior"):
        assert "triton" in BACKENDS[op]
        assert "cupy" in BACKENDS[op]


def test_cupy_arrays_dispatch_to_cupy_without_importing_it(monkeypatch):
    class FakeCupyArray:
        pass

    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(ndarray=FakeCupyArray))
    x = FakeCupyArray()
    assert _dispatch.array_kind(x) == "cupy"
    backend, impl = _dispatch.resolve("op", {"numba": 1, "cupy": 2}, x)
    assert (backend, impl) == ("cupy", 2)
    with pytest.raises(NotImplementedError, match="no 'cupy' kernel.*reference, numba"):
        _dispatch.resolve("op", {"reference": 0, "numba": 1}, x)


def test_cupy_backend_refuses_other_arrays(monkeypatch):
    monkeypatch.setenv("FASTLVM_BACKEND", "cupy")
    impls = {"numba": 1, "cupy": 2}
    with pytest.raises(NotImplementedError, match=r"takes cupy arrays.*cupy.asarray\(X\)"):
        _dispatch.resolve("op", impls, np.zeros(2))
    torch = pytest.importorskip("torch")
    with pytest.raises(NotImplementedError, match="takes cupy arrays; got a torch-cpu"):
        _dispatch.resolve("op", impls, torch.zeros(2))


def test_a_torch_reference_runs_on_the_tensors_device(monkeypatch):
    """Host backends refuse device tensors; a backend named in ``any_device`` (the
    VAE losses' plain-torch references) runs on them, and the VAE ops say so.
    'meta' tensors stand in for CUDA ones: the dispatch sees a non-CPU device."""
    torch = pytest.importorskip("torch")
    from fastlvm.kernels import gaussian_kl

    monkeypatch.setenv("FASTLVM_BACKEND", "reference")
    x = torch.zeros(3, 4, device="meta")
    impls = {"reference": 0, "numba": 1}
    with pytest.raises(NotImplementedError, match="cannot run on a torch-cuda array"):
        _dispatch.resolve("op", impls, x)
    assert _dispatch.resolve("op", impls, x, any_device=("reference",)) == ("reference", 0)
    monkeypatch.setenv("FASTLVM_BACKEND", "numba")
    with pytest.raises(NotImplementedError, match="'numba' cannot run on a torch-cuda"):
        _dispatch.resolve("op", impls, x, any_device=("reference",))
    # the VAE losses take their reference on a device tensor
    monkeypatch.setenv("FASTLVM_BACKEND", "reference")
    out = gaussian_kl(x, torch.zeros(3, 4, device="meta"))
    assert out.shape == (3,) and out.device.type == "meta"


def test_gpu_arrays_off_the_current_device_are_refused_by_name(monkeypatch):
    """The Triton and CuPy kernels launch on the current GPU: an array on another one
    gets an error naming it and the remedy, and one on the current GPU passes."""
    class FakeCupyArray:
        def __init__(self, device_id):
            self.device = types.SimpleNamespace(id=device_id)

    runtime = types.SimpleNamespace(getDevice=lambda: 0)
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(
        ndarray=FakeCupyArray, cuda=types.SimpleNamespace(runtime=runtime)))
    impls = {"numba": 1, "triton": 2, "cupy": 3}
    assert _dispatch.resolve("op", impls, FakeCupyArray(0)) == ("cupy", 3)
    with pytest.raises(ValueError, match=r"op: X is on GPU 1, but the current device is "
                                         r"GPU 0.*cupy.cuda.Device\(1\)"):
        _dispatch.resolve("op", impls, FakeCupyArray(1))
    runtime.getDevice = lambda: 1
    assert _dispatch.resolve("op", impls, FakeCupyArray(1)) == ("cupy", 3)

    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")

    class FakeCudaTensor:  # a CUDA tensor needs a GPU; the dispatch reads its device
        def __init__(self, index):
            self.device = torch.device("cuda", index)

    monkeypatch.setattr(_dispatch, "array_kind", lambda x: "torch-cuda")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert _dispatch.resolve("op", impls, FakeCudaTensor(0)) == ("triton", 2)
    with pytest.raises(ValueError, match=r"op: weights is on GPU 2, but the current device "
                                         r"is GPU 0.*torch.cuda.device\(2\)"):
        _dispatch.resolve("op", impls, FakeCudaTensor(2), name="weights")
