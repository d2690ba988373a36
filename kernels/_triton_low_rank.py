"""Triton building blocks of the mixture-of-PPCA kernels (``mppca_log_prob``,
``mppca_stats``) on torch tensors.

Design
------
Component k has C_k = W_k^T W_k + sigma_k^2 I (``kernels/_low_rank.py`` has the
algebra).  A tile of BLOCK_N rows is held in registers and, per component,
taken through three ``tl.dot`` products, all on differences taken directly:

    c = x - mu_k            (BLOCK_N, BLOCK_D)
    u = c B_k               (BLOCK_N, BLOCK_Q)   whitened projections, B_k = W_k^T L_k^{-T}
    r = c - u B_k^T         (BLOCK_N, BLOCK_D)   the residual off the subspace
    z = u L_k^{-1}          (BLOCK_N, BLOCK_Q)   the posterior mean E[z | x]

    log N(x | mu_k, C_k) = const_k - (|r|^2 / sigma_k^2 + |z|^2) / 2

This is the cancellation-free form of the reference, where the shorter
(|c|^2 - |u|^2) / sigma^2 cancels as soon as most of a row's spread lies in the
component's subspace.  The explicit residual still loses digits in proportion
to |c| / |r| (the rounding of c and of u B^T is relative to |c|), so in float32
rows with |r|^2 < 2^-10 |c|^2 under some component (keeping fewer than ~18 bits)
take the exact path: c = x - mu_k taken in float64 and (|c|^2 - |u|^2) / sigma^2
with float64 loadings, which keeps 53 - log2(|c|^2 / |r|^2) bits.  Nothing of
size n x K x D is formed.

The exact path runs in a pass of its own (the ``PASS`` constexpr): float32
kernels are launched twice, ``FAST_ROWS`` then ``EXACT_ROWS``.  The first launch
computes every row in float32 and the launch that can tell (the log-normaliser's,
the log-density matrix's) marks the rows that need the exact path in an (n,)
int8 array; the second visits only the tiles holding a marked row and recomputes
those rows, with the float64 fallback for the components whose criterion they
meet.  Inside one kernel the fallback held registers on every tile, used or not:
with it in the same build the sm_90 statistics kernel spilled 1000 bytes at
D = 64, q = 4 (216 without; ``bench/results/sm90-spills.md``).  The passes split
the work by row, never by tile, so each may size its tiles on its own; their sums
are partials of their own, added in a fixed order.  Where nothing is marked the
second launch reads the marks and computes nothing.  float64 launches once,
``ALL_ROWS``, with no exact path.

Features are zero-padded to BLOCK_D and latent dimensions to BLOCK_Q (powers of
two, at least 16, which ``tl.dot`` needs) in every parameter buffer.  float32
products use the precision of :func:`dot_precision`; float64 is IEEE.

Limits: a tile holds all BLOCK_D columns in registers, up to FUSED_MAX_BLOCK_D =
128 padded features (at 256, q = 4 builds kept 8-9 KB of stack per thread);
wider rows take ``_triton_low_rank_wide.py``'s kernels, which step through the
features.  BLOCK_Q >= 16, so q < 16 pads the latent products.
"""

import torch
import triton
import triton.language as tl

from ._low_rank import inverse_cholesky, log_norm_constants, low_rank_factors
from ._triton_gaussian import (TileConfig, block_d, block_log_likelihood, dot_precision,
                               finish_logsumexp, interpreting, launch_fitted, load_rows,
                               online_logsumexp_column, require_int32_rows, row_weights)
from ._triton_launch import cdiv, launch_kernel
from ._triton_low_rank_wide import wide_log_norm, wide_low_rank_rows


# float32: a row takes the exact path where |r|^2 < this |c|^2 under a component
EXACT_PATH_BELOW = 2.0**-10

# the PASS constexpr: which rows a launch computes (module doc)
ALL_ROWS = tl.constexpr(0)  # every row, no exact path (float64)
FAST_ROWS = tl.constexpr(1)  # float32's first pass: every row, the marked ones left out of sums
EXACT_ROWS = tl.constexpr(2)  # float32's second pass: only the marked rows, exact path on


