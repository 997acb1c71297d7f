// Channels-first kernels: (N, C, D, H, W) arrays, vectorised along W.
//
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
//
// With one multiplier and at least a packet of channels (`CbApplies`), the
// forward pass, the input gradient (stride 1: the forward pass, kernels.h;
// else in scatter form) and the plain kernel gradient run in channel blocks
// instead (`CbInput`, below):
// L channels at a time transposed in registers to (pixel, channel) packets,
// as channels-last, which fills every lane on small frames and strided rows.

#include <algorithm>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "epilogue.h"
#include "geometry.h"
#include "kernels.h"
#include "packets.h"
#include "threads.h"

namespace dw5d {
namespace {

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
const Pack<L>::U kWeaveLo = Weave(0), kWeaveHi = Weave(1);
// ... and the inverse: the even (odd) lanes of a then b.
const Pack<L>::U kUnweave0 = Unweave(0), kUnweave1 = Unweave(1);

inline int64_t RoundUp(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// The padded, phased copy of a row of `width` values read with stride `s`,
// dilation `r`, low padding `p` and `k` taps by `out` outputs (rounded up to
// packets): buffer[ph * q + i] = row[i * s + ph - p] (zero outside), for
// the phases a tap reads (a stride larger than the kernel leaves the others
// unread: MViT's pooling, stride 8 with 3 taps, reads 3 of 8).
struct CfRows {
  int64_t s, p, width, q, len;
  std::vector<int64_t> eoff;  // tap e at output o reads buffer[eoff[e] + o]
  std::vector<char> read;     // per phase: whether a tap reads it
  CfRows(int64_t width_, int64_t out, int64_t k, int64_t s_, int64_t r, int64_t p_)
      : s(s_), p(p_), width(width_), read(s_, 0) {
    q = RoundUp(out, L) + (k - 1) * r / s;
    len = s * q;
    for (int64_t e = 0; e < k; ++e) {
      eoff.push_back((e * r % s) * q + e * r / s);
      read[e * r % s] = 1;
    }
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
    // Stride 2 with both phases read: outputs [va, vb) of both phases from
    // pairs of packets, split into their even and odd lanes (the scalar loop
    // below, one value per load, took a third of the time of X3D's and
    // CSN's stride-2 layers); [va, vb) lies inside both phases' [lo, hi).
    int64_t va = 0, vb = 0;
    if (s == 2 && read[0] && read[1]) {
      va = std::min(q, CeilDiv(p, 2));  // 2 * i - p >= 0
      vb = va + std::max<int64_t>(0, std::min(q, FloorDiv(width + p, 2)) - va) / L * L;
      for (int64_t i = va; i < vb; i += L) {  // reads row[2 * i - p, 2 * (i + L) - p)
        const CfV a = Pack<L>::Load(row + 2 * i - p), b = Pack<L>::Load(row + 2 * i - p + L);
        Pack<L>::Store(out + i, __builtin_shuffle(a, b, kUnweave0));
        Pack<L>::Store(out + q + i, __builtin_shuffle(a, b, kUnweave1));
      }
    }
    for (int64_t ph = 0; ph < s; ++ph) {  // i * s + ph - p in [0, width) for i in [lo, hi)
      if (!read[ph]) continue;
      const int64_t lo = std::min(q, std::max<int64_t>(0, CeilDiv(p - ph, s)));
      const int64_t hi = std::max(lo, std::min(q, CeilDiv(width + p - ph, s)));
      float* o = out + ph * q;
      std::fill(o, o + lo, 0.0f);
      const T* in = row + ph - p;
      const int64_t skip0 = std::max(lo, std::min(hi, va)), skip1 = std::max(skip0, vb);
      for (int64_t i = lo; i < skip0; ++i) o[i] = Pack<1>::Load(in + i * s);
      for (int64_t i = skip1; i < hi; ++i) o[i] = Pack<1>::Load(in + i * s);
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
        CfV xv = Pack<L>::Load(s + v * L);
        InRegister(xv);
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
    read_.assign(count_, 0);  // the band's rows some tap reads
    for (int64_t j = 0; j < h1 - h0; ++j)
      for (int64_t b = 0; b < g.kh; ++b) read_[j * g.sh + b * g.rh] = 1;
    // Prefetch targets: kPrefetchBytes of read rows ahead of each read row,
    // into the next plane past the band's last (the planes of a volume follow
    // each other in memory). With a stride larger than the kernel most rows
    // are not read (MViT's pooling, stride 8: 3 of 8), so a fixed distance in
    // bytes lands on rows nobody reads and the strided loads wait for memory.
    std::vector<int64_t> rows_read;
    for (int64_t i = 0; i < count_; ++i)
      if (read_[i]) rows_read.push_back(i);
    const int64_t n_read = static_cast<int64_t>(rows_read.size());
    const int64_t ahead =
        std::max<int64_t>(1, kPrefetchBytes / std::max<int64_t>(1, g.w * sizeof(TI)));
    ahead_.assign(count_, 0);
    for (int64_t k = 0; k < n_read; ++k) {
      const int64_t t = k + ahead, wrap = t / n_read;
      ahead_[rows_read[k]] = wrap * g.h * g.w + (rows_read[t % n_read] - rows_read[k]) * g.w;
    }
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
        if (!read_[i]) return;  // a row between the taps of a large stride
        if (ih >= 0 && ih < g_.h) {
          rows_.Fill(xp + ih * g_.w, out);
          const char* ahead = reinterpret_cast<const char*>(xp + ih * g_.w + ahead_[i]);
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
  std::vector<char> read_;
  std::vector<int64_t> ahead_;  // per read row: where to prefetch, in values from it
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

// The weights of channel c, multiplier index m: per tap (a, b, e), and per
// (a, e, b) for the fixed H shapes.
struct CfWeights {
  std::vector<float> wk, wk_ae;
  explicit CfWeights(const Geom& g) : wk(g.taps()), wk_ae(g.taps()) {}
  void Load(const Geom& g, const float* w, int64_t c, int64_t m) {
    for (int64_t k = 0; k < g.taps(); ++k) {
      const int64_t a = k / (g.kh * g.kw), b = k / g.kw % g.kh, e = k % g.kw;
      wk[k] = w[(k * g.m + m) * g.c + c];
      wk_ae[(a * g.kw + e) * g.kh + b] = wk[k];
    }
  }
};

// Rows [i, i + R) of the band's output plane (CfInputPlanes::Plane) as
// float32 tap sums, `os` apart, `packets` whole packets each.
template <typename TI>
inline void CfForwardRows(const Geom& g, const CfSumRowsFns& fns, const CfInputPlanes<TI>& in,
                          const CfWeights& wt, int R, int64_t i, float* o, int64_t os,
                          int64_t packets) {
  if (fns.fixed[R]) {
    fns.fn[R](in.src_ae.data(), wt.wk_ae.data(), static_cast<int>(g.kd * g.kw), i * in.rs,
              in.rs, o, os, packets, in.rs1);
  } else {
    fns.fn[R](in.src.data(), wt.wk.data(), static_cast<int>(g.taps()), i * in.rs, in.rs, o, os,
              packets, in.rs1);
  }
}

// `e.bias` non-null: the epilogue applied to each block of rows after its
// tap sums, while they are in L1, before they are stored.
template <typename TI, typename TO>
void CfForwardTile(const Geom& g, const TI* x, const float* w, TO* y, const Tiles& tiles,
                   int64_t tile, const Epilogue& e) {
  const CfSumRowsFns fns(g);
  CfInputPlanes<TI> in(g, x, tiles, tile);
  const int64_t packets = (g.ow + L - 1) / L;
  CfWeights wt(g);
  // float32 rows of whole packets are written in place, others through `rows`.
  const bool direct = std::is_same<TO, float>::value && g.ow % L == 0;
  std::vector<float> rows(direct ? 0 : 8 * packets * L);
  for (int64_t p = in.p0; p < in.p1; ++p) {
    const int64_t vol = p / g.od, c = vol % g.c, n = vol / g.c, od = p % g.od;
    in.Plane(p);
    for (int64_t m = 0; m < g.m; ++m) {
      wt.Load(g, w, c, m);
      TO* out = y + ((((n * g.c + c) * g.m + m) * g.od + od) * g.oh + in.h0) * g.ow;
      CfRowBlocks(packets, in.h1 - in.h0, [&](auto r, int64_t i) {
        constexpr int R = decltype(r)::value;
        in.Need(i + R);
        CfPrefetchOut(out + i * g.ow, R * g.ow);
        float* o = direct ? reinterpret_cast<float*>(out + i * g.ow) : rows.data();
        const int64_t os = direct ? g.ow : packets * L;
        CfForwardRows(g, fns, in, wt, R, i, o, os, packets);
        if (e.bias != nullptr)
          for (int j = 0; j < R; ++j) ActivateRowScalar(e.act, o + j * os, e.bias[c * g.m + m], g.ow);
        if (!direct)
          for (int j = 0; j < R; ++j) Convert(o + j * os, out + (i + j) * g.ow, g.ow);
      });
    }
  }
}

// part[k] (L floats) += sum over rows j and packets v of
// ct[j][col + v] * (src[k] + off + j * rs)[col + v]. With `tail` lanes > 0
// (a last packet past the outputs, whose cotangent lanes are zero), the
// input lanes from `tail` on count as zeros: they hold inputs that real
// outputs read through other taps, and 0 * inf would be NaN.
template <int R, int NV>
inline void CfDots(const float* const* src, int nk, int64_t off, int64_t rs,
                   const float* const* ct, int64_t col, float* part, int tail = 0) {
  CfV cv[R][NV];
#pragma GCC unroll 8
  for (int j = 0; j < R; ++j)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) cv[j][v] = Pack<L>::Load(ct[j] + col + v * L);
  Pack<L>::U keep;
  for (int l = 0; l < L; ++l) keep[l] = tail == 0 || l < tail ? ~0u : 0u;
  for (int k = 0; k < nk; ++k) {
    const float* s = src[k] + off + col;
    CfV sum[2] = {Pack<L>::Zero(), Pack<L>::Zero()};
#pragma GCC unroll 8
    for (int j = 0; j < R; ++j, s += rs)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        CfV xv = Pack<L>::Load(s + v * L);
        if (tail) xv = reinterpret_cast<CfV>(reinterpret_cast<Pack<L>::U>(xv) & keep);
        sum[(j * NV + v) & 1] += cv[j][v] * xv;
      }
    Pack<L>::Store(part + k * L, Pack<L>::Load(part + k * L) + (sum[0] + sum[1]));
  }
}

// One tile's kernel-gradient sums, dk-shaped (KD, KH, KW, M, C), into `part`:
// per channel in packets (`acc`), reduced in a fixed order when the tile
// moves on to another channel. With the epilogue's backward (`e.db` set),
// the cotangent rows are g = ct * act'(z) (z recomputed with the forward's
// row sums, or act' from y), written to e.g, their sums added to `db_part`.
template <typename TI, typename TC>
void CfKernelGradTile(const Geom& g, const TI* x, const TC* ct, float* part, const Tiles& tiles,
                      int64_t tile, const EpilogueGrad<TC>& e, float* db_part) {
  const bool epilogue = e.db != nullptr;
  CfInputPlanes<TI> in(g, x, tiles, tile);
  const CfSumRowsFns fns(g);
  CfWeights wt(g);
  const int64_t nk = g.taps(), packets = (g.ow + L - 1) / L, rmax = 8, width = packets * L;
  // ct rows as float32 padded with zeros to whole packets (in place when they are).
  const bool direct = std::is_same<TC, float>::value && g.ow % L == 0 && !epilogue;
  std::vector<float> cbuf(direct ? 0 : rmax * width, 0.0f), acc(g.m * nk * L, 0.0f);
  // The epilogue's rows: g (the tail stays zero), and z or y.
  std::vector<float> gbuf(epilogue ? rmax * width : 0, 0.0f),
      vbuf(epilogue && e.g != nullptr ? rmax * width : 0, 0.0f);
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
      const int64_t first = ((((n * g.c + c) * g.m + m) * g.od + od) * g.oh + in.h0) * g.ow;
      const TC* crows = ct + first;
      if (epilogue && e.w != nullptr) wt.Load(g, e.w, c, m);
      CfRowBlocks(packets, in.h1 - in.h0, [&](auto r, int64_t i) {
        constexpr int R = decltype(r)::value;
        in.Need(i + R);
        const float* cr[R];
        for (int j = 0; j < R; ++j) {
          const TC* crow = crows + (i + j) * g.ow;
          if (direct) {
            cr[j] = reinterpret_cast<const float*>(crow);
          } else {
            Convert(crow, &cbuf[j * width], g.ow);  // the tail stays zero
            cr[j] = &cbuf[j * width];
          }
        }
        if (epilogue) {
          const int64_t cm = c * g.m + m;
          if (e.g != nullptr) {
            if (e.w != nullptr) {  // z, recomputed
              CfForwardRows(g, fns, in, wt, R, i, vbuf.data(), width, packets);
            } else {
              for (int j = 0; j < R; ++j)
                Convert(e.y + first + (i + j) * g.ow, &vbuf[j * width], g.ow);
            }
            for (int j = 0; j < R; ++j) {
              float* grow = &gbuf[j * width];
              if (e.w != nullptr) {
                SlopeRowZScalar(e.epilogue.act, &vbuf[j * width], e.epilogue.bias[cm], cr[j], grow,
                                g.ow);
              } else {
                SlopeRowY(e.epilogue.act, &vbuf[j * width], cr[j], grow, g.ow);
              }
              std::copy(grow, grow + g.ow, e.g + first + (i + j) * g.ow);
              cr[j] = grow;
            }
          }
          float sum = 0.0f;
          for (int j = 0; j < R; ++j)
            for (int64_t o = 0; o < g.ow; ++o) sum += cr[j][o];
          db_part[cm] += sum;
        }
        const float* const* src = in.src.data();
        const int64_t off = i * in.rs;
        float* pm = &acc[m * nk * L];
        const int n_k = static_cast<int>(nk);
        // Whole packets of outputs, then the last one (with its lanes past OW masked).
        const int64_t whole = g.ow / L;
        const int tail = static_cast<int>(g.ow % L);
        int64_t v0 = 0;
        for (; v0 + 4 <= whole; v0 += 4) CfDots<R, 4>(src, n_k, off, in.rs, cr, v0 * L, pm);
        for (; v0 + 2 <= whole; v0 += 2) CfDots<R, 2>(src, n_k, off, in.rs, cr, v0 * L, pm);
        for (; v0 < whole; ++v0) CfDots<R, 1>(src, n_k, off, in.rs, cr, v0 * L, pm);
        if (tail) CfDots<R, 1>(src, n_k, off, in.rs, cr, v0 * L, pm, tail);
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
  std::vector<float> wk(g.sw * nkmax), phases(rmax * g.sw * gather.qn),
      woven(std::max(2 * gather.qn, g.w + g.pw + g.sw)), zeros(g.w, 0.0f);
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
      if (std::all_of(nks.begin(), nks.end(), [](int nk) { return nk == 0; })) {
        // No tap reaches these rows (a stride larger than the kernel: MViT's
        // pooling, stride 8 with 3 taps, leaves 5 rows of 8): zeros.
        for (int64_t h = first; h < h1; h += g.sh)
          Convert(zeros.data(), dx + (p * g.h + h) * g.w, g.w);
        continue;
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
          // Larger strides: the phases that taps reach woven into a row of
          // zeros, converted into dx in packets (scalar stores of every phase,
          // zeros included, took most of MViT's stride-8 input gradient).
          std::fill(woven.begin(), woven.begin() + g.w, 0.0f);
          for (int64_t ph = 0; ph < g.sw; ++ph) {  // iw = iw0 + t * SW: u = (u0 + t) * SW + ph
            if (nks[ph] == 0) continue;
            const int64_t iw0 = ((ph - g.pw) % g.sw + g.sw) % g.sw;
            const float* in = row + ph * gather.qn + (iw0 + g.pw - ph) / g.sw - gather.q0;
            for (int64_t iw = iw0, t = 0; iw < g.w; iw += g.sw, ++t) woven[iw] = in[t];
          }
          Convert(woven.data(), xrow, g.w);
        }
      });
    }
  }
}


// ---------------------------------------------------------------------------
// Channel blocks: the forward pass for M = 1 and C >= L, L channels at a
// time in channels-last order. Rows of a few outputs (MViT's 8x14x14
// planes, 7-output rows of its stride-8 pooling, X3D's 10x10) leave most
// lanes of a W-vectorised packet empty and pay per-plane work for every
// (n, c); here a tile transposes the L channel rows of each input row it
// reads into a zero-padded (column, channel) buffer, sums the taps for a
// packet of L channels per output pixel (every lane used, whatever OW), and
// transposes the plane of outputs back.

// Transposes the L x L block a (a[i][j] -> a[j][i]) in registers: weaving
// row i with row i + L/2 rotates each element's address bits (row, column)
// left by one, so log2(L) rounds swap row and column. L = 4, element
// (i1 i0, j1 j0): (i0 j1, j0 i1) after one round, (j1 j0, i1 i0) after two.
// With 8 lanes (AVX2), the usual unpack / shuffle / 128-bit permute network
// instead: 24 single-source-pair shuffles, where each weave is a variable
// permute of each packet plus a blend (72 in all; the transposes took most
// of MViT's stride-8 pooling forward).
inline void CbTranspose(CfV (&a)[L]) {
#if defined(__AVX__) && !defined(__AVX512F__)
  if constexpr (L == 8) {
    __m256 r[8], t[8];
    for (int i = 0; i < 8; ++i) r[i] = reinterpret_cast<__m256>(a[i]);
    for (int i = 0; i < 8; i += 2) {
      t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);      // r_i0 r_(i+1)0 r_i1 r_(i+1)1 | 4..5
      t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);  // columns 2, 3 | 6, 7
    }
    for (int i = 0; i < 8; i += 4) {
      r[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));      // column 0 | 4
      r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));  // 1 | 5
      r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));  // 2 | 6
      r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));  // 3 | 7
    }
    for (int i = 0; i < 4; ++i) {  // rows 0-3's halves with rows 4-7's
      t[i] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x20);
      t[i + 4] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x31);
    }
    for (int i = 0; i < 8; ++i) a[i] = reinterpret_cast<CfV>(t[i]);
    return;
  }
