// q or k of some heads as float8 e4m3 for the Hopper max-probability pass, in two reads of the
// 16-bit input (fgcupy/e4m3_kernels.py; fgcupy/e4m3.py is the reference):
//   e4m3_sumsq: each head's largest sum of squares of a row without a non-finite element,
//   raised into sumsq[head] (float64 bits, zeroed first);
//   e4m3_round: each head's power of two from it (written to scale[head] for the pass's logit
//   scale), each value times it, clamped at kE4m3Max (at kE4m3NonfiniteClamp in a row with a
//   non-finite element; NaN stays NaN), rounded to nearest even, written as [heads, rows, D] bytes.
// Heads are counted batch-major from bh0; row r of head bh = b * heads + h starts at element
// b * stride_b + h * stride_h + r * stride_s, its D values contiguous and 16-byte aligned (the
// host checks). Each thread takes kConvertUnroll 16-byte vectors a CTA's width apart, loads first.
#include "common.cuh"

namespace fg {

// kConvertThreads, kConvertUnroll, kE4m3Max, kE4m3RowSumsq and kE4m3NonfiniteClamp
// (fgcupy.e4m3.E4M3_MAX, E4M3_ROW_SUMSQ, E4M3_NONFINITE_CLAMP: e4m3's largest value, the bound on
// a scaled row's sum of squares, the clamp of a row with a non-finite element) come from
// fgcupy/jit/e4m3_spec.py, with the parameter structs.

template <int D>
struct HeadVectors {
  static_assert(D % 8 == 0 && D <= 256, "rows are read as 16-byte vectors of eight 16-bit values, a row within a warp");
  static constexpr int kPerRow = D / 8;

  const u16* base;
  long long stride_s;
  int count;  // rows * kPerRow

  __device__ __forceinline__ HeadVectors(const void* x, int bh, int heads, long long stride_b, long long stride_h,
                                         long long stride_s_, int rows)
      : base(static_cast<const u16*>(x) + (bh / heads) * stride_b + (bh % heads) * stride_h),
        stride_s(stride_s_),
        count(rows * kPerRow) {}

  __device__ __forceinline__ uint4 load(int i) const {
    const int row = i / kPerRow;  // a constant divisor: a multiply and a shift
    return __ldg(reinterpret_cast<const uint4*>(base + row * stride_s + (i - row * kPerRow) * 8));
  }
};

// The first of kConvertUnroll vectors this thread takes in its CTA's chunk of the head.
__device__ __forceinline__ int first_vector() {
  return blockIdx.x * (kConvertThreads * kConvertUnroll) + threadIdx.x;
}

// The sum of the squares of a vector's eight values, in float64 (each square exact; the widening
// keeps subnormals, which -ftz=true would flush from a float32 operand).
template <class T>
__device__ __forceinline__ double squares(uint4 v) {
  const u32 words[4] = {v.x, v.y, v.z, v.w};
  double sum = 0.0;
#pragma unroll
  for (int w = 0; w < 4; ++w) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      double x;
      asm("cvt.f64.f32 %0, %1;" : "=d"(x) : "f"(T::to_float(static_cast<u16>(words[w] >> (16 * half)))));
      sum = fma(x, x, sum);
    }
  }
  return sum;
}

template <class T, int D>
__global__ void __launch_bounds__(kConvertThreads) e4m3_sumsq(const __grid_constant__ E4m3SumsqParams p) {
  const HeadVectors<D> head(p.x, p.bh0 + blockIdx.y, p.heads, p.stride_b, p.stride_h, p.stride_s, p.rows);
  const int first = first_vector();
  uint4 v[kConvertUnroll];
#pragma unroll
  for (int u = 0; u < kConvertUnroll; ++u) {
    const int i = first + u * kConvertThreads;
    v[u] = i < head.count ? head.load(i) : make_uint4(0, 0, 0, 0);
  }
  // A row's kPerRow vectors lie in consecutive lanes (a CTA's first vector starts a row).
  u64 sumsq = 0;  // float64 bits of a finite non-negative value: they order as the values
#pragma unroll
  for (int u = 0; u < kConvertUnroll; ++u) {
    double row = squares<T>(v[u]);
#pragma unroll
    for (int d = HeadVectors<D>::kPerRow / 2; d > 0; d >>= 1) row += __shfl_xor_sync(0xffffffffu, row, d);
    if (isfinite(row)) sumsq = max(sumsq, static_cast<u64>(__double_as_longlong(row)));  // a row with inf or NaN: left out
  }
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) sumsq = max(sumsq, __shfl_xor_sync(0xffffffffu, sumsq, d));
  __shared__ u64 warp_sumsq[kConvertThreads / 32];
  if ((threadIdx.x & 31) == 0) warp_sumsq[threadIdx.x >> 5] = sumsq;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kConvertThreads / 32; ++w) sumsq = max(sumsq, warp_sumsq[w]);
    if (sumsq) atomicMax(static_cast<unsigned long long*>(p.sumsq) + blockIdx.y, sumsq);
  }
}

