// Native CPU kernels for dw5d_jax: depthwise convolution of rank-5 arrays,
// channels-last or (the last `config` int, g.cf) channels-first, called
// from XLA through its FFI (the header-only xla/ffi/api/ffi.h that jaxlib
// ships). dw5d_jax/_native_build.py compiles this file at first use;
// dw5d_jax/_native.py decides when XLA calls it. Channels-first arrays have
// their own kernels, vectorised along W (section "Channels-first" below);
// what follows describes the channels-last ones.
//
// Arrays (row-major):
//   x   (N, D, H, W, C)         float32 or bfloat16
//   w   (KD, KH, KW, M, C)      float32 (the (.., C, M) kernel, transposed)
//   y   (N, OD, OH, OW, C * M)  float32 or bfloat16, channel c * M + m
//   ct  like y; dk like w (float32)
// Output position o reads input position o * s + t * r - p for tap t along
// each spatial axis (stride s, dilation r, low padding p). Positions outside
// [0, size) are the zero padding: it is never written anywhere, the loops
// just skip those taps (no padded copy of x, unlike XLA's shift lowering).
//
// Vectorisation: channels are innermost and contiguous, so every inner loop
// is a multiply-add over packets of channels. The packets are GCC/Clang
// vector extensions of the widest width the build targets (16 floats with
// AVX-512; then 8 and 4 for the channels left over, then single floats):
// GCC's auto-vectoriser prefers 256-bit vectors on these CPUs, and an
// explicit packet also pins the register blocking (several output
// positions x two packets of accumulators) that keeps the FMA units busy.
// For the common kernel widths, strides and dilations along W the blocks
// are unrolled at compile time (`Fixed`), so that each input packet is
// loaded once and feeds every (output, tap) pair that reads it.
//
// Gradients: the input gradient is the forward kernel on the cotangent with
// the flipped kernel (unit strides, M = 1) or a transposed convolution in
// gather form; the kernel gradient is one pass over x and the cotangent that
// accumulates every tap together.
//
// Threads: output rows (n, od, oh) are split into tiles (see Tiles: a
// fixed split, from the shapes only, so results do not depend on the thread
// count), taken dynamically by the calling thread and by tasks on XLA's
// intra-op pool.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace dw5d {
namespace {

#if defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif

using bf16 = uint16_t;  // the bits of a bfloat16

inline uint16_t ToBf16(float f) {  // round to nearest even, NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// Pack<N>: loads, stores and zero of one packet of N floats (N = 1: a float).
template <int N>
struct Pack;

template <>
struct Pack<1> {
  using V = float;
  static float Zero() { return 0.0f; }
  static float Load(const float* p) { return *p; }
  static float Load(const bf16* p) {
    uint32_t u = static_cast<uint32_t>(*p) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  static void Store(float* p, float v) { *p = v; }
  static void Store(bf16* p, float v) { *p = ToBf16(v); }
};

#define DW5D_DEFINE_PACK(N)                                                             \
  template <>                                                                           \
  struct Pack<N> {                                                                      \
    typedef float V __attribute__((vector_size(4 * N)));                               \
    typedef uint32_t U __attribute__((vector_size(4 * N)));                            \
    typedef uint16_t H __attribute__((vector_size(2 * N)));                            \
    static V Zero() { return V{}; }                                                     \
    static V Load(const float* p) {                                                     \
      V v;                                                                              \
      std::memcpy(&v, p, sizeof v);                                                     \
      return v;                                                                         \
    }                                                                                   \
    static V Load(const bf16* p) {                                                      \
      H h;                                                                              \
      std::memcpy(&h, p, sizeof h);                                                     \
      U u = __builtin_convertvector(h, U) << 16;                                        \
      V v;                                                                              \
      std::memcpy(&v, &u, sizeof v);                                                    \
      return v;                                                                         \
    }                                                                                   \
    static void Store(float* p, V v) { std::memcpy(p, &v, sizeof v); }                 \
    static void Store(bf16* p, V v) {                                                   \
      U u;                                                                              \
      std::memcpy(&u, &v, sizeof u);                                                    \
      U rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;                               \
      U quiet = (u >> 16) | 0x40u;                                                      \
      U nan = reinterpret_cast<U>((u & 0x7fffffffu) > 0x7f800000u);                     \
      H h = __builtin_convertvector((nan & quiet) | (~nan & rounded), H);               \
      std::memcpy(p, &h, sizeof h);                                                     \
    }                                                                                   \
  };
DW5D_DEFINE_PACK(4)
#if defined(__AVX__)
DW5D_DEFINE_PACK(8)
#endif
#if defined(__AVX512F__)
DW5D_DEFINE_PACK(16)
#endif
#undef DW5D_DEFINE_PACK

template <int N>
using Int = std::integral_constant<int, N>;

// Calls block(Int<N>, Int<NV>, c0) over the channels [0, c): NV packets of
// N floats from c0. Pairs of the widest packets first, then one packet of
// each narrower width, then single floats.
template <typename Block>
inline void ForChannels(int64_t c, Block&& block) {
  int64_t c0 = 0;
  for (; c0 + 2 * kLanes <= c; c0 += 2 * kLanes) block(Int<kLanes>{}, Int<2>{}, c0);
  for (; c0 + kLanes <= c; c0 += kLanes) block(Int<kLanes>{}, Int<1>{}, c0);
  if constexpr (kLanes > 8) {
    for (; c0 + 8 <= c; c0 += 8) block(Int<8>{}, Int<1>{}, c0);
  }
  if constexpr (kLanes > 4) {
    for (; c0 + 4 <= c; c0 += 4) block(Int<4>{}, Int<1>{}, c0);
  }
  for (; c0 < c; ++c0) block(Int<1>{}, Int<1>{}, c0);
}

// The problem, from the `config` attribute (dw5d_jax/_native.py: _config).
struct Geom {
  int64_t n, d, h, w, c, m, od, oh, ow, kd, kh, kw, sd, sh, sw, rd, rh, rw, pd, ph, pw;
  int64_t cf;  // 1: channels-first arrays (see "Channels-first" below)
  int64_t rows() const { return n * od * oh; }
  int64_t taps() const { return kd * kh * kw; }
};
constexpr size_t kConfigSize = 22;

inline int64_t FloorDiv(int64_t a, int64_t b) {  // b > 0
  return a >= 0 ? a / b : -((-a + b - 1) / b);
}
inline int64_t CeilDiv(int64_t a, int64_t b) { return -FloorDiv(-a, b); }

// The outputs o in [0, n_out) whose input o * s + off lies in [0, n_in).
inline void ValidRange(int64_t n_in, int64_t n_out, int64_t s, int64_t off, int64_t* lo,
                       int64_t* hi) {
  *lo = std::min(n_out, std::max<int64_t>(0, CeilDiv(-off, s)));
  *hi = std::max(*lo, std::min(n_out, FloorDiv(n_in - 1 - off, s) + 1));
}

// The input rows that output row r reads: rows[t] indexes x viewed as
// N * D * H rows of W * C values, taps[t] = a * KH + b is its tap row.
int RowTaps(const Geom& g, int64_t r, int64_t* rows, int64_t* taps) {
  const int64_t n = r / (g.od * g.oh), od = (r / g.oh) % g.od, oh = r % g.oh;
  int nt = 0;
  for (int64_t a = 0; a < g.kd; ++a) {
    const int64_t id = od * g.sd + a * g.rd - g.pd;
    if (id < 0 || id >= g.d) continue;
    for (int64_t b = 0; b < g.kh; ++b) {
      const int64_t ih = oh * g.sh + b * g.rh - g.ph;
      if (ih < 0 || ih >= g.h) continue;
      rows[nt] = (n * g.d + id) * g.h + ih;
      taps[nt] = a * g.kh + b;
      ++nt;
    }
  }
  return nt;
}

// out[0:len] = in[0:len] converted (float32 -> float32 or bfloat16).
template <typename TI, typename TO>
void Convert(const TI* in, TO* out, int64_t len) {
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes) Pack<kLanes>::Store(out + i, Pack<kLanes>::Load(in + i));
  for (; i < len; ++i) Pack<1>::Store(out + i, Pack<1>::Load(in + i));
}

// Rows r = plane * height + h (output rows: plane = n * OD + od, h = oh) in
// tiles: a run of planes times a band of h, visited plane by plane. The
// input rows a band reads (KD planes x (band + KH - 1) rows) then stay in L2
// while the next plane reuses KD - 1 of them, instead of every input plane
// coming from memory KD times. The tiling depends on the shapes only, so
// sums do not depend on the thread count.
struct Tiles {
  int64_t planes = 0, height = 0, band = 1, run = 1;
  int64_t Bands() const { return (height + band - 1) / band; }
  int64_t Count() const { return planes * height == 0 ? 0 : Bands() * ((planes + run - 1) / run); }
  template <typename F>
  void ForRows(int64_t t, F&& f) const {
    const int64_t b = t % Bands(), q = t / Bands();
    const int64_t p1 = std::min(planes, (q + 1) * run), h1 = std::min(height, (b + 1) * band);
    for (int64_t p = q * run; p < p1; ++p)
      for (int64_t h = b * band; h < h1; ++h) f(p * height + h);
  }
};

constexpr int64_t kBandBytes = 256 << 10;  // the input rows of one band
constexpr int64_t kTiles = 32;             // about this many tiles

// `row_bytes`: one input row; a row of output reads `kd` x `kh` input rows;
// bands of at least `min_band` rows (where the height allows).
inline Tiles MakeTiles(int64_t planes, int64_t height, int64_t row_bytes, int64_t kd,
                       int64_t kh, int64_t min_band = 1) {
  Tiles t;
  t.planes = planes, t.height = height;
  if (planes <= 0 || height <= 0) return t;
  int64_t band = kBandBytes / std::max<int64_t>(1, kd * row_bytes) - (kh - 1);
  band = std::min(height, std::max<int64_t>(1, band));
  int64_t bands = (height + band - 1) / band;
  bands = std::max(bands, std::min(height, (kTiles + planes - 1) / planes));  // enough tiles
  t.band = std::min(height, std::max(min_band, (height + bands - 1) / bands));
  t.run = std::max<int64_t>(1, planes * t.Bands() / kTiles);
  return t;
}

// Rows of an array as float32, each converted once into a direct-mapped
// cache: row r = plane * height + h goes to slot (plane mod dspan) * hspan +
// (h mod hspan). The rows one output row reads lie within dspan consecutive
// planes and hspan consecutive rows, so they never share a slot (a pointer
// handed out stays valid for that output row), and with hspan covering a
// tile's band the next plane finds most of its rows converted.
class RowCache {
 public:
  RowCache(int64_t height, int64_t len, int64_t dspan, int64_t hspan)
      : height_(height), len_(len), dspan_(dspan), hspan_(hspan), keys_(dspan * hspan, -1),
        data_(dspan * hspan * len) {}

  template <typename Fill>
  const float* Get(int64_t row, Fill&& fill) {
    const int64_t slot = (row / height_ % dspan_) * hspan_ + row % height_ % hspan_;
    float* data = &data_[slot * len_];
    if (keys_[slot] != row) {
      fill(row, data);
      keys_[slot] = row;
    }
    return data;
  }

 private:
  int64_t height_, len_, dspan_, hspan_;
  std::vector<int64_t> keys_;
  std::vector<float> data_;
};

// Input rows as float32 for the compute kernels: x itself when it is
// float32, bfloat16 rows converted through a RowCache.
template <typename TI>
class InputRows {
 public:
  InputRows(const Geom& g, const TI* x, const Tiles& tiles)
      : x_(x), len_(g.w * g.c),
        cache_(g.h, len_, (g.kd - 1) * g.rd + 1, (tiles.band - 1) * g.sh + (g.kh - 1) * g.rh + 1) {}

  const float* Get(int64_t row) {
    return cache_.Get(row, [&](int64_t r, float* out) { Convert(x_ + r * len_, out, len_); });
  }

 private:
  const TI* x_;
  int64_t len_;
  RowCache cache_;
};

template <>
class InputRows<float> {
 public:
  InputRows(const Geom& g, const float* x, const Tiles&) : x_(x), len_(g.w * g.c) {}
  const float* Get(int64_t row) const { return x_ + row * len_; }

 private:
  const float* x_;
  int64_t len_;
};

// ---------------------------------------------------------------------------
// Shapes of the W axis with their own unrolled kernels: kernel width KW,
// stride SW and dilation RW known at compile time, so that every input
// packet of a row is loaded once and multiplied into every (output, tap)
// pair that reads it, from registers. Other shapes take `Generic`.

struct Generic {
  static constexpr int KW = 0, SW = 0, RW = 0;
};
template <int K, int S, int R>
struct Fixed {
  static constexpr int KW = K, SW = S, RW = R;
};

constexpr int kRegisters = kLanes >= 16 ? 32 : 16;

// Output positions per forward block: as many as fit in registers next to
// the KW x NV weight packets (at least 8 independent sums hide the latency).
template <int KW, int NV>
constexpr int ForwardPositions() {
  return (8 + KW) * NV + 2 <= kRegisters ? 8 : (4 + KW) * NV + 2 <= kRegisters ? 4 : 2;
}

// ---------------------------------------------------------------------------
// Forward: y[o, c, m] = sum over taps of x[o * s + t * r - p, c] * w[t, m, c].
// The row kernels below see float32 rows `xr[t]` (the nt input rows the
// output row reads) and weight rows `wr[t]` ((KW, M, C) of tap row t, offset
// to multiplier index m), and write float32 (OW, M, C).

// acc[p][v] = the tap sum for NP output positions `xp` elements apart (the
// first one's W taps e0..e1-1 start at offset `off` of every input row) and
// NV packets of channels from c0 (`off` includes c0).
// With NP = 1, the taps alternate between two sets of sums (more chains).
template <int N, int NV, int NP>
inline void TapSums(const Geom& g, const float* const* xr, const float* const* wr, int nt,
                    int64_t off, int64_t c0, int64_t e0, int64_t e1,
                    typename Pack<N>::V (&acc)[NP][NV]) {
  using V = typename Pack<N>::V;
  constexpr int L = N, S = NP == 1 ? 2 : 1;
  const int64_t xe = g.rw * g.c, we = g.m * g.c, xp = g.sw * g.c;
  V sums[S][NP][NV];
  for (int s = 0; s < S; ++s)
    for (int p = 0; p < NP; ++p)
      for (int v = 0; v < NV; ++v) sums[s][p][v] = Pack<N>::Zero();
  int k = 0;
  for (int t = 0; t < nt; ++t) {
    const float* x = xr[t] + off + e0 * xe;
    const float* w = wr[t] + c0 + e0 * we;
    for (int64_t e = e0; e < e1; ++e, x += xe, w += we, k ^= S - 1) {
      V wv[NV];
      for (int v = 0; v < NV; ++v) wv[v] = Pack<N>::Load(w + v * L);
      for (int p = 0; p < NP; ++p)
        for (int v = 0; v < NV; ++v) sums[k][p][v] += Pack<N>::Load(x + p * xp + v * L) * wv[v];
    }
  }
  for (int p = 0; p < NP; ++p)
    for (int v = 0; v < NV; ++v) {
      acc[p][v] = sums[0][p][v];
      if constexpr (S > 1) acc[p][v] += sums[1][p][v];
    }
}

// TapSums for all KW taps of NP interior positions, with F's W shape: input
// position j (relative to the first output's first tap) feeds output p
// through tap e where j = p * SW + e * RW.
template <typename F, int N, int NV, int NP>
inline void TapSumsFixed(const float* const* xr, const float* const* wr, int nt, int64_t off,
                         int64_t c0, int64_t c, int64_t mc, typename Pack<N>::V (&acc)[NP][NV]) {
  using V = typename Pack<N>::V;
  constexpr int L = N, KW = F::KW, SW = F::SW, RW = F::RW;
  constexpr int J = (NP - 1) * SW + (KW - 1) * RW + 1;
#pragma GCC unroll 16
  for (int p = 0; p < NP; ++p)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[p][v] = Pack<N>::Zero();
  for (int t = 0; t < nt; ++t) {
    const float* x = xr[t] + off;
    const float* w = wr[t] + c0;
    V wv[KW][NV];
#pragma GCC unroll 16
    for (int e = 0; e < KW; ++e, w += mc)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) wv[e][v] = Pack<N>::Load(w + v * L);
    // One pointer stepped by c (not j * c offsets, which need a register each).
#pragma GCC unroll 64
    for (int j = 0; j < J; ++j, x += c) {
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        const V xv = Pack<N>::Load(x + v * L);
#pragma GCC unroll 16
        for (int e = 0; e < KW; ++e) {
          const int q = j - e * RW;
          if (q >= 0 && q % SW == 0 && q / SW < NP) acc[q / SW][v] += xv * wv[e][v];
        }
      }
    }
  }
}

