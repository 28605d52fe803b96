// Gather-load M x 1 slice-sparse attention, forward pass, Hopper (sm_90a) tensor cores.
//
// Same contract as sparse_attn.cu (one CTA per query block, key lists walked in tiles of N,
// K/V rows gathered with cp.async, online softmax, invalid entries masked), but the matrix
// products run on wgmma: each warpgroup (4 warps) owns 64 query rows; S = Q K^T reads Q and K
// straight from shared memory through descriptors, and O += P V takes P from registers.
// PV selects how V is read: 0 = per-warp mma.sync with ldmatrix.trans, 1 = wgmma with V as
// an MN-major operand (descriptor LBO = distance to the next 64 columns, SBO = to the next 8
// keys; the swapped convention was measured to give wrong results on an H100).
//
// Shared-memory tiles use the 128-byte-swizzle layout of wgmma.cuh (sw128_offset).
#include "attn_common.cuh"
#include "wgmma.cuh"

namespace fg {

template <int D, int M, int N, int STAGES>
struct Sm90Shape {
  static constexpr int kWarpgroups = M / 64;
  static constexpr int kThreads = kWarpgroups * 128;
  static constexpr int kChunksPerRow = D / 8;
  static constexpr int kRowsPerPass = kThreads / kChunksPerRow;
  static constexpr int kKvRowsPerThread = N / kRowsPerPass;
  static constexpr int kQRowsPerThread = M / kRowsPerPass;
  static constexpr int kTileElems = N * D;
  static constexpr int kSmemBytes = (M * D + 2 * STAGES * kTileElems) * 2 + STAGES * N * 4 + 1024;
  static_assert(M % 64 == 0 && D % 64 == 0 && N % 64 == 0, "M, D, N multiples of 64");
  static_assert(N % kRowsPerPass == 0 && M % kRowsPerPass == 0, "tile rows per pass");
};

template <class T, int D, int M, int N, int STAGES, int PV, int CTAS>
__global__ void __launch_bounds__(M / 64 * 128, CTAS)
sparse_attn_fwd_sm90(const __grid_constant__ AttnParams p) {
  FG_UNPACK_ATTN_PARAMS(p);
  using S = Sm90Shape<D, M, N, STAGES>;
  // Two CTAs per SM leave no registers to hold the next tile's key indices: load them when
  // the tile is issued and let the other CTA hide the latency.
  constexpr bool kPrefetchIndices = CTAS == 1;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  // Descriptors address the 128-byte swizzle by absolute shared address: align to 1024 B.
  unsigned char* smem_base = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);
  u16* sQ = reinterpret_cast<u16*>(smem_base);
  u16* sK = sQ + M * D;
  u16* sV = sK + STAGES * S::kTileElems;
  float* sBias = reinterpret_cast<float*>(sV + STAGES * S::kTileElems);
  // 32-bit shared-window addresses: half the registers of generic pointers.
  const u32 sQ_u32 = smem_u32(sQ);
  const u32 sK_u32 = smem_u32(sK);
  const u32 sV_u32 = smem_u32(sV);
  const u32 sBias_u32 = smem_u32(sBias);

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int wg = warp >> 2;

  const WorkItem w = work_item(order, indptr, heads, q_blocks, capacity);
  const int b = w.b, h = w.h, bh = w.bh, qb = w.qb, start = w.start, end = w.end;
  const int ntiles = (end - start + N - 1) / N;

  const u16* q_base = q + b * q_sb + h * q_sh;
  const u16* k_base = k + b * k_sb + h * k_sh;
  const u16* v_base = v + b * v_sb + h * v_sh;
  const int q_row0 = qb * M;
  const int my_chunk = tid % S::kChunksPerRow;
  const int my_row = tid / S::kChunksPerRow;

  load_q_tile<M, S::kRowsPerPass>(sQ_u32, q_base, q_ss, my_row, my_chunk, q_row0, q_len,
                                  [](int r, int c) { return sw128_offset<M>(r, c); });

  int kv_idx[S::kKvRowsPerThread];
  const int my_first = start + my_row;  // this thread's first position in the list
  const int count = end - my_first;     // positions left from there
  auto load_indices = [&](int tile) {
    load_key_indices<N, S::kKvRowsPerThread, S::kRowsPerPass>(kv_idx, indices, my_first, count, tile);
  };
  auto issue_tile = [&](int stage, int tile) {
    if constexpr (!kPrefetchIndices) load_indices(tile);
    gather_kv_tile<S::kKvRowsPerThread, S::kRowsPerPass, S::kTileElems, N>(
        sK_u32, sV_u32, sBias_u32, stage, kv_idx, my_row, my_chunk, kv_len, k_base, k_ss, v_base, v_ss,
        [](int r, int c) { return sw128_offset<N>(r, c); });
  };

