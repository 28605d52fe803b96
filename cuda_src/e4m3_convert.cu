// q or k of some heads as float8 e4m3 for the Hopper max-probability pass, in two reads of the
// 16-bit input (fgcupy/e4m3_kernels.py; fgcupy/e4m3.py is the reference):
//   e4m3_amax: each head's largest magnitude, raised into amax[head] (float bits, zeroed first);
//   e4m3_round: each head's power of two from its amax (written to scale[head] for the pass's
//   logit scale), each value times it, magnitudes past kE4m3Target clamped (NaN stays NaN),
//   rounded to nearest even, written as [heads, rows, D] bytes.
// Heads are counted batch-major from bh0; row r of head bh = b * heads + h starts at element
// b * stride_b + h * stride_h + r * stride_s, its D values contiguous and 16-byte aligned (the
// host checks). Each thread takes kConvertUnroll 16-byte vectors a CTA's width apart, loads first.
#include "common.cuh"

namespace fg {

// kConvertThreads, kConvertUnroll and kE4m3Target (fgcupy.e4m3.E4M3_TARGET: the largest
// magnitude a head is scaled to) come from fgcupy/jit/e4m3_spec.py, with the parameter structs.

template <int D>
struct HeadVectors {
  static_assert(D % 8 == 0, "rows are read as 16-byte vectors of eight 16-bit values");
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

// The magnitude of a 16-bit float as the float32 it is. bf16 and fp16 alike order non-negative
// values (NaN above infinity) as their bits do.
template <class T>
__device__ __forceinline__ float magnitude(u32 bits) {
  return T::to_float(static_cast<u16>(bits));
}

template <class T, int D>
__global__ void __launch_bounds__(kConvertThreads) e4m3_amax(const __grid_constant__ E4m3AmaxParams p) {
  const HeadVectors<D> head(p.x, p.bh0 + blockIdx.y, p.heads, p.stride_b, p.stride_h, p.stride_s, p.rows);
  const int first = first_vector();
  uint4 v[kConvertUnroll];
#pragma unroll
  for (int u = 0; u < kConvertUnroll; ++u) {
    const int i = first + u * kConvertThreads;
    v[u] = i < head.count ? head.load(i) : make_uint4(0, 0, 0, 0);
  }
  u32 pair = 0;  // two 15-bit magnitudes, compared as unsigned halves
#pragma unroll
  for (int u = 0; u < kConvertUnroll; ++u) {
    pair = __vmaxu2(pair, __vmaxu2(v[u].x & 0x7fff7fffu, v[u].y & 0x7fff7fffu));
    pair = __vmaxu2(pair, __vmaxu2(v[u].z & 0x7fff7fffu, v[u].w & 0x7fff7fffu));
  }
  u32 bits = max(pair & 0xffffu, pair >> 16);
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) bits = max(bits, __shfl_xor_sync(0xffffffffu, bits, d));
  __shared__ u32 warp_max[kConvertThreads / 32];
  if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x >> 5] = bits;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kConvertThreads / 32; ++w) bits = max(bits, warp_max[w]);
    // Non-negative float32 values (NaN above infinity) also order as their bits do.
    if (bits) atomicMax(static_cast<u32*>(p.amax) + blockIdx.y, __float_as_uint(magnitude<T>(bits)));
  }
}

// x * scale rounded to float32 without flushing subnormals (the runtime compiles with -ftz=true,
// and a tiny head's power of two can lift a subnormal into e4m3's range).
__device__ __forceinline__ float scaled(float x, float scale) {
  float y;
  asm("mul.rn.f32 %0, %1, %2;" : "=f"(y) : "f"(x), "f"(scale));
  constexpr float kTop = kE4m3Target;
  return y > kTop ? kTop : (y < -kTop ? -kTop : y);  // comparisons, so a NaN stays NaN
}

// Two float32 values as two e4m3 bytes, lo in the low byte; nearest even.
__device__ __forceinline__ u32 e4m3_pair(float lo, float hi) {
  unsigned short r;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
  return r;
}

template <class T>
__device__ __forceinline__ u32 e4m3_quad(u32 a, u32 b, float scale) {
  const u32 lo = e4m3_pair(scaled(T::to_float(static_cast<u16>(a)), scale), scaled(T::to_float(static_cast<u16>(a >> 16)), scale));
  const u32 hi = e4m3_pair(scaled(T::to_float(static_cast<u16>(b)), scale), scaled(T::to_float(static_cast<u16>(b >> 16)), scale));
  return lo | (hi << 16);
}

// fgcupy.e4m3.scales_for_amax of one head: the largest power of two s with amax * s <= the
// target, that is the power of two at or below target / amax (its exponent bits), halved where
// the product passes the target (the quotient rounded up to it); 1 where amax is 0, subnormal
// (flushed), NaN or infinite, or so small that target / amax overflows. Products by powers of
// two are exact here.
__device__ __forceinline__ float scale_for_amax(float amax) {
  constexpr float kTop = kE4m3Target;
  const float ratio = __fdiv_rn(kTop, amax);
  if (!(amax > 0.f) || !isfinite(amax) || !isfinite(ratio)) return 1.f;
  const float power = __uint_as_float(__float_as_uint(ratio) & 0x7f800000u);
  return amax * power > kTop ? 0.5f * power : power;
}

template <class T, int D>
__global__ void __launch_bounds__(kConvertThreads) e4m3_round(const __grid_constant__ E4m3RoundParams p) {
  const HeadVectors<D> head(p.x, p.bh0 + blockIdx.y, p.heads, p.stride_b, p.stride_h, p.stride_s, p.rows);
  const float scale = scale_for_amax(static_cast<const float*>(p.amax)[blockIdx.y]);
  if (blockIdx.x == 0 && threadIdx.x == 0) static_cast<float*>(p.scale)[blockIdx.y] = scale;
  uint2* __restrict__ out = static_cast<uint2*>(p.out) + static_cast<long long>(blockIdx.y) * head.count;
  const int first = first_vector();
  uint4 v[kConvertUnroll];
#pragma unroll
  for (int u = 0; u < kConvertUnroll; ++u) {
    const int i = first + u * kConvertThreads;
    if (i < head.count) v[u] = head.load(i);
  }
#pragma unroll
  for (int u = 0; u < kConvertUnroll; ++u) {
    const int i = first + u * kConvertThreads;
    if (i < head.count) out[i] = make_uint2(e4m3_quad<T>(v[u].x, v[u].y, scale), e4m3_quad<T>(v[u].z, v[u].w, scale));
  }
}

}  // namespace fg
