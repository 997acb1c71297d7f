// SIMD packets: the vector width the build targets, float32 and bfloat16
// packets loaded and stored as float32 (bfloat16 rounded to nearest even),
// and the conversion of rows between the two. Every kernel computes in
// float32 packets of these widths.
//
// The packets are GCC/Clang vector extensions of the widest width the build
// targets (16 floats with AVX-512; then 8 and 4 for what is left over, then
// single floats): GCC's auto-vectoriser prefers 256-bit vectors on these
// CPUs, and an explicit packet also pins the register blocking that keeps
// the FMA units busy.

#ifndef DW5D_JAX_CSRC_PACKETS_H_
#define DW5D_JAX_CSRC_PACKETS_H_

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace dw5d {

#if defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif

using bf16 = uint16_t;  // the bits of a bfloat16

inline uint16_t ToBf16(float f) {  // round to nearest even, NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// Pack<N>: loads, stores and zero of one packet of N floats (N = 1: a float).
template <int N>
struct Pack;

template <>
struct Pack<1> {
  using V = float;
  static float Zero() { return 0.0f; }
  static float Load(const float* p) { return *p; }
  static float Load(const bf16* p) {
    uint32_t u = static_cast<uint32_t>(*p) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  static void Store(float* p, float v) { *p = v; }
  static void Store(bf16* p, float v) { *p = ToBf16(v); }
};

#define DW5D_DEFINE_PACK(N)                                                             \
  template <>                                                                           \
  struct Pack<N> {                                                                      \
    typedef float V __attribute__((vector_size(4 * N)));                               \
    typedef uint32_t U __attribute__((vector_size(4 * N)));                            \
    typedef uint16_t H __attribute__((vector_size(2 * N)));                            \
    static V Zero() { return V{}; }                                                     \
    static V Load(const float* p) {                                                     \
      V v;                                                                              \
      std::memcpy(&v, p, sizeof v);                                                     \
      return v;                                                                         \
    }                                                                                   \
    static V Load(const bf16* p) {                                                      \
      H h;                                                                              \
      std::memcpy(&h, p, sizeof h);                                                     \
      U u = __builtin_convertvector(h, U) << 16;                                        \
      V v;                                                                              \
      std::memcpy(&v, &u, sizeof v);                                                    \
      return v;                                                                         \
    }                                                                                   \
    static void Store(float* p, V v) { std::memcpy(p, &v, sizeof v); }                 \
    static void Store(bf16* p, V v) {                                                   \
      U u;                                                                              \
      std::memcpy(&u, &v, sizeof u);                                                    \
      U rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;                               \
      U quiet = (u >> 16) | 0x40u;                                                      \
      U nan = reinterpret_cast<U>((u & 0x7fffffffu) > 0x7f800000u);                     \
      H h = __builtin_convertvector((nan & quiet) | (~nan & rounded), H);               \
      std::memcpy(p, &h, sizeof h);                                                     \
    }                                                                                   \
  };
DW5D_DEFINE_PACK(4)
#if defined(__AVX__)
DW5D_DEFINE_PACK(8)
#endif
#if defined(__AVX512F__)
DW5D_DEFINE_PACK(16)
#endif
#undef DW5D_DEFINE_PACK

template <int N>
using Int = std::integral_constant<int, N>;

constexpr int kRegisters = kLanes >= 16 ? 32 : 16;  // vector registers

// out[0:len] = in[0:len] converted (float32 -> float32 or bfloat16).
template <typename TI, typename TO>
void Convert(const TI* in, TO* out, int64_t len) {
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes) Pack<kLanes>::Store(out + i, Pack<kLanes>::Load(in + i));
  for (; i < len; ++i) Pack<1>::Store(out + i, Pack<1>::Load(in + i));
}

}  // namespace dw5d

#endif  // DW5D_JAX_CSRC_PACKETS_H_
