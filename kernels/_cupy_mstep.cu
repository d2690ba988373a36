// fastlvm CuPy backend: the fused M-step of a Gaussian mixture (compiled by NVRTC
// through cupy.RawModule; kernels/gaussian_mstep/_cupy.py loads this file and has
// the order of the launches).
//
// Design: one warp per item (a component, a row of a covariance, a feature, a
// factorisation), WARPS_PER_BLOCK warps per block, lanes striding over the
// features.  Every reduction is a lane-strided sum followed by a warp butterfly
// (__shfl_xor_sync), so its order is fixed by the shapes alone: no atomics, the
// same bits run to run.  Inputs are the E-step's float64 sums (N_k, sum r x',
// second moments, around the centres the E-step used); the parameters come out
// in float64 and the next E-step's coefficients (kernels/_expanded_gaussian.py)
// in the data's type T, rounded as the E-step applies them.  Where the same step
// as CuPy operations is 49-57 of them (and cuSOLVER's), this is three launches
// ('diag', 'spherical') or five ('full', 'tied': the covariance rows and the
// factorisation between them), and nothing is read back.
//
// Limits: mstep_cholesky factorises and inverts one matrix per warp in global
// memory (D^3 / 2 float64 multiply-adds, sequential over the D columns): right
// for the D of a mixture (tens to a few hundred), slow for thousands.  A matrix
// that is not positive definite (a pivot not > 0, or not a number) is flagged,
// never raised: its factor holds NaN and the caller reads the flags once.
// Control flow reaches every shuffle and __syncwarp in every lane of a warp
// (items past the end run their loops zero times and skip their stores), which
// tests/kernels/cuda_emulator.py checks when it runs these kernels on a CPU.

#include "_cupy_device.cuh"

#define WARPS_PER_BLOCK 8

__device__ __forceinline__ long long warp_item() {
    return (long long)blockIdx.x * WARPS_PER_BLOCK + (threadIdx.x >> 5);
}

// 1 where v is infinite or NaN (v - v is 0 exactly for every finite v)
__device__ __forceinline__ double not_finite(double v) { return (v - v != 0.0) ? 1.0 : 0.0; }

// One warp per component k, from the sums around the centres c_k (center: (K, D)
// with center_sk = D for 'full', the one shift (D,) with center_sk = 0 otherwise):
// N_k + 10 eps, the mean m_k = sum_x / (N_k + 10 eps) with sum_x = s1 + N_k c_k,
// and for the moments around m_k (S - a e^T - e a^T + N e e^T, a = sum_x - N_k c_k,
// e = m_k - c_k):
// 'full', 'tied': a and e, (K, D) each, for the covariance kernels;
// 'diag': cov (K, D) = moments / (N_k + 10 eps) + reg, pc = 1 / sqrt(cov);
// 'spherical': cov (K,) = trace / ((N_k + 10 eps) D) + reg, pc likewise;
// and for those two bad[k] (entries not finite) and failed[k] (not > 0).
// s2: (K, D) 'diag', (K,) 'spherical', unread otherwise.
template <typename T>
__global__ void mstep_component(const double* nk, const double* s1, const double* s2,
                                const double* center, long long center_sk, double reg,
                                double eps10, double* nk_eps, double* mean, double* a_out,
                                double* e_out, double* cov, double* pc, double* bad,
                                double* failed, long long K, long long D, long long code) {
    const int lane = threadIdx.x & 31;
    const long long k = warp_item();
    const bool live = k < K;
    const long long dd = live ? D : 0;  // trip count of the loops over features
    const double n = live ? nk[k] : 0.0;
    const double ne = n + eps10;
    double sum_ae = 0.0, sum_ee = 0.0, n_bad = 0.0, n_failed = 0.0;
    for (long long d = lane; d < dd; d += 32) {
        const long long i = k * D + d;
        const double c = center[k * center_sk + d];
        const double sum_x = s1[i] + n * c;
        const double m = sum_x / ne;
        const double a = sum_x - n * c;
        const double e = m - c;
        mean[i] = m;
        if (code == COV_DIAG) {
            const double v = (s2[i] - 2.0 * a * e + n * e * e) / ne + reg;
            cov[i] = v;
            pc[i] = 1.0 / sqrt(v);
            n_bad += not_finite(v);
            n_failed += (v > 0.0) ? 0.0 : 1.0;  // NaN is not > 0 either
        } else if (code == COV_SPHERICAL) {
            sum_ae += a * e;
            sum_ee += e * e;
        } else {
            a_out[i] = a;
            e_out[i] = e;
        }
    }
    if (code == COV_SPHERICAL) {  // uniform over the grid: every lane reaches the sums
        sum_ae = warp_sum(sum_ae);
        sum_ee = warp_sum(sum_ee);
        const double v = (live ? (s2[k] - 2.0 * sum_ae + n * sum_ee) : 0.0) /
                         (ne * (double)D) + reg;
        if (live && lane == 0) {
            cov[k] = v;
            pc[k] = 1.0 / sqrt(v);
        }
        n_bad = not_finite(v);
        n_failed = (v > 0.0) ? 0.0 : 1.0;
    } else if (code == COV_DIAG) {
        n_bad = warp_sum(n_bad);
        n_failed = warp_sum(n_failed);
    }
    if (live && lane == 0) {
        nk_eps[k] = ne;
        if (code >= COV_DIAG) {
            bad[k] = n_bad;
            failed[k] = n_failed;
        }
    }
}