// Channels [c0, c0 + NV * width) of multiplier index m, for one output row.
// Positions [lo, hi) read all W taps inside x; the others are the edges.
template <typename F, int N, int NV>
void ForwardBlock(const Geom& g, const float* const* xr, const float* const* wr, int nt,
                  int64_t c0, int64_t m, int64_t lo, int64_t hi, float* out) {
  using V = typename Pack<N>::V;
  constexpr int L = N;
  const int64_t os = g.m * g.c;  // between output positions
  auto emit = [&](int64_t o, const V* acc) {
    for (int v = 0; v < NV; ++v) Pack<N>::Store(out + o * os + m * g.c + c0 + v * L, acc[v]);
  };
  auto edge = [&](int64_t o) {
    const int64_t base = o * g.sw - g.pw;
    const int64_t e0 = std::max<int64_t>(0, CeilDiv(-base, g.rw));
    const int64_t e1 = std::min<int64_t>(g.kw, FloorDiv(g.w - 1 - base, g.rw) + 1);
    V acc[1][NV];
    TapSums<N, NV, 1>(g, xr, wr, e1 > e0 ? nt : 0, base * g.c + c0, c0, e0, std::max(e0, e1),
                      acc);
    emit(o, acc[0]);
  };
  for (int64_t o = 0; o < lo; ++o) edge(o);
  int64_t o = lo;
  if constexpr (F::KW > 0) {
    // Blocks of NP outputs, then of NP / 2, ... for the rest of the interior.
    auto blocks = [&](auto np) {
      constexpr int NP = decltype(np)::value;
      for (; o + NP <= hi; o += NP) {
        V acc[NP][NV];
        TapSumsFixed<F, N, NV, NP>(xr, wr, nt, (o * g.sw - g.pw) * g.c + c0, c0, g.c, os, acc);
        for (int p = 0; p < NP; ++p) emit(o + p, acc[p]);
      }
    };
    constexpr int NP = ForwardPositions<F::KW, NV>();
    blocks(std::integral_constant<int, NP>{});
    if constexpr (NP >= 8) blocks(std::integral_constant<int, 4>{});
    if constexpr (NP >= 4) blocks(std::integral_constant<int, 2>{});
  } else {
    constexpr int NP = 4;
    for (; o + NP <= hi; o += NP) {
      V acc[NP][NV];
      TapSums<N, NV, NP>(g, xr, wr, nt, (o * g.sw - g.pw) * g.c + c0, c0, 0, g.kw, acc);
      for (int p = 0; p < NP; ++p) emit(o + p, acc[p]);
    }
  }
  for (; o < hi; ++o) {
    V acc[1][NV];
    TapSums<N, NV, 1>(g, xr, wr, nt, (o * g.sw - g.pw) * g.c + c0, c0, 0, g.kw, acc);
    emit(o, acc[0]);
  }
  for (o = hi; o < g.ow; ++o) edge(o);
}

// One output row: `wb[t]` is tap row t's (KW, M, C) weights, `wr` scratch.
template <typename F>
void ForwardRow(const Geom& g, const float* const* xr, const float* const* wb, int nt, int64_t lo,
                int64_t hi, float* out, const float** wr) {
  for (int64_t m = 0; m < g.m; ++m) {
    for (int t = 0; t < nt; ++t) wr[t] = wb[t] + m * g.c;
    ForChannels(g.c, [&](auto n, auto nv, int64_t c0) {
      ForwardBlock<F, n, nv>(g, xr, wr, nt, c0, m, lo, hi, out);
    });
  }
}

using ForwardRowFn = void (*)(const Geom&, const float* const*, const float* const*, int, int64_t,
                              int64_t, float*, const float**);

// (OW, M, C) float32 -> y's (OW, C * M) row in y's dtype.
template <typename TO>
void StoreRow(const Geom& g, const float* in, TO* y) {
  if (g.m == 1) {
    Convert(in, y, g.ow * g.c);
    return;
  }
  for (int64_t o = 0; o < g.ow; ++o)
    for (int64_t c = 0; c < g.c; ++c)
      for (int64_t m = 0; m < g.m; ++m)
        Pack<1>::Store(y + (o * g.c + c) * g.m + m, in[(o * g.m + m) * g.c + c]);
}

template <typename TI, typename TO>
void ForwardRows(const Geom& g, ForwardRowFn row_fn, const TI* x, const float* w, TO* y,
                 const Tiles& tiles, int64_t tile) {
  const int64_t cm = g.c * g.m, taps = g.kd * g.kh;
  InputRows<TI> in(g, x, tiles);
  std::vector<int64_t> rows(taps), tap(taps);
  std::vector<const float*> xr(taps), wb(taps), wr(taps);
  // float32 y with M = 1 has the row kernels' layout: written in place.
  const bool direct = std::is_same<TO, float>::value && g.m == 1;
  std::vector<float> tmp(direct ? 0 : g.ow * cm);
  int64_t lo0, hi0, lo1, hi1;  // outputs whose first / last W tap is inside x
  ValidRange(g.w, g.ow, g.sw, -g.pw, &lo0, &hi0);
  ValidRange(g.w, g.ow, g.sw, (g.kw - 1) * g.rw - g.pw, &lo1, &hi1);
  int64_t lo = std::max(lo0, lo1), hi = std::min(hi0, hi1);
  if (hi <= lo) lo = hi = g.ow;
  tiles.ForRows(tile, [&](int64_t r) {
    const int nt = RowTaps(g, r, rows.data(), tap.data());
    for (int t = 0; t < nt; ++t) {
      xr[t] = in.Get(rows[t]);
      wb[t] = w + tap[t] * g.kw * cm;
    }
    TO* yrow = y + r * g.ow * cm;
    float* out = direct ? reinterpret_cast<float*>(yrow) : tmp.data();
    row_fn(g, xr.data(), wb.data(), nt, lo, hi, out, wr.data());
    if (!direct) StoreRow(g, tmp.data(), yrow);
  });
}

// ---------------------------------------------------------------------------
// Kernel gradient: dk[t, m, c] = sum over outputs o of
// x[o * s + t * r - p, c] * ct[o, c * M + m], in one pass over x and ct.
// The row kernels see float32 input rows `xr[t]`, the cotangent row as
// float32 (M, OW, C), and accumulate into `pr[t]`, tap row t's (KW, M, C)
// partial sums.

// out[0 : NV * width] += sum_i x[i * xs] * ct[i * cs] (packets of channels).
// Four independent partial sums per packet hide the multiply-add latency.
template <int N, int NV>
inline void GradDot(const float* x, const float* ct, int64_t count, int64_t xs, int64_t cs,
                    float* out) {
  using V = typename Pack<N>::V;
  constexpr int L = N;
  constexpr int U = 4;
  V acc[U][NV];
  for (int u = 0; u < U; ++u)
    for (int v = 0; v < NV; ++v) acc[u][v] = Pack<N>::Zero();
  int64_t i = 0;
  for (; i + U <= count; i += U)
    for (int u = 0; u < U; ++u)
      for (int v = 0; v < NV; ++v)
        acc[u][v] += Pack<N>::Load(x + (i + u) * xs + v * L) *
                     Pack<N>::Load(ct + (i + u) * cs + v * L);
  for (; i < count; ++i)
    for (int v = 0; v < NV; ++v)
      acc[0][v] += Pack<N>::Load(x + i * xs + v * L) * Pack<N>::Load(ct + i * cs + v * L);
  for (int v = 0; v < NV; ++v) {
    V s = (acc[0][v] + acc[1][v]) + (acc[2][v] + acc[3][v]);
    Pack<N>::Store(out + v * L, Pack<N>::Load(out + v * L) + s);
  }
}

