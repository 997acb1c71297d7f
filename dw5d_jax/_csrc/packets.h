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

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

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

// Rounds a packet of floats to bfloat16 (nearest even) with AVX512-BF16's
// `vcvtneps2bf16` where the build has it (false: not done). NaN stays NaN;
// like every AVX512-BF16 instruction it flushes denormals to zero.
template <typename V>
inline bool StoreBf16Native(uint16_t* p, V v) {
#if defined(__AVX512BF16__) && defined(__AVX512VL__)
  if constexpr (sizeof(V) == 64) {
    const __m256bh h = _mm512_cvtneps_pbh(reinterpret_cast<__m512>(v));
    std::memcpy(p, &h, 32);
    return true;
  } else if constexpr (sizeof(V) == 32) {
    const __m128bh h = _mm256_cvtneps_pbh(reinterpret_cast<__m256>(v));
    std::memcpy(p, &h, 16);
    return true;
  }
#endif
  (void)p, (void)v;
  return false;
}

// Pack<N>: loads, stores and zero of one packet of N floats (N = 1: a float).
template <int N>
struct Pack;

template <>
struct Pack<1> {
  using V = float;
  using U = uint32_t;
  static float Zero() { return 0.0f; }
  static uint32_t LoadU(const uint32_t* p) { return *p; }
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
    static U LoadU(const uint32_t* p) {                                                 \
      U u;                                                                              \
      std::memcpy(&u, p, sizeof u);                                                     \
      return u;                                                                         \
    }                                                                                   \
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
      if (StoreBf16Native(p, v)) return;                                                \
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

// v with its first `skip` lanes zero (their bits cleared: an inf or NaN
// there is dropped too).
template <int N>
inline typename Pack<N>::V DropLanes(typename Pack<N>::V v, int skip) {
  if constexpr (N == 1) {
    return skip > 0 ? 0.0f : v;
  } else {
    using U = typename Pack<N>::U;
    U keep;
    for (int l = 0; l < N; ++l) keep[l] = l < skip ? 0u : ~0u;
    return reinterpret_cast<typename Pack<N>::V>(reinterpret_cast<U>(v) & keep);
  }
}

// Shuffle masks for packets of kLanes floats: Weave(half) interleaves two
// packets a, b as a0 b0 a1 b1 ... (the low or the high half of the result);
// Unweave(odd) takes the even (odd) lanes of a then b (the inverse).
inline Pack<kLanes>::U Weave(int half) {
  Pack<kLanes>::U m{};
  for (int i = 0; i < kLanes; ++i)
    m[i] = static_cast<uint32_t>(half * kLanes / 2 + i / 2 + (i % 2) * kLanes);
  return m;
}
inline Pack<kLanes>::U Unweave(int odd) {
  Pack<kLanes>::U m{};
  for (int i = 0; i < kLanes; ++i) m[i] = static_cast<uint32_t>(2 * i + odd);
  return m;
}

// ---------------------------------------------------------------------------
// Pairs of bfloat16: a uint32 holds two bfloat16 values, the low half first
// (the lane order of AVX512-BF16's `vdpbf16ps`). PairDot multiplies two
// packets of pairs lane by lane and adds both products to a float32
// packet: twice the multiply-adds of an FMA per instruction, the products
// exact (8-bit significands), the sums in float32 (flushing denormals,
// which `vdpbf16ps` reads and writes as zeros). Built where the compiler
// targets AVX512-BF16 (`-march=native` on such a CPU: `__AVX512BF16__`);
// elsewhere the bfloat16 kernels convert rows to float32 instead.
#if defined(__AVX512BF16__) && defined(__AVX512VL__)
#define DW5D_BF16_PAIRS 1
#else
#define DW5D_BF16_PAIRS 0
#endif

inline uint32_t PairOf(uint16_t lo, uint16_t hi) {
  return static_cast<uint32_t>(lo) | static_cast<uint32_t>(hi) << 16;
}

template <int N>
inline typename Pack<N>::V PairDot(typename Pack<N>::V acc, typename Pack<N>::U x,
                                   typename Pack<N>::U w) {
  if constexpr (N == 1) {
    const float xl = Pack<1>::Load(reinterpret_cast<const bf16*>(&x));
    const float xh = Pack<1>::Load(reinterpret_cast<const bf16*>(&x) + 1);
    const float wl = Pack<1>::Load(reinterpret_cast<const bf16*>(&w));
    const float wh = Pack<1>::Load(reinterpret_cast<const bf16*>(&w) + 1);
    return acc + xl * wl + xh * wh;
  }
#if DW5D_BF16_PAIRS
  else if constexpr (N == 16) {
    return reinterpret_cast<typename Pack<N>::V>(
        _mm512_dpbf16_ps(reinterpret_cast<__m512>(acc), reinterpret_cast<__m512bh>(x),
                         reinterpret_cast<__m512bh>(w)));
  } else if constexpr (N == 8) {
    return reinterpret_cast<typename Pack<N>::V>(
        _mm256_dpbf16_ps(reinterpret_cast<__m256>(acc), reinterpret_cast<__m256bh>(x),
                         reinterpret_cast<__m256bh>(w)));
  } else {
    static_assert(N == 4, "pairs come in packets of 16, 8, 4 or 1");
    return reinterpret_cast<typename Pack<N>::V>(
        _mm_dpbf16_ps(reinterpret_cast<__m128>(acc), reinterpret_cast<__m128bh>(x),
                      reinterpret_cast<__m128bh>(w)));
  }
#else
  else {
    static_assert(N == 1, "vector pairs need AVX512-BF16");
    return acc;
  }
#endif
}

// Keeps a loaded packet in a register: GCC otherwise folds the load into
// every multiply-add that uses the packet (a memory operand each), and on
// CPUs with one 512-bit load per cycle (AMD Zen 4) the loads, not the
// multiply-adds, then set the pace (W2 forward: 54 loads per 48 FMAs).
template <typename V>
inline void InRegister(V& v) {
#if defined(__x86_64__) || defined(__i386__)
  asm("" : "+v"(v));
#else
  (void)v;
#endif
}

constexpr int kRegisters = kLanes >= 16 ? 32 : 16;  // vector registers

// out[0:len] = in[0:len] converted (float32 -> float32 or bfloat16).
template <typename TI, typename TO>
void Convert(const TI* in, TO* out, int64_t len) {
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes) Pack<kLanes>::Store(out + i, Pack<kLanes>::Load(in + i));
  for (; i < len; ++i) Pack<1>::Store(out + i, Pack<1>::Load(in + i));
}

