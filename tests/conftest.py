import os

# Test processes share few cores (CI: up to 4 xdist workers on 2), and an OpenMP
# runtime's workers spin for milliseconds after each parallel region -- torch's
# libgomp after every torch op, and after fastlvm's kernels once they run on
# torch's team (kernels/_openmp_team.py) -- taking the cores the other processes
# need.  Passive workers sleep instead: a subset of the suite (the VAE and
# GaussianMixture tests, 4 workers, 2-vCPU VM, 2026-12-03) took 81-86 s against
# 95-105 s spinning, in alternating runs.  It must be set before any OpenMP
# runtime loads (torch, sklearn); a value in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import importlib  # noqa: E402
import importlib.util  # noqa: E402
import sys  # noqa: E402
import types  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from fastlvm._arrays import is_cupy  # noqa: E402
from fastlvm._dispatch import triton_interpreter_on  # noqa: E402


def _cuda_available():
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


CUDA = _cuda_available()
# Triton kernels run on the CPU through Triton's interpreter when there is no GPU
# (how CI tests them).  It must be set before a Triton kernel module is imported;
# fastlvm imports those lazily, on the first Triton call.
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if importlib.util.find_spec("torch") is not None:
        # fastlvm's torch.empty / empty_like give NaN, as a GPU's fresh memory may
        # hold anything, so a read of an entry nobody wrote fails the test that made
        # it (tests/undefined_memory.py)
        from tests import undefined_memory

        undefined_memory.install()
HAS_TRITON = importlib.util.find_spec("triton") is not None
if HAS_TRITON and triton_interpreter_on():
    # each jit helper's language patching once per launch, not once per call
    # (tests/triton_interpreter.py): the interpreted E-step tests take 30-45% less time
    from tests import triton_bounds, triton_interpreter, triton_races

    triton_interpreter.install()
    # every interpreted load and store checked against the launch's tensor
    # arguments (tests/triton_bounds.py): an access a GPU would fault on, or
    # silently read or corrupt another buffer through, fails the test here
    triton_bounds.install()
    # and every launch's programs checked for stores another program loads or
    # stores (tests/triton_races.py): results a GPU's program order would change
    triton_races.install()


def _cupy_gpu_available():
    if importlib.util.find_spec("cupy") is None:
        return False
    import cupy

    try:
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # CUDA driver or runtime missing: CuPy imports but cannot run
        return False


CUPY_GPU = _cupy_gpu_available()

# (n_samples, n_features, n_components): odd shapes on purpose: n = 1, D = 1,
# K = 1, and n not a multiple of any tile size; D both odd and even, on and off
# the 4-wide register blocks (features are padded to a multiple of 4), K odd
# and even (components are processed in pairs).
SHAPES = [(1, 1, 1), (1, 3, 2), (7, 1, 3), (257, 5, 1), (1003, 7, 5), (600, 17, 4),
          (333, 8, 7), (130, 6, 2)]
DTYPES = [np.float64, np.float32]
COVARIANCE_TYPES = ["full", "tied", "diag", "spherical"]


