"""The CUDA sources of the CuPy backend compile with nvcc, warnings as errors,
for the GPU generations fastlvm targets.  A compile check that needs no GPU:
it runs wherever nvcc is on the PATH (CI's machines have it)."""

import shutil
import subprocess
from pathlib import Path

import pytest

import fastlvm.kernels
from tests.kernels.cuda_emulator import kernel_signatures

NVCC = shutil.which("nvcc")
SOURCES = sorted(Path(fastlvm.kernels.__file__).parent.glob("*.cu"))


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
