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
//   error); then clamped to [max(min_keys, band), max_keys].
//   Search: a 2048-bin histogram of counts (and masses) over a monotone coarse key (1/32 logit
//   below the row's lse for logits, 1/32 octave for probabilities; bin 0 = band) picks the bin
//   holding the n-th key (or where the mass reaches tau). If that bin holds <= 1024 keys they
//   are gathered, sorted (bitonic) and the cut is read off exactly; otherwise the bin is refined
//   by 8-bit digits of the order key (at most four more histogram passes), and exact ties left
//   at the end are cut in index order by an ordered block scan.
// With STAGED the row's order keys are copied to shared memory once and every pass reads them
// there; otherwise each pass re-reads the row from global memory.
// If `offsets` is given (row sizes known beforehand: top-k), the CTA also writes the kept
// indices, ascending, at out + offsets[row].
//
// emit_rows counts (offsets == nullptr) or writes the kept keys of each output row: the union
// over `group` consecutive selected sub-rows, plus an optional diagonal band.
#include "common.cuh"

namespace fg {

constexpr int kSelThreads = 1024;
constexpr int kSelWarps = kSelThreads / 32;
constexpr int kBins = 2048;
constexpr int kDigitBins = 256;
constexpr int kCand = 1024;
constexpr float kBinsPerLogit = 32.f;
constexpr float kTauSlack = 1e-5f;  // "reaches tau" allows this relative float32 summation error
constexpr int kProbTop = 12257;  // (order_key(1.0f) >> 18) + 1: probability 1 falls in bin 1
constexpr unsigned kBandKey = 0xffffffffu;
constexpr unsigned kFull = 0xffffffffu;
constexpr int kIntMax = 0x7fffffff;
constexpr int kEmitThreads = 256;
constexpr int kEmitWarps = kEmitThreads / 32;
enum { kRuleTopK = 0, kRuleTau = 1, kRuleThreshold = 2 };

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

__device__ __forceinline__ unsigned lanemask_lt(int lane) { return (1u << lane) - 1u; }

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(kFull, x, off);
  return x;
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

struct RowCtx {
  const float* vals;        // the row in global memory
  const unsigned* staged;   // its order keys in shared memory (STAGED)
  int n;                    // keys in the row
  int band_lo, band_hi;     // keys ranked first
  bool logit;               // logits with a row lse, or probabilities
  float lse;
};

template <bool STAGED>
__device__ __forceinline__ unsigned raw_key(const RowCtx& c, int i) {
  if (STAGED) return c.staged[i];
  return order_key(__ldg(c.vals + i));
}

__device__ __forceinline__ bool in_band(const RowCtx& c, int i) { return i >= c.band_lo && i < c.band_hi; }

// Coarse bin (1 .. kBins-1, best first) of a non-band key: non-increasing in the key.
__device__ __forceinline__ int coarse_bin(const RowCtx& c, unsigned u) {
  if (u == 0u) return kBins - 1;
  if (c.logit) {
    const float t = fmaxf(c.lse - key_float(u), 0.f) * kBinsPerLogit;
    return 1 + static_cast<int>(fminf(t, static_cast<float>(kBins - 2)));
  }
  const int b = kProbTop - static_cast<int>(u >> 18);
  return min(max(b, 1), kBins - 1);
}

__device__ __forceinline__ float key_mass(const RowCtx& c, unsigned u) {
  if (u == 0u) return 0.f;
  const float v = key_float(u);
  return c.logit ? fast_exp2((v - c.lse) * 1.4426950408889634f) : fmaxf(v, 0.f);
}

struct SelScratch {
  unsigned warp_u[kSelWarps];
  float warp_f[kSelWarps];
  int best, last, bin, ncand, found;
  unsigned before_cnt, bin_cnt;
  float before_mass;
};

// Warp-collective histogram add: lanes sharing the first active lane's bin add once.
template <bool MASS>
__device__ __forceinline__ void hist_add(unsigned* cnt, float* mass, int bin, float m, bool active, int lane) {
  const unsigned act = __ballot_sync(kFull, active);
  if (act == 0u) return;
  const int leader = __ffs(act) - 1;
  const int lead_bin = __shfl_sync(kFull, bin, leader);
  const bool same = active && bin == lead_bin;
  const unsigned group = __ballot_sync(kFull, same);
  float group_mass = 0.f;
  if (MASS) group_mass = warp_sum(same ? m : 0.f);
  if (lane == leader) {
    atomicAdd(cnt + lead_bin, static_cast<unsigned>(__popc(group)));
    if (MASS) atomicAdd(mass + lead_bin, group_mass);
  }
  if (active && !same) {
    atomicAdd(cnt + bin, 1u);
    if (MASS) atomicAdd(mass + bin, m);
  }
}

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

// Level-0 histogram over the whole row (and, on the first pass, staging and threshold count).
template <bool STAGED, bool MASS, bool FIRST>
__device__ unsigned build_level0(RowCtx& c, unsigned* staged_out, unsigned* cnt, float* mass, unsigned u_thr,
                                 bool count_thr) {
  const int tid = threadIdx.x, lane = tid & 31;
  for (int b = tid; b < kBins; b += kSelThreads) {
    cnt[b] = 0u;
    mass[b] = 0.f;
  }
  __syncthreads();
  unsigned above_thr = 0u;
  if (FIRST) {
    // Vectorised read of the row (16-byte loads; the row stride is a multiple of 4 floats).
    const int nvec = (c.n + 3) >> 2;
    for (int base = 0; base < nvec; base += 4 * kSelThreads) {
      float4 x[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int f = base + j * kSelThreads + tid;
        if (f < nvec) {
          x[j] = __ldg(reinterpret_cast<const float4*>(c.vals) + f);
        } else {
          x[j].x = x[j].y = x[j].z = x[j].w = 0.f;
        }
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int f = base + j * kSelThreads + tid;
        const float xs[4] = {x[j].x, x[j].y, x[j].z, x[j].w};
        unsigned us[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = 4 * f + e;
          const bool active = f < nvec && i < c.n;
          const unsigned u = order_key(xs[e]);
          us[e] = u;
          const bool band = in_band(c, i);
          const int bin = band ? 0 : coarse_bin(c, u);
          hist_add<MASS>(cnt, mass, bin, MASS ? key_mass(c, u) : 0.f, active, lane);
          if (count_thr && active && !band && u >= u_thr) ++above_thr;
        }
        if (STAGED && f < nvec) {
          uint4 w;
          w.x = us[0];
          w.y = us[1];
          w.z = us[2];
          w.w = us[3];
          reinterpret_cast<uint4*>(staged_out)[f] = w;
        }
      }
    }
  } else {
    for (int i0 = 0; i0 < c.n; i0 += kSelThreads) {
      const int i = i0 + tid;
      const bool active = i < c.n;
      const unsigned u = active ? raw_key<STAGED>(c, i) : 0u;
      const int bin = in_band(c, i) ? 0 : coarse_bin(c, u);
      hist_add<MASS>(cnt, mass, bin, MASS ? key_mass(c, u) : 0.f, active, lane);
    }
  }
  __syncthreads();
  return above_thr;
}

// Keys inside the current search window: coarse bin `bin` and, once refined, order-key prefix.
template <bool STAGED>
__device__ __forceinline__ bool in_window(const RowCtx& c, int i, unsigned u, int bin, unsigned pfx, int pshift) {
  if (i >= c.n || in_band(c, i)) return false;
  if (coarse_bin(c, u) != bin) return false;
  return pshift >= 32 || (u >> pshift) == pfx;
}

struct Cut {
  unsigned u;
  int i;
  unsigned n;
};

// The first `need_cnt` keys (count mode) or the fewest first keys holding `need_mass`
// (mass mode). Requires the level-0 histogram; destroys it.
template <bool STAGED>
__device__ Cut search(const RowCtx& c, unsigned* cnt, float* mass, unsigned long long* cand, bool by_mass,
                      unsigned need_cnt, float need_mass, SelScratch& sc) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  find_bin(cnt, mass, kBins, by_mass, need_cnt, need_mass, sc);
  const int bin = sc.bin;
  unsigned before = sc.before_cnt;
  unsigned rem_cnt = need_cnt - min(need_cnt, before);
  float rem_mass = need_mass - sc.before_mass;
  unsigned window = sc.bin_cnt;
  Cut cut;
  if (bin == 0) {  // the band alone: it is always kept whole
    cut.u = kBandKey;
    cut.i = kIntMax;
    cut.n = window;
    return cut;
  }
  unsigned pfx = 0u;
  int pshift = 32;
  while (window > static_cast<unsigned>(kCand) && pshift > 0) {
    const int shift = pshift - 8;
    for (int b = tid; b < kDigitBins; b += kSelThreads) {
      cnt[b] = 0u;
      mass[b] = 0.f;
    }
    __syncthreads();
    for (int i0 = 0; i0 < c.n; i0 += kSelThreads) {
      const int i = i0 + tid;
      const unsigned u = i < c.n ? raw_key<STAGED>(c, i) : 0u;
      const bool act = in_window<STAGED>(c, i, u, bin, pfx, pshift);
      const int digit_bin = 255 - static_cast<int>((u >> shift) & 255u);
      if (by_mass) {
        hist_add<true>(cnt, mass, digit_bin, key_mass(c, u), act, lane);
      } else {
        hist_add<false>(cnt, mass, digit_bin, 0.f, act, lane);
      }
    }
    __syncthreads();
    find_bin(cnt, mass, kDigitBins, by_mass, rem_cnt, rem_mass, sc);
    const unsigned digit = 255u - static_cast<unsigned>(sc.bin);
    before += sc.before_cnt;
    rem_cnt -= min(rem_cnt, sc.before_cnt);
    rem_mass -= sc.before_mass;
    window = sc.bin_cnt;
    pfx = (pshift >= 32 ? 0u : (pfx << 8)) | digit;
    pshift = shift;
  }
  if (window == 0u) window = 1u;  // defensive: an empty window cannot happen for valid input
  unsigned take;
  if (window <= static_cast<unsigned>(kCand)) {
    // Gather the window's keys as (order key, inverted index) pairs and sort them descending.
    if (tid == 0) sc.ncand = 0;
    __syncthreads();
    for (int i0 = 0; i0 < c.n; i0 += kSelThreads) {
      const int i = i0 + tid;
      const unsigned u = i < c.n ? raw_key<STAGED>(c, i) : 0u;
      const bool act = in_window<STAGED>(c, i, u, bin, pfx, pshift);
      const unsigned bal = __ballot_sync(kFull, act);
      if (bal != 0u) {
        int base = 0;
        if (lane == 0) base = atomicAdd(&sc.ncand, __popc(bal));
        base = __shfl_sync(kFull, base, 0);
        const int pos = base + __popc(bal & lanemask_lt(lane));
        if (act && pos < kCand) {
          cand[pos] = (static_cast<unsigned long long>(u) << 32) | (0xffffffffu - static_cast<unsigned>(i));
        }
      }
    }
    __syncthreads();
    const int nc = min(sc.ncand, kCand);
    int size = 2;
    while (size < nc) size <<= 1;
    for (int p = nc + tid; p < size; p += kSelThreads) cand[p] = 0ull;
    __syncthreads();
    for (int span = 2; span <= size; span <<= 1) {
      for (int stride = span >> 1; stride > 0; stride >>= 1) {
        for (int t = tid; t < size / 2; t += kSelThreads) {
          const int lo = 2 * t - (t & (stride - 1));
          const int hi = lo + stride;
          const bool desc = (lo & span) == 0;
          const unsigned long long a = cand[lo], b = cand[hi];
          if ((a < b) == desc) {
            cand[lo] = b;
            cand[hi] = a;
          }
        }
        __syncthreads();
      }
    }
    int pick;
    if (by_mass) {
      // Running mass over the sorted window; the cut is the first key reaching rem_mass.
      const int p0 = 2 * tid;
      const float m0 = p0 < nc ? key_mass(c, static_cast<unsigned>(cand[p0] >> 32)) : 0.f;
      const float m1 = p0 + 1 < nc ? key_mass(c, static_cast<unsigned>(cand[p0 + 1] >> 32)) : 0.f;
      unsigned ex_u;
      float ex_m;
      if (tid == 0) sc.best = kIntMax;
      block_exscan(0u, m0 + m1, ex_u, ex_m, sc);
      int mine = kIntMax;
      if (p0 < nc && ex_m + m0 >= rem_mass) {
        mine = p0;
      } else if (p0 + 1 < nc && ex_m + m0 + m1 >= rem_mass) {
        mine = p0 + 1;
      }
      if (mine != kIntMax) atomicMin(&sc.best, mine);
      __syncthreads();
      pick = sc.best == kIntMax ? nc - 1 : sc.best;
    } else {
      pick = static_cast<int>(min(max(rem_cnt, 1u), static_cast<unsigned>(nc))) - 1;
    }
    const unsigned long long chosen = cand[pick];
    cut.u = static_cast<unsigned>(chosen >> 32);
    cut.i = static_cast<int>(0xffffffffu - static_cast<unsigned>(chosen & 0xffffffffull));
    take = static_cast<unsigned>(pick + 1);
    __syncthreads();
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
      unsigned running = 0u;
      for (int i0 = 0; i0 < c.n; i0 += kSelThreads) {
        const int i = i0 + tid;
        const bool tie = i < c.n && !in_band(c, i) && raw_key<STAGED>(c, i) == pfx;
        const unsigned bal = __ballot_sync(kFull, tie);
        if (lane == 0) sc.warp_u[warp] = static_cast<unsigned>(__popc(bal));
        __syncthreads();
        unsigned before_w = 0u, total = 0u;
        for (int w = 0; w < kSelWarps; ++w) {
          const unsigned x = sc.warp_u[w];
          if (w < warp) before_w += x;
          total += x;
        }
        const unsigned rank = running + before_w + static_cast<unsigned>(__popc(bal & lanemask_lt(lane)));
        if (tie && rank + 1u == take) sc.found = i;
        running += total;
        __syncthreads();
        if (running >= take) break;
      }
      cut.i = sc.found;
      __syncthreads();
    }
  }
  cut.n = before + take;
  return cut;
}

