# Loops written directly in LLVM IR, for the few hot spots where Numba's own
# loops lose to their set-up or keep their sums in memory.
#
# Design: LLVM vectorises a Numba loop only after run-time checks that its
# arrays do not overlap, plus a set-up and remainder around the vector body.
# Where the body is short (a D = 32 row), those cost more than the arithmetic;
# and a sum into an array element stays a load and a store per term.  The
# intrinsics here emit the loops themselves, in explicit vectors of eight
# float64 sums (one 64-byte line; float32 data is loaded eight values at a
# time and widened), the running sums in registers and a scalar remainder,
# with no overlap checks: sound because every caller passes accumulators that
# the kernel allocated and inputs it only reads.  Each has a plain-Numba twin
# for layouts it does not take, tested against NumPy, and every kernel that
# calls one is tested against its NumPy reference.  Limits: C-contiguous
# arrays, float32/float64; products and sums are IEEE (multiply-adds fused,
# no reassociation).
#
# The E-step's listing of marked pairs (``list_marked``) is here too: a loop
# whose compaction LLVM does not vectorise from Numba code, and which takes
# LLVM's vector compress in its place.
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

from ._numba_support import CACHE, FASTMATH, _byte_pointer, _element_pointer

_LINE_BYTES = 64  # one vector: a cache line, a 512-bit register


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
# Listed rows into one component's first and second moments (the E-step's
# sparse path)


