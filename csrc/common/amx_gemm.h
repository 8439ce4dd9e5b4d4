// A skinny bfloat16 GEMM on AMX tiles, for few rows against a large weight:
//   Y[m, n] = sum_k X[m, k] W[n, k]   X [M, K], W [N, K] bfloat16, Y float32
// with the weight read in place, once, in its storage layout.
//
// Why not oneDNN: for AMX it first reorders the weight into its VNNI tile
// layout, a copy of the whole weight per call, which for a handful of rows
// costs more than the product.  Here the roles are swapped: a weight block
// of 16 rows x 32 k is an AMX A tile as it lies in memory (16 rows of 64
// bytes, the weight's row stride apart), and the few rows of X are packed
// once per call into B tiles (pairs of k for each row: a 16 x 16 transpose
// of 32-bit pairs).  One tile product then gives a 16 (n) x 16 (m) block
// of Y's transpose, stored transposed.  Accumulation is float32 in the
// tiles, k in increasing order: the result does not depend on the threads.
//
// Requires AMX (the caller checks at run time: has_amx_bf16() in the MoE
// kernels) and K % 32 == 0, N % 32 == 0 (amx_skinny_ok); compiled for AMX
// with target attributes whatever the build flags.
#pragma once

#include <c10/util/BFloat16.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <cstdint>
#include <cstring>
#include <vector>

#include "common/sched.h"

namespace frontiers_fast {
namespace amx {

#if defined(__x86_64__)
inline bool amx_skinny_ok(int64_t N, int64_t K) { return N % 32 == 0 && K % 32 == 0 && K > 0 && N > 0; }

// X [M, K] packed into B tiles: for k block kb (32 values) and m block mb
// (16 rows), 16 rows of 64 bytes, row p holding (X[m][2p], X[m][2p+1]) for
// m = 0..15 of the block (zeros past M).
inline void pack_rows(const c10::BFloat16* X, int64_t M, int64_t K, int64_t mblocks, uint16_t* out) {
  const int64_t kblocks = K / 32;
  std::memset(out, 0, size_t(kblocks * mblocks * 512) * sizeof(uint16_t));
  for (int64_t m = 0; m < M; ++m) {
    const uint16_t* x = reinterpret_cast<const uint16_t*>(X + m * K);
    const int64_t mb = m / 16, c = m % 16;
    for (int64_t kb = 0; kb < kblocks; ++kb) {
      uint16_t* tile = out + (kb * mblocks + mb) * 512;
      for (int64_t p = 0; p < 16; ++p) {
        tile[p * 32 + 2 * c] = x[kb * 32 + 2 * p];
        tile[p * 32 + 2 * c + 1] = x[kb * 32 + 2 * p + 1];
      }
    }
  }
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles: 0..3 accumulators C[i][j] (n block i, m block j) at 2 * i + j,
// 4 and 5 the weight blocks (A), 6 and 7 the row blocks (B).
template <int MB>
__attribute__((target("amx-tile,amx-bf16"))) inline void skinny_blocks(const uint16_t* W, int64_t K, int64_t n0,
                                                                       int64_t n1, const uint16_t* Xp,
                                                                       int64_t mblocks, int64_t M, float* Y,
                                                                       int64_t ldy) {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
  alignas(64) float c[16 * 16];
  const int64_t kblocks = K / 32;
  const size_t ldw = size_t(K) * sizeof(uint16_t);
  // n outer: a 32-row block of the weight (32 K values) stays in L2 while
  // the row blocks go past it, so the weight is read from memory once.
  for (int64_t n = n0; n < n1; n += 32) {
    for (int64_t mb = 0; mb < mblocks; mb += MB) {
      _tile_zero(0);
      _tile_zero(2);
      if constexpr (MB == 2) {
        _tile_zero(1);
        _tile_zero(3);
      }
      const uint16_t* w0 = W + n * K;
      const uint16_t* w1 = w0 + 16 * K;
      for (int64_t kb = 0; kb < kblocks; ++kb) {
        const uint16_t* xb = Xp + (kb * mblocks + mb) * 512;
        _tile_loadd(4, w0 + kb * 32, ldw);
        _tile_loadd(6, xb, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_loadd(5, w1 + kb * 32, ldw);
        _tile_dpbf16ps(2, 5, 6);
        if constexpr (MB == 2) {
          _tile_loadd(7, xb + 512, 64);
          _tile_dpbf16ps(1, 4, 7);
          _tile_dpbf16ps(3, 5, 7);
        }
      }
      // C[i][j] holds Y[m][n] at row n - (n + 16 i), column m - 16 (mb + j).
      for (int i = 0; i < 2; ++i)
        for (int j = 0; j < MB; ++j) {
          if (i == 0 && j == 0) _tile_stored(0, c, 64);
          if (i == 0 && j == 1) _tile_stored(1, c, 64);
          if (i == 1 && j == 0) _tile_stored(2, c, 64);
          if (i == 1 && j == 1) _tile_stored(3, c, 64);
          const int64_t m0 = (mb + j) * 16, nn = n + 16 * i;
          const int64_t mcount = std::min<int64_t>(16, M - m0);
          for (int64_t m = 0; m < mcount; ++m) {
            float* y = Y + (m0 + m) * ldy + nn;
            for (int r = 0; r < 16; ++r) y[r] = c[r * 16 + m];
          }
        }
    }
  }
  _tile_release();
}

// Y (float32, row stride ldy) = X W^T for M rows; the column blocks of 32
// are spread over the threads (inline inside a parallel region).
inline void skinny_gemm(const c10::BFloat16* X, int64_t M, const c10::BFloat16* W, int64_t N, int64_t K, float* Y,
                        int64_t ldy) {
  if (M <= 0) return;
  const int64_t mblocks = (M + 15) / 16 + ((M + 15) / 16 > 1 ? ((M + 15) / 16) % 2 : 0);
  thread_local std::vector<uint16_t> packed;
  if (packed.size() < size_t(K * mblocks * 16)) packed.resize(size_t(K * mblocks * 16));
  pack_rows(X, M, K, mblocks, packed.data());
  const uint16_t* Xp = packed.data();
  const uint16_t* w = reinterpret_cast<const uint16_t*>(W);
  const int64_t nb = N / 32;
  for_range(nb, 4, [&](int64_t b0, int64_t b1) {
    if (mblocks == 1)
      skinny_blocks<1>(w, K, b0 * 32, b1 * 32, Xp, mblocks, M, Y, ldy);
    else
      skinny_blocks<2>(w, K, b0 * 32, b1 * 32, Xp, mblocks, M, Y, ldy);
  });
}

#else  // no AMX off x86-64: callers check amx_skinny_ok first
inline bool amx_skinny_ok(int64_t, int64_t) { return false; }
inline void skinny_gemm(const c10::BFloat16*, int64_t, const c10::BFloat16*, int64_t, int64_t, float*, int64_t) {}
#endif

}  // namespace amx
}  // namespace frontiers_fast
