"""The Triton kernels past int32: rows whose element offsets pass 2^31, and row
counts the kernels' int32 row indices cannot reach.

Three rows 2^30 elements apart stand for a large array: X is a strided view over
2^31 + D float32 elements whose untouched pages the operating system never backs
(8 GiB of address space and a few pages of memory on the CPU; real device memory
on a GPU, where the test skips unless three times that is free).  Before the row
offsets were taken in int64, the third row's offset (2^31) wrapped negative: a
segfault under the interpreter, a wrong read or an illegal address on a GPU.
"""

import numpy as np
import pytest

from tests.conftest import (CUDA, HAS_TRITON, assert_mppca_stats_close, make_params,
                            mppca_problem, untouched_storage)
from tests.tolerances import assert_close

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
torch = pytest.importorskip("torch")

ROW_STRIDE = 2**30  # the third row starts at element 2^31


@pytest.fixture(autouse=True)
def _release_device_memory():
    """Hand each test's gigabytes back to the device (the caching allocator would
    keep them for this worker alone)."""
    yield
    if CUDA:
        torch.cuda.empty_cache()


def _far_rows(X):
    """``X`` (3 rows, NumPy) as a torch float tensor whose rows lie ROW_STRIDE
    elements apart, on the Triton backend's device: 2^31 elements of storage and
    one row more (8 GiB of address space on the CPU; of device memory on a GPU)."""
    n, d = X.shape
    size = (n - 1) * ROW_STRIDE + d
    if CUDA:
        _room_on_the_gpu(size * X.itemsize)
    try:
        storage = (torch.empty(size, dtype=torch.from_numpy(X).dtype, device="cuda") if CUDA
                   else torch.from_numpy(untouched_storage(size, X.dtype)))
    except (RuntimeError, MemoryError) as exc:  # no room for the address space here
        pytest.skip(f"cannot reserve {size * X.itemsize / 2**30:.0f} GiB: {exc}")
    far = storage.as_strided((n, d), (ROW_STRIDE, 1))
    far.copy_(torch.from_numpy(X))
    assert (n - 1) * ROW_STRIDE >= 2**31
    return far


def _numpy(t):
    return t.detach().cpu().numpy()


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_gaussian_log_prob_reads_rows_past_2_31(covariance_type, rng, monkeypatch):
    from fastlvm.kernels import gaussian_log_prob, gaussian_log_prob_ref

    X = rng.standard_normal((3, 5)).astype(np.float32)
    means, pc = rng.standard_normal((4, 5)), make_params(rng, covariance_type, 4, 5)
    monkeypatch.setenv("FASTLVM_BACKEND", "triton")
    got = gaussian_log_prob(_far_rows(X), means, pc, covariance_type)
    assert_close(_numpy(got), gaussian_log_prob_ref(X, means, pc, covariance_type), np.float32)


@pytest.mark.parametrize("covariance_type, k", [("diag", 3), ("spherical", 40)])
def test_estep_stats_reads_rows_past_2_31(covariance_type, k, rng, monkeypatch):
    """K = 3 takes the one-pass statistics kernel, K = 40 (past one component tile)
    the chunked path."""
    from fastlvm.kernels import estep_stats
    from tests.conftest import assert_estep_matches_reference

    X = rng.standard_normal((3, 5)).astype(np.float32)
    weights = np.full(k, 1.0 / k)
    means, pc = rng.standard_normal((k, 5)), make_params(rng, covariance_type, k, 5)
    monkeypatch.setenv("FASTLVM_BACKEND", "triton")
    got = estep_stats(_far_rows(X), weights, means, pc, covariance_type)
    assert_estep_matches_reference(got, X, weights, means, pc, covariance_type, None,
                                   np.float32)


def test_log_responsibilities_reads_and_writes_rows_past_2_31(rng, monkeypatch):
    from fastlvm.kernels import log_responsibilities, log_responsibilities_ref

    V = (rng.standard_normal((3, 6)) * 5).astype(np.float32)
    monkeypatch.setenv("FASTLVM_BACKEND", "triton")
    resp, norm = log_responsibilities(_far_rows(V))
    ref_resp, ref_norm = log_responsibilities_ref(V)
    assert_close(_numpy(resp), ref_resp, np.float32)
    assert_close(_numpy(norm), ref_norm, np.float32)


def test_mppca_kernels_read_rows_past_2_31(rng, monkeypatch):
    from fastlvm.kernels import (mppca_log_prob, mppca_log_prob_ref, mppca_stats,
                                 mppca_stats_ref)

    X, weights, means, comp, noise = mppca_problem(rng, (3, 6, 2, 2), np.float32)
    far = _far_rows(X)
    monkeypatch.setenv("FASTLVM_BACKEND", "triton")
    assert_close(_numpy(mppca_log_prob(far, means, comp, noise)),
                 mppca_log_prob_ref(X, means, comp, noise), np.float32)
    assert_mppca_stats_close(mppca_stats(far, weights, means, comp, noise),
                        mppca_stats_ref(X, weights, means, comp, noise), np.float32)


