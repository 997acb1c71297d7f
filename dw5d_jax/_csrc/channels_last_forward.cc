// Channels-last forward pass, with the fused epilogue where it is given:
// y[o, c, m] = act(sum over taps of x[o * s + t * r - p, c] * w[t, m, c] +
// bias), row by row, with the float32 row kernels (channels_last_forward.h)
// or, for bfloat16 x on CPUs with AVX512-BF16, the pair kernels
// (channels_last_pairs.h).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "channels_last_forward.h"
#include "channels_last_pairs.h"
#include "channels_last_rows.h"
#include "epilogue.h"
#include "geometry.h"
#include "kernels.h"
#include "packets.h"
#include "threads.h"

namespace dw5d {
namespace {

// The last-level cache (the 32 MiB L3 of the AMD EPYC VMs).
constexpr int64_t kCacheBytes = 32 << 20;

// Outputs at least this large are written with non-temporal stores (half
// the L3: smaller ones may still be in a cache when the next op reads them).
constexpr int64_t kStreamBytes = kCacheBytes / 2;

// Prefetches the input rows that output row r reads and that come from
// memory rather than from L2: those that neither the output row before it
// (the row the kernels compute while the prefetches are in flight) nor the
// same row of the previous plane of its tile read. In a tile's band, that
// is the newest row of the deepest input plane. The hardware prefetchers
// alone leave the kernels waiting on each such row: a row of input is
// several 4 KiB pages, read in strided passes (one per channel block).
template <typename TI>
class InputPrefetch {
 public:
  InputPrefetch(const Geom& g, const TI* x, const Tiles& tiles)
      : g_(g), x_(x), height_(tiles.height), last_(g.kd * g.kh), plane_(g.kd * g.kh),
        rows_(g.kd * g.kh), taps_(g.kd * g.kh) {}

  void operator()(int64_t r) {
    if (first_plane_ < 0) first_plane_ = r / height_;
    const int n = RowTaps(g_, r, rows_.data(), taps_.data());
    const int np = r / height_ > first_plane_
                       ? RowTaps(g_, r - height_, plane_.data(), taps_.data())
                       : 0;
    const int64_t len = g_.w * g_.c;
    for (int t = 0; t < n; ++t) {
      const int64_t row = rows_[t];
      if (std::find(last_.begin(), last_.begin() + last_n_, row) != last_.begin() + last_n_ ||
          std::find(plane_.begin(), plane_.begin() + np, row) != plane_.begin() + np)
        continue;
      const char* p = reinterpret_cast<const char*>(x_ + row * len);
      for (int64_t b = 0; b < len * static_cast<int64_t>(sizeof(TI)); b += 64)
        __builtin_prefetch(p + b, 0, 3);
    }
    std::copy(rows_.begin(), rows_.begin() + n, last_.begin());
    last_n_ = n;
  }

