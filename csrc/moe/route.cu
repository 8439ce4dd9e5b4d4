// MoE routing and the expert-major permutation on the GPU (forward only):
// the kernels behind frontiers_fast::moe_route and moe_permute's "cuda"
// backend.  The semantics are those of frontiers_fast/reference/moe.py and
// of the C++ CPU kernels (moe_cpu.cpp); the interface is in route.cuh.
//
// Routing: one warp per token row.  The row's E selection scores live in
// the warp's slice of shared memory (dynamic, sized by E), so every pass
// over them is a lane-strided loop and every choice a warp-wide arg-max:
//   1. read the logits (NaN and +inf flag the row; -inf masks an expert)
//      and their maximum;
//   2. the softmax sum (skipped for sigmoid scoring);
//   3. choice[e] = score(e) + bias[e], or -inf for a masked expert;
//   4. with grouping, each group's score (top-2 sum with a bias, else max)
//      by a sub-warp reduction, topk_group rounds of arg-max over the
//      groups, and -inf for the experts of every group left out;
//   5. top_k rounds of arg-max over the choice: a picked expert is marked
//      with a NaN of a private bit pattern, which no score can take, and its
//      weight is its unbiased score, recomputed from its logit by the same
//      expression as in step 3.
// The arg-max keeps the larger value and, among equal ones, the lower index,
// in every lane's own scan (ascending e, strict >) and in the butterfly
// combine, so ties go to the lowest expert id, as the reference's stable
// sort has it; it runs k times over E/32 elements per lane, which for the
// k <= 8, E <= 256 of the models served is cheaper than a sort.  Every
// warp-wide reduction is an XOR butterfly of commutative operations, so all
// lanes hold bit-identical results and the control flow stays warp-uniform.
//
// Permutation: a stable counting sort of the N = T*k pair ids, in tiles of
// kPermuteTile pairs (one per thread).
//   A. rank: each pair's rank among the earlier pairs of its tile with the
//      same expert (a scan of the tile's ids in shared memory), and the
//      tile's count of each expert it holds (written by its first pair);
//   B. per expert, an exclusive scan of its counts over the tiles (the pairs
//      of that expert in earlier tiles) and its total;
//   C. one block: offsets = the exclusive scan of the totals;
//   D. place: row = offsets[e] + (pairs of e in earlier tiles) + rank, then
//      the tile's rows are copied, a warp per row, in 16-byte units when the
//      row sizes and pointers allow.
// Positions are pure functions of the ids (no atomics, no order of
// arrival), so the permutation is deterministic and stable: tokens ascend
// within an expert.  Integer atomics only gather the ids' minimum and
// maximum into the status, which is order-independent.
//
// Every index product is formed in int64 (rows, tokens and experts are
// widened before they multiply a stride): T*k*H may exceed 2^31.

#include <cstdint>

#include "moe/route.cuh"