#endif
  for (int round = 1; round < L; round *= 2) {
    CfV b[L];
#pragma GCC unroll 16
    for (int i = 0; i < L / 2; ++i) {
      b[2 * i] = __builtin_shuffle(a[i], a[i + L / 2], kWeaveLo);
      b[2 * i + 1] = __builtin_shuffle(a[i], a[i + L / 2], kWeaveHi);
    }
#pragma GCC unroll 16
    for (int i = 0; i < L; ++i) a[i] = b[i];
  }
}

// dst[j * L + l] = src[l * chan + j] for j < count, l < L: L channel
// rows `chan` apart transposed into (position, channel) packets. A last
// block of fewer than L positions is the L before `count`, overlapping the
// block before it, where there are L (a scalar copy per channel took a
// tenth of MViT's stride-8 pooling forward).
template <typename T>
inline void CbTransposeIn(const T* src, int64_t chan, int64_t count, float* dst) {
  for (int64_t j0 = 0; j0 < count; j0 += L) {
    if (j0 + L > count && count >= L) j0 = count - L;
    const int64_t cnt = std::min<int64_t>(L, count - j0);
    CfV a[L];
    for (int l = 0; l < L; ++l) {
      if (cnt == L) {
        a[l] = Pack<L>::Load(src + l * chan + j0);
      } else {
        float tmp[L] = {};
        Convert(src + l * chan + j0, tmp, cnt);
        a[l] = Pack<L>::Load(tmp);
      }
    }
    CbTranspose(a);
    for (int64_t j = 0; j < cnt; ++j) Pack<L>::Store(dst + (j0 + j) * L, a[j]);
  }
}

