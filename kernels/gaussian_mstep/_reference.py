"""NumPy float64 reference for ``gaussian_mstep``: the specification.

From the per-split partials of the statistics kernel to the new mixture
parameters and the next E-step's expanded coefficients, in the order the
unfused pipeline takes: sum the partials, the M-step of
``fastlvm.mixture._gaussian_params``, the precision factors (1 / sqrt of the
covariance, or the inverse Cholesky factor), then the coefficients of
``kernels._expanded_gaussian`` around the new shift c0 = sum_k w_k mu_k, which
is rounded to the data's dtype as the E-step kernel applies it.
"""

from typing import Any, NamedTuple

import numpy as np
from scipy import linalg

from .._covariance import shift_second_moment
from .._expanded_gaussian import component_spreads, expanded_terms


class MStepResult(NamedTuple):
    """The M-step's parameters and the next E-step's coefficients.

    NumPy arrays from the reference; tensors on the partials' device from the
    Triton kernels, whose coefficients are padded to BLOCK_D columns (zeros)
    and rounded to the data's dtype.

    Attributes
    ----------
    summary : (3 + K,) float64
        [log-likelihood (the sum of the partials), count of covariance entries
        that are not finite, count that are not positive], then each
        component's kappa_k, |mu'_k|^2 in its precision's metric around the
        next shift (0 for 'full'; ``_expanded_gaussian.component_spreads``, by
        which float32 coefficients are seen to need float64): read in one transfer.
    weights : (K,) float64, summing to one
    means : (K, D) float64
    covariances : sklearn's shape for the covariance type, float64
    precisions_cholesky : same shape (sklearn's upper-triangular factors)
    shift : (D,) the next E-step's centre c0 = sum_k w_k mu_k, rounded to the dtype
    linear : (K, D) coefficients a_k of x' (``kernels._expanded_gaussian``;
        'full': mu'_k = mu_k - c0 itself)
    quadratic : (K, D) 'diag' b_k, (K,) 'spherical' s_k; the factor U of the
        quadratic form for 'tied' (D, D) and 'full' (K, D, D)
    constant : (K,) c_k, the log-weight included
    """

    summary: Any
    weights: Any
    means: Any
    covariances: Any
    precisions_cholesky: Any
    shift: Any
    linear: Any
    quadratic: Any
    constant: Any


def gaussian_mstep_ref(nk_parts, s1_parts, s2_parts, ll_parts, center, covariance_type,
                       reg_covar, eps, dtype):
    """The M-step from E-step partials, and the next E-step's coefficients, in float64.

    Parameters
    ----------
    nk_parts : ndarray (S, K)
        Per-split sum_n w_n r_nk.
    s1_parts : ndarray (S, K, BLOCK_D)
        Per-split sum_n w_n r_nk (x_n - c_k); columns past D are zero.
    s2_parts : ndarray
        Per-split second moments around the centres: (S, K, BLOCK_D, BLOCK_D)
        'full', (S', BLOCK_D, BLOCK_D) 'tied' (sum_n w_n x'_n x'_n^T over every
        component), (S, K, BLOCK_D) 'diag', (S, K) 'spherical'.
    ll_parts : ndarray (P,)
        Partial log-likelihoods, summed for the bound.
    center : ndarray, float64
        The centres c_k of the partials: (K, D) for 'full' (c0 + mu'_k), the
        one shift c0, (D,), otherwise.
    covariance_type : {'full', 'tied', 'diag', 'spherical'}
    reg_covar : float
    eps : float
        Machine epsilon of the data's dtype (10 eps is added to N_k).
    dtype : numpy dtype
        The data's dtype: the shift and the coefficients are rounded to it.

    Returns
    -------
    MStepResult of NumPy arrays, unpadded.  ``summary[2]`` counts covariance
    entries that are not positive ('diag', 'spherical') or covariances whose
    Cholesky factorisation failed ('full', 'tied'); a failed factor is NaN.
    """
    if covariance_type not in ("full", "tied", "diag", "spherical"):
        raise ValueError(f"covariance_type={covariance_type!r}; use 'full', 'tied', 'diag' "
                         "or 'spherical'.")
    nk = np.asarray(nk_parts, dtype=np.float64).sum(0)
    k = nk.shape[0]
    centers = np.broadcast_to(np.asarray(center, dtype=np.float64), (k, center.shape[-1]))
    d = centers.shape[1]
    s1 = np.asarray(s1_parts, dtype=np.float64)[:, :, :d].sum(0)
    s2 = np.asarray(s2_parts, dtype=np.float64).sum(0)
    s2 = {"full": lambda a: a[:, :d, :d], "tied": lambda a: a[:d, :d],
          "diag": lambda a: a[:, :d]}.get(covariance_type, lambda a: a)(s2)
    nk_eps = nk + 10 * eps
    sum_x = s1 + nk[:, None] * centers
    means = sum_x / nk_eps[:, None]
    scatter = shift_second_moment(nk, sum_x, s2, centers, means, covariance_type)
    if covariance_type == "full":
        cov = scatter / nk_eps[:, None, None] + reg_covar * np.eye(d)
    elif covariance_type == "tied":
        cov = scatter / nk_eps.sum() + reg_covar * np.eye(d)
    elif covariance_type == "diag":
        cov = scatter / nk_eps[:, None] + reg_covar
    else:
        cov = scatter / (nk_eps * d) + reg_covar
    if covariance_type in ("full", "tied"):
        cov = 0.5 * (cov + cov.swapaxes(-1, -2))
    weights = nk_eps / nk_eps.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        n_nonfinite = int(np.sum(~np.isfinite(cov)))
        if covariance_type in ("full", "tied"):
            pc, n_failed = _precision_factors(cov)
        else:
            pc = 1.0 / np.sqrt(cov)
            n_failed = int(np.sum(~(cov > 0.0)))
        new_c0 = (weights[:, None] * means).sum(0).astype(dtype).astype(np.float64)
        mu = (means - new_c0).astype(dtype).astype(np.float64)
        terms = expanded_terms(mu, pc, covariance_type, np.log(weights), np)
    quadratic = {"diag": terms.b, "spherical": terms.s}.get(covariance_type, pc)
    with np.errstate(invalid="ignore", over="ignore"):  # a failed factor is NaN
        spreads = (np.zeros(k) if covariance_type == "full"
                   else component_spreads(mu, pc, covariance_type))
    summary = np.concatenate([[np.asarray(ll_parts, dtype=np.float64).sum(), n_nonfinite,
                               n_failed], spreads])
    return MStepResult(summary, weights, means, cov, pc, new_c0, terms.a, quadratic, terms.c)


def _precision_factors(cov):
    """Upper U with U U^T = inv(cov), for a (D, D) or (K, D, D) stack, as
    ``precision_cholesky`` computes it; NaN where the factorisation fails, and
    how many failed."""
    stack = cov if cov.ndim == 3 else cov[None]
    out = np.full_like(stack, np.nan)
    failed = 0
    for i, c in enumerate(stack):
        try:
            lower = linalg.cholesky(c, lower=True)
        except (linalg.LinAlgError, ValueError):  # not positive definite, or not finite
            failed += 1
            continue
        out[i] = linalg.solve_triangular(lower, np.eye(c.shape[0]), lower=True).T
    return (out if cov.ndim == 3 else out[0]), failed
