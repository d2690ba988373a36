"""CuPy ``mppca_log_prob``: the (n, K) log-density matrix of a mixture of PPCA on
cupy arrays, through the ``low_rank_log_prob`` CUDA kernel
(``kernels/_cupy_low_rank.py`` has the design and its limits)."""

import cupy

from .._cupy_low_rank import LowRankParams, chunk_rows, low_rank_rows


def mppca_log_prob_cupy(X, means, components, noise_variance):
    """(n, K) log N(x_n | mu_k, W_k^T W_k + sigma_k^2 I), X's dtype, on X's device.

    Parameters
    ----------
    X : cupy.ndarray (n, D), float32/float64
    means : ndarray or cupy.ndarray (K, D)
    components : ndarray or cupy.ndarray (K, q, D)
    noise_variance : ndarray or cupy.ndarray (K,)

    Returns
    -------
    cupy.ndarray (n, K)
    """
    p = LowRankParams(X.dtype, means, components, noise_variance)
    n = X.shape[0]
    out = cupy.empty((n, p.n_components), dtype=X.dtype)
    step = chunk_rows(p)
    for start in range(0, n, step):
        stop = min(n, start + step)
        low_rank_rows(X, p, start, stop, out=out[start:stop])
    return out
