"""Vectorisable softplus pieces for Numba loops: log1p on [0, 1].

Design: a Bernoulli log-likelihood on logits needs
softplus(l) = max(l, 0) + log1p(exp(-|l|)) and sigmoid(l) per pixel.  libm's
``log1p`` is an opaque call that stops LLVM from vectorising the loop (as
``exp`` does, see :mod:`._numba_support`), so it is written out here for the
only range the logistic function needs, e in [0, 1]: with y = 1 + e,

- e <= sqrt(2) - 1:  log y = 2 atanh(u), u = e / (e + 2);
- e >  sqrt(2) - 1:  log y = log 2 + 2 atanh(u), u = (e - 1) / (e + 3),

so |u| <= 3 - 2 sqrt(2) = 0.1716 and the atanh series 2u (1 + u^2/3 + u^4/5 ...)
converges by a factor 0.0294 per term: 10 terms give 1e-17 relative in float64,
4 terms 2e-9 in float32.  The branch is arithmetic (big in {0, 1} enters the
formulas as a number: no jump, no select), and u is formed exactly relative to e, so log1p(e) keeps its digits for tiny e.
Limits: the argument must lie in [0, 1] (it is exp(-|l|) at every call site);
NaN propagates.
"""

import numpy as np
from numba import types
from numba.extending import overload

from ._numba_support import FASTMATH


def log1p_unit(e):
    """log(1 + e) for 0 <= e <= 1 inside compiled loops (see module doc)."""
    return np.log1p(e)


@overload(log1p_unit, inline="always", fastmath=FASTMATH)
def _log1p_unit_overload(e):
    if e == types.float32:

        def impl32(e):
            big = np.float32(e > np.float32(0.41421356))
            u = (e - big) / (e + np.float32(2.0) + big)
            u2 = u * u
            series = np.float32(1.0) + u2 * (np.float32(1 / 3) + u2 * (
                np.float32(1 / 5) + u2 * (np.float32(1 / 7) + u2 * np.float32(1 / 9))))
            return big * np.float32(0.6931471805599453) + np.float32(2.0) * u * series

        return impl32

    if e == types.float64:

        def impl64(e):
            big = np.float64(e > 0.41421356237309503)
            u = (e - big) / (e + 2.0 + big)
            u2 = u * u
            series = 1.0 + u2 * (1 / 3 + u2 * (1 / 5 + u2 * (1 / 7 + u2 * (1 / 9 + u2 * (
                1 / 11 + u2 * (1 / 13 + u2 * (1 / 15 + u2 * (1 / 17 + u2 * (
                    1 / 19 + u2 * (1 / 21))))))))))
            return big * 0.6931471805599453 + 2.0 * u * series

        return impl64
    return None
