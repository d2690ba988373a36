import numpy as np
import pytest

from fastlvm.kernels import kmeans_potentials, label_stats, lloyd_step, min_sq_dist
from fastlvm.kernels.kmeans import IMPLEMENTATIONS
from fastlvm.kernels.kmeans._reference import (kmeans_potentials_ref, label_stats_ref,
                                               lloyd_step_ref, min_sq_dist_ref)
from tests.conftest import DTYPES
from tests.tolerances import assert_close


@pytest.mark.parametrize("backend", ["reference", "numba"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1), (9, 2, 3), (1001, 7, 5), (200, 4, 4)])
def test_kmeans_kernels_match_reference(backend, dtype, shape, rng, monkeypatch):
    n, d, k = shape
    X = (rng.standard_normal((n, d)) + 5).astype(dtype)
    centers = X[rng.integers(0, n, k)].astype(np.float64)
    sw = rng.random(n)
    monkeypatch.setenv("FASTLVM_BACKEND", backend)
    labels, inertia, counts, sums = lloyd_step(X, centers, sw)
    r = lloyd_step_ref(X, centers.astype(dtype), sw)
    # labels may differ only where two centers are (numerically) equidistant
    d2 = np.square(X[:, None, :].astype(float) - centers[None].astype(dtype)).sum(-1)
    best = d2[np.arange(n), r[0]]
    assert np.all(np.isclose(d2[np.arange(n), labels], best, rtol=1e-5))
    assert_close(inertia, r[1], dtype)
    if np.array_equal(labels, r[0]):
        assert_close(counts, r[2], dtype)
        assert_close(sums, r[3], dtype)
    closest = min_sq_dist(X, centers[0])
    assert_close(closest, min_sq_dist_ref(X.astype(float), centers[0].astype(dtype)), dtype,
                 scale=1.0 + float(closest.max()))
    pots = kmeans_potentials(X, centers, closest, sw)
    assert_close(pots, kmeans_potentials_ref(X, centers.astype(dtype), closest, sw), dtype)
    assert set(IMPLEMENTATIONS["lloyd_step"]) == {"reference", "numba"}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 257, 4099])
def test_running_distance_with_a_minimum_and_in_place(dtype, n, rng):
    """min_sq_dist with ``closest_sq`` (k-means++'s running distance, the
    potentials kernel writing each row's minimum out), against the reference;
    k-means++ passes the running distance as its own output, which must give
    the same values (each row is read before it is written)."""
    from fastlvm.kernels.kmeans._numba import min_sq_dist_numba

    X = (rng.standard_normal((n, 5)) * 3).astype(dtype)
    first, second = X[0].astype(np.float64), rng.standard_normal(5)
    closest = min_sq_dist(X, first)
    expected = min_sq_dist_ref(X.astype(float), second.astype(dtype), closest)
    assert_close(min_sq_dist(X, second, closest), expected, dtype,
                 scale=1.0 + float(expected.max()))
    in_place = closest.copy()
    assert min_sq_dist_numba(X, second, in_place, out=in_place) is in_place
    np.testing.assert_array_equal(in_place, min_sq_dist(X, second, closest))
    assert np.all(in_place <= closest)


