// Selective scan (S6) forward after mamba_ssm's selective_scan_fwd_kernel (Gu &
// Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces",
// arXiv:2312.00752, section 3.3 and appendix D: the hardware-aware scan).
//
// The recurrence h[t] = dA[t] h[t-1] + dBu[t] is the composition of affine
// maps h -> a h + b, which is associative: (a1, b1) then (a2, b2) is
// (a1 a2, a2 b1 + b2).  So a block can scan many time steps in parallel:
//
// * One thread block owns one (row, channel): row is the batch entry, or with
//   cu_seqlens the packed sequence, whose time range [cu[s], cu[s+1]) the
//   block scans on its own (batch is 1 then).  So a sequence never needs a
//   reset in mid-chunk and its last state is simply the block's final carry.
// * Time goes in chunks of kNThreads * kNItems steps; thread i holds the
//   kNItems consecutive steps from i * kNItems.  Chunks are read from global
//   memory coalesced (thread i takes elements i, i + kNThreads, ...) into a
//   shared stage and read back in that blocked order; one skew slot per 32
//   elements keeps both orders free of bank conflicts for 4-byte types.
// * For each state n: every thread composes its kNItems maps, a warp scan
//   (__shfl_up_sync) composes the threads', the warp totals go through shared
//   memory, and the carry (the state at the chunk's start) is applied in
//   front.  Each thread then replays its steps from that prefix, adding
//   C[n, t] h[t, n] into its outputs.  No per-step state is ever stored: the
//   scan's whole memory traffic is reading the inputs and writing out.
// * The carry of every n lives in shared memory between chunks; the last
//   thread writes the next chunk's carry, into the other half of a double
//   buffer so that it cannot race with the other threads still reading it.
//
// Steps past the end of the range are the identity map (1, 0), so a tail
// chunk needs no special case in the scan.  dA = exp2(delta * A log2(e)) with
// A pre-scaled once per state, as mamba_ssm does: exp2f is a single MUFU
// instruction.  Inputs are read in their storage type (__half and
// __nv_bfloat16 natively) and everything is computed in float, or in double
// for float64.

#include <cstdint>

#include "ssm/scan.cuh"

