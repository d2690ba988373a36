"""asv benchmarks for the GPU backends (Triton, CuPy) on a CUDA device.

Every timing ends with a device synchronize so asv measures the
kernels, not their launch.  ``setup`` raises ``NotImplementedError`` where
there is no CUDA device or no triton / cupy, which asv reports as skipped.
Kernel compilation happens in ``setup``.
"""

import numpy as np

COVS = ["full", "tied", "diag", "spherical"]


def _cuda():
    try:
        import torch
        import triton  # noqa: F401
    except ImportError:
        raise NotImplementedError("needs torch and triton") from None
    if not torch.cuda.is_available():
        raise NotImplementedError("needs a CUDA device")
    return torch


def identity_precisions(cov, k, d):
    """Identity precisions (host float64) in sklearn's shape for ``cov``."""
    return {"full": np.broadcast_to(np.eye(d), (k, d, d)).copy(), "tied": np.eye(d),
            "diag": np.ones((k, d)), "spherical": np.ones(k)}[cov]


def _params(torch, cov, k, d):
    return torch.as_tensor(identity_precisions(cov, k, d)).cuda()


class _TritonEStep:
    """One ``estep_stats_triton`` call on N(0, 1) rows, float32, K equal weights,
    the first K rows as means and identity precisions: set up (and compiled) by
    :meth:`prepare`, timed by :meth:`estep`."""

    timeout = 300

    def prepare(self, cov, n, d, k, large_k):
        torch = _cuda()
        from fastlvm.kernels.estep_stats._triton import estep_stats_triton

        g = torch.Generator(device="cuda").manual_seed(0)
        self.X = torch.randn(n, d, device="cuda", generator=g)
        self.args = (torch.full((k,), 1.0 / k, dtype=torch.float64, device="cuda"),
                     self.X[:k].double(), _params(torch, cov, k, d), cov)
        self.fn, self.torch, self.large_k = estep_stats_triton, torch, large_k
        self.estep()  # compile

    def estep(self):
        self.fn(self.X, *self.args, large_k=self.large_k)
        self.torch.cuda.synchronize()


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
        self.prepare(cov, 1_000_000, 128, 1024, large_k)

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
        self.prepare(cov, 400_000, d, 16, large_k)

    def time_estep(self, cov, d, large_k):
        self.estep()


def _em_iteration_data():
    """(X (1M, 32) float32 on the host, K=16): the EM-iteration workload."""
    rng = np.random.default_rng(0)
    n, d = 1_000_000, 32
    return (rng.standard_normal((n, d)) + rng.integers(0, 4, (n, 1))).astype(np.float32), 16


class TritonEMIteration:
    """One GaussianMixture EM iteration on a CUDA tensor (float32); with
    ``cuda_graph`` the iterations timed are replays (setup runs the warm-up and
    the recording)."""

    params = (COVS, [False, True])
    param_names = ["covariance_type", "cuda_graph"]
    timeout = 300

    def setup(self, cov, cuda_graph):
        torch = _cuda()
        from fastlvm import GaussianMixture
        from fastlvm.mixture._device_em_step import GRAPH_WARMUP_STEPS

        X, k = _em_iteration_data()
        self.X = torch.as_tensor(X, device="cuda")
        self.gm = GaussianMixture(k, covariance_type=cov, init_params="random_from_data",
                                  random_state=0, max_iter=1,
                                  cuda_graph=cuda_graph).fit(self.X)
        for _ in range(GRAPH_WARMUP_STEPS + 1 if cuda_graph else 0):
            self.gm._em_iteration(self.X, None)
        self.torch = torch
        torch.cuda.synchronize()

    def time_em_iteration(self, cov, cuda_graph):
        self.gm._em_iteration(self.X, None)
        self.torch.cuda.synchronize()

    def peakmem_fit(self, cov, cuda_graph):
        self.gm.fit(self.X)


class TritonMemory10M:
    """Device memory an E-step needs beyond X at N=10M, D=128, K=1024 (bytes)."""

    timeout = 300

    def setup(self):
        self.torch = _cuda()

    def track_estep_bytes_beyond_X(self):
        torch = self.torch
        from fastlvm.kernels.estep_stats._triton import estep_stats_triton

        n, d, k = 10_000_000, 128, 1024
        X = torch.randn(n, d, device="cuda")
        args = (torch.full((k,), 1.0 / k, dtype=torch.float64, device="cuda"), X[:k].double(),
                torch.ones(k, dtype=torch.float64, device="cuda"), "spherical")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        estep_stats_triton(X, *args)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    track_estep_bytes_beyond_X.unit = "bytes"


