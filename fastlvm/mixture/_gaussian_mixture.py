"""GaussianMixture: a drop-in for sklearn.mixture.GaussianMixture on fused kernels."""

from numbers import Real

import numpy as np
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions

from fastlvm._arrays import as_f64, as_float32, eps_of, f64_like, is_float32, to_numpy_together
from fastlvm._continuation import same_value, snapshot
from fastlvm._restore import restored_on_error
from fastlvm.em import fit_em

from . import _gaussian_params as gp
from . import _map_prior as map_prior
from ._base import centre_loss_arrays, warn_centre_loss
from ._device_em_step import (FusedStepCache, drop_fused_step, fused_em_iteration,
                              fused_iteration_applies)
from ._gaussian_base import GAUSSIAN_PARAMETER_CONSTRAINTS, GaussianMixtureBase, _is_stream


class GaussianMixture(GaussianMixtureBase):
    """Gaussian mixture fitted by EM on fused, N x K-free kernels.

    Same parameters, defaults, attributes, methods and errors as
    :class:`sklearn.mixture.GaussianMixture`; see its documentation for
    each.  From the same initial parameters, the sequence of lower bounds
    matches sklearn's (float64).  What fastlvm adds:

    - ``fit(X, sample_weight=...)``: weighted EM;
    - ``chunk_size``: rows per kernel call, bounding temporary memory;
    - one fused pass per iteration (log-densities, log-sum-exp, moments) that
      never stores the (n_samples, n_components) responsibilities; float32
      data stays float32, with statistics accumulated in float64 around the
      current means, so data far from the origin keeps its accuracy; the
      M-step runs in float64 and fitted parameters are float64;
    - 'kmeans' and 'k-means++' initialisation on the same kernels;
    - torch tensors on a CUDA device: ``fit`` and every method run there on
      the Triton kernels (initialisation and the batched-Cholesky M-step on the
      device too); fitted parameters are float64 tensors on that device and
      results come back as tensors.  Nothing is copied to the host but the
      few parameter numbers ``sample`` draws from.

    Parameters
    ----------
    n_components : int, default=1
    covariance_type : {'full', 'tied', 'diag', 'spherical'}, default='full'
    tol : float, default=1e-3
        Convergence threshold on the change of the mean log-likelihood.
    reg_covar : float, default=1e-6
        Added to the diagonal of covariances.
    max_iter : int, default=100
    n_init : int, default=1
    init_params : {'kmeans', 'k-means++', 'random', 'random_from_data'}, default='kmeans'
    weights_init : array-like of shape (n_components,), default=None
    means_init : array-like of shape (n_components, n_features), default=None
    precisions_init : array-like, default=None
        (K,) spherical, (D, D) tied, (K, D) diag, (K, D, D) full.
    random_state : int, RandomState instance or None, default=None
    warm_start : bool, default=False
    verbose : int, default=0
    verbose_interval : int, default=10
    chunk_size : int or None, default=None
        Rows per kernel call for streamed chunks, the initialisation and
        predictions (None: ``fastlvm._config.DEFAULT_CHUNK_ROWS``, fewer where a
        pass's (rows, K) or (rows, D) float64 arrays would pass
        ``fastlvm._config.BLOCK_BYTES``, or a streamed chunk
        ``fastlvm._config.STREAM_CHUNK_BYTES``).  The fused E-step
        of ``fit`` takes the whole array in one call when this is None (its
        kernel never holds more than a tile of rows per thread), on the host
        as on a device.
    device : str or torch.device or None, default=None
        Fit a host (NumPy) array on this device without moving it there whole:
        each EM pass streams pinned chunks of ``chunk_size`` rows (by default
        256 MiB at most), copies overlapped with compute, so data larger than GPU
        memory fits.  The
        initialisation runs on the host; fitted parameters are float64 tensors
        on ``device``; predictions on host arrays stream the same way and come
        back as NumPy.  Ignored for tensor inputs, which stay where they are.
    learning_offset : float, default=10.0
        tau in the ``partial_fit`` step size rho_t = (t + tau)^(-kappa).
    learning_decay : float, default=0.7
        kappa, in (0.5, 1] for the Robbins-Monro conditions.
    prior : dict or None, default=None
        None: maximum likelihood.  A dict (``{}`` for all defaults): MAP-EM under
        conjugate priors (:mod:`fastlvm.mixture._map_prior`), keys
        ``weight_concentration`` (Dirichlet alpha >= 1, default 1),
        ``mean_precision`` (kappa_0, default 0.01), ``mean`` (mu_0, (D,), default
        the data mean), ``degrees_of_freedom`` (nu_0, default D + 2) and
        ``covariance`` (Psi_0: (D, D) 'full'/'tied', (D,) 'diag', a float
        'spherical'; default the data covariance / K^(2/D) plus ``reg_covar`` on
        its diagonal).  The prior keeps
        components from collapsing; ``lower_bound_`` is then the MAP objective
        (log-likelihood + log prior) / n_samples.  ``partial_fit`` runs the same
        MAP M-step on the running statistics (online MAP-EM), with the prior's
        defaults taken from the first batch.
    total_samples : float or None, default=None
        Only for ``partial_fit`` with ``prior``: the size of the data set the
        running statistics stand for, against which the prior is weighed (the
        M-step sees the statistics of total_samples rows).  None: the sample
        weight the running statistics have seen since the last ``fit`` (or the
        first step), which equals ``fit``'s weighting after one pass over the
        data; set it to the data's size when streaming several passes.
    cuda_graph : 'auto' or bool, default='auto'
        On torch CUDA tensors (the Triton kernels, no ``prior``): after three
        eager iterations, record one EM iteration (the statistics pass, the fused
        M-step, the next coefficients) as a CUDA graph and replay it, one launch
        an iteration where the host would launch a dozen kernels and allocate
        about twenty tensors.  The values are those of ``cuda_graph=False``, bit
        for bit.  On an H200 it took an iteration from 0.65 to 0.38 ms ('diag',
        N = 1M, D = 32, K = 16) and from 0.77 to 0.39 ms ('tied', N = 200k)
        (``bench/results/gpu-h200.md``, session 59).  'auto' records on CUDA
        tensors; True also records the CuPy iteration on cupy arrays (stream
        capture, from a memory pool of its own; not yet timed on a GPU, which
        is why 'auto' leaves cupy arrays eager), and runs the graph's
        static-buffer step, without a graph, on CPU tensors under the Triton
        interpreter (how CI tests it); False never.  NumPy arrays ignore it.

    Attributes
    ----------
    weights_ : ndarray of shape (n_components,)
    means_ : ndarray of shape (n_components, n_features)
    covariances_ : ndarray, shape by ``covariance_type``
    precisions_ : ndarray, shape by ``covariance_type``
    precisions_cholesky_ : ndarray, shape by ``covariance_type``
    converged_ : bool
    n_iter_ : int
    lower_bound_ : float
    lower_bounds_ : list of float, one per iteration of the best restart
    n_features_in_ : int
    feature_names_in_ : ndarray of shape (n_features_in_,)
        Only when X has string feature names.
    n_steps_ : int
        ``partial_fit`` steps taken (0 after ``fit``).
    prior_ : dict
        The prior's hyperparameters, defaults filled in (with ``prior`` set).
    """

    _parameter_constraints: dict = {
        **GAUSSIAN_PARAMETER_CONSTRAINTS,
        "weights_init": ["array-like", None],
        "means_init": ["array-like", None],
        "precisions_init": ["array-like", None],
        "prior": [dict, None],
        "total_samples": [Interval(Real, 0, None, closed="neither"), None],
        "cuda_graph": ["boolean", StrOptions({"auto"})],
    }

    def __init__(self, n_components=1, *, covariance_type="full", tol=1e-3, reg_covar=1e-6,
                 max_iter=100, n_init=1, init_params="kmeans", weights_init=None,
                 means_init=None, precisions_init=None, random_state=None, warm_start=False,
                 verbose=0, verbose_interval=10, chunk_size=None, device=None,
                 learning_offset=10.0, learning_decay=0.7, prior=None,
                 total_samples=None, cuda_graph="auto"):
        self.n_components = n_components
        self.covariance_type = covariance_type
        self.tol = tol
        self.reg_covar = reg_covar
        self.max_iter = max_iter
        self.n_init = n_init
        self.init_params = init_params
        self.weights_init = weights_init
        self.means_init = means_init
        self.precisions_init = precisions_init
        self.random_state = random_state
        self.warm_start = warm_start
        self.verbose = verbose
        self.verbose_interval = verbose_interval
        self.chunk_size = chunk_size
        self.device = device
        self.learning_offset = learning_offset
        self.learning_decay = learning_decay
        self.prior = prior
        self.total_samples = total_samples
        self.cuda_graph = cuda_graph

    # ------------------------------------------------------------------ fit
    def _fit(self, X, sample_weight, callback):
        self._validate_params()
        # maximum likelihood does not depend on the weights' scale; MAP does
        X, sample_weight, rows = self._validate_fit(X, sample_weight,
                                                    row_units=self.prior is None)
        self._resolve_prior(X, sample_weight)
        self._init_checked = self._check_initial_parameters(X.shape[1])
        try:
            fit_em(self, rows, sample_weight, callback)
        finally:
            del self._init_checked
        self.n_steps_, self._running_statistics = 0, None
        self._round_parameters_to(X)
        return X

    def _round_parameters_to(self, X):
        """Fitted parameters in float32 for float32 data, as sklearn (>= 1.7) keeps
        them.  The M-step runs in float64 and its results are rounded once, here;
        a warm start or the next online step reads them back as they are."""
        if is_float32(X):
            for name in ("weights_", "means_", "covariances_", "precisions_cholesky_",
                         "precisions_"):
                setattr(self, name, as_float32(getattr(self, name)))

    def _resolve_prior(self, X, sample_weight):
        """``prior_`` from ``prior`` and the (weighted) rows X; none without a prior."""
        if self.prior is None:
            self.__dict__.pop("prior_", None)
        else:
            self.prior_ = map_prior.resolve_prior(self.prior, X, sample_weight,
                                                  self.covariance_type, self.n_components,
                                                  self.chunk_size, self.reg_covar)
            self._prior_from = snapshot(self.prior)

    def partial_fit(self, X, y=None, sample_weight=None):
        """One online EM step on a mini-batch (Cappe & Moulines 2009).

        The first call on an unfitted model initialises it on this batch by
        ``init_params`` (or the given ``*_init``).  Each call runs one fused
        E-step pass over the batch, blends its per-row statistics into running
        averages, s = (1 - rho_t) s + rho_t s_batch with
        rho_t = (t + learning_offset) ** -learning_decay, and sets the
        parameters by the M-step from s.  The first step of a fresh or just-
        ``fit`` model takes rho = 1.  ``lower_bound_`` is the batch's mean
        log-likelihood under the parameters before the step.

        With ``prior`` set this is online MAP-EM: the M-step is the posterior
        mode for n s, the statistics of n = ``total_samples`` rows (by default
        the sample weight seen since the first step), and ``lower_bound_`` adds
        log p(theta) / n, the per-row MAP objective ``fit`` records.  The
        prior's data-dependent defaults (mean, covariance) come from the batch
        that starts the model, or from the first batch after ``set_params``
        gave a new ``prior``.

        Batches on a GPU (torch CUDA tensors, cupy arrays) are stepped there
        on the device kernels, as ``fit`` runs them; the model's parameters
        then live on that device, and later batches must be there too.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : ignored
        sample_weight : array-like of shape (n_samples,), default=None

        Returns
        -------
        self
        """
        self._validate_params()
        with restored_on_error(self, "_running_statistics"):
            # the step from averages does not depend on the weights' scale; MAP does
            X, sample_weight, rho, unit = self._partial_fit_begin(
                X, sample_weight, row_units=self.prior is None)
            if self.prior is not None and not (
                    hasattr(self, "prior_")
                    and same_value(self.prior, getattr(self, "_prior_from", self.prior))):
                # a model fitted without a prior, or a prior changed since: set from
                # this batch, as the first batch sets it
                self._resolve_prior(X, sample_weight)
            # on a device the step is queued behind the E-step, and the bound, the
            # total weight and the covariance checks are read back in one copy
            prior = self._placed_prior()  # before any work is queued
            ll, total, nk, sum_x, second, center = self._estep(X, sample_weight,
                                                               keep_on_device=True)
            seen = total * unit  # in the weights' own units, for a prior set later
            seen_before = 0.0 if rho >= 1.0 else self._seen_weight
            nk, sum_x, second, center = self._running_statistics.update(
                nk, sum_x, second, center, rho, 1.0 / total)
            log_prior = 0.0
            if self.prior is not None:  # the MAP step for the statistics of n rows
                n = seen_before + seen if self.total_samples is None else self.total_samples
                log_prior = self._log_prior_density(prior) / n
            else:  # averages in units of this batch's rows, for the M-step's 10 eps
                n = X.shape[0]
            nk, sum_x, second = n * nk, n * sum_x, n * second
            flags = self._m_step(nk, sum_x, second, center, X, prior)
            # the centre-loss check's parameters ride on the step's one copy
            centre = centre_loss_arrays(self, X)
            ll, total, log_prior, seen, flags, *centre = to_numpy_together(
                [ll, total, log_prior, seen, flags, *centre])
            gp.refuse_flagged_covariances(flags, is_float32(X))
            self._seen_weight = seen_before + float(seen)
            self.lower_bound_ = float(ll / total + log_prior)
            self._partial_fit_end()
            self._round_parameters_to(X)
        warn_centre_loss(self, X, stacklevel=3, read=centre or None)
        return self

    def _partial_fit_initialize(self, X, sample_weight):
        self._resolve_prior(X, sample_weight)
        self._init_checked = self._check_initial_parameters(X.shape[1])
        try:
            self._em_initialize(X, sample_weight, check_random_state(self.random_state))
        finally:
            del self._init_checked

    def _check_initial_parameters(self, n_features):
        k = self.n_components
        return {
            "weights": None if self.weights_init is None
            else gp.check_weights_init(self.weights_init, k),
            "means": None if self.means_init is None
            else gp.check_means_init(self.means_init, k, n_features),
            "precisions": None if self.precisions_init is None
            else gp.check_precisions_init(self.precisions_init, self.covariance_type, k,
                                          n_features),
        }

    # ------------------------------------------------- hooks for fastlvm.em
    def _em_initialize(self, X, sample_weight, random_state):
        drop_fused_step(self)
        place = X  # parameters are made where the rows are: host, device, or streamed
        if _is_stream(X):
            X, place = X.host, X.template
        given = self._init_checked
        cov = self.covariance_type
        total = X.shape[0] if sample_weight is None else float(sample_weight.sum())
        if given["weights"] is None or given["means"] is None or given["precisions"] is None:
            if self.prior is not None:  # the prior's M-step from the start: no collapse
                stats = self._initial_statistics(X, sample_weight, random_state, True)
                weights, means, covariances = map_prior.map_parameters_from_stats(
                    *(as_f64(a) for a in stats), cov, self.reg_covar, eps_of(X.dtype),
                    self.prior_)
            else:
                nk_eps, means, covariances = self._initial_statistics(X, sample_weight,
                                                                      random_state)
                weights = nk_eps / total
        else:
            weights = means = covariances = None
        weights = weights if given["weights"] is None else given["weights"]
        means = means if given["means"] is None else given["means"]
        self.weights_, self.means_ = f64_like(place, weights), f64_like(place, means)
        if given["precisions"] is None:
            self.covariances_ = f64_like(place, covariances)
            self.precisions_cholesky_ = gp.precision_cholesky(self.covariances_, cov,
                                                              is_float32(X))
        else:
            pc = gp.precision_cholesky_from_precisions(given["precisions"], cov)
            self.precisions_cholesky_ = f64_like(place, pc)
            self.covariances_ = f64_like(place, gp.covariances_from_cholesky(pc, cov))

    def _em_iteration(self, X, sample_weight):
        if fused_iteration_applies(self, X):  # on a GPU: a few launches, one read
            cache = self.__dict__.setdefault("_fused_step", FusedStepCache())
            return fused_em_iteration(self, X, sample_weight, cache)
        # on a device the M-step is queued behind the E-step, and the bound, the
        # total weight and the covariance checks are read back in one copy
        prior = self._placed_prior()  # before any work is queued
        ll, total, nk, sum_x, second, center = self._estep(X, sample_weight,
                                                           keep_on_device=True)
        # the MAP objective adds log p(theta) under the parameters of the pass
        log_prior = 0.0 if prior is None else self._log_prior_density(prior)
        flags = self._m_step(nk, sum_x, second, center, X, prior)
        ll, log_prior, total, flags = to_numpy_together([ll, log_prior, total, flags])
        gp.refuse_flagged_covariances(flags, is_float32(X))
        return float(ll + log_prior) / float(total)

    def _m_step(self, nk, sum_x, second, center, X, prior=None):
        """The M-step from the statistics, where they are (MAP under ``prior``,
        :meth:`_placed_prior`, where it is given); returns the covariance checks'
        flags, unread (:func:`._gaussian_params.precision_cholesky`, deferred):
        the caller reads them with its bound and refuses bad ones."""
        if prior is not None:  # where the statistics are, as without a prior
            weights, means, covariances = map_prior.map_parameters_from_stats(
                nk, sum_x, second, center, self.covariance_type, self.reg_covar,
                eps_of(X.dtype), prior)
        else:
            weights, _, means, covariances = gp.parameters_from_stats(
                nk, sum_x, second, center, self.covariance_type, self.reg_covar,
                eps_of(X.dtype))
        self.weights_, self.means_, self.covariances_ = weights, means, covariances
        self.precisions_cholesky_, flags = gp.precision_cholesky(
            covariances, self.covariance_type, is_float32(X), deferred=True)
        return flags

    def _placed_prior(self):
        """``prior_`` where the parameters are (:func:`._map_prior.placed_prior`), or
        None without a prior."""
        return None if self.prior is None else map_prior.placed_prior(self.prior_,
                                                                      self.means_)

    def _log_prior_density(self, prior):
        """log p(theta) of the current parameters under ``prior`` (placed), a 0-d
        float64 array where they are, unread."""
        return map_prior.log_prior_density(self.weights_, self.means_, self.covariances_,
                                           self.precisions_cholesky_, self.covariance_type,
                                           prior, keep_on_device=True)

    def _get_parameters(self):
        return (self.weights_, self.means_, self.covariances_, self.precisions_cholesky_)

    def _set_parameters(self, params):
        drop_fused_step(self)  # the end of a fit: nothing carried beyond it
        self.weights_, self.means_, self.covariances_, self.precisions_cholesky_ = params
        self.precisions_ = gp.precisions_from_cholesky(self.precisions_cholesky_,
                                                       self.covariance_type)

    def _n_parameters(self):
        return gp.n_parameters(self.covariance_type, self.n_components, self.means_.shape[1])

    def bic(self, X):
        """Bayesian information criterion on X (lower is better)."""
        return (-2 * self.score(X) * X.shape[0]
                + self._n_parameters() * np.log(X.shape[0]))

    def aic(self, X):
        """Akaike information criterion on X (lower is better)."""
        return -2 * self.score(X) * X.shape[0] + 2 * self._n_parameters()
