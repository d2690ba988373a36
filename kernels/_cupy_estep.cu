// fastlvm CuPy backend: the E-step of a Gaussian mixture with few components as one
// or two kernels (compiled by NVRTC through cupy.RawModule; kernels/estep_stats/
// _cupy_tiles.py plans the launches and reads the statistics out).
//
// Design: a block takes a fixed run of tiles of rows (the plan fixes the runs from
// n alone) and works on each tile in shared memory:
//   B = the tile's rows shifted by c0, x' = x - c0, with the columns the moments
//       need: [x', 1] ('full'), [x', x' * x', 1] ('diag'), [x', q, 1] ('spherical',
//       q = |x'|^2; 'tied', q = |x' U|^2);
//   A = the responsibilities times the row's weight, w_r exp(L - logsumexp_k L),
//       from the log-densities L (one warp per row, a butterfly over k, as
//       row_softmax in _cupy_rows.cu); 'tied' appends w_r x'.
// The moments are entries of A^T B, each thread owning one 4 x 4 output tile (a
// "micro-tile") and, where there are fewer micro-tiles than threads, one of
// `phases` interleaved subsets of the tile's rows.  A micro-tile's sums over one
// tile run in T and are added to the thread's float64 registers; at the block's
// end they go to its own slots of the block's partial rows in `parts` (float64,
// slot 0 of the first the log-likelihood), which the caller adds in a fixed order.
//
// estep_tiles does all of it for 'tied', 'diag' and 'spherical'.  'full' is two
// kernels: full_log_norm writes each row's log-normaliser (n numbers, never n x K),
// then full_moments, one block per (run of tiles, component k), recomputes L_k with
// the same function, and sums the upper triangle of r z~ z~^T with z~ = [x' - mu'_k,
// 1] (moments around mu'_k: nothing cancels).  No atomics anywhere, and launch
// shapes that depend on n, K and D alone: the same bits every run.
//
// Limits: a tile lives in a static 48 KiB of shared memory (SMEM_DOUBLES; the plan
// checks that it fits), which bounds K + D; a block has THREADS threads and each at
// most one micro-tile (the plan sends larger problems to the chunked cuBLAS path of
// _cupy_gaussian.py, which suits large K).  The log-densities and the moments run on
// CUDA cores: K D multiply-adds per row for the log-densities (K D (D + 1) / 2 for
// 'full', U's triangle only, in both kernels; D^2 more for 'tied''s q) and
// K (2 D + 1), (K + D)(D + 2) or K (D + 1)^2 / 2 for the moments.  Control
// flow reaches every shuffle and __syncthreads in every thread of a block
// (tests/kernels/cuda_emulator.py checks it).

#include "_cupy_device.cuh"

#define THREADS 256
#define WARPS (THREADS / 32)
#define SMEM_DOUBLES 6000

__device__ __forceinline__ int clamp_index(int i, int last) { return i < last ? i : last; }

// The block's tiles [first, last) of n_tiles.
__device__ __forceinline__ void block_tiles(long long n, long long tile_rows,
                                            long long tiles_per_block, long long run,
                                            long long* first, long long* last) {
    const long long n_tiles = (n + tile_rows - 1) / tile_rows;
    const long long a = run * tiles_per_block, b = a + tiles_per_block;
    *first = a < n_tiles ? a : n_tiles;
    *last = b < n_tiles ? b : n_tiles;
}

// B's first columns: x' = x - c0 for rows row0.. (zeros past n), 'diag''s x' * x'
// after them (squares), and 1 in column wb - 1.
template <typename T>
__device__ void load_tile(const T* x, long long x_sn, long long x_sd, const T* c0,
                          long long n, int D, long long row0, int R, int ldb, int wb,
                          bool squares, T* bt) {
    for (int e = threadIdx.x; e < R * D; e += THREADS) {
        const int r = e / D, j = e % D;
        const long long row = row0 + r;
        const T v = row < n ? x[row * x_sn + j * x_sd] - c0[j] : T(0);
        bt[r * ldb + j] = v;
        if (squares) bt[r * ldb + D + j] = v * v;
    }
    for (int r = threadIdx.x; r < R; r += THREADS) bt[r * ldb + wb - 1] = T(1);
}

