// Channels-last forward on bfloat16 input with AVX512-BF16: the pair row
// kernels, which channels_last_forward.cc uses where they apply.

#ifndef DW5D_JAX_CSRC_CHANNELS_LAST_PAIRS_H_
#define DW5D_JAX_CSRC_CHANNELS_LAST_PAIRS_H_

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "channels_last_rows.h"
#include "geometry.h"
#include "packets.h"

namespace dw5d {

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
    ForChannels(g.c, [&](auto n, auto nv, int64_t c0, int) {
      PairBlock<F, n, nv>(g, plan, pr, pw, nt, c0, m, out, stream);
    });
  }
}

using PairRowFn = void (*)(const Geom&, const PairPlan&, const uint32_t* const*,
                           const uint32_t* const*, int, float*, const uint32_t**, bool);

}  // namespace dw5d

#endif  // DW5D_JAX_CSRC_CHANNELS_LAST_PAIRS_H_
