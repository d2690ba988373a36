"""CuPy ``gaussian_mstep``: the M-step on cupy arrays, fused.

Design
------
The CuPy E-step (``kernels/estep_stats/_cupy.py``) leaves its sums on the
device in float64: N_k, sum r x' and the second moments around the centres it
used.  The M-step from them, and the next E-step's coefficients, written with
CuPy operations (``fastlvm.mixture._gaussian_params`` and
``kernels/_cupy_gaussian.ExpandedParams``) are 49-57 array operations (counted
on a NumPy-backed cupy; 'full' and 'tied' add cuSOLVER's factorisation and
inverse), each tens of microseconds of host time: at N = 1M, D = 32, K = 16 a
large share of the iteration.  Here they are the kernels of ``kernels/_cupy_mstep.cu``, one
warp per item, in three launches ('diag', 'spherical') or five ('full', 'tied'):

1. ``mstep_component`` (one warp per component): N_k + 10 eps, the means, and
   'diag' / 'spherical' the covariances, their precision factors and the
   checks; 'full' / 'tied' the vectors a_k, e_k that move the moments.
2. ``mstep_covariance``, a warp per covariance row ('tied': every component's
   cross terms added in component order); then ``mstep_cholesky``, a warp per
   matrix: the factor and sklearn's upper precision factor inv(L)^T, flagging a
   pivot that is not positive.
3. ``mstep_shift`` (a warp per feature): the total weight and the new shift c0,
   rounded to the data's dtype.
4. ``mstep_terms`` (a warp per component): the weights, the expanded
   coefficients of ``kernels/_expanded_gaussian.py`` and the summary
   [log-likelihood, entries not finite, entries not positive or failed
   factorisations, then each component's kappa_k], which the caller reads in
   one transfer (kappa_k: how far mean k lies from c0 in its own deviations,
   squared, by which float32 coefficients are seen to need float64).

Every sum runs in a fixed order (lane-strided, then a warp butterfly): the
result is bitwise reproducible for a given device, shape and dtype.  Nothing is
read back here.  Limits: those of ``_cupy_mstep.cu`` (one warp factorises a
whole matrix: right for the D of a mixture, slow for D in the thousands).
"""

import math

import cupy
import numpy as np

from .._covariance import COVARIANCE_CODE, DIAG, FULL, SPHERICAL, TIED
from .._cupy_gaussian import ExpandedParams
from .._cupy_source import CudaSource
from ._reference import MStepResult

LOG_2PI = math.log(2.0 * math.pi)
MSTEP_KERNELS = CudaSource("_cupy_mstep.cu", (
    "mstep_component", "mstep_covariance", "mstep_cholesky", "mstep_shift", "mstep_terms"))


