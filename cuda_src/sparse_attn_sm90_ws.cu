// Gather-load M x 1 slice-sparse attention, forward pass, Hopper (sm_90a), warp-specialised.
//
// Same contract as sparse_attn_sm90.cu; the CTA is split into roles so that loads, matrix
// products and softmax overlap:
// * warpgroup 0 (producer) gathers the kept K and V rows with 16-byte cp.async into STAGES
//   swizzled buffers; each buffer has a "full" mbarrier (its copies landed, counted per thread
//   with cp.async.mbarrier.arrive) and an "empty" one (the consumers are done with it). K of
//   tile n + 1 is issued before V of tile n, the order the consumers need them in. A key tile
//   that is one contiguous run of N keys (dense rows, windows, sinks, text tokens) is instead
//   loaded by the tensor-memory accelerator, one box per 64 columns, when the host encoded
//   tensor maps (p.tma): every producer thread checks its rows' indices and a barrier ANDs the
//   votes, so a list that is not exactly that run (corrupt ones included) is gathered.
// * warpgroups 1..M/64 (consumers) each own 64 query rows. Per key tile n a consumer issues
//   S_n = Q K_n^T and then O += P_{n-1} V_{n-1}; the softmax of S_n runs while the second
//   product is still on the tensor cores. With two consumers and PINGPONG, named barriers hand
//   the tensor cores from one to the other, so one's softmax overlaps the other's products.
#include "attn_common.cuh"
#include "sync_sm90.cuh"
#include "wgmma.cuh"

namespace fg {

template <int HD, int M, int N, int STAGES>
struct Sm90WsShape {
  // Tiles are D = HD rounded up to 64 columns wide (the swizzle atom); the columns past HD are
  // zero-filled, so the products run at width D and the output columns past HD are not stored.
  static constexpr int D = (HD + 63) / 64 * 64;
  static constexpr int kConsumers = M / 64;
  static constexpr int kThreads = (kConsumers + 1) * 128;
  static constexpr int kChunksPerRow = D / 8;
  static constexpr int kRowsPerPass = 128 / kChunksPerRow;  // Q/O rows one warpgroup copies at once
  static constexpr int kTileElems = N * D;
  static constexpr int kTileBytes = kTileElems * 2;
  // The producer's gather: 8 threads per row, each copying its 16-byte chunk of every 64-column
  // half (one index shuffle and one address per row and thread, D / 64 copies from it).
  static constexpr int kHalves = D / 64;
  static constexpr int kGatherRowsPerPass = 16;
  static constexpr int kGatherPasses = N / kGatherRowsPerPass;
  static constexpr int kGatherWarpRows = 4;  // rows of one warp in one pass
  // The producer warpgroup's warps; each writes one "unmasked" flag word per stage.
  static constexpr int kProducerWarps = 4;
  // Register split of three warpgroups (setmaxnreg; 384 threads launch with 168 each). The
  // consumers need 192 (ptxas spills below); the producer's gather is bound by how many
  // copies it keeps in flight, so it keeps the rest (fewer measured slower: notes/PERF.md).
  // D = 256 holds 128 output accumulators per consumer thread: the consumers take 232 and the
  // producer what is left. One consumer has 255 without any of this.
  static constexpr int kProducerRegs = D > 128 ? 40 : 120;
  static constexpr int kConsumerRegs = D > 128 ? 232 : 192;
  static_assert(M == 64 || M == 128, "one or two consumer warpgroups");
  static_assert(HD % 32 == 0 && (N == 64 || N == 128), "head dim multiple of 32, N 64 or 128");
  static_assert(D <= 128 || N == 64, "D = 256 leaves registers for 64-key score tiles only");
  static_assert(N / 4 <= 32 && N % 16 == 0, "each producer lane holds one key index of its warp's rows");
  static_assert(STAGES >= 2, "K of tile n + 1 is loaded while V of tile n is");
};

// Named barrier ids: 0 is __syncthreads; 1 + c: consumer c alone; 3 + c: consumer c's turn on
// the tensor cores.
constexpr int kBarConsumer0 = 1;
constexpr int kBarTurn0 = 3;
constexpr int kBarProducer = 5;

template <class T, int HD, int M, int N, int STAGES, int PINGPONG>
__global__ void __launch_bounds__(Sm90WsShape<HD, M, N, STAGES>::kThreads, 1)
sparse_attn_fwd_sm90_ws(const __grid_constant__ AttnParams p) {
  FG_UNPACK_ATTN_PARAMS(p);
  using S = Sm90WsShape<HD, M, N, STAGES>;
  constexpr int D = S::D;
  constexpr bool kPingPong = PINGPONG && S::kConsumers == 2;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  unsigned char* smem_base = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);
  const u32 sQ_u32 = smem_u32(smem_base);
  const u32 sK_u32 = sQ_u32 + M * D * 2;
  const u32 sV_u32 = sK_u32 + STAGES * S::kTileBytes;
  const u32 sBias_u32 = sV_u32 + STAGES * S::kTileBytes;
  const u32 bar_u32 = sBias_u32 + STAGES * N * 4;  // full K, full V, empty K, empty V
  // Per stage, one word per producer warp: nonzero when none of its rows is masked (the whole
  // tile unmasked lets the consumers skip the biases; written and released like them). The
  // consumers read the stage's words at once (ld_shared_all4: four words).
  static_assert(S::kProducerWarps == 4, "ld_shared_all4 reads one flag word per producer warp");
  const u32 unmasked_u32 = bar_u32 + 4 * STAGES * 8;
  auto full_k = [&](int s) { return bar_u32 + 8 * s; };
  auto full_v = [&](int s) { return bar_u32 + 8 * (STAGES + s); };
  auto empty_k = [&](int s) { return bar_u32 + 8 * (2 * STAGES + s); };
  auto empty_v = [&](int s) { return bar_u32 + 8 * (3 * STAGES + s); };

