# ppca_stats on a device: the one-component case of the fused mixture-of-PPCA
# pass (mppca_stats' Triton and CuPy kernels), its sums mapped to PPCA's.
#
# Design: probabilistic PCA is a mixture of PPCA with one component of weight 1,
# so every row's responsibility is 1 (times its sample weight) and the device
# kernels' tiled, deterministic pass (no n x q array, float64 partials summed in
# a fixed order) yields PPCA's statistics in other coordinates.  Two exact maps
# in float64, on the device, from the sums that pass returns:
#
# - it sums the projections y = W c where PPCA wants the posterior means
#   z = M^{-1} y (M = W W^T + sigma^2 I, q x q): sum c z^T = (sum c y^T) M^{-1},
#   sum z z^T = M^{-1} (sum y y^T) M^{-1};
# - it centres rows on the mean rounded to the data's dtype, c' = x - center,
#   where PPCA centres on the float64 mean, c = c' - delta: with
#   a = M^{-1} W delta, sum_c = sum c' and sum_z = sum z',
#   sum c z^T = sum c' z'^T - delta sum_z^T - sum_c a^T + n delta a^T,
#   sum z z^T = sum z' z'^T - sum_z a^T - a sum_z^T + n a a^T,
#   sum |c|^2 = sum |c'|^2 - 2 delta.sum_c + n |delta|^2, and the log-density
#   moves by delta^T C^{-1} sum_c - n delta^T C^{-1} delta / 2, with
#   C^{-1} v = (v - W^T M^{-1} W v) / sigma^2 (Woodbury).  For float64 data
#   delta is zero and the maps are the identity.
#
# The q x q inverse M^{-1} is formed on the host (q^2 numbers), as the reference
# forms it.  With keep_on_device the log-likelihood and sum |c|^2 stay 0-d device
# arrays, so that PPCA's EM reads an iteration's sums back in one copy.  Limits:
# those of the device kernels (float32/float64, complete rows; see
# kernels/mppca_stats/_triton.py and _cupy.py).

from fastlvm._arrays import cast_like, f64_together

from ._reference import ppca_posterior


def ppca_stats_one_component(mixture_stats, X, mean, components, noise_variance,
                             sample_weight=None, keep_on_device=False):
    """PPCA's E-step statistics from a device backend of ``mppca_stats``.

    Parameters
    ----------
    mixture_stats : callable
        ``mppca_stats_triton`` or ``mppca_stats_cupy``.
    X : torch.Tensor or cupy.ndarray of shape (n_samples, n_features), float32/float64
    mean : ndarray of shape (n_features,), float64
    components : ndarray of shape (n_components, n_features), float64
        W^T, as in sklearn's ``components_``.
    noise_variance : float
    sample_weight : float array of X's kind, shape (n_samples,), or None
        (cast to X's dtype here, after the parameters are placed)
    keep_on_device : bool, default=False
        Return ``log_likelihood`` and ``sq_norm`` as 0-d float64 device arrays:
        the call then returns without waiting for the device.

    Returns
    -------
    (log_likelihood, sq_norm, cross, z_second) : float, float, and float64 arrays
        of X's kind on its device, shapes (n_features, q) and (q, q) (see
        :class:`fastlvm.kernels.PPCAStats`).
    """
    m_inv_host, _ = ppca_posterior(components, noise_variance)
    # the host parameters go to the device before the pass is queued (a copy from
    # pageable host memory to a GPU waits for the work queued)
    w, m_inv, mean_d, noise, one = f64_together(
        X, [components, m_inv_host, mean, [noise_variance], [1.0]])
    sw = None if sample_weight is None else cast_like(sample_weight, X)
    ll, nk, sum_x, sum_sq, cross_y, sum_y, y_second, center = mixture_stats(
        X, one, mean_d[None], w[None], noise, sw, keep_on_device=True)
    n = nk[0]
    delta = mean_d - center[0]
    sum_c = sum_x[0] - n * center[0]
    sum_z = m_inv @ sum_y[0]
    a = m_inv @ (w @ delta)
    cross = (cross_y[0] @ m_inv - delta[:, None] * sum_z[None, :] - sum_c[:, None] * a[None, :]
             + n * delta[:, None] * a[None, :])
    z_second = (m_inv @ y_second[0] @ m_inv - sum_z[:, None] * a[None, :]
                - a[:, None] * sum_z[None, :] + n * a[:, None] * a[None, :])
    sq_norm = sum_sq[0] - 2.0 * (delta * sum_c).sum() + n * (delta * delta).sum()

    def delta_precision(v):  # delta^T C^{-1} v
        return ((delta * v).sum() - (a * (w @ v)).sum()) / noise_variance

    log_likelihood = ll + (delta_precision(sum_c) - 0.5 * n * delta_precision(delta))
    if keep_on_device:
        return log_likelihood, sq_norm, cross, z_second
    return float(log_likelihood), float(sq_norm), cross, z_second
