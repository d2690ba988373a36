"""Probabilistic PCA (Tipping & Bishop 1999): x = W z + mean + noise.

z ~ N(0, I_q), noise ~ N(0, sigma^2 I_D), so x ~ N(mean, C) with
C = W W^T + sigma^2 I.  Two ways to the maximum-likelihood solution:

- ``method="closed_form"``: one pass for the mean and one for the scatter
  matrix, then an eigendecomposition.  sigma^2 is the mean of the discarded
  eigenvalues and W = U_q (Lambda_q - sigma^2 I)^{1/2}.  It costs N D^2 per
  pass.
- ``method="em"``: every iteration is one pass of the fused ``ppca_stats``
  kernel (posterior means and their moments through M = W^T W + sigma^2 I),
  which costs 3 N D q per pass and never forms an N x D x q array.  It runs on
  the shared EM driver (``tol``, ``max_iter``, ``lower_bounds_``,
  ConvergenceWarning).

- Missing data: with NaN entries in X, ``fit`` runs EM that marginalises
  each row's missing coordinates (:mod:`._masked_em`), whatever ``method``
  says (the closed form needs complete rows); ``transform`` and
  ``score_samples`` accept partially observed rows.
- Device arrays (torch CUDA tensors, cupy arrays) are fitted where they are
  (:mod:`._rows`): the passes over the rows on the device ('em' on the Triton
  or CuPy kernels, missing entries on torch's or CuPy's batched products), the
  D x D and q x q algebra on the host in float64.

Both return W in canonical form: orthogonal columns in decreasing order of
variance, each with its largest-magnitude entry positive.
"""

import math
from numbers import Integral, Real

import numpy as np
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin
from sklearn.utils import check_array, check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from fastlvm._arrays import (arrays_equal, as_f64, cast_like, copy_of, empty_like_rows, f64_like,
                             is_device_array, numpy_readable, sign_of_largest, to_numpy,
                             to_numpy_together)
from fastlvm._dispatch import on_device, resolve
from fastlvm._moments import RunningMoments, continues_a_fit, refuse_underflow, row_ranges
from fastlvm._restore import restored_on_error
from fastlvm._sample_weight import in_row_units
from fastlvm.decomposition._masked_em import (MaskedLinearGaussianEM, check_masked_columns,
                                              has_missing, refuse_missing_in_stream)
from fastlvm.decomposition._rows import (check_same_place, like_parameters, place_parameters,
                                         validate_rows)
from fastlvm.kernels._checks import check_device_data
from fastlvm.em import fit_em
from fastlvm.kernels.masked_latent_stats import check_masked_data, masked_posterior
from fastlvm.kernels.ppca_stats import IMPLEMENTATIONS as PPCA_IMPLEMENTATIONS
from fastlvm.kernels.ppca_stats._reference import ppca_log_density, ppca_posterior


