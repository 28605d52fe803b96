// Pieces both attention kernels share: the work item of a CTA, the online-softmax update of
// one warp's 16-row accumulator fragments, and the per-row finish (1 / sum and LSE).
//
// Fragment layout (mma.m16n8 C fragments, and wgmma accumulators per warp): for each 8-column
// tile nt a thread holds s[nt*4 + 0..1] at row g = lane / 4, columns nt*8 + 2*(lane % 4) + 0..1,
// and s[nt*4 + 2..3] at row g + 8, same columns.
#pragma once
#include "common.cuh"

// The kernels' one AttnParams argument (defined ahead of the source from
// fgcupy/jit/spec.py: ATTN_PARAMS), unpacked into the names the kernel bodies use.
#define FG_UNPACK_ATTN_PARAMS(p)                                                      \
  const u16* __restrict__ q = static_cast<const u16*>(p.q);                          \
  const u16* __restrict__ k = static_cast<const u16*>(p.k);                          \
  const u16* __restrict__ v = static_cast<const u16*>(p.v);                          \
  u16* __restrict__ o = static_cast<u16*>(p.o);                                      \
  float* __restrict__ lse = static_cast<float*>(p.lse);                              \
  const int* __restrict__ indptr = static_cast<const int*>(p.indptr);                \
  const int* __restrict__ indices = static_cast<const int*>(p.indices);              \
  const int* __restrict__ order = static_cast<const int*>(p.order);                  \
  const int heads = p.heads, q_blocks = p.q_blocks, q_len = p.q_len;                 \
  const int kv_len = p.kv_len, capacity = p.capacity;                                \
  const i64 q_sb = p.q_sb, q_sh = p.q_sh, q_ss = p.q_ss;                             \
  const i64 k_sb = p.k_sb, k_sh = p.k_sh, k_ss = p.k_ss;                             \
  const i64 v_sb = p.v_sb, v_sh = p.v_sh, v_ss = p.v_ss;                             \
  const i64 o_sb = p.o_sb, o_sh = p.o_sh, o_ss = p.o_ss;                             \
  const float scale_log2 = p.scale_log2

namespace fg {

// The query block a CTA computes and the clamped range of its key list. Blocks come in the
// plan's order (longest list first); offsets outside [0, capacity] are clamped so a corrupt
// mask can never make the kernel read outside `indices`.
struct WorkItem {
  int b, h, bh, qb, start, end;
};

__device__ __forceinline__ WorkItem work_item(const int* __restrict__ order, const int* __restrict__ indptr,
                                              int heads, int q_blocks, int capacity) {
  WorkItem w;
  // One CTA per item: an order entry outside [0, items) (a corrupt launch order) runs the CTA's
  // own item instead of indexing past the offsets.
  int item = order[blockIdx.x];
  if (static_cast<unsigned>(item) >= gridDim.x) item = blockIdx.x;
  w.qb = item % q_blocks;
  w.bh = item / q_blocks;
  w.b = w.bh / heads;
  w.h = w.bh - w.b * heads;
  const int start = indptr[w.bh * (q_blocks + 1) + w.qb];
  const int end = indptr[w.bh * (q_blocks + 1) + w.qb + 1];
  w.start = min(max(start, 0), capacity);
  w.end = min(max(end, w.start), capacity);
  return w;
}

// The running max of the thread's two rows after a tile whose (scaled, quad-reduced) maxima are
// m0 and m1: `alpha` rescales what was summed before, `base` is what the tile's exponents subtract.
__device__ __forceinline__ void advance_row_max(float m0, float m1, float row_max[2], float alpha[2], float base[2]) {
  const float tile_max[2] = {m0, m1};
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const float new_max = fmaxf(row_max[i], tile_max[i]);
    base[i] = new_max == FG_NEG_INF ? 0.f : new_max;  // all-masked row: keep exp2 finite
    alpha[i] = fast_exp2(row_max[i] - base[i]);
    row_max[i] = new_max;
  }
}

