# Numba CPU kernel for mppca_stats: the fused E-step pass of a mixture of PPCA.
#
# Design: per tile of rows (transposed into a (Dp, tile) scratch), the K
# log-densities come from mppca_log_prob's tile code, which also leaves each
# component's whitened projections u = B_k^T (x - mu_k) (K, qp, tile) and
# squared distances; log-weights are added, rows are normalised by their
# log-sum-exp, and the responsibilities fold straight into the statistics:
# sum r, sum r c, sum r ||c||^2, sum r c u^T (D x q, 2 x 4 register blocks),
# sum r u and sum r u u^T, with c = x - mu_k recomputed per component (D
# subtractions, cheaper than keeping K centred tiles).  Per (row, component)
# that is 2 D q + 4 D multiply-adds; nothing of size n x K outlives a tile.
# The launcher maps u-statistics to the projections y = W_k c = L_k u exactly,
# in float64 (q x q products).
#
# Sparse responsibilities: a component that is exactly zero on most of a
# tile's rows has its nonzero rows gathered first (float32 rounds a component
# 87 nats below a row's best to 0, float64 one 708 nats below).  estep_stats'
# 'full', 'diag' and 'spherical' also leave out rows whose mass r (1 + m) is
# within rounding of the sums (``responsibilities_and_masses``); the same bound
# holds here (the statistics are fixed linear images of sum r c and
# sum r c c^T), but on the MixtureOfPPCA
# benchmark's data the float64 responsibilities are already exact zeros and
# the extra pass over the masses bought nothing (A/B, session 12), so this
# kernel keeps the exact-zero rule.
#
# Pruning (K >= 4, ``_numba_pruning``): a tile's rows whose responsibility
# provably sits on one component (all others below e^-64) skip the other
# K - 1 components and fold into the statistics from per-component blocks;
# the rest of the tile's rows (dirty) are gathered, tile after tile of a run,
# into a buffer that goes through the dense pass above when full and at the
# run's end (a few dozen rows at a time, the dense pass ran at half its
# per-row speed).  A probe of rows spread over the data decides first
# whether pruning pays at all.  The span kernel is built twice
# (``MPPCA_STATS_RUNS``, the choice a compile-time constant), so a pass that
# does not prune never compiles the pruned path (20 of a digits fit's 35 s of
# first compilation).
#
# Tiles are mppca_log_prob's larger ones (LOW_RANK_TILE_BYTES), eight times
# that on the pruned path (PRUNE_TILE_FACTOR, at most a run of tiles).
# Precision and determinism as estep_stats: sums over one tile's rows run in
# the data's dtype; each parallel task folds a run of tiles (tiles_per_run, from
# the row count alone) into float64 partials, zeroed by the task and merged in
# run order (add_partials, no atomics), so the result does not depend on the
# thread count.
# Statistics are centred on the means rounded to the data's dtype (returned as
# ``center``).  Limits: float32/float64.
import numba
import numpy as np

from .._low_rank import projection_stats
from .._numba_support import (CACHE, FASTMATH, centred_columns, group_size, kernel_weights,
                              load_tile_transposed, named_span_kernel, new_tile, read_only,
                              run_count, select_columns, tile_moments, tiles_per_run, zeroed_row)
from .._thread_spans import run_groups
from ..log_responsibilities._numba import normalise_tile
from ..mppca_log_prob._numba import (LOW_RANK_TILE_BYTES, LowRankTileParams,
                                     low_rank_log_prob_tile)
from ._numba_pruning import (MIN_PRUNED_COMPONENTS, NO_HINTS, PROBE_ROWS, PRUNE_RETRY_TILES,
                             PRUNE_TILE_FACTOR, PruningParams, pruned_tile_stats,
                             pruning_lost, pruning_pays, pruning_scratch)

_jit = dict(fastmath=FASTMATH, cache=CACHE)


