"""BayesianGaussianMixture: a drop-in for sklearn's, on the EM kernels.

Variational Bayes (Bishop 2006, ch. 10.2; sklearn's parameterisation and
bound): each iteration is one fused :func:`fastlvm.kernels.estep_stats` pass
whose per-component log-weights carry the variational constants
(E[log pi_k] and the expected log-determinant terms), then the closed-form
update of q(pi, mu, Lambda) from the pass's statistics
(:mod:`._variational_params`).  ``partial_fit`` is stochastic VI (Hoffman et
al. 2013): the natural parameters of q(theta) are affine in the expected
sufficient statistics, so a natural-gradient step of size rho_t is the same
update from statistics blended as (1 - rho_t) s + rho_t (total / batch) s_batch.
"""

from numbers import Real

import numpy as np
from scipy.special import gammaln
from sklearn.utils import check_array, check_random_state
from sklearn.utils._param_validation import Interval, StrOptions

from fastlvm._arrays import (as_f64, cast_like, empty_like_rows, eps_of, f64_like, f64_together,
                             is_device_array, is_float32, is_torch, off_device, to_numpy,
                             to_numpy_together)
from fastlvm._continuation import same_value, snapshot
from fastlvm._dispatch import resolve
from fastlvm._moments import mean_and_scatter, row_ranges
from fastlvm._restore import restored_on_error
from fastlvm._sample_weight import check_sample_weight
from fastlvm.em import fit_em
from fastlvm.kernels._covariance import log_det_cholesky
from fastlvm.kernels.log_responsibilities import IMPLEMENTATIONS as LOGRESP_IMPLEMENTATIONS

from . import _gaussian_params as gp
from . import _variational_params as vp
from ._gaussian_base import GAUSSIAN_PARAMETER_CONSTRAINTS, GaussianMixtureBase, _is_stream
from ._base import checks_centre_loss, put_rows, warn_centre_loss

WEIGHT_PRIOR_TYPES = ("dirichlet_process", "dirichlet_distribution")
PRIOR_PARAMETERS = ("weight_concentration_prior", "mean_precision_prior", "mean_prior",
                    "degrees_of_freedom_prior", "covariance_prior")