// The moments' correction on entry (i, j): N e_i e_j - (a_i e_j + e_i a_j), written
// so that entry (j, i) is the same number to the last bit: each product rounded on its
// own (__dmul_rn is never contracted into a fused multiply-add, which would round
// a_i e_j + e_i a_j and a_j e_i + e_j a_i differently), so the sum takes the same two
// numbers in either order.
__device__ __forceinline__ double cross_term(double n, double a_i, double e_i, double a_j,
                                             double e_j) {
    return n * __dmul_rn(e_i, e_j) - (__dmul_rn(a_i, e_j) + __dmul_rn(e_i, a_j));
}

// Stores entry (i, j) of (S + corr) / scale + reg I, symmetrised with S's entry (j, i):
// exactly symmetric, as corr is.  Returns 1 where it is not finite.
__device__ __forceinline__ double store_covariance(const double* S, double corr, double scale,
                                                   double reg, long long i, long long j,
                                                   long long D, double* cov) {
    const double r = (i == j) ? reg : 0.0;
    const double v = 0.5 * (((S[i * D + j] + corr) / scale + r) +
                            ((S[j * D + i] + corr) / scale + r));
    cov[i * D + j] = v;
    return not_finite(v);
}

// One warp per covariance row: the moments moved to the new means, divided by the
// weight, plus reg on the diagonal, and bad[item] = the row's entries not finite.
// 'full' (tied = 0): items k * D + i, row i of component k: s2 and cov (K, D, D),
// the cross terms of component k, divided by N_k + 10 eps.  'tied' (tied = 1): items
// i: s2 (D, D) the scatter sum_n w_n x' x'^T, every component's cross terms added in
// component order, divided by sum_k (N_k + 10 eps); cov (D, D).
template <typename T>
__global__ void mstep_covariance(const double* s2, const double* nk, const double* nk_eps,
                                 const double* a, const double* e, double reg, double* cov,
                                 double* bad, long long K, long long D, long long tied) {
    const int lane = threadIdx.x & 31;
    const long long item = warp_item();
    const bool live = item < (tied ? D : K * D);
    const long long own = (live && !tied) ? item / D : 0, i = live ? item % D : 0;
    const long long k_first = tied ? 0 : own, k_end = tied ? K : own + 1;
    const long long dd = live ? D : 0;
    double scale = 0.0;
    for (long long k = k_first; k < k_end; ++k) scale += nk_eps[k];
    double n_bad = 0.0;
    for (long long j = lane; j < dd; j += 32) {
        double corr = 0.0;
        for (long long k = k_first; k < k_end; ++k)
            corr += cross_term(nk[k], a[k * D + i], e[k * D + i], a[k * D + j], e[k * D + j]);
        n_bad += store_covariance(s2 + own * D * D, corr, scale, reg, i, j, D,
                                  cov + own * D * D);
    }
    n_bad = warp_sum(n_bad);
    if (live && lane == 0) bad[item] = n_bad;
}

