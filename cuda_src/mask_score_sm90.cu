// Mask-scoring kernels on Hopper tensor cores (wgmma, sm_90a): the "stats" and "maxprob" modes
// of mask_score.cu, same parameters and outputs, at wgmma rates.
//
// A CTA (two warpgroups) keeps 128 rows in shared memory and walks its key chunk in tiles of
// 128 keys (cp.async into two 128-byte-swizzled stages; in maxprob mode each warpgroup copies
// and waits for only its own 64 keys, so the two run apart). Both modes multiply the same two tiles;
// they differ in which one is the wgmma's A operand, so that each mode's reduction stays
// inside a thread and its quad:
//   stats (rows are A, 64 per warpgroup; keys are N): each row's log-sum-exp over the chunk,
//     written to partial[z, row, chunk], and where partial_sq is set that of twice the logits
//     to partial_sq[z, row, chunk], as mask_score.cu's mode 1 (each row's skipped keys,
//     score_range.cuh, left out);
//   maxprob (keys are A, 64 per warpgroup; rows are N): p = exp2(logit * log2e - lse2[row])
//     and its max over each group of GROUP consecutive rows (a power of two, 2..128, a
//     template argument: with a runtime group the epilogue's index arithmetic and branches
//     outnumbered its math), written to out[z, row / GROUP, key] as bfloat16 rounded toward
//     zero (integer instructions: a conversion per score cost 8 % of the pass), as mode 2. A
//     column max needs no exponential per element: the max is taken on the exponent and one
//     exp2 per stored score follows.
// Band (band_width > 0; maxprob only with GROUP = 128): each row tile is one query block and
// takes the keys [row0 + band_lo, + band_width); maxprob raises the stored scores.
//   band mode (MODE 4, GROUP 128, one key chunk): the exact band of the default predictor in one
//     launch: a stats pass over the band gives each query its band LSE, joined
//     (log-add) with the LSE lse[z, row / group] of the pooled sub-block holding it; a
//     max-probability pass over the band with that LSE then raises out, as the stats and
//     maxprob launches with a log-add between them did, with the rows read once.
//   listmax (MODE 5, GROUP 128): maxprob over each query block's own list of keys instead of a key
//     range (list_indices[list_indptr[bh, block] ...], a SliceMask's CSR with out_rows blocks a
//     head; key chunks are chunks of list positions): the listed keys' rows are gathered row by
//     row (their indices read a tile ahead) and each listed key's exact max probability is
//     stored at out[z, block, key]; other keys are left as they are, and so are listed keys
//     outside [0, kv_len) (a corrupt list reads and writes nothing out of bounds).
// e4m3 (maxprob only, T = e4m3_t): rows and keys are float8 e4m3, each head's multiplied by a
// power of two that keeps each row's sum of squares within kE4m3RowSumsq (fgcupy.e4m3), so its
// largest magnitude within 448; head_scale[bh] (float32, one per head) multiplies scale_log2
// back. The tiles are laid out as D / 2 u16 columns (StoreCols) and multiplied by k32 steps,
// each 32 bytes of a row as the 16-bit types' k16: twice the products per instruction. With groups of 16 rows or more the products go to float16
// accumulators (every partial sum of a logit's fits: within (1 + 2^-4)^2 x kE4m3RowSumsq < 65,504
// by Cauchy-Schwarz, the factor e4m3's rounding of the elements) and the epilogue works on f16x2
// pairs, one fma and one max per two scores where float32 takes two of each (the epilogue, not
// the tensor cores, set the float32 pass's time); float16 keeps 11 bits, below e4m3's own
// rounding of the products. A CTA whose rows' LSE or head's scale float16 would not hold well
// (any beyond 2^14, or a scale below 2^-14, float16's subnormals) runs its epilogue in float32,
// on the same float16 sums.
// Grid: (row tiles, key chunks, heads), row tiles fastest, so CTAs that run together read the
// same keys from L2. Two CTAs per SM: one's reductions overlap the other's products (256 rows
// per CTA, one CTA per SM and two products in flight per warpgroup measured slower).
#include "common.cuh"
#include "score_range.cuh"
#include "sync_sm90.cuh"
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

