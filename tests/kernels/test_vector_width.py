"""``prefer_wide_vectors`` marks the function that calls it, and only that
function, for 512-bit vectors (kernels/_vector_width.py)."""

import llvmlite.binding as llvm
import numba
import numpy as np
import pytest

from fastlvm.kernels._vector_width import prefer_wide_vectors

HINTS = ('"prefer-vector-width"="512"', '"min-legal-vector-width"="512"')
HAS_AVX512 = "+avx512f" in llvm.get_host_cpu_features().flatten().split(",")


@numba.njit(fastmath=True)
def _wide_squares(a, b, out):
    prefer_wide_vectors()
    for i in range(a.shape[0]):
        v = a[i] - b[i]
        out[i] += v * v


@numba.njit(fastmath=True)
def _plain_squares(a, b, out):
    for i in range(a.shape[0]):
        v = a[i] - b[i]
        out[i] += v * v


def _compiled(fn, dtype):
    a = np.arange(100, dtype=dtype)
    out = np.zeros_like(a)
    fn(a, a[::-1].copy(), out)
    np.testing.assert_allclose(out, (a - a[::-1]) ** 2)  # the hint changes no result
    sig = fn.signatures[-1]
    return fn.inspect_llvm(sig), fn.inspect_asm(sig)


def _attribute_groups(llvm_ir, name):
    """The attribute text of the function whose symbol contains ``name``."""
    define = next(line for line in llvm_ir.splitlines()
                  if line.startswith("define") and name in line and "cpython" not in line)
    groups = dict(line.split(" = ", 1) for line in llvm_ir.splitlines()
                  if line.startswith("attributes #"))
    return " ".join(groups.get("attributes " + tok, tok) for tok in define.split())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_hint_marks_only_the_calling_function(dtype):
    wide_ir, _ = _compiled(_wide_squares, dtype)
    plain_ir, _ = _compiled(_plain_squares, dtype)
    wide = _attribute_groups(wide_ir, "_wide_squares")
    assert all(h in wide for h in HINTS), wide
    assert not any(h in _attribute_groups(plain_ir, "_plain_squares") for h in HINTS)


@pytest.mark.skipif(not HAS_AVX512, reason="the host CPU has no AVX-512")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_hinted_loop_uses_512_bit_registers(dtype):
    _, asm = _compiled(_wide_squares, dtype)
    assert "zmm" in asm
