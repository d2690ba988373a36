import numpy as np
import pytest

from fastlvm.kernels import MPPCAStats, mppca_stats, mppca_stats_ref
from fastlvm.kernels.mppca_stats import IMPLEMENTATIONS
from tests.conftest import (CUDA, DTYPES, MPPCA_SHAPES, assert_mppca_stats_close,
                            assert_same_bits_across_thread_counts, backend_arrays, mppca_problem,
                            to_numpy)
from tests.tolerances import assert_close


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("backend", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", MPPCA_SHAPES)
def test_matches_reference(weighted, backend, dtype, shape, rng, monkeypatch):
    X, weights, means, comp, noise = mppca_problem(rng, shape, dtype)
    sw = rng.random(shape[0]) * 2 if weighted else None
    Xb, swb = backend_arrays(backend, X, sw)
    monkeypatch.setenv("FASTLVM_BACKEND", backend)
    got = mppca_stats(Xb, weights, means, comp, noise, sample_weight=swb)
    assert isinstance(got, MPPCAStats)
    ref = mppca_stats_ref(X, weights, means, comp, noise, sample_weight=sw)
    assert_mppca_stats_close(got, ref, dtype)


def _separated(rng, n, dtype):
    """Four clusters 40 sigma apart in D = 9 with q = 2, a broad component
    (noise variance 100) over all of them and a near-empty far one: exactly
    zero responsibilities on most rows (float64 included), nonzero everywhere
    for the broad one, zero everywhere for the far one."""
    d, q = 9, 2
    centers = 28.0 * np.eye(4, d)
    comp = rng.standard_normal((6, q, d)) * 0.5
    labels = rng.integers(0, 4, n)
    X = (centers[labels] + np.einsum("nq,nqd->nd", rng.standard_normal((n, q)), comp[labels])
         + rng.standard_normal((n, d))).astype(dtype)
    means = np.vstack([centers, np.zeros((1, d)), np.full((1, d), 1e4)])
    means = means.astype(dtype).astype(np.float64)
    noise = np.array([1.0, 1.0, 1.0, 1.0, 100.0, 1.0])
    weights = np.array([1, 1, 1, 1, 1, 1e-9])
    return X, weights / weights.sum(), means, comp, noise


@pytest.mark.parametrize("backend", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_responsibilities_match_reference(backend, dtype, rng, monkeypatch):
    # as in test_estep_stats.py: fewer rows for Triton's interpreter
    n = 601 if backend == "triton" and not CUDA else 3001
    X, weights, means, comp, noise = _separated(rng, n, dtype)
    sw = rng.random(n) * 2
    sw[::7] = 0.0
    Xb, swb = backend_arrays(backend, X, sw)
    monkeypatch.setenv("FASTLVM_BACKEND", backend)
    got = mppca_stats(Xb, weights, means, comp, noise, sample_weight=swb)
    nk = to_numpy(got.nk)
    assert nk[5] == 0.0 and np.all(nk[:5] > 0)
    ref = mppca_stats_ref(X, weights, means, comp, noise, sample_weight=sw)
    assert_mppca_stats_close(got, ref, dtype)


def _clusters(rng, n, dtype, offset=0.0, on_segment=0.2, at_mean=0.05, q=3, midway=0.0):
    """Six PPCA clusters in D = 13 with q latent dimensions, 30 noise deviations
    apart (one broad, far from the rest), a component of weight zero and one 7.5 noise
    deviations from cluster 3; a fraction ``on_segment`` of the rows on the
    segment from cluster 0 to cluster 1 (3/10 to 1/2 of the way), where the
    second responsibility falls from e^-350 to e^0, and ``at_mean`` exactly at
    cluster 3's mean, where the pruning bound is exact (about e^-28 there).
    Most rows have one responsibility of 1 and the others below e^-64 (the
    pruned path's clean rows); the segment's rows straddle that threshold.
    Of the segment's rows, a fraction ``midway`` of all rows lie 0.47 to 0.53 of
    the way instead, where both responsibilities are real.

    Returns
    -------
    X, weights, means, components, noise_variance, segment (bool mask of rows)
    """
    d, k = 13, 8
    centers = np.zeros((k, d))
    centers[:6, :6] = 30.0 * np.eye(6)
    centers[2, 2] = 120.0
    centers[7] = centers[3]
    centers[7, 7] = 7.5
    centers += offset
    centers = centers.astype(dtype).astype(np.float64)
    comp = rng.standard_normal((k, q, d)) * 0.5
    # cluster 3's rows are all dirty (component 7 is e^-28 away): a few only
    labels = rng.choice(6, n, p=[0.24, 0.24, 0.24, 0.04, 0.12, 0.12])
    X = (centers[labels] + np.einsum("nq,nqd->nd", rng.standard_normal((n, q)), comp[labels])
         + rng.standard_normal((n, d)))
    u = rng.random(n)
    segment = u < on_segment
    f = rng.uniform(0.3, 0.5, segment.sum())
    f[:round(midway * n)] = rng.uniform(0.47, 0.53, round(midway * n))
    X[segment] = centers[0] + f[:, None] * (centers[1] - centers[0])
    X[u > 1 - at_mean] = centers[3]
    weights = np.array([1.0, 1, 1, 1, 1, 1, 0, 1])
    noise = np.full(k, 1.0)
    noise[2] = 4.0  # a broader one: its bound is the loosest
    return X.astype(dtype), weights / weights.sum(), centers, comp, noise, segment


def _one_pruned_tile(X, weights, means, comp, noise, max_survivors=None):
    """``pruned_tile_stats`` over all of X as one tile (``max_survivors`` in
    place of the kernel's own, if given): returns ``run(hints)``
    (None: no hints; an int32 array: read and written), which gives the
    tile's log-likelihood, fresh statistics and the rows left to the dense pass, and the
    pass's ``xT`` and scratch (anchors at [1], the rows' states at [17]) as the
    last run left them."""
    from fastlvm.kernels._numba_support import new_tile
    from fastlvm.kernels.mppca_log_prob._numba import LowRankTileParams
    from fastlvm.kernels.mppca_stats._numba_pruning import (DENSE, NO_HINTS, PruningParams,
                                                            pruned_tile_stats,
                                                            pruning_scratch)

    n = X.shape[0]
    params = LowRankTileParams(means, comp, noise, X.dtype)
    with np.errstate(divide="ignore"):
        const = params.const + np.log(weights)
    prune = PruningParams(params, X.shape[1])
    if max_survivors is not None:
        prune.max_survivors = max_survivors
    k, dp = params.means.shape
    qp = params.whitened.shape[2]
    xT = new_tile(X, dp, n)
    scratch = pruning_scratch(X, k, prune.centres_t.shape[1], dp, qp, X.shape[1], n,
                              prune.max_survivors)

    def run(hints=None):
        xT[:X.shape[1]] = np.nan  # the pass reads its tile from X, not from xT
        stats = [np.zeros(k), np.zeros((k, dp)), np.zeros(k), np.zeros((k, qp)),
                 np.zeros((k, dp, qp)), np.zeros((k, qp, qp))]
        ll, n_dirty, _, _ = pruned_tile_stats(X, 0, xT, n, np.ones(1), False,
                                              NO_HINTS if hints is None else hints,
                                              hints is not None, const, *params.kernel_args(),
                                              *prune.kernel_args(), scratch, np.empty(n),
                                              *stats)
        dense = np.flatnonzero(scratch[17][:n] == DENSE)  # the rows' states
        assert dense.size == n_dirty
        return ll, stats, dense

    return run, xT, scratch


@pytest.mark.parametrize("most", [2, 8])  # max_survivors: some rows dense, or none
@pytest.mark.parametrize("dtype", DTYPES)
def test_pruned_rows_are_those_the_bound_proves(dtype, most, rng):
    """The pruned tile pass takes a row as clean (all on its anchor) when every
    other component's weighted log-density is bounded PRUNE_NATS below its
    anchor's; as sparse when the bound leaves at most ``max_survivors``
    (``most``) components, the anchor's included (the row's responsibilities
    over those alone, exactly); and leaves the other rows to the dense pass.
    On separated clusters most rows are clean and the rows between two
    clusters sparse; the tile's statistics are those of its clean and sparse
    rows.  (With ``most`` = K every row is clean or sparse, some sparse ones
    on two components alike.)"""
    n = 300
    X, weights, means, comp, noise, segment = _clusters(rng, n, dtype, offset=500.0)
    # and a few rows about midway between clusters 0 and 1: two real responsibilities
    f = np.linspace(0.47, 0.53, 7)[:, None]
    X[:7] = means[0] + f * (means[1] - means[0])
    segment[:7] = True
    all_sparse = most == means.shape[0]
    clean, sparse, dense, resp = _pruned_rows_checked(X, weights, means, comp, noise, most)
    assert 0.5 * n < clean.size and sparse.size > 0 and (dense.size == 0) == all_sparse
    assert segment[clean].any() and segment[sparse].any()  # rows near the threshold
    if all_sparse:  # rows with two real responsibilities
        assert (resp[sparse].sum(1) > 1.001).any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_pairs_beyond_the_scratch_go_in_batches(dtype, rng):
    """Rows near the centroid of three clusters keep three survivors or more:
    their (row, survivor) pairs outnumber the scratch's room (two a tile row),
    so the sparse pass takes them in batches; the statistics are still the
    reference's, and every left-out component is PRUNE_NATS down."""
    n = 300
    X, weights, means, comp, noise, _ = _clusters(rng, n, dtype, offset=500.0)
    X[:] = means[[0, 1, 4]].mean(0) + 0.3 * rng.standard_normal(X.shape)
    X[:40] = means[5] + rng.standard_normal((40, X.shape[1]))  # and a few clean rows
    k = means.shape[0]
    clean, sparse, dense, _ = _pruned_rows_checked(X, weights, means, comp, noise, k)
    assert clean.size >= 40 and sparse.size > 0.8 * n and dense.size == 0
    run, _, scratch = _one_pruned_tile(X, weights, means, comp, noise, k)
    run()
    assert scratch[21][sparse].sum() > scratch[3].shape[0] == 2 * n  # pairs, and their room


def _pruned_rows_checked(X, weights, means, comp, noise, most):
    """One pruned tile pass over X (``max_survivors`` = ``most``), checked: each
    row is clean, sparse or dense; a clean row's anchor is its best component;
    a clean row's every other component and a sparse row's every unlisted one
    lie at least PRUNE_NATS below its anchor (the exact log-densities); at most
    ``most`` survivors are listed, the anchor first; the statistics are the
    clean and sparse rows'; the dense rows are at the front of the tile.

    Returns (clean, sparse, dense, resp): the rows of each state and the exact
    responsibilities relative to each row's largest, (n, K)."""
    from fastlvm.kernels.mppca_log_prob import mppca_log_prob_ref
    from fastlvm.kernels.mppca_stats._numba_pruning import CLEAN, DENSE, PRUNE_NATS, SPARSE

    n = X.shape[0]
    run, xT, scratch = _one_pruned_tile(X, weights, means, comp, noise, most)
    ll, stats, dirty = run()
    anchor, state, survivors, n_survivors = (scratch[i][:n] for i in (1, 17, 20, 21))
    clean, sparse, dense = (np.flatnonzero(state == s) for s in (CLEAN, SPARSE, DENSE))
    assert clean.size + sparse.size + dense.size == n
    np.testing.assert_array_equal(dense, dirty)
    lp = mppca_log_prob_ref(X.astype(np.float64), means, comp, noise)
    with np.errstate(divide="ignore"):
        lp += np.log(weights)
    np.testing.assert_array_equal(anchor[clean], lp.argmax(1)[clean])
    # a clean row's every other component, a sparse row's every unlisted one,
    # at least PRUNE_NATS below its anchor
    listed = np.zeros(lp.shape, dtype=bool)
    listed[clean, anchor[clean]] = True
    for t in sparse:
        s = survivors[t, :n_survivors[t]]
        assert s[0] == anchor[t] and np.unique(s).size == s.size
        listed[t, s] = True
    if sparse.size:
        assert n_survivors[sparse].max() <= most
    kept = np.union1d(clean, sparse)
    below = lp[kept, anchor[kept]][:, None] - np.where(listed[kept], -np.inf, lp[kept])
    assert below.min() >= PRUNE_NATS
    # the statistics: the clean and sparse rows', to rounding
    dtype = X.dtype
    ref = mppca_stats_ref(X, weights, means, comp, noise, sample_weight=1.0 * (state != DENSE))
    assert_close(stats[0], ref[1], dtype)  # N_k
    assert_close(ll, ref[0], dtype)  # the log-likelihood
    # the dense rows are moved, in order, to the front of the tile
    np.testing.assert_array_equal(xT[:X.shape[1], :dense.size].T, X[dense])
    return clean, sparse, dense, np.exp(lp - lp.max(1, keepdims=True))


def _elongated(rng, n, dtype, scale=2.0, k=6):
    """``k`` PPCA clusters in D = 16 with q = 2 unit-normal loadings (a standard
    deviation of about 4 along them) and noise deviation 0.5, centres
    ``scale`` N(0, I): ||x - mu_a|| / sigma_k is far larger than most gaps, so
    the first bound keeps most other components of most rows, though the
    exact log-densities leave 97% of rows (at scale 2, k = 6) one within 64
    nats.

    Returns X, weights, means, components, noise_variance (the generating ones)
    """
    d, q = 16, 2
    centers = (rng.standard_normal((k, d)) * scale).astype(dtype).astype(np.float64)
    comp = rng.standard_normal((k, q, d))
    labels = rng.integers(0, k, n)
    X = (centers[labels] + np.einsum("nq,nqd->nd", rng.standard_normal((n, q)), comp[labels])
         + 0.5 * rng.standard_normal((n, d)))
    return X.astype(dtype), np.full(k, 1 / k), centers, comp, np.full(k, 0.25)


@pytest.mark.parametrize("dtype", DTYPES)
def test_second_bound_clears_rows_of_elongated_clusters(dtype, rng, monkeypatch):
    """On clusters broad along their loadings the first bound (the triangle
    inequality in sigma_k's norm) leaves nearly every row dirty; the second (the
    pulls C_k^{-1} (mu_a - mu_k)) clears most of them, soundly: every component
    it leaves out is PRUNE_NATS below the row's anchor, and the statistics are
    the clean and sparse rows'.  With ``PULL_BYTES`` too small for the pulls,
    the first bound alone decides."""
    from fastlvm.kernels.mppca_stats import _numba_pruning

    X, weights, means, comp, noise = _elongated(rng, 2000, dtype)
    k = means.shape[0]
    clean, sparse, dense, _ = _pruned_rows_checked(X, weights, means, comp, noise, k)
    assert dense.size == 0 and clean.size > 0.6 * X.shape[0] and sparse.size > 0
    monkeypatch.setattr(_numba_pruning, "PULL_BYTES", 0)
    first_clean, _, _, _ = _pruned_rows_checked(X, weights, means, comp, noise, k)
    assert first_clean.size < 0.25 * X.shape[0]
    assert np.isin(first_clean, clean).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_pruned_pass_on_elongated_clusters_matches_reference(dtype, rng, monkeypatch):
    """Data the first bound alone keeps on the dense pass (its probe's dirty
    rows cost too much, with ``PULL_BYTES`` 0): with the second bound the
    launcher's probe takes the pruned path, and its statistics, with and
    without anchor hints, are the reference's and the dense pass's to
    rounding."""
    from fastlvm.kernels.mppca_log_prob._numba import LowRankTileParams
    from fastlvm.kernels.mppca_stats import _numba_pruning
    from fastlvm.kernels.mppca_stats._numba import mppca_stats_numba
    from fastlvm.kernels.mppca_stats._numba_pruning import PruningParams, pruning_pays

    X, weights, means, comp, noise = _elongated(rng, 5001, dtype, scale=2.5, k=16)
    params = LowRankTileParams(means, comp, noise, X.dtype)
    const = params.const + np.log(weights)
    assert pruning_pays(X, const, params, PruningParams(params, X.shape[1]))
    with monkeypatch.context() as patch:
        patch.setattr(_numba_pruning, "PULL_BYTES", 0)
        assert not pruning_pays(X, const, params, PruningParams(params, X.shape[1]))
    ref = mppca_stats_ref(X, weights, means, comp, noise)
    dense = mppca_stats_numba(X, weights, means, comp, noise, prune=False)
    hints = np.full(X.shape[0], -1, dtype=np.int32)
    for anchors in (None, hints, hints):  # no hints, the search's, the last pass's
        pruned = mppca_stats_numba(X, weights, means, comp, noise, anchors=anchors)
        assert_mppca_stats_close(pruned, ref, dtype)
        assert_mppca_stats_close(pruned, dense, dtype)


@pytest.mark.parametrize("dtype, widest", [(np.float32, 8191), (np.float64, None)])
def test_pulls_are_left_out_where_their_rounding_could_pass_the_slack(dtype, widest, rng):
    """The pulls' dot products run in the data's dtype; past (D + 1) eps >
    BOUND_SLACK (float32 data of more than 8,191 features) their rounding
    could pass the bound's slack, and the first bound decides alone."""
    from fastlvm.kernels.mppca_log_prob._numba import LowRankTileParams
    from fastlvm.kernels.mppca_stats._numba_pruning import PruningParams

    for d in (8191, 8192):
        means = rng.standard_normal((4, d))
        params = LowRankTileParams(means, rng.standard_normal((4, 1, d)), np.ones(4), dtype)
        pull = PruningParams(params, d).pulls[0]
        assert pull.dtype == dtype
        assert pull.shape == ((4, 4, d) if widest is None or d <= widest else (0, 0, 0))


def test_pull_bound_never_exceeds_the_distance(rng):
    """The second bound's lower bound on (x - mu_k)^T C_k^{-1} (x - mu_k) with
    x = mu_a + r, for rows r drawn at random, along the loadings of either
    component and along mu_k - mu_a (where its Cauchy-Schwarz term is exact):
    never above the exact distance, and within a factor of two of it on most
    rows (a bound of zero would keep every component)."""
    from fastlvm.kernels.mppca_log_prob._numba import LowRankTileParams
    from fastlvm.kernels.mppca_stats._numba_pruning import PruningParams, _pull_keeps

    d, k, q = 12, 4, 3
    means = rng.standard_normal((k, d)) * 3
    comp = rng.standard_normal((k, q, d)) * np.array([4.0, 1.0, 0.3])[:, None]
    noise = np.array([0.25, 1.0, 0.04, 2.0])
    params = LowRankTileParams(means, comp, noise, np.float64)
    pull, gap_sq, pull_norm, inv_top_var = PruningParams(params, d).pulls
    tight = total = 0
    for a in range(k):
        for kk in range(k):
            if kk == a:
                continue
            cov = comp[kk].T @ comp[kk] + noise[kk] * np.eye(d)
            delta = means[a] - means[kk]
            t = rng.uniform(-2, 1, (60, 1))
            rows = np.vstack([rng.standard_normal((60, d)) * rng.uniform(0.1, 10, (60, 1)),
                              rng.standard_normal((60, q)) @ comp[kk] * 3,
                              rng.standard_normal((60, q)) @ comp[a] * 3,
                              t * delta + 0.01 * rng.standard_normal((60, d))])
            for r in rows:
                v = r + delta  # x - mu_k
                maha = v @ np.linalg.solve(cov, v)
                root = np.sqrt(r @ r)
                # kept at floor -maha / 2 (const 0) <=> the bound <= the distance
                assert _pull_keeps(float(r @ pull[a, kk]), root, gap_sq[kk, a],
                                   pull_norm[kk, a], inv_top_var[kk], 0.0, -0.5 * maha)
                tight += not _pull_keeps(float(r @ pull[a, kk]), root, gap_sq[kk, a],
                                         pull_norm[kk, a], inv_top_var[kk], 0.0,
                                         -0.25 * maha)
                total += 1
    assert tight > 0.5 * total


@pytest.mark.parametrize("dtype", DTYPES)
def test_anchor_hints_only_choose_where_the_bound_starts(dtype, rng):
    """With hints, a tile skips the nearest-mean search: a right hint clears the
    row as the search would, a wrong one leaves it dirty (then renewed to the
    nearest mean for the next pass); a hint naming no component of nonzero
    weight, or a missing one, makes the tile search and write its anchors."""
    n = 300
    X, weights, means, comp, noise, _ = _clusters(rng, n, dtype, offset=500.0)
    run, _, scratch = _one_pruned_tile(X, weights, means, comp, noise)
    k = means.shape[0]

    hints = np.full(n, -1, dtype=np.int32)
    hints[0] = 0  # one missing hint is enough for the tile to search
    ll, stats, dirty = run(hints)
    nearest = hints.copy()
    np.testing.assert_array_equal(nearest, scratch[1][:n])  # the search's anchors, written
    assert (weights[nearest] > 0).all()
    # the same hints again: no search, the same rows cleared, the same statistics
    ll2, stats2, dirty2 = run(hints)
    np.testing.assert_array_equal(dirty2, dirty)
    np.testing.assert_array_equal(hints, nearest)
    assert ll2 == pytest.approx(ll, rel=1e-12)
    for a, b in zip(stats2, stats, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12 * np.abs(b).max())
    # wrong hints (a neighbouring component of nonzero weight) leave their rows dirty
    clean = np.setdiff1d(np.arange(n), dirty)
    wrong = clean[::5]
    hints[wrong] = (nearest[wrong] + 1) % k
    hints[wrong] = np.where(weights[hints[wrong]] > 0, hints[wrong], (hints[wrong] + 1) % k)
    assert (hints[wrong] != nearest[wrong]).all()
    _, stats3, dirty3 = run(hints)
    np.testing.assert_array_equal(np.sort(dirty3), np.union1d(dirty, wrong))
    assert stats3[0].sum() == pytest.approx(clean.size - wrong.size)
    np.testing.assert_array_equal(hints, nearest)  # renewed for the next pass
    # a hint on the component of weight zero: the tile searches afresh
    hints[clean[0]] = int(np.flatnonzero(weights == 0)[0])
    ll4, _, dirty4 = run(hints)
    np.testing.assert_array_equal(dirty4, dirty)
    np.testing.assert_array_equal(hints, nearest)
    assert ll4 == pytest.approx(ll, rel=1e-12)


def _every_dirty_row_sparse(monkeypatch):
    """Survivor pairs made to cost one of the dense pass's: every dirty row of
    fewer than K survivors takes the sparse path."""
    from fastlvm.kernels.mppca_stats._numba_pruning import SURVIVOR_PAIR_COST

    for dtype in list(SURVIVOR_PAIR_COST):
        monkeypatch.setitem(SURVIVOR_PAIR_COST, dtype, 1)


@pytest.mark.parametrize("sparse", [False, True])  # the kernel's max_survivors, or K
@pytest.mark.parametrize("q", [3, 6])  # one block of four latent columns, or two
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_pruned_statistics_match_reference_and_dense(weighted, dtype, q, sparse, rng,
                                                      monkeypatch):
    from fastlvm.kernels.mppca_log_prob._numba import LowRankTileParams
    from fastlvm.kernels.mppca_stats._numba import mppca_stats_numba
    from fastlvm.kernels.mppca_stats._numba_pruning import PruningParams, pruning_pays

    if sparse:
        _every_dirty_row_sparse(monkeypatch)
    n = 5001
    X, weights, means, comp, noise, _ = _clusters(rng, n, dtype, offset=500.0,
                                                  on_segment=0.05, at_mean=0.02, q=q,
                                                  midway=0.01 if sparse else 0.0)
    params = LowRankTileParams(means, comp, noise, X.dtype)
    with np.errstate(divide="ignore"):
        const = params.const + np.log(weights)
    assert pruning_pays(X, const, params, PruningParams(params, X.shape[1]))
    sw = rng.random(n) * 2 if weighted else None
    if weighted:
        sw[::5] = 0.0
    ref = mppca_stats_ref(X, weights, means, comp, noise, sample_weight=sw)
    pruned = mppca_stats_numba(X, weights, means, comp, noise, sw, prune=True)
    dense = mppca_stats_numba(X, weights, means, comp, noise, sw, prune=False)
    assert pruned[1][6] == 0.0 and np.all(pruned[1][:6] > 0)
    assert_mppca_stats_close(pruned, ref, dtype)
    assert_mppca_stats_close(pruned, dense, dtype)


@pytest.mark.parametrize("layout", ["strided", "fortran"])
def test_pruned_path_reads_any_layout_of_x(layout, rng):
    """The pruned pass reads rows from X itself (the search's tile, the row
    blocks, the dirty rows): a strided view or a Fortran-ordered X gives the
    C-ordered X's anchors and, to float32 rounding, its statistics, with and
    without anchor hints.  (Not bit for bit: each layout is its own compiled
    specialisation, and LLVM may vectorise the float32 sums differently.)"""
    from fastlvm.kernels.mppca_stats._numba import mppca_stats_numba

    X, weights, means, comp, noise, _ = _clusters(rng, 5001, np.float32, offset=500.0,
                                                  on_segment=0.05, at_mean=0.02)
    if layout == "strided":
        wide = np.zeros((X.shape[0], 2 * X.shape[1]), dtype=X.dtype)
        wide[:, ::2] = X
        other = wide[:, ::2]
    else:
        other = np.asfortranarray(X)
    for hinted in (False, True):
        hints = [np.full(X.shape[0], -1, dtype=np.int32) for _ in range(2)]
        for _ in range(2 if hinted else 1):  # the second pass reads the first's hints
            got = mppca_stats_numba(other, weights, means, comp, noise,
                                    anchors=hints[0] if hinted else None)
            want = mppca_stats_numba(X, weights, means, comp, noise,
                                     anchors=hints[1] if hinted else None)
        np.testing.assert_array_equal(hints[0], hints[1])
        for a, b in zip(got, want, strict=True):
            b = np.asarray(b)
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())


def test_pruning_is_not_tried_on_overlapping_components(rng):
    from fastlvm.kernels.mppca_log_prob._numba import LowRankTileParams
    from fastlvm.kernels.mppca_stats._numba_pruning import PruningParams, pruning_pays

    X, weights, means, comp, noise = mppca_problem(rng, (2000, 9, 6, 2), np.float64)
    means = means.mean(0) + (means - means.mean(0)) * 0.05  # all six on top of each other
    params = LowRankTileParams(means, comp, noise, X.dtype)
    assert not pruning_pays(X, params.const + np.log(weights), params,
                            PruningParams(params, X.shape[1]))
    got = mppca_stats(X, weights, means, comp, noise)
    ref = mppca_stats_ref(X, weights, means, comp, noise)
    assert_mppca_stats_close(got, ref, np.float64)


@pytest.mark.parametrize("path, min_runs", [("dense", 1), ("pruned", 2), ("hinted", 2),
                                             ("dirty_together", 2), ("sparse", 2)])
def test_runs_of_tiles_match_reference_for_any_thread_count(path, min_runs, rng,
                                                            monkeypatch):
    """Runs of several tiles, summed the same whatever the thread count: on
    data whose every row the dense pass takes (a broad component over all
    clusters), and on data the pruned path takes in its double tiles, with
    dirty rows among them, also with the anchor hints a first pass left, with
    the dirty rows together (whole pruned tiles of them: the dense pass's
    buffer of dirty rows fills and is flushed in the middle of a tile's), and
    with every dirty row on the sparse path (anchor hints too)."""
    from fastlvm._config import tile_rows
    from fastlvm.kernels._numba_support import padded_features, tiles_per_run
    from fastlvm.kernels.mppca_log_prob._numba import LOW_RANK_TILE_BYTES
    from fastlvm.kernels.mppca_stats._numba import mppca_stats_numba

    n = 140_001
    if path == "dense":
        X, weights, means, comp, noise = _separated(rng, n, np.float32)
    else:
        X, weights, means, comp, noise, _ = _clusters(rng, n, np.float32, on_segment=0.05,
                                                      at_mean=0.02,
                                                      midway=0.01 if path == "sparse" else 0.0)
        if path == "dirty_together":  # cluster 3's rows (all dirty) first
            X = X[np.argsort(np.linalg.norm(X - means[3], axis=1), kind="stable")]
    tile = tile_rows(padded_features(X.shape[1]), 4, LOW_RANK_TILE_BYTES)
    assert tiles_per_run(n, tile) > min_runs
    if path == "sparse":
        _every_dirty_row_sparse(monkeypatch)
    if path in ("hinted", "sparse"):
        hints = np.full(n, -1, dtype=np.int32)
        mppca_stats_numba(X, weights, means, comp, noise, anchors=hints)
        assert (hints >= 0).mean() > 0.9  # tiles run dense (after a dirty one) keep -1

        def run():
            return mppca_stats_numba(X, weights, means, comp, noise, anchors=hints.copy())
    else:
        def run():
            return mppca_stats(X, weights, means, comp, noise)
    assert_mppca_stats_close(run(), mppca_stats_ref(X, weights, means, comp, noise), np.float32)
    assert_same_bits_across_thread_counts(run)


def test_anchor_hints_are_checked(rng):
    from fastlvm.kernels.mppca_stats._numba import mppca_stats_numba

    X, weights, means, comp, noise = mppca_problem(rng, (300, 5, 3, 2), np.float64)
    for bad in (np.full(300, -1, dtype=np.int64), np.full(299, -1, dtype=np.int32),
                np.full(300, -1, dtype=np.int32).tolist()):
        with pytest.raises(ValueError, match="anchors must be a writeable int32 array"):
            mppca_stats_numba(X, weights, means, comp, noise, anchors=bad)


def _rows_off_and_on_a_subspace(rng, n, dtype):
    """Rows near component 1's mean, and every third run of seven on component 0's
    near-noiseless subspace (|r|^2 / |c|^2 ~ 1e-9, far below the exact path's 2^-10;
    the others ~ 1, far above): with 16-row tiles some hold no such row, some only
    such rows, some both.  Returns (X, weights, means, comp, noise, on_subspace)."""
    d, q = 10, 3
    comp = rng.standard_normal((2, q, d)) * 10
    means = np.array([np.full(d, 5.0), np.full(d, -5.0)])
    on = (np.arange(n) // 7) % 3 == 0
    X = means[1] + rng.standard_normal((n, d)) * 3
    X[on] = (rng.standard_normal((on.sum(), q)) @ comp[0] + means[0]
             + 1e-3 * rng.standard_normal((on.sum(), d)))
    return X.astype(dtype), np.array([0.4, 0.6]), means, comp, np.array([1e-6, 1.0]), on


@pytest.mark.parametrize("weighted", [False, True])
def test_triton_exact_pass_takes_the_marked_rows(weighted, rng):
    """float32 runs its exact path as a pass of its own over the rows the first
    pass marks (``kernels/_triton_low_rank.py``): the marks are those rows, and
    the log-normalisers, log-likelihood, statistics and log-density matrix
    count each row once, by the path it needs, in tiles with and without them."""
    pytest.importorskip("triton")
    from fastlvm.kernels import mppca_log_prob_ref
    from fastlvm.kernels._triton_low_rank import TritonLowRankParams, low_rank_log_norm
    from fastlvm.kernels.mppca_log_prob._triton import mppca_log_prob_triton
    from fastlvm.kernels.mppca_stats._triton import mppca_stats_triton
    from scipy.special import logsumexp

    X, weights, means, comp, noise, on = _rows_off_and_on_a_subspace(rng, 150, np.float32)
    sw = (rng.random(150) * 2).astype(np.float32) if weighted else None
    Xt, swt = backend_arrays("triton", X, sw)
    params = TritonLowRankParams(Xt, means, comp, noise, weights)
    log_norm, ll, marks = low_rank_log_norm(Xt, params, swt)
    np.testing.assert_array_equal(to_numpy(marks).astype(bool), on)
    ref_lp = mppca_log_prob_ref(X, means, comp, noise)
    ref_norm = logsumexp(ref_lp + np.log(weights), axis=1)
    np.testing.assert_allclose(to_numpy(log_norm), ref_norm, rtol=1e-5)
    w = np.ones(150) if sw is None else sw.astype(np.float64)
    np.testing.assert_allclose(float(ll), w @ ref_norm, rtol=1e-5)
    got = mppca_stats_triton(Xt, weights, means, comp, noise, swt)
    assert_mppca_stats_close(got, mppca_stats_ref(X, weights, means, comp, noise,
                                                  sample_weight=sw), np.float32)
    np.testing.assert_allclose(to_numpy(got[1]).sum(), w.sum(), rtol=1e-6)  # each row once
    np.testing.assert_allclose(to_numpy(mppca_log_prob_triton(Xt, means, comp, noise)),
                               ref_lp, rtol=1e-5)


def test_float64_triton_has_no_exact_pass(rng):
    """float64 launches its kernels once and marks nothing."""
    pytest.importorskip("triton")
    from fastlvm.kernels._triton_low_rank import ALL_ROWS, TritonLowRankParams, low_rank_log_norm

    X, weights, means, comp, noise, _ = _rows_off_and_on_a_subspace(rng, 40, np.float64)
    (Xt,) = backend_arrays("triton", X)
    params = TritonLowRankParams(Xt, means, comp, noise, weights)
    assert params.passes == (ALL_ROWS.value,)
    assert low_rank_log_norm(Xt, params)[2] is None


def test_zero_weight_component_gets_nothing(rng):
    X, weights, means, comp, noise = mppca_problem(rng, (300, 5, 3, 2), np.float64)
    weights = np.array([0.5, 0.0, 0.5])
    got = mppca_stats(X, weights, means, comp, noise)
    assert got.nk[1] == 0 and not got.cross[1].any() and not got.proj_second[1].any()
    ref = mppca_stats_ref(X, weights, means, comp, noise)
    assert_close(got.log_likelihood, ref[0], np.float64)


def test_statistics_add_over_chunks(rng):
    X, weights, means, comp, noise = mppca_problem(rng, (3000, 7, 3, 2), np.float64)
    whole = mppca_stats(X, weights, means, comp, noise)
    parts = [mppca_stats(X[i:i + 1000], weights, means, comp, noise)
             for i in range(0, 3000, 1000)]
    for j, name in enumerate(MPPCAStats._fields[:-1]):
        assert_close(sum(p[j] for p in parts), whole[j], np.float64, err_msg=name)


def test_deterministic_across_thread_counts_and_groups(rng, monkeypatch):
    """The same bits with any thread count, and with the runs' partials merged a
    couple of runs at a time (add_partials) as with the default groups."""
    import fastlvm._config

    X, weights, means, comp, noise = mppca_problem(rng, (20_000, 9, 4, 3), np.float32)
    assert_same_bits_across_thread_counts(lambda: mppca_stats(X, weights, means, comp, noise))
    default = mppca_stats(X, weights, means, comp, noise)
    monkeypatch.setattr(fastlvm._config, "TILES_PER_GROUP", 1)
    for a, b in zip(default, mppca_stats(X, weights, means, comp, noise)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("change, match", [
    (dict(weights=np.array([1.0, -1.0])), "non-negative"),
    (dict(weights=np.ones(3)), r"weights must have shape \(2,\)"),
    (dict(sample_weight=np.ones(4)), r"sample_weight must have shape \(3,\)"),
    (dict(sample_weight=-np.ones(3)), "sample_weight must be non-negative"),
])
def test_bad_input_is_named(change, match):
    args = dict(X=np.zeros((3, 4)), weights=np.ones(2) / 2, means=np.zeros((2, 4)),
                components=np.ones((2, 1, 4)), noise_variance=np.ones(2))
    args.update(change)
    with pytest.raises(ValueError, match=match):
        mppca_stats(**args)


def _counted_wide_launches(monkeypatch):
    """The row counts of the wide kernels' log-density launches, one per chunk."""
    from fastlvm.kernels import _triton_low_rank_wide as wide

    launches = []
    log_prob = wide.WideLogDensities._log_prob
    monkeypatch.setattr(wide.WideLogDensities, "_log_prob",
                        lambda self, rows, *a: launches.append(rows.shape[0])
                        or log_prob(self, rows, *a))
    return launches


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, fused_max, chunk", [
    ((40, 300, 3, 4), None, None),  # BLOCK_D = 512 as it comes, one chunk
    # 3 component tiles of 2, chunks of 16, 16, 13 rows
    ((45, 21, 5, 2), 16, 5 * 17 * 16),
    ((33, 17, 2, 18), 16, 2 * 33 * 32),  # q past one 16-wide latent block; 32-row chunks
    ((20, 21, 40, 2), 16, None),  # 20 component tiles: the normalisers merge 16 a step
])
def test_triton_wide_rows_step_through_features(shape, fused_max, chunk, dtype, weighted, rng,
                                                monkeypatch):
    """Rows past 128 padded features (``_triton_low_rank_wide.py``: the fused
    kernels' sm_90 builds kept 8-9 KB of stack at 256 and did not fit at 1024):
    the statistics, the log-normalisers with their log-likelihood and the
    log-density matrix against the reference, through the feature steps, the
    component tiles and the chunks (the chunk size and the fused kernels' widest
    rows lowered to reach every edge at small D)."""
    pytest.importorskip("triton")
    from scipy.special import logsumexp

    from fastlvm.kernels import _triton_low_rank_wide as wide
    from fastlvm.kernels import mppca_log_prob_ref
    from fastlvm.kernels._triton_gaussian import TileConfig
    from fastlvm.kernels._triton_low_rank import TritonLowRankParams, low_rank_log_norm
    from fastlvm.kernels.mppca_log_prob._triton import mppca_log_prob_triton
    from fastlvm.kernels.mppca_stats._triton import mppca_stats_triton

    if fused_max is not None:
        monkeypatch.setattr(wide, "FUSED_MAX_BLOCK_D", fused_max)
    if chunk is not None:
        monkeypatch.setattr(wide, "CHUNK_ELEMENTS", chunk)
        # the interpreter's tiles on a GPU too: its 64-row tiles held these rows in
        # one chunk (the H200, session 60), and 2 components a tile reach the merge
        monkeypatch.setattr(wide, "wide_configs", lambda dtype, bd, bq: (
            TileConfig(16, 2, 16, 4, 1), TileConfig(16, 1, 16, 4, 1)))
    launches = _counted_wide_launches(monkeypatch)
    n = shape[0]
    X, weights, means, comp, noise = mppca_problem(rng, shape, dtype)
    sw = (rng.random(n) * 2).astype(dtype) if weighted else None
    Xt, swt = backend_arrays("triton", X, sw)
    got = mppca_stats_triton(Xt, weights, means, comp, noise, swt)
    assert_mppca_stats_close(got, mppca_stats_ref(X, weights, means, comp, noise,
                                                  sample_weight=sw), dtype)

    block_q = max(16, 1 << (shape[3] - 1).bit_length())
    block_m = wide.wide_configs(Xt.dtype, 512, block_q)[0].block_n  # 16 rows in chunks

    def chunks(stored_q):  # the statistics' chunks hold U too; the others G alone
        step = wide.chunk_rows(shape[2], stored_q, block_m)
        return [min(n - s, step) for s in range(0, n, step)]

    stats_chunks = chunks(block_q)
    assert launches == stats_chunks and (chunk is None) == (stats_chunks == [n])
    want = chunks(0)
    ref_lp = mppca_log_prob_ref(X, means, comp, noise)
    params = TritonLowRankParams(Xt, means, comp, noise, weights)
    log_norm, ll, marks = low_rank_log_norm(Xt, params, swt)
    ref_norm = logsumexp(ref_lp + np.log(weights), axis=1)
    assert marks is None and launches == stats_chunks + want
    assert_close(to_numpy(log_norm), ref_norm, dtype)
    assert_close(float(ll), (np.ones(n) if sw is None else sw.astype(np.float64)) @ ref_norm,
                 dtype)
    assert_close(to_numpy(mppca_log_prob_triton(Xt, means, comp, noise)), ref_lp, dtype)
    assert launches == stats_chunks + want * 2
    # where the fused kernels stop: 128 padded features stay fused, past 16,384 neither
    assert not wide.wide_low_rank_rows(wide.FUSED_MAX_BLOCK_D)
    assert wide.wide_low_rank_rows(2 * wide.FUSED_MAX_BLOCK_D)
    assert not wide.wide_low_rank_rows(2 * wide.WIDEST_STREAMED_ROWS)


def test_triton_wide_rows_take_the_exact_path_inline(rng, monkeypatch):
    """float32 rows on a near-noiseless subspace (|r|^2 / |c|^2 ~ 1e-9) take the
    float64 sweep inside the wide log-density kernel, in the tiles that hold one:
    the log-densities keep float32's digits (without the sweep Woodbury's form
    cancels outright: 22 of 300 log-densities off by up to 968)."""
    pytest.importorskip("triton")
    from scipy.special import logsumexp

    from fastlvm.kernels import _triton_low_rank_wide as wide
    from fastlvm.kernels import mppca_log_prob_ref
    from fastlvm.kernels._triton_low_rank import TritonLowRankParams, low_rank_log_norm
    from fastlvm.kernels.mppca_log_prob._triton import mppca_log_prob_triton
    from fastlvm.kernels.mppca_stats._triton import mppca_stats_triton

    monkeypatch.setattr(wide, "FUSED_MAX_BLOCK_D", 8)  # D = 10: BLOCK_D = 16 is wide
    launches = _counted_wide_launches(monkeypatch)
    X, weights, means, comp, noise, _ = _rows_off_and_on_a_subspace(rng, 150, np.float32)
    (Xt,) = backend_arrays("triton", X)
    ref_lp = mppca_log_prob_ref(X, means, comp, noise)
    np.testing.assert_allclose(to_numpy(mppca_log_prob_triton(Xt, means, comp, noise)),
                               ref_lp, rtol=1e-5)
    params = TritonLowRankParams(Xt, means, comp, noise, weights)
    np.testing.assert_allclose(to_numpy(low_rank_log_norm(Xt, params)[0]),
                               logsumexp(ref_lp + np.log(weights), axis=1), rtol=1e-5)
    assert_mppca_stats_close(mppca_stats_triton(Xt, weights, means, comp, noise),
                             mppca_stats_ref(X, weights, means, comp, noise), np.float32)
    assert launches == [150] * 3


def test_triton_wide_rows_send_woodbury_cancellation_to_float64(rng, monkeypatch):
    """float32's Woodbury form |c|^2 - |u|^2 loses log2(|c|^2 / (|c|^2 - |u|^2))
    bits: rows where it keeps 2^-10 to 2^-6 of |c|^2 lose 6-10, so they take the
    float64 sweep too (``WOODBURY_EXACT_BELOW`` = 2^-6, CuPy's limit).  Rows of
    component 0's subspace with unit noise, most of them in that band, keep 1e-5 of
    their log-densities; at a limit of 2^-10 they were 3.7e-5 off."""
    pytest.importorskip("triton")
    from fastlvm.kernels import _triton_low_rank_wide as wide
    from fastlvm.kernels import mppca_log_prob_ref
    from fastlvm.kernels.mppca_log_prob._triton import mppca_log_prob_triton

    monkeypatch.setattr(wide, "FUSED_MAX_BLOCK_D", 8)  # D = 10: BLOCK_D = 16 is wide
    n, d, q = 200, 10, 3
    comp = rng.standard_normal((2, q, d)) * 10
    means = np.array([np.full(d, 5.0), np.full(d, -5.0)])
    noise = np.ones(2)
    X = rng.standard_normal((n, q)) @ comp[0] + means[0] + rng.standard_normal((n, d))
    c = X - means[0]
    cov = comp[0].T @ comp[0] + noise[0] * np.eye(d)
    kept = noise[0] * np.einsum("nd,nd->n", c @ np.linalg.inv(cov), c) / (c * c).sum(1)
    assert np.mean((kept > 2.0**-10) & (kept < 2.0**-6)) > 0.5  # the band
    X = X.astype(np.float32)
    (Xt,) = backend_arrays("triton", X)
    np.testing.assert_allclose(to_numpy(mppca_log_prob_triton(Xt, means, comp, noise)),
                               mppca_log_prob_ref(X, means, comp, noise), rtol=1e-5)
