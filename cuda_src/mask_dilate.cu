// Sliding maximum along bfloat16 score rows: out[r][j] = max of src[r][j - radius .. j + radius],
// keys outside [0, kv_len) left out (mask_reference.dilate_keys); with `mul`, out = sqrt(mul * that)
// (the geometric mean of pooling "both"; `dst` may be `mul`). A sampled sub-block's scores are
// dilated this way so that its other queries, which look at shifted keys, are covered.
//
// A tile of kDilateTile keys is staged in shared memory, as float, with `radius` keys either
// side; each thread loads its run of kDilateRun keys in 16-byte loads, all in flight at once
// (the pass is bound by the bytes in flight: with 8 keys a thread it ran at 2.1 TB/s on an
// H200), and writes its kDilateRun consecutive outputs in 16-byte stores. The maximum commutes
// with rounding, so the result is the float32 sliding maximum rounded toward zero to bfloat16,
// as the reference has it. For radius >= kDilateRun / 2 the windows of a thread's run share a
// core [j + run - 1 - radius, j + radius], read once; the rest of each window is a running max
// from either end (about 3 shared-memory reads per output at radius 16, against 33 for the
// plain loop).
//
// dilate_rows: one CTA per tile of a row, out of place. dilate_rows_in_place: the rows whose flag
// is set (pooling "adaptive": the blocks scored by sampled queries), in place; one CTA walks a
// whole row tile by tile, so no other CTA reads keys it has overwritten: a tile's right halo is
// read before the tile is written, and its last `radius` original keys stay in shared memory as
// the next tile's left halo. A row whose flag is clear costs one CTA that returns.
#include "common.cuh"

namespace fg {

// kDilateTile, kDilateRun, kDilateThreads and kDilateMaxRadius come from fgcupy/jit/score_spec.py
// (DILATE_CONSTANTS), written ahead of this source with the DilateParams struct.
static_assert(kDilateTile == kDilateThreads * kDilateRun, "each thread writes one run");
static_assert(kDilateRun % 8 == 0, "a run is whole 16-byte vectors of bfloat16");

// Shared memory holds key t0 - r + i at padded(i): one spare word every 32 keeps the threads of a
// warp, whose runs start kDilateRun keys apart, on different banks.
constexpr int kDilateStaged = kDilateTile + 2 * kDilateMaxRadius;
constexpr int kDilateSmem = kDilateStaged + kDilateStaged / 32 + 1;
__device__ __forceinline__ int padded(int i) { return i + (i >> 5); }

// out[u] = max of keys j + u .. j + u + 2r of the staged window for the kDilateRun outputs of one
// thread's run.
__device__ __forceinline__ void window_maxima(const float* s, int j, int r, float (&out)[kDilateRun]) {
  if (r >= kDilateRun / 2) {
    float core = FG_NEG_INF;
    for (int i = j + kDilateRun - 1; i <= j + 2 * r; ++i) core = fmaxf(core, s[padded(i)]);
    float left = FG_NEG_INF;  // max of keys j + u .. j + kDilateRun - 1 (the last is in the core)
#pragma unroll
    for (int u = kDilateRun - 1; u >= 0; --u) {
      left = fmaxf(left, s[padded(j + u)]);
      out[u] = fmaxf(core, left);
    }
    float right = FG_NEG_INF;  // max of keys j + 2r + 1 .. j + u + 2r
#pragma unroll
    for (int u = 1; u < kDilateRun; ++u) {
      right = fmaxf(right, s[padded(j + u + 2 * r)]);
      out[u] = fmaxf(out[u], right);
    }
  } else {
#pragma unroll
    for (int u = 0; u < kDilateRun; ++u) {
      float m = FG_NEG_INF;
      for (int i = 0; i <= 2 * r; ++i) m = fmaxf(m, s[padded(j + u + i)]);
      out[u] = m;
    }
  }
}

// Eight bfloat16 of a 16-byte vector as floats.
__device__ __forceinline__ void unpack8(const uint4& w, float* v) {
  const u32 words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    v[2 * e] = bf16_t::to_float(static_cast<u16>(words[e]));
    v[2 * e + 1] = bf16_t::to_float(static_cast<u16>(words[e] >> 16));
  }
}

// kDilateRun bfloat16 at p (16-byte aligned) as floats.
__device__ __forceinline__ void load_run(const u16* p, float (&v)[kDilateRun]) {
#pragma unroll
  for (int c = 0; c < kDilateRun / 8; ++c) unpack8(reinterpret_cast<const uint4*>(p)[c], v + 8 * c);
}

// A thread's part of keys t0 .. t0 + kDilateTile + r - 1 of `row`, as loaded (converted when
// staged, so a tile in flight costs half the registers): its run (ld is a multiple of
// kDilateRun) and one key of the right halo.
struct TilePart {
  uint4 raw[kDilateRun / 8];
  u16 halo;
};

__device__ __forceinline__ TilePart load_tile_part(const u16* row, int t0, int r, int kv_len, int ld) {
  TilePart t;
  const int j = threadIdx.x * kDilateRun;
#pragma unroll
  for (int c = 0; c < kDilateRun / 8; ++c) {
    t.raw[c] = t0 + j < ld ? reinterpret_cast<const uint4*>(row + t0 + j)[c] : make_uint4(0u, 0u, 0u, 0u);
  }
  const int halo_key = t0 + kDilateTile + threadIdx.x;
  t.halo = static_cast<int>(threadIdx.x) < r && halo_key < kv_len ? row[halo_key] : static_cast<u16>(0);
  return t;
}