def grouped_blobs(rng, n, d, k, spread, offset=0.0, dtype=np.float64):
    """k groups of n // k unit-variance rows, group by group, around centres
    drawn as spread * N(0, I), all moved by ``offset``; shape (k * (n // k), d)."""
    centers = rng.standard_normal((k, d)) * spread
    X = np.vstack([rng.standard_normal((n // k, d)) + c for c in centers]) + offset
    return X.astype(dtype)


def make_params(rng, covariance_type, k, d):
    """Random, well-conditioned parameters in sklearn's parameterisation."""
    if covariance_type in ("full", "tied"):
        kk = k if covariance_type == "full" else 1
        u = np.triu(rng.standard_normal((kk, d, d)) * 0.3)
        idx = np.arange(d)
        u[:, idx, idx] = np.abs(u[:, idx, idx]) + 0.5
        pc = u if covariance_type == "full" else u[0]
    elif covariance_type == "diag":
        pc = rng.random((k, d)) + 0.5
    else:
        pc = rng.random(k) + 0.5
    return pc


def kernel_rows_per_call(monkeypatch, implementations, default_chunk_rows):
    """Spy on ``implementations["numba"]``, with ``fastlvm._config.DEFAULT_CHUNK_ROWS``
    set to ``default_chunk_rows`` for the test: returns the list to which each
    call appends its row count."""
    import fastlvm._config

    rows = []
    numba_impl = implementations["numba"]

    def counting(X, *args, **kwargs):
        rows.append(X.shape[0])
        return numba_impl(X, *args, **kwargs)

    monkeypatch.setitem(implementations, "numba", counting)
    monkeypatch.setattr(fastlvm._config, "DEFAULT_CHUNK_ROWS", default_chunk_rows)
    return rows


def rebound(test, **names):
    """A copy of the test function ``test`` whose globals ``names`` are rebound,
    its pytest marks (parametrize, filterwarnings) kept: sklearn's own tests run
    on fastlvm's classes."""
    copy = types.FunctionType(test.__code__, dict(test.__globals__, **names), test.__name__,
                              test.__defaults__, test.__closure__)
    copy.__dict__.update(test.__dict__)
    return copy


COVARIANCE_FLAWS = ["nan", "inf", "not positive definite"]


def flawed_covariances(covariance_type, flaw, k=3, d=4):
    """Covariances in sklearn's shape for the type, with ``flaw`` (see
    ``COVARIANCE_FLAWS``): what the M-step's Cholesky must refuse.  ``flaw=None``:
    the same covariances, positive definite."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((k, d, d))
    cov = {"full": a @ a.swapaxes(1, 2) + np.eye(d), "tied": np.eye(d) + 0.1,
           "diag": rng.random((k, d)) + 0.1, "spherical": rng.random(k) + 0.1}[covariance_type]
    bad = {"nan": np.nan, "inf": np.inf}.get(flaw)
    flat = cov.reshape(-1)
    if flaw is None:
        pass
    elif bad is not None:
        flat[-1] = bad
    elif covariance_type in ("full", "tied"):  # symmetric, one negative eigenvalue
        cov[..., 0, 0] = -1.0
    else:
        flat[-1] = 0.0
    return cov


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
    monkeypatch.delenv("FASTLVM_BACKEND", raising=False)


# the CuPy backend's modules, by the name the tests reach them under
_BACKEND_MODULES = {
    "source": "fastlvm.kernels._cupy_source",
    "gauss": "fastlvm.kernels._cupy_gaussian",
    "estep": "fastlvm.kernels.estep_stats._cupy",
    "tiles": "fastlvm.kernels.estep_stats._cupy_tiles",
    "log_prob": "fastlvm.kernels.gaussian_log_prob._cupy",
    "log_resp": "fastlvm.kernels.log_responsibilities._cupy",
    "low_rank": "fastlvm.kernels._cupy_low_rank",
    "mppca_log_prob": "fastlvm.kernels.mppca_log_prob._cupy",
    "mppca_stats": "fastlvm.kernels.mppca_stats._cupy",
    "mstep": "fastlvm.kernels.gaussian_mstep._cupy",
    "tf32": "fastlvm.kernels._cupy_tf32",
}


@pytest.fixture
def cupy_backend(monkeypatch):
    """The CuPy backend's modules imported against the NumPy-backed cupy of
    ``tests/kernels/fake_cupy.py`` (``.cupy``), whose kernels run on the CPU
    (``tests/kernels/cuda_emulator.py``)."""
    from tests.kernels import cuda_emulator, fake_cupy

    if not cuda_emulator.AVAILABLE:
        pytest.skip("the CUDA emulator needs g++ on Linux")
    cupy = fake_cupy.fake_cupy()
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    for name in _BACKEND_MODULES.values():
        monkeypatch.delitem(sys.modules, name, raising=False)
    yield types.SimpleNamespace(cupy=cupy, **{short: importlib.import_module(name)
                                              for short, name in _BACKEND_MODULES.items()})
    for name in _BACKEND_MODULES.values():  # never leave fake-bound modules behind
        sys.modules.pop(name, None)


@pytest.fixture
def torch_device_path(monkeypatch):
    """The device models' path for torch tensors: CUDA tensors on a GPU; elsewhere
    CPU tensors, which take it only when Triton is asked for
    (``FASTLVM_BACKEND=triton``, Triton's interpreter) and which then keep CUDA
    tensors' rules on host data (``tests/torch_device_rules.py``): read through
    NumPy, or a NumPy array or host tensor (made without ``device=``) among their
    operands, they raise.  For the device
    models' tests, whose every tensor stands for a CUDA one; a kernel test's
    reference tensors are host tensors, which the rules cannot tell from the
    stand-ins."""
    if CUDA:
        yield
        return
    from tests.torch_device_rules import host_data_refused

    monkeypatch.setenv("FASTLVM_BACKEND", "triton")
    with host_data_refused():
        yield


@pytest.fixture
def cupy(request):
    """CuPy where a GPU is, else the emulator's NumPy-backed cupy (installed as
    ``sys.modules['cupy']`` for the test, the backend imported against it: the
    ``cupy_backend`` fixture)."""
    if CUPY_GPU:
        import cupy

        return cupy
    return request.getfixturevalue("cupy_backend").cupy


# the largest data a grid test hands the emulator (tens of seconds a test beyond)
EMULATED_MAX_ELEMENTS = 8000


@pytest.fixture(autouse=True)
def _cupy_backend_param_on_the_emulator(request):
    """A test parametrized with ``backend='cupy'`` runs, where there is no GPU, on
    the emulator's cupy (the ``cupy_backend`` fixture), so ``backend_arrays``
    hands it device arrays there."""
    callspec = getattr(request.node, "callspec", None)
    if not CUPY_GPU and callspec is not None and callspec.params.get("backend") == "cupy":
        request.getfixturevalue("cupy_backend")


@pytest.fixture
def kernel_launches(monkeypatch):
    """{'triton': n, 'cupy': n}: the kernel launches the test makes on Triton's
    interpreter and on the CUDA emulator, a CuPy graph's launch counted as one (so
    a bench row meant for Triton that quietly ran on Numba shows)."""
    from triton.runtime.interpreter import GridExecutor

    from tests.kernels.cuda_emulator import EmulatedKernel
    from tests.kernels.fake_cupy import FakeGraph

    counts = {"triton": 0, "cupy": 0}
    for backend, cls, method in (("triton", GridExecutor, "__call__"),
                                 ("cupy", EmulatedKernel, "__call__"),
                                 ("cupy", FakeGraph, "launch")):
        def counted(self, *args, _call=getattr(cls, method), _backend=backend, **kwargs):
            counts[_backend] += 1
            return _call(self, *args, **kwargs)

        monkeypatch.setattr(cls, method, counted)
    return counts


# the bench scripts' dry runs (tests/test_*_script.py): on a GPU a session runs the
# scripts themselves; here Triton runs through its interpreter
SCRIPT_DRY_RUN = pytest.mark.skipif(
    not HAS_TRITON or CUDA, reason="on a GPU the script runs itself (bench/gpu_session.sh); "
    "here Triton needs its interpreter (pip install 'fastlvm[triton]')")


def bench_script(name, monkeypatch):
    """``bench/<name>.py`` imported as when it runs as a script: ``bench/`` on
    sys.path for its own imports, and imported afresh (so it binds the ``cupy``
    installed now)."""
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), "bench"))
    monkeypatch.delitem(sys.modules, name, raising=False)
    return importlib.import_module(name)


def script_output(capsys, failures=("ERROR",)):
    """The lines a bench script printed, after checking that none of ``failures``
    (the words its failed rows print) is among them."""
    printed = capsys.readouterr().out
    assert not any(word in printed for word in failures), printed
    return printed.splitlines()


def backend_arrays(backend, *arrays):
    """The arrays as the backend takes them: torch tensors (CUDA when present,
    else CPU under the interpreter) for 'triton', cupy arrays for 'cupy' (CuPy's on
    a GPU, else the emulator's, installed for a test parametrized with that
    backend or asking for the ``cupy`` fixture), unchanged otherwise."""
    if backend == "cupy":
        if CUPY_GPU:
            import cupy
        else:
            cupy = sys.modules.get("cupy")
            if not getattr(cupy, "EMULATED", False):
                pytest.skip("the cupy backend needs cupy and a CUDA GPU (pip install "
                            "'fastlvm[cupy]'), or the emulator (g++ on Linux)")
            if np.size(arrays[0]) > EMULATED_MAX_ELEMENTS:
                pytest.skip(f"over {EMULATED_MAX_ELEMENTS} elements: left to a GPU, since "
                            "the emulator runs each CUDA thread as a fiber "
                            "(test_cupy_emulated.py has shapes of its own for it)")
        return tuple(None if a is None else cupy.asarray(np.asarray(a)) for a in arrays)
    if backend != "triton":
        return arrays
    if not HAS_TRITON:
        pytest.skip("triton is not installed (pip install 'fastlvm[triton]')")
    import torch

    device = "cuda" if CUDA else "cpu"
    return tuple(None if a is None else torch.as_tensor(np.asarray(a), device=device)
                 for a in arrays)


def assert_estep_matches_reference(got, X, weights, means, pc, covariance_type,
                                   sample_weight, dtype):
    """A backend's E-step statistics (any array kind) equal the float64 reference's,
    compared around the reference's shift (the means): backends choose their own."""
    from fastlvm.kernels import EStepStats, estep_stats_ref
    from fastlvm.kernels.estep_stats import recenter
    from tests.tolerances import assert_close

    got = recenter(EStepStats(got[0], *map(to_numpy, got[1:])), means, covariance_type)
    ref = estep_stats_ref(X, weights, means, pc, covariance_type, sample_weight=sample_weight)
    assert_close(got.log_likelihood, ref[0], dtype, err_msg="log_likelihood")
    for name, a, b in zip(EStepStats._fields[1:], got[1:], ref[1:]):
        assert_close(a, b, dtype, err_msg=name)


def untouched_storage(size, dtype):
    """A NumPy array of ``size`` elements of ``dtype`` over address space whose pages
    the operating system backs only when touched (zeros until then): an anonymous
    mmap, not malloc, which the test command's MALLOC_PERTURB_ would fill through.
    Raises MemoryError where the address space cannot be had."""
    import mmap

    n_bytes = int(size) * np.dtype(dtype).itemsize
    try:
        return np.frombuffer(mmap.mmap(-1, n_bytes), dtype=dtype)
    except OSError as exc:
        raise MemoryError(f"cannot map {n_bytes} bytes: {exc}") from exc


def to_numpy(a):
    """NumPy copy of a NumPy array, torch tensor (any device), cupy array or scalar."""
    if hasattr(a, "detach"):
        return a.detach().cpu().numpy()
    if is_cupy(a):  # CuPy's, or the emulator's NumPy-backed stand-in
        return a.get()
    return np.asarray(a)


def assert_same_bits_across_thread_counts(run):
    """``run()`` gives the same bits with one Numba thread and with all of them
    (before, during and after the single-threaded call)."""
    import numba

    first = run()
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        single = run()
    finally:
        numba.set_num_threads(before)
    again = run()
    for a, b, c in zip(first, single, again):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)


def separated_clusters(rng, dtype, separation, n=4000, k=6, d=5, weighted=True):
    """Clusters ``separation`` standard deviations apart (per coordinate) under one
    correlated covariance, but for cluster 1, one deviation from cluster 0 (their
    rows' responsibilities split between the two), and a few rows at cluster
    2's mean."""
    means = rng.standard_normal((k, d)) * separation
    means[1] = means[0] + 1.0
    means = means.astype(dtype).astype(np.float64)
    a = rng.standard_normal((d, d)) * 0.3
    chol = np.linalg.cholesky(a @ a.T + np.eye(d))
    labels = rng.integers(k, size=n)
    X = means[labels] + rng.standard_normal((n, d)) @ chol.T
    X[:10] = means[2]
    pc = np.linalg.inv(chol).T  # upper: precision = pc pc^T
    weights = np.full(k, 1.0 / k)
    sw = rng.random(n) * 2 if weighted else None
    if weighted:
        sw[::7] = 0.0
    return X.astype(dtype), weights, means, pc, sw


def separated_float32_problem(rng, covariance_type):
    """A small float32 E-step (64 rows, K = 3, D = 2) of means 1000 deviations
    apart, two of them one deviation apart: (X, weights, means, precisions_cholesky)."""
    X, w, means, _, _ = separated_clusters(rng, np.float32, 1e3, n=64, k=3, d=2,
                                           weighted=False)
    return X, w, means, make_params(rng, covariance_type, 3, 2)


def assert_mixture_density_matches(out, X, w, means, pc, covariance_type):
    """The rows' log p(x) from weighted log-densities ``out`` (n, K) against the
    reference at float32's tolerance of its own size (a few nats), not of the
    far components' millions: what responsibilities and the bound are made of."""
    from scipy.special import logsumexp

    from fastlvm.kernels import gaussian_log_prob_ref
    from tests.tolerances import assert_close

    ref = gaussian_log_prob_ref(X, means, pc, covariance_type) + np.log(w)
    got = logsumexp(np.asarray(out, dtype=np.float64), axis=1)
    assert_close(got, logsumexp(ref, axis=1), np.float32)


# (n_samples, n_features, n_components, q): n = 1, K = 1, q = 1, q = D - 1, D and
# q on and off the 4-wide blocks, n not a multiple of any tile size
MPPCA_SHAPES = [(1, 2, 1, 1), (7, 3, 2, 2), (257, 5, 1, 1), (1003, 17, 4, 6),
                (600, 8, 3, 7), (130, 9, 5, 4)]


def mppca_problem(rng, shape, dtype, offset=20.0):
    """Data around K planted subspaces, and parameters near (not at) them.

    The means are representable in ``dtype``, so every backend centres on
    exactly the same point.
    """
    n, d, k, q = shape
    means = (rng.standard_normal((k, d)) * 4 + offset).astype(dtype).astype(np.float64)
    components = rng.standard_normal((k, q, d))
    labels = rng.integers(0, k, n)
    X = (means[labels] + np.einsum("nq,nqd->nd", rng.standard_normal((n, q)),
                                   components[labels])
         + rng.standard_normal((n, d)) * 0.7).astype(dtype)
    noise = 0.3 + rng.random(k)
    weights = rng.random(k) + 0.2
    return X, weights / weights.sum(), means, components * 1.1, noise


def assert_mppca_stats_close(got, ref, dtype):
    """Each statistic of ``got`` (an MPPCAStats of any backend's arrays) within
    ``dtype``'s tolerance of ``ref``'s."""
    from fastlvm.kernels import MPPCAStats
    from tests.tolerances import assert_close

    for name, a, b in zip(MPPCAStats._fields, got, ref):
        assert_close(to_numpy(a), b, dtype, err_msg=name)
