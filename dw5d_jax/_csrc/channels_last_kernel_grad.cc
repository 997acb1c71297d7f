// Channels-last kernel gradient, with the epilogue's backward pass fused in
// where it is asked for (ct replaced by g = ct * act'(z) as the pass goes,
// db = the sums of g).

#include <algorithm>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <vector>

#include "channels_last_forward.h"
#include "channels_last_rows.h"
#include "epilogue.h"
#include "geometry.h"
#include "kernels.h"
#include "packets.h"
#include "threads.h"

namespace dw5d {
namespace {

// Kernel gradient: dk[t, m, c] = sum over outputs o of
// x[o * s + t * r - p, c] * ct[o, c * M + m], in one pass over x and ct.
// The row kernels see float32 input rows `xr[t]`, the cotangent row as
// float32 (M, OW, C), and accumulate into `pr[t]`, tap row t's (KW, M, C)
// partial sums.

// out[0 : NV * width] += sum_i x[i * xs] * ct[i * cs] (packets of channels),
// the first `skip` lanes left out (ForChannels). Four independent partial
// sums per packet hide the multiply-add latency.
template <int N, int NV>
inline void GradDot(const float* x, const float* ct, int64_t count, int64_t xs, int64_t cs,
                    float* out, int skip) {
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
    if (v == 0) s = DropLanes<N>(s, skip);
    Pack<N>::Store(out + v * L, Pack<N>::Load(out + v * L) + s);
  }
}

// GradDot for all KW taps of `count` interior outputs at once, with F's W
// shape: per block of NB outputs, NB cotangent packets stay in registers and
// every input packet is loaded once. out[e * ms] is tap e's partial sum.
template <typename F, int N, int NV>
inline void GradDotFixed(const float* x, const float* ct, int64_t count, int64_t c, float* out,
                         int64_t ms, int skip) {
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
      if (v == 0) sum = DropLanes<N>(sum, skip);
      Pack<N>::Store(out + e * ms + v * L, Pack<N>::Load(out + e * ms + v * L) + sum);
    }
}

// Channels [c0, c0 + NV * width) of one tap row: the interior [a, b) (all
// taps inside x) with GradDotFixed when F is fixed, the rest with GradDot;
// the first `skip` channels left out (ForChannels).
template <typename F, int N, int NV>
void GradBlock(const Geom& g, const float* xrow, const float* cs, float* pt, const int64_t* lo,
               const int64_t* hi, int64_t a, int64_t b, int64_t c0, int skip) {
  const int64_t xs = g.sw * g.c, ms = g.m * g.c;
  const bool fixed = F::KW > 0 && b > a;
  if constexpr (F::KW > 0) {
    if (fixed)
      GradDotFixed<F, N, NV>(xrow + (a * g.sw - g.pw) * g.c + c0, cs + a * g.c + c0, b - a, g.c,
                             pt + c0, ms, skip);
  }
  for (int64_t e = 0; e < g.kw; ++e) {
    const float* xe = xrow + (e * g.rw - g.pw) * g.c + c0;
    float* out = pt + e * ms + c0;
    if (fixed) {
      if (a > lo[e])
        GradDot<N, NV>(xe + lo[e] * xs, cs + lo[e] * g.c + c0, a - lo[e], xs, g.c, out, skip);
      if (hi[e] > b)
        GradDot<N, NV>(xe + b * xs, cs + b * g.c + c0, hi[e] - b, xs, g.c, out, skip);
    } else if (hi[e] > lo[e]) {
      GradDot<N, NV>(xe + lo[e] * xs, cs + lo[e] * g.c + c0, hi[e] - lo[e], xs, g.c, out, skip);
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
      ForChannels(g.c, [&](auto n, auto nv, int64_t c0, int skip) {
        GradBlock<F, n, nv>(g, xr[t], cm, pt, lo, hi, a, b, c0, skip);
      });
    }
  }
}

using KernelGradRowFn = void (*)(const Geom&, const float* const*, float* const*, int,
                                 const float*, const int64_t*, const int64_t*, int64_t, int64_t);

// sum[j] += rows[o * len + j] for o < count (restrict: vectorised).
inline void AddRows(const float* __restrict rows, int64_t count, int64_t len,
                    float* __restrict sum) {
  for (int64_t o = 0; o < count; ++o)
    for (int64_t j = 0; j < len; ++j) sum[j] += rows[o * len + j];
}

// The epilogue's backward for the output rows of one tile (RunKernelGrad
// with an EpilogueGrad): per row, g = ct * act'(z) written to `g`, its sum added to `db`, and g as
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

}  // namespace

// Without e.db, the plain kernel gradient.
template <typename TI, typename TC>
void ChannelsLast::KernelGrad(ffi::ThreadPool* pool, const Geom& g, const TI* x, const TC* ct,
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

#define DW5D_INSTANTIATE(T1, T2)                                                              \
  template void ChannelsLast::KernelGrad(ffi::ThreadPool*, const Geom&, const T1*, const T2*, \
                                         const EpilogueGrad<T2>&, float*, bool);
DW5D_FOR_DTYPE_PAIRS(DW5D_INSTANTIATE)
#undef DW5D_INSTANTIATE

}  // namespace dw5d