def _cupy():
    try:
        import cupy
    except ImportError:
        raise NotImplementedError("needs cupy (pip install 'fastlvm[cupy]')") from None
    try:
        if cupy.cuda.runtime.getDeviceCount() == 0:
            raise NotImplementedError("needs a CUDA device")
    except cupy.cuda.runtime.CUDARuntimeError:
        raise NotImplementedError("needs a CUDA device") from None
    return cupy


class CuPyEStepFlashGMM:
    """Flash-GMM's workload on the CuPy backend: one E-step with statistics,
    N=1M, D=128, K=1024 (64 for 'full'), float32."""

    params = (COVS,)
    param_names = ["covariance_type"]
    timeout = 300

    def setup(self, cov):
        cupy = _cupy()
        from fastlvm.kernels.estep_stats._cupy import estep_stats_cupy

        n, d = 1_000_000, 128
        k = 64 if cov == "full" else 1024
        self.X = cupy.random.default_rng(0).standard_normal((n, d), dtype=cupy.float32)
        self.args = (np.full(k, 1.0 / k), self.X[:k].get().astype(np.float64),
                     identity_precisions(cov, k, d), cov)
        self.fn, self.cupy = estep_stats_cupy, cupy
        self.fn(self.X, *self.args)  # compile (NVRTC, cached on disk afterwards)
        cupy.cuda.Device().synchronize()

    def time_estep(self, cov):
        self.fn(self.X, *self.args)
        self.cupy.cuda.Device().synchronize()


class CuPyEMIteration:
    """One GaussianMixture EM iteration on a cupy array (float32); with
    ``cuda_graph`` the iterations timed are replays, as TritonEMIteration's."""

    params = (COVS, [False, True])
    param_names = ["covariance_type", "cuda_graph"]
    timeout = 300

    def setup(self, cov, cuda_graph):
        cupy = _cupy()
        from fastlvm import GaussianMixture
        from fastlvm.mixture._device_em_step import GRAPH_WARMUP_STEPS

        X, k = _em_iteration_data()
        self.X = cupy.asarray(X)
        self.gm = GaussianMixture(k, covariance_type=cov, init_params="random_from_data",
                                  random_state=0, max_iter=1,
                                  cuda_graph=cuda_graph).fit(self.X)
        for _ in range(GRAPH_WARMUP_STEPS + 1 if cuda_graph else 0):
            self.gm._em_iteration(self.X, None)
        self.cupy = cupy
        cupy.cuda.Device().synchronize()

    def time_em_iteration(self, cov, cuda_graph):
        self.gm._em_iteration(self.X, None)
        self.cupy.cuda.Device().synchronize()


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
        self.fn(self.X, self.params)  # compile
        cupy.cuda.Device().synchronize()

    def teardown(self, cov, path):
        self.tiles.MAX_COMPONENTS = self.saved

    def time_estep(self, cov, path):
        self.fn(self.X, self.params)
        self.cupy.cuda.Device().synchronize()


class MPPCAEStepGPU:
    """Issue 5's mixture-of-PPCA workload on the GPU backends: one E-step with
    statistics, K=16, q=4, float32, N=1M at D=64 and N=250k at MNIST's D=784 (rows
    past 128 padded features take ``_triton_low_rank_wide.py``'s kernels on
    Triton; ``cupy_vs_triton.py``'s rows)."""

    params = (["triton", "cupy"], [64, 784])
    param_names = ["backend", "n_features"]
    timeout = 300

    def setup(self, backend, d):
        if backend == "triton":
            torch = _cuda()
            from fastlvm.kernels.mppca_stats._triton import mppca_stats_triton as fn

            to_device, self.sync = (lambda a: torch.as_tensor(a, device="cuda"),
                                    torch.cuda.synchronize)
        else:
            cupy = _cupy()
            from fastlvm.kernels.mppca_stats._cupy import mppca_stats_cupy as fn

            to_device, self.sync = cupy.asarray, cupy.cuda.Device().synchronize
        n, k, q = (1_000_000 if d <= 128 else 250_000), 16, 4
        rng = np.random.default_rng(0)
        X = rng.standard_normal((n, d), dtype=np.float32)
        self.args = (np.full(k, 1.0 / k), X[:k].astype(np.float64),
                     rng.standard_normal((k, q, d)), np.ones(k))
        self.X, self.fn = to_device(X), fn
        self.fn(self.X, *self.args)  # compile
        self.sync()

    def time_estep(self, backend, d):
        self.fn(self.X, *self.args)
        self.sync()
