// omnimoe bench --suite paper (bench_paper.hpp): every layer of DESIGN.md section 3 at its
// points of the K sweep (T = T0) and of the T sweep (smallest K), forward only, inference,
// routing included ("router") and, for the routed layers, excluded ("random ids": uniform
// random distinct ids and random gates through forward_routed, as the paper's harness timed
// them). docs/benchmarks.md says what is timed and how parameters and memory are counted.
#include "bench_paper.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <functional>
#include <numeric>
#include <random>
#include <vector>

#include "bench_device.hpp"
#include "layer_tensors.hpp"
#include "omnimoe/baselines.hpp"
#include "omnimoe/device.hpp"
#include "table.hpp"
#include "tensors.hpp"

namespace omnimoe::tool {
namespace {

using i64 = std::int64_t;
namespace bl = omnimoe::baselines;

// ---- the suite -------------------------------------------------------------------------------

// Sizes of one run: the paper's on cuda, reduced on cpu.
struct Sizes {
  i64 H;
  i64 T0;                   // tokens of the K sweep
  std::vector<i64> tokens;  // the T sweep (T0 first)
  i64 gshard_n, gshard_w;
  std::vector<i64> gshard_k;
  i64 ds_n, ds_w, ds_shared;
  std::vector<i64> ds_k;
  i64 pkm_side;
  std::vector<i64> pkm_k;
  i64 peer_side;
  std::vector<i64> peer_k;
  i64 omni_side, omni_i;
  std::vector<i64> omni_k;
  i64 dense_round;  // dense widths are multiples of this
};

// DESIGN.md section 3 (the paper's efficiency table, H = 1024, about 200M parameters each).
Sizes paper_sizes() {
  return {1024, 1024, {1024, 2048, 4096, 8192, 16384},
          128,  512,  {2, 4, 8, 16},
          256,  256,  1024, {4, 8, 16, 32},
          444,  {2500, 5000, 12500, 25000},
          320,  {1250, 2500, 6250, 12500},
          320,  1024, {512, 1024, 2048, 4096},
          64};
}

// The CPU variant: H and T divided by 4; the coarse layers keep N and K with expert widths
// divided by 16, the product-key layers and OmniMoE divide N and K by 16 (grid sides by 4),
// shared widths divide by 16: total and per-token expert parameters all shrink by 64.
Sizes cpu_sizes() {
  return {256, 256, {256, 512, 1024, 2048, 4096},
          128, 32,  {2, 4, 8, 16},
          256, 16,  64, {4, 8, 16, 32},
          111, {156, 312, 781, 1562},
          80,  {78, 156, 390, 781},
          80,  64,  {32, 64, 128, 256},
          16};
}

// One point of the figure.
struct Point {
  std::string layer;  // dense, gshard, deepseekmoe, pkm, peer, omnimoe
  // In the activated-parameter sweep at T0 ("k"), the token sweep at the smallest K ("t"),
  // or both ("k t").
  bool in_k_sweep = false, in_t_sweep = false;
  i64 T = 0;
  bool omni = false;
  bl::BaselineConfig base;  // the baselines
  Config cfg;               // OmniMoE

