// Selection of the kept keys of each score row, and emission of SliceMask rows.
//
// Order. Keys of a row are ranked by (band first, then score descending, then index
// ascending): a total order, so "the first n keys" is one well-defined set. Scores are
// compared through their order key (a float's total order as an unsigned: NaN lowest, -0 ==
// +0); keys of the row's diagonal band get the largest key. The selected set is described by
// a threshold (U, I): key i is kept iff key(i) > U, or key(i) == U and i <= I.
//
// select_rows (one CTA per row) finds n and (U, I) without sorting the row:
//   n = top-k: k; threshold: band + keys scoring >= the threshold; tau: the smallest n whose
//   first n keys hold a fraction tau of the row's mass (mass = exp(logit - lse) for logit rows,
//   the score itself for probability rows; "holds" allows a 1e-5 relative float32 summation
//   error); then clamped to [max(min_keys, band), max_keys]. Threshold rows split the
//   threshold's coarse bin at the threshold (value_bin), so unless the clamp binds, the kept
//   keys are whole bins and no search runs.
//   Search: one pass over the row builds a 2048-bin histogram of counts (and masses) over a
//   monotone coarse key (about 1/32 logit below the row's lse for logits, 1/32 octave for
//   probabilities; bin 0 = band) and picks the bin holding the n-th key (or where the mass
//   reaches tau). That bin's keys are then narrowed. Count rules with at most kRankMax keys in
//   the bin (the usual case) rank each gathered key against the others. Otherwise a radix select
//   on 11-bit digits of the order key (at most three digit histograms, starting below the common
//   prefix of the gathered keys) runs over the row (streamed) while the window holds more than
//   2048 keys, then over the window's keys gathered in shared memory, until one key or exact
//   ties remain; ties are cut in index order.
// With STAGED the first pass leaves every key's coarse bin (16 bits) in shared memory, so later
// passes touch global memory only for the keys of the cut's bin, and once the cut is known those
// keys' bins are rewritten as kept or dropped: the row is read from DRAM once, and two CTAs fit
// on an SM. Without it (rows too long to stage) every pass re-reads the row.
// Outputs: the kept count per row; with `offsets` (row sizes known beforehand: top-k) the kept
// indices, ascending, at out + offsets[row]; with `bits` a bitmask of the kept keys, one bit
// per key, `words` 32-bit words per row (for emit_rows).
//
// emit_rows counts (offsets == nullptr) or writes the kept keys of each output row from the
// bitmasks: the union over `group` consecutive selected sub-rows, plus an optional diagonal band.
#include "common.cuh"
#include "bit_rows.cuh"

