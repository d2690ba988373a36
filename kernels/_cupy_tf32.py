"""float32 products on TF32 tensor cores at float32 accuracy, for the CuPy backend.

Design
------
The Triton backend's default 'tf32x3' on cuBLAS.  A float32 operand splits into
hi, x rounded to TF32 (10 explicit mantissa bits: the low 13 bits cleared, round
to nearest), and lo = x - hi, exact in float32.  Then

    A B ~ A_hi B_hi + A_hi B_lo + A_lo B_hi

(the A_lo B_lo term, 2^-22 of the product, is dropped), each product on TF32
tensor cores: CuPy's compute type for float32 is set to TF32 around the call and
restored after it.  The three products are one GEMM over the concatenated
operands [A_hi, A_hi, A_lo] and [B_hi; B_lo; B_hi], which suits a narrow inner
dimension: the log-densities' x' A^T and 'tied''s x' U (D wide; ``shift_rows``
writes the chunk's [x'_hi, x'_hi, x'_lo] in the pass that shifts it, and the
parameters' side is made once per E-step), not the moments' R^T x', whose inner
dimension is the chunk's rows (splitting R would hold two more copies of the
chunk's m x K responsibilities, the E-step's largest array): those stay IEEE, as
do 'full''s batched products (their left operand is the K x m x D differences).

Precision: 'tf32x3' by default on GPUs with TF32 (compute capability 8.0 and
up; 'ieee' below); 'tf32', one TF32 product (about 3x faster again, 10-bit
inputs), where CuPy's own switch ``CUPY_TF32=1`` asks for TF32 or with
``FASTLVM_CUPY_PRECISION=tf32``; 'ieee', cuBLAS's float32 FMA path, with
``FASTLVM_CUPY_PRECISION=ieee``.  float64 products are always IEEE.

Limits: the concatenated operands are three times the narrow operand (the
chunk's m x D rows); the compute type is process state of CuPy, so another
thread's float32 products during the call would run in TF32.
"""

import contextlib
import os

import numpy as np
import cupy

from ._dot_precision import PRECISIONS, requested_precision  # noqa: F401

_TF32_FROM = 80  # compute capability (major * 10 + minor) with TF32 tensor cores


def dot_precision(dtype):
    """The precision of the backend's products for arrays of ``dtype``.

    Returns
    -------
    str, one of PRECISIONS ('ieee' for float64)
    """
    if np.dtype(dtype) != np.float32:
        return "ieee"
    requested = requested_precision("FASTLVM_CUPY_PRECISION")
    if requested is not None:
        return requested
    if int(os.environ.get("CUPY_TF32", "0") or 0) > 0:
        return "tf32"
    capability = _compute_capability()
    return "ieee" if capability is not None and capability < _TF32_FROM else "tf32x3"


def _compute_capability():
    """The current GPU's compute capability as an int (90 for sm_90), or None where
    cupy has no ``cuda.Device`` to ask."""
    device = getattr(cupy.cuda, "Device", None)
    if device is None:
        return None
    return int(device().compute_capability)


def _linalg_internals():
    """CuPy's module that holds the compute type of its products, or None (tests'
    NumPy-backed cupy, whose products are plain float32)."""
    core = getattr(cupy, "_core", None)
    return getattr(core, "_routines_linalg", None) if core is not None else None


@contextlib.contextmanager
def tf32_products():
    """cuBLAS float32 products on TF32 tensor cores inside the block; CuPy's
    compute type before it is restored on the way out, exceptions included."""
    linalg = _linalg_internals()
    if linalg is None:
        yield
        return
    before = linalg.get_compute_type(np.float32)
    # CuPy's enum (compute_type_str there: 7 is 'COMPUTE_TYPE_TF32')
    linalg.set_compute_type(np.float32, getattr(linalg, "COMPUTE_TYPE_TF32", 7))
    try:
        yield
    finally:
        linalg.set_compute_type(np.float32, before)


def split_tf32(a):
    """(hi, lo): ``a`` (float32) rounded to TF32, and the remainder a - hi (exact).

    Parameters
    ----------
    a : cupy.ndarray, float32, finite, any layout

    Returns
    -------
    hi, lo : cupy.ndarray, a's shape, float32
    """
    if not a.flags.c_contiguous and a.T.flags.c_contiguous:  # a transposed view
        hi, lo = split_tf32(a.T)
        return hi.T, lo.T
    bits = cupy.ascontiguousarray(a).view(cupy.uint32)
    hi = ((bits + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).view(cupy.float32)
    return hi, a - hi


def right_operand(b, precision):
    """b (p, n) as a product's right operand at ``precision``: b itself, or for
    'tf32x3' [b_hi; b_lo; b_hi] (3 p, n), to meet a left operand [a_hi, a_hi, a_lo]
    (``shift_rows`` writes the chunk's rows so)."""
    if precision != "tf32x3":
        return b
    hi, lo = split_tf32(b)
    return cupy.concatenate([hi, lo, hi], axis=0)


def product(a, b, precision):
    """a @ b for operands already in ``precision``'s form (a: (m, p), or
    [a_hi, a_hi, a_lo] (m, 3 p) for 'tf32x3'; b from :func:`right_operand`), on TF32
    tensor cores unless 'ieee'."""
    if precision == "ieee":
        return cupy.matmul(a, b)
    with tf32_products():
        return cupy.matmul(a, b)
