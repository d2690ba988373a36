"""Triton ``gaussian_mstep``: the M-step on the device, fused.

Design
------
An EM iteration on a GPU is one statistics pass over X followed by an M-step
on K x D (x D) numbers.  Written as torch operations, that M-step and the next
E-step's coefficients are 85-105 small launches, each a few microseconds of
host time: more than the statistics kernel itself at N = 1M, D = 32, K = 16
on an H200.  Here they are two launches ('diag', 'spherical') or three around
torch's batched Cholesky ('full', 'tied'):

1. ``_component_kernel``, one program per component: sums the statistics
   kernel's per-split partials (N_k, sum r x') in float64 over the split axis
   and forms N_k + 10 eps and the mean.  'diag' and 'spherical' finish here:
   the covariance (the shifted-moment algebra of
   ``_covariance.shift_second_moment``, plus ``reg_covar``), its precision
   factor 1 / sqrt(cov), and counts of entries not finite or not positive.
   'full' and 'tied' leave N_k, a_k = sum_x - N_k c_k and e_k = m_k - c_k.
2. 'full': ``_full_covariance_kernel``, one program per (component, block of
   the D x D matrix), sums the D x D partials over the splits; 'tied':
   ``_tied_covariance_kernel``, one program per block, sums the scatter
   partials and every component's cross terms in component order.  Both move
   the moments to the new means, divide, add ``reg_covar`` to the diagonal,
   symmetrise (each entry on or below the diagonal computed once, in its
   block, and stored in both places; blocks above the diagonal compute
   nothing) and count entries not finite.  Then ``precision_factors_torch``
   (``_covariance.py``): ``cholesky_ex`` and a triangular solve, with no read.
3. ``_next_terms_kernel`` ('diag', 'spherical') or ``_next_factor_terms_kernel``
   ('full', 'tied'), one program per tile of components: every program sums
   N_k + 10 eps and (N_k + 10 eps) mu_k over all components in the same fixed
   order (so all hold the same total and the same new shift c0, rounded to the
   data's dtype), then writes its components' weights and the expanded
   coefficients of ``_expanded_gaussian`` for the next E-step ('tied':
   a_k = mu'_k U U^T by column blocks of U; the factors padded to BLOCK_D).
   Program 0 also writes c0 and a summary: the sum of the log-likelihood
   partials and the two counts (the second: factorisations that failed, for
   'full' and 'tied'); every program adds its components' kappa_k, how far
   each mean lies from c0 in its own deviations, squared (0 for 'full'), by
   which the caller sees float32 coefficients that must become float64
   (``kernels/_expanded_gaussian.py``).  The caller reads the summary in one
   transfer, its only wait for the device in the iteration.

Every sum runs in a fixed order: the result is bitwise reproducible for a
given device, shape and dtype.  Scalars that must stay float64 (reg_covar,
10 eps, D/2 log 2 pi) reach the kernels in a small device tensor, since
Triton passes Python floats as float32; it is made once per (device, values).

Limits: one program holds at most about 2048 float64 accumulators (BLOCK_S x
BLOCK_D partials; covariance blocks of 512 entries, twice), so very wide D (thousands)
runs in narrow blocks; the 'tied' covariance kernel loops over every component
in each program (K x D x D work in all, small beside an E-step).  Register
counts at D <= 128 (ptxas, sm_90): 48-218, no spills.  The kernels that hold
whole rows (the component, shift and coefficient kernels) spill at thousands
of padded features (``bench/results/sm90-spills.md``).
"""

import math

import torch
import triton
import triton.language as tl

from .._covariance import COVARIANCE_CODE, DIAG, FULL, SPHERICAL, precision_factors_torch
from .._triton_gaussian import GaussianTileParams
from .._triton_launch import cdiv, launch_kernel, next_power_of_2
from ._reference import MStepResult

LOG_2PI = math.log(2.0 * math.pi)
# float64 elements a program accumulates at once (BLOCK_S x BLOCK_D, BLOCK_K x BLOCK_D,
# BLOCK_R x BLOCK_C)
_TILE_ELEMENTS = 2048
# the covariance kernels' column blocks: rows of the D x D sums in BLOCK_D-wide blocks
# kept 3.7-5.5 KB of stack per thread at BLOCK_D = 4096 in sm_90 builds
_COVARIANCE_BLOCK_COLUMNS = 64
# entries of a covariance block (BLOCK_R x BLOCK_C; it holds two float64 accumulators,
# the partials and their transposes, besides the cross terms): Triton 3.6's sm_90
# builds (the H200's) of the 'full' kernel at D = 300 kept 1432 bytes of stack at
# 32 x 64 (2048 entries) and 64 at 16 x 64, none at 8 x 64 (3.9's kept none at 32 x 64)
_COVARIANCE_BLOCK_ELEMENTS = 512


