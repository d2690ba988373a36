"""MixtureOfPPCA: a mixture of probabilistic principal component analysers.

Tipping & Bishop (1999): p(x) = sum_k pi_k N(x | mu_k, W_k^T W_k + sigma_k^2 I),
each component a PPCA model with its own q-dimensional latent space.  A full-
covariance mixture in D dimensions costs O(K D^2) per row and has K D^2 / 2
covariance parameters; this one costs O(K D q) per row, with D q + 1 per
component, and still models correlations along q directions.

Every EM iteration is one fused pass of :func:`fastlvm.kernels.mppca_stats`
per chunk of rows (Woodbury log-densities, log-sum-exp responsibilities and
the moments the M-step needs, never an n x K array) followed by the M-step of
:mod:`._mppca_params` on K small matrices; restarts, convergence and the bound
history come from the shared driver :func:`fastlvm.em.fit_em`.

Device arrays (torch CUDA tensors, cupy arrays) are fitted where they are: the
E-step on the Triton or CuPy kernels, the k-means initialisation, the
eigendecompositions that start each component and the batched M-step on the
device; fitted parameters are float64 arrays of the same kind.
"""

from numbers import Integral

import numpy as np
from sklearn.utils._param_validation import Interval
from sklearn.utils.validation import check_is_fitted

from fastlvm._arrays import (add_to_diagonal, as_f64, cast_like, eps_of, index_like,
                             is_device_array, is_float32, is_torch, log, to_numpy)
from fastlvm._dispatch import resolve
from fastlvm._sample_weight import in_row_units
from fastlvm.em import fit_em
from fastlvm.kernels.kmeans._numba import lloyd_step_numba
from fastlvm.kernels.mppca_log_prob import IMPLEMENTATIONS as LOGPROB_IMPLEMENTATIONS
from fastlvm.kernels.mppca_stats import IMPLEMENTATIONS as STATS_IMPLEMENTATIONS
from fastlvm.kernels.mppca_stats import MPPCAStats

from . import _initialization as init
from . import _mppca_params as mp
from ._base import EM_PARAMETER_CONSTRAINTS, MixtureBase, check_n_samples


