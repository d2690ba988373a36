# Numba CPU kernel for estep_stats: the fused E-step pass.
#
# Design: per tile of rows (transposed into a (D, tile) scratch), compute the
# K log-densities (gaussian_log_prob's tile code), add log-weights, normalise by
# the row's log-sum-exp (vectorised fast_exp), weight by sample_weight, and fold
# the responsibilities straight into the tile's sufficient statistics.  Only
# (K, tile) numbers ever exist per thread; nothing of size n x K is stored.
#
# Statistics are taken around a shift so that float32 data far from the origin
# keeps its digits: around the component means for 'full', 'diag' and
# 'spherical' (spherical reuses the squared distances already computed for the
# log-density, so its second moment is free).  'tied''s scatter
# S = sum_n sum_k r_nk (x-mu_k)(x-mu_k)^T costs D^2/2 per row, not K D^2/2, from
# one G = sum_n s_n z z^T (s_n = sum_k r_nk, the row's weight):
# - with means near their weighted mean c (``tied_needs_anchors``), z = x - c and
#   S = G - sum_k (A_k d_k^T + d_k A_k^T) + sum_k N_k d_k d_k^T, A_k = sum_n r_nk z_n,
#   d_k = mu_k - c.  Its terms grow with |d_k|^2, and float32 sums lost 1e-4 of S
#   at separations of 100 standard deviations and 1e-2 at 1000;
# - beyond that, each row goes around its anchor a, its most responsible
#   component (``_anchor_rows``): z = x - mu_a, e_ak = mu_k - mu_a and
#   S = G - M - M^T + E, M = sum_k F_k d_k^T with F_k = sum_n (r_nk - s_n [k = a]) z_n,
#   E = sum_{a != k} R_ak e_ak e_ak^T from the anchor-by-component masses R
#   (K x K).  Every term is bounded by the rows' own scatter: nothing cancels.
# Second moments use 2 x 4 register blocks.
#
# Listed pairs first ('diag', 'spherical'): from the log-densities alone (the
# row maxima formed in the same pass), before any exponential, ``_mark_pairs``
# lists, component by component, each (component, row) pair that can matter to
# the tile's sums, with its exponential's argument (``list_marked``: a
# compressed store eight rows at a time, no branches); the others carry less
# than the unit roundoff of each component's largest responsibility and
# largest mass in the tile (and of each row's sum of exponentials), so leaving
# them out is within one rounding, per component, as under the floor below.
# When at most one pair in eight is listed, the exponentials run over the
# list alone (one contiguous vectorised loop), and the log-likelihood,
# responsibilities, N_k and moments are summed over the listed pairs: with
# separated clusters a row has one to a few, so a tile costs O(K) cheap
# comparisons per row instead of K exponentials.  Otherwise (overlapping
# components; a NaN row, an infinite row maximum or a subnormal sample
# weight) the tile takes the dense path below.  Paired E-steps, N = 1M,
# D = 32, from sklearn-started parameters (bench/results, session 27):
# 'diag' K = 16 1.10x (float64) and 1.15x (float32), 'spherical' K = 64
# 1.16x and 1.16x.
#
# Dense path, sparse moments: rows whose mass r (1 + m) in a component (m:
# squared Mahalanobis distance) is at most unit roundoff times the mean of the
# component's masses over the tile are left out of its first and second
# moments (never of N_k or the log-likelihood); ``responsibilities_and_masses``
# shows why that is within one rounding of the sums it changes.  With well-separated
# clusters that is most rows (anything ~40 nats below the row's best in
# float64, ~20 in float32).  The rule is per component and per tile: a
# component whose every responsibility is tiny keeps its relative accuracy.
# 'full' gathers each component's kept rows when they are under seven eighths
# of the tile, so its D^2/2 multiply-adds per row run over those alone.
# 'diag' and 'spherical' (O(D) work per row and component) mark each row's
# kept components in a bit mask (vectorised) and, when at most one in eight
# (component, row) pairs is kept, list each component's kept rows (one walk
# over the masks) and sum them component by component, reading the rows from
# X and summing in float64 registers (dense sums otherwise: a kept pair costs
# five (float64) to eight (float32) dense ones).  'tied' stays dense: its
# shared second moment costs D^2/2 per row whatever the responsibilities.
#
# Precision of the sums: products and the sums over one tile's rows (at most
# 512 for 'full'/'tied', 640 for 'diag'/'spherical', see gaussian_tile_rows) run
# in the data's dtype, so float32 data keeps 8 lanes per AVX2 register; each
# tile's sums are widened to float64 once, and everything across tiles is
# float64.  The float32 rounding is that of a sum of <= 640 terms of shifted
# (small) values split over the vector lanes, about 1e-6 relative; nothing
# accumulates in float32 across the data set.
#
# Vector width: the tile stages that 'diag' and 'spherical' run (distances,
# exponentials, responsibilities, masks, moments) and 'full''s log-densities ask
# for 512-bit vectors (``prefer_wide_vectors``, see kernels/_vector_width.py);
# 'full''s moments and 'tied''s transform keep the target's 256.
#
# Determinism: each parallel task folds a run of consecutive tiles (1 to 8,
# from the row count alone: ``tiles_per_run``) into its own row of partial
# statistics, which it zeroes itself, and every total adds the rows in run
# order (``add_partials``: parallel over blocks of totals, serial over runs).
# The result depends only on the data, tile size and row count, not on the
# thread count, the grouping of runs or scheduling.  No atomics.
#
# One compiled kernel per covariance type (``ESTEP_RUNS``): the run loop is a
# closure over the covariance code, and the tile statistics and
# ``log_prob_tile`` are inlined into it at Numba's level, so Numba prunes the
# other types' branches before typing them and compiles one type's helpers
# only.  A first default ('full') fit on sklearn's digits compiled in 10 s
# instead of 18-20 s with a fresh cache (bench/results/
# cpu-2core-epyc-em-iteration.md, sessions 55 and 56); a process that fits
# every type compiles four smaller kernels.  Limits:
# float32/float64; the precision factors must be upper triangular
# ('full'/'tied', checked by the public function).
import numba
import numpy as np