@triton.jit
def _component_kernel(nk_ptr, s1_ptr, s2_ptr, c0_ptr, consts_ptr, nk_eps_ptr, mean_ptr,
                      cov_ptr, pc_ptr, bad_ptr, n_splits, n_feat, n_comp,
                      COV: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """Component k's N_k + 10 eps, mean, and ('diag', 'spherical') covariance,
    precision factor and flags.

    Inputs: partials nk (S, K), s1 (S, K, BLOCK_D), s2 (S, K, BLOCK_D) 'diag'
    or (S, K) 'spherical' (unread otherwise), in the data's dtype; the centre
    (K, D) 'full', (D,) otherwise, float64; consts [reg_covar, 10 eps,
    D/2 log 2 pi] float64.  Outputs (float64): nk_eps (K,), mean (K, D);
    'diag'/'spherical': cov and pc (K, D) or (K,), bad (2, K): entries not
    finite, then entries not positive; 'full'/'tied', for the covariance kernels:
    N_k in ``bad`` (K,), a_k = sum_x - N_k c_k in ``cov`` and e_k = m_k - c_k in
    ``pc`` (K, D).
    """
    k = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < n_feat
    offsets = tl.arange(0, BLOCK_S)
    nk_acc = tl.zeros((BLOCK_S,), dtype=tl.float64)
    s1_acc = tl.zeros((BLOCK_S, BLOCK_D), dtype=tl.float64)
    s2_acc = tl.zeros((BLOCK_S, BLOCK_D), dtype=tl.float64)  # 'diag'
    s2_sph = tl.zeros((BLOCK_S,), dtype=tl.float64)  # 'spherical'
    for s0 in range(0, n_splits, BLOCK_S):
        splits = s0 + offsets
        s_ok = splits < n_splits
        row = splits * n_comp + k
        tile = row[:, None] * BLOCK_D + cols[None, :]
        nk_acc += tl.load(nk_ptr + row, mask=s_ok, other=0.0).to(tl.float64)
        s1_acc += tl.load(s1_ptr + tile, mask=s_ok[:, None], other=0.0).to(tl.float64)
        if COV == 2:
            s2_acc += tl.load(s2_ptr + tile, mask=s_ok[:, None], other=0.0).to(tl.float64)
        elif COV == 3:
            s2_sph += tl.load(s2_ptr + row, mask=s_ok, other=0.0).to(tl.float64)
    reg = tl.load(consts_ptr)
    nk = tl.sum(nk_acc, axis=0)
    nk_eps = nk + tl.load(consts_ptr + 1)
    if COV == 0:  # 'full': each component's own centre c0 + mu'_k
        c0 = tl.load(c0_ptr + k * n_feat + cols, mask=col_ok, other=0.0)
    else:
        c0 = tl.load(c0_ptr + cols, mask=col_ok, other=0.0)
    sum_x = tl.sum(s1_acc, axis=0) + nk * c0
    mean = sum_x / nk_eps
    # second moments around the new mean: S - 2 a e + N e^2, a = sum_x - N c0, e = m - c0
    a = sum_x - nk * c0
    e = mean - c0
    tl.store(nk_eps_ptr + k, nk_eps)
    tl.store(mean_ptr + k * n_feat + cols, mean, mask=col_ok)
    if COV < 2:
        tl.store(bad_ptr + k, nk)
        tl.store(cov_ptr + k * n_feat + cols, a, mask=col_ok)
        tl.store(pc_ptr + k * n_feat + cols, e, mask=col_ok)
    else:
        # (cov - cov) is 0 exactly where cov is finite; NaN is not positive either
        if COV == 2:
            cov = (tl.sum(s2_acc, axis=0) - 2.0 * a * e + nk * e * e) / nk_eps + reg
            tl.store(cov_ptr + k * n_feat + cols, cov, mask=col_ok)
            tl.store(pc_ptr + k * n_feat + cols, 1.0 / tl.sqrt(cov), mask=col_ok)
            not_finite = tl.sum(tl.where(col_ok & ((cov - cov) != 0.0), 1.0, 0.0), axis=0)
            not_positive = tl.sum(tl.where(col_ok, tl.where(cov > 0.0, 0.0, 1.0), 0.0),
                                  axis=0)
        else:
            scatter = (tl.sum(s2_sph, axis=0) - 2.0 * tl.sum(a * e, axis=0)
                       + nk * tl.sum(e * e, axis=0))
            cov = scatter / (nk_eps * n_feat) + reg
            tl.store(cov_ptr + k, cov)
            tl.store(pc_ptr + k, 1.0 / tl.sqrt(cov))
            not_finite = tl.where((cov - cov) != 0.0, 1.0, 0.0)
            not_positive = tl.where(cov > 0.0, 0.0, 1.0)
        tl.store(bad_ptr + k, not_finite.to(tl.float64))
        tl.store(bad_ptr + n_comp + k, not_positive.to(tl.float64))


@triton.jit
def _covariance_block(acc, acc_t, corr, scale, reg, rows, cols, n_feat, cov_ptr, bad_ptr,
                      bad_index):
    """Store (S + corr) / scale + reg I on the block (rows, cols), symmetrised with the
    sums of the transposed partials ``acc_t``, and the count of the matrix's entries
    not finite that the block's entries on or below the diagonal account for.

    Entry (i, j), i >= j, is stored at (i, j) and at (j, i): one number in both
    places.  Computing (j, i) in its own row's program would not give the same
    bits on a GPU, whose compiler contracts the cross terms' a_i e_j + e_i a_j to
    a fused multiply-add that rounds the two orders differently (seen on an H200:
    a quarter of the entries 1 ulp apart)."""
    tile_ok = (rows < n_feat)[:, None] & (cols < n_feat)[None, :]
    diag = tl.where(rows[:, None] == cols[None, :], reg, 0.0)
    cov = 0.5 * (((acc + corr) / scale + diag) + ((acc_t + corr) / scale + diag))
    lower = tile_ok & (rows[:, None] >= cols[None, :])
    tl.store(cov_ptr + rows[:, None] * n_feat + cols[None, :], cov, mask=lower)
    tl.store(cov_ptr + cols[None, :] * n_feat + rows[:, None], cov, mask=lower)
    # the symmetric matrix's count: an entry below the diagonal stands for two
    twice = tl.where(rows[:, None] == cols[None, :], 1.0, 2.0)
    not_finite = tl.sum(tl.sum(tl.where(lower & ((cov - cov) != 0.0), twice, 0.0), axis=1),
                        axis=0)
    tl.store(bad_ptr + bad_index, not_finite)


@triton.jit
def _cross_terms(nk, a_ptr, e_ptr, rows, cols, n_feat):
    """N e e^T - (a e^T + e a^T) on rows ``rows`` (BLOCK_R, BLOCK_D), for one component
    whose a and e start at ``a_ptr``, ``e_ptr``; symmetric up to rounding
    (:func:`_covariance_block` stores one triangle in both places)."""
    a_r = tl.load(a_ptr + rows, mask=rows < n_feat, other=0.0)
    e_r = tl.load(e_ptr + rows, mask=rows < n_feat, other=0.0)
    a_c = tl.load(a_ptr + cols, mask=cols < n_feat, other=0.0)
    e_c = tl.load(e_ptr + cols, mask=cols < n_feat, other=0.0)
    return (nk * (e_r[:, None] * e_c[None, :])
            - (a_r[:, None] * e_c[None, :] + e_r[:, None] * a_c[None, :]))


@triton.jit
def _summed_partial_block(s2_ptr, first, stride, n_splits, rows, cols, n_feat,
                          BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """The (rows, cols) block of the sum over splits of BLOCK_D x BLOCK_D partials
    (split s at ``first + s * stride``), and the same entries of the sum of their
    transposes, in float64 in split order (zeros outside D x D)."""
    tile_ok = (rows < n_feat)[:, None] & (cols < n_feat)[None, :]
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float64)
    acc_t = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float64)
    for split in range(n_splits):
        p = s2_ptr + first + split * stride
        acc += tl.load(p + rows[:, None] * BLOCK_D + cols[None, :], mask=tile_ok,
                       other=0.0).to(tl.float64)
        acc_t += tl.load(p + cols[None, :] * BLOCK_D + rows[:, None], mask=tile_ok,
                         other=0.0).to(tl.float64)
    return acc, acc_t


