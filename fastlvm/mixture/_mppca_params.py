"""Mixture-of-PPCA parameters from sufficient statistics (the M-step), in float64.

Tipping & Bishop (1999), "Mixtures of probabilistic principal component
analysers", appendix C: with the responsibility-weighted covariance S_k around
the new mean mu_k' and the current W_k (here A = W_k^T, D x q),

    A' = S A (sigma^2 I + M^{-1} A^T S A)^{-1},   M = A^T A + sigma^2 I
    sigma^2' = tr(S - S A M^{-1} A'^T) / D

needs S only through S A (D x q), A^T S A (q x q) and tr S, which follow
exactly from the statistics of :func:`fastlvm.kernels.mppca_stats` taken
around the centre e (y = W_k (x - e)):

    delta = mu' - e,   s = sum r y / N = W_k delta
    S A   = sum r (x - e) y^T / N - delta s^T
    A^T S A = sum r y y^T / N - s s^T
    tr S  = sum r ||x - e||^2 / N - ||delta||^2

so an M-step costs O(K D q^2), never a D x D matrix.
"""

from fastlvm._arrays import (add_to_diagonal, clamp, linalg_inv, linalg_solve, namespace,
                             sign_of_largest)
from fastlvm._moments import overflow_error, refuse_underflow, smallest_normal

from ._gaussian_params import ILL_DEFINED_COVARIANCE

EMPTY_COMPONENT_FLOOR = 10.0  # times eps, added to N_k as sklearn's GaussianMixture does
MIN_INITIAL_SCALE = 1e-3  # squared length of a fresh loading column, times sigma^2


def _identity_stack(template):
    """Identity matrices shaped like the (K, q, q) stack ``template``, same kind."""
    return add_to_diagonal(namespace(template).zeros_like(template), 1.0)


def parameters_from_stats(stats, components, noise_variance, reg_covar, eps):
    """M-step of a mixture of PPCA, batched over the components.

    Written once for NumPy, torch and CuPy: the parameters come back where the
    statistics are (float64), so a fit on a GPU stays there.

    Parameters
    ----------
    stats : MPPCAStats
        Summed over all rows, under the parameters ``components`` and
        ``noise_variance`` (their projections define ``cross`` etc.).
    components : array of shape (K, q, D)
    noise_variance : array of shape (K,)
    reg_covar : float
        Floor on every new sigma_k^2 (keeps C_k positive definite).  A floor,
        not an addition: sigma^2' depends on sigma^2, so an addition compounds
        over the iterations and EM descends (a 6-row component with q = 8 in
        D = 9 lost 1.6 nats per row); the floor is the constrained M-step, and
        EM stays monotone.
    eps : float
        Machine epsilon of the data's dtype.

    Returns
    -------
    weights : array (K,)
    means : array (K, D)
    components : array (K, q, D)
    noise_variance : array (K,)
    """
    d = components.shape[2]
    nk = stats.nk + EMPTY_COMPONENT_FLOOR * eps
    means = stats.sum_x / nk[:, None]
    delta = means - stats.center
    s = stats.sum_proj / nk[:, None]
    sa = stats.cross / nk[:, None, None] - delta[:, :, None] * s[:, None, :]
    asa = stats.proj_second / nk[:, None, None] - s[:, :, None] * s[:, None, :]
    tr_s = clamp(stats.sum_sq / nk - (delta * delta).sum(1), low=0.0)
    w_t = components.swapaxes(1, 2)
    s2 = noise_variance[:, None, None]
    eye = _identity_stack(asa)
    m_inv = linalg_inv(components @ w_t + s2 * eye)
    # A' = S A (sigma^2 I + M^{-1} A^T S A)^{-1}, solved as its transpose
    a_new = linalg_solve((s2 * eye + m_inv @ asa).swapaxes(1, 2),
                         sa.swapaxes(1, 2)).swapaxes(1, 2)
    explained = ((sa @ m_inv) * a_new).sum((1, 2))
    new_noise = clamp(clamp(tr_s - explained, low=0.0) / d, low=reg_covar)
    return nk / nk.sum(), means, a_new.swapaxes(1, 2), new_noise


