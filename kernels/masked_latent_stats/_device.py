# Device backend of masked_latent_stats and masked_posterior: PPCA /
# factor-analysis E-step statistics on torch CUDA tensors or cupy arrays with
# missing entries (NaN), each row marginalised over its missing coordinates.
#
# Design: written once in the array library's own operations (torch or cupy,
# found from X), so cuBLAS and the batched small factorisations do the work, and
# nothing but the parameters is copied to the device (the sum reads back once); it
# serves both device backends ('triton' for torch tensors, 'cupy').  Per chunk
# of m rows, all in float64:
#
# - the observed mask O (m, D) and the centred rows c, zero where missing;
# - every row's posterior precision P_n = I + W_O Psi_O^{-1} W_O^T as one GEMM,
#   O (m, D) x (D, q^2) against the features' rank-one terms w_i w_i^T / psi_i;
# - b_n = W Psi^{-1} c_n (m, q), one GEMM; P_n^{-1} batched (m, q, q), z = P^{-1} b
#   (fastlvm._arrays.linalg_inv: the chunk loop reads nothing back, so it never
#   waits for the device, and a CUDA graph could hold it);
# - log p(x_O) by the matrix determinant lemma and Woodbury, as the Numba
#   kernel: -(|O| log 2 pi + sum_O log psi + log det P + c Psi^-1 c - b.z) / 2;
# - the statistics as GEMMs over the chunk's rows: sum_n w E~_n; the per-feature
#   second moments ((1 - O) w)^T (m, D) x E~ (m, (q+1)^2) of the rows missing
#   each feature; cross (O w c)^T z~; sq and n_observed as row sums.
#
# Chunks hold m max(D, (q + 1)^2) numbers per array (CHUNK_NUMBERS bounds them:
# 64 MiB of float64, a few such arrays at a time); their sums add in
# chunk order in float64, and the library's GEMMs and reductions use no atomics
# for these shapes (reproducible on one device).  Limits: the (m, q, q) posterior
# of a chunk goes through device memory (a fused kernel would keep it in
# registers); q is small, as in the Numba kernel.  NaN marks a missing entry;
# the public functions have checked that every row has an observed one.
import math

import numpy as np

from fastlvm import _config
from fastlvm._arrays import as_f64, f64_together, linalg_inv, namespace, zeros_like

# the (m, D) and (m, q + 1, q + 1) arrays of a chunk: 8M numbers, 64 MiB each,
# as the host passes' float64 copies of rows
CHUNK_NUMBERS = _config.ROW_COPY_BYTES // 8
_LOG_2PI = math.log(2 * math.pi)


def _chunk_rows(n, d, q):
    """Rows per chunk: its (m, D) and (m, q + 1, q + 1) arrays within CHUNK_NUMBERS."""
    return max(1, min(n, CHUNK_NUMBERS // max(d, (q + 1) ** 2)))


class _Factors:
    """The parameters on X's device, and the features' rank-one precision terms."""

    def __init__(self, X, mean, components, noise):
        self.xp = namespace(X)
        # the host arrays go to the device in one copy, before any work is queued
        # (a copy from pageable host memory to a GPU waits for the work queued)
        self.mean, self.w, self.psi, self.eye = f64_together(  # w: (q, D)
            X, [mean, components, noise, np.eye(np.shape(components)[0])])
        self.q, self.d = self.w.shape
        self.w_psi = self.w / self.psi  # (q, D)
        # (D, q^2): row i is w_i w_i^T / psi_i, flattened
        self.rank_one = (self.w_psi.T[:, :, None] * self.w.T[:, None, :]).reshape(
            self.d, self.q * self.q)
        self.log_psi = self.xp.log(self.psi)

    def posterior(self, rows):
        """(observed mask (m, D) float64, centred rows zero where missing, log p(x_O)
        (m,), z (m, q), Cov[z | x_O] (m, q, q)) of a chunk of rows."""
        xp = self.xp
        observed = ~xp.isnan(rows)
        c = xp.where(observed, as_f64(rows) - self.mean, 0.0)
        mask = as_f64(observed)
        m = rows.shape[0]
        precision = (mask @ self.rank_one).reshape(m, self.q, self.q) + self.eye
        b = c @ self.w_psi.T
        cov = linalg_inv(precision)  # I plus positive semi-definite terms
        z = (cov @ b[:, :, None])[:, :, 0]
        log_det_p = xp.linalg.slogdet(precision)[1]
        quad = (c * c / self.psi).sum(1) - (b * z).sum(1)
        log_p = -0.5 * (mask.sum(1) * _LOG_2PI + mask @ self.log_psi + log_det_p + quad)
        return mask, c, log_p, z, cov


def masked_latent_stats_device(X, mean, components, noise, sample_weight=None,
                               keep_on_device=False):
    """Device ``masked_latent_stats`` (see :func:`fastlvm.kernels.masked_latent_stats`).

    Parameters
    ----------
    X : torch.Tensor or cupy.ndarray of shape (n_samples, n_features), float32/float64
        NaN where missing.
    mean : ndarray of shape (n_features,)
    components : ndarray of shape (q, n_features)
    noise : ndarray of shape (n_features,)
    sample_weight : array of X's kind, shape (n_samples,), or None
    keep_on_device : bool, default=False
        Return the log-likelihood as a 0-d float64 device array: the call then
        returns without waiting for the device.

    Returns
    -------
    (log_likelihood, total_second, missing_second, cross, sq, n_observed): a float
    and float64 arrays of X's kind on its device.
    """
    f = _Factors(X, mean, components, noise)
    xp, q, d = f.xp, f.q, f.d
    n = X.shape[0]
    ll = zeros_like(X, ())
    total = zeros_like(X, ((q + 1) ** 2,))
    missing = zeros_like(X, (d, (q + 1) ** 2))
    cross = zeros_like(X, (d, q + 1))
    sq = zeros_like(X, (d,))
    n_obs = zeros_like(X, (d,))
    step = _chunk_rows(n, d, q)
    for start in range(0, n, step):
        stop = min(n, start + step)
        mask, c, log_p, z, cov = f.posterior(X[start:stop])
        m = stop - start
        w = (zeros_like(X, (m,)) + 1.0 if sample_weight is None
             else as_f64(sample_weight[start:stop]))
        z1 = xp.concatenate([z, zeros_like(X, (m, 1)) + 1.0], 1)  # z~ = (z, 1)
        second = z1[:, :, None] * z1[:, None, :]
        second[:, :q, :q] += cov
        second = second.reshape(m, (q + 1) ** 2)
        ll += w @ log_p
        total += w @ second
        missing += ((1.0 - mask) * w[:, None]).T @ second
        wc = c * w[:, None]
        cross += wc.T @ z1
        sq += (wc * c).sum(0)
        n_obs += w @ mask
    return ((ll if keep_on_device else float(ll)), total.reshape(q + 1, q + 1),
            missing.reshape(d, q + 1, q + 1), cross, sq, n_obs)


def masked_posterior_device(X, mean, components, noise):
    """Device ``masked_posterior``: per-row log p(x_O) (n,) and E[z | x_O] (n, q),
    float64 arrays of X's kind."""
    f = _Factors(X, mean, components, noise)
    n = X.shape[0]
    log_p = zeros_like(X, (n,))
    z = zeros_like(X, (n, f.q))
    step = _chunk_rows(n, f.d, f.q)
    for start in range(0, n, step):
        stop = min(n, start + step)
        log_p[start:stop], z[start:stop] = f.posterior(X[start:stop])[2:4]
    return log_p, z


__all__ = ["masked_latent_stats_device", "masked_posterior_device"]
