# Loops written directly in LLVM IR, for the few hot spots where Numba's own
# loops lose to their set-up.
#
# Design: LLVM vectorises a Numba loop only after run-time checks that its
# arrays do not overlap, plus a set-up and remainder around the vector body.
# Where the body is short (a D = 32 row), those cost more than the arithmetic.
# The intrinsics here emit the loop themselves, in explicit vectors of one
# 64-byte line (8 float64 or 16 float32 values) and a scalar remainder, with
# no overlap checks: sound because every caller passes accumulators that the
# kernel allocated and inputs it only reads.  Each has a plain-Numba twin for
# layouts it does not take, and every kernel that calls one is tested against
# its NumPy reference.  Limits: C-contiguous arrays, float32/float64; products
# and sums are IEEE (multiply-adds fused, no reassociation).
#
# Tried here and dropped: the squared distances of a transposed tile to four
# centres with the running sums in registers over all features.  It was 1.3x
# faster than the Numba loops on 192-row tiles, but the same on the kernels'
# own tiles (384 float32 rows; float64 within 10%), so the Numba loops stay.
import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from ._numba_support import CACHE, FASTMATH

_LINE_BYTES = 64  # one vector: a cache line, a 512-bit register


def _byte_pointer(context, builder, arr_type, arr):
    """(data as i8*, strides, shape) of a Numba array value."""
    ary = context.make_array(arr_type)(context, builder, arr)
    return (builder.bitcast(ary.data, ir.IntType(8).as_pointer()),
            cgutils.unpack_tuple(builder, ary.strides), cgutils.unpack_tuple(builder, ary.shape))


def _element_pointer(builder, base, row, row_stride, col, itemsize, to_type):
    """Pointer (to ``to_type``) at byte row * row_stride + col * itemsize of base."""
    intp = row.type
    offset = builder.add(builder.mul(row, row_stride),
                         builder.mul(col, ir.Constant(intp, itemsize)))
    return builder.bitcast(builder.gep(base, [offset]), to_type.as_pointer())


def _fma(builder, value_type):
    """LLVM's fused multiply-add for a float or a vector of floats."""
    if isinstance(value_type, ir.VectorType):
        suffix = f"v{value_type.count}{_float_name(value_type.element)}"
    else:
        suffix = _float_name(value_type)
    return cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(value_type, [value_type] * 3), "llvm.fma." + suffix)


def _float_name(float_type):
    return "f64" if isinstance(float_type, ir.DoubleType) else "f32"


def _splat(builder, value, vector_type):
    """A vector with every lane equal to the scalar ``value``."""
    i32 = ir.IntType(32)
    undef = ir.Constant(vector_type, ir.Undefined)
    one = builder.insert_element(undef, value, ir.Constant(i32, 0))
    return builder.shuffle_vector(one, undef,
                                  ir.Constant(ir.VectorType(i32, vector_type.count),
                                              [0] * vector_type.count))


def _c_float_arrays(arrays, ndims):
    return all(isinstance(a, types.Array) and a.layout == "C" and a.ndim == nd
               and a.dtype in (types.float32, types.float64) for a, nd in zip(arrays, ndims))


# ---------------------------------------------------------------------------
# One row into a component's first and second moments (the E-step's row path)


