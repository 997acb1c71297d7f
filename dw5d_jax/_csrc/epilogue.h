// The epilogue after the convolution, y = act(conv(x, w) + bias), and its
// derivative, on float32 rows the kernels have just computed (in L1).
//
// The activations and their names are dw5d_jax/_epilogue.py's. The
// transcendental functions are float32 approximations: exp by range
// reduction and a degree-5 polynomial (Cephes), tanh as XLA's and Eigen's
// odd/even rational function on a clamped range, erf with AVX-512 as a
// table of 32 degree-4 polynomials (build_support/erf_table.py; under 1e-7
// from float64 erf over every float32, tests/test_epilogue.py), elsewhere
// as XLA's rational function. Every function propagates NaN, as JAX's do.

#ifndef DW5D_JAX_CSRC_EPILOGUE_H_
#define DW5D_JAX_CSRC_EPILOGUE_H_

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string_view>
#include <type_traits>

#include "packets.h"

namespace dw5d {

enum class Act { kNone, kRelu, kRelu6, kGelu, kGeluTanh, kSilu, kSigmoid, kTanh, kHardSwish };

struct ActName {
  Act act;
  const char* name;
};
inline constexpr ActName kActNames[] = {
    {Act::kNone, "none"},          {Act::kRelu, "relu"},       {Act::kRelu6, "relu6"},
    {Act::kGelu, "gelu"},          {Act::kGeluTanh, "gelu_tanh"}, {Act::kSilu, "silu"},
    {Act::kSigmoid, "sigmoid"},    {Act::kTanh, "tanh"},       {Act::kHardSwish, "hard_swish"},
};

inline bool ParseAct(std::string_view name, Act* act) {
  for (const ActName& a : kActNames)
    if (name == a.name) return *act = a.act, true;
  return false;
}

// Whether act'(z) is a function of y = act(z) (the backward pass then reads y).
inline bool FromOutput(Act a) {
  return a == Act::kNone || a == Act::kRelu || a == Act::kRelu6 || a == Act::kSigmoid ||
         a == Act::kTanh;
}

namespace epi {

using V = Pack<kLanes>::V;
using I = int32_t __attribute__((vector_size(4 * kLanes)));

inline V Splat(float f) { return Pack<kLanes>::Zero() + f; }
// Clamps that keep NaN (a comparison with NaN is false).
inline V AtLeast(V x, float lo) { return x < lo ? Splat(lo) : x; }
inline V AtMost(V x, float hi) { return x > hi ? Splat(hi) : x; }

// c[0] * x^(N-1) + ... + c[N-1] (Horner).
template <size_t N>
__attribute__((always_inline)) inline V Horner(V x, const float (&c)[N]) {
  V p = Splat(c[0]);
  for (size_t i = 1; i < N; ++i) p = p * x + c[i];
  return p;
}

__attribute__((always_inline)) inline V Exp(V x) {
  x = AtMost(AtLeast(x, -87.33654f), 88.37626f);  // 2^n stays a normal float
  // n = round(x / ln 2) by the 1.5 * 2^23 trick: its low bits are n.
  const V big = Splat(12582912.0f);
  const V t = x * 1.44269504088896341f + big;
  const V n = t - big;
  I bits, nb;
  std::memcpy(&bits, &t, sizeof bits);
  std::memcpy(&nb, &big, sizeof nb);
  const V r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // x - n ln 2, two parts
  constexpr float kP[] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                          4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
  const V p = Horner(r, kP) * (r * r) + r + 1.0f;
  const I e = (bits - nb + 127) << 23;
  V scale;
  std::memcpy(&scale, &e, sizeof scale);
  return p * scale;
}

// |x| and copysign(e, x), on the bits.
inline V Abs(V x) {
  I b;
  std::memcpy(&b, &x, sizeof b);
  b &= 0x7fffffff;
  std::memcpy(&x, &b, sizeof x);
  return x;
}
inline V CopySign(V e, V x) {
  I be, bx;
  std::memcpy(&be, &e, sizeof be);
  std::memcpy(&bx, &x, sizeof bx);
  be |= bx & static_cast<int32_t>(0x80000000u);
  std::memcpy(&e, &be, sizeof e);
  return e;
}

#if defined(__AVX512F__) && defined(__AVX512DQ__)
// erf(t) on [0, 4.5) in 32 intervals: row k holds the coefficients of
// u^(4 - k) per interval, u = t * 32 / 4.5 - i (build_support/erf_table.py).
alignas(64) inline constexpr float kErfTable[5][32] = {
    {1.231586248e-05f, 4.309095311e-05f, 6.275855412e-05f, 7.132060273e-05f, 6.845636381e-05f, 5.633614273e-05f, 3.872711386e-05f, 1.980021261e-05f, 3.056868763e-06f, -9.326027794e-06f, -1.663853800e-05f, -1.936275294e-05f, -1.868171603e-05f, -1.597907067e-05f, -1.247018645e-05f, -9.015480828e-06f, -6.093384400e-06f, -3.873144124e-06f, -2.324843990e-06f, -1.321746481e-06f, -7.133526196e-07f, -3.661164385e-07f, -1.789342008e-07f, -8.337043056e-08f, -3.706586327e-08f, -1.573665465e-08f, -6.384218487e-09f, -2.476268302e-09f, -9.187343664e-10f, -3.261798331e-10f, -1.108653169e-10f, -3.607883090e-11f},
    {-1.053645974e-03f, -9.960784810e-04f, -8.204860496e-04f, -5.656740977e-04f, -2.769471321e-04f, -6.965083799e-07f, 2.257283049e-04f, 3.804328153e-04f, 4.584954877e-04f, 4.691277281e-04f, 4.302171583e-04f, 3.623551456e-04f, 2.840348170e-04f, 2.088720066e-04f, 1.448584517e-04f, 9.509303345e-05f, 5.924424477e-05f, 3.509952512e-05f, 1.980533307e-05f, 1.065656033e-05f, 5.473077181e-06f, 2.685185109e-06f, 1.259315468e-06f, 5.648794286e-07f, 2.424625904e-07f, 9.962741387e-08f, 3.920229830e-08f, 1.477664657e-08f, 5.336908249e-09f, 1.847372144e-09f, 6.130224661e-10f, 1.950311024e-10f},
    {1.532059741e-06f, -3.072557505e-03f, -5.796145182e-03f, -7.878381759e-03f, -9.148344398e-03f, -9.572180919e-03f, -9.241695516e-03f, -8.338011801e-03f, -7.083112840e-03f, -5.693144165e-03f, -4.344008863e-03f, -3.154056380e-03f, -2.182973782e-03f, -1.442132168e-03f, -9.103061748e-04f, -5.494791549e-04f, -3.173822479e-04f, -1.755156991e-04f, -9.297051292e-05f, -4.718813580e-05f, -2.295705781e-05f, -1.070810686e-05f, -4.789863397e-06f, -2.055109235e-06f, -8.459103356e-07f, -3.340860530e-07f, -1.266181613e-07f, -4.605635695e-08f, -1.607999423e-08f, -5.389224178e-09f, -1.734009936e-09f, -5.356580179e-10f},
    {1.586782783e-01f, 1.555707306e-01f, 1.466099173e-01f, 1.328074038e-01f, 1.156390831e-01f, 9.678551555e-02f, 7.786446065e-02f, 6.021315604e-02f, 4.475757107e-02f, 3.197897226e-02f, 2.196267620e-02f, 1.449868735e-02f, 9.200142696e-03f, 5.611548666e-03f, 3.289978718e-03f, 1.854067203e-03f, 1.004337450e-03f, 5.229444359e-04f, 2.617296414e-04f, 1.259132987e-04f, 5.822526509e-05f, 2.588048119e-05f, 1.105742467e-05f, 4.541050203e-06f, 1.792582339e-06f, 6.801774362e-07f, 2.480764181e-07f, 8.696984821e-08f, 2.930702614e-08f, 9.492801212e-09f, 2.955540923e-09f, 8.845005839e-10f},
    {0.000000000e+00f, 1.576385349e-01f, 3.091837466e-01f, 4.492397904e-01f, 5.736744404e-01f, 6.799566746e-01f, 7.672256827e-01f, 8.361128569e-01f, 8.883882165e-01f, 9.265242219e-01f, 9.532698393e-01f, 9.713020921e-01f, 9.829897285e-01f, 9.902722239e-01f, 9.946345687e-01f, 9.971466064e-01f, 9.985373020e-01f, 9.992774129e-01f, 9.996560216e-01f, 9.998422861e-01f, 9.999303222e-01f, 9.999703765e-01f, 9.999878407e-01f, 9.999952316e-01f, 9.999982119e-01f, 9.999993443e-01f, 9.999997616e-01f, 9.999999404e-01f, 1.000000000e+00f, 1.000000000e+00f, 1.000000000e+00f, 1.000000000e+00f},
};

// erf(a) for a >= 0 (or NaN): one interval lookup (a two-register
// permute per coefficient) and a degree-4 polynomial, about 12 vector
// operations and no division. min() keeps NaN (its second operand), which
// then indexes interval 0 and stays NaN through the polynomial.
__attribute__((always_inline)) inline V ErfOfAbs(V a) {
  const __m512 s = _mm512_min_ps(_mm512_set1_ps(31.999998f),
                                 reinterpret_cast<__m512>(a * (32.0f / 4.5f)));
  const __m512i i = _mm512_cvttps_epi32(s);
  const V u = reinterpret_cast<V>(_mm512_reduce_ps(s, _MM_FROUND_TO_ZERO));  // s - trunc(s)
  auto coef = [&](int k) {
    return reinterpret_cast<V>(_mm512_permutex2var_ps(_mm512_load_ps(kErfTable[k]), i,
                                                      _mm512_load_ps(kErfTable[k] + 16)));
  };
  V p = coef(0);
  for (int k = 1; k < 5; ++k) p = p * u + coef(k);
  return p;
}
#else
// erf(a) for a >= 0 (or NaN): XLA's rational function (odd in a), clamped at 4.
__attribute__((always_inline)) inline V ErfOfAbs(V a) {
  a = AtMost(a, 4.0f);
  const V a2 = a * a;
  constexpr float kP[] = {-2.72614225801306e-10f, 2.77068142495902e-08f, -2.10102402082508e-06f,
                          -5.69250639462346e-05f, -7.34990630326855e-04f, -2.95459980854025e-03f,
                          -1.60960333262415e-02f};
  constexpr float kQ[] = {-1.45660718464996e-05f, -2.13374055278905e-04f, -1.68282697438203e-03f,
                          -7.37332916720468e-03f, -1.42647390514189e-02f};
  return a * Horner(a2, kP) / Horner(a2, kQ);
}
#endif

inline V Erf(V x) { return CopySign(ErfOfAbs(Abs(x)), x); }

__attribute__((always_inline)) inline V Tanh(V x) {
  x = AtMost(AtLeast(x, -9.0f), 9.0f);
  const V x2 = x * x;
  constexpr float kP[] = {-2.76076847742355e-16f, 2.00018790482477e-13f, -8.60467152213735e-11f,
                          5.12229709037114e-08f,  1.48572235717979e-05f, 6.37261928875436e-04f,
                          4.89352455891786e-03f};
  constexpr float kQ[] = {1.19825839466702e-06f, 1.18534705686654e-04f, 2.26843463243900e-03f,
                          4.89352518554385e-03f};
  return x * Horner(x2, kP) / Horner(x2, kQ);
}

inline V Sigmoid(V z) { return 1.0f / (1.0f + Exp(-z)); }

constexpr float kSqrtHalf = 0.70710678118654752f;    // 1 / sqrt(2)
constexpr float kInvSqrt2Pi = 0.39894228040143268f;  // 1 / sqrt(2 pi)
constexpr float kSqrt2OverPi = 0.79788456080286536f;
constexpr float kGeluCubic = 0.044715f;

template <Act A>
inline V Apply(V z) {
  if constexpr (A == Act::kNone) {
    return z;
  } else if constexpr (A == Act::kRelu) {
    return z < 0.0f ? Splat(0.0f) : z;
  } else if constexpr (A == Act::kRelu6) {
    return AtMost(z < 0.0f ? Splat(0.0f) : z, 6.0f);
  } else if constexpr (A == Act::kGelu) {
    // z * (1 + erf(z / sqrt 2)) / 2 = h + |h| erf(|z| / sqrt 2) with h = z / 2
    // (computed from |h|, so that no intermediate overflows).
    const V h = 0.5f * z, ha = Abs(h);
    return h + ha * ErfOfAbs(ha * (2.0f * kSqrtHalf));
  } else if constexpr (A == Act::kGeluTanh) {
    return 0.5f * z * (1.0f + Tanh(kSqrt2OverPi * (z + kGeluCubic * z * z * z)));
  } else if constexpr (A == Act::kSilu) {
    return z * Sigmoid(z);
  } else if constexpr (A == Act::kSigmoid) {
    return Sigmoid(z);
  } else if constexpr (A == Act::kTanh) {
    return Tanh(z);
  } else {  // hard_swish: z * relu6(z + 3) / 6
    const V u = z + 3.0f;
    return z * AtMost(u < 0.0f ? Splat(0.0f) : u, 6.0f) * (1.0f / 6.0f);
  }
}

// act'(z), with JAX's values at the kinks (relu: 0 at 0; relu6: 0 at 0 and 6;
// hard_swish: 0 at -3, 1 at 3).
template <Act A>
inline V Slope(V z) {
  const V one = Splat(1.0f), zero = Splat(0.0f);
  if constexpr (A == Act::kNone) {
    return one;
  } else if constexpr (A == Act::kRelu) {
    return z > 0.0f ? one : zero;
  } else if constexpr (A == Act::kRelu6) {
    return (z > 0.0f) & (z < 6.0f) ? one : zero;
  } else if constexpr (A == Act::kGelu) {
    return 0.5f * (1.0f + Erf(z * kSqrtHalf)) + z * kInvSqrt2Pi * Exp(-0.5f * z * z);
  } else if constexpr (A == Act::kGeluTanh) {
    const V t = Tanh(kSqrt2OverPi * (z + kGeluCubic * z * z * z));
    return 0.5f * (1.0f + t) +
           0.5f * z * (1.0f - t * t) * kSqrt2OverPi * (1.0f + 3.0f * kGeluCubic * z * z);
  } else if constexpr (A == Act::kSilu) {
    const V s = Sigmoid(z);
    return s * (1.0f + z * (1.0f - s));
  } else if constexpr (A == Act::kSigmoid) {
    const V s = Sigmoid(z);
    return s * (1.0f - s);
  } else if constexpr (A == Act::kTanh) {
    const V t = Tanh(z);
    return 1.0f - t * t;
  } else {
    const V mid = (2.0f * z + 3.0f) * (1.0f / 6.0f);
    return z >= 3.0f ? one : (z > -3.0f ? mid : zero);
  }
}

// act'(z) from y = act(z), for FromOutput activations.
template <Act A>
inline V SlopeFromOutput(V y) {
  const V one = Splat(1.0f), zero = Splat(0.0f);
  if constexpr (A == Act::kRelu) {
    return y > 0.0f ? one : zero;
  } else if constexpr (A == Act::kRelu6) {
    return (y > 0.0f) & (y < 6.0f) ? one : zero;
  } else if constexpr (A == Act::kSigmoid) {
    return y * (1.0f - y);
  } else if constexpr (A == Act::kTanh) {
    return 1.0f - y * y;
  } else {
    return one;
  }
}

// f(i, n): packets at i (n = kLanes), then the tail through a scratch packet.
template <typename F>
inline void ForPackets(int64_t len, F&& f) {
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes) f(i, kLanes);
  if (i < len) f(i, len - i);
}

// Loads / stores n <= kLanes floats (a whole packet when n == kLanes).
inline V LoadN(const float* p, int64_t n) {
  if (n == kLanes) return Pack<kLanes>::Load(p);
  float tmp[kLanes] = {};
  std::memcpy(tmp, p, n * sizeof(float));
  return Pack<kLanes>::Load(tmp);
}
inline void StoreN(float* p, V v, int64_t n) {
  if (n == kLanes) return Pack<kLanes>::Store(p, v);
  float tmp[kLanes];
  Pack<kLanes>::Store(tmp, v);
  std::memcpy(p, tmp, n * sizeof(float));
}

template <Act A>
void ActivateRowT(float* row, const float* bias, int64_t len) {
  ForPackets(len, [&](int64_t i, int64_t n) {
    StoreN(row + i, Apply<A>(LoadN(row + i, n) + LoadN(bias + i, n)), n);
  });
}

template <Act A>
void ActivateRowStreamT(const float* row, const float* bias, float* out, int64_t len) {
  ForPackets(len, [&](int64_t i, int64_t n) {
    const V v = Apply<A>(LoadN(row + i, n) + LoadN(bias + i, n));
    if (n == kLanes) {
      StreamStore<kLanes>(out + i, v);
    } else {
      StoreN(out + i, v, n);
    }
  });
}

template <Act A>
void ActivateRowScalarT(float* row, float bias, int64_t len) {
  ForPackets(len, [&](int64_t i, int64_t n) {
    StoreN(row + i, Apply<A>(LoadN(row + i, n) + bias), n);
  });
}

template <Act A>
void SlopeRowZScalarT(const float* z, float bias, const float* ct, float* g, int64_t len) {
  ForPackets(len, [&](int64_t i, int64_t n) {
    StoreN(g + i, LoadN(ct + i, n) * Slope<A>(LoadN(z + i, n) + bias), n);
  });
}

template <Act A>
void SlopeRowZT(const float* z, const float* bias, const float* ct, float* g, int64_t len) {
  ForPackets(len, [&](int64_t i, int64_t n) {
    V v = LoadN(z + i, n);
    if (bias != nullptr) v += LoadN(bias + i, n);
    StoreN(g + i, LoadN(ct + i, n) * Slope<A>(v), n);
  });
}

template <Act A>
void SlopeRowYT(const float* y, const float* ct, float* g, int64_t len) {
  ForPackets(len, [&](int64_t i, int64_t n) {
    StoreN(g + i, LoadN(ct + i, n) * SlopeFromOutput<A>(LoadN(y + i, n)), n);
  });
}

// Calls f(Act constant) for `a`.
template <typename F>
inline void WithAct(Act a, F&& f) {
  switch (a) {
    case Act::kNone: return f(std::integral_constant<Act, Act::kNone>{});
    case Act::kRelu: return f(std::integral_constant<Act, Act::kRelu>{});
    case Act::kRelu6: return f(std::integral_constant<Act, Act::kRelu6>{});
    case Act::kGelu: return f(std::integral_constant<Act, Act::kGelu>{});
    case Act::kGeluTanh: return f(std::integral_constant<Act, Act::kGeluTanh>{});
    case Act::kSilu: return f(std::integral_constant<Act, Act::kSilu>{});
    case Act::kSigmoid: return f(std::integral_constant<Act, Act::kSigmoid>{});
    case Act::kTanh: return f(std::integral_constant<Act, Act::kTanh>{});
    case Act::kHardSwish: return f(std::integral_constant<Act, Act::kHardSwish>{});
  }
}

}  // namespace epi

