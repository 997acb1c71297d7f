// The XLA FFI handlers (the header-only xla/ffi/api/ffi.h that jaxlib
// ships): the problem decoded from named attributes, each checked; the
// operands checked against it; the kernel re-laid; the kernels called for
// the operands' dtypes. dw5d_jax/_native.py builds the attributes (`_attrs`)
// and decides when XLA calls these.
//
//   dw5d_forward(x, w) -> y    dw5d_input_grad(ct, w) -> dx    dw5d_kernel_grad(x, ct) -> dk
//
// x, dx, y and ct are float32 or bfloat16 in either layout (geometry.h); w
// and dk are (KD, KH, KW, C, M), float32 or bfloat16. The attributes, each
// required and checked by name (ParseGeom):
//   batch, channels, multiplier      int64
//   in_spatial, out_spatial, window, strides, dilations, padding_low
//                                    3 int64 each, in D, H, W order
//   channels_first                   bool: x, y, ct and dx are (N, C, D, H, W)-shaped

#include <algorithm>
#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "geometry.h"
#include "kernels.h"
#include "packets.h"
#include "threads.h"
#include "xla/ffi/api/ffi.h"

namespace dw5d {
namespace {

// Bound on every attribute: a product of two stays far inside int64 (and the
// sizes are checked against the operands' shapes too).
constexpr int64_t kLimit = int64_t{1} << 31;

std::string Ints(const int64_t* v, size_t n) {
  std::string s;
  for (size_t i = 0; i < n; ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return n == 1 ? s : "(" + s + ")";
}

ffi::Error Invalid(const char* op, const std::string& what) {
  return ffi::Error::InvalidArgument(std::string(op) + ": " + what);
}

// out[0:n] = attribute `name`: an int64 (n = 1) or an array of n int64, each in [lo, hi].
ffi::Error ReadInts(const char* op, const ffi::Dictionary& attrs, const char* name, size_t n,
                    int64_t lo, int64_t hi, int64_t* out) {
  auto fail = [&](const char* how, const std::string& got) {
    const std::string want = (n == 1 ? std::string("an int64") : std::to_string(n) + " int64") +
                             " in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]";
    return Invalid(op, std::string("attribute `") + name + "` " + how + want + got);
  };
  if (!attrs.contains(name)) return fail("is missing (", ")");
  if (n == 1) {
    ffi::ErrorOr<int64_t> v = attrs.get<int64_t>(name);
    if (v.has_error()) return fail("must be ", ": " + v.error().message());
    out[0] = *v;
  } else {
    ffi::ErrorOr<ffi::Span<const int64_t>> v = attrs.get<ffi::Span<const int64_t>>(name);
    if (v.has_error()) return fail("must be ", ": " + v.error().message());
    if (v->size() != n) return fail("must be ", ", got " + Ints(v->begin(), v->size()));
    std::copy(v->begin(), v->end(), out);
  }
  for (size_t i = 0; i < n; ++i)
    if (out[i] < lo || out[i] > hi) return fail("must be ", ", got " + Ints(out, n));
  return ffi::Error::Success();
}

// The problem from the attributes, each checked by name.
ffi::Error ParseGeom(const char* op, const ffi::Dictionary& attrs, Geom* g) {
  struct Field {
    const char* name;
    size_t n;  // 1: a scalar
    int64_t lo;
    int64_t* out[3];
  };
  const Field fields[] = {
      {"batch", 1, 0, {&g->n}},
      {"channels", 1, 1, {&g->c}},
      {"multiplier", 1, 1, {&g->m}},
      {"in_spatial", 3, 1, {&g->d, &g->h, &g->w}},
      {"out_spatial", 3, 1, {&g->od, &g->oh, &g->ow}},
      {"window", 3, 1, {&g->kd, &g->kh, &g->kw}},
      {"strides", 3, 1, {&g->sd, &g->sh, &g->sw}},
      {"dilations", 3, 1, {&g->rd, &g->rh, &g->rw}},
      {"padding_low", 3, -kLimit, {&g->pd, &g->ph, &g->pw}},
  };
  for (const Field& f : fields) {
    int64_t v[3];
    if (ffi::Error err = ReadInts(op, attrs, f.name, f.n, f.lo, kLimit, v); err.failure())
      return err;
    for (size_t i = 0; i < f.n; ++i) *f.out[i] = v[i];
  }
  if (!attrs.contains("channels_first"))
    return Invalid(op, "attribute `channels_first` is missing (a bool)");
  ffi::ErrorOr<bool> cf = attrs.get<bool>("channels_first");
  if (cf.has_error())
    return Invalid(op, "attribute `channels_first` must be a bool: " + cf.error().message());
  g->cf = *cf;
  for (std::string_view name : attrs) {
    bool known = name == "channels_first";
    for (const Field& f : fields) known = known || name == f.name;
    if (!known) return Invalid(op, "unknown attribute `" + std::string(name) + "`");
  }
  return ffi::Error::Success();
}

// What an operand is; its shape follows from the problem.
enum class Role { kInput, kOutput, kKernel };  // x or dx; y or ct; w or dk

struct Operand {
  const char* name;
  Role role;
};

std::array<int64_t, 5> Shape(const Geom& g, Role role) {
  switch (role) {
    case Role::kInput:
      if (g.cf) return {g.n, g.c, g.d, g.h, g.w};
      return {g.n, g.d, g.h, g.w, g.c};
    case Role::kOutput:
      if (g.cf) return {g.n, g.c * g.m, g.od, g.oh, g.ow};
      return {g.n, g.od, g.oh, g.ow, g.c * g.m};
    case Role::kKernel:
      break;
  }
  return {g.kd, g.kh, g.kw, g.c, g.m};
}

ffi::Error CheckOperand(const char* op, const Operand& operand, const Geom& g,
                        const ffi::AnyBuffer& buffer) {
  if (buffer.element_type() != ffi::DataType::F32 && buffer.element_type() != ffi::DataType::BF16)
    return Invalid(op, std::string("`") + operand.name + "` must be float32 or bfloat16");
  const std::array<int64_t, 5> want = Shape(g, operand.role);
  const ffi::AnyBuffer::Dimensions dims = buffer.dimensions();
  if (!std::equal(want.begin(), want.end(), dims.begin(), dims.end()))
    return Invalid(op, std::string("`") + operand.name + "` has shape " +
                           Ints(dims.begin(), dims.size()) + ", the attributes give " +
                           Ints(want.data(), want.size()));
  return ffi::Error::Success();
}

// Calls f(T{}) with T the element type of a float32 (float) or bfloat16 (bf16) operand.
template <typename F>
void WithDtype(ffi::DataType type, F&& f) {
  if (type == ffi::DataType::F32) {
    f(float{});
  } else {
    f(bf16{});
  }
}

// The library's (KD, KH, KW, C, M) kernel `k` as the kernels' float32
// (KD, KH, KW, M, C) `w`, and back (plain loops: the kernel is small next
// to the arrays).
template <typename T>
void LoadKernel(const Geom& g, const T* k, float* w) {
  for (int64_t t = 0; t < g.taps(); ++t)
    for (int64_t c = 0; c < g.c; ++c)
      for (int64_t m = 0; m < g.m; ++m)
        w[(t * g.m + m) * g.c + c] = Pack<1>::Load(k + (t * g.c + c) * g.m + m);
}

template <typename T>
void StoreKernel(const Geom& g, const float* w, T* k) {
  for (int64_t t = 0; t < g.taps(); ++t)
    for (int64_t c = 0; c < g.c; ++c)
      for (int64_t m = 0; m < g.m; ++m)
        Pack<1>::Store(k + (t * g.c + c) * g.m + m, w[(t * g.m + m) * g.c + c]);
}

// The ops: their name, operands (two arguments, one result) and the kernels
// they call with `a` and `b`, the operands that are not the kernel (in
// order), and `w`, the kernel as the kernels see it.
struct Forward {
  static constexpr const char* kName = "dw5d_forward";
  static constexpr Operand kOperands[3] = {
      {"x", Role::kInput}, {"w", Role::kKernel}, {"y", Role::kOutput}};
  template <typename TA, typename TB>
  static void Run(ffi::ThreadPool* pool, const Geom& g, void* a, void* b, float* w) {
    RunForward(pool, g, static_cast<const TA*>(a), w, static_cast<TB*>(b));
  }
};

struct InputGrad {
  static constexpr const char* kName = "dw5d_input_grad";
  static constexpr Operand kOperands[3] = {
      {"ct", Role::kOutput}, {"w", Role::kKernel}, {"dx", Role::kInput}};
  template <typename TA, typename TB>
  static void Run(ffi::ThreadPool* pool, const Geom& g, void* a, void* b, float* w) {
    RunInputGrad(pool, g, static_cast<const TA*>(a), w, static_cast<TB*>(b));
  }
};

struct KernelGrad {
  static constexpr const char* kName = "dw5d_kernel_grad";
  static constexpr Operand kOperands[3] = {
      {"x", Role::kInput}, {"ct", Role::kOutput}, {"dk", Role::kKernel}};
  template <typename TA, typename TB>
  static void Run(ffi::ThreadPool* pool, const Geom& g, void* a, void* b, float* w) {
    RunKernelGrad(pool, g, static_cast<const TA*>(a), static_cast<const TB*>(b), w);
  }
};

template <typename Op>
ffi::Error Handle(ffi::ThreadPool pool, ffi::AnyBuffer arg0, ffi::AnyBuffer arg1,
                  ffi::Result<ffi::AnyBuffer> result, ffi::Dictionary attrs) {
  Geom g;
  if (ffi::Error err = ParseGeom(Op::kName, attrs, &g); err.failure()) return err;
  ffi::AnyBuffer* operands[3] = {&arg0, &arg1, &*result};
  ffi::AnyBuffer* arrays[2] = {};
  ffi::AnyBuffer* kernel = nullptr;
  for (int i = 0, n = 0; i < 3; ++i) {
    if (ffi::Error err = CheckOperand(Op::kName, Op::kOperands[i], g, *operands[i]); err.failure())
      return err;
    (Op::kOperands[i].role == Role::kKernel ? kernel : arrays[n++]) = operands[i];
  }
  std::vector<float> w(g.taps() * g.m * g.c);
  const bool returns_kernel = kernel == operands[2];
  if (!returns_kernel) {
    WithDtype(kernel->element_type(), [&](auto t) {
      LoadKernel(g, static_cast<const decltype(t)*>(kernel->untyped_data()), w.data());
    });
  }
  WithDtype(arrays[0]->element_type(), [&](auto ta) {
    WithDtype(arrays[1]->element_type(), [&](auto tb) {
      Op::template Run<decltype(ta), decltype(tb)>(&pool, g, arrays[0]->untyped_data(),
                                                   arrays[1]->untyped_data(), w.data());
    });
  });
  if (returns_kernel) {
    WithDtype(kernel->element_type(), [&](auto t) {
      StoreKernel(g, w.data(), static_cast<decltype(t)*>(kernel->untyped_data()));
    });
  }
  return ffi::Error::Success();
}

auto Binding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::AnyBuffer>()
      .Ret<ffi::AnyBuffer>()
      .Attrs<ffi::Dictionary>();
}

}  // namespace
}  // namespace dw5d

XLA_FFI_DEFINE_HANDLER_SYMBOL(Dw5dForward, dw5d::Handle<dw5d::Forward>, dw5d::Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(Dw5dInputGrad, dw5d::Handle<dw5d::InputGrad>, dw5d::Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(Dw5dKernelGrad, dw5d::Handle<dw5d::KernelGrad>, dw5d::Binding());