@intrinsic
def _add_centred_rows(typingctx, X, row0, rows, start, stop, weights, k, centers, first, second,
                      want_second):
    """For the listed rows t = rows[start:stop], with r = weights[k, t]:
    first[k, :D] += sum r (X[row0 + t] - centers[k]) and, when ``want_second``,
    second[k, 0, :D] += sum r (X[row0 + t] - centers[k])**2.

    X (n, D), weights (K, tile) and centers (K, >= D) share a float dtype; rows
    is int64; first (K, >= D) and second (K, 1, >= D) are float64 and alias
    nothing else.  The features go in passes of up to four vectors (32 float64
    or float32 columns); a pass keeps its sums in registers over all the
    listed rows and adds them into ``first``/``second`` once, so the rows of a
    component cost loads and multiply-adds, not a read and write of its
    accumulators each.  The last D % 8 columns go one per pass.  Differences
    are taken in the data's dtype, then widened; the sums run in float64,
    row by row in list order.
    """
    if not (_c_float_arrays((X, weights, centers, first, second), (2, 2, 2, 2, 3))
            and X.dtype == weights.dtype == centers.dtype
            and first.dtype == second.dtype == types.float64
            and isinstance(rows, types.Array) and rows.ndim == 1 and rows.layout == "C"
            and rows.dtype == types.int64):
        return None
    sig = types.void(X, row0, rows, start, stop, weights, k, centers, first, second, want_second)

    def codegen(context, builder, signature, args):
        ty = signature.args
        x_arr, rows_arr, w_arr, c_arr, f_arr, q_arr, want_v = (args[i]
                                                              for i in (0, 2, 5, 7, 8, 9, 10))
        intp = context.get_value_type(types.intp)
        elt = context.get_value_type(ty[0].dtype)
        size = ty[0].dtype.bitwidth // 8
        f64 = ir.DoubleType()
        width = _LINE_BYTES // 8
        row0_i, start_i, stop_i, k_i = (
            context.cast(builder, args[i], ty[i], types.intp) for i in (1, 3, 4, 6))
        xb, xs, xsh = _byte_pointer(context, builder, ty[0], x_arr)
        tb, _, _ = _byte_pointer(context, builder, ty[2], rows_arr)
        wb, ws, _ = _byte_pointer(context, builder, ty[5], w_arr)
        cb, cs, _ = _byte_pointer(context, builder, ty[7], c_arr)
        fb, fs, _ = _byte_pointer(context, builder, ty[8], f_arr)
        qb, qs, _ = _byte_pointer(context, builder, ty[9], q_arr)
        n_cols = xsh[1]

        def const(v):
            return ir.Constant(intp, v)

        def emit_pass(col, n_acc, lanes, second):
            """Sums over the listed rows of columns col + g * lanes, g < n_acc."""
            src_type = ir.VectorType(elt, lanes) if lanes > 1 else elt
            acc_type = ir.VectorType(f64, lanes) if lanes > 1 else f64
            cols = [builder.add(col, const(g * lanes)) for g in range(n_acc)]
            centre = [builder.load(_element_pointer(builder, cb, k_i, cs[0], c, size, src_type),
                                   align=size) for c in cols]
            sums = [[cgutils.alloca_once(builder, acc_type) for _ in range(n_acc)]
                    for _ in range(2 if second else 1)]
            for acc in sums:
                for a in acc:
                    builder.store(ir.Constant(acc_type, None), a)
            with cgutils.for_range(builder, stop_i, start=start_i) as loop:
                t = builder.load(builder.gep(builder.bitcast(tb, ir.IntType(64).as_pointer()),
                                             [loop.index]), align=8)
                r = builder.load(_element_pointer(builder, wb, k_i, ws[0], t, size, elt),
                                 align=size)
                if elt != f64:
                    r = builder.fpext(r, f64)
                if lanes > 1:
                    r = _splat(builder, r, acc_type)
                row = builder.add(row0_i, t)
                for g, c in enumerate(cols):
                    v = builder.fsub(
                        builder.load(_element_pointer(builder, xb, row, xs[0], c, size, src_type),
                                     align=size), centre[g])
                    if elt != f64:
                        v = builder.fpext(v, acc_type)
                    u = builder.fmul(r, v)
                    builder.store(builder.fadd(builder.load(sums[0][g]), u), sums[0][g])
                    if second:
                        builder.store(builder.call(_fma(builder, acc_type),
                                                   [u, v, builder.load(sums[1][g])]), sums[1][g])
            for acc, base, stride in zip(sums, (fb, qb), (fs[0], qs[0])):
                for a, c in zip(acc, cols):
                    at = _element_pointer(builder, base, k_i, stride, c, 8, acc_type)
                    builder.store(builder.fadd(builder.load(at, align=8), builder.load(a)), at,
                                  align=8)

        def emit(second):
            block = 4 * width
            n_blocks = builder.sdiv(n_cols, const(block))
            with cgutils.for_range(builder, n_blocks) as loop:
                emit_pass(builder.mul(loop.index, const(block)), 4, width, second)
            done = builder.mul(n_blocks, const(block))
            left = builder.sdiv(builder.sub(n_cols, done), const(width))
            for n_acc in (1, 2, 3):
                with builder.if_then(builder.icmp_signed("==", left, const(n_acc))):
                    emit_pass(done, n_acc, width, second)
            tail = builder.add(done, builder.mul(left, const(width)))
            with cgutils.for_range(builder, n_cols, start=tail) as loop:
                emit_pass(loop.index, 1, 1, second)

        want = context.cast(builder, want_v, ty[10], types.boolean)
        with builder.if_else(want) as (with_second, first_only):
            with with_second:
                emit(True)
            with first_only:
                emit(False)
        return context.get_dummy_value()

    return sig, codegen


@numba.njit(fastmath=FASTMATH, cache=CACHE)
def _add_centred_rows_loop(X, row0, rows, start, stop, weights, k, centers, first, second,
                           want_second):
    """:func:`add_centred_rows` as plain loops (any layout)."""
    for j in range(start, stop):
        t = rows[j]
        r = np.float64(weights[k, t])
        for i in range(X.shape[1]):
            v = np.float64(X[row0 + t, i] - centers[k, i])
            u = r * v
            first[k, i] += u
            if want_second:
                second[k, 0, i] += u * v


