// The XLA FFI handlers (the header-only xla/ffi/api/ffi.h that jaxlib
// ships): the problem decoded from named attributes, each checked; the
// operands checked against it; the kernel re-laid; the kernels called for
// the operands' dtypes. dw5d_jax/_native.py builds the attributes (`_attrs`)
// and decides when XLA calls these.
//
//   dw5d_forward(x, w) -> y    dw5d_input_grad(ct, w) -> dx    dw5d_kernel_grad(x, ct) -> dk
//
// and, with an epilogue y = act(conv(x, w) + b) (kernels.h, epilogue.h):
//
//   dw5d_forward_epilogue(x, w, b) -> y
//   dw5d_epilogue_grad(x, w, b, ct) -> (g, dk, db)   act'(z) from z, recomputed
//   dw5d_epilogue_grad_y(x, y, ct) -> (g, dk, db)    act'(z) from y (relu, relu6, sigmoid, tanh)
//   dw5d_bias_grad(x, ct) -> (dk, db)                no activation: g = ct
//
// and one frame of a stream, the frame written into a ring in place (stream_step.h):
//
//   dw5d_stream_step(ring, frame, w, head) -> (ring, y)
//
// x, dx, y and ct are float32 or bfloat16 in either layout (geometry.h); w
// and dk are (KD, KH, KW, C, M), b and db (C * M,), float32 or bfloat16; g
// is float32. The attributes, each required and checked by name (ParseGeom):
//   batch, channels, multiplier      int64
//   in_spatial, out_spatial, window, strides, dilations, padding_low
//                                    3 int64 each, in D, H, W order
//   channels_first                   bool: x, y, ct and dx are (N, C, D, H, W)-shaped
//   activation                       the epilogue ops only: a name (epilogue.h: kActNames)

#include <algorithm>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "epilogue.h"
#include "geometry.h"
#include "kernels.h"
#include "packets.h"
#include "stream_step.h"
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

// The problem from the attributes, each checked by name; `act` non-null: the
// op also takes the attribute `activation`.
ffi::Error ParseGeom(const char* op, const ffi::Dictionary& attrs, Geom* g, Act* act) {
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
  if (act != nullptr) {
    auto names = [] {  // for the messages only: every call decodes the attributes
      std::string s;
      for (const ActName& a : kActNames) s += std::string(s.empty() ? "" : ", ") + a.name;
      return s;
    };
    if (!attrs.contains("activation"))
      return Invalid(op, "attribute `activation` is missing (one of " + names() + ")");
    ffi::ErrorOr<std::string_view> name = attrs.get<std::string_view>("activation");
    if (name.has_error())
      return Invalid(op, "attribute `activation` must be a string: " + name.error().message());
    if (!ParseAct(*name, act))
      return Invalid(op, "attribute `activation` must be one of " + names() + ", got '" +
                             std::string(*name) + "'");
  }
  for (std::string_view name : attrs) {
    bool known = name == "channels_first" || (act != nullptr && name == "activation");
    for (const Field& f : fields) known = known || name == f.name;
    if (!known) return Invalid(op, "unknown attribute `" + std::string(name) + "`");
  }
  return ffi::Error::Success();
}

// What an operand is; its shape follows from the problem.
enum class Role { kInput, kOutput, kKernel, kBias };  // x or dx; y, ct or g; w or dk; b or db

struct Operand {
  const char* name;
  Role role;
  bool float32 = false;  // float32 only (else bfloat16 too)
  int same_as = -1;      // the operand whose dtype it must have
};

struct Dims {
  size_t rank;
  int64_t v[5];
};

Dims Shape(const Geom& g, Role role) {
  switch (role) {
    case Role::kInput:
      if (g.cf) return {5, {g.n, g.c, g.d, g.h, g.w}};
      return {5, {g.n, g.d, g.h, g.w, g.c}};
    case Role::kOutput:
      if (g.cf) return {5, {g.n, g.c * g.m, g.od, g.oh, g.ow}};
      return {5, {g.n, g.od, g.oh, g.ow, g.c * g.m}};
    case Role::kBias:
      return {1, {g.c * g.m}};
    case Role::kKernel:
      break;
  }
  return {5, {g.kd, g.kh, g.kw, g.c, g.m}};
}

