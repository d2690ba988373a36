"""Triton ``gaussian_mstep``: the 'diag' / 'spherical' M-step on the device, fused.

Design
------
An EM iteration on a GPU is one statistics kernel over X followed by an M-step
on K x D numbers.  Written as torch operations, that M-step and the next
E-step's coefficients are some 85 small launches, each a few microseconds of
host time: more than the statistics kernel itself at N = 1M, D = 32, K = 16
on an H200.  Here they are two launches:

1. ``_component_kernel``, one program per component: sums the statistics
   kernel's per-split partials (N_k, sum r x', second moments around c0) in
   float64 over the split axis, then forms N_k + 10 eps, the mean, the
   covariance (the shifted-moment algebra of ``_covariance.shift_second_moment``,
   plus ``reg_covar``) and its precision factor 1 / sqrt(cov), and counts the
   covariance entries that are not finite or not positive.
2. ``_next_terms_kernel``, one program per tile of components: every program
   sums N_k + 10 eps and (N_k + 10 eps) mu_k over all components in the same
   fixed order (so all hold the same total and the same new shift c0, rounded
   to the data's dtype), then writes its components' weights and the expanded
   coefficients of ``_expanded_gaussian`` (a_k, b_k or s_k, c_k) for the next
   E-step; program 0 also writes c0 and a summary: the sum of the
   log-likelihood partials and the two counts, which the caller reads in one
   transfer, its only wait for the device in the iteration.

Every sum runs in a fixed order: the result is bitwise reproducible for a
given device, shape and dtype.  Scalars that must stay float64 (reg_covar,
10 eps, D/2 log 2 pi) reach the kernels in a small device tensor, since
Triton passes Python floats as float32; it is made once per (device, values).

Limits: 'diag' and 'spherical' only ('tied' and 'full' need a Cholesky
factorisation, which stays with torch); one program holds BLOCK_S x BLOCK_D
float64 partials, so very wide D (thousands) runs with few splits per step.
"""

import math

import torch
import triton
import triton.language as tl

from .._covariance import DIAG, SPHERICAL
from .._triton_gaussian import GaussianTileParams
from ._reference import MStepResult

LOG_2PI = math.log(2.0 * math.pi)
# float64 elements a program accumulates at once (BLOCK_S x BLOCK_D, BLOCK_K x BLOCK_D)
_TILE_ELEMENTS = 2048