class MixtureOfPPCA(MixtureBase):
    """Mixture of probabilistic PCA analysers, fitted by EM on fused kernels.

    Parameters
    ----------
    n_components : int, default=1
        Number of mixture components K.
    n_latent : int, default=2
        Latent dimension q of every component, 1 <= q < n_features.
    tol : float, default=1e-3
        Convergence threshold on the change of the mean log-likelihood.
    reg_covar : float, default=1e-6
        Floor on every noise variance sigma_k^2 (it keeps each C_k positive
        definite), in the data's units squared: for data whose noise variance
        is near 1e-6 or below (a noise s.d. of 1e-3, as millimetres in metres),
        scale the data or lower it.  A floor where sklearn's ``reg_covar`` adds
        to the covariances: added to sigma^2, it would compound through the
        EM update and make EM descend.
    max_iter : int, default=100
    n_init : int, default=1
        Restarts; the best lower bound is kept.
    init_params : {'kmeans', 'k-means++', 'random', 'random_from_data'}, default='kmeans'
        How the initial responsibilities are drawn: k-means labels; nearest of
        the k-means++ seeds or of K random rows; or random soft
        responsibilities.  Each component then starts at the closed-form PPCA
        of its weighted covariance.
    random_state : int, RandomState instance or None, default=None
    warm_start : bool, default=False
    verbose : int, default=0
    verbose_interval : int, default=10
    chunk_size : int or None, default=None
        Rows per kernel call for the initialisation and predictions (None:
        ``fastlvm._config.DEFAULT_CHUNK_ROWS``, fewer where a pass's (rows, K) or
        (rows, D) float64 arrays would pass ``fastlvm._config.BLOCK_BYTES``).  The
        fused E-step of ``fit`` takes a host array in one call when this is None
        (its kernel never holds more than a tile of rows per thread), as
        GaussianMixture's does.

    Notes
    -----
    X may be a torch tensor on a CUDA device or a cupy array: ``fit`` and
    every method then run on that device (Triton or CuPy kernels), fitted
    parameters are float64 arrays of X's kind there, and results come back as
    such arrays.  Only the few parameter numbers ``sample`` draws from go to
    the host.

    Attributes
    ----------
    weights_ : ndarray of shape (n_components,)
    means_ : ndarray of shape (n_components, n_features)
    components_ : ndarray of shape (n_components, n_latent, n_features)
        W_k, one loading matrix per component (rows: latent directions).
    noise_variance_ : ndarray of shape (n_components,)
        sigma_k^2.
    converged_ : bool
    n_iter_ : int
    lower_bound_ : float
        Mean log-likelihood of the best restart, before its last M-step.
    lower_bounds_ : list of float
    n_features_in_ : int
    """

    _STRUCTURE = ("n_components", "n_latent")

    _parameter_constraints: dict = {
        **EM_PARAMETER_CONSTRAINTS,
        "n_latent": [Interval(Integral, 1, None, closed="left")],
    }

    def __init__(self, n_components=1, *, n_latent=2, tol=1e-3, reg_covar=1e-6, max_iter=100,
                 n_init=1, init_params="kmeans", random_state=None, warm_start=False,
                 verbose=0, verbose_interval=10, chunk_size=None):
        self.n_components = n_components
        self.n_latent = n_latent
        self.tol = tol
        self.reg_covar = reg_covar
        self.max_iter = max_iter
        self.n_init = n_init
        self.init_params = init_params
        self.random_state = random_state
        self.warm_start = warm_start
        self.verbose = verbose
        self.verbose_interval = verbose_interval
        self.chunk_size = chunk_size

    # ------------------------------------------------------------------ fit
    def _fit(self, X, sample_weight, callback):
        self._validate_params()
        X, sample_weight = self._validate_fit_rows(X, sample_weight)
        if not self.n_latent < X.shape[1]:
            raise ValueError(
                f"n_latent must be smaller than n_features; got n_latent={self.n_latent} "
                f"with n_features = {X.shape[1]}. Use fewer latent dimensions (with "
                "n_latent == n_features a component is a full-covariance Gaussian: use "
                "GaussianMixture(covariance_type='full')).")
        check_n_samples(X.shape[0], self.n_components, sample_weight)
        sample_weight = in_row_units(sample_weight)  # the fit does not depend on their scale
        try:
            fit_em(self, X, sample_weight, callback)
        finally:  # the E-step's anchor hints belong to one fit's rows (see _estep)
            self.__dict__.pop("_anchor_hints", None)
        return X

    # ------------------------------------------------- hooks for fastlvm.em
    def _em_initialize(self, X, sample_weight, random_state):
        k, n, chunk = self.n_components, X.shape[0], self._block_rows(X.shape[1])
        np_dtype = np.float32 if is_float32(X) else np.float64
        if self.init_params == "random":
            state = random_state.get_state()

            def stats(center):  # the same draws on every pass over the rows
                random_state.set_state(state)
                resp = init.random_resp_chunks(random_state, n, k, np_dtype, chunk)
                return init.stats_from_resp(X, resp, center, "full", sample_weight)
        else:
            labels = self._initial_labels(X, sample_weight, random_state)

            def stats(center):
                return init.stats_from_labels(X, labels, k, center, "full", sample_weight, chunk)
        nk, sum_x, _ = stats(None)
        nk_eps = nk + mp.EMPTY_COMPONENT_FLOOR * eps_of(X.dtype)
        means = sum_x / nk_eps[:, None]
        _, _, scatter = stats(means)
        cov = scatter / nk_eps[:, None, None]
        mp.refuse_small_variances(cov, self.reg_covar, np_dtype)
        self.components_, self.noise_variance_ = mp.ppca_from_covariance(
            cov, self.n_latent, self.reg_covar)
        mp.refuse_collapse(self.noise_variance_, self.reg_covar, np_dtype)
        self.weights_ = nk_eps / nk_eps.sum()
        self.means_ = means
        self.__dict__.pop("_anchor_hints", None)  # each start searches afresh

    def _initial_labels(self, X, sample_weight, random_state):
        """Hard labels from 'kmeans', 'k-means++' seeds or random rows, on X's device."""
        k, n = self.n_components, X.shape[0]
        if is_device_array(X):
            from . import _device_kmeans as kmeans_module

            lloyd_step = kmeans_module.lloyd_step
        else:
            kmeans_module = init
            lloyd_step = lloyd_step_numba
        if self.init_params == "kmeans":
            return kmeans_module.kmeans(X, k, random_state, sample_weight)[0]
        if self.init_params == "k-means++":
            seeds = kmeans_module.kmeans_plusplus(X, k, random_state, sample_weight)[0]
        else:
            indices = random_state.choice(n, size=k, replace=False)
            seeds = X[index_like(X, indices) if is_device_array(X) else indices]
        return lloyd_step(X, as_f64(seeds), sample_weight)[0]

    def _em_iteration(self, X, sample_weight):
        # on a device the M-step is queued behind the E-step before anything
        # waits for either (the bound is read last)
        stats = self._estep(X, sample_weight, keep_on_device=True)
        total = X.shape[0] if sample_weight is None else sample_weight.sum()
        self.weights_, self.means_, self.components_, self.noise_variance_ = (
            mp.parameters_from_stats(stats, self.components_, self.noise_variance_,
                                     self.reg_covar, eps_of(X.dtype)))
        mp.refuse_collapse(self.noise_variance_, self.reg_covar,
                           np.float32 if is_float32(X) else np.float64)
        return float(stats.log_likelihood) / float(total)

    def _estep(self, X, sample_weight, keep_on_device=False):
        """E-step statistics summed over chunks of rows (one fused pass; a device
        array in one call, the kernel splitting the rows itself).  With
        ``keep_on_device`` a device array's log-likelihood stays a 0-d device
        array, so the call does not wait for the device."""
        backend, impl = resolve("mppca_stats", STATS_IMPLEMENTATIONS, X)
        params = (self.weights_, self.means_, self.components_, self.noise_variance_)
        if is_device_array(X):
            return MPPCAStats(*impl(X, *params, sample_weight, keep_on_device=keep_on_device))
        hints = None
        if backend == "numba":
            # the pruned E-step's anchors, kept from one iteration to the next: the
            # nearest-mean search then runs once per start (rows that stop being
            # clean get theirs renewed); reset by _em_initialize and at the end of
            # fit, so a fit's results never depend on an earlier one's
            hints = getattr(self, "_anchor_hints", None)
            if hints is None or hints.shape != (X.shape[0],):
                hints = self._anchor_hints = np.full(X.shape[0], -1, dtype=np.int32)
        # one call unless chunk_size asks for more, as GaussianMixture's E-step:
        # the kernel holds a tile per thread, never n x K, and each call's set-up
        # (the pruning bounds and their probe) and last, part-idle group of
        # runs cost a seventh of a 1M-row iteration in 262,144-row calls
        chunk = self.chunk_size or max(1, X.shape[0])
        total = None
        for start in range(0, X.shape[0], chunk):
            sw = None if sample_weight is None else sample_weight[start:start + chunk]
            part = (impl(X[start:start + chunk], *params, sw) if hints is None else
                    impl(X[start:start + chunk], *params, sw,
                         anchors=hints[start:start + chunk]))
            total = list(part) if total is None else [
                a + b for a, b in zip(total[:-1], part[:-1])] + [total[-1]]
        return MPPCAStats(*total)

    def _get_parameters(self):
        return (self.weights_, self.means_, self.components_, self.noise_variance_)

    def _set_parameters(self, params):
        self.weights_, self.means_, self.components_, self.noise_variance_ = params

    # ------------------------------------------------------------- predict
    def _weighted_log_prob_chunks(self, X):
        impl = resolve("mppca_log_prob", LOGPROB_IMPLEMENTATIONS, X)[1]
        log_w = log(self.weights_)
        chunk = self._block_rows()
        for start in range(0, X.shape[0], chunk):
            lp = impl(X[start:start + chunk], self.means_, self.components_,
                      self.noise_variance_)
            lp += cast_like(log_w, lp)  # in place: lp is the kernel's fresh output
            yield start, lp

    def _score_samples_validated(self, X):
        if is_torch(X):  # straight from the fused log-normaliser kernel: no n x K array
            from fastlvm.kernels._triton_low_rank import TritonLowRankParams, low_rank_log_norm

            params = TritonLowRankParams(X, self.means_, self.components_,
                                         self.noise_variance_, self.weights_)
            return low_rank_log_norm(X, params)[0]
        return super()._score_samples_validated(X)

    def _sample_components(self, rng, counts):
        """x = W_k^T z + mu_k + sigma_k e, z and e standard normal (see
        :meth:`MixtureBase.sample`)."""
        means, components, noise = map(to_numpy, (
            self.means_, self.components_, self.noise_variance_))
        _, q, d = components.shape
        return [rng.standard_normal((c, q)) @ w + m + np.sqrt(s2) * rng.standard_normal((c, d))
                for c, w, m, s2 in zip(counts, components, means, noise)]

    def get_covariances(self):
        """Each component's covariance W_k^T W_k + sigma_k^2 I, (K, D, D), where
        the parameters are."""
        check_is_fitted(self)
        cov = self.components_.swapaxes(1, 2) @ self.components_
        return add_to_diagonal(cov, self.noise_variance_[:, None])

    def _n_parameters(self):
        k, q, d = self.components_.shape
        return mp.n_parameters(k, d, q)

    def bic(self, X):
        """Bayesian information criterion on X (lower is better)."""
        return -2 * self.score(X) * X.shape[0] + self._n_parameters() * np.log(X.shape[0])

    def aic(self, X):
        """Akaike information criterion on X (lower is better)."""
        return -2 * self.score(X) * X.shape[0] + 2 * self._n_parameters()
