"""MAP-EM for Gaussian mixtures: conjugate priors and the M-step they give (float64).

Priors (Fraley & Raftery 2007, "Bayesian regularization for normal mixture
estimation"): a symmetric Dirichlet(alpha) on the weights; on each component
a Normal-inverse-Wishart, mu_k | Sigma_k ~ N(mu_0, Sigma_k / kappa_0) and
Sigma_k ~ IW(Psi_0, nu_0) ('full'; one shared Sigma for 'tied'; an inverse
gamma IG(nu_0 / 2, psi_d / 2) per variance for 'diag' and per component for
'spherical').  The M-step is the posterior mode given the E-step statistics:

    pi_k = (N_k + alpha - 1) / (N + K (alpha - 1))
    mu_k = (N_k xbar_k + kappa_0 mu_0) / (N_k + kappa_0)
    Sigma_k = (Psi_0 + S_k + kappa_0 N_k / (kappa_0 + N_k) d_k d_k^T) / denominator
    d_k = xbar_k - mu_0, S_k = sum_n r_nk (x_n - xbar_k)(x_n - xbar_k)^T,
    denominator: nu_0 + N_k + D + 2 ('full'), nu_0 + N + D + K + 1 ('tied'),
    nu_0 + N_k + 3 ('diag'), nu_0 + (N_k + 1) D + 2 ('spherical', with traces).

A prior keeps a component with few rows from collapsing: its covariance is
never below Psi_0 / denominator.  Defaults are mclust's: kappa_0 = 0.01,
nu_0 = D + 2, mu_0 the data mean, Psi_0 the data covariance / K^(2/D) (plus
the estimator's reg_covar on its diagonal, so that a constant column leaves it
positive definite), alpha = 1.

The M-step and the prior's density are written with the array operations NumPy,
torch and CuPy share: statistics and parameters on a GPU stay there (the
hyperparameters, D x D numbers at most, are copied to them).
"""

import math

import numpy as np

from fastlvm._arrays import add_to_diagonal, as_f64, f64_like, f64_together, log, off_device
from fastlvm._moments import mean_and_scatter, row_ranges
from fastlvm.kernels._covariance import log_det_cholesky, shift_second_moment

from ._gaussian_params import covariance_of_type
from ._variational_params import _log_wishart_b

PRIOR_KEYS = ("weight_concentration", "mean_precision", "mean", "degrees_of_freedom",
              "covariance")


def resolve_prior(prior, X, sample_weight, covariance_type, n_components, chunk_size,
                  reg_covar=0.0):
    """The prior's hyperparameters, defaults filled in from the (weighted) data.

    Parameters
    ----------
    prior : dict
        Any of ``PRIOR_KEYS``.
    X : ndarray of shape (n_samples, n_features)
    sample_weight, covariance_type, n_components, chunk_size
        As the estimator has them.
    reg_covar : float, default=0.0
        Added to the diagonal of the default covariance, which a constant
        column (sklearn's digits have several) would leave singular.

    Returns
    -------
    dict with every key of ``PRIOR_KEYS`` (float64 arrays and floats)

    Raises
    ------
    ValueError
        An unknown key, or a value of the wrong shape or sign, naming the key;
        or a default covariance that is singular even after ``reg_covar``.
    """
    unknown = sorted(set(prior) - set(PRIOR_KEYS))
    if unknown:
        raise ValueError(f"prior has unknown keys {unknown}; the keys are {list(PRIOR_KEYS)}.")
    k, d = n_components, X.shape[1]
    out = {"weight_concentration": _positive(prior, "weight_concentration", 1.0, minimum=1.0),
           "mean_precision": _positive(prior, "mean_precision", 0.01),
           "degrees_of_freedom": _positive(prior, "degrees_of_freedom", d + 2.0)}
    if covariance_type in ("full", "tied") and not out["degrees_of_freedom"] > d - 1:
        raise ValueError(f"prior['degrees_of_freedom'] must be > n_features - 1 = {d - 1} "
                         f"for an inverse-Wishart; got {out['degrees_of_freedom']}.")
    if "mean" not in prior or "covariance" not in prior:
        total, mean, scatter = mean_and_scatter(X, lambda shape: row_ranges(shape, chunk_size),
                                                sample_weight)
        data_cov = scatter / max(total - 1.0, 1.0) / k ** (2.0 / d)
    out["mean"] = (mean if "mean" not in prior
                   else _array(prior["mean"], "mean", (d,)))
    if "covariance" not in prior:
        cov = covariance_of_type(add_to_diagonal(data_cov, reg_covar), covariance_type)
        smallest = (np.linalg.eigvalsh(cov)[0] if covariance_type in ("full", "tied")
                    else np.min(cov))
        if not smallest > 0:
            raise ValueError(
                "The data covariance, prior['covariance']'s default, is singular (a "
                "constant column, or fewer rows than features) and reg_covar=0 leaves it "
                "so. Set reg_covar > 0, pass prior['covariance'], or drop constant "
                "columns.")
        out["covariance"] = cov
    elif covariance_type in ("full", "tied"):
        cov = _array(prior["covariance"], "covariance", (d, d))
        if not (np.allclose(cov, cov.T) and np.all(np.linalg.eigvalsh(cov) > 0)):
            raise ValueError("prior['covariance'] must be symmetric positive definite.")
        out["covariance"] = cov
    elif covariance_type == "diag":
        cov = _array(prior["covariance"], "covariance", (d,))
        if np.any(cov <= 0):
            raise ValueError("prior['covariance'] must be positive.")
        out["covariance"] = cov
    else:
        out["covariance"] = _positive(prior, "covariance", None)
    return out