class PPCA(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """Probabilistic principal component analysis.

    Parameters
    ----------
    n_components : int, default=2
        Latent dimension q, with 1 <= q < n_features.
    method : {'closed_form', 'em'}, default='closed_form'
    tol : float, default=1e-6
        'em': stop when the mean log-likelihood changes by less than this.
    max_iter : int, default=1000
        'em': maximum number of EM iterations.
    random_state : int, RandomState instance or None, default=None
        'em': seeds the initial loadings.
    chunk_size : int or None, default=None
        Rows per pass chunk (None: ``fastlvm._config.DEFAULT_CHUNK_ROWS``, fewer
        where a chunk's float64 copy would pass ``fastlvm._config.ROW_COPY_BYTES``:
        about 10,000 rows at 784 features).
    verbose : int, default=0
        'em': the EM driver's progress messages.

    Notes
    -----
    X may be a torch tensor on a CUDA device or a cupy array (missing entries
    too): ``fit``, ``partial_fit`` and every method then run on that device,
    the fitted arrays are float64 arrays of X's kind there, and results come
    back as such arrays.  The algebra on the D x D scatter matrix or the q x q
    posterior runs on the host in float64 (D x D numbers cross, never rows);
    ``sample`` draws on the host and sends the rows to the device.

    Attributes
    ----------
    components_ : ndarray of shape (n_components, n_features)
        W^T: the loadings, one component per row (canonical form, see above).
    mean_ : ndarray of shape (n_features,)
    noise_variance_ : float
        sigma^2, the maximum-likelihood estimate: moments divide by n.
        sklearn's ``PCA`` divides by n - 1, so its ``noise_variance_`` and
        ``explained_variance_`` are n / (n - 1) times these, and its
        ``score`` on the training data is slightly lower (it is not at the
        likelihood's maximum).
    explained_variance_ : ndarray of shape (n_components,)
        The model's variance along each component, ||w_j||^2 + sigma^2 (the
        top eigenvalues of the sample covariance at the optimum).
    explained_variance_ratio_ : ndarray of shape (n_components,)
        ``explained_variance_`` over the model's total variance
        tr(W W^T + sigma^2 I), which at the maximum-likelihood fit is the data's
        total variance: sklearn PCA's ratio.
    n_samples_seen_ : int
        Rows seen by ``fit`` and ``partial_fit`` (whatever their weights).
    n_iter_ : int
        EM iterations ('closed_form': 1, the single solve).
    lower_bound_ : float
        Mean (weighted) log-likelihood of the training data (every row seen,
        after ``partial_fit``) at the fitted parameters, from their moments
        ('em': as the EM driver records it, before the last M-step).
    lower_bounds_ : list of float
        'em': the mean log-likelihood at every iteration.
    n_features_in_ : int
    """

    _parameter_constraints = {
        "n_components": [Interval(Integral, 1, None, closed="left")],
        "method": [StrOptions({"closed_form", "em"})],
        "tol": [Interval(Real, 0.0, None, closed="left")],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "random_state": ["random_state"],
        "chunk_size": [Interval(Integral, 1, None, closed="left"), None],
        "verbose": ["verbose"],
    }

    # what the shared EM driver reads beyond the constructor parameters
    n_init = 1
    warm_start = False
    verbose_interval = 10

    def __init__(self, n_components=2, *, method="closed_form", tol=1e-6, max_iter=1000,
                 random_state=None, chunk_size=None, verbose=0):
        self.n_components = n_components
        self.method = method
        self.tol = tol
        self.max_iter = max_iter
        self.random_state = random_state
        self.chunk_size = chunk_size
        self.verbose = verbose

    @property
    def _n_features_out(self):
        """Columns of ``transform``'s output (read by ``get_feature_names_out``)."""
        return self.components_.shape[0]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = True  # missing entries ('em'; see _fit_missing)
        return tags

    # ------------------------------------------------------------------ fit
    def fit(self, X, y=None, sample_weight=None):
        """Fit the model to the rows of X.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            NaN marks a missing entry (fitted by EM, whatever ``method`` says).
        y : ignored
        sample_weight : array-like of shape (n_samples,), default=None
            Non-negative row weights: integer weights fit as repeated rows.

        Returns
        -------
        self
        """
        with restored_on_error(self):  # a fit that raises leaves the model as it was
            self._fit(X, sample_weight)
            self._keep_projection()
        return self

    def _fit(self, X, sample_weight):
        self._validate_params()
        X, sample_weight = self._validate_fit_data(X, sample_weight, reset=True,
                                                   allow_nan=True)
        for attr in ("_moments", "n_samples_seen_"):
            self.__dict__.pop(attr, None)
        if has_missing(X):
            self._fit_missing(X, sample_weight)
            place_parameters(self, X, _FITTED_ARRAYS)
            return self
        self._accumulate(X, sample_weight)
        if self.method == "closed_form":
            self._solve_closed_form()
            self.n_iter_ = 1
            self.lower_bounds_ = []
            self.lower_bound_ = self._mean_log_likelihood()
        else:
            # EM on such data oscillates near its noise floor or loses W's rank;
            # the scatter is at hand, so check its ML noise variance first
            cov = self._covariance()
            _ml_noise_variance(np.linalg.eigvalsh(cov)[::-1], cov, self.n_components)
            # the E-step kernel forms W W^T + sigma^2 I in X's dtype
            refuse_underflow(float(np.diag(cov).max()), X.dtype, "The variances of X")
            # the kernel weighs rows in X's dtype: weights in units of a row keep
            # float32's range (weights of 1e-100 summed to zero).  fit_em copies
            # rows in another layout than C once (a DataFrame's values)
            fit_em(self, X, in_row_units(sample_weight))
            self._canonicalise()
        place_parameters(self, X, _FITTED_ARRAYS)
        return self

    def partial_fit(self, X, y=None, sample_weight=None):
        """Update the fit with a batch of rows (exact streaming).

        The running mean and scatter matrix are merged with the batch's
        (Chan et al.'s pairwise update, float64), and the closed-form maximum
        likelihood solution is recomputed from them, so after any sequence of
        batches the model equals ``fit`` on all rows seen (up to rounding), for
        either ``method``.  Memory is O(n_features^2).  A batch that raises
        leaves the model as it was: one whose values overflow, or a first batch
        whose rows span n_components dimensions or fewer (it needs at least
        n_components + 2 rows).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Complete rows (``fit`` handles missing entries).
        y : ignored
        sample_weight : array-like of shape (n_samples,), default=None

        Returns
        -------
        self
        """
        with restored_on_error(self):
            first = not continues_a_fit(self)
            if first:
                self._validate_params()
            X, sample_weight = self._validate_fit_data(X, sample_weight, reset=first,
                                                       allow_nan=True)
            refuse_missing_in_stream(X, self)
            self._accumulate(X, sample_weight)
            self._solve_closed_form()
            self.n_iter_ = 1
            self.lower_bounds_ = []
            self.lower_bound_ = self._mean_log_likelihood()
            place_parameters(self, X, _FITTED_ARRAYS)
            self._keep_projection()
        return self

    def _fit_missing(self, X, sample_weight):
        """EM marginalising the missing entries (see ``_masked_em``).

        Whatever ``method`` says: the closed form needs complete rows.
        """
        check_masked_columns(check_masked_data(X)[1])
        em = MaskedLinearGaussianEM(self.n_components, True, self.tol, self.max_iter,
                                    self.verbose, self.random_state, self._row_ranges)
        fit_em(em, X, in_row_units(sample_weight))  # its bound: a mean over the weights
        for name in ("converged_", "n_iter_", "lower_bound_", "lower_bounds_", "mean_",
                     "components_"):
            setattr(self, name, getattr(em, name))
        self.noise_variance_ = float(em.noise_variance_[0])
        self.n_samples_seen_ = X.shape[0]
        self._canonicalise()

    def _row_ranges(self, shape):
        return row_ranges(shape, self.chunk_size)

    def _validate_fit_data(self, X, sample_weight, reset, allow_nan=False):
        """(X, float64 sample weights or None), checked (see :mod:`._rows`)."""
        X, sample_weight = validate_rows(self, X, sample_weight, reset=reset,
                                         min_samples=2 if reset else 1, allow_nan=allow_nan)
        if not self.n_components < X.shape[1]:
            raise ValueError(
                f"n_components must be smaller than n_features; got n_components="
                f"{self.n_components} with n_features={X.shape[1]}. Use fewer components "
                "(with n_components == n_features the model is a full Gaussian).")
        return X, sample_weight

    def _accumulate(self, X, sample_weight):
        """Merge X's row count, (weighted) mean and scatter into ``_moments``."""
        batch = RunningMoments.of(X, self._row_ranges, sample_weight)
        moments = getattr(self, "_moments", None)
        self._moments = batch if moments is None else moments.merged(batch)
        self.mean_, self.n_samples_seen_ = self._moments.mean, self._moments.rows

    def _covariance(self):
        """The (weighted) sample covariance of the rows seen, (D, D)."""
        return self._moments.covariance

    def _mean_log_likelihood(self):
        """The (weighted) mean log-likelihood of the rows seen, from their moments:
        -(D log 2 pi + log det C + tr(C^-1 S)) / 2, no pass over the rows."""
        d = self.components_.shape[1]
        log_det = (np.sum(np.log(to_numpy(self.explained_variance_)))
                   + (d - self.n_components) * math.log(self.noise_variance_))
        return float(-0.5 * (d * math.log(2.0 * math.pi) + log_det
                             + np.sum(to_numpy(self.get_precision()) * self._covariance())))

    def _solve_closed_form(self):
        q = self.n_components
        cov = self._covariance()
        eigval, eigvec = np.linalg.eigh(0.5 * (cov + cov.T))
        eigval, eigvec = eigval[::-1], eigvec[:, ::-1]
        sigma2 = _ml_noise_variance(eigval, cov, q)
        scale = np.sqrt(np.clip(eigval[:q] - sigma2, 0.0, None))
        self.noise_variance_ = sigma2
        self.components_ = (eigvec[:, :q] * scale).T
        self._canonicalise()

    def _canonicalise(self):
        """Rotate W to orthogonal columns by decreasing norm, signs fixed."""
        u, s, _ = np.linalg.svd(self.components_.T, full_matrices=False)
        w = u * s
        self.components_ = (w * sign_of_largest(w.T)).T
        self.explained_variance_ = s**2 + self.noise_variance_
        # of the model's total variance tr(W W^T + sigma^2 I): at the ML fit, tr S,
        # which makes it sklearn PCA's ratio
        self.explained_variance_ratio_ = self.explained_variance_ / (
            np.sum(s**2) + self.components_.shape[1] * self.noise_variance_)

    # --------------------------------------------------- EM driver hooks
    def _em_initialize(self, X, sample_weight, random_state):
        d = X.shape[1]
        total_var = np.trace(self._covariance())
        scale = math.sqrt(max(total_var, np.finfo(float).tiny) / d)
        self.components_ = random_state.standard_normal((self.n_components, d)) * scale
        self.noise_variance_ = max(total_var / d, np.finfo(float).tiny)

    def _em_iteration(self, X, sample_weight):
        impl = resolve("ppca_stats", PPCA_IMPLEMENTATIONS, X)[1]
        if is_device_array(X):
            ll, ss, cross, n = self._device_pass(impl, X, sample_weight)
        else:
            ll = ss = 0.0
            cross = None
            for start, stop in self._row_ranges(X.shape):
                sw = None if sample_weight is None else sample_weight[start:stop]
                s = impl(X[start:stop], self.mean_, self.components_, self.noise_variance_,
                         sw)
                ll += s[0]
                ss += s[1]
                cross = s[2].copy() if cross is None else cross + s[2]
            n = X.shape[0] if sample_weight is None else float(sample_weight.sum())
        d = X.shape[1]
        # cross = sum c z^T with z = M^{-1} W c, so S W^T = cross M / n.  That
        # holds |x|^3 and the step's products |x|^4, which leave float64's range
        # long before the data do (at a spread of 1e-100 or 1e100), so the step
        # runs in units of a power of two near the spread: exactly the same
        # arithmetic, scaled without rounding
        unit = power_of_two_near(math.sqrt(ss / (n * d)))
        w = self.components_ / unit
        m = w @ w.T
        m[np.diag_indices_from(m)] += self.noise_variance_ / unit**2
        components, noise_variance = ritz_em_step((cross / unit) @ m / n,
                                                  ss / (n * unit**2), w)
        self.components_, self.noise_variance_ = components * unit, noise_variance * unit**2
        return ll / n

    def _device_pass(self, impl, X, sample_weight):
        """(log-likelihood, sum |c|^2, cross (D, q) NumPy, total weight) of one
        device pass over X (its kernels split the rows themselves), read back
        from the device in one copy: one wait an iteration."""
        # (the kernel casts the weights to X's dtype once it has placed the parameters)
        ll, ss, cross, _ = impl(X, self.mean_, self.components_, self.noise_variance_,
                                sample_weight, keep_on_device=True)
        total = X.shape[0] if sample_weight is None else as_f64(sample_weight).sum()
        ll, ss, cross, total = to_numpy_together([ll, ss, cross, total])
        return float(ll), float(ss), cross, float(total)

    def _get_parameters(self):
        return copy_of(self.components_), self.noise_variance_

    def _set_parameters(self, params):
        self.components_, self.noise_variance_ = params

    # ------------------------------------------------------------- predict
    def _validate(self, X):
        check_is_fitted(self)
        return validate_rows(self, X, reset=False, min_samples=1, allow_nan=True)[0]

    def _masked_posterior(self, X):
        """(log p(x_O), E[z | x_O]) of rows with missing entries (float64, of X's
        kind), or None if complete."""
        if not has_missing(X):
            return None
        noise = np.full(X.shape[1], self.noise_variance_)
        return masked_posterior(X, to_numpy(self.mean_), to_numpy(self.components_), noise)

    def _form_projection(self):
        """W^T M^{-1}, (n_features, n_components) float64 of the parameters' kind:
        E[z | x] = (x - mean) W^T M^{-1}."""
        components = to_numpy(self.components_)
        m_inv, _ = ppca_posterior(components, self.noise_variance_)
        return like_parameters(self, components.T @ m_inv)

    def _keep_projection(self):
        """Form W^T M^{-1} once per fit, with copies of the parameters it comes from.

        On one row, forming it (a q x q Cholesky and solve) took a third of
        ``transform``'s time (D = 256, q = 16).  It is kept at the end of
        ``fit`` and ``partial_fit``, not by ``transform``, which leaves the
        estimator as it found it (sklearn's ``check_dict_unchanged``).
        """
        self._projection = (copy_of(self.components_), self.noise_variance_,
                            self._form_projection())

    def _posterior_projection(self):
        """The fit's W^T M^{-1}; formed anew (and not kept) where ``components_``
        or ``noise_variance_`` differ from the fit's, edited in place or not, so
        an edit is never served the projection of the parameters before it."""
        kept = getattr(self, "_projection", None)
        if (kept is not None and kept[1] == self.noise_variance_
                and type(kept[0]) is type(self.components_)
                and arrays_equal(kept[0], self.components_)):
            return kept[2]
        return self._form_projection()

    def transform(self, X):
        """Posterior means E[z | x], shape (n_samples, n_components), X's dtype.

        Rows with missing entries (NaN) get E[z | observed entries].
        """
        X = self._validate(X)
        masked = self._masked_posterior(X)
        if masked is not None:
            return cast_like(masked[1], X)
        proj = self._posterior_projection()
        out = empty_like_rows(X, (X.shape[0], self.n_components))
        for start, stop in self._row_ranges(X.shape):
            out[start:stop] = (as_f64(X[start:stop]) - self.mean_) @ proj
        return out

    def inverse_transform(self, Z):
        """Mean reconstruction W^T z + mean.

        Parameters
        ----------
        Z : array-like of shape (n_samples, n_components)

        Returns
        -------
        X : ndarray (or the fitted parameters' array kind) of shape
            (n_samples, n_features), float64
        """
        check_is_fitted(self)
        check_same_place(self, Z, "Z")
        Z = (check_device_data(Z, name="Z") if on_device(Z) else
             check_array(numpy_readable(Z), dtype=[np.float64, np.float32], input_name="Z"))
        if Z.shape[1] != self.n_components:
            raise ValueError(f"Z must have shape (n_samples, {self.n_components}); "
                             f"got {tuple(Z.shape)}.")
        return as_f64(Z) @ self.components_ + self.mean_

    def score_samples(self, X):
        """Exact log N(x | mean, W W^T + sigma^2 I) of each row, float64 (n_samples,)
        (an array of X's kind for device rows).

        A row with missing entries (NaN) gets the density of its observed entries.
        """
        return self._log_density(self._validate(X))

    def _log_density(self, X):
        """score_samples of validated X."""
        masked = self._masked_posterior(X)
        if masked is not None:
            return masked[0]
        m_inv, log_det = ppca_posterior(to_numpy(self.components_), self.noise_variance_)
        posterior = f64_like(X, m_inv), log_det  # formed and placed once, not per block
        out = empty_like_rows(X, (X.shape[0],), np.float64)
        for start, stop in self._row_ranges(X.shape):
            out[start:stop] = ppca_log_density(as_f64(X[start:stop]) - self.mean_,
                                               self.components_, self.noise_variance_,
                                               posterior)[0]
        return out

    def score(self, X, y=None):
        """Mean log-likelihood of the rows of X."""
        return float(self.score_samples(X).mean())

    def sample(self, n_samples=1, random_state=None):
        """Draw rows from the fitted model, x = W^T z + mean + sigma eps.

        Parameters
        ----------
        n_samples : int, default=1
        random_state : int, RandomState instance or None, default=None
            Seeds the draws; None uses the estimator's ``random_state`` (so an
            int there gives the same rows on every call, as in the mixtures).

        Returns
        -------
        X : ndarray (or the fitted parameters' array kind, drawn on the host) of
            shape (n_samples, n_features), float64
        """
        check_is_fitted(self)
        if isinstance(n_samples, bool) or not (isinstance(n_samples, Integral)
                                               and n_samples >= 1):
            raise ValueError(f"n_samples must be a positive integer; got {n_samples!r}.")
        rng = check_random_state(self.random_state if random_state is None else random_state)
        z = rng.standard_normal((n_samples, self.n_components))
        noise = rng.standard_normal((n_samples, self.mean_.shape[0]))
        return like_parameters(self, z @ to_numpy(self.components_) + to_numpy(self.mean_)
                               + math.sqrt(self.noise_variance_) * noise)

    def get_covariance(self):
        """Model covariance W W^T + sigma^2 I, (n_features, n_features), of the
        fitted parameters' array kind."""
        check_is_fitted(self)
        wt = to_numpy(self.components_)
        cov = wt.T @ wt
        cov[np.diag_indices_from(cov)] += self.noise_variance_
        return like_parameters(self, cov)

    def get_precision(self):
        """Inverse covariance by the Woodbury identity (no D x D inverse), of the
        fitted parameters' array kind."""
        check_is_fitted(self)
        wt = to_numpy(self.components_)
        m_inv, _ = ppca_posterior(wt, self.noise_variance_)
        prec = -(wt.T @ m_inv @ wt)
        prec[np.diag_indices_from(prec)] += 1.0
        return like_parameters(self, prec / self.noise_variance_)


# what a fit on device rows leaves on their device
_FITTED_ARRAYS = ("mean_", "components_", "explained_variance_", "explained_variance_ratio_")


def _ml_noise_variance(eigval, cov, q):
    """The ML noise variance: the mean of the D - q smallest eigenvalues of cov
    (``eigval``, (D,), in descending order; cov, (D, D)), negatives read as 0.

    Raises where it is zero to rounding: at most eps times the total variance
    trace(cov), the size of the rounding in those eigenvalues.  Then the data
    lie in a subspace of dimension <= n_components (n <= n_components + 1
    rows always do) and the likelihood is unbounded.
    """
    noise_variance = float(np.clip(eigval[q:], 0.0, None).mean())
    if not noise_variance > np.finfo(float).eps * float(np.trace(cov)):
        raise ValueError(
            "The data lie in a subspace of dimension <= n_components (to rounding), so "
            "the noise variance is zero and the PPCA likelihood is unbounded. Use fewer "
            "components, more rows (at least n_components + 2), or add noise to the data.")
    return noise_variance


def power_of_two_near(x):
    """2^e with x = f 2^e, 1/2 <= f < 1 (1.0 for x = 0): a unit that rescales exactly."""
    return math.ldexp(1.0, math.frexp(x)[1])


def ritz_em_step(s_wt, tr_s, components):
    """One Rayleigh-Ritz-then-EM update of PPCA from S W^T alone.

    Plain EM shrinks an overgrown loading column by a factor
    lambda / (lambda + sigma^2) per iteration, so with a strong signal it
    crawls: at N=10k, D=256, q=16 (sigma^2 / lambda ~ 1e-3) it was 15 nats short
    of the optimum after 300 iterations.  Both steps here use only S W^T (the
    pass's statistics) and tr S:

    1. Rayleigh-Ritz: the maximum-likelihood PPCA among models whose loadings
       span the same subspace as W (eigendecomposition of the q x q
       H = Q^T S Q, with W^T = Q R);
    2. one EM step from that model (its S W'^T = S Q V diag(s) follows from
       S W^T), which moves the subspace to span(S Q): subspace iteration, which
       converges at the rate lambda_{q+1} / lambda_q.

    Each step does not decrease the likelihood, so the per-pass bound stays
    monotone; at N=10k, D=256, q=16 the optimum is reached in 4 passes.

    Parameters
    ----------
    s_wt : ndarray of shape (n_features, q)
        S W^T, with S the sample covariance around the mean.
    tr_s : float
        tr S.
    components : ndarray of shape (q, n_features)
        W, the loadings the pass used.

    Returns
    -------
    components : ndarray of shape (q, n_features)
    noise_variance : float
    """
    q, d = components.shape
    tiny = np.finfo(float).tiny
    basis, r = np.linalg.qr(components.T)  # W^T = Q R
    s_q = np.linalg.solve(r.T, s_wt.T).T  # S Q
    h = basis.T @ s_q
    lam, vec = np.linalg.eigh(0.5 * (h + h.T))
    lam, vec = lam[::-1], vec[:, ::-1]
    sigma2 = max((tr_s - lam.sum()) / (d - q), tiny)
    scale = np.sqrt(np.maximum(lam - sigma2, 1e-3 * sigma2))
    # EM from W'^T = Q V diag(scale): M' = diag(scale^2) + sigma^2 I, W' S W'^T = diag(scale^2 lam)
    s_a = (s_q @ vec) * scale
    m_diag = scale**2 + sigma2
    # scale^2 (lam / m_diag), not (scale^2 lam) / m_diag: lam scale^2 ~ |x|^4 overflows first
    a_new = np.linalg.solve((sigma2 * np.eye(q) + np.diag(scale**2 * (lam / m_diag))).T,
                            s_a.T).T
    sigma2_new = (tr_s - np.sum((s_a / m_diag) * a_new)) / d
    return a_new.T, max(float(sigma2_new), np.finfo(float).eps * tr_s / d)
