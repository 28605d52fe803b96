// The candidates of a local search around a mask (mask_algebra.union_reference): for each row
// (batch, head, query block), the keys of `indices` moved by each of the offsets (0: the keys
// themselves) joined with the keys of `extra_indices`, inside [0, kv_len), ascending and unique.
// union_rows counts them (offsets == nullptr) or writes them at out + offsets[row].
//
// One CTA per row. The row's keys become one bit each in shared memory: `base` for the mask's
// keys, `joined` for the extra keys. Moving a row of bits by an offset is two word reads and a
// funnel shift per output word, so every offset costs about `words` operations per row however
// many keys the mask keeps, and duplicates (a key and its moved neighbours are mostly kept
// already) cost nothing. Lists are read with their bounds clamped into the index buffers and
// keys outside [0, kv_len) skipped: a corrupt mask reads nothing outside its buffers.
#include "common.cuh"
#include "bit_rows.cuh"

namespace fg {

// kUnionThreads and kUnionMaxOffsets come from fgcupy/jit/score_spec.py, written ahead of this
// source with the UnionParams struct.
static_assert(kUnionThreads % 32 == 0 && kUnionThreads <= 1024, "whole warps");
static_assert(kUnionMaxOffsets == 8, "UnionParams holds offset0 .. offset7");

// Row `at` of indptr: [lo, hi) clamped into [0, capacity].
__device__ __forceinline__ void list_range(const int* indptr, i64 at, int capacity, int& lo, int& hi) {
  lo = min(max(__ldg(indptr + at), 0), capacity);
  hi = min(max(__ldg(indptr + at + 1), lo), capacity);
}

// Sets the bits of keys list[lo, hi) in `bits`. A warp reads kUnionLoads runs of 32 consecutive
// entries at once (all loads in flight before any shuffle); in each run, lanes whose keys fall into
// one word OR their bits together (a segmented scan: sorted rows put runs of keys into few words)
// and only the first lane of each run does the shared-memory atomicOr.
constexpr int kUnionLoads = 4;

__device__ __forceinline__ void set_list_bits(unsigned* bits, const int* list, int lo, int hi, int kv_len) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  constexpr int kStride = 32 * kUnionLoads;
  for (int first = lo + kStride * warp; first < hi; first += kStride * (kUnionThreads / 32)) {
    int keys[kUnionLoads];
#pragma unroll
    for (int u = 0; u < kUnionLoads; ++u) {
      const int i = first + 32 * u + lane;
      keys[u] = i < hi ? __ldg(list + i) : -1;
    }
#pragma unroll
    for (int u = 0; u < kUnionLoads; ++u) {
      const int key = keys[u];
      const bool inside = key >= 0 && key < kv_len;
      const int word = inside ? key >> 5 : -1;
      unsigned x = inside ? 1u << (key & 31) : 0u;
#pragma unroll
      for (int d = 1; d < 32; d <<= 1) {
        const unsigned y = __shfl_down_sync(kFull, x, d);
        if (__shfl_down_sync(kFull, word, d) == word) x |= y;
      }
      const int before = __shfl_up_sync(kFull, word, 1);
      if (inside && (lane == 0 || before != word)) atomicOr(bits + word, x);
    }
  }
}

// Word w of `base` moved by `offset` keys: bit b is base's key 32 w + b - offset (0 outside).
__device__ __forceinline__ unsigned moved_word(const unsigned* base, int words, int w, int offset) {
  const i64 source = 32LL * w - offset;  // base's key under bit 0
  const i64 q = source >= 0 ? source / 32 : -((31 - source) / 32);
  const int r = static_cast<int>(source - 32 * q);
  const unsigned lo = q >= 0 && q < words ? base[q] : 0u;
  const unsigned hi = q + 1 >= 0 && q + 1 < words ? base[q + 1] : 0u;
  return r == 0 ? lo : (lo >> r) | (hi << (32 - r));
}

