// Threading: a parallel loop over the tiles of a problem on XLA's intra-op
// thread pool. The tiles are a fixed split of the problem (geometry.h:
// Tiles, from the shapes only), so results do not depend on the thread count.

#ifndef DW5D_JAX_CSRC_THREADS_H_
#define DW5D_JAX_CSRC_THREADS_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "geometry.h"
#include "xla/ffi/api/ffi.h"

namespace dw5d {

namespace ffi = ::xla::ffi;

// Parallel loop over chunks: the calling thread and up to num_threads - 1
// tasks on XLA's pool take chunks from a shared counter. A task that starts
// late finds no chunk left and returns without touching `body`, and the
// caller waits only for chunks that were taken, so this never deadlocks,
// even when the pool runs tasks inline or has a single thread.

struct Progress {
  std::atomic<int64_t> next{0}, done{0};
  std::mutex mu;
  std::condition_variable cv;
};

template <typename F>
void ParallelFor(ffi::ThreadPool* pool, int64_t n, bool parallel, const F& body) {
  const int64_t threads = (pool != nullptr && parallel) ? pool->num_threads() : 0;
  if (threads <= 1 || n <= 1) {
    for (int64_t i = 0; i < n; ++i) body(i);
    return;
  }
  auto progress = std::make_shared<Progress>();
  const F* fn = &body;
  auto work = [progress, fn, n]() {
    for (;;) {
      const int64_t i = progress->next.fetch_add(1);
      if (i >= n) return;
      (*fn)(i);
      if (progress->done.fetch_add(1) + 1 == n) {
        std::lock_guard<std::mutex> lock(progress->mu);
        progress->cv.notify_all();
      }
    }
  };
  for (int64_t t = 1; t < std::min(threads, n); ++t) pool->Schedule(decltype(work)(work));
  work();
  std::unique_lock<std::mutex> lock(progress->mu);
  progress->cv.wait(lock, [&] { return progress->done.load() == n; });
}

// out[j] = the sum over chunks i < count of parts[i * size + j], in chunk
// order: with the fixed split of Tiles, per-chunk partial sums (a kernel or
// bias gradient) add up to the same bits whatever the thread count.
inline void SumChunks(const std::vector<float>& parts, int64_t count, int64_t size, float* out) {
  std::fill(out, out + size, 0.0f);
  for (int64_t i = 0; i < count; ++i)
    for (int64_t j = 0; j < size; ++j) out[j] += parts[i * size + j];
}

// Problems with fewer multiply-adds than this run on the calling thread.
constexpr int64_t kMinParallelWork = 1 << 18;

inline int64_t Work(const Geom& g) { return g.rows() * g.ow * g.c * g.m * g.taps(); }

}  // namespace dw5d

#endif  // DW5D_JAX_CSRC_THREADS_H_