namespace fg {

// kSelThreads, kBins, kCand, kEmitThreads, kStagedBytes and the rule ids kRule_* come from
// fgcupy/jit/score_spec.py (SELECT_CONSTANTS), written ahead of this source with the
// SelectParams and EmitParams structs (SELECT_PARAMS, EMIT_PARAMS).
constexpr int kSelWarps = kSelThreads / 32;
constexpr int kDigitBits = 11;  // radix digits: up to kBins bins
constexpr int kRankMax = kSelThreads / 2;  // count-rule windows up to this size are cut by ranking
constexpr float kBinsPerLogit = 32.f;
constexpr float kTauSlack = 1e-5f;  // "reaches tau" allows this relative float32 summation error
constexpr int kProbTop = 12257;  // (order_key(1.0f) >> 18) + 1: probability 1 falls in bin 1
constexpr unsigned kBandKey = 0xffffffffu;
constexpr int kDroppedBin = 0x7fff;  // staged bin of a decided key of the cut's bin that is dropped
constexpr int kIntMax = 0x7fffffff;
constexpr int kRowPass = -2;
constexpr int kSplitCut = -2;  // Cut::i of a threshold cut at a bin boundary (no key compared)
constexpr int kEmitWarps = kEmitThreads / 32;
static_assert(sizeof(u16) == kStagedBytes, "a staged coarse bin is 16 bits");
static_assert(kBins == 1 << kDigitBits, "radix digits address every bin");

__device__ __forceinline__ unsigned order_key(float v) {
  unsigned b = static_cast<unsigned>(__float_as_int(v));
  if ((b & 0x7fffffffu) > 0x7f800000u) return 0u;  // NaN: below everything
  if ((b << 1) == 0u) b = 0u;                        // -0 == +0
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ float key_float(unsigned u) {
  const unsigned b = (u & 0x80000000u) ? (u & 0x7fffffffu) : ~u;
  return __int_as_float(static_cast<int>(b));
}

// Band [lo, hi) of query block j: its own keys and `band` more on either side (band < 0: none).
__device__ __forceinline__ void band_range(int j, int slice_m, int band, int kv_len, int& lo, int& hi) {
  if (band < 0) {
    lo = hi = 0;
    return;
  }
  const long long first = static_cast<long long>(j) * slice_m - band;
  const long long last = static_cast<long long>(j + 1) * slice_m + band;
  lo = static_cast<int>(first < 0 ? 0 : (first > kv_len ? kv_len : first));
  hi = static_cast<int>(last > kv_len ? kv_len : (last < lo ? lo : last));
}

// Keys per thread in the ordered passes: a multiple of 32 (whole bitmask words). The staged
// bins array holds kSelThreads * keys_per_thread(kv_len) entries.
__device__ __forceinline__ int keys_per_thread(int kv_len) {
  return ((kv_len + kSelThreads - 1) / kSelThreads + 31) / 32 * 32;
}

// Where key i's staged bin lives. The 16-byte chunks are XOR-swizzled within each group of
// eight: the ordered passes give each thread a run of 64 keys (eight chunks) and read chunk j of
// every run at once, and unswizzled the eight lanes of a quarter warp would all hit the same
// four banks (8-way conflicts).
__device__ __forceinline__ unsigned staged_offset(int i) {
  const unsigned byte = 2u * static_cast<unsigned>(i);
  const unsigned chunk = byte >> 4;
  return ((chunk ^ ((chunk >> 3) & 7u)) << 4) | (byte & 15u);
}

__device__ __forceinline__ u16* staged_ptr(u16* bins, int i) {
  return reinterpret_cast<u16*>(reinterpret_cast<unsigned char*>(bins) + staged_offset(i));
}

__device__ __forceinline__ const u16* staged_ptr(const u16* bins, int i) {
  return reinterpret_cast<const u16*>(reinterpret_cast<const unsigned char*>(bins) + staged_offset(i));
}

// Score rows are float32, float16 (logits) or bfloat16 (max-probability scores), 16-bit ones as
// raw storage (see common.cuh); either way a 16-byte load brings kVec scores, converted exactly
// to float.
struct F32Scores {
  typedef float T;
  typedef float4 Raw;
  static constexpr int kVec = 4;
  static constexpr int kZeroLowBits = 0;  // low bits every stored score has zero
  static __device__ __forceinline__ float at(const float* p, int i) { return __ldg(p + i); }
  static __device__ __forceinline__ Raw load(const float* p, int f) { return __ldg(reinterpret_cast<const float4*>(p) + f); }
  static __device__ __forceinline__ void unpack(const Raw& v, float x[kVec]) {
    x[0] = v.x;
    x[1] = v.y;
    x[2] = v.z;
    x[3] = v.w;
  }
};

// 16-bit rows: H converts one score (fp16_t or bf16_t); the low ZERO_LOW_BITS bits of every
// converted score are zero (a float16 is a float with 13 more mantissa bits zero, a bfloat16 16).
template <class H, int ZERO_LOW_BITS>
struct U16Scores {
  typedef u16 T;
  typedef uint4 Raw;
  static constexpr int kVec = 8;
  static constexpr int kZeroLowBits = ZERO_LOW_BITS;
  static __device__ __forceinline__ float at(const u16* p, int i) { return H::to_float(__ldg(p + i)); }
  static __device__ __forceinline__ Raw load(const u16* p, int f) { return __ldg(reinterpret_cast<const uint4*>(p) + f); }
  static __device__ __forceinline__ void unpack(const Raw& v, float x[kVec]) {
    const unsigned w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      x[2 * e] = H::to_float(static_cast<u16>(w[e] & 0xffffu));
      x[2 * e + 1] = H::to_float(static_cast<u16>(w[e] >> 16));
    }
  }
};
typedef U16Scores<fp16_t, 13> F16Scores;   // logits
typedef U16Scores<bf16_t, 16> BF16Scores;  // max-probability scores

// The staged bins of kVec consecutive keys (the first a multiple of kVec): one 8- or 16-byte
// access, inside one swizzled 16-byte chunk.
template <int N>
__device__ __forceinline__ void store_bins(u16* bins, int i0, const int b[N]) {
  unsigned w[N / 2];
#pragma unroll
  for (int e = 0; e < N / 2; ++e) w[e] = static_cast<unsigned>(b[2 * e]) | (static_cast<unsigned>(b[2 * e + 1]) << 16);
  if constexpr (N == 4) {
    *reinterpret_cast<uint2*>(staged_ptr(bins, i0)) = make_uint2(w[0], w[1]);
  } else {
    *reinterpret_cast<uint4*>(staged_ptr(bins, i0)) = make_uint4(w[0], w[1], w[2], w[3]);
  }
}

template <int N>
__device__ __forceinline__ void load_bin_words(const u16* bins, int i0, unsigned w[N / 2]) {
  if constexpr (N == 4) {
    const uint2 v = *reinterpret_cast<const uint2*>(staged_ptr(bins, i0));
    w[0] = v.x;
    w[1] = v.y;
  } else {
    const uint4 v = *reinterpret_cast<const uint4*>(staged_ptr(bins, i0));
    w[0] = v.x;
    w[1] = v.y;
    w[2] = v.z;
    w[3] = v.w;
  }
}

__device__ __forceinline__ int bin_of_words(const unsigned* w, int e) {
  return static_cast<int>((w[e >> 1] >> (16 * (e & 1))) & 0xffffu);
}

// Everything about a row but where its scores live.
struct RowBase {
  const u16* bins;    // every key's coarse bin in shared memory (STAGED)
  int n;              // keys in the row
  int band_lo, band_hi;  // keys ranked first
  bool logit;         // logits with a row lse, or probabilities
  float lse;
  float lse_bins;     // lse * kBinsPerLogit
  int t0, t1;         // this thread's keys [t0, t1) in the ordered passes (t0 a multiple of 32)
  int split_bin;      // threshold rule: the threshold's coarse bin, split at split_v (else -1)
  float split_v;      // the threshold (not NaN where split_bin >= 0)
};

template <class S>
struct RowCtx : RowBase {
  const typename S::T* vals;  // the row in global memory
};

__device__ __forceinline__ bool in_band(const RowBase& c, int i) { return i >= c.band_lo && i < c.band_hi; }

template <class S>
__device__ __forceinline__ unsigned key_at(const RowCtx<S>& c, int i) { return order_key(S::at(c.vals, i)); }

// Coarse bin (1 .. kBins-1, best first) of a non-band score v: non-increasing in v's order key
// (NaN lowest), so a smaller bin always means a strictly larger key.
template <bool LOGIT>
__device__ __forceinline__ int coarse_bin_of(const RowBase& c, float v) {
  if (LOGIT) {
    // 1 + round(t) from the mantissa of t + 2^23 + 1 (no float-to-int conversion unit).
    const float t = fminf(fmaxf(fmaf(-kBinsPerLogit, v, c.lse_bins), 0.f), static_cast<float>(kBins - 2));
    return v == v ? (__float_as_int(__fadd_rn(t, 8388609.f)) & 0x7fffff) : kBins - 1;
  }
  // kProbTop - (order_key(v) >> 18) clamped to [1, kBins - 1] without order_key's branches: for
  // v >= +0 the order key is its bits with the sign bit set (2^13 added to bits >> 18); negative
  // values, -0 and NaN (bits above +inf's, unsigned) take the lowest bin, as +0 does.
  const unsigned bits = __float_as_uint(v);
  const int b = min(max(kProbTop - 8192 - static_cast<int>(bits >> 18), 1), kBins - 1);
  return bits > 0x7f800000u ? kBins - 1 : b;
}
__device__ __forceinline__ int coarse_bin(const RowBase& c, float v) {
  return c.logit ? coarse_bin_of<true>(c, v) : coarse_bin_of<false>(c, v);
}

// The bin every pass uses: the coarse bin, except that with a threshold split the keys of bin
// split_bin below split_v move to the next bin. Bins stay monotone (a smaller bin still means
// a strictly larger key), and the keys at or above the threshold are exactly the bins up to
// split_bin. Every pass computes bins with this one function (SPLIT = false only where no row
// has a split), so the staged bins and the search agree exactly.
template <bool SPLIT, bool LOGIT>
__device__ __forceinline__ int value_bin_of(const RowBase& c, float v) {
  const int b = coarse_bin_of<LOGIT>(c, v);
  if (!SPLIT) return b;
  return b == c.split_bin && v < c.split_v ? b + 1 : b;  // (that bin holds no NaN)
}
template <bool SPLIT = true>
__device__ __forceinline__ int value_bin(const RowBase& c, float v) {
  return c.logit ? value_bin_of<SPLIT, true>(c, v) : value_bin_of<SPLIT, false>(c, v);
}

// Bin of key i (0 for the band): from shared memory when staged, else from the row.
template <bool STAGED, class S>
__device__ __forceinline__ int bin_at(const RowCtx<S>& c, int i) {
  if (STAGED) return *staged_ptr(c.bins, i);
  return in_band(c, i) ? 0 : value_bin(c, S::at(c.vals, i));
}

// Bins of keys i0 .. i0 + 7 (i0 a multiple of 8; keys past the row get kBins).
template <bool STAGED, class S>
__device__ __forceinline__ void bins8(const RowCtx<S>& c, int i0, int b[8]) {
  if (STAGED) {
    unsigned w[4];
    load_bin_words<8>(c.bins, i0, w);
#pragma unroll
    for (int e = 0; e < 8; ++e) b[e] = bin_of_words(w, e);
  } else {
#pragma unroll
    for (int e = 0; e < 8; ++e) b[e] = i0 + e < c.n ? bin_at<false>(c, i0 + e) : kBins;
  }
}

__device__ __forceinline__ float key_mass(const RowBase& c, unsigned u) {
  if (u == 0u) return 0.f;
  const float v = key_float(u);
  return c.logit ? fast_exp2((v - c.lse) * 1.4426950408889634f) : fmaxf(v, 0.f);
}

// Histogram of masses. Logit rows (every mass <= 1 up to rounding) sum in fixed point, units of
// 2^-36 split into two 32-bit sums: shared-memory float atomics are compare-and-swap loops,
// integer adds are native. Probability rows (any non-negative score) add floats. finish()
// leaves float masses in f() for find_bin.
struct MassHist {
  unsigned* hi;  // fixed point: sum of floor(m * 2^20)
  unsigned* lo;  // fixed point: sum of the next 16 bits; float sums for probability rows
  bool fixed;

