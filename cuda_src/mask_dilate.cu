// Sliding maximum along score rows: out[r][j] = max of src[r][j - radius .. j + radius], keys
// outside [0, kv_len) left out (mask_reference.dilate_keys); with `mul`, out = sqrt(mul * that)
// (the geometric mean of pooling "both"; `dst` may be `mul`). A sampled sub-block's scores are
// dilated this way so that its other queries, which look at shifted keys, are covered.
//
// A tile of kDilateTile keys is staged in shared memory with `radius` keys either side; each
// thread loads its run of kDilateRun keys as two float4 (all of a thread's loads are in flight
// at once: the pass is bound by DRAM) and writes kDilateRun consecutive outputs. For radius >= 4
// the windows of a thread's run share a core [j + run - 1 - radius, j + radius], read once; the
// rest of each window is a running max from either end (about 5 shared-memory reads per output
// at radius 16, against 33 for the plain loop).
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
static_assert(kDilateRun == 8, "runs are stored as two float4");

// Shared memory holds key t0 - r + i at padded(i): one spare word every 32 keeps the threads of a
// warp, whose runs start 8 keys apart, on different banks.
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

// A thread's part of keys t0 .. t0 + kDilateTile + r - 1 of `row`: its run (two float4; ld is a
// multiple of 8) and one key of the right halo; keys at or past kv_len read as -inf.
struct TilePart {
  float v[kDilateRun];
  float halo;
};

__device__ __forceinline__ TilePart load_tile_part(const float* row, int t0, int r, int kv_len, int ld) {
  TilePart t;
  const int j = threadIdx.x * kDilateRun;
  if (t0 + j < ld) {
    const float4 a = *reinterpret_cast<const float4*>(row + t0 + j);
    const float4 b = *reinterpret_cast<const float4*>(row + t0 + j + 4);
    t.v[0] = a.x; t.v[1] = a.y; t.v[2] = a.z; t.v[3] = a.w; t.v[4] = b.x; t.v[5] = b.y; t.v[6] = b.z; t.v[7] = b.w;
  }
#pragma unroll
  for (int u = 0; u < kDilateRun; ++u) t.v[u] = (t0 + j + u < kv_len) ? t.v[u] : FG_NEG_INF;
  const int halo_key = t0 + kDilateTile + threadIdx.x;
  t.halo = (static_cast<int>(threadIdx.x) < r && halo_key < kv_len) ? row[halo_key] : FG_NEG_INF;
  return t;
}

// Stage a loaded part at window positions r .. r + kDilateTile + r - 1.
__device__ __forceinline__ void put_tile_part(float* s, const TilePart& t, int r) {
  const int j = threadIdx.x * kDilateRun;
#pragma unroll
  for (int u = 0; u < kDilateRun; ++u) s[padded(r + j + u)] = t.v[u];
  if (static_cast<int>(threadIdx.x) < r) s[padded(r + kDilateTile + threadIdx.x)] = t.halo;
}

// Each thread's run of outputs.
__device__ __forceinline__ void store_run(float* dst, const float (&out)[kDilateRun]) {
  float4* d = reinterpret_cast<float4*>(dst);
  d[0] = make_float4(out[0], out[1], out[2], out[3]);
  d[1] = make_float4(out[4], out[5], out[6], out[7]);
}

__global__ void __launch_bounds__(kDilateThreads) dilate_rows(const __grid_constant__ DilateParams p) {
  __shared__ float s[kDilateSmem];
  const int tiles = (p.ld + kDilateTile - 1) / kDilateTile;
  const i64 row = blockIdx.x / tiles;
  const int t0 = static_cast<int>(blockIdx.x % tiles) * kDilateTile;
  const int r = p.radius;
  const float* src = static_cast<const float*>(p.src) + row * p.ld;
  static_assert(kDilateMaxRadius <= kDilateThreads, "one halo key a thread");
  const int left_key = t0 - r + static_cast<int>(threadIdx.x);
  if (static_cast<int>(threadIdx.x) < r) {
    s[padded(threadIdx.x)] = (left_key >= 0 && left_key < p.kv_len) ? src[left_key] : FG_NEG_INF;
  }
  put_tile_part(s, load_tile_part(src, t0, r, p.kv_len, p.ld), r);
  __syncthreads();
  const int j = threadIdx.x * kDilateRun;
  if (t0 + j >= p.ld) return;
  float out[kDilateRun];
  window_maxima(s, j, r, out);
  if (p.mul != nullptr) {  // the geometric mean with another score array (pooling "both")
    const float4* m = reinterpret_cast<const float4*>(static_cast<const float*>(p.mul) + row * p.ld + t0 + j);
    const float4 m0 = m[0], m1 = m[1];
    const float other[kDilateRun] = {m0.x, m0.y, m0.z, m0.w, m1.x, m1.y, m1.z, m1.w};
#pragma unroll
    for (int u = 0; u < kDilateRun; ++u) out[u] = sqrtf(out[u] * other[u]);
  }
  store_run(static_cast<float*>(p.dst) + row * p.ld + t0 + j, out);
}

// The next tile's loads are issued before this tile's windows are computed, so a CTA keeps its
// row's reads in flight while it works.
__global__ void __launch_bounds__(kDilateThreads) dilate_rows_in_place(const __grid_constant__ DilateInPlaceParams p) {
  __shared__ float s[kDilateSmem];
  const i64 row = blockIdx.x;
  if (!static_cast<const bool*>(p.flags)[row]) return;
  float* scores = static_cast<float*>(p.scores) + row * p.ld;
  const int r = p.radius;
  if (static_cast<int>(threadIdx.x) < r) s[padded(threadIdx.x)] = FG_NEG_INF;
  const int j = threadIdx.x * kDilateRun;
  TilePart next = load_tile_part(scores, 0, r, p.kv_len, p.ld);
  for (int t0 = 0; t0 < p.kv_len; t0 += kDilateTile) {
    put_tile_part(s, next, r);
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
