"""Variational Bayes for Gaussian mixtures, from sufficient statistics (float64).

q(pi) q(mu, Lambda) in sklearn's parameterisation (Bishop 2006, ch. 10.2):
a Dirichlet (or, for the Dirichlet process, K Beta sticks) on the weights, and
per component a Gaussian-Wishart: mean m_k with precision scale beta_k,
nu_k degrees of freedom and "covariances" W_k^{-1} / nu_k (sklearn normalises
by nu_k, so ``covariances_`` has the scale of a covariance).

Everything here is K x D x D sized.  The updates from the statistics, the
entropy and the log-determinants are written with the operators NumPy, torch and
CuPy share, so a fit on a GPU keeps its K x D (x D) arrays there; the K-vectors
(concentrations, degrees of freedom, mean precisions) are NumPy.

The data enter only through the statistics of one E-step pass (N_k, sum r x,
second moments around a shift), exactly those
:func:`fastlvm.kernels.estep_stats` returns, so the variational E-step runs on
the EM kernels: its expected log-densities are Gaussian log-densities under
``means_`` and ``precisions_cholesky_`` plus one constant per component,
:func:`log_weight_offsets`, folded into the kernel's log-weights. The entropy
of the responsibilities, which sklearn's bound needs, follows from the same
statistics (:func:`expected_log_joint`). Formulas and the constants
sklearn leaves out of its bound follow sklearn's ``BayesianGaussianMixture``.
"""

import math

import numpy as np
from scipy.special import betaln, digamma, gammaln

from fastlvm._arrays import as_f64, f64_like, namespace
from fastlvm.kernels._covariance import log_det_cholesky, shift_second_moment


def update_weight_concentration(nk, prior, prior_type):
    """q(pi) from N_k: Beta sticks (a_k, b_k) or Dirichlet concentrations.

    Parameters
    ----------
    nk : ndarray (K,)
    prior : float
        ``weight_concentration_prior_``.
    prior_type : {'dirichlet_process', 'dirichlet_distribution'}

    Returns
    -------
    tuple of two ndarrays (K,) for the Dirichlet process, else ndarray (K,)
    """
    if prior_type == "dirichlet_process":
        tail = np.hstack((np.cumsum(nk[::-1])[-2::-1], 0))  # sum_{j > k} N_j
        return 1.0 + nk, prior + tail
    return prior + nk


def expected_log_weights(concentration, prior_type):
    """E[log pi_k] under q(pi), shape (K,)."""
    if prior_type == "dirichlet_process":
        a, b = concentration
        digamma_sum = digamma(a + b)
        log_stick = digamma(b) - digamma_sum
        return digamma(a) - digamma_sum + np.hstack((0, np.cumsum(log_stick)[:-1]))
    return digamma(concentration) - digamma(np.sum(concentration))


def weights_from_concentration(concentration, prior_type):
    """E[pi_k] under q(pi), shape (K,), summing to one."""
    if prior_type == "dirichlet_process":
        a, b = concentration
        total = a + b
        weights = a / total * np.hstack((1, np.cumprod(b[:-1] / total[:-1])))
        return weights / weights.sum()
    return concentration / np.sum(concentration)


def update_means(nk, xk, mean_precision_prior, mean_prior):
    """beta_k = beta_0 + N_k and m_k = (beta_0 m_0 + N_k xbar_k) / beta_k.

    Returns
    -------
    mean_precision : (K,), of nk's kind
    means : (K, D), of nk's kind
    """
    mean_precision = mean_precision_prior + nk
    means = ((mean_precision_prior * f64_like(xk, mean_prior) + nk[:, None] * xk)
             / mean_precision[:, None])
    return mean_precision, means


