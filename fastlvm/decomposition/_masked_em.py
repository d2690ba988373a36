"""EM for x = W^T z + mean + noise on data with missing entries (NaN).

Shared by PPCA (one noise variance) and FactorAnalysis (one per feature).
Each iteration is one pass of :func:`fastlvm.kernels.masked_latent_stats`,
which marginalises every row over its missing coordinates, then a joint
M-step for each feature's loading row and mean (Ilin & Raiko 2010, "Practical
approaches to principal component analysis in the presence of missing
values"): with z~ = (z, 1) and A_i = sum over rows observing i of E[z~ z~^T],

    (w_i, delta mean_i) = A_i^{-1} sum c_ni z~_n,
    residual_i = sum c_ni^2 - (w_i, delta mean_i) . sum c_ni z~_n,

so sigma^2 = sum_i residual_i / sum_i n_i (PPCA) or psi_i = residual_i / n_i
(factor analysis).  EM on incomplete data is slow from a poor start, so it
starts from the closed-form PPCA of the pairwise-complete covariance.

Device arrays (torch CUDA tensors, cupy arrays) stay where they are: the
passes over the rows (the start's mean and pairwise covariance, the E-step)
run there, and the M-step's D solves of (q + 1) x (q + 1) on the host.
"""

import numpy as np

from fastlvm._arrays import (as_f64, is_device_array, namespace, to_numpy, to_numpy_together,
                             zeros_like)
from fastlvm._dispatch import resolve
from fastlvm._moments import overflow_error, refuse_vanished_spread
from fastlvm.kernels.masked_latent_stats import IMPLEMENTATIONS, MaskedLatentStats

RELATIVE_NOISE_FLOOR = 1e-12


# a feature whose variance is below (this x eps x |its mean|)^2 is constant to
# rounding: the rounding of a weighted or streamed mean leaves it that much
CONSTANT_TO_ROUNDING = 64.0


def noise_floor(variances, means):
    """Floors (D,) for the noise variances from the features' variances and means (D,).

    1e-12 times each feature's own variance, so that the floor follows the
    feature's units; a constant feature takes 1e-12 times the mean variance of
    the others (1e-12 if every feature is constant).  A feature is constant
    when its variance is the rounding of its mean, (64 eps |mean|)^2 or less:
    a weighted or streamed mean of a constant column is off in its last bits,
    and a floor of 1e-12 times that round-off set the (unbounded) likelihood
    by the rounding.  sklearn floors factor analysis at an absolute 1e-12,
    which on data of variance about 1e-12 or below (micrometres in metres)
    pins the noise variances to the floor and wrecks the fit.
    """
    var = np.asarray(variances, dtype=np.float64)
    rounding = (CONSTANT_TO_ROUNDING * np.finfo(np.float64).eps
                * np.abs(np.asarray(means, dtype=np.float64))) ** 2
    varying = var > rounding
    typical = float(var[varying].mean()) if varying.any() else 1.0
    return RELATIVE_NOISE_FLOOR * np.where(varying, var, typical)


def has_missing(X, name="X"):
    """Whether X (host or device rows that allow NaN) has a NaN entry; an infinite
    entry is refused, naming ``name``.

    Finite rows have a finite sum, so one read of the sum answers for them, with
    no (n, D) mask: on a device that is the one wait of the check (the infinity
    check of :func:`._rows.validate_rows` is this one for device rows).  Only a
    sum that is not finite (a NaN or infinite entry, or, rarely, partial sums
    that overflow) looks at the entries: on a device both questions, read in one
    more copy; on the host NaN only (``validate_data`` refused infinities).

    Raises
    ------
    ValueError
        X has an infinite entry (only NaN marks a missing one).
    """
    xp = namespace(X)
    with np.errstate(over="ignore", invalid="ignore"):
        total = X.sum() if is_device_array(X) else np.sum(X)
    if bool(xp.isfinite(total)):
        return False
    if not is_device_array(X):  # sklearn's checks refused host infinities already
        return bool(np.isnan(X).any())
    infinite, missing = to_numpy_together([xp.isinf(X).any(), xp.isnan(X).any()])
    if infinite:
        raise ValueError(f"{name} contains infinity; only NaN marks a missing entry. Remove "
                         "or impute those entries first.")
    return bool(missing)


def refuse_missing_in_stream(X, estimator):
    """partial_fit's error for a batch with missing entries: its exact streaming
    adds up complete rows' mean and scatter (``fit`` takes missing entries)."""
    if has_missing(X):
        raise ValueError(
            f"{type(estimator).__name__}.partial_fit takes complete rows, and X has "
            "missing entries (NaN): its exact streaming adds up the rows' mean and "
            "scatter matrix, which a partly observed row does not have. Fit all the rows "
            "with fit, which marginalises missing entries by EM, or impute the batch.")


def check_masked_columns(counts):
    """Every feature must be observed in more than one row (``counts``: (D,), each
    feature's observed entries)."""
    bad = np.flatnonzero(counts < 2)
    if bad.size:
        raise ValueError(
            f"X has {bad.size} feature(s) observed in fewer than 2 rows (first: column "
            f"{bad[0]}, observed {counts[bad[0]]} time(s)); their mean and noise cannot be "
            "estimated. Drop those columns.")


