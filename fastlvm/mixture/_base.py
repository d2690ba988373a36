"""What every fastlvm mixture shares once it can weigh a chunk of rows.

A mixture supplies ``_weighted_log_prob_chunks(X)``: for each chunk of rows,
log pi_k + log p(x | component k), shape (chunk, K), on X's device.  From that
alone this base gives ``predict``, ``predict_proba``, ``score_samples``,
``score`` and ``fit_predict``, chunk by chunk, never an (n, K) array beyond
the one ``predict_proba`` returns.  It also holds the input checks the
mixtures share (n_samples >= n_components; sample weights come from
:mod:`fastlvm._sample_weight`).
"""

import warnings
from numbers import Integral, Real

import numpy as np
from sklearn.base import BaseEstimator, DensityMixin
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted, validate_data

from fastlvm import _config
from fastlvm._arrays import (as_f64, empty_like_rows, f64_like, index_like, is_cupy,
                             is_device_array, is_float32, is_torch, numpy_readable, to_numpy,
                             to_numpy_together)
from fastlvm._continuation import ContinuationMixin
from fastlvm._dispatch import array_kind, on_device, resolve
from fastlvm._restore import restored_on_error
from fastlvm._sample_weight import check_sample_weight
from fastlvm.kernels._checks import DeviceChecks, check_device_data, check_device_sample_weight
from fastlvm.kernels.log_responsibilities import IMPLEMENTATIONS as LOGRESP_IMPLEMENTATIONS


# a device fit warns when its last statistics may have lost more than this
# (relative) of the second moments (see :func:`warn_centre_loss`)
DEVICE_CENTRE_LOSS = 1e-3


def checks_centre_loss(model, X):
    """Whether :func:`warn_centre_loss` checks ``model`` after a pass over X: a
    'tied', 'diag' or 'spherical' model on the GPU kernels (device rows, or host
    rows streamed to a device)."""
    streamed = getattr(model, "device", None) is not None  # a host array to a device
    return (on_device(X) or streamed) and getattr(model, "covariance_type", None) in (
        "tied", "diag", "spherical")


def centre_loss_arrays(model, X):
    """What :func:`warn_centre_loss` reads (the means, the centre's weights, the
    precisions' Cholesky factors, where they are), or [] where it checks nothing:
    for a caller that reads them back with its own values, in one copy."""
    if not checks_centre_loss(model, X):
        return []
    return [model.means_, model._centre_weights(), model.precisions_cholesky_]


def warn_centre_loss(model, X, stacklevel=4, read=None):
    """Warn when a device fit's 'tied', 'diag' or 'spherical' second moments,
    which the GPU kernels sum around one common centre (the weighted mean of the
    means; their log-densities are expanded around it too, GEMM-shaped), may
    have lost more than DEVICE_CENTRE_LOSS of their value to rounding:
    CENTRE_LOSS_PER_EPS * eps * kappa, kappa the squared distance of the
    farthest mean from that centre in its own standard deviations
    (:mod:`fastlvm.kernels._expanded_gaussian`).  float32 data is computed in
    float64 long before (``computes_in_float64``), so only float64 beyond about
    4 million standard deviations warns.  The host kernels sum around each
    component's own mean ('tied' around each row's most responsible one) and
    need no warning.  Host arrays streamed to a device (``device=``) run on the
    GPU kernels too.  ``stacklevel`` points the warning at the caller of
    ``fit`` (4, through ``_fit_checked``) or of ``partial_fit`` (3).  ``read``:
    :func:`centre_loss_arrays` of the fitted model as NumPy arrays, read back by
    the caller with its own values (None: read here)."""
    if not checks_centre_loss(model, X):
        return
    from fastlvm.kernels._expanded_gaussian import (CENTRE_LOSS_PER_EPS, centre_spread,
                                                    kappa_needs_float64)

    # in one copy (a partial_fit on a GPU checks every step), or in the caller's
    # (``read``); the weights are those the kernels shift by (BayesianGaussianMixture's:
    # its variational ones)
    means, weights, precisions_cholesky = (
        to_numpy_together(centre_loss_arrays(model, X)) if read is None else read)
    kappa = centre_spread(means, weights @ means / weights.sum(), precisions_cholesky,
                          model.covariance_type)
    float32 = is_float32(X) and not kappa_needs_float64(kappa)  # the kernels' dtype
    dtype = np.dtype(np.float32 if float32 else np.float64)
    loss = CENTRE_LOSS_PER_EPS * np.finfo(dtype).eps * kappa
    if loss > DEVICE_CENTRE_LOSS:
        warnings.warn(
            f"{type(model).__name__}(covariance_type={model.covariance_type!r}) on the GPU "
            f"kernels: the means lie up to {np.sqrt(kappa):.3g} standard deviations from "
            f"their common centre, and the {dtype.name} log-densities and second moments "
            f"expanded around it may have lost up to {loss:.2g} of the covariances (and "
            f"about {loss / CENTRE_LOSS_PER_EPS:.2g} nats of each log-density) to rounding. "
            "Fit covariance_type='full' (taken around each component's mean), or the same "
            "data on the host (NumPy arrays), or centre and scale the data.", UserWarning,
            stacklevel=stacklevel)


