#include "run_input.hpp"

#include <cctype>
#include <vector>

#include "cli_args.hpp"

namespace omnimoe::tool {
namespace {

constexpr std::int64_t kMaxExtent = std::int64_t{1} << 31;  // the library's limit on every extent

std::string shape_str(const std::vector<std::int64_t>& s) {
  std::string r = "[";
  for (std::size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

std::int64_t metadata_int(const std::map<std::string, std::string>& md, const std::string& key) {
  auto it = md.find(key);
  if (it == md.end()) fail("metadata: '" + key + "' is required (a positive integer)");
  auto v = parse_decimal(it->second);
  if (!v || *v < 1 || *v >= kMaxExtent)
    fail("metadata " + key + " = '" + it->second + "': expected a positive decimal integer below 2^31");
  return *v;
}

// A word from `parse` (a config.hpp parser), or `fallback` when the key is absent.
template <class E, class Parse>
E metadata_word(const std::map<std::string, std::string>& md, const std::string& key, Parse parse, E fallback,
                const char* choices) {
  auto it = md.find(key);
  if (it == md.end()) return fallback;
  auto v = parse(it->second);
  if (!v) fail("metadata " + key + " = '" + it->second + "': expected " + choices);
  return *v;
}

Config config_from_metadata(const std::map<std::string, std::string>& md) {
  Config c;
  c.top_k = metadata_int(md, "top_k");
  c.grid_rows = metadata_int(md, "grid_rows");
  c.grid_cols = metadata_int(md, "grid_cols");
  c.router_norm = metadata_word(md, "router_norm", parse_router_norm, RouterNorm::batchnorm, "batchnorm or none");
  c.gate = metadata_word(md, "gate", parse_gate, GateKind::exp, "exp or softmax");
  c.activation = metadata_word(md, "activation", parse_activation, Activation::silu, "silu, gelu or relu");
  if (c.grid_rows * c.grid_cols >= kMaxExtent) fail("metadata: grid_rows * grid_cols must be below 2^31");
  if (c.top_k > c.num_experts())
    fail("metadata top_k = " + std::to_string(c.top_k) + " exceeds N = grid_rows * grid_cols = " +
         std::to_string(c.num_experts()));
  return c;
}

io::StTensor& need(io::StFile& f, const std::string& name, const std::string& why) {
  io::StTensor* t = f.find(name);
  if (t == nullptr) fail("missing tensor '" + name + "'" + why);
  return *t;
}

// `t` must have exactly `shape`; `letters` spells it ("[grid_rows, H]") for the message.
void expect_shape(const io::StTensor& t, const std::vector<std::int64_t>& shape, const char* letters) {
  if (t.shape != shape)
    fail(t.name + ": shape " + shape_str(t.shape) + ", expected " + letters + " = " + shape_str(shape));
}

void expect_dtype(const io::StTensor& t, DType dtype, const char* why) {
  if (t.dtype != dtype)
    fail(t.name + ": dtype " + st_dtype_name(t.dtype) + ", expected " + st_dtype_name(dtype) + " " + why);
}

}  // namespace

std::string st_dtype_name(DType d) {
  std::string s = dtype_name(d);
  for (char& ch : s) ch = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
  return s;
}

RunInput load_run_input(io::StFile& file, Device device, Mode mode, bool backward) {
  const Config meta = config_from_metadata(file.metadata);

  io::StTensor& x = need(file, "x", " (the input activations [T, H])");
  if (x.shape.size() != 2 || !dtype_is_float(x.dtype) || x.shape[0] < 1 || x.shape[1] < 1 ||
      x.shape[0] >= kMaxExtent || x.shape[1] >= kMaxExtent)
    fail("x: expected a float tensor [T, H] with 1 <= T, H < 2^31, got " + shape_str(x.shape) + " " +
         st_dtype_name(x.dtype));
  const DType dt = x.dtype;
  const std::int64_t T = x.shape[0], H = x.shape[1], Nr = meta.grid_rows, Nc = meta.grid_cols;
  if (device == Device::cuda && dt == DType::f64)
    fail("--device cuda: F64 tensors are not supported on CUDA (use --device cpu, or F32/BF16/F16 tensors)");
  if (meta.router_norm == RouterNorm::batchnorm && mode == Mode::training && T < 2)
    fail("x: --train with router_norm = batchnorm needs at least 2 tokens (T = 1)");

  // The shared branch is all of gate, up and down, or none of them; I comes from gate.
  const char* trio = " (gate, up and down come together: all three for the shared MLP, or none)";
  const bool shared = file.find("gate") || file.find("up") || file.find("down");
  std::int64_t I = 0;
  if (shared) {
    io::StTensor& gate = need(file, "gate", trio);
    if (gate.shape.size() != 2 || gate.shape[0] < 1 || gate.shape[0] >= kMaxExtent)
      fail("gate: shape " + shape_str(gate.shape) + ", expected [I, H] with 1 <= I < 2^31 and H = " +
           std::to_string(H));
    I = gate.shape[0];
  }
  Config cfg = meta;
  cfg.hidden = H;
  cfg.intermediate = I;
  throw_if_error(validate(cfg));

  const std::int64_t N = cfg.num_experts();
  const char* none = "";
  const char* stat_why = " (router_norm = batchnorm needs the running statistics)";
  struct Want {
    const char* name;
    Tensor LayerTensors::*dst;
    std::vector<std::int64_t> shape;
    const char* letters;
    const char* why_needed;
  };
  std::vector<Want> params = {{"router_row", &LayerTensors::router_row, {Nr, H}, "[grid_rows, H]", none},
                              {"router_col", &LayerTensors::router_col, {Nc, H}, "[grid_cols, H]", none},
                              {"expert_in", &LayerTensors::expert_in, {N, H}, "[N, H]", none},
                              {"expert_out", &LayerTensors::expert_out, {N, H}, "[N, H]", none}};
  if (shared) {
    params.push_back({"gate", &LayerTensors::gate, {I, H}, "[I, H]", trio});
    params.push_back({"up", &LayerTensors::up, {I, H}, "[I, H]", trio});
    params.push_back({"down", &LayerTensors::down, {H, I}, "[H, I]", trio});
  }
  std::vector<Want> stats;
  if (cfg.router_norm == RouterNorm::batchnorm)
    stats = {{"running_mean_row", &LayerTensors::running_mean_row, {Nr}, "[grid_rows]", stat_why},
             {"running_var_row", &LayerTensors::running_var_row, {Nr}, "[grid_rows]", stat_why},
             {"running_mean_col", &LayerTensors::running_mean_col, {Nc}, "[grid_cols]", stat_why},
             {"running_var_col", &LayerTensors::running_var_col, {Nc}, "[grid_cols]", stat_why}};

  // Check everything before staging anything: a bad file fails fast and allocates nothing.
  for (const Want& w : params) {
    const io::StTensor& t = need(file, w.name, w.why_needed);
    expect_shape(t, w.shape, w.letters);
    expect_dtype(t, dt, "(x and every parameter share one dtype)");
  }
  for (const Want& w : stats) {
    const io::StTensor& t = need(file, w.name, w.why_needed);
    expect_shape(t, w.shape, w.letters);
    if (!dtype_is_float(t.dtype)) fail(t.name + ": dtype " + st_dtype_name(t.dtype) + ", expected a float dtype");
  }
  io::StTensor* grad_y = nullptr;
  if (backward) {
    grad_y = &need(file, "grad_y", " (--backward needs the output gradient [T, H])");
    expect_shape(*grad_y, {T, H}, "[T, H]");
    expect_dtype(*grad_y, dt, "(the dtype of x)");
  }

  RunInput in;
  LayerTensors& l = in.layer;
  l.cfg = cfg;
  l.dtype = dt;
  l.device = device;
  l.tokens = T;
  auto stage = [&](io::StTensor& t, DType want) {
    in.file_dtype[t.name] = t.dtype;
    return convert_tensor(t.view(), want, device);
  };
  for (const Want& w : params) l.*w.dst = stage(*file.find(w.name), dt);
  for (const Want& w : stats) l.*w.dst = stage(*file.find(w.name), accumulation_dtype(dt));
  if (grad_y) l.grad_y = stage(*grad_y, dt);
  l.x.push_back(stage(x, dt));
  return in;
}

}  // namespace omnimoe::tool
