// Channels-last kernels: (N, D, H, W, C) arrays, vectorised over channels.
//
// Channels are innermost and contiguous, so every inner loop is a
// multiply-add over packets of channels (packets.h), with several output
// positions x two packets of accumulators in registers. For the common
// kernel widths, strides and dilations along W the blocks are unrolled at
// compile time (`Fixed`), so that each input packet is loaded once and
// feeds every (output, tap) pair that reads it.
//
// Output rows (n, od, oh) are split into tiles (geometry.h: Tiles), taken
// by the threads of ParallelFor (threads.h). The loops skip the taps that
// land in the zero padding. bfloat16 input is multiplied two taps at a time
// from pairs of bfloat16 where the CPU has AVX512-BF16 (PairRows), else
// converted to float32 rows once (InputRows). Large outputs are written
// with non-temporal stores (ForwardStreams).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <optional>
#include <type_traits>
#include <vector>

#include "epilogue.h"
#include "geometry.h"
#include "kernels.h"
#include "packets.h"
#include "threads.h"

namespace dw5d {
namespace {

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
        data_(new float[dspan * hspan * len]) {}

  template <typename Fill>
  const float* Get(int64_t row, Fill&& fill) {
    const int64_t slot = (row / height_ % dspan_) * hspan_ + row % height_ % hspan_;
    float* data = data_.get() + slot * len_;
    if (keys_[slot] != row) {
      fill(row, data);
      keys_[slot] = row;
    }
    return data;
  }