class BayesianGaussianMixture(GaussianMixtureBase):
    """Variational Bayesian Gaussian mixture on fused, N x K-free kernels.

    Same parameters, defaults, attributes, methods, bound and errors as
    :class:`sklearn.mixture.BayesianGaussianMixture`; see its documentation
    for each.  From the same start the bound trajectory matches sklearn's
    (float64).  What fastlvm adds:

    - one fused kernel pass per iteration (expected log-densities, log-sum-exp,
      moments), float32 data kept float32 with float64 statistics;
    - ``fit(X, sample_weight=...)``, ``chunk_size``, and torch tensors on a
      CUDA device (the E-step on the Triton kernels; the K x D x D update on the
      host), as for :class:`fastlvm.GaussianMixture`;
    - ``partial_fit``: stochastic variational inference on mini-batches;
    - ``score_samples(X, predictive=True)``: the posterior predictive density.

    Parameters
    ----------
    n_components : int, default=1
    covariance_type : {'full', 'tied', 'diag', 'spherical'}, default='full'
    tol : float, default=1e-3
        Convergence threshold on the change of the lower bound.
    reg_covar : float, default=1e-6
    max_iter : int, default=100
    n_init : int, default=1
    init_params : {'kmeans', 'k-means++', 'random', 'random_from_data'}, default='kmeans'
    weight_concentration_prior_type : {'dirichlet_process', 'dirichlet_distribution'}, \
default='dirichlet_process'
    weight_concentration_prior : float or None, default=None (1 / n_components)
    mean_precision_prior : float or None, default=None (1)
    mean_prior : array-like of shape (n_features,) or None, default=None (the data mean)
    degrees_of_freedom_prior : float or None, default=None (n_features)
    covariance_prior : float or array-like or None, default=None
        (D, D) 'full' and 'tied', (D,) 'diag', a float 'spherical'; None: the
        data covariance (with weights, sum w (x - m)(x - m)^T / (sum w - 1)).
    random_state : int, RandomState instance or None, default=None
    warm_start : bool, default=False
    verbose : int, default=0
    verbose_interval : int, default=10
    chunk_size : int or None, default=None
        Rows per kernel call for streamed chunks, the initialisation and
        predictions (None: ``fastlvm._config.DEFAULT_CHUNK_ROWS``, fewer where a
        pass's (rows, K) or (rows, D) float64 arrays would pass
        ``fastlvm._config.BLOCK_BYTES``, or a streamed chunk
        ``fastlvm._config.STREAM_CHUNK_BYTES``); the fused E-step
        takes the whole array in one call when this is None, as
        GaussianMixture's does.
    device : str or torch.device or None, default=None
        Stream a host array's chunks to this device, as for GaussianMixture.
    learning_offset : float, default=10.0
        tau in the ``partial_fit`` step size rho_t = (t + tau)^(-kappa).
    learning_decay : float, default=0.7
        kappa, in (0.5, 1] for the Robbins-Monro conditions.
    total_samples : float, default=1e6
        Size of the data set ``partial_fit`` batches are drawn from (the
        statistics of a batch of b rows count total_samples / b times); set it
        to the data's size.  The default is sklearn's
        ``LatentDirichletAllocation``'s.

    Attributes
    ----------
    weights_ : ndarray (n_components,)
    means_ : ndarray (n_components, n_features)
    covariances_, precisions_, precisions_cholesky_ : shape by ``covariance_type``
    weight_concentration_prior_, weight_concentration_ : float; tuple or ndarray
    mean_precision_prior_, mean_precision_ : float; ndarray (n_components,)
    mean_prior_ : ndarray (n_features,)
    degrees_of_freedom_prior_, degrees_of_freedom_ : float; ndarray (n_components,)
    covariance_prior_ : float or ndarray
    converged_, n_iter_, lower_bound_, lower_bounds_, n_features_in_
    n_steps_ : int
        ``partial_fit`` steps taken.
    """

    _STRUCTURE = ("n_components", "covariance_type", "weight_concentration_prior_type")

    _parameter_constraints: dict = {
        **GAUSSIAN_PARAMETER_CONSTRAINTS,
        "weight_concentration_prior_type": [StrOptions(set(WEIGHT_PRIOR_TYPES))],
        "weight_concentration_prior": [None, Interval(Real, 0.0, None, closed="neither")],
        "mean_precision_prior": [None, Interval(Real, 0.0, None, closed="neither")],
        "mean_prior": [None, "array-like"],
        "degrees_of_freedom_prior": [None, Interval(Real, 0.0, None, closed="neither")],
        "covariance_prior": [None, "array-like", Interval(Real, 0.0, None, closed="neither")],
        "total_samples": [Interval(Real, 0, None, closed="neither")],
    }

    def __init__(self, *, n_components=1, covariance_type="full", tol=1e-3, reg_covar=1e-6,
                 max_iter=100, n_init=1, init_params="kmeans",
                 weight_concentration_prior_type="dirichlet_process",
                 weight_concentration_prior=None, mean_precision_prior=None, mean_prior=None,
                 degrees_of_freedom_prior=None, covariance_prior=None, random_state=None,
                 warm_start=False, verbose=0, verbose_interval=10, chunk_size=None,
                 device=None, learning_offset=10.0, learning_decay=0.7, total_samples=1e6):
        self.n_components = n_components
        self.covariance_type = covariance_type
        self.tol = tol
        self.reg_covar = reg_covar
        self.max_iter = max_iter
        self.n_init = n_init
        self.init_params = init_params
        self.weight_concentration_prior_type = weight_concentration_prior_type
        self.weight_concentration_prior = weight_concentration_prior
        self.mean_precision_prior = mean_precision_prior
        self.mean_prior = mean_prior
        self.degrees_of_freedom_prior = degrees_of_freedom_prior
        self.covariance_prior = covariance_prior
        self.random_state = random_state
        self.warm_start = warm_start
        self.verbose = verbose
        self.verbose_interval = verbose_interval
        self.chunk_size = chunk_size
        self.device = device
        self.learning_offset = learning_offset
        self.learning_decay = learning_decay
        self.total_samples = total_samples

    # ------------------------------------------------------------------ fit
    def _fit(self, X, sample_weight, callback):
        self._validate_params()
        X, sample_weight, rows = self._validate_fit(X, sample_weight)
        self._check_parameters(X, sample_weight)
        fit_em(self, rows, sample_weight, callback)
        self.n_steps_, self._running_statistics = 0, None
        return X

    def partial_fit(self, X, y=None, sample_weight=None):
        """One stochastic variational step on a mini-batch (Hoffman et al. 2013).

        The first call on an unfitted model sets the priors from this batch (as
        ``fit`` does from all the data) and initialises q by ``init_params`` on
        it; after ``set_params`` gave a prior a new value, the next call sets
        the priors again from its batch.  Each call then runs one fused E-step
        pass over the batch and moves q(theta) by a natural-gradient step of size
        rho_t = (t + learning_offset) ** -learning_decay: the update of ``fit``
        from statistics blended as (1 - rho_t) s + rho_t (total_samples / batch
        weight) s_batch.  The first step of a fresh or just-``fit`` model takes
        rho = 1.  ``lower_bound_`` is the bound estimated from this batch alone
        (noisy; compare fits with :meth:`elbo` on held data instead).

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
            X, sample_weight, rho, _ = self._partial_fit_begin(X, sample_weight)
            if self._priors_changed():  # set again from this batch, as the first sets them
                self._check_parameters(X, sample_weight)
            # the centre-loss check's means and Cholesky factors ride on the step's copy
            centre = (("means_", "precisions_cholesky_") if checks_centre_loss(self, X)
                      else ())
            self.lower_bound_, centre = self._variational_step(X, sample_weight, rho, centre)
            self._partial_fit_end()
        if centre:  # its weights are q's, made on the host from the step's update
            means, precisions_cholesky = centre
            centre = [means, self._centre_weights(), precisions_cholesky]
        warn_centre_loss(self, X, stacklevel=3, read=centre or None)
        return self

    def _check_parameters(self, X, sample_weight=None):
        """The priors: given values checked, defaults from the (weighted) data."""
        self._priors_from = {name: snapshot(getattr(self, name)) for name in PRIOR_PARAMETERS}
        n_features = X.shape[1]
        self.weight_concentration_prior_ = (
            1.0 / self.n_components if self.weight_concentration_prior is None
            else float(self.weight_concentration_prior))
        self.mean_precision_prior_ = (1.0 if self.mean_precision_prior is None
                                      else float(self.mean_precision_prior))
        if self.degrees_of_freedom_prior is None:
            self.degrees_of_freedom_prior_ = float(n_features)
        elif self.degrees_of_freedom_prior > n_features - 1.0:
            self.degrees_of_freedom_prior_ = float(self.degrees_of_freedom_prior)
        else:
            raise ValueError(
                "The parameter 'degrees_of_freedom_prior' should be greater than %d, but "
                "got %.3f." % (n_features - 1, self.degrees_of_freedom_prior))
        need_data = self.mean_prior is None or self.covariance_prior is None
        if need_data:
            data = X.host if _is_stream(X) else X
            total, mean, scatter = mean_and_scatter(
                data, lambda shape: row_ranges(shape, self.chunk_size), sample_weight)
        if self.mean_prior is None:
            self.mean_prior_ = mean
        else:
            self.mean_prior_ = check_array(off_device(self.mean_prior),
                                           dtype=[np.float64, np.float32], ensure_2d=False,
                                           input_name="mean_prior")
            gp.check_shape(self.mean_prior_, (n_features,), "means")
            self.mean_prior_ = self.mean_prior_.astype(np.float64)
        if self.covariance_prior is None:
            self.covariance_prior_ = _data_covariance_prior(scatter, total,
                                                            self.covariance_type)
        else:
            self.covariance_prior_ = _check_covariance_prior(
                self.covariance_prior, self.covariance_type, n_features)

    def _priors_changed(self):
        """Whether ``set_params`` changed a prior since the priors were set."""
        was = getattr(self, "_priors_from", None)
        return was is not None and not all(same_value(getattr(self, name), value)
                                           for name, value in was.items())

    def _partial_fit_initialize(self, X, sample_weight):
        self._check_parameters(X, sample_weight)
        self._em_initialize(X, sample_weight, check_random_state(self.random_state))

    def _priors(self):
        return {"mean_precision": self.mean_precision_prior_, "mean": self.mean_prior_,
                "degrees_of_freedom": self.degrees_of_freedom_prior_,
                "covariance": self.covariance_prior_}

    # ------------------------------------------------- hooks for fastlvm.em
    def _em_initialize(self, X, sample_weight, random_state):
        place = X
        if _is_stream(X):
            X, place = X.host, X.template
        nk_eps, means, covariances = self._initial_statistics(X, sample_weight, random_state)
        nk_eps = as_f64(nk_eps)
        beta, nu, flags = self._update_gaussian_wishart(
            nk_eps, as_f64(means), as_f64(covariances), place, is_float32(X), self._priors())
        *vectors, flags = to_numpy_together([nk_eps, beta, nu, flags])
        gp.refuse_flagged_covariances(flags, is_float32(X))
        self._set_q_vectors(*vectors)

    def _initialize_parameters(self, X, random_state):
        """sklearn's name for the initialisation (its tests call it)."""
        self._em_initialize(X, None, check_random_state(random_state))

    def _em_iteration(self, X, sample_weight):
        return self._variational_step(X, sample_weight)[0]

    def _variational_step(self, X, sample_weight, rho=None, also=()):
        """One fused pass under q(theta), then q(theta) from its statistics; the bound.

        With ``rho`` (``partial_fit``) the batch's statistics, scaled to
        ``total_samples``, are blended into the running ones with step ``rho``
        first, and the bound is the batch's estimate.

        On a device the update runs queued behind the pass, and the host reads
        what it needs (the pass's log-likelihood and expected log-joint, N_k,
        beta_k, nu_k and the log-determinants of q's precisions) back in one
        copy: one wait an iteration.  What the device needs from the host (the
        log-weights, the priors) goes there before the pass, while nothing is
        queued: torch's copy from pageable host memory to a GPU waits for the
        work queued.

        Parameters
        ----------
        also : sequence of str
            Names of parameters (``means_``...) to read back after the update,
            in the same copy.

        Returns
        -------
        bound : float
            sklearn's lower bound after the update.
        read : list of ndarray
            The ``also`` parameters after the update, as float64 NumPy arrays.
        """
        cov, d = self.covariance_type, self.means_.shape[1]
        kernel_weights, shift = self._host_kernel_weights()
        priors = self._priors()
        kernel_weights, log_w, priors["mean"], covariance = f64_together(
            self.means_, [kernel_weights, self._host_log_weights(), priors["mean"],
                          priors["covariance"]])
        if np.ndim(priors["covariance"]):
            priors["covariance"] = covariance
        ll, total, *stats = self._estep_pass(X, sample_weight, kernel_weights,
                                             keep_on_device=True)
        ll = ll + shift * total
        nk, sum_x, second, center = (f64_like(self.means_, a) for a in stats)
        log_joint = vp.expected_log_joint(nk, sum_x, second, center, log_w, self.means_,
                                          self.precisions_cholesky_, cov)
        scale = 1.0
        if rho is not None:
            scale = self.total_samples / total
            nk, sum_x, second, center = self._running_statistics.update(
                nk, sum_x, second, center, rho, scale)
        _, nk_eps, xk, sk = gp.parameters_from_stats(nk, sum_x, second, center, cov,
                                                     self.reg_covar, eps_of(X.dtype))
        beta, nu, flags = self._update_gaussian_wishart(nk_eps, xk, sk, _place(X),
                                                        is_float32(X), priors)
        log_det = log_det_cholesky(self.precisions_cholesky_, cov, self.n_components, d)
        ll, log_joint, scale, nk_eps, beta, nu, log_det, flags, *read = to_numpy_together(
            [ll, log_joint, scale, nk_eps, beta, nu, log_det, flags,
             *(getattr(self, name) for name in also)])
        gp.refuse_flagged_covariances(flags, is_float32(X))
        self._set_q_vectors(nk_eps, beta, nu)
        entropy = float(scale) * (float(ll) - float(log_joint))
        return vp.lower_bound(entropy, self.weight_concentration_,
                              self.weight_concentration_prior_type, self.degrees_of_freedom_,
                              self.mean_precision_, log_det, d), read

    def _update_gaussian_wishart(self, nk, xk, sk, place, float32_data, priors):
        """q(mu, Lambda) from responsibility-weighted moments (N_k + 10 eps, means,
        covariances with reg_covar), float64, where the moments are: sets
        ``means_``, ``covariances_`` and ``precisions_cholesky_`` on ``place``'s
        device.  Returns beta_k, nu_k and the covariance checks' flags there,
        unread: the caller reads them back with whatever else it needs, refuses
        bad covariances (:func:`._gaussian_params.refuse_flagged_covariances`)
        and passes the rest to :meth:`_set_q_vectors`."""
        mean_precision, means = vp.update_means(nk, xk, self.mean_precision_prior_,
                                                priors["mean"])
        dof, covariances = vp.update_wishart(nk, xk, sk, mean_precision, priors,
                                             self.covariance_type)
        pc, flags = gp.precision_cholesky(covariances, self.covariance_type, float32_data,
                                          deferred=True)
        self.means_ = f64_like(place, means)
        self.covariances_ = f64_like(place, covariances)
        self.precisions_cholesky_ = f64_like(place, pc)
        return mean_precision, dof, flags

    def _set_q_vectors(self, nk, mean_precision, dof):
        """q's K-vectors on the host, from NumPy copies of N_k + 10 eps, beta_k and
        nu_k: the weight concentrations, ``mean_precision_`` and
        ``degrees_of_freedom_`` (a float for 'tied')."""
        self.weight_concentration_ = vp.update_weight_concentration(
            nk, self.weight_concentration_prior_, self.weight_concentration_prior_type)
        self.mean_precision_ = mean_precision
        self.degrees_of_freedom_ = dof[()]

    def _get_parameters(self):
        return (self.weight_concentration_, self.mean_precision_, self.means_,
                self.degrees_of_freedom_, self.covariances_, self.precisions_cholesky_)

    def _set_parameters(self, params):
        (self.weight_concentration_, self.mean_precision_, self.means_,
         self.degrees_of_freedom_, self.covariances_, self.precisions_cholesky_) = params
        self.weights_ = f64_like(self.means_, vp.weights_from_concentration(
            self.weight_concentration_, self.weight_concentration_prior_type))
        self.precisions_ = gp.precisions_from_cholesky(self.precisions_cholesky_,
                                                       self.covariance_type)

    # ------------------------------------------------ variational E-step
    def _host_log_weights(self):
        """E[log pi_k] + the expected-log-determinant constant, NumPy (K,)."""
        log_w = vp.expected_log_weights(self.weight_concentration_,
                                        self.weight_concentration_prior_type)
        return np.asarray(log_w + vp.log_weight_offsets(
            self.degrees_of_freedom_, self.mean_precision_, self.means_.shape[1]),
            dtype=np.float64)

    def _log_weights(self):
        """:meth:`_host_log_weights` where the parameters are."""
        return f64_like(self.means_, self._host_log_weights())

    # ------------------------------------------------------------- scoring
    def elbo(self, X, sample_weight=None):
        """The evidence lower bound of X under q(theta), with q(Z) optimal for it.

        ELBO = sum_n w_n log sum_k exp(E[log pi_k] + E[log N(x_n | mu_k, Lambda_k)])
        - KL(q(pi) || p(pi)) - KL(q(mu, Lambda) || p(mu, Lambda)): one fused pass
        plus closed-form KL terms.  Unlike ``lower_bound_`` (sklearn's bound, with
        constants left out, valid right after an update from the same data) it
        compares any two fits on the same data, e.g. ``partial_fit`` against ``fit``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        sample_weight : array-like of shape (n_samples,), default=None

        Returns
        -------
        float
            The total bound (divide by the number of rows for a per-row figure).

        Raises
        ------
        ValueError
            When ``covariance_prior_`` is singular (sklearn's default, the data
            covariance, is whenever a column is constant): the Wishart prior is
            then improper and the bound -inf for every fit.
        """
        psi0 = np.asarray(self.covariance_prior_, dtype=np.float64)
        if not (np.linalg.eigvalsh(psi0)[0] if psi0.ndim == 2 else np.min(psi0)) > 0:
            raise ValueError(
                "elbo needs a proper prior, but covariance_prior_ is singular (the data "
                "covariance, the default, is singular when a column is constant): the bound "
                "is -inf for every fit. Fit with covariance_prior= a positive definite "
                "value (e.g. the data covariance plus 1e-6 on its diagonal), or drop the "
                "constant columns.")
        X = self._validate_predict(X)
        sw = (f64_like(X, sample_weight) if is_device_array(X) and sample_weight is not None
              else check_sample_weight(sample_weight, X.shape[0]))
        ll = float(self._estep(X, sw)[0])
        kl = vp.kl_weights(self.weight_concentration_, self.weight_concentration_prior_,
                           self.weight_concentration_prior_type)
        kl += vp.kl_normal_wishart(to_numpy(self.means_), self.mean_precision_,
                                   self.degrees_of_freedom_, to_numpy(self.precisions_),
                                   self._priors(), self.covariance_type)
        return ll - kl

    def score_samples(self, X, predictive=False):
        """Log-density of each row: sklearn's plug-in by default, or the posterior
        predictive.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        predictive : bool, default=False
            False: log sum_k exp(E[log pi_k] + E[log N(x | mu_k, Lambda_k)]), as
            sklearn's ``score_samples`` (not a normalised density).  True: the
            posterior predictive log p(x | data) = log sum_k E[pi_k]
            St(x | m_k, L_k, nu_k + 1 - D) with L_k = (nu_k + 1 - D) beta_k /
            (1 + beta_k) W_k (Bishop 2006, eq. 10.81), a normalised density.

        Returns
        -------
        log_prob : ndarray of shape (n_samples,)
        """
        if not predictive:
            return super().score_samples(X)
        X = self._validate_predict(X)
        out = empty_like_rows(X, (X.shape[0],))
        impl = None
        for start, wlp in self._predictive_log_prob_chunks(X):
            if impl is None:
                impl = resolve("log_responsibilities", LOGRESP_IMPLEMENTATIONS, wlp)[1]
            put_rows(out, start, impl(wlp)[1])
        return out

    def _predictive_log_prob_chunks(self, X):
        """(start, log E[pi_k] + log Student-t_k(x)) per chunk, (chunk, K)."""
        d = self.means_.shape[1]
        nu = np.asarray(self.degrees_of_freedom_, dtype=np.float64) + 1.0 - d
        beta = self.mean_precision_
        scale = nu * beta / ((1.0 + beta) * np.asarray(self.degrees_of_freedom_))  # L = scale P
        log_det_u = to_numpy(log_det_cholesky(self.precisions_cholesky_, self.covariance_type,
                                              self.n_components, d))
        gauss_const = log_det_u - 0.5 * d * np.log(2.0 * np.pi)
        t_const = (gammaln(0.5 * (nu + d)) - gammaln(0.5 * nu) + 0.5 * d * np.log(scale)
                   + log_det_u - 0.5 * d * np.log(nu * np.pi))
        t_const = t_const + np.log(to_numpy(self.weights_))
        consts = [f64_like(self.means_, np.broadcast_to(c, (self.n_components,)).copy())
                  for c in (gauss_const, scale / nu, -0.5 * (nu + d), t_const)]
        no_weights = f64_like(self.means_, np.zeros(self.n_components))
        for start, lp in self._weighted_log_prob_chunks(X, no_weights):  # log N(x | m_k, P_k)
            g, r, e, t = (cast_like(c, lp) for c in consts)
            scaled = 2.0 * (g - lp) * r  # (x - m)^T L (x - m) / nu'
            yield start, t + e * (scaled.log1p() if is_torch(scaled) else np.log1p(scaled))

    def _kernel_weights(self):
        weights, shift = self._host_kernel_weights()
        return f64_like(self.means_, weights), shift

    def _host_kernel_weights(self):
        log_w = self._host_log_weights()
        shift = float(log_w.max())
        return np.exp(log_w - shift), shift

    def _centre_weights(self):
        return self._host_kernel_weights()[0]  # made on the host: no copy there and back