  i64 K() const { return omni ? cfg.top_k : base.top_k; }
  std::string name() const {
    if (!omni && base.kind == bl::Kind::dense) return layer + "-i" + std::to_string(base.width) + "-t" + std::to_string(T);
    return layer + "-k" + std::to_string(K()) + "-t" + std::to_string(T);
  }
  // Counted as for the baselines (BaselineConfig::activated_params): the router weights read
  // for every token, the K chosen experts' two vectors, the shared SwiGLU.
  double activated() const {
    if (!omni) return base.activated_params();
    const double H = static_cast<double>(cfg.hidden);
    return static_cast<double>(cfg.grid_rows + cfg.grid_cols) * H + static_cast<double>(cfg.top_k) * 2 * H +
           3 * H * static_cast<double>(cfg.intermediate);
  }
  double total() const {
    if (!omni) return base.total_params();
    const double H = static_cast<double>(cfg.hidden);
    return static_cast<double>(cfg.grid_rows + cfg.grid_cols) * H + static_cast<double>(cfg.num_experts()) * 2 * H +
           3 * H * static_cast<double>(cfg.intermediate);
  }
};

Config omni_config(const Sizes& s, i64 K) {
  Config c;
  c.hidden = s.H;
  c.intermediate = s.omni_i;
  c.grid_rows = c.grid_cols = s.omni_side;
  c.top_k = K;
  return c;
}

std::vector<Point> build_points(const Sizes& s) {
  std::vector<Point> pts;
  // Each layer: its K sweep at T0, then its T sweep at the smallest K.
  auto sweep = [&](const std::string& layer, const std::vector<i64>& ks, const std::function<Point(i64 K)>& make) {
    for (i64 K : ks) {
      Point p = make(K);
      p.layer = layer;
      p.T = s.T0;
      p.in_k_sweep = true;
      p.in_t_sweep = K == ks.front();
      pts.push_back(p);
    }
    for (i64 T : s.tokens) {
      if (T == s.T0) continue;
      Point p = make(ks.front());
      p.layer = layer;
      p.T = T;
      p.in_t_sweep = true;
      pts.push_back(p);
    }
  };
  auto baseline = [&](bl::Kind kind, i64 width, i64 n, i64 rows, i64 cols, i64 shared) {
    return [=](i64 K) {
      Point p;
      p.base.kind = kind;
      p.base.hidden = s.H;
      p.base.width = width;
      p.base.num_experts = n;
      p.base.grid_rows = rows;
      p.base.grid_cols = cols;
      p.base.top_k = K;
      p.base.shared_width = shared;
      return p;
    };
  };
  sweep("omnimoe", s.omni_k, [&](i64 K) {
    Point p;
    p.omni = true;
    p.cfg = omni_config(s, K);
    return p;
  });
  // The dense SwiGLU has OmniMoE's activated parameters at each K (width rounded).
  std::vector<i64> widths;
  for (i64 K : s.omni_k) {
    Point o;
    o.omni = true;
    o.cfg = omni_config(s, K);
    const double w = o.activated() / (3.0 * static_cast<double>(s.H)) / static_cast<double>(s.dense_round);
    widths.push_back(std::max<i64>(1, std::llround(w)) * s.dense_round);
  }
  sweep("dense", widths, [&](i64 I) { return baseline(bl::Kind::dense, I, 0, 0, 0, 0)(0); });
  sweep("gshard", s.gshard_k, baseline(bl::Kind::gshard, s.gshard_w, s.gshard_n, 0, 0, 0));
  sweep("deepseekmoe", s.ds_k, baseline(bl::Kind::deepseekmoe, s.ds_w, s.ds_n, 0, 0, s.ds_shared));
  sweep("pkm", s.pkm_k, baseline(bl::Kind::pkm, 0, s.pkm_side * s.pkm_side, s.pkm_side, s.pkm_side, 0));
  sweep("peer", s.peer_k, baseline(bl::Kind::peer, 0, s.peer_side * s.peer_side, s.peer_side, s.peer_side, 0));
  return pts;
}

// ---- tensors ---------------------------------------------------------------------------------

Tensor random_tensor(DType dt, Device dev, std::vector<i64> shape, std::uint64_t seed, double fan_in) {
  Tensor t(dt, dev, shape);
  const double a = std::sqrt(3.0 / fan_in);  // variance 1 / fan_in
  fill_uniform(t.view(), seed, -a, a);
  return t;
}

// A baseline's parameters. They do not depend on K, so the points of one layer share them.
struct BaselineTensors {
  bl::BaselineConfig cfg;
  Tensor gate, up, down, router, expert_gate, expert_up, expert_down, query, keys_row, keys_col, values, expert_in,
      expert_out;
  std::size_t measured = 0;  // device memory they took (cuda)