def check_n_samples(n_samples, n_components, sample_weight=None):
    """sklearn's error when there are fewer rows than components; with
    ``sample_weight`` (checked, any array kind), also when fewer rows than
    components have a positive weight (rows of weight zero are not data)."""
    if n_samples < n_components:
        raise ValueError(
            "Expected n_samples >= n_components but got n_components = "
            f"{n_components}, n_samples = {n_samples}")
    if sample_weight is not None:
        weighted = int((sample_weight > 0).sum())
        if weighted < n_components:
            raise ValueError(
                f"Expected at least n_components = {n_components} samples with a positive "
                f"sample_weight, got {weighted}: rows of weight zero are not data. Use "
                "fewer components, or give more rows a positive weight.")


# The EM-driver parameters every mixture shares (sklearn's names and ranges);
# each estimator adds its own entries to these.
EM_PARAMETER_CONSTRAINTS = {
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
    "chunk_size": [Interval(Integral, 1, None, closed="left"), None],
}


class MixtureBase(ContinuationMixin, DensityMixin, BaseEstimator):
    """Prediction and scoring from a mixture's weighted log-densities, by chunks."""

    # the parameters that fix the fitted arrays' shapes and meaning
    _STRUCTURE = ("n_components",)

    def _block_rows(self, n_features=0):
        """Rows per call in the passes that hold (rows, K) arrays, and (rows, D)
        float64 copies of X where ``n_features`` is given: ``chunk_size``, or by
        default as many as keep each such array within ``_config.BLOCK_BYTES``."""
        return _config.chunk_rows(max(self.n_components, n_features), self.chunk_size,
                                  _config.BLOCK_BYTES)

    def fit(self, X, y=None, sample_weight=None, *, callback=None):
        """Estimate the parameters, keeping the best of ``n_init`` restarts.

        EM (variational Bayes for :class:`BayesianGaussianMixture`), one fused
        kernel pass over the rows per iteration, until the bound changes by less
        than ``tol`` or ``max_iter`` iterations.  A fit that raises (bad input,
        statistics that overflow, an exception from ``callback``) leaves the model
        as it was before the call: a warm start's parameters are not lost to half
        an iteration.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : ignored
        sample_weight : array-like of shape (n_samples,), default=None
            Non-negative weights; integer weights are equivalent to repeating rows.
            Maximum-likelihood fits (GaussianMixture without ``prior``,
            MixtureOfPPCA) do not depend on their scale: weights summing to 1
            fit as unit weights do.  Against a prior (``prior``,
            BayesianGaussianMixture) they count rows.
        callback : callable, default=None
            ``callback(init, n_iter, lower_bound, change)`` after each iteration.

        Returns
        -------
        self
        """
        with restored_on_error(self):
            self._fit_checked(X, sample_weight, callback)
        return self

    def fit_predict(self, X, y=None, sample_weight=None):
        """Fit, then return ``predict(X)`` under the fitted parameters.

        Returns
        -------
        labels : ndarray of shape (n_samples,)
        """
        with restored_on_error(self):
            X = self._fit_checked(X, sample_weight, None)
        return self._predict_validated(X)

    def _fit_checked(self, X, sample_weight, callback):
        """``_fit``, refusing a warm start whose structure changed; returns the
        checked X."""
        if self.warm_start and hasattr(self, "converged_"):  # fit_em's warm start
            self._check_structure()
        X = self._fit(X, sample_weight, callback)
        self._record_structure()
        warn_centre_loss(self, X)
        return X

    def _validate_fit_rows(self, X, sample_weight):
        """(X, sample_weight) checked for a fit: a device array in place (see
        :func:`on_device`), a host array as ``validate_data`` and
        :func:`check_sample_weight` return it, in C order.

        EM reads the rows once an iteration, and the host kernels read them a
        row at a time: in another layout (a pandas DataFrame's values are
        Fortran-ordered, a selection of columns is strided) a whole
        GaussianMixture fit took 1.5x-3.1x as long, where one copy in C order
        costs about one iteration (sklearn's KMeans copies so too).  Such an
        array's copy is held for the fit's length.  ``fit_em`` copies host arrays
        so as well; this copy is for the rows that reach it as a stream to the
        device (``device="cuda"``), read chunk by chunk each iteration.
        """
        if on_device(X):
            return self._validate_device_rows(X, sample_weight, reset=True, min_samples=2)
        X = validate_data(self, numpy_readable(X), dtype=[np.float64, np.float32],
                          ensure_min_samples=2, order="C")
        return X, check_sample_weight(sample_weight, X.shape[0])

    def _validate_device_rows(self, X, sample_weight, reset, min_samples):
        """A device array (and its sample weights) checked in place.

        Parameters
        ----------
        X : torch tensor or cupy array of shape (n_samples, n_features)
        sample_weight : same library, shape (n_samples,), or None
        reset : bool
            True to set ``n_features_in_`` from X (a fit); False to check X
            against the fitted model: its feature count and the parameters'
            device and array library.
        min_samples : int

        Returns
        -------
        X, sample_weight
        """
        checks = DeviceChecks()  # the values' checks, read back in one copy at the end
        X = check_device_data(X, checks=checks)
        if X.shape[0] < min_samples:
            raise ValueError(f"Found array with {X.shape[0]} sample(s) (shape="
                             f"{tuple(X.shape)}) while a minimum of {min_samples} is "
                             "required.")
        if X.shape[1] < 1:
            raise ValueError(f"Found array with 0 feature(s) (shape={tuple(X.shape)}) while "
                             "a minimum of 1 is required.")
        if reset:
            self.n_features_in_ = X.shape[1]
            if hasattr(self, "feature_names_in_"):
                del self.feature_names_in_
        else:
            if X.shape[1] != self.n_features_in_:
                raise ValueError(
                    f"X has {X.shape[1]} features, but {type(self).__name__} is expecting "
                    f"{self.n_features_in_} features as input.")
            if array_kind(X) != array_kind(self.means_) or X.device != self.means_.device:
                where = (str(self.means_.device) if is_device_array(self.means_)
                         else "the host (a NumPy array)")
                raise ValueError("X is on another device or array library than the fitted "
                                 f"parameters; move it to {where}")
        sw = check_device_sample_weight(sample_weight, X, checks=checks)
        if sw is not None:
            checks.add(sw.sum() > 0, ValueError(
                "sample_weight must contain at least one positive weight; all weights are "
                "zero."))
        checks.raise_failed()
        return X, sw

    def _refuse_host_rows(self, streams_ok):
        """Raise when host rows meet parameters that live on a device.

        Parameters
        ----------
        streams_ok : bool
            True where a model with ``device`` set streams host rows to its
            parameters (predictions); False where the rows must already be there
            (``partial_fit``).
        """
        if is_cupy(self.means_):
            raise ValueError(f"This model was fitted on cupy arrays (GPU {self.means_.device.id})"
                             "; pass X as a cupy array there: cupy.asarray(X).")
        if is_torch(self.means_) and not (streams_ok and getattr(self, "device", None)):
            streams = " (or set device= to stream host arrays there)" if (
                streams_ok and hasattr(self, "device")) else ""
            raise ValueError(f"This model was fitted on {self.means_.device}; pass X as a "
                             f"torch tensor on that device{streams}.")

    def _validate_predict(self, X):
        """X checked for prediction: on the fitted parameters' device (see
        :func:`on_device`), or a host array for a model fitted on the host (or
        streamed there with ``device=``)."""
        check_is_fitted(self)
        if on_device(X):
            return self._validate_device_rows(X, None, reset=False, min_samples=0)[0]
        self._refuse_host_rows(streams_ok=True)
        return validate_data(self, numpy_readable(X), reset=False, dtype=[np.float64, np.float32])

    def _log_resp_chunks(self, X):
        impl = None
        for start, wlp in self._weighted_log_prob_chunks(X):
            if impl is None:  # where the log-densities are: X's device, or the model's
                impl = resolve("log_responsibilities", LOGRESP_IMPLEMENTATIONS, wlp)[1]
            log_resp, log_norm = impl(wlp)
            yield start, log_resp, log_norm

    def _predict_validated(self, X):
        labels = empty_like_rows(X, (X.shape[0],), np.int64)
        for start, wlp in self._weighted_log_prob_chunks(X):
            put_rows(labels, start, wlp.argmax(1))
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
        out = empty_like_rows(X, (X.shape[0], self.n_components))
        for start, log_resp, _ in self._log_resp_chunks(X):
            put_rows(out, start, log_resp.exp() if is_torch(log_resp) else np.exp(log_resp))
        return out

    def score_samples(self, X):
        """Log-likelihood log p(x) of each row under the model.

        Returns
        -------
        log_prob : ndarray of shape (n_samples,)
        """
        return self._score_samples_validated(self._validate_predict(X))

    def _score_samples_validated(self, X):
        out = empty_like_rows(X, (X.shape[0],))
        for start, _, log_norm in self._log_resp_chunks(X):
            put_rows(out, start, log_norm)
        return out

    def score(self, X, y=None, sample_weight=None):
        """Mean (weighted) log-likelihood of the rows of X.

        Returns
        -------
        float
        """
        log_prob = self.score_samples(X)
        if is_device_array(log_prob):
            log_prob = as_f64(log_prob)
            if sample_weight is None:
                return float(log_prob.mean())
            w = f64_like(log_prob, sample_weight)
            return float((w * log_prob).sum() / w.sum())
        return float(np.average(log_prob, weights=sample_weight))

    def sample(self, n_samples=1):
        """Draw rows from the fitted mixture, by sklearn's procedure: the rows per
        component from one multinomial draw of ``n_samples`` over the weights, then
        each component's rows in turn, from ``random_state``.

        The draws are made on the host from the parameters (copied there for a
        model fitted on a device, whose samples then go to that device).

        Returns
        -------
        X : ndarray (or the parameters' array type) of shape (n_samples, n_features),
            float64
        y : ndarray (or the parameters' array type) of shape (n_samples,), int64, the
            component of each row
        """
        check_is_fitted(self)
        if n_samples < 1:
            # sklearn's message, with n_samples where sklearn prints n_components
            raise ValueError(
                f"Invalid value for 'n_samples': {n_samples}. The sampling requires at "
                "least one sample.")
        rng = check_random_state(self.random_state)
        counts = rng.multinomial(n_samples, to_numpy(self.weights_))
        X = np.vstack(self._sample_components(rng, counts))
        y = np.repeat(np.arange(counts.shape[0], dtype=np.int64), counts)
        if is_device_array(self.means_):
            return f64_like(self.means_, X), index_like(self.means_, y)
        return X, y

    def _sample_components(self, rng, counts):
        """Component k's counts[k] rows, for every k in order: a list of (counts[k],
        n_features) host arrays drawn from ``rng``."""
        raise NotImplementedError


def put_rows(out, start, value):
    """out[start:start + len(value)] = value, bringing a device chunk to a host ``out``."""
    if isinstance(out, np.ndarray) and is_torch(value):
        value = to_numpy(value)
    out[start:start + value.shape[0]] = value


