// The OmniMoE layer as two torch ops, omnimoe::layer_forward and omnimoe::layer_backward
// (CPU and CUDA kernels here; fake kernels and autograd in omnimoe/_ops.py). Each kernel
// checks and wraps its tensors, allocates outputs and a workspace through torch, and calls
// omnimoe::forward / omnimoe::backward on torch's current stream.
//
// The forward is functional (autograd formulas need that): instead of updating the running
// statistics in place, it returns them updated (training) or unchanged (inference), and the
// Python side copies them into the module's buffers, as torch's own functional batchnorm does.
#include <torch/library.h>

#include <string>
#include <tuple>

#include "common.hpp"
#include "omnimoe/config.hpp"

namespace omnimoe_torch {
namespace {

using at::Tensor;
using OptTensor = std::optional<at::Tensor>;

omnimoe::Config make_config(const Tensor& x, const Tensor& router_row, const Tensor& router_col, const OptTensor& gate,
                            int64_t top_k, c10::string_view router_norm, c10::string_view gate_fn,
                            c10::string_view activation, c10::string_view schedule) {
  TORCH_CHECK_VALUE(x.dim() == 2, "omnimoe: x must be [T, H], got shape ", x.sizes());
  TORCH_CHECK_VALUE(router_row.dim() == 2 && router_col.dim() == 2, "omnimoe: router_row and router_col must be ",
                    "[Nr, H] and [Nc, H], got ", router_row.sizes(), " and ", router_col.sizes());
  omnimoe::Config cfg;
  cfg.hidden = x.size(1);
  cfg.intermediate = gate.has_value() && gate->defined() ? gate->size(0) : 0;
  cfg.grid_rows = router_row.size(0);
  cfg.grid_cols = router_col.size(0);
  cfg.top_k = top_k;
  const std::string_view norm(router_norm.data(), router_norm.size());
  const std::string_view gk(gate_fn.data(), gate_fn.size());
  const std::string_view act(activation.data(), activation.size());
  const std::string_view sch(schedule.data(), schedule.size());
  auto n = omnimoe::parse_router_norm(norm);
  auto g = omnimoe::parse_gate(gk);
  auto a = omnimoe::parse_activation(act);
  auto sc = omnimoe::parse_schedule(sch);
  TORCH_CHECK_VALUE(n.has_value(), "omnimoe: router_norm must be 'batchnorm' or 'none', got '", norm, "'");
  TORCH_CHECK_VALUE(g.has_value(), "omnimoe: gate must be 'exp' or 'softmax', got '", gk, "'");
  TORCH_CHECK_VALUE(a.has_value(), "omnimoe: activation must be 'silu', 'gelu' or 'relu', got '", act, "'");
  TORCH_CHECK_VALUE(sc.has_value(), "omnimoe: schedule must be 'auto', 'expert' or 'token', got '", sch, "'");
  cfg.router_norm = *n;
  cfg.gate = *g;
  cfg.activation = *a;
  cfg.schedule = *sc;
  return cfg;
}

// Contiguous inputs, in the order of the ops' schemas.
struct Inputs {
  Tensor x, router_row, router_col, expert_in, expert_out;
  OptTensor gate, up, down, running_mean_row, running_var_row, running_mean_col, running_var_col;

