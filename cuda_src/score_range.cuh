// The keys one CTA of a scoring kernel (mask_score.cu, mask_score_sm90.cu) walks, from its
// ScoreParams: all keys; in band mode (band_width > 0) its row tile's band [row0 + band_lo,
// + band_width) clipped to the keys; in list mode the positions of query block `block`'s list
// in a SliceMask's CSR (list_indptr [B, H, out_rows + 1]). Returns [x, y): keys or positions.
#pragma once

namespace fg {

template <class Params>
__device__ __forceinline__ int2 score_key_range(const Params& p, bool list_mode, int bh, int row0, int block) {
  if (list_mode) {
    const int* block_ptr = static_cast<const int*>(p.list_indptr) + static_cast<long long>(bh) * (p.out_rows + 1) + block;
    return make_int2(block_ptr[0], block_ptr[1]);
  }
  if (p.band_width > 0) return make_int2(max(0, row0 + p.band_lo), min(p.kv_len, row0 + p.band_lo + p.band_width));
  return make_int2(0, p.kv_len);
}

}  // namespace fg