// GradDot for all KW taps of `count` interior outputs at once, with F's W
// shape: per block of NB outputs, NB cotangent packets stay in registers and
// every input packet is loaded once. out[e * ms] is tap e's partial sum.
template <typename F, int N, int NV>
inline void GradDotFixed(const float* x, const float* ct, int64_t count, int64_t c, float* out,
                         int64_t ms) {
  using V = typename Pack<N>::V;
  constexpr int L = N, KW = F::KW, SW = F::SW, RW = F::RW;
  constexpr int NB = 4, S = KW * NV >= 8 ? 1 : 2;  // S sets of sums: >= 8 chains
  constexpr int J = (NB - 1) * SW + (KW - 1) * RW + 1;
  V acc[S][KW][NV];
#pragma GCC unroll 2
  for (int s = 0; s < S; ++s)
#pragma GCC unroll 16
    for (int e = 0; e < KW; ++e)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[s][e][v] = Pack<N>::Zero();
  int64_t i = 0;
  for (; i + NB <= count; i += NB) {
    V cv[NB][NV];
    const float* cb = ct + i * c;
#pragma GCC unroll 8
    for (int p = 0; p < NB; ++p, cb += c)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) cv[p][v] = Pack<N>::Load(cb + v * L);
    const float* xb = x + i * SW * c;
#pragma GCC unroll 64
    for (int j = 0; j < J; ++j, xb += c) {
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        const V xv = Pack<N>::Load(xb + v * L);
#pragma GCC unroll 16
        for (int e = 0; e < KW; ++e) {
          const int q = j - e * RW;
          if (q >= 0 && q % SW == 0 && q / SW < NB) acc[(q / SW) % S][e][v] += xv * cv[q / SW][v];
        }
      }
    }
  }
  for (; i < count; ++i)
    for (int e = 0; e < KW; ++e)
      for (int v = 0; v < NV; ++v)
        acc[0][e][v] += Pack<N>::Load(x + (i * SW + e * RW) * c + v * L) *
                        Pack<N>::Load(ct + i * c + v * L);
  for (int e = 0; e < KW; ++e)
    for (int v = 0; v < NV; ++v) {
      V sum = acc[0][e][v];
      if constexpr (S > 1) sum += acc[1][e][v];
      Pack<N>::Store(out + e * ms + v * L, Pack<N>::Load(out + e * ms + v * L) + sum);
    }
}

// Channels [c0, c0 + NV * width) of one tap row: the interior [a, b) (all
// taps inside x) with GradDotFixed when F is fixed, the rest with GradDot.
template <typename F, int N, int NV>
void GradBlock(const Geom& g, const float* xrow, const float* cs, float* pt, const int64_t* lo,
               const int64_t* hi, int64_t a, int64_t b, int64_t c0) {
  const int64_t xs = g.sw * g.c, ms = g.m * g.c;
  const bool fixed = F::KW > 0 && b > a;
  if constexpr (F::KW > 0) {
    if (fixed)
      GradDotFixed<F, N, NV>(xrow + (a * g.sw - g.pw) * g.c + c0, cs + a * g.c + c0, b - a, g.c,
                             pt + c0, ms);
  }
  for (int64_t e = 0; e < g.kw; ++e) {
    const float* xe = xrow + (e * g.rw - g.pw) * g.c + c0;
    float* out = pt + e * ms + c0;
    if (fixed) {
      if (a > lo[e])
        GradDot<N, NV>(xe + lo[e] * xs, cs + lo[e] * g.c + c0, a - lo[e], xs, g.c, out);
      if (hi[e] > b) GradDot<N, NV>(xe + b * xs, cs + b * g.c + c0, hi[e] - b, xs, g.c, out);
    } else if (hi[e] > lo[e]) {
      GradDot<N, NV>(xe + lo[e] * xs, cs + lo[e] * g.c + c0, hi[e] - lo[e], xs, g.c, out);
    }
  }
}

// One output row. `lo[e], hi[e]`: the outputs that tap e reads inside x.
template <typename F>
void KernelGradRow(const Geom& g, const float* const* xr, float* const* pr, int nt,
                   const float* cs, const int64_t* lo, const int64_t* hi, int64_t a, int64_t b) {
  for (int t = 0; t < nt; ++t) {
    for (int64_t m = 0; m < g.m; ++m) {
      float* pt = pr[t] + m * g.c;
      const float* cm = cs + m * g.ow * g.c;
      ForChannels(g.c, [&](auto n, auto nv, int64_t c0) {
        GradBlock<F, n, nv>(g, xr[t], cm, pt, lo, hi, a, b, c0);
      });
    }
  }
}

using KernelGradRowFn = void (*)(const Geom&, const float* const*, float* const*, int,
                                 const float*, const int64_t*, const int64_t*, int64_t, int64_t);

template <typename TI, typename TC>
void KernelGradRows(const Geom& g, KernelGradRowFn row_fn, const TI* x, const TC* ct, float* part,
                    const Tiles& tiles, int64_t tile) {
  const int64_t cm = g.c * g.m, taps = g.kd * g.kh;
  InputRows<TI> in(g, x, tiles);
  std::vector<int64_t> rows(taps), tap(taps);
  std::vector<const float*> xr(taps);
  std::vector<float*> pr(taps);
  // ct rows as float32 (M, OW, C): in place for float32 with M = 1, else
  // converted and de-interleaved once per row.
  const bool direct = std::is_same<TC, float>::value && g.m == 1;
  std::vector<float> cbuf(direct ? 0 : g.ow * cm);
  std::vector<int64_t> lo(g.kw), hi(g.kw);
  for (int64_t e = 0; e < g.kw; ++e)
    ValidRange(g.w, g.ow, g.sw, e * g.rw - g.pw, &lo[e], &hi[e]);
  const int64_t a = *std::max_element(lo.begin(), lo.end());
  const int64_t b = *std::min_element(hi.begin(), hi.end());
  tiles.ForRows(tile, [&](int64_t r) {
    const TC* crow = ct + r * g.ow * cm;
    const float* cs;
    if (direct) {
      cs = reinterpret_cast<const float*>(crow);
    } else if (g.m == 1) {
      Convert(crow, cbuf.data(), g.ow * g.c);
      cs = cbuf.data();
    } else {
      for (int64_t o = 0; o < g.ow; ++o)
        for (int64_t c = 0; c < g.c; ++c)
          for (int64_t m = 0; m < g.m; ++m)
            cbuf[(m * g.ow + o) * g.c + c] = Pack<1>::Load(crow + (o * g.c + c) * g.m + m);
      cs = cbuf.data();
    }
    const int nt = RowTaps(g, r, rows.data(), tap.data());
    for (int t = 0; t < nt; ++t) {
      xr[t] = in.Get(rows[t]);
      pr[t] = part + tap[t] * g.kw * cm;
    }
    row_fn(g, xr.data(), pr.data(), nt, cs, lo.data(), hi.data(), a, b);
  });
}

// ---------------------------------------------------------------------------
// Input gradient: dx[i, c] = sum over taps t and multiplier indices m with
// i = o * s + t * r - p of ct[o, c * M + m] * w[t, m, c]. With unit strides
// and M = 1 this is a forward convolution of ct with the flipped kernel
// (RunInputGrad hands it to the forward kernels); otherwise the transposed
// convolution in gather form below, which needs no dilated or padded copy
// of ct and sums the multiplier as it goes.

// Cotangent rows as float32 (M, OW, C): ct itself for float32 with M = 1,
// else converted and de-interleaved through a RowCache.
template <typename TC>
class CotangentRows {
 public:
  // The ct rows of one dx row span (K - 1) * R / S + 1 planes and rows; a
  // band of dx rows about (band + (K - 1) * R) / S + 1 rows.
  CotangentRows(const Geom& g, const TC* ct, const Tiles& tiles)
      : g_(g), ct_(ct), len_(g.ow * g.c * g.m),
        direct_(std::is_same<TC, float>::value && g.m == 1),
        cache_(g.oh, direct_ ? 0 : len_, (g.kd - 1) * g.rd / g.sd + 1,
               (tiles.band + (g.kh - 1) * g.rh) / g.sh + 2) {}

  const float* Get(int64_t row) {
    if (direct_) return reinterpret_cast<const float*>(ct_ + row * len_);
    return cache_.Get(row, [&](int64_t r, float* out) {
      const TC* in = ct_ + r * len_;
      if (g_.m == 1) {
        Convert(in, out, len_);
        return;
      }
      for (int64_t o = 0; o < g_.ow; ++o)
        for (int64_t c = 0; c < g_.c; ++c)
          for (int64_t m = 0; m < g_.m; ++m)
            out[(m * g_.ow + o) * g_.c + c] = Pack<1>::Load(in + (o * g_.c + c) * g_.m + m);
    });
  }

 private:
  const Geom& g_;
  const TC* ct_;
  int64_t len_;
  bool direct_;
  RowCache cache_;
};

// acc[p][v] = sum over rows t and taps k of
// src[t][base + off[k] + p * ps + c0 + v * width] * wr[t][woff[k] + c0 + v * width].
template <int N, int NV, int NP>
inline void GatherSums(const float* const* src, const float* const* wr, int nt,
                       const int64_t* off, const int64_t* woff, int nk, int64_t base, int64_t ps,
                       int64_t c0, typename Pack<N>::V (&acc)[NP][NV]) {
  using V = typename Pack<N>::V;
  constexpr int L = N, S = NP == 1 ? 2 : 1;
  V sums[S][NP][NV];
  for (int s = 0; s < S; ++s)
    for (int p = 0; p < NP; ++p)
      for (int v = 0; v < NV; ++v) sums[s][p][v] = Pack<N>::Zero();
  int h = 0;
  for (int t = 0; t < nt; ++t) {
    const float* x = src[t] + base + c0;
    const float* w = wr[t] + c0;
    for (int k = 0; k < nk; ++k, h ^= S - 1) {
      V wv[NV];
      for (int v = 0; v < NV; ++v) wv[v] = Pack<N>::Load(w + woff[k] + v * L);
      for (int p = 0; p < NP; ++p)
        for (int v = 0; v < NV; ++v)
          sums[h][p][v] += Pack<N>::Load(x + off[k] + p * ps + v * L) * wv[v];
    }
  }
  for (int p = 0; p < NP; ++p)
    for (int v = 0; v < NV; ++v) {
      acc[p][v] = sums[0][p][v];
      if constexpr (S > 1) acc[p][v] += sums[1][p][v];
    }
}

// The W taps of the inputs iw = rho + SW * q (one residue class rho): for
// every (e, m) whose output o = q + delta is an integer, the offsets of
// ct[o] (in the (M, OW, C) row) and of w[e, m] (in the (KW, M, C) row).
struct ResidueTaps {
  std::vector<int64_t> delta, off, woff;
  int64_t qlo = 0, qhi = 0, count = 0;  // interior [qlo, qhi) of [0, count)
};