  bl::BaselineParams params() const {
    return {gate.view(),     up.view(),       down.view(),     router.view(), expert_gate.view(),
            expert_up.view(), expert_down.view(), query.view(), keys_row.view(), keys_col.view(),
            values.view(),   expert_in.view(), expert_out.view()};
  }
  std::size_t bytes() const {
    std::size_t b = 0;
    for (const Tensor* t : {&gate, &up, &down, &router, &expert_gate, &expert_up, &expert_down, &query, &keys_row,
                            &keys_col, &values, &expert_in, &expert_out})
      if (t->defined()) b += t->view().bytes();
    return b;
  }
  // Same tensors for another point? (everything but K)
  bool serves(const bl::BaselineConfig& c) const {
    return c.kind == cfg.kind && c.hidden == cfg.hidden && c.width == cfg.width && c.num_experts == cfg.num_experts &&
           c.grid_rows == cfg.grid_rows && c.grid_cols == cfg.grid_cols && c.shared_width == cfg.shared_width;
  }
};

// Device memory in use now (cuda; 0 on cpu), through the peak tracker of omnimoe/device.hpp.
std::size_t in_use(Device d) {
  reset_peak_memory(d);
  return peak_memory_bytes(d);
}

BaselineTensors make_baseline(const bl::BaselineConfig& c, DType dt, Device dev, std::uint64_t seed) {
  const std::size_t before = in_use(dev);
  BaselineTensors b;
  b.cfg = c;
  const i64 H = c.hidden, W = c.width, N = c.num_experts, S = c.shared_width;
  const double h = static_cast<double>(H);
  std::uint64_t s = seed * 64;
  auto swiglu = [&](i64 width) {
    b.gate = random_tensor(dt, dev, {width, H}, ++s, h);
    b.up = random_tensor(dt, dev, {width, H}, ++s, h);
    b.down = random_tensor(dt, dev, {H, width}, ++s, static_cast<double>(width));
  };
  switch (c.kind) {
    case bl::Kind::dense:
      swiglu(W);
      break;
    case bl::Kind::gshard:
    case bl::Kind::deepseekmoe:
      b.router = random_tensor(dt, dev, {N, H}, ++s, h);
      b.expert_gate = random_tensor(dt, dev, {N * W, H}, ++s, h);
      b.expert_up = random_tensor(dt, dev, {N * W, H}, ++s, h);
      b.expert_down = random_tensor(dt, dev, {N * H, W}, ++s, static_cast<double>(W));
      if (c.kind == bl::Kind::deepseekmoe && S > 0) swiglu(S);
      break;
    case bl::Kind::pkm:
    case bl::Kind::peer:
      b.query = random_tensor(dt, dev, {H, H}, ++s, h);
      b.keys_row = random_tensor(dt, dev, {c.grid_rows, H / 2}, ++s, h / 2);
      b.keys_col = random_tensor(dt, dev, {c.grid_cols, H / 2}, ++s, h / 2);
      if (c.kind == bl::Kind::pkm) {
        b.values = random_tensor(dt, dev, {N, H}, ++s, h);
      } else {
        b.expert_in = random_tensor(dt, dev, {N, H}, ++s, h);
        b.expert_out = random_tensor(dt, dev, {N, H}, ++s, h);
      }
      break;
  }
  b.measured = in_use(dev) - before;
  return b;
}

// Uniform random distinct ids per token (a partial Fisher-Yates shuffle per token: O(K))
// and gates in (0.01, 1), of `gate_dtype` (f32, or f64 for an f64 OmniMoE layer).
struct UniformRouting {
  Tensor ids, gates;
};
UniformRouting uniform_routing(i64 T, i64 K, i64 N, DType gate_dtype, Device dev, std::uint64_t seed) {
  Tensor ids(DType::i32, Device::cpu, {T, K}), gates(gate_dtype, Device::cpu, {T, K});
  std::vector<std::int32_t> perm(static_cast<std::size_t>(N));
  std::iota(perm.begin(), perm.end(), 0);
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> g(0.01, 1.0);
  auto* id = ids.view().as<std::int32_t>();
  for (i64 t = 0; t < T; ++t)
    for (i64 k = 0; k < K; ++k) {
      const i64 j = k + static_cast<i64>(rng() % static_cast<std::uint64_t>(N - k));
      std::swap(perm[k], perm[j]);
      id[t * K + k] = perm[k];
      if (gate_dtype == DType::f64) gates.view().as<double>()[t * K + k] = g(rng);
      else gates.view().as<float>()[t * K + k] = static_cast<float>(g(rng));
    }
  if (dev == Device::cpu) return {std::move(ids), std::move(gates)};
  return {convert_tensor(ids.view(), DType::i32, dev), convert_tensor(gates.view(), gate_dtype, dev)};
}

// ---- timing ----------------------------------------------------------------------------------

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

struct Measure {
  double ms = 0, min_ms = 0, eager_ms = 0;
  std::size_t peak_in_use = 0;  // device memory in use at the peak of the eager calls (cuda)
};

// `call(set, stream)` runs the layer on input set `set`. Eager calls first (CUDA events; the
// device memory in use is sampled after each), then on cuda one captured graph per input set,
// replayed round-robin: the median of the replays is the reported time.
Measure time_point(Device dev, std::size_t sets, const std::function<Status(std::size_t, void*)>& call, int warmup,
                   int reps) {
  Measure m;
  std::size_t next = 0;
  std::vector<double> eager, ms;
  throw_if_error(time_calls(dev, [&] { return call(next++ % sets, nullptr); }, warmup, reps, &eager));
  m.peak_in_use = peak_memory_bytes(dev);
  if (dev == Device::cuda) {
    std::vector<std::function<Status(void*)>> calls;
    for (std::size_t i = 0; i < sets; ++i) calls.push_back([&, i](void* st) { return call(i, st); });
    throw_if_error(time_graph_replays(dev, calls, warmup, reps, &ms));
  } else {
    ms = eager;
  }
  m.ms = median(ms);
  m.min_ms = *std::min_element(ms.begin(), ms.end());
  m.eager_ms = median(eager);
  return m;
}

// What one series of one point allocated besides the weights, and what it measured.
struct Footprint {
  std::size_t weights = 0;    // parameters (and OmniMoE's running statistics)
  std::size_t io = 0;         // one x set, y, and the routing tensors the call reads or writes
  std::size_t workspace = 0;  // the layer's workspace
  std::size_t extra_sets = 0; // further x sets that only rotate the input out of cache
  std::size_t measured = 0;   // cuda: device memory growth at the peak, extra sets removed
};

std::size_t growth(std::size_t after, std::size_t before) { return after > before ? after - before : 0; }

std::string today() {
  const std::time_t now = std::time(nullptr);
  char buf[16];
  std::strftime(buf, sizeof buf, "%Y-%m-%d", std::localtime(&now));
  return buf;
}

std::string csv_safe(std::string s) {
  std::replace(s.begin(), s.end(), ',', ';');
  return s;
}

class Runner {
 public:
  Runner(const PaperBenchOptions& o, int warmup, int reps)
      : o_(o), warmup_(warmup), reps_(reps), device_(csv_safe(device_description(o.device))), date_(today()),
        table_({"point", "layer", "sweep", "routing", "device", "dtype", "T", "H", "K", "N", "width", "shared width",
                "activated params", "total params", "ms", "min ms", "eager ms", "weights MB", "peak MB", "extra MB",
                "workspace MB", "measured MB", "date", "note", "schedule"}) {}

