# Numba CPU pruning for mppca_stats: the E-step's rows whose responsibility
# sits on one component skip the other K - 1.
#
# Design: on well-separated data most rows have one responsibility of 1 and
# K - 1 below any float's resolution, yet the dense tile pass pays
# (q + 2) D multiply-adds for each of the K pairs of a row.  Per tile of rows:
#
# 1. anchors: each row's nearest mean, from (x - s) . (mu_k - s) with s the
#    means' average (K D multiply-adds per row, one register-blocked product),
#    or the caller's hints: the anchors the last pass used (a row left dirty
#    gets its nearest mean recomputed for the next pass).  Over EM iterations
#    the clean rows keep their anchor, and the search runs once per fit;
# 2. the rows, sorted by anchor, are copied from X, centred on their
#    anchor's mean, into per-component blocks of rows (not transposed as the
#    dense pass's tile: a row copy is contiguous, and along a block's rows the
#    projections and moments ran faster too, 106 -> 66 ms per 1M clean rows
#    on one thread in float32).  With hints the tile is first copied in order,
#    as rows (``load_tile_rows``), and the blocks gathered from that copy:
#    gathered from X in the blocks' order, which the hardware prefetcher
#    cannot follow, the clean rows took 62-68 ms per 1M float32 rows on one
#    thread of the 2-core EPYC, against 54-56 ms from the copy.
#    Each block's exact log-densities run through mppca_log_prob's row code
#    (the dense pass's arithmetic, the exact path included, which also gives
#    ||x - mu_a||^2), and the centred block serves the moments;
# 3. for every other component k, the triangle inequality in the norm of
#    C_k^{-1/2}, with C_k >= sigma_k^2 I:
#        sqrt(maha_k(x)) >= ||C_k^{-1/2} (mu_a - mu_k)|| - ||x - mu_a|| / sigma_k,
#    the first term precomputed in float64 for the K x K pairs of means.  A
#    row whose every other component is bounded ``PRUNE_NATS`` below its
#    anchor's weighted log-density is clean: responsibility 1 on the anchor;
#    its statistics fold in block by block (running sums along the block's
#    rows, weight = the row's sample weight).  The other rows are dirty;
# 4. the second bound, for a dirty row's components the first keeps.  With
#    r = x - mu_a, delta = mu_a - mu_k and the pull v = C_k^{-1} delta,
#        maha_k(x) = r^T C_k^{-1} r + 2 r . v + delta^T C_k^{-1} delta,
#    and r^T C_k^{-1} r is at least ||r||^2 / lambda_max(C_k) and, by
#    Cauchy-Schwarz in C_k^{-1}'s inner product, (r . v)^2 / (delta^T
#    C_k^{-1} delta).  The pulls (K x K x D in the data's dtype, formed in
#    float64; ``PULL_BYTES`` at most, beyond which the first bound decides
#    alone) are precomputed; a row pays D multiply-adds a component.  The
#    first bound's ||r|| / sigma_k is the whole spread of the row, along the
#    loadings too, which on clusters broad along their loadings dwarfs the
#    gaps: on such data it kept nearly every component of most rows, where
#    this one leaves most rows clean (D = 64, K = 16, q = 4, centres 3 N(0, I),
#    unit loadings, noise deviation 0.5: 33% of rows clean by the first bound,
#    80% by both).  A dirty row that it leaves its anchor alone is clean
#    after all;
# 5. a dirty row whose bounds leave at most ``max_survivors`` components (its
#    anchor's included) is sparse: its (row, survivor) pairs go into
#    per-component blocks as the clean rows do, and its responsibilities are
#    a log-sum-exp over those pairs alone, exact to the same e^-64 (the rows
#    between two clusters have two survivors).  A pair costs about
#    ``SURVIVOR_PAIR_COST`` of the dense pass's (row, component) pairs (one
#    thread, D = 64, q = 4, K = 16: float32 43 ns against 8.8, float64 55
#    against 19.6), so max_survivors = K // that.  The other dirty rows go,
#    transposed, to the caller's dense pass.  At the benchmark's fitted state
#    (7% of 1M rows dirty, nearly all with two survivors) a hinted pass took
#    7% less time, both dtypes, one thread.
#
# What is left out: responsibilities below e^-64 = 1.6e-28 of a row's anchor.
# That is past float32's flush to zero (87 nats) and below anything a sum of
# 2^40 float64 rows could keep beside the M-step's 10 eps floor on N_k (the
# dense float64 pass keeps them down to 708 nats, where they change nothing
# either).  Sums run in another order than the dense pass's, so results agree
# with it to rounding, not bit for bit.  Cost per clean row: K D for the
# anchor (none with a hint) plus (q + 2) D and the copy for its one pair,
# instead of K (q + 2) D.  Limits: rows between two components are dirty, and
# heavily overlapping mixtures gain nothing.  So the launcher first tries the
# pruned path on ``PROBE_ROWS`` rows spread over the data (``pruning_pays``)
# and runs dense when the pruned path's counted work (its rows, pairs, dense
# rows and the second bound's dot products) costs more than three quarters
# of a dense pass (``pruning_lost``, which states the costs); within a pass,
# after such a tile, ``PRUNE_RETRY_TILES`` dense tiles run before the next
# try.  (Without the probe, heavily overlapping data ran 26-33% slower than
# dense: every run of tiles began with a try.)
# K >= 4 (below that the anchors cost about what they save) and n >= 4
# PROBE_ROWS.
# float32/float64.
import numba
import numpy as np

from .._numba_support import (CACHE, FASTMATH, accumulate_columns, gather_rows,
                              gather_rows_transposed, load_tile_transposed, new_tile,
                              load_tile_rows, padded_features, tile_moments)
from ..mppca_log_prob._numba import component_log_prob_rows, exact_quad

_jit = dict(fastmath=FASTMATH, cache=CACHE)

