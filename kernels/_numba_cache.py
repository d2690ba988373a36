# Numba's on-disk cache, invalidated by any change to the kernels.
#
# Numba stamps a cached function with a hash of its own source file only, yet
# the cached machine code also holds every function it calls, inlined, from
# other files.  Editing a shared helper (``_numba_support.py``) therefore left
# the cached E-step kernels running the old helper until their own files
# changed: silently stale kernels in an editable install (it happened).  The
# locators registered here stamp every kernel of this package with its file's
# hash *and* a hash of all of the package's kernel sources plus
# ``fastlvm/_config.py`` (the compile flags), so any change there recompiles
# everything on the next import.  Functions outside this package keep Numba's
# own locators, and the order Numba picks a cache directory in is kept
# (NUMBA_CACHE_DIR, then __pycache__ beside the source, then the user's cache).
#
# Limits: relies on ``numba.core.caching.CacheImpl._locator_classes`` (present
# from Numba 0.55 to 0.68 at least).  If that is missing, registration is skipped
# and Numba's per-file stamps apply: a fresh install is unaffected either way,
# since it replaces every file.
import hashlib
import os

import fastlvm._config

_KERNELS_DIR = os.path.dirname(os.path.abspath(__file__))
_CONFIG_FILE = os.path.abspath(fastlvm._config.__file__)


def package_source_hash(kernels_dir=_KERNELS_DIR, extra_files=(_CONFIG_FILE,)):
    """SHA-256 (hex) over every ``.py`` file below ``kernels_dir`` (relative
    path and contents, in sorted order) and ``extra_files`` that exist."""
    h = hashlib.sha256()
    paths = []
    for root, dirs, files in os.walk(kernels_dir):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        paths += [os.path.join(root, f) for f in files if f.endswith(".py")]
    paths = sorted(paths) + [p for p in extra_files if os.path.exists(p)]
    for path in paths:
        h.update(os.path.relpath(path, kernels_dir).encode())
        with open(path, "rb") as f:
            h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()


def _in_package(py_file):
    return os.path.abspath(py_file).startswith(_KERNELS_DIR + os.sep)


def _package_locator(base, package_hash):
    """``base`` (a Numba source-file locator) restricted to this package's
    files, with the package hash added to its source stamp."""

    class PackageLocator(base):
        @classmethod
        def from_function(cls, py_func, py_file):
            if not _in_package(py_file):
                return None
            return super().from_function(py_func, py_file)

        def get_source_stamp(self):
            return (super().get_source_stamp(), package_hash)

    PackageLocator.__name__ = PackageLocator.__qualname__ = "Package" + base.__name__
    return PackageLocator


def register():
    """Put the package locators first in Numba's list (once per process).

    Returns
    -------
    bool
        Whether they are registered.
    """
    try:
        from numba.core import caching

        classes = caching.CacheImpl._locator_classes
        bases = (caching.UserProvidedCacheLocator, caching.InTreeCacheLocator,
                 caching.UserWideCacheLocator)  # Numba's own order
    except (ImportError, AttributeError):
        return False
    if any(getattr(c, "_fastlvm_package_locator", False) for c in classes):
        return True
    package_hash = package_source_hash()
    locators = [_package_locator(base, package_hash) for base in bases]
    for cls in locators:
        cls._fastlvm_package_locator = True
    classes[:0] = locators
    return True


REGISTERED = register()