// One key tile of online softmax (base 2, scale folded in) for the two rows this thread holds.
// `s` holds N/2 raw scores; on return it holds exp2(score * scale - running max). `my_bias` is
// the shared address of the bias of this thread's first column, 8 * (lane % 4) bytes into the
// tile's N per-key biases (0 or -inf for masked keys). Returns in `alpha` the factor by which
// the output accumulators of each row must be rescaled.
template <int N>
__device__ __forceinline__ void softmax_tile(float* s, u32 my_bias, float scale_log2, float row_max[2],
                                             float row_sum[2], float alpha[2]) {
  float tile_max[2] = {FG_NEG_INF, FG_NEG_INF};
#pragma unroll
  for (int nt = 0; nt < N / 8; ++nt) {
    const float b0 = ld_shared_f32(my_bias + nt * 32), b1 = ld_shared_f32(my_bias + nt * 32 + 4);
    float* x = s + nt * 4;
    x[0] = fmaf(x[0], scale_log2, b0);
    x[1] = fmaf(x[1], scale_log2, b1);
    x[2] = fmaf(x[2], scale_log2, b0);
    x[3] = fmaf(x[3], scale_log2, b1);
    tile_max[0] = fmaxf(tile_max[0], fmaxf(x[0], x[1]));
    tile_max[1] = fmaxf(tile_max[1], fmaxf(x[2], x[3]));
  }
  float base[2];
  advance_row_max(quad_max(tile_max[0]), quad_max(tile_max[1]), row_max, alpha, base);
  float tile_sum[2] = {0.f, 0.f};
#pragma unroll
  for (int nt = 0; nt < N / 8; ++nt) {
    float* x = s + nt * 4;
    x[0] = fast_exp2(x[0] - base[0]);
    x[1] = fast_exp2(x[1] - base[0]);
    x[2] = fast_exp2(x[2] - base[1]);
    x[3] = fast_exp2(x[3] - base[1]);
    tile_sum[0] += x[0] + x[1];
    tile_sum[1] += x[2] + x[3];
  }
  row_sum[0] = row_sum[0] * alpha[0] + tile_sum[0];
  row_sum[1] = row_sum[1] * alpha[1] + tile_sum[1];
}

// softmax_tile for a tile with no masked key: the max is taken on the raw products (the scale
// is positive) and the scale folds into each exponent's FFMA, with no bias to load or add.
template <int N>
__device__ __forceinline__ void softmax_tile_unmasked(float* s, float scale_log2, float row_max[2], float row_sum[2],
                                                      float alpha[2]) {
  float tile_max[2] = {FG_NEG_INF, FG_NEG_INF};
#pragma unroll
  for (int nt = 0; nt < N / 8; ++nt) {
    const float* x = s + nt * 4;
    tile_max[0] = fmaxf(tile_max[0], fmaxf(x[0], x[1]));
    tile_max[1] = fmaxf(tile_max[1], fmaxf(x[2], x[3]));
  }
  float base[2];
  advance_row_max(quad_max(tile_max[0]) * scale_log2, quad_max(tile_max[1]) * scale_log2, row_max, alpha, base);
  float tile_sum[2] = {0.f, 0.f};
#pragma unroll
  for (int nt = 0; nt < N / 8; ++nt) {
    float* x = s + nt * 4;
    x[0] = fast_exp2(fmaf(x[0], scale_log2, -base[0]));
    x[1] = fast_exp2(fmaf(x[1], scale_log2, -base[0]));
    x[2] = fast_exp2(fmaf(x[2], scale_log2, -base[1]));
    x[3] = fast_exp2(fmaf(x[3], scale_log2, -base[1]));
    tile_sum[0] += x[0] + x[1];
    tile_sum[1] += x[2] + x[3];
  }
  row_sum[0] = row_sum[0] * alpha[0] + tile_sum[0];
  row_sum[1] = row_sum[1] * alpha[1] + tile_sum[1];
}

// Rescale a 16-row output fragment of D columns (D/2 floats per thread) by the rows' alphas.
template <int D>
__device__ __forceinline__ void rescale_rows(float* acc, const float alpha[2]) {
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) {
    acc[dt * 4 + 0] *= alpha[0];
    acc[dt * 4 + 1] *= alpha[0];
    acc[dt * 4 + 2] *= alpha[1];
    acc[dt * 4 + 3] *= alpha[1];
  }
}

// P as the A operand of a 16-key step j (mma.m16n8k16 A-fragment layout).
template <class T>
__device__ __forceinline__ void pack_p(u32 a[4], const float* s, int j) {
  a[0] = T::pack(s[(2 * j) * 4 + 0], s[(2 * j) * 4 + 1]);
  a[1] = T::pack(s[(2 * j) * 4 + 2], s[(2 * j) * 4 + 3]);
  a[2] = T::pack(s[(2 * j + 1) * 4 + 0], s[(2 * j + 1) * 4 + 1]);
  a[3] = T::pack(s[(2 * j + 1) * 4 + 2], s[(2 * j + 1) * 4 + 3]);
}

// Finish the two rows: full row sums over the quad and 1 / sum (0 for an empty row).
__device__ __forceinline__ void finish_rows(float row_sum[2], float inv[2]) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    row_sum[i] = quad_sum(row_sum[i]);
    inv[i] = row_sum[i] > 0.f ? 1.f / row_sum[i] : 0.f;
  }
}

// Natural-log LSE of a finished row (-inf for an empty row).
__device__ __forceinline__ float row_lse(float row_max, float row_sum) {
  return row_sum > 0.f ? (row_max + __log2f(row_sum)) * FG_LN2 : FG_NEG_INF;
}