inline ResidueTaps MakeResidueTaps(const Geom& g, int64_t rho) {
  ResidueTaps rt;
  rt.count = std::max<int64_t>(0, CeilDiv(g.w - rho, g.sw));
  int64_t dmin = 0, dmax = 0;
  for (int64_t e = 0; e < g.kw; ++e) {
    const int64_t num = rho + g.pw - e * g.rw;
    if (num % g.sw != 0) continue;
    const int64_t delta = num / g.sw;
    if (rt.delta.empty()) dmin = dmax = delta;
    dmin = std::min(dmin, delta);
    dmax = std::max(dmax, delta);
    for (int64_t m = 0; m < g.m; ++m) {
      rt.delta.push_back(delta);
      rt.off.push_back((m * g.ow + delta) * g.c);
      rt.woff.push_back((e * g.m + m) * g.c);
    }
  }
  rt.qlo = std::min(rt.count, std::max<int64_t>(0, -dmin));
  rt.qhi = std::max(rt.qlo, std::min(rt.count, g.ow - dmax));
  return rt;
}

// One input row, channels [c0, c0 + NV * width), residue class `rt`;
// `out` is the (W, C) float32 row; ek/eoff/ewoff are scratch.
template <int N, int NV>
void InputGradBlock(const Geom& g, const float* const* src, const float* const* wr, int nt,
                    const ResidueTaps& rt, int64_t rho, int64_t c0, float* out, int64_t* eoff,
                    int64_t* ewoff) {
  using V = typename Pack<N>::V;
  constexpr int L = N;
  const int nk = static_cast<int>(rt.off.size());
  auto emit = [&](int64_t q, const V* acc) {
    for (int v = 0; v < NV; ++v) Pack<N>::Store(out + (rho + q * g.sw) * g.c + c0 + v * L, acc[v]);
  };
  auto edge = [&](int64_t q) {  // only the taps whose output lies in [0, OW)
    int n = 0;
    for (int k = 0; k < nk; ++k) {
      const int64_t o = q + rt.delta[k];
      if (o < 0 || o >= g.ow) continue;
      eoff[n] = rt.off[k];
      ewoff[n] = rt.woff[k];
      ++n;
    }
    V acc[1][NV];
    GatherSums<N, NV, 1>(src, wr, n > 0 ? nt : 0, eoff, ewoff, n, q * g.c, g.c, c0, acc);
    emit(q, acc[0]);
  };
  int64_t q = 0;
  for (; q < rt.qlo; ++q) edge(q);
  for (; q + 4 <= rt.qhi; q += 4) {
    V acc[4][NV];
    GatherSums<N, NV, 4>(src, wr, nt, rt.off.data(), rt.woff.data(), nk, q * g.c, g.c, c0, acc);
    for (int p = 0; p < 4; ++p) emit(q + p, acc[p]);
  }
  for (; q < rt.qhi; ++q) {
    V acc[1][NV];
    GatherSums<N, NV, 1>(src, wr, nt, rt.off.data(), rt.woff.data(), nk, q * g.c, g.c, c0, acc);
    emit(q, acc[0]);
  }
  for (; q < rt.count; ++q) edge(q);
}

template <typename TC, typename TO>
void InputGradRows(const Geom& g, const TC* ct, const float* w, TO* dx, const Tiles& tiles,
                   int64_t tile) {
  const int64_t cm = g.c * g.m, taps = g.kd * g.kh;
  CotangentRows<TC> rows(g, ct, tiles);
  std::vector<const float*> src(taps), wr(taps);
  std::vector<ResidueTaps> classes;
  for (int64_t rho = 0; rho < g.sw; ++rho) classes.push_back(MakeResidueTaps(g, rho));
  std::vector<int64_t> eoff(g.kw * g.m), ewoff(g.kw * g.m);
  const bool direct = std::is_same<TO, float>::value;
  std::vector<float> tmp(direct ? 0 : g.w * g.c);
  tiles.ForRows(tile, [&](int64_t r) {
    const int64_t n = r / (g.d * g.h), id = (r / g.h) % g.d, ih = r % g.h;
    int nt = 0;
    for (int64_t a = 0; a < g.kd; ++a) {
      const int64_t nd = id + g.pd - a * g.rd;
      if (nd % g.sd != 0 || nd < 0 || nd / g.sd >= g.od) continue;
      for (int64_t b = 0; b < g.kh; ++b) {
        const int64_t nh = ih + g.ph - b * g.rh;
        if (nh % g.sh != 0 || nh < 0 || nh / g.sh >= g.oh) continue;
        src[nt] = rows.Get((n * g.od + nd / g.sd) * g.oh + nh / g.sh);
        wr[nt] = w + (a * g.kh + b) * g.kw * cm;
        ++nt;
      }
    }
    TO* xrow = dx + r * g.w * g.c;
    float* out = direct ? reinterpret_cast<float*>(xrow) : tmp.data();
    for (int64_t rho = 0; rho < g.sw; ++rho) {
      const ResidueTaps& rt = classes[rho];
      ForChannels(g.c, [&](auto n, auto nv, int64_t c0) {
        InputGradBlock<n, nv>(g, src.data(), wr.data(), nt, rt, rho, c0, out, eoff.data(),
                              ewoff.data());
      });
    }
    if (!direct) Convert(tmp.data(), xrow, g.w * g.c);
  });
}

// The row kernels for g's W shape (a Fixed one when there is one).
template <typename Pick>
auto WithShape(const Geom& g, bool generic, Pick pick) {
  switch (generic ? 0 : g.kw * 100 + g.sw * 10 + g.rw) {
    case 311: return pick(Fixed<3, 1, 1>{});
    case 321: return pick(Fixed<3, 2, 1>{});
    case 312: return pick(Fixed<3, 1, 2>{});
    case 511: return pick(Fixed<5, 1, 1>{});
    case 521: return pick(Fixed<5, 2, 1>{});
    case 512: return pick(Fixed<5, 1, 2>{});
    case 711: return pick(Fixed<7, 1, 1>{});
    case 721: return pick(Fixed<7, 2, 1>{});
    default: return pick(Generic{});
  }
}

// ---------------------------------------------------------------------------
// Parallel loop over chunks: the calling thread and up to num_threads - 1
// tasks on XLA's pool take chunks from a shared counter. A task that starts
// late finds no chunk left and returns without touching `body`, and the
// caller waits only for chunks that were taken, so this never deadlocks,
// even when the pool runs tasks inline or has a single thread.

struct Progress {
  std::atomic<int64_t> next{0}, done{0};
  std::mutex mu;
  std::condition_variable cv;
};

template <typename F>
void ParallelFor(ffi::ThreadPool* pool, int64_t n, bool parallel, const F& body) {
  const int64_t threads = (pool != nullptr && parallel) ? pool->num_threads() : 0;
  if (threads <= 1 || n <= 1) {
    for (int64_t i = 0; i < n; ++i) body(i);
    return;
  }
  auto progress = std::make_shared<Progress>();
  const F* fn = &body;
  auto work = [progress, fn, n]() {
    for (;;) {
      const int64_t i = progress->next.fetch_add(1);
      if (i >= n) return;
      (*fn)(i);
      if (progress->done.fetch_add(1) + 1 == n) {
        std::lock_guard<std::mutex> lock(progress->mu);
        progress->cv.notify_all();
      }
    }
  };
  for (int64_t t = 1; t < std::min(threads, n); ++t) pool->Schedule(decltype(work)(work));
  work();
  std::unique_lock<std::mutex> lock(progress->mu);
  progress->cv.wait(lock, [&] { return progress->done.load() == n; });
}

// Problems with fewer multiply-adds than this run on the calling thread.
constexpr int64_t kMinParallelWork = 1 << 18;

inline int64_t Work(const Geom& g) { return g.rows() * g.ow * g.c * g.m * g.taps(); }