// The inverse, for the channels [own, L): dst[l * chan + j] = src[j * L + l].
template <typename T>
inline void CbTransposeOut(const float* src, int64_t count, int64_t own, T* dst, int64_t chan) {
  for (int64_t j0 = 0; j0 < count; j0 += L) {
    if (j0 + L > count && count >= L) j0 = count - L;  // as CbTransposeIn
    const int64_t cnt = std::min<int64_t>(L, count - j0);
    CfV a[L];
    for (int j = 0; j < L; ++j) a[j] = j < cnt ? Pack<L>::Load(src + (j0 + j) * L) : Pack<L>::Zero();
    CbTranspose(a);
    for (int64_t l = own; l < L; ++l) {
      if (cnt == L) {
        Pack<L>::Store(dst + l * chan + j0, a[l]);
      } else {
        float tmp[L];
        Pack<L>::Store(tmp, a[l]);
        Convert(tmp, dst + l * chan + j0, cnt);
      }
    }
  }
}

// Whether the channel blocks compute g (`generic`: per plane, for tests):
// one multiplier, a whole packet of channels, some input and output.
inline bool CbApplies(const Geom& g, bool generic) {
  return !generic && g.m == 1 && g.c >= L && g.n * g.od * g.oh * g.ow * g.d * g.h * g.w > 0;
}