from .._covariance import COVARIANCE_TYPES, DIAG, FULL, SPHERICAL, TIED
from .._expanded_gaussian import FLOAT32_EXPANSION_LIMIT, centre_spread
from .._numba_ir import _LIST_LANES, _LOG_CLAMP, add_centred_rows, list_marked
from .._numba_support import (CACHE, FASTMATH, TRANSPOSE_BLOCK, binary_exponent, centred_columns,
                              fast_exp, group_size, kept_masks, kernel_weights,
                              load_tile_transposed, lowest_bit, named_span_kernel, new_tile,
                              read_only, responsibilities_and_masses, run_count, select_columns,
                              tile_moments, tiles_per_run, transpose_centred_block, zeroed_row)
from .._thread_spans import run_groups
from .._vector_width import prefer_wide_vectors
from ..gaussian_log_prob._numba import gaussian_tile_rows, log_prob_tile, prepare_params
from ..log_responsibilities._numba import exp_tile, log_norm_and_scale, row_weights

_jit = dict(fastmath=FASTMATH, cache=CACHE)

# 'diag'/'spherical': the sparse moments (listed rows) when at most one in this many
# (component, row) pairs of a tile is kept (a kept pair costs 5-8 dense ones)
_SPARSE_RATIO = 8
# after a tile whose listing gave up (too many pairs), the next this many tiles of
# the run go straight to the dense path: a failed listing costs up to K / 8 + 1 of
# its K components (the paired float64 'diag' E-step 3% slower on data where
# every tile overlaps); the choice depends only on the tiles before it in the run
_RETRY_AFTER = 3


@numba.njit(**_jit)
def _first_moments(resp, xT, nb, centers, first):
    """first[k, i] += sum_t resp[k, t] * (xT[i, t] - centers[k, i]).

    Components in pairs, features in fours (Dp % 4 == 0): eight running sums in
    the tile's dtype, widened once into ``first`` (float64).
    """
    prefer_wide_vectors()
    n_comp = resp.shape[0]
    dp = xT.shape[0]
    zero = xT.dtype.type(0)
    for k0 in range(0, n_comp, 2):
        k1 = min(k0 + 1, n_comp - 1)
        for i in range(0, dp, 4):
            a0 = zero
            a1 = zero
            a2 = zero
            a3 = zero
            b0 = zero
            b1 = zero
            b2 = zero
            b3 = zero
            for t in range(nb):
                r0 = resp[k0, t]
                r1 = resp[k1, t]
                x0 = xT[i, t]
                x1 = xT[i + 1, t]
                x2 = xT[i + 2, t]
                x3 = xT[i + 3, t]
                a0 += r0 * (x0 - centers[k0, i])
                a1 += r0 * (x1 - centers[k0, i + 1])
                a2 += r0 * (x2 - centers[k0, i + 2])
                a3 += r0 * (x3 - centers[k0, i + 3])
                b0 += r1 * (x0 - centers[k1, i])
                b1 += r1 * (x1 - centers[k1, i + 1])
                b2 += r1 * (x2 - centers[k1, i + 2])
                b3 += r1 * (x3 - centers[k1, i + 3])
            first[k0, i] += a0
            first[k0, i + 1] += a1
            first[k0, i + 2] += a2
            first[k0, i + 3] += a3
            if k1 != k0:
                first[k1, i] += b0
                first[k1, i + 1] += b1
                first[k1, i + 2] += b2
                first[k1, i + 3] += b3


@numba.njit(**_jit)
def _list_kept_rows(nb, masks, counts, rows):
    """List each component's kept rows of a tile, components in order: one
    walk over the rows' bits (``masks``, from :func:`kept_masks`) places the
    rows of component k in ``rows[end_{k-1}:end_k]`` in increasing order (a
    counting sort).  ``counts[k]``, the number of rows component k keeps on
    entry, is ``end_k`` on return."""
    end = 0
    for k in range(counts.shape[0]):  # counts[k]: where component k's list starts
        c = counts[k]
        counts[k] = end
        end += c
    for t in range(nb):
        for w in range(masks.shape[0]):
            m = masks[w, t]
            while m:
                b, m = lowest_bit(m)
                k = (w << 6) + b
                rows[counts[k]] = t
                counts[k] += 1


