"""The one EM fit loop shared by every EM/VB model.

A model supplies only its statistics pass and M-step through four methods:

``_em_initialize(X, sample_weight, random_state)``
    Set initial parameters.
``_em_iteration(X, sample_weight) -> float``
    One E-step pass (statistics under the current parameters) followed by
    the M-step; returns the bound under the parameters *before* the M-step
    (the mean log-likelihood, for EM), exactly as sklearn records it.
``_get_parameters() / _set_parameters(params)``
    Snapshot and restore the fitted parameters (the best of ``n_init``).

The driver owns restarts (``n_init``), ``warm_start``, the ``tol`` test on the
change of the bound, ``max_iter``, ``ConvergenceWarning``, ``lower_bound_``
and the ``lower_bounds_`` history, sklearn's verbose output and an optional
per-iteration callback (progress bars).  A bound that is not finite, or
parameters that are not after a start's last M-step (X is finite, so the model's
statistics overflowed), stop the fit with a ValueError that says to scale the data.
"""

import warnings
from time import time

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_random_state

from ._arrays import is_device_array, namespace, to_numpy_together
from ._config import serial_blas
from ._moments import overflow_error

NOT_CONVERGED = ("Best performing initialization did not converge. Try different init "
                 "parameters, or increase max_iter, tol, or check for degenerate data.")


def fit_em(model, X, sample_weight=None, callback=None):
    """Fit ``model`` by EM, keeping the best of its restarts.

    Parameters
    ----------
    model : estimator
        Provides the methods listed in the module docstring and the attributes
        ``n_init, max_iter, tol, warm_start, verbose, verbose_interval,
        random_state``.
    X : ndarray of shape (n_samples, n_features)
        Validated data (or the device rows a model's methods take).  A host
        array in another layout than C is copied into C order once: every
        iteration passes over the rows, and the host kernels read them a row at
        a time (Fortran-ordered rows, a DataFrame's values, took up to 1.57x as
        long a PPCA fit).
    sample_weight : ndarray of shape (n_samples,) or None
    callback : callable or None
        ``callback(init, n_iter, lower_bound, change)`` after every iteration.

    Returns
    -------
    model
        With ``converged_, n_iter_, lower_bound_, lower_bounds_`` set and the
        best parameters in place.
    """
    if isinstance(X, np.ndarray):
        X = np.ascontiguousarray(X)
    with serial_blas():
        return _fit_em(model, X, sample_weight, callback)


def _fit_em(model, X, sample_weight, callback):
    do_init = not (model.warm_start and hasattr(model, "converged_"))
    n_init = model.n_init if do_init else 1
    max_lower_bound = -np.inf
    best_lower_bounds = []
    best_params, best_n_iter = None, 0
    model.converged_ = False
    random_state = check_random_state(model.random_state)
    reporter = _VerboseReporter(model.verbose, model.verbose_interval)

    for init in range(n_init):
        reporter.init_begin(init)
        if do_init:
            model._em_initialize(X, sample_weight, random_state)
        lower_bound = -np.inf if do_init else model.lower_bound_
        current_lower_bounds = []
        if model.max_iter == 0:
            best_params = model._get_parameters()
            best_n_iter = 0
            continue
        converged = False
        for n_iter in range(1, model.max_iter + 1):
            prev_lower_bound = lower_bound
            lower_bound = model._em_iteration(X, sample_weight)
            if not np.isfinite(lower_bound):  # X is finite: its statistics overflowed
                raise overflow_error(f"The log-likelihood bound at iteration {n_iter} "
                                     f"({lower_bound})", X.dtype)
            current_lower_bounds.append(lower_bound)
            change = lower_bound - prev_lower_bound
            reporter.iteration_end(n_iter, change)
            if callback is not None:
                callback(init, n_iter, lower_bound, change)
            if abs(change) < model.tol:
                converged = True
                break
        # the last M-step's parameters have no bound after them to show an overflow
        if not _all_finite(model._get_parameters()):
            raise overflow_error(f"The parameters after iteration {n_iter}", X.dtype)
        reporter.init_end(lower_bound, converged)
        if lower_bound > max_lower_bound or max_lower_bound == -np.inf:
            max_lower_bound = lower_bound
            best_params = model._get_parameters()
            best_n_iter = n_iter
            best_lower_bounds = current_lower_bounds
            model.converged_ = converged

    if not model.converged_ and model.max_iter > 0:
        warnings.warn(NOT_CONVERGED, ConvergenceWarning)
    model._set_parameters(best_params)
    model.n_iter_ = best_n_iter
    model.lower_bound_ = max_lower_bound
    model.lower_bounds_ = best_lower_bounds
    return model


def _all_finite(values):
    """Whether every number in ``values`` (a model's ``_get_parameters()``: arrays
    of any kind, floats, nested tuples) is finite; the device arrays' flags are
    read back in one copy."""
    flags = []
    for v in _flattened(values):
        if is_device_array(v):
            flags.append(namespace(v).isfinite(v).all())
        elif not np.isfinite(v).all():
            return False
    return not flags or bool(np.all(to_numpy_together(flags)))


def _flattened(values):
    for v in values:
        if isinstance(v, tuple):
            yield from _flattened(v)
        else:
            yield v


class _VerboseReporter:
    """sklearn's verbose messages, word for word."""

    def __init__(self, verbose, interval):
        self.verbose, self.interval = verbose, interval
        self._init_start = self._iter_start = time()

    def init_begin(self, init):
        if self.verbose >= 1:
            print("Initialization %d" % init)
            self._init_start = self._iter_start = time()

    def iteration_end(self, n_iter, change):
        if n_iter % self.interval == 0:
            if self.verbose == 1:
                print("  Iteration %d" % n_iter)
            elif self.verbose >= 2:
                now = time()
                print("  Iteration %d\t time lapse %.5fs\t ll change %.5f"
                      % (n_iter, now - self._iter_start, change))
                self._iter_start = now

    def init_end(self, lower_bound, converged):
        msg = "converged" if converged else "did not converge"
        if self.verbose == 1:
            print(f"Initialization {msg}.")
        elif self.verbose >= 2:
            print(f"Initialization {msg}. time lapse {time() - self._init_start:.5f}s\t "
                  f"lower bound {lower_bound:.5f}.")
