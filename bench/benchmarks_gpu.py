"""asv benchmarks for the GPU backends (Triton, CuPy) on a CUDA device.

Every timing ends with :func:`synchronize`, so asv measures the kernels, not
their launch; the ``track_*_bytes`` benchmarks read the device's allocator (asv's
``peakmem_`` would read the host's).  ``setup`` raises ``NotImplementedError``
where there is no CUDA device or no triton / cupy, which asv reports as skipped.
Kernel compilation happens in ``setup``.

The workloads' sizes are the module's constants and the device is ``DEVICE``:
``tests/test_benchmarks_gpu.py`` runs every cell at small sizes on the CPU
(Triton through its interpreter, CuPy on the CUDA emulator), so a cell that would
fail on a GPU fails there first.
"""

import numpy as np

COVS = ["full", "tied", "diag", "spherical"]

DEVICE = "cuda"  # 'cpu': the dry run's (the interpreter and the CUDA emulator)
FLASH_GMM = (1_000_000, 128, 1024)  # (N, D, K): Flash-GMM's E-step workload
CUPY_FULL_COMPONENTS = 64  # CuPy's 'full' E-step there: K = 64
WIDE_ROWS = (400_000, 16)  # (N, K) of the E-step on wide rows (D: the params)
EM_ITERATION = (1_000_000, 32, 16)  # (N, D, K) of one GaussianMixture EM iteration
MEMORY_10M = (10_000_000, 128, 1024)  # (N, D, K) of the E-step's memory beyond X
MPPCA_ROWS = {64: 1_000_000, 784: 250_000}  # rows of the MPPCA E-step, by D
MPPCA_COMPONENTS = (16, 4)  # its (K, q)
LINEAR_GAUSSIAN = (1_000_000, 128, 16)  # (N, D, q) of the PPCA and FactorAnalysis fits


def synchronize(backend):
    """Wait for the work queued on the device by ``backend`` (the torch or the cupy
    module).  On the CPU (``DEVICE = 'cpu'``) the calls returned with their work
    done."""
    if DEVICE == "cpu":
        return
    if backend.__name__ == "torch":
        backend.cuda.synchronize()
    else:
        backend.cuda.Device().synchronize()


def _cuda():
    """torch (with triton importable), or asv's skip."""
    try:
        import torch
        import triton  # noqa: F401
    except ImportError:
        raise NotImplementedError("needs torch and triton") from None
    if DEVICE == "cuda" and not torch.cuda.is_available():
        raise NotImplementedError("needs a CUDA device")
    return torch


def _cupy():
    """cupy, or asv's skip."""
    try:
        import cupy
    except ImportError:
        raise NotImplementedError("needs cupy (pip install 'fastlvm[cupy]')") from None
    if DEVICE == "cuda":
        try:
            devices = cupy.cuda.runtime.getDeviceCount()
        except cupy.cuda.runtime.CUDARuntimeError:
            devices = 0
        if not devices:
            raise NotImplementedError("needs a CUDA device")
    return cupy


def device_arrays(backend):
    """(the torch or cupy module, host array -> device array) for 'triton' or
    'cupy', or asv's skip where that backend cannot run."""
    if backend == "triton":
        torch = _cuda()
        return torch, lambda a: torch.as_tensor(a, device=DEVICE)
    cupy = _cupy()
    return cupy, cupy.asarray


def identity_precisions(cov, k, d):
    """Identity precisions (host float64) in sklearn's shape for ``cov``."""
    return {"full": np.broadcast_to(np.eye(d), (k, d, d)).copy(), "tied": np.eye(d),
            "diag": np.ones((k, d)), "spherical": np.ones(k)}[cov]


def standard_normal_rows(n, d, seed=0):
    """(n, d) float32 N(0, 1) rows on the host, the same for both backends."""
    return np.random.default_rng(seed).standard_normal((n, d), dtype=np.float32)