def test_bad_centers():
    with pytest.raises(ValueError, match="centers must have shape"):
        lloyd_step(np.zeros((3, 2)), np.zeros((2, 3)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_lloyd_labels_equal_reference_and_ties_go_to_the_lowest_center(dtype, rng):
    """Small integer coordinates make every squared distance exact, so the
    labels must equal the reference's argmin exactly, ties included: center 3
    duplicates center 1 and center 4 is equidistant from many rows to center
    0, and the lower index must win each time (a strict < in the argmin)."""
    X = rng.integers(-3, 4, (2003, 3)).astype(dtype)
    centers = np.array([[0, 0, 0], [2, 2, 2], [-2, 1, 0], [2, 2, 2], [0, 0, 2]],
                       dtype=np.float64)
    labels, inertia, counts, sums = lloyd_step(X, centers)
    r = lloyd_step_ref(X, centers.astype(dtype))
    np.testing.assert_array_equal(labels, r[0])
    d2 = np.square(X[:, None, :].astype(float) - centers[None]).sum(-1)
    np.testing.assert_array_equal(labels, d2.argmin(axis=1))
    tied = (d2[:, 0] == d2[:, 4]) & (d2[:, 0] == d2.min(axis=1))
    assert not np.any(labels == 3) and tied.sum() > 50 and np.all(labels[tied] == 0)
    np.testing.assert_array_equal(counts, r[2])
    np.testing.assert_allclose(sums, r[3], rtol=0, atol=0)
    assert inertia == pytest.approx(float(d2.min(axis=1).sum()), rel=1e-12)


def test_many_tiles_give_the_same_bits_whatever_the_groups_and_threads(rng, monkeypatch):
    """Per-tile partials are merged a group of tiles at a time (add_partials);
    over ~100 tiles, groups of one tile per thread and any thread count must
    give the default's bits, and the sums must match the reference."""
    import fastlvm._config
    from tests.conftest import assert_same_bits_across_thread_counts

    X = rng.standard_normal((60_001, 3)) + 5
    centers = X[rng.choice(len(X), 4, replace=False)]
    sw = rng.random(len(X))
    closest = min_sq_dist(X, centers[0])

    def run():
        labels, inertia, counts, sums = lloyd_step(X, centers, sw)
        return labels, np.array([inertia]), counts, sums, kmeans_potentials(X, centers,
                                                                            closest, sw)

    default = run()
    monkeypatch.setattr(fastlvm._config, "TILES_PER_GROUP", 1)
    for a, b in zip(default, run()):
        np.testing.assert_array_equal(a, b)
    assert_same_bits_across_thread_counts(run)
    r = lloyd_step_ref(X, centers, sw)
    np.testing.assert_array_equal(default[0], r[0])
    np.testing.assert_allclose(default[2], r[2], rtol=1e-12)
    np.testing.assert_allclose(default[3], r[3], rtol=1e-12)
    np.testing.assert_allclose(default[4], kmeans_potentials_ref(X, centers, closest, sw),
                               rtol=1e-12)


COVARIANCE_TYPES = ["full", "tied", "diag", "spherical"]


@pytest.mark.parametrize("backend", ["reference", "numba"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1), (9, 2, 3), (1001, 7, 5), (2500, 33, 4)])
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_label_stats_match_reference(backend, dtype, shape, covariance_type, rng, monkeypatch):
    """Counts, sums and second moments of hard labels against the one-hot
    reference in float64: data far from the origin around centers near it
    (the differences are taken in float64), sample weights, the last cluster
    empty, no labels (every row in cluster 0), and no centers (no second
    moments)."""
    n, d, k = shape
    X = (rng.standard_normal((n, d)) * 3 + 100).astype(dtype)
    labels = rng.integers(0, max(1, k - 1), n)
    centers = rng.standard_normal((k, d)) + 100
    sw = rng.random(n)
    monkeypatch.setenv("FASTLVM_BACKEND", backend)
    nk, sum_x, second = label_stats(X, labels, k, centers, covariance_type, sw)
    want = label_stats_ref(X, labels, k, centers, covariance_type, sw)
    for name, got, ref in zip(("nk", "sum_x", "second_moment"), (nk, sum_x, second), want):
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12 * np.abs(ref).max(),
                                   err_msg=name)
    if k > 1:
        assert nk[-1] == 0 and not sum_x[-1].any()
    nk1, sum_x1, second1 = label_stats(X, None, k, centers, covariance_type, sw)
    for got, ref in zip((nk1, sum_x1, second1),
                        label_stats_ref(X, None, k, centers, covariance_type, sw)):
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12 * np.abs(ref).max())
    assert nk1[0] == pytest.approx(sw.sum()) and not nk1[1:].any()
    nk0, sum_x0, none = label_stats(X, labels, k, None, covariance_type)
    assert none is None
    np.testing.assert_allclose(nk0, np.bincount(labels, minlength=k))
    np.testing.assert_allclose(sum_x0, label_stats_ref(X, labels, k, None, covariance_type)[1],
                               rtol=1e-12, atol=1e-12 * 100 * n)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_label_stats_give_the_same_bits_whatever_the_groups_and_threads(covariance_type, rng,
                                                                       monkeypatch):
    """Per-run partials merged in run order: groups of one run per thread and
    any thread count give the default's bits (~60 blocks of rows)."""
    import fastlvm._config
    from tests.conftest import assert_same_bits_across_thread_counts

    X = rng.standard_normal((60_001, 5)) + 5
    labels = rng.integers(0, 3, len(X))
    centers = rng.standard_normal((3, 5)) + 5
    sw = rng.random(len(X))

    def run():
        return label_stats(X, labels, 3, centers, covariance_type, sw)

    default = run()
    monkeypatch.setattr(fastlvm._config, "TILES_PER_GROUP", 1)
    for a, b in zip(default, run()):
        np.testing.assert_array_equal(a, b)
    assert_same_bits_across_thread_counts(run)