namespace frontiers_fast {
namespace ssm {
namespace {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int64_t kMaxGrid = 2147483647;
constexpr double kLog2e = 1.4426950408889634;
// torch.nn.functional.softplus's default threshold, as the reference uses.
constexpr double kSoftplusThreshold = 20.0;

// Storage type <-> compute type.
template <typename scalar_t>
struct Io;

template <>
struct Io<float> {
  static __device__ __forceinline__ float load(float v) { return v; }
  static __device__ __forceinline__ float store(float v) { return v; }
};

template <>
struct Io<double> {
  static __device__ __forceinline__ double load(double v) { return v; }
  static __device__ __forceinline__ double store(double v) { return v; }
};

template <>
struct Io<__half> {
  static __device__ __forceinline__ float load(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half store(float v) { return __float2half_rn(v); }
};

template <>
struct Io<__nv_bfloat16> {
  static __device__ __forceinline__ float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};

__device__ __forceinline__ float exp2_acc(float x) { return exp2f(x); }
__device__ __forceinline__ double exp2_acc(double x) { return exp2(x); }

// x > threshold is false for NaN, so NaN goes through log1p(exp(.)) and stays NaN.
__device__ __forceinline__ float softplus(float x) {
  return x > static_cast<float>(kSoftplusThreshold) ? x : log1pf(expf(x));
}
__device__ __forceinline__ double softplus(double x) { return x > kSoftplusThreshold ? x : log1p(exp(x)); }

__device__ __forceinline__ float silu(float x) { return x / (1.0f + expf(-x)); }
__device__ __forceinline__ double silu(double x) { return x / (1.0 + exp(-x)); }

// The stage's slot of chunk element i: one skew slot per 32 elements, so a
// warp reading with stride kNItems (4 or 8) hits 32 distinct banks.
__device__ __forceinline__ int slot(int i) { return i + i / kWarp; }

// Chunk elements [0, valid) of src into the stage, zeros after them.  Thread
// i reads i, i + kNThreads, ...: each warp load is one contiguous run.
template <int kNThreads, int kNItems, typename scalar_t, typename acc_t>
__device__ __forceinline__ void stage_load(const scalar_t* __restrict__ src, int valid, acc_t* stage) {
#pragma unroll
  for (int k = 0; k < kNItems; ++k) {
    const int i = k * kNThreads + static_cast<int>(threadIdx.x);
    stage[slot(i)] = i < valid ? Io<scalar_t>::load(src[i]) : acc_t(0);
  }
}

// kMinBlocks: mamba_ssm's occupancy target (3 blocks of 128 threads, 5 of
// fewer), which lets ptxas keep the per-step arrays in registers: left to
// itself (CUDA 13) it caps some variants at 128 registers and spills.
template <int kNThreads>
constexpr int kMinBlocks = kNThreads < 128 ? 5 : 3;

// kSeqB / kSeqC: B / C vary along time (read per step from a staged chunk)
// rather than being one [dim, N] value per state.  They are template flags
// because they decide the inner loop over states and whether it needs a
// barrier per state, which is where the time goes.
template <typename scalar_t, int kNThreads, int kNItems, bool kSeqB, bool kSeqC>
__global__ void __launch_bounds__(kNThreads, kMinBlocks<kNThreads>)
    selective_scan_fwd_kernel(const SelectiveScanArgs<scalar_t> p) {
  using acc_t = typename ScanAcc<scalar_t>::type;
  using IO = Io<scalar_t>;
  constexpr int kChunk = kNThreads * kNItems;
  constexpr int kWarps = kNThreads / kWarp;
  constexpr int kStage = kChunk + kChunk / kWarp;
  static_assert(kNThreads % kWarp == 0, "whole warps only");

  // Two stages: u and delta, then B and C per state, then z and out.
  __shared__ acc_t stage0[kStage];
  __shared__ acc_t stage1[kStage];
  // Per-warp totals of the scan, double-buffered by the parity of n: with a
  // constant B and C there is only one barrier per state, and the buffer of
  // state n is not rewritten before every thread has passed state n + 1's.
  __shared__ acc_t warp_a[2][kWarps];
  __shared__ acc_t warp_b[2][kWarps];
  // carry[2][N]: the state at the current chunk's start, and the next one.
  extern __shared__ __align__(16) unsigned char carry_bytes[];
  acc_t* carry = reinterpret_cast<acc_t*>(carry_bytes);

  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid % kWarp;
  const int warp = tid / kWarp;
  const int first = tid * kNItems;  // this thread's first step within a chunk

  const bool packed = p.cu_seqlens32 != nullptr || p.cu_seqlens64 != nullptr;
  const int64_t rows = packed ? p.num_seqs : p.batch;
  const int64_t dim = p.dim;
  const int64_t L = p.L;
  const int64_t N = p.N;
  const acc_t log2e = static_cast<acc_t>(kLog2e);

  // The grid may be capped below rows * dim; the loop is block-uniform, so
  // the barriers inside it are safe.
  for (int64_t task = blockIdx.x; task < rows * dim; task += gridDim.x) {
    const int64_t row = task / dim;
    const int64_t d = task % dim;
    const int64_t b = packed ? 0 : row;
    int64_t begin = 0;
    int64_t end = L;
    if (packed) {
      begin = p.cu_seqlens32 ? p.cu_seqlens32[row] : p.cu_seqlens64[row];
      end = p.cu_seqlens32 ? p.cu_seqlens32[row + 1] : p.cu_seqlens64[row + 1];
      // Valid offsets are untouched; any others cannot leave [0, L).
      begin = begin < 0 ? 0 : (begin > L ? L : begin);
      end = end < begin ? begin : (end > L ? L : end);
    }

    const int64_t base = (b * dim + d) * L;
    const scalar_t* __restrict__ u = p.u + base;
    const scalar_t* __restrict__ delta = p.delta + base;
    const scalar_t* __restrict__ z = p.z != nullptr ? p.z + base : nullptr;
    scalar_t* __restrict__ out = p.out + base;
    const scalar_t* __restrict__ B_seq = kSeqB ? p.B_seq + (b * p.B_groups + d / (dim / p.B_groups)) * N * L : nullptr;
    const scalar_t* __restrict__ C_seq = kSeqC ? p.C_seq + (b * p.C_groups + d / (dim / p.C_groups)) * N * L : nullptr;
    const acc_t* __restrict__ A = p.A + d * N;
    const bool has_D = p.D != nullptr;
    const acc_t D = has_D ? p.D[d] : acc_t(0);
    const acc_t bias = p.delta_bias != nullptr ? p.delta_bias[d] : acc_t(0);
    const int64_t state_row = (row * dim + d) * N;

    __syncthreads();  // the previous task's last reads of carry
    for (int64_t n = tid; n < N; n += kNThreads) {
      carry[n] = p.initial_state != nullptr ? p.initial_state[state_row + n] : acc_t(0);
    }
    int cur = 0;  // the half of carry that holds the state at the chunk's start

    for (int64_t t0 = begin; t0 < end; t0 += kChunk) {
      const int valid = static_cast<int>(end - t0 < kChunk ? end - t0 : kChunk);
      __syncthreads();  // the previous chunk's reads of the stages, and the carry's initialisation
      stage_load<kNThreads, kNItems>(u + t0, valid, stage0);
      stage_load<kNThreads, kNItems>(delta + t0, valid, stage1);
      __syncthreads();

      acc_t dt[kNItems], du[kNItems], y[kNItems];
#pragma unroll
      for (int j = 0; j < kNItems; ++j) {
        const acc_t uj = stage0[slot(first + j)];
        acc_t dj = stage1[slot(first + j)] + bias;
        if (p.delta_softplus) dj = softplus(dj);
        dt[j] = dj;
        du[j] = dj * uj;
        // Not D * u with D = 0 when there is no D: that would turn an
        // infinite u into NaN where the reference has none.
        y[j] = has_D ? D * uj : acc_t(0);
      }
      __syncthreads();  // the stages are rewritten with B and C below

#pragma unroll 1
      for (int64_t n = 0; n < N; ++n) {
        const acc_t A2 = A[n] * log2e;
        if (kSeqB) stage_load<kNThreads, kNItems>(B_seq + n * L + t0, valid, stage0);
        if (kSeqC) stage_load<kNThreads, kNItems>(C_seq + n * L + t0, valid, stage1);
        if (kSeqB || kSeqC) __syncthreads();
        const acc_t B_n = kSeqB ? acc_t(0) : p.B_const[d * N + n];
        const acc_t C_n = kSeqC ? acc_t(0) : p.C_const[d * N + n];

        // This thread's maps and their composition (ta, tb).  A step past
        // the range is the identity, set explicitly: exp2(0 * A) would be
        // NaN for an infinite A and spoil the carry.
        acc_t a[kNItems], bu[kNItems], c[kNItems];
        acc_t ta = acc_t(1), tb = acc_t(0);
#pragma unroll
        for (int j = 0; j < kNItems; ++j) {
          const bool live = first + j < valid;
          const acc_t Bj = kSeqB ? stage0[slot(first + j)] : B_n;
          a[j] = live ? exp2_acc(dt[j] * A2) : acc_t(1);
          bu[j] = live ? du[j] * Bj : acc_t(0);
          c[j] = kSeqC ? stage1[slot(first + j)] : C_n;
          tb = a[j] * tb + bu[j];
          ta = a[j] * ta;
        }

        // Inclusive warp scan of the thread maps (earlier lanes first).
#pragma unroll
        for (int off = 1; off < kWarp; off *= 2) {
          const acc_t pa = __shfl_up_sync(kFullMask, ta, off);
          const acc_t pb = __shfl_up_sync(kFullMask, tb, off);
          if (lane >= off) {
            tb = ta * pb + tb;
            ta = ta * pa;
          }
        }
        // The composition of the lanes before this one.
        acc_t ea = __shfl_up_sync(kFullMask, ta, 1);
        acc_t eb = __shfl_up_sync(kFullMask, tb, 1);
        if (lane == 0) {
          ea = acc_t(1);
          eb = acc_t(0);
        }
        const int par = static_cast<int>(n & 1);
        if (lane == kWarp - 1) {
          warp_a[par][warp] = ta;
          warp_b[par][warp] = tb;
        }
        __syncthreads();

        // The state just before this thread's first step: carry, then the
        // earlier warps, then the earlier lanes of this warp.
        acc_t h = carry[cur * N + n];
        for (int w = 0; w < warp; ++w) h = warp_a[par][w] * h + warp_b[par][w];
        h = ea * h + eb;
#pragma unroll
        for (int j = 0; j < kNItems; ++j) {
          h = a[j] * h + bu[j];
          y[j] += c[j] * h;
        }
        // The last thread's last step is the chunk's end (the padding is the
        // identity), so its h is the next chunk's carry.
        if (tid == kNThreads - 1) carry[(cur ^ 1) * N + n] = h;
      }
      cur ^= 1;

      // The stages' last readers (B/C of the last state, or u/delta) are all
      // behind a barrier by now.
      if (z != nullptr) {
        stage_load<kNThreads, kNItems>(z + t0, valid, stage0);
        __syncthreads();
#pragma unroll
        for (int j = 0; j < kNItems; ++j) y[j] *= silu(stage0[slot(first + j)]);
      }
#pragma unroll
      for (int j = 0; j < kNItems; ++j) stage1[slot(first + j)] = y[j];
      __syncthreads();
#pragma unroll
      for (int k = 0; k < kNItems; ++k) {
        const int i = k * kNThreads + tid;
        if (i < valid) out[t0 + i] = IO::store(stage1[slot(i)]);
      }
    }

    __syncthreads();  // the last thread's carry
    for (int64_t n = tid; n < N; n += kNThreads) p.last_state[state_row + n] = carry[cur * N + n];
  }
}

template <typename scalar_t, int kNThreads, int kNItems>
cudaError_t launch(const SelectiveScanArgs<scalar_t>& p, int64_t tasks, cudaStream_t stream) {
  using acc_t = typename ScanAcc<scalar_t>::type;
  const dim3 grid(static_cast<unsigned>(tasks < kMaxGrid ? tasks : kMaxGrid));
  const dim3 block(kNThreads);
  const size_t smem = 2 * static_cast<size_t>(p.N) * sizeof(acc_t);
  const bool seq_B = p.B_groups > 0;
  const bool seq_C = p.C_groups > 0;
  if (seq_B && seq_C) {
    selective_scan_fwd_kernel<scalar_t, kNThreads, kNItems, true, true><<<grid, block, smem, stream>>>(p);
  } else if (seq_B) {
    selective_scan_fwd_kernel<scalar_t, kNThreads, kNItems, true, false><<<grid, block, smem, stream>>>(p);
  } else if (seq_C) {
    selective_scan_fwd_kernel<scalar_t, kNThreads, kNItems, false, true><<<grid, block, smem, stream>>>(p);
  } else {
    selective_scan_fwd_kernel<scalar_t, kNThreads, kNItems, false, false><<<grid, block, smem, stream>>>(p);
  }
  return cudaGetLastError();
}

// groups 0 reads the constant pointer, G >= 1 the sequence one.  Only a
// pointer that will be read must be set: empty tensors need not own memory.
template <typename scalar_t, typename acc_t>
bool bc_ok(const acc_t* constant, const scalar_t* seq, int64_t groups, int64_t dim, int64_t L, int64_t N) {
  if (groups < 0) return false;
  if (groups == 0) return N == 0 || constant != nullptr;
  return dim % groups == 0 && (N == 0 || L == 0 || seq != nullptr);
}

}  // namespace

template <typename scalar_t>
cudaError_t selective_scan_forward(const SelectiveScanArgs<scalar_t>& p, cudaStream_t stream) {
  const bool packed = p.cu_seqlens32 != nullptr || p.cu_seqlens64 != nullptr;
  if (p.cu_seqlens32 != nullptr && p.cu_seqlens64 != nullptr) return cudaErrorInvalidValue;
  if (p.batch < 0 || p.dim < 0 || p.L < 0 || p.N < 0 || p.num_seqs < 0) return cudaErrorInvalidValue;
  if (p.N > kScanMaxStates) return cudaErrorInvalidValue;
  if (packed && p.batch != 1) return cudaErrorInvalidValue;
  const int64_t rows = packed ? p.num_seqs : p.batch;
  const int64_t tasks = rows * p.dim;
  if (tasks == 0) return cudaSuccess;
  if (!bc_ok(p.B_const, p.B_seq, p.B_groups, p.dim, p.L, p.N) ||
      !bc_ok(p.C_const, p.C_seq, p.C_groups, p.dim, p.L, p.N)) {
    return cudaErrorInvalidValue;
  }
  if (p.L > 0 && (p.u == nullptr || p.delta == nullptr || p.out == nullptr)) return cudaErrorInvalidValue;
  if (p.N > 0 && (p.A == nullptr || p.last_state == nullptr)) return cudaErrorInvalidValue;

  // The chunk should not be much longer than a sequence, or most threads
  // would scan padding.  With packed sequences the mean length decides.
  const int64_t length = packed ? (p.L + rows - 1) / rows : p.L;
  // double: 4 steps per thread, to keep the per-step arrays in registers.
  constexpr int kNItems = sizeof(typename ScanAcc<scalar_t>::type) == 8 ? 4 : 8;
  if (length <= 32 * kNItems) return launch<scalar_t, 32, kNItems>(p, tasks, stream);
  if (length <= 64 * kNItems) return launch<scalar_t, 64, kNItems>(p, tasks, stream);
  return launch<scalar_t, 128, kNItems>(p, tasks, stream);
}

template cudaError_t selective_scan_forward<float>(const SelectiveScanArgs<float>&, cudaStream_t);
template cudaError_t selective_scan_forward<double>(const SelectiveScanArgs<double>&, cudaStream_t);
template cudaError_t selective_scan_forward<__half>(const SelectiveScanArgs<__half>&, cudaStream_t);
template cudaError_t selective_scan_forward<__nv_bfloat16>(const SelectiveScanArgs<__nv_bfloat16>&, cudaStream_t);

}  // namespace ssm
}  // namespace frontiers_fast