// The tiles of a channel-block pass: per (n, block of L channels), runs of
// `run` planes (consecutive output planes share KD - 1 input planes).
struct CbTiles {
  int64_t blocks, units, run, runs;
  // `planes`: the planes along D that tiles split (OD, or D for the input gradient).
  CbTiles(const Geom& g, int64_t planes) {
    blocks = CeilDiv(g.c, L), units = g.n * blocks;
    run = std::min(planes, std::max<int64_t>(1, units * planes / kCbTiles));
    runs = CeilDiv(planes, run);
  }
  int64_t Count() const { return units * runs; }
  static constexpr int64_t kCbTiles = 8;  // about this many tiles, or one per (n, block)
};

// acc[j][p] = the tap sums of R output rows x NP output pixels `ps`
// floats apart in the buffered rows: row j's tap row t (a, b) at
// rows[j * nab + t] + off, tap e `es` further. R * NP = 8 independent sums
// where the rows are long enough: rows of 7 outputs in blocks of 4, 2 and 1
// pixels of one row waited on each multiply-add's latency.
template <int R, int NP>
inline void CbSums(const float* const* rows, int nab, const float* wk, int kw, int64_t es,
                   int64_t ps, int64_t off, CfV (&acc)[R][NP]) {
#pragma GCC unroll 8
  for (int j = 0; j < R; ++j)
#pragma GCC unroll 8
    for (int p = 0; p < NP; ++p) acc[j][p] = Pack<L>::Zero();
  for (int t = 0; t < nab; ++t) {
    const float* r[R];
#pragma GCC unroll 8
    for (int j = 0; j < R; ++j) r[j] = rows[j * nab + t] + off;
    for (int e = 0; e < kw; ++e) {
      const CfV wv = Pack<L>::Load(wk + (t * kw + e) * L);
#pragma GCC unroll 8
      for (int j = 0; j < R; ++j)
#pragma GCC unroll 8
        for (int p = 0; p < NP; ++p) acc[j][p] += wv * Pack<L>::Load(r[j] + e * es + p * ps);
    }
  }
}