# a component is left out of a row when its weighted log-density is bounded
# this many nats below the row's anchor (see the header)
PRUNE_NATS = 64.0
# relative slack on both terms of the bound, for the rounding of ||x - mu_a||
BOUND_SLACK = 2.0**-10
# fewest components worth pruning
MIN_PRUNED_COMPONENTS = 4
# dense tiles after a tile the pruned path lost (see pruning_lost)
PRUNE_RETRY_TILES = 8
# the pruned path's tiles, in the dense pass's: its per-component blocks hold
# about tile / K rows, and each block pays a fixed cost (its loops' set-up,
# and Numba's reference counts of the dozens of arrays its inlined helpers
# take: a tenth of the hinted pass's profile at 64 rows a block).  With the
# blocks laid end to end (``pruning_scratch``) the longer tiles stay in cache:
# at N = 1M, D = 64, K = 16, q = 4 (2-core EPYC, both dtypes, one and two
# threads), 2 -> 4 made the hinted pass 5-8% faster and 4 -> 8 another 5-8%.
# A run of tiles holds at most 8 (``tiles_per_run``), so more would not change
# the benchmark's tiles.
PRUNE_TILE_FACTOR = 8
# rows the launcher tries the pruned path on before a pass (see pruning_pays)
PROBE_ROWS = 512
# the hints argument of pruned_tile_stats when there are none
NO_HINTS = np.empty(0, dtype=np.int32)
# what the pruned path does with a tile row: all on its anchor, its few
# survivors' exact responsibilities, or the dense pass
CLEAN, SPARSE, DENSE = 0, 1, 2
# what a survivor pair costs in the dense pass's (row, component) pairs, by the
# data's dtype (see max_survivors)
SURVIVOR_PAIR_COST = {np.dtype(np.float32): 5, np.dtype(np.float64): 3}
# the most bytes of pull vectors (K x K x D in the data's dtype, see the header)
# the second bound keeps; beyond, dirty rows keep the first bound's survivors
PULL_BYTES = 16 << 20


