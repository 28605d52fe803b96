// Gather-load M x 1 slice-sparse attention, forward pass.
//
// One CTA computes one query block (M queries) of one (batch, head). It walks that block's
// list of kept key positions in tiles of N keys, gathers the K and V rows of each tile with
// 16-byte cp.async copies into swizzled shared memory (STAGES tiles in flight), and runs a
// flash-style online softmax with mma.sync m16n8k16 (fp32 accumulate). Each warp owns
// MT x 16 query rows: with MT = 2 every K/V fragment read from shared memory feeds two mmas,
// which halves shared-memory traffic per flop at the price of registers. Invalid entries (tail of the last tile, or an index outside [0, kv_len)) are
// zero-filled and masked with -inf, so a corrupt mask never reads outside K or V.
#include "attn_common.cuh"

namespace fg {

template <int D, int M, int N, int STAGES, int MT>
struct SparseAttnShape {
  static constexpr int kWarps = M / (16 * MT);
  static constexpr int kThreads = kWarps * 32;
  // Rows in shared memory are DP wide (D rounded up to 64, the swizzle's span); the columns
  // past D are never loaded, read or stored.
  static constexpr int kDP = (D + 63) / 64 * 64;
  static constexpr int kChunksPerRow = kDP / 8;              // 16-byte chunks per row
  static constexpr int kRowsPerPass = kThreads / kChunksPerRow;
  static constexpr int kKvRowsPerThread = N / kRowsPerPass;
  static constexpr int kQRowsPerThread = M / kRowsPerPass;
  static constexpr int kTileElems = N * kDP;
  // Layout of dynamic shared memory: Q tile, then K stages, V stages, key bias stages.
  static constexpr int kSmemBytes = (M * kDP + 2 * STAGES * kTileElems) * 2 + STAGES * N * 4;
  static_assert(M % (16 * MT) == 0 && D % 32 == 0, "M multiple of 16 * MT, D multiple of 32");
  static_assert(N % 16 == 0, "key tile multiple of 16");
  static_assert(kThreads % kChunksPerRow == 0, "threads must cover whole rows");
  static_assert(N % kRowsPerPass == 0 && M % kRowsPerPass == 0, "tile rows per pass");
};

template <class T, int D, int M, int N, int STAGES, int MT>
__global__ void __launch_bounds__(M / (16 * MT) * 32, 1)
sparse_attn_fwd(const __grid_constant__ AttnParams p) {
  FG_UNPACK_ATTN_PARAMS(p);
  using S = SparseAttnShape<D, M, N, STAGES, MT>;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  u16* sQ = reinterpret_cast<u16*>(smem_raw);
  u16* sK = sQ + M * S::kDP;
  u16* sV = sK + STAGES * S::kTileElems;
  float* sBias = reinterpret_cast<float*>(sV + STAGES * S::kTileElems);

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;

  const WorkItem w = work_item(order, indptr, heads, q_blocks, capacity);
  const int b = w.b, h = w.h, bh = w.bh, qb = w.qb, start = w.start, end = w.end;
  const int ntiles = (end - start + N - 1) / N;
  const u32 sBias_u32 = smem_u32(sBias);

  const u16* q_base = q + b * q_sb + h * q_sh;
  const u16* k_base = k + b * k_sb + h * k_sh;
  const u16* v_base = v + b * v_sb + h * v_sh;
  const int q_row0 = qb * M;

  // Each thread copies one 16-byte column chunk of several rows (none past column D).
  const int my_chunk = tid % S::kChunksPerRow;
  const int my_row = tid / S::kChunksPerRow;
  const bool my_cols = my_chunk < D / 8;

  const auto tile_offset = [](int r, int c) { return swz<S::kDP>(r, c); };
  if (my_cols) load_q_tile<M, S::kRowsPerPass>(smem_u32(sQ), q_base, q_ss, my_row, my_chunk, q_row0, q_len, tile_offset);

  // Key indices are prefetched one tile ahead into registers, so the gather of a tile never
  // waits on the load of its own indices.
  int kv_idx[S::kKvRowsPerThread];
  const int my_first = start + my_row;  // this thread's first position in the list
  const int count = end - my_first;     // positions left from there
  auto load_indices = [&](int tile) {
    load_key_indices<N, S::kKvRowsPerThread, S::kRowsPerPass>(kv_idx, indices, my_first, count, tile);
  };
  const u32 sK_u32 = smem_u32(sK), sV_u32 = smem_u32(sV);
  auto issue_tile = [&](int stage) {
    gather_kv_tile<S::kKvRowsPerThread, S::kRowsPerPass, S::kTileElems, N>(
        sK_u32, sV_u32, sBias_u32, stage, kv_idx, my_row, my_chunk, kv_len, k_base, k_ss, v_base, v_ss, tile_offset,
        my_cols);
  };

  load_indices(0);
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < ntiles) {
      issue_tile(s);
      load_indices(s + 1);
    }
    cp_async_commit();
  }

  float acc_o[MT][D / 8][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int i = 0; i < D / 8; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_o[mt][i][e] = 0.f;
  float row_max[MT][2], row_sum[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    row_max[mt][0] = row_max[mt][1] = FG_NEG_INF;
    row_sum[mt][0] = row_sum[mt][1] = 0.f;
  }

  const int wrow = warp * 16 * MT;
  // ldmatrix row/chunk roles of this lane (see the fragment layouts of mma.m16n8k16): lane
  // l addresses row (l & 7) of 8x8 matrix (l >> 3). All tiles are swizzled by row & 7 = lm_r.
  constexpr int kRowBytes = S::kDP * 2;
  const int lm_r = lane & 7;
  const int lm_hi8 = (lane >> 3) & 1;  // second 8x8 matrix of a pair
  const int lm_hi16 = lane >> 4;       // second pair
  const u32 xor_a = static_cast<u32>(lm_r ^ lm_hi16) << 4;  // Q and V: odd chunk from lane >> 4
  const u32 xor_b = static_cast<u32>(lm_r ^ lm_hi8) << 4;   // K: odd chunk from bit 3 of lane
  const u32 q_lane = smem_u32(sQ) + (wrow + lm_hi8 * 8 + lm_r) * kRowBytes;
  const u32 k_lane = smem_u32(sK) + (lm_hi16 * 8 + lm_r) * kRowBytes;
  const u32 v_lane = smem_u32(sV) + (lm_hi8 * 8 + lm_r) * kRowBytes;

  for (int t = 0; t < ntiles; ++t) {
    const int t_next = t + STAGES - 1;
    if (t_next < ntiles) {
      issue_tile(t_next % STAGES);
      load_indices(t_next + 1);
    }
    cp_async_commit();
    cp_async_wait<STAGES - 1>();
    __syncthreads();

    const int stage = t % STAGES;
    const u32 k_stage = k_lane + stage * S::kTileElems * 2;
    const u32 v_stage = v_lane + stage * S::kTileElems * 2;

    // ---- S = Q K^T for this warp's MT x 16 rows x N keys ----
    float acc_s[MT][N / 8][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int i = 0; i < N / 8; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_s[mt][i][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      u32 a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
        ldmatrix_x4(a[mt], q_lane + mt * 16 * kRowBytes + swz_bytes(kk * 2, xor_a));
#pragma unroll
      for (int np = 0; np < N / 16; ++np) {
        u32 bk[4];
        ldmatrix_x4(bk, k_stage + np * 16 * kRowBytes + swz_bytes(kk * 2, xor_b));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          T::mma(acc_s[mt][2 * np], a[mt], bk[0], bk[1]);
          T::mma(acc_s[mt][2 * np + 1], a[mt], bk[2], bk[3]);
        }
      }
    }

    // ---- online softmax (base 2, scale folded in) ----
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      float alpha[2];
      softmax_tile<N>(&acc_s[mt][0][0], sBias_u32 + 4 * (stage * N + (lane & 3) * 2), scale_log2, row_max[mt], row_sum[mt], alpha);
      rescale_rows<D>(&acc_o[mt][0][0], alpha);
    }

    // ---- O += P V ----
#pragma unroll
    for (int j = 0; j < N / 16; ++j) {
      u32 a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) pack_p<T>(a[mt], &acc_s[mt][0][0], j);
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        u32 bv[4];
        ldmatrix_x4_trans(bv, v_stage + j * 16 * kRowBytes + swz_bytes(dp * 2, xor_a));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          T::mma(acc_o[mt][2 * dp], a[mt], bv[0], bv[1]);
          T::mma(acc_o[mt][2 * dp + 1], a[mt], bv[2], bv[3]);
        }
      }
    }
    __syncthreads();  // this stage is refilled by the next iteration
  }

  // ---- epilogue: normalise, stage O through shared memory, 16-byte coalesced stores ----
  cp_async_wait<0>();
  __syncthreads();
  const int g = lane >> 2;
  const int tig = lane & 3;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    float inv[2];
    finish_rows(row_sum[mt], inv);
    const int r0 = wrow + mt * 16 + g, r1 = r0 + 8;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      *reinterpret_cast<u32*>(sQ + swz<S::kDP>(r0, dt) + tig * 2) =
          T::pack(acc_o[mt][dt][0] * inv[0], acc_o[mt][dt][1] * inv[0]);
      *reinterpret_cast<u32*>(sQ + swz<S::kDP>(r1, dt) + tig * 2) =
          T::pack(acc_o[mt][dt][2] * inv[1], acc_o[mt][dt][3] * inv[1]);
    }
    if (lse != nullptr && tig == 0) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int row = q_row0 + r0 + i * 8;
        if (row < q_len) lse[static_cast<i64>(bh) * q_len + row] = row_lse(row_max[mt][i], row_sum[mt][i]);
      }
    }
  }
  __syncthreads();
  if (my_cols) {
    store_tile<M, S::kRowsPerPass>(o + b * o_sb + h * o_sh, o_ss, sQ, my_row, my_chunk, q_row0, q_len,
                                   [](int r, int c) { return swz<S::kDP>(r, c); });
  }
}

}  // namespace fg