// 'full''s weighted log-density c_k - |(x' - mu'_k) U_k|^2 / 2 of one row, in one
// fixed order: full_log_norm and full_moments both call it.  U_k is upper triangular
// (sklearn's factor; the checks and the M-step make it so), so y_j sums i <= j only:
// D (D + 1) / 2 products, not D^2.  Four columns of y at a time, so each difference
// x'_i - mu'_i is formed and read once per four products (it was once per product).
// Each y_j still sums its terms in ascending i and |y|^2 its in ascending j: the terms
// left out are products with U's zeros.
template <typename T>
__device__ __forceinline__ T full_log_density(const T* xr, const T* mu, const T* uk, T ck,
                                              int D) {
    T sq = T(0);
    for (int j0 = 0; j0 < D; j0 += 4) {
        const int width = D - j0 < 4 ? D - j0 : 4;
        T y[4] = {T(0), T(0), T(0), T(0)};
        for (int i = 0; i < j0 + width; ++i) {
            const T diff = xr[i] - mu[i];
            const T* ui = uk + (long long)i * D + j0;
            // column j0 + t takes rows i <= j0 + t; past the edge, nothing
            for (int t = 0; t < 4; ++t)
                if (t < width && i <= j0 + t) y[t] += diff * ui[t];
        }
        for (int t = 0; t < 4; ++t)
            if (t < width) sq += y[t] * y[t];
    }
    return ck - T(0.5) * sq;
}

// One warp, one row of K log-densities ar[0..K): logsumexp by finite_max's rule, as
// row_softmax.  Every lane returns it.
template <typename T>
__device__ __forceinline__ T row_log_normaliser(const T* ar, int K, int lane) {
    T m = neg_inf<T>();
    for (int kc = lane; kc < K; kc += 32) m = (ar[kc] > m) ? ar[kc] : m;
    m = warp_max(m);
    const bool finite = finite_max(m);
    const T shift = finite ? m : T(0);
    T sum = T(0);
    for (int kc = lane; kc < K; kc += 32) sum += exp_t(ar[kc] - shift);
    sum = warp_sum(sum);
    return finite ? shift + log_t(sum) : m;
}

// The 4 x 4 sums sum_r a[r, ac[ii]] b[r, bc[jj]] over rows p, p + P, ... < R.
template <typename T>
__device__ __forceinline__ void product_tile(const T* at, int lda, const T* bt, int ldb,
                                             const int* ac, const int* bc, int p, int P, int R,
                                             T acc[4][4]) {
    for (int r = p; r < R; r += P) {
        T av[4], bv[4];
        for (int t = 0; t < 4; ++t) {
            av[t] = at[r * lda + ac[t]];
            bv[t] = bt[r * ldb + bc[t]];
        }
        for (int ii = 0; ii < 4; ++ii)
            for (int jj = 0; jj < 4; ++jj) acc[ii][jj] += av[ii] * bv[jj];
    }
}

// A micro-tile's sums start at zero, in T for a tile and in float64 for the block.
template <typename T>
__device__ __forceinline__ void clear_tile(T acc[4][4], double* hold) {
    for (int e = 0; e < 16; ++e) {
        acc[e / 4][e % 4] = T(0);
        hold[e] = 0.0;
    }
}

// Adds a micro-tile's sums over one tile to the float64 registers.
template <typename T>
__device__ __forceinline__ void hold_tile(T acc[4][4], double* hold) {
    for (int ii = 0; ii < 4; ++ii)
        for (int jj = 0; jj < 4; ++jj) {
            hold[4 * ii + jj] += (double)acc[ii][jj];
            acc[ii][jj] = T(0);
        }
}