@numba.njit(**_jit)
def _listed_moments(X, r0, resp, dist, ends, rows, means, cov, first, second):
    """Fold the listed (row, component) pairs of a tile into the moments,
    component by component.

    The sparse paths of 'diag' and 'spherical': component k's rows are
    ``rows[ends[k-1]:ends[k]]`` (:func:`_mark_pairs` or
    :func:`_list_kept_rows`).  Each list adds
    r (x - mu_k) to ``first[k]`` and, for 'diag', r (x - mu_k)^2 to
    ``second[k, 0]``, reading the rows from X (contiguous) and summing in
    float64 in registers (:func:`add_centred_rows`); for 'spherical',
    r ||x - mu_k||^2 from the squared distances ``dist`` to
    ``second[k, 0, 0]``.  With separated clusters a row has one or two
    kept components, so a tile costs O(nb D) here in place of O(nb K D).
    Adding each pair straight into the accumulators in memory, reading and
    writing 2 D of them per pair, made the whole float64 'diag' E-step
    1.1-1.15x slower (paired; N = 1M, D = 32, K = 16).
    """
    start = 0
    for k in range(ends.shape[0]):
        stop = ends[k]
        if stop > start:
            add_centred_rows(X, r0, rows, start, stop, resp, k, means, first, second,
                             cov == DIAG)
            if cov == SPHERICAL:  # the squared distances are at hand
                s2 = 0.0
                for j in range(start, stop):
                    s2 += np.float64(resp[k, rows[j]]) * dist[k, rows[j]]
                second[k, 0, 0] += s2
        start = stop


@numba.njit(**_jit)
def _diag_moments(resp, xT, nb, means, first, second):
    """Dense 'diag' moments: first[k, i] += sum_t r (x - mu_k)_i and
    second[k, 0, i] += sum_t r (x - mu_k)_i^2 over every row of the tile.

    Components in pairs, features in pairs (Dp even): eight running sums in
    the tile's dtype, widened once.
    """
    prefer_wide_vectors()
    n_comp = resp.shape[0]
    dp = xT.shape[0]
    zero = xT.dtype.type(0)
    for k0 in range(0, n_comp, 2):
        k1 = min(k0 + 1, n_comp - 1)
        for i in range(0, dp, 2):
            m00 = means[k0, i]
            m01 = means[k0, i + 1]
            m10 = means[k1, i]
            m11 = means[k1, i + 1]
            f00 = zero
            f01 = zero
            f10 = zero
            f11 = zero
            q00 = zero
            q01 = zero
            q10 = zero
            q11 = zero
            for t in range(nb):
                r0 = resp[k0, t]
                r1 = resp[k1, t]
                x0 = xT[i, t]
                x1 = xT[i + 1, t]
                v00 = x0 - m00
                v01 = x1 - m01
                v10 = x0 - m10
                v11 = x1 - m11
                w00 = r0 * v00
                w01 = r0 * v01
                w10 = r1 * v10
                w11 = r1 * v11
                f00 += w00
                f01 += w01
                f10 += w10
                f11 += w11
                q00 += w00 * v00
                q01 += w01 * v01
                q10 += w10 * v10
                q11 += w11 * v11
            first[k0, i] += f00
            first[k0, i + 1] += f01
            second[k0, 0, i] += q00
            second[k0, 0, i + 1] += q01
            if k1 != k0:
                first[k1, i] += f10
                first[k1, i + 1] += f11
                second[k1, 0, i] += q10
                second[k1, 0, i + 1] += q11


_LN2 = 0.6931471805599453


