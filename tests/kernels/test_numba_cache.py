"""The kernels' Numba cache is stamped with a hash of every kernel source, so
editing a shared helper recompiles the kernels that inline it."""

import numpy as np
import pytest

from fastlvm.kernels import _numba_cache


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_package_hash_follows_every_source_and_nothing_else(tmp_path):
    _write(tmp_path / "a.py", "x = 1\n")
    _write(tmp_path / "sub" / "b.py", "y = 2\n")
    before = _numba_cache.package_source_hash(str(tmp_path), ())
    _write(tmp_path / "__pycache__" / "c.py", "junk\n")  # caches do not count
    _write(tmp_path / "notes.txt", "not a source\n")
    assert _numba_cache.package_source_hash(str(tmp_path), ()) == before
    _write(tmp_path / "sub" / "b.py", "y = 3\n")  # a helper in another file changes
    assert _numba_cache.package_source_hash(str(tmp_path), ()) != before
    extra = tmp_path.parent / (tmp_path.name + "_config.py")
    _write(extra, "FLAGS = 1\n")
    assert (_numba_cache.package_source_hash(str(tmp_path), (str(extra),))
            != _numba_cache.package_source_hash(str(tmp_path), ()))


def test_kernel_cache_stamps_carry_the_package_hash():
    from numba.core.caching import NullCache

    from fastlvm.kernels import estep_stats
    from fastlvm.kernels._covariance import DIAG
    from fastlvm.kernels.estep_stats._numba import ESTEP_RUNS

    assert _numba_cache.REGISTERED
    X = np.random.default_rng(0).random((50, 3))
    estep_stats(X, np.full(2, 0.5), X[:2], np.ones((2, 3)), "diag")  # compiles (or loads)
    cache = ESTEP_RUNS[DIAG]._cache  # the compiled kernel (one per covariance type)
    if isinstance(cache, NullCache):
        pytest.skip("Numba caching is off (FASTLVM_NUMBA_CACHE=0)")
    locator = cache._impl._locator
    assert type(locator).__name__.startswith("Package")
    _, package_hash = locator.get_source_stamp()  # (own file's hash, package hash)
    assert package_hash == _numba_cache.package_source_hash()


def test_functions_outside_the_package_keep_numbas_locators(tmp_path):
    from numba.core import caching

    source = tmp_path / "elsewhere.py"
    _write(source, "def f():\n    return 1\n")
    namespace = {}
    exec(compile(source.read_text(), str(source), "exec"), namespace)
    for cls in caching.CacheImpl._locator_classes:
        if getattr(cls, "_fastlvm_package_locator", False):
            assert cls.from_function(namespace["f"], str(source)) is None


def test_kernels_made_by_one_factory_keep_their_own_cache_files():
    """The per-covariance-type (per-pruning, per-likelihood) kernels share their source line;
    sharing one cache index too, two processes compiling different ones at once
    could leave an index entry paired with the other kernel's build."""
    from numba.core.caching import NullCache

    from fastlvm.kernels.estep_stats._numba import ESTEP_RUNS
    from fastlvm.kernels.gaussian_log_prob._numba import LOG_PROB_RUNS
    from fastlvm.kernels.mppca_stats._numba import MPPCA_STATS_RUNS
    from fastlvm.kernels.vae_mlp_step._numba import VAE_MLP_STEPS

    for kernels in (ESTEP_RUNS, LOG_PROB_RUNS, MPPCA_STATS_RUNS, VAE_MLP_STEPS):
        caches = [kernel._cache for kernel in kernels.values()]
        if any(isinstance(cache, NullCache) for cache in caches):
            pytest.skip("Numba caching is off (FASTLVM_NUMBA_CACHE=0)")
        bases = {cache._impl._filename_base for cache in caches}
        assert len(bases) == len(kernels), bases