// One warp per matrix m of cov (M, D, D): the Cholesky factor L (Crout, column by
// column: the pivot by a warp sum, the rows below it one lane each) into lower,
// then sklearn's precision factor U = inv(L)^T (upper) into pc, each lane solving
// L x = e_c for its columns c by forward substitution (row c of U).  failed[m] is 1
// where a pivot was not > 0 (not positive definite, or not finite): U then holds
// NaN or inf, as torch's and CuPy's factorisations leave it.
template <typename T>
__global__ void mstep_cholesky(const double* cov, double* lower, double* pc, double* failed,
                               long long M, long long D) {
    const int lane = threadIdx.x & 31;
    const long long m = warp_item();
    const bool live = m < M;
    const long long dd = live ? D : 0;
    const double* A = cov + (live ? m * D * D : 0);
    double* L = lower + (live ? m * D * D : 0);
    double* U = pc + (live ? m * D * D : 0);
    bool ok = true;  // the same in every lane: each pivot is a warp sum
    for (long long j = 0; j < dd; ++j) {
        double part = 0.0;
        for (long long p = lane; p < j; p += 32) part += L[j * D + p] * L[j * D + p];
        const double pivot = A[j * D + j] - warp_sum(part);
        ok = ok && pivot > 0.0;
        const double l_jj = sqrt(pivot);
        for (long long i = j + 1 + lane; i < D; i += 32) {
            double s = A[i * D + j];
            for (long long p = 0; p < j; ++p) s -= L[i * D + p] * L[j * D + p];
            L[i * D + j] = s / l_jj;
        }
        if (lane == 0) L[j * D + j] = l_jj;
        __syncwarp();  // column j is written before any lane reads it
    }
    for (long long c = lane; c < dd; c += 32) {
        double* u_c = U + c * D;  // row c of U = column c of inv(L)
        for (long long i = 0; i < c; ++i) u_c[i] = 0.0;
        u_c[c] = 1.0 / L[c * D + c];
        for (long long i = c + 1; i < D; ++i) {
            double s = 0.0;
            for (long long p = c; p < i; ++p) s += L[i * D + p] * u_c[p];
            u_c[i] = -s / L[i * D + i];
        }
    }
    if (live && lane == 0) failed[m] = ok ? 0.0 : 1.0;
}

// One warp per feature d: the total sum_k (N_k + 10 eps) and the next E-step's
// shift c0_d = sum_k (N_k + 10 eps) m_kd / total, rounded to T; shift64 (D,) holds
// it as a double, shift (D,) as T, total (1,) the total.
template <typename T>
__global__ void mstep_shift(const double* nk_eps, const double* mean, double* shift64,
                            T* shift, double* total, long long K, long long D) {
    const int lane = threadIdx.x & 31;
    const long long d = warp_item();
    const bool live = d < D;
    double sum_n = 0.0, sum_m = 0.0;
    for (long long k = lane; k < K; k += 32) {
        sum_n += nk_eps[k];
        if (live) sum_m += nk_eps[k] * mean[k * D + d];
    }
    sum_n = warp_sum(sum_n);
    sum_m = warp_sum(sum_m);
    const T c0 = (T)(sum_m / sum_n);
    if (live && lane == 0) {
        shift64[d] = (double)c0;
        shift[d] = c0;
        if (d == 0) total[0] = sum_n;
    }
}

// lane-strided sum of v[0:n], then the warp's: the same value in every lane
__device__ __forceinline__ double warp_total(const double* v, long long n) {
    double s = 0.0;
    for (long long i = (threadIdx.x & 31); i < n; i += 32) s += v[i];
    return warp_sum(s);
}