__global__ void __launch_bounds__(kUnionThreads) union_rows(const __grid_constant__ UnionParams p) {
  extern __shared__ unsigned row_bits[];  // base [words], joined [words]
  __shared__ unsigned warp_cnt[kUnionThreads / 32];
  const int words = p.words, kv_len = p.kv_len, q_blocks = p.q_blocks;
  unsigned* base = row_bits;
  unsigned* joined = row_bits + words;
  const int row = blockIdx.x;
  const int bh = row / q_blocks;
  const i64 at = static_cast<i64>(bh) * (q_blocks + 1) + (row - bh * q_blocks);
  for (int w = threadIdx.x; w < 2 * words; w += kUnionThreads) row_bits[w] = 0u;
  __syncthreads();
  int lo, hi;
  list_range(static_cast<const int*>(p.indptr), at, p.capacity, lo, hi);
  set_list_bits(base, static_cast<const int*>(p.indices), lo, hi, kv_len);
  if (p.extra_indptr != nullptr) {
    list_range(static_cast<const int*>(p.extra_indptr), at, p.extra_capacity, lo, hi);
    set_list_bits(joined, static_cast<const int*>(p.extra_indices), lo, hi, kv_len);
  }
  __syncthreads();
  const int offsets[kUnionMaxOffsets] = {p.offset0, p.offset1, p.offset2, p.offset3,
                                         p.offset4, p.offset5, p.offset6, p.offset7};
  const unsigned last = kv_len % 32 == 0 ? kFull : (1u << (kv_len % 32)) - 1u;
  for (int w = threadIdx.x; w < words; w += kUnionThreads) {
    unsigned x = joined[w];
#pragma unroll
    for (int o = 0; o < kUnionMaxOffsets; ++o) {
      if (o < p.n_offsets) x |= moved_word(base, words, w, offsets[o]);
    }
    joined[w] = w == words - 1 ? x & last : x;
  }
  __syncthreads();
  auto word = [&](int w) -> unsigned { return joined[w]; };
  count_or_write_row<kUnionThreads>(word, words, row, static_cast<int*>(p.counts),
                                    static_cast<const int*>(p.offsets), static_cast<int*>(p.out), warp_cnt);
}

// pack_rows: each row's keys as one bit a key (fgcupy.MaskCache's compact form): key j in bit
// j % 32 of word j / 32 of bits[row * words ...], keys outside [0, kv_len) and repeats set nothing,
// and the count of the row's bits in counts[row]. One CTA per row, its bits built in shared memory
// as union_rows builds its rows.
__global__ void __launch_bounds__(kUnionThreads) pack_rows(const __grid_constant__ PackParams p) {
  extern __shared__ unsigned row_bits[];  // [words]
  __shared__ unsigned warp_cnt[kUnionThreads / 32];
  const int words = p.words, q_blocks = p.q_blocks;
  const int row = blockIdx.x;
  const int bh = row / q_blocks;
  const i64 at = static_cast<i64>(bh) * (q_blocks + 1) + (row - bh * q_blocks);
  for (int w = threadIdx.x; w < words; w += kUnionThreads) row_bits[w] = 0u;
  __syncthreads();
  int lo, hi;
  list_range(static_cast<const int*>(p.indptr), at, p.capacity, lo, hi);
  set_list_bits(row_bits, static_cast<const int*>(p.indices), lo, hi, p.kv_len);
  __syncthreads();
  unsigned* dst = static_cast<unsigned*>(p.bits) + static_cast<i64>(row) * words;
  for (int w = threadIdx.x; w < words; w += kUnionThreads) dst[w] = row_bits[w];
  auto word = [&](int w) -> unsigned { return row_bits[w]; };
  count_or_write_row<kUnionThreads>(word, words, row, static_cast<int*>(p.counts), nullptr, nullptr, warp_cnt);
}

}  // namespace fg
