// Public entry points of the baseline layers (include/omnimoe/baselines.hpp): config checks,
// parameter counts, argument validation (shapes, dtypes, devices, workspace), then dispatch
// to the per-kind functions of kinds.hpp. Every failure names the argument.
#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

#include "baselines/kinds.hpp"
#include "core/validate.hpp"

namespace omnimoe::baselines {

const char* name(Kind k) {
  switch (k) {
    case Kind::dense: return "dense";
    case Kind::gshard: return "gshard";
    case Kind::deepseekmoe: return "deepseekmoe";
    case Kind::pkm: return "pkm";
    case Kind::peer: return "peer";
  }
  return "?";
}

namespace {

using i64 = std::int64_t;
// Largest extent: products of two extents stay inside int64, row indices inside int32.
constexpr i64 kMaxExtent = i64{1} << 31;

bool known(Kind k) {
  return k == Kind::dense || k == Kind::gshard || k == Kind::deepseekmoe || k == Kind::pkm || k == Kind::peer;
}

std::string shape_str(std::initializer_list<i64> s) {
  std::string r = "[";
  bool first = true;
  for (auto v : s) {
    r += (first ? "" : ", ") + std::to_string(v);
    first = false;
  }
  return r + "]";
}

// `name` present with exactly `shape`, `dtype` and `device`.
Status expect(const std::string& name, const TensorView& t, std::initializer_list<i64> shape, DType dtype,
              Device device) {
  const std::string want = shape_str(shape) + " " + dtype_name(dtype) + " " + device_name(device);
  if (!t.defined()) return invalid_argument(name + ": required, expected " + want);
  bool ok = t.rank == static_cast<int>(shape.size()) && t.dtype == dtype && t.device == device;
  int i = 0;
  for (auto s : shape) ok = ok && t.shape[i++] == s;
  if (!ok) return invalid_argument(name + ": expected " + want + ", got " + describe(t));
  return Status::Ok();
}

// ---- parameters by kind ------------------------------------------------------------------

struct ParamSlot {
  const char* name;
  TensorView BaselineParams::*member;
};
constexpr ParamSlot kSlots[] = {
    {"params.gate", &BaselineParams::gate},           {"params.up", &BaselineParams::up},
    {"params.down", &BaselineParams::down},           {"params.router", &BaselineParams::router},
    {"params.expert_gate", &BaselineParams::expert_gate}, {"params.expert_up", &BaselineParams::expert_up},
    {"params.expert_down", &BaselineParams::expert_down}, {"params.query", &BaselineParams::query},
    {"params.keys_row", &BaselineParams::keys_row},   {"params.keys_col", &BaselineParams::keys_col},
    {"params.values", &BaselineParams::values},       {"params.expert_in", &BaselineParams::expert_in},
    {"params.expert_out", &BaselineParams::expert_out},
};

struct Expected {
  TensorView BaselineParams::*member;
  i64 rows, cols;
};

// The parameters kind `c.kind` uses, with their shapes.
std::vector<Expected> expected_params(const BaselineConfig& c) {
  const i64 H = c.hidden, W = c.width, N = c.num_experts, S = c.shared_width;
  using P = BaselineParams;
  std::vector<Expected> e;
  switch (c.kind) {
    case Kind::dense:
      e = {{&P::gate, W, H}, {&P::up, W, H}, {&P::down, H, W}};
      break;
    case Kind::gshard:
    case Kind::deepseekmoe:
      e = {{&P::router, N, H}, {&P::expert_gate, N * W, H}, {&P::expert_up, N * W, H}, {&P::expert_down, N * H, W}};
      if (c.kind == Kind::deepseekmoe && S > 0) {
        e.push_back({&P::gate, S, H});
        e.push_back({&P::up, S, H});
        e.push_back({&P::down, H, S});
      }
      break;
    case Kind::pkm:
    case Kind::peer:
      e = {{&P::query, H, H}, {&P::keys_row, c.grid_rows, H / 2}, {&P::keys_col, c.grid_cols, H / 2}};
      if (c.kind == Kind::pkm) {
        e.push_back({&P::values, N, H});
      } else {
        e.push_back({&P::expert_in, N, H});
        e.push_back({&P::expert_out, N, H});
      }
      break;
  }
  return e;
}

Status validate_params(const BaselineConfig& c, const BaselineParams& p, DType dt, Device dev) {
  const std::vector<Expected> used = expected_params(c);
  for (const ParamSlot& slot : kSlots) {
    const Expected* want = nullptr;
    for (const Expected& e : used)
      if (e.member == slot.member) want = &e;
    const TensorView& t = p.*(slot.member);
    if (want != nullptr) {
      OMNIMOE_RETURN_IF_ERROR(expect(slot.name, t, {want->rows, want->cols}, dt, dev));
    } else if (t.defined()) {
      std::string why = std::string(slot.name) + ": must be absent for kind " + name(c.kind);
      if (c.kind == Kind::deepseekmoe && c.shared_width == 0) why += " with shared_width = 0";
      return invalid_argument(why + " (unused parameter), got " + describe(t));
    }
  }
  return Status::Ok();
}

// ---- activations, routing, workspace -----------------------------------------------------

Status check_tokens(i64 tokens) {
  if (tokens < 1 || tokens >= kMaxExtent) return invalid_argument("tokens: must be in [1, 2^31), got " + std::to_string(tokens));
  return Status::Ok();
}

// dtype and device of a layer: float; CUDA serves f32, bf16 and f16.
Status check_dtype_device(DType dtype, Device device, const char* what) {
  if (!dtype_is_float(dtype))
    return invalid_argument(std::string(what) + ": " + dtype_name(dtype) + " is not a float dtype");
  if (device == Device::cuda && dtype == DType::f64)
    return {StatusCode::unsupported, std::string(what) + ": f64 is not supported on cuda (f32, bf16, f16); it runs on the cpu"};
  return Status::Ok();
}

Status expect_x(const BaselineConfig& c, const TensorView& x) {
  if (!x.defined()) return invalid_argument("x: required");
  if (x.rank != 2 || x.shape[1] != c.hidden || x.shape[0] < 1 || !dtype_is_float(x.dtype))
    return invalid_argument("x: expected [T >= 1, H=" + std::to_string(c.hidden) + "] of a float dtype, got " +
                            describe(x));
  OMNIMOE_RETURN_IF_ERROR(check_tokens(x.shape[0]));
  return check_dtype_device(x.dtype, x.device, "x");
}

// Everything but the routing tensors, shared by forward and forward_routed.
Status validate_common(const BaselineConfig& c, const TensorView& x, const BaselineParams& p, const TensorView& y,
                       const Workspace& ws) {
  OMNIMOE_RETURN_IF_ERROR(validate(c));
  OMNIMOE_RETURN_IF_ERROR(expect_x(c, x));
  const DType dt = x.dtype;
  const Device dev = x.device;
  OMNIMOE_RETURN_IF_ERROR(validate_params(c, p, dt, dev));
  OMNIMOE_RETURN_IF_ERROR(expect("y", y, {x.shape[0], c.hidden}, dt, dev));
  std::size_t need = 0;
  OMNIMOE_RETURN_IF_ERROR(workspace_size(c, x.shape[0], dt, dev, &need));
  return validate_workspace(ws, need);
}

Status dispatch_forward(const ForwardArgs& a) {
  switch (a.cfg->kind) {
    case Kind::dense: return dense_forward(a);
    case Kind::gshard:
    case Kind::deepseekmoe: return gshard_forward(a);
    case Kind::pkm:
    case Kind::peer: return pkm_forward(a);
  }
  return {StatusCode::internal, "baselines: unknown kind"};
}

}  // namespace

// ---- config --------------------------------------------------------------------------------

Status validate(const BaselineConfig& c) {
  if (!known(c.kind)) return invalid_argument("config.kind: unknown value " + std::to_string(static_cast<int>(c.kind)));
  const std::string kind = name(c.kind);
  auto bad = [&](const char* field, i64 v, const std::string& why) {
    return invalid_argument("config." + std::string(field) + " = " + std::to_string(v) + ": " + why + " (kind " +
                            kind + ")");
  };
  auto in_range = [](i64 v, i64 lo) { return v >= lo && v < kMaxExtent; };
  auto unused = [&](const char* field, i64 v) -> Status {
    if (v != 0) return bad(field, v, "unused by this kind, must be 0");
    return Status::Ok();
  };
  if (!in_range(c.hidden, 1)) return bad("hidden", c.hidden, "must be in [1, 2^31)");
  switch (c.kind) {
    case Kind::dense:
      if (!in_range(c.width, 1)) return bad("width", c.width, "must be in [1, 2^31) (the SwiGLU width I)");
      OMNIMOE_RETURN_IF_ERROR(unused("num_experts", c.num_experts));
      OMNIMOE_RETURN_IF_ERROR(unused("grid_rows", c.grid_rows));
      OMNIMOE_RETURN_IF_ERROR(unused("grid_cols", c.grid_cols));
      OMNIMOE_RETURN_IF_ERROR(unused("top_k", c.top_k));
      OMNIMOE_RETURN_IF_ERROR(unused("shared_width", c.shared_width));
      break;
    case Kind::gshard:
    case Kind::deepseekmoe:
      if (!in_range(c.width, 1)) return bad("width", c.width, "must be in [1, 2^31) (the expert width d_ffn)");
      if (!in_range(c.num_experts, 1)) return bad("num_experts", c.num_experts, "must be in [1, 2^31)");
      // Stacked expert tensors have N * width and N * H rows.
      if (c.num_experts * c.width >= kMaxExtent || c.num_experts * c.hidden >= kMaxExtent)
        return bad("num_experts", c.num_experts,
                   "num_experts * width and num_experts * hidden (rows of the stacked expert tensors) must be below 2^31");
      if (c.top_k < 1 || c.top_k > c.num_experts)
        return bad("top_k", c.top_k, "must be in [1, N = " + std::to_string(c.num_experts) + "]");
      OMNIMOE_RETURN_IF_ERROR(unused("grid_rows", c.grid_rows));
      OMNIMOE_RETURN_IF_ERROR(unused("grid_cols", c.grid_cols));
      if (c.kind == Kind::gshard) {
        OMNIMOE_RETURN_IF_ERROR(unused("shared_width", c.shared_width));
      } else if (!in_range(c.shared_width, 0)) {
        return bad("shared_width", c.shared_width, "must be in [0, 2^31) (0: no shared expert)");
      }
      break;
    case Kind::pkm:
    case Kind::peer:
      if (c.hidden % 2 != 0) return bad("hidden", c.hidden, "must be even (the query splits into two halves)");
      if (!in_range(c.grid_rows, 1)) return bad("grid_rows", c.grid_rows, "must be in [1, 2^31)");
      if (!in_range(c.grid_cols, 1)) return bad("grid_cols", c.grid_cols, "must be in [1, 2^31)");
      if (c.grid_rows * c.grid_cols >= kMaxExtent)
        return bad("grid_rows", c.grid_rows,
                   "grid_rows * grid_cols = " + std::to_string(c.grid_rows * c.grid_cols) + " must be below 2^31");
      if (c.num_experts != c.grid_rows * c.grid_cols)
        return bad("num_experts", c.num_experts,
                   "must equal grid_rows * grid_cols = " + std::to_string(c.grid_rows * c.grid_cols));
      if (c.top_k < 1 || c.top_k > c.num_experts)
        return bad("top_k", c.top_k, "must be in [1, N = " + std::to_string(c.num_experts) + "]");
      OMNIMOE_RETURN_IF_ERROR(unused("width", c.width));
      OMNIMOE_RETURN_IF_ERROR(unused("shared_width", c.shared_width));
      break;
  }
  return Status::Ok();
}

// Counted per token (docs/benchmarks.md): weights that enter a multiply-accumulate for
// every token (router, query, all sub-keys, shared SwiGLU) plus the K chosen experts' weights.
double BaselineConfig::activated_params() const {
  const double H = static_cast<double>(hidden), W = static_cast<double>(width), N = static_cast<double>(num_experts);
  const double K = static_cast<double>(top_k), S = static_cast<double>(shared_width);
  const double keys = static_cast<double>(grid_rows + grid_cols) * H / 2;
  switch (kind) {
    case Kind::dense: return 3 * H * W;
    case Kind::gshard: return N * H + K * 3 * H * W;
    case Kind::deepseekmoe: return N * H + K * 3 * H * W + 3 * H * S;
    case Kind::pkm: return H * H + keys + K * H;
    case Kind::peer: return H * H + keys + K * 2 * H;
  }
  return 0;
}

double BaselineConfig::total_params() const {
  const double H = static_cast<double>(hidden), W = static_cast<double>(width), N = static_cast<double>(num_experts);
  const double S = static_cast<double>(shared_width);
  const double keys = static_cast<double>(grid_rows + grid_cols) * H / 2;
  switch (kind) {
    case Kind::dense: return 3 * H * W;
    case Kind::gshard: return N * H + N * 3 * H * W;
    case Kind::deepseekmoe: return N * H + N * 3 * H * W + 3 * H * S;
    case Kind::pkm: return H * H + keys + N * H;
    case Kind::peer: return H * H + keys + N * 2 * H;
  }
  return 0;
}

// ---- entry points --------------------------------------------------------------------------

Status workspace_size(const BaselineConfig& cfg, std::int64_t tokens, DType dtype, Device device,
                      std::size_t* bytes) {
  if (bytes == nullptr) return invalid_argument("bytes: must not be null");
  OMNIMOE_RETURN_IF_ERROR(validate(cfg));
  OMNIMOE_RETURN_IF_ERROR(check_tokens(tokens));
  OMNIMOE_RETURN_IF_ERROR(check_dtype_device(dtype, device, "dtype"));
  switch (cfg.kind) {
    case Kind::dense: return dense_workspace_size(cfg, tokens, dtype, device, bytes);
    case Kind::gshard:
    case Kind::deepseekmoe: return gshard_workspace_size(cfg, tokens, dtype, device, bytes);
    case Kind::pkm:
    case Kind::peer: return pkm_workspace_size(cfg, tokens, dtype, device, bytes);
  }
  return {StatusCode::internal, "baselines: unknown kind"};
}

Status forward(const BaselineConfig& cfg, const TensorView& x, const BaselineParams& params, const TensorView& y,
               Workspace ws, void* stream, const TensorView& expert_ids) {
  OMNIMOE_RETURN_IF_ERROR(validate_common(cfg, x, params, y, ws));
  if (expert_ids.defined()) {
    if (cfg.kind == Kind::dense)
      return invalid_argument("expert_ids: must be absent for kind dense (it has no routing), got " +
                              describe(expert_ids));
    OMNIMOE_RETURN_IF_ERROR(expect("expert_ids", expert_ids, {x.shape[0], cfg.top_k}, DType::i32, x.device));
  }
  const ForwardArgs a{&cfg, x, &params, {}, {}, expert_ids, y, ws, stream};
  return dispatch_forward(a);
}

Status forward_routed(const BaselineConfig& cfg, const TensorView& x, const BaselineParams& params,
                      const TensorView& expert_ids, const TensorView& gates, const TensorView& y, Workspace ws,
                      void* stream) {
  OMNIMOE_RETURN_IF_ERROR(validate(cfg));
  if (cfg.kind == Kind::dense)
    return invalid_argument("forward_routed: kind dense has no routing; call forward");
  OMNIMOE_RETURN_IF_ERROR(validate_common(cfg, x, params, y, ws));
  const i64 T = x.shape[0], K = cfg.top_k;
  OMNIMOE_RETURN_IF_ERROR(expect("expert_ids", expert_ids, {T, K}, DType::i32, x.device));
  OMNIMOE_RETURN_IF_ERROR(expect("gates", gates, {T, K}, DType::f32, x.device));
  const ForwardArgs a{&cfg, x, &params, expert_ids, gates, {}, y, ws, stream};
  return dispatch_forward(a);
}

}  // namespace omnimoe::baselines
