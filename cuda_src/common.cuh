// Shared device helpers for fgcupy kernels.
//
// Header-free on purpose: NVRTC compiles these without the CUDA toolkit headers, so a
// machine with only the NVRTC wheel can build every kernel. Types are raw 16-bit storage;
// conversions and tensor-core instructions are inline PTX.
#pragma once

namespace fg {

typedef unsigned int u32;
typedef unsigned short u16;
typedef long long i64;
typedef unsigned long long u64;

// A compile-time bool as a type, for a generic lambda instantiated once per value.
template <bool B>
struct Flag {
  static constexpr bool value = B;
};

#define FG_NEG_INF (__int_as_float(0xff800000))
#define FG_LN2 0.6931471805599453f

// ---- dtype traits ---------------------------------------------------------------------
struct bf16_t {
  // Pack two floats into one register of two bf16 (lo in the low half).
  static __device__ __forceinline__ u32 pack(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
  }
  static __device__ __forceinline__ float to_float(u16 x) {
    return __int_as_float(static_cast<unsigned>(x) << 16);
  }
  // Round toward zero (the high half of x's bits): integer instructions, no conversion unit.
  static __device__ __forceinline__ u16 truncate(float x) { return static_cast<u16>(__float_as_uint(x) >> 16); }
  static __device__ __forceinline__ u32 pack_truncated(float lo, float hi) {
    return __byte_perm(__float_as_uint(lo), __float_as_uint(hi), 0x7632);
  }
  // D = A * B + D for one m16n8k16 tile, fp32 accumulate.
  static __device__ __forceinline__ void mma(float d[4], const u32 a[4], u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

struct fp16_t {
  static __device__ __forceinline__ u32 pack(float lo, float hi) {
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
  }
  static __device__ __forceinline__ float to_float(u16 x) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x));
    return f;
  }
  // Two lanes at once (f16x2 registers): a * b + c rounded once, and the larger (a NaN lane
  // takes the other operand's, as fmaxf does).
  static __device__ __forceinline__ u32 fma2(u32 a, u32 b, u32 c) {
    u32 d;
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
  }
  static __device__ __forceinline__ u32 max2(u32 a, u32 b) {
    u32 d;
    asm("max.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
    return d;
  }
  static __device__ __forceinline__ void mma(float d[4], const u32 a[4], u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// float8 e4m3 (only the Hopper max-probability pass multiplies it, on wgmma): two values share
// a 16-bit storage column, so a row of D values is laid out and copied as D / 2 u16 columns.
struct e4m3_t {};
template <class T>
struct IsE4m3 {
  static constexpr bool value = false;
};
template <>
struct IsE4m3<e4m3_t> {
  static constexpr bool value = true;
};

// Storage columns (u16) of a row of D values of T.
template <class T, int D>
struct StoreCols {
  static constexpr int value = D;
};
template <int D>
struct StoreCols<e4m3_t, D> {
  static constexpr int value = D / 2;
};

// ---- shared memory addressing ---------------------------------------------------------
__device__ __forceinline__ u32 smem_u32(const void* p) {
  u32 r;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(r) : "l"(p));
  return r;
}

// Element offset of 16-byte chunk `chunk` of row `row` in a [rows][D] tile whose chunks are
// XOR-swizzled by the row's low three bits, so the eight rows an ldmatrix reads land in
// eight different bank groups.
template <int D>
__device__ __forceinline__ int swz(int row, int chunk) {
  return row * D + ((chunk ^ (row & 7)) << 3);
}

// Byte offset of 16-byte chunk `chunk` (a compile-time constant) in a swizzled row whose
// `row & 7` is only known at run time and arrives pre-shifted as `xor16 = (row & 7) << 4`
// (possibly XOR-ed with a lane's odd-chunk bit). Written so that only the low three chunk bits
// meet the run-time value: the compiler keeps a handful of registers instead of one address per
// unrolled (row, chunk) pair.
__device__ __forceinline__ u32 swz_bytes(int chunk, u32 xor16) {
  return static_cast<u32>((chunk & ~7) << 4) + ((static_cast<u32>(chunk & 7) << 4) ^ xor16);
}

__device__ __forceinline__ void st_shared_f32(u32 addr, float x) {
  asm volatile("st.shared.f32 [%0], %1;\n" ::"r"(addr), "f"(x));
}
__device__ __forceinline__ void st_shared_u32(u32 addr, unsigned x) {
  asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(addr), "r"(x));
}
// Whether all four 32-bit words at a 16-byte aligned shared address are nonzero.
__device__ __forceinline__ bool ld_shared_all4(u32 addr) {
  unsigned a, b, c, d;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n" : "=r"(a), "=r"(b), "=r"(c), "=r"(d) : "r"(addr));
  return a && b && c && d;
}
__device__ __forceinline__ float ld_shared_f32(u32 addr) {
  float x;
  asm volatile("ld.shared.f32 %0, [%1];\n" : "=f"(x) : "r"(addr));
  return x;
}

// ---- asynchronous copies ----------------------------------------------------------------
// 16-byte global->shared copy; when !valid the destination is zero-filled and nothing is read.
__device__ __forceinline__ void cp_async16(u32 dst, const void* src, bool valid) {
  int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// ---- tensor-core fragment loads --------------------------------------------------------
__device__ __forceinline__ void ldmatrix_x4(u32 r[4], u32 addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(u32 r[4], u32 addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// ---- online softmax helpers ------------------------------------------------------------
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
// Reduce over the four lanes of an mma quad (lanes that share a row of the C fragment).
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// Online log-sum-exp of two rows (log2 domain): raise the running max to include a tile's max,
// rescale the running sums to it, and give the base the tile's terms are taken against.
__device__ __forceinline__ void raise_running_max(float (&run_m)[2], float (&run_l)[2], const float (&tile_m)[2],
                                                  float (&base)[2]) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const float nm = fmaxf(run_m[i], tile_m[i]);
    base[i] = nm == FG_NEG_INF ? 0.f : nm;
    run_l[i] *= fast_exp2(run_m[i] - base[i]);
    run_m[i] = nm;
  }
}

// The same with sq, a running sum of the terms' squares (the normaliser of twice the logits,
// taken against 2 x the max): a rise of the max scales it by the square of the sums' factor.
__device__ __forceinline__ void raise_running_max(float (&run_m)[2], float (&run_l)[2], float (&run_sq)[2],
                                                  const float (&tile_m)[2], float (&base)[2]) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const float nm = fmaxf(run_m[i], tile_m[i]);
    base[i] = nm == FG_NEG_INF ? 0.f : nm;
    const float f = fast_exp2(run_m[i] - base[i]);
    run_l[i] *= f;
    run_sq[i] *= f * f;
    run_m[i] = nm;
  }
}