// row[i] = act(row[i] + bias[i]) for i < len.
inline void ActivateRow(Act a, float* row, const float* bias, int64_t len) {
  epi::WithAct(a, [&](auto c) { epi::ActivateRowT<decltype(c)::value>(row, bias, len); });
}

// out[i] = act(row[i] + bias[i]) for i < len, with non-temporal stores (`out`
// aligned to a vector): the epilogue of a row on its way to a streamed output.
inline void ActivateRowStream(Act a, const float* row, const float* bias, float* out,
                              int64_t len) {
  epi::WithAct(a,
               [&](auto c) { epi::ActivateRowStreamT<decltype(c)::value>(row, bias, out, len); });
}

// The same with one bias for the whole row (channels-first rows).
inline void ActivateRowScalar(Act a, float* row, float bias, int64_t len) {
  epi::WithAct(a, [&](auto c) { epi::ActivateRowScalarT<decltype(c)::value>(row, bias, len); });
}

inline void SlopeRowZScalar(Act a, const float* z, float bias, const float* ct, float* g,
                            int64_t len) {
  epi::WithAct(a,
               [&](auto c) { epi::SlopeRowZScalarT<decltype(c)::value>(z, bias, ct, g, len); });
}

// g[i] = ct[i] * act'(z[i] + bias[i]) (bias null: act'(z[i])).
inline void SlopeRowZ(Act a, const float* z, const float* bias, const float* ct, float* g,
                      int64_t len) {
  epi::WithAct(a, [&](auto c) { epi::SlopeRowZT<decltype(c)::value>(z, bias, ct, g, len); });
}

// g[i] = ct[i] * act'(z) from y[i] = act(z), for FromOutput activations.
inline void SlopeRowY(Act a, const float* y, const float* ct, float* g, int64_t len) {
  epi::WithAct(a, [&](auto c) { epi::SlopeRowYT<decltype(c)::value>(y, ct, g, len); });
}

}  // namespace dw5d

#endif  // DW5D_JAX_CSRC_EPILOGUE_H_