 private:
  int64_t height_, len_, dspan_, hspan_;
  std::vector<int64_t> keys_;
  std::unique_ptr<float[]> data_;  // filled before it is read (keys_)
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

// Outputs at least this large are written with non-temporal stores (half
// the 32 MB L3 of the AMD EPYC VM: smaller ones may still be in a cache
// when the next op reads them).
constexpr int64_t kStreamBytes = 16 << 20;

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
        V xv = Pack<N>::Load(x + v * L);
        InRegister(xv);
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
                  int64_t c0, int64_t m, int64_t lo, int64_t hi, float* out, bool stream) {
  using V = typename Pack<N>::V;
  constexpr int L = N;
  const int64_t os = g.m * g.c;  // between output positions
  float* const base = out + m * g.c + c0;
  auto emit = [&](int64_t o, const V* acc) {
    float* p = base + o * os;
    if (stream) {
      for (int v = 0; v < NV; ++v) StreamStore<N>(p + v * L, acc[v]);
    } else {
      for (int v = 0; v < NV; ++v) Pack<N>::Store(p + v * L, acc[v]);
    }
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

// One output row: `wb[t]` is tap row t's (KW, M, C) weights, `wr` scratch;
// `stream`: non-temporal stores (ForwardStreams).
template <typename F>
void ForwardRow(const Geom& g, const float* const* xr, const float* const* wb, int nt, int64_t lo,
                int64_t hi, float* out, const float** wr, bool stream) {
  for (int64_t m = 0; m < g.m; ++m) {
    for (int t = 0; t < nt; ++t) wr[t] = wb[t] + m * g.c;
    ForChannels(g.c, [&](auto n, auto nv, int64_t c0) {
      ForwardBlock<F, n, nv>(g, xr, wr, nt, c0, m, lo, hi, out, stream);
    });
  }
}

using ForwardRowFn = void (*)(const Geom&, const float* const*, const float* const*, int, int64_t,
                              int64_t, float*, const float**, bool);

// ---------------------------------------------------------------------------
// bfloat16 input with AVX512-BF16 (packets.h: PairDot): the products are
// taken two taps at a time from pairs of bfloat16, so x is never converted
// to float32. An input row becomes a row of pairs (PairRows): pair k holds
// positions jlo + 2k and jlo + 2k + 1 (zeros outside the row), for every
// channel. Output o's W taps start at position j0 = o * SW - PW: with j0
// even (parity q = 0) they are the pairs from (j0 - jlo) / 2 with the
// weight pairs (w0, w1), (w2, w3), ...; with j0 odd (q = 1), from
// (j0 - 1 - jlo) / 2 with (0, w0), (w1, w2), ... A zero weight half meets a
// real input value, so a row with an inf or NaN (flagged when its pairs are
// built) takes the float32 kernels instead (0 * inf would leak into its
// neighbours). The zeros outside the row stand for the padding: no edge
// cases, and 0 * a non-finite weight is NaN as in PoisonPaddedTaps. Used
// for the unrolled W shapes with unit dilation along W (FixedPairs).

struct PairPlan {
  int64_t jlo = 0;    // position of pair 0's low half (even)
  int64_t pairs = 0;  // pairs per row
  int np[2] = {};     // pair taps of an output with j0 even / odd
  int npmax = 0;
  int64_t qs = 0;     // between the two parities' weight pairs: npmax * M * C
  std::vector<uint32_t> w;  // (KD * KH, 2, npmax, M, C) weight pairs
};

// The plan for g, with the (KD, KH, KW, M, C) weights `w` as pairs; false
// when a weight is not a bfloat16 value (a float32 kernel with bfloat16 x:
// the float32 kernels keep its precision).
inline bool MakePairPlan(const Geom& g, const float* w, PairPlan* plan) {
  const int64_t mc = g.m * g.c;
  for (int64_t i = 0; i < g.taps() * mc; ++i) {
    const float back = Pack<1>::Load(reinterpret_cast<const bf16*>(&w[i]) + 1);
    uint32_t a, b;
    std::memcpy(&a, &w[i], 4);
    std::memcpy(&b, &back, 4);
    if (a != b) return false;  // low 16 bits set: not a bfloat16 value
  }
  plan->jlo = 2 * FloorDiv(-g.pw, 2);
  const int64_t jmax = (g.ow - 1) * g.sw - g.pw + g.kw - 1;  // the last position read
  plan->pairs = FloorDiv(jmax - plan->jlo, 2) + 1;
  for (int q = 0; q < 2; ++q) plan->np[q] = static_cast<int>((q + g.kw - 1) / 2 + 1);
  plan->npmax = std::max(plan->np[0], plan->np[1]);
  plan->qs = plan->npmax * mc;
  plan->w.assign(g.kd * g.kh * 2 * plan->qs, 0u);
  auto half = [&](const float* row, int64_t e, int64_t i) -> uint16_t {  // bits of w[e] or 0
    if (e < 0 || e >= g.kw) return 0;
    uint32_t u;
    std::memcpy(&u, &row[e * mc + i], 4);
    return static_cast<uint16_t>(u >> 16);
  };
  for (int64_t t = 0; t < g.kd * g.kh; ++t)
    for (int q = 0; q < 2; ++q)
      for (int k = 0; k < plan->np[q]; ++k)
        for (int64_t i = 0; i < mc; ++i) {
          const float* row = w + t * g.kw * mc;
          plan->w[(t * 2 + q) * plan->qs + k * mc + i] =
              PairOf(half(row, 2 * k - q, i), half(row, 2 * k + 1 - q, i));
        }
  return true;
}

// Rows of bfloat16 x as rows of pairs (PairPlan), each built once into a
// RowCache-like direct-mapped cache (see RowCache), with a flag for rows
// that hold an inf or NaN.
class PairRows {
 public:
  PairRows(const Geom& g, const bf16* x, const PairPlan& plan, const Tiles& tiles)
      : g_(g), x_(x), plan_(plan), len_(plan.pairs * g.c), dspan_((g.kd - 1) * g.rd + 1),
        hspan_((tiles.band - 1) * g.sh + (g.kh - 1) * g.rh + 1), keys_(dspan_ * hspan_, -1),
        finite_(dspan_ * hspan_, 1), data_(new uint32_t[dspan_ * hspan_ * len_]) {}

  // The pair row of input row `row`; *finite &= whether it has no inf / NaN.
  const uint32_t* Get(int64_t row, bool* finite) {
    const int64_t slot = (row / g_.h % dspan_) * hspan_ + row % g_.h % hspan_;
    uint32_t* data = data_.get() + slot * len_;
    if (keys_[slot] != row) {
      finite_[slot] = Fill(x_ + row * g_.w * g_.c, data);
      keys_[slot] = row;
    }
    *finite = *finite && finite_[slot];
    return data;
  }

 private:
  // Pairs of the positions a (low halves) and a + 1 (high halves); true if finite.
  bool Fill(const bf16* row, uint32_t* out) const {
    const int64_t c = g_.c;
    static const bf16 zeros[32] = {};
    bool bad = false;
#if DW5D_BF16_PAIRS
    // 16 channels at a time: one vpermt2w interleaves them, a mask collects
    // the exponents that are all ones (inf, NaN).
    const __m512i weave = _mm512_set_epi16(
        47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
        39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i exponent = _mm512_set1_epi16(0x7f80);
    __mmask32 nonfinite = 0;
#endif
    for (int64_t k = 0; k < plan_.pairs; ++k, out += c) {
      const int64_t a = plan_.jlo + 2 * k;
      const bf16* lo = a >= 0 && a < g_.w ? row + a * c : nullptr;
      const bf16* hi = a + 1 >= 0 && a + 1 < g_.w ? row + (a + 1) * c : nullptr;
      int64_t i = 0;
#if DW5D_BF16_PAIRS
      for (; i + 16 <= c; i += 16) {
        const __m512i l = _mm512_castsi256_si512(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lo ? lo + i : zeros)));
        const __m512i h = _mm512_castsi256_si512(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(hi ? hi + i : zeros)));
        const __m512i p = _mm512_permutex2var_epi16(l, weave, h);
        nonfinite |= _mm512_cmpeq_epi16_mask(_mm512_and_si512(p, exponent), exponent);
        _mm512_storeu_si512(out + i, p);
      }
#endif
      for (; i < c; ++i) {
        const uint16_t l = lo ? lo[i] : 0, h = hi ? hi[i] : 0;
        bad = bad || (l & 0x7f80) == 0x7f80 || (h & 0x7f80) == 0x7f80;
        out[i] = PairOf(l, h);
      }
    }
#if DW5D_BF16_PAIRS
    bad = bad || nonfinite != 0;
#endif
    return !bad;
  }

  const Geom& g_;
  const bf16* x_;
  const PairPlan& plan_;
  int64_t len_, dspan_, hspan_;
  std::vector<int64_t> keys_;
  std::vector<char> finite_;
  std::unique_ptr<uint32_t[]> data_;  // filled before it is read (keys_)
};

// Output p of a block whose first output's j0 has parity Q0, with W stride
// SW: its j0 is the block's + p * SW, its first pair the block's first +
// PairRel, its parity PairParity.
constexpr int PairRel(int q0, int sw, int p) { return (q0 + p * sw) >> 1; }
constexpr int PairParity(int q0, int sw, int p) { return (q0 + p * sw) & 1; }
constexpr int PairTaps(int kw, int q) { return (q + kw - 1) / 2 + 1; }

// Pair sums for NP outputs of a block (F's W shape, first parity Q0) and NV
// packets of channels from c0: every pair packet loaded once and fed to
// every (output, pair tap) that reads it, as in TapSumsFixed. `off`: the
// block's first pair (times C) plus c0; pw[t]: tap row t's weight pairs.
template <typename F, int Q0, int N, int NV, int NP>
inline void PairSumsFixed(const uint32_t* const* pr, const uint32_t* const* pw, int nt,
                          int64_t off, int64_t c0, int64_t c, int64_t mc, int64_t qs,
                          typename Pack<N>::V (&acc)[NP][NV]) {
  using U = typename Pack<N>::U;
  constexpr int L = N, KW = F::KW, SW = F::SW;
  constexpr int NQ = PairTaps(KW, 0) > PairTaps(KW, 1) ? PairTaps(KW, 0) : PairTaps(KW, 1);
  constexpr int J = PairRel(Q0, SW, NP - 1) + NQ;
  // Parities the block meets: both with an odd stride, Q0's with an even one.
  constexpr bool kQ[2] = {Q0 == 0 || SW % 2 == 1, Q0 == 1 || SW % 2 == 1};
#pragma GCC unroll 16
  for (int p = 0; p < NP; ++p)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[p][v] = Pack<N>::Zero();
  for (int t = 0; t < nt; ++t) {
    const uint32_t* x = pr[t] + off;
    U wv[2][NQ][NV];
#pragma GCC unroll 2
    for (int q = 0; q < 2; ++q)
#pragma GCC unroll 8
      for (int i = 0; i < NQ; ++i)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v)
          if (kQ[q] && i < PairTaps(KW, q))
            wv[q][i][v] = Pack<N>::LoadU(pw[t] + q * qs + i * mc + c0 + v * L);
#pragma GCC unroll 64
    for (int j = 0; j < J; ++j, x += c) {
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        U xv = Pack<N>::LoadU(x + v * L);
        InRegister(xv);
#pragma GCC unroll 16
        for (int p = 0; p < NP; ++p) {
          const int q = PairParity(Q0, SW, p), i = j - PairRel(Q0, SW, p);
          if (i >= 0 && i < PairTaps(KW, q)) acc[p][v] = PairDot<N>(acc[p][v], xv, wv[q][i][v]);
        }
      }
    }
  }
}

