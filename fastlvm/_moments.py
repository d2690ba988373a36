"""Weighted mean and scatter matrix of a (possibly memory-mapped) array, chunk by chunk.

Two passes over the rows: the mean, then sum_n w_n (x_n - mean)(x_n - mean)^T
around it, each chunk a GEMM in float64, never E[xx^T] - mean mean^T (which
loses the digits of data far from the origin).  PPCA and factor analysis fit
from these D x D statistics alone; the Bayesian mixture's default priors are
the same mean and covariance.  NumPy arrays, memory maps and torch tensors
(each chunk in float64 on the tensor's device; the results come back as NumPy).
Statistics that overflow (X finite, its values beyond what float64 can square and
sum) are refused with :func:`overflow_error`, never passed on as inf or NaN, and
so are statistics that underflow (:func:`underflow_error`: values so small that
their squares are subnormal numbers or zero, about 1e-146 in float64).
"""

from typing import NamedTuple

import numpy as np

from fastlvm import _config
from fastlvm._arrays import as_f64, to_numpy, zeros_like


def overflow_error(what, dtype="float64"):
    """The ValueError for statistics that left the range of ``dtype``.

    X itself is finite when this is raised (every estimator checks it first), so
    the cause is its magnitude: squares of values beyond about 1e154 in float64
    (2e19 in float32; less for the mixture of PPCA, whose statistics hold fourth
    powers) do not fit.

    Parameters
    ----------
    what : str
        The statistic, as the sentence's subject.
    dtype : str, NumPy or torch dtype
        The arithmetic's dtype.
    """
    return ValueError(
        f"{what} overflowed {_dtype_name(dtype)}: the values of X (or their spread) are "
        f"too large for the fit's arithmetic. {_SCALE_THE_DATA}.")


def underflow_error(what, dtype="float64"):
    """The ValueError for statistics that fell below the normal numbers of ``dtype``.

    X is finite and not constant when this is raised, so the cause is its
    magnitude: variances below the smallest normal number (about 2e-308 in
    float64, 1e-38 in float32) are subnormal numbers or zero, and the
    arithmetic built on them loses its digits or divides by zero.

    Parameters
    ----------
    what, dtype
        As for :func:`overflow_error`: the statistic, and the arithmetic's dtype.
    """
    name = _dtype_name(dtype)
    wider = ", or pass it as float64, whose range reaches far smaller values" * (
        name == "float32")
    return ValueError(
        f"{what} underflowed {name}: the values of X (or their spread) are too small "
        f"for the fit's arithmetic. {_SCALE_THE_DATA}{wider}.")


def refuse_underflow(largest_variance, dtype, what, power=1):
    """Raise :func:`underflow_error` when the largest of a model's variances is
    positive but, raised to ``power``, below ``dtype``'s smallest normal number
    (zero is a collapse, which the caller reports in its own words).

    Parameters
    ----------
    largest_variance : float
    dtype : str, NumPy or torch dtype
        The dtype of the arithmetic the variances feed.
    what : str
        The variances, as the sentence's subject.
    power : int, default=1
        The highest power of the variances the arithmetic forms (2 where it
        holds fourth powers of X's values).
    """
    if 0.0 < largest_variance < smallest_normal(dtype) ** (1.0 / power):
        raise underflow_error(what, dtype)


def smallest_normal(dtype):
    """The smallest positive normal number of ``dtype`` (NumPy or torch, by name)."""
    return float(np.finfo(np.dtype(_dtype_name(dtype))).tiny)


_SCALE_THE_DATA = ("Scale the input data first, for instance with "
                   "sklearn.preprocessing.StandardScaler (the model then describes the "
                   "scaled data)")


def _dtype_name(dtype):
    """'float32' for np.float32, np.dtype('float32'), torch.float32 or 'float32'."""
    if isinstance(dtype, type):
        dtype = np.dtype(dtype)
    return str(dtype).rsplit(".", 1)[-1]  # torch.float32 -> float32


def row_ranges(shape, chunk_size=None):
    """(start, stop) ranges covering the rows of an array of ``shape`` (n, D):
    ``chunk_size`` rows each, or by default as many as keep a chunk's float64
    copy within ``_config.ROW_COPY_BYTES`` (see :func:`fastlvm._config.chunk_rows`)."""
    n, d = shape
    chunk = _config.chunk_rows(d, chunk_size)
    return ((s, min(n, s + chunk)) for s in range(0, n, chunk))


