"""The design's promise in memory: a fit never holds an n_samples x n_components
array, only O(n_samples) vectors and chunk-sized blocks.

Measured with tracemalloc, which sees every NumPy array the drivers allocate
and the Numba kernels' own scratch (Numba's allocator reports to it).  With K
= 32 components an (n, K) float64 array is 32 "n-vectors" of 8 n bytes; the
fits below stay under 4 (the k-means++ seeding's distances and running sums,
the labels; 5 with sample weights, which fit in units of a row) and the
predictions under 6 (their own (n,) results).  Rows come in
chunks of 2,048, so chunk-sized blocks are small beside n = 100,000."""

import tracemalloc
import warnings

import numpy as np
import pytest

import fastlvm

N, K = 100_000, 32
N_VECTOR = 8 * N  # bytes of one float64 value per row

CASES = [("GaussianMixture", dict(covariance_type=c)) for c in
         ("full", "tied", "diag", "spherical")] + [
    ("GaussianMixture", dict(init_params="random")),
    ("GaussianMixture", dict(prior={})),
    ("BayesianGaussianMixture", {}),
    ("MixtureOfPPCA", dict(n_latent=2)),
]


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((N, 4))
    X[: N // 2] += 3.0
    return X, rng.random(N)


def _peak(call):
    """(bytes at the traced peak of ``call()`` above what was held before it, its result)."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        result = call()
        return tracemalloc.get_traced_memory()[1] - before, result
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("name, params", CASES)
@pytest.mark.parametrize("weighted", [False, True])
def test_mixture_fit_and_predictions_hold_no_n_by_k_array(name, params, weighted, data):
    X, w = data
    sw = w if weighted else None

    def make():
        return getattr(fastlvm, name)(n_components=K, max_iter=3, random_state=0,
                                      chunk_size=2048, **params)

    methods = ("score_samples", "predict", "score")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 3 iterations do not converge
        # every kernel compiled (or loaded from Numba's cache) before measuring:
        # compiling allocates many Python objects
        small = make().fit(X[:3000], sample_weight=None if sw is None else sw[:3000])
        for method in methods:
            getattr(small, method)(X[:3000])
        fit_peak, model = _peak(lambda: make().fit(X, sample_weight=sw))
    # weighted maximum-likelihood fits hold their weights in units of a row
    # (fastlvm._sample_weight.in_row_units): a copy, the caller's array is
    # never written
    budget = 5 if weighted else 4
    assert fit_peak < budget * N_VECTOR, f"fit held {fit_peak / N_VECTOR:.1f} n-vectors"
    for method in methods:
        peak, _ = _peak(lambda: getattr(model, method)(X))
        assert peak < 6 * N_VECTOR, f"{method} held {peak / N_VECTOR:.1f} n-vectors"


@pytest.mark.parametrize("name, params", [("PPCA", {}), ("PPCA", dict(method="em")),
                                          ("FactorAnalysis", {})])
def test_latent_linear_fit_holds_no_vector_of_rows(name, params, data):
    X, _ = data
    model = getattr(fastlvm, name)(n_components=2, max_iter=3, chunk_size=2048, **params)
    methods = ("score_samples", "transform")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(X[:3000])  # compiled first, as above
        for method in methods:
            getattr(model, method)(X[:3000])
        peak, model = _peak(lambda: model.fit(X))
    # no (n, D) mask of missing entries, no pass to score the fit (PPCA's closed form)
    assert peak < 0.4 * N_VECTOR, f"fit held {peak / N_VECTOR:.2f} n-vectors"
    for method in methods:
        peak, _ = _peak(lambda: getattr(model, method)(X))
        assert peak < 3 * N_VECTOR, f"{method} held {peak / N_VECTOR:.1f} n-vectors"


@pytest.mark.parametrize("name", ["GaussianMixture", "MixtureOfPPCA"])
def test_predictions_with_many_components_take_bounded_blocks(name):
    """With chunk_size left at None, the (rows, K) arrays of a prediction hold at
    most _config.BLOCK_BYTES each: at K = 256 a default chunk of 262,144 rows made
    537 MB arrays (a 150,000-row score_samples peaked near 0.9 GB)."""
    from fastlvm import _config

    rng = np.random.default_rng(0)
    X = rng.standard_normal((150_000, 3))
    params = dict(covariance_type="spherical") if name == "GaussianMixture" else dict(
        n_latent=1)
    model = getattr(fastlvm, name)(n_components=256, max_iter=1, init_params="random",
                                   random_state=0, **params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(X[:5000])
    model.score_samples(X[:100])
    peak, _ = _peak(lambda: model.score_samples(X))
    assert peak < 4 * _config.BLOCK_BYTES + 2 * 8 * X.shape[0], f"{peak / 2**20:.0f} MiB"
    assert model._block_rows() == _config.BLOCK_BYTES // (8 * 256)
    assert model.set_params(chunk_size=1000)._block_rows() == 1000


WIDE_CASES = [("PPCA", {}, False), ("PPCA", dict(method="em"), False), ("PPCA", {}, True),
              ("FactorAnalysis", {}, False), ("FactorAnalysis", {}, True),
              ("GaussianMixture", dict(covariance_type="tied", init_params="k-means++",
                                       prior={}), False),
              ("BayesianGaussianMixture", dict(covariance_type="diag"), False),
              ("MixtureOfPPCA", dict(n_latent=2, init_params="random"), False)]


@pytest.mark.parametrize("name, params, missing", WIDE_CASES)
def test_passes_over_wide_rows_copy_bounded_chunks(name, params, missing, monkeypatch):
    """With chunk_size left at None, a pass that copies rows to float64 (the mean
    and scatter, transform and score, the missing-data EM's start, the tied
    start's X^T X, a prior's data moments) copies at most
    _config.ROW_COPY_BYTES at a time: default chunks of 262,144 rows were 1.6 GB
    copies at D = 784.  Here the budget is shrunk to 1 MiB, below one
    default chunk of these rows (31 MiB)."""
    from fastlvm import _config

    rng = np.random.default_rng(0)
    X = rng.standard_normal((16_000, 256)).astype(np.float32)
    if missing:
        X[rng.random(X.shape) < 0.05] = np.nan
    k = dict(n_components=2) if "Mixture" in name else dict(n_components=3)
    make = lambda: getattr(fastlvm, name)(max_iter=2, random_state=0, **k, **params)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = make().fit(X[:2000])  # compiled first
        model.score_samples(X[:2000])
        monkeypatch.setattr(_config, "ROW_COPY_BYTES", 1 << 20)
        monkeypatch.setattr(_config, "BLOCK_BYTES", 1 << 20)
        fit_peak, model = _peak(lambda: make().fit(X))
    score_peak, _ = _peak(lambda: model.score_samples(X))
    # a few chunk-sized float64 arrays; D x D statistics and the kernels' per-thread
    # partials of them (the tied E-step's: 9 MiB); the (n,) results.  One float64
    # copy of X is 31 MiB (the fits peaked at 94 MiB with unbounded chunks).
    budget = 6 * (1 << 20) + 20 * 8 * 256 * 256 + 4 * 8 * X.shape[0]
    assert fit_peak < budget, f"fit peaked at {fit_peak / 2**20:.1f} MiB"
    assert score_peak < budget, f"score_samples peaked at {score_peak / 2**20:.1f} MiB"
    if name in ("PPCA", "FactorAnalysis"):
        peak, _ = _peak(lambda: model.transform(X))
        assert peak < budget + 8 * X.shape[0] * 3, f"transform peaked at {peak / 2**20:.1f} MiB"


def test_chunk_rows_default_and_override():
    from fastlvm import _config

    assert _config.chunk_rows(784) == _config.ROW_COPY_BYTES // (8 * 784)
    assert _config.chunk_rows(4) == _config.DEFAULT_CHUNK_ROWS
    assert _config.chunk_rows(10 ** 12) == 1
    assert _config.chunk_rows(784, chunk_size=3) == 3
    assert _config.chunk_rows(256, budget=1 << 20) == 512
    assert _config.chunk_rows(256, budget=1 << 20, itemsize=4) == 1024


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_streamed_chunks_stay_within_their_bytes(dtype):
    """``device=``'s two pinned and two device buffers hold at most
    _config.STREAM_CHUNK_BYTES each by default (at D = 784, float32, default chunks
    made them 822 MB each), and chunk_size rows where it is given."""
    pytest.importorskip("torch")
    from fastlvm import _config
    from fastlvm.mixture._streaming import HostRowStream

    wide = np.broadcast_to(np.zeros(784, dtype=dtype), (300_000, 784))  # no storage
    rows = HostRowStream(wide, None, "cpu", None).chunk_rows
    assert rows == _config.STREAM_CHUNK_BYTES // (784 * np.dtype(dtype).itemsize)
    narrow = np.broadcast_to(np.zeros(16, dtype=dtype), (300_000, 16))
    assert HostRowStream(narrow, None, "cpu", None).chunk_rows == _config.DEFAULT_CHUNK_ROWS
    assert HostRowStream(wide, None, "cpu", 1000).chunk_rows == 1000


def test_device_kmeans_copies_bounded_chunks(monkeypatch):
    """The device k-means (run here on NumPy rows, the code path CuPy takes) copies
    rows to float64 and forms distances a chunk at a time, each chunk's arrays
    within _config.ROW_COPY_BYTES: a centre's distances copied every row at once
    (10 GB at 10M x 128), and Lloyd's chunks of 2^25 / K rows were 2 GB copies at
    K = 16, D = 128.  Here the budget is shrunk to 1 MiB; one float64 copy of X
    is 31 MiB."""
    from fastlvm import _config
    from fastlvm.mixture import _device_kmeans

    rng = np.random.default_rng(0)
    X = rng.standard_normal((16_000, 256)).astype(np.float32)
    _device_kmeans.kmeans(X[:500], 3, np.random.RandomState(0))  # compiled first
    monkeypatch.setattr(_config, "ROW_COPY_BYTES", 1 << 20)
    peak, (labels, centers) = _peak(
        lambda: _device_kmeans.kmeans(X, 3, np.random.RandomState(0), max_iter=3))
    # a few chunk-sized float64 arrays and (n,) vectors (weights, distances, labels)
    budget = 6 * (1 << 20) + 8 * 8 * X.shape[0]
    assert peak < budget, f"k-means peaked at {peak / 2**20:.1f} MiB"
    assert labels.shape == (X.shape[0],) and centers.shape == (3, 256)


@pytest.mark.parametrize("weighted", [False, True])
def test_streamed_chunks_and_weights_go_through_the_pinned_buffers(weighted, monkeypatch):
    """The CUDA path of ``device=``'s stream, run on CPU tensors with the stream
    and event stand-ins: every chunk of rows, and of weights, is staged through a
    pinned buffer and copied on the side stream, so nothing waits for the work
    queued on the chunks before (each chunk's weights were a copy from pageable
    memory, which waits for it: the copies no longer overlapped the compute)."""
    torch = pytest.importorskip("torch")
    from fastlvm.mixture import _streaming
    from tests import torch_graphs

    torch_graphs.install(monkeypatch)
    monkeypatch.setattr(_streaming, "_stages_through_pinned_buffers", lambda device: True)
    monkeypatch.setattr(_streaming, "_pinned_empty",
                        lambda shape, dtype: torch.empty(shape, dtype=dtype))
    rng = np.random.default_rng(0)
    X = rng.standard_normal((1050, 3)).astype(np.float32)
    sw = rng.random(1050) if weighted else None
    stream = _streaming.HostRowStream(X, sw, "cpu", 200)
    seen = []
    with torch_graphs.counted_waits() as waits:
        for start, rows, weights in stream.chunks():
            total = rows.sum()  # the chunk's work, queued before the next chunk's copy
            seen.append((start, rows.clone(), None if weights is None else weights.clone()))
            total + 1
    assert [str(w) for w in waits] == []
    assert [s for s, _, _ in seen] == list(range(0, 1050, 200))
    for start, rows, weights in seen:
        np.testing.assert_array_equal(rows.numpy(), X[start:start + 200])
        if weighted:
            assert weights.dtype == torch.float32
            np.testing.assert_array_equal(weights.numpy(), sw[start:start + 200].astype(np.float32))
        else:
            assert weights is None
