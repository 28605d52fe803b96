// Exact column maxima of whole query blocks on mma.sync (sm_80 and later): the portable kernel of
// the "maxprob" mode when a group is a whole row tile (a dense step's column max, the exact band's
// raise) and of the "listmax" mode (the keys of each block's list).
//
// A CTA takes one query block (WARPS x 16 rows, resident in shared memory) and walks its keys in
// tiles of WARPS x 16 (K rows double-buffered with 16-byte cp.async into swizzled shared memory;
// in list mode gathered row by row, their indices read a tile ahead). The keys are the MMA's A
// operand, 16 per warp, and the block's rows its B operand, so a key's maximum over the rows of
// p = exp2(logit * log2e - lse2[row]) stays within a thread and its quad (two shuffles): no
// reduction across warps through shared memory. One exp2 and one store per key follow (the max
// commutes with exp2), the score stored as bfloat16 rounded toward zero at out[z, block, key]:
// in band mode (band_width > 0) raised in place (each (block, key) has one writer); in list mode
// only for listed keys inside [0, kv_len), other keys left as they are. Rows past n_rows or
// without a finite lse contribute p = 0.
// Parameters: ScoreParams (fgcupy/jit/score_spec.py), as mask_score.cu; the grid is (key chunks,
// query blocks, heads).
#include "common.cuh"
#include "score_range.cuh"

