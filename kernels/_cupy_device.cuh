// fastlvm CuPy backend: the device helpers its CUDA files share (included by
// _cupy_rows.cu, _cupy_mstep.cu and _cupy_estep.cu; kernels/_cupy_source.py writes
// it into each file's text for NVRTC, nvcc finds it beside them).
//
// Warp reductions are butterflies (__shfl_xor_sync over offsets 16, 8, ..., 1): every
// lane ends with the same bits, and the order of the sum is fixed by the lane count.

#ifndef FASTLVM_CUPY_DEVICE_CUH
#define FASTLVM_CUPY_DEVICE_CUH

#define FULL_MASK 0xffffffffu

// kernels/_covariance.py's COVARIANCE_CODE
#define COV_FULL 0
#define COV_TIED 1
#define COV_DIAG 2
#define COV_SPHERICAL 3

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

// v rounded to TF32 (10 explicit mantissa bits: the low 13 bits of a float cleared,
// to nearest), the high part of a 'tf32x3' split (kernels/_cupy_tf32.py); for finite
// v.  Doubles are not split: their products stay IEEE.
__device__ __forceinline__ float tf32_hi(float v) {
    return __uint_as_float((__float_as_uint(v) + 0x1000u) & 0xffffe000u);
}
__device__ __forceinline__ double tf32_hi(double v) { return v; }

// The log-sum-exp rule of every kernel here: a row's maximum m is subtracted only where it
// is finite (not NaN, not +-inf), and the log-sum-exp is then m + log(sum exp(v - m));
// where m is not finite it is m itself (all -inf: -inf; +inf or NaN: propagated, and a
// NaN entry anywhere makes the sum NaN whatever the maximum saw).
template <typename T> __device__ __forceinline__ bool finite_max(T m) {
    return (m > neg_inf<T>()) && (m < -neg_inf<T>());  // false for NaN too
}

template <typename T> __device__ __forceinline__ T warp_sum(T v) {
    for (int offset = 16; offset > 0; offset >>= 1)
        v += __shfl_xor_sync(FULL_MASK, v, offset);
    return v;
}

template <typename T> __device__ __forceinline__ T warp_max(T v) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        const T u = __shfl_xor_sync(FULL_MASK, v, offset);
        v = (u > v) ? u : v;
    }
    return v;
}

// Vector access to shared memory: four consecutive entries p[0..3] as one 16-byte load
// or store (float4) or two (double2).  p must be 16-byte aligned (a fault on a GPU
// otherwise); tests/kernels/cuda_emulator.py defines FASTLVM_CHECK_ALIGNED to check it.
#ifndef FASTLVM_CHECK_ALIGNED
#define FASTLVM_CHECK_ALIGNED(p)
#endif
__device__ __forceinline__ void load4(const float* p, float v[4]) {
    FASTLVM_CHECK_ALIGNED(p);
    const float4 q = *reinterpret_cast<const float4*>(p);
    v[0] = q.x; v[1] = q.y; v[2] = q.z; v[3] = q.w;
}
__device__ __forceinline__ void load4(const double* p, double v[4]) {
    FASTLVM_CHECK_ALIGNED(p);
    const double2 a = reinterpret_cast<const double2*>(p)[0];
    const double2 b = reinterpret_cast<const double2*>(p)[1];
    v[0] = a.x; v[1] = a.y; v[2] = b.x; v[3] = b.y;
}
__device__ __forceinline__ void store4(float* p, const float v[4]) {
    FASTLVM_CHECK_ALIGNED(p);
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
}
__device__ __forceinline__ void store4(double* p, const double v[4]) {
    FASTLVM_CHECK_ALIGNED(p);
    reinterpret_cast<double2*>(p)[0] = make_double2(v[0], v[1]);
    reinterpret_cast<double2*>(p)[1] = make_double2(v[2], v[3]);
}

#endif  // FASTLVM_CUPY_DEVICE_CUH
