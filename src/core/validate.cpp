#include "core/validate.hpp"

#include <cstdint>
#include <string>
#include <vector>

namespace omnimoe {
namespace {

std::string shape_str(std::initializer_list<std::int64_t> s) {
  std::string r = "[";
  bool first = true;
  for (auto v : s) {
    if (!first) r += ", ";
    r += std::to_string(v);
    first = false;
  }
  return r + "]";
}

// `name` must be present with exactly `shape`, `dtype` and `device`.
Status expect(const char* name, const TensorView& t, std::initializer_list<std::int64_t> shape, DType dtype,
              Device device) {
  auto want = shape_str(shape) + " " + dtype_name(dtype) + " " + device_name(device);
  if (!t.defined()) return invalid_argument(std::string(name) + ": required, expected " + want);
  bool ok = t.rank == static_cast<int>(shape.size()) && t.dtype == dtype && t.device == device;
  int i = 0;
  for (auto s : shape) ok = ok && t.shape[i++] == s;
  if (!ok) return invalid_argument(std::string(name) + ": expected " + want + ", got " + describe(t));
  return Status::Ok();
}

Status expect_absent(const char* name, const TensorView& t, const char* why) {
  if (t.defined()) return invalid_argument(std::string(name) + ": must be absent " + why);
  return Status::Ok();
}

Status expect_index(const char* name, const TensorView& t, std::int64_t T, std::int64_t K, Device device) {
  if (!t.defined()) return invalid_argument(std::string(name) + ": required, expected " + shape_str({T, K}) + " i32 or i64");
  if (t.rank != 2 || t.shape[0] != T || t.shape[1] != K || (t.dtype != DType::i32 && t.dtype != DType::i64) ||
      t.device != device)
    return invalid_argument(std::string(name) + ": expected " + shape_str({T, K}) + " i32 or i64 " +
                            device_name(device) + ", got " + describe(t));
  return Status::Ok();
}

// x (or grad_y): rank 2, [T, H], float, T >= 1.
Status expect_activations(const char* name, const TensorView& x, std::int64_t H) {
  if (!x.defined()) return invalid_argument(std::string(name) + ": required");
  if (x.rank != 2 || x.shape[1] != H || x.shape[0] < 1 || !dtype_is_float(x.dtype))
    return invalid_argument(std::string(name) + ": expected [T >= 1, H=" + std::to_string(H) +
                            "] of a float dtype, got " + describe(x));
  if (x.shape[0] >= (std::int64_t{1} << 31)) return invalid_argument(std::string(name) + ": T must be below 2^31");
  return Status::Ok();
}

}  // namespace

Status validate_workspace(const Workspace& ws, std::size_t required) {
  if (ws.bytes < required)
    return {StatusCode::workspace_too_small, "workspace: " + std::to_string(ws.bytes) + " bytes given, " +
                                                 std::to_string(required) + " required (ask *_workspace_size)"};
  if (required > 0 && ws.data == nullptr) return invalid_argument("workspace: data is null but bytes > 0");
  // Buffers are carved at 256-byte offsets from the start (vector loads, cuBLASLt).
  if (reinterpret_cast<std::uintptr_t>(ws.data) % 256 != 0)
    return invalid_argument("workspace: data must be 256-byte aligned (cudaMalloc and aligned_alloc(256, ...) are)");
  return Status::Ok();
}

Status validate_params(const Config& cfg, DType dt, Device dev, const Params& p) {
  const std::int64_t H = cfg.hidden, I = cfg.intermediate, Nr = cfg.grid_rows, Nc = cfg.grid_cols;
  const std::int64_t N = cfg.num_experts();
  OMNIMOE_RETURN_IF_ERROR(expect("params.router_row", p.router_row, {Nr, H}, dt, dev));
  OMNIMOE_RETURN_IF_ERROR(expect("params.router_col", p.router_col, {Nc, H}, dt, dev));
  OMNIMOE_RETURN_IF_ERROR(expect("params.expert_in", p.expert_in, {N, H}, dt, dev));
  OMNIMOE_RETURN_IF_ERROR(expect("params.expert_out", p.expert_out, {N, H}, dt, dev));
  if (I > 0) {
    OMNIMOE_RETURN_IF_ERROR(expect("params.gate", p.gate, {I, H}, dt, dev));
    OMNIMOE_RETURN_IF_ERROR(expect("params.up", p.up, {I, H}, dt, dev));
    OMNIMOE_RETURN_IF_ERROR(expect("params.down", p.down, {H, I}, dt, dev));
  } else {
    const char* why = "when config.intermediate = 0 (no shared MLP)";
    OMNIMOE_RETURN_IF_ERROR(expect_absent("params.gate", p.gate, why));
    OMNIMOE_RETURN_IF_ERROR(expect_absent("params.up", p.up, why));
    OMNIMOE_RETURN_IF_ERROR(expect_absent("params.down", p.down, why));
  }
  const DType acc = accumulation_dtype(dt);
  if (cfg.router_norm == RouterNorm::batchnorm) {
    OMNIMOE_RETURN_IF_ERROR(expect("params.running_mean_row", p.running_mean_row, {Nr}, acc, dev));
    OMNIMOE_RETURN_IF_ERROR(expect("params.running_var_row", p.running_var_row, {Nr}, acc, dev));
    OMNIMOE_RETURN_IF_ERROR(expect("params.running_mean_col", p.running_mean_col, {Nc}, acc, dev));
    OMNIMOE_RETURN_IF_ERROR(expect("params.running_var_col", p.running_var_col, {Nc}, acc, dev));
  }
  return Status::Ok();
}

Status validate_forward_args(const Config& cfg, const TensorView& x, const Params& p, const ForwardOutputs& out,
                             const Workspace& ws) {
  OMNIMOE_RETURN_IF_ERROR(validate(cfg));
  OMNIMOE_RETURN_IF_ERROR(expect_activations("x", x, cfg.hidden));
  const std::int64_t T = x.shape[0], H = cfg.hidden, K = cfg.top_k;
  const DType dt = x.dtype, acc = accumulation_dtype(dt);
  const Device dev = x.device;
  OMNIMOE_RETURN_IF_ERROR(validate_params(cfg, dt, dev, p));
  OMNIMOE_RETURN_IF_ERROR(expect("out.y", out.y, {T, H}, dt, dev));
  OMNIMOE_RETURN_IF_ERROR(expect_index("out.expert_ids", out.expert_ids, T, K, dev));
  if (out.scores.defined()) OMNIMOE_RETURN_IF_ERROR(expect("out.scores", out.scores, {T, K}, acc, dev));
  if (out.gates.defined()) OMNIMOE_RETURN_IF_ERROR(expect("out.gates", out.gates, {T, K}, acc, dev));
  std::size_t need = 0;
  OMNIMOE_RETURN_IF_ERROR(forward_workspace_size(cfg, T, dt, dev, out.expert_ids.dtype, &need));
  Status s = validate_workspace(ws, need);
  if (s.code() == StatusCode::workspace_too_small)  // the size depends on the ids' dtype: say which
    return {s.code(), s.message() + " for out.expert_ids of dtype " + dtype_name(out.expert_ids.dtype)};
  return s;
}

Status validate_routed_args(const Config& cfg, const TensorView& x, const Params& p, const TensorView& expert_ids,
                            const TensorView& gates, const TensorView& y, const Workspace& ws) {
  OMNIMOE_RETURN_IF_ERROR(validate(cfg));
  OMNIMOE_RETURN_IF_ERROR(expect_activations("x", x, cfg.hidden));
  const std::int64_t T = x.shape[0], K = cfg.top_k;
  const DType dt = x.dtype;
  const Device dev = x.device;
  OMNIMOE_RETURN_IF_ERROR(validate_params(cfg, dt, dev, p));
  OMNIMOE_RETURN_IF_ERROR(expect_index("expert_ids", expert_ids, T, K, dev));
  OMNIMOE_RETURN_IF_ERROR(expect("gates", gates, {T, K}, accumulation_dtype(dt), dev));
  OMNIMOE_RETURN_IF_ERROR(expect("y", y, {T, cfg.hidden}, dt, dev));
  std::size_t need = 0;
  OMNIMOE_RETURN_IF_ERROR(forward_workspace_size(cfg, T, dt, dev, &need));
  return validate_workspace(ws, need);
}

Status validate_backward_args(const Config& cfg, const TensorView& x, const Params& p, const TensorView& expert_ids,
                              const TensorView& grad_y, const Gradients& g, const Workspace& ws,
                              const SparseExpertGradients* sparse) {
  OMNIMOE_RETURN_IF_ERROR(validate(cfg));
  OMNIMOE_RETURN_IF_ERROR(expect_activations("x", x, cfg.hidden));
  const std::int64_t T = x.shape[0], H = cfg.hidden, I = cfg.intermediate, N = cfg.num_experts();
  const DType dt = x.dtype;
  const Device dev = x.device;
  OMNIMOE_RETURN_IF_ERROR(validate_params(cfg, dt, dev, p));
  OMNIMOE_RETURN_IF_ERROR(expect_index("expert_ids", expert_ids, T, cfg.top_k, dev));
  OMNIMOE_RETURN_IF_ERROR(expect("grad_y", grad_y, {T, H}, dt, dev));
  OMNIMOE_RETURN_IF_ERROR(expect("grads.x", g.x, {T, H}, dt, dev));
  OMNIMOE_RETURN_IF_ERROR(expect("grads.router_row", g.router_row, {cfg.grid_rows, H}, dt, dev));
  OMNIMOE_RETURN_IF_ERROR(expect("grads.router_col", g.router_col, {cfg.grid_cols, H}, dt, dev));
  if (sparse == nullptr) {
    OMNIMOE_RETURN_IF_ERROR(expect("grads.expert_in", g.expert_in, {N, H}, dt, dev));
    OMNIMOE_RETURN_IF_ERROR(expect("grads.expert_out", g.expert_out, {N, H}, dt, dev));
  } else {
    const char* why = "in backward_sparse (the expert rows go to the sparse gradients)";
    OMNIMOE_RETURN_IF_ERROR(expect_absent("grads.expert_in", g.expert_in, why));
    OMNIMOE_RETURN_IF_ERROR(expect_absent("grads.expert_out", g.expert_out, why));
    const std::int64_t cap = sparse_gradient_capacity(cfg, T);
    OMNIMOE_RETURN_IF_ERROR(expect("sparse.ids", sparse->ids, {cap}, DType::i32, dev));
    OMNIMOE_RETURN_IF_ERROR(expect("sparse.count", sparse->count, {1}, DType::i32, dev));
    OMNIMOE_RETURN_IF_ERROR(expect("sparse.expert_in", sparse->expert_in, {cap, H}, dt, dev));
    OMNIMOE_RETURN_IF_ERROR(expect("sparse.expert_out", sparse->expert_out, {cap, H}, dt, dev));
  }
  if (I > 0) {
    OMNIMOE_RETURN_IF_ERROR(expect("grads.gate", g.gate, {I, H}, dt, dev));
    OMNIMOE_RETURN_IF_ERROR(expect("grads.up", g.up, {I, H}, dt, dev));
    OMNIMOE_RETURN_IF_ERROR(expect("grads.down", g.down, {H, I}, dt, dev));
  } else {
    const char* why = "when config.intermediate = 0 (no shared MLP)";
    OMNIMOE_RETURN_IF_ERROR(expect_absent("grads.gate", g.gate, why));
    OMNIMOE_RETURN_IF_ERROR(expect_absent("grads.up", g.up, why));
    OMNIMOE_RETURN_IF_ERROR(expect_absent("grads.down", g.down, why));
  }
  std::size_t need = 0;
  OMNIMOE_RETURN_IF_ERROR(backward_workspace_size(cfg, T, dt, dev, &need));
  return validate_workspace(ws, need);
}

}  // namespace omnimoe