constexpr int log2_pow2(int x) { return x <= 1 ? 0 : 1 + log2_pow2(x / 2); }

template <class T, int D, int MODE, int GROUP>
__global__ void __launch_bounds__(256, 2)
mask_score_sm90(const __grid_constant__ ScoreParams p) {
  constexpr int kD = StoreCols<T, D>::value;  // u16 columns of a row (e4m3: D / 2)
  using S = Sm90ScoreShape<kD>;
  constexpr int kN = S::kKeys;
  constexpr float kLog2e = 1.4426950408889634f;
  static_assert(MODE == kMode_stats || MODE == kMode_maxprob || MODE == kMode_band || MODE == kMode_listmax,
                "stats, maxprob, band, listmax");
  constexpr bool kList = MODE == kMode_listmax;
  constexpr bool kMaxProb = MODE == kMode_maxprob || kList;
  static_assert(MODE == kMode_stats  ? GROUP == 1
                : MODE == kMode_band || kList ? GROUP == S::kRows
                                     : GROUP >= 2 && GROUP <= S::kRows && (GROUP & (GROUP - 1)) == 0,
                "maxprob groups are powers of two from 2 to 128 rows; stats takes GROUP 1, band 128");
  constexpr bool kE4m3 = IsE4m3<T>::value;
  static_assert(!kE4m3 || MODE == kMode_maxprob, "e4m3 rows and keys: the max-probability pass only");
  constexpr bool kF16 = kE4m3 && GROUP >= 16;  // float16 accumulators where a CTA allows (f16_cta)
  static_assert(!kF16 || kE4m3RowSumsq * 289.0 / 256.0 < 65504.0, "every logit's partial sums must fit float16");
  constexpr float kF16Limit = 16384.f;  // rows' LSE (log2) and logit scales float16 runs with
  constexpr float kF16Smallest = 1.f / 16384.f;  // float16's smallest normal: the least scale it runs with
  constexpr int kPasses = MODE == kMode_band ? 2 : 1;  // band: stats, then maxprob
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  unsigned char* smem_base = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);
  u16* sR = reinterpret_cast<u16*>(smem_base);
  u16* sK = sR + S::kRows * kD;
  float* sLse2 = reinterpret_cast<float*>(sK + 2 * S::kTileElems);  // maxprob: lse2 of each row
  const u32 sR_u32 = smem_u32(sR);
  const u32 sK_u32 = smem_u32(sK);

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int wg = warpgroup_index();
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
  const int* __restrict__ list = static_cast<const int*>(p.list_indices);
  // Keys of this CTA (list mode: positions in its block's list, called keys from here on).
  const int2 range = score_key_range(p, kList, bh, row0, blockIdx.x);
  const int range_begin = range.x;
  const int range_end = range.y;
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
  // Key tiles. In maxprob mode each warpgroup's A operand is its own 64 keys of the tile, so
  // each warpgroup copies just those and waits on its own named barrier: the two run apart, one's
  // epilogue beside the other's product. Where both read every key (stats, band), all threads
  // copy the tile and meet at __syncthreads.
  // A loader copies chunk l_chunk of rows l_row + j * kLoadPass. Its source and destination
  // advance by fixed steps (the rows' swizzle repeats every 8), so a tile's addresses are
  // additions, not a 64-bit multiply per row; only a chunk's last, partial tile tests rows
  // against key_end (those past it are zero-filled from a valid address).
  constexpr bool kOwnKeys = kMaxProb;
  constexpr int kLoaders = kOwnKeys ? 128 : S::kThreads;
  constexpr int kLoadRows = kOwnKeys ? 64 : kN;
  constexpr int kLoadPass = kLoaders / S::kChunksPerRow;
  static_assert(kLoadPass % 8 == 0 && kLoadRows % kLoadPass == 0, "a pass of rows keeps each row's swizzle phase");
  const int l_tid = kOwnKeys ? tid & 127 : tid;
  const int l_chunk = l_tid % S::kChunksPerRow;
  const int l_row = (kOwnKeys ? wg * 64 : 0) + l_tid / S::kChunksPerRow;
  const u16* k_thread = k_base + static_cast<i64>(key_begin + l_row) * k_ss + l_chunk * 8;
  const i64 k_pass_step = static_cast<i64>(kLoadPass) * k_ss;
  const u32 k_dst = sK_u32 + 2 * sw128_offset<kN>(l_row, l_chunk);
  constexpr u32 kPassBytes = kLoadPass * 128;  // kLoadPass swizzled rows of one column half
  constexpr int kLoaderRows = kLoadRows / kLoadPass;
  int listed[kList ? kLoaderRows : 1];  // list mode: the key of each row this loader copies next
  auto read_list = [&](int t) {
#pragma unroll
    for (int j = 0; j < (kList ? kLoaderRows : 0); ++j) {
      const int pos = key_begin + t * kN + l_row + j * kLoadPass;
      const int key = pos < key_end ? list[pos] : -1;
      listed[j] = static_cast<unsigned>(key) < static_cast<unsigned>(p.kv_len) ? key : -1;  // bad keys: no row
    }
  };
  auto issue_tile = [&](int t, int stage) {
    const u16* src = k_thread + static_cast<i64>(t) * kN * k_ss;
    const u32 dst = k_dst + stage * S::kTileElems * 2;
    if (kList) {
      const u16* k_chunk = k_base + l_chunk * 8;
#pragma unroll
      for (int j = 0; j < (kList ? kLoaderRows : 0); ++j) {
        const bool valid = listed[j] >= 0;
        cp_async16(dst + j * kPassBytes, valid ? k_chunk + static_cast<i64>(listed[j]) * k_ss : k_base, valid);
      }
      read_list(t + 1);
    } else if (key_begin + (t + 1) * kN <= key_end) {
#pragma unroll
      for (int j = 0; j < kLoadRows / kLoadPass; ++j) cp_async16(dst + j * kPassBytes, src + j * k_pass_step, true);
    } else {
      const int rows_left = key_end - (key_begin + t * kN + l_row);
#pragma unroll
      for (int j = 0; j < kLoadRows / kLoadPass; ++j) {
        const bool valid = j * kLoadPass < rows_left;
        cp_async16(dst + j * kPassBytes, valid ? src + j * k_pass_step : k_base, valid);
      }
    }
  };
  // The first tile's wait also covers the resident rows and their lse, which every thread
  // copied or wrote: all threads meet there.
  auto tile_sync = [&](bool first) {
    if (kOwnKeys && !first) {
      if (wg == 0) named_sync(1, 128);  // constant ids: ptxas reserves only the barriers named
      else named_sync(2, 128);
    } else {
      __syncthreads();
    }
  };
  // e4m3: rows and keys were multiplied by powers of two (per head) to fit its range;
  // head_scale[bh] undoes both in the exponent's scale.
  const float scale_log2 = kE4m3 ? p.scale_log2 * static_cast<const float*>(p.head_scale)[bh] : p.scale_log2;
  // Each row's lse2 in sLse2: float32, or in float16 CTAs its negation as float16 (pairs of
  // rows read as one f16x2).
  bool f16_cta = false;
  if (kMaxProb) {
    // Rows without a finite lse (and rows past n_rows) get +inf: their p is exp2(-inf) = 0.
    float l2 = -FG_NEG_INF;
    if (tid < S::kRows) {
      const int r = row0 + tid;
      const float x = r < n_rows ? static_cast<const float*>(p.lse)[static_cast<i64>(z) * n_rows + r] : FG_NEG_INF;
      l2 = x > FG_NEG_INF && x < -FG_NEG_INF ? x * kLog2e : -FG_NEG_INF;
    }
    if constexpr (kF16) {
      const bool fits = !__syncthreads_or(l2 < -FG_NEG_INF && fabsf(l2) >= kF16Limit) && scale_log2 < kF16Limit &&
                        scale_log2 >= kF16Smallest;
      f16_cta = __shfl_sync(0xffffffffu, fits, 0);  // from lane 0: warp-uniform to the compiler too
    }
    if (tid < S::kRows) {
      if (f16_cta) reinterpret_cast<u16*>(sLse2)[tid] = static_cast<u16>(fp16_t::pack(-l2, 0.f));
      else sLse2[tid] = l2;
    }
  }
  const u32 scale2 = fp16_t::pack(scale_log2, scale_log2);  // float16 CTAs' scale, both lanes
  // Stats: this thread's rows wg*64 + (warp%4)*16 + g and + 8; running max (log2) and sum.
  float run_m[2] = {FG_NEG_INF, FG_NEG_INF};
  float run_l[2] = {0.f, 0.f};
  float run_sq[2] = {0.f, 0.f};  // stats (not band): the sum of the terms' squares
  const int out_rows = p.out_rows;
  const i64 out_ld = p.out_ld;
  u16* __restrict__ out = static_cast<u16*>(p.out);  // bfloat16 scores
  // A: 64 rows (stats) or 64 keys (maxprob) of its tile, per warpgroup.
  const u32 a_wg = wg * 64 * 128;
  const int thread_row = wg * 64 + (warp & 3) * 16 + g;  // first of this thread's two A rows
  // Stats: the keys this thread's two rows skip (one block's: a warp's 16 rows share it).
  const int2 skip = MODE == kMode_stats ? skipped_keys(p, row0 + thread_row) : make_int2(0, 0);
  // Maxprob: this thread's first output row (of its column tile 0) and its store pointer, keys
  // added per tile.
  constexpr int kGroupShift = log2_pow2(GROUP);
  const int orow0 = (row0 + tig * 2) >> kGroupShift;
  u16* out_thread = out + (static_cast<i64>(z) * out_rows + orow0) * out_ld + thread_row;

