"""The CUDA sources of the CuPy backend compile with nvcc, warnings as errors,
for the GPU generations fastlvm targets, and with NVRTC as CuPy compiles them.
Compile checks that need no GPU: the first runs wherever nvcc is on the PATH
(CI's machines have it), the second wherever the nvidia-cuda-nvrtc-cu12 wheel
is installed (the test extra), the CUDA 12 NVRTC that cupy-cuda12x loads."""

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

import fastlvm.kernels
from tests.kernels.cuda_emulator import kernel_signatures

NVCC = shutil.which("nvcc")
SOURCES = sorted(Path(fastlvm.kernels.__file__).parent.glob("*.cu"))


def _nvrtc_library():
    """The path of libnvrtc from the nvidia-cuda-nvrtc-cu12 wheel, or None."""
    try:
        import nvidia.cuda_nvrtc
    except ImportError:
        return None
    found = sorted(p for d in nvidia.cuda_nvrtc.__path__ for p in Path(d, "lib").glob(
        "libnvrtc.so.*"))
    return found[0] if found else None


NVRTC = _nvrtc_library()


def test_sources_are_shipped():
    assert [p.name for p in SOURCES] == ["_cupy_estep.cu", "_cupy_mstep.cu", "_cupy_rows.cu"]
    assert (SOURCES[0].parent / "_cupy_device.cuh").is_file()


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on the PATH")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_compiles_with_nvcc(source, arch, tmp_path):
    _compile(source, arch, tmp_path)


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on the PATH")
@pytest.mark.parametrize("blocks", [3, 4])
def test_estep_tiles_builds_for_more_blocks_an_sm(blocks, tmp_path):
    """bench/cupy_tiles.py builds the E-step kernels with a higher minimum of blocks an
    SM in estep_tiles' __launch_bounds__ (ESTEP_MIN_BLOCKS)."""
    source = next(p for p in SOURCES if p.name == "_cupy_estep.cu")
    _compile(source, "sm_90", tmp_path, (f"-DESTEP_MIN_BLOCKS={blocks}",))


def _compile(source, arch, tmp_path, options=()):
    kernels = kernel_signatures(source.read_text())
    assert kernels, "no template kernels found"
    # taking each instantiation's address makes nvcc generate its code
    names = [f"{k}<{t}>" for k in kernels for t in ("float", "double")]
    unit = tmp_path / "unit.cu"
    unit.write_text(f'#include "{source}"\n'
                    f"extern void* const fastlvm_kernels[{len(names)}];\n"
                    "void* const fastlvm_kernels[] = {"
                    + ", ".join(f"(void*)&{n}" for n in names) + "};\n")
    ptx = tmp_path / "unit.ptx"
    run = subprocess.run([NVCC, "-std=c++14", f"-arch={arch}", "-Werror", "all-warnings",
                          *options, "-ptx", str(unit), "-o", str(ptx)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    entries = [line for line in ptx.read_text().splitlines() if ".entry" in line]
    assert len(entries) == len(names), entries


def _nvrtc_compile(source, arch, options=()):
    """(NVRTC's status, its log) for a CudaSource compiled as cupy.RawModule compiles
    it: the text with its headers written in, ``-std=c++14`` and the source's own
    options, every kernel instantiation as a name expression."""
    lib = ctypes.CDLL(str(NVRTC))
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), source.text().encode(),
                                  source.file_name.encode(), 0, None, None) == 0
    try:
        for expression in source.name_expressions():
            assert lib.nvrtcAddNameExpression(prog, expression.encode()) == 0
        flags = [b"-std=c++14", f"-arch={arch}".encode(),
                 *(o.encode() for o in source.options + tuple(options))]
        status = lib.nvrtcCompileProgram(prog, len(flags), (ctypes.c_char_p * len(flags))(*flags))
        size = ctypes.c_size_t()
        assert lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size)) == 0
        log = ctypes.create_string_buffer(size.value)
        assert lib.nvrtcGetProgramLog(prog, log) == 0
        return status, log.value.decode()
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


@pytest.mark.skipif(NVRTC is None, reason="NVRTC is not installed (pip install "
                    "nvidia-cuda-nvrtc-cu12; the test extra has it on Linux x86_64)")
@pytest.mark.parametrize("arch", ["compute_80", "compute_90"])
@pytest.mark.parametrize("module, name", [("gauss", "ROW_KERNELS"), ("tiles", "ESTEP_KERNELS"),
                                          ("mstep", "MSTEP_KERNELS")])
def test_compiles_with_nvrtc(module, name, arch, cupy_backend):
    """NVRTC has no system headers and defines its own builtins: a source nvcc takes
    may still fail there, on the device, at the first call."""
    source = getattr(getattr(cupy_backend, module), name)
    status, log = _nvrtc_compile(source, arch)
    assert status == 0, log
    if name == "ESTEP_KERNELS":  # bench/cupy_tiles.py's builds for more blocks an SM
        status, log = _nvrtc_compile(source, arch, ("-DESTEP_MIN_BLOCKS=4",
                                                    "--maxrregcount=64"))
        assert status == 0, log
