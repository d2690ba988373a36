"""Shared Numba building blocks: bit casts, a vectorisable exp and log, tile helpers.

Design: LLVM only vectorises a loop whose body it can see through, and a call
to libm's ``exp`` is opaque (Numba ships SVML only with Intel's runtime), so
the exp used inside the E-step loops is written out: Cody-Waite range
reduction, a Horner polynomial, and 2**k assembled from its bits.  It is
accurate to 4e-14 relative in float64 (the reduction's error, growing with
|x|; 9e-15 for |x| < 10) and 4e-7 in float32, and flushes
results below the smallest normal number (x < -708.396 / x < -87.337) to 0.  NaN
propagates; ``exp(-inf) == 0`` exactly.  The log of each row's sum of
exponentials is written out the same way (:func:`fast_log`, fdlibm's method),
and so is a division without Python's zero check (:func:`quotient`): with
libm's log and the checked division, the loop over a tile's rows stayed scalar
and cost about 3.5 ns per row.
"""

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from fastlvm._config import NUMBA_CACHE, NUMBA_FASTMATH

from . import _numba_cache  # noqa: F401  (before any decorator below: cache stamps)
from ._vector_width import prefer_wide_vectors

FASTMATH = set(NUMBA_FASTMATH)
CACHE = NUMBA_CACHE


def read_only(a):
    """``a`` as the kernels take their rows, sample weights and running
    distances: viewed read-only (no copy).

    Numba compiles a kernel once per type of its arguments, and an array's type
    holds its writeable flag.  Without this, a read-only array (a memmap opened
    with mode 'r', a pandas 3 frame's values) compiled every kernel it met a
    second time beside writable ones: 7.7 s more for a GaussianMixture fit and
    predict, and as much again in the cache.  The kernels never write these
    inputs, so they always get read-only views.  Parameters (means, factors,
    centers) are passed as the wrappers prepare them, writable where the
    estimators call (k-means copies centers that are not).
    """
    if not a.flags.writeable:
        return a
    view = a.view()
    view.flags.writeable = False
    return view


_NO_WEIGHTS = read_only(np.ones(1))


def kernel_weights(sample_weight):
    """(weights, has_weight) as the kernels take sample weights: read-only, and
    for None a one-element placeholder that ``has_weight`` False leaves unread."""
    if sample_weight is None:
        return _NO_WEIGHTS, False
    return read_only(sample_weight), True


def named_kernel(py_func, name, **options):
    """``py_func`` compiled with the package's fastmath and cache settings (and
    ``options``) under its own name ``name``, for a kernel that a factory makes
    several of (one per covariance type, say).

    Numba names a function's cache files after its qualified name and line, so
    the factory's kernels would share one index of compiled builds; two
    processes compiling different ones at once can then pair an index entry
    with the other's build (Numba saves the index, then the data, and checks
    neither against the other).  With a name each, each has its own files.
    """
    py_func.__name__ = py_func.__qualname__ = name  # before njit fixes the file names
    return numba.njit(fastmath=FASTMATH, cache=CACHE, **options)(py_func)


def named_span_kernel(py_func, name):
    """:func:`named_kernel` compiled ``nogil``, as span kernels are."""
    return named_kernel(py_func, name, nogil=True)


@intrinsic
def _bitcast(typingctx, value, target):
    """Reinterpret the bits of a scalar as another scalar type of equal width."""
    to_type = target.instance_type if isinstance(target, types.NumberClass) else target
    sig = to_type(value, target)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(to_type))

    return sig, codegen


@intrinsic
def _trailing_zeros(typingctx, value):
    """Count of trailing zero bits of an integer (LLVM's cttz; the width for 0)."""
    sig = value(value)

    def codegen(context, builder, signature, args):
        return builder.cttz(args[0], ir.Constant(ir.IntType(1), 0))

    return sig, codegen


@intrinsic
def quotient(typingctx, a, b):
    """a / b for two floats of one type, without Python's zero-division check
    (IEEE: x / 0 is +-inf or NaN), so that a loop dividing can vectorise."""
    if not (isinstance(a, types.Float) and a == b):
        return None
    sig = a(a, b)

    def codegen(context, builder, signature, args):
        return builder.fdiv(args[0], args[1])

    return sig, codegen


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


TRANSPOSE_BLOCK = 8  # rows and columns of one transposed block (load_tile_transposed)


def _store_transposed(builder, rows, yb, y_row_stride, col_i, t_i, size, vec, intp):
    """Store eight row vectors (8 lanes each) transposed: lane c of rows[j] at
    byte (col + c) * y_row_stride + (t + j) * size of yb, by three rounds of
    shuffles (pairs of rows interleaved, then pairs of pairs, then halves: 24
    shuffles) and eight contiguous vector stores."""
    w = TRANSPOSE_BLOCK
    mask_type = ir.VectorType(ir.IntType(32), w)

    def shuffle(a, b, mask):  # lanes 0-7 from a, 8-15 from b
        return builder.shuffle_vector(a, b, ir.Constant(mask_type, mask))

    # round 1: rows 2p, 2p+1 interleaved -> pairs[2p] (even columns), pairs[2p+1] (odd)
    pairs = []
    for p in range(0, w, 2):
        pairs.append(shuffle(rows[p], rows[p + 1], [0, 8, 2, 10, 4, 12, 6, 14]))
        pairs.append(shuffle(rows[p], rows[p + 1], [1, 9, 3, 11, 5, 13, 7, 15]))
    # round 2: quads[c] (c < 4) holds columns c and c + 4 of rows 0-3,
    # quads[4 + c] the same columns of rows 4-7
    quads = [None] * w
    for base in (0, 4):
        for parity in (0, 1):
            a, b = pairs[base + parity], pairs[base + 2 + parity]
            quads[base + parity] = shuffle(a, b, [0, 1, 8, 9, 4, 5, 12, 13])
            quads[base + 2 + parity] = shuffle(a, b, [2, 3, 10, 11, 6, 7, 14, 15])
    # round 3: rows 0-3 and 4-7 joined; column c < 4 from the low halves, c + 4 the high
    for c in range(4):
        a, b = quads[c], quads[4 + c]
        for col_offset, mask in ((c, [0, 1, 2, 3, 8, 9, 10, 11]),
                                 (c + 4, [4, 5, 6, 7, 12, 13, 14, 15])):
            column = builder.add(col_i, ir.Constant(intp, col_offset))
            at = _element_pointer(builder, yb, column, y_row_stride, t_i, size, vec)
            builder.store(shuffle(a, b, mask), at, align=size)