def mean_and_scatter(X, chunks, sample_weight=None):
    """Total weight, weighted mean and scatter of the rows of X.

    Parameters
    ----------
    X : ndarray or tensor of shape (n_samples, n_features)
    chunks : callable
        ``chunks(X.shape) -> iterable of (start, stop)`` row ranges covering X
        (:func:`row_ranges` with the estimator's ``chunk_size``).
    sample_weight : ndarray or tensor of shape (n_samples,) or None

    Returns
    -------
    total : float
        n_samples, or the sum of the weights.
    mean : ndarray (n_features,), float64
    scatter : ndarray (n_features, n_features), float64
        sum_n w_n (x_n - mean)(x_n - mean)^T.
    """
    n, d = X.shape
    sw = None if sample_weight is None else as_f64(sample_weight)
    total = float(n) if sw is None else float(sw.sum())
    mean = zeros_like(X, (d,))
    scatter = zeros_like(X, (d, d))
    with np.errstate(over="ignore", invalid="ignore"):  # refused below, with the remedy
        for start, stop in chunks(X.shape):
            part = as_f64(X[start:stop])
            mean += part.sum(0) if sw is None else sw[start:stop] @ part
        mean /= total
        for start, stop in chunks(X.shape):
            c = as_f64(X[start:stop]) - mean
            wc = c if sw is None else c * sw[start:stop, None]
            scatter += wc.T @ c
    mean_out, scatter = to_numpy(mean), to_numpy(0.5 * (scatter + scatter.T))
    if not (np.isfinite(mean_out).all() and np.isfinite(scatter).all()):
        raise overflow_error("The mean and scatter matrix of X")
    if total > 0:
        refuse_vanished_spread(np.max(np.diag(scatter)) / total, X, chunks, mean, sw)
    return total, mean_out, scatter


# the smallest variance whose squares keep every digit: below it every
# feature's scatter is made of subnormal numbers or zeros
_DIGITS_KEPT = float(np.finfo(np.float64).tiny / np.finfo(np.float64).eps)


def refuse_vanished_spread(largest_variance, X, chunks, mean, sample_weight=None):
    """Refuse X whose variances (float64) lost their digits to underflow.

    When even the largest feature variance is below tiny / eps (about 1e-292:
    deviations from the mean below about 1e-146), X is refused with
    :func:`underflow_error` unless it is constant (no observed entry of a row
    of positive weight differs from the mean by more than the mean's rounding),
    which the models report in their own words.  The check costs one more pass,
    on that rare path only.

    Parameters
    ----------
    largest_variance : float
    X : ndarray or tensor of shape (n_samples, n_features)
        NaN entries (missing) are skipped.
    chunks : callable
        ``chunks(X.shape) -> iterable of (start, stop)`` row ranges covering X.
    mean : ndarray or tensor of shape (n_features,), float64
    sample_weight : ndarray or tensor of shape (n_samples,), float64, or None
    """
    if not largest_variance < _DIGITS_KEPT:
        return
    # a constant feature's deviations are the rounding of its mean, a few ulps
    rounding = 64.0 * np.finfo(np.float64).eps * abs(mean)
    for start, stop in chunks(X.shape):
        c = as_f64(X[start:stop]) - mean
        if sample_weight is not None:
            c = c[sample_weight[start:stop] > 0]
        if bool((abs(c) > rounding).any()):  # NaN compares False
            raise underflow_error("The variances of X")


class RunningMoments(NamedTuple):
    """The moments exact streaming fits from: rows seen, their (weighted) mean and
    scatter.  Immutable: an update makes a new one, so an estimator that holds
    it rebinds one attribute (and :func:`fastlvm._restore.restored_on_error`
    can put it back).

    Attributes
    ----------
    rows : int
        Rows seen (whatever their weights).
    total : float
        Their total weight (``rows`` without weights).
    mean : ndarray of shape (n_features,)
    scatter : ndarray of shape (n_features, n_features)
    """

    rows: int
    total: float
    mean: np.ndarray
    scatter: np.ndarray

    @classmethod
    def of(cls, X, chunks, sample_weight=None):
        """The moments of the rows of X (see :func:`mean_and_scatter`)."""
        return cls(X.shape[0], *mean_and_scatter(X, chunks, sample_weight))

    def merged(self, batch):
        """The moments of these rows and ``batch``'s together.

        Chan, Golub & LeVeque's pairwise update, in float64: the scatter gains
        delta delta^T t0 t1 / (t0 + t1), delta the difference of the means, so
        rows far from the origin keep their digits, and batches merged in any
        grouping give the statistics of all their rows (to rounding).
        """
        t0, t1 = self.total, batch.total
        total = t0 + t1
        delta = batch.mean - self.mean
        with np.errstate(over="ignore", invalid="ignore"):
            scatter = self.scatter + batch.scatter + np.outer(delta, delta) * (t0 * t1 / total)
            mean = self.mean + delta * (t1 / total)
        if not (np.isfinite(mean).all() and np.isfinite(scatter).all()):
            raise overflow_error("The mean and scatter matrix of the rows seen")
        return RunningMoments(self.rows + batch.rows, total, mean, scatter)

    @property
    def covariance(self):
        """The (weighted) covariance of the rows, scatter / total, (D, D)."""
        return self.scatter / self.total


def continues_a_fit(estimator):
    """Whether a ``partial_fit`` call adds to ``estimator``'s ``_moments`` (False for
    an unfitted one: its first batch starts them).

    Raises
    ------
    ValueError
        For an estimator fitted on rows with missing entries, whose EM fit keeps
        no moments to add to.
    """
    if not hasattr(estimator, "components_"):
        return False
    if getattr(estimator, "_moments", None) is None:
        name = type(estimator).__name__
        raise ValueError(
            f"This {name} was fitted on rows with missing entries (NaN) by EM, which keeps "
            f"no running mean and scatter matrix for partial_fit to add to. Fit a new "
            f"{name} with partial_fit on complete rows, or call fit on all the rows.")
    return True
