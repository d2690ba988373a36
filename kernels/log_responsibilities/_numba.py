# Numba CPU kernel for log_responsibilities (row-wise log-sum-exp normalisation).
#
# Design: blocks of 256 rows, transposed into a (K, block) scratch so that the
# max, the sum of exp(v - max) (vectorisable fast_exp, components summed in
# ascending order) and the log (fast_log) each run as one loop over the block's
# rows, in SIMD lanes; then v - log_norm is written row by row.  (Row by row,
# the sum over K components was a reduction this no-reassociation build cannot
# vectorise, and the exponentials ran scalar: 1.6x slower at K = 16.)  Blocks
# are independent, so they run as spans over threads (kernels/_thread_spans.py).
# The same three steps,
# on a (K, tile) layout, are `exp_tile` and `normalise_tile`, used inside the
# fused E-steps.
# Compiled without fast-math reassociation so the subtraction order holds.
# Limits: float32/float64; results in the input dtype; -inf handled exactly
# (exp(-inf) = 0; an all -inf row gives log_norm = -inf and NaN responsibilities).

import numba
import numpy as np

from .._numba_support import CACHE, FASTMATH, fast_exp, fast_log, quotient
from .._thread_spans import run_spans
from .._vector_width import prefer_wide_vectors

_jit = dict(fastmath=FASTMATH, cache=CACHE)
# Without 'reassoc': LLVM would otherwise rewrite (v - m) - log s as v - (m + log s),
# which is exactly the rounding the kernel avoids for huge magnitudes.
_jit_ordered = dict(fastmath=FASTMATH - {"reassoc"}, cache=CACHE)


@numba.njit(inline="always", **_jit)
def row_max(logp, nb, mx):
    """mx[t] = max_k logp[k, t] for the first ``nb`` columns of a (K, block)
    array, components outermost so that the loop over rows vectorises."""
    for t in range(nb):
        mx[t] = -np.inf
    for k in range(logp.shape[0]):
        for t in range(nb):
            mx[t] = max(mx[t], logp[k, t])


# rows per block of the standalone kernel: its (K, block) transpose stays in L1
_BLOCK_ROWS = 256


@numba.njit(nogil=True, **_jit_ordered)
def _log_responsibilities_blocks(V, log_resp, log_norm, b0, b1):
    """Log-responsibilities and log-normalisers of the rows of blocks b0 <= blk < b1."""
    n, n_comp = V.shape
    # scratch, reused tile after tile through the span
    vT = np.empty((n_comp, _BLOCK_ROWS), dtype=V.dtype)
    mx = np.empty(_BLOCK_ROWS, dtype=V.dtype)
    s = np.empty(_BLOCK_ROWS)
    log_s = np.empty(_BLOCK_ROWS)
    for blk in range(b0, b1):
        i0 = blk * _BLOCK_ROWS
        nb = min(_BLOCK_ROWS, n - i0)
        for t in range(nb):
            for k in range(n_comp):
                vT[k, t] = V[i0 + t, k]
        # max, sum of exponentials (components in ascending order) and log,
        # each a loop over the block's rows: vectorised
        row_max(vT, nb, mx)
        for t in range(nb):
            s[t] = 0.0
        for k in range(n_comp):
            for t in range(nb):
                s[t] += fast_exp(vT[k, t] - mx[t])
        for t in range(nb):
            m = mx[t]
            finite = abs(m) < np.inf
            log_s[t] = fast_log(s[t]) if finite else 0.0
            # all -inf -> -inf (NaN responsibilities); +inf / NaN propagate
            log_norm[i0 + t] = m + log_s[t] if finite else m
        for t in range(nb):
            m = mx[t]
            ls = log_s[t]
            # (v - m) - log s: exact even where m + log s rounds to m
            for k in range(n_comp):
                log_resp[i0 + t, k] = (V[i0 + t, k] - m) - ls