// The loops skip the zero padding, but 0 * inf and 0 * NaN are NaN: with a
// non-finite weight, every output whose tap with that weight lands in the
// padding is NaN (as in the float64 reference and XLA's lowerings). Only
// then (rare) this pass marks those outputs, one float at a time.
template <typename TO>
void PoisonPaddedTaps(const Geom& g, const float* w, TO* y) {
  std::vector<int64_t> bad;  // (tap, m, c) of the non-finite weights
  for (int64_t i = 0; i < g.taps() * g.m * g.c; ++i)
    if (!std::isfinite(w[i])) bad.push_back(i);
  if (bad.empty()) return;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (int64_t r = 0; r < g.rows(); ++r) {
    const int64_t od = (r / g.oh) % g.od, oh = r % g.oh;
    for (int64_t o = 0; o < g.ow; ++o) {
      for (int64_t i : bad) {
        const int64_t c = i % g.c, m = i / g.c % g.m, t = i / (g.c * g.m);
        const int64_t a = t / (g.kh * g.kw), b = t / g.kw % g.kh, e = t % g.kw;
        const int64_t id = od * g.sd + a * g.rd - g.pd, ih = oh * g.sh + b * g.rh - g.ph;
        const int64_t iw = o * g.sw + e * g.rw - g.pw;
        if (id < 0 || id >= g.d || ih < 0 || ih >= g.h || iw < 0 || iw >= g.w)
          Pack<1>::Store(y + (r * g.ow + o) * g.c * g.m + c * g.m + m, nan);
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Channels-first (g.cf = 1): x and dx (N, C, D, H, W), y and ct
// (N, C * M, OD, OH, OW); w and dk keep their (KD, KH, KW, M, C) layout.
// Every (n, c) is its own D x H x W volume, so these kernels vectorise
// along W instead of over channels. A tile (a run of planes (n, c, od)
// times a band of rows, see Tiles) first copies the rows its band reads of
// each input plane, converted to float32, into a zero-padded buffer
// (`CfPlanes`; rows and planes outside the volume are zeros), each row
// de-interleaved into SW phases so that tap e of consecutive outputs is one
// contiguous load at a fixed offset (`CfRows::eoff`). Every output row is
// then the same list of (weight, shifted buffer row) terms, summed for R
// rows x NV packets of outputs at once in registers; the zero padding takes
// part in the sums, so a non-finite weight meets it as in XLA's lowering
// (0 * inf = NaN). Outputs are padded to whole packets in the buffers; the
// tail of a row is stored through a scratch packet.

constexpr int L = kLanes;
constexpr int64_t kCfMinBand = 8;  // rows: whole blocks of rows (CfRowBlocks) in a band
constexpr int64_t kPrefetchBytes = 4 << 10;  // how far ahead input rows are prefetched
using CfV = Pack<kLanes>::V;

// Rows per block for NV packets: R * NV accumulators fill about half the
// vector registers.
template <int NV>
constexpr int CfRowsPerBlock() {
  return std::max(1, std::min(8, kRegisters / 2 / NV));
}

// Shuffle masks that interleave two packets a, b: a0 b0 a1 b1 ... (lo, hi half).
inline Pack<L>::U Weave(int half) {
  Pack<L>::U m{};
  for (int i = 0; i < L; ++i) m[i] = static_cast<uint32_t>(half * L / 2 + i / 2 + (i % 2) * L);
  return m;
}
const Pack<L>::U kWeaveLo = Weave(0), kWeaveHi = Weave(1);

inline int64_t RoundUp(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// The padded, phased copy of a row of `width` values read with stride `s`,
// dilation `r`, low padding `p` and `k` taps by `out` outputs (rounded up to
// packets): buffer[ph * q + i] = row[i * s + ph - p] (zero outside).
struct CfRows {
  int64_t s, p, width, q, len;
  std::vector<int64_t> eoff;  // tap e at output o reads buffer[eoff[e] + o]
  CfRows(int64_t width_, int64_t out, int64_t k, int64_t s_, int64_t r, int64_t p_)
      : s(s_), p(p_), width(width_) {
    q = RoundUp(out, L) + (k - 1) * r / s;
    len = s * q;
    for (int64_t e = 0; e < k; ++e) eoff.push_back((e * r % s) * q + e * r / s);
  }
  template <typename T>
  void Fill(const T* row, float* out) const {
    if (s == 1) {
      const int64_t lo = std::min(q, std::max<int64_t>(0, p));
      const int64_t hi = std::max(lo, std::min(q, p + width));
      std::fill(out, out + lo, 0.0f);
      Convert(row + (lo - p), out + lo, hi - lo);
      std::fill(out + hi, out + q, 0.0f);
      return;
    }
    for (int64_t ph = 0; ph < s; ++ph) {  // i * s + ph - p in [0, width) for i in [lo, hi)
      const int64_t lo = std::min(q, std::max<int64_t>(0, CeilDiv(p - ph, s)));
      const int64_t hi = std::max(lo, std::min(q, CeilDiv(width + p - ph, s)));
      float* o = out + ph * q;
      std::fill(o, o + lo, 0.0f);
      const T* in = row + ph - p;
      for (int64_t i = lo; i < hi; ++i) o[i] = Pack<1>::Load(in + i * s);
      std::fill(o + hi, o + q, 0.0f);
    }
  }
};

// Buffers of `count` rows of `len` floats for the `span` planes read last
// (slot key % span; the planes one output plane reads have consecutive keys).
// Rows are filled on demand, in order (`FillTo`), so that reading the
// input from memory interleaves with the arithmetic on rows already there.
class CfPlanes {
 public:
  CfPlanes(int64_t len, int64_t count, int64_t span)
      : len_(len), count_(count), span_(span), keys_(span, -1), filled_(span, 0),
        data_(span * len * count) {}
  // The slot of plane `key` (emptied when it held another plane).
  int64_t Slot(int64_t key) {
    const int64_t slot = key % span_;
    if (keys_[slot] != key) keys_[slot] = key, filled_[slot] = 0;
    return slot;
  }
  float* Data(int64_t slot) { return &data_[slot * len_ * count_]; }
  // fill(i, out) writes row i of the slot's plane, for the rows [filled, rows).
  template <typename Fill>
  void FillTo(int64_t slot, int64_t rows, Fill&& fill) {
    rows = std::min(rows, count_);
    for (int64_t i = filled_[slot]; i < rows; ++i) fill(i, Data(slot) + i * len_);
    filled_[slot] = std::max(filled_[slot], rows);
  }

 private:
  int64_t len_, count_, span_;
  std::vector<int64_t> keys_, filled_;
  std::vector<float> data_;
};

// acc[j][v] = sum over k of wk[k] * (src[k] + j * rs)[col + v * L + (0 : L)].
template <int R, int NV>
inline void CfSums(const float* const* src, const float* wk, int nk, int64_t col, int64_t rs,
                   CfV (&acc)[R][NV]) {
#pragma GCC unroll 8
  for (int j = 0; j < R; ++j)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[j][v] = Pack<L>::Zero();
  for (int k = 0; k < nk; ++k) {
    const CfV wv = Pack<L>::Zero() + wk[k];
    const float* s = src[k] + col;  // stepped by rs: no register per (row, packet) offset
#pragma GCC unroll 8
    for (int j = 0; j < R; ++j, s += rs)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[j][v] += wv * Pack<L>::Load(s + v * L);
  }
}

// CfSums for a fixed H shape (KH taps, stride SH, dilation RH): the R rows
// read the buffer rows i = j * SH + b * RH from `src[k] + col` (k = (a, e),
// rows `rs1` apart), each loaded packet feeding every (row, tap b) that
// reads it; wk[k * KH + b] are the weights.
template <int KH, int SH, int RH, int R, int NV>
inline void CfSumsH(const float* const* src, const float* wk, int nk, int64_t col, int64_t rs1,
                    CfV (&acc)[R][NV]) {
  constexpr int I = (R - 1) * SH + (KH - 1) * RH + 1;
#pragma GCC unroll 8
  for (int j = 0; j < R; ++j)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[j][v] = Pack<L>::Zero();
  for (int k = 0; k < nk; ++k) {
    CfV wv[KH];
#pragma GCC unroll 8
    for (int b = 0; b < KH; ++b) wv[b] = Pack<L>::Zero() + wk[k * KH + b];
    const float* s = src[k] + col;
#pragma GCC unroll 32
    for (int i = 0; i < I; ++i, s += rs1)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        const CfV xv = Pack<L>::Load(s + v * L);
#pragma GCC unroll 8
        for (int b = 0; b < KH; ++b) {
          const int q = i - b * RH;
          if (q >= 0 && q % SH == 0 && q / SH < R) acc[q / SH][v] += wv[b] * xv;
        }
      }
  }
}

// Fixed H shapes with their own CfSumsH; HShape<0, 0, 0>: any other.
template <int KH, int SH, int RH>
struct HShape {
  static constexpr int kh = KH, sh = SH, rh = RH;
};

// Calls pick(HShape) for g's H shape.
template <typename Pick>
auto WithHShape(const Geom& g, Pick&& pick) {
  switch (g.kh * 100 + g.sh * 10 + g.rh) {
    case 311: return pick(HShape<3, 1, 1>{});
    case 312: return pick(HShape<3, 1, 2>{});
    case 321: return pick(HShape<3, 2, 1>{});
    case 511: return pick(HShape<5, 1, 1>{});
    case 521: return pick(HShape<5, 2, 1>{});
    case 711: return pick(HShape<7, 1, 1>{});
    default: return pick(HShape<0, 0, 0>{});
  }
}

// R rows out + j * os, `packets` whole packets: the term sums of rows
// `src[k] + off + j * rs` (with a fixed H shape H: of CfSumsH(src, wk, nk,
// ..., rs1)). Not inlined: one copy serves every dtype and caller.
template <int R, typename H = HShape<0, 0, 0>>
__attribute__((noinline)) void CfSumRows(const float* const* src, const float* wk, int nk,
                                         int64_t off, int64_t rs, float* out, int64_t os,
                                         int64_t packets, int64_t rs1) {
  int64_t v0 = 0;
  auto block = [&](auto nv) {
    constexpr int NV = decltype(nv)::value;
    for (; v0 + NV <= packets; v0 += NV) {
      CfV acc[R][NV];
      if constexpr (H::kh > 0) {
        CfSumsH<H::kh, H::sh, H::rh, R, NV>(src, wk, nk, off + v0 * L, rs1, acc);
      } else {
        CfSums<R, NV>(src, wk, nk, off + v0 * L, rs, acc);
      }
#pragma GCC unroll 8
      for (int j = 0; j < R; ++j)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) Pack<L>::Store(out + j * os + (v0 + v) * L, acc[j][v]);
    }
  };
  block(Int<4>{});
  block(Int<2>{});
  block(Int<1>{});
}

using CfSumRowsFn = void (*)(const float* const*, const float*, int, int64_t, int64_t, float*,
                             int64_t, int64_t, int64_t);

// CfSumRows<R> for every block size R that CfRowBlocks uses (1, 2, 4, 8),
// those of more than 2 rows with g's fixed H shape when it has one.
struct CfSumRowsFns {
  CfSumRowsFn fn[9] = {};
  bool fixed[9] = {};  // fn[r] has a fixed H shape (sources and weights per (a, e))
  explicit CfSumRowsFns(const Geom& g) {
    fn[1] = &CfSumRows<1>, fn[2] = &CfSumRows<2>, fn[4] = &CfSumRows<4>, fn[8] = &CfSumRows<8>;
    WithHShape(g, [&](auto h) {
      using H = decltype(h);
      if constexpr (H::kh > 0) {
        fn[4] = &CfSumRows<4, H>, fn[8] = &CfSumRows<8, H>;
        fixed[4] = fixed[8] = true;
      }
      return 0;
    });
  }
};

// Calls f(Int<R>, i) over rows [0, count) in blocks of R, as many as fit
// the packets of a row.
template <typename F>
void CfRowBlocks(int64_t packets, int64_t count, F&& f) {
  int64_t i = 0;
  auto go = [&](auto r) {
    constexpr int R = decltype(r)::value;
    for (; i + R <= count; i += R) f(r, i);
  };
  if (packets >= 4) {
    go(Int<CfRowsPerBlock<4>()>{});
  } else if (packets >= 2) {
    go(Int<CfRowsPerBlock<2>()>{});
  } else {
    go(Int<CfRowsPerBlock<1>()>{});
  }
  go(Int<2>{});
  go(Int<1>{});
}

// The input side of a forward / kernel-gradient tile: for output plane p,
// src[k] (k = tap (a, b, e)) points at the buffered input row that output
// row h0 of the band reads through tap k; output row h0 + i reads
// src[k] + i * rs.
template <typename TI>
class CfInputPlanes {
 public:
  CfInputPlanes(const Geom& g, const TI* x, const Tiles& tiles, int64_t tile)
      : g_(g), x_(x), rows_(g.w, g.ow, g.kw, g.sw, g.rw, g.pw) {
    const int64_t b = tile % tiles.Bands(), q = tile / tiles.Bands();
    p0 = q * tiles.run, p1 = std::min(tiles.planes, (q + 1) * tiles.run);
    h0 = b * tiles.band, h1 = std::min(tiles.height, h0 + tiles.band);
    lo_ = h0 * g.sh - g.ph;
    count_ = (h1 - 1 - h0) * g.sh + (g.kh - 1) * g.rh + 1;
    planes_ = std::make_unique<CfPlanes>(rows_.len, count_, (g.kd - 1) * g.rd + 1);
    zero_.assign(rows_.len * count_, 0.0f);
    rs = g.sh * rows_.len;
    rs1 = rows_.len;
    src.resize(g.taps());
    src_ae.resize(g.kd * g.kw);
  }

  int64_t p0, p1, h0, h1, rs, rs1;
  std::vector<const float*> src;     // per tap (a, b, e)
  std::vector<const float*> src_ae;  // per (a, e): src of (a, 0, e)

  // Output plane p: src for its taps (the rows are filled by `Need`).
  void Plane(int64_t p) {
    const int64_t vol = p / g_.od, od = p % g_.od;
    live_.clear();
    for (int64_t a = 0; a < g_.kd; ++a) {
      const int64_t id = od * g_.sd + a * g_.rd - g_.pd;
      const float* plane = zero_.data();
      if (id >= 0 && id < g_.d) {
        const int64_t slot = planes_->Slot(vol * g_.d + id);
        live_.emplace_back(slot, x_ + (vol * g_.d + id) * g_.h * g_.w);
        plane = planes_->Data(slot);
      }
      for (int64_t b = 0; b < g_.kh; ++b)
        for (int64_t e = 0; e < g_.kw; ++e)
          src[(a * g_.kh + b) * g_.kw + e] = plane + b * g_.rh * rows_.len + rows_.eoff[e];
      for (int64_t e = 0; e < g_.kw; ++e) src_ae[a * g_.kw + e] = plane + rows_.eoff[e];
    }
  }

  // Fills the input rows that the band's output rows [h0, h0 + rows) read.
  void Need(int64_t rows) {
    const int64_t upto = (rows - 1) * g_.sh + (g_.kh - 1) * g_.rh + 1;
    for (const auto& [slot, xp] : live_)
      planes_->FillTo(slot, upto, [&, xp = xp](int64_t i, float* out) {
        const int64_t ih = lo_ + i;
        if (ih >= 0 && ih < g_.h) {
          rows_.Fill(xp + ih * g_.w, out);
          // Ahead of the next blocks (into the next plane at the end: the
          // planes of a volume follow each other in memory).
          const char* ahead = reinterpret_cast<const char*>(xp + ih * g_.w) + kPrefetchBytes;
          for (int64_t b = 0; b < static_cast<int64_t>(g_.w * sizeof(TI)); b += 64)
            __builtin_prefetch(ahead + b);
        } else {
          std::fill(out, out + rows_.len, 0.0f);
        }
      });
  }

 private:
  const Geom& g_;
  const TI* x_;
  CfRows rows_;
  int64_t lo_, count_;
  std::unique_ptr<CfPlanes> planes_;
  std::vector<float> zero_;
  std::vector<std::pair<int64_t, const TI*>> live_;  // slot, plane of x
};

// Prefetches for writing the `count` outputs kPrefetchBytes after `out`
// (without it, the stores wait for their lines to come from memory).
template <typename TO>
inline void CfPrefetchOut(const TO* out, int64_t count) {
  const char* ahead = reinterpret_cast<const char*>(out) + kPrefetchBytes;
  for (int64_t b = 0; b < count * static_cast<int64_t>(sizeof(TO)); b += 64)
    __builtin_prefetch(ahead + b, 1);
}

// Prefetches `count` values from `p` for reading.
template <typename T>
inline void CfPrefetch(const T* p, int64_t count) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t b = 0; b < count * static_cast<int64_t>(sizeof(T)); b += 64)
    __builtin_prefetch(c + b);
}

template <typename TI, typename TO>
void CfForwardTile(const Geom& g, const TI* x, const float* w, TO* y, const Tiles& tiles,
                   int64_t tile) {
  const CfSumRowsFns fns(g);
  CfInputPlanes<TI> in(g, x, tiles, tile);
  const int64_t nk = g.taps(), nae = g.kd * g.kw, packets = (g.ow + L - 1) / L;
  std::vector<float> wk(nk), wk_ae(nk);  // per tap (a, b, e); per (a, e, b)
  // float32 rows of whole packets are written in place, others through `rows`.
  const bool direct = std::is_same<TO, float>::value && g.ow % L == 0;
  std::vector<float> rows(direct ? 0 : 8 * packets * L);
  for (int64_t p = in.p0; p < in.p1; ++p) {
    const int64_t vol = p / g.od, c = vol % g.c, n = vol / g.c, od = p % g.od;
    in.Plane(p);
    for (int64_t m = 0; m < g.m; ++m) {
      for (int64_t k = 0; k < nk; ++k) {
        const int64_t a = k / (g.kh * g.kw), b = k / g.kw % g.kh, e = k % g.kw;
        wk[k] = w[(k * g.m + m) * g.c + c];
        wk_ae[(a * g.kw + e) * g.kh + b] = wk[k];
      }
      TO* out = y + ((((n * g.c + c) * g.m + m) * g.od + od) * g.oh + in.h0) * g.ow;
      CfRowBlocks(packets, in.h1 - in.h0, [&](auto r, int64_t i) {
        constexpr int R = decltype(r)::value;
        in.Need(i + R);
        CfPrefetchOut(out + i * g.ow, R * g.ow);
        float* o = direct ? reinterpret_cast<float*>(out + i * g.ow) : rows.data();
        const int64_t os = direct ? g.ow : packets * L;
        if (fns.fixed[R]) {
          fns.fn[R](in.src_ae.data(), wk_ae.data(), static_cast<int>(nae), i * in.rs, in.rs, o,
                    os, packets, in.rs1);
        } else {
          fns.fn[R](in.src.data(), wk.data(), static_cast<int>(nk), i * in.rs, in.rs, o, os,
                    packets, in.rs1);
        }
        if (!direct)
          for (int j = 0; j < R; ++j) Convert(o + j * os, out + (i + j) * g.ow, g.ow);
      });
    }
  }
}

// part[k] (L floats) += sum over rows j and packets v of
// ct[j][col + v] * (src[k] + off + j * rs)[col + v].
template <int R, int NV>
inline void CfDots(const float* const* src, int nk, int64_t off, int64_t rs,
                   const float* const* ct, int64_t col, float* part) {
  CfV cv[R][NV];
#pragma GCC unroll 8
  for (int j = 0; j < R; ++j)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) cv[j][v] = Pack<L>::Load(ct[j] + col + v * L);
  for (int k = 0; k < nk; ++k) {
    const float* s = src[k] + off + col;
    CfV sum[2] = {Pack<L>::Zero(), Pack<L>::Zero()};
#pragma GCC unroll 8
    for (int j = 0; j < R; ++j, s += rs)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) sum[(j * NV + v) & 1] += cv[j][v] * Pack<L>::Load(s + v * L);
    Pack<L>::Store(part + k * L, Pack<L>::Load(part + k * L) + (sum[0] + sum[1]));
  }
}

