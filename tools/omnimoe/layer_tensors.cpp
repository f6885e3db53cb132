#include "layer_tensors.hpp"

#include <algorithm>
#include <cmath>

namespace omnimoe::tool {
namespace {

Tensor random_tensor(DType dt, Device dev, std::vector<std::int64_t> shape, std::uint64_t seed, double scale,
                     double offset = 0.0) {
  Tensor t(dt, dev, shape);
  fill_uniform(t.view(), seed, offset - scale, offset + scale);
  return t;
}

// An uninitialised tensor shaped like t (absent if t is).
Tensor like(const Tensor& t) {
  const TensorView& v = t.view();
  if (!v.defined()) return Tensor();
  return Tensor(v.dtype, v.device, std::vector<std::int64_t>(v.shape.begin(), v.shape.begin() + v.rank));
}

}  // namespace

Params LayerTensors::params() const {
  return {router_row.view(),       router_col.view(),      expert_in.view(),        expert_out.view(),
          gate.view(),             up.view(),              down.view(),             running_mean_row.view(),
          running_var_row.view(),  running_mean_col.view(), running_var_col.view()};
}

LayerTensors random_layer(const Config& cfg, std::int64_t tokens, DType dtype, Device device, std::uint64_t seed,
                          int input_sets, bool with_grad_y) {
  throw_if_error(validate(cfg));
  const std::int64_t H = cfg.hidden, I = cfg.intermediate, Nr = cfg.grid_rows, Nc = cfg.grid_cols;
  const std::int64_t N = cfg.num_experts();
  const DType acc = accumulation_dtype(dtype);
  // Uniform(-a, a) has variance a^2 / 3: weights with a = sqrt(3 / fan_in) have variance
  // 1 / fan_in, so router logits, expert pre-activations and the shared MLP stay O(1) at
  // every size.
  const double in_h = std::sqrt(3.0 / static_cast<double>(H));
  std::uint64_t s = seed * 64;  // a distinct stream per tensor
  LayerTensors l;
  l.cfg = cfg;
  l.dtype = dtype;
  l.device = device;
  l.tokens = tokens;
  l.router_row = random_tensor(dtype, device, {Nr, H}, ++s, in_h);
  l.router_col = random_tensor(dtype, device, {Nc, H}, ++s, in_h);
  l.expert_in = random_tensor(dtype, device, {N, H}, ++s, in_h);
  l.expert_out = random_tensor(dtype, device, {N, H}, ++s, in_h);
  if (I > 0) {
    l.gate = random_tensor(dtype, device, {I, H}, ++s, in_h);
    l.up = random_tensor(dtype, device, {I, H}, ++s, in_h);
    l.down = random_tensor(dtype, device, {H, I}, ++s, std::sqrt(3.0 / static_cast<double>(I)));
  }
  s = seed * 64 + 16;
  if (cfg.router_norm == RouterNorm::batchnorm) {
    // Running statistics near those of unit-variance logits, but not equal to any batch's.
    l.running_mean_row = random_tensor(acc, device, {Nr}, ++s, 0.2);
    l.running_var_row = random_tensor(acc, device, {Nr}, ++s, 0.5, 1.0);
    l.running_mean_col = random_tensor(acc, device, {Nc}, ++s, 0.2);
    l.running_var_col = random_tensor(acc, device, {Nc}, ++s, 0.5, 1.0);
  }
  s = seed * 64 + 32;
  for (int i = 0; i < std::max(input_sets, 1); ++i) l.x.push_back(random_tensor(dtype, device, {tokens, H}, ++s, 1.0));
  if (with_grad_y) l.grad_y = random_tensor(dtype, device, {tokens, H}, seed * 64 + 63, 1.0);
  return l;
}

LayerTensors convert_layer(const LayerTensors& l, DType dtype, Device device) {
  LayerTensors out;
  out.cfg = l.cfg;
  out.dtype = dtype;
  out.device = device;
  out.tokens = l.tokens;
  const DType acc = accumulation_dtype(dtype);
  auto conv = [&](const Tensor& t, DType dt) { return t.defined() ? convert_tensor(t.view(), dt, device) : Tensor(); };
  for (const LayerMember& m : kLayerMembers) out.*m.tensor = conv(l.*m.tensor, m.is_statistic ? acc : dtype);
  for (const Tensor& x : l.x) out.x.push_back(conv(x, dtype));
  out.grad_y = conv(l.grad_y, dtype);
  return out;
}

Tensor& layer_tensor(LayerTensors& l, std::string_view name) {
  if (name == "x") return l.x.at(0);
  for (const LayerMember& m : kLayerMembers)
    if (name == m.name) return l.*m.tensor;
  throw Error({StatusCode::internal, "no layer tensor named " + std::string(name)});
}

ForwardBuffers forward_buffers(const LayerTensors& l, DType id_dtype) {
  const std::int64_t T = l.tokens, H = l.cfg.hidden, K = l.cfg.top_k;
  const DType acc = accumulation_dtype(l.dtype);
  ForwardBuffers b;
  b.y = Tensor(l.dtype, l.device, {T, H});
  b.expert_ids = Tensor(id_dtype, l.device, {T, K});
  b.scores = Tensor(acc, l.device, {T, K});
  b.gates = Tensor(acc, l.device, {T, K});
  return b;
}

Gradients GradientBuffers::gradients() const {
  return {x.view(),          router_row.view(), router_col.view(), expert_in.view(),
          expert_out.view(), gate.view(),       up.view(),         down.view()};
}

GradientBuffers gradient_buffers(const LayerTensors& l) {
  GradientBuffers g;
  g.x = like(l.x.at(0));
  g.router_row = like(l.router_row);
  g.router_col = like(l.router_col);
  g.expert_in = like(l.expert_in);
  g.expert_out = like(l.expert_out);
  g.gate = like(l.gate);  // the shared-branch gradients are absent with the branch
  g.up = like(l.up);
  g.down = like(l.down);
  return g;
}

Buffer workspace(const LayerTensors& l, bool backward, DType ids) {
  std::size_t fwd = 0, bwd = 0;
  throw_if_error(forward_workspace_size(l.cfg, l.tokens, l.dtype, l.device, ids, &fwd));
  if (backward) throw_if_error(backward_workspace_size(l.cfg, l.tokens, l.dtype, l.device, &bwd));
  return Buffer(l.device, std::max(fwd, bwd));
}

}  // namespace omnimoe::tool
