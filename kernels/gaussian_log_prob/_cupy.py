"""CuPy ``gaussian_log_prob``: the (n, K) log-density matrix on cupy arrays.

Design: chunks of rows through cuBLAS products and the ``row_softmax`` kernel
in its LOG_PROB mode, which adds the per-row and per-component terms and
writes the tile (``kernels/_cupy_gaussian.py`` has the algebra, the chunking
and the limits).  The output is n x K by definition of this op; fitting never
calls it (it streams through ``estep_stats``), only predict / predict_proba
do, chunk by chunk.
"""

from .._cupy_gaussian import ExpandedParams, log_prob


def gaussian_log_prob_cupy(X, means, precisions_cholesky, covariance_type, log_weights=None):
    """(n, K) log N(x_n | mu_k, Sigma_k) (+ log_weights[k] when given), X's dtype.

    Parameters
    ----------
    X : cupy.ndarray (n, D), float32/float64
    means : ndarray (K, D), float64
    precisions_cholesky : ndarray, sklearn's shape for ``covariance_type``
    covariance_type : str
    log_weights : ndarray (K,), optional; folded into the per-component constant

    Returns
    -------
    cupy.ndarray (n, K) on X's device
    """
    params = ExpandedParams(X.dtype, means, precisions_cholesky, covariance_type, log_weights)
    return log_prob(X, params)