// The block's log-likelihood (each thread's ll, threads in order) to *out by thread 0,
// through the first THREADS doubles of the block's shared memory (free once the tile
// loop, which ends at a barrier, is done).
__device__ __forceinline__ void block_log_likelihood(double ll, double* smem, double* out) {
    smem[threadIdx.x] = ll;
    __syncthreads();
    if (threadIdx.x == 0) {
        double total = 0.0;
        for (int t = 0; t < THREADS; ++t) total += smem[t];
        *out = total;
    }
}

// The E-step statistics of n rows (x with element strides x_sn, x_sd) for 'tied',
// 'diag' and 'spherical' (see the header).  coef: (K, D) the linear coefficients
// ('diag': (K, 2 D) [A, B]); s: (K,) q's coefficient; c: (K,) the constants; u: (D, D)
// 'tied'; w: (n,) the sample weights (has_w).  Blocks take tiles_per_block tiles of
// tile_rows rows; lda, ldb: the row strides of A and B in shared memory; micro_tiles
// 4 x 4 tiles of A^T B (row-major over its blocks of 4 rows and columns), at most
// THREADS / phases of them.  parts: (blocks x phases, 1 + 16 micro_tiles).
template <typename T>
__global__ void estep_tiles(const T* x, long long x_sn, long long x_sd, const T* w,
                            const T* c0, const T* coef, const T* s, const T* c, const T* u,
                            long long n, long long d, long long k, long long cov,
                            long long has_w, long long tile_rows, long long tiles_per_block,
                            long long lda, long long ldb, long long phases,
                            long long micro_tiles, double* parts) {
    __shared__ double smem[SMEM_DOUBLES];
    T* const bt = (T*)smem;                    // B: tile_rows x ldb
    T* const at = bt + tile_rows * ldb;        // A: tile_rows x lda
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int D = (int)d, K = (int)k, R = (int)tile_rows, P = (int)phases;
    const int wb = cov == COV_DIAG ? 2 * D + 1 : D + 2;
    const int wa = cov == COV_TIED ? K + D : K;
    const int mb = (wb + 3) / 4;
    // this thread's micro-tile (none past micro_tiles x phases) and its rows' phase
    const bool owner = tid < micro_tiles * phases;
    const int p = tid % P, mt = owner ? tid / P : 0;
    int ac[4], bc[4];
    for (int t = 0; t < 4; ++t) {  // past the edge: a real entry, its sum never read
        ac[t] = clamp_index(4 * (mt / mb) + t, wa - 1);
        bc[t] = clamp_index(4 * (mt % mb) + t, wb - 1);
    }
    T acc[4][4];
    double hold[16];
    clear_tile(acc, hold);
    long long first, last;
    block_tiles(n, tile_rows, tiles_per_block, blockIdx.x, &first, &last);
    double ll = 0.0;  // lane 0's: the warp's rows, in order
    for (long long tile = first; tile < last; ++tile) {
        const long long row0 = tile * tile_rows;
        load_tile(x, x_sn, x_sd, c0, n, D, row0, R, (int)ldb, wb, cov == COV_DIAG, bt);
        __syncthreads();
        // one warp per row: q ('spherical', 'tied') and 'tied''s w x' in A
        if (cov != COV_DIAG) {
            for (int r = warp; r < R; r += WARPS) {
                const long long row = row0 + r;
                const T wr = (row < n && has_w) ? w[row] : T(1);
                T sq = T(0);
                for (int j = lane; j < D; j += 32) {
                    T y = bt[r * ldb + j];
                    if (cov == COV_TIED) {
                        at[r * lda + K + j] = wr * y;
                        y = T(0);
                        for (int i = 0; i < D; ++i) y += bt[r * ldb + i] * u[i * D + j];
                    }
                    sq += y * y;
                }
                sq = warp_sum(sq);
                if (lane == 0) bt[r * ldb + D] = sq;
            }
            __syncthreads();
        }
        // the log-densities, one (component, row) entry per thread at a time
        for (int e = tid; e < K * R; e += THREADS) {
            const int kc = e / R, r = e % R;
            const T* xr = bt + r * ldb;
            const int nf = cov == COV_DIAG ? 2 * D : D;
            const T* ck = coef + (long long)kc * nf;
            T v = T(0);
            for (int f = 0; f < nf; ++f) v += xr[f] * ck[f];
            if (cov != COV_DIAG) v += s[kc] * xr[D];
            at[r * lda + kc] = v + c[kc];
        }
        __syncthreads();
        // one warp per row: A <- w_r exp(L - logsumexp)
        for (int r = warp; r < R; r += WARPS) {
            const long long row = row0 + r;
            const bool live = row < n;
            T* ar = at + r * lda;
            const T lse = row_log_normaliser(ar, K, lane);
            const T wr = has_w && live ? w[row] : T(1);
            for (int kc = lane; kc < K; kc += 32)
                ar[kc] = live ? exp_t(ar[kc] - lse) * wr : T(0);
            // rows of weight zero add nothing, even where the log-normaliser is infinite
            if (lane == 0 && live && wr != T(0)) ll += (double)wr * (double)lse;
        }
        __syncthreads();
        if (owner) {
            product_tile(at, (int)lda, bt, (int)ldb, ac, bc, p, P, R, acc);
            hold_tile(acc, hold);
        }
        __syncthreads();  // the next tile overwrites A and B
    }
    const long long width = 1 + 16 * micro_tiles;
    double* const block_parts = parts + (long long)blockIdx.x * phases * width;
    if (owner)
        for (int e = 0; e < 16; ++e) block_parts[p * width + 1 + 16 * mt + e] = hold[e];
    if (tid < P && tid > 0) block_parts[tid * width] = 0.0;
    block_log_likelihood(ll, smem, block_parts);
}

