// The attention kernels' launch order, computed on the GPU from a mask's indptr: query blocks
// with the most key tiles first, ties in index order (fgcupy.attention_kernel.order_buckets is
// the reference). Replaces a torch sort, whose first use in a process loads torch's sort
// kernels (tens of milliseconds); this module is a few kilobytes.
//
// One CTA: a histogram of the rows' buckets (bucket = min(tiles >> shift, kOrderBuckets - 1),
// tiles = ceil(length / kOrderTileKeys), negative lengths 0), an exclusive scan from the top
// bucket down, then a stable scatter: the rows' buckets are staged in shared memory a segment
// at a time and one warp places them in index order, peers of one bucket ranked by lane.
#include "common.cuh"

namespace fg {

// kOrderThreads, kOrderBuckets, kOrderSegment and kOrderTileKeys come from fgcupy/jit/plan_spec.py
// (ORDER_CONSTANTS), written ahead of this source with the OrderParams struct.
static_assert(kOrderBuckets % kOrderThreads == 0, "each thread scans whole runs of buckets");
static_assert(kOrderBuckets <= 65536, "buckets are staged as 16-bit values");

__device__ __forceinline__ int row_bucket(const int* __restrict__ indptr, int row, int q_blocks, int shift) {
  const int bh = row / q_blocks;
  const int at = bh * (q_blocks + 1) + (row - bh * q_blocks);
  const long long length = static_cast<long long>(indptr[at + 1]) - indptr[at];
  const long long tiles = length > 0 ? (length + kOrderTileKeys - 1) / kOrderTileKeys : 0;
  return static_cast<int>(min(tiles >> shift, static_cast<long long>(kOrderBuckets - 1)));
}

// Inclusive sum of x over lanes 0..lane of the warp.
__device__ __forceinline__ int warp_inclusive_sum(int x, int lane) {
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const int other = __shfl_up_sync(0xffffffffu, x, d);
    if (lane >= d) x += other;
  }
  return x;
}

__global__ void __launch_bounds__(kOrderThreads) launch_order(const __grid_constant__ OrderParams p) {
  __shared__ int start[kOrderBuckets];
  __shared__ u16 staged[kOrderSegment];
  __shared__ int warp_sums[kOrderThreads / 32];
  const int* __restrict__ indptr = static_cast<const int*>(p.indptr);
  int* __restrict__ order = static_cast<int*>(p.order);
  const int rows = p.rows, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  for (int b = tid; b < kOrderBuckets; b += kOrderThreads) start[b] = 0;
  __syncthreads();
  for (int r = tid; r < rows; r += kOrderThreads) atomicAdd(&start[row_bucket(indptr, r, p.q_blocks, p.shift)], 1);
  __syncthreads();

  // Exclusive scan from the top bucket down: thread t owns the run of kRun buckets that comes
  // t-th in descending order.
  constexpr int kRun = kOrderBuckets / kOrderThreads;
  int counts[kRun], total = 0;
#pragma unroll
  for (int u = 0; u < kRun; ++u) {
    counts[u] = start[kOrderBuckets - 1 - (tid * kRun + u)];
    total += counts[u];
  }
  const int inclusive = warp_inclusive_sum(total, lane);
  if (lane == 31) warp_sums[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    const int w = warp_inclusive_sum(lane < kOrderThreads / 32 ? warp_sums[lane] : 0, lane);
    if (lane < kOrderThreads / 32) warp_sums[lane] = w;  // inclusive over warps
  }
  __syncthreads();
  int running = inclusive - total + (warp > 0 ? warp_sums[warp - 1] : 0);
#pragma unroll
  for (int u = 0; u < kRun; ++u) {
    start[kOrderBuckets - 1 - (tid * kRun + u)] = running;
    running += counts[u];
  }
  __syncthreads();

  for (int base = 0; base < rows; base += kOrderSegment) {
    const int n = min(kOrderSegment, rows - base);
    for (int i = tid; i < n; i += kOrderThreads) staged[i] = static_cast<u16>(row_bucket(indptr, base + i, p.q_blocks, p.shift));
    __syncthreads();
    if (warp == 0) {
      for (int i0 = 0; i0 < n; i0 += 32) {
        const int i = i0 + lane;
        const int b = i < n ? staged[i] : -1;
        const unsigned peers = __match_any_sync(0xffffffffu, b);
        if (b >= 0) {
          const int rank = __popc(peers & ((1u << lane) - 1u));
          order[start[b] + rank] = base + i;
        }
        __syncwarp();
        if (b >= 0 && (peers & ((1u << lane) - 1u)) == 0) start[b] += __popc(peers);
        __syncwarp();
      }
    }
    __syncthreads();
  }
}

}  // namespace fg
