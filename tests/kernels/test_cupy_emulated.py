"""The CuPy backend run end to end on the CPU: its Python code on a NumPy-backed
``cupy`` (``fake_cupy.py``, strict about host and device arrays as CuPy is) and its
CUDA kernels on the fiber emulator (``cuda_emulator.py``).

The same checks against the float64 references as the GPU grid in
test_estep_stats.py / test_gaussian_log_prob.py / test_log_responsibilities.py,
which run the real thing where a GPU is present.  Shapes are fewer and smaller
here: every CUDA thread is a fiber.
"""

import numpy as np
import pytest
from scipy.special import logsumexp

from fastlvm.kernels import (MPPCAStats, gaussian_log_prob_ref, log_responsibilities_ref,
                             mppca_log_prob_ref, mppca_stats_ref)
from tests.conftest import (COVARIANCE_TYPES, DTYPES, assert_estep_matches_reference,
                            assert_mixture_density_matches, make_params, mppca_problem,
                            separated_float32_problem, to_numpy, untouched_storage)
from tests.kernels import cuda_emulator, fake_cupy
from tests.tolerances import assert_close

pytestmark = pytest.mark.skipif(not cuda_emulator.AVAILABLE,
                                reason="the CUDA emulator needs g++ on Linux")
# (n, D, K): n = 1, D = 1, K = 1, rows past the last full block of 8, K and D
# above and below a warp's 32 lanes
SHAPES = [(1, 1, 1), (7, 1, 3), (45, 5, 1), (37, 3, 35), (21, 33, 2), (130, 6, 40)]


def _problem(rng, shape, covariance_type, dtype, offset=30.0):
    n, d, k = shape
    X = (rng.standard_normal((n, d)) + offset).astype(dtype)
    means = X[rng.integers(0, n, k)].astype(np.float64) + rng.standard_normal((k, d)) * 0.5
    weights = rng.random(k) + 0.1
    return X, weights / weights.sum(), means, make_params(rng, covariance_type, k, d)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_gaussian_log_prob(covariance_type, shape, dtype, rng, cupy_backend):
    gaussian_log_prob_cupy = cupy_backend.log_prob.gaussian_log_prob_cupy
    X, _, means, pc = _problem(rng, shape, covariance_type, dtype)
    got = gaussian_log_prob_cupy(cupy_backend.cupy.asarray(X), means, pc, covariance_type)
    assert got.dtype == dtype and got.shape == (shape[0], shape[2])
    assert_close(got, gaussian_log_prob_ref(X, means, pc, covariance_type), dtype)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_gaussian_log_prob_with_log_weights_and_strided_rows(covariance_type, rng,
                                                              cupy_backend):
    gaussian_log_prob_cupy = cupy_backend.log_prob.gaussian_log_prob_cupy
    X, w, means, pc = _problem(rng, (40, 4, 3), covariance_type, np.float64)
    Xt = cupy_backend.cupy.asarray(np.asfortranarray(X))  # column-major: the kernels
    got = gaussian_log_prob_cupy(Xt, means, pc, covariance_type, np.log(w))  # get strides
    want = gaussian_log_prob_ref(X, means, pc, covariance_type) + np.log(w)
    assert_close(got, want, np.float64)


def _take_path(cupy_backend, path, monkeypatch):
    """Send the CuPy E-step down one path: the one-kernel ``estep_tiles`` (every
    shape here fits it) or the chunked cuBLAS path (no plan: K over the limit)."""
    if path == "chunks":
        monkeypatch.setattr(cupy_backend.tiles, "MAX_COMPONENTS", 0)
    calls = []
    tiles = cupy_backend.tiles.estep_sums_tiles
    monkeypatch.setattr(cupy_backend.estep, "estep_sums_tiles",
                        lambda *a, **kw: calls.append(1) or tiles(*a, **kw))
    return calls


@pytest.mark.parametrize("path", ["tiles", "chunks"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_estep_stats(covariance_type, shape, dtype, weighted, path, rng, cupy_backend,
                     monkeypatch):
    calls = _take_path(cupy_backend, path, monkeypatch)
    estep_stats_cupy = cupy_backend.estep.estep_stats_cupy
    X, w, means, pc = _problem(rng, shape, covariance_type, dtype)
    sw = (rng.random(shape[0]) * 2).astype(dtype) if weighted else None
    cp = cupy_backend.cupy
    got = estep_stats_cupy(cp.asarray(X), w, means, pc, covariance_type,
                           None if sw is None else cp.asarray(sw))
    assert isinstance(got[0], float)
    assert_estep_matches_reference(got, X, w, means, pc, covariance_type, sw, dtype)
    assert len(calls) == (path == "tiles")


@pytest.mark.parametrize("tile_rows", [32, 13, 64])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(300, 16, 64), (150, 2, 5), (1100, 3, 1)])
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_estep_tiles_over_many_blocks(covariance_type, shape, dtype, tile_rows, rng,
                                      cupy_backend, monkeypatch):
    """Runs of several tiles, a last run of fewer and a ragged last tile, a
    component and rows of weight zero; tiles of fewer and more rows than a warp
    has lanes, and an odd number (bench/cupy_tiles.py tries other row counts on a GPU)."""
    tiles = cupy_backend.tiles
    calls = _take_path(cupy_backend, "tiles", monkeypatch)
    monkeypatch.setattr(tiles, "MAX_BLOCKS", 3)
    monkeypatch.setattr(tiles, "ROWS_PER_TILE", tile_rows)
    n, d, k = shape
    X, w, means, pc = _problem(rng, shape, covariance_type, dtype)
    w[-1] = 0.0 if k > 1 else w[-1]
    w /= w.sum()
    sw = (rng.random(shape[0]) * 2).astype(dtype)
    sw[::7] = 0.0
    plan = tiles.tile_plan(n, k, d, covariance_type, dtype)
    assert plan.runs * plan.tiles_per_run * plan.tile_rows >= n
    assert plan.runs * (k if covariance_type == "full" else 1) <= max(3, k)
    cp = cupy_backend.cupy
    got = cupy_backend.estep.estep_stats_cupy(cp.asarray(X), w, means, pc, covariance_type,
                                              cp.asarray(sw))
    assert calls and (k == 1 or got[1][-1] == 0.0)
    assert_estep_matches_reference(got, X, w, means, pc, covariance_type, sw, dtype)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_estep_tiles_read_column_major_rows(covariance_type, rng, cupy_backend, monkeypatch):
    """The tile kernels read X through its element strides: Fortran-ordered rows give
    the C-ordered rows' statistics, bit for bit."""
    calls = _take_path(cupy_backend, "tiles", monkeypatch)
    X, w, means, pc = _problem(rng, (70, 7, 6), covariance_type, np.float32)
    estep, cp = cupy_backend.estep.estep_stats_cupy, cupy_backend.cupy
    want = estep(cp.asarray(X), w, means, pc, covariance_type)
    got = estep(cp.asarray(np.asfortranarray(X)), w, means, pc, covariance_type)
    assert len(calls) == 2
    for g, e in zip(got, want):
        np.testing.assert_array_equal(to_numpy(g), to_numpy(e))
    assert_estep_matches_reference(got, X, w, means, pc, covariance_type, None, np.float32)


