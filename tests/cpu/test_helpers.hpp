// Helpers for the CPU layer tests: host tensors of any dtype, seeded random problems, NaN
// poison, views for the public API, workspaces, error norms. Uses the public API only.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "cpu/naive_reference.hpp"
#include "omnimoe/omnimoe.hpp"

namespace omt {

using namespace omnimoe;

// ---- half-precision storage (independent of src/core/half.hpp) --------------------------

inline std::uint16_t bf16_bits(double v) {  // round to nearest even through float
  float f = static_cast<float>(v);
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((u >> 16) | 0x40u);
  const std::uint32_t lsb = (u >> 16) & 1u;
  return static_cast<std::uint16_t>((u + 0x7fffu + lsb) >> 16);
}
inline double bf16_value(std::uint16_t b) {
  const std::uint32_t u = std::uint32_t{b} << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline std::uint16_t f16_bits(double v) {
  const _Float16 h = static_cast<_Float16>(static_cast<float>(v));
  std::uint16_t b;
  std::memcpy(&b, &h, 2);
  return b;
}
inline double f16_value(std::uint16_t b) {
  _Float16 h;
  std::memcpy(&h, &b, 2);
  return static_cast<double>(static_cast<float>(h));
}

// ---- host tensor -------------------------------------------------------------------------

// Owns host memory of one dtype; element access through double. Default-constructed: absent.
class HostTensor {
 public:
  HostTensor() = default;
  HostTensor(DType dt, std::vector<std::int64_t> shape) : dtype_(dt), shape_(std::move(shape)) {
    std::int64_t n = 1;
    for (auto s : shape_) n *= s;
    numel_ = n;
    buf_.assign((static_cast<std::size_t>(n) * dtype_size(dt) + 7) / 8 + 1, 0);  // +1: never empty
  }

  bool defined() const { return !buf_.empty(); }
  DType dtype() const { return dtype_; }
  std::int64_t numel() const { return numel_; }
  const std::vector<std::int64_t>& shape() const { return shape_; }
  void* data() { return buf_.data(); }
  const void* data() const { return buf_.data(); }
  std::size_t bytes() const { return static_cast<std::size_t>(numel_) * dtype_size(dtype_); }

  TensorView view() const {
    TensorView v;
    if (!defined()) return v;
    v.data = const_cast<std::uint64_t*>(buf_.data());
    v.dtype = dtype_;
    v.device = Device::cpu;
    v.rank = static_cast<int>(shape_.size());
    for (int i = 0; i < v.rank; ++i) v.shape[i] = shape_[i];
    return v;
  }

  double get(std::int64_t i) const {
    const auto* p = reinterpret_cast<const unsigned char*>(buf_.data());
    switch (dtype_) {
      case DType::f64: { double v; std::memcpy(&v, p + 8 * i, 8); return v; }
      case DType::f32: { float v; std::memcpy(&v, p + 4 * i, 4); return v; }
      case DType::f16: { std::uint16_t b; std::memcpy(&b, p + 2 * i, 2); return f16_value(b); }
      case DType::bf16: { std::uint16_t b; std::memcpy(&b, p + 2 * i, 2); return bf16_value(b); }
      case DType::i32: { std::int32_t v; std::memcpy(&v, p + 4 * i, 4); return v; }
      case DType::i64: { std::int64_t v; std::memcpy(&v, p + 8 * i, 8); return static_cast<double>(v); }
    }
    return std::nan("");
  }
  std::int64_t get_int(std::int64_t i) const {
    const auto* p = reinterpret_cast<const unsigned char*>(buf_.data());
    if (dtype_ == DType::i32) { std::int32_t v; std::memcpy(&v, p + 4 * i, 4); return v; }
    std::int64_t v;
    std::memcpy(&v, p + 8 * i, 8);
    return v;
  }
  void set(std::int64_t i, double v) {
    auto* p = reinterpret_cast<unsigned char*>(buf_.data());
    switch (dtype_) {
      case DType::f64: std::memcpy(p + 8 * i, &v, 8); return;
      case DType::f32: { float f = static_cast<float>(v); std::memcpy(p + 4 * i, &f, 4); return; }
      case DType::f16: { auto b = f16_bits(v); std::memcpy(p + 2 * i, &b, 2); return; }
      case DType::bf16: { auto b = bf16_bits(v); std::memcpy(p + 2 * i, &b, 2); return; }
      case DType::i32: { auto n = static_cast<std::int32_t>(v); std::memcpy(p + 4 * i, &n, 4); return; }
      case DType::i64: { auto n = static_cast<std::int64_t>(v); std::memcpy(p + 8 * i, &n, 8); return; }
    }
  }

  std::vector<double> to_f64() const {
    std::vector<double> r(static_cast<std::size_t>(numel_));
    for (std::int64_t i = 0; i < numel_; ++i) r[i] = get(i);
    return r;
  }
  std::vector<std::int64_t> to_i64() const {
    std::vector<std::int64_t> r(static_cast<std::size_t>(numel_));
    for (std::int64_t i = 0; i < numel_; ++i) r[i] = get_int(i);
    return r;
  }
  void from_f64(const std::vector<double>& v) {
    for (std::int64_t i = 0; i < numel_; ++i) set(i, v[i]);
  }
  void from_i64(const std::vector<std::int64_t>& v) {
    for (std::int64_t i = 0; i < numel_; ++i) set(i, static_cast<double>(v[i]));
  }

  // 0xFF bytes: NaN in every float dtype, -1 in every int dtype.
  void poison() {
    if (defined()) std::memset(buf_.data(), 0xFF, bytes());
  }
  bool bitwise_equal(const HostTensor& o) const {
    return dtype_ == o.dtype_ && numel_ == o.numel_ && std::memcmp(data(), o.data(), bytes()) == 0;
  }
  // Number of non-finite elements (floats only).
  std::int64_t count_nonfinite() const {
    std::int64_t n = 0;
    for (std::int64_t i = 0; i < numel_; ++i) n += std::isfinite(get(i)) ? 0 : 1;
    return n;
  }

 private:
  DType dtype_ = DType::f32;
  std::vector<std::int64_t> shape_;
  std::int64_t numel_ = 0;
  std::vector<std::uint64_t> buf_;
};

// ---- seeds and random fill ---------------------------------------------------------------

// A seed unique to the running test (FNV-1a of its full name) mixed with `salt`; the env var
// OMNIMOE_TEST_SEED, when set, is mixed in too, to explore other draws.
inline std::uint64_t test_seed(std::uint64_t salt = 0) {
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  std::string name = info ? std::string(info->test_suite_name()) + "." + info->name() : "none";
  std::uint64_t h = 1469598103934665603ull;
  for (unsigned char c : name) h = (h ^ c) * 1099511628211ull;
  if (const char* e = std::getenv("OMNIMOE_TEST_SEED")) h ^= std::strtoull(e, nullptr, 10) * 0x9E3779B97F4A7C15ull;
  return h ^ (salt * 0xD1B54A32D192ED03ull + 0x632BE59BD9B4E019ull);
}

// Normal(0, scale) values, resampled until |v| >= 1e-3 * scale (never zero).
inline void fill_normal(HostTensor& t, std::mt19937_64& rng, double scale) {
  std::normal_distribution<double> d(0.0, scale);
  for (std::int64_t i = 0; i < t.numel(); ++i) {
    double v;
    do v = d(rng); while (std::abs(v) < 1e-3 * scale);
    t.set(i, v);
  }
}
inline void fill_uniform(HostTensor& t, std::mt19937_64& rng, double lo, double hi) {
  std::uniform_real_distribution<double> d(lo, hi);
  for (std::int64_t i = 0; i < t.numel(); ++i) t.set(i, d(rng));
}

// ---- a whole problem: config, x, parameters ----------------------------------------------

struct Problem {
  Config cfg;
  std::int64_t T = 0;
  DType dtype = DType::f64;
  HostTensor x, router_row, router_col, expert_in, expert_out, gate, up, down;
  HostTensor running_mean_row, running_var_row, running_mean_col, running_var_col;

  Params params() const {
    Params p;
    p.router_row = router_row.view();
    p.router_col = router_col.view();
    p.expert_in = expert_in.view();
    p.expert_out = expert_out.view();
    p.gate = gate.view();
    p.up = up.view();
    p.down = down.view();
    p.running_mean_row = running_mean_row.view();
    p.running_var_row = running_var_row.view();
    p.running_mean_col = running_mean_col.view();
    p.running_var_col = running_var_col.view();
    return p;
  }
  // The stored values (after rounding to the storage dtype) as float64.
  naive::Weights weights() const {
    naive::Weights w;
    w.router_row = router_row.to_f64();
    w.router_col = router_col.to_f64();
    w.expert_in = expert_in.to_f64();
    w.expert_out = expert_out.to_f64();
    if (gate.defined()) {
      w.gate = gate.to_f64();
      w.up = up.to_f64();
      w.down = down.to_f64();
    }
    if (running_mean_row.defined()) {
      w.running_mean_row = running_mean_row.to_f64();
      w.running_var_row = running_var_row.to_f64();
      w.running_mean_col = running_mean_col.to_f64();
      w.running_var_col = running_var_col.to_f64();
    }
    return w;
  }
  std::vector<double> x64() const { return x.to_f64(); }
  // Every floating input tensor, for loops (x first, then the trainable parameters).
  std::vector<HostTensor*> trainable() { return {&x, &router_row, &router_col, &expert_in, &expert_out, &gate, &up, &down}; }
};

inline const char* const kTrainableNames[] = {"x", "router_row", "router_col", "expert_in", "expert_out",
                                              "gate", "up", "down"};

// Random problem; tensors of `dtype` (running statistics in the accumulation dtype).
// Running statistics are present iff the config uses batchnorm.
inline Problem make_problem(const Config& cfg, std::int64_t T, DType dtype, std::uint64_t seed,
                            double router_scale = 1.0) {
  Problem p;
  p.cfg = cfg;
  p.T = T;
  p.dtype = dtype;
  const std::int64_t H = cfg.hidden, I = cfg.intermediate, Nr = cfg.grid_rows, Nc = cfg.grid_cols;
  const std::int64_t N = cfg.num_experts();
  const DType acc = accumulation_dtype(dtype);
  std::mt19937_64 rng(seed);
  const double sh = 1.0 / std::sqrt(static_cast<double>(H));
  p.x = HostTensor(dtype, {T, H});
  fill_normal(p.x, rng, 1.0);
  p.router_row = HostTensor(dtype, {Nr, H});
  fill_normal(p.router_row, rng, router_scale * sh);
  p.router_col = HostTensor(dtype, {Nc, H});
  fill_normal(p.router_col, rng, router_scale * sh);
  p.expert_in = HostTensor(dtype, {N, H});
  fill_normal(p.expert_in, rng, sh);
  p.expert_out = HostTensor(dtype, {N, H});
  fill_normal(p.expert_out, rng, 1.0);
  if (I > 0) {
    p.gate = HostTensor(dtype, {I, H});
    fill_normal(p.gate, rng, sh);
    p.up = HostTensor(dtype, {I, H});
    fill_normal(p.up, rng, sh);
    p.down = HostTensor(dtype, {H, I});
    fill_normal(p.down, rng, 1.0 / std::sqrt(static_cast<double>(I)));
  }
  if (cfg.router_norm == RouterNorm::batchnorm) {
    p.running_mean_row = HostTensor(acc, {Nr});
    fill_normal(p.running_mean_row, rng, 0.3);
    p.running_var_row = HostTensor(acc, {Nr});
    fill_uniform(p.running_var_row, rng, 0.5, 2.0);
    p.running_mean_col = HostTensor(acc, {Nc});
    fill_normal(p.running_mean_col, rng, 0.3);
    p.running_var_col = HostTensor(acc, {Nc});
    fill_uniform(p.running_var_col, rng, 0.5, 2.0);
  }
  return p;
}

// Same values, converted to another storage dtype (running statistics to its accumulation dtype).
inline Problem convert_problem(const Problem& src, DType dtype) {
  Problem p = src;
  p.dtype = dtype;
  auto conv = [](const HostTensor& t, DType dt) {
    if (!t.defined()) return HostTensor();
    HostTensor r(dt, t.shape());
    r.from_f64(t.to_f64());
    return r;
  };
  p.x = conv(src.x, dtype);
  p.router_row = conv(src.router_row, dtype);
  p.router_col = conv(src.router_col, dtype);
  p.expert_in = conv(src.expert_in, dtype);
  p.expert_out = conv(src.expert_out, dtype);
  p.gate = conv(src.gate, dtype);
  p.up = conv(src.up, dtype);
  p.down = conv(src.down, dtype);
  const DType acc = accumulation_dtype(dtype);
  p.running_mean_row = conv(src.running_mean_row, acc);
  p.running_var_row = conv(src.running_var_row, acc);
  p.running_mean_col = conv(src.running_mean_col, acc);
  p.running_var_col = conv(src.running_var_col, acc);
  return p;
}

// ---- outputs, gradients, workspace -------------------------------------------------------

struct Outputs {
  HostTensor y, ids, scores, gates;
  ForwardOutputs view() const {
    ForwardOutputs o;
    o.y = y.view();
    o.expert_ids = ids.view();
    o.scores = scores.view();
    o.gates = gates.view();
    return o;
  }
  void poison() {
    y.poison();
    ids.poison();
    scores.poison();
    gates.poison();
  }
};

inline Outputs make_outputs(const Config& cfg, std::int64_t T, DType dtype, DType id_dtype = DType::i64,
                            bool with_scores = true, bool with_gates = true) {
  Outputs o;
  const DType acc = accumulation_dtype(dtype);
  o.y = HostTensor(dtype, {T, cfg.hidden});
  o.ids = HostTensor(id_dtype, {T, cfg.top_k});
  if (with_scores) o.scores = HostTensor(acc, {T, cfg.top_k});
  if (with_gates) o.gates = HostTensor(acc, {T, cfg.top_k});
  o.poison();
  return o;
}

struct Grads {
  HostTensor x, router_row, router_col, expert_in, expert_out, gate, up, down;
  Gradients view() const {
    Gradients g;
    g.x = x.view();
    g.router_row = router_row.view();
    g.router_col = router_col.view();
    g.expert_in = expert_in.view();
    g.expert_out = expert_out.view();
    g.gate = gate.view();
    g.up = up.view();
    g.down = down.view();
    return g;
  }
  std::vector<HostTensor*> all() { return {&x, &router_row, &router_col, &expert_in, &expert_out, &gate, &up, &down}; }
  std::vector<const HostTensor*> all() const {
    return {&x, &router_row, &router_col, &expert_in, &expert_out, &gate, &up, &down};
  }
  void poison() {
    for (auto* t : all()) t->poison();
  }
};

inline Grads make_grads(const Config& cfg, std::int64_t T, DType dtype) {
  Grads g;
  const std::int64_t H = cfg.hidden, I = cfg.intermediate;
  g.x = HostTensor(dtype, {T, H});
  g.router_row = HostTensor(dtype, {cfg.grid_rows, H});
  g.router_col = HostTensor(dtype, {cfg.grid_cols, H});
  g.expert_in = HostTensor(dtype, {cfg.num_experts(), H});
  g.expert_out = HostTensor(dtype, {cfg.num_experts(), H});
  if (I > 0) {
    g.gate = HostTensor(dtype, {I, H});
    g.up = HostTensor(dtype, {I, H});
    g.down = HostTensor(dtype, {H, I});
  }
  g.poison();
  return g;
}

// 256-byte aligned host workspace, poisoned with 0xFF on creation (the layer must not rely on
// its contents).
class HostWorkspace {
 public:
  explicit HostWorkspace(std::size_t bytes) : bytes_(bytes) {
    const std::size_t alloc = (std::max<std::size_t>(bytes, 1) + 255) / 256 * 256;
    mem_.reset(static_cast<unsigned char*>(std::aligned_alloc(256, alloc)));
    std::memset(mem_.get(), 0xFF, alloc);
  }
  Workspace ws() const { return Workspace{mem_.get(), bytes_}; }
  // A view of the same memory claiming `bytes` (for the too-small checks).
  Workspace ws(std::size_t bytes) const { return Workspace{mem_.get(), bytes}; }
  std::size_t bytes() const { return bytes_; }
  void poison() { std::memset(mem_.get(), 0xFF, bytes_); }

 private:
  struct Free {
    void operator()(unsigned char* p) const { std::free(p); }
  };
  std::unique_ptr<unsigned char, Free> mem_;
  std::size_t bytes_ = 0;
};

inline HostWorkspace forward_workspace(const Config& cfg, std::int64_t T, DType dtype) {
  std::size_t bytes = 0;
  const Status s = forward_workspace_size(cfg, T, dtype, Device::cpu, &bytes);
  EXPECT_TRUE(s.ok()) << s.message();
  return HostWorkspace(bytes);
}
inline HostWorkspace backward_workspace(const Config& cfg, std::int64_t T, DType dtype) {
  std::size_t bytes = 0;
  const Status s = backward_workspace_size(cfg, T, dtype, Device::cpu, &bytes);
  EXPECT_TRUE(s.ok()) << s.message();
  return HostWorkspace(bytes);
}

// Runs the library forward into `out` (poisoned first) with a fresh poisoned workspace.
inline Status run_forward(const Problem& p, Mode mode, Outputs& out) {
  out.poison();
  HostWorkspace ws = forward_workspace(p.cfg, p.T, p.dtype);
  return forward(p.cfg, mode, p.x.view(), p.params(), out.view(), ws.ws());
}

inline Status run_backward(const Problem& p, Mode mode, const HostTensor& ids, const HostTensor& grad_y, Grads& g) {
  g.poison();
  HostWorkspace ws = backward_workspace(p.cfg, p.T, p.dtype);
  return backward(p.cfg, mode, p.x.view(), p.params(), ids.view(), grad_y.view(), g.view(), ws.ws());
}

// ---- comparisons -------------------------------------------------------------------------

// ||a - b|| / ||b|| (2-norms); a NaN anywhere gives NaN (which fails every `<` check).
inline double rel_error(const std::vector<double>& a, const std::vector<double>& b) {
  if (a.size() != b.size()) return std::numeric_limits<double>::quiet_NaN();
  double num = 0.0, den = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    num += (a[i] - b[i]) * (a[i] - b[i]);
    den += b[i] * b[i];
  }
  if (den == 0.0) return std::sqrt(num);
  return std::sqrt(num / den);
}
inline double max_abs_diff(const std::vector<double>& a, const std::vector<double>& b) {
  if (a.size() != b.size()) return std::numeric_limits<double>::quiet_NaN();
  double m = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double d = std::abs(a[i] - b[i]);
    if (!(d <= m)) m = d;  // propagates NaN
  }
  return m;
}

