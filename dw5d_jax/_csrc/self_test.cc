// Self-test, run once after loading (`Dw5dSelfTest`, called by
// dw5d_jax/_native_build.py): every code path (packet widths, edges,
// multiplier, bfloat16, both layouts, every epilogue) against plain loops in
// double, on small problems.

#include <cmath>
#include <cstdint>
#include <iterator>
#include <limits>
#include <type_traits>
#include <vector>

#include "epilogue.h"
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
  RunForward<TI, TO>(nullptr, g, x.data(), w.data(), y.data(), {}, generic);
  RunKernelGrad<TI, TI>(nullptr, g, x.data(), ct.data(), dk.data(), {}, generic);
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

// Activations and their derivatives in double, from their definitions.
double ActD(Act a, double z) {
  const double s = 1.0 / (1.0 + std::exp(-z));
  switch (a) {
    case Act::kNone: return z;
    case Act::kRelu: return z > 0 ? z : 0.0;
    case Act::kRelu6: return std::min(6.0, std::max(0.0, z));
    case Act::kGelu: return 0.5 * z * (1.0 + std::erf(z / std::sqrt(2.0)));
    case Act::kGeluTanh:
      return 0.5 * z * (1.0 + std::tanh(std::sqrt(2.0 / M_PI) * (z + 0.044715 * z * z * z)));
    case Act::kSilu: return z * s;
    case Act::kSigmoid: return s;
    case Act::kTanh: return std::tanh(z);
    case Act::kHardSwish: return z * std::min(6.0, std::max(0.0, z + 3.0)) / 6.0;
  }
  return 0.0;
}

double SlopeD(Act a, double z) {
  const double h = 1e-6 * (1.0 + std::fabs(z));  // a central difference away from the kinks
  return (ActD(a, z + h) - ActD(a, z - h)) / (2.0 * h);
}