def ppca_from_covariance(cov, n_latent, reg_covar):
    """Closed-form PPCA of each component's covariance (the initialisation).

    sigma^2 is the mean of the discarded eigenvalues (at least ``reg_covar``),
    W = (U_q (Lambda_q - sigma^2)^{1/2})^T, except that no column starts
    shorter than 1e-3^{1/2} sigma: W = 0 is a fixed point of EM, so a
    component whose data look isotropic must not start there.  Any array kind
    (NumPy, torch, CuPy); the results are of the same kind.

    Parameters
    ----------
    cov : array of shape (K, D, D)
    n_latent : int
    reg_covar : float

    Returns
    -------
    components : array (K, q, D)
    noise_variance : array (K,)

    Raises
    ------
    ValueError
        When ``cov`` is not finite (:func:`fastlvm._moments.overflow_error`).
    """
    xp = namespace(cov)
    if not bool(xp.isfinite(cov).all()):  # X is finite: its scatter overflowed
        raise overflow_error("The components' initial covariances")
    val, vec = xp.linalg.eigh(0.5 * (cov + cov.swapaxes(1, 2)))
    val = clamp(xp.flip(val, (1,)), low=0.0)  # descending
    vec = xp.flip(vec, (2,))
    noise = clamp(val[:, n_latent:].mean(1), low=reg_covar)
    scale = xp.sqrt(xp.maximum(val[:, :n_latent] - noise[:, None],
                               MIN_INITIAL_SCALE * noise[:, None]))
    directions = vec[:, :, :n_latent].swapaxes(1, 2)  # (K, q, D)
    return directions * (scale * sign_of_largest(directions))[:, :, None], noise


def refuse_small_variances(cov, reg_covar, dtype):
    """Refuse X whose variances are too small for the fit's arithmetic.

    The E-step's statistics hold fourth powers of X's values (y y^T, with
    y = W (x - e)), summed in float64, and its kernel forms W W^T + sigma^2 I in
    X's dtype: the model's largest variance (the data's, or ``reg_covar``, the
    noise variances' floor) must square to a normal float64 number and be a
    normal number of X's dtype.  Any array kind; one read of the device.

    Parameters
    ----------
    cov : array of shape (K, D, D)
        The components' initial covariances.
    reg_covar : float
    dtype : NumPy dtype
        X's.

    Raises
    ------
    ValueError
        :func:`fastlvm._moments.underflow_error`.
    """
    largest = max(float(cov.diagonal(0, -2, -1).max()), reg_covar)
    what = "The components' initial covariances"
    refuse_underflow(largest, "float64", what, power=2)
    refuse_underflow(largest, dtype, what)


def refuse_collapse(noise_variance, reg_covar, dtype):
    """sklearn's ill-defined-covariance error for a component with no noise.

    With ``reg_covar`` below the smallest normal number of X's dtype nothing
    floors the noise variances: a component whose rows lie in its subspace
    (collapsed onto a point, or fewer rows than n_latent + 1) gets sigma^2 = 0,
    and its density is undefined.  Reads the device only in that case.

    Parameters
    ----------
    noise_variance : array of shape (K,)
    reg_covar : float
    dtype : NumPy dtype
        X's.
    """
    tiny = smallest_normal(dtype)
    if reg_covar < tiny and float(noise_variance.min()) < tiny:
        raise ValueError(ILL_DEFINED_COVARIANCE)


def n_parameters(n_components, n_features, n_latent):
    """Free parameters: weights, means, loadings (modulo rotation), noise variances."""
    loadings = n_features * n_latent - n_latent * (n_latent - 1) // 2
    return int(n_components - 1 + n_components * (n_features + loadings + 1))