// CbSums for KW taps along W at stride and dilation 1 (es == ps): each
// loaded column packet feeds every (pixel, tap) that reads it, NP + KW - 1
// loads for NP * KW multiply-adds (the small stride-1 planes: X3D's 5x5,
// CSN's and MViT's 7x7).
template <int R, int NP, int KW>
inline void CbSumsW(const float* const* rows, int nab, const float* wk, int64_t es, int64_t off,
                    CfV (&acc)[R][NP]) {
#pragma GCC unroll 8
  for (int j = 0; j < R; ++j)
#pragma GCC unroll 8
    for (int p = 0; p < NP; ++p) acc[j][p] = Pack<L>::Zero();
  for (int t = 0; t < nab; ++t) {
    CfV wv[KW];
#pragma GCC unroll 8
    for (int e = 0; e < KW; ++e) wv[e] = Pack<L>::Load(wk + (t * KW + e) * L);
#pragma GCC unroll 8
    for (int j = 0; j < R; ++j) {
      const float* r = rows[j * nab + t] + off;
#pragma GCC unroll 16
      for (int q = 0; q < NP + KW - 1; ++q) {
        CfV xv = Pack<L>::Load(r + q * es);
        InRegister(xv);
#pragma GCC unroll 8
        for (int e = 0; e < KW; ++e) {
          const int p = q - e;
          if (p >= 0 && p < NP) acc[j][p] += wv[e] * xv;
        }
      }
    }
  }
}

// The input side of a channel-block tile: channels [c0, c0 + L) of volume
// n (the last block of a C that is no multiple of L overlaps the one
// before; `own`: its first channel that no other block has), output planes
// [od0, od1). The input planes that output plane od reads are buffered in
// (column, channel) order, zero-padded along W: buffer row i holds input
// row ih = i - PH, column u input column iw = u - PW; `Rows(oh)` points
// rows[a * KH + b] at the row tap (a, b) of output row oh reads (`zero` for
// the padding), tap e at + e * es, output pixel p at + p * ps.
template <typename TI>
class CbInput {
 public:
  CbInput(const Geom& g, const TI* x, const CbTiles& t, int64_t tile) : g_(g) {
    const int64_t unit = tile / t.runs, q = tile % t.runs, cb = unit % t.blocks;
    n = unit / t.blocks, c0 = std::min(cb * L, g.c - L), own = cb * L - c0;
    od0 = q * t.run, od1 = std::min(g.od, od0 + t.run);
    wp_ = (g.ow - 1) * g.sw + (g.kw - 1) * g.rw + 1;
    hp_ = (g.oh - 1) * g.sh + (g.kh - 1) * g.rh + 1;
    row_ = wp_ * L, es = g.rw * L, ps = g.sw * L;
    read_.assign(hp_, 0);  // rows some tap reads (a stride > kernel skips some)
    for (int64_t oh = 0; oh < g.oh; ++oh)
      for (int64_t b = 0; b < g.kh; ++b) read_[oh * g.sh + b * g.rh] = 1;
    span_ = (g.kd - 1) * g.rd + 1;
    planes_.reset(new float[span_ * hp_ * row_]);
    zero_.assign(row_, 0.0f);
    keys_.assign(span_, -1);
    base_.resize(g.kd);
    rows.resize(g.kd * g.kh);
    x_ = x + (n * g.c + c0) * g.d * g.h * g.w;
    if (g.w < L) flat_.resize(g.h * g.w * L);
  }

  int64_t n, c0, own, od0, od1, es, ps;
  std::vector<const float*> rows;

  // Output plane od: its input planes buffered (those not already).
  void Plane(int64_t od) {
    for (int64_t a = 0; a < g_.kd; ++a) {
      const int64_t id = od * g_.sd + a * g_.rd - g_.pd;
      base_[a] = nullptr;  // a plane of padding
      if (id < 0 || id >= g_.d) continue;
      const int64_t slot = id % span_;
      float* buf = planes_.get() + slot * hp_ * row_;
      if (keys_[slot] != id) Fill(buf, id), keys_[slot] = id;
      base_[a] = buf;
    }
  }

  void Rows(int64_t oh) {
    for (int64_t a = 0; a < g_.kd; ++a)
      for (int64_t b = 0; b < g_.kh; ++b) {
        const int64_t i = oh * g_.sh + b * g_.rh, ih = i - g_.ph;
        rows[a * g_.kh + b] =
            base_[a] != nullptr && ih >= 0 && ih < g_.h ? base_[a] + i * row_ : zero_.data();
      }
  }

