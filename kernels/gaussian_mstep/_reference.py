"""NumPy float64 reference for ``gaussian_mstep``: the specification.

From the per-split partials of the statistics kernel to the new mixture
parameters and the next E-step's expanded coefficients, in the order the
unfused pipeline takes: sum the partials, the M-step of
``fastlvm.mixture._gaussian_params`` ('diag' and 'spherical'), the precision
factors 1 / sqrt(covariance), then the coefficients of
``kernels._expanded_gaussian`` around the new shift c0 = sum_k w_k mu_k, which
is rounded to the data's dtype as the E-step kernel applies it.
"""

from typing import Any, NamedTuple

import numpy as np

from .._covariance import shift_second_moment
from .._expanded_gaussian import expanded_terms


class MStepResult(NamedTuple):
    """The M-step's parameters and the next E-step's coefficients.

    NumPy arrays from the reference; tensors on the partials' device from the
    Triton kernels, whose coefficients are padded to BLOCK_D columns (zeros)
    and rounded to the data's dtype.

    Attributes
    ----------
    summary : (3,) float64
        [log-likelihood (the sum of the partials), count of covariance entries
        that are not finite, count that are not positive]: read in one transfer.
    weights : (K,) float64, summing to one
    means : (K, D) float64
    covariances : (K, D) 'diag', (K,) 'spherical'; float64
    precisions_cholesky : same shape, 1 / sqrt(covariances)
    shift : (D,) the next E-step's centre c0 = sum_k w_k mu_k, rounded to the dtype
    linear : (K, D) coefficients a_k of x' (``kernels._expanded_gaussian``)
    quadratic : (K, D) 'diag' b_k, (K,) 'spherical' s_k
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
        Per-split sum_n w_n r_nk (x_n - c0); columns past D are zero.
    s2_parts : ndarray
        Per-split second moments around c0: (S, K, BLOCK_D) 'diag',
        (S, K) 'spherical'.
    ll_parts : ndarray (P,)
        Partial log-likelihoods, summed for the bound.
    center : ndarray (D,)
        The shift c0 of the partials, float64.
    covariance_type : {'diag', 'spherical'}
    reg_covar : float
    eps : float
        Machine epsilon of the data's dtype (10 eps is added to N_k).
    dtype : numpy dtype
        The data's dtype: the shift and the coefficients are rounded to it.

    Returns
    -------
    MStepResult of NumPy arrays, unpadded.
    """
    if covariance_type not in ("diag", "spherical"):
        raise ValueError(f"covariance_type={covariance_type!r}; the fused M-step covers "
                         "'diag' and 'spherical'.")
    c0 = np.asarray(center, dtype=np.float64)
    d = c0.shape[0]
    nk = np.asarray(nk_parts, dtype=np.float64).sum(0)
    s1 = np.asarray(s1_parts, dtype=np.float64)[:, :, :d].sum(0)
    s2 = np.asarray(s2_parts, dtype=np.float64).sum(0)
    if covariance_type == "diag":
        s2 = s2[:, :d]
    nk_eps = nk + 10 * eps
    means = (s1 + nk[:, None] * c0) / nk_eps[:, None]
    scatter = shift_second_moment(nk, s1 + nk[:, None] * c0, s2, np.broadcast_to(c0, means.shape),
                                  means, covariance_type)
    if covariance_type == "diag":
        cov = scatter / nk_eps[:, None] + reg_covar
    else:
        cov = scatter / (nk_eps * d) + reg_covar
    weights = nk_eps / nk_eps.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        pc = 1.0 / np.sqrt(cov)
        n_nonfinite = int(np.sum(~np.isfinite(cov)))
        n_nonpositive = int(np.sum(~(cov > 0.0)))
        new_c0 = (weights[:, None] * means).sum(0).astype(dtype).astype(np.float64)
        mu = (means - new_c0).astype(dtype).astype(np.float64)
        terms = expanded_terms(mu, pc, covariance_type, np.log(weights), np)
    quadratic = terms.b if covariance_type == "diag" else terms.s
    summary = np.array([np.asarray(ll_parts, dtype=np.float64).sum(), n_nonfinite,
                        n_nonpositive])
    return MStepResult(summary, weights, means, cov, pc, new_c0, terms.a, quadratic, terms.c)