// The epilogue (forward, and backward through z or y) against double loops.
template <typename TI, typename TO>
bool SelfTestEpilogue(const Geom& g, uint64_t seed, bool generic, Act act) {
  const int64_t nx = g.n * g.d * g.h * g.w * g.c, nw = g.taps() * g.m * g.c, cm = g.c * g.m;
  const int64_t ny = g.rows() * g.ow * cm;
  auto draw = [&](float scale) { return scale * (static_cast<float>(Lcg(&seed) % 2001) / 1000.0f - 1.0f); };
  std::vector<TI> x(nx);
  std::vector<TO> ct(ny), y(ny);
  std::vector<float> w(nw), b(cm), gout(ny), dk(nw), db(cm);
  for (auto& v : x) v = FromFloat<TI>(draw(1.0f));
  for (auto& v : ct) v = FromFloat<TO>(draw(1.0f));
  for (auto& v : w) v = draw(1.0f);
  for (auto& v : b) v = draw(3.0f);
  RunForward<TI, TO>(nullptr, g, x.data(), w.data(), y.data(), Epilogue{act, b.data()}, generic);
  // z in double; chan[i]: output i's channel c * M + m.
  std::vector<double> z(ny, 0.0);
  std::vector<int64_t> chan(ny);
  for (int64_t r = 0; r < g.rows(); ++r) {
    const int64_t n = r / (g.od * g.oh), od = (r / g.oh) % g.od, oh = r % g.oh;
    for (int64_t ow = 0; ow < g.ow; ++ow)
      for (int64_t c = 0; c < g.c; ++c)
        for (int64_t m = 0; m < g.m; ++m) {
          const int64_t yi =
              g.cf ? ((((n * g.c + c) * g.m + m) * g.od + od) * g.oh + oh) * g.ow + ow
                   : (r * g.ow + ow) * cm + c * g.m + m;
          chan[yi] = c * g.m + m;
          z[yi] = b[c * g.m + m];
          for (int64_t t = 0; t < g.taps(); ++t) {
            const int64_t a = t / (g.kh * g.kw), bb = t / g.kw % g.kh, e = t % g.kw;
            const int64_t id = od * g.sd + a * g.rd - g.pd, ih = oh * g.sh + bb * g.rh - g.ph,
                          iw = ow * g.sw + e * g.rw - g.pw;
            if (id < 0 || id >= g.d || ih < 0 || ih >= g.h || iw < 0 || iw >= g.w) continue;
            const int64_t xi = g.cf ? (((n * g.c + c) * g.d + id) * g.h + ih) * g.w + iw
                                    : (((n * g.d + id) * g.h + ih) * g.w + iw) * g.c + c;
            z[yi] += ToDouble(x[xi]) * w[(t * g.m + m) * g.c + c];
          }
        }
  }
  const bool exact = std::is_same<TI, float>::value && std::is_same<TO, float>::value;
  const double tol = exact ? 1e-4 : 2e-2;
  for (int64_t i = 0; i < ny; ++i) {
    const double want = ActD(act, z[i]);
    if (!(std::fabs(ToDouble(y[i]) - want) <= tol * (1.0 + std::fabs(want)))) return false;
  }
  // Backward: through z (every activation), through y (FromOutput ones).
  for (int through_y = 0; through_y < 2; ++through_y) {
    // act'(z) from a bfloat16 y is off near the kinks y rounds onto (relu6 at 6);
    // dw5d_jax/_epilogue.py reads y only when y is float32 (or for relu).
    if (through_y && (!FromOutput(act) || (!exact && act != Act::kRelu))) continue;
    EpilogueGrad<TO> e;
    e.epilogue = Epilogue{act, b.data()};
    e.g = act == Act::kNone ? nullptr : gout.data();
    e.db = db.data();
    if (through_y) {
      e.y = y.data();
    } else {
      e.w = w.data();
    }
    RunKernelGrad<TI, TO>(nullptr, g, x.data(), ct.data(), dk.data(), e, generic);
    std::vector<double> want_g(ny), want_dk(nw, 0.0), want_db(cm, 0.0);
    for (int64_t i = 0; i < ny; ++i) {
      // Away from a kink the slope is smooth; at one (relu's 0), skip the element.
      want_g[i] = ToDouble(ct[i]) * SlopeD(act, z[i]);
      want_db[chan[i]] += want_g[i];
    }
    for (int64_t i = 0; i < ny; ++i) {
      const double got = act == Act::kNone ? ToDouble(ct[i]) : gout[i];
      if (!(std::fabs(got - want_g[i]) <= tol * (1.0 + std::fabs(want_g[i])))) return false;
    }
    for (int64_t j = 0; j < cm; ++j)
      if (!(std::fabs(db[j] - want_db[j]) <= tol * (1.0 + std::fabs(want_db[j])) * 4))
        return false;
    // dk from the kernel gradient of (x, g): the plain kernel gradient of g checks it.
    std::vector<float> dk_plain(nw);
    if (act == Act::kNone) {
      RunKernelGrad<TI, TO>(nullptr, g, x.data(), ct.data(), dk_plain.data(), {}, generic);
    } else {
      RunKernelGrad<TI, float>(nullptr, g, x.data(), gout.data(), dk_plain.data(), {}, generic);
    }
    for (int64_t j = 0; j < nw; ++j)
      if (!(std::fabs(dk[j] - dk_plain[j]) <= 1e-5 * (1.0 + std::fabs(dk_plain[j]))))
        return false;
  }
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
      // M = 2, 5 W taps, 2 packets (more weights than registers: tap by tap).
      {1, 1, 2, 41, 2 * L + 3, 2, 1, 2, 19, 1, 2, 5, 1, 1, 2, 1, 1, 1, 0, 0, 1, 0},
      {1, 1, 2, 23, 2 * L + 3, 2, 1, 2, 23, 1, 2, 5, 1, 1, 1, 1, 1, 1, 0, 0, 2, 0},
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
      // Strides larger than the kernel (rows and phases no tap reads).
      {1, 2, 17, 19, L + 2, 1, 2, 3, 4, 2, 3, 3, 1, 6, 5, 1, 1, 1, 1, 1, 1, 0},
      // W strides 4 and 8 (MViT's pooling; M = 2: both multipliers at once),
      // the last output's taps past the row's end.
      {1, 2, 9, 30, L + 3, 1, 2, 3, 8, 2, 3, 3, 1, 4, 4, 1, 1, 1, 1, 1, 1, 0},
      {1, 1, 17, 49, 2 * L, 2, 1, 3, 7, 1, 3, 3, 1, 8, 8, 1, 1, 1, 0, 1, 1, 0},
      // Small frames, rows of 5, 7, 10 and 13 outputs (one or two blocks of
      // near-equal sizes), stride 1 and 2.
      {1, 3, 5, 5, 3 * L + 5, 1, 3, 5, 5, 3, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0},
      {1, 2, 14, 14, L + 3, 1, 1, 7, 7, 3, 3, 3, 2, 2, 2, 1, 1, 1, 1, 1, 1, 0},
      {1, 1, 3, 10, 5, 1, 1, 3, 10, 1, 3, 3, 1, 1, 1, 1, 1, 1, 0, 1, 1, 0},
      {1, 1, 2, 13, L, 2, 1, 2, 13, 1, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 2, 0},
  };
  // Each case channels-last (specialised and generic kernels) and channels-first
  // (channel blocks where they apply, and per plane).
  int k = 0;
  for (const Geom& last : cases) {
    ++k;
    for (int variant = 0; variant < 4; ++variant) {
      Geom g = last;
      g.cf = variant >= 2;
      const bool generic = variant == 1 || variant == 3;
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
  // Every epilogue (forward, backward through z and through y) on three of the
  // cases (a multiplier, strides, every packet width), channels-last
  // (specialised and generic kernels) and channels-first (channel blocks
  // where they apply, and per plane).
  const int epilogue_cases[] = {1, 2, 12};
  for (int i : epilogue_cases) {
    for (const dw5d::ActName& a : dw5d::kActNames) {
      for (int variant = 0; variant < 4; ++variant) {
        Geom g = cases[i - 1];
        g.cf = variant >= 2;
        const bool generic = variant == 1 || variant == 3;
        const int code = 5000 + 100 * i + static_cast<int>(a.act) + 1000 * variant;
        if (!dw5d::SelfTestEpilogue<float, float>(g, 4000 + i, generic, a.act)) return code;
        if (!dw5d::SelfTestEpilogue<dw5d::bf16, dw5d::bf16>(g, 5000 + i, generic, a.act))
          return 10000 + code;
      }
    }
  }
  return 0;
}