// One tile's kernel-gradient sums, dk-shaped (KD, KH, KW, M, C), into `part`:
// per channel in packets (`acc`), reduced in a fixed order when the tile
// moves on to another channel.
template <typename TI, typename TC>
void CfKernelGradTile(const Geom& g, const TI* x, const TC* ct, float* part, const Tiles& tiles,
                      int64_t tile) {
  CfInputPlanes<TI> in(g, x, tiles, tile);
  const int64_t nk = g.taps(), packets = (g.ow + L - 1) / L, rmax = 8;
  // ct rows as float32 padded with zeros to whole packets (in place when they are).
  const bool direct = std::is_same<TC, float>::value && g.ow % L == 0;
  std::vector<float> cbuf(direct ? 0 : rmax * packets * L, 0.0f), acc(g.m * nk * L, 0.0f);
  int64_t acc_c = -1;
  auto flush = [&]() {
    if (acc_c < 0) return;
    for (int64_t m = 0; m < g.m; ++m)
      for (int64_t k = 0; k < nk; ++k) {
        float s = 0.0f;
        for (int l = 0; l < L; ++l) s += acc[(m * nk + k) * L + l];
        part[(k * g.m + m) * g.c + acc_c] += s;
      }
    std::fill(acc.begin(), acc.end(), 0.0f);
  };
  for (int64_t p = in.p0; p < in.p1; ++p) {
    const int64_t vol = p / g.od, c = vol % g.c, n = vol / g.c, od = p % g.od;
    if (c != acc_c) {
      flush();
      acc_c = c;
    }
    in.Plane(p);
    for (int64_t m = 0; m < g.m; ++m) {
      const TC* crows = ct + ((((n * g.c + c) * g.m + m) * g.od + od) * g.oh + in.h0) * g.ow;
      CfRowBlocks(packets, in.h1 - in.h0, [&](auto r, int64_t i) {
        constexpr int R = decltype(r)::value;
        in.Need(i + R);
        const float* cr[R];
        for (int j = 0; j < R; ++j) {
          const TC* crow = crows + (i + j) * g.ow;
          if (direct) {
            cr[j] = reinterpret_cast<const float*>(crow);
          } else {
            Convert(crow, &cbuf[j * packets * L], g.ow);  // the tail stays zero
            cr[j] = &cbuf[j * packets * L];
          }
        }
        const float* const* src = in.src.data();
        const int64_t off = i * in.rs;
        float* pm = &acc[m * nk * L];
        const int n_k = static_cast<int>(nk);
        int64_t v0 = 0;
        for (; v0 + 4 <= packets; v0 += 4) CfDots<R, 4>(src, n_k, off, in.rs, cr, v0 * L, pm);
        for (; v0 + 2 <= packets; v0 += 2) CfDots<R, 2>(src, n_k, off, in.rs, cr, v0 * L, pm);
        for (; v0 < packets; ++v0) CfDots<R, 1>(src, n_k, off, in.rs, cr, v0 * L, pm);
      });
    }
  }
  flush();
}

// Input gradient in gather form (strides or M > 1). Along W, position
// u = iw + PW = i * SW + ph sums, over the taps e with
// (e * RW - ph) % SW == 0, ct[i - (e * RW - ph) / SW] * w[e]: per phase ph
// the taps and their offsets in a zero-padded ct row covering every o read
// (`Fill`: out[i] = ct[q0 - smax + i]).
struct CfGather {
  int64_t q0, qn, smax, len;
  std::vector<std::vector<int64_t>> taps, offs;  // per phase
  explicit CfGather(const Geom& g) : taps(g.sw), offs(g.sw) {
    q0 = FloorDiv(g.pw, g.sw);
    qn = RoundUp(FloorDiv(g.pw + g.w - 1, g.sw) - q0 + 1, L);
    smax = (g.kw - 1) * g.rw / g.sw;
    len = qn + smax;
    for (int64_t ph = 0; ph < g.sw; ++ph)
      for (int64_t e = 0; e < g.kw; ++e)
        if ((e * g.rw - ph) % g.sw == 0) {
          taps[ph].push_back(e);
          offs[ph].push_back(smax - (e * g.rw - ph) / g.sw);
        }
  }
  template <typename T>
  void Fill(const Geom& g, const T* row, float* out) const {
    const int64_t first = q0 - smax;  // out[i] = row[first + i]
    const int64_t lo = std::min(len, std::max<int64_t>(0, -first));
    const int64_t hi = std::max(lo, std::min(len, g.ow - first));
    std::fill(out, out + lo, 0.0f);
    Convert(row + first + lo, out + lo, hi - lo);
    std::fill(out + hi, out + len, 0.0f);
  }
};

// dx rows of a tile: plane p = (n, c, id), rows [h0, h1) taken by class
// (rows h, h + SH, ...: the same ct rows shifted by one, the same taps).
template <typename TC, typename TO>
void CfInputGradTile(const Geom& g, const TC* ct, const float* w, TO* dx, const Tiles& tiles,
                     int64_t tile) {
  const CfGather gather(g);
  const int64_t b = tile % tiles.Bands(), q = tile / tiles.Bands();
  const int64_t p0 = q * tiles.run, p1 = std::min(tiles.planes, (q + 1) * tiles.run);
  const int64_t h0 = b * tiles.band, h1 = std::min(tiles.height, h0 + tiles.band);
  // The ct rows the band reads: [lo, lo + count).
  const int64_t lo = FloorDiv(h0 + g.ph - (g.kh - 1) * g.rh, g.sh);
  const int64_t count = FloorDiv(h1 - 1 + g.ph, g.sh) - lo + 1;
  std::vector<std::unique_ptr<CfPlanes>> planes;
  for (int64_t m = 0; m < g.m; ++m)
    planes.push_back(std::make_unique<CfPlanes>(gather.len, count, (g.kd - 1) * g.rd / g.sd + 1));
  const int64_t cm = g.c * g.m, nkmax = g.taps() * g.m, rmax = 8;
  std::vector<const float*> pa(g.kd * g.m), src(g.sw * nkmax);
  std::vector<int64_t> valid_a;
  std::vector<int> nks(g.sw);
  std::vector<float> wk(g.sw * nkmax), phases(rmax * g.sw * gather.qn), woven(2 * gather.qn);
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t vol = p / g.d, c = vol % g.c, n = vol / g.c, id = p % g.d;
    valid_a.clear();
    for (int64_t a = 0; a < g.kd; ++a) {
      const int64_t nd = id + g.pd - a * g.rd;
      if (nd % g.sd != 0 || nd < 0 || nd / g.sd >= g.od) continue;
      const int64_t od = nd / g.sd;
      valid_a.push_back(a);
      for (int64_t m = 0; m < g.m; ++m) {
        const TC* base = ct + ((n * cm + c * g.m + m) * g.od + od) * g.oh * g.ow;
        const int64_t slot = planes[m]->Slot(vol * g.od + od);
        planes[m]->FillTo(slot, count, [&](int64_t i, float* out) {
          const int64_t oh = lo + i;
          if (oh >= 0 && oh < g.oh) {
            gather.Fill(g, base + oh * g.ow, out);
          } else {
            std::fill(out, out + gather.len, 0.0f);
          }
        });
        pa[a * g.m + m] = planes[m]->Data(slot);
        CfPrefetch(base + g.oh * g.ow, g.oh * g.ow);  // the next plane's (from memory)
      }
    }
    for (int64_t first = h0; first < std::min(h1, h0 + g.sh); ++first) {
      // The terms of row `first` per W phase; row first + i * SH reads the
      // same rows shifted by i.
      for (int64_t ph = 0; ph < g.sw; ++ph) {
        const auto& taps = gather.taps[ph];
        const auto& offs = gather.offs[ph];
        int nk = 0;
        for (int64_t a : valid_a)
          for (int64_t bb = 0; bb < g.kh; ++bb) {
            const int64_t nh = first + g.ph - bb * g.rh;
            if (FloorDiv(nh, g.sh) * g.sh != nh) continue;
            const int64_t row = nh / g.sh - lo;
            for (int64_t m = 0; m < g.m; ++m)
              for (size_t i = 0; i < taps.size(); ++i, ++nk) {
                wk[ph * nkmax + nk] = w[(((a * g.kh + bb) * g.kw + taps[i]) * g.m + m) * g.c + c];
                src[ph * nkmax + nk] = pa[a * g.m + m] + row * gather.len + offs[i];
              }
          }
        nks[ph] = nk;
      }
      CfRowBlocks(gather.qn / L, (h1 - 1 - first) / g.sh + 1, [&](auto r, int64_t i) {
        constexpr int R = decltype(r)::value;
        const int64_t os = g.sw * gather.qn;  // between the rows of `phases`
        for (int64_t ph = 0; ph < g.sw; ++ph) {
          float* out = &phases[ph * gather.qn];
          if (nks[ph] == 0) {
            for (int j = 0; j < R; ++j) std::fill(out + j * os, out + j * os + gather.qn, 0.0f);
          } else {
            CfSumRows<R>(&src[ph * nkmax], &wk[ph * nkmax], nks[ph], i * gather.len, gather.len,
                         out, os, gather.qn / L, 0);
          }
        }
        for (int j = 0; j < R; ++j) {  // the phases interleaved into dx
          TO* xrow = dx + (p * g.h + first + (i + j) * g.sh) * g.w;
          CfPrefetchOut(xrow, g.w);
          const float* row = &phases[j * os];
          if (g.sw == 1) {
            Convert(row + (g.pw - gather.q0), xrow, g.w);
            continue;
          }
          if (g.sw == 2) {  // interleaved in packets: woven[u - 2 * q0]
            for (int64_t v = 0; v < gather.qn; v += L) {
              const CfV a = Pack<L>::Load(row + v), b = Pack<L>::Load(row + gather.qn + v);
              Pack<L>::Store(&woven[2 * v], __builtin_shuffle(a, b, kWeaveLo));
              Pack<L>::Store(&woven[2 * v + L], __builtin_shuffle(a, b, kWeaveHi));
            }
            Convert(woven.data() + g.pw - 2 * gather.q0, xrow, g.w);
            continue;
          }
          for (int64_t ph = 0; ph < g.sw; ++ph) {  // iw = iw0 + t * SW: u = (u0 + t) * SW + ph
            const int64_t iw0 = ((ph - g.pw) % g.sw + g.sw) % g.sw;
            const float* in = row + ph * gather.qn + (iw0 + g.pw - ph) / g.sw - gather.q0;
            for (int64_t iw = iw0, t = 0; iw < g.w; iw += g.sw, ++t)
              Pack<1>::Store(xrow + iw, in[t]);
          }
        }
      });
    }
  }
}

