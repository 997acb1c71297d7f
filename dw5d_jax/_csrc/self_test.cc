// Self-test, run once after loading (`Dw5dSelfTest`, called by
// dw5d_jax/_native_build.py): every code path (packet widths, edges,
// multiplier, bfloat16, both layouts) against plain loops in double, on
// small problems.

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "geometry.h"
#include "kernels.h"
#include "packets.h"

namespace dw5d {
namespace {

uint64_t Lcg(uint64_t* s) {
  *s = *s * 6364136223846793005ull + 1442695040888963407ull;
  return *s >> 33;
}

template <typename T>
T FromFloat(float f) {
  if constexpr (std::is_same<T, float>::value) {
    return f;
  } else {
    return ToBf16(f);
  }
}

template <typename T>
double ToDouble(T v) {
  return static_cast<double>(Pack<1>::Load(&v));
}

// |got - want| within tol relative to 1 + |want|; inf and NaN where the reference has them.
bool Close(double got, double want, double tol) {
  if (std::isnan(want)) return std::isnan(got);
  if (std::isinf(want)) return got == want;
  return std::fabs(got - want) <= tol * (1.0 + std::fabs(want));
}

// Variants of a case's data.
enum Data : int {
  kPlain = 0,
  kBf16Weights = 1,  // weights that are bfloat16 values (bfloat16 x: the pair kernels)
  kNonFinite = 2,    // a few inf and NaN in x (rows the pair kernels leave to float32)
};

template <typename TI, typename TO>
bool SelfTestOne(const Geom& g, uint64_t seed, bool generic, int data = kPlain) {
  const int64_t nx = g.n * g.d * g.h * g.w * g.c, nw = g.taps() * g.m * g.c;
  const int64_t ny = g.rows() * g.ow * g.c * g.m;
  std::vector<TI> x(nx), ct(ny);
  std::vector<float> w(nw), dk(nw);
  std::vector<TO> y(ny);
  for (auto& v : x) v = FromFloat<TI>(static_cast<float>(Lcg(&seed) % 2001) / 1000.0f - 1.0f);
  for (auto& v : ct) v = FromFloat<TI>(static_cast<float>(Lcg(&seed) % 2001) / 1000.0f - 1.0f);
  for (auto& v : w) v = static_cast<float>(Lcg(&seed) % 2001) / 1000.0f - 1.0f;
  if (data & kBf16Weights)
    for (auto& v : w) v = ToDouble(ToBf16(v));
  if (data & kNonFinite) {
    const float inf = std::numeric_limits<float>::infinity();
    const float values[3] = {inf, -inf, std::numeric_limits<float>::quiet_NaN()};
    for (int i = 0; i < 3; ++i) x[Lcg(&seed) % nx] = FromFloat<TI>(values[i]);
  }
  std::vector<TO> dx(nx);
  RunForward<TI, TO>(nullptr, g, x.data(), w.data(), y.data(), generic);
  RunKernelGrad<TI, TI>(nullptr, g, x.data(), ct.data(), dk.data(), generic);
  RunInputGrad<TI, TO>(nullptr, g, ct.data(), w.data(), dx.data(), generic);
  std::vector<double> want_y(ny, 0.0), want_dk(nw, 0.0), want_dx(nx, 0.0);
  for (int64_t n = 0; n < g.n; ++n)
    for (int64_t od = 0; od < g.od; ++od)
      for (int64_t oh = 0; oh < g.oh; ++oh)
        for (int64_t ow = 0; ow < g.ow; ++ow)
          for (int64_t a = 0; a < g.kd; ++a)
            for (int64_t b = 0; b < g.kh; ++b)
              for (int64_t e = 0; e < g.kw; ++e) {
                const int64_t id = od * g.sd + a * g.rd - g.pd, ih = oh * g.sh + b * g.rh - g.ph,
                              iw = ow * g.sw + e * g.rw - g.pw;
                if (id < 0 || id >= g.d || ih < 0 || ih >= g.h || iw < 0 || iw >= g.w) continue;
                for (int64_t c = 0; c < g.c; ++c)
                  for (int64_t m = 0; m < g.m; ++m) {
                    const int64_t yi =
                        g.cf ? ((((n * g.c + c) * g.m + m) * g.od + od) * g.oh + oh) * g.ow + ow
                             : (((n * g.od + od) * g.oh + oh) * g.ow + ow) * g.c * g.m +
                                   c * g.m + m;
                    const int64_t wi = (((a * g.kh + b) * g.kw + e) * g.m + m) * g.c + c;
                    const int64_t xi = g.cf ? (((n * g.c + c) * g.d + id) * g.h + ih) * g.w + iw
                                            : (((n * g.d + id) * g.h + ih) * g.w + iw) * g.c + c;
                    const double xv = ToDouble(x[xi]);
                    want_y[yi] += xv * w[wi];
                    want_dk[wi] += xv * ToDouble(ct[yi]);
                    want_dx[xi] += ToDouble(ct[yi]) * w[wi];
                  }
              }
  const double tol = std::is_same<TI, float>::value && std::is_same<TO, float>::value ? 1e-4 : 2e-2;
  for (int64_t i = 0; i < ny; ++i)
    if (!Close(ToDouble(y[i]), want_y[i], tol)) return false;
  for (int64_t i = 0; i < nx; ++i)
    if (!Close(ToDouble(dx[i]), want_dx[i], tol)) return false;
  const double tol_dk = std::is_same<TI, float>::value ? 1e-4 : 1e-3;
  for (int64_t i = 0; i < nw; ++i)
    if (!Close(dk[i], want_dk[i], tol_dk)) return false;
  return true;
}

}  // namespace
}  // namespace dw5d