@numba.njit(**_jit)
def _mark_pairs(logp, nb, const, margin, sample_weight, r0, has_weight, mx, lw, rows, vals,
                ends):
    """List the (component, row) pairs of a tile that can matter to its
    statistics, before any exponential is taken, component by component;
    return how many there are, or -1 when the tile takes the dense path.

    The other pairs carry less than ``unit`` (the dtype's unit roundoff) of
    every sum they would enter, so the sparse path takes exponentials,
    responsibilities, N_k and moments over the listed pairs alone.  With
    a_kt = logp[k, t] - mx_t (mx_t = max_j logp[j, t]) and w_t the row's
    sample weight, a pair's responsibility r_kt lies in [w_t e^a / K, w_t e^a]
    (the row's log-sum-exp is within log K of its max) and its mass in the
    moments is r_kt (1 + m_kt), where m_kt = 2 (const_k - logp[k, t]) =
    2 (const_k - mx_t - a_kt) is its squared Mahalanobis distance (see
    :func:`responsibilities_and_masses`).  A pair is listed when

    - a_kt >= -margin (it can change its row's log-sum-exp), or
    - log w_t + a_kt >= thr_k = top_k - 1 - margin - log 2 - log(spread_k -
      2 thr_k), where top_k bounds max_t (log w_t + a_kt) and spread_k =
      1 + 2 (const_k - min_t mx_t + max_t log w_t + log 2)
      (:func:`_pair_threshold`).

    Component k's largest responsibility is at least e^(top_k - 1) / K, and a
    pair below thr_k has mass below e^thr_k (spread_k - 2 thr_k) <=
    e^(top_k - 1 - margin) (that product grows with thr_k below -1).  With
    ``margin`` = log(tile K / unit) + 1, the unlisted pairs of a component
    carry less than ``unit`` times its largest responsibility into N_k and
    times its largest mass into the moments: one rounding of the tile's sums,
    per component, so a dying component (every responsibility tiny) keeps its
    relative accuracy, as under the dense path's floor.  log w_t is rounded
    down to a multiple of log 2 and the maxima over the tile are integers
    (within 1), so that every loop vectorises; the slack is in the bounds.

    Each component is listed (:func:`list_marked`) with the threshold of a
    component whose best row has log w_t + a_kt >= -1, most components in
    most tiles, which lists a superset of the rule's pairs and finds top_k;
    a component weaker in this tile is listed again with its own threshold.

    Returns -1 (dense path) for a tile with a NaN row, a row whose max is
    infinite, a subnormal sample weight, or more pairs than ``rows`` holds
    beyond one component's rows.

    Parameters
    ----------
    logp : ndarray (K, tile)
        Log-densities plus log-weights (read).
    nb : int
    const : ndarray (K,), float64
    margin : float
    sample_weight : ndarray (n,) (read when ``has_weight``)
    r0 : int, the tile's first row
    has_weight : bool
    mx : ndarray (tile,), each row's max of ``logp`` (read)
    lw : ndarray (tile,), the dtype's, scratch: log w_t rounded down to a
        multiple of log 2
    rows, vals : ndarray (m,), int64 and the dtype's, written: the listed rows
        and their a_kt (the exponentials' arguments), component by component
    ends : ndarray (K,), int64, written: where each component's list ends
    """
    prefer_wide_vectors()
    n_comp = logp.shape[0]
    # integer maxima (they vectorise): min_t mx_t >= low_mx, max_t log(w_t) <= high_lw
    bad = 0
    top_neg = np.int32(-_LOG_CLAMP)
    for t in range(nb):  # (checked inputs: a NaN log-density means a NaN row)
        bad += (not abs(mx[t]) < np.inf) | np.isnan(logp[0, t])
        top_neg = max(top_neg, np.int32(max(min(-mx[t], _LOG_CLAMP), -_LOG_CLAMP)))
    low_mx = -np.float64(top_neg) - 1.0
    high_lw = 0.0
    if has_weight:
        top_lw = np.int32(-_LOG_CLAMP)
        for t in range(nb):
            w = np.float64(sample_weight[r0 + t])
            e = binary_exponent(w) * _LN2
            lw[t] = e if w > 0.0 else -np.inf
            top_lw = max(top_lw, np.int32(e))
            bad += (w > 0.0) & (w < 2.2250738585072014e-308)
        high_lw = np.float64(top_lw) + 1.0
    else:
        for t in range(nb):
            lw[t] = 0.0
    if bad:
        return -1
    # m_kt = 2 (const_k - logp[k, t]) <= 2 (const_k - min_t mx_t) - 2 a_kt, so
    # a pair with log(w_t) + a_kt < thr has mass r (1 + m) below
    # e^thr (spread_k - 2 thr) (increasing in thr for thr < -1), with
    # spread_k = 1 + 2 (const_k - min_t mx_t) + 2 max_t log(w_t) + 2 log 2
    neg_margin = logp.dtype.type(-margin)
    end = 0
    for k in range(n_comp):
        spread = 1.0 + 2.0 * (const[k] - low_mx + high_lw + _LN2)
        if not spread < 1e30:  # (the bound below assumes log(spread) < 70)
            return -1
        if end + nb + _LIST_LANES > rows.shape[0]:  # more than the sparse path takes
            return -1
        # first with the threshold of a component whose best row has
        # log(w_t) + a_kt >= -1 (most components in most tiles), listing a
        # superset of the pairs that rule keeps, and finding its true best
        thr = logp.dtype.type(_pair_threshold(-1, margin, spread))
        start = end
        end, top = list_marked(logp, mx, lw, k, nb, neg_margin, thr, rows, vals, start)
        exact = (logp.dtype.type(_pair_threshold(top, margin, spread))
                 if top > -_LOG_CLAMP else logp.dtype.type(np.inf))
        if exact < thr:  # a component weaker in this tile: list it again
            end, _ = list_marked(logp, mx, lw, k, nb, neg_margin, exact, rows, vals, start)
        ends[k] = end
    return end


@numba.njit(inline="always", **_jit)
def _pair_threshold(top, margin, spread):
    """The threshold of :func:`_mark_pairs`' second rule for a component
    whose largest log(w_t) + a_kt over the tile lies in [top - 1, top + 1)
    (``top`` from an integer maximum; w_t within log 2 of its bound).

    Its largest responsibility is at least e^(top - 1) / K, and an unlisted
    pair's mass is below e^thr (spread - 2 thr) <= e^(top - 1 - margin): thr =
    top - 1 - margin - log 2 - log(spread - 2 thr), with |thr| <= |top| +
    margin + 100 (log(spread) < 70) on the right; the log from the binary
    exponent, rounded up.
    """
    bound = spread + 2.0 * (abs(np.float64(top)) + margin + 100.0)
    return (np.float64(top) - 1.0 - margin - _LN2
            - (binary_exponent(bound) + 1.0) * _LN2)