#pragma unroll
  for (int pass = 0; pass < kPasses; ++pass) {
    const bool stats_pass = MODE == kMode_stats || (MODE == kMode_band && pass == 0);
    if (kList) read_list(0);
    if (ntiles > 0) issue_tile(0, 0);
    cp_async_commit();
    for (int t = 0; t < ntiles; ++t) {
      if (t + 1 < ntiles) issue_tile(t + 1, (t + 1) & 1);
      cp_async_commit();
      cp_async_wait<1>();
      fence_proxy_async();
      tile_sync(t == 0);
      const u32 k_stage = sK_u32 + (t & 1) * S::kTileElems * 2;
      const int tile_key = key_begin + t * kN;
      // List mode: the keys of this thread's two A rows, read before the product hides the load.
      int row_key[2] = {-1, -1};
      if (kList) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const int pos = tile_key + thread_row + 8 * i;
          row_key[i] = pos < key_end ? list[pos] : -1;
        }
      }

      float acc[kN / 2];
      u32 acc16[kN / 4];  // kF16: acc16[nt * 2 + i] holds what acc[nt * 4 + 2 * i] and + 1 would
      if constexpr (kF16) {
        wgmma_fence();
        wgmma_ss_tile_e4m3_f16acc<kD>(acc16, k_stage + a_wg, kN, sR_u32, S::kRows);
        wgmma_commit();
        wgmma_wait<0>();
        wgmma_fence_operand(acc16);
      } else {
        wgmma_fence();
        if (stats_pass) wgmma_ss_tile<T, kD, kN>(acc, sR_u32 + a_wg, S::kRows, k_stage, kN);
        else wgmma_ss_tile<T, kD, S::kRows>(acc, k_stage + a_wg, kN, sR_u32, S::kRows);
        wgmma_commit();
        wgmma_wait<0>();
        wgmma_fence_operand(acc);
      }

      if (stats_pass) {
        // acc[nt * 4 + e]: row thread_row + 8 * (e >> 1), key tile_key + nt * 8 + tig * 2 + (e & 1).
        // Keys past the chunk (its last tile only) become -inf. The max is taken on the raw
        // products (the scale is positive) and the scale folds into each exponent's FFMA.
        if (tile_key + kN > key_end || (tile_key < skip.y && tile_key + kN > skip.x)) {
#pragma unroll
          for (int nt = 0; nt < kN / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int col = tile_key + nt * 8 + tig * 2 + (e & 1);
              if (col >= key_end || (col >= skip.x && col < skip.y)) acc[nt * 4 + e] = FG_NEG_INF;
            }
        }
        float tile_m[2] = {FG_NEG_INF, FG_NEG_INF};
#pragma unroll
        for (int i = 0; i < kN / 2; ++i) tile_m[(i >> 1) & 1] = fmaxf(tile_m[(i >> 1) & 1], acc[i]);
        tile_m[0] *= scale_log2;
        tile_m[1] *= scale_log2;
        float base[2];
        if (MODE == kMode_stats) raise_running_max(run_m, run_l, run_sq, tile_m, base);
        else raise_running_max(run_m, run_l, tile_m, base);
        float part[2][2] = {{0.f, 0.f}, {0.f, 0.f}};  // two sums per row: shorter add chains
        float part_sq[2][2] = {{0.f, 0.f}, {0.f, 0.f}};
        // fmaxf with -inf turns a NaN product (a NaN query or key) into no mass, as the max ignores it.
#pragma unroll
        for (int i = 0; i < kN / 2; ++i) {
          const float term = fast_exp2(fmaxf(fmaf(acc[i], scale_log2, -base[(i >> 1) & 1]), FG_NEG_INF));
          part[(i >> 1) & 1][i & 1] += term;
          if (MODE == kMode_stats) part_sq[(i >> 1) & 1][i & 1] = fmaf(term, term, part_sq[(i >> 1) & 1][i & 1]);
        }
        run_l[0] += part[0][0] + part[0][1];
        run_l[1] += part[1][0] + part[1][1];
        run_sq[0] += part_sq[0][0] + part_sq[0][1];
        run_sq[1] += part_sq[1][0] + part_sq[1][1];
      } else {
        // acc[nt * 4 + e]: key tile_key + thread_row + 8 * (e >> 1), row row0 + nt * 8 + tig * 2 + (e & 1).
        // Column tile by column tile: the exponent's max over the thread's two rows of each key,
        // folded over the tiles of one group (groups of 16 or more rows span several), then over
        // the quad lanes the group spans; one exp2 and store per group and key.
        // Stores: one pointer stepped by a group's output rows, the key bound tested only on a
        // chunk's last tile, raised in place only where a band is possible (groups of a whole
        // row tile): with a row of stores per column tile, their address arithmetic and branches
        // would outnumber the math.
        constexpr int kTilesPerGroup = GROUP >= 16 ? GROUP / 8 : 1;
        constexpr int kLanes = GROUP >= 8 ? 4 : GROUP / 2;  // quad lanes one group spans
        constexpr int kRowsPerStep = GROUP >= 8 ? 1 : 8 / GROUP;  // output rows between two groups' stores
        const bool full_tile = tile_key + kN <= key_end;
        const bool key_in[2] = {full_tile || tile_key + thread_row < key_end,  // this thread's two keys
                                full_tile || tile_key + thread_row + 8 < key_end};
        const i64 step_ld = kRowsPerStep * out_ld;
        // The loop once per epilogue: a float16 CTA's has no test per column tile (one keeps
        // ptxas from fusing its maxima).
        auto column_tiles = [&](auto half) {
          constexpr bool kHalf = decltype(half)::value;
          u16* dst = kList ? out_thread - thread_row : out_thread + tile_key;
          float run[2];
          u32 run2[2];  // kHalf: the maxima of each key's two columns so far, f16x2
#pragma unroll
          for (int nt = 0; nt < S::kRows / 8; ++nt) {
            if constexpr (kHalf) {
              const u32 neg_l2 = reinterpret_cast<const u32*>(sLse2)[nt * 4 + tig];
#pragma unroll
              for (int i = 0; i < 2; ++i) {
                const u32 v = fp16_t::fma2(acc16[nt * 2 + i], scale2, neg_l2);
                run2[i] = nt % kTilesPerGroup == 0 ? v : fp16_t::max2(run2[i], v);
              }
            } else {
              const float2 l2 = *reinterpret_cast<const float2*>(sLse2 + nt * 8 + tig * 2);
#pragma unroll
              for (int i = 0; i < 2; ++i) {
                float s0, s1;
                if constexpr (kF16) {
                  s0 = fp16_t::to_float(static_cast<u16>(acc16[nt * 2 + i]));
                  s1 = fp16_t::to_float(static_cast<u16>(acc16[nt * 2 + i] >> 16));
                } else {
                  s0 = acc[nt * 4 + 2 * i];
                  s1 = acc[nt * 4 + 2 * i + 1];
                }
                const float v = fmaxf(s0 * scale_log2 - l2.x, s1 * scale_log2 - l2.y);
                run[i] = nt % kTilesPerGroup == 0 ? v : fmaxf(run[i], v);
              }
            }
            if (nt % kTilesPerGroup != kTilesPerGroup - 1) continue;
            if constexpr (kHalf) {
#pragma unroll
              for (int i = 0; i < 2; ++i) {
                run[i] = fmaxf(fp16_t::to_float(static_cast<u16>(run2[i])), fp16_t::to_float(static_cast<u16>(run2[i] >> 16)));
              }
            }
#pragma unroll
            for (int i = 0; i < 2; ++i) {
              if (kLanes >= 2) run[i] = fmaxf(run[i], __shfl_xor_sync(0xffffffffu, run[i], 1));
              if (kLanes >= 4) run[i] = fmaxf(run[i], __shfl_xor_sync(0xffffffffu, run[i], 2));
            }
            const int step = ((nt + 1 - kTilesPerGroup) * 8) >> kGroupShift;  // output rows past orow0
            if ((tig & (kLanes - 1)) == 0 && orow0 + step < out_rows) {
#pragma unroll
              for (int i = 0; i < 2; ++i) {
                if (key_in[i]) {
                  const float m = fast_exp2(run[i]);
                  if (kList) {
                    if (static_cast<unsigned>(row_key[i]) < static_cast<unsigned>(p.kv_len)) {
                      __stcs(dst + row_key[i], bf16_t::truncate(m));
                    }
                  } else if (GROUP == S::kRows && band) {
                    dst[8 * i] = bf16_t::truncate(fmaxf(bf16_t::to_float(dst[8 * i]), m));
                  } else {
                    __stcs(dst + 8 * i, bf16_t::truncate(m));  // streamed: keep L2 for the key tiles other CTAs read
                  }
                }
              }
            }
            dst += step_ld;
          }
        };
        if (kF16 && f16_cta) column_tiles(Flag<kF16>{});
        else column_tiles(Flag<false>{});
      }
      tile_sync(false);  // the stage is refilled by the next iteration
    }
    cp_async_wait<0>();

    if (stats_pass) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        if (MODE == kMode_stats) quad_merge_lse2(run_m[i], run_l[i], run_sq[i]);
        else quad_merge_lse2(run_m[i], run_l[i]);
        const int r = row0 + thread_row + 8 * i;
        const float lse2 = row_lse2(run_m[i], run_l[i]);
        if (MODE == kMode_stats && tig == 0 && r < n_rows) {
          const i64 at = (static_cast<i64>(z) * n_rows + r) * gridDim.y + chunk;
          static_cast<float*>(p.partial)[at] = lse2 * FG_LN2;
          if (p.partial_sq) static_cast<float*>(p.partial_sq)[at] = row_lse2_twice(run_m[i], run_sq[i]) * FG_LN2;
        }
        if (MODE == kMode_band && tig == 0) {
          // The row's band LSE log-added to its sub-block's (p.group queries a pooled row); rows
          // past n_rows, with no finite mass or with a +inf logit, get +inf (p = 0) as in maxprob mode.
          float total = -FG_NEG_INF;
          if (r < n_rows) {
            const int own_rows = (n_rows + p.group - 1) / p.group;
            const float x = static_cast<const float*>(p.lse)[static_cast<i64>(z) * own_rows + r / p.group];
            const float own2 = x > FG_NEG_INF && x < -FG_NEG_INF ? x * kLog2e : FG_NEG_INF;
            const float m = fmaxf(lse2, own2);
            if (m > FG_NEG_INF && m < -FG_NEG_INF) total = m + __log2f(fast_exp2(lse2 - m) + fast_exp2(own2 - m));
          }
          sLse2[thread_row + 8 * i] = total;
        }
      }
      if (MODE == kMode_band) __syncthreads();  // every row's LSE before the maxprob pass reads it
    }
  }
}

}  // namespace fg