  __device__ __forceinline__ float* f() const { return reinterpret_cast<float*>(lo); }
  __device__ __forceinline__ void clear(int b) const {
    hi[b] = 0u;
    lo[b] = 0u;
  }
  __device__ __forceinline__ void add(int b, float m) const {
    if (fixed) {
      const float s = fminf(m, 4.f) * 1048576.f;
      const unsigned h = static_cast<unsigned>(s);
      const unsigned l = static_cast<unsigned>((s - static_cast<float>(h)) * 65536.f);
      // A bin's low sum wraps past ~65,000 keys of alike mass: the wrap (2^32 units of 2^-36)
      // carries 2^16 units of 2^-20 into the high sum.
      const unsigned before = atomicAdd(lo + b, l);
      atomicAdd(hi + b, h + (before > 0xffffffffu - l ? 65536u : 0u));
    } else {
      atomicAdd(f() + b, m);
    }
  }
  // Call between barriers: every thread converts its bins.
  __device__ __forceinline__ void finish(int nb) const {
    if (!fixed) return;
    for (int b = threadIdx.x; b < nb; b += kSelThreads) {
      const double x = static_cast<double>(hi[b]) * 65536.0 + static_cast<double>(lo[b]);
      f()[b] = static_cast<float>(x * 1.4551915228366852e-11);  // 2^-36
    }
  }
};

struct SelScratch {
  unsigned warp_u[kSelWarps];
  float warp_f[kSelWarps];
  int best, last, bin, ncand, found;
  int gathered;  // candidates of the last search (-1: none gathered, kRowPass: part of the bin)
  unsigned kmin, kmax;
  unsigned before_cnt, bin_cnt;
  unsigned band_cnt;  // keys of the row's band
  int split_bin;      // RowBase::split_bin, read back after the first pass (a register fewer)
  float before_mass;
};

// Sum over the block (every thread gets the totals).
__device__ __forceinline__ void block_sum(unsigned& xu, float& xf, SelScratch& sc) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    xu += __shfl_xor_sync(kFull, xu, off);
    xf += __shfl_xor_sync(kFull, xf, off);
  }
  if (lane == 0) {
    sc.warp_u[warp] = xu;
    sc.warp_f[warp] = xf;
  }
  __syncthreads();
  xu = 0u;
  xf = 0.f;
  for (int w = 0; w < kSelWarps; ++w) {
    xu += sc.warp_u[w];
    xf += sc.warp_f[w];
  }
  __syncthreads();
}

// Exclusive prefix over the threads in order.
__device__ __forceinline__ void block_exscan(unsigned xu, float xf, unsigned& ex_u, float& ex_f, SelScratch& sc) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  unsigned in_u = xu;
  float in_f = xf;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const unsigned yu = __shfl_up_sync(kFull, in_u, off);
    const float yf = __shfl_up_sync(kFull, in_f, off);
    if (lane >= off) {
      in_u += yu;
      in_f += yf;
    }
  }
  if (lane == 31) {
    sc.warp_u[warp] = in_u;
    sc.warp_f[warp] = in_f;
  }
  unsigned lane_ex_u = __shfl_up_sync(kFull, in_u, 1);
  float lane_ex_f = __shfl_up_sync(kFull, in_f, 1);
  if (lane == 0) {
    lane_ex_u = 0u;
    lane_ex_f = 0.f;
  }
  __syncthreads();
  unsigned base_u = 0u;
  float base_f = 0.f;
  for (int w = 0; w < warp; ++w) {
    base_u += sc.warp_u[w];
    base_f += sc.warp_f[w];
  }
  ex_u = base_u + lane_ex_u;
  ex_f = base_f + lane_ex_f;
  __syncthreads();
}