@numba.njit(**_jit)
def _listed_responsibilities(logp, nb, mx, ends, rows, vals, s, sample_weight, r0,
                             has_weight, resp, nk):
    """Responsibilities of the listed pairs of a tile (the sparse path),
    their sums into N_k, and the tile's weighted log-likelihood.

    Component k's rows are ``rows[ends[k-1]:ends[k]]``, each row's max
    log-density ``mx[t]``, and ``vals`` holds logp[k, t] - mx[t] for each
    listed pair (:func:`_mark_pairs`).  The exponentials are taken over
    the listed pairs alone, in one contiguous vectorised loop over ``vals``;
    each row's sum ``s[t]`` adds its terms in component order, as
    :func:`exp_tile` does over every component.  Then ``mx`` becomes the rows'
    log-sum-exp, ``s`` their normalising factor times the sample weight, and
    ``resp[k, t]`` the responsibility of each listed pair (other entries of
    ``resp`` are left as they were: nothing reads them).

    Returns
    -------
    float
        The tile's weighted log-likelihood sum_t w_t log_norm[t].
    """
    prefer_wide_vectors()
    n_comp = logp.shape[0]
    total = ends[n_comp - 1]
    for j in range(total):
        vals[j] = fast_exp(vals[j])
    for t in range(nb):
        s[t] = 0.0
    for j in range(total):
        s[rows[j]] += vals[j]
    log_norm_and_scale(nb, mx, s)
    ll = row_weights(nb, mx, s, sample_weight, r0, has_weight)
    zero = resp.dtype.type(0)
    start = 0
    for k in range(n_comp):
        stop = ends[k]
        acc = zero
        for j in range(start, stop):
            t = rows[j]
            r = vals[j] * s[t]
            resp[k, t] = r
            acc += r
        nk[k] += acc
        start = stop
    return ll


@numba.njit(**_jit)
def _anchor_rows(X, r0, xT, nb, resp, means, s, top, anchor, others, anchored, pair_mass,
                 which):
    """'tied': each row of the tile around its anchor a_t = argmax_k resp[k, t].

    Sets s[t] = sum_k resp[k, t], adds the row's other responsibilities to
    pair_mass[a_t] (float64), then resp[a_t, t] -= s[t], xT[:d, t] = x_t - mu_a,
    read from X (one rounding, where x - c and mu_a - c would add two), and
    adds s_t z_t to anchored[a_t].  The first of tied maxima wins; a row of
    weight zero anchors at component 0 and adds nothing.  ``top``, ``anchor``
    and ``others`` (tile,) are scratch in the tile's dtype (the indices and
    counts are exact there: K < 2^24), so the search over components
    vectorises.  A row whose other responsibilities are all exactly zero (on
    separated clusters, most rows) skips the K masses.  ``which`` (>= tile,)
    integer scratch receives the anchors.

    Three loops over the rows, not one: the search's bookkeeping, the anchored
    sums (a d-long loop a row, read from X), then the copy, eight rows at a
    time transposed in registers, each less its own anchor's mean
    (:func:`transpose_centred_block`).  In one loop, with each row's d values
    stored down a column of xT, the anchors cost E-steps of separated clusters
    1.6x the common centre's pass (float32, D = 32, K = 16; 2.7x at D = 5);
    now 1.2x (1.8x at D = 5; bench/results, session 50).
    """
    n_comp = resp.shape[0]
    d = X.shape[1]
    zero = s.dtype.type(0)
    one = s.dtype.type(1)
    for t in range(nb):
        r = resp[0, t]
        s[t] = r
        top[t] = r
        anchor[t] = zero
        others[t] = one if r != 0 else zero
    for k in range(1, n_comp):  # components outer: the tile's rows vectorise
        kf = anchor.dtype.type(k)
        for t in range(nb):
            r = resp[k, t]
            s[t] += r
            others[t] += one if r != 0 else zero
            if r > top[t]:
                top[t] = r
                anchor[t] = kf
    for t in range(nb):
        a = int(anchor[t])
        which[t] = a
        s_t = s[t]
        if others[t] > 1:  # nonzero responsibilities besides the anchor's
            row = pair_mass[a]
            for k in range(n_comp):
                if k != a:
                    row[k] += resp[k, t]
        resp[a, t] -= s_t
    for t in range(nb):
        acc = anchored[which[t]]
        mu = means[which[t]]
        sw = np.float64(s[t])
        x = X[r0 + t]
        for i in range(d):
            acc[i] += sw * (x[i] - mu[i])
    # z = x - mu_a into the transposed tile, eight rows at a time
    whole = d - d % TRANSPOSE_BLOCK
    t0 = 0
    while t0 + TRANSPOSE_BLOCK <= nb:
        for i in range(0, whole, TRANSPOSE_BLOCK):
            transpose_centred_block(X, r0 + t0, i, xT, t0, means, which)
        for i in range(whole, d):
            for j in range(t0, t0 + TRANSPOSE_BLOCK):
                xT[i, j] = X[r0 + j, i] - means[which[j], i]
        t0 += TRANSPOSE_BLOCK
    for t in range(t0, nb):
        mu = means[which[t]]
        for i in range(d):
            xT[i, t] = X[r0 + t, i] - mu[i]