  void run(const Point& p, std::size_t index, std::size_t count) {
    const std::vector<std::string> series =
        (!p.omni && p.base.kind == bl::Kind::dense) ? std::vector<std::string>{"dense"}
                                                      : std::vector<std::string>{"router", "random ids"};
    for (const std::string& routing : series) {
      Measure m;
      Footprint f;
      std::string note;
      try {
        if (p.omni) run_omnimoe(p, routing == "random ids", index, &m, &f);
        else run_baseline(p, routing == "random ids", index, &m, &f);
      } catch (const Error& e) {
        note = csv_safe(e.what());
      }
      add_row(p, routing, m, f, note);
      if (note.empty())
        std::fprintf(stderr, "[%zu/%zu] %s (%s): %.3f ms (min %.3f), peak %.1f MB\n", index + 1, count,
                     p.name().c_str(), routing.c_str(), m.ms, m.min_ms,
                     static_cast<double>(f.weights + f.io + f.workspace) / (1 << 20));
      else
        std::fprintf(stderr, "[%zu/%zu] %s (%s): FAILED %s\n", index + 1, count, p.name().c_str(), routing.c_str(),
                     note.c_str());
    }
  }

  void finish() {
    table_.print(stdout);
    if (o_.csv) table_.write_csv(*o_.csv);
  }