def update_wishart(nk, xk, sk, mean_precision, priors, covariance_type):
    """Degrees of freedom and normalised scale ("covariances") of q(Lambda).

    Parameters
    ----------
    nk : (K,)
        N_k + 10 eps (NumPy, or a torch tensor or cupy array with the others).
    xk : (K, D)
        Responsibility-weighted means.
    sk : ndarray
        Responsibility-weighted covariances with ``reg_covar`` added, sklearn's
        shape for ``covariance_type``.
    mean_precision : ndarray (K,)
        beta_k from :func:`update_means`.
    priors : dict
        ``mean_precision``, ``mean``, ``degrees_of_freedom``, ``covariance``.
    covariance_type : str

    Returns
    -------
    degrees_of_freedom : (K,) (0-d for 'tied'), of nk's kind
    covariances : sklearn's shape for ``covariance_type``, of nk's kind
    """
    k = nk.shape[0]
    beta0, m0 = priors["mean_precision"], f64_like(xk, priors["mean"])
    nu0, cov0 = priors["degrees_of_freedom"], priors["covariance"]
    cov0 = cov0 if np.ndim(cov0) == 0 else f64_like(xk, cov0)
    diff = xk - m0
    shrink = nk * beta0 / mean_precision  # N_k beta_0 / beta_k
    if covariance_type == "full":
        dof = nu0 + nk
        cov = (cov0 + nk[:, None, None] * sk
               + shrink[:, None, None] * diff[:, :, None] * diff[:, None, :])
        return dof, cov / dof[:, None, None]
    if covariance_type == "tied":
        dof = nu0 + nk.sum() / k
        cov = cov0 + sk * nk.sum() / k + (shrink * diff.T) @ diff / k
        return dof, cov / dof
    if covariance_type == "diag":
        dof = nu0 + nk
        cov = cov0 + nk[:, None] * sk + shrink[:, None] * diff**2
        return dof, cov / dof[:, None]
    dof = nu0 + nk
    cov = cov0 + nk * sk + shrink * (diff**2).mean(1)
    return dof, cov / dof


def log_weight_offsets(degrees_of_freedom, mean_precision, n_features):
    """Per-component constant of the expected log-density, shape (K,) (or float).

    E[log N(x | mu_k, Lambda_k)] = log N(x | m_k, nu_k W_k) + this, with
    nu_k W_k the precision ``precisions_cholesky_`` encodes:
    (E[log |Lambda_k|] - D log nu_k - D / beta_k) / 2, where
    E[log |Lambda_k|] = sum_i psi((nu_k - i) / 2) + D log 2 + log |W_k|.
    """
    d = n_features
    nu = np.asarray(degrees_of_freedom, dtype=np.float64)
    log_lambda = d * math.log(2.0) + np.sum(digamma(_half_dof_offsets(nu, d)), 0)
    return -0.5 * d * np.log(nu) + 0.5 * (log_lambda - d / mean_precision)


def expected_log_joint(nk, sum_x, second_moment, center, log_weights, means,
                       precisions_cholesky, covariance_type):
    """sum_n w_n sum_k r_nk l_nk, from one E-step pass's statistics, where they are.

    With l_nk = log-weight_k + log N(x_n | m_k, P_k) and r_nk its softmax,
    sum_n w_n r_nk l_nk = N_k (log-weight_k + log|U_k| - D/2 log 2 pi)
    - tr(P_k S_k) / 2 with S_k the second moment around m_k.  Since
    sum_k r_nk log r_nk = sum_k r_nk l_nk - log sum_k exp(l_nk), the entropy of
    the responsibilities, -sum_n w_n sum_k r_nk log r_nk, which sklearn's bound
    needs, is the pass's log-likelihood less this.

    Parameters
    ----------
    nk, sum_x, second_moment, center
        The pass's statistics (second moments around ``center``), float64.
    log_weights : (K,)
        The log-weights the pass used.
    means : (K, D)
    precisions_cholesky
        The parameters the pass used (all arrays of one kind: NumPy, or torch
        tensors or cupy arrays on one device, where the sums run).
    covariance_type : str

    Returns
    -------
    0-d float64 array of the parameters' kind (unread on a device)
    """
    k, d = means.shape
    means = as_f64(means)
    s = shift_second_moment(nk, sum_x, second_moment, center, means, covariance_type)
    pc = as_f64(precisions_cholesky)
    xp = namespace(pc)
    if covariance_type == "full":
        trace = xp.einsum("kij,kij->k", pc @ pc.swapaxes(1, 2), s).sum()
    elif covariance_type == "tied":
        trace = ((pc @ pc.T) * s).sum()
    elif covariance_type == "diag":
        trace = (pc**2 * s).sum(1).sum()
    else:
        trace = (pc**2 * s).sum()
    const = (f64_like(pc, log_weights) + log_det_cholesky(pc, covariance_type, k, d)
             - 0.5 * d * math.log(2.0 * math.pi))
    return xp.where(nk > 0, nk * const, 0.0).sum() - 0.5 * trace