@numba.njit(inline="always", **_jit)
def _tile_stats(cov, X, r0, xT, nb, resp, means, dist, mass, floor, diffT, wT, idx, masks,
                counts, rows, nk, first, second, anchored, pair_mass):
    """Fold a tile's responsibilities (K, tile) into its partial statistics
    (inlined into the E-step's kernels, each of one covariance code).

    first[k] accumulates sum_t r (x_t - mu_k) ('tied': F_k, see the module
    header, with ``anchored`` and ``pair_mass``: :func:`_anchor_rows`),
    second the shifted second moments in the kernel's 3-D layout.  Each sum
    over the tile's rows runs in the tile's dtype and is widened once into the
    float64 partials (the 'diag'/'spherical' row path sums in float64
    directly).  ``dist`` holds the squared distances ('spherical'), ``mass``
    the rows' masses in the moments with their floors ``floor`` (all but
    'tied', see :func:`responsibilities_and_masses`); ``idx`` ('full') and
    ``masks``, ``counts`` and ``rows`` ('diag', 'spherical') are scratch for the
    kept rows, ``rows`` for the anchors too ('tied').
    """
    prefer_wide_vectors()
    n_comp = resp.shape[0]
    dp = xT.shape[0]
    zero = xT.dtype.type(0)
    if cov == FULL:
        for k in range(n_comp):
            m, dense = select_columns(mass, k, nb, floor[k], idx)
            centred_columns(xT, nb, resp, k, means[k], idx, m, dense, diffT, wT, True, first[k])
            tile_moments(wT, diffT, m, second[k], True)
    elif cov == TIED:
        if pair_mass.shape[0]:
            # rows around their anchors: xT becomes z = x - mu_a, diffT[0] the row
            # sums s, resp the coefficients r - s [k = a]; anchored sums and masses
            _anchor_rows(X, r0, xT, nb, resp, means, diffT[0], diffT[1], diffT[2],
                         diffT[3], anchored, pair_mass, rows)
        else:
            # around the common centre: xT already holds z = x - c (log_prob_tile
            # shifted it in place); s = sum_k resp[k, t] (the sample weight)
            for t in range(nb):
                diffT[0, t] = 0.0
            for k in range(n_comp):
                for t in range(nb):
                    diffT[0, t] += resp[k, t]
        # F_k = sum_t (r_kt - s_t [k = a_t]) z_t, or sum_t r_kt z_t around c
        _first_moments(resp, xT, nb, np.zeros((n_comp, dp), dtype=xT.dtype), first)
        # G = sum_t s_t z z^T
        for i in range(dp):
            for t in range(nb):
                wT[i, t] = diffT[0, t] * xT[i, t]
        tile_moments(wT, xT, nb, second[0], True)
    elif cov == DIAG or cov == SPHERICAL:
        kept = kept_masks(mass, nb, floor, masks, counts)
        if kept * _SPARSE_RATIO <= n_comp * nb:
            _list_kept_rows(nb, masks, counts, rows)
            _listed_moments(X, r0, resp, dist, counts, rows, means, cov, first, second)
        elif cov == DIAG:
            _diag_moments(resp, xT, nb, means, first, second)
        else:  # the second moment reuses the squared distances
            for k in range(n_comp):
                s2 = zero
                for t in range(nb):
                    s2 += resp[k, t] * dist[k, t]
                second[k, 0, 0] += s2
            _first_moments(resp, xT, nb, means, first)