@triton.jit
def _block_has_lower(rb, cb, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Whether block (rb, cb) of a D x D matrix holds an entry on or below the
    diagonal (the entries :func:`_covariance_block` computes)."""
    return cb * BLOCK_C <= rb * BLOCK_R + BLOCK_R - 1


@triton.jit
def _full_covariance_kernel(s2_ptr, nk_ptr, nk_eps_ptr, a_ptr, e_ptr, consts_ptr, cov_ptr,
                            bad_ptr, n_splits, n_feat, n_comp, BLOCK_R: tl.constexpr,
                            BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """A block of component k's 'full' covariance (grid (K, row blocks, column
    blocks)): the split partials s2 (S, K, BLOCK_D, BLOCK_D) summed in float64 in
    split order, moved to the new mean, divided by N_k + 10 eps, plus reg_covar on
    the diagonal and symmetrised; bad (K x row blocks x column blocks,) counts
    entries that are not finite (0 for blocks above the diagonal, which compute
    nothing)."""
    k = tl.program_id(0)
    rb = tl.program_id(1)
    cb = tl.program_id(2)
    bad_index = (k * tl.num_programs(1) + rb) * tl.num_programs(2) + cb
    if _block_has_lower(rb, cb, BLOCK_R, BLOCK_C):
        rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        acc, acc_t = _summed_partial_block(s2_ptr, k * BLOCK_D * BLOCK_D,
                                           n_comp * BLOCK_D * BLOCK_D, n_splits, rows, cols,
                                           n_feat, BLOCK_R, BLOCK_C, BLOCK_D)
        corr = _cross_terms(tl.load(nk_ptr + k), a_ptr + k * n_feat, e_ptr + k * n_feat,
                            rows, cols, n_feat)
        _covariance_block(acc, acc_t, corr, tl.load(nk_eps_ptr + k), tl.load(consts_ptr),
                          rows, cols, n_feat, cov_ptr + k * n_feat * n_feat, bad_ptr,
                          bad_index)
    else:
        tl.store(bad_ptr + bad_index, 0.0)


@triton.jit
def _tied_covariance_kernel(s2_ptr, nk_ptr, nk_eps_ptr, a_ptr, e_ptr, consts_ptr, cov_ptr,
                            bad_ptr, n_splits, n_feat, n_comp, BLOCK_R: tl.constexpr,
                            BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """A block of the 'tied' covariance (grid (row blocks, column blocks)): the
    scatter partials s2 (S, BLOCK_D, BLOCK_D) of sum_n w_n x' x'^T summed in split
    order, the cross terms of every component added in component order, divided by
    the sum of N_k + 10 eps, plus reg_covar on the diagonal and symmetrised; bad
    (row blocks x column blocks,) counts entries that are not finite (0 for blocks
    above the diagonal)."""
    rb = tl.program_id(0)
    cb = tl.program_id(1)
    bad_index = rb * tl.num_programs(1) + cb
    if _block_has_lower(rb, cb, BLOCK_R, BLOCK_C):
        rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        acc, acc_t = _summed_partial_block(s2_ptr, 0, BLOCK_D * BLOCK_D, n_splits, rows,
                                           cols, n_feat, BLOCK_R, BLOCK_C, BLOCK_D)
        corr = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float64)
        total = tl.sum(tl.zeros((1,), dtype=tl.float64), axis=0)
        for k in range(n_comp):
            corr += _cross_terms(tl.load(nk_ptr + k), a_ptr + k * n_feat, e_ptr + k * n_feat,
                                 rows, cols, n_feat)
            total += tl.load(nk_eps_ptr + k)
        _covariance_block(acc, acc_t, corr, total, tl.load(consts_ptr), rows, cols, n_feat,
                          cov_ptr, bad_ptr, bad_index)
    else:
        tl.store(bad_ptr + bad_index, 0.0)


@triton.jit
def _total_and_shift(nk_eps_ptr, mean_ptr, cols, n_feat, n_comp, dt, BLOCK_K: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    """sum_k (N_k + 10 eps) and the new shift c0 = sum_k (N_k + 10 eps) mu_k / total,
    rounded to ``dt`` (float64 values, BLOCK_D wide, zero past D): the same fixed-order
    sums in every program that calls it."""
    offsets = tl.arange(0, BLOCK_K)
    col_ok = cols < n_feat
    total_acc = tl.zeros((BLOCK_K,), dtype=tl.float64)
    shift_acc = tl.zeros((BLOCK_K, BLOCK_D), dtype=tl.float64)
    for k0 in range(0, n_comp, BLOCK_K):
        ks = k0 + offsets
        k_ok = ks < n_comp
        nk_eps = tl.load(nk_eps_ptr + ks, mask=k_ok, other=0.0)
        mean = tl.load(mean_ptr + ks[:, None] * n_feat + cols[None, :],
                       mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        total_acc += nk_eps
        shift_acc += nk_eps[:, None] * mean
    total = tl.sum(total_acc, axis=0)
    return total, (tl.sum(shift_acc, axis=0) / total).to(dt).to(tl.float64)


@triton.jit
def _block_sum(ptr, n, BLOCK: tl.constexpr):
    """sum of ptr[0:n] in float64, in a fixed order."""
    acc = tl.zeros((BLOCK,), dtype=tl.float64)
    for i0 in range(0, n, BLOCK):
        idx = i0 + tl.arange(0, BLOCK)
        acc += tl.load(ptr + idx, mask=idx < n, other=0.0).to(tl.float64)
    return tl.sum(acc, axis=0)


@triton.jit
def _next_terms_kernel(nk_eps_ptr, mean_ptr, pc_ptr, bad_ptr, ll_ptr, consts_ptr,
                       weight_ptr, c0_ptr, a_ptr, q_ptr, c_ptr, summary_ptr,
                       n_feat, n_comp, n_ll, COV: tl.constexpr, BLOCK_K: tl.constexpr,
                       BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    """'diag' / 'spherical': weights, the new shift and the expanded coefficients of
    one component tile.

    Outputs: weights (K,) float64; in the compute dtype (``c0_ptr``'s), padded
    with zeros to BLOCK_D: c0 (BLOCK_D,), a (K, BLOCK_D), q = b (K, BLOCK_D)
    'diag' or s (K,) 'spherical', c (K,); summary (3 + K,) float64, its first
    three from program 0, then each component's kappa_k = |mu'_k|^2 in its
    precision's metric (see :func:`gaussian_mstep_triton`).
    """
    pid = tl.program_id(0)
    dt = c0_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < n_feat
    total, c0 = _total_and_shift(nk_eps_ptr, mean_ptr, cols, n_feat, n_comp, dt, BLOCK_K,
                                 BLOCK_D)
    ks = pid * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = ks < n_comp
    tile_ok = k_ok[:, None] & col_ok[None, :]
    weight = tl.load(nk_eps_ptr + ks, mask=k_ok, other=1.0) / total
    tl.store(weight_ptr + ks, weight, mask=k_ok)
    mean = tl.load(mean_ptr + ks[:, None] * n_feat + cols[None, :], mask=tile_ok, other=0.0)
    mu = tl.where(tile_ok, (mean - c0[None, :]).to(dt).to(tl.float64), 0.0)
    const = tl.log(weight) - tl.load(consts_ptr + 2)
    out = ks[:, None] * BLOCK_D + cols[None, :]
    if COV == 2:
        pc = tl.load(pc_ptr + ks[:, None] * n_feat + cols[None, :], mask=tile_ok, other=1.0)
        p2 = tl.where(tile_ok, pc * pc, 0.0)
        spread = tl.sum(p2 * mu * mu, axis=1)  # |mu'_k|^2 in its precision's metric
        c = const + tl.sum(tl.log(pc), axis=1) - 0.5 * spread
        tl.store(q_ptr + out, tl.where(tile_ok, -0.5 * p2, 0.0).to(dt), mask=k_ok[:, None])
    else:
        pc = tl.load(pc_ptr + ks, mask=k_ok, other=1.0)
        p2 = pc * pc
        spread = p2 * tl.sum(mu * mu, axis=1)
        c = const + n_feat * tl.log(pc) - 0.5 * spread
        p2 = p2[:, None]
        tl.store(q_ptr + ks, (-0.5 * pc * pc).to(dt), mask=k_ok)
    tl.store(summary_ptr + 3 + ks, spread, mask=k_ok)
    tl.store(a_ptr + out, (p2 * mu).to(dt), mask=k_ok[:, None])
    tl.store(c_ptr + ks, c.to(dt), mask=k_ok)
    if pid == 0:
        tl.store(c0_ptr + cols, c0.to(dt))
        tl.store(summary_ptr, _block_sum(ll_ptr, n_ll, BLOCK_L))
        tl.store(summary_ptr + 1, _block_sum(bad_ptr, n_comp, BLOCK_K))
        tl.store(summary_ptr + 2, _block_sum(bad_ptr + n_comp, n_comp, BLOCK_K))


@triton.jit
def _factor_terms(k, c0, total, nk_eps_ptr, mean_ptr, pc_ptr, consts_ptr, weight_ptr, a_ptr,
                  u_ptr, c_ptr, n_feat, dt, COV: tl.constexpr, BLOCK_J: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    """Component k's weight, a_k, c_k and ('full') padded factor U_k; 'tied' writes
    the shared factor U from component 0.  Returns kappa_k = |mu'_k U|^2 ('tied';
    0 for 'full', whose E-step takes differences directly)."""
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < n_feat
    weight = tl.load(nk_eps_ptr + k) / total
    tl.store(weight_ptr + k, weight)
    mean = tl.load(mean_ptr + k * n_feat + cols, mask=col_ok, other=0.0)
    mu = tl.where(col_ok, (mean - c0).to(dt).to(tl.float64), 0.0)
    if COV == 0:
        u_in = pc_ptr + k * n_feat * n_feat
        u_out = u_ptr + k * BLOCK_D * BLOCK_D
    else:
        u_in = pc_ptr
        u_out = u_ptr
    log_det = tl.sum(tl.log(tl.load(u_in + cols * n_feat + cols, mask=col_ok, other=1.0)),
                     axis=0)
    c = tl.log(weight) - tl.load(consts_ptr + 2) + log_det
    rows_j = tl.arange(0, BLOCK_J)
    if COV == 0:
        a = mu
        y2 = tl.sum(tl.zeros((1,), dtype=tl.float64), axis=0)
        for r0 in range(0, BLOCK_D, BLOCK_J):  # this component's factor, padded
            rows = r0 + rows_j
            block = tl.load(u_in + rows[:, None] * n_feat + cols[None, :],
                            mask=(rows < n_feat)[:, None] & col_ok[None, :], other=0.0)
            tl.store(u_out + rows[:, None] * BLOCK_D + cols[None, :], block.to(dt))
    else:
        # y = mu' U and a = y U^T, over column blocks of U; c takes -|y|^2 / 2
        a = tl.zeros((BLOCK_D,), dtype=tl.float64)
        y2 = tl.sum(tl.zeros((1,), dtype=tl.float64), axis=0)
        for j0 in range(0, BLOCK_D, BLOCK_J):
            js = j0 + rows_j
            block = tl.load(u_in + cols[:, None] * n_feat + js[None, :],
                            mask=col_ok[:, None] & (js < n_feat)[None, :], other=0.0)
            y = tl.sum(mu[:, None] * block, axis=0)
            a += tl.sum(block * y[None, :], axis=1)
            y2 += tl.sum(y * y, axis=0)
            if k == 0:
                block_t = tl.load(u_in + js[:, None] * n_feat + cols[None, :],
                                  mask=(js < n_feat)[:, None] & col_ok[None, :], other=0.0)
                tl.store(u_out + js[:, None] * BLOCK_D + cols[None, :], block_t.to(dt))
        c = c - 0.5 * y2
    tl.store(a_ptr + k * BLOCK_D + cols, a.to(dt))
    tl.store(c_ptr + k, c.to(dt))
    return y2


@triton.jit
def _next_factor_terms_kernel(nk_eps_ptr, mean_ptr, pc_ptr, bad_ptr, info_ptr, ll_ptr,
                              consts_ptr, weight_ptr, c0_ptr, a_ptr, u_ptr, c_ptr,
                              summary_ptr, n_feat, n_comp, n_bad, n_info, n_ll,
                              COV: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_J: tl.constexpr,
                              BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    """'full' / 'tied': the weights and expanded coefficients of one tile of BLOCK_K
    components, one component at a time (grid (cdiv(K, BLOCK_K),)).

    With mu'_k = mu_k - c0 rounded to the data's dtype and U the precision
    factor (``pc``: (K, D, D) 'full', (D, D) 'tied', float64):
    'full': a_k = mu'_k, c_k = log w_k + log|U_k| - D/2 log 2 pi;
    'tied': a_k = mu'_k U U^T, c_k = log w_k + log|U| - D/2 log 2 pi - |mu'_k U|^2 / 2.
    Outputs in the compute dtype, padded with zeros to BLOCK_D: a (K, BLOCK_D),
    u (K, BLOCK_D, BLOCK_D) 'full' / (BLOCK_D, BLOCK_D) 'tied', c (K,), c0
    (BLOCK_D,); weights (K,) and summary (3 + K,) float64: from program 0
    [log-likelihood, entries of the covariances not finite (``bad``, n_bad
    counts), factorisations that failed (``info`` != 0, n_info of them)], then
    kappa_k from :func:`_factor_terms`.
    """
    pid = tl.program_id(0)
    dt = c0_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK_D)
    total, c0 = _total_and_shift(nk_eps_ptr, mean_ptr, cols, n_feat, n_comp, dt, BLOCK_K,
                                 BLOCK_D)
    for kk in range(BLOCK_K):
        k = pid * BLOCK_K + kk
        if k < n_comp:
            spread = _factor_terms(k, c0, total, nk_eps_ptr, mean_ptr, pc_ptr, consts_ptr,
                                   weight_ptr, a_ptr, u_ptr, c_ptr, n_feat, dt, COV, BLOCK_J,
                                   BLOCK_D)
            tl.store(summary_ptr + 3 + k, spread)
    if pid == 0:
        tl.store(c0_ptr + cols, c0.to(dt))
        tl.store(summary_ptr, _block_sum(ll_ptr, n_ll, BLOCK_L))
        tl.store(summary_ptr + 1, _block_sum(bad_ptr, n_bad, BLOCK_K))
        failed = tl.zeros((BLOCK_K,), dtype=tl.float64)
        for i0 in range(0, n_info, BLOCK_K):
            idx = i0 + tl.arange(0, BLOCK_K)
            info = tl.load(info_ptr + idx, mask=idx < n_info, other=0)
            failed += tl.where(info != 0, 1.0, 0.0)
        tl.store(summary_ptr + 2, tl.sum(failed, axis=0))


_CONSTANTS = {}  # (device, reg_covar, eps, D) -> float64 tensor on the device


def _constants(device, reg_covar, eps, n_features):
    key = (device, float(reg_covar), float(eps), int(n_features))
    consts = _CONSTANTS.get(key)
    if consts is None:
        if len(_CONSTANTS) > 64:
            _CONSTANTS.clear()
        consts = torch.tensor([reg_covar, 10 * eps, 0.5 * n_features * LOG_2PI],
                              dtype=torch.float64, device=device)
        _CONSTANTS[key] = consts
    return consts


def _block(n, limit):
    """A power-of-two tile edge: at least 2, at most ``limit``, no wider than needed."""
    return max(2, min(next_power_of_2(max(int(n), 1)), limit))


def gaussian_mstep_triton(nk_parts, s1_parts, s2_parts, ll_parts, center, covariance_type,
                          reg_covar, eps, out=None):
    """The M-step from the statistics kernel's partials, and the next E-step's
    coefficients (see the module's design note and :func:`gaussian_mstep_ref`).

    Parameters
    ----------
    nk_parts : torch.Tensor (S, K), the compute dtype, which the next
        coefficients take
    s1_parts : torch.Tensor (S, K, BLOCK_D)
    s2_parts : torch.Tensor
        (S, K, BLOCK_D, BLOCK_D) 'full', (S', BLOCK_D, BLOCK_D) 'tied',
        (S, K, BLOCK_D) 'diag', (S, K) 'spherical'
    ll_parts : torch.Tensor (P,), any float dtype
    center : torch.Tensor, float64: the partials' centres, (K, D) 'full', (D,) otherwise
    covariance_type : {'full', 'tied', 'diag', 'spherical'}
    reg_covar : float
    eps : float
        Machine epsilon of the data's dtype.
    out : MStepResult or None
        Tensors to write the results into, where a field is not None (contiguous,
        of the result's shape and dtype): a CUDA graph's static buffers, which
        then need no copies (``fastlvm.mixture._device_em_step.GraphedStep``).
        ``summary`` is always allocated.

    Returns
    -------
    MStepResult of tensors on the partials' device (``out``'s where given);
    nothing is read back.
    """
    code = COVARIANCE_CODE.get(covariance_type)
    if code is None:
        raise ValueError(f"covariance_type={covariance_type!r}; use 'full', 'tied', 'diag' "
                         "or 'spherical'.")
    dev, dt = s1_parts.device, s1_parts.dtype
    n_splits, k, bd = s1_parts.shape
    d = center.shape[-1]
    f64 = dict(device=dev, dtype=torch.float64)
    nk_eps = torch.empty(k, **f64)
    consts = _constants(dev, reg_covar, eps, d)
    block_s = _block(n_splits, max(2, _TILE_ELEMENTS // bd))
    block_k = _block(k, max(2, _TILE_ELEMENTS // bd))
    n_ll = ll_parts.numel()
    block_l = _block(n_ll, 1024)
    given = out if out is not None else MStepResult(*(None,) * len(MStepResult._fields))

    def take(name, shape, dtype):
        buffer = getattr(given, name)
        return torch.empty(shape, device=dev, dtype=dtype) if buffer is None else buffer

    means = take("means", (k, d), torch.float64)
    weights = take("weights", (k,), torch.float64)
    c0 = take("shift", (bd,), dt)
    linear = take("linear", (k, bd), dt)
    constant = take("constant", (k,), dt)
    summary = torch.empty(3 + k, **f64)
    if code in (DIAG, SPHERICAL):
        param_shape = (k, d) if code == DIAG else (k,)
        cov = take("covariances", param_shape, torch.float64)
        pc = take("precisions_cholesky", param_shape, torch.float64)
        bad = torch.empty(2, k, **f64)
        launch_kernel(_component_kernel, (k,), nk_parts, s1_parts, s2_parts, center, consts,
                      nk_eps, means, cov, pc, bad, n_splits, d, k, COV=code, BLOCK_S=block_s,
                      BLOCK_D=bd, num_warps=4)
        quadratic = take("quadratic", (k, bd) if code == DIAG else (k,), dt)
        launch_kernel(_next_terms_kernel, (cdiv(k, block_k),),
            nk_eps, means, pc, bad, ll_parts, consts, weights, c0, linear, quadratic,
            constant, summary, d, k, n_ll, COV=code, BLOCK_K=block_k, BLOCK_D=bd,
            BLOCK_L=block_l, num_warps=4)
        return MStepResult(summary, weights, means, cov, pc, c0, linear, quadratic, constant)
    # 'full' / 'tied': N_k, a_k, e_k per component, then the covariances by blocks,
    # the batched Cholesky (torch), then the coefficients
    nk = torch.empty(k, **f64)
    a = torch.empty(k, d, **f64)
    e = torch.empty(k, d, **f64)
    launch_kernel(_component_kernel, (k,), nk_parts, s1_parts, s1_parts, center, consts, nk_eps,
                  means, a, e, nk, n_splits, d, k, COV=code, BLOCK_S=block_s, BLOCK_D=bd,
                  num_warps=4)
    # covariance blocks of BLOCK_R x BLOCK_C entries (the lower triangle's, each
    # stored in both places)
    block_c = min(bd, _COVARIANCE_BLOCK_COLUMNS)
    block_r = _block(d, max(2, _COVARIANCE_BLOCK_ELEMENTS // block_c))
    blocks = (cdiv(d, block_r), cdiv(d, block_c))
    tiles = dict(BLOCK_R=block_r, BLOCK_C=block_c, BLOCK_D=bd, num_warps=4)
    if code == FULL:
        cov = take("covariances", (k, d, d), torch.float64)
        bad = torch.empty(k * blocks[0] * blocks[1], **f64)
        launch_kernel(_full_covariance_kernel, (k, *blocks),
            s2_parts, nk, nk_eps, a, e, consts, cov, bad, n_splits, d, k, **tiles)
        factor = take("quadratic", (k, bd, bd), dt)
    else:
        cov = take("covariances", (d, d), torch.float64)
        bad = torch.empty(blocks[0] * blocks[1], **f64)
        launch_kernel(_tied_covariance_kernel, blocks,
            s2_parts, nk, nk_eps, a, e, consts, cov, bad, s2_parts.shape[0], d, k, **tiles)
        factor = take("quadratic", (bd, bd), dt)
    pc, info = precision_factors_torch(cov, covariance_type, given.precisions_cholesky)
    launch_kernel(_next_factor_terms_kernel, (cdiv(k, block_k),),
        nk_eps, means, pc, bad, info, ll_parts, consts, weights, c0, linear, factor, constant,
        summary, d, k, bad.numel(), info.numel(), n_ll, COV=code, BLOCK_K=block_k,
        BLOCK_J=_block(bd, max(2, _TILE_ELEMENTS // bd)), BLOCK_D=bd, BLOCK_L=block_l,
        num_warps=4)
    return MStepResult(summary, weights, means, cov, pc, c0, linear, factor, constant)


def tile_params_outputs(params, fitted):
    """The ``out`` of :func:`gaussian_mstep_triton` that writes the fitted parameters
    into ``fitted`` (weights, means, covariances, precisions_cholesky: float64
    tensors of their shapes) and the next E-step's coefficients into the buffers of
    ``params``, a :class:`GaussianTileParams` the E-step has read (a CUDA graph's
    static coefficients); :func:`refresh_float64_views` then completes ``params``."""
    quadratic = {DIAG: params.b, SPHERICAL: params.s}.get(params.code, params.u)
    return MStepResult(None, *fitted, params.c0, params.a, quadratic, params.c)


def refresh_float64_views(params):
    """Make ``params``' float64 views of the shift (and 'full''s mu'_k) anew, in place,
    after an M-step wrote its terms (:func:`tile_params_outputs`)."""
    d = params.n_features
    params.c0_64.copy_(params.c0[:d])
    if params.code == FULL:
        params.mu_64.copy_(params.a[:, :d])


def next_tile_params(result, previous):
    """The :class:`GaussianTileParams` of the next E-step from an :class:`MStepResult`
    of :func:`gaussian_mstep_triton`; ``previous`` lends its placeholder buffers."""
    d = result.means.shape[1]
    b, s, u = previous.b, previous.s, previous.u  # placeholders and constants
    if previous.code == DIAG:  # 'diag' has no per-row term: s stays zeros
        b = result.quadratic
    elif previous.code == SPHERICAL:
        s = result.quadratic
    else:  # 'tied' keeps s = -1/2, 'full' zeros
        u = result.quadratic
    return GaussianTileParams.from_terms(previous.code, d, result.shift, result.linear, b, s,
                                         result.constant, u)