def lower_bound(entropy, concentration, prior_type, degrees_of_freedom, mean_precision,
                log_det_precisions_chol, n_features):
    """sklearn's variational lower bound (constant terms left out, as sklearn does).

    Parameters
    ----------
    entropy : float
        The entropy of the responsibilities of the pass that gave the statistics
        (its log-likelihood less :func:`expected_log_joint`).
    concentration, degrees_of_freedom, mean_precision
        q(theta) after the update from those statistics (NumPy).
    log_det_precisions_chol : ndarray (K,)
        log det of each component's ``precisions_cholesky_`` after the update
        (:func:`fastlvm.kernels._covariance.log_det_cholesky`, read back).
    n_features : int

    Returns
    -------
    float
    """
    d = n_features
    log_det = log_det_precisions_chol - 0.5 * d * np.log(degrees_of_freedom)
    log_wishart = np.sum(log_wishart_norm(degrees_of_freedom, log_det, d))
    if prior_type == "dirichlet_process":
        log_norm_weight = -np.sum(betaln(concentration[0], concentration[1]))
    else:
        log_norm_weight = gammaln(np.sum(concentration)) - np.sum(gammaln(concentration))
    return float(entropy - log_wishart - log_norm_weight
                 - 0.5 * d * np.sum(np.log(mean_precision)))


def log_wishart_norm(degrees_of_freedom, log_det_precisions_chol, n_features):
    """log B(W, nu) of a Wishart (sklearn's, without the log pi term), shape (K,)."""
    nu = np.asarray(degrees_of_freedom, dtype=np.float64)
    return -(nu * log_det_precisions_chol + nu * n_features * 0.5 * math.log(2.0)
             + np.sum(gammaln(_half_dof_offsets(nu, n_features)), 0))


def _half_dof_offsets(nu, n_features):
    """(nu - i) / 2 for i < D: shape (D, K) for nu of shape (K,), (D,) for a float."""
    offsets = np.arange(n_features)
    return 0.5 * (nu - (offsets[:, None] if nu.ndim else offsets))


# ----------------------------------------------------------------- the ELBO
# sklearn's bound leaves out constants and is exact only right after an update
# from the pass it was computed on.  To compare any two q(theta) (stochastic VI
# against batch VB, say) on data X, the full bound with q(Z) optimal for q(theta):
#     ELBO = sum_n w_n log sum_k exp(E[log pi_k] + E[log N(x_n | mu_k, Lambda_k)])
#            - KL(q(pi) || p(pi)) - KL(q(mu, Lambda) || p(mu, Lambda)),
# whose first term is the log-likelihood of the E-step pass itself.

def kl_weights(concentration, prior, prior_type):
    """KL(q(pi) || p(pi)): K Beta sticks against Beta(1, prior), or Dirichlets."""
    if prior_type == "dirichlet_process":
        a, b = concentration
        return float(np.sum(_kl_beta(a, b, 1.0, prior)))
    alpha = np.asarray(concentration, dtype=np.float64)
    alpha0 = np.full_like(alpha, prior)
    total = alpha.sum()
    return float(gammaln(total) - np.sum(gammaln(alpha)) - gammaln(alpha0.sum())
                 + np.sum(gammaln(alpha0))
                 + np.sum((alpha - alpha0) * (digamma(alpha) - digamma(total))))


