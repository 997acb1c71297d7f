// The three ops on a whole problem, as the handlers and the self-test call
// them: each picks the kernels of the problem's layout (ByLayout).
//
//   forward      y[o, c, m] = sum over taps t of x[o * s + t * r - p, c] * w[t, m, c]
//   kernel grad  dk[t, m, c] = sum over outputs o of x[o * s + t * r - p, c] * ct[o, c * M + m],
//                in one pass over x and ct that accumulates every tap together
//   input grad   dx[i, c] = sum over (t, m) with i = o * s + t * r - p of ct[o, c * M + m] *
//                w[t, m, c]: with unit strides and M = 1 the forward kernels on ct with the
//                flipped kernel, otherwise a transposed convolution in gather form (no dilated
//                or padded copy of ct)
//
//   epilogue     y = act(conv(x, w) + bias) (epilogue.h), applied to each output row as the
//                forward computes it; its backward pass, in the kernel gradient's one pass over x
//                and ct: g = ct * act'(z), dk of (x, g) and db = sum of g per channel, act'(z)
//                computed from y (FromOutput activations) or from z = conv(x, w) + bias
//                recomputed from the x windows the pass reads anyway
//
// Every sum is accumulated in float32. `generic` (the self-test) makes the
// channels-last kernels skip their unrolled W shapes and the input gradient
// skip the forward-kernel shortcut, so that those paths are tested too.

#ifndef DW5D_JAX_CSRC_KERNELS_H_
#define DW5D_JAX_CSRC_KERNELS_H_

#include <algorithm>
#include <cstdint>
#include <vector>

#include "epilogue.h"
#include "geometry.h"
#include "packets.h"
#include "threads.h"

namespace dw5d {

// The pairs of array types (float32 or bfloat16 each) that the layouts'
// kernels are instantiated for: M(T1, T2) each.
#define DW5D_FOR_DTYPE_PAIRS(M) M(float, float) M(float, bf16) M(bf16, float) M(bf16, bf16)

// An epilogue: the activation and the bias, (C * M,) in the output's channel order.
struct Epilogue {
  Act act = Act::kNone;
  const float* bias = nullptr;
};

// The epilogue's backward pass (RunKernelGrad with an EpilogueGrad): `w` null, act'(z) from `y`
// (FromOutput activations), else from z recomputed with `w` and the bias;
// `g` (float32, y's shape) null when there is no activation (g = ct).
template <typename TC>
struct EpilogueGrad {
  Epilogue epilogue;
  const float* w = nullptr;
  const TC* y = nullptr;
  float* g = nullptr;
  float* db = nullptr;  // (C * M,)
};

// The kernels of one layout: ChannelsLast (channels_last_forward.cc,
// channels_last_kernel_grad.cc, channels_last_input_grad.cc) and
// ChannelsFirst (channels_first.cc), each instantiated for the pairs of
// DW5D_FOR_DTYPE_PAIRS. Forward takes an epilogue (none: the plain
// convolution); KernelGrad an epilogue gradient (no `db`: the plain kernel
// gradient); InputGrad is the gather form.
#define DW5D_LAYOUT_KERNELS                                                                   \
  template <typename TI, typename TO>                                                         \
  static void Forward(ffi::ThreadPool* pool, const Geom& g, const TI* x, const float* w,      \
                      const Epilogue& e, TO* y, bool generic);                                \
  template <typename TI, typename TC>                                                         \
  static void KernelGrad(ffi::ThreadPool* pool, const Geom& g, const TI* x, const TC* ct,     \
                         const EpilogueGrad<TC>& e, float* dk, bool generic);                 \
  template <typename TC, typename TO>                                                         \
  static void InputGrad(ffi::ThreadPool* pool, const Geom& g, const TC* ct, const float* w, \
                        TO* dx);
struct ChannelsLast {
  DW5D_LAYOUT_KERNELS
};
struct ChannelsFirst {  // `generic`: per plane, never in channel blocks
  DW5D_LAYOUT_KERNELS
};
#undef DW5D_LAYOUT_KERNELS

// The one dispatcher: run(ChannelsFirst{}) or run(ChannelsLast{}) for g's layout.
template <typename Run>
void ByLayout(const Geom& g, Run&& run) {
  if (g.cf) {
    run(ChannelsFirst{});
  } else {
    run(ChannelsLast{});
  }
}

template <typename TI, typename TO>
void RunForward(ffi::ThreadPool* pool, const Geom& g, const TI* x, const float* w, TO* y,
                const Epilogue& e = {}, bool generic = false) {
  ByLayout(g, [&](auto layout) { decltype(layout)::Forward(pool, g, x, w, e, y, generic); });
}

// Without e.db, the plain kernel gradient.
template <typename TI, typename TC>
void RunKernelGrad(ffi::ThreadPool* pool, const Geom& g, const TI* x, const TC* ct, float* dk,
                   const EpilogueGrad<TC>& e = {}, bool generic = false) {
  ByLayout(g, [&](auto layout) { decltype(layout)::KernelGrad(pool, g, x, ct, e, dk, generic); });
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
  ByLayout(g, [&](auto layout) { decltype(layout)::InputGrad(pool, g, ct, w, dx); });
}

}  // namespace dw5d

#endif  // DW5D_JAX_CSRC_KERNELS_H_