 private:
  const Geom& g_;
  const TI* x_;
  int64_t height_, first_plane_ = -1;
  std::vector<int64_t> last_, plane_, rows_, taps_;
  int last_n_ = 0;
};

// The row kernels of a forward pass: float32 ones, and where bfloat16 x
// is multiplied in pairs (PairPlan), the pair ones (`pair` non-null).
struct ForwardFns {
  ForwardRowFn row = nullptr;
  bool woven = false;  // `row` writes y's (OW, C * M) layout (ForwardRow's Woven)
  PairRowFn pair = nullptr;
  const PairPlan* plan = nullptr;
};

// `bias_row` (BiasRow) non-null: the epilogue `act` is applied to every
// output row after its tap sums, while it is in L1, before it is stored
// (`stream`: with non-temporal stores). `prefetch`: InputPrefetch, one row
// ahead.
template <typename TI, typename TO>
void ForwardRows(const Geom& g, const ForwardFns& fns, const TI* x, const float* w, TO* y,
                 const Tiles& tiles, int64_t tile, bool stream, bool prefetch, Act act,
                 const float* bias_row) {
  const int64_t cm = g.c * g.m, taps = g.kd * g.kh;
  std::optional<InputRows<TI>> in;  // float32 rows (for the pair kernels: only non-finite rows)
  std::optional<PairRows> pairs;
  if constexpr (std::is_same<TI, bf16>::value) {
    if (fns.pair) pairs.emplace(g, x, *fns.plan, tiles);
  }
  TapArray<int64_t> rows(taps), tap(taps);
  TapArray<const float*> xr(taps), wb(taps), wr(taps);
  TapArray<const uint32_t*> pr(taps), pwb(taps), pw(taps);
  // float32 y in the row kernels' layout (M = 1, or woven rows) is written in place, unless
  // an epilogue runs on rows that are streamed: the row is then computed in `tmp` (in L1),
  // and the epilogue's pass over it streams it to y.
  const bool flat = g.m == 1 || fns.woven;  // rows in y's layout
  const bool stream_epilogue =
      std::is_same<TO, float>::value && flat && stream && bias_row != nullptr;
  const bool direct = std::is_same<TO, float>::value && flat && !stream_epilogue;
  std::vector<float> tmp(direct ? 0 : g.ow * cm);
  int64_t lo0, hi0, lo1, hi1;  // outputs whose first / last W tap is inside x
  ValidRange(g.w, g.ow, g.sw, -g.pw, &lo0, &hi0);
  ValidRange(g.w, g.ow, g.sw, (g.kw - 1) * g.rw - g.pw, &lo1, &hi1);
  int64_t lo = std::max(lo0, lo1), hi = std::min(hi0, hi1);
  if (hi <= lo) lo = hi = g.ow;
  const bool stream_row = direct && stream;  // rows written in place
  auto row = [&](int64_t r) {
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
    if constexpr (std::is_same<TO, float>::value) {
      if (stream_epilogue) return ActivateRowStream(act, out, bias_row, yrow, g.ow * cm);
    }
    if (bias_row != nullptr) ActivateRow(act, out, bias_row, g.ow * cm);
    if (direct) return;
    if (!flat) {
      StoreRow(g, tmp.data(), yrow, stream);
    } else if (stream) {
      ConvertStream(tmp.data(), yrow, g.ow * cm);
    } else {
      Convert(tmp.data(), yrow, g.ow * cm);
    }
  };
  if (prefetch) {  // each row computed after the next one's prefetches are issued
    InputPrefetch<TI> ahead(g, x, tiles);
    int64_t pending = -1;
    tiles.ForRows(tile, [&](int64_t r) {
      ahead(r);
      if (pending >= 0) row(pending);
      pending = r;
    });
    if (pending >= 0) row(pending);
  } else {
    tiles.ForRows(tile, row);
  }
  if (stream) StreamFence();
}

// The loops skip the zero padding, but 0 * inf and 0 * NaN are NaN: with a
// non-finite weight, every output whose tap with that weight lands in the
// padding is NaN (as in the float64 reference and XLA's lowerings). Only
// then (rare) this pass marks those outputs, one float at a time.
template <typename TO>
void PoisonPaddedTaps(const Geom& g, const float* w, TO* y) {
  const int64_t size = g.taps() * g.m * g.c;
  // A branch-free scan first, whole packets at a time (every call pays for
  // it; the scalar loop took 0.55 ns a weight, 6 us on 27 x 432 weights):
  // (bits & exponent) + 2^23 sets the sign bit exactly where the exponent
  // is all ones (inf, NaN).
  using P = Pack<kLanes>;
  P::U acc{};
  int64_t i = 0;
  for (; i + kLanes <= size; i += kLanes)
    acc |= (P::LoadU(reinterpret_cast<const uint32_t*>(w + i)) & 0x7f800000u) + 0x00800000u;
  uint32_t any = 0;
  for (int l = 0; l < kLanes; ++l) any |= acc[l];
  for (; i < size; ++i) {
    uint32_t u;
    std::memcpy(&u, w + i, 4);
    any |= (u & 0x7f800000u) + 0x00800000u;
  }
  if ((any >> 31) == 0) return;
  std::vector<int64_t> bad;  // (tap, m, c) of the non-finite weights
  for (int64_t i = 0; i < size; ++i)
    if (!std::isfinite(w[i])) bad.push_back(i);
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
bool ForwardStreams(const Geom& g, const TO* y, bool woven) {
  const int64_t bytes = g.rows() * g.ow * g.c * g.m * static_cast<int64_t>(sizeof(TO));
  const bool whole = (g.m == 1 || woven) && g.c % kLanes == 0 &&
                     (g.ow * g.c * g.m * sizeof(TO)) % 64 == 0 &&
                     reinterpret_cast<uintptr_t>(y) % 64 == 0;
  return whole && bytes >= kStreamBytes;
}

}  // namespace

template <typename TI, typename TO>
void ChannelsLast::Forward(ffi::ThreadPool* pool, const Geom& g, const TI* x, const float* w,
                           const Epilogue& e, TO* y, bool generic) {
  const Tiles tiles = MakeTiles(g.n * g.od, g.oh, g.w * g.c * sizeof(TI), g.kd, g.kh);
  ForwardFns fns;
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
  // M = 2 with a Fixed W shape: both multipliers from each input load, the
  // rows written woven in y's layout (not with the pair kernels, whose rows
  // are (OW, M, C)).
  fns.woven = g.m == 2 && fns.pair == nullptr &&
              WithShape(g, generic, [](auto shape) { return decltype(shape)::KW > 0; });
  fns.row = WithShape(g, generic, [&](auto shape) -> ForwardRowFn {
    if constexpr (decltype(shape)::KW > 0) {
      if (fns.woven) return ForwardRow<decltype(shape), true>;
    }
    return ForwardRow<decltype(shape)>;
  });
  const bool stream = ForwardStreams(g, y, fns.woven);
  std::vector<float> bias_row;  // in the rows' layout
  if (e.bias != nullptr && fns.woven) {
    bias_row.resize(g.ow * g.c * g.m);
    for (int64_t o = 0; o < g.ow; ++o)
      std::copy(e.bias, e.bias + g.c * g.m, bias_row.data() + o * g.c * g.m);
  } else if (e.bias != nullptr) {
    bias_row = BiasRow(g, e.bias);
  }
  const float* b = e.bias != nullptr ? bias_row.data() : nullptr;
  // Prefetching x where x and y do not fit in the L3 together (smaller ones stay there from
  // one call to the next: the prefetches would only cost instructions).
  const int64_t bytes = g.n * g.d * g.h * g.w * g.c * static_cast<int64_t>(sizeof(TI)) +
                        g.rows() * g.ow * g.c * g.m * static_cast<int64_t>(sizeof(TO));
  const bool prefetch = bytes > kCacheBytes;
  ParallelFor(pool, tiles.Count(), Work(g) >= kMinParallelWork, [&](int64_t i) {
    ForwardRows(g, fns, x, w, y, tiles, i, stream, prefetch, e.act, b);
  });
  PoisonPaddedTaps(g, w, y);
}

#define DW5D_INSTANTIATE(T1, T2)                                                              \
  template void ChannelsLast::Forward(ffi::ThreadPool*, const Geom&, const T1*, const float*, \
                                      const Epilogue&, T2*, bool);
DW5D_FOR_DTYPE_PAIRS(DW5D_INSTANTIATE)
#undef DW5D_INSTANTIATE

}  // namespace dw5d
