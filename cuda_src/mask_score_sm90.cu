// Mask-scoring kernels on Hopper tensor cores (wgmma, sm_90a): the "stats" and "maxprob" modes
// of mask_score.cu, same parameters and outputs, at wgmma rates.
//
// A CTA (two warpgroups) keeps 128 rows in shared memory and walks its key chunk in tiles of
// 128 keys (cp.async into 128-byte-swizzled stages). Both modes multiply the same two tiles;
// they differ in which one is the wgmma's A operand, so that each mode's reduction stays
// inside a thread and its quad:
//   stats (rows are A, 64 per warpgroup; keys are N): each row's log-sum-exp over the chunk,
//     written to partial[z, row, chunk], as mask_score.cu's mode 1;
//   maxprob (keys are A, 64 per warpgroup; rows are N): p = exp2(logit * log2e - lse2[row])
//     and its max over each group of `group` consecutive rows (a power of two, 2..128),
//     written to out[z, row / group, key], as mode 2. A column max needs no exponential per
//     element: the max is taken on the exponent and one exp2 per stored score follows.
// Band mode (band_width > 0; maxprob only with group = 128): each row tile is one query block
// and takes the keys [row0 + band_lo, + band_width); maxprob raises the stored scores.
// Grid: (row tiles, key chunks, heads), row tiles fastest, so CTAs that run together read the
// same keys from L2. Two CTAs per SM: one's reductions overlap the other's products (256 rows
// per CTA, one CTA per SM and two products in flight per warpgroup measured slower).
#include "common.cuh"
#include "wgmma.cuh"

namespace fg {

template <int D>
struct Sm90ScoreShape {
  static constexpr int kRows = kSm90ScoreRows;     // resident rows per CTA
  static constexpr int kKeys = kSm90ScoreKeyTile;  // keys per tile
  static constexpr int kThreads = 256;
  static constexpr int kChunksPerRow = D / 8;
  static constexpr int kRowsPerPass = kThreads / kChunksPerRow;
  static constexpr int kTileElems = kKeys * D;
  static_assert(kRows == 128 && kKeys == 128, "two warpgroups of 64 rows or keys");
  static_assert(D % 64 == 0 && kKeys % kRowsPerPass == 0 && kRows % kRowsPerPass == 0, "tile rows per pass");
};

template <class T, int D, int MODE>
__global__ void __launch_bounds__(256, 2)
mask_score_sm90(const __grid_constant__ ScoreParams p) {
  using S = Sm90ScoreShape<D>;
  constexpr int kN = S::kKeys;
  constexpr float kLog2e = 1.4426950408889634f;
  static_assert(MODE == kMode_stats || MODE == kMode_maxprob, "stats and maxprob only");
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  unsigned char* smem_base = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);
  u16* sR = reinterpret_cast<u16*>(smem_base);
  u16* sK = sR + S::kRows * D;
  float* sLse2 = reinterpret_cast<float*>(sK + 2 * S::kTileElems);  // maxprob: lse2 of each row
  const u32 sR_u32 = smem_u32(sR);
  const u32 sK_u32 = smem_u32(sK);

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int wg = warp >> 2;
  const int g = lane >> 2;
  const int tig = lane & 3;
  const u16* __restrict__ rows = static_cast<const u16*>(p.rows);
  const u16* __restrict__ k = static_cast<const u16*>(p.k);
  const int n_rows = p.n_rows;
  const int z = blockIdx.z;
  const int bh = p.bh0 + z;
  const int b = bh / p.heads;
  const int h = bh - b * p.heads;
  const int row0 = blockIdx.x * S::kRows;
  const int chunk = blockIdx.y;
  const bool band = p.band_width > 0;
  const int range_begin = band ? max(0, row0 + p.band_lo) : 0;
  const int range_end = band ? min(p.kv_len, row0 + p.band_lo + p.band_width) : p.kv_len;
  const int key_begin = range_begin + chunk * p.key_chunk;
  const int key_end = min(range_end, key_begin + p.key_chunk);
  const int ntiles = key_end > key_begin ? (key_end - key_begin + kN - 1) / kN : 0;

