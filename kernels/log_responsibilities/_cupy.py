"""CuPy ``log_responsibilities``: row-wise log-sum-exp normalisation.

Design: one launch of ``row_softmax`` (``kernels/_cupy_rows.cu``) in its
LOG_RESP mode: one warp per row, two warp-butterfly reductions (maximum, then
the shifted sum) and one write sweep; any K, any input strides.  Semantics
follow the reference: all -inf rows give -inf and NaN, NaN and +inf propagate,
and the result is (v - max) - log(sum), exact for huge magnitudes.
"""

from .._cupy_gaussian import MODE_LOG_RESP, row_softmax


def log_responsibilities_cupy(V):
    """(log_resp (n, K), log_norm (n,)) of a cupy array of weighted log-densities."""
    return row_softmax(V, MODE_LOG_RESP)