def _positive(prior, key, default, minimum=None):
    value = prior.get(key, default)
    if not np.ndim(value) == 0 or not np.isfinite(value) or not value > 0:
        raise ValueError(f"prior['{key}'] must be a positive number; got {value!r}.")
    if minimum is not None and value < minimum:
        raise ValueError(f"prior['{key}'] must be >= {minimum} (a smaller Dirichlet "
                         f"concentration has no mode inside the simplex); got {value!r}.")
    return float(value)


def _array(value, key, shape):
    a = np.asarray(off_device(value), dtype=np.float64)
    if a.shape != shape or not np.all(np.isfinite(a)):
        raise ValueError(f"prior['{key}'] must be a finite array of shape {shape}; got shape "
                         f"{a.shape}.")
    return a


def placed_prior(prior, template):
    """``prior`` (:func:`resolve_prior`) with its arrays on ``template``'s device,
    and the log-determinant of its scale matrix, which :func:`log_prior_density`
    reads, computed on the host.  For the EM loops to place once an iteration
    before they queue work: a copy from host memory to a GPU waits for the work
    queued, and the M-step and the log-density would each copy the arrays."""
    placed = dict(prior)
    psi0 = prior["covariance"]
    placed["mean"], covariance = f64_together(template, [prior["mean"], psi0])
    if np.ndim(psi0):
        placed["covariance"] = covariance
    if np.ndim(psi0) == 2:
        placed["covariance_log_det"] = float(np.linalg.slogdet(psi0)[1])
    return placed


def map_parameters_from_stats(nk, sum_x, second_moment, center, covariance_type, reg_covar,
                              eps, prior):
    """The MAP M-step: weights, means, covariances from summed statistics.

    Parameters
    ----------
    nk, sum_x, second_moment, center
        As for :func:`._gaussian_params.parameters_from_stats`: float64 NumPy
        arrays, or torch tensors or cupy arrays on one device, where the step runs.
    covariance_type : str
    reg_covar : float
        Still added to the diagonal.
    eps : float
    prior : dict
        From :func:`resolve_prior`, or :func:`placed_prior` where the
        statistics or parameters are on a device.

    Returns
    -------
    weights (K,), means (K, D), covariances (sklearn's shape), of the statistics' kind
    """
    k, d = sum_x.shape
    alpha, kappa0 = prior["weight_concentration"], prior["mean_precision"]
    nu0, mu0, psi0 = prior["degrees_of_freedom"], prior["mean"], prior["covariance"]
    mu0 = f64_like(nk, mu0)
    psi0 = psi0 if np.ndim(psi0) == 0 else f64_like(nk, psi0)
    nk_eps = nk + 10 * eps
    weights = (nk + alpha - 1.0) / (nk.sum() + k * (alpha - 1.0))
    xbar = sum_x / nk_eps[:, None]
    scatter = shift_second_moment(nk, sum_x, second_moment, center, xbar, covariance_type)
    means = (nk[:, None] * xbar + kappa0 * mu0) / (nk + kappa0)[:, None]
    diff = xbar - mu0
    shrink = kappa0 * nk / (kappa0 + nk)
    if covariance_type == "full":
        num = psi0 + scatter + shrink[:, None, None] * diff[:, :, None] * diff[:, None, :]
        cov = add_to_diagonal(num / (nu0 + nk + d + 2.0)[:, None, None], reg_covar)
    elif covariance_type == "tied":
        num = psi0 + scatter + (shrink * diff.T) @ diff
        cov = add_to_diagonal(num / (nu0 + nk.sum() + d + k + 1.0), reg_covar)
    elif covariance_type == "diag":
        num = psi0 + scatter + shrink[:, None] * diff**2
        cov = num / (nu0 + nk + 3.0)[:, None] + reg_covar
    else:
        num = psi0 + scatter + shrink * (diff**2).sum(1)
        cov = num / (nu0 + (nk + 1.0) * d + 2.0) + reg_covar
    if covariance_type in ("full", "tied"):
        cov = 0.5 * (cov + cov.swapaxes(-1, -2))
    return weights / weights.sum(), means, cov