  const u16* r_base = rows + b * p.r_sb + h * p.r_sh;
  const u16* k_base = k + b * p.k_sb + h * p.k_sh;
  const i64 r_ss = p.r_ss;
  const i64 k_ss = p.k_ss;
  const int my_chunk = tid % S::kChunksPerRow;
  const int my_row = tid / S::kChunksPerRow;

#pragma unroll
  for (int j = 0; j < S::kRows / S::kRowsPerPass; ++j) {
    const int r = my_row + j * S::kRowsPerPass;
    const bool valid = row0 + r < n_rows;
    const u16* src = r_base + (valid ? static_cast<i64>(row0 + r) * r_ss : 0) + my_chunk * 8;
    cp_async16(sR_u32 + 2 * sw128_offset<S::kRows>(r, my_chunk), src, valid);
  }
  auto issue_tile = [&](int t, int stage) {
#pragma unroll
    for (int j = 0; j < kN / S::kRowsPerPass; ++j) {
      const int r = my_row + j * S::kRowsPerPass;
      const int key = key_begin + t * kN + r;
      const bool valid = key < key_end;
      const u16* src = k_base + (valid ? static_cast<i64>(key) * k_ss : 0) + my_chunk * 8;
      cp_async16(sK_u32 + 2 * (stage * S::kTileElems + sw128_offset<kN>(r, my_chunk)), src, valid);
    }
  };
  if (MODE == kMode_maxprob && tid < S::kRows) {
    // Rows without a finite lse (and rows past n_rows) get +inf: their p is exp2(-inf) = 0.
    const int r = row0 + tid;
    const float x = r < n_rows ? static_cast<const float*>(p.lse)[static_cast<i64>(z) * n_rows + r] : FG_NEG_INF;
    sLse2[tid] = x > FG_NEG_INF && x < -FG_NEG_INF ? x * kLog2e : -FG_NEG_INF;
  }
  if (ntiles > 0) issue_tile(0, 0);
  cp_async_commit();

  // Stats: this thread's rows wg*64 + (warp%4)*16 + g and + 8; running max (log2) and sum.
  float run_m[2] = {FG_NEG_INF, FG_NEG_INF};
  float run_l[2] = {0.f, 0.f};
  const float scale_log2 = p.scale_log2;
  const int group = p.group;
  const int out_rows = p.out_rows;
  const i64 out_ld = p.out_ld;
  float* __restrict__ out = static_cast<float*>(p.out);
  // A: 64 rows (stats) or 64 keys (maxprob) of its tile, per warpgroup.
  const u32 a_wg = wg * 64 * 128;
  const int thread_row = wg * 64 + (warp & 3) * 16 + g;  // first of this thread's two A rows
  // Maxprob: groups are powers of two (shifts, not divisions); this thread's first output row
  // (of its column tile 0) and its store pointer, keys added per tile.
  const int group_shift = __ffs(group) - 1;
  const int orow0 = (row0 + tig * 2) >> group_shift;
  float* out_thread = out + (static_cast<i64>(z) * out_rows + orow0) * out_ld + thread_row;

