// Warpgroup matrix multiply-accumulate (wgmma, sm_90a); the operand lists are generated.
//
// ss_nN: D(64 x N, fp32) (+)= A(64 x K) * B(K x N), A and B read from shared memory through
// matrix descriptors (both K-major); K = 16 for the 16-bit types, 32 for e4m3 (32 bytes of a
// row either way). rs_nN: A comes from registers in the mma.m16n8k16 A-fragment layout (each
// warp of the warpgroup owns 16 rows); B from shared memory, with TRANS_B = 1 for an MN-major
// B. The accumulator layout per warp equals that of mma.m16n8 C fragments repeated over N/8
// column tiles. `accumulate` = 0 overwrites D.
#pragma once
#include "common.cuh"

namespace fg {

#define FG_WGMMA_OPS(PTX, K, SS_TRANS) \
  static __device__ __forceinline__ void ss_n64(float d[32], u64 desc_a, u64 desc_b, int accumulate) { \
    asm volatile( \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n" \
        "wgmma.mma_async.sync.aligned.m64n64k" K ".f32." PTX "." PTX " " \
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1" SS_TRANS ";\n}\n" \
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]) \
        : "l"(desc_a), "l"(desc_b), "r"(accumulate)); \
  } \
  template <int TRANS_B> static __device__ __forceinline__ void rs_n64(float d[32], const u32 a[4], u64 desc_b, int accumulate) { \
    asm volatile( \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n" \
        "wgmma.mma_async.sync.aligned.m64n64k" K ".f32." PTX "." PTX " " \
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n" \
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]) \
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate), "n"(TRANS_B)); \
  } \
  static __device__ __forceinline__ void ss_n128(float d[64], u64 desc_a, u64 desc_b, int accumulate) { \
    asm volatile( \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n" \
        "wgmma.mma_async.sync.aligned.m64n128k" K ".f32." PTX "." PTX " " \
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1" SS_TRANS ";\n}\n" \
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]) \
        : "l"(desc_a), "l"(desc_b), "r"(accumulate)); \
  } \
  template <int TRANS_B> static __device__ __forceinline__ void rs_n128(float d[64], const u32 a[4], u64 desc_b, int accumulate) { \
    asm volatile( \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n" \
        "wgmma.mma_async.sync.aligned.m64n128k" K ".f32." PTX "." PTX " " \
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, %70;\n}\n" \
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]) \
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate), "n"(TRANS_B)); \
  }

template <class T>
struct Wgmma;
template <>
struct Wgmma<bf16_t> {
  FG_WGMMA_OPS("bf16", "16", ", 0, 0")
};
template <>
struct Wgmma<fp16_t> {
  FG_WGMMA_OPS("f16", "16", ", 0, 0")
};
// k32 steps: 32 bytes of each row a step, as the 16-bit types' k16; both operands K-major, which
// e4m3 takes without transpose arguments (ss only: an e4m3 A from registers is another layout).
template <>
struct Wgmma<e4m3_t> {
  FG_WGMMA_OPS("e4m3", "32", "")
};
#undef FG_WGMMA_OPS

// This thread's warpgroup (threads 128 * i .. 128 * i + 127), broadcast from lane 0 so that the
// compiler knows it is warp-uniform: descriptors built from it stay in uniform registers
// instead of being moved there before every wgmma.
__device__ __forceinline__ int warpgroup_index() { return __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x) >> 7, 0); }

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Pin an accumulator's registers after a wgmma wait: reads of it may not move above the wait.
template <int N>
__device__ __forceinline__ void wgmma_fence_operand(float (&acc)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(acc[i])::"memory");
}
template <int N>
__device__ __forceinline__ void wgmma_fence_operand(u32 (&acc)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(acc[i])::"memory");
}
// Make this thread's generic-proxy writes to shared memory (cp.async, st.shared) visible to
// the async proxy that wgmma reads through; a barrier must follow.
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// Shared-memory matrix descriptor for a 128-byte-swizzled operand: start address, leading and
// stride byte offsets (all >> 4), swizzle mode 1 = 128B in bits 62-63.
__device__ __forceinline__ u64 smem_desc_sw128(u32 smem_addr, u32 lbo_bytes, u32 sbo_bytes) {
  return static_cast<u64>((smem_addr & 0x3FFFF) >> 4) | (static_cast<u64>(lbo_bytes >> 4) << 16) |
         (static_cast<u64>(sbo_bytes >> 4) << 32) | (1ull << 62);
}

