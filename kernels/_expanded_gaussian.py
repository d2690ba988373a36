"""The expanded (GEMM-shaped) form of the Gaussian log-density, for the GPU backends.

With rows shifted by one centre, x' = x - c0, and each mean by the same,
mu'_k = mu_k - c0, the weighted log-density log w_k + log N(x | mu_k, Sigma_k) is

- 'spherical':  x' . a_k + s_k |x'|^2 + c_k,           a_k = p_k^2 mu'_k, s_k = -p_k^2 / 2
- 'diag':       x' . a_k + (x' * x') . b_k + c_k,       a_k = P_k^2 * mu'_k, b_k = -P_k^2 / 2
- 'tied':       x' . a_k - |x' U|^2 / 2 + c_k,          a_k = U U^T mu'_k
- 'full':       -|(x' - mu'_k) U_k|^2 / 2 + c_k         (a_k = mu'_k, taken directly)

so a tile of rows against a tile of components is one matrix product plus a
per-row term.  ``c_k`` folds the log-weight, log|U_k|, -D/2 log 2 pi and the
|mu'_k|^2 terms.  The Triton and CuPy backends both build their coefficients
here; this module imports neither: it is written with operators and functions
that NumPy, CuPy and torch share, in the namespace ``xp`` the caller passes.

The form's limit: its terms grow with |x'|^2, so where the means lie many
standard deviations from c0 rounding takes digits from the log-densities and
the moments summed around c0 (``CENTRE_LOSS_PER_EPS``; ``centre_spread``, on
NumPy parameters, measures how far they lie).  float32 data whose parameters
would lose more than that is computed in float64 (:func:`computes_in_float64`):
the kernels load the float32 rows and convert them in registers.
"""

import math
from typing import Any, NamedTuple

import numpy as np

LOG_2PI = math.log(2.0 * math.pi)


class ExpandedTerms(NamedTuple):
    """Coefficients of the expanded log-density (see :func:`expanded_terms`)."""

    a: Any
    b: Any
    s: Any
    c: Any


def shift_weights(log_weights, xp):
    """Normalised weights for the shift c0 = sum_k w_k mu_k / sum_k w_k, shape (K,)."""
    w = xp.exp(log_weights - log_weights.max())
    return w / w.sum()


def statistics_centers(c0, mu, covariance_type):
    """The centres the E-step's statistics are taken around, float64: c0 + mu'_k
    (K, D) for 'full' (its differences x' - mu'_k are taken directly), the one shift
    c0 (D,) otherwise.  ``c0`` (D,) and ``mu`` (K, D) are float64, as applied."""
    return c0[None, :] + mu if covariance_type == "full" else c0


def expanded_terms(mu, precisions_cholesky, covariance_type, log_weights, xp):
    """Coefficients of the expanded log-density, float64, unpadded.

    Parameters
    ----------
    mu : array (K, D), float64
        The shifted means mu'_k as the kernel applies them (already rounded to
        the data's dtype).
    precisions_cholesky : array, float64, sklearn's shape for the covariance type
    covariance_type : {'full', 'tied', 'diag', 'spherical'}
    log_weights : array (K,), float64 (-inf for a zero weight)
    xp : module
        numpy, cupy or torch: the namespace of the arrays.

    Returns
    -------
    ExpandedTerms (a, b, s, c):

    a : array (K, D)
        Linear coefficients ('full': mu'_k itself).
    b : array (K, D) or None
        'diag' coefficients of x' * x'.
    s : array (K,), float or None
        Coefficient of the per-row quadratic term: -p_k^2 / 2 ('spherical'),
        -1/2 ('tied', a float), None otherwise.
    c : array (K,)
        The constants c_k.
    """
    d = mu.shape[1]
    pc = precisions_cholesky
    const = log_weights - 0.5 * d * LOG_2PI
    if covariance_type == "spherical":
        p2 = pc**2
        return ExpandedTerms(p2[:, None] * mu, None, -0.5 * p2,
                             const + d * xp.log(pc) - 0.5 * p2 * (mu**2).sum(1))
    if covariance_type == "diag":
        p2 = pc**2
        return ExpandedTerms(p2 * mu, -0.5 * p2, None,
                             const + xp.log(pc).sum(1) - 0.5 * (p2 * mu**2).sum(1))
    if covariance_type == "tied":
        log_det = xp.log(xp.einsum("ii->i", pc)).sum()
        return ExpandedTerms(mu @ (pc @ pc.T), None, -0.5,
                             const + log_det - 0.5 * ((mu @ pc)**2).sum(1))
    return ExpandedTerms(mu, None, None, const + xp.log(xp.einsum("kii->ki", pc)).sum(1))