  for (int t = 0; t < ntiles; ++t) {
    if (t + 1 < ntiles) issue_tile(t + 1, (t + 1) & 1);
    cp_async_commit();
    cp_async_wait<1>();
    fence_proxy_async();
    __syncthreads();
    const u32 k_stage = sK_u32 + (t & 1) * S::kTileElems * 2;
    const int tile_key = key_begin + t * kN;

    float acc[kN / 2];
    wgmma_fence();
    if (MODE == kMode_stats) wgmma_ss_tile<T, D, kN>(acc, sR_u32 + a_wg, S::kRows, k_stage, kN);
    else wgmma_ss_tile<T, D, S::kRows>(acc, k_stage + a_wg, kN, sR_u32, S::kRows);
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_fence_operand(acc);

    if (MODE == kMode_stats) {
      // acc[nt * 4 + e]: row thread_row + 8 * (e >> 1), key tile_key + nt * 8 + tig * 2 + (e & 1).
      float tile_m[2] = {FG_NEG_INF, FG_NEG_INF};
#pragma unroll
      for (int nt = 0; nt < kN / 8; ++nt) {
        const int key = tile_key + nt * 8 + tig * 2;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float x = key + (e & 1) < key_end ? acc[nt * 4 + e] * scale_log2 : FG_NEG_INF;
          acc[nt * 4 + e] = x;
          tile_m[e >> 1] = fmaxf(tile_m[e >> 1], x);
        }
      }
      float base[2];
      raise_running_max(run_m, run_l, tile_m, base);
#pragma unroll
      for (int i = 0; i < kN / 2; ++i) run_l[(i >> 1) & 1] += fast_exp2(acc[i] - base[(i >> 1) & 1]);
    } else {
      // acc[nt * 4 + e]: key tile_key + thread_row + 8 * (e >> 1), row row0 + nt * 8 + tig * 2 + (e & 1).
      // v[nt][i]: the exponent's max over the thread's two rows of column tile nt, key i.
      float v[kN / 8][2];
#pragma unroll
      for (int nt = 0; nt < S::kRows / 8; ++nt) {
        const float2 l2 = *reinterpret_cast<const float2*>(sLse2 + nt * 8 + tig * 2);
#pragma unroll
        for (int i = 0; i < 2; ++i)
          v[nt][i] = fmaxf(acc[nt * 4 + 2 * i] * scale_log2 - l2.x, acc[nt * 4 + 2 * i + 1] * scale_log2 - l2.y);
      }
      // Groups of 16 or more rows: fold column tiles within the thread first (fewer shuffles).
      const int tiles_per_group = group >= 16 ? group / 8 : 1;
#pragma unroll
      for (int span = 1; span < S::kRows / 8; span <<= 1) {
        if (span < tiles_per_group) {
#pragma unroll
          for (int nt = 0; nt < S::kRows / 8; nt += 2 * span)
#pragma unroll
            for (int i = 0; i < 2; ++i) v[nt][i] = fmaxf(v[nt][i], v[nt + span][i]);
        }
      }
      const int lanes = group >= 8 ? 4 : group / 2;  // quad lanes one group spans
#pragma unroll
      for (int nt = 0; nt < S::kRows / 8; ++nt) {
        if (nt % tiles_per_group == 0) {
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            if (lanes >= 2) v[nt][i] = fmaxf(v[nt][i], __shfl_xor_sync(0xffffffffu, v[nt][i], 1));
            if (lanes >= 4) v[nt][i] = fmaxf(v[nt][i], __shfl_xor_sync(0xffffffffu, v[nt][i], 2));
          }
          const int step = (nt * 8) >> group_shift;  // output rows past orow0
          if ((tig & (lanes - 1)) == 0 && orow0 + step < out_rows) {
            float* dst = out_thread + step * out_ld + tile_key;
#pragma unroll
            for (int i = 0; i < 2; ++i) {
              if (tile_key + thread_row + 8 * i < key_end) {
                const float m = fast_exp2(v[nt][i]);
                if (band) dst[8 * i] = fmaxf(dst[8 * i], m);
                else dst[8 * i] = m;
              }
            }
          }
        }
      }
    }
    __syncthreads();  // the stage is refilled by the next iteration
  }
  cp_async_wait<0>();

  if (MODE == kMode_stats) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      merge_lse2(run_m[i], run_l[i], __shfl_xor_sync(0xffffffffu, run_m[i], 1), __shfl_xor_sync(0xffffffffu, run_l[i], 1));
      merge_lse2(run_m[i], run_l[i], __shfl_xor_sync(0xffffffffu, run_m[i], 2), __shfl_xor_sync(0xffffffffu, run_l[i], 2));
      const int r = row0 + thread_row + 8 * i;
      if (tig == 0 && r < n_rows) {
        static_cast<float*>(p.partial)[(static_cast<i64>(z) * n_rows + r) * gridDim.y + chunk] =
            run_l[i] > 0.f ? (run_m[i] + __log2f(run_l[i])) * FG_LN2 : FG_NEG_INF;
      }
    }
  }
}

}  // namespace fg