def _is_c_matrix(a):
    return isinstance(a, types.Array) and a.ndim == 2 and a.layout == "C"


@intrinsic
def _transpose_block(typingctx, X, row, col, xT, t):
    """xT[col + c, t + j] = X[row + j, col + c] for j, c < 8: one 8 x 8 block
    of C-contiguous X (n, D) stored transposed into C-contiguous xT (>= D, >= t + 8).

    Eight row vectors are loaded, transposed in registers
    (:func:`_store_transposed`) and stored as eight contiguous runs of xT.  The
    caller ensures the block lies inside both arrays.
    """
    if not (_is_c_matrix(X) and _is_c_matrix(xT) and X.dtype == xT.dtype):
        return None
    sig = types.void(X, row, col, xT, t)

    def codegen(context, builder, signature, args):
        x_arr, row_v, col_v, y_arr, t_v = args
        x_ty, row_ty, col_ty, y_ty, t_ty = signature.args
        intp = context.get_value_type(types.intp)
        size = x_ty.dtype.bitwidth // 8
        vec = ir.VectorType(context.get_value_type(x_ty.dtype), TRANSPOSE_BLOCK)
        xb, xs, _ = _byte_pointer(context, builder, x_ty, x_arr)
        yb, ys, _ = _byte_pointer(context, builder, y_ty, y_arr)
        row_i, col_i, t_i = (context.cast(builder, v, ty, types.intp)
                             for v, ty in ((row_v, row_ty), (col_v, col_ty), (t_v, t_ty)))
        rows = [builder.load(_element_pointer(builder, xb, builder.add(row_i, ir.Constant(intp, j)),
                                              xs[0], col_i, size, vec), align=size)
                for j in range(TRANSPOSE_BLOCK)]
        _store_transposed(builder, rows, yb, ys[0], col_i, t_i, size, vec, intp)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _transpose_centred_block(typingctx, X, row, col, xT, t, centres, which):
    """xT[col + c, t + j] = X[row + j, col + c] - centres[which[t + j], col + c]
    for j, c < 8: :func:`_transpose_block` with each row less its own centre
    (one subtraction in X's dtype, as an element loop rounds it) before the
    shuffles.  ``centres`` (K, >= col + 8) C-contiguous in X's dtype, ``which``
    a 1-D integer array of row indices into it; the caller ensures every
    index is in range and the block lies inside the arrays.
    """
    if not (_is_c_matrix(X) and _is_c_matrix(xT) and _is_c_matrix(centres)
            and X.dtype == xT.dtype == centres.dtype and isinstance(which, types.Array)
            and which.ndim == 1 and isinstance(which.dtype, types.Integer)):
        return None
    sig = types.void(X, row, col, xT, t, centres, which)

    def codegen(context, builder, signature, args):
        x_arr, row_v, col_v, y_arr, t_v, c_arr, w_arr = args
        x_ty, row_ty, col_ty, y_ty, t_ty, c_ty, w_ty = signature.args
        intp = context.get_value_type(types.intp)
        size = x_ty.dtype.bitwidth // 8
        vec = ir.VectorType(context.get_value_type(x_ty.dtype), TRANSPOSE_BLOCK)
        xb, xs, _ = _byte_pointer(context, builder, x_ty, x_arr)
        yb, ys, _ = _byte_pointer(context, builder, y_ty, y_arr)
        cb, cs, _ = _byte_pointer(context, builder, c_ty, c_arr)
        wb, ws, _ = _byte_pointer(context, builder, w_ty, w_arr)
        index_type = context.get_value_type(w_ty.dtype)
        row_i, col_i, t_i = (context.cast(builder, v, ty, types.intp)
                             for v, ty in ((row_v, row_ty), (col_v, col_ty), (t_v, t_ty)))
        rows = []
        for j in range(TRANSPOSE_BLOCK):
            at = builder.add(t_i, ir.Constant(intp, j))
            k = builder.load(builder.bitcast(builder.gep(wb, [builder.mul(at, ws[0])]),
                                             index_type.as_pointer()))
            k = context.cast(builder, k, w_ty.dtype, types.intp)
            x = builder.load(_element_pointer(builder, xb, builder.add(row_i, ir.Constant(intp, j)),
                                              xs[0], col_i, size, vec), align=size)
            c = builder.load(_element_pointer(builder, cb, k, cs[0], col_i, size, vec), align=size)
            rows.append(builder.fsub(x, c))
        _store_transposed(builder, rows, yb, ys[0], col_i, t_i, size, vec, intp)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _prefetch(typingctx, arr, row, col):
    """Ask the cache hierarchy for the line holding ``arr[row, col]`` (2-D array;
    LLVM's prefetch, read, into L2: x86 ``prefetcht1``).  Only a hint: it never
    faults and changes no value."""
    sig = types.void(arr, row, col)

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        stride0, stride1 = cgutils.unpack_tuple(builder, ary.strides)
        row, col = (context.cast(builder, v, t, types.intp)
                    for v, t in zip(args[1:], signature.args[1:]))
        offset = builder.add(builder.mul(row, stride0), builder.mul(col, stride1))
        byte_ptr = ir.IntType(8).as_pointer()
        address = builder.gep(builder.bitcast(ary.data, byte_ptr), [offset])
        i32 = ir.IntType(32)
        # the name is mangled from the pointer type (llvm.prefetch.p0i8 or .p0)
        fn = builder.module.declare_intrinsic(
            "llvm.prefetch", [byte_ptr], ir.FunctionType(ir.VoidType(), [byte_ptr, i32, i32, i32]))
        # read (0), locality 2 (L2), data cache (1)
        builder.call(fn, [address, ir.Constant(i32, 0), ir.Constant(i32, 2), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return sig, codegen


def fast_exp(x):
    """exp(x) for float32/float64 scalars inside compiled loops (see module doc)."""
    return np.exp(x)


@overload(fast_exp, inline="always", fastmath=FASTMATH)
def _fast_exp_overload(x):
    if x == types.float32:

        def impl32(x):
            kf = np.floor(x * np.float32(1.4426950408889634) + np.float32(0.5))
            r = x - kf * np.float32(0.693145751953125) - kf * np.float32(1.428606765330187e-06)
            p = np.float32(1.0) + r * (
                np.float32(1.0) + r * (
                    np.float32(0.5) + r * (
                        np.float32(1 / 6) + r * (
                            np.float32(1 / 24) + r * (
                                np.float32(1 / 120) + r * (
                                    np.float32(1 / 720) + r * np.float32(1 / 5040)))))))
            bits = _bitcast(kf + np.float32(12582912.0), numba.int32)
            exponent = numba.int32((numba.int64(bits) - 1262485504 + 127) << 23)
            scale = _bitcast(exponent, numba.float32)
            return np.float32(0.0) if x < np.float32(-87.33654) else p * scale

        return impl32

    if x == types.float64:

        def impl64(x):
            kf = np.floor(x * 1.4426950408889634 + 0.5)
            r = x - kf * 0.6931471803691238 - kf * 1.9082149292705877e-10
            # degree 11: truncation r^12 / 12! < 7e-15 for |r| <= ln(2) / 2,
            # below the reduction's own error
            p = 1.0 + r * (1.0 + r * (0.5 + r * (1 / 6 + r * (1 / 24 + r * (
                1 / 120 + r * (1 / 720 + r * (1 / 5040 + r * (1 / 40320 + r * (
                    1 / 362880 + r * (1 / 3628800 + r * (1 / 39916800)))))))))))
            bits = _bitcast(kf + 6755399441055744.0, numba.int64)
            scale = _bitcast((bits - np.int64(4843621399236968448) + np.int64(1023))
                             << np.int64(52), numba.float64)
            return 0.0 if x < -708.3964185322641 else p * scale

        return impl64
    return None


def fast_expm1(x):
    """exp(x) - 1 for float32/float64 scalars inside compiled loops.

    Vectorisable like :func:`fast_exp`, and accurate where exp(x) - 1 is not:
    for |x| < 1/2 the Taylor polynomial to x^17 / 17! (1e-20 relative
    truncation; to x^10 / 10! in float32) in Horner form, elsewhere
    ``fast_exp(x) - 1``, whose rounding is then at most 2.6 ulp of the result.
    """
    return np.expm1(x)


@overload(fast_expm1, inline="always", fastmath=FASTMATH)
def _fast_expm1_overload(x):
    if x == types.float32:

        def impl32(x):
            series = x * (np.float32(1.0) + x * (np.float32(1 / 2) + x * (
                np.float32(1 / 6) + x * (np.float32(1 / 24) + x * (
                    np.float32(1 / 120) + x * (np.float32(1 / 720) + x * (
                        np.float32(1 / 5040) + x * (np.float32(1 / 40320) + x * (
                            np.float32(1 / 362880) + x * np.float32(1 / 3628800))))))))))
            return series if abs(x) < np.float32(0.5) else fast_exp(x) - np.float32(1.0)

        return impl32

    if x == types.float64:

        def impl64(x):
            series = x * (1.0 + x * (1 / 2 + x * (1 / 6 + x * (1 / 24 + x * (1 / 120 + x * (
                1 / 720 + x * (1 / 5040 + x * (1 / 40320 + x * (1 / 362880 + x * (
                    1 / 3628800 + x * (1 / 39916800 + x * (1 / 479001600 + x * (
                        1 / 6227020800 + x * (1 / 87178291200 + x * (
                            1 / 1307674368000 + x * (1 / 20922789888000 + x * (
                                1 / 355687428096000)))))))))))))))))
            return series if abs(x) < 0.5 else fast_exp(x) - 1.0

        return impl64
    return None


def fast_log(x):
    """log(x) for positive float32/float64 scalars inside compiled loops.

    Vectorisable (libm's ``log`` is an opaque call); written for the row
    normalisers of the E-steps, whose sums of exponentials lie in [1, K].
    fdlibm's method: x = 2^e m with m in [sqrt(2)/2, sqrt(2)), f = m - 1
    (exact), s = f / (2 + f), log(1 + f) = f - (f^2/2 - s (f^2/2 + R(s^2))) with
    fdlibm's degree-14 minimax R, and e ln 2 added in two parts.  Within one ulp
    of numpy's log in float64 where fast-math keeps that order of additions
    (loops compiled without 'reassoc', as ``exp_tile`` is; up to 3 ulp with
    it); float32 goes through the float64 formula and rounds once.  Valid for
    normal x > 0; +inf and NaN return themselves (0, subnormals and negative
    numbers are outside its domain).
    """
    return np.log(x)


@overload(fast_log, inline="always", fastmath=FASTMATH)
def _fast_log_overload(x):
    if x == types.float64:
        return lambda x: _log64(x)
    if x == types.float32:
        return lambda x: np.float32(_log64(np.float64(x)))
    return None


@numba.njit(fastmath=FASTMATH, cache=CACHE, inline="always")
def _log64(x):
    """:func:`fast_log` of a float64."""
    bits = _bitcast(x, numba.int64)
    # move the mantissa into [sqrt(2)/2, sqrt(2)) and the exponent e with it
    # (0x3FE6A09E: the top bits of sqrt(2)/2; as musl's log)
    hi = (bits >> np.int64(32)) + np.int64(0x3FF00000 - 0x3FE6A09E)
    e = (hi >> np.int64(20)) - np.int64(1023)
    hi = (hi & np.int64(0xFFFFF)) + np.int64(0x3FE6A09E)
    m = _bitcast((hi << np.int64(32)) | (bits & np.int64(0xFFFFFFFF)), numba.float64)
    f = m - 1.0
    hfsq = 0.5 * f * f
    s = quotient(f, 2.0 + f)
    z = s * s
    w = z * z
    t1 = w * (3.999999999940941908e-01 + w * (2.222219843214978396e-01
                                               + w * 1.531383769920937332e-01))
    t2 = z * (6.666666666666735130e-01 + w * (2.857142874366239149e-01 + w * (
        1.818357216161805012e-01 + w * 1.479819860511658591e-01)))
    dk = np.float64(e)
    res = dk * 6.93147180369123816490e-01 - (
        (hfsq - (s * (hfsq + t1 + t2) + dk * 1.90821492927058770002e-10)) - f)
    return res if x < np.inf else x + x


@numba.njit(fastmath=FASTMATH - {"reassoc"}, cache=CACHE)
def fast_log_array(x, out):
    """Apply :func:`fast_log` elementwise (used by tests of the function),
    compiled as its caller ``exp_tile`` is: without reassociation."""
    for i in range(x.shape[0]):
        out[i] = fast_log(x[i])


@numba.njit(fastmath=FASTMATH, cache=CACHE)
def fast_expm1_array(x, out):
    """Apply :func:`fast_expm1` elementwise (used by tests of the function)."""
    for i in range(x.shape[0]):
        out[i] = fast_expm1(x[i])


@numba.njit(fastmath=FASTMATH, cache=CACHE)
def fast_exp_array(x, out):
    """Apply :func:`fast_exp` elementwise (used by tests of the exp itself).

    Parameters
    ----------
    x : ndarray of shape (n,), float32 or float64
    out : ndarray of shape (n,), same dtype as ``x``
    """
    for i in range(x.shape[0]):
        out[i] = fast_exp(x[i])


def transpose_block(X, row, col, xT, t):
    """xT[col:col + 8, t:t + 8] = X[row:row + 8, col:col + 8].T; in compiled
    code with C-contiguous arrays, :func:`_transpose_block`."""
    b = TRANSPOSE_BLOCK
    xT[col:col + b, t:t + b] = X[row:row + b, col:col + b].T


@overload(transpose_block, inline="always")
def _transpose_block_overload(X, row, col, xT, t):
    if X.layout == "C" and xT.layout == "C":
        return lambda X, row, col, xT, t: _transpose_block(X, row, col, xT, t)

    def impl(X, row, col, xT, t):
        for c in range(TRANSPOSE_BLOCK):
            for j in range(TRANSPOSE_BLOCK):
                xT[col + c, t + j] = X[row + j, col + c]
    return impl


def transpose_centred_block(X, row, col, xT, t, centres, which):
    """xT[col:col + 8, t:t + 8] = (X[row:row + 8, col:col + 8] -
    centres[which[t:t + 8], col:col + 8]).T; in compiled code with C-contiguous
    arrays, :func:`_transpose_centred_block`."""
    b = TRANSPOSE_BLOCK
    xT[col:col + b, t:t + b] = (X[row:row + b, col:col + b]
                                - centres[which[t:t + b], col:col + b]).T


@overload(transpose_centred_block, inline="always")
def _transpose_centred_block_overload(X, row, col, xT, t, centres, which):
    if X.layout == "C" and xT.layout == "C" and centres.layout == "C":
        return lambda X, row, col, xT, t, centres, which: _transpose_centred_block(
            X, row, col, xT, t, centres, which)

    def impl(X, row, col, xT, t, centres, which):
        for j in range(TRANSPOSE_BLOCK):
            k = which[t + j]
            for c in range(TRANSPOSE_BLOCK):
                xT[col + c, t + j] = X[row + j, col + c] - centres[k, col + c]
    return impl


@numba.njit(fastmath=FASTMATH, cache=CACHE)
def load_tile_transposed(X, row0, nrows, xT):
    """Copy rows ``row0:row0+nrows`` of X (n, D) into xT (D, >= nrows), transposed,
    and prefetch the next ``nrows`` rows of X into L2.

    The transposed tile makes every inner loop run over rows, contiguous in
    memory, so LLVM vectorises it without horizontal reductions.  Eight rows
    go at a time: for C-contiguous arrays each 8 x 8 block is transposed in
    registers (:func:`_transpose_block`), eight vector loads and stores where
    an element loop made 64 of each (a float64 D = 32 tile resident in L2:
    8.9 ms per 1M rows element by element, 5.5 ms by blocks; float32 6.4 and
    3.3 ms; other layouts go element by element).  Columns past the last
    whole block and the last rows of a tile go element by element.

    Prefetch: the copy's stores keep too few loads in flight for the hardware
    prefetcher to hide DRAM's latency, so a copy that reads X from memory ran
    at a third of the bandwidth.  Copying a row therefore also asks for the
    row one tile ahead (one prefetch per 64-byte line), which the caller
    reaches after computing on this tile: the next copy then reads from L2
    (a float64 tile copy that took 26 ms per 1M x 32 rows took 14 ms).  The
    rows ahead belong to the caller's next tile when its tiles are
    consecutive, as in every kernel here; otherwise it is only a wasted hint.
    Compiled as a function of its own: inlined into the E-step's loop (as it
    once was), the same prefetches bought nothing; the cause was not pinned down.
    """
    d = X.shape[1]
    ahead = row0 + nrows
    ahead_stop = min(X.shape[0], ahead + nrows)
    line = 64 // X.itemsize
    whole = d - d % TRANSPOSE_BLOCK
    t = 0
    while t + TRANSPOSE_BLOCK <= nrows:
        for j in range(TRANSPOSE_BLOCK):
            if ahead + t + j < ahead_stop:
                for i in range(0, d, line):
                    _prefetch(X, ahead + t + j, i)
        for i in range(0, whole, TRANSPOSE_BLOCK):
            transpose_block(X, row0 + t, i, xT, t)
        for i in range(whole, d):
            for j in range(TRANSPOSE_BLOCK):
                xT[i, t + j] = X[row0 + t + j, i]
        t += TRANSPOSE_BLOCK
    for tt in range(t, nrows):
        if ahead + tt < ahead_stop:
            for i in range(0, d, line):
                _prefetch(X, ahead + tt, i)
        for i in range(d):
            xT[i, tt] = X[row0 + tt, i]


# how far ahead of the row it copies load_tile_rows prefetches X
ROW_PREFETCH_BYTES = 65536


@numba.njit(fastmath=FASTMATH, cache=CACHE)
def load_tile_rows(X, row0, nrows, out):
    """Copy rows ``row0:row0+nrows`` of X (n, D) into out (>= nrows, >= D), in
    order, prefetching into L2 the rows ``ROW_PREFETCH_BYTES`` ahead of each
    (past the tile's end too, rows past n skipped; out's columns from D on are
    left alone).

    For tiles whose rows are then read in another order (the pruned MPPCA
    pass gathers them by component): gathered straight from X, rows in an
    order the hardware prefetcher cannot follow, the gather read at a third
    less bandwidth than this copy; from the copy, in L2, the pruned pass's
    clean rows took 54-56 ms per 1M x 64 float32 rows on one thread, against
    62-68 ms from X (2-core EPYC).  A fixed distance ahead, not the whole next
    tile as :func:`load_tile_transposed` prefetches: the pruned pass's tiles of
    4,096 rows (1 MiB of float32 at D = 64) would bring the next one into L2
    over the blocks in use (its hinted pass went 3-14% faster, 1M rows, one
    and two threads, both dtypes).
    """
    d = X.shape[1]
    ahead = row0 + max(1, ROW_PREFETCH_BYTES // max(1, d * X.itemsize))
    ahead_stop = X.shape[0]
    line = 64 // X.itemsize
    for t in range(nrows):
        if ahead + t < ahead_stop:
            for i in range(0, d, line):
                _prefetch(X, ahead + t, i)
        x = X[row0 + t]
        o = out[t]
        for i in range(d):
            o[i] = x[i]


@numba.njit(fastmath=FASTMATH, cache=CACHE)
def gather_rows_transposed(X, row0, idx, m, center, outT):
    """outT[i, j] = X[row0 + idx[j], i] - center[i] for j < m and i < D: rows of
    X gathered, centred and transposed (outT's rows from D on are left alone).

    Eight rows go at a time, as float32 rows do in :func:`load_tile_transposed`,
    so each feature's eight values are stored as one contiguous run; here in
    float64 too (one thread, the pruned MPPCA pass over 1M x 64 rows, when
    this copy also filled its per-component blocks: 223 ms, against 232 ms a
    row at a time).  It now brings that pass's dirty rows to the dense pass.

    Parameters
    ----------
    X : ndarray (n, D)
    row0 : int, idx : ndarray (>= m,), int: the rows row0 + idx[j]
    m : int
    center : ndarray (>= D,), X's dtype (zeros: a plain gather)
    outT : ndarray (>= D, >= m), X's dtype, written
    """
    d = X.shape[1]
    j = 0
    while j + 8 <= m:
        for i in range(d):
            c = center[i]
            for jj in range(8):
                outT[i, j + jj] = X[row0 + idx[j + jj], i] - c
        j += 8
    for jj in range(j, m):
        r = row0 + idx[jj]
        for i in range(d):
            outT[i, jj] = X[r, i] - center[i]


@numba.njit(inline="always", fastmath=FASTMATH, cache=CACHE)
def gather_rows(X, row0, idx, m, center, out):
    """out[j, i] = X[row0 + idx[j], i] - center[i] for j < m and i < D: rows of
    X gathered and centred, as rows (out's columns from D on are left alone).

    Parameters
    ----------
    X : ndarray (n, D)
    row0 : int, idx : ndarray (>= m,), int: the rows row0 + idx[j]
    m : int
    center : ndarray (>= D,), X's dtype
    out : ndarray (>= m, >= D), X's dtype, written

    Inlined into its callers: the pruned MPPCA pass calls it once per block
    (see ``mppca_stats._numba_pruning._anchored_blocks``).
    """
    d = X.shape[1]
    for j in range(m):
        x = X[row0 + idx[j]]
        o = out[j]
        for i in range(d):
            o[i] = x[i] - center[i]


def padded_features(n_features):
    """Feature count rounded up to a multiple of 4, the register-block width.

    Tiles and parameters are zero-padded to this many features so that the
    blocked loops of the kernels need no remainder code.
    """
    return (n_features + 3) // 4 * 4


@numba.njit(fastmath=FASTMATH, cache=CACHE, inline="always")
def new_tile(X, n_rows, tile):
    """An uninitialised (n_rows, >= tile) scratch of X's dtype whose rows from
    X.shape[1] on are zero (the feature padding, see :func:`padded_features`).

    Each row is one 64-byte line longer than ``tile``: with a row stride of a
    power of two bytes, one column's values in every row fall into a few L1
    sets, and the tile copy's strided stores evict each other (a float64
    1M x 32 copy in 128-row tiles went from 35 to 27 ms with the extra line).
    """
    xT = np.empty((n_rows, tile + 64 // X.itemsize), dtype=X.dtype)
    for i in range(X.shape[1], n_rows):
        for t in range(xT.shape[1]):
            xT[i, t] = 0.0
    return xT


@numba.njit(fastmath=FASTMATH, cache=CACHE)
def kept_columns(mass, k, nb, floor, idx):
    """Write the columns t < nb with ``mass[k, t] > floor`` into ``idx[:m]`` in
    increasing order and return m.  NaN counts as kept, so it still reaches the
    sums.  Branch-free (every t is written, m advances on a hit), so the cost
    does not depend on the pattern: about two cycles per column.
    """
    m = 0
    for t in range(nb):
        idx[m] = t
        m += not (mass[k, t] <= floor)
    return m


@numba.njit(fastmath=FASTMATH, cache=CACHE)
def count_kept(mass, k, nb, floor):
    """How many columns t < nb have ``mass[k, t] > floor`` (NaN counts);
    vectorised, a fraction of a cycle per column."""
    m = 0
    for t in range(nb):
        m += not (mass[k, t] <= floor)
    return m


@numba.njit(fastmath=FASTMATH, cache=CACHE)
def kept_masks(mass, nb, floor, masks, counts):
    """Bit k % 64 of ``masks[k // 64, t]`` set when ``mass[k, t] > floor[k]``
    (NaN counts), for the rows t < nb; ``counts[k]`` the number of rows kept
    for component k; returns how many bits are set.

    Vectorised over rows, no listing and no branches: a fraction of a cycle per
    (component, row).  A caller walks each row's set bits (:func:`lowest_bit`)
    to visit its kept components only.

    Parameters
    ----------
    mass : ndarray (K, tile)
    nb : int
    floor : ndarray (K,)
    masks : ndarray (ceil(K / 64), tile), uint64, written
    counts : ndarray (K,), int64, written
    """
    prefer_wide_vectors()
    for w in range(masks.shape[0]):
        for t in range(nb):
            masks[w, t] = 0
    total = 0
    zero = np.uint64(0)
    for k in range(mass.shape[0]):
        f = floor[k]
        w = k >> 6
        bit = np.uint64(1) << np.uint64(k & 63)
        kept = 0
        for t in range(nb):
            keep = not (mass[k, t] <= f)
            masks[w, t] |= bit if keep else zero
            kept += keep
        counts[k] = kept
        total += kept
    return total


@numba.njit(fastmath=FASTMATH, cache=CACHE, inline="always")
def binary_exponent(x):
    """floor(log2(x)) for a normal float64 x > 0, read off its exponent bits
    (so x lies in [2^e, 2^(e+1))); 1024 for +inf and NaN, -1023 for 0 and
    subnormals.  Vectorisable: a shift and a conversion, no log."""
    return np.float64((_bitcast(x, numba.int64) >> np.int64(52)) - np.int64(1023))


@numba.njit(fastmath=FASTMATH, cache=CACHE, inline="always")
def lowest_bit(m):
    """(index of the lowest set bit of the nonzero uint64 m, m without it)."""
    return _trailing_zeros(m), m & (m - np.uint64(1))


@numba.njit(fastmath=FASTMATH, cache=CACHE)
def responsibilities_and_masses(resp, log_prob, scale, const, nb, unit, floor, nk):
    """Finish a tile's responsibilities, add them to N_k, and give each
    (component, row) its weight in the moments with the floor below which
    leaving it out is within rounding (the sparse paths).  One pass.

    On return ``resp[k, t]`` is multiplied by ``scale[t]`` (normalisation
    and sample weight, from :func:`exp_tile` and :func:`row_weights`),
    ``nk[k]`` has the tile's sum of ``resp[k]`` added (summed in the tile's
    dtype, widened once), ``log_prob[k, t]`` holds the mass r (1 + m) of the
    row in component k's statistics, where m = 2 (const_k - log_prob[k, t]) is
    the squared Mahalanobis distance under the current precision (the
    log-density is const_k - m / 2), and ``floor[k] = unit * sum_t mass / nb``.
    Rows with zero responsibility get mass 0.  A NaN or overflowed sum (huge
    sample weights) makes the floor -1, so every row is kept and the NaN or
    infinity reaches the sums as it would without this rule.

    Why this bound: whitened by the current precision, a row adds r m to the
    trace of the second moment, at most r sqrt(m) <= r (1 + m) to the norm of
    the first moment and r to N_k.  The rows at or below the floor carry at
    most nb * floor = unit * (the tile's total mass) of all three, so leaving
    them out of the first and second moments changes those sums by at most
    ``unit`` (the unit roundoff of the tile's dtype) relative to N_k + trace:
    the size of one rounding of each summed term.  The bound is per component
    and per tile, so a component whose every responsibility is tiny (a dying
    one) keeps its relative accuracy.  (A sum, not a max, because it
    vectorises.)

    Parameters
    ----------
    resp : ndarray (K, tile)
        Unnormalised responsibilities; scaled in place.
    log_prob : ndarray (K, tile)
        The log-densities (plus log-weights) before normalisation; overwritten.
    scale : ndarray (tile,)
        Each row's factor (1 / sum of its exponentials, times its sample weight).
    const : ndarray (K,), float64
        The additive constants those log-densities were formed with.
    nb : int
        Columns in use.
    unit : float
        Unit roundoff of the tile's dtype (2^-53 or 2^-24).
    floor : ndarray (K,), float64, written
    nk : ndarray (K,), float64, added to
    """
    prefer_wide_vectors()
    zero = resp.dtype.type(0)
    for k in range(resp.shape[0]):
        c = const[k]
        total = 0.0
        s = zero
        for t in range(nb):
            r = resp[k, t] * scale[t]
            resp[k, t] = r
            s += r
            w = r * (1.0 + 2.0 * (c - log_prob[k, t])) if r != 0 else 0.0
            log_prob[k, t] = w
            total += w
        nk[k] += s
        # an overflowed (or NaN) total keeps every row: no floor to trust
        floor[k] = unit * total / nb if total < np.inf else -1.0


@numba.njit(fastmath=FASTMATH, cache=CACHE)
def select_columns(mass, k, nb, floor, idx):
    """The tile rows that carry component k into its moments.

    With well-separated clusters most of a component's rows carry a negligible
    ``mass`` (at or below ``floor``: see :func:`responsibilities_and_masses`, or mass = resp
    with floor 0 for exactly zero responsibilities).  When those cover more than
    an eighth of the tile, the other rows are listed in ``idx`` (see
    :func:`kept_columns`) and only they become columns of the moments, so a
    caller's per-row moment work runs over those alone; else every row does.

    Returns
    -------
    n_cols : int
        nb (dense) or the count of kept rows.
    dense : bool
        Whether every row is a column (column j is row j; else row ``idx[j]``).
    """
    m = count_kept(mass, k, nb, floor)  # dense tiles skip the listing
    if m * 8 > nb * 7:
        return nb, True
    return kept_columns(mass, k, nb, floor, idx), False


@numba.njit(fastmath=FASTMATH, cache=CACHE)
def centred_columns(xT, nb, resp, k, center, idx, n_cols, dense, cT, wT, want_weighted, first):
    """Centred columns of the rows :func:`select_columns` chose for component k.

    Writes ``cT[i, j] = x_ti - center[i]`` and, with ``want_weighted``,
    ``wT[i, j] = resp[k, t] * cT[i, j]`` for the j-th chosen row t; adds
    sum_j resp[k, t] (x_ti - center[i]) to ``first[i]`` (one tile-dtype sum per
    feature).
    """
    zero = xT.dtype.type(0)
    for i in range(xT.shape[0]):
        c = center[i]
        s = zero
        if dense:  # contiguous: vectorised
            for t in range(nb):
                v = xT[i, t] - c
                cT[i, t] = v
                w = resp[k, t] * v
                if want_weighted:
                    wT[i, t] = w
                s += w
        else:
            for j in range(n_cols):
                t = idx[j]
                v = xT[i, t] - c
                cT[i, j] = v
                w = resp[k, t] * v
                if want_weighted:
                    wT[i, j] = w
                s += w
        first[i] += s


@numba.njit(fastmath=FASTMATH, cache=CACHE)
def tile_moments(wT, vT, nb, out, lower):
    """out[i, j] += sum_t wT[i, t] * vT[j, t] for the first ``nb`` columns.

    Register-blocked 2 x 4 (eight running sums, six loads per eight
    multiply-adds): wT must have an even number of rows and vT a multiple of 4
    (pad with zero rows).  With ``lower`` only the block-lower triangle is
    summed (square case); the 2 x 4 blocks that straddle the diagonal also fill
    a few entries above it, which callers ignore.  Sums run in the tile's dtype
    and are widened once into ``out`` (float64).

    Parameters
    ----------
    wT : ndarray (P, tile)
    vT : ndarray (Q, tile), same dtype
    nb : int
    out : ndarray (P, Q), float64, accumulated into
    lower : bool
    """
    zero = wT.dtype.type(0)
    for i in range(0, wT.shape[0], 2):
        j_end = min(i + 2, vT.shape[0]) if lower else vT.shape[0]
        for j in range(0, j_end, 4):
            s00 = zero
            s01 = zero
            s02 = zero
            s03 = zero
            s10 = zero
            s11 = zero
            s12 = zero
            s13 = zero
            for t in range(nb):
                w0 = wT[i, t]
                w1 = wT[i + 1, t]
                a = vT[j, t]
                b = vT[j + 1, t]
                c = vT[j + 2, t]
                e = vT[j + 3, t]
                s00 += w0 * a
                s01 += w0 * b
                s02 += w0 * c
                s03 += w0 * e
                s10 += w1 * a
                s11 += w1 * b
                s12 += w1 * c
                s13 += w1 * e
            out[i, j] += s00
            out[i, j + 1] += s01
            out[i, j + 2] += s02
            out[i, j + 3] += s03
            out[i + 1, j] += s10
            out[i + 1, j + 1] += s11
            out[i + 1, j + 2] += s12
            out[i + 1, j + 3] += s13


@numba.njit(fastmath=FASTMATH, cache=CACHE)
def accumulate_columns(aT, nb, B, jb, i_end, outT, r0, center=None, sq=None):
    """outT[r0 + c, t] = sum_{i < i_end} (aT[i, t] - center[i]) * B[i, jb + c]
    for c = 0..3 (``center`` None: no centring), and, when ``sq`` (tile,) is
    given, sq[t] = sum_{i < i_end} (aT[i, t] - center[i])^2.

    Four columns of ``a @ B`` over its first ``i_end`` rows of B (written, not
    added).  Register-blocked 4 x 4: each loaded a value feeds four
    multiply-adds (and one more for ``sq``), each output element is loaded and
    stored once per four rows of B.  ``i_end`` must be a multiple of 4 (pad
    with zeros).  Centring on the fly (four subtractions per sixteen
    multiply-adds) costs less than writing and reloading a centred copy of the
    tile; so does taking the squared norm here rather than in a pass of its own
    (the mixture-of-PPCA log-density's ||x - mu_k||^2).
    """
    zero = aT.dtype.type(0)
    for t in range(nb):
        outT[r0, t] = zero
        outT[r0 + 1, t] = zero
        outT[r0 + 2, t] = zero
        outT[r0 + 3, t] = zero
        if sq is not None:
            sq[t] = zero
    for ib in range(0, i_end, 4):
        b00 = B[ib, jb]
        b01 = B[ib, jb + 1]
        b02 = B[ib, jb + 2]
        b03 = B[ib, jb + 3]
        b10 = B[ib + 1, jb]
        b11 = B[ib + 1, jb + 1]
        b12 = B[ib + 1, jb + 2]
        b13 = B[ib + 1, jb + 3]
        b20 = B[ib + 2, jb]
        b21 = B[ib + 2, jb + 1]
        b22 = B[ib + 2, jb + 2]
        b23 = B[ib + 2, jb + 3]
        b30 = B[ib + 3, jb]
        b31 = B[ib + 3, jb + 1]
        b32 = B[ib + 3, jb + 2]
        b33 = B[ib + 3, jb + 3]
        if center is None:
            m0 = zero
            m1 = zero
            m2 = zero
            m3 = zero
        else:
            m0 = center[ib]
            m1 = center[ib + 1]
            m2 = center[ib + 2]
            m3 = center[ib + 3]
        for t in range(nb):
            a0 = aT[ib, t] - m0
            a1 = aT[ib + 1, t] - m1
            a2 = aT[ib + 2, t] - m2
            a3 = aT[ib + 3, t] - m3
            outT[r0, t] += (b00 * a0 + b10 * a1) + (b20 * a2 + b30 * a3)
            outT[r0 + 1, t] += (b01 * a0 + b11 * a1) + (b21 * a2 + b31 * a3)
            outT[r0 + 2, t] += (b02 * a0 + b12 * a1) + (b22 * a2 + b32 * a3)
            outT[r0 + 3, t] += (b03 * a0 + b13 * a1) + (b23 * a2 + b33 * a3)
            if sq is not None:
                sq[t] += (a0 * a0 + a1 * a1) + (a2 * a2 + a3 * a3)


@numba.njit(fastmath=FASTMATH, cache=CACHE)
def tile_matmul(aT, nb, B, outT):
    """outT[j, t] = sum_i aT[i, t] * B[i, j]: a tile of rows times a matrix.

    The rows of aT (= rows of B) and the columns of B must be multiples of 4
    (pad with zeros); see :func:`accumulate_columns`.

    Parameters
    ----------
    aT : ndarray (P, tile)
    nb : int
    B : ndarray (P, Q), same dtype
    outT : ndarray (Q, tile), written
    """
    for jb in range(0, B.shape[1], 4):
        accumulate_columns(aT, nb, B, jb, aT.shape[0], outT, jb)


def tiles_per_run(n_rows, tile):
    """Consecutive tiles one parallel task folds into one set of partial sums.

    A kernel's partial statistics (K D^2 floats for a 'full' mixture) are
    zeroed and merged once per run rather than once per tile (per tile, that
    cost a sixth of a float64 'full' pass at K = 32, D = 16).  The run length depends
    only on the row count -- never on the thread count -- so the sums, and
    their rounding, do not either: 1 tile up to 128 tiles, growing to 8 so
    that there are at least 64 runs to share among the threads.
    """
    n_tiles = (n_rows + tile - 1) // tile
    return int(max(1, min(8, n_tiles // 64)))


def run_count(n_rows, tile, run):
    """Runs of ``run`` tiles of ``tile`` rows that cover ``n_rows`` rows (the
    last run and its last tile may be short)."""
    n_tiles = (n_rows + tile - 1) // tile
    return (n_tiles + run - 1) // run


def group_size(floats_per_tile):
    """Runs per group of a parallel kernel: enough for every thread, with the
    per-run float64 partials of one group within GROUP_BYTES, but at least
    MIN_RUNS_PER_GROUP (each group ends with a wait for every thread)."""
    from fastlvm._config import GROUP_BYTES, MIN_RUNS_PER_GROUP, TILES_PER_GROUP

    fit = max(MIN_RUNS_PER_GROUP, GROUP_BYTES // (8 * floats_per_tile))
    return int(max(numba.get_num_threads(), min(TILES_PER_GROUP, fit)))


@numba.njit(fastmath=FASTMATH, cache=CACHE, inline="always")
def zeroed_row(partials, b):
    """Row ``b`` of a group's partial statistics, zeroed, for the parallel task
    that fills it (then :func:`add_partials` merges the group).

    Each task zeroes its own row, in parallel and in its own cache: zeroing a
    group's rows up front (64 rows of K Dp^2 floats for the E-step's 'full')
    was a serial pass over memory, and with the serial merge it cost up to a
    quarter of a small call (2000 rows).  An element loop: the slice
    assignment row[:] = 0.0 made a k-means Lloyd step 1.1-1.8x slower.
    """
    row = partials[b]
    for j in range(row.shape[0]):
        row[j] = 0.0
    return row
