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
//       from the log-densities L; 'tied' appends w_r x'.
// The moments are entries of A^T B, each thread owning one 4 x 4 output tile (a
// "micro-tile") and, where there are fewer micro-tiles than threads, one of
// `phases` interleaved subsets of the tile's rows (thread p * micro_tiles + mt: a
// warp's threads read one row's consecutive vectors, free of bank conflicts, where
// phase-fastest threads read several rows at once).  A micro-tile's sums over one
// tile run in T and are added to the thread's float64 registers; at the block's
// end they go to its own slots of the block's partial rows in `parts` (float64,
// slot 0 of the first the log-likelihood), which the caller adds in a fixed order.
//
// estep_tiles does all of it for 'tied', 'diag' and 'spherical', in tiles of up to
// 128 rows.  Counted from its loops, shared-memory traffic bounds it (not yet timed
// on a GPU), so every read in its loops is a 16-byte vector (load4): the
// coefficients are copied once per block into groups of four components (a warp's
// threads read the same vector, a broadcast), A's and B's rows start on 16-byte
// boundaries at strides that keep a thread per row free of bank conflicts, and each
// thread of the log-density pass sums two rows by four components (8 multiply-adds
// per vector read).  The log-sum-exp is a thread per
// row, with no shuffles.  (Its first version read one scalar per multiply-add, a warp
// per row of 32-row tiles: 1.11 ms for a 1M x 32 'diag' E-step at K = 16 on an H200.)
// 'full' is two kernels: full_log_norm writes each row's log-normaliser (n numbers,
// never n x K), its components' U_k and mu'_k passing through shared memory a few at
// a time, then full_moments, one block per (run of tiles, component k), recomputes
// L_k with the same function, and sums the upper triangle of r z~ z~^T with
// z~ = [x' - mu'_k, 1] (moments around mu'_k: nothing cancels).  Both read U_k, x'
// and z~ as vectors too (the first versions, scalar reads of U_k from global
// memory: 4.36 and 8.75 ms for 1M x 32 rows at K = 16 on an H200).  No atomics
// anywhere, and launch shapes that depend on n, K, D and the dtype alone: the same
// bits every run.
//
// estep_tiles is built for ESTEP_MIN_BLOCKS = 2 blocks an SM at least
// (__launch_bounds__: 128 registers; its float64 build held 130 without it, one block).
//
// Limits: a block's tile and coefficients live in a static 48 KiB of shared memory
// (SMEM_DOUBLES; the plan checks that 32 rows fit), which bounds K + D ('full': D,
// with one U_k beside the tile); a block has THREADS threads and each at most one
// micro-tile (the plan sends larger problems to the chunked cuBLAS path of
// _cupy_gaussian.py, which suits large K).  The log-densities and the moments run on
// CUDA cores: K D multiply-adds per row for the log-densities (2 K D for 'diag';
// about K D^2 / 2 for 'full', U's triangle by blocks of four, in both kernels; D^2
// more for 'tied''s q) and K (2 D + 1), (K + D)(D + 2) or K (D + 1)^2 / 2 for the
// moments.  Control flow reaches every __syncthreads in every thread of a block
// (tests/kernels/cuda_emulator.py checks it, the alignment of every vector access,
// and reads of shared memory the block has not written).

#include "_cupy_device.cuh"

#define THREADS 256
#define SMEM_DOUBLES 6144
#ifndef ESTEP_MIN_BLOCKS  // estep_tiles' blocks an SM at least (bench/cupy_tiles.py: more)
#define ESTEP_MIN_BLOCKS 2
#endif

// The block's tiles [first, last) of n_tiles.
__device__ __forceinline__ void block_tiles(long long n, long long tile_rows,
                                            long long tiles_per_block, long long run,
                                            long long* first, long long* last) {
    const long long n_tiles = (n + tile_rows - 1) / tile_rows;
    const long long a = run * tiles_per_block, b = a + tiles_per_block;
    *first = a < n_tiles ? a : n_tiles;
    *last = b < n_tiles ? b : n_tiles;
}