@triton.jit
def _component_kernel(nk_ptr, s1_ptr, s2_ptr, c0_ptr, consts_ptr, nk_eps_ptr, mean_ptr,
                      cov_ptr, pc_ptr, bad_ptr, n_splits, n_feat, n_comp,
                      COV: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """Component k's N_k + 10 eps, mean, covariance, precision factor and flags.

    Inputs: partials nk (S, K), s1 (S, K, BLOCK_D), s2 (S, K, BLOCK_D) 'diag'
    or (S, K) 'spherical', in the data's dtype; c0 (D,) float64; consts
    [reg_covar, 10 eps, D/2 log 2 pi] float64.  Outputs (float64): nk_eps (K,),
    mean (K, D), cov and pc (K, D) 'diag' or (K,) 'spherical', bad (K, 2):
    [entries not finite, entries not positive].
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
        else:
            s2_sph += tl.load(s2_ptr + row, mask=s_ok, other=0.0).to(tl.float64)
    reg = tl.load(consts_ptr)
    nk = tl.sum(nk_acc, axis=0)
    nk_eps = nk + tl.load(consts_ptr + 1)
    c0 = tl.load(c0_ptr + cols, mask=col_ok, other=0.0)
    sum_x = tl.sum(s1_acc, axis=0) + nk * c0
    mean = sum_x / nk_eps
    # second moments around the new mean: S - 2 a e + N e^2, a = sum_x - N c0, e = m - c0
    a = sum_x - nk * c0
    e = mean - c0
    tl.store(nk_eps_ptr + k, nk_eps)
    tl.store(mean_ptr + k * n_feat + cols, mean, mask=col_ok)
    if COV == 2:
        cov = (tl.sum(s2_acc, axis=0) - 2.0 * a * e + nk * e * e) / nk_eps + reg
        tl.store(cov_ptr + k * n_feat + cols, cov, mask=col_ok)
        tl.store(pc_ptr + k * n_feat + cols, 1.0 / tl.sqrt(cov), mask=col_ok)
        # (cov - cov) is 0 exactly where cov is finite; NaN is not positive either
        not_finite = tl.sum(tl.where(col_ok & ((cov - cov) != 0.0), 1.0, 0.0), axis=0)
        not_positive = tl.sum(tl.where(col_ok, tl.where(cov > 0.0, 0.0, 1.0), 0.0), axis=0)
    else:
        scatter = (tl.sum(s2_sph, axis=0) - 2.0 * tl.sum(a * e, axis=0)
                   + nk * tl.sum(e * e, axis=0))
        cov = scatter / (nk_eps * n_feat) + reg
        tl.store(cov_ptr + k, cov)
        tl.store(pc_ptr + k, 1.0 / tl.sqrt(cov))
        not_finite = tl.where((cov - cov) != 0.0, 1.0, 0.0)
        not_positive = tl.where(cov > 0.0, 0.0, 1.0)
    tl.store(bad_ptr + 2 * k, not_finite.to(tl.float64))
    tl.store(bad_ptr + 2 * k + 1, not_positive.to(tl.float64))


@triton.jit
def _next_terms_kernel(nk_eps_ptr, mean_ptr, pc_ptr, bad_ptr, ll_ptr, consts_ptr,
                       weight_ptr, c0_ptr, a_ptr, q_ptr, c_ptr, summary_ptr,
                       n_feat, n_comp, n_ll, COV: tl.constexpr, BLOCK_K: tl.constexpr,
                       BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    """Weights, the new shift and the expanded coefficients of one component tile.

    Outputs: weights (K,) float64; in the data's dtype (``c0_ptr``'s), padded
    with zeros to BLOCK_D: c0 (BLOCK_D,), a (K, BLOCK_D), q = b (K, BLOCK_D)
    'diag' or s (K,) 'spherical', c (K,); summary (3,) float64 from program 0.
    """
    pid = tl.program_id(0)
    dt = c0_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < n_feat
    offsets = tl.arange(0, BLOCK_K)
    # the same fixed-order totals in every program
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
    c0 = (tl.sum(shift_acc, axis=0) / total).to(dt).to(tl.float64)
    ks = pid * BLOCK_K + offsets
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
        c = const + tl.sum(tl.log(pc), axis=1) - 0.5 * tl.sum(p2 * mu * mu, axis=1)
        tl.store(q_ptr + out, tl.where(tile_ok, -0.5 * p2, 0.0).to(dt), mask=k_ok[:, None])
    else:
        pc = tl.load(pc_ptr + ks, mask=k_ok, other=1.0)
        p2 = pc * pc
        c = const + n_feat * tl.log(pc) - 0.5 * p2 * tl.sum(mu * mu, axis=1)
        p2 = p2[:, None]
        tl.store(q_ptr + ks, (-0.5 * pc * pc).to(dt), mask=k_ok)
    tl.store(a_ptr + out, (p2 * mu).to(dt), mask=k_ok[:, None])
    tl.store(c_ptr + ks, c.to(dt), mask=k_ok)
    if pid == 0:
        tl.store(c0_ptr + cols, c0.to(dt))
        ll_acc = tl.zeros((BLOCK_L,), dtype=tl.float64)
        for l0 in range(0, n_ll, BLOCK_L):
            ls = l0 + tl.arange(0, BLOCK_L)
            ll_acc += tl.load(ll_ptr + ls, mask=ls < n_ll, other=0.0).to(tl.float64)
        bad_acc = tl.zeros((BLOCK_K, 2), dtype=tl.float64)
        two = tl.arange(0, 2)
        for k0 in range(0, n_comp, BLOCK_K):
            kb = k0 + offsets
            bad_acc += tl.load(bad_ptr + kb[:, None] * 2 + two[None, :],
                               mask=(kb < n_comp)[:, None], other=0.0)
        bad = tl.sum(bad_acc, axis=0)
        tl.store(summary_ptr, tl.sum(ll_acc, axis=0))
        tl.store(summary_ptr + 1 + two, bad)


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
    return max(2, min(triton.next_power_of_2(max(int(n), 1)), limit))


def gaussian_mstep_triton(nk_parts, s1_parts, s2_parts, ll_parts, center, covariance_type,
                          reg_covar, eps):
    """The M-step from the statistics kernel's partials, and the next E-step's
    coefficients, in two launches (see the module's design note).

    Parameters
    ----------
    nk_parts : torch.Tensor (S, K), the data's dtype
    s1_parts : torch.Tensor (S, K, BLOCK_D)
    s2_parts : torch.Tensor (S, K, BLOCK_D) 'diag', (S, K) 'spherical'
    ll_parts : torch.Tensor (P,), any float dtype
    center : torch.Tensor (D,), float64: the partials' shift c0
    covariance_type : {'diag', 'spherical'}
    reg_covar : float
    eps : float
        Machine epsilon of the data's dtype.

    Returns
    -------
    MStepResult of tensors on the partials' device; nothing is read back.
    """
    code = {"diag": DIAG, "spherical": SPHERICAL}.get(covariance_type)
    if code is None:
        raise ValueError(f"covariance_type={covariance_type!r}; the fused M-step covers "
                         "'diag' and 'spherical'.")
    dev, dt = s1_parts.device, s1_parts.dtype
    n_splits, k, bd = s1_parts.shape
    d = center.shape[0]
    f64 = dict(device=dev, dtype=torch.float64)
    param_shape = (k, d) if code == DIAG else (k,)
    nk_eps = torch.empty(k, **f64)
    means = torch.empty(k, d, **f64)
    cov = torch.empty(param_shape, **f64)
    pc = torch.empty(param_shape, **f64)
    bad = torch.empty(k, 2, **f64)
    consts = _constants(dev, reg_covar, eps, d)
    block_s = _block(n_splits, max(2, _TILE_ELEMENTS // bd))
    _component_kernel[(k,)](nk_parts, s1_parts, s2_parts, center, consts, nk_eps, means, cov,
                            pc, bad, n_splits, d, k, COV=code, BLOCK_S=block_s, BLOCK_D=bd,
                            num_warps=4)
    weights = torch.empty(k, **f64)
    c0 = torch.empty(bd, device=dev, dtype=dt)
    linear = torch.empty(k, bd, device=dev, dtype=dt)
    quadratic = torch.empty((k, bd) if code == DIAG else (k,), device=dev, dtype=dt)
    constant = torch.empty(k, device=dev, dtype=dt)
    summary = torch.empty(3, **f64)
    block_k = _block(k, max(2, _TILE_ELEMENTS // bd))
    n_ll = ll_parts.numel()
    _next_terms_kernel[(triton.cdiv(k, block_k),)](
        nk_eps, means, pc, bad, ll_parts, consts, weights, c0, linear, quadratic,
        constant, summary, d, k, n_ll, COV=code, BLOCK_K=block_k, BLOCK_D=bd,
        BLOCK_L=_block(n_ll, 1024), num_warps=4)
    return MStepResult(summary, weights, means, cov, pc, c0, linear, quadratic, constant)


def next_tile_params(result, previous):
    """The :class:`GaussianTileParams` of the next E-step from an :class:`MStepResult`
    of :func:`gaussian_mstep_triton`; ``previous`` lends its placeholder buffers."""
    d = result.means.shape[1]
    if previous.code == DIAG:  # 'diag' has no per-row term: s stays zeros
        b, s = result.quadratic, previous.s
    else:
        b, s = previous.b, result.quadratic
    return GaussianTileParams.from_terms(previous.code, d, result.shift, result.linear, b, s,
                                         result.constant, previous.u)
