"""Vectorisable softplus pieces for Numba loops: log1p on [0, 1].

Design: a Bernoulli log-likelihood on logits needs
softplus(l) = max(l, 0) + log1p(exp(-|l|)) and sigmoid(l) per pixel.  libm's
``log1p`` is an opaque call that stops LLVM from vectorising the loop (as
``exp`` does, see :mod:`._numba_support`), so it is written out here for the
only range the logistic function needs, e in [0, 1].

- float64: with y = 1 + e,
  - e <= sqrt(2) - 1:  log y = 2 atanh(u), u = e / (e + 2);
  - e >  sqrt(2) - 1:  log y = log 2 + 2 atanh(u), u = (e - 1) / (e + 3),
  so |u| <= 3 - 2 sqrt(2) = 0.1716 and the atanh series 2u (1 + u^2/3 + u^4/5 ...)
  converges by a factor 0.0294 per term: 10 terms give 1e-17 relative.  The
  branch is arithmetic (big in {0, 1} enters the formulas as a number: no jump,
  no select), and u is formed exactly relative to e, so log1p(e) keeps its
  digits for tiny e.
- float32: log1p(e) = e + e^2 r(e), r a degree-7 polynomial (a weighted
  Chebyshev least-squares fit of (log1p(e) / e - 1) / e on [0, 1]) in Estrin's
  form: no division and a short dependency chain.  One thread, cycles per eight
  pixels of the Bernoulli pixel loop: with the gradient 22.7 against 26.5 for
  the atanh form (Horner's form of the same polynomial: 23-33), without it
  16.5 against 18.1 (Horner: 20.0).  Error, evaluated in float32: at most
  1.2e-7 absolute and four float32 ulps (the atanh form: about one), and
  exactly e for e < 1e-8.  The reconstruction sums add these terms in float64,
  where the row sums stayed within 2e-8 relative of the float64 reference.

Limits: the argument must lie in [0, 1] (it is exp(-|l|) at every call site);
NaN propagates.
"""

import numpy as np
from numba import types
from numba.extending import overload

from ._numba_support import FASTMATH


# float32: log1p(e) = e + e^2 r(e), r's coefficients (see the module doc)
_R0, _R1, _R2, _R3, _R4, _R5, _R6, _R7 = (np.float32(c) for c in (
    -4.9998726440e-01, 3.3304456722e-01, -2.4740820351e-01, 1.8749154119e-01,
    -1.2972146006e-01, 7.0685077072e-02, -2.5163893014e-02, 4.2068218698e-03))


def log1p_unit(e):
    """log(1 + e) for 0 <= e <= 1 inside compiled loops (see module doc)."""
    return np.log1p(e)


@overload(log1p_unit, inline="always", fastmath=FASTMATH)
def _log1p_unit_overload(e):
    if e == types.float32:

        def impl32(e):
            e2 = e * e
            e4 = e2 * e2
            r = ((_R0 + e * _R1) + e2 * (_R2 + e * _R3)) + e4 * (
                (_R4 + e * _R5) + e2 * (_R6 + e * _R7))
            return e + e2 * r

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
