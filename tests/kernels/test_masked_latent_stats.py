import numpy as np
import pytest

from fastlvm.kernels.masked_latent_stats import (IMPLEMENTATIONS, POSTERIOR_IMPLEMENTATIONS,
                                                 MaskedLatentStats, masked_latent_stats,
                                                 masked_latent_stats_ref, masked_posterior,
                                                 masked_posterior_ref, masked_row_posterior)
from tests.conftest import (DTYPES, assert_same_bits_across_thread_counts, backend_arrays,
                            to_numpy)
from tests.tolerances import assert_close

# (n_samples, n_features, q, fraction missing): n = 1, q = D - 1, complete data,
# rows with a single observed entry, n not a multiple of the 128-row block
SHAPES = [(1, 2, 1, 0.3), (7, 3, 2, 0.5), (300, 9, 4, 0.3), (257, 6, 1, 0.0),
          (129, 12, 5, 0.8)]


def problem(rng, shape, dtype):
    n, d, q, frac = shape
    X = (rng.standard_normal((n, q)) @ rng.standard_normal((q, d)) * 2
         + rng.standard_normal((n, d)) + 7.0)
    missing = rng.random((n, d)) < frac
    missing[np.arange(n), rng.integers(0, d, n)] = False  # every row keeps one entry
    X[missing] = np.nan
    mean = np.full(d, 7.0) + rng.standard_normal(d) * 0.1
    return (X.astype(dtype), mean, rng.standard_normal((q, d)), rng.random(d) + 0.3)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("backend", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(weighted, backend, dtype, shape, rng, monkeypatch):
    X, mean, comp, noise = problem(rng, shape, dtype)
    sw = rng.random(shape[0]) * 2 if weighted else None
    Xb, swb = backend_arrays(backend, X, sw)
    monkeypatch.setenv("FASTLVM_BACKEND", backend)
    got = masked_latent_stats(Xb, mean, comp, noise, sample_weight=swb)
    for value in got[1:]:  # the arrays come back where X is
        assert type(value) is type(Xb)
    ref = masked_latent_stats_ref(X, mean, comp, noise, sample_weight=sw)
    for name, a, b in zip(MaskedLatentStats._fields, got, ref):
        # float64 arithmetic on either dtype: the float64 tolerance applies
        assert_close(to_numpy(a), b, np.float64, err_msg=name)


@pytest.mark.parametrize("backend", sorted(POSTERIOR_IMPLEMENTATIONS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_posterior_matches_reference(backend, dtype, shape, rng, monkeypatch):
    X, mean, comp, noise = problem(rng, shape, dtype)
    Xb, = backend_arrays(backend, X)
    monkeypatch.setenv("FASTLVM_BACKEND", backend)
    got = masked_posterior(Xb, mean, comp, noise)
    ref = masked_posterior_ref(X, mean, comp, noise)
    for name, a, b in zip(["log_prob", "z"], got, ref):
        assert type(a) is type(Xb)
        assert_close(to_numpy(a), b, np.float64, err_msg=name)


@pytest.mark.parametrize("backend", ["triton", "cupy"])
def test_device_chunks_add_up(backend, rng, monkeypatch):
    """The device backend takes its rows in chunks of CHUNK_NUMBERS /
    max(D, (q + 1)^2); chunks of a few rows give the statistics of one."""
    from fastlvm.kernels.masked_latent_stats import _device

    X, mean, comp, noise = problem(rng, (50, 5, 2, 0.4), np.float64)
    Xb, = backend_arrays(backend, X)
    monkeypatch.setenv("FASTLVM_BACKEND", backend)
    whole = masked_latent_stats(Xb, mean, comp, noise)
    whole_posterior = masked_posterior(Xb, mean, comp, noise)
    monkeypatch.setattr(_device, "CHUNK_NUMBERS", 7 * 9)  # 7 rows a chunk
    for name, a, b in zip(MaskedLatentStats._fields, masked_latent_stats(Xb, mean, comp, noise),
                          whole):
        assert_close(to_numpy(a), to_numpy(b), np.float64, err_msg=name)
    for a, b in zip(masked_posterior(Xb, mean, comp, noise), whole_posterior):
        assert_close(to_numpy(a), to_numpy(b), np.float64)


def test_posterior_matches_reference_and_the_marginal_density(rng):
    from scipy.stats import multivariate_normal

    X, mean, comp, noise = problem(rng, (60, 7, 3, 0.4), np.float64)
    log_p, z = masked_posterior(X, mean, comp, noise)
    cov = comp.T @ comp + np.diag(noise)
    for x, lp, zz in zip(X, log_p, z):
        o = ~np.isnan(x)
        assert np.isclose(lp, multivariate_normal(mean[o], cov[np.ix_(o, o)]).logpdf(x[o]),
                          rtol=1e-12)
        np.testing.assert_allclose(zz, masked_row_posterior(x, mean, comp, noise)[1],
                                   rtol=1e-10, atol=1e-12)


def test_complete_rows_add_to_the_totals(rng):
    X, mean, comp, noise = problem(rng, (500, 8, 3, 0.2), np.float64)
    whole = masked_latent_stats(X, mean, comp, noise)
    parts = [masked_latent_stats(X[i:i + 100], mean, comp, noise) for i in range(0, 500, 100)]
    for j, name in enumerate(MaskedLatentStats._fields):
        assert_close(sum(p[j] for p in parts), whole[j], np.float64, err_msg=name)


def test_deterministic_across_thread_counts_and_groups(rng, monkeypatch):
    """The same bits with any thread count, and with the blocks' partials merged
    a couple of blocks at a time (add_partials) as with the default groups."""
    import fastlvm._config

    X, mean, comp, noise = problem(rng, (5000, 9, 3, 0.3), np.float32)
    assert_same_bits_across_thread_counts(lambda: masked_latent_stats(X, mean, comp, noise))
    default = masked_latent_stats(X, mean, comp, noise)
    monkeypatch.setattr(fastlvm._config, "TILES_PER_GROUP", 1)
    for a, b in zip(default, masked_latent_stats(X, mean, comp, noise)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("X, match", [
    (np.array([[np.nan, np.nan, np.nan], [1.0, 2.0, 3.0]]), "every entry missing"),
    (np.array([[np.inf, 1.0, 1.0], [1.0, 2.0, 3.0]]), "infinity"),
])
def test_bad_rows_are_named(X, match):
    with pytest.raises(ValueError, match=match):
        masked_latent_stats(X, np.zeros(3), np.ones((1, 3)), np.ones(3))


def test_torch_device_chunks_wait_for_nothing(rng, monkeypatch):
    """The torch side of the device backend reads nothing back to the host inside
    its chunk loop: no factorisation raising on its status (``linalg.inv`` does,
    a synchronisation per chunk on a GPU), which a CUDA graph's capture refuses as
    well (``tests/torch_graphs.py``); the posteriors match the unrecorded run."""
    torch = pytest.importorskip("torch")
    from fastlvm.kernels.masked_latent_stats import _device
    from tests import torch_graphs

    X, mean, comp, noise = problem(rng, (50, 5, 2, 0.4), np.float64)
    Xt = torch.as_tensor(X)
    monkeypatch.setattr(_device, "CHUNK_NUMBERS", 7 * 9)  # 7 rows a chunk
    out = []
    torch_graphs.record(lambda: out.extend(
        _device.masked_posterior_device(Xt, mean, comp, noise)))
    for a, b in zip(out, masked_posterior_ref(X, mean, comp, noise)):
        assert_close(a.numpy(), b, np.float64)
