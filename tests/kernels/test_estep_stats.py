import numpy as np
import pytest

from fastlvm.kernels import EStepStats, estep_stats, estep_stats_ref
from fastlvm.kernels.estep_stats import IMPLEMENTATIONS
from tests.conftest import (CUDA, COVARIANCE_TYPES, DTYPES, SHAPES,
                            assert_estep_matches_reference, assert_same_bits_across_thread_counts,
                            backend_arrays, make_params, separated_clusters,
                            separated_float32_problem, to_numpy)
from tests.tolerances import assert_close


def _problem(rng, shape, covariance_type, dtype, offset=0.0):
    n, d, k = shape
    X = (rng.standard_normal((n, d)) + offset).astype(dtype)
    means = X[rng.integers(0, n, k)].astype(np.float64) + rng.standard_normal((k, d)) * 0.5
    means = means.astype(dtype).astype(np.float64)  # representable in the data dtype
    weights = rng.random(k) + 0.1
    weights /= weights.sum()
    return X, weights, means, make_params(rng, covariance_type, k, d)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("backend", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_matches_reference(weighted, backend, dtype, shape, covariance_type, rng, monkeypatch):
    X, w, means, pc = _problem(rng, shape, covariance_type, dtype, offset=30.0)
    sw = rng.random(shape[0]) * 2 if weighted else None
    monkeypatch.setenv("FASTLVM_BACKEND", backend)
    Xb, swb = backend_arrays(backend, X, sw)
    got = estep_stats(Xb, w, means, pc, covariance_type, sample_weight=swb)
    assert isinstance(got, EStepStats)
    assert_estep_matches_reference(got, X, w, means, pc, covariance_type, sw, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES + [(2000, 40, 70)])
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_cupy_chunked_path_matches_reference(covariance_type, shape, dtype, rng, monkeypatch,
                                            cupy):
    """The CuPy E-step's chunked cuBLAS path, which test_matches_reference's shapes
    reach only where the tile kernels do not apply (its own tests: the emulated
    twin in test_cupy_emulated.py).  The last shape is over the tile kernels'
    limits either way."""
    X, w, means, pc = _problem(rng, shape, covariance_type, dtype, offset=30.0)
    (Xb,) = backend_arrays("cupy", X)
    from fastlvm.kernels.estep_stats import _cupy_tiles

    monkeypatch.setattr(_cupy_tiles, "MAX_COMPONENTS", 0)
    monkeypatch.setenv("FASTLVM_BACKEND", "cupy")
    got = estep_stats(Xb, w, means, pc, covariance_type)
    assert_estep_matches_reference(got, X, w, means, pc, covariance_type, None, dtype)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_statistics_add_over_chunks(covariance_type, rng):
    X, w, means, pc = _problem(rng, (2000, 6, 4), covariance_type, np.float64)
    whole = estep_stats(X, w, means, pc, covariance_type)
    parts = [estep_stats(X[s:s + 700], w, means, pc, covariance_type) for s in (0, 700, 1400)]
    for i in range(4):
        np.testing.assert_allclose(sum(p[i] for p in parts), whole[i], rtol=1e-12)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_deterministic_across_thread_counts(covariance_type, rng):
    X, w, means, pc = _problem(rng, (5000, 5, 3), covariance_type, np.float32)
    assert_same_bits_across_thread_counts(
        lambda: estep_stats(X, w, means, pc, covariance_type))


def _separated(rng, n, d, covariance_type, dtype):
    """Five unit clusters 40 sigma apart (at 28 e_i), a broad component (sigma 10)
    over all of them and a near-empty one (weight 1e-9) far from every row.

    The clusters' responsibilities are exactly zero on most rows, in float64
    too (gaps near 800 nats), the broad one's are nonzero everywhere (tens of
    nats below the best), the far one's are zero everywhere: the sparse, dense
    and empty paths at once.  ('tied' shares one covariance, so there the
    broad component is just a sixth cluster mean with no rows.)
    """
    centers = 28.0 * np.eye(5, d)
    X = (centers[rng.integers(0, 5, n)] + rng.standard_normal((n, d))).astype(dtype)
    means = np.vstack([centers, np.zeros((1, d)), np.full((1, d), 1e4)])
    means = means.astype(dtype).astype(np.float64)
    scale = np.ones(7)
    scale[5] = 0.1  # precision Cholesky factor of sigma = 10
    pc = {"full": np.eye(d)[None] * scale[:, None, None], "tied": np.eye(d),
          "diag": np.ones((7, d)) * scale[:, None], "spherical": scale}[covariance_type]
    weights = np.array([1, 1, 1, 1, 1, 1, 1e-9])
    return X, weights / weights.sum(), means, pc


@pytest.mark.parametrize("backend", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_sparse_responsibilities_match_reference(backend, dtype, covariance_type, rng,
                                                 monkeypatch):
    # Numba's sparse paths want many rows; under CI's interpreter a Triton kernel runs
    # row by row, and 601 rows still cross several of its tiles and row splits
    n = 601 if backend == "triton" and not CUDA else 3001
    X, w, means, pc = _separated(rng, n, 7, covariance_type, dtype)
    sw = rng.random(n) * 2
    sw[::7] = 0.0  # zero-weight rows have zero responsibilities too
    monkeypatch.setenv("FASTLVM_BACKEND", backend)
    Xb, swb = backend_arrays(backend, X, sw)
    got = estep_stats(Xb, w, means, pc, covariance_type, sample_weight=swb)
    nk = to_numpy(got.nk)
    assert nk[6] == 0.0 and np.all(nk[:5] > 0) and (covariance_type == "tied" or nk[5] > 0)
    assert_estep_matches_reference(got, X, w, means, pc, covariance_type, sw, dtype)


def test_responsibilities_masses_and_kept_columns_match_numpy(rng):
    """The sparse paths' one pass (responsibilities scaled, N_k, masses and
    floors) and the 'full' row selection against their definitions in NumPy."""
    from fastlvm.kernels._numba_support import kept_columns, responsibilities_and_masses

    k, nb, tile = 3, 37, 40
    const = rng.standard_normal(k) * 5
    maha = rng.random((k, tile)) * 200
    log_prob = const[:, None] - 0.5 * maha
    unscaled = np.exp(-rng.random((k, tile)) * 60)
    unscaled[0, ::5] = 0.0
    unscaled[1, 3] = np.nan
    scale = rng.random(tile) + 0.5
    resp = unscaled.copy()
    unit = np.finfo(np.float64).eps / 2
    want_resp = unscaled[:, :nb] * scale[:nb]
    want = np.where(want_resp != 0, want_resp * (1 + maha[:, :nb]), 0.0)
    floor = np.zeros(k)
    nk = np.ones(k)
    responsibilities_and_masses(resp, log_prob, scale, const, nb, unit, floor, nk)
    np.testing.assert_allclose(resp[:, :nb], want_resp, rtol=1e-15)
    np.testing.assert_array_equal(resp[:, nb:], unscaled[:, nb:])  # columns past nb untouched
    np.testing.assert_allclose(nk, 1 + want_resp.sum(axis=1), rtol=1e-13)
    np.testing.assert_allclose(log_prob[:, :nb], want, rtol=1e-9)
    want_floor = unit * want.sum(axis=1) / nb
    want_floor[~np.isfinite(want_floor)] = -1.0  # NaN (row 1): keep every row
    np.testing.assert_allclose(floor, want_floor, rtol=1e-9)
    idx = np.empty(tile, dtype=np.int64)
    for c in range(k):
        m = kept_columns(log_prob, c, nb, floor[c], idx)
        expected = np.flatnonzero(~(log_prob[c, :nb] <= floor[c]))  # NaN is kept
        np.testing.assert_array_equal(idx[:m], expected)
    assert 3 in idx[:kept_columns(log_prob, 1, nb, floor[1], idx)]


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # its log-likelihood
def test_overflowing_masses_keep_every_row(rng):
    """Sample weights near the float64 limit: an outlier halfway between two
    components (r = 1/2 in each, m = 675) has a mass r (1 + m) that overflows,
    while every sum the reference forms stays finite.  The sparse rule must
    then keep every row instead of trusting an infinite floor."""
    d = 3
    X = np.vstack([rng.standard_normal((4, d)) * 0.1 - 15, rng.standard_normal((4, d)) * 0.1 + 15,
                   np.zeros((1, d))])
    means = np.array([[-15.0] * d, [15.0] * d])
    pc = np.repeat(np.eye(d)[None], 2, axis=0)
    sw = np.full(9, 1e306)
    got = estep_stats(X, np.array([0.5, 0.5]), means, pc, "full", sample_weight=sw)
    ref = estep_stats_ref(X, np.array([0.5, 0.5]), means, pc, "full", sample_weight=sw)
    assert all(np.all(np.isfinite(a)) for a in ref[1:4])
    for name, a, b in zip(("nk", "sum_x", "second_moment"), got[1:4], ref[1:4]):
        assert_close(a, b, np.float64, err_msg=name)


def test_kept_masks_match_numpy(rng):
    """The 'diag'/'spherical' sparse path's row selection against its
    definition: bit k of row t set iff mass[k, t] > floor[k] (NaN kept), over
    two 64-bit words (K = 70), and each component's count of kept rows."""
    from fastlvm.kernels._numba_support import kept_masks, lowest_bit

    k, nb, tile = 70, 37, 40
    mass = rng.random((k, tile))
    mass[5, 7] = np.nan
    floor = rng.random(k) * 0.9
    masks = np.full((2, tile), 12345, dtype=np.uint64)
    counts = np.full(k, -1, dtype=np.int64)
    total = kept_masks(mass, nb, floor, masks, counts)
    want = ~(mass[:, :nb] <= floor[:, None])
    assert want[5, 7] and total == want.sum()
    np.testing.assert_array_equal(counts, want.sum(axis=1))
    for t in range(nb):
        got = []
        for w in range(2):
            m = masks[w, t]
            while m:
                b, m = lowest_bit(np.uint64(m))  # (a Python int above 2^63 reads as int64)
                got.append(64 * w + int(b))
        assert got == list(np.flatnonzero(want[:, t])), t


def _marking_tile(rng, k, tile, dtype, weighted):
    """Log-densities of a tile whose pairs spread over 0 to 200 nats below
    their rows' best, some components weak in the whole tile (60-160 nats
    below every row's best), with their constants, masses and sample weights
    spanning 30 decades (and zeros)."""
    const = rng.uniform(-60.0, 0.0, k)
    m = rng.uniform(0.0, 400.0, (k, tile))
    m[rng.integers(0, k, tile), np.arange(tile)] = rng.uniform(0.0, 20.0, tile)
    logp = const[:, None] - 0.5 * m
    weak = rng.choice(k, max(1, k // 8), replace=False)
    logp[weak] = logp.max(axis=0) - rng.uniform(60.0, 160.0, (weak.size, tile))
    logp = logp.astype(dtype)
    sw = 10.0 ** rng.uniform(-15.0, 15.0, tile) if weighted else np.ones(1)
    if weighted:
        sw[::9] = 0.0
    return logp, const, sw


def _mark(logp, const, sw, weighted, tile, unit):
    """Run the sparse path's marking on one tile: (count or -1, each
    component's list end, the (K, tile) marks, the rows and the a values)."""
    from fastlvm.kernels.estep_stats._numba import _mark_pairs

    k = logp.shape[0]
    margin = np.log(tile * k / unit) + 1.0
    mx = logp.max(axis=0)
    size = k * tile + 8
    rows = np.full(size, -1, dtype=np.int64)
    vals = np.full(size, np.nan, dtype=logp.dtype)
    ends = np.full(k, -1, dtype=np.int64)
    total = _mark_pairs(logp, tile, const, margin, sw, 0, weighted, mx,
                        np.empty(tile, dtype=logp.dtype), rows, vals, ends)
    marked = np.zeros(logp.shape, dtype=bool)
    if total >= 0:
        starts = np.concatenate([[0], ends[:-1]])
        for c in range(k):
            listed = rows[starts[c]:ends[c]]
            assert np.all(np.diff(listed) > 0), c  # each list in increasing rows
            marked[c, listed] = True
            np.testing.assert_array_equal(vals[starts[c]:ends[c]],
                                          logp[c, listed] - mx[listed])  # the dtype's a
    return total, ends, marked, rows, vals


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [5, 64, 70])
def test_unmarked_pairs_are_within_rounding(k, dtype, weighted, rng):
    """The sparse path's marking (``_mark_pairs``) against its promise,
    with exact float64 sums: the pairs it leaves out carry less than the
    dtype's unit roundoff of each component's largest responsibility (N_k)
    and of its largest mass r (1 + m) (the moments), and of each row's
    sum of exponentials (the log-likelihood); components weak in the whole
    tile keep their pairs (relative, not absolute, accuracy).  The marks
    are not vacuous: most pairs go."""
    tile = 192
    unit = np.finfo(dtype).eps / 2
    for _ in range(5):
        logp, const, sw = _marking_tile(rng, k, tile, dtype, weighted)
        total, ends, marked, _, _ = _mark(logp, const, sw, weighted, tile, unit)
        assert total == marked.sum() == ends[-1]
        np.testing.assert_array_equal(np.diff(ends, prepend=0), marked.sum(axis=1))
        lp = logp.astype(np.float64)
        a = lp - lp.max(axis=0)
        e = np.exp(a)
        w = sw if weighted else np.ones(tile)
        r = e / e.sum(axis=0) * w
        mass = r * (1.0 + 2.0 * (const[:, None] - lp))
        left = ~marked
        assert np.all((e * left).sum(axis=0) <= unit)
        for name, v in (("responsibility", r), ("mass", mass)):
            top = v.max(axis=1)
            assert np.all((v * left).sum(axis=1) <= unit * top), name
        assert marked.mean() < 0.5
        assert np.all(marked.any(axis=1) | (r.max(axis=1) == 0.0))


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_marking_bound_is_near_tight(dtype, weighted):
    """The marking's worst case, where its bound has little slack: component
    0's largest responsibility is 1 / K (a row where all K tie), and on every
    other row, 10^4 nats from every component (masses 2 10^4 times their
    responsibilities), it sits on a fine grid 35 to 80 nats below the row's
    best (15 to 60 in float32).  The unmarked pairs still carry less than the
    unit roundoff of its largest responsibility and mass, yet the bound's
    slack here is under 12 nats: a threshold 12 nats higher, or one without
    the masses' term (10 nats here), breaks the promise."""
    k, tile = 8, 192
    unit = np.finfo(dtype).eps / 2
    const = np.zeros(k)
    logp = np.full((k, tile), -2e4)
    logp[:, 0] = 0.0
    logp[1, 1:] = -1e4
    top = -35.0 if dtype == np.float64 else -15.0  # around each dtype's threshold
    logp[0, 1:] = -1e4 + np.linspace(top - 45.0, top, tile - 1)
    logp = logp.astype(dtype)
    sw = np.ones(tile)
    _, _, marked, _, _ = _mark(logp, const, sw, weighted, tile, unit)
    lp = logp.astype(np.float64)
    e = np.exp(lp - lp.max(axis=0))
    r = e / e.sum(axis=0)
    mass = r * (1.0 + 2.0 * (const[:, None] - lp))
    assert r[0].max() == 1.0 / k and mass[0].max() == 1.0 / k
    left = ~marked[0]
    assert (r[0] * left).sum() <= unit * r[0].max()
    assert (mass[0] * left).sum() <= unit * mass[0].max()
    assert left[1:].sum() > 40  # the grid's far end is left out
    # 12 nats fewer and the masses would break the promise
    a = lp[0, 1:] - lp.max(axis=0)[1:]
    kept_edge = a[marked[0, 1:]].min()
    closer = a < kept_edge + 12.0
    assert (mass[0, 1:] * closer).sum() > unit * mass[0].max()


def test_marking_sends_unusual_tiles_to_the_dense_path(rng):
    """-1 (the dense path) for a NaN row, a row whose best log-density is
    infinite, and a subnormal sample weight; a zero weight is fine."""
    k, tile = 6, 40
    logp, const, sw = _marking_tile(rng, k, tile, np.float64, True)
    assert _mark(logp, const, sw, True, tile, 2.0**-53)[0] > 0
    for edit in ("nan", "inf", "subnormal"):
        lp, w = logp.copy(), sw.copy()
        if edit == "nan":
            lp[:, 3] = np.nan
        elif edit == "inf":
            lp[:, 5] = -np.inf
        else:
            w[7] = 1e-310
        assert _mark(lp, const, w, True, tile, 2.0**-53)[0] == -1, edit


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_listed_responsibilities_match_numpy(dtype, weighted, rng):
    """The sparse path's responsibilities over the marked pairs alone
    (``_mark_pairs``' lists with the exponentials' arguments, then
    ``_listed_responsibilities``) against float64 NumPy over every pair: the
    log-likelihood, N_k and each listed responsibility."""
    from fastlvm.kernels.estep_stats._numba import _listed_responsibilities

    k, tile, nb = 70, 192, 181
    unit = np.finfo(dtype).eps / 2
    logp, const, sw = _marking_tile(rng, k, tile, dtype, weighted)
    lp = np.ascontiguousarray(logp[:, :nb])
    _, counts, _, rows, vals = _mark(lp, const, sw, weighted, nb, unit)
    mx = lp.max(axis=0)
    s = np.empty(nb, dtype=dtype)
    resp = np.full((k, nb), -1.0, dtype=dtype)
    nk = np.zeros(k)
    ll = _listed_responsibilities(lp, nb, mx.copy(), counts, rows, vals, s, sw, 0, weighted,
                                  resp, nk)
    x = lp.astype(np.float64)
    top = x.max(axis=0)
    e = np.exp(x - top)
    e[x - top < np.log(np.finfo(dtype).tiny)] = 0.0  # the dtype's exponentials underflow
    lse = top + np.log(e.sum(axis=0))
    w = sw[:nb] if weighted else np.ones(nb)
    r = e / e.sum(axis=0) * w
    assert_close(ll, np.sum(w * lse), dtype)
    assert_close(nk, r.sum(axis=1), dtype)
    start = 0
    for c in range(k):
        listed = rows[start:counts[c]]
        assert_close(resp[c, listed], r[c, listed], dtype, scale=0.0)
        start = counts[c]


@pytest.mark.parametrize("layout", ["C", "strided"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nb", [1, 7, 8, 9, 64, 191])
def test_list_marked_matches_numpy(nb, dtype, layout, rng):
    """``list_marked`` (the marking's compressed lists) against NumPy: the
    rows with a >= floor or b >= thr in increasing order, their a values,
    the lists' new end from an offset, the entries before it untouched,
    and the integer maximum of b (clamped; -inf rows in it), for row counts
    around the eight-row steps; a strided log-density array takes the
    plain-loop twin."""
    import numba

    from fastlvm.kernels._numba_ir import list_marked

    @numba.njit
    def call(logp, mx, lw, k, nb, floor, thr, rows, vals, pos):
        return list_marked(logp, mx, lw, k, nb, floor, thr, rows, vals, pos)

    base = (rng.standard_normal((3, 2 * 200)) * 30).astype(dtype)
    logp = np.ascontiguousarray(base[:, :200]) if layout == "C" else base[:, ::2]
    logp[1, ::5] = -np.inf
    logp[1, 3] = 5e9  # clamped to 1e9 in the maximum
    mx = (rng.standard_normal(200) * 5).astype(dtype)
    lw = rng.standard_normal(200).astype(dtype)
    rows = np.full(300, -1, dtype=np.int64)
    vals = np.full(300, -7.0, dtype=dtype)
    pos, top = call(logp, mx, lw, 1, nb, dtype(-20.0), dtype(-5.0), rows, vals, 11)
    a = logp[1, :nb] - mx[:nb]
    b = a + lw[:nb]
    keep = (a >= -20.0) | (b >= -5.0)
    assert pos == 11 + keep.sum()
    np.testing.assert_array_equal(rows[11:pos], np.flatnonzero(keep))
    np.testing.assert_array_equal(vals[11:pos], a[keep])
    assert (rows[:11] == -1).all() and (vals[:11] == -7.0).all()
    assert top == np.trunc(np.clip(b, -1e9, 1e9)).max()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [1, 7, 8, 19, 32, 45, 70])
@pytest.mark.parametrize("layout", ["C", "strided"])
def test_listed_rows_add_into_one_components_moments(dtype, d, layout, rng):
    """The sparse path's sums (``add_centred_rows``) against NumPy in float64:
    widths that exercise every pass (four vectors, one to three vectors, single
    columns), an unordered list with a repeated row, first moments alone, an
    empty slice, and a strided X (the plain-loop twin)."""
    import numba

    from fastlvm.kernels._numba_ir import add_centred_rows

    @numba.njit
    def add(X, row0, rows, start, stop, weights, k, centers, first, second, want_second):
        add_centred_rows(X, row0, rows, start, stop, weights, k, centers, first, second,
                         want_second)

    base = rng.standard_normal((40, 2 * d)).astype(dtype)
    X = np.ascontiguousarray(base[:, :d]) if layout == "C" else base[:, ::2]
    n_comp, tile, row0, k = 3, 16, 11, 1
    weights = rng.random((n_comp, tile)).astype(dtype)
    centers = rng.standard_normal((n_comp, d + 3)).astype(dtype)
    rows = np.array([9, 2, 2, 15, 0, 7], dtype=np.int64)
    start, stop = 1, 6
    first = rng.standard_normal((n_comp, d + 3))
    second = rng.standard_normal((n_comp, 1, d + 3))
    listed = rows[start:stop]
    diff = (X[row0 + listed] - centers[k, :d]).astype(np.float64)
    r = weights[k, listed].astype(np.float64)[:, None]
    for want_second in (True, False):
        f, q = first.copy(), second.copy()
        add(X, row0, rows, start, stop, weights, k, centers, f, q, want_second)
        want_f, want_q = first.copy(), second.copy()
        want_f[k, :d] += (r * diff).sum(axis=0)
        if want_second:
            want_q[k, 0, :d] += (r * diff * diff).sum(axis=0)
        np.testing.assert_allclose(f, want_f, rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(q, want_q, rtol=1e-13, atol=1e-13)
    f, q = first.copy(), second.copy()
    add(X, row0, rows, 3, 3, weights, k, centers, f, q, True)
    assert np.array_equal(f, first) and np.array_equal(q, second)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [1, 3, 8, 16, 33])
def test_tile_copy_transposes_rows_and_pads_features(dtype, d, rng):
    """The tile every Numba kernel starts from: rows row0:row0+nb of X, transposed,
    feature padding zero, columns past nb untouched.  Row counts and widths
    around the 8 x 8 blocks, tiles ending at X's last row (the prefetch
    window clipped to nothing) and a strided view of X."""
    from fastlvm.kernels._numba_support import load_tile_transposed, new_tile, padded_features

    base = rng.standard_normal((61, 2 * d)).astype(dtype)
    dp, tile = padded_features(d), 24
    for X in (np.ascontiguousarray(base[:, :d]), base[:, ::2]):
        xT = new_tile(X, dp, tile)
        assert xT.shape[1] >= tile and not xT[d:].any()
        for row0, nb in [(0, 1), (0, 7), (3, 8), (5, 13), (20, 24), (37, 24), (53, 8), (60, 1)]:
            xT[:d] = -7.0
            load_tile_transposed(X, row0, nb, xT)
            np.testing.assert_array_equal(xT[:d, :nb], X[row0:row0 + nb].T)
            assert (xT[:d, nb:] == -7.0).all() and not xT[d:].any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_block_copy_takes_each_row_less_its_own_centre(dtype, rng):
    """The anchored 'tied' pass's copy: an 8 x 8 block of rows, each less the
    centre its ``which`` entry names, stored transposed at column t of xT (the
    register shuffles on C-contiguous arrays, an element loop otherwise),
    nothing else of xT written."""
    import numba

    from fastlvm.kernels._numba_support import TRANSPOSE_BLOCK, transpose_centred_block

    @numba.njit
    def copy(X, row, col, xT, t, centres, which):
        transpose_centred_block(X, row, col, xT, t, centres, which)

    b = TRANSPOSE_BLOCK
    base = rng.standard_normal((30, 48)).astype(dtype)
    centres = rng.standard_normal((5, 24)).astype(dtype)
    which = rng.integers(5, size=40)
    for X in (np.ascontiguousarray(base[:, :24]), base[:, ::2]):
        for row, col, t in [(0, 0, 0), (3, 8, 11), (22, 16, 32)]:
            xT = np.full((26, 42), -7.0, dtype=dtype)
            copy(X, row, col, xT, t, centres, which)
            expected = X[row:row + b, col:col + b] - centres[which[t:t + b], col:col + b]
            np.testing.assert_array_equal(xT[col:col + b, t:t + b], expected.T)
            written = np.zeros(xT.shape, dtype=bool)
            written[col:col + b, t:t + b] = True
            assert (xT[~written] == -7.0).all()


@pytest.mark.parametrize("d", [1, 5, 8])
@pytest.mark.parametrize("dtype", DTYPES)
def test_row_gather_centres_and_transposes_listed_rows(dtype, d, rng):
    """The pruned MPPCA pass's copies: rows row0 + idx[j] of X, minus a centre,
    as rows (the first m rows; columns past D and rows past m untouched) or
    transposed (the first m columns; rows past D and columns past m
    untouched).  Counts around the eight-row blocks, repeated and unordered
    rows, a strided X.  The in-order row copy they gather from in the hinted
    pass: the tile's rows, columns past D untouched; the prefetch of rows past
    X's end is only a hint."""
    from fastlvm.kernels._numba_support import (gather_rows, gather_rows_transposed,
                                                load_tile_rows)

    base = rng.standard_normal((40, 2 * d)).astype(dtype)
    center = rng.standard_normal(d + 3).astype(dtype)
    for X in (np.ascontiguousarray(base[:, :d]), base[:, ::2]):
        for row0, nrows in [(0, 40), (30, 10), (25, 12)]:  # the next tile past X's end
            rows = np.full((nrows + 2, d + 3), -7.0, dtype=dtype)
            load_tile_rows(X, row0, nrows, rows)
            np.testing.assert_array_equal(rows[:nrows, :d], X[row0:row0 + nrows])
            assert (rows[:, d:] == -7.0).all() and (rows[nrows:] == -7.0).all()
        for row0, idx in [(0, [0]), (3, [5, 1, 1, 0, 7, 2, 9, 4]),
                          (10, list(range(29, 0, -2))), (39, [0])]:
            idx = np.array(idx + [-99], dtype=np.int64)  # past m: never read
            m = idx.size - 1
            outT = np.full((d + 2, m + 3), -7.0, dtype=dtype)
            gather_rows_transposed(X, row0, idx, m, center, outT)
            expected = X[row0 + idx[:m]] - center[:d]
            np.testing.assert_array_equal(outT[:d, :m], expected.T)
            assert (outT[d:] == -7.0).all() and (outT[:, m:] == -7.0).all()
            out = np.full((m + 3, d + 2), -7.0, dtype=dtype)
            gather_rows(X, row0, idx, m, center, out)
            np.testing.assert_array_equal(out[:m, :d], expected)
            assert (out[:, d:] == -7.0).all() and (out[m:] == -7.0).all()


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("covariance_type", ["full", "diag", "spherical"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_negligible_rows_left_out_within_rounding(dtype, covariance_type, layout, rng):
    """Rows whose responsibility is tiny but not zero (float64 keeps anything
    under 708 nats) are left out of a component's moments only when that is
    within rounding of *its own* sums.

    Ten unit clusters 12 sigma apart put most rows 70 nats or more below
    their best in the other components: nonzero in float64, yet far below the
    floor, so the sparse paths run ('full' gathers each component's kept
    rows; 'diag' and 'spherical' visit each row's kept components).  An
    eleventh component sits on a cluster with weight 1e-30: every
    responsibility it has is about 1e-30, and its moments must still match
    the reference relative to their own size (an absolute cut-off would drop
    it entirely).  X is C-contiguous (the row path's LLVM loop, eight features
    and a remainder of three) or a strided view (its plain loop).
    """
    d, n, c = 11, 5003, 10
    centers = 12.0 * np.eye(c, d)
    X = (centers[rng.integers(0, c, n)] + rng.standard_normal((n, d))).astype(dtype)
    if layout == "strided":
        X = np.repeat(X, 2, axis=1)[:, ::2]
        assert not X.flags.c_contiguous
    means = np.vstack([centers, centers[2] + 0.5]).astype(dtype).astype(np.float64)
    scale = np.ones(c + 1)
    scale[c] = 0.8
    pc = {"full": np.eye(d)[None] * scale[:, None, None],
          "diag": np.ones((c + 1, d)) * scale[:, None], "spherical": scale}[covariance_type]
    weights = np.ones(c + 1)
    weights[c] = 1e-30
    weights /= weights.sum()
    got = estep_stats(X, weights, means, pc, covariance_type)
    ref = estep_stats_ref(X, weights, means, pc, covariance_type)
    for k in range(c + 1):
        for name, a, b in zip(("nk", "sum_x", "second_moment"), got[1:4], ref[1:4]):
            assert_close(a[k], b[k], dtype, err_msg=f"{name}[{k}]")
    assert 0 < ref[1][c] < 1e-25
    from fastlvm.kernels import gaussian_log_prob

    lp = gaussian_log_prob(X, means[:c], pc[:c], covariance_type)
    gap = lp.max(axis=1, keepdims=True) - lp
    # the case this test is for: few kept (row, component) pairs (the
    # 'diag'/'spherical' row path runs below one in eight; the dying
    # component is kept on its cluster's rows) ...
    kept = np.sum(gap < 20) + np.sum(lp.argmax(axis=1) == 2)
    assert kept / (n * (c + 1)) < 0.125
    if dtype == np.float64:  # ... and no exact zeros to skip
        assert np.mean((gap > 60) & (gap < 700)) > 0.7


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_runs_of_tiles_match_reference_for_any_thread_count(covariance_type, rng):
    """At 140k rows each parallel task folds runs of several tiles into one set of
    partial sums (tiles_per_run); the sums still match the reference and do
    not depend on the thread count."""
    from fastlvm.kernels._covariance import COVARIANCE_CODE
    from fastlvm.kernels._numba_support import tiles_per_run
    from fastlvm.kernels.gaussian_log_prob._numba import gaussian_tile_rows

    n = 140_001
    tile = gaussian_tile_rows(COVARIANCE_CODE[covariance_type], 8, 7, 4)
    assert tiles_per_run(n, tile) > 1 and n % tile  # the case this test is for
    X, w, means, pc = _separated(rng, n, 7, covariance_type, np.float32)
    got = estep_stats(X, w, means, pc, covariance_type)
    assert_estep_matches_reference(got, X, w, means, pc, covariance_type, None, np.float32)
    assert_same_bits_across_thread_counts(lambda: estep_stats(X, w, means, pc,
                                                              covariance_type))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("covariance_type", ["diag", "spherical"])
def test_overlapping_tiles_then_separated_ones(covariance_type, dtype, rng):
    """Ten unit clusters 28 sigma apart; the first rows lie halfway between
    two of them (two pairs a row: every such tile has too many pairs for the
    listed path, and the run's next tiles skip the listing), the rest on the
    clusters (one pair a row: listed).  The statistics match the reference
    whichever path each tile took, and their bits do not depend on the
    thread count."""
    from fastlvm.kernels._covariance import COVARIANCE_CODE
    from fastlvm.kernels._numba_support import tiles_per_run
    from fastlvm.kernels.estep_stats._numba import _mark_pairs
    from fastlvm.kernels.gaussian_log_prob import gaussian_log_prob
    from fastlvm.kernels.gaussian_log_prob._numba import gaussian_tile_rows, prepare_params

    n, d, k = 140_001, 11, 10
    centers = 28.0 * np.eye(k, d)
    X = (centers[rng.integers(0, k, n)] + rng.standard_normal((n, d))).astype(dtype)
    tile = gaussian_tile_rows(COVARIANCE_CODE[covariance_type], 12, k,
                              np.dtype(dtype).itemsize)
    assert tiles_per_run(n, tile) > 1  # runs of several tiles: some are skipped
    m = 7 * tile
    halfway = 0.5 * (centers[rng.integers(0, k, m)] + centers[rng.integers(0, k, m)])
    X[:m] = (halfway + 0.3 * rng.standard_normal((m, d))).astype(dtype)
    means = centers.astype(dtype).astype(np.float64)
    pc = np.ones((k, d)) if covariance_type == "diag" else np.ones(k)
    w = np.full(k, 1.0 / k)
    # the case this test is for: the first tiles list too many pairs, the last few
    const = prepare_params(means, pc, covariance_type, np.dtype(dtype), w)[2] + np.log(w)
    lp = (gaussian_log_prob(X, means, pc, covariance_type) + np.log(w)).T.astype(dtype)
    unit = np.finfo(dtype).eps / 2
    for start, dense in ((0, True), (n - tile, False)):
        block = np.ascontiguousarray(lp[:, start:start + tile])
        rows = np.empty(k * tile // 8 + 1 + tile + 8, dtype=np.int64)
        count = _mark_pairs(block, tile, const, np.log(tile * k / unit) + 1.0, np.ones(1), 0,
                            False, block.max(axis=0), np.empty(tile, dtype=dtype), rows,
                            np.empty(rows.shape, dtype=dtype), np.empty(k, dtype=np.int64))
        assert (count < 0 or count * 8 > k * tile) == dense
    got = estep_stats(X, w, means, pc, covariance_type)
    assert_estep_matches_reference(got, X, w, means, pc, covariance_type, None, dtype)
    assert_same_bits_across_thread_counts(lambda: estep_stats(X, w, means, pc,
                                                              covariance_type))


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_groups_of_runs_give_the_same_bits(covariance_type, rng, monkeypatch):
    """Runs' partial statistics are merged a group at a time (add_partials); two
    runs to a group -- dozens of groups -- must give the same bits as the
    default groups, and match the reference."""
    import numba

    import fastlvm._config
    from fastlvm.kernels._numba_support import group_size

    X, w, means, pc = _separated(rng, 140_001, 7, covariance_type, np.float64)
    default = estep_stats(X, w, means, pc, covariance_type)
    monkeypatch.setattr(fastlvm._config, "TILES_PER_GROUP", 1)
    assert group_size(10) == numba.get_num_threads()
    grouped = estep_stats(X, w, means, pc, covariance_type)
    for a, b in zip(default, grouped):
        np.testing.assert_array_equal(a, b)
    assert_estep_matches_reference(grouped, X, w, means, pc, covariance_type, None,
                                   np.float64)


def test_integer_sample_weights_equal_repeated_rows(rng):
    X, w, means, pc = _problem(rng, (300, 3, 2), "full", np.float64)
    reps = rng.integers(0, 3, 300)
    a = estep_stats(X, w, means, pc, "full", sample_weight=reps.astype(float))
    b = estep_stats(np.repeat(X, reps, axis=0), w, means, pc, "full")
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=1e-11, atol=1e-9)


def test_zero_weight_component(rng):
    X, _, means, pc = _problem(rng, (100, 3, 3), "diag", np.float64)
    got = estep_stats(X, np.array([0.5, 0.5, 0.0]), means, pc, "diag")
    assert got.nk[2] == 0.0 and np.isfinite(got.log_likelihood)


def test_float32_far_from_origin_second_moments(rng):
    # spread 1 around 1e4: the shifted moments keep float32 accurate
    X = (rng.standard_normal((20000, 2)) + 1e4).astype(np.float32)
    means = np.full((1, 2), 1e4)
    got = estep_stats(X, np.ones(1), means, np.eye(2)[None], "full")
    ref = estep_stats_ref(X, np.ones(1), means, np.eye(2)[None], "full")
    np.testing.assert_allclose(got.second_moment, ref[3], rtol=1e-5)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("separation", [2.0, 1e3])
def test_tied_scatter_of_separated_clusters(separation, dtype, weighted, rng):
    """'tied''s scatter keeps the dtype's accuracy however far apart the means
    are: around their common centre, float32 sums lost 1e-2 of it at 1000
    standard deviations and float64 ones 5e-10.  Past the loss threshold rows
    go around their anchors, those of the overlapping clusters 0 and 1
    included (real second responsibilities, through the anchor-by-component
    masses)."""
    from fastlvm.kernels.estep_stats._numba import tied_needs_anchors

    X, w, means, pc, sw = separated_clusters(rng, dtype, separation, n=12000,
                                             weighted=weighted)
    centre = (w @ means).astype(dtype)
    assert tied_needs_anchors(means, centre, pc, dtype) == (separation > 2.0)
    got = estep_stats(X, w, means, pc, "tied", sample_weight=sw)
    assert_estep_matches_reference(got, X, w, means, pc, "tied", sw, dtype)
    if weighted:  # the anchors' sums, as the others, do not depend on the threads
        assert_same_bits_across_thread_counts(
            lambda: estep_stats(X[:3000], w, means, pc, "tied", sample_weight=sw[:3000]))


def test_tied_anchors_keep_a_starved_components_moments(rng):
    """Rows around their anchors still give a component whose every
    responsibility lies far below its rows' rounding (float64, 30 deviations
    from cluster 0, 1e-161 of the rows in all) the moments of those tiny
    responsibilities: its mean is where they put it, not where its anchors are.
    Leaving such rows out of the anchor-by-component masses moved it 30
    deviations."""
    from fastlvm.kernels.estep_stats._numba import tied_needs_anchors

    d = 3
    means = np.array([[0.0] * d, [1000.0] * d, [-1000.0, 1000.0, 0.0], [30.0, 0.0, 0.0]])
    X = means[rng.integers(3, size=3000)] + rng.standard_normal((3000, d))
    w = np.array([0.3, 0.3, 0.3, 0.1])
    assert tied_needs_anchors(means, w @ means, np.eye(d), np.float64)
    ref = EStepStats(*estep_stats_ref(X, w, means, np.eye(d), "tied"))
    got = estep_stats(X, w, means, np.eye(d), "tied")
    assert 0 < ref.nk[3] < 1e-100
    np.testing.assert_allclose(got.sum_x[3] / got.nk[3], ref.sum_x[3] / ref.nk[3], rtol=1e-9)
    assert_estep_matches_reference(got, X, w, means, np.eye(d), "tied", None, np.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_tied_anchors_across_the_copy_blocks(layout, dtype, rng):
    """Rows around their anchors with D = 13 (one 8-wide block of features and
    five left over), a row count that ends tiles off the 8-row blocks, X
    contiguous and strided, and separated clusters with a pair that shares
    rows: against the reference, at the dtype's accuracy."""
    from fastlvm.kernels.estep_stats._numba import tied_needs_anchors

    X, w, means, pc, sw = separated_clusters(rng, dtype, 1e3, n=5003, d=13)
    if layout == "strided":
        X = np.repeat(X, 2, axis=1)[:, ::2]
    assert tied_needs_anchors(means, (w @ means).astype(dtype), pc, dtype)
    got = estep_stats(X, w, means, pc, "tied", sample_weight=sw)
    assert_estep_matches_reference(got, X, w, means, pc, "tied", sw, dtype)


def test_tied_anchors_of_overlapping_groups_far_apart(rng):
    """Two groups of six overlapping components, 3000 deviations apart (float64):
    every row has real responsibilities besides its anchor's, so the
    anchor-by-component masses are dense, and their scatter is summed over the
    differences of the means themselves.  Expanded into the means' own
    products, it lost 5e-10 of the scatter here, five times the tolerance."""
    from fastlvm.kernels.estep_stats._numba import tied_needs_anchors

    d = 8
    means = np.r_[rng.standard_normal((6, d)) * 0.5, rng.standard_normal((6, d)) * 0.5 + 3000]
    X = means[rng.integers(12, size=20000)] + rng.standard_normal((20000, d))
    w = np.full(12, 1 / 12)
    assert tied_needs_anchors(means, w @ means, np.eye(d), np.float64)
    got = estep_stats(X, w, means, np.eye(d), "tied")
    assert_estep_matches_reference(got, X, w, means, np.eye(d), "tied", None, np.float64)


@pytest.mark.parametrize("covariance_type", ["tied", "diag", "spherical"])
def test_triton_moments_of_separated_clusters(covariance_type, rng, monkeypatch):
    pytest.importorskip("triton")
    X, w, means, pc = separated_float32_problem(rng, covariance_type)
    monkeypatch.setenv("FASTLVM_BACKEND", "triton")
    Xb, _ = backend_arrays("triton", X, None)
    got = estep_stats(Xb, w, means, pc, covariance_type)
    assert_estep_matches_reference(got, X, w, means, pc, covariance_type, None, np.float32)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(weights=np.array([0.5, -0.5])), ValueError, "non-negative"),
    (dict(weights=np.ones(3) / 3), ValueError, "weights must have shape"),
    (dict(sample_weight=np.ones(5)), ValueError, "sample_weight must have shape"),
    (dict(sample_weight=-np.ones(4)), ValueError, "non-negative"),
])
def test_bad_input(kwargs, error, match):
    args = dict(weights=np.ones(2) / 2, sample_weight=None)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        estep_stats(np.zeros((4, 3)), args["weights"], np.zeros((2, 3)), np.ones(2),
                    "spherical", sample_weight=args["sample_weight"])


def _triton_problem(rng, n, d, k, covariance_type, dtype, weighted):
    X, w, means, pc = _problem(rng, (n, d, k), covariance_type, dtype, offset=3.0)
    sw = rng.random(n) * 2 if weighted else None
    if sw is not None:
        sw[::7] = 0.0  # rows of weight zero add nothing
    return X, w, means, pc, sw


@pytest.mark.parametrize("k", [1, 16, 17, 70])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("covariance_type", ["tied", "diag", "spherical"])
def test_triton_one_and_two_passes_match_reference(covariance_type, dtype, k, rng,
                                                   monkeypatch):
    """Every K from one component tile (one pass over X, the statistics kernel
    forming the rows' log-normalisers) to several (log_norm's pass first):
    under the interpreter the tile holds 16, on an H100/H200 at least 16 and at
    most 64 (float32) or 32 (float64)."""
    X, w, means, pc, sw = _triton_problem(rng, 203, 5, k, covariance_type, dtype, True)
    monkeypatch.setenv("FASTLVM_BACKEND", "triton")
    Xb, swb = backend_arrays("triton", X, sw)
    got = estep_stats(Xb, w, means, pc, covariance_type, sample_weight=swb)
    assert_estep_matches_reference(got, X, w, means, pc, covariance_type, sw, dtype)


def _rows_per_chunk(Xb, w, means, pc, covariance_type):
    """The chunk size, in rows, that the chunk-counting tests set (CHUNK_ELEMENTS =
    K x it): two of the interpreter's 16-row tiles, or on a GPU one row tile of the
    chunks' log-density kernel (64 or 128 rows; chunks hold whole tiles) and at
    least two of the moments kernel's (a chunk of one moments tile has one row
    split: 'full''s square blocks take 64 rows since session 58, which failed
    the D = 5 test's split check on the H200)."""
    import torch

    from fastlvm.kernels import _triton_gaussian as tg
    from fastlvm.kernels.estep_stats import _triton_chunked as ch

    p = tg.GaussianTileParams(Xb, means, pc, covariance_type,
                              torch.log(torch.as_tensor(w, dtype=torch.float64)))
    log_prob, moments = ch.chunk_configs(p.dtype, p.block_d, p.code)
    return max(32, log_prob.block_n, 2 * moments.block_n)


def _leading_rows(n, *arrays):
    """The first n rows of each array (None stays None)."""
    return [None if a is None else a[:n] for a in arrays]


def _counted_chunks(monkeypatch, launches=False):
    """A list that gets the row count of each chunk the chunked E-step adds
    (``_ChunkedPass.add_chunk``), or with ``launches`` of each chunk's log-density
    launch (``_ChunkLogDensities._log_prob``: the E-step's, the log-density
    matrix's and the log-normalisers')."""
    from fastlvm.kernels.estep_stats import _triton_chunked as ch

    cls, name, rows_at = ((ch._ChunkLogDensities, "_log_prob", 0) if launches
                          else (ch._ChunkedPass, "add_chunk", 1))
    original, seen = getattr(cls, name), []

    def counted(self, *args):
        seen.append(args[rows_at].shape[0])
        return original(self, *args)

    monkeypatch.setattr(cls, name, counted)
    return seen


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("covariance_type", ["tied", "diag", "spherical"])
@pytest.mark.parametrize("d", [5, 20])
def test_triton_large_k_chunks_match_reference_and_the_recomputing_path(
        d, covariance_type, dtype, weighted, rng, monkeypatch):
    """Beyond one component tile the log-densities are stored chunk by chunk
    (``_triton_chunked.py``): here K = 37 (69 on a GPU, whose float32 tile holds
    64) over 203 rows in several chunks with a ragged last one (48 rows each under
    the interpreter), the partials added across chunks.  Against the
    reference, and against the path that recomputes the log-densities beside the
    moments, partial sums and log-likelihood alike.  D = 20 pads to 32 features:
    two of the moments kernel's 16-wide feature blocks under the interpreter."""
    import torch

    from fastlvm.kernels import _triton_gaussian as tg
    from fastlvm.kernels.estep_stats import _triton as es
    from fastlvm.kernels.estep_stats import _triton_chunked as ch

    k = 37 if tg.interpreting() else 69  # beyond one component tile
    X, w, means, pc, sw = _triton_problem(rng, 203, d, k, covariance_type, dtype, weighted)
    Xb, swb = backend_arrays("triton", X, sw)
    monkeypatch.setattr(ch, "CHUNK_ELEMENTS", k * 48)
    # 48 rows under the interpreter's 16-row tiles; one 128-row tile on a GPU
    step = ch.chunk_rows(k, ch.chunk_configs(Xb.dtype, 16, tg.DIAG)[0].block_n)
    want = [min(step, 203 - start) for start in range(0, 203, step)]
    assert len(want) > 1 and want[-1] < step
    chunks = _counted_chunks(monkeypatch)
    monkeypatch.setenv("FASTLVM_BACKEND", "triton")
    got = estep_stats(Xb, w, means, pc, covariance_type, sample_weight=swb)
    assert chunks == want
    assert_estep_matches_reference(got, X, w, means, pc, covariance_type, sw, dtype)

    swt = None if swb is None else swb.to(Xb.dtype).contiguous()
    p = tg.GaussianTileParams(Xb, means, pc, covariance_type,
                              torch.log(torch.as_tensor(w, dtype=torch.float64)))
    stored = es.estep_partials(Xb, p, swt, large_k="chunked")
    recomputed = es.estep_partials(Xb, p, swt, large_k="recompute")
    blocks = -(-step // (16 if tg.interpreting() else 128))  # log-likelihood blocks a chunk
    assert chunks == want * 2 and stored.ll_parts.shape[0] == len(want) * blocks
    for a, b in zip(stored, recomputed):  # 'tied''s s2 is the same scatter kernel's
        assert_close(to_numpy(a.double().sum(0)), to_numpy(b.double().sum(0)), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("covariance_type", ["tied", "diag", "spherical"])
@pytest.mark.parametrize("d, k", [(20, 37), (300, 3)])
def test_triton_chunks_shifted_once_give_the_bits_of_shifting_in_the_kernels(
        d, k, covariance_type, dtype, rng, monkeypatch):
    """The chunked E-step's rows shifted once a chunk (``_shift_rows_kernel``, where
    they fit SHIFTED_ELEMENTS) or in each kernel as they are read (wider chunks):
    the same partials and log-likelihood bit for bit, over several chunks with a
    ragged last one, at K beyond one component tile (D = 20: two of the moments'
    feature blocks under the interpreter) and on wide rows (D = 300, any K),
    sample weights with zeros among them."""
    import torch

    from fastlvm.kernels import _triton_gaussian as tg
    from fastlvm.kernels.estep_stats import _triton as es
    from fastlvm.kernels.estep_stats import _triton_chunked as ch

    k = 69 if d == 20 and not tg.interpreting() else k
    X, w, means, pc, sw = _triton_problem(rng, 100, d, k, covariance_type, dtype, True)
    Xb, swb = backend_arrays("triton", X, sw)
    monkeypatch.setattr(ch, "CHUNK_ELEMENTS", k * 48)  # chunks of 48 rows (interpreter)
    p = tg.GaussianTileParams(Xb, means, pc, covariance_type,
                              torch.log(torch.as_tensor(w, dtype=torch.float64)))
    swt = swb.to(Xb.dtype).contiguous()
    shifts, kernel = [], ch._shift_rows_kernel

    class LaunchSpy:
        def __getitem__(self, grid):
            shifts.append(grid)
            return kernel[grid]

    monkeypatch.setattr(ch, "_shift_rows_kernel", LaunchSpy())
    once = es.estep_partials(Xb, p, swt, large_k="chunked")
    step = ch.chunk_rows(k, ch.chunk_configs(p.dtype, p.block_d, p.code)[0].block_n)
    n_chunks = -(-100 // step)  # 48, 48, 4 rows under the interpreter
    assert len(shifts) == n_chunks and (n_chunks > 1 or not tg.interpreting())
    monkeypatch.setattr(ch, "SHIFTED_ELEMENTS", 0)
    in_kernels = es.estep_partials(Xb, p, swt, large_k="chunked")
    assert len(shifts) == n_chunks  # none shifted once this time
    for name, a, b in zip(once._fields, once, in_kernels):
        assert (a is None) == (b is None), name
        assert a is None or torch.equal(a, b), name


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_triton_wide_rows_take_the_chunks_at_any_k(covariance_type, dtype, rng, monkeypatch):
    """Rows past 256 padded features take the chunked E-step even where one
    component tile holds K (here 3): the fused kernels hold whole rows, and at
    BLOCK_D = 512 an sm_90 build of 'diag''s needed 327,680 bytes of shared memory
    at its smallest tiles (the H100/H200 give 232,448), while the chunks step
    through the features.  D = 300 against the reference; the moments' feature
    blocks wholly past the 300 features (zero padding up to 512) are not launched."""
    from fastlvm.kernels.estep_stats import _triton_chunked as ch

    X, w, means, pc, sw = _triton_problem(rng, 40, 300, 3, covariance_type, dtype, True)
    Xb, swb = backend_arrays("triton", X, sw)
    chunks = _counted_chunks(monkeypatch)
    grids, moments = [], ch._chunk_moments_kernel

    class LaunchSpy:  # each launch's grid with its feature block (the table's, or
        def __getitem__(self, grid):  # smaller where launch_fitted stepped down)
            def launch(*args, **kwargs):
                grids.append((grid, kwargs["BLOCK_F"]))
                return moments[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(ch, "_chunk_moments_kernel", LaunchSpy())
    monkeypatch.setenv("FASTLVM_BACKEND", "triton")
    got = estep_stats(Xb, w, means, pc, covariance_type, sample_weight=swb)
    assert chunks == [40]
    assert_estep_matches_reference(got, X, w, means, pc, covariance_type, sw, dtype)
    assert not ch.chunked_applies(ch.DIAG, 3, ch.FUSED_MAX_BLOCK_D, 16)  # 256 stays fused
    if covariance_type != "full":  # 'full''s moments are _triton_square_blocks.py's
        assert grids and all(grid[0] == -(-300 // block_f) for grid, block_f in grids), grids


@pytest.mark.parametrize("covariance_type", ["diag", "spherical"])
def test_triton_rows_of_thousands_of_features_take_the_chunks(covariance_type, rng,
                                                             monkeypatch):
    """D = 5000 (BLOCK_D = 8192, past the 4096 the chunks were first sized for):
    the chunked E-step against the reference; the fused kernels, which hold whole
    rows, cannot fit such rows at any tiles."""
    X, w, means, pc, sw = _triton_problem(rng, 20, 5000, 3, covariance_type, np.float64,
                                          True)
    Xb, swb = backend_arrays("triton", X, sw)
    chunks = _counted_chunks(monkeypatch)
    monkeypatch.setenv("FASTLVM_BACKEND", "triton")
    got = estep_stats(Xb, w, means, pc, covariance_type, sample_weight=swb)
    assert chunks == [20]
    assert_estep_matches_reference(got, X, w, means, pc, covariance_type, sw, np.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_triton_wide_rows_log_densities_and_normalisers_step_through_features(
        covariance_type, dtype, rng, monkeypatch):
    """The log-density matrix and the log-normalisers (predict_proba's and
    score_samples' kernels) at D = 300 come from the chunks' log-density kernel,
    as the E-step does (the fused row kernels did not fit an H100 there in
    float64 at D = 768): against the NumPy reference, over two chunks (32 and 8
    rows under the interpreter)."""
    import torch
    from scipy.special import logsumexp

    from fastlvm.kernels import _triton_gaussian as tg
    from fastlvm.kernels import gaussian_log_prob_ref
    from fastlvm.kernels.estep_stats import _triton_chunked as ch
    from fastlvm.kernels.gaussian_log_prob._triton import gaussian_log_prob_triton

    X, w, means, pc, sw = _triton_problem(rng, 136, 300, 3, covariance_type, dtype, True)
    step = _rows_per_chunk(backend_arrays("triton", X)[0], w, means, pc, covariance_type)
    X, sw = _leading_rows(step + 8, X, sw)
    Xb, swb = backend_arrays("triton", X, sw)
    monkeypatch.setattr(ch, "CHUNK_ELEMENTS", 3 * step)
    launches = _counted_chunks(monkeypatch, launches=True)
    ref = gaussian_log_prob_ref(X, means, pc, covariance_type)
    got = gaussian_log_prob_triton(Xb, means, pc, covariance_type)
    assert launches == [step, 8] and got.dtype == Xb.dtype
    assert_close(to_numpy(got), ref, dtype)
    p = tg.GaussianTileParams(Xb, means, pc, covariance_type,
                              torch.log(torch.as_tensor(w, dtype=torch.float64)))
    lse, ll = tg.log_norm(Xb, p, None if swb is None else swb.to(p.dtype))
    ref_lse = logsumexp(ref + np.log(w), axis=1)
    assert launches == [step, 8] * 2
    assert_close(to_numpy(lse), ref_lse, dtype)
    assert_close(float(ll), float(sw @ ref_lse), dtype)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("covariance_type", ["full", "tied"])
@pytest.mark.parametrize("d, k, fused_max", [(37, 6, 32), (5, 2, 8)])
def test_triton_square_blocks_match_reference_and_the_fused_kernels(
        d, k, fused_max, covariance_type, dtype, weighted, rng, monkeypatch):
    """The D x D work of wide rows in square feature blocks
    (``_triton_square_blocks.py``: 'full''s log-densities and moments, 'tied''s
    scatter), with the fused kernels' width lowered so small rows take them.
    D = 37 (BLOCK_D = 64): three 16-wide feature blocks under the interpreter, the
    last holding five features (the triangular product's column blocks, the block
    pairs with their mirrored halves), K = 6 over two of 'full''s component tiles
    of 4.  D = 5, K = 2: few programs, so several row splits (of a chunk for
    'full', of all rows for the scatter).  Three chunks, the last of 6 rows (70
    rows in chunks of 32, 32 and 6 under the interpreter).  The statistics
    against the reference and, partial for partial, against the fused kernels
    (``large_k='recompute'`` at the real width); the log-density matrix and
    log-normalisers too."""
    import torch
    from scipy.special import logsumexp

    from fastlvm.kernels import _triton_gaussian as tg
    from fastlvm.kernels import gaussian_log_prob_ref
    from fastlvm.kernels.estep_stats import _triton as es
    from fastlvm.kernels.estep_stats import _triton_chunked as ch
    from fastlvm.kernels.estep_stats import _triton_square_blocks as sb
    from fastlvm.kernels.gaussian_log_prob._triton import gaussian_log_prob_triton

    cov = covariance_type
    X, w, means, pc, sw = _triton_problem(rng, 262, d, k, cov, dtype, weighted)
    step = _rows_per_chunk(backend_arrays("triton", X)[0], w, means, pc, cov)
    n = 2 * step + 6
    X, sw = _leading_rows(n, X, sw)
    Xb, swb = backend_arrays("triton", X, sw)
    p = tg.GaussianTileParams(Xb, means, pc, cov,
                              torch.log(torch.as_tensor(w, dtype=torch.float64)))
    swt = None if swb is None else swb.to(Xb.dtype).contiguous()
    fused = es.estep_partials(Xb, p, swt, large_k="recompute")
    monkeypatch.setattr(ch, "FUSED_MAX_BLOCK_D", fused_max)
    monkeypatch.setattr(ch, "CHUNK_ELEMENTS", k * step)
    chunks = _counted_chunks(monkeypatch)
    launches = _counted_chunks(monkeypatch, launches=True)
    scatters, scatter = [], sb.wide_scatter
    monkeypatch.setattr(sb, "wide_scatter", lambda *a: scatters.append(1) or scatter(*a))
    monkeypatch.setenv("FASTLVM_BACKEND", "triton")
    got = estep_stats(Xb, w, means, pc, cov, sample_weight=swb)
    assert chunks == launches == [step, step, 6]
    assert len(scatters) == (cov == "tied")  # the scatter over all rows, once
    assert_estep_matches_reference(got, X, w, means, pc, cov, sw, dtype)
    stored = es.estep_partials(Xb, p, swt)
    assert stored.s2.shape[1:] == fused.s2.shape[1:]
    if d == 5 or tg.interpreting():  # row splits (a GPU's many SMs split D = 37 too)
        assert stored.s2.shape[0] > 1 if d == 5 else stored.s2.shape[0] == 1
    for a, b in zip(stored[:3], fused[:3]):  # around the same centres
        assert_close(to_numpy(a.double().sum(0)), to_numpy(b.double().sum(0)), dtype)
    assert_close(float(stored.ll_parts.double().sum()), float(fused.ll_parts.double().sum()),
                 dtype)

    ref = gaussian_log_prob_ref(X, means, pc, cov)
    assert_close(to_numpy(gaussian_log_prob_triton(Xb, means, pc, cov)), ref, dtype)
    lse, ll = tg.log_norm(Xb, p, swt)
    assert launches == [step, step, 6] * 4  # two E-steps, the matrix, the normalisers
    ref_lse = logsumexp(ref + np.log(w), axis=1)
    assert_close(to_numpy(lse), ref_lse, dtype)
    assert_close(float(ll), float((np.ones(n) if sw is None else sw) @ ref_lse), dtype)


@pytest.mark.parametrize("covariance_type, last_tile", [("diag", 5), ("full", 3)])
def test_triton_chunk_log_normalisers_merge_tile_states_in_steps(covariance_type, last_tile,
                                                                 rng, monkeypatch):
    """The chunks' log-normaliser kernel folds the rows' tile states MERGE_TILES at
    a time (all at once kept kilobytes in local memory past 64 tiles in float64):
    with one tile a step, three component tiles fold in three steps ('diag''s
    16-component tiles under the interpreter, K = 37, 64 on a GPU; 'full''s 4,
    K = 11, 16 on a GPU, wide, its width lowered), with components of weight zero
    (-inf), rows of weight zero and a last tile of far components among them.
    The log-normalisers, log-likelihood and statistics against the reference."""
    import torch
    from scipy.special import logsumexp

    from fastlvm.kernels import _covariance
    from fastlvm.kernels import _triton_gaussian as tg
    from fastlvm.kernels import gaussian_log_prob_ref
    from fastlvm.kernels.estep_stats import _triton_chunked as ch

    code = _covariance.FULL if covariance_type == "full" else _covariance.DIAG
    tile = ch.chunk_configs(torch.float64, tg.block_d(5), code)[0].block_k
    k = 2 * tile + last_tile
    X, w, means, pc, sw = _triton_problem(rng, 45, 5, k, covariance_type, np.float64, True)
    w[[0, k - 1]] = 0.0  # whole first and last components at -inf
    w /= w.sum()
    # the last tile's components a thousand deviations away: its states' maxima lie
    # about 10^6 below the running one, whose exp(difference) a fold must not take
    # the other way round
    means[k - last_tile:] += 1e3
    Xb, swb = backend_arrays("triton", X, sw)
    monkeypatch.setattr(ch, "MERGE_TILES", 1)
    if covariance_type == "full":
        monkeypatch.setattr(ch, "FUSED_MAX_BLOCK_D", 8)
    steps, merge_step = [], ch.merge_step  # each launch's steps over its tile states

    def counted(n_ktiles):
        block_t = merge_step(n_ktiles)
        steps.append(-(-n_ktiles // block_t))
        return block_t

    monkeypatch.setattr(ch, "merge_step", counted)
    monkeypatch.setenv("FASTLVM_BACKEND", "triton")
    got = estep_stats(Xb, w, means, pc, covariance_type, sample_weight=swb)
    assert steps == [3]
    assert_estep_matches_reference(got, X, w, means, pc, covariance_type, sw, np.float64)
    with np.errstate(divide="ignore"):
        ref = logsumexp(gaussian_log_prob_ref(X, means, pc, covariance_type) + np.log(w),
                        axis=1)
    p = tg.GaussianTileParams(Xb, means, pc, covariance_type,
                              torch.log(torch.as_tensor(w, dtype=torch.float64)))
    lse, ll = ch.chunked_log_norm(Xb, p, "ieee", swb)
    assert steps == [3, 3]
    assert_close(to_numpy(lse), ref, np.float64)
    assert_close(float(ll.sum()), float(sw @ ref), np.float64)


@pytest.mark.parametrize("n", [0, 5])
def test_triton_large_k_chunks_with_fewer_rows_than_a_tile(n, rng, monkeypatch):
    X, w, means, pc, sw = _triton_problem(rng, 5, 3, 37, "diag", np.float64, True)
    X, sw = X[:n], sw[:n]
    monkeypatch.setenv("FASTLVM_BACKEND", "triton")
    Xb, swb = backend_arrays("triton", X, sw)
    got = estep_stats(Xb, w, means, pc, "diag", sample_weight=swb)
    assert_estep_matches_reference(got, X, w, means, pc, "diag", sw, np.float64)


def test_triton_large_k_path_names_are_checked(rng):
    from fastlvm.kernels import _triton_gaussian as tg
    from fastlvm.kernels.estep_stats import _triton as es

    X, _, means, pc, _ = _triton_problem(rng, 20, 3, 20, "diag", np.float64, False)
    (Xb,) = backend_arrays("triton", X)
    with pytest.raises(ValueError, match="large_k='fused'; use one of"):
        es.estep_partials(Xb, tg.GaussianTileParams(Xb, means, pc, "diag"), large_k="fused")


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("covariance_type", ["tied", "diag", "spherical"])
def test_triton_one_pass_equals_the_two_pass_kernels(covariance_type, dtype, weighted, rng):
    """The one-pass statistics kernel against the same kernel fed log_norm's
    normalisers, at the same tiles: statistics to rounding, and the
    log-likelihood partials summed block for block as log_norm sums them."""
    X, w, means, pc, sw = _triton_problem(rng, 150, 6, 9, covariance_type, dtype, weighted)
    Xb, swb = backend_arrays("triton", X, sw)
    import torch

    swb = None if swb is None else swb.to(Xb.dtype)  # the kernels take X's dtype

    from fastlvm.kernels import _triton_gaussian as tg
    from fastlvm.kernels.estep_stats import _triton as es

    log_w = torch.log(torch.as_tensor(w, device=Xb.device))
    p = tg.GaussianTileParams(Xb, means, pc, covariance_type, log_w)
    prec = tg.dot_precision(Xb.dtype)
    cfg = tg.tile_config(p.code, Xb.dtype, p.block_d, prec, 9)
    assert es.one_pass_applies(p.code, 9, cfg)
    lse, ll = tg.log_norm(Xb, p, swb)
    nk2, s12, s22, none = es.launch_moments(Xb, swb, lse, p, cfg, prec)
    nk1, s11, s21, ll_part = es.launch_moments(Xb, swb, None, p, cfg, prec)
    assert none is None
    assert ll_part.shape == (-(-150 // cfg.block_n),)
    assert_close(float(ll_part.double().sum()), float(ll), dtype)
    pairs = [(nk1, nk2), (s11, s12)] + ([] if covariance_type == "tied" else [(s21, s22)])
    for a, b in pairs:  # 'tied''s second moment comes from its scatter kernel
        assert_close(to_numpy(a).astype(np.float64), to_numpy(b).astype(np.float64), dtype)


def test_triton_one_pass_is_refused_where_a_tile_cannot_hold_every_component(rng):
    X, _, means, pc, _ = _triton_problem(rng, 40, 3, 20, "diag", np.float64, False)
    (Xb,) = backend_arrays("triton", X)
    from fastlvm.kernels import _triton_gaussian as tg
    from fastlvm.kernels.estep_stats import _triton as es

    p = tg.GaussianTileParams(Xb, means, pc, "diag")
    cfg = tg.TileConfig(16, 16, 16, 4, 1)
    assert not es.one_pass_applies(p.code, 20, cfg)
    with pytest.raises(ValueError, match="one-pass statistics kernel needs every component"):
        es.launch_moments(Xb, None, None, p, cfg, "ieee")
    p_full = tg.GaussianTileParams(Xb, means, make_params(rng, "full", 20, 3), "full")
    assert not es.one_pass_applies(p_full.code, 20, cfg._replace(block_k=32))


def test_triton_shrunk_tiles_fall_back_to_two_passes(rng, monkeypatch):
    """A one-pass launch that does not fit the device's shared memory steps down
    (launch_fitted); once the component tile no longer holds every component,
    the log-normalisers come from log_norm's pass, computed once."""
    from triton.runtime.errors import OutOfResources

    from fastlvm.kernels import _triton_gaussian as tg
    from fastlvm.kernels.estep_stats import _triton as es

    X, w, means, pc, sw = _triton_problem(rng, 120, 4, 20, "spherical", np.float32, True)
    Xb, swb = backend_arrays("triton", X, sw)
    monkeypatch.setattr(tg, "_FITTING", {})
    monkeypatch.setattr(es, "tile_config", lambda *a: tg.TileConfig(16, 32, 16, 4, 1))
    calls = {"one pass": 0, "log_norm": 0}
    launch_moments, log_norm_parts = es.launch_moments, es.log_norm_parts

    def refuse_one_pass(X, sw, lse, *rest):
        if lse is None:
            calls["one pass"] += 1
            raise OutOfResources(300_000, 232_448, "shared memory")
        return launch_moments(X, sw, lse, *rest)

    def counted_log_norm(*args):
        calls["log_norm"] += 1
        return log_norm_parts(*args)

    monkeypatch.setattr(es, "launch_moments", refuse_one_pass)
    monkeypatch.setattr(es, "log_norm_parts", counted_log_norm)
    got = es.estep_stats_triton(Xb, w, means, pc, "spherical", sample_weight=swb)
    assert calls == {"one pass": 1, "log_norm": 1}
    assert_estep_matches_reference(got, X, w, means, pc, "spherical", sw, np.float32)
