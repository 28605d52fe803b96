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

// out[u] = max of s[j + u .. j + u + 2r] for the kDilateRun outputs of one thread's run.
__device__ __forceinline__ void window_maxima(const float* s, int j, int r, float (&out)[kDilateRun]) {
  if (r >= kDilateRun / 2) {
    float core = FG_NEG_INF;
    for (int i = j + kDilateRun - 1; i <= j + 2 * r; ++i) core = fmaxf(core, s[i]);
    float left = FG_NEG_INF;  // max of s[j + u .. j + kDilateRun - 1] (its last key is in the core)
#pragma unroll
    for (int u = kDilateRun - 1; u >= 0; --u) {
      left = fmaxf(left, s[j + u]);
      out[u] = fmaxf(core, left);
    }
    float right = FG_NEG_INF;  // max of s[j + 2r + 1 .. j + u + 2r]
#pragma unroll
    for (int u = 1; u < kDilateRun; ++u) {
      right = fmaxf(right, s[j + u + 2 * r]);
      out[u] = fmaxf(out[u], right);
    }
  } else {
#pragma unroll
    for (int u = 0; u < kDilateRun; ++u) {
      float m = FG_NEG_INF;
      for (int i = 0; i <= 2 * r; ++i) m = fmaxf(m, s[j + u + i]);
      out[u] = m;
    }
  }
}

// Stage keys t0 .. t0 + kDilateTile + r - 1 of `row` into s[r ..]: the tile (two float4 per
// thread; ld is a multiple of 8) and the right halo; keys at or past kv_len read as -inf.
__device__ __forceinline__ void stage_tile_and_right(float* s, const float* row, int t0, int r, int kv_len,
                                                     int ld) {
  const int j = threadIdx.x * kDilateRun;
  float v[kDilateRun];
  if (t0 + j < ld) {
    const float4 a = *reinterpret_cast<const float4*>(row + t0 + j);
    const float4 b = *reinterpret_cast<const float4*>(row + t0 + j + 4);
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
  }
  const int halo_key = t0 + kDilateTile + threadIdx.x;
  const float halo = (static_cast<int>(threadIdx.x) < r && halo_key < kv_len) ? row[halo_key] : FG_NEG_INF;
#pragma unroll
  for (int u = 0; u < kDilateRun; ++u) s[r + j + u] = (t0 + j + u < kv_len) ? v[u] : FG_NEG_INF;
  if (static_cast<int>(threadIdx.x) < r) s[r + kDilateTile + threadIdx.x] = halo;
}

// Each thread's run of outputs from the staged window (its window starts at s[j]).
__device__ __forceinline__ void store_run(float* dst, const float (&out)[kDilateRun]) {
  float4* d = reinterpret_cast<float4*>(dst);
  d[0] = make_float4(out[0], out[1], out[2], out[3]);
  d[1] = make_float4(out[4], out[5], out[6], out[7]);
}

__global__ void __launch_bounds__(kDilateThreads) dilate_rows(const __grid_constant__ DilateParams p) {
  __shared__ float s[kDilateTile + 2 * kDilateMaxRadius];  // s[i] holds key t0 - r + i
  const int tiles = (p.ld + kDilateTile - 1) / kDilateTile;
  const i64 row = blockIdx.x / tiles;
  const int t0 = static_cast<int>(blockIdx.x % tiles) * kDilateTile;
  const int r = p.radius;
  const float* src = static_cast<const float*>(p.src) + row * p.ld;
  static_assert(kDilateMaxRadius <= kDilateThreads, "one halo key a thread");
  const int left_key = t0 - r + static_cast<int>(threadIdx.x);
  if (static_cast<int>(threadIdx.x) < r) s[threadIdx.x] = (left_key >= 0 && left_key < p.kv_len) ? src[left_key] : FG_NEG_INF;
  stage_tile_and_right(s, src, t0, r, p.kv_len, p.ld);
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

__global__ void __launch_bounds__(kDilateThreads) dilate_rows_in_place(const __grid_constant__ DilateInPlaceParams p) {
  __shared__ float s[kDilateTile + 2 * kDilateMaxRadius];  // s[i] holds key t0 - r + i
  const i64 row = blockIdx.x;
  if (!static_cast<const bool*>(p.flags)[row]) return;
  float* scores = static_cast<float*>(p.scores) + row * p.ld;
  const int r = p.radius;
  if (static_cast<int>(threadIdx.x) < r) s[threadIdx.x] = FG_NEG_INF;
  const int j = threadIdx.x * kDilateRun;
  for (int t0 = 0; t0 < p.kv_len; t0 += kDilateTile) {
    stage_tile_and_right(s, scores, t0, r, p.kv_len, p.ld);
    __syncthreads();
    float out[kDilateRun];
    window_maxima(s, j, r, out);
    __syncthreads();  // every window read: the tile's last r keys become the next left halo
    if (static_cast<int>(threadIdx.x) < r) s[threadIdx.x] = s[kDilateTile + threadIdx.x];
    if (t0 + j < p.kv_len) store_run(scores + t0 + j, out);
    __syncthreads();  // the halo moved before the next tile is staged over it
  }
}

}  // namespace fg
