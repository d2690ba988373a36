"""asv benchmarks: every kernel and one EM iteration per covariance type,
reference vs numba, the 'diag' and 'spherical' E-steps at D = 128, a whole fit on
sklearn's digits, a fit by row layout, the k-means kernels, the latent linear
models' kernels and iterations, the VAE losses, plus peak-memory and bound
tracking.

JIT compilation happens in ``setup`` (its cost is ``time_compile_*``, and a first
fit's is ``FirstFitCompile``), so the ``time_`` benchmarks measure steady-state
kernels.  Shapes are kept moderate so that the suite runs on a 2-core machine;
``fastlvm bench`` runs the large side-by-side workloads.
"""

import os
import warnings

import numpy as np

COVS = ["full", "tied", "diag", "spherical"]


def _problem(cov, n, d, k, dtype, seed=0):
    rng = np.random.default_rng(seed)
    X = (rng.standard_normal((n, d)) + rng.standard_normal((k, d))[rng.integers(0, k, n)] * 3)
    X = X.astype(dtype)
    means = X[rng.choice(n, k, replace=False)].astype(np.float64)
    if cov == "full":
        pc = np.broadcast_to(np.eye(d), (k, d, d)).copy()
    elif cov == "tied":
        pc = np.eye(d)
    elif cov == "diag":
        pc = np.ones((k, d))
    else:
        pc = np.ones(k)
    return X, np.full(k, 1.0 / k), means, pc


def _torch():
    """torch, or asv's skip (setup raising NotImplementedError) where it is not
    installed: asv's own environment has no extras."""
    try:
        import torch
    except ImportError:
        raise NotImplementedError("needs torch (pip install torch==2.13.0)") from None
    return torch


class _Backend:
    def _use(self, backend):
        os.environ["FASTLVM_BACKEND"] = backend

    def teardown(self, *args):
        os.environ.pop("FASTLVM_BACKEND", None)


class EStepStats(_Backend):
    params = (COVS, ["numba", "reference"], ["float64", "float32"])
    param_names = ["covariance_type", "backend", "dtype"]

    def setup(self, cov, backend, dtype):
        from fastlvm.kernels import estep_stats

        n = 100_000 if backend == "numba" else 5_000
        self.args = _problem(cov, n, 16, 16, np.dtype(dtype))
        self._use(backend)
        self.fn = estep_stats
        self.fn(*self.args, cov)  # compile

    def time_estep_stats(self, cov, backend, dtype):
        self.fn(*self.args, cov)


