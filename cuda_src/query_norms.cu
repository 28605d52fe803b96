// Sum of the query norms of each block of slice_m queries: out[bh * q_blocks + j] = sum over the
// block's queries of ||q||_2 in float32 (the denominator of the blocks' coherence, pooling
// "adaptive"; mask_reference.coherence_of). One CTA per block, one warp per query at a time, each
// lane reading two 16-bit elements per 64 of the head dim.
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
  float sum = 0.f;
#pragma unroll 4
  for (int s = first + warp; s < last; s += kWarps) {
    const u16* row = q + s * p.stride_s;
    float sq = 0.f;
    for (int d = 2 * lane; d < p.dim; d += 64) {
      const u32 two = *reinterpret_cast<const u32*>(row + d);
      const float a = to_float_of(static_cast<u16>(two & 0xffff), bf16);
      const float b = to_float_of(static_cast<u16>(two >> 16), bf16);
      sq = fmaf(a, a, fmaf(b, b, sq));
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) sq += __shfl_xor_sync(0xffffffffu, sq, off);
    sum += sqrtf(sq);
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
