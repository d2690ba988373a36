"""The Gaussian half shared by GaussianMixture and BayesianGaussianMixture.

Both weigh rows with Gaussian log-densities (means, precision Cholesky
factors, a covariance type) plus one log-weight per component, so both run
every pass on the same fused kernels: the E-step pass of
:func:`fastlvm.kernels.estep_stats` and the chunked log-densities of
:func:`fastlvm.kernels.gaussian_log_prob`.  A subclass says what its
per-component log-weights are (``_log_weights``: log pi_k for EM; for
variational Bayes, E[log pi_k] plus the expected-log-determinant terms),
which is all that differs in the E-step.  This base also owns the checks of
the data for fit (host arrays, device tensors, rows streamed to a device),
the initial responsibilities of the four ``init_params`` and ``sample``.
"""

from numbers import Real

import numpy as np
from sklearn.utils._param_validation import Interval, StrOptions

from fastlvm._arrays import (cast_like, eps_of, f64_like, index_like, is_cupy, is_device_array,
                             is_float32, is_torch, log, to_numpy)
from fastlvm._dispatch import is_device_backend, on_device, resolve
from fastlvm._sample_weight import check_sample_weight, in_row_units, scaled_to_row_units
from fastlvm.kernels.estep_stats import IMPLEMENTATIONS as ESTEP_IMPLEMENTATIONS
from fastlvm.kernels._expanded_gaussian import computes_in_float64
from fastlvm.kernels.gaussian_log_prob import IMPLEMENTATIONS as LOGPROB_IMPLEMENTATIONS

from . import _gaussian_params as gp
from . import _initialization as init
from ._base import EM_PARAMETER_CONSTRAINTS, MixtureBase, check_n_samples
from ._online import OnlineStatistics, check_partial_fit_batch, step_size


# GaussianMixture's and BayesianGaussianMixture's shared parameters: the EM
# driver's, the covariance type, the device and the online step sizes.
GAUSSIAN_PARAMETER_CONSTRAINTS = {
    **EM_PARAMETER_CONSTRAINTS,
    "covariance_type": [StrOptions({"full", "tied", "diag", "spherical"})],
    "device": "no_validation",  # checked by torch.device when used
    "learning_offset": [Interval(Real, 0.0, None, closed="left")],
    "learning_decay": [Interval(Real, 0.5, 1.0, closed="right")],
}


