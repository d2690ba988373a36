import numpy as np
import pytest

from fastlvm.kernels import kmeans_potentials, lloyd_step, min_sq_dist
from fastlvm.kernels.kmeans import IMPLEMENTATIONS
from fastlvm.kernels.kmeans._reference import (kmeans_potentials_ref, lloyd_step_ref,
                                               min_sq_dist_ref)
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


def test_bad_centers():
    with pytest.raises(ValueError, match="centers must have shape"):
        lloyd_step(np.zeros((3, 2)), np.zeros((2, 3)))