def add_centred_rows(X, row0, rows, start, stop, weights, k, centers, first, second,
                     want_second):
    """Add the listed rows of X, centred on component k, into its moments:
    for t in ``rows[start:stop]`` and r = weights[k, t],
    first[k, i] += r (X[row0 + t, i] - centers[k, i]) for i < D and, when
    ``want_second``, second[k, 0, i] += r (X[row0 + t, i] - centers[k, i])**2:
    the differences in X's dtype, the rest in float64.

    Inside compiled code this is :func:`_add_centred_rows` when every array is
    C-contiguous, else plain loops.

    Parameters
    ----------
    X : ndarray (n, D), float32 or float64
    row0 : int
        The row of X that t = 0 names.
    rows : ndarray (m,), int64
    start, stop : int
        The slice of ``rows`` to add.
    weights : ndarray (K, tile), X's dtype
    k : int
    centers : ndarray (K, >= D), X's dtype
    first : ndarray (K, >= D), float64, updated
    second : ndarray (K, 1, >= D), float64, updated when ``want_second``
    want_second : bool
    """
    _add_centred_rows_loop(X, row0, rows, start, stop, weights, k, centers, first, second,
                           want_second)


@overload(add_centred_rows, inline="always", fastmath=FASTMATH)
def _add_centred_rows_overload(X, row0, rows, start, stop, weights, k, centers, first, second,
                               want_second):
    if all(a.layout == "C" for a in (X, rows, weights, centers, first, second)):
        def impl(X, row0, rows, start, stop, weights, k, centers, first, second, want_second):
            _add_centred_rows(X, row0, rows, start, stop, weights, k, centers, first, second,
                              want_second)
    else:
        def impl(X, row0, rows, start, stop, weights, k, centers, first, second, want_second):
            _add_centred_rows_loop(X, row0, rows, start, stop, weights, k, centers, first,
                                   second, want_second)
    return impl


# ---------------------------------------------------------------------------
# One component's marked rows of a tile, listed (the E-step's marking)

# integer maxima of log-values are taken over values clamped to +-_LOG_CLAMP
_LOG_CLAMP = 1e9
# rows per step of _list_marked, and the room its whole-vector stores need
# past the lists' end
_LIST_LANES = 8


def _scalar_int_max(builder, a, b):
    return builder.select(builder.icmp_signed(">", a, b), a, b)


