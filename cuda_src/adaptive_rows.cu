// The scored rows of pooling "adaptive" (mask_reference.adaptive_rows) in one read of the
// queries: one CTA per query block sums its sub-blocks' queries and their norms, takes the
// block's coherence |sum of queries| / sum of query norms, and writes each sub-block's row:
// its middle query where the coherence is below `cut` (the block is "sampled"), else its mean
// query rounded to the queries' dtype (round to nearest). Also writes the sampled flag of
// each block.
//
// Each warp takes a contiguous run of the block's queries, four at a time (all their loads in
// flight before any math), each lane two 16-bit elements per 64 of the head dim; it keeps its
// current sub-block's sums in registers and adds them into shared memory when the run leaves
// that sub-block. A short last block and a short last sub-block count only their own queries.
#include "common.cuh"

namespace fg {

// kRowsThreads, kRowsMaxGroups and kRowsMaxDim come from fgcupy/jit/score_spec.py, written ahead
// of this source with AdaptiveRowsParams.
static_assert(kRowsThreads % 32 == 0 && kRowsThreads <= 1024, "whole warps");
static_assert(kRowsMaxDim % 64 == 0, "lanes hold two elements per 64 of the head dim");

__device__ __forceinline__ float to_float_of(u16 x, bool bf16) {
  return bf16 ? bf16_t::to_float(x) : fp16_t::to_float(x);
}

__device__ __forceinline__ u16 rounded_to(float x, bool bf16) {
  u16 r;
  if (bf16) asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(x));
  else asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(x));
  return r;
}

__global__ void __launch_bounds__(kRowsThreads) adaptive_rows(const __grid_constant__ AdaptiveRowsParams p) {
  constexpr int kWarps = kRowsThreads / 32;
  constexpr int kWords = kRowsMaxDim / 64;  // 32-bit words a lane holds per query
  constexpr int kRowsAtOnce = 4;
  __shared__ float sums[kRowsMaxGroups * kRowsMaxDim];  // [sub-block][dim]
  __shared__ float warp_part[kWarps];
  __shared__ int sampled;
  const int q_blocks = (p.q_len + p.slice_m - 1) / p.slice_m;
  const i64 bh = blockIdx.x / q_blocks;
  const int block = static_cast<int>(blockIdx.x % q_blocks);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int dim = p.dim, pool = p.pool;
  const int groups = p.slice_m / pool;
  const u16* q = static_cast<const u16*>(p.q) + (bh / p.heads) * p.stride_b + (bh % p.heads) * p.stride_h;
  const bool bf16 = p.is_bf16 != 0;
  const int first = block * p.slice_m;
  const int last = min(first + p.slice_m, p.q_len);
  for (int i = threadIdx.x; i < groups * dim; i += kRowsThreads) sums[i] = 0.f;
  __syncthreads();

  // Phase 1: this warp's run of queries [w0, w1), a multiple of four long (pool is).
  const int per_warp = (p.slice_m / kWarps + kRowsAtOnce - 1) / kRowsAtOnce * kRowsAtOnce;
  const int w0 = first + warp * per_warp;
  const int w1 = min(last, w0 + per_warp);
  float acc[kWords][2] = {};
  int acc_group = -1;  // sub-block (within the block) whose sums acc holds
  float norm_sum = 0.f;
  auto flush = [&]() {
    if (acc_group < 0) return;
#pragma unroll
    for (int c = 0; c < kWords; ++c) {
      const int d = 64 * c + 2 * lane;
      if (d < dim) {
        atomicAdd(&sums[acc_group * dim + d], acc[c][0]);
        atomicAdd(&sums[acc_group * dim + d + 1], acc[c][1]);
      }
      acc[c][0] = acc[c][1] = 0.f;
    }
  };
  for (int s0 = w0; s0 < w1; s0 += kRowsAtOnce) {
    const int g = (s0 - first) / pool;  // four queries never straddle a sub-block (the host: pool % 4 == 0)
    if (g != acc_group) {
      flush();
      acc_group = g;
    }
    u32 two[kRowsAtOnce][kWords];
#pragma unroll
    for (int r = 0; r < kRowsAtOnce; ++r)
#pragma unroll
      for (int c = 0; c < kWords; ++c) {
        const int d = 64 * c + 2 * lane;
        two[r][c] = s0 + r < w1 && d < dim ? *reinterpret_cast<const u32*>(q + (s0 + r) * p.stride_s + d) : 0u;
      }
    float sq[kRowsAtOnce] = {};
#pragma unroll
    for (int r = 0; r < kRowsAtOnce; ++r)
#pragma unroll
      for (int c = 0; c < kWords; ++c) {
        const float a = to_float_of(static_cast<u16>(two[r][c] & 0xffff), bf16);
        const float b = to_float_of(static_cast<u16>(two[r][c] >> 16), bf16);
        acc[c][0] += a;
        acc[c][1] += b;
        sq[r] = fmaf(a, a, fmaf(b, b, sq[r]));
      }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1)
#pragma unroll
      for (int r = 0; r < kRowsAtOnce; ++r) sq[r] += __shfl_xor_sync(0xffffffffu, sq[r], off);
#pragma unroll
    for (int r = 0; r < kRowsAtOnce; ++r) norm_sum += sqrtf(sq[r]);  // queries past the run add sqrt(0)
  }
  flush();
  if (lane == 0) warp_part[warp] = norm_sum;
  __syncthreads();

  // Phase 2: the block's coherence (warp 0).
  if (warp == 0) {
    float total_norm = 0.f;
    for (int w = 0; w < kWarps; ++w) total_norm += warp_part[w];
    float sq = 0.f;
    for (int d = lane; d < dim; d += 32) {
      float v = 0.f;
      for (int g = 0; g < groups; ++g) v += sums[g * dim + d];
      sq = fmaf(v, v, sq);
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) sq += __shfl_xor_sync(0xffffffffu, sq, off);
    if (lane == 0) {
      const float coherence = total_norm > 0.f ? sqrtf(sq) / total_norm : 0.f;
      sampled = !(coherence >= p.cut);  // NaN (an infinite query: inf / inf) samples too
      static_cast<bool*>(p.sampled)[blockIdx.x] = sampled != 0;
    }
  }
  __syncthreads();

  // Phase 3: each sub-block's row.
  const int rows_per_head = (p.q_len + pool - 1) / pool;
  u16* rows = static_cast<u16*>(p.rows) + bh * rows_per_head * dim;
  for (int i = threadIdx.x; i < groups * dim; i += kRowsThreads) {
    const int g = i / dim, d = i - g * dim;
    const int start = first + g * pool;
    if (start >= p.q_len) continue;
    const int row = start / pool;
    u16 v;
    if (sampled) {
      v = q[min(start + pool / 2, p.q_len - 1) * p.stride_s + d];
    } else {
      v = rounded_to(sums[i] / static_cast<float>(min(pool, p.q_len - start)), bf16);
    }
    rows[static_cast<i64>(row) * dim + d] = v;
  }
}

}  // namespace fg