 private:
  void Fill(float* buf, int64_t id) {
    const int64_t chan = g_.d * g_.h * g_.w;  // between the channels' planes
    // Input columns [u0, u1) exist; the others are the zero padding.
    const int64_t u0 = std::min(wp_, std::max<int64_t>(0, g_.pw));
    const int64_t u1 = std::max(u0, std::min(wp_, g_.pw + g_.w));
    const TI* plane = x_ + id * g_.h * g_.w;
    // Each of the L channels is its own stream of rows (strided ones: 3 of
    // 8 at MViT's pooling), which the hardware prefetchers do not follow:
    // prefetched here, the next plane (`flat_`) or four read rows ahead.
    auto prefetch = [&](const TI* p, int64_t count) {
      if (p >= x_ + g_.d * g_.h * g_.w) return;  // past the block's last plane
      for (int l = 0; l < L; ++l) CfPrefetch(p + l * chan, count);
    };
    // Rows narrower than a packet: the plane transposed as one run of H * W
    // positions, then copied row by row (X3D's 5x5, CSN's and MViT's 7x7).
    if (!flat_.empty()) {
      prefetch(plane + g_.h * g_.w, g_.h * g_.w);
      CbTransposeIn(plane, chan, g_.h * g_.w, flat_.data());
    }
    rows_.clear();
    for (int64_t i = 0; i < hp_; ++i)
      if (read_[i] && i - g_.ph >= 0 && i - g_.ph < g_.h) rows_.push_back(i);
    for (size_t k = 0; k < rows_.size(); ++k) {
      const int64_t i = rows_[k], ih = i - g_.ph;  // rows not listed: never read, or `zero`
      if (flat_.empty() && k + 4 < rows_.size())
        prefetch(plane + (rows_[k + 4] - g_.ph) * g_.w, g_.w);
      float* r = buf + i * row_;
      std::fill(r, r + u0 * L, 0.0f);
      std::fill(r + u1 * L, r + row_, 0.0f);
      if (flat_.empty()) {
        CbTransposeIn(plane + ih * g_.w + u0 - g_.pw, chan, u1 - u0, r + u0 * L);
      } else {
        const float* f = &flat_[(ih * g_.w + u0 - g_.pw) * L];
        std::copy(f, f + (u1 - u0) * L, r + u0 * L);
      }
    }
  }

  const Geom& g_;
  const TI* x_;
  int64_t wp_, hp_, row_, span_;
  std::vector<char> read_;
  std::unique_ptr<float[]> planes_;
  std::vector<float> zero_;
  std::vector<int64_t> keys_;
  std::vector<float*> base_;
  std::vector<float> flat_;  // W < L: the plane transposed (Fill)
  std::vector<int64_t> rows_;  // Fill: the rows it transposes
};

// One tile of the forward pass: each output plane's rows as (pixel,
// channel) tap sums in `out`, with the epilogue, then transposed into y.
template <typename TI, typename TO>
void CbForwardTile(const Geom& g, const TI* x, const float* w, TO* y, const CbTiles& t,
                   int64_t tile, const Epilogue& e) {
  CbInput<TI> in(g, x, t, tile);
  const int64_t plane = g.oh * g.ow;
  std::unique_ptr<float[]> out(new float[plane * L]);
  std::vector<float> wk(g.taps() * L), bias(e.bias != nullptr ? g.ow * L : 0);
  for (int64_t k = 0; k < g.taps(); ++k)
    for (int l = 0; l < L; ++l) wk[k * L + l] = w[k * g.c + in.c0 + l];
  for (int64_t o = 0; o < static_cast<int64_t>(bias.size()); ++o) bias[o] = e.bias[in.c0 + o % L];
  const int nab = static_cast<int>(g.kd * g.kh), kw = static_cast<int>(g.kw);
  std::vector<const float*> table(g.oh * nab);  // per output row: in.rows
  const bool w3 = g.kw == 3 && g.sw == 1 && g.rw == 1;  // CbSumsW's shape
  for (int64_t od = in.od0; od < in.od1; ++od) {
    in.Plane(od);
    for (int64_t oh = 0; oh < g.oh; ++oh) {
      in.Rows(oh);
      std::copy(in.rows.begin(), in.rows.end(), &table[oh * nab]);
    }
    // Blocks of NP pixels (8, 4, 2, 1) by R = 8 / NP rows (then fewer).
    int64_t p0 = 0;
    auto cols = [&](auto np) {
      constexpr int NP = decltype(np)::value;
      for (; p0 + NP <= g.ow; p0 += NP) {
        int64_t oh = 0;
        auto rows = [&](auto r) {
          constexpr int R = decltype(r)::value;
          for (; oh + R <= g.oh; oh += R) {
            CfV acc[R][NP];
            if (w3) {
              CbSumsW<R, NP, 3>(&table[oh * nab], nab, wk.data(), in.es, p0 * in.ps, acc);
            } else {
              CbSums<R, NP>(&table[oh * nab], nab, wk.data(), kw, in.es, in.ps, p0 * in.ps, acc);
            }
#pragma GCC unroll 8
            for (int j = 0; j < R; ++j)
#pragma GCC unroll 8
              for (int p = 0; p < NP; ++p)
                Pack<L>::Store(out.get() + ((oh + j) * g.ow + p0 + p) * L, acc[j][p]);
          }
        };
        constexpr int R = 8 / NP;
        rows(Int<R>{});
        if constexpr (R >= 4) rows(Int<R / 2>{});
        if constexpr (R >= 8) rows(Int<R / 4>{});
        if constexpr (R >= 2) rows(Int<1>{});
      }
    };
    cols(Int<8>{});
    cols(Int<4>{});
    cols(Int<2>{});
    cols(Int<1>{});
    if (e.bias != nullptr)
      for (int64_t oh = 0; oh < g.oh; ++oh)
        ActivateRow(e.act, out.get() + oh * g.ow * L, bias.data(), g.ow * L);
    CbTransposeOut(out.get(), plane, in.own, y + ((in.n * g.c + in.c0) * g.od + od) * plane,
                   g.od * plane);
  }
}