@numba.njit(**_jit)
def _tile_low_rank_stats(xT, nb, resp, means, uT, sq, cT, wuT, ucT, idx, nk, first, sum_sq,
                         sum_u, cross, u_second):
    """Fold a tile's responsibilities (K, tile) into its float64 partials.

    A component whose responsibility is exactly zero on more than an eighth of
    the tile's rows (see :func:`select_columns`) is folded over its nonzero
    rows only, gathered into compact columns (c into ``cT``, u into ``ucT``), so
    its 2 D q + 4 D multiply-adds per row run over those alone.
    """
    n_comp, dp = means.shape
    qp = uT.shape[1]
    zero = xT.dtype.type(0)
    for k in range(n_comp):
        s_n = zero
        s_sq = zero
        for t in range(nb):
            r = resp[k, t]
            s_n += r
            s_sq += r * sq[k, t]
        nk[k] += s_n
        sum_sq[k] += s_sq
        m, dense = select_columns(resp, k, nb, 0.0, idx)
        centred_columns(xT, nb, resp, k, means[k], idx, m, dense, cT, cT, False, first[k])
        for a in range(qp):
            s = zero
            if dense:
                for t in range(nb):
                    wu = resp[k, t] * uT[k, a, t]
                    wuT[a, t] = wu
                    s += wu
            else:
                for j in range(m):
                    t = idx[j]
                    u = uT[k, a, t]
                    ucT[a, j] = u
                    wu = resp[k, t] * u
                    wuT[a, j] = wu
                    s += wu
            sum_u[k, a] += s
        tile_moments(cT, wuT, m, cross[k], False)
        tile_moments(uT[k] if dense else ucT, wuT, m, u_second[k], False)


@numba.njit(**_jit)
def tile_scratch(X, n_comp, dp, qp, tile):
    """One task's scratch for the E-step's tile loop: (xT, cT, uT, wuT, ucT, idx, sq,
    logp, resp, mx, y), uninitialised, in X's dtype (idx int64).  Also what
    ``bench/mppca_stages.py`` runs the same loop on."""
    dt = X.dtype
    return (new_tile(X, dp, tile), np.empty((dp, tile), dtype=dt),
            np.empty((n_comp, qp, tile), dtype=dt), np.empty((qp, tile), dtype=dt),
            np.empty((qp, tile), dtype=dt), np.empty(tile, dtype=np.int64),
            np.empty((n_comp, tile), dtype=dt), np.empty((n_comp, tile), dtype=dt),
            np.empty((n_comp, tile), dtype=dt), np.empty(tile, dtype=dt),
            np.empty(tile, dtype=dt))


@numba.njit(**_jit)
def _dense_tile(xT, nb, weights, w0, has_weight, const, means, whitened, inv_noise,
                whitened64, chol_inv_t, inv_noise64, cancel, scratch, nk, first, sum_sq,
                sum_u, cross, u_second):
    """The dense pass over a tile's first ``nb`` columns: log-densities,
    normalisation (weights[w0 + t] for column t), statistics; returns the
    tile's weighted log-likelihood."""
    _, cT, uT, wuT, ucT, idx, sq, logp, resp, mx, y = scratch
    low_rank_log_prob_tile(xT, nb, const, means, whitened, inv_noise, whitened64, chol_inv_t,
                           inv_noise64, cancel, uT, sq, logp)
    ll = normalise_tile(logp, nb, mx, y, weights, w0, has_weight, resp)
    _tile_low_rank_stats(xT, nb, resp, means, uT, sq, cT, wuT, ucT, idx, nk, first, sum_sq,
                         sum_u, cross, u_second)
    return ll


