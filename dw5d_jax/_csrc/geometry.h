// The problem (`Geom`) and the index arithmetic and tiling that the kernels
// of both layouts share.
//
// Arrays (row-major), channels-last (cf = 0) or channels-first (cf = 1):
//   x, dx  (N, D, H, W, C)         or (N, C, D, H, W)          float32 or bfloat16
//   y, ct  (N, OD, OH, OW, C * M)  or (N, C * M, OD, OH, OW)   channel c * M + m
//   w, dk  (KD, KH, KW, M, C)      float32 (handlers.cc re-lays the library's
//                                  (KD, KH, KW, C, M) kernel)
// Output position o reads input position o * s + t * r - p for tap t along
// each spatial axis (stride s, dilation r, low padding p). Positions outside
// [0, size) are the zero padding, which is never materialised as a padded copy.

#ifndef DW5D_JAX_CSRC_GEOMETRY_H_
#define DW5D_JAX_CSRC_GEOMETRY_H_

#include <algorithm>
#include <cstdint>

namespace dw5d {

// The problem, decoded from the handlers' attributes (handlers.cc: ParseGeom).
struct Geom {
  int64_t n, d, h, w, c, m, od, oh, ow, kd, kh, kw, sd, sh, sw, rd, rh, rw, pd, ph, pw;
  int64_t cf;  // 1: channels-first arrays (channels_first.cc)
  // A ring along D (stream_step.h; channels-last only): input plane id of a
  // sample lies at plane (id + d0) mod d. 0 (planes in order) for every other problem.
  int64_t d0 = 0;
  int64_t rows() const { return n * od * oh; }
  int64_t taps() const { return kd * kh * kw; }
};

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

}  // namespace dw5d

#endif  // DW5D_JAX_CSRC_GEOMETRY_H_