// One output (any parity q): pair taps [0, nq), two sets of sums.
template <int N, int NV>
inline void PairSums1(const uint32_t* const* pr, const uint32_t* const* pw, int nt, int64_t off,
                      int64_t c0, int64_t c, int64_t mc, int64_t wq, int nq,
                      typename Pack<N>::V (&acc)[1][NV]) {
  using V = typename Pack<N>::V;
  constexpr int L = N;
  V sums[2][NV];
  for (int s = 0; s < 2; ++s)
    for (int v = 0; v < NV; ++v) sums[s][v] = Pack<N>::Zero();
  int k = 0;
  for (int t = 0; t < nt; ++t)
    for (int i = 0; i < nq; ++i, k ^= 1)
      for (int v = 0; v < NV; ++v)
        sums[k][v] = PairDot<N>(sums[k][v], Pack<N>::LoadU(pr[t] + off + i * c + v * L),
                                Pack<N>::LoadU(pw[t] + wq + i * mc + c0 + v * L));
  for (int v = 0; v < NV; ++v) acc[0][v] = sums[0][v] + sums[1][v];
}

// Channels [c0, c0 + NV * N) of multiplier index m for one output row, from
// pair rows `pr` with weight pairs `pw` (offset to m).
template <typename F, int N, int NV>
void PairBlock(const Geom& g, const PairPlan& plan, const uint32_t* const* pr,
               const uint32_t* const* pw, int nt, int64_t c0, int64_t m, float* out,
               bool stream) {
  using V = typename Pack<N>::V;
  constexpr int L = N, KW = F::KW, SW = F::SW;
  const int64_t os = g.m * g.c, mc = g.m * g.c;
  float* const base = out + m * g.c + c0;
  auto emit = [&](int64_t o, const V* acc) {
    float* p = base + o * os;
    if (stream) {
      for (int v = 0; v < NV; ++v) StreamStore<N>(p + v * L, acc[v]);
    } else {
      for (int v = 0; v < NV; ++v) Pack<N>::Store(p + v * L, acc[v]);
    }
  };
  // Output o: j0 = o * SW - PW, its first pair (j0 - q - jlo) / 2.
  auto first = [&](int64_t o) { return (o * SW - g.pw - ((o * SW - g.pw) & 1) - plan.jlo) / 2; };
  const int q0 = static_cast<int>((-g.pw) & 1);  // parity of output 0 (blocks are even)
  int64_t o = 0;
  auto blocks = [&](auto np, auto q) {
    constexpr int NP = decltype(np)::value, Q0 = decltype(q)::value;
    for (; o + NP <= g.ow; o += NP) {
      V acc[NP][NV];
      PairSumsFixed<F, Q0, N, NV, NP>(pr, pw, nt, first(o) * g.c + c0, c0, g.c, mc, plan.qs, acc);
      for (int p = 0; p < NP; ++p) emit(o + p, acc[p]);
    }
  };
  // Registers: NP * NV sums, the weight pairs (both parities with an odd stride).
  constexpr int kWeights = (SW % 2 == 1 ? 2 : 1) * PairTaps(KW, 1) * NV;
  constexpr int NP = 8 * NV + kWeights + 2 <= kRegisters ? 8 : 4;
  auto all = [&](auto q) {
    blocks(Int<NP>{}, q);
    if constexpr (NP >= 8) blocks(Int<4>{}, q);
    blocks(Int<2>{}, q);
  };
  if (q0 == 0) {
    all(Int<0>{});
  } else {
    all(Int<1>{});
  }
  for (; o < g.ow; ++o) {
    const int q = static_cast<int>((o * SW - g.pw) & 1);
    V acc[1][NV];
    PairSums1<N, NV>(pr, pw, nt, first(o) * g.c + c0, c0, g.c, mc, q * plan.qs, plan.np[q], acc);
    emit(o, acc[0]);
  }
}

