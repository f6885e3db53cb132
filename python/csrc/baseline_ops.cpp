// The baseline layers of include/omnimoe/baselines.hpp (dense, gshard, deepseekmoe, pkm, peer)
// as one torch op, omnimoe::baseline_forward (CPU and CUDA kernels here; the fake kernel and
// the autograd registration, which refuses to differentiate, in omnimoe/_ops.py). As in
// layer_ops.cpp the kernel checks and wraps its tensors, allocates the outputs and a workspace
// through torch, and calls omnimoe::baselines::forward (or forward_routed, when the routing is
// given) on torch's current stream; the library validates the config and every tensor.
//
// The library has only the forward of the baselines: there is no baseline_backward.
#include <torch/library.h>

#include <optional>
#include <string>
#include <string_view>
#include <tuple>

#include "common.hpp"
#include "omnimoe/baselines.hpp"

namespace omnimoe_torch {
namespace {

using at::Tensor;
using OptTensor = std::optional<at::Tensor>;
namespace bl = omnimoe::baselines;

bl::Kind parse_kind(c10::string_view kind) {
  const std::string_view k(kind.data(), kind.size());
  for (bl::Kind c : {bl::Kind::dense, bl::Kind::gshard, bl::Kind::deepseekmoe, bl::Kind::pkm, bl::Kind::peer})
    if (k == bl::name(c)) return c;
  TORCH_CHECK_VALUE(false, "omnimoe: baseline kind must be 'dense', 'gshard', 'deepseekmoe', 'pkm' or 'peer', got '",
                    k, "'");
}

std::tuple<Tensor, Tensor> baseline_forward(
    c10::string_view kind, const Tensor& x, const OptTensor& gate, const OptTensor& up, const OptTensor& down,
    const OptTensor& router, const OptTensor& expert_gate, const OptTensor& expert_up, const OptTensor& expert_down,
    const OptTensor& query, const OptTensor& keys_row, const OptTensor& keys_col, const OptTensor& values,
    const OptTensor& expert_in, const OptTensor& expert_out, int64_t width, int64_t num_experts, int64_t grid_rows,
    int64_t grid_cols, int64_t top_k, int64_t shared_width, const OptTensor& routed_ids,
    const OptTensor& routed_gates) {
  TORCH_CHECK_VALUE(x.dim() == 2, "omnimoe: x must be [T, H], got shape ", x.sizes());
  const bool routed = routed_ids.has_value() && routed_ids->defined();
  TORCH_CHECK_VALUE(routed == (routed_gates.has_value() && routed_gates->defined()),
                    "omnimoe: routed_ids and routed_gates go together (both given: forward_routed)");
  bl::BaselineConfig cfg;
  cfg.kind = parse_kind(kind);
  cfg.hidden = x.size(1);
  cfg.width = width;
  cfg.num_experts = num_experts;
  cfg.grid_rows = grid_rows;
  cfg.grid_cols = grid_cols;
  cfg.top_k = top_k;
  cfg.shared_width = shared_width;
  check(bl::validate(cfg), "baseline_forward");
  const c10::DeviceGuard guard(x.device());

  // Contiguous inputs, kept alive for the call.
  const Tensor xc = x.contiguous();
  const OptTensor g = contiguous(gate), u = contiguous(up), d = contiguous(down), r = contiguous(router),
                  eg = contiguous(expert_gate), eu = contiguous(expert_up), ed = contiguous(expert_down),
                  q = contiguous(query), kr = contiguous(keys_row), kc = contiguous(keys_col),
                  v = contiguous(values), ei = contiguous(expert_in), eo = contiguous(expert_out);
  bl::BaselineParams p;
  p.gate = view(g, "gate");
  p.up = view(u, "up");
  p.down = view(d, "down");
  p.router = view(r, "router");
  p.expert_gate = view(eg, "expert_gate");
  p.expert_up = view(eu, "expert_up");
  p.expert_down = view(ed, "expert_down");
  p.query = view(q, "query");
  p.keys_row = view(kr, "keys_row");
  p.keys_col = view(kc, "keys_col");
  p.values = view(v, "values");
  p.expert_in = view(ei, "expert_in");
  p.expert_out = view(eo, "expert_out");

  const int64_t T = x.size(0), H = x.size(1);
  // dense has no routing: its expert_ids output is [T, 0].
  const int64_t K = cfg.kind == bl::Kind::dense ? 0 : top_k;
  Tensor y = at::empty({T, H}, x.options());
  Tensor ids = at::empty({T, K}, x.options().dtype(at::kInt));

  const omnimoe::TensorView xv = view(xc, "x");
  std::size_t bytes = 0;
  check(bl::workspace_size(cfg, T, xv.dtype, xv.device, &bytes), "baseline_forward");
  TorchWorkspace ws = make_workspace(bytes, x);
  if (routed) {
    const Tensor ri = routed_ids->contiguous();
    const Tensor rg = routed_gates->contiguous();
    check(bl::forward_routed(cfg, xv, p, view(ri, "routed_ids"), view(rg, "routed_gates"), view(y, "y"), ws.ws,
                             current_stream(x)),
          "baseline_forward (routed)");
    ids.copy_(ri);  // the routing used, returned as given
  } else {
    check(bl::forward(cfg, xv, p, view(y, "y"), ws.ws, current_stream(x),
                      K > 0 ? view(ids, "expert_ids") : omnimoe::TensorView{}),
          "baseline_forward");
  }
  return {y, ids};
}

}  // namespace
}  // namespace omnimoe_torch

TORCH_LIBRARY_FRAGMENT(omnimoe, m) {
  m.def(
      "baseline_forward(str kind, Tensor x, Tensor? gate, Tensor? up, Tensor? down, Tensor? router, "
      "Tensor? expert_gate, Tensor? expert_up, Tensor? expert_down, Tensor? query, Tensor? keys_row, "
      "Tensor? keys_col, Tensor? values, Tensor? expert_in, Tensor? expert_out, int width, int num_experts, "
      "int grid_rows, int grid_cols, int top_k, int shared_width, Tensor? routed_ids=None, "
      "Tensor? routed_gates=None) -> (Tensor y, Tensor expert_ids)");
}

// One kernel for both devices: the library dispatches on the device of x.
TORCH_LIBRARY_IMPL(omnimoe, CPU, m) { m.impl("baseline_forward", &omnimoe_torch::baseline_forward); }
TORCH_LIBRARY_IMPL(omnimoe, CUDA, m) { m.impl("baseline_forward", &omnimoe_torch::baseline_forward); }