@pytest.mark.parametrize("covariance_type, dtype, n, d, k", [
    ("full", np.float32, 40, 84, 2),       # the widest rows 'full' tiles take in float32
    ("full", np.float64, 40, 56, 3),       # and in float64 at a few components
    ("diag", np.float32, 40, 28, 64),      # K = 64 at the most micro-tiles that fit
    ("tied", np.float64, 40, 37, 5),       # 'tied''s U beside a float64 tile
    ("spherical", np.float64, 40, 61, 3)])
def test_estep_tiles_at_the_edges_of_shared_memory(covariance_type, dtype, n, d, k, rng,
                                                   cupy_backend, monkeypatch):
    """Shapes whose tiles fill the kernels' 48 KiB: each kernel's layout (the
    header of _cupy_estep.cu) stays inside it, with no room for 32 rows more (the
    emulator's canary catches a write just past it, not one far beyond), and the
    statistics match."""
    tiles = cupy_backend.tiles
    calls = _take_path(cupy_backend, "tiles", monkeypatch)
    plan = tiles.tile_plan(n, k, d, covariance_type, dtype)
    assert plan is not None
    budget = 8 * tiles.SMEM_DOUBLES // np.dtype(dtype).itemsize

    def fills(fixed, rows, row_entries, cap):
        return (fixed + rows * row_entries <= budget
                and (rows == cap or fixed + (rows + 32) * row_entries > budget))

    if covariance_type == "full":  # full_moments, then full_log_norm
        component = tiles._round4(d) ** 2 + tiles._round4(d) + 4
        assert fills(component, plan.tile_rows, plan.ldb + 1, tiles.THREADS)
        assert fills(plan.norm_chunk * component, plan.norm_tile_rows, plan.ldb + plan.lda,
                     tiles.ROWS_PER_TILE)
    else:
        lay = tiles._layout(covariance_type, k, d, np.dtype(dtype).itemsize)
        assert fills(lay.fixed, plan.tile_rows, plan.lda + plan.ldb, tiles.ROWS_PER_TILE)
    X, w, means, pc = _problem(rng, (n, d, k), covariance_type, dtype)
    got = cupy_backend.estep.estep_stats_cupy(cupy_backend.cupy.asarray(X), w, means, pc,
                                              covariance_type)
    assert calls
    assert_estep_matches_reference(got, X, w, means, pc, covariance_type, None, dtype)


