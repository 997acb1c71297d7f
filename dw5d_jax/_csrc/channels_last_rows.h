// Channels-last kernels: (N, D, H, W, C) arrays, vectorised over channels.
// This header holds the row tables the three ops of this layout share; the
// ops are channels_last_forward.cc (float32 row kernels in
// channels_last_forward.h, bfloat16 pairs in channels_last_pairs.h),
// channels_last_kernel_grad.cc and channels_last_input_grad.cc.
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

#ifndef DW5D_JAX_CSRC_CHANNELS_LAST_ROWS_H_
#define DW5D_JAX_CSRC_CHANNELS_LAST_ROWS_H_

#include <cstdint>
#include <memory>
#include <type_traits>
#include <vector>

#include "geometry.h"
#include "packets.h"

namespace dw5d {

// Calls block(Int<N>, Int<NV>, c0, skip) over the channels [0, c): NV
// packets of N floats from c0. Pairs of the widest packets first, then one
// packet of each narrower width. The channels left over (fewer than a
// packet) take one packet of the narrowest width that holds them, placed to
// end at c: it overlaps the channels before it, the first `skip` of its
// lanes, which it computes again. Blocks that store results write those
// lanes again (the same sums); blocks that accumulate leave them out
// (DropLanes). Only with fewer than 4 channels in all, single floats.
// C = 54 with 16-float packets: 2 x 16 from 0, 16 from 32, 8 from 46 (skip 2).
template <typename Block>
inline void ForChannels(int64_t c, Block&& block) {
  int64_t c0 = 0;
  for (; c0 + 2 * kLanes <= c; c0 += 2 * kLanes) block(Int<kLanes>{}, Int<2>{}, c0, 0);
  for (; c0 + kLanes <= c; c0 += kLanes) block(Int<kLanes>{}, Int<1>{}, c0, 0);
  auto last = [&](auto n) {  // one packet ending at c, if it holds the rest
    constexpr int N = decltype(n)::value;
    if (c0 == c || c - c0 > N || c < N) return;
    block(n, Int<1>{}, c - N, static_cast<int>(N - (c - c0)));
    c0 = c;
  };
  last(Int<4>{});
  if constexpr (kLanes > 4) last(Int<8>{});
  if constexpr (kLanes > 8) last(Int<16>{});
  if constexpr (kLanes > 8) {
    for (; c0 + 8 <= c; c0 += 8) block(Int<8>{}, Int<1>{}, c0, 0);
  }
  if constexpr (kLanes > 4) {
    for (; c0 + 4 <= c; c0 += 4) block(Int<4>{}, Int<1>{}, c0, 0);
  }
  last(Int<4>{});
  for (; c0 < c; ++c0) block(Int<1>{}, Int<1>{}, c0, 0);
}

// A per-tap-row table of `n` values (RowTaps' rows and the pointers the
// row kernels take): on the stack up to K entries (windows up to 8x8 in
// D x H), else on the heap. Every tile of a call builds its own tables;
// eight heap vectors per tile cost about a microsecond per tile, next to
// small layers' 20-100 us of work.
template <typename T, int K = 64>
class TapArray {
 public:
  explicit TapArray(int64_t n) : heap_(n > K ? n : 0) {}
  T* data() { return heap_.empty() ? stack_ : heap_.data(); }
  T& operator[](int64_t i) { return data()[i]; }

 private:
  T stack_[K];
  std::vector<T> heap_;
};

// The input rows that output row r reads: rows[t] indexes x viewed as
// N * D * H rows of W * C values, taps[t] = a * KH + b is its tap row
// (in tap order; a ring's planes where they lie: Geom::d0).
inline int RowTaps(const Geom& g, int64_t r, int64_t* rows, int64_t* taps) {
  const int64_t n = r / (g.od * g.oh), od = (r / g.oh) % g.od, oh = r % g.oh;
  int nt = 0;
  for (int64_t a = 0; a < g.kd; ++a) {
    const int64_t id = od * g.sd + a * g.rd - g.pd;
    if (id < 0 || id >= g.d) continue;
    for (int64_t b = 0; b < g.kh; ++b) {
      const int64_t ih = oh * g.sh + b * g.rh - g.ph;
      if (ih < 0 || ih >= g.h) continue;
      rows[nt] = (n * g.d + (g.d0 == 0 ? id : (id + g.d0) % g.d)) * g.h + ih;
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

// The row kernels for g's W shape (a Fixed one when there is one).
template <typename Pick>
auto WithShape(const Geom& g, bool generic, Pick pick) {
  switch (generic ? 0 : g.kw * 100 + g.sw * 10 + g.rw) {
    case 311: return pick(Fixed<3, 1, 1>{});
    case 321: return pick(Fixed<3, 2, 1>{});
    case 341: return pick(Fixed<3, 4, 1>{});  // MViT's attention pooling
    case 381: return pick(Fixed<3, 8, 1>{});
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
// Rows between the row kernels' float32 layout (OW, M, C) and the arrays'
// (OW, C * M).

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
inline std::vector<float> BiasRow(const Geom& g, const float* bias) {
  std::vector<float> row(g.ow * g.m * g.c);
  for (int64_t o = 0; o < g.ow; ++o)
    for (int64_t m = 0; m < g.m; ++m)
      for (int64_t c = 0; c < g.c; ++c) row[(o * g.m + m) * g.c + c] = bias[c * g.m + m];
  return row;
}

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

}  // namespace dw5d

#endif  // DW5D_JAX_CSRC_CHANNELS_LAST_ROWS_H_