namespace frontiers_fast {
namespace moe {
namespace {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int64_t kMaxGrid = 2147483647;
constexpr double kRenormEps = 1e-20;  // reference.RENORM_EPS

// ---------------------------------------------------------------------------
// scalar helpers
// ---------------------------------------------------------------------------
template <typename scalar_t>
struct Io;

template <>
struct Io<float> {
  static __device__ __forceinline__ float load(float v) { return v; }
};
template <>
struct Io<double> {
  static __device__ __forceinline__ double load(double v) { return v; }
};
template <>
struct Io<__half> {
  static __device__ __forceinline__ float load(__half v) { return __half2float(v); }
};
template <>
struct Io<__nv_bfloat16> {
  static __device__ __forceinline__ float load(__nv_bfloat16 v) { return __bfloat162float(v); }
};

// Limits and the "picked" marker of the score type, spelled as bits so that
// no compiler flag (--use_fast_math) can change how they compare.
template <typename A>
struct Bits;

template <>
struct Bits<float> {
  static __device__ __forceinline__ float inf() { return __int_as_float(0x7f800000); }
  static __device__ __forceinline__ float max_finite() { return __int_as_float(0x7f7fffff); }
  static __device__ __forceinline__ float nan() { return __int_as_float(0x7fc00000); }
  static __device__ __forceinline__ float picked() { return __int_as_float(static_cast<int>(0xffc0de01u)); }
  static __device__ __forceinline__ bool is_picked(float v) { return __float_as_uint(v) == 0xffc0de01u; }
};

template <>
struct Bits<double> {
  static __device__ __forceinline__ double inf() { return __longlong_as_double(0x7ff0000000000000ll); }
  static __device__ __forceinline__ double max_finite() { return __longlong_as_double(0x7fefffffffffffffll); }
  static __device__ __forceinline__ double nan() { return __longlong_as_double(0x7ff8000000000000ll); }
  static __device__ __forceinline__ double picked() {
    return __longlong_as_double(static_cast<long long>(0xfff8c0de00000001ull));
  }
  static __device__ __forceinline__ bool is_picked(double v) {
    return static_cast<unsigned long long>(__double_as_longlong(v)) == 0xfff8c0de00000001ull;
  }
};

// exp, reciprocal and division in the score type.
//
// setup.py builds with --use_fast_math, which turns expf into exp2 of the
// rounded product x * log2(e): its error grows with |x| (4e-6 relative at
// |x| = 80, 1e-6 at the |l - max| of a typical softmax row), and a router
// that ranks scores wants them as close to the float64 truth as float
// allows.  So x * log2(e) = n + r is formed with a two-part log2(e) and
// fma, and only 2^r (|r| <= 1/2, where the hardware exp2 is within 2 ulp)
// is left to the fast path: about 3 ulp at any x, for four more
// instructions.  Below -104 the result is 0 (float flushes it anyway), which
// also covers the -inf of a masked expert.  '/' would also become an
// approximation; the reciprocal and the renormalisation ask for the
// correctly rounded ones, as the C++ kernels compute them.
__device__ __forceinline__ float exp_acc(float x) {
  constexpr float kLog2eHi = 1.44269502163f;          // log2(e) rounded to float
  constexpr float kLog2eLo = 1.925963033500011e-08f;  // log2(e) - kLog2eHi
  if (!(x > -104.0f)) return 0.0f;
  if (x > 89.0f) return Bits<float>::inf();
  const float n = rintf(x * kLog2eHi);
  float r = fmaf(x, kLog2eHi, -n);
  r = fmaf(x, kLog2eLo, r);
  return ldexpf(exp2f(r), static_cast<int>(n));
}
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float rcp(float x) { return __frcp_rn(x); }
__device__ __forceinline__ double rcp(double x) { return 1.0 / x; }
__device__ __forceinline__ float divide(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double divide(double a, double b) { return a / b; }
// A product and a sum that are never fused into one fma (--fmad=true would
// contract score * inv + bias): each rounds once, as the reference's
// separate tensor ops do, so choice = round(score) + bias exactly.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }

template <typename A>
__device__ __forceinline__ A warp_max(A v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) {
    const A o = __shfl_xor_sync(kFullMask, v, off);
    v = o > v ? o : v;
  }
  return v;
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

// The larger of two (value, index) candidates, the lower index among equal
// values; index -1 is "none".
template <typename A>
__device__ __forceinline__ void better(A& v, int& i, A ov, int oi) {
  if (oi < 0) return;
  if (i < 0 || ov > v || (ov == v && oi < i)) {
    v = ov;
    i = oi;
  }
}

// The arg-max of vals[0..n) over the entries not marked picked, ties to the
// lowest index, in every lane.  Returns -1 only when every entry is picked.
template <typename A>
__device__ __forceinline__ int warp_argmax(const A* vals, int n, int lane, A& best) {
  A v = -Bits<A>::inf();
  int i = -1;
  for (int e = lane; e < n; e += kWarp) {
    const A x = vals[e];
    if (!Bits<A>::is_picked(x) && (i < 0 || x > v)) {
      v = x;
      i = e;
    }
  }
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) {
    const A ov = __shfl_xor_sync(kFullMask, v, off);
    const int oi = __shfl_xor_sync(kFullMask, i, off);
    better(v, i, ov, oi);
  }
  best = v;
  return i;
}

// ---------------------------------------------------------------------------
// routing
// ---------------------------------------------------------------------------
constexpr int kRouteWarps = 4;  // rows per block when E is small; fewer when the staging does not fit
constexpr size_t kRouteSmemBudget = 48 * 1024;  // the dynamic shared memory a launch gets without opting in

template <typename scalar_t>
struct RouteParams {
  using A = typename RouteAcc<scalar_t>::type;
  const scalar_t* logits;
  int64_t row_stride;
  int64_t T;
  int E;
  int k;
  bool softmax;
  bool renormalize;
  const A* bias;
  int n_group;  // 0: no grouping
  int topk_group;
  A scaling;
  A* weights;
  int32_t* ids;
  unsigned long long* status;
  int warps;       // rows per block
  int warp_slots;  // A slots of shared memory per warp: E choices, then n_group group scores
};

__global__ void init_status_kernel(unsigned long long* status, unsigned long long first, unsigned long long second) {
  status[0] = first;
  status[1] = second;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kRouteWarps* kWarp) moe_route_kernel(const RouteParams<scalar_t> p) {
  using A = typename RouteAcc<scalar_t>::type;
  using B = Bits<A>;
  extern __shared__ __align__(16) unsigned char route_smem[];
  const int lane = static_cast<int>(threadIdx.x) % kWarp;
  const int warp = static_cast<int>(threadIdx.x) / kWarp;
  A* choice = reinterpret_cast<A*>(route_smem) + static_cast<int64_t>(warp) * p.warp_slots;
  A* gscore = choice + p.E;
  const A ninf = -B::inf();
  const int E = p.E;
  const int k = p.k;

  // The bias is checked once (its flag is the caller's error); a non-finite
  // entry counts as 0 here, so no choice can become NaN or +inf.
  if (p.bias != nullptr && blockIdx.x == 0 && warp == 0) {
    bool bad = false;
    for (int e = lane; e < E; e += kWarp) bad |= !(fabs(p.bias[e]) <= B::max_finite());
    if (__any_sync(kFullMask, bad) && lane == 0) atomicOr(&p.status[kRouteFlags], kRouteBadBias);
  }

  for (int64_t row = static_cast<int64_t>(blockIdx.x) * p.warps + warp; row < p.T;
       row += static_cast<int64_t>(gridDim.x) * p.warps) {
    const scalar_t* l_row = p.logits + row * p.row_stride;
    A* w_row = p.weights + row * k;
    int32_t* id_row = p.ids + row * k;

    // 1. the logits into the staging, their maximum, and what the row holds
    A m = ninf;
    bool bad = false, selectable = false;
    for (int e = lane; e < E; e += kWarp) {
      const A l = Io<scalar_t>::load(l_row[e]);
      choice[e] = l;
      bad |= !(l <= B::max_finite()) && l != ninf;  // NaN or +inf
      selectable |= l != ninf;
      m = l > m ? l : m;
    }
    bad = __any_sync(kFullMask, bad);
    selectable = __any_sync(kFullMask, selectable);
    if (bad || !selectable) {
      // Nothing can be ranked: flag the row, and leave ids in range.
      for (int j = lane; j < k; j += kWarp) {
        id_row[j] = j;
        w_row[j] = B::nan();
      }
      if (lane == 0) {
        if (bad) {
          atomicOr(&p.status[kRouteFlags], kRouteBadLogit);
        } else {
          atomicMin(&p.status[kRouteBadRow], static_cast<unsigned long long>(row));
        }
      }
      __syncwarp();
      continue;
    }
    m = warp_max(m);

    // 2. the softmax normaliser
    A inv = A(1);
    if (p.softmax) {
      A sum = A(0);
      for (int e = lane; e < E; e += kWarp) sum += exp_acc(choice[e] - m);
      inv = rcp(warp_sum(sum));
    }
    // The router score of a logit, one expression for the choice (step 3)
    // and for the weight (step 5), so a weight is bit for bit the score its
    // expert was chosen on.
    auto score = [&](A l) { return p.softmax ? mul_rn(exp_acc(l - m), inv) : rcp(A(1) + exp_acc(-l)); };

    // 3. the selection values
    for (int e = lane; e < E; e += kWarp) {
      const A l = choice[e];
      A c = score(l);
      if (p.bias != nullptr) {
        const A b = p.bias[e];
        c = add_rn(c, fabs(b) <= B::max_finite() ? b : A(0));
      }
      choice[e] = l == ninf ? ninf : c;
    }
    __syncwarp();

    // 4. the group filter
    if (p.n_group > 0) {
      const int G = p.n_group;
      const int per = E / G;
      const bool top2 = p.bias != nullptr && per >= 2;
      // Sub-warps of `width` lanes (a power of two) each reduce one group.
      int width = 1;
      while (width < per && width < kWarp) width *= 2;
      const int per_pass = kWarp / width;
      for (int q0 = 0; q0 < G; q0 += per_pass) {
        const int q = q0 + lane / width;
        A a = ninf, b = ninf;  // the group's best and second best
        if (q < G) {
          const A* cq = choice + static_cast<int64_t>(q) * per;
          for (int i = lane % width; i < per; i += width) {
            const A v = cq[i];
            if (v > a) {
              b = a;
              a = v;
            } else if (v > b) {
              b = v;
            }
          }
        }
        for (int off = width / 2; off > 0; off /= 2) {
          const A oa = __shfl_xor_sync(kFullMask, a, off);
          const A ob = __shfl_xor_sync(kFullMask, b, off);
          const A lo = a < oa ? a : oa;
          const A hi_b = b > ob ? b : ob;
          a = a > oa ? a : oa;
          b = lo > hi_b ? lo : hi_b;
        }
        if (q < G && lane % width == 0) gscore[q] = top2 ? a + b : a;
      }
      __syncwarp();
      for (int j = 0; j < p.topk_group; ++j) {
        A best;
        const int g = warp_argmax(gscore, G, lane, best);
        if (lane == 0 && g >= 0) gscore[g] = B::picked();
        __syncwarp();
      }
      for (int e = lane; e < E; e += kWarp) {
        if (!B::is_picked(gscore[e / per])) choice[e] = ninf;
      }
      __syncwarp();
    }

    // 5. top-k, best first; the weights unnormalised for now
    A sum = A(0);
    bool short_row = false;
    for (int j = 0; j < k; ++j) {
      A best;
      int e = warp_argmax(choice, E, lane, best);
      e = e < 0 ? 0 : e;  // cannot happen (k <= E): keeps a broken call in bounds
      short_row |= best == ninf;
      const A s = score(Io<scalar_t>::load(l_row[e]));
      sum += s;
      if (lane == 0) {
        choice[e] = B::picked();
        id_row[j] = e;
        w_row[j] = s;
      }
      __syncwarp();
    }
    if (short_row && lane == 0) atomicMin(&p.status[kRouteBadRow], static_cast<unsigned long long>(row));
    const A den = sum + A(kRenormEps);
    for (int j = lane; j < k; j += kWarp) {
      const A w = w_row[j];
      w_row[j] = (p.renormalize ? divide(w, den) : w) * p.scaling;
    }
    __syncwarp();
  }
}

// ---------------------------------------------------------------------------
// permutation
// ---------------------------------------------------------------------------
constexpr int kPermuteTile = 256;  // pairs per tile = threads per block of kernels A and D
constexpr int kScanWarps = 8;      // experts per block of kernel B
constexpr int kOffsetsThreads = 1024;
constexpr unsigned long long kSignBit = 1ull << 63;

size_t align16(size_t n) { return (n + 15) / 16 * 16; }

int64_t tiles_of(int64_t n_pairs) { return (n_pairs + kPermuteTile - 1) / kPermuteTile; }

struct Workspace {
  int64_t* counts;  // [E, n_tiles]: counts, then (after B) the pairs of e in earlier tiles
  int64_t* totals;  // [E]
  int32_t* key;     // [N]: the pair's expert, -1 when out of range
  int32_t* rank;    // [N]: earlier pairs of the same expert in the tile
};

Workspace carve(void* base, int64_t n_pairs, int64_t E) {
  unsigned char* p = static_cast<unsigned char*>(base);
  Workspace w;
  const size_t n_counts = static_cast<size_t>(E) * static_cast<size_t>(tiles_of(n_pairs));
  w.counts = reinterpret_cast<int64_t*>(p);
  p += align16(n_counts * sizeof(int64_t));
  w.totals = reinterpret_cast<int64_t*>(p);
  p += align16(static_cast<size_t>(E) * sizeof(int64_t));
  w.key = reinterpret_cast<int32_t*>(p);
  p += align16(static_cast<size_t>(n_pairs) * sizeof(int32_t));
  w.rank = reinterpret_cast<int32_t*>(p);
  return w;
}

template <typename T>
__device__ __forceinline__ T warp_inclusive_scan(T v, int lane) {
#pragma unroll
  for (int off = 1; off < kWarp; off *= 2) {
    const T o = __shfl_up_sync(kFullMask, v, off);
    if (lane >= off) v += o;
  }
  return v;
}

// A. in-tile ranks and per-tile counts; the ids' range into the status.
template <typename id_t>
__global__ void __launch_bounds__(kPermuteTile)
    permute_rank_kernel(const id_t* __restrict__ ids, int64_t N, int64_t E, int64_t n_tiles, Workspace ws,
                        unsigned long long* status) {
  __shared__ __align__(16) int32_t tile_keys[kPermuteTile];
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid % kWarp;
  for (int64_t tile = blockIdx.x; tile < n_tiles; tile += gridDim.x) {
    const int64_t n = tile * kPermuteTile + tid;
    int32_t key = -1;
    unsigned long long lo = ~0ull, hi = 0ull;  // the id's bits XOR the sign bit: unsigned order is signed order
    if (n < N) {
      const int64_t v = static_cast<int64_t>(ids[n]);
      lo = hi = static_cast<unsigned long long>(v) ^ kSignBit;
      key = v >= 0 && v < E ? static_cast<int32_t>(v) : -1;
    }
    tile_keys[tid] = key;
    __syncthreads();
    if (key >= 0) {
      int before = 0, same = 0;
      const int4* k4 = reinterpret_cast<const int4*>(tile_keys);
#pragma unroll 4
      for (int i = 0; i < kPermuteTile / 4; ++i) {
        const int4 q = k4[i];  // every thread reads the same address: a broadcast
        const int base = 4 * i;
        const int m0 = q.x == key, m1 = q.y == key, m2 = q.z == key, m3 = q.w == key;
        same += m0 + m1 + m2 + m3;
        before += (m0 & (base < tid)) + (m1 & (base + 1 < tid)) + (m2 & (base + 2 < tid)) + (m3 & (base + 3 < tid));
      }
      ws.rank[n] = before;
      if (before == 0) ws.counts[static_cast<int64_t>(key) * n_tiles + tile] = same;
    }
    if (n < N) ws.key[n] = key;
#pragma unroll
    for (int off = kWarp / 2; off > 0; off /= 2) {
      const unsigned long long olo = __shfl_xor_sync(kFullMask, lo, off);
      const unsigned long long ohi = __shfl_xor_sync(kFullMask, hi, off);
      lo = olo < lo ? olo : lo;
      hi = ohi > hi ? ohi : hi;
    }
    if (lane == 0 && lo != ~0ull) {
      atomicMin(&status[kPermuteMinId], lo);
      atomicMax(&status[kPermuteMaxId], hi);
    }
    __syncthreads();  // the next tile reuses tile_keys
  }
}

// B. per expert, counts over the tiles -> exclusive prefix in place; totals.
__global__ void __launch_bounds__(kScanWarps* kWarp)
    permute_tile_scan_kernel(int64_t E, int64_t n_tiles, Workspace ws) {
  const int lane = static_cast<int>(threadIdx.x) % kWarp;
  const int warp = static_cast<int>(threadIdx.x) / kWarp;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kScanWarps + warp; e < E;
       e += static_cast<int64_t>(gridDim.x) * kScanWarps) {
    int64_t* c = ws.counts + e * n_tiles;
    int64_t carry = 0;
    for (int64_t b0 = 0; b0 < n_tiles; b0 += kWarp) {
      const int64_t b = b0 + lane;
      const int64_t v = b < n_tiles ? c[b] : 0;
      const int64_t inc = warp_inclusive_scan(v, lane);
      if (b < n_tiles) c[b] = carry + inc - v;
      carry += __shfl_sync(kFullMask, inc, kWarp - 1);
    }
    if (lane == 0) ws.totals[e] = carry;
  }
}

// C. offsets[0] = 0, offsets[e + 1] = totals[0] + ... + totals[e]: one block.
__global__ void __launch_bounds__(kOffsetsThreads)
    permute_offsets_kernel(int64_t E, Workspace ws, int64_t* __restrict__ offsets) {
  __shared__ int64_t warp_totals[kOffsetsThreads / kWarp];
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid % kWarp;
  const int warp = tid / kWarp;
  if (tid == 0) offsets[0] = 0;
  int64_t carry = 0;
  for (int64_t e0 = 0; e0 < E; e0 += kOffsetsThreads) {
    const int64_t e = e0 + tid;
    const int64_t v = e < E ? ws.totals[e] : 0;
    int64_t inc = warp_inclusive_scan(v, lane);
    if (lane == kWarp - 1) warp_totals[warp] = inc;
    __syncthreads();
    if (warp == 0) {
      const int64_t t = warp_totals[lane];
      warp_totals[lane] = warp_inclusive_scan(t, lane);
    }
    __syncthreads();
    if (warp > 0) inc += warp_totals[warp - 1];
    if (e < E) offsets[e + 1] = carry + inc;
    carry += warp_totals[kOffsetsThreads / kWarp - 1];
    __syncthreads();  // warp_totals is rewritten by the next chunk
  }
}

// D. every pair's row, row_map, and the row copies (unit_t: the widest
// load/store the pointers, the row stride and the row size all allow).
template <typename unit_t>
__global__ void __launch_bounds__(kPermuteTile)
    permute_place_kernel(const unsigned char* __restrict__ x, int64_t x_row_stride, int64_t row_units,
                         int64_t N, int64_t k, int64_t n_tiles, Workspace ws, const int64_t* __restrict__ offsets,
                         unsigned char* __restrict__ x_perm, int64_t* __restrict__ row_map) {
  __shared__ int64_t dst_row[kPermuteTile];
  __shared__ int64_t src_token[kPermuteTile];
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid % kWarp;
  const int warp = tid / kWarp;
  constexpr int kWarps = kPermuteTile / kWarp;
  for (int64_t tile = blockIdx.x; tile < n_tiles; tile += gridDim.x) {
    const int64_t n = tile * kPermuteTile + tid;
    int64_t row = -1;
    if (n < N) {
      const int32_t key = ws.key[n];
      if (key >= 0) {
        row = offsets[key] + ws.counts[static_cast<int64_t>(key) * n_tiles + tile] + ws.rank[n];
        row_map[n] = row;
      }
    }
    dst_row[tid] = row;
    src_token[tid] = n / k;
    __syncthreads();
    for (int i = warp; i < kPermuteTile; i += kWarps) {
      const int64_t r = dst_row[i];
      if (r < 0) continue;  // warp-uniform: one pair per warp at a time
      const unit_t* src = reinterpret_cast<const unit_t*>(x + src_token[i] * x_row_stride);
      unit_t* dst = reinterpret_cast<unit_t*>(x_perm) + r * row_units;
      for (int64_t u = lane; u < row_units; u += kWarp) dst[u] = src[u];
    }
    __syncthreads();  // the next tile reuses dst_row and src_token
  }
}

unsigned grid_of(int64_t blocks) { return static_cast<unsigned>(blocks < kMaxGrid ? blocks : kMaxGrid); }

template <typename unit_t>
cudaError_t launch_place(const void* x, int64_t x_row_stride, int64_t row_bytes, int64_t N, int64_t k,
                         int64_t n_tiles, const Workspace& ws, const int64_t* offsets, void* x_perm,
                         int64_t* row_map, cudaStream_t stream) {
  permute_place_kernel<unit_t><<<grid_of(n_tiles), kPermuteTile, 0, stream>>>(
      static_cast<const unsigned char*>(x), x_row_stride, row_bytes / static_cast<int64_t>(sizeof(unit_t)), N, k,
      n_tiles, ws, offsets, static_cast<unsigned char*>(x_perm), row_map);
  return cudaGetLastError();
}

bool aligned_to(uintptr_t v, size_t a) { return v % a == 0; }

}  // namespace

// ---------------------------------------------------------------------------
// launchers
// ---------------------------------------------------------------------------
template <typename scalar_t>
cudaError_t moe_route_forward(const scalar_t* logits, int64_t logits_row_stride, int64_t T, int64_t E,
                              int64_t top_k, bool softmax, bool renormalize,
                              const typename RouteAcc<scalar_t>::type* bias, int64_t n_group, int64_t topk_group,
                              typename RouteAcc<scalar_t>::type scaling, typename RouteAcc<scalar_t>::type* weights,
                              int32_t* ids, unsigned long long* status, cudaStream_t stream) {
  using A = typename RouteAcc<scalar_t>::type;
  if (T < 0 || E < 1 || E > kRouteMaxExperts || top_k < 1 || top_k > E || status == nullptr)
    return cudaErrorInvalidValue;
  if (n_group < 0 || (n_group > 0 && (E % n_group != 0 || topk_group < 1 || topk_group > n_group)))
    return cudaErrorInvalidValue;
  init_status_kernel<<<1, 1, 0, stream>>>(status, ~0ull, 0ull);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  if (T > 0 && (logits == nullptr || weights == nullptr || ids == nullptr)) return cudaErrorInvalidValue;

  RouteParams<scalar_t> p;
  p.logits = logits;
  p.row_stride = logits_row_stride;
  p.T = T;
  p.E = static_cast<int>(E);
  p.k = static_cast<int>(top_k);
  p.softmax = softmax;
  p.renormalize = renormalize;
  p.bias = bias;
  p.n_group = static_cast<int>(n_group);
  p.topk_group = static_cast<int>(topk_group);
  p.scaling = scaling;
  p.weights = weights;
  p.ids = ids;
  p.status = status;
  p.warp_slots = static_cast<int>(E + n_group);
  const size_t per_warp = static_cast<size_t>(p.warp_slots) * sizeof(A);
  int warps = static_cast<int>(kRouteSmemBudget / per_warp);
  warps = warps > kRouteWarps ? kRouteWarps : warps;
  if (warps < 1) return cudaErrorInvalidValue;  // not reached for E <= kRouteMaxExperts
  p.warps = warps;
  // At least one block even for T = 0: its first warp checks the bias.
  const int64_t blocks = T == 0 ? 1 : (T + warps - 1) / warps;
  moe_route_kernel<scalar_t><<<grid_of(blocks), warps * kWarp, per_warp * warps, stream>>>(p);
  return cudaGetLastError();
}

template cudaError_t moe_route_forward<float>(const float*, int64_t, int64_t, int64_t, int64_t, bool, bool,
                                              const float*, int64_t, int64_t, float, float*, int32_t*,
                                              unsigned long long*, cudaStream_t);
template cudaError_t moe_route_forward<double>(const double*, int64_t, int64_t, int64_t, int64_t, bool, bool,
                                               const double*, int64_t, int64_t, double, double*, int32_t*,
                                               unsigned long long*, cudaStream_t);
template cudaError_t moe_route_forward<__half>(const __half*, int64_t, int64_t, int64_t, int64_t, bool, bool,
                                               const float*, int64_t, int64_t, float, float*, int32_t*,
                                               unsigned long long*, cudaStream_t);
template cudaError_t moe_route_forward<__nv_bfloat16>(const __nv_bfloat16*, int64_t, int64_t, int64_t, int64_t,
                                                      bool, bool, const float*, int64_t, int64_t, float, float*,
                                                      int32_t*, unsigned long long*, cudaStream_t);

size_t moe_permute_workspace_bytes(int64_t n_pairs, int64_t E) {
  if (n_pairs < 0 || E < 0) return 0;
  const size_t n_counts = static_cast<size_t>(E) * static_cast<size_t>(tiles_of(n_pairs));
  return align16(n_counts * sizeof(int64_t)) + align16(static_cast<size_t>(E) * sizeof(int64_t)) +
         2 * align16(static_cast<size_t>(n_pairs) * sizeof(int32_t));
}

cudaError_t moe_permute_forward(const void* x, int64_t x_row_stride, int64_t row_bytes, const int32_t* ids32,
                                const int64_t* ids64, int64_t T, int64_t k, int64_t E, void* x_perm,
                                int64_t* offsets, int64_t* row_map, void* workspace, unsigned long long* status,
                                cudaStream_t stream) {
  if (T < 0 || k < 0 || E < 1 || E > INT32_MAX || row_bytes < 0 || offsets == nullptr || status == nullptr)
    return cudaErrorInvalidValue;
  if ((ids32 == nullptr) == (ids64 == nullptr) && T * k > 0) return cudaErrorInvalidValue;
  const int64_t N = T * k;
  // Min starts at the largest biased value, max at the smallest.
  init_status_kernel<<<1, 1, 0, stream>>>(status, ~0ull, 0ull);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  if (N == 0) {
    // No pairs: every expert owns nothing.
    return cudaMemsetAsync(offsets, 0, static_cast<size_t>(E + 1) * sizeof(int64_t), stream);
  }
  if (workspace == nullptr || row_map == nullptr || (row_bytes > 0 && (x == nullptr || x_perm == nullptr)))
    return cudaErrorInvalidValue;

  const int64_t n_tiles = tiles_of(N);
  const Workspace ws = carve(workspace, N, E);
  err = cudaMemsetAsync(ws.counts, 0, static_cast<size_t>(E) * static_cast<size_t>(n_tiles) * sizeof(int64_t),
                        stream);
  if (err != cudaSuccess) return err;
  if (ids32 != nullptr) {
    permute_rank_kernel<int32_t><<<grid_of(n_tiles), kPermuteTile, 0, stream>>>(ids32, N, E, n_tiles, ws, status);
  } else {
    permute_rank_kernel<int64_t><<<grid_of(n_tiles), kPermuteTile, 0, stream>>>(ids64, N, E, n_tiles, ws, status);
  }
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  permute_tile_scan_kernel<<<grid_of((E + kScanWarps - 1) / kScanWarps), kScanWarps * kWarp, 0, stream>>>(
      E, n_tiles, ws);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  permute_offsets_kernel<<<1, kOffsetsThreads, 0, stream>>>(E, ws, offsets);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;

  // The widest copy unit that divides the row size, the row stride and both base addresses.
  const uintptr_t bits = reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(x_perm) |
                         static_cast<uintptr_t>(row_bytes) | static_cast<uintptr_t>(x_row_stride);
  if (aligned_to(bits, 16))
    return launch_place<uint4>(x, x_row_stride, row_bytes, N, k, n_tiles, ws, offsets, x_perm, row_map, stream);
  if (aligned_to(bits, 8))
    return launch_place<uint2>(x, x_row_stride, row_bytes, N, k, n_tiles, ws, offsets, x_perm, row_map, stream);
  if (aligned_to(bits, 4))
    return launch_place<uint32_t>(x, x_row_stride, row_bytes, N, k, n_tiles, ws, offsets, x_perm, row_map, stream);
  if (aligned_to(bits, 2))
    return launch_place<uint16_t>(x, x_row_stride, row_bytes, N, k, n_tiles, ws, offsets, x_perm, row_map, stream);
  return launch_place<uint8_t>(x, x_row_stride, row_bytes, N, k, n_tiles, ws, offsets, x_perm, row_map, stream);
}

}  // namespace moe
}  // namespace frontiers_fast
