"""FactorAnalysis: a drop-in for sklearn.decomposition.FactorAnalysis fitted from
D x D sufficient statistics.

sklearn's algorithm (Barber, 2012, 21.2.33) takes, every iteration, the SVD of
the scaled data X / (sqrt(psi) sqrt(n)), an O(n D^2) pass over all rows.
Its squared singular values and right singular vectors are the eigenpairs of
Psi^{-1/2} S Psi^{-1/2}, with S the (weighted) covariance of X.  So one pass
forms S (two chunked GEMM passes, float64, around the mean), and every
iteration is an O(D^3) eigendecomposition: the same iterates as sklearn's
``svd_method='lapack'``, at the cost of one pass over the data instead of one
per iteration.  Rows may carry sample weights (S and n become weighted).
``partial_fit`` merges each batch's mean and scatter into running ones
(:class:`fastlvm._moments.RunningMoments`) and reruns the iterations, so data
that do not fit in memory are fitted in one pass, exactly.

Missing values (NaN) are fitted by EM that marginalises each row's missing
coordinates (:mod:`._masked_em`, one kernel pass per iteration);
``transform`` and ``score_samples`` accept partially observed rows.

Device arrays (torch CUDA tensors, cupy arrays) are fitted where they are
(:mod:`._rows`): the pass for S (or the missing-data EM's passes) and the
predictions on the device, the iterations (D x D) on the host in float64.
"""

import math
import warnings
from numbers import Integral, Real

import numpy as np
from scipy import linalg
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.extmath import fast_logdet
from sklearn.utils.validation import check_is_fitted

from fastlvm._arrays import (as_f64, empty_like_rows, off_device, sign_of_largest,
                             to_numpy_together)
from fastlvm.decomposition._masked_em import (MaskedLinearGaussianEM, check_masked_columns,
                                              has_missing, noise_floor,
                                              refuse_missing_in_stream)
from fastlvm._moments import RunningMoments, continues_a_fit, row_ranges
from fastlvm.decomposition._rows import (like_parameters, place_parameters,
                                         validate_rows)
from fastlvm._restore import restored_on_error
from fastlvm._sample_weight import in_row_units
from fastlvm.em import fit_em
from fastlvm.kernels.masked_latent_stats import check_masked_data, masked_posterior