template <typename TI, typename TO>
void RunForwardCf(ffi::ThreadPool* pool, const Geom& g, const TI* x, const float* w, TO* y) {
  const Tiles tiles =
      MakeTiles(g.n * g.c * g.od, g.oh, g.w * sizeof(TI), g.kd, g.kh, kCfMinBand);
  ParallelFor(pool, tiles.Count(), Work(g) >= kMinParallelWork,
              [&](int64_t i) { CfForwardTile(g, x, w, y, tiles, i); });
}

template <typename TI, typename TC>
void RunKernelGradCf(ffi::ThreadPool* pool, const Geom& g, const TI* x, const TC* ct, float* dk) {
  const int64_t size = g.taps() * g.m * g.c;
  const Tiles tiles =
      MakeTiles(g.n * g.c * g.od, g.oh, g.w * sizeof(TI), g.kd, g.kh, kCfMinBand);
  const int64_t chunks = tiles.Count();
  std::vector<float> parts(chunks * size, 0.0f);
  ParallelFor(pool, chunks, Work(g) >= kMinParallelWork, [&](int64_t i) {
    CfKernelGradTile(g, x, ct, parts.data() + i * size, tiles, i);
  });
  std::fill(dk, dk + size, 0.0f);
  for (int64_t i = 0; i < chunks; ++i)
    for (int64_t j = 0; j < size; ++j) dk[j] += parts[i * size + j];
}

template <typename TC, typename TO>
void RunInputGradCf(ffi::ThreadPool* pool, const Geom& g, const TC* ct, const float* w, TO* dx) {
  const Tiles tiles = MakeTiles(g.n * g.c * g.d, g.h, g.ow * sizeof(TC) * g.m,
                                CeilDiv(g.kd, g.sd), CeilDiv(g.kh, g.sh), kCfMinBand);
  ParallelFor(pool, tiles.Count(), Work(g) >= kMinParallelWork,
              [&](int64_t i) { CfInputGradTile(g, ct, w, dx, tiles, i); });
}

template <typename TI, typename TO>
void RunForward(ffi::ThreadPool* pool, const Geom& g, const TI* x, const float* w, TO* y,
                bool generic = false) {
  if (g.cf) {
    RunForwardCf(pool, g, x, w, y);
    return;
  }
  const Tiles tiles = MakeTiles(g.n * g.od, g.oh, g.w * g.c * sizeof(TI), g.kd, g.kh);
  const ForwardRowFn row_fn =
      WithShape(g, generic, [](auto shape) -> ForwardRowFn { return ForwardRow<decltype(shape)>; });
  ParallelFor(pool, tiles.Count(), Work(g) >= kMinParallelWork,
              [&](int64_t i) { ForwardRows(g, row_fn, x, w, y, tiles, i); });
  PoisonPaddedTaps(g, w, y);
}

template <typename TI, typename TC>
void RunKernelGrad(ffi::ThreadPool* pool, const Geom& g, const TI* x, const TC* ct, float* dk,
                   bool generic = false) {
  if (g.cf) {
    RunKernelGradCf(pool, g, x, ct, dk);
    return;
  }
  const int64_t size = g.taps() * g.m * g.c;
  std::fill(dk, dk + size, 0.0f);
  const Tiles tiles = MakeTiles(g.n * g.od, g.oh, g.w * g.c * sizeof(TI), g.kd, g.kh);
  const int64_t chunks = tiles.Count();
  const KernelGradRowFn row_fn = WithShape(
      g, generic, [](auto shape) -> KernelGradRowFn { return KernelGradRow<decltype(shape)>; });
  std::vector<float> parts(chunks * size, 0.0f);
  ParallelFor(pool, chunks, Work(g) >= kMinParallelWork, [&](int64_t i) {
    KernelGradRows(g, row_fn, x, ct, parts.data() + i * size, tiles, i);
  });
  for (int64_t i = 0; i < chunks; ++i)
    for (int64_t j = 0; j < size; ++j) dk[j] += parts[i * size + j];
}

template <typename TC, typename TO>
void RunInputGrad(ffi::ThreadPool* pool, const Geom& g, const TC* ct, const float* w, TO* dx,
                  bool generic = false) {
  if (!generic && g.sd == 1 && g.sh == 1 && g.sw == 1 && g.m == 1) {
    // dx[i] = sum_t ct[i + t * r - p'] * w[k - 1 - t] with p' = (k - 1) * r - p.
    Geom f = g;
    f.d = g.od, f.h = g.oh, f.w = g.ow, f.od = g.d, f.oh = g.h, f.ow = g.w;
    f.pd = (g.kd - 1) * g.rd - g.pd, f.ph = (g.kh - 1) * g.rh - g.ph;
    f.pw = (g.kw - 1) * g.rw - g.pw;
    std::vector<float> flipped(g.taps() * g.c);
    for (int64_t t = 0; t < g.taps(); ++t)
      std::copy(w + (g.taps() - 1 - t) * g.c, w + (g.taps() - t) * g.c, &flipped[t * g.c]);
    RunForward(pool, f, ct, flipped.data(), dx);
    return;
  }
  if (g.cf) {
    RunInputGradCf(pool, g, ct, w, dx);
    return;
  }
  // Rows of dx; each reads about KD / SD planes and KH / SH rows of ct.
  const Tiles tiles = MakeTiles(g.n * g.d, g.h, g.ow * g.c * g.m * sizeof(TC),
                                CeilDiv(g.kd, g.sd), CeilDiv(g.kh, g.sh));
  ParallelFor(pool, tiles.Count(), Work(g) >= kMinParallelWork,
              [&](int64_t i) { InputGradRows(g, ct, w, dx, tiles, i); });
}

// ---------------------------------------------------------------------------
// FFI handlers.

ffi::Error ParseGeom(ffi::Span<const int64_t> cfg, Geom* g) {
  if (cfg.size() != kConfigSize) return ffi::Error::InvalidArgument("dw5d: bad config size");
  std::memcpy(g, cfg.begin(), sizeof(Geom));
  const int64_t positive[] = {g->c, g->m, g->od, g->oh, g->ow, g->kd, g->kh, g->kw,
                              g->sd, g->sh, g->sw, g->rd, g->rh, g->rw, g->d, g->h, g->w};
  for (int64_t v : positive)
    if (v < 1) return ffi::Error::InvalidArgument("dw5d: non-positive size in config");
  if (g->n < 0) return ffi::Error::InvalidArgument("dw5d: negative batch in config");
  if (g->cf != 0 && g->cf != 1) return ffi::Error::InvalidArgument("dw5d: bad layout in config");
  return ffi::Error::Success();
}

bool DimsAre(ffi::AnyBuffer::Dimensions dims, std::initializer_list<int64_t> want) {
  return dims.size() == want.size() && std::equal(want.begin(), want.end(), dims.begin());
}

// x / dx and y / ct shapes in g's layout.
bool XDims(const Geom& g, ffi::AnyBuffer::Dimensions dims) {
  return g.cf ? DimsAre(dims, {g.n, g.c, g.d, g.h, g.w}) : DimsAre(dims, {g.n, g.d, g.h, g.w, g.c});
}
bool YDims(const Geom& g, ffi::AnyBuffer::Dimensions dims) {
  return g.cf ? DimsAre(dims, {g.n, g.c * g.m, g.od, g.oh, g.ow})
              : DimsAre(dims, {g.n, g.od, g.oh, g.ow, g.c * g.m});
}

bool IsFloat(ffi::DataType t) { return t == ffi::DataType::F32 || t == ffi::DataType::BF16; }

template <typename TI>
ffi::Error ForwardTyped(ffi::ThreadPool* pool, const Geom& g, const TI* x, const float* w,
                        ffi::AnyBuffer* y) {
  if (y->element_type() == ffi::DataType::F32) {
    RunForward(pool, g, x, w, static_cast<float*>(y->untyped_data()));
  } else {
    RunForward(pool, g, x, w, static_cast<bf16*>(y->untyped_data()));
  }
  return ffi::Error::Success();
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> w,
                       ffi::Result<ffi::AnyBuffer> y, ffi::Span<const int64_t> cfg) {
  Geom g;
  if (ffi::Error err = ParseGeom(cfg, &g); err.failure()) return err;
  if (!XDims(g, x.dimensions()) ||
      !DimsAre(w.dimensions(), {g.kd, g.kh, g.kw, g.m, g.c}) ||
      !YDims(g, y->dimensions()))
    return ffi::Error::InvalidArgument("dw5d_forward: shapes do not match the config");
  if (!IsFloat(x.element_type()) || !IsFloat(y->element_type()))
    return ffi::Error::InvalidArgument("dw5d_forward: x and y must be float32 or bfloat16");
  if (x.element_type() == ffi::DataType::F32)
    return ForwardTyped(&pool, g, static_cast<const float*>(x.untyped_data()), w.typed_data(),
                        &*y);
  return ForwardTyped(&pool, g, static_cast<const bf16*>(x.untyped_data()), w.typed_data(), &*y);
}

template <typename TI>
void KernelGradTyped(ffi::ThreadPool* pool, const Geom& g, const TI* x, const ffi::AnyBuffer& ct,
                     float* dk) {
  if (ct.element_type() == ffi::DataType::F32) {
    RunKernelGrad(pool, g, x, static_cast<const float*>(ct.untyped_data()), dk);
  } else {
    RunKernelGrad(pool, g, x, static_cast<const bf16*>(ct.untyped_data()), dk);
  }
}