def _place(X):
    """Where parameters live for rows X: X itself, or a streamed array's device."""
    return X.template if _is_stream(X) else X


def _data_covariance_prior(scatter, total, covariance_type):
    """sklearn's default covariance prior: the data covariance, scatter / (n - 1);
    with weights, scatter / (W - 1), W their sum (weights count rows, as np.cov's
    fweights: integer weights equal repeated rows)."""
    dof = total - 1.0
    if not dof > 0:
        raise ValueError(
            "covariance_prior=None takes the data covariance, scatter / (sum of "
            f"sample_weight - 1), but the weights sum to {total:g}; pass covariance_prior "
            "explicitly, or weights that count rows.")
    return gp.covariance_of_type(scatter / dof, covariance_type)


def _check_covariance_prior(covariance_prior, covariance_type, n_features):
    """sklearn's checks of a given covariance prior (shape, symmetry, positivity)."""
    if covariance_type == "spherical":
        if not np.ndim(covariance_prior) == 0:
            raise ValueError("The parameter 'spherical covariance_prior' should be a "
                             f"positive float, but got an array of shape "
                             f"{np.shape(covariance_prior)}.")
        return float(covariance_prior)
    prior = check_array(off_device(covariance_prior), dtype=[np.float64, np.float32],
                        ensure_2d=False, input_name="covariance_prior").astype(np.float64)
    shape = (n_features, n_features) if covariance_type in ("full", "tied") else (n_features,)
    gp.check_shape(prior, shape, f"{covariance_type} covariance_prior")
    gp.check_positive_definite(prior, covariance_type)
    return prior
