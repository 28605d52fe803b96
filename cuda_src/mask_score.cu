// Mask-scoring kernels: rows (pooled mean queries, or single queries) against every key.
//
// One CTA takes WARPS x 16 rows of one (batch, head) and a chunk of keys, walks the chunk in
// tiles of 64 keys (K rows double-buffered with 16-byte cp.async into swizzled shared memory)
// and computes scale * row . key with mma.sync m16n8k16 (fp32 accumulate). Four modes:
//   0 (logits): write the scaled logits [z, row, key] (float32) and, per row, the log-sum-exp
//      of this CTA's key chunk (natural log) into partial[z, row, chunk];
//   3 (logits, float16): the same, logits stored rounded to float16 (IEEE round to nearest,
//      overflow to +-inf); the log-sum-exps come from the float32 logits;
//   1 (stats):  only the partial log-sum-exps (used before mode 2 on pooled sub-blocks) and,
//      where partial_sq is set, those of twice the logits, log sum_j exp(2 s_j) (natural log),
//      into partial_sq[z, row, chunk] (sum_j p_j^2 = exp(lse_twice - 2 lse) without a second
//      pass over the keys), from a running sum of the exponentials' squares beside their sum;
//   2 (maxprob): p = exp(logit - lse[row]) and the max of p over each group of G consecutive
//      rows (G a power of two dividing WARPS x 16), written to out[z, row / G, key] as bfloat16
//      rounded toward zero. With one query per row and G = slice_m this is the exact column-max
//      score of a dense step.
// Rows past n_rows read zeros and are never written; keys past the chunk are masked out, and in
// mode 1 so are each row's skipped keys (score_range.cuh, skipped_keys).
// Band mode (modes 1 and 2, band_width > 0): each row tile is one query block and takes only
// the keys of its band [row0 + band_lo, + band_width); mode 2 then raises the block's existing
// scores to the exact maxima (a max with what is stored: each (block, key) has one writer).
// Mode 2 with groups of a whole row tile runs in mask_colmax.cu instead (keys as the A operand).
// Parameters arrive as one ScoreParams struct; it and the constants kScoreKeyTile and kMode_*
// come from fgcupy/jit/score_spec.py (SCORE_PARAMS, SCORE_CONSTANTS), written ahead of this source.
#include "common.cuh"
#include "score_range.cuh"