// The first bin (best first) that is non-empty and where the running count reaches need_cnt
// (or the running mass reaches need_mass); the last non-empty bin if none does. Leaves the
// bin, its count and the count and mass of the bins before it in sc.
__device__ void find_bin(const unsigned* cnt, const float* mass, int nb, bool by_mass, unsigned need_cnt,
                         float need_mass, SelScratch& sc) {
  const int per = (nb + kSelThreads - 1) / kSelThreads;
  const int b0 = threadIdx.x * per;
  unsigned local_c = 0u;
  float local_m = 0.f;
  for (int j = 0; j < per; ++j) {
    const int b = b0 + j;
    if (b < nb) {
      local_c += cnt[b];
      if (by_mass) local_m += mass[b];
    }
  }
  if (threadIdx.x == 0) {
    sc.best = kIntMax;
    sc.last = -1;
  }
  unsigned ex_c;
  float ex_m;
  block_exscan(local_c, local_m, ex_c, ex_m, sc);
  unsigned run_c = ex_c;
  float run_m = ex_m;
  int mine = kIntMax, last = -1;
  for (int j = 0; j < per; ++j) {
    const int b = b0 + j;
    if (b < nb && cnt[b] > 0u) {
      last = b;
      run_c += cnt[b];
      if (by_mass) run_m += mass[b];
      const bool hit = by_mass ? run_m >= need_mass : run_c >= need_cnt;
      if (hit && mine == kIntMax) mine = b;
    }
  }
  if (mine != kIntMax) atomicMin(&sc.best, mine);
  if (last >= 0) atomicMax(&sc.last, last);
  __syncthreads();
  int chosen = sc.best != kIntMax ? sc.best : sc.last;
  if (chosen < 0) chosen = 0;
  if (chosen >= b0 && chosen < b0 + per) {
    unsigned before_c = ex_c;
    float before_m = ex_m;
    for (int b = b0; b < chosen; ++b) {
      before_c += cnt[b];
      if (by_mass) before_m += mass[b];
    }
    sc.bin = chosen;
    sc.bin_cnt = cnt[chosen];
    sc.before_cnt = before_c;
    sc.before_mass = before_m;
  }
  __syncthreads();
}

// First pass: read the row once (16-byte loads; score rows are padded to 128 bytes),
// build the level-0 histogram, stage the bins (STAGED) and count keys >= u_thr (COUNT_THR).
template <bool STAGED, bool MASS, bool COUNT_THR, class S>
__device__ unsigned first_pass(const RowCtx<S>& c, u16* bins_out, unsigned* cnt, const MassHist& mass, unsigned u_thr) {
  const int tid = threadIdx.x;
  for (int b = tid; b < kBins; b += kSelThreads) {
    cnt[b] = 0u;
    mass.clear(b);
  }
  __syncthreads();
  unsigned above_thr = 0u;
  constexpr int V = S::kVec;
  const int nvec = (c.n + V - 1) / V;
  for (int base = 0; base < nvec; base += 4 * kSelThreads) {
    typename S::Raw raw[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int f = base + j * kSelThreads + tid;
      if (f < nvec) raw[j] = S::load(c.vals, f);
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int f = base + j * kSelThreads + tid;
      if (f >= nvec) continue;
      float xs[V];
      S::unpack(raw[j], xs);
      const bool near_band = V * f < c.band_hi && V * f + V > c.band_lo;
      int bs[V];
      if (!near_band && V * f + V <= c.n) {
        // Most vectors: no band key, none past the row, the row's kind known once (their
        // per-key tests and branches cost more than the binning).
        if (c.logit) {
#pragma unroll
          for (int e = 0; e < V; ++e) bs[e] = value_bin_of<COUNT_THR, true>(c, xs[e]);
        } else {
#pragma unroll
          for (int e = 0; e < V; ++e) bs[e] = value_bin_of<COUNT_THR, false>(c, xs[e]);
        }
#pragma unroll
        for (int e = 0; e < V; ++e) {
          atomicAdd(cnt + bs[e], 1u);
          if (MASS) mass.add(bs[e], key_mass(c, order_key(xs[e])));
          if (COUNT_THR && c.split_bin < 0 && order_key(xs[e]) >= u_thr) ++above_thr;
        }
      } else {
#pragma unroll
        for (int e = 0; e < V; ++e) {
          const int i = V * f + e;
          const bool band = near_band && in_band(c, i);
          bs[e] = band ? 0 : value_bin<COUNT_THR>(c, xs[e]);
          if (i < c.n) {
            atomicAdd(cnt + bs[e], 1u);
            if (MASS) mass.add(bs[e], key_mass(c, order_key(xs[e])));
            if (COUNT_THR && c.split_bin < 0 && !band && order_key(xs[e]) >= u_thr) ++above_thr;
          }
        }
      }
      if (STAGED) store_bins<V>(bins_out, V * f, bs);
    }
  }
  __syncthreads();
  if (MASS) {
    mass.finish(kBins);
    __syncthreads();
  }
  return above_thr;
}

// Level-0 histogram of counts again (the search destroys it).
template <bool STAGED, class S>
__device__ void recount(const RowCtx<S>& c, unsigned* cnt) {
  const int tid = threadIdx.x;
  for (int b = tid; b < kBins; b += kSelThreads) cnt[b] = 0u;
  __syncthreads();
  for (int i = tid; i < c.n; i += kSelThreads) atomicAdd(cnt + bin_at<STAGED>(c, i), 1u);
  __syncthreads();
}

// Calls f(i, u) for each key of this thread's range in coarse bin `bin` (never the band) whose
// order key u has prefix pfx above bit pshift, in index order. Only those keys are read from
// global memory.
template <bool STAGED, class S, class F>
__device__ __forceinline__ void for_window(const RowCtx<S>& c, int bin, unsigned pfx, int pshift, F f) {
  for (int i0 = c.t0; i0 < c.t1; i0 += 8) {
    int b[8];
    bins8<STAGED>(c, i0, b);
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const int i = i0 + e;
      if (b[e] == bin && i < c.t1) {
        const unsigned u = key_at(c, i);
        if (pshift >= 32 || (u >> pshift) == pfx) f(i, u);
      }
    }
  }
}

// Calls f(i, u) for each key of coarse bin `bin` (never the band) with its order key u. The row
// is streamed in 16-byte loads spread over the block (coalesced, from L2 after the first pass),
// so no load waits on another; the order of the calls is unspecified.
template <bool STAGED, class S, class F>
__device__ __forceinline__ void stream_bin(const RowCtx<S>& c, int bin, F f) {
  constexpr int V = S::kVec;
  const int nvec = (c.n + V - 1) / V;
  for (int base = 0; base < nvec; base += 4 * kSelThreads) {
    typename S::Raw raw[4];
    unsigned bw[4][V / 2];  // staged bins, two a word
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int fv = base + j * kSelThreads + threadIdx.x;
      if (fv < nvec) {
        raw[j] = S::load(c.vals, fv);
        if (STAGED) load_bin_words<V>(c.bins, V * fv, bw[j]);
      }
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int fv = base + j * kSelThreads + threadIdx.x;
      if (fv >= nvec) continue;
      float xs[V];
      S::unpack(raw[j], xs);
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const int i = V * fv + e;
        const int b = STAGED ? bin_of_words(bw[j], e) : (in_band(c, i) ? 0 : value_bin(c, xs[e]));
        if (b == bin && i < c.n) f(i, order_key(xs[e]));
      }
    }
  }
}

