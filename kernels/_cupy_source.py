"""The CUDA C files of the CuPy backend: loading, compiling once per device, launching.

Each ``*.cu`` file shipped in ``fastlvm.kernels`` holds ``template <typename T>``
kernels written one warp per item (a row, a component, ...), WARPS_PER_BLOCK
warps to a block.  :class:`CudaSource` compiles a file by NVRTC once per device
(``cupy.RawModule``, which also caches the binary on disk), instantiated for
float and double, and launches its kernels over a number of items.
"""

import re
from importlib import resources

import numpy as np
import cupy

WARPS_PER_BLOCK = 8  # one item per warp (ROWS_PER_BLOCK / WARPS_PER_BLOCK in the .cu files)
THREADS_PER_BLOCK = 32 * WARPS_PER_BLOCK
C_TYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
_INCLUDE = re.compile(r'^#include "(\w+\.cuh)"$', re.MULTILINE)


def _package_file(name):
    return resources.files("fastlvm.kernels").joinpath(name).read_text()


def _with_headers(text):
    """``text`` with each package header it includes written in its place."""
    return _INCLUDE.sub(lambda m: _with_headers(_package_file(m.group(1))), text)


class CudaSource:
    """One CUDA C file of ``fastlvm.kernels`` and the kernels it defines.

    Parameters
    ----------
    file_name : str
        The file, e.g. ``"_cupy_rows.cu"``.
    kernel_names : tuple of str
        Its ``template <typename T> __global__`` kernels.
    options : tuple of str
        NVRTC options beyond ``-std=c++14``, e.g. ``("--maxrregcount=80",)``
        (``bench/cupy_tiles.py`` times the E-step kernels built for more blocks an
        SM: ``-DESTEP_MIN_BLOCKS`` and register caps).
    """

    def __init__(self, file_name, kernel_names, options=()):
        self.file_name = file_name
        self.kernel_names = tuple(kernel_names)
        self.options = tuple(options)
        self._modules = {}  # device id -> cupy.RawModule

    def text(self):
        """The CUDA C source (shipped with the package), with each ``#include "x.cuh"``
        of a header beside it written in (NVRTC is given the text alone)."""
        return _with_headers(_package_file(self.file_name))

    def name_expressions(self):
        """Every kernel instantiation the module is compiled with, e.g. 'row_sumsq<float>'."""
        return [f"{name}<{t}>" for name in self.kernel_names for t in C_TYPES.values()]

    def function(self, name, dtype):
        """The compiled kernel ``name`` for ``dtype`` on the current device (cached)."""
        device = cupy.cuda.runtime.getDevice()
        module = self._modules.get(device)
        if module is None:
            module = cupy.RawModule(code=self.text(), options=("-std=c++14",) + self.options,
                                    name_expressions=self.name_expressions())
            self._modules[device] = module
        return module.get_function(f"{name}<{C_TYPES[np.dtype(dtype)]}>")

    def launch(self, name, dtype, n_items, args):
        """One warp per item: ceil(n_items / WARPS_PER_BLOCK) blocks (none for no items)."""
        if n_items == 0:
            return
        grid = -(-n_items // WARPS_PER_BLOCK)
        self.function(name, dtype)((grid,), (THREADS_PER_BLOCK,), args)