# The limit of this form: its terms grow with |x'|^2, so second moments summed
# around one common centre lose up to about this fraction of eps * kappa
# (relative) to rounding, kappa from :func:`centre_spread` (the log-densities
# lose about eps * kappa nats): measured 0.003-0.25 for the Numba 'tied' pass
# before it took anchors (float32, D = 2-40, K = 3-20) and 0.1-0.16 for Triton's
# 'diag', 'spherical' and 'tied' (interpreter, float32, D = 5, K = 6), at
# separations of 3 to 1000 standard deviations.  float32 data is computed in
# float64 well before (FLOAT32_EXPANSION_LIMIT); GaussianMixture warns where the
# loss in the dtype computed in still passes 1e-3
# (``fastlvm.mixture._base.warn_centre_loss``: float64 at millions of deviations).
CENTRE_LOSS_PER_EPS = 0.25


def centre_spread(means, centre, precisions_cholesky, covariance_type):
    """kappa = max_k |mu_k - c|^2 in component k's precision metric: how far the
    farthest mean lies from the statistics' common centre, in its own standard
    deviations, squared.  NumPy in, float out (0.0 for no components).

    Parameters
    ----------
    means : array (K, D)
    centre : array (D,)
    precisions_cholesky : array, sklearn's shape for the covariance type
    covariance_type : {'full', 'tied', 'diag', 'spherical'}
    """
    m = np.asarray(means, dtype=np.float64) - np.asarray(centre, dtype=np.float64)
    if m.size == 0:
        return 0.0
    pc = np.asarray(precisions_cholesky, dtype=np.float64)
    return float(np.max(component_spreads(m, pc, covariance_type)))


def component_spreads(mu, precisions_cholesky, covariance_type):
    """kappa_k = |mu'_k|^2 in component k's precision metric, (K,), for the shifted
    means ``mu`` (K, D); float64 arrays of one namespace (NumPy, torch or cupy),
    computed there.  The fused M-steps report these for the next E-step ('full' as
    zeros there: its differences are taken directly)."""
    m, pc = mu, precisions_cholesky
    if covariance_type == "spherical":
        return (m * m).sum(1) * pc * pc
    if covariance_type == "diag":
        return ((m * pc) ** 2).sum(1)
    if covariance_type == "tied":
        return ((m @ pc) ** 2).sum(1)
    from fastlvm._arrays import namespace

    return (namespace(m).einsum("kd,kde->ke", m, pc) ** 2).sum(1)


# float32 data is computed in float64 where eps * kappa passes this: below it the
# expanded form loses at most CENTRE_LOSS_PER_EPS * 2e-4 = 5e-5 (relative) of the
# second moments, a quarter of the float32 tolerance of the tests, and the
# log-densities about 2e-4 nats.  It is the point where the Numba 'tied' pass
# takes anchors (``estep_stats/_numba.py``): about 40 standard deviations.  The
# GPU benchmarks' data (integer offsets 0-3 on every feature) stay below it
# (eps * kappa = 3.4e-5 at D = 128).
FLOAT32_EXPANSION_LIMIT = 2e-4


def computes_in_float64(is_float32, log_weights, means, precisions_cholesky, covariance_type):
    """Whether the GPU kernels compute float32 data in float64: 'tied', 'diag' or
    'spherical' parameters whose means lie so far from their common centre c0
    (the weighted mean of the means) that eps32 * kappa > FLOAT32_EXPANSION_LIMIT,
    kappa from :func:`centre_spread`.  float64 data and 'full' (whose
    differences are taken directly) never are.

    Computed where the parameters are (one read of a number from a device):
    on the host, 'tied' at K = 1024, D = 128 took 8 ms, most of an E-step.

    On Hopper float64 runs at the rate of IEEE float32 on the CUDA cores
    (H100/H200: 67 TFLOPS float64 tensor cores, 34 vector), so this costs those
    mixtures a few times their float32 E-step (tensor-core 'tf32x3' products
    become float64 ones), not the 64x of consumer GPUs.

    Parameters
    ----------
    is_float32 : bool
    log_weights : array (K,) or None (uniform)
    means : array (K, D)
    precisions_cholesky : array, sklearn's shape for the covariance type
    covariance_type : {'full', 'tied', 'diag', 'spherical'}
        Arrays of one kind and device (NumPy, torch or cupy), computed there in
        float64.
    """
    if not is_float32 or covariance_type == "full":
        return False
    from fastlvm._arrays import as_f64, namespace

    means = as_f64(means)  # no copy when it is float64 already
    if means.shape[0] == 0:
        return False
    pc = as_f64(precisions_cholesky)
    log_w = means[:, 0] * 0.0 if log_weights is None else as_f64(log_weights)
    centre = shift_weights(log_w, namespace(means)) @ means
    kappa = component_spreads(means - centre, pc, covariance_type).max()
    return kappa_needs_float64(float(kappa))


def kappa_needs_float64(kappa):
    """Whether float32 data of spread ``kappa`` (:func:`centre_spread`) is computed in
    float64 (:func:`computes_in_float64`)."""
    return float(np.finfo(np.float32).eps) * float(kappa) > FLOAT32_EXPANSION_LIMIT