// x * scale rounded to float32 without flushing subnormals (the runtime compiles with -ftz=true,
// and a tiny head's power of two can lift a subnormal into e4m3's range), clamped at top.
__device__ __forceinline__ float scaled(float x, float scale, float top) {
  float y;
  asm("mul.rn.f32 %0, %1, %2;" : "=f"(y) : "f"(x), "f"(scale));
  return y > top ? top : (y < -top ? -top : y);  // comparisons, so a NaN stays NaN
}

// Two float32 values as two e4m3 bytes, lo in the low byte; nearest even.
__device__ __forceinline__ u32 e4m3_pair(float lo, float hi) {
  unsigned short r;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
  return r;
}

// Whether a vector's eight 16-bit values are all finite.
template <class T>
__device__ __forceinline__ bool all_finite(uint4 v) {
  const u32 words[4] = {v.x, v.y, v.z, v.w};
  bool finite = true;
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    finite = finite && isfinite(T::to_float(static_cast<u16>(words[w]))) &&
             isfinite(T::to_float(static_cast<u16>(words[w] >> 16)));
  }
  return finite;
}

template <class T>
__device__ __forceinline__ u32 e4m3_quad(u32 a, u32 b, float scale, float top) {
  const u32 lo = e4m3_pair(scaled(T::to_float(static_cast<u16>(a)), scale, top),
                           scaled(T::to_float(static_cast<u16>(a >> 16)), scale, top));
  const u32 hi = e4m3_pair(scaled(T::to_float(static_cast<u16>(b)), scale, top),
                           scaled(T::to_float(static_cast<u16>(b >> 16)), scale, top));
  return lo | (hi << 16);
}

// fgcupy.e4m3.scales_for of one head: the largest power of two s with s^2 * sumsq <=
// kE4m3RowSumsq, the power at or below the quotient's square root (half its exponent, rounded
// down), halved where the product passes the bound (the quotient rounded up to a power); 1 where
// sumsq is 0 or not finite, or s is not a normal float32. Products by powers of two are exact.
__device__ __forceinline__ float scale_for_head(double sumsq) {
  constexpr double kBound = kE4m3RowSumsq;
  const long long exponent = (__double_as_longlong(__ddiv_rn(kBound, sumsq)) & 0x7ff0000000000000ll) >> 52;
  long long half = (exponent - 1023) >> 1;  // within [-512, 512]: the power below is a normal float64
  double power = __longlong_as_double((half + 1023) << 52);
  if (power * power * sumsq > kBound) {
    power *= 0.5;
    --half;
  }
  const bool usable = sumsq > 0.0 && isfinite(sumsq) && half >= -126 && half <= 127;
  return usable ? static_cast<float>(power) : 1.f;
}

template <class T, int D>
__global__ void __launch_bounds__(kConvertThreads) e4m3_round(const __grid_constant__ E4m3RoundParams p) {
  const HeadVectors<D> head(p.x, p.bh0 + blockIdx.y, p.heads, p.stride_b, p.stride_h, p.stride_s, p.rows);
  const double sumsq = static_cast<const double*>(p.sumsq)[blockIdx.y];
  const float scale = scale_for_head(sumsq);
  if (blockIdx.x == 0 && threadIdx.x == 0) static_cast<float*>(p.scale)[blockIdx.y] = scale;
  uint2* __restrict__ out = static_cast<uint2*>(p.out) + static_cast<long long>(blockIdx.y) * head.count;
  const int first = first_vector();
  uint4 v[kConvertUnroll];
#pragma unroll
  for (int u = 0; u < kConvertUnroll; ++u) {
    const int i = first + u * kConvertThreads;
    v[u] = i < head.count ? head.load(i) : make_uint4(0, 0, 0, 0);
  }
#pragma unroll
  for (int u = 0; u < kConvertUnroll; ++u) {
    // A row's kPerRow vectors lie in consecutive lanes: the row is finite where all of them are.
    bool finite = all_finite<T>(v[u]);
#pragma unroll
    for (int d = HeadVectors<D>::kPerRow / 2; d > 0; d >>= 1) finite &= __shfl_xor_sync(0xffffffffu, finite, d);
    const float top = finite ? static_cast<float>(kE4m3Max) : static_cast<float>(kE4m3NonfiniteClamp);
    const int i = first + u * kConvertThreads;
    if (i < head.count) out[i] = make_uint2(e4m3_quad<T>(v[u].x, v[u].y, scale, top), e4m3_quad<T>(v[u].z, v[u].w, scale, top));
  }
}

}  // namespace fg