def _mppca_stats_runs_of(prune):
    """The span kernel with pruning on or off, ``prune`` a compile-time constant
    (a closure variable), so a pass that does not prune (fewer than 4 *
    PROBE_ROWS rows, few components, a probe that says it would not pay) never
    compiles the pruning code.

    The kernel folds runs g0 + b of tiles (b0 <= b < b1) each into row b of
    ``partials`` (:func:`statistics_views`), which :func:`run_groups` adds into
    the totals in run order.  The run loop is the closure itself, not a body
    inlined into it, as the E-step's
    (:func:`fastlvm.kernels.estep_stats._numba._estep_runs_of`)."""
    def runs(X, sample_weight, has_weight, hints, has_hints, const, means, whitened,
             inv_noise, whitened64, chol_inv_t, inv_noise64, cancel, centres_t, shift,
             centre_sq, gap, inv_sd, nats, whitened_t, max_survivors, pulls, tile, run, g0,
             partials, b0, b1):
        n = X.shape[0]
        n_comp, dp = means.shape
        qp = whitened.shape[2]
        # the scratch, once for all of the task's runs (none carries anything from
        # one run to the next), not once per run of a few thousand rows
        big = PRUNE_TILE_FACTOR * tile if prune else tile
        scratch = tile_scratch(X, n_comp, dp, qp, tile)
        # the pruned path's longer tiles need a longer transposed tile (its dense
        # rows go there); the dense pass's K x tile scratch does not grow with them
        xT = new_tile(X, dp, big) if prune else scratch[0]
        if prune:  # a branch on ``prune`` itself: the dense kernel never compiles it
            pscratch = pruning_scratch(X, n_comp, centres_t.shape[1], dp, qp, X.shape[1], big,
                                       max_survivors)
        else:
            pscratch = None
        dirty_weight = np.empty(big if prune else 0)  # the dirty rows' weights
        # the pruned tiles' dirty rows, gathered into whole tiles for the dense
        # pass (a few dozen rows at a time ran it at half speed)
        buf = new_tile(X, dp, tile if prune else 0)
        buf_w = np.empty(tile if prune else 0, dtype=dirty_weight.dtype)
        for b in range(b0, b1):
            row = zeroed_row(partials, b)
            part = statistics_views(row, n_comp, dp, qp)
            ll_b = part[0]
            stats = (part[1], part[2], part[3], part[4], part[5], part[6])
            n_buf = 0
            dense_left = 0
            r0 = (g0 + b) * run * tile
            stop = min(n, (g0 + b + 1) * run * tile)
            while r0 < stop:
                row0 = r0
                # (a branch on ``prune`` itself, which Numba prunes in the dense kernel)
                if not prune or dense_left > 0:
                    nb = min(tile, stop - r0)
                    r0 += nb
                    load_tile_transposed(X, row0, nb, xT)
                    dense_left = max(dense_left - 1, 0)
                    ll_b[0] += _dense_tile(xT, nb, sample_weight, row0, has_weight, const,
                                           means, whitened, inv_noise, whitened64, chol_inv_t,
                                           inv_noise64, cancel, scratch, *stats)
                    continue
                # the pruned path takes larger tiles (longer loops over its blocks) and
                # reads its own rows
                nb = min(big, stop - r0)
                r0 += nb
                ll, n_dirty, n_pairs, n_dots = pruned_tile_stats(
                    X, row0, xT, nb, sample_weight, has_weight, hints, has_hints, const, means,
                    whitened, inv_noise, whitened64, chol_inv_t, inv_noise64, cancel, centres_t,
                    shift, centre_sq, gap, inv_sd, nats, whitened_t, max_survivors, pulls,
                    pscratch, dirty_weight, *stats)
                ll_b[0] += ll
                lost = pruning_lost(n_dirty, n_pairs, n_dots, whitened64.shape[2], nb)
                dense_left = PRUNE_RETRY_TILES if lost else 0
                # the dirty rows (xT's first n_dirty columns) into the buffer, each
                # full buffer through the dense pass
                e = 0
                while e < n_dirty:
                    m = min(n_dirty - e, tile - n_buf)
                    for i in range(dp):
                        for j in range(m):
                            buf[i, n_buf + j] = xT[i, e + j]
                    for j in range(m):
                        buf_w[n_buf + j] = dirty_weight[e + j]
                    n_buf += m
                    e += m
                    if n_buf == tile:
                        ll_b[0] += _dense_tile(buf, n_buf, buf_w, 0, has_weight, const, means,
                                               whitened, inv_noise, whitened64, chol_inv_t,
                                               inv_noise64, cancel, scratch, *stats)
                        n_buf = 0
            if n_buf:
                ll_b[0] += _dense_tile(buf, n_buf, buf_w, 0, has_weight, const, means,
                                       whitened, inv_noise, whitened64, chol_inv_t,
                                       inv_noise64, cancel, scratch, *stats)
    return named_span_kernel(runs, "mppca_stats_runs_pruned" if prune
                             else "mppca_stats_runs_dense")


MPPCA_STATS_RUNS = {prune: _mppca_stats_runs_of(prune) for prune in (False, True)}


@numba.njit(**_jit)
def statistics_views(row, n_comp, dp, qp):
    """The statistics in one row of floats -- a run's partials, or the totals:
    log-likelihood (1,), N_k (K,), first moments (K, Dp), squared norms (K,),
    sum u (K, Qp), cross (K, Dp, Qp), u second moments (K, Qp, Qp) -- as views
    of ``row``."""
    o = _offsets(n_comp, dp, qp)
    return (row[0:1], row[o[0]:o[1]], row[o[1]:o[2]].reshape((n_comp, dp)), row[o[2]:o[3]],
            row[o[3]:o[4]].reshape((n_comp, qp)), row[o[4]:o[5]].reshape((n_comp, dp, qp)),
            row[o[5]:o[6]].reshape((n_comp, qp, qp)))