// One output row from pair rows: `pwb[t]` is tap row t's weight pairs.
template <typename F>
void PairRow(const Geom& g, const PairPlan& plan, const uint32_t* const* pr,
             const uint32_t* const* pwb, int nt, float* out, const uint32_t** pw, bool stream) {
  for (int64_t m = 0; m < g.m; ++m) {
    for (int t = 0; t < nt; ++t) pw[t] = pwb[t] + m * g.c;
    ForChannels(g.c, [&](auto n, auto nv, int64_t c0) {
      PairBlock<F, n, nv>(g, plan, pr, pw, nt, c0, m, out, stream);
    });
  }
}

using PairRowFn = void (*)(const Geom&, const PairPlan&, const uint32_t* const*,
                           const uint32_t* const*, int, float*, const uint32_t**, bool);

// (OW, M, C) float32 -> y's (OW, C * M) row in y's dtype.
template <typename TO>
void StoreRow(const Geom& g, const float* in, TO* y, bool stream) {
  if (g.m == 1) {
    if (stream) {
      ConvertStream(in, y, g.ow * g.c);
    } else {
      Convert(in, y, g.ow * g.c);
    }
    return;
  }
  using P = Pack<kLanes>;
  static const P::U lo = Weave(0), hi = Weave(1);
  for (int64_t o = 0; o < g.ow; ++o) {
    int64_t c = 0;
    if (g.m == 2) {  // packets of the two multiplier rows, interleaved
      const float* a = in + o * 2 * g.c;
      TO* out = y + o * 2 * g.c;
      for (; c + kLanes <= g.c; c += kLanes) {
        const P::V va = P::Load(a + c), vb = P::Load(a + g.c + c);
        P::Store(out + 2 * c, __builtin_shuffle(va, vb, lo));
        P::Store(out + 2 * c + kLanes, __builtin_shuffle(va, vb, hi));
      }
    }
    for (; c < g.c; ++c)
      for (int64_t m = 0; m < g.m; ++m)
        Pack<1>::Store(y + (o * g.c + c) * g.m + m, in[(o * g.m + m) * g.c + c]);
  }
}