class MaskedLinearGaussianEM:
    """:func:`fastlvm.em.fit_em` hooks for the missing-data model.

    Parameters
    ----------
    n_components : int
        Latent dimension q.
    isotropic : bool
        One noise variance (PPCA) or one per feature (factor analysis).
    tol, max_iter, verbose, random_state :
        The driver's settings (``tol`` on the mean log-likelihood per row).
    chunks : callable
        ``chunks(X.shape) -> iterable of (start, stop)`` row ranges
        (:func:`fastlvm._moments.row_ranges`).

    Attributes (after fitting)
    --------------------------
    mean_ : ndarray (D,)
    components_ : ndarray (q, D)
    noise_variance_ : ndarray (D,)
    """

    n_init = 1
    warm_start = False
    verbose_interval = 10

    def __init__(self, n_components, isotropic, tol, max_iter, verbose, random_state, chunks):
        self.n_components = n_components
        self.isotropic = isotropic
        self.tol = tol
        self.max_iter = max_iter
        self.verbose = verbose
        self.random_state = random_state
        self.chunks = chunks

    def _em_initialize(self, X, sample_weight, random_state):
        n, d = X.shape
        q = self.n_components
        xp = namespace(X)
        total = zeros_like(X, (d,))
        sums = zeros_like(X, (d,))
        for start, stop in self.chunks(X.shape):
            part = as_f64(X[start:stop])
            obs = ~xp.isnan(part)
            w = self._weights(X, sample_weight, start, stop)
            total += w @ as_f64(obs)
            sums += w @ xp.where(obs, part, 0.0)
        mean = sums / total
        scatter = zeros_like(X, (d, d))
        pairs = zeros_like(X, (d, d))
        for start, stop in self.chunks(X.shape):
            part = as_f64(X[start:stop]) - mean
            obs = as_f64(~xp.isnan(part))
            c = xp.where(obs > 0, part, 0.0)
            w = self._weights(X, sample_weight, start, stop)
            scatter += (c * w[:, None]).T @ c
            pairs += (obs * w[:, None]).T @ obs
        cov = to_numpy(scatter) / np.maximum(to_numpy(pairs), 1.0)
        if not (bool(xp.isfinite(mean).all()) and np.isfinite(cov).all()):
            raise overflow_error("The mean and pairwise covariances of X's observed entries")
        refuse_vanished_spread(float(np.diag(cov).max()), X, self.chunks, mean, sample_weight)
        mean = to_numpy(mean)
        floor = noise_floor(np.diag(cov), mean)
        self._noise_floor = np.full(d, floor.mean()) if self.isotropic else floor
        val, vec = np.linalg.eigh(0.5 * (cov + cov.T))
        val, vec = np.clip(val[::-1], 0.0, None), vec[:, ::-1]
        sigma2 = max(val[q:].mean(), float(self._noise_floor.max()))
        scale = np.sqrt(np.maximum(val[:q] - sigma2, 1e-3 * sigma2))
        self.mean_ = mean
        self.components_ = (vec[:, :q] * scale).T
        self.noise_variance_ = np.full(d, sigma2)

    @staticmethod
    def _weights(X, sample_weight, start, stop):
        """Rows start:stop's float64 weights, on X's device."""
        if sample_weight is None:
            return zeros_like(X, (stop - start,)) + 1.0
        return as_f64(sample_weight[start:stop])

    def _em_iteration(self, X, sample_weight):
        impl = resolve("masked_latent_stats", IMPLEMENTATIONS, X)[1]
        if is_device_array(X):
            stats, total = self._device_pass(impl, X, sample_weight)
        else:
            stats = None
            for start, stop in self.chunks(X.shape):
                sw = None if sample_weight is None else sample_weight[start:stop]
                part = impl(X[start:stop], self.mean_, self.components_,
                            self.noise_variance_, sw)
                stats = part if stats is None else tuple(a + b for a, b in zip(stats, part))
            stats = MaskedLatentStats(*stats)
            total = X.shape[0] if sample_weight is None else float(sample_weight.sum())
        self.mean_, self.components_, self.noise_variance_ = masked_m_step(
            stats, self.mean_, self.isotropic, self._noise_floor)
        return stats.log_likelihood / total

    def _device_pass(self, impl, X, sample_weight):
        """(MaskedLatentStats (NumPy), total weight) of one device pass over X (its
        backend takes the rows in chunks itself), read back from the device in
        one copy: one wait an iteration."""
        part = impl(X, self.mean_, self.components_, self.noise_variance_, sample_weight,
                    keep_on_device=True)
        total = X.shape[0] if sample_weight is None else as_f64(sample_weight).sum()
        *values, total = to_numpy_together([*part, total])
        return MaskedLatentStats(float(values[0]), *values[1:]), float(total)

    def _get_parameters(self):
        return self.mean_, self.components_, self.noise_variance_

    def _set_parameters(self, params):
        self.mean_, self.components_, self.noise_variance_ = params


def masked_m_step(stats, mean, isotropic, floor):
    """New mean (D,), components (q, D) and noise variances (D,) from the
    statistics; the noise variances are at least ``floor`` (D,) (one value
    repeated where ``isotropic``)."""
    q = stats.total_second.shape[0] - 1
    second = stats.total_second[None] - stats.missing_second  # (D, q+1, q+1)
    solution = np.linalg.solve(second, stats.cross[:, :, None])[:, :, 0]  # (D, q+1)
    residual = np.maximum(stats.sq - np.einsum("ij,ij->i", solution, stats.cross), 0.0)
    if isotropic:
        noise = np.full(mean.shape[0], max(residual.sum() / stats.n_observed.sum(),
                                           float(floor[0])))
    else:
        noise = np.maximum(residual / stats.n_observed, floor)
    return mean + solution[:, q], np.ascontiguousarray(solution[:, :q].T), noise