// acc[e] (L floats each) += sum over the `count` pixels p of ct[p] * the
// input packet that tap e of pixel p reads (r + p * ps + e * es): NE taps
// per loaded ct packet, two chains each.
template <int NE>
inline void CbDots(const float* r, const float* ct, int64_t count, int64_t es, int64_t ps,
                   float* acc) {
  CfV s[2][NE];
#pragma GCC unroll 4
  for (int e = 0; e < NE; ++e) s[0][e] = s[1][e] = Pack<L>::Zero();
  int64_t p = 0;
  for (; p + 2 <= count; p += 2, r += 2 * ps) {
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      const CfV c = Pack<L>::Load(ct + (p + h) * L);
#pragma GCC unroll 4
      for (int e = 0; e < NE; ++e) s[h][e] += c * Pack<L>::Load(r + h * ps + e * es);
    }
  }
  if (p < count) {
    const CfV c = Pack<L>::Load(ct + p * L);
#pragma GCC unroll 4
    for (int e = 0; e < NE; ++e) s[0][e] += c * Pack<L>::Load(r + e * es);
  }
#pragma GCC unroll 4
  for (int e = 0; e < NE; ++e)
    Pack<L>::Store(acc + e * L, Pack<L>::Load(acc + e * L) + (s[0][e] + s[1][e]));
}

// One tile of the kernel gradient (no epilogue), into part (dk-shaped,
// (taps, C)): per output row, ct's row of (pixel, channel) packets times
// each tap's input row, KW taps per loaded ct packet.
template <typename TI, typename TC>
void CbKernelGradTile(const Geom& g, const TI* x, const TC* ct, float* part, const CbTiles& t,
                      int64_t tile) {
  CbInput<TI> in(g, x, t, tile);
  const int64_t plane = g.oh * g.ow, nab = g.kd * g.kh;
  std::unique_ptr<float[]> cbuf(new float[plane * L]);
  std::vector<float> acc(g.taps() * L, 0.0f);
  for (int64_t od = in.od0; od < in.od1; ++od) {
    in.Plane(od);
    CbTransposeIn(ct + ((in.n * g.c + in.c0) * g.od + od) * plane, g.od * plane, plane,
                  cbuf.get());
    for (int64_t oh = 0; oh < g.oh; ++oh) {
      in.Rows(oh);
      const float* cr = cbuf.get() + oh * g.ow * L;
      for (int64_t ab = 0; ab < nab; ++ab) {
        for (int64_t e0 = 0; e0 < g.kw; e0 += 4) {
          const float* r = in.rows[ab] + e0 * in.es;
          float* a = &acc[(ab * g.kw + e0) * L];
          switch (std::min<int64_t>(4, g.kw - e0)) {
            case 1: CbDots<1>(r, cr, g.ow, in.es, in.ps, a); break;
            case 2: CbDots<2>(r, cr, g.ow, in.es, in.ps, a); break;
            case 3: CbDots<3>(r, cr, g.ow, in.es, in.ps, a); break;
            default: CbDots<4>(r, cr, g.ow, in.es, in.ps, a);
          }
        }
      }
    }
  }
  for (int64_t k = 0; k < g.taps(); ++k)
    for (int64_t l = in.own; l < L; ++l) part[k * g.c + in.c0 + l] = acc[k * L + l];
}

// One tile of the input gradient in scatter form: input planes [id0, id1)
// of channels [c0, c0 + L) of volume n (as CbInput), each accumulated in
// (column, channel) packets from the ct planes that reach it, ct[o] * w[t]
// added at input o * s + t * r - p for every tap t, then transposed into
// dx. Buffer row ih, column u holds input column iw = u - PW - lm (lm: a
// margin for a negative PW, a crop, whose first columns no output reaches).
template <typename TC, typename TO>
void CbInputGradTile(const Geom& g, const TC* ct, const float* w, TO* dx, const CbTiles& t,
                     int64_t tile) {
  const int64_t unit = tile / t.runs, q = tile % t.runs, cb = unit % t.blocks;
  const int64_t n = unit / t.blocks, c0 = std::min(cb * L, g.c - L), own = cb * L - c0;
  const int64_t id0 = q * t.run, id1 = std::min(g.d, id0 + t.run);
  const int64_t lm = std::max<int64_t>(0, -g.pw);
  const int64_t wb = std::max((g.ow - 1) * g.sw + (g.kw - 1) * g.rw + 1, g.pw + g.w) + lm;
  const int64_t plane = g.oh * g.ow, span = (g.kd - 1) * g.rd / g.sd + 1;
  std::unique_ptr<float[]> acc(new float[g.h * wb * L]), cts(new float[span * plane * L]);
  std::vector<int64_t> keys(span, -1);
  std::vector<float> wk(g.taps() * L), flat(g.w < L ? g.h * g.w * L : 0);
  for (int64_t k = 0; k < g.taps(); ++k)
    for (int l = 0; l < L; ++l) wk[k * L + l] = w[k * g.c + c0 + l];
  const int64_t ws = g.sw * L;
  for (int64_t id = id0; id < id1; ++id) {
    std::fill(acc.get(), acc.get() + g.h * wb * L, 0.0f);
    for (int64_t a = 0; a < g.kd; ++a) {
      const int64_t nd = id + g.pd - a * g.rd;
      if (nd < 0 || nd % g.sd != 0 || nd / g.sd >= g.od) continue;
      const int64_t od = nd / g.sd, slot = od % span;
      float* cp = cts.get() + slot * plane * L;
      if (keys[slot] != od) {
        CbTransposeIn(ct + ((n * g.c + c0) * g.od + od) * plane, g.od * plane, plane, cp);
        keys[slot] = od;
      }
      for (int64_t oh = 0; oh < g.oh; ++oh)
        for (int64_t b = 0; b < g.kh; ++b) {
          const int64_t ih = oh * g.sh + b * g.rh - g.ph;
          if (ih < 0 || ih >= g.h) continue;
          const float* __restrict__ c = cp + oh * g.ow * L;
          for (int64_t e = 0; e < g.kw; ++e) {
            const CfV wv = Pack<L>::Load(&wk[((a * g.kh + b) * g.kw + e) * L]);
            float* __restrict__ r = acc.get() + (ih * wb + lm + e * g.rw) * L;
            for (int64_t o = 0; o < g.ow; ++o)
              Pack<L>::Store(r + o * ws, Pack<L>::Load(r + o * ws) + wv * Pack<L>::Load(c + o * L));
          }
        }
    }
    TO* out = dx + ((n * g.c + c0) * g.d + id) * g.h * g.w;
    if (g.w < L) {  // rows narrower than a packet: the plane as one run (as CbInput::Fill)
      for (int64_t ih = 0; ih < g.h; ++ih) {
        const float* r = acc.get() + (ih * wb + lm + g.pw) * L;
        std::copy(r, r + g.w * L, &flat[ih * g.w * L]);
      }
      CbTransposeOut(flat.data(), g.h * g.w, own, out, g.d * g.h * g.w);
      continue;
    }
    for (int64_t ih = 0; ih < g.h; ++ih)
      CbTransposeOut(acc.get() + (ih * wb + lm + g.pw) * L, g.w, own, out + ih * g.w,
                     g.d * g.h * g.w);
  }
}

}  // namespace