// `desc` with its start address moved on by `bytes` (a multiple of 16; the sum stays below
// 256 KiB, as every shared address does): the address is the descriptor's low 14 bits (of the
// address >> 4), so one 32-bit add moves it, where
// building each descriptor afresh costs a mask, a shift and an or per wgmma.
__device__ __forceinline__ u64 desc_advance(u64 desc, u32 bytes) {
  return (desc & 0xFFFFFFFF00000000ull) | static_cast<u32>(static_cast<u32>(desc) + (bytes >> 4));
}

// The 128-byte-swizzle layout wgmma expects: a tile of R rows and D columns is stored as D/64
// column halves of [R][128 B]; 16-byte chunk c of row r lives at half c/8, line r, chunk
// (c % 8) ^ (r % 8). Every half starts on a 1024-byte boundary. Offset in elements.
template <int R>
__device__ __forceinline__ int sw128_offset(int row, int chunk) {
  return (chunk >> 3) * (R * 64) + row * 64 + (((chunk & 7) ^ (row & 7)) << 3);
}

// The k steps of A B^T over all D storage columns (u16; StoreCols): A is 64 rows of an a_rows-row
// sw128 tile starting at a_half0 (the row offset already added), B N rows of a b_rows-row sw128
// tile at b_half0; step(kk, desc_a, desc_b) issues step kk's wgmma.
template <int D, class Step>
__device__ __forceinline__ void wgmma_ss_steps(u32 a_half0, int a_rows, u32 b_half0, int b_rows, Step step) {
  const u64 da0 = smem_desc_sw128(a_half0, 16, 1024);
  const u64 db0 = smem_desc_sw128(b_half0, 16, 1024);
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    step(kk, desc_advance(da0, (kk / 4) * a_rows * 128 + (kk % 4) * 32),
         desc_advance(db0, (kk / 4) * b_rows * 128 + (kk % 4) * 32));
  }
}

// D(64 x N, float32) = A B^T (wgmma_ss_steps' operands).
template <class T, int D, int N>
__device__ __forceinline__ void wgmma_ss_tile(float (&acc)[N / 2], u32 a_half0, int a_rows, u32 b_half0, int b_rows) {
  wgmma_ss_steps<D>(a_half0, a_rows, b_half0, b_rows, [&](int kk, u64 da, u64 db) {
    if constexpr (N == 64) Wgmma<T>::ss_n64(acc, da, db, kk > 0);
    else Wgmma<T>::ss_n128(acc, da, db, kk > 0);
  });
}

// e4m3 products into float16 accumulators (m64n128k32.f16): 32 registers, each the f16x2 pair
// of adjacent columns that two consecutive registers of the float32 layout hold.
__device__ __forceinline__ void wgmma_e4m3_n128_f16acc(u32 d[32], u64 desc_a, u64 desc_b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.f16.e4m3.e4m3 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1;\n}\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]), "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]), "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]), "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31])
      : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}

// D(64 x 128, float16) = A B^T of e4m3 tiles (wgmma_ss_steps' operands).
template <int D>
__device__ __forceinline__ void wgmma_ss_tile_e4m3_f16acc(u32 (&acc)[32], u32 a_half0, int a_rows, u32 b_half0,
                                                          int b_rows) {
  wgmma_ss_steps<D>(a_half0, a_rows, b_half0, b_rows,
                    [&](int kk, u64 da, u64 db) { wgmma_e4m3_n128_f16acc(acc, da, db, kk > 0); });
}

}  // namespace fg