class TritonLowRankParams:
    """Padded device parameters of a mixture of PPCA for the Triton kernels.

    Attributes (torch tensors on X's device, X's dtype, contiguous, unless said)
    ----------
    block_d, block_q : int, padded feature and latent widths
    mu : (K, BLOCK_D) means rounded to X's dtype
    b : (K, BLOCK_D, BLOCK_Q) whitened loadings B_k
    l_inv : (K, BLOCK_Q, BLOCK_Q) L_k^{-1}
    inv_noise : (K,) 1 / sigma_k^2
    const : (K,) -0.5 (D log 2 pi + log det C_k), plus log w_k when weights are given
    b_64, inv_noise_64, const_64 : float64 copies for the exact path
    cancel : float, the exact path's threshold on |r|^2 / |c|^2 (0: never, for float64)
    passes : tuple of the PASS values to launch, in order (module doc)
    mu_64 : (K, D) float64, the means as the kernels apply them (the statistics' centres)
    chol : (K, q, q) float64, L_k (maps u to the projections y = W_k c = L_k u)
    """

    def __init__(self, X, means, components, noise_variance, weights=None):
        require_int32_rows(X.shape[0])
        dev, dt = X.device, X.dtype
        f64 = dict(device=dev, dtype=torch.float64)
        # host parameters copied to the device before any work is queued (torch's
        # copy from pageable host memory waits for the work queued)
        w = torch.as_tensor(components, **f64)
        s2 = torch.as_tensor(noise_variance, **f64)
        mu = torch.as_tensor(means, **f64)
        w_k = None if weights is None else torch.as_tensor(weights, **f64)
        k, q, d = w.shape
        bd, bq = block_d(d), block_d(q)
        chol, log_det, whitened = low_rank_factors(w, s2)
        const = log_norm_constants(log_det, d)
        if w_k is not None:
            const = const + torch.log(w_k)
        self.mu_64 = mu.to(dt).to(torch.float64)
        self.chol = chol
        self.block_d, self.block_q = bd, bq
        self.n_components, self.n_features, self.n_latent = k, d, q

        def padded(a, shape, dtype=dt):
            out = torch.zeros(shape, **f64)
            out[tuple(slice(0, s) for s in a.shape)] = a
            return out.to(dtype).contiguous()

        self.mu = padded(self.mu_64, (k, bd))
        self.b = padded(whitened, (k, bd, bq))
        self.l_inv = padded(inverse_cholesky(chol), (k, bq, bq))
        self.inv_noise = (1.0 / s2).to(dt).contiguous()
        self.const = const.to(dt).contiguous()
        self.cancel = EXACT_PATH_BELOW if dt == torch.float32 else 0.0
        self.passes = (FAST_ROWS.value, EXACT_ROWS.value) if self.cancel else (ALL_ROWS.value,)
        if self.cancel:
            self.b_64 = padded(whitened, (k, bd, bq), torch.float64)
            self.inv_noise_64, self.const_64 = 1.0 / s2, const.contiguous()
        else:
            self.b_64, self.inv_noise_64, self.const_64 = self.b, self.inv_noise, self.const

    def kernel_args(self):
        return (self.mu, self.b, self.l_inv, self.inv_noise, self.const, self.b_64,
                self.inv_noise_64, self.const_64)


def low_rank_config(dtype, bd):
    """The :class:`TileConfig` of the low-rank statistics kernel, and the start of
    :func:`row_pass_config`'s (block_k and block_j unused).

    A fixed table, as for the Gaussian kernels (tile sizes fix the order of
    every sum): rows per tile shrink as D grows, since a tile keeps its centred
    rows and their residuals in registers.
    """
    if interpreting():
        return TileConfig(16, 16, 16, 4, 1)
    f64 = dtype == torch.float64
    if bd <= 64:
        bn = 32 if f64 else 64
    elif bd <= 128:
        bn = 32
    else:
        bn = 16
    return TileConfig(bn, 16, 16, 4 if bd <= 64 else 8, 1)