// Whether either 16-bit half of x is zero (exact).
__device__ __forceinline__ bool has_zero_half(unsigned x) { return ((x - 0x00010001u) & ~x & 0x80008000u) != 0u; }

// Calls f(i) for each key of this thread's range in coarse bin `bin`, from the bins alone.
// Staged bins are tested two at a time (a pair without a match costs three operations).
template <bool STAGED, class S, class F>
__device__ __forceinline__ void for_window_index(const RowCtx<S>& c, int bin, F f) {
  if (STAGED) {
    const unsigned pattern = static_cast<unsigned>(bin) * 0x10001u;
    for (int i0 = c.t0; i0 < c.t1; i0 += 8) {
      unsigned w[4];
      load_bin_words<8>(c.bins, i0, w);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const unsigned x = w[e] ^ pattern;
        if (!has_zero_half(x)) continue;
        const int i = i0 + 2 * e;
        if ((x & 0xffffu) == 0u && i < c.t1) f(i);
        if ((x >> 16) == 0u && i + 1 < c.t1) f(i + 1);
      }
    }
    return;
  }
  for (int i0 = c.t0; i0 < c.t1; i0 += 8) {
    int b[8];
    bins8<STAGED>(c, i0, b);
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      if (b[e] == bin && i0 + e < c.t1) f(i0 + e);
    }
  }
}

struct Cut {
  unsigned u;
  int i;
  unsigned n;
  int bin;  // coarse bin of the cut key: keys in smaller bins are kept, in larger bins dropped
};

// The search window's keys once it fits kCand: order keys and indices, in no particular order.
struct Cands {
  unsigned* u;
  int* i;
};

