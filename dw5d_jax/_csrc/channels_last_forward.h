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
    ForChannels(g.c, [&](auto n, auto nv, int64_t c0, int) {
      ForwardBlock<F, n, nv>(g, xr, wr, nt, c0, m, lo, hi, out, stream);
    });
  }
}

using ForwardRowFn = void (*)(const Geom&, const float* const*, const float* const*, int, int64_t,
                              int64_t, float*, const float**, bool);

}  // namespace dw5d

#endif  // DW5D_JAX_CSRC_CHANNELS_LAST_FORWARD_H_