// x' = x - c0 of rows row0.. into a tile's first Dp columns, 0 past D and past n.
template <typename T>
__device__ __forceinline__ void load_rows(const T* x, long long x_sn, long long x_sd,
                                          const T* c0, long long n, int D, int Dp,
                                          long long row0, int R, int ldb, T* bt) {
    for (int e = threadIdx.x; e < R * Dp; e += THREADS) {
        const int r = e / Dp, j = e % Dp;
        const long long row = row0 + r;
        bt[r * ldb + j] = (row < n && j < D) ? x[row * x_sn + j * x_sd] - c0[j] : T(0);
    }
}

// 'full''s component kc into shared memory: U_k (D x D) as uc, Dp x Dp, and mu'_k as
// mc, Dp + 4 entries; zeros past D, and everywhere for kc >= K.
template <typename T>
__device__ __forceinline__ void load_component(const T* mu, const T* u, int kc, int K,
                                               int D, int Dp, T* uc, T* mc) {
    for (int e = threadIdx.x; e < Dp * Dp; e += THREADS) {
        const int i = e / Dp, j = e % Dp;
        uc[e] = (kc < K && i < D && j < D) ? u[((long long)kc * D + i) * D + j] : T(0);
    }
    for (int j = threadIdx.x; j < Dp + 4; j += THREADS)
        mc[j] = (kc < K && j < D) ? mu[(long long)kc * D + j] : T(0);
}

// 'full''s weighted log-densities c_k - |(x' - mu'_k) U_k|^2 / 2 of ROWS rows xr[..],
// with U_k and mu'_k as load_component leaves them; every read is a vector (U_k's
// rows by four columns: the same for a warp's threads, a broadcast).  full_log_norm
// and full_moments both call it, so each row's L_k has the same bits in both.  U_k is
// upper triangular (sklearn's factor; the checks and the M-step make it so), so y's
// columns j0..j0 + 3 take rows i < j0 + 4 only: D^2 / 2 + 2 D products a row, the
// extra ones exact zeros.  Each y_j sums its terms in ascending i and |y|^2 its in
// ascending j.
template <typename T, int ROWS>
__device__ __forceinline__ void full_log_densities(const T* const* xr, const T* mc,
                                                   const T* uc, T ck, int Dp, T* out) {
    T sq[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) sq[r] = T(0);
    for (int j0 = 0; j0 < Dp; j0 += 4) {
        T y[ROWS][4];
#pragma unroll
        for (int r = 0; r < ROWS; ++r)
#pragma unroll
            for (int v = 0; v < 4; ++v) y[r][v] = T(0);
        for (int i0 = 0; i0 <= j0; i0 += 4) {
            T m4[4], z[ROWS][4];
            load4(mc + i0, m4);
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
                load4(xr[r] + i0, z[r]);
#pragma unroll
                for (int t = 0; t < 4; ++t) z[r][t] -= m4[t];
            }
#pragma unroll
            for (int t = 0; t < 4; ++t) {
                T u4[4];
                load4(uc + (i0 + t) * Dp + j0, u4);
#pragma unroll
                for (int r = 0; r < ROWS; ++r)
#pragma unroll
                    for (int v = 0; v < 4; ++v) y[r][v] += z[r][t] * u4[v];
            }
        }
#pragma unroll
        for (int r = 0; r < ROWS; ++r)
#pragma unroll
            for (int v = 0; v < 4; ++v) sq[r] += y[r][v] * y[r][v];
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r) out[r] = ck - T(0.5) * sq[r];
}