@numba.njit(**_jit)
def exp_tile(logp, nb, mx, s, resp, have_max=False):
    """The unnormalised half of :func:`normalise_tile`: resp[k, t] =
    exp(logp[k, t] - max_k logp[k, t]).

    With ``have_max``, ``mx`` already holds the rows' maxima (the fused
    E-step forms them with the log-densities) and is not recomputed.

    On return ``mx[t]`` holds the row's log-sum-exp and ``s[t]`` the factor
    that normalises it (1 / the sum of its exponentials; NaN for a row whose
    max is infinite or NaN), so ``resp[:, t] * s[t]`` are its responsibilities.
    ``resp`` may be ``logp`` itself, but then LLVM's run-time overlap check
    fails and the exponentials run scalar (4x slower): callers pass a
    separate array.
    """
    prefer_wide_vectors()
    n_comp = logp.shape[0]
    if not have_max:
        row_max(logp, nb, mx)
    for t in range(nb):
        s[t] = 0.0
    for k in range(n_comp):
        for t in range(nb):
            e = fast_exp(logp[k, t] - mx[t])
            resp[k, t] = e
            s[t] += e
    log_norm_and_scale(nb, mx, s)


@numba.njit(inline="always", **_jit)
def log_norm_and_scale(nb, mx, s):
    """Finish the rows of :func:`exp_tile`: given each row's max ``mx[t]`` and
    the sum ``s[t]`` of its exp(logp - max), set ``mx[t]`` to the row's
    log-sum-exp and ``s[t]`` to 1 / the sum (NaN for a row whose max is
    infinite or NaN)."""
    prefer_wide_vectors()
    one = s.dtype.type(1)
    for t in range(nb):  # branch-free, so that it vectorises
        m = mx[t]
        total = s[t]  # NaN where m is infinite or NaN (exp(inf - inf), exp(NaN))
        mx[t] = m + fast_log(np.float64(total)) if abs(m) < np.inf else m
        s[t] = quotient(one, total)


@numba.njit(fastmath=FASTMATH, cache=CACHE)
def row_weights(nb, log_norm, scale, sample_weight, row0, has_weight):
    """Multiply each row's ``scale[t]`` by its sample weight and return the
    tile's weighted log-likelihood sum_t w_t log_norm[t] (float64).

    Rows are ``row0:row0 + nb`` of the data; without weights ``scale`` is
    left as it is.
    """
    ll = 0.0
    if has_weight:
        for t in range(nb):
            w = sample_weight[row0 + t]
            ll += w * log_norm[t]
            scale[t] *= w
    else:
        for t in range(nb):
            ll += log_norm[t]
    return ll


@numba.njit(**_jit)
def normalise_tile(logp, nb, mx, s, sample_weight, row0, has_weight, resp):
    """Turn a (K, tile) block of weighted log-probs into responsibilities times
    the rows' sample weights, in ``resp``, and return the tile's weighted
    log-likelihood sum_t w_t log_norm[t] (float64).

    :func:`exp_tile`, :func:`row_weights`, then one scaling pass.  (The fused
    E-step does that scaling inside ``responsibilities_and_masses``.)

    Parameters
    ----------
    logp : ndarray (K, tile)
        Weighted log-probabilities.
    nb : int
        Columns in use.
    mx, s : ndarray (tile,)
        Scratch; on return ``mx[t]`` holds the row's log-sum-exp.
    sample_weight : ndarray (n,), row0 : int, has_weight : bool
        The data's sample weights (ignored without ``has_weight``) and the
        tile's first row.
    resp : ndarray (K, tile), written
        A separate array (see :func:`exp_tile`).
    """
    exp_tile(logp, nb, mx, s, resp)
    ll = row_weights(nb, mx, s, sample_weight, row0, has_weight)
    for k in range(resp.shape[0]):
        for t in range(nb):
            resp[k, t] *= s[t]
    return ll


def log_responsibilities_numba(weighted_log_prob):
    """Numba backend of :func:`fastlvm.kernels.log_responsibilities` (inputs checked)."""
    V = weighted_log_prob
    log_resp = np.empty_like(V, order="C")
    log_norm = np.empty(V.shape[0], dtype=V.dtype)
    if V.shape[0]:
        run_spans(_log_responsibilities_blocks, -(-V.shape[0] // _BLOCK_ROWS), V, log_resp,
                  log_norm)
    return log_resp, log_norm