namespace fg {

template <class T, int D, int MODE, int WARPS>
__global__ void __launch_bounds__(WARPS * 32, 16 / WARPS)
mask_colmax(const __grid_constant__ ScoreParams p) {
  using S = ScoreShape<D, WARPS, WARPS * 16>;  // keys: 16 a warp
  constexpr int kN = S::kN;
  constexpr bool kList = MODE == kMode_listmax;
  static_assert(MODE == kMode_maxprob || kList, "maxprob (groups of a whole block) or listmax");
  extern __shared__ __align__(128) unsigned char smem_raw[];
  u16* sQ = reinterpret_cast<u16*>(smem_raw);
  u16* sK = sQ + S::kRows * D;
  float* sLse2 = reinterpret_cast<float*>(sK + 2 * S::kTileElems);

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int g = lane >> 2;
  const int tig = lane & 3;
  const u16* __restrict__ rows = static_cast<const u16*>(p.rows);
  const u16* __restrict__ k = static_cast<const u16*>(p.k);
  const int* __restrict__ list = static_cast<const int*>(p.list_indices);
  const int n_rows = p.n_rows;
  const int kv_len = p.kv_len;
  const int z = blockIdx.z;
  const int bh = p.bh0 + z;
  const int b = bh / p.heads;
  const int h = bh - b * p.heads;
  const int block = blockIdx.y;
  const int row0 = block * S::kRows;
  const bool band = p.band_width > 0;
  // Keys of this CTA (list mode: positions in its block's list, called keys from here on).
  const int2 range = score_key_range(p, kList, bh, row0, block);
  const int key_begin = range.x + blockIdx.x * p.key_chunk;
  const int key_end = min(range.y, key_begin + p.key_chunk);
  const int ntiles = key_end > key_begin ? (key_end - key_begin + kN - 1) / kN : 0;

  const u16* q_base = rows + b * p.r_sb + h * p.r_sh;
  const u16* k_base = k + b * p.k_sb + h * p.k_sh;
  const int my_chunk = tid % S::kChunksPerRow;
  const int my_row = tid / S::kChunksPerRow;
  copy_resident_rows<S, D>(sQ, q_base, row0, n_rows, p.r_ss, my_row, my_chunk);
  if (tid < S::kRows) {
    // +inf for rows past n_rows or without a finite lse: their p is exp2(-inf) = 0.
    const int r = row0 + tid;
    const float x = r < n_rows ? static_cast<const float*>(p.lse)[static_cast<i64>(z) * n_rows + r] : FG_NEG_INF;
    sLse2[tid] = x > FG_NEG_INF && x < -FG_NEG_INF ? x * 1.4426950408889634f : -FG_NEG_INF;
  }

  constexpr int kTileRows = kN / S::kRowsPerPass;
  int listed[kList ? kTileRows : 1];  // list mode: the key of each row this thread copies next
  auto read_list = [&](int t) {
#pragma unroll
    for (int j = 0; j < (kList ? kTileRows : 0); ++j) {
      const int pos = key_begin + t * kN + my_row + j * S::kRowsPerPass;
      const int key = pos < key_end ? list[pos] : -1;
      listed[j] = static_cast<unsigned>(key) < static_cast<unsigned>(kv_len) ? key : -1;  // bad keys: no row
    }
  };
  auto issue_tile = [&](int t, int stage) {
#pragma unroll
    for (int j = 0; j < kTileRows; ++j) {
      const int r = my_row + j * S::kRowsPerPass;
      const int key = kList ? listed[j] : key_begin + t * kN + r;
      const bool valid = kList ? key >= 0 : key < key_end;
      const u16* src = k_base + (valid ? static_cast<i64>(key) * p.k_ss : 0) + my_chunk * 8;
      cp_async16(smem_u32(sK + stage * S::kTileElems + swz<D>(r, my_chunk)), src, valid);
    }
    if (kList) read_list(t + 1);
  };
  if (kList) read_list(0);
  if (ntiles > 0) issue_tile(0, 0);
  cp_async_commit();

  const float scale_log2 = p.scale_log2;
  u16* __restrict__ out_block = static_cast<u16*>(p.out) + (static_cast<i64>(z) * p.out_rows + block) * p.out_ld;
  const u32 sQ_addr = smem_u32(sQ);
  const u32 sK_addr = smem_u32(sK);
  const int lm_r = lane & 7;
  const int lm_hi8 = (lane >> 3) & 1;
  const int lm_hi16 = lane >> 4;
  const int wkey = warp * 16;  // this warp's keys in a tile: wkey + g and wkey + g + 8

  for (int t = 0; t < ntiles; ++t) {
    if (t + 1 < ntiles) issue_tile(t + 1, (t + 1) & 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const u32 k_stage = sK_addr + (t & 1) * S::kTileElems * 2;
    const int tile_key = key_begin + t * kN;
    // The two keys this thread may store, read before the product hides the load.
    int out_key[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int pos = tile_key + wkey + g + 8 * i;
      out_key[i] = pos >= key_end ? -1 : kList ? list[pos] : pos;
    }

    // acc[nt][e]: key wkey + g + 8 * (e >> 1), row nt * 8 + tig * 2 + (e & 1).
    float acc[S::kRows / 8][4];
#pragma unroll
    for (int i = 0; i < S::kRows / 8; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][e] = 0.f;
#pragma unroll 2
    for (int kk = 0; kk < D / 16; ++kk) {
      u32 a[4];
      ldmatrix_x4(a, k_stage + 2 * swz<D>(wkey + lm_hi8 * 8 + lm_r, kk * 2 + lm_hi16));
#pragma unroll
      for (int np = 0; np < S::kRows / 16; ++np) {
        u32 bq[4];
        ldmatrix_x4(bq, sQ_addr + 2 * swz<D>(np * 16 + lm_hi16 * 8 + lm_r, kk * 2 + lm_hi8));
        T::mma(acc[2 * np], a, bq[0], bq[1]);
        T::mma(acc[2 * np + 1], a, bq[2], bq[3]);
      }
    }

    float run[2] = {FG_NEG_INF, FG_NEG_INF};
#pragma unroll
    for (int nt = 0; nt < S::kRows / 8; ++nt) {
      const float2 l2 = *reinterpret_cast<const float2*>(sLse2 + nt * 8 + tig * 2);
#pragma unroll
      for (int i = 0; i < 2; ++i)
        run[i] = fmaxf(run[i], fmaxf(acc[nt][2 * i] * scale_log2 - l2.x, acc[nt][2 * i + 1] * scale_log2 - l2.y));
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      run[i] = fmaxf(run[i], __shfl_xor_sync(0xffffffffu, run[i], 1));
      run[i] = fmaxf(run[i], __shfl_xor_sync(0xffffffffu, run[i], 2));
    }
    if (tig == 0) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        if (static_cast<unsigned>(out_key[i]) < static_cast<unsigned>(kv_len)) {
          const float m = fast_exp2(run[i]);
          u16* dst = out_block + out_key[i];
          *dst = bf16_t::truncate(band ? fmaxf(bf16_t::to_float(*dst), m) : m);
        }
      }
    }
    __syncthreads();  // the stage is refilled by the next iteration
  }
  cp_async_wait<0>();
}

}  // namespace fg
