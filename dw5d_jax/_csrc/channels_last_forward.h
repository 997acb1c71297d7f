// Channels-last forward row kernels on float32 rows: the tap sums of one
// output row, for the forward pass (channels_last_forward.cc) and for the
// epilogue's backward pass, which recomputes z (channels_last_kernel_grad.cc).

#ifndef DW5D_JAX_CSRC_CHANNELS_LAST_FORWARD_H_
#define DW5D_JAX_CSRC_CHANNELS_LAST_FORWARD_H_

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "channels_last_rows.h"
#include "geometry.h"
#include "packets.h"

namespace dw5d {

// Output positions per forward block: as many as fit in registers next to
// the KW x NV x MM weight packets (at least 8 independent sums hide the
// latency); MM multipliers share each loaded input packet.
template <int KW, int NV, int MM = 1>
constexpr int ForwardPositions() {
  return (8 + KW) * NV * MM + 2 <= kRegisters   ? 8
         : (4 + KW) * NV * MM + 2 <= kRegisters ? 4
                                                : 2;
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

// Independent sets of sums per accumulator in TapSumsFixed: a block of few
// positions alternates its taps between sets, so that at least 8 FMA chains
// are in flight (one position x one packet would otherwise wait for the
// previous multiply-add of its own chain on every tap).
template <int KW, int NP, int NV>
constexpr int SumSets() {
  const int s = (8 + NP * NV - 1) / (NP * NV);
  return s < 1 ? 1 : s > KW ? KW : s;
}

// TapSums for all KW taps of NP positions and MM multipliers (weights
// `c` apart: wr[t] + m * c), with F's W shape: input position j (relative
// to the first output's first tap, at offset `off` of every input row)
// feeds output p through tap e where j = p * SW + e * RW. With `Edge`, only
// the inputs jlo <= j < jhi exist (the others are the zero padding,
// skipped); inside the row, jlo = 0 and jhi = J.
template <typename F, int N, int NV, int NP, int MM, bool Edge>
inline void TapSumsFixed(const float* const* xr, const float* const* wr, int nt, int64_t off,
                         int64_t c0, int64_t c, int64_t mc, int jlo, int jhi,
                         typename Pack<N>::V (&acc)[MM][NP][NV]) {
  using V = typename Pack<N>::V;
  constexpr int L = N, KW = F::KW, SW = F::SW, RW = F::RW;
  constexpr int J = (NP - 1) * SW + (KW - 1) * RW + 1, S = SumSets<KW, NP * MM, NV>();
  V sums[S][MM][NP][NV];
#pragma GCC unroll 16
  for (int s = 0; s < S; ++s)
#pragma GCC unroll 2
    for (int m = 0; m < MM; ++m)
#pragma GCC unroll 16
      for (int p = 0; p < NP; ++p)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) sums[s][m][p][v] = Pack<N>::Zero();
  for (int t = 0; t < nt; ++t) {
    const float* x = xr[t] + off;
    const float* w = wr[t] + c0;
    V wv[KW][MM][NV];
#pragma GCC unroll 16
    for (int e = 0; e < KW; ++e, w += mc)
#pragma GCC unroll 2
      for (int m = 0; m < MM; ++m)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) wv[e][m][v] = Pack<N>::Load(w + m * c + v * L);
    // One pointer stepped by c (not j * c offsets, which need a register each).
#pragma GCC unroll 64
    for (int j = 0; j < J; ++j, x += c) {
      if (Edge && (j < jlo || j >= jhi)) continue;
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        V xv = Pack<N>::Load(x + v * L);
        InRegister(xv);
#pragma GCC unroll 16
        for (int e = 0; e < KW; ++e) {
          const int q = j - e * RW;
          if (q >= 0 && q % SW == 0 && q / SW < NP) {
#pragma GCC unroll 2
            for (int m = 0; m < MM; ++m) sums[e % S][m][q / SW][v] += xv * wv[e][m][v];
          }
        }
      }
    }
  }
#pragma GCC unroll 2
  for (int m = 0; m < MM; ++m)
#pragma GCC unroll 16
    for (int p = 0; p < NP; ++p)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        acc[m][p][v] = sums[0][m][p][v];
#pragma GCC unroll 16
        for (int s = 1; s < S; ++s) acc[m][p][v] += sums[s][m][p][v];
      }
}

// Shuffle mask that interleaves two packets of N floats a, b as a0 b0 a1
// b1 ... (the low or the high half of the result).
template <int N>
inline typename Pack<N>::U WeaveMask(int half) {
  typename Pack<N>::U mask{};
  for (int i = 0; i < N; ++i) mask[i] = static_cast<uint32_t>(half * N / 2 + i / 2 + (i % 2) * N);
  return mask;
}