@pytest.mark.parametrize("kwargs, match", [
    (dict(labels=np.array([0, 1, 3])), r"labels must lie in \[0, n_clusters=3\)"),
    (dict(labels=np.array([0, -1, 1])), r"labels must lie in"),
    (dict(labels=np.array([0, 1])), r"labels must be integers of shape \(3,\)"),
    (dict(labels=np.array([0.0, 1.0, 2.0])), r"labels must be integers"),
    (dict(n_clusters=0), r"n_clusters must be an integer >= 1"),
    (dict(centers=np.zeros((2, 2))), r"centers must have shape \(3, 2\)"),
    (dict(centers=np.full((3, 2), np.nan)), r"centers contains NaN"),
    (dict(covariance_type="banana"), r"covariance_type must be one of"),
])
def test_label_stats_bad_input(kwargs, match):
    args = {"labels": np.array([0, 1, 2]), "n_clusters": 3, "centers": None,
            "covariance_type": "full"}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        label_stats(np.zeros((3, 2)), args["labels"], args["n_clusters"], args["centers"],
                    args["covariance_type"])


@pytest.mark.parametrize("array", ["numpy", "torch"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_mean_variance_far_from_the_origin(dtype, array, rng):
    """k-means' tolerance scale (the mean per-feature variance), against NumPy in
    float64, for data offset by 1e4: host arrays through the label-statistics
    kernel, device arrays (here torch CPU tensors) in chunks of 1000 rows."""
    from fastlvm.mixture._initialization import mean_variance

    X = (rng.standard_normal((5003, 7)) * 2 + 1e4).astype(dtype)
    want = X.astype(np.float64).var(axis=0).mean()
    if array == "torch":
        torch = pytest.importorskip("torch")
        got = mean_variance(torch.from_numpy(X), chunk=1000)
    else:
        got = mean_variance(X)
    assert got == pytest.approx(want, rel=1e-10)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_initial_statistics_of_labels_agree_on_host_and_device_paths(covariance_type, rng):
    """``stats_from_labels``: the one-hot path that device arrays take (here torch
    CPU tensors, over several chunks) and the host kernel give the same sums."""
    torch = pytest.importorskip("torch")
    from fastlvm.mixture._initialization import stats_from_labels

    X = rng.standard_normal((500, 4)) + 3
    labels = rng.integers(0, 3, 500)
    centers = rng.standard_normal((3, 4)) + 3
    sw = rng.random(500)
    device = stats_from_labels(torch.from_numpy(X), torch.from_numpy(labels), 3,
                               torch.from_numpy(centers), covariance_type,
                               torch.from_numpy(sw), chunk=128)
    host = stats_from_labels(X, labels, 3, centers, covariance_type, sw)
    for a, b in zip(device, host):
        np.testing.assert_allclose(a.numpy(), b, rtol=1e-12, atol=1e-12)


def test_fewer_distinct_clusters_than_asked_warns_as_sklearn(rng):
    """Duplicate rows leave clusters empty: the 'kmeans' start warns with
    sklearn's KMeans message and category, on the host and device k-means and
    in a fit, as sklearn's GaussianMixture does; k-means++ alone does not."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture as SklearnGaussianMixture

    from fastlvm import GaussianMixture, MixtureOfPPCA
    from fastlvm.mixture import _device_kmeans, _initialization

    X = np.repeat(rng.standard_normal((3, 2)), 20, axis=0)
    message = (r"Number of distinct clusters \(3\) found smaller than n_clusters \(5\). "
               r"Possibly due to duplicate points in X.")
    calls = [lambda: _initialization.kmeans(X, 5, np.random.RandomState(0)),
             lambda: GaussianMixture(5, random_state=0).fit(X),
             lambda: SklearnGaussianMixture(5, random_state=0).fit(X),
             lambda: MixtureOfPPCA(5, n_latent=1, random_state=0).fit(np.hstack([X, X]))]
    torch = pytest.importorskip("torch")
    calls.append(lambda: _device_kmeans.kmeans(torch.as_tensor(X), 5,
                                               np.random.RandomState(0)))
    for call in calls:
        with pytest.warns(ConvergenceWarning, match=message):
            call()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        _initialization.kmeans(X, 3, np.random.RandomState(0))  # three distinct: no warning
        GaussianMixture(5, init_params="k-means++", random_state=0).fit(X)