class FactorAnalysis(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """Factor analysis, x = W^T z + mean + noise with diagonal noise Psi.

    Same parameters, defaults, attributes and methods as
    :class:`sklearn.decomposition.FactorAnalysis`, and the same iterates as
    sklearn's ``svd_method='lapack'`` from the same start (to rounding).  Two
    differences on purpose:

    - ``loglike_`` holds the exact log-likelihood of each iterate, and the fit
      stops by it.  sklearn's formula overstates it wherever one of the
      ``n_components`` retained eigenvalues of Psi^-1/2 S Psi^-1/2 is below 1
      (as at ``n_components=None`` or beyond the data's factors; with fewer
      rows than features it takes the log of round-off), which can stop its
      fit early.  Where all are >= 1 the two sequences agree.
    - The noise variances are floored at 1e-12 times each feature's variance
      (a constant feature's, one whose variance is the rounding of its
      mean, at 1e-12 times the other features' mean variance), where sklearn
      floors at an absolute 1e-12: data in small units (variance about 1e-12
      or below) get the same fit as in large ones, not noise variances pinned
      to the floor.  A constant feature's floor sets the (unbounded)
      likelihood: 0.5 log(mean variance) per row below sklearn's.
    fastlvm adds ``fit(X, sample_weight=...)``, ``chunk_size``, and an exact
    streaming ``partial_fit`` (the covariance is all the iterations need).
    Each factor's sign is fixed (its largest-magnitude loading positive), where
    sklearn's follows its SVD.
    ``svd_method`` and ``iterated_power`` are accepted for compatibility:
    the D x D eigendecomposition is exact and cheap, so both methods compute it.

    Parameters
    ----------
    n_components : int or None, default=None (n_features)
    tol : float, default=1e-2
        Stop when the log-likelihood grows by less than ``tol``: the total over
        the rows, as sklearn's, weighted by ``sample_weight`` where given.
        Weights count rows (integer weights fit as repeated rows), so weights
        that sum to far fewer than the rows (probabilities summing to 1) stop
        the fit as early as that many rows would: multiply them up to mean 1,
        or lower ``tol`` by the same factor.
    copy : bool, default=True
        Kept for compatibility; X is never modified.
    max_iter : int, default=1000
    noise_variance_init : array-like of shape (n_features,), default=None (ones)
    svd_method : {'lapack', 'randomized'}, default='randomized'
    iterated_power : int, default=3
    rotation : {'varimax', 'quartimax'} or None, default=None
    random_state : int, RandomState instance or None, default=0
    chunk_size : int or None, default=None
        Rows per pass chunk (None: ``fastlvm._config.DEFAULT_CHUNK_ROWS``, fewer
        where a chunk's float64 copy would pass ``fastlvm._config.ROW_COPY_BYTES``:
        about 10,000 rows at 784 features).

    Notes
    -----
    X may be a torch tensor on a CUDA device or a cupy array (missing entries
    too): ``fit``, ``partial_fit`` and every method then run on that device,
    the fitted arrays are float64 arrays of X's kind there, and results come
    back as such arrays.  The pass that forms S runs on the device; the
    iterations on S (D x D numbers) run on the host in float64.

    Attributes
    ----------
    components_ : ndarray of shape (n_components, n_features)
    loglike_ : list of float, one per iteration
    noise_variance_ : ndarray of shape (n_features,)
    n_iter_ : int
    mean_ : ndarray of shape (n_features,)
    n_features_in_ : int
    """

    _parameter_constraints: dict = {
        "n_components": [Interval(Integral, 0, None, closed="left"), None],
        "tol": [Interval(Real, 0.0, None, closed="left")],
        "copy": ["boolean"],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "noise_variance_init": ["array-like", None],
        "svd_method": [StrOptions({"randomized", "lapack"})],
        "iterated_power": [Interval(Integral, 0, None, closed="left")],
        "rotation": [StrOptions({"varimax", "quartimax"}), None],
        "random_state": ["random_state"],
        "chunk_size": [Interval(Integral, 1, None, closed="left"), None],
    }

    def __init__(self, n_components=None, *, tol=1e-2, copy=True, max_iter=1000,
                 noise_variance_init=None, svd_method="randomized", iterated_power=3,
                 rotation=None, random_state=0, chunk_size=None):
        self.n_components = n_components
        self.tol = tol
        self.copy = copy
        self.max_iter = max_iter
        self.noise_variance_init = noise_variance_init
        self.svd_method = svd_method
        self.iterated_power = iterated_power
        self.rotation = rotation
        self.random_state = random_state
        self.chunk_size = chunk_size

    def _row_ranges(self, shape):
        return row_ranges(shape, self.chunk_size)

    def fit(self, X, y=None, sample_weight=None):
        """Fit by EM on the covariance of X.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : ignored
        sample_weight : array-like of shape (n_samples,), default=None
            Non-negative row weights: integer weights fit as repeated rows
            (and ``tol`` applies to the weighted total; see there).

        Returns
        -------
        self
        """
        with restored_on_error(self):  # a fit that raises leaves the model as it was
            return self._fit(X, sample_weight)

    def _fit(self, X, sample_weight):
        self._validate_params()
        self.__dict__.pop("_moments", None)
        X, sw = self._validate_rows(X, sample_weight, reset=True, allow_nan=True)
        if has_missing(X):
            self._fit_missing(X, sw, self._n_latent(X.shape[1]))
        else:
            self._moments = RunningMoments.of(X, self._row_ranges, sw)
            self._fit_moments()
        place_parameters(self, X, _FITTED_ARRAYS)
        return self

    def partial_fit(self, X, y=None, sample_weight=None):
        """Update the fit with a batch of rows (exact streaming).

        The running (weighted) mean and scatter matrix are merged with the
        batch's (Chan et al.'s pairwise update, float64), and the iterations
        rerun on them from the same start as ``fit`` (``noise_variance_init``),
        so after any sequence of batches the model equals ``fit`` on all rows
        seen, to rounding: factor analysis of data that do not fit in memory,
        one pass over them.  Each call costs one pass over its batch plus the
        O(n_features^3) iterations; memory is O(n_features^2).  Rows must be
        complete (``fit`` handles missing entries).  A batch that raises
        leaves the model as it was; the first needs 2 rows of positive weight.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : ignored
        sample_weight : array-like of shape (n_samples,), default=None
            Non-negative row weights: integer weights fit as repeated rows
            (and ``tol`` applies to the weighted total; see there).

        Returns
        -------
        self
        """
        with restored_on_error(self):
            first = not continues_a_fit(self)
            if first:
                self._validate_params()
            X, sw = self._validate_rows(X, sample_weight, reset=first, allow_nan=True)
            refuse_missing_in_stream(X, self)
            batch = RunningMoments.of(X, self._row_ranges, sw)
            self._moments = batch if first else self._moments.merged(batch)
            self._fit_moments()
            place_parameters(self, X, _FITTED_ARRAYS)
        return self

    def _validate_rows(self, X, sample_weight, reset, allow_nan):
        """(X, float64 weights or None).  The rows that start a fit (``reset``)
        need 2 of positive weight (see :mod:`._rows`)."""
        X, sw = validate_rows(self, X, sample_weight, reset=reset, min_samples=2 if reset else 1,
                              allow_nan=allow_nan)
        if reset:  # only a fit's first rows need the count (on a device, a read)
            rows = X.shape[0] if sw is None else int((sw > 0).sum())
            if rows < 2:
                raise ValueError(
                    f"Expected at least 2 samples with a positive sample_weight, got "
                    f"{rows}: rows of weight zero are not data, and one row has no "
                    "variance to fit.")
        return X, sw

    def _n_latent(self, n_features):
        return n_features if self.n_components is None else self.n_components

    def _fit_moments(self):
        """The iterations on the covariance of the rows in ``_moments``."""
        total, self.mean_, cov = (self._moments.total, self._moments.mean,
                                  self._moments.covariance)
        n_features = cov.shape[0]
        q = self._n_latent(n_features)
        var = np.diag(cov).copy()
        if self.noise_variance_init is None:
            psi = np.ones(n_features)
        else:
            psi = np.asarray(off_device(self.noise_variance_init), dtype=np.float64)
            if psi.shape != (n_features,):
                raise ValueError(
                    "noise_variance_init dimension does not with number of features : "
                    f"{psi.shape[0]} != {n_features}")
            if not (np.isfinite(psi).all() and (psi >= 0).all()):
                raise ValueError("noise_variance_init must be finite and non-negative; got "
                                 f"{psi.min()} at its smallest.")
        floor = noise_floor(var, self.mean_)  # also lifts zeros in noise_variance_init
        psi = np.maximum(psi, floor)
        llconst = n_features * math.log(2.0 * math.pi)
        loglike = []
        old_ll = -np.inf
        for i in range(self.max_iter):
            sqrt_psi = np.sqrt(psi)
            scaled = cov / np.outer(sqrt_psi, sqrt_psi)
            eigval, eigvec = linalg.eigh(scaled, check_finite=False)
            eigval, eigvec = np.clip(eigval[::-1], 0.0, None), eigvec[:, ::-1]
            s, unexp_var = eigval[:q], float(eigval[q:].sum())
            W = (np.sqrt(np.maximum(s - 1.0, 0.0))[:, None] * eigvec[:, :q].T) * sqrt_psi
            ll = -0.5 * total * (llconst + _loading_terms(s) + unexp_var
                                 + np.sum(np.log(psi)))
            loglike.append(ll)
            if (ll - old_ll) < self.tol:
                break
            old_ll = ll
            psi = np.maximum(var - np.sum(W**2, axis=0), floor)
        else:
            warnings.warn("FactorAnalysis did not converge. You might want to increase "
                          "the number of iterations.", ConvergenceWarning)
        # each factor's sign is free (eigh's choice follows the last bits of cov):
        # its largest-magnitude loading positive, so a fit does not depend on how
        # the rows came in (partial_fit) or on rounding
        W = W * sign_of_largest(W)[:, None]
        self.components_ = W
        if self.rotation is not None:
            self.components_ = _ortho_rotation(W.T, self.rotation)[:q]
        self.noise_variance_ = psi
        self.loglike_ = loglike
        self.n_iter_ = i + 1
        return self

    def _fit_missing(self, X, sample_weight, q):
        """EM marginalising the missing entries (see ``_masked_em``)."""
        check_masked_columns(check_masked_data(X)[1])
        if not 1 <= q < X.shape[1]:
            raise ValueError(
                f"With missing values, n_components must be between 1 and n_features - 1; "
                f"got {q} with n_features = {X.shape[1]}.")
        total = X.shape[0] if sample_weight is None else float(sample_weight.sum())
        if not total > 0:
            raise ValueError("sample_weight must contain at least one positive weight.")
        em = MaskedLinearGaussianEM(q, False, self.tol / total, self.max_iter, 0, None,
                                    self._row_ranges)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            fit_em(em, X, in_row_units(sample_weight))  # its bound: a mean over the weights
        if not em.converged_:
            warnings.warn("FactorAnalysis did not converge. You might want to increase "
                          "the number of iterations.", ConvergenceWarning)
        self.mean_ = em.mean_
        self.components_ = em.components_
        if self.rotation is not None:
            self.components_ = _ortho_rotation(em.components_.T, self.rotation)[:q]
        self.noise_variance_ = em.noise_variance_
        self.loglike_ = [ll * total for ll in em.lower_bounds_]
        self.n_iter_ = em.n_iter_
        return self

    def _validate_predict(self, X):
        check_is_fitted(self)
        return validate_rows(self, X, reset=False, min_samples=1, allow_nan=True)[0]

    def _masked_posterior(self, X):
        """(log p(x_O), E[z | x_O]) for rows with missing entries (float64, of X's
        kind), or None if complete."""
        if not has_missing(X):
            return None
        return masked_posterior(X, *to_numpy_together([self.mean_, self.components_,
                                                       self.noise_variance_]))

    def transform(self, X):
        """Posterior means E[z | x] of the latent factors, (n_samples, n_components),
        float64 (an array of X's kind for device rows).

        Rows with missing entries (NaN) get E[z | observed entries].
        """
        X = self._validate_predict(X)
        masked = self._masked_posterior(X)
        if masked is not None:
            return masked[1]
        W, psi = self._host_parameters()
        Wpsi = W / psi
        cov_z = linalg.inv(np.eye(len(W)) + Wpsi @ W.T)
        projection = like_parameters(self, Wpsi.T @ cov_z)  # E[z | x] = (x - mean) Psi^-1 W^T cov_z
        out = empty_like_rows(X, (X.shape[0], len(W)), np.float64)
        for start, stop in self._row_ranges(X.shape):
            out[start:stop] = (as_f64(X[start:stop]) - self.mean_) @ projection
        return out

    def get_covariance(self):
        """Model covariance W^T W + diag(Psi), (n_features, n_features), of the
        fitted parameters' array kind."""
        check_is_fitted(self)
        return like_parameters(self, self._host_covariance())

    def _host_parameters(self):
        """(W, psi): ``components_`` and ``noise_variance_`` as float64 NumPy arrays,
        read from a device in one copy."""
        return to_numpy_together([self.components_, self.noise_variance_])

    def _host_covariance(self):
        W, psi = self._host_parameters()
        cov = W.T @ W
        cov.flat[:: len(cov) + 1] += psi
        return cov

    def get_precision(self):
        """Inverse of :meth:`get_covariance` by the Woodbury identity (q x q
        inverse), of the fitted parameters' array kind."""
        check_is_fitted(self)
        return like_parameters(self, self._host_precision())

    def _host_precision(self):
        W, psi = self._host_parameters()
        n_features = W.shape[1]
        if W.shape[0] == 0:
            return np.diag(1.0 / psi)
        if W.shape[0] == n_features:
            return linalg.inv(self._host_covariance())
        w_psi = W / psi
        inner = np.eye(W.shape[0]) + w_psi @ W.T
        precision = -(w_psi.T @ linalg.solve(inner, w_psi, assume_a="pos"))
        precision.flat[:: n_features + 1] += 1.0 / psi
        return precision

    def score_samples(self, X):
        """Log-likelihood of each row under the model, (n_samples,), float64 (an
        array of X's kind for device rows).

        A row with missing entries (NaN) gets the density of its observed entries.
        """
        X = self._validate_predict(X)
        masked = self._masked_posterior(X)
        if masked is not None:
            return masked[0]
        precision = self._host_precision()
        const = 0.5 * (X.shape[1] * math.log(2.0 * math.pi) - fast_logdet(precision))
        precision = like_parameters(self, precision)
        out = empty_like_rows(X, (X.shape[0],), np.float64)
        for start, stop in self._row_ranges(X.shape):
            xr = as_f64(X[start:stop]) - self.mean_
            out[start:stop] = -0.5 * (xr * (xr @ precision)).sum(1) - const
        return out

    def score(self, X, y=None):
        """Mean log-likelihood of the rows of X."""
        return float(self.score_samples(X).mean())

    @property
    def _n_features_out(self):
        """Columns of ``transform``'s output (read by ``get_feature_names_out``)."""
        return self.components_.shape[0]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float64"]
        tags.input_tags.allow_nan = True  # missing entries, see _fit_missing
        return tags


# what a fit on device rows leaves on their device
_FITTED_ARRAYS = ("mean_", "components_", "noise_variance_")


def _loading_terms(s):
    """The retained eigenvalues' part of -2 log-likelihood / n, (q,) -> float.

    With scaled covariance Psi^{-1/2} S Psi^{-1/2} and W built from its top
    eigenpairs (s_i, v_i) as sqrt(max(s_i - 1, 0)) v_i, the model covariance has
    eigenvalue max(s_i, 1) along v_i, so direction i adds
    log max(s_i, 1) + s_i / max(s_i, 1): log s_i + 1 where s_i >= 1, s_i below.
    sklearn adds log s_i + 1 for every i, which overstates the log-likelihood
    wherever an s_i < 1 (log s + 1 < s) and tends to +inf as s_i -> 0 (rank-
    deficient data), so its ``loglike_`` can stop the fit early.
    """
    kept = s >= 1.0
    return float(np.sum(np.log(s[kept]) + 1.0) + np.sum(s[~kept]))


def _ortho_rotation(components, method="varimax", tol=1e-6, max_iter=100):
    """Orthogonal varimax / quartimax rotation (Kaiser's criterion, SVD updates).

    Parameters
    ----------
    components : ndarray (n_features, n_components)

    Returns
    -------
    ndarray (n_components, n_features), the rotated loadings
    """
    nrow, ncol = components.shape
    rotation = np.eye(ncol)
    var = 0.0
    for _ in range(max_iter):
        rotated = components @ rotation
        target = rotated**3
        if method == "varimax":
            target = target - rotated * ((rotated**2).sum(axis=0) / nrow)
        u, s, vt = np.linalg.svd(components.T @ target)
        rotation = u @ vt
        var_new = float(np.sum(s))
        if var != 0 and var_new < var * (1 + tol):
            break
        var = var_new
    return (components @ rotation).T