template <bool STAGED>
__device__ __forceinline__ bool kept(const RowCtx& c, int i, unsigned cu, int ci) {
  const unsigned u = in_band(c, i) ? kBandKey : raw_key<STAGED>(c, i);
  return u > cu || (u == cu && i <= ci);
}

template <bool STAGED>
__global__ void __launch_bounds__(kSelThreads, 1)
select_rows(const float* __restrict__ vals, i64 ld, const float* __restrict__ lse, int kv_len, int rows_per_bh,
            int slice_m, int band, int rule, int k_keys, float tau, float thr, int min_keys, int max_keys,
            unsigned* __restrict__ thr_u, int* __restrict__ thr_i, int* __restrict__ counts,
            const int* __restrict__ offsets, int* __restrict__ out) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  unsigned* cnt = reinterpret_cast<unsigned*>(smem_raw);
  float* mass = reinterpret_cast<float*>(cnt + kBins);
  unsigned long long* cand = reinterpret_cast<unsigned long long*>(mass + kBins);
  unsigned* staged = reinterpret_cast<unsigned*>(cand + kCand);
  __shared__ SelScratch sc;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int row = blockIdx.x;
  RowCtx c;
  c.vals = vals + static_cast<i64>(row) * ld;
  c.staged = staged;
  c.n = kv_len;
  c.logit = lse != nullptr;
  c.lse = c.logit ? lse[row] : 0.f;
  band_range(row % rows_per_bh, slice_m, band, kv_len, c.band_lo, c.band_hi);

  const bool tau_rule = rule == kRuleTau;
  const bool thr_rule = rule == kRuleThreshold;
  const unsigned u_thr = thr_rule ? order_key(c.logit ? c.lse + thr : thr) : 0u;
  unsigned above;
  if (tau_rule) {
    above = build_level0<STAGED, true, true>(c, staged, cnt, mass, u_thr, false);
  } else {
    above = build_level0<STAGED, false, true>(c, staged, cnt, mass, u_thr, thr_rule);
  }
  const unsigned band_cnt = cnt[0];
  const unsigned n_all = static_cast<unsigned>(kv_len);
  const unsigned lo = min(max(static_cast<unsigned>(max(min_keys, 0)), band_cnt), n_all);
  const unsigned hi = max(min(static_cast<unsigned>(max(max_keys, 0)), n_all), lo);

  Cut cut;
  bool have_cut = false;
  unsigned n_keep;
  if (tau_rule) {
    unsigned dummy = 0u;
    float total = 0.f;
    for (int b = tid; b < kBins; b += kSelThreads) total += mass[b];
    block_sum(dummy, total, sc);
    cut = search<STAGED>(c, cnt, mass, cand, true, 0u, tau * total * (1.f - kTauSlack), sc);
    n_keep = min(max(cut.n, lo), hi);
    have_cut = n_keep == cut.n;
    if (!have_cut) build_level0<STAGED, false, false>(c, staged, cnt, mass, 0u, false);
  } else {
    unsigned dummy_f_u = thr_rule ? above : 0u;
    float dummy_f = 0.f;
    if (thr_rule) block_sum(dummy_f_u, dummy_f, sc);
    const unsigned wanted = rule == kRuleTopK ? static_cast<unsigned>(max(k_keys, 0)) : band_cnt + dummy_f_u;
    n_keep = min(max(wanted, lo), hi);
  }
  if (!have_cut) {
    if (n_keep == 0u) {
      cut.u = kBandKey;
      cut.i = -1;
    } else if (n_keep >= n_all) {
      cut.u = 0u;
      cut.i = kIntMax;
    } else {
      cut = search<STAGED>(c, cnt, mass, cand, false, n_keep, 0.f, sc);
    }
    cut.n = n_keep;
  }
  if (tid == 0) {
    thr_u[row] = cut.u;
    thr_i[row] = cut.i;
    counts[row] = static_cast<int>(cut.n);
  }
  if (offsets == nullptr) return;

  // ---- fused emit: warp w writes its contiguous segment of keys in order ----
  int* dst = out + offsets[row];
  const int seg = ((kv_len + kSelWarps - 1) / kSelWarps + 31) & ~31;
  const int ws = warp * seg;
  const int we = min(kv_len, ws + seg);
  unsigned mine = 0u;
  for (int i0 = ws; i0 < we; i0 += 32) {
    const int i = i0 + lane;
    mine += __popc(__ballot_sync(kFull, i < we && kept<STAGED>(c, i, cut.u, cut.i)));
  }
  __syncthreads();
  if (lane == 0) sc.warp_u[warp] = mine;
  __syncthreads();
  unsigned run = 0u;
  for (int w = 0; w < warp; ++w) run += sc.warp_u[w];
  for (int i0 = ws; i0 < we; i0 += 32) {
    const int i = i0 + lane;
    const bool f = i < we && kept<STAGED>(c, i, cut.u, cut.i);
    const unsigned bal = __ballot_sync(kFull, f);
    const unsigned pos = run + __popc(bal & lanemask_lt(lane));
    if (f && pos < cut.n) dst[pos] = i;
    run += __popc(bal);
  }
}