@numba.njit(**_jit)
def _offsets(n_comp, dp, qp):
    """Where each statistic starts (and the last ends) in a row of partials."""
    o0 = 1
    o1 = o0 + n_comp
    o2 = o1 + n_comp * dp
    o3 = o2 + n_comp
    o4 = o3 + n_comp * qp
    o5 = o4 + n_comp * dp * qp
    return o0, o1, o2, o3, o4, o5, o5 + n_comp * qp * qp


def mppca_stats_numba(X, weights, means, components, noise_variance, sample_weight=None, *,
                      keep_on_device=False, prune=True, anchors=None):
    """Numba backend of :func:`fastlvm.kernels.mppca_stats` (inputs checked).
    ``keep_on_device`` is accepted as the device backends' is, and has nothing
    to do here: the statistics are host arrays.  ``prune=False`` runs the dense
    pass on every tile (the statistics agree to rounding: the pruned path
    leaves out responsibilities below e^-64 of a row's largest; see
    ``_numba_pruning``).

    ``anchors`` : ndarray (n,), int32, optional, read and written in place
        The pruned path's anchor hints, carried from one pass over the same
        rows to the next (an EM fit's iterations): start it at -1 (no hint).
        With it, tiles whose rows all have hints skip the nearest-mean search.
        Hints change the order of the sums, so results agree with a run
        without them to rounding; a run is reproducible when its hints start
        the same.

    Returns
    -------
    tuple
        (log_likelihood, nk, sum_x, sum_sq, cross, sum_proj, proj_second,
        center), float64, around ``center`` (the means rounded to X's dtype).
    """
    from fastlvm._config import tile_rows

    X = read_only(X)
    n, d = X.shape
    n_comp, q, _ = components.shape
    params = LowRankTileParams(means, components, noise_variance, X.dtype)
    dp, qp = params.whitened.shape[1:]
    with np.errstate(divide="ignore"):
        const = params.const + np.log(np.asarray(weights, dtype=np.float64))
    totals = np.zeros(_offsets(n_comp, dp, qp)[-1])
    loglik, nk, first, sum_sq, sum_u, cross, u_second = statistics_views(totals, n_comp, dp,
                                                                         qp)
    sw, has_weight = kernel_weights(sample_weight)
    if anchors is not None and not (
            isinstance(anchors, np.ndarray) and anchors.dtype == np.int32
            and anchors.shape == (n,) and anchors.flags.writeable):
        raise ValueError(
            "anchors must be a writeable int32 array of shape (n_samples,) = "
            f"({n},); got {type(anchors).__name__} "
            f"{getattr(anchors, 'dtype', '')} {getattr(anchors, 'shape', '')}. Start it "
            "with np.full(n_samples, -1, dtype=np.int32).")
    tile = tile_rows(dp, X.dtype.itemsize, LOW_RANK_TILE_BYTES)
    # below a few probes' worth of rows the probe would cost more than it saves
    prune = prune and n >= 4 * PROBE_ROWS and n_comp >= MIN_PRUNED_COMPONENTS
    pruning = PruningParams(params, d, prune)
    prune = prune and pruning_pays(X, const, params, pruning)
    if n:
        run = tiles_per_run(n, tile)
        n_runs = run_count(n, tile, run)
        run_groups(
            MPPCA_STATS_RUNS[bool(prune)], n_runs, group_size(totals.shape[0]), totals,
            X, sw, has_weight,
            NO_HINTS if anchors is None else anchors, anchors is not None, const,
            *params.kernel_args(), *pruning.kernel_args(), tile, run)
    # u = L^{-1} y: back to the projections y = L u (exact float64 algebra)
    cross, sum_proj, proj_second = projection_stats(params.chol, cross[:, :d, :q],
                                                    sum_u[:, :q], u_second[:, :q, :q])
    center = params.means[:, :d].astype(np.float64)
    sum_x = first[:, :d] + nk[:, None] * center
    return float(loglik[0]), nk, sum_x, sum_sq, cross, sum_proj, proj_second, center