// Short description of a config for failure messages.
inline std::string describe(const Config& c, std::int64_t T) {
  return "T=" + std::to_string(T) + " H=" + std::to_string(c.hidden) + " I=" + std::to_string(c.intermediate) +
         " grid=" + std::to_string(c.grid_rows) + "x" + std::to_string(c.grid_cols) + " K=" + std::to_string(c.top_k) +
         " norm=" + name(c.router_norm) + " gate=" + name(c.gate) + " act=" + name(c.activation);
}

inline Config make_config(std::int64_t H, std::int64_t I, std::int64_t Nr, std::int64_t Nc, std::int64_t K,
                          RouterNorm norm = RouterNorm::batchnorm, GateKind gate = GateKind::exp,
                          Activation act = Activation::silu) {
  Config c;
  c.hidden = H;
  c.intermediate = I;
  c.grid_rows = Nr;
  c.grid_cols = Nc;
  c.top_k = K;
  c.router_norm = norm;
  c.gate = gate;
  c.activation = act;
  return c;
}

// The three router-norm settings that matter: batchnorm in training, batchnorm in inference, none.
enum class NormMode { bn_training, bn_inference, none };
inline RouterNorm norm_of(NormMode m) { return m == NormMode::none ? RouterNorm::none : RouterNorm::batchnorm; }
inline Mode mode_of(NormMode m) { return m == NormMode::bn_training ? Mode::training : Mode::inference; }
inline const char* name(NormMode m) {
  switch (m) {
    case NormMode::bn_training: return "bn_training";
    case NormMode::bn_inference: return "bn_inference";
    case NormMode::none: return "none";
  }
  return "?";
}

// Smallest gap between consecutive fully-sorted reference scores among positions
// [0, min(K, N-1)] of token t: the selection (and its order) is well defined when it is
// large compared with the arithmetic error.
inline double min_gap_top(const naive::ForwardResult& r, std::int64_t N, std::int64_t K, std::int64_t t) {
  double g = std::numeric_limits<double>::infinity();
  const std::int64_t last = std::min(K, N - 1);
  for (std::int64_t k = 0; k < last; ++k) {
    const double a = r.all_scores[t * N + r.order[t * N + k]];
    const double b = r.all_scores[t * N + r.order[t * N + k + 1]];
    g = std::min(g, a - b);
  }
  return g;
}
// Gap between the K-th and (K+1)-th reference scores (infinite when K = N).
inline double boundary_gap(const naive::ForwardResult& r, std::int64_t N, std::int64_t K, std::int64_t t) {
  if (K >= N) return std::numeric_limits<double>::infinity();
  return r.all_scores[t * N + r.order[t * N + K - 1]] - r.all_scores[t * N + r.order[t * N + K]];
}

}  // namespace omt