@intrinsic
def _list_marked(typingctx, logp, mx, lw, k, nb, floor, thr, rows, vals, pos):
    """For t < nb, with a = logp[k, t] - mx[t] and b = a + lw[t] (in the
    dtype): where a >= floor or b >= thr, append t to ``rows`` and a to
    ``vals`` from index ``pos`` on, in increasing t.  Returns (the new end of
    the lists, max_t of b clamped to +-1e9 and truncated to an integer).

    Eight rows at a time: the comparisons give a mask, LLVM's vector compress
    packs the selected lanes of the row indices and of a into the low lanes
    (AVX-512's vpcompress in registers; other targets expand it), both are
    stored whole at the lists' end, and the end advances by the mask's
    population count.  No branch depends on the data, so the cost does not
    depend on the pattern (a walk over per-row bit masks mispredicted its
    exits).  Stored through LLVM's compressing store (vpcompress to memory)
    this ran 2-3x slower.  The last nb % 8 rows go one at a time.  logp
    (K, tile), mx and lw (tile,) and vals share a float dtype; rows is int64;
    the lists need room for nb + 8 more entries (the whole-vector stores).
    """
    arrays = (logp, mx, lw, rows, vals)
    if not (all(isinstance(a, types.Array) and a.layout == "C" for a in arrays)
            and logp.ndim == 2 and all(a.ndim == 1 for a in arrays[1:])
            and logp.dtype in (types.float32, types.float64)
            and logp.dtype == mx.dtype == lw.dtype == vals.dtype and rows.dtype == types.int64):
        return None
    sig = types.UniTuple(types.int64, 2)(logp, mx, lw, k, nb, floor, thr, rows, vals, pos)

    def codegen(context, builder, signature, args):
        ty = signature.args
        lp_arr, mx_arr, lw_arr, rows_arr, vals_arr = (args[i] for i in (0, 1, 2, 7, 8))
        intp = context.get_value_type(types.intp)
        i64 = ir.IntType(64)
        i32 = ir.IntType(32)
        elt = context.get_value_type(ty[0].dtype)
        size = ty[0].dtype.bitwidth // 8
        # eight rows a step in both dtypes, so the row indices are one 512-bit
        # vector of int64 (sixteen float32 rows a step, a <16 x i64> compress,
        # segfaulted here; not pinned down)
        lanes = _LIST_LANES
        vec = ir.VectorType(elt, lanes)
        ivec = ir.VectorType(i64, lanes)
        mvec = ir.VectorType(ir.IntType(1), lanes)
        k_i, nb_i, pos_i = (context.cast(builder, args[i], ty[i], types.intp) for i in (3, 4, 9))
        floor_v, thr_v = (context.cast(builder, args[i], ty[i], ty[0].dtype) for i in (5, 6))
        lb, ls, _ = _byte_pointer(context, builder, ty[0], lp_arr)
        xb, _, _ = _byte_pointer(context, builder, ty[1], mx_arr)
        wb, _, _ = _byte_pointer(context, builder, ty[2], lw_arr)
        rb, _, _ = _byte_pointer(context, builder, ty[7], rows_arr)
        vb, _, _ = _byte_pointer(context, builder, ty[8], vals_arr)
        zero = ir.Constant(intp, 0)
        low = ir.Constant(elt, -_LOG_CLAMP)
        high = ir.Constant(elt, _LOG_CLAMP)
        compress_t = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ivec, [ivec, mvec, ivec]),
            f"llvm.experimental.vector.compress.v{lanes}i64")
        compress_a = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vec, [vec, mvec, vec]),
            f"llvm.experimental.vector.compress.v{lanes}{_float_name(elt)}")
        popcount = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.IntType(lanes), [ir.IntType(lanes)]),
            f"llvm.ctpop.i{lanes}")
        rows_p = builder.bitcast(rb, i64.as_pointer())
        vals_p = builder.bitcast(vb, elt.as_pointer())
        end = cgutils.alloca_once_value(builder, pos_i)
        top_vec = cgutils.alloca_once_value(
            builder, ir.Constant(ir.VectorType(i32, lanes), [int(-_LOG_CLAMP)] * lanes))
        top = cgutils.alloca_once_value(builder, ir.Constant(i32, int(-_LOG_CLAMP)))
        floor_s, thr_s = (_splat(builder, v, vec) for v in (floor_v, thr_v))
        low_s, high_s = (_splat(builder, v, vec) for v in (low, high))
        steps = ir.Constant(ivec, list(range(lanes)))
        whole = builder.mul(builder.sdiv(nb_i, ir.Constant(intp, lanes)),
                            ir.Constant(intp, lanes))

        def clamp_int(builder, b, low, high):
            """fptosi(min(max(b, low), high)) as i32 (NaN -> low)."""
            b = builder.select(builder.fcmp_ordered(">=", b, low), b, low)
            b = builder.select(builder.fcmp_ordered("<=", b, high), b, high)
            return builder.fptosi(b, i32 if not isinstance(b.type, ir.VectorType)
                                  else ir.VectorType(i32, lanes))

        def compare(t, value_type, floor, thr):
            """(a, b, keep) for the row(s) from t on, a scalar or a vector."""
            lp, m, w = (builder.load(_element_pointer(builder, base, row, stride, t, size,
                                                      value_type), align=size)
                        for base, row, stride in ((lb, k_i, ls[0]), (xb, zero, zero),
                                                  (wb, zero, zero)))
            a = builder.fsub(lp, m)
            b = builder.fadd(a, w)
            keep = builder.or_(builder.fcmp_ordered(">=", a, floor),
                               builder.fcmp_ordered(">=", b, thr))
            return a, b, keep

        with cgutils.for_range_slice(builder, zero, whole, ir.Constant(intp, lanes)) as (t, _):
            a, b, keep = compare(t, vec, floor_s, thr_s)
            at = builder.load(end)
            index = builder.add(_splat(builder, t, ivec), steps)
            # compressed in registers, stored whole: the lanes past the count
            # are overwritten by the next store or left past the lists' end
            builder.store(builder.call(compress_t, [index, keep, ir.Constant(ivec, ir.Undefined)]),
                          builder.bitcast(builder.gep(rows_p, [at]), ivec.as_pointer()), align=8)
            builder.store(builder.call(compress_a, [a, keep, ir.Constant(vec, ir.Undefined)]),
                          builder.bitcast(builder.gep(vals_p, [at]), vec.as_pointer()),
                          align=size)
            count = builder.call(popcount, [builder.bitcast(keep, ir.IntType(lanes))])
            builder.store(builder.add(at, builder.zext(count, intp)), end)
            bi = clamp_int(builder, b, low_s, high_s)
            old = builder.load(top_vec)
            builder.store(builder.select(builder.icmp_signed(">", bi, old), bi, old), top_vec)
        with cgutils.for_range(builder, nb_i, start=whole) as loop:
            t = loop.index
            a, b, keep = compare(t, elt, floor_v, thr_v)
            at = builder.load(end)
            with builder.if_then(keep):
                builder.store(t, builder.gep(rows_p, [at]))
                builder.store(a, builder.gep(vals_p, [at]))
                builder.store(builder.add(at, ir.Constant(intp, 1)), end)
            builder.store(_scalar_int_max(builder, clamp_int(builder, b, low, high),
                                          builder.load(top)), top)
        tv = builder.load(top_vec)
        best = builder.load(top)
        for lane in range(lanes):
            best = _scalar_int_max(builder, builder.extract_element(tv, ir.Constant(i32, lane)),
                                   best)
        return context.make_tuple(builder, signature.return_type,
                                  [builder.load(end), builder.sext(best, i64)])

    return sig, codegen