// A packet of floats stored with a non-temporal (streaming) store when
// there is one for its width (a whole AVX-512 or AVX register; `p` aligned
// to it), else an ordinary store. Callers fence (StreamFence) before the
// results are read elsewhere.
template <int N>
inline void StreamStore(float* p, typename Pack<N>::V v) {
#if defined(__AVX512F__)
  if constexpr (N == 16) {
    __m512 m;
    std::memcpy(&m, &v, sizeof m);
    _mm512_stream_ps(p, m);
    return;
  }
#endif
#if defined(__AVX__)
  if constexpr (N == 8) {
    __m256 m;
    std::memcpy(&m, &v, sizeof m);
    _mm256_stream_ps(p, m);
    return;
  }
#endif
  Pack<N>::Store(p, v);
}

inline void StreamFence() {
#if defined(__SSE__)
  _mm_sfence();
#endif
}

// out[0:len] = in[0:len] converted, with non-temporal (streaming) stores
// where `out` allows whole aligned vectors: for large outputs that no one
// reads back soon, the stores then skip reading every line from memory
// first (one 16 MiB read + write pass, one thread: 1.1 ms instead of 1.7).
template <typename TO>
void ConvertStream(const float* in, TO* out, int64_t len) {
#if defined(__AVX__)
  constexpr int64_t kBytes = kLanes * 4;          // one store: a vector register
  constexpr int64_t kVec = kBytes / sizeof(TO);  // elements per store
  int64_t i = 0;
  // Up to the first aligned address with ordinary stores.
  while (i < len && (reinterpret_cast<uintptr_t>(out + i) & (kBytes - 1)) != 0) {
    Pack<1>::Store(out + i, in[i]);
    ++i;
  }
  for (; i + kVec <= len; i += kVec) {
    if constexpr (std::is_same<TO, float>::value) {
      StreamStore<kLanes>(out + i, Pack<kLanes>::Load(in + i));
    } else {  // two packets of floats make one vector of bfloat16
      alignas(64) TO tmp[kVec];
      Pack<kLanes>::Store(tmp, Pack<kLanes>::Load(in + i));
      Pack<kLanes>::Store(tmp + kLanes, Pack<kLanes>::Load(in + i + kLanes));
#if defined(__AVX512F__)
      _mm512_stream_si512(reinterpret_cast<__m512i*>(out + i), _mm512_load_si512(tmp));
#else
      _mm256_stream_si256(reinterpret_cast<__m256i*>(out + i),
                          _mm256_load_si256(reinterpret_cast<const __m256i*>(tmp)));
#endif
    }
  }
  for (; i < len; ++i) Pack<1>::Store(out + i, in[i]);
#else
  Convert(in, out, len);
#endif
}

}  // namespace dw5d

#endif  // DW5D_JAX_CSRC_PACKETS_H_