  if constexpr (kPrefetchIndices) load_indices(0);
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < ntiles) {
      issue_tile(s, s);
      if constexpr (kPrefetchIndices) load_indices(s + 1);
    }
    cp_async_commit();
  }

  float acc_o[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) acc_o[i] = 0.f;
  float row_max[2] = {FG_NEG_INF, FG_NEG_INF};
  float row_sum[2] = {0.f, 0.f};

  const u32 q_half0 = sQ_u32 + wg * 64 * 128;
  const u32 k_half0 = sK_u32;
  const u32 v_half0 = sV_u32;
  // For the mma.sync PV path: ldmatrix.trans lane roles (see sparse_attn.cu).
  const int lm_r = lane & 7;
  const int lm_hi8 = (lane >> 3) & 1;
  const int lm_hi16 = lane >> 4;
  const u32 xor_a = static_cast<u32>(lm_r ^ lm_hi16) << 4;
  const u32 v_lane = v_half0 + (lm_hi8 * 8 + lm_r) * 128;

  for (int t = 0; t < ntiles; ++t) {
    const int t_next = t + STAGES - 1;
    if (t_next < ntiles) {
      issue_tile(t_next % STAGES, t_next);
      if constexpr (kPrefetchIndices) load_indices(t_next + 1);
    }
    cp_async_commit();
    cp_async_wait<STAGES - 1>();
    fence_proxy_async();
    __syncthreads();

    const int stage = t % STAGES;
    const u32 stage_bytes = stage * S::kTileElems * 2;

    // ---- S = Q K^T on the tensor cores (64 rows per warpgroup) ----
    float acc_s[N / 2];
    wgmma_fence();
    wgmma_ss_tile<T, D, N>(acc_s, q_half0, M, k_half0 + stage_bytes, N);
    wgmma_commit();
    wgmma_wait<0>();

    // ---- online softmax (base 2, scale folded in); rows g and g + 8 of this warp ----
    float alpha[2];
    softmax_tile<N>(acc_s, sBias_u32 + 4 * (stage * N + (lane & 3) * 2), scale_log2, row_max, row_sum, alpha);
    rescale_rows<D>(acc_o, alpha);

    // ---- O += P V ----
    if constexpr (PV == 0) {
#pragma unroll
      for (int j = 0; j < N / 16; ++j) {
        u32 a[4];
        pack_p<T>(a, acc_s, j);
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
          u32 bv[4];
          const u32 addr = v_lane + stage_bytes + (dp >> 2) * N * 128 + j * 16 * 128 +
                           ((static_cast<u32>((dp * 2) & 7) << 4) ^ xor_a);
          ldmatrix_x4_trans(bv, addr);
          T::mma(acc_o + (2 * dp) * 4, a, bv[0], bv[1]);
          T::mma(acc_o + (2 * dp + 1) * 4, a, bv[2], bv[3]);
        }
      }
    } else {
      constexpr u32 kLbo = N * 128;  // next 64 columns of V (the other column half)
      constexpr u32 kSbo = 1024;     // next 8 keys
      // All of P is packed before the first wgmma: registers written between wgmmas of one
      // group would make ptxas serialise them.
      u32 a[N / 16][4];
#pragma unroll
      for (int j = 0; j < N / 16; ++j) pack_p<T>(a[j], acc_s, j);
      wgmma_fence();
#pragma unroll
      for (int j = 0; j < N / 16; ++j) {
        const u64 db = smem_desc_sw128(v_half0 + stage_bytes + j * 16 * 128, kLbo, kSbo);
        if constexpr (D == 64) Wgmma<T>::template rs_n64<1>(acc_o, a[j], db, 1);
        else Wgmma<T>::template rs_n128<1>(acc_o, a[j], db, 1);
      }
      wgmma_commit();
      wgmma_wait<0>();
    }
    __syncthreads();  // this stage is refilled by the next iteration
  }

  // ---- epilogue: normalise, stage O through shared memory, 16-byte coalesced stores ----
  cp_async_wait<0>();
  __syncthreads();
  const int g = lane >> 2;
  const int tig = lane & 3;
  float inv[2];
  finish_rows(row_sum, inv);
  const int r0 = warp * 16 + g, r1 = r0 + 8;
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) {
    *reinterpret_cast<u32*>(sQ + sw128_offset<M>(r0, dt) + tig * 2) =
        T::pack(acc_o[dt * 4 + 0] * inv[0], acc_o[dt * 4 + 1] * inv[0]);
    *reinterpret_cast<u32*>(sQ + sw128_offset<M>(r1, dt) + tig * 2) =
        T::pack(acc_o[dt * 4 + 2] * inv[1], acc_o[dt * 4 + 3] * inv[1]);
  }
  if (lse != nullptr && tig == 0) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int row = q_row0 + r0 + i * 8;
      if (row < q_len) lse[static_cast<i64>(bh) * q_len + row] = row_lse(row_max[i], row_sum[i]);
    }
  }
  __syncthreads();
  store_tile<M, S::kRowsPerPass>(o + b * o_sb + h * o_sh, o_ss, sQ, my_row, my_chunk, q_row0, q_len,
                                 [](int r, int c) { return sw128_offset<M>(r, c); });
}

}  // namespace fg
