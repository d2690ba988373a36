// fastlvm CuPy backend: the row-wise CUDA kernels (compiled by NVRTC through
// cupy.RawModule; kernels/_cupy_gaussian.py loads this file).
//
// Design: one warp per row, ROWS_PER_BLOCK warps per block, each lane striding
// over the row's entries; row reductions are warp butterflies (__shfl_xor_sync),
// so every lane ends with the same bits and the order of every sum is fixed by
// the shapes alone: no atomics, results are reproducible run to run.  The
// GEMM-shaped work (the products that feed these kernels) runs on cuBLAS.
//
// Limits: rows are at most 2^63 entries apart (long long strides); one warp per
// row wastes lanes when a row has fewer than 32 entries (K or D < 32), which
// costs little next to the GEMMs.  Control flow reaches every shuffle in every
// thread of a warp (rows past the end run their loops zero times and skip only
// their stores; branches around shuffles are uniform over the warp), which is
// what tests/kernels/cuda_emulator.py checks when it runs these kernels on a CPU.

#include "_cupy_device.cuh"

#define ROWS_PER_BLOCK 8

// what row_softmax writes for each entry (the row's log-normaliser always)
#define MODE_LOG_PROB 0  // the entry L itself (no reduction)
#define MODE_LOG_RESP 1  // L - logsumexp(L)
#define MODE_RESP 2      // exp(L - logsumexp(L)) * w_row
#define MODE_NORM 3      // nothing per entry

// L[row, k] = g[row, k] (+ q[row] * s[k]) (+ c[k])
template <typename T>
__device__ __forceinline__ T entry(const T* g, long long g_row, long long g_sk, T qn,
                                   const T* s, const T* c, long long k, int has_qs,
                                   int has_c) {
    T v = g[g_row + k * g_sk];
    if (has_qs) v += qn * s[k];
    if (has_c) v += c[k];
    return v;
}

// Row-wise log-sum-exp over the K entries L[row, :] of n rows, with the row's
// log-normaliser written to norm[row] and, by mode, L, log-responsibilities or
// weighted responsibilities written to out (which may alias g: each entry is
// read and written by the same lane only).  Semantics follow
// log_responsibilities_ref: a row that is all -inf gets -inf and NaN entries,
// NaN and +inf propagate as in v - logsumexp(v).
template <typename T>
__global__ void row_softmax(const T* g, long long g_sn, long long g_sk, const T* q,
                            const T* s, const T* c, const T* w, T* out, long long o_sn,
                            long long o_sk, T* norm, long long n, long long K,
                            long long has_qs, long long has_c, long long has_w,
                            long long mode) {
    const int lane = threadIdx.x & 31;
    const long long row = (long long)blockIdx.x * ROWS_PER_BLOCK + (threadIdx.x >> 5);
    const bool live = row < n;
    const long long kk = live ? K : 0;  // trip count
    const long long g_row = live ? row * g_sn : 0;
    const long long o_row = live ? row * o_sn : 0;
    const T qn = (has_qs && live) ? q[row] : T(0);
    if (mode == MODE_LOG_PROB) {
        for (long long k = lane; k < kk; k += 32)
            out[o_row + k * o_sk] = entry(g, g_row, g_sk, qn, s, c, k, has_qs, has_c);
        return;
    }
    T m = neg_inf<T>();
    for (long long k = lane; k < kk; k += 32) {
        const T v = entry(g, g_row, g_sk, qn, s, c, k, has_qs, has_c);
        m = (v > m) ? v : m;
    }
    m = warp_max(m);
    const bool finite = finite_max(m);  // the rule of _cupy_device.cuh
    const T shift = finite ? m : T(0);
    T sum = T(0);
    for (long long k = lane; k < kk; k += 32)
        sum += exp_t(entry(g, g_row, g_sk, qn, s, c, k, has_qs, has_c) - shift);
    sum = warp_sum(sum);
    const T log_sum = log_t(sum);
    const T lse = finite ? shift + log_sum : m;
    if (live && lane == 0) norm[row] = lse;
    if (mode == MODE_NORM) return;
    const T wn = (has_w && live) ? w[row] : T(1);
    for (long long k = lane; k < kk; k += 32) {
        const T v = entry(g, g_row, g_sk, qn, s, c, k, has_qs, has_c);
        T r;
        if (mode == MODE_LOG_RESP)
            r = finite ? (v - shift) - log_sum : v - lse;
        else
            r = exp_t(v - lse) * wn;
        out[o_row + k * o_sk] = r;
    }
}