@pytest.mark.parametrize("entry", ["gaussian", "low_rank", "log_responsibilities"])
def test_row_counts_past_int32_are_refused(entry):
    """2^31 rows (a stride-0 expansion of one row: no memory) get the error that
    names the limit and the ways round it from the Triton launchers' common entry
    points (the Gaussian and low-rank parameters every E-step, log-density and
    fused iteration builds from X, and the log-responsibilities launcher), before
    anything is allocated or launched."""
    from fastlvm.kernels._triton_gaussian import GaussianTileParams
    from fastlvm.kernels._triton_low_rank import TritonLowRankParams
    from fastlvm.kernels.log_responsibilities._triton import log_responsibilities_triton

    X = torch.zeros(1, 4).expand(2**31, 4)
    means = np.zeros((2, 4))
    call = {
        "gaussian": lambda: GaussianTileParams(X, means, np.ones((2, 4)), "diag"),
        "low_rank": lambda: TritonLowRankParams(X, means, np.ones((2, 1, 4)), np.ones(2)),
        "log_responsibilities": lambda: log_responsibilities_triton(X),
    }[entry]
    with pytest.raises(ValueError, match=r"2,147,483,648 rows.*int32.*partial_fit"):
        call()
    # and the largest count they take passes the check
    from fastlvm.kernels._triton_gaussian import MAX_ROWS, require_int32_rows

    require_int32_rows(MAX_ROWS)


def _room_on_the_gpu(n_bytes):
    """Skip unless a GPU has three times ``n_bytes`` free (the test's arrays, with
    room for other tests running beside it)."""
    if not CUDA:
        pytest.skip("an output of 2^31 elements needs 8 GiB of device memory: GPU only "
                    "(the interpreter would write every element)")
    free, _ = torch.cuda.mem_get_info()
    if free < 3 * n_bytes:
        pytest.skip(f"needs {3 * n_bytes / 2**30:.0f} GiB free on the GPU, has "
                    f"{free / 2**30:.0f}")


@pytest.mark.parametrize("op", ["gaussian_log_prob", "log_responsibilities", "mppca_log_prob"])
def test_outputs_past_2_31_elements_on_a_gpu(op, monkeypatch):
    """n x K outputs of 2^31 + 1024 elements: the last row, written at offsets
    past 2^31, against the reference on those rows."""
    from fastlvm import kernels

    n, k, d = 2**21 + 1, 1024, 2
    _room_on_the_gpu(2 * n * k * 4)
    g = torch.Generator(device="cuda").manual_seed(0)
    rng = np.random.default_rng(0)
    means = rng.standard_normal((k, d))
    monkeypatch.setenv("FASTLVM_BACKEND", "triton")
    if op == "log_responsibilities":
        V = torch.randn(n, k, device="cuda", generator=g)
        got = kernels.log_responsibilities(V)[0][-3:]
        want = kernels.log_responsibilities_ref(_numpy(V[-3:]))[0]
    else:
        X = torch.randn(n, d, device="cuda", generator=g)
        if op == "gaussian_log_prob":
            pc = np.ones((k, d))
            got = kernels.gaussian_log_prob(X, means, pc, "diag")[-3:]
            want = kernels.gaussian_log_prob_ref(_numpy(X[-3:]), means, pc, "diag")
        else:
            comp, noise = np.ones((k, 1, d)) * 0.5, np.ones(k)
            got = kernels.mppca_log_prob(X, means, comp, noise)[-3:]
            want = kernels.mppca_log_prob_ref(_numpy(X[-3:]), means, comp, noise)
    assert_close(_numpy(got), want, np.float32)


@pytest.mark.parametrize("bound", ["elbo", "iwae_bound"])
def test_vae_decoder_outputs_past_int32_are_refused(bound):
    """The VAE kernels' offsets stay int32: a decoder output of 2^31 elements (an
    expansion: no memory) gets the error naming the limit, before any launch."""
    from fastlvm.kernels.variational_bounds import _triton as vb

    dec = torch.zeros(1, 1, 1).expand(2, 2**30, 1)
    x = mu = torch.zeros(1, 1).expand(2**30, 1)
    call = {"elbo": lambda: vb.elbo_triton(x, dec, None, mu, mu, "bernoulli"),
            "iwae_bound": lambda: vb.iwae_bound_triton(x, dec, None, dec, mu, mu, "bernoulli",
                                                       "reparam")}[bound]
    with pytest.raises(ValueError, match=r"2,147,483,648 elements.*int32.*Split the batch"):
        call()