LOG_2PI = math.log(2.0 * math.pi)


def log_prior_density(weights, means, covariances, precisions_cholesky, covariance_type,
                      prior, keep_on_device=False):
    """log p(theta) under the prior (the term the MAP objective adds), as a float.

    The densities are written out (Dirichlet; inverse-Wishart and normal through the
    precision factors U, U U^T = inv(Sigma): log|Sigma| = -2 sum log diag U and
    tr(Psi inv(Sigma)) = sum (Psi U) * U; inverse gamma and normal per variance), so
    parameters on a GPU are evaluated there and only the total is read back.

    Parameters
    ----------
    weights : (K,)
    means : (K, D)
    covariances : sklearn's shape for ``covariance_type``
    precisions_cholesky : the covariances' upper factors, sklearn's shape
    covariance_type : str
    prior : dict
        From :func:`resolve_prior`, or :func:`placed_prior` where the
        statistics or parameters are on a device.
    keep_on_device : bool, default=False
        Return a 0-d float64 array where the parameters are, unread.
    """
    weights, means, covariances, u = (as_f64(a) for a in (weights, means, covariances,
                                                          precisions_cholesky))
    k, d = means.shape
    alpha, kappa0 = prior["weight_concentration"], prior["mean_precision"]
    nu0, psi0 = prior["degrees_of_freedom"], prior["covariance"]
    diff = means - f64_like(means, prior["mean"])
    out = math.lgamma(k * alpha) - k * math.lgamma(alpha)
    if alpha != 1.0:  # alpha > 1: the MAP weights are positive
        out = out + (alpha - 1.0) * log(weights).sum()
    if covariance_type in ("full", "tied"):
        stack = u if covariance_type == "full" else u[None]  # (K or 1, D, D): one Wishart each
        log_det_prec = 2.0 * log_det_cholesky(u, covariance_type, k, d)  # (K,) log|inv(Sigma_k)|
        trace = ((f64_like(means, psi0) @ stack) * stack).sum((1, 2))
        log_det_psi0 = prior.get("covariance_log_det")
        if log_det_psi0 is None:
            log_det_psi0 = np.linalg.slogdet(psi0)[1]
        inverse_wishart = (_log_wishart_b(log_det_psi0, nu0, d)
                           + 0.5 * (nu0 + d + 1.0) * log_det_prec[:stack.shape[0]]
                           - 0.5 * trace)
        quad = ((diff[:, None, :] @ stack)**2).sum((1, 2))  # (K,): kappa0-free Mahalanobis
        normal = (0.5 * d * (math.log(kappa0) - LOG_2PI) + 0.5 * log_det_prec
                  - 0.5 * kappa0 * quad)
        total = out + inverse_wishart.sum() + normal.sum()
        return total if keep_on_device else float(total)
    if covariance_type == "diag":
        var, scale = covariances, 0.5 * f64_like(means, psi0)
    else:  # one inverse gamma per component, D normals of its variance
        var, scale = covariances[:, None], 0.5 * psi0
    shape = 0.5 * nu0
    inverse_gamma = (shape * log(scale) - math.lgamma(shape) - (shape + 1.0) * log(var)
                     - scale / var)
    normal = -0.5 * (LOG_2PI + log(var / kappa0)) - 0.5 * kappa0 * diff**2 / var
    total = out + inverse_gamma.sum() + normal.sum()
    return total if keep_on_device else float(total)