def row_pass_config(dtype, bd, bq):
    """The :class:`TileConfig` of the kernels that take a block of rows through the
    components (the log-normalisers', the log-density matrix's): those of
    :func:`low_rank_config`, but 16 rows a tile at BLOCK_D = 128 with BLOCK_Q >= 32.

    There, 32-row sm_90 builds of the log-normaliser kept 32 registers and 8-9.5 KB
    per thread in local memory (float32; float64 736 bytes), with Triton 3.6 and
    3.9 alike, and 16-row ones nothing (``bench/results/sm90-spills.md``).  A
    compile-time measure: not yet timed.
    """
    cfg = low_rank_config(dtype, bd)
    return cfg._replace(block_n=16) if bd == 128 and bq >= 32 else cfg


@triton.jit
def low_rank_tile(x, k, mu_ptr, b_ptr, l_inv_ptr, inv_noise_ptr, const_ptr,
                  BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr, PRECISION: tl.constexpr):
    """(c, u, logp, rr): centred rows, whitened projections, const_k + log N(x | k)
    and the squared residuals |r|^2, for a (BLOCK_N, BLOCK_D) tile of rows under
    component k, in the tile's dtype (see the module doc)."""
    cols = tl.arange(0, BLOCK_D)
    lat = tl.arange(0, BLOCK_Q)
    mu = tl.load(mu_ptr + k * BLOCK_D + cols)
    c = x - mu[None, :]
    b = tl.load(b_ptr + k * BLOCK_D * BLOCK_Q + cols[:, None] * BLOCK_Q + lat[None, :])
    u = tl.dot(c, b, input_precision=PRECISION)
    r = c - tl.dot(u, tl.trans(b), input_precision=PRECISION)
    l_inv = tl.load(l_inv_ptr + k * BLOCK_Q * BLOCK_Q + lat[:, None] * BLOCK_Q + lat[None, :])
    z = tl.dot(u, l_inv, input_precision=PRECISION)
    rr = tl.sum(r * r, axis=1)
    logp = tl.load(const_ptr + k) - 0.5 * (rr * tl.load(inv_noise_ptr + k)
                                           + tl.sum(z * z, axis=1))
    return c, u, logp, rr


@triton.jit
def needs_exact(c, rr, CANCEL: tl.constexpr):
    """(BLOCK_N,) bool: the rows whose residual keeps too few bits (|r|^2 < CANCEL |c|^2)."""
    return rr < CANCEL * tl.sum(c * c, axis=1)


@triton.jit
def exact_log_density(x, exact, logp, k, mu_ptr, b64_ptr, inv_noise64_ptr, const64_ptr,
                      BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr):
    """``logp`` with the rows in ``exact`` recomputed in float64 under component k
    (when the tile has one): const_k - (|c|^2 - |u|^2) / (2 sigma_k^2), c and u in
    float64."""
    if tl.max(exact.to(tl.int32), axis=0) > 0:
        cols = tl.arange(0, BLOCK_D)
        lat = tl.arange(0, BLOCK_Q)
        b_off = k * BLOCK_D * BLOCK_Q + cols[:, None] * BLOCK_Q + lat[None, :]
        c64 = x.to(tl.float64) - tl.load(mu_ptr + k * BLOCK_D + cols).to(tl.float64)[None, :]
        u64 = tl.dot(c64, tl.load(b64_ptr + b_off), input_precision="ieee")
        quad = (tl.sum(c64 * c64, axis=1) - tl.sum(u64 * u64, axis=1)) * tl.load(
            inv_noise64_ptr + k)
        logp = tl.where(exact, (tl.load(const64_ptr + k) - 0.5 * quad).to(logp.dtype), logp)
    return logp


@triton.jit
def marked_rows(flags_ptr, rows, row_ok):
    """(BLOCK_N,) bool: the rows of a tile the first float32 pass marked."""
    return row_ok & (tl.load(flags_ptr + rows, mask=row_ok, other=0) != 0)