// out[row] = scale * sum_j y[row, j]^2 (+ offset[row / group] when has_offset) for n
// contiguous rows of d entries: 'tied''s q (scale 1), and 'full''s per-component
// c_k - |z U_k|^2 / 2 over K groups of m rows (scale -1/2, offset c; the scaling by
// a power of two is exact, so this rounds as the separate operations did).
template <typename T>
__global__ void row_sumsq(const T* y, long long n, long long d, double scale,
                          const T* offset, long long group, long long has_offset, T* out) {
    const int lane = threadIdx.x & 31;
    const long long row = (long long)blockIdx.x * ROWS_PER_BLOCK + (threadIdx.x >> 5);
    const bool live = row < n;
    const long long dd = live ? d : 0;
    const T* y_row = y + (live ? row * d : 0);
    T acc = T(0);
    for (long long j = lane; j < dd; j += 32) {
        const T v = y_row[j];
        acc += v * v;
    }
    acc = warp_sum(acc);
    if (live && lane == 0) {
        T v = (T)scale * acc;
        if (has_offset) v += offset[row / group];
        out[row] = v;
    }
}

// The chunk's shifted rows, one warp per row: x' = x - c0 for n rows of d features
// (element strides x_sn, x_sd), written C order into out (n, W): x' in columns
// 0..d-1, then x' * x' in columns d..2d-1 with squares = 1 ('diag''s [x', x' * x']
// block), then |x'|^2 with q_column = 1 and a column of ones with ones = 1 (the
// moments' right operand [x', ..., q, 1]: R^T of it holds N_k in its last column),
// W = d (1 + squares) + q_column + ones.  With has_sumsq, sumsq[row] = |x'|^2, summed
// as row_sumsq sums (lane-strided, then the warp butterfly); with has_split, split
// (n, 3 W) = [hi, hi, lo] of that row, hi its entries rounded to TF32 and lo = v - hi
// (the left operand of a 'tf32x3' product, kernels/_cupy_tf32.py).  One pass over X
// where subtracting, squaring, concatenating and splitting were several.
template <typename T>
__device__ __forceinline__ void write_split(T* sp, long long w, long long j, T u) {
    const T hi = tf32_hi(u);
    sp[j] = hi;
    sp[w + j] = hi;
    sp[2 * w + j] = u - hi;
}

template <typename T>
__global__ void shift_rows(const T* x, long long x_sn, long long x_sd, const T* c0,
                           long long n, long long d, long long squares, long long q_column,
                           long long ones, long long has_sumsq, long long has_split, T* out,
                           T* sumsq, T* split) {
    const int lane = threadIdx.x & 31;
    const long long row = (long long)blockIdx.x * ROWS_PER_BLOCK + (threadIdx.x >> 5);
    const bool live = row < n;
    const long long dd = live ? d : 0;
    const long long w = squares ? 2 * d : d;
    const long long width = w + q_column + ones;
    const T* x_row = x + (live ? row * x_sn : 0);
    T* o = out + (live ? row * width : 0);
    T* sp = split + (live && has_split ? row * 3 * width : 0);
    T acc = T(0);
    for (long long j = lane; j < dd; j += 32) {
        const T v = x_row[j * x_sd] - c0[j];
        o[j] = v;
        if (squares) o[d + j] = v * v;
        if (has_split) {
            write_split(sp, width, j, v);
            if (squares) write_split(sp, width, d + j, v * v);
        }
        acc += v * v;
    }
    if (has_sumsq || q_column) {  // uniform over the grid
        acc = warp_sum(acc);
        if (live && lane == 0) {
            if (has_sumsq) sumsq[row] = acc;
            if (q_column) {
                o[w] = acc;
                if (has_split) write_split(sp, width, w, acc);
            }
        }
    }
    if (ones && live && lane == 0) {
        o[width - 1] = T(1);
        if (has_split) write_split(sp, width, width - 1, T(1));
    }
}

// Column sums of an (n, w) array with element strides (s_n, s_w), in double, by
// blocks of `rows` rows: one warp per (row block, group of 32 columns), lane j
// adding column 32 g + j over the block's rows in order into out[block, column]
// (out: (ceil(n / rows), w), C order).  A row is read along the warp, so a
// row-major array is read once, coalesced, in its own type: no double copy of it.
// Lanes never exchange values (no shuffles), so a lane past the last column or a
// warp past the last block simply returns.
template <typename T>
__global__ void column_partials(const T* a, long long s_n, long long s_w, long long n,
                                long long w, long long rows, double* out) {
    const int lane = threadIdx.x & 31;
    const long long item = (long long)blockIdx.x * ROWS_PER_BLOCK + (threadIdx.x >> 5);
    const long long groups = (w + 31) / 32;
    const long long block = item / groups, col = (item % groups) * 32 + lane;
    const long long first = block * rows;
    if (first >= n || col >= w) return;
    const long long last = (first + rows < n) ? first + rows : n;
    double sum = 0.0;
    for (long long r = first; r < last; ++r) sum += (double)a[r * s_n + col * s_w];
    out[block * w + col] = sum;
}