 private:
  void run_baseline(const Point& p, bool random_ids, std::size_t index, Measure* m, Footprint* f) {
    if (!tensors_.serves(p.base)) {
      tensors_ = BaselineTensors{};  // free the previous layer's weights first
      tensors_ = make_baseline(p.base, o_.dtype, o_.device, 1000 + index);
    }
    const Device dev = o_.device;
    const DType dt = o_.dtype;
    const i64 T = p.T, H = p.base.hidden, K = p.base.top_k;
    const std::size_t x_bytes = static_cast<std::size_t>(T * H) * dtype_size(dt);
    const std::size_t base = in_use(dev);
    const auto sets = static_cast<std::size_t>(input_sets(dev, static_cast<i64>(x_bytes)));
    std::vector<Tensor> xs;
    for (std::size_t i = 0; i < sets; ++i) xs.push_back(random_tensor(dt, dev, {T, H}, 7000 + 31 * index + i, 1.0));
    Tensor y(dt, dev, {T, H});
    std::size_t ws_bytes = 0;
    throw_if_error(bl::workspace_size(p.base, T, dt, dev, &ws_bytes));
    Buffer ws(dev, ws_bytes);
    UniformRouting r;
    if (random_ids) r = uniform_routing(T, K, p.base.num_experts, DType::f32, dev, 9000 + index);
    const bl::BaselineParams params = tensors_.params();
    *m = time_point(
        dev, sets,
        [&](std::size_t set, void* stream) {
          if (random_ids)
            return bl::forward_routed(p.base, xs[set].view(), params, r.ids.view(), r.gates.view(), y.view(),
                                      as_workspace(ws), stream);
          return bl::forward(p.base, xs[set].view(), params, y.view(), as_workspace(ws), stream);
        },
        warmup_, reps_);
    f->weights = tensors_.bytes();
    f->io = 2 * x_bytes + (random_ids ? r.ids.view().bytes() + r.gates.view().bytes() : 0);
    f->workspace = ws_bytes;
    f->extra_sets = (sets - 1) * x_bytes;
    if (dev == Device::cuda) f->measured = growth(tensors_.measured + m->peak_in_use, base + f->extra_sets);
  }

  void run_omnimoe(const Point& p, bool random_ids, std::size_t index, Measure* m, Footprint* f) {
    tensors_ = BaselineTensors{};  // a baseline's weights are not needed any more
    const Device dev = o_.device;
    const DType dt = o_.dtype;
    const i64 T = p.T, H = p.cfg.hidden, K = p.cfg.top_k;
    const std::size_t x_bytes = static_cast<std::size_t>(T * H) * dtype_size(dt);
    const std::size_t base = in_use(dev);
    const auto sets = static_cast<std::size_t>(input_sets(dev, static_cast<i64>(x_bytes)));
    const LayerTensors l = random_layer(p.cfg, T, dt, dev, 500 + index, static_cast<int>(sets));
    Tensor y(dt, dev, {T, H}), ids(DType::i32, dev, {T, K});
    // The router series writes i32 ids, so its forward keeps the routing there (no copy in
    // the workspace); forward_routed validates a copy of the given ids.
    const Buffer ws = workspace(l, /*backward=*/false, random_ids ? DType::i64 : DType::i32);
    UniformRouting r;
    if (random_ids) r = uniform_routing(T, K, p.cfg.num_experts(), accumulation_dtype(dt), dev, 9000 + index);
    const Params params = l.params();
    *m = time_point(
        dev, sets,
        [&](std::size_t set, void* stream) {
          const TensorView& x = l.x[set].view();
          if (random_ids)
            return forward_routed(p.cfg, x, params, r.ids.view(), r.gates.view(), y.view(), as_workspace(ws), stream);
          // Only the required outputs: y and the expert ids (scores and gates are optional).
          return forward(p.cfg, Mode::inference, x, params, {y.view(), ids.view(), {}, {}}, as_workspace(ws), stream);
        },
        warmup_, reps_);
    for (const LayerMember& member : kLayerMembers)
      if ((l.*member.tensor).defined()) f->weights += (l.*member.tensor).view().bytes();
    f->io = 2 * x_bytes + (random_ids ? r.ids.view().bytes() + r.gates.view().bytes() : ids.view().bytes());
    f->workspace = ws.bytes();
    f->extra_sets = (sets - 1) * x_bytes;
    if (dev == Device::cuda) f->measured = growth(m->peak_in_use, base + f->extra_sets);
  }