// The first `need_cnt` keys (count mode) or the fewest first keys holding `need_mass`
// (mass mode). Requires the level-0 histogram; destroys it. After the coarse bin, 11-bit digits
// of the order key narrow the window (a radix select): over the row while the window is larger
// than kCand, then over the gathered candidates, until one key or exact ties remain. Digits
// start below the bits the bin fixes (a probability bin other than the first and last is one
// prefix of the order key) and end at the bits every stored score has zero (16-bit rows), so
// rows of many equal scores take no pass that cannot split them.
template <bool STAGED, class S>
__device__ Cut search(const RowCtx<S>& c, unsigned* cnt, const MassHist& mass, Cands cand, bool by_mass,
                      unsigned need_cnt, float need_mass, SelScratch& sc) {
  const int tid = threadIdx.x;
  find_bin(cnt, mass.f(), kBins, by_mass, need_cnt, need_mass, sc);
  const int bin = sc.bin;
  unsigned before = sc.before_cnt;
  unsigned rem_cnt = need_cnt - min(need_cnt, before);
  float rem_mass = need_mass - sc.before_mass;
  unsigned window = sc.bin_cnt;
  Cut cut;
  cut.bin = bin;
  if (bin == 0) {  // the band alone: it is always kept whole
    cut.u = kBandKey;
    cut.i = kIntMax;
    cut.n = window;
    return cut;
  }
  unsigned pfx = 0u;
  int pshift = 32;
  if (!c.logit && bin >= 2 && bin <= kBins - 2 && sc.split_bin < 0) {
    pfx = static_cast<unsigned>(kProbTop - bin);  // coarse_bin_of<false>: key >> 18 = kProbTop - bin
    pshift = 18;
  }
  constexpr int kLow = S::kZeroLowBits;
  int nc = -1;  // gathered candidates; -1 while the window is only described by (bin, prefix)
  bool row_pass = false;  // a digit pass ran over the row: the candidates are part of the bin
  bool whole_bin = true;  // no digit has narrowed the window yet
  // Gather the window. The whole bin: indices first (from the bins alone), then their keys, so
  // every thread's loads are independent of each other. After digit passes over the row: the
  // keys with the prefix.
  auto gather = [&]() {
    if (tid == 0) {
      sc.ncand = 0;
      sc.found = 0;
    }
    __syncthreads();
    if (whole_bin) {
      for_window_index<STAGED>(c, bin, [&](int i) {
        const int p = atomicAdd(&sc.ncand, 1);
        if (p < kCand) cand.i[p] = i;
      });
      __syncthreads();
      const int found = min(sc.ncand, kCand);
      for (int p = tid; p < found; p += kSelThreads) cand.u[p] = key_at(c, cand.i[p]);
    } else {
      stream_bin<STAGED>(c, bin, [&](int i, unsigned u) {
        if ((u >> pshift) != pfx) return;
        const int p = atomicAdd(&sc.ncand, 1);
        if (p < kCand) {
          cand.u[p] = u;
          cand.i[p] = i;
        }
      });
    }
    __syncthreads();
    nc = min(sc.ncand, kCand);
  };
  // Digits the gathered keys share need no pass: start below their common prefix.
  auto skip_common_prefix = [&]() {
    if (tid == 0) {
      sc.kmin = 0xffffffffu;
      sc.kmax = 0u;
    }
    __syncthreads();
    for (int p = tid; p < nc; p += kSelThreads) {
      atomicMin(&sc.kmin, cand.u[p]);
      atomicMax(&sc.kmax, cand.u[p]);
    }
    __syncthreads();
    const unsigned differ = sc.kmin ^ sc.kmax;
    const int s = differ == 0u ? 0 : 32 - __clz(differ);
    if (nc > 0 && s < pshift) {
      pfx = s >= 32 ? 0u : sc.kmax >> s;
      pshift = s;
    }
    __syncthreads();
  };
  // Count mode, small window: rank each candidate among the others and cut at the rem_cnt-th
  // (one pass and one barrier instead of digit histograms and their barriers). Each candidate
  // is ranked by `split` neighbouring lanes, each over every split-th other candidate.
  bool ranked = false;
  unsigned take = 0u;
  auto rank_cut = [&]() {
    take = min(max(rem_cnt, 1u), static_cast<unsigned>(nc));
    const int split = nc <= kSelThreads / 8 ? 8 : (nc <= kSelThreads / 4 ? 4 : 2);
    const int p = tid / split;
    const unsigned up = p < nc ? cand.u[p] : 0u;
    const int ip = p < nc ? cand.i[p] : 0;
    unsigned ahead = 0u;
    for (int q = tid % split; q < nc && p < nc; q += split) {
      const unsigned uq = cand.u[q];
      ahead += static_cast<unsigned>(uq > up) + static_cast<unsigned>(uq == up && cand.i[q] < ip);
    }
    for (int off = 1; off < split; off <<= 1) ahead += __shfl_xor_sync(kFull, ahead, off);
    if (p < nc && tid % split == 0 && ahead + 1u == take) sc.found = p;  // ranks are distinct: one match
    __syncthreads();
    cut.u = cand.u[sc.found];
    cut.i = cand.i[sc.found];
    ranked = true;
  };
  while (window > 1u && pshift > kLow) {
    if (nc < 0 && window <= static_cast<unsigned>(kCand)) {
      gather();
      if (!by_mass && nc <= kRankMax) {
        rank_cut();
        break;
      }
      skip_common_prefix();
      if (pshift <= kLow) break;
    }
    const int width = min(kDigitBits, pshift);
    const int shift = pshift - width;
    const int nb = 1 << width;
    for (int b = tid; b < nb; b += kSelThreads) {
      cnt[b] = 0u;
      mass.clear(b);
    }
    __syncthreads();
    auto add = [&](unsigned u) {
      const int digit_bin = nb - 1 - static_cast<int>((u >> shift) & static_cast<unsigned>(nb - 1));
      atomicAdd(cnt + digit_bin, 1u);
      if (by_mass) mass.add(digit_bin, key_mass(c, u));
    };
    if (nc >= 0) {
      for (int p = tid; p < nc; p += kSelThreads) {
        const unsigned u = cand.u[p];
        if (pshift >= 32 || (u >> pshift) == pfx) add(u);
      }
    } else {
      row_pass = true;
      stream_bin<STAGED>(c, bin, [&](int, unsigned u) {
        if (pshift >= 32 || (u >> pshift) == pfx) add(u);
      });
    }
    __syncthreads();
    if (by_mass) {
      mass.finish(nb);
      __syncthreads();
    }
    find_bin(cnt, mass.f(), nb, by_mass, rem_cnt, rem_mass, sc);
    const unsigned digit = static_cast<unsigned>(nb - 1 - sc.bin);
    before += sc.before_cnt;
    rem_cnt -= min(rem_cnt, sc.before_cnt);
    rem_mass -= sc.before_mass;
    window = sc.bin_cnt;
    pfx = (pshift >= 32 ? 0u : (pfx << width)) | digit;
    pshift = shift;
    whole_bin = false;
  }
  if (!ranked && pshift > 0 && pshift <= kLow) {
    // The bits left are the ones every stored score has zero: one key, or exact ties. An order
    // key carries them as zeros for scores >= +0 and NaN (key 0), as ones for negative scores
    // (whose keys are their bits inverted).
    const bool negative = pfx != 0u && ((pfx >> (31 - pshift)) & 1u) == 0u;
    pfx = (pfx << pshift) | (negative ? (1u << pshift) - 1u : 0u);
    pshift = 0;
  }
  if (window == 0u) window = 1u;  // defensive: an empty window cannot happen for valid input
  if (!ranked && nc < 0 && window <= static_cast<unsigned>(kCand)) gather();
  if (ranked) {
    // rank_cut set cut.u, cut.i and take
  } else if (pshift > 0) {
    // One key left: the candidate with the prefix.
    if (tid == 0) sc.found = 0;
    __syncthreads();
    for (int p = tid; p < nc; p += kSelThreads) {
      if (pshift >= 32 || (cand.u[p] >> pshift) == pfx) sc.found = p;
    }
    __syncthreads();
    cut.u = cand.u[sc.found];
    cut.i = cand.i[sc.found];
    take = 1u;
  } else {
    // Exact ties (every window key has order key pfx): cut them in index order.
    cut.u = pfx;
    if (by_mass) {
      const float m = key_mass(c, pfx);
      if (rem_mass <= 0.f) {
        take = 1u;
      } else if (!(m > 0.f)) {
        take = window;
      } else {
        const float q = ceilf(rem_mass / m);
        take = q >= static_cast<float>(window) ? window : static_cast<unsigned>(fmaxf(q, 1.f));
      }
    } else {
      take = min(max(rem_cnt, 1u), window);
    }
    if (take >= window) {
      cut.i = kIntMax;
    } else {
      if (tid == 0) sc.found = kIntMax;
      __syncthreads();
      if (nc >= 0 && nc <= kRankMax) {
        // The tie with exactly take - 1 smaller-index ties (quadratic in nc: small windows only;
        // 16-bit scores can leave thousands of exact ties).
        for (int p = tid; p < nc; p += kSelThreads) {
          if (cand.u[p] != pfx) continue;
          const int ip = cand.i[p];
          unsigned smaller = 0u;
          for (int q = 0; q < nc; ++q) smaller += cand.u[q] == pfx && cand.i[q] < ip;
          if (smaller + 1u == take) sc.found = ip;
        }
      } else {
        // Thread ranges are in index order: a block scan of per-thread tie counts ranks them
        // (two passes over this thread's keys of the bin).
        unsigned ties = 0u;
        for_window<STAGED>(c, bin, pfx, 0, [&](int, unsigned) { ++ties; });
        unsigned rank;
        float unused;
        block_exscan(ties, 0.f, rank, unused, sc);
        if (rank < take && take <= rank + ties) {
          for_window<STAGED>(c, bin, pfx, 0, [&](int i, unsigned) {
            if (++rank == take) sc.found = i;
          });
        }
      }
      __syncthreads();
      cut.i = sc.found;
    }
  }
  if (tid == 0) sc.gathered = row_pass ? kRowPass : nc;
  __syncthreads();
  cut.n = before + take;
  return cut;
}

// Kept-key bitmask of keys i0 .. i0 + 31 (i0 a multiple of 32) of a row that is not staged:
// decided by each key's bin, except in the cut's own bin, where the key is compared with the cut.
template <class S>
__device__ __forceinline__ unsigned kept_word(const RowCtx<S>& c, int i0, const Cut& cut) {
  unsigned m = 0u;
#pragma unroll
  for (int g = 0; g < 4; ++g) {
    int b[8];
    bins8<false>(c, i0 + 8 * g, b);
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const int i = i0 + 8 * g + e;
      bool k = b[e] < cut.bin;
      if (b[e] == cut.bin && i < c.n) {
        const unsigned u = in_band(c, i) ? kBandKey : key_at(c, i);
        k = u > cut.u || (u == cut.u && i <= cut.i);
      }
      if (k) m |= 1u << (8 * g + e);
    }
  }
  const int left = c.n - i0;
  return left >= 32 ? m : (left <= 0 ? 0u : m & ((1u << left) - 1u));
}