// Stage a loaded part at window positions r .. r + kDilateTile + r - 1; keys at or past kv_len
// as -inf.
__device__ __forceinline__ void put_tile_part(float* s, const TilePart& t, int t0, int r, int kv_len) {
  const int j = threadIdx.x * kDilateRun;
  float v[kDilateRun];
#pragma unroll
  for (int c = 0; c < kDilateRun / 8; ++c) unpack8(t.raw[c], v + 8 * c);
#pragma unroll
  for (int u = 0; u < kDilateRun; ++u) s[padded(r + j + u)] = t0 + j + u < kv_len ? v[u] : FG_NEG_INF;
  const int halo_key = t0 + kDilateTile + threadIdx.x;
  if (static_cast<int>(threadIdx.x) < r) s[padded(r + kDilateTile + threadIdx.x)] = halo_key < kv_len ? bf16_t::to_float(t.halo) : FG_NEG_INF;
}

// Each thread's run of outputs, rounded toward zero to bfloat16.
__device__ __forceinline__ void store_run(u16* dst, const float (&out)[kDilateRun]) {
#pragma unroll
  for (int c = 0; c < kDilateRun / 8; ++c) {
    uint4 w;
    w.x = bf16_t::pack_truncated(out[8 * c], out[8 * c + 1]);
    w.y = bf16_t::pack_truncated(out[8 * c + 2], out[8 * c + 3]);
    w.z = bf16_t::pack_truncated(out[8 * c + 4], out[8 * c + 5]);
    w.w = bf16_t::pack_truncated(out[8 * c + 6], out[8 * c + 7]);
    reinterpret_cast<uint4*>(dst)[c] = w;
  }
}

__global__ void __launch_bounds__(kDilateThreads) dilate_rows(const __grid_constant__ DilateParams p) {
  __shared__ float s[kDilateSmem];
  const int tiles = (p.ld + kDilateTile - 1) / kDilateTile;
  const i64 row = blockIdx.x / tiles;
  const int t0 = static_cast<int>(blockIdx.x % tiles) * kDilateTile;
  const int r = p.radius;
  const u16* src = static_cast<const u16*>(p.src) + row * p.ld;
  static_assert(kDilateMaxRadius <= kDilateThreads, "one halo key a thread");
  const int left_key = t0 - r + static_cast<int>(threadIdx.x);
  if (static_cast<int>(threadIdx.x) < r) {
    s[padded(threadIdx.x)] = (left_key >= 0 && left_key < p.kv_len) ? bf16_t::to_float(src[left_key]) : FG_NEG_INF;
  }
  put_tile_part(s, load_tile_part(src, t0, r, p.kv_len, p.ld), t0, r, p.kv_len);
  __syncthreads();
  const int j = threadIdx.x * kDilateRun;
  if (t0 + j >= p.ld) return;
  float out[kDilateRun];
  window_maxima(s, j, r, out);
  if (p.mul != nullptr) {  // the geometric mean with another score array (pooling "both")
    float other[kDilateRun];
    load_run(static_cast<const u16*>(p.mul) + row * p.ld + t0 + j, other);
#pragma unroll
    for (int u = 0; u < kDilateRun; ++u) out[u] = sqrtf(out[u] * other[u]);
  }
  store_run(static_cast<u16*>(p.dst) + row * p.ld + t0 + j, out);
}

// The next tile's loads are issued before this tile's windows are computed, so a CTA keeps its
// row's reads in flight while it works. Four CTAs an SM (56 registers): 0.46 ms on 40 heads of
// 256 rows of 32,760 keys (H200), against 0.50 ms with three (80 registers).
__global__ void __launch_bounds__(kDilateThreads, 4) dilate_rows_in_place(const __grid_constant__ DilateInPlaceParams p) {
  __shared__ float s[kDilateSmem];
  const i64 row = blockIdx.x;
  if (!static_cast<const bool*>(p.flags)[row]) return;
  u16* scores = static_cast<u16*>(p.scores) + row * p.ld;
  const int r = p.radius;
  if (static_cast<int>(threadIdx.x) < r) s[padded(threadIdx.x)] = FG_NEG_INF;
  const int j = threadIdx.x * kDilateRun;
  TilePart next = load_tile_part(scores, 0, r, p.kv_len, p.ld);
  for (int t0 = 0; t0 < p.kv_len; t0 += kDilateTile) {
    put_tile_part(s, next, t0, r, p.kv_len);
    __syncthreads();
    if (t0 + kDilateTile < p.kv_len) next = load_tile_part(scores, t0 + kDilateTile, r, p.kv_len, p.ld);
    float out[kDilateRun];
    window_maxima(s, j, r, out);
    __syncthreads();  // every window read: the tile's last r keys become the next left halo
    if (static_cast<int>(threadIdx.x) < r) s[padded(threadIdx.x)] = s[padded(kDilateTile + threadIdx.x)];
    if (t0 + j < p.kv_len) store_run(scores + t0 + j, out);
    __syncthreads();  // the halo moved before the next tile is staged over it
  }
}

}  // namespace fg