// 0 when every kernel matches plain loops on small problems, else the number
// of the first failing case.
extern "C" int Dw5dSelfTest() {
  using dw5d::Geom;
  const int64_t L = dw5d::kLanes;
  // Every specialised W shape and the generic one; every packet width;
  // multipliers; edges; an input smaller than the kernel; a negative low
  // padding (a crop, as input gradients can have).
  const Geom cases[] = {
      // n, d, h, w, c, m, od, oh, ow, kd, kh, kw, sd, sh, sw, rd, rh, rw, pd, ph, pw, cf
      {2, 3, 4, 21, 3 * L + 3, 1, 3, 4, 21, 3, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0},
      {1, 5, 6, 25, L + 1, 2, 3, 3, 12, 2, 3, 3, 2, 2, 2, 1, 1, 1, 0, 1, 1, 0},
      {1, 1, 3, 30, 3, 3, 1, 3, 26, 1, 5, 3, 1, 1, 1, 1, 2, 2, 0, 4, 1, 0},
      {1, 2, 3, 40, 2 * L, 1, 2, 3, 40, 1, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 2, 0},
      {1, 1, 2, 41, L, 2, 1, 2, 19, 1, 2, 5, 1, 1, 2, 1, 1, 1, 0, 0, 1, 0},
      {1, 1, 2, 40, 5, 1, 1, 2, 36, 1, 1, 5, 1, 1, 1, 1, 1, 2, 0, 0, 2, 0},
      {1, 1, 2, 50, L + 14, 1, 1, 2, 50, 1, 1, 7, 1, 1, 1, 1, 1, 1, 0, 0, 3, 0},
      {1, 1, 2, 51, 3, 1, 1, 2, 25, 1, 1, 7, 1, 1, 2, 1, 1, 1, 0, 0, 3, 0},
      {1, 1, 3, 4, 3, 3, 1, 3, 4, 1, 5, 4, 1, 1, 1, 1, 2, 2, 0, 4, 3, 0},
      {1, 3, 2, 9, 12, 1, 2, 2, 5, 2, 1, 2, 2, 1, 2, 1, 1, 3, -1, 0, 1, 0},
      // Taller ones for the channels-first blocks of rows (fixed H shapes).
      {1, 2, 19, 37, 2, 1, 2, 19, 37, 1, 3, 3, 1, 1, 1, 1, 1, 1, 0, 1, 1, 0},
      {1, 1, 23, 70, 2, 2, 1, 12, 35, 1, 5, 5, 1, 2, 2, 1, 1, 1, 0, 2, 2, 0},
      {1, 1, 20, 66, 1, 1, 1, 20, 66, 1, 3, 3, 1, 1, 1, 1, 2, 2, 0, 2, 2, 0},
      {2, 3, 17, 20, 2, 1, 3, 17, 20, 3, 7, 7, 1, 1, 1, 1, 1, 1, 1, 3, 3, 0},
      {1, 2, 18, 16, 3, 1, 2, 9, 16, 2, 3, 3, 1, 2, 1, 1, 1, 1, 0, 1, 1, 0},
      {1, 1, 15, 33, 2, 3, 1, 15, 33, 1, 5, 5, 1, 1, 1, 1, 1, 1, 0, 2, 2, 0},
  };
  // Each case channels-last (specialised and generic kernels) and channels-first.
  int k = 0;
  for (const Geom& last : cases) {
    ++k;
    for (int variant = 0; variant < 3; ++variant) {
      Geom g = last;
      g.cf = variant == 2;
      const bool generic = variant == 1;
      const int code = k + 1000 * variant;
      if (!dw5d::SelfTestOne<float, float>(g, 1000 + k, generic)) return code;
      if (!dw5d::SelfTestOne<dw5d::bf16, dw5d::bf16>(g, 2000 + k, generic)) return 100 + code;
      if (!dw5d::SelfTestOne<dw5d::bf16, float>(g, 3000 + k, generic)) return 200 + code;
      // bfloat16 weights (the pair kernels where the build has them), with
      // and without non-finite inputs; float32 with non-finite inputs.
      if (!dw5d::SelfTestOne<dw5d::bf16, dw5d::bf16>(g, 4000 + k, generic, dw5d::kBf16Weights))
        return 300 + code;
      if (!dw5d::SelfTestOne<dw5d::bf16, float>(g, 5000 + k, generic,
                                                dw5d::kBf16Weights | dw5d::kNonFinite))
        return 400 + code;
      if (!dw5d::SelfTestOne<float, float>(g, 6000 + k, generic, dw5d::kNonFinite))
        return 500 + code;
    }
  }
  return 0;
}