ffi::Error CheckOperand(const char* op, const Operand& operand, const Geom& g,
                        const ffi::AnyBuffer& buffer) {
  if (operand.float32 && buffer.element_type() != ffi::DataType::F32)
    return Invalid(op, std::string("`") + operand.name + "` must be float32");
  if (buffer.element_type() != ffi::DataType::F32 && buffer.element_type() != ffi::DataType::BF16)
    return Invalid(op, std::string("`") + operand.name + "` must be float32 or bfloat16");
  const Dims want = Shape(g, operand.role);
  const ffi::AnyBuffer::Dimensions dims = buffer.dimensions();
  if (!std::equal(want.v, want.v + want.rank, dims.begin(), dims.end()))
    return Invalid(op, std::string("`") + operand.name + "` has shape " +
                           Ints(dims.begin(), dims.size()) + ", the attributes give " +
                           Ints(want.v, want.rank));
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

template <typename T>
void LoadBias(const Geom& g, const T* b, float* out) {
  for (int64_t j = 0; j < g.c * g.m; ++j) out[j] = Pack<1>::Load(b + j);
}

template <typename T>
void StoreBias(const Geom& g, const float* in, T* b) {
  for (int64_t j = 0; j < g.c * g.m; ++j) Pack<1>::Store(b + j, in[j]);
}

// What an op's kernels get: the arrays (operands that are neither a kernel
// nor a bias, in order), the kernel and bias arguments as float32 (w, b) and
// float32 space for the kernel and bias results (dk, db), the activation.
struct Call {
  ffi::ThreadPool* pool;
  Geom g;
  Act act = Act::kNone;
  void* arrays[4] = {};
  const float* w = nullptr;
  const float* b = nullptr;
  float* dk = nullptr;
  float* db = nullptr;
};

// The ops: their name, operands (kArgs arguments, then the results), whether
// they take an activation, and the kernels they call with the first two
// arrays of types TA and TB.
struct Forward {
  static constexpr const char* kName = "dw5d_forward";
  static constexpr Operand kOperands[] = {
      {"x", Role::kInput}, {"w", Role::kKernel}, {"y", Role::kOutput}};
  static constexpr int kArgs = 2;
  static constexpr bool kActivation = false;
  template <typename TA, typename TB>
  static void Run(const Call& c) {
    RunForward(c.pool, c.g, static_cast<const TA*>(c.arrays[0]), c.w,
               static_cast<TB*>(c.arrays[1]));
  }
};

struct InputGrad {
  static constexpr const char* kName = "dw5d_input_grad";
  static constexpr Operand kOperands[] = {
      {"ct", Role::kOutput}, {"w", Role::kKernel}, {"dx", Role::kInput}};
  static constexpr int kArgs = 2;
  static constexpr bool kActivation = false;
  template <typename TA, typename TB>
  static void Run(const Call& c) {
    RunInputGrad(c.pool, c.g, static_cast<const TA*>(c.arrays[0]), c.w,
                 static_cast<TB*>(c.arrays[1]));
  }
};

struct KernelGrad {
  static constexpr const char* kName = "dw5d_kernel_grad";
  static constexpr Operand kOperands[] = {
      {"x", Role::kInput}, {"ct", Role::kOutput}, {"dk", Role::kKernel}};
  static constexpr int kArgs = 2;
  static constexpr bool kActivation = false;
  template <typename TA, typename TB>
  static void Run(const Call& c) {
    RunKernelGrad(c.pool, c.g, static_cast<const TA*>(c.arrays[0]),
                  static_cast<const TB*>(c.arrays[1]), c.dk);
  }
};

struct ForwardEpilogue {
  static constexpr const char* kName = "dw5d_forward_epilogue";
  static constexpr Operand kOperands[] = {
      {"x", Role::kInput}, {"w", Role::kKernel}, {"b", Role::kBias}, {"y", Role::kOutput}};
  static constexpr int kArgs = 3;
  static constexpr bool kActivation = true;
  template <typename TA, typename TB>
  static void Run(const Call& c) {
    RunForward(c.pool, c.g, static_cast<const TA*>(c.arrays[0]), c.w,
               static_cast<TB*>(c.arrays[1]), Epilogue{c.act, c.b});
  }
};

// act'(z) from z = conv(x, w) + b, recomputed.
struct EpilogueGradZ {
  static constexpr const char* kName = "dw5d_epilogue_grad";
  static constexpr Operand kOperands[] = {
      {"x", Role::kInput},   {"w", Role::kKernel},       {"b", Role::kBias},
      {"ct", Role::kOutput}, {"g", Role::kOutput, true}, {"dk", Role::kKernel},
      {"db", Role::kBias}};
  static constexpr int kArgs = 4;
  static constexpr bool kActivation = true;
  template <typename TA, typename TB>
  static void Run(const Call& c) {
    EpilogueGrad<TB> e;
    e.epilogue = Epilogue{c.act, c.b};
    e.w = c.w;
    e.g = static_cast<float*>(c.arrays[2]);
    e.db = c.db;
    RunKernelGrad(c.pool, c.g, static_cast<const TA*>(c.arrays[0]),
                  static_cast<const TB*>(c.arrays[1]), c.dk, e);
  }
};

// act'(z) from y = act(z).
struct EpilogueGradY {
  static constexpr const char* kName = "dw5d_epilogue_grad_y";
  static constexpr Operand kOperands[] = {
      {"x", Role::kInput},        {"y", Role::kOutput},  {"ct", Role::kOutput, false, 1},
      {"g", Role::kOutput, true}, {"dk", Role::kKernel}, {"db", Role::kBias}};
  static constexpr int kArgs = 3;
  static constexpr bool kActivation = true;
  template <typename TA, typename TB>
  static void Run(const Call& c) {
    EpilogueGrad<TB> e;
    e.epilogue.act = c.act;
    e.y = static_cast<const TB*>(c.arrays[1]);
    e.g = static_cast<float*>(c.arrays[3]);
    e.db = c.db;
    RunKernelGrad(c.pool, c.g, static_cast<const TA*>(c.arrays[0]),
                  static_cast<const TB*>(c.arrays[2]), c.dk, e);
  }
};

// No activation: g = ct, the kernel gradient and db in one pass.
struct BiasGrad {
  static constexpr const char* kName = "dw5d_bias_grad";
  static constexpr Operand kOperands[] = {
      {"x", Role::kInput}, {"ct", Role::kOutput}, {"dk", Role::kKernel}, {"db", Role::kBias}};
  static constexpr int kArgs = 2;
  static constexpr bool kActivation = false;
  template <typename TA, typename TB>
  static void Run(const Call& c) {
    EpilogueGrad<TB> e;
    e.db = c.db;
    RunKernelGrad(c.pool, c.g, static_cast<const TA*>(c.arrays[0]),
                  static_cast<const TB*>(c.arrays[1]), c.dk, e);
  }
};

template <typename Op>
ffi::Error Handle(ffi::ThreadPool pool, ffi::RemainingArgs args, ffi::RemainingRets rets,
                  ffi::Dictionary attrs) {
  constexpr int kCount = sizeof(Op::kOperands) / sizeof(Operand);
  Call c;
  c.pool = &pool;
  if (ffi::Error err = ParseGeom(Op::kName, attrs, &c.g, Op::kActivation ? &c.act : nullptr);
      err.failure())
    return err;
  if (args.size() != Op::kArgs || rets.size() != kCount - Op::kArgs)
    return Invalid(Op::kName, "takes " + std::to_string(Op::kArgs) + " arguments and returns " +
                                  std::to_string(kCount - Op::kArgs) + " results, got " +
                                  std::to_string(args.size()) + " and " +
                                  std::to_string(rets.size()));
  if constexpr (Op::kActivation) {
    if (Op::kOperands[1].role == Role::kOutput && !FromOutput(c.act))  // act'(z) from y
      return Invalid(Op::kName, "takes relu, relu6, sigmoid or tanh (act'(z) from y)");
  }
  std::optional<ffi::AnyBuffer> buffers[kCount];
  for (int i = 0; i < kCount; ++i) {
    if (i < Op::kArgs) {
      ffi::ErrorOr<ffi::AnyBuffer> b = args.get<ffi::AnyBuffer>(i);
      if (b.has_error()) return b.error();
      buffers[i].emplace(*b);
    } else {
      ffi::ErrorOr<ffi::Result<ffi::AnyBuffer>> b = rets.get<ffi::AnyBuffer>(i - Op::kArgs);
      if (b.has_error()) return b.error();
      buffers[i].emplace(**b);
    }
    const Operand& operand = Op::kOperands[i];
    if (ffi::Error err = CheckOperand(Op::kName, operand, c.g, *buffers[i]); err.failure())
      return err;
    if (operand.same_as >= 0 &&
        buffers[i]->element_type() != buffers[operand.same_as]->element_type())
      return Invalid(Op::kName, std::string("`") + operand.name + "` must have `" +
                                    Op::kOperands[operand.same_as].name + "`'s dtype");
  }
  // The kernel and bias operands as float32 (float32 ones read in place where
  // their layout is the kernels': a bias, a kernel with M = 1); float32 space
  // for the kernel and bias results; the arrays in order (the first two pick
  // the kernels' instantiation).
  const int64_t wsize = c.g.taps() * c.g.m * c.g.c, bsize = c.g.c * c.g.m;
  std::unique_ptr<float[]> w, b;  // converted copies
  std::vector<float> dk, db;
  int narrays = 0, first = -1, second = -1;
  for (int i = 0; i < kCount; ++i) {
    ffi::AnyBuffer& buf = *buffers[i];
    const Role role = Op::kOperands[i].role;
    const bool f32 = buf.element_type() == ffi::DataType::F32;
    if (role == Role::kKernel && i < Op::kArgs) {
      if (f32 && c.g.m == 1) {  // (KD, KH, KW, C, 1) is (KD, KH, KW, 1, C)
        c.w = static_cast<const float*>(buf.untyped_data());
      } else {
        w.reset(new float[wsize]);
        WithDtype(buf.element_type(), [&](auto t) {
          LoadKernel(c.g, static_cast<const decltype(t)*>(buf.untyped_data()), w.get());
        });
        c.w = w.get();
      }
    } else if (role == Role::kBias && i < Op::kArgs) {
      if (f32) {
        c.b = static_cast<const float*>(buf.untyped_data());
      } else {
        b.reset(new float[bsize]);
        LoadBias(c.g, static_cast<const bf16*>(buf.untyped_data()), b.get());
        c.b = b.get();
      }
    } else if (role == Role::kKernel) {
      dk.assign(wsize, 0.0f);
      c.dk = dk.data();
    } else if (role == Role::kBias) {
      db.assign(bsize, 0.0f);
      c.db = db.data();
    } else {
      if (first < 0) {
        first = i;
      } else if (second < 0) {
        second = i;
      }
      c.arrays[narrays++] = buf.untyped_data();
    }
  }
  WithDtype(buffers[first]->element_type(), [&](auto ta) {
    WithDtype(buffers[second]->element_type(), [&](auto tb) {
      Op::template Run<decltype(ta), decltype(tb)>(c);
    });
  });
  for (int i = Op::kArgs; i < kCount; ++i) {
    ffi::AnyBuffer& buf = *buffers[i];
    if (Op::kOperands[i].role == Role::kKernel)
      WithDtype(buf.element_type(), [&](auto t) {
        StoreKernel(c.g, dk.data(), static_cast<decltype(t)*>(buf.untyped_data()));
      });
    if (Op::kOperands[i].role == Role::kBias)
      WithDtype(buf.element_type(), [&](auto t) {
        StoreBias(c.g, db.data(), static_cast<decltype(t)*>(buf.untyped_data()));
      });
  }
  return ffi::Error::Success();
}

// dw5d_stream_step(ring, frame, w, head) -> (ring, y) (stream_step.h): the
// attributes are the window's convolution on the ring (channels-last; along
// D: in_spatial E, out_spatial 1, stride 1, no padding, E = (KD - 1) * RD + 1);
// `frame` is (N, 1, H, W, C) in the ring's dtype, `head` an int32 scalar in
// [0, E). The ring result aliases the ring argument (_native.stream_step):
// the frame is written into it in place.
ffi::Error HandleStreamStep(ffi::ThreadPool pool, ffi::AnyBuffer ring, ffi::AnyBuffer frame,
                            ffi::AnyBuffer w, ffi::BufferR0<ffi::DataType::S32> head,
                            ffi::Result<ffi::AnyBuffer> ring_out, ffi::Result<ffi::AnyBuffer> y,
                            ffi::Dictionary attrs) {
  constexpr const char* kName = "dw5d_stream_step";
  Geom g;
  if (ffi::Error err = ParseGeom(kName, attrs, &g, nullptr); err.failure()) return err;
  if (g.cf || g.od != 1 || g.sd != 1 || g.pd != 0 || (g.kd - 1) * g.rd + 1 != g.d)
    return Invalid(kName, "takes one channels-last window along D: out_spatial[0] 1, "
                          "strides[0] 1, padding_low[0] 0, in_spatial[0] (window[0] - 1) * "
                          "dilations[0] + 1");
  Geom one = g;  // the frame's shape
  one.d = 1;
  const struct {
    const Operand operand;
    const Geom* geom;
    ffi::AnyBuffer buffer;
  } operands[] = {{{"ring", Role::kInput}, &g, ring},    {{"frame", Role::kInput}, &one, frame},
                  {{"w", Role::kKernel}, &g, w},         {{"ring", Role::kInput}, &g, *ring_out},
                  {{"y", Role::kOutput}, &g, *y}};
  for (const auto& o : operands)
    if (ffi::Error err = CheckOperand(kName, o.operand, *o.geom, o.buffer); err.failure())
      return err;
  if (frame.element_type() != ring.element_type() ||
      ring_out->element_type() != ring.element_type())
    return Invalid(kName, "`frame` and the ring result must have the ring's dtype");
  const int64_t h = *head.typed_data();
  if (h < 0 || h >= g.d)
    return Invalid(kName, "`head` must be in [0, " + std::to_string(g.d) + "), got " +
                              std::to_string(h));
  if (ring_out->untyped_data() != ring.untyped_data())  // not aliased: the ring copied first
    std::copy_n(static_cast<const char*>(ring.untyped_data()), ring.size_bytes(),
                static_cast<char*>(ring_out->untyped_data()));
  std::vector<float> wf(g.taps() * g.m * g.c);
  WithDtype(w.element_type(), [&](auto t) {
    LoadKernel(g, static_cast<const decltype(t)*>(w.untyped_data()), wf.data());
  });
  WithDtype(ring.element_type(), [&](auto ta) {
    WithDtype(y->element_type(), [&](auto tb) {
      using TI = decltype(ta);
      RunStreamStep(&pool, g, static_cast<const TI*>(frame.untyped_data()), h, wf.data(),
                    static_cast<TI*>(ring_out->untyped_data()),
                    static_cast<decltype(tb)*>(y->untyped_data()));
    });
  });
  return ffi::Error::Success();
}

auto Binding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .RemainingArgs()
      .RemainingRets()
      .Attrs<ffi::Dictionary>();
}

}  // namespace
}  // namespace dw5d

XLA_FFI_DEFINE_HANDLER_SYMBOL(Dw5dForward, dw5d::Handle<dw5d::Forward>, dw5d::Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(Dw5dInputGrad, dw5d::Handle<dw5d::InputGrad>, dw5d::Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(Dw5dKernelGrad, dw5d::Handle<dw5d::KernelGrad>, dw5d::Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(Dw5dForwardEpilogue, dw5d::Handle<dw5d::ForwardEpilogue>,
                              dw5d::Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(Dw5dEpilogueGrad, dw5d::Handle<dw5d::EpilogueGradZ>,
                              dw5d::Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(Dw5dEpilogueGradY, dw5d::Handle<dw5d::EpilogueGradY>,
                              dw5d::Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(Dw5dBiasGrad, dw5d::Handle<dw5d::BiasGrad>, dw5d::Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(Dw5dStreamStep, dw5d::HandleStreamStep,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::BufferR0<xla::ffi::DataType::S32>>()
                                  .Ret<xla::ffi::AnyBuffer>()
                                  .Ret<xla::ffi::AnyBuffer>()
                                  .Attrs<xla::ffi::Dictionary>());