def torch_bytes_beyond(torch, fn):
    """Peak bytes torch's caching allocator held during ``fn()`` beyond what it held
    before."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


class PeakPool:
    """cupy allocations through the default pool, recording the peak in use."""

    def __init__(self, cupy):
        self.cupy, self.pool, self.peak = cupy, cupy.get_default_memory_pool(), 0

    def __enter__(self):
        self.peak = self.pool.used_bytes()
        self.cupy.cuda.set_allocator(self._malloc)
        return self

    def _malloc(self, size):
        mem = self.pool.malloc(size)
        self.peak = max(self.peak, self.pool.used_bytes())
        return mem

    def __exit__(self, *exc):
        self.cupy.cuda.set_allocator(self.pool.malloc)


def cupy_bytes_beyond(cupy, fn):
    """Peak bytes in use in cupy's default pool during ``fn()`` beyond what was in use
    before."""
    cupy.cuda.Device().synchronize()
    with PeakPool(cupy) as peak:
        base = peak.pool.used_bytes()
        fn()
        cupy.cuda.Device().synchronize()
    return peak.peak - base


class _TritonEStep:
    """One ``estep_stats_triton`` call on N(0, 1) rows, float32, K equal weights,
    the first K rows as means and identity precisions: set up (and compiled) by
    :meth:`prepare`, timed by :meth:`estep`."""

    timeout = 300

    def prepare(self, cov, n, d, k, large_k):
        torch = _cuda()
        from fastlvm.kernels.estep_stats._triton import estep_stats_triton

        g = torch.Generator(device=DEVICE).manual_seed(0)
        self.X = torch.randn(n, d, device=DEVICE, generator=g)
        self.args = (torch.full((k,), 1.0 / k, dtype=torch.float64, device=DEVICE),
                     self.X[:k].double(),
                     torch.as_tensor(identity_precisions(cov, k, d), device=DEVICE), cov)
        self.fn, self.torch, self.large_k = estep_stats_triton, torch, large_k
        self.estep()  # compile

    def estep(self):
        self.fn(self.X, *self.args, large_k=self.large_k)
        synchronize(self.torch)


class TritonEStepFlashGMM(_TritonEStep):
    """Flash-GMM's workload: one E-step with statistics, N=1M, D=128, K=1024; beyond
    one component tile, the chunks' stored log-densities (the default) or the
    log-densities recomputed beside the moments ('full' takes the latter either way)."""

    params = (COVS, ["tf32x3", "tf32"], ["chunked", "recompute"])
    param_names = ["covariance_type", "precision", "large_k"]

    def setup(self, cov, precision, large_k):
        import os

        if cov == "full" and large_k == "recompute":
            raise NotImplementedError("'full' has one path")  # asv skips the cell
        os.environ["FASTLVM_TRITON_PRECISION"] = precision
        self.prepare(cov, *FLASH_GMM, large_k)

    def teardown(self, *args):
        import os

        os.environ.pop("FASTLVM_TRITON_PRECISION", None)

    def time_estep(self, cov, precision, large_k):
        self.estep()


class TritonEStepWideRows(_TritonEStep):
    """One E-step with statistics on rows past 256 padded features, K = 16, float32
    (tf32x3): the chunked kernels, which step through the features ('full' and
    'tied''s scatter in square feature blocks), against the fused ones, which hold
    whole rows and spill there ('recompute'; at D = 768 float32 they still fit)."""

    params = (COVS, [300, 768], ["chunked", "recompute"])
    param_names = ["covariance_type", "n_features", "large_k"]

    def setup(self, cov, d, large_k):
        n, k = WIDE_ROWS
        self.prepare(cov, n, d, k, large_k)

    def time_estep(self, cov, d, large_k):
        self.estep()


def _em_iteration_data():
    """(X (N, D) float32 on the host, K): the EM-iteration workload, four offset
    groups of N(0, 1) rows (``EM_ITERATION``)."""
    n, d, k = EM_ITERATION
    rng = np.random.default_rng(0)
    return (rng.standard_normal((n, d)) + rng.integers(0, 4, (n, 1))).astype(np.float32), k


def _fitted(X, cov, k, cuda_graph):
    """A GaussianMixture after one EM iteration on ``X`` (a device array), and, with
    ``cuda_graph``, the warm-up iterations and the recording done, so the next
    iteration is a replay."""
    from fastlvm import GaussianMixture
    from fastlvm.mixture._device_em_step import GRAPH_WARMUP_STEPS

    gm = GaussianMixture(k, covariance_type=cov, init_params="random_from_data",
                         random_state=0, max_iter=1, cuda_graph=cuda_graph).fit(X)
    for _ in range(GRAPH_WARMUP_STEPS + 1 if cuda_graph else 0):
        gm._em_iteration(X, None)
    return gm


class _EMIteration:
    """One GaussianMixture EM iteration on the backend's arrays (float32); with
    ``cuda_graph`` the iterations timed are replays (setup runs the warm-up and the
    recording)."""

    params = (COVS, [False, True])
    param_names = ["covariance_type", "cuda_graph"]
    timeout = 300

    def setup(self, cov, cuda_graph):
        self.backend, to_device = device_arrays(self.backend_name)
        X, k = _em_iteration_data()
        self.X = to_device(X)
        self.gm = _fitted(self.X, cov, k, cuda_graph)
        synchronize(self.backend)

    def time_em_iteration(self, cov, cuda_graph):
        self.gm._em_iteration(self.X, None)
        synchronize(self.backend)


class TritonEMIteration(_EMIteration):
    __doc__ = _EMIteration.__doc__.replace("the backend's arrays", "a CUDA tensor")

    backend_name = "triton"


class CuPyEMIteration(_EMIteration):
    __doc__ = _EMIteration.__doc__.replace("the backend's arrays", "a cupy array")

    backend_name = "cupy"


class FitMemory:
    """Device memory a whole GaussianMixture fit (eager, ``max_iter`` = 10) needs
    beyond X, on the EM-iteration workload (bytes): the parameters, the chunks'
    buffers and the statistics, never N x K.  Eager only: a CuPy graph's capture
    allocates from a private pool this count does not see."""

    params = (["triton", "cupy"], COVS)
    param_names = ["backend", "covariance_type"]
    timeout = 300

    def setup(self, backend, cov):
        module, to_device = device_arrays(backend)
        self.X = to_device(_em_iteration_data()[0])
        bytes_beyond = torch_bytes_beyond if backend == "triton" else cupy_bytes_beyond
        self.bytes_beyond = lambda fn: bytes_beyond(module, fn)
        self.k = EM_ITERATION[2]
        self.fit(cov)  # compile

    def fit(self, cov):
        from fastlvm import GaussianMixture

        GaussianMixture(self.k, covariance_type=cov, init_params="random_from_data",
                        random_state=0, max_iter=10, tol=0, cuda_graph=False).fit(self.X)

    def track_fit_bytes_beyond_X(self, backend, cov):
        return self.bytes_beyond(lambda: self.fit(cov))

    track_fit_bytes_beyond_X.unit = "bytes"


def estep_bytes_beyond_X(backend, n, d, k, **options):
    """Peak device bytes beyond X of one 'spherical' E-step with statistics on
    ``backend`` ('triton' or 'cupy'), X (n, d) float32 N(0, 1) rows made on the
    device, K equal weights, zero means and unit precisions; ``options`` go to the
    E-step (Triton's ``large_k``)."""
    host_args = (np.full(k, 1.0 / k), np.zeros((k, d)), np.ones(k), "spherical")
    if backend == "triton":
        from fastlvm.kernels.estep_stats._triton import estep_stats_triton

        torch = _cuda()
        X = torch.randn(n, d, device=DEVICE)
        return torch_bytes_beyond(torch, lambda: estep_stats_triton(X, *host_args, **options))
    from fastlvm.kernels.estep_stats._cupy import estep_stats_cupy

    cupy = _cupy()
    X = cupy.random.standard_normal((n, d), dtype=cupy.float32)
    return cupy_bytes_beyond(cupy, lambda: estep_stats_cupy(X, *host_args, **options))


class EStepMemory10M:
    """Device memory an E-step needs beyond X at N=10M, D=128, K=1024, 'spherical',
    float32 (bytes), on each backend."""

    params = (["triton", "cupy"],)
    param_names = ["backend"]
    timeout = 300

    def setup(self, backend):  # asv's skip where the backend cannot run
        if backend == "triton":
            _cuda()
        else:
            _cupy()

    def track_estep_bytes_beyond_X(self, backend):
        return estep_bytes_beyond_X(backend, *MEMORY_10M)

    track_estep_bytes_beyond_X.unit = "bytes"


class CuPyEStepFlashGMM:
    """Flash-GMM's workload on the CuPy backend: one E-step with statistics,
    N=1M, D=128, K=1024 (64 for 'full'), float32."""

    params = (COVS,)
    param_names = ["covariance_type"]
    timeout = 300

    def setup(self, cov):
        cupy = _cupy()
        from fastlvm.kernels.estep_stats._cupy import estep_stats_cupy

        n, d, k = FLASH_GMM
        k = min(k, CUPY_FULL_COMPONENTS) if cov == "full" else k
        X = standard_normal_rows(n, d)
        self.X = cupy.asarray(X)
        self.args = (np.full(k, 1.0 / k), X[:k].astype(np.float64),
                     identity_precisions(cov, k, d), cov)
        self.fn, self.cupy = estep_stats_cupy, cupy
        self.estep()  # compile (NVRTC, cached on disk afterwards)

    def estep(self):
        self.fn(self.X, *self.args)
        synchronize(self.cupy)

    def time_estep(self, cov):
        self.estep()


class CuPyEStepSmallK:
    """The CuPy E-step of the EM-iteration workload (N=1M, D=32, K=16, float32) on
    its two paths: the tile kernels (the default there) and the chunked cuBLAS
    path (``_cupy_tiles.MAX_COMPONENTS = 0``), parameters already on the device."""

    params = (COVS, ["tiles", "chunked"])
    param_names = ["covariance_type", "path"]
    timeout = 300

    def setup(self, cov, path):
        cupy = _cupy()
        from fastlvm.kernels import _cupy_gaussian
        from fastlvm.kernels.estep_stats import _cupy_tiles
        from fastlvm.kernels.estep_stats._cupy import estep_sums

        X, k = _em_iteration_data()
        rng = np.random.default_rng(1)
        self.X = cupy.asarray(X)
        self.params = _cupy_gaussian.ExpandedParams(
            np.float32, X[rng.choice(len(X), k, replace=False)].astype(np.float64),
            identity_precisions(cov, k, X.shape[1]), cov, np.full(k, -np.log(k)))
        self.tiles, self.saved = _cupy_tiles, _cupy_tiles.MAX_COMPONENTS
        if path == "chunked":
            _cupy_tiles.MAX_COMPONENTS = 0
        self.fn, self.cupy = estep_sums, cupy
        self.estep()  # compile

    def teardown(self, cov, path):
        self.tiles.MAX_COMPONENTS = self.saved

    def estep(self):
        self.fn(self.X, self.params)
        synchronize(self.cupy)

    def time_estep(self, cov, path):
        self.estep()


class MPPCAEStepGPU:
    """Issue 5's mixture-of-PPCA workload on the GPU backends: one E-step with
    statistics, K=16, q=4, float32, N=1M at D=64 and N=250k at MNIST's D=784 (rows
    past 128 padded features take ``_triton_low_rank_wide.py``'s kernels on
    Triton; ``cupy_vs_triton.py``'s rows)."""

    params = (["triton", "cupy"], [64, 784])
    param_names = ["backend", "n_features"]
    timeout = 300

    def setup(self, backend, d):
        self.backend, to_device = device_arrays(backend)
        if backend == "triton":
            from fastlvm.kernels.mppca_stats._triton import mppca_stats_triton as fn
        else:
            from fastlvm.kernels.mppca_stats._cupy import mppca_stats_cupy as fn
        n, (k, q) = MPPCA_ROWS[d], MPPCA_COMPONENTS
        rng = np.random.default_rng(0)
        X = rng.standard_normal((n, d), dtype=np.float32)
        self.args = (np.full(k, 1.0 / k), X[:k].astype(np.float64),
                     rng.standard_normal((k, q, d)), np.ones(k))
        self.X, self.fn = to_device(X), fn
        self.estep()  # compile

    def estep(self):
        self.fn(self.X, *self.args)
        synchronize(self.backend)

    def time_estep(self, backend, d):
        self.estep()


class LinearGaussianFitGPU:
    """PPCA and FactorAnalysis fitted on device rows, float32, N=1M, D=128, q=16
    (rows near a 16-dimensional subspace): 'closed_form' PPCA and FactorAnalysis
    are one pass for the mean and scatter matrix on the device, then D x D
    algebra on the host; 'em' is ten passes of ``ppca_stats``' device kernels (the
    one-component mixture-of-PPCA pass), ``max_iter=10``, ``tol=0``; 'missing'
    is PPCA on the same rows with 10% of the entries NaN, its start and ten
    passes of ``masked_latent_stats``' device backend."""

    params = (["triton", "cupy"], ["ppca-closed_form", "ppca-em", "ppca-missing",
                                   "factor_analysis"])
    param_names = ["backend", "model"]
    timeout = 300

    def setup(self, backend, model):
        self.backend, to_device = device_arrays(backend)
        n, d, q = LINEAR_GAUSSIAN
        rng = np.random.default_rng(0)
        X = (rng.standard_normal((n, q), dtype=np.float32)
             @ rng.standard_normal((q, d), dtype=np.float32)
             + 0.1 * rng.standard_normal((n, d), dtype=np.float32))
        if model == "ppca-missing":
            X[rng.random((n, d)) < 0.1] = np.nan
            X[:, 0] = np.where(np.isnan(X).all(1), 0.0, X[:, 0])  # every row keeps one
        self.X, self.q = to_device(X), q
        self.fit(model)  # compile

    def fit(self, model):
        import warnings

        from sklearn.exceptions import ConvergenceWarning

        from fastlvm import PPCA, FactorAnalysis

        if model == "factor_analysis":
            estimator = FactorAnalysis(self.q)
        else:
            estimator = PPCA(self.q, method="closed_form" if model == "ppca-closed_form"
                             else "em", max_iter=10, tol=0, random_state=0)
        with warnings.catch_warnings():  # 'em' stops at max_iter, as asked
            warnings.simplefilter("ignore", ConvergenceWarning)
            estimator.fit(self.X)
        synchronize(self.backend)

    def time_fit(self, backend, model):
        self.fit(model)