__global__ void __launch_bounds__(kEmitThreads)
emit_rows(const float* __restrict__ vals, i64 ld, int kv_len, int sub_rows, int out_rows, int group, int slice_m,
          int sel_band, int add_band, const unsigned* __restrict__ thr_u, const int* __restrict__ thr_i,
          int* __restrict__ counts, const int* __restrict__ offsets, int* __restrict__ out) {
  __shared__ unsigned warp_cnt[kEmitWarps];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int row = blockIdx.x;
  const int bh = row / out_rows;
  const int j = row - bh * out_rows;
  const int sub0 = bh * sub_rows + j * group;
  const int nsub = min(group, sub_rows - j * group);
  int sel_lo, sel_hi, add_lo, add_hi;
  band_range(j, slice_m, sel_band, kv_len, sel_lo, sel_hi);
  band_range(j, slice_m, add_band, kv_len, add_lo, add_hi);

  auto keep = [&](int i) -> bool {
    if (i >= add_lo && i < add_hi) return true;
    const bool band = i >= sel_lo && i < sel_hi;
    for (int s = 0; s < nsub; ++s) {
      const int r = sub0 + s;
      const unsigned u = band ? kBandKey : order_key(__ldg(vals + static_cast<i64>(r) * ld + i));
      const unsigned cu = __ldg(thr_u + r);
      if (u > cu || (u == cu && i <= __ldg(thr_i + r))) return true;
    }
    return false;
  };

  const int seg = ((kv_len + kEmitWarps - 1) / kEmitWarps + 31) & ~31;
  const int ws = warp * seg;
  const int we = min(kv_len, ws + seg);
  unsigned mine = 0u;
  for (int i0 = ws; i0 < we; i0 += 32) {
    const int i = i0 + lane;
    mine += __popc(__ballot_sync(kFull, i < we && keep(i)));
  }
  if (lane == 0) warp_cnt[warp] = mine;
  __syncthreads();
  if (offsets == nullptr) {
    if (tid == 0) {
      unsigned total = 0u;
      for (int w = 0; w < kEmitWarps; ++w) total += warp_cnt[w];
      counts[row] = static_cast<int>(total);
    }
    return;
  }
  unsigned run = 0u;
  for (int w = 0; w < warp; ++w) run += warp_cnt[w];
  const unsigned limit = static_cast<unsigned>(max(counts[row], 0));
  int* dst = out + offsets[row];
  for (int i0 = ws; i0 < we; i0 += 32) {
    const int i = i0 + lane;
    const bool f = i < we && keep(i);
    const unsigned bal = __ballot_sync(kFull, f);
    const unsigned pos = run + __popc(bal & lanemask_lt(lane));
    if (f && pos < limit) dst[pos] = i;
    run += __popc(bal);
  }
}

}  // namespace fg
