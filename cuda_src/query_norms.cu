// Sum of the query norms of each block of slice_m queries: out[bh * q_blocks + j] = sum over the
// block's queries of ||q||_2 in float32 (the denominator of the blocks' coherence, pooling
// "adaptive"; mask_reference.coherence_of). One CTA per block, each warp four queries at a time,
// each lane reading two 16-bit elements per 64 of the head dim.
#include "common.cuh"

namespace fg {

// kNormThreads comes from fgcupy/jit/score_spec.py, written ahead of this source with NormParams.
static_assert(kNormThreads % 32 == 0 && kNormThreads <= 1024, "whole warps");

__device__ __forceinline__ float to_float_of(u16 x, bool bf16) {
  return bf16 ? bf16_t::to_float(x) : fp16_t::to_float(x);
}

__global__ void __launch_bounds__(kNormThreads) block_norm_sums(const __grid_constant__ NormParams p) {
  constexpr int kWarps = kNormThreads / 32;
  __shared__ float partial[kWarps];
  const int q_blocks = (p.q_len + p.slice_m - 1) / p.slice_m;
  const i64 bh = blockIdx.x / q_blocks;
  const int block = static_cast<int>(blockIdx.x % q_blocks);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const u16* q = static_cast<const u16*>(p.q) + (bh / p.heads) * p.stride_b + (bh % p.heads) * p.stride_h;
  const int first = block * p.slice_m;
  const int last = min(first + p.slice_m, p.q_len);
  const bool bf16 = p.is_bf16 != 0;
  // Each warp takes kRowsAtOnce queries at a time and issues all their loads before any math,
  // so a lane keeps several loads in flight (one query at a time was latency-bound).
  constexpr int kRowsAtOnce = 4;
  float sum = 0.f;
  for (int s0 = first + warp * kRowsAtOnce; s0 < last; s0 += kWarps * kRowsAtOnce) {
    float sq[kRowsAtOnce] = {};
#pragma unroll 2
    for (int d = 2 * lane; d < p.dim; d += 64) {
      u32 two[kRowsAtOnce];
#pragma unroll
      for (int r = 0; r < kRowsAtOnce; ++r) {
        two[r] = s0 + r < last ? *reinterpret_cast<const u32*>(q + (s0 + r) * p.stride_s + d) : 0u;
      }
#pragma unroll
      for (int r = 0; r < kRowsAtOnce; ++r) {
        const float a = to_float_of(static_cast<u16>(two[r] & 0xffff), bf16);
        const float b = to_float_of(static_cast<u16>(two[r] >> 16), bf16);
        sq[r] = fmaf(a, a, fmaf(b, b, sq[r]));
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
#pragma unroll
      for (int r = 0; r < kRowsAtOnce; ++r) sq[r] += __shfl_xor_sync(0xffffffffu, sq[r], off);
    }
#pragma unroll
    for (int r = 0; r < kRowsAtOnce; ++r) sum += sqrtf(sq[r]);  // rows past the block add sqrt(0)
  }
  if (lane == 0) partial[warp] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += partial[w];
    static_cast<float*>(p.out)[blockIdx.x] = total;
  }
}

}  // namespace fg