// 'full', first pass: norm[row] = logsumexp_k L[row, k] (T), one (component, row)
// entry per thread for the log-densities, one warp per row for the logsumexp.
// coef: mu'_k (K, D); u: (K, D, D); c: (K,).
template <typename T>
__global__ void full_log_norm(const T* x, long long x_sn, long long x_sd, const T* c0,
                              const T* coef, const T* c, const T* u, long long n, long long d,
                              long long k, long long tile_rows, long long tiles_per_block,
                              long long lda, long long ldb, T* norm) {
    __shared__ double smem[SMEM_DOUBLES];
    T* const bt = (T*)smem;
    T* const at = bt + tile_rows * ldb;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int D = (int)d, K = (int)k, R = (int)tile_rows;
    long long first, last;
    block_tiles(n, tile_rows, tiles_per_block, blockIdx.x, &first, &last);
    for (long long tile = first; tile < last; ++tile) {
        const long long row0 = tile * tile_rows;
        load_tile(x, x_sn, x_sd, c0, n, D, row0, R, (int)ldb, D + 1, false, bt);
        __syncthreads();
        for (int e = tid; e < K * R; e += THREADS) {
            const int kc = e / R, r = e % R;
            at[r * lda + kc] = full_log_density(bt + r * ldb, coef + (long long)kc * D,
                                                u + (long long)kc * D * D, c[kc], D);
        }
        __syncthreads();
        // no barrier after: the next tile's load writes B only, and the barrier after
        // it waits for these reads of A before A is written again
        for (int r = warp; r < R; r += WARPS) {
            const T lse = row_log_normaliser(at + r * lda, K, lane);
            if (lane == 0 && row0 + r < n) norm[row0 + r] = lse;
        }
    }
}