namespace fg {

template <class T, int D, int MODE, int WARPS>
__global__ void __launch_bounds__(WARPS * 32, 16 / WARPS)
mask_score(const __grid_constant__ ScoreParams p) {
  using S = ScoreShape<D, WARPS, kScoreKeyTile>;
  constexpr int kN = S::kN;
  constexpr bool kLogits = MODE == kMode_logits || MODE == kMode_logits_f16;  // stored logits
  extern __shared__ __align__(128) unsigned char smem_raw[];
  u16* sQ = reinterpret_cast<u16*>(smem_raw);
  u16* sK = sQ + S::kRows * D;
  float* sRed = reinterpret_cast<float*>(sK + 2 * S::kTileElems);  // [WARPS][kN], mode 2 only

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int g = lane >> 2;
  const int tig = lane & 3;
  const u16* __restrict__ rows = static_cast<const u16*>(p.rows);
  const u16* __restrict__ k = static_cast<const u16*>(p.k);
  float* __restrict__ out = static_cast<float*>(p.out);      // mode 0
  u16* __restrict__ out16 = static_cast<u16*>(p.out);        // modes 2 (bfloat16) and 3 (float16)
  float* __restrict__ partial = static_cast<float*>(p.partial);
  float* __restrict__ partial_sq = static_cast<float*>(p.partial_sq);  // mode 1, may be null
  const float* __restrict__ lse = static_cast<const float*>(p.lse);
  const int n_rows = p.n_rows;
  const int group = p.group;
  const int out_rows = p.out_rows;
  const float scale = p.scale;
  const float scale_log2 = p.scale_log2;
  const i64 out_ld = p.out_ld;
  const int z = blockIdx.z;
  const int bh = p.bh0 + z;
  const int b = bh / p.heads;
  const int h = bh - b * p.heads;
  const int row0 = blockIdx.y * S::kRows;
  // Keys of this CTA: a chunk of all keys, or (band mode) of this row tile's band
  // [row0 + band_lo, row0 + band_lo + band_width) clipped to the keys.
  const bool band = p.band_width > 0;
  const int2 range = score_key_range(p, false, bh, row0, blockIdx.y);
  const int key_begin = range.x + blockIdx.x * p.key_chunk;
  const int key_end = min(range.y, key_begin + p.key_chunk);
  const int ntiles = key_end > key_begin ? (key_end - key_begin + kN - 1) / kN : 0;

  const i64 k_ss = p.k_ss;
  const u16* q_base = rows + b * p.r_sb + h * p.r_sh;
  const u16* k_base = k + b * p.k_sb + h * p.k_sh;
  const int my_chunk = tid % S::kChunksPerRow;
  const int my_row = tid / S::kChunksPerRow;

  copy_resident_rows<S, D>(sQ, q_base, row0, n_rows, p.r_ss, my_row, my_chunk);
  auto issue_tile = [&](int t, int stage) {
#pragma unroll
    for (int j = 0; j < kN / S::kRowsPerPass; ++j) {
      const int r = my_row + j * S::kRowsPerPass;
      const int key = key_begin + t * kN + r;
      const bool valid = key < key_end;
      const u16* src = k_base + (valid ? static_cast<i64>(key) * k_ss : 0) + my_chunk * 8;
      cp_async16(smem_u32(sK + stage * S::kTileElems + swz<D>(r, my_chunk)), src, valid);
    }
  };
  if (ntiles > 0) issue_tile(0, 0);
  cp_async_commit();

  const int wrow = warp * 16;
  const int r_lo = row0 + wrow + g;  // this thread's two C-fragment rows: r_lo and r_lo + 8
  // Mode 0/1: running max (log2 units) and sum of this thread's columns, per row.
  float run_m[2] = {FG_NEG_INF, FG_NEG_INF};
  float run_l[2] = {0.f, 0.f};
  float run_sq[2] = {0.f, 0.f};  // mode 1: the sum of the terms' squares (one FMA a term)
  // Mode 2: log2-scaled lse of the two rows; rows without a finite lse contribute p = 0.
  float lse2[2] = {0.f, 0.f};
  bool row_ok[2] = {false, false};
  const int2 skip = MODE == kMode_stats ? skipped_keys(p, r_lo) : make_int2(0, 0);  // both rows' block
  if (MODE == kMode_maxprob) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int r = r_lo + 8 * i;
      if (r < n_rows) {
        const float x = lse[static_cast<i64>(z) * n_rows + r];
        row_ok[i] = x > FG_NEG_INF && x < -FG_NEG_INF;
        lse2[i] = x * 1.4426950408889634f;
      }
    }
  }

  // Mode 0: start of this thread's two output rows (only used where the row exists).
  float* out_row[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) out_row[i] = out + (static_cast<i64>(z) * n_rows + r_lo + 8 * i) * out_ld;

  const u32 sQ_addr = smem_u32(sQ);
  const u32 sK_addr = smem_u32(sK);
  const int lm_r = lane & 7;
  const int lm_hi8 = (lane >> 3) & 1;
  const int lm_hi16 = lane >> 4;

  for (int t = 0; t < ntiles; ++t) {
    if (t + 1 < ntiles) issue_tile(t + 1, (t + 1) & 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const u32 k_stage = sK_addr + (t & 1) * S::kTileElems * 2;

    float acc[kN / 8][4];
#pragma unroll
    for (int i = 0; i < kN / 8; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      u32 a[4];
      ldmatrix_x4(a, sQ_addr + 2 * swz<D>(wrow + lm_hi8 * 8 + lm_r, kk * 2 + lm_hi16));
#pragma unroll
      for (int np = 0; np < kN / 16; ++np) {
        u32 bk[4];
        ldmatrix_x4(bk, k_stage + 2 * swz<D>(np * 16 + lm_hi16 * 8 + lm_r, kk * 2 + lm_hi8));
        T::mma(acc[2 * np], a, bk[0], bk[1]);
        T::mma(acc[2 * np + 1], a, bk[2], bk[3]);
      }
    }

    const int tile_key = key_begin + t * kN;
    if (kLogits || MODE == kMode_stats) {
      float tile_m[2] = {FG_NEG_INF, FG_NEG_INF};
#pragma unroll
      for (int nt = 0; nt < kN / 8; ++nt) {
        const int key = tile_key + nt * 8 + tig * 2;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = key + (e & 1);
          const bool valid = col < key_end && (MODE != kMode_stats || col < skip.x || col >= skip.y);
          const float logit = acc[nt][e] * scale;
          if (kLogits) acc[nt][e] = logit;
          // log2 units for the statistics; masked keys do not count.
          const float x = valid ? logit * 1.4426950408889634f : FG_NEG_INF;
          tile_m[e >> 1] = fmaxf(tile_m[e >> 1], x);
          if (MODE == kMode_stats) acc[nt][e] = x;
          else if (!valid) acc[nt][e] = FG_NEG_INF;  // stored below only where valid
        }
      }
      float base[2];
      if (MODE == kMode_stats) raise_running_max(run_m, run_l, run_sq, tile_m, base);
      else raise_running_max(run_m, run_l, tile_m, base);
#pragma unroll
      for (int nt = 0; nt < kN / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float x = MODE == kMode_stats ? acc[nt][e] : acc[nt][e] * 1.4426950408889634f;
          const float term = fast_exp2(fmaxf(x - base[e >> 1], FG_NEG_INF));  // a NaN logit: no mass
          run_l[e >> 1] += term;
          if (MODE == kMode_stats) run_sq[e >> 1] = fmaf(term, term, run_sq[e >> 1]);
        }
      }
      if (MODE == kMode_logits) {
#pragma unroll
        for (int nt = 0; nt < kN / 8; ++nt) {
          const int key = tile_key + nt * 8 + tig * 2;
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            if (r_lo + 8 * i < n_rows && key < key_end) {
              float* dst = out_row[i] + key;
              if (key + 1 < key_end) {
                store2(dst, acc[nt][2 * i], acc[nt][2 * i + 1]);
              } else {
                dst[0] = acc[nt][2 * i];
              }
            }
          }
        }
      }
      if (MODE == kMode_logits_f16) {
        // Lanes tig and tig ^ 1 swap halves of neighbouring 8-key column tiles, so each lane
        // stores four consecutive float16 (8 bytes) and a quad covers 32 contiguous bytes of a
        // row: even lanes keep tile nt, odd lanes tile nt + 1. Groups of four keys never
        // straddle a key chunk (chunks are multiples of 64 keys); past kv_len they land in the
        // row's padding (rows are padded to 128 bytes, mask_kernels.row_stride).
        const bool odd = tig & 1;
#pragma unroll
        for (int np = 0; np < kN / 16; ++np) {
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            const u32 a = fp16_t::pack(acc[2 * np][2 * i], acc[2 * np][2 * i + 1]);
            const u32 b = fp16_t::pack(acc[2 * np + 1][2 * i], acc[2 * np + 1][2 * i + 1]);
            const u32 got = __shfl_xor_sync(0xffffffffu, odd ? a : b, 1);
            const int key = tile_key + (2 * np + (odd ? 1 : 0)) * 8 + (tig >> 1) * 4;
            if (r_lo + 8 * i < n_rows && key < key_end) {
              uint2 v;
              v.x = odd ? got : a;
              v.y = odd ? b : got;
              *reinterpret_cast<uint2*>(out16 + (static_cast<i64>(z) * n_rows + r_lo + 8 * i) * out_ld + key) = v;
            }
          }
        }
      }
    } else {
      // ---- mode 2: log2 probabilities, their max over each group of `group` rows, and one
      // exponential per stored score (exp2 is monotone, so the max commutes with it) ----
#pragma unroll
      for (int nt = 0; nt < kN / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = e >> 1;
          acc[nt][e] = row_ok[i] ? acc[nt][e] * scale_log2 - lse2[i] : FG_NEG_INF;
        }
      }
      if (group >= 16) {
#pragma unroll
        for (int nt = 0; nt < kN / 8; ++nt) {
          acc[nt][0] = fmaxf(acc[nt][0], acc[nt][2]);
          acc[nt][1] = fmaxf(acc[nt][1], acc[nt][3]);
        }
      }
      // Lanes 4 apart hold the same columns of neighbouring rows g: combine within groups.