def test_estep_tiles_plan_keeps_large_problems_on_the_chunked_path(cupy_backend):
    tiles = cupy_backend.tiles
    assert tiles.tile_plan(10, tiles.MAX_COMPONENTS + 1, 4, "diag", np.float32) is None
    assert tiles.tile_plan(0, 4, 4, "diag", np.float32) is None
    # 32 rows of the tile must fit the kernel's shared memory beside the coefficients
    # ('diag': K D of A and of B, and rows of D + 4 and K entries, padded)
    assert tiles.tile_plan(10, 4, 200, "diag", np.float32).tile_rows == 32
    assert tiles.tile_plan(10, 4, 200, "diag", np.float64) is None
    # and a block has one micro-tile per thread at most: (K / 4) (2 D / 4 + 1) for 'diag'
    assert tiles.tile_plan(10, 64, 60, "diag", np.float32) is None
    plan = tiles.tile_plan(10**6, 16, 32, "diag", np.float32)
    assert tiles.MAX_BLOCKS // 2 < plan.runs <= tiles.MAX_BLOCKS
    assert plan.phases * plan.micro_tiles <= tiles.THREADS
    assert plan.tile_rows == tiles.ROWS_PER_TILE
    assert plan.runs * plan.tiles_per_run * plan.tile_rows >= 10**6
    # rows come in multiples of a warp's 32 below ROWS_PER_TILE: 'tied' fits 96 here
    assert tiles.tile_plan(10**6, 16, 32, "tied", np.float32).tile_rows == 96
    full = tiles.tile_plan(10**6, 16, 32, "full", np.float32)
    assert full.runs * 16 <= tiles.MAX_BLOCKS and full.tile_rows == tiles.THREADS
    assert full.runs * full.phases * 16 * full.width * 8 <= tiles.PARTS_BYTES
    assert tiles.tile_plan(10**6, 16, 32, "full", np.float64).tile_rows == 128
    # full_log_norm: four components' U_k in shared memory beside 128 rows, float32
    assert (full.norm_chunk, full.norm_tile_rows) == (4, tiles.ROWS_PER_TILE)
    assert full.norm_runs * full.norm_tiles_per_run * full.norm_tile_rows >= 10**6
    wide = tiles.tile_plan(10**6, 16, 64, "full", np.float32)  # 68 x 68 U_k: two a time
    assert (wide.norm_chunk, wide.norm_tile_rows) == (2, 32)
    # in float64 one U_k of D = 57 (60 x 60 padded) leaves room for 29 rows of
    # log-densities: the chunked path from there (K = 16; it took D < 88 before the
    # factors went through shared memory)
    assert tiles.tile_plan(10**6, 16, 56, "full", np.float64).norm_chunk == 1
    assert tiles.tile_plan(10**6, 16, 57, "full", np.float64) is None
    assert tiles.tile_plan(10, 8, 128, "full", np.float32) is None  # 561 micro-tiles


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("covariance_type", ["tied", "diag", "spherical"])
def test_estep_tiles_rows_are_vector_aligned_and_conflict_free(covariance_type, dtype,
                                                               cupy_backend):
    """estep_tiles reads A's and B's rows as 16-byte vectors (the emulator checks each
    address) and a thread per row: strides of an odd number of 16-byte units put the
    rows of 8 consecutive threads in distinct bank quads; every part of shared memory
    before the tile is a whole number of vectors."""
    tiles = cupy_backend.tiles
    itemsize = np.dtype(dtype).itemsize
    for k, d in [(1, 1), (5, 3), (16, 32), (16, 64), (64, 32), (7, 13)]:
        lay = tiles._layout(covariance_type, k, d, itemsize)
        dp = -(-d // 4) * 4
        for stride, width in [(lay.lda, lay.row_blocks * 4), (lay.ldb, dp + 4)]:
            assert stride >= width and (stride * itemsize) % 32 == 16
            assert len({(r * stride * itemsize // 16) % 8 for r in range(8)}) == 8
        assert lay.fixed % 4 == 0 and lay.row_blocks * 4 >= k
        assert lay.column_blocks * 4 == (2 * dp if covariance_type == "diag" else dp) + 4
        plan = tiles.tile_plan(10**5, k, d, covariance_type, dtype)
        if plan is not None:
            used = lay.fixed + plan.tile_rows * (plan.lda + plan.ldb)
            assert used * itemsize <= 8 * tiles.SMEM_DOUBLES
            assert plan.tile_rows % 32 == 0 and plan.tile_rows <= tiles.ROWS_PER_TILE


def test_estep_tiles_constants_are_the_kernels(cupy_backend):
    text = cupy_backend.tiles.ESTEP_KERNELS.text()
    for name in ("THREADS", "SMEM_DOUBLES"):
        assert f"#define {name} {getattr(cupy_backend.tiles, name)}\n" in text


def test_cuda_source_gives_nvrtc_its_options(cupy_backend, monkeypatch):
    """A CudaSource's options reach NVRTC after ``-std=c++14`` (bench/cupy_tiles.py
    compiles the E-step kernels under ``--maxrregcount`` caps); the default adds none."""
    CudaSource = cupy_backend.source.CudaSource
    seen = []
    fake = cupy_backend.source.cupy  # the NumPy-backed cupy the module imported
    compile_module = fake.RawModule
    monkeypatch.setattr(fake, "RawModule", lambda code, options=(), name_expressions=():
                        seen.append(options) or compile_module(code, options, name_expressions))
    kernels = cupy_backend.tiles.ESTEP_KERNELS
    capped = CudaSource(kernels.file_name, kernels.kernel_names, ("--maxrregcount=80",))
    capped.function("estep_tiles", np.float32)
    CudaSource(kernels.file_name, kernels.kernel_names).function("estep_tiles", np.float32)
    assert seen == [("-std=c++14", "--maxrregcount=80"), ("-std=c++14",)]
    assert kernels.options == ()


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_estep_statistic_slots_read_each_moment_once(covariance_type, cupy_backend):
    """The gather reads N_k, s1 and s2 from distinct slots ('full', 'tied': s2 from
    its upper triangle, so the result is exactly symmetric)."""
    tiles = cupy_backend.tiles
    k, d = 5, 6
    slots = tiles.statistic_slots(covariance_type, k, d)
    plan = tiles.tile_plan(100, k, d, covariance_type, np.float64)
    row = plan.width * (k if covariance_type == "full" else 1)  # a row of the partials
    assert slots[0] == 0 and slots.max() < row
    body = slots[1:]
    if covariance_type in ("full", "tied"):
        s2 = body[k + k * d:].reshape(-1, d, d)
        assert (s2 == s2.transpose(0, 2, 1)).all()
        iu, ju = np.triu_indices(d)
        upper = np.concatenate([body[:k + k * d], s2[:, iu, ju].ravel()])
        assert len(np.unique(upper)) == upper.size
    else:
        assert len(np.unique(body)) == body.size


@pytest.mark.parametrize("path", ["tiles", "chunks"])
def test_estep_log_likelihood_skips_rows_of_weight_zero(path, cupy_backend, monkeypatch):
    """A row of weight zero adds nothing to the log-likelihood even where its
    log-density is -inf (x' * x' overflows)."""
    _take_path(cupy_backend, path, monkeypatch)
    X = np.array([[0.5, 1.0], [1e200, 0.0], [-0.3, 0.2]])
    means, pc = np.zeros((2, 2)), np.ones((2, 2))
    w = np.array([0.5, 0.5])
    sw = np.array([1.0, 0.0, 2.0])
    cp = cupy_backend.cupy
    ll = cupy_backend.estep.estep_stats_cupy(cp.asarray(X), w, means, pc, "diag",
                                             cp.asarray(sw))[0]
    kept = [0, 2]
    want = (sw[kept] * gaussian_log_prob_ref(X[kept], means, pc, "diag")[:, 0]).sum()
    assert ll == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_estep_stats_over_many_chunks_and_zero_weights(covariance_type, rng, cupy_backend,
                                                       monkeypatch):
    """Chunks of a few rows (one row for 'full'), a component of weight zero and
    rows of weight zero give the one-pass statistics."""
    gauss, estep = cupy_backend.gauss, cupy_backend.estep
    _take_path(cupy_backend, "chunks", monkeypatch)
    monkeypatch.setattr(gauss, "CHUNK_ELEMENTS", 64)
    monkeypatch.setattr(gauss, "FULL_CHUNK_FACTOR", 1)
    X, w, means, pc = _problem(rng, (29, 3, 4), covariance_type, np.float64)
    w[1] = 0.0
    w /= w.sum()
    sw = rng.random(29)
    sw[::5] = 0.0
    assert gauss.chunk_rows(gauss.ExpandedParams(np.float64, means, pc, covariance_type)) < 8
    cp = cupy_backend.cupy
    got = estep.estep_stats_cupy(cp.asarray(X), w, means, pc, covariance_type, cp.asarray(sw))
    assert got[1][1] == 0.0
    assert_estep_matches_reference(got, X, w, means, pc, covariance_type, sw, np.float64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_moments_product_over_slabs_is_the_plain_product(dtype, rng, cupy_backend):
    """moments_product adds R^T rows in float64: one product, or a batch over row
    slabs (exact, a ragged tail, more slabs than rows), the same sums to rounding;
    a transposed R (the 'full' chunks') takes the one product whatever the slabs;
    each slab count gives the same bits every call."""
    gauss, cp = cupy_backend.gauss, cupy_backend.cupy
    for m, k, w in ((37, 5, 6), (64, 3, 4), (3, 4, 2)):
        resp = rng.random((m, k)).astype(dtype)
        rows = rng.standard_normal((m, w)).astype(dtype)
        want = resp.astype(np.float64).T @ rows.astype(np.float64)
        resp_d, rows_d = cp.asarray(resp), cp.asarray(rows)
        for slabs in (1, 4, 8):
            start = rng.standard_normal((k, w))
            got = gauss.moments_product(resp_d, rows_d, cp.asarray(start), slabs).get()
            assert got.dtype == np.float64
            assert_close(got - start, want, dtype, scale=np.abs(want).max() + m)
            again = gauss.moments_product(resp_d, rows_d, cp.asarray(start), slabs).get()
            np.testing.assert_array_equal(got, again)
        transposed = cp.asarray(np.asfortranarray(resp))
        one = gauss.moments_product(transposed, rows_d, cp.zeros((k, w)), 1).get()
        np.testing.assert_array_equal(
            gauss.moments_product(transposed, rows_d, cp.zeros((k, w)), 8).get(), one)


@pytest.mark.parametrize("slabs", [1, 3, 16])
@pytest.mark.parametrize("covariance_type", ["spherical", "diag", "tied"])
def test_estep_chunks_sum_their_moments_over_slabs(covariance_type, slabs, rng, cupy_backend,
                                                   monkeypatch):
    """The chunked E-step with its moments product cut into MOMENT_SLABS slabs of
    rows (the last chunk ragged) gives the reference statistics."""
    gauss, estep = cupy_backend.gauss, cupy_backend.estep
    _take_path(cupy_backend, "chunks", monkeypatch)
    monkeypatch.setattr(gauss, "CHUNK_ELEMENTS", 1200)
    monkeypatch.setattr(gauss, "MOMENT_SLABS", slabs)
    X, w, means, pc = _problem(rng, (301, 6, 5), covariance_type, np.float32)
    sw = rng.random(301)
    cp = cupy_backend.cupy
    got = estep.estep_stats_cupy(cp.asarray(X), w, means, pc, covariance_type,
                                 cp.asarray(sw.astype(np.float32)))
    assert_estep_matches_reference(got, X, w, means, pc, covariance_type, sw, np.float32)


@pytest.mark.parametrize("tiles", [1, 64, 1024])
@pytest.mark.parametrize("dtype", DTYPES)
def test_slab_gram_and_column_sums_are_the_plain_sums(dtype, tiles, rng, cupy_backend,
                                                      monkeypatch):
    """slab_gram's slabs (exact, with a ragged tail, fewer rows than slabs, one
    slab) and column_sums give sum_n a_n^T b_n and sum_n a_n; 'full' chunks come
    in whole slabs where they hold that many rows."""
    gauss, cp = cupy_backend.gauss, cupy_backend.cupy
    monkeypatch.setattr(gauss, "GRAM_TILES", tiles)
    monkeypatch.setattr(gauss, "COLUMN_BLOCK_ROWS", 16)  # several blocks, a ragged last
    for k, m, d in ((3, 1, 2), (2, 40, 3), (4, 37, 5), (1, 64, 33), (5, 200, 1), (1, 0, 3)):
        a = rng.standard_normal((k, m, d)).astype(dtype)
        b = rng.standard_normal((k, m, d)).astype(dtype)
        got = gauss.slab_gram(cp.asarray(a), cp.asarray(b))
        assert got.dtype == np.float64 and got.shape == (k, d, d)
        want = np.einsum("kni,knj->kij", a.astype(np.float64), b.astype(np.float64))
        assert_close(got, want, dtype, scale=np.abs(want).max() + m)
        first = cp.asarray(a[0])
        for view in (first, first.T.copy().T):  # row-major, and column-major (any strides)
            cols = gauss.column_sums(view)
            assert cols.dtype == np.float64 and cols.shape == (d,)
            assert_close(cols, a[0].astype(np.float64).sum(0), dtype, scale=m)
    monkeypatch.setattr(gauss, "CHUNK_ELEMENTS", 1 << 16)
    X, w, means, pc = _problem(rng, (5, 7, 3), "full", np.float64)
    params = gauss.ExpandedParams(np.float64, means, pc, "full")
    assert gauss.chunk_rows(params) % gauss.gram_slabs(3, 7) == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_row_sumsq_scales_and_adds_a_value_per_group(dtype, rng, cupy_backend):
    """|y|^2 per row; -|y|^2 / 2 + c_g over groups of rows ('full''s per-component
    constant): the separate operations' numbers."""
    gauss, cp = cupy_backend.gauss, cupy_backend.cupy
    y = rng.standard_normal((4 * 9, 35)).astype(dtype)
    c = rng.standard_normal(4).astype(dtype)
    sumsq = gauss.row_sumsq(cp.asarray(y)).get()
    assert_close(sumsq, (y.astype(np.float64) ** 2).sum(1), dtype)
    got = gauss.row_sumsq(cp.asarray(y), -0.5, cp.asarray(c)).get()
    want = (sumsq * dtype(-0.5)).reshape(4, 9) + c[:, None]
    np.testing.assert_array_equal(got.reshape(4, 9), want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (9, 3), (17, 33), (3, 70)])
def test_shift_rows(shape, dtype, rng, cupy_backend):
    """x' = x - c0 in C order from rows of any layout, [x', x' * x'] and |x'|^2 (also as
    a column before a column of ones): the same numbers as NumPy's (|x'|^2 to the
    dtype's rounding)."""
    gauss, cp = cupy_backend.gauss, cupy_backend.cupy
    X = (rng.standard_normal(shape) + 5).astype(dtype)
    c0 = rng.standard_normal(shape[1]).astype(dtype)
    for rows_d in (cp.asarray(X), cp.asarray(np.asfortranarray(X)), cp.asarray(X)[::-1]):
        rows = rows_d.get()
        shifted, q, split = gauss.shift_rows(rows_d, cp.asarray(c0))
        assert q is None and split is None and shifted.flags.c_contiguous
        np.testing.assert_array_equal(shifted.get(), rows - c0)
        both, q, split = map(to_numpy, gauss.shift_rows(
            rows_d, cp.asarray(c0), squares=True, sumsq=True, split=True, q_column=True,
            ones=True))
        np.testing.assert_array_equal(both[:, :-2], np.hstack([rows - c0, (rows - c0) ** 2]))
        assert_close(q, ((rows - c0).astype(np.float64) ** 2).sum(1), dtype)
        # the moments' columns: |x'|^2 as sumsq has it, then ones
        np.testing.assert_array_equal(both[:, -2], q)
        np.testing.assert_array_equal(both[:, -1], 1.0)
        ones, _, _ = gauss.shift_rows(rows_d, cp.asarray(c0), ones=True)
        np.testing.assert_array_equal(ones.get(),
                                      np.hstack([rows - c0, np.ones((len(rows), 1))]))
        # the 'tf32x3' left operand [hi, hi, lo] of [x', x' * x']
        w = both.shape[1]
        hi, hi2, lo = split[:, :w], split[:, w:2 * w], split[:, 2 * w:]
        np.testing.assert_array_equal(hi, hi2)
        if dtype == np.float32:
            np.testing.assert_array_equal(hi.view(np.uint32) & np.uint32(0x1FFF), 0)
            np.testing.assert_array_equal(hi + lo, both)  # exact
            # hi is the nearest TF32 number: lo within half of hi's last kept bit
            assert np.all(np.abs(lo) <= np.spacing(np.abs(hi)) * 2.0**12)
        else:  # doubles are not split (their products stay IEEE)
            np.testing.assert_array_equal(hi, both)
            np.testing.assert_array_equal(lo, 0.0)


def test_tf32_precision_choice(cupy_backend, monkeypatch):
    """'tf32x3' by default for float32 (where the GPU has TF32, or its capability is
    unknown), 'tf32' where CuPy's own CUPY_TF32 asks, FASTLVM_CUPY_PRECISION over
    both, 'ieee' for float64 and below compute capability 8.0."""
    import types

    tf32, cupy = cupy_backend.tf32, cupy_backend.tf32.cupy
    choose = tf32.dot_precision
    assert choose(np.float64) == "ieee" and choose(np.float32) == "tf32x3"
    monkeypatch.setattr(cupy.cuda, "Device", lambda: types.SimpleNamespace(
        compute_capability="75"), raising=False)
    assert choose(np.float32) == "ieee"
    monkeypatch.setattr(cupy.cuda, "Device", lambda: types.SimpleNamespace(
        compute_capability="90"))
    assert choose(np.float32) == "tf32x3"
    monkeypatch.setenv("CUPY_TF32", "1")
    assert choose(np.float32) == "tf32"
    for value in tf32.PRECISIONS:
        monkeypatch.setenv("FASTLVM_CUPY_PRECISION", value)
        assert choose(np.float32) == value and choose(np.float64) == "ieee"
    monkeypatch.setenv("FASTLVM_CUPY_PRECISION", "bf16")
    with pytest.raises(ValueError, match="FASTLVM_CUPY_PRECISION='bf16'; use one of"):
        choose(np.float32)


def test_tf32_products_set_and_restore_cupys_compute_type(cupy_backend, monkeypatch):
    """Inside the block CuPy's float32 products are TF32; after it, exception or not,
    the compute type is what it was."""
    import types

    tf32, cupy = cupy_backend.tf32, cupy_backend.tf32.cupy
    state = {np.dtype(np.float32): 1}
    linalg = types.SimpleNamespace(
        COMPUTE_TYPE_TF32=7, get_compute_type=lambda dt: state[np.dtype(dt)],
        set_compute_type=lambda dt, ct: state.__setitem__(np.dtype(dt), ct))
    monkeypatch.setattr(cupy, "_core", types.SimpleNamespace(_routines_linalg=linalg),
                        raising=False)
    with tf32.tf32_products():
        assert state[np.dtype(np.float32)] == 7
    assert state[np.dtype(np.float32)] == 1
    with pytest.raises(RuntimeError), tf32.tf32_products():
        raise RuntimeError
    assert state[np.dtype(np.float32)] == 1
    seen = []
    monkeypatch.setattr(cupy, "matmul", lambda a, b: seen.append(state[np.dtype(np.float32)])
                        or np.matmul(a, b), raising=False)
    a, b = np.ones((3, 2), np.float32), np.ones((2, 4), np.float32)
    for precision, want in (("ieee", 1), ("tf32", 7), ("tf32x3", 7)):
        tf32.product(a, b, precision)
        assert seen.pop() == want


@pytest.mark.parametrize("transposed", [False, True])
def test_tf32x3_operands_give_float32_products(transposed, rng, cupy_backend):
    """[a_hi, a_hi, a_lo] [b_hi; b_lo; b_hi] is a b to float32 accuracy: the dropped
    a_lo b_lo is about 2^-22 of it (here the products are NumPy's, exact in
    float32; on a GPU each is TF32, whose inputs the split makes exact)."""
    tf32, gauss, cp = cupy_backend.tf32, cupy_backend.gauss, cupy_backend.cupy
    a = (rng.standard_normal((50, 24)) * 3).astype(np.float32)
    b_host = rng.standard_normal((24, 40)).astype(np.float32)
    b = cp.asarray(b_host)
    if transposed:
        b = cp.ascontiguousarray(b.T).T  # a transposed view, as coef.T is
    _, _, left = gauss.shift_rows(cp.asarray(a), cp.zeros(24, np.float32), split=True)
    got = tf32.product(left, tf32.right_operand(b, "tf32x3"), "tf32x3").get()
    b, b_device = b_host, b
    want = a.astype(np.float64) @ b.astype(np.float64)
    scale = np.abs(a).astype(np.float64) @ np.abs(b).astype(np.float64)
    # float32's own rounding over 3 x 24 terms; one dropped cross term is ~2^-12
    assert np.max(np.abs(got - want) / scale) < 32 * np.finfo(np.float32).eps
    hi, lo = map(to_numpy, tf32.split_tf32(b_device))
    np.testing.assert_array_equal(hi + lo, b)
    # one TF32 product of the same operands would be 2^-11 off; the split is not
    assert np.max(np.abs(hi.astype(np.float64) - b) / np.abs(b)) > 1e-5
    assert tf32.right_operand(b_device, "ieee") is b_device
    assert tf32.right_operand(b_device, "tf32") is b_device


@pytest.mark.parametrize("precision", ["ieee", "tf32"])
@pytest.mark.parametrize("covariance_type", ["tied", "diag", "spherical"])
def test_estep_chunks_at_each_precision(covariance_type, precision, rng, cupy_backend,
                                        monkeypatch):
    """The chunked path's float32 products at the precisions that are not the
    default: one product of the unsplit operands (on the emulator's NumPy-backed
    cupy a 'tf32' product is plain float32)."""
    monkeypatch.setenv("FASTLVM_CUPY_PRECISION", precision)
    _take_path(cupy_backend, "chunks", monkeypatch)
    X, w, means, pc = _problem(rng, (130, 6, 40), covariance_type, np.float32)
    got = cupy_backend.estep.estep_stats_cupy(cupy_backend.cupy.asarray(X), w, means, pc,
                                              covariance_type)
    assert_estep_matches_reference(got, X, w, means, pc, covariance_type, None, np.float32)
    p = cupy_backend.gauss.ExpandedParams(np.float32, means, pc, covariance_type)
    width = p.coef.shape[1] + 2  # the chunk's rows with their moments' columns
    assert p.right_operand("coef", "tf32x3", width) is p.right_operand("coef", "tf32x3", width)
    # zero rows meet the moments' columns: the log-densities do not see them
    padded = p.right_operand("coef", "ieee", width)
    np.testing.assert_array_equal(padded.get(), np.vstack([p.coef.get().T,
                                                           np.zeros((2, 40), np.float32)]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (9, 1), (3, 31), (17, 33), (40, 70)])
def test_log_responsibilities(shape, dtype, rng, cupy_backend):
    log_responsibilities_cupy = cupy_backend.log_resp.log_responsibilities_cupy
    V = (rng.standard_normal(shape) * 30 - 200).astype(dtype)
    log_resp, log_norm = map(to_numpy, log_responsibilities_cupy(cupy_backend.cupy.asarray(V)))
    assert log_resp.dtype == dtype and log_norm.dtype == dtype
    ref_resp, ref_norm = log_responsibilities_ref(V)
    np.testing.assert_allclose(ref_norm, logsumexp(V.astype(np.float64), axis=1), rtol=1e-12)
    assert_close(log_norm, ref_norm, dtype)
    assert_close(np.exp(log_resp.astype(np.float64)), np.exp(ref_resp), dtype, scale=1.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_log_responsibilities_infinities_nan_and_strides(dtype, cupy_backend):
    log_responsibilities_cupy = cupy_backend.log_resp.log_responsibilities_cupy
    big = np.finfo(dtype).max / 4
    V = np.array([
        [-np.inf, 0.0, -np.inf],          # one finite entry: exactly one
        [-np.inf, -np.inf, -np.inf],      # nothing can claim the row
        [big, big, -big],                 # huge magnitudes, no overflow
        [0.0, -1000.0, -np.inf],          # underflowing term is exactly zero
        [np.inf, 1.0, 0.0],               # +inf propagates as in v - logsumexp(v)
        [np.nan, 1.0, 0.0],               # NaN makes the row NaN
    ], dtype=dtype)
    with np.errstate(invalid="ignore", divide="ignore"):
        ref_resp, ref_norm = log_responsibilities_ref(V)
    cp = cupy_backend.cupy
    for view in (cp.asarray(V), cp.asarray(np.asfortranarray(V))):
        log_resp, log_norm = map(to_numpy, log_responsibilities_cupy(view))
        np.testing.assert_array_equal(np.isnan(log_norm), np.isnan(ref_norm))
        np.testing.assert_array_equal(np.isnan(log_resp), np.isnan(ref_resp))
        ok = ~np.isnan(ref_resp)
        np.testing.assert_allclose(np.exp(log_resp[ok].astype(np.float64)),
                                   np.exp(ref_resp[ok]), rtol=1e-6, atol=0)
        np.testing.assert_array_equal(np.exp(log_resp[0].astype(np.float64)), [0, 1, 0])
        assert log_norm[1] == -np.inf and log_norm[4] == np.inf


def test_emulator_rejects_wrong_element_types(cupy_backend):
    """A float64 array handed to a float kernel is an error, not a silent misread."""
    kernel = cupy_backend.gauss.ROW_KERNELS.function("row_sumsq", np.float32)
    cp = cupy_backend.cupy
    y, out = cp.ones((3, 2)), cp.empty(3, np.float32)
    args = (y, np.int64(3), np.int64(2), 1.0, out, np.int64(1), np.int64(0), out)
    with pytest.raises(TypeError, match="float32"):
        kernel((1,), (cupy_backend.source.THREADS_PER_BLOCK,), args)
    # and a host array where the kernel reads the device's memory
    with pytest.raises(TypeError, match="a NumPy array; CuPy launches take device"):
        kernel((1,), (cupy_backend.source.THREADS_PER_BLOCK,),
               (np.ones((3, 2), np.float32),) + args[1:])


# (n, D, K, q): n = 1, q = 1, q = D - 1, q on and off the 4-wide blocks and
# above a warp's 32 lanes, D above and below 32, rows past the last block of 8
MPPCA_SHAPES = [(1, 2, 1, 1), (7, 3, 2, 2), (45, 5, 1, 1), (37, 40, 3, 6), (21, 9, 5, 4),
                (13, 70, 2, 35)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", MPPCA_SHAPES)
def test_mppca_log_prob(shape, dtype, rng, cupy_backend):
    mppca_log_prob_cupy = cupy_backend.mppca_log_prob.mppca_log_prob_cupy
    X, _, means, comp, noise = mppca_problem(rng, shape, dtype)
    got = mppca_log_prob_cupy(cupy_backend.cupy.asarray(X), means, comp, noise)
    assert got.dtype == dtype and got.shape == (shape[0], shape[2])
    assert_close(got, mppca_log_prob_ref(X, means, comp, noise), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mppca_rows_on_the_subspace_take_the_exact_path(dtype, rng, cupy_backend):
    """|c|^2 - |u|^2 cancels for rows near component 0's subspace: the kernel's
    double recomputation from the explicit residual keeps the digits (without
    it, float32 keeps none here), and strided rows are read in place."""
    mppca_log_prob_cupy = cupy_backend.mppca_log_prob.mppca_log_prob_cupy
    n, d, q = 40, 10, 3
    comp = rng.standard_normal((2, q, d)) * 10
    means = np.array([np.full(d, 5.0), np.full(d, -5.0)])
    X = (rng.standard_normal((n, q)) @ comp[0] + means[0]
         + 1e-3 * rng.standard_normal((n, d))).astype(dtype)
    noise = np.array([1e-6, 1.0])
    got = mppca_log_prob_cupy(cupy_backend.cupy.asarray(np.asfortranarray(X)), means, comp,
                              noise)
    ref = mppca_log_prob_ref(X, means, comp, noise)
    np.testing.assert_allclose(got.get(), ref, rtol=1e-5 if dtype == np.float32 else 1e-11)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", MPPCA_SHAPES)
@pytest.mark.parametrize("block_diagonal", [True, False])
def test_mppca_stats(shape, dtype, weighted, block_diagonal, rng, cupy_backend, monkeypatch):
    """Both ways to sum r u u^T: the blocks of one product, and K products."""
    if not block_diagonal:
        monkeypatch.setattr(cupy_backend.mppca_stats, "BLOCK_DIAGONAL_MAX_K", 0)
    mppca_stats_cupy = cupy_backend.mppca_stats.mppca_stats_cupy
    X, w, means, comp, noise = mppca_problem(rng, shape, dtype)
    sw = (rng.random(shape[0]) * 2).astype(dtype) if weighted else None
    cp = cupy_backend.cupy
    got = mppca_stats_cupy(cp.asarray(X), w, means, comp, noise,
                           None if sw is None else cp.asarray(sw))
    assert isinstance(got[0], float)
    ref = mppca_stats_ref(X, w, means, comp, noise, sample_weight=sw)
    for name, a, b in zip(MPPCAStats._fields, got, ref):
        assert_close(a, b, dtype, err_msg=name)


def test_mppca_stats_over_many_chunks_and_zero_weights(rng, cupy_backend, monkeypatch):
    """Chunks of one row, a component of weight zero and rows of weight zero give
    the one-pass statistics."""
    low_rank, stats = cupy_backend.low_rank, cupy_backend.mppca_stats
    monkeypatch.setattr(low_rank, "CHUNK_ELEMENTS", 16)
    X, w, means, comp, noise = mppca_problem(rng, (23, 4, 3, 2), np.float64)
    w[1] = 0.0
    w /= w.sum()
    sw = rng.random(23)
    sw[::5] = 0.0
    assert low_rank.chunk_rows(low_rank.LowRankParams(np.float64, means, comp, noise)) == 1
    cp = cupy_backend.cupy
    got = stats.mppca_stats_cupy(cp.asarray(X), w, means, comp, noise, cp.asarray(sw))
    assert got[1][1] == 0.0 and not got[4][1].any()
    ref = mppca_stats_ref(X, w, means, comp, noise, sample_weight=sw)
    for name, a, b in zip(MPPCAStats._fields, got, ref):
        assert_close(a, b, np.float64, err_msg=name)


def _device(host):
    """``host`` as a device array, for a kernel of the emulator's own tests."""
    return fake_cupy.FakeCupyArray(host.copy())


def test_emulator_allows_branches_uniform_over_each_warp():
    source = """
template <typename T>
__global__ void per_warp(T* x, long long n) {
    if (threadIdx.x >= 32) x[threadIdx.x] = __shfl_xor_sync(0xffffffffu, x[threadIdx.x], 1);
}
"""
    kernel = cuda_emulator.EmulatedRawModule(source).get_function("per_warp<double>")
    x = _device(np.arange(64.0))
    kernel((1,), (64,), (x, np.int64(64)))
    swapped = np.arange(32.0, 64.0).reshape(16, 2)[:, ::-1].ravel()  # lane pairs exchanged
    np.testing.assert_array_equal(x.get(), np.concatenate([np.arange(32.0), swapped]))


def test_emulator_reports_divergent_barriers():
    source = """
template <typename T>
__global__ void diverge(T* x, long long n) {
    if (threadIdx.x < 16) x[threadIdx.x] = __shfl_xor_sync(0xffffffffu, x[threadIdx.x], 1);
}
"""
    module = cuda_emulator.EmulatedRawModule(source)
    kernel = module.get_function("diverge<double>")
    with pytest.raises(RuntimeError, match="different barriers"):
        kernel((1,), (32,), (_device(np.zeros(32)), np.int64(32)))


@pytest.mark.parametrize("barrier", ["", "__syncwarp();"])
def test_emulator_exposes_a_read_that_no_barrier_orders(barrier):
    """Each lane writes, then reads its neighbour's write: with __syncwarp between,
    every lane reads the new value; without, some lane reads the old one."""
    source = f"""
template <typename T>
__global__ void neighbour(T* x, T* y, long long n) {{
    const int lane = threadIdx.x & 31;
    x[threadIdx.x] = (T)threadIdx.x;
    {barrier}
    y[threadIdx.x] = x[(threadIdx.x & ~31) + ((lane + 1) & 31)];
}}
"""
    kernel = cuda_emulator.EmulatedRawModule(source).get_function("neighbour<double>")
    x, y = _device(np.full(64, -1.0)), _device(np.zeros(64))
    kernel((1,), (64,), (x, y, np.int64(64)))
    want = np.arange(64.0).reshape(2, 32)[:, np.r_[1:32, 0]].ravel()
    assert np.array_equal(y.get(), want) == bool(barrier)


@pytest.mark.parametrize("barrier", ["", "__syncthreads();"])
def test_emulator_syncthreads_orders_shared_memory_across_warps(barrier):
    """Each thread writes its slot of a __shared__ array, then reads the slot of the
    thread 32 on (another warp): with __syncthreads between, every read is fresh;
    without, some thread reads the slot before it is written."""
    source = f"""
template <typename T>
__global__ void across(T* y, long long n) {{
    __shared__ double slot[96];
    slot[threadIdx.x] = -1.0;
    __syncthreads();
    slot[threadIdx.x] = (double)threadIdx.x + 1000.0 * blockIdx.x;
    {barrier}
    y[blockIdx.x * 96 + threadIdx.x] = (T)slot[(threadIdx.x + 32) % 96];
    __syncthreads();
}}
"""
    kernel = cuda_emulator.EmulatedRawModule(source).get_function("across<double>")
    y = _device(np.zeros(2 * 96))
    kernel((2,), (96,), (y, np.int64(96)))
    want = (np.arange(96.0)[(np.arange(96) + 32) % 96] + 1000.0 * np.repeat([0, 1], 96)
            .reshape(2, 96)).ravel()
    assert np.array_equal(y.get(), want) == bool(barrier)


def test_emulator_reports_threads_that_leave_a_block_barrier_waiting():
    source = """
template <typename T>
__global__ void leave(T* x, long long n) {
    if (threadIdx.x >= 32) return;
    __syncthreads();
    x[threadIdx.x] = 1.0;
}
"""
    kernel = cuda_emulator.EmulatedRawModule(source).get_function("leave<double>")
    with pytest.raises(RuntimeError, match="waited at __syncthreads"):
        kernel((1,), (64,), (_device(np.zeros(64)), np.int64(64)))


@pytest.mark.parametrize("sources", ["gauss.ROW_KERNELS", "mstep.MSTEP_KERNELS",
                                     "tiles.ESTEP_KERNELS"])
def test_module_compiles_every_kernel_of_the_source(sources, cupy_backend):
    module, attribute = sources.split(".")
    source = getattr(getattr(cupy_backend, module), attribute)
    names = cuda_emulator.kernel_signatures(source.text())
    assert set(names) == set(source.kernel_names)
    assert source.name_expressions() == [f"{k}<{t}>" for k in source.kernel_names
                                         for t in ("float", "double")]
    for expression in source.name_expressions():  # every instantiation is there to call
        cuda_emulator.EmulatedRawModule(source.text()).get_function(expression)


def _far_rows(X):
    """X's (3) rows 2^30 elements apart, the third at element 2^31: a strided view over
    storage whose untouched pages the operating system never backs (8 GiB of address
    space, a few pages of memory), as a device array (``cupy.asarray`` would copy,
    backing it all)."""
    n, d = X.shape
    size = (n - 1) * 2**30 + d
    try:
        storage = untouched_storage(size, X.dtype)
    except MemoryError as exc:
        pytest.skip(f"cannot reserve {size * X.itemsize / 2**30:.0f} GiB: {exc}")
    far = np.lib.stride_tricks.as_strided(storage, (n, d), (2**30 * X.itemsize, X.itemsize))
    far[:] = X
    return fake_cupy.FakeCupyArray(far)


@pytest.mark.parametrize("path", ["tiles", "chunks"])
@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_kernels_read_rows_past_2_31_elements(covariance_type, path, rng, cupy_backend,
                                              monkeypatch):
    """The CUDA kernels index X in 64 bits (``long long``): rows whose offsets pass
    2^31 elements are read in place, by the log-density, both E-step paths and the
    low-rank kernel (tests/kernels/test_triton_offsets.py does the same for Triton)."""
    calls = _take_path(cupy_backend, path, monkeypatch)
    X, w, means, pc = _problem(rng, (3, 5, 2), covariance_type, np.float32)
    far = _far_rows(X)
    got = cupy_backend.log_prob.gaussian_log_prob_cupy(far, means, pc, covariance_type)
    assert_close(got, gaussian_log_prob_ref(X, means, pc, covariance_type), np.float32)
    got = cupy_backend.estep.estep_stats_cupy(far, w, means, pc, covariance_type)
    assert_estep_matches_reference(got, X, w, means, pc, covariance_type, None, np.float32)
    assert len(calls) == (path == "tiles")
    Xm, _, mu, comp, noise = mppca_problem(rng, (3, 6, 2, 2), np.float32)
    assert_close(cupy_backend.mppca_log_prob.mppca_log_prob_cupy(_far_rows(Xm), mu, comp, noise),
                 mppca_log_prob_ref(Xm, mu, comp, noise), np.float32)


@pytest.mark.parametrize("covariance_type", ["tied", "diag", "spherical"])
def test_estep_moments_of_separated_clusters(covariance_type, rng, cupy_backend):
    X, w, means, pc = separated_float32_problem(rng, covariance_type)
    got = cupy_backend.estep.estep_stats_cupy(cupy_backend.cupy.asarray(X), w, means, pc,
                                              covariance_type, None)
    assert_estep_matches_reference(got, X, w, means, pc, covariance_type, None, np.float32)


@pytest.mark.parametrize("covariance_type", ["tied", "diag", "spherical"])
def test_log_prob_and_log_norm_of_separated_clusters(covariance_type, rng, cupy_backend):
    """The same float32 means 1000 deviations apart through the log-density matrix
    (its chunks computed in float64, written back as float32) and the rows'
    log-normalisers (``score_samples``)."""
    X, w, means, pc = separated_float32_problem(rng, covariance_type)
    Xd = cupy_backend.cupy.asarray(X)
    out = cupy_backend.log_prob.gaussian_log_prob_cupy(Xd, means, pc, covariance_type,
                                                       np.log(w))
    assert out.dtype == np.float32
    assert_mixture_density_matches(out.get(), X, w, means, pc, covariance_type)
    params = cupy_backend.gauss.ExpandedParams(X.dtype, means, pc, covariance_type, np.log(w))
    assert params.dtype == np.float64
    norm, ll = cupy_backend.gauss.log_norm(Xd, params)
    assert norm.dtype == np.float32
    want = logsumexp(gaussian_log_prob_ref(X, means, pc, covariance_type) + np.log(w), axis=1)
    assert_close(norm, want, np.float32)
    assert_close(ll, want.sum(), np.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_public_kernels_take_cupy_arrays_to_the_cupy_backend(covariance_type, dtype, rng,
                                                            cupy_backend):
    """``fastlvm.kernels``' functions on cupy arrays, with no backend asked for: the
    dispatch sends them to CuPy (its checks of X and the parameters on the way), and
    the results are device arrays, the references' numbers."""
    from fastlvm import kernels

    cp = cupy_backend.cupy
    X, w, means, pc = _problem(rng, (50, 5, 3), covariance_type, dtype)
    sw = rng.random(50).astype(dtype)
    Xd = cp.asarray(X)
    log_prob = kernels.gaussian_log_prob(Xd, means, pc, covariance_type)
    assert isinstance(log_prob, cp.ndarray)
    assert_close(log_prob, gaussian_log_prob_ref(X, means, pc, covariance_type), dtype)
    resp = kernels.log_responsibilities(log_prob)
    assert all(isinstance(a, cp.ndarray) for a in resp)
    for a, b in zip(resp, log_responsibilities_ref(log_prob.get())):
        assert_close(a, b, dtype, scale=1.0)
    got = kernels.estep_stats(Xd, w, means, pc, covariance_type, sample_weight=cp.asarray(sw))
    assert all(isinstance(a, cp.ndarray) for a in got[1:])
    assert_estep_matches_reference(got, X, w, means, pc, covariance_type, sw, dtype)
    Xm, wm, mu, comp, noise = mppca_problem(rng, (40, 6, 2, 2), dtype)
    Xmd = cp.asarray(Xm)
    assert_close(kernels.mppca_log_prob(Xmd, mu, comp, noise),
                 mppca_log_prob_ref(Xm, mu, comp, noise), dtype)
    stats = kernels.mppca_stats(Xmd, wm, mu, comp, noise)
    for name, a, b in zip(MPPCAStats._fields, stats, mppca_stats_ref(Xm, wm, mu, comp, noise)):
        assert_close(a, b, dtype, err_msg=name)
    bad = Xd.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or infinity"):
        kernels.estep_stats(bad, w, means, pc, covariance_type)