// 'full', second pass: block (run, k) = blockIdx.x / K, blockIdx.x % K sums, over its
// run's rows, the upper triangle of sum_r w_r exp(L_k - norm_r) z~ z~^T (micro-tiles
// row-major over the upper blocks of 4, at most THREADS / phases of them), and block
// (run, 0) the log-likelihood sum_r w_r norm_r.  One thread per row for L_k.
// parts: (runs x phases, K (1 + 16 micro_tiles)), component k's slots at
// k (1 + 16 micro_tiles).
template <typename T>
__global__ void full_moments(const T* x, long long x_sn, long long x_sd, const T* w,
                             const T* c0, const T* coef, const T* c, const T* u,
                             const T* norm, long long n, long long d, long long k,
                             long long has_w, long long tile_rows, long long tiles_per_block,
                             long long ldb, long long phases, long long micro_tiles,
                             double* parts) {
    __shared__ double smem[SMEM_DOUBLES];
    T* const bt = (T*)smem;                // B: tile_rows x ldb, [x', 1]
    T* const rt = bt + tile_rows * ldb;    // the tile's responsibilities for k
    const int tid = threadIdx.x;
    const int D = (int)d, R = (int)tile_rows, P = (int)phases;
    const int kc = (int)(blockIdx.x % k);
    const long long run = blockIdx.x / k;
    const T* mu = coef + (long long)kc * D;
    const T* uk = u + (long long)kc * D * D;
    const int mb = (D + 1 + 3) / 4;
    const bool owner = tid < micro_tiles * phases;
    const int p = tid % P, mt = owner ? tid / P : 0;
    int rest = mt, ib = 0;
    while (rest >= mb - ib) { rest -= mb - ib; ++ib; }
    int ic[4], jc[4];
    T mi[4], mj[4];
    for (int t = 0; t < 4; ++t) {  // z~'s last entry is 1 - 0; past the edge, clamped
        ic[t] = clamp_index(4 * ib + t, D);
        jc[t] = clamp_index(4 * (ib + rest) + t, D);
        mi[t] = ic[t] < D ? mu[ic[t]] : T(0);
        mj[t] = jc[t] < D ? mu[jc[t]] : T(0);
    }
    T acc[4][4];
    double hold[16];
    clear_tile(acc, hold);
    long long first, last;
    block_tiles(n, tile_rows, tiles_per_block, run, &first, &last);
    double ll = 0.0;  // this thread's rows, in order (component 0's blocks)
    for (long long tile = first; tile < last; ++tile) {
        const long long row0 = tile * tile_rows;
        load_tile(x, x_sn, x_sd, c0, n, D, row0, R, (int)ldb, D + 1, false, bt);
        __syncthreads();
        for (int r = tid; r < R; r += THREADS) {
            const long long row = row0 + r;
            const bool live = row < n;
            const T lse = live ? norm[row] : T(0);
            const T wr = has_w && live ? w[row] : T(1);
            const T v = full_log_density(bt + r * ldb, mu, uk, c[kc], D);
            rt[r] = live ? exp_t(v - lse) * wr : T(0);
            if (kc == 0 && live && wr != T(0)) ll += (double)wr * (double)lse;
        }
        __syncthreads();
        if (owner) {
            for (int r = p; r < R; r += P) {
                const T* xr = bt + r * ldb;
                T zi[4], zj[4];
                for (int t = 0; t < 4; ++t) {
                    zi[t] = rt[r] * (xr[ic[t]] - mi[t]);
                    zj[t] = xr[jc[t]] - mj[t];
                }
                for (int ii = 0; ii < 4; ++ii)
                    for (int jj = 0; jj < 4; ++jj) acc[ii][jj] += zi[ii] * zj[jj];
            }
            hold_tile(acc, hold);
        }
        __syncthreads();  // the next tile overwrites B and the responsibilities
    }
    const long long width = 1 + 16 * micro_tiles;
    double* const block_parts = parts + run * phases * k * width + kc * width;
    if (owner)
        for (int e = 0; e < 16; ++e) block_parts[p * k * width + 1 + 16 * mt + e] = hold[e];
    if (tid < P && tid > 0) block_parts[tid * k * width] = 0.0;
    block_log_likelihood(ll, smem, block_parts);
}
