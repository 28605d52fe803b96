// What the scoring kernels (mask_score.cu, mask_colmax.cu, mask_score_sm90.cu) share: the shape
// of an mma.sync kernel's tiles, and the keys one CTA walks.
//
// ScoreShape: WARPS x 16 resident rows, key tiles of KEYS rows, rows copied in 16-byte chunks;
// copy_resident_rows starts the copy of an mma.sync kernel's rows into swizzled shared memory.
//
// score_key_range: the keys one CTA of a scoring kernel walks, from its
// ScoreParams: all keys; in band mode (band_width > 0) its row tile's band [row0 + band_lo,
// + band_width) clipped to the keys; in list mode the positions of query block `block`'s list
// in a SliceMask's CSR (list_indptr [B, H, out_rows + 1]). Returns [x, y): keys or positions.
//
// skipped_keys: in stats mode, the keys [x, y) that row `row` does not count: skip_ranges
// (int32 [ceil(n_rows / skip_block), 2], or null for none) per block of skip_block rows, a
// multiple of 16, so a warp's rows share it (fgcupy.lse_estimate: the sampled keys inside a
// query block's band, whose mass its exact band part holds).
#pragma once
#include "common.cuh"

namespace fg {

template <int D, int WARPS, int KEYS>
struct ScoreShape {
  static constexpr int kRows = WARPS * 16;
  static constexpr int kThreads = WARPS * 32;
  static constexpr int kN = KEYS;                            // keys per tile
  static constexpr int kChunksPerRow = D / 8;                // 16-byte chunks per row
  static constexpr int kRowsPerPass = kThreads / kChunksPerRow;
  static constexpr int kTileElems = kN * D;
  static_assert(D % 16 == 0 && kThreads % kChunksPerRow == 0, "head dim / threads");
  static_assert(kN % kRowsPerPass == 0 && kRows % kRowsPerPass == 0, "tile rows per pass");
};

// Rows [row0, row0 + kRows) of `base` (row stride `stride`; rows at or past n_rows read as zeros)
// into `dst`, swizzled, by cp.async: this thread's 16-byte chunk `my_chunk` of rows my_row,
// my_row + kRowsPerPass, ...
template <class S, int D>
__device__ __forceinline__ void copy_resident_rows(u16* dst, const u16* base, int row0, int n_rows, i64 stride,
                                                   int my_row, int my_chunk) {
#pragma unroll
  for (int j = 0; j < S::kRows / S::kRowsPerPass; ++j) {
    const int r = my_row + j * S::kRowsPerPass;
    const bool valid = row0 + r < n_rows;
    const u16* src = base + (valid ? static_cast<i64>(row0 + r) * stride : 0) + my_chunk * 8;
    cp_async16(smem_u32(dst + swz<D>(r, my_chunk)), src, valid);
  }
}

template <class Params>
__device__ __forceinline__ int2 score_key_range(const Params& p, bool list_mode, int bh, int row0, int block) {
  if (list_mode) {
    const int* block_ptr = static_cast<const int*>(p.list_indptr) + static_cast<long long>(bh) * (p.out_rows + 1) + block;
    return make_int2(block_ptr[0], block_ptr[1]);
  }
  if (p.band_width > 0) return make_int2(max(0, row0 + p.band_lo), min(p.kv_len, row0 + p.band_lo + p.band_width));
  return make_int2(0, p.kv_len);
}

template <class Params>
__device__ __forceinline__ int2 skipped_keys(const Params& p, int row) {
  if (p.skip_ranges == nullptr) return make_int2(0, 0);
  const int last = p.n_rows > 0 ? p.n_rows - 1 : 0;  // rows past n_rows are never written
  return static_cast<const int2*>(p.skip_ranges)[min(row, last) / p.skip_block];
}

}  // namespace fg
