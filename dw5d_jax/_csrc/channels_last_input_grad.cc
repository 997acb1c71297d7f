// Channels-last input gradient in gather form.

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "channels_last_rows.h"
#include "geometry.h"
#include "kernels.h"
#include "packets.h"
#include "threads.h"

namespace dw5d {
namespace {

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
      ForChannels(g.c, [&](auto n, auto nv, int64_t c0, int) {
        InputGradBlock<n, nv>(g, src.data(), wr.data(), nt, rt, rho, c0, out, eoff.data(),
                              ewoff.data());
      });
    }
    if (!direct) Convert(tmp.data(), xrow, g.w * g.c);
  });
}

}  // namespace

template <typename TC, typename TO>
void ChannelsLast::InputGrad(ffi::ThreadPool* pool, const Geom& g, const TC* ct, const float* w,
                             TO* dx) {
  // Rows of dx; each reads about KD / SD planes and KH / SH rows of ct.
  const Tiles tiles = MakeTiles(g.n * g.d, g.h, g.ow * g.c * g.m * sizeof(TC),
                                CeilDiv(g.kd, g.sd), CeilDiv(g.kh, g.sh));
  ParallelFor(pool, tiles.Count(), Work(g) >= kMinParallelWork,
              [&](int64_t i) { InputGradRows(g, ct, w, dx, tiles, i); });
}

#define DW5D_INSTANTIATE(T1, T2)                                                             \
  template void ChannelsLast::InputGrad(ffi::ThreadPool*, const Geom&, const T1*, const float*, \
                                        T2*);
DW5D_FOR_DTYPE_PAIRS(DW5D_INSTANTIATE)
#undef DW5D_INSTANTIATE

}  // namespace dw5d