template <typename TI, typename TO>
void ChannelsFirst::Forward(ffi::ThreadPool* pool, const Geom& g, const TI* x, const float* w,
                            const Epilogue& e, TO* y, bool generic) {
  if (CbApplies(g, generic)) {
    const CbTiles tiles(g, g.od);
    ParallelFor(pool, tiles.Count(), Work(g) >= kMinParallelWork,
                [&](int64_t i) { CbForwardTile(g, x, w, y, tiles, i, e); });
    return;
  }
  const Tiles tiles =
      MakeTiles(g.n * g.c * g.od, g.oh, g.w * sizeof(TI), g.kd, g.kh, kCfMinBand);
  ParallelFor(pool, tiles.Count(), Work(g) >= kMinParallelWork,
              [&](int64_t i) { CfForwardTile(g, x, w, y, tiles, i, e); });
}

// Without e.db, the plain kernel gradient.
template <typename TI, typename TC>
void ChannelsFirst::KernelGrad(ffi::ThreadPool* pool, const Geom& g, const TI* x, const TC* ct,
                               const EpilogueGrad<TC>& e, float* dk, bool generic) {
  const int64_t size = g.taps() * g.m * g.c, cm = g.c * g.m;
  if (CbApplies(g, generic) && e.db == nullptr) {
    const CbTiles tiles(g, g.od);
    std::vector<float> parts(tiles.Count() * size, 0.0f);
    ParallelFor(pool, tiles.Count(), Work(g) >= kMinParallelWork, [&](int64_t i) {
      CbKernelGradTile(g, x, ct, parts.data() + i * size, tiles, i);
    });
    SumChunks(parts, tiles.Count(), size, dk);
    return;
  }
  const Tiles tiles =
      MakeTiles(g.n * g.c * g.od, g.oh, g.w * sizeof(TI), g.kd, g.kh, kCfMinBand);
  const int64_t chunks = tiles.Count();
  const bool epilogue = e.db != nullptr;
  std::vector<float> parts(chunks * size, 0.0f), db_parts(epilogue ? chunks * cm : 0, 0.0f);
  ParallelFor(pool, chunks, Work(g) >= kMinParallelWork, [&](int64_t i) {
    CfKernelGradTile(g, x, ct, parts.data() + i * size, tiles, i, e,
                     epilogue ? db_parts.data() + i * cm : nullptr);
  });
  SumChunks(parts, chunks, size, dk);
  if (epilogue) SumChunks(db_parts, chunks, cm, e.db);
}

template <typename TC, typename TO>
void ChannelsFirst::InputGrad(ffi::ThreadPool* pool, const Geom& g, const TC* ct, const float* w,
                              TO* dx) {
  if (CbApplies(g, false)) {
    const CbTiles tiles(g, g.d);
    ParallelFor(pool, tiles.Count(), Work(g) >= kMinParallelWork,
                [&](int64_t i) { CbInputGradTile(g, ct, w, dx, tiles, i); });
    return;
  }
  const Tiles tiles = MakeTiles(g.n * g.c * g.d, g.h, g.ow * sizeof(TC) * g.m,
                                CeilDiv(g.kd, g.sd), CeilDiv(g.kh, g.sh), kCfMinBand);
  ParallelFor(pool, tiles.Count(), Work(g) >= kMinParallelWork,
              [&](int64_t i) { CfInputGradTile(g, ct, w, dx, tiles, i); });
}

#define DW5D_INSTANTIATE(T1, T2)                                                               \
  template void ChannelsFirst::Forward(ffi::ThreadPool*, const Geom&, const T1*, const float*, \
                                       const Epilogue&, T2*, bool);                            \
  template void ChannelsFirst::KernelGrad(ffi::ThreadPool*, const Geom&, const T1*, const T2*, \
                                          const EpilogueGrad<T2>&, float*, bool);              \
  template void ChannelsFirst::InputGrad(ffi::ThreadPool*, const Geom&, const T1*,             \
                                         const float*, T2*);
DW5D_FOR_DTYPE_PAIRS(DW5D_INSTANTIATE)
#undef DW5D_INSTANTIATE

}  // namespace dw5d