// The same from staged bins alone, where every staged bin is at most 0x7fff and a key is kept
// iff its bin < keep_below (every key of the cut's bin decided): one 32-bit subtraction per two
// bins, bit 15 of each half set iff that half's bin <= keep_below - 1 (no borrow crosses halves).
__device__ __forceinline__ unsigned kept_word_below(const u16* bins, int i0, int n, int keep_below) {
  if (keep_below <= 0) return 0u;
  const unsigned limit = (static_cast<unsigned>(keep_below - 1) | 0x8000u) * 0x10001u;
  unsigned m = 0u;
#pragma unroll
  for (int g = 0; g < 4; ++g) {
    unsigned w[4];
    load_bin_words<8>(bins, i0 + 8 * g, w);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const unsigned d = (limit - w[e]) & 0x80008000u;
      m |= (((d >> 15) & 1u) | (d >> 30)) << (8 * g + 2 * e);  // bit 15 -> 0, bit 31 -> 1
    }
  }
  const int left = n - i0;
  return left >= 32 ? m : (left <= 0 ? 0u : m & ((1u << left) - 1u));
}

// RULE: kRule_topk compiles top-k alone (the default prediction's rule: a fifth of the compile
// time of the kernel holding every rule's passes, the tau search's above all); -1 takes the
// rule from p.rule.
template <bool STAGED, class S, int RULE>
__global__ void __launch_bounds__(kSelThreads, STAGED ? 2 : 1)
select_rows(const __grid_constant__ SelectParams p) {
  const typename S::T* __restrict__ vals = static_cast<const typename S::T*>(p.vals);
  const float* __restrict__ lse = static_cast<const float*>(p.lse);
  int* __restrict__ counts = static_cast<int*>(p.counts);
  const int* __restrict__ offsets = static_cast<const int*>(p.offsets);
  int* __restrict__ out = static_cast<int*>(p.out);
  unsigned* __restrict__ bits = static_cast<unsigned*>(p.bits);
  const i64 ld = p.ld;
  const int kv_len = p.kv_len, rows_per_bh = p.rows_per_bh, slice_m = p.slice_m, band = p.band;
  const int rule = RULE >= 0 ? RULE : p.rule, k_keys = p.k_keys, min_keys = p.min_keys, max_keys = p.max_keys, words = p.words;
  const float tau = p.tau, thr = p.thr;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  unsigned* cnt = reinterpret_cast<unsigned*>(smem_raw);
  MassHist mass;
  mass.hi = cnt + kBins;
  mass.lo = mass.hi + kBins;
  Cands cand;
  cand.u = mass.lo + kBins;
  mass.fixed = lse != nullptr;
  cand.i = reinterpret_cast<int*>(cand.u + kCand);
  u16* staged_bins = reinterpret_cast<u16*>(cand.i + kCand);
  __shared__ SelScratch sc;

  const int tid = threadIdx.x;
  const int row = blockIdx.x;
  RowCtx<S> c;
  c.vals = vals + static_cast<i64>(row) * ld;
  c.bins = staged_bins;
  c.n = kv_len;
  c.logit = lse != nullptr;
  c.lse = c.logit ? lse[row] : 0.f;
  c.lse_bins = c.lse * kBinsPerLogit;
  const int per = keys_per_thread(kv_len);
  c.t0 = tid * per;
  c.t1 = min(kv_len, c.t0 + per);
  band_range(row % rows_per_bh, slice_m, band, kv_len, c.band_lo, c.band_hi);

  static_assert(RULE == -1 || RULE == kRule_topk, "a kernel of every rule, or of top-k");
  const bool tau_rule = rule == kRule_tau;
  const bool thr_rule = rule == kRule_threshold;
  const float v_thr = c.logit ? c.lse + thr : thr;
  const unsigned u_thr = thr_rule ? order_key(v_thr) : 0u;
  c.split_bin = -1;
  c.split_v = v_thr;
  if (thr_rule && v_thr == v_thr) {
    const int b = coarse_bin(c, v_thr);
    if (b < kBins - 1) c.split_bin = b;  // (bins past kBins - 1 do not exist: no split, search)
  }
  if (tid == 0) sc.split_bin = c.split_bin;
  unsigned above;
  if (tau_rule) {
    above = first_pass<STAGED, true, false>(c, staged_bins, cnt, mass, u_thr);
  } else if (thr_rule) {
    above = first_pass<STAGED, false, true>(c, staged_bins, cnt, mass, u_thr);
  } else {
    above = first_pass<STAGED, false, false>(c, staged_bins, cnt, mass, u_thr);
  }
  // Band keys (bin 0): kept in scratch for after the tau search, which reuses the histogram.
  if (tid == 0) sc.band_cnt = cnt[0];
  const unsigned n_all = static_cast<unsigned>(kv_len);
  // [lo, hi] clamp of the kept count (computed where used: fewer registers live over the search).
  auto clamp_keep = [&](unsigned n, unsigned band_cnt) {
    const unsigned lo = min(max(static_cast<unsigned>(max(min_keys, 0)), band_cnt), n_all);
    const unsigned hi = max(min(static_cast<unsigned>(max(max_keys, 0)), n_all), lo);
    return min(max(n, lo), hi);
  };

  Cut cut;
  bool have_cut = false, searched = false;
  unsigned n_keep;
  if (tau_rule) {
    unsigned dummy = 0u;
    float total = 0.f;
    for (int b = tid; b < kBins; b += kSelThreads) total += mass.f()[b];
    block_sum(dummy, total, sc);
    cut = search<STAGED>(c, cnt, mass, cand, true, 0u, tau * total * (1.f - kTauSlack), sc);
    searched = true;
    n_keep = clamp_keep(cut.n, sc.band_cnt);
    have_cut = n_keep == cut.n;
    if (!have_cut) recount<STAGED>(c, cnt);
  } else {
    unsigned n_above = thr_rule ? above : 0u;
    const int split_bin = sc.split_bin;  // (c.split_bin, read back: one register fewer over the search)
    if (thr_rule && split_bin >= 0) {
      // With a split, the keys at or above the threshold are the non-band keys of bins 1 ..
      // split_bin (the first pass counted them only without one).
      for (int b = 1 + tid; b <= split_bin; b += kSelThreads) n_above += cnt[b];
    }
    float unused = 0.f;
    if (thr_rule) block_sum(n_above, unused, sc);
    const unsigned band_cnt = cnt[0];
    const unsigned wanted = rule == kRule_topk ? static_cast<unsigned>(max(k_keys, 0)) : band_cnt + n_above;
    n_keep = clamp_keep(wanted, band_cnt);
    if (thr_rule && split_bin >= 0 && n_keep == wanted) {
      // Threshold, not clamped: the kept keys are the bins up to the split bin (no search).
      have_cut = true;
      cut.bin = split_bin + 1;
      cut.u = kBandKey;  // no key of bin split_bin + 1 is kept
      cut.i = kSplitCut;
      cut.n = n_keep;
    }
  }
  if (!have_cut) {
    if (n_keep == 0u) {
      cut.u = kBandKey;
      cut.i = -1;
      cut.bin = 0;
      cut.n = 0u;
    } else if (n_keep >= n_all) {
      cut.u = 0u;
      cut.i = kIntMax;
      cut.bin = kBins;
      cut.n = n_all;
    } else {
      cut = search<STAGED>(c, cnt, mass, cand, false, n_keep, 0.f, sc);  // cut.n == n_keep
      searched = true;
    }
  }
  if (tid == 0) counts[row] = static_cast<int>(cut.n);
  const bool decided = STAGED && searched && cut.bin > 0 && cut.bin < kBins;
  // Staged rows are then decided by bin alone: kept iff bin < keep_below (a searched cut's bin
  // is decided below, a threshold split keeps whole bins; otherwise the cut keeps the band or
  // nothing, or every key).
  const int keep_below =
      decided || cut.i == kSplitCut ? cut.bin : (cut.bin <= 0 ? (cut.i == kIntMax ? 1 : 0) : kBins);
  if (decided) {
    // Decide the gathered keys of the cut's bin once: kept -> bin 0, dropped -> above every bin,
    // so the output passes read no keys for them.
    const int nc = sc.gathered;
    auto decide = [&](int i, unsigned u) {
      *staged_ptr(staged_bins, i) = (u > cut.u || (u == cut.u && i <= cut.i)) ? 0 : kDroppedBin;
    };
    if (nc == kRowPass) {
      stream_bin<STAGED>(c, cut.bin, decide);
    } else {
      for (int p = tid; p < nc; p += kSelThreads) decide(cand.i[p], cand.u[p]);
    }
    __syncthreads();
  }

  if (bits == nullptr && offsets == nullptr) return;

  // ---- outputs: each thread its contiguous keys, 32 at a time ----
  auto kept = [&](int i0) -> unsigned {
    if constexpr (STAGED) {
      return kept_word_below(c.bins, i0, c.n, keep_below);
    } else {
      return kept_word(c, i0, cut);
    }
  };
  // The kept words are computed once and kept in the (now free) candidate buffer when they fit,
  // else computed again for the output pass.
  const int my_words = per / 32;
  const bool cached = my_words * kSelThreads <= kCand;
  unsigned* saved = cand.u + tid * my_words;
  unsigned mine = 0u;
  for (int i0 = c.t0, w = 0; i0 < c.t1; i0 += 32, ++w) {
    const unsigned m = kept(i0);
    mine += __popc(m);
    if (cached) saved[w] = m;
    if (bits != nullptr) bits[static_cast<i64>(row) * words + i0 / 32] = m;
  }
  if (offsets == nullptr) return;
  int* dst = out + offsets[row];
  // Warp w's keys are the words [w * 32 * my_words, (w + 1) * 32 * my_words), its threads' keys:
  // lane l takes word l of each group of 32, so every store of the warp is coalesced.
  const int lane = tid & 31, warp = tid >> 5;
  const unsigned warp_total = __reduce_add_sync(kFull, mine);
  if (lane == 0) sc.warp_u[warp] = warp_total;
  __syncthreads();
  unsigned run = 0u;
  for (int w = 0; w < warp; ++w) run += sc.warp_u[w];
  const int first_word = warp * 32 * my_words;
  const int row_words = (kv_len + 31) / 32;
  for (int g = 0; g < my_words; ++g) {
    const int word = first_word + 32 * g + lane;
    const unsigned x = word < row_words ? (cached ? cand.u[word] : kept(32 * word)) : 0u;
    run += warp_write_words(x, word - lane, run, cut.n, dst);
  }
}