@intrinsic
def _add_centred_row(typingctx, X, row, centers, k, r, first, second, want_second):
    """first[k, :] += r (X[row] - centers[k]) and, when ``want_second``,
    second[k, 0, :] += r (X[row] - centers[k])**2, over X's D columns.

    X (n, D) and centers (K, >= D) share a float dtype; first (K, >= D) and
    second (K, 1, >= D) are float64 accumulators that alias neither.  Blocks of
    one vector of features, then a scalar remainder.  One float64 (row,
    component) pair at D = 32 took 20.9 ns as a Numba loop, 12.6 ns here.
    Differences are taken in the data's dtype, then widened.
    """
    if not (_c_float_arrays((X, centers, first, second), (2, 2, 2, 3))
            and centers.dtype == X.dtype and first.dtype == second.dtype == types.float64):
        return None
    sig = types.void(X, row, centers, k, r, first, second, want_second)

    def codegen(context, builder, signature, args):
        x_arr, row_v, c_arr, k_v, r_v, f_arr, q_arr, want_v = args
        x_ty, row_ty, c_ty, k_ty, r_ty, f_ty, q_ty, want_ty = signature.args
        intp = context.get_value_type(types.intp)
        elt = context.get_value_type(x_ty.dtype)
        size = x_ty.dtype.bitwidth // 8
        f64 = ir.DoubleType()
        width = _LINE_BYTES // 8
        vec_elt, vec64 = ir.VectorType(elt, width), ir.VectorType(f64, width)
        row_i = context.cast(builder, row_v, row_ty, types.intp)
        k_i = context.cast(builder, k_v, k_ty, types.intp)
        xb, xs, xsh = _byte_pointer(context, builder, x_ty, x_arr)
        cb, cs, _ = _byte_pointer(context, builder, c_ty, c_arr)
        fb, fs, _ = _byte_pointer(context, builder, f_ty, f_arr)
        qb, qs, _ = _byte_pointer(context, builder, q_ty, q_arr)
        n = xsh[1]
        rr = context.cast(builder, r_v, r_ty, types.float64)

        def fold(i, src_type, acc_type, r_val, second):
            v = builder.fsub(
                builder.load(_element_pointer(builder, xb, row_i, xs[0], i, size, src_type),
                             align=size),
                builder.load(_element_pointer(builder, cb, k_i, cs[0], i, size, src_type),
                             align=size))
            if src_type != acc_type:
                v = builder.fpext(v, acc_type)
            u = builder.fmul(r_val, v)
            f_at = _element_pointer(builder, fb, k_i, fs[0], i, 8, acc_type)
            builder.store(builder.fadd(builder.load(f_at, align=8), u), f_at, align=8)
            if second:
                q_at = _element_pointer(builder, qb, k_i, qs[0], i, 8, acc_type)
                fused = builder.call(_fma(builder, acc_type), [u, v, builder.load(q_at, align=8)])
                builder.store(fused, q_at, align=8)

        r_vec = _splat(builder, rr, vec64)

        def emit(second):
            blocks = builder.sdiv(n, ir.Constant(intp, width))
            with cgutils.for_range(builder, blocks) as loop:
                i = builder.mul(loop.index, ir.Constant(intp, width))
                fold(i, vec_elt, vec64, r_vec, second)
            start = builder.mul(blocks, ir.Constant(intp, width))
            with cgutils.for_range(builder, n, start=start) as loop:
                fold(loop.index, elt, f64, rr, second)

        want = context.cast(builder, want_v, want_ty, types.boolean)
        with builder.if_else(want) as (with_second, first_only):
            with with_second:
                emit(True)
            with first_only:
                emit(False)
        return context.get_dummy_value()

    return sig, codegen


@numba.njit(fastmath=FASTMATH, cache=CACHE)
def _add_centred_row_loop(X, row, centers, k, r, first, second, want_second):
    """:func:`add_centred_row` as a plain loop (any layout)."""
    for i in range(X.shape[1]):
        v = np.float64(X[row, i] - centers[k, i])
        u = r * v
        first[k, i] += u
        if want_second:
            second[k, 0, i] += u * v


def add_centred_row(X, row, centers, k, r, first, second, want_second):
    """first[k, i] += r (X[row, i] - centers[k, i]) for i < D and, when
    ``want_second``, second[k, 0, i] += r (X[row, i] - centers[k, i])**2: the
    differences in X's dtype, the rest in float64.

    Inside compiled code this is :func:`_add_centred_row` when every array is
    C-contiguous, else a plain loop.

    Parameters
    ----------
    X : ndarray (n, D), float32 or float64
    row, k : int
    centers : ndarray (K, >= D), X's dtype
    r : float
    first : ndarray (K, >= D), float64, updated
    second : ndarray (K, 1, >= D), float64, updated when ``want_second``
    want_second : bool
    """
    _add_centred_row_loop(X, row, centers, k, r, first, second, want_second)


@overload(add_centred_row, inline="always", fastmath=FASTMATH)
def _add_centred_row_overload(X, row, centers, k, r, first, second, want_second):
    if all(a.layout == "C" for a in (X, centers, first, second)):
        def impl(X, row, centers, k, r, first, second, want_second):
            _add_centred_row(X, row, centers, k, r, first, second, want_second)
    else:
        def impl(X, row, centers, k, r, first, second, want_second):
            _add_centred_row_loop(X, row, centers, k, r, first, second, want_second)
    return impl