def _kl_beta(a, b, a0, b0):
    return (betaln(a0, b0) - betaln(a, b) + (a - a0) * digamma(a) + (b - b0) * digamma(b)
            + (a0 - a + b0 - b) * digamma(a + b))


def kl_normal_wishart(means, mean_precision, degrees_of_freedom, precisions, priors,
                      covariance_type):
    """KL(q(mu, Lambda) || p(mu, Lambda)) summed over components.

    q(Lambda_k) = Wishart(W_k, nu_k) with nu_k W_k = ``precisions_`` (diagonal
    W for 'diag', isotropic for 'spherical': the family sklearn's updates
    stay in), q(mu_k | Lambda_k) = N(m_k, (beta_k Lambda_k)^-1); the prior has
    W_0^-1 = ``covariance_prior_``.  'tied' has one Wishart for all components.

    Parameters
    ----------
    means : ndarray (K, D)
    mean_precision : ndarray (K,)
    degrees_of_freedom : ndarray (K,) or float ('tied')
    precisions : ndarray, sklearn's shape for ``covariance_type``
    priors : dict
        ``mean_precision``, ``mean``, ``degrees_of_freedom``, ``covariance``.
    covariance_type : str

    Returns
    -------
    float
    """
    k, d = means.shape
    p = _as_full(precisions, covariance_type, k, d)  # (K or 1, D, D)
    psi0 = _as_full(priors["covariance"], covariance_type, 1, d)[0]
    nu = np.broadcast_to(np.asarray(degrees_of_freedom, dtype=np.float64), (p.shape[0],))
    nu0, beta0, m0 = priors["degrees_of_freedom"], priors["mean_precision"], priors["mean"]
    log_det_w = np.linalg.slogdet(p)[1] - d * np.log(nu)  # W = P / nu
    e_log_det = np.sum(digamma(_half_dof_offsets(nu, d)), 0) + d * math.log(2.0) + log_det_w
    log_b = _log_wishart_b(-log_det_w, nu, d)
    log_b0 = _log_wishart_b(np.linalg.slogdet(psi0)[1], nu0, d)
    trace = np.einsum("ij,kji->k", psi0, p) / nu  # tr(W_0^-1 W_k)
    kl_wishart = (log_b - log_b0 + 0.5 * (nu - nu0) * e_log_det - 0.5 * nu * d
                  + 0.5 * nu * trace)
    diff = means - m0
    maha = np.einsum("ki,kij,kj->k", diff, np.broadcast_to(p, (k, d, d)), diff)
    kl_mean = 0.5 * (d * beta0 / mean_precision - d + d * np.log(mean_precision / beta0)
                     + beta0 * maha)
    return float(np.sum(kl_wishart) + np.sum(kl_mean))


def _log_wishart_b(log_det_scale_inv, nu, d):
    """log B(W, nu) = nu/2 log|W^-1| - nu D/2 log 2 - log Gamma_D(nu / 2)."""
    nu = np.asarray(nu, dtype=np.float64)
    return (0.5 * nu * log_det_scale_inv - 0.5 * nu * d * math.log(2.0)
            - (0.25 * d * (d - 1) * math.log(math.pi)
               + np.sum(gammaln(_half_dof_offsets(nu, d)), 0)))


def _as_full(matrix, covariance_type, k, d):
    """(K, D, D) matrices ((1, D, D) for 'tied' and the prior) from sklearn's shapes."""
    m = np.asarray(matrix, dtype=np.float64)
    if covariance_type == "full":
        return m if m.ndim == 3 else m[None]
    if covariance_type == "tied":
        return m[None]
    if covariance_type == "diag":
        m = m.reshape(-1, d)
        return m[:, :, None] * np.eye(d)
    return np.reshape(m, (-1,))[:, None, None] * np.eye(d)
