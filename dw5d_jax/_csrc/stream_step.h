// One frame of a stream (the handler dw5d_stream_step): the frame written
// into the free slot of a ring along D, and the ring's window convolved by
// the forward kernels, reading every tap's frame where it lies in the ring.
//
// The ring (N, E, H, W, C) (channels-last) holds a stream's last E - 1
// input frames in every slot but `head`, the oldest at slot (head + 1) mod E.
// With the frame (N, 1, H, W, C) in slot `head`, the E frames from the oldest
// on are one window along D: `g` is that window's convolution (d = E,
// od = 1, no padding and stride 1 along D; E = (KD - 1) * RD + 1), whose
// input plane i lies at slot (head + 1 + i) mod E (Geom::d0). E.g. E = 3,
// head = 1: planes 0, 1, 2 (oldest first) are slots 2, 0, 1. The taps are
// summed in the full op's order, and no frame is copied but the new one.

#ifndef DW5D_JAX_CSRC_STREAM_STEP_H_
#define DW5D_JAX_CSRC_STREAM_STEP_H_

#include <algorithm>
#include <cstdint>

#include "geometry.h"
#include "kernels.h"
#include "threads.h"

namespace dw5d {

template <typename TI, typename TO>
void RunStreamStep(ffi::ThreadPool* pool, Geom g, const TI* frame, int64_t head, const float* w,
                   TI* ring, TO* y) {
  const int64_t plane = g.h * g.w * g.c;
  for (int64_t n = 0; n < g.n; ++n)
    std::copy(frame + n * plane, frame + (n + 1) * plane, ring + (n * g.d + head) * plane);
  g.d0 = (head + 1) % g.d;
  RunForward(pool, g, static_cast<const TI*>(ring), w, y);
}

}  // namespace dw5d

#endif  // DW5D_JAX_CSRC_STREAM_STEP_H_