@triton.jit
def pass_rows(flags_ptr, rows, row_ok, PASS: tl.constexpr):
    """(BLOCK_N,) bool: the rows of a tile a launch that reads the marks computes
    (module doc): every row, the unmarked ones, or the marked ones."""
    if PASS == ALL_ROWS:
        return row_ok
    else:
        marked = marked_rows(flags_ptr, rows, row_ok)
        if PASS == FAST_ROWS:
            return row_ok & (marked == 0)
        else:
            return marked


@triton.jit
def marking_pass_rows(flags_ptr, rows, row_ok, PASS: tl.constexpr):
    """(BLOCK_N,) bool: the rows of a tile a launch that writes the marks computes
    (the log-normaliser's, the log-density matrix's): every row in the first pass
    (which marks them) and without one, the marked ones in the exact pass."""
    if PASS == EXACT_ROWS:
        return marked_rows(flags_ptr, rows, row_ok)
    else:
        return row_ok


@triton.jit
def pass_tile_has_rows(rows_in, PASS: tl.constexpr):
    """Whether a tile has work in this pass: always, but in the exact pass, only
    when one of its rows is marked."""
    if PASS == EXACT_ROWS:
        return tl.max(rows_in.to(tl.int32), axis=0) > 0
    else:
        return True


@triton.jit
def pass_component(x, rows_in, k, mu_ptr, b_ptr, l_inv_ptr, inv_noise_ptr, const_ptr, b64_ptr,
                   inv_noise64_ptr, const64_ptr, CANCEL: tl.constexpr, PASS: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr, PRECISION: tl.constexpr):
    """(c, u, logp, exact): :func:`low_rank_tile` for component k, and in the exact
    pass the float64 fallback on the rows of ``rows_in`` that need it; ``exact``
    marks the rows that need it (all False outside float32's first pass, the one
    that marks)."""
    c, u, logp, rr = low_rank_tile(x, k, mu_ptr, b_ptr, l_inv_ptr, inv_noise_ptr, const_ptr,
                                   BLOCK_D, BLOCK_Q, PRECISION)
    if PASS == ALL_ROWS:
        exact = tl.zeros(rr.shape, dtype=tl.int1)  # float64 has no exact path
    else:
        exact = rows_in & needs_exact(c, rr, CANCEL)
        if PASS == EXACT_ROWS:
            logp = exact_log_density(x, exact, logp, k, mu_ptr, b64_ptr, inv_noise64_ptr,
                                     const64_ptr, BLOCK_D, BLOCK_Q)
    return c, u, logp, exact


