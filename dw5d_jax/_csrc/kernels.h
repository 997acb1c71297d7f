// The three ops on a whole problem, as the handlers and the self-test call
// them: each picks the kernels of the problem's layout (channels_last.cc,
// channels_first.cc, instantiated there for float32 and bfloat16 arrays).
//
//   forward      y[o, c, m] = sum over taps t of x[o * s + t * r - p, c] * w[t, m, c]
//   kernel grad  dk[t, m, c] = sum over outputs o of x[o * s + t * r - p, c] * ct[o, c * M + m],
//                in one pass over x and ct that accumulates every tap together
//   input grad   dx[i, c] = sum over (t, m) with i = o * s + t * r - p of ct[o, c * M + m] *
//                w[t, m, c]: with unit strides and M = 1 the forward kernels on ct with the
//                flipped kernel, otherwise a transposed convolution in gather form (no dilated
//                or padded copy of ct)
//
// Every sum is accumulated in float32. `generic` (the self-test) makes the
// channels-last kernels skip their unrolled W shapes and the input gradient
// skip the forward-kernel shortcut, so that those paths are tested too.

#ifndef DW5D_JAX_CSRC_KERNELS_H_
#define DW5D_JAX_CSRC_KERNELS_H_

#include <algorithm>
#include <cstdint>
#include <vector>

#include "geometry.h"
#include "packets.h"
#include "threads.h"

namespace dw5d {

// The pairs of array types (float32 or bfloat16 each) that channels_last.cc
// and channels_first.cc instantiate their entry points for: M(T1, T2) each.
#define DW5D_FOR_DTYPE_PAIRS(M) M(float, float) M(float, bf16) M(bf16, float) M(bf16, bf16)

// Channels-last kernels (channels_last.cc).
template <typename TI, typename TO>
void RunForwardCl(ffi::ThreadPool* pool, const Geom& g, const TI* x, const float* w, TO* y,
                  bool generic);
template <typename TI, typename TC>
void RunKernelGradCl(ffi::ThreadPool* pool, const Geom& g, const TI* x, const TC* ct, float* dk,
                     bool generic);
template <typename TC, typename TO>
void RunInputGradCl(ffi::ThreadPool* pool, const Geom& g, const TC* ct, const float* w, TO* dx);

// Channels-first kernels (channels_first.cc).
template <typename TI, typename TO>
void RunForwardCf(ffi::ThreadPool* pool, const Geom& g, const TI* x, const float* w, TO* y);
template <typename TI, typename TC>
void RunKernelGradCf(ffi::ThreadPool* pool, const Geom& g, const TI* x, const TC* ct, float* dk);
template <typename TC, typename TO>
void RunInputGradCf(ffi::ThreadPool* pool, const Geom& g, const TC* ct, const float* w, TO* dx);

template <typename TI, typename TO>
void RunForward(ffi::ThreadPool* pool, const Geom& g, const TI* x, const float* w, TO* y,
                bool generic = false) {
  if (g.cf) {
    RunForwardCf(pool, g, x, w, y);
    return;
  }
  RunForwardCl(pool, g, x, w, y, generic);
}

template <typename TI, typename TC>
void RunKernelGrad(ffi::ThreadPool* pool, const Geom& g, const TI* x, const TC* ct, float* dk,
                   bool generic = false) {
  if (g.cf) {
    RunKernelGradCf(pool, g, x, ct, dk);
    return;
  }
  RunKernelGradCl(pool, g, x, ct, dk, generic);
}

template <typename TC, typename TO>
void RunInputGrad(ffi::ThreadPool* pool, const Geom& g, const TC* ct, const float* w, TO* dx,
                  bool generic = false) {
  if (!generic && g.sd == 1 && g.sh == 1 && g.sw == 1 && g.m == 1) {
    // dx[i] = sum_t ct[i + t * r - p'] * w[k - 1 - t] with p' = (k - 1) * r - p.
    Geom f = g;
    f.d = g.od, f.h = g.oh, f.w = g.ow, f.od = g.d, f.oh = g.h, f.ow = g.w;
    f.pd = (g.kd - 1) * g.rd - g.pd, f.ph = (g.kh - 1) * g.rh - g.ph;
    f.pw = (g.kw - 1) * g.rw - g.pw;
    std::vector<float> flipped(g.taps() * g.c);
    for (int64_t t = 0; t < g.taps(); ++t)
      std::copy(w + (g.taps() - 1 - t) * g.c, w + (g.taps() - t) * g.c, &flipped[t * g.c]);
    RunForward(pool, f, ct, flipped.data(), dx);
    return;
  }
  if (g.cf) {
    RunInputGradCf(pool, g, ct, w, dx);
    return;
  }
  RunInputGradCl(pool, g, ct, w, dx);
}

}  // namespace dw5d

#endif  // DW5D_JAX_CSRC_KERNELS_H_
