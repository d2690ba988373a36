"""GaussianMixture: a drop-in for sklearn.mixture.GaussianMixture on fused kernels."""

from numbers import Integral, Real

import numpy as np
from sklearn.base import BaseEstimator, DensityMixin
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted, validate_data

from fastlvm import _config
from fastlvm._arrays import eps_of, f64_like, is_float32, is_torch, log, to_numpy
from fastlvm._dispatch import array_kind, is_device_backend, requested_backend, resolve
from fastlvm.em import fit_em
from fastlvm.kernels._checks import check_device_data, check_device_sample_weight
from fastlvm.kernels.estep_stats import IMPLEMENTATIONS as ESTEP_IMPLEMENTATIONS
from fastlvm.kernels.gaussian_log_prob import IMPLEMENTATIONS as LOGPROB_IMPLEMENTATIONS
from fastlvm.kernels.log_responsibilities import IMPLEMENTATIONS as LOGRESP_IMPLEMENTATIONS

from . import _gaussian_params as gp
from . import _initialization as init


class GaussianMixture(DensityMixin, BaseEstimator):
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
        Rows per kernel call (None: ``fastlvm._config.DEFAULT_CHUNK_ROWS``) for
        host arrays, streamed chunks and predictions; a device E-step on a
        tensor is one launch that splits the rows itself.
    device : str or torch.device or None, default=None
        Fit a host (NumPy) array on this device without moving it there whole:
        each EM pass streams pinned chunks of ``chunk_size`` rows, copies
        overlapped with compute, so data larger than GPU memory fits.  The
        initialisation runs on the host; fitted parameters are float64 tensors
        on ``device``; predictions on host arrays stream the same way and come
        back as NumPy.  Ignored for tensor inputs, which stay where they are.

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
    """

    _parameter_constraints: dict = {
        "n_components": [Interval(Integral, 1, None, closed="left")],
        "tol": [Interval(Real, 0.0, None, closed="left")],
        "reg_covar": [Interval(Real, 0.0, None, closed="left")],
        "max_iter": [Interval(Integral, 0, None, closed="left")],
        "n_init": [Interval(Integral, 1, None, closed="left")],
        "init_params": [StrOptions({"kmeans", "random", "random_from_data", "k-means++"})],
        "random_state": ["random_state"],
        "warm_start": ["boolean"],
        "verbose": ["verbose"],
        "verbose_interval": [Interval(Integral, 1, None, closed="left")],
        "covariance_type": [StrOptions({"full", "tied", "diag", "spherical"})],
        "weights_init": ["array-like", None],
        "means_init": ["array-like", None],
        "precisions_init": ["array-like", None],
        "chunk_size": [Interval(Integral, 1, None, closed="left"), None],
        "device": "no_validation",  # checked by torch.device when used
    }

    def __init__(self, n_components=1, *, covariance_type="full", tol=1e-3, reg_covar=1e-6,
                 max_iter=100, n_init=1, init_params="kmeans", weights_init=None,
                 means_init=None, precisions_init=None, random_state=None, warm_start=False,
                 verbose=0, verbose_interval=10, chunk_size=None, device=None):
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

    # ------------------------------------------------------------------ fit
    def fit(self, X, y=None, sample_weight=None, *, callback=None):
        """Estimate the parameters by EM (best of ``n_init`` restarts).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : ignored
        sample_weight : array-like of shape (n_samples,), default=None
            Non-negative weights; integer weights are equivalent to repeating rows.
        callback : callable, default=None
            ``callback(init, n_iter, lower_bound, change)`` after each iteration.

        Returns
        -------
        self
        """
        self._fit(X, sample_weight, callback)
        return self

    def fit_predict(self, X, y=None, sample_weight=None):
        """Fit, then return ``predict(X)`` under the fitted parameters.

        Returns
        -------
        labels : ndarray of shape (n_samples,)
        """
        X = self._fit(X, sample_weight, None)
        return self._predict_validated(X)

    def _fit(self, X, sample_weight, callback):
        self._validate_params()
        if _on_device(X):
            X, sample_weight = self._validate_device_fit(X, sample_weight)
        else:
            X = validate_data(self, X, dtype=[np.float64, np.float32], ensure_min_samples=2)
            sample_weight = self._check_sample_weight(sample_weight, X.shape[0])
        if X.shape[0] < self.n_components:
            raise ValueError(
                "Expected n_samples >= n_components but got n_components = "
                f"{self.n_components}, n_samples = {X.shape[0]}")
        self._init_checked = self._check_initial_parameters(X.shape[1])
        rows = X
        if self.device is not None and not is_torch(X):
            from ._streaming import HostRowStream

            rows = HostRowStream(X, sample_weight, self.device, self._chunk_rows())
            backend, _ = resolve("estep_stats", ESTEP_IMPLEMENTATIONS, rows.template)
            if not is_device_backend(backend):
                raise ValueError(
                    f"device={self.device!r}: streaming a host array runs the GPU "
                    f"kernels, which have no '{backend}' version; pass a CUDA device "
                    "(device='cuda'), or leave device=None to fit on the host.")
        try:
            fit_em(self, rows, sample_weight, callback)
        finally:
            del self._init_checked
        return X

    def _validate_device_fit(self, X, sample_weight):
        """Checks of ``validate_data`` and the sample weights for a tensor, in place."""
        X = check_device_data(X)
        if X.shape[0] < 2:
            raise ValueError(f"Found array with {X.shape[0]} sample(s) (shape="
                             f"{tuple(X.shape)}) while a minimum of 2 is required.")
        if X.shape[1] < 1:
            raise ValueError(f"Found array with 0 feature(s) (shape={tuple(X.shape)}) while "
                             "a minimum of 1 is required.")
        self.n_features_in_ = X.shape[1]
        if hasattr(self, "feature_names_in_"):
            del self.feature_names_in_
        sw = check_device_sample_weight(sample_weight, X)
        if sw is not None and not float(sw.sum()) > 0:
            raise ValueError("sample_weight must contain at least one positive weight; all "
                             "weights are zero.")
        return X, sw

    @staticmethod
    def _check_sample_weight(sample_weight, n_samples):
        if sample_weight is None:
            return None
        sw = np.asarray(sample_weight, dtype=np.float64)
        if sw.ndim != 1 or sw.shape[0] != n_samples:
            raise ValueError(f"sample_weight.shape == {sw.shape}, expected ({n_samples},)!")
        if not np.isfinite(sw).all() or (sw < 0).any():
            raise ValueError("sample_weight must be finite and non-negative.")
        if not sw.sum() > 0:
            raise ValueError("sample_weight must contain at least one positive weight; all weights are zero.")
        return np.ascontiguousarray(sw)

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
    def _chunk_rows(self):
        return self.chunk_size or _config.DEFAULT_CHUNK_ROWS

    def _em_initialize(self, X, sample_weight, random_state):
        place = X  # parameters are made where the rows are: host, device, or streamed
        if _is_stream(X):
            X, place = X.host, X.template
        given = self._init_checked
        cov = self.covariance_type
        total = X.shape[0] if sample_weight is None else float(sample_weight.sum())
        if given["weights"] is None or given["means"] is None or given["precisions"] is None:
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

    def _initial_statistics(self, X, sample_weight, random_state):
        """(nk + 10 eps, means, covariances) from the ``init_params`` method."""
        k, cov, chunk = self.n_components, self.covariance_type, self._chunk_rows()
        n = X.shape[0]
        device = is_torch(X)
        np_dtype = np.float32 if is_float32(X) else np.float64
        kmeans_plusplus, kmeans = init.kmeans_plusplus, init.kmeans
        if device:
            from . import _device_kmeans

            kmeans_plusplus, kmeans = _device_kmeans.kmeans_plusplus, _device_kmeans.kmeans
        if self.init_params in ("random_from_data", "k-means++"):
            if self.init_params == "random_from_data":
                indices = random_state.choice(n, size=k, replace=False)
                if device:
                    indices = f64_like(X, indices).long()
            else:
                _, indices = kmeans_plusplus(X, k, random_state, sample_weight)
            rows = X[indices]
            sw = None if sample_weight is None else sample_weight[indices]
            make = lambda: [(0, k, np.eye(k, dtype=np_dtype))]  # noqa: E731
            source = rows
        elif self.init_params == "random":
            state = random_state.get_state()
            make_random = lambda: init.random_resp_chunks(random_state, n, k, np_dtype, chunk)  # noqa: E731

            def make():
                random_state.set_state(state)
                return make_random()

            source, sw = X, sample_weight
        else:
            labels, _ = kmeans(X, k, random_state, sample_weight)
            make = lambda: init.label_resp_chunks(labels, k, np_dtype, chunk)  # noqa: E731
            source, sw = X, sample_weight
        nk, sum_x, _ = init.stats_from_resp(source, make(), None, cov, sw)
        eps = eps_of(X.dtype)
        center = sum_x / (nk + 10 * eps)[:, None]
        nk, sum_x, second = init.stats_from_resp(source, make(), center, cov, sw)
        _, nk_eps, means, covariances = gp.parameters_from_stats(
            nk, sum_x, second, center, cov, self.reg_covar, eps)
        if cov == "tied" and source is not X:
            # sklearn's tied formula (X^T X - sum_k N_k m_k m_k^T) / sum_k N_k takes
            # X^T X over *all* rows even when only K rows carry responsibility;
            # reproduce it so the same random_state starts from the same place.
            covariances = init.tied_covariance_over_all_rows(
                X, sample_weight, nk_eps, means, self.reg_covar, chunk)
        return nk_eps, means, covariances

    def _em_iteration(self, X, sample_weight):
        ll, total, nk, sum_x, second, center = self._estep(X, sample_weight)
        weights, _, means, covariances = gp.parameters_from_stats(
            nk, sum_x, second, center, self.covariance_type, self.reg_covar, eps_of(X.dtype))
        self.weights_, self.means_, self.covariances_ = weights, means, covariances
        self.precisions_cholesky_ = gp.precision_cholesky(covariances, self.covariance_type,
                                                          is_float32(X))
        return ll / total

    def _estep(self, X, sample_weight):
        """Summed E-step statistics over chunks of rows (one fused pass)."""
        ll = 0.0
        nk = sum_x = second = center = None
        chunk = self._chunk_rows()
        total = X.shape[0] if sample_weight is None else float(sample_weight.sum())
        if _is_stream(X):  # chunk by chunk from the host; one wait at the end
            params = (self.weights_, self.means_, self.precisions_cholesky_,
                      self.covariance_type)
            impl = resolve("estep_stats", ESTEP_IMPLEMENTATIONS, X.template)[1]
            for _, rows, sw in X.chunks():
                part = impl(rows, *params, sw, keep_on_device=True)
                if nk is None:
                    ll, nk, sum_x, second, center = part
                else:
                    ll, nk, sum_x, second = (ll + part[0], nk + part[1], sum_x + part[2],
                                             second + part[3])
            return float(ll), total, nk, sum_x, second, center
        impl = resolve("estep_stats", ESTEP_IMPLEMENTATIONS, X)[1]
        if is_torch(X):  # one launch: the kernel splits the rows itself, N x K-free
            part = impl(X, self.weights_, self.means_, self.precisions_cholesky_,
                        self.covariance_type, sample_weight)
            return (part[0], total, *part[1:])
        for start in range(0, X.shape[0], chunk):
            sw = None if sample_weight is None else sample_weight[start:start + chunk]
            part = impl(X[start:start + chunk], self.weights_, self.means_,
                                    self.precisions_cholesky_, self.covariance_type, sw)
            ll += part[0]
            if nk is None:
                nk, sum_x, second, center = (np.array(a, dtype=np.float64) for a in part[1:])
            else:
                nk += part[1]
                sum_x += part[2]
                second += part[3]
        return ll, total, nk, sum_x, second, center

    def _get_parameters(self):
        return (self.weights_, self.means_, self.covariances_, self.precisions_cholesky_)

    def _set_parameters(self, params):
        self.weights_, self.means_, self.covariances_, self.precisions_cholesky_ = params
        self.precisions_ = gp.precisions_from_cholesky(self.precisions_cholesky_,
                                                       self.covariance_type)

    # ------------------------------------------------------------- predict
    def _validate_predict(self, X):
        check_is_fitted(self)
        if _on_device(X):
            X = check_device_data(X)
            if X.shape[1] != self.n_features_in_:
                raise ValueError(
                    f"X has {X.shape[1]} features, but {type(self).__name__} is expecting "
                    f"{self.n_features_in_} features as input.")
            if is_torch(self.means_) != is_torch(X) or (
                    is_torch(X) and X.device != self.means_.device):
                raise ValueError("X is on another device than the fitted parameters; move "
                                 "it to " + str(getattr(self.means_, "device", "the host")))
            return X
        if is_torch(self.means_) and self.device is None:
            raise ValueError(f"This model was fitted on {self.means_.device}; pass X as a "
                             "torch tensor on that device (or set device= to stream host "
                             "arrays there).")
        return validate_data(self, X, reset=False, dtype=[np.float64, np.float32])

    def _weighted_log_prob_chunks(self, X):
        """(start, weighted log-densities of a chunk), on the model's device."""
        streamed = is_torch(self.means_) and not is_torch(X)  # host rows, device model
        if streamed:
            import torch

            place = self.means_.device
            impl = resolve("gaussian_log_prob", LOGPROB_IMPLEMENTATIONS,
                           torch.empty(0, device=place))[1]
        else:
            impl = resolve("gaussian_log_prob", LOGPROB_IMPLEMENTATIONS, X)[1]
        log_w = log(self.weights_)
        chunk = self._chunk_rows()
        for start in range(0, X.shape[0], chunk):
            rows = X[start:start + chunk]
            if streamed:
                rows = torch.as_tensor(np.ascontiguousarray(rows), device=place)
            lp = impl(rows, self.means_, self.precisions_cholesky_, self.covariance_type)
            lp = lp + (log_w.to(lp.dtype) if is_torch(lp) else log_w.astype(lp.dtype))
            yield start, lp

    def _log_resp_chunks(self, X):
        impl = None
        for start, wlp in self._weighted_log_prob_chunks(X):
            if impl is None:  # where the log-densities are: X's device, or the model's
                impl = resolve("log_responsibilities", LOGRESP_IMPLEMENTATIONS, wlp)[1]
            log_resp, log_norm = impl(wlp)
            yield start, log_resp, log_norm

    def _predict_validated(self, X):
        labels = _empty(X, (X.shape[0],), labels=True)
        for start, wlp in self._weighted_log_prob_chunks(X):
            _put(labels, start, wlp.argmax(1))
        return labels

    def predict(self, X):
        """Label of the most probable component for each row.

        Returns
        -------
        labels : ndarray of shape (n_samples,)
        """
        return self._predict_validated(self._validate_predict(X))

    def predict_proba(self, X):
        """Posterior probability of each component for each row.

        Returns
        -------
        resp : ndarray of shape (n_samples, n_components)
        """
        X = self._validate_predict(X)
        out = _empty(X, (X.shape[0], self.n_components))
        for start, log_resp, _ in self._log_resp_chunks(X):
            _put(out, start, log_resp.exp() if is_torch(log_resp) else np.exp(log_resp))
        return out

    def score_samples(self, X):
        """Log-likelihood log p(x) of each row under the model.

        Returns
        -------
        log_prob : ndarray of shape (n_samples,)
        """
        X = self._validate_predict(X)
        if is_torch(X):  # straight from the fused log-normaliser kernel: no n x K array
            from fastlvm.kernels._triton_gaussian import GaussianTileParams, log_norm

            params = GaussianTileParams(X, self.means_, self.precisions_cholesky_,
                                        self.covariance_type, log(self.weights_))
            return log_norm(X, params)[0]
        out = np.empty(X.shape[0], dtype=X.dtype)
        for start, _, log_norm in self._log_resp_chunks(X):
            _put(out, start, log_norm)
        return out

    def score(self, X, y=None, sample_weight=None):
        """Mean (weighted) log-likelihood of the rows of X.

        Returns
        -------
        float
        """
        log_prob = self.score_samples(X)
        if is_torch(log_prob):
            log_prob = log_prob.to(dtype=self.means_.dtype)
            if sample_weight is None:
                return float(log_prob.mean())
            w = f64_like(log_prob, sample_weight)
            return float((w * log_prob).sum() / w.sum())
        return float(np.average(log_prob, weights=sample_weight))

    def sample(self, n_samples=1):
        """Draw samples from the fitted mixture (sklearn's procedure).

        Returns
        -------
        X : ndarray of shape (n_samples, n_features)
        y : ndarray of shape (n_samples,), component labels
        """
        check_is_fitted(self)
        if n_samples < 1:
            raise ValueError(
                "Invalid value for 'n_samples': %d . The sampling requires at least one "
                "sample." % (self.n_components))
        _, n_features = self.means_.shape
        rng = check_random_state(self.random_state)
        # sklearn's draws, from the parameters (K x D x D numbers, copied to the host for
        # a fit on a device; the samples then go to that device)
        weights, means, covs = map(to_numpy, (self.weights_, self.means_, self.covariances_))
        counts = rng.multinomial(n_samples, weights)
        if self.covariance_type == "full":
            X = np.vstack([rng.multivariate_normal(m, c, int(s))
                           for m, c, s in zip(means, covs, counts)])
        elif self.covariance_type == "tied":
            X = np.vstack([rng.multivariate_normal(m, covs, int(s))
                           for m, s in zip(means, counts)])
        else:
            X = np.vstack([m + rng.standard_normal(size=(s, n_features)) * np.sqrt(c)
                           for m, c, s in zip(means, covs, counts)])
        y = np.concatenate([np.full(s, j, dtype=int) for j, s in enumerate(counts)])
        if is_torch(self.means_):
            import torch

            return (torch.as_tensor(X, device=self.means_.device),
                    torch.as_tensor(y, device=self.means_.device))
        return X, y

    def _n_parameters(self):
        return gp.n_parameters(self.covariance_type, self.n_components, self.means_.shape[1])

    def bic(self, X):
        """Bayesian information criterion on X (lower is better)."""
        return (-2 * self.score(X) * X.shape[0]
                + self._n_parameters() * np.log(X.shape[0]))

    def aic(self, X):
        """Akaike information criterion on X (lower is better)."""
        return -2 * self.score(X) * X.shape[0] + 2 * self._n_parameters()


def _on_device(X):
    """True when X is fitted on the device backends: a CUDA tensor, or a CPU
    tensor with ``FASTLVM_BACKEND=triton`` (Triton's interpreter)."""
    kind = array_kind(X)
    return kind == "torch-cuda" or (kind == "torch-cpu" and requested_backend() == "triton")


def _put(out, start, value):
    """out[start:start + len(value)] = value, bringing a device chunk to a host ``out``."""
    if isinstance(out, np.ndarray) and is_torch(value):
        value = to_numpy(value)
    out[start:start + value.shape[0]] = value


def _is_stream(X):
    """True for rows streamed from the host (``device=`` with a host array)."""
    return type(X).__name__ == "HostRowStream"


def _empty(template, shape, labels=False):
    """An uninitialised array on ``template``'s device: int64 labels, or its dtype."""
    if is_torch(template):
        import torch

        dtype = torch.int64 if labels else template.dtype
        return torch.empty(shape, dtype=dtype, device=template.device)
    return np.empty(shape, dtype=np.int64 if labels else template.dtype)