#pragma unroll
      for (int s = 1; s < 8; s <<= 1) {
        if (s < group) {
#pragma unroll
          for (int nt = 0; nt < kN / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e)
              acc[nt][e] = fmaxf(acc[nt][e], __shfl_xor_sync(0xffffffffu, acc[nt][e], 4 * s));
        }
      }
      if (group <= 16) {
        // One writer lane per group; for group <= 8 rows g and g + 8 are separate groups.
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          if (i == 1 && group == 16) break;
          const int r = r_lo + 8 * i;
          const int orow = r / group;
          if (r % group == 0 && orow < out_rows) {
#pragma unroll
            for (int nt = 0; nt < kN / 8; ++nt) {
              const int key = tile_key + nt * 8 + tig * 2;
              if (key < key_end) {
                u16* dst = out16 + (static_cast<i64>(z) * out_rows + orow) * out_ld + key;
                const float p0 = fast_exp2(acc[nt][2 * i]);
                if (key + 1 < key_end) {  // key is even: chunks and tiles start at multiples of 64
                  *reinterpret_cast<u32*>(dst) = bf16_t::pack_truncated(p0, fast_exp2(acc[nt][2 * i + 1]));
                } else {
                  dst[0] = bf16_t::truncate(p0);
                }
              }
            }
          }
        }
      } else {
        // Groups span warps: each warp leaves its 16-row max in shared memory.
        if (g == 0) {
#pragma unroll
          for (int nt = 0; nt < kN / 8; ++nt) {
            sRed[warp * kN + nt * 8 + tig * 2] = acc[nt][0];
            sRed[warp * kN + nt * 8 + tig * 2 + 1] = acc[nt][1];
          }
        }
        __syncthreads();
        const int warps_per_group = group / 16;
        const int groups_here = WARPS / warps_per_group;
        for (int idx = tid; idx < groups_here * kN; idx += S::kThreads) {
          const int gi = idx / kN;
          const int col = idx - gi * kN;
          float m = FG_NEG_INF;
          for (int w = gi * warps_per_group; w < (gi + 1) * warps_per_group; ++w) m = fmaxf(m, sRed[w * kN + col]);
          m = fast_exp2(m);
          const int orow = row0 / group + gi;
          const int key = tile_key + col;
          if (orow < out_rows && key < key_end) {
            // Band mode refines rows already scored: each (row, key) belongs to one CTA.
            u16* dst = out16 + (static_cast<i64>(z) * out_rows + orow) * out_ld + key;
            *dst = bf16_t::truncate(band ? fmaxf(bf16_t::to_float(*dst), m) : m);
          }
        }
      }
    }
    __syncthreads();  // the stage (and sRed) are refilled by the next iteration
  }
  cp_async_wait<0>();

  if (kLogits || MODE == kMode_stats) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      if (MODE == kMode_stats) quad_merge_lse2(run_m[i], run_l[i], run_sq[i]);
      else quad_merge_lse2(run_m[i], run_l[i]);
      const int r = r_lo + 8 * i;
      if (tig == 0 && r < n_rows) {
        const i64 at = (static_cast<i64>(z) * n_rows + r) * gridDim.x + blockIdx.x;
        partial[at] = row_lse2(run_m[i], run_l[i]) * FG_LN2;
        if (MODE == kMode_stats && partial_sq) partial_sq[at] = row_lse2_twice(run_m[i], run_sq[i]) * FG_LN2;
      }
    }
  }
}

}  // namespace fg