@numba.njit(fastmath=FASTMATH, cache=CACHE)
def _list_marked_loop(logp, mx, lw, k, nb, floor, thr, rows, vals, pos):
    """:func:`list_marked` as a plain loop (any layout)."""
    top = np.int32(-_LOG_CLAMP)
    low = logp.dtype.type(-_LOG_CLAMP)
    high = logp.dtype.type(_LOG_CLAMP)
    for t in range(nb):
        a = logp[k, t] - mx[t]
        b = a + lw[t]
        if a >= floor or b >= thr:
            rows[pos] = t
            vals[pos] = a
            pos += 1
        top = max(top, np.int32(min(max(b, low), high)))
    return pos, np.int64(top)


def list_marked(logp, mx, lw, k, nb, floor, thr, rows, vals, pos):
    """List component k's marked rows of a tile: for t < nb, with
    a = logp[k, t] - mx[t] and b = a + lw[t] (in the dtype), where a >= floor
    or b >= thr, append t to ``rows`` and a to ``vals`` from ``pos`` on, in
    increasing t.

    Inside compiled code this is :func:`_list_marked` (a compressing store a
    vector at a time) when every array is C-contiguous, else a plain loop.

    Parameters
    ----------
    logp : ndarray (K, tile), float32 or float64
    mx, lw : ndarray (tile,), logp's dtype
    k, nb : int
    floor, thr : float
    rows : ndarray (>= pos + nb + 8,), int64, written from ``pos``
    vals : ndarray (>= pos + nb + 8,), logp's dtype, written from ``pos``
    pos : int

    Returns
    -------
    (int, int)
        The lists' new end, and max_t of b clamped to +-1e9 and truncated to
        an integer (so max_t b lies in [top - 1, top + 1)).
    """
    return _list_marked_loop(logp, mx, lw, k, nb, floor, thr, rows, vals, pos)


@overload(list_marked, inline="always", fastmath=FASTMATH)
def _list_marked_overload(logp, mx, lw, k, nb, floor, thr, rows, vals, pos):
    if all(a.layout == "C" for a in (logp, mx, lw, rows, vals)):
        def impl(logp, mx, lw, k, nb, floor, thr, rows, vals, pos):
            return _list_marked(logp, mx, lw, k, nb, floor, thr, rows, vals, pos)
    else:
        def impl(logp, mx, lw, k, nb, floor, thr, rows, vals, pos):
            return _list_marked_loop(logp, mx, lw, k, nb, floor, thr, rows, vals, pos)
    return impl