def gaussian_mstep_cupy(nk, s1, s2, ll, center, covariance_type, reg_covar, eps, dtype,
                        out=None, shift64=None):
    """The M-step from the CuPy E-step's sums, and the next E-step's coefficients
    (see the module's design note and :func:`gaussian_mstep_ref`, whose partials
    are these sums with one split).

    Parameters
    ----------
    nk : cupy.ndarray (K,), float64
        sum_n w_n r_nk.
    s1 : cupy.ndarray (K, D), float64
        sum_n w_n r_nk (x_n - c_k), around the centres ``center``.
    s2 : cupy.ndarray, float64
        Second moments around the centres: (K, D, D) 'full', (D, D) 'tied'
        (sum_n w_n x'_n x'_n^T), (K, D) 'diag', (K,) 'spherical'.
    ll : cupy.ndarray (P,) or 0-d, float64
        Log-likelihood partials, summed for the bound.
    center : cupy.ndarray, float64
        The centres: (K, D) for 'full' (c0 + mu'_k), the shift c0 (D,) otherwise.
    covariance_type : {'full', 'tied', 'diag', 'spherical'}
    reg_covar : float
    eps : float
        Machine epsilon of the data's dtype.
    dtype : numpy dtype
        The compute dtype (the data's, or float64 for float32 data whose
        expanded form would lose digits): the shift and the coefficients are
        written in it.
    out : MStepResult or None
        Arrays to write the results into, where a field is not None (contiguous,
        of the result's shape and dtype): a CUDA graph's static buffers, which then
        need no copies (``fastlvm.mixture._device_em_step.GraphedStep``).
        ``summary`` is always allocated, and 'diag''s ``quadratic`` is the view of
        ``linear`` whatever is given.
    shift64 : cupy.ndarray (D,) float64 or None
        Where to write the shift in float64 (which the kernels compute anyway).

    Returns
    -------
    MStepResult of cupy arrays on the sums' device (``out``'s where given);
    nothing is read back.  The coefficients are unpadded; for 'diag', ``linear``
    is the (K, 2D) block [a, b] that the E-step multiplies in one product, and
    ``quadratic`` a view of its second half.
    """
    code = COVARIANCE_CODE.get(covariance_type)
    if code is None:
        raise ValueError(f"covariance_type={covariance_type!r}; use 'full', 'tied', 'diag' "
                         "or 'spherical'.")
    dt = np.dtype(dtype)
    nk, s1, s2, center = (cupy.ascontiguousarray(a, dtype=cupy.float64)
                          for a in (nk, s1, s2, center))
    ll = cupy.ascontiguousarray(ll, dtype=cupy.float64).reshape(-1)
    k, d = s1.shape
    f64 = dict(dtype=cupy.float64)
    i64 = np.int64
    reg = np.float64(reg_covar)
    sizes = (i64(k), i64(d))
    given = out if out is not None else MStepResult(*(None,) * len(MStepResult._fields))

    def take(name, shape, dtype=cupy.float64):
        buffer = getattr(given, name)
        return cupy.empty(shape, dtype=dtype) if buffer is None else buffer

    nk_eps = cupy.empty(k, **f64)
    means = take("means", (k, d))
    if code in (DIAG, SPHERICAL):
        cov = take("covariances", (k, d) if code == DIAG else (k,))
        pc = take("precisions_cholesky", cov.shape)
        bad, failed = cupy.empty(k, **f64), cupy.empty(k, **f64)
        a = e = nk  # not written
    else:
        a, e = cupy.empty((k, d), **f64), cupy.empty((k, d), **f64)
        cov = pc = bad = failed = nk  # not written: the kernels below make them
    MSTEP_KERNELS.launch("mstep_component", dt, k, (
        nk, s1, s2, center, i64(d if code == FULL else 0), reg, np.float64(10 * eps),
        nk_eps, means, a, e, cov, pc, bad, failed, *sizes, i64(code)))
    if code in (FULL, TIED):
        cov = take("covariances", (k, d, d) if code == FULL else (d, d))
        rows = k * d if code == FULL else d
        bad = cupy.empty(rows, **f64)
        MSTEP_KERNELS.launch("mstep_covariance", dt, rows,
                             (s2, nk, nk_eps, a, e, reg, cov, bad, *sizes, i64(code == TIED)))
        n_matrices = k if code == FULL else 1
        pc, lower = take("precisions_cholesky", cov.shape), cupy.empty_like(cov)
        failed = cupy.empty(n_matrices, **f64)
        MSTEP_KERNELS.launch("mstep_cholesky", dt, n_matrices,
                             (cov, lower, pc, failed, i64(n_matrices), i64(d)))
    shift64 = cupy.empty(d, **f64) if shift64 is None else shift64
    shift, total = take("shift", d, dt), cupy.empty(1, **f64)
    MSTEP_KERNELS.launch("mstep_shift", dt, d, (nk_eps, means, shift64, shift, total, *sizes))
    weights = take("weights", k)
    linear = take("linear", (k, 2 * d) if code == DIAG else (k, d), dt)
    constant = take("constant", k, dt)
    # written for 'spherical' (s) and for 'full' and 'tied' (u)
    s = take("quadratic", k, dt) if code == SPHERICAL else constant
    u = take("quadratic", pc.shape, dt) if code in (FULL, TIED) else constant
    work = cupy.empty((k, d), **f64) if code == TIED else nk
    summary = cupy.empty(3 + k, **f64)
    MSTEP_KERNELS.launch("mstep_terms", dt, k, (
        nk_eps, means, pc, shift64, total, ll, bad, failed, np.float64(0.5 * d * LOG_2PI),
        weights, linear, s, constant, u, work, summary, *sizes, i64(ll.size), i64(bad.size),
        i64(failed.size), i64(code)))
    quadratic = {DIAG: linear[:, d:], SPHERICAL: s}.get(code, u)
    return MStepResult(summary, weights, means, cov, pc, shift, linear, quadratic, constant)


def expanded_params_outputs(params, fitted):
    """(out, shift64) of :func:`gaussian_mstep_cupy` that write the fitted parameters
    into ``fitted`` (weights, means, covariances, precisions_cholesky: float64
    arrays of their shapes) and the next E-step's coefficients into the arrays of
    ``params``, an :class:`ExpandedParams` the E-step has read (a CUDA graph's
    static coefficients); :func:`refresh_float64_views` then completes ``params``."""
    code = COVARIANCE_CODE[params.covariance_type]
    quadratic = {SPHERICAL: params.s, FULL: params.u, TIED: params.u}.get(code)
    out = MStepResult(None, *fitted, params.c0, params.coef, quadratic, params.c)
    return out, params.c0_64


def refresh_float64_views(params):
    """Make 'full''s float64 mu'_k anew in ``params``, in place, after an M-step wrote
    its terms (:func:`expanded_params_outputs`; the kernels wrote the shift's)."""
    if params.mu_64 is not None:
        cupy.copyto(params.mu_64, params.coef)


def next_expanded_params(result, previous):
    """The :class:`ExpandedParams` of the next E-step from an :class:`MStepResult` of
    :func:`gaussian_mstep_cupy`; 'tied' keeps ``previous``'s fixed s = -1/2."""
    code = COVARIANCE_CODE[previous.covariance_type]
    s = {SPHERICAL: result.quadratic, TIED: previous.s}.get(code)
    u = result.quadratic if code in (FULL, TIED) else None
    return ExpandedParams.from_terms(previous.covariance_type, result.shift, result.linear, s,
                                     result.constant, u)