// Log-densities of a mixture of PPCA (kernels/_low_rank.py has the algebra), one
// warp per row, the K components in turn: c = x - mu_k (lanes over features),
// u_j = B_k[:, j] . c (one warp sum per latent dimension, four at a time) and
//
//     out[row, k] = cst[k] - (|c|^2 - |u|^2) / (2 sigma_k^2).
//
// That difference cancels when the row lies close to the component's subspace:
// where it keeps less than `cancel` of |c|^2 (float 2^-6, double 2^-12, as the
// Numba kernel), the warp recomputes the entry in double from the explicit
// residual |c - B_k u|^2 / sigma_k^2 + |L_k^{-T} u|^2 with double parameters
// (bt64, lt64, inv_noise64, cst64); u goes through scratch64 (q doubles per
// row), ordered by __syncwarp.  The branch is uniform over the warp (every lane
// holds the reduced sums).  When has_stats, u_out[row, k, :] = u and
// sq_out[row, k] = |c|^2 for the statistics.  Layouts, all C order: mu (K, d),
// bt and bt64 (K, q, d) = B_k^T, lt64 (K, q, q) = L_k^{-T}, out and sq_out
// (n, K), u_out (n, K, q), scratch64 (n, q).
template <typename T>
__global__ void low_rank_log_prob(const T* x, long long x_sn, long long x_sd, const T* mu,
                                  const T* bt, const T* inv_noise, const T* cst,
                                  const double* bt64, const double* lt64,
                                  const double* inv_noise64, const double* cst64,
                                  double cancel, T* out, T* u_out, T* sq_out,
                                  double* scratch64, long long n, long long d, long long K,
                                  long long q, long long has_stats) {
    const int lane = threadIdx.x & 31;
    const long long row = (long long)blockIdx.x * ROWS_PER_BLOCK + (threadIdx.x >> 5);
    const bool live = row < n;
    const long long dd = live ? d : 0;  // trip count of the loops over features
    const T* x_row = x + (live ? row * x_sn : 0);
    double* u64 = scratch64 + (live ? row * q : 0);
    for (long long k = 0; k < K; ++k) {
        const T* mu_k = mu + k * d;
        const T* bt_k = bt + k * q * d;
        T sq = T(0);
        for (long long f = lane; f < dd; f += 32) {
            const T c = x_row[f * x_sd] - mu_k[f];
            sq += c * c;
        }
        sq = warp_sum(sq);
        T uu = T(0);
        for (long long j0 = 0; j0 < q; j0 += 4) {
            const long long nj = (q - j0 < 4) ? q - j0 : 4;
            T a[4] = {T(0), T(0), T(0), T(0)};
            for (long long f = lane; f < dd; f += 32) {
                const T c = x_row[f * x_sd] - mu_k[f];
                for (int t = 0; t < 4; ++t)
                    if (t < nj) a[t] += c * bt_k[(j0 + t) * d + f];
            }
            for (int t = 0; t < 4; ++t) {
                if (t < nj) {
                    a[t] = warp_sum(a[t]);
                    uu += a[t] * a[t];
                    if (has_stats && live && lane == ((j0 + t) & 31))
                        u_out[(row * K + k) * q + j0 + t] = a[t];
                }
            }
        }
        const T diff = sq - uu;
        T logp = cst[k] - T(0.5) * diff * inv_noise[k];
        if ((double)diff < cancel * (double)sq) {  // uniform over the warp
            const double* bt64_k = bt64 + k * q * d;
            const double* lt64_k = lt64 + k * q * q;
            for (long long j = 0; j < q; ++j) {
                double a = 0.0;
                for (long long f = lane; f < dd; f += 32)
                    a += ((double)x_row[f * x_sd] - (double)mu_k[f]) * bt64_k[j * d + f];
                a = warp_sum(a);
                if (live && lane == (j & 31)) u64[j] = a;
            }
            __syncwarp();
            double rr = 0.0;
            for (long long f = lane; f < dd; f += 32) {
                double r = (double)x_row[f * x_sd] - (double)mu_k[f];
                for (long long j = 0; j < q; ++j) r -= bt64_k[j * d + f] * u64[j];
                rr += r * r;
            }
            double zz = 0.0;
            for (long long j = lane; j < (live ? q : 0); j += 32) {
                double z = 0.0;
                for (long long i = j; i < q; ++i) z += lt64_k[j * q + i] * u64[i];
                zz += z * z;
            }
            rr = warp_sum(rr);
            zz = warp_sum(zz);
            __syncwarp();  // every lane has read u64 before the next component writes it
            logp = (T)(cst64[k] - 0.5 * (rr * inv_noise64[k] + zz));
        }
        if (live && lane == 0) {
            out[row * K + k] = logp;
            if (has_stats) sq_out[row * K + k] = sq;
        }
    }
}