// One thread, one row of log-densities ar[0..4 G) (16-byte aligned; -inf past K,
// which the maximum passes over and the sum adds as 0): logsumexp by finite_max's
// rule, in ascending k.  estep_tiles and full_log_norm both call it.
template <typename T>
__device__ __forceinline__ T row_log_normaliser(const T* ar, int G) {
    T m = neg_inf<T>();
    for (int g = 0; g < G; ++g) {
        T v[4];
        load4(ar + 4 * g, v);
#pragma unroll
        for (int t = 0; t < 4; ++t) m = (v[t] > m) ? v[t] : m;
    }
    const bool finite = finite_max(m);
    const T shift = finite ? m : T(0);
    T sum = T(0);
    for (int g = 0; g < G; ++g) {
        T v[4];
        load4(ar + 4 * g, v);
#pragma unroll
        for (int t = 0; t < 4; ++t) sum += exp_t(v[t] - shift);
    }
    return finite ? shift + log_t(sum) : m;
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

// estep_tiles' log-densities: pairs (row r0, row r0 + RP) x (group g of four
// components), each thread summing eight of them over x''s Dp columns, each read as
// one 16-byte vector and each group's coefficients as vectors too (all threads of a
// warp read the same ones: a broadcast).  'diag' by Horner's rule, x' (A + B x');
// 'spherical' and 'tied' as x' . coef plus s q.  Components past K get -inf (cc).
template <typename T, bool DIAG>
__device__ __forceinline__ void tile_log_densities(const T* bt, int ldb, T* at, int lda,
                                                   const T* cf, const T* cc, const T* cs,
                                                   int R, int Dp, int G) {
    constexpr int M = DIAG ? 2 : 1;  // coefficient vectors per feature
    const int RP = (R + 1) / 2;
    for (int e = threadIdx.x; e < RP * G; e += THREADS) {
        const int g = e / RP, r0 = e % RP, r1 = r0 + RP;
        const int r1c = r1 < R ? r1 : R - 1;  // odd R: the last pair has one row
        const T* x0 = bt + r0 * ldb;
        const T* x1 = bt + r1c * ldb;
        const T* cg = cf + g * Dp * M * 4;
        T l0[4] = {T(0), T(0), T(0), T(0)}, l1[4] = {T(0), T(0), T(0), T(0)};
        for (int j0 = 0; j0 < Dp; j0 += 4) {
            T a[4], b[4];
            load4(x0 + j0, a);
            load4(x1 + j0, b);
#pragma unroll
            for (int t = 0; t < 4; ++t) {
                T lin[4];
                load4(cg + (j0 + t) * M * 4, lin);
                if (DIAG) {
                    T sq[4];
                    load4(cg + (j0 + t) * M * 4 + 4, sq);
#pragma unroll
                    for (int v = 0; v < 4; ++v) {
                        l0[v] += a[t] * (lin[v] + sq[v] * a[t]);
                        l1[v] += b[t] * (lin[v] + sq[v] * b[t]);
                    }
                } else {
#pragma unroll
                    for (int v = 0; v < 4; ++v) {
                        l0[v] += a[t] * lin[v];
                        l1[v] += b[t] * lin[v];
                    }
                }
            }
        }
        // 'diag': column Dp holds the ones and cs is 0
        const T q0 = x0[Dp], q1 = x1[Dp];
#pragma unroll
        for (int v = 0; v < 4; ++v) {
            l0[v] += cs[4 * g + v] * q0 + cc[4 * g + v];
            l1[v] += cs[4 * g + v] * q1 + cc[4 * g + v];
        }
        store4(at + r0 * lda + 4 * g, l0);
        if (r1 < R) store4(at + r1 * lda + 4 * g, l1);
    }
}

// The E-step statistics of n rows (x with element strides x_sn, x_sd) for 'tied',
// 'diag' and 'spherical'.  coef: (K, D) the linear coefficients ('diag': (K, 2 D)
// [A, B]); s: (K,) q's coefficient; c: (K,) the constants; u: (D, D) 'tied'; w: (n,)
// the sample weights (has_w).  Blocks take tiles_per_block tiles of tile_rows rows;
// lda, ldb: the row strides of A and B in shared memory (multiples of four entries
// whose bytes are an odd multiple of 16: a thread per row reads its row's vectors
// without bank conflicts); micro_tiles 4 x 4 tiles of A^T B (row-major over its
// blocks of 4 rows and columns), at most THREADS / phases of them.
// parts: (blocks x phases, 1 + 16 micro_tiles).
//
// Shared memory, in T, each part on a 16-byte boundary (Kp, Dp: K, D rounded up to 4):
//   cf  the coefficients by groups of four components, cf[((g Dp + j) M + h) 4 + v]
//       = coef[4 g + v, h D + j] (M = 2 for 'diag''s A and B, else 1), 0 past K or D;
//   cc, cs  c and s, -inf and 0 past K ('diag': s = 0);
//   uu  'tied''s U, Dp x Dp, 0 past D;
//   bt  B, tile_rows x ldb: x' (Dp columns, 0 past D), then q and 1 ('spherical',
//       'tied') or 1 ('diag', whose x' * x' columns are x''s, squared as read), then 0;
//   at  A, tile_rows x lda: the log-densities, then the responsibilities (Kp, 0 past
//       K), then 'tied''s w x' (Dp); before them, 'tied''s |x' U|^2 by blocks of four
//       columns of x' U (a thread per (row, block): D^2 multiply-adds a row, spread
//       over the block's threads, where a thread per row left most of them idle).
// A^T B's columns are B's, with 'diag''s squares between x' and 1: its column blocks
// are x' (Dp / 4), ['diag': x' * x' (Dp / 4)], then [q, 1, 0, 0] or [1, 0, 0, 0].
template <typename T>
__global__ void __launch_bounds__(THREADS, ESTEP_MIN_BLOCKS)
    estep_tiles(const T* x, long long x_sn, long long x_sd, const T* w, const T* c0,
                const T* coef, const T* s, const T* c, const T* u, long long n, long long d,
                long long k, long long cov, long long has_w, long long tile_rows,
                long long tiles_per_block, long long lda, long long ldb, long long phases,
                long long micro_tiles, double* parts) {
    __shared__ __align__(16) double smem[SMEM_DOUBLES];
    const int tid = threadIdx.x;
    const int D = (int)d, K = (int)k, R = (int)tile_rows, P = (int)phases;
    const int LA = (int)lda, LB = (int)ldb;
    const int Dp = (D + 3) & ~3, Kp = (K + 3) & ~3, G = Kp / 4;
    const bool diag = cov == COV_DIAG, tied = cov == COV_TIED;
    const int M = diag ? 2 : 1;
    T* const cf = (T*)smem;
    T* const cc = cf + Kp * Dp * M;
    T* const cs = cc + Kp;
    T* const uu = cs + Kp;
    T* const bt = uu + (tied ? Dp * Dp : 0);
    T* const at = bt + R * LB;
    const int ones = diag ? Dp : Dp + 1;  // B's column of ones
    for (int e = tid; e < Kp * Dp * M; e += THREADS) {
        const int v = e & 3, h = (e >> 2) % M, j = (e >> 2) / M % Dp, g = (e >> 2) / M / Dp;
        const int kc = 4 * g + v;
        cf[e] = (kc < K && j < D) ? coef[(long long)kc * M * D + h * D + j] : T(0);
    }
    for (int kc = tid; kc < Kp; kc += THREADS) {
        cc[kc] = kc < K ? c[kc] : neg_inf<T>();
        cs[kc] = (kc < K && !diag) ? s[kc] : T(0);
    }
    if (tied)
        for (int e = tid; e < Dp * Dp; e += THREADS) {
            const int i = e / Dp, j = e % Dp;
            uu[e] = (i < D && j < D) ? u[i * D + j] : T(0);
        }
    // B's columns from the ones on: no tile writes them
    for (int e = tid; e < R * (LB - ones); e += THREADS) {
        const int r = e / (LB - ones), j = ones + e % (LB - ones);
        bt[r * LB + j] = j == ones ? T(1) : T(0);
    }
    __syncthreads();
    // this thread's micro-tile (none past micro_tiles x phases) and its rows' phase;
    // A^T B's column block bb: where it starts in B, and whether it is squared
    const int mbb = (diag ? 2 * Dp : Dp) / 4 + 1;
    const int MT = (int)micro_tiles;
    const bool owner = tid < MT * P;
    const int p = owner ? tid / MT : 0, mt = owner ? tid % MT : 0;
    const int ab = mt / mbb, bb = mt % mbb;
    const bool squared = diag && bb >= Dp / 4 && bb < 2 * Dp / 4;
    const int boff = (diag && bb >= Dp / 4) ? (squared ? 4 * bb - Dp : Dp) : 4 * bb;
    T acc[4][4];
    double hold[16];
    clear_tile(acc, hold);
    long long first, last;
    block_tiles(n, tile_rows, tiles_per_block, blockIdx.x, &first, &last);
    double ll = 0.0;  // this thread's rows, in order
    for (long long tile = first; tile < last; ++tile) {
        const long long row0 = tile * tile_rows;
        load_rows(x, x_sn, x_sd, c0, n, D, Dp, row0, R, LB, bt);
        __syncthreads();
        if (tied) {  // |x' U|^2 by blocks of four columns of y = x' U, into A (free now)
            for (int e = tid; e < R * (Dp / 4); e += THREADS) {
                const int r = e % R, j0 = 4 * (e / R);
                const T* xr = bt + r * LB;
                T y[4] = {T(0), T(0), T(0), T(0)};
                for (int i0 = 0; i0 < Dp; i0 += 4) {
                    T xi[4];
                    load4(xr + i0, xi);
#pragma unroll
                    for (int t = 0; t < 4; ++t) {
                        T ui[4];
                        load4(uu + (i0 + t) * Dp + j0, ui);
#pragma unroll
                        for (int v = 0; v < 4; ++v) y[v] += xi[t] * ui[v];
                    }
                }
                at[r * LA + j0 / 4] = y[0] * y[0] + y[1] * y[1] + y[2] * y[2] + y[3] * y[3];
            }
            __syncthreads();
        }
        // one thread per row: q = |x'|^2 ('spherical') or the sum of the blocks' |y|^2
        // and w x' in A ('tied')
        if (!diag) {
            for (int r = tid; r < R; r += THREADS) {
                const T* xr = bt + r * LB;
                T q = T(0);
                if (tied) {
                    const long long row = row0 + r;
                    const T wr = (row < n && has_w) ? w[row] : T(1);
                    for (int jb = 0; jb < Dp / 4; ++jb) q += at[r * LA + jb];
                    for (int j0 = 0; j0 < Dp; j0 += 4) {  // after the reads of this row
                        T xw[4];
                        load4(xr + j0, xw);
#pragma unroll
                        for (int v = 0; v < 4; ++v) xw[v] *= wr;
                        store4(at + r * LA + Kp + j0, xw);
                    }
                } else {
                    for (int j0 = 0; j0 < Dp; j0 += 4) {
                        T xv[4];
                        load4(xr + j0, xv);
#pragma unroll
                        for (int v = 0; v < 4; ++v) q += xv[v] * xv[v];
                    }
                }
                bt[r * LB + Dp] = q;
            }
            __syncthreads();
        }
        if (diag)
            tile_log_densities<T, true>(bt, LB, at, LA, cf, cc, cs, R, Dp, G);
        else
            tile_log_densities<T, false>(bt, LB, at, LA, cf, cc, cs, R, Dp, G);
        __syncthreads();
        // one thread per row: A <- w_r exp(L - logsumexp), by finite_max's rule
        for (int r = tid; r < R; r += THREADS) {
            const long long row = row0 + r;
            const bool live = row < n;
            T* ar = at + r * LA;
            const T wr = has_w && live ? w[row] : T(1);
            const T lse = row_log_normaliser(ar, G);
            for (int g = 0; g < G; ++g) {
                T v[4];
                load4(ar + 4 * g, v);
#pragma unroll
                for (int t = 0; t < 4; ++t)
                    v[t] = (live && 4 * g + t < K) ? exp_t(v[t] - lse) * wr : T(0);
                store4(ar + 4 * g, v);
            }
            // rows of weight zero add nothing, even where the log-normaliser is infinite
            if (live && wr != T(0)) ll += (double)wr * (double)lse;
        }
        __syncthreads();
        if (owner) {
            for (int r = p; r < R; r += P) {
                T av[4], bv[4];
                load4(at + r * LA + 4 * ab, av);
                load4(bt + r * LB + boff, bv);
                if (squared)
                    for (int t = 0; t < 4; ++t) bv[t] *= bv[t];
#pragma unroll
                for (int ii = 0; ii < 4; ++ii)
#pragma unroll
                    for (int jj = 0; jj < 4; ++jj) acc[ii][jj] += av[ii] * bv[jj];
            }
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

// 'full', first pass: norm[row] = logsumexp_k L[row, k] (T).  Components go through
// shared memory `chunk` at a time (U_k, mu'_k: load_component); each thread takes
// pairs (row r0, row r0 + RP) x (component of the chunk) (full_log_densities), and a
// thread per row the logsumexp (row_log_normaliser).  coef: mu'_k (K, D); u: (K, D,
// D); c: (K,).  Shared memory, in T: the chunk's U_k (Dp x Dp each) and mu'_k (Dp + 4
// each), x' (tile_rows x ldb) and L (tile_rows x lda, -inf from K to K rounded up to
// 4), both at estep_tiles' vector strides.
template <typename T>
__global__ void full_log_norm(const T* x, long long x_sn, long long x_sd, const T* c0,
                              const T* coef, const T* c, const T* u, long long n, long long d,
                              long long k, long long tile_rows, long long tiles_per_block,
                              long long lda, long long ldb, long long chunk, T* norm) {
    __shared__ __align__(16) double smem[SMEM_DOUBLES];
    const int tid = threadIdx.x;
    const int D = (int)d, K = (int)k, R = (int)tile_rows, C = (int)chunk;
    const int LA = (int)lda, LB = (int)ldb, Dp = (D + 3) & ~3, RP = (R + 1) / 2;
    T* const uc = (T*)smem;
    T* const mc = uc + C * Dp * Dp;
    T* const bt = mc + C * (Dp + 4);
    T* const at = bt + R * LB;
    const int Kp = (K + 3) & ~3;
    for (int e = tid; e < R * (Kp - K); e += THREADS)  // no tile writes these
        at[(e / (Kp - K)) * LA + K + e % (Kp - K)] = neg_inf<T>();
    long long first, last;
    block_tiles(n, tile_rows, tiles_per_block, blockIdx.x, &first, &last);
    for (long long tile = first; tile < last; ++tile) {
        const long long row0 = tile * tile_rows;
        load_rows(x, x_sn, x_sd, c0, n, D, Dp, row0, R, LB, bt);
        for (int k0 = 0; k0 < K; k0 += C) {
            for (int v = 0; v < C; ++v)
                load_component(coef, u, k0 + v, K, D, Dp, uc + v * Dp * Dp,
                               mc + v * (Dp + 4));
            __syncthreads();
            for (int e = tid; e < RP * C; e += THREADS) {
                const int v = e / RP, r0 = e % RP, r1 = r0 + RP, kc = k0 + v;
                if (kc >= K) continue;
                const T* rows[2] = {bt + r0 * LB, bt + (r1 < R ? r1 : R - 1) * LB};
                T l[2];
                full_log_densities<T, 2>(rows, mc + v * (Dp + 4), uc + v * Dp * Dp, c[kc],
                                         Dp, l);
                at[r0 * LA + kc] = l[0];
                if (r1 < R) at[r1 * LA + kc] = l[1];
            }
            __syncthreads();  // the next chunk overwrites U_k and mu'_k
        }
        // no barrier after: the next tile writes x' and the chunk, which no thread
        // reads now, and the barrier after the chunk waits for these reads of L
        for (int r = tid; r < R; r += THREADS)
            if (row0 + r < n) norm[row0 + r] = row_log_normaliser(at + r * LA, Kp / 4);
    }
}

// 'full', second pass: block (run, k) = blockIdx.x / K, blockIdx.x % K sums, over its
// run's rows, the upper triangle of sum_r w_r exp(L_k - norm_r) z~ z~^T (micro-tiles
// row-major over the upper blocks of 4, at most THREADS / phases of them), and block
// (run, 0) the log-likelihood sum_r w_r norm_r.  One thread per row for L_k
// (full_log_densities).  z~ = [x' - mu'_k, 1]: B's rows hold [x' (Dp, 0 past D), 1,
// 0, 0, 0] and mu'_k 0 past D, so z~'s blocks of four are B's minus mu'_k's, read as
// vectors.  parts: (runs x phases, K (1 + 16 micro_tiles)), component k's slots at
// k (1 + 16 micro_tiles).
template <typename T>
__global__ void full_moments(const T* x, long long x_sn, long long x_sd, const T* w,
                             const T* c0, const T* coef, const T* c, const T* u,
                             const T* norm, long long n, long long d, long long k,
                             long long has_w, long long tile_rows, long long tiles_per_block,
                             long long ldb, long long phases, long long micro_tiles,
                             double* parts) {
    __shared__ __align__(16) double smem[SMEM_DOUBLES];
    const int tid = threadIdx.x;
    const int D = (int)d, K = (int)k, R = (int)tile_rows, P = (int)phases, LB = (int)ldb;
    const int Dp = (D + 3) & ~3;
    const int kc = (int)(blockIdx.x % k);
    const long long run = blockIdx.x / k;
    T* const uc = (T*)smem;            // U_k, Dp x Dp
    T* const mc = uc + Dp * Dp;        // mu'_k, Dp + 4
    T* const bt = mc + Dp + 4;         // B: tile_rows x ldb, [x', 1, 0...]
    T* const rt = bt + R * LB;         // the tile's responsibilities for k
    load_component(coef, u, kc, K, D, Dp, uc, mc);
    for (int e = tid; e < R * (LB - Dp); e += THREADS) {  // no tile writes these
        const int r = e / (LB - Dp), j = e % (LB - Dp);
        bt[r * LB + Dp + j] = j == 0 ? T(1) : T(0);
    }
    __syncthreads();
    const int mb = Dp / 4 + 1;
    const int MT = (int)micro_tiles;
    const bool owner = tid < MT * P;
    const int p = owner ? tid / MT : 0, mt = owner ? tid % MT : 0;
    int rest = mt, ib = 0;
    while (rest >= mb - ib) { rest -= mb - ib; ++ib; }
    const int jb = ib + rest;
    T mi[4], mj[4];
    load4(mc + 4 * ib, mi);
    load4(mc + 4 * jb, mj);
    T acc[4][4];
    double hold[16];
    clear_tile(acc, hold);
    long long first, last;
    block_tiles(n, tile_rows, tiles_per_block, run, &first, &last);
    double ll = 0.0;  // this thread's rows, in order (component 0's blocks)
    for (long long tile = first; tile < last; ++tile) {
        const long long row0 = tile * tile_rows;
        load_rows(x, x_sn, x_sd, c0, n, D, Dp, row0, R, LB, bt);
        __syncthreads();
        for (int r = tid; r < R; r += THREADS) {
            const long long row = row0 + r;
            const bool live = row < n;
            const T lse = live ? norm[row] : T(0);
            const T wr = has_w && live ? w[row] : T(1);
            const T* rows[1] = {bt + r * LB};
            T v;
            full_log_densities<T, 1>(rows, mc, uc, c[kc], Dp, &v);
            rt[r] = live ? exp_t(v - lse) * wr : T(0);
            if (kc == 0 && live && wr != T(0)) ll += (double)wr * (double)lse;
        }
        __syncthreads();
        if (owner) {
            for (int r = p; r < R; r += P) {
                T zi[4], zj[4];
                load4(bt + r * LB + 4 * ib, zi);
                load4(bt + r * LB + 4 * jb, zj);
                const T rr = rt[r];
#pragma unroll
                for (int t = 0; t < 4; ++t) {
                    zi[t] = rr * (zi[t] - mi[t]);
                    zj[t] -= mj[t];
                }
#pragma unroll
                for (int ii = 0; ii < 4; ++ii)
#pragma unroll
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
