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
// thread of a block (rows past the end run their loops zero times and skip only
// their stores), so a block can also be run with block-wide barriers, which is
// how tests/kernels/cuda_emulator.py checks these kernels on a CPU.

#define ROWS_PER_BLOCK 8
#define FULL_MASK 0xffffffffu

// what row_softmax writes for each entry (the row's log-normaliser always)
#define MODE_LOG_PROB 0  // the entry L itself (no reduction)
#define MODE_LOG_RESP 1  // L - logsumexp(L)
#define MODE_RESP 2      // exp(L - logsumexp(L)) * w_row
#define MODE_NORM 3      // nothing per entry

template <typename T> __device__ __forceinline__ T neg_inf();
template <> __device__ __forceinline__ float neg_inf<float>() {
    return __int_as_float(0xff800000);
}
template <> __device__ __forceinline__ double neg_inf<double>() {
    return __longlong_as_double(0xfff0000000000000LL);
}

__device__ __forceinline__ float exp_t(float x) { return expf(x); }
__device__ __forceinline__ double exp_t(double x) { return exp(x); }
__device__ __forceinline__ float log_t(float x) { return logf(x); }
__device__ __forceinline__ double log_t(double x) { return log(x); }

template <typename T> __device__ __forceinline__ T warp_sum(T v) {
    for (int offset = 16; offset > 0; offset >>= 1)
        v += __shfl_xor_sync(FULL_MASK, v, offset);
    return v;
}

template <typename T> __device__ __forceinline__ T warp_max(T v) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        T u = __shfl_xor_sync(FULL_MASK, v, offset);
        v = (u > v) ? u : v;
    }
    return v;
}

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
    // a NaN entry makes the sum NaN, so the row comes out NaN whether or not the
    // maximum saw it; an infinite maximum is not subtracted
    const bool finite = (m == m) && (m > neg_inf<T>()) && (m < -neg_inf<T>());
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

// out[row] = sum_j y[row, j]^2 for n contiguous rows of d entries.
template <typename T>
__global__ void row_sumsq(const T* y, long long n, long long d, T* out) {
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
    if (live && lane == 0) out[row] = acc;
}