class EStepStatsSeparated:
    """E-step on well-separated clusters (the side-by-side runner's data: centres
    4 sigma apart per coordinate, at its D and K per covariance type, 100k rows)
    at parameters two EM iterations in, where most responsibilities are
    negligible and the sparse paths leave them out of the moments -- in float64
    too ('full' gathers each component's kept rows, 'diag' and 'spherical'
    visit each row's kept components)."""

    params = (["full", "diag", "spherical"], ["float64", "float32"])
    param_names = ["covariance_type", "dtype"]
    _shapes = {"full": (16, 32), "diag": (32, 16), "spherical": (32, 64)}

    def setup(self, cov, dtype):
        from fastlvm import GaussianMixture
        from fastlvm.kernels import estep_stats

        n = 100_000
        d, k = self._shapes[cov]
        rng = np.random.default_rng(0)
        centres = rng.standard_normal((k, d)) * 4
        self.X = (centres[rng.integers(0, k, n)] + rng.standard_normal((n, d))).astype(dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gm = GaussianMixture(k, covariance_type=cov, max_iter=2, tol=0,
                                 init_params="random_from_data", random_state=0).fit(self.X)
        self.fitted = (gm.weights_, gm.means_, gm.precisions_cholesky_)
        self.fn = estep_stats
        self.fn(self.X, *self.fitted, cov)  # compile

    def time_estep_stats(self, cov, dtype):
        self.fn(self.X, *self.fitted, cov)


class EStepStatsWide(_Backend):
    """'diag' and 'spherical' at D = 128: the shapes whose tiles grew most from
    the general rule's (48 float64 rows) to distance_tile_rows' (496 / 176)."""

    params = (["diag", "spherical"], ["float64", "float32"])
    param_names = ["covariance_type", "dtype"]

    def setup(self, cov, dtype):
        from fastlvm.kernels import estep_stats

        self.args = _problem(cov, 50_000, 128, 16, np.dtype(dtype))
        self._use("numba")
        self.fn = estep_stats
        self.fn(*self.args, cov)  # compile

    def time_estep_stats(self, cov, dtype):
        self.fn(*self.args, cov)


class SmallDataFit:
    """A whole ``GaussianMixture(10).fit`` on sklearn's digits (1797 x 64): k-means
    start, EM to convergence.  At this size the per-call costs (parameter packing,
    zeroing and merging partial sums, parallel launches) are a large part of a
    pass, which the large-N benchmarks do not show."""

    params = (COVS,)
    param_names = ["covariance_type"]

    def setup(self, cov):
        from sklearn.datasets import load_digits

        from fastlvm import GaussianMixture

        self.X = load_digits().data
        self.model = GaussianMixture(10, covariance_type=cov, reg_covar=1e-3, random_state=0)
        self.time_fit(cov)  # compile

    def time_fit(self, cov):
        self.model.fit(self.X)


class FitByRowLayout:
    """A whole ``GaussianMixture`` fit (k-means start, 10 EM iterations) on the
    same rows in three layouts: C-ordered, Fortran-ordered (a pandas
    DataFrame's values) and strided (a selection of every other column).  The
    fit copies the last two into C order once (``MixtureBase._validate_fit_rows``);
    before, their kernels read them as given at 1.5x-3.1x the C time."""

    params = (["full", "diag"], ["C", "Fortran", "strided"])
    param_names = ["covariance_type", "layout"]

    def setup(self, cov, layout):
        from fastlvm import GaussianMixture

        X = _problem(cov, 100_000, 16, 16, np.float64)[0]
        if layout == "Fortran":
            X = np.asfortranarray(X)
        elif layout == "strided":
            wide = np.zeros((X.shape[0], 2 * X.shape[1]))
            wide[:, ::2] = X
            X = wide[:, ::2]
        self.X = X
        self.model = GaussianMixture(16, covariance_type=cov, max_iter=10, tol=0,
                                     random_state=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.model.set_params(max_iter=1).fit(X[:2000])  # compile
        self.model.set_params(max_iter=10)

    def time_fit(self, cov, layout):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.model.fit(self.X)


class KMeansKernels(_Backend):
    """The k-means kernels that initialise mixtures: a Lloyd step, k-means++'s
    candidate potentials, and the statistics of the final labels ('diag' and
    'full' second moments), K = 16 (4 candidates), D = 32."""

    params = (["numba", "reference"], ["float64", "float32"])
    param_names = ["backend", "dtype"]

    def setup(self, backend, dtype):
        from fastlvm.kernels import kmeans_potentials, label_stats, lloyd_step, min_sq_dist

        n = 200_000 if backend == "numba" else 5_000
        X, _, centers, _ = _problem("spherical", n, 32, 16, np.dtype(dtype))
        self._use(backend)
        self.X, self.centers = X, centers
        self.closest = min_sq_dist(X, centers[0])
        self.lloyd, self.potentials, self.label_stats = lloyd_step, kmeans_potentials, label_stats
        self.labels = lloyd_step(X, centers)[0]
        self.time_lloyd_step(backend, dtype)  # compile
        self.time_kmeans_potentials(backend, dtype)
        self.time_label_stats_diag(backend, dtype)
        self.time_label_stats_full(backend, dtype)

    def time_lloyd_step(self, backend, dtype):
        self.lloyd(self.X, self.centers)

    def time_kmeans_potentials(self, backend, dtype):
        self.potentials(self.X, self.centers[:4], self.closest)

    def time_label_stats_diag(self, backend, dtype):
        self.label_stats(self.X, self.labels, 16, self.centers, "diag")

    def time_label_stats_full(self, backend, dtype):
        self.label_stats(self.X, self.labels, 16, self.centers, "full")


class GaussianLogProb(_Backend):
    params = (COVS, ["numba", "reference"])
    param_names = ["covariance_type", "backend"]

    def setup(self, cov, backend):
        from fastlvm.kernels import gaussian_log_prob

        n = 100_000 if backend == "numba" else 5_000
        X, _, means, pc = _problem(cov, n, 16, 16, np.float64)
        self.args = (X, means, pc, cov)
        self._use(backend)
        self.fn = gaussian_log_prob
        self.fn(*self.args)

    def time_gaussian_log_prob(self, cov, backend):
        self.fn(*self.args)


class LogResponsibilities(_Backend):
    params = (["numba", "reference"],)
    param_names = ["backend"]

    def setup(self, backend):
        from fastlvm.kernels import log_responsibilities

        self.V = np.random.default_rng(0).standard_normal((200_000, 32)) * 10
        self._use(backend)
        self.fn = log_responsibilities
        self.fn(self.V)

    def time_log_responsibilities(self, backend):
        self.fn(self.V)


class EMIteration(_Backend):
    """One E-step + M-step of GaussianMixture, and what it tracks."""

    params = (COVS, ["numba", "reference"])
    param_names = ["covariance_type", "backend"]

    def setup(self, cov, backend):
        from fastlvm import GaussianMixture

        n = 100_000 if backend == "numba" else 5_000
        self.X = _problem(cov, n, 16, 16, np.float64)[0]
        self._use(backend)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.gm = GaussianMixture(16, covariance_type=cov, max_iter=1,
                                      init_params="random_from_data", random_state=0).fit(self.X)

    def time_em_iteration(self, cov, backend):
        from fastlvm._config import serial_blas

        with serial_blas():  # as fit() runs its iterations
            self.gm._em_iteration(self.X, None)

    def track_bound_after_20_iterations(self, cov, backend):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.gm.set_params(max_iter=20, tol=0).fit(self.X)
        return self.gm.lower_bound_

    track_bound_after_20_iterations.unit = "nats per row"


def _latent_linear_problem(n, d, k, q, dtype, missing=0.0, seed=0):
    """Rows from a mixture of K PPCA models, and parameters near theirs."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((k, d)) * 4
    comps = rng.standard_normal((k, q, d))
    labels = rng.integers(0, k, n)
    X = (means[labels] + np.einsum("nq,nqd->nd", rng.standard_normal((n, q)), comps[labels])
         + 0.5 * rng.standard_normal((n, d))).astype(dtype)
    if missing:
        X[rng.random(X.shape) < missing] = np.nan
    return X, means, comps, np.full(k, 0.25)


class LatentLinearKernels(_Backend):
    """The PPCA / FA / MPPCA kernels at D=64, q=4 (K=16 for the mixture)."""

    params = (["ppca_stats", "masked_latent_stats", "mppca_log_prob", "mppca_stats"],
              ["numba", "reference"], ["float64", "float32"])
    param_names = ["kernel", "backend", "dtype"]

    def setup(self, kernel, backend, dtype):
        from fastlvm import kernels

        n = (100_000 if backend == "numba" else 5_000) // (4 if kernel.startswith("mppca")
                                                          else 1)
        if kernel == "masked_latent_stats" and backend == "reference":
            n = 1_000  # a Python loop over rows
        k = 16 if kernel.startswith("mppca") else 1
        X, means, comps, noise = _latent_linear_problem(
            n, 64, k, 4, np.dtype(dtype), missing=0.1 if kernel.startswith("masked") else 0.0)
        if kernel == "mppca_log_prob":
            self.args = (X, means, comps, noise)
        elif kernel == "mppca_stats":
            self.args = (X, np.full(k, 1.0 / k), means, comps, noise)
        else:
            self.args = (X, means[0], comps[0], 0.25 if kernel == "ppca_stats"
                         else np.full(64, 0.25))
        self._use(backend)
        self.fn = getattr(kernels, kernel)
        self.fn(*self.args)  # compile

    def time_kernel(self, kernel, backend, dtype):
        self.fn(*self.args)


class LatentLinearIteration:
    """One EM iteration of PPCA, FactorAnalysis with missing entries, and
    MixtureOfPPCA beside a diag GaussianMixture on the same rows (issue 5's
    "no more per iteration than diag"), float32; and FactorAnalysis's whole
    fit, which is one pass plus D x D iterations."""

    params = (["ppca_em", "fa_missing_em", "mppca", "diag_gmm", "fa_fit"],)
    param_names = ["model"]

    def setup(self, model):
        from fastlvm import FactorAnalysis, GaussianMixture, MixtureOfPPCA, PPCA

        k = 16 if model in ("mppca", "diag_gmm") else 1
        n = 50_000 if k > 1 else 100_000
        X = _latent_linear_problem(n, 64, k, 4, np.float32,
                                   missing=0.1 if model == "fa_missing_em" else 0.0)[0]
        self.X = X
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if model == "ppca_em":
                self.model = PPCA(4, method="em", max_iter=2, random_state=0).fit(X)
            elif model == "fa_missing_em":  # FactorAnalysis's EM on rows with NaN
                from fastlvm._moments import row_ranges
                from fastlvm.decomposition._masked_em import MaskedLinearGaussianEM
                from fastlvm.em import fit_em

                self.model = MaskedLinearGaussianEM(4, False, 0.0, 2, 0, None,
                                                    row_ranges)
                fit_em(self.model, X)
            elif model == "mppca":
                self.model = MixtureOfPPCA(16, n_latent=4, max_iter=2, random_state=0).fit(X)
            elif model == "diag_gmm":
                self.model = GaussianMixture(16, covariance_type="diag", max_iter=2,
                                             random_state=0).fit(X)
            else:
                self.model = FactorAnalysis(4)
                self.model.fit(X)  # compile

    def time_iteration(self, model):
        from fastlvm._config import serial_blas

        if model == "fa_fit":
            self.model.fit(self.X)
            return
        with serial_blas():  # as fit() runs its iterations
            self.model._em_iteration(self.X, None)


class VariationalIteration:
    """One variational iteration of BayesianGaussianMixture (pass + q update) and
    one stochastic-VI / online-EM step on a 10k-row batch."""

    params = (COVS,)
    param_names = ["covariance_type"]

    def setup(self, cov):
        from fastlvm import BayesianGaussianMixture, GaussianMixture

        self.X = _problem(cov, 100_000, 16, 16, np.float64)[0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.vb = BayesianGaussianMixture(n_components=16, covariance_type=cov, max_iter=1,
                                              init_params="random_from_data",
                                              random_state=0).fit(self.X)
            self.svi = BayesianGaussianMixture(
                n_components=16, covariance_type=cov, init_params="random_from_data",
                random_state=0, total_samples=len(self.X)).partial_fit(self.X[:10_000])
            self.online = GaussianMixture(16, covariance_type=cov,
                                          init_params="random_from_data",
                                          random_state=0).partial_fit(self.X[:10_000])

    def time_vb_iteration(self, cov):
        from fastlvm._config import serial_blas

        with serial_blas():
            self.vb._em_iteration(self.X, None)

    def time_svi_step_10k(self, cov):
        self.svi.partial_fit(self.X[10_000:20_000])

    def time_online_em_step_10k(self, cov):
        self.online.partial_fit(self.X[10_000:20_000])


class VAELoss(_Backend):
    """The fused VAE losses with their gradients (forward + backward), batch 1024,
    D=784, latent 32, float32: the ELBO (k=1) and the IWAE bound (k=50), on the
    Numba kernels and on the plain-torch reference (eager PyTorch)."""

    params = (["numba", "reference"], [1, 50])
    param_names = ["backend", "k"]

    def setup(self, backend, k):
        torch = _torch()
        from fastlvm.kernels import elbo, iwae_bound

        g = torch.Generator().manual_seed(0)
        batch, d, latent = 1024, 784, 32
        self.x = (torch.rand(batch, d, generator=g) > 0.5).float()
        self.dec = torch.randn(k, batch, d, generator=g).requires_grad_()
        self.mu = torch.randn(batch, latent, generator=g).requires_grad_()
        self.logvar = (0.1 * torch.randn(batch, latent, generator=g)).requires_grad_()
        self.z = (self.mu.detach() + torch.randn(k, batch, latent, generator=g)).requires_grad_()
        self._use(backend)
        if k == 1:
            self.inputs = [self.dec, self.mu, self.logvar]
            self.loss = lambda: elbo(self.x, self.dec, self.mu, self.logvar)
        else:
            self.inputs = [self.dec, self.z, self.mu, self.logvar]
            self.loss = lambda: iwae_bound(self.x, self.dec, self.z, self.mu, self.logvar)
        self.time_forward_backward(backend, k)  # compile / load the kernels

    def time_forward_backward(self, backend, k):
        _torch().autograd.grad(self.loss().sum(), self.inputs)


class VAETrainingEpoch:
    """One epoch of fastlvm.VAE's training (Adam, batch 128, the ELBO) on 1500
    binary rows of D = 64, latent 16, hidden 256, float32: the fused step (one
    Numba call a step) against the autograd step (torch modules and Adam)."""

    params = (["fused", "autograd"],)
    param_names = ["training_step"]

    def setup(self, training_step):
        torch = _torch()
        from fastlvm import VAE

        rng = np.random.default_rng(0)
        self.X = torch.from_numpy((rng.random((1500, 64)) > 0.5).astype(np.float32))
        self.vae = VAE(16, hidden_layer_sizes=(256,), max_epochs=1, random_state=0,
                       training_step=training_step).fit(self.X)  # compile / load

    def time_epoch(self, training_step):
        self.vae.partial_fit(self.X)


class PeakMemory:
    """Peak memory of a fit beyond X (the N x K responsibilities are never stored)."""

    params = (["full", "spherical"],)
    param_names = ["covariance_type"]
    timeout = 300

    def setup(self, cov):
        self.X = np.random.default_rng(0).standard_normal((1_000_000, 16), dtype=np.float32)

    def peakmem_fit_1M_K64(self, cov):
        from fastlvm import GaussianMixture

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            GaussianMixture(64, covariance_type=cov, max_iter=2,
                            init_params="random_from_data", random_state=0).fit(self.X)

    def peakmem_score_samples_1M_K256(self, cov):
        """Predictions hold (rows, K) arrays in blocks of _config.BLOCK_BYTES (at
        K = 256 a 262,144-row chunk made 537 MB arrays before session 41)."""
        from fastlvm import GaussianMixture

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = GaussianMixture(256, covariance_type=cov, max_iter=1,
                                    init_params="random_from_data",
                                    random_state=0).fit(self.X[:20_000])
        model.score_samples(self.X)

    def track_added_peak_fraction_of_X(self, cov):
        from fastlvm.benchmarks import peak_memory_fit

        return peak_memory_fit(n=1_000_000, d=16, k=64, max_iter=1)["ratio"]

    track_added_peak_fraction_of_X.unit = "fraction of X"


def time_compile_estep_stats():
    """Cold JIT of the fused E-step in a fresh interpreter (cache disabled)."""
    import subprocess
    import sys

    env = dict(os.environ, FASTLVM_NUMBA_CACHE="0")
    code = ("import numpy as np; from fastlvm.kernels import estep_stats; "
            "estep_stats(np.zeros((10, 2)), np.ones(1), np.zeros((1, 2)), np.ones(1), "
            "'spherical')")
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


_FIRST_FIT = """
import sys, time, warnings
import numpy as np
from sklearn.datasets import load_digits
import fastlvm

X = load_digits().data
model = sys.argv[1]
warnings.simplefilter("ignore")  # ConvergenceWarning
start = time.perf_counter()
if model == "VAE":
    fastlvm.VAE(8, max_epochs=1, random_state=0).fit((X > 7).astype(np.float32))
elif model == "GaussianMixture BIC search":  # every covariance type, as sklearn's example
    for covariance_type in ("spherical", "tied", "diag", "full"):
        fastlvm.GaussianMixture(10, covariance_type=covariance_type, random_state=0).fit(X).bic(X)
else:
    getattr(fastlvm, model)(n_components=10, random_state=0).fit(X)
print(time.perf_counter() - start)
"""


class FirstFitCompile:
    """Seconds of a model's first fit on sklearn's digits in a fresh interpreter
    with Numba's cache off: what a user waits for after an install or upgrade,
    nearly all of it compiling the kernels the fit runs (imports excluded; the
    default options: a 'full' mixture with a k-means start, a Bernoulli ELBO
    VAE, one epoch).  "GaussianMixture BIC search" fits and scores each of the
    four covariance types in turn, which compiles a kernel for each."""

    params = ["GaussianMixture", "GaussianMixture BIC search", "BayesianGaussianMixture",
              "MixtureOfPPCA", "VAE"]
    param_names = ["model"]
    unit = "seconds"
    timeout = 600

    def setup(self, model):
        if model == "VAE":
            _torch()

    def track_first_fit_seconds(self, model):
        import subprocess
        import sys
        import tempfile

        env = dict(os.environ, FASTLVM_NUMBA_CACHE="0")
        # outside any checkout, whose fastlvm/ folder would shadow the installed package
        done = subprocess.run([sys.executable, "-c", _FIRST_FIT, model], check=True, env=env,
                              cwd=tempfile.gettempdir(), capture_output=True, text=True)
        return float(done.stdout.strip().splitlines()[-1])

