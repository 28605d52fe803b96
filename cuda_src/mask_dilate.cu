// Sliding maximum along score rows: out[r][j] = max of src[r][j - radius .. j + radius], keys
// outside [0, kv_len) left out (mask_reference.dilate_keys); with `mul`, out = sqrt(mul * that)
// (the geometric mean of pooling "both"; `dst` may be `mul`). A sampled sub-block's scores are
// dilated this way so that its other queries, which look at shifted keys, are covered.
//
// dilate_rows: one CTA handles kDilateTile keys of one row: it stages the tile and `radius` keys
// either side in shared memory, then each thread writes kDilateRun consecutive outputs. For
// radius >= 4 the windows of a thread's run share a core [j + run - 1 - radius, j + radius], read
// once; the rest of each window is a running max from either end (about 5 shared-memory reads
// per output at radius 16, against 33 for the plain loop). The pass is bound by DRAM: one read,
// one write.
//
// dilate_rows_in_place: the same on the rows whose flag is set (pooling "adaptive": the blocks
// scored by sampled queries), in place, after save_dilate_halos has copied the keys either side
// of each chunk that the neighbouring chunks' CTAs will overwrite.
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

__global__ void __launch_bounds__(kDilateThreads) dilate_rows(const __grid_constant__ DilateParams p) {
  __shared__ float s[kDilateTile + 2 * kDilateMaxRadius];
  const int tiles = (p.ld + kDilateTile - 1) / kDilateTile;
  const i64 row = blockIdx.x / tiles;
  const int t0 = static_cast<int>(blockIdx.x % tiles) * kDilateTile;
  const int r = p.radius;
  const float* src = static_cast<const float*>(p.src) + row * p.ld;
  for (int i = threadIdx.x; i < kDilateTile + 2 * r; i += kDilateThreads) {
    const int key = t0 - r + i;
    s[i] = (key >= 0 && key < p.kv_len) ? src[key] : FG_NEG_INF;
  }
  __syncthreads();
  const int j = threadIdx.x * kDilateRun;  // first output of the run, local; its window starts at s[j]
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
  float4* dst = reinterpret_cast<float4*>(static_cast<float*>(p.dst) + row * p.ld + t0 + j);
  dst[0] = make_float4(out[0], out[1], out[2], out[3]);
  dst[1] = make_float4(out[4], out[5], out[6], out[7]);
}

// The original `radius` keys either side of each kDilateTile-key chunk of the flagged rows, into
// halo[(row * chunks + chunk) * 2 * radius ...] (left then right; keys outside the row: -inf).
__global__ void __launch_bounds__(kDilateThreads) save_dilate_halos(const __grid_constant__ DilateInPlaceParams p) {
  const int chunks = (p.kv_len + kDilateTile - 1) / kDilateTile;
  const i64 row = blockIdx.x / chunks;
  const int chunk = static_cast<int>(blockIdx.x % chunks);
  if (!static_cast<const bool*>(p.flags)[row]) return;
  const float* scores = static_cast<const float*>(p.scores) + row * p.ld;
  float* halo = static_cast<float*>(p.halo) + (row * chunks + chunk) * 2 * p.radius;
  for (int i = threadIdx.x; i < 2 * p.radius; i += kDilateThreads) {
    const int key = i < p.radius ? chunk * kDilateTile - p.radius + i : (chunk + 1) * kDilateTile + i - p.radius;
    halo[i] = (key >= 0 && key < p.kv_len) ? scores[key] : FG_NEG_INF;
  }
}

// Each flagged row's chunks dilated in place: a CTA reads only its own chunk from the row, which
// no other CTA writes, and its halo from save_dilate_halos' copy.
__global__ void __launch_bounds__(kDilateThreads) dilate_rows_in_place(const __grid_constant__ DilateInPlaceParams p) {
  __shared__ float s[kDilateTile + 2 * kDilateMaxRadius];  // s[i] holds key t0 - r + i
  const int chunks = (p.kv_len + kDilateTile - 1) / kDilateTile;
  const i64 row = blockIdx.x / chunks;
  const int chunk = static_cast<int>(blockIdx.x % chunks);
  if (!static_cast<const bool*>(p.flags)[row]) return;
  float* scores = static_cast<float*>(p.scores) + row * p.ld;
  const float* halo = static_cast<const float*>(p.halo) + (row * chunks + chunk) * 2 * p.radius;
  const int r = p.radius;
  const int t0 = chunk * kDilateTile;
  for (int i = threadIdx.x; i < kDilateTile + 2 * r; i += kDilateThreads) {
    const int key = t0 - r + i;
    if (i < r) {
      s[i] = halo[i];
    } else if (i >= r + kDilateTile) {
      s[i] = halo[i - kDilateTile];
    } else {
      s[i] = key < p.kv_len ? scores[key] : FG_NEG_INF;
    }
  }
  __syncthreads();
  const int j = threadIdx.x * kDilateRun;
  if (t0 + j >= p.kv_len) return;
  float out[kDilateRun];
  window_maxima(s, j, r, out);
  float4* dst = reinterpret_cast<float4*>(scores + t0 + j);
  dst[0] = make_float4(out[0], out[1], out[2], out[3]);
  dst[1] = make_float4(out[4], out[5], out[6], out[7]);
}

}  // namespace fg