// One warp per component k: its weight w_k = (N_k + 10 eps) / total and the next
// E-step's coefficients (kernels/_expanded_gaussian.py) in T, around the shift,
// with mu'_k = m_k - c0 rounded to T as the E-step applies it:
// 'diag':      coef (K, 2D) = [P^2 mu', -P^2 / 2], c = log w + sum log P - |P mu'|^2 / 2;
// 'spherical': coef (K, D) = p^2 mu', s = -p^2 / 2, c = log w + D log p - p^2 |mu'|^2 / 2;
// 'tied':      coef = mu' U U^T, c = log w + log|U| - |mu' U|^2 / 2 (s = -1/2 is fixed), with
//              y = mu' U in work (K, D); u (D, D) = U in T (by component 0);
// 'full':      coef = mu', c = log w + log|U_k|; u (K, D, D) = U_k in T;
// each c less D/2 log 2 pi.  The warp of component 0 also writes the summary:
// [sum of ll (n_ll), sum of bad (n_bad), sum of failed (n_failed)], and each warp
// its component's kappa_k = |mu'_k|^2 in its precision's metric at summary[3 + k]
// (0 for 'full'), by which the host sees float32 coefficients that must become
// double (kernels/_expanded_gaussian.py).
template <typename T>
__global__ void mstep_terms(const double* nk_eps, const double* mean, const double* pc,
                            const double* shift64, const double* total, const double* ll,
                            const double* bad, const double* failed, double half_d_log2pi,
                            double* weights, T* coef, T* s, T* c, T* u, double* work,
                            double* summary, long long K, long long D, long long n_ll,
                            long long n_bad, long long n_failed, long long code) {
    const int lane = threadIdx.x & 31;
    const long long k = warp_item();
    const bool live = k < K;
    const long long dd = live ? D : 0;
    const double w = live ? nk_eps[k] / total[0] : 1.0;
    const double* m_k = mean + (live ? k * D : 0);
    const double* u_k = pc + ((live && code == COV_FULL) ? k * D * D : 0);
    double quad = 0.0, log_det = 0.0;
    for (long long d = lane; d < dd; d += 32) {
        const double mu = (double)(T)(m_k[d] - shift64[d]);
        if (code == COV_DIAG) {
            const double p2 = pc[k * D + d] * pc[k * D + d];
            coef[k * 2 * D + d] = (T)(p2 * mu);
            coef[k * 2 * D + D + d] = (T)(-0.5 * p2);
            log_det += log(pc[k * D + d]);
            quad += p2 * mu * mu;
        } else if (code == COV_SPHERICAL) {
            coef[k * D + d] = (T)(pc[k] * pc[k] * mu);
            quad += mu * mu;
        } else if (code == COV_TIED) {  // y_d = sum_i mu'_i U_id
            double y = 0.0;
            for (long long i = 0; i < D; ++i)
                y += (double)(T)(m_k[i] - shift64[i]) * pc[i * D + d];
            work[k * D + d] = y;
            quad += y * y;
            log_det += log(pc[d * D + d]);
        } else {
            coef[k * D + d] = (T)mu;
            log_det += log(u_k[d * D + d]);
        }
    }
    quad = warp_sum(quad);
    log_det = warp_sum(log_det);
    double const_k = log(w) - half_d_log2pi;
    if (code == COV_DIAG) {
        const_k += log_det - 0.5 * quad;
    } else if (code == COV_SPHERICAL) {
        const double p = live ? pc[k] : 1.0;
        const_k += (double)D * log(p) - 0.5 * (p * p) * quad;
        if (live && lane == 0) s[k] = (T)(-0.5 * (p * p));
    } else if (code == COV_TIED) {
        const_k += log_det - 0.5 * quad;
        __syncwarp();  // y is written before the lanes read it
        for (long long d = lane; d < dd; d += 32) {  // (y U^T)_d = sum_j U_dj y_j
            double a = 0.0;
            for (long long j = 0; j < D; ++j) a += pc[d * D + j] * work[k * D + j];
            coef[k * D + d] = (T)a;
        }
    } else {
        const_k += log_det;
    }
    if (live && lane == 0) {
        weights[k] = w;
        c[k] = (T)const_k;
        const double p = code == COV_SPHERICAL ? pc[k] : 1.0;
        summary[3 + k] = code == COV_FULL ? 0.0 : (code == COV_SPHERICAL ? p * p * quad : quad);
    }
    // the factors in T: U_k by each component ('full'), the shared U by component 0
    const long long n_u = (code == COV_FULL || (code == COV_TIED && k == 0)) ? dd * D : 0;
    T* u_out = u + ((live && code == COV_FULL) ? k * D * D : 0);
    for (long long i = lane; i < n_u; i += 32) u_out[i] = (T)u_k[i];
    if (k == 0) {  // uniform over the warp
        const double sum_ll = warp_total(ll, n_ll);
        const double sum_bad = warp_total(bad, n_bad);
        const double sum_failed = warp_total(failed, n_failed);
        if (lane == 0) {
            summary[0] = sum_ll;
            summary[1] = sum_bad;
            summary[2] = sum_failed;
        }
    }
}
