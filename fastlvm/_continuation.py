"""Continuing a fit (``warm_start``, ``partial_fit``) only with the parameters it was
made for.

An estimator's fitted state (a mixture's arrays, a VAE's networks and training
step) is built for some of its parameters: the number of components, the
covariance type, the likelihood, the network sizes.  ``set_params`` can change
them between calls; a continuation that went on with the old state kept the
old structure without a word, broke on NumPy's broadcasting, or (a VAE's fused
step, which fixes the objective and likelihood when it is built) trained
another model than the parameters say.  Estimators list those parameters in
``_STRUCTURE``, record them when a fit ends, and check them before continuing.
The mixtures also use :func:`same_value` and :func:`snapshot` to notice a prior
changed between ``partial_fit`` steps, which they set again.
"""

import copy

import numpy as np


def same_value(a, b):
    """Whether two parameter values are the same: the same object, equal, lists
    or tuples of equal entries (``[256]`` is ``(256,)``), or arrays (or dicts of
    them) with equal entries."""
    if a is b:
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b)
    except (TypeError, ValueError):  # arrays: elementwise ==
        try:
            return np.array_equal(np.asarray(a), np.asarray(b))
        except (TypeError, ValueError):
            return False


def snapshot(value):
    """A copy of a parameter value that later in-place edits of it do not reach
    (modules are kept as they are: they are compared by identity)."""
    return value if hasattr(value, "state_dict") else copy.deepcopy(value)


class ContinuationMixin:
    """``_record_structure`` after a fit, ``_check_structure`` before continuing it."""

    _STRUCTURE = ()

    def _record_structure(self):
        """Note the values of the parameters the fitted state was made for."""
        self._fitted_structure = {name: snapshot(self._structure_value(name))
                                  for name in self._STRUCTURE}

    def _structure_value(self, name):
        """A structural parameter's value as the fitted state reads it (an
        estimator whose parameter has two spellings of one value gives one)."""
        return getattr(self, name)

    def _check_structure(self):
        """Refuse to continue a fit whose structural parameters were changed since
        (by ``set_params``): its state was made for the old values."""
        fitted = getattr(self, "_fitted_structure", None) or {}
        for name, value in fitted.items():
            now = self._structure_value(name)
            if not same_value(now, value):
                raise ValueError(
                    f"{name} changed from {value!r} to {now!r} since the model was "
                    f"fitted; {self._CONTINUATIONS} continue the fit, whose state was "
                    f"made for {name}={value!r}. Call fit{self._AFRESH} to fit afresh, or "
                    "set it back.")

    # how the estimator's docs name its continuations and a fresh fit
    _CONTINUATIONS = "partial_fit and warm_start"
    _AFRESH = " with warm_start=False"