  omnimoe::Params params() const {
    omnimoe::Params p;
    p.router_row = view(router_row, "router_row");
    p.router_col = view(router_col, "router_col");
    p.expert_in = view(expert_in, "expert_in");
    p.expert_out = view(expert_out, "expert_out");
    p.gate = view(gate, "gate");
    p.up = view(up, "up");
    p.down = view(down, "down");
    p.running_mean_row = view(running_mean_row, "running_mean_row");
    p.running_var_row = view(running_var_row, "running_var_row");
    p.running_mean_col = view(running_mean_col, "running_mean_col");
    p.running_var_col = view(running_var_col, "running_var_col");
    return p;
  }
};

// Running statistic `t` copied for the library to update (absent without batchnorm: an
// empty tensor of the accumulation dtype is returned in its place).
Tensor stat_copy(const OptTensor& t, const Tensor& x, bool batchnorm, const char* name) {
  if (!batchnorm) return at::empty({0}, x.options().dtype(accumulation_dtype(x.scalar_type())));
  TORCH_CHECK_VALUE(t.has_value() && t->defined(), "omnimoe: ", name, " is required with router_norm='batchnorm'");
  return t->clone(at::MemoryFormat::Contiguous);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> layer_forward(
    const Tensor& x, const Tensor& router_row, const Tensor& router_col, const Tensor& expert_in,
    const Tensor& expert_out, const OptTensor& gate, const OptTensor& up, const OptTensor& down,
    const OptTensor& running_mean_row, const OptTensor& running_var_row, const OptTensor& running_mean_col,
    const OptTensor& running_var_col, int64_t top_k, c10::string_view router_norm, c10::string_view gate_fn,
    c10::string_view activation, bool training, bool return_routing, c10::string_view schedule) {
  const omnimoe::Config cfg =
      make_config(x, router_row, router_col, gate, top_k, router_norm, gate_fn, activation, schedule);
  const c10::DeviceGuard guard(x.device());
  const bool bn = cfg.router_norm == omnimoe::RouterNorm::batchnorm;
  Inputs in{contiguous(x), contiguous(router_row), contiguous(router_col), contiguous(expert_in),
            contiguous(expert_out), contiguous(gate), contiguous(up), contiguous(down),
            std::nullopt, std::nullopt, std::nullopt, std::nullopt};
  Tensor rm_row = stat_copy(running_mean_row, x, bn, "running_mean_row");
  Tensor rv_row = stat_copy(running_var_row, x, bn, "running_var_row");
  Tensor rm_col = stat_copy(running_mean_col, x, bn, "running_mean_col");
  Tensor rv_col = stat_copy(running_var_col, x, bn, "running_var_col");
  if (bn) {
    in.running_mean_row = rm_row;
    in.running_var_row = rv_row;
    in.running_mean_col = rm_col;
    in.running_var_col = rv_col;
  }
  const int64_t T = x.size(0), H = x.size(1), K = top_k;
  const auto acc = x.options().dtype(accumulation_dtype(x.scalar_type()));
  Tensor y = at::empty({T, H}, x.options());
  Tensor ids = at::empty({T, K}, x.options().dtype(at::kInt));
  Tensor scores = at::empty({return_routing ? T : 0, K}, acc);
  Tensor gates = at::empty({return_routing ? T : 0, K}, acc);

  const omnimoe::TensorView xv = view(in.x, "x");
  std::size_t bytes = 0;
  // ids are int32: the CUDA forward keeps its routing there (no copy in the workspace).
  check(omnimoe::forward_workspace_size(cfg, T, xv.dtype, xv.device, omnimoe::DType::i32, &bytes),
        "forward_workspace_size");
  TorchWorkspace ws = make_workspace(bytes, x);
  omnimoe::ForwardOutputs out;
  out.y = view(y, "y");
  out.expert_ids = view(ids, "expert_ids");
  if (return_routing) {
    out.scores = view(scores, "scores");
    out.gates = view(gates, "gates");
  }
  const auto mode = training ? omnimoe::Mode::training : omnimoe::Mode::inference;
  check(omnimoe::forward(cfg, mode, xv, in.params(), out, ws.ws, current_stream(x)), "forward");
  return {y, ids, scores, gates, rm_row, rv_row, rm_col, rv_col};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> layer_backward(
    const Tensor& grad_y, const Tensor& x, const Tensor& router_row, const Tensor& router_col,
    const Tensor& expert_in, const Tensor& expert_out, const OptTensor& gate, const OptTensor& up,
    const OptTensor& down, const OptTensor& running_mean_row, const OptTensor& running_var_row,
    const OptTensor& running_mean_col, const OptTensor& running_var_col, const Tensor& expert_ids, int64_t top_k,
    c10::string_view router_norm, c10::string_view gate_fn, c10::string_view activation, bool training,
    c10::string_view schedule) {
  const omnimoe::Config cfg =
      make_config(x, router_row, router_col, gate, top_k, router_norm, gate_fn, activation, schedule);
  const c10::DeviceGuard guard(x.device());
  Inputs in{contiguous(x), contiguous(router_row), contiguous(router_col), contiguous(expert_in),
            contiguous(expert_out), contiguous(gate), contiguous(up), contiguous(down),
            contiguous(running_mean_row), contiguous(running_var_row), contiguous(running_mean_col),
            contiguous(running_var_col)};
  const Tensor gy = grad_y.contiguous();
  const Tensor ids = expert_ids.contiguous();
  const int64_t I = cfg.intermediate, H = cfg.hidden;
  Tensor gx = at::empty_like(in.x);
  Tensor g_row = at::empty_like(in.router_row);
  Tensor g_col = at::empty_like(in.router_col);
  Tensor g_in = at::empty_like(in.expert_in);
  Tensor g_out = at::empty_like(in.expert_out);
  // Without the shared branch (I = 0) these are the [0, H], [0, H], [H, 0] gradients.
  Tensor g_gate = at::empty({I, H}, x.options());
  Tensor g_up = at::empty({I, H}, x.options());
  Tensor g_down = at::empty({H, I}, x.options());

  const omnimoe::TensorView xv = view(in.x, "x");
  std::size_t bytes = 0;
  check(omnimoe::backward_workspace_size(cfg, xv.dim(0), xv.dtype, xv.device, &bytes), "backward_workspace_size");
  TorchWorkspace ws = make_workspace(bytes, x);
  omnimoe::Gradients g;
  g.x = view(gx, "grad_x");
  g.router_row = view(g_row, "grad_router_row");
  g.router_col = view(g_col, "grad_router_col");
  g.expert_in = view(g_in, "grad_expert_in");
  g.expert_out = view(g_out, "grad_expert_out");
  if (I > 0) {
    g.gate = view(g_gate, "grad_gate");
    g.up = view(g_up, "grad_up");
    g.down = view(g_down, "grad_down");
  }
  const auto mode = training ? omnimoe::Mode::training : omnimoe::Mode::inference;
  check(omnimoe::backward(cfg, mode, xv, in.params(), view(ids, "expert_ids"), view(gy, "grad_y"), g, ws.ws,
                          current_stream(x)),
        "backward");
  return {gx, g_row, g_col, g_in, g_out, g_gate, g_up, g_down};
}

}  // namespace
}  // namespace omnimoe_torch

// Baseline layers (include/omnimoe/baselines.hpp) go in their own file with
// TORCH_LIBRARY_FRAGMENT(omnimoe, m) and their own CPU/CUDA registrations.
TORCH_LIBRARY(omnimoe, m) {
  m.set_python_module("omnimoe._ops");
  m.def(
      "layer_forward(Tensor x, Tensor router_row, Tensor router_col, Tensor expert_in, Tensor expert_out, "
      "Tensor? gate, Tensor? up, Tensor? down, Tensor? running_mean_row, Tensor? running_var_row, "
      "Tensor? running_mean_col, Tensor? running_var_col, int top_k, str router_norm, str gate_fn, "
      "str activation, bool training, bool return_routing, str schedule=\"auto\") -> (Tensor y, "
      "Tensor expert_ids, Tensor scores, "
      "Tensor gates, Tensor running_mean_row, Tensor running_var_row, Tensor running_mean_col, "
      "Tensor running_var_col)");
  m.def(
      "layer_backward(Tensor grad_y, Tensor x, Tensor router_row, Tensor router_col, Tensor expert_in, "
      "Tensor expert_out, Tensor? gate, Tensor? up, Tensor? down, Tensor? running_mean_row, "
      "Tensor? running_var_row, Tensor? running_mean_col, Tensor? running_var_col, Tensor expert_ids, "
      "int top_k, str router_norm, str gate_fn, str activation, bool training, str schedule=\"auto\") -> "
      "(Tensor grad_x, "
      "Tensor grad_router_row, Tensor grad_router_col, Tensor grad_expert_in, Tensor grad_expert_out, "
      "Tensor grad_gate, Tensor grad_up, Tensor grad_down)");
}

// One kernel for both devices: the library dispatches on the device of x (a build without
// CUDA answers a CUDA tensor with the library's own "no CUDA backend" error).
TORCH_LIBRARY_IMPL(omnimoe, CPU, m) {
  m.impl("layer_forward", &omnimoe_torch::layer_forward);
  m.impl("layer_backward", &omnimoe_torch::layer_backward);
}
TORCH_LIBRARY_IMPL(omnimoe, CUDA, m) {
  m.impl("layer_forward", &omnimoe_torch::layer_forward);
  m.impl("layer_backward", &omnimoe_torch::layer_backward);
}