  const int tid = threadIdx.x;
  const int wg = warpgroup_index();
  const int lane = tid & 31;
  if (tid == 0) {
#pragma unroll
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(full_k(s), 2 * 128);  // per producer thread: its copies, then its bias write
      mbar_init(full_v(s), 128);
      mbar_init(empty_k(s), S::kConsumers * 128);
      mbar_init(empty_v(s), S::kConsumers * 128);
    }
  }
  __syncthreads();

  const WorkItem w = work_item(order, indptr, heads, q_blocks, capacity);
  const int b = w.b, h = w.h, bh = w.bh, qb = w.qb, start = w.start, end = w.end;
  const int ntiles = (end - start + N - 1) / N;

  if (wg == 0) {
    // ---------------- producer ----------------
    if constexpr (S::kConsumers == 2) regs_release<S::kProducerRegs>();
    const int warp = tid >> 5;
    const int chunk = lane % 8;
    const int sub = lane / 8;  // row within the warp's rows of a pass
    // Lane l holds the key index of the warp's row (l % 4) + 16 * (l / 4) (N / 4 rows per warp).
    const int my_pos = warp * S::kGatherWarpRows + (lane % S::kGatherWarpRows) +
                       S::kGatherRowsPerPass * (lane / S::kGatherWarpRows);
    const u16* k_base = k + b * k_sb + h * k_sh;
    const u16* v_base = v + b * v_sb + h * v_sh;
    auto tile_index = [&](int n) {
      const int pos = start + n * N + my_pos;
      int idx = -1;
      if (lane < N / 4 && pos < end) idx = __ldg(indices + pos);
      return static_cast<unsigned>(idx) < static_cast<unsigned>(kv_len) ? idx : -1;
    };
    // Copy chunk `chunk` of each half of this warp's rows of one tile; the index of pass j's
    // row sits in lane sub + 4 * j.
    auto gather = [&](u32 tile, const u16* base, i64 row_stride, int idx) {
#pragma unroll
      for (int j = 0; j < S::kGatherPasses; ++j) {
        const int row_idx = __shfl_sync(0xffffffffu, idx, sub + S::kGatherWarpRows * j);
        const int r = warp * S::kGatherWarpRows + sub + S::kGatherRowsPerPass * j;
        const bool valid = row_idx >= 0;
        const u16* src = base + (valid ? row_idx : 0) * row_stride + chunk * 8;
        const u32 dst = tile + 2 * sw128_offset<N>(r, chunk);
#pragma unroll
        for (int half = 0; half < S::kHalves; ++half) {
          cp_async16(dst + half * N * 128, src + half * 64, valid && (HD == D || half * 64 + chunk * 8 < HD));
        }
      }
    };
    // The first key of tile n if its N keys are the run first, first + 1, ..., else -1. The
    // first and last keys decide alone whether the vote runs (the same for every producer
    // thread); the vote checks every row.
    auto tile_run = [&](int n, int idx) {
      const int first = start + n * N;
      if (!p.tma || first + N > end) return -1;
      const int key0 = __ldg(indices + first);
      if (__ldg(indices + first + N - 1) - key0 != N - 1 || key0 < 0 || key0 > kv_len - N) return -1;
      return named_all(kBarProducer, 128, lane >= N / 4 || idx == key0 + my_pos) ? key0 : -1;
    };
    // Tile `tile` from rows run, run + 1, ... of one tensor map; thread 0 sets the byte count
    // and issues the boxes, the others arrive as after a gather.
    auto load_run = [&](u32 tile, const void* map, int run, u32 bar) {
      if (tid == 0) {
        mbar_arrive_expect_tx(bar, S::kTileBytes);
#pragma unroll
        for (int half = 0; half < S::kHalves; ++half) tma_load_4d(tile + half * N * 128, map, half * 64, run, h, b, bar);
      } else {
        mbar_arrive(bar);
      }
    };
    auto load_k = [&](int n, int idx, int run) {
      const int s = n % STAGES;
      if (n >= STAGES) mbar_wait(empty_k(s), ((n / STAGES) - 1) & 1);
      if (lane < N / 4) st_shared_f32(sBias_u32 + 4 * (s * N + my_pos), idx >= 0 ? 0.f : FG_NEG_INF);
      const unsigned warp_unmasked = __all_sync(0xffffffffu, lane >= N / 4 || idx >= 0);
      if (lane == 0) st_shared_u32(unmasked_u32 + 4 * (s * S::kProducerWarps + warp), warp_unmasked);
      mbar_arrive(full_k(s));
      if (run >= 0) {
        load_run(sK_u32 + s * S::kTileBytes, &p.k_map, run, full_k(s));
      } else {
        gather(sK_u32 + s * S::kTileBytes, k_base, k_ss, idx);
        mbar_arrive_cp_async(full_k(s));
      }
    };
    auto load_v = [&](int n, int idx, int run) {
      const int s = n % STAGES;
      if (n >= STAGES) mbar_wait(empty_v(s), ((n / STAGES) - 1) & 1);
      if (run >= 0) {
        load_run(sV_u32 + s * S::kTileBytes, &p.v_map, run, full_v(s));
      } else {
        gather(sV_u32 + s * S::kTileBytes, v_base, v_ss, idx);
        mbar_arrive_cp_async(full_v(s));
      }
    };
    if (ntiles > 0) {
      int idx = tile_index(0);
      int run = tile_run(0, idx);
      load_k(0, idx, run);
      for (int n = 0; n < ntiles; ++n) {
        int idx_next = -1, run_next = -1;
        if (n + 1 < ntiles) {
          idx_next = tile_index(n + 1);
          run_next = tile_run(n + 1, idx_next);
          load_k(n + 1, idx_next, run_next);
        }
        load_v(n, idx, run);
        idx = idx_next;
        run = run_next;
      }
    }
    cp_async_wait_all();
    return;
  }

  // ---------------- consumers ----------------
  if constexpr (S::kConsumers == 2) regs_claim<S::kConsumerRegs>();
  const int c = wg - 1;
  const int ctid = tid - 128 * wg;
  const int warp = ctid >> 5;  // warp within the consumer warpgroup: rows warp * 16 + (0..15)
  const int q_row0 = qb * M + c * 64;
  auto q_offset = [c](int r, int ch) { return sw128_offset<M>(c * 64 + r, ch); };
  {
    const u16* q_base = q + b * q_sb + h * q_sh;
    load_q_tile<64, S::kRowsPerPass>(sQ_u32, q_base, q_ss, ctid / S::kChunksPerRow, ctid % S::kChunksPerRow,
                                     q_row0, q_len, q_offset, HD == D || ctid % S::kChunksPerRow < HD / 8);
    cp_async_wait_all();
    fence_proxy_async();
    named_sync(kBarConsumer0 + c, 128);
  }
  auto turn_wait = [&]() {
    if constexpr (kPingPong) named_sync(kBarTurn0 + c, 256);
  };
  auto turn_pass = [&]() {
    if constexpr (kPingPong) named_arrive(kBarTurn0 + (1 - c), 256);
  };
  if constexpr (kPingPong) {
    if (c == 1) named_arrive(kBarTurn0, 256);  // consumer 0 goes first
  }

  float acc_o[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) acc_o[i] = 0.f;
  float row_max[2] = {FG_NEG_INF, FG_NEG_INF};
  float row_sum[2] = {0.f, 0.f};
  u32 p_frag[N / 16][4];
  const u32 q_half0 = sQ_u32 + c * 64 * 128;
  constexpr u32 kLbo = N * 128;  // V as an MN-major operand: next 64 columns
  constexpr u32 kSbo = 1024;     // next 8 keys
  auto issue_pv = [&](int s) {
    wgmma_fence();
#pragma unroll
    for (int j = 0; j < N / 16; ++j) {
      const u32 v_rows = sV_u32 + s * S::kTileBytes + j * 16 * 128;
      if constexpr (D == 64) {
        Wgmma<T>::template rs_n64<1>(acc_o, p_frag[j], smem_desc_sw128(v_rows, kLbo, kSbo), 1);
      } else {
        // 128 output columns (two 64-column halves of V) per product; D = 256 takes two.
#pragma unroll
        for (int cols = 0; cols < D / 128; ++cols) {
          const u64 db = smem_desc_sw128(v_rows + cols * 2 * kLbo, kLbo, kSbo);
          Wgmma<T>::template rs_n128<1>(*reinterpret_cast<float(*)[64]>(acc_o + cols * 64), p_frag[j], db, 1);
        }
      }
    }
    wgmma_commit();
  };
  auto issue_s = [&](float (&acc_s)[N / 2], int n) {
    const int s = n % STAGES;
    mbar_wait(full_k(s), (n / STAGES) & 1);
    fence_proxy_async();
    turn_wait();
    wgmma_fence();
    wgmma_ss_tile<T, D, N>(acc_s, q_half0, M, sK_u32 + s * S::kTileBytes, N);
    wgmma_commit();
  };
  // Softmax of S_n, release of K_n, then (after `wait_pv`) the rescale of O and P_n.
  auto softmax_and_pack = [&](float (&acc_s)[N / 2], int n, auto wait_pv) {
    const int s = n % STAGES;
    float alpha[2];
    if (ld_shared_all4(unmasked_u32 + 4 * S::kProducerWarps * s)) softmax_tile_unmasked<N>(acc_s, scale_log2, row_max, row_sum, alpha);
    else softmax_tile<N>(acc_s, sBias_u32 + 4 * (s * N + (lane & 3) * 2), scale_log2, row_max, row_sum, alpha);
    mbar_arrive(empty_k(s));
    wait_pv();
    rescale_rows<D>(acc_o, alpha);
#pragma unroll
    for (int j = 0; j < N / 16; ++j) pack_p<T>(p_frag[j], acc_s, j);
  };
  auto wait_v = [&](int n) {
    const int s = n % STAGES;
    mbar_wait(full_v(s), (n / STAGES) & 1);
    fence_proxy_async();
  };

  if (ntiles > 0) {
    float acc_s[N / 2];
    issue_s(acc_s, 0);
    turn_pass();
    wgmma_wait<0>();
    wgmma_fence_operand(acc_s);
    softmax_and_pack(acc_s, 0, []() {});
  }
  for (int n = 1; n < ntiles; ++n) {
    float acc_s[N / 2];
    issue_s(acc_s, n);
    wait_v(n - 1);
    issue_pv((n - 1) % STAGES);
    turn_pass();
    wgmma_wait<1>();
    wgmma_fence_operand(acc_s);
    softmax_and_pack(acc_s, n, [&]() {
      wgmma_wait<0>();
      wgmma_fence_operand(acc_o);
      mbar_arrive(empty_v((n - 1) % STAGES));
    });
  }
  // The last tile's P V (and one more turn, so both consumers take as many as they pass).
  turn_wait();
  if (ntiles > 0) {
    wait_v(ntiles - 1);
    issue_pv((ntiles - 1) % STAGES);
  }
  turn_pass();
  // Unconditional (a no-op with nothing committed): a wait under its own branch leaves ptxas a
  // path from the product to the epilogue's reads of acc_o, where it injects a wait (C7517).
  wgmma_wait<0>();
  wgmma_fence_operand(acc_o);
  if constexpr (kPingPong) {
    if (c == 0) named_sync(kBarTurn0, 256);  // consumer 1's last pass
  }

  // ---- epilogue: normalise, stage O over this warpgroup's Q rows, 16-byte stores ----
  const int g = lane >> 2;
  const int tig = lane & 3;
  float inv[2];
  finish_rows(row_sum, inv);
  const int r0 = warp * 16 + g, r1 = r0 + 8;
  u16* sQ = reinterpret_cast<u16*>(smem_base);
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) {
    *reinterpret_cast<u32*>(sQ + q_offset(r0, dt) + tig * 2) = T::pack(acc_o[dt * 4 + 0] * inv[0], acc_o[dt * 4 + 1] * inv[0]);
    *reinterpret_cast<u32*>(sQ + q_offset(r1, dt) + tig * 2) = T::pack(acc_o[dt * 4 + 2] * inv[1], acc_o[dt * 4 + 3] * inv[1]);
  }
  if (lse != nullptr && tig == 0) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int row = q_row0 + r0 + i * 8;
      if (row < q_len) lse[static_cast<i64>(bh) * q_len + row] = row_lse(row_max[i], row_sum[i]);
    }
  }
  named_sync(kBarConsumer0 + c, 128);
  if (HD == D || ctid % S::kChunksPerRow < HD / 8) {
    store_tile<64, S::kRowsPerPass>(o + b * o_sb + h * o_sh, o_ss, sQ, ctid / S::kChunksPerRow,
                                    ctid % S::kChunksPerRow, q_row0, q_len, q_offset);
  }
}

}  // namespace fg
