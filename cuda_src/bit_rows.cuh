// Rows of key bits (one bit per key, 32 keys a word) and the key lists they stand for: shared by
// the selection's emit (mask_select.cu) and the candidates' union (mask_union.cu).
#pragma once
#include "common.cuh"

namespace fg {

constexpr unsigned kFull = 0xffffffffu;

__device__ __forceinline__ unsigned lanemask_lt(int lane) { return (1u << lane) - 1u; }

// Position of the (r + 1)-th set bit of m (r < popc(m)): a binary search on bit counts.
__device__ __forceinline__ int nth_set_bit(unsigned m, unsigned r) {
  int pos = 0;
#pragma unroll
  for (int width = 16; width >= 1; width >>= 1) {
    const unsigned low = __popc(m & ((1u << width) - 1u));
    if (r >= low) {
      r -= low;
      m >>= width;
      pos += width;
    }
  }
  return pos;
}

// Writes the set bits of 32 consecutive bitmask words (lane l holds word word0 + l) as key
// indices, in order, at dst[base], dst[base + 1], ... (positions >= limit skipped); every store
// of the warp is coalesced. Returns the number of set bits. Where few words are non-zero (kept
// keys cluster) the warp visits each of them with one lane per bit; where many are (scattered
// keys) it writes 32 consecutive outputs per step, each lane finding its output's word by a
// binary search of the words' starts and the bit by nth_set_bit.
__device__ __forceinline__ unsigned warp_write_words(unsigned x, int word0, unsigned base, unsigned limit, int* dst) {
  const int lane = threadIdx.x & 31;
  const unsigned n = __popc(x);
  unsigned incl = n;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const unsigned y = __shfl_up_sync(kFull, incl, off);
    if (lane >= off) incl += y;
  }
  const unsigned start = incl - n;
  const unsigned total = __shfl_sync(kFull, incl, 31);
  unsigned todo = __ballot_sync(kFull, x != 0u);
  if (static_cast<unsigned>(__popc(todo)) <= 2u * ((total + 31u) / 32u)) {
    while (todo != 0u) {
      const int src = __ffs(todo) - 1;
      todo &= todo - 1u;
      const unsigned m = __shfl_sync(kFull, x, src);
      const unsigned pos = base + __shfl_sync(kFull, start, src) + __popc(m & lanemask_lt(lane));
      if (((m >> lane) & 1u) && pos < limit) dst[pos] = 32 * (word0 + src) + lane;
    }
    return total;
  }
  for (unsigned k0 = 0u; k0 < total; k0 += 32u) {
    const unsigned k = k0 + lane;  // the output this lane writes: in the last word starting at or before it
    int w = 0;
#pragma unroll
    for (int step = 16; step >= 1; step >>= 1) {
      if (__shfl_sync(kFull, start, w + step) <= k) w += step;
    }
    const unsigned m = __shfl_sync(kFull, x, w);
    const unsigned r = k - __shfl_sync(kFull, start, w);
    if (k < total && base + k < limit) dst[base + k] = 32 * (word0 + w) + nth_set_bit(m, r);
  }
  return total;
}


// The keys of one row whose bits word(w) gives (w < words): with offsets == nullptr their count
// into counts[row]; else the keys, ascending, at out + offsets[row] (at most counts[row]). Warp w
// of the CTA owns a contiguous segment of words and lane l every 32nd word of it, so a warp
// writes one contiguous run of indices per 32 words. warp_cnt: shared, one word per warp.
template <int kThreads, typename WordFn>
__device__ __forceinline__ void count_or_write_row(WordFn word, int words, int row, int* counts, const int* offsets,
                                                   int* out, unsigned* warp_cnt) {
  constexpr int kWarps = kThreads / 32;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int seg = ((words + kWarps - 1) / kWarps + 31) & ~31;
  const int ws = warp * seg;
  const int we = min(words, ws + seg);
  unsigned mine = 0u;
  for (int w = ws + lane; w < we; w += 32) mine += __popc(word(w));
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) mine += __shfl_xor_sync(kFull, mine, off);
  if (lane == 0) warp_cnt[warp] = mine;
  __syncthreads();
  unsigned run = 0u, total = 0u;
  for (int w = 0; w < kWarps; ++w) {
    if (w < warp) run += warp_cnt[w];
    total += warp_cnt[w];
  }
  if (offsets == nullptr) {
    if (tid == 0) counts[row] = static_cast<int>(total);
    return;
  }
  const unsigned limit = static_cast<unsigned>(max(counts[row], 0));
  int* dst = out + offsets[row];
  for (int w0 = ws; w0 < we; w0 += 32) {
    const int w = w0 + lane;
    run += warp_write_words(w < we ? word(w) : 0u, w0, run, limit, dst);
  }
}

}  // namespace fg