@triton.jit
def _low_rank_log_norm_kernel(x_ptr, sw_ptr, mu_ptr, b_ptr, l_inv_ptr, inv_noise_ptr,
                              const_ptr, b64_ptr, inv_noise64_ptr, const64_ptr, flags_ptr,
                              log_norm_ptr, ll_part_ptr, n_rows, n_feat, n_comp, stride_n,
                              stride_d, CANCEL: tl.constexpr, HAS_SW: tl.constexpr,
                              PASS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                              BLOCK_Q: tl.constexpr, PRECISION: tl.constexpr):
    """log sum_k w_k N(x_n | k) for one block of rows, online over the components;
    writes the log-normalisers of the pass's rows and the block's partial
    log-likelihood over them.  The first float32 pass writes every row's
    normaliser and mark, and leaves the marked rows out of its partial; the
    exact pass writes the marked rows' normalisers and their partial."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    rows_in = marking_pass_rows(flags_ptr, rows, row_ok, PASS)
    if pass_tile_has_rows(rows_in, PASS):
        x = load_rows(x_ptr, rows, n_rows, n_feat, stride_n, stride_d, 0, BLOCK_D)
        m = tl.full((BLOCK_N,), float("-inf"), dtype=x.dtype)
        s = tl.zeros((BLOCK_N,), dtype=x.dtype)
        marked = tl.zeros((BLOCK_N,), dtype=tl.int1)
        for k in range(0, n_comp):
            _, _, logp, exact = pass_component(x, rows_in, k, mu_ptr, b_ptr, l_inv_ptr,
                                               inv_noise_ptr, const_ptr, b64_ptr,
                                               inv_noise64_ptr, const64_ptr, CANCEL, PASS,
                                               BLOCK_D, BLOCK_Q, PRECISION)
            m, s = online_logsumexp_column(m, s, logp)
            marked = marked | exact
        lse = finish_logsumexp(m, s)
        tl.store(log_norm_ptr + rows, lse, mask=rows_in)
        if PASS == FAST_ROWS:  # the marked rows' normalisers and partial: the exact pass's
            tl.store(flags_ptr + rows, marked.to(tl.int8), mask=row_ok)
            rows_in = row_ok & (marked == 0)
        tl.store(ll_part_ptr + pid,
                 block_log_likelihood(lse, row_weights(sw_ptr, rows, rows_in, HAS_SW)))
    else:
        tl.store(ll_part_ptr + pid, 0.0)


def launch_passes(name, X, params, launch, row_pass=False):
    """``launch(cfg, pass_)`` for each of ``params.passes`` in order (module doc),
    each pass's tiles fitted on their own (:func:`launch_fitted`, from
    :func:`row_pass_config` where ``row_pass``, else :func:`low_rank_config`);
    returns the list of what the launches return."""
    precision = dot_precision(X.dtype)
    key = (X.dtype, params.block_d, params.block_q, precision)
    cfg = (row_pass_config(X.dtype, params.block_d, params.block_q) if row_pass
           else low_rank_config(X.dtype, params.block_d))
    return [launch_fitted(name, key + (pass_,), cfg, lambda c, p=pass_: launch(c, p))
            for pass_ in params.passes]


def new_marks(X, params):
    """The (n,) int8 marks of rows that take the exact path, for a float32 pass
    to fill (an unused placeholder for float64, which marks nothing)."""
    return (torch.empty(X.shape[0], device=X.device, dtype=torch.int8) if params.cancel
            else params.const)


def low_rank_log_norm(X, params, sample_weight=None):
    """Per-row log-normaliser and the weighted log-likelihood, on X's device.

    Parameters
    ----------
    X : torch.Tensor (n, D), float32/float64
    params : TritonLowRankParams built with the log-weights
    sample_weight : torch.Tensor (n,) of X's dtype, or None

    Returns
    -------
    log_norm : torch.Tensor (n,), X's dtype
    log_likelihood : torch.Tensor (), float64 (fixed-order sum of block partials)
    marks : torch.Tensor (n,) int8 or None
        float32: 1 on the rows that take the exact path (the module doc), for
        the statistics' passes; float64, and rows past FUSED_MAX_BLOCK_D
        (``_triton_low_rank_wide.py``, whose exact path is inline): None.
    """
    if wide_low_rank_rows(params.block_d):  # features in steps, chunk by chunk
        return (*wide_log_norm(X, params, sample_weight), None)
    n = X.shape[0]
    out = torch.empty(n, device=X.device, dtype=X.dtype)
    sw = sample_weight if sample_weight is not None else params.const
    marks = new_marks(X, params)

    def launch(cfg, pass_):
        n_blocks = max(1, cdiv(n, cfg.block_n))
        part = torch.empty(n_blocks, device=X.device, dtype=X.dtype)
        launch_kernel(_low_rank_log_norm_kernel, (n_blocks,),
            X, sw, *params.kernel_args(), marks, out, part, n, params.n_features,
            params.n_components, X.stride(0), X.stride(1), CANCEL=params.cancel,
            HAS_SW=sample_weight is not None, PASS=pass_, BLOCK_N=cfg.block_n,
            BLOCK_D=params.block_d, BLOCK_Q=params.block_q,
            PRECISION=dot_precision(X.dtype), **cfg.launch())
        return part

    parts = launch_passes("low_rank_log_norm", X, params, launch, row_pass=True)
    ll = sum(part.to(torch.float64).sum() for part in parts)  # the passes in order
    return out, ll, (marks if params.cancel else None)