ffi::Error KernelGradImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer ct,
                          ffi::Result<ffi::Buffer<ffi::F32>> dk, ffi::Span<const int64_t> cfg) {
  Geom g;
  if (ffi::Error err = ParseGeom(cfg, &g); err.failure()) return err;
  if (!XDims(g, x.dimensions()) ||
      !YDims(g, ct.dimensions()) ||
      !DimsAre(dk->dimensions(), {g.kd, g.kh, g.kw, g.m, g.c}))
    return ffi::Error::InvalidArgument("dw5d_kernel_grad: shapes do not match the config");
  if (!IsFloat(x.element_type()) || !IsFloat(ct.element_type()))
    return ffi::Error::InvalidArgument("dw5d_kernel_grad: x and ct must be float32 or bfloat16");
  if (x.element_type() == ffi::DataType::F32) {
    KernelGradTyped(&pool, g, static_cast<const float*>(x.untyped_data()), ct, dk->typed_data());
  } else {
    KernelGradTyped(&pool, g, static_cast<const bf16*>(x.untyped_data()), ct, dk->typed_data());
  }
  return ffi::Error::Success();
}

template <typename TC>
void InputGradTyped(ffi::ThreadPool* pool, const Geom& g, const TC* ct, const float* w,
                    ffi::AnyBuffer* dx) {
  if (dx->element_type() == ffi::DataType::F32) {
    RunInputGrad(pool, g, ct, w, static_cast<float*>(dx->untyped_data()));
  } else {
    RunInputGrad(pool, g, ct, w, static_cast<bf16*>(dx->untyped_data()));
  }
}

ffi::Error InputGradImpl(ffi::ThreadPool pool, ffi::AnyBuffer ct, ffi::Buffer<ffi::F32> w,
                         ffi::Result<ffi::AnyBuffer> dx, ffi::Span<const int64_t> cfg) {
  Geom g;
  if (ffi::Error err = ParseGeom(cfg, &g); err.failure()) return err;
  if (!YDims(g, ct.dimensions()) ||
      !DimsAre(w.dimensions(), {g.kd, g.kh, g.kw, g.m, g.c}) ||
      !XDims(g, dx->dimensions()))
    return ffi::Error::InvalidArgument("dw5d_input_grad: shapes do not match the config");
  if (!IsFloat(ct.element_type()) || !IsFloat(dx->element_type()))
    return ffi::Error::InvalidArgument("dw5d_input_grad: ct and dx must be float32 or bfloat16");
  if (ct.element_type() == ffi::DataType::F32) {
    InputGradTyped(&pool, g, static_cast<const float*>(ct.untyped_data()), w.typed_data(), &*dx);
  } else {
    InputGradTyped(&pool, g, static_cast<const bf16*>(ct.untyped_data()), w.typed_data(), &*dx);
  }
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------
// Self-test, run once after loading: every code path (packet widths, edges,
// multiplier, bfloat16) against plain loops in double, on small problems.

uint64_t Lcg(uint64_t* s) {
  *s = *s * 6364136223846793005ull + 1442695040888963407ull;
  return *s >> 33;
}

template <typename T>
T FromFloat(float f) {
  if constexpr (std::is_same<T, float>::value) {
    return f;
  } else {
    return ToBf16(f);
  }
}

template <typename T>
double ToDouble(T v) {
  return static_cast<double>(Pack<1>::Load(&v));
}

template <typename TI, typename TO>
bool SelfTestOne(const Geom& g, uint64_t seed, bool generic) {
  const int64_t nx = g.n * g.d * g.h * g.w * g.c, nw = g.taps() * g.m * g.c;
  const int64_t ny = g.rows() * g.ow * g.c * g.m;
  std::vector<TI> x(nx), ct(ny);
  std::vector<float> w(nw), dk(nw);
  std::vector<TO> y(ny);
  for (auto& v : x) v = FromFloat<TI>(static_cast<float>(Lcg(&seed) % 2001) / 1000.0f - 1.0f);
  for (auto& v : ct) v = FromFloat<TI>(static_cast<float>(Lcg(&seed) % 2001) / 1000.0f - 1.0f);
  for (auto& v : w) v = static_cast<float>(Lcg(&seed) % 2001) / 1000.0f - 1.0f;
  std::vector<TO> dx(nx);
  RunForward<TI, TO>(nullptr, g, x.data(), w.data(), y.data(), generic);
  RunKernelGrad<TI, TI>(nullptr, g, x.data(), ct.data(), dk.data(), generic);
  RunInputGrad<TI, TO>(nullptr, g, ct.data(), w.data(), dx.data(), generic);
  std::vector<double> want_y(ny, 0.0), want_dk(nw, 0.0), want_dx(nx, 0.0);
  for (int64_t n = 0; n < g.n; ++n)
    for (int64_t od = 0; od < g.od; ++od)
      for (int64_t oh = 0; oh < g.oh; ++oh)
        for (int64_t ow = 0; ow < g.ow; ++ow)
          for (int64_t a = 0; a < g.kd; ++a)
            for (int64_t b = 0; b < g.kh; ++b)
              for (int64_t e = 0; e < g.kw; ++e) {
                const int64_t id = od * g.sd + a * g.rd - g.pd, ih = oh * g.sh + b * g.rh - g.ph,
                              iw = ow * g.sw + e * g.rw - g.pw;
                if (id < 0 || id >= g.d || ih < 0 || ih >= g.h || iw < 0 || iw >= g.w) continue;
                for (int64_t c = 0; c < g.c; ++c)
                  for (int64_t m = 0; m < g.m; ++m) {
                    const int64_t yi =
                        g.cf ? ((((n * g.c + c) * g.m + m) * g.od + od) * g.oh + oh) * g.ow + ow
                             : (((n * g.od + od) * g.oh + oh) * g.ow + ow) * g.c * g.m +
                                   c * g.m + m;
                    const int64_t wi = (((a * g.kh + b) * g.kw + e) * g.m + m) * g.c + c;
                    const int64_t xi = g.cf ? (((n * g.c + c) * g.d + id) * g.h + ih) * g.w + iw
                                            : (((n * g.d + id) * g.h + ih) * g.w + iw) * g.c + c;
                    const double xv = ToDouble(x[xi]);
                    want_y[yi] += xv * w[wi];
                    want_dk[wi] += xv * ToDouble(ct[yi]);
                    want_dx[xi] += ToDouble(ct[yi]) * w[wi];
                  }
              }
  const double tol = std::is_same<TI, float>::value && std::is_same<TO, float>::value ? 1e-4 : 2e-2;
  for (int64_t i = 0; i < ny; ++i)
    if (!(std::fabs(ToDouble(y[i]) - want_y[i]) <= tol * (1.0 + std::fabs(want_y[i]))))
      return false;
  for (int64_t i = 0; i < nx; ++i)
    if (!(std::fabs(ToDouble(dx[i]) - want_dx[i]) <= tol * (1.0 + std::fabs(want_dx[i]))))
      return false;
  const double tol_dk = std::is_same<TI, float>::value ? 1e-4 : 1e-3;
  for (int64_t i = 0; i < nw; ++i)
    if (!(std::fabs(dk[i] - want_dk[i]) <= tol_dk * (1.0 + std::fabs(want_dk[i])))) return false;
  return true;
}

}  // namespace
}  // namespace dw5d

XLA_FFI_DEFINE_HANDLER_SYMBOL(Dw5dForward, dw5d::ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()           // x
                                  .Arg<ffi::Buffer<ffi::F32>>()    // w
                                  .Ret<ffi::AnyBuffer>()           // y
                                  .Attr<ffi::Span<const int64_t>>("config"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(Dw5dKernelGrad, dw5d::KernelGradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()           // x
                                  .Arg<ffi::AnyBuffer>()           // ct
                                  .Ret<ffi::Buffer<ffi::F32>>()    // dk
                                  .Attr<ffi::Span<const int64_t>>("config"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(Dw5dInputGrad, dw5d::InputGradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()           // ct
                                  .Arg<ffi::Buffer<ffi::F32>>()    // w
                                  .Ret<ffi::AnyBuffer>()           // dx
                                  .Attr<ffi::Span<const int64_t>>("config"));

// 0 when every kernel matches plain loops on small problems, else the number
// of the first failing case. Also tells the loader how wide the packets are.
extern "C" int Dw5dSelfTest() {
  using dw5d::Geom;
  const int64_t L = dw5d::kLanes;
  // Every specialised W shape and the generic one; every packet width;
  // multipliers; edges; an input smaller than the kernel; a negative low
  // padding (a crop, as input gradients can have).
  const Geom cases[] = {
      // n, d, h, w, c, m, od, oh, ow, kd, kh, kw, sd, sh, sw, rd, rh, rw, pd, ph, pw, cf
      {2, 3, 4, 21, 3 * L + 3, 1, 3, 4, 21, 3, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0},
      {1, 5, 6, 25, L + 1, 2, 3, 3, 12, 2, 3, 3, 2, 2, 2, 1, 1, 1, 0, 1, 1, 0},
      {1, 1, 3, 30, 3, 3, 1, 3, 26, 1, 5, 3, 1, 1, 1, 1, 2, 2, 0, 4, 1, 0},
      {1, 2, 3, 40, 2 * L, 1, 2, 3, 40, 1, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 2, 0},
      {1, 1, 2, 41, L, 2, 1, 2, 19, 1, 2, 5, 1, 1, 2, 1, 1, 1, 0, 0, 1, 0},
      {1, 1, 2, 40, 5, 1, 1, 2, 36, 1, 1, 5, 1, 1, 1, 1, 1, 2, 0, 0, 2, 0},
      {1, 1, 2, 50, L + 14, 1, 1, 2, 50, 1, 1, 7, 1, 1, 1, 1, 1, 1, 0, 0, 3, 0},
      {1, 1, 2, 51, 3, 1, 1, 2, 25, 1, 1, 7, 1, 1, 2, 1, 1, 1, 0, 0, 3, 0},
      {1, 1, 3, 4, 3, 3, 1, 3, 4, 1, 5, 4, 1, 1, 1, 1, 2, 2, 0, 4, 3, 0},
      {1, 3, 2, 9, 12, 1, 2, 2, 5, 2, 1, 2, 2, 1, 2, 1, 1, 3, -1, 0, 1, 0},
      // Taller ones for the channels-first blocks of rows (fixed H shapes).
      {1, 2, 19, 37, 2, 1, 2, 19, 37, 1, 3, 3, 1, 1, 1, 1, 1, 1, 0, 1, 1, 0},
      {1, 1, 23, 70, 2, 2, 1, 12, 35, 1, 5, 5, 1, 2, 2, 1, 1, 1, 0, 2, 2, 0},
      {1, 1, 20, 66, 1, 1, 1, 20, 66, 1, 3, 3, 1, 1, 1, 1, 2, 2, 0, 2, 2, 0},
      {2, 3, 17, 20, 2, 1, 3, 17, 20, 3, 7, 7, 1, 1, 1, 1, 1, 1, 1, 3, 3, 0},
      {1, 2, 18, 16, 3, 1, 2, 9, 16, 2, 3, 3, 1, 2, 1, 1, 1, 1, 0, 1, 1, 0},
      {1, 1, 15, 33, 2, 3, 1, 15, 33, 1, 5, 5, 1, 1, 1, 1, 1, 1, 0, 2, 2, 0},
  };
  // Each case channels-last (specialised and generic kernels) and channels-first.
  int k = 0;
  for (const Geom& last : cases) {
    ++k;
    for (int variant = 0; variant < 3; ++variant) {
      Geom g = last;
      g.cf = variant == 2;
      const bool generic = variant == 1;
      const int code = k + 1000 * variant;
      if (!dw5d::SelfTestOne<float, float>(g, 1000 + k, generic)) return code;
      if (!dw5d::SelfTestOne<dw5d::bf16, dw5d::bf16>(g, 2000 + k, generic)) return 100 + code;
      if (!dw5d::SelfTestOne<dw5d::bf16, float>(g, 3000 + k, generic)) return 200 + code;
    }
  }
  return 0;
}

extern "C" int Dw5dLanes() { return dw5d::kLanes; }