def _estep_runs_of(cov):
    """The span kernel of covariance code ``cov``, with the code a compile-time
    constant (a closure variable), so only that type's branches compile.

    The kernel folds runs g0 + b of tiles (b0 <= b < b1) each into row b of
    ``partials`` (see :func:`statistics_views`); :func:`run_groups` adds the
    rows into the totals in run order.  The run loop is the closure itself, not
    a body inlined into it: Numba deep-copies an inlined function's IR block by
    block, each copy with all of its variables, before the constant prunes it;
    for this loop, with every type's tile code inlined in turn, that took
    1.1-1.4 s of each kernel's compile."""
    def runs(X, sample_weight, has_weight, means, prec, const, shift, offsets, unit, tile,
             run, sec_shape, anchored_rows, g0, partials, b0, b1):
        n = X.shape[0]
        n_comp, dp = means.shape
        # 'diag'/'spherical': try the listed pairs first (see _mark_pairs)
        sparse = cov == DIAG or cov == SPHERICAL
        margin = np.log(tile * n_comp / unit) + 1.0
        # scratch for the span's runs, reused run after run as tile after tile
        xT = new_tile(X, dp, tile)
        diffT = np.empty((dp, tile), dtype=X.dtype)
        wT = np.empty((dp, tile), dtype=X.dtype)
        Y = np.empty((4, tile), dtype=X.dtype)
        y = np.empty(tile, dtype=X.dtype)
        mx = np.empty(tile, dtype=X.dtype)
        logp = np.empty((n_comp, tile), dtype=X.dtype)
        resp = np.empty((n_comp, tile), dtype=X.dtype)
        dist = np.empty((n_comp if cov == SPHERICAL else 1, tile), dtype=X.dtype)
        floor = np.zeros(n_comp)
        idx = np.empty(tile if cov == FULL else 1, dtype=np.int64)
        masks = np.empty(((n_comp + 63) // 64, tile), dtype=np.uint64)
        counts = np.empty(n_comp, dtype=np.int64)
        # the sparse paths list at most one in _SPARSE_RATIO of a tile's pairs
        # (the marking takes one component's rows more, and its stores' room,
        # before it gives up)
        rows = np.empty(n_comp * tile // _SPARSE_RATIO + 1 + tile + _LIST_LANES,
                        dtype=np.int64)
        vals = np.empty(rows.shape[0], dtype=X.dtype)
        lw = np.empty(tile, dtype=X.dtype)
        for b in range(b0, b1):
            row = zeroed_row(partials, b)
            ll, nk, first, second, anchored, pair_mass = statistics_views(
                row, n_comp, dp, sec_shape, anchored_rows)
            wait = 0  # tiles of this run left before the listing is tried again
            for r0 in range((g0 + b) * run * tile, min(n, (g0 + b + 1) * run * tile), tile):
                nb = min(tile, n - r0)
                load_tile_transposed(X, r0, nb, xT)
                log_prob_tile(cov, xT, nb, means, prec, const, shift, offsets, diffT, Y, dist,
                              logp, mx, sparse)
                # (the code itself, not ``sparse``: a branch Numba prunes per type)
                if cov == DIAG or cov == SPHERICAL:
                    if wait > 0:
                        wait -= 1
                    else:
                        marked = _mark_pairs(logp, nb, const, margin, sample_weight, r0,
                                             has_weight, mx, lw, rows, vals, counts)
                        if 0 <= marked and marked * _SPARSE_RATIO <= n_comp * nb:
                            ll[0] += _listed_responsibilities(logp, nb, mx, counts, rows, vals,
                                                              y, sample_weight, r0, has_weight,
                                                              resp, nk)
                            _listed_moments(X, r0, resp, dist, counts, rows, means, cov, first,
                                            second)
                            continue
                        wait = _RETRY_AFTER
                exp_tile(logp, nb, mx, y, resp, sparse)
                ll[0] += row_weights(nb, mx, y, sample_weight, r0, has_weight)
                # responsibilities finished, N_k summed, logp becomes the masses
                responsibilities_and_masses(resp, logp, y, const, nb, unit, floor, nk)
                _tile_stats(cov, X, r0, xT, nb, resp, means, dist, logp, floor, diffT, wT, idx,
                            masks, counts, rows, nk, first, second, anchored, pair_mass)
    return named_span_kernel(runs, f"estep_runs_{COVARIANCE_TYPES[cov]}")


ESTEP_RUNS = {code: _estep_runs_of(code) for code in (FULL, TIED, DIAG, SPHERICAL)}


@numba.njit(**_jit)
def _statistics_offsets(n_comp, dp, sec_shape, tied):
    """Where each statistic of :func:`statistics_views` starts in its row of
    floats, and (last) where the row ends; the one statement of the layout."""
    o1 = 1 + n_comp
    o2 = o1 + n_comp * dp
    o3 = o2 + sec_shape[0] * sec_shape[1] * sec_shape[2]
    k_tied = n_comp if tied else 0
    o4 = o3 + k_tied * dp
    return o1, o2, o3, o4, o4 + k_tied * k_tied


@numba.njit(**_jit)
def statistics_views(row, n_comp, dp, sec_shape, tied):
    """The statistics in one row of floats -- a run's partials, or the totals:
    log-likelihood (1,), N_k (K,), first moments (K, Dp), second moments
    ``sec_shape``, and for 'tied' around anchors (``tied``) the anchored sums
    (K, Dp) and the anchor-by-component masses (K, K) of :func:`_anchor_rows`
    (empty otherwise) -- as views of ``row`` (:func:`statistics_size` floats)."""
    o1, o2, o3, o4, end = _statistics_offsets(n_comp, dp, sec_shape, tied)
    k_tied = n_comp if tied else 0
    return (row[0:1], row[1:o1], row[o1:o2].reshape((n_comp, dp)),
            row[o2:o3].reshape(sec_shape), row[o3:o4].reshape((k_tied, dp)),
            row[o4:end].reshape((k_tied, k_tied)))


def statistics_size(n_comp, dp, sec_shape, tied):
    """Floats in one row of :func:`statistics_views`."""
    return int(_statistics_offsets(n_comp, dp, tuple(int(v) for v in sec_shape),
                                   bool(tied))[-1])


# 'tied' takes rows around their anchors when the common centre's sums could lose
# more of the scatter than about 1e-5 (float32, ten times its other statistics'
# rounding) or 1e-12 (float64).  That loss measured up to 0.05 of eps * kappa
# where it passes the dtype's own rounding, kappa the largest squared distance of
# a mean from the centre in the precision's metric (float32, D = 2-40, K = 3-20,
# separations 3-100 standard deviations), so the anchors come in above
# eps * kappa = 20 times the target: from about 40 standard deviations in float32
# and 300 in float64.  Below, the common centre is accurate and cheaper: the
# anchors cost E-steps of separated clusters 1.1-1.3x at D = 13-64 and 1.8x at
# D = 5 (1.2-2.7x before the copy around the anchors went by blocks;
# bench/results, sessions 48 and 50).  In float32 it is the point where the GPU
# kernels turn to float64 (FLOAT32_EXPANSION_LIMIT): one switch point.
TIED_ANCHOR_LOSS = {np.dtype(np.float32): FLOAT32_EXPANSION_LIMIT,
                    np.dtype(np.float64): 2e-11}


def tied_needs_anchors(means, centre, precisions_cholesky, dtype):
    """Whether 'tied''s scatter goes around each row's anchor: eps * kappa above
    TIED_ANCHOR_LOSS, kappa from :func:`centre_spread` (see :func:`_anchor_rows`).
    ``means`` (K, D) and ``centre`` (D,) as the kernel rounded them,
    ``precisions_cholesky`` (D, D)."""
    kappa = centre_spread(means, centre, precisions_cholesky, "tied")
    return np.finfo(dtype).eps * kappa > TIED_ANCHOR_LOSS[np.dtype(dtype)]


def _pair_scatter(pair_mass, centred_means):
    """E = sum_{a != k} R_ak (mu_k - mu_a)(mu_k - mu_a)^T, float64 (D, D).

    ``pair_mass`` R (K, K), zero on its diagonal (:func:`_anchor_rows` adds
    only a row's other components), ``centred_means`` (K, D): the means less a
    common centre.  Summed over the nonzero masses, D^2 each, as products of
    the differences themselves in blocks of at most 2^20 numbers, in a fixed
    order.  Expanded into sums of the centred means' own products instead
    (K^2 D + K D^2 in all), it lost 5e-10 of the scatter (float64) on two
    groups of overlapping components 3000 deviations apart: the cancellation
    the anchors are there to avoid.
    """
    a, k = np.nonzero(pair_mass)
    d = centred_means.shape[1]
    scatter = np.zeros((d, d))
    block = max(1, (1 << 20) // max(d, 1))
    for b in range(0, a.size, block):
        ab, kb = a[b:b + block], k[b:b + block]
        e = centred_means[kb] - centred_means[ab]
        scatter += (e * pair_mass[ab, kb][:, None]).T @ e
    return scatter


def estep_stats_numba(X, weights, means, precisions_cholesky, covariance_type,
                      sample_weight=None, *, keep_on_device=False):
    """Numba backend of :func:`fastlvm.kernels.estep_stats` (inputs checked).
    ``keep_on_device`` is accepted as the device backends' is, and has nothing
    to do here: the statistics are host arrays.

    Returns
    -------
    tuple
        (log_likelihood, nk, sum_x, second_moment, center) as float64, with
        second_moment around ``center`` (``means`` rounded to X's dtype) in
        sklearn's shape for the type.
    """
    X = read_only(X)
    n, d = X.shape
    means_c, prec, const, shift, offsets, cov = prepare_params(
        means, precisions_cholesky, covariance_type, X.dtype, weights)
    n_comp, dp = means_c.shape
    with np.errstate(divide="ignore"):
        const = const + np.log(np.asarray(weights, dtype=np.float64))
    sec_shape = {FULL: (n_comp, dp, dp), TIED: (1, dp, dp), DIAG: (n_comp, 1, dp),
                 SPHERICAL: (n_comp, 1, 1)}[cov]
    anchored_rows = cov == TIED and tied_needs_anchors(means_c[:, :d], shift[:d],
                                                       precisions_cholesky, X.dtype)
    totals = np.zeros(statistics_size(n_comp, dp, sec_shape, anchored_rows))
    loglik, nk, first, second, anchored, pair_mass = statistics_views(
        totals, n_comp, dp, sec_shape, anchored_rows)
    sw, has_weight = kernel_weights(sample_weight)
    tile = gaussian_tile_rows(cov, dp, n_comp, X.dtype.itemsize)
    if n:
        run = tiles_per_run(n, tile)
        n_runs = run_count(n, tile, run)
        run_groups(ESTEP_RUNS[cov], n_runs, group_size(totals.shape[0]), totals, X, sw,
                   has_weight, means_c, prec, const, shift, offsets, np.finfo(X.dtype).eps / 2,
                   tile, run, sec_shape, anchored_rows)
    # drop the feature padding (padded features have all-zero statistics)
    first = first[:, :d]
    second = second[..., :d] if cov in (DIAG, SPHERICAL) else second[:, :d, :d]
    shift = shift[:d]
    means_c = means_c[:, :d]
    means64 = means_c.astype(np.float64)  # the shift the kernel actually used
    if cov == FULL:
        lower = np.tril(second)
        second = lower + np.swapaxes(np.tril(second, -1), 1, 2)
        sum_x = first + nk[:, None] * means64
    elif cov == TIED:  # S around the means (module header)
        g = np.tril(second[0])
        g = g + np.tril(g, -1).T
        centred = means64 - shift.astype(np.float64)  # (K, D)
        cross = first.T @ centred  # sum_k F_k (mu_k - c)^T, or sum_k A_k (mu_k - c)^T
        if anchored_rows:  # S = G - M - M^T + E
            second = g - cross - cross.T + _pair_scatter(pair_mass, centred)
            # sum_x_k = sum_n r_nk (z_n + mu_a)
            #         = F_k + (anchored)_k + N_k mu_k + sum_{a != k} R_ak (mu_a - mu_k)
            away = pair_mass.T @ centred - pair_mass.sum(axis=0)[:, None] * centred
            sum_x = first + anchored[:, :d] + nk[:, None] * means64 + away
        else:  # S = G - sum_k (A_k d_k^T + d_k A_k^T) + sum_k N_k d_k d_k^T, d = mu - c
            second = g - cross - cross.T + (nk[:, None] * centred).T @ centred
            sum_x = first + nk[:, None] * shift.astype(np.float64)
    elif cov == DIAG:
        second = second[:, 0, :]
        sum_x = first + nk[:, None] * means64
    else:
        second = second[:, 0, 0]
        sum_x = first + nk[:, None] * means64
    return float(loglik[0]), nk, sum_x, second, means64