class GaussianMixtureBase(MixtureBase):
    """Data checks, E-step pass, initialisation, prediction and sampling of a
    mixture of Gaussians; see the module docstring."""

    _STRUCTURE = ("n_components", "covariance_type")

    def _log_weights(self):
        """log-weight of each component added to its log-density, shape (K,)."""
        return log(self.weights_)

    def _kernel_weights(self):
        """(weights, log_shift) for the E-step kernel: log(weights) + log_shift
        equals :meth:`_log_weights` (the kernels take weights, not logs)."""
        return self.weights_, 0.0

    def _centre_weights(self):
        """The weights of the GPU kernels' common centre (the E-step kernel's,
        :meth:`_kernel_weights`), of whichever kind they are kept in, for the
        centre-loss check on the host."""
        return self._kernel_weights()[0]

    def _validate_fit(self, X, sample_weight, row_units=False):
        """Checked rows and weights for fit: a host array, a device tensor, or a
        :class:`HostRowStream` when ``device`` is set for a host array.  With
        ``row_units`` (a fit whose optimum does not depend on the weights'
        scale) the weights come back in units of a row (:func:`in_row_units`).

        Returns
        -------
        X : the checked array (what ``fit_predict`` predicts on)
        sample_weight : ndarray (n_samples,) or tensor or None
        rows : X itself or its stream to the device
        """
        X, sample_weight = self._validate_fit_rows(X, sample_weight)
        check_n_samples(X.shape[0], self.n_components, sample_weight)
        if row_units:
            sample_weight = in_row_units(sample_weight)
        rows = X
        if getattr(self, "device", None) is not None and not is_device_array(X):
            try:
                from ._streaming import HostRowStream
            except ImportError as error:
                raise ImportError(f"device={self.device!r} streams a host array to a GPU "
                                  "through torch: install a CUDA build of torch, or leave "
                                  "device=None to fit on the host.") from error

            rows = HostRowStream(X, sample_weight, self.device, self.chunk_size)
            backend, _ = resolve("estep_stats", ESTEP_IMPLEMENTATIONS, rows.template)
            if not is_device_backend(backend):
                raise ValueError(
                    f"device={self.device!r}: streaming a host array runs the GPU "
                    f"kernels, which have no '{backend}' version; pass a CUDA device "
                    "(device='cuda'), or leave device=None to fit on the host.")
        return X, sample_weight, rows

    # ------------------------------------------------------- partial_fit
    def _partial_fit_begin(self, X, sample_weight, row_units=False):
        """Check a partial_fit batch; a fresh model is initialised on it.

        A device array (see :func:`on_device`) is stepped on where it is: a
        fresh model's parameters are made there, a fitted model's must already
        be there.  Host batches need host parameters.  With ``row_units`` (a
        step whose result does not depend on the batch weights' scale) the
        weights come back in units of a row, the initialisation's included.

        Returns
        -------
        X, sample_weight : checked
        rho : float
            This step's size, :func:`._online.step_size`.
        unit : float
            What the weights were divided by (:func:`scaled_to_row_units`; 1.0
            without ``row_units``).
        """
        first = not hasattr(self, "means_")
        if not first:
            self._check_structure()
        if on_device(X):  # the step runs where the batch is, as fit does
            X, sample_weight = self._validate_device_rows(X, sample_weight, reset=first,
                                                          min_samples=1)
        else:
            if not first:
                self._refuse_host_rows(streams_ok=False)
            X = check_partial_fit_batch(self, X, first)
            sample_weight = check_sample_weight(sample_weight, X.shape[0])
        if first:  # on the caller's weights, as fit counts them (the division can flush some)
            check_n_samples(X.shape[0], self.n_components, sample_weight)
        unit = 1.0
        if row_units:
            sample_weight, unit = scaled_to_row_units(sample_weight)
        if first:
            self._partial_fit_initialize(X, sample_weight)
            self._set_parameters(self._get_parameters())
            self.n_steps_, self._running_statistics = 0, None
            self.converged_, self.n_iter_, self.lower_bounds_ = False, 0, []
        if self._running_statistics is None:
            self._running_statistics = OnlineStatistics(self.covariance_type)
        return X, sample_weight, step_size(self.n_steps_, self.learning_offset,
                                           self.learning_decay), unit

    def _partial_fit_end(self):
        """After the update: fitted attributes, running moments at the new means."""
        self._set_parameters(self._get_parameters())
        running = self._running_statistics  # on the device (GMM) or host (BGM's q update)
        running.recenter(f64_like(running.nk, self.means_))
        self.n_steps_ += 1
        self._record_structure()

    # ------------------------------------------------------ E-step pass
    def _estep(self, X, sample_weight, keep_on_device=False):
        """Summed E-step statistics over chunks of rows (one fused pass).

        With ``keep_on_device``, rows on a device give the log-likelihood (and,
        with sample weights, the total weight) as 0-d device arrays: the call
        returns without waiting for the device, so the caller can queue the
        M-step behind the E-step before its first wait.

        Returns
        -------
        (log_likelihood, total_weight, nk, sum_x, second_moment, center)
            ``log_likelihood`` is sum_n w_n log sum_k exp(log-weight_k +
            log N(x_n | k)) with :meth:`_log_weights`; the rest as in
            :class:`fastlvm.kernels.EStepStats`.
        """
        weights, log_shift = self._kernel_weights()
        ll, total, *stats = self._estep_pass(X, sample_weight, weights, keep_on_device)
        return (ll + log_shift * total, total, *stats)

    def _estep_pass(self, X, sample_weight, weights, keep_on_device=False):
        ll = 0.0
        nk = sum_x = second = center = None
        total = X.shape[0] if sample_weight is None else sample_weight.sum()
        if not keep_on_device:
            total = float(total)
        if _is_stream(X):  # chunk by chunk from the host; one wait at the end
            params = (weights, self.means_, self.precisions_cholesky_, self.covariance_type)
            impl = resolve("estep_stats", ESTEP_IMPLEMENTATIONS, X.template)[1]
            # the kernels' compute dtype, decided once for every chunk (a read of the
            # parameters, not one per chunk)
            in_float64 = computes_in_float64(is_float32(X.template), log(weights), *params[1:])
            for _, rows, sw in X.chunks():
                part = impl(rows, *params, sw, keep_on_device=True,
                            compute_in_float64=in_float64)
                if nk is None:
                    ll, nk, sum_x, second, center = part
                else:
                    ll, nk, sum_x, second = (ll + part[0], nk + part[1], sum_x + part[2],
                                             second + part[3])
            return float(ll), total, nk, sum_x, second, center
        impl = resolve("estep_stats", ESTEP_IMPLEMENTATIONS, X)[1]
        if is_device_array(X):  # one call: the kernel splits the rows itself, N x K-free
            part = impl(X, weights, self.means_, self.precisions_cholesky_,
                        self.covariance_type, sample_weight, keep_on_device=keep_on_device)
            return (part[0], total, *part[1:])
        # a host array likewise takes one call unless chunk_size asks for more: the
        # kernel holds a tile per thread, never n x K, and each call's set-up and
        # last, part-idle group of tiles cost 2-8% of a 1M-row pass in 262,144-row calls
        chunk = self.chunk_size or max(1, X.shape[0])
        for start in range(0, X.shape[0], chunk):
            sw = None if sample_weight is None else sample_weight[start:start + chunk]
            part = impl(X[start:start + chunk], weights, self.means_,
                        self.precisions_cholesky_, self.covariance_type, sw)
            ll += part[0]
            if nk is None:
                nk, sum_x, second, center = (np.array(a, dtype=np.float64) for a in part[1:])
            else:
                nk += part[1]
                sum_x += part[2]
                second += part[3]
        return ll, total, nk, sum_x, second, center

    def _initial_statistics(self, X, sample_weight, random_state, statistics=False):
        """(nk + 10 eps, means, covariances) from the ``init_params`` method.

        With ``statistics=True``, the initial responsibilities' statistics
        (nk, sum_x, second moment, center) instead, for an M-step of one's own.
        """
        # the starts' passes hold (rows, K) responsibilities and (rows, D) float64 rows
        k, cov, chunk = self.n_components, self.covariance_type, self._block_rows(X.shape[1])
        n = X.shape[0]
        device = is_device_array(X)
        np_dtype = np.float32 if is_float32(X) else np.float64
        kmeans_plusplus, kmeans = init.kmeans_plusplus, init.kmeans
        if device:
            from . import _device_kmeans

            kmeans_plusplus, kmeans = _device_kmeans.kmeans_plusplus, _device_kmeans.kmeans
        if self.init_params in ("random_from_data", "k-means++"):
            if self.init_params == "random_from_data":
                indices = random_state.choice(n, size=k, replace=False)
                if device:
                    indices = index_like(X, indices)
            else:
                _, indices = kmeans_plusplus(X, k, random_state, sample_weight)
            rows = X[indices]
            sw = None if sample_weight is None else sample_weight[indices]

            def stats(center):
                return init.stats_from_resp(rows, [(0, k, np.eye(k, dtype=np_dtype))], center,
                                            cov, sw)
        elif self.init_params == "random":
            state = random_state.get_state()

            def stats(center):  # the same draws on both passes
                random_state.set_state(state)
                resp = init.random_resp_chunks(random_state, n, k, np_dtype, chunk)
                return init.stats_from_resp(X, resp, center, cov, sample_weight)
        else:
            labels, _ = kmeans(X, k, random_state, sample_weight)

            def stats(center):
                return init.stats_from_labels(X, labels, k, center, cov, sample_weight, chunk)
        nk, sum_x, _ = stats(None)
        eps = eps_of(X.dtype)
        center = sum_x / (nk + 10 * eps)[:, None]
        nk, sum_x, second = stats(center)
        if statistics:
            return nk, sum_x, second, center
        _, nk_eps, means, covariances = gp.parameters_from_stats(
            nk, sum_x, second, center, cov, self.reg_covar, eps)
        if cov == "tied" and self.init_params in ("random_from_data", "k-means++"):
            # sklearn's tied formula (X^T X - sum_k N_k m_k m_k^T) / sum_k N_k takes
            # X^T X over *all* rows even when only K rows carry responsibility;
            # reproduce it so the same random_state starts from the same place.
            covariances = init.tied_covariance_over_all_rows(
                X, sample_weight, nk_eps, means, self.reg_covar, chunk)
        return nk_eps, means, covariances

    # ------------------------------------------------------------- predict
    def _weighted_log_prob_chunks(self, X, log_weights=None):
        """(start, weighted log-densities of a chunk), on the model's device.

        ``log_weights`` (K,), where the parameters are, is added to each row's
        log-densities; None: :meth:`_log_weights`.
        """
        streamed = is_torch(self.means_) and not is_torch(X)  # host rows, device model
        if streamed:
            import torch

            place = self.means_.device
            impl = resolve("gaussian_log_prob", LOGPROB_IMPLEMENTATIONS,
                           torch.empty(0, device=place))[1]
        else:
            impl = resolve("gaussian_log_prob", LOGPROB_IMPLEMENTATIONS, X)[1]
        log_w = self._log_weights() if log_weights is None else log_weights
        chunk = self._block_rows()
        # host rows go in the caller's layout: the kernels read a tile at a time, so
        # Fortran-ordered rows ran at C speed (200k x 32, K = 8) once their build was
        # compiled, and Numba caches that on disk; a C copy of each chunk made every
        # prediction 1.2x-1.5x slower (session 60)
        for start in range(0, X.shape[0], chunk):
            rows = X[start:start + chunk]
            if streamed:
                rows = torch.as_tensor(np.ascontiguousarray(rows), device=place)
            lp = impl(rows, self.means_, self.precisions_cholesky_, self.covariance_type)
            lp += cast_like(log_w, lp)  # in place: lp is the kernel's fresh output
            yield start, lp

    def _score_samples_validated(self, X):
        if is_torch(X):  # straight from the fused log-normaliser kernel: no n x K array
            from fastlvm.kernels._triton_gaussian import GaussianTileParams, log_norm

            params = GaussianTileParams(X, self.means_, self.precisions_cholesky_,
                                        self.covariance_type, self._log_weights())
            return log_norm(X, params)[0]
        if is_cupy(X):  # the same, from the CuPy kernels, chunk by chunk
            from fastlvm.kernels._cupy_gaussian import ExpandedParams, log_norm

            params = ExpandedParams(X.dtype, self.means_, self.precisions_cholesky_,
                                    self.covariance_type, self._log_weights())
            return log_norm(X, params)[0]
        return super()._score_samples_validated(X)

    def _sample_components(self, rng, counts):
        """sklearn's draws per component (see :meth:`MixtureBase.sample`)."""
        means, covs = map(to_numpy, (self.means_, self.covariances_))
        if self.covariance_type == "full":
            return [rng.multivariate_normal(m, c, int(s)) for m, c, s in zip(means, covs, counts)]
        if self.covariance_type == "tied":
            return [rng.multivariate_normal(m, covs, int(s)) for m, s in zip(means, counts)]
        return [m + rng.standard_normal(size=(s, means.shape[1])) * np.sqrt(c)
                for m, c, s in zip(means, covs, counts)]


def _is_stream(X):
    """True for rows streamed from the host (``device=`` with a host array)."""
    return type(X).__name__ == "HostRowStream"