// Merge a (max, sum) pair of log2-domain partial sums into (m, l).
__device__ __forceinline__ void merge_lse2(float& m, float& l, float m_o, float l_o) {
  const float nm = fmaxf(m, m_o);
  const float base = nm == FG_NEG_INF ? 0.f : nm;
  l = l * fast_exp2(m - base) + l_o * fast_exp2(m_o - base);
  m = nm;
}

// The same with the sums of squares sq and sq_o.
__device__ __forceinline__ void merge_lse2(float& m, float& l, float& sq, float m_o, float l_o, float sq_o) {
  const float nm = fmaxf(m, m_o);
  const float base = nm == FG_NEG_INF ? 0.f : nm;
  const float f = fast_exp2(m - base);
  const float f_o = fast_exp2(m_o - base);
  l = l * f + l_o * f_o;
  sq = sq * (f * f) + sq_o * (f_o * f_o);
  m = nm;
}

// merge_lse2 over the four lanes of an mma quad (lanes that share a row of the C fragment).
__device__ __forceinline__ void quad_merge_lse2(float& m, float& l) {
#pragma unroll
  for (int s = 1; s <= 2; s <<= 1) {
    merge_lse2(m, l, __shfl_xor_sync(0xffffffffu, m, s), __shfl_xor_sync(0xffffffffu, l, s));
  }
}
__device__ __forceinline__ void quad_merge_lse2(float& m, float& l, float& sq) {
#pragma unroll
  for (int s = 1; s <= 2; s <<= 1) {
    merge_lse2(m, l, sq, __shfl_xor_sync(0xffffffffu, m, s), __shfl_xor_sync(0xffffffffu, l, s),
               __shfl_xor_sync(0xffffffffu, sq, s));
  }
}

// log2 of a row's softmax normaliser from its running max and sum: -inf with no mass, +inf where
// a logit was +inf (the sum is NaN then, from inf - inf).
__device__ __forceinline__ float row_lse2(float m, float l) {
  return m == -FG_NEG_INF ? m : (l > 0.f ? m + __log2f(l) : FG_NEG_INF);
}

// log2 of the normaliser of twice the logits, from the running max and sum of squares: the
// squares are taken against 2 x the max (+-inf stays +-inf, as in row_lse2).
__device__ __forceinline__ float row_lse2_twice(float m, float sq) { return row_lse2(2.f * m, sq); }

// 8-byte store of two floats (dst is 8-byte aligned).
__device__ __forceinline__ void store2(float* dst, float x, float y) {
  float2 v;
  v.x = x;
  v.y = y;
  *reinterpret_cast<float2*>(dst) = v;
}

}  // namespace fg