  void add_row(const Point& p, const std::string& routing, const Measure& m, const Footprint& f,
               const std::string& note) {
    const bool dense = !p.omni && p.base.kind == bl::Kind::dense;
    const double mb = 1 << 20;
    const std::size_t peak = f.weights + f.io + f.workspace;
    auto num = [&](const char* fmt, double v) { return note.empty() ? strfmt(fmt, v) : std::string(); };
    std::string width, shared, n;
    if (p.omni) {
      shared = std::to_string(p.cfg.intermediate);
      n = std::to_string(p.cfg.num_experts());
    } else {
      width = std::to_string(p.base.width);
      if (p.base.kind == bl::Kind::deepseekmoe) shared = std::to_string(p.base.shared_width);
      if (!dense) n = std::to_string(p.base.num_experts);
    }
    if (p.base.kind == bl::Kind::pkm || p.base.kind == bl::Kind::peer) width.clear();
    const std::string sweep = p.in_k_sweep ? (p.in_t_sweep ? "k t" : "k") : "t";
    table_.add({p.name(), p.layer, sweep, routing, device_, dtype_name(o_.dtype), std::to_string(p.T),
                std::to_string(p.omni ? p.cfg.hidden : p.base.hidden), dense ? "" : std::to_string(p.K()), n, width,
                shared, strfmt("%.0f", p.activated()), strfmt("%.0f", p.total()), num("%.3f", m.ms),
                num("%.3f", m.min_ms), num("%.3f", m.eager_ms), num("%.1f", f.weights / mb), num("%.1f", peak / mb),
                num("%.1f", (peak - f.weights) / mb), num("%.1f", f.workspace / mb),
                o_.device == Device::cuda ? num("%.1f", static_cast<double>(f.measured) / mb) : "", date_, note,
                p.omni ? name(p.cfg.schedule) : ""});
  }

  PaperBenchOptions o_;
  int warmup_, reps_;
  std::string device_, date_;
  Table table_;
  BaselineTensors tensors_;
};

}  // namespace

int bench_paper(const PaperBenchOptions& o) {
  const bool cpu = o.device == Device::cpu;
  const int reps = o.reps > 0 ? o.reps : (cpu ? 3 : 50);
  const int warmup = cpu ? 1 : 5;
  const Sizes sizes = cpu ? cpu_sizes() : paper_sizes();
  std::vector<Point> points = build_points(sizes);
  for (Point& p : points) p.cfg.schedule = o.schedule;
  if (!o.only.empty())
    points.erase(std::remove_if(points.begin(), points.end(),
                                [&](const Point& p) { return p.name().find(o.only) == std::string::npos; }),
                 points.end());
  std::fprintf(stderr, "omnimoe bench: suite paper (%s sizes), %s, %s, %d reps, %zu points, schedule %s\n",
               cpu ? "reduced cpu" : "DESIGN.md section 3", device_description(o.device).c_str(),
               dtype_name(o.dtype), reps, points.size(), name(o.schedule));
  Runner runner(o, warmup, reps);
  for (std::size_t i = 0; i < points.size(); ++i) runner.run(points[i], i, points.size());
  runner.finish();
  return 0;
}

}  // namespace omnimoe::tool