// Start the asynchronous load of the CTA's Q tile: this thread copies chunk `chunk` of rows
// first_row + j * ROWS_PER_PASS; rows past q_len, and every row where `cols` is false (a chunk
// past the head dim), are zero-filled. `offset` as in store_tile.
template <int ROWS, int ROWS_PER_PASS, class Offset>
__device__ __forceinline__ void load_q_tile(u32 tile, const u16* __restrict__ q_base, i64 q_ss, int first_row,
                                            int chunk, int q_row0, int q_len, Offset offset, bool cols = true) {
#pragma unroll
  for (int j = 0; j < ROWS / ROWS_PER_PASS; ++j) {
    const int r = first_row + j * ROWS_PER_PASS;
    const bool valid = cols && q_row0 + r < q_len;
    const u16* src = q_base + (valid ? (q_row0 + r) * q_ss : 0) + chunk * 8;
    cp_async16(tile + 2 * offset(r, chunk), src, valid);
  }
}

// This thread's key indices of one key tile (positions tile * N + j * ROWS_PER_PASS past its
// first position `first` in the list, -1 past the end). The 64-bit pointer is rebuilt from the
// 32-bit position at each call: the empty asm stops the compiler from keeping it live across
// the main loop, which costs registers the loop needs.
template <int N, int ROWS_PER_THREAD, int ROWS_PER_PASS>
__device__ __forceinline__ void load_key_indices(int (&idx)[ROWS_PER_THREAD], const int* __restrict__ indices,
                                                 int first, int count, int tile) {
  asm volatile("" : "+r"(first));
  const int* mine = indices + first;
#pragma unroll
  for (int j = 0; j < ROWS_PER_THREAD; ++j) {
    const int pos = tile * N + j * ROWS_PER_PASS;
    idx[j] = pos < count ? __ldg(mine + pos) : -1;
  }
}

// Gather this thread's rows of key tile `stage`: chunk `chunk` of K and V rows idx[j] into tile
// rows first_row + j * ROWS_PER_PASS (tiles of TILE_ELEMS elements from shared addresses sK, sV;
// no copy where `copy` is false, a chunk past the head dim), and each row's bias (0, or -inf for
// an index outside [0, kv_len), which is zero-filled and never read).
template <int ROWS_PER_THREAD, int ROWS_PER_PASS, int TILE_ELEMS, int N, class Offset>
__device__ __forceinline__ void gather_kv_tile(u32 sK, u32 sV, u32 sBias, int stage, const int (&idx)[ROWS_PER_THREAD],
                                               int first_row, int chunk, int kv_len, const u16* __restrict__ k_base,
                                               i64 k_ss, const u16* __restrict__ v_base, i64 v_ss, Offset offset,
                                               bool copy = true) {
#pragma unroll
  for (int j = 0; j < ROWS_PER_THREAD; ++j) {
    const int r = first_row + j * ROWS_PER_PASS;
    const bool valid = static_cast<unsigned>(idx[j]) < static_cast<unsigned>(kv_len);
    const i64 row = valid ? idx[j] : 0;
    const u32 off = 2 * (stage * TILE_ELEMS + offset(r, chunk));
    if (copy) {
      cp_async16(sK + off, k_base + row * k_ss + chunk * 8, valid);
      cp_async16(sV + off, v_base + row * v_ss + chunk * 8, valid);
    }
    if (chunk == 0) st_shared_f32(sBias + 4 * (stage * N + r), valid ? 0.f : FG_NEG_INF);
  }
}

// Copy the output tile, staged in shared memory, to global rows q_row0 + r (< q_len) with
// 16-byte stores: this thread writes chunk `chunk` of rows first_row + j * ROWS_PER_PASS.
// `offset(r, c)` is the tile's element offset of chunk c of row r (each kernel swizzles its own
// way). first_row is recomputed behind an empty asm so the compiler does not keep the Q-load
// offsets (the same values) alive across the main loop, which costs registers the loop needs.
template <int ROWS, int ROWS_PER_PASS, class Offset>
__device__ __forceinline__ void store_tile(u16* __restrict__ o_base, i64 o_ss, const u16* tile, int first_row,
                                           int chunk, int q_row0, int q_len, Offset offset) {
  asm volatile("" : "+r"(first_row));
#pragma unroll
  for (int j = 0; j < ROWS / ROWS_PER_PASS; ++j) {
    const int r = first_row + j * ROWS_PER_PASS;
    if (q_row0 + r < q_len) {
      const uint4 val = *reinterpret_cast<const uint4*>(tile + offset(r, chunk));
      *reinterpret_cast<uint4*>(o_base + (q_row0 + r) * o_ss + chunk * 8) = val;
    }
  }
}

}  // namespace fg