// Bits of word w (keys 32w .. 32w+31) inside [lo, hi).
__device__ __forceinline__ unsigned range_bits(int w, int lo, int hi) {
  const int a = max(lo, 32 * w), b = min(hi, 32 * w + 32);
  if (a >= b) return 0u;
  const unsigned m = b - a == 32 ? kFull : ((1u << (b - a)) - 1u);
  return m << (a - 32 * w);
}

__global__ void __launch_bounds__(kEmitThreads)
emit_rows(const __grid_constant__ EmitParams p) {
  const unsigned* __restrict__ bits = static_cast<const unsigned*>(p.bits);
  int* __restrict__ counts = static_cast<int*>(p.counts);
  const int* __restrict__ offsets = static_cast<const int*>(p.offsets);
  int* __restrict__ out = static_cast<int*>(p.out);
  const int words = p.words, kv_len = p.kv_len, sub_rows = p.sub_rows, out_rows = p.out_rows;
  const int group = p.group, slice_m = p.slice_m, add_band = p.add_band;
  __shared__ unsigned warp_cnt[kEmitWarps];
  const int row = blockIdx.x;
  const int bh = row / out_rows;
  const int j = row - bh * out_rows;
  const unsigned* sub0 = bits + (static_cast<i64>(bh) * sub_rows + static_cast<i64>(j) * group) * words;
  const int nsub = min(group, sub_rows - j * group);
  int add_lo, add_hi;
  band_range(j, slice_m, add_band, kv_len, add_lo, add_hi);
  auto word = [&](int w) -> unsigned {
    unsigned x = range_bits(w, add_lo, add_hi);
    for (int s = 0; s < nsub; ++s) x |= __ldg(sub0 + static_cast<i64>(s) * words + w);
    return x;
  };
  count_or_write_row<kEmitThreads>(word, words, row, counts, offsets, out, warp_cnt);
}

}  // namespace fg