// The bias as the forward rows' (OW, M, C) layout: bias[c * M + m] at (o, m, c).
std::vector<float> BiasRow(const Geom& g, const float* bias) {
  std::vector<float> row(g.ow * g.m * g.c);
  for (int64_t o = 0; o < g.ow; ++o)
    for (int64_t m = 0; m < g.m; ++m)
      for (int64_t c = 0; c < g.c; ++c) row[(o * g.m + m) * g.c + c] = bias[c * g.m + m];
  return row;
}

// The row kernels of a forward pass: float32 ones, and where bfloat16 x
// is multiplied in pairs (PairPlan), the pair ones (`pair` non-null).
struct ForwardFns {
  ForwardRowFn row = nullptr;
  PairRowFn pair = nullptr;
  const PairPlan* plan = nullptr;
};

// `bias_row` (BiasRow) non-null: the epilogue `act` is applied to every
// output row after its tap sums, while it is in L1, before it is stored
// (rows written in place in y are then not streamed: `stream` applies to
// the store of finished rows).
template <typename TI, typename TO>
void ForwardRows(const Geom& g, const ForwardFns& fns, const TI* x, const float* w, TO* y,
                 const Tiles& tiles, int64_t tile, bool stream, Act act, const float* bias_row) {
  const int64_t cm = g.c * g.m, taps = g.kd * g.kh;
  std::optional<InputRows<TI>> in;  // float32 rows (for the pair kernels: only non-finite rows)
  std::optional<PairRows> pairs;
  if constexpr (std::is_same<TI, bf16>::value) {
    if (fns.pair) pairs.emplace(g, x, *fns.plan, tiles);
  }
  std::vector<int64_t> rows(taps), tap(taps);
  std::vector<const float*> xr(taps), wb(taps), wr(taps);
  std::vector<const uint32_t*> pr(taps), pwb(taps), pw(taps);
  // float32 y with M = 1 has the row kernels' layout: written in place.
  const bool direct = std::is_same<TO, float>::value && g.m == 1;
  std::vector<float> tmp(direct ? 0 : g.ow * cm);
  int64_t lo0, hi0, lo1, hi1;  // outputs whose first / last W tap is inside x
  ValidRange(g.w, g.ow, g.sw, -g.pw, &lo0, &hi0);
  ValidRange(g.w, g.ow, g.sw, (g.kw - 1) * g.rw - g.pw, &lo1, &hi1);
  int64_t lo = std::max(lo0, lo1), hi = std::min(hi0, hi1);
  if (hi <= lo) lo = hi = g.ow;
  const bool stream_row = direct && stream && bias_row == nullptr;  // rows written in place
  tiles.ForRows(tile, [&](int64_t r) {
    const int nt = RowTaps(g, r, rows.data(), tap.data());
    TO* yrow = y + r * g.ow * cm;
    float* out = direct ? reinterpret_cast<float*>(yrow) : tmp.data();
    bool finite = true;
    if constexpr (std::is_same<TI, bf16>::value) {
      if (pairs) {
        for (int t = 0; t < nt; ++t) {
          pr[t] = pairs->Get(rows[t], &finite);
          pwb[t] = fns.plan->w.data() + tap[t] * 2 * fns.plan->qs;
        }
        if (finite) fns.pair(g, *fns.plan, pr.data(), pwb.data(), nt, out, pw.data(), stream_row);
      }
    }
    if (!pairs || !finite) {
      if (!in) in.emplace(g, x, tiles);
      for (int t = 0; t < nt; ++t) {
        xr[t] = in->Get(rows[t]);
        wb[t] = w + tap[t] * g.kw * cm;
      }
      fns.row(g, xr.data(), wb.data(), nt, lo, hi, out, wr.data(), stream_row);
    }
    if (bias_row != nullptr) ActivateRow(act, out, bias_row, g.ow * cm);
    if (!direct) StoreRow(g, tmp.data(), yrow, stream);
  });
  if (stream) StreamFence();
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
        V xv = Pack<N>::Load(xb + v * L);
        InRegister(xv);
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

// A cotangent row (OW, C * M) as float32 (M, OW, C). Not inlined: inside
// the row loops of its callers this loop lost registers to them (15% of the
// input gradient with M = 2).
template <typename TC>
__attribute__((noinline)) void Deinterleave(const Geom& g, const TC* in, float* out) {
  using P = Pack<kLanes>;
  static const P::U even = Unweave(0), odd = Unweave(1);
  for (int64_t o = 0; o < g.ow; ++o) {
    int64_t c = 0;
    if (g.m == 2) {  // packets of (c, m) pairs split into the two multiplier rows
      const TC* a = in + o * 2 * g.c;
      for (; c + kLanes <= g.c; c += kLanes) {
        const P::V v0 = P::Load(a + 2 * c), v1 = P::Load(a + 2 * c + kLanes);
        P::Store(out + o * g.c + c, __builtin_shuffle(v0, v1, even));
        P::Store(out + (g.ow + o) * g.c + c, __builtin_shuffle(v0, v1, odd));
      }
    }
    for (; c < g.c; ++c)
      for (int64_t m = 0; m < g.m; ++m)
        out[(m * g.ow + o) * g.c + c] = Pack<1>::Load(in + (o * g.c + c) * g.m + m);
  }
}

// sum[j] += rows[o * len + j] for o < count (restrict: vectorised).
inline void AddRows(const float* __restrict rows, int64_t count, int64_t len,
                    float* __restrict sum) {
  for (int64_t o = 0; o < count; ++o)
    for (int64_t j = 0; j < len; ++j) sum[j] += rows[o * len + j];
}

// The epilogue's backward for the output rows of one tile (RunEpilogueGrad):
// per row, g = ct * act'(z) written to `g`, its sum added to `db`, and g as
// the kernel-gradient row kernels read it.
template <typename TC>
class EpilogueCotangents {
 public:
  // `fwd`: the forward row kernel that recomputes z (when e.w is set);
  // `bias_row`: the bias in its rows' layout (BiasRow).
  EpilogueCotangents(const Geom& g, const EpilogueGrad<TC>& e, ForwardRowFn fwd,
                     const float* bias_row, float* db)
      : g_(g), e_(e), fwd_(fwd), bias_row_(bias_row), db_(db), len_(g.ow * g.c * g.m),
        ct_(std::is_same<TC, float>::value ? 0 : len_),
        y_(std::is_same<TC, float>::value || e.y == nullptr ? 0 : len_),
        z_(e.w == nullptr ? 0 : 2 * len_), deinterleaved_(g.m == 1 ? 0 : len_),
        wb_(g.kd * g.kh), wr_(g.kd * g.kh) {
    int64_t lo0, hi0, lo1, hi1;  // as in ForwardRows
    ValidRange(g.w, g.ow, g.sw, -g.pw, &lo0, &hi0);
    ValidRange(g.w, g.ow, g.sw, (g.kw - 1) * g.rw - g.pw, &lo1, &hi1);
    lo_ = std::max(lo0, lo1), hi_ = std::min(hi0, hi1);
    if (hi_ <= lo_) lo_ = hi_ = g.ow;
  }

  // Output row r with cotangent row `crow`; xr, tap, nt: its input rows and
  // their tap rows (RowTaps). Returns g as float32 (M, OW, C).
  const float* Get(int64_t r, const TC* crow, const float* const* xr, const int64_t* tap,
                   int nt) {
    const float* ct = Floats(crow, ct_.data());
    const float* grow = ct;
    if (e_.g != nullptr) {
      float* out = e_.g + r * len_;
      if (e_.w == nullptr) {
        SlopeRowY(e_.epilogue.act, Floats(e_.y + r * len_, y_.data()), ct, out, len_);
      } else {
        const int64_t cm = g_.c * g_.m;
        for (int t = 0; t < nt; ++t) wb_[t] = e_.w + tap[t] * g_.kw * cm;
        float* z = z_.data();
        fwd_(g_, xr, wb_.data(), nt, lo_, hi_, z, wr_.data(), false);  // (OW, M, C)
        const float* bias = bias_row_;
        if (g_.m > 1) {  // to y's (OW, C * M), with the bias
          for (int64_t i = 0; i < len_; ++i) z[i] += bias[i];
          StoreRow(g_, z, z + len_, false);
          z += len_;
          bias = nullptr;
        }
        SlopeRowZ(e_.epilogue.act, z, bias, ct, out, len_);
      }
      grow = out;
    }
    AddRows(grow, g_.ow, g_.c * g_.m, db_);
    if (g_.m == 1) return grow;
    Deinterleave(g_, grow, deinterleaved_.data());
    return deinterleaved_.data();
  }

 private:
  // A row of len_ values as float32: itself, or converted into `buf`.
  template <typename T>
  const float* Floats(const T* row, float* buf) {
    if constexpr (std::is_same<T, float>::value) {
      return row;
    } else {
      Convert(row, buf, len_);
      return buf;
    }
  }

  const Geom& g_;
  const EpilogueGrad<TC>& e_;
  ForwardRowFn fwd_;
  const float* bias_row_;
  float* db_;
  int64_t len_, lo_ = 0, hi_ = 0;
  std::vector<float> ct_, y_, z_, deinterleaved_;
  std::vector<const float*> wb_, wr_;
};

// `epi` non-null: the cotangent rows are the epilogue's g (EpilogueCotangents).
template <typename TI, typename TC>
void KernelGradRows(const Geom& g, KernelGradRowFn row_fn, const TI* x, const TC* ct, float* part,
                    const Tiles& tiles, int64_t tile, EpilogueCotangents<TC>* epi) {
  const int64_t cm = g.c * g.m, taps = g.kd * g.kh;
  InputRows<TI> in(g, x, tiles);
  std::vector<int64_t> rows(taps), tap(taps);
  std::vector<const float*> xr(taps);
  std::vector<float*> pr(taps);
  // ct rows as float32 (M, OW, C): in place for float32 with M = 1, else
  // converted and de-interleaved once per row.
  const bool direct = std::is_same<TC, float>::value && g.m == 1;
  std::vector<float> cbuf(direct || epi != nullptr ? 0 : g.ow * cm);
  std::vector<int64_t> lo(g.kw), hi(g.kw);
  for (int64_t e = 0; e < g.kw; ++e)
    ValidRange(g.w, g.ow, g.sw, e * g.rw - g.pw, &lo[e], &hi[e]);
  const int64_t a = *std::max_element(lo.begin(), lo.end());
  const int64_t b = *std::min_element(hi.begin(), hi.end());
  tiles.ForRows(tile, [&](int64_t r) {
    const int nt = RowTaps(g, r, rows.data(), tap.data());
    for (int t = 0; t < nt; ++t) {
      xr[t] = in.Get(rows[t]);
      pr[t] = part + tap[t] * g.kw * cm;
    }
    const TC* crow = ct + r * g.ow * cm;
    const float* cs;
    if (epi != nullptr) {
      cs = epi->Get(r, crow, xr.data(), tap.data(), nt);
    } else if (direct) {
      cs = reinterpret_cast<const float*>(crow);
    } else if (g.m == 1) {
      Convert(crow, cbuf.data(), g.ow * g.c);
      cs = cbuf.data();
    } else {
      Deinterleave(g, crow, cbuf.data());
      cs = cbuf.data();
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
      Deinterleave(g_, in, out);
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

// Whether the forward pass writes y with non-temporal stores: when y is
// large (no cache would keep it for the next op anyway) and its rows are
// whole aligned vectors. They skip reading every line of y from memory
// before writing it: one 16 MiB read + write pass took 1.1 ms instead of
// 1.7 ms on one core of the AMD EPYC VM.
template <typename TO>
bool ForwardStreams(const Geom& g, const TO* y) {
  const int64_t bytes = g.rows() * g.ow * g.c * g.m * static_cast<int64_t>(sizeof(TO));
  const bool whole = g.m == 1 && g.c % kLanes == 0 && (g.ow * g.c * sizeof(TO)) % 64 == 0 &&
                     reinterpret_cast<uintptr_t>(y) % 64 == 0;
  return whole && bytes >= kStreamBytes;
}

}  // namespace

template <typename TI, typename TO>
void RunForwardCl(ffi::ThreadPool* pool, const Geom& g, const TI* x, const float* w, TO* y,
                  bool generic) {
  RunForwardEpilogueCl(pool, g, x, w, Epilogue{}, y, generic);
}

template <typename TI, typename TO>
void RunForwardEpilogueCl(ffi::ThreadPool* pool, const Geom& g, const TI* x, const float* w,
                          const Epilogue& e, TO* y, bool generic) {
  const Tiles tiles = MakeTiles(g.n * g.od, g.oh, g.w * g.c * sizeof(TI), g.kd, g.kh);
  ForwardFns fns;
  fns.row =
      WithShape(g, generic, [](auto shape) -> ForwardRowFn { return ForwardRow<decltype(shape)>; });
  PairPlan plan;
  if constexpr (std::is_same<TI, bf16>::value && DW5D_BF16_PAIRS) {
    fns.pair = WithShape(g, generic, [](auto shape) -> PairRowFn {
      if constexpr (decltype(shape)::RW == 1) return PairRow<decltype(shape)>;
      return nullptr;
    });
    if (fns.pair && MakePairPlan(g, w, &plan)) {
      fns.plan = &plan;
    } else {
      fns.pair = nullptr;
    }
  }
  const bool stream = ForwardStreams(g, y);
  const std::vector<float> bias_row =
      e.bias != nullptr ? BiasRow(g, e.bias) : std::vector<float>();
  const float* b = e.bias != nullptr ? bias_row.data() : nullptr;
  ParallelFor(pool, tiles.Count(), Work(g) >= kMinParallelWork,
              [&](int64_t i) { ForwardRows(g, fns, x, w, y, tiles, i, stream, e.act, b); });
  PoisonPaddedTaps(g, w, y);
}

template <typename TI, typename TC>
void RunKernelGradCl(ffi::ThreadPool* pool, const Geom& g, const TI* x, const TC* ct, float* dk,
                     bool generic) {
  RunEpilogueGradCl(pool, g, x, ct, EpilogueGrad<TC>{}, dk, generic);
}

// Without e.db, the plain kernel gradient.
template <typename TI, typename TC>
void RunEpilogueGradCl(ffi::ThreadPool* pool, const Geom& g, const TI* x, const TC* ct,
                       const EpilogueGrad<TC>& e, float* dk, bool generic) {
  const int64_t size = g.taps() * g.m * g.c, cm = g.c * g.m;
  const Tiles tiles = MakeTiles(g.n * g.od, g.oh, g.w * g.c * sizeof(TI), g.kd, g.kh);
  const int64_t chunks = tiles.Count();
  const KernelGradRowFn row_fn = WithShape(
      g, generic, [](auto shape) -> KernelGradRowFn { return KernelGradRow<decltype(shape)>; });
  const ForwardRowFn fwd_fn =
      WithShape(g, generic, [](auto shape) -> ForwardRowFn { return ForwardRow<decltype(shape)>; });
  const bool epilogue = e.db != nullptr;
  const std::vector<float> bias_row =
      epilogue && e.w != nullptr ? BiasRow(g, e.epilogue.bias) : std::vector<float>();
  std::vector<float> parts(chunks * size, 0.0f), db_parts(epilogue ? chunks * cm : 0, 0.0f);
  ParallelFor(pool, chunks, Work(g) >= kMinParallelWork, [&](int64_t i) {
    std::unique_ptr<EpilogueCotangents<TC>> epi;
    if (epilogue)
      epi = std::make_unique<EpilogueCotangents<TC>>(g, e, fwd_fn, bias_row.data(),
                                                      db_parts.data() + i * cm);
    KernelGradRows(g, row_fn, x, ct, parts.data() + i * size, tiles, i, epi.get());
  });
  SumChunks(parts, chunks, size, dk);
  if (epilogue) SumChunks(db_parts, chunks, cm, e.db);
}

template <typename TC, typename TO>
void RunInputGradCl(ffi::ThreadPool* pool, const Geom& g, const TC* ct, const float* w, TO* dx) {
  // Rows of dx; each reads about KD / SD planes and KH / SH rows of ct.
  const Tiles tiles = MakeTiles(g.n * g.d, g.h, g.ow * g.c * g.m * sizeof(TC),
                                CeilDiv(g.kd, g.sd), CeilDiv(g.kh, g.sh));
  ParallelFor(pool, tiles.Count(), Work(g) >= kMinParallelWork,
              [&](int64_t i) { InputGradRows(g, ct, w, dx, tiles, i); });
}

#define DW5D_INSTANTIATE(T1, T2)                                                                 \
  template void RunForwardCl(ffi::ThreadPool*, const Geom&, const T1*, const float*, T2*, bool); \
  template void RunForwardEpilogueCl(ffi::ThreadPool*, const Geom&, const T1*, const float*,     \
                                     const Epilogue&, T2*, bool);                                \
  template void RunEpilogueGradCl(ffi::ThreadPool*, const Geom&, const T1*, const T2*,           \
                                  const EpilogueGrad<T2>&, float*, bool);                        \
  template void RunKernelGradCl(ffi::ThreadPool*, const Geom&, const T1*, const T2*, float*,     \
                                bool);                                                           \
  template void RunInputGradCl(ffi::ThreadPool*, const Geom&, const T1*, const float*, T2*);
DW5D_FOR_DTYPE_PAIRS(DW5D_INSTANTIATE)
#undef DW5D_INSTANTIATE

}  // namespace dw5d