// Channels [c0, c0 + NV * width) of multiplier index m, for one output row
// (OW, M, C); with MM = 2 (M = 2, a Fixed shape), both multipliers from the
// same input loads, written woven as y's row (OW, C * 2): channel c * 2 + m.
// Positions [lo, hi) read all W taps inside x; the others are the edges.
template <typename F, int N, int NV, int MM = 1>
void ForwardBlock(const Geom& g, const float* const* xr, const float* const* wr, int nt,
                  int64_t c0, int64_t m, int64_t lo, int64_t hi, float* out, bool stream) {
  using V = typename Pack<N>::V;
  constexpr int L = N;
  static_assert(MM == 1 || F::KW > 0, "two multipliers at once need a Fixed shape");
  const int64_t os = g.m * g.c;  // between output positions
  float* const base = out + (MM == 2 ? 2 * c0 : m * g.c + c0);
  auto store = [&](float* p, V v) {
    if (stream) {
      StreamStore<N>(p, v);
    } else {
      Pack<N>::Store(p, v);
    }
  };
  auto emit = [&](int64_t o, const V (&acc)[MM][NV]) {
    float* p = base + o * os;
    if constexpr (MM == 1) {
      for (int v = 0; v < NV; ++v) store(p + v * L, acc[0][v]);
    } else if constexpr (N == 1) {
      for (int v = 0; v < NV; ++v) p[2 * v] = acc[0][v], p[2 * v + 1] = acc[1][v];
    } else {
      static const typename Pack<N>::U lo_half = WeaveMask<N>(0), hi_half = WeaveMask<N>(1);
      for (int v = 0; v < NV; ++v) {
        store(p + 2 * v * L, __builtin_shuffle(acc[0][v], acc[1][v], lo_half));
        store(p + 2 * v * L + L, __builtin_shuffle(acc[0][v], acc[1][v], hi_half));
      }
    }
  };
  if constexpr (F::KW > 0) {
    // The whole row in blocks of NP outputs, then of NP / 2, ... down to 1;
    // blocks that reach into the zero padding skip its taps (`Edge`). Small
    // frames (5x5 to 14x14) are mostly such blocks.
    constexpr int J1 = (F::KW - 1) * F::RW + 1;  // inputs one output reads
    int64_t o = 0;
    auto blocks = [&](auto np) {
      constexpr int NP = decltype(np)::value, J = (NP - 1) * F::SW + J1;
      for (; o + NP <= g.ow; o += NP) {
        V acc[MM][NP][NV];
        const int64_t first = o * g.sw - g.pw;  // the block's first input position
        const int64_t off = first * g.c + c0;
        if (o >= lo && o + NP <= hi) {
          TapSumsFixed<F, N, NV, NP, MM, false>(xr, wr, nt, off, c0, g.c, os, 0, J, acc);
        } else {
          const int jlo = static_cast<int>(std::clamp<int64_t>(-first, 0, J));
          const int jhi = static_cast<int>(std::clamp<int64_t>(g.w - first, 0, J));
          TapSumsFixed<F, N, NV, NP, MM, true>(xr, wr, nt, off, c0, g.c, os, jlo, jhi, acc);
        }
        for (int p = 0; p < NP; ++p) {
          V at[MM][NV];
          for (int mm = 0; mm < MM; ++mm)
            for (int v = 0; v < NV; ++v) at[mm][v] = acc[mm][p][v];
          emit(o + p, at);
        }
      }
    };
    constexpr int NP = ForwardPositions<F::KW, NV, MM>();
    blocks(std::integral_constant<int, NP>{});
    if constexpr (NP >= 8) blocks(std::integral_constant<int, 4>{});
    if constexpr (NP >= 4) blocks(std::integral_constant<int, 2>{});
    blocks(std::integral_constant<int, 1>{});
  } else {
    auto emit1 = [&](int64_t o, const V* acc) {
      float* p = base + o * os;
      for (int v = 0; v < NV; ++v) store(p + v * L, acc[v]);
    };
    auto edge = [&](int64_t o) {
      const int64_t first = o * g.sw - g.pw;
      const int64_t e0 = std::max<int64_t>(0, CeilDiv(-first, g.rw));
      const int64_t e1 = std::min<int64_t>(g.kw, FloorDiv(g.w - 1 - first, g.rw) + 1);
      V acc[1][NV];
      TapSums<N, NV, 1>(g, xr, wr, e1 > e0 ? nt : 0, first * g.c + c0, c0, e0,
                        std::max(e0, e1), acc);
      emit1(o, acc[0]);
    };
    for (int64_t o = 0; o < lo; ++o) edge(o);
    int64_t o = lo;
    constexpr int NP = 4;
    for (; o + NP <= hi; o += NP) {
      V acc[NP][NV];
      TapSums<N, NV, NP>(g, xr, wr, nt, (o * g.sw - g.pw) * g.c + c0, c0, 0, g.kw, acc);
      for (int p = 0; p < NP; ++p) emit1(o + p, acc[p]);
    }
    for (; o < hi; ++o) {
      V acc[1][NV];
      TapSums<N, NV, 1>(g, xr, wr, nt, (o * g.sw - g.pw) * g.c + c0, c0, 0, g.kw, acc);
      emit1(o, acc[0]);
    }
    for (o = hi; o < g.ow; ++o) edge(o);
  }
}

// One output row: `wb[t]` is tap row t's (KW, M, C) weights, `wr` scratch;
// `stream`: non-temporal stores (ForwardStreams). The row is float32
// (OW, M, C), or with `Woven` (M = 2, a Fixed shape) y's (OW, C * 2).
template <typename F, bool Woven = false>
void ForwardRow(const Geom& g, const float* const* xr, const float* const* wb, int nt, int64_t lo,
                int64_t hi, float* out, const float** wr, bool stream) {
  if constexpr (Woven) {
    for (int t = 0; t < nt; ++t) wr[t] = wb[t];
    ForChannels(g.c, [&](auto n, auto nv, int64_t c0, int) {
      ForwardBlock<F, n, nv, 2>(g, xr, wr, nt, c0, 0, lo, hi, out, stream);
    });
    return;
  }
  for (int64_t m = 0; m < g.m; ++m) {
    for (int t = 0; t < nt; ++t) wr[t] = wb[t] + m * g.c;
    ForChannels(g.c, [&](auto n, auto nv, int64_t c0, int) {
      ForwardBlock<F, n, nv>(g, xr, wr, nt, c0, m, lo, hi, out, stream);
    });
  }
}

using ForwardRowFn = void (*)(const Geom&, const float* const*, const float* const*, int, int64_t,
                              int64_t, float*, const float**, bool);

}  // namespace dw5d

#endif  // DW5D_JAX_CSRC_CHANNELS_LAST_FORWARD_H_