class PruningParams:
    """What :func:`pruned_tile_stats` adds to the tile parameters.

    Attributes
    ----------
    centres_t : ndarray (Dp, Kp), the data's dtype: (mu_k - s)^T, zero-padded
    shift : ndarray (Dp,), the data's dtype: s, the means' average
    centre_sq : ndarray (K,), the data's dtype: ||mu_k - s||^2
    gap : ndarray (K, K), float64: (1 - slack) ||C_k^{-1/2} (mu_a - mu_k)|| at [k, a]
    inv_sd : ndarray (K,), float64: (1 + slack) / sigma_k
    nats : float, ``PRUNE_NATS``
    whitened_t : ndarray (K, qp, Dp), the data's dtype: B_k^T, for the blocks' rows
    pulls : tuple
        The second bound's (:func:`pull_bound_terms`): ``pull`` (K, K, D), the
        data's dtype, with C_k^{-1} (mu_a - mu_k) at [a, k], ``gap_sq`` (K, K) float64
        (mu_a - mu_k)^T C_k^{-1} (mu_a - mu_k) at [k, a], ``pull_norm`` (K, K)
        float64 (an upper bound on ||C_k^{-1} (mu_a - mu_k)|| at [k, a]) and
        ``inv_top_var`` (K,) float64 (a lower bound on 1 / lambda_max(C_k));
        empty arrays where ``PULL_BYTES`` is too few for pull, or where
        (D + 1) eps of the data's dtype exceeds ``BOUND_SLACK``
    max_survivors : int, the most components a dirty row keeps on the sparse
        path, its anchor's included: K // ``SURVIVOR_PAIR_COST`` of the data's
        dtype (at least 1)
    """

    def __init__(self, tile_params, n_features, enabled=True):
        p = tile_params
        dtype = p.means.dtype
        n_comp, dp = p.means.shape
        self.nats = PRUNE_NATS
        self.max_survivors = max(n_comp // SURVIVOR_PAIR_COST[np.dtype(dtype)], 1)
        if not enabled:  # placeholders of the kernel's argument types
            self.centres_t = np.zeros((dp, 4), dtype=dtype)
            self.shift = np.zeros(dp, dtype=dtype)
            self.centre_sq = np.zeros(n_comp, dtype=dtype)
            self.gap = np.zeros((n_comp, n_comp))
            self.inv_sd = np.zeros(n_comp)
            self.whitened_t = np.zeros((n_comp, 4, dp), dtype=dtype)
            self.pulls = pull_bound_terms(None, None, None, None, None, dtype, False)
            return
        means = p.means.astype(np.float64)
        shift = means.mean(0).astype(dtype)
        centred = p.means - shift
        self.shift = shift
        self.centres_t = np.zeros((dp, padded_features(n_comp)), dtype=dtype)
        self.centres_t[:, :n_comp] = centred.T
        self.centre_sq = np.einsum("kd,kd->k", centred, centred)
        gaps = mean_gaps(np.ascontiguousarray(means[:, :n_features]), p.whitened64,
                         p.chol_inv_t, p.inv_noise64)
        self.gap = (1.0 - BOUND_SLACK) * np.sqrt(gaps)
        self.inv_sd = (1.0 + BOUND_SLACK) * np.sqrt(p.inv_noise64)
        self.whitened_t = np.ascontiguousarray(p.whitened.transpose(0, 2, 1))
        # (and the dot products' rounding inside the bound's slack: see _pull_survivors)
        fits = (n_comp * n_comp * n_features * np.dtype(dtype).itemsize <= PULL_BYTES
                and (n_features + 1) * np.finfo(dtype).eps <= BOUND_SLACK)
        self.pulls = pull_bound_terms(p.means[:, :n_features].astype(np.float64),
                                      p.whitened64, p.inv_noise64, p.chol, gaps, dtype, fits)

    def kernel_args(self):
        return (self.centres_t, self.shift, self.centre_sq, self.gap, self.inv_sd, self.nats,
                self.whitened_t, self.max_survivors, self.pulls)


def pull_bound_terms(means, whitened64, inv_noise64, chol, gap_sq, dtype, enabled):
    """The second bound's terms (see the module header), formed in float64.

    Parameters
    ----------
    means : ndarray (K, D), float64, the centres (the means rounded to the data's dtype)
    whitened64, inv_noise64, chol
        As :class:`LowRankTileParams` holds them: B_k, 1 / sigma_k^2, L_k.
    gap_sq : ndarray (K, K), (mu_a - mu_k)^T C_k^{-1} (mu_a - mu_k) at [k, a]
    dtype : the data's, the pulls' (formed in float64)
    enabled : bool, False for empty terms (the bound off)

    Returns
    -------
    (pull, gap_sq, pull_norm, inv_top_var), as :class:`PruningParams` names them.
    """
    if not enabled:
        return (np.zeros((0, 0, 0), dtype=dtype), np.zeros((0, 0)), np.zeros((0, 0)),
                np.zeros(0))
    # C_k^{-1} = (I - B_k B_k^T) / sigma_k^2 (Woodbury, with B_k = W_k^T L_k^{-T}),
    # applied to delta[a, k] = mu_a - mu_k for all pairs at once
    # (matmuls over k: einsum took ten times as long here)
    delta = means[None, :, :] - means[:, None, :]  # [k, a]
    along = delta @ whitened64
    pull = ((delta - along @ whitened64.swapaxes(1, 2))
            * inv_noise64[:, None, None]).swapaxes(0, 1)  # [a, k]
    delta = delta.swapaxes(0, 1)
    # its float64 rounding, at most a few eps of ||delta|| / sigma^2 an entry, on
    # top (rounding it to the data's dtype is within the slack, as the row's own)
    d = means.shape[1]
    pull_norm = (np.sqrt(np.einsum("akd,akd->ka", pull, pull))
                 + 2.0**-40 * np.sqrt(d) * np.abs(delta).max(2).T * inv_noise64[:, None])
    # lambda_max(C_k) = lambda_max(W_k W_k^T + sigma_k^2 I) = lambda_max(L_k L_k^T)
    top_var = np.linalg.eigvalsh(chol @ chol.swapaxes(1, 2))[:, -1]
    inv_top_var = 1.0 / ((1.0 + BOUND_SLACK) * top_var)
    return (np.ascontiguousarray(pull, dtype=dtype),
            np.ascontiguousarray(gap_sq, dtype=np.float64), pull_norm, inv_top_var)


@numba.njit(**_jit)
def mean_gaps(means, whitened64, chol_inv_t, inv_noise64):
    """(mu_a - mu_k)^T C_k^{-1} (mu_a - mu_k) at [k, a], float64, by the tile
    kernels' exact path (:func:`exact_quad`: two non-negative terms, no
    cancellation).

    Parameters
    ----------
    means : ndarray (K, D), float64
    whitened64, chol_inv_t, inv_noise64
        As :class:`LowRankTileParams` holds them.

    Returns
    -------
    ndarray (K, K)
    """
    n_comp, d = means.shape
    out = np.empty((n_comp, n_comp))
    c64 = np.empty(d)
    u64 = np.empty(whitened64.shape[2])
    for k in range(n_comp):
        for a in range(n_comp):
            out[k, a] = exact_quad(means[a], means[k], whitened64[k], chol_inv_t[k],
                                   inv_noise64[k], c64, u64)
    return out


@numba.njit(**_jit)
def _anchors(xT, nb, const, centres_t, shift, centre_sq, dT, anchor, best):
    """anchor[t] = argmin_k ||mu_k - s||^2 - 2 (x_t - s).(mu_k - s): each row's
    nearest mean among the components of nonzero weight."""
    for jb in range(0, centres_t.shape[1], 4):
        accumulate_columns(xT, nb, centres_t, jb, xT.shape[0], dT, jb, shift)
    for t in range(nb):
        best[t] = np.inf
        anchor[t] = 0
    for k in range(const.shape[0]):
        if const[k] == -np.inf:  # a component of weight zero anchors nothing
            continue
        ck2 = centre_sq[k]
        for t in range(nb):
            v = ck2 - 2 * dT[k, t]
            if v < best[t]:
                best[t] = v
                anchor[t] = k


@numba.njit(inline="always", **_jit)
def _bound_keeps(gap_ka, root, inv_sd_k, const_k, floor):
    """Whether the bound keeps component k in a row anchored on a (see the
    module header): its weighted log-density, bounded above by const_k -
    0.5 max(gap_ka - root inv_sd_k, 0)^2 with root = ||x - mu_a||, may reach
    ``floor`` = the anchor's minus ``PRUNE_NATS``.  The one test of
    :func:`_mark_survivors` and :func:`_list_survivors`."""
    g = max(gap_ka - root * inv_sd_k, 0.0)
    return const_k - 0.5 * g * g >= floor


@numba.njit(inline="always", **_jit)
def _pull_keeps(pull_r, root, gap_sq_ka, pull_norm_ka, inv_top_var_k, const_k, floor):
    """Whether the second bound keeps component k in a row anchored on a (see
    the module header): with r = x - mu_a, ``pull_r`` = r . C_k^{-1} (mu_a -
    mu_k) and ``root`` = ||r||, maha_k(x) >= max(||r||^2 / lambda_max(C_k),
    pull_r^2 / gap_sq_ka) + 2 pull_r + gap_sq_ka, less ``BOUND_SLACK`` of the
    terms' magnitudes for rounding."""
    if gap_sq_ka <= 0.0:
        return True
    spread = max(root * root * inv_top_var_k, pull_r * pull_r / gap_sq_ka)
    maha = spread + 2.0 * pull_r + gap_sq_ka - BOUND_SLACK * (
        spread + gap_sq_ka + 2.0 * pull_norm_ka * root)
    return const_k - 0.5 * max(maha, 0.0) >= floor


@numba.njit(inline="always", **_jit)
def _mark_survivors(a, m, lp, sq, const, gap, inv_sd, nats, root, floor, flag):
    """flag[j] > 0 where some component other than the anchor ``a`` may keep a
    nonzero responsibility in block row j, given the anchor pair's log-density
    ``lp[j]`` and ||c||^2 ``sq[j]``; 0 where none can (see the module header).

    Components outermost, the block's rows innermost, so that the test runs
    vectorised over rows (a component at a time per row ran at half the speed:
    one thread, 1M rows, 11.5 -> 6.0 ms).  root, floor, flag: float64 scratch
    of at least m.
    """
    for j in range(m):
        root[j] = np.sqrt(np.float64(sq[j]))
        floor[j] = np.float64(lp[j]) - nats
        flag[j] = 0.0
    for k in range(const.shape[0]):
        if k == a:
            continue
        gk = gap[k, a]
        sk = inv_sd[k]
        ck = const[k]
        for j in range(m):
            flag[j] += _bound_keeps(gk, root[j], sk, ck, floor[j])


@numba.njit(inline="always", **_jit)
def _block_starts(count, start):
    """start[k] = count[0] + ... + count[k - 1]: where block k begins when the
    blocks lie one after another in component order."""
    total = 0
    for k in range(count.shape[0]):
        start[k] = total
        total += count[k]


@numba.njit(**_jit)
def _hinted_anchors(hints, row0, nb, const, anchor):
    """Copy the tile's anchor hints into ``anchor``; False (and ``anchor``
    partly written) where one is missing (negative) or names no component of
    nonzero weight."""
    n_comp = const.shape[0]
    for t in range(nb):
        h = hints[row0 + t]
        if h < 0 or h >= n_comp or const[h] == -np.inf:
            return False
        anchor[t] = h
    return True


@numba.njit(inline="always", **_jit)
def _block_moments(c, m, rw, wu, acc, first, cross):
    """first[i] += sum_j rw[j] c[j, i] and cross[i, a] += sum_j c[j, i] wu[a, j]
    over a block's first m rows c (m, Dp): the clean rows' moments, along the
    rows (five running rows of ``acc`` (5, Dp), the data's dtype, per four
    latent columns; summed in the data's dtype over the block and widened
    once into the float64 ``first`` (Dp,) and ``cross`` (Dp, qp)).

    Four rows at a time: a running row is loaded and stored once per four
    rows, not once per row (the loop is bound by those stores: one thread,
    float32, 1M rows of 64 features, 15 -> 10 ms; float64 29 -> 11 ms).  Each
    running sum still adds its rows one by one, in order (the four products
    are chained onto it), so the sums are the one-row loop's, bit for bit.
    """
    dp = c.shape[1]
    zero = c.dtype.type(0)
    m4 = m - m % 4
    for jb in range(0, wu.shape[0], 4):
        for r in range(5):
            for i in range(dp):
                acc[r, i] = zero
        a0 = acc[0]
        a1 = acc[1]
        a2 = acc[2]
        a3 = acc[3]
        a4 = acc[4]
        w0 = wu[jb]
        w1 = wu[jb + 1]
        w2 = wu[jb + 2]
        w3 = wu[jb + 3]
        for j in range(0, m4, 4):
            x = c[j]
            y = c[j + 1]
            z = c[j + 2]
            e = c[j + 3]
            w00, w01, w02, w03 = w0[j], w0[j + 1], w0[j + 2], w0[j + 3]
            w10, w11, w12, w13 = w1[j], w1[j + 1], w1[j + 2], w1[j + 3]
            w20, w21, w22, w23 = w2[j], w2[j + 1], w2[j + 2], w2[j + 3]
            w30, w31, w32, w33 = w3[j], w3[j + 1], w3[j + 2], w3[j + 3]
            if jb == 0:
                r0, r1, r2, r3 = rw[j], rw[j + 1], rw[j + 2], rw[j + 3]
            else:
                r0 = r1 = r2 = r3 = zero
            for i in range(dp):
                v0 = x[i]
                v1 = y[i]
                v2 = z[i]
                v3 = e[i]
                a0[i] = (((a0[i] + w00 * v0) + w01 * v1) + w02 * v2) + w03 * v3
                a1[i] = (((a1[i] + w10 * v0) + w11 * v1) + w12 * v2) + w13 * v3
                a2[i] = (((a2[i] + w20 * v0) + w21 * v1) + w22 * v2) + w23 * v3
                a3[i] = (((a3[i] + w30 * v0) + w31 * v1) + w32 * v2) + w33 * v3
                a4[i] = (((a4[i] + r0 * v0) + r1 * v1) + r2 * v2) + r3 * v3
        for j in range(m4, m):
            x = c[j]
            u0 = w0[j]
            u1 = w1[j]
            u2 = w2[j]
            u3 = w3[j]
            w = rw[j] if jb == 0 else zero
            for i in range(dp):
                v = x[i]
                a0[i] += u0 * v
                a1[i] += u1 * v
                a2[i] += u2 * v
                a3[i] += u3 * v
                a4[i] += w * v
        for i in range(dp):
            cross[i, jb] += a0[i]
            cross[i, jb + 1] += a1[i]
            cross[i, jb + 2] += a2[i]
            cross[i, jb + 3] += a3[i]
            if jb == 0:
                first[i] += a4[i]


@numba.njit(**_jit)
def _pull_survivors(a, n_dirty, dirty, blk, root, floor, const, pulls, alive):
    """The second bound over the components the first left ``alive`` in a
    block's dirty rows (as :func:`_list_survivors` takes them), clearing those
    it rules out; returns its dot products.

    The dot products run in the data's dtype (widened to float64, float32
    hinted passes on overlapping data took 3-6% longer, side by side), and
    their rounding, at most (D + 1) eps ||v|| ||r||, is inside the slack's
    2^-10 * 2 ||v|| ||r||: :class:`PruningParams` leaves the pulls out where
    (D + 1) eps exceeds 2^-10 (float32 data of more than 8,191 features).  A
    call, once per block with dirty rows, not inlined into the block loop that
    every clean row runs through (inlined, the loop measured no different,
    within the noise of 8% that two copies of the same code showed)."""
    pull, gap_sq, pull_norm, inv_top_var = pulls
    d = pull.shape[2]
    zero = blk.dtype.type(0)
    n_dots = 0
    for i in range(n_dirty):
        j = dirty[i]
        c = blk[j]
        for k in range(const.shape[0]):
            if k != a and alive[k, i]:
                v = pull[a, k]
                s = zero
                for f in range(d):
                    s += v[f] * c[f]
                alive[k, i] = _pull_keeps(np.float64(s), root[j], gap_sq[k, a],
                                          pull_norm[k, a], inv_top_var[k], const[k], floor[j])
                n_dots += 1
    return n_dots


@numba.njit(inline="always", **_jit)
def _list_survivors(a, n_dirty, dirty, tile_rows, blk, root, floor, const, gap, inv_sd,
                    pulls, alive, max_survivors, survivors, n_survivors, state):
    """The dirty rows of a block anchored on ``a`` (block rows ``dirty[i]``,
    i < n_dirty, centred rows ``blk[dirty[i]]``; tile rows
    ``tile_rows[dirty[i]]``): each row's components that neither the bound of
    :func:`_mark_survivors` nor the second bound (:func:`_pull_keeps`) rules
    out, its anchor first, into ``survivors[t]`` and their count into
    ``n_survivors[t]``, and its ``state[t]``: ``CLEAN`` where none but the
    anchor is left, ``SPARSE`` where at most ``max_survivors`` are listed,
    ``DENSE`` where more are needed (the list then incomplete).  Returns the
    second bound's dot products (D multiply-adds each).

    The first test (:func:`_bound_keeps`) runs again over the dirty rows alone
    (a few per block on separated data), components outermost as there, into
    ``alive`` (K, >= n_dirty) uint8; the clean rows, most of them, pay nothing
    for the lists.  The second (:func:`_pull_survivors`) costs D multiply-adds
    a component the first keeps (r . C_k^{-1} (mu_a - mu_k), in the data's
    dtype), about a sixth of the row's dense pass at q = 4 where it keeps
    them all.
    """
    n_comp = const.shape[0]
    n_dots = 0
    for k in range(n_comp):
        if k == a:
            continue
        gk = gap[k, a]
        sk = inv_sd[k]
        ck = const[k]
        live = alive[k]
        for i in range(n_dirty):
            j = dirty[i]
            live[i] = _bound_keeps(gk, root[j], sk, ck, floor[j])
    if pulls[0].shape[0]:
        n_dots = _pull_survivors(a, n_dirty, dirty, blk, root, floor, const, pulls, alive)
    for i in range(n_dirty):
        j = dirty[i]
        t = tile_rows[j]
        survivors[t, 0] = a
        count = 1
        for k in range(n_comp):
            if k != a and alive[k, i]:
                if count == max_survivors:
                    state[t] = DENSE
                    break
                survivors[t, count] = k
                count += 1
        n_survivors[t] = count
        if state[t] != DENSE:
            state[t] = SPARSE if count > 1 else CLEAN
    return n_dots


@numba.njit(inline="always", **_jit)
def _fold_block(k, blk, m, pw, ug, sqg, rw, wu, acc, nk, first, sum_sq, sum_u, cross,
                u_second):
    """Fold a block of rows centred on component k's mean into k's statistics,
    row j with weight ``pw[j]`` (float64: its sample weight times its
    responsibility; 0 leaves the row out): N_k, ||c||^2 (``sqg``), sum u and
    sum u u^T (``ug`` (qp, >= m)), the first moments and the cross moments
    (:func:`_block_moments`).  rw, wu: the data's dtype scratch, (>= m,) and
    (qp, >= m)."""
    zero = blk.dtype.type(0)
    s_n = 0.0
    s_sq = 0.0
    for j in range(m):
        w = pw[j]
        rw[j] = w
        s_n += w
        s_sq += w * np.float64(sqg[j])
    nk[k] += s_n
    sum_sq[k] += s_sq
    for a in range(ug.shape[0]):
        s = zero
        for j in range(m):
            v = rw[j] * ug[a, j]
            wu[a, j] = v
            s += v
        sum_u[k, a] += s
    _block_moments(blk, m, rw, wu, acc, first[k], cross[k])
    tile_moments(ug, wu, m, u_second[k], False)


@numba.njit(**_jit)
def pruned_tile_stats(X, row0, xT, nb, sample_weight, has_weight, hints, has_hints, const,
                      means, whitened, inv_noise, whitened64, chol_inv_t, inv_noise64, cancel,
                      centres_t, shift, centre_sq, gap, inv_sd, nats, whitened_t, max_survivors,
                      pulls, scratch, dirty_weight, nk, first, sum_sq, sum_u, cross, u_second):
    """The fused E-step of a tile's clean rows (those whose responsibility is
    all on their anchor) and sparse rows (those with a few survivors), see the
    module header.

    Rows are sorted by anchor into per-component blocks of rows, centred on
    the block's mean; each block's log-densities run through
    ``component_log_prob_rows``; its clean rows fold into the statistics with
    weight = their sample weight (:func:`_block_moments`, and the tile moments
    for sum u u^T).  Of the other rows (dirty: some other component may keep
    a responsibility), the sparse ones fold in over their survivors
    (:func:`_sparse_rows`); the rest are left for the dense pass: they are put,
    in order, in the first columns of ``xT``, their weights in
    ``dirty_weight``.

    Parameters
    ----------
    X : ndarray (n, D), row0 : int, nb : int
        The data, the tile's first row and its row count.  The tile is read
        from X here (and the next tile's rows prefetched), so the caller does
        not copy it: without hints into ``xT``, as the dense pass's tile, then
        into the blocks; with hints into a row copy, in order, then into the
        blocks.
    xT : ndarray (Dp, >= nb)
        Scratch with zero feature padding (:func:`new_tile`); on return its
        first n_dirty columns hold the dirty rows, transposed.
    sample_weight : ndarray (n,), has_weight : bool
    hints : ndarray (n,), int32, has_hints : bool
        With ``has_hints``, each row's anchor from the last pass, read and
        updated in place: a tile whose every hint names a component of nonzero
        weight skips the anchor search (K D multiply-adds a row); its dense rows'
        hints become their nearest means, its sparse rows' their nearest
        survivors' means, for the next pass.  A tile with a
        missing hint (negative) searches, and writes its anchors.  A hint only
        chooses which component a row's bound starts from, never what the row
        contributes, so a stale one costs time (the row goes dense), not accuracy.
    const, means, whitened, inv_noise, whitened64, chol_inv_t, inv_noise64, cancel
        As :func:`low_rank_log_prob_tile` (const with the log-weights), in the
        order :meth:`LowRankTileParams.kernel_args` gives them; ``whitened`` is
        not read here (the row blocks take ``whitened_t``).
    centres_t, shift, centre_sq, gap, inv_sd, nats, whitened_t, max_survivors, pulls
        :meth:`PruningParams.kernel_args`.
    scratch : tuple
        :func:`pruning_scratch`.
    dirty_weight : ndarray (>= nb,), float64, written
        The dirty rows' sample weights (1 without weights), in order.
    nk, first, sum_sq, sum_u, cross, u_second : ndarray, float64
        The task's partial statistics, added to (as ``_tile_low_rank_stats``).

    Returns
    -------
    loglik : float
        The clean and sparse rows' weighted log-likelihood.
    n_dirty : int
        Rows left for the dense pass.
    n_pairs : int
        The sparse rows' (row, survivor) pairs.
    n_dots : int
        The second bound's dot products (D multiply-adds each).
    """
    loglik, n_dirty, n_sparse, n_dots, hinted = _anchored_blocks(
        X, row0, xT, nb, sample_weight, has_weight, hints, has_hints, const, means, whitened,
        inv_noise, whitened64, chol_inv_t, inv_noise64, cancel, centres_t, shift, centre_sq,
        gap, inv_sd, nats, whitened_t, max_survivors, pulls, scratch, dirty_weight, nk,
        first, sum_sq, sum_u, cross, u_second)
    n_pairs = 0
    if n_sparse:
        ll, n_pairs = _sparse_rows(X, row0, nb, hinted, sample_weight, has_weight, hints,
                                   has_hints, const, means, inv_noise, whitened64,
                                   chol_inv_t, inv_noise64, cancel, whitened_t, scratch, nk,
                                   first, sum_sq, sum_u, cross, u_second)
        loglik += ll
    return loglik, n_dirty, n_pairs, n_dots


@numba.njit(**_jit)
def _anchored_blocks(X, row0, xT, nb, sample_weight, has_weight, hints, has_hints, const, means,
                     whitened, inv_noise, whitened64, chol_inv_t, inv_noise64, cancel,
                     centres_t, shift, centre_sq, gap, inv_sd, nats, whitened_t, max_survivors,
                     pulls, scratch, dirty_weight, nk, first, sum_sq, sum_u, cross, u_second):
    """:func:`pruned_tile_stats` but for its sparse rows: the anchors, the
    per-component blocks, the clean rows folded in, each dirty row's state (and
    a sparse one's survivors), the dense rows moved to the front of ``xT``.
    Returns (loglik, n_dirty, n_sparse, n_dots, hinted).

    The helpers its block loop calls are inlined (``inline="always"``): a
    call there passes a dozen arrays, and Numba counts references to each;
    as calls, ``_fold_block`` and ``_list_survivors`` made a clean float64 pass
    (1M rows, one thread) 3-8% slower, and ``gather_rows``,
    ``component_log_prob_rows``, ``_mark_survivors`` and ``_block_moments``
    another 1-8% (1M rows, one and two threads, both dtypes).  The reference
    counts that remain, per block and not per row, are what
    ``PRUNE_TILE_FACTOR`` spreads over longer blocks."""
    (dT, anchor, best, blocks, rows, fill, ug, sqg, lg, wu, rw, c64, u64, origin, bound,
     acc, xrows, state, dirty, alive, survivors, n_survivors, slot, pair_lp, pair_u,
     pair_sq, pair_w, cursor) = scratch
    n_comp, dp = means.shape
    d = X.shape[1]
    hinted = has_hints and _hinted_anchors(hints, row0, nb, const, anchor)
    if hinted:
        load_tile_rows(X, row0, nb, xrows)  # in order; the blocks gather from it
    else:
        load_tile_transposed(X, row0, nb, xT)
        _anchors(xT, nb, const, centres_t, shift, centre_sq, dT, anchor, best)
        if has_hints:
            for t in range(nb):
                hints[row0 + t] = anchor[t]
    # the rows listed by anchor, block after block (a counting sort)
    for k in range(n_comp):
        fill[k] = 0
    for t in range(nb):
        fill[anchor[t]] += 1
    _block_starts(fill, cursor)
    for t in range(nb):
        k = anchor[t]
        rows[cursor[k]] = t
        cursor[k] += 1
    loglik = 0.0
    for t in range(nb):
        state[t] = CLEAN  # until a block finds the row dirty
    root, floor, flag, pw = bound[0], bound[1], bound[2], bound[3]
    n_sparse = 0
    n_dots = 0
    for k in range(n_comp):
        m = fill[k]
        if m == 0:
            continue
        start = cursor[k] - m  # the blocks lie one after another, in component order
        blk = blocks[start:start + m]
        listed = rows[start:start + m]
        # x - mu_k, rounded as the dense pass rounds it; then the dense pass's
        # log-density arithmetic, the exact path included, along the rows
        if hinted:
            gather_rows(xrows, 0, listed, m, means[k], blk)
        else:  # X's tile is in L2, read by the transposed copy
            gather_rows(X, row0, listed, m, means[k], blk)
        component_log_prob_rows(blk, m, whitened_t[k], const[k], inv_noise[k], whitened64[k],
                                chol_inv_t[k], inv_noise64[k], cancel, ug, sqg, lg, c64, u64,
                                origin)
        _mark_survivors(k, m, lg, sqg, const, gap, inv_sd, nats, root, floor, flag)
        # clean rows weigh their sample weight; the others nothing here
        s_ll = 0.0
        n_dirty = np.intp(0)  # not a literal 0: callees compile for int64 only
        for j in range(m):
            t = listed[j]
            if flag[j] > 0.0:
                pw[j] = 0.0
                dirty[n_dirty] = j
                n_dirty += 1
            else:
                w = sample_weight[row0 + t] if has_weight else 1.0
                pw[j] = w
                s_ll += w * np.float64(lg[j])
        if n_dirty:
            n_dots += _list_survivors(k, n_dirty, dirty, listed, blk, root, floor, const, gap,
                                      inv_sd, pulls, alive, max_survivors, survivors,
                                      n_survivors, state)
            for i in range(n_dirty):
                j = dirty[i]
                t = listed[j]
                n_sparse += state[t] == SPARSE
                if state[t] == CLEAN:  # the second bound left it its anchor alone
                    w = sample_weight[row0 + t] if has_weight else 1.0
                    pw[j] = w
                    s_ll += w * np.float64(lg[j])
        loglik += s_ll
        _fold_block(k, blk, m, pw, ug, sqg, rw, wu, acc, nk, first, sum_sq, sum_u, cross,
                    u_second)
    # the dense rows to the front of the tile, in order
    n_dirty = np.intp(0)  # not a literal 0: callees compile for int64 only
    for t in range(nb):
        if state[t] == DENSE:
            rows[n_dirty] = t
            dirty_weight[n_dirty] = sample_weight[row0 + t] if has_weight else 1.0
            n_dirty += 1
    if n_dirty:
        if hinted:
            gather_rows_transposed(xrows, 0, rows, n_dirty, origin, xT)
        else:  # in place: rows[e] >= e
            for i in range(d):
                xi = xT[i]
                for e in range(n_dirty):
                    xi[e] = xi[rows[e]]
        if hinted:  # the dense rows' nearest means, the next pass's hints
            _anchors(xT, n_dirty, const, centres_t, shift, centre_sq, dT, anchor, best)
            for e in range(n_dirty):
                hints[row0 + rows[e]] = anchor[e]
    return loglik, n_dirty, n_sparse, n_dots, hinted


@numba.njit(**_jit)
def _sparse_batch(X, row0, t0, t1, hinted, sample_weight, has_weight, hints, has_hints,
                  const, means, inv_noise, whitened64, chol_inv_t, inv_noise64, cancel,
                  whitened_t, scratch, nk, first, sum_sq, sum_u, cross, u_second):
    """The E-step of the sparse rows among tile rows t0 <= t < t1, whose
    (row, survivor) pairs fit in ``blocks`` (see :func:`_sparse_rows`).
    Returns (loglik, n_pairs)."""
    (_, _, _, blocks, rows, fill, _, _, _, wu, rw, c64, u64, origin, _, acc, xrows, state,
     _, _, survivors, n_survivors, slot, pair_lp, pair_u, pair_sq, pair_w, cursor) = scratch
    n_comp = means.shape[0]
    qp = whitened_t.shape[1]
    # the pairs listed by component, block after block (a counting sort); a
    # pair's place in the list indexes its log-density, ||c||^2 and weight
    for k in range(n_comp):
        fill[k] = 0
    n_pairs = 0
    for t in range(t0, t1):
        if state[t] == SPARSE:
            for i in range(n_survivors[t]):
                fill[survivors[t, i]] += 1
            n_pairs += n_survivors[t]
    _block_starts(fill, cursor)
    for t in range(t0, t1):
        if state[t] == SPARSE:
            for i in range(n_survivors[t]):
                k = survivors[t, i]
                p = cursor[k]
                cursor[k] = p + 1
                rows[p] = t
                slot[t, i] = p
    for k in range(n_comp):
        m = fill[k]
        if m == 0:
            continue
        start = cursor[k] - m
        blk = blocks[start:start + m]
        if hinted:
            gather_rows(xrows, 0, rows[start:start + m], m, means[k], blk)
        else:
            gather_rows(X, row0, rows[start:start + m], m, means[k], blk)
        # block k's projections: a (qp, m) matrix of its own in pair_u
        component_log_prob_rows(blk, m, whitened_t[k], const[k], inv_noise[k],
                                whitened64[k], chol_inv_t[k], inv_noise64[k], cancel,
                                pair_u[qp * start:qp * (start + m)].reshape((qp, m)),
                                pair_sq[start:start + m], pair_lp[start:start + m], c64, u64,
                                origin)
    loglik = 0.0
    for t in range(t0, t1):
        if state[t] != SPARSE:
            continue
        top = -np.inf
        near = survivors[t, 0]
        near_sq = pair_sq[slot[t, 0]]
        for i in range(n_survivors[t]):
            p = slot[t, i]
            top = max(top, np.float64(pair_lp[p]))
            if pair_sq[p] < near_sq:
                near = survivors[t, i]
                near_sq = pair_sq[p]
        # exp(lp - top) per pair into pair_w, then their sum scales them
        total = 0.0
        for i in range(n_survivors[t]):
            p = slot[t, i]
            e = np.exp(np.float64(pair_lp[p]) - top)
            pair_w[p] = e
            total += e
        w = sample_weight[row0 + t] if has_weight else 1.0
        loglik += w * (top + np.log(total))
        scale = w / total
        for i in range(n_survivors[t]):
            pair_w[slot[t, i]] *= scale
        if has_hints:
            hints[row0 + t] = near
    for k in range(n_comp):
        m = fill[k]
        if m:
            start = cursor[k] - m
            _fold_block(k, blocks[start:start + m], m, pair_w[start:start + m],
                        pair_u[qp * start:qp * (start + m)].reshape((qp, m)),
                        pair_sq[start:start + m], rw, wu, acc, nk, first, sum_sq, sum_u,
                        cross, u_second)
    return loglik, n_pairs


@numba.njit(**_jit)
def _sparse_rows(X, row0, nb, hinted, sample_weight, has_weight, hints, has_hints, const,
                 means, inv_noise, whitened64, chol_inv_t, inv_noise64, cancel, whitened_t,
                 scratch, nk, first, sum_sq, sum_u, cross, u_second):
    """The E-step of a tile's sparse rows (``state`` SPARSE): each row's
    responsibilities over its listed survivors alone, from their exact
    log-densities (every other component is bounded ``PRUNE_NATS`` below the
    anchor's).

    The (row, survivor) pairs go into per-component blocks of rows as the
    clean rows do (``rows``, ``fill`` and ``blocks`` are free again), with
    their projections, ||c||^2 and log-densities kept per pair; then each
    row's log-sum-exp over its pairs gives its log-likelihood and its
    responsibilities, and each block folds in with weight = sample weight x
    responsibility.  With ``has_hints`` a row's hint becomes its nearest
    survivor mean.  The rows go in batches whose pairs fit in ``blocks``
    (:func:`pruning_scratch`), in tile order.

    Returns
    -------
    loglik : float, the sparse rows' weighted log-likelihood
    n_pairs : int, the (row, survivor) pairs
    """
    (_, _, _, blocks, _, _, _, _, _, _, _, _, _, _, _, _, _, state, _, _, _, n_survivors, _,
     _, _, _, _, _) = scratch
    capacity = blocks.shape[0]
    loglik = 0.0
    n_pairs = 0
    # np.intp, not a literal 0, which Numba's first typing pass would compile
    # _sparse_batch for (seconds) before settling on int64
    t0 = np.intp(0)
    while t0 < nb:
        t1 = t0
        pairs = 0
        while t1 < nb and (state[t1] != SPARSE or pairs + n_survivors[t1] <= capacity):
            if state[t1] == SPARSE:
                pairs += n_survivors[t1]
            t1 += 1
        if pairs:
            ll, n = _sparse_batch(X, row0, t0, t1, hinted, sample_weight, has_weight, hints,
                                  has_hints, const, means, inv_noise, whitened64, chol_inv_t,
                                  inv_noise64, cancel, whitened_t, scratch, nk, first, sum_sq,
                                  sum_u, cross, u_second)
            loglik += ll
            n_pairs += n
        t0 = t1
    return loglik, n_pairs


@numba.njit(**_jit)
def pruning_scratch(X, n_comp, kp, dp, qp, d, tile, max_survivors):
    """The scratch of :func:`pruned_tile_stats`: (dT, anchor, best, blocks,
    rows, fill, ug, sqg, lg, wu, rw, c64, u64, origin, bound, acc, xrows,
    state, dirty, alive, survivors, n_survivors, slot, pair_lp, pair_u, pair_sq,
    pair_w, cursor), uninitialised but for the feature padding of ``blocks``
    (columns d:, which stay zero) and ``origin`` (Dp,), zeros.

    The per-component blocks lie one after another, in component order: a
    tile's rows (the clean pass), or (the sparse pass) a batch of its (row,
    survivor) pairs, in ``blocks`` (cap, Dp) with cap = max(2 tile,
    max_survivors); their tile rows in ``rows`` (cap,); the pairs'
    log-densities, ||c||^2 and weights in ``pair_lp``, ``pair_sq``,
    ``pair_w`` (cap,); each block's projections a (qp, m) matrix of its own in
    ``pair_u`` (qp cap,); ``fill`` and ``cursor`` (K,) count and place them
    (after the placing, block k ends at cursor[k]).
    ``survivors`` and ``slot`` are (tile, max(max_survivors, 1)).  One
    tile-sized block per component held K times the rows' bytes (67 MB a
    parallel task at K = 256, D = 64, float64).
    """
    dt = X.dtype
    # room for the tile's rows, or for the pairs of two survivors a row (the
    # sparse pass takes more in batches), and for one row's survivors at least
    n_listed = max(max_survivors, 1)
    cap = max(2 * tile, n_listed)
    # only the feature padding zeroed: each parallel task makes its own scratch,
    # and zeros for all of the blocks made an EM iteration over 1M x 64 rows
    # (2 threads) 17-37 ms slower
    blocks = np.empty((cap, dp), dtype=dt)
    blocks[:, d:] = 0.0
    return (np.empty((kp, tile), dtype=dt), np.empty(tile, dtype=np.int64),
            np.empty(tile, dtype=dt), blocks,
            np.empty(cap, dtype=np.int64), np.empty(n_comp, dtype=np.int64),
            np.empty((qp, tile), dtype=dt), np.empty(tile, dtype=dt),
            np.empty(tile, dtype=dt), np.empty((qp, tile), dtype=dt),
            np.empty(tile, dtype=dt), np.empty(d), np.empty(qp),
            np.zeros(dp, dtype=dt), np.empty((4, tile)), np.empty((5, dp), dtype=dt),
            np.empty((tile, d), dtype=dt), np.empty(tile, dtype=np.int64),
            np.empty(tile, dtype=np.int64), np.empty((n_comp, tile), dtype=np.uint8),
            np.empty((tile, n_listed), dtype=np.int64), np.empty(tile, dtype=np.int64),
            np.empty((tile, n_listed), dtype=np.int64), np.empty(cap, dtype=dt),
            np.empty(qp * cap, dtype=dt), np.empty(cap, dtype=dt), np.empty(cap),
            np.empty(n_comp, dtype=np.int64))


def pruning_pays(X, const, tile_params, pruning_params):
    """Whether the pruned path pays on ``PROBE_ROWS`` rows spread evenly over
    X, as :func:`pruning_lost` counts the pruned path's work: the launcher's
    choice between the pruned and the dense pass.

    Parameters
    ----------
    X : ndarray (n, D), n >= 1
    const : ndarray (K,), float64, with the log-weights
    tile_params : LowRankTileParams
    pruning_params : PruningParams

    Returns
    -------
    bool
    """
    p = tile_params
    n_comp, dp = p.means.shape
    qp = p.whitened.shape[2]
    rows = np.unique(np.linspace(0, X.shape[0] - 1, PROBE_ROWS).astype(np.int64))
    sample = np.ascontiguousarray(X[rows])
    m = sample.shape[0]
    xT = new_tile(sample, dp, m)
    scratch = pruning_scratch(sample, n_comp, pruning_params.centres_t.shape[1], dp, qp,
                              X.shape[1], m, pruning_params.max_survivors)
    stats = (np.zeros(n_comp), np.zeros((n_comp, dp)), np.zeros(n_comp),
             np.zeros((n_comp, qp)), np.zeros((n_comp, dp, qp)), np.zeros((n_comp, qp, qp)))
    _, n_dirty, n_pairs, n_dots = pruned_tile_stats(
        sample, 0, xT, m, np.ones(1), False, NO_HINTS, False, const, *p.kernel_args(),
        *pruning_params.kernel_args(), scratch, np.empty(m), *stats)
    return not pruning_lost(n_dirty, n_pairs, n_dots, p.whitened64.shape[2], m)


@numba.njit(**_jit)
def pruning_lost(n_dirty, n_pairs, n_dots, q, nb):
    """Whether a pruned tile of ``nb`` rows cost more than three quarters of
    a dense tile's, by its counts: ``n_dirty`` rows left to the dense pass,
    ``n_pairs`` survivor pairs and ``n_dots`` dot products of the second bound,
    at ``q`` latent dimensions.

    In a dense row's time, as measured at D = 64, q = 4 (one thread of the
    2-core EPYC, both dtypes, K = 6 to 16, where a dense row took 160-220 ns in
    float32): every row's anchored path 1/3 (43-55 ns), a survivor pair 1/4, a
    row left dense 1 more, a dot product 1/(4 (q + 2)) (a pair's
    (q + 2) D multiply-adds against its D).  A dense row costs more as K
    grows, so at larger K the rule errs towards the dense pass.  Its
    three-quarter margin keeps data near the break-even point dense.
    """
    # in twelfths of a dense row, times q + 2
    return (12 * n_dirty + 3 * n_pairs) * (q + 2) + 3 * n_dots > 5 * nb * (q + 2)
