// CUDA forward against the CPU float64 forward on the same values.
#include <algorithm>
#include <cmath>
#include <map>

#include "checks.hpp"
#include "cli_args.hpp"
#include "layer_tensors.hpp"
#include "reference.hpp"

namespace omnimoe::tool {

CheckResult check_cuda_forward(const CheckCase& c, DType dtype, std::uint64_t seed) {
  if (std::string why = cuda_unavailable_reason(); !why.empty()) return CheckResult::skip(why);
  // Routing is compared only where the K-th and (K+1)-th reference scores differ by more
  // than float32 scoring can move them; scores and gates are float32 on both sides.
  constexpr double kRouteGap = 1e-3, kScoreTol = 1e-3;
  // y: float32 may use TF32 tensor cores; bf16 rounds inputs, activations and y.
  const double y_tol = dtype == DType::f32 ? 2e-3 : 3e-2;
  const std::int64_t T = c.tokens, H = c.cfg.hidden, K = c.cfg.top_k;

  LayerTensors gpu = convert_layer(random_layer(c.cfg, T, DType::f64, Device::cpu, seed), dtype, Device::cuda);
  LayerTensors cpu = convert_layer(gpu, DType::f64, Device::cpu);  // the very values the GPU holds
  const RouteReference ref = reference_route(cpu, c.mode);

  auto run = [&](LayerTensors& l, ForwardBuffers& out) {
    for (const Tensor* t : {&out.y, &out.expert_ids, &out.scores, &out.gates}) poison(t->view());
    Buffer ws = workspace(l, /*backward=*/false, out.expert_ids.view().dtype);  // the GPU's i32 ids: its smaller size
    throw_if_error(forward(c.cfg, c.mode, l.x[0].view(), l.params(), out.outputs(), as_workspace(ws)));
    throw_if_error(synchronize(l.device));
  };
  ForwardBuffers want = forward_buffers(cpu), got = forward_buffers(gpu, DType::i32);
  run(cpu, want);
  run(gpu, got);

  const std::vector<std::int64_t> want_ids = to_ints(want.expert_ids.view()), got_ids = to_ints(got.expert_ids.view());
  const std::vector<double> want_y = to_doubles(want.y.view()), got_y = to_doubles(got.y.view());
  const std::vector<double> want_s = to_doubles(want.scores.view()), got_s = to_doubles(got.scores.view());
  const std::vector<double> want_g = to_doubles(want.gates.view()), got_g = to_doubles(got.gates.view());
  for (auto [name, v] : {std::pair{"y", &got_y}, {"scores", &got_s}, {"gates", &got_g}})
    if (std::int64_t i = first_non_finite(*v); i >= 0)
      return CheckResult::fail(std::string(name) + "[" + std::to_string(i) + "] not written (NaN)");

  double y_scale = 0;
  for (double v : want_y) y_scale += v * v;
  y_scale = std::sqrt(y_scale / static_cast<double>(want_y.size()));
  std::int64_t compared = 0;
  double worst_y = 0;
  for (std::int64_t t = 0; t < T; ++t) {
    double gap = 0;
    (void)ref.top_k(t, K, &gap);
    if (gap <= kRouteGap) continue;
    ++compared;
    const std::string at = "token " + std::to_string(t) + ": ";
    // Same chosen set; order may differ only among near-equal scores, so match by id.
    std::map<std::int64_t, std::int64_t> slot;
    for (std::int64_t k = 0; k < K; ++k) slot[want_ids[t * K + k]] = t * K + k;
    for (std::int64_t k = 0; k < K; ++k) {
      const std::int64_t i = t * K + k;
      auto it = slot.find(got_ids[i]);
      if (it == slot.end()) return CheckResult::fail(at + "CUDA chose expert " + std::to_string(got_ids[i]) +
                                                     ", which the CPU did not");
      if (std::abs(got_s[i] - want_s[it->second]) > kScoreTol)
        return CheckResult::fail(at + "score " + fmt(got_s[i]) + ", CPU " + fmt(want_s[it->second]));
      if (std::abs(got_g[i] - want_g[it->second]) > kScoreTol * (std::abs(want_g[it->second]) + 1e-3))
        return CheckResult::fail(at + "gate " + fmt(got_g[i]) + ", CPU " + fmt(want_g[it->second]));
      slot.erase(it);
    }
    for (std::int64_t h = 0; h < H; ++h) {
      const std::int64_t i = t * H + h;
      const double err = std::abs(got_y[i] - want_y[i]) / (std::abs(want_y[i]) + y_scale);
      if (err > y_tol) return CheckResult::fail(at + "y[" + std::to_string(h) + "] = " + fmt(got_y[i]) + ", CPU " +
                                                fmt(want_y[i]));
      worst_y = std::max(worst_y, err);
    }
  }
  if (compared * 2 < T)
    return CheckResult::fail("only " + std::to_string(compared) + " of " + std::to_string(T) +
                             " tokens have a routing gap above " + fmt(kRouteGap));

  if (c.mode == Mode::training && c.cfg.router_norm == RouterNorm::batchnorm)
    for (const LayerMember& m : kLayerMembers) {
      if (!m.is_statistic) continue;
      const std::vector<double> a = to_doubles((gpu.*m.tensor).view()), b = to_doubles((cpu.*m.tensor).view());
      for (std::size_t i = 0; i < a.size(); ++i)
        if (std::abs(a[i] - b[i]) > 1e-4 * (1 + std::abs(b[i])))
          return CheckResult::fail(std::string(m.name) + "[" + std::to_string(i) + "] = " + fmt(a[i]) + ", CPU " +
                                   fmt(b[i]));
    }
  return CheckResult::pass(std::to_string(compared) + " of " + std::to_string(T) +
                           " tokens compared, worst relative y error " + fmt(worst_y));
}

}  // namespace omnimoe::tool
